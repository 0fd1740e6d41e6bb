//! The inode table: one [`Node`] per union object the kernel holds, keyed by a
//! node id that is also the object's `st_ino`.
//!
//! A node id is derived from the layer and inode number of the topmost real
//! object (`(layer + 1) << 48 | ino`), so `readdir` can give the same `d_ino`
//! as `lookup` without opening anything. A copied-up object keeps the id of its
//! lower original for the life of the mount (the `origins` map). Nodes are
//! dropped when the kernel forgets them, so memory follows what the kernel
//! caches, not the size of the tree.

use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use parking_lot::{Mutex, RwLock};

use crate::sys::{self, Result, Stat};

/// The FUSE id of the mount's root.
pub const ROOT_ID: u64 = 1;

/// Layer index of the upper layer; lowers are 1.. from the top.
pub const UPPER: u16 = 0;

const LAYER_SHIFT: u32 = 48;
const INO_MASK: u64 = (1 << LAYER_SHIFT) - 1;
const BIG_BASE: u64 = 1 << 63;

/// How the union reaches one real object of a layer.
///
/// Directories are held open (`O_PATH`): lookups and listings start from
/// them. Anything else is reached by name from its directory when needed, so
/// the number of descriptors follows the directories the kernel holds, not
/// the files (the open-file limit can be far below the number of files).
#[derive(Clone, Debug)]
pub enum Real {
    Open(Arc<OwnedFd>),
    At(Arc<OwnedFd>, Arc<OsStr>),
}

impl Real {
    /// A directory's descriptor; directories are always held open.
    pub fn dir(&self) -> BorrowedFd<'_> {
        match self {
            Real::Open(fd) => fd.as_fd(),
            Real::At(dir, _) => dir.as_fd(), // never made for directories
        }
    }

    /// The directory's descriptor, shared.
    pub fn dir_arc(&self) -> Arc<OwnedFd> {
        match self {
            Real::Open(fd) | Real::At(fd, _) => fd.clone(),
        }
    }

    /// The object `name` (with `stat` `st`) in this directory.
    pub fn child(&self, name: &OsStr, st: &Stat) -> Result<Real> {
        if sys::is_dir(st) {
            Ok(Real::Open(Arc::new(sys::open_path(self.dir(), name)?)))
        } else {
            Ok(Real::At(self.dir_arc(), Arc::from(name)))
        }
    }

    pub fn stat(&self) -> Result<Stat> {
        match self {
            Real::Open(fd) => sys::stat_fd(fd.as_fd()),
            Real::At(dir, name) => sys::stat_at(dir.as_fd(), name),
        }
    }

    /// An `O_PATH` descriptor on the object.
    pub fn path_fd(&self) -> Result<Arc<OwnedFd>> {
        match self {
            Real::Open(fd) => Ok(fd.clone()),
            Real::At(dir, name) => Ok(Arc::new(sys::open_path(dir.as_fd(), name)?)),
        }
    }

    /// Opens the object for I/O.
    pub fn open(&self, flags: i32) -> Result<OwnedFd> {
        match self {
            Real::Open(fd) => sys::reopen(fd.as_fd(), flags),
            Real::At(dir, name) => sys::open_at(dir.as_fd(), name, flags),
        }
    }

    pub fn chown(&self, uid: Option<u32>, gid: Option<u32>) -> Result<()> {
        match self {
            Real::Open(fd) => sys::chown_fd(fd.as_fd(), uid, gid),
            Real::At(dir, name) => sys::chown_at(dir.as_fd(), name, uid, gid),
        }
    }

    /// chmod (never called for a symlink).
    pub fn chmod(&self, mode: u32) -> Result<()> {
        match self {
            Real::Open(fd) => sys::chmod_fd(fd.as_fd(), mode),
            Real::At(dir, name) => sys::chmod_at(dir.as_fd(), name, mode),
        }
    }

    pub fn set_times(&self, atime: sys::SetTime, mtime: sys::SetTime) -> Result<()> {
        match self {
            Real::Open(fd) => sys::set_times_fd(fd.as_fd(), atime, mtime),
            Real::At(dir, name) => sys::set_times_at(dir.as_fd(), name, atime, mtime),
        }
    }

    /// Where xattr calls on the object go (no descriptor is opened).
    pub fn xattrs(&self) -> Result<sys::XattrTarget> {
        match self {
            Real::Open(fd) => Ok(sys::XattrTarget::fd(fd.as_fd())),
            Real::At(dir, name) => sys::XattrTarget::at(dir.as_fd(), name),
        }
    }

    /// Holds the object open from now on (before its name goes away).
    pub fn pinned(&self) -> Result<Real> {
        Ok(Real::Open(self.path_fd()?))
    }
}

/// A real object in one lower layer.
#[derive(Clone, Debug)]
pub struct LowerObj {
    pub layer: u16,
    pub real: Real,
    /// For directories: holds kernel xattr whiteouts (`overlay.opaque=x`).
    pub xwhiteouts: bool,
}

impl LowerObj {
    /// The directory's descriptor (lower objects that merge are directories).
    pub fn dir(&self) -> BorrowedFd<'_> {
        self.real.dir()
    }
}

/// What a node is made of; changes with copy-up, rename and unlink.
#[derive(Debug)]
pub struct NodeState {
    /// Parent and name the node was last seen under (copy-up needs a path).
    pub parent: Option<Arc<Node>>,
    pub name: Arc<OsStr>,
    pub upper: Option<Real>,
    /// For a directory: the lower directories merged under it, top first.
    /// For anything else: at most the one lower object it shows.
    pub lowers: Vec<LowerObj>,
    /// A lower-only object whose name was removed (its real nlink stays 1).
    pub unlinked: bool,
}

#[derive(Debug)]
pub struct Node {
    pub id: u64,
    /// `S_IFMT` bits of the object.
    pub kind: u32,
    lookups: AtomicU64,
    pub state: RwLock<NodeState>,
    /// Serialises copy-up of this node, so concurrent writers copy once.
    pub copy_up_lock: Mutex<()>,
    /// Set once the node has an upper object (lets lower readers switch over).
    pub copied_up: AtomicBool,
    /// The object was seen to have no xattr at all, and none was set since:
    /// the kernel asks for `security.capability` on every write and for
    /// `security.selinux` on every `ls -l`, and these need no system call.
    pub no_xattrs: AtomicBool,
}

impl Node {
    pub fn new(id: u64, kind: u32, state: NodeState) -> Node {
        let copied_up = state.upper.is_some();
        Node {
            id,
            kind,
            lookups: AtomicU64::new(0),
            state: RwLock::new(state),
            copy_up_lock: Mutex::new(()),
            copied_up: AtomicBool::new(copied_up),
            no_xattrs: AtomicBool::new(false),
        }
    }

    pub fn is_dir(&self) -> bool {
        self.kind == libc::S_IFDIR
    }

    pub fn upper(&self) -> Option<Real> {
        self.state.read().upper.clone()
    }

    /// The topmost real object and whether it is the upper one.
    pub fn real(&self) -> (Real, bool) {
        let st = self.state.read();
        match &st.upper {
            Some(u) => (u.clone(), true),
            None => (st.lowers[0].real.clone(), false),
        }
    }

    pub fn parent_and_name(&self) -> (Option<Arc<Node>>, Arc<OsStr>) {
        let st = self.state.read();
        (st.parent.clone(), st.name.clone())
    }

    /// `stat` of the topmost real object, as the union shows it.
    pub fn stat(&self) -> Result<Stat> {
        let st = self.real().0.stat()?;
        Ok(self.present(st))
    }

    /// Rewrites a real `stat` into the union's view of this node.
    pub fn present(&self, mut st: Stat) -> Stat {
        st.st_ino = self.id;
        let state = self.state.read();
        if self.is_dir() && state.upper.is_some() && !state.lowers.is_empty() {
            // As the kernel: counting subdirectories of a merged directory is
            // not worth it, and nlink 1 tells `find` not to rely on it.
            st.st_nlink = 1;
        } else if state.unlinked && state.upper.is_none() {
            st.st_nlink = 0;
        }
        st
    }

    /// The node now lives at `name` in `parent`, whose upper directory is
    /// `parent_upper` when the node's own upper object moved there.
    pub fn set_location(&self, parent: Arc<Node>, name: &OsStr, parent_upper: Option<&Real>) {
        let mut st = self.state.write();
        let name: Arc<OsStr> = if *st.name == *name {
            st.name.clone()
        } else {
            Arc::from(name)
        };
        if let (Some(Real::At(..)), Some(dir)) = (&st.upper, parent_upper) {
            let dir = match dir {
                Real::Open(fd) => fd.clone(),
                Real::At(..) => return, // not a directory: nothing sensible to do
            };
            st.upper = Some(Real::At(dir, name.clone()));
        }
        st.parent = Some(parent);
        st.name = name;
    }

    /// Holds the node's objects open: its name is about to go away while the
    /// kernel may still use it (an open file that is unlinked or replaced).
    pub fn pin(&self) -> Result<()> {
        let mut st = self.state.write();
        if let Some(u @ Real::At(..)) = &st.upper {
            let pinned = u.pinned()?;
            st.upper = Some(pinned);
        }
        if let Some(l) = st.lowers.first_mut()
            && let Real::At(..) = l.real
        {
            l.real = l.real.pinned()?;
        }
        Ok(())
    }

    /// A lower-only object whose name was removed.
    pub fn is_unlinked_lower(&self) -> bool {
        let st = self.state.read();
        st.unlinked && st.upper.is_none()
    }

    pub fn mark_unlinked(&self) {
        self.state.write().unlinked = true;
    }
}

/// All nodes the kernel currently holds.
#[derive(Debug, Default)]
pub struct NodeTable {
    nodes: DashMap<u64, Arc<Node>>,
    /// Upper inode number of a copied-up object -> the id it had before.
    origins: DashMap<u64, u64>,
    /// Inode numbers too large to pack -> an allocated id.
    big: DashMap<(u16, u64), u64>,
    next_big: AtomicU64,
}

impl NodeTable {
    pub fn new(root: Node) -> NodeTable {
        let t = NodeTable::default();
        root.lookups.store(1, Ordering::Relaxed);
        t.nodes.insert(ROOT_ID, Arc::new(root));
        t
    }

    /// The id of the object with inode `ino` in `layer`.
    pub fn id_for(&self, layer: u16, ino: u64) -> u64 {
        if layer == UPPER
            && let Some(id) = self.origins.get(&ino)
        {
            return *id;
        }
        if ino <= INO_MASK {
            return ((layer as u64 + 1) << LAYER_SHIFT) | ino;
        }
        *self
            .big
            .entry((layer, ino))
            .or_insert_with(|| BIG_BASE + self.next_big.fetch_add(1, Ordering::Relaxed))
    }

    /// Remembers that the upper inode `upper_ino` continues node `id`.
    pub fn record_origin(&self, upper_ino: u64, id: u64) {
        self.origins.insert(upper_ino, id);
    }

    /// Forgets an origin whose upper inode is gone.
    pub fn drop_origin(&self, upper_ino: u64) {
        self.origins.remove(&upper_ino);
    }

    pub fn get(&self, id: u64) -> Option<Arc<Node>> {
        self.nodes.get(&id).map(|n| n.clone())
    }

    /// The node `id` with one more kernel reference, made by `make` if new.
    pub fn acquire(&self, id: u64, make: impl FnOnce() -> Node) -> Arc<Node> {
        // Counted under the entry's lock, so a concurrent forget cannot drop
        // the node between finding it and counting the new reference.
        match self.nodes.entry(id) {
            Entry::Occupied(e) => {
                e.get().lookups.fetch_add(1, Ordering::Relaxed);
                e.get().clone()
            }
            Entry::Vacant(e) => {
                let node = Arc::new(make());
                node.lookups.fetch_add(1, Ordering::Relaxed);
                e.insert(node).clone()
            }
        }
    }

    /// Drops `n` kernel references; the node goes when none is left.
    pub fn forget(&self, id: u64, n: u64) {
        if id == ROOT_ID {
            return;
        }
        if let Entry::Occupied(e) = self.nodes.entry(id) {
            let left = e
                .get()
                .lookups
                .fetch_sub(n, Ordering::Relaxed)
                .saturating_sub(n);
            if left == 0 {
                e.remove();
            }
        }
    }
}
