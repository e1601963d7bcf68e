//! ovl-diff: an overlay upperdir as an exact, reproducible OCI layer.
//!
//! What the upper means is read by [`ovl_layer::upper`] (every whiteout and opaque form,
//! redirect_dir and metacopy through the lowers, container ids); the bytes are written by
//! [`ovl_layer::tarout`] and compressed by [`ovl_layer::pgzip`] or zstd. This crate owns the
//! mapping from upper changes to OCI layer entries ([`emit`]), the compression pipeline and
//! its digests ([`output`]), and appending a layer to an OCI image layout ([`oci`]).

pub mod emit;
pub mod oci;
pub mod output;

use std::path::PathBuf;

use ovl_layer::idmap::RootlessMaps;
use ovl_layer::tarout::TarOptions;
use ovl_layer::upper::UpperError;

pub use emit::Stats;
pub use output::{Compression, LayerInfo};

#[derive(Debug, thiserror::Error)]
pub enum DiffError {
    #[error(transparent)]
    Upper(#[from] UpperError),
    #[error("{path}: {reason}")]
    Entry { path: String, reason: String },
    #[error("writing the layer: {0}")]
    Write(#[source] std::io::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("OCI layout {dir}: {why}")]
    Oci { dir: PathBuf, why: String },
}

/// What to diff and how to write it.
#[derive(Debug, Clone)]
pub struct DiffOptions {
    pub upper: PathBuf,
    /// The lowers the upper was mounted on, top first.
    pub lowers: Vec<PathBuf>,
    pub compression: Compression,
    /// Map host ids back to container ids while reading (`None`: ids as seen).
    pub ids: Option<RootlessMaps>,
    pub tar: TarOptions,
    /// Compression threads (the output does not depend on it).
    pub threads: usize,
}

impl DiffOptions {
    pub fn new(upper: PathBuf) -> Self {
        DiffOptions {
            upper,
            lowers: Vec::new(),
            compression: Compression::None,
            ids: None,
            tar: TarOptions::default(),
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

/// Write the layer of `opts.upper` to `out`; returns `out`, its descriptor facts and counts.
pub fn diff<W: std::io::Write + Send>(
    opts: &DiffOptions,
    out: W,
) -> Result<(W, LayerInfo, Stats), DiffError> {
    let upper = ovl_layer::upper::Upper::open(
        &opts.upper,
        &ovl_layer::upper::UpperOptions {
            lowers: opts.lowers.clone(),
            ids: opts.ids.clone(),
        },
    )?;
    output::write_layer(out, opts, |tw| emit::emit(&upper, tw))
}
