//! Records the git commit the tools are built from, for `--version` (`OVL_GIT_COMMIT`).
//!
//! Without a git checkout (a source tarball, `cargo install` from a registry) the commit comes
//! from the `OVL_GIT_COMMIT` environment variable when the packager sets it, else "unknown".

use std::path::{Path, PathBuf};
use std::process::Command;

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    (out.status.success() && !text.trim().is_empty()).then(|| text.trim().to_string())
}

fn main() {
    println!("cargo:rerun-if-env-changed=OVL_GIT_COMMIT");
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let commit = std::env::var("OVL_GIT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| {
            let commit = git(&dir, &["rev-parse", "--short=12", "HEAD"])?;
            // Rebuild when HEAD moves: HEAD itself, the branch it names, and packed refs. Only
            // files that exist (a missing one would make cargo re-run this on every build).
            let mut watched = vec!["HEAD".to_string(), "packed-refs".to_string()];
            if let Some(branch) = git(&dir, &["symbolic-ref", "-q", "HEAD"]) {
                watched.push(branch);
            }
            for name in watched {
                if let Some(path) = git(
                    &dir,
                    &["rev-parse", "--path-format=absolute", "--git-path", &name],
                ) {
                    if Path::new(&path).exists() {
                        println!("cargo:rerun-if-changed={path}");
                    }
                }
            }
            Some(commit)
        })
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=OVL_GIT_COMMIT={commit}");
}
