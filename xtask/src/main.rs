//! `cargo xtask <command>`: project automation (see `cargo xtask --help`).

mod e2e;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "ovl project automation")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Fetch the pinned test fixtures into target/fixtures/ and verify their sha256
    /// (set OVL_FIXTURE_MIRROR=DIR to copy them from DIR instead of downloading).
    Fetch,
    /// Benchmark the ovl tools against their baselines (tar, bsdtar, ...) on a real-sized rootfs.
    Bench(xtask::bench::BenchArgs),
    /// Build the tools and install them, their man pages and shell completions under PREFIX
    /// (default /usr/local): what a package maker runs.
    Install(xtask::install::InstallArgs),
    /// Run a container's layer life end to end with the release binaries (import, mount and
    /// change, diff and apply with umoci, squash) for every driver this machine can run.
    E2e(e2e::E2eArgs),
}

fn main() {
    let cli = Cli::parse();
    let result: Result<()> = match cli.command {
        Cmd::Fetch => fetch(),
        Cmd::Bench(args) => xtask::bench::run(&args),
        Cmd::E2e(args) => e2e::run(&args),
        Cmd::Install(args) => xtask::install::run(&args),
    };
    if let Err(err) = result {
        eprintln!("xtask: error: {err:#}");
        std::process::exit(1);
    }
}

fn fetch() -> Result<()> {
    for fixture in xtask::fixtures::ALL {
        println!("{}", xtask::fixtures::fetch(fixture)?.display());
    }
    Ok(())
}
