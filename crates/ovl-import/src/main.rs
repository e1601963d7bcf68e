//! The `ovl-import` command line: a thin shim over [`ovl_import::import`].

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use ovl_import::{ImportOptions, Source};
use ovl_layer::extract::OwnerPolicy;
use ovl_layer::userns::{self, UsernsPlan};
use ovl_layer::whiteout::XattrNs;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum OpaqueXattr {
    /// trusted.overlay.opaque as real root, user.overlay.opaque otherwise.
    Auto,
    Trusted,
    User,
}

/// Unpack an image tarball (gzip, zstd or plain; a file, `-` for stdin, or `oci:DIR[:TAG]`) into
/// a new overlay lowerdir DEST. OCI whiteouts become overlay whiteouts.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// The archive: a tar file (any compression), `-` for stdin, or `oci:DIR[:TAG]`.
    source: OsString,
    /// The lowerdir to create; it must not exist.
    dest: PathBuf,
    /// No progress bar, no summary.
    #[arg(short, long)]
    quiet: bool,
    /// The namespace of the opaque-directory xattr (`user` for a rootless `userxattr` stack).
    #[arg(long, value_enum, default_value = "auto")]
    opaque_xattr: OpaqueXattr,
}

fn main() {
    let cli = Cli::parse();
    // Rootless: do the work as container root in a user namespace mapped to our subordinate
    // ids, so image owners land as mapped host ids.
    if !rustix::process::geteuid().is_root() && !userns::in_userns() {
        std::process::exit(reexec_rootless(cli.quiet));
    }
    if let Err(e) = run(cli) {
        eprintln!("ovl-import: error: {e:#}");
        std::process::exit(1);
    }
}

fn reexec_rootless(quiet: bool) -> i32 {
    let plan = match UsernsPlan::for_current_user(false) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("ovl-import: error: reading /etc/subuid and /etc/subgid: {e}");
            return 1;
        }
    };
    if !plan.maps.has_subordinate_ids() && !quiet {
        eprintln!(
            "ovl-import: warning: no subordinate ids for this user in /etc/subuid and /etc/subgid: \
             files will belong to you and image owners are recorded in the user.rootlesscontainers xattr"
        );
    }
    match userns::reexec_self(&plan) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ovl-import: error: {e}");
            1
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let in_ns = userns::in_userns();
    let owners = if in_ns && userns::current_maps().uid.is_single() {
        OwnerPolicy::Record
    } else {
        OwnerPolicy::Preserve
    };
    let opaque_ns = match cli.opaque_xattr {
        OpaqueXattr::Auto => XattrNs::for_current_process(),
        OpaqueXattr::Trusted => XattrNs::Trusted,
        OpaqueXattr::User => XattrNs::User,
    };
    let source = Source::parse(&cli.source);
    let opts = ImportOptions {
        opaque_ns,
        owners,
        quiet: cli.quiet,
    };
    let summary = ovl_import::import(&source, &cli.dest, &opts).with_context(|| {
        format!(
            "importing {} into {}",
            cli.source.to_string_lossy(),
            cli.dest.display()
        )
    })?;
    if let Some(lower) = &summary.lowerdirs {
        println!("{lower}");
    }
    if !cli.quiet {
        eprintln!("{}", summary.line(&cli.dest));
        if summary.stats.skipped_devices > 0 {
            eprintln!(
                "ovl-import: warning: {} device nodes could not be created without privileges",
                summary.stats.skipped_devices
            );
        }
    }
    Ok(())
}
