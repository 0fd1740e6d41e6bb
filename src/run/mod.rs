//! `unionfs run`: a union as the root filesystem of a command in new
//! namespaces. This module owns the launcher's side of it: checking the
//! request, the scratch directory, entering a user namespace for rootless
//! runs, mounting the union (served from the launcher's own mount
//! namespace, never the container's), and handing over to the container.
//!
//! Exit codes: the command's own status (128+N when it dies of signal N);
//! 125 when the launcher itself fails or is given bad values; 126 when the
//! command cannot be executed; 127 when it is not found in the container.

mod cgroup;
mod container;
mod exec;
mod identity;
mod init_layer;
mod mounts;
mod request;
mod signals;
mod supervise;

use std::ffi::OsString;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sched::{CloneFlags, unshare};
use nix::sys::signal::kill;
use nix::unistd::{Pid, geteuid, getuid, mkdtemp};
use tracing::{debug, info};

use crate::options::{self, MountRequest};
use crate::tree::remove_tree;
use crate::{mount, sys};

use request::Spec;
pub use request::{Net, RunRequest};

/// The launcher failed or was given bad values.
pub const EXIT_LAUNCHER: u8 = 125;
/// The command was found but could not be executed.
pub const EXIT_CANNOT_EXECUTE: u8 = 126;
/// The command is not in the container.
pub const EXIT_NOT_FOUND: u8 = 127;

/// A failure with the exit code it ends the run with.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    pub fn launcher(message: impl Into<String>) -> Failure {
        Failure {
            code: EXIT_LAUNCHER,
            message: message.into(),
        }
    }
}

/// Prints the failure as the launcher's one line and exits with its code.
fn fail(f: Failure) -> ! {
    eprintln!("unionfs run: {}", f.message);
    exit_now(f.code as i32)
}

/// Ends this process at once: no exit handlers, no flush of buffers a fork
/// copied from the launcher.
fn exit_now(code: i32) -> ! {
    // SAFETY: _exit takes no pointers and never returns.
    unsafe { libc::_exit(code) }
}

/// A failure of a system call, naming what was tried.
fn failed(what: impl std::fmt::Display, e: nix::errno::Errno) -> Failure {
    Failure::launcher(format!("{what}: {}", std::io::Error::from(e)))
}

/// A checked path as a C string.
fn cpath(p: &Path) -> std::ffi::CString {
    std::ffi::CString::new(p.as_os_str().as_bytes()).expect("checked paths have no NUL")
}

impl From<String> for Failure {
    fn from(message: String) -> Failure {
        Failure::launcher(message)
    }
}

/// Runs the request and returns the exit code for the launcher.
pub fn run(req: RunRequest) -> Result<u8, Failure> {
    let (mut spec, image) = request::check(req)?;
    let rootless = !geteuid().is_root();
    if rootless {
        check_dev_fuse_for_user()?;
    }
    // Made by the user as they are (a rootless cgroup must be delegated to
    // the user, not to the ids of the user namespace).
    let cgroup = spec
        .limits
        .wanted()
        .then(|| cgroup::Cgroup::create(&spec.limits))
        .transpose()?;
    let scratch = Scratch::create(spec.upper.is_none())?;
    if rootless {
        crate::userns::enter_user_namespace().map_err(Failure::launcher)?;
    }
    // Unpacked inside the user namespace, so that a rootless layer's owners
    // map as the container's do.
    if let Some(run) = &image {
        spec.lowers = unpack_image(run)?;
    }
    enter_private_mount_namespace()?;
    scratch.remove_stale_siblings();
    init_layer::prepare(&scratch.path("init"), &spec)?;
    let plan = options::plan(&MountRequest {
        lowers: init_layer::stacked_under(&spec.lowers, &scratch.path("init")),
        upper: spec.upper.clone().unwrap_or_else(|| scratch.path("upper")),
        mountpoint: scratch.path("root"),
        options: mount_options(&spec),
        workdir: spec.upper.is_none().then(|| scratch.path("work")),
    })?;
    let signals = signals::block_signals();
    let container = supervise::fork_container(&spec, &plan.mountpoint)?;
    if let Some(cg) = &cgroup
        && let Err(f) = cg.add(container.pid())
    {
        container.abandon();
        return Err(f);
    }
    let running = match mount::start(&plan) {
        Ok(r) => r,
        Err(e) => {
            container.abandon();
            return Err(Failure::launcher(e));
        }
    };
    debug!(root = %plan.mountpoint.display(), "union mounted; starting the container");
    let status = container.start_and_wait(signals, spec.stop_timeout);
    running.stop();
    if let Some(cg) = &cgroup {
        cg.report();
    }
    drop(cgroup);
    drop(scratch);
    info!(status, "container exited");
    Ok(status)
}

/// The image's layers in the store (unpacked there if missing), top-most
/// first: the lowers of the union.
fn unpack_image(run: &request::ImageRun) -> Result<Vec<PathBuf>, Failure> {
    let store = crate::image::Store::open(&run.store)?;
    Ok(run.image.unpack_into(&store)?)
}

fn mount_options(spec: &Spec) -> Vec<OsString> {
    let mut opts: Vec<OsString> = spec.mount_options.iter().map(OsString::from).collect();
    if spec.upper.is_none() {
        // A throwaway upper needs no flushes to disk.
        opts.push("volatile".into());
    }
    opts
}

/// A rootless run makes the FUSE mount as the user: say so plainly when
/// the user cannot open /dev/fuse, before anything is created.
fn check_dev_fuse_for_user() -> Result<(), Failure> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map(drop)
        .map_err(|e| {
            Failure::launcher(format!(
                "/dev/fuse cannot be opened by uid {}: {e} (a rootless run needs a /dev/fuse the user can open, e.g. mode 0666)",
                getuid()
            ))
        })
}

/// A mount namespace of the launcher's own, with no propagation to or from
/// the host: the union mounted there vanishes with the launcher.
fn enter_private_mount_namespace() -> Result<(), Failure> {
    unshare(CloneFlags::CLONE_NEWNS).map_err(|e| failed("cannot create a mount namespace", e))?;
    mounts::make_rprivate("/").map_err(|e| Failure::launcher(format!("cannot make / private: {e}")))
}

/// The launcher's scratch directory: the container's root mount point and,
/// for a throwaway run, its upper and work directories. Removed on drop.
struct Scratch {
    dir: PathBuf,
}

/// Names the launcher's process in its scratch directory, so that a later
/// run can tell a directory left by a killed launcher from a live one.
const OWNER_FILE: &str = "launcher.pid";
const SCRATCH_PREFIX: &str = "unionfs-run.";

impl Scratch {
    fn create(throwaway_upper: bool) -> Result<Scratch, Failure> {
        let base = std::env::var_os("TMPDIR")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/tmp"));
        let dir = make_temp_dir(&base)?;
        let scratch = Scratch { dir };
        write_private_file(&scratch.path(OWNER_FILE), &std::process::id().to_string()).map_err(
            |e| Failure::launcher(format!("cannot write in {}: {e}", scratch.dir.display())),
        )?;
        // The container's root mount point and work directory are the
        // launcher's alone; a throwaway upper is the container's `/`, the
        // init layer lies under it.
        let mut subdirs = vec![("root", 0o700), ("init", 0o755)];
        if throwaway_upper {
            subdirs.extend([("upper", 0o755), ("work", 0o700)]);
        }
        for (name, mode) in subdirs {
            make_dir(&scratch.path(name), mode).map_err(|e| {
                Failure::launcher(format!(
                    "cannot create {}: {e}",
                    scratch.path(name).display()
                ))
            })?;
        }
        Ok(scratch)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Removes what launchers killed before they could clean up left beside
    /// this one: scratch directories of ours whose launcher is gone. (Their
    /// mounts died with the launchers' namespaces.)
    fn remove_stale_siblings(&self) {
        let Some(base) = self.dir.parent() else {
            return;
        };
        let Ok(entries) = std::fs::read_dir(base) else {
            return;
        };
        let me = geteuid().as_raw();
        for e in entries.flatten() {
            let path = e.path();
            let ours = e.file_name().to_string_lossy().starts_with(SCRATCH_PREFIX)
                && path != self.dir
                && std::fs::symlink_metadata(&path)
                    .is_ok_and(|m| m.is_dir() && std::os::unix::fs::MetadataExt::uid(&m) == me);
            if ours && launcher_gone(&path) {
                debug!(dir = %path.display(), "removing what a killed launcher left");
                drop(Scratch { dir: path });
            }
        }
    }
}

/// True when the directory names a launcher process that no longer exists.
fn launcher_gone(dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join(OWNER_FILE)) else {
        return false;
    };
    let Ok(pid) = text.trim().parse::<libc::pid_t>() else {
        return false;
    };
    pid > 0 && kill(Pid::from_raw(pid), None) == Err(Errno::ESRCH)
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let (Some(parent), Some(name)) = (self.dir.parent(), self.dir.file_name()) else {
            return;
        };
        match sys::open_dir_path(parent) {
            Ok(fd) => {
                if let Err(e) = remove_tree(fd.as_fd(), name) {
                    tracing::warn!("cannot remove {}: {e}", self.dir.display());
                }
            }
            Err(e) => tracing::warn!("cannot open {}: {e}", parent.display()),
        }
    }
}

/// Makes directory `path` with exactly `mode`, whatever the umask.
pub(crate) fn make_dir(path: &Path, mode: u32) -> std::io::Result<()> {
    std::fs::create_dir(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// Writes a new file readable and writable by its owner only.
fn write_private_file(path: &Path, text: &str) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    std::io::Write::write_all(&mut f, text.as_bytes())
}

/// mkdtemp: a new directory of mode 0700.
fn make_temp_dir(base: &Path) -> Result<PathBuf, Failure> {
    mkdtemp(&base.join(format!("{SCRATCH_PREFIX}XXXXXX"))).map_err(|e| {
        failed(
            format_args!("cannot create a directory in {}", base.display()),
            e,
        )
    })
}
