//! The CI proof for ovl-diff: for a kernel upper made by root, a rootless kernel upper and a
//! rootless fuse-overlayfs upper (the shared [`scenario`]: whiteouts, opaque dirs, type
//! changes, copy-ups, hardlinks, xattrs, special files), the layer ovl-diff writes, applied
//! onto the base by umoci (`umoci raw add-layer` + `umoci raw unpack`), equals the merged view
//! entry for entry (see [`scenario::compare_options`] for the few fields left out, and why).
//!
//! Rootless uppers are exported by the test user *outside* its user namespace (ovl-diff maps
//! host ids back through the user's subordinate ranges) and, for the kernel driver, also from
//! inside it through `ovl-mount -- ovl-diff`: both layers must be byte-identical.

use std::path::{Path, PathBuf};
use std::process::Command;

use ovl_tests::scenario::{self, Driver, Scenario};
use ovl_tests::{bin, command_as, run_ok};

#[test]
fn scenario_snapshot_helper() {
    scenario::snapshot_helper();
}

/// Run ovl-diff on the scenario's upper the way its owner would: root directly, the test user
/// as itself (outside any namespace). Returns the layer path.
fn diff_as_owner(s: &Scenario, name: &str, extra: &[&str]) -> PathBuf {
    let out = s.dir.path().join(name);
    let mut cmd = match &s.user {
        Some(u) => command_as(u, &bin("ovl-diff")),
        None => Command::new(bin("ovl-diff")),
    };
    cmd.arg("-q").args(extra).arg("-o").arg(&out).arg(&s.upper);
    run_ok(&mut cmd);
    out
}

/// Every entry of a tar: (name, type, uid, gid, rdev), through GNU tar's listing.
fn listing(layer: &Path) -> String {
    String::from_utf8_lossy(&run_ok(
        Command::new("tar")
            .args(["--numeric-owner", "-tvf"])
            .arg(layer),
    ))
    .into_owned()
}

fn prove(driver: Driver) {
    let Some(s) = scenario::build(driver) else {
        return;
    };
    let layer = diff_as_owner(&s, "layer.tar", &[]);

    // Never a char device 0/0 or a host id in the layer, and the markers are there.
    let list = listing(&layer);
    assert!(
        !list
            .lines()
            .any(|l| l.starts_with('c') && l.contains(" 0,0 ")),
        "{list}"
    );
    // Container ids only: nothing above the rootless range (the test user's subordinate ids
    // start at 100000 or more).
    for l in list.lines() {
        let owner = l.split_whitespace().nth(1).unwrap_or("");
        for id in owner.split('/') {
            let id: u32 = id
                .parse()
                .unwrap_or_else(|_| panic!("owner {owner:?} in {l:?}"));
            assert!(id <= 65536, "a host id in the layer: {l}");
        }
    }
    for want in [
        "etc/.wh.hostname",
        "etc/.wh.modprobe.d",
        "usr/share/apk/keys/.wh..wh..opq",
        "root/h2 link to root/h1",
    ] {
        assert!(
            list.contains(want),
            "{want} missing from the layer:\n{list}"
        );
    }

    // Reproducible: the same upper gives the same bytes, also gzip'ed with any thread count.
    let again = diff_as_owner(&s, "again.tar", &["--threads", "1"]);
    assert!(
        std::fs::read(&layer).unwrap() == std::fs::read(&again).unwrap(),
        "not reproducible"
    );
    let gz1 = diff_as_owner(&s, "l1.tar.gz", &["--compress", "gzip", "--threads", "1"]);
    let gz3 = diff_as_owner(&s, "l3.tar.gz", &["--compress", "gzip", "--threads", "3"]);
    assert!(
        std::fs::read(&gz1).unwrap() == std::fs::read(&gz3).unwrap(),
        "gzip depends on threads"
    );
    let gunzipped = run_ok(Command::new("gzip").arg("-dc").arg(&gz1));
    assert!(
        gunzipped == std::fs::read(&layer).unwrap(),
        "gzip layer is not the tar"
    );

    if driver == Driver::RootlessKernel {
        // Inside the user namespace (through ovl-mount) the ids are already container ids:
        // the same layer, byte for byte.
        let user = s.user.as_ref().unwrap();
        let inside = s.dir.path().join("inside.tar");
        let merged2 = s.dir.path().join("merged2");
        std::fs::create_dir(&merged2).unwrap();
        rustix::fs::chown(
            &merged2,
            Some(rustix::fs::Uid::from_raw(user.uid)),
            Some(rustix::fs::Gid::from_raw(user.gid)),
        )
        .unwrap();
        run_ok(
            command_as(user, &bin("ovl-mount"))
                .args(["--driver", "kernel", "--idmap", "subids", "--lower"])
                .arg(&s.base)
                .arg(&merged2)
                .arg("--")
                .arg(bin("ovl-diff"))
                .arg("-q")
                .arg("-o")
                .arg(&inside)
                .arg(&s.upper),
        );
        assert!(
            std::fs::read(&layer).unwrap() == std::fs::read(&inside).unwrap(),
            "the layer made inside the user namespace differs from the one made outside"
        );
    }

    eprintln!(
        "{driver:?}: layer {} bytes, gzip {} bytes, merged view {} entries",
        std::fs::metadata(&layer).unwrap().len(),
        std::fs::metadata(&gz1).unwrap().len(),
        s.merged.len()
    );

    // The proof: umoci applies base + layer; the result is the merged view.
    let work = s.dir.path().join("umoci");
    std::fs::create_dir(&work).unwrap();
    let base_tar = scenario::decompressed(&s.alpine, &work);
    let rootfs = scenario::umoci_apply(&work, &[&base_tar, &layer]);
    let applied = ovl_tests::snapshot::snapshot(&rootfs, &scenario::compare_options()).unwrap();
    let diffs = ovl_tests::snapshot::differences(&s.merged, &applied);
    assert!(
        diffs.is_empty(),
        "{driver:?}: the layer applied by umoci differs from the merged view (first: merged, second: umoci):\n{}",
        diffs.join("\n")
    );
    // A proof that compares nothing proves nothing.
    assert!(s.merged.len() > 400, "{} entries", s.merged.len());
    for p in [
        &b"etc/services/inside"[..],
        b"usr/share/apk/keys/only",
        b"tmp/fifo",
        b"root/h2",
    ] {
        assert!(s.merged.contains_key(p), "{}", String::from_utf8_lossy(p));
    }
    assert!(!s.merged.contains_key(&b"etc/hostname"[..]));
}

#[test]
fn umoci_applied_layer_equals_merged_view_root_kernel() {
    prove(Driver::RootKernel);
}

#[test]
fn umoci_applied_layer_equals_merged_view_rootless_kernel() {
    prove(Driver::RootlessKernel);
}

#[test]
fn umoci_applied_layer_equals_merged_view_rootless_fuse() {
    prove(Driver::RootlessFuse);
}

/// The scenario's snapshot encoding round-trips (the rootless proof depends on it).
#[test]
fn snapshot_encoding_round_trips() {
    let t = tempfile::tempdir().unwrap();
    std::fs::write(t.path().join("f\u{e9}"), b"x").unwrap();
    std::fs::hard_link(t.path().join("f\u{e9}"), t.path().join("g")).unwrap();
    std::os::unix::fs::symlink("f", t.path().join("l")).unwrap();
    xattr::set(t.path().join("g"), "user.k", b"v\0w").unwrap();
    let s = ovl_tests::snapshot::snapshot(t.path(), &Default::default()).unwrap();
    assert_eq!(scenario::decode(scenario::encode(&s).as_bytes()), s);
}
