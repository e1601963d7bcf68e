//! ovl-mount: mount a stack of layers with overlayfs (kernel or fuse-overlayfs), as root or
//! rootless, persistently or for the life of one command.
//!
//! # How the driver is picked (`--driver auto`, the default)
//!
//! - **As root**: kernel overlayfs, markers in `trusted.overlay.*`.
//! - **As a user** (always the `-- CMD` form): ovl-mount re-executes itself in a new user and
//!   mount namespace (container 0 = the user, 1..=65536 = the user's /etc/subuid and
//!   /etc/subgid ranges via newuidmap/newgidmap; a single-id map with a warning without them).
//!   There, on Linux >= 5.11 it mounts kernel overlayfs with `userxattr` (markers in
//!   `user.overlay.*`); if the kernel is older or refuses that mount, it runs fuse-overlayfs
//!   instead (which needs the fuse-overlayfs program and read/write access to /dev/fuse).
//! - `--driver kernel` or `--driver fuse` forces one; then a missing prerequisite is an error
//!   rather than a fallback. `-v` prints the driver and the reason for it.
//!
//! Kernel mounts use the new mount API with one `lowerdir+` per layer (Linux >= 6.8), so any
//! stack depth fits; older kernels get mount(2), with short `/proc/self/fd` names for the layers
//! when their paths exceed the one-page option limit. A single lower without an upper becomes a
//! read-only bind mount (overlayfs wants two lowers when there is no upper).
//!
//! The modules, each owning one concern: `spec` (the request), `layout` (the directories and
//! their rules), `inuse` (is an upper/work already serving), `host` (kernel, user namespace
//! and fuse prerequisites), `kernel` and `fuse` (the two mount mechanisms), `driver` (the
//! choice and a live mount), `chroot` (/proc and /dev for `--chroot`), `command` (the child),
//! `session` (the order of it all), `shift` (`--uidmap`: idmapped lowers, the upper's
//! owner), `error` (typed errors that say what to do).

#![warn(unreachable_pub)]

mod chroot;
mod command;
mod driver;
mod error;
mod fuse;
mod host;
mod inuse;
mod kernel;
mod layout;
mod session;
mod shift;
mod spec;

pub use driver::Driver;
pub use error::{MountError, Result};
pub use session::{run, unmount};
pub use spec::{DriverChoice, IdmapChoice, MountSpec};

/// The exit code ovl-mount uses for its own failures (so they differ from most commands' own).
pub const EXIT_FAILURE: i32 = 125;
