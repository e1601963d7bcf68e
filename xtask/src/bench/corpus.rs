//! The bench corpus: a real-sized rootfs as a tree, a tar and a tar.gz, cached under
//! `target/bench/`.
//!
//! - `debootstrap`: `debootstrap --variant=minbase bookworm` (minutes; needs root and the Debian
//!   mirror), topped up with generated files under `usr/share/ovl-bench/` to [`MIN_BYTES`].
//!   Cached as `target/bench/{corpus.tar,corpus.tar.gz,rootfs/}`.
//! - `generated`: a deterministic rootfs-shaped tree (see `generate.rs`), cached as
//!   `target/bench/generated/{corpus.tar,corpus.tar.gz,rootfs/}`.
//!
//! A `corpus.stamp` file, written last, marks a complete corpus and records its size.
//! `corpus.tar.zst` (zstd -3) is made from `corpus.tar` beside it when missing.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail, ensure};

use super::generate;

/// The corpus holds at least this many bytes of file data ...
pub const MIN_BYTES: u64 = 200 * 1024 * 1024;
/// ... and at least this many entries.
pub const MIN_ENTRIES: u64 = 5_000;
/// Generated data goes a little past [`MIN_BYTES`].
const TOP_UP_TO: u64 = MIN_BYTES + 10 * 1024 * 1024;
/// Bump to rebuild cached corpora after a change in how they are made.
const VERSION: u32 = 1;
const SEED: u64 = 0x6f76_6c2d_6265_6e63;

const SUITE: &str = "bookworm";
const DEBIAN_MIRROR: &str = "http://deb.debian.org/debian";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CorpusChoice {
    /// debootstrap when it works here, else generated.
    Auto,
    /// A debootstrap minbase bookworm (an error if it cannot be built).
    Debootstrap,
    /// A generated rootfs-shaped tree.
    Generated,
}

#[derive(Debug, Clone)]
pub struct Corpus {
    /// "debootstrap" or "generated".
    pub kind: String,
    /// The extracted tree.
    pub rootfs: PathBuf,
    /// `tar --xattrs --numeric-owner -cf` of the tree.
    pub tar: PathBuf,
    /// `corpus.tar` compressed with gzip -6 (or pigz -6).
    pub tar_gz: PathBuf,
    /// `corpus.tar` compressed with zstd -3 (made by [`ensure`] when missing).
    pub tar_zst: PathBuf,
    /// Bytes of file data (hardlinked files counted once).
    pub bytes: u64,
    /// Entries in the tree, not counting its root.
    pub entries: u64,
}

impl Corpus {
    fn in_dir(dir: &Path, kind: &str, bytes: u64, entries: u64) -> Corpus {
        Corpus {
            kind: kind.to_string(),
            rootfs: dir.join("rootfs"),
            tar: dir.join("corpus.tar"),
            tar_gz: dir.join("corpus.tar.gz"),
            tar_zst: dir.join("corpus.tar.zst"),
            bytes,
            entries,
        }
    }

    pub fn describe(&self) -> String {
        let size = |p: &Path| fs::metadata(p).map(|m| m.len()).unwrap_or(0) as f64 / MIB;
        format!(
            "{} corpus: {:.1} MiB of file data in {} entries; corpus.tar {:.1} MiB, \
             corpus.tar.gz {:.1} MiB, corpus.tar.zst {:.1} MiB ({})",
            self.kind,
            self.bytes as f64 / MIB,
            self.entries,
            size(&self.tar),
            size(&self.tar_gz),
            size(&self.tar_zst),
            self.tar_gz.display()
        )
    }
}

const MIB: f64 = 1024.0 * 1024.0;

/// The cached corpus of the chosen kind, built first if needed, with its zstd tar.
pub fn ensure(bench_dir: &Path, choice: CorpusChoice) -> Result<Corpus> {
    let corpus = ensure_tree(bench_dir, choice)?;
    if !corpus.tar_zst.is_file() {
        println!(
            "bench: compressing with zstd -3: {}",
            corpus.tar_zst.display()
        );
        let tmp = corpus.tar_zst.with_extension("zst.tmp");
        crate::run(
            Command::new("zstd")
                .args(["-3", "-q", "-f", "-T0", "-o"])
                .arg(&tmp)
                .arg(&corpus.tar),
        )
        .context("zstd (apt-get install zstd)")?;
        fs::rename(&tmp, &corpus.tar_zst)?;
    }
    Ok(corpus)
}

fn ensure_tree(bench_dir: &Path, choice: CorpusChoice) -> Result<Corpus> {
    let deb_dir = bench_dir.to_path_buf();
    let gen_dir = bench_dir.join("generated");
    if choice != CorpusChoice::Generated {
        if let Some(c) = cached(&deb_dir, "debootstrap") {
            return Ok(c);
        }
        match debootstrap_unusable() {
            None => match build(&deb_dir, "debootstrap") {
                Ok(c) => return Ok(c),
                Err(err) if choice == CorpusChoice::Auto => {
                    eprintln!("bench: debootstrap corpus failed, using a generated one: {err:#}")
                }
                Err(err) => return Err(err),
            },
            Some(why) if choice == CorpusChoice::Auto => {
                println!("bench: {why}: using a generated corpus")
            }
            Some(why) => bail!("cannot build the debootstrap corpus: {why}"),
        }
    }
    if let Some(c) = cached(&gen_dir, "generated") {
        return Ok(c);
    }
    build(&gen_dir, "generated")
}

fn debootstrap_unusable() -> Option<String> {
    if crate::which("debootstrap").is_none() {
        return Some("debootstrap is not installed (apt-get install debootstrap)".to_string());
    }
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("debootstrap needs root".to_string());
    }
    None
}

/// The complete corpus of this kind in `dir`, if its stamp says so.
fn cached(dir: &Path, kind: &str) -> Option<Corpus> {
    let stamp = fs::read_to_string(dir.join("corpus.stamp")).ok()?;
    let field = |key: &str| {
        stamp
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .map(str::to_string)
    };
    if field("version")? != VERSION.to_string() || field("kind")? != kind {
        return None;
    }
    let corpus = Corpus::in_dir(
        dir,
        kind,
        field("bytes")?.parse().ok()?,
        field("entries")?.parse().ok()?,
    );
    (corpus.rootfs.is_dir() && corpus.tar.is_file() && corpus.tar_gz.is_file()).then_some(corpus)
}

fn build(dir: &Path, kind: &str) -> Result<Corpus> {
    let final_ = Corpus::in_dir(dir, kind, 0, 0);
    let stamp = dir.join("corpus.stamp");
    let work = dir.join("rootfs.tmp");
    for old in [&stamp, &final_.tar, &final_.tar_gz] {
        if old.exists() {
            fs::remove_file(old).with_context(|| format!("cannot remove {}", old.display()))?;
        }
    }
    for old in [&work, &final_.rootfs] {
        if old.exists() {
            fs::remove_dir_all(old).with_context(|| format!("cannot remove {}", old.display()))?;
        }
    }
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;

    if kind == "debootstrap" {
        let log = dir.join("debootstrap.log");
        println!(
            "bench: building the corpus: debootstrap --variant=minbase {SUITE} (takes minutes; \
             log: {})",
            log.display()
        );
        let logf = fs::File::create(&log)?;
        let status = Command::new("debootstrap")
            .args(["--variant=minbase", SUITE])
            .arg(&work)
            .arg(DEBIAN_MIRROR)
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .status()
            .context("cannot run debootstrap")?;
        if !status.success() {
            let text = fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(10).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            let _ = fs::remove_dir_all(&work);
            bail!(
                "debootstrap failed ({status}); end of {}:\n{}",
                log.display(),
                tail.join("\n")
            );
        }
        let (bytes, _) = measure_tree(&work)?;
        if bytes < MIN_BYTES {
            let extra = TOP_UP_TO - bytes;
            println!(
                "bench: topping the debootstrap tree up with {:.1} MiB of generated files under \
                 usr/share/ovl-bench/",
                extra as f64 / MIB
            );
            generate::generate(&work.join("usr/share/ovl-bench"), extra, SEED, false)?;
        }
    } else {
        println!(
            "bench: generating a rootfs-shaped corpus ({:.0} MiB)",
            TOP_UP_TO as f64 / MIB
        );
        generate::generate(&work, TOP_UP_TO, SEED, true)?;
    }

    let (bytes, entries) = measure_tree(&work)?;
    ensure!(
        bytes >= MIN_BYTES && entries >= MIN_ENTRIES,
        "the {kind} corpus is too small: {bytes} bytes in {entries} entries (want at least \
         {MIN_BYTES} bytes, {MIN_ENTRIES} entries)"
    );

    println!("bench: packing {}", final_.tar.display());
    let tar_tmp = dir.join("corpus.tar.tmp");
    crate::run(
        Command::new("tar")
            .args(["--xattrs", "--numeric-owner", "--sort=name", "-cf"])
            .arg(&tar_tmp)
            .arg("-C")
            .arg(&work)
            .arg("."),
    )?;
    let gz_tmp = dir.join("corpus.tar.gz.tmp");
    let gzip = if crate::which("pigz").is_some() {
        "pigz"
    } else {
        "gzip"
    };
    println!(
        "bench: compressing with {gzip} -6: {}",
        final_.tar_gz.display()
    );
    let status = Command::new(gzip)
        .args(["-6", "-c"])
        .arg(&tar_tmp)
        .stdout(fs::File::create(&gz_tmp)?)
        .status()
        .with_context(|| format!("cannot run {gzip}"))?;
    ensure!(status.success(), "{gzip} -6 failed ({status})");

    fs::rename(&tar_tmp, &final_.tar)?;
    fs::rename(&gz_tmp, &final_.tar_gz)?;
    fs::rename(&work, &final_.rootfs)?;
    fs::write(
        &stamp,
        format!("version={VERSION}\nkind={kind}\nbytes={bytes}\nentries={entries}\n"),
    )?;
    Ok(Corpus {
        bytes,
        entries,
        ..final_
    })
}

/// (bytes of file data with hardlinks counted once, entries below `root`).
fn measure_tree(root: &Path) -> Result<(u64, u64)> {
    fn walk(
        dir: &Path,
        seen: &mut std::collections::HashSet<(u64, u64)>,
        acc: &mut (u64, u64),
    ) -> Result<()> {
        for entry in fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
            let entry = entry?;
            let meta = entry.metadata()?;
            acc.1 += 1;
            if meta.is_dir() {
                walk(&entry.path(), seen, acc)?;
            } else if meta.is_file() && (meta.nlink() == 1 || seen.insert((meta.dev(), meta.ino())))
            {
                acc.0 += meta.len();
            }
        }
        Ok(())
    }
    let mut acc = (0, 0);
    walk(root, &mut Default::default(), &mut acc)?;
    Ok(acc)
}
