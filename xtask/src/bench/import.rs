//! Import: extract `corpus.tar.gz` into a new directory.
//! ovl-import against GNU tar (the baseline) and bsdtar.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Result;

use super::Ctx;
use super::runner::{Case, Contender, Job, cmd};

/// ovl-import's wall-time median must be at most this fraction of GNU tar's.
const MAX_RATIO: f64 = 0.70;
/// The importer streams in constant memory: its peak RSS stays below this.
const MAX_RSS_MIB: f64 = 64.0;

pub fn case(ctx: &Ctx) -> Case {
    let gz = ctx.corpus.tar_gz.clone();
    let ovl_import = ctx.release_bin("ovl-import");
    let (gz1, gz2, gz3) = (gz.clone(), gz.clone(), gz);
    Case {
        name: "import",
        contenders: vec![
            // ovl-import creates DEST itself.
            Contender::new("ovl-import", move |run: &Path| {
                let dest = run.join("dest");
                Ok(Job::new(cmd(&ovl_import, &[&"--quiet", &gz1, &dest])))
            })
            .target_ratio(MAX_RATIO)
            .target_rss_mib(MAX_RSS_MIB),
            Contender::new("GNU tar", move |run: &Path| {
                let dest = pre_created_dest(run)?;
                Ok(Job::new(cmd(
                    "tar",
                    &[
                        &"-xzf",
                        &gz2,
                        &"-C",
                        &dest,
                        &"--xattrs",
                        &"--numeric-owner",
                        &"--same-owner",
                    ],
                )))
            })
            .baseline()
            .requires("tar", "tar"),
            Contender::new("bsdtar", move |run: &Path| {
                let dest = pre_created_dest(run)?;
                Ok(Job::new(cmd(
                    "bsdtar",
                    &[
                        &"-xzpf",
                        &gz3,
                        &"-C",
                        &dest,
                        &"--xattrs",
                        &"--numeric-owner",
                        &"--same-owner",
                    ],
                )))
            })
            .requires("bsdtar", "libarchive-tools"),
        ],
    }
}

fn pre_created_dest(run: &Path) -> Result<PathBuf> {
    let dest = run.join("dest");
    fs::create_dir(&dest)?;
    Ok(dest)
}
