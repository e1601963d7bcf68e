//! Reading an image layout through its directory fd.
//!
//! Owns how a file of a layout is reached and read: from the layout's fd, one component at a
//! time, never following a symlink (`blobs`, `blobs/ALG` and the file itself); opened without
//! blocking (a FIFO would hang an open for reading) and used only if it is a regular file; a
//! JSON document only up to [`MAX_JSON`] bytes (its size is checked before a byte is read, so a
//! 300 MB `index.json` costs nothing); a blob only if its length and digest are what its
//! descriptor says. Nested image indexes are followed at most [`MAX_INDEX_DEPTH`] deep, in a
//! loop, so a hostile chain of indexes is an error naming where it stopped, not a stack
//! overflow.

use std::ffi::CStr;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use serde::de::DeserializeOwned;

use super::{Descriptor, Digest, Index, Manifest, OciError, VerifyingReader, io_err};

/// The most bytes `index.json`, a manifest, a nested index or a config may have: they are read
/// whole.
pub(crate) const MAX_JSON: u64 = 4 << 20;

/// How many image indexes may stand between `index.json` and a manifest (real images use one).
pub(crate) const MAX_INDEX_DEPTH: usize = 8;

/// An image layout directory, held open.
#[derive(Debug)]
pub struct Layout {
    fd: OwnedFd,
    /// Where it was opened, for messages.
    pub(super) path: std::path::PathBuf,
}

/// A blob opened for streaming: a regular file of the size its descriptor says.
#[derive(Debug)]
pub struct Blob {
    pub file: File,
    pub digest: Digest,
    pub size: u64,
}

impl Blob {
    /// `inner` (this blob's bytes, perhaps through a progress counter) checked against the
    /// descriptor as it is read.
    pub fn verify<R: Read>(&self, inner: R) -> VerifyingReader<R> {
        VerifyingReader::new(inner, self.digest.clone(), self.size)
    }
}

fn kind_name(ft: FileType) -> &'static str {
    match ft {
        FileType::RegularFile => "a regular file",
        FileType::Directory => "a directory",
        FileType::Symlink => "a symlink",
        FileType::Fifo => "a FIFO",
        FileType::Socket => "a socket",
        FileType::CharacterDevice => "a character device",
        FileType::BlockDevice => "a block device",
        FileType::Unknown => "of an unknown type",
    }
}

/// The path of a blob inside a layout, for messages and for the tools' labels.
pub fn blob_name(digest: &Digest) -> String {
    format!("blobs/{}/{}", digest.algorithm().name(), digest.hex())
}

impl Layout {
    /// Open the layout at `path` (the path itself is the caller's to trust; nothing inside it
    /// is).
    pub fn open(path: &Path) -> Result<Layout, OciError> {
        let fd = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| OciError::Io {
            name: ".".into(),
            source: e.into(),
        })?;
        Ok(Layout {
            fd,
            path: path.to_path_buf(),
        })
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// `blobs/ALG`, opened without following a symlink on the way.
    pub(crate) fn blobs_dir(&self, alg: super::Algorithm) -> Result<OwnedFd, OciError> {
        let blobs = open_dir(&self.fd, c"blobs", "blobs")?;
        let name = std::ffi::CString::new(alg.name()).expect("no NUL");
        open_dir(&blobs, &name, &format!("blobs/{}", alg.name()))
    }

    /// `index.json`, bounded.
    pub fn read_index(&self) -> Result<Index, OciError> {
        let (file, size) = open_regular(&self.fd, c"index.json", "index.json")?;
        let bytes = read_bounded(file, size, "index.json")?;
        serde_json::from_slice(&bytes).map_err(|source| OciError::Json {
            name: "index.json".into(),
            source,
        })
    }

    /// Open the blob `d` names: a regular file of exactly `d.size` bytes (its digest is
    /// checked as it is read, see [`Blob::verify`]).
    pub fn open_blob(&self, d: &Descriptor) -> Result<Blob, OciError> {
        let dir = self.blobs_dir(d.digest.algorithm())?;
        let name = std::ffi::CString::new(d.digest.hex()).expect("hex has no NUL");
        let (file, size) = open_regular(&dir, &name, &blob_name(&d.digest))?;
        if size != d.size {
            return Err(OciError::WrongSize {
                digest: d.digest.clone(),
                expected: d.size,
                actual: size,
            });
        }
        Ok(Blob {
            file,
            digest: d.digest.clone(),
            size,
        })
    }

    /// Read the JSON blob `d` names: bounded, its size and digest checked, then parsed.
    pub fn read_json<T: DeserializeOwned>(&self, d: &Descriptor) -> Result<T, OciError> {
        let name = blob_name(&d.digest);
        if d.size > MAX_JSON {
            return Err(OciError::TooLarge { name, size: d.size });
        }
        let blob = self.open_blob(d)?;
        let bytes = read_bounded(blob.file, blob.size, &name)?;
        let actual = Digest::of(d.digest.algorithm(), &bytes);
        if actual != d.digest || bytes.len() as u64 != d.size {
            return Err(OciError::WrongDigest {
                expected: d.digest.clone(),
                actual,
            });
        }
        serde_json::from_slice(&bytes).map_err(|source| OciError::Json { name, source })
    }

    /// The manifest `d` names, through nested image indexes (picking `os`/`arch`, or an
    /// index's only entry) at most `MAX_INDEX_DEPTH` deep.
    pub fn manifest(
        &self,
        d: &Descriptor,
        os: &'static str,
        arch: &'static str,
    ) -> Result<Manifest, OciError> {
        let mut d = d.clone();
        for _ in 0..=MAX_INDEX_DEPTH {
            if !d.is_index() {
                return self.read_json(&d);
            }
            let nested: Index = self.read_json(&d)?;
            d = nested
                .for_platform(os, arch)
                .ok_or(OciError::NoPlatform {
                    digest: d.digest.clone(),
                    os,
                    arch,
                })?
                .clone();
        }
        Err(OciError::TooDeep { digest: d.digest })
    }
}

/// Open directory NAME in DIR, refusing a symlink (or anything else) there by name.
pub(crate) fn open_dir(dir: &impl AsFd, name: &CStr, label: &str) -> Result<OwnedFd, OciError> {
    rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(
        |e| match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if FileType::from_raw_mode(st.st_mode) != FileType::Directory => {
                OciError::NotADirectory {
                    name: label.to_string(),
                    kind: kind_name(FileType::from_raw_mode(st.st_mode)),
                }
            }
            _ => io_err(label)(e.into()),
        },
    )
}

/// Open NAME in DIR for reading if it is a regular file: its length. Looked at first without
/// following it (a device is never opened), opened with `O_NOFOLLOW | O_NONBLOCK` (a FIFO
/// swapped in meanwhile cannot hang the open), and checked again on the descriptor.
fn open_regular(dir: &impl AsFd, name: &CStr, label: &str) -> Result<(File, u64), OciError> {
    let not_regular = |mode| OciError::NotRegular {
        name: label.to_string(),
        kind: kind_name(FileType::from_raw_mode(mode)),
    };
    let st =
        rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW).map_err(|e| OciError::Io {
            name: label.to_string(),
            source: e.into(),
        })?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return Err(not_regular(st.st_mode));
    }
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| OciError::Io {
        name: label.to_string(),
        source: e.into(),
    })?;
    let st = rustix::fs::fstat(&fd).map_err(|e| OciError::Io {
        name: label.to_string(),
        source: e.into(),
    })?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return Err(not_regular(st.st_mode));
    }
    Ok((File::from(fd), st.st_size as u64))
}

/// Read a JSON document of `size` bytes (as stat said), refusing more than [`MAX_JSON`] both
/// before reading and while reading (the file may grow).
fn read_bounded(file: File, size: u64, label: &str) -> Result<Vec<u8>, OciError> {
    let too_large = |size| OciError::TooLarge {
        name: label.to_string(),
        size,
    };
    if size > MAX_JSON {
        return Err(too_large(size));
    }
    let mut bytes = Vec::with_capacity(size as usize);
    file.take(MAX_JSON + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err(label))?;
    if bytes.len() as u64 > MAX_JSON {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}
