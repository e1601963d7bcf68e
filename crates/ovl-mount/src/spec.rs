//! What the user asked for: the layers, the mount point, the driver and id-map choices.
//!
//! Owns the plain data every other module reads, and the reading of `--lower DIR[:DIR...]`
//! (leftmost is the top layer, escaped as in overlayfs' `lowerdir=`, by the one parser in
//! ovl-layer's `lowers`); it makes no system calls.

use std::ffi::{OsStr, OsString};
use std::path::PathBuf;

use ovl_layer::RootlessMaps;

use crate::error::{MountError, Result};

/// Which overlay implementation mounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DriverChoice {
    /// Kernel overlayfs as root; as a user, kernel overlayfs with `userxattr` in the user
    /// namespace when the kernel allows it, else fuse-overlayfs.
    #[default]
    Auto,
    Kernel,
    Fuse,
}

impl std::str::FromStr for DriverChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "kernel" => Ok(Self::Kernel),
            "fuse" => Ok(Self::Fuse),
            _ => Err(format!("unknown driver {s:?}: use auto, kernel or fuse")),
        }
    }
}

/// Which id map a rootless mount uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IdmapChoice {
    /// Subordinate ids when the user has them, else a single-id map (with a warning).
    #[default]
    Auto,
    /// Subordinate ids, or an error.
    Subids,
    /// Only the user's own id (container root).
    Single,
}

impl std::str::FromStr for IdmapChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "subids" => Ok(Self::Subids),
            "single" => Ok(Self::Single),
            _ => Err(format!("unknown id map {s:?}: use auto, subids or single")),
        }
    }
}

/// One mount request.
#[derive(Debug, Clone, Default)]
pub struct MountSpec {
    /// Lower directories, top first.
    pub lowers: Vec<PathBuf>,
    pub upper: Option<PathBuf>,
    pub work: Option<PathBuf>,
    pub merged: PathBuf,
    pub driver: DriverChoice,
    pub idmap: IdmapChoice,
    /// Run the command with MERGED as its root (with /proc and a minimal /dev).
    pub chroot: bool,
    /// The command to run inside; empty for a persistent mount.
    pub command: Vec<OsString>,
    /// Say which driver and why, and what was mounted.
    pub verbose: bool,
    /// Use mount(2) with one option page even where `lowerdir+` exists (tests the fallback).
    pub legacy_mount_api: bool,
    /// The fuse-overlayfs program (default: looked up in PATH).
    pub fuse_program: Option<PathBuf>,
    /// The fuse device to check (default /dev/fuse).
    pub fuse_device: Option<PathBuf>,
    /// `--uidmap`/`--gidmap` (real root): run CMD in a user namespace with these maps, the
    /// lowers seen through idmapped mounts.
    pub shift: Option<RootlessMaps>,
    /// With `shift`: the lowers already hold host ids (`ovl-import --uidmap`); mount them as
    /// they are.
    pub shifted_lowers: bool,
    /// Under a single-id map: present the owners and modes ovl-import recorded in xattrs,
    /// through fuse-overlayfs with `xattr_permissions=2` (see ovl-layer's `owners`).
    pub recorded_owners: bool,
}

impl MountSpec {
    /// Parse every `--lower` value as a `lowerdir=` list ([`ovl_layer::parse_lowers`]: `:`
    /// separates, `\:` is a colon in a name) and append the layers, top first.
    pub fn parse_lowers<I, S>(values: I) -> Result<Vec<PathBuf>>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        ovl_layer::parse_lower_args(values).map_err(|e| match e {
            ovl_layer::LowerError::None => MountError::NoLower,
            e => MountError::BadLower(e),
        })
    }

    /// True for the persistent form (no command).
    pub fn persistent(&self) -> bool {
        self.command.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowers_split_on_colons_top_first_and_repeat() {
        let l = MountSpec::parse_lowers(["a:b", "/c"]).unwrap();
        assert_eq!(
            l,
            [PathBuf::from("a"), PathBuf::from("b"), PathBuf::from("/c")]
        );
        assert!(matches!(
            MountSpec::parse_lowers(["a::b"]),
            Err(MountError::BadLower(_))
        ));
        assert_eq!(
            MountSpec::parse_lowers(["a\\:b"]).unwrap(),
            [PathBuf::from("a:b")]
        );
        assert!(matches!(
            MountSpec::parse_lowers(Vec::<String>::new()),
            Err(MountError::NoLower)
        ));
    }

    #[test]
    fn choices_parse() {
        assert_eq!("fuse".parse::<DriverChoice>(), Ok(DriverChoice::Fuse));
        assert!("zfs".parse::<DriverChoice>().is_err());
        assert_eq!("single".parse::<IdmapChoice>(), Ok(IdmapChoice::Single));
    }
}
