//! Step 4: `ovl-squash` the box's lower and upper into a new lower; mounted alone (read-only),
//! it must be the merged view of step 2, and boot: Alpine's busybox finds bob in it.

use anyhow::Result;

use super::table::Outcome;
use super::{Run, exec, same};

pub fn step(run: &mut Run) -> Result<Outcome> {
    let squashed = &run.bx.squashed;
    let mut c = run.actor.command(run.ctx.bin("ovl-squash"));
    c.arg("--quiet")
        .arg("--lower")
        .arg(&run.bx.rootfs)
        .arg("--upper")
        .arg(&run.bx.upper)
        .arg("--output")
        .arg(squashed);
    exec::run(c, None)?;

    let mount = run.mount(squashed, false, &[]);
    let view = run.snapshot_mounted(mount, squashed, "4-squashed")?;
    let merged = run.merged.as_ref().expect("step 2 passed");
    same(
        "the squashed lower, mounted alone, is not the merged view",
        ("merged view", merged),
        ("squashed", &view),
    )?;

    let mut c = run.mount(squashed, false, &["--chroot"]);
    c.arg(squashed).args([
        "--",
        "/bin/sh",
        "-c",
        "id bob && test ! -e /etc/motd && test -u /root/hard",
    ]);
    exec::run(c, None)?;
    Ok(Outcome::Pass(format!(
        "new lower alone = the merged view ({} entries); chroot: id bob",
        view.len()
    )))
}
