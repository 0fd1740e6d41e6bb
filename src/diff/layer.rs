//! The changeset as an OCI image layer: an uncompressed tar with `.wh.NAME`
//! for deletions and `.wh..wh..opq` in opaque directories, owners, modes,
//! times, device numbers, xattrs (not the overlay markers) and hard links;
//! the data of metadata-only copies from the lowers, and the other lower
//! names of copies the inode index keeps whole.

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::{Changeset, Entry, err, lookup};
use crate::overlay::format::{self, LowerPath};
use crate::sys::{self, Stat};

/// Writes the changeset as an OCI image layer (an uncompressed tar).
pub fn write_layer(set: &Changeset, to: impl Write) -> Result<(), String> {
    let mut tar = tar::Builder::new(to);
    tar.mode(tar::HeaderMode::Complete);
    let mut w = LayerWriter {
        set,
        tar: &mut tar,
        links: HashMap::new(),
        aliases: lower_aliases(set)?,
    };
    w.directory(set.upper.as_fd(), Path::new(""))?;
    tar.finish()
        .map_err(|e| format!("cannot write the tarball: {e}"))
}

struct LayerWriter<'a, W: Write> {
    set: &'a Changeset,
    tar: &'a mut tar::Builder<W>,
    /// The first name written of each hard-linked file (device, inode).
    links: HashMap<(u64, u64), PathBuf>,
    /// Other lower names of the indexed copies in the upper.
    aliases: HashMap<PathBuf, Vec<PathBuf>>,
}

/// The names a union shows for the copies in the upper that keep a lower
/// hard link whole (the inode index: marked with `overlay.nlink`): for each
/// such copy, the other names of its lower file that the upper neither has
/// nor hides. The union shows them as the copy; a layer must link them to it.
fn lower_aliases(set: &Changeset) -> Result<HashMap<PathBuf, Vec<PathBuf>>, String> {
    let mut indexed = HashMap::new();
    if !set.lowers.is_empty() {
        collect_indexed(set, set.upper.as_fd(), Path::new(""), &mut indexed)?;
    }
    let mut aliases: HashMap<PathBuf, Vec<PathBuf>> = HashMap::new();
    if indexed.is_empty() {
        return Ok(aliases);
    }
    let mut seen = HashSet::new();
    for root in &set.lowers {
        let mut found = Vec::new();
        collect_names(root.as_fd(), Path::new(""), &indexed, &mut seen, &mut found)?;
        for (key, path) in found {
            let copy = &indexed[&key];
            if &path != copy && !set.upper_has_or_hides(&path) {
                aliases.entry(copy.clone()).or_default().push(path);
            }
        }
    }
    Ok(aliases)
}

/// Upper regular files marked as indexed, by the (device, inode) of the
/// lower file at the same path when that file has several names.
fn collect_indexed(
    set: &Changeset,
    dir: BorrowedFd<'_>,
    at: &Path,
    out: &mut HashMap<(u64, u64), PathBuf>,
) -> Result<(), String> {
    for e in Changeset::entries(dir, at)? {
        let path = at.join(&e.name);
        let obj = sys::open_path(dir, &e.name).map_err(|x| err(path.display(), x))?;
        if sys::is_dir(&e.st) {
            collect_indexed(set, obj.as_fd(), &path, out)?;
            continue;
        }
        let is_indexed = sys::file_type(e.st.st_mode) == libc::S_IFREG
            && sys::get_xattr(obj.as_fd(), OsStr::new(set.ns.nlink())).is_ok();
        if !is_indexed {
            continue;
        }
        let parts: Vec<&OsStr> = path.iter().collect();
        if let Some((_, st)) = set.in_lowers(&parts)
            && st.st_nlink > 1
        {
            out.insert((st.st_dev, st.st_ino), path);
        }
    }
    Ok(())
}

/// The names in a lower tree of the files in `wanted`; `seen` holds the
/// paths of the lowers above, which hide the same paths below.
fn collect_names(
    dir: BorrowedFd<'_>,
    at: &Path,
    wanted: &HashMap<(u64, u64), PathBuf>,
    seen: &mut HashSet<PathBuf>,
    out: &mut Vec<((u64, u64), PathBuf)>,
) -> Result<(), String> {
    for e in Changeset::entries(dir, at)? {
        let path = at.join(&e.name);
        let first = seen.insert(path.clone());
        if sys::is_dir(&e.st) {
            let sub = sys::open_path(dir, &e.name).map_err(|x| err(path.display(), x))?;
            collect_names(sub.as_fd(), &path, wanted, seen, out)?;
        } else if first && wanted.contains_key(&(e.st.st_dev, e.st.st_ino)) {
            out.push(((e.st.st_dev, e.st.st_ino), path));
        }
    }
    Ok(())
}

impl<W: Write> LayerWriter<'_, W> {
    fn directory(&mut self, dir: BorrowedFd<'_>, at: &Path) -> Result<(), String> {
        for e in Changeset::entries(dir, at)? {
            let path = at.join(&e.name);
            let obj = sys::open_path(dir, &e.name).map_err(|x| err(path.display(), x))?;
            self.entry(dir, obj.as_fd(), &e, &path)?;
        }
        Ok(())
    }

    fn entry(
        &mut self,
        dir: BorrowedFd<'_>,
        obj: BorrowedFd<'_>,
        e: &Entry,
        path: &Path,
    ) -> Result<(), String> {
        let st = &e.st;
        let ns = self.set.ns;
        if format::is_whiteout_dev(st) {
            let marker = path.with_file_name(format::aufs_whiteout_name(&e.name));
            return self.marker(st, &marker);
        }
        let xattrs = self.xattrs(obj, path)?;
        let mut h = header(st);
        match sys::file_type(st.st_mode) {
            libc::S_IFDIR => {
                if format::redirect_of(&sys::XattrTarget::fd(obj), ns)
                    .ok()
                    .flatten()
                    .is_some()
                {
                    return Err(format!(
                        "/{} is a renamed lower directory (overlay.redirect): its contents stay in a lower layer, which a layer tarball cannot point to; make the upper with redirect_dir=off to export it",
                        path.display()
                    ));
                }
                h.set_entry_type(tar::EntryType::Directory);
                self.append(&mut h, &xattrs, &dir_name(path), std::io::empty())?;
                if self.set.is_opaque(obj) {
                    self.marker(st, &path.join(format::AUFS_OPAQUE))?;
                }
                return self.directory(obj, path);
            }
            libc::S_IFREG => return self.regular(dir, obj, e, path, &mut h, &xattrs),
            libc::S_IFLNK => {
                let target = sys::readlink_fd(obj).map_err(|x| err(path.display(), x))?;
                h.set_entry_type(tar::EntryType::Symlink);
                self.pax(&xattrs)?;
                self.tar
                    .append_link(&mut h, path, OsStr::from_bytes(&target))
                    .map_err(|x| format!("{}: {x}", path.display()))?;
                return Ok(());
            }
            libc::S_IFCHR => h.set_entry_type(tar::EntryType::Char),
            libc::S_IFBLK => h.set_entry_type(tar::EntryType::Block),
            libc::S_IFIFO => h.set_entry_type(tar::EntryType::Fifo),
            _ => {
                tracing::warn!(path = %path.display(), "a socket has no place in a layer tarball: left out");
                return Ok(());
            }
        }
        let (major, minor) = (libc::major(st.st_rdev), libc::minor(st.st_rdev));
        h.set_device_major(major).map_err(|x| x.to_string())?;
        h.set_device_minor(minor).map_err(|x| x.to_string())?;
        self.append(&mut h, &xattrs, path, std::io::empty())
    }

    fn regular(
        &mut self,
        dir: BorrowedFd<'_>,
        obj: BorrowedFd<'_>,
        e: &Entry,
        path: &Path,
        h: &mut tar::Header,
        xattrs: &[(OsString, Vec<u8>)],
    ) -> Result<(), String> {
        let st = &e.st;
        if st.st_nlink > 1 {
            let key = (st.st_dev, st.st_ino);
            if let Some(first) = self.links.get(&key) {
                h.set_entry_type(tar::EntryType::Link);
                h.set_size(0);
                let first = first.clone();
                return self
                    .tar
                    .append_link(h, path, &first)
                    .map_err(|x| format!("{}: {x}", path.display()));
            }
            self.links.insert(key, path.to_path_buf());
        }
        h.set_entry_type(tar::EntryType::Regular);
        let data = match format::is_metacopy(&sys::XattrTarget::fd(obj), self.set.ns) {
            true => self.lower_data(obj, path)?,
            false => {
                sys::open_at(dir, &e.name, libc::O_RDONLY).map_err(|x| err(path.display(), x))?
            }
        };
        let file = std::fs::File::from(data);
        self.append(h, xattrs, path, file.take(st.st_size as u64))?;
        for alias in self.aliases.remove(path).unwrap_or_default() {
            let mut link = header(st);
            link.set_entry_type(tar::EntryType::Link);
            link.set_size(0);
            self.tar
                .append_link(&mut link, &alias, path)
                .map_err(|x| format!("{}: {x}", alias.display()))?;
        }
        Ok(())
    }

    /// The data of the metadata-only copy at `path`: the lower file it was
    /// copied from (at its redirect, or the same path).
    fn lower_data(&self, obj: BorrowedFd<'_>, path: &Path) -> Result<OwnedFd, String> {
        if self.set.lowers.is_empty() {
            return Err(format!(
                "/{} is a metadata-only copy (metacopy=on): its data is in a lower layer; give the lowers with --lowers",
                path.display()
            ));
        }
        let parts: Vec<OsString> = path.iter().map(OsStr::to_os_string).collect();
        let mut at = LowerPath::Absolute(parts);
        if let Ok(Some(r)) = format::redirect_of(&sys::XattrTarget::fd(obj), self.set.ns) {
            at = at.redirected(0, &r);
        }
        let LowerPath::Absolute(parts) = at else {
            unreachable!("an absolute path stays absolute")
        };
        let parts: Vec<&OsStr> = parts.iter().map(OsString::as_os_str).collect();
        for root in &self.set.lowers {
            let Some((found, st)) = lookup(root.as_fd(), &parts) else {
                continue;
            };
            let metacopy = format::is_metacopy(&sys::XattrTarget::fd(found.as_fd()), self.set.ns);
            if sys::file_type(st.st_mode) == libc::S_IFREG && !metacopy {
                return sys::reopen(found.as_fd(), libc::O_RDONLY)
                    .map_err(|x| err(path.display(), x));
            }
        }
        Err(format!(
            "/{}: the data of this metadata-only copy is in none of the lowers given",
            path.display()
        ))
    }

    /// The xattrs a layer keeps: all but the overlay markers of the
    /// namespace read (escaped names of a nested overlay shown unescaped).
    fn xattrs(&self, obj: BorrowedFd<'_>, path: &Path) -> Result<Vec<(OsString, Vec<u8>)>, String> {
        let names = match sys::list_xattr(obj) {
            Ok(n) => n,
            Err(sys::Errno::ENOTSUP) => return Ok(Vec::new()),
            Err(x) => return Err(err(path.display(), x)),
        };
        let mut out = Vec::new();
        for stored in names {
            let Some(shown) = format::shown_xattr_name(&stored, self.set.ns) else {
                continue;
            };
            if let Ok(v) = sys::get_xattr(obj, &stored) {
                out.push((shown, v));
            }
        }
        Ok(out)
    }

    /// An empty marker file (`.wh.NAME`, `.wh..wh..opq`) owned as `st`.
    fn marker(&mut self, st: &Stat, path: &Path) -> Result<(), String> {
        let mut h = header(st);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o600);
        h.set_size(0);
        self.append(&mut h, &[], path, std::io::empty())
    }

    fn pax(&mut self, xattrs: &[(OsString, Vec<u8>)]) -> Result<(), String> {
        if xattrs.is_empty() {
            return Ok(());
        }
        let records: Vec<(String, &[u8])> = xattrs
            .iter()
            .map(|(n, v)| {
                (
                    format!("SCHILY.xattr.{}", n.to_string_lossy()),
                    v.as_slice(),
                )
            })
            .collect();
        self.tar
            .append_pax_extensions(records.iter().map(|(k, v)| (k.as_str(), *v)))
            .map_err(|e| format!("cannot write the tarball: {e}"))
    }

    fn append(
        &mut self,
        h: &mut tar::Header,
        xattrs: &[(OsString, Vec<u8>)],
        path: &Path,
        data: impl Read,
    ) -> Result<(), String> {
        self.pax(xattrs)?;
        self.tar
            .append_data(h, path, data)
            .map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// A tar header with the owner, mode, size and time of `st`.
fn header(st: &Stat) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_mode(st.st_mode & 0o7777);
    h.set_uid(u64::from(st.st_uid));
    h.set_gid(u64::from(st.st_gid));
    h.set_mtime(st.st_mtime.max(0) as u64);
    h.set_size(match sys::file_type(st.st_mode) {
        libc::S_IFREG => st.st_size as u64,
        _ => 0,
    });
    h
}

/// A directory's name in a tarball (with the trailing slash tar gives it).
fn dir_name(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push("/");
    PathBuf::from(s)
}
