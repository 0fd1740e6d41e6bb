//! The inode table: one [`Node`] per union object the kernel holds, keyed by a
//! node id that is also the object's `st_ino`.
//!
//! A node id is derived from the filesystem and inode number of the topmost
//! real object (`(slot + 1) << 48 | ino`, a slot per distinct filesystem
//! among the layers), so `readdir` can give the same `d_ino` as `lookup`
//! without opening anything, and an origin found by its file handle needs
//! only its filesystem to be named. A copied-up object keeps the id of its
//! lower original for the life of the mount (the `origins` map). Nodes are
//! dropped when the kernel forgets them, so memory follows what the kernel
//! caches, not the size of the tree.
//!
//! The node id is what the kernel holds; `st_ino` is what `stat` shows, and
//! the two are equal except for the names of a lower hard-linked file: each
//! name is a node of its own (an alias, with an id allocated per name), as
//! kernel overlayfs gives each its own inode without the index, so that a
//! write through one name copies up that name and no other, while all of them
//! show the lower inode's number. With the index the kernel makes them one
//! inode; here they stay nodes of their own, so that the name written to is
//! the one linked up, but share the file's index entry (`NodeState::index`),
//! and the upper links of an indexed file are one node of an allocated id.
//! Nodes whose id is not their `st_ino` are never cached by the kernel.

use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};

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
    /// With the index: the entry holding the upper copy of a lower
    /// hard-linked file, shown while this name has no upper link of its own.
    pub index: Option<Real>,
    /// For a directory: the lower directories merged under it, top first.
    /// For anything else: at most the one lower object it shows.
    pub lowers: Vec<LowerObj>,
    /// A lower-only object whose name was removed (its real nlink stays 1).
    pub unlinked: bool,
    /// A regular file whose top object (upper, or first lower) is a
    /// metadata-only copy: the data is the last lower object's.
    pub metacopy: bool,
}

#[derive(Debug)]
pub struct Node {
    pub id: u64,
    /// The `st_ino` shown (equal to `id` except for aliases).
    ino: AtomicU64,
    /// For an alias: the name it stands for (parent id and name).
    alias: Mutex<Option<AliasKey>>,
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
    /// For a directory: whether it has a default ACL, once looked at
    /// (`DEFAULT_ACL_*`); every create in it needs to know.
    default_acl: AtomicU8,
}

const DEFAULT_ACL_UNKNOWN: u8 = 0;
const DEFAULT_ACL_NONE: u8 = 1;
const DEFAULT_ACL_SOME: u8 = 2;

impl Node {
    pub fn new(id: u64, kind: u32, state: NodeState) -> Node {
        Node::with_ino(id, id, None, kind, state)
    }

    /// A node whose `st_ino` is `ino`; `alias` for one name of a lower
    /// hard-linked file.
    pub fn with_ino(
        id: u64,
        ino: u64,
        alias: Option<AliasKey>,
        kind: u32,
        state: NodeState,
    ) -> Node {
        let copied_up = state.upper.is_some() && !state.metacopy;
        Node {
            id,
            ino: AtomicU64::new(ino),
            alias: Mutex::new(alias),
            kind,
            lookups: AtomicU64::new(0),
            state: RwLock::new(state),
            copy_up_lock: Mutex::new(()),
            copied_up: AtomicBool::new(copied_up),
            no_xattrs: AtomicBool::new(false),
            default_acl: AtomicU8::new(DEFAULT_ACL_UNKNOWN),
        }
    }

    pub fn is_dir(&self) -> bool {
        self.kind == libc::S_IFDIR
    }

    /// Whether the object is known to have no xattr (see `no_xattrs`).
    /// Never for one name of a hard-linked file whose `st_ino` is another
    /// node's id: an xattr set through another name would not reach this
    /// node's knowledge.
    pub fn known_without_xattrs(&self) -> bool {
        self.id == self.ino() && self.no_xattrs.load(Ordering::Relaxed)
    }

    /// The object was seen to have no xattr (kept only where it can be
    /// trusted, see `known_without_xattrs`).
    pub fn note_without_xattrs(&self) {
        if self.id == self.ino() {
            self.no_xattrs.store(true, Ordering::Relaxed);
        }
    }

    /// Whether the directory has a default ACL, if known.
    pub fn known_default_acl(&self) -> Option<bool> {
        match self.default_acl.load(Ordering::Relaxed) {
            DEFAULT_ACL_NONE => Some(false),
            DEFAULT_ACL_SOME => Some(true),
            _ => None,
        }
    }

    pub fn note_default_acl(&self, present: bool) {
        let v = if present {
            DEFAULT_ACL_SOME
        } else {
            DEFAULT_ACL_NONE
        };
        self.default_acl.store(v, Ordering::Relaxed);
    }

    /// An xattr of the object is being set or removed: what was known of
    /// its xattrs is no longer.
    pub fn forget_xattr_knowledge(&self) {
        self.no_xattrs.store(false, Ordering::Relaxed);
        self.default_acl
            .store(DEFAULT_ACL_UNKNOWN, Ordering::Relaxed);
    }

    /// The name a node of its own name stands for.
    pub fn alias_key(&self) -> Option<AliasKey> {
        self.alias.lock().clone()
    }

    /// The node stands for the name `key` from now on.
    pub fn set_alias(&self, key: AliasKey) {
        *self.alias.lock() = Some(key);
    }

    /// The `st_ino` the node shows.
    pub fn ino(&self) -> u64 {
        self.ino.load(Ordering::Relaxed)
    }

    /// The node now shows `ino` (a broken hard link after its copy-up).
    pub fn set_ino(&self, ino: u64) {
        self.ino.store(ino, Ordering::Relaxed);
    }

    pub fn upper(&self) -> Option<Real> {
        self.state.read().upper.clone()
    }

    /// The topmost real object and whether it is on the upper filesystem
    /// (the node's upper object or its index entry).
    pub fn real(&self) -> (Real, bool) {
        let st = self.state.read();
        match st.upper.as_ref().or(st.index.as_ref()) {
            Some(u) => (u.clone(), true),
            None => (st.lowers[0].real.clone(), false),
        }
    }

    /// The object holding the data and whether it is on the upper
    /// filesystem: the lower data of a metadata-only copy, else `real()`.
    pub fn data(&self) -> (Real, bool) {
        let st = self.state.read();
        match (st.metacopy, st.lowers.last()) {
            (true, Some(l)) => (l.real.clone(), false),
            _ => {
                drop(st);
                self.real()
            }
        }
    }

    /// True for a metadata-only copy (see `NodeState::metacopy`).
    pub fn is_metacopy(&self) -> bool {
        self.state.read().metacopy
    }

    /// The upper object, or the index entry shown in its place.
    pub fn upper_or_index(&self) -> Option<Real> {
        let st = self.state.read();
        st.upper.clone().or_else(|| st.index.clone())
    }

    /// The lower object of a non-directory (or top lower directory).
    pub fn lower(&self) -> Option<Real> {
        self.state.read().lowers.first().map(|l| l.real.clone())
    }

    /// Shows the index entry `entry` from now on, if the node has no upper
    /// object (another name of its file was copied up). `metacopy`: the
    /// entry holds metadata only; the data stays the lower file's.
    pub fn show_index_entry(&self, entry: Real, metacopy: bool) {
        let mut st = self.state.write();
        if st.upper.is_none() {
            st.index = Some(entry);
            st.metacopy = metacopy;
            self.copied_up.store(!metacopy, Ordering::Release);
        }
    }

    /// The node, a new link of `other`'s metadata-only copy, reads the
    /// data `other` reads.
    pub fn reads_data_of(&self, other: &Node) {
        let lowers = other.state.read().lowers.clone();
        let mut st = self.state.write();
        st.lowers = lowers;
        st.metacopy = true;
        self.copied_up.store(false, Ordering::Release);
    }

    /// The node's upper object now holds the data (a metadata-only copy
    /// got it, through this name or another).
    pub fn data_copied_up(&self) {
        let mut st = self.state.write();
        st.metacopy = false;
        if st.upper.is_some() || st.index.is_some() {
            self.copied_up.store(true, Ordering::Release);
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
        st.st_ino = self.ino();
        let state = self.state.read();
        let merged = match state.upper {
            Some(_) => !state.lowers.is_empty(),
            None => state.lowers.len() > 1,
        };
        if self.is_dir() && merged {
            // As the kernel: counting subdirectories of a merged directory
            // (over an upper, or of several lowers) is not worth it, and
            // nlink 1 tells `find` not to rely on it.
            st.st_nlink = 1;
        } else if state.unlinked && state.upper.is_none() && state.index.is_none() {
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
        if let Some(i @ Real::At(..)) = &st.index {
            let pinned = i.pinned()?;
            st.index = Some(pinned);
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
        st.unlinked && st.upper.is_none() && st.index.is_none()
    }

    pub fn mark_unlinked(&self) {
        self.state.write().unlinked = true;
    }
}

/// The name an alias stands for: its parent's id and its name.
pub type AliasKey = (u64, Arc<OsStr>);

/// What a copied-up object continues: the node id it had, and the `st_ino`
/// it shows (the lower's, or for a broken hard link the upper's own).
/// `per_name`: a file of the index, each name of which is a node of its own
/// (`id` unused).
#[derive(Clone, Copy, Debug)]
struct Origin {
    id: u64,
    ino: u64,
    per_name: bool,
}

/// All nodes the kernel currently holds.
#[derive(Debug, Default)]
pub struct NodeTable {
    nodes: DashMap<u64, Arc<Node>>,
    /// Upper inode number of a copied-up object -> what it continues.
    origins: DashMap<u64, Origin>,
    /// Each name that is a node of its own -> (the file's `st_ino`, id).
    aliases: DashMap<AliasKey, (u64, u64)>,
    /// Layer -> the slot of its filesystem (upper first).
    slots: Vec<u16>,
    /// Inode numbers too large to pack -> an allocated id.
    big: DashMap<(u16, u64), u64>,
    next_big: AtomicU64,
}

impl NodeTable {
    /// The table of a union whose layers (upper first) sit on the
    /// filesystems `devs`.
    pub fn new(root: Node, devs: &[u64]) -> NodeTable {
        let mut distinct: Vec<u64> = Vec::new();
        let slots = devs
            .iter()
            .map(|d| match distinct.iter().position(|x| x == d) {
                Some(i) => i as u16,
                None => {
                    distinct.push(*d);
                    distinct.len() as u16 - 1
                }
            })
            .collect();
        let t = NodeTable {
            slots,
            ..NodeTable::default()
        };
        root.lookups.store(1, Ordering::Relaxed);
        t.nodes.insert(ROOT_ID, Arc::new(root));
        t
    }

    /// The id of the object with inode `ino` in `layer`.
    pub fn id_for(&self, layer: u16, ino: u64) -> u64 {
        if layer == UPPER
            && let Some(o) = self.origins.get(&ino)
            && !o.per_name
        {
            return o.id;
        }
        self.packed(layer, ino)
    }

    /// The `st_ino` the object with inode `ino` in `layer` shows.
    pub fn ino_for(&self, layer: u16, ino: u64) -> u64 {
        if layer == UPPER
            && let Some(o) = self.origins.get(&ino)
        {
            return o.ino;
        }
        self.packed(layer, ino)
    }

    /// The id of the name `key` of the file shown as `file` (its `st_ino`);
    /// allocated at the first lookup of that name.
    pub fn alias_id(&self, key: AliasKey, file: u64) -> u64 {
        let mut e = self.aliases.entry(key).or_insert((file, 0));
        if e.0 != file || e.1 == 0 {
            *e = (file, self.allocate());
        }
        e.1
    }

    /// Keeps the name `key` pointing at the node `id` the kernel now holds
    /// (a concurrent forget may have dropped the entry).
    pub fn keep_alias(&self, key: AliasKey, file: u64, id: u64) {
        self.aliases.entry(key).or_insert((file, id));
    }

    /// The name `key` of the file `file` is node `id` from now on (the
    /// kernel moved its entry there).
    pub fn move_alias(&self, key: AliasKey, file: u64, id: u64) {
        self.aliases.insert(key, (file, id));
    }

    /// The name `key` has no node of its own any more, if it was `id`'s.
    pub fn drop_alias(&self, key: &AliasKey, id: u64) {
        self.aliases.remove_if(key, |_, v| v.1 == id);
    }

    /// The id of the name `key` if it has one.
    pub fn existing_alias(&self, key: &AliasKey, file: u64) -> Option<u64> {
        let e = self.aliases.get(key)?;
        (e.0 == file).then_some(e.1)
    }

    /// The other nodes the kernel holds of the file `node` is a name of
    /// (nodes that show its `st_ino`), also those of names since moved
    /// over. A walk of the table: asked only at a file's first copy-up.
    pub fn other_names_of(&self, node: &Node) -> Vec<Arc<Node>> {
        self.nodes
            .iter()
            .filter(|e| e.key() != &node.id && e.value().ino() == node.ino() && !e.value().is_dir())
            .map(|e| e.value().clone())
            .collect()
    }

    /// A fresh id that no packed inode number can take.
    pub fn allocate(&self) -> u64 {
        BIG_BASE + self.next_big.fetch_add(1, Ordering::Relaxed)
    }

    /// `(slot + 1) << 48 | ino`, or an allocated id for a larger inode.
    fn packed(&self, layer: u16, ino: u64) -> u64 {
        let layer = self.slots.get(layer as usize).copied().unwrap_or(layer);
        if ino <= INO_MASK {
            return ((layer as u64 + 1) << LAYER_SHIFT) | ino;
        }
        *self
            .big
            .entry((layer, ino))
            .or_insert_with(|| self.allocate())
    }

    /// Remembers that the upper inode `upper_ino` continues node `id` and
    /// shows `st_ino` `ino`.
    pub fn record_origin(&self, upper_ino: u64, id: u64, ino: u64) {
        let per_name = false;
        self.origins.insert(upper_ino, Origin { id, ino, per_name });
    }

    /// Remembers that the upper inode `upper_ino` is a file of the index,
    /// shown as `ino`, each name of which is a node of its own.
    pub fn record_per_name(&self, upper_ino: u64, ino: u64) {
        let (id, per_name) = (0, true);
        self.origins.insert(upper_ino, Origin { id, ino, per_name });
    }

    /// True for an upper inode whose names are nodes of their own.
    pub fn is_per_name(&self, upper_ino: u64) -> bool {
        self.origins.get(&upper_ino).is_some_and(|o| o.per_name)
    }

    /// True when what the upper inode `upper_ino` continues is known.
    pub fn knows_origin(&self, upper_ino: u64) -> bool {
        self.origins.contains_key(&upper_ino)
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
                let node = e.remove();
                if let Some(key) = &*node.alias.lock() {
                    self.drop_alias(key, id);
                }
            }
        }
    }
}
