//! `unionfs diff`: an upper directory read as the changeset it is.
//!
//! Kernel overlayfs, unionfs and fuse-overlayfs all write the same format:
//! a 0/0 character device deletes a name, `overlay.opaque` hides a lower
//! directory, `overlay.origin`/`metacopy`/`redirect` mark what came from a
//! lower layer. This module lists the changes as `podman diff` does (`A`,
//! `C`, `D` per path, with the same rules) and writes them as an OCI layer
//! tarball (`.wh.NAME` deletions, `.wh..wh..opq` opaque directories, owners,
//! modes, times, xattrs, hard links). Everything is read through
//! descriptors, one name at a time, never following a symlink.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

mod layer;
mod merged;
pub use layer::write_layer;
use merged::MergedView;

use crate::overlay::format::{self, XattrNamespace};
use crate::sys::{self, Stat};

/// What happened to a path, as `podman diff` says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Added,
    Changed,
    Deleted,
}

impl Kind {
    pub fn letter(self) -> char {
        match self {
            Kind::Added => 'A',
            Kind::Changed => 'C',
            Kind::Deleted => 'D',
        }
    }
}

/// One change: its kind and the path from the union's root (`/etc/x`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub kind: Kind,
    pub path: PathBuf,
}

/// The changes in `podman diff --format json`'s shape.
#[derive(Serialize, Default)]
pub struct ChangesJson {
    pub changed: Vec<String>,
    pub added: Vec<String>,
    pub deleted: Vec<String>,
}

impl ChangesJson {
    pub fn of(changes: &[Change]) -> ChangesJson {
        let mut j = ChangesJson::default();
        for c in changes {
            let p = c.path.to_string_lossy().into_owned();
            match c.kind {
                Kind::Changed => j.changed.push(p),
                Kind::Added => j.added.push(p),
                Kind::Deleted => j.deleted.push(p),
            }
        }
        j
    }
}

/// An upper directory and (optionally) the lower layers it was made over.
pub struct Changeset {
    upper: OwnedFd,
    lowers: Vec<OwnedFd>,
    ns: XattrNamespace,
    /// The upper over the lowers, when the lowers are given.
    merged: Option<MergedView>,
}

/// An entry of a directory, with its `stat`.
struct Entry {
    name: OsString,
    st: Stat,
}

fn err(what: impl std::fmt::Display, e: sys::Errno) -> String {
    format!("{what}: {}", e.desc())
}

impl Changeset {
    /// Opens the layers. Markers are read in `ns` (`trusted.overlay.*` or,
    /// as the kernel's `userxattr`, `user.overlay.*`).
    pub fn open(upper: &Path, lowers: &[PathBuf], ns: XattrNamespace) -> Result<Changeset, String> {
        let open = |p: &Path| sys::open_dir_path(p).map_err(|e| err(p.display(), e));
        let upper = open(upper)?;
        let lowers: Vec<OwnedFd> = lowers.iter().map(|p| open(p)).collect::<Result<_, _>>()?;
        let merged = match lowers.is_empty() {
            true => None,
            false => Some(MergedView::open(upper.as_fd(), &lowers, ns)?),
        };
        Ok(Changeset {
            upper,
            lowers,
            ns,
            merged,
        })
    }

    /// Whether the upper directory `dir` is a renamed lower or merged
    /// directory: its `overlay.redirect` names where its lower
    /// directories are.
    fn is_redirected(&self, dir: BorrowedFd<'_>) -> bool {
        format::redirect_of(&sys::XattrTarget::fd(dir), self.ns)
            .ok()
            .flatten()
            .is_some()
    }

    /// The entries of `dir`, sorted by name (the order `podman diff` walks).
    fn entries(dir: BorrowedFd<'_>, at: &Path) -> Result<Vec<Entry>, String> {
        let mut out = Vec::new();
        for e in sys::read_dir(dir).map_err(|e| err(at.display(), e))? {
            let st = sys::stat_at(dir, &e.name).map_err(|x| err(at.join(&e.name).display(), x))?;
            out.push(Entry { name: e.name, st });
        }
        out.sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
        Ok(out)
    }

    /// The lower object at `path` (components from the root), in the first
    /// lower that has it, found without following a symlink.
    fn in_lowers(&self, path: &[&OsStr]) -> Option<(OwnedFd, Stat)> {
        self.lowers
            .iter()
            .find_map(|root| lookup(root.as_fd(), path))
    }

    /// Whether the upper has `path` (relative) or hides it: a whiteout or
    /// an opaque directory on the way.
    fn upper_has_or_hides(&self, path: &Path) -> bool {
        let Ok(mut cur) = sys::open_path(self.upper.as_fd(), OsStr::new(".")) else {
            return false;
        };
        for name in path.iter() {
            let Ok(st) = sys::stat_at(cur.as_fd(), name) else {
                return false;
            };
            if format::is_whiteout_dev(&st) {
                return true;
            }
            let Ok(next) = sys::open_path(cur.as_fd(), name) else {
                return false;
            };
            cur = next;
            if sys::is_dir(&st) && self.is_opaque(cur.as_fd()) {
                return true;
            }
        }
        true
    }

    fn is_opaque(&self, dir: BorrowedFd<'_>) -> bool {
        format::upper_dir_opacity(dir, self.ns) == format::Opacity::Opaque
    }

    /// Whether the upper object came from a lower one (without the lowers
    /// to look in: its origin, metadata-only or redirect marker says so).
    fn has_lower_marker(&self, obj: BorrowedFd<'_>) -> bool {
        [self.ns.origin(), self.ns.metacopy(), self.ns.redirect()]
            .iter()
            .any(|n| sys::get_xattr(obj, OsStr::new(n)).is_ok())
    }

    /// Every change, in `podman diff`'s order and by its rules: a whiteout
    /// is `D`; an opaque directory over a lower one is `D` (replaced), its
    /// entries `A`; a path a lower layer has is `C` (a directory only when
    /// its size, mode or modification time differ), else `A`; the parent of
    /// an `A` or `D` is `C` once. Without lowers, `C` means the object
    /// carries a marker of a lower origin.
    pub fn changes(&self) -> Result<Vec<Change>, String> {
        let mut out = Vec::new();
        let mut changed_dirs = HashSet::new();
        self.walk_changes(
            self.upper.as_fd(),
            Path::new("/"),
            &mut out,
            &mut changed_dirs,
        )?;
        Ok(out)
    }

    fn walk_changes(
        &self,
        dir: BorrowedFd<'_>,
        at: &Path,
        out: &mut Vec<Change>,
        changed_dirs: &mut HashSet<PathBuf>,
    ) -> Result<(), String> {
        for e in Self::entries(dir, at)? {
            let path = at.join(&e.name);
            let obj = sys::open_path(dir, &e.name).map_err(|x| err(path.display(), x))?;
            let is_dir = sys::is_dir(&e.st);
            let renamed = is_dir && self.is_redirected(obj.as_fd());
            if renamed && let Some(merged) = &self.merged {
                self.renamed_changes(merged, &path, out, changed_dirs)?;
                continue;
            }
            if renamed {
                tracing::warn!(
                    "{} is a renamed lower directory: what it holds from the lowers is listed with --lowers",
                    path.display()
                );
            }
            if let Some(kind) = self.classify(obj.as_fd(), &path, &e.st)? {
                if is_dir {
                    changed_dirs.insert(path.clone());
                }
                let parent = at.to_path_buf();
                if kind != Kind::Changed
                    && parent != Path::new("/")
                    && changed_dirs.insert(parent.clone())
                {
                    out.push(Change {
                        kind: Kind::Changed,
                        path: parent,
                    });
                }
                out.push(Change {
                    kind,
                    path: path.clone(),
                });
            }
            if is_dir {
                self.walk_changes(obj.as_fd(), &path, out, changed_dirs)?;
            }
        }
        Ok(())
    }

    /// A renamed directory at `path` (`/a/b`): a new directory there, with
    /// everything it holds added (its upper entries and those of the lower
    /// directories it came from), as a walk of the merged tree lists it;
    /// over a lower directory of that path it replaces it (`D`), as an
    /// opaque directory does. Its old path is a whiteout of its own.
    fn renamed_changes(
        &self,
        merged: &MergedView,
        path: &Path,
        out: &mut Vec<Change>,
        changed_dirs: &mut HashSet<PathBuf>,
    ) -> Result<(), String> {
        let components: Vec<&OsStr> = path.iter().skip(1).collect();
        let kind = match self.in_lowers(&components) {
            Some(_) => Kind::Deleted,
            None => Kind::Added,
        };
        changed_dirs.insert(path.to_path_buf());
        let parent = path.parent().unwrap_or(Path::new("/")).to_path_buf();
        if parent != Path::new("/") && changed_dirs.insert(parent.clone()) {
            out.push(Change {
                kind: Kind::Changed,
                path: parent,
            });
        }
        out.push(Change {
            kind,
            path: path.to_path_buf(),
        });
        let rel = path.strip_prefix("/").unwrap_or(path);
        let dir = merged.lookup(rel)?;
        list_added(merged, &dir, path, out)
    }

    /// The kind of change of the upper object `obj` at `path`; None for a
    /// directory that is only there as the parent of a change.
    fn classify(
        &self,
        obj: BorrowedFd<'_>,
        path: &Path,
        st: &Stat,
    ) -> Result<Option<Kind>, String> {
        if format::is_whiteout_dev(st) {
            return Ok(Some(Kind::Deleted));
        }
        let components: Vec<&OsStr> = path.iter().skip(1).collect();
        if self.lowers.is_empty() {
            return Ok(Some(match self.has_lower_marker(obj) {
                true => Kind::Changed,
                false => Kind::Added,
            }));
        }
        let Some((_, lower)) = self.in_lowers(&components) else {
            return Ok(Some(Kind::Added));
        };
        if sys::is_dir(st) && self.is_opaque(obj) {
            return Ok(Some(Kind::Deleted));
        }
        if sys::is_dir(st) && sys::is_dir(&lower) && same_dir_attrs(st, &lower) {
            return Ok(None);
        }
        Ok(Some(Kind::Changed))
    }
}

/// Everything merged directory `dir` (at `at`, `/a/b`) holds, as added.
fn list_added(
    merged: &MergedView,
    dir: &merged::MergedObj,
    at: &Path,
    out: &mut Vec<Change>,
) -> Result<(), String> {
    let rel = at.strip_prefix("/").unwrap_or(at);
    for (name, obj) in merged.children(dir, rel)? {
        let path = at.join(&name);
        out.push(Change {
            kind: Kind::Added,
            path: path.clone(),
        });
        if sys::is_dir(&obj.st) {
            list_added(merged, &obj, &path, out)?;
        }
    }
    Ok(())
}

/// Whether two directories look the same to `podman diff`: size, mode and
/// modification time (equal, or equal seconds when one has no nanoseconds).
fn same_dir_attrs(a: &Stat, b: &Stat) -> bool {
    let same_time = a.st_mtime == b.st_mtime
        && (a.st_mtime_nsec == b.st_mtime_nsec || a.st_mtime_nsec == 0 || b.st_mtime_nsec == 0);
    a.st_size == b.st_size && a.st_mode == b.st_mode && same_time
}

/// The object at `path` under `root`, each component opened without
/// following a symlink.
fn lookup(root: BorrowedFd<'_>, path: &[&OsStr]) -> Option<(OwnedFd, Stat)> {
    let mut cur = sys::open_path(root, OsStr::new(".")).ok()?;
    for name in path {
        let st = sys::stat_at(cur.as_fd(), name).ok()?;
        if format::is_whiteout_dev(&st) {
            return None;
        }
        cur = sys::open_path(cur.as_fd(), name).ok()?;
    }
    let st = sys::stat_fd(cur.as_fd()).ok()?;
    Some((cur, st))
}

// --- the command

/// `unionfs diff`'s arguments.
#[derive(clap::Args, Debug)]
pub struct DiffRequest {
    /// The lower layers the upper was made over, top-most first, separated
    /// by ':' as for mount: then A and C are told apart by looking there, as
    /// podman does, and metadata-only copies can be exported.
    #[arg(long, value_name = "LOWERS")]
    pub lowers: Option<OsString>,
    /// Print the changes as JSON (podman diff --format json's shape).
    #[arg(long, conflicts_with = "tar")]
    pub json: bool,
    /// Write the changes as an OCI layer tarball to FILE ('-' for stdout).
    #[arg(long, value_name = "FILE")]
    pub tar: Option<PathBuf>,
    /// Read the overlay markers as user.overlay.* (the kernel's userxattr;
    /// the default for a user other than root).
    #[arg(long)]
    pub userxattr: bool,
    /// The upper directory (of kernel overlayfs, unionfs or fuse-overlayfs;
    /// a live mount's too).
    pub upper: PathBuf,
}

/// Bad input or a failure, with the exit code it ends with.
pub struct DiffFailure {
    pub code: u8,
    pub message: String,
}

fn bad_input(message: String) -> DiffFailure {
    DiffFailure { code: 2, message }
}

fn failure(message: String) -> DiffFailure {
    DiffFailure { code: 1, message }
}

/// Runs `unionfs diff`.
pub fn run(req: &DiffRequest) -> Result<(), DiffFailure> {
    let dir = |what: &str, p: &Path| match std::fs::metadata(p) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(bad_input(format!(
            "{what} {} is not a directory",
            p.display()
        ))),
        Err(e) => Err(bad_input(format!("{what} {}: {e}", p.display()))),
    };
    dir("upper directory", &req.upper)?;
    let lowers = match &req.lowers {
        Some(l) => crate::options::split_lowers(l).map_err(bad_input)?,
        None => Vec::new(),
    };
    for l in &lowers {
        dir("lower directory", l)?;
    }
    let rootless = !nix::unistd::geteuid().is_root();
    let ns = match req.userxattr || rootless {
        true => XattrNamespace::User,
        false => XattrNamespace::Trusted,
    };
    if rootless {
        // A rootless container's upper holds objects of the user's
        // subordinate ids, which the user cannot read as themself: read it
        // as the container's root, with ids as the container saw them.
        // Where no user namespace can be made, read as the user is.
        if let Err(e) = crate::userns::enter_user_namespace() {
            tracing::debug!("reading the upper with the user's own ids: {e}");
        }
    }
    let set = Changeset::open(&req.upper, &lowers, ns).map_err(failure)?;
    match &req.tar {
        Some(to) => export(&set, to),
        None => print_changes(&set, req.json),
    }
}

fn print_changes(set: &Changeset, json: bool) -> Result<(), DiffFailure> {
    let changes = set.changes().map_err(failure)?;
    let mut text = String::new();
    match json {
        true => {
            text = serde_json::to_string_pretty(&ChangesJson::of(&changes))
                .map_err(|e| failure(e.to_string()))?;
            text.push('\n');
        }
        false => {
            for c in &changes {
                text.push_str(&format!("{} {}\n", c.kind.letter(), c.path.display()));
            }
        }
    }
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        Ok(()) => Ok(()),
        // A reader that went away (`| head`) is not a failure.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(failure(format!("cannot write the changes: {e}"))),
    }
}

/// Writes the layer to `to` (made with mode 0644, or replaced), or stdout.
/// Nothing is left half-written: a file is written under a temporary name
/// beside it and renamed into place once complete; stdout, which cannot be
/// taken back, gets the layer only after a dry run has reached and opened
/// everything in it.
fn export(set: &Changeset, to: &Path) -> Result<(), DiffFailure> {
    if to == Path::new("-") {
        write_layer(set, std::io::sink(), true).map_err(failure)?;
        let out = std::io::BufWriter::new(std::io::stdout().lock());
        return write_layer(set, out, false).map_err(failure);
    }
    let (temp, file) = temporary_beside(to)?;
    let written = write_layer(set, std::io::BufWriter::new(&file), false)
        .and_then(|()| {
            file.sync_all()
                .map_err(|e| format!("cannot write {}: {e}", to.display()))
        })
        .and_then(|()| {
            std::fs::rename(&temp, to).map_err(|e| format!("cannot write {}: {e}", to.display()))
        });
    if let Err(msg) = written {
        let _ = std::fs::remove_file(&temp);
        return Err(failure(msg));
    }
    Ok(())
}

/// A new file (mode 0644) in the directory of `to`, named after it.
fn temporary_beside(to: &Path) -> Result<(PathBuf, std::fs::File), DiffFailure> {
    use std::os::unix::fs::OpenOptionsExt;
    let name = to.file_name().unwrap_or(OsStr::new("layer"));
    let mut temp_name = OsString::from(".");
    temp_name.push(name);
    temp_name.push(format!(".unionfs-{}", std::process::id()));
    let temp = to.with_file_name(temp_name);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&temp)
        .map_err(|e| bad_input(format!("cannot write {}: {e}", to.display())))?;
    Ok((temp, file))
}
