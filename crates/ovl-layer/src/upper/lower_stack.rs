//! The lower stack read the way the kernel reads it (fs/overlayfs namei.c and readdir.c), for
//! what the upper's redirects and metacopy files point at and for the merged lowers that
//! ovl-squash `--output` flattens.
//!
//! Every lower may once have been an upper, so every layer is read with the same rules, at any
//! depth:
//! - a merged directory is a stack of real directories, one per layer that makes it up
//!   ([`DirStack`]); a name is looked up in each of them, top first, and the lookup stops at a
//!   whiteout (0/0 device, xattr whiteout in an `opaque=x` directory, fuse-overlayfs's `.wh.`
//!   file), at a non-directory, or after an opaque directory;
//! - a directory's `overlay.redirect` changes the name looked up in the layers *below* it:
//!   relative (the same parent directories, another name) or absolute (from each lower layer's
//!   root, walked component by component with the same rules, the walk's own redirects
//!   included);
//! - a file with `overlay.metacopy` shows its own metadata and the data of the first regular
//!   file without it further down (its redirect, if any, followed); none: refused;
//! - the bottom layer's opaque and redirect marks mean nothing (nothing is below it), as in the
//!   kernel; a layer root is never opaque.
//!
//! A directory listing is the union of the stack's directories, each name shown from the top
//! layer that has it unless a layer above whites it out, then resolved by the lookup above.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Mutex;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Stat};

use super::node::{Node, read_children};
use super::{RESOLVE, UpperError};
use crate::path::LayerPath;
use crate::root::Root;
use crate::whiteout::{self, UpperEntry, key};
use crate::xattrs::Xattr;
use crate::xattrs::list_at;

/// A merged directory of the lowers: the real directory of each layer that makes it up, top
/// first. Empty: nothing from the lowers shows there.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirStack(Vec<(usize, LayerPath)>);

impl DirStack {
    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The name a lookup looks for in the layers below: relative to the parent's directories, or
/// absolute from each layer's root (after an absolute redirect).
#[derive(Debug, Clone)]
pub(super) enum Name {
    Rel(Vec<u8>),
    Abs(LayerPath),
}

/// The kernel's lookup state (`struct ovl_lookup_data`).
struct Lookup {
    name: Name,
    is_dir: bool,
    stop: bool,
    metacopy: bool,
    /// The layer being looked in is the bottom one: its marks mean nothing.
    last: bool,
}

/// One layer's entry that a lookup found.
#[derive(Clone)]
pub(super) struct Found {
    pub(super) layer: usize,
    /// Its path in that layer.
    pub(super) path: LayerPath,
    pub(super) node: Node,
}

/// What the merged lowers show at one name.
pub(super) enum Resolved {
    /// The directory's own entry is `top` (its metadata); its content is `stack`'s.
    Dir { top: Found, stack: DirStack },
    /// `data`: the regular file holding the bytes, when `top` is a metacopy file.
    NonDir { top: Found, data: Option<Found> },
}

impl Resolved {
    pub(super) fn top(&self) -> &Found {
        match self {
            Resolved::Dir { top, .. } | Resolved::NonDir { top, .. } => top,
        }
    }

    /// Where a regular file's bytes are.
    pub(super) fn data(&self) -> &Found {
        match self {
            Resolved::NonDir {
                data: Some(d),
                top: _,
            } => d,
            other => other.top(),
        }
    }
}

/// One real directory as read by a listing: its children by name, and its `opaque=x` mark.
struct Listing {
    xwhiteouts: bool,
    children: BTreeMap<Vec<u8>, Node>,
}

/// Directories already read, so the lookups of a listing's names cost no syscalls.
type Listings = HashMap<(usize, LayerPath), Listing>;

/// The lower stack, top first, read with overlay semantics.
#[derive(Debug)]
pub(super) struct Lowers {
    pub(super) roots: Vec<Root>,
    /// The directory a lookup opened last: lookups come in walk order.
    last_dir: Mutex<Option<(usize, LayerPath, Option<OwnedFd>)>>,
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

impl Lowers {
    pub(super) fn new(roots: Vec<Root>) -> Lowers {
        Lowers {
            roots,
            last_dir: Mutex::new(None),
        }
    }

    /// Drop the directory kept open: a tool that changes the layers between two walks
    /// (ovl-squash `--in-place`) must not look through a directory it replaced.
    pub(super) fn forget(&self) {
        *self.last_dir.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn err(&self, layer: usize, p: &LayerPath, e: io::Error) -> UpperError {
        UpperError::Io {
            path: self.roots[layer].display(p),
            source: e,
        }
    }

    /// The root directory: every layer's root (a layer root is never opaque).
    pub(super) fn root_stack(&self) -> DirStack {
        DirStack(
            (0..self.roots.len())
                .map(|i| (i, LayerPath::root()))
                .collect(),
        )
    }

    fn open_dir(&self, layer: usize, p: &LayerPath) -> io::Result<Option<OwnedFd>> {
        match rustix::fs::openat2(
            self.roots[layer].fd(),
            if p.is_root() {
                OsStr::new(".")
            } else {
                p.as_os_str()
            },
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            RESOLVE,
        ) {
            Ok(fd) => Ok(Some(fd)),
            Err(rustix::io::Errno::NOENT | rustix::io::Errno::NOTDIR) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// `name` in directory `dir` of `layer`, with its lstat and xattrs; `None` when missing.
    fn child_on_disk(
        &self,
        layer: usize,
        dir: &LayerPath,
        name: &[u8],
    ) -> io::Result<Option<Node>> {
        let mut cache = self.last_dir.lock().unwrap_or_else(|e| e.into_inner());
        let hit = matches!(&*cache, Some((l, p, _)) if *l == layer && p == dir);
        if !hit {
            *cache = Some((layer, dir.clone(), self.open_dir(layer, dir)?));
        }
        let Some((_, _, Some(fd))) = cache.as_ref() else {
            return Ok(None);
        };
        let cname = CString::new(name).map_err(|_| bad("a NUL in a name"))?;
        let st = match rustix::fs::statat(fd, cname.as_c_str(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(rustix::io::Errno::NOENT | rustix::io::Errno::NAMETOOLONG) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let xattrs = list_at(fd, &cname)?;
        Ok(Some(Node {
            name: name.to_vec(),
            st,
            xattrs,
        }))
    }

    fn child(
        &self,
        seen: &Listings,
        layer: usize,
        dir: &LayerPath,
        name: &[u8],
    ) -> io::Result<Option<Node>> {
        match seen.get(&(layer, dir.clone())) {
            Some(l) => Ok(l.children.get(name).cloned()),
            None => self.child_on_disk(layer, dir, name),
        }
    }

    /// Whether `dir` of `layer` is marked `opaque=x` (its `overlay.whiteout` files hide).
    fn xwhiteouts(&self, seen: &Listings, layer: usize, dir: &LayerPath) -> io::Result<bool> {
        if let Some(l) = seen.get(&(layer, dir.clone())) {
            return Ok(l.xwhiteouts);
        }
        let Some(fd) = self.open_dir(layer, dir)? else {
            return Ok(false);
        };
        let x = crate::xattrs::list_fd(&fd)?;
        Ok(whiteout::dir_has_xwhiteouts(&|n: &str| {
            x.iter()
                .find(|(k, _)| k.as_slice() == n.as_bytes())
                .map(|(_, v)| v.clone())
        }))
    }

    /// What `name` in `dir` of `layer` is as far as hiding goes: `Some(true)` a whiteout (or a
    /// marker, which is not content), `Some(false)` an entry that also replaces what is below
    /// (a fuse-overlayfs `.wh.NAME` beside it), `None` an ordinary entry.
    fn hides(
        &self,
        seen: &Listings,
        layer: usize,
        dir: &LayerPath,
        node: &Node,
    ) -> io::Result<Option<bool>> {
        let parent_x = node.depends_on_parent_mark() && self.xwhiteouts(seen, layer, dir)?;
        if node.classify(parent_x) != UpperEntry::Plain {
            return Ok(Some(true));
        }
        Ok(self
            .fuse_whiteout(seen, layer, dir, &node.name)?
            .then_some(false))
    }

    /// A fuse-overlayfs `.wh.NAME` regular file in `dir` of `layer`.
    fn fuse_whiteout(
        &self,
        seen: &Listings,
        layer: usize,
        dir: &LayerPath,
        name: &[u8],
    ) -> io::Result<bool> {
        let wh = whiteout::whiteout_name(name);
        Ok(self
            .child(seen, layer, dir, &wh)?
            .is_some_and(|n| n.file_type() == FileType::RegularFile))
    }

    /// A directory is opaque by its own mark or (fuse-overlayfs) a marker entry in it.
    fn opaque(
        &self,
        seen: &Listings,
        layer: usize,
        p: &LayerPath,
        node: &Node,
    ) -> io::Result<bool> {
        if node.own_opaque() {
            return Ok(true);
        }
        for m in [whiteout::OPAQUE_MARKER, whiteout::FUSE_OPAQUE_DEVICE] {
            if let Some(n) = self.child(seen, layer, p, m)? {
                if n.classify(false) == UpperEntry::OpaqueMarker {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// `ovl_lookup_single`: one component `comp` in directory `base` of `layer`; `post` are
    /// the components after it in an absolute lookup (empty in a relative one).
    #[allow(clippy::too_many_arguments)]
    fn lookup_single(
        &self,
        seen: &Listings,
        layer: usize,
        base: &LayerPath,
        comp: &[u8],
        post: &[&[u8]],
        lk: &mut Lookup,
    ) -> Result<Option<(LayerPath, Node)>, UpperError> {
        let path = base.join(comp);
        let e = |e| self.err(layer, &path, e);
        let last_element = post.is_empty();
        let node = match self.child(seen, layer, base, comp).map_err(e)? {
            Some(n) => n,
            None => {
                if self.fuse_whiteout(seen, layer, base, comp).map_err(e)? {
                    lk.stop = true;
                }
                return Ok(None);
            }
        };
        let replaces = match self.hides(seen, layer, base, &node).map_err(e)? {
            Some(true) => {
                lk.stop = true;
                return Ok(None);
            }
            Some(false) => true,
            None => false,
        };
        let ft = node.file_type();
        if last_element && lk.metacopy && ft != FileType::RegularFile {
            lk.stop = true;
            return Ok(None);
        }
        if ft != FileType::Directory {
            if lk.is_dir || !last_element {
                lk.stop = true;
                return Ok(None);
            }
            let mc = node.overlay_xattr(key::METACOPY).is_some();
            lk.metacopy = mc;
            lk.stop = !mc || replaces;
            if !mc || lk.last {
                return Ok(Some((path, node)));
            }
        } else {
            if last_element {
                lk.is_dir = true;
            }
            if lk.last {
                return Ok(Some((path, node)));
            }
            if replaces || self.opaque(seen, layer, &path, &node).map_err(e)? {
                lk.stop = true;
                return Ok(Some((path, node)));
            }
        }
        self.check_redirect(layer, &path, &node, post, lk)?;
        Ok(Some((path, node)))
    }

    /// `ovl_check_redirect`: an `overlay.redirect` on `node` renames what the layers below
    /// are asked for.
    fn check_redirect(
        &self,
        layer: usize,
        path: &LayerPath,
        node: &Node,
        post: &[&[u8]],
        lk: &mut Lookup,
    ) -> Result<(), UpperError> {
        let Some(v) = node.overlay_xattr(key::REDIRECT) else {
            return Ok(());
        };
        let target = parse_redirect(&v).ok_or_else(|| UpperError::BadXattr {
            path: self.roots[layer].display(path),
            xattr: "overlay.redirect".into(),
            value: crate::path::display_bytes(&v),
        })?;
        lk.name = match target {
            Name::Abs(p) => {
                // An absolute redirect below an opaque ancestor of an absolute walk still
                // reaches the layers below.
                lk.stop = false;
                Name::Abs(join_all(&p, post))
            }
            Name::Rel(n) => match &lk.name {
                Name::Rel(_) => Name::Rel(n),
                // Inside an absolute walk: this component replaced, in the name as it is
                // now (an earlier component's redirect may have rewritten its start).
                Name::Abs(q) => {
                    let qc: Vec<&[u8]> = q.components().collect();
                    let keep = qc.len() - post.len() - 1;
                    let p = join_all(&LayerPath::root(), &qc[..keep]);
                    Name::Abs(join_all(&p.join(&n), post))
                }
            },
        };
        Ok(())
    }

    /// `ovl_lookup_layer`: the current name in `layer`, from `dir` (relative) or the layer's
    /// root (absolute, component by component).
    fn lookup_layer(
        &self,
        seen: &Listings,
        layer: usize,
        dir: &LayerPath,
        lk: &mut Lookup,
    ) -> Result<Option<(LayerPath, Node)>, UpperError> {
        let name = lk.name.clone();
        match name {
            Name::Rel(n) => self.lookup_single(seen, layer, dir, &n, &[], lk),
            Name::Abs(p) => {
                let comps: Vec<&[u8]> = p.components().collect();
                let mut base = LayerPath::root();
                let mut found = None;
                for k in 0..comps.len() {
                    match self.lookup_single(seen, layer, &base, comps[k], &comps[k + 1..], lk)? {
                        None => return Ok(None),
                        Some((p, n)) => {
                            if n.file_type() != FileType::Directory && k + 1 < comps.len() {
                                return Ok(None);
                            }
                            base = p.clone();
                            found = Some((p, n));
                        }
                    }
                }
                Ok(found)
            }
        }
    }

    /// The kernel's lookup of `name` below the merged directory `parent`, for an entry that is
    /// already known to be a directory (`is_dir`: an upper directory) or a metacopy file
    /// (`metacopy`: an upper metacopy file), or nothing yet. Every layer's entry it uses, top
    /// first. `at` names the entry in errors.
    fn lookup(
        &self,
        seen: &Listings,
        parent: &DirStack,
        name: Name,
        is_dir: bool,
        metacopy: bool,
        at: &dyn Fn() -> String,
    ) -> Result<Vec<Found>, UpperError> {
        let root = self.root_stack();
        let mut using_root = matches!(name, Name::Abs(_)) || *parent == root;
        let mut poe = if matches!(name, Name::Abs(_)) {
            root.clone()
        } else {
            parent.clone()
        };
        let mut lk = Lookup {
            name,
            is_dir,
            stop: false,
            metacopy,
            last: false,
        };
        let mut found: Vec<Found> = Vec::new();
        let mut i = 0;
        while !lk.stop && i < poe.0.len() {
            let (layer, dir) = poe.0[i].clone();
            lk.last = layer + 1 == self.roots.len();
            let this = self.lookup_layer(seen, layer, &dir, &mut lk)?;
            i += 1;
            let Some((path, node)) = this else { continue };
            // Intermediate metacopy files are not kept: only the top one and the data.
            if !lk.metacopy || found.is_empty() {
                found.push(Found { layer, path, node });
            }
            if lk.stop {
                break;
            }
            if matches!(lk.name, Name::Abs(_)) && !using_root {
                poe = root.clone();
                using_root = true;
                i = layer + 1;
            }
        }
        if lk.metacopy {
            return Err(UpperError::NotInLowers {
                path: at(),
                what: "a metacopy file whose data is in no layer below (the kernel refuses it \
                       with EIO)"
                    .into(),
            });
        }
        Ok(found)
    }

    /// What the merged lowers show at `name` in directory `parent`; `None` when nothing.
    fn resolve(
        &self,
        seen: &Listings,
        parent: &DirStack,
        name: &[u8],
        at: &dyn Fn() -> String,
    ) -> Result<Option<Resolved>, UpperError> {
        let found = self.lookup(seen, parent, Name::Rel(name.to_vec()), false, false, at)?;
        let mut it = found.into_iter();
        let Some(top) = it.next() else {
            return Ok(None);
        };
        if top.node.file_type() == FileType::Directory {
            let mut stack = vec![(top.layer, top.path.clone())];
            stack.extend(it.map(|f| (f.layer, f.path)));
            return Ok(Some(Resolved::Dir {
                top,
                stack: DirStack(stack),
            }));
        }
        let data = if top.node.overlay_xattr(key::METACOPY).is_some() {
            it.last()
        } else {
            None
        };
        Ok(Some(Resolved::NonDir { top, data }))
    }

    /// The lower directory an upper directory named `name` (in a directory whose lowers are
    /// `parent`) merges with, its redirect (`Name`) applied.
    pub(super) fn dir_below(
        &self,
        parent: &DirStack,
        name: Name,
        at: &dyn Fn() -> String,
    ) -> Result<DirStack, UpperError> {
        let found = self.lookup(&Listings::new(), parent, name, true, false, at)?;
        Ok(DirStack(
            found.into_iter().map(|f| (f.layer, f.path)).collect(),
        ))
    }

    /// The file holding the data of an upper metacopy file looked up as `name` below
    /// `parent`.
    pub(super) fn metacopy_data(
        &self,
        parent: &DirStack,
        name: Name,
        at: &dyn Fn() -> String,
    ) -> Result<Found, UpperError> {
        let found = self.lookup(&Listings::new(), parent, name, false, true, at)?;
        found
            .into_iter()
            .last()
            .ok_or_else(|| UpperError::NotInLowers {
                path: at(),
                what: "a metacopy file whose data is in no lower".into(),
            })
    }

    /// The merged children of directory `dir`, sorted bytewise, each resolved.
    pub(super) fn list(
        &self,
        dir: &DirStack,
        at: &dyn Fn(&[u8]) -> String,
    ) -> Result<Vec<(Vec<u8>, Resolved)>, UpperError> {
        let mut seen = Listings::new();
        let mut names = BTreeSet::new();
        let mut hidden = BTreeSet::new();
        for (layer, p) in &dir.0 {
            let e = |e| self.err(*layer, p, e);
            let Some(fd) = self.open_dir(*layer, p).map_err(e)? else {
                continue;
            };
            let dir_xattrs = crate::xattrs::list_fd(&fd).map_err(e)?;
            let xwhiteouts = whiteout::dir_has_xwhiteouts(&|n: &str| {
                dir_xattrs
                    .iter()
                    .find(|(k, _)| k.as_slice() == n.as_bytes())
                    .map(|(_, v)| v.clone())
            });
            let mut this_layer = Vec::new();
            let mut children = BTreeMap::new();
            for node in read_children(&fd).map_err(e)? {
                match node.classify(xwhiteouts) {
                    UpperEntry::OpaqueMarker => {}
                    UpperEntry::Whiteout => this_layer.push(node.name.clone()),
                    UpperEntry::WhiteoutOf(t) => this_layer.push(t),
                    UpperEntry::Plain => {
                        if !hidden.contains(&node.name) {
                            names.insert(node.name.clone());
                        }
                    }
                }
                children.insert(node.name.clone(), node);
            }
            hidden.extend(this_layer);
            seen.insert(
                (*layer, p.clone()),
                Listing {
                    xwhiteouts,
                    children,
                },
            );
        }
        let mut out = Vec::with_capacity(names.len());
        for n in names {
            if let Some(r) = self.resolve(&seen, dir, &n, &|| at(&n))? {
                out.push((n, r));
            }
        }
        Ok(out)
    }

    /// The top lower's root directory.
    pub(super) fn top_root(&self) -> Result<Option<Found>, UpperError> {
        self.dir_node(&self.root_stack())
    }

    /// The directory's own entry: the top layer's.
    fn dir_node(&self, dir: &DirStack) -> Result<Option<Found>, UpperError> {
        let Some((layer, p)) = dir.0.first() else {
            return Ok(None);
        };
        let e = |e| self.err(*layer, p, e);
        let Some(fd) = self.open_dir(*layer, p).map_err(e)? else {
            return Ok(None);
        };
        let st = rustix::fs::fstat(&fd).map_err(|er| e(er.into()))?;
        let xattrs = crate::xattrs::list_fd(&fd).map_err(e)?;
        Ok(Some(Found {
            layer: *layer,
            path: p.clone(),
            node: Node {
                name: p.file_name().to_vec(),
                st,
                xattrs,
            },
        }))
    }
}

/// A redirect value as the kernel takes it: absolute (`/` then non-empty components) or one
/// relative name; `None` for anything else.
pub(super) fn parse_redirect(v: &[u8]) -> Option<Name> {
    if v.is_empty() || v.contains(&0) {
        return None;
    }
    if let Some(rest) = v.strip_prefix(b"/") {
        let comps: Vec<&[u8]> = rest.split(|&b| b == b'/').collect();
        if comps
            .iter()
            .any(|c| c.is_empty() || *c == b"." || *c == b"..")
        {
            return None;
        }
        return LayerPath::parse(v).ok().map(Name::Abs);
    }
    if v.contains(&b'/') || v == b"." || v == b".." {
        return None;
    }
    Some(Name::Rel(v.to_vec()))
}

fn join_all(p: &LayerPath, comps: &[&[u8]]) -> LayerPath {
    comps.iter().fold(p.clone(), |p, c| p.join(c))
}

/// A lower stack read as the merged view it makes on its own (top first), with the kernel's
/// rules (see the module doc). For tools that flatten lowers (ovl-squash `--output`).
#[derive(Debug)]
pub struct LowerStack {
    lowers: Lowers,
}

/// One entry of a merged lower directory, with its raw facts (xattrs as on disk, unfiltered).
pub struct LowerEntry {
    pub name: Vec<u8>,
    /// The layer its metadata shows from, and its path there.
    pub layer: usize,
    pub path: LayerPath,
    pub st: Stat,
    pub xattrs: Vec<Xattr>,
    /// A regular file's bytes: the layer and path of the file holding them (a metacopy file's
    /// data is further down), and its lstat.
    pub data: Option<(usize, LayerPath, Stat)>,
    /// A directory's content, for [`LowerStack::list`].
    pub dir: Option<DirStack>,
}

impl LowerEntry {
    fn from_resolved(name: Vec<u8>, r: Resolved) -> LowerEntry {
        let data = match (&r, r.top().node.file_type()) {
            (_, FileType::RegularFile) => {
                let d = r.data();
                Some((d.layer, d.path.clone(), d.node.st))
            }
            _ => None,
        };
        let (top, dir) = match r {
            Resolved::Dir { top, stack } => (top, Some(stack)),
            Resolved::NonDir { top, .. } => (top, None),
        };
        LowerEntry {
            name,
            layer: top.layer,
            path: top.path,
            st: top.node.st,
            xattrs: top.node.xattrs,
            data,
            dir,
        }
    }
}

impl LowerStack {
    /// Open the lowerdirs, top first.
    pub fn open(paths: &[PathBuf]) -> Result<LowerStack, UpperError> {
        let roots = paths
            .iter()
            .map(|l| {
                Root::open(l).map_err(|e| UpperError::Io {
                    path: l.display().to_string(),
                    source: e,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(LowerStack {
            lowers: Lowers::new(roots),
        })
    }

    pub fn root(&self, layer: usize) -> &Root {
        &self.lowers.roots[layer]
    }

    /// The merged root directory.
    pub fn root_dir(&self) -> DirStack {
        self.lowers.root_stack()
    }

    /// The merged directory's own entry (from the top layer that has it); `None` when
    /// nothing from the lowers shows there.
    pub fn dir(&self, dir: &DirStack) -> Result<Option<LowerEntry>, UpperError> {
        Ok(self.lowers.dir_node(dir)?.map(|f| LowerEntry {
            name: f.node.name,
            layer: f.layer,
            path: f.path,
            st: f.node.st,
            xattrs: f.node.xattrs,
            data: None,
            dir: Some(dir.clone()),
        }))
    }

    /// The merged children of a directory, whiteouts, opaque directories, redirects and
    /// metacopy applied, sorted bytewise. `merged` is the directory's merged path, for
    /// messages.
    pub fn list(&self, dir: &DirStack, merged: &LayerPath) -> Result<Vec<LowerEntry>, UpperError> {
        Ok(self
            .lowers
            .list(dir, &|n| format!("lower {}", merged.join(n)))?
            .into_iter()
            .map(|(n, r)| LowerEntry::from_resolved(n, r))
            .collect())
    }
}
