//! Process identity across the tools: run as root of a user namespace that ovl did not make
//! (`unshare -r`, as `podman unshare` and `buildah unshare` do), every tool must see that it is
//! not real root: `user.overlay.*` markers, the single-id owner policy, userxattr mounts.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

use ovl_tests::{TestUser, bin, command_as, output, require, user_tempdir, which};

/// The test user and `unshare` (util-linux).
fn setup() -> Option<TestUser> {
    let user = ovl_tests::require_test_user()?;
    require("unshare (util-linux)", which("unshare").is_some()).then_some(user)
}

/// `unshare -r TOOL`, run as `user`: root of a new user namespace that maps only the user.
fn unshare_r(user: &TestUser, tool: &str) -> Command {
    let mut c = command_as(user, &which("unshare").unwrap());
    c.arg("-r").arg(bin(tool));
    c
}

fn header(path: &str, kind: tar::EntryType, uid: u64, gid: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_path(path).unwrap();
    h.set_entry_type(kind);
    h.set_uid(uid);
    h.set_gid(gid);
    h.set_mtime(1_700_000_000);
    h.set_mode(if kind == tar::EntryType::Directory {
        0o755
    } else {
        0o644
    });
    h.set_size(0);
    h
}

/// Import a layer tar of `entries` (path, kind, uid, gid) as `user` under `unshare -r`.
fn import_under_unshare_r(
    user: &TestUser,
    entries: &[(&str, tar::EntryType, u64, u64)],
) -> TempDir {
    let t = user_tempdir(user);
    let mut b = tar::Builder::new(Vec::new());
    for &(path, kind, uid, gid) in entries {
        let mut h = header(path, kind, uid, gid);
        h.set_cksum();
        b.append(&h, std::io::empty()).unwrap();
    }
    let archive = t.path().join("layer.tar");
    std::fs::write(&archive, b.into_inner().unwrap()).unwrap();
    let out = output(
        unshare_r(user, "ovl-import")
            .arg(&archive)
            .arg(t.path().join("dest")),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    t
}

fn xattr_of(p: &Path, name: &str) -> Option<Vec<u8>> {
    xattr::get(p, name).unwrap()
}

#[test]
fn unshare_r_import_marks_opaque_dirs_in_user_xattrs() {
    let Some(user) = setup() else {
        return;
    };
    use tar::EntryType::{Directory, Regular};
    let t = import_under_unshare_r(
        &user,
        &[
            ("etc/", Directory, 0, 0),
            ("etc/.wh..wh..opq", Regular, 0, 0),
            ("etc/passwd", Regular, 0, 0),
            (".wh.gone", Regular, 0, 0),
        ],
    );
    let dest = t.path().join("dest");
    // Root of a namespace cannot write trusted.*: the opaque marker is the userxattr one.
    let etc = dest.join("etc");
    assert_eq!(xattr_of(&etc, "user.overlay.opaque"), Some(b"y".to_vec()));
    assert_eq!(xattr_of(&etc, "trusted.overlay.opaque"), None);
    let gone = std::fs::symlink_metadata(dest.join("gone")).unwrap();
    assert!(gone.file_type().is_char_device() && gone.rdev() == 0);
}

#[test]
fn unshare_r_import_records_owners_as_a_single_id_map_does() {
    let Some(user) = setup() else {
        return;
    };
    use tar::EntryType::{Directory, Regular};
    let t = import_under_unshare_r(
        &user,
        &[
            ("etc/", Directory, 0, 0),
            ("etc/passwd", Regular, 0, 0),
            ("etc/shadow", Regular, 0, 42),
            ("home/", Directory, 0, 0),
            ("home/bob", Regular, 42, 42),
        ],
    );
    let dest = t.path().join("dest");
    // Only the user is mapped: owners are the user's, the image's recorded as umoci does.
    for f in ["etc/passwd", "etc/shadow", "home/bob"] {
        let m = std::fs::symlink_metadata(dest.join(f)).unwrap();
        assert_eq!((m.uid(), m.gid()), (user.uid, user.gid), "{f}");
    }
    let x = |f: &str| xattr_of(&dest.join(f), "user.rootlesscontainers");
    assert_eq!(x("etc/passwd"), None);
    assert_eq!(x("etc/shadow"), Some(vec![0x10, 42]));
    assert_eq!(x("home/bob"), Some(vec![0x08, 42, 0x10, 42]));
}

#[test]
fn unshare_r_mount_uses_userxattr_so_a_lower_dir_can_be_removed() {
    let Some(user) = setup() else {
        return;
    };
    let t = user_tempdir(&user);
    let dir = |p: &str| {
        let d = t.path().join(p);
        std::fs::create_dir_all(&d).unwrap();
        d
    };
    let lower = dir("lower");
    std::fs::create_dir_all(lower.join("tree/sub")).unwrap();
    std::fs::write(lower.join("tree/sub/f"), b"f").unwrap();
    std::fs::write(lower.join("keep"), b"k").unwrap();
    let merged = dir("merged");
    chown_tree(t.path(), &user);
    let (upper, work) = (t.path().join("upper"), t.path().join("work"));
    let out = output(
        unshare_r(&user, "ovl-mount")
            .arg("-v")
            .arg("--lower")
            .arg(&lower)
            .arg("--upper")
            .arg(&upper)
            .arg("--work")
            .arg(&work)
            .arg(&merged)
            .args([
                "--",
                "sh",
                "-c",
                "rm -rf tree && test ! -e tree && cat keep",
            ]),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(out.stdout, b"k");
    assert!(stderr.contains("userxattr"), "{stderr}");
    // The lower is untouched; the upper holds the whiteout of the removed dir.
    assert!(lower.join("tree/sub/f").is_file());
    let wh = std::fs::symlink_metadata(upper.join("tree")).unwrap();
    assert!(wh.file_type().is_char_device() && wh.rdev() == 0);
}

fn chown_tree(root: &Path, user: &TestUser) {
    for e in walkdir::WalkDir::new(root) {
        let p: PathBuf = e.unwrap().into_path();
        rustix::fs::chown(
            &p,
            Some(rustix::fs::Uid::from_raw(user.uid)),
            Some(rustix::fs::Gid::from_raw(user.gid)),
        )
        .unwrap();
    }
}

/// `--uidmap`/`--gidmap` name host ids: every tool refuses them unless real root, as a user
/// and as root of a namespace it did not make, before it does anything.
#[test]
fn explicit_maps_need_real_root() {
    let Some(user) = setup() else {
        return;
    };
    let t = user_tempdir(&user);
    let upper = t.path().join("upper");
    std::fs::create_dir(&upper).unwrap();
    let dest = t.path().join("dest");
    let lower = t.path().join("lower");
    std::fs::create_dir(&lower).unwrap();
    for (tool, args) in [
        ("ovl-import", vec!["-".into(), dest.clone()]),
        ("ovl-diff", vec![upper.clone()]),
        (
            "ovl-squash",
            vec![
                "--lower".into(),
                lower.clone(),
                "--upper".into(),
                upper.clone(),
                "--output".into(),
                dest.clone(),
            ],
        ),
    ] {
        for how in ["user", "unshare -r"] {
            let mut c = if how == "user" {
                command_as(&user, &bin(tool))
            } else {
                unshare_r(&user, tool)
            };
            let out = output(c.args(["--uidmap", "0:100000:10"]).args(&args));
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{tool} as {how}: {err}");
            assert!(
                err.starts_with(&format!("{tool}: error: --uidmap/--gidmap need real root")),
                "{tool} as {how}: {err}"
            );
            assert!(!dest.exists(), "{tool} as {how} made {}", dest.display());
        }
    }
}
