//! Inside the container's namespaces, as its PID 1: everything set up in
//! order (mounts, hostname, network, `pivot_root`, identity, working
//! directory), then the command executed.

use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use nix::errno::Errno;
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
use nix::sys::stat::{Mode, umask};
use nix::unistd::chdir;

use super::exec::{Exec, environment, find_command};
use super::identity::{become_identity, resolve_identity, set_hostname};
use super::mounts::{bind, make_rprivate, mount_dev, mount_proc, mount_sys, pivot_into};
use super::request::{Net, Spec};
use super::signals::die_with_parent;
use super::{Failure, fail, failed};
use crate::sys;

/// The container's first process: sets everything up and becomes the
/// command (or, with `--init`, its parent).
pub fn enter(spec: &Spec, root: &Path) -> ! {
    die_with_parent();
    match set_up(spec, root) {
        Ok(exec) => exec.run(spec.init),
        Err(f) => fail(f),
    }
}

fn set_up(spec: &Spec, root: &Path) -> Result<Exec, Failure> {
    // Whatever umask the launcher was started with, the mount points and
    // the working directory made below get exactly their modes (0755, 0644),
    // and the command starts with the conventional 022.
    umask(Mode::from_bits_truncate(0o022));
    make_rprivate("/").map_err(|e| Failure::launcher(format!("cannot make / private: {e}")))?;
    let rootfd = sys::open_dir_path(root)
        .map_err(|e| Failure::launcher(format!("cannot open the container root: {e}")))?;
    let root_fd = rootfd.as_fd();
    mount_proc(root_fd)?;
    mount_dev(root_fd)?;
    mount_sys(root_fd, spec.net)?;
    for b in &spec.binds {
        bind(root_fd, &b.source, &b.target, b.is_dir, b.read_only, true)?;
    }
    set_hostname(&spec.hostname)?;
    if spec.net == Net::None {
        loopback_up()?;
    }
    pivot_into(root)?;
    let id = resolve_identity(spec.user.as_ref())?;
    let env = environment(spec, &id);
    if std::fs::metadata(&spec.cwd).is_ok_and(|m| !m.is_dir()) {
        return Err(Failure::launcher(format!(
            "--cwd {} is not a directory in the container: name a directory (a missing one is made)",
            spec.cwd.display()
        )));
    }
    // A missing working directory is made, as an image's WORKDIR is.
    let made = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&spec.cwd);
    if let Err(e) = made {
        return Err(Failure::launcher(format!(
            "cannot make {} in the container: {e}",
            spec.cwd.display()
        )));
    }
    chdir(&spec.cwd).map_err(|e| {
        failed(
            format_args!("cannot change to {} in the container", spec.cwd.display()),
            e,
        )
    })?;
    become_identity(&id)?;
    let program = find_command(&spec.command[0], &env)?;
    Ok(Exec {
        program,
        args: spec.command.clone(),
        env,
    })
}

/// Brings up `lo` in the container's own network namespace.
fn loopback_up() -> Result<(), Failure> {
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| failed("cannot open a socket", e))?;
    // SAFETY: ifreq is plain data (a name and a union of integers); all
    // zeroes is a valid value. nix has no wrapper for the interface ioctls.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(b"lo") {
        *d = *s as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS and SIOCSIFFLAGS read and write an ifreq, which
    // `req` is, through an open socket; the flags member is the one set.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) != 0 {
            return Err(failed("cannot read the flags of lo", Errno::last()));
        }
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) != 0 {
            return Err(failed("cannot bring up lo", Errno::last()));
        }
    }
    Ok(())
}
