//! The on-disk format shared with kernel overlayfs: whiteouts, opaque
//! directories and the overlay-private xattr names.
//!
//! Written: whiteout = character device 0/0; opaque = `trusted.overlay.opaque=y`
//! (`user.overlay.opaque=y` when trusted xattrs are refused).
//! Read as well: the OCI/AUFS `.wh.NAME` and `.wh..wh..opq` files, and the
//! kernel's xattr whiteouts (a zero-size file with `overlay.whiteout` inside a
//! directory whose `overlay.opaque` is `x`).

use std::ffi::{OsStr, OsString};
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::OsStrExt;

use crate::sys::{self, Errno, Result, Stat};

/// Prefix of the OCI/AUFS whiteout files.
pub const AUFS_WHITEOUT_PREFIX: &[u8] = b".wh.";
/// The OCI/AUFS opaque marker file.
pub const AUFS_OPAQUE: &str = ".wh..wh..opq";

/// Which xattr namespace carries the overlay markers we write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XattrNamespace {
    Trusted,
    User,
}

impl XattrNamespace {
    pub fn opaque(self) -> &'static str {
        match self {
            XattrNamespace::Trusted => "trusted.overlay.opaque",
            XattrNamespace::User => "user.overlay.opaque",
        }
    }
}

const OPAQUE_NAMES: [&str; 2] = ["trusted.overlay.opaque", "user.overlay.opaque"];
const WHITEOUT_NAMES: [&str; 2] = ["trusted.overlay.whiteout", "user.overlay.whiteout"];

/// True for names in the overlay-private xattr namespaces, which the union
/// hides from and refuses to its users.
pub fn is_private_xattr(name: &OsStr) -> bool {
    let b = name.as_bytes();
    b.starts_with(b"trusted.overlay.") || b.starts_with(b"user.overlay.")
}

/// A character device 0/0.
pub fn is_whiteout_dev(st: &Stat) -> bool {
    sys::file_type(st.st_mode) == libc::S_IFCHR && st.st_rdev == 0
}

/// True for a name that is an OCI/AUFS marker and never shown.
pub fn is_aufs_marker(name: &OsStr) -> bool {
    name.as_bytes().starts_with(AUFS_WHITEOUT_PREFIX)
}

/// `.wh.NAME` for `NAME`.
pub fn aufs_whiteout_name(name: &OsStr) -> OsString {
    let mut v = AUFS_WHITEOUT_PREFIX.to_vec();
    v.extend_from_slice(name.as_bytes());
    std::os::unix::ffi::OsStringExt::from_vec(v)
}

/// What the opaque marker of a directory says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opacity {
    /// Lower directories merge in.
    Transparent,
    /// Lower directories are hidden (`overlay.opaque=y` or `.wh..wh..opq`).
    Opaque,
    /// Not opaque, but holds xattr whiteouts (`overlay.opaque=x`).
    HasXattrWhiteouts,
}

/// Reads the opaque marker of the directory behind `dir`.
pub fn dir_opacity(dir: BorrowedFd<'_>, check_aufs: bool) -> Opacity {
    for name in OPAQUE_NAMES {
        match sys::get_xattr(dir, OsStr::new(name)) {
            Ok(v) if v == b"y" => return Opacity::Opaque,
            Ok(v) if v == b"x" => return Opacity::HasXattrWhiteouts,
            _ => {}
        }
    }
    if check_aufs && sys::stat_at(dir, OsStr::new(AUFS_OPAQUE)).is_ok() {
        return Opacity::Opaque;
    }
    Opacity::Transparent
}

/// True when the regular file `st` (behind `fd`) is a kernel xattr whiteout.
pub fn is_xattr_whiteout(fd: BorrowedFd<'_>, st: &Stat) -> bool {
    sys::file_type(st.st_mode) == libc::S_IFREG
        && st.st_size == 0
        && WHITEOUT_NAMES
            .iter()
            .any(|n| sys::get_xattr(fd, OsStr::new(n)).is_ok())
}

/// Marks an upper directory opaque.
pub fn set_opaque(dir: BorrowedFd<'_>, ns: XattrNamespace) -> Result<()> {
    sys::set_xattr(dir, OsStr::new(ns.opaque()), b"y", 0)
}

/// Creates a whiteout `name` in `dir`.
pub fn make_whiteout(dir: BorrowedFd<'_>, name: &OsStr) -> Result<()> {
    sys::mknod_at(dir, name, libc::S_IFCHR, 0)
}

/// Picks the namespace for the markers: trusted when this process may set
/// trusted xattrs on the upper filesystem (probed on `probe_dir`), else user.
pub fn probe_namespace(probe_dir: BorrowedFd<'_>) -> XattrNamespace {
    let name = OsStr::new("trusted.overlay.unionfs-probe");
    match sys::set_xattr(probe_dir, name, b"1", 0) {
        Ok(()) => {
            let _ = sys::remove_xattr(probe_dir, name);
            XattrNamespace::Trusted
        }
        Err(Errno(_)) => XattrNamespace::User,
    }
}
