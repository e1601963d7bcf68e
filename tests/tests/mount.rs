//! ovl-mount for real: root kernel, rootless kernel and rootless fuse-overlayfs mounts of the
//! Alpine rootfs that `ovl-import` laid down, what each driver writes into the upper, `--chroot`
//! with the image's own `adduser`, persistent mounts, 200 lowers, and every prerequisite error.

use std::ffi::OsStr;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use ovl_tests::{
    TestUser, bin, command_as, is_root, output, require, rootless_maps, run_ok, user_tempdir,
};
use tempfile::TempDir;

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
    let user = ovl_tests::require_test_user()?;
    let needs = ["newuidmap", "newgidmap", "setpriv"];
    if !require(
        "newuidmap, newgidmap, setpriv",
        needs.iter().all(|p| ovl_tests::which(p).is_some()),
    ) {
        return None;
    }
    Some((user, ovl_tests::alpine_minirootfs()?))
}

/// `user_setup`, and a /dev/fuse the test user can open.
fn user_fuse_setup() -> Option<(TestUser, PathBuf)> {
    user_setup().filter(|_| fuse_usable())
}

fn fuse_usable() -> bool {
    require("a usable /dev/fuse", ovl_tests::make_fuse_usable())
}

/// The fuse-overlayfs binary and a usable /dev/fuse.
fn fuse_overlayfs_usable() -> bool {
    require(
        "fuse-overlayfs",
        ovl_tests::which("fuse-overlayfs").is_some(),
    ) && fuse_usable()
}

/// An ovl binary run as `user`, or as root.
fn tool(user: Option<&TestUser>, name: &str) -> Command {
    match user {
        Some(u) => command_as(u, &bin(name)),
        None => Command::new(bin(name)),
    }
}

/// A temporary directory for `user` (one it owns), or for root.
fn tempdir_for(user: Option<&TestUser>) -> TempDir {
    match user {
        Some(u) => user_tempdir(u),
        None => tempfile::tempdir().unwrap(),
    }
}

/// Import the Alpine rootfs into `dest` as `user` (files land owned by its subordinate ids), or
/// as root.
fn import(user: Option<&TestUser>, tarball: &Path, dest: &Path) {
    run_ok(tool(user, "ovl-import").arg("-q").arg(tarball).arg(dest));
}

/// A temporary directory for `user` (or root) with the Alpine rootfs imported at `lower` in it.
fn imported(user: Option<&TestUser>, tarball: &Path) -> (TempDir, PathBuf) {
    let t = tempdir_for(user);
    let lower = t.path().join("lower");
    import(user, tarball, &lower);
    (t, lower)
}

/// An empty lower `T/l` and an empty `T/merged`; returns the lower.
fn empty_lower(t: &Path) -> PathBuf {
    let lower = mkdir(&t.join("l"));
    mkdir(&t.join("merged"));
    lower
}

fn mount_cmd(user: Option<&TestUser>) -> Command {
    tool(user, "ovl-mount")
}

/// `ovl-mount ARGS... --lower L --upper U --work W M`.
fn mount_at(
    user: Option<&TestUser>,
    args: &[&str],
    lower: impl AsRef<OsStr>,
    upper: &Path,
    work: &Path,
    merged: &Path,
) -> Command {
    let mut c = mount_cmd(user);
    c.args(args)
        .arg("--lower")
        .arg(lower)
        .arg("--upper")
        .arg(upper)
        .arg("--work")
        .arg(work)
        .arg(merged);
    c
}

/// `ovl-mount ARGS... --lower L --upper U --work W M -- sh -c SCRIPT`.
fn mount_at_run(
    user: Option<&TestUser>,
    args: &[&str],
    [lower, upper, work, merged]: [&Path; 4],
    sh: &str,
    script: &str,
) -> Output {
    output(mount_at(user, args, lower, upper, work, merged).args(["--", sh, "-c", script]))
}

/// `ovl-mount ARGS... --lower L --upper U --work W M -- sh -c SCRIPT`.
fn mount_run(
    user: Option<&TestUser>,
    args: &[&str],
    t: &Path,
    lower: &Path,
    script: &str,
) -> Output {
    let dirs = [lower, &t.join("upper"), &t.join("work"), &t.join("merged")];
    mount_at_run(user, args, dirs, "/bin/sh", script)
}

/// `ovl-mount --unmount MERGED` (as root).
fn unmount(merged: &Path) -> Command {
    let mut c = mount_cmd(None);
    c.arg("--unmount").arg(merged);
    c
}

/// Run `f` against the persistent mount on `merged`, then unmount it whether `f` panicked or
/// not; `f`'s panic comes after (a failed unmount first). Returns what `--unmount` printed.
fn while_mounted(merged: &Path, f: impl FnOnce() + std::panic::UnwindSafe) -> String {
    let result = std::panic::catch_unwind(f);
    let stdout = ok(&output(&mut unmount(merged)));
    result.unwrap();
    stdout
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

/// No xattr on any entry of the upper starts with `prefix`.
fn assert_no_xattrs(upper: &Path, prefix: &str) {
    assert_eq!(xattrs_with_prefix(upper, prefix), Vec::<String>::new());
}

/// How many entries a directory has (0: an unmounted, untouched MERGED).
fn entries(dir: &Path) -> usize {
    std::fs::read_dir(dir).unwrap().count()
}

/// Assert ovl-mount's stderr contains `needle`, showing it when not.
fn assert_said(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(needle), "{err}");
}

/// Make `p` and give it to `user`.
fn mkdir_for(user: &TestUser, p: &Path) -> PathBuf {
    let d = mkdir(p);
    std::os::unix::fs::chown(&d, Some(user.uid), Some(user.gid)).unwrap();
    d
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
    assert_no_xattrs(upper, &format!("{other}.overlay."));
    assert_no_xattrs(upper, "user.fuseoverlayfs.");
}

#[test]
fn root_kernel_writes_device_whiteouts_and_trusted_opaque() {
    let Some(tarball) = root_setup() else { return };
    let (t, lower) = imported(None, &tarball);
    mkdir(&t.path().join("merged"));
    let script = format!("stat -c %u:%g etc/shadow && {EDIT} && pwd");
    let out = mount_run(None, &["-v", "--driver", "auto"], t.path(), &lower, &script);
    let stdout = ok(&out);
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        ["0:42", t.path().join("merged").to_str().unwrap()]
    );
    assert_said(&out, "driver: kernel overlayfs (running as root)");
    assert_kernel_upper(&t.path().join("upper"), "trusted", "user");
    assert_eq!(entries(&t.path().join("merged")), 0, "the mount is gone");
    assert!(lower.join("etc/motd").is_file(), "the lower is untouched");
}

#[test]
fn rootless_kernel_writes_device_whiteouts_and_user_opaque() {
    let Some((user, tarball)) = user_setup() else {
        return;
    };
    let (t, lower) = imported(Some(&user), &tarball);
    let maps = rootless_maps(&user);
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
    assert_said(&out, "kernel overlayfs (rootless, userxattr)");
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
    if !fuse_overlayfs_usable() {
        return;
    }
    let (t, lower) = imported(Some(&user), &tarball);
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
    assert_no_xattrs(&upper, "trusted.overlay.");
    assert_no_xattrs(&upper, "user.overlay.");
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
        Some(u) => rootless_maps(u).uid.to_host(1000).unwrap(),
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
    assert_eq!(entries(&t.join("merged")), 0);
}

#[test]
fn chroot_adduser_as_root() {
    let Some(tarball) = root_setup() else { return };
    let (t, lower) = imported(None, &tarball);
    chroot_adduser(None, "kernel", t.path(), &lower);
}

#[test]
fn chroot_adduser_rootless_kernel_and_fuse() {
    let Some((user, tarball)) = user_fuse_setup() else {
        return;
    };
    let (t, lower) = imported(Some(&user), &tarball);
    for driver in ["kernel", "fuse"] {
        let d = mkdir_for(&user, &t.path().join(driver));
        chroot_adduser(Some(&user), driver, &d, &lower);
    }
}

#[test]
fn persistent_mount_prints_refuses_reuse_and_unmounts() {
    let Some(tarball) = root_setup() else { return };
    let (t, lower) = imported(None, &tarball);
    let p = t.path();
    let merged = mkdir(&p.join("merged"));
    let mount = |upper: &str, work: &str, merged: &Path| {
        mount_at(None, &[], &lower, &p.join(upper), &p.join(work), merged)
    };
    let stdout = ok(&output(&mut mount("u", "w", &merged)));
    let want = format!(
        "mounted overlay on {} (lower={}, upper={}, work={})\n",
        merged.display(),
        lower.display(),
        p.join("u").display(),
        p.join("w").display()
    );
    assert_eq!(stdout, want);
    let unmounted = while_mounted(&merged, || {
        assert!(
            merged.join("etc/alpine-release").is_file(),
            "the mount is visible from outside"
        );
        std::fs::write(merged.join("etc/hello"), b"hi").unwrap();
        // The same work directory (and upper) cannot serve a second overlay.
        let other = mkdir(&p.join("other"));
        fails_with(
            &output(&mut mount("u2", "w", &other)),
            &["work directory", "in use", "overlay on"],
        );
        fails_with(
            &output(&mut mount("u", "w3", &other)),
            &["upper directory", "in use"],
        );
    });
    assert_eq!(unmounted, format!("unmounted {}\n", merged.display()));
    assert_eq!(std::fs::read(p.join("u/etc/hello")).unwrap(), b"hi");
    assert_eq!(entries(&merged), 0);
    fails_with(&output(&mut unmount(&merged)), &["not a mount point"]);
    // The work directory an earlier mount used is fine to use again.
    let mut c = mount("u", "w", &merged);
    c.args(["--", "cat", "etc/hello"]);
    assert_eq!(ok(&output(&mut c)), "hi");
}

#[test]
fn persistent_without_upper_is_read_only() {
    let Some(tarball) = root_setup() else { return };
    let (t, lower) = imported(None, &tarball);
    let extra = mkdir(&t.path().join("extra"));
    std::fs::write(extra.join("extra-file"), b"e").unwrap();
    let merged = mkdir(&t.path().join("merged"));
    // One lower (a read-only bind) and two lowers (a real overlay): both read-only.
    for lowers in [
        lower.display().to_string(),
        format!("{}:{}", extra.display(), lower.display()),
    ] {
        let out = output(mount_cmd(None).args(["--lower", &lowers]).arg(&merged));
        assert!(ok(&out).ends_with("read-only)\n"));
        let write = std::fs::write(merged.join("etc/x"), b"x");
        run_ok(&mut unmount(&merged));
        assert_eq!(write.unwrap_err().raw_os_error(), Some(libc::EROFS));
    }
    assert!(!lower.join("etc/x").exists());
}

#[test]
fn merged_may_be_the_single_lower() {
    let Some((user, tarball)) = user_fuse_setup() else {
        return;
    };
    // Root.
    let t = tempfile::tempdir().unwrap();
    let rootfs = t.path().join("box/rootfs");
    mkdir(&t.path().join("box"));
    import(None, &tarball, &rootfs);
    let (upper, work) = (t.path().join("box/upper"), t.path().join("box/work"));
    let script = "rm etc/motd && echo new > etc/new";
    ok(&mount_at_run(
        None,
        &[],
        [&rootfs, &upper, &work, &rootfs],
        "sh",
        script,
    ));
    assert!(rootfs.join("etc/motd").is_file() && !rootfs.join("etc/new").exists());
    assert!(is_kernel_whiteout(&t.path().join("box/upper/etc/motd")));
    // Rootless, both drivers, with --chroot.
    let t = user_tempdir(&user);
    let rootfs = t.path().join("rootfs");
    import(Some(&user), &tarball, &rootfs);
    for driver in ["kernel", "fuse"] {
        let upper = t.path().join(format!("upper-{driver}"));
        let work = t.path().join(format!("work-{driver}"));
        let out = mount_at_run(
            Some(&user),
            &["--chroot", "--driver", driver],
            [&rootfs, &upper, &work, &rootfs],
            "/bin/sh",
            "rm /etc/motd && cat /etc/alpine-release",
        );
        assert_eq!(ok(&out), "3.20.3\n", "{driver}");
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
        let mut c = mount_cmd(None);
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
        assert_said(&out, how);
        let err = String::from_utf8_lossy(&out.stderr);
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
    let Some((user, _)) = user_fuse_setup() else {
        return;
    };
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
        let mut c = mount_cmd(Some(&user));
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
        let t = tempdir_for(u);
        let lower = empty_lower(t.path());
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
    let p = t.path();
    let lower = empty_lower(p);
    mkdir(&p.join("merged2"));
    let stop = p.join("stop");
    let mount = |upper: &str, merged: &str| {
        mount_at(
            Some(&user),
            &[],
            &lower,
            &p.join(upper),
            &p.join("work"),
            &p.join(merged),
        )
    };
    let mut first = mount("upper", "merged");
    // The command gives up by itself after 30 s, so a failing test never leaves it behind.
    let script = format!(
        "touch ready || exit 3; i=0; while [ ! -e {} ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done",
        stop.display()
    );
    first
        .args(["--", "sh", "-c", &script])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut first = ovl_tests::mountns::spawn(&mut first);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !t.path().join("upper/ready").exists() {
        if std::time::Instant::now() > deadline || first.try_wait().unwrap().is_some() {
            std::fs::write(&stop, b"").unwrap();
            panic!("the first mount never became ready: {:?}", first.wait());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = output(mount("upper2", "merged2").args(["--", "true"]));
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
        output(mount_at(Some(&user), args, &lower, upper, work, merged).args(["--", "true"]))
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
        mount_cmd(Some(&user))
            .arg("--lower")
            .arg(&lower)
            .arg(&merged),
    );
    fails_with(&out, &["needs root", "-- CMD"]);
    // --unmount as a user.
    fails_with(
        &output(mount_cmd(Some(&user)).arg("--unmount").arg(&merged)),
        &["needs root"],
    );
    // Nothing was mounted or written by the failures.
    assert_eq!(entries(&merged), 0);
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
    // (Stripped of the range useradd gave it by `test_user_without_subids` itself.)
    let nosub = nosub.unwrap();
    // `--idmap single` for a user that has them; auto for a user without.
    let cases = [(&user, &["--idmap", "single"][..]), (&nosub, &[][..])];
    for (u, args) in cases {
        let t = user_tempdir(u);
        let lower = empty_lower(t.path());
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
    let lower = empty_lower(t.path());
    let out = mount_run(
        Some(&nosub),
        &["--idmap", "subids"],
        t.path(),
        &lower,
        "true",
    );
    fails_with(&out, &["no subordinate ids", "usermod --add-subuids"]);
}

#[test]
fn persistent_fuse_mount_as_root_writes_fuse_markers() {
    let Some(tarball) = root_setup() else { return };
    if !fuse_overlayfs_usable() {
        return;
    }
    let (t, lower) = imported(None, &tarball);
    let p = t.path();
    let merged = mkdir(&p.join("merged"));
    let (upper, work) = (p.join("u"), p.join("w"));
    let out = output(&mut mount_at(
        None,
        &["--driver", "fuse"],
        &lower,
        &upper,
        &work,
        &merged,
    ));
    assert!(ok(&out).starts_with(&format!("mounted overlay on {} (", merged.display())));
    let edit = output(Command::new("sh").current_dir(&merged).args(["-c", EDIT]));
    run_ok(&mut unmount(&merged));
    ok(&edit);
    assert_eq!(entries(&merged), 0);
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
    assert_no_xattrs(&upper, "user.overlay.");
}

#[test]
fn rootless_auto_falls_back_to_fuse_when_the_kernel_refuses() {
    let Some((user, _)) = user_fuse_setup() else {
        return;
    };
    // An upper on an overlayfs is refused by the kernel ("not supported as upperdir"), while
    // fuse-overlayfs takes it: a real refusal to fall back from.
    let t = tempfile::tempdir().unwrap();
    let p = t.path();
    let (outer_lower, outer) = (mkdir(&p.join("ol")), mkdir(&p.join("om")));
    let (outer_upper, outer_work) = (p.join("ou"), p.join("ow"));
    ok(&output(&mut mount_at(
        None,
        &[],
        &outer_lower,
        &outer_upper,
        &outer_work,
        &outer,
    )));
    while_mounted(&outer, || {
        ovl_tests::set_mode(&outer, 0o777);
        let lower = mkdir(&outer.join("lower"));
        std::fs::write(lower.join("f"), b"lower\n").unwrap();
        ovl_tests::set_mode(&lower.join("f"), 0o644);
        let merged = mkdir(&outer.join("merged"));
        let b = mkdir_for(&user, &outer.join("box"));
        let (upper, work) = (b.join("u"), b.join("w"));
        let run = |driver: &str| {
            let dirs = [&lower, &upper, &work, &merged].map(PathBuf::as_path);
            mount_at_run(
                Some(&user),
                &["-v", "--driver", driver],
                dirs,
                "sh",
                "cat f && rm f",
            )
        };
        let out = run("auto");
        assert_eq!(ok(&out), "lower\n");
        assert_said(
            &out,
            "driver: fuse-overlayfs (the kernel refused overlayfs in the user namespace",
        );
        let err = String::from_utf8_lossy(&out.stderr);
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
        output(&mut mount_at(None, &[], &lower, upper, work, merged))
    };
    ok(&mount(&upper, &work, &merged));
    while_mounted(&merged, || {
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
}
