//! Stacked layers against umoci: hand-made layer tars are added to an OCI image with
//! `umoci raw add-layer`, the image is imported with `ovl-import oci:DIR:TAG`, its lowerdirs are
//! mounted (a read-only kernel overlay), and the merged view must be the rootfs `umoci unpack`
//! makes of the same image. The top layer holds every layer-level case of the tar-world issue:
//! implicit parent directories over lower ones (a sticky /tmp, an /etc with xattrs) and with no
//! lower one, a hardlink to a file only the lower layer holds, an opaque directory with
//! whiteouts below it in both orders, PAX xattrs with newline bytes, a regular entry with a
//! trailing slash, blank numeric fields and a sparse file in PAX 0.1 form.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use ovl_layer::display_bytes;
use ovl_tests::snapshot::{SnapshotOptions, differences, snapshot};

/// The importer under test; `OVL_IMPORT_BIN` points the test at another build.
fn bin() -> std::path::PathBuf {
    std::env::var_os("OVL_IMPORT_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_ovl-import").into())
}
const BLOCK: usize = 512;

fn pad(v: &mut Vec<u8>) {
    v.resize(v.len().div_ceil(BLOCK) * BLOCK, 0);
}

/// A ustar header as tar writes one.
fn header(name: &[u8], typeflag: u8, size: usize, mode: u32, mtime: u64, link: &[u8]) -> Vec<u8> {
    let mut h = vec![0u8; BLOCK];
    let put = |h: &mut Vec<u8>, off: usize, v: &[u8]| h[off..off + v.len()].copy_from_slice(v);
    put(&mut h, 0, name);
    put(&mut h, 100, format!("{mode:07o}\0").as_bytes());
    put(&mut h, 108, b"0000000\0");
    put(&mut h, 116, b"0000000\0");
    put(&mut h, 124, format!("{size:011o}\0").as_bytes());
    put(&mut h, 136, format!("{mtime:011o}\0").as_bytes());
    h[156] = typeflag;
    put(&mut h, 157, link);
    put(&mut h, 257, b"ustar\x0000");
    put(&mut h, 329, b"0000000\0");
    put(&mut h, 337, b"0000000\0");
    put(&mut h, 148, b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    put(&mut h, 148, format!("{sum:06o}\0 ").as_bytes());
    h
}

struct Layer(Vec<u8>);

impl Layer {
    fn new() -> Self {
        Layer(Vec::new())
    }
    fn raw(&mut self, name: &[u8], typeflag: u8, data: &[u8], mode: u32, link: &[u8]) -> &mut Self {
        self.0.extend(header(
            name,
            typeflag,
            data.len(),
            mode,
            1_600_000_000,
            link,
        ));
        self.0.extend_from_slice(data);
        pad(&mut self.0);
        self
    }
    fn dir(&mut self, name: &str, mode: u32) -> &mut Self {
        self.raw(name.as_bytes(), b'5', b"", mode, b"")
    }
    fn file(&mut self, name: &str, data: &[u8]) -> &mut Self {
        self.raw(name.as_bytes(), b'0', data, 0o644, b"")
    }
    fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
        let mut data = Vec::new();
        for (k, v) in records {
            let body_len = 1 + k.len() + 1 + v.len() + 1;
            let mut n = body_len + 1;
            while n.to_string().len() + body_len != n {
                n += 1;
            }
            data.extend(format!("{n} {k}=").as_bytes());
            data.extend_from_slice(v);
            data.push(b'\n');
        }
        self.raw(b"PaxHeaders/x", b'x', &data, 0o644, b"")
    }
    fn finish(&mut self, path: &Path) {
        self.0.extend([0u8; 2 * BLOCK]);
        std::fs::write(path, &self.0).unwrap();
    }
}

fn umoci(args: &[&std::ffi::OsStr]) {
    ovl_tests::run_ok(Command::new("umoci").args(args));
}

#[test]
fn stacked_layers_match_umoci_unpack() {
    if !ovl_tests::require("root", ovl_tests::is_root())
        || !ovl_tests::require("umoci", ovl_tests::which("umoci").is_some())
    {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let base = t.path().join("base.tar");
    let caps: &[u8] = &[
        1, 0, 0, 2, 0x0a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    Layer::new()
        .dir("tmp/", 0o1777)
        .file("tmp/old", b"old tmp file\n")
        .pax(&[("SCHILY.xattr.user.etc", b"lower\nxattr")])
        .dir("etc/", 0o750)
        .file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n")
        .dir("bin/", 0o755)
        .raw(b"bin/busybox", b'0', b"\x7fELF busybox", 0o4755, b"")
        .dir("d/", 0o755)
        .file("d/old", b"old\n")
        .file("d/keep", b"keep\n")
        .dir("d/sub/", 0o755)
        .file("d/sub/deep", b"deep\n")
        .dir("o/", 0o700)
        .file("o/old", b"old\n")
        .finish(&base);
    let top = t.path().join("top.tar");
    let sparse_pax: Vec<(&str, &[u8])> = vec![
        ("GNU.sparse.major", b"0"),
        ("GNU.sparse.minor", b"1"),
        ("GNU.sparse.name", b"var/sparse"),
        ("GNU.sparse.size", b"1048576"),
        ("GNU.sparse.numblocks", b"2"),
        ("GNU.sparse.map", b"0,4,1048572,4"),
    ];
    Layer::new()
        // Implicit parents: tmp (sticky in the lower), etc (0750 + xattr), bin, and new/deep
        // (no lower).
        .file("tmp/x", b"new tmp file\n")
        .file("etc/new", b"new\n")
        .raw(b"bin/sh", b'1', b"", 0o755, b"bin/busybox")
        .file("new/deep/f", b"no lower dir\n")
        // Opaque with whiteouts after it, and whiteouts before an opaque marker.
        .file("d/.wh..wh..opq", b"")
        .file("d/.wh.old", b"")
        .file("d/sub/.wh.deep", b"")
        .file("d/new", b"new\n")
        .file("o/.wh.old", b"")
        .file("o/.wh..wh..opq", b"")
        .pax(&[("SCHILY.xattr.security.capability", caps)])
        .raw(b"caps", b'0', b"#!/bin/sh\n", 0o755, b"")
        .raw(b"slashdir/", 0, b"", 0o751, b"")
        .raw(b"slashdir/f", b'0', b"in it\n", 0o644, b"")
        .pax(&sparse_pax)
        .raw(b"var/GNUSparseFile.1/sparse", b'0', b"headtail", 0o644, b"")
        .finish(&top);

    let img = t.path().join("img");
    let img_tag = t.path().join("img:t");
    umoci(&["init".as_ref(), "--layout".as_ref(), img.as_os_str()]);
    umoci(&["new".as_ref(), "--image".as_ref(), img_tag.as_os_str()]);
    for l in [&base, &top] {
        umoci(&[
            "raw".as_ref(),
            "add-layer".as_ref(),
            "--image".as_ref(),
            img_tag.as_os_str(),
            l.as_os_str(),
        ]);
    }
    let since = tarworld_now();
    let bundle = t.path().join("bundle");
    umoci(&[
        "unpack".as_ref(),
        "--image".as_ref(),
        img_tag.as_os_str(),
        bundle.as_os_str(),
    ]);

    // In turn, and the two layers at once (the top one is extracted while the lower one is
    // still being written).
    for jobs in ["1", "2"] {
        let dest = t.path().join(format!("lowers-{jobs}"));
        let mut src = std::ffi::OsString::from("oci:");
        src.push(img_tag.as_os_str());
        let out = Command::new(bin())
            .args(["--jobs", jobs])
            .arg(&src)
            .arg(&dest)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ovl-import: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("1 hardlinks to lower-layer files copied"),
            "the summary does not count the copied hardlink: {stderr}"
        );
        let lowers = String::from_utf8(out.stdout).unwrap().trim().to_string();

        // Implicit directories are reproducible: the same bytes on every import.
        let top_dir = dest.join("1");
        let new = top_dir.join("new").symlink_metadata().unwrap();
        assert_eq!((new.mode() & 0o7777, new.mtime(), new.uid()), (0o755, 0, 0));
        let tmp = top_dir.join("tmp").symlink_metadata().unwrap();
        assert_eq!((tmp.mode() & 0o7777, tmp.mtime()), (0o1777, 1_600_000_000));

        let merged = t.path().join(format!("merged-{jobs}"));
        std::fs::create_dir(&merged).unwrap();
        let st = Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o"])
            .arg(format!("ro,lowerdir={lowers}"))
            .arg(&merged)
            .status()
            .unwrap();
        assert!(st.success(), "mount the lowers");
        struct Unmount<'a>(&'a Path);
        impl Drop for Unmount<'_> {
            fn drop(&mut self) {
                let _ = Command::new("umount").arg(self.0).status();
            }
        }
        let _guard = Unmount(&merged);
        let opts = SnapshotOptions {
            skip_root: true,
            ..SnapshotOptions::merged_view()
        };
        let mut ovl = snapshot(&merged, &opts).unwrap();
        let mut umoci_tree = snapshot(&bundle.join("rootfs"), &opts).unwrap();
        // umoci makes a directory no layer has "now"; ovl makes it at mtime 0 (checked above).
        for (p, e) in umoci_tree.iter_mut() {
            if e.kind == 'd' && e.mtime.0 >= since {
                e.mtime = (0, 0);
                if let Some(o) = ovl.get_mut(p) {
                    o.mtime = (0, 0);
                }
            }
        }
        // In one rootfs the link shares the lower file's inode; across overlay layers it cannot,
        // so it is a copy (same content and metadata).
        for tree in [&mut ovl, &mut umoci_tree] {
            for p in [&b"bin/sh"[..], b"bin/busybox"] {
                if let Some(e) = tree.get_mut(p) {
                    e.hardlink_group = None;
                }
            }
        }
        let diff = differences(&umoci_tree, &ovl);
        assert!(
            diff.is_empty(),
            "--jobs {jobs}: the merged view differs from umoci's rootfs (umoci first):\n{}\nmerged: {:?}",
            diff.join("\n"),
            ovl.keys().map(|k| display_bytes(k)).collect::<Vec<_>>()
        );
        assert!(ovl.contains_key(&b"var/sparse"[..]) && ovl.contains_key(&b"tmp/x"[..]));
    }
}

fn tarworld_now() -> i64 {
    ovl_tests::tarworld::now()
}
