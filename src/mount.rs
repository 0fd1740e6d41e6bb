//! Bringing a union up and down: opening the layers, claiming the work
//! directory (`workdir`), mounting through the FUSE adapter
//! (`fuse::session`), serving until unmounted, and unmounting on SIGINT,
//! SIGTERM or SIGHUP.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::mount::{MntFlags, umount2};
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::stat::{Mode, umask};
use tracing::{info, warn};

use crate::fuse::session::{self, FuseMount, Served};
use crate::options::MountPlan;
use crate::overlay::superblock::{Tuning, Union};
use crate::sys;
use crate::workdir::holder::Role;
use crate::workdir::{self, WorkDir};

/// How long a detached but busy mount is served before the daemon exits.
const BUSY_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

fn open_layer(what: &str, p: &Path) -> Result<OwnedFd, String> {
    sys::open_dir_path(p).map_err(|e| format!("cannot open {what} {}: {e}", p.display()))
}

/// Checks that /dev/fuse can be opened, so a failure is named before mounting.
fn check_dev_fuse() -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map(drop)
        .map_err(|e| dev_fuse_refused(&e))
}

/// Why /dev/fuse could not be opened, and what to do about it.
fn dev_fuse_refused(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => {
            "/dev/fuse does not exist: load the fuse module (modprobe fuse) or, in a container, pass the device in (--device /dev/fuse)".into()
        }
        std::io::ErrorKind::PermissionDenied => format!(
            "/dev/fuse cannot be opened by uid {}: {e} (run as root, or make /dev/fuse usable by this user, e.g. mode 0666 as most distributions ship it)",
            nix::unistd::geteuid()
        ),
        _ => format!("/dev/fuse is not usable: {e}"),
    }
}

/// Lifts the open-file limit to its hard maximum: the union holds a
/// descriptor per directory the kernel caches (a file is held as its
/// directory and name) and one per open file.
fn raise_fd_limit() {
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// A stop signal (SIGINT, SIGTERM, SIGHUP) waiting for this process, which
/// blocks them until its union is up.
pub fn stop_signal_pending() -> Option<&'static str> {
    // SAFETY: an all-zero sigset_t is a valid (empty) set, filled by
    // sigpending; sigismember only reads it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    if unsafe { libc::sigpending(&mut set) } != 0 {
        return None;
    }
    [
        (libc::SIGINT, "interrupted (SIGINT)"),
        (libc::SIGTERM, "SIGTERM"),
        (libc::SIGHUP, "SIGHUP"),
    ]
    .into_iter()
    .find(|(sig, _)| unsafe { libc::sigismember(&set, *sig) } == 1)
    .map(|(_, name)| name)
}

fn block_stop_signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(s);
    }
    let _ = set.thread_block();
    set
}

/// Detaches the mount; the session then ends on its own.
pub fn unmount_lazily(mnt: &Path) {
    if umount2(mnt, MntFlags::MNT_DETACH).is_ok() {
        return;
    }
    let _ = std::process::Command::new("fusermount3")
        .arg("-u")
        .arg("-z")
        .arg(mnt)
        .status();
}

/// Waits for a stop signal in a thread of its own, then unmounts.
fn spawn_signal_watcher(set: SigSet, mnt: PathBuf) {
    std::thread::spawn(move || {
        let sig = set.wait().map_or(0, |s| s as i32);
        info!(signal = sig, "unmounting");
        unmount_lazily(&mnt);
        // A busy mount stays connected after the detach until its last user
        // lets go; do not wait for that: everything is on disk already.
        std::thread::sleep(BUSY_GRACE);
        info!("mount still in use after detach; exiting");
        std::process::exit(0);
    });
}

/// A mounted union not served yet, with the work directory it holds.
type Mounted = (FuseMount, Option<WorkDir>, Arc<Union>);

/// Opens the layers, claims the work directory and mounts the union as
/// `role`; the returned session is not served yet. The caller blocks the
/// stop signals: one that comes before the mount ends it with nothing
/// mounted (never a mount undone at once).
fn mount_union(plan: &MountPlan, role: Role) -> Result<Mounted, String> {
    check_dev_fuse()?;
    raise_fd_limit();
    umask(Mode::empty());
    let lowers = plan
        .lowers
        .iter()
        .map(|l| open_layer("lower directory", l))
        .collect::<Result<Vec<_>, _>>()?;
    let (upper, work) = match &plan.upper {
        Some(u) => {
            let upper = open_layer("upper directory", &u.upper)?;
            let (work, scratch) = WorkDir::claim(u, &stop_signal_pending)?;
            (Some((upper, scratch)), Some(work))
        }
        None => (None, None),
    };
    let tuning = Tuning {
        volatile: plan.volatile,
        redirect_dir: plan.redirect_dir,
        metacopy: plan.metacopy,
    };
    let mut union = Union::new(upper, lowers, tuning);
    if let (Some(u), Some(work), true) = (&plan.upper, &work, plan.index != Some(false)) {
        workdir::enable_index(&mut union, work, u, plan.index == Some(true))?;
    }
    if let Some(sig) = stop_signal_pending() {
        return Err(format!("{sig} before mounting; nothing was mounted"));
    }
    let union = Arc::new(union);
    let mut session = session::mount(union.clone(), plan)?;
    if let Err(e) = session.handshake() {
        unmount_lazily(&plan.mountpoint);
        return Err(e);
    }
    if let Some(work) = &work {
        work.record_holder(&plan.mountpoint, role);
    }
    match &plan.upper {
        Some(u) => info!(
            mountpoint = %plan.mountpoint.display(),
            workdir = %u.workdir.display(),
            xattrs = ?union.xattr_namespace(),
            index = union.index_is_on(),
            "mounted"
        ),
        None => info!(mountpoint = %plan.mountpoint.display(), "mounted read-only"),
    }
    Ok((session, work, union))
}

/// Mounts the planned union and serves it until it is unmounted;
/// `on_mounted` runs once the mount is live.
pub fn serve(plan: &MountPlan, on_mounted: impl FnOnce()) -> Result<(), String> {
    let signals = block_stop_signals();
    let (session, work, _union) = mount_union(plan, Role::Mount)?;
    spawn_signal_watcher(signals, plan.mountpoint.clone());
    on_mounted();
    let finish = move || {
        if let Some(work) = work {
            work.release();
        }
        info!("unmounted");
        std::process::exit(0)
    };
    if let Err(e) = session.serve(finish) {
        warn!("session ended: {e}");
    }
    Ok(())
}

/// A union mounted and served by background threads, for a caller that
/// has other work to do meanwhile (the container launcher).
pub struct Running {
    session: Served,
    _work: Option<WorkDir>,
    mountpoint: PathBuf,
}

/// Mounts the planned union and serves it in the background (for
/// `unionfs run`, which blocks the stop signals first).
pub fn start(plan: &MountPlan) -> Result<Running, String> {
    let (session, work, _union) = mount_union(plan, Role::Run)?;
    let session = session
        .spawn()
        .map_err(|e| format!("cannot start serving the union: {e}"))?;
    Ok(Running {
        session,
        _work: work,
        mountpoint: plan.mountpoint.clone(),
    })
}

impl Running {
    /// Detaches the mount and waits a little for the session to end; a
    /// session still busy after that is left to end with the process.
    pub fn stop(self) {
        unmount_lazily(&self.mountpoint);
        let deadline = std::time::Instant::now() + BUSY_GRACE;
        while !self.session.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        if self.session.is_finished() {
            if let Err(e) = self.session.join() {
                warn!("session ended: {e}");
            }
        } else {
            info!("union still in use after detach; leaving it to the process exit");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// The id that tells a live mount from a later one with the same
    /// FUSE minor: the root's is listed, a never-made one is not.
    #[test]
    fn a_unique_mount_id_is_listed_while_its_mount_is() {
        let root = sys::open_dir_path(Path::new("/")).unwrap();
        let Some(id) = sys::unique_mount_id(root.as_fd()) else {
            return; // before Linux 6.8 there are no unique ids to check
        };
        assert_eq!(sys::mount_is_listed(id), Ok(true));
        assert_eq!(sys::mount_is_listed(id + (1 << 40)), Ok(false));
    }
}
