//! Reading and writing extended attributes without following symlinks.
//!
//! Owns the xattr I/O helpers; which xattrs mean what is decided in [`crate::whiteout`].

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;

use crate::fsops::proc_path;

/// Every xattr of `path` (not following a final symlink), sorted by name.
pub fn list_path(path: &Path) -> io::Result<Vec<(String, Vec<u8>)>> {
    collect(xattr::list(path), |name| xattr::get(path, name))
}

/// Every xattr of NAME in DIR (not following NAME), sorted by name.
pub(crate) fn list_at(dir: &impl AsRawFd, name: &CStr) -> io::Result<Vec<(String, Vec<u8>)>> {
    list_path(&proc_path(dir, name))
}

/// Every xattr of an open file, sorted by name.
pub fn list_fd(fd: impl AsFd) -> io::Result<Vec<(String, Vec<u8>)>> {
    let path = std::path::PathBuf::from(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&fd.as_fd())
    ));
    // The magic link resolves to the open file itself; lgetxattr would read the link, so
    // follow it deliberately.
    collect(xattr::list_deref(&path), |name| {
        xattr::get_deref(&path, name)
    })
}

fn collect(
    names: io::Result<xattr::XAttrs>,
    get: impl Fn(&str) -> io::Result<Option<Vec<u8>>>,
) -> io::Result<Vec<(String, Vec<u8>)>> {
    let names = match names {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for name in names {
        let Some(name) = name.to_str().map(str::to_owned) else {
            continue;
        };
        if let Some(v) = get(&name)? {
            out.push((name, v));
        }
    }
    out.sort();
    Ok(out)
}

/// Set an xattr on an open file or directory.
pub(crate) fn set_fd(fd: impl AsFd, name: &str, value: &[u8]) -> io::Result<()> {
    rustix::fs::fsetxattr(fd, name, value, rustix::fs::XattrFlags::empty()).map_err(Into::into)
}

/// Set an xattr on NAME in DIR (not following NAME).
pub(crate) fn set_at(dir: &impl AsRawFd, name: &CStr, key: &str, value: &[u8]) -> io::Result<()> {
    rustix::fs::lsetxattr(
        proc_path(dir, name),
        key,
        value,
        rustix::fs::XattrFlags::empty(),
    )
    .map_err(Into::into)
}

/// Remove an xattr of an open file or directory.
pub(crate) fn remove_fd(fd: impl AsFd, name: &str) -> io::Result<()> {
    rustix::fs::fremovexattr(fd, name).map_err(Into::into)
}

/// Remove an xattr of NAME in DIR (not following NAME).
pub(crate) fn remove_at(dir: &impl AsRawFd, name: &CStr, key: &str) -> io::Result<()> {
    rustix::fs::lremovexattr(proc_path(dir, name), key).map_err(Into::into)
}
