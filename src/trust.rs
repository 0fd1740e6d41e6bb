//! Trust in the work directory. Objects are built in `WORKDIR/work` and
//! renamed into the upper layer, so whoever can write in the work directory
//! can swap a file between the copy and the rename (a set-user-id root
//! binary being copied up, for one). The work directory and what the daemon
//! keeps in it must therefore belong to the mounting user or root and be
//! closed to group and others. The default work directory, which earlier
//! versions made world-writable, is repaired when it is the user's own.

use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;

use tracing::warn;

use crate::sys::{self, Errno, Stat};

/// Mode of every directory the daemon makes for itself.
pub const PRIVATE_DIR_MODE: u32 = 0o700;

/// The subdirectories of a work directory the daemon uses.
pub const SUBDIRS: [&str; 2] = ["work", "index"];

/// What the checks found.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Trusted,
    /// Open to group or others, but the user's own: close it.
    Repair,
}

/// Judges a directory (or what stands where one should be) from its `stat`.
/// `me` is the mounting user; `may_repair` allows closing a directory of
/// the user's own instead of refusing it.
pub fn judge(path: &Path, st: &Stat, me: u32, may_repair: bool) -> Result<Verdict, String> {
    if !sys::is_dir(st) {
        return Err(format!("{} is not a directory; remove it", path.display()));
    }
    if st.st_uid != me && st.st_uid != 0 {
        return Err(format!(
            "{} is owned by uid {}, not by you (uid {me}) or root: whoever owns it could swap \
             files while they are copied up; remove it, or give -o workdir= a directory of your own",
            path.display(),
            st.st_uid
        ));
    }
    if st.st_mode & 0o022 == 0 {
        return Ok(Verdict::Trusted);
    }
    if may_repair && st.st_uid == me {
        return Ok(Verdict::Repair);
    }
    Err(format!(
        "{} is writable by group or others (mode {:04o}): anyone could swap files while they \
         are copied up; run: chmod go-w {}",
        path.display(),
        st.st_mode & 0o7777,
        path.display()
    ))
}

/// Checks an existing work directory by path, before anything is mounted.
pub fn check_workdir(workdir: &Path, me: u32, may_repair: bool) -> Result<(), String> {
    let dir = sys::open_dir_path(workdir).map_err(|e| format!("{}: {e}", workdir.display()))?;
    let st = sys::stat_fd(dir.as_fd()).map_err(|e| format!("{}: {e}", workdir.display()))?;
    judge(workdir, &st, me, may_repair)?;
    for sub in SUBDIRS {
        match sys::stat_at(dir.as_fd(), OsStr::new(sub)) {
            Ok(st) => {
                judge(&workdir.join(sub), &st, me, false)?;
            }
            Err(Errno::ENOENT) => {}
            Err(e) => return Err(format!("{}: {e}", workdir.join(sub).display())),
        }
    }
    Ok(())
}

/// Checks the opened work directory again (what was checked by path may
/// have changed since) and closes it to others where allowed.
pub fn secure_workdir(
    dir: BorrowedFd<'_>,
    workdir: &Path,
    me: u32,
    may_repair: bool,
) -> Result<(), String> {
    let st = sys::stat_fd(dir).map_err(|e| format!("{}: {e}", workdir.display()))?;
    if judge(workdir, &st, me, may_repair)? == Verdict::Repair {
        let mode = st.st_mode & 0o7777 & !0o077;
        sys::chmod_fd(dir, mode)
            .map_err(|e| format!("cannot close {} to others: {e}", workdir.display()))?;
        warn!(
            workdir = %workdir.display(),
            was = format!("{:04o}", st.st_mode & 0o7777),
            now = format!("{mode:04o}"),
            "the work directory was open to other users (made so by an earlier version); closed it"
        );
    }
    Ok(())
}
