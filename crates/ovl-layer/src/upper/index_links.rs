//! The `index=on` hardlink check: an upper holding a file copied up through the inodes index
//! whose other merged names are not in the upper is refused before anything is emitted.

use std::collections::HashMap;
use std::os::fd::OwnedFd;

use rustix::fs::{AtFlags, FileType};

use super::{Node, Upper, UpperError};
use crate::fsops::open_dir_at;
use crate::path::LayerPath;
use crate::whiteout::{XattrNs, key};
use crate::xattrs::{list_at, names_at};

impl Upper {
    /// Refuses an upper holding a file copied up through the inodes index (`index=on`) that has
    /// names in the merged view the upper does not hold ([`UpperError::IndexedHardlink`]).
    ///
    /// The kernel marks such a file (only it: an index copy-up of a lower inode with other
    /// links, or of any file with nfs_export=on) with `overlay.nlink` (either namespace), kept
    /// as `U[+-]N` = merged link count minus the upper inode's link count, which is its names
    /// in the upper plus its one name in workdir/index. So the merged count is
    /// `names in the upper + 1 + N`, however the upper was copied since (with or without its
    /// workdir); more than the names in the upper means a name outside it. `L[+-]N` (relative
    /// to the lower inode, left by an interrupted copy-up of another name) cannot be checked
    /// from the upper: refused too. Ordinary uppers (index=off, no copy-up of a hardlinked
    /// file, links made in the upper) have no `overlay.nlink` and pass.
    pub(super) fn check_index_links(&self) -> Result<(), UpperError> {
        let mut seen = IndexedFiles::new();
        let root = LayerPath::root();
        let fd = open_dir_at(&self.root.fd(), c".").map_err(|e| self.io(&root, e))?;
        self.scan_links(&fd, &root, &mut seen)?;
        let mut bad: Vec<(LayerPath, String)> = Vec::new();
        for (names, v) in seen.into_values() {
            let first = names.iter().min().expect("one name at least").clone();
            let have = names.len() as i64;
            let shown = crate::path::display_bytes(&v);
            // `U+0`, `U-1`, `L+2` (the kernel's "%+i").
            let parsed = match v.as_slice() {
                [form @ (b'U' | b'L'), sign @ (b'+' | b'-'), digits @ ..]
                    if !digits.is_empty() && digits.iter().all(u8::is_ascii_digit) =>
                {
                    std::str::from_utf8(digits)
                        .ok()
                        .and_then(|d| d.parse::<i64>().ok())
                        .map(|n| (*form, if *sign == b'-' { -n } else { n }))
                }
                _ => None,
            };
            match parsed {
                Some((b'U', d)) => {
                    let merged = have + 1 + d;
                    if merged > have {
                        bad.push((
                            first,
                            format!(
                                "copied up through the inodes index with {merged} names in the \
                                 merged view (overlay.nlink={shown}), {have} of them in the upper"
                            ),
                        ));
                    }
                }
                Some((b'L', _)) => bad.push((
                    first,
                    format!(
                        "copied up through the inodes index, with its merged link count \
                         relative to the lower file (overlay.nlink={shown}, an interrupted \
                         copy-up): whether every name is in the upper cannot be told"
                    ),
                )),
                _ => {
                    return Err(UpperError::BadXattr {
                        path: self.root.display(&first),
                        xattr: format!("overlay.{}", key::NLINK),
                        value: shown,
                    });
                }
            }
        }
        match bad.into_iter().min_by(|a, b| a.0.cmp(&b.0)) {
            None => Ok(()),
            Some((p, why)) => Err(UpperError::IndexedHardlink {
                path: self.root.display(&p),
                why,
            }),
        }
    }

    fn scan_links(
        &self,
        fd: &OwnedFd,
        path: &LayerPath,
        seen: &mut IndexedFiles,
    ) -> Result<(), UpperError> {
        // This pass runs over every entry before anything is written: list the xattr names of
        // non-directories only, and stat and read values only where `overlay.nlink` is there
        // (st_nlink would be a cheaper filter, but an upper copied without its workdir has
        // lost the index link).
        let mut names = Vec::new();
        for ent in rustix::fs::Dir::read_from(fd).map_err(|e| self.io(path, e.into()))? {
            let ent = ent.map_err(|e| self.io(path, e.into()))?;
            let n = ent.file_name().to_bytes();
            if n != b"." && n != b".." {
                names.push((ent.file_name().to_owned(), ent.file_type()));
            }
        }
        let marked: Vec<String> = XattrNs::ALL.iter().map(|ns| ns.name(key::NLINK)).collect();
        for (name, ft) in names {
            let cpath = path.join(name.as_bytes());
            let is_dir = match ft {
                FileType::Directory => true,
                FileType::Unknown => {
                    let st = rustix::fs::statat(fd, name.as_c_str(), AtFlags::SYMLINK_NOFOLLOW)
                        .map_err(|e| self.io(&cpath, e.into()))?;
                    FileType::from_raw_mode(st.st_mode) == FileType::Directory
                }
                _ => false,
            };
            if is_dir {
                let cfd = open_dir_at(fd, &name).map_err(|e| self.io(&cpath, e))?;
                self.scan_links(&cfd, &cpath, seen)?;
                continue;
            }
            let listed = names_at(fd, &name).map_err(|e| self.io(&cpath, e))?;
            if !listed
                .split(|&b| b == 0)
                .any(|n| marked.iter().any(|m| n == m.as_bytes()))
            {
                continue;
            }
            let st = rustix::fs::statat(fd, name.as_c_str(), AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| self.io(&cpath, e.into()))?;
            let xattrs = list_at(fd, &name).map_err(|e| self.io(&cpath, e))?;
            let node = Node {
                name: name.into_bytes(),
                st,
                xattrs,
            };
            let Some(nlink) = node.overlay_xattr(key::NLINK) else {
                continue;
            };
            let e = seen.entry((node.st.st_dev, node.st.st_ino)).or_default();
            e.0.push(cpath);
            e.1 = nlink;
        }
        Ok(())
    }
}

/// (dev, ino) of an upper file with `overlay.nlink` -> (its names in the upper, the value).
type IndexedFiles = HashMap<(u64, u64), (Vec<LayerPath>, Vec<u8>)>;
