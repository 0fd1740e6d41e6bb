//! Lookup: resolving a name in a union directory through the layers.
//!
//! Upper first, then the lower directories merged under the parent, top to
//! bottom. A whiteout ends the search; a non-directory hides everything below
//! it; directories merge until one is opaque.

use std::ffi::OsStr;
use std::os::fd::AsFd;
use std::sync::Arc;

use crate::format::{self, Opacity};
use crate::node::{LowerObj, Node, NodeState, Real, UPPER};
use crate::superblock::Union;
use crate::sys::{self, Errno, Result, Stat};

/// A name resolved through the layers.
#[derive(Debug)]
pub struct Found {
    pub upper: Option<Real>,
    /// Directories: the lower directories merged in. Others: the object shown
    /// when there is no upper one.
    pub lowers: Vec<LowerObj>,
    /// `stat` of the topmost object.
    pub stat: Stat,
    /// Layer and inode of the topmost object (for the node id).
    pub top_layer: u16,
}

impl Found {
    pub fn is_dir(&self) -> bool {
        sys::is_dir(&self.stat)
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

/// Resolves `name` in the lower directories `dirs`. `below_dir`: an upper
/// directory already stands above, so only directories merge in.
/// Returns the lower objects (several only for directories) with the
/// `stat` of the first.
pub fn lookup_lowers(
    dirs: &[LowerObj],
    name: &OsStr,
    below_dir: bool,
) -> Result<(Vec<LowerObj>, Option<Stat>)> {
    let mut found: Vec<LowerObj> = Vec::new();
    let mut first: Option<Stat> = None;
    for dir in dirs {
        match probe(dir, name)? {
            InLayer::Absent => continue,
            InLayer::Whiteout => break,
            InLayer::Object(real, st) => {
                let merging = below_dir || !found.is_empty();
                if !sys::is_dir(&st) {
                    if !merging {
                        found.push(LowerObj {
                            layer: dir.layer,
                            real,
                            xwhiteouts: false,
                        });
                        first = Some(st);
                    }
                    break;
                }
                let opacity = format::dir_opacity(real.dir(), true);
                found.push(LowerObj {
                    layer: dir.layer,
                    real,
                    xwhiteouts: opacity == Opacity::HasXattrWhiteouts,
                });
                if first.is_none() {
                    first = Some(st);
                }
                if opacity == Opacity::Opaque {
                    break;
                }
            }
        }
    }
    Ok((found, first))
}

impl Union {
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
        let mut upper = None;
        if let Some(dir) = &upper_dir {
            match sys::stat_at(dir.dir(), name) {
                Ok(st) if format::is_whiteout_dev(&st) => return Err(Errno::ENOENT),
                Ok(st) => {
                    let real = dir.child(name, &st)?;
                    let ends_here = !sys::is_dir(&st)
                        || format::dir_opacity(real.dir(), false) == Opacity::Opaque;
                    if ends_here {
                        return Ok(Found {
                            upper: Some(real),
                            lowers: vec![],
                            stat: st,
                            top_layer: UPPER,
                        });
                    }
                    upper = Some((real, st));
                }
                Err(Errno::ENOENT) => {}
                Err(e) => return Err(e),
            }
        }
        let (lowers, lower_stat) = lookup_lowers(&lower_dirs, name, upper.is_some())?;
        match (upper, lower_stat) {
            (Some((fd, st)), _) => Ok(Found {
                upper: Some(fd),
                lowers,
                stat: st,
                top_layer: UPPER,
            }),
            (None, Some(st)) => {
                let top_layer = lowers[0].layer;
                Ok(Found {
                    upper: None,
                    lowers,
                    stat: st,
                    top_layer,
                })
            }
            (None, None) => Err(Errno::ENOENT),
        }
    }

    /// True when a lower layer shows something at `name` in `parent`: removing
    /// or moving the upper object there must leave a whiteout.
    pub fn name_in_lowers(&self, parent: &Node, name: &OsStr) -> Result<bool> {
        let dirs = parent.state.read().lowers.clone();
        if dirs.is_empty() {
            return Ok(false);
        }
        Ok(lookup_lowers(&dirs, name, false)?.1.is_some())
    }

    /// The id a resolved object has in the union.
    pub fn id_of(&self, found: &Found) -> u64 {
        self.table.id_for(found.top_layer, found.stat.st_ino)
    }

    /// The node of a resolved object if the kernel holds it.
    pub fn existing_node(&self, found: &Found) -> Option<Arc<Node>> {
        self.table.get(self.id_of(found))
    }

    /// A node for a resolved object, not entered in the table.
    pub fn node_from(&self, parent: &Arc<Node>, name: &OsStr, found: Found) -> Node {
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
        Node::new(
            self.id_of(&found),
            sys::file_type(found.stat.st_mode),
            NodeState {
                parent: Some(parent.clone()),
                name,
                upper: found.upper,
                lowers: found.lowers,
                unlinked: false,
            },
        )
    }

    /// FUSE lookup: resolves and takes a kernel reference.
    pub fn lookup(&self, parent_id: u64, name: &OsStr) -> Result<(Arc<Node>, Stat)> {
        let parent = self.node(parent_id)?;
        let found = self.resolve(&parent, name)?;
        self.acquire_found(&parent, name, found)
    }

    /// The node of a resolved object, with one more kernel reference.
    pub fn acquire_found(
        &self,
        parent: &Arc<Node>,
        name: &OsStr,
        found: Found,
    ) -> Result<(Arc<Node>, Stat)> {
        let id = self.id_of(&found);
        let stat = found.stat;
        let mut made = false;
        let node = self.table.acquire(id, || {
            made = true;
            self.node_from(parent, name, found)
        });
        if node.kind != sys::file_type(stat.st_mode) {
            self.table.forget(id, 1);
            return Err(Errno(libc::ESTALE));
        }
        if !made {
            node.set_location(parent.clone(), name, None);
        }
        let stat = node.present(stat);
        Ok((node, stat))
    }
}
