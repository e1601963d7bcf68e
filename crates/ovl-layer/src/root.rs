//! A directory root that every write is confined to.
//!
//! Owns path safety for all tools: a [`Root`] holds a directory fd, and every path inside it is
//! resolved from that fd with `openat2(RESOLVE_IN_ROOT)`, so a symlink (relative, absolute,
//! chained) or a `..` can never lead out of the root, and a path is never re-resolved by name
//! from `/` (no check-then-use race). The last component of a path is only ever touched with
//! `*at` calls that do not follow it ([`Leaf`], through [`crate::fsops`]).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::fs::{Mode, OFlags, ResolveFlags, Stat};

use crate::fsops;
use crate::path::LayerPath;
use crate::xattrs::Xattr;

const RESOLVE: ResolveFlags = ResolveFlags::IN_ROOT.union(ResolveFlags::NO_MAGICLINKS);

/// A directory that paths are resolved in, never out of.
#[derive(Debug)]
pub struct Root {
    fd: OwnedFd,
    path: PathBuf,
}

impl Root {
    /// Open an existing directory as a root. `path` itself may be reached through symlinks: it
    /// is the caller's choice; what is below it is confined.
    pub fn open(path: &Path) -> io::Result<Root> {
        // The bare error: every caller names the path (naming it here too said it twice).
        let fd = rustix::fs::open(
            path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Root {
            fd,
            path: path.to_path_buf(),
        })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The host path of `p` for messages (never used to open anything).
    pub fn display(&self, p: &LayerPath) -> String {
        if p.is_root() {
            self.path.display().to_string()
        } else {
            format!("{}/{}", self.path.display(), p)
        }
    }

    /// Open directory `p` (an `O_PATH` fd), resolved inside the root. With `create`, missing
    /// directories are made (mode 0755, owned by the caller) on the way, as tar does.
    pub(crate) fn open_dir(&self, p: &LayerPath, create: bool) -> io::Result<OwnedFd> {
        match self.openat2_dir(p.as_bytes()) {
            Err(e) if create && e.raw_os_error() == Some(libc::ENOENT) => self.create_dirs(p),
            r => r,
        }
    }

    fn openat2_dir(&self, rel: &[u8]) -> io::Result<OwnedFd> {
        let rel: &[u8] = if rel.is_empty() { b"." } else { rel };
        rustix::fs::openat2(
            &self.fd,
            std::ffi::OsStr::from_bytes(rel),
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            RESOLVE,
        )
        .map_err(io::Error::from)
    }

    fn create_dirs(&self, p: &LayerPath) -> io::Result<OwnedFd> {
        let mut cur = self.openat2_dir(b"")?;
        let mut prefix = LayerPath::root();
        for comp in p.components() {
            prefix = prefix.join(comp);
            cur = match self.openat2_dir(prefix.as_bytes()) {
                Ok(fd) => fd,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    match rustix::fs::mkdirat(
                        &cur,
                        std::ffi::OsStr::from_bytes(comp),
                        Mode::from_raw_mode(0o755),
                    ) {
                        Ok(()) => {}
                        Err(rustix::io::Errno::EXIST) => {
                            // Something is there yet does not resolve: a dangling symlink.
                            return Err(io::Error::other(format!(
                                "{} is a symlink that leads nowhere inside the root",
                                prefix
                            )));
                        }
                        Err(e) => return Err(e.into()),
                    }
                    self.openat2_dir(prefix.as_bytes())?
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
                    return Err(io::Error::other(format!("{prefix} is not a directory")));
                }
                Err(e) => return Err(e),
            };
        }
        Ok(cur)
    }

    /// The parent directory of `p` (resolved inside the root) and `p`'s last component.
    /// The root itself has no leaf.
    pub fn leaf(&self, p: &LayerPath, create_parents: bool) -> io::Result<Leaf> {
        let (parent, name) = p
            .split_last()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the root has no parent"))?;
        let dir = self.open_dir(&parent, create_parents)?;
        Leaf::new(dir, name)
    }
}

/// One name in an open directory: every operation on it uses the directory fd and never
/// follows the name if it is a symlink.
#[derive(Debug)]
pub struct Leaf {
    /// Shared: the extractor hands the same parent to every entry of a directory (a
    /// descriptor of its own each would cost a dup and a close per entry).
    pub dir: Arc<OwnedFd>,
    pub name: CString,
}

impl Leaf {
    pub fn new(dir: impl Into<Arc<OwnedFd>>, name: &[u8]) -> io::Result<Leaf> {
        Ok(Leaf {
            dir: dir.into(),
            name: fsops::cstr(name)?,
        })
    }

    /// lstat; `None` when nothing is there.
    pub fn stat(&self) -> io::Result<Option<Stat>> {
        fsops::stat_at(&self.dir, &self.name)
    }

    /// A path that reaches this name through the directory fd without following the name
    /// itself, for the calls that have no fd form (lsetxattr and friends on symlinks and
    /// devices).
    pub fn proc_path(&self) -> PathBuf {
        fsops::proc_path(&self.dir, &self.name)
    }

    /// Remove whatever is at this name (a directory with everything below it).
    pub fn remove_all(&self) -> io::Result<()> {
        fsops::remove_at(&self.dir, &self.name).map(drop)
    }

    /// Open this name as a directory for reading (`O_NOFOLLOW`).
    pub(crate) fn open_dir(&self) -> io::Result<OwnedFd> {
        fsops::open_dir_at(&self.dir, &self.name)
    }

    pub fn xattrs(&self) -> io::Result<Vec<Xattr>> {
        crate::xattrs::list_at(&self.dir, &self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlinks_never_leave_the_root() {
        let t = tempfile::tempdir().unwrap();
        let root_path = t.path().join("root");
        std::fs::create_dir(&root_path).unwrap();
        std::fs::create_dir(t.path().join("outside")).unwrap();
        std::os::unix::fs::symlink("../..", root_path.join("rel")).unwrap();
        std::os::unix::fs::symlink(t.path().join("outside"), root_path.join("abs")).unwrap();
        let root = Root::open(&root_path).unwrap();
        // `rel` (../..) resolves to the root itself, never above it.
        let leaf = root
            .leaf(&LayerPath::parse(b"rel/x").unwrap(), true)
            .unwrap();
        std::fs::write(leaf.proc_path(), b"hi").unwrap();
        assert!(root_path.join("x").exists());
        assert!(!t.path().join("outside/x").exists());
        // `abs` points at a path that does not exist inside the root: refused, nothing made.
        let err = root
            .leaf(&LayerPath::parse(b"abs/y").unwrap(), true)
            .unwrap_err();
        assert!(err.to_string().contains("symlink"), "{err}");
        assert!(
            std::fs::read_dir(t.path().join("outside"))
                .unwrap()
                .next()
                .is_none()
        );
    }

    #[test]
    fn creates_parents_and_removes_trees() {
        let t = tempfile::tempdir().unwrap();
        let root = Root::open(t.path()).unwrap();
        let leaf = root
            .leaf(&LayerPath::parse(b"a/b/c").unwrap(), true)
            .unwrap();
        assert!(t.path().join("a/b").is_dir());
        assert!(leaf.stat().unwrap().is_none());
        std::fs::write(t.path().join("a/b/f"), b"x").unwrap();
        root.leaf(&LayerPath::parse(b"a").unwrap(), false)
            .unwrap()
            .remove_all()
            .unwrap();
        assert!(!t.path().join("a").exists());
    }
}
