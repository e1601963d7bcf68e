//! Whether an upper or work directory is already serving another overlay.
//!
//! Owns the two signs of use: an overlay in /proc/self/mountinfo whose `upperdir=` or `workdir=`
//! is the directory (persistent mounts, visible to everyone in this mount namespace), and an
//! advisory lock ([`WorkLock`]) that ovl-mount holds on the work directory while its command runs
//! (rootless mounts live in private namespaces that mountinfo here never shows).

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use rustix::fs::{FlockOperation, Mode, OFlags};

use crate::error::{MountError, Result};

/// A mount from mountinfo: where it is and its filesystem options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_point: PathBuf,
    pub fs_type: String,
    pub super_options: String,
}

/// Undo mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parse the text of /proc/self/mountinfo.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mount_point = pre.split(' ').nth(4)?;
            let mut post = post.split(' ');
            let fs_type = post.next()?.to_string();
            let _source = post.next()?;
            let super_options = post.next().unwrap_or("").to_string();
            Some(MountEntry {
                mount_point: PathBuf::from(unescape(mount_point)),
                fs_type,
                super_options,
            })
        })
        .collect()
}

/// The mounts of this process's namespace.
pub fn mounts() -> Vec<MountEntry> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|t| parse_mountinfo(&t))
        .unwrap_or_default()
}

/// The overlay whose option `key` (`upperdir` or `workdir`) is `dir`, if any.
pub fn overlay_using<'a>(
    mounts: &'a [MountEntry],
    key: &str,
    dir: &Path,
) -> Option<&'a MountEntry> {
    let want = dir.to_string_lossy();
    mounts.iter().filter(|m| m.fs_type == "overlay").find(|m| {
        m.super_options.split(',').any(|o| {
            o.split_once('=')
                .is_some_and(|(k, v)| k == key && unescape(v) == want)
        })
    })
}

/// The mount mounted exactly at `path`, the last (topmost) one if several are.
pub fn mounted_at<'a>(mounts: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    mounts.iter().rev().find(|m| m.mount_point == path)
}

/// Refuse an upper or work directory that an overlay in this namespace already uses.
pub fn check_not_mounted(upper: &Path, work: &Path) -> Result<()> {
    let all = mounts();
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
pub struct WorkLock {
    _fd: OwnedFd,
}

impl WorkLock {
    /// Take the lock, or say that another ovl-mount holds it.
    pub fn take(work: &Path) -> Result<WorkLock> {
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

    const INFO: &str = "\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
44 27 0:39 / /tmp/a\\040b rw,relatime - overlay overlay rw,lowerdir=/l,upperdir=/x/u,workdir=/x/w,uuid=on
45 27 0:40 / /tmp/f rw - fuse.fuse-overlayfs fuse-overlayfs rw,user_id=0
";

    #[test]
    fn finds_overlays_by_upper_and_work() {
        let m = parse_mountinfo(INFO);
        assert_eq!(m.len(), 3);
        assert_eq!(m[1].mount_point, Path::new("/tmp/a b"));
        assert_eq!(
            overlay_using(&m, "workdir", Path::new("/x/w"))
                .unwrap()
                .mount_point,
            Path::new("/tmp/a b")
        );
        assert!(overlay_using(&m, "workdir", Path::new("/x/u")).is_none());
        assert!(overlay_using(&m, "upperdir", Path::new("/x/u")).is_some());
        assert_eq!(
            mounted_at(&m, Path::new("/tmp/f")).unwrap().fs_type,
            "fuse.fuse-overlayfs"
        );
    }

    #[test]
    fn a_second_lock_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let _held = WorkLock::take(t.path()).unwrap();
        let e = WorkLock::take(t.path()).unwrap_err();
        assert!(matches!(e, MountError::WorkInUse { .. }), "{e}");
    }
}
