//! Id shifting without copying (`--uidmap`/`--gidmap`): two containers at once over one
//! imported Alpine lower, each in its own host id range through idmapped lower layers, each
//! running the image's own `adduser`, `chown`, `rm` and `chmod`; the lower unchanged byte for
//! byte; each upper exported by `ovl-diff --uidmap` equal to the layer of an unshifted run and
//! applied by umoci onto the base equal to its merged view. Also the fallback (`ovl-import
//! --uidmap` + `--shifted-lowers`), `ovl-squash --uidmap`, and the errors.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ovl_tests::scenario::{self, HELPER_ENV, HELPER_TEST};
use ovl_tests::snapshot::{Snapshot, SnapshotOptions};
use ovl_tests::{bin, is_root, output, require, run_ok};

#[test]
fn scenario_snapshot_helper() {
    scenario::snapshot_helper();
}

/// What each container does: the image's adduser, a chown to the new user, a deletion, a
/// chmod; then it reports what it sees and waits (the test holds both open at once).
const SCRIPT: &str = r#"set -e
cat /proc/self/uid_map /proc/self/gid_map
stat -c 'shadow %u:%g %a' /etc/shadow
adduser -D bob
chown bob:bob /etc/hostname
rm /etc/motd
chmod 600 /etc/fstab
stat -c 'hostname %u:%g' /etc/hostname
echo ready
read _
"#;

fn setup() -> Option<PathBuf> {
    if !require("root", is_root()) || !require("umoci", ovl_tests::which("umoci").is_some()) {
        return None;
    }
    ovl_tests::alpine_minirootfs()
}

/// A container's directories under T/NAME.
struct Box {
    upper: PathBuf,
    work: PathBuf,
    merged: PathBuf,
}

fn boxdir(t: &Path, name: &str) -> Box {
    let d = t.join(name);
    let b = Box {
        upper: d.join("upper"),
        work: d.join("work"),
        merged: d.join("merged"),
    };
    std::fs::create_dir_all(&b.merged).unwrap();
    b
}

fn map_args(map: Option<&str>) -> Vec<String> {
    match map {
        Some(m) => vec!["--uidmap".into(), m.into(), "--gidmap".into(), m.into()],
        None => vec![],
    }
}

/// Start `ovl-mount [MAP] --chroot ... -- /bin/sh -c SCRIPT` with piped stdin and stdout.
fn start(lower: &Path, b: &Box, map: Option<&str>, extra: &[&str]) -> std::process::Child {
    ovl_tests::mountns::spawn(
        Command::new(bin("ovl-mount"))
            .args(map_args(map))
            .args(extra)
            .arg("--chroot")
            .arg("--lower")
            .arg(lower)
            .arg("--upper")
            .arg(&b.upper)
            .arg("--work")
            .arg(&b.work)
            .arg(&b.merged)
            .args(["--", "/bin/sh", "-c", SCRIPT])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )
}

/// Read a container's report up to its `ready` line.
fn report(child: &mut std::process::Child) -> String {
    let mut out = String::new();
    let mut r = BufReader::new(child.stdout.as_mut().unwrap());
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap() == 0 {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            panic!("the container ended before it was ready:\n{out}\nstderr:\n{err}");
        }
        if line.trim() == "ready" {
            return out;
        }
        // /proc/self/uid_map pads its columns: one space between words.
        out.push_str(&line.split_whitespace().collect::<Vec<_>>().join(" "));
        out.push('\n');
    }
}

fn finish(mut child: std::process::Child) {
    child.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "ovl-mount: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

fn owner(p: &Path) -> (u32, u32) {
    let md = std::fs::symlink_metadata(p).unwrap();
    (md.uid(), md.gid())
}

/// `ovl-diff ARGS -o OUT UPPER`.
fn diff(upper: &Path, out: &Path, args: &[String]) {
    run_ok(
        Command::new(bin("ovl-diff"))
            .arg("-q")
            .args(args)
            .arg("-o")
            .arg(out)
            .arg(upper),
    );
}

/// Every entry of a layer: path, type, mode, uid, gid (no times: the runs differ in them).
fn entries(layer: &Path) -> Vec<String> {
    let mut a = tar::Archive::new(std::fs::File::open(layer).unwrap());
    let mut out: Vec<String> = a
        .entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let h = e.header();
            format!(
                "{} {:?} {:o} {}:{}",
                String::from_utf8_lossy(&e.path_bytes()),
                h.entry_type(),
                h.mode().unwrap(),
                h.uid().unwrap(),
                h.gid().unwrap()
            )
        })
        .collect();
    out.sort();
    out
}

/// The merged view of a shifted mount, snapshotted inside it (container ids) by this test
/// binary run as the container's root.
fn merged_view(lower: &Path, b: &Box, map: &str, scratch: &Path) -> Snapshot {
    let out = scratch.join("merged.snapshot");
    run_ok(
        Command::new(bin("ovl-mount"))
            .args(map_args(Some(map)))
            .arg("--lower")
            .arg(lower)
            .arg("--upper")
            .arg(&b.upper)
            .arg("--work")
            .arg(&b.work)
            .arg(&b.merged)
            .arg("--")
            .arg(std::env::current_exe().unwrap())
            .args([
                "--exact",
                HELPER_TEST,
                "--nocapture",
                "--test-threads=1",
                "-q",
            ])
            .env(
                HELPER_ENV,
                format!("{}\t{}", b.merged.display(), out.display()),
            ),
    );
    scenario::decode(&std::fs::read(&out).unwrap())
}

#[test]
fn two_shifted_containers_at_once_over_one_lower() {
    let Some(alpine) = setup() else { return };
    let t = tempfile::Builder::new()
        .prefix("ovl-idshift-")
        .tempdir_in("/tmp")
        .unwrap();
    // Container root must reach the scratch files (the snapshot helper writes there).
    ovl_tests::set_mode(t.path(), 0o777);
    let lower = t.path().join("lower");
    run_ok(
        Command::new(bin("ovl-import"))
            .arg("-q")
            .arg(&alpine)
            .arg(&lower),
    );
    let exact = SnapshotOptions::default();
    let before = ovl_tests::snapshot::snapshot(&lower, &exact).unwrap();

    let maps = [
        ("a", "0:100000:65536", 100_000u32),
        ("b", "0:300000:65536", 300_000),
    ];
    let boxes: Vec<Box> = maps.iter().map(|(n, _, _)| boxdir(t.path(), n)).collect();
    let mut children: Vec<_> = maps
        .iter()
        .zip(&boxes)
        .map(|((_, m, _), b)| start(&lower, b, Some(m), &[]))
        .collect();
    // Both are mounted and running now, each in its own map.
    for ((_, _, host), child) in maps.iter().zip(children.iter_mut()) {
        let said = report(child);
        assert!(
            said.contains(&format!("0 {host} 65536")),
            "uid_map inside: {said}"
        );
        assert!(said.contains("shadow 0:42 640"), "{said}");
        assert!(said.contains("hostname 1000:1000"), "{said}");
    }
    for c in children {
        finish(c);
    }

    // The lower is byte for byte what the import left.
    let after = ovl_tests::snapshot::snapshot(&lower, &exact).unwrap();
    assert!(
        ovl_tests::snapshot::differences(&before, &after).is_empty(),
        "the lower changed: {:?}",
        ovl_tests::snapshot::differences(&before, &after)
    );

    // An unshifted run of the same script, for the reference layer.
    let plain = boxdir(t.path(), "plain");
    let mut c = start(&lower, &plain, None, &[]);
    let said = report(&mut c);
    assert!(said.contains("0 0 4294967295"), "{said}");
    finish(c);
    let reference = t.path().join("plain.tar");
    diff(&plain.upper, &reference, &[]);
    let want = entries(&reference);
    assert!(
        want.iter()
            .any(|e| e.starts_with("etc/hostname ") && e.ends_with(" 1000:1000")),
        "{want:#?}"
    );

    let work = t.path().join("umoci-base");
    std::fs::create_dir(&work).unwrap();
    let base_tar = scenario::decompressed(&alpine, &work);
    for (((name, map, host), b), i) in maps.iter().zip(&boxes).zip(0..) {
        // The upper holds host ids of its map: its root is the mapped root, bob's files are
        // host 1000 + the map's start.
        assert_eq!(owner(&b.upper), (*host, *host));
        assert_eq!(
            owner(&b.upper.join("etc/hostname")),
            (host + 1000, host + 1000)
        );
        assert_eq!(owner(&b.upper.join("home/bob")), (host + 1000, host + 1000));
        assert_eq!(owner(&b.upper.join("etc/passwd")), (*host, *host));

        let layer = t.path().join(format!("{name}.tar"));
        diff(&b.upper, &layer, &map_args(Some(map)));
        assert_eq!(
            entries(&layer),
            want,
            "{name}: shifted and unshifted layers differ"
        );

        // Without the map the host ids would leak into the layer.
        let leaked = t.path().join(format!("{name}-unmapped.tar"));
        diff(&b.upper, &leaked, &[]);
        assert_ne!(entries(&leaked), want);

        let scratch = t.path().join(format!("{name}-scratch"));
        std::fs::create_dir(&scratch).unwrap();
        ovl_tests::set_mode(&scratch, 0o777);
        let merged = merged_view(&lower, b, map, &scratch);
        let uwork = t.path().join(format!("umoci-{i}"));
        std::fs::create_dir(&uwork).unwrap();
        let rootfs = scenario::umoci_apply(&uwork, &[&base_tar, &layer]);
        let applied = ovl_tests::snapshot::snapshot(&rootfs, &scenario::compare_options()).unwrap();
        let diffs = ovl_tests::snapshot::differences(&merged, &applied);
        assert!(
            diffs.is_empty(),
            "{name}: umoci's base + layer differs from the merged view:\n{}",
            diffs.join("\n")
        );
        assert!(merged.len() > 400 && merged.contains_key(&b"home/bob"[..]));
    }
}

#[test]
fn an_upper_written_under_another_map_is_refused() {
    let Some(alpine) = setup() else { return };
    let t = tempfile::tempdir().unwrap();
    let lower = t.path().join("lower");
    run_ok(
        Command::new(bin("ovl-import"))
            .arg("-q")
            .arg(&alpine)
            .arg(&lower),
    );
    let b = boxdir(t.path(), "x");
    let run = |map: &str| {
        output(
            Command::new(bin("ovl-mount"))
                .args(map_args(Some(map)))
                .arg("--lower")
                .arg(&lower)
                .arg("--upper")
                .arg(&b.upper)
                .arg("--work")
                .arg(&b.work)
                .arg(&b.merged)
                .args(["--", "/bin/sh", "-c", "touch new"]),
        )
    };
    let ok = run("0:100000:65536");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let again = run("0:100000:65536");
    assert!(again.status.success());
    let other = run("0:300000:65536");
    let err = String::from_utf8_lossy(&other.stderr);
    assert!(
        !other.status.success() && err.contains("written under another id map"),
        "{err}"
    );
}

#[test]
fn bad_maps_and_rootless_use_are_refused_clearly() {
    let t = tempfile::tempdir().unwrap();
    let m = t.path().join("m");
    std::fs::create_dir(&m).unwrap();
    for (args, needle) in [
        (vec!["--uidmap", "0:100000"], "CONTAINER:HOST:COUNT"),
        (vec!["--uidmap", "0:100000:0"], "at least 1"),
        (
            vec!["--uidmap", "0:100000:65536", "--uidmap", "10:300000:5"],
            "overlap",
        ),
    ] {
        let out = output(
            Command::new(bin("ovl-mount"))
                .args(&args)
                .arg("--lower")
                .arg(t.path())
                .arg(&m)
                .args(["--", "true"]),
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(needle),
            "{args:?}: {err}"
        );
    }
    for tool in ["ovl-diff", "ovl-import"] {
        let out = output(Command::new(bin(tool)).args(["--uidmap", "x"]));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("CONTAINER:HOST:COUNT"),
            "{tool}"
        );
    }
}

/// Where the kernel or the filesystem refuses an idmapped mount (here: a lower on ramfs,
/// which does not support them), the error says why and points to the fallback.
#[test]
fn a_filesystem_without_idmapped_mounts_points_to_the_fallback() {
    if !require("root", is_root()) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let ram = t.path().join("ram");
    std::fs::create_dir(&ram).unwrap();
    run_ok(
        Command::new("mount")
            .args(["-t", "ramfs", "ramfs"])
            .arg(&ram),
    );
    let lower = ram.join("lower");
    std::fs::create_dir(&lower).unwrap();
    let m = t.path().join("m");
    std::fs::create_dir(&m).unwrap();
    // With a command, and as a mount that stays.
    let outs: Vec<_> = [&["--", "true"][..], &[]]
        .iter()
        .map(|cmd| {
            output(
                Command::new(bin("ovl-mount"))
                    .args(map_args(Some("0:100000:65536")))
                    .arg("--lower")
                    .arg(&lower)
                    .arg("--upper")
                    .arg(t.path().join("u"))
                    .arg("--work")
                    .arg(t.path().join("w"))
                    .arg(&m)
                    .args(*cmd),
            )
        })
        .collect();
    let left = mounts_under(t.path());
    run_ok(Command::new("umount").arg(&ram));
    for out in outs {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        for needle in [
            "does not support idmapped mounts",
            "ovl-import --uidmap",
            "--shifted-lowers",
        ] {
            assert!(err.contains(needle), "{needle:?} missing: {err}");
        }
    }
    // Only the ramfs itself: no idmapped clone, no overlay.
    assert_eq!(left.len(), 1, "{left:#?}");
}

/// The fallback: `ovl-import --uidmap` writes host ids (42 lands as 100042), and a mount with
/// `--shifted-lowers` shows them as the image's owners; `ovl-squash --uidmap` folds the upper
/// back into container ids.
#[test]
fn shifted_import_fallback_and_squash_back_to_container_ids() {
    let Some(alpine) = setup() else { return };
    let t = tempfile::tempdir().unwrap();
    let map = "0:100000:65536";
    let plain = t.path().join("plain");
    run_ok(
        Command::new(bin("ovl-import"))
            .arg("-q")
            .arg(&alpine)
            .arg(&plain),
    );
    let shifted = t.path().join("shifted");
    run_ok(
        Command::new(bin("ovl-import"))
            .arg("-q")
            .args(map_args(Some(map)))
            .arg(&alpine)
            .arg(&shifted),
    );
    assert_eq!(owner(&shifted.join("etc/shadow")), (100_000, 100_042));
    assert_eq!(owner(&plain.join("etc/shadow")), (0, 42));
    // Same tree but for the owners.
    let strip = |s: Snapshot| -> Snapshot {
        s.into_iter()
            .map(|(p, mut e)| {
                e.uid = 0;
                e.gid = 0;
                (p, e)
            })
            .collect()
    };
    let opts = SnapshotOptions::default();
    assert!(
        ovl_tests::snapshot::differences(
            &strip(ovl_tests::snapshot::snapshot(&plain, &opts).unwrap()),
            &strip(ovl_tests::snapshot::snapshot(&shifted, &opts).unwrap())
        )
        .is_empty()
    );

    let b = boxdir(t.path(), "c");
    let mut c = start(&shifted, &b, Some(map), &["--shifted-lowers"]);
    let said = report(&mut c);
    assert!(
        said.contains("0 100000 65536") && said.contains("shadow 0:42 640"),
        "{said}"
    );
    finish(c);

    // An image owner outside the map is an error naming the entry.
    let out = output(
        Command::new(bin("ovl-import"))
            .args(map_args(Some("0:100000:10")))
            .arg(&alpine)
            .arg(t.path().join("narrow")),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("outside the --gidmap") && err.contains("shadow"),
        "{err}"
    );
    assert!(!t.path().join("narrow").exists());

    // Fold the upper into the container-id lower: the result is the plain lower plus the
    // container's changes, in container ids.
    let squashed = t.path().join("squashed");
    run_ok(
        Command::new(bin("ovl-squash"))
            .arg("-q")
            .args(map_args(Some(map)))
            .arg("--lower")
            .arg(&plain)
            .arg("--upper")
            .arg(&b.upper)
            .arg("--output")
            .arg(&squashed),
    );
    assert_eq!(owner(&squashed.join("etc/hostname")), (1000, 1000));
    assert_eq!(owner(&squashed.join("home/bob")), (1000, 1000));
    assert_eq!(owner(&squashed.join("etc/shadow")), (0, 42));
    assert!(!squashed.join("etc/motd").exists());
    assert_eq!(
        std::fs::symlink_metadata(squashed.join("etc/fstab"))
            .unwrap()
            .mode()
            & 0o7777,
        0o600
    );
    // A host id outside the map: an error naming the path.
    rustix::fs::chown(
        b.upper.join("etc/hostname"),
        Some(rustix::fs::Uid::from_raw(5)),
        None,
    )
    .unwrap();
    let out = output(
        Command::new(bin("ovl-squash"))
            .args(map_args(Some(map)))
            .arg("--lower")
            .arg(&plain)
            .arg("--upper")
            .arg(&b.upper)
            .arg("--output")
            .arg(t.path().join("squashed2")),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("etc/hostname") && err.contains("uid 5"),
        "{err}"
    );
    let out = output(
        Command::new(bin("ovl-diff"))
            .args(map_args(Some(map)))
            .arg("-o")
            .arg(t.path().join("l.tar"))
            .arg(&b.upper),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("etc/hostname") && err.contains("uid 5"),
        "{err}"
    );
}

/// Rootless without subordinate ids: ovl-import records owners and modes in the override
/// xattr fuse-overlayfs 1.10 reads (`user.fuseoverlayfs.override_stat`, plus umoci's
/// `user.rootlesscontainers`); ovl-mount presents them through fuse-overlayfs and records a
/// chmod inside the same way; ovl-diff exports and ovl-squash folds the recorded owners, so a
/// single-id round trip loses nothing.
#[test]
fn single_id_round_trip_keeps_the_recorded_owners() {
    let Some(alpine) = ovl_tests::alpine_minirootfs() else {
        return;
    };
    if !require("root (to set up the user)", is_root())
        || !require(
            "fuse-overlayfs",
            ovl_tests::which("fuse-overlayfs").is_some(),
        )
        || !require("setfacl (acl)", ovl_tests::which("setfacl").is_some())
    {
        return;
    }
    let solo = ovl_tests::test_user_without_subids();
    if !require("a test user without subordinate ids", solo.is_some()) {
        return;
    }
    let solo = solo.unwrap();
    // /dev/fuse is 0600 here: grant it to this user alone.
    run_ok(Command::new("setfacl").args(["-m", &format!("u:{}:rw", solo.name), "/dev/fuse"]));
    let t = ovl_tests::user_tempdir(&solo);
    let lower = t.path().join("lower");
    let as_solo = |tool: &str| ovl_tests::command_as(&solo, &bin(tool));
    run_ok(as_solo("ovl-import").arg("-q").arg(&alpine).arg(&lower));
    let x = |p: &Path, n: &str| xattr::get(p, n).unwrap();
    assert_eq!(owner(&lower.join("etc/shadow")), (solo.uid, solo.gid));
    assert_eq!(
        x(
            &lower.join("etc/shadow"),
            "user.fuseoverlayfs.override_stat"
        )
        .as_deref(),
        Some(&b"0:42:640"[..])
    );
    assert_eq!(
        x(&lower.join("etc/shadow"), "user.rootlesscontainers").as_deref(),
        Some(&[0x10, 42][..])
    );
    // fuse-overlayfs presents a layer's records only when its root has one.
    assert!(x(&lower, "user.fuseoverlayfs.override_stat").is_some());

    for d in ["upper", "work", "merged"] {
        std::fs::create_dir(t.path().join(d)).unwrap();
        rustix::fs::chown(
            t.path().join(d),
            Some(rustix::fs::Uid::from_raw(solo.uid)),
            Some(rustix::fs::Gid::from_raw(solo.gid)),
        )
        .unwrap();
    }
    let upper = t.path().join("upper");
    let mount = |extra: &[&str], upper: &Path, work: &Path, script: &str| {
        let out = output(
            as_solo("ovl-mount")
                .arg("-v")
                .args(extra)
                .arg("--lower")
                .arg(&lower)
                .arg("--upper")
                .arg(upper)
                .arg("--work")
                .arg(work)
                .arg(t.path().join("merged"))
                .args(["--", "/bin/sh", "-c", script]),
        );
        let said = String::from_utf8_lossy(&out.stdout).into_owned();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{said}\n{err}");
        (said, err)
    };
    // By default a kernel overlay: every file shows as the user's (root inside), all of them
    // writable; the records travel with a copy-up, a chmod changes the file's own mode.
    let (said, _) = mount(
        &[],
        &upper,
        &t.path().join("work"),
        "set -e; stat -c 'shadow %u:%g %a' etc/shadow; echo x >> etc/shadow; \
         chmod 600 etc/shadow; echo new > etc/newfile; chmod 604 etc/newfile; rm etc/motd",
    );
    assert!(said.contains("shadow 0:0 640"), "{said}");
    assert_eq!(
        x(
            &upper.join("etc/shadow"),
            "user.fuseoverlayfs.override_stat"
        )
        .as_deref(),
        Some(&b"0:42:640"[..])
    );

    // Asked, fuse-overlayfs presents the records. A namespace that maps one id has no gid 42:
    // the kernel shows it as the overflow gid; the mode is the recorded one.
    let (u2, w2) = (t.path().join("upper2"), t.path().join("work2"));
    for d in [&u2, &w2] {
        std::fs::create_dir(d).unwrap();
        rustix::fs::chown(
            d,
            Some(rustix::fs::Uid::from_raw(solo.uid)),
            Some(rustix::fs::Gid::from_raw(solo.gid)),
        )
        .unwrap();
    }
    // No fuse-overlayfs option changes that: uidmapping/gidmapping and squash_to_* only choose
    // which id fuse-overlayfs reports, and the kernel maps every reported id through the
    // mount's user namespace. What the kernel then allows (seen here, Linux 6.18, fuse-overlayfs
    // 1.10): a chown to an unmapped id is EINVAL; a file whose group is unmapped refuses a
    // chmod or a chown of the uid alone (EOVERFLOW: the kernel changes no inode with an invalid
    // id unless the change makes it valid) and a write or touch (EACCES); a chown to mapped ids
    // (root) is allowed and recorded, and then so is the rest.
    let (said, err) = mount(
        &["--recorded-owners"],
        &u2,
        &w2,
        "try() { if m=$(\"$@\" 2>&1); then echo \"$*: done\"; else echo \"$*: refused: $m\"; fi; }; \
         stat -c 'shadow %u:%g %a' etc/shadow; \
         try chown 0:42 etc/passwd; try chgrp 65534 etc/passwd; \
         try chmod 600 etc/shadow; try touch etc/shadow; try chown 0 etc/shadow; \
         try sh -c 'echo x >> etc/shadow'; stat -c 'shadow %u:%g %a' etc/shadow; \
         try chmod 600 etc/passwd; echo n > etc/new2; try chown 0:0 etc/new2; \
         try chown 0:0 etc/group; try chmod 640 etc/group; stat -c 'group %u:%g %a' etc/group; \
         try chown 0:0 etc/shadow; try chmod 600 etc/shadow; stat -c 'shadow %u:%g %a' etc/shadow",
    );
    assert!(err.contains("fuse-overlayfs"), "{err}");
    for want in [
        "shadow 0:65534 640\n",
        "chown 0:42 etc/passwd: refused: chown: changing ownership of 'etc/passwd': Invalid argument",
        "chgrp 65534 etc/passwd: refused: chgrp: changing group of 'etc/passwd': Invalid argument",
        "chmod 600 etc/shadow: refused: chmod: changing permissions of 'etc/shadow': Value too large",
        "touch etc/shadow: refused: touch: cannot touch 'etc/shadow': Permission denied",
        "chown 0 etc/shadow: refused: chown: changing ownership of 'etc/shadow': Value too large",
        "echo x >> etc/shadow: refused: sh: 1: cannot create etc/shadow: Permission denied",
        "chmod 600 etc/passwd: done",
        "chown 0:0 etc/group: done",
        "chmod 640 etc/group: done",
        "group 0:0 640",
        "chown 0:0 etc/shadow: done",
        "chmod 600 etc/shadow: done",
        "shadow 0:0 600\n",
    ] {
        assert!(said.contains(want), "{want:?}: {said}");
    }
    // What fuse-overlayfs recorded, and the round trip through its upper: ovl-diff exports the
    // recorded owners (gid 42 kept through chmod and `chown 0`), ovl-squash folds them.
    assert_eq!(owner(&u2.join("etc/shadow")), (solo.uid, solo.gid));
    let fuse_layer = t.path().join("fuse-layer.tar");
    run_ok(
        as_solo("ovl-diff")
            .arg("-q")
            .arg("-o")
            .arg(&fuse_layer)
            .arg(&u2),
    );
    let got = entries(&fuse_layer);
    for want in [
        "etc/shadow Regular 600 0:0",
        "etc/group Regular 640 0:0",
        "etc/passwd Regular 600 0:0",
        "etc/new2 Regular",
    ] {
        assert!(got.iter().any(|e| e.starts_with(want)), "{want}: {got:#?}");
    }
    let fuse_squashed = t.path().join("fuse-squashed");
    run_ok(
        as_solo("ovl-squash")
            .arg("-q")
            .arg("--lower")
            .arg(&lower)
            .arg("--upper")
            .arg(&u2)
            .arg("--output")
            .arg(&fuse_squashed),
    );
    let rec = |p: &str| {
        let path = fuse_squashed.join(p);
        let xs = ovl_layer::list_xattrs(&path).unwrap();
        let mode = std::fs::symlink_metadata(&path).unwrap().mode() & 0o7777;
        ovl_layer::recorded_owner(xs.iter().map(|(n, v)| (n.as_slice(), v.as_slice())))
            .map(|(u, g, m)| (u, g, m.unwrap_or(mode)))
    };
    assert_eq!(rec("etc/shadow"), Some((0, 0, 0o600)));
    assert_eq!(rec("etc/group"), Some((0, 0, 0o640)));
    assert_eq!(rec("etc/passwd"), Some((0, 0, 0o600)));
    assert_eq!(rec("etc/hostname"), Some((0, 0, 0o644)));

    // ovl-diff as the user: the recorded owners, not the host ids; no record xattrs.
    let layer = t.path().join("layer.tar");
    run_ok(
        as_solo("ovl-diff")
            .arg("-q")
            .arg("-o")
            .arg(&layer)
            .arg(&upper),
    );
    let got = entries(&layer);
    for want in [
        "etc/shadow Regular 600 0:42",
        "etc/newfile Regular 604 0:0",
        "etc/.wh.motd Regular",
    ] {
        assert!(got.iter().any(|e| e.starts_with(want)), "{want}: {got:#?}");
    }
    let raw = std::fs::read(&layer).unwrap();
    assert!(
        !raw.windows(11).any(|w| w == b"fuseoverlay") && !raw.windows(8).any(|w| w == b"rootless"),
        "a record xattr went into the layer"
    );
    // Root exporting the user's upper reads the same records.
    let root_layer = t.path().join("root.tar");
    diff(
        &upper,
        &root_layer,
        &["--uidmap".into(), format!("0:{}:1", solo.uid)],
    );
    assert_eq!(entries(&root_layer), got);

    // ovl-squash as the user folds the records: the new lower records 0:42:600.
    let squashed = t.path().join("squashed");
    run_ok(
        as_solo("ovl-squash")
            .arg("-q")
            .arg("--lower")
            .arg(&lower)
            .arg("--upper")
            .arg(&upper)
            .arg("--output")
            .arg(&squashed),
    );
    assert_eq!(
        x(
            &squashed.join("etc/shadow"),
            "user.fuseoverlayfs.override_stat"
        )
        .as_deref(),
        Some(&b"0:42:600"[..])
    );
    assert_eq!(
        x(
            &squashed.join("etc/passwd"),
            "user.fuseoverlayfs.override_stat"
        )
        .as_deref(),
        Some(&b"0:0:644"[..])
    );
    assert!(!squashed.join("etc/motd").exists());
    assert_eq!(owner(&squashed.join("etc/shadow")), (solo.uid, solo.gid));
}

/// A box imported without subordinate ids, mounted by a user with them: a warning that says
/// what to do.
#[test]
fn a_single_id_box_mounted_with_subordinate_ids_warns() {
    let Some(user) = ovl_tests::require_test_user() else {
        return;
    };
    let t = ovl_tests::user_tempdir(&user);
    let lower = t.path().join("lower");
    let merged = t.path().join("merged");
    for d in [&lower, &merged] {
        std::fs::create_dir(d).unwrap();
        rustix::fs::chown(
            d,
            Some(rustix::fs::Uid::from_raw(user.uid)),
            Some(rustix::fs::Gid::from_raw(user.gid)),
        )
        .unwrap();
    }
    // What ovl-import leaves on the root of a lower it imported without subordinate ids.
    xattr::set(&lower, "user.fuseoverlayfs.override_stat", b"0:0:755").unwrap();
    let out = output(
        ovl_tests::command_as(&user, &bin("ovl-mount"))
            .args(["--idmap", "subids", "--lower"])
            .arg(&lower)
            .arg(&merged)
            .args(["--", "true"]),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    for needle in [
        "imported without subordinate ids",
        "ovl-import",
        "--idmap single",
    ] {
        assert!(err.contains(needle), "{needle:?}: {err}");
    }
}

/// The lines of this process's mountinfo that name `dir` (other tests mount elsewhere at the
/// same time).
fn mounts_under(dir: &Path) -> Vec<String> {
    let needle = dir.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(&needle))
        .map(|l| l.split(' ').skip(4).collect::<Vec<_>>().join(" "))
        .collect()
}

/// `--uidmap` without CMD, as a runtime uses it: the overlay stays in the caller's mount
/// namespace and shows host ids (the lowers seen through idmapped clones), a process in a user
/// namespace with the same map sees the image's owners and writes host ids into the upper, the
/// in-use checks see the real lower, and `--unmount` leaves no mount behind (the idmapped
/// clones never cover the lower outside the overlay).
#[test]
fn a_persistent_shifted_mount_shows_host_ids_and_leaves_nothing_behind() {
    let Some(alpine) = setup() else { return };
    let t = tempfile::Builder::new()
        .prefix("ovl-idshift-persist-")
        .tempdir_in("/tmp")
        .unwrap();
    let lower = t.path().join("lower");
    run_ok(
        Command::new(bin("ovl-import"))
            .arg("-q")
            .arg(&alpine)
            .arg(&lower),
    );
    let exact = SnapshotOptions::default();
    let before = ovl_tests::snapshot::snapshot(&lower, &exact).unwrap();
    let b = boxdir(t.path(), "p");
    assert!(mounts_under(t.path()).is_empty());
    let map = "0:100000:65536";
    let said = run_ok(
        Command::new(bin("ovl-mount"))
            .arg("-v")
            .args(map_args(Some(map)))
            .arg("--lower")
            .arg(&lower)
            .arg("--upper")
            .arg(&b.upper)
            .arg("--work")
            .arg(&b.work)
            .arg(&b.merged),
    );
    let said = String::from_utf8_lossy(&said).into_owned();
    let mounted = mounts_under(t.path());
    let unmount = || {
        output(
            Command::new(bin("ovl-mount"))
                .arg("--unmount")
                .arg(&b.merged),
        )
    };
    // Unmount even when an assertion fails.
    struct Down<F: Fn() -> std::process::Output>(F);
    impl<F: Fn() -> std::process::Output> Drop for Down<F> {
        fn drop(&mut self) {
            (self.0)();
        }
    }
    let down = Down(unmount);
    assert!(said.contains("mounted overlay on"), "{said}");
    // One mount, the overlay on MERGED, naming the real lower; nothing on the lower itself.
    assert_eq!(mounted.len(), 1, "{mounted:#?}");
    assert!(
        mounted[0].starts_with(&format!("{} ", b.merged.display()))
            && mounted[0].contains(" overlay ")
            && (mounted[0].contains(&format!("lowerdir={},", lower.display()))
                || mounted[0].contains(&format!("lowerdir+={},", lower.display()))),
        "{mounted:#?}"
    );
    assert_eq!(owner(&b.merged.join("etc/shadow")), (100_000, 100_042));
    assert_eq!(owner(&lower.join("etc/shadow")), (0, 42));

    // A runtime's container: its own user namespace with the same map, joined as its root.
    let range: ovl_layer::IdRange = map.parse().unwrap();
    let maps = ovl_layer::shift_maps(&[range], &[]).unwrap().unwrap();
    let ns = ovl_layer::UsernsFd::new(&maps).unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&std::os::fd::AsFd::as_fd(&ns));
    let mut sh = Command::new("/bin/sh");
    sh.args([
        "-ec",
        "cat /proc/self/uid_map; stat -c 'shadow %u:%g' etc/shadow; \
         chown 1000:1000 etc/hostname; echo x > newfile; rm etc/motd",
    ])
    .current_dir(&b.merged);
    // SAFETY: join_raw makes only raw syscalls (setns, setgroups, setresgid, setresuid) on an
    // fd that `ns` keeps open until the child has exec'ed.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut sh, move || ovl_layer::join_raw(fd));
    }
    let inside = String::from_utf8_lossy(&run_ok(&mut sh))
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    drop(ns);
    assert_eq!(inside, "0 100000 65536 shadow 0:42");

    // The in-use checks see the lower through the mount table.
    let out = output(
        Command::new(bin("ovl-squash"))
            .arg("--in-place")
            .arg("--lower")
            .arg(&lower)
            .arg("--upper")
            .arg(&b.upper),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains(&b.merged.display().to_string()),
        "{err}"
    );

    drop(down);
    assert!(
        mounts_under(t.path()).is_empty(),
        "left behind: {:#?}",
        mounts_under(t.path())
    );
    assert_eq!(owner(&b.upper), (100_000, 100_000));
    assert_eq!(owner(&b.upper.join("newfile")), (100_000, 100_000));
    assert_eq!(owner(&b.upper.join("etc/hostname")), (101_000, 101_000));
    let after = ovl_tests::snapshot::snapshot(&lower, &exact).unwrap();
    assert!(ovl_tests::snapshot::differences(&before, &after).is_empty());
    let layer = t.path().join("p.tar");
    diff(&b.upper, &layer, &map_args(Some(map)));
    let got = entries(&layer);
    for want in [
        "etc/hostname Regular 644 1000:1000",
        "newfile Regular 644 0:0",
        "etc/.wh.motd Regular",
    ] {
        assert!(got.iter().any(|e| e.starts_with(want)), "{want}: {got:#?}");
    }
}

/// A read-write kernel overlay over `lower` seen through an idmapped clone of it (attached at
/// `at`, as ovl-mount does in its private namespace), with extra mount options; unmounted
/// (overlay, then the clone) on drop.
struct IdmappedOverlay {
    _overlay: ovl_tests::stack::Mount,
    at: PathBuf,
}

impl Drop for IdmappedOverlay {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.at).status();
    }
}

/// A persistent shifted mount made by root inside a chroot lands on MERGED as the chroot sees
/// it. ovl-mount builds the overlay in a throwaway mount namespace and comes back with setns,
/// which resets the root to the namespace's: MERGED looked up by path after that was the host's
/// (the overlay landed outside the chroot, or the move failed). The lower is imported shifted
/// (`--shifted-lowers`): a chrooted process cannot make the user namespace an idmapped mount
/// needs (the kernel refuses CLONE_NEWUSER under a chroot, and ovl-mount says so).
#[test]
fn a_persistent_shifted_mount_made_in_a_chroot_lands_inside_it() {
    let Some(alpine) = setup() else { return };
    // The jail below is a recursive bind of / : while it exists it holds copies of every test
    // mount of the moment, which another test's squash would find. Hold the lock throughout.
    let _hold = ovl_tests::mountns::exclusive();
    let t = tempfile::Builder::new()
        .prefix("ovl-idshift-chroot-")
        .tempdir_in("/tmp")
        .unwrap();
    let t = t.path().canonicalize().unwrap();
    let lower = t.join("lower");
    run_ok(
        Command::new(bin("ovl-import"))
            .arg("-q")
            .args(map_args(Some("0:100000:65536")))
            .arg(&alpine)
            .arg(&lower),
    );
    let b = boxdir(&t, "c");
    let jail = t.join("jail");
    std::fs::create_dir(&jail).unwrap();
    run_ok(Command::new("mount").args(["--rbind", "/"]).arg(&jail));
    struct Unbind(PathBuf);
    impl Drop for Unbind {
        fn drop(&mut self) {
            let _ = Command::new("umount")
                .arg("-R")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unbind = Unbind(jail.clone());
    // Private, so nothing mounted in the jail shows up at the same path outside it.
    run_ok(Command::new("mount").args(["--make-rprivate"]).arg(&jail));
    let said = output(
        Command::new("chroot")
            .arg(&jail)
            .arg(bin("ovl-mount"))
            .arg("-v")
            .args(map_args(Some("0:100000:65536")))
            .arg("--shifted-lowers")
            .arg("--lower")
            .arg(&lower)
            .arg("--upper")
            .arg(&b.upper)
            .arg("--work")
            .arg(&b.work)
            .arg(&b.merged),
    );
    let inside = jail.join(b.merged.strip_prefix("/").unwrap());
    let points: Vec<String> = mounts_under(&t)
        .iter()
        .filter(|l| l.contains(" overlay "))
        .map(|l| l.split(' ').next().unwrap().to_string())
        .filter(|p| p.ends_with("/c/merged"))
        .collect();
    // Unmount whatever landed, wherever, before asserting.
    for p in &points {
        let _ = Command::new("umount").arg(p).status();
    }
    assert!(
        said.status.success(),
        "ovl-mount in the chroot failed: {}",
        String::from_utf8_lossy(&said.stderr)
    );
    assert_eq!(
        points,
        vec![inside.display().to_string()],
        "the overlay must be on MERGED inside the chroot, and nowhere else"
    );
}

/// `lower` under `b`'s upper (owned by `root`, the container root's host id) mounted on its
/// merged directory, with the overlay options `opts`.
fn box_overlay(
    lower: &Path,
    b: &Box,
    root: u32,
    opts: &str,
) -> Result<ovl_tests::stack::Mount, String> {
    for d in [&b.upper, &b.work] {
        std::fs::create_dir_all(d).unwrap();
    }
    rustix::fs::chown(
        &b.upper,
        Some(rustix::fs::Uid::from_raw(root)),
        Some(rustix::fs::Gid::from_raw(root)),
    )
    .unwrap();
    ovl_tests::stack::Mount::overlay(
        &format!(
            "lowerdir={},upperdir={},workdir={},{opts}",
            lower.display(),
            b.upper.display(),
            b.work.display()
        ),
        &b.merged,
    )
}

fn idmapped_overlay(lower: &Path, b: &Box, map: &str, opts: &str) -> IdmappedOverlay {
    let at = b.merged.with_file_name("idlower");
    std::fs::create_dir_all(&at).unwrap();
    let range: ovl_layer::IdRange = map.parse().unwrap();
    let maps = ovl_layer::shift_maps(&[range], &[]).unwrap().unwrap();
    let ns = ovl_layer::UsernsFd::new(&maps).unwrap();
    let tree = ovl_layer::idmapped_clone(lower, &ns).unwrap();
    ovl_layer::attach_idmapped(&tree, &at).unwrap();
    let root = maps.uid.to_host(0).unwrap();
    match box_overlay(&at, b, root, opts) {
        Ok(o) => IdmappedOverlay { _overlay: o, at },
        Err(e) => {
            let _ = Command::new("umount").arg("-l").arg(&at).status();
            panic!("{e}");
        }
    }
}

/// Every entry of a layer with its content's digest: path, type, mode, uid, gid, data.
fn entries_with_data(layer: &Path) -> Vec<String> {
    use sha2::Digest;
    use std::io::Read;
    let mut a = tar::Archive::new(std::fs::File::open(layer).unwrap());
    let mut out: Vec<String> = a
        .entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let h = e.header().clone();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            format!(
                "{} {:?} {:o} {}:{} {} {}",
                String::from_utf8_lossy(&e.path_bytes()),
                h.entry_type(),
                h.mode().unwrap(),
                h.uid().unwrap(),
                h.gid().unwrap(),
                data.len(),
                hex::encode(sha2::Sha256::digest(&data))
            )
        })
        .collect();
    out.sort();
    out
}

/// The same changes made from the host through a container's map: ids are `base + id`.
fn redirect_metacopy_changes(base: u32) -> String {
    let id = |n: u32| base + n;
    format!(
        "set -e; mv srv/data srv/moved; echo n > srv/moved/new; chown {a}:{a} srv/moved/new; \
         chown {u}:{u} etc/hostname; chmod 4755 bin/busybox; chgrp {g} etc/passwd; \
         chown {u}:{g} srv/moved/sub/f7; echo n > etc/newfile; chown {u}:{a} etc/newfile; \
         ln -s newfile etc/link; chown -h {r}:{r} etc/link; mkdir -p var/new; chown {a}:{a} var/new",
        r = id(0),
        a = id(5),
        u = id(1000),
        g = id(42),
    )
}

/// A lower with a directory of non-root owners (Alpine has only /etc/shadow), ids `base + id`.
fn add_owned_dir(lower: &Path, base: u32) {
    let d = lower.join("srv/data");
    std::fs::create_dir_all(d.join("sub")).unwrap();
    std::fs::write(d.join("sub/f7"), b"seven").unwrap();
    std::fs::write(d.join("f9"), b"nine").unwrap();
    for (p, id) in [("", 7), ("sub", 8), ("sub/f7", 7), ("f9", 9)] {
        let p = if p.is_empty() { d.clone() } else { d.join(p) };
        rustix::fs::chown(
            &p,
            Some(rustix::fs::Uid::from_raw(base + id)),
            Some(rustix::fs::Gid::from_raw(base + id)),
        )
        .unwrap();
    }
}

/// `cp -a` of a tree (xattrs and owners kept).
fn copy_tree(from: &Path, to: &Path) {
    run_ok(
        Command::new("cp")
            .args(["-a", "--preserve=all"])
            .arg(from)
            .arg(to),
    );
}

fn squash(lower: &Path, upper: &Path, target: &[&std::ffi::OsStr], map: Option<&str>) {
    run_ok(
        Command::new(bin("ovl-squash"))
            .arg("-q")
            .args(map_args(map))
            .arg("--lower")
            .arg(lower)
            .arg("--upper")
            .arg(upper)
            .args(target),
    );
}

/// `--uidmap` on an upper written by a kernel overlay with redirect_dir=on,metacopy=on: over
/// an idmapped lower (container ids on disk) and over a shifted lower (`ovl-import --uidmap`,
/// host ids on disk). A renamed directory's lower entries and a metacopy file's metadata
/// (its data in the lower) come out in container ids: the layer from ovl-diff and the results
/// of ovl-squash (--output and --in-place) equal those of the same changes made unshifted
/// (a shifted lower's squash stays in host ids, as the lower was).
#[test]
fn redirect_dir_and_metacopy_uppers_map_back() {
    let Some(alpine) = setup() else { return };
    let t = tempfile::Builder::new()
        .prefix("ovl-idshift-meta-")
        .tempdir_in("/tmp")
        .unwrap();
    let map = "0:100000:65536";
    let opts = "redirect_dir=on,metacopy=on";
    let imported = t.path().join("imported");
    run_ok(
        Command::new(bin("ovl-import"))
            .arg("-q")
            .arg(&alpine)
            .arg(&imported),
    );
    add_owned_dir(&imported, 0);
    let shifted_src = t.path().join("shifted-imported");
    run_ok(
        Command::new(bin("ovl-import"))
            .arg("-q")
            .args(map_args(Some(map)))
            .arg(&alpine)
            .arg(&shifted_src),
    );
    add_owned_dir(&shifted_src, 100_000);

    // name, lower (own copy: in-place squash changes it), host id base, idmapped?
    let runs = [
        ("plain", &imported, 0u32, false),
        ("idmapped", &imported, 100_000, true),
        ("shifted", &shifted_src, 100_000, false),
    ];
    let mut layers = Vec::new();
    let mut squashed = Vec::new();
    for (name, src, base, idmapped) in runs {
        let lower = t.path().join(format!("{name}-lower"));
        copy_tree(src, &lower);
        let b = boxdir(t.path(), name);
        let script = redirect_metacopy_changes(base);
        if idmapped {
            let _m = idmapped_overlay(&lower, &b, map, opts);
            run_ok(
                Command::new("/bin/sh")
                    .args(["-c", &script])
                    .current_dir(&b.merged),
            );
        } else {
            let _m = box_overlay(&lower, &b, base, opts).unwrap();
            run_ok(
                Command::new("/bin/sh")
                    .args(["-c", &script])
                    .current_dir(&b.merged),
            );
        }
        // The kernel wrote what this test is about.
        assert!(
            xattr::get(b.upper.join("srv/moved"), "trusted.overlay.redirect")
                .unwrap()
                .is_some(),
            "{name}: no redirect"
        );
        assert!(
            xattr::get(b.upper.join("bin/busybox"), "trusted.overlay.metacopy")
                .unwrap()
                .is_some(),
            "{name}: no metacopy"
        );
        let m = (base != 0).then_some(map);
        let layer = t.path().join(format!("{name}.tar"));
        diff(
            &b.upper,
            &layer,
            &[
                map_args(m),
                vec!["--lower".into(), lower.display().to_string()],
            ]
            .concat(),
        );
        layers.push((name, entries_with_data(&layer)));
        let out = t.path().join(format!("{name}-squashed"));
        squash(&lower, &b.upper, &["--output".as_ref(), out.as_os_str()], m);
        // In place, last: it changes this run's lower copy.
        squash(&lower, &b.upper, &["--in-place".as_ref()], m);
        squashed.push((name, out, lower));
    }
    let (_, want) = &layers[0];
    assert!(
        want.iter()
            .any(|e| e.starts_with("srv/moved/sub/f7 Regular 644 1000:42 5 ")),
        "{want:#?}"
    );
    assert!(
        want.iter()
            .any(|e| e.starts_with("bin/busybox Regular 4755 0:0 8")),
        "{want:#?}"
    );
    for (name, got) in &layers[1..] {
        assert_eq!(
            got, want,
            "{name}: the layer differs from the unshifted one"
        );
    }
    let opts = SnapshotOptions {
        ignore_mtime: true,
        ..SnapshotOptions::merged_view()
    };
    let snap = |p: &Path| ovl_tests::snapshot::snapshot(p, &opts).unwrap();
    let (_, plain_out, plain_in) = &squashed[0];
    assert_eq!(owner(&plain_out.join("srv/moved/f9")), (9, 9));
    // A shifted lower stays shifted: the squash keeps the lowers' own (host) ids.
    let unshift = |mut s: ovl_tests::snapshot::Snapshot, base: u32| {
        for e in s.values_mut() {
            e.uid -= base;
            e.gid -= base;
        }
        s
    };
    for ((name, out, inplace), base) in squashed[1..].iter().zip([0, 100_000]) {
        for (how, want, got) in [
            ("--output", plain_out, out),
            ("--in-place", plain_in, inplace),
        ] {
            let diffs = ovl_tests::snapshot::differences(&snap(want), &unshift(snap(got), base));
            assert!(
                diffs.is_empty(),
                "{name} squash {how}: {}",
                diffs.join("\n")
            );
        }
    }
}

/// "Root exporting a rootless user's upper": an upper a user with subordinate ids wrote
/// through a rootless mount holds host ids of the user's map (container 0 = the user, 1.. =
/// the subordinate ids). Root, which sees those host ids, exports it with that map as
/// `--uidmap`/`--gidmap` and gets the layer the user's own ovl-diff makes (which reads it
/// inside its user namespace); ovl-squash as root folds it into the user's lower keeping the
/// user's host ids (the lower holds them too).
#[test]
fn root_exports_and_squashes_a_rootless_users_upper_with_its_map() {
    let Some(alpine) = ovl_tests::alpine_minirootfs() else {
        return;
    };
    let Some(user) = ovl_tests::require_test_user() else {
        return;
    };
    let maps = ovl_tests::rootless_maps(&user);
    assert!(maps.has_subordinate_ids());
    let t = ovl_tests::user_tempdir(&user);
    let as_user = |tool: &str| ovl_tests::command_as(&user, &bin(tool));
    let lower = t.path().join("lower");
    run_ok(as_user("ovl-import").arg("-q").arg(&alpine).arg(&lower));
    for d in ["upper", "work", "merged"] {
        let p = t.path().join(d);
        std::fs::create_dir(&p).unwrap();
        rustix::fs::chown(
            &p,
            Some(rustix::fs::Uid::from_raw(user.uid)),
            Some(rustix::fs::Gid::from_raw(user.gid)),
        )
        .unwrap();
    }
    let upper = t.path().join("upper");
    run_ok(
        as_user("ovl-mount")
            .arg("--idmap")
            .arg("subids")
            .arg("--lower")
            .arg(&lower)
            .arg("--upper")
            .arg(&upper)
            .arg("--work")
            .arg(t.path().join("work"))
            .arg(t.path().join("merged"))
            .args([
                "--",
                "/bin/sh",
                "-ec",
                "chown 1000:1000 etc/hostname; chgrp 42 etc/passwd; echo n > etc/new; \
                 chown 7:8 etc/new; rm etc/motd; mkdir -p home/bob; chown 1000:1000 home/bob",
            ]),
    );
    let host = |id: u32| maps.uid.to_host(id).unwrap();
    let host_gid = |id: u32| maps.gid.to_host(id).unwrap();
    assert_eq!(
        owner(&upper.join("etc/hostname")),
        (host(1000), host_gid(1000))
    );
    assert_eq!(owner(&upper.join("etc/passwd")).0, user.uid);

    let theirs = t.path().join("user.tar");
    run_ok(
        as_user("ovl-diff")
            .arg("-q")
            .arg("--lower")
            .arg(&lower)
            .arg("-o")
            .arg(&theirs)
            .arg(&upper),
    );
    let args = |flag: &str, m: &ovl_layer::IdMap| -> Vec<String> {
        m.ranges()
            .iter()
            .flat_map(|r| [flag.to_string(), r.to_string()])
            .collect()
    };
    let map_flags = [args("--uidmap", &maps.uid), args("--gidmap", &maps.gid)].concat();
    let ours = t.path().join("root.tar");
    diff(
        &upper,
        &ours,
        &[
            map_flags.clone(),
            vec!["--lower".into(), lower.display().to_string()],
        ]
        .concat(),
    );
    let want = entries(&theirs);
    for e in [
        "etc/hostname Regular 644 1000:1000",
        "etc/passwd Regular 644 0:42",
        "etc/new Regular 644 7:8",
        "home/bob/ Directory 755 1000:1000",
    ] {
        assert!(want.iter().any(|w| w.starts_with(e)), "{e}: {want:#?}");
    }
    assert_eq!(entries(&ours), want);
    // Without the map, root would export the user's host ids.
    let leaked = t.path().join("leaked.tar");
    diff(&upper, &leaked, &[]);
    assert_ne!(entries(&leaked), want);

    // Root squashes it into the user's lower: the result keeps the user's host ids.
    let squashed = t.path().join("squashed");
    squash(
        &lower,
        &upper,
        &["--output".as_ref(), squashed.as_os_str()],
        None,
    );
    let squashed_mapped = t.path().join("squashed-mapped");
    run_ok(
        Command::new(bin("ovl-squash"))
            .arg("-q")
            .args(&map_flags)
            .arg("--lower")
            .arg(&lower)
            .arg("--upper")
            .arg(&upper)
            .arg("--output")
            .arg(&squashed_mapped),
    );
    assert_eq!(
        owner(&squashed_mapped.join("etc/hostname")),
        (host(1000), host(1000))
    );
    assert_eq!(
        owner(&squashed_mapped.join("etc/shadow")),
        (user.uid, host(42))
    );
    let opts = SnapshotOptions::default();
    assert!(
        ovl_tests::snapshot::differences(
            &ovl_tests::snapshot::snapshot(&squashed, &opts).unwrap(),
            &ovl_tests::snapshot::snapshot(&squashed_mapped, &opts).unwrap()
        )
        .is_empty()
    );
}
