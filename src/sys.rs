//! The layer-safe system calls the union is built on, over `nix`.
//!
//! Every access to a layer goes through a file descriptor and a single path
//! component with `O_NOFOLLOW`/`AT_SYMLINK_NOFOLLOW`, so a symlink inside a
//! layer is never followed by the daemon; the wrappers here fix those flags
//! (and `O_CLOEXEC`) so that no caller can forget them. Errors are `nix`'s
//! [`Errno`]. Raw calls stay only where `nix` has none: the xattr calls
//! (on `O_PATH` descriptors and the `*xattrat` family), `utimensat` with
//! `AT_EMPTY_PATH`, file handles and `statmount`.

use std::ffi::{CStr, CString, OsStr, OsString};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};

use nix::fcntl::{AT_FDCWD, AtFlags, OFlag, RenameFlags};
use nix::sys::stat::{FchmodatFlags, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, UnlinkatFlags};

pub use nix::errno::Errno;

pub type Result<T> = std::result::Result<T, Errno>;

/// `stat` as the kernel returns it.
pub type Stat = libc::stat;

/// The error number behind an I/O error (EIO if it has none).
pub fn errno_of(e: &std::io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

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

/// Retries a call interrupted by a signal (a FUSE lower can be).
pub fn retry<T>(mut f: impl FnMut() -> Result<T>) -> Result<T> {
    loop {
        match f() {
            Err(Errno::EINTR) => continue,
            other => return other,
        }
    }
}

pub fn cstr(name: &OsStr) -> Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| Errno::EINVAL)
}

/// The `/proc/self/fd/N` path of a descriptor, for the few calls that have no
/// fd-relative form. The magic link resolves to the very inode behind `fd`.
pub fn proc_path(fd: RawFd) -> CString {
    CString::new(format!("/proc/self/fd/{fd}")).expect("no NUL in a number")
}

/// Permission bits (and set-id, sticky) of a mode.
fn perm(mode: u32) -> Mode {
    Mode::from_bits_truncate(mode & 0o7777)
}

/// `openat` of one name in `dir`, always with `O_NOFOLLOW|O_CLOEXEC`.
fn open_name(dir: BorrowedFd<'_>, name: &OsStr, flags: OFlag, mode: u32) -> Result<OwnedFd> {
    let flags = flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    retry(|| nix::fcntl::openat(dir, name, flags, perm(mode)))
}

/// Open flags the caller passed, without the ones only the union may set.
fn caller_flags(flags: libc::c_int) -> OFlag {
    OFlag::from_bits_retain(flags) - (OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOCTTY)
}

/// `O_PATH|O_NOFOLLOW` handle on `name` inside `dir`.
pub fn open_path(dir: BorrowedFd<'_>, name: &OsStr) -> Result<OwnedFd> {
    open_name(dir, name, OFlag::O_PATH, 0)
}

/// Opens a directory given by an absolute or relative path (used only for
/// the layer roots named on the command line).
pub fn open_dir_path(path: &std::path::Path) -> Result<OwnedFd> {
    let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    nix::fcntl::open(path, flags, Mode::empty())
}

/// Opens a directory given by a path for reading (and locking); used only
/// for directories named on the command line.
pub fn open_dir(path: &std::path::Path) -> Result<OwnedFd> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    retry(|| nix::fcntl::open(path, flags, Mode::empty()))
}

/// Creates (or empties) the regular file `name` in `dir` for writing, with
/// `mode` if new; never through a symlink.
pub fn create_or_truncate(dir: BorrowedFd<'_>, name: &OsStr, mode: u32) -> Result<OwnedFd> {
    let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC;
    open_name(dir, name, flags, mode)
}

/// Opens `name` in `dir` for I/O with `flags`, never following a symlink.
pub fn open_at(dir: BorrowedFd<'_>, name: &OsStr, flags: libc::c_int) -> Result<OwnedFd> {
    open_name(dir, name, caller_flags(flags), 0)
}

/// Opens the object behind an `O_PATH` handle for I/O with `flags`.
///
/// The magic link `/proc/self/fd/N` leads to exactly the object held (it is
/// never resolved through a name), so a caller's `O_NOFOLLOW` is dropped: it
/// would refuse the magic link itself with `ELOOP`. The kernel has already
/// applied the caller's `O_NOFOLLOW` to the name the caller opened.
pub fn reopen(fd: BorrowedFd<'_>, flags: libc::c_int) -> Result<OwnedFd> {
    let p = proc_path(fd.as_raw_fd());
    let flags = (caller_flags(flags) - OFlag::O_NOFOLLOW) | OFlag::O_CLOEXEC;
    retry(|| nix::fcntl::open(p.as_c_str(), flags, Mode::empty()))
}

/// Creates and opens a regular file `name` in `dir` (`O_EXCL`).
pub fn create_file(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    flags: libc::c_int,
    mode: u32,
) -> Result<OwnedFd> {
    let flags = caller_flags(flags) | OFlag::O_CREAT | OFlag::O_EXCL;
    open_name(dir, name, flags, mode)
}

/// An anonymous regular file (`O_TMPFILE`, read-write) in directory `dir`:
/// it has no name until `link_fd_at` gives it one.
pub fn open_tmpfile(dir: BorrowedFd<'_>, mode: u32) -> Result<OwnedFd> {
    let flags = OFlag::O_TMPFILE | OFlag::O_RDWR | OFlag::O_CLOEXEC;
    retry(|| nix::fcntl::openat(dir, c".", flags, perm(mode)))
}

/// Gives the object behind `fd` (an anonymous file included) the name
/// `name` in `dir`; EEXIST if the name is taken. Through the descriptor's
/// `/proc` link, which `linkat` follows to the very inode, so that no
/// capability is needed (as `AT_EMPTY_PATH` would).
pub fn link_fd_at(fd: BorrowedFd<'_>, dir: BorrowedFd<'_>, name: &OsStr) -> Result<()> {
    let from = proc_path(fd.as_raw_fd());
    nix::unistd::linkat(
        AT_FDCWD,
        from.as_c_str(),
        dir,
        name,
        AtFlags::AT_SYMLINK_FOLLOW,
    )
}

pub fn stat_at(dir: BorrowedFd<'_>, name: &OsStr) -> Result<Stat> {
    nix::sys::stat::fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW)
}

/// `stat` of the object behind any descriptor, `O_PATH` ones included.
pub fn stat_fd(fd: BorrowedFd<'_>) -> Result<Stat> {
    let flags = AtFlags::AT_EMPTY_PATH | AtFlags::AT_SYMLINK_NOFOLLOW;
    nix::sys::stat::fstatat(fd, c"", flags)
}

pub fn mkdir_at(dir: BorrowedFd<'_>, name: &OsStr, mode: u32) -> Result<()> {
    nix::sys::stat::mkdirat(dir, name, perm(mode))
}

pub fn mknod_at(dir: BorrowedFd<'_>, name: &OsStr, mode: u32, rdev: u64) -> Result<()> {
    let kind = SFlag::from_bits_truncate(file_type(mode));
    nix::sys::stat::mknodat(dir, name, kind, perm(mode), rdev)
}

pub fn symlink_at(target: &OsStr, dir: BorrowedFd<'_>, name: &OsStr) -> Result<()> {
    nix::unistd::symlinkat(target, dir, name)
}

/// Makes `new` in `new_dir` a new hard link to `old` in `old_dir` (not
/// followed).
pub fn link_at(
    old_dir: BorrowedFd<'_>,
    old: &OsStr,
    new_dir: BorrowedFd<'_>,
    new: &OsStr,
) -> Result<()> {
    nix::unistd::linkat(old_dir, old, new_dir, new, AtFlags::empty())
}

/// Makes `name` in `dir` a new hard link to the object behind `fd`.
pub fn link_fd(fd: BorrowedFd<'_>, dir: BorrowedFd<'_>, name: &OsStr) -> Result<()> {
    match nix::unistd::linkat(fd, c"", dir, name, AtFlags::AT_EMPTY_PATH) {
        // Without CAP_DAC_READ_SEARCH AT_EMPTY_PATH is refused; the proc link works.
        Err(_) => link_fd_at(fd, dir, name),
        ok => ok,
    }
}

pub fn unlink_at(dir: BorrowedFd<'_>, name: &OsStr, is_dir: bool) -> Result<()> {
    let flags = match is_dir {
        true => UnlinkatFlags::RemoveDir,
        false => UnlinkatFlags::NoRemoveDir,
    };
    nix::unistd::unlinkat(dir, name, flags)
}

pub fn rename_at(
    old_dir: BorrowedFd<'_>,
    old: &OsStr,
    new_dir: BorrowedFd<'_>,
    new: &OsStr,
    flags: u32,
) -> Result<()> {
    let flags = RenameFlags::from_bits_retain(flags);
    nix::fcntl::renameat2(old_dir, old, new_dir, new, flags)
}

pub fn readlink_fd(fd: BorrowedFd<'_>) -> Result<Vec<u8>> {
    nix::fcntl::readlinkat(fd, c"").map(OsString::into_vec)
}

pub fn chown_fd(fd: BorrowedFd<'_>, uid: Option<u32>, gid: Option<u32>) -> Result<()> {
    let flags = AtFlags::AT_EMPTY_PATH | AtFlags::AT_SYMLINK_NOFOLLOW;
    let (uid, gid) = (uid.map(Uid::from_raw), gid.map(Gid::from_raw));
    nix::unistd::fchownat(fd, c"", uid, gid, flags)
}

/// chown of `name` in `dir`, not following a symlink.
pub fn chown_at(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    uid: Option<u32>,
    gid: Option<u32>,
) -> Result<()> {
    let (uid, gid) = (uid.map(Uid::from_raw), gid.map(Gid::from_raw));
    nix::unistd::fchownat(dir, name, uid, gid, AtFlags::AT_SYMLINK_NOFOLLOW)
}

/// chmod of `name` in `dir`, never following a symlink (one gets
/// EOPNOTSUPP: a symlink has no mode of its own on Linux).
pub fn chmod_at(dir: BorrowedFd<'_>, name: &OsStr, mode: u32) -> Result<()> {
    nix::sys::stat::fchmodat(dir, name, perm(mode), FchmodatFlags::NoFollowSymlink)
}

/// Times of `name` in `dir`, not following a symlink.
pub fn set_times_at(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    atime: SetTime,
    mtime: SetTime,
) -> Result<()> {
    let (a, m) = (atime.timespec(), mtime.timespec());
    nix::sys::stat::utimensat(dir, name, &a, &m, UtimensatFlags::NoFollowSymlink)
}

/// chmod of the object behind an `O_PATH` handle (not for symlinks).
pub fn chmod_fd(fd: BorrowedFd<'_>, mode: u32) -> Result<()> {
    let p = proc_path(fd.as_raw_fd());
    nix::sys::stat::fchmodat(
        AT_FDCWD,
        p.as_c_str(),
        perm(mode),
        FchmodatFlags::FollowSymlink,
    )
}

/// A timestamp to set: a value, "now" or "leave as is".
#[derive(Clone, Copy, Debug)]
pub enum SetTime {
    Omit,
    Now,
    At(libc::timespec),
}

impl SetTime {
    fn timespec(self) -> TimeSpec {
        match self {
            SetTime::Omit => TimeSpec::UTIME_OMIT,
            SetTime::Now => TimeSpec::UTIME_NOW,
            SetTime::At(ts) => TimeSpec::from(ts),
        }
    }
}

/// Times of the object behind any descriptor (`O_PATH` ones and symlinks
/// included). Raw: `nix`'s `utimensat` cannot pass `AT_EMPTY_PATH`.
pub fn set_times_fd(fd: BorrowedFd<'_>, atime: SetTime, mtime: SetTime) -> Result<()> {
    let times = [*atime.timespec().as_ref(), *mtime.timespec().as_ref()];
    // SAFETY: the empty C string, a live array of two timespecs, an open descriptor.
    check(unsafe {
        libc::utimensat(
            fd.as_raw_fd(),
            c"".as_ptr(),
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

/// One directory entry.
#[derive(Clone, Debug)]
pub struct RawDirEntry {
    pub name: OsString,
    pub ino: u64,
    /// `DT_*` as `getdents64` gives it (`DT_UNKNOWN` if the filesystem
    /// does not say).
    pub dtype: u8,
}

/// Reads every entry (but `.` and `..`) of the directory behind `dir`.
pub fn read_dir(dir: BorrowedFd<'_>) -> Result<Vec<RawDirEntry>> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    let fd = retry(|| nix::fcntl::openat(dir, c".", flags, Mode::empty()))?;
    let mut entries = nix::dir::Dir::from_fd(fd)?;
    let mut out = Vec::new();
    for e in entries.iter() {
        let e = e?;
        let name = e.file_name().to_bytes();
        if name != b"." && name != b".." {
            out.push(RawDirEntry {
                name: OsStr::from_bytes(name).to_os_string(),
                ino: e.ino(),
                dtype: e.file_type().map_or(libc::DT_UNKNOWN, dtype),
            });
        }
    }
    Ok(out)
}

/// The `DT_*` number of a directory entry's type.
fn dtype(kind: nix::dir::Type) -> u8 {
    use nix::dir::Type;
    match kind {
        Type::Fifo => libc::DT_FIFO,
        Type::CharacterDevice => libc::DT_CHR,
        Type::Directory => libc::DT_DIR,
        Type::BlockDevice => libc::DT_BLK,
        Type::File => libc::DT_REG,
        Type::Symlink => libc::DT_LNK,
        Type::Socket => libc::DT_SOCK,
    }
}

/// `fsync`, or `fdatasync` when only the data must reach the disk.
pub fn fsync(fd: BorrowedFd<'_>, data_only: bool) -> Result<()> {
    match data_only {
        true => nix::unistd::fdatasync(fd),
        false => nix::unistd::fsync(fd),
    }
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
