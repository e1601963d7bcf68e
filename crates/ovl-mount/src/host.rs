//! Facts about this host that decide what can be mounted: the kernel version, whether
//! unprivileged user namespaces are enabled, and whether fuse-overlayfs can run.
//!
//! Owns the prerequisite checks that are not about the layer directories; each failure is a
//! [`MountError`] that says what to do.

use std::path::{Path, PathBuf};

use crate::error::{MountError, Result};

/// overlayfs in a user namespace with `userxattr` (Linux 5.11).
pub(crate) const USERNS_OVERLAY: (u32, u32) = (5, 11);
/// `lowerdir+` one layer per fsconfig call (Linux 6.8).
pub(crate) const LOWERDIR_APPEND: (u32, u32) = (6, 8);

/// `major.minor` of a kernel release string such as `6.18.44-foo`.
pub(crate) fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// The running kernel's release string and `major.minor`.
pub(crate) fn kernel() -> (String, (u32, u32)) {
    let uname = rustix::system::uname();
    let release = uname.release().to_string_lossy().into_owned();
    let v = parse_release(&release).unwrap_or((0, 0));
    (release, v)
}

/// Fail unless the running kernel is at least `need`.
pub(crate) fn require_kernel(
    need: (u32, u32),
    what: &'static str,
    need_text: &'static str,
    hint: &'static str,
) -> Result<()> {
    let (release, have) = kernel();
    if have < need {
        return Err(MountError::KernelTooOld {
            what,
            have: release,
            need: need_text,
            hint,
        });
    }
    Ok(())
}

/// Check the sysctls that turn unprivileged user namespaces off; `read` gives a sysctl's value
/// by its /proc/sys path (None when the file does not exist).
pub(crate) fn userns_enabled_with(read: &dyn Fn(&str) -> Option<String>) -> Result<()> {
    let num = |p: &str| read(p).and_then(|v| v.trim().parse::<i64>().ok());
    if num("/proc/sys/user/max_user_namespaces") == Some(0) {
        return Err(MountError::UsernsDisabled(
            "user.max_user_namespaces is 0".into(),
            "user.max_user_namespaces=15000",
        ));
    }
    if num("/proc/sys/kernel/unprivileged_userns_clone") == Some(0) {
        return Err(MountError::UsernsDisabled(
            "kernel.unprivileged_userns_clone is 0".into(),
            "kernel.unprivileged_userns_clone=1",
        ));
    }
    if num("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == Some(1) {
        return Err(MountError::UsernsDisabled(
            "AppArmor restricts them: kernel.apparmor_restrict_unprivileged_userns is 1".into(),
            "kernel.apparmor_restrict_unprivileged_userns=0",
        ));
    }
    Ok(())
}

/// Check this host's user namespace sysctls.
pub(crate) fn userns_enabled() -> Result<()> {
    userns_enabled_with(&|p| std::fs::read_to_string(p).ok())
}

/// The fuse-overlayfs program to run: `explicit`, else the one in PATH.
pub(crate) fn fuse_program(explicit: Option<&Path>) -> Result<PathBuf> {
    match explicit {
        Some(p) if rustix::fs::access(p, rustix::fs::Access::EXEC_OK).is_ok() => {
            Ok(p.to_path_buf())
        }
        Some(p) => Err(MountError::NoFuseOverlayfs(p.display().to_string())),
        None => ovl_layer::which("fuse-overlayfs").ok_or_else(|| {
            MountError::NoFuseOverlayfs("fuse-overlayfs in PATH, /usr/sbin, /usr/bin".into())
        }),
    }
}

/// The fuse device must be readable and writable by this process.
pub(crate) fn fuse_device_usable(dev: &Path) -> Result<()> {
    use rustix::fs::Access;
    match rustix::fs::access(dev, Access::READ_OK | Access::WRITE_OK) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::NOENT) => Err(MountError::FuseDevice {
            path: dev.to_path_buf(),
            reason: "it does not exist; load the fuse module (modprobe fuse)".into(),
        }),
        Err(e) => Err(MountError::FuseDevice {
            path: dev.to_path_buf(),
            reason: std::io::Error::from(e).to_string(),
        }),
    }
}

/// Everything fuse-overlayfs needs: the program and the device.
pub(crate) fn fuse_usable(program: Option<&Path>, device: Option<&Path>) -> Result<PathBuf> {
    let prog = fuse_program(program)?;
    fuse_device_usable(device.unwrap_or(Path::new("/dev/fuse")))?;
    Ok(prog)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases() {
        assert_eq!(parse_release("6.18.44-fc-v595"), Some((6, 18)));
        assert_eq!(parse_release("5.4.0-150-generic"), Some((5, 4)));
        assert_eq!(parse_release("junk"), None);
        assert!((5, 4) < USERNS_OVERLAY && (6, 18) >= LOWERDIR_APPEND && (6, 7) < LOWERDIR_APPEND);
    }

    #[test]
    fn userns_sysctls() {
        let none = |_: &str| None;
        userns_enabled_with(&none).unwrap();
        let zero = |p: &str| {
            p.ends_with("max_user_namespaces")
                .then(|| "0\n".to_string())
        };
        let e = userns_enabled_with(&zero).unwrap_err();
        assert!(e.to_string().contains("user.max_user_namespaces"), "{e}");
        let debian = |p: &str| {
            p.ends_with("unprivileged_userns_clone")
                .then(|| "0".to_string())
        };
        assert!(matches!(
            userns_enabled_with(&debian),
            Err(MountError::UsernsDisabled(..))
        ));
        let aa = |p: &str| {
            p.ends_with("apparmor_restrict_unprivileged_userns")
                .then(|| "1".to_string())
        };
        assert!(
            userns_enabled_with(&aa)
                .unwrap_err()
                .to_string()
                .contains("AppArmor")
        );
    }

    #[test]
    fn a_kernel_too_old_says_which_and_what_to_do() {
        require_kernel((5, 2), "x", "5.2", "hint").unwrap();
        let e = require_kernel(
            (999, 0),
            "rootless kernel overlayfs",
            "999.0",
            "use --driver fuse",
        )
        .unwrap_err();
        let (release, _) = kernel();
        let msg = e.to_string();
        assert!(
            msg.contains("too old") && msg.contains(&release) && msg.contains("use --driver fuse"),
            "{msg}"
        );
    }

    #[test]
    fn missing_fuse_pieces_are_clear() {
        let e = fuse_program(Some(Path::new("/nonexistent/fuse-overlayfs"))).unwrap_err();
        assert!(
            e.to_string().contains("install the fuse-overlayfs package"),
            "{e}"
        );
        let e = fuse_device_usable(Path::new("/nonexistent/fuse")).unwrap_err();
        assert!(e.to_string().contains("modprobe fuse"), "{e}");
    }
}
