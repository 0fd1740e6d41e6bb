//! Faults and load: the daemon killed at random moments during copy-up,
//! untar, a rename storm, rm -rf and fsync'd writes, and at the two points
//! of the index where a crash matters, each time remounted and checked
//! against the kernel's overlayfs on the same upper directory; a
//! parallel stress run of several writers on overlapping names, watched for
//! deadlock and compared with the kernel afterwards.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;

/// A small deterministic random generator (xorshift).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Layers for the crash runs: a large lower file, a tree to delete, files
/// to rename, and a tarball of many small files.
struct World {
    /// Removed (after every mount is gone) when the test ends.
    _scratch: Scratch,
    lowers: Vec<PathBuf>,
    upper: PathBuf,
    work: PathBuf,
    mnt: PathBuf,
    kmnt: PathBuf,
    kwork: PathBuf,
    tarball: PathBuf,
    progress: PathBuf,
    big_lower: Vec<u8>,
}

const BIG: usize = 48 << 20;

impl World {
    fn new() -> World {
        let s = Scratch::new("crash");
        let (l1, l2) = (s.dir("l1"), s.dir("l2"));
        let big_lower: Vec<u8> = (0..BIG).map(|i| (i % 251) as u8).collect();
        fs::write(l2.join("big"), &big_lower).unwrap();
        for i in 0..400 {
            write(
                &l2.join(format!("tree/d{}/f{i}", i % 20)),
                "lower tree file\n",
            );
        }
        for i in 0..50 {
            write(&l1.join(format!("names/n{i}")), &format!("name {i}\n"));
        }
        let src = s.dir("tarsrc");
        for i in 0..3000 {
            write(
                &src.join(format!("t/d{}/f{i}", i % 60)),
                &format!("file {i}\n"),
            );
        }
        let tarball = s.path.join("many.tar");
        assert!(
            Command::new("tar")
                .arg("-C")
                .arg(&src)
                .arg("-cf")
                .arg(&tarball)
                .arg("t")
                .status()
                .unwrap()
                .success()
        );
        World {
            lowers: vec![l1, l2],
            upper: s.dir("upper"),
            work: s.dir("work"),
            mnt: s.dir("mnt"),
            kmnt: s.dir("kmnt"),
            kwork: s.dir("kwork"),
            progress: s.path.join("progress"),
            tarball,
            big_lower,
            _scratch: s,
        }
    }

    fn mount(&self) -> Mount {
        let wd = format!("workdir={}", self.work.display());
        Mount::unionfs(&self.lowers, &self.upper, &self.mnt, &[&wd])
    }

    /// A shell running `script` in the mount, in the background.
    fn start(&self, script: &str) -> Child {
        Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(&self.mnt)
            .env("PROGRESS", &self.progress)
            .env("TARBALL", &self.tarball)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }
}

/// What each crash run does inside the mount.
const WORKLOADS: [(&str, &str); 5] = [
    ("copy-up of a large file", "echo appended >> big"),
    (
        "untar of 3000 files",
        "mkdir -p untar && tar -xf \"$TARBALL\" -C untar",
    ),
    (
        "rename storm",
        "i=0; while [ $i -lt 400 ]; do for n in names/*; do mv \"$n\" \"$n.r\" 2>/dev/null; done; \
         for n in names/*.r; do mv \"$n\" \"${n%.r}\" 2>/dev/null; done; i=$((i+1)); done",
    ),
    ("rm -rf of a lower tree", "rm -rf tree"),
    (
        "fsync'd writes",
        "i=0; while :; do i=$((i+1)); echo \"content $i\" > synced.$i && \
         dd if=synced.$i of=/dev/null conv=fsync status=none 2>/dev/null; \
         sync synced.$i && echo $i >> \"$PROGRESS\"; done",
    ),
];

/// Checks the union over the upper directory after a kill: nothing of the
/// work directory shows, the big file is whole (either version), every
/// fsync'd file is intact, and the kernel's overlayfs shows the same view.
fn check_after_kill(w: &World, what: &str) {
    let m = w.mount();
    let view = snapshot(&w.mnt, View::Merged);
    for name in view.keys() {
        assert!(!name.contains("#u"), "{what}: a work file shows: {name}");
    }
    assert_eq!(
        fs::read_dir(w.work.join("work")).unwrap().count(),
        0,
        "{what}: leftovers not cleaned at mount"
    );
    let big = fs::read(w.mnt.join("big")).unwrap();
    let mut appended = w.big_lower.clone();
    appended.extend_from_slice(b"appended\n");
    assert!(
        big == w.big_lower || big.starts_with(&appended),
        "{what}: big is half copied: {} bytes",
        big.len()
    );
    let done: Vec<u64> = fs::read_to_string(&w.progress)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect();
    for i in done {
        assert_eq!(
            fs::read_to_string(w.mnt.join(format!("synced.{i}"))).unwrap(),
            format!("content {i}\n"),
            "{what}: fsync'd file {i} lost"
        );
    }
    drop(m);
    let k = Mount::kernel(&w.lowers, &w.upper, &w.kwork, &w.kmnt);
    let kernel_view = snapshot(&w.kmnt, View::Merged);
    drop(k);
    let d = diff("unionfs", &view, "kernel", &kernel_view);
    assert!(d.is_empty(), "{what}: views differ after the kill:\n{d}");
}

#[test]
fn kills_at_random_moments_leave_a_consistent_upper() {
    let w = World::new();
    let rounds: u64 = std::env::var("UNIONFS_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut kills = 0;
    for (what, script) in WORKLOADS {
        for _ in 0..rounds {
            let m = w.mount();
            // Each round starts its count again (and rewrites the files of
            // the round before): only this round's fsync'd files must stay.
            let _ = fs::remove_file(&w.progress);
            let mut job = w.start(script);
            std::thread::sleep(Duration::from_millis(20 + rng.below(400)));
            let pid = m.pid().unwrap();
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            let _ = job.kill();
            let _ = job.wait();
            umount_lazy(&w.mnt);
            m.unmount();
            kills += 1;
            check_after_kill(&w, what);
        }
    }
    eprintln!("daemon killed {kills} times; every time the upper was consistent");
}

// ---- parallel stress ----

/// One random operation on a small set of overlapping names.
fn random_op(root: &Path, rng: &mut Rng) {
    let names = ["a", "b", "c", "d/e", "d/f", "g", "d", "h/i"];
    let pick = |rng: &mut Rng| root.join(names[rng.below(names.len() as u64) as usize]);
    let (p, q) = (pick(rng), pick(rng));
    let _ = match rng.below(12) {
        0 => fs::write(&p, vec![b'x'; rng.below(9000) as usize]),
        1 => fs::OpenOptions::new()
            .append(true)
            .open(&p)
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"more")),
        2 => fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .and_then(|f| f.set_len(rng.below(5000))),
        3 => fs::rename(&p, &q),
        4 => fs::remove_file(&p),
        5 => fs::create_dir(&p),
        6 => fs::remove_dir(&p),
        7 => fs::hard_link(&p, &q),
        8 => std::os::unix::fs::symlink("target", &p),
        9 => {
            set_xattr_quiet(&p, "user.stress", &rng.below(1000).to_string());
            Ok(())
        }
        10 => fs::metadata(&p).map(drop),
        _ => fs::read_dir(root.join("d")).map(|d| d.count()).map(drop),
    };
}

fn set_xattr_quiet(p: &Path, name: &str, value: &str) {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        );
    }
}

#[test]
fn parallel_stress_ends_as_the_kernel_sees_it() {
    let s = Scratch::new("stress");
    let lowers = standard_lowers(&s);
    for l in &lowers {
        write(&l.join("d/e"), "lower e\n");
        write(&l.join("a"), "lower a\n");
    }
    let (upper, mnt) = (s.dir("upper"), s.dir("mnt"));
    let (kwork, kmnt) = (s.dir("kwork"), s.dir("kmnt"));
    let secs: u64 = std::env::var("UNIONFS_STRESS_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let m = Mount::unionfs(&lowers, &upper, &mnt, &[]);
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..4)
        .map(|i| {
            let (root, done, stop) = (mnt.clone(), done.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut rng = Rng(0x1234_5678 + i * 7919);
                while !stop.load(Ordering::Relaxed) {
                    random_op(&root, &mut rng);
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    // The watchdog: operations must keep completing.
    let end = Instant::now() + Duration::from_secs(secs);
    let mut last = (0, Instant::now());
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(500));
        let n = done.load(Ordering::Relaxed);
        if n != last.0 {
            last = (n, Instant::now());
        }
        assert!(
            last.1.elapsed() < Duration::from_secs(20),
            "no operation completed for 20 s after {n}: deadlock"
        );
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    let ops = done.load(Ordering::Relaxed);
    let pid = m.pid().unwrap();
    assert!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "the daemon died"
    );
    let live_view = snapshot(&mnt, View::Merged);
    drop(m);
    // The same upper under a fresh unionfs and under the kernel.
    let m = Mount::unionfs(&lowers, &upper, &mnt, &[]);
    let view = snapshot(&mnt, View::Merged);
    let d = diff("live", &live_view, "remounted", &view);
    assert!(d.is_empty(), "the view changed across a remount:\n{d}");
    drop(m);
    let k = Mount::kernel(&lowers, &upper, &kwork, &kmnt);
    let kernel_view = snapshot(&kmnt, View::Merged);
    drop(k);
    let d = diff("unionfs", &view, "kernel", &kernel_view);
    assert!(
        d.is_empty(),
        "unionfs and the kernel differ on the final upper:\n{d}"
    );
    // And everything can be removed.
    let m = Mount::unionfs(&lowers, &upper, &mnt, &[]);
    for e in fs::read_dir(&mnt).unwrap() {
        let p = e.unwrap().path();
        if fs::symlink_metadata(&p).unwrap().is_dir() {
            fs::remove_dir_all(&p).unwrap();
        } else {
            fs::remove_file(&p).unwrap();
        }
    }
    assert_eq!(fs::read_dir(&mnt).unwrap().count(), 0);
    drop(m);
    eprintln!("parallel stress: 4 writers, {secs} s, {ops} operations; same view as the kernel");
}

// ---- limits ----

#[test]
fn deep_trees_long_names_and_huge_directories() {
    let s = Scratch::new("limits");
    let lower = s.dir("lower");
    // A directory of 100,000 entries in a lower layer.
    let huge = lower.join("huge");
    fs::create_dir(&huge).unwrap();
    for i in 0..100_000 {
        fs::File::create(huge.join(format!("entry-{i:06}"))).unwrap();
    }
    let (upper, mnt) = (s.dir("upper"), s.dir("mnt"));
    let m = Mount::unionfs(std::slice::from_ref(&lower), &upper, &mnt, &[]);
    assert_eq!(fs::read_dir(mnt.join("huge")).unwrap().count(), 100_000);
    // Deleting some and adding others through the union.
    for i in (0..100_000).step_by(10) {
        fs::remove_file(mnt.join(format!("huge/entry-{i:06}"))).unwrap();
    }
    for i in 0..5000 {
        fs::File::create(mnt.join(format!("huge/new-{i}"))).unwrap();
    }
    assert_eq!(fs::read_dir(mnt.join("huge")).unwrap().count(), 95_000);

    // A tree as deep as paths go: 4095 bytes is the limit for a path given
    // to a system call, not for depth; descend relative to each level.
    let mut depth = 0;
    let mut dir = fs::File::open(&mnt).unwrap();
    let name = "d".repeat(200);
    loop {
        let c = std::ffi::CString::new(name.as_str()).unwrap();
        let fd = dir.as_raw_fd_for_test();
        if unsafe { libc::mkdirat(fd, c.as_ptr(), 0o755) } != 0 {
            panic!(
                "mkdirat at depth {depth}: {}",
                std::io::Error::last_os_error()
            );
        }
        let nfd = unsafe { libc::openat(fd, c.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY) };
        assert!(nfd >= 0);
        dir = unsafe { <fs::File as std::os::fd::FromRawFd>::from_raw_fd(nfd) };
        depth += 1;
        if depth == 40 {
            break; // 40 x 201 bytes: twice PATH_MAX
        }
    }
    // The full path is now longer than PATH_MAX: ENAMETOOLONG, no crash.
    let deep: PathBuf = (0..40).fold(mnt.clone(), |p, _| p.join(&name));
    assert_eq!(
        fs::metadata(&deep).unwrap_err().raw_os_error(),
        Some(libc::ENAMETOOLONG)
    );
    // Long names: 255 bytes work, 256 do not.
    fs::write(mnt.join("n".repeat(255)), "x").unwrap();
    assert_eq!(
        fs::write(mnt.join("n".repeat(256)), "x")
            .unwrap_err()
            .raw_os_error(),
        Some(libc::ENAMETOOLONG)
    );
    drop(dir);
    let pid = m.pid().unwrap();
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    drop(m);
    // The kernel agrees on the result.
    let (kwork, kmnt) = (s.dir("kwork"), s.dir("kmnt"));
    let k = Mount::kernel(std::slice::from_ref(&lower), &upper, &kwork, &kmnt);
    assert_eq!(fs::read_dir(kmnt.join("huge")).unwrap().count(), 95_000);
    drop(k);
}

trait RawFdForTest {
    fn as_raw_fd_for_test(&self) -> i32;
}

impl RawFdForTest for fs::File {
    fn as_raw_fd_for_test(&self) -> i32 {
        std::os::fd::AsRawFd::as_raw_fd(self)
    }
}

#[test]
fn running_out_of_descriptors_gives_errors_not_a_crash() {
    let s = Scratch::new("nofile");
    let lower = s.dir("lower");
    for i in 0..300 {
        fs::create_dir_all(lower.join(format!("d{i}/sub"))).unwrap();
    }
    let (upper, mnt) = (s.dir("upper"), s.dir("mnt"));
    // A daemon allowed 64 descriptors: it holds one per cached directory.
    let mut child = Command::new("prlimit")
        .args(["--nofile=64:64", "--"])
        .arg(bin())
        .arg("mount")
        .arg(&lower)
        .arg(&upper)
        .arg(&mnt)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !is_mounted(&mnt) {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            umount_lazy(self.0);
        }
    }
    let _u = Unmount(&mnt);
    let mut errors = 0;
    let mut held = Vec::new();
    for i in 0..300 {
        match fs::File::open(mnt.join(format!("d{i}/sub"))) {
            Ok(f) => held.push(f),
            Err(e) => {
                assert!(
                    matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE)),
                    "unexpected error {e}"
                );
                errors += 1;
            }
        }
    }
    assert!(
        errors > 0,
        "64 descriptors were enough for 600 directories?"
    );
    // Let go: the kernel forgets, the daemon closes, and all works again.
    drop(held);
    drop_caches();
    for i in 0..20 {
        assert!(
            fs::metadata(mnt.join(format!("d{i}/sub")))
                .unwrap()
                .is_dir()
        );
    }
    fs::write(mnt.join("d7/sub/file"), "ok").unwrap();
    assert!(child.try_wait().unwrap().is_none(), "the daemon died");
    assert_eq!(fs::metadata(upper.join("d7/sub/file")).unwrap().size(), 2);
    eprintln!("with 64 descriptors: {errors} of 300 opens refused with EMFILE, then recovered");
    drop(_u);
    let _ = child.wait();
}

#[test]
fn an_upper_out_of_inodes_refuses_changes_and_keeps_the_view() {
    let s = Scratch::new("noinodes");
    let l = s.dir("l");
    for name in ["a", "b", "c"] {
        write(&l.join(format!("dir/{name}")), name);
    }
    // A tmpfs upper with room for very few inodes.
    let upfs = Tmpfs::mount(s.dir("upfs"), "size=8m,nr_inodes=16");
    let (upper, work, mnt) = (upfs.upper(), upfs.work(), s.dir("mnt"));
    let wd = format!("workdir={}", work.display());
    let m = Mount::unionfs(std::slice::from_ref(&l), &upper, &mnt, &[&wd]);
    let mut made = 0;
    let full = loop {
        match fs::write(mnt.join(format!("fill{made}")), "x") {
            Ok(()) => made += 1,
            Err(e) => break e,
        }
        assert!(made < 100, "the inode limit was not reached");
    };
    assert_eq!(full.raw_os_error(), Some(libc::ENOSPC));
    let before = snapshot(&mnt, View::Merged);
    let enospc = |r: std::io::Result<()>, what: &str| {
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::ENOSPC), "{what}");
    };
    // Each needs a new inode in the upper: refused, and nothing changes.
    enospc(
        fs::remove_file(mnt.join("dir/a")),
        "unlink needing a whiteout",
    );
    enospc(fs::create_dir(mnt.join("newdir")), "mkdir");
    enospc(
        std::os::unix::fs::symlink("x", mnt.join("newlink")),
        "symlink",
    );
    enospc(
        fs::rename(mnt.join("dir/b"), mnt.join("dir/b2")),
        "rename of a lower file",
    );
    enospc(fs::write(mnt.join("dir/c"), "changed"), "copy-up");
    let after = snapshot(&mnt, View::Merged);
    let d = diff("before", &before, "after", &after);
    assert!(d.is_empty(), "a refused change left traces:\n{d}");
    assert_eq!(fs::read_dir(work.join("work")).unwrap().count(), 0);
    // Space freed: all of it works.
    for i in 0..made {
        fs::remove_file(mnt.join(format!("fill{i}"))).unwrap();
    }
    fs::remove_file(mnt.join("dir/a")).unwrap();
    fs::rename(mnt.join("dir/b"), mnt.join("dir/b2")).unwrap();
    fs::write(mnt.join("dir/c"), "changed").unwrap();
    assert_eq!(fs::read_to_string(mnt.join("dir/c")).unwrap(), "changed");
    assert!(!mnt.join("dir/a").exists() && mnt.join("dir/b2").exists());
    drop(m);
    eprintln!(
        "inode-full upper: 5 kinds of change refused with ENOSPC, view unchanged, then all worked"
    );
}

// ---- the index at the worst moments ----

/// A union over a lower file of three names (two directories), with a
/// work directory the kernel can share.
struct Linked {
    _scratch: Scratch,
    lowers: Vec<PathBuf>,
    upper: PathBuf,
    work: PathBuf,
    mnt: PathBuf,
}

impl Linked {
    fn new(tag: &str) -> Linked {
        let s = Scratch::new(tag);
        let l = s.dir("lower");
        write(&l.join("a"), "lower data\n");
        fs::create_dir(l.join("d")).unwrap();
        fs::hard_link(l.join("a"), l.join("b")).unwrap();
        fs::hard_link(l.join("a"), l.join("d/c")).unwrap();
        Linked {
            lowers: vec![l],
            upper: s.dir("upper"),
            work: s.dir("work"),
            mnt: s.dir("mnt"),
            _scratch: s,
        }
    }

    fn mount(&self, crash_at: Option<&str>) -> Mount {
        let wd = format!("workdir={}", self.work.display());
        let env: Vec<(&str, &str)> = crash_at
            .map(|p| ("UNIONFS_CRASH_AT", p))
            .into_iter()
            .collect();
        Mount::unionfs_env(&self.lowers, &self.upper, &self.mnt, &[&wd], &env)
    }

    /// Runs `script` in the mount; true if it succeeded.
    fn sh(&self, script: &str) -> bool {
        Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(&self.mnt)
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
    }

    /// Runs `script` in a mount whose daemon kills itself at `point`, and
    /// checks that it did.
    fn crash(&self, point: &str, script: &str) {
        let m = self.mount(Some(point));
        assert!(
            !self.sh(script),
            "{point}: `{script}` survived the crash point"
        );
        umount_lazy(&self.mnt);
        let status = m.unmount();
        assert!(
            status.is_some_and(|s| !s.success()),
            "{point}: the daemon did not die: {status:?}"
        );
    }

    /// Each name's content, link count and inode number (without unionfs's
    /// slot bits), with the merged view; under unionfs, then under the
    /// kernel with the same upper and work directories, which must agree.
    fn agreed_view(&self, what: &str) -> Vec<(String, String, u64, u64)> {
        let names = |root: &Path| -> Vec<(String, String, u64, u64)> {
            ["a", "b", "d/c"]
                .iter()
                .filter_map(|n| {
                    let m = fs::symlink_metadata(root.join(n)).ok()?;
                    let data = fs::read_to_string(root.join(n)).unwrap();
                    Some((n.to_string(), data, m.nlink(), m.ino() & ((1 << 48) - 1)))
                })
                .collect()
        };
        let m = self.mount(None);
        let ours = (names(&self.mnt), snapshot(&self.mnt, View::Merged));
        drop(m);
        let k = Mount::kernel(&self.lowers, &self.upper, &self.work, &self.mnt);
        let kernel = (names(&self.mnt), snapshot(&self.mnt, View::Merged));
        drop(k);
        assert_eq!(
            ours.0, kernel.0,
            "{what}: the names differ (unionfs, kernel)"
        );
        let d = diff("unionfs", &ours.1, "kernel", &kernel.1);
        assert!(d.is_empty(), "{what}: views differ:\n{d}");
        ours.0
    }

    /// The index entries left (temporary names aside).
    fn index_entries(&self) -> usize {
        fs::read_dir(self.work.join("index"))
            .map(|d| {
                d.filter(|e| {
                    !e.as_ref()
                        .unwrap()
                        .file_name()
                        .to_string_lossy()
                        .starts_with('#')
                })
                .count()
            })
            .unwrap_or(0)
    }
}

#[test]
fn a_kill_between_the_index_copy_and_the_link_up_leaves_one_inode() {
    if index_unavailable("a_kill_between_the_index_copy_and_the_link_up_leaves_one_inode") {
        return;
    }
    let l = Linked::new("crash-linkup");
    l.crash("before-link-up", "echo new >> a");
    // The copy is in the index, no name is linked to it: every name shows
    // it (with the lower data: the write never happened), as one inode.
    let names = l.agreed_view("killed before the link-up");
    assert_eq!(names.len(), 3);
    assert!(
        names
            .iter()
            .all(|n| n.1 == "lower data\n" && n.2 == 3 && n.3 == names[0].3),
        "{names:?}"
    );
    assert_eq!(l.index_entries(), 1);
    // Going on from there links the name up as if nothing had happened.
    let m = l.mount(None);
    assert!(l.sh("echo new >> a && rm b"));
    drop(m);
    let names = l.agreed_view("written after the kill");
    assert!(
        names.iter().all(|n| n.1 == "lower data\nnew\n" && n.2 == 2),
        "{names:?}"
    );
}

#[test]
fn a_kill_between_the_last_unlink_and_the_index_cleanup_leaves_no_file() {
    if index_unavailable("a_kill_between_the_last_unlink_and_the_index_cleanup_leaves_no_file") {
        return;
    }
    let l = Linked::new("crash-cleanup");
    let m = l.mount(None);
    assert!(l.sh("echo new >> a && rm b"));
    drop(m);
    assert_eq!(l.index_entries(), 1);
    // `d/c` goes for good; `a` is the last name, and the daemon dies
    // before its index entry goes.
    let m = l.mount(None);
    assert!(l.sh("rm d/c"));
    drop(m);
    l.crash("before-index-cleanup", "rm a");
    // Both the kernel and unionfs see no name, and clean the orphan at mount.
    assert_eq!(l.agreed_view("killed before the cleanup"), vec![]);
    assert_eq!(l.index_entries(), 0, "the orphaned entry stays");
}

/// `metacopy=on`: a kill after the data of a metadata-only copy was
/// written in place but before its mark went leaves a metadata-only copy
/// that still reads the lower data, under unionfs and under the kernel; the
/// next write through the union finishes the copy.
#[test]
fn a_kill_during_the_data_copy_up_leaves_a_metadata_only_copy() {
    let s = Scratch::new("crash-metacopy");
    let lower = s.dir("lower");
    write(&lower.join("f"), "lower data\n");
    let lowers = vec![lower];
    let (upper, work, mnt) = (s.dir("upper"), s.dir("work"), s.dir("mnt"));
    let wd = format!("workdir={}", work.display());
    let opts = ["metacopy=on", wd.as_str()];
    let m = Mount::unionfs(&lowers, &upper, &mnt, &opts);
    std::os::unix::fs::chown(mnt.join("f"), Some(1234), None).unwrap();
    drop(m);
    let marked = || lgetxattr(&upper.join("f"), "trusted.overlay.metacopy").is_some();
    assert!(marked(), "chown with metacopy=on copies metadata only");
    let env = [("UNIONFS_CRASH_AT", "before-data-marked")];
    let m = Mount::unionfs_env(&lowers, &upper, &mnt, &opts, &env);
    let wrote = Command::new("sh")
        .arg("-c")
        .arg("echo new >> f")
        .current_dir(&mnt)
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(!wrote, "the write survived the crash point");
    umount_lazy(&mnt);
    assert!(
        m.unmount().is_some_and(|s| !s.success()),
        "the daemon did not die"
    );
    assert!(marked(), "the mark goes only after the data is in place");
    let view = |root: &Path| {
        let m = fs::metadata(root.join("f")).unwrap();
        (
            fs::read_to_string(root.join("f")).unwrap(),
            m.uid(),
            m.len(),
        )
    };
    let expected = ("lower data\n".to_string(), 1234, 11);
    let m = Mount::unionfs(&lowers, &upper, &mnt, &opts);
    assert_eq!(view(&mnt), expected, "unionfs after the kill");
    drop(m);
    let all = Features::all();
    let k = Mount::kernel_with(&lowers, &upper, &work, &mnt, all);
    assert_eq!(view(&mnt), expected, "the kernel after the kill");
    drop(k);
    let m = Mount::unionfs(&lowers, &upper, &mnt, &opts);
    fs::OpenOptions::new()
        .append(true)
        .open(mnt.join("f"))
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"new\n"))
        .unwrap();
    assert_eq!(
        fs::read_to_string(mnt.join("f")).unwrap(),
        "lower data\nnew\n"
    );
    drop(m);
    assert!(!marked());
    assert_eq!(
        fs::read_to_string(upper.join("f")).unwrap(),
        "lower data\nnew\n"
    );
}
