//! Keeping the tests' short-lived mounts out of other processes' mount namespaces.
//!
//! A new mount namespace (ovl-mount's session, its rootless re-exec, ovl-unshare running
//! ovl-mount, `unshare -m`) starts with a copy of every mount of the moment, and that copy lives
//! as long as the namespace. ovl-squash rightly refuses a dir that any namespace still mounts,
//! so a test's overlay mount copied into a namespace made by a test running beside it (another
//! thread, another test binary, another checkout's suite on the same machine) makes that test's
//! later squash fail at random.
//!
//! The rule, one file lock for the whole machine (mount namespaces are machine-wide):
//! - a test mount that must be gone when it is unmounted is held [`exclusive`]ly, from before
//!   the mount until after the unmount (`stack::Mount` does it);
//! - a command that may make a mount namespace runs under a [`shared`] hold ([`crate::output`]
//!   and [`crate::run_ok`] take it for ovl-mount, ovl-unshare and unshare; a test that starts
//!   such a command in the background does it through [`spawn`], which holds it until the child
//!   has ended).
//!
//! Shared holds do not wait for each other, so only the mounting spans of the tests wait for
//! namespace makers (and for each other). A thread that holds the lock exclusively and then runs
//! a namespace maker itself is not blocked (its own mount in its own namespace is its own
//! business); taking it exclusively while holding it shared would wait for ever, so it panics.

use std::cell::Cell;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// How a thread holds the lock: counts of its live guards.
#[derive(Clone, Copy, Default)]
struct Held {
    exclusive: u32,
    shared: u32,
}

thread_local! {
    static HELD: Cell<Held> = const { Cell::new(Held { exclusive: 0, shared: 0 }) };
}

/// The lock file: in the system's temp dir, so every checkout's suite on the machine uses it.
fn lock_path() -> PathBuf {
    std::env::temp_dir().join("ovl-tests-mount-namespaces.lock")
}

/// A hold on the lock; released on drop.
pub struct Hold {
    file: Option<File>,
    exclusive: bool,
}

fn lock(exclusive: bool) -> Hold {
    let held = HELD.with(Cell::get);
    if exclusive && held.shared > 0 {
        panic!("mountns: exclusive hold wanted while this thread holds it shared (would deadlock)");
    }
    // Already exclusive in this thread: a nested hold of either kind is covered by it.
    let file = if held.exclusive > 0 {
        None
    } else {
        let path = lock_path();
        let file = open(&path);
        let op = if exclusive {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        };
        // SAFETY: flock on a file descriptor we own; it is released when `file` is closed.
        while unsafe { libc::flock(file.as_raw_fd(), op) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                panic!("flock {}: {e}", path.display());
            }
        }
        Some(file)
    };
    HELD.with(|h| {
        let mut v = h.get();
        if exclusive {
            v.exclusive += 1;
        } else {
            v.shared += 1;
        }
        h.set(v);
    });
    Hold { file, exclusive }
}

/// Open (creating, readable by everyone) the lock file.
fn open(path: &Path) -> File {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(path)
        .or_else(|_| File::open(path))
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

impl Hold {
    /// The lock file alone, no longer counted as this thread's hold (for another thread to keep).
    fn detach(mut self) -> Option<File> {
        self.uncount();
        let file = self.file.take();
        std::mem::forget(self);
        file
    }

    fn uncount(&self) {
        HELD.with(|h| {
            let mut v = h.get();
            if self.exclusive {
                v.exclusive -= 1;
            } else {
                v.shared -= 1;
            }
            h.set(v);
        });
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.uncount();
        drop(self.file.take());
    }
}

/// Hold the lock exclusively: no namespace maker of any test runs until the hold is dropped.
pub fn exclusive() -> Hold {
    lock(true)
}

/// Hold the lock shared, for the life of a command that may make a mount namespace.
pub fn shared() -> Hold {
    lock(false)
}

/// Start `cmd` (one that may make a mount namespace) under a shared hold that lasts until the
/// child has ended (exited, whether or not it was waited for yet).
pub fn spawn(cmd: &mut std::process::Command) -> std::process::Child {
    let hold = shared();
    let child = cmd.spawn().unwrap_or_else(|e| panic!("start {cmd:?}: {e}"));
    let pid = child.id();
    let file = hold.detach();
    std::thread::spawn(move || {
        while running(pid) {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        drop(file);
    });
    child
}

/// Whether `pid` is a process that has not ended (gone, or a zombie, is ended).
fn running(pid: u32) -> bool {
    let Ok(stat) = std::fs::read(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name's closing parenthesis.
    let state = stat
        .iter()
        .rposition(|&b| b == b')')
        .and_then(|i| stat.get(i + 2));
    !matches!(state, None | Some(b'Z') | Some(b'X'))
}

/// Whether running `cmd` may make a mount namespace: ovl-mount, ovl-unshare or unshare as the
/// program or as the program a wrapper (setpriv, runuser, unshare -r) runs.
pub fn makes_namespaces(cmd: &std::process::Command) -> bool {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .filter_map(|a| Path::new(a).file_name())
        .any(|name| name == "ovl-mount" || name == "ovl-unshare" || name == "unshare")
}
