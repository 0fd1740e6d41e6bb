//! The on-disk format shared with kernel overlayfs: whiteouts, opaque
//! directories and the overlay-private xattr names.
//!
//! Written: whiteout = character device 0/0; opaque = `trusted.overlay.opaque=y`
//! (`user.overlay.opaque=y` when trusted xattrs are refused).
//! Origin: `overlay.origin` on a copied-up directory or single-link file, the
//! lower object's file handle in the kernel's `ovl_fb` encoding (version 0,
//! magic 0xfb, length, flags, handle type, a null uuid as the kernel writes
//! without the index, the handle bytes); `overlay.impure=y` on an upper
//! directory holding such objects, so that listings look their numbers up.
//! With the index (see `index`): `overlay.nlink` (the union's link count,
//! `U+N`), `overlay.upper` on the index directory, and index entries named
//! by the hex of an origin. `overlay.redirect` on a moved directory (or
//! metadata-only copy): where its lower objects are. `overlay.metacopy` on a
//! regular file whose data is still the lower one's.
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

    pub fn origin(self) -> &'static str {
        match self {
            XattrNamespace::Trusted => "trusted.overlay.origin",
            XattrNamespace::User => "user.overlay.origin",
        }
    }

    pub fn impure(self) -> &'static str {
        match self {
            XattrNamespace::Trusted => "trusted.overlay.impure",
            XattrNamespace::User => "user.overlay.impure",
        }
    }

    /// The union's link count of an indexed file, relative to a real one.
    pub fn nlink(self) -> &'static str {
        match self {
            XattrNamespace::Trusted => "trusted.overlay.nlink",
            XattrNamespace::User => "user.overlay.nlink",
        }
    }

    /// On the index directory: the upper root it belongs to.
    pub fn upper(self) -> &'static str {
        match self {
            XattrNamespace::Trusted => "trusted.overlay.upper",
            XattrNamespace::User => "user.overlay.upper",
        }
    }

    /// Where a moved directory (or a metadata-only copy) finds its lower
    /// objects.
    pub fn redirect(self) -> &'static str {
        match self {
            XattrNamespace::Trusted => "trusted.overlay.redirect",
            XattrNamespace::User => "user.overlay.redirect",
        }
    }

    /// A metadata-only copy: the data is still the lower file's.
    pub fn metacopy(self) -> &'static str {
        match self {
            XattrNamespace::Trusted => "trusted.overlay.metacopy",
            XattrNamespace::User => "user.overlay.metacopy",
        }
    }
}

/// Where the lower objects of a name are looked for: a name in the parent's
/// lower directories, or (an absolute redirect) a path from the lower
/// layers' roots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LowerPath {
    Name(OsString),
    Absolute(Vec<OsString>),
}

impl LowerPath {
    /// Whether the path goes from the layers' roots.
    pub fn is_absolute(&self) -> bool {
        matches!(self, LowerPath::Absolute(_))
    }

    /// Reads an `overlay.redirect` value as the kernel checks it: an
    /// absolute path of non-empty components, or one name; `.` and `..`
    /// never (they would leave the layer). None if malformed.
    pub fn parse(v: &[u8]) -> Option<LowerPath> {
        let valid = |c: &[u8]| !c.is_empty() && c != b"." && c != b".." && !c.contains(&0);
        let os = |c: &[u8]| std::os::unix::ffi::OsStringExt::from_vec(c.to_vec());
        match v.strip_prefix(b"/") {
            Some(rest) => {
                let parts: Vec<&[u8]> = rest.split(|&b| b == b'/').collect();
                parts
                    .iter()
                    .all(|c| valid(c))
                    .then(|| LowerPath::Absolute(parts.into_iter().map(os).collect()))
            }
            None => (valid(v) && !v.contains(&b'/')).then(|| LowerPath::Name(os(v))),
        }
    }

    /// The `overlay.redirect` value.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            LowerPath::Name(n) => n.as_bytes().to_vec(),
            LowerPath::Absolute(parts) => parts.iter().fold(Vec::new(), |mut v, p| {
                v.push(b'/');
                v.extend_from_slice(p.as_bytes());
                v
            }),
        }
    }

    /// This path with its component `at` (counted from the end: 0 is the
    /// last) replaced by `redirect`, as the kernel rewrites the path it
    /// looks up when an element of it has a redirect of its own.
    pub fn redirected(&self, from_end: usize, redirect: &LowerPath) -> LowerPath {
        let parts = match self {
            LowerPath::Name(n) => vec![n.clone()],
            LowerPath::Absolute(p) => p.clone(),
        };
        let keep = parts.len() - 1 - from_end;
        let post = &parts[keep + 1..];
        match redirect {
            LowerPath::Absolute(r) => LowerPath::Absolute(r.iter().chain(post).cloned().collect()),
            LowerPath::Name(r) => match self {
                LowerPath::Name(_) => LowerPath::Name(r.clone()),
                LowerPath::Absolute(_) => LowerPath::Absolute(
                    parts[..keep]
                        .iter()
                        .chain(std::iter::once(r))
                        .chain(post)
                        .cloned()
                        .collect(),
                ),
            },
        }
    }
}

/// The redirect recorded on the object behind `obj`, in the union's
/// namespace only (a redirect reads past permission checks, so one that
/// users may set is never followed): Ok(None) without one, EINVAL when it
/// is malformed (as the kernel refuses it).
pub fn redirect_of(obj: &sys::XattrTarget, ns: XattrNamespace) -> Result<Option<LowerPath>> {
    match obj.get(OsStr::new(ns.redirect())) {
        Ok(v) => LowerPath::parse(&v).map(Some).ok_or(Errno::EINVAL),
        Err(_) => Ok(None),
    }
}

/// Records where a moved object's lower objects are.
pub fn set_redirect(obj: BorrowedFd<'_>, to: &LowerPath, ns: XattrNamespace) -> Result<()> {
    sys::set_xattr(obj, OsStr::new(ns.redirect()), &to.encode(), 0)
}

/// False when the object `st` cannot be a metadata-only copy, which is a
/// non-empty regular file. Its blocks tell nothing: the xattrs of a copy may
/// take a block, and a copy whose data was written in place keeps its mark
/// until the data is all there (a crash in between leaves it so).
pub fn may_be_metacopy(st: &Stat) -> bool {
    sys::file_type(st.st_mode) == libc::S_IFREG && st.st_size > 0
}

/// Marks the regular file behind `obj` a metadata-only copy (an empty
/// value, as the kernel writes without fs-verity).
pub fn set_metacopy(obj: BorrowedFd<'_>, ns: XattrNamespace) -> Result<()> {
    sys::set_xattr(obj, OsStr::new(ns.metacopy()), b"", 0)
}

/// Drops the metadata-only mark of `obj`.
pub fn clear_metacopy(obj: &sys::XattrTarget, ns: XattrNamespace) -> Result<()> {
    match obj.remove(OsStr::new(ns.metacopy())) {
        Ok(()) | Err(Errno::ENODATA) => Ok(()),
        Err(e) => Err(e),
    }
}

/// True when the regular file `obj` is a metadata-only copy (marked in
/// the union's namespace, as redirects).
pub fn is_metacopy(obj: &sys::XattrTarget, ns: XattrNamespace) -> bool {
    obj.get(OsStr::new(ns.metacopy())).is_ok()
}

/// `ovl_fb`: version, magic, length, flags, type, then the 16-byte uuid.
const FB_HEADER: usize = 5 + 16;
const FB_MAGIC: u8 = 0xfb;
/// `ovl_fb` flag of a handle of an upper object (`OVL_FH_FLAG_PATH_UPPER`).
pub const FB_FLAG_UPPER: u8 = 1 << 2;

/// A lower object's file handle, as an origin records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub kind: i32,
    pub handle: Vec<u8>,
}

impl Origin {
    /// The `overlay.origin` value, or None when the handle does not fit.
    pub fn encode(&self) -> Option<Vec<u8>> {
        self.encode_with_flags(0)
    }

    /// The encoding with the `ovl_fb` `flags` byte set.
    pub fn encode_with_flags(&self, flags: u8) -> Option<Vec<u8>> {
        let len = FB_HEADER + self.handle.len();
        let kind = u8::try_from(self.kind).ok()?;
        let mut v = vec![0, FB_MAGIC, u8::try_from(len).ok()?, flags, kind];
        v.extend_from_slice(&[0; 16]);
        v.extend_from_slice(&self.handle);
        Some(v)
    }

    /// Reads an `overlay.origin` value (any uuid; None if malformed).
    pub fn decode(v: &[u8]) -> Option<Origin> {
        if v.len() <= FB_HEADER || v[0] != 0 || v[1] != FB_MAGIC || v[2] as usize != v.len() {
            return None;
        }
        Some(Origin {
            kind: v[4] as i32,
            handle: v[FB_HEADER..].to_vec(),
        })
    }
}

/// The name of the index entry of a file with this origin: the encoded
/// origin in lower-case hex, as the kernel names it.
pub fn index_entry_name(origin: &Origin) -> Option<OsString> {
    let hex: String = origin
        .encode()?
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Some(OsString::from(hex))
}

/// How an `overlay.nlink` value gives the union's link count: relative to
/// the real upper inode's count (`U+N`, `U-N`, as this and recent kernels
/// write) or to the lower's (`L+N`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnionNlink {
    Upper(i64),
    Lower(i64),
}

impl UnionNlink {
    pub fn parse(v: &[u8]) -> Option<UnionNlink> {
        let s = std::str::from_utf8(v).ok()?;
        let (base, diff) = (s.get(..1)?, s.get(1..)?);
        if !diff.starts_with(['+', '-']) {
            return None;
        }
        let diff: i64 = diff.parse().ok()?;
        match base {
            "U" => Some(UnionNlink::Upper(diff)),
            "L" => Some(UnionNlink::Lower(diff)),
            _ => None,
        }
    }

    /// The value recording that the union count is `union` while the real
    /// upper inode has `real` links.
    pub fn upper_relative(union: u64, real: u64) -> Vec<u8> {
        format!("U{:+}", union as i64 - real as i64).into_bytes()
    }

    /// The union's count, from the real upper and lower counts; None when
    /// it would not be positive (an orphan, or a value gone wrong).
    pub fn count(self, real: u64, lower: Option<u64>) -> Option<u64> {
        let n = match self {
            UnionNlink::Upper(d) => real as i64 + d,
            UnionNlink::Lower(d) => lower? as i64 + d,
        };
        (n > 0).then_some(n as u64)
    }
}

/// The origin recorded on the object `name` in `dir` (not followed), if any.
pub fn origin_of(dir: BorrowedFd<'_>, name: &OsStr, ns: XattrNamespace) -> Option<Origin> {
    let target = sys::XattrTarget::at(dir, name).ok()?;
    Origin::decode(&target.get(OsStr::new(ns.origin())).ok()?)
}

/// Records `origin` on the object behind `obj`.
pub fn set_origin(obj: BorrowedFd<'_>, origin: &Origin, ns: XattrNamespace) -> Result<()> {
    let v = origin.encode().ok_or(Errno::EINVAL)?;
    sys::set_xattr(obj, OsStr::new(ns.origin()), &v, 0)
}

/// True when the upper directory `dir` is marked as holding objects with
/// origins.
pub fn is_impure(dir: BorrowedFd<'_>, ns: XattrNamespace) -> bool {
    sys::get_xattr(dir, OsStr::new(ns.impure())).is_ok_and(|v| v == b"y")
}

/// Marks the upper directory `dir` as holding objects with origins.
pub fn set_impure(dir: BorrowedFd<'_>, ns: XattrNamespace) -> Result<()> {
    sys::set_xattr(dir, OsStr::new(ns.impure()), b"y", 0)
}

const OPAQUE_NAMES: [&str; 2] = ["trusted.overlay.opaque", "user.overlay.opaque"];
const WHITEOUT_NAMES: [&str; 2] = ["trusted.overlay.whiteout", "user.overlay.whiteout"];

impl XattrNamespace {
    /// `trusted.overlay.` or `user.overlay.`: where the markers live.
    pub fn prefix(self) -> &'static str {
        match self {
            XattrNamespace::Trusted => "trusted.overlay.",
            XattrNamespace::User => "user.overlay.",
        }
    }
}

/// The name an xattr given through the mount is stored under. An
/// overlay-private name (of the union's own namespace) is escaped as the
/// kernel (6.7+) escapes it for nested overlays: `trusted.overlay.X` is
/// stored as `trusted.overlay.overlay.X`, so an overlay stacked on this one
/// keeps its markers apart from the union's. The other namespace's overlay
/// names are ordinary names here, as in the kernel.
pub fn stored_xattr_name(name: &OsStr, ns: XattrNamespace) -> Option<OsString> {
    let Some(rest) = name.as_bytes().strip_prefix(ns.prefix().as_bytes()) else {
        return Some(name.to_os_string());
    };
    let mut v = ns.prefix().as_bytes().to_vec();
    v.extend_from_slice(b"overlay.");
    v.extend_from_slice(rest);
    Some(std::os::unix::ffi::OsStringExt::from_vec(v))
}

/// The name a stored xattr is shown under through the mount: an escaped
/// name unescaped; None for the union's own markers (hidden).
pub fn shown_xattr_name(stored: &OsStr, ns: XattrNamespace) -> Option<OsString> {
    let Some(rest) = stored.as_bytes().strip_prefix(ns.prefix().as_bytes()) else {
        return Some(stored.to_os_string());
    };
    let rest = rest.strip_prefix(b"overlay.")?;
    let mut v = ns.prefix().as_bytes().to_vec();
    v.extend_from_slice(rest);
    Some(std::os::unix::ffi::OsStringExt::from_vec(v))
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

/// Reads the opaque marker of the upper directory behind `dir`: in the
/// union's namespace only, as the kernel reads it (the other namespace's
/// names are ordinary ones there, which a nested overlay may have set).
pub fn upper_dir_opacity(dir: BorrowedFd<'_>, ns: XattrNamespace) -> Opacity {
    match sys::get_xattr(dir, OsStr::new(ns.opaque())) {
        Ok(v) if v == b"y" => Opacity::Opaque,
        Ok(v) if v == b"x" => Opacity::HasXattrWhiteouts,
        _ => Opacity::Transparent,
    }
}

/// Reads the opaque marker of the lower directory behind `dir` (in
/// either namespace: layers written by rootless tools use `user.`).
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
        Err(_) => XattrNamespace::User,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_round_trip_in_the_kernels_encoding() {
        let o = Origin {
            kind: 1,
            handle: vec![0x41, 0xc1, 0x98, 0x00, 0x4a, 0x83, 0x10, 0xad],
        };
        let v = o.encode().unwrap();
        // As the kernel wrote it for an ext4 file on this kind of machine.
        let kernel = "00fb1d00010000000000000000000000000000000041c198004a8310ad";
        let hex: String = v.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, kernel);
        assert_eq!(Origin::decode(&v).as_ref(), Some(&o));
        assert_eq!(Origin::decode(&v[..v.len() - 1]), None);
        assert_eq!(Origin::decode(b"y"), None);
        assert_eq!(index_entry_name(&o).unwrap(), OsStr::new(kernel));
    }

    #[test]
    fn nested_overlay_names_are_escaped_as_the_kernel_escapes_them() {
        let t = XattrNamespace::Trusted;
        let stored = |n: &str| stored_xattr_name(OsStr::new(n), t);
        let shown = |n: &str| shown_xattr_name(OsStr::new(n), t);
        assert_eq!(stored("user.a").unwrap(), "user.a");
        assert_eq!(
            stored("trusted.overlay.opaque").unwrap(),
            "trusted.overlay.overlay.opaque"
        );
        assert_eq!(
            stored("trusted.overlay.overlay.x").unwrap(),
            "trusted.overlay.overlay.overlay.x"
        );
        // The other namespace's names are ordinary ones.
        assert_eq!(
            stored("user.overlay.opaque").unwrap(),
            "user.overlay.opaque"
        );
        assert_eq!(shown("user.overlay.opaque").unwrap(), "user.overlay.opaque");
        assert_eq!(
            shown("trusted.overlay.overlay.opaque").unwrap(),
            "trusted.overlay.opaque"
        );
        assert_eq!(shown("trusted.overlay.opaque"), None);
        assert_eq!(shown("trusted.overlay.origin"), None);
        assert_eq!(shown("security.selinux").unwrap(), "security.selinux");
        let u = XattrNamespace::User;
        assert_eq!(
            stored_xattr_name(OsStr::new("user.overlay.x"), u).unwrap(),
            "user.overlay.overlay.x"
        );
        assert_eq!(
            stored_xattr_name(OsStr::new("trusted.overlay.x"), u).unwrap(),
            "trusted.overlay.x"
        );
    }

    #[test]
    fn union_link_counts_read_and_write_as_the_kernels() {
        assert_eq!(UnionNlink::parse(b"U+1"), Some(UnionNlink::Upper(1)));
        assert_eq!(UnionNlink::parse(b"U-1"), Some(UnionNlink::Upper(-1)));
        assert_eq!(UnionNlink::parse(b"L+0"), Some(UnionNlink::Lower(0)));
        for bad in [&b"U1"[..], b"X+1", b"U+", b"", b"U+1x"] {
            assert_eq!(UnionNlink::parse(bad), None);
        }
        assert_eq!(UnionNlink::upper_relative(2, 3), b"U-1");
        assert_eq!(UnionNlink::upper_relative(3, 2), b"U+1");
        assert_eq!(UnionNlink::upper_relative(2, 2), b"U+0");
        assert_eq!(UnionNlink::Upper(-1).count(2, None), Some(1));
        assert_eq!(UnionNlink::Upper(-1).count(1, None), None);
        assert_eq!(UnionNlink::Lower(1).count(1, Some(3)), Some(4));
    }

    #[test]
    fn redirects_parse_and_rewrite_as_the_kernels() {
        let abs = |p: &[&str]| LowerPath::Absolute(p.iter().map(OsString::from).collect());
        let name = |n: &str| LowerPath::Name(n.into());
        assert_eq!(LowerPath::parse(b"a"), Some(name("a")));
        assert_eq!(LowerPath::parse(b"/a/b"), Some(abs(&["a", "b"])));
        for bad in [
            &b""[..],
            b"/",
            b"//a",
            b"/a/",
            b"a/b",
            b"..",
            b"/a/../b",
            b"/.",
        ] {
            assert_eq!(LowerPath::parse(bad), None, "{bad:?}");
        }
        assert_eq!(abs(&["a", "b"]).encode(), b"/a/b");
        assert_eq!(name("x").encode(), b"x");
        let p = abs(&["a", "b", "c"]);
        assert_eq!(p.redirected(1, &name("x")), abs(&["a", "x", "c"]));
        assert_eq!(
            p.redirected(2, &abs(&["y", "z"])),
            abs(&["y", "z", "b", "c"])
        );
        assert_eq!(p.redirected(0, &name("x")), abs(&["a", "b", "x"]));
        assert_eq!(name("a").redirected(0, &name("x")), name("x"));
        assert_eq!(name("a").redirected(0, &abs(&["q"])), abs(&["q"]));
    }
}
