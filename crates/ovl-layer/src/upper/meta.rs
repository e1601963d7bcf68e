//! The metadata a layer carries for an entry: container ids (host ids mapped back when
//! asked), xattrs with overlay-private ones dropped and escaped ones unescaped,
//! `security.selinux` dropped and `security.capability` in its namespace-root form; and the
//! kind of a special file.

use std::ffi::CStr;
use std::io;
use std::os::fd::AsFd;

use rustix::fs::{FileType, Stat};

use super::node::Node;
use super::{Kind, Meta, Upper, UpperError};
use crate::path::LayerPath;
use crate::whiteout::{self, UpperXattr};

/// The layer metadata of a node: container ids (host ids mapped back through `ids`, the map
/// of the layer the node is in), filtered xattrs.
pub(super) fn meta(
    up: &Upper,
    path: &LayerPath,
    node: &Node,
    ids: Option<&crate::idmap::RootlessMaps>,
) -> Result<Meta, UpperError> {
    let st = &node.st;
    let (mut uid, mut gid) = (st.st_uid, st.st_gid);
    let mut mode = st.st_mode & 0o7777;
    let mut root_uid_map: Option<&crate::idmap::IdMap> = None;
    // An owner recorded in an xattr (rootless without subordinate ids) is the real one: the
    // file itself belongs to whoever wrote it.
    let record = crate::owners::recorded(
        node.xattrs
            .iter()
            .map(|(n, v)| (n.as_slice(), v.as_slice())),
    );
    if let Some((u, g, m)) = record {
        (uid, gid) = (u, g);
        mode = m.unwrap_or(mode);
    } else if let Some(maps) = ids {
        let unmapped = |which, id| UpperError::UnmappedId {
            path: up.display(path),
            which,
            id,
        };
        uid = maps.uid.to_container(uid).ok_or(unmapped("uid", uid))?;
        gid = maps.gid.to_container(gid).ok_or(unmapped("gid", gid))?;
        root_uid_map = Some(&maps.uid);
    }
    let mut xattrs = Vec::new();
    for (name, value) in &node.xattrs {
        let name = match whiteout::classify_upper_xattr(name) {
            UpperXattr::Private => continue,
            UpperXattr::Keep(n) => n.into_owned(),
        };
        if name == SELINUX_XATTR || crate::owners::is_owner_record(&name) {
            // A label of the host's policy, not of the image.
            continue;
        }
        let value = if name == CAPABILITY_XATTR {
            match layer_capability(value, root_uid_map) {
                Some(v) => v,
                None => {
                    return Err(UpperError::BadXattr {
                        path: up.display(path),
                        xattr: crate::path::display_bytes(&name),
                        value: crate::path::display_bytes(value),
                    });
                }
            }
        } else {
            value.clone()
        };
        xattrs.push((name, value));
    }
    xattrs.sort();
    Ok(Meta {
        mode,
        uid,
        gid,
        mtime: (st.st_mtime, st.st_mtime_nsec as u32),
        size: 0,
        xattrs,
    })
}

/// Dropped from layers: a label of the host's SELinux policy.
pub(crate) const SELINUX_XATTR: &[u8] = b"security.selinux";
/// File capabilities: v2, or v3 with the uid of the namespace root they apply in.
pub(crate) const CAPABILITY_XATTR: &[u8] = b"security.capability";

const VFS_CAP_REVISION_MASK: u32 = 0xff00_0000;
pub(super) const VFS_CAP_REVISION_2: u32 = 0x0200_0000;
pub(super) const VFS_CAP_REVISION_3: u32 = 0x0300_0000;

/// `security.capability` as a layer carries it: a v3 value whose namespace root is container
/// root (0) becomes the equivalent v2 (what a reader inside the namespace sees); a v3 root
/// that is a host id is mapped through `uid_map` when given. `None`: malformed.
pub(crate) fn layer_capability(
    value: &[u8],
    uid_map: Option<&crate::idmap::IdMap>,
) -> Option<Vec<u8>> {
    let magic = u32::from_le_bytes(value.get(..4)?.try_into().ok()?);
    match magic & VFS_CAP_REVISION_MASK {
        VFS_CAP_REVISION_2 if value.len() == 20 => Some(value.to_vec()),
        VFS_CAP_REVISION_3 if value.len() == 24 => {
            let host_root = u32::from_le_bytes(value[20..24].try_into().ok()?);
            let root = match uid_map {
                Some(m) => m.to_container(host_root)?,
                None => host_root,
            };
            if root == 0 {
                let mut v = value[..20].to_vec();
                let flags = magic & !VFS_CAP_REVISION_MASK;
                v[..4].copy_from_slice(&(VFS_CAP_REVISION_2 | flags).to_le_bytes());
                Some(v)
            } else {
                let mut v = value.to_vec();
                v[20..24].copy_from_slice(&root.to_le_bytes());
                Some(v)
            }
        }
        _ => None,
    }
}

pub(super) fn is_sparse(st: &Stat) -> bool {
    (st.st_blocks as u64) * 512 < st.st_size as u64
}

/// The kind of the symlink, device, fifo or socket `name` in `dirfd`, lstat'ed as `st`;
/// a directory or regular file is an error (they are not made from a kind alone).
pub fn special_kind(dirfd: &impl AsFd, name: &CStr, st: &Stat) -> io::Result<Kind> {
    let dev = st.st_rdev;
    Ok(match FileType::from_raw_mode(st.st_mode) {
        FileType::Symlink => Kind::Symlink {
            target: rustix::fs::readlinkat(dirfd, name, Vec::new())?.into_bytes(),
        },
        FileType::CharacterDevice => Kind::CharDevice {
            major: rustix::fs::major(dev),
            minor: rustix::fs::minor(dev),
        },
        FileType::BlockDevice => Kind::BlockDevice {
            major: rustix::fs::major(dev),
            minor: rustix::fs::minor(dev),
        },
        FileType::Fifo => Kind::Fifo,
        FileType::Socket => Kind::Socket,
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a symlink, device, fifo or socket",
            ));
        }
    })
}
