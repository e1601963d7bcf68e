//! ovl-layer: the shared core of the ovl tools.
//!
//! The data model lives here once: what a whiteout or an opaque directory is in every form
//! ([`whiteout`]), how names are normalised ([`path`]) and confined to a root ([`root`]), how
//! one name in a directory is touched without following it ([`fsops`]), how file content is
//! shared or copied with its holes ([`copy`]), who the process is ([`identity`]) and how ids are
//! mapped for rootless use ([`idmap`], [`userns`]) and shifted by idmapped mounts
//! ([`idmount`]), and image owners recorded in xattrs ([`owners`]), how lists of lower layers
//! are written ([`lowers`]), how layer tar streams are read and written ([`compress`],
//! [`extract`]), which directories mounted overlays use ([`mounts`]), and what an OCI image
//! layout holds and how it is read and written ([`oci`]).

pub mod apply;
pub mod compress;
pub mod copy;
pub mod extract;
pub mod fsops;
pub mod identity;
pub mod idmap;
pub mod idmount;
pub mod lowers;
pub mod message;
pub mod mounts;
pub mod oci;
pub mod owners;
pub mod path;
pub mod pgzip;
pub mod progress;
pub mod root;
pub mod staging;
pub mod tarin;
pub mod tarout;
pub mod upper;
pub mod userns;
pub mod whiteout;
pub mod xattrs;
