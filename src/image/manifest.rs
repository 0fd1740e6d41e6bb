//! The image's documents: the OCI index (or docker `manifest.json`), the
//! manifest chosen by tag and platform, and the config with its run
//! defaults. Every document read is checked against its digest.

use std::collections::HashMap;

use serde::Deserialize;

use super::digest::Digest;
use super::source::Source;

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const CONFIG_TYPES: &[&str] = &[
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
];
const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// How a layer's tar stream is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// A layer to stack: where its blob is, what it must hash to, and the
/// digest of its uncompressed tar (its name in the layer store).
#[derive(Clone, Debug)]
pub struct LayerRef {
    pub file: String,
    pub blob: Option<(Digest, u64)>,
    pub diff_id: Digest,
    pub compression: Compression,
}

/// What the image's config says a container runs with.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RunDefaults {
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    pub env: Option<Vec<String>>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
}

/// An image read and checked: its layers bottom-most first, and its config.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub layers: Vec<LayerRef>,
    pub defaults: RunDefaults,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    media_type: Option<String>,
    digest: String,
    size: u64,
    #[serde(default)]
    annotations: HashMap<String, String>,
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    architecture: String,
    os: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Index {
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    media_type: Option<String>,
    config: Descriptor,
    layers: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct ConfigFile {
    #[serde(default)]
    config: Option<RunDefaults>,
    rootfs: RootFs,
}

#[derive(Deserialize)]
struct RootFs {
    diff_ids: Vec<String>,
}

/// One image of a docker archive's `manifest.json`.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// Reads the image tagged `tag` (or the only one) from `src`.
pub fn resolve(src: &Source, tag: Option<&str>) -> Result<Resolved, String> {
    if src.has("index.json") {
        resolve_oci(src, tag)
    } else if src.has("manifest.json") {
        resolve_docker(src, tag)
    } else {
        Err("it has no index.json (OCI layout) or manifest.json (docker archive): give an OCI image layout directory or an OCI or docker archive".into())
    }
}

fn parse<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, String> {
    serde_json::from_slice(bytes).map_err(|e| format!("malformed {what}: {e}"))
}

fn resolve_oci(src: &Source, tag: Option<&str>) -> Result<Resolved, String> {
    let index: Index = parse("index.json", &src.read_document("index.json")?)?;
    let chosen = choose_by_tag(&index.manifests, tag)?;
    let manifest = read_manifest(src, chosen, 0)?;
    let config_type = manifest.config.media_type.as_deref().unwrap_or_default();
    if !CONFIG_TYPES.contains(&config_type) {
        return Err(unknown_media_type("config", config_type));
    }
    let config: ConfigFile = parse("image config", &read_blob(src, &manifest.config)?)?;
    let diff_ids = diff_ids(&config, manifest.layers.len())?;
    let layers = manifest
        .layers
        .iter()
        .zip(diff_ids)
        .map(|(d, diff_id)| {
            let media_type = d.media_type.as_deref().unwrap_or_default();
            let digest = Digest::parse(&d.digest)?;
            Ok(LayerRef {
                file: blob_file(&digest),
                blob: Some((digest, d.size)),
                diff_id,
                compression: layer_compression(media_type)?,
            })
        })
        .collect::<Result<_, String>>()?;
    Ok(Resolved {
        layers,
        defaults: config.config.unwrap_or_default(),
    })
}

/// The manifest a descriptor names, descending through image indexes to
/// this machine's platform.
fn read_manifest(src: &Source, d: &Descriptor, depth: u32) -> Result<Manifest, String> {
    let media_type = d.media_type.as_deref().unwrap_or_default();
    let bytes = read_blob(src, d)?;
    match media_type {
        OCI_MANIFEST | DOCKER_MANIFEST => parse("manifest", &bytes),
        OCI_INDEX | DOCKER_LIST if depth < 4 => {
            let index: Index = parse("image index", &bytes)?;
            let here = platform_here();
            let m = index
                .manifests
                .iter()
                .find(|m| {
                    m.platform
                        .as_ref()
                        .is_some_and(|p| p.os == "linux" && p.architecture == here)
                })
                .ok_or_else(|| format!("the image has no variant for linux/{here}"))?;
            read_manifest(src, m, depth + 1)
        }
        _ => {
            // A manifest without a media type in its descriptor says its own.
            let m: Manifest = parse("manifest", &bytes)?;
            match m.media_type.as_deref() {
                Some(OCI_MANIFEST | DOCKER_MANIFEST) => Ok(m),
                Some(t) => Err(unknown_media_type("manifest", t)),
                None if media_type.is_empty() => Ok(m),
                None => Err(unknown_media_type("manifest", media_type)),
            }
        }
    }
}

fn platform_here() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// The manifest tagged `tag`; without a tag, the only one (or `latest`).
fn choose_by_tag<'a>(
    manifests: &'a [Descriptor],
    tag: Option<&str>,
) -> Result<&'a Descriptor, String> {
    let tags: Vec<&str> = manifests
        .iter()
        .filter_map(|m| m.annotations.get(REF_NAME).map(String::as_str))
        .collect();
    let found = match tag {
        Some(t) => manifests.iter().find(|m| {
            m.annotations
                .get(REF_NAME)
                .is_some_and(|r| tag_matches(r, t))
        }),
        None if manifests.len() == 1 => manifests.first(),
        None => manifests.iter().find(|m| {
            m.annotations
                .get(REF_NAME)
                .is_some_and(|r| tag_matches(r, "latest"))
        }),
    };
    found.ok_or_else(|| missing_tag(tag, manifests.len(), &tags))
}

fn missing_tag(tag: Option<&str>, count: usize, tags: &[&str]) -> String {
    let known = if tags.is_empty() {
        "none tagged".to_string()
    } else {
        format!("tags: {}", tags.join(", "))
    };
    match tag {
        Some(t) => format!("no image tagged '{t}' in it ({known}): name one of them as PATH:TAG"),
        None if count == 0 => "it holds no image".to_string(),
        None => format!("it holds {count} images ({known}): name one as PATH:TAG"),
    }
}

/// `v1` names `localhost/probe:v1`, as does `probe:v1` and the whole name.
fn tag_matches(reference: &str, tag: &str) -> bool {
    reference == tag
        || reference.strip_suffix(tag).is_some_and(|head| {
            head.ends_with(':') && !tag.contains(':') || head.ends_with('/') && tag.contains(':')
        })
}

fn blob_file(d: &Digest) -> String {
    format!("blobs/sha256/{}", d.hex())
}

/// A document blob, checked against its descriptor's digest and size.
fn read_blob(src: &Source, d: &Descriptor) -> Result<Vec<u8>, String> {
    let digest = Digest::parse(&d.digest)?;
    let bytes = src.read_document(&blob_file(&digest))?;
    let got = Digest::of(&bytes);
    if got != digest || bytes.len() as u64 != d.size {
        return Err(format!(
            "blob {digest} is corrupt: its content hashes to {got} ({} bytes, {} expected)",
            bytes.len(),
            d.size
        ));
    }
    Ok(bytes)
}

fn diff_ids(config: &ConfigFile, layers: usize) -> Result<Vec<Digest>, String> {
    if config.rootfs.diff_ids.len() != layers {
        return Err(format!(
            "the image config lists {} layer digests for {layers} layers",
            config.rootfs.diff_ids.len()
        ));
    }
    config
        .rootfs
        .diff_ids
        .iter()
        .map(|d| Digest::parse(d))
        .collect()
}

fn layer_compression(media_type: &str) -> Result<Compression, String> {
    let base = media_type.replace(".nondistributable", "");
    match base.as_str() {
        "application/vnd.oci.image.layer.v1.tar"
        | "application/vnd.docker.image.rootfs.diff.tar" => Ok(Compression::None),
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip"
        | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Ok(Compression::Gzip),
        "application/vnd.oci.image.layer.v1.tar+zstd" => Ok(Compression::Zstd),
        _ => Err(unknown_media_type("layer", media_type)),
    }
}

fn unknown_media_type(what: &str, media_type: &str) -> String {
    let shown = if media_type.is_empty() {
        "(none)"
    } else {
        media_type
    };
    format!(
        "unknown {what} media type {shown}: only OCI and docker images with tar, gzip or zstd layers can be run"
    )
}

fn resolve_docker(src: &Source, tag: Option<&str>) -> Result<Resolved, String> {
    let entries: Vec<DockerEntry> = parse("manifest.json", &src.read_document("manifest.json")?)?;
    let tags: Vec<&str> = entries
        .iter()
        .flat_map(|e| e.repo_tags.iter().flatten().map(String::as_str))
        .collect();
    let chosen = match tag {
        Some(t) => entries
            .iter()
            .find(|e| e.repo_tags.iter().flatten().any(|r| tag_matches(r, t))),
        None if entries.len() == 1 => entries.first(),
        None => None,
    }
    .ok_or_else(|| missing_tag(tag, entries.len(), &tags))?;
    let config_bytes = src.read_document(&chosen.config)?;
    // The config is named by its digest (`HEX.json` or `blobs/sha256/HEX`).
    let stem = chosen.config.rsplit('/').next().unwrap_or_default();
    let named = Digest::parse(&format!("sha256:{}", stem.trim_end_matches(".json")))?;
    if Digest::of(&config_bytes) != named {
        return Err(format!(
            "the image config {} is corrupt: it does not hash to its name",
            chosen.config
        ));
    }
    let config: ConfigFile = parse("image config", &config_bytes)?;
    let diff_ids = diff_ids(&config, chosen.layers.len())?;
    let layers = chosen
        .layers
        .iter()
        .zip(diff_ids)
        .map(|(file, diff_id)| LayerRef {
            file: file.clone(),
            blob: None,
            diff_id,
            // Docker archives hold their layers as plain tar.
            compression: Compression::None,
        })
        .collect();
    Ok(Resolved {
        layers,
        defaults: config.config.unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_match_short_and_full_names() {
        assert!(tag_matches("localhost/probe:v1", "v1"));
        assert!(tag_matches("localhost/probe:v1", "probe:v1"));
        assert!(tag_matches("localhost/probe:v1", "localhost/probe:v1"));
        assert!(tag_matches("v1", "v1"));
        assert!(!tag_matches("localhost/probe:v10", "v1"));
        assert!(!tag_matches("localhost/xprobe:v1", "probe:v1"));
    }

    /// Writes `data` as a blob of the layout in `dir`; gives its descriptor.
    fn blob(dir: &std::path::Path, media_type: &str, data: &[u8]) -> serde_json::Value {
        let d = Digest::of(data);
        std::fs::write(dir.join("blobs/sha256").join(d.hex()), data).unwrap();
        serde_json::json!({"mediaType": media_type, "digest": d.to_string(), "size": data.len()})
    }

    #[test]
    fn a_multi_platform_index_resolves_to_this_machine() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("blobs/sha256")).unwrap();
        let layer = b"not unpacked here";
        let layer_d = Digest::of(layer);
        let mut platforms = Vec::new();
        for (arch, cmd) in [("s390x", "other"), (platform_here(), "mine")] {
            let config = serde_json::json!({
                "config": {"Cmd": [cmd]},
                "rootfs": {"type": "layers", "diff_ids": [layer_d.to_string()]},
            });
            let config = blob(root, CONFIG_TYPES[0], config.to_string().as_bytes());
            let layer = blob(root, "application/vnd.oci.image.layer.v1.tar", layer);
            let manifest =
                serde_json::json!({"schemaVersion": 2, "config": config, "layers": [layer]});
            let mut m = blob(root, OCI_MANIFEST, manifest.to_string().as_bytes());
            m["platform"] = serde_json::json!({"os": "linux", "architecture": arch});
            platforms.push(m);
        }
        let nested = serde_json::json!({"schemaVersion": 2, "manifests": platforms});
        let mut top = blob(root, OCI_INDEX, nested.to_string().as_bytes());
        top["annotations"] = serde_json::json!({REF_NAME: "multi:1"});
        let index = serde_json::json!({"schemaVersion": 2, "manifests": [top]});
        std::fs::write(root.join("index.json"), index.to_string()).unwrap();
        let src = Source::Dir(root.to_path_buf());
        for tag in [None, Some("1"), Some("multi:1")] {
            let r = resolve(&src, tag).unwrap();
            assert_eq!(r.defaults.cmd, Some(vec!["mine".to_string()]));
            assert_eq!(r.layers[0].diff_id, layer_d);
            assert_eq!(r.layers[0].compression, Compression::None);
        }
        let e = resolve(&src, Some("2")).unwrap_err();
        assert!(
            e.contains("no image tagged '2'") && e.contains("tags: multi:1"),
            "{e}"
        );
    }

    #[test]
    fn layer_media_types() {
        assert_eq!(
            layer_compression("application/vnd.oci.image.layer.v1.tar+zstd"),
            Ok(Compression::Zstd)
        );
        assert_eq!(
            layer_compression("application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"),
            Ok(Compression::Gzip)
        );
        let e = layer_compression("application/vnd.example.blob").unwrap_err();
        assert!(
            e.starts_with("unknown layer media type application/vnd.example.blob"),
            "{e}"
        );
    }
}
