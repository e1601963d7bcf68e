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
//!
//! A persistent shifted mount (no CMD, [`persistent`]) must end up in the caller's mount
//! namespace, but the idmapped lower clones must not: they would cover the lowers for everyone
//! and outlive ovl-mount if it died. So the overlay is made in a throwaway private mount
//! namespace (where the lowers are covered by their idmapped clones, so `lowerdir=` still names
//! the real lower paths and the mount table stays truthful for the in-use checks), cloned with
//! `open_tree(OPEN_TREE_CLONE)`, and the clone is attached on MERGED after `setns` back into the
//! caller's namespace. Overlayfs keeps private clones of its layers, so once the throwaway
//! namespace dies with its last user (at the setns, or with the process if anything fails)
//! nothing of it is left: unmounting MERGED releases everything.

use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use ovl_layer::{RootlessMaps, UsernsFd};

use crate::error::{MountError, Result};
use crate::layout::Layout;

/// The host uid and gid container root maps to.
pub(crate) fn mapped_root(maps: &RootlessMaps) -> Result<(u32, u32)> {
    match (maps.uid.to_host(0), maps.gid.to_host(0)) {
        (Some(u), Some(g)) => Ok((u, g)),
        _ => Err(MountError::ShiftNoRoot),
    }
}

/// Make the upper's root belong to the mapped root (a fresh, empty upper), or check that it
/// already does: an upper holds the host ids of the map it was written under, so a different
/// map would show its files as other owners (or nobody).
pub(crate) fn prepare_upper(upper: &Path, maps: &RootlessMaps) -> Result<()> {
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
pub(crate) fn idmap_lowers(layout: &Layout, userns: &UsernsFd) -> Result<()> {
    for lower in &layout.lowers {
        let tree = ovl_layer::idmapped_clone(lower, userns).map_err(MountError::IdmapRefused)?;
        ovl_layer::attach_idmapped(&tree, lower).map_err(MountError::IdmapRefused)?;
    }
    Ok(())
}

/// The user namespace holding `maps`.
pub(crate) fn userns(maps: &RootlessMaps) -> Result<UsernsFd> {
    UsernsFd::new(maps).map_err(|e| MountError::IdmapRefused(ovl_layer::IdmapMountError::Userns(e)))
}

/// A persistent shifted mount: `mount` (which mounts on MERGED) runs in a throwaway private
/// mount namespace where every lower is covered by its idmapped clone (unless the lowers are
/// already shifted), and the overlay it made is then moved into the caller's namespace (see
/// the module doc). Needs a single-threaded caller (unshare and setns of a mount namespace).
pub(crate) fn persistent<T>(
    layout: &Layout,
    userns: Option<&UsernsFd>,
    mount: impl FnOnce() -> Result<T>,
) -> Result<T> {
    use rustix::fs::{CWD, Mode, OFlags};
    use rustix::mount::{MoveMountFlags, OpenTreeFlags, move_mount, open_tree};
    use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};

    let home = rustix::fs::open(
        "/proc/self/ns/mnt",
        OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(MountError::setup("opening /proc/self/ns/mnt"))?;
    // setns into a mount namespace resets this process's root and working directory to that
    // namespace's root: under a chroot, MERGED looked up by path afterwards would be the host's.
    // So MERGED, the root and the working directory are held as fds from here on.
    let path_fd = |p: &str, what: &str| {
        rustix::fs::open(
            p,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(MountError::setup(format!("opening {what}")))
    };
    let target = rustix::fs::open(
        layout.merged.as_path(),
        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(MountError::setup(format!(
        "opening the mount point {}",
        layout.merged.display()
    )))?;
    let root = path_fd("/", "the root directory")?;
    let cwd = path_fd(".", "the working directory")?;
    // SAFETY: a new mount namespace only changes what this process sees of the filesystem; no
    // other thread exists (unshare of CLONE_NEWNS fails in a multithreaded process anyway).
    unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNS) }
        .map_err(MountError::setup("unshare(CLONE_NEWNS)"))?;
    let made: Result<(T, rustix::fd::OwnedFd)> = (|| {
        crate::session::private_namespace()?;
        if let Some(ns) = userns {
            idmap_lowers(layout, ns)?;
        }
        let v = mount()?;
        let tree = open_tree(
            CWD,
            layout.merged.as_path(),
            OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC,
        )
        .map_err(MountError::setup(format!(
            "cloning the overlay on {} (open_tree)",
            layout.merged.display()
        )))?;
        Ok((v, tree))
    })();
    // Back home whatever happened: the throwaway namespace, and every idmapped clone in it,
    // goes with it.
    move_into_link_name_space(home.as_fd(), Some(LinkNameSpaceType::Mount)).map_err(
        MountError::setup("returning to the original mount namespace (setns)"),
    )?;
    rustix::process::fchdir(&root)
        .and_then(|()| rustix::process::chroot("."))
        .and_then(|()| rustix::process::fchdir(&cwd))
        .map_err(MountError::setup(
            "restoring the root and working directory after setns",
        ))?;
    let (v, tree) = made?;
    move_mount(
        tree.as_fd(),
        "",
        target.as_fd(),
        "",
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
    )
    .map_err(MountError::setup(format!(
        "attaching the overlay on {} (move_mount)",
        layout.merged.display()
    )))?;
    Ok(v)
}
