//! The three ways ovl-mount runs, start to end.
//!
//! Owns the order of things: a persistent mount as root; a command run as root in a private
//! mount namespace (as real root, or with userxattr as root of a user namespace such as
//! `unshare -r` makes; [`Identity`] tells which); and the rootless form, which checks what it can as the user, takes the work
//! directory lock, then re-executes itself inside a new user + mount namespace (unshare of a user
//! namespace fails in a multithreaded process) where it mounts and runs the command. Also owns
//! `--unmount`, and the order of a shifted run (`--uidmap`, see [`crate::shift`]).

use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;

use ovl_layer::{IdMap, Identity, RootlessMaps, UsernsFd, UsernsPlan, in_userns, reexec_self};

use rustix::mount::MountPropagationFlags;

use crate::driver::{self, Mounted};
use crate::error::{MountError, Result};
use crate::inuse::{self, WorkLock};
use crate::layout::Layout;
use crate::spec::{DriverChoice, IdmapChoice, MountSpec};
use crate::{chroot, command, fuse, host, kernel, shift};

/// Do what `spec` asks; returns the exit code for the process (the command's, or 0).
pub fn run(spec: &MountSpec) -> Result<i32> {
    if spec.chroot && spec.persistent() {
        return Err(MountError::ChrootNeedsCmd);
    }
    if spec.recorded_owners && (spec.driver == DriverChoice::Kernel || spec.persistent()) {
        return Err(MountError::RecordedOwnersNeedSingle);
    }
    if spec.shift.is_some() {
        if !Identity::current().is_real_root() {
            return Err(MountError::ShiftNeedsRoot);
        }
        if spec.driver == DriverChoice::Fuse {
            return Err(MountError::ShiftFuse);
        }
    }
    match Identity::current() {
        // The copy of ovl-mount that `rootless` started, in its new user and mount namespace.
        Identity::NamespaceRoot(_) if in_userns() => inside_userns(spec),
        Identity::User => rootless(spec),
        // Real root (trusted xattrs), or root of someone else's user namespace (`unshare -r`,
        // `podman unshare`): that mounts with userxattr, as a rootless mount does.
        identity => {
            let rootless = !identity.is_real_root();
            if spec.persistent() {
                persistent(spec, rootless).map(|()| 0)
            } else {
                root_command(spec, rootless)
            }
        }
    }
}

fn note(spec: &MountSpec, msg: &str) {
    if spec.verbose {
        eprintln!("ovl-mount: {msg}");
    }
}

/// Refuse an upper/work pair in use, and lock the work directory for as long as we live.
fn claim(layout: &Layout) -> Result<Option<WorkLock>> {
    match (&layout.upper, &layout.work) {
        (Some(u), Some(w)) => {
            inuse::check_not_mounted(u, w)?;
            Ok(Some(WorkLock::take(w)?))
        }
        _ => Ok(None),
    }
}

/// One line that says what is mounted where.
pub(crate) fn summary(layout: &Layout) -> String {
    let mut lowers: Vec<String> = layout
        .lowers
        .iter()
        .map(|l| ovl_layer::escape_lower(l).to_string_lossy().into_owned())
        .collect();
    if lowers.len() > 4 {
        let n = lowers.len();
        lowers = vec![
            lowers[0].clone(),
            format!("...({} more)...", n - 2),
            lowers[n - 1].clone(),
        ];
    }
    match (&layout.upper, &layout.work) {
        (Some(u), Some(w)) => format!(
            "overlay on {} (lower={}, upper={}, work={})",
            layout.merged.display(),
            lowers.join(":"),
            u.display(),
            w.display()
        ),
        _ => format!(
            "overlay on {} (lower={}, read-only)",
            layout.merged.display(),
            lowers.join(":")
        ),
    }
}

/// A mount that stays, made by real root or, with userxattr, by the root of a user namespace.
fn persistent(spec: &MountSpec, rootless: bool) -> Result<()> {
    let layout = Layout::resolve(spec)?;
    let _lock = claim(&layout)?;
    let t = std::time::Instant::now();
    let how = if let Some(maps) = &spec.shift {
        if let Some(upper) = &layout.upper {
            shift::prepare_upper(upper, maps)?;
        }
        let ns = if spec.shifted_lowers {
            None
        } else {
            Some(shift::userns(maps)?)
        };
        let method = shift::persistent(&layout, ns.as_ref(), || {
            kernel::mount(&layout, rootless, spec.legacy_mount_api)
        })
        .map_err(|e| shifted_refusal(spec, e))?;
        note(spec, &shift_note(spec, maps));
        format!("kernel overlayfs via {method}")
    } else if spec.driver == DriverChoice::Fuse {
        let program = host::fuse_usable(spec.fuse_program.as_deref(), spec.fuse_device.as_deref())?;
        fuse::mount_persistent(&program, &layout)?;
        "fuse-overlayfs".to_string()
    } else {
        format!(
            "kernel overlayfs via {}",
            kernel::mount(&layout, rootless, spec.legacy_mount_api)?
        )
    };
    note(
        spec,
        &format!(
            "driver: {how}; mounted in {:.1} ms",
            t.elapsed().as_secs_f64() * 1e3
        ),
    );
    println!("mounted {}", summary(&layout));
    Ok(())
}

/// Make every mount of this (new) mount namespace private, so nothing we mount leaks out.
pub(crate) fn private_namespace() -> Result<()> {
    rustix::mount::mount_change(
        "/",
        MountPropagationFlags::PRIVATE | MountPropagationFlags::REC,
    )
    .map_err(|e| MountError::Setup {
        what: "making the mount namespace private".into(),
        source: e.into(),
    })
}

/// Mount, run the command (in `userns` when given: a shifted mount), unmount.
fn mount_and_run(
    spec: &MountSpec,
    layout: &Layout,
    rootless: bool,
    userns: Option<&UsernsFd>,
) -> Result<i32> {
    let mounted: Mounted = driver::mount(spec, layout, rootless).map_err(|e| match userns {
        Some(_) => shifted_refusal(spec, e),
        None => e,
    })?;
    note(spec, &mounted.describe());
    note(spec, &format!("mounted {}", summary(layout)));
    let result = (|| {
        if spec.chroot {
            chroot::prepare(&layout.merged, layout.upper.is_some())?;
        }
        command::ignore_terminal_signals();
        command::run(
            &spec.command,
            &layout.merged,
            spec.chroot,
            userns.map(|u| u.as_fd().as_raw_fd()),
        )
    })();
    let down = mounted.unmount();
    let code = result?;
    down?;
    Ok(code)
}

/// A command in a private mount namespace, run by real root or by the root of a user namespace.
fn root_command(spec: &MountSpec, rootless: bool) -> Result<i32> {
    if spec.recorded_owners && !rootless {
        return Err(MountError::RecordedOwnersNeedSingle);
    }
    let layout = Layout::resolve(spec)?;
    let _lock = claim(&layout)?;
    if let (Some(maps), Some(upper)) = (&spec.shift, &layout.upper) {
        shift::prepare_upper(upper, maps)?;
    }
    // SAFETY: a new mount namespace only changes what this process sees of the filesystem; no
    // other thread exists yet (unshare of CLONE_NEWNS fails in a multithreaded process anyway).
    unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNS) }.map_err(
        |e| MountError::Setup {
            what: "unshare(CLONE_NEWNS)".into(),
            source: e.into(),
        },
    )?;
    private_namespace()?;
    let userns = match &spec.shift {
        Some(maps) => {
            let ns = shift::userns(maps)?;
            if !spec.shifted_lowers {
                shift::idmap_lowers(&layout, &ns)?;
            }
            note(spec, &shift_note(spec, maps));
            Some(ns)
        }
        None => None,
    };
    mount_and_run(spec, &layout, rootless, userns.as_ref())
}

/// A kernel refusal of an overlay over idmapped lowers says so, and points to the fallback.
fn shifted_refusal(spec: &MountSpec, e: MountError) -> MountError {
    match e {
        MountError::KernelMount { merged, detail } if !spec.shifted_lowers => {
            MountError::ShiftedOverlayRefused { merged, detail }
        }
        e => e,
    }
}

/// The `-v` line of a shifted mount.
fn shift_note(spec: &MountSpec, maps: &RootlessMaps) -> String {
    format!(
        "id map: uid {} gid {}; {}",
        ranges(&maps.uid),
        ranges(&maps.gid),
        if spec.shifted_lowers {
            "lowers already shifted"
        } else {
            "lowers idmapped"
        }
    )
}

/// `C:H:N,C:H:N` for `-v`.
fn ranges(map: &IdMap) -> String {
    map.ranges()
        .iter()
        .map(|r| r.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// The id maps for the rootless namespace, by `--idmap`.
fn rootless_maps(spec: &MountSpec) -> Result<RootlessMaps> {
    let uid = rustix::process::getuid().as_raw();
    let gid = rustix::process::getgid().as_raw();
    let user = ovl_layer::user_name(uid).unwrap_or_else(|| uid.to_string());
    let single = RootlessMaps {
        uid: IdMap::single(uid),
        gid: IdMap::single(gid),
    };
    if spec.idmap == IdmapChoice::Single {
        return Ok(single);
    }
    let maps = RootlessMaps::for_current_user().map_err(|source| MountError::Io {
        what: "reading subordinate ids",
        path: "/etc/subuid".into(),
        source,
    })?;
    if maps.has_subordinate_ids() {
        note(
            spec,
            &format!("id map: container 0 is {user}, 1..=65536 are {user}'s subordinate ids"),
        );
        return Ok(maps);
    }
    if spec.idmap == IdmapChoice::Subids {
        return Err(MountError::NoSubordinateIds { user });
    }
    eprintln!(
        "ovl-mount: warning: {user} has no subordinate ids in /etc/subuid and /etc/subgid: using a \
         single-id map (only container root is mapped; files of other owners show as nobody and \
         cannot be chowned). Add a range to map 65536 ids."
    );
    Ok(single)
}

/// A lower imported without subordinate ids holds every file as the user's own, with the
/// image owners only recorded in xattrs; a mount with subordinate ids shows them all as root.
fn warn_recorded_owners(layout: &Layout) {
    for lower in &layout.lowers {
        let mut buf = [0u8; 64];
        if rustix::fs::getxattr(lower, ovl_layer::FUSE_OVERRIDE_XATTR, &mut buf).is_ok() {
            eprintln!(
                "ovl-mount: warning: {} was imported without subordinate ids: its files all \
                 belong to you and the image's owners are only recorded in xattrs, which this \
                 mount (with subordinate ids) does not present, so every file shows as root. \
                 Import the image again (ovl-import SOURCE NEWDIR) to give files their owners, \
                 or mount with --idmap single --recorded-owners to see the recorded ones.",
                lower.display()
            );
        }
    }
}

fn rootless(spec: &MountSpec) -> Result<i32> {
    if spec.persistent() {
        return Err(MountError::PersistentNeedsRoot);
    }
    host::userns_enabled()?;
    let layout = Layout::resolve(spec)?;
    driver::precheck_rootless(spec)?;
    let _lock = claim(&layout)?;
    let maps = rootless_maps(spec)?;
    if !maps.uid.is_single() {
        if spec.recorded_owners {
            return Err(MountError::RecordedOwnersNeedSingle);
        }
        warn_recorded_owners(&layout);
    }
    command::ignore_terminal_signals();
    Ok(reexec_self(&UsernsPlan {
        maps,
        mount_ns: true,
    })?)
}

fn inside_userns(spec: &MountSpec) -> Result<i32> {
    if spec.persistent() {
        return Err(MountError::PersistentNeedsRoot);
    }
    private_namespace()?;
    // The outer process checked and locked; resolving again only re-reads the same paths.
    let layout = Layout::resolve(spec)?;
    mount_and_run(spec, &layout, true, None)
}

/// `--unmount MERGED`: take down a persistent mount.
pub fn unmount(merged: &Path) -> Result<()> {
    if Identity::current().needs_reexec() {
        return Err(MountError::UnmountNeedsRoot);
    }
    let path = std::fs::canonicalize(merged).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => MountError::MergedMissing(merged.to_path_buf()),
        _ => MountError::Io {
            what: "mount point",
            path: merged.to_path_buf(),
            source: e,
        },
    })?;
    if ovl_layer::mounted_at(&ovl_layer::own_mounts(), &path).is_none() {
        return Err(MountError::NotMounted(path));
    }
    kernel::unmount(&path, false)
}
