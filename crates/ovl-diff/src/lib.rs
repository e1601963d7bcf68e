//! ovl-diff: an overlay upperdir as an exact, reproducible OCI layer.
//!
//! What the upper means is read by ovl-layer's `upper` (every whiteout and opaque form,
//! redirect_dir and metacopy through the lowers, container ids); the bytes are written by
//! ovl-layer's `tarout` and compressed by ovl-layer's `pgzip` or zstd. This crate owns the
//! mapping from upper changes to OCI layer entries (`emit`), the compression pipeline and
//! its digests (`output`), and appending a layer to an OCI image layout (`oci`).

#![forbid(unsafe_code)]
#![warn(unreachable_pub)]

mod emit;
mod oci;
mod output;

use std::path::PathBuf;

use ovl_layer::{Identity, RootlessMaps, TarOptions, UpperError};

pub use emit::Stats;
pub use oci::{
    Appended, LayoutRef, PendingBlob, begin as begin_oci_append, finish as finish_oci_append,
};
pub use output::{AtomicFile, Compression, LayerInfo};

#[derive(Debug, thiserror::Error)]
pub enum DiffError {
    #[error(transparent)]
    Upper(#[from] UpperError),
    #[error("{path}: {reason}")]
    Entry { path: String, reason: String },
    #[error("writing the layer")]
    Write(#[source] std::io::Error),
    #[error("{path}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("OCI layout {dir}")]
    Oci {
        dir: PathBuf,
        #[source]
        source: ovl_layer::OciError,
    },
    #[error(transparent)]
    Staging(#[from] ovl_layer::StagingError),
}

/// What to diff and how to write it.
#[derive(Debug, Clone)]
pub struct DiffOptions {
    pub upper: PathBuf,
    /// The lowers the upper was mounted on, top first.
    pub lowers: Vec<PathBuf>,
    pub compression: Compression,
    /// Map host ids back to container ids while reading (`None`: ids as seen).
    pub ids: Option<RootlessMaps>,
    pub tar: TarOptions,
    /// Compression threads (the output does not depend on it).
    pub threads: usize,
    /// Compression level (`None`: the default, gzip 4 and zstd 3).
    pub level: Option<u32>,
    /// Ids that mean "not mapped in this user namespace" (the kernel's overflow uid and gid,
    /// when the namespace does not map them): an entry owned by one is refused, since its real
    /// owner is a host id the layer cannot carry. See [`unmapped_id_markers`].
    pub refuse_ids: Option<(u32, u32)>,
    /// `(alias, id)`: an owner read as `alias` is written as `id` (see [`alias_overflow`]).
    pub id_alias: Option<(u32, u32)>,
}

impl DiffOptions {
    pub fn new(upper: PathBuf) -> Self {
        DiffOptions {
            upper,
            lowers: Vec::new(),
            compression: Compression::None,
            ids: None,
            tar: TarOptions::default(),
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            level: None,
            refuse_ids: None,
            id_alias: None,
        }
    }
}

/// Write the layer of `opts.upper` to `out`; returns `out`, its descriptor facts and counts.
pub fn diff<W: std::io::Write + Send>(
    opts: &DiffOptions,
    out: W,
) -> Result<(W, LayerInfo, Stats), DiffError> {
    diff_into(opts, out, None)
}

/// [`diff`] into a file: an uncompressed layer without a digest (`skip_digest`) has its
/// bigger files copied from file to file by the kernel, never read into this process.
pub fn diff_to_file(
    opts: &DiffOptions,
    out: std::fs::File,
) -> Result<(std::fs::File, LayerInfo, Stats), DiffError> {
    let direct = out.try_clone().map_err(DiffError::Write)?;
    diff_into(opts, out, Some(direct))
}

fn diff_into<W: std::io::Write + Send>(
    opts: &DiffOptions,
    out: W,
    direct: Option<std::fs::File>,
) -> Result<(W, LayerInfo, Stats), DiffError> {
    let upper = ovl_layer::Upper::open(
        &opts.upper,
        &ovl_layer::UpperOptions {
            lowers: opts.lowers.clone(),
            ids: opts.ids.clone(),
        },
    )?;
    output::write_layer(out, direct, opts, |tw| {
        emit::emit(&upper, tw, opts.refuse_ids, opts.id_alias)
    })
}

/// Inside a user namespace, the ids an unmapped host id reads back as (the kernel's overflow
/// uid and gid), when this namespace does not map them itself; `None` outside a namespace or
/// when they are real container ids here.
pub fn unmapped_id_markers() -> Option<(u32, u32)> {
    let Identity::NamespaceRoot(RootlessMaps {
        uid: uid_map,
        gid: gid_map,
    }) = Identity::current()
    else {
        return None;
    };
    let (ou, og) = overflow_ids();
    if uid_map.to_host(ou).is_some() && gid_map.to_host(og).is_some() {
        return None;
    }
    Some((ou, og))
}

/// The container id an unmapped host id reads as inside a user namespace (the kernel's
/// overflow id) is also a real container id (nobody) in a full rootless map, so the two cannot
/// be told apart there. The namespace ovl-diff makes for itself therefore maps the host id of
/// container `overflow` to container `alias` instead (an id above the rootless range): inside,
/// `alias` is the real nobody (written back as `overflow`), and `overflow` can only be an
/// unmapped host id (refused). A map that does not hold `overflow` is returned as it is.
pub fn alias_overflow(map: &ovl_layer::IdMap, overflow: u32, alias: u32) -> ovl_layer::IdMap {
    use ovl_layer::{IdMap, IdRange};
    let mut out = Vec::new();
    let mut found = false;
    for r in map.ranges() {
        let end = u64::from(r.container) + u64::from(r.count);
        if overflow < r.container || u64::from(overflow) >= end {
            out.push(*r);
            continue;
        }
        found = true;
        let before = overflow - r.container;
        if before > 0 {
            out.push(IdRange {
                container: r.container,
                host: r.host,
                count: before,
            });
        }
        out.push(IdRange {
            container: alias,
            host: r.host + before,
            count: 1,
        });
        let after = r.count - before - 1;
        if after > 0 {
            out.push(IdRange {
                container: overflow + 1,
                host: r.host + before + 1,
                count: after,
            });
        }
    }
    if found { IdMap::new(out) } else { map.clone() }
}

/// The kernel's overflow uid and gid (what an unmapped id reads as in a user namespace), from
/// /proc/sys/kernel/overflow{uid,gid}; 65534, the kernel's default, when unreadable.
fn overflow_ids() -> (u32, u32) {
    let read = |f: &str| -> u32 {
        std::fs::read_to_string(f)
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(65534)
    };
    (
        read("/proc/sys/kernel/overflowuid"),
        read("/proc/sys/kernel/overflowgid"),
    )
}

/// [`alias_overflow`] for both maps of the namespace ovl-diff makes for itself, with this
/// host's overflow ids, so "nobody" stays apart from unmapped host ids inside.
pub fn alias_overflow_of_this_host(maps: &mut RootlessMaps) {
    let (ou, og) = overflow_ids();
    maps.uid = alias_overflow(&maps.uid, ou, OVERFLOW_ALIAS);
    maps.gid = alias_overflow(&maps.gid, og, OVERFLOW_ALIAS);
}

/// The container id [`alias_overflow`] moves nobody to.
pub const OVERFLOW_ALIAS: u32 = ovl_layer::ROOTLESS_RANGE + 1;

/// `(alias, overflow)` when this process runs in a namespace made with [`alias_overflow`]
/// (read from its own id maps): owners read as the alias are written as the overflow id.
pub fn id_alias_in_this_namespace() -> Option<(u32, u32)> {
    let (ou, og) = unmapped_id_markers()?;
    let RootlessMaps { uid: um, gid: gm } = ovl_layer::current_maps();
    (ou == og && um.to_host(OVERFLOW_ALIAS).is_some() && gm.to_host(OVERFLOW_ALIAS).is_some())
        .then_some((OVERFLOW_ALIAS, ou))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ovl_layer::{IdMap, SubRange, rootless_map};

    #[test]
    fn overflow_is_aliased_out_of_the_map() {
        let m = rootless_map(
            1000,
            &[SubRange {
                start: 100_000,
                count: 65536,
            }],
        );
        let a = alias_overflow(&m, 65534, 65537);
        assert_eq!(a.to_host(65534), None);
        assert_eq!(a.to_host(65537), m.to_host(65534));
        assert_eq!(a.to_host(65533), m.to_host(65533));
        assert_eq!(a.to_host(65535), m.to_host(65535));
        assert_eq!(a.to_host(0), Some(1000));
        let single = IdMap::single(1000);
        assert_eq!(alias_overflow(&single, 65534, 65537), single);
    }
}
