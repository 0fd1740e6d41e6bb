//! Thin, safe wrappers over the fd-relative system calls the union is built on.
//!
//! Every access to a layer goes through a file descriptor and a single path
//! component with `O_NOFOLLOW`/`AT_SYMLINK_NOFOLLOW`, so a symlink inside a
//! layer is never followed by the daemon. Errors come back as [`Errno`].

use std::ffi::{CStr, CString, OsStr, OsString};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};

/// An error number from a failed system call (or one the union decides on).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    pub const ENOENT: Errno = Errno(libc::ENOENT);
    pub const EEXIST: Errno = Errno(libc::EEXIST);
    pub const ENOTEMPTY: Errno = Errno(libc::ENOTEMPTY);
    pub const EXDEV: Errno = Errno(libc::EXDEV);
    pub const EPERM: Errno = Errno(libc::EPERM);
    pub const EINVAL: Errno = Errno(libc::EINVAL);
    pub const EIO: Errno = Errno(libc::EIO);
    pub const EBADF: Errno = Errno(libc::EBADF);
    pub const ENODATA: Errno = Errno(libc::ENODATA);
    pub const ERANGE: Errno = Errno(libc::ERANGE);
    pub const ENOTDIR: Errno = Errno(libc::ENOTDIR);
    pub const EISDIR: Errno = Errno(libc::EISDIR);
    pub const ENAMETOOLONG: Errno = Errno(libc::ENAMETOOLONG);
    pub const ENOTSUP: Errno = Errno(libc::EOPNOTSUPP);
    pub const EROFS: Errno = Errno(libc::EROFS);
    pub const EACCES: Errno = Errno(libc::EACCES);
    pub const ENOSYS: Errno = Errno(libc::ENOSYS);

    /// The calling thread's `errno`.
    pub fn last() -> Errno {
        Errno(
            std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO),
        )
    }
}

impl From<std::io::Error> for Errno {
    fn from(e: std::io::Error) -> Self {
        Errno(e.raw_os_error().unwrap_or(libc::EIO))
    }
}

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", std::io::Error::from_raw_os_error(self.0))
    }
}

pub type Result<T> = std::result::Result<T, Errno>;

/// `stat` as the kernel returns it.
pub type Stat = libc::stat;

fn check(ret: libc::c_int) -> Result<libc::c_int> {
    if ret < 0 { Err(Errno::last()) } else { Ok(ret) }
}

fn check_size(ret: isize) -> Result<usize> {
    if ret < 0 {
        Err(Errno::last())
    } else {
        Ok(ret as usize)
    }
}

/// Retries a call interrupted by a signal.
fn retry<T>(mut f: impl FnMut() -> Result<T>) -> Result<T> {
    loop {
        match f() {
            Err(Errno(libc::EINTR)) => continue,
            other => return other,
        }
    }
}

pub fn cstr(name: &OsStr) -> Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| Errno::EINVAL)
}

const EMPTY: &CStr = c"";

/// The `/proc/self/fd/N` path of a descriptor, for the few calls that have no
/// fd-relative form. The magic link resolves to the very inode behind `fd`.
pub fn proc_path(fd: RawFd) -> CString {
    CString::new(format!("/proc/self/fd/{fd}")).expect("no NUL in a number")
}

/// `O_PATH|O_NOFOLLOW` handle on `name` inside `dir`.
pub fn open_path(dir: BorrowedFd<'_>, name: &OsStr) -> Result<OwnedFd> {
    let name = cstr(name)?;
    let fd = retry(|| {
        // SAFETY: C strings, live buffers of the length passed, open descriptors.
        check(unsafe {
            libc::openat(
                dir.as_raw_fd(),
                name.as_ptr(),
                libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        })
    })?;
    // SAFETY: a descriptor just returned to this call, owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens a directory given by an absolute or relative path (used only for
/// the layer roots named on the command line).
pub fn open_dir_path(path: &std::path::Path) -> Result<OwnedFd> {
    let p = cstr(path.as_os_str())?;
    // SAFETY: C strings, live buffers of the length passed, open descriptors.
    let fd = check(unsafe {
        libc::open(
            p.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: a descriptor just returned to this call, owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens a directory given by a path for reading (and locking); used only
/// for directories named on the command line.
pub fn open_dir(path: &std::path::Path) -> Result<OwnedFd> {
    let p = cstr(path.as_os_str())?;
    let fd = retry(|| {
        // SAFETY: C strings, live buffers of the length passed, open descriptors.
        check(unsafe {
            libc::open(
                p.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        })
    })?;
    // SAFETY: a descriptor just returned to this call, owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Creates (or empties) the regular file `name` in `dir` for writing, with
/// `mode` if new; never through a symlink.
pub fn create_or_truncate(dir: BorrowedFd<'_>, name: &OsStr, mode: u32) -> Result<OwnedFd> {
    let name = cstr(name)?;
    let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    let fd = retry(|| {
        // SAFETY: C strings, live buffers of the length passed, open descriptors.
        check(unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags, mode as libc::c_uint) })
    })?;
    // SAFETY: a descriptor just returned to this call, owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens `name` in `dir` for I/O with `flags`, never following a symlink.
pub fn open_at(dir: BorrowedFd<'_>, name: &OsStr, flags: libc::c_int) -> Result<OwnedFd> {
    let name = cstr(name)?;
    let flags = (flags | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        & !(libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY);
    // SAFETY: C strings, live buffers of the length passed, open descriptors.
    let fd = retry(|| check(unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags) }))?;
    // SAFETY: a descriptor just returned to this call, owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens the object behind an `O_PATH` handle for I/O with `flags`.
///
/// The magic link `/proc/self/fd/N` leads to exactly the object held (it is
/// never resolved through a name), so a caller's `O_NOFOLLOW` is dropped: it
/// would refuse the magic link itself with `ELOOP`. The kernel has already
/// applied the caller's `O_NOFOLLOW` to the name the caller opened.
pub fn reopen(fd: BorrowedFd<'_>, flags: libc::c_int) -> Result<OwnedFd> {
    let p = proc_path(fd.as_raw_fd());
    let flags = (flags | libc::O_CLOEXEC)
        & !(libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY | libc::O_NOFOLLOW);
    // SAFETY: C strings, live buffers of the length passed, open descriptors.
    let fd = retry(|| check(unsafe { libc::open(p.as_ptr(), flags) }))?;
    // SAFETY: a descriptor just returned to this call, owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Creates and opens a regular file `name` in `dir` (`O_EXCL`).
pub fn create_file(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    flags: libc::c_int,
    mode: u32,
) -> Result<OwnedFd> {
    let name = cstr(name)?;
    let flags = (flags | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        & !libc::O_NOCTTY;
    let fd = retry(|| {
        // SAFETY: C strings, live buffers of the length passed, open descriptors.
        check(unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags, mode as libc::c_uint) })
    })?;
    // SAFETY: a descriptor just returned to this call, owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An anonymous regular file (`O_TMPFILE`, read-write) in directory `dir`:
/// it has no name until `link_fd_at` gives it one.
pub fn open_tmpfile(dir: BorrowedFd<'_>, mode: u32) -> Result<OwnedFd> {
    let flags = libc::O_TMPFILE | libc::O_RDWR | libc::O_CLOEXEC;
    let fd = retry(|| {
        // SAFETY: C strings, live buffers of the length passed, open descriptors.
        check(unsafe { libc::openat(dir.as_raw_fd(), c".".as_ptr(), flags, mode as libc::c_uint) })
    })?;
    // SAFETY: a descriptor just returned to this call, owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Gives the object behind `fd` (an anonymous file included) the name
/// `name` in `dir`; EEXIST if the name is taken. Through the descriptor's
/// `/proc` link, which `linkat` follows to the very inode, so that no
/// capability is needed (as `AT_EMPTY_PATH` would).
pub fn link_fd_at(fd: BorrowedFd<'_>, dir: BorrowedFd<'_>, name: &OsStr) -> Result<()> {
    let from = proc_path(fd.as_raw_fd());
    let name = cstr(name)?;
    // SAFETY: C strings, live buffers of the length passed, open descriptors.
    check(unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            from.as_ptr(),
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    })
    .map(drop)
}

pub fn stat_at(dir: BorrowedFd<'_>, name: &OsStr) -> Result<Stat> {
    let name = cstr(name)?;
    // SAFETY: plain C data, for which all zeroes is a valid value.
    let mut st: Stat = unsafe { std::mem::zeroed() };
    // SAFETY: C strings, live buffers of the length passed, open descriptors.
    check(unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(st)
}

/// `stat` of the object behind any descriptor, `O_PATH` ones included.
pub fn stat_fd(fd: BorrowedFd<'_>) -> Result<Stat> {
    // SAFETY: plain C data, for which all zeroes is a valid value.
    let mut st: Stat = unsafe { std::mem::zeroed() };
    // SAFETY: C strings, live buffers of the length passed, open descriptors.
    check(unsafe {
        libc::fstatat(
            fd.as_raw_fd(),
            EMPTY.as_ptr(),
            &mut st,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(st)
}

pub fn mkdir_at(dir: BorrowedFd<'_>, name: &OsStr, mode: u32) -> Result<()> {
    let name = cstr(name)?;
    // SAFETY: C strings, live buffers of the length passed, open descriptors.
    check(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode) })?;
    Ok(())
}

pub fn mknod_at(dir: BorrowedFd<'_>, name: &OsStr, mode: u32, rdev: u64) -> Result<()> {
    let name = cstr(name)?;
    // SAFETY: C strings, live buffers of the length passed, open descriptors.
    check(unsafe { libc::mknodat(dir.as_raw_fd(), name.as_ptr(), mode, rdev) })?;
    Ok(())
}

pub fn symlink_at(target: &OsStr, dir: BorrowedFd<'_>, name: &OsStr) -> Result<()> {
    let target = cstr(target)?;
    let name = cstr(name)?;
    // SAFETY: C strings, live buffers of the length passed, open descriptors.
    check(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) })?;
    Ok(())
}

/// Makes `new` in `new_dir` a new hard link to `old` in `old_dir` (not
/// followed).
pub fn link_at(
    old_dir: BorrowedFd<'_>,
    old: &OsStr,
    new_dir: BorrowedFd<'_>,
    new: &OsStr,
) -> Result<()> {
    let old = cstr(old)?;
    let new = cstr(new)?;
    // SAFETY: C strings, live buffers of the length passed, open descriptors.
    check(unsafe {
        libc::linkat(
            old_dir.as_raw_fd(),
            old.as_ptr(),
            new_dir.as_raw_fd(),
            new.as_ptr(),
            0,
        )
    })?;
    Ok(())
}

/// Makes `name` in `dir` a new hard link to the object behind `fd`.
pub fn link_fd(fd: BorrowedFd<'_>, dir: BorrowedFd<'_>, name: &OsStr) -> Result<()> {
    let name = cstr(name)?;
    // SAFETY: C strings, live buffers of the length passed, open descriptors.
    let ret = unsafe {
        libc::linkat(
            fd.as_raw_fd(),
            EMPTY.as_ptr(),
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    };
    if ret == 0 {
        return Ok(());
    }
    // Without CAP_DAC_READ_SEARCH AT_EMPTY_PATH is refused; the proc link works.
    let p = proc_path(fd.as_raw_fd());
    // SAFETY: C strings, live buffers of the length passed, open descriptors.
    check(unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            p.as_ptr(),
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    })?;
    Ok(())
}

pub fn unlink_at(dir: BorrowedFd<'_>, name: &OsStr, is_dir: bool) -> Result<()> {
    let name = cstr(name)?;
    let flags = if is_dir { libc::AT_REMOVEDIR } else { 0 };
    // SAFETY: C strings, live buffers of the length passed, open descriptors.
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) })?;
    Ok(())
}

pub fn rename_at(
    old_dir: BorrowedFd<'_>,
    old: &OsStr,
    new_dir: BorrowedFd<'_>,
    new: &OsStr,
    flags: u32,
) -> Result<()> {
    let old = cstr(old)?;
    let new = cstr(new)?;
    // SAFETY: C strings, live buffers of the length passed, open descriptors.
    check(unsafe {
        libc::renameat2(
            old_dir.as_raw_fd(),
            old.as_ptr(),
            new_dir.as_raw_fd(),
            new.as_ptr(),
            flags,
        )
    })?;
    Ok(())
}

pub fn readlink_fd(fd: BorrowedFd<'_>) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: C strings, live buffers of the length passed, open descriptors.
    let n = check_size(unsafe {
        libc::readlinkat(
            fd.as_raw_fd(),
            EMPTY.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    })?;
    buf.truncate(n);
    Ok(buf)
}

pub fn chown_fd(fd: BorrowedFd<'_>, uid: Option<u32>, gid: Option<u32>) -> Result<()> {
    let uid = uid.unwrap_or(u32::MAX);
    let gid = gid.unwrap_or(u32::MAX);
    // SAFETY: C strings, live buffers of the length passed, open descriptors.
    check(unsafe {
        libc::fchownat(
            fd.as_raw_fd(),
            EMPTY.as_ptr(),
            uid,
            gid,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(())
}

/// chown of `name` in `dir`, not following a symlink.
pub fn chown_at(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    uid: Option<u32>,
    gid: Option<u32>,
) -> Result<()> {
    let name = cstr(name)?;
    let (uid, gid) = (uid.unwrap_or(u32::MAX), gid.unwrap_or(u32::MAX));
    // SAFETY: C strings, live buffers of the length passed, open descriptors.
    check(unsafe {
        libc::fchownat(
            dir.as_raw_fd(),
            name.as_ptr(),
            uid,
            gid,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

/// chmod of `name` in `dir`, never following a symlink (one gets
/// EOPNOTSUPP: a symlink has no mode of its own on Linux).
pub fn chmod_at(dir: BorrowedFd<'_>, name: &OsStr, mode: u32) -> Result<()> {
    let name = cstr(name)?;
    let nofollow = libc::AT_SYMLINK_NOFOLLOW;
    // SAFETY: C strings, live buffers of the length passed, open descriptors.
    check(unsafe { libc::fchmodat(dir.as_raw_fd(), name.as_ptr(), mode & 0o7777, nofollow) })
        .map(drop)
}

/// Times of `name` in `dir`, not following a symlink.
pub fn set_times_at(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    atime: SetTime,
    mtime: SetTime,
) -> Result<()> {
    let name = cstr(name)?;
    let times = [atime.timespec(), mtime.timespec()];
    // SAFETY: C strings, live buffers of the length passed, open descriptors.
    check(unsafe {
        libc::utimensat(
            dir.as_raw_fd(),
            name.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

/// chmod of the object behind an `O_PATH` handle (not for symlinks).
pub fn chmod_fd(fd: BorrowedFd<'_>, mode: u32) -> Result<()> {
    let p = proc_path(fd.as_raw_fd());
    // SAFETY: C strings, live buffers of the length passed, open descriptors.
    check(unsafe { libc::chmod(p.as_ptr(), mode & 0o7777) })?;
    Ok(())
}

/// A timestamp to set: a value, "now" or "leave as is".
#[derive(Clone, Copy, Debug)]
pub enum SetTime {
    Omit,
    Now,
    At(libc::timespec),
}

impl SetTime {
    fn timespec(self) -> libc::timespec {
        match self {
            SetTime::Omit => libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_OMIT,
            },
            SetTime::Now => libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_NOW,
            },
            SetTime::At(ts) => ts,
        }
    }
}

pub fn set_times_fd(fd: BorrowedFd<'_>, atime: SetTime, mtime: SetTime) -> Result<()> {
    let times = [atime.timespec(), mtime.timespec()];
    // SAFETY: C strings, live buffers of the length passed, open descriptors.
    check(unsafe {
        libc::utimensat(
            fd.as_raw_fd(),
            EMPTY.as_ptr(),
            times.as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(())
}

/// The access and modification times of a `stat`, ready to set again.
pub fn stat_times(st: &Stat) -> (SetTime, SetTime) {
    (
        SetTime::At(libc::timespec {
            tv_sec: st.st_atime,
            tv_nsec: st.st_atime_nsec,
        }),
        SetTime::At(libc::timespec {
            tv_sec: st.st_mtime,
            tv_nsec: st.st_mtime_nsec,
        }),
    )
}

// --- xattrs. On a name in a directory: the `*xattrat` calls of Linux 6.13
// (no path resolution beyond the name); on an older kernel, and on the object
// behind a descriptor (mostly `O_PATH`, which `*xattrat` refuses), the l* and
// plain calls on `/proc/self/fd/D/NAME` and `/proc/self/fd/N`: the magic link
// resolves to the very object held (a symlink included, not followed).

/// `setxattrat`, `getxattrat`, `listxattrat`, `removexattrat`: the same
/// numbers on every architecture (they came after the tables were unified).
const SYS_SETXATTRAT: libc::c_long = 463;
const SYS_GETXATTRAT: libc::c_long = 464;
const SYS_LISTXATTRAT: libc::c_long = 465;
const SYS_REMOVEXATTRAT: libc::c_long = 466;

/// Set once a `*xattrat` call says ENOSYS: the kernel predates them.
static NO_XATTRAT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// `struct xattr_args` of the `*xattrat` calls.
#[repr(C)]
struct XattrArgs {
    value: u64,
    size: u32,
    flags: u32,
}

/// Where an xattr call goes.
pub struct XattrTarget {
    /// `/proc/self/fd/N` or `/proc/self/fd/D/NAME`.
    path: CString,
    follow: bool,
    /// Directory and name, for the `*xattrat` calls.
    at: Option<(RawFd, CString)>,
}

impl XattrTarget {
    /// The object behind `fd`.
    pub fn fd(fd: BorrowedFd<'_>) -> XattrTarget {
        XattrTarget {
            path: proc_path(fd.as_raw_fd()),
            follow: true,
            at: None,
        }
    }

    /// The object `name` in directory `dir`, without opening it.
    pub fn at(dir: BorrowedFd<'_>, name: &OsStr) -> Result<XattrTarget> {
        let mut p = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
        p.extend_from_slice(name.as_bytes());
        Ok(XattrTarget {
            path: CString::new(p).map_err(|_| Errno::EINVAL)?,
            follow: false,
            // (An empty name, the directory itself, keeps the /proc path.)
            at: match name.is_empty() {
                true => None,
                false => Some((dir.as_raw_fd(), cstr(name)?)),
            },
        })
    }

    /// Runs `call` with the directory and name when the `*xattrat` calls
    /// serve this target; None to take the `/proc` path instead.
    fn try_at(&self, call: impl FnOnce(RawFd, &CStr) -> libc::c_long) -> Option<Result<usize>> {
        let (dir, name) = self.at.as_ref()?;
        if NO_XATTRAT.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        match check_size(call(*dir, name) as isize) {
            Err(Errno::ENOSYS) => {
                NO_XATTRAT.store(true, std::sync::atomic::Ordering::Relaxed);
                None
            }
            r => Some(r),
        }
    }

    fn get_raw(&self, name: &CStr, buf: &mut [u8]) -> Result<usize> {
        let mut args = XattrArgs {
            value: buf.as_mut_ptr() as u64,
            size: buf.len() as u32,
            flags: 0,
        };
        let args_ptr = &mut args as *mut XattrArgs;
        // SAFETY: C strings, live buffers of the length passed, open descriptors.
        let at = self.try_at(|dir, path| unsafe {
            libc::syscall(
                SYS_GETXATTRAT,
                dir,
                path.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
                name.as_ptr(),
                args_ptr,
                std::mem::size_of::<XattrArgs>(),
            )
        });
        if let Some(r) = at {
            return r;
        }
        let (p, n, b, l) = (
            self.path.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        );
        // SAFETY: C strings, live buffers of the length passed, open descriptors.
        check_size(unsafe {
            if self.follow {
                libc::getxattr(p, n, b, l)
            } else {
                libc::lgetxattr(p, n, b, l)
            }
        })
    }

    /// The value of xattr `name`.
    pub fn get(&self, name: &OsStr) -> Result<Vec<u8>> {
        let name = cstr(name)?;
        let mut buf = vec![0u8; 256];
        loop {
            match self.get_raw(&name, &mut buf) {
                Ok(n) => {
                    buf.truncate(n);
                    return Ok(buf);
                }
                Err(Errno::ERANGE) if buf.len() < (1 << 16) => {
                    let need = self.get_raw(&name, &mut [])?;
                    buf.resize(need.max(buf.len() * 2), 0);
                }
                Err(e) => return Err(e),
            }
        }
    }

    pub fn set(&self, name: &OsStr, value: &[u8], flags: i32) -> Result<()> {
        let name = cstr(name)?;
        let args = XattrArgs {
            value: value.as_ptr() as u64,
            size: value.len() as u32,
            flags: flags as u32,
        };
        let args_ptr = &args as *const XattrArgs;
        // SAFETY: C strings, live buffers of the length passed, open descriptors.
        let at = self.try_at(|dir, path| unsafe {
            libc::syscall(
                SYS_SETXATTRAT,
                dir,
                path.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
                name.as_ptr(),
                args_ptr,
                std::mem::size_of::<XattrArgs>(),
            )
        });
        if let Some(r) = at {
            return r.map(drop);
        }
        let (p, n, v, l) = (
            self.path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
        );
        // SAFETY: C strings, live buffers of the length passed, open descriptors.
        check(unsafe {
            if self.follow {
                libc::setxattr(p, n, v, l, flags)
            } else {
                libc::lsetxattr(p, n, v, l, flags)
            }
        })
        .map(drop)
    }

    fn list_raw(&self, buf: &mut [u8]) -> Result<usize> {
        let (b, l) = (buf.as_mut_ptr(), buf.len());
        // SAFETY: C strings, live buffers of the length passed, open descriptors.
        let at = self.try_at(|dir, path| unsafe {
            libc::syscall(
                SYS_LISTXATTRAT,
                dir,
                path.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
                b,
                l,
            )
        });
        if let Some(r) = at {
            return r;
        }
        let (p, b, l) = (self.path.as_ptr(), buf.as_mut_ptr().cast(), buf.len());
        // SAFETY: C strings, live buffers of the length passed, open descriptors.
        check_size(unsafe {
            if self.follow {
                libc::listxattr(p, b, l)
            } else {
                libc::llistxattr(p, b, l)
            }
        })
    }

    /// All xattr names of the object.
    pub fn list(&self) -> Result<Vec<OsString>> {
        let mut buf = vec![0u8; 1024];
        let n = loop {
            match self.list_raw(&mut buf) {
                Ok(n) => break n,
                Err(Errno::ERANGE) => {
                    let need = self.list_raw(&mut [])?;
                    buf.resize(need.max(buf.len() * 2), 0);
                }
                Err(e) => return Err(e),
            }
        };
        Ok(buf[..n]
            .split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| OsString::from_vec(s.to_vec()))
            .collect())
    }

    pub fn remove(&self, name: &OsStr) -> Result<()> {
        let name = cstr(name)?;
        // SAFETY: C strings, live buffers of the length passed, open descriptors.
        let at = self.try_at(|dir, path| unsafe {
            libc::syscall(
                SYS_REMOVEXATTRAT,
                dir,
                path.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
                name.as_ptr(),
            )
        });
        if let Some(r) = at {
            return r.map(drop);
        }
        let (p, n) = (self.path.as_ptr(), name.as_ptr());
        // SAFETY: C strings, live buffers of the length passed, open descriptors.
        check(unsafe {
            if self.follow {
                libc::removexattr(p, n)
            } else {
                libc::lremovexattr(p, n)
            }
        })
        .map(drop)
    }
}

/// The value of xattr `name` of the object behind `fd`.
pub fn get_xattr(fd: BorrowedFd<'_>, name: &OsStr) -> Result<Vec<u8>> {
    XattrTarget::fd(fd).get(name)
}

pub fn set_xattr(fd: BorrowedFd<'_>, name: &OsStr, value: &[u8], flags: i32) -> Result<()> {
    XattrTarget::fd(fd).set(name, value, flags)
}

/// All xattr names of the object behind `fd`.
pub fn list_xattr(fd: BorrowedFd<'_>) -> Result<Vec<OsString>> {
    XattrTarget::fd(fd).list()
}

pub fn remove_xattr(fd: BorrowedFd<'_>, name: &OsStr) -> Result<()> {
    XattrTarget::fd(fd).remove(name)
}

/// One entry as `getdents64` returns it.
#[derive(Clone, Debug)]
pub struct RawDirEntry {
    pub name: OsString,
    pub ino: u64,
    pub dtype: u8,
}

/// Reads every entry (but `.` and `..`) of the directory behind `dir`.
pub fn read_dir(dir: BorrowedFd<'_>) -> Result<Vec<RawDirEntry>> {
    let dot = c".";
    // SAFETY: C strings, live buffers of the length passed, open descriptors.
    let fd = check(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            dot.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: a descriptor just returned to this call, owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut out = Vec::new();
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        // SAFETY: a live buffer of buf.len() bytes, an open descriptor.
        let n = check_size(unsafe {
            libc::syscall(
                libc::SYS_getdents64,
                fd.as_raw_fd(),
                buf.as_mut_ptr(),
                buf.len(),
            ) as isize
        })?;
        if n == 0 {
            return Ok(out);
        }
        let mut pos = 0;
        while pos < n {
            // struct linux_dirent64 { u64 d_ino; i64 d_off; u16 d_reclen; u8 d_type; char d_name[]; }
            let rec = &buf[pos..n];
            let ino = u64::from_ne_bytes(rec[0..8].try_into().unwrap());
            let reclen = u16::from_ne_bytes(rec[16..18].try_into().unwrap()) as usize;
            let dtype = rec[18];
            let name_bytes = &rec[19..reclen];
            let len = name_bytes
                .iter()
                .position(|b| *b == 0)
                .unwrap_or(name_bytes.len());
            let name = &name_bytes[..len];
            if name != b"." && name != b".." {
                out.push(RawDirEntry {
                    name: OsStr::from_bytes(name).to_os_string(),
                    ino,
                    dtype,
                });
            }
            pos += reclen;
        }
    }
}

pub fn pread(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> Result<usize> {
    retry(|| {
        // SAFETY: C strings, live buffers of the length passed, open descriptors.
        check_size(unsafe {
            libc::pread(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                offset as libc::off_t,
            )
        })
    })
}

pub fn pwrite(fd: BorrowedFd<'_>, buf: &[u8], offset: u64) -> Result<usize> {
    retry(|| {
        // SAFETY: C strings, live buffers of the length passed, open descriptors.
        check_size(unsafe {
            libc::pwrite(
                fd.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                offset as libc::off_t,
            )
        })
    })
}

pub fn fsync(fd: BorrowedFd<'_>, data_only: bool) -> Result<()> {
    let r = if data_only {
        // SAFETY: C strings, live buffers of the length passed, open descriptors.
        unsafe { libc::fdatasync(fd.as_raw_fd()) }
    } else {
        // SAFETY: C strings, live buffers of the length passed, open descriptors.
        unsafe { libc::fsync(fd.as_raw_fd()) }
    };
    check(r).map(drop)
}

pub fn ftruncate(fd: BorrowedFd<'_>, size: u64) -> Result<()> {
    // SAFETY: C strings, live buffers of the length passed, open descriptors.
    check(unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) }).map(drop)
}

pub fn fallocate(fd: BorrowedFd<'_>, mode: i32, offset: u64, len: u64) -> Result<()> {
    // SAFETY: C strings, live buffers of the length passed, open descriptors.
    check(unsafe {
        libc::fallocate(
            fd.as_raw_fd(),
            mode,
            offset as libc::off_t,
            len as libc::off_t,
        )
    })
    .map(drop)
}

pub fn lseek(fd: BorrowedFd<'_>, offset: i64, whence: i32) -> Result<i64> {
    // SAFETY: C strings, live buffers of the length passed, open descriptors.
    let r = unsafe { libc::lseek(fd.as_raw_fd(), offset, whence) };
    if r < 0 { Err(Errno::last()) } else { Ok(r) }
}

pub fn copy_file_range(
    src: BorrowedFd<'_>,
    src_off: u64,
    dst: BorrowedFd<'_>,
    dst_off: u64,
    len: usize,
) -> Result<usize> {
    let mut so = src_off as libc::loff_t;
    let mut d = dst_off as libc::loff_t;
    retry(|| {
        // SAFETY: C strings, live buffers of the length passed, open descriptors.
        check_size(unsafe {
            libc::copy_file_range(src.as_raw_fd(), &mut so, dst.as_raw_fd(), &mut d, len, 0)
                as isize
        })
    })
}

pub fn statfs_fd(fd: BorrowedFd<'_>) -> Result<libc::statvfs> {
    // SAFETY: plain C data, for which all zeroes is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: C strings, live buffers of the length passed, open descriptors.
    check(unsafe { libc::fstatvfs(fd.as_raw_fd(), &mut st) })?;
    Ok(st)
}

/// File type bits of a mode.
pub fn file_type(mode: u32) -> u32 {
    mode & libc::S_IFMT
}

pub fn is_dir(st: &Stat) -> bool {
    file_type(st.st_mode) == libc::S_IFDIR
}

/// A file handle as `name_to_handle_at` gives it (`struct file_handle`).
#[repr(C)]
struct RawHandle {
    bytes: u32,
    kind: libc::c_int,
    data: [u8; MAX_HANDLE_SZ],
}

const MAX_HANDLE_SZ: usize = 128;

/// The kernel's file handle of the object behind `fd`: its type and bytes
/// (what overlayfs records as an origin). Fails with `EOPNOTSUPP` on a
/// filesystem that cannot encode one.
pub fn file_handle(fd: BorrowedFd<'_>) -> Result<(i32, Vec<u8>)> {
    let mut h = RawHandle {
        bytes: MAX_HANDLE_SZ as u32,
        kind: 0,
        data: [0; MAX_HANDLE_SZ],
    };
    let mut mount_id: libc::c_int = 0;
    // SAFETY: `h` is a file_handle whose `bytes` is the room in its data,
    // `mount_id` a live int, the path the empty C string.
    let r = unsafe {
        libc::syscall(
            libc::SYS_name_to_handle_at,
            fd.as_raw_fd(),
            c"".as_ptr(),
            &mut h as *mut RawHandle,
            &mut mount_id as *mut libc::c_int,
            libc::AT_EMPTY_PATH,
        )
    };
    check(r as libc::c_int)?;
    Ok((h.kind, h.data[..h.bytes as usize].to_vec()))
}

/// Opens (`O_PATH`) the object with file handle `kind`/`handle` on the
/// filesystem of `mount_fd`. Needs CAP_DAC_READ_SEARCH (`EPERM` without).
pub fn open_by_handle(mount_fd: BorrowedFd<'_>, kind: i32, handle: &[u8]) -> Result<OwnedFd> {
    if handle.len() > MAX_HANDLE_SZ {
        return Err(Errno::EINVAL);
    }
    let mut h = RawHandle {
        bytes: handle.len() as u32,
        kind,
        data: [0; MAX_HANDLE_SZ],
    };
    h.data[..handle.len()].copy_from_slice(handle);
    // SAFETY: `h` is a file_handle holding `bytes` bytes of handle.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            mount_fd.as_raw_fd(),
            &mut h as *mut RawHandle,
            libc::O_PATH | libc::O_CLOEXEC,
        )
    };
    let fd = check(fd as libc::c_int)?;
    // SAFETY: a descriptor just returned to this call, owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

const STATX_MNT_ID_UNIQUE: u32 = 0x4000;
const SYS_STATMOUNT: libc::c_long = 457;

/// The mount's 64-bit id, never reused while the system runs (Linux
/// 6.8+); `None` on older kernels. Cached attributes only
/// (`AT_STATX_DONT_SYNC`): a FUSE mount not yet served is not asked.
pub fn unique_mount_id(fd: BorrowedFd<'_>) -> Option<u64> {
    let mut st = std::mem::MaybeUninit::<libc::statx>::zeroed();
    let flags = libc::AT_EMPTY_PATH | libc::AT_STATX_DONT_SYNC;
    // SAFETY: C strings, live buffers of the length passed, open descriptors.
    let ret = unsafe {
        libc::statx(
            fd.as_raw_fd(),
            c"".as_ptr(),
            flags,
            STATX_MNT_ID_UNIQUE,
            st.as_mut_ptr(),
        )
    };
    // SAFETY: made zeroed (a valid value); statx only fills it in.
    let st = unsafe { st.assume_init() };
    (ret == 0 && st.stx_mask & STATX_MNT_ID_UNIQUE != 0).then_some(st.stx_mnt_id)
}

/// The first version of the kernel's `struct mnt_id_req`.
#[repr(C)]
struct MountIdRequest {
    size: u32,
    spare: u32,
    mnt_id: u64,
    param: u64,
}

/// Whether the mount with this unique id is in the caller's mount
/// namespace (`statmount`, Linux 6.8+): `ENOSYS` on older kernels.
pub fn mount_is_listed(unique_id: u64) -> Result<bool> {
    let req = MountIdRequest {
        size: std::mem::size_of::<MountIdRequest>() as u32,
        spare: 0,
        mnt_id: unique_id,
        param: 0,
    };
    // Room for `struct statmount`'s fixed part; nothing is asked for.
    let mut buf = [0u64; 64];
    // SAFETY: `req` is a mnt_id_req of the size it says, `buf` a live
    // buffer of the length passed.
    let ret = unsafe {
        libc::syscall(
            SYS_STATMOUNT,
            &req as *const MountIdRequest,
            buf.as_mut_ptr(),
            std::mem::size_of_val(&buf),
            0,
        )
    };
    match check_size(ret as isize) {
        Ok(_) => Ok(true),
        Err(Errno::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}
