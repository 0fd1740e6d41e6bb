//! Whole directory trees, by descriptor: their removal, for the core (the
//! work directory, directories that hold only whiteouts) and the launcher
//! (its scratch directories) alike.

use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd};

use crate::sys::{self, Errno, Result};

/// Removes `name` in `dir` and everything under it, never following a
/// symlink; a name already gone is no error.
pub fn remove_tree(dir: BorrowedFd<'_>, name: &OsStr) -> Result<()> {
    let st = match sys::stat_at(dir, name) {
        Ok(st) => st,
        Err(Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(e),
    };
    if !sys::is_dir(&st) {
        return sys::unlink_at(dir, name, false);
    }
    let sub = sys::open_path(dir, name)?;
    for e in sys::read_dir(sub.as_fd())? {
        remove_tree(sub.as_fd(), &e.name)?;
    }
    sys::unlink_at(dir, name, true)
}
