//! Picking the driver and mounting with it.
//!
//! Owns the choice between kernel overlayfs (as root, or rootless with `userxattr`) and
//! fuse-overlayfs, the reason given for it under `-v`, and the handle of a live mount
//! ([`Active`]) that knows how to take itself down.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::error::{MountError, Result};
use crate::fuse::FuseMount;
use crate::host;
use crate::kernel::{self, Method};
use crate::layout::Layout;
use crate::spec::{DriverChoice, MountSpec};

/// The implementation that mounted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    /// Kernel overlayfs mounted by real root (`trusted.overlay.*` markers).
    KernelRoot,
    /// Kernel overlayfs in a user namespace with `userxattr` (`user.overlay.*` markers).
    KernelRootless,
    /// fuse-overlayfs.
    Fuse,
}

impl std::fmt::Display for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Driver::KernelRoot => "kernel overlayfs",
            Driver::KernelRootless => "kernel overlayfs (rootless, userxattr)",
            Driver::Fuse => "fuse-overlayfs",
        })
    }
}

/// A mount that is in place.
#[derive(Debug)]
pub(crate) enum Active {
    Kernel { merged: PathBuf, method: Method },
    Fuse(FuseMount),
}

/// What mounted, why, and how long it took.
#[derive(Debug)]
pub(crate) struct Mounted {
    pub active: Active,
    pub driver: Driver,
    pub reason: String,
    pub took: Duration,
}

impl Mounted {
    /// Lines for `-v`.
    pub(crate) fn describe(&self) -> String {
        let how = match &self.active {
            Active::Kernel { method, .. } => format!(" via {method}"),
            Active::Fuse(_) => String::new(),
        };
        format!(
            "driver: {} ({}); mounted{how} in {:.1} ms",
            self.driver,
            self.reason,
            self.took.as_secs_f64() * 1e3
        )
    }

    /// Take the mount down (lazily: the command may have left processes behind).
    pub(crate) fn unmount(self) -> Result<()> {
        match self.active {
            Active::Kernel { merged, .. } => kernel::unmount(&merged, true),
            Active::Fuse(f) => f.stop(),
        }
    }
}

fn timed<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, Duration)> {
    let t = Instant::now();
    let v = f()?;
    Ok((v, t.elapsed()))
}

fn kernel_mount(spec: &MountSpec, layout: &Layout, rootless: bool) -> Result<(Active, Duration)> {
    let (method, took) = timed(|| kernel::mount(layout, rootless, spec.legacy_mount_api))?;
    Ok((
        Active::Kernel {
            merged: layout.merged.clone(),
            method,
        },
        took,
    ))
}

fn fuse_mount(spec: &MountSpec, layout: &Layout) -> Result<(Active, Duration)> {
    let program = host::fuse_usable(spec.fuse_program.as_deref(), spec.fuse_device.as_deref())?;
    let recorded = spec.recorded_owners && single_id_map();
    let (f, took) = timed(|| crate::fuse::mount(&program, layout, recorded))?;
    Ok((Active::Fuse(f), took))
}

/// In a user namespace that maps only our own id (no subordinate ids): files cannot have
/// their image owners, so they are recorded in xattrs (fuse-overlayfs presents them when
/// asked).
fn single_id_map() -> bool {
    let maps = ovl_layer::current_maps();
    maps.uid.is_single() && maps.gid.is_single()
}

/// Mount for a command, as real root (`rootless` false) or as root of a user namespace.
pub(crate) fn mount(spec: &MountSpec, layout: &Layout, rootless: bool) -> Result<Mounted> {
    let done = |(active, took): (Active, Duration), driver, reason: String| Mounted {
        active,
        driver,
        reason,
        took,
    };
    if !rootless {
        return match spec.driver {
            DriverChoice::Fuse => Ok(done(
                fuse_mount(spec, layout)?,
                Driver::Fuse,
                "--driver fuse".into(),
            )),
            choice => {
                let why = if choice == DriverChoice::Kernel {
                    "--driver kernel"
                } else {
                    "running as root"
                };
                Ok(done(
                    kernel_mount(spec, layout, false)?,
                    Driver::KernelRoot,
                    why.into(),
                ))
            }
        };
    }
    let (release, version) = host::kernel();
    match spec.driver {
        DriverChoice::Fuse => Ok(done(
            fuse_mount(spec, layout)?,
            Driver::Fuse,
            "--driver fuse".into(),
        )),
        DriverChoice::Kernel => {
            require_rootless_kernel()?;
            Ok(done(
                kernel_mount(spec, layout, true)?,
                Driver::KernelRootless,
                "--driver kernel".into(),
            ))
        }
        // Asked to present recorded owners: only fuse-overlayfs can.
        DriverChoice::Auto if spec.recorded_owners => Ok(done(
            fuse_mount(spec, layout)?,
            Driver::Fuse,
            "--recorded-owners: fuse-overlayfs presents the owners and modes recorded in \
             user.fuseoverlayfs.override_stat (xattr_permissions=2)"
                .into(),
        )),
        DriverChoice::Auto if version < host::USERNS_OVERLAY => {
            let why = format!(
                "Linux {release} is older than 5.11, which first allows overlayfs in a user namespace"
            );
            match fuse_mount(spec, layout) {
                Ok(m) => Ok(done(m, Driver::Fuse, why)),
                Err(e) => Err(MountError::NoDriver {
                    kernel: why,
                    fuse: Box::new(e),
                }),
            }
        }
        DriverChoice::Auto => match kernel_mount(spec, layout, true) {
            Ok(m) => Ok(done(
                m,
                Driver::KernelRootless,
                format!("Linux {release} allows overlayfs with userxattr in a user namespace"),
            )),
            Err(MountError::KernelMount { detail, .. }) => {
                let why = format!("the kernel refused overlayfs in the user namespace: {detail}");
                match fuse_mount(spec, layout) {
                    Ok(m) => Ok(done(m, Driver::Fuse, why)),
                    Err(e) => Err(MountError::NoDriver {
                        kernel: why,
                        fuse: Box::new(e),
                    }),
                }
            }
            Err(e) => Err(e),
        },
    }
}

/// A rootless kernel mount needs Linux >= 5.11.
pub(crate) fn require_rootless_kernel() -> Result<()> {
    host::require_kernel(
        host::USERNS_OVERLAY,
        "rootless kernel overlayfs (userxattr in a user namespace)",
        "5.11",
        "use --driver fuse (fuse-overlayfs) or run as root",
    )
}

/// Checks that can be made before entering the user namespace, so they fail early and clearly.
pub(crate) fn precheck_rootless(spec: &MountSpec) -> Result<()> {
    match spec.driver {
        DriverChoice::Kernel => require_rootless_kernel(),
        DriverChoice::Fuse => {
            host::fuse_usable(spec.fuse_program.as_deref(), spec.fuse_device.as_deref()).map(drop)
        }
        DriverChoice::Auto => Ok(()),
    }
}
