//! The `ovl-import` command line: a thin shim over [`ovl_import::import`].

#![forbid(unsafe_code)]

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use ovl_cli::{Bar, Unit};
use ovl_import::{ImportOptions, Source};
use ovl_layer::{IdRange, Identity, Reexec, XattrNs};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum OpaqueXattr {
    /// trusted.overlay.opaque as real root, user.overlay.opaque otherwise.
    Auto,
    Trusted,
    User,
}

/// Unpack an image tarball (gzip, zstd, xz, bzip2 or plain; a file, `-` for stdin, or `oci:DIR[:TAG]`) into
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
    /// Import already shifted (real root): an owner with container uid N lands as the host uid
    /// the map gives N (CONTAINER..+COUNT -> HOST..+COUNT). Repeatable; alone, it maps gids
    /// too. For kernels or filesystems without idmapped layers: mount the result with
    /// `ovl-mount --uidmap ... --shifted-lowers`.
    #[arg(long, value_name = "CONTAINER:HOST:COUNT")]
    uidmap: Vec<IdRange>,
    /// Shift group ids, as --uidmap does for user ids.
    #[arg(long, value_name = "CONTAINER:HOST:COUNT")]
    gidmap: Vec<IdRange>,
    /// Layers of an `oci:` image extracted at once [default: the number of cores]. The result
    /// is the same for any N.
    #[arg(short, long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    jobs: Option<u32>,
    /// Threads writing file content within a layer (1: the reading thread writes everything).
    /// The tree is the same with any number. Default: the number of cores for a plain tar
    /// file, the cores minus 2 (at least 1) for a compressed file or stdin.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=256))]
    writers: Option<u32>,
}

fn main() {
    let cli: Cli = ovl_cli::parse();
    let given = !cli.uidmap.is_empty() || !cli.gidmap.is_empty();
    // Rootless: do the work as container root in a user namespace mapped to our subordinate
    // ids, so image owners land as mapped host ids.
    let identity = Reexec::new("ovl-import")
        .explicit_maps(given, "they chown to any host id")
        .warn_without_subids(!cli.quiet)
        .root_or_exit();
    if let Err(e) = run(cli, &identity) {
        eprintln!("ovl-import: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli, identity: &Identity) -> anyhow::Result<()> {
    let owners = identity.owner_policy();
    let opaque_ns = match cli.opaque_xattr {
        OpaqueXattr::Auto => identity.xattr_ns(),
        OpaqueXattr::Trusted => XattrNs::Trusted,
        OpaqueXattr::User => XattrNs::User,
    };
    let source = Source::parse(&cli.source);
    let progress = ovl_cli::progress_wanted(cli.quiet).then(ovl_layer::Progress::new);
    let bar = progress.clone().map(|p| {
        Bar::start("import", Unit::Bytes, cli.quiet, move || {
            (p.done(), p.total())
        })
    });
    let opts = ImportOptions {
        opaque_ns,
        owners,
        progress,
        shift: ovl_layer::shift_maps(&cli.uidmap, &cli.gidmap)?,
        jobs: cli
            .jobs
            .map_or_else(ovl_import::default_jobs, |n| n as usize),
        writers: cli.writers.map(|n| n as usize),
    };
    let result = ovl_import::import(&source, &cli.dest, &opts);
    drop(bar);
    let summary = result.with_context(|| {
        format!(
            "importing {} into {}",
            cli.source.to_string_lossy(),
            cli.dest.display()
        )
    })?;
    if let Some(lower) = &summary.lowerdirs {
        // Bytes, not text: a layer path need not be UTF-8.
        let mut out = std::io::stdout().lock();
        out.write_all(lower.as_bytes())
            .and_then(|()| out.write_all(b"\n"))
            .context("writing the lowerdir list to stdout")?;
    }
    // What was skipped is said even with --quiet: the tree is not the whole archive.
    for note in &summary.stats.notes {
        eprintln!("ovl-import: warning: {note}");
    }
    if summary.stats.skipped_entries > summary.stats.notes.len() as u64 {
        eprintln!(
            "ovl-import: warning: {} more entries skipped",
            summary.stats.skipped_entries - summary.stats.notes.len() as u64
        );
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
