//! Stacks whose lowers were once uppers (issue 11): each layer written by the kernel through a
//! read-write mount of everything below it with redirect_dir, metacopy and index on, then
//! read by ovl-diff (`--lower`, the layers applied by umoci), `ovl-squash --output` and
//! `ovl-squash --in-place`, each compared with a fresh kernel mount of the same layers.

use std::path::Path;

use ovl_tests::stack::{RW_OPTS, Stack, assert_same, snap};
use ovl_tests::{is_root, require};

/// These tests mount overlays: one at a time (a parallel rootless test's namespace could keep
/// a copy of a short-lived mount and make a squash rightly refuse a "mounted" dir).
fn serial_root() -> Option<std::sync::MutexGuard<'static, ()>> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    require("root (kernel overlay mounts)", is_root()).then_some(g)
}

/// Every tool's result for the stack equals its merged view.
fn prove(s: &Stack, t: &Path) {
    let want = s.merged();
    let rootfs = s.diff_applied(&t.join("diff")).unwrap();
    assert_same("ovl-diff layers applied by umoci", &want, &snap(&rootfs));
    let out = t.join("out");
    s.squash_output(&out).unwrap();
    assert_same("squash --output", &want, &snap(&out));
    let lower = s.in_place_chain(t).unwrap();
    assert_same("squash --in-place, layer by layer", &want, &snap(&lower));
}

fn stack(t: &Path, base: &str) -> Stack {
    std::fs::create_dir_all(t.join("diff")).unwrap();
    let s = Stack::new(t);
    ovl_tests::run_ok(
        std::process::Command::new("/bin/sh")
            .arg("-ec")
            .arg(base)
            .current_dir(&s.base),
    );
    s
}

/// Bug 3: a directory renamed in one upper, renamed again over it: the second upper holds only
/// a whiteout and a redirect to the first upper's redirect.
#[test]
fn redirects_in_the_lowers_are_followed() {
    let Some(_g) = serial_root() else { return };
    let t = tempfile::tempdir().unwrap();
    let mut s = stack(
        t.path(),
        "mkdir -p a/d/sub; echo 1 > a/d/f; echo 2 > a/d/sub/g",
    );
    s.add_script(RW_OPTS, "mv a/d a/e");
    s.add_script(RW_OPTS, "mv a/e a/g");
    assert!(s.merged().contains_key(b"a/g/sub/g".as_slice()));
    prove(&s, t.path());
}

/// Bug 3, absolute: moved across directories twice, then a file added inside.
#[test]
fn absolute_redirects_in_the_lowers_are_followed() {
    let Some(_g) = serial_root() else { return };
    let t = tempfile::tempdir().unwrap();
    let mut s = stack(
        t.path(),
        "mkdir -p a/d/sub b c; echo 1 > a/d/f; echo 2 > a/d/sub/g",
    );
    s.add_script(RW_OPTS, "mv a/d b/d");
    s.add_script(RW_OPTS, "mv b/d c/x && echo 3 > c/x/new");
    s.add_script(RW_OPTS, "mv c/x/sub c/sub2 && rm c/x/f");
    prove(&s, t.path());
}

/// Bug 4: a metacopy file in a lower is read for its data from below, not as its empty body.
#[test]
fn metacopy_files_in_the_lowers_are_read_from_below() {
    let Some(_g) = serial_root() else { return };
    let t = tempfile::tempdir().unwrap();
    let mut s = stack(t.path(), "echo hello > f; mkdir d; echo world > d/w");
    s.add_script(RW_OPTS, "chmod 600 f && mv f g && chown 5:5 d/w");
    s.add_script(RW_OPTS, "chmod 640 g && chmod 604 d/w");
    let want = s.merged();
    assert_eq!(want[&b"g".to_vec()].size, 6);
    prove(&s, t.path());
}

/// Bug 5: `chmod 700 /` in the container: the merged root takes the upper's attributes.
#[test]
fn a_changed_root_is_carried() {
    let Some(_g) = serial_root() else { return };
    let t = tempfile::tempdir().unwrap();
    let mut s = stack(t.path(), "echo x > f");
    s.add_script(
        RW_OPTS,
        "chmod 700 . && chown 3:4 . && setfattr -n user.root -v 1 .",
    );
    let want = s.merged();
    assert_eq!(want[&Vec::new()].mode, 0o700);
    prove(&s, t.path());
}

/// Bug 1: a directory renamed into an opaque (new) parent keeps its content in place.
#[test]
fn a_directory_renamed_into_a_new_parent() {
    let Some(_g) = serial_root() else { return };
    let t = tempfile::tempdir().unwrap();
    let mut s = stack(
        t.path(),
        "mkdir -p a/d1/sub a/e1; echo 1 > a/d1/f; echo 2 > a/d1/sub/g",
    );
    s.add_script(RW_OPTS, "mkdir a/e1/new && mv a/d1 a/e1/new/d1");
    prove(&s, t.path());
}

/// Bug 2: a rename nested inside a renamed directory keeps its content.
#[test]
fn a_rename_inside_a_renamed_directory() {
    let Some(_g) = serial_root() else { return };
    let t = tempfile::tempdir().unwrap();
    let mut s = stack(
        t.path(),
        "mkdir -p a/d1/pop/deep a/e1; echo 1 > a/d1/pop/f; echo 2 > a/d1/pop/deep/g; echo 3 > a/d1/top",
    );
    s.add_script(RW_OPTS, "mv a/d1/pop a/d1/popx && mv a/d1 a/e1/d1");
    prove(&s, t.path());
}

/// Found by the unionmount-testsuite (rename-hard-link, metacopy without index, rotated
/// layers): a renamed name of a hardlinked lower file is a metacopy file, an inode of its own
/// in the merged view; `--in-place` must not link it back to the lower inode's other names.
#[test]
fn renamed_hardlinks_without_index_stay_apart() {
    let Some(_g) = serial_root() else { return };
    let t = tempfile::tempdir().unwrap();
    let mut s = stack(t.path(), "echo x > foo");
    const OPTS: &str = "redirect_dir=on,metacopy=on";
    s.add_script(OPTS, "ln foo no_foo");
    s.add_script(OPTS, "mv no_foo no_foo-a");
    s.add_script(OPTS, "mv no_foo-a no_foo");
    s.add_script(OPTS, "mv foo foo-a");
    prove(&s, t.path());
}
