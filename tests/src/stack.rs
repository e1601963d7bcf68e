//! Stacks of kernel-written layers: a base lower and uppers each made through a read-write
//! kernel overlay of everything below it, then rotated into the lowers; and the three proofs
//! every tool output must pass against a fresh kernel mount of the same layers.
//!
//! Owns the checks the lower-stack tests and the fuzz test share: `ovl-diff --lower` of each
//! upper (the chain of layers applied by umoci onto the base), `ovl-squash --output` of the
//! whole stack, and `ovl-squash --in-place` of each upper in turn onto a copy of the base.
//! Every result is compared entry for entry (exact metadata, the root's mode, owner and xattrs
//! included; only the root's mtime is left out, see [`compare`]) with a read-only kernel mount
//! `lowerdir=UPPER:...:BASE` (redirect_dir and metacopy followed).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::snapshot::{Snapshot, SnapshotOptions, differences, snapshot};

use crate::{bin, output, run_ok};

/// The options every read-write mount of a stack gets (and the read-only ones what they need).
pub const RW_OPTS: &str = "redirect_dir=on,metacopy=on,index=on";
/// What a read-only mount needs to read such layers.
pub const RO_OPTS: &str = "redirect_dir=on,metacopy=on";

/// A kernel overlay mount; unmounted on drop. Held with [`crate::mountns::exclusive`] while it
/// exists, so that no other test's new mount namespace keeps a copy of it.
pub struct Mount(pub PathBuf, #[allow(dead_code)] crate::mountns::Hold);

impl Mount {
    /// `mount -t overlay overlay -o OPTS MNT`.
    pub fn overlay(opts: &str, mnt: &Path) -> Result<Mount, String> {
        let hold = crate::mountns::exclusive();
        let out = output(
            Command::new("mount")
                .args(["-t", "overlay", "overlay", "-o", opts])
                .arg(mnt),
        );
        if !out.status.success() {
            return Err(format!(
                "mount -o {opts}: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(Mount(mnt.to_path_buf(), hold))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        unmount(&self.0);
    }
}

/// Unmount `mnt`, retrying for a second (another test's process may be looking through it for
/// a moment), then lazily.
pub fn unmount(mnt: &Path) {
    for _ in 0..50 {
        if Command::new("umount")
            .arg(mnt)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
        {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = Command::new("umount").arg("-l").arg(mnt).status();
}

fn join(layers: &[&Path]) -> String {
    layers
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(":")
}

fn mkdir(p: &Path) -> PathBuf {
    std::fs::create_dir_all(p).unwrap();
    crate::set_mode(p, 0o755);
    p.to_path_buf()
}

/// A base lower and the uppers made over it, bottom first.
pub struct Stack {
    pub dir: PathBuf,
    pub base: PathBuf,
    pub uppers: Vec<PathBuf>,
}

impl Stack {
    /// An empty base (mode 0755) in `dir`, which must exist.
    pub fn new(dir: &Path) -> Stack {
        Stack {
            dir: dir.to_path_buf(),
            base: mkdir(&dir.join("base")),
            uppers: Vec::new(),
        }
    }

    /// Every lower an upper `k` (0-based) was made over, top first.
    pub fn lowers_of(&self, k: usize) -> Vec<&Path> {
        let mut l: Vec<&Path> = self.uppers[..k].iter().rev().map(|p| p.as_path()).collect();
        l.push(&self.base);
        l
    }

    /// Every layer, top first.
    pub fn layers(&self) -> Vec<&Path> {
        self.lowers_of(self.uppers.len())
    }

    /// A new upper made by `f` through a read-write mount (with `opts`) of the whole stack;
    /// returns `f`'s result. The workdir is removed after.
    pub fn add_layer<T>(&mut self, opts: &str, f: impl FnOnce(&Path) -> T) -> T {
        let k = self.uppers.len();
        let upper = mkdir(&self.dir.join(format!("u{}", k + 1)));
        let work = mkdir(&self.dir.join(format!("w{}", k + 1)));
        let mnt = mkdir(&self.dir.join("mnt"));
        self.uppers.push(upper.clone());
        let lowers = join(&self.lowers_of(k));
        let m = Mount::overlay(
            &format!(
                "lowerdir={lowers},upperdir={},workdir={},{opts}",
                upper.display(),
                work.display()
            ),
            &mnt,
        )
        .unwrap();
        let r = f(&m.0);
        drop(m);
        std::fs::remove_dir_all(&work).unwrap();
        r
    }

    /// An upper made by a shell script run in the mount.
    pub fn add_script(&mut self, opts: &str, script: &str) {
        self.add_layer(opts, |m| {
            run_ok(
                Command::new("/bin/sh")
                    .arg("-ec")
                    .arg(script)
                    .current_dir(m),
            )
        });
    }

    /// The merged view of `layers` (top first) through a fresh read-only kernel mount.
    pub fn merged_of(&self, layers: &[&Path]) -> Snapshot {
        let mut layers = layers.to_vec();
        let empty = mkdir(&self.dir.join("ro-empty"));
        if layers.len() == 1 {
            // A read-only overlay needs two layers: an empty one below changes nothing.
            layers.push(&empty);
        }
        let mnt = mkdir(&self.dir.join("ro-mnt"));
        let m = Mount::overlay(&format!("lowerdir={},{RO_OPTS}", join(&layers)), &mnt).unwrap();
        let s = snap(&m.0);
        drop(m);
        s
    }

    /// The merged view of the whole stack.
    pub fn merged(&self) -> Snapshot {
        self.merged_of(&self.layers())
    }

    /// The layer of the base (as an upper with no lowers), then `ovl-diff --lower` of each
    /// upper, applied in order by umoci; returns the rootfs or ovl-diff's error.
    pub fn diff_applied(&self, work: &Path) -> Result<PathBuf, String> {
        let mut tars = vec![work.join("base.tar")];
        diff(&self.base, &[], &tars[0])?;
        for k in 0..self.uppers.len() {
            let tar = work.join(format!("layer{}.tar", k + 1));
            diff(&self.uppers[k], &self.lowers_of(k), &tar)?;
            tars.push(tar);
        }
        let refs: Vec<&Path> = tars.iter().map(|p| p.as_path()).collect();
        Ok(crate::scenario::umoci_apply(work, &refs))
    }

    /// `ovl-squash --output` of the whole stack into `out`.
    pub fn squash_output(&self, out: &Path) -> Result<(), String> {
        let (top, lowers) = self
            .layers()
            .split_first()
            .map(|(t, l)| (*t, l.to_vec()))
            .unwrap();
        if self.uppers.is_empty() {
            return Err("no upper".into());
        }
        ok(squash(&[
            "--lower".as_ref(),
            join(&lowers).as_ref(),
            "--upper".as_ref(),
            top.as_os_str(),
            "--output".as_ref(),
            out.as_os_str(),
        ]))
    }

    /// Copies of the base and every upper in `work`, then `ovl-squash --in-place` of each upper
    /// in turn onto the base copy; returns it.
    pub fn in_place_chain(&self, work: &Path) -> Result<PathBuf, String> {
        let lower = work.join("inplace-lower");
        copy_tree(&self.base, &lower);
        for (k, u) in self.uppers.iter().enumerate() {
            let upper = work.join(format!("inplace-u{}", k + 1));
            copy_tree(u, &upper);
            ok(squash(&[
                "--lower".as_ref(),
                lower.as_os_str(),
                "--upper".as_ref(),
                upper.as_os_str(),
                "--in-place".as_ref(),
            ]))
            .map_err(|e| format!("upper {}: {e}", k + 1))?;
        }
        Ok(lower)
    }
}

/// `cp -a` keeping hardlinks and xattrs.
pub fn copy_tree(from: &Path, to: &Path) {
    run_ok(
        Command::new("cp")
            .args(["-a", "--preserve=all"])
            .arg(from)
            .arg(to),
    );
}

fn ok(out: Output) -> Result<(), String> {
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn squash(args: &[&std::ffi::OsStr]) -> Output {
    output(Command::new(bin("ovl-squash")).arg("--quiet").args(args))
}

/// `ovl-diff [--lower LOWERS] -o TAR UPPER`.
pub fn diff(upper: &Path, lowers: &[&Path], tar: &Path) -> Result<(), String> {
    let mut c = Command::new(bin("ovl-diff"));
    c.arg("-q");
    if !lowers.is_empty() {
        c.arg("--lower").arg(join(lowers));
    }
    ok(output(c.arg("-o").arg(tar).arg(upper)))
}

/// What the comparisons leave out: overlay-private xattrs and SELinux labels (never content).
pub fn snap_options() -> SnapshotOptions {
    SnapshotOptions::merged_view()
}

pub fn snap(p: &Path) -> Snapshot {
    snapshot(p, &snap_options()).unwrap_or_else(|e| panic!("snapshot {}: {e}", p.display()))
}

/// The differences between two trees, the root's mtime left out: it is the upperdir's, bumped
/// by every entry made at the top, which no layer records (a layer carries the root only when
/// its mode, owner or xattrs changed).
pub fn compare(want: &Snapshot, got: &Snapshot) -> Vec<String> {
    let strip = |s: &Snapshot| {
        let mut s = s.clone();
        if let Some(r) = s.get_mut(&Vec::new()) {
            r.mtime = (0, 0);
        }
        s
    };
    differences(&strip(want), &strip(got))
}

#[track_caller]
pub fn assert_same(what: &str, want: &Snapshot, got: &Snapshot) {
    let d = compare(want, got);
    assert!(
        d.is_empty(),
        "{what}: {} differences:\n{}",
        d.len(),
        d.join("\n")
    );
}
