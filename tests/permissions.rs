//! Permission rules against the kernel's overlayfs: the same scripts, run
//! as root, as an owner in and out of the file's group and as a stranger,
//! on `mount -t overlay` and on unionfs over the same lower layer, must
//! leave the same modes, owners and ACLs (set-id bits dropped on write,
//! truncate, fallocate, chown and access-ACL changes; the umask not applied
//! under a default ACL), and writes through a shared mapping must move the
//! times at once.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// Kernel overlayfs and unionfs over one lower directory, side by side.
struct Twins {
    kernel: Mount,
    ours: Mount,
    kupper: PathBuf,
    uupper: PathBuf,
    _s: Scratch,
}

impl Twins {
    fn over(s: Scratch, lower: &Path) -> Twins {
        let lowers = vec![lower.to_path_buf()];
        let (kupper, kwork, kmnt) = (s.dir("kupper"), s.dir("kwork"), s.dir("kmnt"));
        let (uupper, umnt) = (s.dir("uupper"), s.dir("umnt"));
        let kernel = Mount::kernel(&lowers, &kupper, &kwork, &kmnt);
        let ours = Mount::unionfs(&lowers, &uupper, &umnt, &[]);
        Twins {
            kernel,
            ours,
            kupper,
            uupper,
            _s: s,
        }
    }

    /// Runs `script` in both mounts as `who`; returns (kernel, unionfs)
    /// outputs, stdout and stderr together.
    fn run(&self, who: &Who, script: &str) -> (String, String) {
        (
            who.run(&self.kernel.mnt, script),
            who.run(&self.ours.mnt, script),
        )
    }

    /// Runs `script` in both and requires the same output; a difference
    /// is shown line by line.
    fn same(&self, who: &Who, script: &str) -> String {
        let (k, u) = self.run(who, script);
        if u != k {
            let (kl, ul): (Vec<&str>, Vec<&str>) = (k.lines().collect(), u.lines().collect());
            let mut shown = String::new();
            for i in 0..kl.len().max(ul.len()) {
                let (a, b) = (kl.get(i).copied(), ul.get(i).copied());
                if a != b {
                    shown += &format!("  kernel:  {a:?}\n  unionfs: {b:?}\n");
                }
            }
            panic!("as {}, outputs differ:\n{shown}", who.name);
        }
        u
    }
}

/// A caller: uid, primary gid and supplementary groups.
struct Who {
    name: &'static str,
    uid: u32,
    gid: u32,
    groups: &'static [u32],
}

const ROOT: Who = Who {
    name: "root",
    uid: 0,
    gid: 0,
    groups: &[],
};
/// Owns the test files (100:100) and is in their group.
const OWNER_IN_GROUP: Who = Who {
    name: "owner in group",
    uid: 100,
    gid: 100,
    groups: &[],
};
/// Owns the test files but is not in their group.
const OWNER_NOT_IN_GROUP: Who = Who {
    name: "owner not in group",
    uid: 100,
    gid: 101,
    groups: &[],
};
/// Not the owner; in the files' group as a supplementary group.
const MEMBER: Who = Who {
    name: "member",
    uid: 200,
    gid: 200,
    groups: &[100],
};
const STRANGER: Who = Who {
    name: "stranger",
    uid: 200,
    gid: 200,
    groups: &[],
};

impl Who {
    fn run(&self, dir: &Path, script: &str) -> String {
        let mut cmd = Command::new("setpriv");
        cmd.arg(format!("--reuid={}", self.uid))
            .arg(format!("--regid={}", self.gid));
        if self.groups.is_empty() {
            cmd.arg("--clear-groups");
        } else {
            let g: Vec<String> = self.groups.iter().map(u32::to_string).collect();
            cmd.arg(format!("--groups={}", g.join(",")));
        }
        let out = cmd
            .args(["sh", "-c", script])
            .current_dir(dir)
            .env("LC_ALL", "C")
            .output()
            .expect("setpriv");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// A short tag for file names.
    fn tag(&self) -> String {
        self.name.replace(' ', "_")
    }
}

fn need(tool: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(found, "{tool} is missing: run tests/setup.sh");
}

/// What each caller does to a file; `{f}` is the file, `{g}` the caller's
/// primary group.
const FILE_OPS: &[(&str, &str)] = &[
    ("write", "echo x >> {f}"),
    ("truncate", "truncate -s 1 {f}"),
    ("otrunc", ": > {f}"),
    ("falloc", "fallocate -l 16384 {f}"),
    ("punch", "fallocate -p -o 0 -l 4096 {f}"),
    ("zero", "fallocate -z -o 0 -l 4096 {f}"),
    ("chgrp", "chgrp {g} {f}"),
    ("setfacl", "setfacl -m u::rwx,g::rwx,o::rwx {f}"),
    ("chmod", "chmod 2777 {f}"),
];

/// Directories get the operations that apply to them.
const DIR_OPS: &[(&str, &str)] = &[
    ("chgrp", "chgrp {g} {f}"),
    ("setfacl", "setfacl -m u::rwx,g::rwx,o::rwx {f}"),
    ("chmod", "chmod 2777 {f}"),
];

const FILE_MODES: &[u32] = &[0o6666, 0o6766, 0o6777, 0o2676];
const DIR_MODES: &[u32] = &[0o2755, 0o2777];
const CALLERS: &[&Who] = &[
    &ROOT,
    &OWNER_IN_GROUP,
    &OWNER_NOT_IN_GROUP,
    &MEMBER,
    &STRANGER,
];

fn file_name(place: &str, op: &str, mode: u32, who: &Who) -> String {
    format!("{place}-{op}-{mode:o}-{}", who.tag())
}

/// Makes every test object in `dir` with `prefix` (lower ones are made in
/// the lower layer, upper ones through the mount).
fn make_objects(dir: &Path, place: &str) {
    for who in CALLERS {
        for &(op, _) in FILE_OPS {
            for &mode in FILE_MODES {
                let p = dir.join(file_name(place, op, mode, who));
                fs::write(&p, vec![b'd'; 8192]).unwrap();
                std::os::unix::fs::chown(&p, Some(100), Some(100)).unwrap();
                fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
            }
        }
        for &(op, _) in DIR_OPS {
            for &mode in DIR_MODES {
                let p = dir.join(format!("d{}", file_name(place, op, mode, who)));
                fs::create_dir(&p).unwrap();
                std::os::unix::fs::chown(&p, Some(100), Some(100)).unwrap();
                fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
            }
        }
    }
}

/// The script a caller runs: each operation on its own objects, with any
/// failure reported (so refusals are compared too).
fn caller_script(place: &str, who: &Who) -> String {
    let mut script = String::new();
    let mut add = |prefix: &str, ops: &[(&str, &str)], modes: &[u32]| {
        for &(op, cmd) in ops {
            for &mode in modes {
                let f = format!("{prefix}{}", file_name(place, op, mode, who));
                let cmd = cmd.replace("{f}", &f).replace("{g}", &who.gid.to_string());
                script += &format!("{cmd} 2>/dev/null || echo '{f}: refused'\n");
            }
        }
    };
    add("", FILE_OPS, FILE_MODES);
    add("d", DIR_OPS, DIR_MODES);
    script
}

const SHOW: &str = "for f in *; do stat -c '%n %a %u:%g' \"$f\"; getfacl -cp \"$f\" 2>/dev/null | tr '\\n' ' '; echo; done";

/// Set-user-id and set-group-id after writes, truncates, fallocate (all
/// modes), chown, chmod and access-ACL changes, by root, by the owner in
/// and out of the group, by a group member and by a stranger, on files and
/// directories made in the upper and on ones copied up from the lower.
#[test]
fn set_id_bits_drop_as_the_kernel_drops_them() {
    need("setfacl");
    need("fallocate");
    let s = Scratch::new("setid");
    let lower = s.dir("lower");
    fs::set_permissions(&lower, fs::Permissions::from_mode(0o777)).unwrap();
    make_objects(&lower, "low");
    let t = Twins::over(s, &lower);
    for m in [&t.kernel.mnt, &t.ours.mnt] {
        make_objects(m, "up");
    }
    for who in CALLERS {
        for place in ["up", "low"] {
            t.same(who, &caller_script(place, who));
        }
    }
    let shown = t.same(&ROOT, SHOW);
    // The cases the kernel's rules (Linux 6.2+) decide, spelled out.
    let mode_of = |name: &str| -> String {
        shown
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} not listed"))
            .split(' ')
            .nth(1)
            .unwrap()
            .to_string()
    };
    for place in ["up", "low"] {
        let f = |op, mode, who: &Who| mode_of(&file_name(place, op, mode, who));
        for op in ["falloc", "punch", "zero", "write", "truncate", "otrunc"] {
            assert_eq!(
                f(op, 0o6666, &STRANGER),
                "666",
                "{place} {op} by a stranger"
            );
            assert_eq!(
                f(op, 0o6766, &STRANGER),
                "766",
                "{place} {op} by a stranger"
            );
            assert_eq!(f(op, 0o6666, &MEMBER), "2666", "{place} {op} by a member");
            assert_eq!(f(op, 0o6777, &MEMBER), "777", "{place} {op} by a member");
            assert_eq!(f(op, 0o6666, &ROOT), "6666", "{place} {op} by root");
        }
        assert_eq!(f("chgrp", 0o6666, &OWNER_NOT_IN_GROUP), "666");
        assert_eq!(f("chgrp", 0o6666, &OWNER_IN_GROUP), "2666");
        assert_eq!(f("setfacl", 0o6666, &OWNER_NOT_IN_GROUP), "4777");
        assert_eq!(f("setfacl", 0o6666, &OWNER_IN_GROUP), "6777");
        let d = |op, mode, who: &Who| mode_of(&format!("d{}", file_name(place, op, mode, who)));
        assert_eq!(d("setfacl", 0o2755, &OWNER_NOT_IN_GROUP), "777");
        assert_eq!(d("setfacl", 0o2755, &OWNER_IN_GROUP), "2777");
    }
    drop(t.ours);
    drop(t.kernel);
    let k = snapshot(&t.kupper, View::Upper);
    let u = snapshot(&t.uupper, View::Upper);
    let d = diff("kernel", &k, "unionfs", &u);
    assert!(d.is_empty(), "upper directories differ:\n{d}");
}

/// New files, directories and fifos under default ACLs and without, with
/// several umasks, as root and as a user; parents made in the upper and
/// copied up from the lower.
#[test]
fn the_umask_yields_to_a_default_acl_as_in_the_kernel() {
    need("setfacl");
    let s = Scratch::new("umask");
    let lower = s.dir("lower");
    let acls = [
        ("plain", None),
        ("narrow", Some("u::r-x,g::r--,o::---")),
        ("named", Some("u::rwx,u:65534:rwx,g::r-x,o::r-x")),
        ("masked", Some("u::rwx,g::rwx,o::rwx,m::r-x")),
    ];
    let make_parents = |root: &Path, place: &str| {
        for (name, acl) in &acls {
            let d = root.join(format!("{place}-{name}"));
            fs::create_dir(&d).unwrap();
            fs::set_permissions(&d, fs::Permissions::from_mode(0o2777)).unwrap();
            if let Some(acl) = acl {
                let ok = Command::new("setfacl")
                    .args(["-d", "-m", acl])
                    .arg(&d)
                    .status()
                    .unwrap();
                assert!(ok.success());
            }
        }
    };
    make_parents(&lower, "low");
    let t = Twins::over(s, &lower);
    for m in [&t.kernel.mnt, &t.ours.mnt] {
        make_parents(m, "up");
    }
    for who in [&ROOT, &STRANGER] {
        let mut script = String::new();
        for place in ["up", "low"] {
            for (name, _) in &acls {
                for umask in ["022", "722", "077", "000"] {
                    let base = format!("{place}-{name}/{}-{umask}", who.tag());
                    script += &format!(
                        "(umask {umask}; touch {base}-f; mkdir {base}-d; mkfifo {base}-p; mkdir -m 1777 {base}-m)\n"
                    );
                }
            }
        }
        t.same(who, &script);
    }
    t.same(
        &ROOT,
        "for d in *; do (cd $d && for f in *; do stat -c \"$d/%n %a %u:%g\" $f; \
         getfacl -cp $f 2>/dev/null | tr '\\n' ' '; echo; done); done",
    );
    let narrow = t.ours.mnt.join("up-narrow/stranger-722-f");
    assert_eq!(fs::metadata(narrow).unwrap().mode() & 0o7777, 0o440);
}

/// What a directory's default ACL is, is looked at once and kept for its
/// next creates: a default ACL set, changed or removed through the mount
/// after files were created in the directory counts from the next create on.
#[test]
fn a_default_acl_set_or_removed_between_creates_counts_at_once() {
    need("setfacl");
    let s = Scratch::new("acl-change");
    let lower = s.dir("lower");
    fs::create_dir(lower.join("low")).unwrap();
    let t = Twins::over(s, &lower);
    for who in [&ROOT, &STRANGER] {
        let mut script = String::from("mkdir -p up; chmod 777 up low 2>/dev/null;\n");
        for d in ["up", "low"] {
            let tag = format!("{d}/{}", who.tag());
            script += &format!(
                "umask 077; touch {tag}-before; \
                 setfacl -d -m u::rwx,g::r-x,o::r-x {d} 2>/dev/null; touch {tag}-set; \
                 setfacl -d -m u::rw-,g::---,o::r-- {d} 2>/dev/null; touch {tag}-changed; \
                 setfacl -k {d} 2>/dev/null; touch {tag}-removed\n"
            );
        }
        t.same(who, &script);
    }
    t.same(
        &ROOT,
        "for d in up low; do for f in $d/*; do stat -c '%n %a' $f; done; done",
    );
    let set = t.ours.mnt.join("up/root-set");
    assert_eq!(fs::metadata(set).unwrap().mode() & 0o777, 0o644);
    let removed = t.ours.mnt.join("up/root-removed");
    assert_eq!(fs::metadata(removed).unwrap().mode() & 0o777, 0o600);
}

/// Writes through a shared mapping move mtime and ctime at once, as the
/// kernel's overlay shows them (the FUSE inode is not told of such writes
/// when passthrough maps the backing file).
#[test]
fn writes_through_a_shared_mapping_move_the_times() {
    let s = Scratch::new("mmap");
    let lower = s.dir("lower");
    write(&lower.join("from-lower"), &"l".repeat(4096));
    let t = Twins::over(s, &lower);
    for mnt in [&t.kernel.mnt, &t.ours.mnt] {
        let which = if *mnt == t.kernel.mnt {
            "kernel"
        } else {
            "unionfs"
        };
        for name in ["new", "from-lower"] {
            let p = mnt.join(name);
            if name == "new" {
                fs::write(&p, vec![0u8; 4096]).unwrap();
            }
            let moved = mapped_write_moves_times(&p);
            assert_eq!(moved, (true, true), "{which}: {name}: (mtime, ctime) moved");
        }
    }
}

/// Maps `p` shared, sets old times, writes through the mapping and syncs
/// it; whether stat then shows a newer mtime and ctime.
fn mapped_write_moves_times(p: &Path) -> (bool, bool) {
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .unwrap();
    let map = SharedMap::new(&f, 4096).unwrap();
    set_mtime(p, 1_000_000_000);
    let before = fs::metadata(p).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    map.poke(b"hello");
    map.sync();
    let after = fs::metadata(p).unwrap();
    drop(map);
    let ctime = |m: &fs::Metadata| (m.ctime(), m.ctime_nsec());
    (
        after.mtime() > before.mtime(),
        ctime(&after) > ctime(&before),
    )
}

/// The ways a file's data can change with no WRITE reaching the daemon
/// when passthrough maps, splices or copies into the backing file.
#[derive(Clone, Copy, Debug)]
enum DataChange {
    /// Written through a shared mapping, msync, munmap, close.
    MappedSynced,
    /// Written through a shared mapping, munmap without msync, close.
    MappedUnsynced,
    /// Mapped, the descriptor closed, then written through the mapping
    /// and unmapped.
    MappedAfterClose,
    CopyFileRange,
    Fallocate,
    Splice,
}

const DATA_CHANGES: [DataChange; 6] = [
    DataChange::MappedSynced,
    DataChange::MappedUnsynced,
    DataChange::MappedAfterClose,
    DataChange::CopyFileRange,
    DataChange::Fallocate,
    DataChange::Splice,
];

/// Applies `change` to the 8 KiB file `p` (`src`: another file of the
/// mount to copy from).
fn change_data(p: &Path, src: &Path, change: DataChange) {
    use std::os::fd::AsRawFd;
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .unwrap();
    let fd = f.as_raw_fd();
    let map = || SharedMap::new(&f, 8192).unwrap();
    match change {
        DataChange::MappedSynced => {
            let m = map();
            m.poke(b"abcd");
            m.sync();
        }
        DataChange::MappedUnsynced => map().poke(b"abcd"),
        DataChange::MappedAfterClose => {
            let m = map();
            drop(f);
            std::thread::sleep(std::time::Duration::from_millis(20));
            m.poke(b"abcd");
            return;
        }
        DataChange::CopyFileRange => {
            let from = fs::File::open(src).unwrap();
            let mut off: i64 = 4096;
            let n = unsafe {
                libc::copy_file_range(
                    from.as_raw_fd(),
                    std::ptr::null_mut(),
                    fd,
                    &mut off,
                    8192,
                    0,
                )
            };
            assert_eq!(n, 8192);
        }
        DataChange::Fallocate => {
            assert_eq!(unsafe { libc::fallocate(fd, 0, 0, 65536) }, 0);
        }
        DataChange::Splice => {
            let mut pipe = [0; 2];
            assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
            assert_eq!(
                unsafe { libc::write(pipe[1], b"x".repeat(100).as_ptr().cast(), 100) },
                100
            );
            let mut off: i64 = 10000;
            let n = unsafe { libc::splice(pipe[0], std::ptr::null_mut(), fd, &mut off, 100, 0) };
            assert_eq!(n, 100);
            unsafe {
                libc::close(pipe[0]);
                libc::close(pipe[1]);
            }
        }
    }
    drop(f);
}

/// mtime and size as `stat` in another process prints them.
fn stat_elsewhere(p: &Path) -> (i64, u64) {
    let o = Command::new("stat")
        .arg("-c")
        .arg("%Y %s")
        .arg(p)
        .output()
        .unwrap();
    let t = text(&o.stdout);
    let mut w = t.split_whitespace().map(|x| x.parse::<i64>().unwrap());
    (w.next().unwrap(), w.next().unwrap() as u64)
}

/// After the descriptor (and mapping) is gone, stat — here and from
/// another process — shows the new mtime and size of a file whose data
/// changed without a write(2), though its attributes were cached before
/// the open (a setattr answered with the mount's timeout), as on the
/// kernel's overlay; unionfs's shows what its upper file has.
#[test]
fn the_times_of_data_changed_without_write_show_after_close() {
    let s = Scratch::new("mtime");
    let lower = s.dir("lower");
    for c in DATA_CHANGES {
        write(&lower.join(format!("lower-{c:?}")), &"l".repeat(8192));
    }
    let t = Twins::over(s, &lower);
    for (which, mnt, upper) in [
        ("kernel", &t.kernel.mnt, &t.kupper),
        ("unionfs", &t.ours.mnt, &t.uupper),
    ] {
        let src = mnt.join("src");
        fs::write(&src, vec![7u8; 8192]).unwrap();
        for c in DATA_CHANGES {
            for name in [format!("new-{c:?}"), format!("lower-{c:?}")] {
                let p = mnt.join(&name);
                if name.starts_with("new") {
                    fs::write(&p, vec![0u8; 8192]).unwrap();
                }
                // Every open released, then times set by path and read:
                // the kernel keeps these attributes for the timeout.
                std::thread::sleep(std::time::Duration::from_millis(50));
                set_mtime(&p, 1_000_000_000);
                assert_eq!(fs::metadata(&p).unwrap().mtime(), 1_000_000_000);
                change_data(&p, &src, c);
                // `stat -c` asks statx for the fields it prints only: a
                // kept mtime answers it even when the atime is stale.
                let there = stat_elsewhere(&p);
                let here = fs::metadata(&p).unwrap();
                assert!(
                    here.mtime() > 1_000_000_000,
                    "{which}: {name}: mtime not moved"
                );
                assert_eq!(
                    there,
                    (here.mtime(), here.len()),
                    "{which}: {name}: another process"
                );
                if which == "unionfs" {
                    let real = fs::metadata(upper.join(&name)).unwrap();
                    let ns = |m: &fs::Metadata| {
                        m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128
                    };
                    // With the writeback cache the kernel stamps its own
                    // mtime on a copy_file_range a moment before the
                    // daemon's copy stamps the upper file's (seen: 1.4-3.6
                    // ms apart): the same moment, not the same nanosecond.
                    let slack = if writeback_on() { 100_000_000 } else { 0 };
                    assert!(
                        (ns(&here) - ns(&real)).abs() <= slack && here.len() == real.len(),
                        "{which}: {name}: shown and upper file: {:?} against {:?}",
                        (here.mtime(), here.mtime_nsec(), here.len()),
                        (real.mtime(), real.mtime_nsec(), real.len())
                    );
                }
            }
        }
    }
}
