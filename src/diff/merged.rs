//! The merged view of an upper directory over its lowers: a read-only union
//! of the filesystem core with the upper as its top layer, so that redirects,
//! whiteouts, opaque directories and metadata-only copies are read by the
//! same code that serves a mount. `unionfs diff` asks it what a renamed
//! directory holds (its upper entries and, through `overlay.redirect`, the
//! lower directories it came from) and where a metadata-only copy's data is.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use super::err;
use crate::overlay::format::XattrNamespace;
use crate::overlay::node::ROOT_ID;
use crate::overlay::superblock::{Tuning, Union};
use crate::sys::{self, Stat};

/// The union of an upper directory and its lowers, read only.
pub struct MergedView {
    union: Union,
}

/// One object of the merged view.
pub struct MergedObj {
    pub id: u64,
    pub st: Stat,
}

impl MergedView {
    /// The view of `upper` over `lowers` (top first), markers read in `ns`.
    pub fn open(
        upper: BorrowedFd<'_>,
        lowers: &[OwnedFd],
        ns: XattrNamespace,
    ) -> Result<MergedView, String> {
        let dup = |fd: BorrowedFd<'_>| {
            fd.try_clone_to_owned()
                .map_err(|e| format!("cannot duplicate a layer descriptor: {e}"))
        };
        let mut layers = vec![dup(upper)?];
        for l in lowers {
            layers.push(dup(l.as_fd())?);
        }
        let mut union = Union::new(None, layers, Tuning::new(false));
        union.read_markers_as(ns);
        Ok(MergedView { union })
    }

    /// The object at `path` (relative to the root).
    pub fn lookup(&self, path: &Path) -> Result<MergedObj, String> {
        let mut obj = MergedObj {
            id: ROOT_ID,
            st: self.union.getattr(ROOT_ID, None).map_err(|e| err("/", e))?,
        };
        for name in path.iter() {
            let (node, st) = self
                .union
                .lookup(obj.id, name)
                .map_err(|e| err(Path::new("/").join(path).display(), e))?;
            obj = MergedObj { id: node.id, st };
        }
        Ok(obj)
    }

    /// The entries of directory `dir` (at `at`), sorted by name.
    pub fn children(
        &self,
        dir: &MergedObj,
        at: &Path,
    ) -> Result<Vec<(OsString, MergedObj)>, String> {
        let shown = |e| err(Path::new("/").join(at).display(), e);
        let fh = self.union.opendir(dir.id).map_err(shown)?;
        let mut names = Vec::new();
        let listed = self.union.readdir(dir.id, fh, 0, |e, _| {
            if e.name != "." && e.name != ".." {
                names.push(e.name.clone());
            }
            false
        });
        self.union.releasedir(fh);
        listed.map_err(shown)?;
        names.sort_by(|a, b| a.as_encoded_bytes().cmp(b.as_encoded_bytes()));
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let (node, st) = self
                .union
                .lookup(dir.id, &name)
                .map_err(|e| err(Path::new("/").join(at).join(&name).display(), e))?;
            out.push((name, MergedObj { id: node.id, st }));
        }
        Ok(out)
    }

    /// A descriptor to read the data of regular file `obj` (at `at`) from:
    /// its own, or for a metadata-only copy the lower file holding it.
    pub fn data(&self, obj: &MergedObj, at: &Path) -> Result<OwnedFd, String> {
        let shown = |e| err(Path::new("/").join(at).display(), e);
        let opened = self.union.open(obj.id, libc::O_RDONLY).map_err(shown)?;
        let fd = opened.fd.as_fd().try_clone_to_owned();
        self.union.release(opened.fh);
        fd.map_err(|e| format!("/{}: {e}", at.display()))
    }

    /// The target of symlink `obj`.
    pub fn readlink(&self, obj: &MergedObj, at: &Path) -> Result<Vec<u8>, String> {
        self.union
            .readlink(obj.id)
            .map_err(|e| err(Path::new("/").join(at).display(), e))
    }

    /// The xattrs the union shows on `obj` (the overlay markers left out).
    pub fn xattrs(&self, obj: &MergedObj, at: &Path) -> Result<Vec<(OsString, Vec<u8>)>, String> {
        let names = match self.union.listxattr(obj.id) {
            Ok(n) => n,
            Err(sys::Errno::ENOTSUP) => return Ok(Vec::new()),
            Err(e) => return Err(err(Path::new("/").join(at).display(), e)),
        };
        Ok(names
            .into_iter()
            .filter_map(|n| {
                let v = self.union.getxattr(obj.id, OsStr::new(&n)).ok()?;
                Some((n, v))
            })
            .collect())
    }
}
