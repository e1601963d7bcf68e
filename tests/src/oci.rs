//! Hand-built OCI image layouts for the tests: blobs, a manifest and index.json written
//! directly (not through ovl), so a test checks ovl's reading against bytes it did not make.

use std::path::{Path, PathBuf};

/// The hex sha256 of `data`.
pub fn sha256(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

/// Write an OCI image layout holding `layers` (already compressed blobs) under `tag`.
pub fn oci_layout(dir: &Path, tag: &str, layers: &[(Vec<u8>, &str)]) -> Vec<PathBuf> {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |data: &[u8]| {
        let d = sha256(data);
        std::fs::write(blobs.join(&d), data).unwrap();
        d
    };
    let mut descs = Vec::new();
    let mut paths = Vec::new();
    for (data, media) in layers {
        let d = put(data);
        paths.push(blobs.join(&d));
        descs.push(format!(
            r#"{{"mediaType":"{media}","digest":"sha256:{d}","size":{}}}"#,
            data.len()
        ));
    }
    let config =
        put(br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#);
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{config}","size":1}},"layers":[{}]}}"#,
        descs.join(",")
    );
    let m = put(manifest.as_bytes());
    std::fs::write(
        dir.join("index.json"),
        format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:{m}","size":{},"annotations":{{"org.opencontainers.image.ref.name":"{tag}"}}}}]}}"#,
            manifest.len()
        ),
    )
    .unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    paths
}
