//! Extracting a layer tar stream into a root, exactly and safely.
//!
//! Owns the one extractor every tool uses ([`crate::tarin`] parses the stream: every dialect
//! GNU tar and bsdtar read). Every path is resolved inside the [`Root`] and every final component is touched
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

use std::collections::{HashMap, HashSet};
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use rustix::fs::{FileType, Mode, OFlags, Timespec};

use crate::apply::{self, ApplyError, How, Meta, Owner, Perms, Step, Target, Xattrs};
use crate::owners;
use crate::path::{LayerPath, PathError, display_bytes, display_str};
use crate::root::{Leaf, Root};
use crate::tarin::{Header, Kind, TarError, TarReader};
use crate::whiteout::{self, OciName, XattrNs};
use crate::writers::{Direct, DirectFile, Writers};

mod defer;
pub use defer::{Pending, Resolved, extract_deferred};

/// What to do with the owners the archive names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnerPolicy {
    /// chown to the archive's ids (real root, or a user namespace that maps them).
    Preserve,
    /// Leave files to the caller and record the archive's owner (and, for files and
    /// directories, the mode) in xattrs: fuse-overlayfs' override_stat, which it presents, and
    /// umoci's `user.rootlesscontainers` (no subordinate ids; see `crate::owners`).
    Record,
}

#[derive(Debug, Clone)]
pub struct ExtractOptions {
    /// Where opaque-directory xattrs go.
    pub opaque_ns: XattrNs,
    pub owners: OwnerPolicy,
    /// With [`OwnerPolicy::Preserve`]: chown to the host ids this map gives the archive's
    /// owners (`ovl-import --uidmap`); an owner outside the map is an error naming the entry.
    pub shift: Option<std::sync::Arc<crate::idmap::RootlessMaps>>,
    /// Threads writing file content (see the `writers` module); 1: the reading thread writes
    /// everything itself. Either way the tree is the same.
    pub writers: usize,
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
    /// Entries that are not files and were left out: vendor and unknown types (a Solaris ACL),
    /// 0/0 character devices (an overlay whiteout cannot be content).
    pub skipped_entries: u64,
    /// Hardlinks to a file only a lower layer holds, given their own copy of it.
    pub lower_link_copies: u64,
    /// What was skipped, one line each (the path escaped), at most `MAX_NOTES`.
    pub notes: Vec<String>,
}

/// The most skipped entries named in [`ExtractStats::notes`] (the count is always exact).
pub(crate) const MAX_NOTES: usize = 100;

impl ExtractStats {
    pub fn add(&mut self, o: &ExtractStats) {
        self.entries += o.entries;
        self.bytes += o.bytes;
        self.whiteouts += o.whiteouts;
        self.opaques += o.opaques;
        self.skipped_devices += o.skipped_devices;
        self.skipped_xattrs += o.skipped_xattrs;
        self.skipped_entries += o.skipped_entries;
        self.lower_link_copies += o.lower_link_copies;
        let room = MAX_NOTES.saturating_sub(self.notes.len());
        self.notes.extend(o.notes.iter().take(room).cloned());
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    #[error("reading the archive")]
    Read(#[source] io::Error),
    #[error("entry \"{entry}\": {reason}")]
    Entry { entry: String, reason: String },
}

/// A read error of the archive, its text escaped: a message may quote bytes of the archive.
fn read_err(e: io::Error) -> ExtractError {
    let text = e.to_string();
    let shown = display_str(&text);
    ExtractError::Read(if shown == text {
        e
    } else {
        io::Error::new(e.kind(), shown)
    })
}

pub(crate) fn entry_err(raw: &[u8], reason: impl std::fmt::Display) -> ExtractError {
    ExtractError::Entry {
        entry: display_bytes(raw),
        // A reason may quote the archive (a PAX record, a link target).
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
    /// The layers below this one, top first (an image's earlier layers): implicit parent
    /// directories and hardlinks to files this layer does not hold are looked up there.
    lowers: Vec<Root>,
    stats: ExtractStats,
    dirs: Vec<DeferredDir>,
    /// Whiteouts this layer made: an entry for the same path later turns them into content
    /// (and a directory into an opaque one); an opaque directory of this layer drops those
    /// below it.
    whiteouts: HashSet<LayerPath>,
    /// Directories this layer made opaque: a whiteout below one hides nothing and would show
    /// up as a broken entry in the merged view, so it is never made.
    opaque_dirs: HashSet<LayerPath>,
    /// Hardlink targets only a lower layer holds -> the copy this layer made of it.
    lower_copies: HashMap<LayerPath, LayerPath>,
    /// Who writes the content of regular files and gives them their metadata.
    writers: Writers,
    /// When the stream is a plain tar file: the file, to copy bigger files' data from.
    direct: Option<Direct>,
    /// The last parent directory opened, reused while entries stay in it.
    parent_cache: Option<(LayerPath, Arc<OwnedFd>)>,
    /// The ids new files get without a chown (ours; the root is not setgid, see `extract`).
    creator: Option<(u32, u32)>,
    /// Extracting before the layers below are complete: what needs them is put off
    /// ([`extract_deferred`]).
    defer: Option<defer::Deferrals>,
}

/// Extract the tar stream `reader` into `root`.
#[cfg(test)]
pub(crate) fn extract<R: Read>(
    reader: R,
    root: &Root,
    opts: ExtractOptions,
) -> Result<ExtractStats, ExtractError> {
    extract_onto(reader, root, opts, &[])
}

/// Extract the tar stream `reader` into `root`, a layer that goes on top of `lowers` (top
/// first). Parent directories the stream does not list take their owner, mode, times and
/// xattrs from the nearest lower that has them (else 0755, root, mtime 0), and a hardlink to a
/// file only a lower holds gets a copy of that file.
pub fn extract_onto<R: Read>(
    reader: R,
    root: &Root,
    opts: ExtractOptions,
    lowers: &[std::path::PathBuf],
) -> Result<ExtractStats, ExtractError> {
    let ex = Extractor::new(root, opts, lowers)?;
    // Files are created with their final permission bits (no chmod per file), so no umask.
    let _umask = crate::umask::NoUmask::enter();
    ex.run(reader)
}

/// [`extract_onto`] from a plain (uncompressed) tar file: the data of its bigger files is
/// copied from the file straight into the new ones, never read into memory. `progress` counts
/// the bytes of the file read or passed over.
pub fn extract_file_onto(
    file: std::fs::File,
    root: &Root,
    opts: ExtractOptions,
    lowers: &[std::path::PathBuf],
    progress: Option<std::sync::Arc<crate::progress::Progress>>,
) -> Result<ExtractStats, ExtractError> {
    let (reader, direct) = DirectFile::new(file, progress).map_err(ExtractError::Read)?;
    let mut ex = Extractor::new(root, opts, lowers)?;
    ex.direct = Some(direct);
    let _umask = crate::umask::NoUmask::enter();
    ex.run(reader)
}

fn tar_err(e: TarError) -> ExtractError {
    match e {
        TarError::Io(e) => read_err(e),
        TarError::Stream(s) => read_err(io::Error::new(io::ErrorKind::InvalidData, s)),
        TarError::Entry { path, reason } => entry_err(&path, reason),
    }
}

impl<'a> Extractor<'a> {
    fn new(
        root: &'a Root,
        opts: ExtractOptions,
        lowers: &[std::path::PathBuf],
    ) -> Result<Extractor<'a>, ExtractError> {
        let lowers = lowers
            .iter()
            .map(|p| Root::open(p))
            .collect::<io::Result<Vec<_>>>()
            .map_err(ExtractError::Read)?;
        // New files get our ids unless the root is setgid (then its group): only skip chowns
        // that could not change anything.
        let root_st = rustix::fs::fstat(root.fd()).map_err(|e| ExtractError::Read(e.into()))?;
        let creator = (root_st.st_mode & libc::S_ISGID == 0).then(|| {
            (
                rustix::process::geteuid().as_raw(),
                rustix::process::getegid().as_raw(),
            )
        });
        let policy = MetaPolicy {
            opts: opts.clone(),
            creator,
        };
        let writers = Writers::new(opts.writers.max(1), policy).map_err(ExtractError::Read)?;
        Ok(Extractor {
            root,
            opts,
            lowers,
            stats: ExtractStats::default(),
            dirs: Vec::new(),
            whiteouts: HashSet::new(),
            opaque_dirs: HashSet::new(),
            lower_copies: HashMap::new(),
            writers,
            direct: None,
            parent_cache: None,
            creator,
            defer: None,
        })
    }

    fn run<R: Read>(mut self, reader: R) -> Result<ExtractStats, ExtractError> {
        self.run_entries(reader)?;
        Ok(self.stats)
    }

    /// Every entry, then the directories' deferred metadata (and the root's owner record).
    /// Stops early when a deferred extraction finds it must be redone.
    fn run_entries<R: Read>(&mut self, reader: R) -> Result<(), ExtractError> {
        let read = self.read_all(reader);
        // The files' data and metadata are in before any directory gets its mode and times;
        // of a reading and a writing error, the earlier entry's is the one reported.
        match (read, self.writers.finish()) {
            (Ok(()), Ok(skipped)) => self.stats.skipped_xattrs += skipped,
            (Err((_, e)), Ok(_)) => return Err(e),
            (Err((at, e)), Err((w_at, w))) => return Err(if w_at < at { w } else { e }),
            (Ok(()), Err((_, w))) => return Err(w),
        }
        if self.defer.as_ref().is_some_and(|d| d.redo) {
            return Ok(());
        }
        self.finish_dirs()?;
        if self.opts.owners == OwnerPolicy::Record {
            self.record_root_override()?;
        }
        Ok(())
    }
}

impl Extractor<'_> {
    /// Every entry, in order; an error comes with the place of its entry. Stops early when a
    /// writer failed (its error is the one reported) or a deferred extraction must be redone.
    fn read_all<R: Read>(&mut self, reader: R) -> Result<(), (u64, ExtractError)> {
        let mut tar = TarReader::new(reader);
        // The entry read or being read: after any whose file a writer has.
        let at = |n: u64| move |e| (n + 1, e);
        while let Some(h) = tar
            .next_entry()
            .map_err(tar_err)
            .map_err(at(self.stats.entries))?
        {
            self.entry(&h, &mut tar).map_err(at(self.stats.entries))?;
            if self.writers.failed() || self.defer.as_ref().is_some_and(|d| d.redo) {
                break;
            }
        }
        Ok(())
    }

    /// Note something skipped, for the summary (the count is exact, the names are bounded).
    fn note(&mut self, raw: &[u8], what: &str) {
        self.stats.skipped_entries += 1;
        if self.stats.notes.len() < MAX_NOTES {
            self.stats
                .notes
                .push(format!("\"{}\": {what}", display_bytes(raw)));
        }
    }

    fn entry<R: Read>(&mut self, h: &Header, data: &mut TarReader<R>) -> Result<(), ExtractError> {
        let raw = h.path.as_slice();
        match h.kind {
            // A volume label names the archive, not a file.
            Kind::VolumeLabel => return Ok(()),
            Kind::Other(t) => {
                let what = match t {
                    b'A' => "a Solaris ACL entry (type A)".to_string(),
                    b'N' => "an old GNU long-names entry (type N)".to_string(),
                    t if t.is_ascii_graphic() => {
                        format!("an entry of unknown type {:?}", t as char)
                    }
                    t => format!("an entry of unknown type byte {t}"),
                };
                self.note(raw, &format!("{what}, skipped"));
                return Ok(());
            }
            _ => {}
        }
        let meta = self.meta(h)?;
        let path = LayerPath::parse(raw).map_err(|e: PathError| entry_err(raw, e))?;
        self.stats.entries += 1;

        let (parent, base) = match path.split_last() {
            Some(x) => x,
            None => return self.root_entry(h.kind, meta, raw),
        };
        match whiteout::classify_oci_name(base).map_err(|e| entry_err(raw, e))? {
            OciName::Opaque => return self.opaque_marker(&parent, raw),
            OciName::Whiteout(target) => return self.whiteout(&parent.join(target), raw),
            OciName::Plain => {}
        }
        // A 0/0 character device is how an overlay layer spells a whiteout: as content it would
        // hide the lower file, so it cannot be represented.
        if h.kind == Kind::CharDevice && h.dev_major == 0 && h.dev_minor == 0 {
            self.stats.entries -= 1;
            self.note(
                raw,
                "a 0/0 character device is an overlay whiteout, not content: skipped",
            );
            return Ok(());
        }

        let leaf = self.leaf(&path, raw)?;
        let was_whiteout = !self.whiteouts.is_empty() && self.whiteouts.remove(&path);
        if h.kind == Kind::Directory {
            // A directory entry keeps a directory that is already there (its metadata is
            // updated), and replaces anything else.
            match rustix::fs::mkdirat(&leaf.dir, leaf.name.as_c_str(), Mode::from_raw_mode(0o700)) {
                Ok(()) => {}
                Err(rustix::io::Errno::EXIST) => {
                    let is_dir = leaf
                        .stat()
                        .map_err(|e| entry_err(raw, e))?
                        .is_some_and(|st| {
                            FileType::from_raw_mode(st.st_mode) == FileType::Directory
                        });
                    if !is_dir {
                        self.replace(&leaf, raw)?;
                        rustix::fs::mkdirat(
                            &leaf.dir,
                            leaf.name.as_c_str(),
                            Mode::from_raw_mode(0o700),
                        )
                        .map_err(|e| entry_err(raw, format!("mkdir: {e}")))?;
                    }
                }
                Err(e) => return Err(entry_err(raw, format!("mkdir: {e}"))),
            }
            if was_whiteout {
                self.made_opaque(&path, raw)?;
            }
            return self.directory(leaf, path, meta, was_whiteout, raw);
        }
        match h.kind {
            Kind::Regular => self.regular(&leaf, h, data, meta, raw),
            Kind::Symlink => {
                if h.link.is_empty() {
                    return Err(entry_err(raw, "symlink without a target"));
                }
                let target = h.link.as_slice();
                self.create_replacing(&leaf, raw, "symlink", || {
                    rustix::fs::symlinkat(
                        std::ffi::OsStr::from_bytes(target),
                        &leaf.dir,
                        leaf.name.as_c_str(),
                    )
                })?;
                let target = Target::At(leaf.dir.as_fd(), &leaf.name);
                self.apply_meta(target, &meta, Perms::Leave, true, raw)
            }
            Kind::Hardlink => self.hardlink(&leaf, &path, &h.link, raw),
            Kind::CharDevice | Kind::BlockDevice | Kind::Fifo => self.special(&leaf, h, meta, raw),
            Kind::Directory | Kind::VolumeLabel | Kind::Other(_) => unreachable!("handled above"),
        }
    }

    /// The leaf for `path`, with its parent directory fd reused from the previous entry when
    /// it is the same directory (archives list a directory's entries together). Missing
    /// parents are made as implicit directories.
    fn leaf(&mut self, path: &LayerPath, raw: &[u8]) -> Result<Leaf, ExtractError> {
        let (parent, name) = path.split_last().expect("not the root");
        let dir = match &self.parent_cache {
            Some((p, fd)) if *p == parent => fd.clone(),
            _ => {
                let fd = Arc::new(self.open_dir_making(&parent, raw)?);
                self.parent_cache = Some((parent, fd.clone()));
                fd
            }
        };
        Leaf::new(dir, name).map_err(|e| entry_err(raw, e))
    }

    /// Open directory `p` (an `O_PATH` fd), making what is missing as implicit directories.
    fn open_dir_making(&mut self, p: &LayerPath, raw: &[u8]) -> Result<OwnedFd, ExtractError> {
        match self.root.open_dir(p, false) {
            Ok(fd) => Ok(fd),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => self.make_parents(p, raw),
            // Not a directory, or a dangling symlink: let the root say which.
            Err(_) => self.root.open_dir(p, true).map_err(|e| entry_err(raw, e)),
        }
    }

    /// Make the directories of `p` that are missing, one at a time, each an implicit directory
    /// (see [`Self::implicit_dir`]); the directory `p` (an `O_PATH` fd).
    fn make_parents(&mut self, p: &LayerPath, raw: &[u8]) -> Result<OwnedFd, ExtractError> {
        let mut prefix = LayerPath::root();
        let mut fd = None;
        for comp in p.components() {
            prefix = prefix.join(comp);
            fd = Some(match self.root.open_dir(&prefix, false) {
                Ok(fd) => fd,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    // The parents exist: this makes the one missing directory (or says why a
                    // dangling symlink is in the way).
                    let made = self
                        .root
                        .open_dir(&prefix, true)
                        .map_err(|e| entry_err(raw, e))?;
                    self.implicit_dir(&prefix, raw)?;
                    made
                }
                Err(_) => self
                    .root
                    .open_dir(&prefix, true)
                    .map_err(|e| entry_err(raw, e))?,
            });
        }
        fd.ok_or_else(|| entry_err(raw, "no parent directory"))
    }

    /// A directory the archive does not list but an entry below it needs. In the merged view
    /// it shadows the directory of the layers below, so it takes that directory's owner, mode,
    /// times and xattrs (as umoci's unpack leaves them); with no such directory it is 0755,
    /// owned by root, mtime 0: the same on every import.
    fn implicit_dir(&mut self, path: &LayerPath, raw: &[u8]) -> Result<(), ExtractError> {
        if let Some(d) = &mut self.defer {
            return d.implicit_dir(self.root, path, raw);
        }
        let meta = self.implicit_meta(path, raw)?;
        let leaf = self.root.leaf(path, false).map_err(|e| entry_err(raw, e))?;
        let fd = leaf.open_dir().map_err(|e| entry_err(raw, e))?;
        self.apply_meta(Target::Fd(fd.as_fd()), &meta, Perms::Leave, false, raw)?;
        self.defer_dir(path.clone(), &fd, meta, raw)
    }

    /// The metadata of the implicit directory `path`: the nearest lower directory's, or the
    /// fixed default.
    fn implicit_meta(&self, path: &LayerPath, raw: &[u8]) -> Result<Meta, ExtractError> {
        let mut meta = Meta {
            uid: 0,
            gid: 0,
            mode: 0o755,
            mtime: Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            atime: Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            xattrs: Vec::new(),
        };
        if let Some((leaf, st)) = self.lower_entry(path)
            && FileType::from_raw_mode(st.st_mode) == FileType::Directory
        {
            meta = self.lower_meta(&leaf, &st, raw)?;
        }
        Ok(meta)
    }

    /// The metadata of an entry of a lower layer, to give a copy of it in this one.
    fn lower_meta(
        &self,
        leaf: &Leaf,
        st: &rustix::fs::Stat,
        raw: &[u8],
    ) -> Result<Meta, ExtractError> {
        let xattrs = leaf
            .xattrs()
            .map_err(|e| entry_err(raw, format!("reading a lower layer's xattrs: {e}")))?;
        // The overlay's own xattrs are the lower layer's markers, not content.
        let xattrs = whiteout::public_xattrs(&xattrs);
        let (uid, gid) = match self.opts.owners {
            OwnerPolicy::Preserve => (st.st_uid, st.st_gid),
            // The owner is in the user.rootlesscontainers xattr, copied with the others.
            OwnerPolicy::Record => (0, 0),
        };
        let mtime = Timespec {
            tv_sec: st.st_mtime,
            tv_nsec: st.st_mtime_nsec as _,
        };
        Ok(Meta {
            uid,
            gid,
            mode: st.st_mode & 0o7777,
            mtime,
            atime: Timespec {
                tv_sec: st.st_atime,
                tv_nsec: st.st_atime_nsec as _,
            },
            xattrs,
        })
    }

    /// What the layers below show at `p` (the nearest that has it, unless a whiteout, a
    /// non-directory or an opaque directory on the way hides it).
    fn lower_entry(&self, p: &LayerPath) -> Option<(Leaf, rustix::fs::Stat)> {
        for lower in &self.lowers {
            if let Ok(leaf) = lower.leaf(p, false)
                && let Ok(Some(st)) = leaf.stat()
            {
                let ft = FileType::from_raw_mode(st.st_mode);
                if ft == FileType::CharacterDevice && st.st_rdev == 0 {
                    return None;
                }
                return Some((leaf, st));
            }
            // Below this layer, `p` is hidden when one of its parents here is a whiteout, a
            // non-directory or an opaque directory.
            let mut prefix = LayerPath::root();
            let mut parents = vec![LayerPath::root()];
            if let Some((parent, _)) = p.split_last() {
                for c in parent.components() {
                    prefix = prefix.join(c);
                    parents.push(prefix.clone());
                }
            }
            for a in parents {
                let fd = if a.is_root() {
                    lower.open_dir(&a, false).ok().and_then(|_| {
                        rustix::fs::openat(
                            lower.fd(),
                            c".",
                            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                            Mode::empty(),
                        )
                        .ok()
                    })
                } else {
                    let Ok(leaf) = lower.leaf(&a, false) else {
                        break;
                    };
                    match leaf.stat() {
                        Ok(Some(st))
                            if FileType::from_raw_mode(st.st_mode) == FileType::Directory =>
                        {
                            leaf.open_dir().ok()
                        }
                        Ok(Some(_)) => return None,
                        _ => break,
                    }
                };
                let Some(fd) = fd else { break };
                let get = |n: &str| {
                    crate::xattrs::list_fd(&fd).ok().and_then(|l| {
                        l.into_iter()
                            .find(|(k, _)| k.as_slice() == n.as_bytes())
                            .map(|(_, v)| v)
                    })
                };
                if whiteout::dir_is_opaque(&get) {
                    return None;
                }
            }
        }
        None
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

    fn meta(&self, h: &Header) -> Result<Meta, ExtractError> {
        let raw = h.path.as_slice();
        let mtime = h.mtime;
        let mut m = Meta {
            uid: owner_id(raw, "uid", h.uid)?,
            gid: owner_id(raw, "gid", h.gid)?,
            mode: h.mode,
            mtime,
            atime: h.atime.unwrap_or(mtime),
            // Names are bytes, as GNU tar keeps them: not UTF-8 is no reason to drop one.
            xattrs: h.xattrs.clone(),
        };
        // An archive never sets overlay markers on disk: escape them as the kernel documents.
        for (name, _) in &mut m.xattrs {
            if let std::borrow::Cow::Owned(escaped) = whiteout::escape_xattr(name) {
                *name = escaped;
            }
        }
        // An archive does not get to say what owner a rootless mount presents.
        m.xattrs.retain(|(name, _)| !owners::is_owner_record(name));
        // The last record for a name wins.
        m.xattrs.reverse();
        m.xattrs.sort_by(|a, b| a.0.cmp(&b.0));
        m.xattrs.dedup_by(|a, b| a.0 == b.0);
        Ok(m)
    }

    fn root_entry(&mut self, kind: Kind, meta: Meta, raw: &[u8]) -> Result<(), ExtractError> {
        if kind != Kind::Directory {
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
        let fd = self.open_dir_making(dir, raw)?;
        whiteout::set_opaque(&fd, self.opts.opaque_ns)
            .map_err(|e| entry_err(raw, format!("set the opaque xattr: {e}")))?;
        self.stats.opaques += 1;
        self.made_opaque(dir, raw)
    }

    /// `dir` is opaque in this layer: the whiteouts this layer made below it hide nothing
    /// (the lower entries are hidden anyway) and would show in the merged view as broken
    /// entries, so they go; later ones are not made (see [`Self::whiteout`]).
    fn made_opaque(&mut self, dir: &LayerPath, raw: &[u8]) -> Result<(), ExtractError> {
        if !self.opaque_dirs.insert(dir.clone()) {
            return Ok(());
        }
        let below: Vec<LayerPath> = self
            .whiteouts
            .iter()
            .filter(|w| w.starts_with(dir) && *w != dir)
            .cloned()
            .collect();
        for w in below {
            self.whiteouts.remove(&w);
            let Ok(leaf) = self.root.leaf(&w, false) else {
                continue;
            };
            if let Some(st) = leaf.stat().map_err(|e| entry_err(raw, e))?
                && FileType::from_raw_mode(st.st_mode) == FileType::CharacterDevice
                && st.st_rdev == 0
            {
                rustix::fs::unlinkat(
                    &leaf.dir,
                    leaf.name.as_c_str(),
                    rustix::fs::AtFlags::empty(),
                )
                .map_err(|e| entry_err(raw, format!("removing a covered whiteout: {e}")))?;
                self.stats.whiteouts -= 1;
            }
        }
        Ok(())
    }

    /// True when a directory above `p` is opaque in this layer.
    fn under_opaque(&self, p: &LayerPath) -> bool {
        if self.opaque_dirs.is_empty() {
            return false;
        }
        let mut cur = p.split_last().map(|(parent, _)| parent);
        while let Some(d) = cur {
            if self.opaque_dirs.contains(&d) {
                return true;
            }
            cur = d.split_last().map(|(parent, _)| parent);
        }
        false
    }

    fn whiteout(&mut self, target: &LayerPath, raw: &[u8]) -> Result<(), ExtractError> {
        if self.under_opaque(target) {
            return Ok(());
        }
        let leaf = self.leaf(target, raw)?;
        match leaf.stat().map_err(|e| entry_err(raw, e))? {
            // Same-layer entries for the path come first here: a directory becomes opaque, and
            // anything else already hides what is below.
            Some(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
                let fd = leaf.open_dir().map_err(|e| entry_err(raw, e))?;
                whiteout::set_opaque(&fd, self.opts.opaque_ns)
                    .map_err(|e| entry_err(raw, format!("set the opaque xattr: {e}")))?;
                self.stats.whiteouts += 1;
                self.made_opaque(target, raw)
            }
            Some(_) => {
                self.stats.whiteouts += 1;
                Ok(())
            }
            None => {
                whiteout::make_whiteout(&leaf.dir, &leaf.name)
                    .map_err(|e| entry_err(raw, format!("make the whiteout device: {e}")))?;
                self.stats.whiteouts += 1;
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
        if let Some(d) = &mut self.defer {
            d.explicit_dir(&path);
        }
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
        h: &Header,
        data: &mut TarReader<R>,
        meta: Meta,
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
        // The data and metadata go through the fd: the writers (see [`crate::writers`]).
        if h.sparse.is_none()
            && h.size >= crate::writers::DIRECT_MIN
            && let Some(src) = self.direct.as_ref().and_then(|d| d.claim(h.size))
        {
            data.passed_over(h.size);
            let seq = self.stats.entries;
            self.stats.bytes += self.writers.copy(fd, src, h.size, meta, raw, seq)?;
            return Ok(());
        }
        let whole = [(0, h.size)];
        let (chunks, size) = match &h.sparse {
            Some(s) => (&s.chunks[..], Some(s.real_size)),
            None => (&whole[..], None),
        };
        let seq = self.stats.entries;
        self.stats.bytes += self.writers.file(fd, data, chunks, size, meta, raw, seq)?;
        Ok(())
    }

    fn hardlink(
        &mut self,
        leaf: &Leaf,
        path: &LayerPath,
        target_raw: &[u8],
        raw: &[u8],
    ) -> Result<(), ExtractError> {
        if target_raw.is_empty() {
            return Err(entry_err(raw, "hardlink without a target"));
        }
        let target = LayerPath::parse(target_raw).map_err(|e| {
            entry_err(
                raw,
                format!("hardlink target \"{}\": {e}", display_bytes(target_raw)),
            )
        })?;
        let missing = || {
            entry_err(
                raw,
                format!(
                    "hardlink target \"{}\" is not in the layer",
                    display_bytes(target_raw)
                ),
            )
        };
        let here = match self.root.leaf(&target, false) {
            Ok(tleaf) => tleaf
                .stat()
                .map_err(|e| entry_err(raw, e))?
                .map(|st| (tleaf, st)),
            Err(_) => None,
        };
        let (tleaf, st) = match here {
            Some(x) => x,
            None => {
                // A file only a lower layer holds: this layer gets its own copy (links to the
                // same lower file share it).
                if let Some(copy) = self.lower_copies.get(&target).cloned()
                    && let Ok(cleaf) = self.root.leaf(&copy, false)
                    && let Ok(Some(cst)) = cleaf.stat()
                {
                    (cleaf, cst)
                } else if self.defer.is_some() {
                    // The layers below are not complete: a placeholder now, the copy later.
                    self.lower_placeholder(leaf, &target, raw)?;
                    self.lower_copies.insert(target, path.clone());
                    return Ok(());
                } else if let Some((lleaf, lst)) = self.lower_entry(&target) {
                    if FileType::from_raw_mode(lst.st_mode) == FileType::Directory {
                        return Err(entry_err(
                            raw,
                            format!(
                                "hardlink target \"{}\" is a directory",
                                display_bytes(target_raw)
                            ),
                        ));
                    }
                    self.copy_from_lower(leaf, &lleaf, &lst, raw)?;
                    self.lower_copies.insert(target, path.clone());
                    self.stats.lower_link_copies += 1;
                    return Ok(());
                } else {
                    return Err(missing());
                }
            }
        };
        if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
            return Err(entry_err(
                raw,
                format!(
                    "hardlink target \"{}\" is a directory",
                    display_bytes(target_raw)
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
                    display_bytes(target_raw)
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

    /// Make `leaf` a copy of the lower layer's entry `src` (content, owner, mode, times,
    /// xattrs).
    fn copy_from_lower(
        &mut self,
        leaf: &Leaf,
        src: &Leaf,
        st: &rustix::fs::Stat,
        raw: &[u8],
    ) -> Result<(), ExtractError> {
        let meta = self.lower_meta(src, st, raw)?;
        match FileType::from_raw_mode(st.st_mode) {
            FileType::RegularFile => {
                let from = crate::fsops::open_file_at(&src.dir, &src.name)
                    .map_err(|e| entry_err(raw, format!("opening the lower file: {e}")))?;
                let fd = self.create_replacing(leaf, raw, "create", || {
                    rustix::fs::openat(
                        &leaf.dir,
                        leaf.name.as_c_str(),
                        OFlags::WRONLY
                            | OFlags::CREATE
                            | OFlags::EXCL
                            | OFlags::NOFOLLOW
                            | OFlags::CLOEXEC,
                        Mode::from_raw_mode(meta.mode & 0o777),
                    )
                })?;
                let file = std::fs::File::from(fd);
                let n = crate::copy::copy_sparse(&from, &file)
                    .map_err(|e| entry_err(raw, format!("copying the lower file: {e}")))?;
                self.stats.bytes += n;
                // The permission bits came with the create.
                self.apply_meta(Target::Fd(file.as_fd()), &meta, Perms::Created, true, raw)
            }
            FileType::Symlink => {
                let target = rustix::fs::readlinkat(&src.dir, src.name.as_c_str(), Vec::new())
                    .map_err(|e| entry_err(raw, format!("reading the lower symlink: {e}")))?;
                self.create_replacing(leaf, raw, "symlink", || {
                    rustix::fs::symlinkat(target.as_c_str(), &leaf.dir, leaf.name.as_c_str())
                })?;
                let target = Target::At(leaf.dir.as_fd(), &leaf.name);
                self.apply_meta(target, &meta, Perms::Leave, true, raw)
            }
            ft => {
                let mknod = || {
                    rustix::fs::mknodat(
                        &leaf.dir,
                        leaf.name.as_c_str(),
                        ft,
                        Mode::from_raw_mode(0o600),
                        st.st_rdev,
                    )
                };
                self.create_replacing(leaf, raw, "mknod", mknod)?;
                let target = Target::At(leaf.dir.as_fd(), &leaf.name);
                self.apply_meta(target, &meta, Perms::Set, true, raw)
            }
        }
    }

    fn special(
        &mut self,
        leaf: &Leaf,
        h: &Header,
        meta: Meta,
        raw: &[u8],
    ) -> Result<(), ExtractError> {
        let (ft, dev) = match h.kind {
            Kind::Fifo => (FileType::Fifo, 0),
            Kind::CharDevice => (
                FileType::CharacterDevice,
                rustix::fs::makedev(h.dev_major, h.dev_minor),
            ),
            _ => (
                FileType::BlockDevice,
                rustix::fs::makedev(h.dev_major, h.dev_minor),
            ),
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

    /// fuse-overlayfs presents a layer's override_stat records only when the layer's root
    /// directory carries one: give the root one (root's, with its mode) when the archive had no
    /// root entry.
    fn record_root_override(&mut self) -> Result<(), ExtractError> {
        let fd = rustix::fs::openat(
            self.root.fd(),
            c".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| entry_err(b".", e))?;
        match rustix::fs::fgetxattr(&fd, owners::FUSE_OVERRIDE_XATTR, &mut [0u8; 64]) {
            Ok(_) => Ok(()),
            Err(rustix::io::Errno::NODATA) => {
                let st = rustix::fs::fstat(&fd).map_err(|e| entry_err(b".", e))?;
                let meta = Meta {
                    uid: 0,
                    gid: 0,
                    ..Meta::from_disk(&st, &[])
                };
                self.apply_meta(Target::Fd(fd.as_fd()), &meta, Perms::Leave, false, b".")
            }
            Err(e) => Err(entry_err(b".", format!("read xattr: {e}"))),
        }
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
        let how = how(&self.opts, self.creator, perms, times);
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
                match dir_made_at(self.root, &d.path, d.id)? {
                    Some(fd) => fd,
                    None => continue,
                }
            };
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

/// How an entry of the archive gets its metadata under `opts` (`creator`: the ids new files
/// get without a chown).
fn how(opts: &ExtractOptions, creator: Option<(u32, u32)>, perms: Perms, times: bool) -> How<'_> {
    How {
        owner: match (opts.owners, &opts.shift) {
            (OwnerPolicy::Preserve, None) => Owner::Chown,
            (OwnerPolicy::Preserve, Some(maps)) => Owner::Shift(maps),
            (OwnerPolicy::Record, _) => Owner::Record,
        },
        owner_now: creator,
        xattrs: Xattrs::Add,
        skip_refused_xattrs: true,
        perms,
        times,
    }
}

/// [`how`], owned: for the writers' threads.
pub(crate) struct MetaPolicy {
    pub(crate) opts: ExtractOptions,
    pub(crate) creator: Option<(u32, u32)>,
}

impl MetaPolicy {
    pub(crate) fn how(&self, perms: Perms, times: bool) -> How<'_> {
        how(&self.opts, self.creator, perms, times)
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

/// The directory made at `path` (its [`dir_id`] was `id`), if it is still there. A later
/// entry may have replaced it, or a parent of it (even by a symlink to another directory):
/// metadata deferred for it went with it, and must not land on whatever the path leads to now.
fn dir_made_at(
    root: &Root,
    path: &LayerPath,
    id: (u64, u64),
) -> Result<Option<OwnedFd>, ExtractError> {
    let raw = path.as_bytes();
    let Ok(leaf) = root.leaf(path, false) else {
        return Ok(None);
    };
    let fd = match leaf.open_dir() {
        Ok(fd) => fd,
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOTDIR | libc::ELOOP | libc::ENOENT)
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(entry_err(raw, e)),
    };
    Ok((dir_id(&fd).map_err(|e| entry_err(raw, e))? == id).then_some(fd))
}

pub(crate) fn apply_err(raw: &[u8], e: ApplyError) -> ExtractError {
    match e.step {
        Step::Owner { uid, gid } if e.source.raw_os_error() == Some(libc::EINVAL) => entry_err(
            raw,
            format!("owner {uid}:{gid} is not mapped in this user namespace"),
        ),
        Step::Unmapped { which, id } => entry_err(
            raw,
            format!("its {which} {id} is outside the --{which}map given: widen the map to hold it"),
        ),
        step => entry_err(raw, format!("{step}: {}", e.source)),
    }
}

pub(crate) fn data_err(raw: &[u8], e: io::Error) -> ExtractError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        entry_err(raw, "the archive is truncated inside this entry's data")
    } else {
        entry_err(raw, format!("reading data: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;

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
                shift: None,
                writers: 1,
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

    /// A PAX header, a GNU long name, or an extension header no reader applies (no magic),
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
                shift: None,
                writers: 1,
            };
            let err = extract(lazy, &root, opts).unwrap_err();
            // The message and its cause (a read error says only "reading the archive").
            let err = match std::error::Error::source(&err) {
                Some(cause) => format!("{err}: {cause}"),
                None => err.to_string(),
            };
            assert!(
                pos.get() <= crate::tarin::MAX_ENTRY_HEADERS + 512,
                "{kind:?}: read {} bytes ({err})",
                pos.get()
            );
            assert!(
                err.contains("MiB") || err.contains("extension header"),
                "{kind:?}: {err}"
            );
        }
    }
}
