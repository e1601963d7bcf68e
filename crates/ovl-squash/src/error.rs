//! The errors of a squash: each names the path it is about.

use std::path::PathBuf;

use ovl_layer::{StagingError, UpperError};

#[derive(Debug, thiserror::Error)]
pub enum SquashError {
    #[error("{path}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("reading the upper")]
    Upper(#[from] UpperError),
    #[error("--output")]
    Staging(#[from] StagingError),
    #[error("{dir} is part of a mounted overlay ({by}): unmount it first, nothing was changed")]
    InUse { dir: PathBuf, by: String },
    #[error(
        "--in-place takes exactly one lower ({0} given): use --output NEWDIR to flatten several"
    )]
    InPlaceLowers(usize),
    #[error("{0}: another ovl-squash is working on it")]
    Busy(PathBuf),
    #[error(
        "the upper renames directories in a cycle ({0}): --in-place cannot apply that without \
         copying; use --output NEWDIR (nothing was lost, the overlay mounts as before)"
    )]
    RedirectCycle(String),
    #[error("{path}: {why}")]
    Unsupported { path: String, why: String },
}

/// An io error at a path, for `map_err`.
pub(crate) fn io_at(path: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> SquashError {
    move |source| SquashError::Io {
        path: path.to_string(),
        source,
    }
}
