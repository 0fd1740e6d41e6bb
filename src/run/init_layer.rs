//! The launcher's own layer: the mount points a container needs (`/proc`,
//! `/dev`, `/sys`, bind targets, the working directory) that its image may
//! lack, made in a directory of the run's scratch space and stacked as the
//! bottom-most lower layer, as container engines keep an "init" layer. The
//! image's own directories lie above it (their modes and owners win), the
//! container mounts over these names, and so the upper holds exactly what
//! the command changed. Removed with the scratch space.

use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use super::Failure;
use super::request::Spec;
use crate::sys;

/// Makes every mount point `spec` needs under `dir` (mode 0755 for
/// directories, an empty 0644 file for a file bind).
pub fn prepare(dir: &Path, spec: &Spec) -> Result<(), Failure> {
    let root = sys::open_dir_path(dir).map_err(|e| made_not(dir, e))?;
    let mut targets: Vec<(&Path, bool)> = ["/proc", "/dev", "/sys"]
        .iter()
        .map(|p| (Path::new(*p), true))
        .collect();
    targets.extend(spec.binds.iter().map(|b| (b.target.as_path(), b.is_dir)));
    targets.push((spec.cwd.as_path(), true));
    for (target, is_dir) in targets {
        make_path(root.as_fd(), target, is_dir).map_err(|e| made_not(target, e))?;
    }
    Ok(())
}

/// The lowers with the init layer at the bottom.
pub fn stacked_under(lowers: &[PathBuf], dir: &Path) -> Vec<PathBuf> {
    lowers.iter().cloned().chain([dir.to_path_buf()]).collect()
}

fn made_not(path: &Path, e: sys::Errno) -> Failure {
    Failure::launcher(format!(
        "cannot prepare the mount point {} in the launcher's layer: {e}",
        path.display()
    ))
}

/// Makes `path` (absolute in the container) below `root`: its directories
/// and, unless `is_dir`, an empty file at the end.
fn make_path(root: BorrowedFd<'_>, path: &Path, is_dir: bool) -> sys::Result<()> {
    let parts: Vec<&OsStr> = path.iter().skip(1).collect();
    let Some((last, dirs)) = parts.split_last() else {
        return Ok(());
    };
    let mut at: OwnedFd = sys::open_path(root, OsStr::new("."))?;
    for name in dirs {
        at = enter_dir(at.as_fd(), name)?;
    }
    match is_dir {
        true => enter_dir(at.as_fd(), last).map(drop),
        false => match sys::create_file(at.as_fd(), last, libc::O_WRONLY, 0o644) {
            // Exactly 0644, whatever the launcher's umask.
            Ok(f) => sys::chmod_fd(f.as_fd(), 0o644),
            Err(sys::Errno::EEXIST) => Ok(()),
            Err(e) => Err(e),
        },
    }
}

/// The directory `name` in `dir`, made (0755) if missing.
fn enter_dir(dir: BorrowedFd<'_>, name: &OsStr) -> sys::Result<OwnedFd> {
    let made = match sys::mkdir_at(dir, name, 0o755) {
        Ok(()) => true,
        Err(sys::Errno::EEXIST) => false,
        Err(e) => return Err(e),
    };
    let sub = sys::open_path(dir, name)?;
    if made {
        // Exactly 0755, whatever the launcher's umask: a command run as
        // another user must be able to pass through.
        sys::chmod_fd(sub.as_fd(), 0o755)?;
    }
    Ok(sub)
}
