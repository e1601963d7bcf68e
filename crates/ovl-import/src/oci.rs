//! The `oci:DIR[:TAG]` source: which image is meant and its layer blobs, bottom first.
//!
//! Which manifest a tag names (through nested image indexes, picking this machine's
//! platform) and how every file of the layout is reached and checked are
//! ovl-layer's `oci`'s; this module only asks. Each layer blob is opened here, before anything
//! is extracted, and its digest is checked while it streams ([`LayerBlob::verify`]).

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use ovl_layer::{Blob, Layout, OciError, VerifyingReader, blob_name, host_arch};

use crate::ImportError;

/// One layer blob to import, open.
#[derive(Debug)]
pub(crate) struct LayerBlob {
    /// Where the blob is, for messages.
    pub path: PathBuf,
    pub size: u64,
    pub media_type: String,
    blob: Blob,
}

impl LayerBlob {
    /// The blob's file (a second handle to the one opened and checked).
    pub(crate) fn open(&self) -> std::io::Result<File> {
        self.blob.file.try_clone()
    }

    /// The blob's bytes as read through `inner`, checked against its descriptor.
    pub(crate) fn verify<R: Read>(&self, inner: R) -> VerifyingReader<R> {
        self.blob.verify(inner)
    }
}

/// The layers of the image `tag` (or the only image) in the layout at `dir`.
pub(crate) fn layers(dir: &Path, tag: Option<&str>) -> Result<Vec<LayerBlob>, ImportError> {
    let err = |source: OciError| ImportError::Oci {
        dir: dir.to_path_buf(),
        source,
    };
    let layout = Layout::open(dir).map_err(err)?;
    let index = layout.read_index().map_err(err)?;
    let chosen = index.image(tag).map_err(err)?;
    let manifest = layout.manifest(chosen, "linux", host_arch()).map_err(err)?;
    manifest
        .layers
        .iter()
        .map(|l| {
            Ok(LayerBlob {
                path: dir.join(blob_name(&l.digest)),
                size: l.size,
                media_type: l.media_type.clone(),
                blob: layout.open_blob(l).map_err(err)?,
            })
        })
        .collect()
}
