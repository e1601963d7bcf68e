//! One driver's directory: the box laid out the way rootless runtimes lay out a container
//! (`box/rootfs` the lower, `box/overlay/{upper,work}`, the merged view mounted over
//! `box/rootfs` itself), and beside it what the steps make: the layer, the snapshots, umoci's
//! image and rootfs, the squashed lower.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::actor::Actor;

#[derive(Debug)]
pub struct BoxDir {
    /// The driver's directory, owned by the actor.
    pub dir: PathBuf,
    /// `box/rootfs`: the imported lower, and the mount point of the merged view.
    pub rootfs: PathBuf,
    /// `box/overlay/upper`.
    pub upper: PathBuf,
    /// `box/overlay/work`.
    pub work: PathBuf,
    /// `layer.tar`: ovl-diff's layer of the upper.
    pub layer: PathBuf,
    /// `snapshots/NAME.json`.
    pub snapshots: PathBuf,
    /// `umoci/`: the OCI layout (`umoci/oci`) and the unpacked rootfs (`umoci/rootfs`).
    pub umoci: PathBuf,
    /// `squashed`: ovl-squash's new lower (mounted over itself, alone).
    pub squashed: PathBuf,
}

impl BoxDir {
    /// Makes `dir` (which must not exist) and the box's directories in it, all the actor's;
    /// `box/rootfs` is left for ovl-import to create.
    pub fn create(dir: &Path, actor: &Actor) -> Result<BoxDir> {
        let b = BoxDir {
            dir: dir.to_path_buf(),
            rootfs: dir.join("box/rootfs"),
            upper: dir.join("box/overlay/upper"),
            work: dir.join("box/overlay/work"),
            layer: dir.join("layer.tar"),
            snapshots: dir.join("snapshots"),
            umoci: dir.join("umoci"),
            squashed: dir.join("squashed"),
        };
        let made = [
            b.dir.clone(),
            dir.join("box"),
            dir.join("box/overlay"),
            b.upper.clone(),
            b.work.clone(),
            b.snapshots.clone(),
            b.umoci.clone(),
        ];
        for d in &made {
            fs::create_dir(d).with_context(|| format!("cannot create {}", d.display()))?;
            fs::set_permissions(d, fs::Permissions::from_mode(0o755))?;
            actor.give(d)?;
        }
        Ok(b)
    }

    /// Where the snapshot called `name` is written.
    pub fn snapshot_file(&self, name: &str) -> PathBuf {
        self.snapshots.join(format!("{name}.json"))
    }
}
