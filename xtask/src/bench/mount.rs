//! Mount: run one command in an overlay of the corpus rootfs (a fresh upper and work dir each
//! run) that reads every file through the merged view. ovl-mount (kernel driver, private mount
//! namespace) against the same mount made by hand with `unshare --mount` + `mount -t overlay`
//! (the baseline): what ovl-mount costs on top of the kernel's own work.

use std::fs;
use std::path::Path;

use super::Ctx;
use super::runner::{Case, Contender, Job, cmd};

/// ovl-mount's checks, namespace and re-exec must cost at most this over the bare mount.
const MAX_RATIO: f64 = 1.10;

/// Reads every regular file under the working directory (the merged view).
const READ_ALL: &str = "find . -xdev -type f -exec cat {} + > /dev/null";

pub fn case(ctx: &Ctx) -> Case {
    let rootfs = ctx.corpus.rootfs.clone();
    let rootfs2 = rootfs.clone();
    let ovl_mount = ctx.release_bin("ovl-mount");
    Case {
        name: "mount",
        contenders: vec![
            Contender::new("ovl-mount -- find|cat", move |run: &Path| {
                fs::create_dir(run.join("m"))?;
                Ok(Job::new(cmd(
                    &ovl_mount,
                    &[
                        &"--driver",
                        &"kernel",
                        &"--lower",
                        &rootfs,
                        &"--upper",
                        &run.join("u"),
                        &"--work",
                        &run.join("w"),
                        &run.join("m"),
                        &"--",
                        &"sh",
                        &"-c",
                        &READ_ALL,
                    ],
                )))
            })
            .target_ratio(MAX_RATIO),
            Contender::new("unshare + mount -t overlay", move |run: &Path| {
                for d in ["m", "u", "w"] {
                    fs::create_dir(run.join(d))?;
                }
                let script = format!(
                    "mount -t overlay overlay -o lowerdir={},upperdir={},workdir={} {} && cd {} && {READ_ALL}",
                    rootfs2.display(),
                    run.join("u").display(),
                    run.join("w").display(),
                    run.join("m").display(),
                    run.join("m").display(),
                );
                Ok(Job::new(cmd("unshare", &[&"--mount", &"sh", &"-c", &script])))
            })
            .baseline()
            .requires("unshare", "util-linux"),
        ],
    }
}
