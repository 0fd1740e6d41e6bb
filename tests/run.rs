//! `unionfs run`: containers on a busybox rootfs made here and on a real
//! Debian rootfs (debootstrap, cached under /var/tmp between runs), rootful
//! and rootless, with what must be left behind on every way out: nothing.

mod common;

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{
    Scratch, bin, busybox_rootfs, debian_rootfs, is_mounted, lgetxattr, ok, subuid_start, uid_of,
    wait_output,
};

/// A test's world: a rootfs lower, a scratch TMPDIR for the launcher.
struct World {
    s: Scratch,
    lower: PathBuf,
    tmp: PathBuf,
}

impl World {
    fn new(tag: &str) -> World {
        let s = Scratch::new(tag);
        fs::set_permissions(&s.path, fs::Permissions::from_mode(0o755)).unwrap();
        let lower = s.dir("rootfs");
        busybox_rootfs(&lower);
        let tmp = s.dir("tmp");
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o1777)).unwrap();
        World { s, lower, tmp }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin());
        c.arg("run")
            .arg("--lower")
            .arg(&self.lower)
            .args(args)
            .env("TMPDIR", &self.tmp)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null());
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        finish(
            self.cmd(args)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        )
    }

    /// Nothing of the launcher is left: no scratch directory, no mount.
    fn assert_clean(&self) {
        let left: Vec<_> = fs::read_dir(&self.tmp)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
        let info = common::mount_table();
        let tmp = self.tmp.to_string_lossy();
        assert!(!info.contains(tmp.as_ref()), "a mount is left under {tmp}");
    }
}

/// Waits for a child, killing it after a minute (a hang is a failure).
fn finish(child: Child) -> Output {
    wait_output(child, Duration::from_secs(60))
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Processes other than launchers whose command line starts with `marker`.
fn processes_with(marker: &str) -> Vec<u32> {
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() != "unionfs")
        })
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    // The command itself, not a shell whose script names it
                    // (that shell may not have set its traps yet).
                    String::from_utf8_lossy(&c)
                        .replace('\0', " ")
                        .starts_with(marker)
                })
                .unwrap_or(false)
        })
        .collect()
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_busybox_container_sees_its_own_world() {
    let w = World::new("run-basic");
    let upper = w.s.path.join("upper");
    let out = ok(&w.run(&[
        "--upper",
        upper.to_str().unwrap(),
        "--hostname",
        "box1",
        "--",
        "sh",
        "-c",
        "echo hi > /x; echo pid=$$; hostname; cat /etc/os-release; ps -o pid,args > /dev/shm/ps; wc -l < /dev/shm/ps; \
         ls /dev; grep ' / ' /proc/mounts; grep ' /sys ' /proc/mounts; echo path=$PATH",
    ]));
    assert!(out.contains("pid=1\n"), "{out}");
    assert!(out.contains("box1\n"), "{out}");
    assert!(out.contains("busybox test rootfs"), "{out}");
    // The header, sh and ps: nothing of the host. (Through a file: in a
    // pipe, wc may not have started when ps reads the process list.)
    assert!(out.contains("\n3\n"), "{out}");
    for dev in [
        "null", "zero", "full", "random", "urandom", "tty", "pts", "ptmx", "shm", "fd",
    ] {
        assert!(out.lines().any(|l| l == dev), "/dev/{dev} missing: {out}");
    }
    assert!(out.contains("unionfs / fuse.unionfs"), "{out}");
    assert!(out.contains(" /sys sysfs ro,"), "{out}");
    assert!(out.contains("path=/usr/local/sbin:"), "{out}");
    assert_eq!(fs::read_to_string(upper.join("x")).unwrap(), "hi\n");
    assert!(!w.lower.join("x").exists());
    // No mount point or old root was written into the upper.
    let names: Vec<_> = fs::read_dir(&upper)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(names, vec!["x"], "upper holds {names:?}");
    w.assert_clean();

    // The next run over the same upper sees the change.
    let out = ok(&w.run(&["--upper", upper.to_str().unwrap(), "--", "cat", "/x"]));
    assert_eq!(out, "hi\n");
    w.assert_clean();
}

#[test]
fn exit_codes_come_back() {
    let w = World::new("run-exit");
    for code in [0, 1, 42] {
        let o = w.run(&["--", "sh", "-c", &format!("exit {code}")]);
        assert_eq!(o.status.code(), Some(code), "{}", stderr(&o));
    }
    // A signal: 128+N. (PID 1 cannot kill itself, so under --init.)
    let o = w.run(&["--init", "--", "sh", "-c", "kill -TERM $$"]);
    assert_eq!(o.status.code(), Some(143), "{}", stderr(&o));
    let o = w.run(&["--", "no-such-command"]);
    assert_eq!(o.status.code(), Some(127));
    assert_eq!(
        stderr(&o),
        "unionfs run: no-such-command: not found in the container\n"
    );
    // Found in the host's PATH is not enough.
    let o = w.run(&["--", "cargo", "--version"]);
    assert_eq!(o.status.code(), Some(127), "{}", stderr(&o));
    fs::write(w.lower.join("bin/notexec"), "#!/bin/sh\n").unwrap();
    let o = w.run(&["--", "/bin/notexec"]);
    assert_eq!(o.status.code(), Some(126), "{}", stderr(&o));
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
    w.assert_clean();
}

#[test]
fn the_throwaway_upper_is_removed_and_the_lower_untouched() {
    let w = World::new("run-temp");
    let out = ok(&w.run(&[
        "--",
        "sh",
        "-c",
        "echo new > /etc/os-release; rm /bin/ls; mkdir /d; cat /etc/os-release",
    ]));
    assert_eq!(out, "new\n");
    assert!(w.lower.join("bin/ls").exists());
    assert!(
        fs::read_to_string(w.lower.join("etc/os-release"))
            .unwrap()
            .contains("busybox")
    );
    w.assert_clean();
}

/// Paths are bytes from argv to the system call. A lower directory named
/// with the byte 0xff and a colon (escaped as `\:` in the list), an upper
/// and a TMPDIR that are not UTF-8 either: `run --lower` with them,
/// `diff --lowers` of that upper, `mount` and the fuse-overlayfs form over
/// the same lower (before: clap refused `mount`'s as invalid UTF-8, `run`
/// rewrote its init layer's path in TMPDIR with U+FFFD, and the
/// fuse-overlayfs form did so to every path in `-o`).
#[test]
fn paths_that_are_not_utf8_reach_the_system_calls_unchanged() {
    use std::ffi::{OsStr, OsString};
    use std::os::unix::ffi::OsStrExt;
    let s = Scratch::new("bytes");
    fs::set_permissions(&s.path, fs::Permissions::from_mode(0o755)).unwrap();
    let odd = |name: &[u8]| {
        let p = s.path.join(OsStr::from_bytes(name));
        fs::create_dir(&p).unwrap();
        p
    };
    let lower = odd(b"root\xff:fs");
    busybox_rootfs(&lower);
    let listed = OsStr::from_bytes(&lower.as_os_str().as_bytes().iter().fold(
        Vec::new(),
        |mut v, &b| {
            if b == b':' {
                v.push(b'\\');
            }
            v.push(b);
            v
        },
    ))
    .to_os_string();
    let (tmp, upper) = (odd(b"tmp\xfe"), odd(b"up\xfd"));
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o1777)).unwrap();
    let out = Command::new(bin())
        .arg("run")
        .arg("--lower")
        .arg(&listed)
        .arg("--upper")
        .arg(&upper)
        .args([
            "--",
            "sh",
            "-c",
            "echo hi > /new && test -x /bin/sh && echo ran",
        ])
        .env("TMPDIR", &tmp)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(ok(&out), "ran\n");
    assert_eq!(fs::read(upper.join("new")).unwrap(), b"hi\n");
    let out = Command::new(bin())
        .arg("diff")
        .arg("--lowers")
        .arg(&listed)
        .arg(&upper)
        .output()
        .unwrap();
    let listing = ok(&out);
    assert!(listing.lines().any(|l| l == "A /new"), "{listing}");
    let (upper2, mnt, work) = (odd(b"u2\xfc"), odd(b"m\xfb"), odd(b"w\xfa"));
    let mut daemon = Command::new(bin())
        .arg("mount")
        .arg(&listed)
        .arg(&upper2)
        .arg(&mnt)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("mount with a lower that is not UTF-8", || {
        is_mounted(&mnt) || daemon.try_wait().unwrap().is_some()
    });
    assert!(is_mounted(&mnt), "{}", stderr(&finish(daemon)));
    assert!(mnt.join("bin/sh").exists());
    assert!(Command::new("umount").arg(&mnt).status().unwrap().success());
    finish(daemon);
    let mut opts = OsString::from("lowerdir=");
    for (part, next) in [
        (listed.as_os_str(), ",upperdir="),
        (upper2.as_os_str(), ",workdir="),
        (work.as_os_str(), ""),
    ] {
        opts.push(part);
        opts.push(next);
    }
    let out = Command::new(bin())
        .arg("-o")
        .arg(&opts)
        .arg(&mnt)
        .output()
        .unwrap();
    ok(&out);
    assert!(is_mounted(&mnt));
    assert!(mnt.join("bin/sh").exists());
    assert!(Command::new("umount").arg(&mnt).status().unwrap().success());
}

/// The upper of a run holds what the command changed and nothing the
/// launcher needed: mount points missing from the image live in the
/// launcher's own layer, gone with the run.
#[test]
fn the_upper_holds_only_what_the_command_changed() {
    let w = World::new("run-pure");
    for d in ["dev", "proc", "sys"] {
        fs::remove_dir(w.lower.join(d)).unwrap();
    }
    let upper = w.s.dir("upper");
    let data = w.s.dir("data");
    fs::write(data.join("in"), "bound\n").unwrap();
    let file = w.s.path.join("one-file");
    fs::write(&file, "file\n").unwrap();
    let (u, d, f) = (
        upper.to_str().unwrap(),
        format!("{}:/mnt/deep/data", data.display()),
        format!("{}:/etc/bound-file:ro", file.display()),
    );
    let out = ok(&w.run(&[
        "--upper", u, "--bind", &d, "--bind", &f, "--cwd", "/work/here", "--", "sh", "-c",
        "pwd; cat /mnt/deep/data/in /etc/bound-file; ls /proc/self/fd >/dev/null && ls -d /sys /dev/null",
    ]));
    assert_eq!(out, "/work/here\nbound\nfile\n/dev/null\n/sys\n");
    let left: Vec<_> = fs::read_dir(&upper)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "the upper holds {left:?}");
    // A command's own changes stay, and a second run over the same upper
    // (with the launcher's layer made anew) sees them.
    ok(&w.run(&["--upper", u, "--", "sh", "-c", "echo kept > /kept"]));
    let left: Vec<_> = fs::read_dir(&upper)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("kept")]);
    assert_eq!(ok(&w.run(&["--upper", u, "--", "cat", "/kept"])), "kept\n");
    // The image's own directories keep their modes and owners.
    fs::create_dir(w.lower.join("proc")).unwrap();
    fs::set_permissions(w.lower.join("proc"), fs::Permissions::from_mode(0o555)).unwrap();
    let shown = ok(&w.run(&[
        "--upper",
        u,
        "--",
        "sh",
        "-c",
        "umount /proc 2>/dev/null; stat -c %a /proc",
    ]));
    assert!(shown == "555\n" || shown.contains("555"), "{shown}");
    w.assert_clean();
}

#[test]
fn init_reaps_orphans_and_passes_signals() {
    let w = World::new("run-init");
    // Orphans left by a subshell are reaped: no zombie remains.
    let out = ok(&w.run(&[
        "--init",
        "--",
        "sh",
        "-c",
        "(sleep 0.1 &) ; sleep 0.4; echo pid=$$; ps -o stat,args | grep -c '^Z' || true",
    ]));
    assert!(out.contains("pid=2\n"), "{out}");
    assert!(out.ends_with("0\n"), "a zombie was left: {out}");
}

#[test]
fn sigterm_to_the_launcher_ends_everything() {
    let w = World::new("run-term");
    // PID 1 without a handler ignores SIGTERM: killed after the stop timeout.
    let child = w
        .cmd(&["--stop-timeout", "1", "--", "sleep", "4101"])
        .spawn()
        .unwrap();
    wait_until("the container", || !processes_with("sleep 4101").is_empty());
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let o = finish(child);
    assert_eq!(o.status.code(), Some(137));
    assert!(processes_with("sleep 4101").is_empty());
    w.assert_clean();

    // A command that handles SIGTERM gets it and ends by itself.
    let child = w
        .cmd(&["--", "sh", "-c", "trap 'exit 7' TERM; sleep 4102 & wait"])
        .spawn()
        .unwrap();
    wait_until("the container", || !processes_with("sleep 4102").is_empty());
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let o = finish(child);
    assert_eq!(o.status.code(), Some(7));
    wait_until("the orphan to go", || {
        processes_with("sleep 4102").is_empty()
    });
    w.assert_clean();

    // Under --init the command gets the default action: 128+15.
    let child = w.cmd(&["--init", "--", "sleep", "4103"]).spawn().unwrap();
    wait_until("the container", || !processes_with("sleep 4103").is_empty());
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    let o = finish(child);
    assert_eq!(o.status.code(), Some(129));
    w.assert_clean();
}

#[test]
fn a_killed_launcher_takes_its_container_along() {
    let w = World::new("run-kill");
    let mut child = w.cmd(&["--", "sleep", "4104"]).spawn().unwrap();
    wait_until("the container", || !processes_with("sleep 4104").is_empty());
    child.kill().unwrap();
    child.wait().unwrap();
    wait_until("the container to die", || {
        processes_with("sleep 4104").is_empty()
    });
    // The mount lived in the launcher's own namespace: gone with it. The
    // scratch directory a killed process cannot remove is left...
    let info = common::mount_table();
    assert!(!info.contains(w.tmp.to_string_lossy().as_ref()));
    assert_eq!(fs::read_dir(&w.tmp).unwrap().count(), 1);
    // ... and the next run removes it (not the one of a live launcher).
    let live = w
        .cmd(&["--stop-timeout", "1", "--", "sleep", "4105"])
        .spawn()
        .unwrap();
    wait_until("the other container", || {
        !processes_with("sleep 4105").is_empty()
    });
    ok(&w.run(&["--", "true"]));
    assert_eq!(
        fs::read_dir(&w.tmp).unwrap().count(),
        1,
        "the live launcher's directory stays"
    );
    unsafe { libc::kill(live.id() as i32, libc::SIGTERM) };
    finish(live);
    w.assert_clean();
}

#[test]
fn binds_environment_user_cwd_and_network() {
    let w = World::new("run-opts");
    let data = w.s.dir("data");
    fs::write(data.join("in"), "from host\n").unwrap();
    let bind_rw = format!("{}:/mnt/rw", data.display());
    let bind_ro = format!("{}:/mnt/ro:ro", data.display());
    let upper = w.s.path.join("upper");
    let out = ok(&w.run(&[
        "--upper",
        upper.to_str().unwrap(),
        "--bind",
        &bind_rw,
        "--bind",
        &bind_ro,
        "-e",
        "GREETING=hello world",
        "-e",
        "PATH=/bin",
        "--cwd",
        "/work/here",
        "--net",
        "none",
        "--",
        "sh",
        "-c",
        "echo $GREETING; echo $PATH; pwd; cat /mnt/ro/in; echo w > /mnt/rw/out; \
         touch /mnt/ro/x 2>/dev/null || echo ro-refused; ifconfig -a | grep -c '^[a-z]'; \
         ifconfig lo | grep -c UP",
    ]));
    assert_eq!(
        out, "hello world\n/bin\n/work/here\nfrom host\nro-refused\n1\n1\n",
        "stdout"
    );
    assert_eq!(fs::read_to_string(data.join("out")).unwrap(), "w\n");
    // The working directory and the bind mount points were made in the
    // launcher's layer, and the binds' content stayed on the host: the
    // upper holds none of them.
    assert!(!upper.join("work").exists() && !upper.join("mnt").exists());

    let out = ok(&w.run(&[
        "--upper",
        upper.to_str().unwrap(),
        "--user",
        "nobody",
        "--",
        "sh",
        "-c",
        "id -u; id -g; echo $HOME; touch /tmp/mine; cat /etc/shadow 2>/dev/null || echo denied; touch /etc/x 2>/dev/null || echo denied",
    ]));
    assert_eq!(out, "65534\n65534\n/nonexistent\ndenied\ndenied\n");
    assert_eq!(fs::metadata(upper.join("tmp/mine")).unwrap().uid(), 65534);
    let out = ok(&w.run(&["--user", "1234:5", "--", "sh", "-c", "id -u; id -g"]));
    assert_eq!(out, "1234\n5\n");
    w.assert_clean();
}

#[test]
fn symlinks_in_the_image_cannot_place_mounts_outside_it() {
    let w = World::new("run-hostile");
    // The image points /mnt at an absolute path that exists on the host and,
    // as a different directory, in the image: mount points must be made in
    // the image's.
    let outside = w.s.dir("outside");
    let inside = w.lower.join(outside.strip_prefix("/").unwrap());
    fs::create_dir_all(&inside).unwrap();
    std::os::unix::fs::symlink(&outside, w.lower.join("mnt")).unwrap();
    let upper = w.s.path.join("upper");
    let data = w.s.dir("data");
    fs::write(data.join("f"), "data\n").unwrap();
    let bind = format!("{}:/mnt/target", data.display());
    let out = ok(&w.run(&[
        "--upper",
        upper.to_str().unwrap(),
        "--bind",
        &bind,
        "--",
        "cat",
        "/mnt/target/f",
    ]));
    assert_eq!(out, "data\n");
    let host_side: Vec<_> = fs::read_dir(&outside)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(
        host_side.is_empty(),
        "the launcher wrote outside the root: {host_side:?}"
    );
    assert!(
        upper
            .join(outside.strip_prefix("/").unwrap())
            .join("target")
            .is_dir()
    );

    // A /dev leading nowhere in the image is refused, and nothing is made.
    fs::remove_dir(w.lower.join("dev")).unwrap();
    std::os::unix::fs::symlink(outside.join("dev"), w.lower.join("dev")).unwrap();
    let o = w.run(&["--", "true"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(
        stderr(&o).contains("cannot make /dev in the container"),
        "{}",
        stderr(&o)
    );
    assert!(fs::read_dir(&outside).unwrap().next().is_none());
    w.assert_clean();
}

#[test]
fn bad_input_gets_one_line_and_nothing_is_left() {
    let w = World::new("run-bad");
    let file = w.s.path.join("a-file");
    fs::write(&file, "").unwrap();
    let f = file.to_str().unwrap();
    let lower = w.lower.to_str().unwrap().to_string();
    let missing = w.s.path.join("missing").to_string_lossy().into_owned();
    let deep = format!("{missing}/a/b");
    let inside_lower = format!("{lower}/up");
    let missing_bind = format!("{missing}:/x");
    // (arguments after `run`, expected exit code, expected text in the line)
    let cases: Vec<(Vec<&str>, i32, &str)> = vec![
        (
            vec!["--lower", &missing, "--", "true"],
            125,
            "lower directory",
        ),
        (vec!["--lower", f, "--", "true"], 125, "not a directory"),
        (vec!["--lower", "", "--", "true"], 125, "empty element"),
        (
            vec!["--lower", &lower, "--upper", f, "--", "true"],
            125,
            "not a directory",
        ),
        (
            vec!["--lower", &lower, "--upper", &deep, "--", "true"],
            125,
            "cannot create upper",
        ),
        (
            vec!["--lower", &lower, "--upper", &lower, "--", "true"],
            125,
            "must not be the same",
        ),
        (
            vec!["--lower", &lower, "--upper", &inside_lower, "--", "true"],
            125,
            "must not be the same or inside one another",
        ),
        (
            vec!["--lower", &lower, "-e", "NOVALUE", "--", "true"],
            125,
            "bad --env",
        ),
        (
            vec!["--lower", &lower, "-e", "=x", "--", "true"],
            125,
            "bad --env",
        ),
        (
            vec!["--lower", &lower, "--bind", "/etc", "--", "true"],
            125,
            "bad --bind",
        ),
        (
            vec!["--lower", &lower, "--bind", &missing_bind, "--", "true"],
            125,
            "bad --bind",
        ),
        (
            vec!["--lower", &lower, "--bind", "/etc:rel", "--", "true"],
            125,
            "absolute",
        ),
        (
            vec!["--lower", &lower, "--bind", "/etc:/x:rx", "--", "true"],
            125,
            "ro or rw",
        ),
        (
            vec!["--lower", &lower, "--bind", "/etc:/", "--", "true"],
            125,
            "root",
        ),
        (
            vec!["--lower", &lower, "--bind", "/etc:/a/../b", "--", "true"],
            125,
            "'..'",
        ),
        (
            vec!["--lower", &lower, "--cwd", "relative", "--", "true"],
            125,
            "bad --cwd",
        ),
        (
            vec!["--lower", &lower, "--user", "a b", "--", "true"],
            125,
            "bad --user",
        ),
        (
            vec!["--lower", &lower, "--user", "ghost", "--", "true"],
            125,
            "ghost: not in",
        ),
        (
            vec!["--lower", &lower, "--user", "0:ghosts", "--", "true"],
            125,
            "ghosts: not in",
        ),
        (
            vec!["--lower", &lower, "--cwd", "/etc/passwd", "--", "true"],
            125,
            "--cwd /etc/passwd is not a directory in the container",
        ),
        (
            vec!["--lower", &lower, "--hostname", "bad name", "--", "true"],
            125,
            "bad --hostname",
        ),
        (
            vec!["--lower", &lower, "-o", "bogus", "--", "true"],
            125,
            "bogus",
        ),
        (
            vec!["--lower", &lower, "--", "nope"],
            127,
            "nope: not found in the container",
        ),
        (
            vec!["--lower", &lower, "--net", "bogus", "--", "true"],
            2,
            "bogus",
        ),
        (
            vec!["--lower", &lower, "--stop-timeout", "x", "--", "true"],
            2,
            "stop-timeout",
        ),
        (vec!["--lower", &lower], 2, "CMD"),
        (vec!["--", "true"], 2, "--lower"),
    ];
    for (args, code, text) in &cases {
        let o = Command::new(bin())
            .arg("run")
            .args(args)
            .env("TMPDIR", &w.tmp)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(*code), "{args:?}: {err}");
        assert!(err.contains(text), "{args:?}: {err}");
        if *code == 125 || *code == 127 {
            assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
            assert!(err.starts_with("unionfs run: "), "{args:?}: {err}");
        }
        w.assert_clean();
    }
    assert!(!Path::new(&missing).exists());
    assert!(
        !Path::new(&inside_lower).exists(),
        "made inside the lower first"
    );
    eprintln!("bad run invocations refused: {}", cases.len());
}

/// Runs `unionfs run` as `user` (a name) in a mount namespace where
/// /dev/fuse is a node everyone may open, as on most distributions.
fn run_rootless(w: &World, user: &str, args: &str) -> Output {
    let node = w.s.path.join("fuse-node");
    let script = format!(
        "{{ [ -c {node} ] || mknod -m 666 {node} c 10 229; }} && mount --bind {node} /dev/fuse && \
         exec setpriv --reuid={user} --regid=$(id -g {user}) --clear-groups \
         env TMPDIR={tmp} {bin} run --lower {lower} {args}",
        node = node.display(),
        tmp = w.tmp.display(),
        bin = bin().display(),
        lower = w.lower.display(),
    );
    let child = Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    finish(child)
}

#[test]
fn rootless_with_subordinate_ids() {
    let w = World::new("run-rootless");
    let uid = uid_of("tests");
    let upper = w.s.path.join("upper");
    fs::create_dir(&upper).unwrap();
    std::os::unix::fs::chown(&upper, Some(uid), None).unwrap();
    let o = run_rootless(
        &w,
        "tests",
        &format!(
            "--upper {}/u -- sh -c 'id -u; echo pid=$$; echo hi > /x; touch /y; chown 65534:65534 /y; hostname'",
            upper.display()
        ),
    );
    let out = ok(&o);
    assert_eq!(out, "0\npid=1\nunionfs\n");
    let meta = fs::metadata(upper.join("u/x")).unwrap();
    assert_eq!(meta.uid(), uid, "root inside is the user outside");
    let start = subuid_start("tests");
    assert_eq!(
        fs::metadata(upper.join("u/y")).unwrap().uid(),
        start + 65533
    );
    w.assert_clean();
}

/// A rootless container renames directories of its image (as package
/// managers do): the moves are recorded in the upper (in user xattrs) and a
/// second run over the same upper sees them.
#[test]
fn rootless_containers_rename_image_directories() {
    let w = World::new("run-redirect");
    let uid = uid_of("tests");
    let upper = w.s.path.join("upper");
    fs::create_dir(&upper).unwrap();
    std::os::unix::fs::chown(&upper, Some(uid), None).unwrap();
    let up = format!("--upper {}/u", upper.display());
    let o = run_rootless(
        &w,
        "tests",
        &format!(
            "{up} -- sh -c 'mv /etc /etc.old && mkdir /etc && mv /etc.old/passwd /etc/ && \
             mv /usr/bin /usr-bin && echo moved'"
        ),
    );
    assert_eq!(ok(&o), "moved\n");
    let redirect = lgetxattr(&upper.join("u/usr-bin"), "user.overlay.redirect");
    assert_eq!(redirect.as_deref(), Some(&b"/usr/bin"[..]));
    let o = run_rootless(
        &w,
        "tests",
        &format!(
            "{up} -- sh -c 'ls /etc; ls /etc.old; test -e /usr/bin || ls /usr-bin | grep -c .'"
        ),
    );
    let out = ok(&o);
    assert!(out.starts_with("passwd\ngroup\nos-release\n"), "{out}");
    let commands: u32 = out.lines().last().unwrap().parse().unwrap();
    assert!(commands > 10, "{out}");
    assert!(w.lower.join("usr/bin").is_dir(), "the image is untouched");
    w.assert_clean();
}

/// `unionfs diff`, as the user who ran a rootless container, of its upper:
/// read as the container's root (objects of subordinate ids the user cannot
/// read as themself included), owners as the container saw them.
#[test]
fn rootless_diff_reads_the_upper_as_the_container_saw_it() {
    let w = World::new("run-diff");
    let uid = uid_of("tests");
    let upper = w.s.path.join("upper");
    fs::create_dir(&upper).unwrap();
    std::os::unix::fs::chown(&upper, Some(uid), None).unwrap();
    let u = upper.join("u");
    let o = run_rootless(
        &w,
        "tests",
        &format!(
            "--upper {} -- sh -c 'mkdir -p /var/partial && touch /var/partial/f && \
             chown 65534:65534 /var/partial/f && chown 5:5 /var/partial && \
             chmod 700 /var/partial && echo hi > /x && rm /bin/ls && echo done'",
            u.display()
        ),
    );
    assert_eq!(ok(&o), "done\n");
    let start = subuid_start("tests");
    assert_eq!(
        fs::metadata(u.join("var/partial")).unwrap().uid(),
        start + 4
    );
    let diff_as_tests = |args: &str| {
        let script = format!(
            "exec setpriv --reuid=tests --regid=$(id -g tests) --clear-groups {} diff {args}",
            bin().display()
        );
        let o = Command::new("sh").args(["-c", &script]).output().unwrap();
        assert!(
            o.status.success(),
            "diff {args}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        o.stdout
    };
    let listed = String::from_utf8(diff_as_tests(&format!(
        "--lowers {} {}",
        w.lower.display(),
        u.display()
    )))
    .unwrap();
    assert_eq!(
        listed,
        "C /bin\nD /bin/ls\nA /var\nA /var/partial\nA /var/partial/f\nA /x\n"
    );
    let tar = w.s.path.join("layer.tar");
    fs::write(&tar, diff_as_tests(&format!("--tar - {}", u.display()))).unwrap();
    let listing = String::from_utf8(
        Command::new("tar")
            .args(["--numeric-owner", "-tvf"])
            .arg(&tar)
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let owner_of = |name: &str| {
        let line = listing
            .lines()
            .find(|l| l.ends_with(name))
            .unwrap_or_else(|| panic!("no {name} in\n{listing}"));
        line.split_whitespace().nth(1).unwrap().to_string()
    };
    assert_eq!(owner_of(" var/partial/"), "5/5");
    assert_eq!(owner_of(" var/partial/f"), "65534/65534");
    assert_eq!(owner_of(" x"), "0/0");
    w.assert_clean();
}

#[test]
fn rootless_with_a_single_id() {
    let w = World::new("run-single");
    // nobody has no subordinate ids: root inside is nobody, nothing else mapped.
    let o = run_rootless(
        &w,
        "nobody",
        "-- sh -c 'id -u; echo hi > /x; ls -ln /x; chown 5 /x 2>/dev/null || echo refused; cat /proc/self/uid_map'",
    );
    let out = ok(&o);
    assert!(out.starts_with("0\n"), "{out}");
    assert!(out.contains("refused"), "{out}");
    assert!(out.trim_end().ends_with("0      65534          1"), "{out}");
    w.assert_clean();
}

#[test]
fn rootless_user_outside_the_mapped_ids_is_named() {
    let w = World::new("run-unmapped");
    // nobody has no subordinate ids: only 0 is mapped in its container.
    let o = run_rootless(&w, "nobody", "--user 70000 -- true");
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(125), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("user 70000 is not mapped in the container (it maps 0)")
            && err.contains("/etc/subuid"),
        "{err}"
    );
    w.assert_clean();
}

#[test]
fn rootless_without_a_usable_dev_fuse_says_so() {
    let w = World::new("run-nofuse");
    let o = Command::new("setpriv")
        .args(["--reuid=tests", "--regid=tests", "--clear-groups"])
        .arg(bin())
        .args(["run", "--lower"])
        .arg(&w.lower)
        .args(["--", "true"])
        .env("TMPDIR", &w.tmp)
        .output()
        .unwrap();
    // /dev/fuse is 0600 root here, as Debian ships it.
    assert!(fs::metadata("/dev/fuse").unwrap().permissions().mode() & 0o006 != 0o006);
    assert_eq!(o.status.code(), Some(125));
    let err = stderr(&o);
    assert!(err.contains("/dev/fuse cannot be opened"), "{err}");
    assert_eq!(err.lines().count(), 1);
    w.assert_clean();
}

#[test]
fn a_debian_container_keeps_its_package_changes_in_the_upper() {
    let rootfs = debian_rootfs();
    let s = Scratch::new("run-debian");
    let tmp = s.dir("tmp");
    let upper = s.path.join("upper");
    let run = |script: &str| {
        let child = Command::new(bin())
            .args(["run", "--lower"])
            .arg(&rootfs)
            .arg("--upper")
            .arg(&upper)
            .args(["--", "sh", "-c", script])
            .env("TMPDIR", &tmp)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        finish(child)
    };
    let lower_status = fs::read(rootfs.join("var/lib/dpkg/status")).unwrap();
    let out = ok(&run(
        "dpkg -l | grep -c '^ii'; cat /etc/debian_version; useradd -m alice && id -u alice; \
         dpkg --purge --force-depends e2fsprogs >/dev/null 2>&1; dpkg -l e2fsprogs 2>&1 | tail -1; \
         test -e /sbin/mke2fs || echo mke2fs-gone",
    ));
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].parse::<u32>().unwrap() > 50, "{out}");
    assert!(lines[1].starts_with("12."), "{out}");
    assert_eq!(lines[2], "1000");
    assert!(out.contains("mke2fs-gone"), "{out}");
    // The changes are in the upper: new files, rewritten ones, whiteouts.
    assert!(
        fs::read_to_string(upper.join("etc/passwd"))
            .unwrap()
            .contains("alice:")
    );
    assert!(upper.join("home/alice").is_dir());
    assert_ne!(
        fs::read(upper.join("var/lib/dpkg/status")).unwrap(),
        lower_status
    );
    let whiteout = fs::symlink_metadata(upper.join("usr/sbin/mke2fs")).unwrap();
    assert!(whiteout.file_type().is_char_device() && whiteout.rdev() == 0);
    // The lower is as it was.
    assert_eq!(
        fs::read(rootfs.join("var/lib/dpkg/status")).unwrap(),
        lower_status
    );
    assert!(rootfs.join("usr/sbin/mke2fs").exists());
    // The next run over the same upper sees them.
    let out = ok(&run(
        "id -u alice; dpkg -s e2fsprogs >/dev/null 2>&1 || echo purged",
    ));
    assert_eq!(out, "1000\npurged\n");
    let left: Vec<_> = fs::read_dir(&tmp).unwrap().flatten().collect();
    assert!(left.is_empty());
}

/// The mode and owner of `p`, without following a symlink.
fn mode_owner(p: &Path) -> (u32, u32) {
    let m = fs::symlink_metadata(p).unwrap();
    (m.mode() & 0o7777, m.uid())
}

/// Runs `sh -c script` as nobody; true when it exits 0.
fn nobody_can(script: &str) -> bool {
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .args(["sh", "-c", script])
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

#[test]
fn everything_the_launcher_makes_has_a_private_mode() {
    let w = World::new("run-modes");
    let upper = w.s.path.join("upper");
    let bind_file = w.s.path.join("hostfile");
    fs::write(&bind_file, "x").unwrap();
    let file_bind = format!("{}:/new/file", bind_file.display());
    let dir_bind = format!("{}:/newdir/sub", w.tmp.display());
    // Markers of this test process alone: another run of the suite may
    // have containers of its own sleeping.
    let (t_secs, k_secs) = (
        format!("41060{}", std::process::id()),
        format!("41070{}", std::process::id()),
    );
    let throwaway = permissive(w.cmd(&["--stop-timeout", "1", "--", "sleep", &t_secs]))
        .spawn()
        .unwrap();
    let throwaway = Reaped(Some(throwaway));
    let kept = permissive(w.cmd(&[
        "--stop-timeout",
        "1",
        "--upper",
        upper.to_str().unwrap(),
        "--bind",
        &file_bind,
        "--bind",
        &dir_bind,
        "--cwd",
        "/made/cwd",
        "--",
        "sleep",
        &k_secs,
    ]))
    .spawn()
    .unwrap();
    let kept = Reaped(Some(kept));
    let (t_marker, k_marker) = (format!("sleep {t_secs}"), format!("sleep {k_secs}"));
    wait_until("both containers", || {
        !processes_with(&t_marker).is_empty() && !processes_with(&k_marker).is_empty()
    });

    let scratches: Vec<PathBuf> = fs::read_dir(&w.tmp)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("unionfs-run.")
        })
        .collect();
    assert_eq!(scratches.len(), 2, "{scratches:?}");
    for s in &scratches {
        assert_eq!(mode_owner(s), (0o700, 0), "{}", s.display());
        assert_eq!(mode_owner(&s.join("launcher.pid")), (0o600, 0));
        // root/ is a mount point now: its own mode is hidden by the union;
        // the scratch's 0700 already keeps others out of it.
        let d = s.display();
        assert!(!nobody_can(&format!("ls {d}")), "nobody lists {d}");
        assert!(
            !nobody_can(&format!("touch {d}/planted")),
            "nobody writes in {d}"
        );
        assert!(!nobody_can(&format!("mv {d}/launcher.pid {d}/x")));
    }
    // The throwaway's upper (the container's `/`) and work directory.
    let throwaway_dir = scratches
        .iter()
        .find(|s| s.join("upper").exists())
        .expect("the throwaway run has an upper");
    assert_eq!(mode_owner(&throwaway_dir.join("upper")).0, 0o755);
    assert_eq!(mode_owner(&throwaway_dir.join("work")).0, 0o700);
    assert_eq!(mode_owner(&throwaway_dir.join("work/work")).0, 0o700);

    // A missing --upper is made 0755, its work directory 0700.
    assert_eq!(mode_owner(&upper), (0o755, 0));
    let work = w.s.path.join(".upper.unionfs-work");
    assert_eq!(mode_owner(&work), (0o700, 0));
    assert_eq!(mode_owner(&work.join("work")), (0o700, 0));
    assert!(!nobody_can(&format!("touch {}/planted", work.display())));
    // Mount points and the working directory, made in the launcher's layer
    // (not in the upper).
    let kept_dir = scratches
        .iter()
        .find(|s| !s.join("upper").exists())
        .expect("the kept run's scratch");
    let init = kept_dir.join("init");
    assert_eq!(mode_owner(&init), (0o755, 0));
    assert!(!nobody_can(&format!("touch {}/planted", init.display())));
    assert_eq!(mode_owner(&init.join("new")), (0o755, 0));
    assert_eq!(mode_owner(&init.join("new/file")), (0o644, 0));
    assert_eq!(mode_owner(&init.join("newdir")), (0o755, 0));
    assert_eq!(mode_owner(&init.join("newdir/sub")), (0o755, 0));
    assert_eq!(mode_owner(&init.join("made")), (0o755, 0));
    assert_eq!(mode_owner(&init.join("made/cwd")), (0o755, 0));
    assert_eq!(
        fs::read_dir(&upper).unwrap().count(),
        0,
        "the upper is not clean"
    );

    drop((throwaway, kept));
    w.assert_clean();
}

/// A launcher stopped (SIGTERM) and waited for when dropped, also when a
/// test fails half-way: no container outlives its test.
struct Reaped(Option<Child>);

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(child) = self.0.take() {
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            finish(child);
        }
    }
}

/// The launcher started with umask 0: a permissive umask must not leak into
/// anything it makes.
fn permissive(mut c: Command) -> Command {
    use std::os::unix::process::CommandExt;
    unsafe {
        c.pre_exec(|| {
            libc::umask(0);
            Ok(())
        })
    };
    c.stdout(Stdio::null());
    c
}

#[test]
fn a_restrictive_umask_does_not_close_what_the_launcher_makes() {
    let w = World::new("run-umask");
    let host_file = w.s.path.join("hostfile");
    fs::write(&host_file, "x\n").unwrap();
    fs::set_permissions(&host_file, fs::Permissions::from_mode(0o644)).unwrap();
    // Under umask 077, a user of the container must still pass through the
    // directories the launcher made for --cwd and a bind target, and the
    // command starts with the conventional umask.
    let script = format!(
        "umask 077; exec {bin} run --lower {lower} --cwd /made/here --user 65534 \
         --bind {file}:/deep/in/file:ro -- \
         sh -c 'stat -c %a /made /made/here /deep /deep/in; cat /deep/in/file; umask'",
        bin = bin().display(),
        lower = w.lower.display(),
        file = host_file.display(),
    );
    let mut c = Command::new("sh");
    c.args(["-c", &script])
        .env("TMPDIR", &w.tmp)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = ok(&finish(c.spawn().unwrap()));
    assert_eq!(out, "755\n755\n755\n755\nx\n0022\n");
    w.assert_clean();
}
