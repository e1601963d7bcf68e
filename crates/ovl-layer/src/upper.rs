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
//!   to. Without lowers they are refused ([`UpperError::NeedsLowers`]): a wrong result is never
//!   produced silently;
//! - `index=on` copy-ups of a lower file with other hardlinks: the merged view shows every name
//!   of the lower inode as the copied-up file (the kernel finds it through workdir/index), but
//!   the upper holds only the names that were copied up. Before anything is emitted, the upper
//!   is checked for such a file whose merged link count (its `overlay.nlink` xattr) is more
//!   than its names in the upper, and refused ([`UpperError::IndexedHardlink`]);
//! - the metadata a layer carries: xattrs filtered by [`whiteout::classify_upper_xattr`] (plus
//!   `security.selinux` dropped and `security.capability` put in its namespace-root form) and,
//!   when asked, host ids mapped back to container ids.
//!
//! Order of the stream, per directory: the directory itself (the root first, with an empty
//! path), then its whiteouts, then its other children, each group sorted bytewise, depth first.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Stat};

use crate::fsops::open_dir_at;
use crate::idmap::RootlessMaps;
use crate::path::LayerPath;
use crate::root::Root;
use crate::whiteout::{self, UpperEntry, UpperFacts, UpperXattr, XattrNs, key};
use crate::xattrs::list_at;

/// How to read an upper.
#[derive(Debug, Clone, Default)]
pub struct UpperOptions {
    /// The lowerdirs the upper was mounted on, top first (as in `lowerdir=`). Needed for
    /// redirect_dir and metacopy uppers.
    pub lowers: Vec<PathBuf>,
    /// Map host ids back to container ids (a rootless upper read outside its user namespace).
    /// `None`: ids as this process sees them.
    pub ids: Option<RootlessMaps>,
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
    pub xattrs: Vec<(String, Vec<u8>)>,
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
    /// Comes right before the [`Entry`] of directory `path`: it is lower directory `from`,
    /// renamed (redirect_dir). The entry that follows is opaque and its full content, lower
    /// entries included, follows it.
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
        Ok(Upper {
            root,
            lowers: Lowers { roots: lowers },
            ids: opts.ids.clone(),
            last_dir: std::sync::Mutex::new(None),
        })
    }

    pub fn path(&self) -> &Path {
        self.root.path()
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
                lower: Some(LayerPath::root()),
                expanded: false,
                force_opaque: false,
                redirect: None,
            },
        )
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
    fn check_index_links(&self) -> Result<(), UpperError> {
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
            let listed = match xattr::list(crate::fsops::proc_path(fd, &name)) {
                Ok(l) => l.collect::<Vec<_>>(),
                Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => continue,
                Err(e) => return Err(self.io(&cpath, e)),
            };
            if !listed
                .iter()
                .any(|n| marked.iter().any(|m| n.as_encoded_bytes() == m.as_bytes()))
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

/// One directory child: its name, lstat and xattrs.
struct Node {
    name: Vec<u8>,
    st: Stat,
    xattrs: Vec<(String, Vec<u8>)>,
}

impl Node {
    fn xattr(&self, name: &str) -> Option<Vec<u8>> {
        self.xattrs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    }

    /// An overlay xattr (`key`) in either namespace.
    fn overlay_xattr(&self, key: &str) -> Option<Vec<u8>> {
        XattrNs::ALL.iter().find_map(|ns| self.xattr(&ns.name(key)))
    }

    fn file_type(&self) -> FileType {
        FileType::from_raw_mode(self.st.st_mode)
    }

    /// What this entry means; `parent_xwhiteouts`: its directory is marked `opaque=x`.
    fn classify(&self, parent_xwhiteouts: bool) -> UpperEntry {
        let ft = self.file_type();
        let get = |n: &str| self.xattr(n);
        whiteout::classify_upper(&UpperFacts {
            name: &self.name,
            is_char_device: ft == FileType::CharacterDevice,
            is_regular: ft == FileType::RegularFile,
            is_dir: ft == FileType::Directory,
            rdev: self.st.st_rdev,
            size: self.st.st_size as u64,
            parent_xwhiteouts,
            xattr: &get,
        })
    }

    fn own_opaque(&self) -> bool {
        whiteout::dir_is_opaque(&|n: &str| self.xattr(n))
    }

    /// A directory marked `opaque=x`: its `overlay.whiteout` files are whiteouts.
    fn has_xwhiteouts(&self) -> bool {
        whiteout::dir_has_xwhiteouts(&|n: &str| self.xattr(n))
    }

    /// Whether this entry is a whiteout depends on its parent's `opaque=x` mark.
    fn depends_on_parent_mark(&self) -> bool {
        self.classify(true) != self.classify(false)
    }
}

/// How a directory is being walked.
struct DirCtx {
    /// Where this directory's lower content is (after redirects); `None` when nothing below
    /// shows through.
    lower: Option<LayerPath>,
    /// Inside a redirected directory: lower entries must be emitted too.
    expanded: bool,
    /// A whiteout and an entry share this directory's name: it replaces what was below.
    force_opaque: bool,
    /// This directory is lower directory `from`, renamed.
    redirect: Option<LayerPath>,
}

struct Walker<'a, 'f, E> {
    up: &'a Upper,
    f: &'f mut dyn FnMut(Change) -> Result<(), E>,
    /// (dev, ino) -> the path emitted first for that inode.
    links: HashMap<(u64, u64), LayerPath>,
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

    fn upper_dir(
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
        let up = self.up;
        let st = &node.st;
        let (mut uid, mut gid) = (st.st_uid, st.st_gid);
        let mut root_uid_map: Option<&crate::idmap::IdMap> = None;
        if let Some(maps) = &up.ids {
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
            if name == SELINUX_XATTR {
                // A label of the host's policy, not of the image.
                continue;
            }
            let value = if name == CAPABILITY_XATTR {
                match layer_capability(value, root_uid_map) {
                    Some(v) => v,
                    None => {
                        return Err(UpperError::BadXattr {
                            path: up.display(path),
                            xattr: name,
                            value: crate::path::display_bytes(value),
                        }
                        .into());
                    }
                }
            } else {
                value.clone()
            };
            xattrs.push((name, value));
        }
        xattrs.sort();
        Ok(Meta {
            mode: st.st_mode & 0o7777,
            uid,
            gid,
            mtime: (st.st_mtime, st.st_mtime_nsec as u32),
            size: 0,
            xattrs,
        })
    }
}

/// Dropped from layers: a label of the host's SELinux policy.
pub const SELINUX_XATTR: &str = "security.selinux";
/// File capabilities: v2, or v3 with the uid of the namespace root they apply in.
pub const CAPABILITY_XATTR: &str = "security.capability";

const VFS_CAP_REVISION_MASK: u32 = 0xff00_0000;
const VFS_CAP_REVISION_2: u32 = 0x0200_0000;
const VFS_CAP_REVISION_3: u32 = 0x0300_0000;

/// `security.capability` as a layer carries it: a v3 value whose namespace root is container
/// root (0) becomes the equivalent v2 (what a reader inside the namespace sees); a v3 root
/// that is a host id is mapped through `uid_map` when given. `None`: malformed.
pub fn layer_capability(value: &[u8], uid_map: Option<&crate::idmap::IdMap>) -> Option<Vec<u8>> {
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

fn is_sparse(st: &Stat) -> bool {
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

/// Every child of an open directory with its lstat and xattrs, sorted by name.
fn read_children(fd: &OwnedFd) -> io::Result<Vec<Node>> {
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

/// The lower stack, top first, read with overlay semantics (whiteouts and opaque directories
/// in any form hide what is below them).
#[derive(Debug)]
struct Lowers {
    roots: Vec<Root>,
}

/// A merged lower entry: the layer it comes from and its facts.
struct LowerNode {
    layer: usize,
    node: Node,
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
    fn lookup(&self, p: &LayerPath) -> io::Result<Option<(usize, Stat)>> {
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
    fn list(&self, p: &LayerPath) -> io::Result<BTreeMap<Vec<u8>, LowerNode>> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mknod_whiteout(p: &Path) {
        rustix::fs::mknodat(
            rustix::fs::CWD,
            p,
            FileType::CharacterDevice,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
    }

    fn summary(changes: &[Change]) -> Vec<String> {
        changes
            .iter()
            .map(|c| match c {
                Change::Whiteout(p) => format!("wh {p}"),
                Change::Redirect { path, from } => format!("redirect {path} <- {from}"),
                Change::Entry(e) => match &e.kind {
                    Kind::Dir { opaque } => {
                        format!("dir {}{}", e.path, if *opaque { " opaque" } else { "" })
                    }
                    Kind::File { source, .. } => {
                        format!("file {} {:?} {}", e.path, source.layer, source.path)
                    }
                    Kind::Hardlink { target } => format!("link {} -> {target}", e.path),
                    Kind::Symlink { .. } => format!("symlink {}", e.path),
                    Kind::CharDevice { major, minor } => {
                        format!("chr {} {major}:{minor}", e.path)
                    }
                    other => format!("{other:?} {}", e.path),
                },
            })
            .collect()
    }

    fn is_root() -> bool {
        rustix::process::geteuid().is_root()
    }

    #[test]
    fn kernel_and_fuse_forms_and_hardlinks() {
        if !is_root() {
            eprintln!("SKIPPED: needs root for mknod and trusted xattrs");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let u = t.path();
        std::fs::create_dir_all(u.join("a/opq")).unwrap();
        std::fs::create_dir_all(u.join("fuse/opqdir")).unwrap();
        std::fs::create_dir_all(u.join("x")).unwrap();
        // Three kernel whiteouts that share one inode, as the kernel makes them.
        mknod_whiteout(&u.join("a/gone1"));
        std::fs::hard_link(u.join("a/gone1"), u.join("a/gone2")).unwrap();
        std::fs::hard_link(u.join("a/gone1"), u.join("x/gone3")).unwrap();
        xattr::set(u.join("a/opq"), "trusted.overlay.opaque", b"y").unwrap();
        xattr::set(u.join("a"), "trusted.overlay.origin", b"zz").unwrap();
        // fuse-overlayfs markers.
        std::fs::write(u.join("fuse/.wh.old"), b"").unwrap();
        std::fs::write(u.join("fuse/opqdir/.wh..wh..opq"), b"").unwrap();
        mknod_whiteout(&u.join("fuse/opqdir/.wh..opq"));
        // An xattr whiteout in a directory marked opaque=x (not opaque).
        std::fs::write(u.join("x/xwh"), b"").unwrap();
        xattr::set(u.join("x/xwh"), "user.overlay.whiteout", b"").unwrap();
        xattr::set(u.join("x"), "user.overlay.opaque", b"x").unwrap();
        // Real hardlinks, and an escaped xattr.
        std::fs::write(u.join("x/f"), b"data").unwrap();
        std::fs::hard_link(u.join("x/f"), u.join("a/f2")).unwrap();
        xattr::set(u.join("x/f"), "user.overlay.overlay.keep", b"1").unwrap();
        xattr::set(u.join("x/f"), "user.plain", b"2").unwrap();
        std::fs::set_permissions(u.join("x/f"), std::fs::Permissions::from_mode(0o4755)).unwrap();

        let up = Upper::open(u, &UpperOptions::default()).unwrap();
        let changes = up.changes().unwrap();
        assert_eq!(
            summary(&changes),
            [
                "dir .",
                "dir a",
                "wh a/gone1",
                "wh a/gone2",
                "file a/f2 Upper a/f2",
                "dir a/opq opaque",
                "dir fuse",
                "wh fuse/old",
                "dir fuse/opqdir opaque",
                "dir x",
                "wh x/gone3",
                "wh x/xwh",
                "link x/f -> a/f2",
            ]
            .map(String::from)
        );
        // "a" sorts before "x": a/f2 is met first, so it carries the data and the metadata.
        let f2 = changes
            .iter()
            .find_map(|c| match c {
                Change::Entry(e) if e.path.as_bytes() == b"a/f2" => Some(e.clone()),
                _ => None,
            })
            .unwrap();
        assert_eq!(f2.meta.mode, 0o4755);
        assert_eq!(
            f2.meta.xattrs,
            vec![
                ("user.overlay.keep".to_string(), b"1".to_vec()),
                ("user.plain".to_string(), b"2".to_vec())
            ]
        );
        let a = changes
            .iter()
            .find_map(|c| match c {
                Change::Entry(e) if e.path.as_bytes() == b"a" => Some(e.clone()),
                _ => None,
            })
            .unwrap();
        assert!(a.meta.xattrs.is_empty(), "{:?}", a.meta.xattrs);
    }

    #[test]
    fn redirect_and_metacopy_need_lowers_and_expand_with_them() {
        let t = tempfile::tempdir().unwrap();
        let (l, u) = (t.path().join("lower"), t.path().join("upper"));
        std::fs::create_dir_all(l.join("old/sub")).unwrap();
        std::fs::write(l.join("old/sub/deep"), b"deep").unwrap();
        std::fs::write(l.join("old/keep"), b"keep").unwrap();
        std::fs::write(l.join("old/del"), b"del").unwrap();
        std::fs::write(l.join("big"), b"lower data").unwrap();
        std::fs::create_dir_all(u.join("new")).unwrap();
        std::fs::write(u.join("new/added"), b"added").unwrap();
        std::fs::write(u.join("new/.wh.del"), b"").unwrap();
        xattr::set(u.join("new"), "user.overlay.redirect", b"old").unwrap();
        std::fs::write(u.join(".wh.old"), b"").unwrap();
        let f = std::fs::File::create(u.join("big")).unwrap();
        f.set_len(10).unwrap();
        xattr::set(u.join("big"), "user.overlay.metacopy", b"").unwrap();

        let err = Upper::open(&u, &UpperOptions::default())
            .unwrap()
            .changes()
            .unwrap_err();
        assert!(matches!(err, UpperError::NeedsLowers { .. }), "{err}");
        assert!(err.to_string().contains("big"), "{err}");

        let opts = UpperOptions {
            lowers: vec![l.clone()],
            ids: None,
        };
        let up = Upper::open(&u, &opts).unwrap();
        assert_eq!(
            summary(&up.changes().unwrap()),
            [
                "dir .",
                "wh old",
                "file big Lower(0) big",
                "redirect new <- old",
                "dir new opaque",
                "file new/added Upper new/added",
                "file new/keep Lower(0) old/keep",
                "dir new/sub",
                "file new/sub/deep Lower(0) old/sub/deep",
            ]
            .map(String::from)
        );
        let mut s = String::new();
        use std::io::Read;
        up.open_source(&Source {
            layer: Layer::Lower(0),
            path: LayerPath::parse(b"big").unwrap(),
        })
        .unwrap()
        .read_to_string(&mut s)
        .unwrap();
        assert_eq!(s, "lower data");
    }

    #[test]
    fn lower_stack_whiteouts_hide() {
        let t = tempfile::tempdir().unwrap();
        let (l1, l2, u) = (t.path().join("l1"), t.path().join("l2"), t.path().join("u"));
        std::fs::create_dir_all(l2.join("d")).unwrap();
        std::fs::write(l2.join("d/a"), b"a").unwrap();
        std::fs::write(l2.join("d/b"), b"b").unwrap();
        std::fs::create_dir_all(l1.join("d")).unwrap();
        std::fs::write(l1.join("d/.wh.a"), b"").unwrap();
        std::fs::write(l1.join("d/c"), b"c").unwrap();
        std::fs::create_dir_all(u.join("e")).unwrap();
        xattr::set(u.join("e"), "user.overlay.redirect", b"/d").unwrap();
        let up = Upper::open(
            &u,
            &UpperOptions {
                lowers: vec![l1, l2],
                ids: None,
            },
        )
        .unwrap();
        assert_eq!(
            summary(&up.changes().unwrap()),
            [
                "dir .",
                "redirect e <- d",
                "dir e opaque",
                "file e/b Lower(1) d/b",
                "file e/c Lower(0) d/c",
            ]
            .map(String::from)
        );
    }

    /// In the lowers too, an `overlay.whiteout` file hides only inside an `opaque=x` directory.
    #[test]
    fn lower_xattr_whiteouts_need_an_opaque_x_parent() {
        let t = tempfile::tempdir().unwrap();
        let (l1, l2, u) = (t.path().join("l1"), t.path().join("l2"), t.path().join("u"));
        for d in ["d", "x"] {
            std::fs::create_dir_all(l2.join(d)).unwrap();
            std::fs::write(l2.join(d).join("a"), b"a").unwrap();
            std::fs::create_dir_all(l1.join(d)).unwrap();
            std::fs::write(l1.join(d).join("a"), b"").unwrap();
            xattr::set(l1.join(d).join("a"), "user.overlay.whiteout", b"").unwrap();
        }
        xattr::set(l1.join("x"), "user.overlay.opaque", b"x").unwrap();
        std::fs::create_dir_all(u.join("e")).unwrap();
        xattr::set(u.join("e"), "user.overlay.redirect", b"/d").unwrap();
        std::fs::create_dir_all(u.join("y")).unwrap();
        xattr::set(u.join("y"), "user.overlay.redirect", b"/x").unwrap();
        let up = Upper::open(
            &u,
            &UpperOptions {
                lowers: vec![l1, l2],
                ids: None,
            },
        )
        .unwrap();
        assert_eq!(
            summary(&up.changes().unwrap()),
            [
                "dir .",
                "redirect e <- d",
                "dir e opaque",
                "file e/a Lower(0) d/a",
                "redirect y <- x",
                "dir y opaque",
            ]
            .map(String::from)
        );
    }

    /// `overlay.nlink` (as an index=on copy-up leaves it, seen on 6.18: `U+0` on the only
    /// upper name of a lower file with two names) refuses the upper unless every merged name
    /// is in it; what `changes()` (ovl-squash) and `walk()` (ovl-diff) both meet first.
    #[test]
    fn index_copy_up_missing_names_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let u = t.path();
        std::fs::create_dir_all(u.join("d")).unwrap();
        std::fs::write(u.join("hl1"), b"x").unwrap();
        let changes = |u: &Path| Upper::open(u, &UpperOptions::default()).unwrap().changes();
        // One name in the upper, two in the merged view.
        xattr::set(u.join("hl1"), "user.overlay.nlink", b"U+0").unwrap();
        let err = changes(u).unwrap_err();
        assert!(matches!(err, UpperError::IndexedHardlink { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains(&format!("{}/hl1", u.display())), "{msg}");
        assert!(msg.contains("index=on") && msg.contains("2 names"), "{msg}");
        // Both names copied up (the kernel then writes U-1): fine, a link entry.
        std::fs::hard_link(u.join("hl1"), u.join("d/hl2")).unwrap();
        xattr::set(u.join("hl1"), "user.overlay.nlink", b"U-1").unwrap();
        assert_eq!(
            summary(&changes(u).unwrap()),
            [
                "dir .",
                "dir d",
                "file d/hl2 Upper d/hl2",
                "link hl1 -> d/hl2"
            ]
            .map(String::from)
        );
        // A third name made through the mount (U+0 again) but only two in the upper.
        xattr::set(u.join("hl1"), "user.overlay.nlink", b"U+0").unwrap();
        let err = changes(u).unwrap_err();
        assert!(
            err.to_string().contains(&format!("{}/d/hl2", u.display())),
            "{err}"
        );
        // Relative to the lower: cannot be checked, refused; junk: a bad xattr.
        xattr::set(u.join("hl1"), "user.overlay.nlink", b"L+0").unwrap();
        let err = changes(u).unwrap_err();
        assert!(matches!(err, UpperError::IndexedHardlink { .. }), "{err}");
        for junk in [&b"2"[..], b"U+", b"U\xc3\xa9", b"X+1", b"U+1x"] {
            xattr::set(u.join("hl1"), "user.overlay.nlink", junk).unwrap();
            let err = changes(u).unwrap_err();
            assert!(matches!(err, UpperError::BadXattr { .. }), "{err}");
        }
        // nfs_export=on indexes every copy-up: one name, one merged name (U-1) is fine.
        std::fs::remove_file(u.join("d/hl2")).unwrap();
        xattr::set(u.join("hl1"), "user.overlay.nlink", b"U-1").unwrap();
        assert_eq!(
            summary(&changes(u).unwrap()),
            ["dir .", "dir d", "file hl1 Upper hl1"].map(String::from)
        );
    }

    #[test]
    fn capabilities_v3_become_v2_at_namespace_root() {
        let mut v3 = vec![0u8; 24];
        v3[..4].copy_from_slice(&(VFS_CAP_REVISION_3 | 1).to_le_bytes());
        v3[4] = 0xaa;
        v3[20..24].copy_from_slice(&1000u32.to_le_bytes());
        let map = crate::idmap::IdMap::single(1000);
        let v2 = layer_capability(&v3, Some(&map)).unwrap();
        assert_eq!(v2.len(), 20);
        assert_eq!(
            u32::from_le_bytes(v2[..4].try_into().unwrap()),
            VFS_CAP_REVISION_2 | 1
        );
        assert_eq!(v2[4], 0xaa);
        // Unmapped namespace root: refused.
        assert_eq!(
            layer_capability(&v3, Some(&crate::idmap::IdMap::single(5))),
            None
        );
        assert_eq!(layer_capability(&v2, None), Some(v2.clone()));
        assert_eq!(layer_capability(b"junk", None), None);
    }
}
