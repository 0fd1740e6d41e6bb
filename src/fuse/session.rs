//! The FUSE session: the mount's options taken from the plan, and the
//! session serving the union, in the foreground or on background threads.
//! `mount` brings a union up through this and never sees fuser.

use std::io;
use std::sync::Arc;

use fuser::{BackgroundSession, Config, MountOption, Session, SessionACL};

use super::{FuseKernelCache, UnionFs};
use crate::options::{Access, MountPlan};
use crate::overlay::superblock::Union;

/// What ends a foreground daemon when its session is over, run from the
/// filesystem's `destroy`.
///
/// fuser 0.18 unmounts the mount point by its path when a session ends and
/// takes a connection the kernel has severed for a live one (its poll check
/// is the reverse of libfuse's): by then a new union may be mounted at the
/// same path (container engines unmount and mount again when a container
/// restarts), and that unmount would take it down. The daemon therefore
/// finishes in `destroy`, which fuser calls before it unmounts.
pub type AtEnd = Arc<parking_lot::Mutex<Option<Box<dyn FnOnce() + Send>>>>;

/// A union mounted on FUSE and not served yet.
pub struct FuseMount {
    session: Session<UnionFs>,
    at_end: AtEnd,
}

/// Mounts `union` as `plan` says; requests wait until it is served.
pub fn mount(union: Arc<Union>, plan: &MountPlan) -> Result<FuseMount, String> {
    let at_end = AtEnd::default();
    let notifier = Arc::new(std::sync::OnceLock::new());
    let fs = UnionFs::new(
        union.clone(),
        plan.file_io,
        plan.presentation.clone(),
        at_end.clone(),
        notifier.clone(),
    );
    let session = Session::new(fs, &plan.mountpoint, &session_config(plan))
        .map_err(|e| format!("cannot mount on {}: {e}", plan.mountpoint.display()))?;
    let _ = notifier.set(session.notifier());
    union.set_kernel_cache(Box::new(FuseKernelCache(session.notifier())));
    Ok(FuseMount { session, at_end })
}

impl FuseMount {
    /// Serves requests until the mount goes, then runs `finish`, which
    /// must end the process (see `AtEnd`).
    pub fn serve(self, finish: impl FnOnce() + Send + 'static) -> io::Result<()> {
        *self.at_end.lock() = Some(Box::new(finish));
        self.session.run()
    }

    /// Serves requests on background threads.
    pub fn spawn(self) -> io::Result<Served> {
        self.session.spawn().map(Served)
    }
}

/// A union served on background threads.
pub struct Served(BackgroundSession);

impl Served {
    /// Whether serving has ended (the mount is gone).
    pub fn is_finished(&self) -> bool {
        self.0.guard.is_finished()
    }

    /// Waits for serving to end.
    pub fn join(self) -> io::Result<()> {
        self.0.join()
    }
}

/// Two serving threads per CPU (one may wait on the disk while the other
/// answers), between 4 and 16.
fn serving_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(2, 8)
        * 2
}

fn session_config(plan: &MountPlan) -> Config {
    let f = &plan.mount_flags;
    let root = nix::unistd::geteuid().is_root();
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
    cfg.n_threads = Some(serving_threads());
    cfg.clone_fd = true;
    cfg
}
