//! Mount tables: which overlays are mounted, and which directories they use.
//!
//! Owns reading mounts for every tool: a mountinfo text parsed ([`parse_mountinfo`], its octal
//! escapes undone), the dirs an overlay names in its options (`lowerdir=a:b`, `lowerdir+=a`,
//! `datadir+=`, `upperdir=`, `workdir=`; one reading, [`dirs_in_mountinfo_options`], for every
//! way the overlay was mounted) or, for fuse-overlayfs, which shows none there, on its command
//! line; every mount namespace this process may read ([`mounted_overlays`]); and whether
//! given dirs are in use by any of them ([`find_use`]). What a tool refuses, and in which words,
//! stays with the tool.
//!
//! A mount lives in a mount namespace, and rootless mounts live in private ones that our own
//! /proc/self/mountinfo never shows, so [`mounted_overlays`] looks at every process's namespace:
//! /proc/PID/ns/mnt names it (each is read once), /proc/PID/mountinfo lists its mounts.
//! Namespaces we may not read (another user's) are skipped: a rootless user can only change what
//! it owns anyway.
//!
//! A path from another namespace means what it means there: [`find_use`] resolves it through
//! /proc/PID/root (and /proc/PID/cwd when relative) and compares by (device, inode), and a dir
//! counts as used when it is inside a used dir or holds one (changing a lower that holds a live
//! upper would change that overlay just the same).

use std::collections::HashSet;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::lowers::split_escaped;

/// A mount from mountinfo: where it is and its filesystem options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_point: PathBuf,
    pub fs_type: String,
    /// As mountinfo shows them (still escaped): [`MountEntry::overlay_dirs`] reads them.
    pub super_options: Vec<u8>,
}

impl MountEntry {
    /// The dirs of an overlay mount; `None` for other filesystems.
    pub(crate) fn overlay_dirs(&self) -> Option<Vec<UsedDir>> {
        (self.fs_type == "overlay").then(|| dirs_in_mountinfo_options(&self.super_options))
    }
}

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

/// Undo mountinfo's octal escapes (`\040` for a space, ...). A backslash that starts no valid
/// escape stays as it is.
pub(crate) fn unescape_octal(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'\\' && i + 4 <= s.len() {
            let d = &s[i + 1..i + 4];
            if d.iter().all(|c| (b'0'..=b'7').contains(c)) {
                let v = d.iter().fold(0u16, |v, c| v * 8 + u16::from(c - b'0'));
                if let Ok(v) = u8::try_from(v) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(s[i]);
        i += 1;
    }
    out
}

/// Parse a mountinfo text (/proc/PID/mountinfo).
pub(crate) fn parse_mountinfo(text: &[u8]) -> Vec<MountEntry> {
    text.split(|&c| c == b'\n')
        .filter_map(|line| {
            let sep = find(line, b" - ")?;
            let mount_point = line[..sep].split(|&c| c == b' ').nth(4)?;
            let mut post = line[sep + 3..].split(|&c| c == b' ');
            let fs_type = String::from_utf8_lossy(post.next()?).into_owned();
            let _source = post.next()?;
            let super_options = post.next().unwrap_or_default().to_vec();
            Some(MountEntry {
                mount_point: PathBuf::from(OsStr::from_bytes(&unescape_octal(mount_point))),
                fs_type,
                super_options,
            })
        })
        .collect()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The mounts of this process's own namespace.
pub fn own_mounts() -> Vec<MountEntry> {
    std::fs::read("/proc/self/mountinfo")
        .map(|t| parse_mountinfo(&t))
        .unwrap_or_default()
}

/// The mount mounted exactly at `path`, the last (topmost) one if several are.
pub fn mounted_at<'a>(mounts: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    mounts.iter().rev().find(|m| m.mount_point == path)
}

/// The overlay whose option `key` (`upperdir` or `workdir`) is exactly `dir`, if any, read as
/// `MountEntry::overlay_dirs` reads every overlay.
pub fn overlay_using<'a>(
    mounts: &'a [MountEntry],
    key: &str,
    dir: &Path,
) -> Option<&'a MountEntry> {
    mounts.iter().find(|m| {
        m.overlay_dirs()
            .is_some_and(|ds| ds.iter().any(|d| d.role == key && d.path == dir))
    })
}

/// The dirs named by overlay options as mountinfo shows them, whichever way the overlay was
/// mounted.
///
/// The kernel shows each option through `seq_escape`: a comma, space, tab, newline or backslash
/// inside a value appears as an octal escape (`\054`, `\134`, ...), so every raw `,` is a
/// separator. Each field then has its octal escapes undone, which gives the value exactly as
/// overlayfs holds it, and overlayfs's own rules read that value (seen on Linux 6.18):
/// - `lowerdir=`: layers split at each `:` not escaped with a backslash, a backslash escaping
///   the next character (`upperdir=/u\,p` given to mount(2) shows as `u\134\054p`);
/// - `upperdir=`, `workdir=`: a backslash escapes the next character, through mount(2) and
///   fsconfig alike (fsconfig `upperdir=/u,p` shows as `u\054p`; `/u\\q` names `/u\q`);
/// - `lowerdir+=`, `datadir+=` (fsconfig, one layer each): the path as given, no escapes.
pub(crate) fn dirs_in_mountinfo_options(opts: &[u8]) -> Vec<UsedDir> {
    let mut out = Vec::new();
    for field in opts.split(|&c| c == b',') {
        option_dirs(&unescape_octal(field), &mut out);
    }
    out
}

/// The dirs named by overlay mount options written as for mount(2) (`a=b,c=d`, a `\,` inside a
/// value; a fuse-overlayfs command line).
pub(crate) fn dirs_in_options(opts: &[u8]) -> Vec<UsedDir> {
    let mut out = Vec::new();
    for opt in split_escaped(opts, b',', true) {
        option_dirs(&opt, &mut out);
    }
    out
}

/// The dirs one overlay option `key=value` names, the value read by overlayfs's rules (see
/// [`dirs_in_mountinfo_options`]).
fn option_dirs(opt: &[u8], out: &mut Vec<UsedDir>) {
    let Some(eq) = opt.iter().position(|&c| c == b'=') else {
        return;
    };
    let (key, val) = (&opt[..eq], &opt[eq + 1..]);
    let key = String::from_utf8_lossy(key).into_owned();
    let push = |out: &mut Vec<UsedDir>, role: &str, p: &[u8]| {
        if !p.is_empty() {
            out.push(UsedDir {
                role: role.to_string(),
                path: PathBuf::from(OsStr::from_bytes(p)),
            });
        }
    };
    match key.as_str() {
        // `a:b`, `::` before data-only lowers, `\:` for a colon in a path.
        "lowerdir" => {
            for p in split_escaped(val, b':', false) {
                push(out, "lowerdir", &p);
            }
        }
        "lowerdir+" | "datadir+" => push(out, "lowerdir", val),
        "upperdir" | "workdir" => push(out, &key, &split_escaped(val, 0, false).concat()),
        _ => {}
    }
}

/// The overlays in a mountinfo text, named as mounted in namespace `ns` by process `pid`.
pub(crate) fn overlays_in_mountinfo(text: &[u8], pid: u32, ns: &str) -> Vec<Overlay> {
    parse_mountinfo(text)
        .into_iter()
        .filter_map(|m| {
            Some(Overlay {
                dirs: m.overlay_dirs()?,
                what: format!(
                    "the overlay on {} in mount namespace {ns}",
                    m.mount_point.display()
                ),
                pid,
            })
        })
        .collect()
}

/// The dirs of a fuse-overlayfs command line (`-o a=b,c=d` or `-oa=b`, any number of them).
pub(crate) fn fuse_overlayfs_dirs(cmdline: &[u8]) -> Vec<UsedDir> {
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

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
44 27 0:39 / /tmp/a\\040b rw,relatime - overlay overlay rw,lowerdir=/l,upperdir=/x/u,workdir=/x/w,uuid=on
45 27 0:40 / /tmp/f rw - fuse.fuse-overlayfs fuse-overlayfs rw,user_id=0
";

    #[test]
    fn finds_overlays_by_upper_and_work() {
        let m = parse_mountinfo(INFO.as_bytes());
        assert_eq!(m.len(), 3);
        assert_eq!(m[1].mount_point, Path::new("/tmp/a b"));
        assert_eq!(
            overlay_using(&m, "workdir", Path::new("/x/w"))
                .unwrap()
                .mount_point,
            Path::new("/tmp/a b")
        );
        assert!(overlay_using(&m, "workdir", Path::new("/x/u")).is_none());
        assert!(overlay_using(&m, "upperdir", Path::new("/x/u")).is_some());
        assert_eq!(
            mounted_at(&m, Path::new("/tmp/f")).unwrap().fs_type,
            "fuse.fuse-overlayfs"
        );
    }

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

    /// Lines captured on Linux 6.18 (see `dirs_in_mountinfo_options`): the same dirs, with a
    /// comma, a colon and a backslash in their names, mounted through mount(2) with overlayfs's
    /// escapes and through fsconfig with the names as they are.
    const ESCAPED: &[u8] = b"\
46 27 0:39 / /tmp/mi/m rw,relatime - overlay overlay rw,lowerdir=/tmp/mi/l\\134\\0541:/tmp/mi/l\\134:2:/tmp/mi/l\\134\\1343,upperdir=/tmp/mi/u\\134\\054p,workdir=/tmp/mi/w\\134\\134x,uuid=on
47 27 0:40 / /tmp/mi/n rw,relatime - overlay none rw,lowerdir+=/tmp/mi/l\\0541,lowerdir+=/tmp/mi/l:2,lowerdir+=/tmp/mi/l\\1343,upperdir=/tmp/mi/u\\054p,workdir=/tmp/mi/w\\134\\134x
";

    #[test]
    fn one_reading_for_mount2_and_fsconfig_options() {
        let want: Vec<(String, PathBuf)> = [
            ("lowerdir", "/tmp/mi/l,1"),
            ("lowerdir", "/tmp/mi/l:2"),
            ("lowerdir", "/tmp/mi/l\\3"),
            ("upperdir", "/tmp/mi/u,p"),
            ("workdir", "/tmp/mi/w\\x"),
        ]
        .map(|(r, p)| (r.to_string(), PathBuf::from(p)))
        .to_vec();
        let m = parse_mountinfo(ESCAPED);
        for (e, mp) in m.iter().zip(["/tmp/mi/m", "/tmp/mi/n"]) {
            let got: Vec<_> = e
                .overlay_dirs()
                .unwrap()
                .into_iter()
                .map(|d| (d.role, d.path))
                .collect();
            assert_eq!(got, want, "{mp}");
            for (key, dir) in [("upperdir", "/tmp/mi/u,p"), ("workdir", "/tmp/mi/w\\x")] {
                assert_eq!(
                    overlay_using(&m[..], key, Path::new(dir)).map(|e| e.mount_point.clone()),
                    Some(PathBuf::from("/tmp/mi/m")),
                    "{key}"
                );
                let only = std::slice::from_ref(e);
                assert!(
                    overlay_using(only, key, Path::new(dir)).is_some(),
                    "{mp} {key}"
                );
            }
            let only = std::slice::from_ref(e);
            assert!(overlay_using(only, "upperdir", Path::new("/tmp/mi/u\\,p")).is_none());
            assert!(overlay_using(only, "upperdir", Path::new("/tmp/mi/u")).is_none());
        }
    }

    fn root_or_skip(what: &str) -> bool {
        ovl_tests::require(&format!("root (for {what})"), ovl_tests::is_root())
    }

    /// Unmounts on drop.
    struct Mounted(PathBuf);
    impl Drop for Mounted {
        fn drop(&mut self) {
            let _ = rustix::mount::unmount(&self.0, rustix::mount::UnmountFlags::DETACH);
        }
    }

    /// Real mounts, both ways, of dirs with a comma, a colon and a backslash in their names:
    /// each is found by what it names.
    #[test]
    fn real_mounts_of_awkward_names_read_back_exactly() {
        use rustix::mount::*;
        if !root_or_skip("mounting overlays") {
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let d = |n: &str| {
            let p = t.path().join(n);
            std::fs::create_dir_all(&p).unwrap();
            p
        };
        let (l1, l2, l3) = (d("l,1"), d("l:2"), d("l\\3"));
        let (u1, w1, m1) = (d("u,p1"), d("w\\x1"), d("m1"));
        let (u2, w2, m2) = (d("u,p2"), d("w\\x2"), d("m2"));
        // mount(2): overlayfs's escapes in one option string.
        let esc = |p: &Path, also: &[char]| {
            let mut s = String::new();
            for c in p.to_str().unwrap().chars() {
                if c == '\\' || c == ',' || also.contains(&c) {
                    s.push('\\');
                }
                s.push(c);
            }
            s
        };
        let data = format!(
            "lowerdir={}:{}:{},upperdir={},workdir={}",
            esc(&l1, &[':']),
            esc(&l2, &[':']),
            esc(&l3, &[':']),
            esc(&u1, &[]),
            esc(&w1, &[])
        );
        mount(
            "overlay",
            &m1,
            "overlay",
            MountFlags::empty(),
            Some(std::ffi::CString::new(data).unwrap().as_c_str()),
        )
        .unwrap();
        let _m1 = Mounted(m1.clone());
        // fsconfig: one lowerdir+ per layer as it is; upperdir and workdir still take
        // overlayfs's backslash escapes (a raw comma needs none).
        let fs = fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC).unwrap();
        for l in [&l1, &l2, &l3] {
            fsconfig_set_string(&fs, "lowerdir+", l.as_path()).unwrap();
        }
        fsconfig_set_string(&fs, "upperdir", u2.to_str().unwrap()).unwrap();
        fsconfig_set_string(&fs, "workdir", esc(&w2, &[]).as_str()).unwrap();
        fsconfig_create(&fs).unwrap();
        let mnt = fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, MountAttrFlags::empty()).unwrap();
        move_mount(
            &mnt,
            "",
            rustix::fs::CWD,
            &m2,
            MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
        )
        .unwrap();
        let _m2 = Mounted(m2.clone());
        let all = own_mounts();
        for (m, u, w) in [(&m1, &u1, &w1), (&m2, &u2, &w2)] {
            let e = mounted_at(&all, m).expect("mounted");
            let dirs: Vec<_> = e
                .overlay_dirs()
                .unwrap()
                .into_iter()
                .map(|d| d.path)
                .collect();
            assert_eq!(
                dirs,
                vec![l1.clone(), l2.clone(), l3.clone(), u.clone(), w.clone()],
                "{}",
                String::from_utf8_lossy(&e.super_options)
            );
            assert_eq!(overlay_using(&all, "upperdir", u).unwrap().mount_point, *m);
            assert_eq!(overlay_using(&all, "workdir", w).unwrap().mount_point, *m);
        }
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
