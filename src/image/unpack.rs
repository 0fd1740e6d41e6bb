//! Unpacking one layer's tar stream into a directory, never leaving it:
//! every name is resolved component by component from the directory's
//! descriptor without following symlinks, `..` is refused, hard links must
//! name an entry of the same layer. `.wh.` whiteouts are kept as the files
//! they are (the union reads them in lowers), so a layer needs no device
//! nodes and unpacks the same as root and rootless.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;

use tracing::debug;

use crate::sys::{self, Errno, SetTime};
use crate::tree::remove_tree;

/// What an unpack could not keep, for the launcher's warning.
#[derive(Debug, Default)]
pub struct Unpacked {
    pub entries: u64,
    /// Device nodes a rootless unpack cannot make.
    pub devices_skipped: u64,
    /// Entries whose owner is not mapped (rootless): kept as root's.
    pub owners_unmapped: u64,
    /// Extended attributes the filesystem or the user could not set.
    pub xattrs_skipped: u64,
    /// Entries of kinds a filesystem has no object for.
    pub kinds_skipped: u64,
}

/// An entry's path inside the layer, as its components.
type Components = Vec<OsString>;

struct Unpacker {
    root: OwnedFd,
    /// The parent directory of the last entry, kept open for its siblings.
    last_parent: Option<(Components, OwnedFd)>,
    /// Directories whose times are set last (their entries change them).
    dir_times: Vec<(Components, i64)>,
    done: Unpacked,
}

/// Unpacks the tar stream into the existing, empty directory `root`.
pub fn unpack(stream: impl Read, root: &Path) -> Result<Unpacked, String> {
    let root = sys::open_dir_path(root).map_err(|e| format!("{}: {e}", root.display()))?;
    let mut u = Unpacker {
        root,
        last_parent: None,
        dir_times: Vec::new(),
        done: Unpacked::default(),
    };
    let mut archive = tar::Archive::new(stream);
    let entries = archive
        .entries()
        .map_err(|e| format!("not a tar stream: {e}"))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("not a tar stream: {e}"))?;
        let shown = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        u.entry(&mut entry)
            .map_err(|e| format!("entry {shown}: {e}"))?;
        u.done.entries += 1;
    }
    u.set_dir_times()
        .map_err(|e| format!("setting directory times: {e}"))?;
    Ok(u.done)
}

/// The components of an entry name; `.` and empty parts dropped, `..` and
/// absolute names refused.
fn components(name: &[u8]) -> Result<Components, String> {
    let mut out = Vec::new();
    for part in name.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err("the name climbs out of the layer with '..'".into()),
            p => out.push(OsString::from_vec(p.to_vec())),
        }
    }
    Ok(out)
}

fn err(what: &str, e: impl std::fmt::Display) -> String {
    format!("{what}: {e}")
}

impl Unpacker {
    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), String> {
        let path = components(&entry.path_bytes())?;
        let header = entry.header();
        let kind = header.entry_type();
        let mode = header.mode().map_err(|e| err("mode", e))? & 0o7777;
        let uid = header.uid().map_err(|e| err("owner", e))? as u32;
        let gid = header.gid().map_err(|e| err("group", e))? as u32;
        let mtime = header.mtime().map_err(|e| err("time", e))? as i64;
        let Some((name, parent_path)) = path.split_last() else {
            // The layer's root itself.
            if kind.is_dir() {
                let root = nix::unistd::dup(&self.root).map_err(|e| err("dup", e))?;
                self.set_meta(root.as_fd(), uid, gid, mode)?;
                self.dir_times.push((Vec::new(), mtime));
            }
            return Ok(());
        };
        let parent = self.parent(parent_path)?;
        let dir = parent.as_fd();
        match kind {
            tar::EntryType::Directory => {
                if !self.make_room(dir, name, true)? {
                    sys::mkdir_at(dir, name, 0o700).map_err(|e| err("mkdir", e))?;
                }
                let fd = sys::open_path(dir, name).map_err(|e| err("open", e))?;
                self.set_meta(fd.as_fd(), uid, gid, mode)?;
                self.set_xattrs(fd.as_fd(), entry)?;
                self.dir_times.push((path.clone(), mtime));
            }
            // A sparse file's holes are read back as zeroes.
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                self.make_room(dir, name, false)?;
                let fd = sys::create_file(dir, name, libc::O_WRONLY, 0o600)
                    .map_err(|e| err("create", e))?;
                let mut file = File::from(fd);
                std::io::copy(entry, &mut file).map_err(|e| err("write", e))?;
                self.set_meta(file.as_fd(), uid, gid, mode)?;
                self.set_xattrs(file.as_fd(), entry)?;
                sys::set_times_fd(file.as_fd(), at(mtime), at(mtime))
                    .map_err(|e| err("times", e))?;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or("a symlink without a target")?;
                self.make_room(dir, name, false)?;
                sys::symlink_at(OsStr::from_bytes(&target), dir, name)
                    .map_err(|e| err("symlink", e))?;
                self.own_at(dir, name, uid, gid)?;
                sys::set_times_at(dir, name, at(mtime), at(mtime)).map_err(|e| err("times", e))?;
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or("a hard link without a target")?;
                let shown = String::from_utf8_lossy(&target).into_owned();
                let target = components(&target)?;
                let (tname, tparent) = target.split_last().ok_or("a hard link to the root")?;
                let tdir = self.open_dir(tparent).map_err(|e| {
                    format!("the link target {shown} is not an earlier entry of the layer ({e})")
                })?;
                self.make_room(dir, name, false)?;
                sys::link_at(tdir.as_fd(), tname, dir, name).map_err(|e| {
                    err(
                        "link",
                        format!("{e} (it must name an earlier entry of the layer)"),
                    )
                })?;
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                let (ftype, dev) = match kind {
                    tar::EntryType::Char => (libc::S_IFCHR, device(header)?),
                    tar::EntryType::Block => (libc::S_IFBLK, device(header)?),
                    _ => (libc::S_IFIFO, 0),
                };
                self.make_room(dir, name, false)?;
                match sys::mknod_at(dir, name, ftype | 0o600, dev) {
                    Ok(()) => {}
                    Err(Errno::EPERM) if ftype != libc::S_IFIFO => {
                        self.done.devices_skipped += 1;
                        return Ok(());
                    }
                    Err(e) => return Err(err("mknod", e)),
                }
                self.own_at(dir, name, uid, gid)?;
                sys::chmod_at(dir, name, mode).map_err(|e| err("chmod", e))?;
                sys::set_times_at(dir, name, at(mtime), at(mtime)).map_err(|e| err("times", e))?;
            }
            other => {
                debug!(?other, "layer entry of a kind not unpacked");
                self.done.kinds_skipped += 1;
            }
        }
        Ok(())
    }

    /// The directory at `path`, made (0755) where the layer omits it.
    fn parent(&mut self, path: &[OsString]) -> Result<OwnedFd, String> {
        if let Some((p, fd)) = &self.last_parent
            && p.as_slice() == path
        {
            return nix::unistd::dup(fd).map_err(|e| err("dup", e));
        }
        let fd = self.walk(path, true)?;
        let copy = nix::unistd::dup(&fd).map_err(|e| err("dup", e))?;
        self.last_parent = Some((path.to_vec(), copy));
        Ok(fd)
    }

    /// The existing directory at `path`.
    fn open_dir(&mut self, path: &[OsString]) -> Result<OwnedFd, String> {
        self.walk(path, false)
    }

    fn walk(&self, path: &[OsString], make: bool) -> Result<OwnedFd, String> {
        let mut cur = nix::unistd::dup(&self.root).map_err(|e| err("dup", e))?;
        for c in path {
            let flags = libc::O_PATH | libc::O_DIRECTORY;
            let next = match sys::open_at(cur.as_fd(), c, flags) {
                Err(Errno::ENOENT) if make => {
                    sys::mkdir_at(cur.as_fd(), c, 0o755).map_err(|e| err("mkdir", e))?;
                    sys::chmod_at(cur.as_fd(), c, 0o755).map_err(|e| err("chmod", e))?;
                    sys::open_at(cur.as_fd(), c, flags)
                }
                r => r,
            };
            cur = next.map_err(|e| match e {
                Errno::ELOOP | Errno::ENOTDIR => format!(
                    "{} is not a directory of the layer (a symlink is never followed)",
                    c.to_string_lossy()
                ),
                e => err(&c.to_string_lossy(), e),
            })?;
        }
        Ok(cur)
    }

    /// Clears the way for `name`: a directory stays for a directory (a tar
    /// may name one twice), anything else that is there goes.
    fn make_room(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        is_dir: bool,
    ) -> Result<bool, String> {
        match sys::stat_at(dir, name) {
            Err(Errno::ENOENT) => Ok(false),
            Err(e) => Err(err("stat", e)),
            Ok(st) if is_dir && sys::is_dir(&st) => Ok(true),
            Ok(_) => {
                // The cached parent may lie inside what is removed.
                self.last_parent = None;
                remove_tree(dir, name).map_err(|e| err("replacing an earlier entry", e))?;
                Ok(false)
            }
        }
    }

    /// Owner first (a change of owner clears set-id bits), then mode.
    fn set_meta(
        &mut self,
        fd: BorrowedFd<'_>,
        uid: u32,
        gid: u32,
        mode: u32,
    ) -> Result<(), String> {
        match sys::chown_fd(fd, Some(uid), Some(gid)) {
            Ok(()) => {}
            Err(Errno::EINVAL | Errno::EPERM) => self.done.owners_unmapped += 1,
            Err(e) => return Err(err("chown", e)),
        }
        sys::chmod_fd(fd, mode).map_err(|e| err("chmod", e))
    }

    fn own_at(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        uid: u32,
        gid: u32,
    ) -> Result<(), String> {
        match sys::chown_at(dir, name, Some(uid), Some(gid)) {
            Ok(()) => Ok(()),
            Err(Errno::EINVAL | Errno::EPERM) => {
                self.done.owners_unmapped += 1;
                Ok(())
            }
            Err(e) => Err(err("chown", e)),
        }
    }

    /// The entry's extended attributes (PAX `SCHILY.xattr.`), except overlay
    /// markers: a layer never speaks for the union's own format.
    fn set_xattrs<R: Read>(
        &mut self,
        fd: BorrowedFd<'_>,
        entry: &mut tar::Entry<'_, R>,
    ) -> Result<(), String> {
        let Some(exts) = entry.pax_extensions().map_err(|e| err("pax header", e))? else {
            return Ok(());
        };
        for ext in exts {
            let ext = ext.map_err(|e| err("pax header", e))?;
            let Some(name) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") else {
                continue;
            };
            if name.starts_with(b"trusted.overlay.") || name.starts_with(b"user.overlay.") {
                continue;
            }
            if sys::set_xattr(fd, OsStr::from_bytes(name), ext.value_bytes(), 0).is_err() {
                self.done.xattrs_skipped += 1;
            }
        }
        Ok(())
    }

    fn set_dir_times(&mut self) -> Result<(), String> {
        // Deepest first, so that setting one does not disturb another.
        self.dir_times
            .sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        for (path, mtime) in std::mem::take(&mut self.dir_times) {
            let fd = self.open_dir(&path)?;
            sys::set_times_fd(fd.as_fd(), at(mtime), at(mtime)).map_err(|e| err("times", e))?;
        }
        Ok(())
    }
}

fn at(secs: i64) -> SetTime {
    SetTime::At(libc::timespec {
        tv_sec: secs,
        tv_nsec: 0,
    })
}

fn device(header: &tar::Header) -> Result<u64, String> {
    let major = header
        .device_major()
        .map_err(|e| err("device", e))?
        .unwrap_or(0);
    let minor = header
        .device_minor()
        .map_err(|e| err("device", e))?
        .unwrap_or(0);
    Ok(libc::makedev(major, minor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sparse_file_unpacks_whole() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        std::fs::create_dir(&src).unwrap();
        let f = std::fs::File::create(src.join("sparse")).unwrap();
        f.set_len(1 << 20).unwrap();
        std::os::unix::fs::FileExt::write_at(&f, b"end", (1 << 20) - 3).unwrap();
        let tarball = d.path().join("layer.tar");
        let st = std::process::Command::new("tar")
            .args(["--sparse", "--format=gnu", "-cf"])
            .arg(&tarball)
            .arg("-C")
            .arg(&src)
            .arg("sparse")
            .status()
            .unwrap();
        assert!(st.success());
        let dest = d.path().join("dest");
        std::fs::create_dir(&dest).unwrap();
        let done = unpack(std::fs::File::open(&tarball).unwrap(), &dest).unwrap();
        assert_eq!(done.kinds_skipped, 0);
        let data = std::fs::read(dest.join("sparse")).unwrap();
        assert_eq!(data.len(), 1 << 20);
        assert!(data.ends_with(b"end") && data[..(1 << 20) - 3].iter().all(|&b| b == 0));
    }

    #[test]
    fn entry_names_never_leave_the_layer() {
        assert_eq!(components(b"./a//b/").unwrap(), ["a", "b"]);
        assert!(components(b"").unwrap().is_empty());
        assert!(components(b"a/../../etc").is_err());
        // An absolute name is read relative to the layer's root.
        assert_eq!(components(b"/etc/passwd").unwrap(), ["etc", "passwd"]);
    }
}
