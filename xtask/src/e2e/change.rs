//! Step 2: `ovl-mount --chroot` the box and change it with Alpine's own busybox; then snapshot
//! the merged view and check every change is in it, and that the lower was left alone.

use anyhow::{Result, bail};
use ovl_tests::snapshot::{Entry, Snapshot};
use sha2::{Digest, Sha256};

use super::table::Outcome;
use super::{Run, exec, same};

/// Run by Alpine's `/bin/sh` (busybox) as root of the container, in the chroot.
pub const SCRIPT: &str = "set -e
adduser -D bob
rm /etc/motd
rm -rf /usr/share/udhcpc
rm -rf /etc/udhcpc
mkdir /etc/udhcpc
echo new > /etc/udhcpc/udhcpc.conf
rm -rf /etc/apk/protected_paths.d
mkdir /etc/apk/protected_paths.d
echo hi > /etc/apk/protected_paths.d/new
echo data > /root/file
chmod 4755 /root/file
ln /root/file /root/hard
mv /etc/issue /etc/issue.renamed
echo '# e2e' >> /etc/profile
chmod 600 /etc/fstab
id bob
";

pub fn step(run: &mut Run) -> Result<Outcome> {
    let rootfs = &run.bx.rootfs;
    // The merged view over the lower itself, as rootless runtimes mount it.
    let mut c = run.mount(rootfs, true, &["-v", "--chroot"]);
    c.arg(rootfs).args(["--", "/bin/sh", "-c", SCRIPT]);
    let out = exec::run(c, None)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let how = stderr
        .lines()
        .find_map(|l| l.strip_prefix("ovl-mount: driver: "))
        // "kernel overlayfs (rootless, userxattr) (--driver kernel); mounted via ...": the
        // driver, less the flag we gave.
        .map(|d| {
            let d = d.split(';').next().unwrap_or(d);
            let d = d.find(" (--driver").map_or(d, |i| &d[..i]);
            d.trim().to_string()
        });
    let Some(how) = how else {
        bail!("ovl-mount -v did not say which driver mounted:\n{stderr}");
    };
    let want = if run.driver.mount_driver() == "fuse" {
        "fuse-overlayfs"
    } else {
        "kernel overlayfs"
    };
    if !how.starts_with(want) {
        bail!("ovl-mount mounted with `{how}`, not {want}");
    }

    // The merged view as the upper defines it at rest: a fresh mount, not the one the script
    // ran in (whose caches can lag: fuse's attribute cache, a rootless kernel mount's view of a
    // link to a copied-up file), which is also the view ovl-diff and ovl-squash work from.
    let mount = run.mount(rootfs, true, &[]);
    let merged = run.snapshot_mounted(mount, rootfs, "2-merged")?;
    let (checked, missing) = check_changes(run.imported.as_ref().expect("step 1 passed"), &merged);
    if !missing.is_empty() {
        let mut s = format!(
            "the merged view lacks {} of the script's changes",
            missing.len()
        );
        for m in &missing {
            s.push_str("\n  ");
            s.push_str(m);
        }
        bail!(s);
    }

    // The lower, under the mount all along, is as imported.
    let lower = run.snapshot(rootfs, "2-lower-after")?;
    same(
        "the lower changed under the mount",
        (
            "box/rootfs as imported",
            run.imported.as_ref().expect("step 1 passed"),
        ),
        ("box/rootfs after step 2", &lower),
    )?;

    let n = merged.len();
    run.merged = Some(merged);
    Ok(Outcome::Pass(format!(
        "{how}: the {checked} changes in the merged view ({n} entries), lower untouched"
    )))
}

fn sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// How many changes of [`SCRIPT`] were looked for in `merged` (compared with the base), and
/// each one not seen.
fn check_changes(base: &Snapshot, merged: &Snapshot) -> (usize, Vec<String>) {
    let get = |p: &str| merged.get(p.as_bytes());
    let base_of = |p: &str| base.get(p.as_bytes());
    let mut missing = Vec::new();
    let mut checked = 0;
    let mut want = |ok: bool, what: &str| {
        checked += 1;
        if !ok {
            missing.push(what.to_string());
        }
    };
    let file = |e: Option<&Entry>, content: &[u8]| {
        e.is_some_and(|e| e.kind == 'f' && e.content.as_deref() == Some(sha(content).as_str()))
    };
    let changed = |p: &str| match (base_of(p), get(p)) {
        (Some(b), Some(m)) => b.content != m.content,
        _ => false,
    };
    want(
        get("home/bob").is_some_and(|e| e.kind == 'd' && e.uid != 0 && e.uid < 65536 && e.gid != 0),
        "adduser: home/bob, a directory owned by bob",
    );
    want(
        changed("etc/passwd") && changed("etc/group") && changed("etc/shadow"),
        "adduser: etc/passwd, etc/group and etc/shadow changed",
    );
    want(get("etc/motd").is_none(), "rm: etc/motd gone");
    want(
        !merged.keys().any(|p| p.starts_with(b"usr/share/udhcpc")),
        "rm -rf: usr/share/udhcpc gone",
    );
    let under = |dir: &str| {
        merged
            .keys()
            .filter(|p| p.starts_with(format!("{dir}/").as_bytes()))
            .count()
    };
    want(
        file(get("etc/udhcpc/udhcpc.conf"), b"new\n") && under("etc/udhcpc") == 1,
        "replaced dir: etc/udhcpc holds only the new udhcpc.conf",
    );
    want(
        file(get("etc/apk/protected_paths.d/new"), b"hi\n")
            && under("etc/apk/protected_paths.d") == 1,
        "replaced dir: etc/apk/protected_paths.d holds only `new`",
    );
    let root_file = get("root/file");
    want(
        file(root_file, b"data\n") && root_file.is_some_and(|e| e.mode == 0o4755),
        "write + chmod 4755: root/file",
    );
    want(
        root_file.is_some_and(|e| e.hardlink_group.as_deref() == Some(&b"root/file"[..]))
            && get("root/hard")
                .is_some_and(|e| e.hardlink_group.as_deref() == Some(&b"root/file"[..])),
        "ln: root/hard and root/file one inode",
    );
    want(
        get("etc/issue").is_none()
            && get("etc/issue.renamed").is_some_and(|e| {
                base_of("etc/issue").is_some_and(|b| b.content == e.content && b.mtime == e.mtime)
            }),
        "mv: etc/issue is etc/issue.renamed",
    );
    want(
        match (base_of("etc/profile"), get("etc/profile")) {
            (Some(b), Some(m)) => m.size == b.size + 6 && m.content != b.content,
            _ => false,
        },
        "append: etc/profile 6 bytes longer",
    );
    want(
        get("etc/fstab").is_some_and(|e| e.mode == 0o600),
        "chmod 600: etc/fstab",
    );
    (checked, missing)
}
