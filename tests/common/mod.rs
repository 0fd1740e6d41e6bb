//! Shared test fixtures: layer trees in temporary directories, unionfs and
//! kernel overlayfs mounts that always unmount in teardown, tree snapshots.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr};
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_unionfs"))
}

/// A temporary directory removed at the end (after any mount on it is gone).
pub struct Scratch {
    pub path: PathBuf,
}

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        let base = std::env::var_os("UNIONFS_TEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let dir = tempfile::Builder::new()
            .prefix(&format!("unionfs-{tag}-"))
            .tempdir_in(base)
            .unwrap();
        Scratch { path: dir.keep() }
    }

    pub fn dir(&self, name: &str) -> PathBuf {
        let p = self.path.join(name);
        fs::create_dir_all(&p).unwrap();
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// This process's mount table as text; a path in it that is not UTF-8
/// (the table shows paths as bytes) is shown with U+FFFD, as
/// `to_string_lossy` shows the path it is compared with.
pub fn mount_table() -> String {
    String::from_utf8_lossy(&fs::read("/proc/self/mountinfo").unwrap_or_default()).into_owned()
}

pub fn is_mounted(mnt: &Path) -> bool {
    let info = mount_table();
    let want = mnt.to_string_lossy();
    info.lines().any(|l| l.split(' ').nth(4) == Some(&want))
}

fn mount_source_type(mnt: &Path) -> Option<String> {
    let info = mount_table();
    let want = mnt.to_string_lossy();
    info.lines()
        .find(|l| l.split(' ').nth(4) == Some(&want))
        .and_then(|l| {
            let after = l.split(" - ").nth(1)?;
            after.split(' ').next().map(str::to_string)
        })
}

/// A tmpfs of its own at `path` (unmounted on drop), for an upper
/// directory that runs out of room: `upper` and `work` made on it.
pub struct Tmpfs {
    pub path: PathBuf,
}

impl Tmpfs {
    pub fn mount(path: PathBuf, options: &str) -> Tmpfs {
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(&path)
            .status()
            .unwrap();
        assert!(ok.success(), "mount tmpfs -o {options}");
        for d in ["upper", "work"] {
            fs::create_dir(path.join(d)).unwrap();
        }
        Tmpfs { path }
    }

    pub fn upper(&self) -> PathBuf {
        self.path.join("upper")
    }

    pub fn work(&self) -> PathBuf {
        self.path.join("work")
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        umount_lazy(&self.path);
    }
}

pub fn umount_lazy(mnt: &Path) {
    let c = CString::new(mnt.as_os_str().as_bytes()).unwrap();
    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Unionfs,
    Kernel,
}

/// A mounted union; unmounted on drop, whatever happened.
pub struct Mount {
    pub kind: Kind,
    pub mnt: PathBuf,
    pub child: Option<Child>,
    /// The daemon's stderr.
    pub log: Option<tempfile::NamedTempFile>,
}

/// The overlay features a union is mounted with, as the kernel names them:
/// the same on both sides of a comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Features {
    pub redirect_dir: bool,
    pub index: bool,
    pub metacopy: bool,
}

impl Features {
    /// unionfs's defaults in this run (the index is off with writeback=on).
    pub fn defaults() -> Features {
        Features {
            redirect_dir: true,
            index: index_by_default(),
            metacopy: false,
        }
    }

    /// Every feature this run can have on.
    pub fn all() -> Features {
        Features {
            metacopy: true,
            ..Features::defaults()
        }
    }

    /// Every feature off: the layout of the oldest kernels and of
    /// fuse-overlayfs.
    pub fn none() -> Features {
        Features {
            redirect_dir: false,
            index: false,
            metacopy: false,
        }
    }

    /// The `-o` options, for the kernel's mount and for ours.
    pub fn options(&self) -> String {
        let on = |b: bool| if b { "on" } else { "off" };
        format!(
            "redirect_dir={},index={},metacopy={}",
            on(self.redirect_dir),
            on(self.index),
            on(self.metacopy)
        )
    }
}

/// Whether unionfs mounts of this run have the index by default: not with
/// the writeback cache (`UNIONFS_TEST_OPTIONS` with `writeback=on`).
pub fn index_by_default() -> bool {
    !test_options().iter().any(|o| o.contains("writeback=on"))
}

/// True (with a line saying so) when this run cannot have the index, so a
/// test of the index has nothing to test: `writeback=on` turns it off.
pub fn index_unavailable(test: &str) -> bool {
    let unavailable = !index_by_default();
    if unavailable {
        eprintln!("{test}: not run: writeback=on in UNIONFS_TEST_OPTIONS turns the index off");
    }
    unavailable
}

/// Whether this run's mounts have the writeback cache (`UNIONFS_TEST_OPTIONS`).
pub fn writeback_on() -> bool {
    !index_by_default()
}

/// Whether this run's mounts have passthrough off (`UNIONFS_TEST_OPTIONS`).
pub fn passthrough_off() -> bool {
    test_options().iter().any(|o| o.contains("passthrough=off"))
}

/// Extra `-o` options every unionfs mount of the tests gets, from
/// `UNIONFS_TEST_OPTIONS` (CI runs the suite with `passthrough=off` and with
/// `passthrough=off,writeback=on` too).
fn test_options() -> Vec<String> {
    std::env::var("UNIONFS_TEST_OPTIONS")
        .map(|v| vec![v])
        .unwrap_or_default()
}

pub fn lower_arg(lowers: &[PathBuf]) -> String {
    lowers
        .iter()
        .map(|p| p.to_string_lossy().replace(':', "\\:"))
        .collect::<Vec<_>>()
        .join(":")
}

impl Mount {
    /// `unionfs mount` in the background, waiting until the mount is live.
    pub fn unionfs(lowers: &[PathBuf], upper: &Path, mnt: &Path, opts: &[&str]) -> Mount {
        Mount::unionfs_env(lowers, upper, mnt, opts, &[])
    }

    /// `unionfs mount` with variables added to its environment.
    pub fn unionfs_env(
        lowers: &[PathBuf],
        upper: &Path,
        mnt: &Path,
        opts: &[&str],
        env: &[(&str, &str)],
    ) -> Mount {
        let mut cmd = Command::new(bin());
        cmd.envs(env.iter().copied());
        cmd.arg("mount");
        let extra = test_options();
        for o in extra.iter().map(String::as_str).chain(opts.iter().copied()) {
            cmd.arg("-o").arg(o);
        }
        cmd.arg(lower_arg(lowers)).arg(upper).arg(mnt);
        let log = tempfile::NamedTempFile::new().unwrap();
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log.reopen().unwrap());
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "unionfs=info");
        }
        let child = cmd.spawn().expect("spawn unionfs");
        let mut m = Mount {
            kind: Kind::Unionfs,
            mnt: mnt.to_path_buf(),
            child: Some(child),
            log: Some(log),
        };
        m.wait_ready();
        m
    }

    /// What the daemon has logged so far.
    pub fn log_text(&self) -> String {
        self.log
            .as_ref()
            .map(|f| fs::read_to_string(f.path()).unwrap_or_default())
            .unwrap_or_default()
    }

    fn wait_ready(&mut self) {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if mount_source_type(&self.mnt).as_deref() == Some("fuse.unionfs") {
                // The first request waits for the kernel's INIT to be
                // answered: after it, what the daemon logs at INIT is there.
                let _ = fs::symlink_metadata(&self.mnt);
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "unionfs exited before mounting ({status}): {}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("unionfs did not mount {} in time", self.mnt.display());
    }

    /// Kernel overlayfs over the same kind of layers, the oracle, with the
    /// options unionfs has by default.
    pub fn kernel(lowers: &[PathBuf], upper: &Path, work: &Path, mnt: &Path) -> Mount {
        Mount::kernel_with(lowers, upper, work, mnt, Features::defaults())
    }

    /// Kernel overlayfs with the features `f`.
    pub fn kernel_with(
        lowers: &[PathBuf],
        upper: &Path,
        work: &Path,
        mnt: &Path,
        f: Features,
    ) -> Mount {
        let opts = format!(
            "lowerdir={},upperdir={},workdir={},{}",
            lower_arg(lowers),
            upper.display(),
            work.display(),
            f.options()
        );
        let st = Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o", &opts])
            .arg(mnt)
            .status()
            .expect("run mount");
        assert!(st.success(), "kernel overlay mount failed: {opts}");
        Mount {
            kind: Kind::Kernel,
            mnt: mnt.to_path_buf(),
            child: None,
            log: None,
        }
    }

    /// Unmounts and waits for the daemon; returns its exit status.
    pub fn unmount(mut self) -> Option<ExitStatus> {
        self.teardown()
    }

    fn teardown(&mut self) -> Option<ExitStatus> {
        if is_mounted(&self.mnt) {
            umount_lazy(&self.mnt);
        }
        let mut child = self.child.take()?;
        let start = Instant::now();
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(st);
            }
            if start.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                return child.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Drops the kernel's dentry and inode caches (so FUSE forgets nodes).
pub fn drop_caches() {
    unsafe { libc::sync() };
    let _ = fs::write("/proc/sys/vm/drop_caches", "3");
}

// ---------------------------------------------------------------- snapshots

/// One object of a tree as the tests compare it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Obj {
    pub kind: &'static str,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Content hash, symlink target, device number or nothing.
    pub data: String,
    /// user.* xattrs (and the opaque marker for upper trees).
    pub xattrs: Vec<(String, Vec<u8>)>,
}

pub fn fnv(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in data {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

pub fn lxattrs(p: &Path) -> Vec<(String, Vec<u8>)> {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let mut buf = vec![0u8; 65536];
    let n = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n <= 0 {
        return vec![];
    }
    let mut out = Vec::new();
    for name in buf[..n as usize]
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
    {
        let cname = CString::new(name).unwrap();
        let mut v = vec![0u8; 65536];
        let m =
            unsafe { libc::lgetxattr(c.as_ptr(), cname.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        if m >= 0 {
            v.truncate(m as usize);
            out.push((String::from_utf8_lossy(name).into_owned(), v));
        }
    }
    out.sort();
    out
}

pub fn lgetxattr(p: &Path, name: &str) -> Option<Vec<u8>> {
    lxattrs(p)
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v)
}

fn kind_name(ft: fs::FileType, rdev: u64) -> &'static str {
    if ft.is_dir() {
        "dir"
    } else if ft.is_symlink() {
        "symlink"
    } else if ft.is_file() {
        "file"
    } else if ft.is_fifo() {
        "fifo"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_char_device() && rdev == 0 {
        "whiteout"
    } else if ft.is_char_device() {
        "chardev"
    } else {
        "blockdev"
    }
}

/// Which xattrs a snapshot keeps.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// A mounted union: user.* only.
    Merged,
    /// An upper directory: user.* and the opaque marker, in either namespace.
    Upper,
}

pub fn describe(p: &Path, view: View) -> Obj {
    let m = fs::symlink_metadata(p).unwrap();
    let kind = kind_name(m.file_type(), m.rdev());
    let data = match kind {
        "file" => format!("{}:{:x}", m.len(), fnv(&fs::read(p).unwrap_or_default())),
        "symlink" => fs::read_link(p).unwrap().to_string_lossy().into_owned(),
        "chardev" | "blockdev" => format!("{}", m.rdev()),
        _ => String::new(),
    };
    let xattrs = lxattrs(p)
        .into_iter()
        .filter_map(|(n, v)| {
            if n.starts_with("user.") && !n.starts_with("user.overlay.") {
                Some((n, v))
            } else if view == View::Upper && n.ends_with("overlay.opaque") {
                Some(("overlay.opaque".to_string(), v))
            } else {
                None
            }
        })
        .collect();
    Obj {
        kind,
        mode: m.permissions().mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        data,
        xattrs,
    }
}

/// Every object below `root`, by relative path.
pub fn snapshot(root: &Path, view: View) -> BTreeMap<String, Obj> {
    let mut out = BTreeMap::new();
    walk(root, root, view, &mut out);
    out
}

fn walk(root: &Path, dir: &Path, view: View, out: &mut BTreeMap<String, Obj>) {
    let mut names: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    for name in names {
        let p = dir.join(&name);
        let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
        let obj = describe(&p, view);
        let is_dir = obj.kind == "dir";
        out.insert(rel, obj);
        if is_dir {
            walk(root, &p, view, out);
        }
    }
}

/// Describes the differences of two snapshots, empty when equal.
pub fn diff(
    a_name: &str,
    a: &BTreeMap<String, Obj>,
    b_name: &str,
    b: &BTreeMap<String, Obj>,
) -> String {
    let mut out = String::new();
    for (k, v) in a {
        match b.get(k) {
            None => out += &format!("only in {a_name}: {k} {v:?}\n"),
            Some(w) if w != v => {
                out += &format!("differs: {k}\n  {a_name}: {v:?}\n  {b_name}: {w:?}\n")
            }
            _ => {}
        }
    }
    for (k, v) in b {
        if !a.contains_key(k) {
            out += &format!("only in {b_name}: {k} {v:?}\n");
        }
    }
    out
}

// ---------------------------------------------------------------- layers

pub fn write(p: &Path, data: &str) {
    if let Some(d) = p.parent() {
        fs::create_dir_all(d).unwrap();
    }
    fs::write(p, data).unwrap();
}

pub fn mknod(p: &Path, mode: u32, dev: u64) {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    assert_eq!(
        unsafe { libc::mknod(c.as_ptr(), mode, dev) },
        0,
        "mknod {}",
        p.display()
    );
}

pub fn set_xattr(p: &Path, name: &str, value: &[u8]) {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    let r = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        r,
        0,
        "setxattr {name} on {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

pub fn set_mtime(p: &Path, secs: i64) {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let t = [
        libc::timespec {
            tv_sec: secs,
            tv_nsec: 0,
        },
        libc::timespec {
            tv_sec: secs,
            tv_nsec: 0,
        },
    ];
    assert_eq!(
        unsafe {
            libc::utimensat(
                libc::AT_FDCWD,
                c.as_ptr(),
                t.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        },
        0
    );
}

/// Two lower layers exercising merging, shadowing, whiteouts and opacity.
pub fn standard_lowers(s: &Scratch) -> Vec<PathBuf> {
    let top = s.dir("lower1");
    let bottom = s.dir("lower2");
    write(&top.join("top-only"), "top\n");
    write(&top.join("shadowed"), "from top\n");
    write(&bottom.join("shadowed"), "from bottom\n");
    write(&bottom.join("bottom-only"), "bottom\n");
    write(&top.join("merged/from-top"), "t\n");
    write(&bottom.join("merged/from-bottom"), "b\n");
    write(&bottom.join("merged/deep/file"), "deep\n");
    write(&bottom.join("merged/gone"), "hidden by a whiteout\n");
    mknod(&top.join("merged/gone"), libc::S_IFCHR, 0);
    write(&top.join("opaque/visible"), "v\n");
    set_xattr(&top.join("opaque"), "trusted.overlay.opaque", b"y");
    write(&bottom.join("opaque/hidden"), "h\n");
    write(
        &top.join("file-over-dir"),
        "a file hides the directory below\n",
    );
    write(&bottom.join("file-over-dir/inside"), "never seen\n");
    write(&bottom.join("dir/sub/leaf"), "leaf\n");
    write(&bottom.join("big"), &"0123456789abcdef".repeat(4096));
    std::os::unix::fs::symlink("top-only", top.join("link")).unwrap();
    std::os::unix::fs::symlink("/etc/shadow", top.join("evil")).unwrap();
    mknod(&bottom.join("fifo"), libc::S_IFIFO | 0o640, 0);
    mknod(
        &bottom.join("null"),
        libc::S_IFCHR | 0o666,
        libc::makedev(1, 3),
    );
    fs::create_dir_all(top.join("ro")).unwrap();
    write(&top.join("ro/inner"), "in a 0555 directory\n");
    fs::set_permissions(top.join("ro"), fs::Permissions::from_mode(0o555)).unwrap();
    write(&bottom.join("sgid/child"), "in a setgid directory\n");
    fs::set_permissions(bottom.join("sgid"), fs::Permissions::from_mode(0o2775)).unwrap();
    std::os::unix::fs::chown(bottom.join("sgid"), Some(1234), Some(4321)).unwrap();
    set_xattr(&bottom.join("bottom-only"), "user.tag", b"kept");
    for p in [&top, &bottom] {
        for e in walkdir_all(p) {
            set_mtime(&e, 1_000_000_000);
        }
    }
    vec![top, bottom]
}

/// Every path under `root`, deepest first (so setting times on files does not
/// disturb their directories afterwards).
pub fn walkdir_all(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    fn rec(d: &Path, out: &mut Vec<PathBuf>) {
        for e in fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if fs::symlink_metadata(&p).unwrap().is_dir() {
                rec(&p, out);
            }
            out.push(p);
        }
    }
    rec(root, &mut out);
    out
}

/// A fixture: standard lowers, an upper, and a unionfs mount.
pub struct Fixture {
    pub mount: Option<Mount>,
    pub lowers: Vec<PathBuf>,
    pub upper: PathBuf,
    pub mnt: PathBuf,
    pub lower_before: Vec<BTreeMap<String, Obj>>,
    pub scratch: Scratch,
}

impl Fixture {
    pub fn new(tag: &str) -> Fixture {
        let scratch = Scratch::new(tag);
        let lowers = standard_lowers(&scratch);
        Self::over(scratch, lowers)
    }

    pub fn over(scratch: Scratch, lowers: Vec<PathBuf>) -> Fixture {
        let upper = scratch.dir("upper");
        let mnt = scratch.dir("mnt");
        let lower_before = lowers.iter().map(|l| snapshot(l, View::Upper)).collect();
        let mount = Some(Mount::unionfs(&lowers, &upper, &mnt, &[]));
        Fixture {
            mount,
            lowers,
            upper,
            mnt,
            lower_before,
            scratch,
        }
    }

    pub fn p(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    pub fn up(&self, rel: &str) -> PathBuf {
        self.upper.join(rel)
    }

    pub fn remount(&mut self) {
        drop(self.mount.take());
        self.mount = Some(Mount::unionfs(&self.lowers, &self.upper, &self.mnt, &[]));
    }

    pub fn unmount(&mut self) -> Option<ExitStatus> {
        self.mount.take().and_then(|m| m.unmount())
    }

    /// The lower layers are exactly as they were made.
    pub fn assert_lowers_untouched(&self) {
        for (l, before) in self.lowers.iter().zip(&self.lower_before) {
            let now = snapshot(l, View::Upper);
            let d = diff("before", before, "after", &now);
            assert!(d.is_empty(), "lower layer {} changed:\n{d}", l.display());
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        drop(self.mount.take());
    }
}

pub fn errno_of<T>(r: std::io::Result<T>) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}

/// Runs a shell command as an unprivileged user.
pub fn as_user(uid: u32, gid: u32, script: &str) -> std::process::Output {
    Command::new("setpriv")
        .args([
            format!("--reuid={uid}"),
            format!("--regid={gid}"),
            "--clear-groups".into(),
        ])
        .args(["sh", "-c", script])
        .output()
        .expect("setpriv")
}

pub fn name(s: &str) -> &OsStr {
    OsStr::new(s)
}

/// Runs a command that must return on its own within 30 s, closing its
/// stdout and stderr (a daemon that kept them would hang its caller).
pub fn run_to_end(mut cmd: Command) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("{cmd:?} did not return");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    std::thread::spawn(move || {
        let (mut o, mut e) = (Vec::new(), Vec::new());
        out.read_to_end(&mut o).unwrap();
        err.read_to_end(&mut e).unwrap();
        let _ = tx.send((o, e));
    });
    let (stdout, stderr) = rx
        .recv_timeout(Duration::from_secs(5))
        .unwrap_or_else(|_| panic!("{cmd:?}: the daemon kept the caller's stdout/stderr open"));
    Output {
        status,
        stdout,
        stderr,
    }
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Unmounts (lazily, deepest first) every mount at or below `dir`: what a
/// failed test of a container engine left under its storage.
pub fn unmount_all_under(dir: &Path) {
    let info = mount_table();
    let under = dir.to_string_lossy().into_owned();
    let mut mounts: Vec<&str> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(&under))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in mounts {
        umount_lazy(Path::new(m));
    }
}

/// A busybox rootfs: the static binary, its applet links and a few files.
pub fn busybox_rootfs(root: &Path) {
    for d in [
        "bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "tmp", "root",
    ] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::set_permissions(root.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
    fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static is installed");
    let list = Command::new("/bin/busybox")
        .arg("--list-full")
        .output()
        .unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let link = root.join(applet);
        if !link.exists() {
            std::os::unix::fs::symlink("/bin/busybox", link).unwrap();
        }
    }
    fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )
    .unwrap();
    fs::write(root.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").unwrap();
    fs::write(
        root.join("etc/os-release"),
        "NAME=\"busybox test rootfs\"\nID=busybox\n",
    )
    .unwrap();
}

/// Where rootfs builds are cached between runs: `UNIONFS_TEST_CACHE`, else
/// `/var/tmp` (CI points its first pass at an empty directory, as a machine
/// that never ran the tests has).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("UNIONFS_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp"))
}

/// A minimal Debian bookworm rootfs, made once per machine (per cache
/// directory). Tests of every binary may ask at once: one builds, under a
/// lock on a file beside the cache, and the others wait for it.
pub fn debian_rootfs() -> PathBuf {
    let base = cache_dir();
    let cached = base.join("unionfs-test-debian");
    let built = |p: &Path| p.join("var/lib/dpkg/status").exists();
    if built(&cached) {
        return cached;
    }
    fs::create_dir_all(&base).unwrap();
    let lock = fs::File::create(base.join("unionfs-test-debian.lock")).unwrap();
    let _held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .expect("lock the Debian rootfs cache");
    if built(&cached) {
        return cached; // another test built it while this one waited
    }
    let building = base.join("unionfs-test-debian.building");
    let _ = fs::remove_dir_all(&building); // a build that was killed
    let mirror = "http://deb.debian.org/debian";
    let o = Command::new("debootstrap")
        .args(["--variant=minbase", "bookworm"])
        .arg(&building)
        .arg(mirror)
        .output()
        .expect("debootstrap is installed (tests/setup.sh)");
    if !o.status.success() {
        let log =
            fs::read_to_string(building.join("debootstrap/debootstrap.log")).unwrap_or_default();
        let _ = fs::remove_dir_all(&building);
        panic!(
            "debootstrap --variant=minbase bookworm {} {mirror} failed ({}):\n\
             stdout:\n{}\nstderr:\n{}\ndebootstrap.log (end):\n{}",
            building.display(),
            o.status,
            last_lines(&text(&o.stdout), 30),
            last_lines(&text(&o.stderr), 30),
            last_lines(&log, 30)
        );
    }
    fs::rename(&building, &cached).expect("move the built rootfs into the cache");
    cached
}

/// The last `n` lines of `t`.
fn last_lines(t: &str, n: usize) -> String {
    let lines: Vec<&str> = t.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// podman with storage of its own (kernel overlay, no mount program).
pub struct Podman {
    pub dir: PathBuf,
}

impl Podman {
    pub fn new(dir: PathBuf) -> Podman {
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            dir.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"overlay\"\nrunroot = \"{d}/run\"\ngraphroot = \"{d}/graph\"\n",
                d = dir.display()
            ),
        )
        .unwrap();
        Podman { dir }
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let mut c = Command::new("podman");
        c.args(args)
            .env("CONTAINERS_STORAGE_CONF", self.dir.join("storage.conf"));
        let out = run_to_end(c);
        assert!(
            out.status.success(),
            "podman {args:?}: {}",
            text(&out.stderr)
        );
        text(&out.stdout)
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = Command::new("podman")
            .args(["rm", "-a", "-f"])
            .env("CONTAINERS_STORAGE_CONF", self.dir.join("storage.conf"))
            .output();
        unmount_all_under(&self.dir);
    }
}

/// The uid of a user by name.
pub fn uid_of(user: &str) -> u32 {
    let o = Command::new("id").args(["-u", user]).output().unwrap();
    text(&o.stdout).trim().parse().unwrap()
}

/// The first subordinate uid of a user (tests/setup.sh grants them).
pub fn subuid_start(user: &str) -> u32 {
    let text = fs::read_to_string("/etc/subuid").unwrap_or_default();
    text.lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{user}:"))?
                .split(':')
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("{user} has no range in /etc/subuid (tests/setup.sh adds it)"))
}

/// Waits for a child, killing it after `limit` (a hang is a failure).
pub fn wait_output(mut child: Child, limit: Duration) -> Output {
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("the command hung (more than {limit:?})");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

/// The stdout of a command that must have succeeded.
pub fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "status {:?}, stderr: {}",
        o.status,
        text(&o.stderr)
    );
    text(&o.stdout)
}

// ---------------------------------------------------------------- mappings

/// A shared, writable mapping of the start of a file, unmapped when
/// dropped (it may outlive the descriptor it was made from).
pub struct SharedMap {
    ptr: *mut libc::c_void,
    len: usize,
}

impl SharedMap {
    /// Maps the first `len` bytes of `f`, or says the errno of the refusal.
    pub fn new(f: &fs::File, len: usize) -> Result<SharedMap, i32> {
        use std::os::fd::AsRawFd;
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
        }
        Ok(SharedMap { ptr, len })
    }

    /// Writes `bytes` at the start of the mapping.
    pub fn poke(&self, bytes: &[u8]) {
        assert!(bytes.len() <= self.len);
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.cast::<u8>(), bytes.len()) }
    }

    /// The first `n` bytes of the mapping.
    pub fn head(&self, n: usize) -> Vec<u8> {
        assert!(n <= self.len);
        unsafe { std::slice::from_raw_parts(self.ptr.cast::<u8>(), n) }.to_vec()
    }

    /// msync(MS_SYNC) of the whole mapping.
    pub fn sync(&self) {
        assert_eq!(unsafe { libc::msync(self.ptr, self.len, libc::MS_SYNC) }, 0);
    }
}

impl Drop for SharedMap {
    fn drop(&mut self) {
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}
