//! Reading an overlay upperdir: the one reader of upper layers (ovl-diff, ovl-squash).
//!
//! Owns turning an upperdir, in any writer's format, into a stream of typed [`Change`]s that
//! say what the upper means in the merged view:
//! - the walk: directory fds opened with `O_NOFOLLOW`, entries lstat'ed with `*at` calls, names
//!   as bytes, each directory's children sorted bytewise;
//! - classification of every entry by [`whiteout::classify_upper`] and [`whiteout::dir_is_opaque`]
//!   (kernel 0/0 devices, xattr whiteouts, fuse-overlayfs markers, both xattr namespaces),
//!   decided *before* hardlink tracking, because all kernel whiteouts of an upper share an inode;
//! - hardlinks inside the upper (the first path of an inode, in walk order, is the target);
//! - redirect_dir and metacopy: with the lowers the upper was mounted on, a renamed directory
//!   becomes a [`Change::Redirect`] followed by an opaque directory with its *full* merged content
//!   (lower entries included), and a metacopy file's data is read from the lower file it points
//!   to. The lowers are read as the kernel reads them (see [`LowerStack`]: every lower may
//!   once have been an upper, with its own redirects, metacopy files, whiteouts and opaque
//!   directories). Without lowers they are refused ([`UpperError::NeedsLowers`]): a wrong
//!   result is never produced silently;
//! - `index=on` copy-ups of a lower file with other hardlinks: the merged view shows every name
//!   of the lower inode as the copied-up file (the kernel finds it through workdir/index), but
//!   the upper holds only the names that were copied up. Before anything is emitted, the upper
//!   is checked for such a file whose merged link count (its `overlay.nlink` xattr) is more
//!   than its names in the upper, and refused ([`UpperError::IndexedHardlink`]);
//! - the metadata a layer carries: xattrs filtered by [`whiteout::classify_upper_xattr`] (plus
//!   `security.selinux` dropped and `security.capability` put in its namespace-root form) and,
//!   when asked, host ids mapped back to container ids; an owner and mode recorded in an xattr
//!   ([`crate::owners`]: rootless without subordinate ids) win over the file's own.
//!
//! Order of the stream, per directory: the directory itself (the root first, with an empty
//! path), then its whiteouts, then its other children, each group sorted bytewise, depth first.

mod index_links;
pub(crate) mod lower_stack;
pub(crate) mod meta;
mod node;
mod walk;

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags, ResolveFlags};

use crate::fsops::open_dir_at;
use crate::idmap::RootlessMaps;
use crate::path::LayerPath;
use crate::root::Root;
use crate::xattrs::Xattr;

#[cfg(test)]
use meta::layer_capability;

use lower_stack::Lowers;
use node::Node;
use walk::{DirCtx, Walker};

/// How to read an upper.
#[derive(Debug, Clone, Default)]
pub struct UpperOptions {
    /// The lowerdirs the upper was mounted on, top first (as in `lowerdir=`). Needed for
    /// redirect_dir and metacopy uppers.
    pub lowers: Vec<PathBuf>,
    /// Map host ids back to container ids (a rootless upper read outside its user namespace,
    /// or an upper written under `ovl-mount --uidmap`). `None`: ids as this process sees them.
    /// The upper always holds host ids; a lower only when its root directory belongs to the
    /// host id of container root (imported shifted, or rootless): a lower whose root is owned
    /// otherwise holds container ids (it was mounted through an idmapped mount) and is read as
    /// it is. See [`lower_holds_host_ids`].
    pub ids: Option<RootlessMaps>,
}

/// Whether a lower whose root directory is owned by `root_uid` holds host ids under `maps`
/// (the ids an upper written under that map holds): its root belongs to the host id that
/// container root maps to. A lower imported for idmapped mounts keeps container ids (its root
/// is container root's, 0) and must not be mapped a second time.
pub fn lower_holds_host_ids(root_uid: u32, maps: &RootlessMaps) -> bool {
    maps.uid.to_host(0) == Some(root_uid)
}

#[derive(Debug, thiserror::Error)]
pub enum UpperError {
    #[error("{path}")]
    Io { path: String, source: io::Error },
    #[error(
        "{path}: {what}: the upper was mounted with redirect_dir/metacopy and cannot be read \
         without the lowers it was mounted on (give them with --lower)"
    )]
    NeedsLowers { path: String, what: String },
    #[error("{path}: {what}, which is not in the lowers")]
    NotInLowers { path: String, what: String },
    #[error("{path}: bad {xattr} value {value:?}")]
    BadXattr {
        path: String,
        xattr: String,
        value: String,
    },
    #[error(
        "{path}: {why}. A layer made from this upper would leave the file's other names \
         unchanged and no longer linked to it (the lower file has other hardlinks and the overlay \
         was mounted with index=on, which changes them all in the merged view). Refused: copy up \
         every name of the file through the mount (e.g. chmod or touch each) before exporting, or \
         mount without index=on before changing such files"
    )]
    IndexedHardlink { path: String, why: String },
    #[error(
        "{path}: {which} {id} is not mapped to a container id (the upper holds a host id outside \
         the user's subordinate ranges)"
    )]
    UnmappedId {
        path: String,
        which: &'static str,
        id: u32,
    },
}

/// Which tree an entry's data is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layer {
    Upper,
    /// Index into [`UpperOptions::lowers`].
    Lower(usize),
}

/// Where a regular file's bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub layer: Layer,
    pub path: LayerPath,
}

/// What an entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// `opaque`: nothing from the lowers shows below it.
    Dir {
        opaque: bool,
    },
    /// `sparse`: the source file has holes (fewer blocks than its size).
    File {
        source: Source,
        sparse: bool,
    },
    /// Another name of the file emitted earlier at `target`.
    Hardlink {
        target: LayerPath,
    },
    Symlink {
        target: Vec<u8>,
    },
    CharDevice {
        major: u32,
        minor: u32,
    },
    BlockDevice {
        major: u32,
        minor: u32,
    },
    Fifo,
    Socket,
}

/// The metadata of an entry as the merged view shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    /// Permission bits incl. setuid/setgid/sticky (`0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: (i64, u32),
    /// Bytes of data (regular files only, else 0).
    pub size: u64,
    /// Sorted by name; overlay-private ones removed, escaped ones unescaped.
    pub xattrs: Vec<Xattr>,
}

/// One entry of the merged view that this upper provides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Empty for the root.
    pub path: LayerPath,
    pub kind: Kind,
    pub meta: Meta,
}

/// One thing an upper says about the merged view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Nothing from the lowers shows at `path`, and the upper has nothing there.
    Whiteout(LayerPath),
    /// Comes right before the [`Entry`] of directory `path`: it is lower directory `from` (its
    /// path in the merged lowers), renamed (redirect_dir). The entry that follows is opaque
    /// and its full content, lower entries included, follows it. `from == path`: a redirect
    /// to its own path (what `ovl-squash --in-place` leaves while it works).
    Redirect {
        path: LayerPath,
        from: LayerPath,
    },
    Entry(Entry),
}

/// An upperdir opened for reading.
#[derive(Debug)]
pub struct Upper {
    root: Root,
    lowers: Lowers,
    ids: Option<RootlessMaps>,
    /// Per lower: whether it holds host ids, so that `ids` maps its entries too.
    lower_host_ids: Vec<bool>,
    /// The directory [`Upper::open_source`] opened last: files come in walk order, so most
    /// opens reuse it instead of resolving the whole path again.
    last_dir: std::sync::Mutex<Option<(Layer, LayerPath, OwnedFd)>>,
}

const RESOLVE: ResolveFlags = ResolveFlags::IN_ROOT
    .union(ResolveFlags::NO_MAGICLINKS)
    .union(ResolveFlags::NO_SYMLINKS);

impl Upper {
    pub fn open(path: &Path, opts: &UpperOptions) -> Result<Upper, UpperError> {
        let io_err = |p: &Path, e: io::Error| UpperError::Io {
            path: p.display().to_string(),
            source: e,
        };
        let root = Root::open(path).map_err(|e| io_err(path, e))?;
        let lowers = opts
            .lowers
            .iter()
            .map(|l| Root::open(l).map_err(|e| io_err(l, e)))
            .collect::<Result<Vec<_>, _>>()?;
        let lower_host_ids = match &opts.ids {
            None => vec![false; opts.lowers.len()],
            Some(maps) => opts
                .lowers
                .iter()
                .map(|l| {
                    use std::os::unix::fs::MetadataExt;
                    std::fs::metadata(l)
                        .map(|md| lower_holds_host_ids(md.uid(), maps))
                        .map_err(|e| io_err(l, e))
                })
                .collect::<Result<Vec<_>, _>>()?,
        };
        Ok(Upper {
            root,
            lowers: Lowers::new(lowers),
            ids: opts.ids.clone(),
            lower_host_ids,
            last_dir: std::sync::Mutex::new(None),
        })
    }

    pub fn path(&self) -> &Path {
        self.root.path()
    }

    /// The map that takes the ids on disk in `layer` to container ids, if any.
    pub(super) fn ids_of(&self, layer: &Layer) -> Option<&RootlessMaps> {
        match layer {
            Layer::Upper => self.ids.as_ref(),
            Layer::Lower(i) => self.ids.as_ref().filter(|_| self.lower_host_ids[*i]),
        }
    }

    /// The host path of a layer path in the upper, for messages.
    pub fn display(&self, p: &LayerPath) -> String {
        self.root.display(p)
    }

    /// Every change, in stream order (see the module doc), handed to `f`.
    pub fn walk<E: From<UpperError>>(
        &self,
        f: &mut dyn FnMut(Change) -> Result<(), E>,
    ) -> Result<(), E> {
        self.check_index_links()?;
        // Each walk reads the layers afresh (ovl-squash --in-place changes them in between).
        self.lowers.forget();
        *self.last_dir.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let mut w = Walker {
            up: self,
            f,
            links: HashMap::new(),
        };
        let path = LayerPath::root();
        let fd = open_dir_at(&self.root.fd(), c".").map_err(|e| self.io(&path, e))?;
        let st = rustix::fs::fstat(&fd).map_err(|e| self.io(&path, e.into()))?;
        let xattrs = crate::xattrs::list_fd(&fd).map_err(|e| self.io(&path, e))?;
        w.upper_dir(
            &fd,
            &path,
            Node {
                name: Vec::new(),
                st,
                xattrs,
            },
            DirCtx {
                lower: Some(walk::LowerDir::root(self.lowers.root_stack())),
                expanded: false,
                force_opaque: false,
                redirect: None,
            },
        )
    }

    /// Whether the merged root's attributes `root` (the upper root's, as its entry carries
    /// them) differ from the lowers' root in mode, owner or xattrs: then a layer must carry
    /// the root (the merged root takes the upper's attributes). `false` without lowers.
    pub fn root_differs(&self, root: &Meta) -> Result<bool, UpperError> {
        let Some(top) = self.lowers.top_root()? else {
            return Ok(false);
        };
        let lower = meta::meta(
            self,
            &LayerPath::root(),
            &top.node,
            self.ids_of(&Layer::Lower(top.layer)),
        )?;
        Ok((lower.mode, lower.uid, lower.gid, &lower.xattrs)
            != (root.mode, root.uid, root.gid, &root.xattrs))
    }

    /// Every change, collected.
    pub fn changes(&self) -> Result<Vec<Change>, UpperError> {
        let mut out = Vec::new();
        self.walk(&mut |c| {
            out.push(c);
            Ok::<(), UpperError>(())
        })?;
        Ok(out)
    }

    /// Open a regular file's data for reading (never following a symlink on the way).
    pub fn open_source(&self, src: &Source) -> Result<std::fs::File, UpperError> {
        let (root, label) = match src.layer {
            Layer::Upper => (&self.root, self.root.display(&src.path)),
            Layer::Lower(i) => (
                &self.lowers.roots[i],
                self.lowers.roots[i].display(&src.path),
            ),
        };
        let err = |e: rustix::io::Errno| UpperError::Io {
            path: label.clone(),
            source: e.into(),
        };
        let (parent, name) = src.path.split_last().ok_or_else(|| UpperError::Io {
            path: label.clone(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "the root is not a file"),
        })?;
        let name = CString::new(name).map_err(|_| err(rustix::io::Errno::INVAL))?;
        let mut cache = self.last_dir.lock().unwrap_or_else(|e| e.into_inner());
        let hit = matches!(&*cache, Some((l, p, _)) if *l == src.layer && *p == parent);
        if !hit {
            let dir = rustix::fs::openat2(
                root.fd(),
                if parent.is_root() {
                    OsStr::new(".")
                } else {
                    parent.as_os_str()
                },
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
                RESOLVE,
            )
            .map_err(err)?;
            *cache = Some((src.layer.clone(), parent, dir));
        }
        let (_, _, dir) = cache.as_ref().expect("just filled");
        crate::fsops::open_file_at(dir, &name).map_err(|e| UpperError::Io {
            path: label.clone(),
            source: e,
        })
    }

    fn io(&self, p: &LayerPath, e: io::Error) -> UpperError {
        UpperError::Io {
            path: self.root.display(p),
            source: e,
        }
    }
}

#[cfg(test)]
mod tests;
