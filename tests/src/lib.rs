//! Shared helpers for the cross-tool integration tests (and the tools' own tests).
//!
//! Owns the conventions every test follows: where the built binaries are, how a test that needs
//! root, a package or the unprivileged test user skips (loudly) or fails (`OVL_REQUIRE_ALL=1`),
//! and how a command runs as that user. Skips are reported at the end of each test binary
//! ([`skips`]); the pinned fixtures are fetched by the tests themselves ([`mod@fixtures`]).

pub mod fixtures;
pub mod mountns;
pub mod oci;
pub mod scenario;
pub mod skips;
pub mod snapshot;
pub mod stack;
pub mod tarworld;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use sha2::Digest;

/// Set (to anything but `0`) to turn every skip into a failure. CI sets it.
pub const REQUIRE_ALL: &str = "OVL_REQUIRE_ALL";
/// The name of the unprivileged test user (default `ovltest`).
pub const TEST_USER: &str = "OVL_TEST_USER";

/// True when skips are failures.
pub fn require_all() -> bool {
    std::env::var(REQUIRE_ALL).is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Call at the top of a test that needs `what`: returns true when it is there; otherwise says so
/// loudly and returns false (the test then returns early), or panics under `OVL_REQUIRE_ALL`.
pub fn require(what: &str, present: bool) -> bool {
    if present {
        return true;
    }
    if require_all() {
        panic!("{what} is required ({REQUIRE_ALL} is set) but missing");
    }
    eprintln!(
        "\n*** SKIPPED: {what} is missing (set {REQUIRE_ALL}=1 to make this a failure) ***\n"
    );
    skips::record(what);
    false
}

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// A program in PATH.
pub fn which(program: &str) -> Option<PathBuf> {
    ovl_layer::which(program)
}

/// The workspace root (the directory holding the root `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Cargo's target directory: `$CARGO_TARGET_DIR` if set (relative to the workspace root), else
/// `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => workspace_root().join(dir),
        _ => workspace_root().join("target"),
    }
}

/// The fixtures/ directory.
pub fn fixtures() -> PathBuf {
    workspace_root().join("fixtures")
}

/// Every ovl binary, as the tests run them.
pub const TOOLS: [&str; 5] = [
    "ovl-import",
    "ovl-mount",
    "ovl-diff",
    "ovl-squash",
    "ovl-unshare",
];

/// The path of an ovl binary (`ovl-import`, ...), built once per test process. The tests run it
/// where cargo put it (target/debug): nothing is copied out of the target directory. The
/// unprivileged test user runs it from there too, so the way there must be searchable by
/// others; [`require_test_user`] checks that and says which directory is not.
pub fn bin(name: &str) -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let root = workspace_root();
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut build = Command::new(cargo);
        build
            .current_dir(&root)
            .args(["build", "--quiet", "--bins"]);
        for tool in TOOLS {
            build.args(["-p", tool]);
        }
        let status = build.status().expect("run cargo build");
        assert!(status.success(), "cargo build of the ovl binaries failed");
        let built = target_dir().join("debug");
        match not_searchable_by_others(&built) {
            // The test user could not reach the binaries (a checkout under /root, say): run a
            // world-readable copy instead, one per build, shared by every test process.
            Some(blocked) if is_root() => {
                let files: Vec<PathBuf> = TOOLS.iter().map(|t| built.join(t)).collect();
                let copies = world_readable_copy(&files, &blocked);
                copies[0].parent().unwrap().to_path_buf()
            }
            _ => built,
        }
    });
    dir.join(name)
}

/// Copies of `files` (the built binaries, a fixture) in one directory under the temporary
/// directory, named by their names, sizes and mtimes and shared by every test process, for a
/// test user who cannot search the way to them (`blocked` is where it stops).
fn world_readable_copy(files: &[PathBuf], blocked: &Path) -> Vec<PathBuf> {
    let mut stamp = sha2::Sha256::new();
    for f in files {
        let md = std::fs::metadata(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        stamp.update(format!("{} {} {:?}\n", f.display(), md.len(), md.modified().ok()).as_bytes());
    }
    let stamp = hex::encode(&stamp.finalize()[..8]);
    let dir = std::env::temp_dir().join(format!("ovl-test-copy-{stamp}"));
    let names: Vec<PathBuf> = files
        .iter()
        .map(|f| dir.join(f.file_name().unwrap()))
        .collect();
    if !names.iter().all(|n| n.exists()) {
        // Built beside it and renamed: parallel test processes race here.
        let tmp =
            std::env::temp_dir().join(format!("ovl-test-copy-{stamp}.{}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        for f in files {
            std::fs::copy(f, tmp.join(f.file_name().unwrap()))
                .unwrap_or_else(|e| panic!("copy {}: {e}", f.display()));
        }
        set_mode(&tmp, 0o755);
        if std::fs::rename(&tmp, &dir).is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
    }
    eprintln!(
        "note: {} is not searchable by other users, so the test user reads copies in {}",
        blocked.display(),
        dir.display()
    );
    names
}

/// The first directory on the way to `path` (or `path` itself) that users other than its owner
/// cannot search, if any.
pub fn not_searchable_by_others(path: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::path::absolute(path).ok()?;
    path.ancestors()
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .find(|p| std::fs::metadata(p).is_ok_and(|m| m.permissions().mode() & 0o001 == 0))
        .map(Path::to_path_buf)
}

pub fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The unprivileged user rootless tests run as.
#[derive(Debug, Clone)]
pub struct TestUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

fn lookup_user(name: &str) -> Option<TestUser> {
    let text = std::fs::read_to_string("/etc/passwd").ok()?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() < 4 || f[0] != name {
            return None;
        }
        Some(TestUser {
            name: name.into(),
            uid: f[2].parse().ok()?,
            gid: f[3].parse().ok()?,
        })
    })
}

fn add_subids(file: &str, name: &str, start: u32) {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    if !text.lines().any(|l| l.split(':').next() == Some(name)) {
        let mut t = text;
        if !t.is_empty() && !t.ends_with('\n') {
            t.push('\n');
        }
        t.push_str(&format!("{name}:{start}:65536\n"));
        std::fs::write(file, t).unwrap();
    }
}

fn remove_subids(file: &str, name: &str) {
    let Ok(text) = std::fs::read_to_string(file) else {
        return;
    };
    let kept: String = text
        .lines()
        .filter(|l| l.split(':').next() != Some(name))
        .map(|l| format!("{l}\n"))
        .collect();
    if kept != text {
        std::fs::write(file, kept).unwrap();
    }
}

/// The user's rootless id maps as ovl computes them from /etc/subuid and /etc/subgid.
pub fn rootless_maps(user: &TestUser) -> ovl_layer::RootlessMaps {
    ovl_layer::RootlessMaps::for_user(
        &user.name,
        user.uid,
        user.gid,
        Path::new("/etc/subuid"),
        Path::new("/etc/subgid"),
    )
    .unwrap()
}

/// The unprivileged test user with subordinate ids (`OVL_TEST_USER`, default `ovltest`; given
/// `200000:65536` when it has none). As root it is created when missing; otherwise `None`.
pub fn test_user() -> Option<TestUser> {
    let name = std::env::var(TEST_USER).unwrap_or_else(|_| "ovltest".into());
    ensure_user(&name, Some(200_000))
}

/// The test user for a rootless test: a loud skip (a failure under `OVL_REQUIRE_ALL`) and
/// `None` when this is not root (needed to set the user up) or the user cannot be had.
pub fn require_test_user() -> Option<TestUser> {
    require_user("the unprivileged test user", test_user)
}

/// [`require_test_user`] for the user without subordinate ids
/// ([`test_user_without_subids`]).
pub fn require_test_user_without_subids() -> Option<TestUser> {
    require_user(
        "the unprivileged test user without subordinate ids",
        test_user_without_subids,
    )
}

fn require_user(what: &str, get: fn() -> Option<TestUser>) -> Option<TestUser> {
    if !require("root (to set up the unprivileged test user)", is_root()) {
        return None;
    }
    let user = get();
    if !require(what, user.is_some()) {
        return None;
    }
    let user = user?;
    assert_user_can_run_the_binaries(&user);
    Some(user)
}

/// The test user runs the binaries where cargo built them: say plainly when it cannot reach them.
fn assert_user_can_run_the_binaries(user: &TestUser) {
    static CHECKED: OnceLock<()> = OnceLock::new();
    CHECKED.get_or_init(|| {
        let tool = bin("ovl-import");
        let ok = command_as(user, Path::new("/bin/sh"))
            .args(["-c", "test -x \"$1\"", "sh"])
            .arg(&tool)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let blocked = not_searchable_by_others(&tool)
                .map(|d| {
                    format!(
                        "{} is not searchable by others (chmod o+x {0})",
                        d.display()
                    )
                })
                .unwrap_or_else(|| "check the permissions on the way".into());
            panic!(
                "the test user {} cannot run {}: {blocked}, or set CARGO_TARGET_DIR to a \
                 directory every user can reach",
                user.name,
                tool.display()
            );
        }
    });
}

/// A second unprivileged user with no subordinate ids (`ovltest-nosub`), for the single-id paths.
pub fn test_user_without_subids() -> Option<TestUser> {
    ensure_user("ovltest-nosub", None)
}

fn ensure_user(name: &str, subids: Option<u32>) -> Option<TestUser> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if lookup_user(name).is_none() && is_root() {
        let _ = Command::new("useradd")
            .args(["-m", "-s", "/bin/sh", name])
            .status();
    }
    let user = lookup_user(name)?;
    if is_root() {
        for file in ["/etc/subuid", "/etc/subgid"] {
            match subids {
                Some(start) => add_subids(file, name, start),
                // useradd hands out subordinate ids by itself (login.defs SUB_UID_COUNT).
                None => remove_subids(file, name),
            }
        }
    }
    Some(user)
}

/// A temporary directory owned by `user` (mode 0755 on the way down so it can reach it).
pub fn user_tempdir(user: &TestUser) -> tempfile::TempDir {
    let t = tempfile::Builder::new()
        .prefix("ovl-user-test-")
        .tempdir_in("/tmp")
        .unwrap();
    rustix::fs::chown(
        t.path(),
        Some(rustix::fs::Uid::from_raw(user.uid)),
        Some(rustix::fs::Gid::from_raw(user.gid)),
    )
    .unwrap();
    set_mode(t.path(), 0o755);
    t
}

/// A command that runs `program` as `user` (root runs it through setpriv with the user's groups
/// and a clean environment).
pub fn command_as(user: &TestUser, program: &Path) -> Command {
    let mut c = Command::new("setpriv");
    c.args([
        format!("--reuid={}", user.uid),
        format!("--regid={}", user.gid),
        "--init-groups".into(),
        "--reset-env".into(),
        "--".into(),
    ])
    .arg(program)
    .env("HOME", format!("/home/{}", user.name));
    c
}

/// Run and capture a command, panicking with its output when it could not start. A command
/// that may make a mount namespace runs under a shared [`mountns`] hold.
pub fn output(cmd: &mut Command) -> Output {
    let _ns = mountns::makes_namespaces(cmd).then(mountns::shared);
    cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"))
}

/// For a test that changes its whole process (a seccomp filter, a resource limit, a
/// once-per-process switch): `None` in the test run itself, after running the test `name`
/// (its full path, `module::tests::name`) again in a child process of this test binary with
/// `var=case` for each of `cases`, each of which must pass (a child's skip message is shown);
/// `Some(case)` inside such a child, which then does the work.
pub fn in_child_process(name: &str, var: &str, cases: &[&str]) -> Option<String> {
    if let Some(case) = std::env::var_os(var) {
        return Some(case.to_string_lossy().into_owned());
    }
    for case in cases {
        let out = Command::new(std::env::current_exe().expect("the test binary"))
            .args(["--exact", name, "--test-threads=1"])
            .env(var, case)
            .output()
            .expect("run the test binary again");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{case}: the child failed:\n{text}");
        assert!(
            text.contains("1 passed"),
            "{case}: the child ran no test:\n{text}"
        );
        if text.contains("SKIPPED") {
            eprintln!("{text}");
        }
    }
    None
}

/// Assert a command succeeded, showing its stderr when not; returns stdout.
pub fn run_ok(cmd: &mut Command) -> Vec<u8> {
    let out = output(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// What `getfattr` (package attr, a peer of our own listing) shows of each of `files` (names
/// relative to `dir`, not followed): `name=0xHEX` lines with the name as raw bytes, sorted (a
/// filesystem lists xattrs in its own order), escaped for printing.
pub fn getfattr(dir: &Path, files: &[&[u8]]) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut out = String::new();
    for f in files {
        let stdout = run_ok(
            Command::new("getfattr")
                .args(["-h", "-d", "-m", "-", "-e", "hex", "--"])
                .arg(std::ffi::OsStr::from_bytes(f))
                .current_dir(dir),
        );
        let mut lines: Vec<&[u8]> = stdout
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty() && !l.starts_with(b"# file: "))
            .collect();
        lines.sort();
        out.push_str(&ovl_layer::display_bytes(f));
        out.push_str(":\n");
        for l in lines {
            out.push_str("  ");
            out.push_str(&ovl_layer::display_bytes(l));
            out.push('\n');
        }
    }
    out
}

/// The Alpine minirootfs fixture, fetched when missing (cached in target/fixtures/, checked
/// against its pinned sha256, from `OVL_FIXTURE_MIRROR` when set, else from upstream). Always
/// `Some`: a test that needs it fails with the fetch error (which says what to do) instead of
/// skipping. (An `Option` so the callers' `let Some(..) else` stays as it is.)
pub fn alpine_minirootfs() -> Option<PathBuf> {
    static PATH: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let p = PATH.get_or_init(|| {
        let p = fixtures::alpine_minirootfs().map_err(|e| format!("{e:#}"))?;
        match not_searchable_by_others(&p) {
            // The rootless tests read it as the test user: give them a copy they can reach.
            Some(blocked) if is_root() => world_readable_copy(&[p], &blocked)
                .pop()
                .ok_or_else(|| "no copy".to_string()),
            _ => Ok(p),
        }
    });
    match p {
        Ok(p) => Some(p.clone()),
        Err(e) => panic!("the Alpine minirootfs fixture: {e}"),
    }
}

/// Make /dev/fuse usable by the unprivileged test user (it is 0600 on these machines): as root,
/// an ACL entry grants it to that user alone (`setfacl -m u:ovltest:rw /dev/fuse`, package
/// `acl`) instead of opening it to every user. Without root, true when this user can use it.
pub fn make_fuse_usable() -> bool {
    let dev = Path::new("/dev/fuse");
    if !dev.exists() {
        return false;
    }
    if !is_root() {
        return rustix::fs::access(
            dev,
            rustix::fs::Access::READ_OK | rustix::fs::Access::WRITE_OK,
        )
        .is_ok();
    }
    let Some(user) = test_user() else {
        return false;
    };
    if !require("setfacl (package acl)", which("setfacl").is_some()) {
        return false;
    }
    Command::new("setfacl")
        .arg("-m")
        .arg(format!("u:{}:rw", user.name))
        .arg(dev)
        .status()
        .is_ok_and(|s| s.success())
}

/// Set `p`'s atime and mtime to `sec`.`nsec` without following a symlink (to build trees with
/// exact times).
pub fn set_times(p: &Path, sec: i64, nsec: u32) {
    let t = rustix::fs::Timespec {
        tv_sec: sec,
        tv_nsec: nsec as _,
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        p,
        &rustix::fs::Timestamps {
            last_access: t,
            last_modification: t,
        },
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap_or_else(|e| panic!("utimensat {}: {e}", p.display()));
}
