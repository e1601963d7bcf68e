//! Import: extract the corpus into a new directory, ovl-import against GNU tar (the baseline).
//! - `import`: `corpus.tar.gz`; bsdtar beside them.
//! - `import-tar`: the plain `corpus.tar` against `tar -xf`.
//! - `import-zstd`: `corpus.tar.zst` against `tar --zstd -xf`.
//! - `import-oci`: the corpus as a 4-layer gzip OCI image (`image.rs`): `ovl-import oci:DIR`
//!   (one lowerdir per layer, layers imported concurrently) against `tar -xzf` of each layer in
//!   turn into its own directory; `ovl-import --jobs 1` beside them.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Result;

use super::Ctx;
use super::runner::{Case, Contender, Job, cmd};

/// gzip: ovl-import's wall-time median at most this fraction of GNU tar's.
const MAX_RATIO_GZIP: f64 = 0.45;
/// plain tar: at most this fraction of `tar -xf`.
const MAX_RATIO_TAR: f64 = 0.70;
/// zstd: not slower than `tar --zstd -xf`.
const MAX_RATIO_ZSTD: f64 = 1.00;
/// A 4-layer gzip image: at most this fraction of `tar -xzf` of each layer in turn.
const MAX_RATIO_OCI: f64 = 0.35;
/// The importer streams in constant memory: its peak RSS stays below this.
const MAX_RSS_MIB: f64 = 64.0;

/// GNU tar's options that keep what ovl-import keeps.
const TAR_KEEP: [&str; 3] = ["--xattrs", "--numeric-owner", "--same-owner"];

fn ovl_import(ctx: &Ctx, tool: &'static str, input: PathBuf) -> Contender {
    let bin = ctx.release_bin("ovl-import");
    // ovl-import creates DEST itself.
    Contender::new(tool, move |run: &Path| {
        Ok(Job::new(cmd(
            &bin,
            &[&"--quiet", &input, &run.join("dest")],
        )))
    })
}

fn gnu_tar(tool: &'static str, extract: &'static str, input: PathBuf) -> Contender {
    Contender::new(tool, move |run: &Path| {
        let dest = pre_created_dest(run)?;
        let mut c = cmd("tar", &[&extract, &input, &"-C", &dest]);
        c.args(TAR_KEEP);
        Ok(Job::new(c))
    })
    .baseline()
    .requires("tar", "tar")
}

pub fn case(ctx: &Ctx) -> Case {
    let gz = ctx.corpus.tar_gz.clone();
    Case {
        name: "import",
        contenders: vec![
            ovl_import(ctx, "ovl-import", gz.clone())
                .target_ratio(MAX_RATIO_GZIP)
                .target_rss_mib(MAX_RSS_MIB),
            gnu_tar("GNU tar -xzf", "-xzf", gz.clone()),
            Contender::new("bsdtar", move |run: &Path| {
                let dest = pre_created_dest(run)?;
                let mut c = cmd("bsdtar", &[&"-xzpf", &gz, &"-C", &dest]);
                c.args(TAR_KEEP);
                Ok(Job::new(c))
            })
            .requires("bsdtar", "libarchive-tools"),
        ],
    }
}

pub fn case_tar(ctx: &Ctx) -> Case {
    Case {
        name: "import-tar",
        contenders: vec![
            ovl_import(ctx, "ovl-import", ctx.corpus.tar.clone())
                .target_ratio(MAX_RATIO_TAR)
                .target_rss_mib(MAX_RSS_MIB),
            gnu_tar("GNU tar -xf", "-xf", ctx.corpus.tar.clone()),
        ],
    }
}

pub fn case_zstd(ctx: &Ctx) -> Case {
    let zst = ctx.corpus.tar_zst.clone();
    Case {
        name: "import-zstd",
        contenders: vec![
            ovl_import(ctx, "ovl-import", zst.clone())
                .target_ratio(MAX_RATIO_ZSTD)
                .target_rss_mib(MAX_RSS_MIB),
            Contender::new("GNU tar --zstd -xf", move |run: &Path| {
                let dest = pre_created_dest(run)?;
                let mut c = cmd("tar", &[&"--zstd", &"-xf", &zst, &"-C", &dest]);
                c.args(TAR_KEEP);
                Ok(Job::new(c))
            })
            .baseline()
            .requires("tar", "tar")
            .requires("zstd", "zstd"),
        ],
    }
}

pub fn case_oci(ctx: &Ctx) -> Case {
    let source = {
        let mut s = std::ffi::OsString::from("oci:");
        s.push(&ctx.image.dir);
        s.push(":");
        s.push(super::image::TAG);
        s
    };
    let bin = ctx.release_bin("ovl-import");
    let (source2, bin2) = (source.clone(), bin.clone());
    let layers = ctx.image.layers.clone();
    Case {
        name: "import-oci",
        contenders: vec![
            Contender::new("ovl-import oci:", move |run: &Path| {
                Ok(Job::new(cmd(
                    &bin,
                    &[&"--quiet", &source, &run.join("dest")],
                )))
            })
            .target_ratio(MAX_RATIO_OCI)
            .target_rss_mib(MAX_RSS_MIB),
            Contender::new("ovl-import --jobs 1 oci:", move |run: &Path| {
                Ok(Job::new(cmd(
                    &bin2,
                    &[&"--quiet", &"--jobs", &"1", &source2, &run.join("dest")],
                )))
            }),
            Contender::new("GNU tar -xzf each layer", move |run: &Path| {
                // One directory per layer, made untimed; one shell runs the tars in turn.
                let dest = pre_created_dest(run)?;
                let mut script = String::from("set -e");
                for (i, layer) in layers.iter().enumerate() {
                    fs::create_dir(dest.join(i.to_string()))?;
                    script.push_str(&format!(
                        "; tar -xzf '{}' -C '{}' {}",
                        layer.display(),
                        dest.join(i.to_string()).display(),
                        TAR_KEEP.join(" ")
                    ));
                }
                let mut c = Command::new("sh");
                c.args(["-c", &script]);
                Ok(Job::new(c))
            })
            .baseline()
            .requires("tar", "tar"),
        ],
    }
}

fn pre_created_dest(run: &Path) -> Result<PathBuf> {
    let dest = run.join("dest");
    fs::create_dir(&dest)?;
    Ok(dest)
}
