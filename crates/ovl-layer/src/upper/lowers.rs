//! The lower stack, read with overlay semantics: what the upper's redirects and metacopy
//! files point at, and the merged lowers that ovl-squash `--output` flattens.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::OwnedFd;
use std::path::PathBuf;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Stat};

use super::node::{Node, read_children};
use super::{RESOLVE, UpperError};
use crate::fsops::open_dir_at;
use crate::path::LayerPath;
use crate::root::Root;
use crate::whiteout::{self, UpperEntry};
use crate::xattrs::list_at;

/// The lower stack, top first, read with overlay semantics (whiteouts and opaque directories
/// in any form hide what is below them).
#[derive(Debug)]
pub(super) struct Lowers {
    pub(super) roots: Vec<Root>,
}

/// A merged lower entry: the layer it comes from and its facts.
pub(super) struct LowerNode {
    pub(super) layer: usize,
    pub(super) node: Node,
}

/// What one layer has at a path.
enum At {
    Missing,
    /// A whiteout, or a non-directory where a directory was needed.
    Hides,
    Dir {
        opaque: bool,
    },
    Other(Node),
}

impl Lowers {
    fn node(&self, layer: usize, p: &LayerPath) -> io::Result<Option<(OwnedFd, Node)>> {
        let Some((parent, name)) = p.split_last() else {
            let fd = open_dir_at(&self.roots[layer].fd(), c".")?;
            let st = rustix::fs::fstat(&fd)?;
            let xattrs = crate::xattrs::list_fd(&fd)?;
            return Ok(Some((
                fd,
                Node {
                    name: Vec::new(),
                    st,
                    xattrs,
                },
            )));
        };
        let dir = match rustix::fs::openat2(
            self.roots[layer].fd(),
            if parent.is_root() {
                OsStr::new(".")
            } else {
                parent.as_os_str()
            },
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            RESOLVE,
        ) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT | rustix::io::Errno::NOTDIR) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let cname = CString::new(name).expect("no NUL in a layer path");
        let st = match rustix::fs::statat(&dir, cname.as_c_str(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(rustix::io::Errno::NOENT) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let xattrs = list_at(&dir, &cname)?;
        Ok(Some((
            dir,
            Node {
                name: name.to_vec(),
                st,
                xattrs,
            },
        )))
    }

    /// What layer `layer` has at `p`, as a directory on the way (`want_dir`) or as the target.
    fn at(&self, layer: usize, p: &LayerPath, want_dir: bool) -> io::Result<At> {
        let Some((_dirfd, node)) = self.node(layer, p)? else {
            return Ok(At::Missing);
        };
        if !p.is_root() {
            let parent_x = node.depends_on_parent_mark() && {
                let (parent, _) = p.split_last().expect("not the root");
                self.node(layer, &parent)?
                    .is_some_and(|(_, dir)| dir.has_xwhiteouts())
            };
            if node.classify(parent_x) != UpperEntry::Plain {
                return Ok(At::Hides);
            }
        }
        if node.file_type() == FileType::Directory {
            let mut opaque = node.own_opaque();
            if !opaque {
                // fuse-overlayfs's marker files.
                for m in [whiteout::OPAQUE_MARKER, whiteout::FUSE_OPAQUE_DEVICE] {
                    if let Some((_, n)) = self.node(layer, &p.join(m))? {
                        opaque |= n.classify(false) == UpperEntry::OpaqueMarker;
                    }
                }
            }
            return Ok(At::Dir { opaque });
        }
        if want_dir {
            return Ok(At::Hides);
        }
        Ok(At::Other(node))
    }

    /// The layers whose directory `p` makes up the merged directory `p`, top first.
    fn dir_layers(&self, p: &LayerPath) -> io::Result<Vec<usize>> {
        let mut out = Vec::new();
        let comps: Vec<&[u8]> = p.components().collect();
        'layers: for i in 0..self.roots.len() {
            let mut blocked = false;
            let mut prefix = LayerPath::root();
            for k in 0..=comps.len() {
                if k > 0 {
                    prefix = prefix.join(comps[k - 1]);
                }
                match self.at(i, &prefix, true)? {
                    At::Missing if blocked => return Ok(out),
                    At::Missing => continue 'layers,
                    At::Hides | At::Other(_) => return Ok(out),
                    At::Dir { opaque } => blocked |= opaque,
                }
            }
            out.push(i);
            if blocked {
                return Ok(out);
            }
        }
        Ok(out)
    }

    /// The visible lower entry at `p` (not a directory's merged listing): its layer and lstat.
    pub(super) fn lookup(&self, p: &LayerPath) -> io::Result<Option<(usize, Stat)>> {
        let Some((parent, _)) = p.split_last() else {
            return Ok(None);
        };
        for i in self.dir_layers(&parent)? {
            match self.at(i, p, false)? {
                At::Missing => continue,
                At::Hides => return Ok(None),
                At::Dir { .. } => {
                    let (_, n) = self.node(i, p)?.expect("just seen");
                    return Ok(Some((i, n.st)));
                }
                At::Other(n) => return Ok(Some((i, n.st))),
            }
        }
        Ok(None)
    }

    /// The merged children of lower directory `p`, whiteouts applied, sorted by name.
    pub(super) fn list(&self, p: &LayerPath) -> io::Result<BTreeMap<Vec<u8>, LowerNode>> {
        let mut out = BTreeMap::new();
        let mut hidden = BTreeSet::new();
        for i in self.dir_layers(p)? {
            let fd = rustix::fs::openat2(
                self.roots[i].fd(),
                if p.is_root() {
                    OsStr::new(".")
                } else {
                    p.as_os_str()
                },
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
                RESOLVE,
            )?;
            let dir_xattrs = crate::xattrs::list_fd(&fd)?;
            let xwhiteouts = whiteout::dir_has_xwhiteouts(&|n: &str| {
                dir_xattrs
                    .iter()
                    .find(|(k, _)| k == n)
                    .map(|(_, v)| v.clone())
            });
            let mut this_layer = Vec::new();
            for node in read_children(&fd)? {
                match node.classify(xwhiteouts) {
                    UpperEntry::OpaqueMarker => {}
                    UpperEntry::Whiteout => this_layer.push(node.name.clone()),
                    UpperEntry::WhiteoutOf(t) => this_layer.push(t),
                    UpperEntry::Plain => {
                        if !out.contains_key(&node.name) && !hidden.contains(&node.name) {
                            out.insert(node.name.clone(), LowerNode { layer: i, node });
                        }
                    }
                }
            }
            hidden.extend(this_layer);
        }
        Ok(out)
    }
}

/// A lower stack read as the merged view it makes on its own (top first), with the same
/// overlay semantics the walk uses for redirects and metacopy. For tools that flatten lowers
/// (ovl-squash `--output`).
#[derive(Debug)]
pub struct LowerStack {
    lowers: Lowers,
}

/// One entry of a merged lower directory: the layer it shows from and its raw facts (xattrs as
/// on disk, unfiltered).
pub struct LowerEntry {
    pub name: Vec<u8>,
    pub layer: usize,
    pub st: Stat,
    pub xattrs: Vec<(String, Vec<u8>)>,
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
            lowers: Lowers { roots },
        })
    }

    pub fn root(&self, layer: usize) -> &Root {
        &self.lowers.roots[layer]
    }

    /// The merged directory `p` itself (from the top layer that has it); `None` when `p` is
    /// not a directory of the merged lowers.
    pub fn dir(&self, p: &LayerPath) -> io::Result<Option<LowerEntry>> {
        let Some(&top) = self.lowers.dir_layers(p)?.first() else {
            return Ok(None);
        };
        Ok(self.lowers.node(top, p)?.map(|(_, n)| LowerEntry {
            name: n.name,
            layer: top,
            st: n.st,
            xattrs: n.xattrs,
        }))
    }

    /// The merged children of directory `p`, whiteouts and opaque directories applied, sorted
    /// bytewise.
    pub fn list(&self, p: &LayerPath) -> io::Result<Vec<LowerEntry>> {
        Ok(self
            .lowers
            .list(p)?
            .into_values()
            .map(|c| LowerEntry {
                name: c.node.name,
                layer: c.layer,
                st: c.node.st,
                xattrs: c.node.xattrs,
            })
            .collect())
    }
}
