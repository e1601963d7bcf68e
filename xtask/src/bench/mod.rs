//! `cargo xtask bench`: times the ovl tools against their baselines on a real-sized corpus.
//!
//! Layout:
//! - `corpus.rs`: the corpus (debootstrap rootfs or generated tree; tar, tar.gz, extracted tree),
//!   cached under `target/bench/`; `generate.rs` makes the generated trees.
//! - `runner.rs`: [`Case`], [`Contender`], [`Job`]; runs contenders alternately in fresh
//!   directories, measures wall time and peak RSS, prints the table.
//!
//! Every case runs on tmpfs (`/dev/shm/ovl-bench/runs/`, each run deleted once measured) and on
//! disk (`target/bench/runs/`, kept). The targets judge the tmpfs ratios: ext4 on this kind of
//! VM runs at two speeds (creates are 3-10x slower for minutes after big writes or deletes), so
//! disk ratios swing between runs; they are printed beside the tmpfs ones.
//! - one file per case (`import.rs`, ...), each with `pub fn case(ctx: &Ctx) -> Case`.
//!
//! To add a case: write `bench/NAME.rs` with `pub fn case(ctx: &Ctx) -> Case` (see `import.rs`),
//! add `mod NAME;` below and `NAME::case` to `CASES`.

mod corpus;
mod diff;
mod generate;
mod idshift;
mod image;
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
    import::case_tar,
    import::case_zstd,
    import::case_oci,
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
    /// Where the runs write: tmpfs and disk (the default; targets judge tmpfs), or one of them.
    #[arg(long, value_enum, default_value_t = FsChoice::Both)]
    pub fs: FsChoice,
    /// The tmpfs directory for the tmpfs runs.
    #[arg(long, default_value = "/dev/shm/ovl-bench")]
    pub tmpfs_dir: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FsChoice {
    Both,
    Tmpfs,
    Disk,
}

/// What a case needs to build its contenders.
pub struct Ctx {
    pub corpus: Corpus,
    /// `target/release/`.
    pub release_dir: PathBuf,
    /// `target/bench/`: a case may cache inputs it prepares there (e.g. a layer to diff).
    pub bench_dir: PathBuf,
    /// The corpus as a 4-layer gzip OCI image (see `image.rs`).
    pub image: image::Image,
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
    let mut places: Vec<(&'static str, PathBuf, bool)> = Vec::new();
    if args.fs != FsChoice::Disk {
        check_tmpfs(&args.tmpfs_dir)?;
        places.push(("tmpfs", args.tmpfs_dir.join("runs"), false));
    }
    if args.fs != FsChoice::Tmpfs {
        places.push(("disk", bench_dir.join("runs"), true));
    }

    println!("bench: cargo build --release --bins");
    crate::run(
        crate::cargo()
            .args(["build", "--release", "--bins"])
            .current_dir(crate::workspace_root()),
    )?;

    let corpus = corpus::ensure(&bench_dir, args.corpus)?;
    println!("bench: {}", corpus.describe());
    let image = image::ensure(&corpus)?;
    println!("bench: {}", image.describe());

    let ctx = Ctx {
        corpus,
        release_dir: target.join("release"),
        bench_dir: bench_dir.clone(),
        image,
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

    for (_, runs_dir, _) in &places {
        if runs_dir.exists() {
            println!(
                "bench: deleting old run directories in {}",
                runs_dir.display()
            );
            fs::remove_dir_all(runs_dir)
                .with_context(|| format!("cannot remove {}", runs_dir.display()))?;
        }
        fs::create_dir_all(runs_dir)?;
    }
    runner::sync();
    if args.settle > 0 && args.fs != FsChoice::Tmpfs {
        println!(
            "bench: sync done; waiting {} s for the filesystem to settle before timing",
            args.settle
        );
        std::thread::sleep(Duration::from_secs(args.settle));
    }
    // Page-cache the inputs so the first run is not the only one to read them from disk.
    let mut inputs = vec![
        ctx.corpus.tar.clone(),
        ctx.corpus.tar_gz.clone(),
        ctx.corpus.tar_zst.clone(),
    ];
    inputs.extend(ctx.image.layers.iter().cloned());
    for input in &inputs {
        let mut f = fs::File::open(input)?;
        std::io::copy(&mut f, &mut std::io::sink())?;
    }

    let mut rows = Vec::new();
    let mut kept = Vec::new();
    for (fs_name, runs_dir, keep) in places.iter().cloned() {
        let runner = runner::Runner {
            fs: fs_name,
            runs_dir,
            keep,
            runs: args.runs,
            timeout: Duration::from_secs(args.timeout),
        };
        for case in &cases {
            println!(
                "bench: case {} on {fs_name} ({} runs per tool)",
                case.name, args.runs
            );
            rows.extend(runner.run_case(case));
        }
        if keep {
            kept.push(runner.runs_dir.display().to_string());
        }
    }
    let fs_names: Vec<&'static str> = places.iter().map(|p| p.0).collect();
    let verdict = runner::print_table(&rows, &fs_names);
    println!(
        "\nbench: {} target(s) met, {} missed, {} error(s) (targets judge {} ratios); run \
         directories kept in {}",
        verdict.pass,
        verdict.fail,
        verdict.errors,
        fs_names[0],
        if kept.is_empty() {
            "none".to_string()
        } else {
            kept.join(", ")
        }
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

/// `dir` (created if missing) must be on a tmpfs: the tmpfs ratios are the ones judged.
fn check_tmpfs(dir: &std::path::Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let c = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(dir.as_os_str()))?;
    // SAFETY: statfs is plain old data; all-zero is a valid value; c is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers to a NUL-terminated path and a local.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        bail!(
            "statfs {}: {}",
            dir.display(),
            std::io::Error::last_os_error()
        );
    }
    if st.f_type != libc::TMPFS_MAGIC {
        bail!(
            "{} is not on a tmpfs (give one with --tmpfs-dir, or --fs disk)",
            dir.display()
        );
    }
    Ok(())
}
