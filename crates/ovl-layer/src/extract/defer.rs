//! Extracting a layer while the layers below it are still being written (ovl-import's
//! concurrent layers), with the result of extracting it after them.
//!
//! Owns the steps of the extractor that read the layers below, put off until they are
//! complete. Only two steps do: an implicit parent directory takes the metadata of the nearest
//! lower directory, and a hardlink to a file only a lower layer holds gets a copy of it.
//! [`extract_deferred`] extracts the layer without its lowers and records them; once every
//! layer below is complete (resolved, bottom up), [`Pending::resolve`] does them:
//!
//! - An implicit directory is made at once (later entries go into it) and gets its owner,
//!   xattrs, mode and times at resolution, when the path still leads to the directory made
//!   (like the directories' deferred metadata: a later entry may have replaced it or a parent).
//!   None of that changes a parent's mtime, and nothing made in the directory depends on it:
//!   except a default ACL, which files made below it inherit (then the layer is redone).
//! - A lower hardlink becomes a placeholder: an empty file made where the copy goes, exactly
//!   as the copy would be made (replacing what was there), so every later entry of the layer
//!   sees what it would see (a hardlink to it links the same inode). At resolution the lower
//!   file's data and metadata are written into that inode through the descriptor kept open:
//!   writing into a file changes no directory's mtime.
//!
//! When the lower turns out not to be what the placeholder stood for (a symlink, a device, a
//! directory, nothing), when a placeholder is made under a default ACL, when an explicit entry
//! comes for a directory this layer made implicitly (its owner and xattrs mix the lower's with
//! the entry's), when the extraction failed while a placeholder stood in (a later entry may
//! have failed on it), or when too many placeholders are open, the layer is
//! [`Resolved::Redo`]: the caller extracts it again, now with its lowers complete. Rare, and
//! always exact.

use std::collections::HashSet;
use std::fs::File;
use std::io::Read;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use rustix::fs::{FileType, Mode, OFlags};

use super::{
    ExtractError, ExtractOptions, ExtractStats, Extractor, dir_id, dir_made_at, entry_err,
};
use crate::apply::{Perms, Target};
use crate::path::LayerPath;
use crate::root::{Leaf, Root};

/// Placeholders open at once, over every layer of the process (each holds a descriptor until
/// its layer is resolved); past it, a layer is redone instead.
const MAX_OPEN_PLACEHOLDERS: usize = 256;

/// The xattr of a directory's default ACL, which what is made in it inherits.
const DEFAULT_ACL: &[u8] = b"system.posix_acl_default";

static OPEN_PLACEHOLDERS: AtomicUsize = AtomicUsize::new(0);

/// One of [`MAX_OPEN_PLACEHOLDERS`], given back when dropped.
struct Slot(());

impl Slot {
    fn take() -> Option<Slot> {
        OPEN_PLACEHOLDERS
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_OPEN_PLACEHOLDERS).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        OPEN_PLACEHOLDERS.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a layer put off until its lowers are complete.
#[derive(Default)]
pub(super) struct Deferrals {
    /// Implicit directories, in the order they were made, with the (device, inode) made.
    implicit: Vec<(LayerPath, (u64, u64))>,
    implicit_paths: HashSet<LayerPath>,
    placeholders: Vec<Placeholder>,
    /// The layer must be extracted again with its lowers; the extraction stops.
    pub(super) redo: bool,
}

struct Placeholder {
    /// The lower file it stands for.
    target: LayerPath,
    /// The hardlink entry's name, for messages.
    raw: Vec<u8>,
    file: File,
    _slot: Slot,
}

impl Deferrals {
    /// The implicit directory `path` was just made.
    pub(super) fn implicit_dir(
        &mut self,
        root: &Root,
        path: &LayerPath,
        raw: &[u8],
    ) -> Result<(), ExtractError> {
        let leaf = root.leaf(path, false).map_err(|e| entry_err(raw, e))?;
        let fd = leaf.open_dir().map_err(|e| entry_err(raw, e))?;
        let id = dir_id(&fd).map_err(|e| entry_err(raw, e))?;
        self.implicit.push((path.clone(), id));
        self.implicit_paths.insert(path.clone());
        Ok(())
    }

    /// A directory entry for `path`: on a directory this layer made implicitly, its metadata
    /// goes over the lower's (the xattrs merge), which only the lower can tell.
    pub(super) fn explicit_dir(&mut self, path: &LayerPath) {
        if !self.implicit_paths.is_empty() && self.implicit_paths.contains(path) {
            self.redo = true;
        }
    }
}

impl Extractor<'_> {
    /// A hardlink at `leaf` to `target`, which this layer does not hold: an empty file where
    /// the copy of the lower file goes, filled at resolution.
    pub(super) fn lower_placeholder(
        &mut self,
        leaf: &Leaf,
        target: &LayerPath,
        raw: &[u8],
    ) -> Result<(), ExtractError> {
        let Some(slot) = Slot::take() else {
            self.defer.as_mut().expect("deferring").redo = true;
            return Ok(());
        };
        let fd = self.create_replacing(leaf, raw, "create", || {
            rustix::fs::openat(
                &leaf.dir,
                leaf.name.as_c_str(),
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
        })?;
        // Made under a default ACL, the copy's mode and ACL would follow from its create mode,
        // which only the lower can tell.
        let parent = crate::xattrs::list_fd(&leaf.dir).map_err(|e| entry_err(raw, e))?;
        if parent.iter().any(|(n, _)| n == DEFAULT_ACL) {
            self.defer.as_mut().expect("deferring").redo = true;
        }
        self.defer
            .as_mut()
            .expect("deferring")
            .placeholders
            .push(Placeholder {
                target: target.clone(),
                raw: raw.to_vec(),
                file: File::from(fd),
                _slot: slot,
            });
        Ok(())
    }
}

/// A layer extracted but for the steps that need the layers below it.
pub struct Pending {
    stats: ExtractStats,
    opts: ExtractOptions,
    deferrals: Deferrals,
}

/// What resolving a [`Pending`] layer came to.
#[derive(Debug)]
pub enum Resolved {
    Done(ExtractStats),
    /// The layer must be extracted again, with [`super::extract_onto`] and its lowers (see the
    /// module doc for when).
    Redo,
}

/// Extract the tar stream `reader` into `root`, a layer whose lowers are not complete yet;
/// [`Pending::resolve`] finishes it once they are. An error is this layer's own, as
/// [`super::extract_onto`] would report it; when that cannot be told yet, the result is a
/// [`Pending`] to redo.
pub fn extract_deferred<R: Read>(
    reader: R,
    root: &Root,
    opts: ExtractOptions,
) -> Result<Pending, ExtractError> {
    let mut ex = Extractor::new(root, opts, &[])?;
    ex.defer = Some(Deferrals::default());
    let res = {
        let _umask = crate::umask::NoUmask::enter();
        ex.run_entries(reader)
    };
    let mut deferrals = ex.defer.take().expect("set above");
    match res {
        Ok(()) => {}
        Err(e) if deferrals.placeholders.is_empty() => return Err(e),
        // A later entry may have failed on a placeholder that the copy would not be.
        Err(_) => deferrals.redo = true,
    }
    Ok(Pending {
        stats: ex.stats,
        opts: ex.opts,
        deferrals,
    })
}

impl Pending {
    /// Whether the layer must be extracted again whatever the layers below hold (the rest of
    /// its stream is not worth reading).
    pub fn needs_redo(&self) -> bool {
        self.deferrals.redo
    }

    /// Whether an error after the extraction (the blob's digest) is this layer's for sure:
    /// with a placeholder standing in, extracting with the lowers might have failed earlier.
    pub fn failure_is_final(&self) -> bool {
        self.deferrals.placeholders.is_empty()
    }

    /// Do what was put off, now that `lowers` (top first, the same list
    /// [`super::extract_onto`] takes) are complete. `root` is the layer's directory.
    pub fn resolve(self, root: &Root, lowers: &[PathBuf]) -> Result<Resolved, ExtractError> {
        let d = self.deferrals;
        if d.redo {
            return Ok(Resolved::Redo);
        }
        if d.implicit.is_empty() && d.placeholders.is_empty() {
            return Ok(Resolved::Done(self.stats));
        }
        let mut ex = Extractor::new(root, self.opts, lowers)?;
        ex.stats = self.stats;
        for p in &d.placeholders {
            let Some((src, st)) = ex.lower_entry(&p.target) else {
                return Ok(Resolved::Redo);
            };
            if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
                return Ok(Resolved::Redo);
            }
            let meta = ex.lower_meta(&src, &st, &p.raw)?;
            let from = crate::fsops::open_file_at(&src.dir, &src.name)
                .map_err(|e| entry_err(&p.raw, format!("opening the lower file: {e}")))?;
            let n = crate::copy::copy_sparse(&from, &p.file)
                .map_err(|e| entry_err(&p.raw, format!("copying the lower file: {e}")))?;
            ex.stats.bytes += n;
            ex.stats.lower_link_copies += 1;
            // Made 0600: the mode is set, not left from the create.
            ex.apply_meta(Target::Fd(p.file.as_fd()), &meta, Perms::Set, true, &p.raw)?;
        }
        for (path, id) in &d.implicit {
            let raw = path.as_bytes();
            // As for the directories' deferred metadata: only on the directory made.
            let Some(fd) = dir_made_at(root, path, *id)? else {
                continue;
            };
            let meta = ex.implicit_meta(path, raw)?;
            // Files made below the directory would have inherited it.
            if meta.xattrs.iter().any(|(n, _)| n == DEFAULT_ACL) {
                return Ok(Resolved::Redo);
            }
            // Owner and xattrs, then mode and times: what the extraction does in two steps.
            ex.apply_meta(Target::Fd(fd.as_fd()), &meta, Perms::Set, true, raw)?;
        }
        Ok(Resolved::Done(ex.stats))
    }
}
