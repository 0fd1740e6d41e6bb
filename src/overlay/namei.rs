//! Lookup: resolving a name in a union directory through the layers.
//!
//! Upper first, then the lower directories merged under the parent, top to
//! bottom. A whiteout ends the search; a non-directory hides everything below
//! it; directories merge until one is opaque. A redirect (a moved directory,
//! or a metadata-only copy) changes the path looked up in the layers below
//! it; a metadata-only copy looks on for the file holding its data.

use std::ffi::OsStr;
use std::os::fd::AsFd;
use std::sync::Arc;

use crate::overlay::format::{self, LowerPath, Opacity, XattrNamespace};
use crate::overlay::node::{LowerObj, Node, NodeState, Real, UPPER};
use crate::overlay::superblock::Union;
use crate::sys::{self, Errno, Result, Stat};

/// A name resolved through the layers.
#[derive(Clone, Debug)]
pub struct Found {
    pub upper: Option<Real>,
    /// Directories: the lower directories merged in. Others: the object shown
    /// when there is no upper one.
    pub lowers: Vec<LowerObj>,
    /// `stat` of the topmost object.
    pub stat: Stat,
    /// Layer and inode of the topmost object (for the node id).
    pub top_layer: u16,
    /// With the index: the entry that shows a lower hard-linked file some
    /// other name of which was copied up.
    pub index: Option<Real>,
    /// The top object (upper, or first lower) is a metadata-only copy: the
    /// data is the last lower object's.
    pub metacopy: bool,
}

impl Found {
    pub fn is_dir(&self) -> bool {
        sys::is_dir(&self.stat)
    }

    /// A lower file with several names and no upper copy: each of its
    /// names is a node of its own (see `node`).
    pub fn is_lower_hard_link(&self) -> bool {
        self.upper.is_none() && !self.is_dir() && self.stat.st_nlink > 1
    }
}

/// What one layer says about a name.
enum InLayer {
    Absent,
    Whiteout,
    Object(Real, Stat),
}

fn probe(dir: &LowerObj, name: &OsStr) -> Result<InLayer> {
    if format::is_aufs_marker(name) {
        return Ok(InLayer::Absent);
    }
    match sys::stat_at(dir.dir(), name) {
        Ok(st) if format::is_whiteout_dev(&st) => Ok(InLayer::Whiteout),
        Ok(st) => {
            if dir.xwhiteouts && sys::file_type(st.st_mode) == libc::S_IFREG && st.st_size == 0 {
                let fd = sys::open_path(dir.dir(), name)?;
                if format::is_xattr_whiteout(fd.as_fd(), &st) {
                    return Ok(InLayer::Whiteout);
                }
            }
            Ok(InLayer::Object(dir.real.child(name, &st)?, st))
        }
        Err(Errno::ENOENT) => {
            let wh = format::aufs_whiteout_name(name);
            match sys::stat_at(dir.dir(), &wh) {
                Ok(_) => Ok(InLayer::Whiteout),
                Err(_) => Ok(InLayer::Absent),
            }
        }
        Err(Errno::ENAMETOOLONG) if name.len() <= 255 => {
            // `.wh.NAME` may be too long where NAME is not.
            Ok(InLayer::Absent)
        }
        Err(e) => Err(e),
    }
}

/// True when the regular file `real` (stat `st`) is a metadata-only copy.
pub fn is_metadata_only(real: &Real, st: &Stat, ns: XattrNamespace) -> bool {
    format::may_be_metacopy(st) && real.xattrs().is_ok_and(|x| format::is_metacopy(&x, ns))
}

/// What stands above a lookup in the lower layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Above {
    Nothing,
    /// An upper directory: only directories merge in.
    Dir,
    /// A metadata-only copy: its data is looked for.
    Metacopy,
}

/// A walk down the lower layers for one path (`lookup_lower_path`): what
/// it has found so far and what it is looking for below.
struct LowerWalk {
    /// The path looked up in the next layer (a redirect changes it).
    path: LowerPath,
    out: LowerStack,
    /// A directory was found above: only directories merge in below.
    merging: bool,
    /// A metadata-only copy was found above: its data is looked for below.
    wants_data: bool,
    ns: XattrNamespace,
}

impl LowerWalk {
    /// A non-directory in `layer`: the object shown, or the data of the
    /// metadata-only copy above. `stop`: the layer said the walk ends here.
    /// Gives whether it does.
    fn file(&mut self, layer: &LowerObj, real: Real, st: Stat, stop: bool) -> Result<bool> {
        let regular = sys::file_type(st.st_mode) == libc::S_IFREG;
        if self.merging || (self.wants_data && !regular) {
            return Ok(true);
        }
        let xattrs = real.xattrs()?;
        let metacopy = format::may_be_metacopy(&st) && format::is_metacopy(&xattrs, self.ns);
        // Of a chain of metadata-only copies, only the top one and the
        // data count.
        if self.out.objs.is_empty() || !metacopy {
            self.push(layer, real, st, false);
        }
        self.wants_data = metacopy;
        if !metacopy {
            return Ok(true);
        }
        if let Some(r) = format::redirect_of(&xattrs, self.ns)? {
            self.path = self.path.redirected(0, &r);
        }
        Ok(stop)
    }

    /// A directory in `layer`: merged in (unless a file's data is looked
    /// for), its opacity and redirect followed. `stop`: the layer said the
    /// walk ends here. Gives whether it does.
    fn dir(&mut self, layer: &LowerObj, real: Real, st: Stat, mut stop: bool) -> Result<bool> {
        if self.wants_data {
            return Ok(true);
        }
        self.merging = true;
        let opacity = format::dir_opacity(real.dir(), true);
        let redirect = match opacity {
            Opacity::Opaque => None,
            _ => format::redirect_of(&real.xattrs()?, self.ns)?,
        };
        self.push(layer, real, st, opacity == Opacity::HasXattrWhiteouts);
        stop |= opacity == Opacity::Opaque;
        if let Some(r) = redirect {
            // An absolute redirect goes on from the roots, below.
            stop &= !r.is_absolute();
            self.path = self.path.redirected(0, &r);
        }
        Ok(stop)
    }

    fn push(&mut self, layer: &LowerObj, real: Real, st: Stat, xwhiteouts: bool) {
        self.out.objs.push(LowerObj {
            layer: layer.layer,
            real,
            xwhiteouts,
        });
        self.out.stat.get_or_insert(st);
    }

    fn finish(self) -> Result<LowerStack> {
        if self.wants_data {
            // A metadata-only copy whose data is nowhere: as the kernel.
            return Err(Errno::EIO);
        }
        Ok(self.out)
    }
}

/// What the lower layers add under an upper object.
#[derive(Default)]
pub struct Below {
    pub objs: Vec<LowerObj>,
    /// The upper object is a metadata-only copy of the last of `objs`.
    pub metacopy: bool,
}

/// What the lookup of a path in one lower layer found.
struct LayerHit {
    /// What the layer holds at the path's last element.
    hit: InLayer,
    /// An element on the way ends the search in the layers below (a
    /// whiteout, a non-directory or an opaque directory).
    stop: bool,
    /// The path to look up in the layers below (changed by redirects on
    /// the way).
    path: LowerPath,
}

/// Looks `path` up in one lower layer: a name in `dir` (the parent's
/// directory in that layer), or an absolute path from `dir` (the layer's
/// root), element by element as the kernel walks it.
fn lookup_in_layer(dir: &LowerObj, path: &LowerPath, ns: XattrNamespace) -> Result<LayerHit> {
    let parts = match path {
        LowerPath::Name(n) => {
            return Ok(LayerHit {
                hit: probe(dir, n)?,
                stop: false,
                path: path.clone(),
            });
        }
        LowerPath::Absolute(parts) => parts,
    };
    let mut next = path.clone();
    let mut stop = false;
    let mut cur = dir.clone();
    for (k, part) in parts.iter().enumerate() {
        let from_end = parts.len() - 1 - k;
        let hit = probe(&cur, part)?;
        if from_end == 0 {
            return Ok(LayerHit {
                hit,
                stop,
                path: next,
            });
        }
        let real = match hit {
            InLayer::Object(real, st) if sys::is_dir(&st) => real,
            InLayer::Absent => break,
            _ => {
                stop = true; // a whiteout or a non-directory on the way
                break;
            }
        };
        let opacity = format::dir_opacity(real.dir(), true);
        if opacity == Opacity::Opaque {
            stop = true;
        } else if let Some(r) = format::redirect_of(&real.xattrs()?, ns)? {
            stop &= !matches!(r, LowerPath::Absolute(_));
            next = next.redirected(from_end, &r);
        }
        cur = LowerObj {
            layer: dir.layer,
            real,
            xwhiteouts: opacity == Opacity::HasXattrWhiteouts,
        };
    }
    Ok(LayerHit {
        hit: InLayer::Absent,
        stop,
        path: next,
    })
}

/// What the lower layers hold under a name.
#[derive(Default)]
pub struct LowerStack {
    /// Directories: the lower directories merged, top first. Others: the
    /// object shown, then (when that one is a metadata-only copy) the one
    /// holding the data.
    pub objs: Vec<LowerObj>,
    /// `stat` of the first object.
    pub stat: Option<Stat>,
}

impl Union {
    /// Resolves `name` in the lower directories `dirs` (of a parent).
    /// `below_dir`: an upper directory already stands above, so only
    /// directories merge in.
    pub fn lookup_lowers(
        &self,
        dirs: &[LowerObj],
        name: &OsStr,
        below_dir: bool,
    ) -> Result<LowerStack> {
        let above = if below_dir {
            Above::Dir
        } else {
            Above::Nothing
        };
        self.lookup_lower_path(dirs, LowerPath::Name(name.to_os_string()), above)
    }

    /// Resolves `path` through the lower layers as the kernel does: a name
    /// in `dirs`, an absolute path from the layers' roots. A redirect found
    /// on the way changes the path looked up in the layers below; an
    /// absolute one goes on from the roots, at the next layer. `above`: what
    /// the upper layer holds there.
    pub fn lookup_lower_path(
        &self,
        dirs: &[LowerObj],
        path: LowerPath,
        above: Above,
    ) -> Result<LowerStack> {
        let roots = self.lower_roots();
        let mut walk = LowerWalk {
            path,
            out: LowerStack::default(),
            merging: above == Above::Dir,
            wants_data: above == Above::Metacopy,
            ns: self.ns,
        };
        let mut stack = if walk.path.is_absolute() { roots } else { dirs };
        let mut i = 0;
        while i < stack.len() {
            let layer = &stack[i];
            let step = lookup_in_layer(layer, &walk.path, self.ns)?;
            walk.path = step.path;
            let stop = match step.hit {
                InLayer::Absent => step.stop,
                InLayer::Whiteout => true,
                InLayer::Object(real, st) if !sys::is_dir(&st) => {
                    walk.file(layer, real, st, step.stop)?
                }
                InLayer::Object(real, st) => walk.dir(layer, real, st, step.stop)?,
            };
            if stop {
                break;
            }
            if walk.path.is_absolute() && !std::ptr::eq(stack, roots) {
                // Go on from the roots, below the layer just searched.
                stack = roots;
                i = layer.layer as usize;
            } else {
                i += 1;
            }
        }
        walk.finish()
    }

    /// Resolves `name` in the directory `parent`, without touching the
    /// kernel's reference counts.
    pub fn resolve(&self, parent: &Node, name: &OsStr) -> Result<Found> {
        if name.len() > 255 {
            return Err(Errno::ENAMETOOLONG);
        }
        let (upper_dir, lower_dirs) = {
            let st = parent.state.read();
            (st.upper.clone(), st.lowers.clone())
        };
        let upper = match &upper_dir {
            Some(dir) => match sys::stat_at(dir.dir(), name) {
                Ok(st) if format::is_whiteout_dev(&st) => return Err(Errno::ENOENT),
                Ok(st) => Some((dir.child(name, &st)?, st)),
                Err(Errno::ENOENT) => None,
                Err(e) => return Err(e),
            },
            None => None,
        };
        if let Some((real, st)) = upper {
            let below = self.lowers_below_upper(&lower_dirs, name, &real, &st)?;
            let found = Found {
                upper: Some(real),
                lowers: below.objs,
                stat: st,
                top_layer: UPPER,
                index: None,
                metacopy: below.metacopy,
            };
            self.identify(&lower_dirs, name, &found);
            return Ok(found);
        }
        let lowers = self.lookup_lowers(&lower_dirs, name, false)?;
        let st = lowers.stat.ok_or(Errno::ENOENT)?;
        let top_layer = lowers.objs[0].layer;
        let index = self.index_entry_of_lower(&lowers.objs[0].real, &st);
        let metacopy = match &index {
            Some(entry) => entry
                .stat()
                .is_ok_and(|st| is_metadata_only(entry, &st, self.ns)),
            None => lowers.objs.len() > 1 && !sys::is_dir(&st),
        };
        Ok(Found {
            upper: None,
            lowers: lowers.objs,
            stat: st,
            top_layer,
            index,
            metacopy,
        })
    }

    /// What the lower layers add under the upper object `real` (stat `st`)
    /// named `name` in a directory whose lower directories are `lower_dirs`:
    /// the directories merged under a directory that is not opaque (found
    /// where its redirect says, if it has one), the data of a metadata-only
    /// copy; nothing for anything else.
    pub fn lowers_below_upper(
        &self,
        lower_dirs: &[LowerObj],
        name: &OsStr,
        real: &Real,
        st: &Stat,
    ) -> Result<Below> {
        let own_name = || LowerPath::Name(name.to_os_string());
        let ns = self.ns;
        if sys::is_dir(st) {
            if format::upper_dir_opacity(real.dir(), ns) == Opacity::Opaque {
                return Ok(Below::default());
            }
            let path = format::redirect_of(&real.xattrs()?, ns)?.unwrap_or_else(own_name);
            let objs = self.lookup_lower_path(lower_dirs, path, Above::Dir)?.objs;
            return Ok(Below {
                objs,
                metacopy: false,
            });
        }
        if !format::may_be_metacopy(st) {
            return Ok(Below::default());
        }
        let xattrs = real.xattrs()?;
        if !format::is_metacopy(&xattrs, ns) {
            return Ok(Below::default());
        }
        let path = format::redirect_of(&xattrs, ns)?.unwrap_or_else(own_name);
        let objs = self
            .lookup_lower_path(lower_dirs, path, Above::Metacopy)?
            .objs;
        if objs.is_empty() {
            return Err(Errno::EIO); // no data anywhere, as the kernel says
        }
        Ok(Below {
            objs,
            metacopy: true,
        })
    }

    /// The index entry showing the lower object `real` (stat `st`), if
    /// another name of it was copied up with the index on.
    fn index_entry_of_lower(&self, real: &Real, st: &Stat) -> Option<Real> {
        if !self.index_is_on() || sys::is_dir(st) || st.st_nlink <= 1 {
            return None;
        }
        let fd = real.path_fd().ok()?;
        let name = self.index_name_of(fd.as_fd(), st)?;
        self.index_entry(&name).map(|(entry, _)| entry)
    }

    /// Makes the number of a resolved upper object known to the table, as
    /// the kernel shows it: a merged directory shows its top lower
    /// directory's, a non-directory with a recorded origin of one link that
    /// origin's; anything else its own. `lower_dirs`: the lower directories
    /// of its parent.
    pub fn identify(&self, lower_dirs: &[LowerObj], name: &OsStr, found: &Found) {
        let Some(upper) = &found.upper else {
            return;
        };
        let upper_ino = found.stat.st_ino;
        if self.table.knows_origin(upper_ino) {
            return;
        }
        let id = if found.is_dir() {
            // A directory's number is settled once looked at (0: its own).
            Some(found.lowers.first().map_or(0, |l| {
                l.real
                    .stat()
                    .map_or(0, |st| self.table.id_for(l.layer, st.st_ino))
            }))
        } else {
            match upper {
                Real::At(dir, n) => match format::origin_of(dir.as_fd(), n, self.ns) {
                    Some(o) if self.is_indexed(&o, &found.stat) => {
                        // One file of many names, each a node of its own
                        // (see `node`), all showing the lower's number.
                        let ino = self.origin_id(lower_dirs, name, &o, true).unwrap_or(0);
                        if ino != 0 {
                            self.table.record_per_name(upper_ino, ino);
                            return;
                        }
                        Some(0)
                    }
                    Some(o) => Some(self.origin_id(lower_dirs, name, &o, false).unwrap_or(0)),
                    None => None,
                },
                Real::Open(_) => None, // pinned: its number is known already
            }
        };
        match id {
            Some(0) => {
                // Its own number (an origin that cannot be followed, or a
                // directory with nothing below), and no second try.
                let own = self.table.id_for(UPPER, upper_ino);
                self.table.record_origin(upper_ino, own, own);
            }
            Some(id) => self.table.record_origin(upper_ino, id, id),
            None => {}
        }
    }

    /// The id of the lower object an upper non-directory `name` records as
    /// its origin, when that object has one link (or `linked`: any number,
    /// for an indexed file): found at the same name in `lower_dirs`
    /// (compared by handle), else opened by its handle (which needs
    /// CAP_DAC_READ_SEARCH).
    pub fn origin_id(
        &self,
        lower_dirs: &[LowerObj],
        name: &OsStr,
        origin: &format::Origin,
        linked: bool,
    ) -> Option<u64> {
        if let Ok(LowerStack {
            objs,
            stat: Some(st),
        }) = self.lookup_lowers(lower_dirs, name, false)
            && let Some(l) = objs.first()
            && !sys::is_dir(&st)
            && let Ok(fd) = l.real.path_fd()
            && sys::file_handle(fd.as_fd())
                .is_ok_and(|(k, h)| k == origin.kind && h == origin.handle)
        {
            return (st.st_nlink == 1 || linked).then(|| self.table.id_for(l.layer, st.st_ino));
        }
        self.decode_origin(origin, linked)
    }

    /// Opens an origin by its handle on the lower layers' filesystems: the
    /// first lower layer on the filesystem holding it names it.
    fn decode_origin(&self, origin: &format::Origin, linked: bool) -> Option<u64> {
        let roots = self.lower_roots();
        // open_by_handle_at wants a descriptor that is not O_PATH.
        let fd = roots.iter().find_map(|r| {
            let root = sys::reopen(r.dir(), libc::O_RDONLY | libc::O_DIRECTORY).ok()?;
            sys::open_by_handle(root.as_fd(), origin.kind, &origin.handle).ok()
        })?;
        let st = sys::stat_fd(fd.as_fd()).ok()?;
        if sys::is_dir(&st) || (st.st_nlink != 1 && !linked) {
            return None;
        }
        let layer = roots
            .iter()
            .find(|r| sys::stat_fd(r.dir()).is_ok_and(|rs| rs.st_dev == st.st_dev))?;
        Some(self.table.id_for(layer.layer, st.st_ino))
    }

    /// True when a lower layer shows something at `name` in `parent`: removing
    /// or moving the upper object there must leave a whiteout.
    pub fn name_in_lowers(&self, parent: &Node, name: &OsStr) -> Result<bool> {
        let dirs = parent.state.read().lowers.clone();
        if dirs.is_empty() {
            return Ok(false);
        }
        Ok(self.lookup_lowers(&dirs, name, false)?.stat.is_some())
    }

    /// The `st_ino` of the file whose names are nodes of their own, if the
    /// name resolved as `found` is one: a lower hard-linked file without an
    /// upper copy, or a file of the index (see `node`).
    pub fn per_name_file(&self, found: &Found) -> Option<u64> {
        if found.is_lower_hard_link() {
            return Some(self.ino_of(found));
        }
        let upper_file = found.upper.is_some() && !found.is_dir();
        (upper_file && self.table.is_per_name(found.stat.st_ino)).then(|| self.ino_of(found))
    }

    /// The id `name` in `parent`, resolved as `found`, has in the union.
    fn id_of(&self, parent: &Node, name: &OsStr, found: &Found) -> u64 {
        if let Some(file) = self.per_name_file(found) {
            let key = (parent.id, Arc::from(name));
            return self.table.alias_id(key, file);
        }
        self.table.id_for(found.top_layer, found.stat.st_ino)
    }

    /// The `st_ino` a resolved object shows.
    fn ino_of(&self, found: &Found) -> u64 {
        self.table.ino_for(found.top_layer, found.stat.st_ino)
    }

    /// The node of `name` in `parent`, resolved as `found`, if the kernel
    /// holds it.
    pub fn held_node(&self, parent: &Node, name: &OsStr, found: &Found) -> Option<Arc<Node>> {
        let id = match self.per_name_file(found) {
            Some(file) => {
                let key = (parent.id, Arc::from(name));
                self.table.existing_alias(&key, file)?
            }
            None => self.table.id_for(found.top_layer, found.stat.st_ino),
        };
        self.table.get(id)
    }

    /// A node for a resolved object the kernel does not hold (to copy it up
    /// before a rename), not entered in the table.
    pub fn unheld_node(&self, parent: &Arc<Node>, name: &OsStr, found: Found) -> Node {
        let id = self.id_of(parent, name, &found);
        self.build_node(id, parent, name, found)
    }

    /// A node `id` for a resolved object, not entered in the table.
    fn build_node(&self, id: u64, parent: &Arc<Node>, name: &OsStr, found: Found) -> Node {
        // A file's name is already held by its handle: share it.
        let held = found
            .upper
            .iter()
            .chain(found.lowers.iter().map(|l| &l.real))
            .find_map(|r| match r {
                Real::At(_, n) if **n == *name => Some(n.clone()),
                _ => None,
            });
        let name = held.unwrap_or_else(|| Arc::from(name));
        let alias = self
            .per_name_file(&found)
            .map(|_| (parent.id, name.clone()));
        Node::with_ino(
            id,
            self.ino_of(&found),
            alias,
            sys::file_type(found.stat.st_mode),
            NodeState {
                parent: Some(parent.clone()),
                name,
                upper: found.upper,
                index: found.index,
                lowers: found.lowers,
                unlinked: false,
                metacopy: found.metacopy,
            },
        )
    }

    /// FUSE lookup: resolves and takes a kernel reference.
    pub fn lookup(&self, parent_id: u64, name: &OsStr) -> Result<(Arc<Node>, Stat)> {
        let parent = self.node(parent_id)?;
        let found = self.resolve(&parent, name)?;
        self.acquire_node(&parent, name, found)
    }

    /// The node of a resolved object, with one more kernel reference.
    pub fn acquire_node(
        &self,
        parent: &Arc<Node>,
        name: &OsStr,
        found: Found,
    ) -> Result<(Arc<Node>, Stat)> {
        let id = self.id_of(parent, name, &found);
        let stat = found.stat;
        let alias = self.per_name_file(&found);
        let index = found.index.clone();
        let metacopy = found.metacopy;
        let from_lower = found.upper.is_none();
        let mut made = false;
        let node = self.table.acquire(id, || {
            made = true;
            self.build_node(id, parent, name, found)
        });
        if node.kind != sys::file_type(stat.st_mode) {
            self.table.forget(id, 1);
            return Err(Errno::ESTALE);
        }
        if let Some(file) = alias {
            let key = (parent.id, Arc::from(name));
            self.table.keep_alias(key, file, id);
        }
        if !made {
            node.set_location(parent.clone(), name, None);
        }
        if let Some(entry) = index {
            node.show_index_entry(entry, metacopy);
        }
        let stat = match node.upper_or_index() {
            // A lower name shown by the index entry (or linked up meanwhile).
            Some(real) if from_lower && !node.is_dir() => real.stat()?,
            _ => stat,
        };
        let stat = self.present(&node, stat);
        Ok((node, stat))
    }
}
