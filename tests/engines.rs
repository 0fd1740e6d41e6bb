//! podman and buildah with unionfs as their `mount_program` (the
//! fuse-overlayfs command line, tests/compat.rs): containers run, a lower
//! directory renamed in a build, `podman diff`, and rootless podman with a
//! keep-id mapping (`tests/setup.sh` installs podman, buildah and runc).

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Scratch, bin, run_to_end, text, unmount_all_under};

/// A busybox rootfs tarball.
fn busybox_tarball(s: &Scratch) -> PathBuf {
    let root = s.dir("rootfs");
    for d in ["bin", "etc", "tmp", "proc", "sys", "dev", "root"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::set_permissions(root.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
    fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    for applet in [
        "sh", "cat", "echo", "grep", "ls", "rm", "id", "touch", "test", "mkdir", "stat",
    ] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    fs::write(root.join("etc/group"), "root:x:0:\n").unwrap();
    fs::write(root.join("etc/motd"), "welcome\n").unwrap();
    let tar = s.path.join("rootfs.tar");
    // Old times: podman's diff takes a same-size file with the same mtime
    // second (tar keeps no nanoseconds) as unchanged.
    let st = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .args(["--mtime=2020-01-01", "-cf"])
        .arg(&tar)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    tar
}

/// podman/buildah configured to use `program` as the mount program, with
/// storage of its own under `dir`.
struct Engine {
    dir: PathBuf,
    args_log: PathBuf,
}

impl Engine {
    fn new(dir: &Path) -> Engine {
        fs::create_dir_all(dir).unwrap();
        // A wrapper logs what podman passes, then runs unionfs.
        let wrapper = dir.join("mount-program");
        let args_log = dir.join("mount-program.log");
        fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\necho \"$@\" >> {}\nexec {} \"$@\"\n",
                args_log.display(),
                bin().display()
            ),
        )
        .unwrap();
        fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(
            dir.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"overlay\"\nrunroot = \"{d}/run\"\ngraphroot = \"{d}/graph\"\n\
                 [storage.options.overlay]\nmount_program = \"{w}\"\nmountopt = \"nodev\"\n",
                d = dir.display(),
                w = wrapper.display()
            ),
        )
        .unwrap();
        fs::write(
            dir.join("containers.conf"),
            "[containers]\ndefault_ulimits = [\"nofile=20000:20000\", \"nproc=32768:32768\"]\n\
             netns = \"none\"\n[engine]\nruntime = \"runc\"\ncgroup_manager = \"cgroupfs\"\n",
        )
        .unwrap();
        Engine {
            dir: dir.to_path_buf(),
            args_log,
        }
    }

    fn cmd(&self, program: &str, args: &[&str]) -> Command {
        let mut c = Command::new(program);
        c.args(args)
            .env("CONTAINERS_STORAGE_CONF", self.dir.join("storage.conf"))
            .env("CONTAINERS_CONF", self.dir.join("containers.conf"));
        c
    }

    /// Waits (up to 20 s) until the container's root is no longer mounted.
    fn wait_unmounted(&self, container: &str) {
        let format = "{{.GraphDriver.Data.MergedDir}}";
        let merged = self.ok("podman", &["inspect", container, "--format", format]);
        let merged = merged.trim();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let info = common::mount_table();
            if !info.lines().any(|l| l.split(' ').nth(4) == Some(merged)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{container}: its root {merged} is still mounted 20 s after it ended");
    }

    /// Runs podman or buildah; returns stdout, failing on an error.
    fn ok(&self, program: &str, args: &[&str]) -> String {
        let out = run_to_end(self.cmd(program, args));
        assert!(
            out.status.success(),
            "{program} {args:?}: {}\n{}",
            text(&out.stderr),
            text(&out.stdout)
        );
        text(&out.stdout)
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Whatever a failed test left mounted under the storage.
        unmount_all_under(&self.dir);
    }
}

#[test]
fn podman_and_buildah_run_containers_on_unionfs() {
    // Short paths, as below: with storage under a longer path (CI's scratch
    // directory) podman 4.3's cleanup process never unmounts an ended
    // container (fuse-overlayfs alike), and a diff then reads stale state.
    let dir = tempfile::Builder::new()
        .prefix("pd")
        .tempdir_in("/tmp")
        .unwrap();
    let s = Scratch { path: dir.keep() };
    let tar = busybox_tarball(&s);
    let e = Engine::new(&s.path.join("engine"));
    let tar = tar.to_str().unwrap();
    e.ok("podman", &["import", "-q", tar, "localhost/bb"]);

    // The root filesystem of a container is a unionfs mount.
    let out = e.ok(
        "podman",
        &[
            "run",
            "--rm",
            "localhost/bb",
            "sh",
            "-c",
            "echo ok > /f && cat /f && grep ' / ' /proc/mounts",
        ],
    );
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("ok"));
    assert!(
        lines.next().unwrap().starts_with("unionfs / fuse.unionfs "),
        "{out}"
    );
    let log = fs::read_to_string(&e.args_log).unwrap();
    assert!(
        log.contains("lowerdir=") && log.contains(",volatile"),
        "{log}"
    );

    // Changes, committed into a second layer.
    e.ok(
        "podman",
        &[
            "run",
            "--name",
            "c1",
            "localhost/bb",
            "sh",
            "-c",
            "echo changed > /etc/motd; rm /bin/ls; mkdir /newdir; echo x > /newdir/f",
        ],
    );
    // podman run returns before conmon's cleanup process has unmounted the
    // container: diff it once that is done, as a user would.
    e.wait_unmounted("c1");
    let diff = e.ok("podman", &["container", "diff", "c1"]);
    let missing: Vec<&str> = ["C /etc/motd", "D /bin/ls", "A /newdir", "A /newdir/f"]
        .into_iter()
        .filter(|line| !diff.lines().any(|l| l == *line))
        .collect();
    if !missing.is_empty() {
        // What podman diffed: the container's upper and the mounts it made.
        let format = "{{.GraphDriver.Data.UpperDir}}";
        let upper = e.ok("podman", &["inspect", "c1", "--format", format]);
        let listing = Command::new("find")
            .args([upper.trim(), "-ls"])
            .output()
            .unwrap();
        panic!(
            "podman diff lacks {missing:?}: {diff}\nupper {upper}{}\nmount program calls:\n{}",
            text(&listing.stdout),
            fs::read_to_string(&e.args_log).unwrap_or_default()
        );
    }
    e.ok("podman", &["commit", "-q", "c1", "localhost/bb2"]);
    e.ok("podman", &["rm", "c1"]);
    let layers = e.ok(
        "podman",
        &[
            "image",
            "inspect",
            "--format",
            "{{len .RootFS.Layers}}",
            "localhost/bb2",
        ],
    );
    assert_eq!(layers.trim(), "2");
    let out = e.ok(
        "podman",
        &[
            "run",
            "--rm",
            "localhost/bb2",
            "sh",
            "-c",
            "cat /etc/motd /newdir/f; test -e /bin/ls || echo ls-deleted; cat /etc/passwd",
        ],
    );
    assert_eq!(
        out,
        "changed\nx\nls-deleted\nroot:x:0:0:root:/root:/bin/sh\n"
    );

    // buildah: from, run, commit.
    let c = e.ok("buildah", &["from", "localhost/bb2"]);
    let c = c.trim();
    let out = e.ok(
        "buildah",
        &[
            "run",
            c,
            "sh",
            "-c",
            "echo built > /built; rm /etc/motd; mv /newdir /moved; grep ' / ' /proc/mounts",
        ],
    );
    assert!(out.starts_with("unionfs / fuse.unionfs "), "{out}");
    e.ok("buildah", &["commit", "-q", c, "localhost/built"]);
    e.ok("buildah", &["rm", c]);
    let out = e.ok(
        "podman",
        &[
            "run",
            "--rm",
            "localhost/built",
            "sh",
            "-c",
            "cat /built /moved/f; test -e /etc/motd || echo motd-deleted; \
             test -e /newdir || echo newdir-moved",
        ],
    );
    // A directory of a lower layer renamed (a redirect in the upper) is
    // committed with its contents: the engines diff through the mount.
    assert_eq!(out, "built\nx\nmotd-deleted\nnewdir-moved\n");
    e.ok("podman", &["rmi", "-a", "-f"]);
}

#[test]
fn rootless_podman_with_keep_id_mapping() {
    // Short paths: rootless podman 4.3 loses track of a container whose
    // runtime directory path is long (with fuse-overlayfs as well).
    let dir = tempfile::Builder::new()
        .prefix("pm")
        .tempdir_in("/tmp")
        .unwrap();
    let s = Scratch { path: dir.keep() };
    fs::set_permissions(&s.path, fs::Permissions::from_mode(0o755)).unwrap();
    let tar = busybox_tarball(&s);
    let home = s.dir("h");
    let e = Engine::new(&s.path.join("e"));
    let tests_uid: u32 = text(
        &Command::new("id")
            .args(["-u", "tests"])
            .output()
            .unwrap()
            .stdout,
    )
    .trim()
    .parse()
    .unwrap();
    for p in [&home, &e.dir] {
        Command::new("chown")
            .args(["-R", "tests"])
            .arg(p)
            .status()
            .unwrap();
    }
    // Rootless podman keeps its storage under $HOME; the mount program is
    // taken from the storage.conf given. (No --rm: rootless podman 4.3 then
    // never returns here, with fuse-overlayfs as well: its cleanup process
    // does not find the container again.)
    let script = format!(
        "set -e; export HOME={home} XDG_RUNTIME_DIR={home}/r CONTAINERS_STORAGE_CONF={conf}/storage.conf CONTAINERS_CONF={conf}/containers.conf; \
         mkdir -p $XDG_RUNTIME_DIR; \
         trap 'kill $(cat $XDG_RUNTIME_DIR/libpod/tmp/pause.pid 2>/dev/null) 2>/dev/null || true' EXIT; \
         podman import -q {tar} localhost/bb >/dev/null; \
         podman run --name p localhost/bb sh -c 'id -u; echo ok > /f; cat /f; grep \" / \" /proc/mounts'; \
         podman rm p >/dev/null; \
         podman run --name k --userns=keep-id localhost/bb sh -c 'id -u; stat -c %u /etc/passwd; touch /tmp/k; stat -c %u /tmp/k'; \
         podman rm k >/dev/null",
        home = home.display(),
        conf = e.dir.display(),
        tar = tar.display(),
    );
    let node = s.path.join("fuse");
    let outer = format!(
        "mknod -m 666 {node} c 10 229 && mount --bind {node} /dev/fuse && \
         exec setpriv --reuid=tests --regid=tests --clear-groups sh -c '{script}'",
        node = node.display(),
        script = script.replace('\'', "'\\''"),
    );
    let mut c = Command::new("unshare");
    // A clean environment and a directory the user may enter, as a login
    // session has.
    c.args(["-m", "sh", "-c", &outer])
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
        .current_dir(&s.path);
    // Nothing of the test harness's descriptors: podman's helpers would
    // keep them open.
    unsafe {
        use std::os::unix::process::CommandExt;
        c.pre_exec(|| {
            libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            Ok(())
        });
    }
    let out = run_to_end(c);
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out.stderr),
        text(&out.stdout)
    );
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[..2], ["0", "ok"], "{stdout}");
    assert!(lines[2].starts_with("unionfs / fuse.unionfs "), "{stdout}");
    // keep-id: the user is itself inside; the image's root files stay root's.
    assert_eq!(
        lines[3..],
        [
            tests_uid.to_string().as_str(),
            "0",
            tests_uid.to_string().as_str()
        ],
        "{stdout}"
    );
    let log = fs::read_to_string(&e.args_log).unwrap();
    assert!(
        log.contains("uidmapping="),
        "podman passed no mapping: {log}"
    );
}
