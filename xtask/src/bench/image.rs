//! The corpus as a 4-layer gzip OCI image, for `ovl-import oci:DIR` against GNU tar extracting
//! each layer in turn.
//!
//! The rootfs, walked in byte order of its paths, is cut into [`LAYERS`] runs of about equal
//! size (file bytes plus a block per entry); each layer holds its run and the directories above
//! it, packed by GNU tar (`--xattrs --numeric-owner --no-recursion`) and compressed with pigz -6
//! (or gzip -6). A hardlink whose other name went to another layer is a plain file in this one,
//! as GNU tar writes it. Cached beside the corpus as `oci-4/` (an OCI image layout, tag `bench`),
//! with an `image.stamp` written last.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, ensure};
use sha2::{Digest, Sha256};

use super::Corpus;

/// Layers in the image.
pub const LAYERS: usize = 4;
/// Bump to rebuild the cached image after a change in how it is made.
const VERSION: u32 = 1;
/// The tag `oci:DIR:TAG` names.
pub const TAG: &str = "bench";

#[derive(Debug, Clone)]
pub struct Image {
    /// The OCI image layout directory.
    pub dir: PathBuf,
    /// The layer blobs (tar.gz), bottom first.
    pub layers: Vec<PathBuf>,
}

impl Image {
    fn in_dir(dir: PathBuf, digests: &[String]) -> Image {
        let layers = digests
            .iter()
            .map(|d| dir.join("blobs/sha256").join(d))
            .collect();
        Image { dir, layers }
    }

    pub fn describe(&self) -> String {
        let sizes: Vec<String> = self
            .layers
            .iter()
            .map(|p| {
                let len = fs::metadata(p).map(|m| m.len()).unwrap_or(0);
                format!("{:.1}", len as f64 / (1024.0 * 1024.0))
            })
            .collect();
        format!(
            "{}-layer gzip OCI image: layers of {} MiB ({})",
            self.layers.len(),
            sizes.join(", "),
            self.dir.display()
        )
    }
}

/// The cached image of `corpus`, built first if needed.
pub fn ensure(corpus: &Corpus) -> Result<Image> {
    let base = corpus
        .rootfs
        .parent()
        .context("the corpus rootfs has a parent")?;
    let dir = base.join("oci-4");
    let stamp = base.join("image.stamp");
    if let Ok(text) = fs::read_to_string(&stamp) {
        let mut lines = text.lines();
        if lines.next() == Some(&format!("version={VERSION}")) {
            let digests: Vec<String> = lines.map(str::to_string).collect();
            let image = Image::in_dir(dir.clone(), &digests);
            if digests.len() == LAYERS && image.layers.iter().all(|l| l.is_file()) {
                return Ok(image);
            }
        }
    }
    let _ = fs::remove_file(&stamp);
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    println!(
        "bench: building the {LAYERS}-layer OCI image of the corpus in {}",
        dir.display()
    );
    let digests = build(&corpus.rootfs, &dir)?;
    let mut text = format!("version={VERSION}\n");
    for d in &digests {
        text.push_str(d);
        text.push('\n');
    }
    fs::write(&stamp, text)?;
    Ok(Image::in_dir(dir, &digests))
}

/// Every entry below `root` in byte order of its path ("./a", "./a/b", ...), with its weight.
fn entries(root: &Path) -> Result<Vec<(Vec<u8>, u64)>> {
    fn walk(root: &Path, rel: &[u8], out: &mut Vec<(Vec<u8>, u64)>) -> Result<()> {
        let dir = root.join(std::ffi::OsStr::from_bytes(rel));
        let mut names: Vec<OsString> = fs::read_dir(&dir)
            .with_context(|| format!("cannot read {}", dir.display()))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<std::io::Result<_>>()?;
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        for name in names {
            let mut path = rel.to_vec();
            path.push(b'/');
            path.extend_from_slice(name.as_bytes());
            let meta = fs::symlink_metadata(root.join(std::ffi::OsStr::from_bytes(&path)))?;
            let weight = 512 + if meta.is_file() { meta.len() } else { 0 };
            let is_dir = meta.is_dir();
            out.push((path.clone(), weight));
            if is_dir {
                walk(root, &path, out)?;
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(root, b".", &mut out)?;
    Ok(out)
}

/// The directories above `path` ("./a/b/c" -> "./a", "./a/b"), top first.
fn ancestors(path: &[u8]) -> Vec<Vec<u8>> {
    path.iter()
        .enumerate()
        .skip(2)
        .filter(|&(_, &c)| c == b'/')
        .map(|(i, _)| path[..i].to_vec())
        .collect()
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

/// Writes the layout into `dir`; returns the layer digests (hex), bottom first.
fn build(rootfs: &Path, dir: &Path) -> Result<Vec<String>> {
    let tmp = dir.with_extension("tmp");
    if tmp.exists() {
        fs::remove_dir_all(&tmp)?;
    }
    let blobs = tmp.join("blobs/sha256");
    fs::create_dir_all(&blobs)?;

    let all = entries(rootfs)?;
    let total: u64 = all.iter().map(|e| e.1).sum();
    let mut runs: Vec<Vec<Vec<u8>>> = vec![Vec::new(); LAYERS];
    let mut acc = 0u64;
    for (path, weight) in all {
        let i = ((acc * LAYERS as u64) / total.max(1)) as usize;
        runs[i.min(LAYERS - 1)].push(path);
        acc += weight;
    }

    let gzip = if crate::which("pigz").is_some() {
        "pigz"
    } else {
        "gzip"
    };
    let mut layers = Vec::new();
    for (i, run) in runs.iter().enumerate() {
        // The run and the directories above it, each once, parents first.
        let mut seen = BTreeSet::new();
        let mut list = Vec::new();
        for path in run {
            for p in ancestors(path).into_iter().chain([path.clone()]) {
                if seen.insert(p.clone()) {
                    list.extend_from_slice(&p);
                    list.push(0);
                }
            }
        }
        let list_path = tmp.join(format!("layer-{i}.list"));
        fs::write(&list_path, &list)?;
        let tar_path = tmp.join(format!("layer-{i}.tar"));
        crate::run(
            Command::new("tar")
                .args([
                    "--xattrs",
                    "--numeric-owner",
                    "--no-recursion",
                    "--null",
                    "--verbatim-files-from",
                    "-cf",
                ])
                .arg(&tar_path)
                .arg("-C")
                .arg(rootfs)
                .arg("-T")
                .arg(&list_path),
        )?;
        let diff_id = sha256_file(&tar_path)?;
        let gz_path = tmp.join(format!("layer-{i}.tar.gz"));
        let status = Command::new(gzip)
            .args(["-6", "-c"])
            .arg(&tar_path)
            .stdout(Stdio::from(fs::File::create(&gz_path)?))
            .status()
            .with_context(|| format!("cannot run {gzip}"))?;
        ensure!(status.success(), "{gzip} -6 failed ({status})");
        let digest = sha256_file(&gz_path)?;
        let size = fs::metadata(&gz_path)?.len();
        fs::rename(&gz_path, blobs.join(&digest))?;
        fs::remove_file(&tar_path)?;
        fs::remove_file(&list_path)?;
        layers.push((digest, size, diff_id));
    }

    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {
            "type": "layers",
            "diff_ids": layers.iter().map(|l| format!("sha256:{}", l.2)).collect::<Vec<_>>(),
        },
    });
    let config_desc = write_blob(&blobs, &serde_json::to_vec(&config)?)?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_desc.0,
            "size": config_desc.1,
        },
        "layers": layers.iter().map(|l| serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": format!("sha256:{}", l.0),
            "size": l.1,
        })).collect::<Vec<_>>(),
    });
    let manifest_desc = write_blob(&blobs, &serde_json::to_vec(&manifest)?)?;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_desc.0,
            "size": manifest_desc.1,
            "annotations": { "org.opencontainers.image.ref.name": TAG },
        }],
    });
    fs::write(tmp.join("index.json"), serde_json::to_vec(&index)?)?;
    fs::File::create(tmp.join("oci-layout"))?.write_all(br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    fs::rename(&tmp, dir)?;
    Ok(layers.into_iter().map(|l| l.0).collect())
}

/// Stores `bytes` as a blob: ("sha256:HEX", size).
fn write_blob(blobs: &Path, bytes: &[u8]) -> Result<(String, usize)> {
    let hex = hex::encode(Sha256::digest(bytes));
    fs::write(blobs.join(&hex), bytes)?;
    Ok((format!("sha256:{hex}"), bytes.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ancestors_top_first() {
        assert_eq!(
            ancestors(b"./a/b/c"),
            vec![b"./a".to_vec(), b"./a/b".to_vec()]
        );
        assert!(ancestors(b"./a").is_empty());
    }

    #[test]
    fn a_small_tree_as_an_image_extracts_back_whole() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("rootfs");
        for i in 0..40 {
            let d = root.join(format!("d{}/e{}", i % 5, i % 3));
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join(format!("f{i}")), vec![b'x'; 1000 * i]).unwrap();
        }
        let dir = t.path().join("oci");
        let digests = build(&root, &dir).unwrap();
        assert_eq!(digests.len(), LAYERS);
        let out = t.path().join("out");
        fs::create_dir(&out).unwrap();
        for d in &digests {
            let st = Command::new("tar")
                .arg("-xzf")
                .arg(dir.join("blobs/sha256").join(d))
                .arg("-C")
                .arg(&out)
                .status()
                .unwrap();
            assert!(st.success());
        }
        let diff = Command::new("diff")
            .arg("-r")
            .arg(&root)
            .arg(&out)
            .status()
            .unwrap();
        assert!(diff.success());
    }
}
