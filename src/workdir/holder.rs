//! Who holds a work directory: the holder file (`WORKDIR/unionfs.holder`,
//! mode 0600) that a union writes once it is mounted. The next claimant
//! reads it to say at once what holds the upper (a mount and where, or a
//! `unionfs run`, with the pid serving it) and to tell a live holder from a
//! daemon on its way out, whose mount is already gone (container engines
//! unmount and mount again at once).

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use tracing::warn;

use crate::sys;

/// The file in the work directory that names the union holding it.
pub const HOLDER_FILE: &str = "unionfs.holder";

/// What serves the union that holds a work directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// `unionfs mount` or the fuse-overlayfs command line.
    Mount,
    /// `unionfs run`: the union is mounted in the launcher's own mount
    /// namespace, out of sight of other processes.
    Run,
}

impl Role {
    fn word(self) -> &'static str {
        match self {
            Role::Mount => "mount",
            Role::Run => "run",
        }
    }

    fn from_word(w: &str) -> Option<Role> {
        match w {
            "mount" => Some(Role::Mount),
            "run" => Some(Role::Run),
            _ => None,
        }
    }
}

/// What the holder file says of the union holding the work directory.
#[derive(Debug, PartialEq)]
pub struct Holder {
    /// The FUSE connection's device minor: reused by the next FUSE
    /// mount anywhere once this one is gone.
    minor: u32,
    /// The mount's unique id and the mount namespace it was made in
    /// (Linux 6.8+, absent in holder files of older versions): never
    /// reused, so no other mount can pass for this one.
    mount: Option<(u64, u64)>,
    /// The process serving the union and what it is (absent in holder
    /// files of older versions).
    process: Option<(i32, Role)>,
    /// Where it is mounted (a second line; absent in older files).
    mountpoint: Option<PathBuf>,
}

/// What a claimant finds when the work directory is locked.
#[derive(Debug, PartialEq)]
pub enum Found {
    /// A live union holds it (None: one that has not said which yet, or
    /// an older version).
    Mounted(Option<Holder>),
    /// Its union is unmounted; the daemon has not exited yet.
    Leaving(Holder),
    /// The holder has not said who it is yet: it is writing the file, or
    /// still mounting while the file names the union before it, whose
    /// process is gone. Look again.
    Unsaid,
}

impl Holder {
    fn parse(text: &[u8]) -> Option<Holder> {
        let (first, rest) = match text.iter().position(|&b| b == b'\n') {
            Some(i) => (&text[..i], &text[i + 1..]),
            None => (text, &[][..]),
        };
        let mut words = std::str::from_utf8(first).ok()?.split_whitespace();
        let minor = words.next()?.parse().ok()?;
        let mut number = || words.next().and_then(|w| w.parse::<u64>().ok());
        let (id, ns) = (number(), number());
        let pid = number().and_then(|p| i32::try_from(p).ok());
        let role = words.next().and_then(Role::from_word);
        let mountpoint = rest.strip_suffix(b"\n").unwrap_or(rest);
        Some(Holder {
            minor,
            mount: id.zip(ns),
            process: pid.zip(role),
            mountpoint: (!mountpoint.is_empty())
                .then(|| PathBuf::from(OsStr::from_bytes(mountpoint))),
        })
    }

    fn render(&self) -> Vec<u8> {
        let (id, ns) = self.mount.map_or(("-".into(), "-".into()), |(i, n)| {
            (i.to_string(), n.to_string())
        });
        let (pid, role) = self
            .process
            .map_or(("-".into(), "-"), |(p, r)| (p.to_string(), r.word()));
        let mut out = format!("{} {id} {ns} {pid} {role}\n", self.minor).into_bytes();
        if let Some(m) = &self.mountpoint {
            out.extend_from_slice(m.as_os_str().as_bytes());
            out.push(b'\n');
        }
        out
    }

    /// Whether the union is still mounted. The unique id settles it in the
    /// namespace the mount was made in; elsewhere the serving process's own
    /// mount table shows it (a run's union lives in the launcher's
    /// namespace); failing that, the FUSE connection is looked for.
    fn is_mounted(&self) -> bool {
        if let Some((id, ns)) = self.mount
            && own_mount_namespace() == Some(ns)
            && let Ok(listed) = sys::mount_is_listed(id)
        {
            return listed;
        }
        if let Some((pid, _)) = self.process
            && let Some(listed) = listed_in_namespace_of(pid, self.minor)
        {
            return listed;
        }
        fuse_connection_alive(self.minor)
    }

    /// Whether the process the file names has exited (false when it names
    /// none).
    fn process_is_gone(&self) -> bool {
        self.process.is_some_and(|(pid, _)| {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
                == Err(nix::errno::Errno::ESRCH)
        })
    }

    /// The serving process, where the file names it.
    pub fn pid(&self) -> Option<i32> {
        self.process.map(|(p, _)| p)
    }

    /// What holds the work directory, and the way out, after "in use by".
    pub fn in_use_by(&self) -> String {
        match (self.process, &self.mountpoint) {
            (Some((pid, Role::Run)), _) => {
                format!(
                    "a unionfs run (pid {pid}); wait for it to end, or use another upper directory"
                )
            }
            (Some((pid, Role::Mount)), Some(m)) => format!(
                "the union mounted at {} (pid {pid}); unmount it first (umount {}), or give another -o workdir=",
                m.display(),
                m.display()
            ),
            _ => IN_USE_BY_ANOTHER.into(),
        }
    }
}

/// What holds a work directory whose holder has not said.
pub const IN_USE_BY_ANOTHER: &str = "another mount; unmount it first or give another -o workdir=";

/// Reads the holder file of the locked work directory `top`. Without one
/// (a union that has not written it yet, or an older version) the holder
/// counts as mounted.
pub fn find(top: BorrowedFd<'_>) -> Found {
    let Ok(f) = sys::open_at(top, OsStr::new(HOLDER_FILE), libc::O_RDONLY) else {
        return Found::Mounted(None);
    };
    let mut text = Vec::new();
    if std::fs::File::from(f).read_to_end(&mut text).is_err() {
        return Found::Mounted(None);
    }
    match Holder::parse(&text) {
        Some(h) if h.is_mounted() => Found::Mounted(Some(h)),
        Some(h) if h.process_is_gone() => Found::Unsaid,
        Some(h) => Found::Leaving(h),
        None if text.is_empty() => Found::Unsaid,
        None => Found::Mounted(None),
    }
}

/// Records which union holds the work directory `top`: the one mounted at
/// `mountpoint`, served by this process as `role`.
pub fn record(top: BorrowedFd<'_>, mountpoint: &Path, role: Role) {
    let Some(minor) = fuse_minor_of(mountpoint) else {
        return;
    };
    let unique_id = sys::open_dir_path(mountpoint)
        .ok()
        .and_then(|fd| sys::unique_mount_id(fd.as_fd()));
    let holder = Holder {
        minor,
        mount: unique_id.zip(own_mount_namespace()),
        process: Some((std::process::id() as i32, role)),
        mountpoint: Some(mountpoint.to_path_buf()),
    };
    let made = sys::create_or_truncate(top, OsStr::new(HOLDER_FILE), 0o600).and_then(|f| {
        let mut f = std::fs::File::from(f);
        f.write_all(&holder.render()).map_err(|e| sys::errno_of(&e))
    });
    if let Err(e) = made {
        warn!("cannot record the mount in the work directory: {e}");
    }
}

/// The inode number of this process's mount namespace.
fn own_mount_namespace() -> Option<u64> {
    std::fs::metadata("/proc/self/ns/mnt").ok().map(|m| m.ino())
}

/// Whether the mount table of process `pid`'s namespace lists the FUSE
/// connection `minor`; None when it cannot be read (the process is gone,
/// or belongs to another user).
fn listed_in_namespace_of(pid: i32, minor: u32) -> Option<bool> {
    let table = std::fs::read(format!("/proc/{pid}/mountinfo")).ok()?;
    Some(lists_connection(&table, minor))
}

/// The lines of a mount table: bytes, since the paths in it are (a path
/// that is not UTF-8 is no reason to misread the whole table).
fn table_lines(table: &[u8]) -> impl DoubleEndedIterator<Item = &[u8]> {
    table.split(|&b| b == b'\n')
}

/// Field `n` (from 0) of a mount table line.
fn field(line: &[u8], n: usize) -> Option<&[u8]> {
    line.split(|&b| b == b' ').nth(n)
}

/// Whether a mountinfo table lists a mount of FUSE connection `minor`.
fn lists_connection(table: &[u8], minor: u32) -> bool {
    let want = format!("0:{minor}");
    table_lines(table).any(|l| field(l, 2) == Some(want.as_bytes()))
}

/// A FUSE connection lives as long as its superblock, whatever mount
/// namespace holds it: `/sys/fs/fuse/connections/N` shows it where the
/// fusectl file system is mounted; elsewhere the mount table of this
/// namespace is the best there is.
fn fuse_connection_alive(minor: u32) -> bool {
    let ctl = Path::new("/sys/fs/fuse/connections");
    if std::fs::read_dir(ctl).is_ok_and(|mut d| d.next().is_some()) {
        return ctl.join(minor.to_string()).exists();
    }
    let table = std::fs::read("/proc/self/mountinfo").unwrap_or_default();
    lists_connection(&table, minor)
}

/// The device minor of the FUSE mount at `mountpoint` (read from the mount
/// table: a stat of it would ask the daemon, which is not serving yet).
fn fuse_minor_of(mountpoint: &Path) -> Option<u32> {
    let want = mountpoint.as_os_str().as_bytes();
    let table = std::fs::read("/proc/self/mountinfo").ok()?;
    let line = table_lines(&table).rfind(|l| field(l, 4).is_some_and(|p| unescape(p) == want))?;
    std::str::from_utf8(field(line, 2)?)
        .ok()?
        .strip_prefix("0:")?
        .parse()
        .ok()
}

/// A path field of a mount table, whose space, tab, newline and backslash
/// bytes are written as octal escapes (`\040`).
fn unescape(field: &[u8]) -> Vec<u8> {
    let b = field;
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                out.push(d.iter().fold(0u8, |v, c| v.wrapping_mul(8) + (c - b'0')));
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holder_files_of_this_and_older_versions_are_read() {
        let now = Holder {
            minor: 71,
            mount: Some((1234, 4026531841)),
            process: Some((4321, Role::Run)),
            mountpoint: Some(PathBuf::from(OsStr::from_bytes(b"/tmp/a b/\xff/root"))),
        };
        assert_eq!(Holder::parse(&now.render()), Some(now));
        let no_id = Holder {
            minor: 9,
            mount: None,
            process: Some((5, Role::Mount)),
            mountpoint: None,
        };
        assert_eq!(Holder::parse(&no_id.render()), Some(no_id));
        let older = Holder::parse(b"71 1234 4026531841\n").unwrap();
        assert_eq!(
            (older.minor, older.mount, older.process),
            (71, Some((1234, 4026531841)), None)
        );
        let oldest = Holder::parse(b"71\n").unwrap();
        assert_eq!((oldest.minor, oldest.mount), (71, None));
        assert_eq!(Holder::parse(b""), None);
        assert_eq!(Holder::parse(b"x 1 2"), None);
    }

    #[test]
    fn what_holds_it_is_named() {
        let mut h = Holder::parse(b"7 - - 42 run\n").unwrap();
        assert!(
            h.in_use_by().starts_with("a unionfs run (pid 42)"),
            "{}",
            h.in_use_by()
        );
        h = Holder::parse(b"7 - - 42 mount\n/mnt/x\n").unwrap();
        assert!(
            h.in_use_by()
                .starts_with("the union mounted at /mnt/x (pid 42)")
        );
        h = Holder::parse(b"7 1 2\n").unwrap();
        assert_eq!(h.in_use_by(), IN_USE_BY_ANOTHER);
    }

    #[test]
    fn mount_table_paths_are_unescaped() {
        assert_eq!(unescape(b"/tmp/a\\040b\\134c"), b"/tmp/a b\\c");
        assert_eq!(unescape(b"/plain"), b"/plain");
        assert_eq!(unescape(b"/x\\09"), b"/x\\09");
        assert_eq!(unescape(b"/\xff\\040"), b"/\xff ");
    }

    #[test]
    fn a_connection_is_found_in_a_mount_table() {
        let table = b"35 1 0:9 / /tmp/\xff rw - ext4 x rw\n36 35 0:71 / /tmp/m rw - fuse.unionfs unionfs rw\n";
        assert!(lists_connection(table, 71));
        assert!(!lists_connection(table, 7));
    }
}
