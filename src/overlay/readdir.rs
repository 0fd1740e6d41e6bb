//! readdir: the merged listing of a union directory.
//!
//! Upper entries first, then each lower directory's; a name is shown once,
//! from the topmost layer that has it; whiteouts and what they hide are never
//! shown. The listing is taken when a stream starts (or is rewound) and kept
//! for the open directory, so it stays consistent while entries come and go.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::overlay::format;
use crate::overlay::namei::Found;
use crate::overlay::node::{LowerObj, Node, ROOT_ID, Real, UPPER};
use crate::overlay::superblock::Union;
use crate::sys::{self, RawDirEntry, Result, Stat};

/// One entry of a merged listing.
#[derive(Clone, Debug)]
pub struct MergedEntry {
    pub name: OsString,
    /// `d_ino`: the `st_ino` the entry shows.
    pub ino: u64,
    /// `S_IFMT` bits.
    pub kind: u32,
    /// The layer the entry comes from (0: upper).
    pub layer: u16,
}

/// An open directory: the listing it serves.
#[derive(Debug, Default)]
pub struct DirStream {
    pub entries: Vec<MergedEntry>,
}

fn dtype_kind(dtype: u8) -> Option<u32> {
    Some(match dtype {
        libc::DT_REG => libc::S_IFREG,
        libc::DT_DIR => libc::S_IFDIR,
        libc::DT_LNK => libc::S_IFLNK,
        libc::DT_CHR => libc::S_IFCHR,
        libc::DT_BLK => libc::S_IFBLK,
        libc::DT_FIFO => libc::S_IFIFO,
        libc::DT_SOCK => libc::S_IFSOCK,
        _ => return None,
    })
}

/// What an entry of one layer is.
enum Kind {
    Whiteout,
    Object(u32),
}

fn classify(dir: BorrowedFd<'_>, e: &RawDirEntry, xwhiteouts: bool) -> Result<Kind> {
    let kind = dtype_kind(e.dtype);
    let needs_stat =
        matches!(kind, None | Some(libc::S_IFCHR)) || (xwhiteouts && kind == Some(libc::S_IFREG));
    if !needs_stat {
        return Ok(Kind::Object(kind.unwrap_or(libc::S_IFREG)));
    }
    let st = match sys::stat_at(dir, &e.name) {
        Ok(st) => st,
        Err(sys::Errno::ENOENT) => return Ok(Kind::Whiteout), // gone meanwhile
        Err(err) => return Err(err),
    };
    if format::is_whiteout_dev(&st) {
        return Ok(Kind::Whiteout);
    }
    if xwhiteouts && sys::file_type(st.st_mode) == libc::S_IFREG {
        let fd = sys::open_path(dir, &e.name)?;
        if format::is_xattr_whiteout(fd.as_fd(), &st) {
            return Ok(Kind::Whiteout);
        }
    }
    Ok(Kind::Object(sys::file_type(st.st_mode)))
}

impl Union {
    /// The merged entries (no `.`/`..`) of a directory made of `upper` over
    /// `lowers`.
    pub fn merged_entries(
        &self,
        upper: Option<&Real>,
        lowers: &[LowerObj],
    ) -> Result<Vec<MergedEntry>> {
        let mut seen: HashSet<OsString> = HashSet::new();
        let mut out = Vec::new();
        // Upper entries whose number is not known yet: index, upper inode.
        let mut unknown: Vec<(usize, u64)> = Vec::new();
        if let Some(dir) = upper {
            for e in sys::read_dir(dir.dir())? {
                seen.insert(e.name.clone());
                if let Kind::Object(kind) = classify(dir.dir(), &e, false)? {
                    if !self.table.knows_origin(e.ino) {
                        unknown.push((out.len(), e.ino));
                    }
                    out.push(MergedEntry {
                        ino: self.table.ino_for(UPPER, e.ino),
                        kind,
                        name: e.name,
                        layer: UPPER,
                    });
                }
            }
        }
        for lower in lowers {
            let mut hidden_below = Vec::new();
            for e in sys::read_dir(lower.dir())? {
                if format::is_aufs_marker(&e.name) {
                    let target = &e.name.as_bytes()[format::AUFS_WHITEOUT_PREFIX.len()..];
                    hidden_below.push(OsStr::from_bytes(target).to_os_string());
                    continue;
                }
                if !seen.insert(e.name.clone()) {
                    continue;
                }
                if let Kind::Object(kind) = classify(lower.dir(), &e, lower.xwhiteouts)? {
                    out.push(MergedEntry {
                        ino: self.table.ino_for(lower.layer, e.ino),
                        kind,
                        name: e.name,
                        layer: lower.layer,
                    });
                }
            }
            seen.extend(hidden_below);
        }
        if let Some(dir) = upper {
            self.identify_listed(dir, lowers, &mut out, &unknown);
        }
        Ok(out)
    }

    /// Gives the upper entries `unknown` of a listing the numbers a lookup
    /// would (`d_ino` equals `st_ino`, as the kernel makes it): a merged
    /// subdirectory its top lower directory's, a non-directory with an
    /// origin (in a directory marked impure) its origin's.
    fn identify_listed(
        &self,
        dir: &Real,
        lowers: &[LowerObj],
        out: &mut [MergedEntry],
        unknown: &[(usize, u64)],
    ) {
        let mut impure = None;
        for &(i, upper_ino) in unknown {
            let e = &out[i];
            if e.kind != libc::S_IFDIR
                && !*impure.get_or_insert_with(|| format::is_impure(dir.dir(), self.ns))
            {
                continue;
            }
            let Ok(st) = sys::stat_at(dir.dir(), &e.name) else {
                continue; // gone meanwhile
            };
            let real = match dir.child(&e.name, &st) {
                Ok(r) => r,
                Err(_) => continue,
            };
            let found = if sys::is_dir(&st) {
                let Ok(below) = self.lowers_below_upper(lowers, &e.name, &real, &st) else {
                    continue;
                };
                Found {
                    upper: Some(real),
                    lowers: below.objs,
                    stat: st,
                    top_layer: UPPER,
                    index: None,
                    metacopy: false,
                }
            } else {
                Found {
                    upper: Some(real),
                    lowers: vec![],
                    stat: st,
                    top_layer: UPPER,
                    index: None,
                    metacopy: false,
                }
            };
            self.identify(lowers, &e.name, &found);
            out[i].ino = self.table.ino_for(UPPER, upper_ino);
        }
    }

    /// The merged entries of the directory node `dir`.
    pub fn entries_of(&self, dir: &Node) -> Result<Vec<MergedEntry>> {
        let (upper, lowers) = {
            let st = dir.state.read();
            (st.upper.clone(), st.lowers.clone())
        };
        self.merged_entries(upper.as_ref(), &lowers)
    }

    /// Starts a directory stream.
    pub fn opendir(&self, id: u64) -> Result<u64> {
        let node = self.node(id)?;
        if !node.is_dir() {
            return Err(sys::Errno::ENOTDIR);
        }
        let fh = self.next_handle();
        self.dirs
            .insert(fh, Arc::new(Mutex::new(DirStream::default())));
        Ok(fh)
    }

    /// The listing of stream `fh` of directory `dir`: `.`, `..`, then the
    /// merged entries. Offset 0 (a new stream or a rewind) takes a fresh one.
    fn stream(&self, dir: &Node, fh: u64, offset: u64) -> Result<Arc<Mutex<DirStream>>> {
        let stream = self
            .dirs
            .get(&fh)
            .map(|s| s.clone())
            .ok_or(sys::Errno::EBADF)?;
        if offset == 0 {
            let parent_ino = dir.parent_and_name().0.map(|p| p.ino()).unwrap_or(ROOT_ID);
            let mut entries = vec![
                MergedEntry {
                    name: ".".into(),
                    ino: dir.ino(),
                    kind: libc::S_IFDIR,
                    layer: UPPER,
                },
                MergedEntry {
                    name: "..".into(),
                    ino: parent_ino,
                    kind: libc::S_IFDIR,
                    layer: UPPER,
                },
            ];
            entries.extend(self.entries_of(dir)?);
            stream.lock().entries = entries;
        }
        Ok(stream)
    }

    /// Entries from `offset` on; `emit` gets each with the offset of the
    /// next and returns true when it can take no more.
    pub fn readdir(
        &self,
        id: u64,
        fh: u64,
        offset: u64,
        mut emit: impl FnMut(&MergedEntry, u64) -> bool,
    ) -> Result<()> {
        let node = self.node(id)?;
        let stream = self.stream(&node, fh, offset)?;
        let stream = stream.lock();
        for (i, e) in stream.entries.iter().enumerate().skip(offset as usize) {
            if emit(e, i as u64 + 1) {
                break;
            }
        }
        Ok(())
    }

    /// readdir with each entry looked up: every entry but `.` and `..` takes
    /// a kernel reference, except the one `emit` refuses (returns true for).
    /// `emit` gets the entry, the offset of the next, the node id and `stat`
    /// (whose `st_ino` is not the node id for one name of a lower
    /// hard-linked file: the transport gives both to the kernel).
    pub fn readdirplus(
        &self,
        id: u64,
        fh: u64,
        offset: u64,
        mut emit: impl FnMut(&MergedEntry, u64, u64, &Stat) -> bool,
    ) -> Result<()> {
        let node = self.node(id)?;
        let stream = self.stream(&node, fh, offset)?;
        let stream = stream.lock();
        for (i, e) in stream.entries.iter().enumerate().skip(offset as usize) {
            let (stat, id, counted) = match i {
                0 => (node.stat()?, node.id, None),
                1 => {
                    let parent = node.parent_and_name().0.unwrap_or_else(|| node.clone());
                    (parent.stat()?, parent.id, None)
                }
                _ => match self.lookup_listed(&node, e) {
                    Ok((n, st)) => (st, n.id, Some(n)),
                    Err(_) => continue, // gone since the listing was taken
                },
            };
            let counted = counted.map(|n| n.id);
            if emit(e, i as u64 + 1, id, &stat) {
                if let Some(n) = counted {
                    self.table.forget(n, 1);
                }
                break;
            }
        }
        Ok(())
    }

    /// Looks up an entry of a listing: a non-directory is known to come from
    /// the layer that listed it, which spares probing the others.
    fn lookup_listed(&self, dir: &Arc<Node>, e: &MergedEntry) -> Result<(Arc<Node>, Stat)> {
        if e.kind == libc::S_IFDIR {
            return self.lookup(dir.id, &e.name);
        }
        self.lookup_listed_file(dir, e)
    }

    /// `lookup_listed` of a non-directory.
    fn lookup_listed_file(&self, dir: &Arc<Node>, e: &MergedEntry) -> Result<(Arc<Node>, Stat)> {
        let layer_dir = {
            let st = dir.state.read();
            if e.layer == UPPER {
                st.upper.clone()
            } else {
                st.lowers
                    .iter()
                    .find(|l| l.layer == e.layer)
                    .map(|l| l.real.clone())
            }
        };
        let Some(layer_dir) = layer_dir else {
            return self.lookup(dir.id, &e.name);
        };
        let stat = sys::stat_at(layer_dir.dir(), &e.name)?;
        if sys::is_dir(&stat) || format::is_whiteout_dev(&stat) {
            return self.lookup(dir.id, &e.name); // changed since the listing
        }
        if e.layer != UPPER && stat.st_nlink > 1 && self.index_is_on() {
            return self.lookup(dir.id, &e.name); // may be shown by an index entry
        }
        let real = Real::At(layer_dir.dir_arc(), Arc::from(e.name.as_os_str()));
        if crate::overlay::namei::is_metadata_only(&real, &stat, self.ns) {
            return self.lookup(dir.id, &e.name); // its data is elsewhere
        }
        let found = if e.layer == UPPER {
            Found {
                upper: Some(real),
                lowers: vec![],
                stat,
                top_layer: UPPER,
                index: None,
                metacopy: false,
            }
        } else {
            let lower = LowerObj {
                layer: e.layer,
                real,
                xwhiteouts: false,
            };
            Found {
                upper: None,
                lowers: vec![lower],
                stat,
                top_layer: e.layer,
                index: None,
                metacopy: false,
            }
        };
        self.acquire_node(dir, &e.name, found)
    }

    pub fn releasedir(&self, fh: u64) {
        self.dirs.remove(&fh);
    }

    /// fsyncdir: syncs the upper directory, if there is one.
    pub fn fsyncdir(&self, id: u64, data_only: bool) -> Result<()> {
        let node = self.node(id)?;
        if self.tuning.volatile {
            return Ok(());
        }
        match node.upper() {
            Some(u) => {
                let d = sys::reopen(u.dir(), libc::O_RDONLY | libc::O_DIRECTORY)?;
                sys::fsync(d.as_fd(), data_only)
            }
            None => Ok(()),
        }
    }
}
