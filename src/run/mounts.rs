//! The container's mounts, made inside its namespaces: /proc, a private
//! /dev, a read-only /sys, the binds, and `pivot_root` into the union.
//!
//! Every mount target is resolved inside the container's root with
//! `openat2(RESOLVE_IN_ROOT)`, so a symlink in an image (say `/proc ->
//! /etc`) can never place a mount outside it; the mount is then made on the
//! descriptor's `/proc/self/fd` path.

use std::ffi::{CStr, CString, OsStr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat, openat2};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::stat::Mode;
use nix::sys::statvfs::statvfs;
use nix::unistd::{chdir, isatty, pivot_root, ttyname};

use super::request::Net;
use super::{Failure, cpath, failed};
use crate::sys;

/// Host devices bound into the container's /dev.
const DEV_NODES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// Stops mount events from propagating to or from `path` and below.
pub fn make_rprivate(path: &str) -> std::io::Result<()> {
    let flags = MsFlags::MS_REC | MsFlags::MS_PRIVATE;
    mount(NONE, path, NONE, flags, NONE).map_err(std::io::Error::from)
}

/// The absent string argument of `mount`.
const NONE: Option<&'static str> = None;

fn openat2_in_root(root: BorrowedFd<'_>, rel: &Path) -> sys::Result<OwnedFd> {
    let name = if rel.as_os_str().is_empty() {
        CString::new(".").expect("no NUL")
    } else {
        cpath(rel)
    };
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    openat2(root, name.as_c_str(), how)
}

/// Opens `path` (absolute in the container) as a mount target, making the
/// missing components: directories, and for a file target an empty file.
fn resolve_target(root: BorrowedFd<'_>, path: &Path, is_dir: bool) -> Result<OwnedFd, Failure> {
    let rel = path.strip_prefix("/").unwrap_or(path);
    let parts: Vec<&OsStr> = rel.iter().collect();
    let mut prefix = PathBuf::new();
    let mut fd = openat2_in_root(root, &prefix).map_err(|e| target_err(path, e))?;
    for (i, part) in parts.iter().enumerate() {
        let parent = prefix.clone();
        prefix.push(part);
        fd = match openat2_in_root(root, &prefix) {
            Ok(fd) => fd,
            Err(sys::Errno::ENOENT) => {
                let pfd = openat2_in_root(root, &parent).map_err(|e| target_err(path, e))?;
                let last = i + 1 == parts.len();
                make_mount_point(pfd.as_fd(), part, !last || is_dir)
                    .map_err(|e| target_err(path, e))?;
                openat2_in_root(root, &prefix).map_err(|e| target_err(path, e))?
            }
            Err(e) => return Err(target_err(path, e)),
        };
    }
    Ok(fd)
}

fn target_err(path: &Path, e: sys::Errno) -> Failure {
    Failure::launcher(format!(
        "cannot make {} in the container: {e}",
        path.display()
    ))
}

fn make_mount_point(dir: BorrowedFd<'_>, name: &OsStr, is_dir: bool) -> sys::Result<()> {
    if is_dir {
        return match sys::mkdir_at(dir, name, 0o755) {
            Err(sys::Errno::EEXIST) => Ok(()),
            r => r,
        };
    }
    let flags = OFlag::O_CREAT | OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    openat(dir, name, flags, Mode::from_bits_truncate(0o644)).map(drop)
}

fn mount_on(
    source: Option<&CStr>,
    target: &OwnedFd,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
    data: Option<&CStr>,
) -> std::io::Result<()> {
    let target = sys::proc_path(target.as_raw_fd());
    let flags = MsFlags::from_bits_retain(flags);
    mount(source, target.as_c_str(), fstype, flags, data).map_err(std::io::Error::from)
}

fn mount_fs(
    root: BorrowedFd<'_>,
    at: &str,
    fstype: &CStr,
    flags: libc::c_ulong,
    data: &CStr,
) -> Result<OwnedFd, Failure> {
    let target = resolve_target(root, Path::new(at), true)?;
    mount_on(Some(fstype), &target, Some(fstype), flags, Some(data)).map_err(|e| {
        Failure::launcher(format!(
            "cannot mount {} on {at}: {e}",
            fstype.to_string_lossy()
        ))
    })?;
    // The descriptor opened before the mount still names the directory
    // underneath it.
    resolve_target(root, Path::new(at), true)
}

pub fn mount_proc(root: BorrowedFd<'_>) -> Result<(), Failure> {
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount_fs(root, "/proc", c"proc", flags, c"").map(drop)
}

pub fn mount_dev(root: BorrowedFd<'_>) -> Result<(), Failure> {
    let dev = mount_fs(
        root,
        "/dev",
        c"tmpfs",
        libc::MS_NOSUID | libc::MS_STRICTATIME,
        c"mode=755,size=65536k",
    )?;
    for name in DEV_NODES {
        bind_device(
            root,
            &format!("/dev/{name}"),
            Path::new("/dev").join(name).as_path(),
        )?;
    }
    if isatty(std::io::stdin()) == Ok(true)
        && let Ok(tty) = ttyname(std::io::stdin())
    {
        bind_device(root, "/dev/console", &tty)?;
    }
    mount_devpts(root)?;
    let links = [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ];
    for (name, to) in links {
        sys::symlink_at(OsStr::new(to), dev.as_fd(), OsStr::new(name))
            .map_err(|e| Failure::launcher(format!("cannot make /dev/{name}: {e}")))?;
    }
    mount_fs(
        root,
        "/dev/shm",
        c"tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        c"mode=1777,size=65536k",
    )?;
    Ok(())
}

/// Binds the host device `host` onto `at` in the container's /dev.
fn bind_device(root: BorrowedFd<'_>, at: &str, host: &Path) -> Result<(), Failure> {
    let target = resolve_target(root, Path::new(at), false)?;
    mount_on(Some(&cpath(host)), &target, None, libc::MS_BIND, None)
        .map_err(|e| Failure::launcher(format!("cannot bind {} to {at}: {e}", host.display())))
}

/// A devpts instance of the container's own. The tty group is given only
/// where gid 5 exists (not under a single-id user namespace mapping).
fn mount_devpts(root: BorrowedFd<'_>) -> Result<(), Failure> {
    let flags = libc::MS_NOSUID | libc::MS_NOEXEC;
    mount_fs(
        root,
        "/dev/pts",
        c"devpts",
        flags,
        c"newinstance,ptmxmode=0666,mode=0620,gid=5",
    )
    .or_else(|_| {
        mount_fs(
            root,
            "/dev/pts",
            c"devpts",
            flags,
            c"newinstance,ptmxmode=0666,mode=0620",
        )
    })
    .map(drop)
}

/// A fresh sysfs needs a network namespace of the container's own;
/// otherwise the host's is bound. Read-only either way.
pub fn mount_sys(root: BorrowedFd<'_>, net: Net) -> Result<(), Failure> {
    if net == Net::None {
        let flags = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        if mount_fs(root, "/sys", c"sysfs", flags, c"").is_ok() {
            return Ok(());
        }
    }
    // Not recursive: the host's cgroup mounts below /sys stay out.
    bind(
        root,
        Path::new("/sys"),
        Path::new("/sys"),
        true,
        true,
        false,
    )
}

/// Binds `source` on `at` in the container, read-only if asked. Mounts
/// below `source` come along only with `recursive`, or where a user
/// namespace forbids leaving them behind (they stay as the host has them).
pub fn bind(
    root: BorrowedFd<'_>,
    source: &Path,
    at: &Path,
    is_dir: bool,
    read_only: bool,
    recursive: bool,
) -> Result<(), Failure> {
    let failed = |e: std::io::Error| {
        Failure::launcher(format!(
            "cannot bind {} to {}: {e}",
            source.display(),
            at.display()
        ))
    };
    let target = resolve_target(root, at, is_dir)?;
    let src = cpath(source);
    let flat = if recursive {
        Err(std::io::Error::from_raw_os_error(libc::EINVAL))
    } else {
        mount_on(Some(&src), &target, None, libc::MS_BIND, None)
    };
    match flat {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => mount_on(
            Some(&src),
            &target,
            None,
            libc::MS_BIND | libc::MS_REC,
            None,
        )
        .map_err(failed)?,
        other => other.map_err(failed)?,
    }
    if !read_only {
        return Ok(());
    }
    // Resolved again: the old descriptor names what is under the new mount.
    let target = resolve_target(root, at, is_dir)?;
    let flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | locked_flags(source);
    mount_on(None, &target, None, flags, None).map_err(failed)
}

/// The flags of the mount holding `path` that a remount must keep: a user
/// namespace may not clear them.
fn locked_flags(path: &Path) -> libc::c_ulong {
    let Ok(st) = statvfs(path) else {
        return 0;
    };
    let pairs = [
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ];
    pairs
        .iter()
        .filter(|(st_flag, _)| st.flags().bits() & st_flag != 0)
        .fold(0, |acc, (_, ms)| acc | ms)
}

/// Makes the union the root and drops the old one, without leaving a
/// directory for it in the union.
pub fn pivot_into(root: &Path) -> Result<(), Failure> {
    chdir(root).map_err(|e| failed("cannot enter the container root", e))?;
    pivot_root(".", ".").map_err(|e| failed("pivot_root", e))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(|e| failed("cannot detach the old root", e))?;
    chdir("/").map_err(|e| failed("cannot enter the new root", e))
}
