//! The work directory of a union with an upper directory: claimed by one
//! union at a time (a lock, and a holder file saying who holds it, see
//! `holder`), its scratch directory `work` made afresh at every mount, and
//! its inode index `index` bound to the upper directory (see
//! `overlay::index`).

pub mod holder;

use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use nix::unistd::geteuid;
use tracing::info;

use crate::options::UpperPlan;
use crate::overlay::index::{RecordedUpper, Refusal, describe};
use crate::overlay::superblock::Union;
use crate::tree::remove_tree;
use crate::{sys, trust};
use holder::{Found, Role};

/// Name of the scratch directory inside the work directory (as the kernel's).
const WORK_SUBDIR: &str = "work";
/// Name of the inode index inside the work directory (as the kernel's).
const INDEX_SUBDIR: &str = "index";

/// How long a claimant waits for the work directory of a union whose mount
/// is gone but whose daemon has not exited yet.
const HOLDER_EXIT_WAIT: Duration = Duration::from_secs(10);

/// Names the stop signal that should end a wait, if one came.
pub type Interrupted<'a> = &'a dyn Fn() -> Option<&'static str>;

/// The work directory, locked for one union.
pub struct WorkDir {
    /// Holds the flock; the work directory is free again once dropped.
    lock: Flock<OwnedFd>,
}

impl WorkDir {
    /// Claims the work directory of `plan`: made if it is the default one,
    /// checked, locked (see `lock`) and its `work` made afresh; with
    /// `work`, where the union builds its objects. `interrupted` names a
    /// stop signal that should end a wait for it.
    pub fn claim(plan: &UpperPlan, interrupted: Interrupted) -> Result<(WorkDir, OwnedFd), String> {
        let wd = &plan.workdir;
        let me = geteuid().as_raw();
        let top = open(plan)?;
        trust::secure_workdir(top.as_fd(), wd, me, plan.default_workdir)?;
        let lock = lock(top, plan, interrupted)?;
        let scratch = fresh_scratch_dir(lock.as_fd(), wd, me)?;
        Ok((WorkDir { lock }, scratch))
    }

    /// The work directory itself.
    pub fn dir(&self) -> BorrowedFd<'_> {
        self.lock.as_fd()
    }

    /// Records that the union mounted at `mountpoint`, served by this
    /// process as `role`, holds it.
    pub fn record_holder(&self, mountpoint: &Path, role: Role) {
        holder::record(self.dir(), mountpoint, role);
    }

    /// Lets the work directory go. The holder file stays: until the lock
    /// goes with this process, a claimant reading it finds a union that is
    /// unmounted and waits (had the file gone first, the claimant would
    /// find the lock held by a holder that had not said who it is, and be
    /// refused); the next holder writes its own over it.
    pub fn release(self) {
        drop(self.lock);
    }
}

/// Opens the work directory for locking; the default one is made (mode
/// 0700) if missing, and never reached through a symlink.
fn open(plan: &UpperPlan) -> Result<OwnedFd, String> {
    let wd = &plan.workdir;
    let cannot_open = |e: sys::Errno| format!("cannot open work directory {}: {e}", wd.display());
    if !plan.default_workdir {
        return sys::open_dir(wd).map_err(cannot_open);
    }
    let (Some(parent), Some(name)) = (wd.parent(), wd.file_name()) else {
        return Err(format!("bad work directory path {}", wd.display()));
    };
    let parent = sys::open_dir_path(parent).map_err(cannot_open)?;
    match sys::mkdir_at(parent.as_fd(), name, trust::PRIVATE_DIR_MODE) {
        Ok(()) | Err(sys::Errno::EEXIST) => {}
        Err(e) => {
            return Err(format!(
                "cannot create work directory {}: {e}",
                wd.display()
            ));
        }
    }
    sys::open_at(parent.as_fd(), name, libc::O_RDONLY | libc::O_DIRECTORY).map_err(cannot_open)
}

/// Takes the work directory's lock. A live holder is named at once (a
/// mount and where, or a run, with its pid). A holder whose union is
/// already unmounted is a daemon on its way out (container engines
/// unmount and mount again at once): its end is awaited, up to
/// `HOLDER_EXIT_WAIT`, with a line saying so; a stop signal ends the wait.
fn lock(
    mut top: OwnedFd,
    plan: &UpperPlan,
    interrupted: Interrupted,
) -> Result<Flock<OwnedFd>, String> {
    let wd = &plan.workdir;
    let in_use = || {
        format!(
            "work directory {} of upper directory {} is in use by",
            wd.display(),
            plan.upper.display()
        )
    };
    let deadline = Instant::now() + HOLDER_EXIT_WAIT;
    let mut told = false;
    loop {
        top = match Flock::lock(top, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((top, nix::errno::Errno::EWOULDBLOCK)) => top,
            Err((_, err)) => {
                return Err(format!(
                    "cannot lock work directory {}: {}",
                    wd.display(),
                    std::io::Error::from(err)
                ));
            }
        };
        let pid = match holder::find(top.as_fd()) {
            Found::Mounted(Some(h)) => return Err(format!("{} {}", in_use(), h.in_use_by())),
            Found::Mounted(None) => {
                return Err(format!("{} {}", in_use(), holder::IN_USE_BY_ANOTHER));
            }
            Found::Unsaid => None,
            Found::Leaving(h) => h.pid(),
        };
        let daemon = pid.map_or("the daemon".to_string(), |p| {
            format!("the daemon (pid {p})")
        });
        if !told && pid.is_some() {
            info!(
                "the union that held {} is unmounted; waiting for {daemon} to exit (at most {} s)",
                wd.display(),
                HOLDER_EXIT_WAIT.as_secs()
            );
            told = true;
        }
        if let Some(sig) = interrupted() {
            return Err(format!(
                "{sig} while waiting for {daemon} of the unmounted union that held work directory {} to exit; nothing was mounted",
                wd.display()
            ));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "work directory {} is still held by {daemon} of a union unmounted {} s ago or more; \
                 wait for it to exit, or kill it",
                wd.display(),
                HOLDER_EXIT_WAIT.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Makes `WORKDIR/work` afresh: what an earlier run (or crash) left there is
/// removed with it, and nobody but this user can hold a way into the new one.
fn fresh_scratch_dir(top: BorrowedFd<'_>, wd: &Path, me: u32) -> Result<OwnedFd, String> {
    let name = OsStr::new(WORK_SUBDIR);
    let path = wd.join(WORK_SUBDIR);
    match sys::stat_at(top, name) {
        Ok(st) => {
            trust::judge(&path, &st, me, false)?;
            let leftovers = sys::open_path(top, name)
                .and_then(|d| sys::read_dir(d.as_fd()))
                .map_or(0, |e| e.len());
            remove_tree(top, name).map_err(|e| format!("cannot clean {}: {e}", path.display()))?;
            if leftovers > 0 {
                info!(
                    leftovers,
                    "removed leftovers of an earlier run from the work directory"
                );
            }
        }
        Err(sys::Errno::ENOENT) => {}
        Err(e) => return Err(format!("{}: {e}", path.display())),
    }
    sys::mkdir_at(top, name, trust::PRIVATE_DIR_MODE)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    sys::open_path(top, name).map_err(|e| format!("cannot open {}: {e}", path.display()))
}

/// Turns the union's index on over `WORKDIR/index` (`asked`: the user
/// gave `index=on`). The default work directory belongs to the upper's
/// path, not to one upper: when its index is another upper's and that
/// upper is gone, or this upper is new and empty, the index starts afresh
/// (an existing upper's index is kept aside, so its files keep their link
/// counts). A work directory the user named is refused, as the kernel
/// refuses it.
pub fn enable_index(
    union: &mut Union,
    work: &WorkDir,
    u: &UpperPlan,
    asked: bool,
) -> Result<(), String> {
    let top = work.dir();
    let refused = |r: Refusal| match r {
        Refusal::OtherLowers => format!("upper directory {} {}", u.upper.display(), describe(&r)),
        Refusal::OtherUpper(_) => {
            format!("work directory {} {}", u.workdir.display(), describe(&r))
        }
    };
    let dir = open_index_dir(top, &u.workdir)?;
    let recorded = match union.enable_index(dir, asked) {
        Ok(()) => return Ok(()),
        Err(Refusal::OtherUpper(recorded)) if u.default_workdir => recorded,
        Err(r) => return Err(refused(r)),
    };
    let index = u.workdir.join(INDEX_SUBDIR);
    match &recorded {
        RecordedUpper::Gone => {
            remove_tree(top, OsStr::new(INDEX_SUBDIR))
                .map_err(|e| format!("cannot remove {}: {e}", index.display()))?;
            info!(
                "the index in {} belonged to an upper directory that no longer exists; started a new one",
                index.display()
            );
        }
        RecordedUpper::At(old) if union.upper_is_empty() => {
            let kept = keep_aside(top, &u.workdir)?;
            info!(
                "the index in {} belonged to the upper directory {}; kept it as {} and started a new one for the empty {}",
                index.display(),
                old.display(),
                kept.display(),
                u.upper.display()
            );
        }
        _ => return Err(refused(Refusal::OtherUpper(recorded))),
    }
    let dir = open_index_dir(top, &u.workdir)?;
    union.enable_index(dir, asked).map_err(refused)
}

/// Renames `WORKDIR/index` to the first free `index.old.N`; returns its path.
fn keep_aside(top: BorrowedFd<'_>, wd: &Path) -> Result<PathBuf, String> {
    for n in 1.. {
        let name = format!("{INDEX_SUBDIR}.old.{n}");
        let (from, to) = (OsStr::new(INDEX_SUBDIR), OsStr::new(&name));
        match sys::rename_at(top, from, top, to, libc::RENAME_NOREPLACE) {
            Ok(()) => return Ok(wd.join(name)),
            Err(sys::Errno::EEXIST) => continue,
            Err(e) => {
                return Err(format!(
                    "cannot rename {}: {e}",
                    wd.join(INDEX_SUBDIR).display()
                ));
            }
        }
    }
    unreachable!("the numbers ran out")
}

/// `WORKDIR/index`, made if missing; held to the trust rules of the work
/// directory.
fn open_index_dir(top: BorrowedFd<'_>, wd: &Path) -> Result<OwnedFd, String> {
    let name = OsStr::new(INDEX_SUBDIR);
    let path = wd.join(INDEX_SUBDIR);
    match sys::mkdir_at(top, name, trust::PRIVATE_DIR_MODE) {
        Ok(()) | Err(sys::Errno::EEXIST) => {}
        Err(e) => return Err(format!("cannot create {}: {e}", path.display())),
    }
    let st = sys::stat_at(top, name).map_err(|e| format!("{}: {e}", path.display()))?;
    trust::judge(&path, &st, geteuid().as_raw(), false)?;
    sys::open_path(top, name).map_err(|e| format!("cannot open {}: {e}", path.display()))
}
