//! ovl-diff on uppers of real `index=on` mounts (as root). A copy-up of a lower file with
//! other hardlinks changes every name of it in the merged view (the kernel finds the others
//! through workdir/index), but the upper holds only the copied-up name: such an upper is
//! refused, naming the path, with nothing written. Copy-ups of files without other links, links
//! made through the mount and a copy-up of every name export as usual.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ovl_tests::{is_root, require, run_ok};

const BIN: &str = env!("CARGO_BIN_EXE_ovl-diff");

/// A lower (`hl1` and `other/hl2` one inode, `plain`, `single`) with an empty upper, work dir
/// and mount point.
struct Overlay {
    _t: tempfile::TempDir,
    dir: PathBuf,
    lower: PathBuf,
    upper: PathBuf,
    work: PathBuf,
    merged: PathBuf,
}

impl Overlay {
    fn new() -> Overlay {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().to_path_buf();
        let (lower, upper, work, merged) =
            (dir.join("l"), dir.join("u"), dir.join("w"), dir.join("m"));
        for p in [&lower, &upper, &work, &merged] {
            std::fs::create_dir(p).unwrap();
        }
        std::fs::create_dir(lower.join("other")).unwrap();
        std::fs::write(lower.join("hl1"), b"linked").unwrap();
        std::fs::hard_link(lower.join("hl1"), lower.join("other/hl2")).unwrap();
        std::fs::write(lower.join("plain"), b"plain").unwrap();
        std::fs::write(lower.join("single"), b"single").unwrap();
        Overlay {
            _t: t,
            dir,
            lower,
            upper,
            work,
            merged,
        }
    }

    /// Mount with `index=on` plus `extra`, run `script` in the merged view, unmount. False
    /// (after a loud skip) when the mount is refused.
    fn change(&self, extra: &str, script: &str) -> bool {
        let opts = format!(
            "lowerdir={},upperdir={},workdir={},index=on{extra}",
            self.lower.display(),
            self.upper.display(),
            self.work.display()
        );
        let mount = Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o", &opts])
            .arg(&self.merged)
            .output()
            .unwrap();
        if !require(
            &format!("an overlay mount with index=on{extra}"),
            mount.status.success(),
        ) {
            return false;
        }
        let out = Command::new("sh")
            .args(["-c", script])
            .current_dir(&self.merged)
            .output()
            .unwrap();
        run_ok(Command::new("umount").arg(&self.merged));
        assert!(
            out.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        true
    }

    fn diff(&self, out_file: &Path, extra: &[&str]) -> Output {
        let lower = format!("--lower={}", self.lower.display());
        Command::new(BIN)
            .arg("-q")
            .arg(&lower)
            .args(extra)
            .arg("-o")
            .arg(out_file)
            .arg(&self.upper)
            .output()
            .unwrap()
    }
}

fn nlink_xattr(p: &Path) -> Option<Vec<u8>> {
    xattr::get(p, "trusted.overlay.nlink").unwrap()
}

/// (type, name, link target) of every tar entry.
fn entries(layer: &Path) -> Vec<String> {
    let mut ar = tar::Archive::new(std::fs::File::open(layer).unwrap());
    ar.entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let name = String::from_utf8_lossy(&e.path_bytes()).into_owned();
            match e.link_name_bytes() {
                Some(l) => format!("{name} -> {}", String::from_utf8_lossy(&l)),
                None => format!("{name} {:o}", e.header().mode().unwrap()),
            }
        })
        .collect()
}

/// `chmod 4755 hl1` with index=on (with and without metacopy): the upper holds hl1 alone, the
/// merged view shows other/hl2 changed too. Refused with the path, no output file; after a
/// copy-up of the other name it exports, as a file and a link.
#[test]
fn index_copy_up_of_a_hardlinked_lower_file_is_refused() {
    if !require("root", is_root()) {
        return;
    }
    for extra in ["", ",redirect_dir=on,metacopy=on"] {
        let o = Overlay::new();
        if !o.change(extra, "chmod 4755 hl1 && test -u other/hl2") {
            return;
        }
        assert_eq!(
            nlink_xattr(&o.upper.join("hl1")).as_deref(),
            Some(&b"U+0"[..]),
            "the kernel left no overlay.nlink on the copy-up ({extra}): this test proves nothing"
        );
        assert!(!o.upper.join("other/hl2").exists());

        let out_file = o.dir.join("layer.tar");
        let out = o.diff(&out_file, &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "exported ({extra}): {err}");
        assert!(
            err.contains(&format!("{}/hl1", o.upper.display())),
            "({extra}) {err}"
        );
        assert!(
            err.contains("index=on") && err.contains("copy up every name"),
            "({extra}) {err}"
        );
        assert!(!out_file.exists(), "({extra}) a layer was written");
        assert_eq!(
            std::fs::read_dir(&o.dir).unwrap().count(),
            4,
            "({extra}) a temporary file was left"
        );

        // The way out the message names: copy up the other name too.
        if !o.change(extra, "chmod 4755 other/hl2") {
            return;
        }
        let out = o.diff(&out_file, &[]);
        assert!(
            out.status.success(),
            "({extra}) {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            entries(&out_file),
            ["hl1 4755", "other/ 755", "other/hl2 -> hl1"],
            "({extra})"
        );
    }
}

/// index=on without a copy-up of a hardlinked lower file: copy-ups of single files (metadata
/// and data), links made through the mount and the deletion of one name of a hardlinked lower
/// file export as usual.
#[test]
fn index_on_without_hardlinked_copy_ups_exports() {
    if !require("root", is_root()) {
        return;
    }
    let o = Overlay::new();
    if !o.change(
        "",
        "chmod 600 plain && echo more >> single && echo new > new1 && ln new1 new2 && rm other/hl2",
    ) {
        return;
    }
    assert!(nlink_xattr(&o.upper.join("plain")).is_none());
    let out_file = o.dir.join("layer.tar");
    let out = o.diff(&out_file, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        entries(&out_file),
        [
            "new1 644",
            "new2 -> new1",
            "other/ 755",
            "other/.wh.hl2 644",
            "plain 600",
            "single 644",
        ]
    );
}
