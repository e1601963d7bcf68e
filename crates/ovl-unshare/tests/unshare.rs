//! ovl-unshare end to end: the rootless user removes a box a rootless mount has used (which a
//! plain `rm -rf` cannot), in the same namespace the tools use; cwd, environment and exit
//! status pass through; as root the command runs as it is.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};

use ovl_tests::{TestUser, bin, command_as, is_root, output, require, run_ok, which};

/// A layer with a directory and a file owned by container ids other than 0.
fn layer() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o755);
    h.set_uid(1000);
    h.set_gid(1000);
    h.set_size(0);
    h.set_mtime(1_600_000_000);
    b.append_data(&mut h, "home/", std::io::empty()).unwrap();
    for (name, uid, gid) in [("home/f", 1000, 1000), ("shadow", 0, 42)] {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o640);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_size(2);
        h.set_mtime(1_600_000_000);
        b.append_data(&mut h, name, &b"x\n"[..]).unwrap();
    }
    b.into_inner().unwrap()
}

fn as_user(user: &TestUser, program: &Path, dir: &Path) -> Command {
    let mut c = command_as(user, Path::new("/bin/sh"));
    // setpriv keeps no working directory of ours: the shell goes there, then runs the program.
    c.arg("-c")
        .arg("cd \"$1\" && shift && exec \"$@\"")
        .arg("sh")
        .arg(dir)
        .arg(program);
    c
}

#[test]
fn the_rootless_user_removes_a_box_a_rootless_mount_used() {
    let Some(user) = ovl_tests::require_test_user() else {
        return;
    };
    if !require("newuidmap (package uidmap)", which("newuidmap").is_some()) {
        return;
    }
    // The mount may pick fuse-overlayfs where the kernel refuses a rootless overlay.
    ovl_tests::make_fuse_usable();
    let t = ovl_tests::user_tempdir(&user);
    std::fs::write(t.path().join("layer.tar"), layer()).unwrap();
    run_ok(as_user(&user, Path::new("/bin/mkdir"), t.path()).args(["-p", "box/overlay"]));
    run_ok(as_user(&user, &bin("ovl-import"), t.path()).args([
        "--quiet",
        "layer.tar",
        "box/rootfs",
    ]));
    run_ok(
        as_user(&user, &bin("ovl-mount"), t.path())
            .args(["--lower", "box/rootfs", "--upper", "box/overlay/upper"])
            .args(["--work", "box/overlay/work", "box/rootfs", "--"])
            .args([
                "/bin/sh",
                "-c",
                "echo new > new && rm shadow && echo y >> home/f",
            ]),
    );
    let bx = t.path().join("box");
    // Files of the subordinate ids, and overlayfs's own work/work: the user cannot remove them.
    let home = std::fs::symlink_metadata(bx.join("rootfs/home")).unwrap();
    assert_ne!(
        home.uid(),
        user.uid,
        "home/ should belong to a subordinate id"
    );

    let plain = output(as_user(&user, Path::new("/bin/rm"), t.path()).args(["-rf", "box"]));
    let stderr = String::from_utf8_lossy(&plain.stderr);
    assert!(
        !plain.status.success() && stderr.contains("Permission denied"),
        "a plain rm -rf of the box should fail for want of permission: {} {stderr}",
        plain.status
    );
    assert!(bx.exists());

    let out = output(as_user(&user, &bin("ovl-unshare"), t.path()).args(["rm", "-rf", "box"]));
    assert!(
        out.status.success(),
        "ovl-unshare rm -rf box: {} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!bx.exists(), "the box is still there");
}

#[test]
fn as_the_user_it_runs_in_the_tools_namespace_keeping_cwd_environment_and_status() {
    let Some(user) = ovl_tests::require_test_user() else {
        return;
    };
    if !require("newuidmap (package uidmap)", which("newuidmap").is_some()) {
        return;
    }
    let t = ovl_tests::user_tempdir(&user);
    let script = "id -u; pwd; echo \"$OVL_TEST_VAR\"; cat /proc/self/uid_map; exit 7";
    let mut c = as_user(&user, Path::new("/usr/bin/env"), t.path());
    c.arg("OVL_TEST_VAR=kept")
        .arg(bin("ovl-unshare"))
        .args(["sh", "-c", script]);
    let out = output(&mut c);
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "0", "{text}");
    assert_eq!(Path::new(lines[1]), t.path(), "{text}");
    assert_eq!(lines[2], "kept", "{text}");
    // The same map the tools use: container 0 is the user, 1.. its subordinate ids.
    let maps = ovl_tests::rootless_maps(&user);
    let want: Vec<Vec<String>> = maps
        .uid
        .ranges()
        .iter()
        .map(|r| {
            vec![
                r.container.to_string(),
                r.host.to_string(),
                r.count.to_string(),
            ]
        })
        .collect();
    let got: Vec<Vec<String>> = lines[3..]
        .iter()
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect();
    assert_eq!(got, want, "{text}");

    // No command: $SHELL, reading the same stdin.
    let mut c = as_user(&user, Path::new("/usr/bin/env"), t.path());
    c.arg("SHELL=/bin/sh")
        .arg(bin("ovl-unshare"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut child = ovl_tests::mountns::spawn(&mut c);
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"echo from-the-shell; id -u; exit 3\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "from-the-shell\n0\n");
}

#[test]
fn as_root_it_runs_the_command_as_it_is() {
    if !require("root", is_root()) {
        return;
    }
    let out = output(Command::new(bin("ovl-unshare")).args([
        "sh",
        "-c",
        "cat /proc/self/uid_map; exit 5",
    ]));
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    let map: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect();
    assert_eq!(map, ["0", "0", "4294967295"], "not the initial namespace");
}

#[test]
fn a_command_that_is_not_there_is_127_and_named_once() {
    let out = output(Command::new(bin("ovl-unshare")).arg("ovl-no-such-command"));
    assert_eq!(out.status.code(), Some(127), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("ovl-no-such-command"), "{stderr}");
    assert_eq!(
        stderr.matches("No such file or directory").count(),
        1,
        "{stderr}"
    );
}
