//! A comparable snapshot of a directory tree: every entry with its exact metadata.
//!
//! Owns "are these two trees the same": tests, `cargo xtask e2e` and the squash checks compare
//! an import with GNU tar's, a layer applied by umoci with the merged view, a squashed lower
//! with the overlay it came from. Names are bytes; hardlinks are compared as groups (each
//! entry names the first path of its inode), not by inode number.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use sha2::Digest;

use ovl_layer::display_bytes;

/// One entry of a tree.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Entry {
    /// `d` dir, `f` file, `l` symlink, `c` char dev, `b` block dev, `p` fifo, `s` socket.
    pub kind: char,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: (i64, i64),
    /// sha256 of a file's content.
    pub content: Option<String>,
    pub link_target: Option<Vec<u8>>,
    pub rdev: u64,
    /// Names are bytes, not necessarily UTF-8 (see [`ovl_layer::Xattr`]).
    pub xattrs: Vec<ovl_layer::Xattr>,
    /// For a file with more than one link in the tree: the first path (bytewise) of its inode.
    pub hardlink_group: Option<Vec<u8>>,
}

/// What to leave out of a comparison.
#[derive(Debug, Clone, Default)]
pub struct SnapshotOptions {
    /// Directory mtimes change whenever an entry is added or removed (e.g. through a merged view).
    pub ignore_dir_mtime: bool,
    /// Every mtime (a merged view after `touch`, say).
    pub ignore_mtime: bool,
    /// Drop xattrs whose name starts with one of these.
    pub ignore_xattr_prefixes: Vec<String>,
    /// Leave out the root entry itself.
    pub skip_root: bool,
}

impl SnapshotOptions {
    /// What a merged view shows, strictly: everything but the overlay's own markers (both
    /// xattr namespaces, fuse-overlayfs's) and SELinux labels (the host's policy, not the
    /// image's), which are not content.
    pub fn merged_view() -> Self {
        let mut ignore: Vec<String> = ovl_layer::XattrNs::ALL
            .iter()
            .map(|ns| ns.prefix().to_string())
            .collect();
        ignore.push(ovl_layer::FUSE_PRIVATE_PREFIX.to_string());
        ignore.push("security.selinux".to_string());
        SnapshotOptions {
            ignore_xattr_prefixes: ignore,
            ..Default::default()
        }
    }
}

/// A tree: relative path bytes (root is empty) -> entry, sorted bytewise.
pub type Snapshot = BTreeMap<Vec<u8>, Entry>;

/// Read a tree without following any symlink.
pub fn snapshot(root: &Path, opts: &SnapshotOptions) -> std::io::Result<Snapshot> {
    let mut out = Snapshot::new();
    let mut inodes: HashMap<(u64, u64), Vec<Vec<u8>>> = HashMap::new();
    for ent in walkdir::WalkDir::new(root)
        .follow_links(false)
        .sort_by(|a, b| a.file_name().as_bytes().cmp(b.file_name().as_bytes()))
    {
        let ent = ent.map_err(std::io::Error::other)?;
        let rel = ent
            .path()
            .strip_prefix(root)
            .expect("below root")
            .as_os_str()
            .as_bytes()
            .to_vec();
        if rel.is_empty() && opts.skip_root {
            continue;
        }
        let md = ent.path().symlink_metadata()?;
        let ft = md.file_type();
        let kind = if ft.is_dir() {
            'd'
        } else if ft.is_file() {
            'f'
        } else if ft.is_symlink() {
            'l'
        } else if ft.is_char_device() {
            'c'
        } else if ft.is_block_device() {
            'b'
        } else if ft.is_fifo() {
            'p'
        } else {
            's'
        };
        let content = if kind == 'f' {
            Some(hash_file(ent.path())?)
        } else {
            None
        };
        let link_target = if kind == 'l' {
            Some(
                std::fs::read_link(ent.path())?
                    .as_os_str()
                    .as_bytes()
                    .to_vec(),
            )
        } else {
            None
        };
        let mut xattrs = ovl_layer::list_xattrs(ent.path())?;
        xattrs.retain(|(n, _)| {
            !opts
                .ignore_xattr_prefixes
                .iter()
                .any(|p| n.starts_with(p.as_bytes()))
        });
        let mtime = if opts.ignore_mtime || (kind == 'd' && opts.ignore_dir_mtime) {
            (0, 0)
        } else {
            (md.mtime(), md.mtime_nsec())
        };
        if kind != 'd' && md.nlink() > 1 {
            inodes
                .entry((md.dev(), md.ino()))
                .or_default()
                .push(rel.clone());
        }
        out.insert(
            rel,
            Entry {
                kind,
                mode: md.mode() & 0o7777,
                uid: md.uid(),
                gid: md.gid(),
                size: if kind == 'd' { 0 } else { md.size() },
                mtime,
                content,
                link_target,
                rdev: if kind == 'c' || kind == 'b' {
                    md.rdev()
                } else {
                    0
                },
                xattrs,
                hardlink_group: None,
            },
        );
    }
    for paths in inodes.into_values().filter(|p| p.len() > 1) {
        let first = paths.iter().min().expect("non-empty").clone();
        for p in paths {
            if let Some(e) = out.get_mut(&p) {
                e.hardlink_group = Some(first.clone());
            }
        }
    }
    Ok(out)
}

fn hash_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 128 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// A snapshot as JSON, to hand one from one process to another (e.g. out of a user namespace
/// whose merged view only exists inside it): a list of `[path bytes, entry]` pairs, since JSON
/// object keys would have to be UTF-8. [`from_json`] reads it back.
pub fn to_json(s: &Snapshot) -> String {
    let pairs: Vec<(&Vec<u8>, &Entry)> = s.iter().collect();
    serde_json::to_string(&pairs).expect("a snapshot serializes")
}

/// The inverse of [`to_json`].
pub fn from_json(text: &[u8]) -> serde_json::Result<Snapshot> {
    let pairs: Vec<(Vec<u8>, Entry)> = serde_json::from_slice(text)?;
    Ok(pairs.into_iter().collect())
}

/// Every difference between two snapshots, one line each, naming the path.
pub fn differences(a: &Snapshot, b: &Snapshot) -> Vec<String> {
    let mut out = Vec::new();
    for (p, ea) in a {
        let name = if p.is_empty() {
            ".".to_string()
        } else {
            display_bytes(p)
        };
        match b.get(p) {
            None => out.push(format!("{name}: only in the first tree")),
            Some(eb) if ea != eb => out.push(format!("{name}: {}", describe(ea, eb))),
            Some(_) => {}
        }
    }
    for p in b.keys().filter(|p| !a.contains_key(*p)) {
        out.push(format!("{}: only in the second tree", display_bytes(p)));
    }
    out
}

fn describe(a: &Entry, b: &Entry) -> String {
    let mut d = Vec::new();
    macro_rules! cmp {
        ($f:ident) => {
            if a.$f != b.$f {
                d.push(format!("{} {:?} != {:?}", stringify!($f), a.$f, b.$f));
            }
        };
    }
    cmp!(kind);
    if a.mode != b.mode {
        d.push(format!("mode {:o} != {:o}", a.mode, b.mode));
    }
    cmp!(uid);
    cmp!(gid);
    cmp!(size);
    cmp!(mtime);
    cmp!(content);
    cmp!(rdev);
    cmp!(hardlink_group);
    if a.link_target != b.link_target {
        d.push(format!(
            "symlink target {:?} != {:?}",
            a.link_target.as_deref().map(display_bytes),
            b.link_target.as_deref().map(display_bytes)
        ));
    }
    if a.xattrs != b.xattrs {
        let names = |x: &[ovl_layer::Xattr]| {
            x.iter()
                .map(|(n, v)| format!("{}={}", display_bytes(n), display_bytes(v)))
                .collect::<Vec<_>>()
                .join(",")
        };
        d.push(format!(
            "xattrs [{}] != [{}]",
            names(&a.xattrs),
            names(&b.xattrs)
        ));
    }
    d.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_each_kind_of_difference() {
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        for d in [&a, &b] {
            std::fs::create_dir(d).unwrap();
            std::fs::write(d.join("f"), b"x").unwrap();
            std::fs::hard_link(d.join("f"), d.join("g")).unwrap();
        }
        let opts = SnapshotOptions {
            ignore_dir_mtime: true,
            ignore_mtime: true,
            ..Default::default()
        };
        assert_eq!(
            differences(&snapshot(&a, &opts).unwrap(), &snapshot(&b, &opts).unwrap()),
            Vec::<String>::new()
        );
        std::fs::write(b.join("f"), b"y").unwrap();
        std::os::unix::fs::symlink("t", b.join("l")).unwrap();
        let diff = differences(&snapshot(&a, &opts).unwrap(), &snapshot(&b, &opts).unwrap());
        assert!(
            diff.iter()
                .any(|d| d.starts_with("f: ") && d.contains("content")),
            "{diff:?}"
        );
        assert!(
            diff.iter().any(|d| d == "l: only in the second tree"),
            "{diff:?}"
        );
        let sa = snapshot(&a, &opts).unwrap();
        assert_eq!(sa[&b"g".to_vec()].hardlink_group, Some(b"f".to_vec()));
    }

    #[test]
    fn json_round_trips_every_field() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        std::fs::write(d.join("f"), b"x").unwrap();
        std::fs::hard_link(d.join("f"), d.join("g")).unwrap();
        std::os::unix::fs::symlink("t\u{e9}", d.join("l")).unwrap();
        let odd = std::ffi::OsStr::from_bytes(b"bad-\xff-name");
        std::fs::write(d.join(odd), b"y").unwrap();
        let _ = xattr::set(d.join("f"), "user.e2e", b"\x00\xff");
        let s = snapshot(d, &SnapshotOptions::default()).unwrap();
        let back = from_json(to_json(&s).as_bytes()).unwrap();
        assert_eq!(back, s);
        assert!(back.contains_key(b"bad-\xff-name".as_slice()));
    }
}
