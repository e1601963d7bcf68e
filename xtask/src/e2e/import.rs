//! Step 1: `ovl-import` the minirootfs into `box/rootfs`; the result must be the tarball, entry
//! for entry (its headers and its data, read with tar-rs).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result, bail};
use ovl_tests::snapshot::{Entry, Snapshot};
use sha2::{Digest, Sha256};

use super::table::Outcome;
use super::{Run, exec, same};

pub fn step(run: &mut Run) -> Result<Outcome> {
    let ctx = run.ctx;
    let mut c = run.actor.command(ctx.bin("ovl-import"));
    c.arg("--quiet").arg(&ctx.alpine).arg(&run.bx.rootfs);
    exec::run(c, None)?;
    let imported = run.snapshot(&run.bx.rootfs, "1-imported")?;
    // The root entry is compared too: ovl-import gives DEST the `./` entry's metadata.
    same(
        "box/rootfs is not the tarball",
        ("the tarball", &ctx.alpine_snapshot),
        ("box/rootfs", &imported),
    )?;
    let n = imported.len();
    run.imported = Some(imported);
    Ok(Outcome::Pass(format!(
        "{n} entries = the tarball's (headers and data)"
    )))
}

/// A tar's entries as a [`Snapshot`]: what extracting it exactly must give (`./` is the root).
pub fn tar_snapshot(tar: &Path) -> Result<Snapshot> {
    let mut archive = tar::Archive::new(
        File::open(tar).with_context(|| format!("cannot open {}", tar.display()))?,
    );
    let mut snap = Snapshot::new();
    // Hardlink entries: (link path, target path).
    let mut links: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = normalize(&entry.path_bytes());
        let header = entry.header().clone();
        let mut pax = BTreeMap::new();
        if let Some(exts) = entry.pax_extensions()? {
            for ext in exts {
                let ext = ext?;
                // Keys are bytes: an xattr name need not be UTF-8.
                pax.insert(ext.key_bytes().to_vec(), ext.value_bytes().to_vec());
            }
        }
        let pax_num = |key: &str| {
            pax.get(key.as_bytes())
                .and_then(|v| std::str::from_utf8(v).ok()?.parse::<u64>().ok())
        };
        let kind = match header.entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => 'f',
            tar::EntryType::Directory => 'd',
            tar::EntryType::Symlink => 'l',
            tar::EntryType::Char => 'c',
            tar::EntryType::Block => 'b',
            tar::EntryType::Fifo => 'p',
            tar::EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .context("a hardlink without a target")?;
                links.push((path, normalize(&target)));
                continue;
            }
            other => bail!(
                "{}: unexpected entry type {other:?}",
                String::from_utf8_lossy(&path)
            ),
        };
        let link_target = if kind == 'l' {
            Some(
                entry
                    .link_name_bytes()
                    .context("a symlink without a target")?
                    .into_owned(),
            )
        } else {
            None
        };
        let content = if kind == 'f' {
            let mut h = Sha256::new();
            let mut buf = Vec::new();
            entry.read_to_end(&mut buf)?;
            h.update(&buf);
            Some(hex::encode(h.finalize()))
        } else {
            None
        };
        let size = match kind {
            'f' => header.entry_size()?,
            'l' => link_target.as_ref().map_or(0, |t| t.len() as u64),
            _ => 0,
        };
        let mtime = match pax
            .get(b"mtime".as_slice())
            .and_then(|v| std::str::from_utf8(v).ok())
        {
            Some(m) => parse_pax_time(m).with_context(|| format!("bad PAX mtime {m:?}"))?,
            None => (header.mtime()? as i64, 0),
        };
        let rdev = if kind == 'c' || kind == 'b' {
            let (major, minor) = (
                header.device_major()?.unwrap_or(0),
                header.device_minor()?.unwrap_or(0),
            );
            libc::makedev(major, minor)
        } else {
            0
        };
        let xattrs = pax
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix(b"SCHILY.xattr.")?.to_vec(), v.clone())))
            .collect();
        snap.insert(
            path,
            Entry {
                kind,
                mode: header.mode()? & 0o7777,
                uid: pax_num("uid").unwrap_or(header.uid()?) as u32,
                gid: pax_num("gid").unwrap_or(header.gid()?) as u32,
                size,
                mtime,
                content,
                link_target,
                rdev,
                xattrs,
                hardlink_group: None,
            },
        );
    }
    // A hardlink is its target's inode: the same entry, and the group named by its first path.
    let mut groups: BTreeMap<Vec<u8>, Vec<Vec<u8>>> = BTreeMap::new();
    for (link, target) in links {
        let entry = snap
            .get(&target)
            .with_context(|| format!("hardlink {} to a missing {}", show(&link), show(&target)))?
            .clone();
        snap.insert(link.clone(), entry);
        groups
            .entry(target.clone())
            .or_insert_with(|| vec![target])
            .push(link);
    }
    for members in groups.into_values() {
        let first = members.iter().min().expect("non-empty").clone();
        for m in members {
            snap.get_mut(&m).expect("inserted").hardlink_group = Some(first.clone());
        }
    }
    Ok(snap)
}

/// `./a/b/` -> `a/b`; `./` -> `` (the root).
pub fn normalize(p: &[u8]) -> Vec<u8> {
    let mut p = p;
    while let Some(rest) = p.strip_prefix(b"./") {
        p = rest;
    }
    while let Some(rest) = p.strip_suffix(b"/") {
        p = rest;
    }
    if p == b"." { Vec::new() } else { p.to_vec() }
}

fn parse_pax_time(s: &str) -> Option<(i64, i64)> {
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let mut ns = String::from(frac);
    ns.truncate(9);
    while ns.len() < 9 {
        ns.push('0');
    }
    Some((secs.parse().ok()?, ns.parse().ok()?))
}

fn show(p: &[u8]) -> String {
    String::from_utf8_lossy(p).into_owned()
}
