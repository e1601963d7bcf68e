//! Id shifting: a container in its own host id range over the corpus rootfs, either by an
//! idmapped mount (`ovl-mount --uidmap ... -- true`: no file is touched) or by copying the
//! image shifted (`ovl-import --uidmap` of the corpus tarball, the fallback, like containerd's
//! chown remap). The point of idmapped layers is that the first costs almost nothing.

use std::fs;
use std::path::Path;

use super::Ctx;
use super::runner::{Case, Contender, Job, cmd};

/// A shifted mount must cost at most this fraction of a shifted import.
const MAX_RATIO: f64 = 0.10;
const MAP: &str = "0:100000:65536";

pub fn case(ctx: &Ctx) -> Case {
    let rootfs = ctx.corpus.rootfs.clone();
    let tar_gz = ctx.corpus.tar_gz.clone();
    let ovl_mount = ctx.release_bin("ovl-mount");
    let ovl_import = ctx.release_bin("ovl-import");
    Case {
        name: "idshift",
        contenders: vec![
            Contender::new("ovl-mount --uidmap -- true", move |run: &Path| {
                fs::create_dir(run.join("m"))?;
                Ok(Job::new(cmd(
                    &ovl_mount,
                    &[
                        &"--uidmap",
                        &MAP,
                        &"--gidmap",
                        &MAP,
                        &"--lower",
                        &rootfs,
                        &"--upper",
                        &run.join("u"),
                        &"--work",
                        &run.join("w"),
                        &run.join("m"),
                        &"--",
                        &"true",
                    ],
                )))
            })
            .target_ratio(MAX_RATIO),
            Contender::new("ovl-import --uidmap", move |run: &Path| {
                Ok(Job::new(cmd(
                    &ovl_import,
                    &[
                        &"-q",
                        &"--uidmap",
                        &MAP,
                        &"--gidmap",
                        &MAP,
                        &tar_gz,
                        &run.join("shifted"),
                    ],
                )))
            })
            .baseline(),
        ],
    }
}
