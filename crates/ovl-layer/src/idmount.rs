//! Id shifting without copying: idmapped mounts (`--uidmap`/`--gidmap` as real root).
//!
//! Owns the three kernel steps every shifted mount takes, the way containerd 2.x does them:
//! a user namespace that holds the map, kept by an fd ([`UsernsFd::new`]); an idmapped clone
//! of a directory ([`idmapped_clone`]: `open_tree(OPEN_TREE_CLONE)` then `mount_setattr` with
//! `MOUNT_ATTR_IDMAP`), through which a file owned by container id N on disk reads as the host
//! id the map gives N; and a process joining that namespace as its root ([`join_raw`]).
//! Making an idmapped mount of ext4/xfs/btrfs takes real root; overlayfs takes idmapped
//! layers since Linux 5.19. The layer on disk is never changed.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use rustix::fs::CWD;
use rustix::mount::{MoveMountFlags, OpenTreeFlags, move_mount, open_tree};

use crate::idmap::RootlessMaps;

/// Why an idmapped mount could not be made: what was refused, and the kernel's errno.
#[derive(Debug, thiserror::Error)]
pub enum IdmapMountError {
    #[error("making a user namespace for the id map failed: {0}")]
    Userns(io::Error),
    /// `why` says what `err` means here (it is not printed again).
    #[error("{path}: {step}: {why}")]
    Refused {
        path: PathBuf,
        step: &'static str,
        why: String,
        err: io::Error,
    },
}

impl IdmapMountError {
    /// The errno of a refusal (for tests and callers that branch on it).
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            Self::Userns(e) | Self::Refused { err: e, .. } => e.raw_os_error(),
        }
    }
}

/// A user namespace that holds an id map, kept alive by its fd (the process that made it is
/// gone by the time [`UsernsFd::new`] returns).
#[derive(Debug)]
pub struct UsernsFd(OwnedFd);

impl AsFd for UsernsFd {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl UsernsFd {
    /// A new user namespace with `maps` (container -> host ranges). Needs real root: only a
    /// writer with CAP_SETUID/CAP_SETGID over the parent namespace may map arbitrary ids.
    pub fn new(maps: &RootlessMaps) -> io::Result<Self> {
        let (ready_r, ready_w) = pipe()?;
        let (done_r, done_w) = pipe()?;
        // SAFETY: the child only makes raw syscalls (unshare, write, read, _exit) on fds that
        // exist before the fork: nothing that allocates or takes a lock another thread holds.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            // SAFETY: see above; the child never returns into Rust code.
            unsafe {
                // Our copies of the parent's ends: with them open, the read below never ends.
                libc::close(done_w.as_raw_fd());
                libc::close(ready_r.as_raw_fd());
                let ok: u8 = if libc::unshare(libc::CLONE_NEWUSER) == 0 {
                    b'1'
                } else {
                    b'0'
                };
                libc::write(ready_w.as_raw_fd(), (&raw const ok).cast(), 1);
                let mut b = 0u8;
                // Wait until the parent has opened our namespace (EOF when it closes its end).
                while libc::read(done_r.as_raw_fd(), (&raw mut b).cast(), 1) > 0 {}
                libc::_exit(0);
            }
        }
        drop(ready_w);
        drop(done_r);
        let res = (|| {
            let mut b = [0u8; 1];
            let n = rustix::io::read(&ready_r, &mut b)?;
            if n != 1 || b[0] != b'1' {
                return Err(io::Error::other(
                    "unshare(CLONE_NEWUSER) failed in the helper process",
                ));
            }
            let proc = format!("/proc/{pid}");
            std::fs::write(format!("{proc}/uid_map"), maps.uid.to_proc_text())
                .map_err(|e| io::Error::new(e.kind(), format!("{proc}/uid_map: {e}")))?;
            std::fs::write(format!("{proc}/gid_map"), maps.gid.to_proc_text())
                .map_err(|e| io::Error::new(e.kind(), format!("{proc}/gid_map: {e}")))?;
            let ns = std::fs::File::open(format!("{proc}/ns/user"))?;
            Ok(UsernsFd(ns.into()))
        })();
        drop(done_w);
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        res
    }
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).map_err(Into::into)
}

/// `struct mount_attr` of mount_setattr(2).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;

/// What an errno from open_tree/mount_setattr means for an idmapped mount.
fn why(step: &str, e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ENOSYS) => {
            format!("this kernel has no {step} (idmapped mounts need Linux >= 5.12)")
        }
        Some(libc::EINVAL) => "the filesystem does not support idmapped mounts, or the directory \
             is already on an idmapped mount (ext4, xfs, btrfs do since Linux 5.12/5.15, tmpfs \
             since 6.3)"
            .to_string(),
        Some(libc::EPERM) => "not permitted: an idmapped mount of this filesystem needs real root \
             (CAP_SYS_ADMIN in the namespace that mounted it)"
            .to_string(),
        _ => e.to_string(),
    }
}

/// A detached clone of the mount tree at `dir` (not its submounts), idmapped through
/// `userns`: a file owned by container id N on disk reads as the host id N maps to.
pub fn idmapped_clone(dir: &Path, userns: &UsernsFd) -> Result<OwnedFd, IdmapMountError> {
    let refused = |step: &'static str, err: io::Error| IdmapMountError::Refused {
        path: dir.to_path_buf(),
        step,
        why: why(step, &err),
        err,
    };
    let tree = open_tree(
        CWD,
        dir,
        OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC,
    )
    .map_err(|e| refused("open_tree", e.into()))?;
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_IDMAP,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.0.as_raw_fd() as u64,
    };
    // SAFETY: mount_setattr reads `size_of::<MountAttr>()` bytes of `attr`, a live repr(C)
    // struct laid out as the kernel's `struct mount_attr`; the path is a static C string.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint,
            &raw const attr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc != 0 {
        return Err(refused(
            "mount_setattr(MOUNT_ATTR_IDMAP)",
            io::Error::last_os_error(),
        ));
    }
    Ok(tree)
}

/// Attach the detached mount `tree` on `at` (in the caller's mount namespace).
pub fn attach(tree: &OwnedFd, at: &Path) -> Result<(), IdmapMountError> {
    move_mount(
        tree.as_fd(),
        "",
        CWD,
        at,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
    .map_err(|e| {
        let err = io::Error::from(e);
        IdmapMountError::Refused {
            path: at.to_path_buf(),
            step: "move_mount",
            why: err.to_string(),
            err,
        }
    })
}

/// Join the user namespace `userns` as its root (uid and gid 0, no supplementary groups), for
/// a child between fork and exec: only raw syscalls, no allocation. The caller must be real
/// root (setns needs CAP_SYS_ADMIN over the namespace) and single-threaded (a forked child).
///
/// # Safety
/// `userns` must be an open user-namespace fd for the whole call.
pub unsafe fn join_raw(userns: RawFd) -> io::Result<()> {
    // SAFETY: plain syscalls on an fd the caller vouches for.
    unsafe {
        if libc::setns(userns, libc::CLONE_NEWUSER) != 0
            || libc::setgroups(0, std::ptr::null()) != 0
            || libc::setresgid(0, 0, 0) != 0
            || libc::setresuid(0, 0, 0) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
