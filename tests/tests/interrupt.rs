//! Interrupted runs and their staging siblings, for every tool that writes through one
//! (ovl-import DEST, `ovl-squash --output`, `ovl-diff -o FILE`):
//! - SIGINT, SIGTERM or SIGHUP mid-run: the sibling is removed, one line on stderr names it,
//!   the exit code is 130, 143 or 129, and DEST does not exist. Rootless too, where the tool
//!   runs as a re-executed child in a user namespace: a SIGTERM to the outer process reaches
//!   the child, and a terminal's SIGINT (to the whole process group) is handled once.
//! - SIGKILL leaves the sibling; the next run removes it, but never a look-alike that is not
//!   ours.
//!
//! A run is stopped mid-way deterministically: ovl-import reads a tar from a pipe this test
//! keeps open; squash and diff wait at their commit on a FIFO named by `OVL_STAGING_HOLD`
//! (debug builds only), so their output is complete but not renamed when they are signalled.

use std::io::Write;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use ovl_tests::{bin, command_as, is_root, output, require, run_ok};

/// The entries of `dir` whose names start with `.NAME.TOOL-`: the staging siblings of NAME.
fn siblings(dir: &Path, name: &str, tool: &str) -> Vec<PathBuf> {
    let prefix = format!(".{name}.{tool}-");
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect();
    v.sort();
    v
}

/// Poll until `f` holds (a hang guard, not a timing assumption: a minute is an eternity here).
fn wait_until(what: &str, child: &mut Child, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        if let Some(st) = child.try_wait().unwrap() {
            panic!("waiting for {what}: the tool exited early ({st})");
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("waiting for {what}: still not there after 60 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn kill(pid: i32, sig: libc::c_int) {
    // SAFETY: kill has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill {pid} {sig}");
}

/// The start of a tar whose first member, `big`, announces 64 MiB but gets only 1 MiB yet.
fn half_a_tar() -> Vec<u8> {
    let mut h = tar::Header::new_ustar();
    h.set_path("big").unwrap();
    h.set_size(64 << 20);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    let mut v = h.as_bytes().to_vec();
    v.resize(v.len() + (1 << 20), 0x5a);
    v
}

/// Start `cmd` (an ovl-import into `dest` reading stdin), feed it half a tar and wait until
/// its sibling holds part of `big`. Returns the child, the open pipe and the sibling.
fn import_half_way(mut cmd: Command, dest: &Path) -> (Child, ChildStdin, PathBuf) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    if let Err(e) = stdin.write_all(&half_a_tar()) {
        let out = child.wait_with_output().unwrap();
        panic!(
            "writing to ovl-import: {e}; it exited with {}:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let parent = dest.parent().unwrap();
    let name = dest.file_name().unwrap().to_str().unwrap();
    let mut sib = None;
    wait_until("the staging sibling", &mut child, || {
        sib = siblings(parent, name, "ovl-import")
            .into_iter()
            // (`big` at the top: where a sibling held the output before it had a marker)
            .find(|s| s.join("new/big").exists() || s.join("big").exists());
        sib.is_some()
    });
    (child, stdin, sib.unwrap())
}

/// The run ended with `code`, said so in one line naming `sib`, and left neither `sib` nor
/// `dest` behind.
fn assert_cleaned_up(what: &str, child: Child, code: i32, sib: &Path, dest: &Path) {
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(code),
        "{what}: {} (killed by signal {:?}); stderr:\n{err}",
        out.status,
        out.status.signal()
    );
    assert_eq!(err.lines().count(), 1, "{what}: one line on stderr:\n{err}");
    assert!(
        err.contains("interrupted") && err.contains(&sib.display().to_string()),
        "{what}: the line names the sibling {}:\n{err}",
        sib.display()
    );
    assert!(!sib.exists(), "{what}: {} is left", sib.display());
    assert!(!dest.exists(), "{what}: {} exists", dest.display());
}

const SIGNALS: [(libc::c_int, i32); 3] = [
    (libc::SIGINT, 130),
    (libc::SIGTERM, 143),
    (libc::SIGHUP, 129),
];

#[test]
fn import_interrupted_as_root_removes_its_sibling() {
    if !require("root", is_root()) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    for (sig, code) in SIGNALS {
        let dest = t.path().join(format!("dest-{code}"));
        let mut cmd = Command::new(bin("ovl-import"));
        cmd.args(["--quiet", "-"]).arg(&dest);
        let (child, stdin, sib) = import_half_way(cmd, &dest);
        kill(child.id() as i32, sig);
        assert_cleaned_up(&format!("signal {sig}"), child, code, &sib, &dest);
        drop(stdin);
    }
    assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 0);
}

/// Rootless: the tool re-executes itself in a user namespace. A SIGTERM to the outer process
/// alone must reach the inner one (which cleans up); a terminal's SIGINT reaches both.
#[test]
fn import_interrupted_rootless_removes_its_sibling() {
    let Some(user) = ovl_tests::require_test_user() else {
        return;
    };
    if !require(
        "newuidmap (package uidmap)",
        ovl_tests::which("newuidmap").is_some(),
    ) {
        return;
    }
    let t = ovl_tests::user_tempdir(&user);
    for (sig, code, group) in [(libc::SIGTERM, 143, false), (libc::SIGINT, 130, true)] {
        let dest = t.path().join(format!("dest-{code}"));
        let mut cmd = command_as(&user, &bin("ovl-import"));
        cmd.args(["--quiet", "-"]).arg(&dest).process_group(0);
        let (child, stdin, sib) = import_half_way(cmd, &dest);
        let pid = child.id() as i32;
        // The group, as a terminal's ^C does; else the outer process only.
        kill(if group { -pid } else { pid }, sig);
        let what = format!(
            "signal {sig} to the {}",
            if group { "group" } else { "outer process" }
        );
        assert_cleaned_up(&what, child, code, &sib, &dest);
        drop(stdin);
    }
    assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 0);
}

/// SIGKILL leaves the sibling (nothing can run); the next import into the same DEST removes it,
/// and leaves alone the directories of others that only look like siblings.
#[test]
fn only_a_dead_sibling_of_ours_is_swept() {
    let t = tempfile::tempdir().unwrap();
    let dest = t.path().join("dest");
    let foreign = [
        // The old pid form (2^22+1: never a live pid), and the new token form, unmarked.
        ".dest.ovl-import-4194305",
        ".dest.ovl-import-0123456789abcdef",
    ];
    for f in foreign {
        std::fs::create_dir_all(t.path().join(f).join("theirs")).unwrap();
    }
    let mut cmd = Command::new(bin("ovl-import"));
    cmd.args(["--quiet", "-"]).arg(&dest);
    let (mut child, stdin, sib) = import_half_way(cmd, &dest);
    child.kill().unwrap();
    assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGKILL));
    drop(stdin);
    assert!(sib.exists(), "SIGKILL cannot clean up");

    let archive = t.path().join("a.tar");
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_size(1);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_cksum();
    b.append_data(&mut h, "f", &b"x"[..]).unwrap();
    std::fs::write(&archive, b.into_inner().unwrap()).unwrap();
    run_ok(
        Command::new(bin("ovl-import"))
            .arg("--quiet")
            .arg(&archive)
            .arg(&dest),
    );
    assert_eq!(std::fs::read(dest.join("f")).unwrap(), b"x");
    assert!(!sib.exists(), "the dead sibling is swept");
    for f in foreign {
        assert!(
            t.path().join(f).join("theirs").exists(),
            "{f}: someone else's directory was removed"
        );
    }
}

/// A FIFO for `OVL_STAGING_HOLD`, and a way to see that a tool waits on it.
struct Hold {
    fifo: PathBuf,
}

impl Hold {
    fn new(dir: &Path) -> Hold {
        let fifo = dir.join("hold");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        Hold { fifo }
    }

    /// Wait until `child` opened the FIFO (it waits at its commit); the returned writer keeps
    /// it waiting until dropped.
    fn reached(&self, child: &mut Child) -> std::fs::File {
        let mut w = None;
        wait_until("the tool to wait at its commit", child, || {
            // O_NONBLOCK: ENXIO until a reader has it open.
            w = rustix::fs::open(
                &self.fifo,
                rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::NONBLOCK,
                rustix::fs::Mode::empty(),
            )
            .ok();
            w.is_some()
        });
        std::fs::File::from(w.unwrap())
    }
}

fn spawn_held(cmd: &mut Command, hold: &Hold) -> Child {
    cmd.env(ovl_layer::STAGING_HOLD_ENV, &hold.fifo)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// A tree of `n` files of 1 MiB each in `dir`.
fn tree(dir: &Path, n: usize) -> PathBuf {
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    for i in 0..n {
        std::fs::write(dir.join(format!("sub/f{i}")), vec![i as u8; 1 << 20]).unwrap();
    }
    dir.to_path_buf()
}

#[test]
fn squash_output_interrupted_removes_its_sibling() {
    if !require("root", is_root()) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let lower = tree(&t.path().join("lower"), 8);
    let upper = tree(&t.path().join("upper"), 2);
    let hold = Hold::new(t.path());
    for (sig, code) in SIGNALS {
        let out = t.path().join(format!("out-{code}"));
        let mut child = spawn_held(
            Command::new(bin("ovl-squash"))
                .args(["--quiet", "--lower"])
                .arg(&lower)
                .arg("--upper")
                .arg(&upper)
                .arg("--output")
                .arg(&out),
            &hold,
        );
        let w = hold.reached(&mut child);
        let sib = siblings(t.path(), &format!("out-{code}"), "ovl-squash");
        assert_eq!(sib.len(), 1, "{sib:?}");
        assert!(sib[0].join("new/sub/f7").exists(), "the result is built");
        kill(child.id() as i32, sig);
        assert_cleaned_up(&format!("signal {sig}"), child, code, &sib[0], &out);
        drop(w);
    }
    // And without a signal the held run completes.
    let out = t.path().join("out");
    let mut child = spawn_held(
        Command::new(bin("ovl-squash"))
            .args(["--quiet", "--lower"])
            .arg(&lower)
            .arg("--upper")
            .arg(&upper)
            .arg("--output")
            .arg(&out),
        &hold,
    );
    drop(hold.reached(&mut child));
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.join("sub/f7").exists());
    assert!(siblings(t.path(), "out", "ovl-squash").is_empty());
}

#[test]
fn diff_output_file_interrupted_removes_its_sibling() {
    if !require("root", is_root()) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let upper = tree(&t.path().join("upper"), 4);
    let hold = Hold::new(t.path());
    for (sig, code) in SIGNALS {
        let name = format!("layer-{code}.tar");
        let out = t.path().join(&name);
        let mut child = spawn_held(
            Command::new(bin("ovl-diff"))
                .args(["--quiet", "-o"])
                .arg(&out)
                .arg(&upper),
            &hold,
        );
        let w = hold.reached(&mut child);
        let sib = siblings(t.path(), &name, "ovl-diff");
        assert_eq!(sib.len(), 1, "{sib:?}");
        assert!(
            std::fs::metadata(sib[0].join("new")).unwrap().len() > 4 << 20,
            "the layer is written"
        );
        kill(child.id() as i32, sig);
        assert_cleaned_up(&format!("signal {sig}"), child, code, &sib[0], &out);
        drop(w);
    }
    let out = t.path().join("layer.tar");
    let o = output(
        Command::new(bin("ovl-diff"))
            .args(["--quiet", "-o"])
            .arg(&out)
            .arg(&upper),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(siblings(t.path(), "layer.tar", "ovl-diff").is_empty());
}

/// The names in `blobs/sha256` of `layout` that are not a digest: ovl's temporary files.
fn layout_temp_files(layout: &Path) -> Vec<String> {
    std::fs::read_dir(layout.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !(n.len() == 64 && n.bytes().all(|b| b.is_ascii_hexdigit())))
        .collect()
}

/// `ovl-diff --oci-layout` writes its layer blob into an exclusive temporary file in the
/// layout's `blobs/sha256`: SIGINT, SIGTERM or SIGHUP while it is written (here: complete and
/// waiting to be renamed to its digest) removes it, says so, and exits 128+N; the layout's
/// index is unchanged.
#[test]
fn diff_oci_layout_interrupted_removes_its_temporary_blob() {
    if !require("root", is_root()) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let upper = tree(&t.path().join("upper"), 4);
    let layout = t.path().join("layout");
    let spec = format!("{}:v1", layout.display());
    // The layout made first: a held run then waits at the layer blob's commit, its first.
    let made = output(
        Command::new(bin("ovl-diff"))
            .args(["--quiet", "--oci-layout"])
            .arg(&spec)
            .arg(t.path().join("upper/sub")),
    );
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let index = std::fs::read(layout.join("index.json")).unwrap();
    let hold = Hold::new(t.path());
    for (sig, code) in SIGNALS {
        let mut child = spawn_held(
            Command::new(bin("ovl-diff"))
                .args(["--quiet", "--oci-layout"])
                .arg(&spec)
                .arg(&upper),
            &hold,
        );
        let w = hold.reached(&mut child);
        let tmp = layout_temp_files(&layout);
        assert_eq!(tmp.len(), 1, "the blob being written: {tmp:?}");
        kill(child.id() as i32, sig);
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(code),
            "signal {sig}: {} (signal {:?}); stderr:\n{err}",
            out.status,
            out.status.signal()
        );
        assert!(
            err.lines().count() == 1 && err.contains("interrupted") && err.contains(&tmp[0]),
            "signal {sig}: one line naming {}:\n{err}",
            tmp[0]
        );
        assert_eq!(
            layout_temp_files(&layout),
            Vec::<String>::new(),
            "signal {sig}"
        );
        assert_eq!(std::fs::read(layout.join("index.json")).unwrap(), index);
        drop(w);
    }
}
