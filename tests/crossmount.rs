//! The on-disk format both ways: an upper directory written by unionfs shows
//! the same view under the kernel's overlayfs, and the other way round.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::*;

/// Changes of every kind the format has to carry.
fn make_changes(root: &Path) {
    fs::write(root.join("bottom-only"), "rewritten").unwrap();
    fs::remove_file(root.join("shadowed")).unwrap();
    fs::remove_dir_all(root.join("merged")).unwrap();
    fs::create_dir(root.join("merged")).unwrap();
    fs::write(root.join("merged/new"), "fresh").unwrap();
    fs::remove_file(root.join("opaque/visible")).unwrap();
    fs::write(root.join("dir/sub/added"), "a").unwrap();
    fs::rename(root.join("top-only"), root.join("dir/moved")).unwrap();
    std::os::unix::fs::symlink("dir/moved", root.join("newlink")).unwrap();
    fs::set_permissions(root.join("fifo"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::hard_link(root.join("big"), root.join("big2")).unwrap();
    set_xattr(&root.join("dir"), "user.note", b"x");
    fs::create_dir(root.join("file-over-dir2")).unwrap();
    fs::remove_file(root.join("file-over-dir")).unwrap();
}

#[test]
fn unionfs_upper_mounts_under_the_kernel() {
    let s = Scratch::new("cross1");
    let lowers = standard_lowers(&s);
    let (upper, mnt) = (s.dir("upper"), s.dir("mnt"));
    let ours = Mount::unionfs(&lowers, &upper, &mnt, &[]);
    make_changes(&mnt);
    let view = snapshot(&mnt, View::Merged);
    let numbers_before = inode_numbers(&mnt);
    drop(ours);
    let (kwork, kmnt) = (s.dir("kwork"), s.dir("kmnt"));
    let k = Mount::kernel(&lowers, &upper, &kwork, &kmnt);
    let kview = snapshot(&kmnt, View::Merged);
    let d = diff("unionfs", &view, "kernel", &kview);
    assert!(d.is_empty(), "the kernel sees a different union:\n{d}");
    assert_eq!(inode_numbers(&kmnt), numbers_before, "inode numbers");
    drop(k);
}

/// The inode number of every object, as the layers number it: unionfs puts
/// a filesystem slot in the top 16 bits, which are dropped. Hard links of
/// the upper are left out (the kernel shows their own upper numbers too).
fn inode_numbers(root: &Path) -> BTreeMap<String, u64> {
    walkdir_all(root)
        .into_iter()
        .filter_map(|p| {
            let m = fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            (m.is_dir() || m.nlink() == 1).then_some((rel, m.ino() & ((1 << 48) - 1)))
        })
        .collect()
}

#[test]
fn kernel_upper_mounts_under_unionfs() {
    let s = Scratch::new("cross2");
    let lowers = standard_lowers(&s);
    let (upper, kwork, kmnt) = (s.dir("upper"), s.dir("kwork"), s.dir("kmnt"));
    let k = Mount::kernel(&lowers, &upper, &kwork, &kmnt);
    make_changes(&kmnt);
    let kview = snapshot(&kmnt, View::Merged);
    let knumbers = inode_numbers(&kmnt);
    drop(k);
    let mnt = s.dir("mnt");
    let ours = Mount::unionfs(&lowers, &upper, &mnt, &[]);
    let view = snapshot(&mnt, View::Merged);
    let d = diff("kernel", &kview, "unionfs", &view);
    assert!(d.is_empty(), "unionfs sees a different union:\n{d}");
    assert_eq!(inode_numbers(&mnt), knumbers, "inode numbers");
    drop(ours);
}

/// Lower layers with a file of three names across two directories.
fn linked_lowers(s: &Scratch) -> Vec<PathBuf> {
    let lowers = standard_lowers(s);
    let bottom = &lowers[1];
    write(&bottom.join("hl-a"), "one inode\n");
    fs::hard_link(bottom.join("hl-a"), bottom.join("merged/hl-b")).unwrap();
    fs::hard_link(bottom.join("hl-a"), bottom.join("dir/hl-c")).unwrap();
    lowers
}

/// Content, inode number (without unionfs's slot bits) and link count of
/// each name of the linked file, and of a link made to it.
fn linked_names(root: &Path) -> Vec<(String, String, u64, u64)> {
    ["hl-a", "merged/hl-b", "dir/hl-c", "new-link"]
        .iter()
        .filter_map(|n| {
            let m = fs::symlink_metadata(root.join(n)).ok()?;
            let data = fs::read_to_string(root.join(n)).unwrap();
            Some((n.to_string(), data, m.ino() & ((1 << 48) - 1), m.nlink()))
        })
        .collect()
}

/// With the index, the upper and work directory one side wrote show the
/// same union under the other, links and all, across several rounds.
#[test]
fn the_index_is_shared_with_the_kernel_both_ways() {
    if index_unavailable("the_index_is_shared_with_the_kernel_both_ways") {
        return;
    }
    let s = Scratch::new("crossindex");
    let lowers = linked_lowers(&s);
    let (upper, work, mnt) = (s.dir("upper"), s.dir("work"), s.dir("mnt"));
    let work_opt = format!("workdir={}", work.display());
    let ours = Mount::unionfs(&lowers, &upper, &mnt, &[&work_opt]);
    fs::OpenOptions::new()
        .append(true)
        .open(mnt.join("hl-a"))
        .unwrap()
        .write_all(b"written by unionfs\n")
        .unwrap();
    fs::remove_file(mnt.join("dir/hl-c")).unwrap();
    let names = linked_names(&mnt);
    let view = snapshot(&mnt, View::Merged);
    assert_eq!(names[0].3, 2, "{names:?}");
    drop(ours);
    let k = Mount::kernel(&lowers, &upper, &work, &mnt);
    assert_eq!(
        linked_names(&mnt),
        names,
        "the kernel's view of unionfs's index"
    );
    let d = diff("unionfs", &view, "kernel", &snapshot(&mnt, View::Merged));
    assert!(d.is_empty(), "the kernel sees a different union:\n{d}");
    fs::hard_link(mnt.join("merged/hl-b"), mnt.join("new-link")).unwrap();
    fs::remove_file(mnt.join("hl-a")).unwrap();
    fs::write(mnt.join("merged/hl-b"), "written by the kernel\n").unwrap();
    let names = linked_names(&mnt);
    let view = snapshot(&mnt, View::Merged);
    drop(k);
    let ours = Mount::unionfs(&lowers, &upper, &mnt, &[&work_opt]);
    assert_eq!(
        linked_names(&mnt),
        names,
        "unionfs's view of the kernel's index"
    );
    let d = diff("kernel", &view, "unionfs", &snapshot(&mnt, View::Merged));
    assert!(d.is_empty(), "unionfs sees a different union:\n{d}");
    // The last names go: the index entry goes with them.
    fs::remove_file(mnt.join("merged/hl-b")).unwrap();
    fs::remove_file(mnt.join("new-link")).unwrap();
    drop(ours);
    let entries = fs::read_dir(work.join("index"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('#'))
        .collect::<Vec<_>>();
    assert!(entries.is_empty(), "index entries left: {entries:?}");
}

/// The names of an xattr listing, sorted.
fn xattr_names(p: &Path) -> Vec<String> {
    let mut v: Vec<String> = lxattrs(p).into_iter().map(|(n, _)| n).collect();
    v.sort();
    v
}

/// Nested overlays (Linux 6.7+): `trusted.overlay.*` set through the union
/// is stored escaped as `trusted.overlay.overlay.*` and shown back
/// unescaped, exactly as through the kernel's overlayfs; an overlay stacked
/// on the union sees its own markers.
#[test]
fn overlay_xattrs_nest_as_in_the_kernel() {
    let s = Scratch::new("nested");
    let lowers = standard_lowers(&s);
    // A lower file that already carries an escaped name (as a nested
    // overlay's upper would).
    set_xattr(
        &lowers[1].join("bottom-only"),
        "trusted.overlay.overlay.mark",
        b"low",
    );
    let (kupper, kwork, kmnt) = (s.dir("kupper"), s.dir("kwork"), s.dir("kmnt"));
    let (uupper, umnt) = (s.dir("uupper"), s.dir("umnt"));
    let k = Mount::kernel(&lowers, &kupper, &kwork, &kmnt);
    let ours = Mount::unionfs(&lowers, &uupper, &umnt, &[]);
    for root in [&kmnt, &umnt] {
        fs::create_dir(root.join("nested")).unwrap();
        set_xattr(&root.join("nested"), "trusted.overlay.opaque", b"y");
        set_xattr(&root.join("bottom-only"), "user.note", b"copied up");
    }
    for (what, root, upper) in [("kernel", &kmnt, &kupper), ("unionfs", &umnt, &uupper)] {
        assert_eq!(
            lgetxattr(&root.join("nested"), "trusted.overlay.opaque").as_deref(),
            Some(&b"y"[..]),
            "{what}: read back through the mount"
        );
        assert_eq!(
            lgetxattr(&upper.join("nested"), "trusted.overlay.overlay.opaque").as_deref(),
            Some(&b"y"[..]),
            "{what}: stored escaped"
        );
        assert_eq!(
            lgetxattr(&upper.join("bottom-only"), "trusted.overlay.overlay.mark").as_deref(),
            Some(&b"low"[..]),
            "{what}: an escaped name is copied up"
        );
        assert!(
            xattr_names(&root.join("bottom-only")).contains(&"trusted.overlay.mark".to_string()),
            "{what}: shown unescaped"
        );
    }
    assert_eq!(
        xattr_names(&umnt.join("nested")),
        xattr_names(&kmnt.join("nested"))
    );
    assert_eq!(
        xattr_names(&umnt.join("bottom-only")),
        xattr_names(&kmnt.join("bottom-only"))
    );
    // A kernel overlay over the union: the directory marked opaque through
    // the union hides what a layer below it has.
    let below = s.dir("below");
    write(
        &below.join("nested/hidden"),
        "hidden by the opaque marker\n",
    );
    let nested = s.dir("nestedmnt");
    let st = std::process::Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o"])
        .arg(format!("lowerdir={}:{}", umnt.display(), below.display()))
        .arg(&nested)
        .status()
        .unwrap();
    assert!(st.success(), "a kernel overlay over the union");
    let hidden = nested.join("nested/hidden").exists();
    umount_lazy(&nested);
    assert!(
        !hidden,
        "the opaque marker set through the union was not honoured"
    );
    // The union's own markers (impure on the root: bottom-only was copied
    // up) stay hidden.
    let root_names = xattr_names(&umnt);
    assert!(
        root_names
            .iter()
            .all(|n| !n.starts_with("trusted.overlay.")),
        "{root_names:?}"
    );
    assert!(lgetxattr(&uupper, "trusted.overlay.impure").is_some());
    // The other namespace's overlay names (a rootless overlay, with
    // `userxattr`, stacked on the union) are ordinary names here, as in the
    // kernel: stored as they are, and no marker for the union itself.
    for (what, root, upper) in [("kernel", &kmnt, &kupper), ("unionfs", &umnt, &uupper)] {
        set_xattr(&root.join("merged"), "user.overlay.opaque", b"y");
        set_xattr(&root.join("merged"), "user.overlay.redirect", b"/dir");
        assert_eq!(
            lgetxattr(&upper.join("merged"), "user.overlay.opaque").as_deref(),
            Some(&b"y"[..]),
            "{what}: stored as it is"
        );
        assert!(
            root.join("merged/from-bottom").exists(),
            "{what}: not opaque"
        );
        assert!(
            !root.join("merged/sub").exists(),
            "{what}: no redirect followed"
        );
    }
    assert_eq!(
        xattr_names(&umnt.join("merged")),
        xattr_names(&kmnt.join("merged"))
    );
    drop(ours);
    drop(k);
}

/// A layer the kernel wrote with `redirect_dir=on,metacopy=on` (moved
/// directories, metadata-only copies) reads the same as a lower layer under
/// unionfs — whatever unionfs's own `metacopy` — as under the kernel.
#[test]
fn kernel_written_redirects_and_metadata_copies_read_the_same_below() {
    let s = Scratch::new("crosslayer");
    let lowers = standard_lowers(&s);
    let (kupper, kwork, kmnt) = (s.dir("kupper"), s.dir("kwork"), s.dir("kmnt"));
    let all = Features {
        index: false,
        ..Features::all()
    };
    let k = Mount::kernel_with(&lowers, &kupper, &kwork, &kmnt, all);
    std::os::unix::fs::chown(kmnt.join("bottom-only"), Some(1000), Some(1000)).unwrap();
    fs::set_permissions(kmnt.join("big"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::rename(kmnt.join("merged"), kmnt.join("m2")).unwrap();
    fs::create_dir(kmnt.join("new")).unwrap();
    fs::rename(kmnt.join("dir/sub"), kmnt.join("new/sub2")).unwrap();
    fs::rename(kmnt.join("big"), kmnt.join("new/big2")).unwrap();
    fs::write(kmnt.join("m2/deep/added"), "added\n").unwrap();
    drop(k);
    assert!(lgetxattr(&kupper.join("new/big2"), "trusted.overlay.metacopy").is_some());
    assert!(lgetxattr(&kupper.join("new/sub2"), "trusted.overlay.redirect").is_some());
    // The kernel's upper as the top lower layer of both.
    let stack: Vec<PathBuf> = std::iter::once(kupper.clone()).chain(lowers).collect();
    let kview = s.dir("kview");
    let st = std::process::Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o"])
        .arg(format!("lowerdir={},metacopy=on", lower_arg(&stack)))
        .arg(&kview)
        .status()
        .unwrap();
    assert!(st.success(), "a kernel overlay of the layers");
    let expected = snapshot(&kview, View::Merged);
    umount_lazy(&kview);
    assert!(expected.contains_key("new/sub2/leaf"), "{expected:?}");
    for opts in ["metacopy=off", "metacopy=on"] {
        let (upper, mnt) = (s.dir(&format!("u-{opts}")), s.dir(&format!("m-{opts}")));
        let ours = Mount::unionfs(&stack, &upper, &mnt, &[opts]);
        let d = diff(
            "kernel",
            &expected,
            "unionfs",
            &snapshot(&mnt, View::Merged),
        );
        assert!(
            d.is_empty(),
            "{opts}: unionfs reads the layers differently:\n{d}"
        );
        // Written through: the data comes up from the bottom layer.
        fs::OpenOptions::new()
            .append(true)
            .open(mnt.join("new/big2"))
            .unwrap()
            .write_all(b"!")
            .unwrap();
        let data = fs::read(mnt.join("new/big2")).unwrap();
        assert!(
            data.starts_with(b"0123456789abcdef") && data.ends_with(b"!"),
            "{opts}"
        );
        drop(ours);
    }
}
