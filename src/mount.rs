//! Bringing a union up and down: opening the layers, claiming and cleaning
//! the work directory, mounting through fuser, serving until unmounted, and
//! unmounting on SIGINT, SIGTERM or SIGHUP.

use std::ffi::OsStr;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fuser::{BackgroundSession, Config, MountOption, Session, SessionACL};
use tracing::{info, warn};

use crate::fuse::UnionFs;
use crate::options::{Access, MountPlan, UpperPlan};
use crate::superblock::{Tuning, Union, clear_dir};
use crate::sys;

/// How long a detached but busy mount is served before the daemon exits.
const BUSY_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// Name of the scratch directory inside the work directory (as the kernel's).
const WORK_SUBDIR: &str = "work";

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
        .map_err(|e| format!("/dev/fuse is not usable: {e}"))
}

/// Lifts the open-file limit to its hard maximum: the union holds one
/// descriptor per object the kernel caches.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// The work directory, locked for this mount and emptied of what an earlier
/// run (or crash) left.
struct WorkDir {
    /// Holds the flock; the work directory is free again once dropped.
    lock: OwnedFd,
    scratch: OwnedFd,
}

fn claim_workdir(plan: &UpperPlan) -> Result<WorkDir, String> {
    let wd = &plan.workdir;
    if plan.create_workdir {
        match std::fs::create_dir(wd) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(format!(
                    "cannot create work directory {}: {e}",
                    wd.display()
                ));
            }
        }
    }
    let path = sys::cstr(wd.as_os_str()).map_err(|_| "bad work directory path".to_string())?;
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(format!(
            "cannot open work directory {}: {}",
            wd.display(),
            std::io::Error::last_os_error()
        ));
    }
    let lock = unsafe { OwnedFd::from_raw_fd(fd) };
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(format!(
            "work directory {} is in use by another mount",
            wd.display()
        ));
    }
    let name = OsStr::new(WORK_SUBDIR);
    match sys::mkdir_at(lock.as_fd(), name, 0o700) {
        Ok(()) | Err(sys::Errno::EEXIST) => {}
        Err(e) => return Err(format!("cannot create {}/{WORK_SUBDIR}: {e}", wd.display())),
    }
    let scratch = sys::open_path(lock.as_fd(), name)
        .map_err(|e| format!("cannot open {}/{WORK_SUBDIR}: {e}", wd.display()))?;
    match clear_dir(scratch.as_fd()) {
        Ok(0) => {}
        Ok(n) => info!(
            leftovers = n,
            "removed leftovers of an earlier run from the work directory"
        ),
        Err(e) => return Err(format!("cannot clean {}/{WORK_SUBDIR}: {e}", wd.display())),
    }
    Ok(WorkDir { lock, scratch })
}

fn block_stop_signals() -> libc::sigset_t {
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Detaches the mount; the session then ends on its own.
pub fn unmount_lazily(mnt: &Path) {
    let p = sys::cstr(mnt.as_os_str()).expect("path without NUL");
    if unsafe { libc::umount2(p.as_ptr(), libc::MNT_DETACH) } == 0 {
        return;
    }
    let _ = std::process::Command::new("fusermount3")
        .arg("-u")
        .arg("-z")
        .arg(mnt)
        .status();
}

/// Waits for a stop signal in a thread of its own, then unmounts.
fn spawn_signal_watcher(set: libc::sigset_t, mnt: PathBuf) {
    std::thread::spawn(move || {
        let mut sig = 0;
        unsafe { libc::sigwait(&set, &mut sig) };
        info!(signal = sig, "unmounting");
        unmount_lazily(&mnt);
        // A busy mount stays connected after the detach until its last user
        // lets go; do not wait for that: everything is on disk already.
        std::thread::sleep(BUSY_GRACE);
        info!("mount still in use after detach; exiting");
        std::process::exit(0);
    });
}

fn session_config(plan: &MountPlan, n_threads: usize) -> Config {
    let f = &plan.mount_flags;
    let root = unsafe { libc::geteuid() } == 0;
    let mut cfg = Config::default();
    cfg.mount_options = vec![
        MountOption::FSName(f.fsname.clone().unwrap_or_else(|| "unionfs".into())),
        MountOption::CUSTOM("subtype=unionfs".into()),
        MountOption::DefaultPermissions,
    ];
    let flags = [
        (f.read_only, MountOption::RO),
        (f.noexec, MountOption::NoExec),
        (f.noatime, MountOption::NoAtime),
        // Setuid and devices work as on a kernel mount when root mounts.
        (root && !f.nosuid, MountOption::Suid),
        (root && !f.nodev, MountOption::Dev),
    ];
    cfg.mount_options
        .extend(flags.into_iter().filter(|(on, _)| *on).map(|(_, o)| o));
    cfg.acl = match f.access {
        Access::AllowOther => SessionACL::All,
        Access::AllowRoot => SessionACL::RootAndOwner,
        Access::Default if root => SessionACL::All,
        Access::Default => SessionACL::Owner,
    };
    cfg.n_threads = Some(n_threads);
    cfg.clone_fd = true;
    cfg
}

/// A mounted union not served yet, with the lock on its work directory.
type Mounted = (Session<UnionFs>, Option<OwnedFd>, Arc<Union>);

/// Opens the layers, claims the work directory and mounts the union; the
/// returned session is not served yet.
fn mount_union(plan: &MountPlan) -> Result<Mounted, String> {
    check_dev_fuse()?;
    raise_fd_limit();
    unsafe { libc::umask(0) };
    let lowers = plan
        .lowers
        .iter()
        .map(|l| open_layer("lower directory", l))
        .collect::<Result<Vec<_>, _>>()?;
    let (upper, lock) = match &plan.upper {
        Some(u) => {
            let upper = open_layer("upper directory", &u.upper)?;
            let WorkDir { lock, scratch } = claim_workdir(u)?;
            (Some((upper, scratch)), Some(lock))
        }
        None => (None, None),
    };
    let tuning = Tuning {
        volatile: plan.volatile,
    };
    let union = Arc::new(Union::new(upper, lowers, tuning));
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(2, 8)
        * 2;
    let session = Session::new(
        UnionFs::new(union.clone(), plan.file_io, plan.presentation.clone()),
        &plan.mountpoint,
        &session_config(plan, threads),
    )
    .map_err(|e| format!("cannot mount on {}: {e}", plan.mountpoint.display()))?;
    match &plan.upper {
        Some(u) => info!(
            mountpoint = %plan.mountpoint.display(),
            workdir = %u.workdir.display(),
            xattrs = ?union.ns,
            "mounted"
        ),
        None => info!(mountpoint = %plan.mountpoint.display(), "mounted read-only"),
    }
    Ok((session, lock, union))
}

/// Mounts the planned union and serves it until it is unmounted;
/// `on_mounted` runs once the mount is live.
pub fn serve(plan: &MountPlan, on_mounted: impl FnOnce()) -> Result<(), String> {
    let signals = block_stop_signals();
    let (session, work, _union) = mount_union(plan)?;
    spawn_signal_watcher(signals, plan.mountpoint.clone());
    on_mounted();
    if let Err(e) = session.run() {
        warn!("session ended: {e}");
    }
    drop(work);
    info!("unmounted");
    Ok(())
}

/// A union mounted and served by background threads, for a caller that
/// has other work to do meanwhile (the container launcher).
pub struct Running {
    session: BackgroundSession,
    _work_lock: Option<OwnedFd>,
    mountpoint: PathBuf,
}

/// Mounts the planned union and serves it in the background.
pub fn start(plan: &MountPlan) -> Result<Running, String> {
    let (session, work, _union) = mount_union(plan)?;
    let session = session
        .spawn()
        .map_err(|e| format!("cannot start serving the union: {e}"))?;
    Ok(Running {
        session,
        _work_lock: work,
        mountpoint: plan.mountpoint.clone(),
    })
}

impl Running {
    /// Detaches the mount and waits a little for the session to end; a
    /// session still busy after that is left to end with the process.
    pub fn stop(self) {
        unmount_lazily(&self.mountpoint);
        let deadline = std::time::Instant::now() + BUSY_GRACE;
        while !self.session.guard.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        if self.session.guard.is_finished() {
            if let Err(e) = self.session.join() {
                warn!("session ended: {e}");
            }
        } else {
            info!("union still in use after detach; leaving it to the process exit");
        }
    }
}
