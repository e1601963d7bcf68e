//! Extracting a layer tar stream into a root, exactly and safely.
//!
//! Owns the one extractor every tool uses (tar-rs parses the stream; its `unpack` is never
//! used: it makes no device nodes, drops xattrs on directories and symlinks and truncates
//! mtimes). Every path is resolved inside the [`Root`] and every final component is touched
//! with `*at` calls that do not follow it. OCI whiteouts become overlay whiteouts on the way
//! in: `.wh.NAME` a 0/0 char device, `.wh..wh..opq` the opaque xattr on its directory, and a
//! whiteout plus entries for the same path in one layer an opaque directory.
//!
//! Path rules (each has a hostile fixture in fixtures/hostile): a leading `/` is dropped from
//! names and hardlink targets; a `..` component in either is refused; symlink targets are
//! stored as written and, when a later entry's parent goes through them, followed only inside
//! the root; missing parents are created, but never through a dangling symlink; an entry
//! replaces whatever was at its path (a directory entry keeps an existing directory); the
//! root entry must be a directory; the stream must end with its end-of-archive block.
//!
//! Metadata comes after the data, in [`crate::apply`]'s order (owner, xattrs, mode, times).
//! Directories get their mode and times at the end, after everything below them was written.

use std::cell::Cell;
use std::collections::HashSet;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::rc::Rc;

use rustix::fs::{FileType, Mode, OFlags, Timespec};

use crate::apply::{self, ApplyError, How, Meta, Owner, Perms, Step, Target, Xattrs};
use crate::path::{LayerPath, PathError, display_bytes, display_str};
use crate::root::{Leaf, Root};
use crate::whiteout::{self, OciName, XattrNs};

/// What to do with the owners the archive names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnerPolicy {
    /// chown to the archive's ids (real root, or a user namespace that maps them).
    Preserve,
    /// Leave files to the caller and record the archive's owner in the
    /// `user.rootlesscontainers` xattr, as umoci does (no subordinate ids).
    Record,
}

#[derive(Debug, Clone, Copy)]
pub struct ExtractOptions {
    /// Where opaque-directory xattrs go.
    pub opaque_ns: XattrNs,
    pub owners: OwnerPolicy,
}

/// What an extraction did, for the summary line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExtractStats {
    pub entries: u64,
    /// Bytes of file data written.
    pub bytes: u64,
    pub whiteouts: u64,
    pub opaques: u64,
    /// Device nodes that could not be created (rootless).
    pub skipped_devices: u64,
    /// xattrs the filesystem or our privileges refused (e.g. `trusted.*` rootless, `user.*` on
    /// symlinks).
    pub skipped_xattrs: u64,
}

impl ExtractStats {
    pub fn add(&mut self, o: &ExtractStats) {
        self.entries += o.entries;
        self.bytes += o.bytes;
        self.whiteouts += o.whiteouts;
        self.opaques += o.opaques;
        self.skipped_devices += o.skipped_devices;
        self.skipped_xattrs += o.skipped_xattrs;
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    #[error("reading the archive")]
    Read(#[source] io::Error),
    #[error("entry \"{entry}\": {reason}")]
    Entry { entry: String, reason: String },
}

/// A read error of the archive, its text escaped: tar-rs quotes entry names in some of them.
fn read_err(e: io::Error) -> ExtractError {
    let text = e.to_string();
    let shown = display_str(&text);
    ExtractError::Read(if shown == text {
        e
    } else {
        io::Error::new(e.kind(), shown)
    })
}

fn entry_err(raw: &[u8], reason: impl std::fmt::Display) -> ExtractError {
    ExtractError::Entry {
        entry: display_bytes(raw),
        // A reason may quote the archive (tar-rs names the entry in some of its errors).
        reason: display_str(&reason.to_string()),
    }
}

struct DeferredDir {
    path: LayerPath,
    /// Its mode and times are what is left to apply.
    meta: Meta,
    /// (device, inode) of the directory the entry made: the path is looked up again at the
    /// end, and may by then lead elsewhere (a parent replaced by a symlink).
    id: (u64, u64),
}

struct Extractor<'a> {
    root: &'a Root,
    opts: ExtractOptions,
    stats: ExtractStats,
    dirs: Vec<DeferredDir>,
    /// Whiteouts this layer made: an entry for the same path later turns them into content
    /// (and a directory into an opaque one).
    whiteouts: HashSet<LayerPath>,
    buf: Vec<u8>,
    /// The last parent directory opened, reused while entries stay in it.
    parent_cache: Option<(LayerPath, OwnedFd)>,
    /// The ids new files get without a chown (ours; the root is not setgid, see `extract`).
    creator: Option<(u32, u32)>,
}

/// Extract the tar stream `reader` into `root`.
pub fn extract<R: Read>(
    reader: R,
    root: &Root,
    opts: ExtractOptions,
) -> Result<ExtractStats, ExtractError> {
    let mut ex = Extractor {
        root,
        opts,
        stats: ExtractStats::default(),
        dirs: Vec::new(),
        whiteouts: HashSet::new(),
        buf: vec![0; 256 * 1024],
        parent_cache: None,
        creator: None,
    };
    // New files get our ids unless the root is setgid (then its group): only skip chowns
    // that could not change anything.
    let root_st = rustix::fs::fstat(root.fd()).map_err(|e| ExtractError::Read(e.into()))?;
    if root_st.st_mode & libc::S_ISGID == 0 {
        ex.creator = Some((
            rustix::process::geteuid().as_raw(),
            rustix::process::getegid().as_raw(),
        ));
    }
    // Files are created with their final permission bits (no chmod per file), so no umask.
    let old_umask = rustix::process::umask(Mode::empty());
    let res = ex.run(reader);
    rustix::process::umask(old_umask);
    res
}

impl Extractor<'_> {
    fn run<R: Read>(mut self, reader: R) -> Result<ExtractStats, ExtractError> {
        let ex = &mut self;
        let header_budget = Rc::new(Cell::new(None));
        let mut archive = tar::Archive::new(EndMarkerReader {
            inner: reader,
            last: [1; 512],
            header_budget: header_budget.clone(),
            offset: 0,
            saw_eof: false,
        });
        let mut entries = archive.entries().map_err(read_err)?;
        loop {
            // tar-rs buffers PAX records, GNU long names and sparse maps whole while it reads
            // an entry's headers: only a bounded amount may be read until it hands the entry
            // over (the previous entry's data is drained below, so none of it counts).
            header_budget.set(Some(MAX_ENTRY_HEADERS));
            let next = entries.next();
            header_budget.set(None);
            let Some(entry) = next else { break };
            let mut entry = entry.map_err(read_err)?;
            ex.entry(&mut entry)?;
            io::copy(&mut entry, &mut io::sink()).map_err(|e| data_err(&entry.path_bytes(), e))?;
        }
        // tar-rs ends quietly at EOF on a block boundary; a stream cut there would silently lose
        // every entry after the cut, so the end-of-archive zero block is required.
        // A zero block read as data is no end marker: tar-rs stops at a zero header without
        // reading on, so any EOF it met means the stream ended where a header was due.
        let inner = archive.into_inner();
        if inner.saw_eof || inner.last != [0; 512] {
            return Err(ExtractError::Read(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the archive ends without its end-of-archive blocks: it is truncated",
            )));
        }
        ex.finish_dirs()?;
        Ok(self.stats)
    }
}

/// The most bytes tar-rs may read for one entry's headers (its header blocks, PAX records, GNU
/// long name and long link records, GNU sparse maps), all of which it holds in memory. Go's
/// archive/tar (containerd, umoci, docker) refuses a PAX header or long name over 1 MiB.
pub(crate) const MAX_ENTRY_HEADERS: u64 = 2 << 20;

/// The most chunks a PAX sparse map may list (the map is held in memory, 16 bytes a chunk).
pub(crate) const MAX_SPARSE_CHUNKS: u64 = 1 << 20;

/// Remembers the last 512 bytes read, to tell an end-of-archive block from a bare EOF, and
/// refuses to read more than the budget while it is set (see [`MAX_ENTRY_HEADERS`]).
struct EndMarkerReader<R> {
    inner: R,
    last: [u8; 512],
    /// Bytes still allowed before the next entry is handed over; `None`: no limit.
    header_budget: Rc<Cell<Option<u64>>>,
    /// Bytes read so far (for messages).
    offset: u64,
    /// The inner reader reported its end (a read of 0 bytes into a non-empty buffer).
    saw_eof: bool,
}

impl<R: Read> Read for EndMarkerReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let budget = self.header_budget.get();
        let buf = match budget {
            Some(0) if !buf.is_empty() => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "the headers of the entry after byte {} (PAX extended header, GNU long name \
                         or sparse map) are larger than {} MiB: refused, they would be held in \
                         memory",
                        self.offset.saturating_sub(MAX_ENTRY_HEADERS),
                        MAX_ENTRY_HEADERS >> 20
                    ),
                ));
            }
            Some(left) => {
                let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                &mut buf[..n]
            }
            None => buf,
        };
        let n = self.inner.read(buf)?;
        self.saw_eof |= n == 0 && !buf.is_empty();
        self.offset += n as u64;
        if let Some(left) = budget {
            self.header_budget.set(Some(left - n as u64));
        }
        if n >= 512 {
            self.last.copy_from_slice(&buf[n - 512..n]);
        } else if n > 0 {
            self.last.copy_within(n.., 0);
            self.last[512 - n..].copy_from_slice(&buf[..n]);
        }
        Ok(n)
    }
}

fn parse_pax_time(v: &[u8]) -> Option<Timespec> {
    let s = std::str::from_utf8(v).ok()?;
    let (neg, s) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s),
    };
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = secs.parse().ok()?;
    let mut nsec: i64 = 0;
    for (i, c) in frac.bytes().take(9).enumerate() {
        if !c.is_ascii_digit() {
            return None;
        }
        nsec += i64::from(c - b'0') * 10i64.pow(8 - i as u32);
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
fn libarchive_xattr(name: &[u8], value: &[u8]) -> Option<(String, Vec<u8>)> {
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
    Some((String::from_utf8(n).ok()?, base64_decode(value)?))
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

impl Extractor<'_> {
    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), ExtractError> {
        let raw = entry.path_bytes().into_owned();
        let kind = entry.header().entry_type();
        if matches!(kind, tar::EntryType::XGlobalHeader) {
            return Ok(());
        }
        if matches!(
            kind,
            tar::EntryType::XHeader | tar::EntryType::GNULongName | tar::EntryType::GNULongLink
        ) {
            // tar-rs applies these only from a ustar or GNU header; reading one as an entry
            // would buffer all of its data.
            return Err(entry_err(
                &raw,
                format!("a {kind:?} extension header without ustar or GNU magic"),
            ));
        }
        let meta = self.meta(entry, &raw)?;
        let mut pax_sparse = None;
        let mut raw = raw;
        if let Some(pax) = entry.pax_extensions().map_err(|e| entry_err(&raw, e))? {
            let mut major = None;
            let mut name = None;
            let mut size = None;
            for ext in pax.flatten() {
                match ext.key_bytes() {
                    b"GNU.sparse.major" => major = Some(ext.value_bytes().to_vec()),
                    b"GNU.sparse.name" => name = Some(ext.value_bytes().to_vec()),
                    b"GNU.sparse.realsize" => {
                        size = std::str::from_utf8(ext.value_bytes())
                            .ok()
                            .and_then(|v| v.parse::<u64>().ok())
                    }
                    _ => {}
                }
            }
            if major.as_deref() == Some(b"1") {
                raw = name.unwrap_or(raw);
                pax_sparse = Some(size.ok_or_else(|| {
                    entry_err(&raw, "PAX sparse file without GNU.sparse.realsize")
                })?);
            }
        }
        let path = LayerPath::parse(&raw).map_err(|e: PathError| entry_err(&raw, e))?;
        self.stats.entries += 1;

        let (parent, base) = match path.split_last() {
            Some(x) => x,
            None => return self.root_entry(kind, meta, &raw),
        };
        match whiteout::classify_oci_name(base).map_err(|e| entry_err(&raw, e))? {
            OciName::Opaque => return self.opaque_marker(&parent, &raw),
            OciName::Whiteout(target) => return self.whiteout(&parent.join(target), &raw),
            OciName::Plain => {}
        }

        let leaf = self.leaf(&path, &raw)?;
        let was_whiteout = !self.whiteouts.is_empty() && self.whiteouts.remove(&path);
        if kind == tar::EntryType::Directory {
            // A directory entry keeps a directory that is already there (its metadata is
            // updated), and replaces anything else.
            match rustix::fs::mkdirat(&leaf.dir, leaf.name.as_c_str(), Mode::from_raw_mode(0o700)) {
                Ok(()) => {}
                Err(rustix::io::Errno::EXIST) => {
                    let is_dir = leaf
                        .stat()
                        .map_err(|e| entry_err(&raw, e))?
                        .is_some_and(|st| {
                            FileType::from_raw_mode(st.st_mode) == FileType::Directory
                        });
                    if !is_dir {
                        self.replace(&leaf, &raw)?;
                        rustix::fs::mkdirat(
                            &leaf.dir,
                            leaf.name.as_c_str(),
                            Mode::from_raw_mode(0o700),
                        )
                        .map_err(|e| entry_err(&raw, format!("mkdir: {e}")))?;
                    }
                }
                Err(e) => return Err(entry_err(&raw, format!("mkdir: {e}"))),
            }
            return self.directory(leaf, path, meta, was_whiteout, &raw);
        }
        match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                let sparse = kind == tar::EntryType::GNUSparse || pax_sparse.is_some();
                self.regular(&leaf, entry, meta, sparse, pax_sparse, &raw)
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| entry_err(&raw, "symlink without a target"))?
                    .into_owned();
                self.create_replacing(&leaf, &raw, "symlink", || {
                    rustix::fs::symlinkat(
                        std::ffi::OsStr::from_bytes(&target),
                        &leaf.dir,
                        leaf.name.as_c_str(),
                    )
                })?;
                let target = Target::At(leaf.dir.as_fd(), &leaf.name);
                self.apply_meta(target, &meta, Perms::Leave, true, &raw)
            }
            tar::EntryType::Link => self.hardlink(&leaf, entry, &raw),
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                self.special(&leaf, entry, meta, &raw)
            }
            other => Err(entry_err(&raw, format!("unsupported entry type {other:?}"))),
        }
    }

    /// The leaf for `path`, with its parent directory fd reused from the previous entry when
    /// it is the same directory (archives list a directory's entries together).
    fn leaf(&mut self, path: &LayerPath, raw: &[u8]) -> Result<Leaf, ExtractError> {
        let (parent, name) = path.split_last().expect("not the root");
        let dir = match &self.parent_cache {
            Some((p, fd)) if *p == parent => {
                rustix::io::fcntl_dupfd_cloexec(fd, 0).map_err(|e| entry_err(raw, e))?
            }
            _ => {
                let fd = self
                    .root
                    .open_dir(&parent, true)
                    .map_err(|e| entry_err(raw, e))?;
                let dup = rustix::io::fcntl_dupfd_cloexec(&fd, 0).map_err(|e| entry_err(raw, e))?;
                self.parent_cache = Some((parent, fd));
                dup
            }
        };
        Leaf::new(dir, name).map_err(|e| entry_err(raw, e))
    }

    /// Remove what is at `leaf` so an entry can take its place. Any directory below it may be
    /// gone now, so the cached parent fd is dropped.
    fn replace(&mut self, leaf: &Leaf, raw: &[u8]) -> Result<(), ExtractError> {
        self.parent_cache = None;
        leaf.remove_all()
            .map_err(|e| entry_err(raw, format!("replacing what was there: {e}")))
    }

    /// Run `create`; if something is already at the leaf, replace it and run it once more.
    /// (No stat first: nearly every entry is new, and EEXIST says the rest.)
    fn create_replacing<T>(
        &mut self,
        leaf: &Leaf,
        raw: &[u8],
        what: &str,
        mut create: impl FnMut() -> rustix::io::Result<T>,
    ) -> Result<T, ExtractError> {
        match create() {
            Err(rustix::io::Errno::EXIST) => {
                self.replace(leaf, raw)?;
                create().map_err(|e| entry_err(raw, format!("{what}: {e}")))
            }
            r => r.map_err(|e| entry_err(raw, format!("{what}: {e}"))),
        }
    }

    fn meta<R: Read>(
        &self,
        entry: &mut tar::Entry<'_, R>,
        raw: &[u8],
    ) -> Result<Meta, ExtractError> {
        let h = entry.header();
        let bad = |what: &str, e: io::Error| entry_err(raw, format!("bad {what} field: {e}"));
        let uid = h.uid().map_err(|e| bad("uid", e))?;
        let gid = h.gid().map_err(|e| bad("gid", e))?;
        let mode = h.mode().map_err(|e| bad("mode", e))? & 0o7777;
        let secs = h.mtime().map_err(|e| bad("mtime", e))?;
        let mut m = Meta {
            uid: owner_id(raw, "uid", uid)?,
            gid: owner_id(raw, "gid", gid)?,
            mode,
            mtime: Timespec {
                tv_sec: secs as i64,
                tv_nsec: 0,
            },
            atime: Timespec {
                tv_sec: secs as i64,
                tv_nsec: 0,
            },
            xattrs: Vec::new(),
        };
        let mut atime = None;
        if let Some(pax) = entry.pax_extensions().map_err(|e| entry_err(raw, e))? {
            for ext in pax {
                let ext = ext.map_err(|e| entry_err(raw, format!("bad PAX record: {e}")))?;
                let key = ext.key_bytes();
                if key == b"mtime" {
                    m.mtime = parse_pax_time(ext.value_bytes())
                        .ok_or_else(|| entry_err(raw, "bad PAX mtime"))?;
                } else if key == b"atime" {
                    atime = parse_pax_time(ext.value_bytes());
                } else if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                    let name = String::from_utf8(name.to_vec())
                        .map_err(|_| entry_err(raw, "xattr name is not UTF-8"))?;
                    m.xattrs.push((name, ext.value_bytes().to_vec()));
                } else if let Some(name) = key.strip_prefix(b"LIBARCHIVE.xattr.") {
                    let x = libarchive_xattr(name, ext.value_bytes())
                        .ok_or_else(|| entry_err(raw, "bad LIBARCHIVE.xattr record"))?;
                    m.xattrs.push(x);
                }
            }
        }
        m.atime = atime.unwrap_or(m.mtime);
        // An archive never sets overlay markers on disk: escape them as the kernel documents.
        for (name, _) in &mut m.xattrs {
            if let std::borrow::Cow::Owned(escaped) = whiteout::escape_xattr(name) {
                *name = escaped;
            }
        }
        m.xattrs.sort();
        m.xattrs.dedup_by(|a, b| a.0 == b.0);
        Ok(m)
    }

    fn root_entry(
        &mut self,
        kind: tar::EntryType,
        meta: Meta,
        raw: &[u8],
    ) -> Result<(), ExtractError> {
        if kind != tar::EntryType::Directory {
            return Err(entry_err(
                raw,
                format!("the root of a layer must be a directory, not a {kind:?} entry"),
            ));
        }
        let fd = rustix::fs::openat(
            self.root.fd(),
            c".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| entry_err(raw, e))?;
        self.apply_meta(Target::Fd(fd.as_fd()), &meta, Perms::Leave, false, raw)?;
        self.defer_dir(LayerPath::root(), &fd, meta, raw)
    }

    fn opaque_marker(&mut self, dir: &LayerPath, raw: &[u8]) -> Result<(), ExtractError> {
        let fd = self
            .root
            .open_dir(dir, true)
            .map_err(|e| entry_err(raw, e))?;
        whiteout::set_opaque(&fd, self.opts.opaque_ns)
            .map_err(|e| entry_err(raw, format!("set the opaque xattr: {e}")))?;
        self.stats.opaques += 1;
        Ok(())
    }

    fn whiteout(&mut self, target: &LayerPath, raw: &[u8]) -> Result<(), ExtractError> {
        let leaf = self
            .root
            .leaf(target, true)
            .map_err(|e| entry_err(raw, e))?;
        self.stats.whiteouts += 1;
        match leaf.stat().map_err(|e| entry_err(raw, e))? {
            // Same-layer entries for the path come first here: a directory becomes opaque, and
            // anything else already hides what is below.
            Some(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
                let fd = leaf.open_dir().map_err(|e| entry_err(raw, e))?;
                whiteout::set_opaque(&fd, self.opts.opaque_ns)
                    .map_err(|e| entry_err(raw, format!("set the opaque xattr: {e}")))
            }
            Some(_) => Ok(()),
            None => {
                whiteout::make_whiteout(&leaf.dir, &leaf.name)
                    .map_err(|e| entry_err(raw, format!("make the whiteout device: {e}")))?;
                self.whiteouts.insert(target.clone());
                Ok(())
            }
        }
    }

    fn directory(
        &mut self,
        leaf: Leaf,
        path: LayerPath,
        meta: Meta,
        opaque: bool,
        raw: &[u8],
    ) -> Result<(), ExtractError> {
        let fd = leaf.open_dir().map_err(|e| entry_err(raw, e))?;
        self.apply_meta(Target::Fd(fd.as_fd()), &meta, Perms::Leave, false, raw)?;
        if opaque {
            whiteout::set_opaque(&fd, self.opts.opaque_ns)
                .map_err(|e| entry_err(raw, format!("set the opaque xattr: {e}")))?;
            self.stats.opaques += 1;
        }
        self.defer_dir(path, &fd, meta, raw)
    }

    fn regular<R: Read>(
        &mut self,
        leaf: &Leaf,
        entry: &mut tar::Entry<'_, R>,
        meta: Meta,
        sparse: bool,
        pax_sparse: Option<u64>,
        raw: &[u8],
    ) -> Result<(), ExtractError> {
        let fd = self.create_replacing(leaf, raw, "create", || {
            rustix::fs::openat(
                &leaf.dir,
                leaf.name.as_c_str(),
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(meta.mode & 0o777),
            )
        })?;
        let mut file = std::fs::File::from(fd);
        let written = match pax_sparse {
            Some(real) => self.write_pax_sparse(&mut file, entry, real, raw)?,
            None => {
                let expected = entry.size();
                let n = self
                    .copy_data(&mut file, entry, sparse)
                    .map_err(|e| data_err(raw, e))?;
                if n != expected {
                    return Err(entry_err(
                        raw,
                        format!("the archive is truncated: {n} of {expected} bytes of data"),
                    ));
                }
                n
            }
        };
        self.stats.bytes += written;
        // The permission bits came with the create (no chmod per file).
        self.apply_meta(Target::Fd(file.as_fd()), &meta, Perms::Created, true, raw)
    }

    /// Copy an entry's data into `file`; with `sparse`, runs of zero blocks become holes.
    fn copy_data(
        &mut self,
        file: &mut std::fs::File,
        r: &mut impl Read,
        sparse: bool,
    ) -> io::Result<u64> {
        let mut total = 0u64;
        let mut hole = false;
        loop {
            let n = match r.read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if sparse && self.buf[..n].iter().all(|&b| b == 0) {
                rustix::fs::seek(&*file, rustix::fs::SeekFrom::Current(n as i64))?;
                hole = true;
            } else {
                file.write_all(&self.buf[..n])?;
                hole = false;
            }
            total += n as u64;
        }
        if hole {
            file.set_len(total)?;
        }
        Ok(total)
    }

    /// GNU PAX sparse format 1.0: the data starts with a decimal map (count, then offset and
    /// size per chunk, one number a line), padded to 512 bytes; then the chunks back to back.
    fn write_pax_sparse(
        &mut self,
        file: &mut std::fs::File,
        entry: &mut impl Read,
        real: u64,
        raw: &[u8],
    ) -> Result<u64, ExtractError> {
        let mut consumed = 0u64;
        let mut read_number = |entry: &mut dyn Read| -> Result<u64, ExtractError> {
            let mut digits = Vec::new();
            loop {
                let mut b = [0u8; 1];
                entry.read_exact(&mut b).map_err(|e| data_err(raw, e))?;
                consumed += 1;
                if b[0] == b'\n' {
                    break;
                }
                if !b[0].is_ascii_digit() || digits.len() > 20 {
                    return Err(entry_err(raw, "bad PAX sparse map"));
                }
                digits.push(b[0]);
            }
            std::str::from_utf8(&digits)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| entry_err(raw, "bad PAX sparse map"))
        };
        let count = read_number(entry)?;
        // The map is held whole before the data: bound it (16 bytes a chunk).
        if count > MAX_SPARSE_CHUNKS {
            return Err(entry_err(
                raw,
                format!(
                    "PAX sparse map lists {count} chunks, more than the {MAX_SPARSE_CHUNKS} \
                     allowed"
                ),
            ));
        }
        let mut chunks = Vec::new();
        for _ in 0..count {
            let off = read_number(entry)?;
            let len = read_number(entry)?;
            chunks.push((off, len));
        }
        let pad = (512 - consumed % 512) % 512;
        io::copy(&mut entry.take(pad), &mut io::sink()).map_err(|e| data_err(raw, e))?;
        let mut written = 0;
        for (off, len) in chunks {
            if off.checked_add(len).is_none_or(|end| end > real) {
                return Err(entry_err(raw, "PAX sparse chunk beyond the file's size"));
            }
            rustix::fs::seek(&*file, rustix::fs::SeekFrom::Start(off))
                .map_err(|e| entry_err(raw, e))?;
            let n = io::copy(&mut entry.take(len), file).map_err(|e| data_err(raw, e))?;
            if n != len {
                return Err(entry_err(
                    raw,
                    "the archive is truncated inside a sparse file",
                ));
            }
            written += n;
        }
        file.set_len(real).map_err(|e| entry_err(raw, e))?;
        Ok(written)
    }

    fn hardlink<R: Read>(
        &mut self,
        leaf: &Leaf,
        entry: &tar::Entry<'_, R>,
        raw: &[u8],
    ) -> Result<(), ExtractError> {
        let target_raw = entry
            .link_name_bytes()
            .ok_or_else(|| entry_err(raw, "hardlink without a target"))?
            .into_owned();
        let target = LayerPath::parse(&target_raw).map_err(|e| {
            entry_err(
                raw,
                format!("hardlink target \"{}\": {e}", display_bytes(&target_raw)),
            )
        })?;
        let missing = || {
            entry_err(
                raw,
                format!(
                    "hardlink target \"{}\" is not in the layer",
                    display_bytes(&target_raw)
                ),
            )
        };
        let tleaf = self.root.leaf(&target, false).map_err(|_| missing())?;
        let st = tleaf
            .stat()
            .map_err(|e| entry_err(raw, e))?
            .ok_or_else(missing)?;
        if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
            return Err(entry_err(
                raw,
                format!(
                    "hardlink target \"{}\" is a directory",
                    display_bytes(&target_raw)
                ),
            ));
        }
        // A 0/0 char device on disk is a whiteout (made by this layer's `.wh.` entries): the
        // target is deleted, and linking it would silently white out the new name too.
        if FileType::from_raw_mode(st.st_mode) == FileType::CharacterDevice && st.st_rdev == 0 {
            return Err(entry_err(
                raw,
                format!(
                    "hardlink target \"{}\" is a whiteout (deleted in this layer), not a file",
                    display_bytes(&target_raw)
                ),
            ));
        }
        // No AT_SYMLINK_FOLLOW: a link to a symlink links the symlink itself.
        self.create_replacing(leaf, raw, "hardlink", || {
            rustix::fs::linkat(
                &tleaf.dir,
                tleaf.name.as_c_str(),
                &leaf.dir,
                leaf.name.as_c_str(),
                rustix::fs::AtFlags::empty(),
            )
        })
    }

    fn special<R: Read>(
        &mut self,
        leaf: &Leaf,
        entry: &tar::Entry<'_, R>,
        meta: Meta,
        raw: &[u8],
    ) -> Result<(), ExtractError> {
        let h = entry.header();
        let (ft, dev) = match h.entry_type() {
            tar::EntryType::Fifo => (FileType::Fifo, 0),
            t => {
                let major = h
                    .device_major()
                    .map_err(|e| entry_err(raw, e))?
                    .unwrap_or(0);
                let minor = h
                    .device_minor()
                    .map_err(|e| entry_err(raw, e))?
                    .unwrap_or(0);
                let ft = if t == tar::EntryType::Char {
                    FileType::CharacterDevice
                } else {
                    FileType::BlockDevice
                };
                (ft, rustix::fs::makedev(major, minor))
            }
        };
        let mknod = || {
            rustix::fs::mknodat(
                &leaf.dir,
                leaf.name.as_c_str(),
                ft,
                Mode::from_raw_mode(0o600),
                dev,
            )
        };
        let made = match mknod() {
            Err(rustix::io::Errno::EXIST) => {
                self.replace(leaf, raw)?;
                mknod()
            }
            r => r,
        };
        match made {
            Ok(()) => {}
            Err(rustix::io::Errno::PERM) if ft != FileType::Fifo => {
                // Rootless: real devices can't be made. Counted and reported, never silent.
                self.stats.skipped_devices += 1;
                return Ok(());
            }
            Err(e) => return Err(entry_err(raw, format!("mknod: {e}"))),
        }
        let target = Target::At(leaf.dir.as_fd(), &leaf.name);
        self.apply_meta(target, &meta, Perms::Set, true, raw)
    }

    /// Give an entry its owner (as the policy says) and xattrs, then its mode as `perms` says
    /// and, with `times`, its times.
    fn apply_meta(
        &mut self,
        target: Target<'_>,
        meta: &Meta,
        perms: Perms,
        times: bool,
        raw: &[u8],
    ) -> Result<(), ExtractError> {
        let how = How {
            owner: match self.opts.owners {
                OwnerPolicy::Preserve => Owner::Chown,
                OwnerPolicy::Record => Owner::Record,
            },
            owner_now: self.creator,
            xattrs: Xattrs::Add,
            skip_refused_xattrs: true,
            perms,
            times,
        };
        let done = apply::apply(target, meta, &how).map_err(|e| apply_err(raw, e))?;
        self.stats.skipped_xattrs += done.skipped_xattrs;
        Ok(())
    }

    /// Remember a directory's mode and times for [`Self::finish_dirs`]: set now, they would
    /// block writing below it (a 0555 dir) or be bumped by every entry made in it.
    fn defer_dir(
        &mut self,
        path: LayerPath,
        fd: &impl AsFd,
        meta: Meta,
        raw: &[u8],
    ) -> Result<(), ExtractError> {
        let id = dir_id(fd).map_err(|e| entry_err(raw, e))?;
        self.dirs.push(DeferredDir { path, meta, id });
        Ok(())
    }

    fn finish_dirs(&mut self) -> Result<(), ExtractError> {
        for d in std::mem::take(&mut self.dirs) {
            let raw = d.path.as_bytes().to_vec();
            let fd: OwnedFd = if d.path.is_root() {
                rustix::fs::openat(
                    self.root.fd(),
                    c".",
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| entry_err(&raw, e))?
            } else {
                // A later entry may have replaced the directory, or a parent of it (even by a
                // symlink to another directory): its metadata went with it, and must not land
                // on whatever the path leads to now.
                let Ok(leaf) = self.root.leaf(&d.path, false) else {
                    continue;
                };
                match leaf.open_dir() {
                    Ok(fd) => fd,
                    Err(e)
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::ENOTDIR | libc::ELOOP | libc::ENOENT)
                        ) =>
                    {
                        continue;
                    }
                    Err(e) => return Err(entry_err(&raw, e)),
                }
            };
            if dir_id(&fd).map_err(|e| entry_err(&raw, e))? != d.id {
                continue;
            }
            let how = How {
                owner: Owner::Leave,
                owner_now: None,
                xattrs: Xattrs::Leave,
                skip_refused_xattrs: false,
                perms: Perms::Set,
                times: true,
            };
            apply::apply(Target::Fd(fd.as_fd()), &d.meta, &how).map_err(|e| apply_err(&raw, e))?;
        }
        Ok(())
    }
}

/// An owner id from a header: 32 bits, and not 2^32-1, which chown reads as "leave unchanged"
/// (the file would silently keep our owner).
fn owner_id(raw: &[u8], what: &str, id: u64) -> Result<u32, ExtractError> {
    match u32::try_from(id) {
        Ok(u32::MAX) => Err(entry_err(
            raw,
            format!("{what} {id} is not a valid owner (chown reads it as \"unchanged\")"),
        )),
        Ok(v) => Ok(v),
        Err(_) => Err(entry_err(
            raw,
            format!("{what} {id} does not fit in 32 bits"),
        )),
    }
}

/// (device, inode) of an open directory.
fn dir_id(fd: &impl AsFd) -> io::Result<(u64, u64)> {
    let st = rustix::fs::fstat(fd)?;
    Ok((st.st_dev, st.st_ino))
}

fn apply_err(raw: &[u8], e: ApplyError) -> ExtractError {
    match e.step {
        Step::Owner { uid, gid } if e.source.raw_os_error() == Some(libc::EINVAL) => entry_err(
            raw,
            format!("owner {uid}:{gid} is not mapped in this user namespace"),
        ),
        step => entry_err(raw, format!("{step}: {}", e.source)),
    }
}

fn data_err(raw: &[u8], e: io::Error) -> ExtractError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        entry_err(raw, "the archive is truncated inside this entry's data")
    } else {
        entry_err(raw, format!("reading data: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_header(kind: tar::EntryType, mode: u32, mtime: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(mtime);
        h.set_size(0);
        h
    }

    fn extract_into(dir: &std::path::Path, tar: Vec<u8>) -> Result<ExtractStats, ExtractError> {
        let root = Root::open(dir).unwrap();
        let owners = if rustix::process::geteuid().is_root() {
            OwnerPolicy::Preserve
        } else {
            OwnerPolicy::Record
        };
        extract(
            &tar[..],
            &root,
            ExtractOptions {
                opaque_ns: XattrNs::User,
                owners,
            },
        )
    }

    #[test]
    fn deferred_directory_metadata_never_lands_on_another_directory() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let mut b = tar::Builder::new(Vec::new());
        for (path, mode, mtime) in [
            ("x/", 0o755, 3),
            ("x/b/", 0o751, 4),
            ("a/", 0o755, 1),
            ("a/b/", 0o700, 2),
        ] {
            b.append_data(
                &mut test_header(tar::EntryType::Directory, mode, mtime),
                path,
                std::io::empty(),
            )
            .unwrap();
        }
        // `a` becomes a symlink to `x`: `a/b` now leads to `x/b`, which must keep its own mode.
        let mut h = test_header(tar::EntryType::Symlink, 0o777, 5);
        b.append_link(&mut h, "a", "x").unwrap();
        let t = tempfile::tempdir().unwrap();
        extract_into(t.path(), b.into_inner().unwrap()).unwrap();
        let xb = std::fs::metadata(t.path().join("x/b")).unwrap();
        assert_eq!((xb.permissions().mode() & 0o7777, xb.mtime()), (0o751, 4));
    }

    #[test]
    fn an_owner_of_minus_one_is_refused() {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = test_header(tar::EntryType::Regular, 0o644, 1);
        h.set_uid(u64::from(u32::MAX));
        b.append_data(&mut h, "f", std::io::empty()).unwrap();
        let t = tempfile::tempdir().unwrap();
        let err = extract_into(t.path(), b.into_inner().unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("4294967295") && err.contains("\"f\""), "{err}");
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
    }

    /// `head`, then zeros up to `total` bytes, produced lazily; counts what was read.
    struct Lazy {
        head: Vec<u8>,
        total: u64,
        pos: Rc<Cell<u64>>,
    }

    impl Read for Lazy {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let pos = self.pos.get();
            let n = buf.len().min((self.total - pos) as usize);
            for (i, b) in buf[..n].iter_mut().enumerate() {
                *b = self.head.get(pos as usize + i).copied().unwrap_or(0);
            }
            self.pos.set(pos + n as u64);
            Ok(n)
        }
    }

    fn header(mut h: tar::Header, name: &[u8], kind: tar::EntryType, size: u64) -> Vec<u8> {
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(0o644);
        h.set_cksum();
        h.as_bytes().to_vec()
    }

    /// A PAX header, a GNU long name, or an extension header tar-rs does not apply (no magic),
    /// declared 1 GiB long: refused after a bounded read, never buffered whole.
    #[test]
    fn huge_extension_headers_are_refused_unread() {
        let cases = [
            (tar::Header::new_ustar(), tar::EntryType::XHeader),
            (tar::Header::new_gnu(), tar::EntryType::GNULongName),
            (tar::Header::new_gnu(), tar::EntryType::GNULongLink),
            (tar::Header::new_old(), tar::EntryType::XHeader),
        ];
        for (h, kind) in cases {
            let t = tempfile::tempdir().unwrap();
            let root = Root::open(t.path()).unwrap();
            let pos = Rc::new(Cell::new(0));
            let lazy = Lazy {
                head: header(h, b"hdr", kind, 1 << 30),
                total: (1 << 30) + 4096,
                pos: pos.clone(),
            };
            let opts = ExtractOptions {
                opaque_ns: XattrNs::User,
                owners: OwnerPolicy::Record,
            };
            let err = extract(lazy, &root, opts).unwrap_err();
            // The message and its cause (a read error says only "reading the archive").
            let err = match std::error::Error::source(&err) {
                Some(cause) => format!("{err}: {cause}"),
                None => err.to_string(),
            };
            assert!(
                pos.get() <= MAX_ENTRY_HEADERS + 512,
                "{kind:?}: read {} bytes ({err})",
                pos.get()
            );
            assert!(
                err.contains("MiB") || err.contains("extension header"),
                "{kind:?}: {err}"
            );
        }
    }

    #[test]
    fn libarchive_xattrs() {
        assert_eq!(
            libarchive_xattr(b"user.a%3Db", b"aGVsbG8="),
            Some(("user.a=b".into(), b"hello".to_vec()))
        );
        assert_eq!(base64_decode(b"AAEC"), Some(vec![0, 1, 2]));
        assert_eq!(base64_decode(b"AA"), Some(vec![0]));
    }
}
