//! From upper changes to OCI layer entries.
//!
//! Owns the OCI form of each change: a whiteout is `DIR/.wh.NAME`, an opaque directory is its
//! entry followed by `DIR/.wh..wh..opq` (right after it, before anything in it, so an applier
//! that acts on markers in stream order cannot hide this layer's own entries), a redirected
//! directory is already a whiteout of its old path (the upper holds one) plus an opaque
//! directory with its full content (ovl-layer's `upper` expands it), and a file's data comes
//! from wherever the upper says (the upper, or a lower for metacopy). The layer root itself is
//! an entry (`./`) only when its mode, owner or xattrs differ from the lowers' root (someone ran
//! `chmod 700 /` in the container): otherwise its metadata is the mount's, not the image's (as
//! in `docker save` layers).
//! Sockets cannot be in a tar and are counted, not written.

use std::io::Write;

use ovl_layer::{
    Change, Entry, Kind, LayerPath, OciName, TarData, TarEntry, TarKind, TarWriter, Upper,
};

use crate::DiffError;

/// What a layer holds, for the summary line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub entries: u64,
    pub files: u64,
    pub bytes: u64,
    pub whiteouts: u64,
    pub opaque_dirs: u64,
    pub hardlinks: u64,
    pub redirects: u64,
    /// Files whose data came from a lower (metacopy, or inside a renamed directory).
    pub from_lowers: u64,
    pub sparse: u64,
    pub skipped_sockets: u64,
}

/// Write every change of `upper` to `tw`, refusing entries owned by `refuse_ids` (see
/// [`crate::unmapped_id_markers`]) and writing an owner read as `id_alias.0` as `id_alias.1`
/// (see [`crate::alias_overflow`]).
pub(crate) fn emit<W: Write>(
    upper: &Upper,
    tw: &mut TarWriter<W>,
    refuse_ids: Option<(u32, u32)>,
    id_alias: Option<(u32, u32)>,
) -> Result<Stats, DiffError> {
    let mut st = Stats::default();
    // Sockets are not written: their other names must not become links to nothing.
    let mut sockets: std::collections::HashSet<LayerPath> = std::collections::HashSet::new();
    upper.walk(&mut |mut c| {
        if let (Change::Entry(e), Some((ou, og))) = (&c, refuse_ids) {
            if e.meta.uid == ou || e.meta.gid == og {
                return Err(DiffError::Entry {
                    path: upper.display(&e.path),
                    reason: format!(
                        "owned by an id this user namespace does not map (it reads as {}:{}): \
                         its real owner is a host id, which a layer cannot carry",
                        e.meta.uid, e.meta.gid
                    ),
                });
            }
        }
        if let (Change::Entry(e), Some((alias, id))) = (&mut c, id_alias) {
            if e.meta.uid == alias {
                e.meta.uid = id;
            }
            if e.meta.gid == alias {
                e.meta.gid = id;
            }
        }
        if let Change::Entry(e) = &c {
            match &e.kind {
                Kind::Socket => {
                    sockets.insert(e.path.clone());
                }
                Kind::Hardlink { target } if sockets.contains(target) => {
                    st.skipped_sockets += 1;
                    return Ok(());
                }
                _ => {}
            }
        }
        change(upper, tw, &mut st, c)
    })?;
    Ok(st)
}

fn change<W: Write>(
    upper: &Upper,
    tw: &mut TarWriter<W>,
    st: &mut Stats,
    c: Change,
) -> Result<(), DiffError> {
    match c {
        Change::Redirect { .. } => {
            st.redirects += 1;
            Ok(())
        }
        Change::Whiteout(p) => {
            let (parent, name) = p.split_last().expect("a whiteout is never the root");
            st.whiteouts += 1;
            marker(upper, tw, &parent.join(&ovl_layer::whiteout_name(name)))
        }
        // The root is exported (as `./`) only when its mode, owner or xattrs differ from the
        // lowers' root: the merged root takes the upper's attributes, but an upperdir made by
        // a runtime is no change of the image. An opaque root hides every lower.
        Change::Entry(e) if e.path.is_root() => {
            if upper.root_differs(&e.meta)? {
                root_entry(upper, tw, st, &e)?;
            }
            match e.kind {
                Kind::Dir { opaque: true } => {
                    st.opaque_dirs += 1;
                    marker(
                        upper,
                        tw,
                        &LayerPath::parse(ovl_layer::OPAQUE_MARKER).expect("a name"),
                    )
                }
                _ => Ok(()),
            }
        }
        Change::Entry(e) => entry(upper, tw, st, e),
    }
}

/// The root directory's own entry, `./`.
fn root_entry<W: Write>(
    upper: &Upper,
    tw: &mut TarWriter<W>,
    st: &mut Stats,
    e: &Entry,
) -> Result<(), DiffError> {
    let t = TarEntry {
        name: b".",
        kind: TarKind::Dir,
        mode: e.meta.mode,
        uid: e.meta.uid,
        gid: e.meta.gid,
        mtime: e.meta.mtime,
        xattrs: &e.meta.xattrs,
    };
    st.entries += 1;
    tw.append(&t, TarData::None)
        .map_err(|err| write_err(upper, &e.path, err))
}

/// A zero-size marker file (whiteout or opaque marker): no owner, mode or time to speak of.
fn marker<W: Write>(upper: &Upper, tw: &mut TarWriter<W>, p: &LayerPath) -> Result<(), DiffError> {
    let e = TarEntry {
        name: p.as_bytes(),
        kind: TarKind::File { size: 0 },
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime: (0, 0),
        xattrs: &[],
    };
    tw.append(&e, TarData::None)
        .map_err(|err| write_err(upper, p, err))
}

fn write_err(upper: &Upper, p: &LayerPath, err: std::io::Error) -> DiffError {
    // Errors of the output itself (a closed pipe, a full disk) are not about this entry.
    if matches!(
        err.kind(),
        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::StorageFull
    ) || err.raw_os_error() == Some(libc::ENOSPC)
    {
        return DiffError::Write(err);
    }
    DiffError::Entry {
        path: upper.display(p),
        reason: err.to_string(),
    }
}

fn entry<W: Write>(
    upper: &Upper,
    tw: &mut TarWriter<W>,
    st: &mut Stats,
    e: Entry,
) -> Result<(), DiffError> {
    let name = e.path.file_name();
    // A name that means something else in a layer cannot be written as content.
    if ovl_layer::classify_oci_name(name) != Ok(OciName::Plain) {
        return Err(DiffError::Entry {
            path: upper.display(&e.path),
            reason: "this name is reserved for whiteouts in OCI layers and cannot be exported"
                .into(),
        });
    }
    let mut t = TarEntry {
        name: e.path.as_bytes(),
        kind: TarKind::Dir,
        mode: e.meta.mode,
        uid: e.meta.uid,
        gid: e.meta.gid,
        mtime: e.meta.mtime,
        xattrs: &e.meta.xattrs,
    };
    st.entries += 1;
    let err = |err| write_err(upper, &e.path, err);
    match &e.kind {
        Kind::Dir { opaque } => {
            tw.append(&t, TarData::None).map_err(err)?;
            if *opaque {
                st.opaque_dirs += 1;
                marker(upper, tw, &e.path.join(ovl_layer::OPAQUE_MARKER))?;
            }
            Ok(())
        }
        Kind::File { source, sparse } => {
            st.files += 1;
            st.bytes += e.meta.size;
            if source.layer != ovl_layer::Layer::Upper {
                st.from_lowers += 1;
            }
            let size = e.meta.size;
            t.kind = TarKind::File { size };
            let f = upper.open_source(source)?;
            let chunks = if *sparse && size > 0 {
                ovl_layer::data_chunks(&f, size).map_err(err)?
            } else {
                None
            };
            match chunks {
                Some(chunks) => {
                    st.sparse += 1;
                    tw.append(&t, TarData::Sparse { chunks, file: &f })
                }
                None => tw.append(&t, TarData::File(&f)),
            }
            .map_err(err)
        }
        Kind::Hardlink { target } => {
            st.hardlinks += 1;
            t.kind = TarKind::Hardlink {
                target: target.as_bytes(),
            };
            tw.append(&t, TarData::None).map_err(err)
        }
        Kind::Symlink { target } => {
            t.kind = TarKind::Symlink { target };
            tw.append(&t, TarData::None).map_err(err)
        }
        Kind::CharDevice { major, minor } => {
            t.kind = TarKind::Char {
                major: *major,
                minor: *minor,
            };
            tw.append(&t, TarData::None).map_err(err)
        }
        Kind::BlockDevice { major, minor } => {
            t.kind = TarKind::Block {
                major: *major,
                minor: *minor,
            };
            tw.append(&t, TarData::None).map_err(err)
        }
        Kind::Fifo => {
            t.kind = TarKind::Fifo;
            tw.append(&t, TarData::None).map_err(err)
        }
        Kind::Socket => {
            st.entries -= 1;
            st.skipped_sockets += 1;
            Ok(())
        }
    }
}
