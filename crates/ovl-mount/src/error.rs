//! The typed errors of ovl-mount.
//!
//! Owns every failure the library reports: each missing prerequisite is its own variant whose
//! message says what is wrong and what to do about it, so the CLI only adds context.

use std::path::PathBuf;

use ovl_layer::UsernsError;

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("the mount point {0} does not exist: create it first (mkdir -p {0})")]
    MergedMissing(PathBuf),
    #[error("{what} {path} is not a directory")]
    NotADirectory { what: &'static str, path: PathBuf },
    #[error("{what} {path} does not exist")]
    Missing { what: &'static str, path: PathBuf },
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no lower directory given: pass --lower DIR[:DIR...]")]
    NoLower,
    #[error("--lower: {0}")]
    BadLower(ovl_layer::LowerError),
    #[error("--upper and --work go together: pass both or neither")]
    UpperWithoutWork,
    #[error(
        "the upper directory {upper} and the work directory {work} are on different filesystems: \
         overlayfs needs them on the same one (put the work directory next to the upper, e.g. in \
         the same parent)"
    )]
    DifferentFilesystems { upper: PathBuf, work: PathBuf },
    #[error(
        "the {what} directory {inner} is inside the lower directory {lower}: layers must not overlap"
    )]
    InsideLower {
        what: &'static str,
        inner: PathBuf,
        lower: PathBuf,
    },
    #[error(
        "the lower directory {lower} is inside the {what} directory {outer}: layers must not overlap"
    )]
    LowerInside {
        what: &'static str,
        lower: PathBuf,
        outer: PathBuf,
    },
    #[error(
        "the upper directory {upper} and the work directory {work} overlap: they must be separate \
         directories, neither inside the other"
    )]
    UpperWorkOverlap { upper: PathBuf, work: PathBuf },
    #[error(
        "the work directory {path} is not empty ({entry:?} is in it): overlayfs needs an empty work \
         directory (or one only an earlier overlay mount used); use a fresh one"
    )]
    WorkNotEmpty { path: PathBuf, entry: String },
    #[error(
        "the work directory {path} is in use by {by}: unmount that first or use another work directory"
    )]
    WorkInUse { path: PathBuf, by: String },
    #[error(
        "the upper directory {path} is in use by {by}: two overlays must not share an upper directory"
    )]
    UpperInUse { path: PathBuf, by: String },
    #[error("the path {0} cannot be given to {1}")]
    UnsafePath(PathBuf, &'static str),
    #[error(
        "a persistent mount (no `-- CMD`) needs root; as a user, run a command inside it: \
         ovl-mount ... MERGED -- CMD"
    )]
    PersistentNeedsRoot,
    #[error("--chroot needs a command: ovl-mount --chroot ... MERGED -- CMD")]
    ChrootNeedsCmd,
    #[error("--unmount needs root (a rootless mount is gone when its command ends)")]
    UnmountNeedsRoot,
    #[error("{0} is not a mount point: nothing to unmount")]
    NotMounted(PathBuf),
    #[error("unmounting {path} failed")]
    Unmount {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "user namespaces are disabled ({0}): enable them (as root: sysctl -w {1}) or run ovl-mount \
         as root"
    )]
    UsernsDisabled(String, &'static str),
    #[error(
        "no subordinate ids for {user} in /etc/subuid and /etc/subgid: add a range (as root: \
         usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {user}) or pass \
         --idmap single"
    )]
    NoSubordinateIds { user: String },
    #[error(transparent)]
    Userns(#[from] UsernsError),
    #[error("the kernel is too old for {what}: Linux {have} (need >= {need}); {hint}")]
    KernelTooOld {
        what: &'static str,
        have: String,
        need: &'static str,
        hint: &'static str,
    },
    #[error(
        "the overlay filesystem is not available in this kernel: load it (as root: modprobe overlay)"
    )]
    NoOverlayFs,
    #[error("the kernel refused the overlay mount on {merged}: {detail}")]
    KernelMount { merged: PathBuf, detail: String },
    #[error(
        "fuse-overlayfs not found (looked for {0}): install the fuse-overlayfs package, or use \
         --driver kernel"
    )]
    NoFuseOverlayfs(String),
    #[error(
        "{path} is not accessible ({reason}): fuse-overlayfs needs read and write access to it \
         (as root: chmod 0666 {path}, or add the user to the group that owns it)"
    )]
    FuseDevice { path: PathBuf, reason: String },
    #[error("fuse-overlayfs failed to mount {merged}: {detail}")]
    FuseMount { merged: PathBuf, detail: String },
    #[error(
        "no driver can mount here: kernel overlayfs is not allowed ({kernel}) and fuse-overlayfs \
         is not usable"
    )]
    NoDriver {
        kernel: String,
        #[source]
        fuse: Box<MountError>,
    },
    #[error(
        "--uidmap/--gidmap need real root (idmapped mounts take CAP_SYS_ADMIN over the layers' \
         filesystem); as a user, ovl-mount maps your /etc/subuid and /etc/subgid ranges itself"
    )]
    ShiftNeedsRoot,
    #[error(
        "--recorded-owners is for a rootless mount under a single-id map (no subordinate ids, or \
         --idmap single) with fuse-overlayfs: that is where owners are recorded in xattrs"
    )]
    RecordedOwnersNeedSingle,
    #[error("--uidmap/--gidmap work with kernel overlayfs only, not --driver fuse")]
    ShiftFuse,
    #[error("--uidmap/--gidmap must map container id 0 (the container's root) in both maps")]
    ShiftNoRoot,
    #[error(
        "the upper directory {upper} was written under another id map: its root is owned by \
         host {}:{}, but this map's root is host {}:{}. Mount it with the map it was written \
         under, or use a fresh upper", owner.0, owner.1, root.0, root.1
    )]
    UpperOtherMap {
        upper: PathBuf,
        owner: (u32, u32),
        root: (u32, u32),
    },
    #[error("cannot shift ids with an idmapped mount: {0}. {SHIFT_FALLBACK}")]
    IdmapRefused(ovl_layer::IdmapMountError),
    #[error(
        "the kernel refused the overlay mount on {merged} with idmapped lower layers: {detail} \
         (overlayfs takes idmapped layers since Linux 5.19). {SHIFT_FALLBACK}"
    )]
    ShiftedOverlayRefused { merged: PathBuf, detail: String },
    #[error("{what} failed")]
    Setup {
        what: String,
        source: std::io::Error,
    },
    #[error("cannot run {program}")]
    Command {
        program: String,
        source: std::io::Error,
    },
}

impl MountError {
    pub(crate) fn io<E: Into<std::io::Error>>(
        what: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(E) -> Self {
        let path = path.into();
        move |source| MountError::Io {
            what,
            path,
            source: source.into(),
        }
    }

    pub(crate) fn setup<E: Into<std::io::Error>>(
        what: impl Into<String>,
    ) -> impl FnOnce(E) -> Self {
        let what = what.into();
        move |source| MountError::Setup {
            what,
            source: source.into(),
        }
    }
}

/// Where an idmapped mount is refused: the copy-based shift at import.
pub(crate) const SHIFT_FALLBACK: &str = "Fall back to shifting at import time: ovl-import --uidmap \
    C:H:N --gidmap C:H:N SOURCE LOWER writes the lower in host ids, then mount it with \
    ovl-mount --uidmap C:H:N --gidmap C:H:N --shifted-lowers --lower LOWER ...";

pub type Result<T, E = MountError> = std::result::Result<T, E>;
