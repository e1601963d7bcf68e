//! File content: where a file's data is, and filling a new file with another's.
//!
//! Owns holes and content sharing for every tool: the data chunks of a file found with
//! SEEK_DATA/SEEK_HOLE ([`data_chunks`]: the tar writer's GNU sparse entries, the copy below),
//! a copy that keeps holes holes ([`copy_sparse`]: copy_file_range, read/write where that is
//! refused), and a reflink first where the filesystem has them ([`Filler`]). Whether content
//! may be shared by hardlink instead is the calling tool's policy.

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

/// The data chunks (offset, length) of an open file of `size` bytes, found with
/// SEEK_DATA/SEEK_HOLE: `None` when it has no holes (or the filesystem cannot tell).
pub fn data_chunks(file: &File, size: u64) -> io::Result<Option<Vec<(u64, u64)>>> {
    use rustix::fs::SeekFrom;
    let mut chunks = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let start = match rustix::fs::seek(file, SeekFrom::Data(pos)) {
            Ok(s) => s,
            Err(rustix::io::Errno::NXIO) => break,
            Err(rustix::io::Errno::INVAL | rustix::io::Errno::OPNOTSUPP) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        if start >= size {
            break;
        }
        let end = rustix::fs::seek(file, SeekFrom::Hole(start))
            .map_err(io::Error::from)?
            .min(size);
        chunks.push((start, end - start));
        pos = end;
    }
    if chunks.len() == 1 && chunks[0] == (0, size) {
        return Ok(None);
    }
    Ok(Some(chunks))
}

/// Copy `src` into the empty `dst`, data chunks only, so holes stay holes. Returns the bytes
/// of data copied.
pub(crate) fn copy_sparse(src: &File, dst: &File) -> io::Result<u64> {
    let size = rustix::fs::fstat(src)?.st_size as u64;
    let chunks = data_chunks(src, size)?.unwrap_or_else(|| vec![(0, size)]);
    let mut copied = 0u64;
    for (off, len) in chunks {
        copy_range(src, off, dst, off, len)?;
        copied += len;
    }
    dst.set_len(size)?;
    Ok(copied)
}

/// Copy `len` bytes at `off` in `src` to `at` in `dst`: `copy_file_range` (page cache to page
/// cache, one copy where a read and a write make two), or a read and a write where the kernel
/// cannot copy between these files. A source that ends early is an `UnexpectedEof` error.
pub(crate) fn copy_range(
    src: &File,
    mut off: u64,
    dst: &File,
    mut at: u64,
    mut len: u64,
) -> io::Result<()> {
    while len > 0 {
        let want = len.min(1 << 30) as usize;
        match rustix::fs::copy_file_range(src, Some(&mut off), dst, Some(&mut at), want) {
            Ok(0) => return Err(shrank()),
            Ok(n) => len -= n as u64,
            Err(rustix::io::Errno::INTR) => {}
            Err(
                rustix::io::Errno::XDEV
                | rustix::io::Errno::INVAL
                | rustix::io::Errno::NOSYS
                | rustix::io::Errno::OPNOTSUPP
                | rustix::io::Errno::PERM,
            ) => return copy_by_reading(src, off, dst, at, len),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn copy_by_reading(
    src: &File,
    mut off: u64,
    dst: &File,
    mut at: u64,
    mut len: u64,
) -> io::Result<()> {
    let mut buf = vec![0u8; (len.min(256 << 10)) as usize];
    while len > 0 {
        let want = len.min(buf.len() as u64) as usize;
        let n = match rustix::io::pread(src, &mut buf[..want], off) {
            Ok(0) => return Err(shrank()),
            Ok(n) => n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        };
        write_at(dst, &buf[..n], at)?;
        off += n as u64;
        at += n as u64;
        len -= n as u64;
    }
    Ok(())
}

fn shrank() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the file shrank while it was copied",
    )
}

/// Write all of `data` at `at` in `file`.
pub(crate) fn write_at(file: &File, mut data: &[u8], mut at: u64) -> io::Result<()> {
    while !data.is_empty() {
        match rustix::io::pwrite(file, data, at) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                data = &data[n..];
                at += n as u64;
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// How [`Filler::fill`] gave a file its content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filled {
    Reflinked,
    /// Copied, with this many bytes of data (holes not counted).
    Copied(u64),
}

/// Fills new files with the content of others: a reflink (FICLONE) while the filesystem takes
/// them, else `copy_sparse`. The first refusal is remembered (ext4 has no reflinks: asking
/// again would cost a failed call per file).
#[derive(Debug)]
pub struct Filler {
    reflink_works: AtomicBool,
}

impl Default for Filler {
    fn default() -> Self {
        Filler {
            reflink_works: AtomicBool::new(true),
        }
    }
}

impl Filler {
    /// Fill the new, empty file `dst` with the content of `src`.
    pub fn fill(&self, src: &File, dst: &File) -> io::Result<Filled> {
        if self.reflink_works.load(Ordering::Relaxed) {
            match rustix::fs::ioctl_ficlone(dst, src) {
                Ok(()) => return Ok(Filled::Reflinked),
                // No reflinks here (ext4), or not across these two filesystems: copy from now on.
                Err(
                    rustix::io::Errno::OPNOTSUPP
                    | rustix::io::Errno::XDEV
                    | rustix::io::Errno::INVAL
                    | rustix::io::Errno::NOTTY
                    | rustix::io::Errno::PERM,
                ) => self.reflink_works.store(false, Ordering::Relaxed),
                Err(e) => return Err(e.into()),
            }
        }
        copy_sparse(src, dst).map(Filled::Copied)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    /// `dir/sparse`: 4 MiB, of which only 6 bytes at 1 MiB are data (the rest is holes where the
    /// filesystem has them).
    pub(crate) fn sparse_file(dir: &Path) -> PathBuf {
        use std::io::{Seek, SeekFrom, Write};
        let p = dir.join("sparse");
        let mut f = File::create(&p).unwrap();
        f.seek(SeekFrom::Start(1 << 20)).unwrap();
        f.write_all(b"middle").unwrap();
        f.set_len(4 << 20).unwrap();
        p
    }

    #[test]
    fn a_copy_keeps_data_and_holes() {
        let t = tempfile::tempdir().unwrap();
        let p = sparse_file(t.path());
        let src = File::open(&p).unwrap();
        let dst = File::create(t.path().join("copy")).unwrap();
        let n = copy_sparse(&src, &dst).unwrap();
        drop(dst);
        assert_eq!(
            std::fs::read(t.path().join("copy")).unwrap(),
            std::fs::read(&p).unwrap()
        );
        if data_chunks(&src, 4 << 20).unwrap().is_some() {
            assert!(n < 1 << 20, "{n} bytes copied: the holes were written");
        }
    }
}
