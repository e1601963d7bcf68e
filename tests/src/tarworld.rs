//! Differential checks against the tar world: one archive extracted by GNU tar, by bsdtar and
//! by ovl-import, the three trees compared entry by entry.
//!
//! Owns what "the same as tar" means: where GNU tar and bsdtar agree on an entry (path, type,
//! mode, owner, size, content, link target, xattrs, mtime, hardlink group, device number),
//! ovl-import must give exactly that entry. Entries the peers disagree on are listed, not
//! judged. Directories the archive does not list are made "now" by both peers; ovl makes them
//! reproducible (mtime 0), so a directory mtime both peers set after `since` is not compared.
//! The roots of the trees are not compared, and neither are overlay markers.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use crate::snapshot::{Snapshot, SnapshotOptions, snapshot};
use ovl_layer::display_bytes;

/// One extraction: did the tool succeed, what it said, and the tree it left.
#[derive(Debug)]
pub struct Extracted {
    pub ok: bool,
    pub stderr: String,
    pub tree: Snapshot,
    /// Keeps the tree on disk while the caller looks at it.
    pub dir: tempfile::TempDir,
}

fn tree_opts() -> SnapshotOptions {
    SnapshotOptions {
        skip_root: true,
        ..SnapshotOptions::merged_view()
    }
}

fn run_into(dest: &Path, program: &str, args: &[&std::ffi::OsStr]) -> (bool, String) {
    // The peers make implicit directories with the umask: give them the usual one.
    let out = Command::new("sh")
        .arg("-c")
        .arg("umask 022 && exec \"$0\" \"$@\"")
        .arg(program)
        .args(args)
        .current_dir(dest)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Files larger than this (Go's corpus has sparse files of 60 GB) are not hashed whole: see
/// [`sparse_digest`].
const BIG: u64 = 64 << 20;

fn extracted(dir: tempfile::TempDir, tree_dir: &Path, ok: bool, stderr: String) -> Extracted {
    let tree = if tree_dir.exists() {
        snapshot_with_big_files(tree_dir)
    } else {
        Snapshot::new()
    };
    Extracted {
        ok,
        stderr,
        tree,
        dir,
    }
}

/// The tree's snapshot, with every file over [`BIG`] bytes compared by its size and
/// [`sparse_digest`] instead of a hash of every byte: such files are moved aside while the rest is
/// snapshotted (their parents keep their mtimes), then added back.
fn snapshot_with_big_files(root: &Path) -> Snapshot {
    use std::os::unix::fs::MetadataExt;
    let big: Vec<std::path::PathBuf> = walkdir::WalkDir::new(root)
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file() && e.metadata().is_ok_and(|m| m.len() > BIG))
        .map(|e| e.into_path())
        .collect();
    let aside = root.with_extension("big");
    let mut moved = Vec::new();
    for (i, p) in big.iter().enumerate() {
        let parent = p.parent().unwrap();
        let pm = parent.symlink_metadata().unwrap();
        std::fs::create_dir_all(&aside).unwrap();
        let to = aside.join(i.to_string());
        if std::fs::hard_link(p, &to).is_err() {
            continue;
        }
        std::fs::remove_file(p).unwrap();
        let t = |s: i64, ns: i64| rustix::fs::Timespec {
            tv_sec: s,
            tv_nsec: ns as _,
        };
        rustix::fs::utimensat(
            rustix::fs::CWD,
            parent,
            &rustix::fs::Timestamps {
                last_access: t(pm.atime(), pm.atime_nsec()),
                last_modification: t(pm.mtime(), pm.mtime_nsec()),
            },
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        )
        .unwrap();
        moved.push((p.clone(), to));
    }
    let mut tree = snapshot(root, &tree_opts()).unwrap_or_default();
    for (p, to) in moved {
        let md = to.symlink_metadata().unwrap();
        let rel = p.strip_prefix(root).unwrap();
        let mut xattrs = ovl_layer::list_xattrs(&to).unwrap_or_default();
        let prefixes = tree_opts().ignore_xattr_prefixes;
        xattrs.retain(|(n, _)| !prefixes.iter().any(|pre| n.starts_with(pre.as_bytes())));
        tree.insert(
            std::os::unix::ffi::OsStrExt::as_bytes(rel.as_os_str()).to_vec(),
            crate::snapshot::Entry {
                kind: 'f',
                mode: md.mode() & 0o7777,
                uid: md.uid(),
                gid: md.gid(),
                size: md.size(),
                mtime: (md.mtime(), md.mtime_nsec()),
                content: Some(sparse_digest(&to)),
                link_target: None,
                rdev: 0,
                xattrs,
                hardlink_group: None,
            },
        );
    }
    let _ = std::fs::remove_dir_all(&aside);
    tree
}

/// A digest of a file's content that reads only its data extents: sha256 over (offset, block)
/// for every 4 KiB block that is not all zeros. Holes and written zeros digest the same.
pub fn sparse_digest(path: &Path) -> String {
    use sha2::Digest;
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len();
    let mut h = sha2::Sha256::new();
    let mut pos = 0u64;
    let mut buf = vec![0u8; 4096];
    while pos < len {
        let data = match rustix::fs::seek(&f, rustix::fs::SeekFrom::Data(pos)) {
            Ok(d) => d,
            Err(_) => break,
        };
        let hole = rustix::fs::seek(&f, rustix::fs::SeekFrom::Hole(data)).unwrap_or(len);
        let mut off = data - data % 4096;
        f.seek(SeekFrom::Start(off)).unwrap();
        while off < hole {
            let n = buf.len().min((len - off) as usize);
            f.read_exact(&mut buf[..n]).unwrap();
            if buf[..n].iter().any(|&b| b != 0) {
                h.update(off.to_le_bytes());
                h.update(&buf[..n]);
            }
            off += n as u64;
        }
        pos = hole.max(off);
    }
    hex::encode(h.finalize())
}

/// GNU tar, as root keeps owners, modes, xattrs of every namespace and ns mtimes.
pub fn gnu_tar(archive: &Path) -> Extracted {
    let dir = tempfile::tempdir().unwrap();
    let (ok, stderr) = run_into(
        dir.path(),
        "tar",
        &[
            "--xattrs".as_ref(),
            "--xattrs-include=*".as_ref(),
            "--numeric-owner".as_ref(),
            "--same-owner".as_ref(),
            "-xpf".as_ref(),
            archive.as_os_str(),
        ],
    );
    let p = dir.path().to_path_buf();
    extracted(dir, &p, ok, stderr)
}

/// bsdtar (libarchive), as root keeps owners, modes, xattrs and ns mtimes with -p.
pub fn bsdtar(archive: &Path) -> Extracted {
    let dir = tempfile::tempdir().unwrap();
    let (ok, stderr) = run_into(
        dir.path(),
        "bsdtar",
        &[
            "--numeric-owner".as_ref(),
            "-xpf".as_ref(),
            archive.as_os_str(),
        ],
    );
    let p = dir.path().to_path_buf();
    extracted(dir, &p, ok, stderr)
}

/// `ovl-import ARCHIVE DEST` with the binary `bin`.
pub fn ovl_import(bin: &Path, archive: &Path) -> Extracted {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("dest");
    let (ok, stderr) = run_into(
        dir.path(),
        bin.to_str().expect("a UTF-8 binary path"),
        &[archive.as_os_str(), dest.as_os_str()],
    );
    extracted(dir, &dest, ok, stderr)
}

/// The comparison of ovl's tree with the peers'.
#[derive(Debug, Default)]
pub struct Verdict {
    /// Entries both peers agree on and ovl gives the same.
    pub agreed: usize,
    /// Entries the peers disagree on (not judged), with how.
    pub peers_disagree: Vec<String>,
    /// Entries both peers agree on that ovl gives differently (or not at all), with how.
    pub mismatches: Vec<String>,
    /// Paths of the peers' agreed tree that ovl does not have (also in `mismatches`).
    pub missing: Vec<Vec<u8>>,
}

/// Compare ovl's tree with GNU tar's and bsdtar's; `since` is when the extractions started
/// (seconds since the epoch): directory mtimes the peers set after it are "now", not the
/// archive's.
pub fn compare(gnu: &Snapshot, bsd: &Snapshot, ovl: &Snapshot, since: i64) -> Verdict {
    let mut v = Verdict::default();
    let paths: BTreeSet<&Vec<u8>> = gnu.keys().chain(bsd.keys()).collect();
    for p in paths {
        let name = display_bytes(p);
        let (Some(g), Some(b)) = (gnu.get(p), bsd.get(p)) else {
            v.peers_disagree.push(format!(
                "{name}: only {} has it",
                if gnu.contains_key(p) {
                    "GNU tar"
                } else {
                    "bsdtar"
                }
            ));
            continue;
        };
        let (mut g, mut b) = (g.clone(), b.clone());
        let implicit = g.kind == 'd' && b.kind == 'd' && g.mtime.0 >= since && b.mtime.0 >= since;
        if implicit {
            g.mtime = (0, 0);
            b.mtime = (0, 0);
        }
        if g != b {
            let one: Snapshot = [(p.clone(), g)].into_iter().collect();
            let two: Snapshot = [(p.clone(), b)].into_iter().collect();
            v.peers_disagree
                .extend(crate::snapshot::differences(&one, &two));
            continue;
        }
        match ovl.get(p) {
            None => {
                v.mismatches
                    .push(format!("{name}: missing from ovl's tree"));
                v.missing.push(p.clone());
            }
            Some(o) => {
                let mut o = o.clone();
                if implicit {
                    o.mtime = (0, 0);
                }
                if o == g {
                    v.agreed += 1;
                } else {
                    let one: Snapshot = [(p.clone(), g)].into_iter().collect();
                    let two: Snapshot = [(p.clone(), o)].into_iter().collect();
                    v.mismatches.extend(
                        crate::snapshot::differences(&one, &two)
                            .into_iter()
                            .map(|d| format!("{d} (peers, then ovl)")),
                    );
                }
            }
        }
    }
    for p in ovl.keys() {
        if !gnu.contains_key(p) && !bsd.contains_key(p) {
            v.mismatches
                .push(format!("{}: only in ovl's tree", display_bytes(p)));
        }
    }
    v
}

/// Seconds since the epoch, now.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}
