//! Giving one entry its metadata: owner, xattrs, mode, times, in that order.
//!
//! Owns how every tool applies metadata (the extractor to each entry of a layer, ovl-squash to
//! what it writes): by an open fd, or by a name in a directory fd without following the name.
//! The order is the rule: owner first (chown clears setuid and setgid bits and file
//! capabilities), then xattrs (a `security.capability` set before the chown would be lost),
//! then mode (puts back the bits the chown cleared), then times last (after the data and
//! everything else).
//!
//! Also owns which owner an entry gets: its own, shifted to host ids by a `--uidmap`/`--gidmap`
//! ([`Owner::Shift`]), or recorded in xattrs where it cannot be real ([`Owner::Record`]; the
//! records themselves are [`crate::owners`]'). Which xattrs are overlay markers rather than
//! content is [`crate::whiteout`]'s; the `*at` calls are [`crate::fsops`]'s and
//! [`crate::xattrs`]'s.

use std::ffi::CStr;
use std::fmt;
use std::io;
use std::os::fd::BorrowedFd;

use rustix::fs::{AtFlags, FileType, Mode, Stat, Timespec, Timestamps};

use crate::idmap::RootlessMaps;
use crate::path::display_bytes;
use crate::xattrs::Xattr;
use crate::{fsops, owners, whiteout, xattrs};

/// The metadata an entry is given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub uid: u32,
    pub gid: u32,
    /// Permission bits with setuid, setgid and sticky (`& 0o7777`).
    pub mode: u32,
    pub mtime: Timespec,
    pub atime: Timespec,
    /// Named as stored on disk (an `overlay.*` xattr from outside escaped, see
    /// [`whiteout::escape_xattr`]), sorted by name.
    pub xattrs: Vec<Xattr>,
}

impl Meta {
    /// An entry as it is on disk (its lstat and its xattrs as listed): the overlay's own xattrs
    /// are markers, not content, and are left out; a layer keeps no atime, so it is the mtime.
    pub fn from_disk(st: &Stat, xattrs: &[Xattr]) -> Meta {
        let mtime = Timespec {
            tv_sec: st.st_mtime,
            tv_nsec: st.st_mtime_nsec as _,
        };
        Meta {
            uid: st.st_uid,
            gid: st.st_gid,
            mode: st.st_mode & 0o7777,
            mtime,
            atime: mtime,
            xattrs: whiteout::public_xattrs(xattrs),
        }
    }

    fn timestamps(&self) -> Timestamps {
        Timestamps {
            last_access: self.atime,
            last_modification: self.mtime,
        }
    }
}

/// The entry metadata is applied to.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    /// An open file or directory (not `O_PATH`: fchmod and fsetxattr refuse those).
    Fd(BorrowedFd<'a>),
    /// NAME in the directory DIR, never followed: symlinks, devices, fifos, anything not open.
    At(BorrowedFd<'a>, &'a CStr),
}

impl Target<'_> {
    fn stat(self) -> io::Result<Stat> {
        match self {
            Target::Fd(fd) => rustix::fs::fstat(fd),
            Target::At(dir, name) => rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW),
        }
        .map_err(Into::into)
    }

    fn chown(self, uid: u32, gid: u32) -> io::Result<()> {
        match self {
            Target::Fd(fd) => rustix::fs::fchown(
                fd,
                Some(rustix::fs::Uid::from_raw(uid)),
                Some(rustix::fs::Gid::from_raw(gid)),
            )
            .map_err(Into::into),
            Target::At(dir, name) => fsops::chown_at(&dir, name, uid, gid),
        }
    }

    fn xattrs(self) -> io::Result<Vec<Xattr>> {
        match self {
            Target::Fd(fd) => xattrs::list_fd(fd),
            Target::At(dir, name) => xattrs::list_at(&dir, name),
        }
    }

    fn set_xattr(self, key: &[u8], value: &[u8]) -> io::Result<()> {
        match self {
            Target::Fd(fd) => xattrs::set_fd(fd, key, value),
            Target::At(dir, name) => xattrs::set_at(&dir, name, key, value),
        }
    }

    fn remove_xattr(self, key: &[u8]) -> io::Result<()> {
        match self {
            Target::Fd(fd) => xattrs::remove_fd(fd, key),
            Target::At(dir, name) => xattrs::remove_at(&dir, name, key),
        }
    }

    fn chmod(self, mode: u32) -> io::Result<()> {
        match self {
            Target::Fd(fd) => rustix::fs::fchmod(fd, Mode::from_raw_mode(mode)).map_err(Into::into),
            Target::At(dir, name) => fsops::chmod_at(&dir, name, mode),
        }
    }

    fn set_times(self, times: &Timestamps) -> io::Result<()> {
        match self {
            Target::Fd(fd) => rustix::fs::futimens(fd, times).map_err(Into::into),
            Target::At(dir, name) => fsops::set_times_at(&dir, name, times),
        }
    }
}

/// What becomes of the owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner<'a> {
    /// Left as it is.
    Leave,
    /// chown to the entry's ids, unless it has them already.
    Chown,
    /// chown to the host ids these maps give the entry's ids (`ovl-import --uidmap`), unless it
    /// has them already; an id outside the map is [`Step::Unmapped`].
    Shift(&'a RootlessMaps),
    /// Left as it is, and the entry's owner recorded in xattrs (before its other xattrs), as
    /// [`owners::records`] says: where there are no subordinate ids to chown to. The mode is
    /// recorded too on an open file or directory ([`Target::Fd`]), the only kinds
    /// fuse-overlayfs presents a record for.
    Record,
}

/// What becomes of the xattrs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Xattrs {
    /// Left as they are.
    Leave,
    /// Each of the entry's written; others left (a new entry has none).
    Add,
    /// Exactly the entry's: content xattrs it does not list are removed (the overlay's own are
    /// left alone, see [`whiteout::public_xattrs`]), and only those that differ are written.
    Exact,
}

/// What becomes of the mode. Never set on a symlink (Linux has no lchmod): a symlink met by
/// name is left as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Perms {
    /// Left as it is.
    Leave,
    /// chmod to the entry's mode.
    Set,
    /// The entry was created with its permission bits (`mode & 0o777`, no umask): chmod only
    /// when it has setuid, setgid or sticky bits, or a chown cleared bits.
    Created,
}

/// How [`apply`] goes about it.
#[derive(Debug, Clone, Copy)]
pub struct How<'a> {
    pub owner: Owner<'a>,
    /// The owner the entry has now, when the caller knows it (what it just made has the
    /// creator's ids), so it is not read again.
    pub owner_now: Option<(u32, u32)>,
    pub xattrs: Xattrs,
    /// Count an xattr that the filesystem or our privileges refuse (`trusted.*` rootless,
    /// `user.*` on a symlink) and go on, instead of failing.
    pub skip_refused_xattrs: bool,
    pub perms: Perms,
    /// Set atime and mtime.
    pub times: bool,
}

impl How<'_> {
    /// Everything, exactly: the owner, exactly these xattrs, the mode, the times (what a copy
    /// of an entry that already exists on disk gets).
    pub const EXACT: How<'static> = How {
        owner: Owner::Chown,
        owner_now: None,
        xattrs: Xattrs::Exact,
        skip_refused_xattrs: false,
        perms: Perms::Set,
        times: true,
    };
}

/// What [`apply`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    pub chowned: bool,
    /// xattrs refused and skipped (see [`How::skip_refused_xattrs`]).
    pub skipped_xattrs: u64,
}

/// The step of [`apply`] that failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Stat,
    Owner {
        uid: u32,
        gid: u32,
    },
    /// The entry's `which` ("uid" or "gid") `id` is outside the map of [`Owner::Shift`].
    Unmapped {
        which: &'static str,
        id: u32,
    },
    ListXattrs,
    /// Setting the xattr of this name (bytes, escaped when shown).
    SetXattr(Vec<u8>),
    RemoveXattr(Vec<u8>),
    Mode,
    Times,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Stat => write!(f, "stat"),
            Step::Owner { uid, gid } => write!(f, "chown {uid}:{gid}"),
            Step::Unmapped { which, id } => write!(f, "{which} {id} outside the --{which}map"),
            Step::ListXattrs => write!(f, "list xattrs"),
            Step::SetXattr(n) => write!(f, "set xattr {}", display_bytes(n)),
            Step::RemoveXattr(n) => write!(f, "remove xattr {}", display_bytes(n)),
            Step::Mode => write!(f, "chmod"),
            Step::Times => write!(f, "set times"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{step}")]
pub struct ApplyError {
    pub step: Step,
    #[source]
    pub source: io::Error,
}

impl From<ApplyError> for io::Error {
    /// One message naming the step, of the same kind as the error that stopped it.
    fn from(e: ApplyError) -> io::Error {
        io::Error::new(e.source.kind(), format!("{}: {}", e.step, e.source))
    }
}

/// True for an xattr error that says "not here, not by you" rather than that something broke.
fn is_refusal(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EPERM | libc::ENOTSUP | libc::EACCES | libc::EINVAL)
    )
}

/// Give `target` the metadata `meta`, as `how` says, in the order owner, xattrs, mode, times.
pub fn apply(target: Target<'_>, meta: &Meta, how: &How<'_>) -> Result<Applied, ApplyError> {
    let at = |step: Step| move |source: io::Error| ApplyError { step, source };
    let mut done = Applied::default();
    // Read at most once, and only when something needs it.
    let mut st = None;
    let stat = |st: &mut Option<Stat>| -> Result<Stat, ApplyError> {
        if st.is_none() {
            *st = Some(target.stat().map_err(at(Step::Stat))?);
        }
        Ok(st.expect("just read"))
    };

    let owner = match how.owner {
        Owner::Chown => Some((meta.uid, meta.gid)),
        Owner::Shift(maps) => {
            let unmapped = |which, id| ApplyError {
                step: Step::Unmapped { which, id },
                source: io::Error::from_raw_os_error(libc::EOVERFLOW),
            };
            Some((
                maps.uid
                    .to_host(meta.uid)
                    .ok_or_else(|| unmapped("uid", meta.uid))?,
                maps.gid
                    .to_host(meta.gid)
                    .ok_or_else(|| unmapped("gid", meta.gid))?,
            ))
        }
        Owner::Leave | Owner::Record => None,
    };
    if let Some((uid, gid)) = owner {
        let now = match how.owner_now {
            Some(ids) => ids,
            None => {
                let s = stat(&mut st)?;
                (s.st_uid, s.st_gid)
            }
        };
        if now != (uid, gid) {
            target
                .chown(uid, gid)
                .map_err(at(Step::Owner { uid, gid }))?;
            done.chowned = true;
        }
    }

    let records = match how.owner {
        Owner::Record => owners::records(
            meta.uid,
            meta.gid,
            meta.mode,
            matches!(target, Target::Fd(_)),
        ),
        _ => Vec::new(),
    };
    let wanted = records
        .iter()
        .chain(meta.xattrs.iter())
        .map(|(n, v)| (n.as_slice(), v.as_slice()));
    let mut set = |name: &[u8], value: &[u8]| match target.set_xattr(name, value) {
        Ok(()) => Ok(()),
        Err(e) if how.skip_refused_xattrs && is_refusal(&e) => {
            done.skipped_xattrs += 1;
            Ok(())
        }
        Err(e) => Err(at(Step::SetXattr(name.to_vec()))(e)),
    };
    match how.xattrs {
        Xattrs::Leave => {}
        Xattrs::Add => {
            for (n, v) in wanted {
                set(n, v)?;
            }
        }
        Xattrs::Exact => {
            let have = target.xattrs().map_err(at(Step::ListXattrs))?;
            for (n, _) in whiteout::public_xattrs(&have) {
                if !meta.xattrs.iter().any(|(m, _)| *m == n) {
                    target
                        .remove_xattr(&n)
                        .map_err(at(Step::RemoveXattr(n.clone())))?;
                }
            }
            for (n, v) in wanted {
                if !have.iter().any(|(h, hv)| h.as_slice() == n && hv == v) {
                    set(n, v)?;
                }
            }
        }
    }

    let chmod = match how.perms {
        Perms::Leave => false,
        Perms::Set => match target {
            Target::Fd(_) => true,
            Target::At(..) => FileType::from_raw_mode(stat(&mut st)?.st_mode) != FileType::Symlink,
        },
        Perms::Created => done.chowned || meta.mode & 0o7000 != 0,
    };
    if chmod {
        target.chmod(meta.mode).map_err(at(Step::Mode))?;
    }

    if how.times {
        target
            .set_times(&meta.timestamps())
            .map_err(at(Step::Times))?;
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn meta(mode: u32) -> Meta {
        let t = Timespec {
            tv_sec: 1_600_000_000,
            tv_nsec: 123_456_789,
        };
        Meta {
            uid: rustix::process::geteuid().as_raw(),
            gid: rustix::process::getegid().as_raw(),
            mode,
            mtime: t,
            atime: Timespec {
                tv_sec: 1_500_000_000,
                tv_nsec: 1,
            },
            xattrs: vec![("user.a".into(), b"1".to_vec())],
        }
    }

    /// A step names its xattr with its bytes escaped: a name need not be UTF-8 (or printable).
    #[test]
    fn steps_escape_xattr_names() {
        assert_eq!(
            Step::SetXattr(b"user.\xff\x1b[2J".to_vec()).to_string(),
            "set xattr user.\\xff\\x1b[2J"
        );
        assert_eq!(
            Step::RemoveXattr(b"user.ok".to_vec()).to_string(),
            "remove xattr user.ok"
        );
    }

    /// By name: a symlink keeps its target's mode untouched and gets its own times; a file
    /// gets everything, and `Exact` removes a content xattr it does not list but keeps the
    /// overlay's own.
    #[test]
    fn by_name_never_follows_and_exact_keeps_overlay_xattrs() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::symlink("f", t.path().join("l")).unwrap();
        let dir = rustix::fs::open(
            t.path(),
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY,
            Mode::empty(),
        )
        .unwrap();
        let how = How {
            xattrs: Xattrs::Leave,
            ..How::EXACT
        };
        apply(Target::At(dir.as_fd(), c"l"), &meta(0o777), &how).unwrap();
        assert_eq!(
            std::fs::metadata(&f).unwrap().permissions().mode() & 0o7777,
            0o600
        );
        let l = std::fs::symlink_metadata(t.path().join("l")).unwrap();
        assert_eq!((l.mtime(), l.mtime_nsec()), (1_600_000_000, 123_456_789));

        let user_xattrs = xattr::set(&f, "user.stale", b"s").is_ok()
            && xattr::set(&f, "user.overlay.origin", b"o").is_ok();
        let mut m = meta(0o4751);
        if !user_xattrs {
            m.xattrs.clear();
        }
        let done = apply(Target::At(dir.as_fd(), c"f"), &m, &How::EXACT).unwrap();
        assert!(!done.chowned);
        let md = std::fs::metadata(&f).unwrap();
        assert_eq!(md.permissions().mode() & 0o7777, 0o4751);
        assert_eq!((md.mtime(), md.mtime_nsec()), (1_600_000_000, 123_456_789));
        assert_eq!((md.atime(), md.atime_nsec()), (1_500_000_000, 1));
        if user_xattrs {
            assert_eq!(xattr::get(&f, "user.stale").unwrap(), None);
            assert_eq!(xattr::get(&f, "user.a").unwrap(), Some(b"1".to_vec()));
            assert_eq!(
                xattr::get(&f, "user.overlay.origin").unwrap(),
                Some(b"o".to_vec())
            );
        } else {
            eprintln!("(this filesystem has no user xattrs: their part was not checked)");
        }
    }

    /// `Created` chmods only for the bits a create cannot give; the owner is recorded, not
    /// chowned, under `Record`.
    #[test]
    fn created_mode_and_recorded_owner() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).unwrap();
        let file = std::fs::File::open(&f).unwrap();
        let how = How {
            owner: Owner::Record,
            owner_now: None,
            xattrs: Xattrs::Add,
            skip_refused_xattrs: true,
            perms: Perms::Created,
            times: false,
        };
        let mut m = meta(0o755);
        m.uid = 1000;
        m.gid = 300;
        apply(Target::Fd(file.as_fd()), &m, &how).unwrap();
        let mode = || std::fs::metadata(&f).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(), 0o640, "no setuid bits, no chown: left as created");
        m.mode = 0o2755;
        let done = apply(Target::Fd(file.as_fd()), &m, &how).unwrap();
        assert_eq!(mode(), 0o2755);
        assert!(!done.chowned);
        if done.skipped_xattrs == 0 {
            assert_eq!(
                xattr::get(&f, owners::ROOTLESS_XATTR).unwrap(),
                Some(owners::encode_rootless(1000, 300))
            );
            assert_eq!(
                xattr::get(&f, owners::FUSE_OVERRIDE_XATTR).unwrap(),
                Some(b"1000:300:2755".to_vec())
            );
        }
    }
}
