//! ovl-layer: the shared core of the ovl tools.
//!
//! The data model lives here once: what a whiteout or an opaque directory is in every form
//! (`whiteout`), how names are normalised (`path`) and confined to a root (`root`), how one
//! name in a directory is touched without following it (`fsops`), how metadata is applied
//! (`apply`), how file content is shared or copied with its holes (`copy`), who the process is
//! (`identity`) and how ids are mapped for rootless use (`idmap`, `userns`) and shifted by
//! idmapped mounts (`idmount`), image owners recorded in xattrs (`owners`), how lists of lower
//! layers are written (`lowers`), how layer tar streams are read and written (`compress`,
//! `tarin`, `extract`, `tarout`, `pgzip`), how an upper is read against its lowers (`upper`),
//! how outputs are staged and cleaned up on a signal (`staging`), which directories mounted
//! overlays use (`mounts`), and what an OCI image layout holds and how it is read and written
//! (`oci`).
//!
//! The modules are private: what the tools, the tests and xtask use is re-exported here, and
//! everything else is `pub(crate)`, so the compiler reports what nobody uses. A few names are
//! re-exported under a longer one where the module's name said what they are about.

#![warn(unreachable_pub)]

mod apply;
mod compress;
mod copy;
mod extract;
mod fsops;
mod identity;
mod idmap;
mod idmount;
mod lowers;
mod message;
mod mounts;
mod oci;
mod owners;
mod path;
mod pgzip;
mod progress;
mod root;
mod staging;
mod tarin;
mod tarout;
mod umask;
mod upper;
mod userns;
mod whiteout;
mod writers;
mod xattrs;

pub use apply::{How, Meta, Target, apply};
pub use compress::{Compression, ThreadedReader, decoder};
pub use copy::{Filled, Filler, data_chunks};
pub use extract::{
    ExtractError, ExtractOptions, ExtractStats, OwnerPolicy, Pending, Resolved, extract_deferred,
    extract_file_onto, extract_onto,
};
pub use fsops::{
    create_file_at, cstr, is_dir, link_at, open_dir_at, open_file_at, proc_path, remove_at, stat_at,
};
pub use identity::{Identity, Reexec};
pub use idmap::{
    IdMap, IdRange, ROOTLESS_RANGE, RootlessMaps, SubRange, rootless_map, shift_maps, user_name,
};
pub use idmount::{IdmapMountError, UsernsFd, attach as attach_idmapped, idmapped_clone, join_raw};
pub use lowers::{
    LowerError, escape as escape_lower, escape_fuse as escape_lower_fuse, join as join_lowers,
    join_fuse as join_lowers_fuse, parse as parse_lowers, parse_all as parse_lower_args,
};
pub use message::error_chain;
pub use mounts::{find_use, mounted_at, mounted_overlays, overlay_using, own_mounts};
pub use oci::digest::{Digest, VerifyingReader};
pub use oci::layout::{Blob, Layout, blob_name};
pub use oci::spec::{
    CONFIG_TYPE, Descriptor, History, ImageConfig, Index as ImageIndex, MANIFEST_TYPE, Manifest,
    REF_NAME, to_json,
};
pub use oci::write::TempFile;
pub use oci::{LayoutRef, OciError, host_arch};
pub use owners::{FUSE_OVERRIDE_XATTR, recorded as recorded_owner, records as owner_records};
pub use path::{LayerPath, display_bytes, display_str};
pub use pgzip::{
    DEFAULT_LEVEL as GZIP_DEFAULT_LEVEL, GzOptions, LEVELS as GZIP_LEVELS,
    compress as compress_gzip,
};
pub use progress::{Progress, ProgressReader};
pub use root::Root;
pub use staging::{
    Flush, HOLD_ENV as STAGING_HOLD_ENV, Scratch, StagedFile, Staging, StagingError, Steps,
    cleanup_started, step_boundary, sweep_beside,
};
pub use tarout::{Data as TarData, TarEntry, TarKind, TarOptions, TarSummary, TarWriter};
pub use upper::lower_stack::{DirStack, LowerStack};
pub use upper::meta::special_kind;
pub use upper::{
    Change, Entry, Kind, Layer, Meta as MergedMeta, Source, Upper, UpperError, UpperOptions,
    lower_holds_host_ids,
};
pub use userns::{
    ENV_IN_USERNS, UsernsError, UsernsPlan, current_maps, exit_code, in_userns, reexec_self,
    spawn_in_userns, which,
};
pub use whiteout::{
    FUSE_OPAQUE_DEVICE, FUSE_PRIVATE_PREFIX, OPAQUE_MARKER, OciName, XattrNs, classify_oci_name,
    escape_xattr, key as overlay_key, makes_opaque, public_xattrs, remove_private_xattrs,
    whiteout_name,
};
pub use xattrs::{Xattr, list_fd as list_xattrs_fd, list_path as list_xattrs};
