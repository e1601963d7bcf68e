//! Id-shifted mounts as real root: `--uidmap` / `--gidmap`.
//!
//! Owns what a shifted mount does before the overlay is made, as containerd 2.x does it:
//! every lower is replaced, in our private mount namespace only, by an idmapped clone of
//! itself (so the lower on disk keeps its container ids and serves any number of containers
//! with different maps at once), the upper is not idmapped and its root is owned by the
//! mapped root (so what the container writes lands on disk as host ids of its map), and the
//! command later joins the user namespace that holds the map (see [`crate::command`]).
//! `--shifted-lowers` skips the idmapped clones for lowers that `ovl-import --uidmap` already
//! wrote in host ids (the fallback where the kernel refuses idmapped layers).

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use ovl_layer::{RootlessMaps, UsernsFd};

use crate::error::{MountError, Result};
use crate::layout::Layout;

/// The host uid and gid container root maps to.
pub fn mapped_root(maps: &RootlessMaps) -> Result<(u32, u32)> {
    match (maps.uid.to_host(0), maps.gid.to_host(0)) {
        (Some(u), Some(g)) => Ok((u, g)),
        _ => Err(MountError::ShiftNoRoot),
    }
}

/// Make the upper's root belong to the mapped root (a fresh, empty upper), or check that it
/// already does: an upper holds the host ids of the map it was written under, so a different
/// map would show its files as other owners (or nobody).
pub fn prepare_upper(upper: &Path, maps: &RootlessMaps) -> Result<()> {
    let (uid, gid) = mapped_root(maps)?;
    let md = std::fs::symlink_metadata(upper).map_err(MountError::io("upper directory", upper))?;
    if (md.uid(), md.gid()) == (uid, gid) {
        return Ok(());
    }
    let empty = std::fs::read_dir(upper)
        .map_err(MountError::io("upper directory", upper))?
        .next()
        .is_none();
    if !empty {
        return Err(MountError::UpperOtherMap {
            upper: upper.to_path_buf(),
            owner: (md.uid(), md.gid()),
            root: (uid, gid),
        });
    }
    rustix::fs::chown(
        upper,
        Some(rustix::fs::Uid::from_raw(uid)),
        Some(rustix::fs::Gid::from_raw(gid)),
    )
    .map_err(MountError::io(
        "upper directory (chown to the mapped root)",
        upper,
    ))
}

/// In the (private) mount namespace of this process: put an idmapped clone of every lower on
/// top of it, so overlayfs reads the lowers through the map.
pub fn idmap_lowers(layout: &Layout, userns: &UsernsFd) -> Result<()> {
    for lower in &layout.lowers {
        let tree = ovl_layer::idmapped_clone(lower, userns).map_err(MountError::IdmapRefused)?;
        ovl_layer::attach_idmapped(&tree, lower).map_err(MountError::IdmapRefused)?;
    }
    Ok(())
}

/// The user namespace holding `maps`.
pub fn userns(maps: &RootlessMaps) -> Result<UsernsFd> {
    UsernsFd::new(maps).map_err(|e| MountError::IdmapRefused(ovl_layer::IdmapMountError::Userns(e)))
}
