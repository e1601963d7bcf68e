//! Reading tar streams: headers in every dialect GNU tar and bsdtar read, one entry at a time.
//!
//! Owns what an archive says about each entry: v7, ustar, star, GNU (long names, old sparse
//! maps, dumpdirs, volume labels) and PAX (records parsed by their length prefix, so a value may
//! hold any byte; every GNU sparse form: 0.0 `offset`/`numbytes` pairs, 0.1 `map`, 1.0 map in
//! the data; `GNU.sparse.name`/`realsize`). Numeric fields are octal with blanks (all NUL or
//! spaces mean 0) or base-256. Nothing here touches the filesystem: [`TarReader`] hands over a
//! [`Header`] and then the entry's data as a [`Read`]; a sparse file's data is its packed
//! chunks, with the map in [`Header::sparse`].
//!
//! Bounds: everything that is held in memory before an entry is handed over (PAX records, GNU
//! long names, sparse maps) is read under [`MAX_ENTRY_HEADERS`] bytes, and a sparse map lists
//! at most [`MAX_SPARSE_CHUNKS`] chunks.

use std::io::{self, Read};

use rustix::fs::Timespec;

use crate::path::display_bytes;

/// The most bytes one entry's headers may take (its header blocks, PAX records, GNU long name
/// and long link records, GNU sparse maps), all of which are held in memory. Go's archive/tar
/// (containerd, umoci, docker) refuses a PAX header or long name over 1 MiB.
pub(crate) const MAX_ENTRY_HEADERS: u64 = 2 << 20;

/// The most chunks a sparse map may list (the map is held in memory, 16 bytes a chunk).
pub(crate) const MAX_SPARSE_CHUNKS: u64 = 1 << 20;

const BLOCK: usize = 512;

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Regular,
    Directory,
    Symlink,
    Hardlink,
    CharDevice,
    BlockDevice,
    Fifo,
    /// A GNU volume label (`V`): names the archive, not a file.
    VolumeLabel,
    /// A vendor or unknown type flag (Solaris ACL `A`, star inode `I`, ...): not a file we can
    /// make; the caller skips it and says so.
    Other(u8),
}

/// A sparse file: its size and the (offset, length) chunks its packed data fills, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Sparse {
    pub real_size: u64,
    pub chunks: Vec<(u64, u64)>,
}

/// One entry's metadata, with every extension header applied.
#[derive(Debug, Clone)]
pub(crate) struct Header {
    /// The name as the archive gives it (PAX `path`, GNU long name, or the ustar name).
    pub path: Vec<u8>,
    /// Symlink or hardlink target.
    pub link: Vec<u8>,
    pub kind: Kind,
    /// Permission bits incl. setuid, setgid and sticky.
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: Timespec,
    pub atime: Option<Timespec>,
    pub dev_major: u32,
    pub dev_minor: u32,
    /// Extended attributes (SCHILY.xattr and LIBARCHIVE.xattr records), in archive order.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// The bytes of data that follow the header in the archive (a sparse file's packed chunks).
    pub size: u64,
    pub sparse: Option<Sparse>,
}

/// A malformed archive.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TarError {
    /// The stream could not be read, or ended too early.
    #[error(transparent)]
    Io(io::Error),
    /// The archive is malformed at a place with no entry name yet.
    #[error("{0}")]
    Stream(String),
    /// The headers of the entry named `path` are malformed.
    #[error("{reason}")]
    Entry { path: Vec<u8>, reason: String },
}

fn truncated() -> TarError {
    TarError::Io(io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the archive ends without its end-of-archive blocks: it is truncated",
    ))
}

/// Reads a tar stream entry by entry. After [`TarReader::next_entry`], reading from the
/// `TarReader` gives that entry's data (ends at the entry's end); the next call skips what was
/// not read.
pub(crate) struct TarReader<R> {
    inner: R,
    /// Data bytes of the current entry not yet read, then the padding to the block boundary.
    left: u64,
    pad: u64,
    /// Bytes read so far (for messages).
    offset: u64,
    /// The end-of-archive block was seen.
    done: bool,
}

/// Where a header's fields are.
mod field {
    use std::ops::Range;
    pub(super) const NAME: Range<usize> = 0..100;
    pub(super) const MODE: Range<usize> = 100..108;
    pub(super) const UID: Range<usize> = 108..116;
    pub(super) const GID: Range<usize> = 116..124;
    pub(super) const SIZE: Range<usize> = 124..136;
    pub(super) const MTIME: Range<usize> = 136..148;
    pub(super) const CHKSUM: Range<usize> = 148..156;
    pub(super) const TYPEFLAG: usize = 156;
    pub(super) const LINKNAME: Range<usize> = 157..257;
    pub(super) const MAGIC: Range<usize> = 257..263;
    pub(super) const VERSION: Range<usize> = 263..265;
    pub(super) const DEVMAJOR: Range<usize> = 329..337;
    pub(super) const DEVMINOR: Range<usize> = 337..345;
    pub(super) const PREFIX: Range<usize> = 345..500;
    /// star: a shorter prefix, then atime and ctime, and "tar\0" at the end of the block.
    pub(super) const STAR_PREFIX: Range<usize> = 345..476;
    pub(super) const STAR_ATIME: Range<usize> = 476..488;
    pub(super) const STAR_TRAILER: Range<usize> = 508..512;
    /// GNU: atime, then the old sparse map (4 entries), its continuation flag and the real size.
    pub(super) const GNU_ATIME: Range<usize> = 345..357;
    pub(super) const GNU_SPARSE: usize = 386;
    pub(super) const GNU_ISEXTENDED: usize = 482;
    pub(super) const GNU_REALSIZE: Range<usize> = 483..495;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    V7,
    Ustar,
    Star,
    Gnu,
}

/// What the extension headers before an entry said.
#[derive(Default)]
struct Pending {
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    /// PAX records in archive order (GNU sparse 0.0 depends on it).
    pax: Vec<(Vec<u8>, Vec<u8>)>,
}

impl<R: Read> TarReader<R> {
    pub(crate) fn new(inner: R) -> Self {
        TarReader {
            inner,
            left: 0,
            pad: 0,
            offset: 0,
            done: false,
        }
    }

    /// Count `n` bytes of the current entry's data as read: the caller had them copied
    /// straight from the file and has the inner reader pass over them (see
    /// [`crate::writers::DirectFile`]).
    pub(crate) fn passed_over(&mut self, n: u64) {
        assert!(n <= self.left, "passing over more than the entry's data");
        self.left -= n;
        self.offset += n;
    }

    /// Skip what is left of the current entry's data and its padding.
    fn skip_rest(&mut self) -> Result<(), TarError> {
        let n = self.left + self.pad;
        if n > 0 {
            let got =
                io::copy(&mut (&mut self.inner).take(n), &mut io::sink()).map_err(TarError::Io)?;
            self.offset += got;
            if got != n {
                return Err(TarError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the archive is truncated inside an entry's data",
                )));
            }
        }
        self.left = 0;
        self.pad = 0;
        Ok(())
    }

    /// One 512-byte block; `Ok(false)` at a clean end of stream before its first byte.
    fn block(&mut self, buf: &mut [u8; BLOCK]) -> Result<bool, TarError> {
        let mut filled = 0;
        while filled < BLOCK {
            match self.inner.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(TarError::Io(e)),
            }
        }
        self.offset += filled as u64;
        match filled {
            0 => Ok(false),
            BLOCK => Ok(true),
            _ => Err(truncated()),
        }
    }

    /// The data of an extension header, held in memory under the entry's budget.
    fn ext_data(&mut self, size: u64, budget: &mut u64, what: &str) -> Result<Vec<u8>, TarError> {
        let padded = size.div_ceil(BLOCK as u64) * BLOCK as u64;
        if padded > *budget {
            return Err(TarError::Stream(format!(
                "the headers of the entry after byte {} ({what} of {size} bytes) are larger than \
                 {} MiB: refused, they would be held in memory",
                self.offset,
                MAX_ENTRY_HEADERS >> 20
            )));
        }
        *budget -= padded;
        let mut data = vec![0u8; padded as usize];
        let mut filled = 0;
        while filled < data.len() {
            match self.inner.read(&mut data[filled..]) {
                Ok(0) => return Err(truncated()),
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(TarError::Io(e)),
            }
        }
        self.offset += padded;
        data.truncate(size as usize);
        Ok(data)
    }

    /// The next entry, or `None` after the end-of-archive block. An end of stream where a
    /// header is due is an error: a stream cut on a block boundary would otherwise lose every
    /// entry after the cut in silence.
    pub(crate) fn next_entry(&mut self) -> Result<Option<Header>, TarError> {
        if self.done {
            return Ok(None);
        }
        self.skip_rest()?;
        let mut budget = MAX_ENTRY_HEADERS;
        let mut pending = Pending::default();
        let mut block = [0u8; BLOCK];
        loop {
            if !self.block(&mut block)? {
                return Err(truncated());
            }
            if block.iter().all(|&b| b == 0) {
                // GNU tar and bsdtar end at the first zero block (GNU tar warns about a lone
                // one); what follows is not read as entries.
                self.done = true;
                return Ok(None);
            }
            budget = budget.saturating_sub(BLOCK as u64);
            check_checksum(&block, self.offset - BLOCK as u64)?;
            let typeflag = block[field::TYPEFLAG];
            let name_for_errors = || header_name(&block, detect(&block));
            let size = numeric(&block[field::SIZE]).map_err(|e| TarError::Entry {
                path: name_for_errors(),
                reason: format!("bad size field: {e}"),
            })?;
            let size = u64::try_from(size).map_err(|_| TarError::Entry {
                path: name_for_errors(),
                reason: "negative size".into(),
            })?;
            match typeflag {
                b'x' => {
                    let data = self.ext_data(size, &mut budget, "a PAX extended header")?;
                    // Several in a row: the last one counts, as for GNU tar and Go.
                    pending.pax.clear();
                    parse_pax(&data, &mut pending.pax).map_err(|reason| TarError::Entry {
                        path: name_for_errors(),
                        reason,
                    })?;
                }
                b'g' => {
                    // Global records: GNU tar and bsdtar disagree on them, Go's archive/tar
                    // and tar-rs ignore them; so do we (the records are still checked).
                    let data = self.ext_data(size, &mut budget, "a PAX global header")?;
                    parse_pax(&data, &mut Vec::new()).map_err(|reason| TarError::Entry {
                        path: name_for_errors(),
                        reason,
                    })?;
                }
                b'L' | b'K' => {
                    let data = self.ext_data(size, &mut budget, "a GNU long name")?;
                    let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
                    let name = data[..end].to_vec();
                    if typeflag == b'L' {
                        pending.long_name = Some(name);
                    } else {
                        pending.long_link = Some(name);
                    }
                }
                _ => return self.entry(&block, size, pending, &mut budget).map(Some),
            }
        }
    }

    /// Build the entry of the header `block`, applying `pending`.
    fn entry(
        &mut self,
        block: &[u8; BLOCK],
        size: u64,
        pending: Pending,
        budget: &mut u64,
    ) -> Result<Header, TarError> {
        let format = detect(block);
        let typeflag = block[field::TYPEFLAG];
        let mut path = pending
            .long_name
            .unwrap_or_else(|| header_name(block, format));
        let mut link = pending
            .long_link
            .unwrap_or_else(|| cstr(&block[field::LINKNAME]).to_vec());
        let bad = |path: &[u8], what: &str, e: String| TarError::Entry {
            path: path.to_vec(),
            reason: format!("bad {what} field: {e}"),
        };
        let mode = numeric(&block[field::MODE]).map_err(|e| bad(&path, "mode", e))?;
        let uid = numeric(&block[field::UID]).map_err(|e| bad(&path, "uid", e))?;
        let gid = numeric(&block[field::GID]).map_err(|e| bad(&path, "gid", e))?;
        let mtime = numeric(&block[field::MTIME]).map_err(|e| bad(&path, "mtime", e))?;
        let (mut dev_major, mut dev_minor) = (0, 0);
        if matches!(typeflag, b'3' | b'4') {
            dev_major = numeric(&block[field::DEVMAJOR]).map_err(|e| bad(&path, "devmajor", e))?;
            dev_minor = numeric(&block[field::DEVMINOR]).map_err(|e| bad(&path, "devminor", e))?;
        }
        let atime_field = match format {
            Format::Gnu => Some(&block[field::GNU_ATIME]),
            Format::Star => Some(&block[field::STAR_ATIME]),
            _ => None,
        };
        let atime = atime_field
            .and_then(|f| numeric(f).ok())
            .filter(|&t| t != 0)
            .map(|t| Timespec {
                tv_sec: t as i64,
                tv_nsec: 0,
            });
        let nonneg = |v: i128, what: &str, path: &[u8]| {
            u64::try_from(v).map_err(|_| bad(path, what, format!("{v} is negative")))
        };
        let mut h = Header {
            kind: Kind::Other(typeflag),
            mode: (nonneg(mode, "mode", &path)? & 0o7777) as u32,
            uid: nonneg(uid, "uid", &path)?,
            gid: nonneg(gid, "gid", &path)?,
            mtime: Timespec {
                tv_sec: i64::try_from(mtime)
                    .map_err(|_| bad(&path, "mtime", "too large".into()))?,
                tv_nsec: 0,
            },
            atime,
            dev_major: u32::try_from(dev_major)
                .map_err(|_| bad(&path, "devmajor", format!("{dev_major}")))?,
            dev_minor: u32::try_from(dev_minor)
                .map_err(|_| bad(&path, "devminor", format!("{dev_minor}")))?,
            xattrs: Vec::new(),
            size,
            sparse: None,
            path: Vec::new(),
            link: Vec::new(),
        };
        // Old GNU sparse (type S): the map is in the header and its extension blocks.
        let mut sparse = None;
        if typeflag == b'S' && format == Format::Gnu {
            sparse = Some(self.old_gnu_sparse(block, &path, budget)?);
        }
        // PAX records override the header.
        let mut gnu = GnuSparsePax::default();
        for (key, value) in &pending.pax {
            let num = |what: &str| -> Result<u64, TarError> {
                parse_decimal(value).ok_or_else(|| TarError::Entry {
                    path: path.clone(),
                    reason: format!("bad PAX {what} record \"{}\"", display_bytes(value)),
                })
            };
            match key.as_slice() {
                // An empty value unsets the key: the header's field stands.
                _ if value.is_empty() && !key.starts_with(b"SCHILY.xattr.") => {}
                // C tools read names as strings: a NUL ends them (GNU tar and bsdtar agree).
                b"path" => path = cstr(value).to_vec(),
                b"linkpath" => link = cstr(value).to_vec(),
                b"size" => h.size = num("size")?,
                b"uid" => h.uid = num("uid")?,
                b"gid" => h.gid = num("gid")?,
                b"mtime" => {
                    h.mtime = parse_pax_time(value).ok_or_else(|| TarError::Entry {
                        path: path.clone(),
                        reason: "bad PAX mtime".into(),
                    })?
                }
                b"atime" => h.atime = parse_pax_time(value),
                b"SCHILY.devmajor" => {
                    h.dev_major = u32::try_from(num("devmajor")?).map_err(|_| TarError::Entry {
                        path: path.clone(),
                        reason: "PAX devmajor does not fit in 32 bits".into(),
                    })?
                }
                b"SCHILY.devminor" => {
                    h.dev_minor = u32::try_from(num("devminor")?).map_err(|_| TarError::Entry {
                        path: path.clone(),
                        reason: "PAX devminor does not fit in 32 bits".into(),
                    })?
                }
                b"GNU.sparse.major" => gnu.major = Some(num("GNU.sparse.major")?),
                b"GNU.sparse.minor" => gnu.minor = Some(num("GNU.sparse.minor")?),
                b"GNU.sparse.name" => gnu.name = Some(value.clone()),
                b"GNU.sparse.size" | b"GNU.sparse.realsize" => {
                    gnu.real_size = Some(num("GNU.sparse.size")?)
                }
                b"GNU.sparse.numblocks" => gnu.numblocks = Some(num("GNU.sparse.numblocks")?),
                b"GNU.sparse.offset" => {
                    gnu.seen = true;
                    gnu.pending_offset = Some(num("GNU.sparse.offset")?);
                }
                b"GNU.sparse.numbytes" => {
                    gnu.seen = true;
                    let len = num("GNU.sparse.numbytes")?;
                    let off = gnu.pending_offset.take().ok_or_else(|| TarError::Entry {
                        path: path.clone(),
                        reason: "GNU.sparse.numbytes without GNU.sparse.offset before it".into(),
                    })?;
                    push_chunk(&mut gnu.chunks, off, len, &path)?;
                }
                b"GNU.sparse.map" => {
                    gnu.seen = true;
                    gnu.chunks.clear();
                    let text = std::str::from_utf8(value).ok();
                    let nums: Option<Vec<u64>> = text.and_then(|t| {
                        t.split(',')
                            .map(|n| n.parse().ok())
                            .collect::<Option<Vec<u64>>>()
                    });
                    let nums =
                        nums.filter(|n| n.len() % 2 == 0)
                            .ok_or_else(|| TarError::Entry {
                                path: path.clone(),
                                reason: "bad GNU.sparse.map record".into(),
                            })?;
                    for pair in nums.chunks(2) {
                        push_chunk(&mut gnu.chunks, pair[0], pair[1], &path)?;
                    }
                }
                _ => {
                    if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                        h.xattrs.push((name.to_vec(), value.clone()));
                    } else if let Some(name) = key.strip_prefix(b"LIBARCHIVE.xattr.") {
                        let x = libarchive_xattr(name, value).ok_or_else(|| TarError::Entry {
                            path: path.clone(),
                            reason: "bad LIBARCHIVE.xattr record".into(),
                        })?;
                        h.xattrs.push(x);
                    }
                }
            }
        }
        if let Some(name) = gnu.name.take() {
            path = name;
        }
        h.kind = match typeflag {
            // Old practice (v7, BSD): a regular entry named with a trailing slash is a
            // directory, for GNU tar, bsdtar and Go alike.
            b'0' | b'\0' | b'7' if path.ends_with(b"/") && sparse.is_none() && !gnu.is_sparse() => {
                Kind::Directory
            }
            b'0' | b'\0' | b'7' | b'S' => Kind::Regular,
            b'1' => Kind::Hardlink,
            b'2' => Kind::Symlink,
            b'3' => Kind::CharDevice,
            b'4' => Kind::BlockDevice,
            b'5' => Kind::Directory,
            b'6' => Kind::Fifo,
            // A GNU dumpdir (--listed-incremental): a directory whose data lists its names.
            b'D' => Kind::Directory,
            b'V' => Kind::VolumeLabel,
            b'M' => {
                return Err(TarError::Entry {
                    path,
                    reason: "a GNU multi-volume continuation (type M): the file starts in \
                             another volume"
                        .into(),
                });
            }
            other => Kind::Other(other),
        };
        // Links, devices, fifos and directories have no data whatever their size field says
        // (as Go and libarchive read them); a dumpdir's data is its name list, skipped.
        if matches!(typeflag, b'1' | b'2' | b'3' | b'4' | b'5' | b'6')
            || (h.kind == Kind::Directory && typeflag != b'D')
        {
            h.size = 0;
        }
        self.left = h.size;
        self.pad = pad_of(h.size);
        if h.kind == Kind::Regular {
            if gnu.major == Some(1) {
                // 1.0: the map opens the data; read it now, so the data is the chunks alone.
                let real_size = gnu.real_size.ok_or_else(|| TarError::Entry {
                    path: path.clone(),
                    reason: "PAX sparse file without GNU.sparse.realsize".into(),
                })?;
                let chunks = self.sparse_map_in_data(&path)?;
                h.size = self.left;
                sparse = Some(Sparse { real_size, chunks });
            } else if gnu.is_sparse() {
                let real_size = gnu.real_size.ok_or_else(|| TarError::Entry {
                    path: path.clone(),
                    reason: "PAX sparse file without GNU.sparse.size".into(),
                })?;
                if let Some(n) = gnu.numblocks
                    && n != gnu.chunks.len() as u64
                {
                    return Err(TarError::Entry {
                        path,
                        reason: format!(
                            "GNU.sparse.numblocks is {n} but the map lists {} chunks",
                            gnu.chunks.len()
                        ),
                    });
                }
                sparse = Some(Sparse {
                    real_size,
                    chunks: std::mem::take(&mut gnu.chunks),
                });
            }
            if let Some(s) = &sparse {
                check_sparse(s, h.size, &path)?;
            }
            h.sparse = sparse;
        }
        h.path = path;
        h.link = link;
        Ok(h)
    }

    /// The old GNU sparse map: four entries in the header, 21 in each extension block.
    fn old_gnu_sparse(
        &mut self,
        block: &[u8; BLOCK],
        path: &[u8],
        budget: &mut u64,
    ) -> Result<Sparse, TarError> {
        let bad = |reason: String| TarError::Entry {
            path: path.to_vec(),
            reason,
        };
        let real = numeric(&block[field::GNU_REALSIZE])
            .map_err(|e| bad(format!("bad GNU sparse real size: {e}")))?;
        let real_size = u64::try_from(real).map_err(|_| bad("negative sparse size".into()))?;
        let mut chunks = Vec::new();
        let read_entries = |area: &[u8], n: usize, chunks: &mut Vec<(u64, u64)>| {
            for i in 0..n {
                let e = &area[i * 24..i * 24 + 24];
                if e[0] == 0 {
                    break;
                }
                let off = numeric(&e[..12]).map_err(|e| bad(format!("bad sparse offset: {e}")))?;
                let len = numeric(&e[12..]).map_err(|e| bad(format!("bad sparse length: {e}")))?;
                let (Ok(off), Ok(len)) = (u64::try_from(off), u64::try_from(len)) else {
                    return Err(bad("negative sparse chunk".into()));
                };
                push_chunk(chunks, off, len, path)?;
            }
            Ok(())
        };
        read_entries(
            &block[field::GNU_SPARSE..field::GNU_ISEXTENDED],
            4,
            &mut chunks,
        )?;
        let mut extended = block[field::GNU_ISEXTENDED] != 0;
        let mut ext = [0u8; BLOCK];
        while extended {
            if *budget < BLOCK as u64 {
                return Err(bad(format!(
                    "the sparse map is larger than {} MiB",
                    MAX_ENTRY_HEADERS >> 20
                )));
            }
            *budget -= BLOCK as u64;
            if !self.block(&mut ext)? {
                return Err(truncated());
            }
            read_entries(&ext[..504], 21, &mut chunks)?;
            extended = ext[504] != 0;
        }
        Ok(Sparse { real_size, chunks })
    }

    /// GNU PAX sparse 1.0: the data opens with a decimal map (count, then offset and size per
    /// chunk, one number a line), padded to a block.
    fn sparse_map_in_data(&mut self, path: &[u8]) -> Result<Vec<(u64, u64)>, TarError> {
        let bad = || TarError::Entry {
            path: path.to_vec(),
            reason: "bad PAX sparse map".into(),
        };
        let mut consumed = 0u64;
        let mut read_number = |me: &mut Self| -> Result<u64, TarError> {
            let mut digits = Vec::new();
            loop {
                let mut b = [0u8; 1];
                me.read_exact(&mut b).map_err(|e| {
                    if e.kind() == io::ErrorKind::UnexpectedEof {
                        bad()
                    } else {
                        TarError::Io(e)
                    }
                })?;
                consumed += 1;
                if b[0] == b'\n' {
                    break;
                }
                if !b[0].is_ascii_digit() || digits.len() > 20 {
                    return Err(bad());
                }
                digits.push(b[0]);
            }
            parse_decimal(&digits).ok_or_else(bad)
        };
        let count = read_number(self)?;
        if count > MAX_SPARSE_CHUNKS {
            return Err(TarError::Entry {
                path: path.to_vec(),
                reason: format!(
                    "PAX sparse map lists {count} chunks, more than the {MAX_SPARSE_CHUNKS} \
                     allowed"
                ),
            });
        }
        let mut chunks = Vec::new();
        for _ in 0..count {
            let off = read_number(self)?;
            let len = read_number(self)?;
            push_chunk(&mut chunks, off, len, path)?;
        }
        let pad = pad_of(consumed);
        let mut skip = vec![0u8; pad as usize];
        self.read_exact(&mut skip).map_err(|_| bad())?;
        Ok(chunks)
    }
}

impl<R: Read> Read for TarReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 || buf.is_empty() {
            return Ok(0);
        }
        let n = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let got = self.inner.read(&mut buf[..n])?;
        if got == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the archive is truncated inside this entry's data",
            ));
        }
        self.left -= got as u64;
        self.offset += got as u64;
        Ok(got)
    }
}

#[derive(Default)]
struct GnuSparsePax {
    major: Option<u64>,
    minor: Option<u64>,
    name: Option<Vec<u8>>,
    real_size: Option<u64>,
    numblocks: Option<u64>,
    pending_offset: Option<u64>,
    chunks: Vec<(u64, u64)>,
    /// A 0.0 or 0.1 map record was seen.
    seen: bool,
}

impl GnuSparsePax {
    /// The records make the entry a sparse file (any GNU PAX sparse version).
    fn is_sparse(&self) -> bool {
        self.seen || self.major.is_some()
    }
}

fn push_chunk(
    chunks: &mut Vec<(u64, u64)>,
    off: u64,
    len: u64,
    path: &[u8],
) -> Result<(), TarError> {
    if chunks.len() as u64 >= MAX_SPARSE_CHUNKS {
        return Err(TarError::Entry {
            path: path.to_vec(),
            reason: format!("the sparse map lists more than {MAX_SPARSE_CHUNKS} chunks"),
        });
    }
    chunks.push((off, len));
    Ok(())
}

/// Every chunk inside the file, in order and not overlapping the one before (as Go's
/// archive/tar requires: overlapping chunks make the content depend on the order they are
/// written in, and peers disagree on it), and the packed data exactly the chunks.
fn check_sparse(s: &Sparse, data: u64, path: &[u8]) -> Result<(), TarError> {
    let mut total = 0u64;
    let mut prev_end = 0u64;
    for &(off, len) in &s.chunks {
        if off < prev_end {
            return Err(TarError::Entry {
                path: path.to_vec(),
                reason: format!(
                    "sparse chunk {off}+{len} overlaps or comes before the chunk ending at {prev_end}"
                ),
            });
        }
        if off.checked_add(len).is_none_or(|end| end > s.real_size) {
            return Err(TarError::Entry {
                path: path.to_vec(),
                reason: format!(
                    "sparse chunk {off}+{len} beyond the file's size {}",
                    s.real_size
                ),
            });
        }
        prev_end = off + len;
        total = total.saturating_add(len);
    }
    if total != data {
        return Err(TarError::Entry {
            path: path.to_vec(),
            reason: format!("the sparse map lists {total} bytes of data, the entry holds {data}"),
        });
    }
    Ok(())
}

fn pad_of(n: u64) -> u64 {
    (BLOCK as u64 - n % BLOCK as u64) % BLOCK as u64
}

fn detect(block: &[u8; BLOCK]) -> Format {
    let magic = &block[field::MAGIC];
    if magic == b"ustar\0" {
        if &block[field::STAR_TRAILER] == b"tar\0" {
            Format::Star
        } else {
            Format::Ustar
        }
    } else if magic == b"ustar " && &block[field::VERSION] == b" \0" {
        Format::Gnu
    } else {
        Format::V7
    }
}

/// The bytes of a NUL-terminated field.
fn cstr(f: &[u8]) -> &[u8] {
    let end = f.iter().position(|&b| b == 0).unwrap_or(f.len());
    &f[..end]
}

/// The name of a header block: ustar and star join their prefix.
fn header_name(block: &[u8; BLOCK], format: Format) -> Vec<u8> {
    let name = cstr(&block[field::NAME]);
    let prefix = match format {
        Format::Ustar => cstr(&block[field::PREFIX]),
        Format::Star => cstr(&block[field::STAR_PREFIX]),
        _ => &[],
    };
    if prefix.is_empty() {
        name.to_vec()
    } else {
        let mut p = prefix.to_vec();
        p.push(b'/');
        p.extend_from_slice(name);
        p
    }
}

/// The checksum is the sum of the header's bytes with its own field read as spaces; old tars
/// summed signed bytes, so either sum is accepted (as GNU tar, bsdtar and Go do).
fn check_checksum(block: &[u8; BLOCK], at: u64) -> Result<(), TarError> {
    let stored = numeric(&block[field::CHKSUM]).ok();
    let mut unsigned: i64 = 0;
    let mut signed: i64 = 0;
    for (i, &b) in block.iter().enumerate() {
        let b = if field::CHKSUM.contains(&i) { b' ' } else { b };
        unsigned += i64::from(b);
        signed += i64::from(b as i8);
    }
    match stored {
        Some(s) if s == i128::from(unsigned) || s == i128::from(signed) => Ok(()),
        _ => Err(TarError::Stream(format!(
            "the header at byte {at} has a bad checksum: not a tar archive, or corrupt"
        ))),
    }
}

/// A numeric field: octal, padded with spaces or NULs on either side (blank means 0), or
/// base-256 when the first byte has its high bit set (0x80 positive, 0xff negative).
pub(crate) fn numeric(f: &[u8]) -> Result<i128, String> {
    if let Some(&first) = f.first()
        && first & 0x80 != 0
    {
        // Two's complement, big-endian, without the marker bit; a set 0x40 bit is negative.
        let inv: u8 = if first & 0x40 != 0 { 0xff } else { 0 };
        let mut x: u128 = 0;
        for (i, &b) in f.iter().enumerate() {
            let mut c = b ^ inv;
            if i == 0 {
                c &= 0x7f;
            }
            if x >> 56 != 0 {
                return Err("base-256 number too large".into());
            }
            x = (x << 8) | u128::from(c);
        }
        if x >> 63 != 0 {
            return Err("base-256 number too large".into());
        }
        let v = x as i128;
        return Ok(if inv == 0xff { -v - 1 } else { v });
    }
    let trimmed: &[u8] = {
        let is_pad = |b: &u8| *b == b' ' || *b == 0;
        let start = f.iter().position(|b| !is_pad(b)).unwrap_or(f.len());
        let end = f.iter().rposition(|b| !is_pad(b)).map_or(start, |e| e + 1);
        &f[start..end]
    };
    let mut v: i128 = 0;
    for &b in trimmed {
        if !(b'0'..=b'7').contains(&b) {
            return Err(format!("\"{}\" is not an octal number", display_bytes(f)));
        }
        v = v * 8 + i128::from(b - b'0');
        if v > i128::from(u64::MAX) {
            return Err("number too large".into());
        }
    }
    Ok(v)
}

fn parse_decimal(v: &[u8]) -> Option<u64> {
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // Leading zeros are allowed in any number (Go's pax-pos-size-file.tar has 21).
    let start = v.iter().position(|&b| b != b'0').unwrap_or(v.len());
    let v = &v[start..];
    if v.is_empty() {
        return Some(0);
    }
    if v.len() > 20 {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// PAX records, `LEN KEY=VALUE\n` each, parsed by their length prefix: a value may hold any
/// byte, newlines included (binary xattrs such as `security.capability`).
fn parse_pax(mut data: &[u8], out: &mut Vec<(Vec<u8>, Vec<u8>)>) -> Result<(), String> {
    while !data.is_empty() {
        if data.iter().all(|&b| b == 0) {
            break;
        }
        let sp = data
            .iter()
            .take(21)
            .position(|&b| b == b' ')
            .ok_or("bad PAX record: no length")?;
        let len = parse_decimal(&data[..sp]).ok_or("bad PAX record: bad length")? as usize;
        if len <= sp + 1 || len > data.len() {
            return Err(format!("bad PAX record: length {len} out of range"));
        }
        let rec = &data[sp + 1..len];
        let Some((&b'\n', kv)) = rec.split_last() else {
            return Err("bad PAX record: it does not end with a newline".into());
        };
        let eq = kv
            .iter()
            .position(|&b| b == b'=')
            .ok_or("bad PAX record: no '='")?;
        if eq == 0 {
            return Err("bad PAX record: empty key".into());
        }
        let (key, value) = (&kv[..eq], &kv[eq + 1..]);
        match out.iter_mut().find(|(k, _)| k == key) {
            // A later record for the same key wins, except the sparse pairs of format 0.0,
            // which repeat on purpose.
            Some(slot) if key != b"GNU.sparse.offset" && key != b"GNU.sparse.numbytes" => {
                slot.1 = value.to_vec()
            }
            _ => out.push((key.to_vec(), value.to_vec())),
        }
        data = &data[len..];
    }
    Ok(())
}

/// A PAX time: `[-]SECONDS[.FRACTION]`. Like GNU tar and bsdtar, what follows the leading
/// number is ignored (Go's pax-bad-mtime-file.tar says `999xxx9324.432432444444`: 999).
pub(crate) fn parse_pax_time(v: &[u8]) -> Option<Timespec> {
    let neg = v.first() == Some(&b'-');
    let digits = |from: usize| from + v[from..].iter().take_while(|b| b.is_ascii_digit()).count();
    let secs_end = digits(usize::from(neg));
    let end = if v.get(secs_end) == Some(&b'.') {
        digits(secs_end + 1)
    } else {
        secs_end
    };
    let v = &v[..end];
    let s = std::str::from_utf8(v).ok()?;
    let (neg, s) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s),
    };
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = secs.parse().ok()?;
    let mut nsec: i64 = 0;
    for (i, c) in frac.bytes().enumerate() {
        if !c.is_ascii_digit() {
            return None;
        }
        if i < 9 {
            nsec += i64::from(c - b'0') * 10i64.pow(8 - i as u32);
        }
    }
    Some(if neg {
        if nsec == 0 {
            Timespec {
                tv_sec: -secs,
                tv_nsec: 0,
            }
        } else {
            Timespec {
                tv_sec: -secs - 1,
                tv_nsec: (1_000_000_000 - nsec) as _,
            }
        }
    } else {
        Timespec {
            tv_sec: secs,
            tv_nsec: nsec as _,
        }
    })
}

/// Decode libarchive's xattr name (%-escaped) and value (base64).
fn libarchive_xattr(name: &[u8], value: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut n = Vec::with_capacity(name.len());
    let mut i = 0;
    while i < name.len() {
        if name[i] == b'%' && i + 2 < name.len() {
            let h = std::str::from_utf8(name.get(i + 1..i + 3)?).ok()?;
            n.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            n.push(name[i]);
            i += 1;
        }
    }
    Some((n, base64_decode(value)?))
}

fn base64_decode(s: &[u8]) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        } as u32)
    };
    let s: Vec<u8> = s
        .iter()
        .copied()
        .filter(|&c| c != b'=' && !c.is_ascii_whitespace())
        .collect();
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    for chunk in s.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= val(c)? << (18 - 6 * i);
        }
        let bytes = acc.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_blank_octal_and_base256() {
        assert_eq!(numeric(b"\0\0\0\0\0\0\0\0"), Ok(0));
        assert_eq!(numeric(b"        "), Ok(0));
        assert_eq!(numeric(b"0000644\0"), Ok(0o644));
        assert_eq!(numeric(b"  644 \0"), Ok(0o644));
        assert_eq!(numeric(&[0x80, 0, 0, 0, 0, 0, 0, 0x01, 0x00]), Ok(256));
        assert_eq!(numeric(&[0xff; 8]), Ok(-1));
        assert_eq!(numeric(&[0xff, 0xff, 0xff, 0xfe]), Ok(-2));
        assert!(numeric(b"12x").is_err());
    }

    #[test]
    fn pax_values_may_hold_newlines() {
        fn record(key: &[u8], value: &[u8]) -> Vec<u8> {
            let body = 1 + key.len() + 1 + value.len() + 1;
            let mut n = body + 1;
            while n.to_string().len() + body != n {
                n += 1;
            }
            let mut r = format!("{n} ").into_bytes();
            r.extend_from_slice(key);
            r.push(b'=');
            r.extend_from_slice(value);
            r.push(b'\n');
            r
        }
        let value = b"\x01\x00\x00\x02\x0a\x00\x00\x00";
        let mut data = record(b"SCHILY.xattr.security.capability", value);
        data.extend_from_slice(b"15 path=a\nb/c\n\n");
        let mut out = Vec::new();
        parse_pax(&data, &mut out).unwrap();
        assert_eq!(out[0].1, value);
        assert_eq!(out[1], (b"path".to_vec(), b"a\nb/c\n".to_vec()));
    }

    #[test]
    fn pax_times() {
        assert_eq!(
            parse_pax_time(b"1700000000.123456789"),
            Some(Timespec {
                tv_sec: 1700000000,
                tv_nsec: 123456789
            })
        );
        assert_eq!(
            parse_pax_time(b"1700000000.5"),
            Some(Timespec {
                tv_sec: 1700000000,
                tv_nsec: 500000000
            })
        );
        assert_eq!(
            parse_pax_time(b"12"),
            Some(Timespec {
                tv_sec: 12,
                tv_nsec: 0
            })
        );
        assert_eq!(
            parse_pax_time(b"-1.25"),
            Some(Timespec {
                tv_sec: -2,
                tv_nsec: 750000000
            })
        );
        assert_eq!(parse_pax_time(b"x"), None);
        assert_eq!(
            parse_pax_time(b"999xxx9324.4"),
            Some(Timespec {
                tv_sec: 999,
                tv_nsec: 0
            })
        );
    }

    #[test]
    fn libarchive_xattrs() {
        assert_eq!(
            libarchive_xattr(b"user.a%3Db", b"aGVsbG8="),
            Some((b"user.a=b".to_vec(), b"hello".to_vec()))
        );
        assert_eq!(base64_decode(b"AAEC"), Some(vec![0, 1, 2]));
        assert_eq!(base64_decode(b"AA"), Some(vec![0]));
    }
}
