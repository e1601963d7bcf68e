//! `cargo xtask e2e`: a container's layer life, end to end, with the release binaries, for every
//! driver this machine can run; prints a table of steps, drivers, times and results and fails
//! on any mismatch (or, with `OVL_REQUIRE_ALL=1`, on any skip).
//!
//! For each driver (root kernel as root; rootless kernel and rootless fuse as the unprivileged
//! test user, or as the caller when it is not root), in a fresh directory (`box.rs`):
//! 1. `ovl-import` the pinned Alpine minirootfs into `box/rootfs` ([`import`]);
//! 2. `ovl-mount --chroot` the box (merged over `box/rootfs`) and change it with Alpine's own
//!    busybox; snapshot the merged view in a fresh mount of the upper ([`change`]);
//! 3. `ovl-diff` the upper into `layer.tar`, check its whiteouts, opaque markers and ids, and
//!    apply it onto the base with umoci: the result must be the merged view ([`layer`]);
//! 4. `ovl-squash` lower and upper into a new lower, mount it alone: it must be the merged view
//!    ([`squash`]).
//!
//! Trees are compared with [`ovl_tests::snapshot`]; every field a comparison leaves out is
//! named, with the reason, where it is left out. Rootless snapshots are taken as root of the
//! user's namespace (inside the mount, or through `ovl-unshare`) so they hold container ids,
//! like the layers. The binary re-executes itself for that: `e2e snapshot` is a hidden helper
//! subcommand.

mod actor;
mod r#box;
mod change;
mod exec;
mod import;
mod layer;
mod squash;
mod table;

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use ovl_tests::snapshot::{self, Snapshot, SnapshotOptions};
use ovl_tests::{REQUIRE_ALL, require_all};

use actor::Actor;
use r#box::BoxDir;
use table::{Outcome, Row};

/// The tools, as `cargo build --release --bins` leaves them.
const TOOLS: [&str; 5] = [
    "ovl-import",
    "ovl-mount",
    "ovl-diff",
    "ovl-squash",
    "ovl-unshare",
];

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct E2eArgs {
    #[command(subcommand)]
    helper: Option<Helper>,
    /// Run only this driver (repeatable); every driver by default.
    #[arg(long = "driver", value_enum, value_name = "DRIVER")]
    drivers: Vec<Driver>,
    /// Keep the work directory (boxes, layers, snapshots) even when everything passed; it is
    /// always kept after a failure.
    #[arg(long)]
    keep: bool,
}

#[derive(Debug, clap::Subcommand)]
enum Helper {
    /// Write the snapshot of ROOT to OUT as JSON (run inside a mount or a user namespace).
    #[command(hide = true)]
    Snapshot { root: PathBuf, out: PathBuf },
}

/// How the overlay is mounted, and by whom.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Driver {
    /// Kernel overlayfs, mounted by real root.
    RootKernel,
    /// Kernel overlayfs in the user's namespace (`ovl-mount --driver kernel`, userxattr).
    RootlessKernel,
    /// fuse-overlayfs run by the user (`ovl-mount --driver fuse`).
    RootlessFuse,
}

impl Driver {
    const ALL: [Driver; 3] = [
        Driver::RootKernel,
        Driver::RootlessKernel,
        Driver::RootlessFuse,
    ];

    fn label(self) -> &'static str {
        match self {
            Driver::RootKernel => "root kernel",
            Driver::RootlessKernel => "rootless kernel",
            Driver::RootlessFuse => "rootless fuse",
        }
    }

    fn slug(self) -> &'static str {
        match self {
            Driver::RootKernel => "root-kernel",
            Driver::RootlessKernel => "rootless-kernel",
            Driver::RootlessFuse => "rootless-fuse",
        }
    }

    /// `ovl-mount --driver` value.
    fn mount_driver(self) -> &'static str {
        match self {
            Driver::RootKernel | Driver::RootlessKernel => "kernel",
            Driver::RootlessFuse => "fuse",
        }
    }

    fn rootless(self) -> bool {
        self != Driver::RootKernel
    }
}

/// What every driver shares: the work directory, the binaries, the base image.
pub struct Ctx {
    /// `/tmp/ovl-e2e-*`, world-readable: the test user reaches its own directory in it.
    pub work: PathBuf,
    bin: PathBuf,
    /// The Alpine minirootfs (a world-readable copy of the verified fixture).
    pub alpine: PathBuf,
    /// The same, decompressed (umoci's `raw add-layer` takes an uncompressed tar).
    pub base_tar: PathBuf,
    /// The minirootfs as its tar headers and data describe it.
    pub alpine_snapshot: Snapshot,
    /// umoci, when installed.
    pub umoci: Option<PathBuf>,
}

impl Ctx {
    /// A release binary copied to the world-readable bin directory (`xtask` is this program).
    pub fn bin(&self, name: &str) -> PathBuf {
        self.bin.join(name)
    }
}

/// One driver's run: who, where, and what the earlier steps found.
pub struct Run<'a> {
    pub ctx: &'a Ctx,
    pub driver: Driver,
    pub actor: Actor,
    pub bx: BoxDir,
    /// Step 1: `box/rootfs` as imported.
    pub imported: Option<Snapshot>,
    /// Step 2: the merged view after the changes.
    pub merged: Option<Snapshot>,
}

impl Run<'_> {
    /// `ovl-mount` with this driver (and for rootless, the user's subordinate ids) of `lower`,
    /// with the box's upper and work when `with_upper` (read-only without), then `flags`; the
    /// caller adds `MERGED -- CMD...`.
    pub fn mount(&self, lower: &Path, with_upper: bool, flags: &[&str]) -> Command {
        let mut c = self.actor.command(self.ctx.bin("ovl-mount"));
        c.args(["--driver", self.driver.mount_driver()]);
        if self.driver.rootless() {
            // Never the single-id fallback: container ids other than 0 (adduser) need the
            // subordinate ids, and a silent fallback would hide a broken setup.
            c.args(["--idmap", "subids"]);
        }
        c.arg("--lower").arg(lower);
        if with_upper {
            c.arg("--upper").arg(&self.bx.upper);
            c.arg("--work").arg(&self.bx.work);
        }
        c.args(flags);
        c
    }

    /// Snapshot of `root` as container root sees it, with no mount.
    pub fn snapshot(&self, root: &Path, name: &str) -> Result<Snapshot> {
        if self.actor.is_root() {
            return snapshot::snapshot(root, &snapshot_options())
                .with_context(|| format!("cannot snapshot {}", root.display()));
        }
        let out = self.bx.snapshot_file(name);
        let mut c = self
            .actor
            .command_as_container_root(self.ctx, self.ctx.bin("xtask"));
        c.args(["e2e", "snapshot"]).arg(root).arg(&out);
        exec::run(c, None)?;
        read_snapshot(&out)
    }

    /// Snapshot of `merged` inside the mount `mount` (an [`Run::mount`] command) at `merged`.
    pub fn snapshot_mounted(
        &self,
        mut mount: Command,
        merged: &Path,
        name: &str,
    ) -> Result<Snapshot> {
        let out = self.bx.snapshot_file(name);
        mount
            .arg(merged)
            .arg("--")
            .arg(self.ctx.bin("xtask"))
            .args(["e2e", "snapshot"])
            .arg(merged)
            .arg(&out);
        exec::run(mount, None)?;
        read_snapshot(&out)
    }
}

fn read_snapshot(path: &Path) -> Result<Snapshot> {
    let text = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    snapshot::from_json(&text).with_context(|| format!("bad snapshot {}", path.display()))
}

/// What every snapshot leaves out, and why:
/// - the overlay's private xattrs (`trusted.overlay.*` of a root kernel mount,
///   `user.overlay.*` of a rootless one, fuse-overlayfs's `user.fuseoverlayfs.*`): markers of
///   the overlay's own bookkeeping in its upper, never part of an image, which a merged view
///   may or may not show;
/// - `security.selinux`: the host's labelling policy, not the image's.
///
/// Everything else is read: kind, mode (with setuid), owner, size, mtime to the nanosecond,
/// content, symlink target, device number, other xattrs, hardlink groups. Each comparison
/// names what else it leaves out.
pub fn snapshot_options() -> SnapshotOptions {
    SnapshotOptions::merged_view()
}

/// An error for two trees that differ: "WHAT: N differences (first: A, second: B)" and at most
/// 20 of them.
pub fn mismatch(what: &str, first: &str, second: &str, diffs: &[String]) -> anyhow::Error {
    let mut s = format!(
        "{what}: {} difference(s) (first: {first}, second: {second})",
        diffs.len()
    );
    for d in diffs.iter().take(20) {
        s.push_str("\n  ");
        s.push_str(d);
    }
    if diffs.len() > 20 {
        s.push_str(&format!("\n  ... and {} more", diffs.len() - 20));
    }
    anyhow::anyhow!(s)
}

/// `Ok` when the trees are the same, else a [`mismatch`].
pub fn same(what: &str, first: (&str, &Snapshot), second: (&str, &Snapshot)) -> Result<()> {
    let diffs = snapshot::differences(first.1, second.1);
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(mismatch(what, first.0, second.0, &diffs))
    }
}

pub fn run(args: &E2eArgs) -> Result<()> {
    match &args.helper {
        Some(Helper::Snapshot { root, out }) => return helper_snapshot(root, out),
        None => {}
    }
    let started = Instant::now();
    let require_all = require_all();

    // The fixture first: without it nothing runs, and a release build takes minutes.
    let fixture = xtask::fixtures::alpine_minirootfs()?;
    let build_started = Instant::now();
    println!("e2e: cargo build --release --bins");
    xtask::run(
        xtask::cargo()
            .args(["build", "--release", "--bins"])
            .current_dir(xtask::workspace_root()),
    )?;
    let build_time = build_started.elapsed();
    let ctx = prepare(&fixture)?;
    println!(
        "e2e: {} ({} entries), binaries in {}",
        xtask::fixtures::ALPINE_MINIROOTFS.name,
        ctx.alpine_snapshot.len(),
        ctx.bin.display()
    );

    let drivers = Driver::ALL
        .into_iter()
        .filter(|d| args.drivers.is_empty() || args.drivers.contains(d));
    let mut rows = Vec::new();
    for driver in drivers {
        run_driver(&ctx, driver, &mut rows);
    }

    let counts = table::print(&rows, require_all);
    let failed = counts.fail > 0 || (require_all && counts.skip > 0);
    println!(
        "\ne2e: {} passed, {} failed, {} skipped, {} not run in {:.1} s (+ {:.1} s cargo build)",
        counts.pass,
        counts.fail,
        counts.skip,
        counts.not_run,
        (started.elapsed() - build_time).as_secs_f64(),
        build_time.as_secs_f64()
    );
    if counts.fail > 0 || args.keep {
        println!("e2e: work directory kept: {}", ctx.work.display());
        if !actor::running_as_root() {
            println!(
                "e2e: (its rootless boxes hold files of your subordinate ids; remove it with \
                 `{} rm -rf {}`)",
                ctx.bin("ovl-unshare").display(),
                ctx.work.display()
            );
        }
    } else if let Err(e) = remove_work(&ctx) {
        println!("e2e: could not remove {}: {e:#}", ctx.work.display());
    }
    if failed {
        let mut named: Vec<String> = rows
            .iter()
            .filter_map(|r| match &r.outcome {
                Outcome::Fail(e) => Some(format!(
                    "{} / {}: {}",
                    r.driver,
                    r.step,
                    e.lines().next().unwrap_or("")
                )),
                Outcome::Skip(why) if require_all => Some(format!(
                    "{} / {}: skipped ({REQUIRE_ALL}=1): {why}",
                    r.driver, r.step
                )),
                _ => None,
            })
            .collect();
        named.dedup();
        bail!("e2e failed:\n  {}", named.join("\n  "));
    }
    Ok(())
}

/// The work directory: the release binaries and the fixture copied where any user can read
/// them, the base tar decompressed, the fixture's snapshot from its headers.
fn prepare(fixture: &Path) -> Result<Ctx> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    // /tmp, not $TMPDIR: the test user must reach it.
    let work = PathBuf::from(format!("/tmp/ovl-e2e-{}-{nanos:x}", std::process::id()));
    let bin = work.join("bin");
    for d in [&work, &bin] {
        fs::create_dir(d).with_context(|| format!("cannot create {}", d.display()))?;
        fs::set_permissions(d, fs::Permissions::from_mode(0o755))?;
    }
    let release = xtask::target_dir().join("release");
    for tool in TOOLS {
        copy(&release.join(tool), &bin.join(tool), 0o755)?;
    }
    let me = std::env::current_exe().context("cannot find this program")?;
    copy(&me, &bin.join("xtask"), 0o755)?;
    let alpine = work.join(xtask::fixtures::ALPINE_MINIROOTFS.name);
    copy(fixture, &alpine, 0o644)?;
    let base_tar = work.join("alpine.tar");
    {
        let mut gz = flate2::read::GzDecoder::new(fs::File::open(&alpine)?);
        let mut out = fs::File::create(&base_tar)?;
        std::io::copy(&mut gz, &mut out)
            .with_context(|| format!("cannot decompress {}", alpine.display()))?;
        out.flush()?;
        fs::set_permissions(&base_tar, fs::Permissions::from_mode(0o644))?;
    }
    let alpine_snapshot = import::tar_snapshot(&base_tar)?;
    Ok(Ctx {
        work,
        bin,
        alpine,
        base_tar,
        alpine_snapshot,
        umoci: xtask::which("umoci"),
    })
}

fn copy(from: &Path, to: &Path, mode: u32) -> Result<()> {
    fs::copy(from, to)
        .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Removes the work directory. A rootless box holds files of the user's subordinate ids, which
/// only root (or the user, as root of its namespace) may remove.
fn remove_work(ctx: &Ctx) -> Result<()> {
    if !actor::running_as_root() {
        for driver in Driver::ALL.into_iter().filter(|d| d.rootless()) {
            let dir = ctx.work.join(driver.slug());
            if dir.exists() {
                let mut c = Actor::current().command_as_container_root(ctx, "rm");
                c.arg("-rf").arg(&dir);
                exec::run(c, None)?;
            }
        }
    }
    fs::remove_dir_all(&ctx.work).with_context(|| format!("cannot remove {}", ctx.work.display()))
}

/// A step: its name, what it needs (indices of earlier steps that must have passed), its body.
type Step = (
    &'static str,
    &'static [usize],
    fn(&mut Run) -> Result<Outcome>,
);

const STEPS: [Step; 5] = [
    ("1 import", &[], import::step),
    ("2 change (chroot)", &[0], change::step),
    ("3 diff", &[1], layer::diff_step),
    ("3 umoci apply", &[2], layer::umoci_step),
    ("4 squash", &[1], squash::step),
];

fn run_driver(ctx: &Ctx, driver: Driver, rows: &mut Vec<Row>) {
    let label = driver.label();
    let skip = |rows: &mut Vec<Row>, why: String| {
        println!("e2e: {label}: skipped: {why}");
        rows.push(Row {
            driver: label.to_string(),
            step: "(all steps)",
            time: None,
            outcome: Outcome::Skip(why),
        });
    };
    let actor = match who_runs(driver) {
        Ok(a) => a,
        Err(why) => return skip(rows, why),
    };
    let label = if actor.is_root() {
        label.to_string()
    } else {
        format!("{label} ({})", actor.name)
    };
    let bx = match BoxDir::create(&ctx.work.join(driver.slug()), &actor) {
        Ok(b) => b,
        Err(e) => {
            rows.push(Row {
                driver: label,
                step: "(setup)",
                time: None,
                outcome: Outcome::Fail(format!("cannot lay out the box: {e:#}")),
            });
            return;
        }
    };
    let mut run = Run {
        ctx,
        driver,
        actor,
        bx,
        imported: None,
        merged: None,
    };
    let mut passed = [false; STEPS.len()];
    for (i, (name, needs, body)) in STEPS.iter().enumerate() {
        if let Some(&n) = needs.iter().find(|&&n| !passed[n]) {
            rows.push(Row {
                driver: label.clone(),
                step: name,
                time: None,
                outcome: Outcome::NotRun(format!("needs step {}", STEPS[n].0)),
            });
            continue;
        }
        print!("e2e: {label}: {name} ... ");
        let _ = std::io::stdout().flush();
        let t = Instant::now();
        let outcome = body(&mut run).unwrap_or_else(|e| Outcome::Fail(format!("{e:#}")));
        let time = t.elapsed();
        println!(
            "{} ms {}",
            time.as_millis(),
            match &outcome {
                Outcome::Pass(_) => "PASS",
                Outcome::Fail(_) => "FAIL",
                Outcome::Skip(_) => "SKIP",
                Outcome::NotRun(_) => "-",
            }
        );
        passed[i] = matches!(outcome, Outcome::Pass(_));
        rows.push(Row {
            driver: label.clone(),
            step: name,
            time: Some(time),
            outcome,
        });
    }
}

/// Who runs `driver` here, or why nobody can.
fn who_runs(driver: Driver) -> Result<Actor, String> {
    let root = actor::running_as_root();
    if !driver.rootless() {
        return if root {
            Ok(Actor::root())
        } else {
            Err("needs root (run cargo xtask e2e as root to include it)".into())
        };
    }
    let actor = if root {
        if xtask::which("setpriv").is_none() {
            return Err("setpriv not found (apt-get install util-linux)".into());
        }
        Actor::test_user()?
    } else {
        Actor::current()
    };
    for tool in ["newuidmap", "newgidmap"] {
        if ovl_layer::which(tool).is_none() {
            return Err(format!("{tool} not found (apt-get install uidmap)"));
        }
    }
    let maps = actor
        .maps()
        .map_err(|e| format!("cannot read /etc/subuid or /etc/subgid: {e}"))?;
    if !maps.has_subordinate_ids() {
        return Err(format!(
            "{} has no subordinate ids in /etc/subuid and /etc/subgid (add a line `{}:100000:65536` to each)",
            actor.name, actor.name
        ));
    }
    if let Some(why) = userns_disabled() {
        return Err(why);
    }
    match driver {
        Driver::RootlessKernel => match kernel_version() {
            Some((major, minor)) if (major, minor) < (5, 11) => {
                return Err(format!(
                    "Linux {major}.{minor} has no overlayfs in user namespaces (5.11 or later)"
                ));
            }
            _ => {}
        },
        Driver::RootlessFuse => {
            if xtask::which("fuse-overlayfs").is_none() {
                return Err("fuse-overlayfs not found (apt-get install fuse-overlayfs)".into());
            }
            fuse_usable(&actor)?;
        }
        Driver::RootKernel => unreachable!(),
    }
    Ok(actor)
}

/// Why unprivileged user namespaces are off, if they are.
fn userns_disabled() -> Option<String> {
    let read = |f: &str| fs::read_to_string(f).ok().map(|s| s.trim().to_string());
    if read("/proc/sys/user/max_user_namespaces").as_deref() == Some("0") {
        return Some("user namespaces are disabled (sysctl user.max_user_namespaces = 0)".into());
    }
    if read("/proc/sys/kernel/unprivileged_userns_clone").as_deref() == Some("0") {
        return Some(
            "unprivileged user namespaces are disabled (sysctl kernel.unprivileged_userns_clone = 0)"
                .into(),
        );
    }
    None
}

fn kernel_version() -> Option<(u32, u32)> {
    let r = fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let mut it = r.trim().split(['.', '-']);
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// /dev/fuse must be readable and writable by the user: as root, make it so (it is 0600 on
/// some machines, and fuse-overlayfs needs it).
pub fn fuse_usable(actor: &Actor) -> Result<(), String> {
    let dev = Path::new("/dev/fuse");
    if !dev.exists() {
        return Err("no /dev/fuse (modprobe fuse)".into());
    }
    if actor::running_as_root() {
        let mode = dev
            .metadata()
            .map_err(|e| format!("/dev/fuse: {e}"))?
            .permissions()
            .mode();
        if mode & 0o666 != 0o666 {
            fs::set_permissions(dev, fs::Permissions::from_mode(0o666))
                .map_err(|e| format!("cannot chmod 0666 /dev/fuse: {e}"))?;
            println!(
                "e2e: chmod 0666 /dev/fuse (fuse-overlayfs runs as {})",
                actor.name
            );
        }
        return Ok(());
    }
    let ok = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev)
        .is_ok();
    if ok {
        Ok(())
    } else {
        Err(
            "/dev/fuse is not readable and writable by this user (as root: chmod 0666 /dev/fuse)"
                .into(),
        )
    }
}

/// `e2e snapshot ROOT OUT`.
fn helper_snapshot(root: &Path, out: &Path) -> Result<()> {
    let snap = snapshot::snapshot(root, &snapshot_options())
        .with_context(|| format!("cannot snapshot {}", root.display()))?;
    fs::write(out, snapshot::to_json(&snap))
        .with_context(|| format!("cannot write {}", out.display()))
}
