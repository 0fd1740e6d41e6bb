//! unionfs as a drop-in for fuse-overlayfs: its command line (also under
//! that name, and as the mount(8) helper), daemonizing once mounted, and the
//! id mapping and squash options checked against fuse-overlayfs itself.
//! podman and buildah using it as their `mount_program`: tests/engines.rs.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Scratch, bin, is_mounted, run_to_end, text, umount_lazy, walkdir_all};

/// Unmounts on drop, whatever happened, and waits for the daemon to go.
struct MountGuard(PathBuf);

impl Drop for MountGuard {
    fn drop(&mut self) {
        if is_mounted(&self.0) {
            umount_lazy(&self.0);
        }
    }
}

/// The pid of the daemon serving `mnt` (its command line names it).
fn daemon_of(mnt: &Path) -> Option<u32> {
    daemons_of(mnt).into_iter().next()
}

/// The pids of every daemon whose command line names `mnt`.
fn daemons_of(mnt: &Path) -> Vec<u32> {
    let want = mnt.to_string_lossy().into_owned();
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let args: Vec<String> = c.split(|b| *b == 0).map(text).collect();
                args.contains(&want)
                    && args
                        .first()
                        .is_some_and(|a| a.ends_with("unionfs") || a.ends_with("fuse-overlayfs"))
            })
        })
        .collect()
}

fn wait_gone(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}")).exists() {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.contains(") Z ") {
            return; // exited, not yet reaped by whoever adopted it
        }
        assert!(Instant::now() < deadline, "daemon {pid} did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Two lowers and an empty upper, work directory and mount point.
struct Layers {
    s: Scratch,
    l1: PathBuf,
    l2: PathBuf,
    up: PathBuf,
    work: PathBuf,
    mnt: PathBuf,
}

impl Layers {
    fn new(tag: &str) -> Layers {
        let s = Scratch::new(tag);
        let (l1, l2) = (s.dir("l1"), s.dir("l2"));
        fs::write(l1.join("top"), "top\n").unwrap();
        fs::write(l2.join("bottom"), "bottom\n").unwrap();
        fs::write(l2.join("hidden"), "hidden\n").unwrap();
        common::mknod(&l1.join("hidden"), libc::S_IFCHR, 0);
        fs::create_dir(l2.join("dir")).unwrap();
        fs::write(l2.join("dir/f"), "f\n").unwrap();
        let (up, work, mnt) = (s.dir("up"), s.dir("work"), s.dir("mnt"));
        Layers {
            s,
            l1,
            l2,
            up,
            work,
            mnt,
        }
    }

    fn options(&self) -> String {
        format!(
            "lowerdir={}:{},upperdir={},workdir={}",
            self.l1.display(),
            self.l2.display(),
            self.up.display(),
            self.work.display()
        )
    }
}

fn compat(args: &[&str]) -> Output {
    let mut c = Command::new(bin());
    c.args(args).env_remove("RUST_LOG");
    run_to_end(c)
}

#[test]
fn mounts_in_the_background_and_stops_with_fusermount() {
    let l = Layers::new("compat-bg");
    let opts = format!("{},,volatile", l.options());
    let mnt = l.mnt.to_str().unwrap();
    let _guard = MountGuard(l.mnt.clone());
    let out = compat(&["-o", &opts, mnt]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        out.stdout.is_empty() && out.stderr.is_empty(),
        "{}",
        text(&out.stderr)
    );
    // Live as soon as the command has returned.
    assert!(is_mounted(&l.mnt));
    assert_eq!(
        fs::read_to_string(l.mnt.join("bottom")).unwrap(),
        "bottom\n"
    );
    assert!(!l.mnt.join("hidden").exists());
    fs::write(l.mnt.join("new"), "new\n").unwrap();
    assert_eq!(fs::read_to_string(l.up.join("new")).unwrap(), "new\n");
    let pid = daemon_of(&l.mnt).expect("a daemon serves the mount");
    // The daemon keeps no hold on its caller's working directory.
    assert_eq!(
        fs::read_link(format!("/proc/{pid}/cwd")).unwrap(),
        Path::new("/")
    );
    let st = Command::new("fusermount3")
        .arg("-u")
        .arg(&l.mnt)
        .status()
        .unwrap();
    assert!(st.success());
    wait_gone(pid);
    assert!(!is_mounted(&l.mnt));
}

#[test]
fn answers_to_the_name_fuse_overlayfs_and_runs_in_the_foreground() {
    let l = Layers::new("compat-name");
    let peer = l.s.path.join("fuse-overlayfs");
    std::os::unix::fs::symlink(bin(), &peer).unwrap();
    let version = run_to_end({
        let mut c = Command::new(&peer);
        c.arg("--version");
        c
    });
    assert!(version.status.success());
    assert!(
        text(&version.stdout).starts_with("unionfs "),
        "{}",
        text(&version.stdout)
    );
    let _guard = MountGuard(l.mnt.clone());
    let mut child = Command::new(&peer)
        .args(["-f", "-o", &l.options()])
        .arg(&l.mnt)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !is_mounted(&l.mnt) {
        assert!(child.try_wait().unwrap().is_none(), "exited early");
        assert!(Instant::now() < deadline, "not mounted");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(fs::read_to_string(l.mnt.join("top")).unwrap(), "top\n");
    let st = Command::new("umount").arg(&l.mnt).status().unwrap();
    assert!(st.success());
    assert!(child.wait().unwrap().success());
}

#[test]
fn lowerdir_alone_is_a_read_only_union() {
    let l = Layers::new("compat-ro");
    let opts = format!("lowerdir={}:{}", l.l1.display(), l.l2.display());
    let _guard = MountGuard(l.mnt.clone());
    let out = compat(&["-o", &opts, l.mnt.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut names: Vec<String> = fs::read_dir(&l.mnt)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["bottom", "dir", "top"]);
    assert_eq!(fs::read_to_string(l.mnt.join("dir/f")).unwrap(), "f\n");
    let erofs = |r: std::io::Result<()>| r.unwrap_err().raw_os_error() == Some(libc::EROFS);
    assert!(erofs(fs::write(l.mnt.join("x"), "x")));
    assert!(erofs(fs::write(l.mnt.join("top"), "x")));
    assert!(erofs(fs::remove_file(l.mnt.join("top"))));
    assert!(erofs(fs::create_dir(l.mnt.join("d"))));
    let info = fs::read_to_string("/proc/self/mounts").unwrap();
    let line = info
        .lines()
        .find(|x| x.split(' ').nth(1) == Some(l.mnt.to_str().unwrap()))
        .unwrap();
    assert!(line.contains(" ro,"), "{line}");
    assert_eq!(fs::read_dir(&l.up).unwrap().count(), 0);
}

#[test]
fn unknown_options_are_reported_and_the_mount_goes_on() {
    let l = Layers::new("compat-unknown");
    let opts = format!(
        "{},bogus,frob=1,context=\"system_u:object_r:container_file_t:s0:c1,c2\",threaded=1,nodev,noatime,fsync=0",
        l.options()
    );
    let _guard = MountGuard(l.mnt.clone());
    let out = compat(&["unionfs", l.mnt.to_str().unwrap(), "-o", &opts]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stderr),
        "unknown argument ignored: bogus\nunknown argument ignored: frob=1\n"
    );
    assert!(is_mounted(&l.mnt));
    let info = fs::read_to_string("/proc/self/mounts").unwrap();
    let line = info
        .lines()
        .find(|x| x.split(' ').nth(1) == Some(l.mnt.to_str().unwrap()))
        .unwrap();
    assert!(line.contains("nodev") && line.contains("noatime"), "{line}");
}

#[test]
fn bad_input_is_one_line_exit_1_and_nothing_mounted() {
    let l = Layers::new("compat-bad");
    let (l1, up, work, mnt) = (
        l.l1.to_str().unwrap(),
        l.up.to_str().unwrap(),
        l.work.to_str().unwrap(),
        l.mnt.to_str().unwrap(),
    );
    let missing = l.s.path.join("missing");
    let missing = missing.to_str().unwrap();
    let good = format!("lowerdir={l1},upperdir={up},workdir={work}");
    // Every refusal's message is a unit test of the parser and planner
    // (src/compat.rs); here one of each stage, through the binary: an
    // argument, an option, a layer on disk, and the work directory (checked
    // only when the mount is made).
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["-x".into(), "-o".into(), good.clone(), mnt.into()],
            "unknown option '-x'",
        ),
        (
            vec!["-o".into(), format!("{good},uidmapping=0:1"), mnt.into()],
            "bad id mapping",
        ),
        (
            vec![
                "-o".into(),
                format!("lowerdir={missing},upperdir={up},workdir={work}"),
                mnt.into(),
            ],
            "does not exist",
        ),
        (
            vec![
                "-o".into(),
                format!("lowerdir={l1},upperdir={up},workdir={up}"),
                mnt.into(),
            ],
            "inside one another",
        ),
    ];
    for (args, expect) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = compat(&args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.starts_with("unionfs: ") && err.contains(expect),
            "{args:?}: {err}"
        );
        assert!(!is_mounted(&l.mnt), "{args:?} mounted");
        assert_eq!(
            fs::read_dir(&l.up).unwrap().count(),
            0,
            "{args:?} wrote to the upper"
        );
        assert_eq!(
            fs::read_dir(&l.work).unwrap().count(),
            0,
            "{args:?} wrote to the work dir"
        );
    }
    eprintln!(
        "bad fuse-overlayfs style invocations refused: {}",
        cases.len()
    );
}

/// Owner, group and (with `nlink`) directory link count of every path
/// under `root`. (Merged directories report one link, as with the kernel's
/// overlayfs; fuse-overlayfs counts them: compared only for static_nlink.)
fn owners(root: &Path, nlink: bool) -> BTreeMap<String, (u32, u32, u64)> {
    walkdir_all(root)
        .into_iter()
        .map(|p| {
            let m = fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let links = if nlink && m.is_dir() { m.nlink() } else { 0 };
            (rel, (m.uid(), m.gid(), links))
        })
        .collect()
}

/// Layers owned by various ids, for the mapping options.
fn owned_layers(s: &Scratch) -> (PathBuf, PathBuf) {
    let (l1, l2) = (s.dir("ol1"), s.dir("ol2"));
    for (name, id) in [("root", 0), ("one", 1), ("seven", 7), ("far", 70000)] {
        let p = l2.join(name);
        fs::write(&p, name).unwrap();
        std::os::unix::fs::chown(&p, Some(id), Some(id + 1)).unwrap();
    }
    fs::create_dir_all(l1.join("d/e")).unwrap();
    std::os::unix::fs::chown(l1.join("d"), Some(5), Some(6)).unwrap();
    fs::set_permissions(l1.join("d"), fs::Permissions::from_mode(0o777)).unwrap();
    (l1, l2)
}

/// Mounts the same layers with `opts` under unionfs and fuse-overlayfs,
/// makes the same changes through both (a chown, and with `create` a new
/// file made by a mapped user), and compares what they show and what lands
/// in their upper directories.
fn same_as_fuse_overlayfs(tag: &str, opts: &str, create: bool) {
    let s = Scratch::new(tag);
    let (l1, l2) = owned_layers(&s);
    let mut shown = Vec::new();
    let mut stored = Vec::new();
    for program in [bin(), PathBuf::from("fuse-overlayfs")] {
        let name = if program == bin() { "u" } else { "f" };
        let (up, work, mnt) = (
            s.dir(&format!("{name}-up")),
            s.dir(&format!("{name}-work")),
            s.dir(&format!("{name}-mnt")),
        );
        let _guard = MountGuard(mnt.clone());
        let all = format!(
            "lowerdir={}:{},upperdir={},workdir={},{opts}",
            l1.display(),
            l2.display(),
            up.display(),
            work.display()
        );
        let mut c = Command::new(&program);
        c.args(["-o", &all]).arg(&mnt);
        let out = run_to_end(c);
        assert!(out.status.success(), "{program:?}: {}", text(&out.stderr));
        let nlink = opts.contains("static_nlink");
        let before = owners(&mnt, nlink);
        // Changes: chown through the mount, and a creation by a mapped user.
        let chown = Command::new("chown")
            .arg("100007:100008")
            .arg(mnt.join("one"))
            .status()
            .unwrap();
        let created = create
            && common::as_user(100003, 100004, &format!("touch {}/d/new", mnt.display()))
                .status
                .success();
        let after = owners(&mnt, nlink);
        shown.push((before, after, chown.success(), created));
        drop(_guard);
        wait_until_unmounted(&mnt);
        stored.push(owners(&up, false));
    }
    assert_eq!(
        shown[0], shown[1],
        "unionfs (left) and fuse-overlayfs (right) show different owners with {opts}"
    );
    assert_eq!(stored[0], stored[1], "different owners on disk with {opts}");
}

fn wait_until_unmounted(mnt: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while is_mounted(mnt) {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn id_mapping_and_squashing_match_fuse_overlayfs() {
    // The form containers/storage passes, and the documented one.
    same_as_fuse_overlayfs(
        "compat-map1",
        "uidmapping=:0:100000:65536,gidmapping=:0:100000:65536",
        true,
    );
    same_as_fuse_overlayfs(
        "compat-map2",
        "uidmapping=0:100000:1:1:100001:9,gidmapping=0:100000:10",
        true,
    );
    // (fuse-overlayfs refuses creations under squashing; unionfs checks
    // the permissions shown, as the kernel does: not compared.)
    same_as_fuse_overlayfs("compat-squash", "squash_to_root", false);
    same_as_fuse_overlayfs(
        "compat-squash-ids",
        "squash_to_uid=5,squash_to_gid=6,static_nlink",
        false,
    );
}

/// A POSIX ACL in the xattr format from (tag, permissions, id) entries.
fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in entries {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

/// The (tag, id) of the entries of an ACL that name a user or a group.
fn acl_names(acl: &[u8]) -> Vec<(u16, u32)> {
    acl[4..]
        .chunks_exact(8)
        .map(|e| {
            (
                u16::from_le_bytes([e[0], e[1]]),
                u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
            )
        })
        .filter(|(tag, _)| *tag == 2 || *tag == 8)
        .collect()
}

const ACCESS_ACL: &str = "system.posix_acl_access";

/// An ACL granting read to user `user` and group `group`, and nothing to
/// anyone else but the owner.
fn acl_reading_for(user: u32, group: u32) -> Vec<u8> {
    let none = u32::MAX;
    acl(&[
        (1, 6, none),
        (2, 4, user),
        (4, 0, none),
        (8, 4, group),
        (0x10, 4, none),
        (0x20, 0, none),
    ])
}

/// POSIX ACLs name users and groups: under an id mapping those ids are shown
/// and stored as owners are, and the kernel enforces the ACL as shown.
#[test]
fn acl_entries_are_mapped_like_owners() {
    let s = Scratch::new("compat-acl");
    let (lower, up, work, mnt) = (s.dir("lower"), s.dir("up"), s.dir("work"), s.dir("mnt"));
    let file = lower.join("secret");
    fs::write(&file, "for user 5\n").unwrap();
    common::set_xattr(&file, ACCESS_ACL, &acl_reading_for(5, 6));
    let opts = format!(
        "lowerdir={},upperdir={},workdir={},uidmapping=0:100000:65536,gidmapping=0:100000:65536",
        lower.display(),
        up.display(),
        work.display()
    );
    let _guard = MountGuard(mnt.clone());
    let mut c = Command::new(bin());
    c.args(["-o", &opts]).arg(&mnt);
    let out = run_to_end(c);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown = mnt.join("secret");
    let get = |p: &Path| acl_names(&common::lgetxattr(p, ACCESS_ACL).expect("an ACL"));
    assert_eq!(get(&shown), vec![(2, 100005), (8, 100006)]);
    let cat = format!("cat {}", shown.display());
    assert!(
        common::as_user(100005, 100099, &cat).status.success(),
        "named user"
    );
    assert!(
        common::as_user(100098, 100006, &cat).status.success(),
        "named group"
    );
    assert!(
        !common::as_user(100005 + 1, 100099, &cat).status.success(),
        "anyone else"
    );
    // Set through the mount: stored with the ids on disk, and enforced.
    common::set_xattr(&shown, ACCESS_ACL, &acl_reading_for(100007, 100008));
    assert_eq!(get(&up.join("secret")), vec![(2, 7), (8, 8)]);
    assert_eq!(get(&shown), vec![(2, 100007), (8, 100008)]);
    assert!(common::as_user(100007, 100099, &cat).status.success());
    assert!(!common::as_user(100005, 100099, &cat).status.success());
}

/// mount(8) with `-t fuse.unionfs`: through mount.fuse3, which runs the
/// `unionfs` its search path finds first, and through the helper of its own,
/// /sbin/mount.fuse.unionfs, which mount(8) runs first: another program
/// named `unionfs` (Debian's unionfs-fuse installs one) is then never run.
/// `-f` (fake) checks and mounts nothing. One test: both steps use the
/// same installed names.
#[test]
fn the_mount_helper_form_works_with_mount_8() {
    let l = Layers::new("compat-helper");
    let _guard = MountGuard(l.mnt.clone());
    let mount_8 = |extra: &[&str]| {
        let mut c = Command::new("mount");
        c.args(extra)
            .args(["-t", "fuse.unionfs", "-o", &l.options(), "unionfs"])
            .arg(&l.mnt);
        run_to_end(c)
    };
    let umount_and_wait = || {
        let pid = daemon_of(&l.mnt).expect("daemon");
        assert!(
            Command::new("umount")
                .arg(&l.mnt)
                .status()
                .unwrap()
                .success()
        );
        wait_gone(pid);
    };
    // mount.fuse3 runs `unionfs SOURCE MNT -o OPTS` from the standard PATH.
    let link = PathBuf::from("/usr/local/sbin/unionfs");
    {
        let _installed = InstalledLink::new(&link, &bin());
        let out = mount_8(&[]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(fs::read_to_string(l.mnt.join("top")).unwrap(), "top\n");
        umount_and_wait();
    }
    // Another `unionfs` first in that path, and the helper installed.
    let decoy = l.s.path.join("decoy");
    let ran = l.s.path.join("decoy-ran");
    fs::write(
        &decoy,
        format!("#!/bin/sh\ntouch {}\nexit 1\n", ran.display()),
    )
    .unwrap();
    fs::set_permissions(&decoy, fs::Permissions::from_mode(0o755)).unwrap();
    let _other = InstalledLink::new(&link, &decoy);
    let _helper = InstalledLink::new(Path::new("/sbin/mount.fuse.unionfs"), &bin());
    let out = mount_8(&["-f"]);
    assert!(out.status.success(), "fake: {}", text(&out.stderr));
    assert!(!is_mounted(&l.mnt), "mount -f mounted");
    let out = mount_8(&[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(fs::read_to_string(l.mnt.join("top")).unwrap(), "top\n");
    assert!(!ran.exists(), "the other unionfs was run");
    umount_and_wait();
    // Bad options are refused in one line, nothing mounted.
    let mut c = Command::new("mount");
    c.args([
        "-t",
        "fuse.unionfs",
        "-o",
        "upperdir=/nonexistent",
        "unionfs",
    ])
    .arg(&l.mnt);
    let out = run_to_end(c);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no lowerdir given"),
        "{}",
        text(&out.stderr)
    );
    assert!(!is_mounted(&l.mnt));
}

/// `unionfs MNT` (the fuse-overlayfs habit, options forgotten) says what
/// is missing instead of taking MNT for a subcommand.
#[test]
fn a_mount_point_alone_says_what_is_missing() {
    let s = Scratch::new("compat-alone");
    let m = s.dir("m");
    let out = Command::new(bin()).arg(&m).output().unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(
        err.trim(),
        "unionfs: no lowerdir given (-o lowerdir=DIR[:DIR...])"
    );
    assert!(!is_mounted(&m));
}

/// A symlink to the binary under test at `path`, removed on drop (only if
/// this test made it).
struct InstalledLink(Option<PathBuf>);

impl InstalledLink {
    /// A symlink to `target` at `path`; one already there must point there.
    fn new(path: &Path, target: &Path) -> InstalledLink {
        if fs::symlink_metadata(path).is_ok() {
            assert_eq!(
                fs::read_link(path).ok().as_deref(),
                Some(target),
                "{} exists already",
                path.display()
            );
            return InstalledLink(None);
        }
        std::os::unix::fs::symlink(target, path).unwrap();
        InstalledLink(Some(path.to_path_buf()))
    }
}

impl Drop for InstalledLink {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = fs::remove_file(p);
        }
    }
}

/// A union detached while busy and a new one mounted at the same path (as
/// container engines do when a container restarts): when the old daemon's
/// session ends, the new union must stay mounted.
#[test]
fn a_daemon_on_its_way_out_leaves_a_new_mount_at_its_path_alone() {
    let l = Layers::new("compat-remount");
    let opts = format!("lowerdir={}:{}", l.l1.display(), l.l2.display());
    let mnt = l.mnt.to_str().unwrap();
    let _guard = MountGuard(l.mnt.clone());
    assert!(compat(&["-o", &opts, mnt]).status.success());
    let old = daemon_of(&l.mnt).expect("the first daemon");
    // A process keeps a file of the first union open, so the detached
    // union lives on until it lets go.
    let holder = Command::new("sleep")
        .arg("30")
        .stdin(fs::File::open(l.mnt.join("top")).unwrap())
        .spawn()
        .unwrap();
    umount_lazy(&l.mnt);
    assert!(compat(&["-o", &opts, mnt]).status.success());
    let new = daemons_of(&l.mnt)
        .into_iter()
        .find(|p| *p != old)
        .expect("the second daemon");
    let mut holder = holder;
    holder.kill().unwrap();
    holder.wait().unwrap();
    wait_gone(old);
    assert!(is_mounted(&l.mnt), "the old daemon took the new union down");
    assert_eq!(fs::read_to_string(l.mnt.join("top")).unwrap(), "top\n");
    assert!(Path::new(&format!("/proc/{new}")).exists());
    umount_lazy(&l.mnt);
    wait_gone(new);
}
