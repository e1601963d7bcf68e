//! The destination directory, through ovl-layer's `staging`: built in a `.NAME.ovl-import-TOKEN`
//! sibling, synced, renamed into place; removed on an error or a SIGINT/SIGTERM/SIGHUP, and a
//! SIGKILLed import's sibling is removed by the next one.

use std::path::Path;

use ovl_layer::{Staging, StagingError};

use crate::ImportError;

/// The tool name in the temporary sibling's name.
pub(crate) const TOOL: &str = "ovl-import";

/// Refuse an existing DEST, clear dead leftovers, make the temporary sibling.
pub(crate) fn begin(dest: &Path) -> Result<Staging, ImportError> {
    Staging::new(dest, TOOL).map_err(Into::into)
}

impl From<StagingError> for ImportError {
    fn from(e: StagingError) -> Self {
        match e {
            StagingError::DestExists(p) => ImportError::DestExists(p),
            StagingError::Io { path, source } => ImportError::Dest { path, source },
            e @ StagingError::NoParent(_) => ImportError::Staging(e),
        }
    }
}
