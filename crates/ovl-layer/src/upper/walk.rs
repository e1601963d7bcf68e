//! The walk of an upper: each directory's entries classified and emitted in stream order,
//! redirected directories expanded with their lower content, metacopy data found below, and
//! hardlinks inside the upper tracked.

use std::cell::OnceCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::CString;
use std::io;
use std::os::fd::OwnedFd;
use std::rc::Rc;

use rustix::fs::FileType;

use super::lower_stack::{DirStack, Found, Name, Resolved, parse_redirect};
use super::meta::{is_sparse, special_kind};
use super::node::{Node, read_children};
use super::{Change, Entry, Kind, Layer, Meta, Source, Upper, UpperError};
use crate::fsops::open_dir_at;
use crate::path::LayerPath;
use crate::whiteout::{UpperEntry, key};

/// The lower directory an upper directory merges with: its merged path in the lowers (what a
/// [`Change::Redirect`] names) and its real directories, looked up on first use (most upper
/// directories never need them: only redirects, metacopy files and renamed directories'
/// content do).
pub(super) struct LowerDir {
    path: LayerPath,
    stack: OnceCell<DirStack>,
    /// Where it is looked up from: the parent and the name (redirects name their target).
    from: Option<(Rc<LowerDir>, Name)>,
}

impl LowerDir {
    pub(super) fn root(stack: DirStack) -> Rc<LowerDir> {
        Rc::new(LowerDir {
            path: LayerPath::root(),
            stack: OnceCell::from(stack),
            from: None,
        })
    }

    fn known(path: LayerPath, stack: DirStack) -> Rc<LowerDir> {
        Rc::new(LowerDir {
            path,
            stack: OnceCell::from(stack),
            from: None,
        })
    }

    fn child(parent: &Rc<LowerDir>, name: &[u8]) -> Rc<LowerDir> {
        Rc::new(LowerDir {
            path: parent.path.join(name),
            stack: OnceCell::new(),
            from: Some((parent.clone(), Name::Rel(name.to_vec()))),
        })
    }
}

/// How a directory is being walked.
pub(super) struct DirCtx {
    /// Where this directory's lower content is (after redirects); `None` when nothing below
    /// shows through.
    pub(super) lower: Option<Rc<LowerDir>>,
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
    Lower(Box<Resolved>),
}

impl<E: From<UpperError>> Walker<'_, '_, E> {
    fn emit(&mut self, c: Change) -> Result<(), E> {
        (self.f)(c)
    }

    /// The real directories of `d`, looked up now if not yet.
    fn stack<'d>(&self, d: &'d LowerDir) -> Result<&'d DirStack, UpperError> {
        if let Some(s) = d.stack.get() {
            return Ok(s);
        }
        let (parent, name) = d.from.as_ref().expect("a lazy directory has a parent");
        let ps = self.stack(parent)?;
        let at = || format!("lower {}", d.path);
        let s = if ps.is_empty() {
            DirStack::default()
        } else {
            self.up.lowers.dir_below(ps, name.clone(), &at)?
        };
        Ok(d.stack.get_or_init(|| s))
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

        // An opaque directory looks at nothing below: a redirect on it means nothing (as in
        // the kernel, which checks the mark first).
        let redirect = if opaque { None } else { ctx.redirect.clone() };
        if let Some(from) = &redirect {
            self.emit(Change::Redirect {
                path: path.clone(),
                from: from.clone(),
            })?;
        }
        let meta = self.meta(path, &me, &Layer::Upper)?;
        self.emit(Change::Entry(Entry {
            path: path.clone(),
            kind: Kind::Dir {
                opaque: opaque || redirect.is_some(),
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
                let stack = self.stack(l)?;
                let lp = l.path.clone();
                let listing = up
                    .lowers
                    .list(stack, &|n| format!("lower {}", lp.join(n)))?;
                for (n, r) in listing {
                    if !whiteouts.contains(&n) && !plain.contains_key(&n) {
                        merged.insert(n, Child::Lower(Box::new(r)));
                    }
                }
            }
        }
        for (n, node) in plain {
            merged.insert(n, Child::Upper(node));
        }
        for (name, child) in merged {
            let cpath = path.join(&name);
            match child {
                Child::Lower(r) => self.lower_entry(&cpath, *r)?,
                Child::Upper(node) => {
                    let force = replaced.contains(&name);
                    self.upper_child(fd, &cpath, node, lower.as_ref(), &ctx, force)?;
                }
            }
        }
        Ok(())
    }

    fn upper_child(
        &mut self,
        dirfd: &OwnedFd,
        path: &LayerPath,
        node: Node,
        parent_lower: Option<&Rc<LowerDir>>,
        ctx: &DirCtx,
        force_opaque: bool,
    ) -> Result<(), E> {
        let up = self.up;
        match node.file_type() {
            FileType::Directory => {
                let name = CString::new(node.name.clone()).expect("no NUL in a dirent name");
                let cfd = open_dir_at(dirfd, &name).map_err(|e| up.io(path, e))?;
                let (lower, expanded, redirect, force_opaque) =
                    match node.overlay_xattr(key::REDIRECT) {
                        None => (
                            parent_lower.map(|p| LowerDir::child(p, &node.name)),
                            ctx.expanded,
                            None,
                            force_opaque,
                        ),
                        Some(v) => match self.redirect_target(path, &v, parent_lower)? {
                            Some(l) => {
                                let from = l.path.clone();
                                (Some(l), true, Some(from), force_opaque)
                            }
                            // A relative redirect under a directory with no lower content:
                            // nothing below shows (the kernel looks nowhere), so it is an
                            // opaque directory.
                            None => (None, true, None, true),
                        },
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
                if let Some(e) = self.hardlink(path, &node, &Layer::Upper)? {
                    return self.emit(Change::Entry(e));
                }
                let mut meta = self.meta(path, &node, &Layer::Upper)?;
                let sparse = is_sparse(&node.st);
                let kind = if node.overlay_xattr(key::METACOPY).is_some() {
                    let data = self.metacopy_source(path, &node, parent_lower)?;
                    meta.size = data.node.st.st_size as u64;
                    Kind::File {
                        source: Source {
                            layer: Layer::Lower(data.layer),
                            path: data.path,
                        },
                        sparse: is_sparse(&data.node.st),
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
                if let Some(e) = self.hardlink(path, &node, &Layer::Upper)? {
                    return self.emit(Change::Entry(e));
                }
                let name = CString::new(node.name.clone()).expect("no NUL in a dirent name");
                let kind = special_kind(dirfd, &name, &node.st).map_err(|e| up.io(path, e))?;
                let meta = self.meta(path, &node, &Layer::Upper)?;
                self.emit(Change::Entry(Entry {
                    path: path.clone(),
                    kind,
                    meta,
                }))
            }
        }
    }

    /// The name a redirect xattr gives, checked. Refused without lowers.
    fn redirect_name(&self, path: &LayerPath, value: &[u8]) -> Result<Name, UpperError> {
        let shown = crate::path::display_bytes(value);
        if self.up.lowers.roots.is_empty() {
            return Err(UpperError::NeedsLowers {
                path: self.up.display(path),
                what: format!("a renamed directory (overlay.redirect={shown})"),
            });
        }
        parse_redirect(value).ok_or_else(|| UpperError::BadXattr {
            path: self.up.display(path),
            xattr: "overlay.redirect".into(),
            value: shown,
        })
    }

    /// The lower directory a redirected upper directory merges with (`None`: relative, under
    /// a directory with no lower content).
    fn redirect_target(
        &self,
        path: &LayerPath,
        value: &[u8],
        parent_lower: Option<&Rc<LowerDir>>,
    ) -> Result<Option<Rc<LowerDir>>, UpperError> {
        let lowers = &self.up.lowers;
        let at = || self.up.display(path);
        match self.redirect_name(path, value)? {
            Name::Abs(p) => {
                let stack = lowers.dir_below(&lowers.root_stack(), Name::Abs(p.clone()), &at)?;
                Ok(Some(LowerDir::known(p, stack)))
            }
            Name::Rel(n) => {
                let Some(parent) = parent_lower else {
                    return Ok(None);
                };
                let ps = self.stack(parent)?;
                let stack = if ps.is_empty() {
                    DirStack::default()
                } else {
                    lowers.dir_below(ps, Name::Rel(n.clone()), &at)?
                };
                Ok(Some(LowerDir::known(parent.path.join(&n), stack)))
            }
        }
    }

    /// The file holding a metacopy file's data, found as the kernel finds it.
    fn metacopy_source(
        &self,
        path: &LayerPath,
        node: &Node,
        parent_lower: Option<&Rc<LowerDir>>,
    ) -> Result<Found, UpperError> {
        let up = self.up;
        if up.lowers.roots.is_empty() {
            return Err(UpperError::NeedsLowers {
                path: up.display(path),
                what: "a metacopy file (its data is in a lower layer)".into(),
            });
        }
        let at = || up.display(path);
        let (stack, name) = match node.overlay_xattr(key::REDIRECT) {
            Some(v) => match self.redirect_name(path, &v)? {
                Name::Abs(p) => (up.lowers.root_stack(), Name::Abs(p)),
                Name::Rel(n) => (self.parent_stack(parent_lower)?, Name::Rel(n)),
            },
            None => (
                self.parent_stack(parent_lower)?,
                Name::Rel(node.name.clone()),
            ),
        };
        up.lowers.metacopy_data(&stack, name, &at)
    }

    fn parent_stack(&self, parent: Option<&Rc<LowerDir>>) -> Result<DirStack, UpperError> {
        Ok(match parent {
            Some(p) => self.stack(p)?.clone(),
            None => DirStack::default(),
        })
    }

    /// A hardlink entry when this inode was emitted before; records it otherwise. The link
    /// carries the file's metadata (what GNU tar writes) without its xattrs.
    fn hardlink(
        &mut self,
        path: &LayerPath,
        node: &Node,
        layer: &Layer,
    ) -> Result<Option<Entry>, E> {
        let st = &node.st;
        if st.st_nlink <= 1 {
            return Ok(None);
        }
        let key = (st.st_dev, st.st_ino);
        if let Some(target) = self.links.get(&key).cloned() {
            let mut meta = self.meta(path, node, layer)?;
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
    fn lower_entry(&mut self, path: &LayerPath, r: Resolved) -> Result<(), E> {
        let up = self.up;
        let top = r.top();
        let root = &up.lowers.roots[top.layer];
        let ft = top.node.file_type();
        let lio = |e: io::Error| UpperError::Io {
            path: root.display(&top.path),
            source: e,
        };
        if ft != FileType::Directory {
            if let Some(e) = self.hardlink(path, &top.node, &Layer::Lower(top.layer))? {
                return self.emit(Change::Entry(e));
            }
        }
        let mut meta = self.meta(path, &top.node, &Layer::Lower(top.layer))?;
        let kind = match ft {
            FileType::Directory => Kind::Dir { opaque: false },
            FileType::RegularFile => {
                let d = r.data();
                meta.size = d.node.st.st_size as u64;
                Kind::File {
                    source: Source {
                        layer: Layer::Lower(d.layer),
                        path: d.path.clone(),
                    },
                    sparse: is_sparse(&d.node.st),
                }
            }
            _ => {
                let leaf = root.leaf(&top.path, false).map_err(lio)?;
                special_kind(&leaf.dir, &leaf.name, &top.node.st).map_err(lio)?
            }
        };
        self.emit(Change::Entry(Entry {
            path: path.clone(),
            kind,
            meta,
        }))?;
        if let Resolved::Dir { stack, top } = r {
            let listing = up.lowers.list(&stack, &|n| root_display(up, &top, n))?;
            for (n, child) in listing {
                self.lower_entry(&path.join(&n), child)?;
            }
        }
        Ok(())
    }

    /// The layer metadata of a node of `layer`: container ids, filtered xattrs.
    fn meta(&self, path: &LayerPath, node: &Node, layer: &Layer) -> Result<Meta, E> {
        Ok(super::meta::meta(
            self.up,
            path,
            node,
            self.up.ids_of(layer),
        )?)
    }
}

/// `name` in a lower directory, for messages.
fn root_display(up: &Upper, dir: &Found, name: &[u8]) -> String {
    up.lowers.roots[dir.layer].display(&dir.path.join(name))
}
