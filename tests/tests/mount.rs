//! ovl-mount for real: root kernel, rootless kernel and rootless fuse-overlayfs mounts of the
//! Alpine rootfs that `ovl-import` laid down, what each driver writes into the upper, `--chroot`
//! with the image's own `adduser`, persistent mounts, 200 lowers, and every prerequisite error.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use ovl_layer::idmap::RootlessMaps;
use ovl_tests::{
    TestUser, bin, command_as, is_root, output, require, run_ok, test_user, user_tempdir,
};

/// The edit every driver test makes inside the mount (working directory MERGED).
const EDIT: &str = "rm etc/motd && rm -rf etc/apk && mkdir etc/apk && touch etc/apk/new";

/// Root tests need root; rootless ones the test user too. Both need the Alpine tarball.
fn root_setup() -> Option<PathBuf> {
    if !require("root", is_root()) {
        return None;
    }
    ovl_tests::alpine_minirootfs()
}

fn user_setup() -> Option<(TestUser, PathBuf)> {
    if !require("root (to act as the unprivileged test user)", is_root()) {
        return None;
    }
    let user = test_user();
    if !require("the unprivileged test user", user.is_some()) {
        return None;
    }
    let needs = ["newuidmap", "newgidmap", "setpriv"];
    if !require(
        "newuidmap, newgidmap, setpriv",
        needs.iter().all(|p| ovl_tests::which(p).is_some()),
    ) {
        return None;
    }
    Some((user.unwrap(), ovl_tests::alpine_minirootfs()?))
}

/// Import the Alpine rootfs into `dest` as root.
fn import_as_root(tarball: &Path, dest: &Path) {
    run_ok(
        Command::new(bin("ovl-import"))
            .arg("-q")
            .arg(tarball)
            .arg(dest),
    );
}

/// Import the Alpine rootfs into `dest` as `user` (files land owned by its subordinate ids).
fn import_as(user: &TestUser, tarball: &Path, dest: &Path) {
    run_ok(
        command_as(user, &bin("ovl-import"))
            .arg("-q")
            .arg(tarball)
            .arg(dest),
    );
}

fn mount_cmd(user: Option<&TestUser>) -> Command {
    match user {
        Some(u) => command_as(u, &bin("ovl-mount")),
        None => Command::new(bin("ovl-mount")),
    }
}

/// `ovl-mount ARGS... --lower L --upper U --work W M -- sh -c SCRIPT`.
fn mount_run(
    user: Option<&TestUser>,
    args: &[&str],
    t: &Path,
    lower: &Path,
    script: &str,
) -> Output {
    let mut c = mount_cmd(user);
    c.args(args)
        .arg("--lower")
        .arg(lower)
        .arg("--upper")
        .arg(t.join("upper"))
        .arg("--work")
        .arg(t.join("work"))
        .arg(t.join("merged"))
        .args(["--", "/bin/sh", "-c", script]);
    output(&mut c)
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "ovl-mount failed with {}:\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Assert ovl-mount failed with its own exit code and a message containing every needle.
fn fails_with(out: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(125),
        "expected ovl-mount's own failure (125), got {}: {err}",
        out.status
    );
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}:\n{err}");
    }
}

fn mkdir(p: &Path) -> PathBuf {
    std::fs::create_dir_all(p).unwrap();
    p.to_path_buf()
}

fn is_kernel_whiteout(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_char_device() && m.rdev() == 0)
}

fn xattr(p: &Path, name: &str) -> Option<Vec<u8>> {
    xattr::get(p, name).unwrap()
}

/// Every name in the upper that starts with `.wh.`, relative to it.
fn wh_names(upper: &Path) -> Vec<String> {
    walkdir::WalkDir::new(upper)
        .into_iter()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".wh."))
        .map(|e| e.path().strip_prefix(upper).unwrap().display().to_string())
        .collect()
}

/// Every xattr name on every entry of the upper that starts with `prefix`.
fn xattrs_with_prefix(upper: &Path, prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    for e in walkdir::WalkDir::new(upper) {
        let e = e.unwrap();
        for n in xattr::list(e.path()).unwrap() {
            let n = n.to_string_lossy().into_owned();
            if n.starts_with(prefix) {
                out.push(format!("{}: {n}", e.path().display()));
            }
        }
    }
    out
}

/// The edit left the same visible result whatever the driver: motd gone, apk opaque and new.
fn assert_common_upper(upper: &Path) {
    assert!(upper.join("etc/apk/new").is_file());
    assert!(
        std::fs::symlink_metadata(upper.join("etc/apk/new"))
            .unwrap()
            .file_type()
            .is_file()
    );
    assert!(
        is_kernel_whiteout(&upper.join("etc/motd")),
        "etc/motd must be a 0/0 char device whiteout"
    );
}

/// What the kernel writes: 0/0 char device whiteouts, `NS.overlay.opaque=y`, no `.wh.` names.
fn assert_kernel_upper(upper: &Path, ns: &str, other: &str) {
    assert_common_upper(upper);
    assert_eq!(
        xattr(&upper.join("etc/apk"), &format!("{ns}.overlay.opaque")).as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(
        wh_names(upper),
        Vec::<String>::new(),
        "the kernel writes no .wh. names"
    );
    assert_eq!(
        xattrs_with_prefix(upper, &format!("{other}.overlay.")),
        Vec::<String>::new()
    );
    assert_eq!(
        xattrs_with_prefix(upper, "user.fuseoverlayfs."),
        Vec::<String>::new()
    );
}

#[test]
fn root_kernel_writes_device_whiteouts_and_trusted_opaque() {
    let Some(tarball) = root_setup() else { return };
    let t = tempfile::tempdir().unwrap();
    let lower = t.path().join("lower");
    import_as_root(&tarball, &lower);
    mkdir(&t.path().join("merged"));
    let script = format!("stat -c %u:%g etc/shadow && {EDIT} && pwd");
    let out = mount_run(None, &["-v", "--driver", "auto"], t.path(), &lower, &script);
    let stdout = ok(&out);
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        ["0:42", t.path().join("merged").to_str().unwrap()]
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("driver: kernel overlayfs (running as root)"),
        "{err}"
    );
    assert_kernel_upper(&t.path().join("upper"), "trusted", "user");
    assert_eq!(
        std::fs::read_dir(t.path().join("merged")).unwrap().count(),
        0,
        "the mount is gone"
    );
    assert!(lower.join("etc/motd").is_file(), "the lower is untouched");
}

#[test]
fn rootless_kernel_writes_device_whiteouts_and_user_opaque() {
    let Some((user, tarball)) = user_setup() else {
        return;
    };
    let t = user_tempdir(&user);
    let lower = t.path().join("lower");
    import_as(&user, &tarball, &lower);
    let maps = RootlessMaps::for_current_user_named(&user);
    // The image's gid 42 (shadow) landed as the mapped host id, and reads back as 42 inside.
    assert_eq!(
        std::fs::metadata(lower.join("etc/shadow")).unwrap().gid(),
        maps.gid.to_host(42).unwrap()
    );
    mkdir(&t.path().join("merged"));
    let script = format!("id -u && stat -c %u:%g etc/shadow && {EDIT}");
    let out = mount_run(
        Some(&user),
        &["-v", "--driver", "kernel"],
        t.path(),
        &lower,
        &script,
    );
    assert_eq!(ok(&out).lines().collect::<Vec<_>>(), ["0", "0:42"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("kernel overlayfs (rootless, userxattr)"),
        "{err}"
    );
    let upper = t.path().join("upper");
    assert_kernel_upper(&upper, "user", "trusted");
    assert_eq!(
        std::fs::symlink_metadata(upper.join("etc/motd"))
            .unwrap()
            .uid(),
        user.uid,
        "container root is the user"
    );
}

#[test]
fn rootless_fuse_writes_its_own_opaque_markers() {
    let Some((user, tarball)) = user_setup() else {
        return;
    };
    if !require(
        "fuse-overlayfs",
        ovl_tests::which("fuse-overlayfs").is_some(),
    ) || !require("a usable /dev/fuse", ovl_tests::make_fuse_usable())
    {
        return;
    }
    let t = user_tempdir(&user);
    let lower = t.path().join("lower");
    import_as(&user, &tarball, &lower);
    mkdir(&t.path().join("merged"));
    let script = format!("id -u && stat -c %u:%g etc/shadow && {EDIT} && ls -a etc/apk");
    let out = mount_run(
        Some(&user),
        &["-v", "--driver", "fuse"],
        t.path(),
        &lower,
        &script,
    );
    // Inside, the markers are invisible: only the new file shows.
    assert_eq!(
        ok(&out).lines().collect::<Vec<_>>(),
        ["0", "0:42", ".", "..", "new"]
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("driver: fuse-overlayfs (--driver fuse)")
    );
    let upper = t.path().join("upper");
    assert_common_upper(&upper);
    let apk = upper.join("etc/apk");
    let marker = std::fs::symlink_metadata(apk.join(".wh..wh..opq")).unwrap();
    assert!(
        marker.file_type().is_file() && marker.len() == 0,
        ".wh..wh..opq is an empty regular file"
    );
    assert!(
        is_kernel_whiteout(&apk.join(".wh..opq")),
        ".wh..opq is a 0/0 char device"
    );
    assert!(xattr(&apk, "user.fuseoverlayfs.opaque").is_some());
    assert_eq!(
        xattrs_with_prefix(&upper, "trusted.overlay."),
        Vec::<String>::new()
    );
    assert_eq!(
        xattrs_with_prefix(&upper, "user.overlay."),
        Vec::<String>::new()
    );
    let mut wh = wh_names(&upper);
    wh.sort();
    assert_eq!(
        wh,
        ["etc/apk/.wh..opq", "etc/apk/.wh..wh..opq"],
        "mknod works, so no .wh.motd file"
    );
    // This test's fuse-overlayfs is gone with the command.
    let pattern = format!("fuse-overlayfs.*upperdir={}", upper.display());
    let ps = output(Command::new("pgrep").args(["-u", &user.uid.to_string(), "-f", &pattern]));
    let left = String::from_utf8_lossy(&ps.stdout);
    assert!(
        left.trim().is_empty(),
        "fuse-overlayfs left running: {left}"
    );
}

#[test]
fn rootless_auto_says_which_driver_and_why() {
    let Some((user, _)) = user_setup() else {
        return;
    };
    let t = user_tempdir(&user);
    let lower = mkdir(&t.path().join("lower"));
    std::fs::write(lower.join("f"), b"x").unwrap();
    ovl_tests::set_mode(&lower.join("f"), 0o644);
    mkdir(&t.path().join("merged"));
    let script = "cat f; echo \" ${OVL_IN_USERNS:-unset}\"";
    let out = mount_run(Some(&user), &["-v"], t.path(), &lower, script);
    // The command does not inherit the re-exec marker (it may run ovl tools itself).
    assert_eq!(ok(&out), "x unset\n");
    let err = String::from_utf8_lossy(&out.stderr);
    let uname = rustix::system::uname();
    let release = uname.release().to_string_lossy().into_owned();
    let mut v = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|x| x.parse::<u32>().unwrap_or(0));
    if (v.next().unwrap_or(0), v.next().unwrap_or(0)) >= (5, 11) {
        assert!(
            err.contains("kernel overlayfs (rootless, userxattr)")
                && err.contains("allows overlayfs"),
            "{err}"
        );
    } else {
        assert!(
            err.contains("fuse-overlayfs") && err.contains("older than 5.11"),
            "{err}"
        );
    }
}

/// `adduser -D bob` from the image itself, with MERGED as root.
fn chroot_adduser(user: Option<&TestUser>, driver: &str, t: &Path, lower: &Path) {
    mkdir(&t.join("merged"));
    let script = "adduser -D bob && id -u bob && test -d /home/bob && ls /proc/self/fd >/dev/null \
                  && echo x >/dev/null && head -c 8 /dev/urandom | wc -c && su bob -c 'touch ~/made' && echo done";
    let out = mount_run(user, &["--chroot", "--driver", driver], t, lower, script);
    assert_eq!(
        ok(&out).split_whitespace().collect::<Vec<_>>(),
        ["1000", "8", "done"]
    );
    let upper = t.join("upper");
    let passwd = std::fs::read_to_string(upper.join("etc/passwd")).unwrap();
    assert!(passwd.contains("bob:x:1000:1000:"), "{passwd}");
    assert!(
        std::fs::read_to_string(upper.join("etc/group"))
            .unwrap()
            .contains("bob:x:1000:")
    );
    assert!(
        std::fs::read_to_string(upper.join("etc/shadow"))
            .unwrap()
            .starts_with("root:")
    );
    let host_bob = match user {
        None => 1000,
        Some(u) => RootlessMaps::for_current_user_named(u)
            .uid
            .to_host(1000)
            .unwrap(),
    };
    let home = std::fs::metadata(upper.join("home/bob")).unwrap();
    assert_eq!(
        home.uid(),
        host_bob,
        "bob's home belongs to bob's (mapped) id on disk"
    );
    assert_eq!(
        std::fs::metadata(upper.join("home/bob/made"))
            .unwrap()
            .uid(),
        host_bob
    );
    // Nothing of /proc or /dev leaked into the upper.
    assert!(!upper.join("dev/null").exists() && !upper.join("proc/self").exists());
    assert_eq!(std::fs::read_dir(t.join("merged")).unwrap().count(), 0);
}

#[test]
fn chroot_adduser_as_root() {
    let Some(tarball) = root_setup() else { return };
    let t = tempfile::tempdir().unwrap();
    let lower = t.path().join("lower");
    import_as_root(&tarball, &lower);
    chroot_adduser(None, "kernel", t.path(), &lower);
}

#[test]
fn chroot_adduser_rootless_kernel_and_fuse() {
    let Some((user, tarball)) = user_setup() else {
        return;
    };
    if !require("a usable /dev/fuse", ovl_tests::make_fuse_usable()) {
        return;
    }
    let t = user_tempdir(&user);
    let lower = t.path().join("lower");
    import_as(&user, &tarball, &lower);
    for driver in ["kernel", "fuse"] {
        let d = mkdir(&t.path().join(driver));
        std::os::unix::fs::chown(&d, Some(user.uid), Some(user.gid)).unwrap();
        chroot_adduser(Some(&user), driver, &d, &lower);
    }
}

#[test]
fn persistent_mount_prints_refuses_reuse_and_unmounts() {
    let Some(tarball) = root_setup() else { return };
    let t = tempfile::tempdir().unwrap();
    let p = t.path();
    let lower = p.join("lower");
    import_as_root(&tarball, &lower);
    let merged = mkdir(&p.join("merged"));
    let mut c = Command::new(bin("ovl-mount"));
    c.arg("--lower")
        .arg(&lower)
        .arg("--upper")
        .arg(p.join("u"))
        .arg("--work")
        .arg(p.join("w"))
        .arg(&merged);
    let stdout = ok(&output(&mut c));
    let want = format!(
        "mounted overlay on {} (lower={}, upper={}, work={})\n",
        merged.display(),
        lower.display(),
        p.join("u").display(),
        p.join("w").display()
    );
    assert_eq!(stdout, want);
    let unmount = || output(Command::new(bin("ovl-mount")).arg("--unmount").arg(&merged));
    let result = std::panic::catch_unwind(|| {
        assert!(
            merged.join("etc/alpine-release").is_file(),
            "the mount is visible from outside"
        );
        std::fs::write(merged.join("etc/hello"), b"hi").unwrap();
        // The same work directory (and upper) cannot serve a second overlay.
        let other = mkdir(&p.join("other"));
        let mut c = Command::new(bin("ovl-mount"));
        c.arg("--lower")
            .arg(&lower)
            .arg("--upper")
            .arg(p.join("u2"))
            .arg("--work")
            .arg(p.join("w"))
            .arg(&other);
        fails_with(&output(&mut c), &["work directory", "in use", "overlay on"]);
        let mut c = Command::new(bin("ovl-mount"));
        c.arg("--lower")
            .arg(&lower)
            .arg("--upper")
            .arg(p.join("u"))
            .arg("--work")
            .arg(p.join("w3"))
            .arg(&other);
        fails_with(&output(&mut c), &["upper directory", "in use"]);
    });
    assert_eq!(ok(&unmount()), format!("unmounted {}\n", merged.display()));
    result.unwrap();
    assert_eq!(std::fs::read(p.join("u/etc/hello")).unwrap(), b"hi");
    assert_eq!(std::fs::read_dir(&merged).unwrap().count(), 0);
    fails_with(&unmount(), &["not a mount point"]);
    // The work directory an earlier mount used is fine to use again.
    let mut c = Command::new(bin("ovl-mount"));
    c.arg("--lower")
        .arg(&lower)
        .arg("--upper")
        .arg(p.join("u"))
        .arg("--work")
        .arg(p.join("w"))
        .arg(&merged);
    c.args(["--", "cat", "etc/hello"]);
    assert_eq!(ok(&output(&mut c)), "hi");
}

#[test]
fn persistent_without_upper_is_read_only() {
    let Some(tarball) = root_setup() else { return };
    let t = tempfile::tempdir().unwrap();
    let lower = t.path().join("lower");
    import_as_root(&tarball, &lower);
    let extra = mkdir(&t.path().join("extra"));
    std::fs::write(extra.join("extra-file"), b"e").unwrap();
    let merged = mkdir(&t.path().join("merged"));
    // One lower (a read-only bind) and two lowers (a real overlay): both read-only.
    for lowers in [
        lower.display().to_string(),
        format!("{}:{}", extra.display(), lower.display()),
    ] {
        let out = output(
            Command::new(bin("ovl-mount"))
                .args(["--lower", &lowers])
                .arg(&merged),
        );
        assert!(ok(&out).ends_with("read-only)\n"));
        let write = std::fs::write(merged.join("etc/x"), b"x");
        run_ok(Command::new(bin("ovl-mount")).arg("--unmount").arg(&merged));
        assert_eq!(write.unwrap_err().raw_os_error(), Some(libc::EROFS));
    }
    assert!(!lower.join("etc/x").exists());
}

#[test]
fn merged_may_be_the_single_lower() {
    let Some((user, tarball)) = user_setup() else {
        return;
    };
    if !require("a usable /dev/fuse", ovl_tests::make_fuse_usable()) {
        return;
    }
    // Root.
    let t = tempfile::tempdir().unwrap();
    let rootfs = t.path().join("box/rootfs");
    mkdir(&t.path().join("box"));
    import_as_root(&tarball, &rootfs);
    let mut c = Command::new(bin("ovl-mount"));
    c.arg("--lower")
        .arg(&rootfs)
        .arg("--upper")
        .arg(t.path().join("box/upper"))
        .arg("--work");
    c.arg(t.path().join("box/work")).arg(&rootfs).args([
        "--",
        "sh",
        "-c",
        "rm etc/motd && echo new > etc/new",
    ]);
    ok(&output(&mut c));
    assert!(rootfs.join("etc/motd").is_file() && !rootfs.join("etc/new").exists());
    assert!(is_kernel_whiteout(&t.path().join("box/upper/etc/motd")));
    // Rootless, both drivers, with --chroot.
    let t = user_tempdir(&user);
    let rootfs = t.path().join("rootfs");
    import_as(&user, &tarball, &rootfs);
    for driver in ["kernel", "fuse"] {
        let mut c = command_as(&user, &bin("ovl-mount"));
        c.args(["--chroot", "--driver", driver, "--lower"])
            .arg(&rootfs)
            .arg("--upper");
        c.arg(t.path().join(format!("upper-{driver}")))
            .arg("--work")
            .arg(t.path().join(format!("work-{driver}")));
        c.arg(&rootfs).args([
            "--",
            "/bin/sh",
            "-c",
            "rm /etc/motd && cat /etc/alpine-release",
        ]);
        assert_eq!(ok(&output(&mut c)), "3.20.3\n", "{driver}");
        assert!(
            is_kernel_whiteout(&t.path().join(format!("upper-{driver}/etc/motd"))),
            "{driver}"
        );
    }
    assert!(rootfs.join("etc/motd").is_file());
}

/// 200 lowers whose paths together are far beyond one page.
fn many_lowers(base: &Path, n: usize) -> String {
    let mut all = Vec::new();
    for i in 0..n {
        let d = mkdir(&base.join(format!(
            "a-layer-directory-with-a-long-name-to-fill-the-page-{i:03}"
        )));
        std::fs::write(d.join(format!("f{i}")), b"").unwrap();
        std::fs::write(d.join("top"), format!("{i}\n")).unwrap();
        all.push(d.display().to_string());
    }
    let joined = all.join(":");
    assert!(joined.len() > 3 * 4096);
    joined
}

#[test]
fn two_hundred_lowers_mount_as_root_with_lowerdir_append_and_fallback() {
    if !require("root", is_root()) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let lowers = many_lowers(&t.path().join("layers"), 200);
    let merged = mkdir(&t.path().join("merged"));
    for (flags, how) in [
        (&[][..], "lowerdir+"),
        (&["--legacy-mount-api"][..], "/proc/self/fd names"),
    ] {
        let mut c = Command::new(bin("ovl-mount"));
        c.arg("-v")
            .args(flags)
            .args(["--lower", &lowers])
            .arg(&merged);
        c.arg("--upper")
            .arg(t.path().join(format!("u{}", flags.len())))
            .arg("--work");
        c.arg(t.path().join(format!("w{}", flags.len()))).args([
            "--",
            "sh",
            "-c",
            "cat top; ls | wc -l",
        ]);
        let out = output(&mut c);
        assert_eq!(
            ok(&out).split_whitespace().collect::<Vec<_>>(),
            ["0", "201"],
            "{how}"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(how), "{err}");
        eprintln!(
            "200 lowers, root: {}",
            err.lines()
                .find(|l| l.contains("mounted via"))
                .unwrap_or("")
        );
    }
}

#[test]
fn two_hundred_lowers_mount_rootless_kernel_and_fuse() {
    let Some((user, _)) = user_setup() else {
        return;
    };
    if !require("a usable /dev/fuse", ovl_tests::make_fuse_usable()) {
        return;
    }
    let t = user_tempdir(&user);
    let lowers = many_lowers(&t.path().join("layers"), 200);
    let merged = mkdir(&t.path().join("merged"));
    run_ok(
        Command::new("chown")
            .arg("-R")
            .arg(format!("{}:{}", user.uid, user.gid))
            .arg(t.path()),
    );
    for (driver, extra) in [
        ("kernel", ""),
        ("kernel", "--legacy-mount-api"),
        ("fuse", ""),
    ] {
        let mut c = command_as(&user, &bin("ovl-mount"));
        c.args(["-v", "--driver", driver, "--lower", &lowers]);
        if !extra.is_empty() {
            c.arg(extra);
        }
        let driver = &format!("{driver}{extra}");
        c.arg("--upper").arg(t.path().join(format!("u-{driver}")));
        c.arg("--work")
            .arg(t.path().join(format!("w-{driver}")))
            .arg(&merged);
        c.args(["--", "sh", "-c", "cat top; ls | wc -l; touch new"]);
        let out = output(&mut c);
        assert_eq!(
            ok(&out).split_whitespace().collect::<Vec<_>>(),
            ["0", "201"],
            "{driver}"
        );
        assert!(t.path().join(format!("u-{driver}/new")).is_file());
        let err = String::from_utf8_lossy(&out.stderr);
        eprintln!(
            "200 lowers, rootless {driver}: {}",
            err.lines().find(|l| l.contains("mounted")).unwrap_or("")
        );
    }
}

#[test]
fn exit_status_of_the_command_is_returned() {
    let Some((user, _)) = user_setup() else {
        return;
    };
    for u in [None, Some(&user)] {
        let t = match u {
            Some(u) => user_tempdir(u),
            None => tempfile::tempdir().unwrap(),
        };
        let lower = mkdir(&t.path().join("l"));
        mkdir(&t.path().join("merged"));
        let out = mount_run(u, &[], t.path(), &lower, "exit 7");
        assert_eq!(
            out.status.code(),
            Some(7),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = mount_run(u, &[], t.path(), &lower, "kill -TERM $$");
        assert_eq!(out.status.code(), Some(128 + 15));
    }
}

#[test]
fn a_work_dir_in_use_by_a_running_rootless_command_is_refused() {
    let Some((user, _)) = user_setup() else {
        return;
    };
    let t = user_tempdir(&user);
    let lower = mkdir(&t.path().join("l"));
    mkdir(&t.path().join("merged"));
    mkdir(&t.path().join("merged2"));
    let stop = t.path().join("stop");
    let mut first = mount_cmd(Some(&user));
    first
        .arg("--lower")
        .arg(&lower)
        .arg("--upper")
        .arg(t.path().join("upper"))
        .arg("--work");
    first
        .arg(t.path().join("work"))
        .arg(t.path().join("merged"));
    // The command gives up by itself after 30 s, so a failing test never leaves it behind.
    let script = format!(
        "touch ready || exit 3; i=0; while [ ! -e {} ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done",
        stop.display()
    );
    first
        .args(["--", "sh", "-c", &script])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut first = first.spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !t.path().join("upper/ready").exists() {
        if std::time::Instant::now() > deadline || first.try_wait().unwrap().is_some() {
            std::fs::write(&stop, b"").unwrap();
            panic!("the first mount never became ready: {:?}", first.wait());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mut second = mount_cmd(Some(&user));
    second
        .arg("--lower")
        .arg(&lower)
        .arg("--upper")
        .arg(t.path().join("upper2"))
        .arg("--work");
    second
        .arg(t.path().join("work"))
        .arg(t.path().join("merged2"))
        .args(["--", "true"]);
    let out = output(&mut second);
    std::fs::write(&stop, b"").unwrap();
    assert!(first.wait().unwrap().success());
    fails_with(&out, &["work directory", "in use", "another ovl-mount"]);
}

#[test]
fn prerequisite_errors_say_what_to_do() {
    let Some((user, _)) = user_setup() else {
        return;
    };
    let t = user_tempdir(&user);
    let p = t.path();
    let lower = mkdir(&p.join("l"));
    let merged = mkdir(&p.join("merged"));
    let run = |args: &[&str], upper: &Path, work: &Path, merged: &Path| {
        let mut c = command_as(&user, &bin("ovl-mount"));
        c.args(args)
            .arg("--lower")
            .arg(&lower)
            .arg("--upper")
            .arg(upper)
            .arg("--work")
            .arg(work);
        output(c.arg(merged).args(["--", "true"]))
    };
    // MERGED missing.
    fails_with(
        &run(&[], &p.join("u"), &p.join("w"), &p.join("nope")),
        &["does not exist", "mkdir -p"],
    );
    // Work directory not empty.
    mkdir(&p.join("wfull"));
    std::fs::write(p.join("wfull/junk"), b"").unwrap();
    run_ok(
        Command::new("chown")
            .arg("-R")
            .arg(user.uid.to_string())
            .arg(p),
    );
    fails_with(
        &run(&[], &p.join("u"), &p.join("wfull"), &merged),
        &["not empty", "junk"],
    );
    // Upper and work on different filesystems (/dev/shm is a tmpfs).
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    run_ok(
        Command::new("chown")
            .arg(user.uid.to_string())
            .arg(shm.path()),
    );
    fails_with(
        &run(&[], &p.join("u"), &shm.path().join("w"), &merged),
        &["different filesystems", "same one"],
    );
    // Upper inside a lower.
    fails_with(
        &run(&[], &lower.join("u"), &p.join("w"), &merged),
        &["inside the lower directory", "must not overlap"],
    );
    // No fuse-overlayfs binary.
    fails_with(
        &run(
            &[
                "--driver",
                "fuse",
                "--fuse-overlayfs",
                "/nonexistent/fuse-overlayfs",
            ],
            &p.join("u"),
            &p.join("w"),
            &merged,
        ),
        &[
            "fuse-overlayfs not found",
            "install the fuse-overlayfs package",
        ],
    );
    // The fuse device not accessible (a stand-in owned by root, mode 0600).
    let dev = p.join("fuse-dev");
    std::fs::write(&dev, b"").unwrap();
    ovl_tests::set_mode(&dev, 0o600);
    let devs = dev.display().to_string();
    fails_with(
        &run(
            &["--driver", "fuse", "--fuse-device", &devs],
            &p.join("u"),
            &p.join("w"),
            &merged,
        ),
        &["is not accessible", "chmod 0666"],
    );
    // No command as a user.
    let out = output(
        command_as(&user, &bin("ovl-mount"))
            .arg("--lower")
            .arg(&lower)
            .arg(&merged),
    );
    fails_with(&out, &["needs root", "-- CMD"]);
    // --unmount as a user.
    fails_with(
        &output(
            command_as(&user, &bin("ovl-mount"))
                .arg("--unmount")
                .arg(&merged),
        ),
        &["needs root"],
    );
    // Nothing was mounted or written by the failures.
    assert_eq!(std::fs::read_dir(&merged).unwrap().count(), 0);
}

#[test]
fn without_subordinate_ids_a_single_id_map_with_a_warning() {
    let Some((user, _)) = user_setup() else {
        return;
    };
    let nosub = ovl_tests::test_user_without_subids();
    if !require("the test user without subordinate ids", nosub.is_some()) {
        return;
    }
    let nosub = nosub.unwrap();
    strip_subids(&nosub.name);
    // `--idmap single` for a user that has them; auto for a user without.
    let cases = [(&user, &["--idmap", "single"][..]), (&nosub, &[][..])];
    for (u, args) in cases {
        let t = user_tempdir(u);
        let lower = mkdir(&t.path().join("l"));
        mkdir(&t.path().join("merged"));
        let out = mount_run(
            Some(u),
            args,
            t.path(),
            &lower,
            "id -u; wc -l < /proc/self/uid_map; touch x",
        );
        assert_eq!(
            ok(&out).split_whitespace().collect::<Vec<_>>(),
            ["0", "1"],
            "{}",
            u.name
        );
        if args.is_empty() {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains("warning") && err.contains("single-id map"),
                "{err}"
            );
        }
        assert_eq!(
            std::fs::metadata(t.path().join("upper/x")).unwrap().uid(),
            u.uid
        );
    }
    // Demanding subordinate ids without having them is an error that says how to get them.
    let t = user_tempdir(&nosub);
    let lower = mkdir(&t.path().join("l"));
    mkdir(&t.path().join("merged"));
    let out = mount_run(
        Some(&nosub),
        &["--idmap", "subids"],
        t.path(),
        &lower,
        "true",
    );
    fails_with(&out, &["no subordinate ids", "usermod --add-subuids"]);
}

/// `useradd` on Debian gives every new user a subordinate range (SUB_UID_COUNT in
/// /etc/login.defs); the user that must have none loses it here.
fn strip_subids(name: &str) {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    for file in ["/etc/subuid", "/etc/subgid"] {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        let kept: String = text
            .lines()
            .filter(|l| l.split(':').next() != Some(name))
            .map(|l| format!("{l}\n"))
            .collect();
        if kept != text {
            let tmp = format!("{file}.ovl-test");
            std::fs::write(&tmp, kept).unwrap();
            ovl_tests::set_mode(Path::new(&tmp), 0o644);
            std::fs::rename(&tmp, file).unwrap();
        }
    }
}

/// The maps ovl-mount gives `user`, read the way it reads them.
trait ForUser {
    fn for_current_user_named(user: &TestUser) -> RootlessMaps;
}

impl ForUser for RootlessMaps {
    fn for_current_user_named(user: &TestUser) -> RootlessMaps {
        RootlessMaps::for_user(
            &user.name,
            user.uid,
            user.gid,
            Path::new("/etc/subuid"),
            Path::new("/etc/subgid"),
        )
        .unwrap()
    }
}

#[test]
fn persistent_fuse_mount_as_root_writes_fuse_markers() {
    let Some(tarball) = root_setup() else { return };
    if !require(
        "fuse-overlayfs",
        ovl_tests::which("fuse-overlayfs").is_some(),
    ) || !require("a usable /dev/fuse", ovl_tests::make_fuse_usable())
    {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let p = t.path();
    let lower = p.join("lower");
    import_as_root(&tarball, &lower);
    let merged = mkdir(&p.join("merged"));
    let mut c = Command::new(bin("ovl-mount"));
    c.args(["--driver", "fuse", "--lower"])
        .arg(&lower)
        .arg("--upper")
        .arg(p.join("u"));
    let out = output(c.arg("--work").arg(p.join("w")).arg(&merged));
    assert!(ok(&out).starts_with(&format!("mounted overlay on {} (", merged.display())));
    let edit = output(Command::new("sh").current_dir(&merged).args(["-c", EDIT]));
    run_ok(Command::new(bin("ovl-mount")).arg("--unmount").arg(&merged));
    ok(&edit);
    assert_eq!(std::fs::read_dir(&merged).unwrap().count(), 0);
    let upper = p.join("u");
    assert_common_upper(&upper);
    let apk = upper.join("etc/apk");
    assert!(
        std::fs::symlink_metadata(apk.join(".wh..wh..opq"))
            .unwrap()
            .file_type()
            .is_file()
    );
    assert!(is_kernel_whiteout(&apk.join(".wh..opq")));
    assert_eq!(
        xattr(&apk, "trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(
        xattrs_with_prefix(&upper, "user.overlay."),
        Vec::<String>::new()
    );
}

#[test]
fn rootless_auto_falls_back_to_fuse_when_the_kernel_refuses() {
    let Some((user, _)) = user_setup() else {
        return;
    };
    if !require("a usable /dev/fuse", ovl_tests::make_fuse_usable()) {
        return;
    }
    // An upper on an overlayfs is refused by the kernel ("not supported as upperdir"), while
    // fuse-overlayfs takes it: a real refusal to fall back from.
    let t = tempfile::tempdir().unwrap();
    let p = t.path();
    let (outer_lower, outer) = (mkdir(&p.join("ol")), mkdir(&p.join("om")));
    let mut c = Command::new(bin("ovl-mount"));
    c.arg("--lower")
        .arg(&outer_lower)
        .arg("--upper")
        .arg(p.join("ou"))
        .arg("--work")
        .arg(p.join("ow"));
    ok(&output(c.arg(&outer)));
    let result = std::panic::catch_unwind(|| {
        ovl_tests::set_mode(&outer, 0o777);
        let lower = mkdir(&outer.join("lower"));
        std::fs::write(lower.join("f"), b"lower\n").unwrap();
        ovl_tests::set_mode(&lower.join("f"), 0o644);
        let merged = mkdir(&outer.join("merged"));
        let b = mkdir(&outer.join("box"));
        std::os::unix::fs::chown(&b, Some(user.uid), Some(user.gid)).unwrap();
        let run = |driver: &str| {
            let mut c = command_as(&user, &bin("ovl-mount"));
            c.args(["-v", "--driver", driver, "--lower"])
                .arg(&lower)
                .arg("--upper")
                .arg(b.join("u"));
            output(c.arg("--work").arg(b.join("w")).arg(&merged).args([
                "--",
                "sh",
                "-c",
                "cat f && rm f",
            ]))
        };
        let out = run("auto");
        assert_eq!(ok(&out), "lower\n");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(
                "driver: fuse-overlayfs (the kernel refused overlayfs in the user namespace"
            ),
            "{err}"
        );
        assert!(
            err.contains("not supported as upperdir"),
            "the kernel's own reason is quoted: {err}"
        );
        // mknod 0/0 inside an overlayfs is refused to a user namespace: fuse-overlayfs then
        // writes its `.wh.` file form.
        assert!(is_kernel_whiteout(&b.join("u/f")) || b.join("u/.wh.f").is_file());
        // Forced, the kernel driver fails instead, and says why.
        fails_with(
            &run("kernel"),
            &["the kernel refused the overlay mount", "kernel says"],
        );
    });
    run_ok(Command::new(bin("ovl-mount")).arg("--unmount").arg(&outer));
    result.unwrap();
}

#[test]
fn upper_and_work_with_a_backslash_and_a_comma_in_their_names() {
    if !require("root", is_root()) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let p = t.path();
    let lower = mkdir(&p.join("lower"));
    std::fs::write(lower.join("f"), b"lower").unwrap();
    let (upper, work) = (p.join("u\\x,1"), p.join("w\\y,1"));
    // What overlayfs would take for them if the backslash were not escaped.
    let (decoy_u, decoy_w) = (mkdir(&p.join("ux,1")), mkdir(&p.join("wy,1")));
    let merged = mkdir(&p.join("merged"));
    let mount = |upper: &Path, work: &Path, merged: &Path| {
        output(
            Command::new(bin("ovl-mount"))
                .arg("--lower")
                .arg(&lower)
                .arg("--upper")
                .arg(upper)
                .arg("--work")
                .arg(work)
                .arg(merged),
        )
    };
    ok(&mount(&upper, &work, &merged));
    let result = std::panic::catch_unwind(|| {
        std::fs::write(merged.join("hello"), b"hi").unwrap();
        assert_eq!(std::fs::read(upper.join("hello")).unwrap(), b"hi");
        assert_eq!(std::fs::read_dir(&decoy_u).unwrap().count(), 0);
        assert_eq!(std::fs::read_dir(&decoy_w).unwrap().count(), 0);
        // The mount table names them exactly: a second overlay on them is refused.
        let other = mkdir(&p.join("other"));
        fails_with(
            &mount(&p.join("u2"), &work, &other),
            &["work directory", "in use"],
        );
        fails_with(
            &mount(&upper, &p.join("w2"), &other),
            &["upper directory", "in use"],
        );
    });
    ok(&output(
        Command::new(bin("ovl-mount")).arg("--unmount").arg(&merged),
    ));
    result.unwrap();
}
