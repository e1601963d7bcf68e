//! Step 3: `ovl-diff` the upper into `layer.tar` and check what it must hold; then apply it
//! onto the base image with umoci: the unpacked rootfs must be the merged view.

use std::collections::BTreeSet;
use std::fs::File;

use anyhow::{Context, Result, bail};
use ovl_layer::ROOTLESS_RANGE;

use super::import::normalize;
use super::table::Outcome;
use super::{Run, exec, same};

/// One entry of the layer.
struct LayerEntry {
    path: Vec<u8>,
    kind: tar::EntryType,
    mode: u32,
    uid: u64,
    gid: u64,
    link: Option<Vec<u8>>,
    /// Device numbers, of a device.
    dev: Option<(u32, u32)>,
}

fn read_layer(path: &std::path::Path) -> Result<Vec<LayerEntry>> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut archive = tar::Archive::new(file);
    let mut out = Vec::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        let mut pax_uid = None;
        let mut pax_gid = None;
        if let Some(exts) = entry.pax_extensions()? {
            for ext in exts {
                let ext = ext?;
                let num = || {
                    std::str::from_utf8(ext.value_bytes())
                        .ok()?
                        .parse::<u64>()
                        .ok()
                };
                match ext.key()? {
                    "uid" => pax_uid = num(),
                    "gid" => pax_gid = num(),
                    _ => {}
                }
            }
        }
        let h = entry.header();
        out.push(LayerEntry {
            path: normalize(&entry.path_bytes()),
            kind: h.entry_type(),
            mode: h.mode()? & 0o7777,
            uid: pax_uid.unwrap_or(h.uid()?),
            gid: pax_gid.unwrap_or(h.gid()?),
            link: entry.link_name_bytes().map(|l| l.into_owned()),
            // Device numbers only mean something for devices (other entries may leave the
            // fields blank).
            dev: if matches!(h.entry_type(), tar::EntryType::Char | tar::EntryType::Block) {
                Some((
                    h.device_major()?.unwrap_or(0),
                    h.device_minor()?.unwrap_or(0),
                ))
            } else {
                None
            },
        });
    }
    Ok(out)
}

fn show(p: &[u8]) -> String {
    String::from_utf8_lossy(p).into_owned()
}

pub fn diff_step(run: &mut Run) -> Result<Outcome> {
    // As the upper's owner, outside any namespace: ovl-diff maps a rootless upper's host ids
    // back to container ids itself.
    let mut c = run.actor.command(run.ctx.bin("ovl-diff"));
    c.arg("--quiet").arg(&run.bx.upper);
    exec::run(c, Some(&run.bx.layer))?;
    let entries = read_layer(&run.bx.layer)?;
    let base = run.imported.as_ref().expect("step 1 passed");
    let merged = run.merged.as_ref().expect("step 2 passed");

    let mut problems = Vec::new();
    let mut whiteouts = BTreeSet::new();
    let mut opaque = BTreeSet::new();
    let mut hardlinks = 0;
    for e in &entries {
        let name = show(&e.path);
        if e.uid > ROOTLESS_RANGE as u64 || e.gid > ROOTLESS_RANGE as u64 {
            problems.push(format!(
                "{name}: owner {}:{} is not a container id (0..={ROOTLESS_RANGE})",
                e.uid, e.gid
            ));
        }
        if e.kind == tar::EntryType::Char && e.dev == Some((0, 0)) {
            problems.push(format!(
                "{name}: a char device 0/0 (an overlay whiteout, not an OCI one)"
            ));
        }
        let base_name = e.path.rsplit(|&b| b == b'/').next().unwrap_or(&e.path);
        let parent = &e.path[..e.path.len() - base_name.len()];
        if base_name == b".wh..wh..opq" {
            opaque.insert(show(parent.strip_suffix(b"/").unwrap_or(parent)));
            continue;
        }
        if let Some(gone) = base_name.strip_prefix(b".wh.") {
            whiteouts.insert(format!("{}{}", show(parent), show(gone)));
            continue;
        }
        if e.kind == tar::EntryType::Link {
            hardlinks += 1;
            let target = e.link.as_deref().map(normalize).unwrap_or_default();
            let pair = [show(&e.path), show(&target)];
            if !(pair == ["root/hard", "root/file"] || pair == ["root/file", "root/hard"]) {
                problems.push(format!("{name}: an unexpected hardlink to {}", pair[1]));
            }
        }
        // Every other entry is the merged view's, with the same owner and mode: container ids
        // all through, never the host ids of a rootless upper.
        match merged.get(&e.path) {
            None => problems.push(format!("{name}: in the layer but not in the merged view")),
            Some(m) => {
                if (m.uid as u64, m.gid as u64, m.mode) != (e.uid, e.gid, e.mode) {
                    let host = if !run.actor.is_root()
                        && (e.uid == run.actor.uid as u64 || e.gid == run.actor.gid as u64)
                    {
                        format!(" (the host ids of {})", run.actor.name)
                    } else {
                        String::new()
                    };
                    problems.push(format!(
                        "{name}: {}:{} mode {:o} in the layer{host}, {}:{} mode {:o} in the merged view",
                        e.uid, e.gid, e.mode, m.uid, m.gid, m.mode
                    ));
                }
            }
        }
    }

    // The script deleted etc/motd, usr/share/udhcpc and (by mv) etc/issue: those whiteouts,
    // and no other.
    let want_whiteouts: BTreeSet<String> = ["etc/issue", "etc/motd", "usr/share/udhcpc"]
        .map(String::from)
        .into();
    if whiteouts != want_whiteouts {
        problems.push(format!(
            "whiteouts {whiteouts:?}, expected exactly {want_whiteouts:?}"
        ));
    }
    // The two replaced directories are opaque. An opaque marker elsewhere is only harmless in a
    // directory the base does not have (fuse-overlayfs marks every new directory opaque).
    for dir in ["etc/udhcpc", "etc/apk/protected_paths.d"] {
        if !opaque.contains(dir) {
            problems.push(format!("no opaque marker {dir}/.wh..wh..opq"));
        }
    }
    for dir in &opaque {
        let replaced = dir == "etc/udhcpc" || dir == "etc/apk/protected_paths.d";
        if !replaced && base.contains_key(dir.as_bytes()) {
            problems.push(format!(
                "{dir}/.wh..wh..opq: hides the base's {dir}, which the script did not replace"
            ));
        }
    }
    if hardlinks != 1 {
        problems.push(format!(
            "{hardlinks} hardlink entries, expected 1 (root/hard and root/file)"
        ));
    }
    if !problems.is_empty() {
        let mut s = format!("layer.tar: {} problem(s)", problems.len());
        for p in problems.iter().take(20) {
            s.push_str("\n  ");
            s.push_str(p);
        }
        bail!(s);
    }
    let size = std::fs::metadata(&run.bx.layer)?.len();
    Ok(Outcome::Pass(format!(
        "{} KiB, {} entries: {} whiteouts, {} opaque, {hardlinks} hardlink, container ids",
        size.div_ceil(1024),
        entries.len(),
        whiteouts.len(),
        opaque.len()
    )))
}

pub fn umoci_step(run: &mut Run) -> Result<Outcome> {
    let Some(umoci) = run.ctx.umoci.clone() else {
        return Ok(Outcome::Skip(
            "umoci not found (apt-get install umoci)".into(),
        ));
    };
    let layout = run.bx.umoci.join("oci");
    let rootfs = run.bx.umoci.join("rootfs");
    let image = format!("{}:e2e", layout.display());
    // As root, umoci runs as root; for a rootless driver, as root of the user's namespace (the
    // map ovl uses): `--rootless` would lose every owner, this keeps them to compare.
    let umoci_cmd = |args: &[&std::ffi::OsStr]| {
        let mut c = run.actor.command_as_container_root(run.ctx, &umoci);
        c.args(args);
        exec::run(c, None)
    };
    use std::ffi::OsStr;
    umoci_cmd(&["init".as_ref(), "--layout".as_ref(), layout.as_os_str()])?;
    umoci_cmd(&["new".as_ref(), "--image".as_ref(), OsStr::new(&image)])?;
    for l in [&run.ctx.base_tar, &run.bx.layer] {
        umoci_cmd(&[
            "raw".as_ref(),
            "add-layer".as_ref(),
            "--image".as_ref(),
            OsStr::new(&image),
            l.as_os_str(),
        ])?;
    }
    umoci_cmd(&[
        "raw".as_ref(),
        "unpack".as_ref(),
        "--image".as_ref(),
        OsStr::new(&image),
        rootfs.as_os_str(),
    ])?;
    let mut applied = run.snapshot(&rootfs, "3-umoci")?;
    let mut merged = run.merged.clone().expect("step 2 passed");
    // Left out: the root directory's mtime. The merged root is the upperdir itself, whose mtime
    // the overlay moves when copy-up creates `etc/`, `home/`... in it, though the container's
    // root lost or gained no entry; and a layer has no entry for the root to carry it (ovl-diff
    // writes none), so umoci leaves the base's. Every other field of the root, and everything
    // of every other entry (directory mtimes included), is compared.
    for snap in [&mut applied, &mut merged] {
        if let Some(root) = snap.get_mut(&b""[..]) {
            root.mtime = (0, 0);
        }
    }
    same(
        "base + layer.tar applied by umoci is not the merged view",
        ("merged view", &merged),
        ("umoci", &applied),
    )?;
    Ok(Outcome::Pass(format!(
        "umoci: base + layer.tar = the merged view ({} entries)",
        applied.len()
    )))
}
