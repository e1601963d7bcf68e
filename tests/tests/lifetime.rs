//! A command run inside `ovl-mount -- CMD` does not outlive ovl-mount: killing the tool (as
//! root, and rootless where a re-executed copy sits between the two) takes CMD down too, so no
//! orphan keeps the mount namespace, and with it the overlay and its upper, alive.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ovl_tests::{TestUser, bin, command_as, is_root, require};

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Running and not a zombie (a zombie has released its namespaces).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
    })
}

/// Start `ovl-mount ... -- sh -c 'exec sleep 60'` through `tool` (as `owner` when given),
/// SIGTERM the tool, and require the command to be gone.
fn check(dir: &Path, mut tool: Command, owner: Option<&TestUser>) {
    let give = |p: &Path| {
        if let Some(u) = owner {
            rustix::fs::chown(
                p,
                Some(rustix::fs::Uid::from_raw(u.uid)),
                Some(rustix::fs::Gid::from_raw(u.gid)),
            )
            .unwrap();
        }
    };
    for d in ["lower", "merged"] {
        std::fs::create_dir(dir.join(d)).unwrap();
        give(&dir.join(d));
    }
    std::fs::write(dir.join("lower/f"), b"x").unwrap();
    give(&dir.join("lower/f"));
    let pidfile = dir.join("cmd.pid");
    tool.arg("--lower")
        .arg(dir.join("lower"))
        .arg("--upper")
        .arg(dir.join("upper"))
        .arg("--work")
        .arg(dir.join("work"))
        .arg(dir.join("merged"))
        .args(["--", "sh", "-c"])
        .arg(format!(
            "echo $$ > {}.tmp && mv {0}.tmp {0} && exec sleep 60",
            pidfile.display()
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = ovl_tests::mountns::spawn(&mut tool);
    wait_for("the command to start", || pidfile.exists());
    let cmd_pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(alive(cmd_pid));
    // setpriv execs the tool in place, so this is the process the user started.
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let _ = child.wait();
    wait_for("the command to die with ovl-mount", || !alive(cmd_pid));
}

#[test]
fn killing_ovl_mount_as_root_kills_its_command() {
    if !require("root", is_root()) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    check(t.path(), Command::new(bin("ovl-mount")), None);
}

#[test]
fn killing_a_rootless_ovl_mount_kills_its_command() {
    let Some(user) = ovl_tests::require_test_user() else {
        return;
    };
    let t = ovl_tests::user_tempdir(&user);
    let mut tool = command_as(&user, &bin("ovl-mount"));
    tool.args(["--driver", "kernel"]);
    check(t.path(), tool, Some(&user));
}
