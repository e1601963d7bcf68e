use super::meta::{VFS_CAP_REVISION_2, VFS_CAP_REVISION_3};
use super::*;
use rustix::fs::{FileType, Mode};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

fn mknod_whiteout(p: &Path) {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        p,
        FileType::CharacterDevice,
        Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
}

fn summary(changes: &[Change]) -> Vec<String> {
    changes
        .iter()
        .map(|c| match c {
            Change::Whiteout(p) => format!("wh {p}"),
            Change::Redirect { path, from } => format!("redirect {path} <- {from}"),
            Change::Entry(e) => match &e.kind {
                Kind::Dir { opaque } => {
                    format!("dir {}{}", e.path, if *opaque { " opaque" } else { "" })
                }
                Kind::File { source, .. } => {
                    format!("file {} {:?} {}", e.path, source.layer, source.path)
                }
                Kind::Hardlink { target } => format!("link {} -> {target}", e.path),
                Kind::Symlink { .. } => format!("symlink {}", e.path),
                Kind::CharDevice { major, minor } => {
                    format!("chr {} {major}:{minor}", e.path)
                }
                other => format!("{other:?} {}", e.path),
            },
        })
        .collect()
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

#[test]
fn kernel_and_fuse_forms_and_hardlinks() {
    if !is_root() {
        eprintln!("SKIPPED: needs root for mknod and trusted xattrs");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let u = t.path();
    std::fs::create_dir_all(u.join("a/opq")).unwrap();
    std::fs::create_dir_all(u.join("fuse/opqdir")).unwrap();
    std::fs::create_dir_all(u.join("x")).unwrap();
    // Three kernel whiteouts that share one inode, as the kernel makes them.
    mknod_whiteout(&u.join("a/gone1"));
    std::fs::hard_link(u.join("a/gone1"), u.join("a/gone2")).unwrap();
    std::fs::hard_link(u.join("a/gone1"), u.join("x/gone3")).unwrap();
    xattr::set(u.join("a/opq"), "trusted.overlay.opaque", b"y").unwrap();
    xattr::set(u.join("a"), "trusted.overlay.origin", b"zz").unwrap();
    // fuse-overlayfs markers.
    std::fs::write(u.join("fuse/.wh.old"), b"").unwrap();
    std::fs::write(u.join("fuse/opqdir/.wh..wh..opq"), b"").unwrap();
    mknod_whiteout(&u.join("fuse/opqdir/.wh..opq"));
    // An xattr whiteout in a directory marked opaque=x (not opaque).
    std::fs::write(u.join("x/xwh"), b"").unwrap();
    xattr::set(u.join("x/xwh"), "user.overlay.whiteout", b"").unwrap();
    xattr::set(u.join("x"), "user.overlay.opaque", b"x").unwrap();
    // Real hardlinks, and an escaped xattr.
    std::fs::write(u.join("x/f"), b"data").unwrap();
    std::fs::hard_link(u.join("x/f"), u.join("a/f2")).unwrap();
    xattr::set(u.join("x/f"), "user.overlay.overlay.keep", b"1").unwrap();
    xattr::set(u.join("x/f"), "user.plain", b"2").unwrap();
    std::fs::set_permissions(u.join("x/f"), std::fs::Permissions::from_mode(0o4755)).unwrap();

    let up = Upper::open(u, &UpperOptions::default()).unwrap();
    let changes = up.changes().unwrap();
    assert_eq!(
        summary(&changes),
        [
            "dir .",
            "dir a",
            "wh a/gone1",
            "wh a/gone2",
            "file a/f2 Upper a/f2",
            "dir a/opq opaque",
            "dir fuse",
            "wh fuse/old",
            "dir fuse/opqdir opaque",
            "dir x",
            "wh x/gone3",
            "wh x/xwh",
            "link x/f -> a/f2",
        ]
        .map(String::from)
    );
    // "a" sorts before "x": a/f2 is met first, so it carries the data and the metadata.
    let f2 = changes
        .iter()
        .find_map(|c| match c {
            Change::Entry(e) if e.path.as_bytes() == b"a/f2" => Some(e.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(f2.meta.mode, 0o4755);
    assert_eq!(
        f2.meta.xattrs,
        vec![
            (b"user.overlay.keep".to_vec(), b"1".to_vec()),
            (b"user.plain".to_vec(), b"2".to_vec())
        ]
    );
    let a = changes
        .iter()
        .find_map(|c| match c {
            Change::Entry(e) if e.path.as_bytes() == b"a" => Some(e.clone()),
            _ => None,
        })
        .unwrap();
    assert!(a.meta.xattrs.is_empty(), "{:?}", a.meta.xattrs);
}

#[test]
fn redirect_and_metacopy_need_lowers_and_expand_with_them() {
    let t = tempfile::tempdir().unwrap();
    let (l, u) = (t.path().join("lower"), t.path().join("upper"));
    std::fs::create_dir_all(l.join("old/sub")).unwrap();
    std::fs::write(l.join("old/sub/deep"), b"deep").unwrap();
    std::fs::write(l.join("old/keep"), b"keep").unwrap();
    std::fs::write(l.join("old/del"), b"del").unwrap();
    std::fs::write(l.join("big"), b"lower data").unwrap();
    std::fs::create_dir_all(u.join("new")).unwrap();
    std::fs::write(u.join("new/added"), b"added").unwrap();
    std::fs::write(u.join("new/.wh.del"), b"").unwrap();
    xattr::set(u.join("new"), "user.overlay.redirect", b"old").unwrap();
    std::fs::write(u.join(".wh.old"), b"").unwrap();
    let f = std::fs::File::create(u.join("big")).unwrap();
    f.set_len(10).unwrap();
    xattr::set(u.join("big"), "user.overlay.metacopy", b"").unwrap();

    let err = Upper::open(&u, &UpperOptions::default())
        .unwrap()
        .changes()
        .unwrap_err();
    assert!(matches!(err, UpperError::NeedsLowers { .. }), "{err}");
    assert!(err.to_string().contains("big"), "{err}");

    let opts = UpperOptions {
        lowers: vec![l.clone()],
        ids: None,
    };
    let up = Upper::open(&u, &opts).unwrap();
    assert_eq!(
        summary(&up.changes().unwrap()),
        [
            "dir .",
            "wh old",
            "file big Lower(0) big",
            "redirect new <- old",
            "dir new opaque",
            "file new/added Upper new/added",
            "file new/keep Lower(0) old/keep",
            "dir new/sub",
            "file new/sub/deep Lower(0) old/sub/deep",
        ]
        .map(String::from)
    );
    let mut s = String::new();
    use std::io::Read;
    up.open_source(&Source {
        layer: Layer::Lower(0),
        path: LayerPath::parse(b"big").unwrap(),
    })
    .unwrap()
    .read_to_string(&mut s)
    .unwrap();
    assert_eq!(s, "lower data");
}

#[test]
fn lower_stack_whiteouts_hide() {
    let t = tempfile::tempdir().unwrap();
    let (l1, l2, u) = (t.path().join("l1"), t.path().join("l2"), t.path().join("u"));
    std::fs::create_dir_all(l2.join("d")).unwrap();
    std::fs::write(l2.join("d/a"), b"a").unwrap();
    std::fs::write(l2.join("d/b"), b"b").unwrap();
    std::fs::create_dir_all(l1.join("d")).unwrap();
    std::fs::write(l1.join("d/.wh.a"), b"").unwrap();
    std::fs::write(l1.join("d/c"), b"c").unwrap();
    std::fs::create_dir_all(u.join("e")).unwrap();
    xattr::set(u.join("e"), "user.overlay.redirect", b"/d").unwrap();
    let up = Upper::open(
        &u,
        &UpperOptions {
            lowers: vec![l1, l2],
            ids: None,
        },
    )
    .unwrap();
    assert_eq!(
        summary(&up.changes().unwrap()),
        [
            "dir .",
            "redirect e <- d",
            "dir e opaque",
            "file e/b Lower(1) d/b",
            "file e/c Lower(0) d/c",
        ]
        .map(String::from)
    );
}

/// In the lowers too, an `overlay.whiteout` file hides only inside an `opaque=x` directory.
#[test]
fn lower_xattr_whiteouts_need_an_opaque_x_parent() {
    let t = tempfile::tempdir().unwrap();
    let (l1, l2, u) = (t.path().join("l1"), t.path().join("l2"), t.path().join("u"));
    for d in ["d", "x"] {
        std::fs::create_dir_all(l2.join(d)).unwrap();
        std::fs::write(l2.join(d).join("a"), b"a").unwrap();
        std::fs::create_dir_all(l1.join(d)).unwrap();
        std::fs::write(l1.join(d).join("a"), b"").unwrap();
        xattr::set(l1.join(d).join("a"), "user.overlay.whiteout", b"").unwrap();
    }
    xattr::set(l1.join("x"), "user.overlay.opaque", b"x").unwrap();
    std::fs::create_dir_all(u.join("e")).unwrap();
    xattr::set(u.join("e"), "user.overlay.redirect", b"/d").unwrap();
    std::fs::create_dir_all(u.join("y")).unwrap();
    xattr::set(u.join("y"), "user.overlay.redirect", b"/x").unwrap();
    let up = Upper::open(
        &u,
        &UpperOptions {
            lowers: vec![l1, l2],
            ids: None,
        },
    )
    .unwrap();
    assert_eq!(
        summary(&up.changes().unwrap()),
        [
            "dir .",
            "redirect e <- d",
            "dir e opaque",
            "file e/a Lower(0) d/a",
            "redirect y <- x",
            "dir y opaque",
        ]
        .map(String::from)
    );
}

/// `overlay.nlink` (as an index=on copy-up leaves it, seen on 6.18: `U+0` on the only
/// upper name of a lower file with two names) refuses the upper unless every merged name
/// is in it; what `changes()` (ovl-squash) and `walk()` (ovl-diff) both meet first.
#[test]
fn index_copy_up_missing_names_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let u = t.path();
    std::fs::create_dir_all(u.join("d")).unwrap();
    std::fs::write(u.join("hl1"), b"x").unwrap();
    let changes = |u: &Path| Upper::open(u, &UpperOptions::default()).unwrap().changes();
    // One name in the upper, two in the merged view.
    xattr::set(u.join("hl1"), "user.overlay.nlink", b"U+0").unwrap();
    let err = changes(u).unwrap_err();
    assert!(matches!(err, UpperError::IndexedHardlink { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains(&format!("{}/hl1", u.display())), "{msg}");
    assert!(msg.contains("index=on") && msg.contains("2 names"), "{msg}");
    // Both names copied up (the kernel then writes U-1): fine, a link entry.
    std::fs::hard_link(u.join("hl1"), u.join("d/hl2")).unwrap();
    xattr::set(u.join("hl1"), "user.overlay.nlink", b"U-1").unwrap();
    assert_eq!(
        summary(&changes(u).unwrap()),
        [
            "dir .",
            "dir d",
            "file d/hl2 Upper d/hl2",
            "link hl1 -> d/hl2"
        ]
        .map(String::from)
    );
    // A third name made through the mount (U+0 again) but only two in the upper.
    xattr::set(u.join("hl1"), "user.overlay.nlink", b"U+0").unwrap();
    let err = changes(u).unwrap_err();
    assert!(
        err.to_string().contains(&format!("{}/d/hl2", u.display())),
        "{err}"
    );
    // Relative to the lower: cannot be checked, refused; junk: a bad xattr.
    xattr::set(u.join("hl1"), "user.overlay.nlink", b"L+0").unwrap();
    let err = changes(u).unwrap_err();
    assert!(matches!(err, UpperError::IndexedHardlink { .. }), "{err}");
    for junk in [&b"2"[..], b"U+", b"U\xc3\xa9", b"X+1", b"U+1x"] {
        xattr::set(u.join("hl1"), "user.overlay.nlink", junk).unwrap();
        let err = changes(u).unwrap_err();
        assert!(matches!(err, UpperError::BadXattr { .. }), "{err}");
    }
    // nfs_export=on indexes every copy-up: one name, one merged name (U-1) is fine.
    std::fs::remove_file(u.join("d/hl2")).unwrap();
    xattr::set(u.join("hl1"), "user.overlay.nlink", b"U-1").unwrap();
    assert_eq!(
        summary(&changes(u).unwrap()),
        ["dir .", "dir d", "file hl1 Upper hl1"].map(String::from)
    );
}

#[test]
fn capabilities_v3_become_v2_at_namespace_root() {
    let mut v3 = vec![0u8; 24];
    v3[..4].copy_from_slice(&(VFS_CAP_REVISION_3 | 1).to_le_bytes());
    v3[4] = 0xaa;
    v3[20..24].copy_from_slice(&1000u32.to_le_bytes());
    let map = crate::idmap::IdMap::single(1000);
    let v2 = layer_capability(&v3, Some(&map)).unwrap();
    assert_eq!(v2.len(), 20);
    assert_eq!(
        u32::from_le_bytes(v2[..4].try_into().unwrap()),
        VFS_CAP_REVISION_2 | 1
    );
    assert_eq!(v2[4], 0xaa);
    // Unmapped namespace root: refused.
    assert_eq!(
        layer_capability(&v3, Some(&crate::idmap::IdMap::single(5))),
        None
    );
    assert_eq!(layer_capability(&v2, None), Some(v2.clone()));
    assert_eq!(layer_capability(b"junk", None), None);
}
