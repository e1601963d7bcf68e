//! `--in-place`: the lower itself becomes the merged view and the upper is emptied, at a cost
//! in the size of the upper (entries move by hardlink and rename; the lower is never copied).
//!
//! # The crash argument
//!
//! Invariant: at every instant, lower + upper mount to exactly the merged view M they mounted
//! to when the squash started. Every step either changes only what the upper hides, or swaps
//! one thing for an identical one; so a kill at any moment loses nothing, and running the same
//! command again (every step is idempotent) completes the squash.
//!
//! What the upper hides in the lower: everything at or below a path where the upper has a
//! whiteout, an opaque or redirected directory, or a non-directory; a lower directory's own
//! metadata where the upper has a directory at that path (merged directories take their
//! attributes and xattrs from the upper); a metacopy file's metadata (only its data comes from
//! below). The steps, in this order:
//!
//! 0. Leftovers of a killed run are removed: the work sibling beside the lower (half-made
//!    entries, never part of any layer) and the swap sibling beside the upper (see 4). Both are
//!    ovl-layer staging siblings (`.LOWER.ovl-squash-TOKEN`, `.UPPER.ovl-squash-TOKEN`, with a
//!    locked marker), so the sweep removes only dead ones of ours. A SIGINT, SIGTERM or SIGHUP
//!    stops the run at the end of the step it is in (see [`ovl_layer::Steps`]),
//!    removes both siblings and exits 128+N: the state a kill after that step leaves, less the
//!    leftovers.
//! 1. Redirects (redirect_dir, metacopy with a redirect) are made local first, because they are
//!    the only upper entries that need lower content at *another* path, which later steps may
//!    delete. For each: the full content is built in the work sibling (hardlinks to the lower
//!    and upper inodes, copies only for metacopy data), renamed to the entry's own path in the
//!    lower (hidden: the redirected upper entry does not look there), synced, then every
//!    redirect in the group is set to the entry's own path, absolute (`/a/e1/d1`): nested ones
//!    first (a relative redirect inside would otherwise be resolved against the new place
//!    before its content is there), the group's own last. An absolute redirect is followed
//!    from the lower's root whatever the entry's parents are, so the entry finds identical
//!    content at its own path even under an opaque parent (a new directory) or a renamed one;
//!    removing the redirect instead would make it look through its parents, which may see
//!    nothing. Such a redirect to itself is done, not pending, on a re-run. An entry whose
//!    target path is still the source of another pending redirect waits; a cycle of renames
//!    is refused ([`SquashError::RedirectCycle`]) after the others are done. (With `index=on`
//!    a kernel checks a metacopy file's lower against its `overlay.origin`: a stack killed
//!    here mounts without `index=on` until a re-run completes.)
//! 2. The upper's changes in stream order, applied to the lower, each under cover of the upper
//!    entry at the same path: a whiteout removes the lower path; a directory makes sure the
//!    lower has one (replacing a non-directory), and one that shows nothing from below (opaque,
//!    or under an opaque one, and not redirected to itself) loses, once its children are done,
//!    every lower entry the upper does not have there (content made local by step 1 below an
//!    opaque directory is one the upper has); a file,
//!    symlink, device, fifo or socket of the upper is hardlinked into the lower (after its
//!    overlay-private xattrs are removed from the inode: invisible through the mount) replacing
//!    what was there, so both layers hold the *same inode*; a metacopy file gets the upper's
//!    metadata on the lower file (a copy renamed over it when that inode has other links);
//!    directory metadata is set after the directory's children, root last.
//!    Now the lower alone is M, and the upper still covers every path it touched.
//! 3. syncfs of the lower's filesystem, so the lower is durable before the upper lets go.
//! 4. The upper is emptied in one atomic step: an empty directory with the upper root's owner,
//!    mode, xattrs and times is made in the swap sibling beside the upper, then exchanged with
//!    the upper (`renameat2(RENAME_EXCHANGE)`); before, upper + lower = M; after, the empty
//!    upper + the lower = M. The old upper, now the swap sibling, is deleted; so is the work
//!    sibling. Emptying the upper entry by entry instead would bump the upper root's mtime,
//!    which *is* the merged root's mtime, at every removal: the exchange changes nothing a
//!    mount shows. (Where the exchange is impossible, e.g. the upper is a mount point, entries
//!    are removed one by one, a directory's opaque markers before its entries (else a crash
//!    would leave an opaque upper directory hiding the lower entries of the children already
//!    gone, and a re-run would empty that lower directory for good), and each directory's
//!    times restored after each removal in it: the merged directory's mtime is then off in
//!    the instant between the two.)
//!
//! A concurrent second squash of the same lower is refused by an exclusive flock on it.
//! The lower's own markers (a whiteout left in a single lower by an import) are left where the
//! upper does not touch: they are invisible in every mount, and finding them would cost a walk
//! of the whole lower.

use std::ffi::{CStr, CString};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{FileType, Mode, OFlags, RenameFlags};

use ovl_layer::{
    Change, Entry, Kind, Layer, LayerPath, Meta, Root, Scratch, Steps, Upper, UpperOptions,
    XattrNs, create_file_at, cstr, is_dir, link_at, open_dir_at, open_file_at, proc_path,
    remove_at, special_kind, stat_at,
};

use crate::Summary;
use crate::crash;
use crate::error::{SquashError, io_at};
use crate::fsops::{self, Sharing};

/// The tool named in the work and swap siblings, `.LOWER.ovl-squash-TOKEN` and
/// `.UPPER.ovl-squash-TOKEN` (made, swept and removed on a signal by ovl-layer's staging).
const SIBLING_TOOL: &str = "ovl-squash";

fn open_path_dir(p: &Path) -> Result<OwnedFd, SquashError> {
    rustix::fs::open(
        p,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io_at(p.display())(e.into()))
}

struct InPlace<'a> {
    lower: Root,
    upper: Root,
    up: Upper,
    sharing: &'a Sharing,
    lower_path: PathBuf,
    /// The work sibling and its directory, once made.
    work: Option<(Scratch, OwnedFd)>,
    work_seq: u64,
    sum: &'a mut Summary,
}

pub(crate) fn squash_in_place(
    lower: &Path,
    upper: &Path,
    ids: Option<ovl_layer::RootlessMaps>,
    sharing: &Sharing,
    sum: &mut Summary,
) -> Result<(), SquashError> {
    let lock = open_path_dir(lower)?;
    match rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {}
        Err(rustix::io::Errno::WOULDBLOCK) => return Err(SquashError::Busy(lower.to_path_buf())),
        Err(e) => return Err(io_at(lower.display())(e.into())),
    }
    // A signal stops the run only between two steps (see crate::crash), then removes the
    // work and swap siblings: the state a kill leaves, less the leftovers.
    let _steps = Steps::begin();
    // 0. Leftovers of a killed run: the dead siblings of ours beside the lower and the upper.
    ovl_layer::sweep_beside(lower, SIBLING_TOOL)?;
    ovl_layer::sweep_beside(upper, SIBLING_TOOL)?;

    let mut ip = InPlace {
        lower: Root::open(lower).map_err(io_at(lower.display()))?,
        upper: Root::open(upper).map_err(io_at(upper.display()))?,
        up: Upper::open(
            upper,
            &UpperOptions {
                lowers: vec![lower.to_path_buf()],
                ids,
            },
        )?,
        sharing,
        lower_path: lower.to_path_buf(),
        work: None,
        work_seq: 0,
        sum,
    };
    // 1. and 2.
    ip.redirects()?;
    ip.apply()?;
    // 3.
    let lower_fd = open_path_dir(lower)?;
    rustix::fs::syncfs(&lower_fd).map_err(|e| io_at(lower.display())(e.into()))?;
    // 4.
    ip.empty_upper(upper)?;
    if let Some((work, fd)) = ip.work.take() {
        drop(fd);
        let (dir, name) = work.at();
        remove_at(dir, name).map_err(io_at(work.dir.display()))?;
    }
    Ok(())
}

/// One upper entry that needs lower content from another path.
struct Pending {
    /// Where it is (in both layers once done).
    target: LayerPath,
    /// The lower paths it reads.
    sources: Vec<LayerPath>,
    /// Its changes: a redirected directory's whole group, or one metacopy file.
    changes: Vec<Change>,
}

fn overlaps(a: &LayerPath, b: &LayerPath) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

/// `p` relative to `base` (which it is below or equal to).
fn relative(p: &LayerPath, base: &LayerPath) -> LayerPath {
    if base.is_root() {
        return p.clone();
    }
    LayerPath::parse(&p.as_bytes()[base.as_bytes().len()..]).expect("a sub path of a layer path")
}

impl InPlace<'_> {
    fn lower_at(&self, p: &LayerPath) -> String {
        self.lower.display(p)
    }

    /// The work sibling, made on first use (same filesystem as the lower: renames from it are
    /// atomic; outside the lower: nothing in it ever shows in a mount).
    fn work(&mut self) -> Result<&OwnedFd, SquashError> {
        if self.work.is_none() {
            let scratch = Scratch::new(&self.lower_path, SIBLING_TOOL)?;
            let (dir, name) = scratch.at();
            let fd = open_dir_at(dir, name).map_err(io_at(scratch.dir.display()))?;
            self.work = Some((scratch, fd));
        }
        Ok(&self.work.as_ref().expect("just made").1)
    }

    fn next_work_name(&mut self) -> CString {
        self.work_seq += 1;
        CString::new(format!("w{}", self.work_seq)).expect("no NUL")
    }

    // ---- 1. redirects ----

    fn pending(&self) -> Result<Vec<Pending>, SquashError> {
        let changes = self.up.changes()?;
        let mut out = Vec::new();
        let mut i = 0;
        while i < changes.len() {
            match &changes[i] {
                // Made local by an earlier run: its content is at its own path already.
                Change::Redirect { path, from } if path == from => {}
                Change::Redirect { path, from } => {
                    let mut group = vec![changes[i].clone()];
                    let mut sources = vec![from.clone()];
                    let mut j = i + 1;
                    while j < changes.len() && change_path(&changes[j]).starts_with(path) {
                        if let Change::Redirect { from, .. } = &changes[j] {
                            sources.push(from.clone());
                        }
                        if let Change::Entry(Entry {
                            kind: Kind::File { source, .. },
                            ..
                        }) = &changes[j]
                        {
                            if source.layer != Layer::Upper {
                                sources.push(source.path.clone());
                            }
                        }
                        group.push(changes[j].clone());
                        j += 1;
                    }
                    out.push(Pending {
                        target: path.clone(),
                        sources,
                        changes: group,
                    });
                    i = j;
                    continue;
                }
                Change::Entry(e) => {
                    if let Kind::File { source, .. } = &e.kind {
                        if source.layer != Layer::Upper && source.path != e.path {
                            out.push(Pending {
                                target: e.path.clone(),
                                sources: vec![source.path.clone()],
                                changes: vec![changes[i].clone()],
                            });
                        }
                    }
                }
                Change::Whiteout(_) => {}
            }
            i += 1;
        }
        Ok(out)
    }

    fn redirects(&mut self) -> Result<(), SquashError> {
        loop {
            let mut pending = self.pending()?;
            if pending.is_empty() {
                return Ok(());
            }
            let mut progressed = false;
            while !pending.is_empty() {
                let free = (0..pending.len()).find(|&i| {
                    !pending.iter().enumerate().any(|(j, o)| {
                        j != i && o.sources.iter().any(|s| overlaps(&pending[i].target, s))
                    })
                });
                let Some(i) = free else { break };
                let item = pending.remove(i);
                self.make_local(item)?;
                progressed = true;
            }
            if !progressed {
                let names: Vec<String> = pending
                    .iter()
                    .map(|p| format!("{} <- {}", p.target, p.sources[0]))
                    .collect();
                return Err(SquashError::RedirectCycle(names.join(", ")));
            }
            // A redirect nested in one just made local shows up in the next walk.
        }
    }

    /// Build a pending entry's full content in the work sibling, put it at its own path in the
    /// lower, then drop its redirect in the upper.
    fn make_local(&mut self, item: Pending) -> Result<(), SquashError> {
        let target = item.target.clone();
        let tmp = self.next_work_name();
        let work = self.work()?.try_clone().map_err(io_at("work directory"))?;
        let mut dirs: Vec<(LayerPath, Meta)> = Vec::new();
        for c in &item.changes {
            let Change::Entry(e) = c else { continue };
            let rel = relative(&e.path, &target);
            // The entry's place inside the work copy.
            let (dir, name) = work_place(&work, &tmp, &rel)?;
            let at = format!("{} (being built for {})", rel, self.lower_at(&e.path));
            match &e.kind {
                Kind::Dir { .. } => {
                    rustix::fs::mkdirat(&dir, name.as_c_str(), Mode::from_raw_mode(0o700))
                        .map_err(|er| io_at(&at)(er.into()))?;
                    dirs.push((rel, fsops::disk_meta(&e.meta, &e.kind)));
                }
                Kind::File { source, .. } => {
                    self.place_file(e, source, &dir, &name)
                        .map_err(io_at(&at))?;
                }
                Kind::Hardlink { target: t } => {
                    if t.starts_with(&target) {
                        let trel = relative(t, &target);
                        let (tp, tn) = trel.split_last().expect("a file, not the root");
                        let mut fd = open_dir_at(&work, &tmp).map_err(io_at(&at))?;
                        for comp in tp.components() {
                            fd = open_dir_at(&fd, &cstr(comp).map_err(io_at(&at))?)
                                .map_err(io_at(&at))?;
                        }
                        link_at(&fd, &cstr(tn).map_err(io_at(&at))?, &dir, &name)
                            .map_err(io_at(&at))?;
                    } else {
                        let l = self.upper.leaf(t, false).map_err(io_at(&at))?;
                        link_at(&l.dir, &l.name, &dir, &name).map_err(io_at(&at))?;
                    }
                }
                kind => {
                    fsops::make_special(&dir, &name, kind)
                        .and_then(|()| {
                            fsops::apply_meta(&dir, &name, &fsops::disk_meta(&e.meta, &e.kind))
                        })
                        .map_err(io_at(&at))?;
                }
            }
            crash::step();
        }
        for (rel, meta) in dirs.into_iter().rev() {
            let (dir, name) = work_place(&work, &tmp, &rel)?;
            fsops::apply_meta(&dir, &name, &meta).map_err(io_at(&rel))?;
        }
        crash::step();
        // Into place: the redirected upper entry does not look at its own lower path.
        let (ldir, lname) = self.lower_parent(&target)?;
        if remove_at(&ldir, &lname).map_err(io_at(self.lower_at(&target)))? {
            crash::step();
        }
        rustix::fs::renameat(&work, tmp.as_c_str(), &ldir, lname.as_c_str())
            .map_err(|e| io_at(self.lower_at(&target))(e.into()))?;
        crash::step();
        // The rename and the data copied through the work directory must be on disk before
        // the upper stops pointing at the old path: after a power loss the redirect would
        // otherwise be gone while the lower still has the old layout.
        rustix::fs::syncfs(&work).map_err(|e| io_at(self.lower_at(&target))(e.into()))?;
        // Every redirect in the group now names its own path, absolutely: an absolute redirect
        // is followed from the lower's root whatever its parents are (a parent may be opaque,
        // or itself renamed). Nested ones first: a relative one below would otherwise be
        // resolved against the new place of the group before it is its own.
        let mut renamed: Vec<&LayerPath> = item
            .changes
            .iter()
            .filter_map(|c| match c {
                Change::Entry(e) if e.path != target => Some(&e.path),
                _ => None,
            })
            .collect();
        renamed.reverse();
        renamed.push(&target);
        for p in renamed {
            self.redirect_to_itself(p)?;
        }
        self.sum.redirects += 1;
        Ok(())
    }

    /// The redirect of the upper entry at `p`, if it has one, set to `/p` (in the namespace
    /// it is in): its content is at its own path in the lower now.
    fn redirect_to_itself(&mut self, p: &LayerPath) -> Result<(), SquashError> {
        let at = self.up.display(p);
        // Most entries of a renamed directory are only in the lower.
        let u = match self.upper.leaf(p, false) {
            Ok(u) => u,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => {
                return Ok(());
            }
            Err(e) => return Err(io_at(&at)(e)),
        };
        if u.stat().map_err(io_at(&at))?.is_none() {
            return Ok(());
        }
        let path = proc_path(&u.dir, &u.name);
        let mut own = b"/".to_vec();
        own.extend_from_slice(p.as_bytes());
        let have = ovl_layer::list_xattrs(&proc_path(&u.dir, &u.name)).map_err(io_at(&at))?;
        for ns in XattrNs::ALL {
            let name = ns.name(ovl_layer::overlay_key::REDIRECT);
            match have.iter().find(|(n, _)| n.as_slice() == name.as_bytes()) {
                Some((_, v)) if *v != own => {
                    rustix::fs::lsetxattr(
                        &path,
                        name.as_str(),
                        &own,
                        rustix::fs::XattrFlags::REPLACE,
                    )
                    .map_err(|e| io_at(&at)(e.into()))?;
                    crash::step();
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// A file entry placed at `dir/name` (which is free): the upper inode itself, or a lower
    /// inode that already carries the entry's metadata, else a copy with it.
    fn place_file(
        &mut self,
        e: &Entry,
        source: &ovl_layer::Source,
        dir: &OwnedFd,
        name: &CStr,
    ) -> std::io::Result<()> {
        let meta = fsops::disk_meta(&e.meta, &e.kind);
        let leaf = match source.layer {
            Layer::Upper => {
                let l = self.upper.leaf(&source.path, false)?;
                ovl_layer::remove_private_xattrs(&l.dir, &l.name)?;
                l
            }
            Layer::Lower(_) => {
                let l = self.lower.leaf(&source.path, false)?;
                let st = l
                    .stat()?
                    .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOENT))?;
                let have = l.xattrs()?;
                // A metacopy file of the upper is an inode of its own in the merged view: it
                // shares the lower inode only when no other name could show that inode.
                let own_inode = st.st_nlink > 1
                    && match self.upper.leaf(&e.path, false) {
                        Ok(u) => u.stat()?.is_some(),
                        Err(er)
                            if matches!(er.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) =>
                        {
                            false
                        }
                        Err(er) => return Err(er),
                    };
                if own_inode || Meta::from_disk(&st, &have) != meta {
                    return copy_with_meta(self.sharing, (&l.dir, &l.name), (dir, name), &meta);
                }
                l
            }
        };
        // Under --uidmap an upper inode holds host ids: the lower gets a copy in container ids.
        if other_ids(leaf.stat()?.as_ref(), &meta) {
            return copy_with_meta(self.sharing, (&leaf.dir, &leaf.name), (dir, name), &meta);
        }
        match link_at(&leaf.dir, &leaf.name, dir, name) {
            Ok(()) => {
                self.sum.moved += 1;
                Ok(())
            }
            Err(er) if er.raw_os_error() == Some(libc::EXDEV) => {
                copy_with_meta(self.sharing, (&leaf.dir, &leaf.name), (dir, name), &meta)
            }
            Err(er) => Err(er),
        }
    }

    /// The lower directory that holds `p` (made, replacing non-directories, on the way: every
    /// such step is under an upper directory that covers it) and `p`'s name.
    fn lower_parent(&mut self, p: &LayerPath) -> Result<(OwnedFd, CString), SquashError> {
        let (parent, name) = p.split_last().expect("not the root");
        let mut cur = open_dir_at(&self.lower.fd(), c".").map_err(io_at(self.lower_at(p)))?;
        let mut prefix = LayerPath::root();
        for comp in parent.components() {
            prefix = prefix.join(comp);
            let at = self.lower_at(&prefix);
            let c = cstr(comp).map_err(io_at(&at))?;
            match stat_at(&cur, &c).map_err(io_at(&at))? {
                Some(st) if is_dir(&st) => {}
                other => {
                    if other.is_some() {
                        remove_at(&cur, &c).map_err(io_at(&at))?;
                        crash::step();
                    }
                    rustix::fs::mkdirat(&cur, c.as_c_str(), Mode::from_raw_mode(0o755))
                        .map_err(|e| io_at(&at)(e.into()))?;
                    crash::step();
                }
            }
            cur = open_dir_at(&cur, &c).map_err(io_at(&at))?;
        }
        Ok((cur, cstr(name).map_err(io_at(self.lower_at(p)))?))
    }

    // ---- 2. the changes ----

    fn apply(&mut self) -> Result<(), SquashError> {
        let changes = self.up.changes()?;
        let mut dirs: Vec<OpenDir> = Vec::new();
        // The directory a redirect made local by step 1 names: its content is in the lower.
        let mut own_redirect: Option<LayerPath> = None;
        for c in changes {
            let p = change_path(&c).clone();
            while let Some(top) = dirs.last() {
                if p.starts_with(&top.path) && p != top.path {
                    break;
                }
                let top = dirs.pop().expect("non-empty");
                self.close_dir(top)?;
            }
            if let (Some(parent), Some((_, name))) = (dirs.last_mut(), p.split_last()) {
                parent.seen.insert(name.to_vec());
            }
            match c {
                Change::Whiteout(p) => {
                    self.sum.whiteouts += 1;
                    // Nothing to remove when the lower has no such parent.
                    if let Ok(leaf) = self.lower.leaf(&p, false) {
                        if leaf.stat().map_err(io_at(self.lower_at(&p)))?.is_some() {
                            leaf.remove_all().map_err(io_at(self.lower_at(&p)))?;
                            crash::step();
                        }
                    }
                }
                Change::Redirect { path, from } if path == from => own_redirect = Some(path),
                Change::Redirect { path, .. } => {
                    return Err(SquashError::Unsupported {
                        path: self.up.display(&path),
                        why: "a redirect is left after they were all made local".into(),
                    });
                }
                Change::Entry(e) => {
                    self.sum.entries += 1;
                    let own = own_redirect.take().is_some_and(|r| r == e.path);
                    let parent_clean = dirs.last().is_some_and(|d| d.clean);
                    self.entry(e, own, parent_clean, &mut dirs)?;
                }
            }
        }
        while let Some(top) = dirs.pop() {
            self.close_dir(top)?;
        }
        Ok(())
    }

    /// After a directory's children: a directory that shows nothing from below loses the
    /// lower entries its upper does not have (hidden until now, so any order is safe), then
    /// its metadata is set.
    fn close_dir(&mut self, d: OpenDir) -> Result<(), SquashError> {
        if d.clean {
            let at = self.lower_at(&d.path);
            let fd = if d.path.is_root() {
                open_dir_at(&self.lower.fd(), c".").map_err(io_at(&at))?
            } else {
                self.lower
                    .leaf(&d.path, false)
                    .and_then(|l| open_dir_at(&l.dir, &l.name))
                    .map_err(io_at(&at))?
            };
            for n in names(&fd).map_err(io_at(&at))? {
                if !d.seen.contains(n.to_bytes()) {
                    remove_at(&fd, &n).map_err(io_at(self.lower_at(&d.path.join(n.to_bytes()))))?;
                    crash::step();
                }
            }
        }
        self.dir_meta(&d.path, &d.meta)
    }

    fn dir_meta(&mut self, p: &LayerPath, meta: &Meta) -> Result<(), SquashError> {
        let at = self.lower_at(p);
        if p.is_root() {
            let fd = open_dir_at(&self.lower.fd(), c".").map_err(io_at(&at))?;
            fsops::apply_meta_fd(&fd, meta).map_err(io_at(&at))?;
        } else {
            let leaf = self.lower.leaf(p, false).map_err(io_at(&at))?;
            fsops::apply_meta(&leaf.dir, &leaf.name, meta).map_err(io_at(&at))?;
        }
        crash::step();
        Ok(())
    }

    /// One entry of the upper applied to the lower. `own`: a directory whose redirect names
    /// its own path (its lower content is in place); `parent_clean`: its parent shows nothing
    /// from below.
    fn entry(
        &mut self,
        e: Entry,
        own: bool,
        parent_clean: bool,
        dirs: &mut Vec<OpenDir>,
    ) -> Result<(), SquashError> {
        let meta = fsops::disk_meta(&e.meta, &e.kind);
        if e.path.is_root() {
            // The kernel never takes a root as opaque.
            dirs.push(OpenDir::new(e.path, meta, false));
            return Ok(());
        }
        let at = self.lower_at(&e.path);
        let (ldir, lname) = self.lower_parent(&e.path)?;
        let existing = stat_at(&ldir, &lname).map_err(io_at(&at))?;
        match &e.kind {
            Kind::Dir { opaque } => {
                if *opaque && !own {
                    self.sum.opaque_dirs += 1;
                }
                // An existing lower directory is kept even under an opaque upper one: what the
                // upper does not have goes when the directory is closed, after its children
                // (one of them may be content made local there by step 1).
                if !existing.as_ref().is_some_and(is_dir) {
                    if existing.is_some() {
                        remove_at(&ldir, &lname).map_err(io_at(&at))?;
                        crash::step();
                    }
                    rustix::fs::mkdirat(&ldir, lname.as_c_str(), Mode::from_raw_mode(0o700))
                        .map_err(|er| io_at(&at)(er.into()))?;
                    crash::step();
                }
                // Nothing from below shows in an opaque directory, nor in any directory under
                // one unless redirected (made local: its own path).
                let clean = !own && (*opaque || parent_clean);
                dirs.push(OpenDir::new(e.path.clone(), meta, clean));
            }
            Kind::File { source, .. } if source.layer != Layer::Upper => {
                if source.path != e.path {
                    return Err(SquashError::Unsupported {
                        path: self.up.display(&e.path),
                        why: "a metacopy redirect is left after they were all made local".into(),
                    });
                }
                // Metacopy (or an entry of a directory made local): the data is the lower
                // file's; the metadata becomes the upper's.
                let st = existing.ok_or_else(|| SquashError::Unsupported {
                    path: at.clone(),
                    why: "the data of a metacopy file is missing in the lower".into(),
                })?;
                let have = ovl_layer::list_xattrs(&proc_path(&ldir, &lname)).map_err(io_at(&at))?;
                if Meta::from_disk(&st, &have) == meta {
                    return Ok(());
                }
                if st.st_nlink <= 1 {
                    fsops::apply_meta(&ldir, &lname, &meta).map_err(io_at(&at))?;
                } else {
                    // Other names share the inode: give this name its own copy.
                    let work = self.work()?.try_clone().map_err(io_at("work directory"))?;
                    let tmp = self.next_work_name();
                    copy_with_meta(self.sharing, (&ldir, &lname), (&work, &tmp), &meta)
                        .map_err(io_at(&at))?;
                    rustix::fs::renameat(&work, tmp.as_c_str(), &ldir, lname.as_c_str())
                        .map_err(|er| io_at(&at)(er.into()))?;
                }
                crash::step();
            }
            Kind::Hardlink { target } => {
                let t = self.lower.leaf(target, false).map_err(io_at(&at))?;
                let tst = t.stat().map_err(io_at(&at))?;
                let same = matches!((&existing, &tst), (Some(a), Some(b)) if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino));
                if !same {
                    if existing.is_some() {
                        remove_at(&ldir, &lname).map_err(io_at(&at))?;
                        crash::step();
                    }
                    link_at(&t.dir, &t.name, &ldir, &lname).map_err(io_at(&at))?;
                    crash::step();
                }
            }
            _ => {
                // A file, symlink, device, fifo or socket of the upper: its inode moves down.
                // One that only the lower has is content of a directory made local by step 1,
                // in place already.
                let u = match self.upper.leaf(&e.path, false) {
                    Ok(u) => Some(u),
                    Err(er) if matches!(er.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => {
                        None
                    }
                    Err(er) => return Err(io_at(self.up.display(&e.path))(er)),
                };
                let u = match u {
                    Some(u) if u.stat().map_err(io_at(self.up.display(&e.path)))?.is_some() => u,
                    _ if existing.is_some() => return Ok(()),
                    _ => {
                        return Err(SquashError::Unsupported {
                            path: at,
                            why: "an entry of a directory made local is in neither layer".into(),
                        });
                    }
                };
                if ovl_layer::remove_private_xattrs(&u.dir, &u.name)
                    .map_err(io_at(self.up.display(&e.path)))?
                {
                    crash::step();
                }
                let ust = u.stat().map_err(io_at(self.up.display(&e.path)))?;
                let same = matches!((&existing, &ust), (Some(a), Some(b)) if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino));
                if same {
                    return Ok(());
                }
                if existing.is_some() {
                    remove_at(&ldir, &lname).map_err(io_at(&at))?;
                    crash::step();
                }
                // Under --uidmap the upper inode holds host ids and the lower takes container
                // ids: a copy, so the upper stays as it was written (a re-run after a crash
                // reads it again, through the map).
                let linked = if other_ids(ust.as_ref(), &meta) {
                    Err(std::io::Error::from_raw_os_error(libc::EXDEV))
                } else {
                    link_at(&u.dir, &u.name, &ldir, &lname)
                };
                match linked {
                    Ok(()) => self.sum.moved += 1,
                    Err(er) if er.raw_os_error() == Some(libc::EXDEV) => {
                        // Another filesystem, or other ids: a copy, made aside and renamed in
                        // whole.
                        let work = self.work()?.try_clone().map_err(io_at("work directory"))?;
                        let tmp = self.next_work_name();
                        let st = ust.expect("the upper entry is there");
                        if FileType::from_raw_mode(st.st_mode) == FileType::RegularFile {
                            let from = open_file_at(&u.dir, &u.name).map_err(io_at(&at))?;
                            let to = create_file_at(&work, &tmp).map_err(io_at(&at))?;
                            self.sharing.fill(&from, &to).map_err(io_at(&at))?;
                        } else {
                            let kind = special_kind(&u.dir, &u.name, &st).map_err(io_at(&at))?;
                            fsops::make_special(&work, &tmp, &kind).map_err(io_at(&at))?;
                        }
                        fsops::apply_meta(&work, &tmp, &meta).map_err(io_at(&at))?;
                        rustix::fs::renameat(&work, tmp.as_c_str(), &ldir, lname.as_c_str())
                            .map_err(|er| io_at(&at)(er.into()))?;
                    }
                    Err(er) => return Err(io_at(&at)(er)),
                }
                crash::step();
            }
        }
        Ok(())
    }

    // ---- 4. the upper ----

    fn empty_upper(&mut self, upper: &Path) -> Result<(), SquashError> {
        let at = upper.display().to_string();
        let ufd = open_path_dir(upper)?;
        let st = rustix::fs::fstat(&ufd).map_err(|e| io_at(&at)(e.into()))?;
        let xattrs = ovl_layer::list_xattrs_fd(&ufd).map_err(io_at(&at))?;
        let meta = Meta::from_disk(&st, &xattrs);
        let name = cstr(upper.file_name().unwrap_or_default().as_bytes()).map_err(io_at(&at))?;
        if upper_is_empty(&ufd).map_err(io_at(&at))? {
            return Ok(());
        }
        let parent = open_path_dir(
            upper
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new(".")),
        )?;
        // The swap sibling beside the upper: its directory gets the upper root's metadata.
        let swap = Scratch::new(upper, SIBLING_TOOL)?;
        let (sdir, sname) = swap.at();
        fsops::apply_meta(sdir, sname, &meta).map_err(io_at(&at))?;
        crash::step();
        match rustix::fs::renameat_with(
            sdir,
            sname,
            &parent,
            name.as_c_str(),
            RenameFlags::EXCHANGE,
        ) {
            Ok(()) => {
                crash::step();
                let _ = rustix::fs::fsync(&parent);
                // The old upper, now garbage.
                remove_at(sdir, sname).map_err(io_at(swap.dir.display()))?;
                crash::step();
                Ok(())
            }
            Err(rustix::io::Errno::INVAL | rustix::io::Errno::XDEV | rustix::io::Errno::BUSY) => {
                drop(swap);
                // No exchange here: entry by entry, the root's times put back after each.
                let times = times_of(&st);
                for n in names(&ufd).map_err(io_at(&at))? {
                    remove_upper_entry(&ufd, &n).map_err(io_at(&at))?;
                    rustix::fs::futimens(&ufd, &times).map_err(|e| io_at(&at)(e.into()))?;
                    crash::step();
                }
                Ok(())
            }
            Err(e) => Err(io_at(&at)(e.into())),
        }
    }
}

/// A directory of the upper being applied, until its children are done.
struct OpenDir {
    path: LayerPath,
    meta: Meta,
    /// Nothing from below shows in it: the lower keeps only what the upper has.
    clean: bool,
    /// The names of its children in the upper.
    seen: std::collections::BTreeSet<Vec<u8>>,
}

impl OpenDir {
    fn new(path: LayerPath, meta: Meta, clean: bool) -> OpenDir {
        OpenDir {
            path,
            meta,
            clean,
            seen: Default::default(),
        }
    }
}

/// Where the work copy `tmp` (in `work`) holds the entry at `rel` relative to its root: the
/// directory to open and the name in it.
fn work_place(
    work: &OwnedFd,
    tmp: &CString,
    rel: &LayerPath,
) -> Result<(OwnedFd, CString), SquashError> {
    if rel.is_root() {
        return Ok((
            work.try_clone().map_err(io_at("work directory"))?,
            tmp.clone(),
        ));
    }
    let (parent, n) = rel.split_last().expect("not the root");
    let mut fd = open_dir_at(work, tmp).map_err(io_at("work directory"))?;
    for comp in parent.components() {
        fd = open_dir_at(&fd, &cstr(comp).map_err(io_at(rel))?).map_err(io_at(rel))?;
    }
    Ok((fd, cstr(n).map_err(io_at(rel))?))
}

/// A copy of the file `from` made at `to` (which is free), given `meta`.
fn copy_with_meta(
    sharing: &Sharing,
    from: (&OwnedFd, &CStr),
    to: (&OwnedFd, &CStr),
    meta: &Meta,
) -> std::io::Result<()> {
    let src = open_file_at(from.0, from.1)?;
    let dst = create_file_at(to.0, to.1)?;
    sharing.fill(&src, &dst)?;
    drop(dst);
    fsops::apply_meta(to.0, to.1, meta)
}

/// The access and modification times of `st`, for futimens.
/// Whether an inode on disk (`st`) has other owners than its entry is given (`meta`): an
/// upper inode under `--uidmap` (host ids), which must not be moved into a lower kept in
/// container ids.
fn other_ids(st: Option<&rustix::fs::Stat>, meta: &Meta) -> bool {
    st.is_some_and(|st| (st.st_uid, st.st_gid) != (meta.uid, meta.gid))
}

fn times_of(st: &rustix::fs::Stat) -> rustix::fs::Timestamps {
    rustix::fs::Timestamps {
        last_access: rustix::fs::Timespec {
            tv_sec: st.st_atime,
            tv_nsec: st.st_atime_nsec as _,
        },
        last_modification: rustix::fs::Timespec {
            tv_sec: st.st_mtime,
            tv_nsec: st.st_mtime_nsec as _,
        },
    }
}

/// Remove NAME from the upper directory DIR without the merged view changing at any instant
/// (the lower already is that view): a directory first stops being opaque (its opaque xattrs
/// and fuse-overlayfs marker entries go before any other entry, so it never hides the lower
/// entries its removed children covered), then loses its entries one by one, each followed by
/// its own times put back (they are the merged directory's), then goes itself.
fn remove_upper_entry(dir: &OwnedFd, name: &CStr) -> std::io::Result<()> {
    let Some(st) = stat_at(dir, name)? else {
        return Ok(());
    };
    if !is_dir(&st) {
        return rustix::fs::unlinkat(dir, name, rustix::fs::AtFlags::empty()).map_err(Into::into);
    }
    let fd = open_dir_at(dir, name)?;
    for (n, v) in ovl_layer::list_xattrs_fd(&fd)? {
        if ovl_layer::makes_opaque(&n, &v) {
            match rustix::fs::fremovexattr(&fd, n.as_slice()) {
                Ok(()) | Err(rustix::io::Errno::NODATA) => {}
                Err(e) => return Err(e.into()),
            }
            crash::step();
        }
    }
    let times = times_of(&st);
    let mut children = names(&fd)?;
    children.sort_by_key(|n| {
        let n = n.to_bytes();
        n != ovl_layer::OPAQUE_MARKER && n != ovl_layer::FUSE_OPAQUE_DEVICE
    });
    for n in children {
        remove_upper_entry(&fd, &n)?;
        rustix::fs::futimens(&fd, &times)?;
        crash::step();
    }
    rustix::fs::unlinkat(dir, name, rustix::fs::AtFlags::REMOVEDIR).map_err(Into::into)
}

fn change_path(c: &Change) -> &LayerPath {
    match c {
        Change::Whiteout(p) => p,
        Change::Redirect { path, .. } => path,
        Change::Entry(e) => &e.path,
    }
}

fn names(fd: &OwnedFd) -> std::io::Result<Vec<CString>> {
    let mut out = Vec::new();
    for ent in rustix::fs::Dir::read_from(fd)? {
        let ent = ent?;
        let n = ent.file_name();
        if n.to_bytes() != b"." && n.to_bytes() != b".." {
            out.push(n.to_owned());
        }
    }
    Ok(out)
}

fn upper_is_empty(fd: &OwnedFd) -> std::io::Result<bool> {
    Ok(names(fd)?.is_empty())
}
