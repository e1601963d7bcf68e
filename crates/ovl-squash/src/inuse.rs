//! Refusing to touch a directory that a mounted overlay uses.
//!
//! Owns the refusal: any of the dirs a squash reads or writes that is part of a mounted overlay
//! anywhere we can see, in any mount namespace, inside a used dir or holding one. Finding the
//! overlays and matching the dirs is ovl-layer's `mounts`'s.

use std::path::PathBuf;

use ovl_layer::{find_use, mounted_overlays};

/// Refuse when any of `dirs` is part of a mounted overlay we can see.
pub fn refuse_if_mounted(dirs: &[PathBuf]) -> Result<(), crate::SquashError> {
    match find_use(dirs, &mounted_overlays()) {
        Some((dir, by)) => Err(crate::SquashError::InUse { dir, by }),
        None => Ok(()),
    }
}
