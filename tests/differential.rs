//! The kernel's overlayfs as the oracle: the same operations on
//! `mount -t overlay` and on unionfs, over the same lower layers, must give the
//! same result (value or errno) one by one, the same merged view and the same
//! upper directory.

mod common;

use std::ffi::CString;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

#[derive(Clone, Debug)]
enum Op {
    Write(String, String),
    Append(String, String),
    Truncate(String, u64),
    Mkdir(String, u32),
    Rmdir(String),
    Unlink(String),
    Rename(String, String, u32),
    Symlink(String, String),
    Link(String, String),
    Chmod(String, u32),
    Chown(String, u32, u32),
    SetXattr(String, String, String),
    RemoveXattr(String, String),
    Mkfifo(String),
    Read(String),
    List(String),
    Stat(String),
    RemoveAll(String),
    /// Reads with `O_NOFOLLOW`, as `dd iflag=nofollow` and GNU tar open.
    ReadNoFollow(String),
    /// Whether two names show one inode (`st_dev` and `st_ino`).
    SameInode(String, String),
    /// Both unions unmounted and mounted again over the same directories.
    Remount,
}

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn res<T>(r: std::io::Result<T>, ok: impl FnOnce(T) -> String) -> String {
    match r {
        Ok(v) => format!("ok {}", ok(v)),
        Err(e) => format!("err {}", e.raw_os_error().unwrap_or(-1)),
    }
}

fn sys(r: i32) -> String {
    if r == 0 {
        "ok ".into()
    } else {
        format!(
            "err {}",
            std::io::Error::last_os_error().raw_os_error().unwrap()
        )
    }
}

fn remove_all(p: &Path) -> std::io::Result<()> {
    let m = fs::symlink_metadata(p)?;
    if m.is_dir() {
        for e in fs::read_dir(p)? {
            remove_all(&e?.path())?;
        }
        fs::remove_dir(p)
    } else {
        fs::remove_file(p)
    }
}

/// Applies one operation under `root` and describes its outcome.
fn apply(root: &Path, op: &Op) -> String {
    let p = |s: &str| root.join(s);
    if let Op::Write(f, _) | Op::Append(f, _) | Op::Truncate(f, _) | Op::Read(f) = op {
        // Opening a fifo would wait for a partner.
        if fs::metadata(p(f)).is_ok_and(|m| m.file_type().is_fifo()) {
            return "fifo".into();
        }
    }
    match op {
        Op::Write(f, d) => res(fs::write(p(f), d), |_| String::new()),
        Op::Append(f, d) => res(
            OpenOptions::new()
                .append(true)
                .open(p(f))
                .and_then(|mut h| h.write_all(d.as_bytes())),
            |_| String::new(),
        ),
        Op::Truncate(f, n) => res(
            OpenOptions::new()
                .write(true)
                .open(p(f))
                .and_then(|h| h.set_len(*n)),
            |_| String::new(),
        ),
        Op::Mkdir(f, m) => res(
            fs::create_dir(p(f))
                .and_then(|_| fs::set_permissions(p(f), fs::Permissions::from_mode(*m))),
            |_| String::new(),
        ),
        Op::Rmdir(f) => res(fs::remove_dir(p(f)), |_| String::new()),
        Op::Unlink(f) => res(fs::remove_file(p(f)), |_| String::new()),
        Op::Rename(a, b, flags) => {
            let (ca, cb) = (c(&p(a)), c(&p(b)));
            sys(unsafe {
                libc::renameat2(
                    libc::AT_FDCWD,
                    ca.as_ptr(),
                    libc::AT_FDCWD,
                    cb.as_ptr(),
                    *flags,
                )
            })
        }
        Op::Symlink(t, f) => res(std::os::unix::fs::symlink(t, p(f)), |_| String::new()),
        Op::Link(a, b) => res(fs::hard_link(p(a), p(b)), |_| String::new()),
        Op::Chmod(f, m) => {
            let cf = c(&p(f));
            sys(unsafe { libc::fchmodat(libc::AT_FDCWD, cf.as_ptr(), *m, 0) })
        }
        Op::Chown(f, u, g) => {
            let cf = c(&p(f));
            sys(unsafe { libc::lchown(cf.as_ptr(), *u, *g) })
        }
        Op::SetXattr(f, n, v) => {
            let (cf, cn) = (c(&p(f)), CString::new(n.as_str()).unwrap());
            sys(unsafe { libc::lsetxattr(cf.as_ptr(), cn.as_ptr(), v.as_ptr().cast(), v.len(), 0) })
        }
        Op::RemoveXattr(f, n) => {
            let (cf, cn) = (c(&p(f)), CString::new(n.as_str()).unwrap());
            sys(unsafe { libc::lremovexattr(cf.as_ptr(), cn.as_ptr()) })
        }
        Op::Mkfifo(f) => {
            let cf = c(&p(f));
            sys(unsafe { libc::mkfifo(cf.as_ptr(), 0o640) })
        }
        Op::Read(f) => res(fs::read(p(f)), |d| format!("{:x}", fnv(&d))),
        Op::List(f) => res(
            fs::read_dir(p(f)).and_then(|it| {
                it.map(|e| e.map(|e| e.file_name()))
                    .collect::<Result<Vec<_>, _>>()
            }),
            |mut v| {
                v.sort();
                format!("{v:?}")
            },
        ),
        Op::Stat(f) => res(fs::symlink_metadata(p(f)), |m| {
            let nlink = if m.is_dir() { 0 } else { m.nlink() };
            let size = if m.is_dir() { 0 } else { m.len() };
            format!("{:o} {} {} {} {}", m.mode(), m.uid(), m.gid(), size, nlink)
        }),
        Op::RemoveAll(f) => res(remove_all(&p(f)), |_| String::new()),
        Op::ReadNoFollow(f) => {
            use std::os::unix::fs::OpenOptionsExt;
            let read = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                .open(p(f))
                .and_then(|mut h| {
                    let mut d = Vec::new();
                    std::io::Read::read_to_end(&mut h, &mut d).map(|_| d)
                });
            res(read, |d| format!("{:x}", fnv(&d)))
        }
        Op::SameInode(a, b) => {
            let (ma, mb) = (fs::symlink_metadata(p(a)), fs::symlink_metadata(p(b)));
            res(ma.and_then(|ma| mb.map(|mb| (ma, mb))), |(ma, mb)| {
                let same = (ma.dev(), ma.ino()) == (mb.dev(), mb.ino());
                (if same { "same" } else { "different" }).to_string()
            })
        }
        Op::Remount => unreachable!("done by Pair::run"),
    }
}

/// Lower layers with hard-linked files: a triple across three directories
/// of the bottom layer, a pair across two of the top one.
fn linked_lowers(s: &Scratch) -> Vec<PathBuf> {
    let lowers = standard_lowers(s);
    let (top, bottom) = (&lowers[0], &lowers[1]);
    write(&bottom.join("hl1"), "one inode, three names\n");
    fs::hard_link(bottom.join("hl1"), bottom.join("merged/hl2")).unwrap();
    fs::hard_link(bottom.join("hl1"), bottom.join("dir/sub/hl3")).unwrap();
    write(&top.join("tl1"), "one inode, two names\n");
    fs::hard_link(top.join("tl1"), top.join("merged/tl2")).unwrap();
    for p in ["hl1", "merged/hl2", "dir/sub/hl3", "merged", "dir/sub"] {
        set_mtime(&bottom.join(p), 1_000_000_000);
    }
    for p in ["tl1", "merged/tl2", "merged"] {
        set_mtime(&top.join(p), 1_000_000_000);
    }
    lowers
}

/// The names of lower hard-linked files, which random paths favour.
const LINKED: &[&str] = &["hl1", "merged/hl2", "dir/sub/hl3", "tl1", "merged/tl2"];

/// How the non-directories of a tree share inodes: each group of names of
/// one inode (with each name's link count), sorted; whiteouts left out (the
/// kernel links all of its whiteouts to one inode). With `d_ino`, also
/// checks that every directory entry's `d_ino` is its `st_ino`: not asked
/// of the kernel's merged view, whose listing was seen (Linux 6.18, with and
/// without the index, random seed 203) to give a name linked into an upper
/// directory its upper number while `stat` gives its origin's.
fn link_structure(label: &str, root: &Path, d_ino: bool) -> Vec<Vec<(String, u64)>> {
    let mut by_ino: std::collections::BTreeMap<(u64, u64), Vec<(String, u64)>> = Default::default();
    fn rec(
        (label, d_ino): (&str, bool),
        root: &Path,
        dir: &Path,
        out: &mut std::collections::BTreeMap<(u64, u64), Vec<(String, u64)>>,
    ) {
        for e in fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let m = fs::symlink_metadata(e.path()).unwrap();
            let rel = e.path().strip_prefix(root).unwrap().display().to_string();
            if d_ino {
                assert_eq!(
                    std::os::unix::fs::DirEntryExt::ino(&e),
                    m.ino(),
                    "{label}: d_ino of {rel} is not its st_ino in {}",
                    root.display()
                );
            }
            if m.is_dir() {
                rec((label, d_ino), root, &e.path(), out);
            } else if !(m.file_type().is_char_device() && m.rdev() == 0) {
                out.entry((m.dev(), m.ino()))
                    .or_default()
                    .push((rel, m.nlink()));
            }
        }
    }
    rec((label, d_ino), root, root, &mut by_ino);
    let mut groups: Vec<Vec<(String, u64)>> = by_ino
        .into_values()
        .map(|mut g| {
            g.sort();
            g
        })
        .collect();
    groups.sort();
    groups
}

/// `tar -c` of a tree, listed: names, types, modes, owners, sizes, and
/// the names archived as one file (tar stores the first name it meets as
/// the file and the others as links to it, so the order of the walk decides
/// which: a group is shown with the first's mode, owner and size, its
/// names sorted). Dates are left out.
fn tar_listing(root: &Path) -> String {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg("tar --numeric-owner -cf - . | tar -tvf -")
        .current_dir(root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tar: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // mode owner size date time name [link to target]
    let rows: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    let mut group_of: std::collections::HashMap<String, String> = Default::default();
    for f in &rows {
        if f.len() == 9 && f[6..8] == ["link", "to"] {
            group_of.insert(f[5].to_string(), f[8].to_string());
        }
    }
    let mut groups: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    let mut lines = Vec::new();
    for f in &rows {
        let name = f[5].to_string();
        let first = group_of.get(&name).cloned().unwrap_or(name.clone());
        let linked = group_of.contains_key(&name) || group_of.values().any(|t| *t == name);
        if linked {
            groups.entry(first).or_default().push(name);
            continue;
        }
        let size = if f[0].starts_with('d') { "" } else { f[2] };
        lines.push(format!("{} {} {size} {}", f[0], f[1], f[5..].join(" ")));
    }
    for (first, mut names) in groups {
        let f = rows.iter().find(|f| f[5] == first).unwrap();
        names.sort();
        lines.push(format!(
            "{} {} {} {}",
            &f[0][1..],
            f[1],
            f[2],
            names.join(" = ")
        ));
    }
    lines.sort();
    lines.join("\n")
}

/// A pair of unions over the same lowers: the kernel's and ours, both with
/// the same features.
struct Pair {
    kernel: Mount,
    ours: Mount,
    features: Features,
    lowers: Vec<PathBuf>,
    kupper: PathBuf,
    kwork: PathBuf,
    uupper: PathBuf,
    uwork: PathBuf,
    _scratch: Scratch,
}

impl Pair {
    fn new(tag: &str, features: Features) -> Pair {
        let s = Scratch::new(tag);
        let lowers = linked_lowers(&s);
        let (kupper, kwork, kmnt) = (s.dir("kupper"), s.dir("kwork"), s.dir("kmnt"));
        let (uupper, uwork, umnt) = (s.dir("uupper"), s.dir("uwork"), s.dir("umnt"));
        let kernel = Mount::kernel_with(&lowers, &kupper, &kwork, &kmnt, features);
        let ours = mount_ours(&lowers, &uupper, &uwork, &umnt, features);
        Pair {
            kernel,
            ours,
            features,
            lowers,
            kupper,
            kwork,
            uupper,
            uwork,
            _scratch: s,
        }
    }

    /// Unmounts both unions and mounts them again over the same layers.
    fn remount(&mut self) {
        self.mount_uppers(false);
    }

    /// Each side mounts the other's upper and work directories and must
    /// show what the other showed; then each gets its own back.
    fn exchange_uppers(&mut self, label: &str) {
        let kernel_view = snapshot(&self.kernel.mnt, View::Merged);
        let our_view = snapshot(&self.ours.mnt, View::Merged);
        self.mount_uppers(true);
        let d = diff(
            "kernel",
            &kernel_view,
            "unionfs over the kernel's upper",
            &snapshot(&self.ours.mnt, View::Merged),
        );
        assert!(
            d.is_empty(),
            "{label}: unionfs reads the kernel's upper differently:\n{d}"
        );
        let d = diff(
            "unionfs",
            &our_view,
            "the kernel over unionfs's upper",
            &snapshot(&self.kernel.mnt, View::Merged),
        );
        assert!(
            d.is_empty(),
            "{label}: the kernel reads unionfs's upper differently:\n{d}"
        );
        self.mount_uppers(false);
    }

    /// Unmounts both unions and mounts them again, each over its own upper
    /// directory, or (`swapped`) over the other's.
    fn mount_uppers(&mut self, swapped: bool) {
        let (kmnt, umnt) = self.unmount_both();
        let mut k = (&self.kupper, &self.kwork);
        let mut u = (&self.uupper, &self.uwork);
        if swapped {
            std::mem::swap(&mut k, &mut u);
        }
        self.kernel = Mount::kernel_with(&self.lowers, k.0, k.1, &kmnt, self.features);
        self.ours = mount_ours(&self.lowers, u.0, u.1, &umnt, self.features);
    }

    /// Unmounts both unions; gives their mount points.
    fn unmount_both(&mut self) -> (PathBuf, PathBuf) {
        let placeholder = |kind| Mount {
            kind,
            mnt: PathBuf::from("/nonexistent/unionfs-test-placeholder"),
            child: None,
            log: None,
        };
        let kernel = std::mem::replace(&mut self.kernel, placeholder(Kind::Kernel));
        let ours = std::mem::replace(&mut self.ours, placeholder(Kind::Unionfs));
        let (kmnt, umnt) = (kernel.mnt.clone(), ours.mnt.clone());
        kernel.unmount();
        let status = ours.unmount();
        assert!(status.is_some_and(|s| s.success()), "unionfs: {status:?}");
        (kmnt, umnt)
    }

    /// Each upper directory as the top layer of a read-only union of the
    /// same lowers (as an engine stacks a committed layer): the kernel and
    /// unionfs must show the same over either, the other's as well as
    /// their own. Then both unions are mounted again as they were.
    fn compare_as_read_only_layers(&mut self, label: &str) {
        let (kmnt, umnt) = self.unmount_both();
        // Without an upper, `follow` is what the kernel accepts with metacopy.
        let redirect = if self.features.redirect_dir {
            "follow"
        } else {
            "nofollow"
        };
        let metacopy = if self.features.metacopy { "on" } else { "off" };
        for (whose, top) in [("the kernel's", &self.kupper), ("unionfs's", &self.uupper)] {
            let mut layers = vec![top.clone()];
            layers.extend(self.lowers.iter().cloned());
            let opts = format!(
                "lowerdir={},redirect_dir={redirect},metacopy={metacopy}",
                lower_arg(&layers)
            );
            let st = Command::new("mount")
                .args(["-t", "overlay", "overlay", "-o", &opts])
                .arg(&kmnt)
                .status()
                .unwrap();
            assert!(st.success(), "kernel overlay: {opts}");
            let _kernel = Mount {
                kind: Kind::Kernel,
                mnt: kmnt.clone(),
                child: None,
                log: None,
            };
            let out = run_to_end({
                let mut c = Command::new(bin());
                c.args(["-o", &opts]).arg(&umnt);
                c
            });
            assert!(
                out.status.success(),
                "unionfs {opts}: {}",
                text(&out.stderr)
            );
            // Torn down by umount alone, as a kernel mount: the daemon of
            // the fuse-overlayfs form ends by itself.
            let _ours = Mount {
                kind: Kind::Kernel,
                mnt: umnt.clone(),
                child: None,
                log: None,
            };
            let what = format!("{label}: {whose} upper as a read-only layer");
            let d = diff(
                "kernel",
                &snapshot(&kmnt, View::Merged),
                "unionfs",
                &snapshot(&umnt, View::Merged),
            );
            assert!(
                d.is_empty(),
                "{what}: views differ (unionfs mounted: {}):\n{d}",
                is_mounted(&umnt)
            );
            assert_eq!(
                link_structure(&what, &umnt, true),
                link_structure(&what, &kmnt, false),
                "{what}: the hard links differ (unionfs, kernel)"
            );
        }
        self.kernel = Mount::kernel_with(
            &self.lowers,
            &self.kupper,
            &self.kwork,
            &kmnt,
            self.features,
        );
        self.ours = mount_ours(
            &self.lowers,
            &self.uupper,
            &self.uwork,
            &umnt,
            self.features,
        );
    }

    /// Runs `ops` on both; panics on the first different outcome.
    fn run(&mut self, label: &str, ops: &[Op]) {
        for (i, op) in ops.iter().enumerate() {
            if let Op::Remount = op {
                self.remount();
                continue;
            }
            let k = apply(&self.kernel.mnt, op);
            let u = apply(&self.ours.mnt, op);
            if std::env::var_os("UNIONFS_DIFF_TRACE").is_some() {
                eprintln!("{label} #{i}: {op:?} -> {u}");
            }
            assert_eq!(
                u, k,
                "{label}: operation {i} {op:?} differs (unionfs vs kernel)"
            );
        }
    }

    fn compare_views(&self, label: &str) {
        let k = snapshot(&self.kernel.mnt, View::Merged);
        let u = snapshot(&self.ours.mnt, View::Merged);
        let d = diff("kernel", &k, "unionfs", &u);
        assert!(d.is_empty(), "{label}: merged views differ:\n{d}");
        let k = snapshot(&self.kupper, View::Upper);
        let u = snapshot(&self.uupper, View::Upper);
        let d = diff("kernel", &k, "unionfs", &u);
        assert!(d.is_empty(), "{label}: upper directories differ:\n{d}");
        for (what, k, u, kernel_d_ino) in [
            ("merged views", &self.kernel.mnt, &self.ours.mnt, false),
            ("upper directories", &self.kupper, &self.uupper, true),
        ] {
            assert_eq!(
                link_structure(label, u, true),
                link_structure(label, k, kernel_d_ino),
                "{label}: the hard links of the {what} differ (unionfs, kernel)"
            );
        }
    }

    /// `tar -c` and `cp -a` of both merged views give the same trees.
    fn compare_copies(&self, label: &str) {
        assert_eq!(
            tar_listing(&self.ours.mnt),
            tar_listing(&self.kernel.mnt),
            "{label}: tar listings differ (unionfs, kernel)"
        );
        let copies = Scratch::new("diff-cp");
        let (kc, uc) = (copies.path.join("k"), copies.path.join("u"));
        for (from, to) in [(&self.kernel.mnt, &kc), (&self.ours.mnt, &uc)] {
            let st = std::process::Command::new("cp")
                .arg("-a")
                .arg(from)
                .arg(to)
                .status()
                .unwrap();
            assert!(st.success(), "{label}: cp -a {}", from.display());
        }
        let d = diff(
            "kernel",
            &snapshot(&kc, View::Merged),
            "unionfs",
            &snapshot(&uc, View::Merged),
        );
        assert!(d.is_empty(), "{label}: cp -a copies differ:\n{d}");
        assert_eq!(
            link_structure(label, &uc, true),
            link_structure(label, &kc, true),
            "{label}: hard links of the cp -a copies differ"
        );
    }
}

/// unionfs with `features` over `upper` and its work directory `work`.
fn mount_ours(lowers: &[PathBuf], upper: &Path, work: &Path, mnt: &Path, f: Features) -> Mount {
    let work = format!("workdir={}", work.display());
    Mount::unionfs(lowers, upper, mnt, &[&f.options(), &work])
}

fn s(x: &str) -> String {
    x.to_string()
}

/// Named scenarios: each a script of operations.
fn scenarios() -> Vec<(&'static str, Vec<Op>)> {
    use Op::*;
    vec![
        (
            "write lower file",
            vec![
                Write(s("bottom-only"), s("new")),
                Read(s("bottom-only")),
                Stat(s("bottom-only")),
            ],
        ),
        (
            "append deep lower file",
            vec![
                Append(s("dir/sub/leaf"), s("+")),
                Read(s("dir/sub/leaf")),
                List(s("dir")),
            ],
        ),
        (
            "truncate",
            vec![
                Truncate(s("big"), 100),
                Read(s("big")),
                Truncate(s("top-only"), 0),
            ],
        ),
        (
            "unlink lower",
            vec![Unlink(s("shadowed")), Stat(s("shadowed")), List(s(""))],
        ),
        (
            "unlink then recreate",
            vec![
                Unlink(s("shadowed")),
                Write(s("shadowed"), s("again")),
                Read(s("shadowed")),
            ],
        ),
        (
            "rmdir merged nonempty",
            vec![
                Rmdir(s("merged")),
                RemoveAll(s("merged")),
                Stat(s("merged")),
                Mkdir(s("merged"), 0o755),
                List(s("merged")),
            ],
        ),
        (
            "remove opaque dir",
            vec![
                RemoveAll(s("opaque")),
                Mkdir(s("opaque"), 0o700),
                List(s("opaque")),
            ],
        ),
        (
            "mkdir in lower dir",
            vec![
                Mkdir(s("dir/new"), 0o750),
                Write(s("dir/new/f"), s("f")),
                List(s("dir")),
            ],
        ),
        (
            "rename lower file",
            vec![
                Rename(s("bottom-only"), s("renamed"), 0),
                Read(s("renamed")),
                Stat(s("bottom-only")),
            ],
        ),
        (
            "rename over lower file",
            vec![
                Rename(s("top-only"), s("shadowed"), 0),
                Read(s("shadowed")),
                List(s("")),
            ],
        ),
        (
            "rename into merged dir",
            vec![
                Rename(s("top-only"), s("merged/moved"), 0),
                List(s("merged")),
            ],
        ),
        (
            "rename lower dir",
            vec![
                Rename(s("dir"), s("dir2"), 0),
                Rename(s("merged"), s("m2"), 0),
            ],
        ),
        (
            "rename upper dir",
            vec![
                Mkdir(s("u"), 0o755),
                Write(s("u/f"), s("1")),
                Rename(s("u"), s("v"), 0),
                List(s("v")),
            ],
        ),
        (
            "rename upper dir over empty merged",
            vec![
                RemoveAll(s("merged/deep")),
                Unlink(s("merged/from-top")),
                Unlink(s("merged/from-bottom")),
                Mkdir(s("u"), 0o755),
                Rename(s("u"), s("merged"), 0),
                List(s("merged")),
            ],
        ),
        (
            "rename noreplace/exchange",
            vec![
                Rename(s("top-only"), s("bottom-only"), libc::RENAME_NOREPLACE),
                Rename(s("top-only"), s("bottom-only"), libc::RENAME_EXCHANGE),
                Read(s("top-only")),
                Read(s("bottom-only")),
            ],
        ),
        (
            "rename whiteout flag",
            vec![Rename(s("top-only"), s("x"), libc::RENAME_WHITEOUT)],
        ),
        (
            "symlinks",
            vec![
                Symlink(s("bottom-only"), s("sl")),
                Read(s("sl")),
                Symlink(s("x"), s("top-only")),
                Unlink(s("link")),
                Symlink(s("y"), s("link")),
            ],
        ),
        (
            "hard links",
            vec![
                Link(s("bottom-only"), s("hl")),
                Stat(s("hl")),
                Stat(s("bottom-only")),
                Append(s("hl"), s("x")),
                Read(s("bottom-only")),
                Unlink(s("bottom-only")),
                Stat(s("hl")),
            ],
        ),
        (
            "one name of a lower hard link written",
            vec![
                Stat(s("hl1")),
                Stat(s("merged/hl2")),
                Write(s("hl1"), s("new")),
                Read(s("hl1")),
                Read(s("merged/hl2")),
                Stat(s("hl1")),
                Stat(s("merged/hl2")),
                SameInode(s("hl1"), s("merged/hl2")),
                SameInode(s("merged/hl2"), s("dir/sub/hl3")),
                Chmod(s("dir/sub/hl3"), 0o600),
                Stat(s("merged/hl2")),
                Remount,
                Read(s("hl1")),
                Read(s("merged/hl2")),
                SameInode(s("merged/hl2"), s("dir/sub/hl3")),
                Stat(s("dir/sub/hl3")),
            ],
        ),
        (
            // rustup: the toolchain directory is moved aside, a new one made
            // and filled (part of it moved over from the old), the old one
            // removed.
            "program class: a lower tree replaced by a new one (rustup)",
            vec![
                Rename(s("dir"), s("dir.old"), 0),
                Mkdir(s("dir"), 0o755),
                Write(s("dir/new"), s("v2")),
                Rename(s("dir.old/sub"), s("dir/sub"), 0),
                Append(s("dir/sub/leaf"), s("more")),
                RemoveAll(s("dir.old")),
                List(s("dir")),
                List(s("dir/sub")),
                Remount,
                Read(s("dir/sub/leaf")),
                Rename(s("dir"), s("dir2"), 0),
                Rename(s("dir2"), s("dir"), 0),
                Stat(s("dir/sub/hl3")),
                SameInode(s("dir/sub/hl3"), s("hl1")),
                RemoveAll(s("dir")),
                List(String::new()),
            ],
        ),
        (
            // pip: the installed package is moved into a temporary directory
            // elsewhere, the new one installed, the old one removed.
            "program class: a package moved aside into another directory (pip, conda)",
            vec![
                Mkdir(s("tmp"), 0o700),
                Rename(s("merged"), s("tmp/merged-backup"), 0),
                Mkdir(s("merged"), 0o755),
                Write(s("merged/from-top"), s("new")),
                Read(s("tmp/merged-backup/deep/file")),
                Rename(s("tmp/merged-backup/deep"), s("merged/deep"), 0),
                Write(s("merged/deep/file"), s("changed")),
                RemoveAll(s("tmp/merged-backup")),
                List(s("merged")),
                Remount,
                List(s("merged/deep")),
                Read(s("merged/deep/file")),
                Rename(s("merged"), s("tmp/again"), 0),
                Remount,
                List(s("tmp/again/deep")),
            ],
        ),
        (
            // npm: packages staged under temporary names and moved into
            // place, nested directories moved on their own.
            "program class: nested lower directories moved around (npm)",
            vec![
                Rename(s("merged/deep"), s("dir/sub/deep"), 0),
                Rename(s("dir"), s("n"), 0),
                Rename(s("n/sub"), s("sub2"), 0),
                Write(s("sub2/deep/file"), s("x")),
                Rename(s("sub2"), s("dir-again"), 0),
                Remount,
                Read(s("dir-again/deep/file")),
                Read(s("dir-again/leaf")),
                List(s("n")),
                Rename(s("dir-again/deep"), s("merged/deep"), 0),
                List(s("merged/deep")),
                RemoveAll(s("n")),
                RemoveAll(s("dir-again")),
                Remount,
                List(String::new()),
                List(s("merged")),
            ],
        ),
        (
            "directories exchanged: merged with upper, lower with lower",
            vec![
                Mkdir(s("new"), 0o755),
                Write(s("new/x"), s("x")),
                Rename(s("merged"), s("new"), libc::RENAME_EXCHANGE),
                List(s("merged")),
                List(s("new")),
                Rename(s("dir"), s("new/deep"), libc::RENAME_EXCHANGE),
                List(s("dir")),
                List(s("new/deep")),
                Remount,
                List(s("merged")),
                List(s("new")),
                List(s("new/deep")),
                Rmdir(s("new/deep")),
                RemoveAll(s("new")),
                List(String::new()),
            ],
        ),
        (
            "directories moved over whiteouts, into opaque ones, and back",
            vec![
                Rename(s("dir/sub"), s("merged/gone"), 0),
                List(s("merged/gone")),
                Rename(s("merged/gone"), s("dir/sub"), 0),
                RemoveAll(s("opaque")),
                Rename(s("dir"), s("opaque"), 0),
                List(s("opaque/sub")),
                Mkdir(s("o2"), 0o755),
                Rename(s("opaque"), s("o2/in"), 0),
                Rename(s("merged/deep"), s("o2/in/sub/deep"), 0),
                Remount,
                List(s("o2/in/sub/deep")),
                Rename(s("o2/in"), s("dir"), 0),
                Rmdir(s("dir/sub")),
                RemoveAll(s("dir/sub")),
                List(s("dir")),
            ],
        ),
        (
            "metadata changes of lower files, then data",
            vec![
                Chown(s("bottom-only"), 1000, 1000),
                Read(s("bottom-only")),
                Stat(s("bottom-only")),
                Rename(s("bottom-only"), s("merged/moved"), 0),
                Read(s("merged/moved")),
                Link(s("merged/moved"), s("dir/l2")),
                Remount,
                Read(s("dir/l2")),
                Append(s("dir/l2"), s("x")),
                Read(s("merged/moved")),
                Chmod(s("big"), 0o600),
                Read(s("big")),
                Remount,
                Truncate(s("big"), 5),
                Read(s("big")),
                Chmod(s("hl1"), 0o600),
                Read(s("merged/hl2")),
                Rename(s("merged/hl2"), s("dir/hl2"), 0),
                Remount,
                Append(s("dir/hl2"), s("y")),
                Read(s("hl1")),
                Read(s("dir/sub/hl3")),
            ],
        ),
        (
            "names of hard links go while others are opened with O_NOFOLLOW",
            vec![
                Write(s("f"), s("hello")),
                Link(s("f"), s("g")),
                Stat(s("f")),
                Unlink(s("f")),
                ReadNoFollow(s("g")),
                Stat(s("g")),
                Stat(s("hl1")),
                Unlink(s("hl1")),
                ReadNoFollow(s("merged/hl2")),
                Stat(s("merged/hl2")),
                Stat(s("tl1")),
                Rename(s("top-only"), s("tl1"), 0),
                ReadNoFollow(s("merged/tl2")),
                Link(s("dir/sub/hl3"), s("x")),
                Unlink(s("dir/sub/hl3")),
                ReadNoFollow(s("x")),
                Stat(s("x")),
                Rename(s("merged/hl2"), s("merged/tl2"), 0),
                ReadNoFollow(s("merged/tl2")),
                Remount,
                ReadNoFollow(s("g")),
                ReadNoFollow(s("x")),
                SameInode(s("x"), s("merged/tl2")),
            ],
        ),
        (
            "chmod chown",
            vec![
                Chmod(s("top-only"), 0o600),
                Chown(s("bottom-only"), 1000, 1000),
                Chmod(s("merged"), 0o700),
                Chown(s("link"), 5, 5),
                Stat(s("top-only")),
                Stat(s("merged")),
            ],
        ),
        (
            "xattrs",
            vec![
                SetXattr(s("top-only"), s("user.a"), s("1")),
                RemoveXattr(s("bottom-only"), s("user.tag")),
                RemoveXattr(s("shadowed"), s("user.none")),
                SetXattr(s("merged"), s("user.d"), s("dir")),
            ],
        ),
        (
            "special files",
            vec![
                Mkfifo(s("newfifo")),
                Chmod(s("fifo"), 0o600),
                Chmod(s("null"), 0o600),
                Unlink(s("fifo")),
                Mkfifo(s("fifo")),
            ],
        ),
        (
            "file over dir",
            vec![
                Unlink(s("file-over-dir")),
                Stat(s("file-over-dir")),
                Mkdir(s("file-over-dir"), 0o755),
                List(s("file-over-dir")),
            ],
        ),
        (
            "whiteout in lower",
            vec![
                Stat(s("merged/gone")),
                Write(s("merged/gone"), s("back")),
                Read(s("merged/gone")),
            ],
        ),
        (
            "read-only dir copy-up",
            vec![
                Write(s("ro/inner"), s("x")),
                Stat(s("ro")),
                Chmod(s("ro"), 0o755),
                Write(s("ro/new"), s("n")),
            ],
        ),
        (
            "setgid dir",
            vec![
                Write(s("sgid/n"), s("n")),
                Mkdir(s("sgid/d"), 0o755),
                Stat(s("sgid/n")),
                Stat(s("sgid/d")),
            ],
        ),
        (
            "rm -rf everything",
            vec![
                RemoveAll(s("merged")),
                RemoveAll(s("dir")),
                RemoveAll(s("opaque")),
                RemoveAll(s("sgid")),
                Chmod(s("ro"), 0o755),
                RemoveAll(s("ro")),
                List(s("")),
            ],
        ),
        (
            "names of one lower file renamed and exchanged among themselves",
            vec![
                Rename(s("hl1"), s("merged/hl2"), 0),
                Rename(s("merged/hl2"), s("dir/sub/hl3"), libc::RENAME_EXCHANGE),
                Append(s("dir/sub/hl3"), s("x")),
                Rename(s("hl1"), s("dir/sub/hl3"), libc::RENAME_EXCHANGE),
                Rename(s("dir/sub/hl3"), s("hl1"), 0),
                SameInode(s("hl1"), s("merged/hl2")),
                Stat(s("hl1")),
                Unlink(s("merged/hl2")),
                Stat(s("dir/sub/hl3")),
                Link(s("tl1"), s("merged/tl3")),
                Rename(s("merged/tl3"), s("merged/tl2"), 0),
                Stat(s("tl1")),
            ],
        ),
        (
            "errors",
            vec![
                Rmdir(s("top-only")),
                Unlink(s("merged")),
                Mkdir(s("top-only"), 0o755),
                Write(s("nodir/f"), s("x")),
                Link(s("merged"), s("ml")),
                Rename(s("merged"), s("top-only"), 0),
                Rename(s("top-only"), s("merged"), 0),
            ],
        ),
    ]
}

fn scenarios_match(features: Features) {
    for (name, ops) in scenarios() {
        let name = format!("{name} ({})", features.options());
        let mut pair = Pair::new("diff", features);
        pair.run(&name, &ops);
        pair.compare_views(&name);
        pair.run(&name, &[Op::Remount]);
        pair.compare_views(&format!("{name}, after a remount"));
        pair.exchange_uppers(&name);
    }
}

/// redirect_dir, index and metacopy on (the index stays off where this run
/// cannot have it: see `index_unavailable`).
#[test]
fn scenarios_match_the_kernel_with_every_feature() {
    index_unavailable("scenarios_match_the_kernel_with_every_feature (index part)");
    scenarios_match(Features::all());
}

#[test]
fn scenarios_match_the_kernel_with_no_feature() {
    scenarios_match(Features::none());
}

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545F4914F6CDD1D)
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[(self.next() % v.len() as u64) as usize]
    }
}

const DIRS: &[&str] = &[
    "",
    "merged",
    "dir",
    "dir/sub",
    "opaque",
    "merged/deep",
    "n",
    "n/m",
    "sgid",
];
const NAMES: &[&str] = &[
    "a",
    "b",
    "n",
    "m",
    "shadowed",
    "top-only",
    "bottom-only",
    "from-top",
    "from-bottom",
    "gone",
    "deep",
    "file",
    "leaf",
    "sub",
    "visible",
    "hidden",
    "big",
    "link",
    "fifo",
];

fn random_path(r: &mut Rng) -> String {
    if r.next().is_multiple_of(4) {
        return r.pick(LINKED).to_string();
    }
    let d = r.pick(DIRS);
    let n = r.pick(NAMES);
    if d.is_empty() {
        n.to_string()
    } else {
        format!("{d}/{n}")
    }
}

/// A directory path: one of the lowers' (merged or not), or a name that
/// earlier renames may have given one.
fn random_dir(r: &mut Rng) -> String {
    let d = r.pick(&DIRS[1..]);
    if r.next().is_multiple_of(3) {
        format!(
            "{}/{}",
            r.pick(DIRS).trim_start_matches('/'),
            r.pick(&["sub", "deep", "n", "m"])
        )
        .trim_start_matches('/')
        .to_string()
    } else {
        d.to_string()
    }
}

fn random_op(r: &mut Rng) -> Op {
    use Op::*;
    let p = random_path(r);
    let q = random_path(r);
    let data = format!("{}", r.next() % 1000);
    match r.next() % 30 {
        0 | 1 => Write(p, data),
        2 => Append(p, data),
        3 => Truncate(p, r.next() % 10),
        4 | 5 => Mkdir(p, *r.pick(&[0o755, 0o700, 0o2775])),
        6 => Rmdir(p),
        7 | 8 => Unlink(p),
        9 | 10 => Rename(
            p,
            q,
            *r.pick(&[0, 0, libc::RENAME_NOREPLACE, libc::RENAME_EXCHANGE]),
        ),
        11 => Symlink(q, p),
        12 => Link(p, q),
        13 => Chmod(p, *r.pick(&[0o600, 0o755, 0o4755])),
        14 => Chown(p, *r.pick(&[0, 1000]), *r.pick(&[0, 1000])),
        15 => SetXattr(p, r.pick(&["user.a", "user.b"]).to_string(), data),
        16 => RemoveXattr(p, r.pick(&["user.a", "user.tag"]).to_string()),
        17 => Read(p),
        18 => List(r.pick(DIRS).to_string()),
        19 | 20 => ReadNoFollow(p),
        21 => SameInode(p, q),
        22 if r.next().is_multiple_of(8) => Remount,
        // Directories of the lowers, merged ones and ones moved before:
        // moved, exchanged, removed.
        24..=26 => {
            let from = random_dir(r);
            let to = if r.next().is_multiple_of(2) {
                p
            } else {
                random_dir(r)
            };
            let flags = *r.pick(&[0, 0, libc::RENAME_NOREPLACE, libc::RENAME_EXCHANGE]);
            Rename(from, to, flags)
        }
        27 => Rmdir(random_dir(r)),
        // Metadata changes of lower files (metadata-only copy-up).
        28 => Chown(p, *r.pick(&[0, 1000]), *r.pick(&[0, 1000])),
        29 => Chmod(p, *r.pick(&[0o600, 0o755, 0o444])),
        _ => {
            if r.next().is_multiple_of(4) {
                RemoveAll(p)
            } else {
                Stat(p)
            }
        }
    }
}

#[test]
fn random_operations_match_the_kernel_with_every_feature() {
    index_unavailable("random_operations_match_the_kernel_with_every_feature (index part)");
    random_operations_match(Features::all());
}

#[test]
fn random_operations_match_the_kernel_with_no_feature() {
    random_operations_match(Features::none());
}

fn random_operations_match(features: Features) {
    let seeds: Vec<u64> = match std::env::var("UNIONFS_DIFF_SEEDS") {
        Ok(v) => v.split(',').map(|s| s.parse().unwrap()).collect(),
        Err(_) => (1..=12).collect(),
    };
    let per_seed: usize = std::env::var("UNIONFS_DIFF_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let mut total = 0;
    for seed in seeds {
        let mut pair = Pair::new("rand", features);
        let mut r = Rng(seed.wrapping_mul(0x9E3779B97F4A7C15) | 1);
        let mut ops: Vec<Op> = Vec::new();
        while ops.len() < per_seed {
            let op = random_op(&mut r);
            // A rename is often undone soon after: renames back.
            let back = match &op {
                Op::Rename(a, b, 0) if r.next().is_multiple_of(3) => {
                    Some(Op::Rename(b.clone(), a.clone(), 0))
                }
                _ => None,
            };
            ops.push(op);
            if let Some(back) = back {
                ops.push(random_op(&mut r));
                ops.push(back);
            }
        }
        for (chunk_no, chunk) in ops.chunks(100).enumerate() {
            let label = format!(
                "{}, seed {seed}, operations {}..",
                features.options(),
                chunk_no * 100
            );
            pair.run(&label, chunk);
            pair.compare_views(&label);
        }
        pair.compare_copies(&format!("seed {seed}"));
        pair.run(&format!("seed {seed}"), &[Op::Remount]);
        pair.compare_views(&format!("seed {seed}, remounted"));
        pair.compare_copies(&format!("seed {seed}, remounted"));
        pair.exchange_uppers(&format!("seed {seed}"));
        pair.compare_as_read_only_layers(&format!("seed {seed}"));
        // Finally `rm -rf` of everything that is left.
        let everything: Vec<Op> = fs::read_dir(&pair.kernel.mnt)
            .unwrap()
            .map(|e| Op::RemoveAll(e.unwrap().file_name().to_string_lossy().into_owned()))
            .collect();
        pair.run(&format!("seed {seed}, rm -rf"), &everything);
        pair.run(&format!("seed {seed}, rm -rf"), &[Op::List(String::new())]);
        pair.compare_views(&format!("seed {seed}, after rm -rf"));
        assert!(
            fs::read_dir(&pair.ours.mnt).unwrap().next().is_none(),
            "seed {seed}: rm -rf left something"
        );
        total += ops.len() + everything.len();
    }
    eprintln!(
        "random differential ({}): {total} operations matched the kernel",
        features.options()
    );
}
