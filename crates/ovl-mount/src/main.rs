//! ovl-mount: the command line. All logic is in the library.

#![forbid(unsafe_code)]

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::Context;
use ovl_layer::IdRange;
use ovl_mount::{DriverChoice, IdmapChoice, MountSpec};

/// Mount image layers with overlayfs (kernel or fuse-overlayfs), as root or rootless.
///
/// Without CMD (root only) the mount stays until `ovl-mount --unmount MERGED`. With `-- CMD`
/// the overlay lives in a private mount namespace for as long as CMD runs, CMD runs in MERGED,
/// and its exit status is returned. Without --upper the mount is read-only.
#[derive(Debug, clap::Parser)]
#[command(name = "ovl-mount", version)]
struct Cli {
    /// Lower directories, top first, separated by `:` as in `lowerdir=` (`\:` for a colon in a
    /// name, `\\` for a backslash); may be repeated.
    #[arg(long, value_name = "DIR[:DIR...]", required_unless_present = "unmount")]
    lower: Vec<OsString>,
    /// Upper (writable) directory; made when missing.
    #[arg(long, value_name = "DIR", requires = "work")]
    upper: Option<PathBuf>,
    /// Work directory: empty, on the same filesystem as --upper; made when missing.
    #[arg(long, value_name = "DIR", requires = "upper")]
    work: Option<PathBuf>,
    /// auto: kernel overlayfs as root; as a user kernel overlayfs with userxattr in a user
    /// namespace when the kernel allows it, else fuse-overlayfs.
    #[arg(long, default_value = "auto", value_name = "auto|kernel|fuse")]
    driver: DriverChoice,
    /// Rootless id map: auto (subordinate ids if any, else a single id, with a warning),
    /// subids (or fail), single.
    #[arg(long, default_value = "auto", value_name = "auto|subids|single")]
    idmap: IdmapChoice,
    /// Shift user ids (real root): every lower is seen through an idmapped mount where
    /// container ids CONTAINER..CONTAINER+COUNT are host ids HOST..HOST+COUNT (the lower on
    /// disk is unchanged), and CMD runs in a new user namespace with that map. Without CMD the
    /// mount stays, showing host ids, for a runtime to enter its own user namespace over it.
    /// Repeatable; alone, it maps gids too.
    #[arg(long, value_name = "CONTAINER:HOST:COUNT")]
    uidmap: Vec<IdRange>,
    /// Shift group ids, as --uidmap does for user ids.
    #[arg(long, value_name = "CONTAINER:HOST:COUNT")]
    gidmap: Vec<IdRange>,
    /// With --uidmap/--gidmap: the lowers already hold host ids (imported with
    /// `ovl-import --uidmap`), so they are not idmapped.
    #[arg(long)]
    shifted_lowers: bool,
    /// Rootless without subordinate ids: show the owners and modes ovl-import recorded
    /// (fuse-overlayfs with xattr_permissions=2; inside, ids other than 0 read as nobody, and
    /// fuse-overlayfs 1.10 records a copied-up file as mode 0755). Default: a kernel overlay
    /// that shows every file as root and keeps the records for ovl-diff.
    #[arg(long)]
    recorded_owners: bool,
    /// Run CMD with MERGED as its root (with /proc and a minimal /dev), with a clean
    /// environment: the standard PATH, HOME=/root, and only TERM, LANG, LC_* and TZ kept.
    #[arg(long)]
    chroot: bool,
    /// Unmount a persistent mount at MERGED.
    #[arg(long, conflicts_with_all = ["lower", "upper", "work", "chroot"])]
    unmount: bool,
    /// Say which driver mounts and why, and how long it took.
    #[arg(short, long)]
    verbose: bool,
    /// The fuse-overlayfs program to run (default: from PATH).
    #[arg(long, value_name = "PATH")]
    fuse_overlayfs: Option<PathBuf>,
    /// Use mount(2) with one option page even where `lowerdir+` exists (tests the fallback).
    #[arg(long, hide = true)]
    legacy_mount_api: bool,
    /// The fuse device to check access to (tests).
    #[arg(long, hide = true, value_name = "PATH")]
    fuse_device: Option<PathBuf>,
    /// The merged view (the mount point); it must exist.
    #[arg(value_name = "MERGED")]
    merged: PathBuf,
    /// The command to run inside, after `--`.
    #[arg(last = true, value_name = "CMD")]
    command: Vec<OsString>,
}

fn main() {
    let cli: Cli = ovl_cli::parse();
    match real_main(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("ovl-mount: error: {e:#}");
            std::process::exit(ovl_mount::EXIT_FAILURE);
        }
    }
}

fn real_main(cli: Cli) -> anyhow::Result<i32> {
    if cli.unmount {
        ovl_mount::unmount(&cli.merged)
            .with_context(|| format!("unmounting {}", cli.merged.display()))?;
        println!("unmounted {}", cli.merged.display());
        return Ok(0);
    }
    let spec = MountSpec {
        lowers: MountSpec::parse_lowers(&cli.lower)?,
        upper: cli.upper,
        work: cli.work,
        merged: cli.merged,
        driver: cli.driver,
        idmap: cli.idmap,
        chroot: cli.chroot,
        command: cli.command,
        verbose: cli.verbose,
        legacy_mount_api: cli.legacy_mount_api,
        fuse_program: cli.fuse_overlayfs,
        fuse_device: cli.fuse_device,
        shift: ovl_layer::shift_maps(&cli.uidmap, &cli.gidmap)?,
        shifted_lowers: cli.shifted_lowers,
        recorded_owners: cli.recorded_owners,
    };
    if cli.shifted_lowers && spec.shift.is_none() {
        anyhow::bail!("--shifted-lowers goes with --uidmap/--gidmap");
    }
    let merged = spec.merged.display().to_string();
    ovl_mount::run(&spec).with_context(|| format!("mounting on {merged}"))
}
