//! Diff: write the corpus rootfs, taken as an upper (every entry new, as after a build from
//! scratch), as a layer. Two cases:
//! - `diff`: uncompressed, `ovl-diff -o` against `tar --xattrs --numeric-owner -cf` (the
//!   baseline) of the same tree; target at most 1.0x.
//! - `diff-gzip`: `ovl-diff --compress gzip` (libdeflate level 4, a gzip member per MiB, on
//!   every core) against `tar -c | pigz -p2` (the baseline); target at most 0.50x wall, and
//!   the layer no more than 5% larger than pigz's output. The size is checked once, untimed, before the first run;
//!   a layer over the limit makes every ovl-diff run an error in the table.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Result, bail};

use super::Ctx;
use super::runner::{Case, Contender, Job, cmd};

/// Uncompressed: at most as slow as GNU tar.
const MAX_RATIO_TAR: f64 = 1.0;
/// gzip: at most this fraction of `tar -c | pigz -p2`.
const MAX_RATIO_GZIP: f64 = 0.50;
/// gzip: the layer at most this much larger than pigz's output.
const MAX_SIZE_RATIO: f64 = 1.05;

pub fn case(ctx: &Ctx) -> Case {
    let rootfs = ctx.corpus.rootfs.clone();
    let (rootfs2, rootfs3) = (rootfs.clone(), rootfs.clone());
    let ovl_diff = ctx.release_bin("ovl-diff");
    let ovl_diff2 = ovl_diff.clone();
    Case {
        name: "diff",
        contenders: vec![
            Contender::new("ovl-diff", move |run: &Path| {
                Ok(Job::new(cmd(
                    &ovl_diff,
                    &[&"--quiet", &"-o", &run.join("layer.tar"), &rootfs],
                )))
            })
            .target_ratio(MAX_RATIO_TAR),
            // `--quiet` with no digest asked for skips the sha256; this row pays for it, as
            // `ovl-diff > layer.tar` (which prints the digest) does.
            Contender::new("ovl-diff --json (digests)", move |run: &Path| {
                Ok(Job::new(cmd(
                    &ovl_diff2,
                    &[
                        &"--quiet",
                        &"--json",
                        &run.join("layer.json"),
                        &"-o",
                        &run.join("layer.tar"),
                        &rootfs3,
                    ],
                )))
            }),
            Contender::new("tar -cf", move |run: &Path| {
                Ok(Job::new(cmd(
                    "tar",
                    &[
                        &"--xattrs",
                        &"--numeric-owner",
                        &"-cf",
                        &run.join("layer.tar"),
                        &"-C",
                        &rootfs2,
                        &".",
                    ],
                )))
            })
            .baseline()
            .requires("tar", "tar"),
        ],
    }
}

pub fn case_gzip(ctx: &Ctx) -> Case {
    let rootfs = ctx.corpus.rootfs.clone();
    let rootfs2 = rootfs.clone();
    let ovl_diff = ctx.release_bin("ovl-diff");
    let bench_dir = ctx.bench_dir.clone();
    // Checked before the first run (untimed), not when the case is built: a bench run of
    // other cases does not pay for it.
    let size_check = std::cell::OnceCell::new();
    Case {
        name: "diff-gzip",
        contenders: vec![
            Contender::new("ovl-diff --compress gzip", move |run: &Path| {
                if let Err(e) =
                    size_check.get_or_init(|| check_size(&ovl_diff, &rootfs, &bench_dir))
                {
                    bail!("{e}");
                }
                Ok(Job::new(cmd(
                    &ovl_diff,
                    &[
                        &"--quiet",
                        &"--compress",
                        &"gzip",
                        &"-o",
                        &run.join("layer.tar.gz"),
                        &rootfs,
                    ],
                )))
            })
            .target_ratio(MAX_RATIO_GZIP),
            Contender::new("tar -c | pigz -p2", move |run: &Path| {
                Ok(pigz_job(&rootfs2).stdout_to(run.join("layer.tar.gz")))
            })
            .baseline()
            .requires("tar", "tar")
            .requires("pigz", "pigz"),
        ],
    }
}

fn pigz_job(rootfs: &Path) -> Job {
    Job::new(cmd(
        "tar",
        &[
            &"--xattrs",
            &"--numeric-owner",
            &"-cf",
            &"-",
            &"-C",
            &rootfs,
            &".",
        ],
    ))
    .pipe(cmd("pigz", &[&"-p2"]))
}

/// Write both gzip layers once and compare their sizes.
fn check_size(ovl_diff: &Path, rootfs: &Path, bench_dir: &Path) -> Result<()> {
    let ours = bench_dir.join("diff-size-check.tar.gz");
    let theirs = bench_dir.join("pigz-size-check.tar.gz");
    let st = Command::new(ovl_diff)
        .args(["--quiet", "--compress", "gzip", "-o"])
        .arg(&ours)
        .arg(rootfs)
        .status()?;
    if !st.success() {
        bail!("ovl-diff --compress gzip failed on {}", rootfs.display());
    }
    let sh = format!(
        "tar --xattrs --numeric-owner -cf - -C '{}' . | pigz -p2 > '{}'",
        rootfs.display(),
        theirs.display()
    );
    if !Command::new("sh").args(["-c", &sh]).status()?.success() {
        bail!("tar | pigz failed");
    }
    let size = |p: &PathBuf| std::fs::metadata(p).map(|m| m.len());
    let (a, b) = (size(&ours)?, size(&theirs)?);
    let _ = std::fs::remove_file(&ours);
    let _ = std::fs::remove_file(&theirs);
    let ratio = a as f64 / b as f64;
    println!(
        "bench: diff-gzip sizes: ovl-diff {a} bytes, pigz -p2 {b} bytes ({ratio:.3}x, target <= {MAX_SIZE_RATIO:.2}x)"
    );
    if ratio > MAX_SIZE_RATIO {
        bail!("the gzip layer is {ratio:.3}x the size of pigz's (target <= {MAX_SIZE_RATIO:.2}x)");
    }
    Ok(())
}
