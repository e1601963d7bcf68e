//! The layer's bytes: tar, then (optionally) compression, with both digests on the way.
//!
//! Owns the pipeline and what it yields: the diffID (sha256 of the tar, computed by
//! [`TarWriter`]), the blob's digest and size (sha256 of the bytes as stored), and the media
//! type. gzip is ovl-layer's `pgzip` on every core; zstd runs its own worker threads, always
//! at least one so its output is the same whatever the count (zstd's single-threaded mode
//! frames differently). Also owns writing to a file: a temporary sibling, synced, renamed.

use std::io::{self, Write};
use std::path::Path;

use sha2::Digest;

use ovl_layer::{Flush, StagedFile, StagingError, TarSummary, TarWriter};

use crate::{DiffError, DiffOptions, Stats};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// The zstd level layers are written with by default.
pub(crate) const ZSTD_LEVEL: u32 = 3;
/// The gzip level layers are written with by default (libdeflate's 4: the size of `gzip -6`).
pub(crate) const GZIP_LEVEL: u32 = ovl_layer::GZIP_DEFAULT_LEVEL;

impl Compression {
    /// The levels `--level` takes for this compression.
    pub fn levels(self) -> Option<std::ops::RangeInclusive<u32>> {
        match self {
            Compression::None => None,
            Compression::Gzip => Some(ovl_layer::GZIP_LEVELS),
            Compression::Zstd => Some(1..=19),
        }
    }
}

impl Compression {
    pub fn media_type(self) -> &'static str {
        match self {
            Compression::None => "application/vnd.oci.image.layer.v1.tar",
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }
}

/// What a written layer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerInfo {
    pub compression: Compression,
    /// sha256 of the blob as stored.
    pub digest: [u8; 32],
    /// Bytes of the blob as stored.
    pub size: u64,
    /// sha256 of the uncompressed tar.
    pub diff_id: [u8; 32],
    /// Bytes of the uncompressed tar.
    pub tar_size: u64,
}

impl LayerInfo {
    pub fn digest_str(&self) -> String {
        format!("sha256:{}", hex::encode(self.digest))
    }

    pub fn diff_id_str(&self) -> String {
        format!("sha256:{}", hex::encode(self.diff_id))
    }

    /// The OCI descriptor of the blob, plus its diffID.
    pub fn descriptor_json(&self) -> serde_json::Value {
        serde_json::json!({
            "mediaType": self.compression.media_type(),
            "digest": self.digest_str(),
            "size": self.size,
            "diffID": self.diff_id_str(),
        })
    }
}

/// Hashes and counts what passes through.
struct Hashing<W> {
    inner: W,
    hasher: sha2::Sha256,
    count: u64,
    /// Off when nobody reads the digest (see [`ovl_layer::TarOptions::skip_digest`]).
    enabled: bool,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        if self.enabled {
            self.hasher.update(&buf[..n]);
        }
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Write a layer to `out`: `emit` writes the entries into the tar writer it is given.
/// `direct`, when given, is a descriptor of the same file as `out`, for
/// [`TarWriter::copy_files_into`] (used when it applies: uncompressed, no digest).
pub(crate) fn write_layer<W, F>(
    out: W,
    direct: Option<std::fs::File>,
    opts: &DiffOptions,
    emit: F,
) -> Result<(W, LayerInfo, Stats), DiffError>
where
    W: Write + Send,
    F: FnOnce(&mut TarWriter<&mut dyn Write>) -> Result<Stats, DiffError>,
{
    // The tar stage runs inside the compressor's closure, which speaks io::Error: carry our
    // own error out beside it.
    let mut failure: Option<DiffError> = None;
    let mut direct = direct;
    let run_tar = |w: &mut dyn Write| -> io::Result<(TarSummary, Stats)> {
        let mut tw = TarWriter::new(w, opts.tar);
        if let Some(d) = direct
            .take()
            .filter(|_| opts.compression == Compression::None)
        {
            tw.copy_files_into(d);
        }
        match emit(&mut tw) {
            Ok(stats) => {
                let (_, sum) = tw.finish()?;
                Ok((sum, stats))
            }
            Err(e) => {
                failure = Some(e);
                Err(io::Error::other("the layer could not be written"))
            }
        }
    };
    let res = match opts.compression {
        Compression::None => {
            let mut out = out;
            run_tar(&mut out).map(|(sum, stats)| {
                let info = LayerInfo {
                    compression: Compression::None,
                    digest: sum.diff_id,
                    size: sum.size,
                    diff_id: sum.diff_id,
                    tar_size: sum.size,
                };
                (out, info, stats)
            })
        }
        Compression::Gzip => {
            let h = Hashing {
                inner: out,
                hasher: sha2::Sha256::new(),
                count: 0,
                enabled: !opts.tar.skip_digest,
            };
            let gz = ovl_layer::GzOptions {
                threads: opts.threads.max(1),
                level: opts.level.unwrap_or(GZIP_LEVEL),
                ..Default::default()
            };
            ovl_layer::compress_gzip(h, &gz, run_tar)
                .map(|(h, (sum, stats))| finish_hashing(h, Compression::Gzip, sum, stats))
        }
        Compression::Zstd => {
            let h = Hashing {
                inner: out,
                hasher: sha2::Sha256::new(),
                count: 0,
                enabled: !opts.tar.skip_digest,
            };
            let level = opts.level.unwrap_or(ZSTD_LEVEL) as i32;
            (|| {
                let mut enc = zstd::stream::write::Encoder::new(h, level)?;
                enc.multithread(opts.threads.max(1) as u32)?;
                let r = run_tar(&mut enc)?;
                let h = enc.finish()?;
                Ok((h, r))
            })()
            .map(|(h, (sum, stats))| finish_hashing(h, Compression::Zstd, sum, stats))
        }
    };
    match (res, failure) {
        (_, Some(e)) => Err(e),
        (Ok(r), None) => Ok(r),
        (Err(e), None) => Err(DiffError::Write(e)),
    }
}

fn finish_hashing<W: Write>(
    mut h: Hashing<W>,
    compression: Compression,
    sum: TarSummary,
    stats: Stats,
) -> (W, LayerInfo, Stats) {
    let _ = h.flush();
    let digest = if h.enabled {
        h.hasher.finalize().into()
    } else {
        [0; 32]
    };
    let info = LayerInfo {
        compression,
        digest,
        size: h.count,
        diff_id: sum.diff_id,
        tar_size: sum.size,
    };
    (h.inner, info, stats)
}

/// `-o FILE`: the layer written in a staging sibling ([`ovl_layer::StagedFile`]),
/// renamed over `dest` only when complete: a failed or interrupted run never leaves a partial
/// layer under the name, nor the sibling.
#[derive(Debug)]
pub struct AtomicFile(StagedFile);

/// The tool name in the staging sibling's name.
pub(crate) const TOOL: &str = "ovl-diff";

fn staging_error(e: StagingError) -> DiffError {
    match e {
        StagingError::Io { path, source } => DiffError::Io { path, source },
        StagingError::DestExists(path) => DiffError::Io {
            path,
            source: io::Error::from(io::ErrorKind::AlreadyExists),
        },
        e @ StagingError::NoParent(_) => DiffError::Staging(e),
    }
}

impl AtomicFile {
    pub fn create(dest: &Path) -> Result<AtomicFile, DiffError> {
        StagedFile::create(dest, TOOL)
            .map(AtomicFile)
            .map_err(staging_error)
    }

    /// The file being written.
    pub fn tmp(&self) -> &Path {
        &self.0.tmp
    }

    pub fn file(&mut self) -> &mut std::fs::File {
        self.0.file()
    }

    pub fn commit(self) -> Result<(), DiffError> {
        // No fsync: the rename makes the file appear only whole, and a layer is reproducible
        // (a crash costs a re-run, not a wrong layer that looks right: ext4 flushes data
        // renamed over an old file). Layout blobs, which an index points to, are synced.
        self.0.commit(Flush::RenameOnly).map_err(staging_error)
    }
}
