//! The layer store: each layer unpacked once, in a directory named by the
//! digest of its uncompressed tar (`layers/HEX`), shared by every image
//! that has it. A layer is unpacked into `tmp/PID.HEX`, checked against
//! its digests, synced and renamed into place, so a layer present is a
//! layer complete; what a killed unpack left in `tmp/` is removed by the
//! next one. The store and its directories are the user's alone (0700) and
//! are refused when another user could write them.

use std::ffi::OsStr;
use std::io::{BufReader, Read};
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::signal::kill;
use nix::unistd::{Pid, geteuid};
use tracing::{debug, info, warn};

use super::digest::{Digest, HashingReader};
use super::manifest::{Compression, LayerRef};
use super::source::Source;
use super::unpack::unpack;
use crate::sys;
use crate::tree::remove_tree;

pub struct Store {
    dir: PathBuf,
}

/// Where the store is without `--store`: `/var/lib/unionfs` for root,
/// else `$XDG_DATA_HOME/unionfs` (by default `~/.local/share/unionfs`).
pub fn default_dir() -> Result<PathBuf, String> {
    if geteuid().is_root() {
        return Ok(PathBuf::from("/var/lib/unionfs"));
    }
    let non_empty = |k| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(d) = non_empty("XDG_DATA_HOME") {
        return Ok(d.join("unionfs"));
    }
    non_empty("HOME")
        .map(|h| h.join(".local/share/unionfs"))
        .ok_or_else(|| {
            "no layer store: neither XDG_DATA_HOME nor HOME is set (name one with --store DIR)"
                .into()
        })
}

impl Store {
    /// Opens the store at `dir`, making it (and its parents) if missing.
    pub fn open(dir: &Path) -> Result<Store, String> {
        if let Some(parent) = dir.parent() {
            make_ancestors(parent)?;
        }
        let store = Store {
            dir: dir.to_path_buf(),
        };
        for d in [
            store.dir.clone(),
            store.dir.join("layers"),
            store.dir.join("tmp"),
        ] {
            private_dir(&d)?;
        }
        store.remove_stale_unpacks();
        Ok(store)
    }

    /// Where the layer with this uncompressed digest is (or will be).
    pub fn layer_dir(&self, diff_id: &Digest) -> PathBuf {
        self.dir.join("layers").join(diff_id.hex())
    }

    pub fn has(&self, diff_id: &Digest) -> bool {
        self.layer_dir(diff_id).is_dir()
    }

    /// Unpacks the layer from `src`, unless it is there already.
    pub fn add(&self, src: &Source, layer: &LayerRef) -> Result<(), String> {
        if self.has(&layer.diff_id) {
            debug!(layer = %layer.diff_id, "layer already in the store");
            return Ok(());
        }
        info!(layer = %layer.diff_id, file = layer.file, "unpacking layer");
        let tmp =
            self.dir
                .join("tmp")
                .join(format!("{}.{}", std::process::id(), layer.diff_id.hex()));
        let _ = remove_path(&tmp);
        crate::run::make_dir(&tmp, 0o755)
            .map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
        let result = self
            .unpack_checked(src, layer, &tmp)
            .and_then(|()| self.publish(&tmp, &layer.diff_id));
        if result.is_err() {
            let _ = remove_path(&tmp);
        }
        result
    }

    fn unpack_checked(&self, src: &Source, layer: &LayerRef, tmp: &Path) -> Result<(), String> {
        let (reader, size) = src.open_file(&layer.file)?;
        let mut blob = HashingReader::new(BufReader::with_capacity(1 << 20, reader));
        let decoded: Box<dyn Read + '_> = match layer.compression {
            Compression::None => Box::new(&mut blob),
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(&mut blob)),
            Compression::Zstd => Box::new(
                zstd::stream::read::Decoder::new(&mut blob)
                    .map_err(|e| format!("layer {}: {e}", layer.file))?,
            ),
        };
        let mut tar_stream = HashingReader::new(decoded);
        let unpacked = unpack(&mut tar_stream, tmp);
        // A corrupt blob is reported as such, before what the tar parser
        // made of it.
        let finished = tar_stream.finish();
        let blob_seen = blob.finish();
        if let (Some((want, want_size)), Ok((got, got_size))) = (&layer.blob, &blob_seen)
            && (got != want || got_size != want_size)
        {
            return Err(format!(
                "layer {} is corrupt: it hashes to {got} ({got_size} bytes), the manifest says {want} ({want_size} bytes); nothing was run",
                layer.file
            ));
        }
        let (diff_id, _) = finished.map_err(|e| format!("layer {}: {e}", layer.file))?;
        let done = unpacked.map_err(|e| format!("layer {}: {e}", layer.file))?;
        if diff_id != layer.diff_id {
            return Err(format!(
                "layer {} is corrupt: its tar hashes to {diff_id}, the image config says {}; nothing was run",
                layer.file, layer.diff_id
            ));
        }
        blob_seen.map_err(|e| format!("layer {}: {e}", layer.file))?;
        debug!(size, entries = done.entries, "layer unpacked");
        if done.devices_skipped + done.owners_unmapped + done.xattrs_skipped + done.kinds_skipped
            > 0
        {
            warn!(
                "layer {}: {} device nodes not made, {} entries kept as root's (owner not mapped), {} extended attributes not set, {} entries of unknown kinds left out",
                layer.diff_id,
                done.devices_skipped,
                done.owners_unmapped,
                done.xattrs_skipped,
                done.kinds_skipped
            );
        }
        Ok(())
    }

    /// Syncs the unpacked layer and renames it into place; a concurrent run
    /// that placed the same layer first wins.
    fn publish(&self, tmp: &Path, diff_id: &Digest) -> Result<(), String> {
        let fd = sys::open_dir(tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
        nix::unistd::syncfs(&fd).map_err(|e| format!("cannot sync the store: {e}"))?;
        let tmp_dir = sys::open_dir(&self.dir.join("tmp")).map_err(|e| format!("{e}"))?;
        let layers = sys::open_dir(&self.dir.join("layers")).map_err(|e| format!("{e}"))?;
        let name = tmp.file_name().unwrap_or_default();
        match sys::rename_at(
            tmp_dir.as_fd(),
            name,
            layers.as_fd(),
            OsStr::new(diff_id.hex()),
            libc::RENAME_NOREPLACE,
        ) {
            Ok(()) => {}
            Err(Errno::EEXIST | Errno::ENOTEMPTY) => {
                let _ = remove_tree(tmp_dir.as_fd(), name);
            }
            Err(e) => return Err(format!("cannot place layer {diff_id} in the store: {e}")),
        }
        sys::fsync(layers.as_fd(), false).map_err(|e| format!("cannot sync the store: {e}"))
    }

    /// Removes the unpacks of launchers that no longer exist.
    fn remove_stale_unpacks(&self) {
        let tmp = self.dir.join("tmp");
        let Ok(entries) = std::fs::read_dir(&tmp) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let pid = name
                .to_str()
                .and_then(|n| n.split('.').next())
                .and_then(|p| p.parse::<i32>().ok());
            if let Some(pid) = pid
                && pid > 0
                && kill(Pid::from_raw(pid), None) == Err(Errno::ESRCH)
            {
                debug!(dir = %e.path().display(), "removing an unpack a killed launcher left");
                let _ = remove_path(&e.path());
            }
        }
    }
}

/// Makes the missing directories of `dir`, each 0700 (as the XDG base
/// directory rules ask of `~/.local/share` and the like).
fn make_ancestors(dir: &Path) -> Result<(), String> {
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        make_ancestors(parent)?;
    }
    match crate::run::make_dir(dir, 0o700) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            Err(format!("cannot create {}: {e}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// Makes `dir` 0700 if missing; refuses it when it is not ours or another
/// user could write it.
fn private_dir(dir: &Path) -> Result<(), String> {
    match crate::run::make_dir(dir, 0o700) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(format!(
                "cannot create the layer store {}: {e}",
                dir.display()
            ));
        }
    }
    let meta = std::fs::symlink_metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let me = geteuid().as_raw();
    if !meta.is_dir() {
        return Err(format!(
            "the layer store {} is not a directory",
            dir.display()
        ));
    }
    if meta.uid() != me || meta.permissions().mode() & 0o022 != 0 {
        return Err(format!(
            "the layer store {} is not safe: owned by uid {} with mode {:04o}, where uid {me} and no write access for others is needed (chmod go-w it, or use another --store)",
            dir.display(),
            meta.uid(),
            meta.permissions().mode() & 0o7777
        ));
    }
    Ok(())
}

/// Removes a file or a whole tree by path (its parent is opened once).
fn remove_path(path: &Path) -> Result<(), Errno> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(Errno::EINVAL);
    };
    let fd = sys::open_dir_path(parent)?;
    remove_tree(fd.as_fd(), name)
}
