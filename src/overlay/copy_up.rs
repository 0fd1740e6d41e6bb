//! Copy-up: giving a lower object an upper copy before it is changed.
//!
//! Parents first, each with its own metadata. The copy is built in the work
//! directory — a regular file as an anonymous file (`O_TMPFILE`) where the
//! filesystem has them, anything else under a temporary name — data
//! (sparse-aware, by reflink or `copy_file_range` where the filesystem
//! allows) synced first, then owner, mode, xattrs and times, and only then
//! linked or renamed into place, so no reader and no crash ever sees a
//! half-made copy. The parent's times are restored afterwards, as the
//! kernel does. One copy-up per node at a time; later callers find it done.
//! With `metacopy=on` a regular file is copied without its data (marked
//! metadata-only) unless it is to be written; its data follows in place at
//! the first write, the mark dropped last.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use nix::sys::uio;
use nix::unistd::{Whence, ftruncate, lseek};
use tracing::debug;

use crate::overlay::format;
use crate::overlay::namei::is_metadata_only;
use crate::overlay::node::{Node, Real, UPPER};
use crate::overlay::superblock::Union;
use crate::sys::{self, Errno, Result, Stat};
use crate::tree::remove_tree;

const FICLONE: libc::c_ulong = 0x4004_9409;
const CHUNK: usize = 1 << 30;

impl Union {
    /// The upper object of `node`, copying it (and its parents) up if needed.
    pub fn ensure_upper(&self, node: &Arc<Node>) -> Result<Real> {
        loop {
            if let Some(u) = node.upper() {
                return Ok(u);
            }
            let (parent, _) = node.parent_and_name();
            // Only the root of a read-only union has no upper and no parent.
            let parent = parent.ok_or(Errno::EROFS)?;
            let parent_upper = self.ensure_upper(&parent)?;
            let _guard = node.copy_up_lock.lock();
            if let Some(u) = node.upper() {
                return Ok(u);
            }
            let (now_parent, name) = node.parent_and_name();
            if !now_parent.is_some_and(|p| Arc::ptr_eq(&p, &parent)) {
                continue; // renamed meanwhile: copy its new parent first
            }
            let lower = node.lower().ok_or(Errno::EIO)?.path_fd()?;
            let lower_stat = sys::stat_fd(lower.as_fd())?;
            let metadata_only =
                self.tuning.metacopy && sys::file_type(lower_stat.st_mode) == libc::S_IFREG;
            if let Some(entry) = self.index_name_of(lower.as_fd(), &lower_stat) {
                return self.link_up_node(
                    node,
                    &parent,
                    &parent_upper,
                    (lower.as_fd(), &lower_stat),
                    &entry,
                );
            }
            let origin = recorded_origin(lower.as_fd(), &lower_stat);
            // The data: the lower file's, or where a metadata-only lower
            // copy has it; none for a metadata-only copy.
            let data = match metadata_only {
                true => None,
                false => Some(node.data().0.path_fd()?),
            };
            let obj = self.copy_up_object(
                parent_upper.dir(),
                &name,
                (lower.as_fd(), &lower_stat),
                data.as_ref().map(|d| d.as_fd()),
                origin.as_ref(),
            )?;
            let upper_stat = sys::stat_fd(obj.as_fd())?;
            if node.is_dir() || lower_stat.st_nlink <= 1 {
                self.table
                    .record_origin(upper_stat.st_ino, node.id, node.ino());
            } else {
                // A broken hard link: its own file now, with its own number
                // (as the kernel without the index), under the same node.
                let ino = self.table.id_for(UPPER, upper_stat.st_ino);
                self.table.record_origin(upper_stat.st_ino, node.id, ino);
                node.set_ino(ino);
                self.listing_changed(parent.id); // its d_ino changed
            }
            let upper = if node.is_dir() {
                Real::Open(Arc::new(obj))
            } else {
                Real::At(parent_upper.dir_arc(), name.clone())
            };
            {
                let mut st = node.state.write();
                st.upper = Some(upper.clone());
                st.metacopy = metadata_only;
            }
            if !metadata_only {
                node.copied_up.store(true, Ordering::Release);
            }
            debug!(name = ?name, id = node.id, metadata_only, "copied up");
            return Ok(upper);
        }
    }

    /// Copy-up with the index of a name of a lower hard-linked file: the
    /// name becomes a link of the file's index entry, made now if no other
    /// name was copied up before; the other names held show the entry.
    fn link_up_node(
        &self,
        node: &Arc<Node>,
        parent: &Arc<Node>,
        parent_upper: &Real,
        lower: (BorrowedFd<'_>, &Stat),
        entry: &OsStr,
    ) -> Result<Real> {
        let name = node.parent_and_name().1;
        let obj = self.link_up(parent_upper.dir(), &name, lower, entry)?;
        let upper_ino = sys::stat_fd(obj.as_fd())?.st_ino;
        if !self.table.knows_origin(upper_ino) {
            // Each name of the file is a node of its own (see `node`).
            self.table.record_per_name(upper_ino, node.ino());
        }
        let mut metacopy = false;
        if let Some((shown, st)) = self.index_entry(entry) {
            metacopy = is_metadata_only(&shown, &st, self.ns);
            for other in self.table.other_names_of(node) {
                other.show_index_entry(shown.clone(), metacopy);
                // Pages it cached of the lower file are stale now.
                self.contents_changed(other.id);
            }
        }
        let upper = Real::At(parent_upper.dir_arc(), name.clone());
        {
            let mut st = node.state.write();
            st.upper = Some(upper.clone());
            st.metacopy = metacopy;
        }
        node.copied_up.store(!metacopy, Ordering::Release);
        self.listing_changed(parent.id);
        debug!(name = ?name, id = node.id, "copied up through the index");
        Ok(upper)
    }

    /// The upper object of `node` with its data: a metadata-only copy gets
    /// its data now (see `copy_up_data`).
    pub fn ensure_data(&self, node: &Arc<Node>) -> Result<Real> {
        let upper = self.ensure_upper(node)?;
        if node.is_metacopy() {
            let _guard = node.copy_up_lock.lock();
            if node.is_metacopy() {
                self.copy_up_data(node, &upper)?;
            }
        }
        Ok(upper)
    }

    /// Fills the metadata-only copy `upper` of `node` with the lower data,
    /// in place as the kernel does (so every link of it sees the data), and
    /// only then drops its metadata-only mark: a crash before leaves a
    /// metadata-only copy that still reads the lower data.
    fn copy_up_data(&self, node: &Arc<Node>, upper: &Real) -> Result<()> {
        let (data, _) = node.data();
        let st = upper.stat()?;
        let src = data.open(libc::O_RDONLY)?;
        let dst = upper.open(libc::O_WRONLY)?;
        copy_data(src.as_fd(), dst.as_fd(), st.st_size as u64)?;
        if !self.tuning.volatile {
            sys::fsync(dst.as_fd(), true)?;
        }
        let (atime, mtime) = sys::stat_times(&st);
        sys::set_times_fd(dst.as_fd(), atime, mtime)?;
        crate::overlay::index::crash_point("before-data-marked");
        format::clear_metacopy(&upper.xattrs()?, self.ns)?;
        node.data_copied_up();
        for other in self.table.other_names_of(node) {
            // Names of the same file (with the index) read the upper data now.
            other.data_copied_up();
            self.contents_changed(other.id);
        }
        debug!(id = node.id, "data copied up");
        Ok(())
    }

    /// Copies the lower object `src` (with its `stat`) to `name` in the
    /// upper directory `dir`, recording `origin` on the copy. `data`: where
    /// a regular file's data comes from (None: a metadata-only copy).
    fn copy_up_object(
        &self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        (src, st): (BorrowedFd<'_>, &Stat),
        data: Option<BorrowedFd<'_>>,
        origin: Option<&format::Origin>,
    ) -> Result<OwnedFd> {
        let dir_times = sys::stat_fd(dir)?;
        let work = self.work_fd()?;
        let staged = self.build_copy(src, st, data)?;
        if let Some(o) = origin {
            self.record_origin(dir, staged.obj.as_fd(), o);
        }
        if let Err(e) = staged.place(work, dir, name) {
            staged.discard(work);
            return Err(e);
        }
        let (atime, mtime) = sys::stat_times(&dir_times);
        sys::set_times_fd(dir, atime, mtime)?;
        Ok(staged.obj)
    }

    /// Records `origin` on the copy `obj` and marks its parent `dir`, as the
    /// kernel does (the parent first). Only inode numbers depend on it, so a
    /// filesystem that refuses (user xattrs on a symlink) costs nothing else.
    fn record_origin(&self, dir: BorrowedFd<'_>, obj: BorrowedFd<'_>, origin: &format::Origin) {
        let marked = if format::is_impure(dir, self.ns) {
            Ok(())
        } else {
            format::set_impure(dir, self.ns)
        };
        if let Err(e) = marked.and_then(|()| format::set_origin(obj, origin, self.ns)) {
            debug!("origin not recorded: {e}");
        }
    }

    /// Builds the copy of `src` in the work directory, not visible yet: a
    /// regular file with the data of `data`, or (None) sized but marked
    /// metadata-only. A regular file is an anonymous one (`O_TMPFILE`, as
    /// the kernel makes it) where the upper filesystem has them: nothing of
    /// it is left if it is never placed, and its sync need not reach the
    /// work directory (as a named file's does on ext4 without a journal).
    pub(crate) fn build_copy(
        &self,
        src: BorrowedFd<'_>,
        st: &Stat,
        data: Option<BorrowedFd<'_>>,
    ) -> Result<Staged> {
        let work = self.work_fd()?;
        if sys::file_type(st.st_mode) == libc::S_IFREG
            && let Some(file) = self.anonymous_file(work)?
        {
            self.fill_file(file.as_fd(), st, data)?;
            self.finish_copy(src, file.as_fd(), st, data.is_none())?;
            return Ok(Staged {
                obj: file,
                tmp: None,
            });
        }
        let tmp = self.temp_name();
        let built = self.build_named_copy(work, &tmp, src, st, data);
        if built.is_err() {
            let _ = remove_tree(work, &tmp);
        }
        Ok(Staged {
            obj: built?,
            tmp: Some(tmp),
        })
    }

    /// An anonymous regular file in the work directory; None where the
    /// filesystem has none (remembered: asked once).
    fn anonymous_file(&self, work: BorrowedFd<'_>) -> Result<Option<OwnedFd>> {
        if self.no_tmpfile.load(Ordering::Relaxed) {
            return Ok(None);
        }
        match sys::open_tmpfile(work, 0o600) {
            Ok(f) => Ok(Some(f)),
            Err(Errno::ENOTSUP | Errno::EISDIR | Errno::EINVAL) => {
                debug!("no O_TMPFILE in the work directory: copies are built under a name");
                self.no_tmpfile.store(true, Ordering::Relaxed);
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// `build_copy` under the temporary name `tmp`.
    fn build_named_copy(
        &self,
        work: BorrowedFd<'_>,
        tmp: &OsStr,
        src: BorrowedFd<'_>,
        st: &Stat,
        data: Option<BorrowedFd<'_>>,
    ) -> Result<OwnedFd> {
        let kind = sys::file_type(st.st_mode);
        match kind {
            libc::S_IFREG => {
                let file = sys::create_file(work, tmp, libc::O_WRONLY, 0o600)?;
                self.fill_file(file.as_fd(), st, data)?;
            }
            libc::S_IFDIR => sys::mkdir_at(work, tmp, 0o700)?,
            libc::S_IFLNK => {
                let target = sys::readlink_fd(src)?;
                sys::symlink_at(OsStr::from_bytes(&target), work, tmp)?;
            }
            _ => sys::mknod_at(work, tmp, kind | 0o600, st.st_rdev)?,
        }
        let obj = sys::open_path(work, tmp)?;
        let metadata_only = kind == libc::S_IFREG && data.is_none();
        self.finish_copy(src, obj.as_fd(), st, metadata_only)?;
        Ok(obj)
    }

    /// The contents of a regular file's copy `dst`: the data of `data`,
    /// synced unless volatile, or (None) only its size. The sync comes
    /// before any metadata change, as the kernel's: owner, mode, xattrs and
    /// times need none of their own (the filesystem orders them before the
    /// name that shows the copy), and a sync right after the data is the
    /// cheaper one.
    fn fill_file(
        &self,
        dst: BorrowedFd<'_>,
        st: &Stat,
        data: Option<BorrowedFd<'_>>,
    ) -> Result<()> {
        let Some(data) = data else {
            return ftruncate(dst, st.st_size);
        };
        let from = sys::reopen(data, libc::O_RDONLY)?;
        copy_data(from.as_fd(), dst, st.st_size as u64)?;
        if !self.tuning.volatile {
            sys::fsync(dst, false)?;
        }
        Ok(())
    }

    /// Owner, mode, xattrs and times of `src` onto the copy `obj`, and the
    /// metadata-only mark where it has no data.
    fn finish_copy(
        &self,
        src: BorrowedFd<'_>,
        obj: BorrowedFd<'_>,
        st: &Stat,
        metadata_only: bool,
    ) -> Result<()> {
        copy_metadata(src, obj, st, self.ns)?;
        if metadata_only {
            format::set_metacopy(obj, self.ns)?;
        }
        Ok(())
    }
}

/// A copy built in the work directory and not visible yet.
pub(crate) struct Staged {
    /// The copy: an `O_PATH` descriptor, or an anonymous file's own.
    pub obj: OwnedFd,
    /// Its temporary name in the work directory (None: anonymous).
    tmp: Option<OsString>,
}

impl Staged {
    /// Gives the copy the name `name` in `dir`, never replacing one there.
    pub fn place(&self, work: BorrowedFd<'_>, dir: BorrowedFd<'_>, name: &OsStr) -> Result<()> {
        match &self.tmp {
            Some(tmp) => sys::rename_at(work, tmp, dir, name, libc::RENAME_NOREPLACE),
            None => sys::link_fd_at(self.obj.as_fd(), dir, name),
        }
    }

    /// Removes a copy that is not to be placed (an anonymous one goes with
    /// its descriptor).
    pub fn discard(&self, work: BorrowedFd<'_>) {
        if let Some(tmp) = &self.tmp {
            let _ = remove_tree(work, tmp);
        }
    }
}

/// The origin a copy of the lower object `src` records: its file handle,
/// for a directory or a file with one link (the kernel records none for a
/// hard link it breaks without the index). None where the lower filesystem
/// cannot give handles.
fn recorded_origin(src: BorrowedFd<'_>, st: &Stat) -> Option<format::Origin> {
    if !sys::is_dir(st) && st.st_nlink > 1 {
        return None;
    }
    let (kind, handle) = sys::file_handle(src).ok()?;
    let origin = format::Origin { kind, handle };
    origin.encode().is_some().then_some(origin)
}

/// Owner, mode, xattrs and times of `src` onto `dst`.
fn copy_metadata(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    st: &Stat,
    ns: format::XattrNamespace,
) -> Result<()> {
    let is_link = sys::file_type(st.st_mode) == libc::S_IFLNK;
    sys::chown_fd(dst, Some(st.st_uid), Some(st.st_gid))?;
    if !is_link {
        sys::chmod_fd(dst, st.st_mode)?;
    }
    copy_xattrs(src, dst, ns)?;
    let (atime, mtime) = sys::stat_times(st);
    sys::set_times_fd(dst, atime, mtime)
}

/// Every xattr but the union's own markers.
fn copy_xattrs(src: BorrowedFd<'_>, dst: BorrowedFd<'_>, ns: format::XattrNamespace) -> Result<()> {
    let names = match sys::list_xattr(src) {
        Ok(n) => n,
        Err(e) if e == Errno::ENOTSUP => return Ok(()),
        Err(e) => return Err(e),
    };
    for name in names {
        if format::shown_xattr_name(&name, ns).is_none() {
            continue; // the union's own markers (escaped ones are copied)
        }
        let value = match sys::get_xattr(src, &name) {
            Ok(v) => v,
            Err(Errno::ENODATA) => continue,
            Err(e) => return Err(e),
        };
        match sys::set_xattr(dst, &name, &value, 0) {
            Ok(()) => {}
            // Some namespaces (security.*) may be refused by the upper filesystem.
            Err(e) if (e == Errno::ENOTSUP || e == Errno::EPERM) && !name_is_user(&name) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn name_is_user(name: &OsStr) -> bool {
    name.as_bytes().starts_with(b"user.")
}

/// Copies `size` bytes, keeping holes: a reflink when the filesystem can,
/// else the data extents one by one with `copy_file_range`.
pub fn copy_data(src: BorrowedFd<'_>, dst: BorrowedFd<'_>, size: u64) -> Result<()> {
    if size == 0 {
        return Ok(());
    }
    // SAFETY: FICLONE takes the source descriptor as its argument; both are
    // open. (nix has no wrapper for it.)
    if unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE, src.as_raw_fd()) } == 0 {
        return Ok(());
    }
    let mut pos = 0u64;
    while pos < size {
        let data = match lseek(src, pos as i64, Whence::SeekData) {
            Ok(off) => off as u64,
            Err(Errno::ENXIO) => break, // only a hole is left
            Err(_) => pos,              // no SEEK_DATA: copy everything
        };
        if data >= size {
            break;
        }
        let end = match lseek(src, data as i64, Whence::SeekHole) {
            Ok(off) => (off as u64).min(size),
            Err(_) => size,
        };
        copy_range(src, dst, data, end)?;
        pos = end;
    }
    ftruncate(dst, size as i64)
}

fn copy_range(src: BorrowedFd<'_>, dst: BorrowedFd<'_>, mut from: u64, end: u64) -> Result<()> {
    while from < end {
        let want = ((end - from) as usize).min(CHUNK);
        let (mut src_at, mut dst_at) = (from as i64, from as i64);
        let copied = sys::retry(|| {
            let (s, d) = (Some(&mut src_at), Some(&mut dst_at));
            nix::fcntl::copy_file_range(src, s, dst, d, want)
        });
        let n = match copied {
            Ok(0) => return Ok(()), // the source shrank under us
            Ok(n) => n,
            Err(Errno::EXDEV | Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP) => {
                return copy_range_by_hand(src, dst, from, end);
            }
            Err(e) => return Err(e),
        };
        from += n as u64;
    }
    Ok(())
}

fn copy_range_by_hand(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    mut from: u64,
    end: u64,
) -> Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    while from < end {
        let want = ((end - from) as usize).min(buf.len());
        let n = sys::retry(|| uio::pread(src, &mut buf[..want], from as i64))?;
        if n == 0 {
            return Ok(());
        }
        let mut done = 0;
        while done < n {
            let at = (from + done as u64) as i64;
            done += sys::retry(|| uio::pwrite(dst, &buf[done..n], at))?;
        }
        from += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::path::Path;

    use super::*;
    use crate::overlay::node::ROOT_ID;
    use crate::overlay::superblock::Tuning;

    fn open_dir(p: &Path) -> OwnedFd {
        fs::File::open(p).unwrap().into()
    }

    /// A lower file with data, a mode and a user xattr, copied
    /// up by an append: the copy is the same and the work directory is left
    /// empty, whether built anonymous (`O_TMPFILE`) or under a name (the
    /// fallback for filesystems without it).
    #[test]
    fn a_copy_is_the_same_built_anonymous_or_by_name() {
        for by_name in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let [lower, upper, work] = ["lower", "upper", "work"].map(|d| dir.path().join(d));
            for d in [&lower, &upper, &work] {
                fs::create_dir(d).unwrap();
            }
            let file = lower.join("f");
            fs::write(&file, b"hello").unwrap();
            fs::set_permissions(&file, fs::Permissions::from_mode(0o640)).unwrap();
            let with_xattr = xattr_set(&file, "user.k", b"v");
            let union = Union::new(
                Some((open_dir(&upper), open_dir(&work))),
                vec![open_dir(&lower)],
                Tuning::new(false),
            );
            union.no_tmpfile.store(by_name, Ordering::Relaxed);
            let (node, _) = union.lookup(ROOT_ID, OsStr::new("f")).unwrap();
            let o = union
                .open(node.id, libc::O_WRONLY | libc::O_APPEND)
                .unwrap();
            union.write(o.fh, 5, b" world").unwrap();
            union.release(o.fh);
            let anonymous = !union.no_tmpfile.load(Ordering::Relaxed);
            assert_eq!(anonymous, !by_name, "O_TMPFILE refused where the test runs");

            let copy = upper.join("f");
            assert_eq!(
                fs::read(&copy).unwrap(),
                b"hello world",
                "by name: {by_name}"
            );
            let (was, now) = (fs::metadata(&file).unwrap(), fs::metadata(&copy).unwrap());
            assert_eq!(now.mode(), was.mode());
            assert_eq!((now.uid(), now.gid()), (was.uid(), was.gid()));
            if with_xattr {
                assert_eq!(xattr_get(&copy, "user.k").as_deref(), Some(&b"v"[..]));
            }
            let left: Vec<_> = fs::read_dir(&work).unwrap().collect();
            assert!(left.is_empty(), "work directory holds {left:?}");
        }
    }

    fn xattr_set(p: &Path, name: &str, value: &[u8]) -> bool {
        let fd: OwnedFd = fs::File::open(p).unwrap().into();
        sys::set_xattr(fd.as_fd(), OsStr::new(name), value, 0).is_ok()
    }

    fn xattr_get(p: &Path, name: &str) -> Option<Vec<u8>> {
        let fd: OwnedFd = fs::File::open(p).unwrap().into();
        sys::get_xattr(fd.as_fd(), OsStr::new(name)).ok()
    }
}
