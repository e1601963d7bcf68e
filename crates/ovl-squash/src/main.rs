//! The `ovl-squash` command line: a thin shim over [`ovl_squash::squash`].

#![forbid(unsafe_code)]

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use ovl_layer::{IdRange, Identity, Reexec};
use ovl_squash::{SquashOptions, Target};

/// Fold an overlay's upper layer into a new lower layer: the result is the merged view, entry
/// for entry. Refuses while any of the dirs is part of a mounted overlay.
#[derive(Debug, Parser)]
#[command(
    version,
    override_usage = "ovl-squash [OPTIONS] --lower DIR[:DIR...] --upper DIR (--output NEWDIR | --in-place)",
    group(clap::ArgGroup::new("target").required(true).args(["output", "in_place"]))
)]
struct Cli {
    /// The lowerdirs, top first, colon-separated as in `lowerdir=` (`\:` for a colon in a
    /// name, `\\` for a backslash); repeat the option to add more.
    #[arg(long, required = true, value_name = "DIR[:DIR...]")]
    lower: Vec<OsString>,
    /// The upperdir.
    #[arg(long, value_name = "DIR")]
    upper: PathBuf,
    /// Write the result as this new directory (the lowers and the upper are left untouched).
    #[arg(long, value_name = "NEWDIR")]
    output: Option<PathBuf>,
    /// Make the (single) lower the result and empty the upper; safe to re-run after a crash.
    #[arg(long)]
    in_place: bool,
    /// With --output: hardlink unchanged lower files (when the filesystem has no reflinks)
    /// instead of copying them. The new lower then shares those inodes with the old one.
    #[arg(long)]
    link: bool,
    /// No progress, no summary.
    #[arg(short, long)]
    quiet: bool,
    /// The uid map the upper was written under (`ovl-mount --uidmap`): its host ids are folded
    /// in as the container ids of the map, so the lower stays in container ids (a lower that
    /// holds host ids itself, imported with `ovl-import --uidmap`, stays in host ids); a host
    /// id outside the map is an error naming the path. Repeatable; alone, it maps gids too.
    /// Real root only.
    #[arg(long, value_name = "CONTAINER:HOST:COUNT")]
    uidmap: Vec<IdRange>,
    /// The gid map the upper was written under, as --uidmap.
    #[arg(long, value_name = "CONTAINER:HOST:COUNT")]
    gidmap: Vec<IdRange>,
}

fn options(cli: &Cli) -> anyhow::Result<SquashOptions> {
    Ok(SquashOptions {
        lowers: ovl_layer::parse_lower_args(&cli.lower).context("--lower")?,
        upper: cli.upper.clone(),
        target: match &cli.output {
            Some(p) => Target::Output(p.clone()),
            None => Target::InPlace,
        },
        link: cli.link,
        ids: ovl_layer::shift_maps(&cli.uidmap, &cli.gidmap)?,
    })
}

fn main() {
    let cli: Cli = ovl_cli::parse();
    let opts = options(&cli).unwrap_or_else(|e| fail(&e));
    let why = "the upper holds host ids of the map";
    if let Err(e) = Identity::current().check_explicit_maps("ovl-squash", opts.ids.is_some(), why) {
        fail(&anyhow::anyhow!(e));
    }
    if Identity::current().needs_reexec() {
        // Rootless: look at the mount tables first, from outside: our own user namespaces'
        // mounts are readable from here, not from inside a new one. Then do the work as
        // container root mapped to our subordinate ids, as ovl-import did.
        if let Err(e) = ovl_squash::refuse_if_mounted(&ovl_squash::dirs_of(&opts)) {
            fail(&e.into());
        }
    }
    Reexec::new("ovl-squash").root_or_exit();
    if let Err(e) = run(&cli, opts) {
        fail(&e);
    }
}

fn fail(e: &anyhow::Error) -> ! {
    eprintln!("ovl-squash: error: {e:#}");
    std::process::exit(1);
}

fn run(cli: &Cli, opts: SquashOptions) -> anyhow::Result<()> {
    let what = match &opts.target {
        Target::Output(p) => format!("into {}", p.display()),
        Target::InPlace => "in place".to_string(),
    };
    let lowers = ovl_layer::join_lowers(&opts.lowers);
    let summary = ovl_squash::squash(&opts).with_context(|| {
        format!(
            "squashing upper {} onto lower {} {what}",
            opts.upper.display(),
            lowers.to_string_lossy()
        )
    })?;
    if !cli.quiet {
        eprintln!("{}", summary.line(&opts));
    }
    Ok(())
}
