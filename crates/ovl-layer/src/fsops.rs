//! Operations on one name in an open directory, never following the name.
//!
//! Owns the `*at` calls every tool makes on a single name: a symlink is touched as itself,
//! never followed, and no path is resolved from `/` again. [`crate::root::Leaf`] is these with
//! the directory fd and the name held together; code that keeps many names in one directory fd
//! (ovl-squash's work directory) calls them directly. How a directory fd is reached safely in
//! the first place is [`crate::root`]'s.

use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Stat, Timestamps};

/// A name as the `*at` calls take it.
pub fn cstr(name: &[u8]) -> io::Result<CString> {
    CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in name"))
}

/// `/proc/self/fd/DIR/NAME`: reaches NAME through the directory fd without following NAME
/// itself, for the calls that have no fd form (lsetxattr and friends on symlinks and devices).
pub fn proc_path(dir: &impl AsRawFd, name: &CStr) -> PathBuf {
    let mut p = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
    p.push(OsStr::from_bytes(name.to_bytes()));
    p
}

pub fn is_dir(st: &Stat) -> bool {
    FileType::from_raw_mode(st.st_mode) == FileType::Directory
}

/// lstat NAME in DIR; `None` when nothing is there.
pub fn stat_at(dir: &impl AsFd, name: &CStr) -> io::Result<Option<Stat>> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(rustix::io::Errno::NOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Open directory NAME in DIR for reading (`O_NOFOLLOW`).
pub fn open_dir_at(dir: &impl AsFd, name: &CStr) -> io::Result<OwnedFd> {
    rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(Into::into)
}

/// Open regular file NAME in DIR for reading (`O_NOFOLLOW`).
pub fn open_file_at(dir: &impl AsFd, name: &CStr) -> io::Result<File> {
    rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map(File::from)
    .map_err(Into::into)
}

/// Create the empty regular file NAME in DIR, mode 0600 until its metadata is set (it must not
/// exist).
pub fn create_file_at(dir: &impl AsFd, name: &CStr) -> io::Result<File> {
    rustix::fs::openat(
        dir,
        name,
        OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .map(File::from)
    .map_err(Into::into)
}

/// A hardlink: `from_dir/from` is also `to_dir/to` (a symlink itself is linked, not followed).
pub fn link_at(from_dir: &impl AsFd, from: &CStr, to_dir: &impl AsFd, to: &CStr) -> io::Result<()> {
    rustix::fs::linkat(from_dir, from, to_dir, to, AtFlags::empty()).map_err(Into::into)
}

/// Remove whatever NAME is in DIR (a directory with everything below it); nothing there is
/// fine. Returns whether there was something.
pub fn remove_at(dir: &impl AsFd, name: &CStr) -> io::Result<bool> {
    match stat_at(dir, name)? {
        None => Ok(false),
        Some(st) if is_dir(&st) => remove_tree(dir, name).map(|()| true),
        Some(_) => rustix::fs::unlinkat(dir, name, AtFlags::empty())
            .map(|()| true)
            .map_err(Into::into),
    }
}

/// Remove directory NAME in DIR and everything below it, without following any symlink.
pub(crate) fn remove_tree(dir: &impl AsFd, name: &CStr) -> io::Result<()> {
    let fd = open_dir_at(dir, name)?;
    empty_dir(&fd)?;
    rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR).map_err(Into::into)
}

/// Remove everything inside the directory open as `fd`.
pub(crate) fn empty_dir(fd: &OwnedFd) -> io::Result<()> {
    let mut names = Vec::new();
    for ent in rustix::fs::Dir::read_from(fd)? {
        let ent = ent?;
        let n = ent.file_name();
        if n.to_bytes() != b"." && n.to_bytes() != b".." {
            names.push((n.to_owned(), ent.file_type()));
        }
    }
    for (n, ft) in names {
        let dir = match ft {
            FileType::Unknown => rustix::fs::statat(fd, n.as_c_str(), AtFlags::SYMLINK_NOFOLLOW)
                .map(|st| is_dir(&st))?,
            ft => ft == FileType::Directory,
        };
        if dir {
            remove_tree(fd, &n)?;
        } else {
            rustix::fs::unlinkat(fd, n.as_c_str(), AtFlags::empty())?;
        }
    }
    Ok(())
}

pub(crate) fn chown_at(dir: &impl AsFd, name: &CStr, uid: u32, gid: u32) -> io::Result<()> {
    rustix::fs::chownat(
        dir,
        name,
        Some(rustix::fs::Uid::from_raw(uid)),
        Some(rustix::fs::Gid::from_raw(gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(Into::into)
}

/// chmod by name, never following NAME: a symlink is refused with EOPNOTSUPP, as glibc's
/// lchmod does (Linux has no lchmod; plain `fchmodat` would change the symlink's target).
pub(crate) fn chmod_at(dir: &impl AsFd, name: &CStr, mode: u32) -> io::Result<()> {
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let st = rustix::fs::fstat(&fd)?;
    if FileType::from_raw_mode(st.st_mode) == FileType::Symlink {
        return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
    }
    // An O_PATH fd has no fchmod; its /proc magic link leads to the inode itself.
    rustix::fs::chmod(
        format!("/proc/self/fd/{}", fd.as_raw_fd()).as_str(),
        Mode::from_raw_mode(mode),
    )
    .map_err(Into::into)
}

pub(crate) fn set_times_at(dir: &impl AsFd, name: &CStr, times: &Timestamps) -> io::Result<()> {
    rustix::fs::utimensat(dir, name, times, AtFlags::SYMLINK_NOFOLLOW).map_err(Into::into)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A name that turned into a symlink between its creation and the chmod: the chmod must not
    /// reach the symlink's target (Linux has no lchmod; `fchmodat` follows by default).
    #[test]
    fn chmod_at_never_follows_a_symlink() {
        let t = tempfile::tempdir().unwrap();
        let target = t.path().join("target");
        std::fs::write(&target, b"x").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::symlink(&target, t.path().join("link")).unwrap();
        std::fs::write(t.path().join("file"), b"y").unwrap();
        let dir = rustix::fs::open(
            t.path(),
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .unwrap();
        assert!(chmod_at(&dir, c"link", 0o4777).is_err());
        let mode =
            |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&target), 0o600);
        chmod_at(&dir, c"file", 0o4751).unwrap();
        assert_eq!(mode(&t.path().join("file")), 0o4751);
    }
}
