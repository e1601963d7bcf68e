//! What both squash modes do to one entry: its content shared, a special file made, its
//! metadata applied exactly.
//!
//! Owns the sharing policy: a reflink or a copy that keeps holes (ovl-layer's `copy`), or a
//! hardlink where the caller allows it, each counted. Metadata is applied exactly, by
//! ovl-layer's `apply`; the `*at` calls on one name are ovl-layer's `fsops`'s.

use std::ffi::{CStr, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{FileType, Mode, Timespec};

use ovl_layer::{Filled, Filler, How, Kind, Meta, Target, apply};

/// The metadata an entry of the layer `m`, of `kind`, is given on disk: xattr names escaped as
/// stored, the atime is the mtime. Under a single-id map (no subordinate ids) the owner cannot
/// be real: the entry stays ours and its owner and mode are recorded as ovl-import records them
/// ([`ovl_layer::owner_records`]).
pub(crate) fn disk_meta(m: &ovl_layer::MergedMeta, kind: &Kind) -> Meta {
    let mut xattrs: Vec<_> = m
        .xattrs
        .iter()
        .map(|(n, v)| (ovl_layer::escape_xattr(n).into_owned(), v.clone()))
        .collect();
    let (mut uid, mut gid) = (m.uid, m.gid);
    if let Some((own_uid, own_gid)) = record_owners() {
        xattrs.extend(ovl_layer::owner_records(
            m.uid,
            m.gid,
            m.mode,
            matches!(kind, Kind::Dir { .. } | Kind::File { .. }),
        ));
        (uid, gid) = (own_uid, own_gid);
    }
    xattrs.sort();
    let mtime = Timespec {
        tv_sec: m.mtime.0,
        tv_nsec: m.mtime.1 as _,
    };
    Meta {
        uid,
        gid,
        mode: m.mode,
        mtime,
        atime: mtime,
        xattrs,
    }
}

/// Our own ids when owners are recorded rather than real: in a user namespace that maps only
/// our own id (rootless without subordinate ids).
pub(crate) fn record_owners() -> Option<(u32, u32)> {
    static ONCE: std::sync::OnceLock<Option<(u32, u32)>> = std::sync::OnceLock::new();
    *ONCE.get_or_init(|| {
        let maps = ovl_layer::current_maps();
        (maps.uid.is_single() && maps.gid.is_single()).then(|| {
            (
                rustix::process::geteuid().as_raw(),
                rustix::process::getegid().as_raw(),
            )
        })
    })
}

/// How file content is shared with its source, and what was done.
#[derive(Debug)]
pub(crate) struct Sharing {
    /// Hardlink lower files that are unchanged (`--link`).
    pub link: bool,
    filler: Filler,
    pub reflinked: AtomicU64,
    pub linked: AtomicU64,
    pub copied: AtomicU64,
    pub bytes_copied: AtomicU64,
}

impl Sharing {
    pub(crate) fn new(link: bool) -> Sharing {
        Sharing {
            link,
            filler: Filler::default(),
            reflinked: AtomicU64::new(0),
            linked: AtomicU64::new(0),
            copied: AtomicU64::new(0),
            bytes_copied: AtomicU64::new(0),
        }
    }

    /// Fill the new, empty file `dst` with the content of `src`: a reflink when the filesystem
    /// has them, else a copy that keeps holes.
    pub(crate) fn fill(&self, src: &File, dst: &File) -> io::Result<()> {
        match self.filler.fill(src, dst)? {
            Filled::Reflinked => {
                self.reflinked.fetch_add(1, Ordering::Relaxed);
            }
            Filled::Copied(n) => {
                self.copied.fetch_add(1, Ordering::Relaxed);
                self.bytes_copied.fetch_add(n, Ordering::Relaxed);
            }
        }
        Ok(())
    }
}

/// Make the symlink, device, fifo or socket `kind` as NAME in DIR (metadata comes after, by
/// name).
pub(crate) fn make_special(dir: &impl AsFd, name: &CStr, kind: &Kind) -> io::Result<()> {
    let (ft, dev) = match kind {
        Kind::Symlink { target } => {
            return rustix::fs::symlinkat(OsStr::from_bytes(target), dir, name).map_err(Into::into);
        }
        Kind::CharDevice { major, minor } => (
            FileType::CharacterDevice,
            rustix::fs::makedev(*major, *minor),
        ),
        Kind::BlockDevice { major, minor } => {
            (FileType::BlockDevice, rustix::fs::makedev(*major, *minor))
        }
        Kind::Fifo => (FileType::Fifo, 0),
        Kind::Socket => (FileType::Socket, 0),
        Kind::Dir { .. } | Kind::File { .. } | Kind::Hardlink { .. } => {
            unreachable!("not a file, dir or hardlink")
        }
    };
    rustix::fs::mknodat(dir, name, ft, Mode::from_raw_mode(0o600), dev).map_err(Into::into)
}

/// Give NAME in DIR exactly `meta` ([`How::EXACT`]: the overlay's own xattrs are left alone,
/// a symlink's mode too).
pub(crate) fn apply_meta(dir: &OwnedFd, name: &CStr, meta: &Meta) -> io::Result<()> {
    apply(Target::At(dir.as_fd(), name), meta, &How::EXACT)?;
    Ok(())
}

/// [`apply_meta`] on an open directory or file (the root of a tree has no name in a parent
/// we hold).
pub(crate) fn apply_meta_fd(fd: &OwnedFd, meta: &Meta) -> io::Result<()> {
    apply(Target::Fd(fd.as_fd()), meta, &How::EXACT)?;
    Ok(())
}
