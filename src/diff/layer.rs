//! The changeset as an OCI image layer: an uncompressed tar with `.wh.NAME`
//! for deletions and `.wh..wh..opq` in opaque directories, owners, modes,
//! times, device numbers, xattrs (not the overlay markers) and hard links;
//! the data of metadata-only copies from the lowers, and the other lower
//! names of copies the inode index keeps whole. A renamed directory (whose
//! `overlay.redirect` points into the lowers, which a layer cannot do) is
//! written as an opaque directory holding its whole merged content; its old
//! path is the whiteout the rename left.

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::merged::{MergedObj, MergedView};
use super::{Changeset, Entry, err};
use crate::overlay::format;
use crate::sys::{self, Stat};

/// Writes the changeset as an OCI image layer (an uncompressed tar). With
/// `dry_run`, every object is reached and opened but no data is read
/// (zeroes stand in for it): a check that the whole layer can be written,
/// before any of it goes where it cannot be taken back.
pub fn write_layer(set: &Changeset, to: impl Write, dry_run: bool) -> Result<(), String> {
    let mut tar = tar::Builder::new(to);
    tar.mode(tar::HeaderMode::Complete);
    let mut w = LayerWriter {
        set,
        tar: &mut tar,
        links: HashMap::new(),
        aliases: lower_aliases(set)?,
        dry_run,
    };
    w.directory(set.upper.as_fd(), Path::new(""))?;
    tar.into_inner()
        .and_then(|mut out| out.flush())
        .map_err(|e| format!("cannot write the tarball: {e}"))
}

struct LayerWriter<'a, W: Write> {
    set: &'a Changeset,
    tar: &'a mut tar::Builder<W>,
    /// The first name written of each hard-linked file: by (device, inode)
    /// for upper files, by (`MERGED_DEV`, inode shown) for lower files
    /// written as the content of a renamed directory.
    links: HashMap<(u64, u64), PathBuf>,
    /// Other lower names of the indexed copies in the upper.
    aliases: HashMap<PathBuf, Vec<PathBuf>>,
    dry_run: bool,
}

/// The device of the `links` keys of objects of the merged view.
const MERGED_DEV: u64 = u64::MAX;

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
        if format::is_whiteout_dev(st) {
            let marker = path.with_file_name(format::aufs_whiteout_name(&e.name));
            return self.marker(st, &marker);
        }
        let xattrs = self.xattrs(obj, path)?;
        let mut h = header(st);
        match sys::file_type(st.st_mode) {
            libc::S_IFDIR => {
                h.set_entry_type(tar::EntryType::Directory);
                if self.set.is_redirected(obj) {
                    return self.renamed_directory(obj, path, &mut h, &xattrs);
                }
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
        self.device(&mut h, st)?;
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
        if st.st_nlink > 1 && self.linked((st.st_dev, st.st_ino), h, path)? {
            return Ok(());
        }
        h.set_entry_type(tar::EntryType::Regular);
        let data = match format::is_metacopy(&sys::XattrTarget::fd(obj), self.set.ns) {
            true => self.metacopy_data(path)?,
            false => {
                sys::open_at(dir, &e.name, libc::O_RDONLY).map_err(|x| err(path.display(), x))?
            }
        };
        self.append_file(h, xattrs, path, data, st.st_size as u64)?;
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
    /// copied from, as the union of the upper over the lowers finds it
    /// (through its redirect, or its renamed parents').
    fn metacopy_data(&self, path: &Path) -> Result<OwnedFd, String> {
        let Some(merged) = &self.set.merged else {
            return Err(format!(
                "/{} is a metadata-only copy (metacopy=on): its data is in a lower layer; give the lowers with --lowers",
                path.display()
            ));
        };
        merged.data(&merged.lookup(path)?, path)
    }

    /// A renamed directory at `path`: an opaque directory (the layers below
    /// must not show what they have there) holding everything the union
    /// shows in it, taken from the upper where it has the object and from
    /// the lowers through the redirects where not.
    fn renamed_directory(
        &mut self,
        obj: BorrowedFd<'_>,
        path: &Path,
        h: &mut tar::Header,
        xattrs: &[(OsString, Vec<u8>)],
    ) -> Result<(), String> {
        let Some(merged) = &self.set.merged else {
            return Err(format!(
                "/{} is a renamed lower directory (overlay.redirect): part of what it holds is in the lower layers; give them with --lowers",
                path.display()
            ));
        };
        let shown = merged.lookup(path)?;
        self.append(h, xattrs, &dir_name(path), std::io::empty())?;
        let st = sys::stat_fd(obj).map_err(|x| err(path.display(), x))?;
        self.marker(&st, &path.join(format::AUFS_OPAQUE))?;
        self.merged_directory(merged, Some(obj), &shown, path)
    }

    /// The content of merged directory `dir` at `at`, whole: each entry
    /// from `upper` (the upper directory at `at`, if any) when it has the
    /// object, else from the merged view.
    fn merged_directory(
        &mut self,
        merged: &MergedView,
        upper: Option<BorrowedFd<'_>>,
        dir: &MergedObj,
        at: &Path,
    ) -> Result<(), String> {
        for (name, shown) in merged.children(dir, at)? {
            let path = at.join(&name);
            let in_upper = upper.and_then(|u| {
                let st = sys::stat_at(u, &name).ok()?;
                let obj = sys::open_path(u, &name).ok()?;
                Some((u, obj, st))
            });
            match in_upper {
                Some((u, obj, st)) if sys::is_dir(&st) => {
                    let xattrs = self.xattrs(obj.as_fd(), &path)?;
                    let mut h = header(&st);
                    h.set_entry_type(tar::EntryType::Directory);
                    self.append(&mut h, &xattrs, &dir_name(&path), std::io::empty())?;
                    let _ = u;
                    self.merged_directory(merged, Some(obj.as_fd()), &shown, &path)?;
                }
                Some((u, obj, st)) => {
                    self.entry(u, obj.as_fd(), &Entry { name, st }, &path)?;
                }
                None => self.merged_entry(merged, &shown, &path)?,
            }
        }
        Ok(())
    }

    /// An object of the merged view that the upper does not have (a lower
    /// one, under a renamed directory), written as the union shows it.
    fn merged_entry(
        &mut self,
        merged: &MergedView,
        obj: &MergedObj,
        path: &Path,
    ) -> Result<(), String> {
        let st = &obj.st;
        let xattrs = merged.xattrs(obj, path)?;
        let mut h = header(st);
        match sys::file_type(st.st_mode) {
            libc::S_IFDIR => {
                h.set_entry_type(tar::EntryType::Directory);
                self.append(&mut h, &xattrs, &dir_name(path), std::io::empty())?;
                return self.merged_directory(merged, None, obj, path);
            }
            libc::S_IFREG => {
                if st.st_nlink > 1 && self.linked((MERGED_DEV, st.st_ino), &mut h, path)? {
                    return Ok(());
                }
                h.set_entry_type(tar::EntryType::Regular);
                let data = merged.data(obj, path)?;
                return self.append_file(&mut h, &xattrs, path, data, st.st_size as u64);
            }
            libc::S_IFLNK => {
                let target = merged.readlink(obj, path)?;
                h.set_entry_type(tar::EntryType::Symlink);
                self.pax(&xattrs)?;
                return self
                    .tar
                    .append_link(&mut h, path, OsStr::from_bytes(&target))
                    .map_err(|x| format!("{}: {x}", path.display()));
            }
            libc::S_IFCHR => h.set_entry_type(tar::EntryType::Char),
            libc::S_IFBLK => h.set_entry_type(tar::EntryType::Block),
            libc::S_IFIFO => h.set_entry_type(tar::EntryType::Fifo),
            _ => {
                tracing::warn!(path = %path.display(), "a socket has no place in a layer tarball: left out");
                return Ok(());
            }
        }
        self.device(&mut h, st)?;
        self.append(&mut h, &xattrs, path, std::io::empty())
    }

    /// A hard link to the name already written of file `key`, if there is
    /// one (true: written); else `path` becomes that name.
    fn linked(
        &mut self,
        key: (u64, u64),
        h: &mut tar::Header,
        path: &Path,
    ) -> Result<bool, String> {
        let Some(first) = self.links.get(&key).cloned() else {
            self.links.insert(key, path.to_path_buf());
            return Ok(false);
        };
        h.set_entry_type(tar::EntryType::Link);
        h.set_size(0);
        self.tar
            .append_link(h, path, &first)
            .map_err(|x| format!("{}: {x}", path.display()))?;
        Ok(true)
    }

    /// A regular file's entry with `size` bytes of `data` (zeroes in a dry
    /// run: the descriptor was opened, which is the check).
    fn append_file(
        &mut self,
        h: &mut tar::Header,
        xattrs: &[(OsString, Vec<u8>)],
        path: &Path,
        data: OwnedFd,
        size: u64,
    ) -> Result<(), String> {
        if self.dry_run {
            return self.append(h, xattrs, path, std::io::repeat(0).take(size));
        }
        let file = std::fs::File::from(data);
        self.append(h, xattrs, path, file.take(size))
    }

    /// The device numbers of a device node.
    fn device(&mut self, h: &mut tar::Header, st: &Stat) -> Result<(), String> {
        let (major, minor) = (libc::major(st.st_rdev), libc::minor(st.st_rdev));
        h.set_device_major(major).map_err(|x| x.to_string())?;
        h.set_device_minor(minor).map_err(|x| x.to_string())
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
