//! A new directory built in a temporary sibling, synced, and renamed into place.
//!
//! Owns the promise every tool that creates a layer directory makes (ovl-import's DEST,
//! ovl-squash's `--output`): the directory appears only complete. A crash or an error leaves at
//! most a `.NAME.<tool>-PID` sibling, which the next run into the same parent removes once its
//! owner is gone.
//!
//! "Gone" is decided by two signs, both needed: the owner holds an exclusive `flock` on the
//! sibling while it lives (a lock dies with its process, even one killed by SIGKILL), and no
//! process with that PID exists. The PID check alone would be fooled by PID reuse; the lock
//! alone would race with an owner that made its sibling but has not locked it yet.

use std::ffi::{OsStr, OsString};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{FlockOperation, Mode, OFlags};

#[derive(Debug, thiserror::Error)]
pub enum StagingError {
    #[error("{0}: already exists")]
    DestExists(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(e: impl Into<std::io::Error>, p: &Path) -> StagingError {
    StagingError::Io {
        path: p.to_path_buf(),
        source: e.into(),
    }
}

/// A temporary sibling of `dest` under construction; removed on drop unless committed.
#[derive(Debug)]
pub struct Staging {
    pub dest: PathBuf,
    pub tmp: PathBuf,
    lock: Option<OwnedFd>,
    done: bool,
}

impl Staging {
    /// Refuse an existing `dest`, clear dead leftovers of `tool` for it, make and lock the
    /// temporary sibling `.NAME.<tool>-PID`.
    pub fn new(dest: &Path, tool: &str) -> Result<Staging, StagingError> {
        if dest.symlink_metadata().is_ok() {
            return Err(StagingError::DestExists(dest.to_path_buf()));
        }
        let name = dest.file_name().ok_or_else(|| {
            io(
                std::io::Error::other("the directory needs a final name component"),
                dest,
            )
        })?;
        let parent = parent_of(dest);
        if !parent.is_dir() {
            return Err(io(
                std::io::Error::other("the parent directory does not exist"),
                &parent,
            ));
        }
        remove_dead_leftovers(&parent, name, tool);
        let tmp = parent.join(sibling_name(name, tool, std::process::id()));
        if tmp.symlink_metadata().is_ok() {
            remove_path(&tmp).map_err(|e| io(e, &tmp))?;
        }
        std::fs::create_dir(&tmp).map_err(|e| io(e, &tmp))?;
        let lock = lock(&tmp, false).map_err(|e| io(e, &tmp))?;
        Ok(Staging {
            dest: dest.to_path_buf(),
            tmp,
            lock,
            done: false,
        })
    }

    /// Flush everything written below the sibling to disk, then rename it to `dest` (refusing
    /// to replace a `dest` that appeared meanwhile), then flush the parent.
    pub fn commit(mut self) -> Result<(), StagingError> {
        let fd = rustix::fs::open(
            &self.tmp,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| io(e, &self.tmp))?;
        // One syncfs instead of an fsync per file: the same durability for a fresh tree.
        rustix::fs::syncfs(&fd).map_err(|e| io(e, &self.tmp))?;
        rustix::fs::renameat_with(
            rustix::fs::CWD,
            &self.tmp,
            rustix::fs::CWD,
            &self.dest,
            rustix::fs::RenameFlags::NOREPLACE,
        )
        .map_err(|e| match e {
            rustix::io::Errno::EXIST => StagingError::DestExists(self.dest.clone()),
            e => io(e, &self.dest),
        })?;
        self.done = true;
        if let Ok(d) = std::fs::File::open(parent_of(&self.dest)) {
            let _ = d.sync_all();
        }
        self.lock = None;
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.done {
            let _ = remove_path(&self.tmp);
        }
    }
}

fn parent_of(p: &Path) -> PathBuf {
    match p.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// `.NAME.<tool>-PID`
pub fn sibling_name(name: &OsStr, tool: &str, pid: u32) -> OsString {
    let mut s = OsString::from(".");
    s.push(name);
    s.push(format!(".{tool}-{pid}"));
    s
}

/// An exclusive lock on directory `p`; `None` when `nonblocking` and someone else holds it.
fn lock(p: &Path, nonblocking: bool) -> std::io::Result<Option<OwnedFd>> {
    let fd = rustix::fs::open(
        p,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let op = if nonblocking {
        FlockOperation::NonBlockingLockExclusive
    } else {
        FlockOperation::LockExclusive
    };
    match rustix::fs::flock(&fd, op) {
        Ok(()) => Ok(Some(fd)),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Remove a tree without following symlinks inside it.
pub fn remove_path(path: &Path) -> std::io::Result<()> {
    let name = std::ffi::CString::new(path.file_name().unwrap_or_default().as_bytes())?;
    let dir = rustix::fs::open(
        parent_of(path),
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    crate::root::Leaf::new(dir, name.as_bytes())?.remove_all()
}

/// Remove the siblings `.NAME.<tool>-PID` in `parent` whose owner is gone (see the module doc).
/// Returns how many were removed.
pub fn remove_dead_leftovers(parent: &Path, name: &OsStr, tool: &str) -> usize {
    let mut prefix = b".".to_vec();
    prefix.extend_from_slice(name.as_bytes());
    prefix.extend_from_slice(format!(".{tool}-").as_bytes());
    let Ok(rd) = std::fs::read_dir(parent) else {
        return 0;
    };
    let mut removed = 0;
    for ent in rd.flatten() {
        let n = ent.file_name();
        let Some(pid) = n.as_bytes().strip_prefix(prefix.as_slice()) else {
            continue;
        };
        let Some(pid) = std::str::from_utf8(pid)
            .ok()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let path = ent.path();
        // A directory someone holds locked is alive whatever its name says.
        let held = match ent.file_type() {
            Ok(ft) if ft.is_dir() => !matches!(lock(&path, true), Ok(Some(_))),
            _ => false,
        };
        if !held && remove_path(&path).is_ok() {
            removed += 1;
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_renames_and_drop_cleans() {
        let t = tempfile::tempdir().unwrap();
        let dest = t.path().join("d");
        let s = Staging::new(&dest, "t").unwrap();
        std::fs::write(s.tmp.join("f"), b"x").unwrap();
        assert!(!dest.exists());
        s.commit().unwrap();
        assert_eq!(std::fs::read(dest.join("f")).unwrap(), b"x");
        assert!(matches!(
            Staging::new(&dest, "t"),
            Err(StagingError::DestExists(_))
        ));
        let other = t.path().join("e");
        let s = Staging::new(&other, "t").unwrap();
        let tmp = s.tmp.clone();
        drop(s);
        assert!(!tmp.exists() && !other.exists());
    }

    #[test]
    fn only_dead_leftovers_are_removed() {
        let t = tempfile::tempdir().unwrap();
        let dead = t.path().join(".d.t-4194305");
        std::fs::create_dir_all(dead.join("x/y")).unwrap();
        // A live owner: its lock is held (here by us, under a dead-looking pid).
        let held = t.path().join(".d.t-4194306");
        std::fs::create_dir(&held).unwrap();
        let _lock = lock(&held, false).unwrap();
        let other_tool = t.path().join(".d.u-4194305");
        std::fs::create_dir(&other_tool).unwrap();
        assert_eq!(remove_dead_leftovers(t.path(), OsStr::new("d"), "t"), 1);
        assert!(!dead.exists() && held.exists() && other_tool.exists());
    }
}
