//! The shared overlay scenario: a base lower from the Alpine minirootfs, mounted with one of
//! the drivers, changed by a fixed script, its merged view snapshotted, the upper left behind.
//!
//! Owns the one change script every cross-tool proof uses (ovl-diff's layer applied by umoci,
//! ovl-squash's squashed lower), so they all check the same cases: a deleted file and dir, a dir
//! replaced by a file and a file by a dir, an opaque dir (rm -rf + mkdir), copy-ups with chmod,
//! chown, appended data, ns mtimes and xattrs, hardlinks, a fifo, a symlink, a sparse file, a
//! long non-UTF-8 name, a setuid file (and, as root, a device node).
//!
//! The merged view of a rootless mount only exists inside the mount's namespace, so it is
//! snapshotted there: the script ends by running this test binary again with
//! [`HELPER_ENV`] set, which makes [`snapshot_helper`] (called from a `#[test]` named
//! [`HELPER_TEST`] in the same binary) write the snapshot to a file. A test file that uses a
//! rootless scenario must therefore contain:
//!
//! ```ignore
//! #[test]
//! fn scenario_snapshot_helper() {
//!     ovl_tests::scenario::snapshot_helper();
//! }
//! ```

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::snapshot::{Entry, Snapshot, SnapshotOptions};

use crate::{TestUser, bin, command_as, is_root, require, run_ok, test_user, user_tempdir};

/// How the overlay is mounted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    /// Kernel overlayfs mounted by real root (`trusted.overlay.*`).
    RootKernel,
    /// Kernel overlayfs in the test user's namespace, through `ovl-mount --driver kernel`
    /// (`user.overlay.*`, userxattr).
    RootlessKernel,
    /// fuse-overlayfs run by the test user, through `ovl-mount --driver fuse`.
    RootlessFuse,
}

impl Driver {
    pub const ALL: [Driver; 3] = [
        Driver::RootKernel,
        Driver::RootlessKernel,
        Driver::RootlessFuse,
    ];

    pub fn is_rootless(self) -> bool {
        self != Driver::RootKernel
    }
}

/// The name of the `#[test]` that calls [`snapshot_helper`].
pub const HELPER_TEST: &str = "scenario_snapshot_helper";
/// `ROOT<TAB>OUT`: snapshot ROOT into the file OUT.
pub const HELPER_ENV: &str = "OVL_SCENARIO_SNAPSHOT";

/// The change script, run by `sh` in the merged view (as root, or container root).
pub const CHANGE_SCRIPT: &str = r#"set -e
# deletions: a file, a dir
rm etc/hostname
rm -rf etc/modprobe.d
# type changes: a dir becomes a file, a file becomes a dir
rm -rf etc/logrotate.d
echo 'now a file' > etc/logrotate.d
rm etc/services
mkdir etc/services
echo inside > etc/services/inside
# an opaque dir: everything below hidden, one new file
rm -rf usr/share/apk/keys
mkdir usr/share/apk/keys
echo only > usr/share/apk/keys/only
# copy-ups: chmod, chown, appended data, an exact mtime, xattrs on a file and a dir
chmod 600 etc/apk/arch
chown 42:42 etc/apk/world
chown 1000:1000 etc/crontabs
echo 'https://example.invalid/extra' >> etc/apk/repositories
touch -d '2021-02-03 04:05:06.123456789' etc/apk/arch
setfattr -n user.scenario -v copied-up etc/udhcpc/udhcpc.conf
setfattr -n user.dirattr -v 'on a dir' etc/udhcpc
# hardlinks: of a copied-up file, and between new files
ln etc/apk/repositories etc/apk/repositories.link
echo linked > root/h1
ln root/h1 root/h2
# special files and names
mkfifo tmp/fifo
ln -s ../etc/hostname tmp/dangling
name=$(printf 'long-\351-name-%0200d' 0)
echo 'non-utf8' > "tmp/$name"
echo suid > usr/bin/suid-tool
chmod 4755 usr/bin/suid-tool
mkdir -p home/user/deep/er
chown -R 1000:1000 home/user
truncate -s 8M tmp/sparse
printf 'x' | dd of=tmp/sparse bs=1 seek=4000000 conv=notrunc 2>/dev/null
if [ "$OVL_SCENARIO_DEVICES" = 1 ]; then mknod tmp/null c 1 3; fi
"#;

/// A scenario after the script ran: the base lower, the upper it left, the merged snapshot.
#[derive(Debug)]
pub struct Scenario {
    /// Holds everything; removed on drop.
    pub dir: tempfile::TempDir,
    /// The Alpine minirootfs tarball the base was imported from.
    pub alpine: PathBuf,
    /// The base lowerdir (ovl-import of the minirootfs, as the user who mounts).
    pub base: PathBuf,
    pub upper: PathBuf,
    pub work: PathBuf,
    pub merged_path: PathBuf,
    /// The merged view after the script, with container ids (see [`compare_options`]).
    pub merged: Snapshot,
    pub driver: Driver,
    /// The test user for the rootless drivers.
    pub user: Option<TestUser>,
}

/// What a comparison with the merged view leaves out, and why:
/// - the root entry: its metadata is the mount's (the upperdir's), not the image's;
/// - overlay-private xattrs (never part of an image) and SELinux labels (the host's policy).
///
/// Everything else (kind, mode incl. setuid, owner, size, mtimes to the ns *including
/// directories'*, content, symlink targets, device numbers, xattrs, hardlink groups) is
/// compared. A tool whose result legitimately touches directory mtimes (an extractor that
/// restores them only for directories it wrote) can set `ignore_dir_mtime` on a copy.
pub fn compare_options() -> SnapshotOptions {
    SnapshotOptions {
        skip_root: true,
        ..SnapshotOptions::merged_view()
    }
}

/// Build the scenario for `driver`; `None` (after a loud skip, or a panic under
/// `OVL_REQUIRE_ALL`) when something it needs is missing.
pub fn build(driver: Driver) -> Option<Scenario> {
    if !require("root (to set up the scenario)", is_root())
        || !require("setfattr (attr)", crate::which("setfattr").is_some())
    {
        return None;
    }
    let alpine = crate::alpine_minirootfs()?;
    let user = if driver.is_rootless() {
        let u = test_user();
        if !require("the unprivileged test user", u.is_some()) {
            return None;
        }
        if driver == Driver::RootlessFuse
            && (!require("fuse-overlayfs", crate::which("fuse-overlayfs").is_some())
                || !require("a usable /dev/fuse", crate::make_fuse_usable()))
        {
            return None;
        }
        u
    } else {
        None
    };
    let dir = match &user {
        Some(u) => user_tempdir(u),
        None => tempfile::Builder::new()
            .prefix("ovl-scenario-")
            .tempdir_in("/tmp")
            .unwrap(),
    };
    let base = dir.path().join("base");
    let upper = dir.path().join("upper");
    let work = dir.path().join("work");
    let merged_path = dir.path().join("merged");
    let snap_out = dir.path().join("merged.snapshot");

    // The base lower, imported by whoever mounts it (rootless: inside the user's id map).
    let mut import = match &user {
        Some(u) => command_as(u, &bin("ovl-import")),
        None => Command::new(bin("ovl-import")),
    };
    run_ok(import.arg("-q").arg(&alpine).arg(&base));
    for d in [&upper, &work, &merged_path] {
        std::fs::create_dir(d).unwrap();
        if let Some(u) = &user {
            rustix::fs::chown(
                d,
                Some(rustix::fs::Uid::from_raw(u.uid)),
                Some(rustix::fs::Gid::from_raw(u.gid)),
            )
            .unwrap();
        }
    }

    // The script runs in one mount; the merged view is snapshotted in a fresh mount of the
    // upper at rest. That is the view the upper defines (what ovl-diff exports and what the
    // next mount shows); the first mount can still show its own caches: fuse's attribute cache
    // keeps an mtime from before fuse-overlayfs wrote the data, and a rootless kernel mount
    // shows a link made to a copied-up lower file as a separate inode until remounted.
    let merged = match driver {
        Driver::RootKernel => {
            let opts = format!(
                "lowerdir={},upperdir={},workdir={}",
                base.display(),
                upper.display(),
                work.display()
            );
            // No other test's new mount namespace may keep a copy of these mounts (see mountns).
            let _hold = crate::mountns::exclusive();
            let mount = || {
                run_ok(
                    Command::new("mount")
                        .args(["-t", "overlay", "overlay", "-o", &opts])
                        .arg(&merged_path),
                )
            };
            mount();
            let script = Command::new("sh")
                .args(["-c", CHANGE_SCRIPT])
                .current_dir(&merged_path)
                .env("OVL_SCENARIO_DEVICES", "1")
                .output()
                .unwrap();
            run_ok(Command::new("umount").arg(&merged_path));
            assert!(
                script.status.success(),
                "the change script failed: {}",
                String::from_utf8_lossy(&script.stderr)
            );
            mount();
            let snap = crate::snapshot::snapshot(&merged_path, &compare_options());
            run_ok(Command::new("umount").arg(&merged_path));
            snap.unwrap()
        }
        Driver::RootlessKernel | Driver::RootlessFuse => {
            let user = user.as_ref().expect("rootless has a user");
            let exe = std::env::current_exe().unwrap();
            let mount = |script: &str| {
                let mut cmd = command_as(user, &bin("ovl-mount"));
                cmd.arg("--driver")
                    .arg(if driver == Driver::RootlessKernel {
                        "kernel"
                    } else {
                        "fuse"
                    })
                    .arg("--idmap")
                    .arg("subids")
                    .arg("--lower")
                    .arg(&base)
                    .arg("--upper")
                    .arg(&upper)
                    .arg("--work")
                    .arg(&work)
                    .arg(&merged_path)
                    .args(["--", "sh", "-c", script, "scenario"])
                    .arg(&merged_path)
                    .arg(&snap_out)
                    .arg(&exe);
                run_ok(&mut cmd);
            };
            mount(CHANGE_SCRIPT);
            // This binary again, inside, to snapshot the merged view.
            mount(&format!(
                "exec env {HELPER_ENV}=\"$1\t$2\" \"$3\" --exact {HELPER_TEST} --nocapture --test-threads=1 -q"
            ));
            let text = std::fs::read(&snap_out).unwrap_or_else(|e| {
                panic!(
                    "{}: {e} (is `#[test] fn {HELPER_TEST}()` calling snapshot_helper() in this test file?)",
                    snap_out.display()
                )
            });
            decode(&text)
        }
    };
    Some(Scenario {
        dir,
        alpine,
        base,
        upper,
        work,
        merged_path,
        merged,
        driver,
        user,
    })
}

/// The body of the `#[test]` named [`HELPER_TEST`]: does nothing unless this process was
/// started by a rootless scenario to snapshot its merged view.
pub fn snapshot_helper() {
    let Some(spec) = std::env::var_os(HELPER_ENV) else {
        return;
    };
    let spec = spec.as_bytes();
    let tab = spec.iter().position(|&b| b == b'\t').expect("ROOT<TAB>OUT");
    let root = Path::new(std::ffi::OsStr::from_bytes(&spec[..tab]));
    let out = Path::new(std::ffi::OsStr::from_bytes(&spec[tab + 1..]));
    let snap =
        crate::snapshot::snapshot(root, &compare_options()).expect("snapshot the merged view");
    std::fs::write(out, encode(&snap)).expect("write the snapshot");
}

fn hex_or_dash(b: Option<&[u8]>) -> String {
    match b {
        Some(b) => format!("x{}", hex::encode(b)),
        None => "-".into(),
    }
}

fn from_hex_or_dash(s: &str) -> Option<Vec<u8>> {
    s.strip_prefix('x').map(|h| hex::decode(h).expect("hex"))
}

/// A snapshot as text, one entry a line, every byte string hex-encoded.
pub fn encode(s: &Snapshot) -> String {
    let mut out = String::new();
    for (p, e) in s {
        let xattrs = if e.xattrs.is_empty() {
            "-".to_string()
        } else {
            e.xattrs
                .iter()
                .map(|(n, v)| format!("{}={}", hex::encode(n), hex::encode(v)))
                .collect::<Vec<_>>()
                .join(",")
        };
        out.push_str(&format!(
            "{} {} {:o} {} {} {} {} {} {} {} {} {} {}\n",
            hex_or_dash(Some(p)),
            e.kind,
            e.mode,
            e.uid,
            e.gid,
            e.size,
            e.mtime.0,
            e.mtime.1,
            e.content.as_deref().unwrap_or("-"),
            hex_or_dash(e.link_target.as_deref()),
            e.rdev,
            xattrs,
            hex_or_dash(e.hardlink_group.as_deref()),
        ));
    }
    out
}

/// The inverse of [`encode`].
pub fn decode(text: &[u8]) -> Snapshot {
    let text = std::str::from_utf8(text).expect("ASCII");
    let mut s = Snapshot::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        assert_eq!(f.len(), 13, "bad snapshot line {line:?}");
        let xattrs = if f[11] == "-" {
            Vec::new()
        } else {
            f[11]
                .split(',')
                .map(|kv| {
                    let (k, v) = kv.split_once('=').expect("name=value");
                    (hex::decode(k).unwrap(), hex::decode(v).unwrap())
                })
                .collect()
        };
        s.insert(
            from_hex_or_dash(f[0]).expect("a path"),
            Entry {
                kind: f[1].chars().next().unwrap(),
                mode: u32::from_str_radix(f[2], 8).unwrap(),
                uid: f[3].parse().unwrap(),
                gid: f[4].parse().unwrap(),
                size: f[5].parse().unwrap(),
                mtime: (f[6].parse().unwrap(), f[7].parse().unwrap()),
                content: (f[8] != "-").then(|| f[8].to_string()),
                link_target: from_hex_or_dash(f[9]),
                rdev: f[10].parse().unwrap(),
                xattrs,
                hardlink_group: from_hex_or_dash(f[12]),
            },
        );
    }
    s
}

/// Apply `layers` (uncompressed tars, bottom first) onto an empty OCI image with umoci
/// (`umoci raw add-layer` each, then `umoci raw unpack`) as root, into `work/rootfs`; returns
/// the rootfs path.
pub fn umoci_apply(work: &Path, layers: &[&Path]) -> PathBuf {
    let layout = work.join("oci");
    let rootfs = work.join("rootfs");
    let image = |tag: &str| format!("{}:{tag}", layout.display());
    run_ok(
        Command::new("umoci")
            .args(["init", "--layout"])
            .arg(&layout),
    );
    run_ok(Command::new("umoci").args(["new", "--image", &image("t0")]));
    for (i, l) in layers.iter().enumerate() {
        run_ok(
            Command::new("umoci")
                .args([
                    "raw",
                    "add-layer",
                    "--no-history",
                    "--image",
                    &image(&format!("t{i}")),
                ])
                .args(["--tag", &format!("t{}", i + 1)])
                .arg(l),
        );
    }
    run_ok(
        Command::new("umoci")
            .args([
                "raw",
                "unpack",
                "--image",
                &image(&format!("t{}", layers.len())),
            ])
            .arg(&rootfs),
    );
    rootfs
}

/// The Alpine tarball decompressed into `into/base.tar` (umoci takes only uncompressed layers).
pub fn decompressed(tar_gz: &Path, into: &Path) -> PathBuf {
    let out = into.join("base.tar");
    std::fs::write(&out, run_ok(Command::new("gzip").arg("-dc").arg(tar_gz))).unwrap();
    out
}
