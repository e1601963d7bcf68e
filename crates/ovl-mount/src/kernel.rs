//! Mounting kernel overlayfs.
//!
//! Owns how the kernel is asked: the new mount API (fsopen/fsconfig/fsmount/move_mount) with one
//! `lowerdir+` per layer (Linux >= 6.8), so a stack of any depth fits; else mount(2) with one
//! option page, using the layers' short `/proc/self/fd` names when the full paths do not fit.
//! `userxattr` is set for rootless mounts. A single lower with no upper (which overlayfs
//! refuses) becomes a read-only bind mount of that lower: the same view.
//! When the kernel refuses, its own explanation (the fs context log) goes into the error.

use std::ffi::CString;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{CWD, Mode, OFlags};
use rustix::io::Errno;
use rustix::mount::{
    FsMountFlags, FsOpenFlags, MountAttrFlags, MountFlags, MoveMountFlags, UnmountFlags,
    fsconfig_create, fsconfig_set_flag, fsconfig_set_string, fsmount, fsopen, move_mount,
};

use crate::error::{MountError, Result};
use crate::layout::Layout;

/// The longest option string mount(2) takes (one page, with its NUL).
pub(crate) const OPTION_PAGE: usize = 4095;

/// How the overlay was made, for `-v`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Method {
    /// fsconfig `lowerdir+`, one call per layer.
    LowerdirAppend,
    /// mount(2) with the layer paths in one option page.
    LegacyPaths,
    /// mount(2) with `/proc/self/fd` names for the layers (the paths did not fit a page).
    LegacyFdNames,
    /// A read-only bind mount of the single lower (no upper).
    ReadOnlyBind,
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Method::LowerdirAppend => "new mount API, one `lowerdir+` per layer",
            Method::LegacyPaths => "mount(2) with one option page",
            Method::LegacyFdNames => "mount(2) with /proc/self/fd names for the layers (the paths exceed one page)",
            Method::ReadOnlyBind => "a read-only bind mount of the single lower (overlayfs needs two lowers without an upper)",
        })
    }
}

/// Mount kernel overlayfs for `layout` on its MERGED directory.
pub(crate) fn mount(layout: &Layout, userxattr: bool, legacy: bool) -> Result<Method> {
    if layout.upper.is_none() && layout.lowers.len() == 1 {
        bind_read_only(&layout.lowers[0], &layout.merged)?;
        return Ok(Method::ReadOnlyBind);
    }
    if !legacy && crate::host::kernel().1 >= crate::host::LOWERDIR_APPEND {
        match mount_new_api(layout, userxattr) {
            Err(Fallback::Legacy) => {}
            Err(Fallback::Fail(e)) => return Err(e),
            Ok(()) => return Ok(Method::LowerdirAppend),
        }
    }
    mount_legacy(layout, userxattr)
}

enum Fallback {
    /// This kernel lacks the API: try mount(2).
    Legacy,
    Fail(MountError),
}

fn refused(layout: &Layout, step: &str, e: Errno, fs: Option<&OwnedFd>) -> Fallback {
    if e == Errno::NODEV {
        return Fallback::Fail(MountError::NoOverlayFs);
    }
    let log = fs.map(read_log).unwrap_or_default();
    let mut detail = format!("{step}: {}", std::io::Error::from(e));
    if !log.is_empty() {
        detail.push_str(&format!(" (kernel says: {})", log.join("; ")));
    }
    Fallback::Fail(MountError::KernelMount {
        merged: layout.merged.clone(),
        detail,
    })
}

fn mount_new_api(layout: &Layout, userxattr: bool) -> Result<(), Fallback> {
    let fs = match fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC) {
        Ok(fs) => fs,
        Err(Errno::NOSYS) => return Err(Fallback::Legacy),
        Err(e) => return Err(refused(layout, "fsopen(overlay)", e, None)),
    };
    for (i, lower) in layout.lowers.iter().enumerate() {
        match fsconfig_set_string(&fs, "lowerdir+", lower.as_path()) {
            Ok(()) => {}
            // An overlayfs without `lowerdir+` rejects the key itself.
            Err(Errno::INVAL)
                if i == 0
                    && read_log(&fs)
                        .iter()
                        .any(|l| l.contains("Unknown parameter")) =>
            {
                return Err(Fallback::Legacy);
            }
            Err(e) => {
                return Err(refused(
                    layout,
                    &format!("lower directory {}", lower.display()),
                    e,
                    Some(&fs),
                ));
            }
        }
    }
    if let (Some(upper), Some(work)) = (&layout.upper, &layout.work) {
        fsconfig_set_string(&fs, "upperdir", ovl_layer::escape_lower(upper).as_os_str()).map_err(
            |e| {
                refused(
                    layout,
                    &format!("upper directory {}", upper.display()),
                    e,
                    Some(&fs),
                )
            },
        )?;
        fsconfig_set_string(&fs, "workdir", ovl_layer::escape_lower(work).as_os_str()).map_err(
            |e| {
                refused(
                    layout,
                    &format!("work directory {}", work.display()),
                    e,
                    Some(&fs),
                )
            },
        )?;
    }
    if userxattr {
        fsconfig_set_flag(&fs, "userxattr")
            .map_err(|e| refused(layout, "option userxattr", e, Some(&fs)))?;
    }
    fsconfig_create(&fs).map_err(|e| refused(layout, "creating the overlay", e, Some(&fs)))?;
    let mnt = fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, MountAttrFlags::empty())
        .map_err(|e| refused(layout, "fsmount", e, Some(&fs)))?;
    move_mount(
        mnt.as_fd(),
        "",
        CWD,
        layout.merged.as_path(),
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
    .map_err(|e| refused(layout, "attaching the overlay", e, None))?;
    Ok(())
}

/// The messages the kernel logged on an fs context (`e overlay: ...` lines).
fn read_log(fs: &OwnedFd) -> Vec<String> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = rustix::io::read(fs, &mut buf) {
        if n == 0 {
            break;
        }
        let line = String::from_utf8_lossy(&buf[..n]).trim().to_string();
        out.push(
            line.strip_prefix("e ")
                .or_else(|| line.strip_prefix("w "))
                .unwrap_or(&line)
                .to_string(),
        );
    }
    out
}

/// The `lowerdir=...,upperdir=...,workdir=...` option string for mount(2), every path escaped
/// by [`lowers`] (overlayfs splits this string on unescaped commas, `lowerdir=` on unescaped
/// colons, and drops each escaping backslash).
pub(crate) fn legacy_options<P: AsRef<Path>>(
    layers: &[P],
    upper: Option<(&Path, &Path)>,
    userxattr: bool,
) -> Vec<u8> {
    let mut s = b"lowerdir=".to_vec();
    s.extend_from_slice(ovl_layer::join_lowers(layers).as_bytes());
    if let Some((u, w)) = upper {
        s.extend_from_slice(b",upperdir=");
        s.extend_from_slice(ovl_layer::escape_lower(u).as_bytes());
        s.extend_from_slice(b",workdir=");
        s.extend_from_slice(ovl_layer::escape_lower(w).as_bytes());
    }
    if userxattr {
        s.extend_from_slice(b",userxattr");
    }
    s
}

fn mount_legacy(layout: &Layout, userxattr: bool) -> Result<Method> {
    let up = match (&layout.upper, &layout.work) {
        (Some(u), Some(w)) => Some((u.as_path(), w.as_path())),
        _ => None,
    };
    let opts = legacy_options(&layout.lowers, up, userxattr);
    if opts.len() <= OPTION_PAGE {
        mount2(layout, &opts)?;
        return Ok(Method::LegacyPaths);
    }
    // Too long: name each layer by a short fd number, resolved from /proc/self/fd as the cwd.
    let fds = layout
        .lowers
        .iter()
        .map(|l| {
            rustix::fs::open(
                l,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| MountError::Io {
                what: "lower directory",
                path: l.clone(),
                source: e.into(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let names: Vec<PathBuf> = fds
        .iter()
        .map(|fd| std::os::fd::AsRawFd::as_raw_fd(fd).to_string().into())
        .collect();
    let opts = legacy_options(&names, up, userxattr);
    if opts.len() > OPTION_PAGE {
        return Err(MountError::KernelMount {
            merged: layout.merged.clone(),
            detail: format!(
                "{} lower layers do not fit one option page even by fd number; Linux >= 6.8 takes any number",
                layout.lowers.len()
            ),
        });
    }
    let cwd = rustix::fs::open(
        ".",
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(MountError::setup("opening the current directory"))?;
    rustix::process::chdir("/proc/self/fd").map_err(|e| MountError::Setup {
        what: "chdir /proc/self/fd".into(),
        source: e.into(),
    })?;
    let res = mount2(layout, &opts);
    rustix::process::fchdir(&cwd).map_err(|e| MountError::Setup {
        what: "restoring the current directory".into(),
        source: e.into(),
    })?;
    res.map(|()| Method::LegacyFdNames)
}

fn mount2(layout: &Layout, opts: &[u8]) -> Result<()> {
    let data = CString::new(opts)
        .map_err(|_| MountError::UnsafePath(layout.merged.clone(), "mount(2) option string"))?;
    rustix::mount::mount(
        "overlay",
        layout.merged.as_path(),
        "overlay",
        MountFlags::empty(),
        Some(data.as_c_str()),
    )
    .map_err(|e| match e {
        Errno::NODEV => MountError::NoOverlayFs,
        e => MountError::KernelMount {
            merged: layout.merged.clone(),
            detail: format!(
                "mount(2): {} (see dmesg for the kernel's reason)",
                std::io::Error::from(e)
            ),
        },
    })
}

/// Bind `lower` on `merged` read-only, keeping the lock-protected flags of the source mount.
fn bind_read_only(lower: &Path, merged: &Path) -> Result<()> {
    rustix::mount::mount_bind_recursive(lower, merged).map_err(|e| MountError::Setup {
        what: format!("bind-mounting {} on {}", lower.display(), merged.display()),
        source: e.into(),
    })?;
    let st = rustix::fs::statvfs(merged).map_err(|e| MountError::Setup {
        what: "statvfs".into(),
        source: e.into(),
    })?;
    let mut flags = MountFlags::BIND | MountFlags::RDONLY;
    for (vfs, ms) in [
        (rustix::fs::StatVfsMountFlags::NOSUID, MountFlags::NOSUID),
        (rustix::fs::StatVfsMountFlags::NODEV, MountFlags::NODEV),
        (rustix::fs::StatVfsMountFlags::NOEXEC, MountFlags::NOEXEC),
    ] {
        if st.f_flag.contains(vfs) {
            flags |= ms;
        }
    }
    rustix::mount::mount_remount(merged, flags, "").map_err(|e| {
        let _ = rustix::mount::unmount(merged, UnmountFlags::DETACH);
        MountError::Setup {
            what: format!("making {} read-only", merged.display()),
            source: e.into(),
        }
    })
}

/// Unmount MERGED (any overlay, fuse or bind mount on it).
pub(crate) fn unmount(merged: &Path, lazy: bool) -> Result<()> {
    let flags = if lazy {
        UnmountFlags::DETACH
    } else {
        UnmountFlags::empty()
    };
    rustix::mount::unmount(merged, flags).map_err(|e| MountError::Unmount {
        path: merged.to_path_buf(),
        source: e.into(),
    })
}

/// The raw bytes of a path as a C string (for pre_exec code that must not allocate).
pub(crate) fn c_path(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| MountError::UnsafePath(p.to_path_buf(), "C string"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_for_mount2() {
        let l = [PathBuf::from("/a"), PathBuf::from("/b")];
        assert_eq!(legacy_options(&l, None, false), b"lowerdir=/a:/b");
        assert_eq!(
            legacy_options(&l, Some((Path::new("/u"), Path::new("/w"))), true),
            b"lowerdir=/a:/b,upperdir=/u,workdir=/w,userxattr"
        );
        let odd = [PathBuf::from("/x:y"), PathBuf::from("/x,y\\z")];
        assert_eq!(
            legacy_options(&odd, Some((Path::new("/u,p"), Path::new("/w"))), false),
            b"lowerdir=/x\\:y:/x\\,y\\\\z,upperdir=/u\\,p,workdir=/w"
        );
    }
}
