//! Reading an OCI image layout: index.json, the manifest a tag names, its layer blobs.
//!
//! Owns the `oci:DIR[:TAG]` source: which manifest is meant and where each layer blob is,
//! with the digest every blob must have (checked while it streams, see
//! [`ovl_layer::compress::VerifyingReader`]).

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::ImportError;

const REF_NAME: &str = "org.opencontainers.image.ref.name";

#[derive(Debug, Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    annotations: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Debug, Deserialize)]
struct Platform {
    architecture: String,
    os: String,
}

#[derive(Debug, Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
struct Manifest {
    layers: Vec<Descriptor>,
}

/// One layer blob to import, bottom layer first.
#[derive(Debug, Clone)]
pub struct LayerBlob {
    pub path: PathBuf,
    pub digest: [u8; 32],
    pub size: u64,
    pub media_type: String,
}

/// Parse `sha256:HEX` into raw bytes.
fn parse_digest(d: &str) -> Result<[u8; 32], String> {
    let hex = d
        .strip_prefix("sha256:")
        .ok_or_else(|| format!("unsupported digest {d:?} (only sha256)"))?;
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex, &mut out).map_err(|_| format!("malformed digest {d:?}"))?;
    Ok(out)
}

/// The most bytes index.json or a manifest (or nested index) may have: they are read whole.
const MAX_JSON: u64 = 4 << 20;

/// `path` must be a regular file (a symlink to /dev/zero or a FIFO would be read forever):
/// its length.
fn regular_file(path: &Path) -> Result<u64, String> {
    let m = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !m.is_file() {
        return Err(format!("{}: not a regular file", path.display()));
    }
    Ok(m.len())
}

/// Read a JSON file of the layout: a regular file of at most [`MAX_JSON`] bytes.
fn read_json_file(path: &Path) -> Result<Vec<u8>, String> {
    let len = regular_file(path)?;
    if len > MAX_JSON {
        return Err(format!(
            "{}: {len} bytes, more than the {} MiB a manifest or index may have",
            path.display(),
            MAX_JSON >> 20
        ));
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_JSON).read_to_end(&mut bytes))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(bytes)
}

fn blob_path(dir: &Path, digest: &str) -> PathBuf {
    dir.join("blobs")
        .join("sha256")
        .join(digest.trim_start_matches("sha256:"))
}

/// Read and verify a JSON blob.
fn read_blob<T: for<'de> Deserialize<'de>>(dir: &Path, d: &Descriptor) -> Result<T, ImportError> {
    let bad = |why: String| ImportError::Oci {
        dir: dir.to_path_buf(),
        why,
    };
    let want = parse_digest(&d.digest).map_err(bad)?;
    let path = blob_path(dir, &d.digest);
    let bytes = read_json_file(&path).map_err(bad)?;
    let got: [u8; 32] = {
        use sha2::Digest;
        sha2::Sha256::digest(&bytes).into()
    };
    if got != want {
        return Err(bad(format!("blob {} does not match its digest", d.digest)));
    }
    serde_json::from_slice(&bytes).map_err(|e| bad(format!("blob {}: {e}", d.digest)))
}

/// The layers of the image `tag` (or the only image) in the layout at `dir`.
pub fn layers(dir: &Path, tag: Option<&str>) -> Result<Vec<LayerBlob>, ImportError> {
    let bad = |why: String| ImportError::Oci {
        dir: dir.to_path_buf(),
        why,
    };
    let index_path = dir.join("index.json");
    let text = read_json_file(&index_path).map_err(bad)?;
    let index: Index =
        serde_json::from_slice(&text).map_err(|e| bad(format!("index.json: {e}")))?;
    let chosen = match tag {
        Some(t) => index
            .manifests
            .iter()
            .find(|m| m.annotations.get(REF_NAME).map(String::as_str) == Some(t))
            .ok_or_else(|| {
                let tags: Vec<&str> = index
                    .manifests
                    .iter()
                    .filter_map(|m| m.annotations.get(REF_NAME).map(String::as_str))
                    .collect();
                bad(format!("no image tagged {t:?} (tags: {})", tags.join(", ")))
            })?,
        None => match index.manifests.as_slice() {
            [one] => one,
            [] => return Err(bad("index.json lists no image".into())),
            many => {
                let tags: Vec<&str> = many
                    .iter()
                    .filter_map(|m| m.annotations.get(REF_NAME).map(String::as_str))
                    .collect();
                return Err(bad(format!(
                    "several images: name one as oci:DIR:TAG (tags: {})",
                    tags.join(", ")
                )));
            }
        },
    };
    let manifest = resolve_manifest(dir, chosen)?;
    manifest
        .layers
        .iter()
        .map(|l| {
            let digest = parse_digest(&l.digest).map_err(bad)?;
            let path = blob_path(dir, &l.digest);
            regular_file(&path).map_err(bad)?;
            Ok(LayerBlob {
                path,
                digest,
                size: l.size,
                media_type: l.media_type.clone(),
            })
        })
        .collect()
}

/// A descriptor may point at a manifest or at a nested index (multi-platform): pick
/// linux/amd64 (or the only entry) from the latter.
fn resolve_manifest(dir: &Path, d: &Descriptor) -> Result<Manifest, ImportError> {
    if d.media_type.contains("index") || d.media_type.contains("manifest.list") {
        let nested: Index = read_blob(dir, d)?;
        let arch = std::env::consts::ARCH
            .replace("x86_64", "amd64")
            .replace("aarch64", "arm64");
        let pick = nested
            .manifests
            .iter()
            .find(|m| {
                m.platform
                    .as_ref()
                    .is_some_and(|p| p.os == "linux" && p.architecture == arch)
            })
            .or_else(|| (nested.manifests.len() == 1).then(|| &nested.manifests[0]))
            .ok_or_else(|| ImportError::Oci {
                dir: dir.to_path_buf(),
                why: format!("no linux/{arch} image in {}", d.digest),
            })?;
        return resolve_manifest(dir, pick);
    }
    read_blob(dir, d)
}
