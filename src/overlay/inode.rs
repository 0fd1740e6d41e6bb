//! Attributes and xattrs: getattr, setattr (copy-up first), readlink,
//! get/set/list/removexattr with the overlay-private names hidden, statfs.

use std::ffi::{OsStr, OsString};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use crate::overlay::format;
use crate::overlay::node::Node;
use crate::overlay::superblock::{Caller, Union};
use crate::sys::{self, Errno, Result, SetTime, Stat};

/// The xattr that holds a POSIX access ACL.
const ACCESS_ACL: &[u8] = b"system.posix_acl_access";

/// The attribute changes of one setattr.
#[derive(Clone, Copy, Debug, Default)]
pub struct AttrChange {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
    /// An open file of the caller's (ftruncate).
    pub fh: Option<u64>,
    /// A write or truncate by a caller without CAP_FSETID: drop the
    /// set-id bits as the kernel would (it leaves this to the filesystem:
    /// FUSE_HANDLE_KILLPRIV_V2).
    pub drop_privileges: bool,
}

impl AttrChange {
    pub fn changes_attributes(&self) -> bool {
        self.mode.is_some()
            || self.uid.is_some()
            || self.gid.is_some()
            || self.size.is_some()
            || self.atime.is_some()
            || self.mtime.is_some()
    }

    fn only_times(&self) -> bool {
        let without_times = AttrChange {
            atime: None,
            mtime: None,
            ..*self
        };
        self.changes_attributes() && !without_times.changes_attributes()
    }

    fn changes_owner(&self) -> bool {
        self.uid.is_some() || self.gid.is_some()
    }
}

/// The mode a write, truncate or chown by an unprivileged `caller` leaves
/// on the object `st`, by the kernel's rules (Linux 6.2+): set-user-id
/// goes; set-group-id goes when the object is group-executable, or when
/// the caller is neither in its group nor privileged. None when nothing
/// changes.
fn mode_without_privileges(st: &Stat, caller: &Caller<'_>) -> Option<u32> {
    let mode = st.st_mode & 0o7777;
    let mut m = mode & !libc::S_ISUID;
    let group_exec = mode & libc::S_IXGRP != 0;
    if mode & libc::S_ISGID != 0 && (group_exec || !caller.in_group_or_privileged(st.st_gid)) {
        m &= !libc::S_ISGID;
    }
    (m != mode).then_some(m)
}

/// The mode after an unprivileged `caller` set an access ACL on `st`: the
/// kernel drops set-group-id when the caller is not in the object's group.
fn mode_after_access_acl(st: &Stat, caller: &Caller<'_>) -> Option<u32> {
    let mode = st.st_mode & 0o7777;
    let outside = match caller.acl_kills_sgid {
        Some(kernel_says) => kernel_says,
        None => !caller.in_group_or_privileged(st.st_gid),
    };
    (mode & libc::S_ISGID != 0 && outside).then_some(mode & !libc::S_ISGID)
}

/// What statfs reports.
#[derive(Clone, Copy, Debug)]
pub struct FsStats {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

impl Union {
    /// The attributes the union shows for `node`, from `st`, the `stat` of
    /// its topmost real object: with the index, a file of several names
    /// shows the link count recorded for it (see `index`).
    pub fn present(&self, node: &Node, st: Stat) -> Stat {
        let mut shown = node.present(st);
        if node.is_metacopy() {
            // A metadata-only copy holds no data blocks: its data's count.
            if let Ok(data) = node.data().0.stat() {
                shown.st_blocks = data.st_blocks;
            }
        }
        if self.index_is_on() && !node.is_dir() {
            let (real, on_upper) = node.real();
            let has_entry = node.state.read().index.is_some();
            if on_upper && (st.st_nlink > 1 || has_entry) {
                shown.st_nlink = self.union_nlink(&real, &st);
            }
        }
        shown
    }

    /// The attributes of `node` as the union shows them.
    pub fn attrs(&self, node: &Node) -> Result<Stat> {
        let st = node.real().0.stat()?;
        Ok(self.present(node, st))
    }

    pub fn getattr(&self, id: u64, fh: Option<u64>) -> Result<Stat> {
        let node = self.node(id)?;
        if let Some(file) = fh.and_then(|fh| self.files.get(&fh).map(|f| f.clone()))
            && !node.is_metacopy()
        {
            // The open file itself: right for unlinked files (nlink 0); the
            // upper copy once there is one (another name may have made it).
            let st = sys::stat_fd(file.read_fd()?.as_fd())?;
            return Ok(self.present(&node, st));
        }
        self.attrs(&node)
    }

    pub fn setattr(&self, id: u64, ch: AttrChange, caller: Caller<'_>) -> Result<Stat> {
        let node = self.node(id)?;
        // The current mode is read only for a privilege drop: an ordinary
        // setattr costs no extra stat.
        let dropped = if self.may_drop_privileges(&node, &ch, &caller) {
            mode_without_privileges(&self.attrs(&node)?, &caller)
        } else {
            None
        };
        if !ch.changes_attributes() && dropped.is_none() {
            // Nothing to do (a privilege drop on a file without privileges):
            // no copy-up.
            return self.attrs(&node);
        }
        if ch.only_times() && node.is_unlinked_lower() {
            // The writeback cache stamps the times of every file it saw
            // unlinked; a lower file without a name has nowhere to be copied.
            return self.attrs(&node);
        }
        let upper = match ch.size {
            Some(_) => self.ensure_data(&node)?,
            None => self.ensure_upper(&node)?,
        };
        if let Some(size) = ch.size {
            self.truncate(&node, ch.fh, size)?;
        }
        if let Some(mode) = dropped {
            upper.chmod(mode)?;
        }
        if ch.uid.is_some() || ch.gid.is_some() {
            upper.chown(ch.uid, ch.gid)?;
        }
        if let Some(mode) = ch.mode {
            if node.kind == libc::S_IFLNK {
                return Err(Errno::ENOTSUP);
            }
            upper.chmod(mode)?;
        }
        if ch.atime.is_some() || ch.mtime.is_some() {
            let omit = |t: Option<SetTime>| t.unwrap_or(SetTime::Omit);
            upper.set_times(omit(ch.atime), omit(ch.mtime))?;
        }
        self.attrs(&node)
    }

    /// True when this setattr by `caller` may have to drop set-id bits: a
    /// write or truncate (the kernel says so), or a chown of a
    /// non-directory by an unprivileged caller (the daemon's own chown keeps
    /// set-group-id where the caller's would not).
    fn may_drop_privileges(&self, node: &Node, ch: &AttrChange, caller: &Caller<'_>) -> bool {
        if caller.privileged || ch.mode.is_some() {
            return false;
        }
        match node.kind {
            libc::S_IFREG => ch.drop_privileges || ch.changes_owner(),
            libc::S_IFDIR | libc::S_IFLNK => false,
            _ => ch.changes_owner(),
        }
    }

    fn truncate(&self, node: &Arc<Node>, fh: Option<u64>, size: u64) -> Result<()> {
        if let Some(file) = fh.and_then(|fh| self.files.get(&fh).map(|f| f.clone()))
            && file.is_writable_upper()
        {
            return nix::unistd::ftruncate(file.fd().as_fd(), size as i64);
        }
        if node.kind != libc::S_IFREG {
            return Err(if node.is_dir() {
                Errno::EISDIR
            } else {
                Errno::EINVAL
            });
        }
        let f = self.ensure_data(node)?.open(libc::O_WRONLY)?;
        nix::unistd::ftruncate(f.as_fd(), size as i64)
    }

    pub fn readlink(&self, id: u64) -> Result<Vec<u8>> {
        let node = self.node(id)?;
        if node.kind != libc::S_IFLNK {
            return Err(Errno::EINVAL);
        }
        sys::readlink_fd(node.real().0.path_fd()?.as_fd())
    }

    pub fn getxattr(&self, id: u64, name: &OsStr) -> Result<Vec<u8>> {
        let name = format::stored_xattr_name(name, self.ns).ok_or(Errno::ENODATA)?;
        let node = self.node(id)?;
        if node.known_without_xattrs() {
            return Err(Errno::ENODATA);
        }
        let target = node.real().0.xattrs()?;
        let r = target.get(&name);
        if r == Err(Errno::ENODATA) && target.list().is_ok_and(|l| l.is_empty()) {
            node.note_without_xattrs();
        }
        r
    }

    pub fn listxattr(&self, id: u64) -> Result<Vec<OsString>> {
        let node = self.node(id)?;
        if node.known_without_xattrs() {
            return Ok(vec![]);
        }
        let names = node.real().0.xattrs()?.list()?;
        if names.is_empty() {
            node.note_without_xattrs();
        }
        Ok(names
            .into_iter()
            .filter_map(|n| format::shown_xattr_name(&n, self.ns))
            .collect())
    }

    pub fn setxattr(
        &self,
        id: u64,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        caller: Caller<'_>,
    ) -> Result<()> {
        let stored = format::stored_xattr_name(name, self.ns).ok_or(Errno::EPERM)?;
        let node = self.node(id)?;
        let upper = if name.as_bytes().starts_with(b"system.posix_acl_") {
            self.ensure_upper(&node)?
        } else {
            self.upper_for_xattrs(&node)?
        };
        // Every node that may know this object (its own, and the one of its
        // `st_ino` if another name's) forgets it had none.
        node.forget_xattr_knowledge();
        if let Some(other) = self.table.get(node.ino()) {
            other.forget_xattr_knowledge();
        }
        upper.xattrs()?.set(&stored, value, flags)?;
        let may_lose_sgid = caller.acl_kills_sgid.unwrap_or(!caller.privileged);
        if name.as_bytes() == ACCESS_ACL && may_lose_sgid && node.kind != libc::S_IFLNK {
            // The upper filesystem applied the ACL's mode with the daemon's
            // privileges; the caller's would have cost set-group-id.
            if let Some(mode) = mode_after_access_acl(&upper.stat()?, &caller) {
                upper.chmod(mode)?;
            }
        }
        Ok(())
    }

    pub fn removexattr(&self, id: u64, name: &OsStr) -> Result<()> {
        let stored = format::stored_xattr_name(name, self.ns).ok_or(Errno::EPERM)?;
        let node = self.node(id)?;
        // A missing attribute is ENODATA and must not copy anything up.
        self.getxattr(id, name)?;
        node.forget_xattr_knowledge();
        let upper = self.upper_for_xattrs(&node)?;
        upper.xattrs()?.remove(&stored)
    }

    /// Where an xattr change of `node` goes: its upper object, copied up
    /// if needed, or the index entry that shows it (the kernel changes the
    /// inode's upper object without linking the name up).
    fn upper_for_xattrs(&self, node: &Arc<Node>) -> Result<crate::overlay::node::Real> {
        match node.upper_or_index() {
            Some(real) => Ok(real),
            None => self.ensure_upper(node),
        }
    }

    pub fn statfs(&self) -> Result<FsStats> {
        let st = nix::sys::statvfs::fstatvfs(self.space_root.as_fd())?;
        Ok(FsStats {
            blocks: st.blocks(),
            bfree: st.blocks_free(),
            bavail: st.blocks_available(),
            files: st.files(),
            ffree: st.files_free(),
            bsize: st.block_size() as u32,
            namelen: 255,
            frsize: st.fragment_size() as u32,
        })
    }
}
