//! Appending a layer to an OCI image layout, so `skopeo copy oci:DIR:TAG docker://...` can
//! push it.
//!
//! Owns the layout update and its order: the layer blob first (written to a temporary name in
//! `blobs/sha256/` and renamed to its digest), then the new config and manifest blobs, and
//! `index.json` last, replaced by rename under an flock of the layout directory (concurrent
//! appends are serialised, none lost); a crash at any point leaves the layout as it was plus
//! unreferenced blobs. The image tagged TAG (or the layout's only image) is the base: the new
//! config adds the diffID and a history entry, the new manifest adds the layer, and TAG then
//! names the new manifest. With no such image (or no layout yet) the image starts from
//! scratch. JSON is written with sorted keys and no timestamps unless `SOURCE_DATE_EPOCH` is
//! set, so the same layer gives the same manifest.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use sha2::Digest;

use crate::{DiffError, LayerInfo};

const REF_NAME: &str = "org.opencontainers.image.ref.name";
const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const CONFIG_TYPE: &str = "application/vnd.oci.image.config.v1+json";

/// `DIR[:TAG]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayoutRef {
    pub dir: PathBuf,
    pub tag: Option<String>,
}

impl LayoutRef {
    /// The part after the last `:` is a tag when it is not empty and holds no `/`.
    pub fn parse(arg: &std::ffi::OsStr) -> LayoutRef {
        use std::os::unix::ffi::OsStrExt;
        let s = arg.as_bytes();
        if let Some(i) = s.iter().rposition(|&c| c == b':') {
            let (dir, tag) = (&s[..i], &s[i + 1..]);
            if !tag.is_empty() && !tag.contains(&b'/') && !dir.is_empty() {
                return LayoutRef {
                    dir: PathBuf::from(std::ffi::OsStr::from_bytes(dir)),
                    tag: Some(String::from_utf8_lossy(tag).into_owned()),
                };
            }
        }
        LayoutRef {
            dir: PathBuf::from(arg),
            tag: None,
        }
    }
}

/// A layer blob being written into a layout.
#[derive(Debug)]
pub struct PendingBlob {
    pub tmp: PathBuf,
    file: Option<std::fs::File>,
}

impl PendingBlob {
    pub fn file(&mut self) -> &mut std::fs::File {
        self.file.as_mut().expect("open until placed")
    }
}

impl Drop for PendingBlob {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.tmp);
    }
}

fn oci_err(dir: &Path, why: impl Into<String>) -> DiffError {
    DiffError::Oci {
        dir: dir.to_path_buf(),
        why: why.into(),
    }
}

fn io_err(p: &Path, e: std::io::Error) -> DiffError {
    DiffError::Io {
        path: p.to_path_buf(),
        source: e,
    }
}

/// An exclusive lock on the layout directory (flock), held while the layout is made and while
/// `index.json` is read, updated and replaced: appends running at the same time go one after
/// the other instead of losing each other's manifests.
struct LayoutLock {
    _fd: std::os::fd::OwnedFd,
}

fn lock_layout(dir: &Path) -> Result<LayoutLock, DiffError> {
    let fd = rustix::fs::open(
        dir,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| io_err(dir, e.into()))?;
    loop {
        match rustix::fs::flock(&fd, rustix::fs::FlockOperation::LockExclusive) {
            Ok(()) => return Ok(LayoutLock { _fd: fd }),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(io_err(dir, e.into())),
        }
    }
}

/// Make the layout if it does not exist, and open a temporary file for the layer blob.
pub fn begin(layout: &LayoutRef) -> Result<PendingBlob, DiffError> {
    let dir = &layout.dir;
    let blobs = dir.join("blobs").join("sha256");
    let created = match std::fs::create_dir(dir) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
            true
        }
        Err(e) => return Err(io_err(dir, e)),
    };
    let _lock = lock_layout(dir)?;
    if !dir.join("oci-layout").exists() {
        if !created
            && std::fs::read_dir(dir)
                .map_err(|e| io_err(dir, e))?
                .next()
                .is_some()
        {
            return Err(oci_err(
                dir,
                "not an OCI image layout (no oci-layout file) and not empty",
            ));
        }
        std::fs::create_dir_all(&blobs).map_err(|e| io_err(&blobs, e))?;
        // `oci-layout` last: it says the layout is whole.
        write_replace(
            &dir.join("index.json"),
            &serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": []})).expect("json"),
        )?;
        write_replace(
            &dir.join("oci-layout"),
            br#"{"imageLayoutVersion":"1.0.0"}"#,
        )?;
    }
    std::fs::create_dir_all(&blobs).map_err(|e| io_err(&blobs, e))?;
    let tmp = blobs.join(format!(".ovl-diff-{}.tmp", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(|e| io_err(&tmp, e))?;
    Ok(PendingBlob {
        tmp,
        file: Some(file),
    })
}

/// What the new image is.
#[derive(Debug, Clone)]
pub struct Appended {
    pub manifest_digest: String,
    pub manifest_size: u64,
    pub layers: usize,
}

/// Place the written layer blob under its digest and make the new config, manifest and index.
pub fn finish(
    layout: &LayoutRef,
    mut blob: PendingBlob,
    info: &LayerInfo,
    created_by: &str,
    created: Option<i64>,
) -> Result<Appended, DiffError> {
    let dir = &layout.dir;
    let f = blob.file.take().expect("open until placed");
    f.sync_all().map_err(|e| io_err(&blob.tmp, e))?;
    drop(f);
    let blob_path = blob_path(dir, &info.digest_str());
    std::fs::rename(&blob.tmp, &blob_path).map_err(|e| io_err(&blob_path, e))?;

    // From reading index.json to replacing it, one writer at a time.
    let _lock = lock_layout(dir)?;
    let index_path = dir.join("index.json");
    let mut index: Value =
        serde_json::from_slice(&std::fs::read(&index_path).map_err(|e| io_err(&index_path, e))?)
            .map_err(|e| oci_err(dir, format!("index.json: {e}")))?;
    let manifests = index
        .get("manifests")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let tag_of = |m: &Value| {
        m.pointer(&format!("/annotations/{}", REF_NAME.replace('/', "~1")))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let base_pos = match &layout.tag {
        Some(t) => manifests
            .iter()
            .position(|m| tag_of(m).as_deref() == Some(t)),
        None if manifests.len() == 1 => Some(0),
        None if manifests.is_empty() => None,
        None => {
            return Err(oci_err(
                dir,
                "several images in the layout: name one as DIR:TAG",
            ));
        }
    };
    let (mut manifest, mut config) = match base_pos {
        Some(i) => {
            let d = &manifests[i];
            let mt = d.get("mediaType").and_then(Value::as_str).unwrap_or("");
            if mt.contains("index") || mt.contains("manifest.list") {
                return Err(oci_err(
                    dir,
                    "the base is a multi-platform index: copy one platform's image into the layout first",
                ));
            }
            let manifest = read_json_blob(dir, d)?;
            let config_desc = manifest
                .get("config")
                .cloned()
                .ok_or_else(|| oci_err(dir, "the base manifest has no config"))?;
            let config = read_json_blob(dir, &config_desc)?;
            (manifest, config)
        }
        None => (
            json!({"schemaVersion": 2, "mediaType": MANIFEST_TYPE, "layers": []}),
            json!({
                "architecture": oci_arch(),
                "os": "linux",
                "config": {},
                "rootfs": {"type": "layers", "diff_ids": []},
                "history": [],
            }),
        ),
    };

    // The config: one more diffID and a history entry.
    let diff_ids = config
        .pointer_mut("/rootfs/diff_ids")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| oci_err(dir, "the base config has no rootfs.diff_ids"))?;
    diff_ids.push(json!(info.diff_id_str()));
    let mut hist = json!({"created_by": created_by, "comment": "ovl-diff"});
    if let Some(t) = created {
        hist["created"] = json!(rfc3339(t));
        config["created"] = json!(rfc3339(t));
    }
    match config.get_mut("history").and_then(Value::as_array_mut) {
        Some(h) => h.push(hist),
        None => config["history"] = json!([hist]),
    }
    let config_bytes = serde_json::to_vec(&config).expect("json");
    let config_digest = put_blob(dir, &config_bytes)?;

    manifest["config"] = json!({
        "mediaType": CONFIG_TYPE,
        "digest": config_digest,
        "size": config_bytes.len(),
    });
    if manifest.get("mediaType").is_none() {
        manifest["mediaType"] = json!(MANIFEST_TYPE);
    }
    let layers = manifest
        .get_mut("layers")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| oci_err(dir, "the base manifest has no layers"))?;
    layers.push(json!({
        "mediaType": info.compression.media_type(),
        "digest": info.digest_str(),
        "size": info.size,
    }));
    let layer_count = layers.len();
    let manifest_bytes = serde_json::to_vec(&manifest).expect("json");
    let manifest_digest = put_blob(dir, &manifest_bytes)?;

    let mut desc = json!({
        "mediaType": MANIFEST_TYPE,
        "digest": manifest_digest,
        "size": manifest_bytes.len(),
    });
    let mut new_list = manifests.clone();
    match base_pos {
        Some(i) => {
            if let Some(a) = manifests[i].get("annotations") {
                desc["annotations"] = a.clone();
            }
            if let Some(p) = manifests[i].get("platform") {
                desc["platform"] = p.clone();
            }
            new_list[i] = desc;
        }
        None => {
            if let Some(t) = &layout.tag {
                desc["annotations"] = json!({ REF_NAME: t });
            }
            new_list.push(desc);
        }
    }
    index["manifests"] = Value::Array(new_list);
    if index.get("schemaVersion").is_none() {
        index["schemaVersion"] = json!(2);
    }
    write_replace(&index_path, &serde_json::to_vec(&index).expect("json"))?;
    Ok(Appended {
        manifest_digest,
        manifest_size: manifest_bytes.len() as u64,
        layers: layer_count,
    })
}

fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

fn blob_path(dir: &Path, digest: &str) -> PathBuf {
    dir.join("blobs")
        .join("sha256")
        .join(digest.trim_start_matches("sha256:"))
}

fn read_json_blob(dir: &Path, desc: &Value) -> Result<Value, DiffError> {
    let digest = desc
        .get("digest")
        .and_then(Value::as_str)
        .ok_or_else(|| oci_err(dir, "a descriptor without a digest"))?;
    let path = blob_path(dir, digest);
    let bytes = std::fs::read(&path).map_err(|e| io_err(&path, e))?;
    let got = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&bytes)));
    if got != digest {
        return Err(oci_err(
            dir,
            format!("blob {digest} does not match its digest"),
        ));
    }
    serde_json::from_slice(&bytes).map_err(|e| oci_err(dir, format!("blob {digest}: {e}")))
}

/// Store a small blob under its digest (idempotent).
fn put_blob(dir: &Path, bytes: &[u8]) -> Result<String, DiffError> {
    let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)));
    let path = blob_path(dir, &digest);
    if !path.exists() {
        write_replace(&path, bytes)?;
    }
    Ok(digest)
}

/// Write a file through a temporary sibling and rename it into place.
fn write_replace(path: &Path, bytes: &[u8]) -> Result<(), DiffError> {
    let mut name = std::ffi::OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(format!(".ovl-diff-{}", std::process::id()));
    let tmp = path.with_file_name(name);
    let res = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res.map_err(|e| io_err(path, e))
}

/// `YYYY-MM-DDTHH:MM:SSZ` for seconds since the epoch (proleptic Gregorian, UTC).
pub fn rfc3339(t: i64) -> String {
    let days = t.div_euclid(86_400);
    let secs = t.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_refs_and_dates() {
        assert_eq!(
            LayoutRef::parse("img:v1".as_ref()),
            LayoutRef {
                dir: "img".into(),
                tag: Some("v1".into())
            }
        );
        assert_eq!(
            LayoutRef::parse("./a:b/c".as_ref()),
            LayoutRef {
                dir: "./a:b/c".into(),
                tag: None
            }
        );
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }
}
