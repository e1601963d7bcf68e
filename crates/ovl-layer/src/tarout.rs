//! Writing layer tar streams: a deterministic PAX writer.
//!
//! Owns the byte format of every layer ovl writes, so the same input always gives the same
//! bytes: ustar headers with PAX extended headers where ustar falls short (a `path` or
//! `linkpath` longer than 100 bytes or not UTF-8, ns mtimes, sizes and ids too large for octal,
//! `SCHILY.xattr.<name bytes>` for xattrs), empty uname/gname, no atime/ctime, PAX header
//! names that do not depend on a pid, sparse files as GNU PAX sparse 1.0 (what GNU tar,
//! bsdtar, Go's archive/tar and our extractor read), and mtimes clamped to
//! `SOURCE_DATE_EPOCH` when asked.
//! The sha256 of everything written is the layer's diffID.
//!
//! The order of entries is the caller's (see [`crate::upper`]); this module writes one entry
//! at a time.

use std::io::{self, Read, Write};

use crate::xattrs::Xattr;
use sha2::Digest;

/// What an entry is, with what its header needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TarKind<'a> {
    Dir,
    /// A regular file of `size` bytes; its data is passed to [`TarWriter::append`].
    File {
        size: u64,
    },
    Hardlink {
        target: &'a [u8],
    },
    Symlink {
        target: &'a [u8],
    },
    Char {
        major: u32,
        minor: u32,
    },
    Block {
        major: u32,
        minor: u32,
    },
    Fifo,
}

/// One entry's header.
#[derive(Debug, Clone)]
pub struct TarEntry<'a> {
    /// The layer path, without a leading `./` or trailing `/` (added for directories).
    pub name: &'a [u8],
    pub kind: TarKind<'a>,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: (i64, u32),
    pub xattrs: &'a [Xattr],
}

/// A regular file's data: read in order, or (sparse) the data chunks of a file with holes.
pub enum Data<'a> {
    None,
    Stream(&'a mut dyn Read),
    /// A regular file opened for this entry, read from its start by offset, wherever the
    /// descriptor's own offset is (copied without passing through this process when the
    /// writer has a [`TarWriter::copy_files_into`] descriptor).
    File(&'a std::fs::File),
    /// `(offset, length)` data chunks in order, and a reader positioned anywhere: each chunk is
    /// read with `read_at`.
    Sparse {
        chunks: Vec<(u64, u64)>,
        file: &'a std::fs::File,
    },
}

#[derive(Debug, Clone, Copy, Default)]
pub struct TarOptions {
    /// `SOURCE_DATE_EPOCH`: no mtime in the layer is later than this.
    pub clamp_mtime: Option<i64>,
    /// Do not compute the diffID (nobody will read it): [`TarSummary::diff_id`] is all zeros.
    pub skip_digest: bool,
}

impl TarOptions {
    /// Options from the environment (`SOURCE_DATE_EPOCH`).
    pub fn from_env() -> Result<Self, String> {
        match std::env::var("SOURCE_DATE_EPOCH") {
            Ok(v) if !v.trim().is_empty() => v
                .trim()
                .parse::<i64>()
                .map(|t| TarOptions {
                    clamp_mtime: Some(t),
                    skip_digest: false,
                })
                .map_err(|_| format!("SOURCE_DATE_EPOCH={v:?} is not a number of seconds")),
            _ => Ok(TarOptions::default()),
        }
    }
}

/// A tar stream being written; the diffID is computed on the way.
pub struct TarWriter<W: Write> {
    out: W,
    hasher: HashThread,
    written: u64,
    opts: TarOptions,
    buf: Vec<u8>,
    pending: Vec<u8>,
    /// Buffers already written, to reuse once the hashing thread is done with them: fresh
    /// memory for every megabyte costs a page fault per page.
    spent: std::collections::VecDeque<std::sync::Arc<Vec<u8>>>,
    /// The output file itself, where [`Data::File`] content of [`DIRECT_MIN`] bytes and more
    /// is copied with `copy_file_range` (see [`TarWriter::copy_files_into`]).
    direct: Option<std::fs::File>,
}

const BLOCK: usize = 512;
/// How much file data is read at once.
const READ_BUF: usize = 1 << 20;
/// Bytes buffered before a write to the output.
const FLUSH_AT: usize = 1 << 20;
/// The smallest file copied straight into the output: a smaller one costs more in the extra
/// write of what is buffered before it than the copy it saves.
const DIRECT_MIN: u64 = 64 << 10;

/// What a finished stream was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TarSummary {
    /// sha256 of the uncompressed stream (zeros with [`TarOptions::skip_digest`]).
    pub diff_id: [u8; 32],
    pub size: u64,
}

impl<W: Write> TarWriter<W> {
    pub fn new(out: W, opts: TarOptions) -> Self {
        TarWriter {
            out,
            hasher: HashThread::spawn(!opts.skip_digest),
            written: 0,
            opts,
            buf: vec![0; READ_BUF],
            pending: Vec::with_capacity(FLUSH_AT + READ_BUF),
            spent: std::collections::VecDeque::new(),
            direct: None,
        }
    }

    /// Copy the content of big [`Data::File`] entries from file to file (`copy_file_range`,
    /// one copy in the kernel instead of a read and a write) into `out`, which must be the
    /// very file this writer writes to (a descriptor of the same open file, so both share its
    /// offset). Only done without a digest (the copied bytes never pass through here) and
    /// when `out` is a regular file that was not opened for appending; otherwise this does
    /// nothing. Returns whether it is on.
    pub fn copy_files_into(&mut self, out: std::fs::File) -> bool {
        let usable = !self.hasher.enabled()
            && out.metadata().is_ok_and(|m| m.file_type().is_file())
            && rustix::fs::fcntl_getfl(&out)
                .is_ok_and(|fl| !fl.contains(rustix::fs::OFlags::APPEND));
        if usable {
            self.direct = Some(out);
        }
        usable
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.pending.extend_from_slice(b);
        if self.pending.len() >= FLUSH_AT {
            self.flush_pending()?;
        }
        Ok(())
    }

    fn flush_pending(&mut self) -> io::Result<()> {
        if !self.pending.is_empty() {
            let next = self.spare_buffer();
            let buf = std::sync::Arc::new(std::mem::replace(&mut self.pending, next));
            self.hasher.send(std::sync::Arc::clone(&buf));
            self.out.write_all(&buf)?;
            self.written += buf.len() as u64;
            self.spent.push_back(buf);
        }
        Ok(())
    }

    /// An empty buffer: the oldest written one if the hasher is done with it, else a new one.
    fn spare_buffer(&mut self) -> Vec<u8> {
        if let Some(oldest) = self.spent.pop_front() {
            match std::sync::Arc::try_unwrap(oldest) {
                Ok(mut v) => {
                    v.clear();
                    return v;
                }
                Err(still_hashing) => {
                    if self.spent.len() < 16 {
                        self.spent.push_front(still_hashing);
                    }
                }
            }
        }
        Vec::with_capacity(FLUSH_AT + READ_BUF)
    }

    fn pad(&mut self, len: u64) -> io::Result<()> {
        let rem = (len % BLOCK as u64) as usize;
        if rem != 0 {
            self.put(&[0u8; BLOCK][..BLOCK - rem])?;
        }
        Ok(())
    }

    fn clamp(&self, t: (i64, u32)) -> (i64, u32) {
        match self.opts.clamp_mtime {
            Some(c) if t > (c, 0) => (c, 0),
            _ => t,
        }
    }

    /// Write one entry (for a file, with its data).
    pub fn append(&mut self, e: &TarEntry<'_>, data: Data<'_>) -> io::Result<()> {
        let mut pax = Vec::new();
        let mut name = e.name.to_vec();
        if e.kind == TarKind::Dir {
            name.push(b'/');
        }
        let (sec, nsec) = self.clamp(e.mtime);
        let size = match (&e.kind, &data) {
            (TarKind::File { size }, _) => *size,
            _ => 0,
        };
        let sparse = match &data {
            Data::Sparse { chunks, .. } => Some(chunks.clone()),
            _ => None,
        };
        let mut header_name = name.clone();
        if sparse.is_some() {
            // GNU PAX sparse 1.0: the real name and size in PAX records, a placeholder name in
            // the header, the map at the start of the data.
            pax_record(&mut pax, b"GNU.sparse.major", b"1");
            pax_record(&mut pax, b"GNU.sparse.minor", b"0");
            pax_record(&mut pax, b"GNU.sparse.name", &name);
            pax_record(
                &mut pax,
                b"GNU.sparse.realsize",
                size.to_string().as_bytes(),
            );
            header_name = sparse_placeholder(&name);
        } else if needs_pax_string(&name, 100) {
            if std::str::from_utf8(&name).is_err() {
                pax_record(&mut pax, b"hdrcharset", b"BINARY");
            }
            pax_record(&mut pax, b"path", &name);
        }
        let link = match &e.kind {
            TarKind::Hardlink { target } | TarKind::Symlink { target } => Some(*target),
            _ => None,
        };
        if let Some(t) = link {
            if needs_pax_string(t, 100) {
                if std::str::from_utf8(t).is_err() && !pax_has(&pax, b"hdrcharset") {
                    pax_record(&mut pax, b"hdrcharset", b"BINARY");
                }
                pax_record(&mut pax, b"linkpath", t);
            }
        }
        if nsec != 0 || !(0..=OCTAL_11).contains(&sec) {
            pax_record(&mut pax, b"mtime", format_time(sec, nsec).as_bytes());
        }
        let map = sparse.as_ref().map(|c| sparse_map(c, size));
        let stored = match (&sparse, &map) {
            (Some(chunks), Some(m)) => m.len() as u64 + chunks.iter().map(|c| c.1).sum::<u64>(),
            _ => size,
        };
        if stored > OCTAL_11 as u64 {
            pax_record(&mut pax, b"size", stored.to_string().as_bytes());
        }
        if u64::from(e.uid) > OCTAL_7 {
            pax_record(&mut pax, b"uid", e.uid.to_string().as_bytes());
        }
        if u64::from(e.gid) > OCTAL_7 {
            pax_record(&mut pax, b"gid", e.gid.to_string().as_bytes());
        }
        // The name as its bytes, whether UTF-8 or not, and no `hdrcharset` for it: what GNU tar
        // writes (POSIX's hdrcharset speaks of path, linkpath, uname and gname only).
        for (k, v) in e.xattrs {
            let key = [b"SCHILY.xattr.", k.as_slice()].concat();
            pax_record(&mut pax, &key, v);
        }

        if !pax.is_empty() {
            let mut h = Header::new();
            h.name(&pax_header_name(&name));
            h.octal(100, 8, 0o644);
            h.octal(108, 8, 0);
            h.octal(116, 8, 0);
            h.octal(124, 12, pax.len() as u64);
            h.octal(136, 12, 0);
            h.0[156] = b'x';
            let block = h.finish();
            self.put(&block)?;
            self.put(&pax)?;
            self.pad(pax.len() as u64)?;
        }

        let mut h = Header::new();
        h.name(&header_name);
        h.octal(100, 8, u64::from(e.mode & 0o7777));
        h.octal(
            108,
            8,
            if u64::from(e.uid) > OCTAL_7 {
                0
            } else {
                e.uid.into()
            },
        );
        h.octal(
            116,
            8,
            if u64::from(e.gid) > OCTAL_7 {
                0
            } else {
                e.gid.into()
            },
        );
        h.octal(124, 12, if stored > OCTAL_11 as u64 { 0 } else { stored });
        h.octal(
            136,
            12,
            if (0..=OCTAL_11).contains(&sec) {
                sec as u64
            } else {
                0
            },
        );
        h.0[156] = match e.kind {
            TarKind::Dir => b'5',
            TarKind::File { .. } => b'0',
            TarKind::Hardlink { .. } => b'1',
            TarKind::Symlink { .. } => b'2',
            TarKind::Char { .. } => b'3',
            TarKind::Block { .. } => b'4',
            TarKind::Fifo => b'6',
        };
        if let Some(t) = link {
            let n = t.len().min(100);
            h.0[157..157 + n].copy_from_slice(&t[..n]);
        }
        if let TarKind::Char { major, minor } | TarKind::Block { major, minor } = e.kind {
            if u64::from(major) > OCTAL_7 || u64::from(minor) > OCTAL_7 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "device number too large for a tar header",
                ));
            }
            h.octal(329, 8, major.into());
            h.octal(337, 8, minor.into());
        }
        let block = h.finish();
        self.put(&block)?;

        match data {
            Data::None => {
                if size != 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "a file entry with a size needs its data",
                    ));
                }
            }
            Data::Stream(r) => {
                self.copy_exact(r, size)?;
                self.pad(size)?;
            }
            Data::File(f) if size >= DIRECT_MIN && self.direct.is_some() => {
                self.copy_direct(f, size)?;
                self.pad(size)?;
            }
            Data::File(file) => {
                // By offset, from 0: the descriptor's own offset may be anywhere (looking for
                // holes with SEEK_DATA/SEEK_HOLE leaves it at the end of a file without any).
                self.copy_exact(&mut ReadAt { file, at: 0 }, size)?;
                self.pad(size)?;
            }
            Data::Sparse { chunks, file } => {
                let map = map.expect("sparse map");
                self.put(&map)?;
                for (off, len) in chunks {
                    self.copy_range(file, off, len)?;
                }
                self.pad(stored)?;
            }
        }
        Ok(())
    }

    /// Copy exactly `size` bytes from `r`: a file that shrank or grew meanwhile is an error,
    /// never a corrupt stream.
    fn copy_exact(&mut self, r: &mut dyn Read, size: u64) -> io::Result<()> {
        let mut left = size;
        while left > 0 {
            // Read straight into the pending output (no copy through a buffer).
            let want = (READ_BUF as u64).min(left);
            let before = self.pending.len();
            self.pending.reserve(want as usize);
            let n = match r.take(want).read_to_end(&mut self.pending) {
                Ok(_) => self.pending.len() - before,
                Err(e) => {
                    self.pending.truncate(before);
                    return Err(e);
                }
            };
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the file shrank while it was read ({left} bytes missing)"),
                ));
            }
            left -= n as u64;
            if self.pending.len() >= FLUSH_AT {
                self.flush_pending()?;
            }
        }
        let mut probe = [0u8; 1];
        if r.read(&mut probe)? != 0 {
            return Err(io::Error::other("the file grew while it was read"));
        }
        Ok(())
    }

    /// [`Self::copy_exact`] of a whole file, from file to file: what is buffered goes out
    /// first, then the file is copied at the output's offset, which is moved past it.
    fn copy_direct(&mut self, f: &std::fs::File, size: u64) -> io::Result<()> {
        use std::io::{Seek, SeekFrom};
        use std::os::unix::fs::FileExt;
        self.flush_pending()?;
        let mut out = self.direct.as_ref().expect("checked by the caller");
        let at = out.stream_position()?;
        crate::copy::copy_range(f, 0, out, at, size).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                io::Error::new(e.kind(), "the file shrank while it was read")
            } else {
                e
            }
        })?;
        out.seek(SeekFrom::Start(at + size))?;
        self.written += size;
        if f.read_at(&mut [0u8; 1], size)? != 0 {
            return Err(io::Error::other("the file grew while it was read"));
        }
        Ok(())
    }

    fn copy_range(&mut self, file: &std::fs::File, mut off: u64, len: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let mut left = len;
        let mut buf = std::mem::take(&mut self.buf);
        let res = (|| {
            while left > 0 {
                let want = (buf.len() as u64).min(left) as usize;
                let n = file.read_at(&mut buf[..want], off)?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the file shrank while it was read",
                    ));
                }
                self.put(&buf[..n])?;
                off += n as u64;
                left -= n as u64;
            }
            Ok(())
        })();
        self.buf = buf;
        res
    }

    /// The end-of-archive blocks; returns the output, the diffID and the size.
    pub fn finish(mut self) -> io::Result<(W, TarSummary)> {
        self.put(&[0u8; 2 * BLOCK])?;
        self.flush_pending()?;
        self.out.flush()?;
        Ok((
            self.out,
            TarSummary {
                diff_id: self.hasher.finish(),
                size: self.written,
            },
        ))
    }
}

/// A file read with `pread` from an offset of its own: the descriptor's offset is neither
/// used nor moved.
struct ReadAt<'a> {
    file: &'a std::fs::File,
    at: u64,
}

impl Read for ReadAt<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = std::os::unix::fs::FileExt::read_at(self.file, buf, self.at)?;
        self.at += n as u64;
        Ok(n)
    }
}

/// sha256 on its own thread, so hashing overlaps with reading files and writing the stream
/// (the uncompressed layer is otherwise bound by one core doing all three).
struct HashThread {
    tx: Option<std::sync::mpsc::SyncSender<std::sync::Arc<Vec<u8>>>>,
    handle: Option<std::thread::JoinHandle<[u8; 32]>>,
}

impl HashThread {
    fn spawn(enabled: bool) -> Self {
        if !enabled {
            return HashThread {
                tx: None,
                handle: None,
            };
        }
        let (tx, rx) = std::sync::mpsc::sync_channel::<std::sync::Arc<Vec<u8>>>(8);
        let handle = std::thread::Builder::new()
            .name("ovl-sha256".into())
            .spawn(move || {
                let mut h = sha2::Sha256::new();
                for buf in rx {
                    h.update(&buf[..]);
                }
                h.finalize().into()
            })
            .expect("spawn the hashing thread");
        HashThread {
            tx: Some(tx),
            handle: Some(handle),
        }
    }

    fn send(&mut self, buf: std::sync::Arc<Vec<u8>>) {
        if let Some(tx) = &self.tx {
            // The thread only ends when we drop the sender: a send cannot fail.
            let _ = tx.send(buf);
        }
    }

    fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    fn finish(&mut self) -> [u8; 32] {
        drop(self.tx.take());
        match self.handle.take() {
            Some(h) => h.join().expect("the hashing thread panicked"),
            None => [0; 32],
        }
    }
}

impl Drop for HashThread {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The GNU sparse 1.0 map: the count, then offset and length per chunk, one decimal number a
/// line, padded to a block. A file that ends in a hole gets a last empty chunk at its size, as
/// GNU tar writes it.
fn sparse_map(chunks: &[(u64, u64)], size: u64) -> Vec<u8> {
    let mut all = chunks.to_vec();
    if all.last().is_none_or(|&(o, l)| o + l < size) {
        all.push((size, 0));
    }
    let mut m = format!("{}\n", all.len());
    for (o, l) in &all {
        m.push_str(&format!("{o}\n{l}\n"));
    }
    let mut m = m.into_bytes();
    let rem = m.len() % BLOCK;
    if rem != 0 {
        m.resize(m.len() + BLOCK - rem, 0);
    }
    m
}

const OCTAL_11: i64 = 0o77777777777;
const OCTAL_7: u64 = 0o7777777;

/// True when a name cannot go into a ustar field of `field` bytes as is.
fn needs_pax_string(s: &[u8], field: usize) -> bool {
    s.len() > field || std::str::from_utf8(s).is_err() || s.contains(&0)
}

fn pax_has(pax: &[u8], key: &[u8]) -> bool {
    let needle = [b" ", key, b"="].concat();
    pax.windows(needle.len()).any(|w| w == needle.as_slice())
}

/// A PAX record: `LEN KEY=VALUE\n`, LEN counting itself.
fn pax_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    let body = key.len() + value.len() + 3;
    let mut len = body + body.to_string().len();
    if len.to_string().len() != body.to_string().len() {
        len = body + len.to_string().len();
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

/// `SEC[.FRAC]` with trailing zeros of the fraction dropped; negative times as PAX writes them.
fn format_time(sec: i64, nsec: u32) -> String {
    let (neg, s, n) = if sec < 0 && nsec > 0 {
        (true, -(sec + 1), 1_000_000_000 - nsec)
    } else if sec < 0 {
        (true, -sec, 0)
    } else {
        (false, sec, nsec)
    };
    let mut out = format!("{}{s}", if neg { "-" } else { "" });
    if n != 0 {
        let frac = format!("{n:09}");
        out.push('.');
        out.push_str(frac.trim_end_matches('0'));
    }
    out
}

/// The name of a PAX header block: fixed (no pid), ASCII, within 100 bytes.
fn pax_header_name(name: &[u8]) -> Vec<u8> {
    let base = name
        .strip_suffix(b"/")
        .unwrap_or(name)
        .rsplit(|&b| b == b'/')
        .next()
        .unwrap_or(b"");
    let clean: Vec<u8> = base
        .iter()
        .take(80)
        .map(|&b| {
            if b.is_ascii_graphic() && b != b'/' {
                b
            } else {
                b'_'
            }
        })
        .collect();
    [b"PaxHeaders.0/".as_slice(), &clean].concat()
}

/// The header name of a sparse file: `DIR/GNUSparseFile.0/BASE`, as GNU tar (with its pid
/// fixed to 0), cut to fit.
fn sparse_placeholder(name: &[u8]) -> Vec<u8> {
    let (dir, base) = match name.iter().rposition(|&b| b == b'/') {
        Some(i) => (&name[..=i], &name[i + 1..]),
        None => (&b""[..], name),
    };
    let mut out = [dir, b"GNUSparseFile.0/", base].concat();
    out.truncate(100);
    out
}

struct Header([u8; BLOCK]);

impl Header {
    fn new() -> Self {
        let mut h = Header([0; BLOCK]);
        h.0[257..263].copy_from_slice(b"ustar\0");
        h.0[263..265].copy_from_slice(b"00");
        h
    }

    fn name(&mut self, n: &[u8]) {
        let k = n.len().min(100);
        self.0[..k].copy_from_slice(&n[..k]);
    }

    /// `v` as `len - 1` zero-padded octal digits and a NUL (the callers check that it fits;
    /// written digit by digit: a `format!` per field was 3% of a whole export).
    fn octal(&mut self, at: usize, len: usize, mut v: u64) {
        for b in self.0[at..at + len - 1].iter_mut().rev() {
            *b = b'0' + (v & 7) as u8;
            v >>= 3;
        }
        self.0[at + len - 1] = 0;
    }

    fn finish(mut self) -> [u8; BLOCK] {
        self.0[148..156].fill(b' ');
        let sum: u32 = self.0.iter().map(|&b| u32::from(b)).sum();
        // Six digits, a NUL and a space, as GNU tar writes it.
        self.octal(148, 7, sum.into());
        self.0[155] = b' ';
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn entry<'a>(name: &'a [u8], kind: TarKind<'a>) -> TarEntry<'a> {
        TarEntry {
            name,
            kind,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: (1_700_000_000, 0),
            xattrs: &[],
        }
    }

    #[test]
    fn pax_records_count_themselves() {
        let mut v = Vec::new();
        pax_record(&mut v, b"path", b"a");
        assert_eq!(v, b"9 path=a\n");
        let mut v = Vec::new();
        // A 99-byte body plus a 2-digit length is 101 bytes: the length needs 3 digits.
        pax_record(&mut v, b"k", &[b'x'; 95]);
        assert!(v.starts_with(b"102 k="), "{:?}", &v[..8]);
        assert_eq!(v.len(), 102);
        assert_eq!(format_time(5, 500_000_000), "5.5");
        assert_eq!(format_time(-2, 750_000_000), "-1.25");
        assert_eq!(format_time(7, 0), "7");
    }

    /// A file that shrank while it was read: an error, not a short entry.
    #[test]
    fn a_file_that_shrank_is_an_error() {
        let mut w = TarWriter::new(Vec::new(), TarOptions::default());
        let err = w
            .append(
                &entry(b"short", TarKind::File { size: 10 }),
                Data::Stream(&mut &b"abc"[..]),
            )
            .unwrap_err();
        assert!(err.to_string().contains("shrank"), "{err}");
    }

    /// Xattr names are written as their bytes, UTF-8 or not.
    #[test]
    fn xattr_names_are_bytes_in_their_records() {
        // What GNU tar 1.34 writes for these (`tar --xattrs --xattrs-include='*'`): the name's
        // bytes as they are and no `hdrcharset`, which POSIX defines for path, linkpath, uname
        // and gname only.
        let xattrs = vec![
            (b"user.ok".to_vec(), b"2".to_vec()),
            (b"user.\xff\xfe".to_vec(), b"1".to_vec()),
        ];
        let mut e = entry(b"f", TarKind::File { size: 0 });
        e.xattrs = &xattrs;
        let mut w = TarWriter::new(Vec::new(), TarOptions::default());
        w.append(&e, Data::None).unwrap();
        let (bytes, _) = w.finish().unwrap();
        let want = b"26 SCHILY.xattr.user.ok=2\n26 SCHILY.xattr.user.\xff\xfe=1\n";
        assert_eq!(&bytes[512..512 + want.len()], want);
        assert_eq!(bytes[512 + want.len()], 0, "no other record");
        let mut ar = tar::Archive::new(&bytes[..]);
        let mut ent = ar.entries().unwrap().next().unwrap().unwrap();
        let read: Vec<(Vec<u8>, Vec<u8>)> = ent
            .pax_extensions()
            .unwrap()
            .unwrap()
            .map(|p| {
                let p = p.unwrap();
                (p.key_bytes().to_vec(), p.value_bytes().to_vec())
            })
            .collect();
        assert_eq!(
            read,
            [
                (b"SCHILY.xattr.user.ok".to_vec(), b"2".to_vec()),
                (b"SCHILY.xattr.user.\xff\xfe".to_vec(), b"1".to_vec()),
            ]
        );
    }

    /// Every kind of entry, read back by tar-rs (which our extractor uses) and by GNU tar.
    #[test]
    fn round_trips_through_tar_readers() {
        let long = vec![b'n'; 150];
        let nonutf8 = b"dir/caf\xe9".to_vec();
        let xattrs = vec![(b"user.k".to_vec(), b"\x00\xffbin".to_vec())];
        let mut e = entry(&long, TarKind::File { size: 3 });
        e.mtime = (1_700_000_000, 123_456_789);
        e.xattrs = &xattrs;
        e.mode = 0o4755;
        e.uid = 3_000_000;
        let mut w = TarWriter::new(Vec::new(), TarOptions::default());
        w.append(&entry(b"dir", TarKind::Dir), Data::None).unwrap();
        w.append(&e, Data::Stream(&mut &b"abc"[..])).unwrap();
        w.append(&entry(&nonutf8, TarKind::File { size: 0 }), Data::None)
            .unwrap();
        w.append(
            &entry(b"dir/l", TarKind::Hardlink { target: &long }),
            Data::None,
        )
        .unwrap();
        w.append(
            &entry(b"dir/s", TarKind::Symlink { target: b"../x" }),
            Data::None,
        )
        .unwrap();
        w.append(
            &entry(b"dir/c", TarKind::Char { major: 1, minor: 3 }),
            Data::None,
        )
        .unwrap();
        w.append(&entry(b"dir/p", TarKind::Fifo), Data::None)
            .unwrap();
        let (bytes, sum) = w.finish().unwrap();
        assert_eq!(sum.size, bytes.len() as u64);
        assert_eq!(sum.diff_id, <[u8; 32]>::from(sha2::Sha256::digest(&bytes)));

        let mut ar = tar::Archive::new(&bytes[..]);
        let mut seen = Vec::new();
        for ent in ar.entries().unwrap() {
            let mut ent = ent.unwrap();
            let path = ent.path_bytes().into_owned();
            let kind = ent.header().entry_type();
            let link = ent.link_name_bytes().map(|l| l.into_owned());
            if path == long {
                assert_eq!(kind, tar::EntryType::Regular);
                assert_eq!(ent.header().mode().unwrap(), 0o4755);
                let mut s = String::new();
                let mut mtime = None;
                let mut uid = None;
                let mut x = None;
                for p in ent.pax_extensions().unwrap().unwrap() {
                    let p = p.unwrap();
                    match p.key().unwrap() {
                        "mtime" => mtime = Some(p.value().unwrap().to_string()),
                        "uid" => uid = Some(p.value().unwrap().to_string()),
                        "SCHILY.xattr.user.k" => x = Some(p.value_bytes().to_vec()),
                        _ => {}
                    }
                }
                assert_eq!(mtime.as_deref(), Some("1700000000.123456789"));
                assert_eq!(uid.as_deref(), Some("3000000"));
                assert_eq!(x.as_deref(), Some(&b"\x00\xffbin"[..]));
                ent.read_to_string(&mut s).unwrap();
                assert_eq!(s, "abc");
            }
            match &path[..] {
                b"dir/l" => {
                    assert_eq!(kind, tar::EntryType::Link);
                    assert_eq!(link.as_deref(), Some(&long[..]));
                }
                b"dir/s" => {
                    assert_eq!(kind, tar::EntryType::Symlink);
                    assert_eq!(link.as_deref(), Some(&b"../x"[..]));
                }
                b"dir/c" => {
                    assert_eq!(kind, tar::EntryType::Char);
                    let h = ent.header();
                    assert_eq!(
                        (h.device_major().unwrap(), h.device_minor().unwrap()),
                        (Some(1), Some(3))
                    );
                }
                b"dir/p" => assert_eq!(kind, tar::EntryType::Fifo),
                _ => {}
            }
            seen.push(path);
        }
        let names: [&[u8]; 7] = [
            b"dir/", &long, &nonutf8, b"dir/l", b"dir/s", b"dir/c", b"dir/p",
        ];
        assert_eq!(seen, names.map(<[u8]>::to_vec));

        let tar = crate::userns::which("tar");
        if !ovl_tests::require("GNU tar", tar.is_some()) {
            return;
        }
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("l.tar"), &bytes).unwrap();
        let out = std::process::Command::new(tar.unwrap())
            .args(["-tvf", "l.tar"])
            .current_dir(t.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = text.lines().collect();
        let n150 = "n".repeat(150);
        // `tar -tv`: type and mode, owner, size (or major,minor), date, time, name.
        let want: [(&str, &str, &str); 7] = [
            ("drw-r--r--", "", "dir/"),
            ("-rwsr-xr-x", "3000000/", &n150),
            ("-rw-r--r--", "", "dir/caf\\351"),
            ("hrw-r--r--", "", &format!("dir/l link to {n150}")),
            ("lrw-r--r--", "", "dir/s -> ../x"),
            ("crw-r--r--", "1,3", "dir/c"),
            ("prw-r--r--", "", "dir/p"),
        ];
        assert_eq!(lines.len(), want.len(), "{text}");
        for (line, (mode, field, name)) in lines.iter().zip(want) {
            assert!(
                line.starts_with(mode) && line.contains(field) && line.ends_with(name),
                "GNU tar lists {line:?}, expected {mode} .. {field} .. {name}\n{text}"
            );
        }
    }

    #[test]
    fn sparse_files_round_trip_through_the_extractor() {
        let t = tempfile::tempdir().unwrap();
        let p = crate::copy::tests::sparse_file(t.path());
        let f = std::fs::File::open(&p).unwrap();
        let size = 4 << 20;
        let chunks = crate::copy::data_chunks(&f, size).unwrap();
        if !ovl_tests::require("a filesystem that reports holes", chunks.is_some()) {
            return;
        }
        let chunks = chunks.unwrap();
        assert_eq!(chunks.len(), 1);
        let mut w = TarWriter::new(Vec::new(), TarOptions::default());
        w.append(
            &entry(b"sparse", TarKind::File { size }),
            Data::Sparse { chunks, file: &f },
        )
        .unwrap();
        let (bytes, _) = w.finish().unwrap();
        assert!(bytes.len() < 64 * 1024, "{} bytes", bytes.len());
        let dest = t.path().join("out");
        std::fs::create_dir(&dest).unwrap();
        let root = crate::root::Root::open(&dest).unwrap();
        crate::extract::extract(
            &bytes[..],
            &root,
            crate::extract::ExtractOptions {
                opaque_ns: crate::whiteout::XattrNs::User,
                owners: crate::extract::OwnerPolicy::Record,
                shift: None,
                writers: 1,
            },
        )
        .unwrap();
        assert_eq!(
            std::fs::read(dest.join("sparse")).unwrap(),
            std::fs::read(&p).unwrap()
        );
    }

    #[test]
    fn mtimes_clamp_to_source_date_epoch() {
        let mut w = TarWriter::new(
            Vec::new(),
            TarOptions {
                clamp_mtime: Some(1000),
                ..Default::default()
            },
        );
        let mut e = entry(b"f", TarKind::File { size: 0 });
        e.mtime = (5000, 7);
        w.append(&e, Data::None).unwrap();
        let (bytes, _) = w.finish().unwrap();
        let mut ar = tar::Archive::new(&bytes[..]);
        let ent = ar.entries().unwrap().next().unwrap().unwrap();
        assert_eq!(ent.header().mtime().unwrap(), 1000);
        assert_eq!(
            bytes[0], b'f',
            "no PAX header for a clamped whole-second mtime"
        );
    }

    /// Files of several sizes around [`DIRECT_MIN`] and a file in a stream, written through
    /// a descriptor of the output (at an offset: the output already holds something) and
    /// through memory: the same bytes.
    #[test]
    fn files_copied_into_the_output_give_the_bytes_of_reading_them() {
        use std::io::{Seek, Write};
        let t = tempfile::tempdir().unwrap();
        let sizes = [
            0,
            1,
            511,
            DIRECT_MIN - 1,
            DIRECT_MIN,
            DIRECT_MIN + 513,
            3 << 20,
        ];
        let files: Vec<std::path::PathBuf> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let p = t.path().join(format!("f{i}"));
                let data: Vec<u8> = (0..n).map(|j| (j * 7 + i as u64) as u8).collect();
                std::fs::write(&p, data).unwrap();
                p
            })
            .collect();
        let write_all = |tw: &mut TarWriter<&mut dyn Write>| {
            for (i, p) in files.iter().enumerate() {
                let f = std::fs::File::open(p).unwrap();
                let name = format!("f{i}");
                let e = entry(name.as_bytes(), TarKind::File { size: sizes[i] });
                tw.append(&e, Data::File(&f)).unwrap();
                tw.append(&entry(b"d", TarKind::Dir), Data::None).unwrap();
            }
        };
        let opts = TarOptions {
            skip_digest: true,
            ..TarOptions::default()
        };
        let mut mem = Vec::new();
        let mut w = TarWriter::new(&mut mem as &mut dyn Write, opts);
        write_all(&mut w);
        let (_, sum_mem) = w.finish().unwrap();

        let mut out = std::fs::File::create(t.path().join("out.tar")).unwrap();
        out.write_all(b"before").unwrap();
        // A duplicate of the writer's descriptor: it shares the offset.
        let dup = out.try_clone().unwrap();
        let mut w = TarWriter::new(&mut out as &mut dyn Write, opts);
        assert!(w.copy_files_into(dup));
        write_all(&mut w);
        let (_, sum_file) = w.finish().unwrap();
        assert_eq!(sum_file, sum_mem);
        assert_eq!(out.stream_position().unwrap(), 6 + mem.len() as u64);
        let on_disk = std::fs::read(t.path().join("out.tar")).unwrap();
        assert_eq!(&on_disk[..6], b"before");
        assert!(on_disk[6..] == mem[..], "the copied layer differs");
    }

    /// A [`Data::File`] is read from its start wherever its descriptor's offset is: ovl-diff
    /// looks for the holes of a file with fewer blocks than its size (SEEK_DATA/SEEK_HOLE),
    /// which leaves the offset at the end of a file that has none, as a filesystem without
    /// SEEK_HOLE (FUSE, NFSv3) says of every file. Read from there, the layer lost the file
    /// ("the file shrank") unless it was copied into the output; either way it is the file.
    #[test]
    fn a_file_is_read_from_its_start_wherever_its_offset_is() {
        use std::io::Write;
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        let opts = TarOptions {
            skip_digest: true,
            ..TarOptions::default()
        };
        for size in [100u64, DIRECT_MIN + 7] {
            let data: Vec<u8> = (0..size).map(|i| (i * 13 % 251) as u8).collect();
            std::fs::write(&src, &data).unwrap();
            let mut want = TarWriter::new(Vec::new(), opts);
            want.append(
                &entry(b"f", TarKind::File { size }),
                Data::Stream(&mut &data[..]),
            )
            .unwrap();
            let (want, _) = want.finish().unwrap();
            for direct in [false, true] {
                let f = std::fs::File::open(&src).unwrap();
                // What emit does for a file whose blocks say it may have holes.
                assert_eq!(crate::copy::data_chunks(&f, size).unwrap(), None);
                let out_path = t.path().join("out");
                let mut out = std::fs::File::create(&out_path).unwrap();
                let dup = out.try_clone().unwrap();
                let mut w = TarWriter::new(&mut out as &mut dyn Write, opts);
                assert!(w.copy_files_into(dup));
                if !direct {
                    w.direct = None;
                }
                w.append(&entry(b"f", TarKind::File { size }), Data::File(&f))
                    .unwrap_or_else(|e| panic!("{size} bytes, direct {direct}: {e}"));
                w.finish().unwrap();
                drop(out);
                assert!(
                    std::fs::read(&out_path).unwrap() == want,
                    "{size} bytes, direct {direct}: not the file's bytes"
                );
            }
        }
    }

    /// The copy is refused where its bytes would be missed (a digest) or misplaced (an
    /// output opened for appending, which copy_file_range does not write to).
    #[test]
    fn files_are_not_copied_where_a_digest_or_an_append_needs_the_bytes() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("out");
        let out = std::fs::File::create(&p).unwrap();
        let mut w = TarWriter::new(Vec::new(), TarOptions::default());
        assert!(!w.copy_files_into(out.try_clone().unwrap()), "digest on");
        let no_digest = TarOptions {
            skip_digest: true,
            ..TarOptions::default()
        };
        let appending = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        let mut w = TarWriter::new(Vec::new(), no_digest);
        assert!(!w.copy_files_into(appending), "O_APPEND");
        let mut w = TarWriter::new(Vec::new(), no_digest);
        assert!(w.copy_files_into(out));
    }

    /// A file that is not the size its entry says (it changed since it was listed) is an
    /// error on the copying path as on the reading path, never a corrupt stream.
    #[test]
    fn a_copied_file_that_shrank_or_grew_is_an_error() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        std::fs::write(&src, vec![7u8; 2 * DIRECT_MIN as usize]).unwrap();
        let opts = TarOptions {
            skip_digest: true,
            ..TarOptions::default()
        };
        for (size, want) in [(3 * DIRECT_MIN, "shrank"), (DIRECT_MIN, "grew")] {
            let mut out = std::fs::File::create(t.path().join("out")).unwrap();
            let dup = out.try_clone().unwrap();
            let mut w = TarWriter::new(&mut out, opts);
            assert!(w.copy_files_into(dup));
            let f = std::fs::File::open(&src).unwrap();
            let err = w
                .append(&entry(b"f", TarKind::File { size }), Data::File(&f))
                .unwrap_err();
            assert!(err.to_string().contains(want), "{size}: {err}");
        }
    }
}
