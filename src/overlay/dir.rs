//! Directory operations: create, mkdir, mknod, symlink, link, unlink, rmdir
//! and rename, with whiteouts and opaque directories.
//!
//! Anything that replaces a whiteout, or turns an object into one, is built
//! in the work directory and swapped in by one `renameat2`, so a crash never
//! leaves a lower object showing through half-way.

use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use crate::overlay::format::{self, LowerPath};
use crate::overlay::namei::Found;
use crate::overlay::node::{Node, NodeState, Real, UPPER};
use crate::overlay::superblock::{Caller, Union};
use crate::sys::{self, Errno, Result, Stat};
use crate::tree::remove_tree;

/// The longest redirect recorded, as the kernel's default `redirect_max`.
const REDIRECT_MAX: usize = 256;

/// Where a new object goes: the parent's upper directory, and whether a
/// whiteout is there now.
struct Slot {
    dir: Real,
    over_whiteout: bool,
}

/// A new object made, not yet owned or in place (see `make_object`).
struct Made {
    slot: Slot,
    /// Its name in the directory it was made in: the slot's, or a
    /// temporary one in the work directory.
    build_name: std::ffi::OsString,
    /// The open file `make` returned.
    opened: Option<OwnedFd>,
}

/// How a new object is made and owned.
struct NewObject<'a> {
    /// `S_IFMT` bits and permission bits of the object.
    mode: u32,
    /// Give the object the caller as owner (not for hard links).
    take_owner: bool,
    /// Makes the object at (dir, name); returns an open file for `create`.
    make: &'a mut dyn FnMut(BorrowedFd<'_>, &OsStr) -> Result<Option<OwnedFd>>,
}

/// What a rename moves, resolved once.
struct Side {
    parent: Arc<Node>,
    found: Found,
}

impl Union {
    /// Makes the new object with `make`, in place when the name is free in
    /// the parent's upper directory, as it nearly always is (the kernel has
    /// looked `name` up and found nothing, so only the upper directory can
    /// hold something: a whiteout); over a whiteout, in the work directory
    /// under a temporary name, for `finish_object` to swap in.
    fn make_object(
        &self,
        parent: &Arc<Node>,
        name: &OsStr,
        make: &mut dyn FnMut(BorrowedFd<'_>, &OsStr) -> Result<Option<OwnedFd>>,
    ) -> Result<Made> {
        if name.len() > 255 {
            return Err(Errno::ENAMETOOLONG);
        }
        let dir = self.ensure_upper(parent)?;
        for _ in 0..2 {
            match make(dir.dir(), name) {
                Ok(opened) => {
                    return Ok(Made {
                        slot: Slot {
                            dir,
                            over_whiteout: false,
                        },
                        build_name: name.to_os_string(),
                        opened,
                    });
                }
                Err(Errno::EEXIST) => {}
                Err(e) => return Err(e),
            }
            match sys::stat_at(dir.dir(), name) {
                Ok(st) if format::is_whiteout_dev(&st) => {
                    let build_name = self.temp_name();
                    let opened = make(self.work_fd()?, &build_name)?;
                    return Ok(Made {
                        slot: Slot {
                            dir,
                            over_whiteout: true,
                        },
                        build_name,
                        opened,
                    });
                }
                Ok(_) => return Err(Errno::EEXIST),
                Err(Errno::ENOENT) => {} // removed meanwhile: once more in place
                Err(e) => return Err(e),
            }
        }
        Err(Errno::EEXIST)
    }

    /// The mode a new object gets: the caller's umask applies unless the
    /// directory has a default ACL (which the upper filesystem applies).
    fn creation_mode(&self, parent: &Node, mode: u32, caller: Caller) -> u32 {
        if caller.umask & 0o777 == 0 || parent.no_xattrs.load(std::sync::atomic::Ordering::Relaxed)
        {
            return mode & !(caller.umask & 0o777);
        }
        let has_default_acl = parent.known_default_acl().unwrap_or_else(|| {
            let present = parent
                .real()
                .0
                .xattrs()
                .and_then(|x| x.get(OsStr::new("system.posix_acl_default")))
                .is_ok();
            parent.note_default_acl(present);
            present
        });
        if has_default_acl {
            mode
        } else {
            mode & !(caller.umask & 0o777)
        }
    }

    /// Makes a new object at `name` in `parent` and enters it in the table.
    fn create_object(
        &self,
        parent: &Arc<Node>,
        name: &OsStr,
        caller: Caller,
        new: NewObject<'_>,
    ) -> Result<(Arc<Node>, Stat, Option<OwnedFd>)> {
        let Made {
            slot,
            build_name,
            opened,
        } = self.make_object(parent, name, new.make)?;
        let is_dir = sys::file_type(new.mode) == libc::S_IFDIR;
        // Only a replaced upper whiteout stops hiding: a lower whiteout below a
        // new directory still does, as in the kernel. With the index,
        // redirects or metadata-only copies (which do not allow the lowers
        // to change offline), the kernel also marks every new directory of a
        // merged one opaque.
        let lowers_fixed = self.index_is_on() || self.tuning.redirect_dir || self.tuning.metacopy;
        let in_merged = lowers_fixed && !parent.state.read().lowers.is_empty();
        let opaque = is_dir && (slot.over_whiteout || in_merged);
        let build_dir = if slot.over_whiteout {
            self.work_fd()?
        } else {
            slot.dir.dir()
        };
        let finish = || -> Result<Option<OwnedFd>> {
            // A created file is handled through its open descriptor; anything
            // else through an O_PATH one.
            let path_fd = match opened {
                Some(_) => None,
                None => Some(sys::open_path(build_dir, &build_name)?),
            };
            let obj = opened
                .as_ref()
                .or(path_fd.as_ref())
                .ok_or(Errno::EIO)?
                .as_fd();
            if new.take_owner {
                set_owner(obj, slot.dir.dir(), caller, new.mode)?;
            }
            if opaque {
                format::set_opaque(obj, self.ns)?;
            }
            if slot.over_whiteout {
                if is_dir {
                    sys::rename_at(
                        build_dir,
                        &build_name,
                        slot.dir.dir(),
                        name,
                        libc::RENAME_EXCHANGE,
                    )?;
                    let _ = sys::unlink_at(build_dir, &build_name, false);
                } else {
                    sys::rename_at(build_dir, &build_name, slot.dir.dir(), name, 0)?;
                }
            }
            Ok(path_fd)
        };
        let path_fd = match finish() {
            Ok(path_fd) => path_fd,
            Err(e) => {
                if slot.over_whiteout || new.take_owner {
                    let _ = remove_tree(build_dir, &build_name);
                }
                return Err(e);
            }
        };
        let obj = opened.as_ref().or(path_fd.as_ref()).ok_or(Errno::EIO)?;
        let stat = sys::stat_fd(obj.as_fd())?;
        let shared_name: Arc<OsStr> = Arc::from(name);
        let upper_ref = if let (true, Some(fd)) = (sys::is_dir(&stat), path_fd) {
            Real::Open(Arc::new(fd))
        } else {
            Real::At(slot.dir.dir_arc(), shared_name.clone())
        };
        let ino = self.table.ino_for(UPPER, stat.st_ino);
        // A new link of a file of the index is a node of its own (see `node`).
        let alias = self
            .table
            .is_per_name(stat.st_ino)
            .then(|| (parent.id, shared_name.clone()));
        let id = match &alias {
            Some(key) => self.table.alias_id(key.clone(), ino),
            None => self.table.id_for(UPPER, stat.st_ino),
        };
        let node = self.table.acquire(id, || {
            Node::with_ino(
                id,
                ino,
                alias,
                sys::file_type(stat.st_mode),
                NodeState {
                    parent: Some(parent.clone()),
                    name: shared_name,
                    upper: Some(upper_ref),
                    index: None,
                    lowers: vec![],
                    unlinked: false,
                    metacopy: false,
                },
            )
        });
        node.set_location(parent.clone(), name, None);
        let stat = self.present(&node, stat);
        Ok((node, stat, opened))
    }

    pub fn create(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        flags: i32,
        caller: Caller,
    ) -> Result<(Arc<Node>, Stat, OwnedFd)> {
        let parent = self.node(parent)?;
        let mode = self.creation_mode(&parent, mode, caller);
        let mut make = |d: BorrowedFd<'_>, n: &OsStr| {
            sys::create_file(d, n, flags & !libc::O_DIRECT, mode & 0o777).map(Some)
        };
        let new = NewObject {
            mode: libc::S_IFREG | (mode & 0o7777),
            take_owner: true,
            make: &mut make,
        };
        let (node, stat, file) = self.create_object(&parent, name, caller, new)?;
        Ok((node, stat, file.ok_or(Errno::EIO)?))
    }

    pub fn mkdir(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        caller: Caller,
    ) -> Result<(Arc<Node>, Stat)> {
        let parent = self.node(parent)?;
        let mode = self.creation_mode(&parent, mode, caller);
        let mut make =
            |d: BorrowedFd<'_>, n: &OsStr| sys::mkdir_at(d, n, mode & 0o7777).map(|_| None);
        let new = NewObject {
            mode: libc::S_IFDIR | (mode & 0o7777),
            take_owner: true,
            make: &mut make,
        };
        let (node, stat, _) = self.create_object(&parent, name, caller, new)?;
        Ok((node, stat))
    }

    pub fn mknod(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        rdev: u64,
        caller: Caller,
    ) -> Result<(Arc<Node>, Stat)> {
        if sys::file_type(mode) == libc::S_IFCHR && rdev == 0 {
            return Err(Errno::EPERM); // that is a whiteout
        }
        let parent = self.node(parent)?;
        let mode = self.creation_mode(&parent, mode, caller);
        let mut make = |d: BorrowedFd<'_>, n: &OsStr| sys::mknod_at(d, n, mode, rdev).map(|_| None);
        let new = NewObject {
            mode,
            take_owner: true,
            make: &mut make,
        };
        let (node, stat, _) = self.create_object(&parent, name, caller, new)?;
        Ok((node, stat))
    }

    pub fn symlink(
        &self,
        parent: u64,
        name: &OsStr,
        target: &OsStr,
        caller: Caller,
    ) -> Result<(Arc<Node>, Stat)> {
        let parent = self.node(parent)?;
        let mut make = |d: BorrowedFd<'_>, n: &OsStr| sys::symlink_at(target, d, n).map(|_| None);
        let new = NewObject {
            mode: libc::S_IFLNK | 0o777,
            take_owner: true,
            make: &mut make,
        };
        let (node, stat, _) = self.create_object(&parent, name, caller, new)?;
        Ok((node, stat))
    }

    pub fn link(&self, id: u64, new_parent: u64, new_name: &OsStr) -> Result<(Arc<Node>, Stat)> {
        let node = self.node(id)?;
        let parent = self.node(new_parent)?;
        let upper = self.ensure_upper(&node)?;
        if node.is_metacopy() {
            // Every name of it must find the data: where it is now.
            self.record_redirect(&node, &upper, false)?;
        }
        let src = upper.path_fd()?;
        let mut make = |d: BorrowedFd<'_>, n: &OsStr| sys::link_fd(src.as_fd(), d, n).map(|_| None);
        let new = NewObject {
            mode: node.kind,
            take_owner: false,
            make: &mut make,
        };
        let (linked, stat, _) = self.create_object(&parent, new_name, Caller::DAEMON, new)?;
        if node.is_metacopy() && !Arc::ptr_eq(&node, &linked) {
            linked.reads_data_of(&node);
        }
        // A link of an object with an origin makes its new parent impure,
        // as the kernel marks it, so that listings look its number up.
        if let Some(dir) = parent.upper()
            && format::origin_of(dir.dir(), new_name, self.ns).is_some()
            && !format::is_impure(dir.dir(), self.ns)
        {
            let _ = format::set_impure(dir.dir(), self.ns);
        }
        Ok((linked, stat))
    }

    /// Turns the upper object at `name` in `dir` into a whiteout, atomically.
    fn replace_with_whiteout(&self, dir: BorrowedFd<'_>, name: &OsStr, is_dir: bool) -> Result<()> {
        let work = self.work_fd()?;
        let tmp = self.temp_name();
        format::make_whiteout(work, &tmp)?;
        let flags = if is_dir { libc::RENAME_EXCHANGE } else { 0 };
        if let Err(e) = sys::rename_at(work, &tmp, dir, name, flags) {
            let _ = sys::unlink_at(work, &tmp, false);
            return Err(e);
        }
        if is_dir {
            remove_tree(work, &tmp)
        } else {
            Ok(())
        }
    }

    /// Removes the upper directory `name` of `dir`, with any whiteouts in it.
    fn remove_upper_dir(&self, dir: BorrowedFd<'_>, name: &OsStr) -> Result<()> {
        match sys::unlink_at(dir, name, true) {
            Err(Errno::ENOTEMPTY) => {
                let tmp = self.temp_name();
                sys::rename_at(dir, name, self.work_fd()?, &tmp, 0)?;
                remove_tree(self.work_fd()?, &tmp)
            }
            other => other,
        }
    }

    /// Removes `name` from the union view of `parent`.
    fn remove_name(&self, parent: &Arc<Node>, name: &OsStr, found: &Found) -> Result<()> {
        match self.link_up_before_removal(parent, name, found)? {
            Some((node, linked)) => self.remove_found(parent, name, &linked, Some(node)),
            None => self.remove_found(parent, name, found, None),
        }
    }

    /// With the index, a lower-only name of a hard-linked file is linked up
    /// before it is removed or replaced, as the kernel does, so that the
    /// recorded link count drops with the real one. Its node and the name
    /// resolved again, or None when nothing was done.
    fn link_up_before_removal(
        &self,
        parent: &Arc<Node>,
        name: &OsStr,
        found: &Found,
    ) -> Result<Option<(Arc<Node>, Found)>> {
        if !self.index_is_on() || !found.is_lower_hard_link() {
            return Ok(None);
        }
        let node = self
            .held_node(parent, name, found)
            .unwrap_or_else(|| Arc::new(self.unheld_node(parent, name, found.clone())));
        self.ensure_upper(&node)?;
        Ok(Some((node, self.resolve(parent, name)?)))
    }

    /// Removes `name`, resolved as `found`; `linked`: the node of a name
    /// just linked up (see `link_up_before_removal`).
    fn remove_found(
        &self,
        parent: &Arc<Node>,
        name: &OsStr,
        found: &Found,
        linked: Option<Arc<Node>>,
    ) -> Result<()> {
        let is_dir = found.is_dir();
        let dir = self.ensure_upper(parent)?;
        let held: Vec<Arc<Node>> = linked
            .into_iter()
            .chain(self.held_node(parent, name, found))
            .collect();
        for node in &held {
            node.pin()?; // the kernel may still use it (an open file)
        }
        let entry = match &found.upper {
            Some(u) if !is_dir => self.index_entry_of_upper(u, &found.stat),
            _ => None,
        };
        if found.upper.is_none() {
            format::make_whiteout(dir.dir(), name)?; // only lower objects: hide them
        } else if self.name_in_lowers(parent, name)? {
            self.replace_with_whiteout(dir.dir(), name, is_dir)?;
        } else if is_dir {
            self.remove_upper_dir(dir.dir(), name)?;
        } else {
            sys::unlink_at(dir.dir(), name, false)?;
        }
        for node in held {
            node.mark_unlinked();
        }
        if let Some(entry) = entry {
            self.drop_index_if_unlinked(&entry);
        }
        if found.upper.is_some() && (is_dir || found.stat.st_nlink <= 1) {
            self.table.drop_origin(found.stat.st_ino); // its inode number is free
        }
        Ok(())
    }

    pub fn unlink(&self, parent: u64, name: &OsStr) -> Result<()> {
        let parent = self.node(parent)?;
        let found = self.resolve(&parent, name)?;
        if found.is_dir() {
            return Err(Errno::EISDIR);
        }
        self.remove_name(&parent, name, &found)
    }

    pub fn rmdir(&self, parent: u64, name: &OsStr) -> Result<()> {
        let parent = self.node(parent)?;
        let found = self.resolve(&parent, name)?;
        if !found.is_dir() {
            return Err(Errno::ENOTDIR);
        }
        if !self
            .merged_entries(found.upper.as_ref(), &found.lowers)?
            .is_empty()
        {
            return Err(Errno::ENOTEMPTY);
        }
        self.remove_name(&parent, name, &found)
    }

    /// Without `redirect_dir` a lower or merged directory cannot be moved
    /// (EXDEV, as the kernel's `redirect_dir=off`); an upper one (opaque or
    /// new) can.
    fn check_movable(&self, side: &Side) -> Result<()> {
        if !self.tuning.redirect_dir && Self::has_lower_dirs(&side.found) {
            return Err(Errno::EXDEV);
        }
        Ok(())
    }

    /// Prepares the upper object `upper` of `node` (resolved as `found`) to
    /// move into `new_parent` (`samedir`: its own parent), as the kernel
    /// does: a directory with lower directories, or a metadata-only copy,
    /// records where its lower objects are; an upper directory moving into
    /// a merged one becomes opaque.
    fn prepare_move(
        &self,
        node: &Node,
        found: &Found,
        upper: &Real,
        new_parent: &Node,
        samedir: bool,
    ) -> Result<()> {
        if Self::has_lower_dirs(found) || node.is_metacopy() {
            return self.record_redirect(node, upper, samedir);
        }
        if found.is_dir() {
            self.opaque_if_moved_into_merged(upper, new_parent)?;
        }
        Ok(())
    }

    /// Records on the upper object of `node` where its lower objects are,
    /// before it moves: its present name for a move within its directory,
    /// else its absolute path in the lower layers (also for a file of
    /// several lower links, whose names may be in other directories). A
    /// redirect already there that still holds is kept. A path longer than
    /// the kernel takes is EXDEV, for the caller to copy instead.
    fn record_redirect(&self, node: &Node, upper: &Real, samedir: bool) -> Result<()> {
        let xattrs = upper.xattrs()?;
        let present = format::redirect_of(&xattrs, self.ns)?;
        if matches!(present, Some(LowerPath::Absolute(_))) || (present.is_some() && samedir) {
            return Ok(());
        }
        let linked = !node.is_dir()
            && node
                .lower()
                .and_then(|l| l.stat().ok())
                .is_some_and(|st| st.st_nlink > 1);
        let to = if samedir && !linked {
            LowerPath::Name(node.parent_and_name().1.to_os_string())
        } else {
            self.lower_path_of(node)?
        };
        if to.encode().len() > REDIRECT_MAX {
            return Err(Errno::EXDEV);
        }
        xattrs.set(OsStr::new(self.ns.redirect()), &to.encode(), 0)
    }

    /// The absolute path in the lower layers of what `node` shows: its
    /// name under its parent's, each name replaced by a redirect found on
    /// the way up, up to the root or an absolute redirect.
    fn lower_path_of(&self, node: &Node) -> Result<LowerPath> {
        let mut parts: Vec<std::ffi::OsString> = Vec::new();
        let mut cur = node.parent_and_name();
        let mut at: Option<Real> = node.upper();
        while let (Some(parent), name) = cur {
            let redirect = match &at {
                Some(u) => format::redirect_of(&u.xattrs()?, self.ns)?,
                None => None,
            };
            match redirect {
                Some(LowerPath::Absolute(p)) => {
                    parts.splice(0..0, p);
                    return Ok(LowerPath::Absolute(parts));
                }
                Some(LowerPath::Name(n)) => parts.insert(0, n),
                None => parts.insert(0, name.to_os_string()),
            }
            at = parent.upper();
            cur = parent.parent_and_name();
        }
        Ok(LowerPath::Absolute(parts))
    }

    fn has_lower_dirs(found: &Found) -> bool {
        found.is_dir() && !found.lowers.is_empty()
    }

    fn node_to_move(&self, side: &Side, name: &OsStr) -> Arc<Node> {
        match self.held_node(&side.parent, name, &side.found) {
            Some(n) => n,
            None => Arc::new(self.unheld_node(&side.parent, name, side.found.clone())),
        }
    }

    pub fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        flags: u32,
    ) -> Result<()> {
        if flags & !(libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE) != 0
            || flags == libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE
        {
            return Err(Errno::EINVAL);
        }
        let parent = self.node(parent)?;
        let new_parent = self.node(new_parent)?;
        let src = Side {
            found: self.resolve(&parent, name)?,
            parent: parent.clone(),
        };
        self.check_movable(&src)?;
        let dst = match self.resolve(&new_parent, new_name) {
            Ok(found) => Some(Side {
                found,
                parent: new_parent.clone(),
            }),
            Err(Errno::ENOENT) => None,
            Err(e) => return Err(e),
        };
        if flags & libc::RENAME_EXCHANGE != 0 {
            let dst = dst.ok_or(Errno::ENOENT)?;
            if self.one_inode(&src.found, &dst.found) {
                self.follow_entries(&src, name, &dst, new_name, true);
                return Ok(());
            }
            return self.rename_exchange(src, name, dst, new_name);
        }
        if let Some(d) = &dst {
            if flags & libc::RENAME_NOREPLACE != 0 {
                return Err(Errno::EEXIST);
            }
            // Two names of one inode: nothing to do. Two upper links are one
            // inode; so are all names of a lower hard-linked file with the
            // index, and without it each such name is an inode of its own,
            // as in the kernel.
            if self.one_inode(&src.found, &d.found) {
                self.follow_entries(&src, name, d, new_name, false);
                return Ok(());
            }
            match (src.found.is_dir(), d.found.is_dir()) {
                (true, false) => return Err(Errno::ENOTDIR),
                (false, true) => return Err(Errno::EISDIR),
                // A purely upper target is left to renameat2 to refuse.
                (true, true)
                    if Self::has_lower_dirs(&d.found)
                        && !self
                            .merged_entries(d.found.upper.as_ref(), &d.found.lowers)?
                            .is_empty() =>
                {
                    return Err(Errno::ENOTEMPTY);
                }
                _ => {}
            }
        }
        let dst = match dst {
            Some(d) => match self.link_up_before_removal(&d.parent, new_name, &d.found)? {
                Some((_, found)) => Some(Side { found, ..d }),
                None => Some(d),
            },
            None => None,
        };
        self.rename_replace(src, name, new_parent, dst, new_name)
    }

    /// A rename(2) between two names of one file changes nothing on disk,
    /// but the kernel moves its entries as after any rename: the node of the
    /// old name stands for the new one from now on (and, for an exchange,
    /// the other way round), so that a later change through a name links up
    /// that name, as the kernel's would.
    fn follow_entries(
        &self,
        src: &Side,
        name: &OsStr,
        dst: &Side,
        new_name: &OsStr,
        exchange: bool,
    ) {
        let moved = self.held_node(&src.parent, name, &src.found);
        let other = self.held_node(&dst.parent, new_name, &dst.found);
        if let Some(n) = &moved {
            if !exchange {
                self.table
                    .drop_alias(&(src.parent.id, Arc::from(name)), n.id);
            }
            self.stand_for(n, &dst.parent, new_name, &dst.found);
        }
        if let (Some(n), true) = (&other, exchange) {
            self.stand_for(n, &src.parent, name, &src.found);
        }
    }

    /// A renamed node now lives at `name` in `parent` (whose upper directory
    /// is `parent_upper`); a node of its own name stands for the new name.
    fn move_node(&self, node: &Node, parent: Arc<Node>, name: &OsStr, parent_upper: Option<&Real>) {
        if let Some(old) = node.alias_key() {
            let key: crate::overlay::node::AliasKey = (parent.id, Arc::from(name));
            self.table.drop_alias(&old, node.id);
            self.table.move_alias(key.clone(), node.ino(), node.id);
            node.set_alias(key);
        }
        node.set_location(parent, name, parent_upper);
    }

    /// `node` stands for `name` in `parent`, resolved as `found`.
    fn stand_for(&self, node: &Node, parent: &Arc<Node>, name: &OsStr, found: &Found) {
        let key: crate::overlay::node::AliasKey = (parent.id, Arc::from(name));
        if let Some(file) = self.per_name_file(found) {
            self.table.move_alias(key.clone(), file, node.id);
            node.set_alias(key.clone());
        }
        let mut st = node.state.write();
        st.parent = Some(parent.clone());
        st.name = key.1;
        st.upper = found.upper.clone();
        st.index = found.index.clone();
        st.lowers = found.lowers.clone();
        st.metacopy = found.metacopy;
        let shows_upper = (st.upper.is_some() || st.index.is_some()) && !st.metacopy;
        node.copied_up
            .store(shows_upper, std::sync::atomic::Ordering::Release);
    }

    /// True when two resolved non-directories are names of one union inode.
    fn one_inode(&self, a: &Found, b: &Found) -> bool {
        if a.is_dir() || b.is_dir() {
            return false;
        }
        if (a.top_layer, b.top_layer) == (UPPER, UPPER) {
            return a.stat.st_ino == b.stat.st_ino;
        }
        let shown = |f: &Found| self.table.ino_for(f.top_layer, f.stat.st_ino);
        self.index_is_on()
            && shown(a) == shown(b)
            && self.is_indexed_file(a)
            && self.is_indexed_file(b)
    }

    /// With the index: a name of a lower hard-linked file (upper or not).
    fn is_indexed_file(&self, f: &Found) -> bool {
        match &f.upper {
            Some(u) => self.index_entry_of_upper(u, &f.stat).is_some(),
            None => f.is_lower_hard_link(),
        }
    }

    fn rename_exchange(&self, src: Side, name: &OsStr, dst: Side, new_name: &OsStr) -> Result<()> {
        self.check_movable(&dst)?;
        let src_node = self.node_to_move(&src, name);
        let dst_node = self.node_to_move(&dst, new_name);
        let src_upper = self.ensure_upper(&src_node)?;
        let dst_upper = self.ensure_upper(&dst_node)?;
        let from = self.ensure_upper(&src.parent)?;
        let to = self.ensure_upper(&dst.parent)?;
        let samedir = src.parent.id == dst.parent.id;
        self.prepare_move(&src_node, &src.found, &src_upper, &dst.parent, samedir)?;
        self.prepare_move(&dst_node, &dst.found, &dst_upper, &src.parent, samedir)?;
        sys::rename_at(from.dir(), name, to.dir(), new_name, libc::RENAME_EXCHANGE)?;
        self.mark_impure_if_moved_in(&to, new_name, &src.found);
        self.mark_impure_if_moved_in(&from, name, &dst.found);
        self.move_node(&src_node, dst.parent.clone(), new_name, Some(&to));
        self.move_node(&dst_node, src.parent.clone(), name, Some(&from));
        Ok(())
    }

    /// An object whose number comes from a lower one (an origin, or a merged
    /// directory) moved into the upper directory `dir` as `name`: `dir` is
    /// marked impure, so that its listings look that number up, as the
    /// kernel marks it.
    fn mark_impure_if_moved_in(&self, dir: &Real, name: &OsStr, moved: &Found) {
        let from_lower = !moved.lowers.is_empty()
            || moved.upper.is_none()
            || format::origin_of(dir.dir(), name, self.ns).is_some();
        if from_lower && !format::is_impure(dir.dir(), self.ns) {
            let _ = format::set_impure(dir.dir(), self.ns);
        }
    }

    /// An upper directory moved into a merged directory becomes opaque, so
    /// that nothing a lower layer has (or will have) under its new name shows
    /// through it, as the kernel does.
    fn opaque_if_moved_into_merged(&self, dir: &Real, new_parent: &Node) -> Result<()> {
        if new_parent.state.read().lowers.is_empty() {
            return Ok(());
        }
        if format::upper_dir_opacity(dir.dir(), self.ns) == format::Opacity::Opaque {
            return Ok(());
        }
        format::set_opaque(dir.dir(), self.ns)
    }

    fn rename_replace(
        &self,
        src: Side,
        name: &OsStr,
        new_parent: Arc<Node>,
        dst: Option<Side>,
        new_name: &OsStr,
    ) -> Result<()> {
        let src_node = self.node_to_move(&src, name);
        let src_upper = self.ensure_upper(&src_node)?;
        let from = self.ensure_upper(&src.parent)?;
        let to = self.ensure_upper(&new_parent)?;
        let src_is_dir = src.found.is_dir();
        let src_lower_remains = self.name_in_lowers(&src.parent, name)?;
        let dst_upper = match sys::stat_at(to.dir(), new_name) {
            Ok(st) => Some(st),
            Err(Errno::ENOENT) => None,
            Err(e) => return Err(e),
        };
        let dst_is_whiteout = dst_upper.as_ref().is_some_and(format::is_whiteout_dev);
        let replaced_entry = match dst.as_ref().map(|d| &d.found) {
            Some(f) if !f.is_dir() => f
                .upper
                .as_ref()
                .and_then(|u| self.index_entry_of_upper(u, &f.stat)),
            _ => None,
        };
        let replaced = dst
            .as_ref()
            .and_then(|d| self.held_node(&d.parent, new_name, &d.found));
        if let Some(node) = &replaced {
            node.pin()?; // the kernel may still use it (an open file)
        }
        let dst_is_dir = dst_upper.as_ref().is_some_and(sys::is_dir);
        let samedir = src.parent.id == new_parent.id;
        self.prepare_move(&src_node, &src.found, &src_upper, &new_parent, samedir)?;
        // An empty merged directory may still hold whiteouts in its upper.
        let dst_holds_whiteouts = dst_is_dir
            && dst.as_ref().is_some_and(|d| Self::has_lower_dirs(&d.found))
            && !sys::read_dir(sys::open_path(to.dir(), new_name)?.as_fd())?.is_empty();
        if (src_is_dir && dst_is_whiteout) || dst_holds_whiteouts {
            // renameat2 cannot replace these: swap, then deal with what
            // landed at the old name.
            sys::rename_at(from.dir(), name, to.dir(), new_name, libc::RENAME_EXCHANGE)?;
            match (src_lower_remains, dst_is_whiteout) {
                (true, true) => {} // it is the very whiteout the old name needs
                (true, false) => self.replace_with_whiteout(from.dir(), name, dst_is_dir)?,
                (false, _) if dst_is_dir => self.remove_upper_dir(from.dir(), name)?,
                (false, _) => sys::unlink_at(from.dir(), name, false)?,
            }
        } else {
            let flags = if src_lower_remains {
                libc::RENAME_WHITEOUT
            } else {
                0
            };
            sys::rename_at(from.dir(), name, to.dir(), new_name, flags)?;
        }
        if let Some(node) = replaced {
            node.mark_unlinked();
        }
        if let Some(entry) = replaced_entry {
            self.drop_index_if_unlinked(&entry);
        }
        self.mark_impure_if_moved_in(&to, new_name, &src.found);
        if let Some(st) = dst_upper
            .filter(|st| !format::is_whiteout_dev(st) && (sys::is_dir(st) || st.st_nlink <= 1))
        {
            self.table.drop_origin(st.st_ino); // replaced: its inode number is free
        }
        self.move_node(&src_node, new_parent, new_name, Some(&to));
        Ok(())
    }
}

/// Gives a new object its owner: the caller, with the group of a setgid
/// parent directory; then the mode bits a chown clears or creation left out.
fn set_owner(obj: BorrowedFd<'_>, parent: BorrowedFd<'_>, caller: Caller, mode: u32) -> Result<()> {
    let (own_uid, own_gid) = own_ids();
    if (caller.uid, caller.gid) == (own_uid, own_gid) && mode & 0o7000 == 0 {
        return Ok(()); // created as the caller would have: owner and group are right
    }
    let pst = sys::stat_fd(parent)?;
    let sgid_parent = pst.st_mode & libc::S_ISGID != 0;
    let gid = if sgid_parent { pst.st_gid } else { caller.gid };
    // What creating it as this process gave it.
    let own_gid = if sgid_parent { pst.st_gid } else { own_gid };
    let chowned = caller.uid != own_uid || gid != own_gid;
    if chowned {
        sys::chown_fd(obj, Some(caller.uid), Some(gid))?;
    }
    let kind = sys::file_type(mode);
    // mkdir gives directories exactly what the kernel would (sticky kept,
    // setgid inherited); symlinks have no mode.
    if kind == libc::S_IFDIR || kind == libc::S_IFLNK {
        return Ok(());
    }
    if mode & 0o7000 != 0 && (chowned || kind == libc::S_IFREG) {
        sys::chmod_fd(obj, mode & 0o7777)?;
    }
    Ok(())
}

/// The daemon's effective user and group ids, which never change while it
/// serves.
fn own_ids() -> (u32, u32) {
    static IDS: std::sync::OnceLock<(u32, u32)> = std::sync::OnceLock::new();
    *IDS.get_or_init(|| {
        (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        )
    })
}
