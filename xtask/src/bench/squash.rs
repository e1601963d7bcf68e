//! Squash: fold a small change set into a copy of the corpus rootfs, in place.
//! `ovl-squash --in-place` against `cp -a` of the same lower (the baseline: what a squash that
//! copies the lower would cost at least).
//!
//! Per run, untimed: `cp -a` of the corpus into `lower/`, and an upper in the kernel's format
//! made by hand: a few new files and a directory, a changed file, a whiteout of a directory
//! tree, an opaque directory. Timed: the squash alone (mount-table scan, the moves, the syncfs,
//! the swap of the upper), and `cp -a` of the corpus alone.

use std::fs;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::Ctx;
use super::runner::{Case, Contender, Job, cmd};

/// An in-place squash of a small change set costs at most this fraction of copying the lower.
const MAX_RATIO: f64 = 0.25;

pub fn case(ctx: &Ctx) -> Case {
    let rootfs = ctx.corpus.rootfs.clone();
    let ovl_squash = ctx.release_bin("ovl-squash");
    let rootfs2 = rootfs.clone();
    Case {
        name: "squash",
        contenders: vec![
            Contender::new("ovl-squash --in-place", move |run: &Path| {
                let lower = run.join("lower");
                let upper = run.join("upper");
                copy_tree(&rootfs, &lower)?;
                small_change_set(&lower, &upper)?;
                Ok(Job::new(cmd(
                    &ovl_squash,
                    &[
                        &"--quiet",
                        &"--in-place",
                        &"--lower",
                        &lower,
                        &"--upper",
                        &upper,
                    ],
                )))
            })
            .target_ratio(MAX_RATIO),
            Contender::new("cp -a", move |run: &Path| {
                Ok(Job::new(cmd("cp", &[&"-a", &rootfs2, &run.join("copy")])))
            })
            .baseline(),
        ],
    }
}

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    let st = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .context("cp -a")?;
    if !st.success() {
        bail!("cp -a {} {} failed", from.display(), to.display());
    }
    Ok(())
}

/// The first entry (bytewise) of `dir` that `keep` accepts.
fn first(dir: &Path, keep: impl Fn(&fs::Metadata) -> bool) -> Result<Option<String>> {
    let mut names: Vec<String> = fs::read_dir(dir)?
        .flatten()
        .filter(|e| e.path().symlink_metadata().is_ok_and(|m| keep(&m)))
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    Ok(names.into_iter().next())
}

/// A kernel-format upper over `lower`: 20 new files in a new directory, a changed file in
/// etc/, a whiteout of the first directory in usr/share/, an opaque directory over the first
/// directory in usr/lib/ (or a new one).
fn small_change_set(lower: &Path, upper: &Path) -> Result<()> {
    let new = upper.join("opt/ovl-bench");
    fs::create_dir_all(&new)?;
    for i in 0..20 {
        fs::write(new.join(format!("file-{i}")), vec![b'x'; 4096 * (i + 1)])?;
    }
    fs::create_dir_all(upper.join("etc"))?;
    if let Some(f) = first(&lower.join("etc"), |m| m.is_file())? {
        let mut data = fs::read(lower.join("etc").join(&f))?;
        data.extend_from_slice(b"\n# changed by the squash bench\n");
        fs::write(upper.join("etc").join(&f), data)?;
    }
    let share = lower.join("usr/share");
    if share.is_dir()
        && let Some(d) = first(&share, |m| m.is_dir())?
    {
        fs::create_dir_all(upper.join("usr/share"))?;
        let wh = upper.join("usr/share").join(d);
        let st = Command::new("mknod")
            .arg(&wh)
            .args(["c", "0", "0"])
            .status()?;
        if !st.success() {
            bail!("mknod {} c 0 0 failed", wh.display());
        }
    }
    let lib = lower.join("usr/lib");
    let opq_name = match lib.is_dir().then(|| first(&lib, |m| m.is_dir())) {
        Some(r) => r?.unwrap_or_else(|| "ovl-bench-opaque".into()),
        None => "ovl-bench-opaque".into(),
    };
    let opq = upper.join("usr/lib").join(opq_name);
    fs::create_dir_all(&opq)?;
    fs::write(opq.join("only-this"), b"opaque\n")?;
    let st = Command::new("setfattr")
        .args(["-n", "trusted.overlay.opaque", "-v", "y"])
        .arg(&opq)
        .status()
        .context("setfattr (package attr)")?;
    if !st.success() {
        bail!(
            "setfattr trusted.overlay.opaque on {} failed",
            opq.display()
        );
    }
    Ok(())
}
