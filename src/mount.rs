//! Bringing a union up and down: opening the layers, claiming and cleaning
//! the work directory, mounting through the FUSE adapter (`fuse::session`),
//! serving until unmounted, and unmounting on SIGINT, SIGTERM or SIGHUP.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use nix::mount::{MntFlags, umount2};
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::stat::{Mode, umask};
use nix::unistd::geteuid;
use tracing::{info, warn};

use crate::fuse::session::{self, FuseMount, Served};
use crate::options::{MountPlan, UpperPlan};
use crate::overlay::index::{RecordedUpper, Refusal, describe};
use crate::overlay::superblock::{Tuning, Union};
use crate::tree::remove_tree;
use crate::{sys, trust};

/// How long a detached but busy mount is served before the daemon exits.
const BUSY_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// Name of the scratch directory inside the work directory (as the kernel's).
const WORK_SUBDIR: &str = "work";
/// Name of the inode index inside the work directory (as the kernel's).
const INDEX_SUBDIR: &str = "index";

/// The file in the work directory that names the FUSE connection holding it.
const HOLDER_FILE: &str = "unionfs.holder";

/// How long a mount waits for the work directory of a union whose mount is
/// gone but whose daemon has not exited yet.
const HOLDER_EXIT_WAIT: Duration = Duration::from_secs(10);

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

/// The work directory, locked for this mount, with a fresh `work` in it.
struct WorkDir {
    /// Holds the flock; the work directory is free again once dropped.
    lock: Flock<OwnedFd>,
    scratch: OwnedFd,
}

fn claim_workdir(plan: &UpperPlan) -> Result<WorkDir, String> {
    let wd = &plan.workdir;
    let me = geteuid().as_raw();
    let top = open_workdir(plan)?;
    trust::secure_workdir(top.as_fd(), wd, me, plan.default_workdir)?;
    let lock = lock_workdir(top, wd)?;
    let scratch = fresh_scratch_dir(lock.as_fd(), wd, me)?;
    Ok(WorkDir { lock, scratch })
}

/// Opens the work directory for locking; the default one is made (mode
/// 0700) if missing, and never reached through a symlink.
fn open_workdir(plan: &UpperPlan) -> Result<OwnedFd, String> {
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

/// Takes the work directory's lock. A holder whose mount is already gone
/// is a daemon on its way out (container engines unmount and mount again
/// at once): its end is awaited, up to `HOLDER_EXIT_WAIT`.
fn lock_workdir(mut top: OwnedFd, wd: &Path) -> Result<Flock<OwnedFd>, String> {
    let deadline = Instant::now() + HOLDER_EXIT_WAIT;
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
        if holder_is_mounted(top.as_fd()) {
            return Err(format!(
                "work directory {} is in use by another mount; unmount it first or give another -o workdir=",
                wd.display()
            ));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "work directory {} is still in use by a daemon whose mount is gone (waited {} s); \
                 wait for it to exit, or kill it",
                wd.display(),
                HOLDER_EXIT_WAIT.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether the mount named by the holder file is still there. Without a
/// readable holder file (a daemon that died before writing it, or an
/// older version) the holder counts as mounted.
fn holder_is_mounted(top: BorrowedFd<'_>) -> bool {
    let Ok(f) = sys::open_at(top, OsStr::new(HOLDER_FILE), libc::O_RDONLY) else {
        return true;
    };
    let mut text = String::new();
    if std::fs::File::from(f).read_to_string(&mut text).is_err() {
        return true;
    }
    match Holder::parse(&text) {
        Some(holder) => holder.is_mounted(),
        // Being written by a holder that has just mounted: look again.
        None => text.is_empty(),
    }
}

/// What the holder file says of the mount holding the work directory.
#[derive(Debug, PartialEq)]
struct Holder {
    /// The FUSE connection's device minor: reused by the next FUSE
    /// mount anywhere once this one is gone.
    minor: u32,
    /// The mount's unique id and the mount namespace it was made in
    /// (Linux 6.8+, absent in holder files of older versions): never
    /// reused, so no other mount can pass for this one.
    mount: Option<(u64, u64)>,
}

impl Holder {
    fn parse(text: &str) -> Option<Holder> {
        let mut words = text.split_whitespace();
        let minor = words.next()?.parse().ok()?;
        let id = words.next().and_then(|w| w.parse().ok());
        let ns = words.next().and_then(|w| w.parse().ok());
        Some(Holder {
            minor,
            mount: id.zip(ns),
        })
    }

    fn render(&self) -> String {
        match self.mount {
            Some((id, ns)) => format!("{} {id} {ns}\n", self.minor),
            None => format!("{}\n", self.minor),
        }
    }

    /// The unique id settles it in the namespace the mount was made in;
    /// elsewhere only the connection's minor can be looked at.
    fn is_mounted(&self) -> bool {
        if let Some((id, ns)) = self.mount
            && own_mount_namespace() == Some(ns)
            && let Ok(listed) = sys::mount_is_listed(id)
        {
            return listed;
        }
        fuse_connection_alive(self.minor)
    }
}

/// The inode number of this process's mount namespace.
fn own_mount_namespace() -> Option<u64> {
    std::fs::metadata("/proc/self/ns/mnt").ok().map(|m| m.ino())
}

/// A FUSE connection lives as long as its superblock, whatever mount
/// namespace holds it: `/sys/fs/fuse/connections/N` shows it where the
/// fusectl file system is mounted; elsewhere the mount table of this
/// namespace is the best there is.
fn fuse_connection_alive(minor: u32) -> bool {
    let ctl = Path::new("/sys/fs/fuse/connections");
    if std::fs::read_dir(ctl).is_ok_and(|mut d| d.next().is_some()) {
        return ctl.join(minor.to_string()).exists();
    }
    let want = format!("0:{minor}");
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(2) == Some(want.as_str()))
}

/// Records which mount holds the work directory, for `holder_is_mounted`
/// of a later mount.
fn write_holder_file(top: BorrowedFd<'_>, mountpoint: &Path) {
    let Some(minor) = fuse_minor_of(mountpoint) else {
        return;
    };
    let unique_id = sys::open_dir_path(mountpoint)
        .ok()
        .and_then(|fd| sys::unique_mount_id(fd.as_fd()));
    let holder = Holder {
        minor,
        mount: unique_id.zip(own_mount_namespace()),
    };
    let made = sys::create_or_truncate(top, OsStr::new(HOLDER_FILE), 0o600).and_then(|f| {
        let mut f = std::fs::File::from(f);
        f.write_all(holder.render().as_bytes())
            .map_err(|e| sys::errno_of(&e))
    });
    if let Err(e) = made {
        warn!("cannot record the mount in the work directory: {e}");
    }
}

/// The device minor of the FUSE mount at `mountpoint` (read from the mount
/// table: a stat of it would ask the daemon, which is not serving yet).
fn fuse_minor_of(mountpoint: &Path) -> Option<u32> {
    let want = mountpoint.to_string_lossy();
    std::fs::read_to_string("/proc/self/mountinfo")
        .ok()?
        .lines()
        .rfind(|l| l.split(' ').nth(4) == Some(&*want))
        .and_then(|l| l.split(' ').nth(2)?.strip_prefix("0:")?.parse().ok())
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
fn enable_index(
    union: &mut Union,
    top: BorrowedFd<'_>,
    u: &UpperPlan,
    asked: bool,
) -> Result<(), String> {
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

/// A mounted union not served yet, with the lock on its work directory.
type Mounted = (FuseMount, Option<Flock<OwnedFd>>, Arc<Union>);

/// Opens the layers, claims the work directory and mounts the union; the
/// returned session is not served yet.
fn mount_union(plan: &MountPlan) -> Result<Mounted, String> {
    check_dev_fuse()?;
    raise_fd_limit();
    umask(Mode::empty());
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
        redirect_dir: plan.redirect_dir,
        metacopy: plan.metacopy,
    };
    let mut union = Union::new(upper, lowers, tuning);
    if let (Some(u), Some(top), true) = (&plan.upper, &lock, plan.index != Some(false)) {
        enable_index(&mut union, top.as_fd(), u, plan.index == Some(true))?;
    }
    let union = Arc::new(union);
    let session = session::mount(union.clone(), plan)?;
    if let Some(lock) = &lock {
        write_holder_file(lock.as_fd(), &plan.mountpoint);
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
    Ok((session, lock, union))
}

/// Mounts the planned union and serves it until it is unmounted;
/// `on_mounted` runs once the mount is live.
pub fn serve(plan: &MountPlan, on_mounted: impl FnOnce()) -> Result<(), String> {
    let signals = block_stop_signals();
    let (session, work, _union) = mount_union(plan)?;
    spawn_signal_watcher(signals, plan.mountpoint.clone());
    on_mounted();
    let finish = move || {
        if let Some(lock) = &work {
            let _ = sys::unlink_at(lock.as_fd(), OsStr::new(HOLDER_FILE), false);
        }
        drop(work);
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
    _work_lock: Option<Flock<OwnedFd>>,
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

    #[test]
    fn holder_files_of_this_and_older_versions_are_read() {
        let now = Holder {
            minor: 71,
            mount: Some((1234, 4026531841)),
        };
        assert_eq!(Holder::parse(&now.render()), Some(now));
        let old = Holder::parse("71\n").unwrap();
        assert_eq!((old.minor, old.mount), (71, None));
        assert_eq!(Holder::parse(""), None);
        assert_eq!(Holder::parse("x 1 2"), None);
    }

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
