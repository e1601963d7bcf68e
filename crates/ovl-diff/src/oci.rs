//! Appending a layer to an OCI image layout, so `skopeo copy oci:DIR:TAG docker://...` can
//! push it.
//!
//! Owns what an append changes and in which order: the layer blob first, then the new config
//! and manifest blobs, and `index.json` last, under the layout's lock (concurrent appends are
//! serialised, none lost); a crash at any point leaves the layout as it was plus unreferenced
//! blobs. The image tagged TAG (or the layout's only image) is the base: the new config adds
//! the diffID and a history entry, the new manifest adds the layer, and TAG then names the new
//! manifest. With no such image (or no layout yet) the image starts from scratch. JSON is
//! written with sorted keys and no timestamps unless `SOURCE_DATE_EPOCH` is set, so the same
//! layer gives the same manifest. How the layout is reached, read and written safely (digests,
//! bounded reads, exclusive temporary files, the lock) is ovl-layer's `oci`'s.

use std::path::Path;

use ovl_layer::{
    CONFIG_TYPE, Descriptor, Digest, History, ImageConfig, ImageIndex, Layout, MANIFEST_TYPE,
    Manifest, OciError, REF_NAME, TempFile, to_json,
};

pub use ovl_layer::LayoutRef;

use crate::{DiffError, LayerInfo};

/// A layer blob being written into a layout (an exclusive temporary file in its
/// `blobs/sha256`, removed unless the append finishes).
#[derive(Debug)]
pub struct PendingBlob {
    layout: Layout,
    tmp: TempFile,
}

impl PendingBlob {
    pub fn file(&mut self) -> &mut std::fs::File {
        self.tmp.file()
    }
}

fn oci_err(dir: &Path) -> impl FnOnce(OciError) -> DiffError + '_ {
    |source| DiffError::Oci {
        dir: dir.to_path_buf(),
        source,
    }
}

/// Make the layout if it does not exist, check its `index.json` can be appended to (before
/// the layer is written, not after), and open a temporary file for the layer blob.
pub fn begin(layout_ref: &LayoutRef) -> Result<PendingBlob, DiffError> {
    let dir = &layout_ref.dir;
    let layout = Layout::create(dir).map_err(oci_err(dir))?;
    {
        let _lock = layout.lock().map_err(oci_err(dir))?;
        let index = layout.read_index().map_err(oci_err(dir))?;
        base(&layout, &index, layout_ref.tag.as_deref()).map_err(oci_err(dir))?;
    }
    let tmp = layout.new_blob().map_err(oci_err(dir))?;
    Ok(PendingBlob { layout, tmp })
}

/// What the new image is.
#[derive(Debug, Clone)]
pub struct Appended {
    pub manifest_digest: String,
    pub manifest_size: u64,
    pub layers: usize,
}

/// The image the append starts from: its place in the index, its manifest and its config;
/// with no image of that tag, a new image with no layers.
fn base(
    layout: &Layout,
    index: &ImageIndex,
    tag: Option<&str>,
) -> Result<(Option<usize>, Option<Manifest>, ImageConfig), OciError> {
    let Some(i) = index.find(tag)? else {
        return Ok((None, None, ImageConfig::empty()));
    };
    let d = &index.manifests[i];
    if d.is_index() {
        return Err(OciError::IsIndex(format!("{:?}", d.tag().unwrap_or(""))));
    }
    let manifest: Manifest = layout.read_json(d)?;
    let config: ImageConfig = layout.read_json(&manifest.config)?;
    Ok((Some(i), Some(manifest), config))
}

/// Place the written layer blob under its digest and make the new config, manifest and index.
pub fn finish(
    layout_ref: &LayoutRef,
    blob: PendingBlob,
    info: &LayerInfo,
    created_by: &str,
    created: Option<i64>,
) -> Result<Appended, DiffError> {
    let dir = &layout_ref.dir;
    let PendingBlob { layout, tmp } = blob;
    let layer = Descriptor::new(
        info.compression.media_type(),
        Digest::from_sha256(info.digest),
        info.size,
    );
    layout
        .commit_blob(tmp, &layer.digest)
        .map_err(oci_err(dir))?;

    // From reading index.json to replacing it, one writer at a time.
    let _lock = layout.lock().map_err(oci_err(dir))?;
    let mut index = layout.read_index().map_err(oci_err(dir))?;
    let (base_pos, base_manifest, mut config) =
        base(&layout, &index, layout_ref.tag.as_deref()).map_err(oci_err(dir))?;

    // The config: one more diffID and a history entry.
    config
        .rootfs
        .diff_ids
        .push(Digest::from_sha256(info.diff_id));
    let stamp = created.map(rfc3339);
    config.history.push(History {
        created: stamp.clone(),
        created_by: Some(created_by.to_string()),
        comment: Some("ovl-diff".into()),
        ..History::default()
    });
    if stamp.is_some() {
        config.created = stamp;
    }
    let config_bytes = to_json(&config);
    let config_desc = Descriptor::new(
        CONFIG_TYPE,
        layout.put_blob(&config_bytes).map_err(oci_err(dir))?,
        config_bytes.len() as u64,
    );

    let mut manifest = base_manifest.unwrap_or_else(|| Manifest::new(config_desc.clone()));
    manifest.config = config_desc;
    manifest
        .media_type
        .get_or_insert_with(|| MANIFEST_TYPE.into());
    manifest.layers.push(layer);
    let manifest_bytes = to_json(&manifest);
    let manifest_digest = layout.put_blob(&manifest_bytes).map_err(oci_err(dir))?;

    let mut desc = Descriptor::new(
        MANIFEST_TYPE,
        manifest_digest.clone(),
        manifest_bytes.len() as u64,
    );
    match base_pos {
        Some(i) => {
            let old = &mut index.manifests[i];
            desc.annotations = std::mem::take(&mut old.annotations);
            desc.platform = old.platform.take();
            *old = desc;
        }
        None => {
            if let Some(t) = &layout_ref.tag {
                desc.annotations.insert(REF_NAME.into(), t.clone());
            }
            index.manifests.push(desc);
        }
    }
    layout.write_index(&index).map_err(oci_err(dir))?;
    Ok(Appended {
        manifest_digest: manifest_digest.to_string(),
        manifest_size: manifest_bytes.len() as u64,
        layers: manifest.layers.len(),
    })
}

/// `YYYY-MM-DDTHH:MM:SSZ` for seconds since the epoch (proleptic Gregorian, UTC).
pub(crate) fn rfc3339(t: i64) -> String {
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
    fn dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }
}
