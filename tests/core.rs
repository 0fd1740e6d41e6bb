//! The core driven in-process (no FUSE; root only for the index, whose
//! xattrs are trusted ones): the node table and the bookkeeping of names,
//! with lower hard-linked files whose names come and go, with and without
//! the index. Each step is what the kernel would send; the upper directory is
//! checked on disk.

use std::ffi::OsStr;
use std::fs;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use unionfs::overlay::node::{Node, ROOT_ID};
use unionfs::overlay::superblock::{Tuning, Union};

/// Layers in a temporary directory and a union over them.
struct Core {
    _dir: tempfile::TempDir,
    upper: PathBuf,
    /// `WORKDIR/index` (used only with the index on).
    index: PathBuf,
    union: Union,
}

fn open_dir(p: &Path) -> OwnedFd {
    fs::File::open(p).unwrap().into()
}

fn name(s: &str) -> &OsStr {
    OsStr::new(s)
}

impl Core {
    /// One lower layer made by `fill`, an empty upper, without the index.
    fn new(fill: impl FnOnce(&Path)) -> Core {
        Core::make(fill, false)
    }

    /// The same with the index on (which needs trusted xattrs: root).
    fn with_index(fill: impl FnOnce(&Path)) -> Option<Core> {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("the index needs root (trusted xattrs): not tested here");
            return None;
        }
        let c = Core::make(fill, true);
        assert!(c.union.index_is_on());
        Some(c)
    }

    fn make(fill: impl FnOnce(&Path), index: bool) -> Core {
        let dir = tempfile::tempdir().unwrap();
        let (lower, upper, work) = (
            dir.path().join("lower"),
            dir.path().join("upper"),
            dir.path().join("work"),
        );
        for d in [&lower, &upper, &work] {
            fs::create_dir(d).unwrap();
        }
        fill(&lower);
        let mut union = Union::new(
            Some((open_dir(&upper), open_dir(&work))),
            vec![open_dir(&lower)],
            Tuning::new(true),
        );
        let index_dir = dir.path().join("index");
        if index {
            fs::create_dir(&index_dir).unwrap();
            union.enable_index(open_dir(&index_dir), true).unwrap();
        }
        Core {
            _dir: dir,
            upper,
            index: index_dir,
            union,
        }
    }

    /// LOOKUP of a path from the root, one component at a time (each
    /// component keeps the reference the kernel would hold).
    fn lookup(&self, path: &str) -> Arc<Node> {
        let mut id = ROOT_ID;
        let mut node = self.union.node(ROOT_ID).unwrap();
        for part in path.split('/') {
            node = self.union.lookup(id, name(part)).unwrap().0;
            id = node.id;
        }
        node
    }

    fn st_ino(&self, path: &str) -> u64 {
        let n = self.lookup(path);
        self.union.getattr(n.id, None).unwrap().st_ino
    }

    /// Reads a whole file through OPEN with `flags`, READ and RELEASE.
    fn read(&self, node: &Node, flags: i32) -> Result<String, i32> {
        let o = self.union.open(node.id, flags).map_err(|e| e as i32)?;
        let data = self.union.read(o.fh, 0, 1 << 16).map_err(|e| e as i32)?;
        self.union.release(o.fh);
        Ok(String::from_utf8(data).unwrap())
    }

    /// OPEN for writing with O_TRUNC, WRITE, RELEASE.
    fn write(&self, node: &Node, data: &str) {
        let o = self
            .union
            .open(node.id, libc::O_WRONLY | libc::O_TRUNC)
            .unwrap();
        self.union.write(o.fh, 0, data.as_bytes()).unwrap();
        self.union.release(o.fh);
    }

    fn upper_has(&self, path: &str) -> bool {
        fs::symlink_metadata(self.upper.join(path)).is_ok()
    }

    fn nlink(&self, node: &Node) -> u64 {
        self.union.getattr(node.id, None).unwrap().st_nlink
    }

    fn index_entries(&self) -> usize {
        fs::read_dir(&self.index).unwrap().count()
    }
}

/// `a`, `d/b` and `c`: one lower inode with three names.
fn linked_triple(lower: &Path) {
    fs::create_dir(lower.join("d")).unwrap();
    fs::write(lower.join("a"), "old\n").unwrap();
    fs::hard_link(lower.join("a"), lower.join("d/b")).unwrap();
    fs::hard_link(lower.join("a"), lower.join("c")).unwrap();
}

const NOFOLLOW: i32 = libc::O_RDONLY | libc::O_NOFOLLOW;

#[test]
fn each_name_of_a_lower_hard_link_is_a_node_of_its_own() {
    let c = Core::new(linked_triple);
    let (a, b) = (c.lookup("a"), c.lookup("d/b"));
    assert_ne!(a.id, b.id, "two names, two nodes");
    assert_eq!(c.lookup("a").id, a.id, "a name held keeps its node");
    assert_eq!(
        c.st_ino("a"),
        c.st_ino("d/b"),
        "one lower inode, one st_ino"
    );
    assert_eq!(c.union.getattr(a.id, None).unwrap().st_nlink, 3);

    // Looked up in the other order, the write still lands on its own name.
    c.write(&a, "new\n");
    assert!(c.upper_has("a"));
    assert!(!c.upper_has("d/b") && !c.upper_has("c"));
    assert_eq!(fs::read_to_string(c.upper.join("a")).unwrap(), "new\n");
    assert_eq!(c.read(&b, NOFOLLOW).unwrap(), "old\n");
    assert_eq!(c.read(&c.lookup("c"), NOFOLLOW).unwrap(), "old\n");

    // The written name is its own file now (the link is broken, as without
    // the index): its own number and one link; the others keep theirs.
    let (ino_a, ino_b) = (c.st_ino("a"), c.st_ino("d/b"));
    assert_ne!(ino_a, ino_b);
    assert_eq!(ino_b, c.st_ino("c"));
    assert_eq!(c.union.getattr(a.id, None).unwrap().st_nlink, 1);
    assert_eq!(c.union.getattr(b.id, None).unwrap().st_nlink, 3);
    // A lookup of the copied-up name finds the node the kernel holds.
    assert_eq!(c.lookup("a").id, a.id);
}

#[test]
fn removing_one_name_leaves_the_others_openable_with_o_nofollow() {
    let c = Core::new(linked_triple);
    // An upper file and a link made through the union; the first name goes.
    let (f, st, fd) = c
        .union
        .create(
            ROOT_ID,
            name("f"),
            libc::S_IFREG | 0o644,
            libc::O_WRONLY,
            caller(),
        )
        .unwrap();
    assert_eq!(st.st_nlink, 1);
    let o = c.union.created(f.clone(), fd, libc::O_WRONLY);
    c.union.write(o.fh, 0, b"hello\n").unwrap();
    c.union.release(o.fh);
    let (g, _) = c.union.link(f.id, ROOT_ID, name("g")).unwrap();
    assert_eq!(g.id, f.id, "an upper hard link is one node");
    c.union.unlink(ROOT_ID, name("f")).unwrap();
    assert_eq!(c.read(&g, NOFOLLOW).unwrap(), "hello\n");
    assert_eq!(c.read(&c.lookup("g"), NOFOLLOW).unwrap(), "hello\n");

    // A lower name whited out: the others are untouched.
    let (a, b) = (c.lookup("a"), c.lookup("d/b"));
    c.union.unlink(ROOT_ID, name("a")).unwrap();
    assert_eq!(c.read(&b, NOFOLLOW).unwrap(), "old\n");
    assert_eq!(c.union.getattr(b.id, None).unwrap().st_nlink, 3);
    assert_eq!(c.union.getattr(a.id, None).unwrap().st_nlink, 0);
    assert!(c.union.lookup(ROOT_ID, name("a")).is_err());

    // A name replaced by a rename: the other name still shows the lower data.
    let cn = c.lookup("c");
    c.union
        .rename(ROOT_ID, name("g"), ROOT_ID, name("c"), 0)
        .unwrap();
    assert_eq!(c.read(&cn, NOFOLLOW).unwrap(), "old\n", "the open node");
    assert_eq!(c.read(&c.lookup("c"), NOFOLLOW).unwrap(), "hello\n");
    assert_eq!(c.read(&c.lookup("d/b"), NOFOLLOW).unwrap(), "old\n");
}

#[test]
fn a_forgotten_name_gets_a_node_again_with_the_same_number() {
    let c = Core::new(linked_triple);
    let a = c.lookup("a");
    let ino = c.st_ino("a");
    let (id, refs) = (a.id, 2); // lookup + st_ino's lookup
    drop(a);
    c.union.forget(id, refs);
    assert!(!c.union.holds_node(id), "forgotten");
    let again = c.lookup("a");
    assert_eq!(c.st_ino("a"), ino);
    assert_eq!(c.read(&again, NOFOLLOW).unwrap(), "old\n");
    // Renaming a name copies that name up, under the new name only.
    c.union
        .rename(ROOT_ID, name("a"), ROOT_ID, name("moved"), 0)
        .unwrap();
    assert!(c.upper_has("moved"));
    assert_eq!(
        fs::symlink_metadata(c.upper.join("a")).unwrap().rdev(),
        0,
        "a whiteout where the lower name remains"
    );
    assert!(!c.upper_has("c") && !c.upper_has("d/b"));
    assert_eq!(c.lookup("moved").id, again.id);
}

#[test]
fn renaming_one_name_over_another_of_the_same_lower_file_moves_it() {
    // Two lower names of one inode are two files to rename(2), as in the
    // kernel without the index: `a` replaces `c`, `a` goes.
    let c = Core::new(linked_triple);
    c.lookup("a");
    c.lookup("c");
    c.union
        .rename(ROOT_ID, name("a"), ROOT_ID, name("c"), 0)
        .unwrap();
    assert!(c.union.lookup(ROOT_ID, name("a")).is_err());
    assert!(c.upper_has("c"));
    assert_eq!(c.read(&c.lookup("c"), NOFOLLOW).unwrap(), "old\n");
}

#[test]
fn with_the_index_every_name_is_one_inode_through_copy_up_and_unlinks() {
    let Some(c) = Core::with_index(linked_triple) else {
        return;
    };
    let (a, b, cn) = (c.lookup("a"), c.lookup("d/b"), c.lookup("c"));
    assert!(a.id != b.id && b.id != cn.id, "each name its own node");
    let ino = c.st_ino("a");
    // A write through `b` copies the file once, into the index, and links
    // `d/b` to it; the other names show the copy at once.
    c.write(
        &b, "new
",
    );
    assert_eq!(c.index_entries(), 1);
    assert!(c.upper_has("d/b") && !c.upper_has("a") && !c.upper_has("c"));
    assert_eq!(
        fs::metadata(c.upper.join("d/b")).unwrap().nlink(),
        2,
        "the name and the entry"
    );
    for (n, path) in [(&a, "a"), (&b, "d/b"), (&cn, "c")] {
        assert_eq!(
            c.read(n, NOFOLLOW).unwrap(),
            "new
",
            "{path}"
        );
        assert_eq!(c.nlink(n), 3, "{path}");
        assert_eq!(c.st_ino(path), ino, "{path}");
    }
    // A lower name removed: linked up, then whited out; two names left.
    c.union.unlink(ROOT_ID, name("a")).unwrap();
    assert_eq!(fs::symlink_metadata(c.upper.join("a")).unwrap().rdev(), 0);
    assert_eq!(c.nlink(&b), 2);
    assert_eq!(c.nlink(&cn), 2);
    // Renaming one name over another of the same inode does nothing.
    c.union
        .rename(ROOT_ID, name("c"), c.lookup("d").id, name("b"), 0)
        .unwrap();
    assert_eq!(
        c.read(&c.lookup("c"), NOFOLLOW).unwrap(),
        "new
"
    );
    // A link through the union counts too.
    let (l, _) = c.union.link(b.id, ROOT_ID, name("l")).unwrap();
    assert_eq!(c.nlink(&l), 3);
    assert_eq!(c.st_ino("l"), ino);
    // The last names go: so does the entry.
    for (dir, n) in [(c.lookup("d").id, "b"), (ROOT_ID, "c"), (ROOT_ID, "l")] {
        c.union.unlink(dir, name(n)).unwrap();
    }
    assert_eq!(c.index_entries(), 0, "the entry outlived its names");
}

#[test]
fn with_the_index_a_rename_between_names_moves_the_node_to_the_new_name() {
    let Some(c) = Core::with_index(linked_triple) else {
        return;
    };
    let (a, cn) = (c.lookup("a"), c.lookup("c"));
    // Nothing changes on disk, but the kernel now holds `a`'s node under
    // the name `c`: a write through it is a write through `c`.
    c.union
        .rename(ROOT_ID, name("a"), ROOT_ID, name("c"), 0)
        .unwrap();
    assert_eq!(c.index_entries(), 0);
    assert_eq!(c.lookup("c").id, a.id, "the name `c` is the moved node");
    assert_ne!(c.lookup("a").id, a.id, "`a` gets a node again");
    c.write(&a, "new\n");
    assert!(
        c.upper_has("c") && !c.upper_has("a"),
        "the written name is linked up"
    );
    assert_eq!(
        c.read(&cn, NOFOLLOW).unwrap(),
        "new\n",
        "the old node of `c`"
    );
    // An exchange swaps them: `a`'s node stands for `d/b`, which it links up.
    let b = c.lookup("d/b");
    c.union
        .rename(
            ROOT_ID,
            name("c"),
            c.lookup("d").id,
            name("b"),
            libc::RENAME_EXCHANGE,
        )
        .unwrap();
    assert_eq!(c.lookup("d/b").id, a.id);
    assert_eq!(c.lookup("c").id, b.id);
    c.union
        .setattr(
            a.id,
            unionfs::overlay::inode::AttrChange {
                mode: Some(0o600),
                ..Default::default()
            },
            caller(),
        )
        .unwrap();
    assert!(c.upper_has("d/b"));
    assert_eq!(c.nlink(&a), 3);
}

fn no_groups() -> Vec<u32> {
    Vec::new()
}

/// The test process as the caller.
fn caller() -> unionfs::overlay::superblock::Caller<'static> {
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    unionfs::overlay::superblock::Caller {
        uid,
        gid,
        umask: 0o022,
        privileged: uid == 0,
        groups: &no_groups,
        acl_kills_sgid: None,
    }
}

/// A union over `lower`, `upper` and `work` with `tuning`.
fn union_over(lower: &Path, upper: &Path, work: &Path, tuning: Tuning) -> Union {
    Union::new(
        Some((open_dir(upper), open_dir(work))),
        vec![open_dir(lower)],
        tuning,
    )
}

/// The value of xattr `n` of `p` (not followed), if set.
fn xattr(p: &Path, n: &str) -> Option<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    let n = std::ffi::CString::new(n).unwrap();
    let mut buf = vec![0u8; 4096];
    let len = unsafe { libc::lgetxattr(path.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), 4096) };
    (len >= 0).then(|| buf[..len as usize].to_vec())
}

/// redirect_dir and metacopy in-process: a lower directory renamed within
/// its parent and then into another directory records where its lower
/// directory is, and a new union over the same directories (a remount)
/// finds its contents there; a chown copies up metadata only, reads go on
/// to the lower data, and the first open for writing brings the data up.
#[test]
fn moved_directories_and_metadata_only_copies() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("redirects and metadata-only marks are trusted xattrs: root only");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let [lower, upper, work] = ["lower", "upper", "work"].map(|n| dir.path().join(n));
    for d in [&lower, &upper, &work] {
        fs::create_dir(d).unwrap();
    }
    fs::create_dir_all(lower.join("a/sub")).unwrap();
    fs::write(lower.join("a/sub/f"), "f\n").unwrap();
    fs::write(lower.join("data"), "lower data\n").unwrap();
    let tuning = Tuning {
        metacopy: true,
        ..Tuning::new(true)
    };
    let c = Core {
        union: union_over(&lower, &upper, &work, tuning),
        upper: upper.clone(),
        index: dir.path().join("no-index"),
        _dir: dir,
    };
    c.union
        .rename(ROOT_ID, name("a"), ROOT_ID, name("b"), 0)
        .unwrap();
    assert_eq!(
        xattr(&upper.join("b"), "trusted.overlay.redirect").as_deref(),
        Some(&b"a"[..])
    );
    let new = c
        .union
        .mkdir(ROOT_ID, name("new"), 0o755, caller())
        .unwrap()
        .0;
    c.union
        .rename(ROOT_ID, name("b"), new.id, name("c"), 0)
        .unwrap();
    assert_eq!(
        xattr(&upper.join("new/c"), "trusted.overlay.redirect").as_deref(),
        Some(&b"/a"[..]),
        "moved elsewhere: the absolute path, from the relative redirect"
    );
    assert_eq!(
        c.read(&c.lookup("new/c/sub/f"), libc::O_RDONLY).unwrap(),
        "f\n"
    );
    // chown: metadata only.
    let data = c.lookup("data");
    let chown = unionfs::overlay::inode::AttrChange {
        uid: Some(1234),
        ..Default::default()
    };
    c.union.setattr(data.id, chown, caller()).unwrap();
    let up = upper.join("data");
    assert!(xattr(&up, "trusted.overlay.metacopy").is_some());
    assert_eq!(fs::metadata(&up).unwrap().uid(), 1234);
    assert_eq!(fs::metadata(&up).unwrap().len(), 11);
    assert_eq!(c.read(&data, libc::O_RDONLY).unwrap(), "lower data\n");
    let o = c.union.open(data.id, libc::O_WRONLY).unwrap();
    c.union.release(o.fh);
    assert!(
        xattr(&up, "trusted.overlay.metacopy").is_none(),
        "data copied up"
    );
    assert_eq!(fs::read_to_string(&up).unwrap(), "lower data\n");
    // A remount: the same directories under a new union.
    let again = Core {
        union: union_over(&lower, &upper, &work, tuning),
        upper: upper.clone(),
        index: c.index.clone(),
        _dir: tempfile::tempdir().unwrap(),
    };
    assert_eq!(
        again
            .read(&again.lookup("new/c/sub/f"), libc::O_RDONLY)
            .unwrap(),
        "f\n"
    );
    assert_eq!(
        again.read(&again.lookup("data"), libc::O_RDONLY).unwrap(),
        "lower data\n"
    );
    assert!(
        again.union.lookup(ROOT_ID, name("a")).is_err(),
        "a whiteout where `a` was"
    );
}

/// A directory merged from two lowers (no upper) shows one link, as the
/// kernel shows any merged directory; one only in a lower keeps its own.
#[test]
fn a_directory_merged_from_lowers_shows_one_link() {
    let dir = tempfile::tempdir().unwrap();
    let (top, bottom) = (dir.path().join("top"), dir.path().join("bottom"));
    for d in ["top/both/sub", "bottom/both/other", "top/alone/sub"] {
        fs::create_dir_all(dir.path().join(d)).unwrap();
    }
    let union = Union::new(
        None,
        vec![open_dir(&top), open_dir(&bottom)],
        Tuning::new(true),
    );
    let nlink = |path: &str| {
        let mut id = ROOT_ID;
        for part in path.split('/') {
            id = union.lookup(id, name(part)).unwrap().0.id;
        }
        union.getattr(id, None).unwrap().st_nlink
    };
    assert_eq!(nlink("both"), 1);
    assert_eq!(nlink("alone"), 3);
}
