//! One directory entry of a layer as read from disk (name, lstat, xattrs) and what it means
//! by overlay rules, for the upper walk and the lower stack alike.

use std::io;
use std::os::fd::OwnedFd;

use rustix::fs::{AtFlags, FileType, Stat};

use crate::whiteout::{self, UpperEntry, UpperFacts, XattrNs};
use crate::xattrs::{Xattr, list_at};

/// One directory child: its name, lstat and xattrs.
#[derive(Clone)]
pub(super) struct Node {
    pub(super) name: Vec<u8>,
    pub(super) st: Stat,
    pub(super) xattrs: Vec<Xattr>,
}

impl Node {
    pub(super) fn xattr(&self, name: &str) -> Option<Vec<u8>> {
        self.xattrs
            .iter()
            .find(|(n, _)| n.as_slice() == name.as_bytes())
            .map(|(_, v)| v.clone())
    }

    /// An overlay xattr (`key`) in either namespace.
    pub(super) fn overlay_xattr(&self, key: &str) -> Option<Vec<u8>> {
        XattrNs::ALL.iter().find_map(|ns| self.xattr(&ns.name(key)))
    }

    pub(super) fn file_type(&self) -> FileType {
        FileType::from_raw_mode(self.st.st_mode)
    }

    /// What this entry means; `parent_xwhiteouts`: its directory is marked `opaque=x`.
    pub(super) fn classify(&self, parent_xwhiteouts: bool) -> UpperEntry {
        let ft = self.file_type();
        let get = |n: &str| self.xattr(n);
        whiteout::classify_upper(&UpperFacts {
            name: &self.name,
            is_char_device: ft == FileType::CharacterDevice,
            is_regular: ft == FileType::RegularFile,
            rdev: self.st.st_rdev,
            size: self.st.st_size as u64,
            parent_xwhiteouts,
            xattr: &get,
        })
    }

    pub(super) fn own_opaque(&self) -> bool {
        whiteout::dir_is_opaque(&|n: &str| self.xattr(n))
    }

    /// A directory marked `opaque=x`: its `overlay.whiteout` files are whiteouts.
    pub(super) fn has_xwhiteouts(&self) -> bool {
        whiteout::dir_has_xwhiteouts(&|n: &str| self.xattr(n))
    }

    /// Whether this entry is a whiteout depends on its parent's `opaque=x` mark.
    pub(super) fn depends_on_parent_mark(&self) -> bool {
        self.classify(true) != self.classify(false)
    }
}

/// Every child of an open directory with its lstat and xattrs, sorted by name.
pub(super) fn read_children(fd: &OwnedFd) -> io::Result<Vec<Node>> {
    let mut names = Vec::new();
    for ent in rustix::fs::Dir::read_from(fd)? {
        let ent = ent?;
        let n = ent.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push(ent.file_name().to_owned());
        }
    }
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let st = rustix::fs::statat(fd, name.as_c_str(), AtFlags::SYMLINK_NOFOLLOW)?;
        let xattrs = list_at(fd, &name)?;
        out.push(Node {
            name: name.into_bytes(),
            st,
            xattrs,
        });
    }
    Ok(out)
}
