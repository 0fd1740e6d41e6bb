//! The command line: help and version, refusals of bad input (one line, a
//! non-zero exit, nothing mounted or written), and clean unmounting.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn unionfs(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn help_and_version() {
    let v = unionfs(&["--version"]);
    assert!(v.status.success());
    assert!(String::from_utf8_lossy(&v.stdout).starts_with("unionfs "));
    let h = unionfs(&["--help"]);
    assert!(h.status.success());
    assert!(String::from_utf8_lossy(&h.stdout).contains("mount"));
    let m = unionfs(&["mount", "--help"]);
    assert!(m.status.success());
    let text = String::from_utf8_lossy(&m.stdout);
    // The options, how the daemon ends, where its logs go, its exit codes.
    for needed in [
        "workdir=",
        "fusermount3 -u",
        "SIGTERM",
        "RUST_LOG",
        "Exit status",
    ] {
        assert!(
            text.contains(needed),
            "mount --help lacks {needed:?}: {text}"
        );
    }
    for sub in ["demo", "diff"] {
        let h = unionfs(&[sub, "--help"]);
        let text = String::from_utf8_lossy(&h.stdout);
        assert!(
            text.contains("RUST_LOG") && text.contains("Exit status"),
            "{sub}: {text}"
        );
    }
    let r = unionfs(&["run", "--help"]);
    let text = String::from_utf8_lossy(&r.stdout);
    for needed in ["RUST_LOG", "Exit status", "125", "127"] {
        assert!(text.contains(needed), "run --help lacks {needed:?}: {text}");
    }
}

#[test]
fn man_pages_render_and_completions_load() {
    let s = Scratch::new("manpages");
    let dir = s.path.join("man1");
    let out = unionfs(&["man", dir.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for page in [
        "unionfs",
        "unionfs-mount",
        "unionfs-run",
        "unionfs-demo",
        "unionfs-completions",
    ] {
        let path = dir.join(format!("{page}.1"));
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644, "{page}.1");
        let shown = Command::new("man")
            .arg("-l")
            .arg(&path)
            .env("MANWIDTH", "100")
            .env("MANPAGER", "cat")
            .output()
            .expect("man is installed (tests/setup.sh)");
        let text = String::from_utf8_lossy(&shown.stdout);
        assert!(
            shown.status.success() && text.contains("NAME"),
            "{page}: {text}"
        );
        assert!(
            text.contains(&page.replace('-', " ")) || text.contains(page),
            "{page}: {text}"
        );
    }
    let show = |page: &str| {
        let o = Command::new("man")
            .arg("-l")
            .arg(dir.join(format!("{page}.1")))
            .env("MANWIDTH", "80")
            .env("MANPAGER", "cat")
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert!(show("unionfs-mount").contains("Exit status"));
    // Every page listed exists: no unionfs-help(1) without its page.
    let pages: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().replace(".1", ""))
        .collect();
    let top = show("unionfs");
    for listed in top.split_whitespace().filter_map(|w| w.strip_suffix("(1)")) {
        assert!(
            pages.iter().any(|p| p == listed),
            "{listed}(1) is listed but has no page"
        );
    }
    // The fuse-overlayfs form is kept line for line, within 80 columns.
    for line in [
        "       usage: unionfs [-f] [-d] [-o OPTIONS]... [SOURCE] MOUNTPOINT\n",
        "         -f          stay in the foreground\n",
        "                     index=on|off, redirect_dir=on|off, metacopy=on|off, ro,\n",
    ] {
        assert!(top.contains(line), "{line:?} not in\n{top}");
    }
    assert!(top.lines().all(|l| l.chars().count() <= 80), "{top}");
    // Options of run and mount show their names in the synopsis.
    for page in ["unionfs-run", "unionfs-mount"] {
        let text = show(page);
        assert!(text.contains("[-o|--options]"), "{page}: {text}");
    }
    for shell in ["bash", "zsh", "fish"] {
        let out = unionfs(&["completions", shell]);
        assert!(out.status.success() && !out.stdout.is_empty(), "{shell}");
    }
    let script = s.path.join("unionfs.bash");
    fs::write(&script, unionfs(&["completions", "bash"]).stdout).unwrap();
    let loaded = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source {} && complete -p unionfs",
            script.display()
        ))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&loaded.stdout);
    assert!(
        loaded.status.success() && text.contains("unionfs"),
        "{text}"
    );
    let bad = unionfs(&["completions", "tcsh"]);
    assert_eq!(bad.status.code(), Some(2));
}

/// A tmpfs mounted for the test, unmounted at the end.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn new(at: PathBuf) -> Tmpfs {
        fs::create_dir_all(&at).unwrap();
        assert!(
            Command::new("mount")
                .args(["-t", "tmpfs", "tmpfs"])
                .arg(&at)
                .status()
                .unwrap()
                .success()
        );
        Tmpfs(at)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        umount_lazy(&self.0);
    }
}

fn tree(root: &Path) -> Vec<String> {
    let mut v: Vec<String> = walkdir_all(root)
        .iter()
        .map(|p| p.strip_prefix(root).unwrap().display().to_string())
        .collect();
    v.sort();
    v
}

#[test]
fn bad_input_is_refused_cleanly() {
    let s = Scratch::new("badin");
    let l1 = s.dir("l1");
    let l2 = s.dir("l2");
    let up = s.dir("up");
    let mnt = s.dir("mnt");
    let file = s.path.join("file");
    fs::write(&file, "f").unwrap();
    s.dir("l1/inner");
    s.dir("up/inner");
    s.dir("mnt/inner");
    let other_fs = Tmpfs::new(s.path.join("otherfs"));
    let upper_root_fs = Tmpfs::new(s.path.join("rootfs-upper"));
    let (l1s, l2s, ups, mnts, files) = (
        l1.display().to_string(),
        l2.display().to_string(),
        up.display().to_string(),
        mnt.display().to_string(),
        file.display().to_string(),
    );
    let missing = s.path.join("missing").display().to_string();
    let lowers = format!("{l1s}:{l2s}");
    let wd_other = format!("workdir={}", other_fs.0.display());
    let wd_in_upper = format!("workdir={ups}/inner");
    let wd_missing = format!("workdir={missing}");
    let wd_file = format!("workdir={files}");
    let wd_lower = format!("workdir={l1s}/inner");
    let l1_inner = format!("{l1s}/inner");
    let up_inner = format!("{ups}/inner");
    let mnt_inner = format!("{mnts}/inner");
    let root_upper = upper_root_fs.0.display().to_string();
    let (l, u, m) = (lowers.as_str(), ups.as_str(), mnts.as_str());
    let (double_colon, trailing) = (format!("{l1s}::{l2s}"), format!("{l1s}:"));
    let (leading, backslash) = (format!(":{l1s}"), format!("{l1s}\\"));
    let (twice, nested) = (format!("{l1s}:{l2s}:{l1s}"), format!("{l1s}:{l1s}/inner"));
    // (arguments, what the message must mention)
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec![&missing, u, m], "does not exist"),
        (vec![&files, u, m], "is not a directory"),
        (vec![l, &missing, m], "does not exist"),
        (vec![l, &files, m], "is not a directory"),
        (vec![l, u, &missing], "does not exist"),
        (vec![l, u, &files], "is not a directory"),
        (vec!["", u, m], "no lower directory"),
        (vec![&double_colon, u, m], "empty element"),
        (vec![&trailing, u, m], "empty element"),
        (vec![&leading, u, m], "empty element"),
        (vec![&backslash, u, m], "backslash"),
        (vec![&twice, u, m], "is given twice"),
        (vec![&nested, u, m], "inside one another"),
        (vec![l, &l1s, m], "must not be the same or inside"),
        (vec![l, &l1_inner, m], "must not be the same or inside"),
        (vec![&up_inner, u, m], "must not be the same or inside"),
        (vec![l, u, &l1_inner], "must not be the same or inside"),
        (vec![&mnt_inner, u, m], "must not be the same or inside"),
        (vec![l, u, u], "must not be the same or inside"),
        (vec![l, u, &up_inner], "must not be the same or inside"),
        (vec!["-o", &wd_other, l, u, m], "not on the same filesystem"),
        (vec!["-o", &wd_in_upper, l, u, m], "inside one another"),
        (vec!["-o", &wd_missing, l, u, m], "does not exist"),
        (vec!["-o", &wd_file, l, u, m], "is not a directory"),
        (
            vec!["-o", &wd_lower, l, u, m],
            "not on the same filesystem|overlaps",
        ),
        (vec!["-o", "workdir=", l, u, m], "unknown mount option"),
        (vec!["-o", "bogus", l, u, m], "unknown mount option 'bogus'"),
        (vec!["-o", "workdir=/x,frobnicate=1", l, u, m], "frobnicate"),
        (
            vec!["-o", "writeback=maybe", l, u, m],
            "writeback=maybe: expected on or off",
        ),
        (vec![l, &root_upper, m], "root of its filesystem"),
    ];
    let before_up = tree(&up);
    let before_parent = tree(&s.path);
    for (args, expect) in &cases {
        let mut full = vec!["mount"];
        full.extend(args.iter().copied());
        let out = unionfs(&full);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{full:?}: exit {:?}, stderr {err}",
            out.status
        );
        assert_eq!(
            err.lines().count(),
            1,
            "{full:?}: one line expected, got {err:?}"
        );
        assert!(err.starts_with("unionfs: "), "{full:?}: {err}");
        assert!(
            expect.split('|').any(|e| err.contains(e)),
            "{full:?}: {err:?} should mention {expect:?}"
        );
        assert!(!is_mounted(&mnt), "{full:?} left a mount");
        assert_eq!(
            tree(&up),
            before_up,
            "{full:?} wrote into the upper directory"
        );
        assert_eq!(tree(&s.path), before_parent, "{full:?} created something");
    }
    // Usage errors from the parser: exit 2 as well.
    for args in [
        vec!["mount"],
        vec!["mount", l, u],
        vec!["frobnicate"],
        vec!["mount", l, u, m, "extra"],
    ] {
        let out = unionfs(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
    eprintln!("bad invocations refused: {}", cases.len() + 4);
}

/// `unionfs mount` of fresh layers, run (prefixed by `as_user`) in a
/// private mount namespace after the shell command `setup` (`{closed}`
/// there names a root-only empty file); returns its stderr once checked
/// that it failed with exit 1, said one line, and mounted nothing.
fn mount_where_dev_fuse_is(tag: &str, setup: &str, as_user: &str) -> String {
    let s = Scratch::new(tag);
    let (l, u, m) = (s.dir("l"), s.dir("u"), s.dir("m"));
    for d in [&s.path, &l, &u, &m] {
        fs::set_permissions(d, fs::Permissions::from_mode(0o777)).unwrap();
    }
    let closed = s.path.join("closed-fuse");
    fs::write(&closed, "").unwrap();
    fs::set_permissions(&closed, fs::Permissions::from_mode(0o600)).unwrap();
    let script = format!(
        "{} && exec {as_user} {} mount {} {} {}",
        setup.replace("{closed}", &closed.display().to_string()),
        bin().display(),
        l.display(),
        u.display(),
        m.display()
    );
    let out = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(!is_mounted(&m));
    err
}

#[test]
fn missing_dev_fuse_is_named() {
    let err = mount_where_dev_fuse_is("nofuse", "mount -t tmpfs none /dev", "");
    assert!(
        err.contains("/dev/fuse does not exist") && err.contains("modprobe fuse"),
        "{err}"
    );
}

/// A /dev/fuse the user cannot open is named with the way out: here a
/// root-only file bound over it, and the mount tried as nobody.
#[test]
fn dev_fuse_the_user_cannot_open_is_named_with_a_hint() {
    let nobody = "setpriv --reuid=65534 --regid=65534 --clear-groups";
    let err = mount_where_dev_fuse_is("fuseperm", "mount --bind {closed} /dev/fuse", nobody);
    assert!(
        err.contains("/dev/fuse cannot be opened by uid 65534") && err.contains("mode 0666"),
        "{err}"
    );
}

#[test]
fn workdir_in_use_is_refused() {
    let s = Scratch::new("inuse");
    let (l, u, m, m2) = (s.dir("l"), s.dir("u"), s.dir("m"), s.dir("m2"));
    let _first = Mount::unionfs(std::slice::from_ref(&l), &u, &m, &[]);
    let out = unionfs(&[
        "mount",
        &l.display().to_string(),
        &u.display().to_string(),
        &m2.display().to_string(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("in use"), "{err}");
    assert!(!is_mounted(&m2));
}

#[test]
fn an_upper_made_over_other_lowers_is_refused_with_the_index() {
    if index_unavailable("an_upper_made_over_other_lowers_is_refused_with_the_index") {
        return;
    }
    let s = Scratch::new("otherlowers");
    let (l1, l2, u, m) = (s.dir("l1"), s.dir("l2"), s.dir("u"), s.dir("m"));
    let first = Mount::unionfs(std::slice::from_ref(&l1), &u, &m, &[]);
    write(&m.join("f"), "made over l1\n");
    first.unmount();
    let upper_before = snapshot(&u, View::Upper);
    let (l2s, us, ms) = (
        l2.display().to_string(),
        u.display().to_string(),
        m.display().to_string(),
    );
    let out = unionfs(&["mount", &l2s, &us, &ms]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.contains("made over other lower directories"), "{err}");
    assert!(err.contains("index=off"), "the way out: {err}");
    assert!(!is_mounted(&m));
    assert!(diff("before", &upper_before, "after", &snapshot(&u, View::Upper)).is_empty());
    // The kernel refuses it too; without the index both mount it.
    let kwork = s.dir("kwork");
    let kernel = Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o"])
        .arg(format!(
            "lowerdir={l2s},upperdir={us},workdir={},index=on",
            kwork.display()
        ))
        .arg(&m)
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(!kernel.success(), "the kernel mounted it");
    let ours = Mount::unionfs(std::slice::from_ref(&l2), &u, &m, &["index=off"]);
    assert_eq!(fs::read_to_string(m.join("f")).unwrap(), "made over l1\n");
    ours.unmount();
}

/// The default work directory belongs to the upper's path: when the upper
/// it indexed is removed and made again (or moved away and a new empty one
/// made), the index starts afresh with one log line; the old index of an
/// upper still there is kept aside. A work directory the user named still
/// refuses another upper's index, naming what became of that upper.
#[test]
fn a_default_workdir_outliving_its_upper_starts_a_new_index() {
    if index_unavailable("a_default_workdir_outliving_its_upper_starts_a_new_index") {
        return;
    }
    let s = Scratch::new("staleindex");
    let (l, u, m) = (s.dir("l"), s.dir("u"), s.dir("m"));
    write(&l.join("f"), "lower\n");
    fs::hard_link(l.join("f"), l.join("g")).unwrap();
    let index = s.path.join(".u.unionfs-work/index");
    let lowers = std::slice::from_ref(&l);
    let write_through = |m: &Path| {
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(m.join("f"))
            .unwrap();
        std::io::Write::write_all(&mut f, b"more\n").unwrap();
    };
    // Removed and made again.
    let first = Mount::unionfs(lowers, &u, &m, &[]);
    write_through(&m);
    first.unmount();
    assert_eq!(fs::read_dir(&index).unwrap().count(), 1, "an index entry");
    fs::remove_dir_all(&u).unwrap();
    fs::create_dir(&u).unwrap();
    let again = Mount::unionfs(lowers, &u, &m, &[]);
    let log = again.log_text();
    assert!(log.contains("no longer exists; started a new one"), "{log}");
    assert_eq!(fs::read_to_string(m.join("g")).unwrap(), "lower\n");
    write_through(&m);
    assert_eq!(fs::read_to_string(m.join("g")).unwrap(), "lower\nmore\n");
    again.unmount();
    // Moved away, a new empty one made: the old index is kept aside.
    let moved = s.path.join("u.moved");
    fs::rename(&u, &moved).unwrap();
    fs::create_dir(&u).unwrap();
    let fresh = Mount::unionfs(lowers, &u, &m, &[]);
    let log = fresh.log_text();
    assert!(
        log.contains(&format!(
            "belonged to the upper directory {}",
            moved.display()
        )),
        "{log}"
    );
    let kept = s.path.join(".u.unionfs-work/index.old.1");
    assert_eq!(
        fs::read_dir(&kept).unwrap().count(),
        1,
        "the moved upper's entry kept"
    );
    assert_eq!(
        fs::metadata(moved.join("f")).unwrap().nlink(),
        2,
        "its link count kept"
    );
    fresh.unmount();
    // A named work directory holding the moved upper's index: refused.
    let (l_, moved_, m_) = (
        l.display().to_string(),
        moved.display().to_string(),
        m.display().to_string(),
    );
    let named = format!("workdir={}", s.path.join(".u.unionfs-work").display());
    let out = unionfs(&["mount", "-o", &named, &l_, &moved_, &m_]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "holds the index of the upper directory {}",
            u.display()
        )),
        "{err}"
    );
    assert!(!is_mounted(&m));
    // Nor when that upper is gone: the way out is named.
    fs::remove_dir_all(&u).unwrap();
    let out = unionfs(&["mount", "-o", &named, &l_, &moved_, &m_]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("no longer exists; remove the index directory"),
        "{err}"
    );
    assert!(!is_mounted(&m));
}

fn wait_exit(m: &mut Mount) -> i32 {
    let start = Instant::now();
    let child = m.child.as_mut().unwrap();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st.code().unwrap_or(-1);
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "daemon did not exit"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn signals_and_external_unmount_end_the_daemon_cleanly() {
    let s = Scratch::new("signals");
    let (l, u, m) = (s.dir("l"), s.dir("u"), s.dir("m"));
    fs::write(l.join("f"), "f").unwrap();
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        let mut mount = Mount::unionfs(std::slice::from_ref(&l), &u, &m, &[]);
        // Busy: a process inside keeps it open; the unmount is lazy.
        let busy = fs::File::open(m.join("f")).unwrap();
        unsafe { libc::kill(mount.pid().unwrap() as i32, sig) };
        assert_eq!(wait_exit(&mut mount), 0, "signal {sig}");
        assert!(!is_mounted(&m), "signal {sig} left the mount");
        drop(busy);
    }
    let mut mount = Mount::unionfs(std::slice::from_ref(&l), &u, &m, &[]);
    assert!(Command::new("umount").arg(&m).status().unwrap().success());
    assert_eq!(wait_exit(&mut mount), 0, "umount");
    if Command::new("fusermount3")
        .arg("--version")
        .output()
        .is_ok()
    {
        let mut mount = Mount::unionfs(std::slice::from_ref(&l), &u, &m, &[]);
        assert!(
            Command::new("fusermount3")
                .arg("-u")
                .arg(&m)
                .status()
                .unwrap()
                .success()
        );
        assert_eq!(wait_exit(&mut mount), 0, "fusermount3 -u");
    }
}

#[test]
fn default_workdir_is_beside_upper_and_cleaned() {
    let s = Scratch::new("workdir");
    let (l, u, m) = (s.dir("l"), s.dir("u"), s.dir("m"));
    let work = s.path.join(".u.unionfs-work/work");
    fs::create_dir_all(work.join("leftover/deep")).unwrap();
    fs::write(work.join("leftover/deep/junk"), "j").unwrap();
    let mount = Mount::unionfs(&[l], &u, &m, &[]);
    assert!(
        fs::read_dir(&work).unwrap().next().is_none(),
        "leftovers removed at mount"
    );
    assert!(
        fs::read_dir(&m).unwrap().next().is_none(),
        "work directory not in the merged view"
    );
    assert!(
        fs::read_dir(&u).unwrap().next().is_none(),
        "nor in the upper directory"
    );
    drop(mount);
}

#[test]
fn escaped_colons_in_lower_paths() {
    let s = Scratch::new("colon");
    let l = s.dir("a:b");
    fs::write(l.join("f"), "colon").unwrap();
    let (u, m) = (s.dir("u"), s.dir("m"));
    let mount = Mount::unionfs(&[l], &u, &m, &["volatile"]);
    assert_eq!(fs::read_to_string(m.join("f")).unwrap(), "colon");
    drop(mount);
}

#[test]
fn passthrough_mode_is_chosen_and_logged() {
    let s = Scratch::new("passthrough");
    let (l, u, m) = (s.dir("l"), s.dir("u"), s.dir("m"));
    fs::write(l.join("f"), "lower").unwrap();
    let on = Mount::unionfs(std::slice::from_ref(&l), &u, &m, &["passthrough=on"]);
    fs::write(m.join("g"), "upper file, passthrough").unwrap();
    assert_eq!(
        fs::read_to_string(m.join("g")).unwrap(),
        "upper file, passthrough"
    );
    assert_eq!(fs::read_to_string(m.join("f")).unwrap(), "lower");
    let log = on.log_text();
    assert!(log.contains("passthrough on"), "{log}");
    drop(on);
    let off = Mount::unionfs(std::slice::from_ref(&l), &u, &m, &["passthrough=off"]);
    assert_eq!(
        fs::read_to_string(m.join("g")).unwrap(),
        "upper file, passthrough"
    );
    let log = off.log_text();
    assert!(
        log.contains("passthrough off (-o passthrough=off)"),
        "{log}"
    );
    drop(off);
}

#[test]
fn passthrough_on_is_refused_where_it_cannot_work() {
    let s = Scratch::new("ptnoperm");
    let (l, u, m) = (s.dir("l"), s.dir("u"), s.dir("m"));
    // Root of a user namespace may mount FUSE but not register backing files.
    let out = Command::new("unshare")
        .args([
            "--user",
            "--map-root-user",
            "--mount",
            "--propagation",
            "private",
        ])
        .arg(bin())
        .args(["mount", "-o", "passthrough=on"])
        .args([&l, &u, &m])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("passthrough=on but unavailable"), "{err}");
    assert!(!is_mounted(&m));
}

#[test]
fn killed_daemon_leaves_a_consistent_upper_and_a_clear_error() {
    let s = Scratch::new("killed");
    let (l, u, m) = (s.dir("l"), s.dir("u"), s.dir("m"));
    // A large lower file, so that the kill lands during its copy-up.
    let big = l.join("big");
    let data: Vec<u8> = (0..64u32 << 20).map(|i| (i % 253) as u8).collect();
    fs::write(&big, &data).unwrap();
    let mut mount = Mount::unionfs(std::slice::from_ref(&l), &u, &m, &[]);
    let target = m.join("big");
    let writer = std::thread::spawn(move || {
        // Opening for writing copies the file up; the daemon dies meanwhile.
        let _ = fs::OpenOptions::new().write(true).open(&target);
    });
    std::thread::sleep(Duration::from_millis(30));
    unsafe { libc::kill(mount.pid().unwrap() as i32, libc::SIGKILL) };
    assert_eq!(wait_exit(&mut mount), -1, "killed by a signal");
    writer.join().unwrap();
    // The dead mount is named, with the way to free it.
    let out = unionfs(&[
        "mount",
        &l.display().to_string(),
        &u.display().to_string(),
        &m.display().to_string(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("dead FUSE mount") && err.contains("umount -l"),
        "{err}"
    );
    umount_lazy(&m);
    // No half-copied file: the upper has nothing or the whole file.
    if let Ok(meta) = fs::metadata(u.join("big")) {
        assert_eq!(meta.len(), data.len() as u64);
        assert!(
            fs::read(u.join("big")).unwrap() == data,
            "a copied-up file is complete"
        );
    }
    // The next mount cleans the work directory and shows the file whole.
    let again = Mount::unionfs(std::slice::from_ref(&l), &u, &m, &[]);
    let work = s.path.join(".u.unionfs-work/work");
    assert!(
        fs::read_dir(&work).unwrap().next().is_none(),
        "work directory cleaned"
    );
    assert!(fs::read(m.join("big")).unwrap() == data);
    drop(again);
    // And the kernel's overlayfs mounts the same upper.
    let (kw, km) = (s.dir("kw"), s.dir("km"));
    let k = Mount::kernel(std::slice::from_ref(&l), &u, &kw, &km);
    assert!(fs::read(km.join("big")).unwrap() == data);
    drop(k);
}

/// `io_uring=on` mounts with requests through io_uring queues where the
/// fuse module allows it (its enable_uring parameter), and is refused in
/// one line, nothing mounted, where it does not; `auto` mounts either way.
#[test]
fn io_uring_on_is_used_or_refused_as_the_kernel_allows() {
    let s = Scratch::new("uring");
    let (l, u, m) = (s.dir("l"), s.dir("u"), s.dir("m"));
    fs::write(l.join("f"), "f\n").unwrap();
    let allowed = fs::read_to_string("/sys/module/fuse/parameters/enable_uring")
        .is_ok_and(|v| v.trim() == "Y");
    let lowers = std::slice::from_ref(&l);
    if allowed {
        let mount = Mount::unionfs(lowers, &u, &m, &["io_uring=on"]);
        assert_eq!(fs::read_to_string(m.join("f")).unwrap(), "f\n");
        let log = mount.log_text();
        assert!(log.contains("serving through io_uring"), "{log}");
        let threads = fs::read_dir(format!("/proc/{}/task", mount.pid().unwrap()))
            .unwrap()
            .filter_map(|t| fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .filter(|c| c.starts_with("unionfs-q"))
            .count();
        assert!(threads >= 2, "{threads} queue threads");
        mount.unmount();
    } else {
        let out = unionfs(&[
            "mount",
            "-o",
            "io_uring=on",
            l.to_str().unwrap(),
            u.to_str().unwrap(),
            m.to_str().unwrap(),
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains("io_uring=on but unavailable"), "{err}");
        assert!(!is_mounted(&m));
    }
    let auto = Mount::unionfs(lowers, &u, &m, &["io_uring=auto"]);
    assert_eq!(fs::read_to_string(m.join("f")).unwrap(), "f\n");
    auto.unmount();
}
