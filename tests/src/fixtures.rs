//! Pinned test fixtures downloaded from their upstream (or copied from a mirror directory) into a
//! cache under `target/fixtures/`, always verified against a pinned sha256. One home for the
//! tests (which fetch what they need themselves) and `cargo xtask fetch|e2e|bench`.
//!
//! - `OVL_FIXTURE_MIRROR=DIR`: copy the file from `DIR` (absolute, or relative to the current
//!   directory) instead of downloading it. The project's shared mirror is `shared/mirror`, beside
//!   the repository.
//! - Otherwise the file is downloaded with `curl` (or `wget` when there is no curl).
//!
//! A cached file is re-verified on every call; a bad one is replaced.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

/// The environment variable naming a directory to copy fixtures from instead of downloading.
pub const MIRROR_ENV: &str = "OVL_FIXTURE_MIRROR";

/// One pinned fixture file.
#[derive(Debug, Clone, Copy)]
pub struct Fixture {
    /// The file name, in the cache and in a mirror directory.
    pub name: &'static str,
    /// Lower-case hex sha256 of the file.
    pub sha256: &'static str,
    /// Where upstream publishes it.
    pub url: &'static str,
}

/// The Alpine Linux 3.20.3 minirootfs for x86_64.
pub const ALPINE_MINIROOTFS: Fixture = Fixture {
    name: "alpine-minirootfs-3.20.3-x86_64.tar.gz",
    sha256: "d4e6fd67dcf75e40c451560ac7265166c2b72a0f38ddc9aae756a7de3d1efa0c",
    url: "https://dl-cdn.alpinelinux.org/alpine/v3.20/releases/x86_64/alpine-minirootfs-3.20.3-x86_64.tar.gz",
};

/// All pinned fixtures (what `cargo xtask fetch` fetches).
pub const ALL: &[Fixture] = &[ALPINE_MINIROOTFS];

/// The verified Alpine minirootfs tarball (gzip-compressed tar), fetching it if needed.
pub fn alpine_minirootfs() -> Result<PathBuf> {
    fetch(&ALPINE_MINIROOTFS)
}

/// The fixture cache directory, `target/fixtures/`.
pub fn cache_dir() -> PathBuf {
    crate::target_dir().join("fixtures")
}

/// The verified cached copy of `fixture`, fetching it (from `$OVL_FIXTURE_MIRROR` or upstream)
/// when it is missing or does not match its digest. Safe to call from several threads or
/// processes at once: a new file is written under a unique name and renamed into place.
pub fn fetch(fixture: &Fixture) -> Result<PathBuf> {
    let mirror = std::env::var_os(MIRROR_ENV).filter(|m| !m.is_empty());
    fetch_with(fixture, &cache_dir(), mirror.as_deref().map(Path::new))
}

/// [`fetch`] with the cache directory and the mirror (relative to the current directory) given.
pub fn fetch_with(fixture: &Fixture, cache: &Path, mirror: Option<&Path>) -> Result<PathBuf> {
    let dest = cache.join(fixture.name);
    if dest.exists() {
        let actual = sha256_file(&dest)?;
        if actual == fixture.sha256 {
            return Ok(dest);
        }
        eprintln!(
            "ovl fixtures: cached {} has sha256 {actual}, expected {}: replacing it",
            dest.display(),
            fixture.sha256
        );
    }
    fs::create_dir_all(cache).with_context(|| format!("cannot create {}", cache.display()))?;
    let tmp = unique_tmp(&dest);
    let result = fetch_into(fixture, &tmp, mirror).and_then(|source| {
        let actual = sha256_file(&tmp)?;
        if actual != fixture.sha256 {
            bail!(
                "sha256 mismatch for {} from {source}: expected {}, got {actual}",
                fixture.name,
                fixture.sha256
            );
        }
        fs::rename(&tmp, &dest)
            .with_context(|| format!("cannot move {} to {}", tmp.display(), dest.display()))
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map(|()| dest)
}

/// Writes the fixture to `tmp` from the mirror or upstream; returns a description of the source.
fn fetch_into(fixture: &Fixture, tmp: &Path, mirror: Option<&Path>) -> Result<String> {
    if let Some(mirror) = mirror {
        let mirror = std::path::absolute(mirror)
            .with_context(|| format!("bad {MIRROR_ENV}={}", mirror.display()))?;
        let src = mirror.join(fixture.name);
        if !src.is_file() {
            bail!(
                "{MIRROR_ENV}={} does not hold {} (no file {})",
                mirror.display(),
                fixture.name,
                src.display()
            );
        }
        fs::copy(&src, tmp)
            .with_context(|| format!("cannot copy {} to {}", src.display(), tmp.display()))?;
        // A read-only mirror's mode would come along: the cache is ours to replace.
        fs::set_permissions(tmp, fs::Permissions::from_mode(0o644))?;
        return Ok(src.display().to_string());
    }
    download(fixture, tmp)?;
    Ok(fixture.url.to_string())
}

fn download(fixture: &Fixture, tmp: &Path) -> Result<()> {
    let mut cmd = if crate::which("curl").is_some() {
        let mut c = Command::new("curl");
        c.args(["--fail", "--silent", "--show-error", "--location"])
            .args(["--connect-timeout", "20", "--retry", "2", "--output"])
            .arg(tmp)
            .arg(fixture.url);
        c
    } else if crate::which("wget").is_some() {
        let mut c = Command::new("wget");
        c.args(["--quiet", "--timeout=20", "--tries=3", "--output-document"])
            .arg(tmp)
            .arg(fixture.url);
        c
    } else {
        bail!(
            "cannot download {}: neither curl nor wget is installed. {}",
            fixture.url,
            ways_out(fixture)
        );
    };
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        let tool = cmd.get_program().to_string_lossy().into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr);
        // With retries curl repeats its message: the last line says it.
        let why = stderr
            .lines()
            .rfind(|l| !l.trim().is_empty())
            .unwrap_or("no message");
        bail!(
            "cannot download {} ({tool} {}: {}). {}",
            fixture.url,
            out.status,
            why.trim(),
            ways_out(fixture)
        );
    }
    Ok(())
}

/// What to do when the download fails.
fn ways_out(fixture: &Fixture) -> String {
    let shared = crate::workspace_root().join("../shared/mirror");
    let example = match fs::canonicalize(&shared) {
        Ok(p) if p.join(fixture.name).is_file() => format!(
            "the shared mirror: {MIRROR_ENV}={} cargo xtask fetch",
            p.display()
        ),
        _ => "the project's shared/mirror, beside the repository".to_string(),
    };
    format!(
        "No internet? Either connect to the network so that the URL is reachable, or set \
         {MIRROR_ENV} to a directory holding {} (e.g. {example}).",
        fixture.name
    )
}

/// A fresh name beside `dest` for a partial file.
fn unique_tmp(dest: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".part-{}-{n}", std::process::id()));
    dest.with_file_name(name)
}

/// Lower-case hex sha256 of a file's contents.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Sha256::new();
    io::copy(&mut file, &mut hasher).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    // A fixture's content (its digest is computed below).
    const GOOD: &[u8] = b"fixture\n";

    fn fixture(sha256: &'static str) -> Fixture {
        Fixture {
            name: "xtask-test.bin",
            sha256,
            // Nothing listens on port 9 of the loopback: the download fails at once.
            url: "http://127.0.0.1:9/xtask-test.bin",
        }
    }

    fn good_sha() -> &'static str {
        Box::leak(hex::encode(Sha256::digest(GOOD)).into_boxed_str())
    }

    #[test]
    fn copies_from_mirror_verifies_and_replaces_a_bad_cached_file() {
        let tmp = tempfile::tempdir().unwrap();
        let (cache, mirror) = (tmp.path().join("cache"), tmp.path().join("mirror"));
        fs::create_dir(&mirror).unwrap();
        fs::write(mirror.join("xtask-test.bin"), GOOD).unwrap();
        let f = fixture(good_sha());

        let path = fetch_with(&f, &cache, Some(&mirror)).unwrap();
        assert_eq!(fs::read(&path).unwrap(), GOOD);

        fs::write(&path, b"corrupt").unwrap();
        let again = fetch_with(&f, &cache, Some(&mirror)).unwrap();
        assert_eq!(again, path);
        assert_eq!(fs::read(&path).unwrap(), GOOD);
        // Nothing left behind but the file itself.
        assert_eq!(fs::read_dir(&cache).unwrap().count(), 1);
    }

    #[test]
    fn a_mismatch_names_both_digests() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("xtask-test.bin"), GOOD).unwrap();
        let want = "0000000000000000000000000000000000000000000000000000000000000000";
        let err = fetch_with(&fixture(want), &tmp.path().join("cache"), Some(tmp.path()))
            .unwrap_err()
            .to_string();
        assert!(err.contains(want) && err.contains(good_sha()), "{err}");
        assert_eq!(fs::read_dir(tmp.path().join("cache")).unwrap().count(), 0);
    }

    #[test]
    fn a_failed_download_names_the_url_and_both_ways_out() {
        let tmp = tempfile::tempdir().unwrap();
        let f = fixture(good_sha());
        let err = format!("{:#}", fetch_with(&f, tmp.path(), None).unwrap_err());
        assert!(err.contains(f.url), "{err}");
        assert!(err.contains("connect") && err.contains(MIRROR_ENV), "{err}");
    }
}
