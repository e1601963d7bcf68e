//! A deterministic generated tree shaped like a rootfs: a few thousand directories, files whose
//! sizes are log-distributed (mostly small, a few MiB-sized), compressible contents, relative and
//! absolute symlinks, hardlinks, a few non-root owners and user xattrs, fixed mtimes.

use std::ffi::CString;
use std::fs;
use std::io::Write as _;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// What [`generate`] made.
#[derive(Debug, Default, Clone, Copy)]
pub struct Made {
    pub dirs: u64,
    pub files: u64,
    pub symlinks: u64,
    pub hardlinks: u64,
    /// Bytes of file data (each hardlinked file counted once).
    pub bytes: u64,
}

/// SplitMix64: small, fast, and the same sequence everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// Log-uniform in [lo, hi).
    fn log_uniform(&mut self, lo: f64, hi: f64) -> u64 {
        (lo * (hi / lo).powf(self.unit())) as u64
    }
}

const SYLLABLES: &[&str] = &[
    "ab", "ac", "al", "an", "ar", "ba", "be", "bi", "ca", "ce", "co", "da", "de", "di", "el", "en",
    "er", "fa", "fi", "ga", "ge", "ha", "in", "io", "ka", "la", "le", "li", "lo", "ma", "me", "mi",
    "mo", "na", "ne", "ni", "no", "or", "pa", "pe", "po", "ra", "re", "ri", "ro", "sa", "se", "si",
    "so", "ta", "te", "ti", "to", "un", "ur", "va", "ve", "xi", "za", "ze",
];
const EXTENSIONS: &[&str] = &[
    "", "", "", ".so", ".so.1", ".conf", ".py", ".pyc", ".gz", ".txt", ".h", ".pl", ".mo", ".html",
    ".json", ".list", ".png",
];
/// The top of a merged-/usr rootfs (created when `skeleton` is asked for).
const SKELETON: &[&str] = &[
    "etc",
    "home",
    "opt",
    "root",
    "srv",
    "tmp",
    "usr",
    "usr/bin",
    "usr/lib",
    "usr/sbin",
    "usr/share",
    "usr/share/doc",
    "usr/lib/x86_64-linux-gnu",
    "usr/include",
    "var",
    "var/lib",
    "var/cache",
    "var/log",
];
const SKELETON_LINKS: &[(&str, &str)] = &[
    ("bin", "usr/bin"),
    ("sbin", "usr/sbin"),
    ("lib", "usr/lib"),
    ("lib64", "usr/lib64"),
];
/// Every generated entry gets this mtime (2023-11-14), so the corpus tar is reproducible.
const MTIME: i64 = 1_700_000_000;

fn word(rng: &mut Rng) -> String {
    let n = 1 + rng.below(3);
    (0..n)
        .map(|_| SYLLABLES[rng.below(SYLLABLES.len())])
        .collect()
}

/// Text-like material that file contents copy from, so the data compresses roughly as a real
/// rootfs does (about 2-3x with gzip).
fn dictionary(rng: &mut Rng) -> Vec<u8> {
    let mut dict = Vec::with_capacity(24 * 1024);
    while dict.len() < 24 * 1024 {
        if rng.chance(0.15) {
            // Binary-looking runs: small integers and pointers.
            for _ in 0..8 {
                let v = rng.next() & 0x0000_7fff_00ff_00ff;
                dict.extend_from_slice(&v.to_le_bytes());
            }
        } else {
            dict.extend_from_slice(word(rng).as_bytes());
            dict.push(if rng.chance(0.15) { b'\n' } else { b' ' });
        }
    }
    dict
}

fn fill(rng: &mut Rng, dict: &[u8], buf: &mut Vec<u8>, size: usize) {
    buf.clear();
    while buf.len() < size {
        let r = rng.next();
        if r % 100 < 80 {
            let len = 8 + ((r >> 8) % 120) as usize;
            let off = ((r >> 24) % (dict.len() - len) as u64) as usize;
            buf.extend_from_slice(&dict[off..off + len]);
        } else {
            let len = 4 + ((r >> 8) % 12) as usize;
            for _ in 0..len.div_ceil(8) {
                buf.extend_from_slice(&rng.next().to_le_bytes());
            }
        }
    }
    buf.truncate(size);
}

/// Fills `root` (created if missing) with a generated tree holding at least `target_bytes` of
/// file data. `skeleton` adds the top directories and /bin-style symlinks of a merged-/usr
/// rootfs. The same `seed` always gives the same tree.
pub fn generate(root: &Path, target_bytes: u64, seed: u64, skeleton: bool) -> Result<Made> {
    let mut rng = Rng(seed);
    let mut made = Made::default();
    let mkdir = |path: &Path| {
        fs::create_dir_all(path).with_context(|| format!("cannot create {}", path.display()))
    };
    mkdir(root)?;

    // Directories, as paths relative to root ("" is root itself). Directory names have no '-';
    // file names ("WORD-N.EXT"), symlinks ("WORD-linkN") and hardlinks ("WORD-hlN") do.
    let mut dirs: Vec<PathBuf> = vec![PathBuf::new()];
    if skeleton {
        for d in SKELETON {
            mkdir(&root.join(d))?;
            dirs.push(PathBuf::from(d));
            made.dirs += 1;
        }
        for (link, to) in SKELETON_LINKS {
            symlink(to, root.join(link))?;
            made.symlinks += 1;
        }
    }
    // About one directory per 80 KiB of data: ~2,700 for a 210 MiB tree.
    let want_dirs = (target_bytes / (80 * 1024)).clamp(20, 3000) as usize;
    while dirs.len() < want_dirs {
        let parent = dirs[rng.below(dirs.len())].clone();
        let rel = parent.join(format!("{}{}", word(&mut rng), dirs.len()));
        mkdir(&root.join(&rel))?;
        dirs.push(rel);
        made.dirs += 1;
    }

    let dict = dictionary(&mut rng);
    let mut buf = Vec::new();
    let mut files: Vec<PathBuf> = Vec::new();
    while made.bytes < target_bytes {
        let size = if rng.chance(0.02) {
            0
        } else if rng.chance(0.015) {
            rng.log_uniform(64.0 * 1024.0, 8.0 * 1024.0 * 1024.0)
        } else {
            rng.log_uniform(16.0, 64.0 * 1024.0)
        };
        let dir = &dirs[rng.below(dirs.len())];
        let name = format!(
            "{}-{}{}",
            word(&mut rng),
            files.len(),
            EXTENSIONS[rng.below(EXTENSIONS.len())]
        );
        let rel = dir.join(name);
        let path = root.join(&rel);
        fill(&mut rng, &dict, &mut buf, size as usize);
        let mut file =
            fs::File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
        file.write_all(&buf)
            .with_context(|| format!("cannot write {}", path.display()))?;
        drop(file);
        let mode = if rng.chance(0.1) { 0o755 } else { 0o644 };
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
        if rng.chance(0.01) {
            let id = 100 + rng.below(10) as u32;
            std::os::unix::fs::lchown(&path, Some(id), Some(id))
                .with_context(|| format!("cannot chown {}", path.display()))?;
        }
        if rng.chance(0.005) {
            set_xattr(&path, "user.ovl-bench", word(&mut rng).as_bytes())?;
        }
        made.files += 1;
        made.bytes += size;

        if rng.chance(0.12) {
            // A symlink to this file from another directory: mostly relative, some absolute.
            let from = &dirs[rng.below(dirs.len())];
            let target = if rng.chance(0.7) {
                let mut t = PathBuf::new();
                for _ in from.components() {
                    t.push("..");
                }
                t.join(&rel)
            } else {
                Path::new("/").join(&rel)
            };
            let link = root
                .join(from)
                .join(format!("{}-link{}", word(&mut rng), files.len()));
            symlink(&target, &link)
                .with_context(|| format!("cannot create symlink {}", link.display()))?;
            made.symlinks += 1;
        }
        if rng.chance(0.02) {
            let from = &dirs[rng.below(dirs.len())];
            let link = root
                .join(from)
                .join(format!("{}-hl{}", word(&mut rng), files.len()));
            fs::hard_link(&path, &link)
                .with_context(|| format!("cannot create hardlink {}", link.display()))?;
            made.hardlinks += 1;
        }
        files.push(rel);
    }
    set_mtimes(root)?;
    Ok(made)
}

fn c_path(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes()).with_context(|| format!("NUL in {}", path.display()))
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) -> Result<()> {
    let (p, n) = (c_path(path)?, CString::new(name)?);
    // SAFETY: valid NUL-terminated strings and a buffer of the given length.
    let r = unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot set {name} on {}", path.display()));
    }
    Ok(())
}

/// Sets every entry's mtime (and atime) to [`MTIME`], children before their directory.
fn set_mtimes(path: &Path) -> Result<()> {
    let meta = fs::symlink_metadata(path)?;
    if meta.is_dir() {
        for entry in fs::read_dir(path)? {
            set_mtimes(&entry?.path())?;
        }
    }
    let t = libc::timespec {
        tv_sec: MTIME,
        tv_nsec: 0,
    };
    let times = [t, t];
    let p = c_path(path)?;
    // SAFETY: a valid path and a two-element timespec array.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            p.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot set the mtime of {}", path.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (path, kind, size or link target) of every entry, sorted.
    fn listing(root: &Path) -> Vec<(PathBuf, String)> {
        fn walk(root: &Path, dir: &Path, out: &mut Vec<(PathBuf, String)>) {
            for entry in fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                let meta = fs::symlink_metadata(&path).unwrap();
                let rel = path.strip_prefix(root).unwrap().to_path_buf();
                let what = if meta.is_dir() {
                    walk(root, &path, out);
                    "dir".to_string()
                } else if meta.is_symlink() {
                    format!("-> {}", fs::read_link(&path).unwrap().display())
                } else {
                    let data = fs::read(&path).unwrap();
                    format!("{} bytes, {:x}", data.len(), crc(&data))
                };
                out.push((rel, what));
            }
        }
        fn crc(data: &[u8]) -> u64 {
            data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
                (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
            })
        }
        let mut out = Vec::new();
        walk(root, root, &mut out);
        out.sort();
        out
    }

    #[test]
    fn the_same_seed_gives_the_same_tree() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        let made = generate(&a, 4 << 20, 7, true).unwrap();
        generate(&b, 4 << 20, 7, true).unwrap();
        assert!(
            made.bytes >= 4 << 20 && made.dirs >= 20 && made.files > 50,
            "{made:?}"
        );
        assert!(made.symlinks > 4, "{made:?}");
        let la = listing(&a);
        assert_eq!(la, listing(&b));
        assert!(la.iter().any(|(p, _)| p == Path::new("usr/bin")));
    }
}
