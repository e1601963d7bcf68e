//! ovl-import end to end: exactness against GNU tar, stdin, whiteouts, OCI layouts, rootless.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::process::{Command, Stdio};

use ovl_tests::oci::{oci_layout, sha256};
use ovl_tests::snapshot::{SnapshotOptions, differences, snapshot};
use ovl_tests::{bin, command_as, is_root, output, require, run_ok, which};

fn import_cmd() -> Command {
    Command::new(bin("ovl-import"))
}

fn gnu_tar_extract(archive: &Path, into: &Path) {
    std::fs::create_dir(into).unwrap();
    run_ok(
        Command::new("tar")
            .args([
                "--xattrs",
                "--xattrs-include=*",
                "--same-owner",
                "--numeric-owner",
                "-xpf",
            ])
            .arg(archive)
            .arg("-C")
            .arg(into),
    );
}

fn strict() -> SnapshotOptions {
    SnapshotOptions::default()
}

fn assert_same_tree(a: &Path, b: &Path, opts: &SnapshotOptions) {
    let diff = differences(&snapshot(a, opts).unwrap(), &snapshot(b, opts).unwrap());
    assert!(
        diff.is_empty(),
        "{} and {} differ:\n{}",
        a.display(),
        b.display(),
        diff.join("\n")
    );
}

#[test]
fn alpine_as_root_is_identical_to_gnu_tar_from_file_and_stdin() {
    if !require("root", is_root()) {
        return;
    }
    let Some(alpine) = ovl_tests::alpine_minirootfs() else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let (ours, stdin_dest, gnu) = (
        t.path().join("ours"),
        t.path().join("stdin"),
        t.path().join("gnu"),
    );
    let out = output(import_cmd().arg(&alpine).arg(&ours));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Not a terminal: no bar, only the one-line summary.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(" entries, ") && stderr.contains("whiteouts") && stderr.contains("skipped"),
        "{stderr}"
    );
    assert!(
        !stderr.contains('\x1b'),
        "escape codes on a non-terminal: {stderr:?}"
    );
    run_ok(
        import_cmd()
            .args(["--quiet", "-"])
            .arg(&stdin_dest)
            .stdin(std::fs::File::open(&alpine).unwrap()),
    );
    gnu_tar_extract(&alpine, &gnu);
    assert_same_tree(&ours, &gnu, &strict());
    assert_same_tree(&stdin_dest, &gnu, &strict());
    let n = snapshot(&ours, &strict()).unwrap().len();
    assert!(n > 500, "only {n} entries: is this the minirootfs?");
}

/// An xattr whose name is not UTF-8, as GNU tar writes it (`SCHILY.xattr.<name bytes>`, from
/// a real file), is set as GNU tar sets it: same name bytes, same value, seen by `getfattr`.
/// Failed before: ovl-import refused the archive ("xattr name is not UTF-8").
#[test]
fn an_xattr_name_that_is_not_utf8_is_set_as_gnu_tar_sets_it() {
    if !require("root", is_root())
        || !require("setfattr (package attr)", which("setfattr").is_some())
    {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir(&src).unwrap();
    run_ok(
        Command::new("sh")
            .arg("-ec")
            .arg(
                r#"echo hi > f && mkdir d
                setfattr -n "$(printf 'user.\377\376')" -v 1 f
                setfattr -n user.ok -v 2 f
                setfattr -n "$(printf 'user.d\351j\340')" -v 0x00ff d"#,
            )
            .current_dir(&src),
    );
    let archive = t.path().join("a.tar");
    run_ok(
        Command::new("tar")
            .args(["--format=pax", "--xattrs", "--xattrs-include=*", "-cf"])
            .arg(&archive)
            .arg("-C")
            .arg(&src)
            .arg("."),
    );
    let (ours, gnu) = (t.path().join("ours"), t.path().join("gnu"));
    run_ok(import_cmd().arg("--quiet").arg(&archive).arg(&ours));
    gnu_tar_extract(&archive, &gnu);
    let want = ovl_tests::getfattr(&src, &[b"f", b"d"]);
    assert!(want.contains("user.\\xff\\xfe=0x31"), "{want}");
    assert_eq!(ovl_tests::getfattr(&gnu, &[b"f", b"d"]), want, "GNU tar");
    assert_eq!(
        ovl_tests::getfattr(&ours, &[b"f", b"d"]),
        want,
        "ovl-import"
    );
    assert_same_tree(&ours, &gnu, &strict());

    // bsdtar writes the name %-escaped, as a `LIBARCHIVE.xattr.` record (decoded: the name)
    // and a `SCHILY.xattr.` one (taken as it is: `user.%FF%FE`); bsdtar sets both, so do we.
    if !require(
        "bsdtar (package libarchive-tools)",
        which("bsdtar").is_some(),
    ) {
        return;
    }
    let archive = t.path().join("b.tar");
    run_ok(
        Command::new("bsdtar")
            .args(["--xattrs", "--format=pax", "-cf"])
            .arg(&archive)
            .arg("-C")
            .arg(&src)
            .arg("."),
    );
    let (ours, bsd) = (t.path().join("ours-bsd"), t.path().join("bsd"));
    run_ok(import_cmd().arg("--quiet").arg(&archive).arg(&ours));
    std::fs::create_dir(&bsd).unwrap();
    run_ok(
        Command::new("bsdtar")
            .args(["--xattrs", "-xpf"])
            .arg(&archive)
            .arg("-C")
            .arg(&bsd),
    );
    let bsd_sees = ovl_tests::getfattr(&bsd, &[b"f", b"d"]);
    assert!(bsd_sees.contains("user.\\xff\\xfe=0x31"), "{bsd_sees}");
    assert_eq!(
        ovl_tests::getfattr(&ours, &[b"f", b"d"]),
        bsd_sees,
        "ovl-import"
    );
}

/// A tree with every kind of entry and metadata GNU tar can carry.
fn rich_tree(dir: &Path) {
    let sh = |script: &str| run_ok(Command::new("sh").arg("-ec").arg(script).current_dir(dir));
    sh(
        "mkdir -p d/sub e && echo hi > d/f && chown 42:4242 d/f && chmod 4755 d/f && ln d/f d/hard && ln -s f d/sym && ln -s /abs/target d/abs \
        && mkfifo d/fifo && mknod d/chr c 1 3 && mknod d/blk b 7 0 && chmod 2775 e && chmod 1777 d/sub \
        && chown -h 7:8 d/sym && chown 100:101 e \
        && setfattr -n user.test -v val d/f && setfattr -n trusted.t -v tv d && setfattr -n trusted.s -v sv -h d/sym \
        && setfattr -n user.dir -v dv e \
        && dd if=/dev/zero of=sparse bs=1M seek=10 count=0 2>/dev/null && echo tail >> sparse \
        && touch -h -d '2020-01-02 03:04:05.123456789' d/sym d/f d/fifo d e",
    );
    let long = "l".repeat(120);
    let deep = format!("{long}/{long}/{long}");
    std::fs::create_dir_all(dir.join(&deep)).unwrap();
    std::fs::write(dir.join(&deep).join("file"), b"deep").unwrap();
    use std::os::unix::ffi::OsStrExt;
    std::fs::write(
        dir.join(std::ffi::OsStr::from_bytes(b"non-utf8-\xff\xfe")),
        b"bytes",
    )
    .unwrap();
}

#[test]
fn every_entry_type_and_metadata_matches_gnu_tar_in_pax_and_gnu_formats() {
    if !require("root", is_root())
        || !require("setfattr (package attr)", which("setfattr").is_some())
    {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir(&src).unwrap();
    rich_tree(&src);
    for (format, sparse_flag) in [("pax", "--sparse"), ("gnu", "--sparse")] {
        let archive = t.path().join(format!("{format}.tar"));
        run_ok(
            Command::new("tar")
                .args([
                    &format!("--format={format}"),
                    "--xattrs",
                    "--xattrs-include=*",
                    sparse_flag,
                    "--numeric-owner",
                    "-cf",
                ])
                .arg(&archive)
                .arg("-C")
                .arg(&src)
                .arg("."),
        );
        let (ours, gnu) = (
            t.path().join(format!("ours-{format}")),
            t.path().join(format!("gnu-{format}")),
        );
        run_ok(import_cmd().arg("--quiet").arg(&archive).arg(&ours));
        gnu_tar_extract(&archive, &gnu);
        // The GNU format has no sub-second mtimes; PAX must keep nanoseconds exactly.
        assert_same_tree(&ours, &gnu, &strict());
        let f = std::fs::symlink_metadata(ours.join("d/f")).unwrap();
        assert_eq!(
            (f.mode() & 0o7777, f.uid(), f.gid(), f.nlink()),
            (0o4755, 42, 4242, 2)
        );
        if format == "pax" {
            assert_eq!(f.mtime_nsec(), 123456789);
        }
        assert!(
            std::fs::symlink_metadata(ours.join("d/chr"))
                .unwrap()
                .file_type()
                .is_char_device()
        );
        let sp = std::fs::symlink_metadata(ours.join("sparse")).unwrap();
        assert_eq!(sp.len(), 10 * 1024 * 1024 + 5);
        assert!(
            sp.blocks() < 64,
            "the sparse file was written densely: {} blocks",
            sp.blocks()
        );
    }
}

/// A layer tar built entry by entry.
struct Layer(tar::Builder<Vec<u8>>);

impl Layer {
    fn new() -> Self {
        Layer(tar::Builder::new(Vec::new()))
    }
    fn header() -> tar::Header {
        let mut h = tar::Header::new_ustar();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_mode(0o644);
        h
    }
    fn dir(mut self, path: &str) -> Self {
        let mut h = Self::header();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        self.0.append_data(&mut h, path, std::io::empty()).unwrap();
        self
    }
    fn file(mut self, path: &str, data: &[u8]) -> Self {
        let mut h = Self::header();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        self.0.append_data(&mut h, path, data).unwrap();
        self
    }
    fn bytes(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
    /// A file with its own mode and mtime.
    fn file_meta(mut self, path: &str, data: &[u8], mode: u32, mtime: u64) -> Self {
        let mut h = Self::header();
        h.set_mode(mode);
        h.set_mtime(mtime);
        h.set_size(data.len() as u64);
        self.0.append_data(&mut h, path, data).unwrap();
        self
    }
    fn hardlink(mut self, path: &str, target: &str) -> Self {
        let mut h = Self::header();
        h.set_entry_type(tar::EntryType::Link);
        h.set_size(0);
        self.0.append_link(&mut h, path, target).unwrap();
        self
    }
}

fn is_whiteout(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_char_device() && m.rdev() == 0)
}

fn xattr(p: &Path, name: &str) -> Option<Vec<u8>> {
    xattr::get(p, name).unwrap()
}

#[test]
fn oci_whiteouts_become_overlay_whiteouts_and_stack_in_a_real_mount() {
    if !require("root", is_root()) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let l1 = Layer::new()
        .dir("etc")
        .file("etc/motd", b"hello")
        .file("etc/keep", b"keep")
        .dir("var/cache")
        .file("var/cache/old", b"old")
        .dir("opt/app")
        .file("opt/app/old", b"old")
        .bytes();
    // Whiteouts before and after their siblings, an opaque marker before its directory entry,
    // and a whiteout plus re-creation of the same directory (opaque by the OCI rules).
    let l2 = Layer::new()
        .file("etc/.wh.motd", b"")
        .file("var/cache/.wh..wh..opq", b"")
        .dir("var/cache")
        .file("var/cache/new", b"new")
        .file(".wh.opt", b"")
        .dir("opt")
        .dir("opt/app")
        .file("opt/app/new", b"new")
        .bytes();
    let (a1, a2) = (t.path().join("l1.tar"), t.path().join("l2.tar"));
    std::fs::write(&a1, l1).unwrap();
    std::fs::write(&a2, l2).unwrap();
    let (d1, d2) = (t.path().join("L1"), t.path().join("L2"));
    run_ok(import_cmd().arg("--quiet").arg(&a1).arg(&d1));
    let out = run_ok(import_cmd().arg(&a2).arg(&d2).stderr(Stdio::piped()));
    assert!(out.is_empty());
    assert!(is_whiteout(&d2.join("etc/motd")));
    assert_eq!(
        xattr(&d2.join("var/cache"), "trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(
        xattr(&d2.join("opt"), "trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert!(!d2.join(".wh.opt").exists() && !d2.join("etc/.wh.motd").exists());

    // The rootless namespace on request.
    let d2u = t.path().join("L2u");
    run_ok(
        import_cmd()
            .args(["--quiet", "--opaque-xattr", "user"])
            .arg(&a2)
            .arg(&d2u),
    );
    assert_eq!(
        xattr(&d2u.join("var/cache"), "user.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(
        xattr(&d2u.join("var/cache"), "trusted.overlay.opaque"),
        None
    );

    // The kernel agrees: the merged view is what the two OCI layers mean.
    let merged = t.path().join("merged");
    std::fs::create_dir(&merged).unwrap();
    let opts = format!("lowerdir={}:{}", d2.display(), d1.display());
    run_ok(
        Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o", &opts])
            .arg(&merged),
    );
    let listing = |p: &str| {
        let mut v: Vec<String> = std::fs::read_dir(merged.join(p))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let got = (listing("etc"), listing("var/cache"), listing("opt/app"));
    run_ok(Command::new("umount").arg(&merged));
    assert_eq!(
        got,
        (
            vec!["keep".to_string()],
            vec!["new".to_string()],
            vec!["new".to_string()]
        )
    );
}

#[test]
fn oci_layout_layers_become_lowerdirs_and_bad_digests_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let base = Layer::new()
        .dir("etc")
        .file("etc/a", b"a")
        .file("etc/b", b"b")
        .bytes();
    let top = Layer::new()
        .file("etc/.wh.a", b"")
        .file("etc/c", b"c")
        .bytes();
    let gz = {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(&base).unwrap();
        e.finish().unwrap()
    };
    let zs = zstd::encode_all(&top[..], 3).unwrap();
    let layout = t.path().join("image");
    let blobs = oci_layout(
        &layout,
        "v1",
        &[
            (gz, "application/vnd.oci.image.layer.v1.tar+gzip"),
            (zs, "application/vnd.oci.image.layer.v1.tar+zstd"),
        ],
    );
    let dest = t.path().join("lowers");
    let stdout = run_ok(
        import_cmd()
            .arg("--quiet")
            .arg(format!("oci:{}:v1", layout.display()))
            .arg(&dest),
    );
    let lower = String::from_utf8(stdout).unwrap();
    assert_eq!(
        lower.trim(),
        format!("{}:{}", dest.join("1").display(), dest.join("0").display())
    );
    assert_eq!(std::fs::read(dest.join("0/etc/a")).unwrap(), b"a");
    assert_eq!(std::fs::read(dest.join("1/etc/c")).unwrap(), b"c");
    // Rootless imports cannot make 0/0 devices outside a namespace; as root or in one they can.
    assert!(is_whiteout(&dest.join("1/etc/a")));

    // An unknown tag names the ones there are.
    let out = output(
        import_cmd()
            .arg(format!("oci:{}:v2", layout.display()))
            .arg(t.path().join("x")),
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("v1"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A blob whose bytes do not match its digest: an error naming the digest, and no DEST.
    let mut data = std::fs::read(&blobs[1]).unwrap();
    let n = data.len();
    data[n - 1] ^= 0xff;
    std::fs::write(&blobs[1], &data).unwrap();
    let bad = t.path().join("bad");
    let out = output(
        import_cmd()
            .arg(format!("oci:{}", layout.display()))
            .arg(&bad),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("digest mismatch") || err.contains("zstd") || err.contains("Unknown frame"),
        "{err}"
    );
    assert!(!bad.exists());
    assert!(std::fs::read_dir(t.path()).unwrap().all(|e| {
        !e.unwrap()
            .file_name()
            .to_string_lossy()
            .contains(".ovl-import-")
    }));
}

/// Run `cmd` for at most 30 s; `None` when it had to be killed.
fn output_within_30s(cmd: &mut Command) -> Option<std::process::Output> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > std::time::Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Some(child.wait_with_output().unwrap())
}

/// A layout's blobs are files named by digest, but a hostile layout can make one a symlink to
/// /dev/zero or a FIFO: refused as not a regular file, quickly, instead of read forever.
#[test]
fn oci_blobs_that_are_not_regular_files_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let layer = Layer::new().file("f", b"f").bytes();
    for what in ["layer-dev-zero", "manifest-fifo"] {
        let layout = t.path().join(what);
        let blobs = oci_layout(
            &layout,
            "v1",
            &[(layer.clone(), "application/vnd.oci.image.layer.v1.tar")],
        );
        if what == "layer-dev-zero" {
            std::fs::remove_file(&blobs[0]).unwrap();
            std::os::unix::fs::symlink("/dev/zero", &blobs[0]).unwrap();
        } else {
            // The manifest is the one blob written last (after the layer and the config).
            let index = std::fs::read_to_string(layout.join("index.json")).unwrap();
            let m = index.split("sha256:").nth(1).unwrap()[..64].to_string();
            let path = layout.join("blobs/sha256").join(m);
            std::fs::remove_file(&path).unwrap();
            rustix::fs::mknodat(
                rustix::fs::CWD,
                &path,
                rustix::fs::FileType::Fifo,
                rustix::fs::Mode::from_raw_mode(0o644),
                0,
            )
            .unwrap();
        }
        let dest = t.path().join(format!("{what}-dest"));
        let out = output_within_30s(
            import_cmd()
                .arg("--quiet")
                .arg(format!("oci:{}", layout.display()))
                .arg(&dest),
        )
        .unwrap_or_else(|| panic!("{what}: ovl-import still running after 30 s"));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: {err}");
        assert!(err.contains("not a regular file"), "{what}: {err}");
        assert!(!dest.exists(), "{what}");
    }
}

/// Wrap the image `tag` of the layout at `dir` in `depth` nested image indexes (each the only
/// entry of the next): the digests of the indexes, outermost first.
fn nest_in_indexes(dir: &Path, depth: usize) -> Vec<String> {
    let index_path = dir.join("index.json");
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    let mut desc = index["manifests"][0].clone();
    let tag = desc.as_object_mut().unwrap().remove("annotations").unwrap();
    let blobs = dir.join("blobs/sha256");
    let mut chain = Vec::new();
    for _ in 0..depth {
        let nested = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [desc],
        }))
        .unwrap();
        let d = sha256(&nested);
        std::fs::write(blobs.join(&d), &nested).unwrap();
        desc = serde_json::json!({
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": format!("sha256:{d}"),
            "size": nested.len(),
        });
        chain.push(d);
    }
    desc["annotations"] = tag;
    index["manifests"][0] = desc;
    std::fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
    chain.reverse();
    chain
}

/// A chain of nested image indexes is followed a few levels deep (an image index of an image
/// index imports), and 10,000 levels are a clean error naming an index of the chain, not a
/// stack overflow that leaves the staging sibling behind.
#[test]
fn nested_image_indexes_are_followed_only_so_deep() {
    let t = tempfile::tempdir().unwrap();
    let layer = Layer::new().file("f", b"f").bytes();
    // 40 levels are far past the bound: the old recursive walk followed them all and imported
    // (and ~10,000 overflowed its stack); building 10,000 blobs costs minutes, 40 costs nothing.
    for (depth, ok) in [(2, true), (40, false)] {
        let layout = t.path().join(format!("nested-{depth}"));
        oci_layout(
            &layout,
            "v1",
            &[(layer.clone(), "application/vnd.oci.image.layer.v1.tar")],
        );
        let chain = nest_in_indexes(&layout, depth);
        let dest = t.path().join(format!("dest-{depth}"));
        let out = output_within_30s(
            import_cmd()
                .arg("--quiet")
                .arg(format!("oci:{}:v1", layout.display()))
                .arg(&dest),
        )
        .unwrap_or_else(|| panic!("{depth}: ovl-import still running after 30 s"));
        let err = String::from_utf8_lossy(&out.stderr);
        if ok {
            assert!(out.status.success(), "{depth}: {err}");
            assert_eq!(std::fs::read(dest.join("0/f")).unwrap(), b"f");
            continue;
        }
        assert!(
            out.status.code().is_some_and(|c| c != 0),
            "{depth}: {:?}: {err}",
            out.status
        );
        assert!(err.contains("nested more than"), "{err}");
        assert!(
            chain.iter().take(20).any(|d| err.contains(d.as_str())),
            "{err}"
        );
        assert!(!dest.exists());
        let left: Vec<_> = std::fs::read_dir(t.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".ovl-import-"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }
}

/// Descriptors are checked before their blobs are used: a digest that is a path is refused as
/// no digest, a layer whose size is not its descriptor's is refused before extraction, and a
/// layer stored as sha512 imports.
#[test]
fn oci_descriptors_are_checked_and_sha512_blobs_import() {
    let t = tempfile::tempdir().unwrap();
    let layer = Layer::new().file("f", b"f").bytes();
    let media = "application/vnd.oci.image.layer.v1.tar";
    let rewrite = |layout: &Path, f: &dyn Fn(&mut serde_json::Value)| {
        let p = layout.join("index.json");
        let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
    };
    // The manifest with its one layer descriptor changed by `f`, stored and named by index.json.
    let relayer = |layout: &Path, f: &dyn Fn(&mut serde_json::Value)| {
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
        let m = index["manifests"][0]["digest"].as_str().unwrap()[7..].to_string();
        let mut manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(layout.join("blobs/sha256").join(m)).unwrap())
                .unwrap();
        f(&mut manifest["layers"][0]);
        let bytes = serde_json::to_vec(&manifest).unwrap();
        let d = sha256(&bytes);
        std::fs::write(layout.join("blobs/sha256").join(&d), &bytes).unwrap();
        rewrite(layout, &|v| {
            v["manifests"][0]["digest"] = format!("sha256:{d}").into();
            v["manifests"][0]["size"] = bytes.len().into();
        });
    };
    let run = |what: &str| {
        let layout = t.path().join(what);
        let blobs = oci_layout(&layout, "v1", &[(layer.clone(), media)]);
        match what {
            "index-digest-abs" => rewrite(&layout, &|v| {
                v["manifests"][0]["digest"] = "sha256:/etc/hostname".into()
            }),
            "layer-size-lies" => relayer(&layout, &|l| l["size"] = (layer.len() - 1).into()),
            "layer-sha512" => {
                use sha2::Digest;
                let d = hex::encode(sha2::Sha512::digest(&layer));
                std::fs::create_dir_all(layout.join("blobs/sha512")).unwrap();
                std::fs::rename(&blobs[0], layout.join("blobs/sha512").join(&d)).unwrap();
                relayer(&layout, &|l| l["digest"] = format!("sha512:{d}").into());
            }
            _ => unreachable!(),
        }
        let dest = t.path().join(format!("{what}-dest"));
        let out = output(
            import_cmd()
                .arg("--quiet")
                .arg(format!("oci:{}", layout.display()))
                .arg(&dest),
        );
        (out, dest)
    };
    for (what, says) in [
        ("index-digest-abs", "not a digest"),
        ("layer-size-lies", "its descriptor says"),
    ] {
        let (out, dest) = run(what);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: {err}");
        assert!(err.contains(says), "{what}: {err}");
        assert!(!dest.exists(), "{what}");
    }
    let (out, dest) = run("layer-sha512");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(dest.join("0/f")).unwrap(), b"f");
}

#[test]
fn an_existing_dest_is_refused_and_left_alone() {
    let t = tempfile::tempdir().unwrap();
    let archive = t.path().join("a.tar");
    std::fs::write(&archive, Layer::new().file("f", b"x").bytes()).unwrap();
    let dest = t.path().join("dest");
    std::fs::create_dir(&dest).unwrap();
    std::fs::write(dest.join("mine"), b"mine").unwrap();
    let out = output(import_cmd().arg(&archive).arg(&dest));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    assert_eq!(std::fs::read_dir(&dest).unwrap().count(), 1);
}

#[test]
fn rootless_with_subordinate_ids_keeps_owners_through_the_map() {
    let Some(user) = ovl_tests::require_test_user() else {
        return;
    };
    if !require("newuidmap (package uidmap)", which("newuidmap").is_some()) {
        return;
    }
    let Some(alpine) = ovl_tests::alpine_minirootfs() else {
        return;
    };
    let t = ovl_tests::user_tempdir(&user);
    let rich_src = t.path().join("src");
    std::fs::create_dir(&rich_src).unwrap();
    rich_tree(&rich_src);
    let rich = t.path().join("rich.tar");
    run_ok(
        Command::new("tar")
            .args([
                "--format=pax",
                "--xattrs",
                "--xattrs-include=user.*",
                "--sparse",
                "--numeric-owner",
                "-cf",
            ])
            .arg(&rich)
            .arg("-C")
            .arg(&rich_src)
            .arg("."),
    );
    let alpine_copy = t.path().join("alpine.tar.gz");
    std::fs::copy(&alpine, &alpine_copy).unwrap();
    for (archive, name) in [(&alpine_copy, "alpine"), (&rich, "rich")] {
        let ours = t.path().join(format!("ours-{name}"));
        let out = output(
            command_as(&user, &bin("ovl-import"))
                .arg(archive)
                .arg(&ours),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        let gnu = t.path().join(format!("gnu-{name}"));
        gnu_tar_extract(archive, &gnu);
        // GNU tar as root gives container ids; ours are those ids through the user's map.
        // Rootless can't make real devices (counted as skipped) nor set trusted.* xattrs.
        let opts = SnapshotOptions {
            ignore_xattr_prefixes: vec!["trusted.".into()],
            ..Default::default()
        };
        let mut want = snapshot(&gnu, &opts).unwrap();
        want.retain(|_, e| e.kind != 'c' && e.kind != 'b');
        let maps = ovl_tests::rootless_maps(&user);
        assert!(maps.has_subordinate_ids());
        for e in want.values_mut() {
            e.uid = maps.uid.to_host(e.uid).unwrap();
            e.gid = maps.gid.to_host(e.gid).unwrap();
        }
        let got = snapshot(&ours, &opts).unwrap();
        let diff = differences(&got, &want);
        assert!(
            diff.is_empty(),
            "rootless {name} import differs from GNU tar through the id map:\n{}",
            diff.join("\n")
        );
        if name == "rich" {
            assert!(
                stderr.contains("(2 devices"),
                "the two devices must be counted as skipped: {stderr}"
            );
        }
        if name == "alpine" {
            let shadow = std::fs::symlink_metadata(ours.join("etc/shadow")).unwrap();
            assert_eq!(
                Some(shadow.gid()),
                maps.gid.to_host(42),
                "/etc/shadow (gid 42) lands as the mapped gid"
            );
            assert_ne!(shadow.gid(), 42);
        }
    }
}

#[test]
fn rootless_without_subordinate_ids_records_owners_in_the_rootlesscontainers_xattr() {
    let Some(user) = ovl_tests::require_test_user_without_subids() else {
        return;
    };
    let t = ovl_tests::user_tempdir(&user);
    let mut b = tar::Builder::new(Vec::new());
    for (path, uid, gid) in [
        ("owned-by-root", 0, 0),
        ("shadow", 0, 42),
        ("bob", 1000, 300),
    ] {
        let mut h = Layer::header();
        h.set_mode(0o640);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_size(1);
        b.append_data(&mut h, path, &b"x"[..]).unwrap();
    }
    let mut h = Layer::header();
    h.set_size(0);
    b.append_data(&mut h, ".wh.gone", std::io::empty()).unwrap();
    let archive = t.path().join("a.tar");
    std::fs::write(&archive, b.into_inner().unwrap()).unwrap();
    let dest = t.path().join("dest");
    let out = output(
        command_as(&user, &bin("ovl-import"))
            .arg(&archive)
            .arg(&dest),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("no subordinate ids"),
        "the single-id map must be said: {stderr}"
    );
    for f in ["owned-by-root", "shadow", "bob"] {
        let m = std::fs::symlink_metadata(dest.join(f)).unwrap();
        assert_eq!((m.uid(), m.gid()), (user.uid, user.gid), "{f}");
    }
    assert_eq!(
        xattr(&dest.join("owned-by-root"), "user.rootlesscontainers"),
        None
    );
    assert_eq!(
        xattr(&dest.join("shadow"), "user.rootlesscontainers"),
        Some(vec![0x10, 42])
    );
    assert_eq!(
        xattr(&dest.join("bob"), "user.rootlesscontainers"),
        Some(vec![0x08, 0xe8, 0x07, 0x10, 0xac, 0x02])
    );
    // Whiteouts still work: mknod 0/0 is allowed in a user namespace.
    assert!(is_whiteout(&dest.join("gone")));
}

#[test]
fn a_progress_bar_is_drawn_on_a_terminal_and_never_with_quiet() {
    if !require(
        "script (util-linux) for a pseudo-terminal",
        which("script").is_some(),
    ) {
        return;
    }
    let Some(alpine) = ovl_tests::alpine_minirootfs() else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let on_tty = |extra: &str, dest: &str| {
        let log = t.path().join(format!("{dest}.log"));
        let cmd = format!(
            "{} {extra} {} {}",
            bin("ovl-import").display(),
            alpine.display(),
            t.path().join(dest).display()
        );
        run_ok(
            Command::new("script")
                .args(["-qec", &cmd])
                .arg(&log)
                .stdin(Stdio::null()),
        );
        String::from_utf8_lossy(&std::fs::read(&log).unwrap()).into_owned()
    };
    let shown = on_tty("", "a");
    assert!(
        shown.contains("import [") && shown.contains("MiB"),
        "no bar on a terminal: {shown:?}"
    );
    assert!(
        shown.contains("ovl-import: ") && shown.contains(" entries, "),
        "no summary: {shown:?}"
    );
    let quiet = on_tty("--quiet", "b");
    assert!(
        !quiet.contains("import [") && !quiet.contains(" entries, "),
        "--quiet printed: {quiet:?}"
    );
}

#[test]
fn an_inherited_reexec_marker_does_not_skip_the_user_namespace() {
    let Some(user) = ovl_tests::require_test_user() else {
        return;
    };
    if !require("newuidmap (package uidmap)", which("newuidmap").is_some()) {
        return;
    }
    let t = ovl_tests::user_tempdir(&user);
    let mut b = tar::Builder::new(Vec::new());
    let mut h = Layer::header();
    h.set_gid(42);
    h.set_size(1);
    b.append_data(&mut h, "shadow", &b"x"[..]).unwrap();
    let archive = t.path().join("a.tar");
    std::fs::write(&archive, b.into_inner().unwrap()).unwrap();
    let dest = t.path().join("dest");
    // The marker set by hand (or leaked from a parent) in the initial namespace.
    let mut cmd = command_as(&user, Path::new("/usr/bin/env"));
    cmd.arg(format!("{}=1", ovl_layer::ENV_IN_USERNS))
        .arg(bin("ovl-import"))
        .arg("--quiet")
        .arg(&archive)
        .arg(&dest);
    run_ok(&mut cmd);
    let gid = std::fs::symlink_metadata(dest.join("shadow"))
        .unwrap()
        .gid();
    assert_eq!(Some(gid), ovl_tests::rootless_maps(&user).gid.to_host(42));
}

/// Many writers (`--writers 4`, more than this machine has cores) give the tree one writer
/// gives, on the entries whose order matters: a file replaced after a hardlink to it was made
/// (the link keeps the first content), a directory replaced by a file while files below it
/// are still being written, a file replaced by a directory, whiteouts and opaque markers, a
/// read-only directory, files of several writer pieces, and many small files.
#[test]
fn many_writers_give_the_tree_one_writer_gives() {
    if !require("root", is_root()) {
        return;
    }
    let big = |seed: u8| -> Vec<u8> { (0..3_000_000u32).map(|i| (i % 251) as u8 ^ seed).collect() };
    let mut l = Layer::new()
        .dir("d")
        .file_meta("d/a", &big(1), 0o644, 1)
        .hardlink("d/b", "d/a")
        .file_meta("d/a", &big(2), 0o4755, 2)
        .hardlink("d/c", "d/a")
        .dir("y")
        .file_meta("y/f", &big(3), 0o644, 3)
        .file_meta("y", b"y is a file now", 0o600, 4)
        .file("x", b"x is a directory next")
        .dir("x")
        .file("x/f", b"below x")
        .file(".wh.gone", b"")
        .dir("w")
        .file("w/.wh..wh..opq", b"")
        .file("w/k", b"kept");
    for i in 0..300 {
        l = l.file_meta(
            &format!("many/{i}"),
            &vec![i as u8; i * 37],
            0o640,
            i as u64,
        );
    }
    // A read-only directory: its mode comes last, after the writers are done below it.
    let mut h = Layer::header();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o555);
    h.set_mtime(9);
    h.set_size(0);
    l.0.append_data(&mut h, "d", std::io::empty()).unwrap();
    let t = tempfile::tempdir().unwrap();
    let archive = t.path().join("l.tar");
    std::fs::write(&archive, l.bytes()).unwrap();
    let (one, many) = (t.path().join("one"), t.path().join("many"));
    run_ok(
        import_cmd()
            .args(["-q", "--writers=1"])
            .arg(&archive)
            .arg(&one),
    );
    run_ok(
        import_cmd()
            .args(["-q", "--writers=4"])
            .arg(&archive)
            .arg(&many),
    );
    // From a stream, the data goes to the writers in memory; from a file, the bigger files
    // are copied from it.
    let streamed = t.path().join("streamed");
    run_ok(
        import_cmd()
            .args(["-q", "--writers=4", "-"])
            .arg(&streamed)
            .stdin(std::fs::File::open(&archive).unwrap()),
    );
    let opts = SnapshotOptions {
        skip_root: true,
        ..strict()
    };
    // A whiteout's mtime is when it was made, not content.
    let snap = |p: &Path| {
        let mut s = snapshot(p, &opts).unwrap();
        s.get_mut(&b"gone"[..]).expect("the whiteout").mtime = (0, 0);
        s
    };
    let want = snap(&one);
    for dir in [&many, &streamed] {
        let diff = differences(&want, &snap(dir));
        assert!(
            diff.is_empty(),
            "1 writer, then 4 into {}:\n{}",
            dir.display(),
            diff.join("\n")
        );
    }
    // And the tree is the right one, not merely the same wrong one.
    assert_eq!(std::fs::read(many.join("d/b")).unwrap(), big(1));
    assert_eq!(std::fs::read(many.join("d/c")).unwrap(), big(2));
    let a = std::fs::metadata(many.join("d/a")).unwrap();
    assert_eq!((a.mode() & 0o7777, a.mtime(), a.nlink()), (0o4755, 2, 2));
    assert_eq!(std::fs::read(many.join("y")).unwrap(), b"y is a file now");
    assert_eq!(std::fs::read(many.join("x/f")).unwrap(), b"below x");
    assert!(is_whiteout(&many.join("gone")));
    assert_eq!(
        xattr(&many.join("w"), "trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    let d = std::fs::metadata(many.join("d")).unwrap();
    assert_eq!((d.mode() & 0o7777, d.mtime()), (0o555, 9));
}
