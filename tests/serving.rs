//! The serving loop: every caller gets its answer, whatever happens to the
//! daemon or the mount meanwhile; a slow request does not hold up the
//! others; an idle mount costs no CPU.

mod common;

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A lower layer with a large file, whose copy-up takes a while.
fn layers_with_a_large_file(s: &Scratch, mib: usize) -> Vec<std::path::PathBuf> {
    let lower = s.dir("lower");
    let chunk = vec![7u8; 1 << 20];
    let mut f = fs::File::create(lower.join("large")).unwrap();
    for _ in 0..mib {
        std::io::Write::write_all(&mut f, &chunk).unwrap();
    }
    fs::write(lower.join("small"), "small\n").unwrap();
    vec![lower]
}

/// The on-CPU time of every thread of `pid`, in ns (schedstat).
fn cpu_ns(pid: u32) -> u64 {
    fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

fn busy_callers(mnt: &Path, n: usize) -> Vec<Child> {
    (0..n)
        .map(|i| {
            let script = format!(
                "set -e; i=0; while :; do echo x > {m}/c{i}-$i; cat {m}/c{i}-$i > /dev/null; \
                 ls {m} > /dev/null; rm {m}/c{i}-$i; i=$((i+1)); done",
                m = mnt.display()
            );
            Command::new("sh")
                .args(["-c", &script])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect()
}

/// SIGKILL of the daemon while callers keep it busy: the kernel answers
/// their pending requests with an error, and every caller comes back.
#[test]
fn a_killed_daemon_under_load_leaves_no_caller_hung() {
    let s = Scratch::new("serve-kill");
    let lowers = layers_with_a_large_file(&s, 1);
    let (upper, mnt) = (s.dir("upper"), s.dir("mnt"));
    let m = Mount::unionfs(&lowers, &upper, &mnt, &[]);
    let callers = busy_callers(&mnt, 4);
    std::thread::sleep(Duration::from_millis(300));
    unsafe { libc::kill(m.pid().unwrap() as i32, libc::SIGKILL) };
    for c in callers {
        let out = wait_output(c, Duration::from_secs(10));
        assert!(!out.status.success(), "a caller of a dead daemon succeeded");
    }
    drop(m);
    assert!(!is_mounted(&mnt));
}

/// The mount detached while a slow request (a large copy-up) is in flight:
/// the request is answered, its caller succeeds, and the daemon ends
/// cleanly once its last user lets go.
#[test]
fn an_unmount_with_a_request_in_flight_answers_it() {
    let s = Scratch::new("serve-umount");
    let lowers = layers_with_a_large_file(&s, 256);
    let (upper, mnt) = (s.dir("upper"), s.dir("mnt"));
    let mut m = Mount::unionfs(&lowers, &upper, &mnt, &[]);
    drop_caches();
    let large = mnt.join("large");
    let writer =
        std::thread::spawn(move || fs::OpenOptions::new().write(true).open(&large).map(drop));
    std::thread::sleep(Duration::from_millis(30));
    umount_lazy(&mnt);
    writer
        .join()
        .unwrap()
        .expect("the copy-up in flight was answered");
    let child = m.child.as_mut().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "the daemon did not end");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "daemon: {status:?}");
    assert_eq!(fs::metadata(upper.join("large")).unwrap().len(), 256 << 20);
}

/// While one caller waits for a long copy-up, another's stat is answered
/// (by another serving thread): it finishes first.
#[test]
fn a_slow_request_does_not_hold_up_the_others() {
    let s = Scratch::new("serve-slow");
    let lowers = layers_with_a_large_file(&s, 512);
    let (upper, mnt) = (s.dir("upper"), s.dir("mnt"));
    let _m = Mount::unionfs(&lowers, &upper, &mnt, &[]);
    drop_caches();
    let large = mnt.join("large");
    let started = Instant::now();
    let writer = std::thread::spawn(move || {
        fs::OpenOptions::new().write(true).open(&large).unwrap();
        started.elapsed()
    });
    std::thread::sleep(Duration::from_millis(20));
    let mut stats = Vec::new();
    for i in 0..5 {
        let p = mnt.join(format!("meanwhile-{i}"));
        fs::write(&p, "x").unwrap();
        stats.push(fs::metadata(&p).map(|_| started.elapsed()).unwrap());
    }
    let copied = writer.join().unwrap();
    let last_stat = *stats.last().unwrap();
    assert!(
        last_stat < copied,
        "the others waited for the copy-up: done at {last_stat:?}, copy-up at {copied:?}"
    );
}

/// A caller interrupted by a signal while its request is served still gets
/// the answer (the daemon answers INTERRUPT with ENOSYS: the kernel then
/// waits for the request itself), and the daemon goes on serving.
#[test]
fn an_interrupted_caller_is_answered() {
    let s = Scratch::new("serve-intr");
    let lowers = layers_with_a_large_file(&s, 256);
    let (upper, mnt) = (s.dir("upper"), s.dir("mnt"));
    let _m = Mount::unionfs(&lowers, &upper, &mnt, &[]);
    drop_caches();
    let script = "import os, signal, sys\n\
                  signal.signal(signal.SIGUSR1, lambda *a: None)\n\
                  print('ready', flush=True)\n\
                  fd = os.open(sys.argv[1], os.O_WRONLY)\n\
                  print('opened')\n";
    let mut child = Command::new("python3")
        .args(["-c", script])
        .arg(mnt.join("large"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert_eq!(line, "ready\n");
    // Signalled once it waits in the open of the large file.
    let deadline = Instant::now() + Duration::from_secs(10);
    let syscall = format!("/proc/{}/syscall", child.id());
    while !fs::read_to_string(&syscall).is_ok_and(|s| s.starts_with("257 ")) {
        assert!(
            Instant::now() < deadline,
            "the caller never waited in openat"
        );
        std::thread::yield_now();
    }
    for _ in 0..5 {
        unsafe { libc::kill(child.id() as i32, libc::SIGUSR1) };
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = wait_output(child, Duration::from_secs(60));
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    assert_eq!(rest, "opened\n", "{}", text(&out.stderr));
    assert!(out.status.success());
    assert_eq!(fs::read_to_string(mnt.join("small")).unwrap(), "small\n");
}

/// Polling between requests stops when they stop: over a second of an idle
/// mount right after a burst of requests, the daemon uses next to no CPU.
#[test]
fn an_idle_mount_uses_no_cpu() {
    let s = Scratch::new("serve-idle");
    let lowers = layers_with_a_large_file(&s, 1);
    let (upper, mnt) = (s.dir("upper"), s.dir("mnt"));
    let m = Mount::unionfs_env(&lowers, &upper, &mnt, &["spin=1000"], &[]);
    let pid = m.pid().unwrap();
    for i in 0..2000 {
        let _ = fs::metadata(mnt.join(format!("nothing-{i}")));
    }
    std::thread::sleep(Duration::from_millis(200));
    let before = cpu_ns(pid);
    std::thread::sleep(Duration::from_secs(1));
    let used = Duration::from_nanos(cpu_ns(pid) - before);
    assert!(
        used < Duration::from_millis(20),
        "an idle daemon used {used:?} of CPU in 1 s"
    );
}
