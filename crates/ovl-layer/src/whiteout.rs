//! Whiteouts and opaque directories: the OCI layer forms and the overlay upperdir forms.
//!
//! Owns every rule about markers so no tool re-derives them:
//! - OCI names: `.wh.NAME` deletes NAME, `.wh..wh..opq` makes its directory opaque, and the
//!   names `.wh.`, `.wh..`, `.wh...` are invalid.
//! - overlay xattrs in the two namespaces (`trusted.overlay.*` as root, `user.overlay.*` for
//!   rootless `userxattr` mounts), and the kernel's escaping of `overlay.*` xattrs that come from
//!   outside (`trusted.overlay.X` is stored as `trusted.overlay.overlay.X`).
//! - how an entry of an upperdir is classified: kernel 0/0 char device whiteouts, xattr
//!   whiteouts (Linux >= 6.7; only in a directory marked `opaque=x`), and fuse-overlayfs's
//!   `.wh.` files and `.wh..opq` devices.
//! - which xattrs are the overlay's own, not content ([`public_xattrs`]).
//!
//! And writes the markers: the whiteout device ([`make_whiteout`]) and the opaque xattr
//! ([`set_opaque`]); removes the overlay's xattrs from an entry ([`remove_private_xattrs`]).

use std::borrow::Cow;
use std::ffi::CStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd};

use crate::xattrs::Xattr;
use rustix::fs::{FileType, Mode};

/// Prefix of an OCI whiteout name.
pub(crate) const WH_PREFIX: &[u8] = b".wh.";
/// The OCI opaque-directory marker (also written by fuse-overlayfs as a regular file).
pub const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
/// fuse-overlayfs's second opaque marker, a 0/0 char device.
pub const FUSE_OPAQUE_DEVICE: &[u8] = b".wh..opq";
/// fuse-overlayfs's xattr on opaque directories when it runs rootless.
pub(crate) const FUSE_OPAQUE_XATTR: &str = "user.fuseoverlayfs.opaque";
/// Prefix of fuse-overlayfs's private xattrs.
pub const FUSE_PRIVATE_PREFIX: &str = "user.fuseoverlayfs.";

/// What a base name in an OCI layer tar means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OciName<'a> {
    /// An ordinary entry.
    Plain,
    /// `.wh.NAME`: NAME is deleted.
    Whiteout(&'a [u8]),
    /// `.wh..wh..opq`: the containing directory is opaque.
    Opaque,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid whiteout name {name:?}: it names no file to delete")]
pub struct InvalidWhiteout {
    pub name: String,
}

/// Classify the last component of a layer path.
pub fn classify_oci_name(base: &[u8]) -> Result<OciName<'_>, InvalidWhiteout> {
    if base == OPAQUE_MARKER {
        return Ok(OciName::Opaque);
    }
    match base.strip_prefix(WH_PREFIX) {
        None => Ok(OciName::Plain),
        Some(b"" | b"." | b"..") => Err(InvalidWhiteout {
            name: String::from_utf8_lossy(base).into_owned(),
        }),
        Some(target) if target.contains(&b'/') => Err(InvalidWhiteout {
            name: String::from_utf8_lossy(base).into_owned(),
        }),
        Some(target) => Ok(OciName::Whiteout(target)),
    }
}

/// The OCI whiteout name for `name`.
pub fn whiteout_name(name: &[u8]) -> Vec<u8> {
    [WH_PREFIX, name].concat()
}

/// Which xattr namespace the overlay markers live in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XattrNs {
    /// `trusted.overlay.*`: a kernel mount made by real root.
    Trusted,
    /// `user.overlay.*`: a rootless kernel mount with `userxattr`.
    User,
}

impl XattrNs {
    pub const ALL: [XattrNs; 2] = [XattrNs::Trusted, XattrNs::User];

    /// `trusted.overlay.` or `user.overlay.`
    pub fn prefix(self) -> &'static str {
        match self {
            XattrNs::Trusted => "trusted.overlay.",
            XattrNs::User => "user.overlay.",
        }
    }

    /// The full name of overlay xattr `key` (e.g. `opaque`) in this namespace.
    pub fn name(self, key: &str) -> String {
        format!("{}{key}", self.prefix())
    }
}

/// The overlay xattr keys (after the namespace prefix) the kernel uses.
pub mod key {
    pub(crate) const OPAQUE: &str = "opaque";
    pub(crate) const WHITEOUT: &str = "whiteout";
    pub const REDIRECT: &str = "redirect";
    pub(crate) const METACOPY: &str = "metacopy";
    /// On a file copied up through the inodes index (`index=on`): its link count in the merged
    /// view, `U[+-]N` relative to the upper inode's (index link included) or `L[+-]N` relative
    /// to the lower inode's.
    pub(crate) const NLINK: &str = "nlink";
}

/// Value of `overlay.opaque` on a directory hidden from below.
pub(crate) const OPAQUE_YES: &[u8] = b"y";
/// Value of `overlay.opaque` on a directory that holds xattr whiteouts (not itself opaque).
pub(crate) const OPAQUE_HAS_XWHITEOUTS: &[u8] = b"x";

/// Escape an xattr that comes from outside so the kernel never reads it as an overlay marker:
/// `trusted.overlay.X` -> `trusted.overlay.overlay.X` (same for `user.overlay.`).
pub fn escape_xattr(name: &[u8]) -> Cow<'_, [u8]> {
    for ns in XattrNs::ALL {
        if let Some(rest) = name.strip_prefix(ns.prefix().as_bytes()) {
            return Cow::Owned([ns.prefix().as_bytes(), b"overlay.", rest].concat());
        }
    }
    Cow::Borrowed(name)
}

/// What an xattr read from an upperdir becomes in a layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum UpperXattr<'a> {
    /// An overlay-private marker: never exported.
    Private,
    /// An ordinary xattr, possibly unescaped from `overlay.overlay.*`.
    Keep(Cow<'a, [u8]>),
}

/// Classify an xattr of an upperdir entry.
pub(crate) fn classify_upper_xattr(name: &[u8]) -> UpperXattr<'_> {
    if name.starts_with(FUSE_PRIVATE_PREFIX.as_bytes()) {
        return UpperXattr::Private;
    }
    for ns in XattrNs::ALL {
        if let Some(rest) = name.strip_prefix(ns.prefix().as_bytes()) {
            return match rest.strip_prefix(b"overlay.") {
                Some(orig) => UpperXattr::Keep(Cow::Owned([ns.prefix().as_bytes(), orig].concat())),
                None => UpperXattr::Private,
            };
        }
    }
    UpperXattr::Keep(Cow::Borrowed(name))
}

/// The xattrs of an entry that are content, not the overlay's own markers (names as stored:
/// an escaped `overlay.overlay.*` is content). An owner record (`crate::owners`) is content
/// of a layer on disk too, though named like fuse-overlayfs' private xattrs: a copy of the
/// entry keeps it (it is never exported; `crate::upper` folds it into the owner).
pub fn public_xattrs(xattrs: &[Xattr]) -> Vec<Xattr> {
    xattrs
        .iter()
        .filter(|(n, _)| {
            matches!(classify_upper_xattr(n), UpperXattr::Keep(_))
                || crate::owners::is_owner_record(n)
        })
        .cloned()
        .collect()
}

/// Make NAME in DIR a whiteout, as the kernel makes them: a 0/0 char device, mode 0.
pub(crate) fn make_whiteout(dir: &impl AsFd, name: &CStr) -> io::Result<()> {
    rustix::fs::mknodat(dir, name, FileType::CharacterDevice, Mode::empty(), 0).map_err(Into::into)
}

/// Mark the directory open as `fd` opaque (`overlay.opaque=y` in namespace `ns`).
pub(crate) fn set_opaque(fd: &impl AsFd, ns: XattrNs) -> io::Result<()> {
    // `fd` may be an O_PATH fd, which fsetxattr refuses: go through its /proc entry.
    let path = format!("/proc/self/fd/{}/.", fd.as_fd().as_raw_fd());
    rustix::fs::lsetxattr(
        path.as_str(),
        ns.name(key::OPAQUE).as_str(),
        OPAQUE_YES,
        rustix::fs::XattrFlags::empty(),
    )
    .map_err(Into::into)
}

/// Remove the overlay's own xattrs (markers, origin, redirect, ...) of NAME in DIR, so that a
/// link to it elsewhere carries none. Returns whether there were any.
pub fn remove_private_xattrs(dir: &impl AsRawFd, name: &CStr) -> io::Result<bool> {
    let mut any = false;
    for (n, _) in crate::xattrs::list_at(dir, name)? {
        if classify_upper_xattr(&n) == UpperXattr::Private {
            match crate::xattrs::remove_at(dir, name, &n) {
                Ok(()) => any = true,
                Err(e) if e.raw_os_error() == Some(libc::ENODATA) => any = true,
                Err(e) => return Err(e),
            }
        }
    }
    Ok(any)
}

/// The facts about one upperdir entry that decide what it means.
#[derive(Clone, Copy)]
pub(crate) struct UpperFacts<'a> {
    pub name: &'a [u8],
    pub is_char_device: bool,
    pub is_regular: bool,
    pub rdev: u64,
    pub size: u64,
    /// The parent directory is marked `overlay.opaque=x` ([`dir_has_xwhiteouts`]): only there
    /// is a file with `overlay.whiteout` a whiteout.
    pub parent_xwhiteouts: bool,
    /// Looks up an xattr of the entry by full name.
    pub xattr: &'a dyn Fn(&str) -> Option<Vec<u8>>,
}

/// What one upperdir entry means in the merged view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum UpperEntry {
    /// An ordinary entry.
    Plain,
    /// This name is deleted (kernel 0/0 char device or xattr whiteout).
    Whiteout,
    /// A fuse-overlayfs `.wh.NAME` file: the sibling NAME is deleted.
    WhiteoutOf(Vec<u8>),
    /// A marker that makes its parent opaque and is not content itself.
    OpaqueMarker,
}

/// Classify an upperdir entry. Decide this before hardlink tracking: kernel whiteouts share one
/// inode.
pub(crate) fn classify_upper(f: &UpperFacts<'_>) -> UpperEntry {
    if f.name == OPAQUE_MARKER && (f.is_regular || f.is_char_device) {
        return UpperEntry::OpaqueMarker;
    }
    if f.name == FUSE_OPAQUE_DEVICE && f.is_char_device && f.rdev == 0 {
        return UpperEntry::OpaqueMarker;
    }
    if f.is_char_device && f.rdev == 0 {
        return UpperEntry::Whiteout;
    }
    // An xattr whiteout counts only inside a directory marked `opaque=x` (overlayfs.rst):
    // elsewhere the kernel shows it as an ordinary empty file.
    if f.is_regular
        && f.size == 0
        && f.parent_xwhiteouts
        && XattrNs::ALL
            .iter()
            .any(|ns| (f.xattr)(&ns.name(key::WHITEOUT)).is_some())
    {
        return UpperEntry::Whiteout;
    }
    if f.is_regular {
        if let Some(target) = f.name.strip_prefix(WH_PREFIX) {
            if !target.is_empty() && target != b"." && target != b".." {
                return UpperEntry::WhiteoutOf(target.to_vec());
            }
        }
    }
    UpperEntry::Plain
}

/// True when an upperdir directory hides everything below it, judged by its own xattrs
/// (`overlay.opaque=y` in either namespace, or fuse-overlayfs's rootless marker). A child
/// [`UpperEntry::OpaqueMarker`] also makes it opaque: the caller sees those while listing.
pub(crate) fn dir_is_opaque(xattr: &dyn Fn(&str) -> Option<Vec<u8>>) -> bool {
    XattrNs::ALL
        .iter()
        .map(|ns| ns.name(key::OPAQUE))
        .chain([FUSE_OPAQUE_XATTR.to_string()])
        .any(|n| (xattr)(&n).is_some_and(|v| makes_opaque(n.as_bytes(), &v)))
}

/// True when the xattr NAME=VALUE makes the directory it is on opaque (see `dir_is_opaque`).
/// `overlay.opaque=x` does not: it only says the directory holds xattr whiteouts.
pub fn makes_opaque(name: &[u8], value: &[u8]) -> bool {
    if name == FUSE_OPAQUE_XATTR.as_bytes() {
        return value.first() == Some(&b'y') || value.is_empty();
    }
    value == OPAQUE_YES
        && XattrNs::ALL
            .iter()
            .any(|ns| name.strip_prefix(ns.prefix().as_bytes()) == Some(key::OPAQUE.as_bytes()))
}

/// True when a directory is marked as holding xattr whiteouts (`overlay.opaque=x` in either
/// namespace); such a directory is not itself opaque.
pub(crate) fn dir_has_xwhiteouts(xattr: &dyn Fn(&str) -> Option<Vec<u8>>) -> bool {
    XattrNs::ALL
        .iter()
        .any(|ns| (xattr)(&ns.name(key::OPAQUE)).as_deref() == Some(OPAQUE_HAS_XWHITEOUTS))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oci_names() {
        assert_eq!(classify_oci_name(b"foo"), Ok(OciName::Plain));
        assert_eq!(classify_oci_name(b".wh.foo"), Ok(OciName::Whiteout(b"foo")));
        assert_eq!(classify_oci_name(b".wh..wh..opq"), Ok(OciName::Opaque));
        assert_eq!(
            classify_oci_name(b".wh..wh.foo"),
            Ok(OciName::Whiteout(b".wh.foo"))
        );
        for bad in [&b".wh."[..], b".wh..", b".wh..."] {
            assert!(classify_oci_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn escaping_and_upper_xattrs() {
        assert_eq!(
            escape_xattr(b"trusted.overlay.opaque"),
            b"trusted.overlay.overlay.opaque".as_slice()
        );
        assert_eq!(
            escape_xattr(b"user.overlay.x"),
            b"user.overlay.overlay.x".as_slice()
        );
        assert_eq!(escape_xattr(b"user.foo"), b"user.foo".as_slice());
        // Names are bytes: one that is not UTF-8 is escaped and classified all the same.
        assert_eq!(
            escape_xattr(b"trusted.overlay.\xff"),
            b"trusted.overlay.overlay.\xff".as_slice()
        );
        assert_eq!(
            classify_upper_xattr(b"user.overlay.overlay.\xfe"),
            UpperXattr::Keep(Cow::Borrowed(b"user.overlay.\xfe".as_slice()))
        );
        assert_eq!(
            classify_upper_xattr(b"user.overlay.\xfe"),
            UpperXattr::Private
        );
        assert_eq!(
            classify_upper_xattr(b"trusted.overlay.origin"),
            UpperXattr::Private
        );
        assert_eq!(
            classify_upper_xattr(b"user.fuseoverlayfs.opaque"),
            UpperXattr::Private
        );
        assert_eq!(
            classify_upper_xattr(b"trusted.overlay.overlay.opaque"),
            UpperXattr::Keep(Cow::Borrowed(b"trusted.overlay.opaque".as_slice()))
        );
        assert_eq!(
            classify_upper_xattr(b"security.capability"),
            UpperXattr::Keep(Cow::Borrowed(b"security.capability".as_slice()))
        );
    }

    #[test]
    fn upper_entries() {
        let none = |_: &str| None;
        let facts = |name: &'static [u8], chr: bool, reg: bool| UpperFacts {
            name,
            is_char_device: chr,
            is_regular: reg,
            rdev: 0,
            size: 0,
            parent_xwhiteouts: false,
            xattr: &none,
        };
        assert_eq!(
            classify_upper(&facts(b"a", true, false)),
            UpperEntry::Whiteout
        );
        assert_eq!(
            classify_upper(&facts(b".wh..opq", true, false)),
            UpperEntry::OpaqueMarker
        );
        assert_eq!(
            classify_upper(&facts(b".wh..wh..opq", false, true)),
            UpperEntry::OpaqueMarker
        );
        assert_eq!(
            classify_upper(&facts(b".wh.x", false, true)),
            UpperEntry::WhiteoutOf(b"x".to_vec())
        );
        assert_eq!(classify_upper(&facts(b"x", false, true)), UpperEntry::Plain);
        let wh = |n: &str| (n == "user.overlay.whiteout").then(Vec::new);
        let f = UpperFacts {
            xattr: &wh,
            ..facts(b"x", false, true)
        };
        // Not in a directory marked opaque=x: an ordinary empty file.
        assert_eq!(classify_upper(&f), UpperEntry::Plain);
        let f = UpperFacts {
            parent_xwhiteouts: true,
            ..f
        };
        assert_eq!(classify_upper(&f), UpperEntry::Whiteout);
        let opq = |n: &str| (n == "trusted.overlay.opaque").then(|| b"y".to_vec());
        assert!(dir_is_opaque(&opq));
        let x = |n: &str| (n == "trusted.overlay.opaque").then(|| b"x".to_vec());
        assert!(!dir_is_opaque(&x));
        assert!(dir_has_xwhiteouts(&x));
        assert!(!dir_has_xwhiteouts(&opq));
    }

    #[test]
    fn opaque_xattrs() {
        assert!(makes_opaque(b"trusted.overlay.opaque", b"y"));
        assert!(makes_opaque(b"user.overlay.opaque", b"y"));
        assert!(!makes_opaque(b"user.overlay.opaque", b"x"));
        assert!(!makes_opaque(b"user.overlay.overlay.opaque", b"y"));
        assert!(makes_opaque(FUSE_OPAQUE_XATTR.as_bytes(), b""));
        assert!(makes_opaque(FUSE_OPAQUE_XATTR.as_bytes(), b"y"));
        assert!(!makes_opaque(b"user.foo", b"y"));
    }

    /// The markers written here read back as what they are with the rules above, and the
    /// overlay's own xattrs are removed, the content ones kept.
    #[test]
    fn markers_written_read_back() {
        if !ovl_tests::require("root (for mknod)", ovl_tests::is_root()) {
            return;
        }
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("d")).unwrap();
        let open = |p: &std::path::Path| {
            rustix::fs::open(
                p,
                rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY,
                Mode::empty(),
            )
            .unwrap()
        };
        let top = open(t.path());
        make_whiteout(&top, c"gone").unwrap();
        let st = rustix::fs::lstat(t.path().join("gone")).unwrap();
        let none = |_: &str| None;
        let facts = UpperFacts {
            name: b"gone",
            is_char_device: FileType::from_raw_mode(st.st_mode) == FileType::CharacterDevice,
            is_regular: false,
            rdev: st.st_rdev,
            size: 0,
            parent_xwhiteouts: false,
            xattr: &none,
        };
        assert_eq!(classify_upper(&facts), UpperEntry::Whiteout);

        let d = t.path().join("d");
        for ns in XattrNs::ALL {
            set_opaque(&open(&d), ns).unwrap();
            let get = |n: &str| xattr::get(&d, n).unwrap();
            assert!(dir_is_opaque(&get));
            assert!(!dir_has_xwhiteouts(&get));
        }
        xattr::set(&d, "user.keep", b"k").unwrap();
        assert!(remove_private_xattrs(&top, c"d").unwrap());
        let left = crate::xattrs::list_path(&d).unwrap();
        assert_eq!(public_xattrs(&left), left, "overlay xattrs left");
        assert!(left.contains(&(b"user.keep".to_vec(), b"k".to_vec())));
        assert!(!remove_private_xattrs(&top, c"d").unwrap());
    }
}
