//! `cargo xtask bench`: times the ovl tools against their baselines on a real-sized corpus.
//!
//! Layout:
//! - `corpus.rs`: the corpus (debootstrap rootfs or generated tree; tar, tar.gz, extracted tree),
//!   cached under `target/bench/`; `generate.rs` makes the generated trees.
//! - `runner.rs`: [`Case`], [`Contender`], [`Job`]; runs contenders alternately in fresh
//!   directories under `target/bench/runs/`, measures wall time and peak RSS, prints the table.
//! - one file per case (`import.rs`, ...), each with `pub fn case(ctx: &Ctx) -> Case`.
//!
//! To add a case: write `bench/NAME.rs` with `pub fn case(ctx: &Ctx) -> Case` (see `import.rs`),
//! add `mod NAME;` below and `NAME::case` to [`CASES`].

mod corpus;
mod diff;
mod generate;
mod idshift;
mod import;
mod mount;
pub mod runner;
mod squash;

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};

pub use corpus::{Corpus, CorpusChoice};
pub use runner::{Case, Contender, Job};

/// Every case, in the order they run.
const CASES: &[fn(&Ctx) -> Case] = &[
    import::case,
    mount::case,
    squash::case,
    diff::case,
    diff::case_gzip,
    idshift::case,
];

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Runs per tool (alternating between the tools).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Which corpus to use.
    #[arg(long, value_enum, default_value_t = CorpusChoice::Auto)]
    pub corpus: CorpusChoice,
    /// Run only these cases (repeatable); all by default.
    #[arg(long = "case", value_name = "NAME")]
    pub cases: Vec<String>,
    /// Seconds to wait after deleting old run directories and `sync` before timing (ext4 here
    /// creates files slowly for a while after a large delete).
    #[arg(long, default_value_t = 20)]
    pub settle: u64,
    /// Kill a run that takes longer than this many seconds (reported as an error).
    #[arg(long, default_value_t = 900)]
    pub timeout: u64,
}

/// What a case needs to build its contenders.
pub struct Ctx {
    pub corpus: Corpus,
    /// `target/release/`.
    pub release_dir: PathBuf,
    /// `target/bench/`: a case may cache inputs it prepares there (e.g. a layer to diff).
    pub bench_dir: PathBuf,
}

impl Ctx {
    /// A binary built by `cargo build --release --bins`.
    pub fn release_bin(&self, name: &str) -> PathBuf {
        self.release_dir.join(name)
    }
}

pub fn run(args: &BenchArgs) -> Result<()> {
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let target = crate::target_dir();
    let bench_dir = target.join("bench");
    let runs_dir = bench_dir.join("runs");

    println!("bench: cargo build --release --bins");
    crate::run(
        crate::cargo()
            .args(["build", "--release", "--bins"])
            .current_dir(crate::workspace_root()),
    )?;

    let corpus = corpus::ensure(&bench_dir, args.corpus)?;
    println!("bench: {}", corpus.describe());

    let ctx = Ctx {
        corpus,
        release_dir: target.join("release"),
        bench_dir: bench_dir.clone(),
    };
    let mut cases: Vec<Case> = CASES.iter().map(|make| make(&ctx)).collect();
    if !args.cases.is_empty() {
        for name in &args.cases {
            if !cases.iter().any(|c| c.name == name) {
                let known: Vec<&str> = cases.iter().map(|c| c.name).collect();
                bail!("no bench case {name:?} (cases: {})", known.join(", "));
            }
        }
        cases.retain(|c| args.cases.iter().any(|n| n == c.name));
    }

    if runs_dir.exists() {
        println!(
            "bench: deleting old run directories in {}",
            runs_dir.display()
        );
        fs::remove_dir_all(&runs_dir)
            .with_context(|| format!("cannot remove {}", runs_dir.display()))?;
    }
    fs::create_dir_all(&runs_dir)?;
    runner::sync();
    if args.settle > 0 {
        println!(
            "bench: sync done; waiting {} s for the filesystem to settle before timing",
            args.settle
        );
        std::thread::sleep(Duration::from_secs(args.settle));
    }
    // Page-cache the inputs so the first run is not the only one to read them from disk.
    for input in [&ctx.corpus.tar, &ctx.corpus.tar_gz] {
        let mut f = fs::File::open(input)?;
        std::io::copy(&mut f, &mut std::io::sink())?;
    }

    let runner = runner::Runner {
        runs_dir,
        runs: args.runs,
        timeout: Duration::from_secs(args.timeout),
    };
    let mut rows = Vec::new();
    for case in &cases {
        println!("bench: case {} ({} runs per tool)", case.name, args.runs);
        rows.extend(runner.run_case(case));
    }
    let verdict = runner::print_table(&rows);
    println!(
        "\nbench: {} target(s) met, {} missed, {} error(s); run directories kept in {}",
        verdict.pass,
        verdict.fail,
        verdict.errors,
        runner.runs_dir.display()
    );
    if verdict.fail > 0 || verdict.errors > 0 {
        bail!(
            "{} target(s) missed, {} error(s)",
            verdict.fail,
            verdict.errors
        );
    }
    Ok(())
}
