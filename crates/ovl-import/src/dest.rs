//! The destination directory: built in a temporary sibling, synced, renamed into place.
//!
//! Owns the promise that DEST appears only when an import succeeded: a crash or an error leaves
//! at most a `.NAME.ovl-import-PID` sibling, which the next import into the same parent removes
//! once its process is gone.

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use ovl_layer::root::Root;

use crate::ImportError;

const TAG: &str = ".ovl-import-";

/// A temporary sibling of DEST under construction.
#[derive(Debug)]
pub struct Staging {
    pub dest: PathBuf,
    pub tmp: PathBuf,
    done: bool,
}

impl Staging {
    /// Refuse an existing DEST, clear dead leftovers, make the temporary sibling.
    pub fn new(dest: &Path) -> Result<Staging, ImportError> {
        let io = |e: std::io::Error, p: &Path| ImportError::Dest {
            path: p.to_path_buf(),
            source: e,
        };
        if dest.symlink_metadata().is_ok() {
            return Err(ImportError::DestExists(dest.to_path_buf()));
        }
        let name = dest.file_name().ok_or_else(|| ImportError::Dest {
            path: dest.to_path_buf(),
            source: std::io::Error::other("DEST needs a final name component"),
        })?;
        let parent = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !parent.is_dir() {
            return Err(io(
                std::io::Error::other("the parent directory does not exist"),
                &parent,
            ));
        }
        remove_dead_leftovers(&parent, name);
        let mut tmp_name = OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!("{TAG}{}", std::process::id()));
        let tmp = parent.join(tmp_name);
        if tmp.symlink_metadata().is_ok() {
            remove(&tmp).map_err(|e| io(e, &tmp))?;
        }
        std::fs::create_dir(&tmp).map_err(|e| io(e, &tmp))?;
        Ok(Staging {
            dest: dest.to_path_buf(),
            tmp,
            done: false,
        })
    }

    /// Flush everything written below the sibling to disk, then rename it to DEST (refusing to
    /// replace a DEST that appeared meanwhile).
    pub fn commit(mut self) -> Result<(), ImportError> {
        let io = |e: std::io::Error, p: &Path| ImportError::Dest {
            path: p.to_path_buf(),
            source: e,
        };
        let root = Root::open(&self.tmp).map_err(|e| io(e, &self.tmp))?;
        let fd = rustix::fs::openat(
            root.fd(),
            c".",
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(|e| io(e.into(), &self.tmp))?;
        // One syncfs instead of an fsync per file: the same durability for a fresh tree.
        rustix::fs::syncfs(&fd).map_err(|e| io(e.into(), &self.tmp))?;
        rustix::fs::renameat_with(
            rustix::fs::CWD,
            &self.tmp,
            rustix::fs::CWD,
            &self.dest,
            rustix::fs::RenameFlags::NOREPLACE,
        )
        .map_err(|e| match e {
            rustix::io::Errno::EXIST => ImportError::DestExists(self.dest.clone()),
            e => io(e.into(), &self.dest),
        })?;
        if let Some(parent) = self.dest.parent().filter(|p| !p.as_os_str().is_empty()) {
            if let Ok(d) = std::fs::File::open(parent) {
                let _ = d.sync_all();
            }
        }
        self.done = true;
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.done {
            let _ = remove(&self.tmp);
        }
    }
}

/// Remove a tree without following symlinks inside it.
fn remove(path: &Path) -> std::io::Result<()> {
    let parent = path.parent().unwrap_or(Path::new("."));
    let name = std::ffi::CString::new(path.file_name().unwrap_or_default().as_bytes())?;
    let dir = rustix::fs::open(
        parent,
        rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?;
    ovl_layer::root::remove_tree(&dir, &name)
}

/// Leftover siblings of crashed imports into the same DEST whose process is gone.
fn remove_dead_leftovers(parent: &Path, name: &std::ffi::OsStr) {
    let mut prefix = b".".to_vec();
    prefix.extend_from_slice(name.as_bytes());
    prefix.extend_from_slice(TAG.as_bytes());
    let Ok(rd) = std::fs::read_dir(parent) else {
        return;
    };
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
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = remove(&ent.path());
        }
    }
}
