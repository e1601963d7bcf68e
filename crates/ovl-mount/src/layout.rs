//! The directories of one mount, resolved and checked before anything is mounted.
//!
//! Owns the path rules: MERGED exists, lowers exist, upper and work go together (made when
//! missing), upper and work share a filesystem, no layer lies inside another (MERGED may be the
//! single lower itself), and the work directory is empty but for what an earlier overlay mount
//! left in it.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::{MountError, Result};
use crate::spec::MountSpec;

/// Entries an overlay mount leaves in its work directory; a work directory holding only these
/// (as directories) counts as empty.
pub(crate) const WORK_LEFTOVERS: [&str; 2] = ["work", "index"];

/// The canonical directories of a mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Layout {
    /// Top first.
    pub lowers: Vec<PathBuf>,
    pub upper: Option<PathBuf>,
    pub work: Option<PathBuf>,
    pub merged: PathBuf,
}

impl Layout {
    /// Resolve and check the directories of `spec`.
    pub(crate) fn resolve(spec: &MountSpec) -> Result<Layout> {
        let merged = canonical_dir("mount point", &spec.merged).map_err(|e| match e {
            MountError::Missing { path, .. } => MountError::MergedMissing(path),
            e => e,
        })?;
        if spec.lowers.is_empty() {
            return Err(MountError::NoLower);
        }
        let lowers = spec
            .lowers
            .iter()
            .map(|l| canonical_dir("lower directory", l))
            .collect::<Result<Vec<_>>>()?;
        let (upper, work) = match (&spec.upper, &spec.work) {
            (None, None) => (None, None),
            (Some(u), Some(w)) => {
                let u = make_dir("upper directory", u)?;
                let w = make_dir("work directory", w)?;
                (Some(u), Some(w))
            }
            _ => return Err(MountError::UpperWithoutWork),
        };
        let layout = Layout {
            lowers,
            upper,
            work,
            merged,
        };
        layout.check_overlaps()?;
        if let (Some(u), Some(w)) = (&layout.upper, &layout.work) {
            same_filesystem(u, w)?;
            work_is_empty(w)?;
        }
        Ok(layout)
    }

    fn check_overlaps(&self) -> Result<()> {
        for lower in &self.lowers {
            for (what, dir) in [("upper", &self.upper), ("work", &self.work)] {
                let Some(dir) = dir else { continue };
                if dir.starts_with(lower) {
                    return Err(MountError::InsideLower {
                        what,
                        inner: dir.clone(),
                        lower: lower.clone(),
                    });
                }
                if lower.starts_with(dir) {
                    return Err(MountError::LowerInside {
                        what,
                        lower: lower.clone(),
                        outer: dir.clone(),
                    });
                }
            }
        }
        if let (Some(u), Some(w)) = (&self.upper, &self.work) {
            if u.starts_with(w) || w.starts_with(u) {
                return Err(MountError::UpperWorkOverlap {
                    upper: u.clone(),
                    work: w.clone(),
                });
            }
        }
        Ok(())
    }
}

fn canonical_dir(what: &'static str, p: &Path) -> Result<PathBuf> {
    let c = match std::fs::canonicalize(p) {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(MountError::Missing {
                what,
                path: p.to_path_buf(),
            });
        }
        Err(source) => {
            return Err(MountError::Io {
                what,
                path: p.to_path_buf(),
                source,
            });
        }
    };
    if !c.is_dir() {
        return Err(MountError::NotADirectory {
            what,
            path: p.to_path_buf(),
        });
    }
    Ok(c)
}

fn make_dir(what: &'static str, p: &Path) -> Result<PathBuf> {
    if !p.exists() {
        std::fs::create_dir_all(p).map_err(MountError::io(what, p))?;
    }
    canonical_dir(what, p)
}

/// Upper and work must be on one filesystem (overlayfs renames between them).
pub(crate) fn same_filesystem(upper: &Path, work: &Path) -> Result<()> {
    let u = std::fs::metadata(upper).map_err(MountError::io("upper directory", upper))?;
    let w = std::fs::metadata(work).map_err(MountError::io("work directory", work))?;
    if u.dev() != w.dev() {
        return Err(MountError::DifferentFilesystems {
            upper: upper.to_path_buf(),
            work: work.to_path_buf(),
        });
    }
    Ok(())
}

/// The work directory holds nothing but an earlier overlay mount's leftovers.
pub(crate) fn work_is_empty(work: &Path) -> Result<()> {
    for entry in std::fs::read_dir(work).map_err(MountError::io("work directory", work))? {
        let entry = entry.map_err(MountError::io("work directory", work))?;
        let name = entry.file_name();
        let leftover = name.to_str().is_some_and(|n| WORK_LEFTOVERS.contains(&n))
            && entry.file_type().is_ok_and(|t| t.is_dir());
        if !leftover {
            return Err(MountError::WorkNotEmpty {
                path: work.to_path_buf(),
                entry: name.to_string_lossy().into_owned(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(
        t: &Path,
        lowers: &[&str],
        upper: Option<&str>,
        work: Option<&str>,
        merged: &str,
    ) -> MountSpec {
        MountSpec {
            lowers: lowers.iter().map(|l| t.join(l)).collect(),
            upper: upper.map(|u| t.join(u)),
            work: work.map(|w| t.join(w)),
            merged: t.join(merged),
            ..Default::default()
        }
    }

    #[test]
    fn resolves_and_refuses_overlaps() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path();
        for d in ["l1", "l2", "m"] {
            std::fs::create_dir(p.join(d)).unwrap();
        }
        let l = Layout::resolve(&spec(p, &["l1", "l2"], Some("u"), Some("w"), "m")).unwrap();
        assert!(
            l.upper.as_ref().unwrap().is_dir(),
            "upper is made when missing"
        );
        assert_eq!(l.lowers.len(), 2);
        // MERGED may be the single lower.
        Layout::resolve(&spec(p, &["l1"], None, None, "l1")).unwrap();
        let e = Layout::resolve(&spec(p, &["l1"], Some("l1/u"), Some("w2"), "m")).unwrap_err();
        assert!(
            matches!(e, MountError::InsideLower { what: "upper", .. }),
            "{e}"
        );
        let e = Layout::resolve(&spec(p, &["l1/x"], Some("l1"), Some("w3"), "m"));
        assert!(matches!(e, Err(MountError::Missing { .. })));
        std::fs::create_dir(p.join("l1/x")).unwrap();
        let e = Layout::resolve(&spec(p, &["l1/x"], Some("l1"), Some("w3"), "m")).unwrap_err();
        assert!(matches!(e, MountError::LowerInside { .. }), "{e}");
        let e = Layout::resolve(&spec(p, &["l2"], Some("u"), Some("u/w"), "m")).unwrap_err();
        assert!(matches!(e, MountError::UpperWorkOverlap { .. }), "{e}");
        let e = Layout::resolve(&spec(p, &["l2"], Some("u"), None, "m")).unwrap_err();
        assert!(matches!(e, MountError::UpperWithoutWork));
        let e = Layout::resolve(&spec(p, &["l2"], None, None, "nope")).unwrap_err();
        assert!(matches!(e, MountError::MergedMissing(_)), "{e}");
        assert!(e.to_string().contains("mkdir"), "{e}");
    }

    #[test]
    fn work_dir_must_be_empty_but_for_overlay_leftovers() {
        let t = tempfile::tempdir().unwrap();
        let w = t.path();
        work_is_empty(w).unwrap();
        std::fs::create_dir(w.join("work")).unwrap();
        std::fs::create_dir(w.join("index")).unwrap();
        work_is_empty(w).unwrap();
        std::fs::write(w.join("junk"), b"").unwrap();
        let e = work_is_empty(w).unwrap_err();
        assert!(
            matches!(&e, MountError::WorkNotEmpty { entry, .. } if entry == "junk"),
            "{e}"
        );
        std::fs::remove_file(w.join("junk")).unwrap();
        std::fs::remove_dir(w.join("index")).unwrap();
        std::fs::write(w.join("index"), b"").unwrap();
        assert!(
            work_is_empty(w).is_err(),
            "a leftover name must be a directory"
        );
    }

    #[test]
    fn different_filesystems_are_refused() {
        let t = tempfile::tempdir().unwrap();
        same_filesystem(t.path(), t.path()).unwrap();
        // /proc is never on the same filesystem as a temporary directory.
        let e = same_filesystem(t.path(), Path::new("/proc")).unwrap_err();
        assert!(matches!(e, MountError::DifferentFilesystems { .. }), "{e}");
    }
}
