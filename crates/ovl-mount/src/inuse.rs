//! Whether an upper or work directory is already serving another overlay.
//!
//! Owns the two signs of use: an overlay in this mount namespace whose `upperdir=` or `workdir=`
//! is the directory (persistent mounts, visible to everyone here; the mount table is read by
//! ovl-layer's `mounts`), and an advisory lock ([`WorkLock`]) that ovl-mount holds on the work
//! directory while its command runs (rootless mounts live in private namespaces that mountinfo
//! here never shows).

use std::os::fd::OwnedFd;
use std::path::Path;

use ovl_layer::{overlay_using, own_mounts};
use rustix::fs::{FlockOperation, Mode, OFlags};

use crate::error::{MountError, Result};

/// Refuse an upper or work directory that an overlay in this namespace already uses.
pub(crate) fn check_not_mounted(upper: &Path, work: &Path) -> Result<()> {
    let all = own_mounts();
    if let Some(m) = overlay_using(&all, "workdir", work) {
        return Err(MountError::WorkInUse {
            path: work.to_path_buf(),
            by: format!("the overlay on {}", m.mount_point.display()),
        });
    }
    if let Some(m) = overlay_using(&all, "upperdir", upper) {
        return Err(MountError::UpperInUse {
            path: upper.to_path_buf(),
            by: format!("the overlay on {}", m.mount_point.display()),
        });
    }
    Ok(())
}

/// An exclusive lock on a work directory, held while the mount lives.
#[derive(Debug)]
pub(crate) struct WorkLock {
    _fd: OwnedFd,
}

impl WorkLock {
    /// Take the lock, or say that another ovl-mount holds it.
    pub(crate) fn take(work: &Path) -> Result<WorkLock> {
        let fd = rustix::fs::open(
            work,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| MountError::Io {
            what: "work directory",
            path: work.to_path_buf(),
            source: e.into(),
        })?;
        match rustix::fs::flock(&fd, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(WorkLock { _fd: fd }),
            Err(rustix::io::Errno::WOULDBLOCK) => Err(MountError::WorkInUse {
                path: work.to_path_buf(),
                by: "another ovl-mount (it holds a lock on it)".into(),
            }),
            Err(e) => Err(MountError::Io {
                what: "locking the work directory",
                path: work.to_path_buf(),
                source: e.into(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let _held = WorkLock::take(t.path()).unwrap();
        let e = WorkLock::take(t.path()).unwrap_err();
        assert!(matches!(e, MountError::WorkInUse { .. }), "{e}");
    }
}
