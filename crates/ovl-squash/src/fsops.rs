//! What both squash modes do to one entry: its content shared, a special file made, its
//! metadata applied exactly.
//!
//! Owns the sharing policy: a reflink or a copy that keeps holes ([`ovl_layer::copy`]), or a
//! hardlink where the caller allows it, each counted. And the metadata order every tool uses:
//! owner first (chown clears setuid bits and capabilities), then xattrs, then mode, then times
//! last (every other change bumps them). The `*at` calls on one name are
//! [`ovl_layer::fsops`]'s.

use std::ffi::{CStr, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{FileType, Mode, Stat, Timespec, Timestamps};

use ovl_layer::copy::{Filled, Filler};
use ovl_layer::fsops::{chmod_at, chown_at, proc_path, set_times_at};
use ovl_layer::upper::Kind;
use ovl_layer::whiteout::{self, UpperXattr};

/// The metadata to give an entry, xattrs named as they are stored on disk (escaped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskMeta {
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
    pub mtime: (i64, u32),
    pub xattrs: Vec<(String, Vec<u8>)>,
}

impl DiskMeta {
    /// From the layer metadata the upper reader yields (unescaped xattr names).
    pub fn from_layer(m: &ovl_layer::upper::Meta) -> DiskMeta {
        let mut xattrs: Vec<_> = m
            .xattrs
            .iter()
            .map(|(n, v)| (whiteout::escape_xattr(n).into_owned(), v.clone()))
            .collect();
        xattrs.sort();
        DiskMeta {
            uid: m.uid,
            gid: m.gid,
            mode: m.mode,
            mtime: m.mtime,
            xattrs,
        }
    }

    /// From an entry as it is on disk in a lower layer: its overlay-private xattrs dropped.
    pub fn from_disk(st: &Stat, xattrs: &[(String, Vec<u8>)]) -> DiskMeta {
        DiskMeta {
            uid: st.st_uid,
            gid: st.st_gid,
            mode: st.st_mode & 0o7777,
            mtime: (st.st_mtime, st.st_mtime_nsec as u32),
            xattrs: public_xattrs(xattrs),
        }
    }
}

/// The xattrs of an on-disk entry that are content, not overlay markers (names as stored).
pub fn public_xattrs(xattrs: &[(String, Vec<u8>)]) -> Vec<(String, Vec<u8>)> {
    xattrs
        .iter()
        .filter(|(n, _)| matches!(whiteout::classify_upper_xattr(n), UpperXattr::Keep(_)))
        .cloned()
        .collect()
}

/// How file content is shared with its source, and what was done.
#[derive(Debug)]
pub struct Sharing {
    /// Hardlink lower files that are unchanged (`--link`).
    pub link: bool,
    filler: Filler,
    pub reflinked: AtomicU64,
    pub linked: AtomicU64,
    pub copied: AtomicU64,
    pub bytes_copied: AtomicU64,
}

impl Sharing {
    pub fn new(link: bool) -> Sharing {
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
    pub fn fill(&self, src: &File, dst: &File) -> io::Result<()> {
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
pub fn make_special(dir: &impl AsFd, name: &CStr, kind: &Kind) -> io::Result<()> {
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

fn times(m: &DiskMeta) -> Timestamps {
    let t = Timespec {
        tv_sec: m.mtime.0,
        tv_nsec: m.mtime.1 as _,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

/// Give NAME in DIR exactly `meta`: owner, xattrs (public ones not in `meta` removed, private
/// ones left alone), mode (not for symlinks: Linux has no lchmod), times.
pub fn apply_meta(dir: &OwnedFd, name: &CStr, meta: &DiskMeta) -> io::Result<()> {
    let st = rustix::fs::statat(dir, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)?;
    let symlink = FileType::from_raw_mode(st.st_mode) == FileType::Symlink;
    if (st.st_uid, st.st_gid) != (meta.uid, meta.gid) {
        chown_at(dir, name, meta.uid, meta.gid)?;
    }
    let path = proc_path(dir, name);
    let have = ovl_layer::xattrs::list_path(&path)?;
    for (n, _) in public_xattrs(&have) {
        if !meta.xattrs.iter().any(|(m, _)| *m == n) {
            rustix::fs::lremovexattr(&path, n.as_str())?;
        }
    }
    for (n, v) in &meta.xattrs {
        if !have.iter().any(|(h, hv)| h == n && hv == v) {
            rustix::fs::lsetxattr(&path, n.as_str(), v, rustix::fs::XattrFlags::empty())?;
        }
    }
    if !symlink {
        chmod_at(dir, name, meta.mode)?;
    }
    set_times_at(dir, name, &times(meta))
}

/// [`apply_meta`] on an open directory or file (the root of a tree has no name in a parent
/// we hold).
pub fn apply_meta_fd(fd: &OwnedFd, meta: &DiskMeta) -> io::Result<()> {
    let st = rustix::fs::fstat(fd)?;
    if (st.st_uid, st.st_gid) != (meta.uid, meta.gid) {
        rustix::fs::fchown(
            fd,
            Some(rustix::fs::Uid::from_raw(meta.uid)),
            Some(rustix::fs::Gid::from_raw(meta.gid)),
        )?;
    }
    let have = ovl_layer::xattrs::list_fd(fd)?;
    for (n, _) in public_xattrs(&have) {
        if !meta.xattrs.iter().any(|(m, _)| *m == n) {
            rustix::fs::fremovexattr(fd, n.as_str())?;
        }
    }
    for (n, v) in &meta.xattrs {
        if !have.iter().any(|(h, hv)| h == n && hv == v) {
            ovl_layer::xattrs::set_fd(fd, n, v)?;
        }
    }
    rustix::fs::fchmod(fd, Mode::from_raw_mode(meta.mode))?;
    rustix::fs::futimens(fd, &times(meta))?;
    Ok(())
}

/// Remove the overlay-private xattrs of NAME in DIR (so a link to it in a lower carries none).
/// Returns whether there were any.
pub fn strip_private(dir: &OwnedFd, name: &CStr) -> io::Result<bool> {
    let path = proc_path(dir, name);
    let mut any = false;
    for (n, _) in ovl_layer::xattrs::list_path(&path)? {
        if whiteout::classify_upper_xattr(&n) == UpperXattr::Private {
            match rustix::fs::lremovexattr(&path, n.as_str()) {
                Ok(()) | Err(rustix::io::Errno::NODATA) => any = true,
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(any)
}
