//! Where an image's files are read from: an OCI image layout directory, or
//! an OCI or docker archive (a tar file, read in place: its members are
//! located once and then read at their offsets, never copied out).

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};

/// JSON documents (index, manifests, configs) larger than this are refused.
const MAX_DOCUMENT: u64 = 4 << 20;

/// The files of an image, by their path inside the layout.
pub enum Source {
    Dir(PathBuf),
    Archive {
        path: PathBuf,
        members: HashMap<String, Member>,
    },
}

/// A regular file inside an archive.
#[derive(Clone, Copy, Debug)]
pub struct Member {
    offset: u64,
    size: u64,
}

impl Source {
    /// Opens `path` as an image layout directory or archive.
    pub fn open(path: &Path) -> Result<Source, String> {
        let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if meta.is_dir() {
            return Ok(Source::Dir(path.to_path_buf()));
        }
        if !meta.is_file() {
            return Err(not_an_image(path, "neither a directory nor a file"));
        }
        let mut file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut magic = [0u8; 4];
        let n = file.read(&mut magic).unwrap_or(0);
        if n >= 2 && magic[..2] == [0x1f, 0x8b] || n == 4 && magic == [0x28, 0xb5, 0x2f, 0xfd] {
            return Err(format!(
                "{} is a compressed archive: decompress it first (gunzip or unzstd), then run the .tar",
                path.display()
            ));
        }
        file.seek(SeekFrom::Start(0))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let members = index_archive(file).map_err(|e| not_an_image(path, &e))?;
        Ok(Source::Archive {
            path: path.to_path_buf(),
            members,
        })
    }

    /// Whether the layout has this file.
    pub fn has(&self, name: &str) -> bool {
        match self {
            Source::Dir(dir) => dir.join(name).is_file(),
            Source::Archive { members, .. } => members.contains_key(name),
        }
    }

    /// A reader over the file `name` and its size.
    pub fn open_file(&self, name: &str) -> Result<(Box<dyn Read>, u64), String> {
        check_member_name(name)?;
        match self {
            Source::Dir(dir) => {
                let p = dir.join(name);
                let f = File::open(&p).map_err(|e| format!("{}: {e}", p.display()))?;
                let size = f
                    .metadata()
                    .map_err(|e| format!("{}: {e}", p.display()))?
                    .len();
                Ok((Box::new(f), size))
            }
            Source::Archive { path, members } => {
                let m = members
                    .get(name)
                    .ok_or_else(|| format!("{}: no {name} in the archive", path.display()))?;
                let mut f = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
                f.seek(SeekFrom::Start(m.offset))
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                Ok((Box::new(f.take(m.size)), m.size))
            }
        }
    }

    /// The whole of a small file (a JSON document).
    pub fn read_document(&self, name: &str) -> Result<Vec<u8>, String> {
        let (mut r, size) = self.open_file(name)?;
        if size > MAX_DOCUMENT {
            return Err(format!(
                "{name} is {size} bytes, too large for an image document"
            ));
        }
        let mut buf = Vec::with_capacity(size as usize);
        r.read_to_end(&mut buf)
            .map_err(|e| format!("cannot read {name}: {e}"))?;
        Ok(buf)
    }
}

fn not_an_image(path: &Path, why: &str) -> String {
    format!(
        "{} is not an image ({why}): give an OCI image layout directory or an OCI or docker archive",
        path.display()
    )
}

/// Names inside a layout are relative and never climb out of it.
fn check_member_name(name: &str) -> Result<(), String> {
    let p = Path::new(name);
    if p.components().all(|c| matches!(c, Component::Normal(_))) {
        Ok(())
    } else {
        Err(format!("refusing the image file name '{name}'"))
    }
}

/// Locates the regular files of an archive; symbolic links between its
/// members (docker archives link `ID/layer.tar` to the layer) are resolved.
fn index_archive(file: File) -> Result<HashMap<String, Member>, String> {
    let mut archive = tar::Archive::new(file);
    let mut members = HashMap::new();
    let mut links = Vec::new();
    let entries = archive
        .entries_with_seek()
        .map_err(|_| "not a tar archive".to_string())?;
    for entry in entries {
        // The parser's detail may quote the file's bytes: left out.
        let entry = entry.map_err(|_| "not a tar archive".to_string())?;
        let name = normalize(&entry.path_bytes());
        match entry.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let m = Member {
                    offset: entry.raw_file_position(),
                    size: entry.size(),
                };
                members.insert(name, m);
            }
            tar::EntryType::Symlink => {
                if let Some(target) = entry.link_name_bytes() {
                    links.push((name, String::from_utf8_lossy(&target).into_owned()));
                }
            }
            _ => {}
        }
    }
    for (name, target) in links {
        let dir = Path::new(&name).parent().unwrap_or(Path::new(""));
        let resolved = normalize(dir.join(&target).to_string_lossy().as_bytes());
        if let Some(m) = members.get(&resolved).copied() {
            members.insert(name, m);
        }
    }
    if members.is_empty() {
        return Err("no files in it".into());
    }
    Ok(members)
}

/// `./a/../b/c` → `b/c`, with `..` above the top dropped.
fn normalize(path: &[u8]) -> String {
    let text = String::from_utf8_lossy(path);
    let mut out: Vec<&str> = Vec::new();
    for part in text.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            p => out.push(p),
        }
    }
    out.join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_names_are_normalized_and_checked() {
        assert_eq!(normalize(b"./blobs/sha256/ab"), "blobs/sha256/ab");
        assert_eq!(normalize(b"id/../ab.tar"), "ab.tar");
        assert!(check_member_name("../x").is_err());
        assert!(check_member_name("/etc/passwd").is_err());
        assert!(check_member_name("blobs/sha256/ab").is_ok());
    }
}
