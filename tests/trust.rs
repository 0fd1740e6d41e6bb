//! The work directory as an attack surface: what the daemon makes there is
//! private to the mounting user, a work directory another user could write
//! is refused (or, when it is the user's own default one, closed), `nobody`
//! gets nowhere in it before, during and between mounts, and a mount right
//! after an unmount waits for the old daemon instead of failing.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;

const NOBODY: u32 = 65534;

fn unionfs(args: &[&Path]) -> Output {
    Command::new(bin())
        .arg("mount")
        .args(args)
        .env("RUST_LOG", "unionfs=info")
        .output()
        .unwrap()
}

fn mode_and_owner(p: &Path) -> (u32, u32) {
    let m = fs::symlink_metadata(p).unwrap();
    (m.mode() & 0o7777, m.uid())
}

/// Every attempt `nobody` makes on the work directory, with its result:
/// each must fail.
fn nobody_attacks(wd: &Path) -> Vec<String> {
    let w = wd.display();
    let attempts = [
        format!("ls {w}"),
        format!("touch {w}/planted"),
        format!("mkdir {w}/index"),
        format!("mv {w}/work {w}/stolen"),
        format!("touch {w}/work/planted"),
        format!("ln -s / {w}/work/escape"),
        format!("rm -rf {w}/work"),
        format!("echo 0 > {w}/unionfs.holder"),
        format!("chmod 777 {w}"),
    ];
    attempts
        .iter()
        .map(|a| {
            let out = as_user(NOBODY, NOBODY, a);
            format!(
                "{a}: {}",
                if out.status.success() {
                    "DONE"
                } else {
                    "refused"
                }
            )
        })
        .collect()
}

fn all_refused(attempts: &[String]) {
    let done: Vec<_> = attempts.iter().filter(|a| a.ends_with("DONE")).collect();
    assert!(done.is_empty(), "nobody got through: {done:?}");
}

/// A world-writable sticky parent (as /tmp) holding lower, upper and mount
/// point, so that `nobody` can reach the default work directory's place.
fn open_parent(s: &Scratch) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
    let parent = s.dir("shared");
    fs::set_permissions(&s.path, fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(&parent, fs::Permissions::from_mode(0o1777)).unwrap();
    let (l, u, m) = (parent.join("l"), parent.join("u"), parent.join("m"));
    for d in [&l, &u, &m] {
        fs::create_dir(d).unwrap();
    }
    fs::write(l.join("f"), "lower").unwrap();
    let wd = parent.join(".u.unionfs-work");
    (l, u, m, wd)
}

#[test]
fn the_work_directory_is_private_before_during_and_between_mounts() {
    let s = Scratch::new("private");
    let (l, u, m, wd) = open_parent(&s);
    let mount = Mount::unionfs(std::slice::from_ref(&l), &u, &m, &[]);
    assert_eq!(mode_and_owner(&wd), (0o700, 0), "work directory");
    assert_eq!(mode_and_owner(&wd.join("work")), (0o700, 0), "work/");
    assert_eq!(
        mode_and_owner(&wd.join("unionfs.holder")),
        (0o600, 0),
        "holder file"
    );
    all_refused(&nobody_attacks(&wd));
    // A copy-up still works, and is built where nobody could reach.
    fs::write(m.join("f"), "changed").unwrap();
    assert_eq!(fs::read_to_string(u.join("f")).unwrap(), "changed");
    drop(mount);
    all_refused(&nobody_attacks(&wd));
    let again = Mount::unionfs(std::slice::from_ref(&l), &u, &m, &[]);
    assert_eq!(mode_and_owner(&wd.join("work")), (0o700, 0));
    drop(again);
}

/// One refused mount: exit 2, one line naming the problem and its remedy,
/// nothing mounted, nothing of the work directory changed.
fn refused(args: &[&Path], m: &Path, wd: &Path, says: &[&str]) {
    let before = fs::symlink_metadata(wd).map(|m| (m.mode(), m.uid())).ok();
    let out = unionfs(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    for s in says {
        assert!(err.contains(s), "{s:?} not in: {err}");
    }
    assert!(!is_mounted(m));
    let after = fs::symlink_metadata(wd).map(|m| (m.mode(), m.uid())).ok();
    assert_eq!(before, after, "the work directory was changed");
}

#[test]
fn work_directories_others_control_are_refused() {
    let s = Scratch::new("untrusted");
    let (l, u, m, wd) = open_parent(&s);
    // nobody prepared the default work directory before root mounts.
    let out = as_user(NOBODY, NOBODY, &format!("mkdir -m 700 {}", wd.display()));
    assert!(out.status.success());
    refused(&[&l, &u, &m], &m, &wd, &["owned by uid 65534", "remove it"]);
    fs::remove_dir(&wd).unwrap();
    // ... or a symlink to a directory of its own.
    let theirs = s.path.join("shared/theirs");
    as_user(
        NOBODY,
        NOBODY,
        &format!("mkdir {0} && ln -s {0} {1}", theirs.display(), wd.display()),
    );
    refused(&[&l, &u, &m], &m, &wd, &["not a directory", "remove it"]);
    fs::remove_file(&wd).unwrap();
    // A directory of root's own, but open to everyone.
    let explicit = s.dir("w");
    fs::set_permissions(&explicit, fs::Permissions::from_mode(0o777)).unwrap();
    let opt = format!("workdir={}", explicit.display());
    let o = Path::new("-o");
    let opt = Path::new(&opt);
    refused(
        &[o, opt, &l, &u, &m],
        &m,
        &explicit,
        &["writable by group or others", "chmod go-w"],
    );
    // Closed, but nobody's.
    fs::set_permissions(&explicit, fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::chown(&explicit, Some(NOBODY), Some(NOBODY)).unwrap();
    refused(
        &[o, opt, &l, &u, &m],
        &m,
        &explicit,
        &["owned by uid 65534"],
    );
    // Root's and closed, but its `work` is nobody's.
    std::os::unix::fs::chown(&explicit, Some(0), Some(0)).unwrap();
    fs::create_dir(explicit.join("work")).unwrap();
    std::os::unix::fs::chown(explicit.join("work"), Some(NOBODY), Some(NOBODY)).unwrap();
    refused(
        &[o, opt, &l, &u, &m],
        &m,
        &explicit,
        &["work is owned by uid 65534", "remove it"],
    );
    fs::remove_dir(explicit.join("work")).unwrap();
    // The fuse-overlayfs form refuses the same way (its exit code is 1).
    fs::set_permissions(&explicit, fs::Permissions::from_mode(0o777)).unwrap();
    let out = compat_mount(&l, &u, &explicit, &m);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("chmod go-w"), "{err}");
    assert!(!is_mounted(&m));
}

#[test]
fn an_open_default_work_directory_of_ones_own_is_closed() {
    let s = Scratch::new("repair");
    let (l, u, m, wd) = open_parent(&s);
    // What earlier versions left: root's, mode 0777.
    fs::create_dir_all(wd.join("work/leftover")).unwrap();
    fs::set_permissions(&wd, fs::Permissions::from_mode(0o777)).unwrap();
    let mount = Mount::unionfs(std::slice::from_ref(&l), &u, &m, &[]);
    assert_eq!(mode_and_owner(&wd), (0o700, 0));
    assert!(!wd.join("work/leftover").exists(), "work/ made afresh");
    let log = mount.log_text();
    assert!(log.contains("open to other users"), "{log}");
    all_refused(&nobody_attacks(&wd));
    drop(mount);
}

/// `nobody` hammers the work directory while root copies up a large
/// set-user-id root file: the upper gets the lower's bytes, owner and mode,
/// and nothing nobody tried went through.
#[test]
fn a_set_user_id_copy_up_while_nobody_races_on_the_work_directory() {
    let s = Scratch::new("suidrace");
    let (l, u, m, wd) = open_parent(&s);
    let big: Vec<u8> = (0..64u32 << 20).map(|i| (i % 251) as u8).collect();
    fs::write(l.join("su"), &big).unwrap();
    fs::set_permissions(l.join("su"), fs::Permissions::from_mode(0o4755)).unwrap();
    let mount = Mount::unionfs(std::slice::from_ref(&l), &u, &m, &[]);
    let w = wd.display();
    let racer = Command::new("setpriv")
        .args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
            "sh",
            "-c",
            &format!(
                "n=0; end=$(($(date +%s) + 3)); while [ $(date +%s) -lt $end ]; do \
                 for f in {w}/work/*; do ln -sf /etc/shadow \"$f\" 2>/dev/null && n=$((n+1)); \
                 mv \"$f\" {w}/x 2>/dev/null && n=$((n+1)); done; \
                 touch {w}/work/planted 2>/dev/null && n=$((n+1)); done; echo $n"
            ),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    set_xattr(&m.join("su"), "user.copied", b"1");
    let out = racer.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "0",
        "nobody succeeded"
    );
    drop(mount);
    let st = fs::symlink_metadata(u.join("su")).unwrap();
    assert!(st.file_type().is_file());
    assert_eq!((st.mode() & 0o7777, st.uid(), st.gid()), (0o4755, 0, 0));
    assert!(
        fs::read(u.join("su")).unwrap() == big,
        "the copy's bytes differ"
    );
}

/// Container engines unmount and mount the same upper again at once: the
/// new mount waits for the old daemon (bounded) instead of failing.
#[test]
fn a_mount_right_after_an_unmount_waits_for_the_old_daemon() {
    let s = Scratch::new("remount");
    let (l, u, m) = (s.dir("l"), s.dir("u"), s.dir("m"));
    for i in 0..100 {
        write(&l.join(format!("d/f{i}")), &"x".repeat(100_000));
    }
    for round in 0..15 {
        let mount = Mount::unionfs(std::slice::from_ref(&l), &u, &m, &[]);
        // Keep the daemon busy up to the unmount.
        let busy = {
            let m = m.clone();
            std::thread::spawn(move || {
                for i in 0..100 {
                    let _ = fs::write(m.join(format!("d/f{i}")), format!("round {round}"));
                }
            })
        };
        std::thread::sleep(Duration::from_millis(5));
        let _ = busy.join();
        assert!(Command::new("umount").arg(&m).status().unwrap().success());
        // Not waiting for the old daemon: mount again at once.
        let out = compat_mount(&l, &u, &s.path.join(".u.unionfs-work"), &m);
        assert!(
            out.status.success(),
            "round {round}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(Command::new("umount").arg(&m).status().unwrap().success());
        drop(mount);
    }
}

/// A daemon letting go of its work directory leaves its holder file: until
/// its exit drops the lock, a claimant reads a union that is unmounted and
/// waits (the file used to go first; a claimant in between found the lock
/// held by a holder that had not said who it is, and was refused at once,
/// as CI saw in the test above). The next holder writes its own over it; a
/// file naming a process that is gone, with the lock held, is such a
/// holder still mounting: waited for without naming the dead process.
#[test]
fn a_leaving_daemons_holder_file_stays_and_a_claimant_waits_for_the_lock() {
    let s = Scratch::new("stays");
    let (l, u, m) = (s.dir("l"), s.dir("u"), s.dir("m"));
    let holder = s.path.join(".u.unionfs-work/unionfs.holder");
    let mount = Mount::unionfs(std::slice::from_ref(&l), &u, &m, &[]);
    let pid = mount.pid().unwrap();
    let named = fs::read_to_string(&holder).unwrap();
    assert!(named.contains(&format!(" {pid} mount\n")), "{named}");
    drop(mount);
    assert_eq!(
        fs::read_to_string(&holder).ok().as_deref(),
        Some(named.as_str()),
        "the exited daemon's holder file"
    );
    let lock = lock_dir(&s.path.join(".u.unionfs-work"));
    let mut child = ChildGuard(Some(spawn_mount_logging(&l, &u, &m)));
    std::thread::sleep(Duration::from_millis(500));
    let running = child.0.as_mut().unwrap();
    assert!(
        running.try_wait().unwrap().is_none(),
        "refused instead of waiting"
    );
    assert!(!is_mounted(&m));
    drop(lock);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !is_mounted(&m) {
        assert!(
            Instant::now() < deadline,
            "never mounted once the lock went"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(Command::new("umount").arg(&m).status().unwrap().success());
    let out = wait_output(child.0.take().unwrap(), Duration::from_secs(10));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        !err.contains(&format!("pid {pid}")),
        "named the gone daemon: {err}"
    );
}

/// `unionfs mount L U M` in the background, its info log piped.
fn spawn_mount_logging(l: &Path, u: &Path, m: &Path) -> std::process::Child {
    Command::new(bin())
        .arg("mount")
        .args([l, u, m])
        .env("RUST_LOG", "unionfs=info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Kills a child left running by a failed assertion.
struct ChildGuard(Option<std::process::Child>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The wait itself, made deterministic: the test holds the work
/// directory's lock with a holder file naming a mount that no longer
/// exists; the mount waits until the lock goes, then mounts. Named by an
/// older version (a FUSE minor no mount has) and by this one (the minor of
/// a live FUSE mount, as when the next mount anywhere takes the minor the
/// holder's mount left, with a unique mount id that no mount has).
#[test]
fn a_gone_holder_is_awaited_and_a_live_one_refused_at_once() {
    let s = Scratch::new("holder");
    let (l, u, m) = (s.dir("l"), s.dir("u"), s.dir("m"));
    let other = Mount::unionfs(std::slice::from_ref(&l), &s.dir("u0"), &s.dir("m0"), &[]);
    let live_minor = fuse_minor(&s.path.join("m0"));
    let own_ns = fs::metadata("/proc/self/ns/mnt").unwrap().ino();
    let wd = s.path.join(".u.unionfs-work");
    fs::create_dir(&wd).unwrap();
    fs::set_permissions(&wd, fs::Permissions::from_mode(0o700)).unwrap();
    for holder in [
        "999999\n".to_string(),
        format!("{live_minor} {} {own_ns}\n", u64::MAX - 7),
    ] {
        fs::write(wd.join("unionfs.holder"), &holder).unwrap();
        let lock = lock_dir(&wd);
        let start = Instant::now();
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(1500));
            drop(lock);
        });
        let mount = Mount::unionfs(std::slice::from_ref(&l), &u, &m, &[]);
        let waited = start.elapsed();
        releaser.join().unwrap();
        assert!(
            waited >= Duration::from_millis(1400),
            "holder {holder:?}: did not wait: {waited:?}"
        );
        drop(mount);
    }
    // Now a live holder: a second mount is refused without waiting, and
    // told which mount it is.
    let mount = Mount::unionfs(std::slice::from_ref(&l), &u, &m, &[]);
    let m2 = s.dir("m2");
    let start = Instant::now();
    let out = unionfs(&[&l, &u, &m2]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let named = format!(
        "in use by the union mounted at {} (pid {}); unmount it first",
        m.display(),
        mount.pid().unwrap()
    );
    assert!(err.contains(&named), "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "it waited for a live mount"
    );
    drop(mount);
    drop(other);
}

/// The device minor of the FUSE mount at `mnt`, from the mount table.
fn fuse_minor(mnt: &Path) -> u32 {
    let info = common::mount_table();
    let want = mnt.to_string_lossy();
    let line = info
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(&want))
        .expect("mounted");
    let dev = line.split(' ').nth(2).unwrap();
    dev.strip_prefix("0:").unwrap().parse().unwrap()
}

fn lock_dir(p: &Path) -> fs::File {
    use std::os::fd::AsRawFd;
    let f = fs::File::open(p).unwrap();
    assert_eq!(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) }, 0);
    f
}

/// Mounts with the fuse-overlayfs command line (which daemonizes once
/// mounted) and waits for it to finish.
fn compat_mount(lower: &Path, upper: &Path, work: &Path, mnt: &Path) -> std::process::Output {
    Command::new(bin())
        .arg("-o")
        .arg(format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            work.display()
        ))
        .arg(mnt)
        .output()
        .unwrap()
}

/// A second user of an upper held by a `unionfs run` (whose union lives in
/// the launcher's own mount namespace, out of this one's sight) is told at
/// once what holds it, as `unionfs run` and as `unionfs mount`, with the
/// launcher's pid; nothing is mounted.
#[test]
fn an_upper_held_by_a_run_is_named_at_once() {
    let s = Scratch::new("heldbyrun");
    fs::set_permissions(&s.path, fs::Permissions::from_mode(0o755)).unwrap();
    let (rootfs, u, m, tmp) = (s.dir("rootfs"), s.path.join("u"), s.dir("m"), s.dir("tmp"));
    busybox_rootfs(&rootfs);
    let run = |args: &[&str]| {
        let mut c = Command::new(bin());
        c.arg("run")
            .arg("--lower")
            .arg(&rootfs)
            .arg("--upper")
            .arg(&u);
        c.args(args)
            .env("TMPDIR", &tmp)
            .stdin(std::process::Stdio::null());
        c
    };
    let mut first = run(&["--init", "--", "sleep", "30"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let holder = s.path.join(".u.unionfs-work/unionfs.holder");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !holder.exists() {
        assert!(Instant::now() < deadline, "the run never held its upper");
        std::thread::sleep(Duration::from_millis(20));
    }
    let named = format!("in use by a unionfs run (pid {})", first.id());
    let start = Instant::now();
    let second = run(&["--", "true"]).output().unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(125), "{err}");
    assert!(err.contains(&named), "{err}");
    let out = unionfs(&[&rootfs, &u, &m]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&named), "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "it waited: {:?}",
        start.elapsed()
    );
    assert!(!is_mounted(&m));
    unsafe { libc::kill(first.id() as i32, libc::SIGTERM) };
    first.wait().unwrap();
}

/// A mount waiting for the daemon of an unmounted union to let go of the
/// work directory says so, and SIGINT or SIGTERM ends the wait with exit 1
/// and nothing mounted, even once the work directory is free (before, the
/// signal waited until the union was up, which it then took down).
#[test]
fn a_wait_for_a_leaving_daemon_is_said_and_can_be_interrupted() {
    let s = Scratch::new("leaving");
    let (l, u, m) = (s.dir("l"), s.dir("u"), s.dir("m"));
    let wd = s.path.join(".u.unionfs-work");
    fs::create_dir(&wd).unwrap();
    fs::set_permissions(&wd, fs::Permissions::from_mode(0o700)).unwrap();
    // Held by this (live) process for a union no mount table lists.
    let me = std::process::id();
    fs::write(
        wd.join("unionfs.holder"),
        format!("999999 - - {me} mount\n/gone\n"),
    )
    .unwrap();
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let lock = lock_dir(&wd);
        let child = spawn_mount_logging(&l, &u, &m);
        std::thread::sleep(Duration::from_millis(400));
        let start = Instant::now();
        unsafe { libc::kill(child.id() as i32, sig) };
        std::thread::sleep(Duration::from_millis(100));
        drop(lock);
        let out = wait_output(child, Duration::from_secs(5));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "signal {sig}: {:?}",
            start.elapsed()
        );
        assert_eq!(out.status.code(), Some(1), "signal {sig}: {err}");
        assert!(
            err.contains(&format!("waiting for the daemon (pid {me}) to exit")),
            "signal {sig}: not said: {err}"
        );
        assert!(err.contains("nothing was mounted"), "signal {sig}: {err}");
        assert!(!is_mounted(&m), "signal {sig}");
    }
}
