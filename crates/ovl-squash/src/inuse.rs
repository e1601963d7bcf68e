//! Refusing to touch a directory that a mounted overlay uses.
//!
//! Owns the question "is any of these dirs part of a mounted overlay, anywhere we can see?".
//! A mount lives in a mount namespace, and rootless mounts live in private ones that our own
//! /proc/self/mountinfo never shows, so every process's namespace is looked at: /proc/PID/ns/mnt
//! names the namespace (each is read once), /proc/PID/mountinfo lists its mounts. Kernel
//! overlays carry their dirs in the mount options (`lowerdir=a:b`, `lowerdir+=a`, `datadir+=`,
//! `upperdir=`, `workdir=`); fuse-overlayfs shows none there, so its dirs come from the
//! command line of each running fuse-overlayfs process.
//!
//! A path from another namespace means what it means there: it is resolved through
//! /proc/PID/root (and /proc/PID/cwd when relative) and compared by (device, inode), and a dir
//! counts as used when it is inside a used dir or holds one (squashing into a lower that holds
//! a live upper would change that overlay just the same). Namespaces we may not read (another
//! user's) are skipped: a rootless user can only squash what it owns anyway.

use std::collections::HashSet;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// A directory some overlay uses, as its process sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsedDir {
    /// `lowerdir`, `upperdir`, `workdir`, `datadir`.
    pub role: String,
    pub path: PathBuf,
}

/// One mounted overlay.
#[derive(Debug, Clone)]
pub struct Overlay {
    /// For messages: where and what.
    pub what: String,
    pub pid: u32,
    pub dirs: Vec<UsedDir>,
}

/// Undo mountinfo's octal escapes (`\040` for a space, ...).
fn unescape_octal(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'\\' && i + 4 <= s.len() {
            let d = &s[i + 1..i + 4];
            if d.iter().all(|c| (b'0'..=b'7').contains(c)) {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
                continue;
            }
        }
        out.push(s[i]);
        i += 1;
    }
    out
}

/// Split on `sep` except where escaped with a backslash (which is dropped).
fn split_escaped(s: &[u8], sep: u8) -> Vec<Vec<u8>> {
    let mut out = vec![Vec::new()];
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'\\' && i + 1 < s.len() {
            out.last_mut().expect("non-empty").push(s[i + 1]);
            i += 2;
            continue;
        }
        if s[i] == sep {
            out.push(Vec::new());
        } else {
            out.last_mut().expect("non-empty").push(s[i]);
        }
        i += 1;
    }
    out
}

/// The dirs named by overlay mount options (`a=b,c=d`, already unescaped from mountinfo or a
/// command line).
pub fn dirs_in_options(opts: &[u8]) -> Vec<UsedDir> {
    let mut out = Vec::new();
    for opt in split_escaped_keep(opts, b',') {
        let Some(eq) = opt.iter().position(|&c| c == b'=') else {
            continue;
        };
        let (key, val) = (&opt[..eq], &opt[eq + 1..]);
        let key = String::from_utf8_lossy(key).into_owned();
        let push = |out: &mut Vec<UsedDir>, role: &str, p: &[u8]| {
            if !p.is_empty() {
                out.push(UsedDir {
                    role: role.to_string(),
                    path: PathBuf::from(std::ffi::OsStr::from_bytes(p)),
                });
            }
        };
        match key.as_str() {
            // `a:b`, `::` before data-only lowers, `\:` for a colon in a path.
            "lowerdir" => {
                for p in split_escaped(val, b':') {
                    push(&mut out, "lowerdir", &p);
                }
            }
            "lowerdir+" | "datadir+" => push(&mut out, "lowerdir", &split_escaped(val, 0).concat()),
            "upperdir" | "workdir" => push(&mut out, &key, &split_escaped(val, 0).concat()),
            _ => {}
        }
    }
    out
}

/// Split options on `sep`, keeping backslash escapes for the value parser.
fn split_escaped_keep(s: &[u8], sep: u8) -> Vec<Vec<u8>> {
    let mut out = vec![Vec::new()];
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'\\' && i + 1 < s.len() {
            out.last_mut()
                .expect("non-empty")
                .extend_from_slice(&s[i..i + 2]);
            i += 2;
            continue;
        }
        if s[i] == sep {
            out.push(Vec::new());
        } else {
            out.last_mut().expect("non-empty").push(s[i]);
        }
        i += 1;
    }
    out
}

/// The overlays in a mountinfo text.
pub fn overlays_in_mountinfo(text: &[u8], pid: u32, ns: &str) -> Vec<Overlay> {
    let mut out = Vec::new();
    for line in text.split(|&c| c == b'\n') {
        let Some(sep) = find(line, b" - ") else {
            continue;
        };
        let pre: Vec<&[u8]> = line[..sep].split(|&c| c == b' ').collect();
        let post: Vec<&[u8]> = line[sep + 3..].split(|&c| c == b' ').collect();
        if post.first() != Some(&&b"overlay"[..]) || pre.len() < 5 || post.len() < 3 {
            continue;
        }
        let mount_point = unescape_octal(pre[4]);
        let dirs = dirs_in_options(&unescape_octal(post[2]));
        out.push(Overlay {
            what: format!(
                "the overlay on {} in mount namespace {ns}",
                String::from_utf8_lossy(&mount_point)
            ),
            pid,
            dirs,
        });
    }
    out
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The dirs of a fuse-overlayfs command line (`-o a=b,c=d` or `-oa=b`, any number of them).
pub fn fuse_overlayfs_dirs(cmdline: &[u8]) -> Vec<UsedDir> {
    let args: Vec<&[u8]> = cmdline.split(|&c| c == 0).collect();
    let mut out = Vec::new();
    let mut i = 1;
    while i < args.len() {
        let a = args[i];
        if a == b"-o" {
            if let Some(v) = args.get(i + 1) {
                out.extend(dirs_in_options(v));
            }
            i += 2;
            continue;
        }
        if let Some(v) = a.strip_prefix(b"-o") {
            out.extend(dirs_in_options(v));
        }
        i += 1;
    }
    out
}

/// Every overlay that any process we may inspect has mounted (kernel overlays once per mount
/// namespace, fuse-overlayfs once per process).
pub fn mounted_overlays() -> Vec<Overlay> {
    let mut seen_ns = HashSet::new();
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    let mut pids: Vec<u32> = rd
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
        .collect();
    pids.sort_unstable();
    // Our own namespace first, so its mounts are named as we see them.
    pids.insert(0, std::process::id());
    for pid in pids {
        let proc = PathBuf::from(format!("/proc/{pid}"));
        if let Ok(comm) = std::fs::read(proc.join("comm")) {
            if comm.trim_ascii_end() == b"fuse-overlayfs" {
                if let Ok(cmd) = std::fs::read(proc.join("cmdline")) {
                    out.push(Overlay {
                        what: format!("fuse-overlayfs, pid {pid}"),
                        pid,
                        dirs: fuse_overlayfs_dirs(&cmd),
                    });
                }
            }
        }
        let Ok(ns) = std::fs::read_link(proc.join("ns/mnt")) else {
            continue;
        };
        let ns = ns.to_string_lossy().into_owned();
        if !seen_ns.insert(ns.clone()) {
            continue;
        }
        if let Ok(text) = std::fs::read(proc.join("mountinfo")) {
            out.extend(overlays_in_mountinfo(&text, pid, &ns));
        }
    }
    out
}

type Key = (u64, u64);
/// A dir's (dev, ino) and those of every directory above it.
type Place = (Key, HashSet<Key>);

/// (dev, ino) of `p` and of every directory above it.
fn key_and_ancestors(p: &Path) -> Option<Place> {
    let md = std::fs::metadata(p).ok()?;
    let me = (md.dev(), md.ino());
    let mut up = HashSet::new();
    let mut cur = p.join("..");
    for _ in 0..256 {
        let Ok(m) = std::fs::metadata(&cur) else {
            break;
        };
        if !up.insert((m.dev(), m.ino())) {
            break; // reached the root: its `..` is itself
        }
        cur.push("..");
    }
    Some((me, up))
}

/// A used dir's path as this process can reach it: through the mounting process's root (and
/// its cwd when relative).
fn reachable(pid: u32, p: &Path) -> PathBuf {
    let base = if p.is_absolute() { "root" } else { "cwd" };
    let rel = p.strip_prefix("/").unwrap_or(p);
    PathBuf::from(format!("/proc/{pid}/{base}")).join(rel)
}

/// The first of `dirs` that a mounted overlay uses, and which overlay and how.
pub fn find_use(dirs: &[PathBuf], overlays: &[Overlay]) -> Option<(PathBuf, String)> {
    let ours: Vec<(PathBuf, Option<Place>)> = dirs
        .iter()
        .map(|d| (d.clone(), key_and_ancestors(d)))
        .collect();
    for ov in overlays {
        for used in &ov.dirs {
            let theirs = key_and_ancestors(&reachable(ov.pid, &used.path))
                .or_else(|| key_and_ancestors(&used.path));
            for (dir, mine) in &ours {
                let hit = match (mine, &theirs) {
                    (Some((mk, mup)), Some((tk, tup))) => {
                        mk == tk || mup.contains(tk) || tup.contains(mk)
                    }
                    // Not reachable: compare the names as a last resort.
                    _ => {
                        let d = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.clone());
                        d.starts_with(&used.path) || used.path.starts_with(&d)
                    }
                };
                if hit {
                    return Some((
                        dir.clone(),
                        format!("{} has {}={}", ov.what, used.role, used.path.display()),
                    ));
                }
            }
        }
    }
    None
}

/// Refuse when any of `dirs` is part of a mounted overlay we can see.
pub fn refuse_if_mounted(dirs: &[PathBuf]) -> Result<(), crate::SquashError> {
    match find_use(dirs, &mounted_overlays()) {
        Some((dir, by)) => Err(crate::SquashError::InUse { dir, by }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kernel_and_fuse_forms() {
        let info = b"69 27 0:41 / /tmp/mi/m rw,relatime - overlay overlay rw,lowerdir=/l1:/l\\:2,upperdir=/tmp/u\\040p,workdir=/w,uuid=on\n\
70 27 0:42 / /m2 rw - overlay overlay rw,lowerdir+=/a,datadir+=/d,upperdir=/u2,workdir=/w2\n\
71 27 0:43 / /f rw - fuse.fuse-overlayfs fuse-overlayfs rw,user_id=0\n";
        let ovs = overlays_in_mountinfo(info, 1, "mnt:[1]");
        assert_eq!(ovs.len(), 2);
        let paths: Vec<_> = ovs[0].dirs.iter().map(|d| d.path.clone()).collect();
        assert_eq!(
            paths,
            ["/l1", "/l:2", "/tmp/u p", "/w"]
                .map(PathBuf::from)
                .to_vec()
        );
        assert!(ovs[0].what.contains("/tmp/mi/m"));
        assert_eq!(ovs[1].dirs.len(), 4);
        let fuse = fuse_overlayfs_dirs(
            b"fuse-overlayfs\0-o\0lowerdir=/a:/b,upperdir=u,workdir=/w\0/mnt\0",
        );
        assert_eq!(fuse.len(), 4);
        assert_eq!(fuse[2].path, PathBuf::from("u"));
        assert_eq!(fuse_overlayfs_dirs(b"x\0-olowerdir=/a\0").len(), 1);
    }

    #[test]
    fn nested_dirs_count_as_used() {
        let t = tempfile::tempdir().unwrap();
        for d in ["a/upper", "b", "c"] {
            std::fs::create_dir_all(t.path().join(d)).unwrap();
        }
        let ov = Overlay {
            what: "test".into(),
            pid: std::process::id(),
            dirs: vec![UsedDir {
                role: "upperdir".into(),
                path: t.path().join("a/upper"),
            }],
        };
        let ovs = [ov];
        assert!(find_use(&[t.path().join("a")], &ovs).is_some(), "holds it");
        assert!(
            find_use(&[t.path().join("a/upper")], &ovs).is_some(),
            "is it"
        );
        assert!(find_use(&[t.path().join("b")], &ovs).is_none());
        std::fs::create_dir(t.path().join("a/upper/x")).unwrap();
        assert!(
            find_use(&[t.path().join("a/upper/x")], &ovs).is_some(),
            "inside it"
        );
    }
}
