//! Lower lists across the tools: one string means the same layers to ovl-mount, ovl-diff,
//! ovl-squash and the kernel, and what ovl-import prints is such a string.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use ovl_tests::{bin, is_root, output, require, run_ok};

fn root() -> bool {
    require("root", is_root())
}

fn os(b: &[u8]) -> &OsStr {
    OsStr::from_bytes(b)
}

/// Unmounts (lazily) on drop.
struct Mount(PathBuf);
impl Drop for Mount {
    fn drop(&mut self) {
        let _ = rustix::mount::unmount(&self.0, rustix::mount::UnmountFlags::DETACH);
    }
}

/// `a:b` holds `f` = "colon"; the decoys `a\` and `b` (what a split that ignores the escape
/// reads) hold other contents.
fn colon_dirs(t: &Path) {
    for (d, content) in [("a:b", "colon"), ("a\\", "backslash"), ("b", "b")] {
        std::fs::create_dir(t.join(d)).unwrap();
        std::fs::write(t.join(d).join("f"), content).unwrap();
    }
}

const ESCAPED: &str = "a\\:b";

/// A temporary directory with [`colon_dirs`] in it, as root.
fn colon_setup() -> Option<tempfile::TempDir> {
    if !root() {
        return None;
    }
    let t = tempfile::tempdir().unwrap();
    colon_dirs(t.path());
    Some(t)
}

fn mkdir(t: &Path, p: &str) -> PathBuf {
    std::fs::create_dir(t.join(p)).unwrap();
    t.join(p)
}

#[test]
fn an_escaped_colon_names_the_dir_a_colon_b_to_ovl_mount() {
    let Some(t) = colon_setup() else {
        return;
    };
    let t = t.path();
    // The merged view shows a:b's file.
    let merged = mkdir(t, "m");
    let out = run_ok(
        Command::new(bin("ovl-mount"))
            .current_dir(t)
            .args(["--lower", ESCAPED])
            .arg(&merged)
            .args(["--", "cat", "f"]),
    );
    assert_eq!(out, b"colon", "ovl-mount");
}

#[test]
fn an_escaped_colon_names_the_dir_a_colon_b_to_ovl_squash() {
    let Some(t) = colon_setup() else {
        return;
    };
    let t = t.path();
    // The result holds a:b's file under the upper's.
    let upper = mkdir(t, "u");
    std::fs::write(upper.join("g"), "g").unwrap();
    run_ok(Command::new(bin("ovl-squash")).current_dir(t).args([
        "--quiet", "--lower", ESCAPED, "--upper", "u", "--output", "out",
    ]));
    assert_eq!(
        std::fs::read(t.join("out/f")).unwrap(),
        b"colon",
        "ovl-squash"
    );
    assert_eq!(std::fs::read(t.join("out/g")).unwrap(), b"g", "ovl-squash");
}

#[test]
fn an_escaped_colon_names_the_dir_a_colon_b_to_ovl_diff() {
    let Some(t) = colon_setup() else {
        return;
    };
    let t = t.path();
    // A metacopy upper (metadata only, its data in the lower) exports a:b's data.
    let (mu, mw, mm) = (mkdir(t, "mu"), mkdir(t, "mw"), mkdir(t, "mm"));
    let opts = format!(
        "lowerdir={},upperdir={},workdir={},metacopy=on,redirect_dir=on",
        ovl_layer::join_lowers(&[t.join("a:b")]).to_str().unwrap(),
        mu.display(),
        mw.display()
    );
    let opts = std::ffi::CString::new(opts).unwrap();
    rustix::mount::mount(
        "overlay",
        &mm,
        "overlay",
        rustix::mount::MountFlags::empty(),
        opts.as_c_str(),
    )
    .expect("mount a metacopy overlay");
    let m = Mount(mm.clone());
    std::fs::set_permissions(
        mm.join("f"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    drop(m);
    assert!(
        xattr::get(mu.join("f"), "trusted.overlay.metacopy")
            .unwrap()
            .is_some(),
        "the kernel made no metacopy upper"
    );
    let layer = run_ok(
        Command::new(bin("ovl-diff"))
            .current_dir(t)
            .args(["--quiet", "--lower", ESCAPED])
            .arg(&mu),
    );
    let mut ar = tar::Archive::new(&layer[..]);
    let mut found = None;
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        if e.path().unwrap() == Path::new("f") {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut e, &mut s).unwrap();
            found = Some(s);
        }
    }
    assert_eq!(found.as_deref(), Some("colon"), "ovl-diff");
}

#[test]
fn lowers_with_odd_bytes_mount_with_every_mechanism() {
    if !root() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    // Not UTF-8, a comma (mount(2) splits options there), a backslash and a colon.
    let odd = t.path().join(os(b"low\xff,x\\y:z"));
    let plain = t.path().join("plain");
    for (d, f) in [(&odd, "top"), (&plain, "bottom")] {
        std::fs::create_dir(d).unwrap();
        std::fs::write(d.join(f), f).unwrap();
    }
    let merged = t.path().join("m");
    std::fs::create_dir(&merged).unwrap();
    let list = ovl_layer::join_lowers(&[&odd, &plain]);
    for extra in [&[][..], &["--legacy-mount-api"][..]] {
        let out = run_ok(
            Command::new(bin("ovl-mount"))
                .args(extra)
                .arg("--lower")
                .arg(&list)
                .arg(&merged)
                .args(["--", "cat", "top", "bottom"]),
        );
        assert_eq!(out, b"topbottom", "{extra:?}");
    }
    // fuse-overlayfs takes the comma, the backslash and the byte; it cannot take a colon.
    if !require(
        "fuse-overlayfs",
        ovl_tests::which("fuse-overlayfs").is_some(),
    ) {
        return;
    }
    let fuse_odd = t.path().join(os(b"fuse\xff,x\\y"));
    std::fs::create_dir(&fuse_odd).unwrap();
    std::fs::write(fuse_odd.join("top"), "top").unwrap();
    let (u, w) = (t.path().join(os(b"u,\xfe")), t.path().join("w"));
    let out = run_ok(
        Command::new(bin("ovl-mount"))
            .args(["--driver", "fuse", "--lower"])
            .arg(ovl_layer::join_lowers(&[&fuse_odd, &plain]))
            .arg("--upper")
            .arg(&u)
            .arg("--work")
            .arg(&w)
            .arg(&merged)
            .args(["--", "sh", "-c", "cat top bottom && echo new > new"]),
    );
    assert_eq!(out, b"topbottom");
    assert_eq!(std::fs::read(u.join("new")).unwrap(), b"new\n");
    let out = output(
        Command::new(bin("ovl-mount"))
            .args(["--driver", "fuse", "--lower"])
            .arg(&list)
            .arg(&merged)
            .args(["--", "true"]),
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("fuse-overlayfs, which splits"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sha256(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

/// A minimal OCI image layout at `dir` with these uncompressed layers (bottom first), tag v1.
fn oci_layout(dir: &Path, layers: &[Vec<u8>]) {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |data: &[u8]| {
        let d = sha256(data);
        std::fs::write(blobs.join(&d), data).unwrap();
        d
    };
    let descs: Vec<String> = layers
        .iter()
        .map(|l| {
            format!(
                r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:{}","size":{}}}"#,
                put(l),
                l.len()
            )
        })
        .collect();
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{}","size":{}}},"layers":[{}]}}"#,
        put(config),
        config.len(),
        descs.join(",")
    );
    let index = format!(
        r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:{}","size":{},"annotations":{{"org.opencontainers.image.ref.name":"v1"}}}}]}}"#,
        put(manifest.as_bytes()),
        manifest.len()
    );
    std::fs::write(dir.join("index.json"), index).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

fn layer_with(name: &str, data: &[u8]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_uid(0);
    h.set_gid(0);
    h.set_mode(0o644);
    h.set_mtime(1_700_000_000);
    h.set_size(data.len() as u64);
    b.append_data(&mut h, name, data).unwrap();
    b.into_inner().unwrap()
}

#[test]
fn the_lowerdir_string_ovl_import_prints_parses_back_and_mounts() {
    if !root() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let image = t.path().join("image");
    oci_layout(
        &image,
        &[layer_with("f", b"bottom"), layer_with("f", b"top")],
    );
    // A DEST whose name needs every escape, and a byte that is not UTF-8.
    let dest = t.path().join(os(b"im:g\\x,y\xff"));
    let mut source = OsString::from("oci:");
    source.push(&image);
    source.push(":v1");
    let printed = run_ok(
        Command::new(bin("ovl-import"))
            .arg("--quiet")
            .arg(&source)
            .arg(&dest),
    );
    let printed = OsString::from_vec(printed.strip_suffix(b"\n").unwrap().to_vec());
    assert_eq!(
        ovl_layer::parse_lowers(&printed).unwrap(),
        [dest.join("1"), dest.join("0")]
    );
    // The kernel reads it as the same two layers (mount(2), the string as printed).
    let merged = t.path().join("m");
    std::fs::create_dir(&merged).unwrap();
    let mut opts = b"lowerdir=".to_vec();
    opts.extend_from_slice(printed.as_bytes());
    let opts = std::ffi::CString::new(opts).unwrap();
    rustix::mount::mount(
        "overlay",
        &merged,
        "overlay",
        rustix::mount::MountFlags::RDONLY,
        opts.as_c_str(),
    )
    .expect("the kernel takes the printed lowerdir string");
    let m = Mount(merged.clone());
    assert_eq!(std::fs::read(merged.join("f")).unwrap(), b"top");
    drop(m);
    // And mount(8), given the string on its command line (without the comma libmount would
    // split on, which no escape protects there).
    let plain = t.path().join(os(b"im:g\\x\xfe"));
    let printed = run_ok(
        Command::new(bin("ovl-import"))
            .arg("--quiet")
            .arg(&source)
            .arg(&plain),
    );
    let mut opt = OsString::from("lowerdir=");
    opt.push(OsStr::from_bytes(printed.strip_suffix(b"\n").unwrap()));
    run_ok(
        Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o"])
            .arg(&opt)
            .arg(&merged),
    );
    let m = Mount(merged.clone());
    assert_eq!(std::fs::read(merged.join("f")).unwrap(), b"top");
    drop(m);
}
