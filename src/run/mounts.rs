//! The container's mounts, made inside its namespaces: /proc, a private
//! /dev, a read-only /sys, the binds, and `pivot_root` into the union.
//!
//! Every mount target is resolved inside the container's root with
//! `openat2(RESOLVE_IN_ROOT)`, so a symlink in an image (say `/proc ->
//! /etc`) can never place a mount outside it; the mount is then made on the
//! descriptor's `/proc/self/fd` path.

use std::ffi::{CStr, CString, OsStr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::request::Net;
use super::{Failure, cpath, os_err};
use crate::sys;

/// Host devices bound into the container's /dev.
const DEV_NODES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// Stops mount events from propagating to or from `path` and below.
pub fn make_rprivate(path: &str) -> std::io::Result<()> {
    let p = CString::new(path).expect("no NUL");
    let r = unsafe {
        libc::mount(
            std::ptr::null(),
            p.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn openat2_in_root(root: BorrowedFd<'_>, rel: &Path) -> sys::Result<OwnedFd> {
    let name = if rel.as_os_str().is_empty() {
        CString::new(".").expect("no NUL")
    } else {
        cpath(rel)
    };
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_PATH | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            name.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(sys::Errno::last());
    }
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
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
    let c = sys::cstr(name)?;
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c.as_ptr(),
            libc::O_CREAT | libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0o644,
        )
    };
    if fd < 0 {
        return Err(sys::Errno::last());
    }
    drop(unsafe { OwnedFd::from_raw_fd(fd) });
    Ok(())
}

fn mount_on(
    source: Option<&CStr>,
    target: &OwnedFd,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
    data: Option<&CStr>,
) -> std::io::Result<()> {
    let target = sys::proc_path(target.as_raw_fd());
    let opt = |c: Option<&CStr>| c.map_or(std::ptr::null(), |c| c.as_ptr());
    let r = unsafe {
        libc::mount(
            opt(source),
            target.as_ptr(),
            opt(fstype),
            flags,
            opt(data).cast(),
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
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
    if unsafe { libc::isatty(0) } == 1 {
        let tty = unsafe { CStr::from_ptr(libc::ttyname(0)) }.to_owned();
        let tty = PathBuf::from(OsStr::from_bytes(tty.to_bytes()));
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
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(cpath(path).as_ptr(), &mut st) } != 0 {
        return 0;
    }
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
        .filter(|(st_flag, _)| st.f_flag & st_flag != 0)
        .fold(0, |acc, (_, ms)| acc | ms)
}

/// Makes the union the root and drops the old one, without leaving a
/// directory for it in the union.
pub fn pivot_into(root: &Path) -> Result<(), Failure> {
    let dot = c".";
    unsafe {
        if libc::chdir(cpath(root).as_ptr()) != 0 {
            return Err(os_err("cannot enter the container root"));
        }
        if libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) != 0 {
            return Err(os_err("pivot_root"));
        }
        if libc::umount2(dot.as_ptr(), libc::MNT_DETACH) != 0 {
            return Err(os_err("cannot detach the old root"));
        }
        if libc::chdir(c"/".as_ptr()) != 0 {
            return Err(os_err("cannot enter the new root"));
        }
    }
    Ok(())
}
