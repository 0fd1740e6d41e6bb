//! Images: an OCI image layout directory, or an OCI or docker archive,
//! read and checked (`source`, `manifest`), its layers unpacked once into
//! a content-addressed layer store (`store`, `unpack`) and stacked as the
//! lowers of a union; its config gives the run defaults (`Entrypoint`,
//! `Cmd`, `Env`, `WorkingDir`, `User`).

mod digest;
mod manifest;
mod source;
mod store;
mod unpack;

use std::path::{Path, PathBuf};

pub use manifest::RunDefaults;
pub use store::{Store, default_dir as default_store_dir};

/// An image read from disk and checked, not yet unpacked.
pub struct Image {
    source: source::Source,
    resolved: manifest::Resolved,
}

/// Splits `PATH[:TAG]`: the whole when it exists, else the shortest prefix
/// before a ':' that exists is the path, so that neither a path with a ':'
/// nor a tag with one needs quoting.
pub fn split_reference(reference: &str) -> (PathBuf, Option<String>) {
    if Path::new(reference).exists() {
        return (PathBuf::from(reference), None);
    }
    for (i, _) in reference.match_indices(':') {
        let (path, tag) = (&reference[..i], &reference[i + 1..]);
        if !path.is_empty() && !tag.is_empty() && Path::new(path).exists() {
            return (PathBuf::from(path), Some(tag.to_string()));
        }
    }
    (PathBuf::from(reference), None)
}

impl Image {
    /// Reads the image `PATH[:TAG]`: its index, manifest and config, each
    /// checked against its digest. Nothing is written.
    pub fn open(reference: &str) -> Result<Image, String> {
        let (path, tag) = split_reference(reference);
        let source = source::Source::open(&path)?;
        let resolved = manifest::resolve(&source, tag.as_deref())
            .map_err(|e| format!("image {}: {e}", path.display()))?;
        Ok(Image { source, resolved })
    }

    pub fn defaults(&self) -> &RunDefaults {
        &self.resolved.defaults
    }

    /// Unpacks the layers the store lacks; gives the layer directories
    /// top-most first, as lowers are listed.
    pub fn unpack_into(&self, store: &Store) -> Result<Vec<PathBuf>, String> {
        for layer in &self.resolved.layers {
            store.add(&self.source, layer)?;
        }
        Ok(self
            .resolved
            .layers
            .iter()
            .rev()
            .map(|l| store.layer_dir(&l.diff_id))
            .collect())
    }
}
