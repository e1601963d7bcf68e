//! The `ovl-squash` command line: a thin shim over [`ovl_squash::squash`].

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use ovl_layer::userns::{self, UsernsPlan};
use ovl_squash::{SquashOptions, Target};

/// Fold an overlay's upper layer into a new lower layer: the result is the merged view, entry
/// for entry. Refuses while any of the dirs is part of a mounted overlay.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// The lowerdirs, top first, colon-separated as in `lowerdir=` (`\:` for a colon in a
    /// name); repeat the option to add more.
    #[arg(long, required = true, value_name = "DIR[:DIR...]")]
    lower: Vec<OsString>,
    /// The upperdir.
    #[arg(long, value_name = "DIR")]
    upper: PathBuf,
    /// Write the result as this new directory (the lowers and the upper are left untouched).
    #[arg(
        long,
        value_name = "NEWDIR",
        conflicts_with = "in_place",
        required_unless_present = "in_place"
    )]
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
}

/// Split `a:b\:c` into `a`, `b:c`.
fn split_lowers(args: &[OsString]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for a in args {
        let mut cur = Vec::new();
        let b = a.as_bytes();
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'\\' if b.get(i + 1) == Some(&b':') => {
                    cur.push(b':');
                    i += 1;
                }
                b':' => out.push(PathBuf::from(OsString::from_vec(std::mem::take(&mut cur)))),
                c => cur.push(c),
            }
            i += 1;
        }
        out.push(PathBuf::from(OsString::from_vec(cur)));
    }
    out.retain(|p| !p.as_os_str().is_empty());
    out
}

fn options(cli: &Cli) -> SquashOptions {
    SquashOptions {
        lowers: split_lowers(&cli.lower),
        upper: cli.upper.clone(),
        target: match &cli.output {
            Some(p) => Target::Output(p.clone()),
            None => Target::InPlace,
        },
        link: cli.link,
    }
}

fn main() {
    let cli = Cli::parse();
    if !rustix::process::geteuid().is_root() && !userns::in_userns() {
        // Rootless: look at the mount tables first, from outside: our own user namespaces'
        // mounts are readable from here, not from inside a new one. Then do the work as
        // container root mapped to our subordinate ids, as ovl-import did.
        if let Err(e) = ovl_squash::inuse::refuse_if_mounted(&ovl_squash::dirs_of(&options(&cli))) {
            eprintln!("ovl-squash: error: {e}");
            std::process::exit(1);
        }
        std::process::exit(reexec_rootless());
    }
    if let Err(e) = run(&cli) {
        eprintln!("ovl-squash: error: {e:#}");
        std::process::exit(1);
    }
}

fn reexec_rootless() -> i32 {
    let plan = match UsernsPlan::for_current_user(false) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("ovl-squash: error: reading /etc/subuid and /etc/subgid: {e}");
            return 1;
        }
    };
    match userns::reexec_self(&plan) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ovl-squash: error: {e}");
            1
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    let opts = options(cli);
    let what = match &opts.target {
        Target::Output(p) => format!("into {}", p.display()),
        Target::InPlace => "in place".to_string(),
    };
    let lowers: Vec<String> = opts
        .lowers
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let summary = ovl_squash::squash(&opts).with_context(|| {
        format!(
            "squashing upper {} onto lower {} {what}",
            opts.upper.display(),
            lowers.join(":")
        )
    })?;
    if !cli.quiet {
        eprintln!("{}", summary.line(&opts));
    }
    Ok(())
}
