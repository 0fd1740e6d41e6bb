//! The kernel's overlayfs as the oracle: the same operations on
//! `mount -t overlay` and on unionfs, over the same lower layers, must give the
//! same result (value or errno) one by one, the same merged view and the same
//! upper directory.

mod common;

use std::ffi::CString;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::*;

#[derive(Clone, Debug)]
enum Op {
    Write(String, String),
    Append(String, String),
    Truncate(String, u64),
    Mkdir(String, u32),
    Rmdir(String),
    Unlink(String),
    Rename(String, String, u32),
    Symlink(String, String),
    Link(String, String),
    Chmod(String, u32),
    Chown(String, u32, u32),
    SetXattr(String, String, String),
    RemoveXattr(String, String),
    Mkfifo(String),
    Read(String),
    List(String),
    Stat(String),
    RemoveAll(String),
}

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn res<T>(r: std::io::Result<T>, ok: impl FnOnce(T) -> String) -> String {
    match r {
        Ok(v) => format!("ok {}", ok(v)),
        Err(e) => format!("err {}", e.raw_os_error().unwrap_or(-1)),
    }
}

fn sys(r: i32) -> String {
    if r == 0 {
        "ok ".into()
    } else {
        format!(
            "err {}",
            std::io::Error::last_os_error().raw_os_error().unwrap()
        )
    }
}

fn remove_all(p: &Path) -> std::io::Result<()> {
    let m = fs::symlink_metadata(p)?;
    if m.is_dir() {
        for e in fs::read_dir(p)? {
            remove_all(&e?.path())?;
        }
        fs::remove_dir(p)
    } else {
        fs::remove_file(p)
    }
}

/// Applies one operation under `root` and describes its outcome.
fn apply(root: &Path, op: &Op) -> String {
    let p = |s: &str| root.join(s);
    if let Op::Write(f, _) | Op::Append(f, _) | Op::Truncate(f, _) | Op::Read(f) = op {
        // Opening a fifo would wait for a partner.
        if fs::metadata(p(f)).is_ok_and(|m| m.file_type().is_fifo()) {
            return "fifo".into();
        }
    }
    match op {
        Op::Write(f, d) => res(fs::write(p(f), d), |_| String::new()),
        Op::Append(f, d) => res(
            OpenOptions::new()
                .append(true)
                .open(p(f))
                .and_then(|mut h| h.write_all(d.as_bytes())),
            |_| String::new(),
        ),
        Op::Truncate(f, n) => res(
            OpenOptions::new()
                .write(true)
                .open(p(f))
                .and_then(|h| h.set_len(*n)),
            |_| String::new(),
        ),
        Op::Mkdir(f, m) => res(
            fs::create_dir(p(f))
                .and_then(|_| fs::set_permissions(p(f), fs::Permissions::from_mode(*m))),
            |_| String::new(),
        ),
        Op::Rmdir(f) => res(fs::remove_dir(p(f)), |_| String::new()),
        Op::Unlink(f) => res(fs::remove_file(p(f)), |_| String::new()),
        Op::Rename(a, b, flags) => {
            let (ca, cb) = (c(&p(a)), c(&p(b)));
            sys(unsafe {
                libc::renameat2(
                    libc::AT_FDCWD,
                    ca.as_ptr(),
                    libc::AT_FDCWD,
                    cb.as_ptr(),
                    *flags,
                )
            })
        }
        Op::Symlink(t, f) => res(std::os::unix::fs::symlink(t, p(f)), |_| String::new()),
        Op::Link(a, b) => res(fs::hard_link(p(a), p(b)), |_| String::new()),
        Op::Chmod(f, m) => {
            let cf = c(&p(f));
            sys(unsafe { libc::fchmodat(libc::AT_FDCWD, cf.as_ptr(), *m, 0) })
        }
        Op::Chown(f, u, g) => {
            let cf = c(&p(f));
            sys(unsafe { libc::lchown(cf.as_ptr(), *u, *g) })
        }
        Op::SetXattr(f, n, v) => {
            let (cf, cn) = (c(&p(f)), CString::new(n.as_str()).unwrap());
            sys(unsafe { libc::lsetxattr(cf.as_ptr(), cn.as_ptr(), v.as_ptr().cast(), v.len(), 0) })
        }
        Op::RemoveXattr(f, n) => {
            let (cf, cn) = (c(&p(f)), CString::new(n.as_str()).unwrap());
            sys(unsafe { libc::lremovexattr(cf.as_ptr(), cn.as_ptr()) })
        }
        Op::Mkfifo(f) => {
            let cf = c(&p(f));
            sys(unsafe { libc::mkfifo(cf.as_ptr(), 0o640) })
        }
        Op::Read(f) => res(fs::read(p(f)), |d| format!("{:x}", fnv(&d))),
        Op::List(f) => res(
            fs::read_dir(p(f)).and_then(|it| {
                it.map(|e| e.map(|e| e.file_name()))
                    .collect::<Result<Vec<_>, _>>()
            }),
            |mut v| {
                v.sort();
                format!("{v:?}")
            },
        ),
        Op::Stat(f) => res(fs::symlink_metadata(p(f)), |m| {
            let nlink = if m.is_dir() { 0 } else { m.nlink() };
            let size = if m.is_dir() { 0 } else { m.len() };
            format!("{:o} {} {} {} {}", m.mode(), m.uid(), m.gid(), size, nlink)
        }),
        Op::RemoveAll(f) => res(remove_all(&p(f)), |_| String::new()),
    }
}

/// A pair of unions over the same lowers: the kernel's and ours.
struct Pair {
    kernel: Mount,
    ours: Mount,
    kupper: PathBuf,
    uupper: PathBuf,
    _scratch: Scratch,
}

impl Pair {
    fn new(tag: &str) -> Pair {
        let s = Scratch::new(tag);
        let lowers = standard_lowers(&s);
        let (kupper, kwork, kmnt) = (s.dir("kupper"), s.dir("kwork"), s.dir("kmnt"));
        let (uupper, umnt) = (s.dir("uupper"), s.dir("umnt"));
        let kernel = Mount::kernel(&lowers, &kupper, &kwork, &kmnt);
        let ours = Mount::unionfs(&lowers, &uupper, &umnt, &[]);
        Pair {
            kernel,
            ours,
            kupper,
            uupper,
            _scratch: s,
        }
    }

    /// Runs `ops` on both; panics on the first different outcome.
    fn run(&self, label: &str, ops: &[Op]) {
        for (i, op) in ops.iter().enumerate() {
            let k = apply(&self.kernel.mnt, op);
            let u = apply(&self.ours.mnt, op);
            if std::env::var_os("UNIONFS_DIFF_TRACE").is_some() {
                eprintln!("{label} #{i}: {op:?} -> {u}");
            }
            assert_eq!(
                u, k,
                "{label}: operation {i} {op:?} differs (unionfs vs kernel)"
            );
        }
    }

    fn compare_views(&self, label: &str) {
        let k = snapshot(&self.kernel.mnt, View::Merged);
        let u = snapshot(&self.ours.mnt, View::Merged);
        let d = diff("kernel", &k, "unionfs", &u);
        assert!(d.is_empty(), "{label}: merged views differ:\n{d}");
        let k = snapshot(&self.kupper, View::Upper);
        let u = snapshot(&self.uupper, View::Upper);
        let d = diff("kernel", &k, "unionfs", &u);
        assert!(d.is_empty(), "{label}: upper directories differ:\n{d}");
    }
}

fn s(x: &str) -> String {
    x.to_string()
}

/// Named scenarios: each a script of operations.
fn scenarios() -> Vec<(&'static str, Vec<Op>)> {
    use Op::*;
    vec![
        (
            "write lower file",
            vec![
                Write(s("bottom-only"), s("new")),
                Read(s("bottom-only")),
                Stat(s("bottom-only")),
            ],
        ),
        (
            "append deep lower file",
            vec![
                Append(s("dir/sub/leaf"), s("+")),
                Read(s("dir/sub/leaf")),
                List(s("dir")),
            ],
        ),
        (
            "truncate",
            vec![
                Truncate(s("big"), 100),
                Read(s("big")),
                Truncate(s("top-only"), 0),
            ],
        ),
        (
            "unlink lower",
            vec![Unlink(s("shadowed")), Stat(s("shadowed")), List(s(""))],
        ),
        (
            "unlink then recreate",
            vec![
                Unlink(s("shadowed")),
                Write(s("shadowed"), s("again")),
                Read(s("shadowed")),
            ],
        ),
        (
            "rmdir merged nonempty",
            vec![
                Rmdir(s("merged")),
                RemoveAll(s("merged")),
                Stat(s("merged")),
                Mkdir(s("merged"), 0o755),
                List(s("merged")),
            ],
        ),
        (
            "remove opaque dir",
            vec![
                RemoveAll(s("opaque")),
                Mkdir(s("opaque"), 0o700),
                List(s("opaque")),
            ],
        ),
        (
            "mkdir in lower dir",
            vec![
                Mkdir(s("dir/new"), 0o750),
                Write(s("dir/new/f"), s("f")),
                List(s("dir")),
            ],
        ),
        (
            "rename lower file",
            vec![
                Rename(s("bottom-only"), s("renamed"), 0),
                Read(s("renamed")),
                Stat(s("bottom-only")),
            ],
        ),
        (
            "rename over lower file",
            vec![
                Rename(s("top-only"), s("shadowed"), 0),
                Read(s("shadowed")),
                List(s("")),
            ],
        ),
        (
            "rename into merged dir",
            vec![
                Rename(s("top-only"), s("merged/moved"), 0),
                List(s("merged")),
            ],
        ),
        (
            "rename lower dir",
            vec![
                Rename(s("dir"), s("dir2"), 0),
                Rename(s("merged"), s("m2"), 0),
            ],
        ),
        (
            "rename upper dir",
            vec![
                Mkdir(s("u"), 0o755),
                Write(s("u/f"), s("1")),
                Rename(s("u"), s("v"), 0),
                List(s("v")),
            ],
        ),
        (
            "rename upper dir over empty merged",
            vec![
                RemoveAll(s("merged/deep")),
                Unlink(s("merged/from-top")),
                Unlink(s("merged/from-bottom")),
                Mkdir(s("u"), 0o755),
                Rename(s("u"), s("merged"), 0),
                List(s("merged")),
            ],
        ),
        (
            "rename noreplace/exchange",
            vec![
                Rename(s("top-only"), s("bottom-only"), libc::RENAME_NOREPLACE),
                Rename(s("top-only"), s("bottom-only"), libc::RENAME_EXCHANGE),
                Read(s("top-only")),
                Read(s("bottom-only")),
            ],
        ),
        (
            "rename whiteout flag",
            vec![Rename(s("top-only"), s("x"), libc::RENAME_WHITEOUT)],
        ),
        (
            "symlinks",
            vec![
                Symlink(s("bottom-only"), s("sl")),
                Read(s("sl")),
                Symlink(s("x"), s("top-only")),
                Unlink(s("link")),
                Symlink(s("y"), s("link")),
            ],
        ),
        (
            "hard links",
            vec![
                Link(s("bottom-only"), s("hl")),
                Stat(s("hl")),
                Stat(s("bottom-only")),
                Append(s("hl"), s("x")),
                Read(s("bottom-only")),
                Unlink(s("bottom-only")),
                Stat(s("hl")),
            ],
        ),
        (
            "chmod chown",
            vec![
                Chmod(s("top-only"), 0o600),
                Chown(s("bottom-only"), 1000, 1000),
                Chmod(s("merged"), 0o700),
                Chown(s("link"), 5, 5),
                Stat(s("top-only")),
                Stat(s("merged")),
            ],
        ),
        (
            "xattrs",
            vec![
                SetXattr(s("top-only"), s("user.a"), s("1")),
                RemoveXattr(s("bottom-only"), s("user.tag")),
                RemoveXattr(s("shadowed"), s("user.none")),
                SetXattr(s("merged"), s("user.d"), s("dir")),
            ],
        ),
        (
            "special files",
            vec![
                Mkfifo(s("newfifo")),
                Chmod(s("fifo"), 0o600),
                Chmod(s("null"), 0o600),
                Unlink(s("fifo")),
                Mkfifo(s("fifo")),
            ],
        ),
        (
            "file over dir",
            vec![
                Unlink(s("file-over-dir")),
                Stat(s("file-over-dir")),
                Mkdir(s("file-over-dir"), 0o755),
                List(s("file-over-dir")),
            ],
        ),
        (
            "whiteout in lower",
            vec![
                Stat(s("merged/gone")),
                Write(s("merged/gone"), s("back")),
                Read(s("merged/gone")),
            ],
        ),
        (
            "read-only dir copy-up",
            vec![
                Write(s("ro/inner"), s("x")),
                Stat(s("ro")),
                Chmod(s("ro"), 0o755),
                Write(s("ro/new"), s("n")),
            ],
        ),
        (
            "setgid dir",
            vec![
                Write(s("sgid/n"), s("n")),
                Mkdir(s("sgid/d"), 0o755),
                Stat(s("sgid/n")),
                Stat(s("sgid/d")),
            ],
        ),
        (
            "rm -rf everything",
            vec![
                RemoveAll(s("merged")),
                RemoveAll(s("dir")),
                RemoveAll(s("opaque")),
                RemoveAll(s("sgid")),
                Chmod(s("ro"), 0o755),
                RemoveAll(s("ro")),
                List(s("")),
            ],
        ),
        (
            "errors",
            vec![
                Rmdir(s("top-only")),
                Unlink(s("merged")),
                Mkdir(s("top-only"), 0o755),
                Write(s("nodir/f"), s("x")),
                Link(s("merged"), s("ml")),
                Rename(s("merged"), s("top-only"), 0),
                Rename(s("top-only"), s("merged"), 0),
            ],
        ),
    ]
}

#[test]
fn scenarios_match_the_kernel() {
    for (name, ops) in scenarios() {
        let pair = Pair::new("diff");
        pair.run(name, &ops);
        pair.compare_views(name);
    }
}

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545F4914F6CDD1D)
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[(self.next() % v.len() as u64) as usize]
    }
}

const DIRS: &[&str] = &[
    "",
    "merged",
    "dir",
    "dir/sub",
    "opaque",
    "merged/deep",
    "n",
    "n/m",
    "sgid",
];
const NAMES: &[&str] = &[
    "a",
    "b",
    "n",
    "m",
    "shadowed",
    "top-only",
    "bottom-only",
    "from-top",
    "from-bottom",
    "gone",
    "deep",
    "file",
    "leaf",
    "sub",
    "visible",
    "hidden",
    "big",
    "link",
    "fifo",
];

fn random_path(r: &mut Rng) -> String {
    let d = r.pick(DIRS);
    let n = r.pick(NAMES);
    if d.is_empty() {
        n.to_string()
    } else {
        format!("{d}/{n}")
    }
}

fn random_op(r: &mut Rng) -> Op {
    use Op::*;
    let p = random_path(r);
    let q = random_path(r);
    let data = format!("{}", r.next() % 1000);
    match r.next() % 20 {
        0 | 1 => Write(p, data),
        2 => Append(p, data),
        3 => Truncate(p, r.next() % 10),
        4 | 5 => Mkdir(p, *r.pick(&[0o755, 0o700, 0o2775])),
        6 => Rmdir(p),
        7 | 8 => Unlink(p),
        9 | 10 => Rename(
            p,
            q,
            *r.pick(&[0, 0, libc::RENAME_NOREPLACE, libc::RENAME_EXCHANGE]),
        ),
        11 => Symlink(q, p),
        12 => Link(p, q),
        13 => Chmod(p, *r.pick(&[0o600, 0o755, 0o4755])),
        14 => Chown(p, *r.pick(&[0, 1000]), *r.pick(&[0, 1000])),
        15 => SetXattr(p, r.pick(&["user.a", "user.b"]).to_string(), data),
        16 => RemoveXattr(p, r.pick(&["user.a", "user.tag"]).to_string()),
        17 => Read(p),
        18 => List(r.pick(DIRS).to_string()),
        _ => {
            if r.next().is_multiple_of(4) {
                RemoveAll(p)
            } else {
                Stat(p)
            }
        }
    }
}

#[test]
fn random_operations_match_the_kernel() {
    let seeds: Vec<u64> = match std::env::var("UNIONFS_DIFF_SEEDS") {
        Ok(v) => v.split(',').map(|s| s.parse().unwrap()).collect(),
        Err(_) => (1..=12).collect(),
    };
    let per_seed: usize = std::env::var("UNIONFS_DIFF_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let mut total = 0;
    for seed in seeds {
        let pair = Pair::new("rand");
        let mut r = Rng(seed.wrapping_mul(0x9E3779B97F4A7C15) | 1);
        let ops: Vec<Op> = (0..per_seed).map(|_| random_op(&mut r)).collect();
        for (chunk_no, chunk) in ops.chunks(100).enumerate() {
            let label = format!("seed {seed}, operations {}..", chunk_no * 100);
            pair.run(&label, chunk);
            pair.compare_views(&label);
        }
        // Finally `rm -rf` of everything that is left.
        let everything: Vec<Op> = fs::read_dir(&pair.kernel.mnt)
            .unwrap()
            .map(|e| Op::RemoveAll(e.unwrap().file_name().to_string_lossy().into_owned()))
            .collect();
        pair.run(&format!("seed {seed}, rm -rf"), &everything);
        pair.run(&format!("seed {seed}, rm -rf"), &[Op::List(String::new())]);
        pair.compare_views(&format!("seed {seed}, after rm -rf"));
        assert!(
            fs::read_dir(&pair.ours.mnt).unwrap().next().is_none(),
            "seed {seed}: rm -rf left something"
        );
        total += ops.len() + everything.len();
    }
    eprintln!("random differential: {total} operations matched the kernel");
}
