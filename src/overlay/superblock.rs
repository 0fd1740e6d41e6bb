//! The mounted union as a whole: its layers, work directory, inode table and
//! open handles. Every other module adds operations to [`Union`].

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use dashmap::DashMap;
use parking_lot::Mutex;

use crate::overlay::file::OpenFile;
use crate::overlay::format::{self, Opacity, XattrNamespace};
use crate::overlay::index::Index;
use crate::overlay::node::{LowerObj, Node, NodeState, NodeTable, ROOT_ID, Real};
use crate::overlay::readdir::DirStream;
use crate::sys::{self, Errno, Result};

/// Who asked: the owner new objects get, and what the kernel's set-id
/// rules need to know of the caller (ids as the layers store them).
#[derive(Clone, Copy)]
pub struct Caller<'a> {
    pub uid: u32,
    pub gid: u32,
    /// The caller's umask, for the modes of what it creates.
    pub umask: u32,
    /// The caller holds CAP_FSETID (as far as FUSE tells: it is root in
    /// the mount's user namespace).
    pub privileged: bool,
    /// Reads the caller's supplementary groups; asked only when a rule
    /// depends on them (reading them costs a look into /proc).
    pub groups: &'a dyn Fn() -> Vec<u32>,
    /// The kernel's word on whether an access ACL this caller sets costs
    /// the object its set-group-id bit (the caller is outside its group and
    /// lacks CAP_FSETID: FUSE's SETXATTR_ACL_KILL_SGID); None: decided here
    /// from `privileged` and the groups.
    pub acl_kills_sgid: Option<bool>,
}

impl std::fmt::Debug for Caller<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Caller")
            .field("uid", &self.uid)
            .field("gid", &self.gid)
            .field("umask", &self.umask)
            .field("privileged", &self.privileged)
            .finish()
    }
}

fn no_groups() -> Vec<u32> {
    Vec::new()
}

impl Caller<'static> {
    /// The daemon itself: root, no umask.
    pub const DAEMON: Caller<'static> = Caller {
        uid: 0,
        gid: 0,
        umask: 0,
        privileged: true,
        groups: &no_groups,
        acl_kills_sgid: None,
    };
}

impl Caller<'_> {
    /// In group `gid`, or privileged: what the kernel's
    /// `in_group_or_capable` asks before it lets set-group-id stay.
    pub fn in_group_or_privileged(&self, gid: u32) -> bool {
        self.privileged || self.gid == gid || (self.groups)().contains(&gid)
    }
}

/// Settings of one mount.
#[derive(Clone, Copy, Debug)]
pub struct Tuning {
    /// fsync becomes a no-op (for throwaway containers).
    pub volatile: bool,
    /// Lower and merged directories can be renamed, recording where their
    /// lower directories are (`redirect_dir=on`).
    pub redirect_dir: bool,
    /// A change of metadata only copies up metadata only
    /// (`metacopy=on`).
    pub metacopy: bool,
}

impl Tuning {
    /// The defaults of `unionfs mount`.
    pub fn new(volatile: bool) -> Tuning {
        Tuning {
            volatile,
            redirect_dir: true,
            metacopy: false,
        }
    }
}

/// What the kernel caches that the core must sometimes drop itself: told by
/// the transport (the FUSE adapter), which knows how.
pub trait KernelCache: Send + Sync {
    /// The listing the kernel keeps of directory `dir` is stale although no
    /// name in it changed (an entry's `d_ino` did).
    fn listing_changed(&self, dir: u64);

    /// What the kernel caches of file `file` (pages, attributes) is stale:
    /// another name of it was copied up.
    fn contents_changed(&self, file: u64);
}

pub struct Union {
    /// The kernel's caches, once the transport has given a way to reach them.
    kernel_cache: OnceLock<Box<dyn KernelCache>>,
    /// The lower layers' root directories, top first.
    lower_roots: Vec<LowerObj>,
    /// What statfs reports on: the upper, or the top lower of a read-only union.
    pub(super) space_root: Arc<OwnedFd>,
    /// `WORKDIR/work`: where objects are built before they appear (None in
    /// a read-only union).
    work: Option<OwnedFd>,
    /// Where the union keeps its markers: trusted or user xattrs.
    pub(super) ns: XattrNamespace,
    pub(super) tuning: Tuning,
    /// `WORKDIR/index` with `index=on` (see `index`).
    pub(super) index: Option<Index>,
    pub(super) table: NodeTable,
    pub(super) files: DashMap<u64, Arc<OpenFile>>,
    pub(super) dirs: DashMap<u64, Arc<Mutex<DirStream>>>,
    next_fh: AtomicU64,
    tmp_seq: AtomicU64,
    /// The work directory's filesystem has no `O_TMPFILE` (see `build_copy`).
    pub(super) no_tmpfile: AtomicBool,
}

impl std::fmt::Debug for dyn KernelCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KernelCache")
    }
}

impl Union {
    /// Lets the core drop what the kernel caches (set once, by the transport).
    pub fn set_kernel_cache(&self, cache: Box<dyn KernelCache>) {
        let _ = self.kernel_cache.set(cache);
    }

    /// The kernel dropped `n` references to node `id`; a node with none
    /// left is forgotten.
    pub fn forget(&self, id: u64, n: u64) {
        self.table.forget(id, n);
    }

    /// Whether node `id` is in the table (the kernel holds it).
    pub fn holds_node(&self, id: u64) -> bool {
        self.table.get(id).is_some()
    }

    /// Where the union keeps its markers: trusted or user xattrs.
    pub fn xattr_namespace(&self) -> XattrNamespace {
        self.ns
    }

    /// The lower layers' root directories, top first.
    pub fn lower_roots(&self) -> &[LowerObj] {
        &self.lower_roots
    }

    /// The kernel's cached pages and attributes of `file` are stale.
    pub fn contents_changed(&self, file: u64) {
        if let Some(c) = self.kernel_cache.get() {
            c.contents_changed(file);
        }
    }

    /// The kernel's listing of directory `dir` is stale.
    pub fn listing_changed(&self, dir: u64) {
        if let Some(c) = self.kernel_cache.get() {
            c.listing_changed(dir);
        }
    }

    /// Builds the union over already opened layer roots. `work` must be an
    /// empty directory on the upper filesystem. Without an upper (and work)
    /// directory the union is read-only: whatever would change it fails
    /// with EROFS.
    pub fn new(upper: Option<(OwnedFd, OwnedFd)>, lowers: Vec<OwnedFd>, tuning: Tuning) -> Union {
        let (upper, work) = upper.unzip();
        let ns = work.as_ref().map_or(XattrNamespace::Trusted, |w| {
            format::probe_namespace(w.as_fd())
        });
        let space_root = match (&upper, lowers.first()) {
            (Some(u), _) => Arc::new(u.try_clone().expect("dup of the upper directory")),
            (None, Some(l)) => Arc::new(l.try_clone().expect("dup of a lower directory")),
            (None, None) => panic!("a union needs a layer"),
        };
        let lowers = lowers
            .into_iter()
            .enumerate()
            .map(|(i, fd)| {
                let xwhiteouts =
                    format::dir_opacity(fd.as_fd(), false) == Opacity::HasXattrWhiteouts;
                LowerObj {
                    layer: i as u16 + 1,
                    real: Real::Open(Arc::new(fd)),
                    xwhiteouts,
                }
            })
            .collect::<Vec<_>>();
        let lower_roots = lowers.clone();
        // The filesystem of each layer, upper (or a stand-in) first.
        let dev = |fd: BorrowedFd<'_>| sys::stat_fd(fd).map_or(0, |st| st.st_dev);
        let devs: Vec<u64> = std::iter::once(upper.as_ref().map_or(u64::MAX, |u| dev(u.as_fd())))
            .chain(lower_roots.iter().map(|l| dev(l.dir())))
            .collect();
        let root = Node::new(
            ROOT_ID,
            libc::S_IFDIR,
            NodeState {
                parent: None,
                name: Arc::from(OsStr::new("")),
                upper: upper.map(|u| Real::Open(Arc::new(u))),
                index: None,
                lowers,
                unlinked: false,
                metacopy: false,
            },
        );
        Union {
            kernel_cache: OnceLock::new(),
            lower_roots,
            space_root,
            work,
            ns,
            tuning,
            index: None,
            table: NodeTable::new(root, &devs),
            files: DashMap::new(),
            dirs: DashMap::new(),
            next_fh: AtomicU64::new(1),
            tmp_seq: AtomicU64::new(0),
            no_tmpfile: AtomicBool::new(false),
        }
    }

    /// Reads the overlay markers as `ns` names them (`user.overlay.*` for
    /// layers written with the kernel's `userxattr`). For a read-only
    /// union: one with an upper directory takes the namespace its work
    /// directory allows.
    pub fn read_markers_as(&mut self, ns: XattrNamespace) {
        debug_assert!(self.is_read_only());
        self.ns = ns;
    }

    /// The node the kernel calls `id`.
    pub fn node(&self, id: u64) -> Result<Arc<Node>> {
        self.table.get(id).ok_or(Errno::ESTALE)
    }

    pub fn next_handle(&self) -> u64 {
        self.next_fh.fetch_add(1, Ordering::Relaxed)
    }

    /// A fresh name for an object being built in the work directory.
    pub fn temp_name(&self) -> OsString {
        let n = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        OsString::from(format!("#u{}-{n}", std::process::id()))
    }

    /// A union of lower layers only: nothing in it is ever copied up.
    pub fn is_read_only(&self) -> bool {
        self.work.is_none()
    }

    /// The work directory; EROFS in a read-only union.
    pub fn work_fd(&self) -> Result<BorrowedFd<'_>> {
        self.work.as_ref().map(|w| w.as_fd()).ok_or(Errno::EROFS)
    }
}
