//! `cargo xtask e2e` without its fixture fails at once, naming the fixture and the ways out,
//! before it builds anything (it used to build the release binaries first).

use std::process::Command;

#[test]
fn e2e_without_the_fixture_fails_before_building() {
    let t = tempfile::tempdir().unwrap();
    let empty_mirror = t.path().join("mirror");
    std::fs::create_dir(&empty_mirror).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .arg("e2e")
        // An empty cache and a mirror without the file: nothing to be had.
        .env("CARGO_TARGET_DIR", t.path().join("target"))
        .env("OVL_FIXTURE_MIRROR", &empty_mirror)
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(!out.status.success());
    assert!(
        stderr.contains("alpine-minirootfs-3.20.3-x86_64.tar.gz")
            && stderr.contains("OVL_FIXTURE_MIRROR"),
        "{stderr}"
    );
    assert!(!stdout.contains("cargo build"), "it built first: {stdout}");
    assert!(!t.path().join("target/release").exists(), "it built first");
}
