//! Recorded owners: image owners and modes kept in xattrs where they cannot be real (rootless
//! without subordinate ids, where every file belongs to the one user).
//!
//! Owns the two records and which one wins:
//! - fuse-overlayfs' `user.fuseoverlayfs.override_stat`, value `UID:GID:MODE` (decimal ids,
//!   octal mode with setuid/setgid/sticky). fuse-overlayfs 1.10 (read from its source, main.c
//!   and direct.c): a layer whose root directory carries `security.fuseoverlayfs.override_stat`,
//!   else `user.fuseoverlayfs.override_stat`, else `user.containers.override_stat`, has its
//!   owners and modes presented from that xattr (directories and regular files only); with
//!   `-o xattr_permissions=2` the upper uses `user.fuseoverlayfs.override_stat`, written on every
//!   create, chown and chmod. So ovl-import writes that name (the same one the upper gets), on
//!   the layer root too; containers/storage's `user.containers.override_stat`
//!   (`UID:GID:MODE:TYPE`) is read as well.
//! - umoci's `user.rootlesscontainers` (a protobuf `{uid = 1; gid = 2}`), for interop.
//!
//! Reading, an override_stat wins over `user.rootlesscontainers` (fuse-overlayfs updates only
//! the former on a chown inside, and copies the latter up unchanged); see [`recorded`] for
//! whose mode is right.
//!
//! fuse-overlayfs 1.10 with `xattr_permissions=2` records a copied-up or new file as mode 0755
//! whatever its mode was (fixed in 1.14: "honor umask with xattr_permissions"): a copy-up of a
//! 0600 file shows as 0755 after the next mount. So ovl-mount presents the records that way
//! only when asked (`--recorded-owners`); by default a single-id mount is a kernel overlay,
//! which copies the records up with the file and leaves the file's own mode exact. None of these records is
//! part of a layer: they are stripped from what ovl-diff exports and from what an archive may set.

use crate::xattrs::Xattr;

/// fuse-overlayfs' override xattr in unprivileged mode (`xattr_permissions=2`).
pub const FUSE_OVERRIDE_XATTR: &str = "user.fuseoverlayfs.override_stat";
/// containers/storage's override xattr (`UID:GID:MODE:TYPE`).
pub(crate) const CONTAINERS_OVERRIDE_XATTR: &str = "user.containers.override_stat";
/// umoci's rootless owner record.
pub(crate) const ROOTLESS_XATTR: &str = "user.rootlesscontainers";

/// True for an xattr that records an owner (never exported, never taken from an archive).
pub(crate) fn is_owner_record(name: &[u8]) -> bool {
    name == FUSE_OVERRIDE_XATTR.as_bytes()
        || name == CONTAINERS_OVERRIDE_XATTR.as_bytes()
        || name == ROOTLESS_XATTR.as_bytes()
        || name == b"security.fuseoverlayfs.override_stat"
}

/// The value of [`FUSE_OVERRIDE_XATTR`] for an owner and permission bits.
pub(crate) fn encode_override(uid: u32, gid: u32, mode: u32) -> Vec<u8> {
    format!("{uid}:{gid}:{:o}", mode & 0o7777).into_bytes()
}

/// `(uid, gid, mode)` from an override_stat value (`UID:GID:MODE[:TYPE]`); the mode as
/// written, which fuse-overlayfs writes with the file type bits (`100644`).
pub(crate) fn decode_override(value: &[u8]) -> Option<(u32, u32, u32)> {
    let text = std::str::from_utf8(value).ok()?;
    let mut f = text.trim_end_matches('\0').split(':');
    let uid = f.next()?.parse().ok()?;
    let gid = f.next()?.parse().ok()?;
    let mode = u32::from_str_radix(f.next()?, 8).ok()?;
    (mode <= 0o177_777).then_some((uid, gid, mode))
}

/// Encode umoci's rootlesscontainers `Resource { uint32 uid = 1; uint32 gid = 2; }`.
pub(crate) fn encode_rootless(uid: u32, gid: u32) -> Vec<u8> {
    fn varint(out: &mut Vec<u8>, mut v: u32) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    let mut out = Vec::new();
    if uid != 0 {
        out.push(0x08);
        varint(&mut out, uid);
    }
    if gid != 0 {
        out.push(0x10);
        varint(&mut out, gid);
    }
    out
}

/// The records ovl-import writes for an owner and mode: `user.rootlesscontainers` for a
/// non-root owner, and the override_stat for a file or directory (`file_or_dir`; the only
/// kinds fuse-overlayfs presents it for, and `user.*` xattrs are refused on the others).
pub fn records(uid: u32, gid: u32, mode: u32, file_or_dir: bool) -> Vec<Xattr> {
    let mut out = Vec::new();
    if uid != 0 || gid != 0 {
        out.push((ROOTLESS_XATTR.into(), encode_rootless(uid, gid)));
    }
    if file_or_dir {
        out.push((FUSE_OVERRIDE_XATTR.into(), encode_override(uid, gid, mode)));
    }
    out
}

/// `(uid, gid)` from a rootlesscontainers value (absent fields are 0).
pub(crate) fn decode_rootless(value: &[u8]) -> Option<(u32, u32)> {
    let (mut uid, mut gid) = (0u32, 0u32);
    let mut i = 0;
    let varint = |i: &mut usize| -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *value.get(*i)?;
            *i += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    };
    while i < value.len() {
        let key = varint(&mut i)?;
        if key & 7 != 0 {
            return None; // only varint fields are defined
        }
        let v = u32::try_from(varint(&mut i)?).ok()?;
        match key >> 3 {
            1 => uid = v,
            2 => gid = v,
            _ => {}
        }
    }
    Some((uid, gid))
}

/// What the records among `xattrs` say: `(uid, gid, Some(mode))` when the record holds the
/// real mode, `(uid, gid, None)` when the file's own mode is the real one (rootlesscontainers
/// alone, or an override_stat as ovl-import writes it), `None` without a (valid) record.
pub fn recorded<'a>(
    xattrs: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
) -> Option<(u32, u32, Option<u32>)> {
    let mut fuse = None;
    let mut containers = None;
    let mut rootless = None;
    for (name, value) in xattrs {
        if name == FUSE_OVERRIDE_XATTR.as_bytes() {
            fuse = decode_override(value);
        } else if name == CONTAINERS_OVERRIDE_XATTR.as_bytes() {
            containers = decode_override(value);
        } else if name == ROOTLESS_XATTR.as_bytes() {
            rootless = decode_rootless(value);
        }
    }
    // Whose mode is right: fuse-overlayfs (`xattr_permissions`) and containers/storage keep
    // the real mode only in the record (the file's own is 0755 or a forced mask); ovl-import
    // and ovl-squash keep the file's own mode exact and record permission bits only, so there
    // a chmod through a kernel overlay (which copies the record up unchanged) is the truth.
    if let Some((u, g, m)) = containers {
        return Some((u, g, Some(m & 0o7777)));
    }
    if let Some((u, g, m)) = fuse {
        return Some((u, g, (m & !0o7777 != 0).then_some(m & 0o7777)));
    }
    rootless.map(|(u, g)| (u, g, None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn override_values_as_fuse_overlayfs_writes_them() {
        assert_eq!(encode_override(0, 42, 0o640), b"0:42:640");
        assert_eq!(encode_override(1000, 1000, 0o104755), b"1000:1000:4755");
        assert_eq!(decode_override(b"0:42:640"), Some((0, 42, 0o640)));
        assert_eq!(decode_override(b"5:6:755:dir"), Some((5, 6, 0o755)));
        assert_eq!(decode_override(b"5:6"), None);
        assert_eq!(decode_override(b"x:6:1"), None);
        assert_eq!(decode_override(b"1:6:99"), None);
        assert_eq!(decode_override(b"0:0:100755"), Some((0, 0, 0o100755)));
    }

    #[test]
    fn rootless_roundtrip_and_precedence() {
        for (u, g) in [(0, 0), (42, 0), (0, 42), (1000, 300), (u32::MAX - 1, 70000)] {
            assert_eq!(decode_rootless(&encode_rootless(u, g)), Some((u, g)));
        }
        assert_eq!(encode_rootless(42, 0), vec![0x08, 42]);
        assert_eq!(decode_rootless(&[0x08]), None);
        let rl = encode_rootless(7, 8);
        assert_eq!(
            recorded([(ROOTLESS_XATTR.as_bytes(), rl.as_slice())]),
            Some((7, 8, None))
        );
        assert_eq!(
            recorded([
                (ROOTLESS_XATTR.as_bytes(), rl.as_slice()),
                (FUSE_OVERRIDE_XATTR.as_bytes(), b"0:0:644".as_slice())
            ]),
            Some((0, 0, None))
        );
        assert_eq!(
            recorded([(FUSE_OVERRIDE_XATTR.as_bytes(), b"0:42:100640".as_slice())]),
            Some((0, 42, Some(0o640)))
        );
        assert_eq!(
            recorded([(
                CONTAINERS_OVERRIDE_XATTR.as_bytes(),
                b"1:2:755:dir".as_slice()
            )]),
            Some((1, 2, Some(0o755)))
        );
        assert_eq!(
            recorded([(b"user.other".as_slice(), b"x".as_slice())]),
            None
        );
        assert!(
            is_owner_record(ROOTLESS_XATTR.as_bytes()) && !is_owner_record(b"user.overlay.opaque")
        );
    }
}
