//! The walk of an upper: each directory's entries classified and emitted in stream order,
//! redirected directories expanded with their lower content, metacopy data found below, and
//! hardlinks inside the upper tracked.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::CString;
use std::io;
use std::os::fd::OwnedFd;

use rustix::fs::{FileType, Stat};

use super::lowers::LowerNode;
use super::meta::{is_sparse, special_kind};
use super::node::{Node, read_children};
use super::{Change, Entry, Kind, Layer, Meta, Source, Upper, UpperError};
use crate::fsops::open_dir_at;
use crate::path::LayerPath;
use crate::whiteout::{UpperEntry, key};

/// How a directory is being walked.
pub(super) struct DirCtx {
    /// Where this directory's lower content is (after redirects); `None` when nothing below
    /// shows through.
    pub(super) lower: Option<LayerPath>,
    /// Inside a redirected directory: lower entries must be emitted too.
    pub(super) expanded: bool,
    /// A whiteout and an entry share this directory's name: it replaces what was below.
    pub(super) force_opaque: bool,
    /// This directory is lower directory `from`, renamed.
    pub(super) redirect: Option<LayerPath>,
}

pub(super) struct Walker<'a, 'f, E> {
    pub(super) up: &'a Upper,
    pub(super) f: &'f mut dyn FnMut(Change) -> Result<(), E>,
    /// (dev, ino) -> the path emitted first for that inode.
    pub(super) links: HashMap<(u64, u64), LayerPath>,
}

/// A child to emit, from the upper or (inside a redirected directory) from the lowers.
enum Child {
    Upper(Node),
    Lower(LowerNode),
}

impl<E: From<UpperError>> Walker<'_, '_, E> {
    fn emit(&mut self, c: Change) -> Result<(), E> {
        (self.f)(c)
    }

    pub(super) fn upper_dir(
        &mut self,
        fd: &OwnedFd,
        path: &LayerPath,
        me: Node,
        ctx: DirCtx,
    ) -> Result<(), E> {
        let up = self.up;
        let children = read_children(fd).map_err(|e| up.io(path, e))?;
        let mut opaque = me.own_opaque() || ctx.force_opaque;
        let xwhiteouts = me.has_xwhiteouts();
        let mut whiteouts = BTreeSet::new();
        let mut plain = BTreeMap::new();
        for c in children {
            match c.classify(xwhiteouts) {
                UpperEntry::OpaqueMarker => opaque = true,
                UpperEntry::Whiteout => {
                    whiteouts.insert(c.name.clone());
                }
                UpperEntry::WhiteoutOf(t) => {
                    whiteouts.insert(t);
                }
                UpperEntry::Plain => {
                    plain.insert(c.name.clone(), c);
                }
            }
        }
        // A whiteout next to an entry of the same name: the entry wins and replaces what was
        // below (fuse-overlayfs can leave both).
        let replaced: BTreeSet<Vec<u8>> = whiteouts
            .iter()
            .filter(|n| plain.contains_key(*n))
            .cloned()
            .collect();
        whiteouts.retain(|n| !replaced.contains(n));

        if let Some(from) = &ctx.redirect {
            self.emit(Change::Redirect {
                path: path.clone(),
                from: from.clone(),
            })?;
        }
        let meta = self.meta(path, &me)?;
        self.emit(Change::Entry(Entry {
            path: path.clone(),
            kind: Kind::Dir {
                opaque: opaque || ctx.redirect.is_some(),
            },
            meta,
        }))?;

        let lower = if opaque { None } else { ctx.lower.clone() };
        // Inside a redirected directory the output is opaque above us: whiteouts mean nothing
        // there, they only hide lower entries from the listing below.
        if !ctx.expanded {
            for n in &whiteouts {
                self.emit(Change::Whiteout(path.join(n)))?;
            }
        }
        let mut merged: BTreeMap<Vec<u8>, Child> = BTreeMap::new();
        if ctx.expanded {
            if let Some(l) = &lower {
                let listing = up
                    .lowers
                    .list(l)
                    .map_err(|e| self.lower_io(&l.clone(), e))?;
                for (n, node) in listing {
                    if !whiteouts.contains(&n) && !plain.contains_key(&n) {
                        merged.insert(n, Child::Lower(node));
                    }
                }
            }
        }
        for (n, node) in plain {
            merged.insert(n, Child::Upper(node));
        }
        for (name, child) in merged {
            let cpath = path.join(&name);
            let clower = lower.as_ref().map(|l| l.join(&name));
            match child {
                Child::Lower(node) => {
                    let lp = clower.expect("lower entries only where there is a lower path");
                    self.lower_entry(&cpath, &lp, node)?;
                }
                Child::Upper(node) => {
                    let force = replaced.contains(&name);
                    self.upper_child(fd, &cpath, node, lower.as_ref(), clower, &ctx, force)?;
                }
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn upper_child(
        &mut self,
        dirfd: &OwnedFd,
        path: &LayerPath,
        node: Node,
        parent_lower: Option<&LayerPath>,
        lower: Option<LayerPath>,
        ctx: &DirCtx,
        force_opaque: bool,
    ) -> Result<(), E> {
        let up = self.up;
        match node.file_type() {
            FileType::Directory => {
                let redirect = match node.overlay_xattr(key::REDIRECT) {
                    None => None,
                    Some(v) => {
                        let from = self.redirect_target(path, &v, parent_lower)?;
                        Some(from)
                    }
                };
                let name = CString::new(node.name.clone()).expect("no NUL in a dirent name");
                let cfd = open_dir_at(dirfd, &name).map_err(|e| up.io(path, e))?;
                let (lower, expanded, redirect) = match redirect {
                    Some(Some(from)) => (Some(from.clone()), true, Some(from)),
                    // A relative redirect under a directory with no lower content: nothing of
                    // the old directory shows, but the entry is still a replacement.
                    Some(None) => (None, true, Some(path.clone())),
                    None => (lower, ctx.expanded, None),
                };
                self.upper_dir(
                    &cfd,
                    path,
                    node,
                    DirCtx {
                        lower,
                        expanded,
                        force_opaque,
                        redirect,
                    },
                )
            }
            FileType::RegularFile => {
                if let Some(e) = self.hardlink(path, &node)? {
                    return self.emit(Change::Entry(e));
                }
                let mut meta = self.meta(path, &node)?;
                let sparse = is_sparse(&node.st);
                let kind = if node.overlay_xattr(key::METACOPY).is_some() {
                    let (source, st) = self.metacopy_source(path, &node, parent_lower)?;
                    meta.size = st.st_size as u64;
                    Kind::File {
                        source,
                        sparse: is_sparse(&st),
                    }
                } else {
                    meta.size = node.st.st_size as u64;
                    Kind::File {
                        source: Source {
                            layer: Layer::Upper,
                            path: path.clone(),
                        },
                        sparse,
                    }
                };
                self.emit(Change::Entry(Entry {
                    path: path.clone(),
                    kind,
                    meta,
                }))
            }
            _ => {
                if let Some(e) = self.hardlink(path, &node)? {
                    return self.emit(Change::Entry(e));
                }
                let name = CString::new(node.name.clone()).expect("no NUL in a dirent name");
                let kind = special_kind(dirfd, &name, &node.st).map_err(|e| up.io(path, e))?;
                let meta = self.meta(path, &node)?;
                self.emit(Change::Entry(Entry {
                    path: path.clone(),
                    kind,
                    meta,
                }))
            }
        }
    }

    /// The lower path a redirect xattr names (`Ok(None)`: relative, under a directory with no
    /// lower content). Refused without lowers.
    fn redirect_target(
        &self,
        path: &LayerPath,
        value: &[u8],
        parent_lower: Option<&LayerPath>,
    ) -> Result<Option<LayerPath>, UpperError> {
        let shown = crate::path::display_bytes(value);
        if self.up.lowers.roots.is_empty() {
            return Err(UpperError::NeedsLowers {
                path: self.up.display(path),
                what: format!("a renamed directory (overlay.redirect={shown})"),
            });
        }
        let bad = || UpperError::BadXattr {
            path: self.up.display(path),
            xattr: "overlay.redirect".into(),
            value: shown.clone(),
        };
        if value.first() == Some(&b'/') {
            LayerPath::parse(value).map(Some).map_err(|_| bad())
        } else {
            if value.is_empty() || value.contains(&b'/') || value == b"." || value == b".." {
                return Err(bad());
            }
            Ok(parent_lower.map(|l| l.join(value)))
        }
    }

    fn metacopy_source(
        &self,
        path: &LayerPath,
        node: &Node,
        parent_lower: Option<&LayerPath>,
    ) -> Result<(Source, Stat), UpperError> {
        let up = self.up;
        if up.lowers.roots.is_empty() {
            return Err(UpperError::NeedsLowers {
                path: up.display(path),
                what: "a metacopy file (its data is in a lower layer)".into(),
            });
        }
        let lower_path = match node.overlay_xattr(key::REDIRECT) {
            Some(v) => self.redirect_target(path, &v, parent_lower)?,
            None => parent_lower.map(|l| l.join(&node.name)),
        };
        let not_found = |lp: String| UpperError::NotInLowers {
            path: up.display(path),
            what: format!("a metacopy file whose data is at {lp}"),
        };
        let lp = lower_path.ok_or_else(|| not_found("(no lower path)".into()))?;
        match up.lowers.lookup(&lp).map_err(|e| self.lower_io(&lp, e))? {
            Some((layer, st)) if FileType::from_raw_mode(st.st_mode) == FileType::RegularFile => {
                Ok((
                    Source {
                        layer: Layer::Lower(layer),
                        path: lp,
                    },
                    st,
                ))
            }
            _ => Err(not_found(lp.to_string())),
        }
    }

    fn lower_io(&self, p: &LayerPath, e: io::Error) -> UpperError {
        UpperError::Io {
            path: format!("lower {p}"),
            source: e,
        }
    }

    /// A hardlink entry when this inode was emitted before; records it otherwise. The link
    /// carries the file's metadata (what GNU tar writes) without its xattrs.
    fn hardlink(&mut self, path: &LayerPath, node: &Node) -> Result<Option<Entry>, E> {
        let st = &node.st;
        if st.st_nlink <= 1 {
            return Ok(None);
        }
        let key = (st.st_dev, st.st_ino);
        if let Some(target) = self.links.get(&key).cloned() {
            let mut meta = self.meta(path, node)?;
            meta.xattrs.clear();
            return Ok(Some(Entry {
                path: path.clone(),
                kind: Kind::Hardlink { target },
                meta,
            }));
        }
        self.links.insert(key, path.clone());
        Ok(None)
    }

    /// An entry (and, for a directory, everything below it) that only the lowers provide,
    /// inside a redirected directory.
    fn lower_entry(
        &mut self,
        path: &LayerPath,
        lower: &LayerPath,
        node: LowerNode,
    ) -> Result<(), E> {
        let up = self.up;
        let root = &up.lowers.roots[node.layer];
        let ft = node.node.file_type();
        let lio = |e: io::Error| UpperError::Io {
            path: root.display(lower),
            source: e,
        };
        if ft != FileType::Directory {
            if let Some(e) = self.hardlink(path, &node.node)? {
                return self.emit(Change::Entry(e));
            }
        }
        let mut meta = self.meta(path, &node.node)?;
        let kind = match ft {
            FileType::Directory => Kind::Dir { opaque: false },
            FileType::RegularFile => {
                meta.size = node.node.st.st_size as u64;
                Kind::File {
                    source: Source {
                        layer: Layer::Lower(node.layer),
                        path: lower.clone(),
                    },
                    sparse: is_sparse(&node.node.st),
                }
            }
            _ => {
                let leaf = root.leaf(lower, false).map_err(lio)?;
                special_kind(&leaf.dir, &leaf.name, &node.node.st).map_err(lio)?
            }
        };
        self.emit(Change::Entry(Entry {
            path: path.clone(),
            kind,
            meta,
        }))?;
        if ft == FileType::Directory {
            let listing = up.lowers.list(lower).map_err(|e| self.lower_io(lower, e))?;
            for (n, child) in listing {
                self.lower_entry(&path.join(&n), &lower.join(&n), child)?;
            }
        }
        Ok(())
    }

    /// The layer metadata of a node: container ids, filtered xattrs.
    fn meta(&self, path: &LayerPath, node: &Node) -> Result<Meta, E> {
        Ok(super::meta::meta(self.up, path, node)?)
    }
}
