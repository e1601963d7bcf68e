//! ovl-import: an image tarball (or an OCI image layout) into exact, safe overlay lowerdirs.
//!
//! The extraction itself is ovl-layer's `extract`; this crate owns the sources (a file or
//! stdin, any compression, or `oci:DIR[:TAG]`), the all-or-nothing destination (`dest`), and
//! the choice of owner policy and opaque-xattr namespace for the privileges it runs with.

#![forbid(unsafe_code)]
#![warn(unreachable_pub)]

mod dest;
mod layers;
mod oci;

pub use layers::default_jobs;

use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ovl_layer::{
    ExtractError, ExtractOptions, ExtractStats, OwnerPolicy, Progress, ProgressReader, Root,
    ThreadedReader, XattrNs,
};

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{0}: DEST already exists (ovl-import only creates a new directory)")]
    DestExists(PathBuf),
    #[error("{path}")]
    Dest {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}")]
    Source {
        path: String,
        source: std::io::Error,
    },
    #[error("OCI layout {dir}")]
    Oci {
        dir: PathBuf,
        #[source]
        source: ovl_layer::OciError,
    },
    #[error(transparent)]
    Staging(ovl_layer::StagingError),
    #[error("{source_name}")]
    Extract {
        source_name: String,
        #[source]
        err: ExtractError,
    },
}

/// Where the archive comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Stdin,
    File(PathBuf),
    /// An OCI image layout directory and an optional tag.
    Oci {
        dir: PathBuf,
        tag: Option<String>,
    },
}

impl Source {
    /// `-`, `oci:DIR[:TAG]`, or a path.
    pub fn parse(arg: &std::ffi::OsStr) -> Source {
        use std::os::unix::ffi::OsStrExt;
        let b = arg.as_bytes();
        if b == b"-" {
            return Source::Stdin;
        }
        if let Some(rest) = b.strip_prefix(b"oci:") {
            let r = ovl_layer::LayoutRef::parse(std::ffi::OsStr::from_bytes(rest));
            return Source::Oci {
                dir: r.dir,
                tag: r.tag,
            };
        }
        Source::File(PathBuf::from(arg))
    }
}

/// How to import.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    pub opaque_ns: XattrNs,
    pub owners: OwnerPolicy,
    /// Counts the archive bytes read (of the total when it is known), for a progress bar.
    pub progress: Option<std::sync::Arc<Progress>>,
    /// `--uidmap`/`--gidmap`: write owners as the host ids of this map.
    pub shift: Option<ovl_layer::RootlessMaps>,
    /// How many layers of an OCI image are extracted at once (see `layers`); 1: in turn.
    pub jobs: usize,
    /// Threads writing file content within a layer (`--writers`); `None`: chosen by the
    /// source (see `auto_writers`).
    pub writers: Option<usize>,
}

/// What an import did.
#[derive(Debug, Clone)]
pub struct Summary {
    pub stats: ExtractStats,
    pub elapsed: Duration,
    /// For an OCI image: the lowerdirs, top layer first, as `lowerdir=` wants them (escaped by
    /// [`ovl_layer::join_lowers`]).
    pub lowerdirs: Option<OsString>,
}

impl Summary {
    pub fn line(&self, dest: &Path) -> String {
        let s = &self.stats;
        format!(
            "ovl-import: {} entries, {:.1} MiB, {} whiteouts, {} opaque dirs, {} skipped ({} devices, {} xattrs, {} entries){} in {:.2}s -> {}",
            s.entries,
            s.bytes as f64 / (1024.0 * 1024.0),
            s.whiteouts,
            s.opaques,
            s.skipped_devices + s.skipped_xattrs + s.skipped_entries,
            s.skipped_devices,
            s.skipped_xattrs,
            s.skipped_entries,
            if s.lower_link_copies > 0 {
                format!(
                    ", {} hardlinks to lower-layer files copied",
                    s.lower_link_copies
                )
            } else {
                String::new()
            },
            self.elapsed.as_secs_f64(),
            dest.display()
        )
    }
}

/// Import `source` into the new directory `dest`.
pub fn import(source: &Source, dest: &Path, opts: &ImportOptions) -> Result<Summary, ImportError> {
    let start = Instant::now();
    let staging = dest::begin(dest)?;
    let ex = ExtractOptions {
        opaque_ns: opts.opaque_ns,
        owners: opts.owners,
        shift: opts.shift.clone().map(std::sync::Arc::new),
        // 0: chosen per stream, once its compression is known.
        writers: opts.writers.unwrap_or(0),
    };
    let (stats, lowerdirs) = match source {
        Source::Oci { dir, tag } => {
            let layers = oci::layers(dir, tag.as_deref())?;
            let total = layers.iter().map(|l| l.size).sum();
            set_total(opts, Some(total));
            let mut stats = ExtractStats::default();
            let mut names = Vec::new();
            for i in 0..layers.len() {
                let sub = staging.tmp.join(i.to_string());
                std::fs::create_dir(&sub).map_err(|e| ImportError::Dest {
                    path: sub.clone(),
                    source: e,
                })?;
                names.push(dest.join(i.to_string()));
            }
            if opts.jobs > 1 && layers.len() > 1 {
                let p = opts.progress.clone();
                stats = layers::import_layers(&layers, &staging.tmp, &ex, opts.jobs, p)?;
            } else {
                // The layers extracted so far, top first: a layer's implicit directories and
                // hardlinks to lower files are resolved against them.
                let mut below: Vec<PathBuf> = Vec::new();
                for (i, layer) in layers.iter().enumerate() {
                    let sub = staging.tmp.join(i.to_string());
                    let file = layer.open().map_err(|e| ImportError::Source {
                        path: layer.path.display().to_string(),
                        source: e,
                    })?;
                    let raw = layer.verify(ProgressReader::new(file, opts.progress.clone()));
                    let label = layers::label(layer, i);
                    stats.add(&extract_stream(raw, &sub, ex.clone(), &below, &label)?);
                    below.insert(0, sub);
                }
            }
            names.reverse();
            (stats, Some(ovl_layer::join_lowers(&names)))
        }
        Source::Stdin => {
            let r = ProgressReader::new(std::io::stdin(), opts.progress.clone());
            let s = extract_stream(r, &staging.tmp, ex, &[], "stdin")?;
            (s, None)
        }
        Source::File(path) => {
            let file = std::fs::File::open(path).map_err(|e| ImportError::Source {
                path: path.display().to_string(),
                source: e,
            })?;
            let total = file
                .metadata()
                .ok()
                .filter(|m| m.is_file())
                .map(|m| m.len());
            set_total(opts, total);
            let label = path.display().to_string();
            let s = if total.is_some() && is_plain_tar(&file) {
                extract_plain_file(file, &staging.tmp, ex, &label, opts)?
            } else {
                let r = ProgressReader::new(file, opts.progress.clone());
                extract_stream(r, &staging.tmp, ex, &[], &label)?
            };
            (s, None)
        }
    };
    staging.commit()?;
    Ok(Summary {
        stats,
        elapsed: start.elapsed(),
        lowerdirs,
    })
}

fn set_total(opts: &ImportOptions, total: Option<u64>) {
    if let Some(p) = &opts.progress {
        p.set_total(total);
    }
}

/// How many threads write a layer's files when `--writers` does not say. From a plain tar
/// file the data of bigger files is copied by the writers straight from the file, and creating
/// files is what limits: as many writers as cores. A stream (compressed, or stdin) keeps a
/// core busy reading (decompressing) and another parsing and creating: the writers get the
/// cores left over, and with none left one writer (the parsing thread) is fastest, as extra
/// threads only add hand-over work. Measured on 2 cores, CPU seconds for the bench corpus:
/// zstd 0.93 with 1 writer, 1.06 with 2; plain tar on stdin 0.53 and 0.62.
fn auto_writers(from_file: bool) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if from_file {
        cores
    } else {
        cores.saturating_sub(2).max(1)
    }
}

/// True when the regular file `file` is an uncompressed tar (by its first bytes).
fn is_plain_tar(file: &std::fs::File) -> bool {
    use std::os::unix::fs::FileExt;
    let mut head = [0u8; 512];
    let n = file.read_at(&mut head, 0).unwrap_or(0);
    n > 0 && ovl_layer::Compression::sniff(&head[..n]) == ovl_layer::Compression::None
}

/// Extract the plain tar file `file` into `into`: its bigger files are copied from it
/// straight into the new files (see [`ovl_layer::extract_file_onto`]).
fn extract_plain_file(
    file: std::fs::File,
    into: &Path,
    mut ex: ExtractOptions,
    label: &str,
    opts: &ImportOptions,
) -> Result<ExtractStats, ImportError> {
    if ex.writers == 0 {
        ex.writers = auto_writers(true);
    }
    let root = Root::open(into).map_err(|e| ImportError::Dest {
        path: into.to_path_buf(),
        source: e,
    })?;
    ovl_layer::extract_file_onto(file, &root, ex, &[], opts.progress.clone()).map_err(|err| {
        ImportError::Extract {
            source_name: label.to_string(),
            err,
        }
    })
}

/// Decompress (on its own thread) and extract one stream into the directory `into`, then read
/// the stream to its end (so a blob digest is checked over every byte).
pub(crate) fn extract_stream<R: Read + Send + 'static>(
    raw: R,
    into: &Path,
    ex: ExtractOptions,
    lowers: &[PathBuf],
    label: &str,
) -> Result<ExtractStats, ImportError> {
    let mut ex = ex;
    if ex.writers == 0 {
        ex.writers = auto_writers(false);
    }
    let (mut reader, root) = open_stream(raw, into, label)?;
    let stats = ovl_layer::extract_onto(&mut reader, &root, ex, lowers).map_err(|err| {
        ImportError::Extract {
            source_name: label.to_string(),
            err,
        }
    })?;
    drain(&mut reader, label)?;
    Ok(stats)
}

/// The decompressed stream (inflated on its own thread) and the root to extract it into.
pub(crate) fn open_stream<R: Read + Send + 'static>(
    raw: R,
    into: &Path,
    label: &str,
) -> Result<(ThreadedReader, Root), ImportError> {
    let (_kind, decoded) = ovl_layer::decoder(raw).map_err(|e| src_err(label, e))?;
    let reader = ThreadedReader::new(decoded);
    let root = Root::open(into).map_err(|e| ImportError::Dest {
        path: into.to_path_buf(),
        source: e,
    })?;
    Ok((reader, root))
}

/// Read the rest of the stream, so a blob digest is checked over every byte.
pub(crate) fn drain(reader: &mut ThreadedReader, label: &str) -> Result<(), ImportError> {
    std::io::copy(reader, &mut std::io::sink()).map_err(|e| src_err(label, e))?;
    Ok(())
}

fn src_err(label: &str, e: std::io::Error) -> ImportError {
    ImportError::Source {
        path: label.to_string(),
        source: e,
    }
}
