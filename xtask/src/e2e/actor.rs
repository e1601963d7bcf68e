//! Who runs a driver's steps: real root (the root kernel driver), or an unprivileged user (the
//! rootless drivers): the test user, reached from root through `setpriv`, or the caller itself
//! when the e2e does not run as root.

use std::ffi::OsStr;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use ovl_layer::RootlessMaps;

use super::Ctx;

/// The environment variable naming the unprivileged test user (as in the tests).
pub const TEST_USER_ENV: &str = "OVL_TEST_USER";
/// Its default name.
pub const DEFAULT_TEST_USER: &str = "ovltest";
/// The subordinate ids a test user created here gets (the tests' and CI's choice).
const SUBID_RANGE: &str = "200000:65536";

#[derive(Debug, Clone)]
pub struct Actor {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Root runs this user's commands through `setpriv` (false: the caller is the user).
    switch: bool,
}

impl Actor {
    pub fn root() -> Actor {
        Actor {
            name: "root".into(),
            uid: 0,
            gid: 0,
            switch: false,
        }
    }

    pub fn is_root(&self) -> bool {
        self.uid == 0
    }

    /// The caller, when it is not root.
    pub fn current() -> Actor {
        let uid = euid();
        // SAFETY: getgid cannot fail.
        let gid = unsafe { libc::getgid() };
        Actor {
            name: ovl_layer::user_name(uid).unwrap_or_else(|| uid.to_string()),
            uid,
            gid,
            switch: false,
        }
    }

    /// The unprivileged test user (`$OVL_TEST_USER`, default `ovltest`), seen from root:
    /// created with `useradd -m` when missing, given subordinate ids when it has none.
    pub fn test_user() -> Result<Actor, String> {
        let name = std::env::var(TEST_USER_ENV)
            .ok()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| DEFAULT_TEST_USER.into());
        if lookup(&name).is_none() {
            let out = Command::new("useradd")
                .args(["-m", "-s", "/bin/sh", &name])
                .output()
                .map_err(|e| format!("cannot run useradd to create the test user {name}: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "useradd -m -s /bin/sh {name} failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            println!("e2e: created the test user {name}");
        }
        let (uid, gid) =
            lookup(&name).ok_or_else(|| format!("the test user {name} is not in /etc/passwd"))?;
        for file in ["/etc/subuid", "/etc/subgid"] {
            add_subids(file, &name).map_err(|e| format!("{file}: {e}"))?;
        }
        Ok(Actor {
            name,
            uid,
            gid,
            switch: true,
        })
    }

    /// The user's rootless id maps, as ovl computes them.
    pub fn maps(&self) -> std::io::Result<RootlessMaps> {
        RootlessMaps::for_user(
            &self.name,
            self.uid,
            self.gid,
            Path::new("/etc/subuid"),
            Path::new("/etc/subgid"),
        )
    }

    /// `program` run as this user (root switches with setpriv: the user's groups, a clean
    /// environment).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        if !self.switch {
            return Command::new(program);
        }
        let mut c = Command::new("setpriv");
        c.arg(format!("--reuid={}", self.uid))
            .arg(format!("--regid={}", self.gid))
            .args(["--init-groups", "--reset-env", "--"])
            .arg(program);
        c
    }

    /// `program` run as root of a new user namespace of this user with its subordinate ids
    /// (ovl's own map, through `ovl-unshare`); for root, just `program`. Where a
    /// rootless actor sees container ids, as the mounts and the layers do.
    pub fn command_as_container_root(&self, ctx: &Ctx, program: impl AsRef<OsStr>) -> Command {
        if self.is_root() {
            return Command::new(program);
        }
        let mut c = self.command(ctx.bin("ovl-unshare"));
        c.arg(program);
        c
    }

    /// Makes `path` (made by us) this user's.
    pub fn give(&self, path: &Path) -> Result<()> {
        let md = path.symlink_metadata()?;
        if md.uid() != self.uid || md.gid() != self.gid {
            std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid))
                .with_context(|| format!("cannot chown {} to {}", path.display(), self.name))?;
        }
        Ok(())
    }
}

fn euid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}

/// True when we run as real root.
pub fn running_as_root() -> bool {
    euid() == 0
}

fn lookup(name: &str) -> Option<(u32, u32)> {
    let text = std::fs::read_to_string("/etc/passwd").ok()?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 4 && f[0] == name).then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
    })
}

/// Adds `name:200000:65536` to `file` when it has no line for `name`.
fn add_subids(file: &str, name: &str) -> std::io::Result<()> {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e),
    };
    if text.lines().any(|l| l.split(':').next() == Some(name)) {
        return Ok(());
    }
    let mut t = text;
    if !t.is_empty() && !t.ends_with('\n') {
        t.push('\n');
    }
    t.push_str(&format!("{name}:{SUBID_RANGE}\n"));
    println!("e2e: gave {name} the subordinate ids {SUBID_RANGE} in {file}");
    std::fs::write(file, t)
}
