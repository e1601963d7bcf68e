//! ovl-squash: fold an overlay's upper layer into a new lower layer, exactly, fast and
//! crash-safe.
//!
//! The upper is read by ovl-layer's `upper` (every writer's format; redirect_dir and metacopy
//! through the lowers), the lowers by its [`ovl_layer::LowerStack`]. This crate owns the
//! two ways of writing the result: `output` (a new directory, through a staging sibling) and
//! `inplace` (the lower becomes the result, ordered so a crash never changes what the
//! overlay shows), the content sharing and exact metadata both use (`fsops`), the refusal to
//! touch a mounted overlay (`inuse`), and the crash-test hook (`crash`).

#![forbid(unsafe_code)]
#![warn(unreachable_pub)]

mod crash;
mod error;
mod fsops;
mod inplace;
mod inuse;
mod output;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

pub use error::SquashError;
pub use inuse::refuse_if_mounted;

/// Where the result goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A new directory; the lowers and the upper are only read.
    Output(PathBuf),
    /// The (single) lower becomes the result; the upper is emptied.
    InPlace,
}

#[derive(Debug, Clone)]
pub struct SquashOptions {
    /// Top first, as in `lowerdir=`.
    pub lowers: Vec<PathBuf>,
    pub upper: PathBuf,
    pub target: Target,
    /// `--output`: hardlink unchanged lower files when there are no reflinks.
    pub link: bool,
    /// `--uidmap`/`--gidmap`: the map the upper was written under; its host ids are folded in
    /// as container ids (`None`: ids as seen), unless the lowers themselves hold host ids of
    /// that map (see [`fold_ids`]).
    pub ids: Option<ovl_layer::RootlessMaps>,
}

/// The map to fold the upper's ids through: the result keeps the lowers' own ids. Lowers in
/// container ids (seen through idmapped mounts) get the upper's host ids mapped back; lowers
/// that hold host ids of the map themselves (imported with `ovl-import --uidmap`, or rootless;
/// [`ovl_layer::lower_holds_host_ids`]) get them as they are, so the result is as
/// shifted as they were. Lowers of both kinds cannot make one consistent result: refused.
pub fn fold_ids(
    lowers: &[PathBuf],
    ids: Option<&ovl_layer::RootlessMaps>,
) -> Result<Option<ovl_layer::RootlessMaps>, SquashError> {
    use std::os::unix::fs::MetadataExt;
    let Some(maps) = ids else {
        return Ok(None);
    };
    let mut host = Vec::new();
    for l in lowers {
        let md = std::fs::metadata(l).map_err(error::io_at(l.display()))?;
        host.push(ovl_layer::lower_holds_host_ids(md.uid(), maps));
    }
    if host.iter().all(|&h| h) {
        return Ok(None);
    }
    if let Some(i) = host.iter().position(|&h| h) {
        return Err(SquashError::Unsupported {
            path: lowers[i].display().to_string(),
            why: "this lower holds host ids of the --uidmap (its root belongs to the host id of \
                  container root: imported with --uidmap, or rootless) but others hold container \
                  ids, so no result keeps them all: squash them into one kind first"
                .into(),
        });
    }
    Ok(Some(maps.clone()))
}

/// What a squash did.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Entries written (output) or applied from the upper (in place).
    pub entries: u64,
    pub whiteouts: u64,
    pub opaque_dirs: u64,
    /// Redirected entries made local (in place).
    pub redirects: u64,
    /// Upper inodes moved into the lower by hardlink (in place).
    pub moved: u64,
    pub reflinked: u64,
    pub linked: u64,
    pub copied: u64,
    pub bytes_copied: u64,
    /// Mutations made (what the crash hook counts).
    pub steps: u64,
    pub elapsed: Duration,
}

impl Summary {
    pub fn line(&self, opts: &SquashOptions) -> String {
        let into = match &opts.target {
            Target::Output(p) => p.display().to_string(),
            Target::InPlace => format!("{} (in place)", opts.lowers[0].display()),
        };
        format!(
            "ovl-squash: {} entries, {} whiteouts, {} opaque dirs, {} redirects; {} moved, {} reflinked, {} hardlinked, {} copied ({:.1} MiB); {} steps in {:.2}s -> {into}",
            self.entries,
            self.whiteouts,
            self.opaque_dirs,
            self.redirects,
            self.moved,
            self.reflinked,
            self.linked,
            self.copied,
            self.bytes_copied as f64 / (1024.0 * 1024.0),
            self.steps,
            self.elapsed.as_secs_f64(),
        )
    }
}

/// Every directory a squash reads or writes (for the mount check).
pub fn dirs_of(opts: &SquashOptions) -> Vec<PathBuf> {
    let mut d = opts.lowers.clone();
    d.push(opts.upper.clone());
    d
}

/// Squash, after refusing if any of the dirs is part of a mounted overlay.
pub fn squash(opts: &SquashOptions) -> Result<Summary, SquashError> {
    let start = Instant::now();
    if opts.lowers.is_empty() {
        return Err(SquashError::Unsupported {
            path: opts.upper.display().to_string(),
            why: "no lower given".into(),
        });
    }
    inuse::refuse_if_mounted(&dirs_of(opts))?;
    let ids = fold_ids(&opts.lowers, opts.ids.as_ref())?;
    let sharing = fsops::Sharing::new(opts.link);
    let mut sum = Summary::default();
    match &opts.target {
        Target::Output(out) => {
            output::squash_to(&opts.lowers, &opts.upper, out, ids, &sharing, &mut sum)?
        }
        Target::InPlace => {
            if opts.lowers.len() != 1 {
                return Err(SquashError::InPlaceLowers(opts.lowers.len()));
            }
            inplace::squash_in_place(&opts.lowers[0], &opts.upper, ids, &sharing, &mut sum)?
        }
    }
    sum.reflinked = sharing.reflinked.load(Ordering::Relaxed);
    sum.linked = sharing.linked.load(Ordering::Relaxed);
    sum.copied = sharing.copied.load(Ordering::Relaxed);
    sum.bytes_copied = sharing.bytes_copied.load(Ordering::Relaxed);
    sum.steps = crash::steps();
    sum.elapsed = start.elapsed();
    Ok(sum)
}
