//! Writing into an image layout: making one, storing blobs, replacing `index.json`.
//!
//! Owns how ovl puts a file into a layout someone else may also write to. Every file is first
//! a [`TempFile`]: created with `O_CREAT | O_EXCL | O_NOFOLLOW` relative to a directory fd, at
//! an unguessable name, so nothing planted in the layout (a symlink at a predictable name, a
//! symlinked `blobs/`) can make ovl write anywhere else; then synced and renamed over its name
//! (a rename replaces a symlink there, never writes through it). `index.json` is read,
//! changed and replaced under an exclusive flock of the layout ([`LayoutLock`]), so writers
//! running at the same time go one after the other and none loses another's update; the blobs
//! it points to are synced before it is.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{AtFlags, FlockOperation, Mode, OFlags};

use super::spec::{LAYOUT_FILE, to_json};
use super::{Algorithm, Digest, Index, Layout, OciError, io_err};
use crate::staging::{self, Registration, Registry, program_name};

/// An exclusive flock of a layout, released when dropped.
#[derive(Debug)]
pub struct LayoutLock<'a> {
    layout: &'a Layout,
}

impl Drop for LayoutLock<'_> {
    fn drop(&mut self) {
        let _ = rustix::fs::flock(self.layout.fd(), FlockOperation::Unlock);
    }
}

/// A file being written in a directory under a temporary name, removed unless committed, and
/// removed by the signal clean-up of `crate::staging` when SIGINT, SIGTERM or SIGHUP ends
/// the process first.
#[derive(Debug)]
pub struct TempFile {
    dir: OwnedFd,
    name: CString,
    file: Option<File>,
    registration: Registration,
}

/// `.ovl-<128 random bits>.tmp`. The bits come from std's `RandomState`, whose keys are drawn
/// from the OS's random source: nobody can plant something at the name in advance (and if
/// something is there anyway, `O_EXCL` refuses it and another name is drawn).
fn unguessable_name() -> CString {
    use std::hash::{BuildHasher, Hasher};
    let mut bits = [0u64; 2];
    for (i, b) in bits.iter_mut().enumerate() {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_usize(i);
        *b = h.finish();
    }
    CString::new(format!(".ovl-{:016x}{:016x}.tmp", bits[0], bits[1])).expect("no NUL")
}

impl TempFile {
    /// A new, empty file in `dir` (mode 0666 less the umask, like any file ovl makes); `shown`:
    /// the directory's path, for messages.
    pub fn create_in(dir: OwnedFd, shown: &Path) -> std::io::Result<TempFile> {
        // Made and registered under the registry's lock: a signal's clean-up either sees it
        // or runs before it exists.
        let mut reg = Registry::lock()?;
        let mut tries = 0;
        loop {
            let name = unguessable_name();
            match rustix::fs::openat(
                &dir,
                &name,
                OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o666),
            ) {
                Ok(fd) => {
                    let path = shown.join(std::ffi::OsStr::from_bytes(name.as_bytes()));
                    let registration = match reg.add(&program_name(), &dir, &name, &path) {
                        Ok(r) => r,
                        Err(e) => {
                            let _ = rustix::fs::unlinkat(&dir, &name, AtFlags::empty());
                            return Err(e);
                        }
                    };
                    return Ok(TempFile {
                        dir,
                        name,
                        file: Some(File::from(fd)),
                        registration,
                    });
                }
                Err(rustix::io::Errno::EXIST) if tries < 16 => tries += 1,
                Err(e) => return Err(e.into()),
            }
        }
    }

    pub fn file(&mut self) -> &mut File {
        self.file.as_mut().expect("open until committed")
    }

    /// Sync the file and rename it to `name` in its directory (replacing what is there).
    pub fn commit(mut self, name: &CStr) -> std::io::Result<()> {
        let file = self.file.take().expect("open until committed");
        let res = file.sync_all().and_then(|()| {
            staging::hold_for_tests();
            let (dir, tmp) = (&self.dir, &self.name);
            self.registration
                .end(|| rustix::fs::renameat(dir, tmp, dir, name).map_err(Into::into))
        });
        if res.is_err() {
            self.file = Some(file);
        }
        res
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if self.file.is_some() {
            let (dir, name) = (&self.dir, &self.name);
            let _ = self
                .registration
                .end(|| rustix::fs::unlinkat(dir, name, AtFlags::empty()).map_err(Into::into));
        }
    }
}

/// Make directory NAME in DIR unless it is there; either way open it, refusing a symlink.
fn make_dir(dir: &impl AsFd, name: &CStr, label: &str) -> Result<OwnedFd, OciError> {
    match rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(0o755)) {
        Ok(()) | Err(rustix::io::Errno::EXIST) => {}
        Err(e) => return Err(io_err(label)(e.into())),
    }
    super::layout::open_dir(dir, name, label)
}

impl Layout {
    /// Open the layout at `path` for writing, making it (and its parents) when it does not
    /// exist, or when it is an empty directory. A directory with other things in it and no
    /// `oci-layout` file is refused.
    pub fn create(path: &Path) -> Result<Layout, OciError> {
        let created = match std::fs::create_dir(path) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(path).map_err(io_err("."))?;
                true
            }
            Err(e) => return Err(io_err(".")(e)),
        };
        let layout = Layout::open(path)?;
        layout.init(created)?;
        Ok(layout)
    }

    /// Under the lock: make the layout's files unless its `oci-layout` file says it is made.
    fn init(&self, created: bool) -> Result<(), OciError> {
        let _lock = self.lock()?;
        let has_marker =
            rustix::fs::statat(self.fd(), c"oci-layout", AtFlags::SYMLINK_NOFOLLOW).is_ok();
        if !has_marker && !created && !is_empty(self)? {
            return Err(OciError::NotALayout);
        }
        let blobs = make_dir(&self.fd(), c"blobs", "blobs")?;
        make_dir(&blobs, c"sha256", "blobs/sha256")?;
        if !has_marker {
            self.write_file(c"index.json", "index.json", &to_json(&Index::default()))?;
            // `oci-layout` last: it says the layout is whole.
            self.write_file(c"oci-layout", "oci-layout", LAYOUT_FILE)?;
        }
        Ok(())
    }

    /// Wait for an exclusive lock of the layout: held from reading `index.json` to replacing
    /// it.
    pub fn lock(&self) -> Result<LayoutLock<'_>, OciError> {
        loop {
            match rustix::fs::flock(self.fd(), FlockOperation::LockExclusive) {
                Ok(()) => return Ok(LayoutLock { layout: self }),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(io_err("flock")(e.into())),
            }
        }
    }

    /// A temporary file in `blobs/sha256` for a blob being written; place it with
    /// [`Layout::commit_blob`].
    pub fn new_blob(&self) -> Result<TempFile, OciError> {
        let dir = self.blobs_dir(Algorithm::Sha256)?;
        TempFile::create_in(dir, &self.path.join("blobs/sha256")).map_err(io_err("blobs/sha256"))
    }

    /// Sync the blob written to `tmp` and give it its name, `digest` (which the writer
    /// computed over what it wrote).
    pub fn commit_blob(&self, tmp: TempFile, digest: &Digest) -> Result<(), OciError> {
        let name = CString::new(digest.hex()).expect("hex has no NUL");
        tmp.commit(&name)
            .map_err(io_err(super::layout::blob_name(digest)))
    }

    /// Store `bytes` as a sha256 blob: its digest. Written even when a blob of that name is
    /// there already (what is there may be anything; the rename replaces it).
    pub fn put_blob(&self, bytes: &[u8]) -> Result<Digest, OciError> {
        let digest = Digest::of(Algorithm::Sha256, bytes);
        let mut tmp = self.new_blob()?;
        tmp.file()
            .write_all(bytes)
            .map_err(io_err(super::layout::blob_name(&digest)))?;
        self.commit_blob(tmp, &digest)?;
        Ok(digest)
    }

    /// Replace `index.json` (the caller holds the `LayoutLock`): the blobs directory is
    /// synced first, so the index never points at blobs a crash could lose.
    pub fn write_index(&self, index: &Index) -> Result<(), OciError> {
        let blobs = self.blobs_dir(Algorithm::Sha256)?;
        rustix::fs::fsync(&blobs).map_err(|e| io_err("blobs/sha256")(e.into()))?;
        self.write_file(c"index.json", "index.json", &to_json(index))
    }

    /// Write a file at the layout's top through a temporary file, synced and renamed.
    fn write_file(&self, name: &CStr, label: &str, bytes: &[u8]) -> Result<(), OciError> {
        let dir = rustix::io::dup(self.fd()).map_err(|e| io_err(label)(e.into()))?;
        let mut tmp = TempFile::create_in(dir, &self.path).map_err(io_err(label))?;
        tmp.file().write_all(bytes).map_err(io_err(label))?;
        tmp.commit(name).map_err(io_err(label))?;
        rustix::fs::fsync(self.fd()).map_err(|e| io_err(label)(e.into()))
    }
}

fn is_empty(layout: &Layout) -> Result<bool, OciError> {
    let mut dir = rustix::fs::Dir::read_from(layout.fd()).map_err(|e| io_err(".")(e.into()))?;
    while let Some(entry) = dir.read() {
        let entry = entry.map_err(|e| io_err(".")(e.into()))?;
        if !matches!(entry.file_name().to_bytes(), b"." | b"..") {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_files_are_exclusive_and_vanish_unless_committed() {
        let t = tempfile::tempdir().unwrap();
        let open = || {
            rustix::fs::open(
                t.path(),
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .unwrap()
        };
        let names = || -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(t.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        let (a, b) = (unguessable_name(), unguessable_name());
        assert_ne!(a, b);
        let mut tmp = TempFile::create_in(open(), t.path()).unwrap();
        tmp.file().write_all(b"x").unwrap();
        drop(tmp);
        assert!(names().is_empty());
        // A symlink where the result goes is replaced, not written through.
        let victim = t.path().join("victim");
        std::fs::write(&victim, b"v").unwrap();
        std::os::unix::fs::symlink(&victim, t.path().join("out")).unwrap();
        let mut tmp = TempFile::create_in(open(), t.path()).unwrap();
        tmp.file().write_all(b"new").unwrap();
        tmp.commit(c"out").unwrap();
        assert_eq!(names(), ["out", "victim"]);
        assert_eq!(std::fs::read(t.path().join("out")).unwrap(), b"new");
        assert_eq!(std::fs::read(&victim).unwrap(), b"v");
    }
}
