//! Reliability and containment: read-only lowers, layers changed under the
//! daemon's feet, and descriptors and memory that stay flat under load.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use common::*;

fn fd_count(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

fn rss_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[test]
fn lowers_on_a_read_only_bind_mount_work_fully() {
    let s = Scratch::new("rolower");
    let lowers = standard_lowers(&s);
    // Bind each lower read-only onto itself: any write to it would fail.
    struct Unbind(Vec<std::path::PathBuf>);
    impl Drop for Unbind {
        fn drop(&mut self) {
            for p in &self.0 {
                umount_lazy(p);
            }
        }
    }
    for l in &lowers {
        assert!(
            Command::new("mount")
                .args(["--bind"])
                .arg(l)
                .arg(l)
                .status()
                .unwrap()
                .success()
        );
        assert!(
            Command::new("mount")
                .args(["-o", "remount,bind,ro"])
                .arg(l)
                .status()
                .unwrap()
                .success()
        );
    }
    let unbind = Unbind(lowers.clone());
    let mut f = Fixture::over(s, lowers);
    fs::write(f.p("bottom-only"), "changed").unwrap();
    fs::remove_dir_all(f.p("merged")).unwrap();
    fs::rename(f.p("top-only"), f.p("dir/moved")).unwrap();
    set_xattr(&f.p("shadowed"), "user.x", b"1");
    assert_eq!(fs::read_to_string(f.p("bottom-only")).unwrap(), "changed");
    assert_eq!(fs::read_to_string(f.p("dir/moved")).unwrap(), "top\n");
    f.assert_lowers_untouched();
    // The read-only binds go before the scratch directory is removed (a
    // removal through them fails and would leave the directory behind).
    f.unmount();
    drop(unbind);
    let scratch = f.scratch.path.clone();
    drop(f);
    assert!(!scratch.exists(), "{} left behind", scratch.display());
}

#[test]
fn an_upper_directory_swapped_for_a_symlink_is_not_followed() {
    let f = Fixture::new("swap");
    let outside = f.scratch.dir("outside");
    fs::create_dir(f.p("work")).unwrap();
    fs::write(f.p("work/a"), "a").unwrap();
    // Someone with access to the upper directory swaps the directory the
    // daemon holds for a symlink pointing elsewhere.
    fs::rename(f.up("work"), f.up("work.moved")).unwrap();
    std::os::unix::fs::symlink(&outside, f.up("work")).unwrap();
    let _ = fs::write(f.p("work/b"), "b");
    assert!(
        fs::read_dir(&outside).unwrap().next().is_none(),
        "the daemon wrote through the symlink"
    );
    // A symlink in a lower layer is shown as a symlink, never resolved by the
    // daemon: copying it up copies the link itself.
    set_xattr(&f.p("evil"), "trusted.test", b"1");
    assert_eq!(
        fs::read_link(f.up("evil")).unwrap(),
        Path::new("/etc/shadow")
    );
    let shadow = fs::symlink_metadata("/etc/shadow").unwrap();
    assert_eq!(lgetxattr(Path::new("/etc/shadow"), "trusted.test"), None);
    assert_eq!(
        fs::symlink_metadata("/etc/shadow").unwrap().mtime(),
        shadow.mtime()
    );
}

#[test]
fn a_lower_changed_while_mounted_does_not_break_the_daemon() {
    let f = Fixture::new("lowerchange");
    let listing = fs::read_dir(f.p("merged")).unwrap().count();
    assert!(listing > 0);
    // A contract breach: the lower layers change under the mount.
    fs::remove_dir_all(f.lowers[1].join("merged/deep")).unwrap();
    fs::write(f.lowers[1].join("merged/new"), "n").unwrap();
    fs::remove_file(f.lowers[1].join("bottom-only")).unwrap();
    // At worst stale data or an error; the daemon answers and stays up.
    let _ = fs::read_to_string(f.p("bottom-only"));
    let _ = fs::read_dir(f.p("merged")).map(|d| d.count());
    let _ = fs::metadata(f.p("merged/deep/file"));
    let _ = fs::write(f.p("merged/deep/file"), "x");
    fs::write(f.p("still-works"), "yes").unwrap();
    assert_eq!(fs::read_to_string(f.p("still-works")).unwrap(), "yes");
    let pid = f.mount.as_ref().unwrap().pid().unwrap();
    assert!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "the daemon died"
    );
}

#[test]
fn descriptors_and_memory_stay_flat_under_load() {
    let f = Fixture::new("flat");
    let pid = f.mount.as_ref().unwrap().pid().unwrap();
    let round = |n: usize| {
        for i in 0..n {
            let p = f.p(&format!("dir/f{}", i % 50));
            fs::write(&p, "data").unwrap();
            fs::rename(&p, f.p("dir/renamed")).unwrap();
            let _ = fs::metadata(f.p("dir/sub/leaf"));
            fs::remove_file(f.p("dir/renamed")).unwrap();
            fs::create_dir(f.p("dir/d")).unwrap();
            fs::remove_dir(f.p("dir/d")).unwrap();
        }
        drop_caches();
    };
    round(2000); // warm up: caches, thread buffers, allocator arenas
    let (fds_before, rss_before) = (fd_count(pid), rss_kib(pid));
    // Six operations a round: a million in all.
    round(170_000);
    let (fds_after, rss_after) = (fd_count(pid), rss_kib(pid));
    eprintln!(
        "daemon fds {fds_before} -> {fds_after}, RSS {rss_before} KiB -> {rss_after} KiB over 1.02M operations"
    );
    assert!(
        fds_after <= fds_before + 4,
        "descriptors grew: {fds_before} -> {fds_after}"
    );
    assert!(
        rss_after <= rss_before + 4096,
        "memory grew: {rss_before} KiB -> {rss_after} KiB"
    );
}

#[test]
fn directories_swapped_for_symlinks_during_operations_never_lead_outside() {
    let f = Fixture::new("swaprace");
    let canary = f.scratch.dir("canary");
    fs::write(canary.join("leaf"), "canary\n").unwrap();
    fs::create_dir(canary.join("sub")).unwrap();
    let before = snapshot(&canary, View::Upper);
    // Through the mount: copy-ups, creations, reads and listings under
    // dir/sub (from a lower) and work/ (in the upper), by an ordinary user
    // (a process that follows a symlink shown in the union reaches its
    // target with its own rights, as on any filesystem: the canary, root's,
    // is out of its reach, so only the daemon could change it).
    for p in [f.lowers[1].join("dir"), f.lowers[1].join("dir/sub")] {
        fs::set_permissions(&p, fs::Permissions::from_mode(0o777)).unwrap();
    }
    fs::set_permissions(
        f.lowers[1].join("dir/sub/leaf"),
        fs::Permissions::from_mode(0o666),
    )
    .unwrap();
    fs::create_dir(f.p("work")).unwrap();
    fs::set_permissions(f.p("work"), fs::Permissions::from_mode(0o777)).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let worker = {
        let (mnt, stop) = (f.mnt.clone(), stop.clone());
        std::thread::spawn(move || {
            // This thread alone (raw system calls: glibc would change every
            // thread) becomes nobody.
            unsafe {
                assert_eq!(
                    libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()),
                    0
                );
                assert_eq!(libc::syscall(libc::SYS_setresgid, 65534, 65534, 65534), 0);
                assert_eq!(libc::syscall(libc::SYS_setresuid, 65534, 65534, 65534), 0);
            }
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = fs::write(mnt.join("dir/sub/leaf"), format!("{i}"));
                let _ = fs::write(mnt.join(format!("dir/sub/new{}", i % 7)), "n");
                let _ = fs::write(mnt.join(format!("work/f{}", i % 7)), "w");
                let _ = fs::read_to_string(mnt.join("dir/sub/leaf"));
                let _ = fs::read_dir(mnt.join("dir/sub")).map(|d| d.count());
                let _ = fs::remove_file(mnt.join(format!("work/f{}", (i + 3) % 7)));
                set_xattr_ignoring(&mnt.join("dir/sub/leaf"), "user.x");
                i += 1;
            }
            i
        })
    };
    // Meanwhile someone with access to the layers swaps the directories for
    // symlinks to the canary, and back, as fast as they can.
    let lower_dir = f.lowers[1].join("dir/sub");
    let upper_dir = f.up("work");
    let mut swaps = 0;
    let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::time::Instant::now() < end {
        for d in [&lower_dir, &upper_dir] {
            let aside = d.with_extension("aside");
            if fs::rename(d, &aside).is_ok() {
                std::os::unix::fs::symlink(&canary, d).unwrap();
                std::thread::yield_now();
                fs::remove_file(d).unwrap();
                fs::rename(&aside, d).unwrap();
                swaps += 1;
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let ops = worker.join().unwrap();
    let after = snapshot(&canary, View::Upper);
    let d = diff("before", &before, "after", &after);
    assert!(d.is_empty(), "the daemon reached outside its layers:\n{d}");
    let pid = f.mount.as_ref().unwrap().pid().unwrap();
    assert!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "the daemon died"
    );
    eprintln!("{swaps} directory swaps during {ops} operation rounds: nothing outside touched");
}

fn set_xattr_ignoring(p: &Path, name: &str) {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    unsafe { libc::lsetxattr(c.as_ptr(), n.as_ptr(), b"1".as_ptr().cast(), 1, 0) };
}
