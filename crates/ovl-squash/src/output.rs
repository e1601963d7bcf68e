//! `--output NEWDIR`: the merged view written as a new lower; the old lowers and the upper are
//! only read.
//!
//! Two passes into a staging sibling (ovl-layer's `staging`), then one rename:
//! 1. the merged lowers ([`LowerStack`]), except every path the upper replaces, deletes or
//!    hides (whiteouts, opaque and redirected directories, non-directories), so nothing is
//!    written twice; unchanged files are shared with the old lower (reflink, else a hardlink
//!    with `--link`, else a copy that keeps holes), hardlinks inside the lowers stay hardlinks;
//! 2. the upper's changes in stream order ([`Upper::walk`]), directory metadata last, deepest
//!    first (writing into a directory bumps its times).
//!
//! Crash safety is the staging's: NEWDIR appears only by the final rename, after a syncfs; an
//! interrupted run (SIGINT, SIGTERM, SIGHUP) removes its `.NEWDIR.ovl-squash-TOKEN` sibling
//! before it exits, a SIGKILLed one leaves it for the next run to remove.

use std::collections::{HashMap, HashSet};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use rustix::fs::{FileType, Mode};

use ovl_layer::{
    Change, DirStack, Kind, Layer, LayerPath, LowerStack, Meta, Root, Staging, Upper, UpperOptions,
    create_file_at, cstr, is_dir, link_at, open_dir_at, open_file_at, special_kind,
};

use crate::Summary;
use crate::crash;
use crate::error::{SquashError, io_at};
use crate::fsops::{self, Sharing};

/// The tool name in the staging sibling's name.
pub(crate) const TOOL: &str = "ovl-squash";

pub(crate) fn squash_to(
    lowers: &[PathBuf],
    upper: &Path,
    out: &Path,
    ids: Option<ovl_layer::RootlessMaps>,
    sharing: &Sharing,
    sum: &mut Summary,
) -> Result<(), SquashError> {
    let staging = Staging::new(out, TOOL)?;
    crash::step();
    let up = Upper::open(
        upper,
        &UpperOptions {
            lowers: lowers.to_vec(),
            ids,
        },
    )?;
    let changes = up.changes()?;
    let mut prune = HashSet::new();
    for c in &changes {
        match c {
            Change::Whiteout(p) | Change::Redirect { path: p, .. } => {
                prune.insert(p.clone());
            }
            Change::Entry(e) => match e.kind {
                Kind::Dir { opaque: false } => {}
                _ if e.path.is_root() => {}
                _ => {
                    prune.insert(e.path.clone());
                }
            },
        }
    }
    let stack = LowerStack::open(lowers)?;
    let out_root = Root::open(&staging.tmp).map_err(io_at(staging.tmp.display()))?;
    let mut b = Builder {
        stack: &stack,
        up: &up,
        sharing,
        out_root: &out_root,
        links: HashMap::new(),
        sum,
    };
    let root_fd = open_dir_at(&out_root.fd(), c".").map_err(io_at(staging.tmp.display()))?;
    let root_dir = stack.root_dir();
    if let Some(top) = stack.dir(&root_dir)? {
        b.lower_dir(&LayerPath::root(), &root_dir, &root_fd, &prune)?;
        fsops::apply_meta_fd(&root_fd, &Meta::from_disk(&top.st, &top.xattrs))
            .map_err(io_at(staging.tmp.display()))?;
    }
    let mut dirs = Vec::new();
    for c in changes {
        b.change(c, &mut dirs)?;
    }
    for (p, meta) in dirs.into_iter().rev() {
        let at = out_root.display(&p);
        if p.is_root() {
            fsops::apply_meta_fd(&root_fd, &meta).map_err(io_at(at))?;
        } else {
            let leaf = out_root.leaf(&p, false).map_err(io_at(&at))?;
            fsops::apply_meta(&leaf.dir, &leaf.name, &meta).map_err(io_at(at))?;
        }
        crash::step();
    }
    staging.commit()?;
    crash::step();
    Ok(())
}

struct Builder<'a> {
    stack: &'a LowerStack,
    up: &'a Upper,
    sharing: &'a Sharing,
    out_root: &'a Root,
    /// (dev, ino) of a source inode -> where it was written first.
    links: HashMap<(u64, u64), LayerPath>,
    sum: &'a mut Summary,
}

impl Builder<'_> {
    /// Write the merged lower directory `p` into `out` (open), minus what the upper prunes.
    fn lower_dir(
        &mut self,
        p: &LayerPath,
        dir: &DirStack,
        out: &OwnedFd,
        prune: &HashSet<LayerPath>,
    ) -> Result<(), SquashError> {
        for ent in self.stack.list(dir, p)? {
            let cp = p.join(&ent.name);
            if prune.contains(&cp) {
                continue;
            }
            let root = self.stack.root(ent.layer);
            let at = root.display(&ent.path);
            let name = cstr(&ent.name).map_err(io_at(&at))?;
            let ft = FileType::from_raw_mode(ent.st.st_mode);
            let meta = Meta::from_disk(&ent.st, &ent.xattrs);
            self.sum.entries += 1;
            if ft == FileType::Directory {
                rustix::fs::mkdirat(out, name.as_c_str(), Mode::from_raw_mode(0o700))
                    .map_err(|e| io_at(self.out_root.display(&cp))(e.into()))?;
                crash::step();
                let cfd = open_dir_at(out, &name).map_err(io_at(&at))?;
                let sub = ent.dir.as_ref().expect("a directory has its stack");
                self.lower_dir(&cp, sub, &cfd, prune)?;
                fsops::apply_meta(out, &name, &meta).map_err(io_at(self.out_root.display(&cp)))?;
                crash::step();
                continue;
            }
            let key = (ent.st.st_dev, ent.st.st_ino);
            if ent.st.st_nlink > 1 {
                if let Some(first) = self.links.get(&key) {
                    let t = self.out_root.leaf(first, false).map_err(io_at(&at))?;
                    link_at(&t.dir, &t.name, out, &name)
                        .map_err(io_at(self.out_root.display(&cp)))?;
                    crash::step();
                    continue;
                }
                self.links.insert(key, cp.clone());
            }
            if ft == FileType::RegularFile {
                // The bytes may be in another layer (a metacopy file's data is below it); the
                // file is shared only when it is the entry itself with exactly this metadata.
                let (dl, dp, _) = ent.data.as_ref().expect("a regular file has its data");
                let data_root = self.stack.root(*dl);
                let src = data_root
                    .leaf(dp, false)
                    .map_err(io_at(data_root.display(dp)))?;
                let clean = meta.xattrs.len() == ent.xattrs.len() && *dl == ent.layer;
                self.share_file(&src.dir, &src.name, clean, out, &name, &meta)
                    .map_err(io_at(self.out_root.display(&cp)))?;
            } else {
                let src = root.leaf(&ent.path, false).map_err(io_at(&at))?;
                let kind = special_kind(&src.dir, &src.name, &ent.st).map_err(io_at(&at))?;
                fsops::make_special(out, &name, &kind)
                    .and_then(|()| fsops::apply_meta(out, &name, &meta))
                    .map_err(io_at(self.out_root.display(&cp)))?;
            }
            crash::step();
        }
        Ok(())
    }

    /// A file with the content of `src_dir/src` and metadata `meta`: a hardlink when allowed
    /// (`--link`, and the source carries exactly `meta`), else a reflink or a copy.
    fn share_file(
        &mut self,
        src_dir: &OwnedFd,
        src: &std::ffi::CStr,
        linkable: bool,
        out: &OwnedFd,
        name: &std::ffi::CStr,
        meta: &Meta,
    ) -> std::io::Result<()> {
        if self.sharing.link && linkable {
            match link_at(src_dir, src, out, name) {
                Ok(()) => {
                    self.sharing
                        .linked
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return Ok(());
                }
                // Another filesystem, or protected_hardlinks: share by content instead.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EXDEV | libc::EPERM)) => {}
                Err(e) => return Err(e),
            }
        }
        let from = open_file_at(src_dir, src)?;
        let to = create_file_at(out, name)?;
        self.sharing.fill(&from, &to)?;
        drop(to);
        fsops::apply_meta(out, name, meta)
    }

    fn change(&mut self, c: Change, dirs: &mut Vec<(LayerPath, Meta)>) -> Result<(), SquashError> {
        let e = match c {
            Change::Whiteout(p) => {
                let leaf = self.out_root.leaf(&p, false);
                if let Ok(leaf) = leaf {
                    leaf.remove_all()
                        .map_err(io_at(self.out_root.display(&p)))?;
                }
                self.sum.whiteouts += 1;
                return Ok(());
            }
            Change::Redirect { .. } => return Ok(()),
            Change::Entry(e) => e,
        };
        let meta = fsops::disk_meta(&e.meta, &e.kind);
        if e.path.is_root() {
            dirs.push((e.path, meta));
            return Ok(());
        }
        let at = self.out_root.display(&e.path);
        let leaf = self.out_root.leaf(&e.path, false).map_err(io_at(&at))?;
        let existing = leaf.stat().map_err(io_at(&at))?;
        self.sum.entries += 1;
        if let Kind::Dir { opaque } = e.kind {
            if opaque {
                self.sum.opaque_dirs += 1;
            }
            let keep = existing.as_ref().is_some_and(is_dir) && !opaque;
            if !keep {
                leaf.remove_all().map_err(io_at(&at))?;
                rustix::fs::mkdirat(&leaf.dir, leaf.name.as_c_str(), Mode::from_raw_mode(0o700))
                    .map_err(|er| io_at(&at)(er.into()))?;
                crash::step();
            }
            dirs.push((e.path, meta));
            return Ok(());
        }
        if existing.is_some() {
            leaf.remove_all().map_err(io_at(&at))?;
        }
        match &e.kind {
            Kind::File { source, .. } => {
                let (src_root, linkable) = match source.layer {
                    Layer::Upper => (None, false),
                    Layer::Lower(i) => (Some(self.stack.root(i)), true),
                };
                let src_label = match src_root {
                    Some(r) => r.display(&source.path),
                    None => self.up.display(&source.path),
                };
                match src_root {
                    // A lower file: share it when it carries exactly this metadata.
                    Some(r) => {
                        let src = r.leaf(&source.path, false).map_err(io_at(&src_label))?;
                        let st = src.stat().map_err(io_at(&src_label))?;
                        let same = st.is_some_and(|st| {
                            let have = src.xattrs().unwrap_or_default();
                            Meta::from_disk(&st, &have) == meta
                                && ovl_layer::public_xattrs(&have).len() == have.len()
                        });
                        self.share_file(
                            &src.dir,
                            &src.name,
                            linkable && same,
                            &leaf.dir,
                            &leaf.name,
                            &meta,
                        )
                        .map_err(io_at(&at))?;
                    }
                    // Never a hardlink into the upper: a later write through the overlay would
                    // change the new lower too.
                    None => {
                        let from = self.up.open_source(source)?;
                        let to = create_file_at(&leaf.dir, &leaf.name).map_err(io_at(&at))?;
                        self.sharing.fill(&from, &to).map_err(io_at(&at))?;
                        drop(to);
                        fsops::apply_meta(&leaf.dir, &leaf.name, &meta).map_err(io_at(&at))?;
                    }
                }
            }
            Kind::Hardlink { target } => {
                let t = self.out_root.leaf(target, false).map_err(io_at(&at))?;
                link_at(&t.dir, &t.name, &leaf.dir, &leaf.name).map_err(io_at(&at))?;
            }
            kind => {
                fsops::make_special(&leaf.dir, &leaf.name, kind)
                    .and_then(|()| fsops::apply_meta(&leaf.dir, &leaf.name, &meta))
                    .map_err(io_at(&at))?;
            }
        }
        crash::step();
        Ok(())
    }
}
