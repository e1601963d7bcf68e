//! The layers of an OCI image, each into its own lowerdir `N` under the staging directory,
//! several at once (`--jobs`).
//!
//! Owns the concurrency of an image import. Up to `jobs` layers are extracted at the same time,
//! the biggest blobs first (so the last to finish is a small one). Layer 0 has no lowers and is
//! extracted as with one job; every other layer with [`extract_deferred`], which puts off the
//! few steps that read the layers below (implicit parents, hardlinks to lower files). Once all
//! are extracted, the layers are finished bottom up: each [`Pending::resolve`]s against the
//! complete layers below it, or, in the rare cases deferral cannot tell, is extracted again
//! with them, as with one job. The result is the `--jobs 1` result, byte for byte.
//!
//! A failing layer cancels the layers above it (at their next read of their blob) but not those
//! below: the error reported is the one importing the layers in turn would report, the lowest
//! layer's, never a cancellation. The caller's staging directory then goes away whole: DEST
//! appears with every layer or not at all.
//!
//! Memory per running layer: the inflate state (under 64 KiB for gzip; zstd's window, 8 MiB at
//! most at the levels layers use), the queue between the inflating and the writing thread
//! ([`ovl_layer::ThreadedReader`]: at most 18 chunks of 256 KiB, 4.5 MiB) and the
//! extractor's copy buffer (256 KiB): about 5 MiB for a gzip layer (measured: 9.4 MiB peak RSS
//! with `--jobs 1`, 14 MiB with 2, 22-25 MiB with 4). A layer given more than one writer
//! (`--writers`) adds up to [`ovl_layer`]'s 32 MiB writer queue. A layer waiting to be
//! finished holds only its list of deferred steps.

use std::io::{self, Read, Seek};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use ovl_layer::{
    ExtractOptions, ExtractStats, Pending, Progress, ProgressReader, Resolved, Root,
    extract_deferred,
};

use crate::ImportError;
use crate::oci::LayerBlob;

/// The read error a cancelled layer's blob gives.
pub(crate) const CANCELLED: &str = "cancelled: a layer below failed";

/// The default `--jobs`: one layer per core.
pub fn default_jobs() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// A blob reader that fails once a layer below this one failed, and remembers that it did.
struct Cancellable<R> {
    inner: R,
    layer: usize,
    /// The lowest failed layer (`usize::MAX`: none).
    failed: Arc<AtomicUsize>,
    cancelled: Arc<AtomicBool>,
}

impl<R: Read> Read for Cancellable<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.failed.load(Ordering::Relaxed) < self.layer {
            self.cancelled.store(true, Ordering::Relaxed);
            // Not `Interrupted`: readers retry that.
            return Err(io::Error::other(CANCELLED));
        }
        self.inner.read(buf)
    }
}

/// How the extraction of one layer ended.
enum Outcome {
    Done(ExtractStats),
    Pending(Pending),
    /// To extract again once the layers below are complete.
    Redo,
    Failed(ImportError),
    /// Stopped (or never started) because a layer below failed.
    Cancelled,
}

/// The label of layer `i` in messages.
pub(crate) fn label(layer: &LayerBlob, i: usize) -> String {
    // The media type comes from the image: escaped before it can reach a terminal.
    format!(
        "{} (layer {i}, {})",
        layer.path.display(),
        ovl_layer::display_str(&layer.media_type)
    )
}

/// Extract `layers` (bottom first) into `staging/0`, `staging/1`, ... (already created by
/// the caller), `jobs` at a time; the stats of all of them, in layer order.
pub(crate) fn import_layers(
    layers: &[LayerBlob],
    staging: &Path,
    ex: &ExtractOptions,
    jobs: usize,
    progress: Option<Arc<Progress>>,
) -> Result<ExtractStats, ImportError> {
    let dirs: Vec<PathBuf> = (0..layers.len())
        .map(|i| staging.join(i.to_string()))
        .collect();
    // Biggest first; equal sizes in layer order.
    let mut order: Vec<usize> = (0..layers.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(layers[i].size));
    let next = AtomicUsize::new(0);
    let failed = Arc::new(AtomicUsize::new(usize::MAX));
    let outcomes: Mutex<Vec<Option<Outcome>>> =
        Mutex::new((0..layers.len()).map(|_| None).collect());

    let work = || {
        while let Some(&i) = order.get(next.fetch_add(1, Ordering::Relaxed)) {
            if failed.load(Ordering::Relaxed) < i {
                continue;
            }
            let out = extract_one(&layers[i], i, &dirs[i], ex, &progress, &failed);
            if matches!(out, Outcome::Failed(_)) {
                failed.fetch_min(i, Ordering::Relaxed);
            }
            outcomes.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(out);
        }
    };
    let jobs = jobs.clamp(1, layers.len().max(1));
    std::thread::scope(|s| {
        for _ in 1..jobs {
            s.spawn(work);
        }
        work();
    });

    // Bottom up: each layer is finished against the complete layers below it.
    let outcomes = outcomes.into_inner().unwrap_or_else(|e| e.into_inner());
    let mut stats = ExtractStats::default();
    let mut below: Vec<PathBuf> = Vec::new();
    for (i, out) in outcomes.into_iter().enumerate() {
        let dir = &dirs[i];
        let redo = match out.unwrap_or(Outcome::Cancelled) {
            Outcome::Done(s) => {
                stats.add(&s);
                false
            }
            Outcome::Pending(p) => {
                let root = open_root(dir)?;
                match p.resolve(&root, &below) {
                    Ok(Resolved::Done(s)) => {
                        stats.add(&s);
                        false
                    }
                    Ok(Resolved::Redo) => true,
                    Err(err) => {
                        return Err(ImportError::Extract {
                            source_name: label(&layers[i], i),
                            err,
                        });
                    }
                }
            }
            Outcome::Redo => true,
            Outcome::Failed(e) => return Err(e),
            // Only above a failed layer, whose error came first.
            Outcome::Cancelled => {
                return Err(ImportError::Source {
                    path: label(&layers[i], i),
                    source: io::Error::other(CANCELLED),
                });
            }
        };
        if redo {
            stats.add(&redo_layer(&layers[i], i, dir, ex, &below)?);
        }
        below.insert(0, dir.clone());
    }
    Ok(stats)
}

fn open_root(dir: &Path) -> Result<Root, ImportError> {
    Root::open(dir).map_err(|e| ImportError::Dest {
        path: dir.to_path_buf(),
        source: e,
    })
}

fn open_blob(layer: &LayerBlob) -> Result<std::fs::File, ImportError> {
    layer.open().map_err(|e| ImportError::Source {
        path: layer.path.display().to_string(),
        source: e,
    })
}

/// One layer: its blob, verified, through the bar and the cancellation check, into `into`.
fn extract_one(
    layer: &LayerBlob,
    i: usize,
    into: &Path,
    ex: &ExtractOptions,
    progress: &Option<Arc<Progress>>,
    failed: &Arc<AtomicUsize>,
) -> Outcome {
    let cancelled = Arc::new(AtomicBool::new(false));
    let out = (|| {
        let raw = layer.verify(Cancellable {
            inner: ProgressReader::new(open_blob(layer)?, progress.clone()),
            layer: i,
            failed: Arc::clone(failed),
            cancelled: Arc::clone(&cancelled),
        });
        let label = label(layer, i);
        if i == 0 {
            // Nothing below: extracted as with one job.
            return crate::extract_stream(raw, into, ex.clone(), &[], &label).map(Outcome::Done);
        }
        let (mut reader, root) = crate::open_stream(raw, into, &label)?;
        let pending = extract_deferred(&mut reader, &root, ex.clone()).map_err(|err| {
            ImportError::Extract {
                source_name: label.clone(),
                err,
            }
        })?;
        if pending.needs_redo() {
            return Ok(Outcome::Redo);
        }
        match crate::drain(&mut reader, &label) {
            Ok(()) => Ok(Outcome::Pending(pending)),
            // Extracting with the lowers might have failed earlier, on another entry.
            Err(_) if !pending.failure_is_final() => Ok(Outcome::Redo),
            Err(e) => Err(e),
        }
    })();
    if cancelled.load(Ordering::Relaxed) {
        return Outcome::Cancelled;
    }
    out.unwrap_or_else(Outcome::Failed)
}

/// Extract layer `i` again, over the complete layers `below` (top first), as with one job.
fn redo_layer(
    layer: &LayerBlob,
    i: usize,
    dir: &Path,
    ex: &ExtractOptions,
    below: &[PathBuf],
) -> Result<ExtractStats, ImportError> {
    let dest_err = |e| ImportError::Dest {
        path: dir.to_path_buf(),
        source: e,
    };
    std::fs::remove_dir_all(dir).map_err(dest_err)?;
    std::fs::create_dir(dir).map_err(dest_err)?;
    // The handle shares its offset with the first pass's.
    let mut file = open_blob(layer)?;
    file.seek(io::SeekFrom::Start(0))
        .map_err(|e| ImportError::Source {
            path: layer.path.display().to_string(),
            source: e,
        })?;
    let raw = layer.verify(file);
    crate::extract_stream(raw, dir, ex.clone(), below, &label(layer, i))
}
