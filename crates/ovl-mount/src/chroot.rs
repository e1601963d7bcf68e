//! The inside of a `--chroot` run: /proc and a minimal /dev under MERGED.
//!
//! Owns what an image's own programs need to run with MERGED as their root: the host's /proc
//! bound recursively on MERGED/proc (a fresh proc would need a PID namespace), and a tmpfs on
//! MERGED/dev holding the host's null, zero, full, random, urandom and tty bound in, plus the
//! usual fd/stdin/stdout/stderr links. All of it lives in the private mount namespace.

use std::os::unix::fs::symlink;
use std::path::Path;

use rustix::mount::MountFlags;

use crate::error::{MountError, Result};

/// The device nodes bound from the host into MERGED/dev.
pub(crate) const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

fn ensure_dir(dir: &Path, writable: bool) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if !writable {
        return Err(MountError::Missing {
            what: "directory (needed by --chroot; the mount is read-only)",
            path: dir.to_path_buf(),
        });
    }
    std::fs::create_dir_all(dir).map_err(MountError::io("directory for --chroot", dir))
}

fn setup_err(what: String) -> impl FnOnce(rustix::io::Errno) -> MountError {
    move |e| MountError::Setup {
        what,
        source: e.into(),
    }
}

/// Mount /proc and /dev under `merged`. `writable`: the overlay has an upper, so a missing
/// mount point directory may be made.
pub(crate) fn prepare(merged: &Path, writable: bool) -> Result<()> {
    let proc = merged.join("proc");
    ensure_dir(&proc, writable)?;
    rustix::mount::mount_bind_recursive("/proc", &proc)
        .map_err(setup_err(format!("binding /proc on {}", proc.display())))?;

    let dev = merged.join("dev");
    ensure_dir(&dev, writable)?;
    rustix::mount::mount(
        "tmpfs",
        &dev,
        "tmpfs",
        MountFlags::NOSUID | MountFlags::NOEXEC,
        Some(c"mode=0755,size=1024k"),
    )
    .map_err(setup_err(format!("mounting a tmpfs on {}", dev.display())))?;
    for name in DEVICES {
        let host = Path::new("/dev").join(name);
        if !host.exists() {
            continue;
        }
        let node = dev.join(name);
        std::fs::write(&node, b"").map_err(MountError::io("device placeholder", &node))?;
        rustix::mount::mount_bind(&host, &node).map_err(setup_err(format!(
            "binding {} on {}",
            host.display(),
            node.display()
        )))?;
    }
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ] {
        let p = dev.join(link);
        symlink(target, &p).map_err(MountError::io("device link", &p))?;
    }
    for d in ["pts", "shm"] {
        let p = dev.join(d);
        std::fs::create_dir(&p).map_err(MountError::io("device directory", &p))?;
    }
    Ok(())
}
