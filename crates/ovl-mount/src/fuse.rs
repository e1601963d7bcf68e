//! Mounting with fuse-overlayfs.
//!
//! Owns the fuse-overlayfs process: its option string, starting it (in the foreground for a
//! command's lifetime, daemonized for a persistent mount), knowing when its mount is in place
//! (the mount id of MERGED changes), and stopping it (unmount, then wait, then terminate).
//! It runs as (container) root, so it mounts through /dev/fuse itself, no fusermount3 needed.

use std::ffi::OsString;
use std::io::Read;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ovl_layer::LowerError;
use rustix::fs::{AtFlags, CWD, StatxFlags};

use crate::error::{MountError, Result};
use crate::layout::Layout;

/// How long fuse-overlayfs may take to mount or to exit after its unmount.
const PATIENCE: Duration = Duration::from_secs(20);

/// `-o xattr_permissions=2`: fuse-overlayfs presents owners and modes from
/// `user.fuseoverlayfs.override_stat` (what ovl-import records without subordinate ids) and
/// records every chown and chmod there (see ovl-layer's `owners`).
pub(crate) const XATTR_PERMISSIONS: &str = "xattr_permissions=2";

/// The `-o` value for fuse-overlayfs, every path escaped by ovl-layer's `lowers` for it
/// (a path with a `:` is refused: fuse-overlayfs splits its layer lists on every colon);
/// `recorded_owners`: present and record owners in override xattrs (a single-id map).
pub(crate) fn options(layout: &Layout, recorded_owners: bool) -> Result<OsString> {
    let unsafe_path = |e: LowerError| match e {
        LowerError::FuseColon { path } => MountError::UnsafePath(path, FUSE_COLON),
        other => MountError::FuseMount {
            merged: layout.merged.clone(),
            detail: other.to_string(),
        },
    };
    let mut o = b"lowerdir=".to_vec();
    o.extend_from_slice(
        ovl_layer::join_lowers_fuse(&layout.lowers)
            .map_err(unsafe_path)?
            .as_bytes(),
    );
    if let (Some(u), Some(w)) = (&layout.upper, &layout.work) {
        o.extend_from_slice(b",upperdir=");
        o.extend_from_slice(
            ovl_layer::escape_lower_fuse(u)
                .map_err(unsafe_path)?
                .as_bytes(),
        );
        o.extend_from_slice(b",workdir=");
        o.extend_from_slice(
            ovl_layer::escape_lower_fuse(w)
                .map_err(unsafe_path)?
                .as_bytes(),
        );
    }
    if recorded_owners {
        o.push(b',');
        o.extend_from_slice(XATTR_PERMISSIONS.as_bytes());
    }
    Ok(OsString::from_vec(o))
}

const FUSE_COLON: &str = "fuse-overlayfs, which splits its layer lists on every `:`";

/// The mount id of the topmost mount at `path`.
pub(crate) fn mount_id(path: &Path) -> Result<u64> {
    rustix::fs::statx(CWD, path, AtFlags::empty(), StatxFlags::MNT_ID)
        .map(|s| s.stx_mnt_id)
        .map_err(|e| MountError::Io {
            what: "mount point",
            path: path.to_path_buf(),
            source: e.into(),
        })
}

/// A fuse-overlayfs serving MERGED for as long as this lives (see [`FuseMount::stop`]).
#[derive(Debug)]
pub(crate) struct FuseMount {
    child: Child,
    merged: PathBuf,
}

fn command(
    program: &Path,
    layout: &Layout,
    foreground: bool,
    recorded_owners: bool,
) -> Result<Command> {
    let mut cmd = Command::new(program);
    if foreground {
        cmd.arg("-f");
    }
    cmd.arg("-o")
        .arg(options(layout, recorded_owners)?)
        .arg(&layout.merged);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    Ok(cmd)
}

fn failed(layout: &Layout, child: &mut Child, why: String) -> MountError {
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let said: Vec<&str> = err
        .lines()
        .filter(|l| !l.contains("unknown argument ignored"))
        .collect();
    let detail = if said.is_empty() {
        why
    } else {
        format!("{why}: {}", said.join("; "))
    };
    MountError::FuseMount {
        merged: layout.merged.clone(),
        detail,
    }
}

/// Start fuse-overlayfs in the foreground and wait until MERGED is its mount.
pub(crate) fn mount(program: &Path, layout: &Layout, recorded_owners: bool) -> Result<FuseMount> {
    let before = mount_id(&layout.merged)?;
    let mut cmd = command(program, layout, true, recorded_owners)?;
    // SAFETY: prctl is async-signal-safe; the child dies with us rather than outlive its mount
    // namespace's only user.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|source| MountError::Command {
        program: program.display().to_string(),
        source,
    })?;
    let start = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(failed(
                layout,
                &mut child,
                format!("it exited with {status}"),
            ));
        }
        if mount_id(&layout.merged)? != before {
            // Keep its stderr flowing so a late message never blocks it.
            if let Some(mut e) = child.stderr.take() {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut e, &mut std::io::sink());
                });
            }
            return Ok(FuseMount {
                child,
                merged: layout.merged.clone(),
            });
        }
        if start.elapsed() > PATIENCE {
            let _ = child.kill();
            let _ = child.wait();
            return Err(failed(
                layout,
                &mut child,
                format!("no mount after {PATIENCE:?}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

impl FuseMount {
    /// Unmount MERGED and wait for fuse-overlayfs to exit (terminating it if it lingers).
    pub(crate) fn stop(mut self) -> Result<()> {
        let res = crate::kernel::unmount(&self.merged, true);
        let start = Instant::now();
        while start.elapsed() < PATIENCE {
            if let Ok(Some(_)) = self.child.try_wait() {
                return res;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_raw(self.child.id() as i32).expect("child pid"),
            rustix::process::Signal::TERM,
        );
        let _ = self.child.wait();
        res
    }
}

/// Start fuse-overlayfs as a daemon that outlives us (a persistent mount, as root).
pub(crate) fn mount_persistent(program: &Path, layout: &Layout) -> Result<()> {
    let mut cmd = command(program, layout, false, false)?;
    let mut child = cmd.spawn().map_err(|source| MountError::Command {
        program: program.display().to_string(),
        source,
    })?;
    // fuse-overlayfs mounts, then daemonizes: its first process exits once the mount is there.
    let status = child.wait().map_err(|source| MountError::Command {
        program: program.display().to_string(),
        source,
    })?;
    if !status.success() {
        return Err(failed(
            layout,
            &mut child,
            format!("it exited with {status}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_string() {
        let l = Layout {
            lowers: vec!["/a".into(), "/b".into()],
            upper: Some("/u".into()),
            work: Some("/w".into()),
            merged: "/m".into(),
        };
        assert_eq!(
            options(&l, false).unwrap(),
            "lowerdir=/a:/b,upperdir=/u,workdir=/w"
        );
        let commas = Layout {
            lowers: vec!["/a,b".into(), "/c\\d".into()],
            upper: Some("/u,".into()),
            work: Some("/w".into()),
            merged: "/m".into(),
        };
        assert_eq!(
            options(&commas, false).unwrap(),
            "lowerdir=/a\\,b:/c\\\\d,upperdir=/u\\,,workdir=/w"
        );
        let bad = Layout {
            lowers: vec!["/a:b".into()],
            upper: None,
            work: None,
            merged: "/m".into(),
        };
        assert!(matches!(
            options(&bad, false),
            Err(MountError::UnsafePath(..))
        ));
    }
}
