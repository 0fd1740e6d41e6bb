//! The inode index (`index=on`, in the kernel's format): a lower file with
//! several names is copied up once, to `WORKDIR/index/<hex of its origin>`,
//! and every name of it that needs an upper object becomes a hard link of
//! that copy, so its names stay one inode before and after a remount; a
//! name with no upper object shows the entry too.
//!
//! The union's link count of such a file is kept in `overlay.nlink`,
//! relative to the real count (`U+N`, as Linux 6.18 writes it), rewritten
//! whenever a link-up changes the real count; an unlink or a rename over a
//! name changes both counts alike. A lower-only name is linked up before it
//! is removed, as the kernel does, so that this holds. The entry goes with
//! the last name. At mount the upper root's origin is checked against the
//! first lower root, the index directory is bound to the upper root, and
//! entries orphaned by a crash are removed, as the kernel does.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;
use tracing::{debug, info, warn};

use crate::overlay::format::{self, Origin, UnionNlink};
use crate::overlay::node::Real;
use crate::overlay::superblock::Union;
use crate::sys::{self, Errno, Result, Stat};
use crate::tree::remove_tree;

/// `WORKDIR/index`, held open.
#[derive(Debug)]
pub struct Index {
    dir: Arc<OwnedFd>,
    /// Serialises making, linking and removing entries.
    lock: Mutex<()>,
}

/// Why a union cannot have the index over these directories.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The upper root records another first lower root as its origin.
    OtherLowers,
    /// The index directory records another upper root, which is now as said.
    OtherUpper(RecordedUpper),
}

/// What became of the upper directory an index directory records.
#[derive(Debug, PartialEq, Eq)]
pub enum RecordedUpper {
    /// Its file handle opens nothing any more: it was removed.
    Gone,
    /// It is still there, at this path.
    At(PathBuf),
    /// Cannot tell (unreadable record, or handles cannot be opened here).
    Unknown,
}

/// The origin of `obj`, as an origin or index entry records it.
fn origin_of_fd(obj: BorrowedFd<'_>) -> Option<Origin> {
    let (kind, handle) = sys::file_handle(obj).ok()?;
    let o = Origin { kind, handle };
    o.encode().is_some().then_some(o)
}

impl Union {
    /// Turns the index on over `dir` (`WORKDIR/index`): checks that the
    /// upper root was made over these lowers and that the index belongs to
    /// it (recording both on first use), then removes orphaned entries.
    /// Off where the kernel would not index either: user xattrs, or layers
    /// that give no file handles; with a warning if the user `asked` for it.
    pub fn enable_index(&mut self, dir: OwnedFd, asked: bool) -> std::result::Result<(), Refusal> {
        let why_not = |why: &str| {
            if asked {
                warn!("index=off: {why}");
            } else {
                debug!("index=off: {why}");
            }
        };
        if self.ns == format::XattrNamespace::User {
            why_not("the index needs trusted xattrs, which this user cannot set");
            return Ok(());
        }
        let upper_root = self
            .table
            .get(crate::overlay::node::ROOT_ID)
            .and_then(|r| r.upper());
        let (Some(upper_root), Some(lower_root)) = (upper_root, self.lower_roots().first()) else {
            return Ok(());
        };
        let (Some(lower_origin), Some(upper_handle)) = (
            origin_of_fd(lower_root.dir()),
            origin_of_fd(upper_root.dir()),
        ) else {
            why_not("a layer's filesystem gives no file handles");
            return Ok(());
        };
        self.check_recorded(upper_root.dir(), self.ns.origin(), &lower_origin, 0)
            .then_some(())
            .ok_or(Refusal::OtherLowers)?;
        let upper_flag = format::FB_FLAG_UPPER;
        if !self.check_recorded(dir.as_fd(), self.ns.upper(), &upper_handle, upper_flag) {
            let recorded = self.recorded_upper(dir.as_fd(), upper_root.dir());
            return Err(Refusal::OtherUpper(recorded));
        }
        let index = Index {
            dir: Arc::new(dir),
            lock: Mutex::new(()),
        };
        remove_orphans(&index, self.ns.nlink());
        self.index = Some(index);
        Ok(())
    }

    /// What became of the upper directory that `index_dir` records, looked
    /// for on the filesystem of `upper_root` (an index lives beside its
    /// upper, on the same filesystem).
    fn recorded_upper(
        &self,
        index_dir: BorrowedFd<'_>,
        upper_root: BorrowedFd<'_>,
    ) -> RecordedUpper {
        let recorded = sys::get_xattr(index_dir, OsStr::new(self.ns.upper()))
            .ok()
            .and_then(|v| Origin::decode(&v));
        let Some(recorded) = recorded else {
            return RecordedUpper::Unknown;
        };
        // open_by_handle_at wants a descriptor that is not O_PATH.
        let Ok(root) = sys::reopen(upper_root, libc::O_RDONLY | libc::O_DIRECTORY) else {
            return RecordedUpper::Unknown;
        };
        match sys::open_by_handle(root.as_fd(), recorded.kind, &recorded.handle) {
            Ok(fd) => match std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())) {
                Ok(p) if p.as_os_str().as_bytes().ends_with(b" (deleted)") => RecordedUpper::Gone,
                Ok(p) => RecordedUpper::At(p),
                Err(_) => RecordedUpper::Unknown,
            },
            Err(Errno::ESTALE | Errno::ENOENT) => RecordedUpper::Gone,
            Err(_) => RecordedUpper::Unknown,
        }
    }

    /// True when `obj` records `origin` under `name` (any uuid), or records
    /// nothing and now does. False on a different record.
    fn check_recorded(&self, obj: BorrowedFd<'_>, name: &str, origin: &Origin, flags: u8) -> bool {
        match sys::get_xattr(obj, OsStr::new(name)) {
            Ok(v) => Origin::decode(&v).is_some_and(|o| o == *origin),
            Err(_) => {
                let v = origin.encode_with_flags(flags).expect("encodable origin");
                if let Err(e) = sys::set_xattr(obj, OsStr::new(name), &v, 0) {
                    debug!("{name} not recorded: {e}");
                }
                true
            }
        }
    }

    /// Whether the upper root holds no entry (a new upper directory).
    pub fn upper_is_empty(&self) -> bool {
        let root = self.table.get(crate::overlay::node::ROOT_ID);
        root.and_then(|r| r.upper())
            .is_some_and(|u| sys::read_dir(u.dir()).is_ok_and(|e| e.is_empty()))
    }

    pub fn index_is_on(&self) -> bool {
        self.index.is_some()
    }

    /// The index entry name of the lower object `obj` (stat `st`), when the
    /// index is on and `obj` is a non-directory with several links.
    pub fn index_name_of(&self, obj: BorrowedFd<'_>, st: &Stat) -> Option<OsString> {
        self.index.as_ref()?;
        if sys::is_dir(st) || st.st_nlink <= 1 {
            return None;
        }
        format::index_entry_name(&origin_of_fd(obj)?)
    }

    /// The index entry `name`, if there is one to show.
    pub fn index_entry(&self, name: &OsStr) -> Option<(Real, Stat)> {
        let index = self.index.as_ref()?;
        let st = sys::stat_at(index.dir.as_fd(), name).ok()?;
        if sys::is_dir(&st) || format::is_whiteout_dev(&st) {
            return None;
        }
        Some((Real::At(index.dir.clone(), Arc::from(name)), st))
    }

    /// The index entry the upper non-directory `obj` (stat `st`) is a link
    /// of: named by its recorded origin, the same inode.
    pub fn index_entry_of_upper(&self, obj: &Real, st: &Stat) -> Option<OsString> {
        self.index.as_ref()?;
        if st.st_nlink <= 1 {
            return None; // a linked name has the entry as a second link
        }
        let v = obj.xattrs().ok()?.get(OsStr::new(self.ns.origin())).ok()?;
        let origin = Origin::decode(&v)?;
        self.is_indexed(&origin, st)
            .then(|| format::index_entry_name(&origin))
            .flatten()
    }

    /// True when the upper non-directory `st`, which records `origin`, is
    /// a link of that origin's index entry.
    pub fn is_indexed(&self, origin: &Origin, st: &Stat) -> bool {
        if self.index.is_none() || st.st_nlink <= 1 {
            return false;
        }
        format::index_entry_name(origin)
            .and_then(|name| self.index_entry(&name))
            .is_some_and(|(_, e)| e.st_ino == st.st_ino && e.st_dev == st.st_dev)
    }

    /// The union's link count of an indexed file whose real object `obj`
    /// has `st`; the real count where none is recorded.
    pub fn union_nlink(&self, obj: &Real, st: &Stat) -> u64 {
        obj.xattrs()
            .ok()
            .and_then(|x| recorded_count(&x, self.ns.nlink(), st.st_nlink))
            .unwrap_or(st.st_nlink)
    }

    /// Gives `name` in the upper directory `dir` the upper object of the
    /// lower file `lower` (stat `lower_st`) through its index entry `entry`:
    /// the entry is made first if this is the first of its names to be
    /// copied up. Returns the linked object.
    pub fn link_up(
        &self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        (lower, lower_st): (BorrowedFd<'_>, &Stat),
        entry: &OsStr,
    ) -> Result<OwnedFd> {
        let index = self.index.as_ref().ok_or(Errno::EROFS)?;
        let _guard = index.lock.lock();
        let dir_times = sys::stat_fd(dir)?;
        let real = match sys::stat_at(index.dir.as_fd(), entry) {
            Ok(st) => st,
            Err(Errno::ENOENT) => self.make_entry(index, entry, lower, lower_st)?,
            Err(e) => return Err(e),
        };
        if sys::is_dir(&real) || format::is_whiteout_dev(&real) {
            return Err(Errno::EIO); // not an entry this union (or the kernel) made
        }
        let held = Real::At(index.dir.clone(), Arc::from(entry));
        let union = self.union_nlink(&held, &real);
        crash_point("before-link-up");
        sys::link_at(index.dir.as_fd(), entry, dir, name)?;
        let obj = sys::open_path(dir, name)?;
        self.record_nlink(obj.as_fd(), union, real.st_nlink + 1);
        if !format::is_impure(dir, self.ns) {
            let _ = format::set_impure(dir, self.ns);
        }
        let (atime, mtime) = sys::stat_times(&dir_times);
        sys::set_times_fd(dir, atime, mtime)?;
        debug!(name = ?name, entry = ?entry, "linked up from the index");
        Ok(obj)
    }

    /// Copies the lower file up as the index entry `entry`, with its origin
    /// and the union's link count (the lower's) recorded on it.
    fn make_entry(
        &self,
        index: &Index,
        entry: &OsStr,
        lower: BorrowedFd<'_>,
        st: &Stat,
    ) -> Result<Stat> {
        let origin = origin_of_fd(lower).ok_or(Errno::EIO)?;
        let work = self.work_fd()?;
        // Metadata only with `metacopy=on`, as the kernel makes it.
        let data = match self.tuning.metacopy && sys::file_type(st.st_mode) == libc::S_IFREG {
            true => None,
            false => Some(lower),
        };
        let staged = self.build_copy(lower, st, data)?;
        let obj = staged.obj.as_fd();
        let made = format::set_origin(obj, &origin, self.ns)
            .and_then(|()| {
                self.record_nlink(obj, st.st_nlink, 1);
                staged.place(work, index.dir.as_fd(), entry)
            })
            .and_then(|()| sys::stat_fd(obj));
        if made.is_err() {
            staged.discard(work);
        }
        made
    }

    /// Records on `obj` that the union counts `union` links while the real
    /// inode has `real`.
    fn record_nlink(&self, obj: BorrowedFd<'_>, union: u64, real: u64) {
        let v = UnionNlink::upper_relative(union, real);
        if let Err(e) = sys::set_xattr(obj, OsStr::new(self.ns.nlink()), &v, 0) {
            warn!("cannot record the link count of an indexed file: {e}");
        }
    }

    /// After a name of the indexed file `entry` went: once the union counts
    /// no name of it, its entry goes too (or, if upper links remain that
    /// the count does not know of, the count is set to them, as the kernel
    /// does).
    pub fn drop_index_if_unlinked(&self, entry: &OsStr) {
        let Some(index) = self.index.as_ref() else {
            return;
        };
        crash_point("before-index-cleanup");
        let _guard = index.lock.lock();
        let Some((held, st)) = self.index_entry(entry) else {
            return;
        };
        let counted = held
            .xattrs()
            .ok()
            .and_then(|x| recorded_count(&x, self.ns.nlink(), st.st_nlink));
        if counted.is_some() {
            return;
        }
        if st.st_nlink == 1 {
            match sys::unlink_at(index.dir.as_fd(), entry, false) {
                Ok(()) => {
                    self.table.drop_origin(st.st_ino); // its inode number is free
                    debug!(entry = ?entry, "index entry removed with its last name");
                }
                Err(e) => warn!("cannot remove index entry: {e}"),
            }
        } else if let Ok(obj) = held.path_fd() {
            self.record_nlink(obj.as_fd(), st.st_nlink - 1, st.st_nlink);
        }
    }
}

/// The union's link count recorded (in `nlink_xattr`) on an indexed file
/// whose real inode has `real` links; None when none is recorded or it is
/// not positive.
fn recorded_count(obj: &sys::XattrTarget, nlink_xattr: &str, real: u64) -> Option<u64> {
    let v = obj.get(OsStr::new(nlink_xattr)).ok()?;
    UnionNlink::parse(&v)?.count(real, None)
}

/// For the crash tests: the daemon kills itself at the point named by
/// `UNIONFS_CRASH_AT`, to show what a crash right there leaves on disk.
pub(crate) fn crash_point(name: &str) {
    static AT: OnceLock<Option<String>> = OnceLock::new();
    if AT
        .get_or_init(|| std::env::var("UNIONFS_CRASH_AT").ok())
        .as_deref()
        == Some(name)
    {
        warn!(point = name, "UNIONFS_CRASH_AT: killing the daemon");
        let _ = nix::sys::signal::kill(nix::unistd::getpid(), nix::sys::signal::Signal::SIGKILL);
    }
}

/// Removes what a crash left in the index: temporary names, and entries
/// with no upper name whose recorded count is no longer positive.
fn remove_orphans(index: &Index, nlink_xattr: &str) {
    let Ok(entries) = sys::read_dir(index.dir.as_fd()) else {
        return;
    };
    let mut removed = 0;
    for e in entries {
        let dir = index.dir.as_fd();
        if e.name.as_bytes().starts_with(b"#") {
            removed += usize::from(remove_tree(dir, &e.name).is_ok());
            continue;
        }
        let Ok(st) = sys::stat_at(dir, &e.name) else {
            continue;
        };
        if sys::is_dir(&st) || format::is_whiteout_dev(&st) || st.st_nlink != 1 {
            continue;
        }
        let counted = sys::XattrTarget::at(dir, &e.name)
            .ok()
            .and_then(|x| recorded_count(&x, nlink_xattr, 1));
        if counted.is_none() && sys::unlink_at(dir, &e.name, false).is_ok() {
            removed += 1;
        }
    }
    if removed > 0 {
        info!(removed, "removed orphaned entries from the index");
    }
}

/// What a refusal tells the user, after the upper or work directory's path.
pub fn describe(r: &Refusal) -> String {
    match r {
        Refusal::OtherLowers => "was made over other lower directories (its overlay.origin \
                                 names another first lower); mount it over its own lower \
                                 directories, or with -o index=off"
            .into(),
        Refusal::OtherUpper(RecordedUpper::Gone) => {
            "holds the index of an upper directory that no longer exists; remove the index \
             directory in it to start afresh, or mount with -o index=off"
                .into()
        }
        Refusal::OtherUpper(RecordedUpper::At(p)) => format!(
            "holds the index of the upper directory {}; give this upper its own work \
             directory, or mount with -o index=off",
            p.display()
        ),
        Refusal::OtherUpper(RecordedUpper::Unknown) => {
            "holds the index of another upper directory; give this upper its own work \
             directory, or mount with -o index=off"
                .into()
        }
    }
}
