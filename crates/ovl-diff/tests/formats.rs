//! ovl-diff on hand-built uppers in every format, through the real binary, with the exact tar
//! listing each must give: kernel 0/0 whiteouts (one shared inode) and opaque xattrs in both
//! namespaces, xattr whiteouts, fuse-overlayfs's markers, redirect_dir and metacopy uppers made
//! by a real mount, and the output rules (reproducible bytes, SOURCE_DATE_EPOCH, -o, a
//! terminal, --json, --oci-layout).

use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use ovl_tests::{is_root, require, run_ok};

const BIN: &str = env!("CARGO_BIN_EXE_ovl-diff");

fn mknod_whiteout(p: &Path) {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        p,
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
}

fn set_mtime(p: &Path, sec: i64, nsec: i64) {
    ovl_tests::set_times(p, sec, nsec as u32);
}

fn diff(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn layer_of(upper: &Path, extra: &[&str]) -> Vec<u8> {
    let out = Command::new(BIN)
        .arg("-q")
        .args(extra)
        .arg(upper)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ovl-diff failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// One line per entry: type, name, link target, mode, owner, size, mtime, device, xattrs.
fn listing(tar_bytes: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut ar = tar::Archive::new(tar_bytes);
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let h = e.header().clone();
        let mut name = String::from_utf8_lossy(&e.path_bytes()).into_owned();
        let ty = match h.entry_type() {
            tar::EntryType::Directory => "d",
            tar::EntryType::Regular => "f",
            tar::EntryType::Link => "h",
            tar::EntryType::Symlink => "l",
            tar::EntryType::Char => "c",
            tar::EntryType::Block => "b",
            tar::EntryType::Fifo => "p",
            _ => "?",
        };
        let mut xattrs = Vec::new();
        let mut mtime = h.mtime().unwrap().to_string();
        let mut sparse = None;
        if let Some(pax) = e.pax_extensions().unwrap() {
            for p in pax {
                let p = p.unwrap();
                let k = String::from_utf8_lossy(p.key_bytes()).into_owned();
                if let Some(x) = k.strip_prefix("SCHILY.xattr.") {
                    xattrs.push(format!("{x}={}", hex_or_text(p.value_bytes())));
                } else if k == "mtime" {
                    mtime = p.value().unwrap().to_string();
                } else if k == "GNU.sparse.realsize" {
                    sparse = Some(p.value().unwrap().to_string());
                } else if k == "GNU.sparse.name" {
                    // tar-rs does not read PAX sparse files: show the real name.
                    name = String::from_utf8_lossy(p.value_bytes()).into_owned();
                }
            }
        }
        let mut line = format!("{ty} {name}");
        if let Some(l) = e.link_name_bytes() {
            line.push_str(&format!(" -> {}", String::from_utf8_lossy(&l)));
        }
        line.push_str(&format!(
            " {:o} {}:{}",
            h.mode().unwrap(),
            h.uid().unwrap(),
            h.gid().unwrap()
        ));
        if let Some(real) = sparse {
            line.push_str(&format!(" sparse={real}"));
        } else if ty == "f" {
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            line.push_str(&format!(
                " size={} data={}",
                data.len(),
                hex_or_text(&data[..data.len().min(16)])
            ));
        }
        if ty == "c" || ty == "b" {
            line.push_str(&format!(
                " dev={},{}",
                h.device_major().unwrap().unwrap(),
                h.device_minor().unwrap().unwrap()
            ));
        }
        line.push_str(&format!(" t={mtime}"));
        if !xattrs.is_empty() {
            line.push_str(&format!(" x[{}]", xattrs.join(",")));
        }
        out.push(line);
    }
    out
}

fn hex_or_text(b: &[u8]) -> String {
    match std::str::from_utf8(b) {
        Ok(s) if s.chars().all(|c| !c.is_control()) => s.to_string(),
        _ => format!(
            "0x{}",
            b.iter().map(|x| format!("{x:02x}")).collect::<String>()
        ),
    }
}

fn assert_listing(got: &[String], want: &[&str]) {
    let want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    assert!(
        got == want,
        "tar listing differs\n--- got:\n{}\n--- want:\n{}",
        got.join("\n"),
        want.join("\n")
    );
}

/// A kernel upper as root writes it: 0/0 whiteouts sharing one inode, trusted opaque dirs,
/// overlay-private and escaped xattrs, capabilities, and exact metadata of every kind.
#[test]
fn kernel_root_upper() {
    if !require("root", is_root()) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let u = t.path().join("upper");
    std::fs::create_dir_all(u.join("etc/opq")).unwrap();
    std::fs::create_dir_all(u.join("var")).unwrap();
    mknod_whiteout(&u.join("etc/gone"));
    std::fs::hard_link(u.join("etc/gone"), u.join("var/gone-too")).unwrap();
    std::fs::hard_link(u.join("etc/gone"), u.join("var/also-gone")).unwrap();
    xattr::set(u.join("etc/opq"), "trusted.overlay.opaque", b"y").unwrap();
    std::fs::write(u.join("etc/opq/new"), b"new").unwrap();
    xattr::set(u.join("etc"), "trusted.overlay.impure", b"y").unwrap();
    std::fs::write(u.join("etc/conf"), b"conf").unwrap();
    xattr::set(u.join("etc/conf"), "trusted.overlay.origin", b"\x00\xfb").unwrap();
    xattr::set(u.join("etc/conf"), "trusted.overlay.overlay.kept", b"esc").unwrap();
    xattr::set(u.join("etc/conf"), "user.mine", b"mine").unwrap();
    xattr::set(u.join("etc/conf"), "trusted.other", b"t").unwrap();
    std::fs::hard_link(u.join("etc/conf"), u.join("var/conf-link")).unwrap();
    // v3 capabilities whose namespace root is 0 (cap_net_raw): exported as v2.
    let mut v3 = vec![0u8; 24];
    v3[..4].copy_from_slice(&0x0300_0001u32.to_le_bytes());
    v3[4..8].copy_from_slice(&(1u32 << 13).to_le_bytes());
    std::fs::write(u.join("var/ping"), b"ping").unwrap();
    std::fs::set_permissions(u.join("var/ping"), std::fs::Permissions::from_mode(0o755)).unwrap();
    xattr::set(u.join("var/ping"), "security.capability", &v3).unwrap();
    std::fs::write(u.join("var/suid"), b"s").unwrap();
    rustix::fs::chown(
        u.join("var/suid"),
        Some(rustix::fs::Uid::from_raw(1000)),
        Some(rustix::fs::Gid::from_raw(42)),
    )
    .unwrap();
    std::fs::set_permissions(u.join("var/suid"), std::fs::Permissions::from_mode(0o4750)).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        u.join("var/null"),
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::from_raw_mode(0o666),
        rustix::fs::makedev(1, 3),
    )
    .unwrap();
    std::fs::set_permissions(u.join("var/null"), std::fs::Permissions::from_mode(0o666)).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        u.join("var/fifo"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o640),
        0,
    )
    .unwrap();
    std::os::unix::fs::symlink("../etc/conf", u.join("var/sym")).unwrap();
    let long = format!("var/{}\u{e9}{}", "a".repeat(120), "b".repeat(10));
    std::fs::write(u.join(&long), b"long").unwrap();
    let raw = std::ffi::OsStr::from_bytes(b"var/caf\xe9");
    std::fs::write(u.join(raw), b"latin1").unwrap();
    let f = std::fs::File::create(u.join("var/sparse")).unwrap();
    f.set_len(3 << 20).unwrap();
    drop(f);
    for p in [
        "etc",
        "etc/opq",
        "etc/opq/new",
        "etc/conf",
        "var",
        "var/ping",
        "var/suid",
    ] {
        set_mtime(&u.join(p), 1_600_000_000, 0);
    }
    set_mtime(&u.join("var/fifo"), 1_600_000_000, 123_456_789);
    for p in ["var/null", "var/sym", "var/sparse", &long] {
        set_mtime(&u.join(p), 1_600_000_001, 0);
    }
    set_mtime(&u.join(raw), 1_600_000_001, 0);

    let layer = layer_of(&u, &[]);
    let long_line = format!("f {long} 644 0:0 size=4 data=long t=1600000001");
    assert_listing(
        &listing(&layer),
        &[
            "d etc/ 755 0:0 t=1600000000",
            "f etc/.wh.gone 644 0:0 size=0 data= t=0",
            "f etc/conf 644 0:0 size=4 data=conf t=1600000000 x[trusted.other=t,trusted.overlay.kept=esc,user.mine=mine]",
            "d etc/opq/ 755 0:0 t=1600000000",
            "f etc/opq/.wh..wh..opq 644 0:0 size=0 data= t=0",
            "f etc/opq/new 644 0:0 size=3 data=new t=1600000000",
            "d var/ 755 0:0 t=1600000000",
            "f var/.wh.also-gone 644 0:0 size=0 data= t=0",
            "f var/.wh.gone-too 644 0:0 size=0 data= t=0",
            &long_line,
            "f var/caf\u{fffd} 644 0:0 size=6 data=latin1 t=1600000001",
            "h var/conf-link -> etc/conf 644 0:0 t=1600000000",
            "p var/fifo 640 0:0 t=1600000000.123456789",
            "c var/null 666 0:0 dev=1,3 t=1600000001",
            "f var/ping 755 0:0 size=4 data=ping t=1600000000 x[security.capability=0x0100000200200000000000000000000000000000]",
            "f var/sparse 644 0:0 sparse=3145728 t=1600000001",
            "f var/suid 4750 1000:42 size=1 data=s t=1600000000",
            "l var/sym -> ../etc/conf 777 0:0 t=1600000001",
        ],
    );
    // No PAX `path` needed for the non-UTF-8 short name, but it is recorded as binary.
    assert!(layer.windows(17).any(|w| w == b"hdrcharset=BINARY"));
}

/// A rootless kernel upper (`userxattr`): the same forms in `user.overlay.*`, plus xattr
/// whiteouts (Linux >= 6.7) in both namespaces with their `opaque=x` parents.
#[test]
fn rootless_and_xattr_whiteout_upper() {
    if !require("root (for mknod and trusted xattrs)", is_root()) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let u = t.path().join("upper");
    std::fs::create_dir_all(u.join("a/opq")).unwrap();
    std::fs::create_dir_all(u.join("x")).unwrap();
    std::fs::create_dir_all(u.join("y")).unwrap();
    mknod_whiteout(&u.join("a/wh"));
    xattr::set(u.join("a/opq"), "user.overlay.opaque", b"y").unwrap();
    xattr::set(u.join("a"), "user.overlay.origin", b"o").unwrap();
    xattr::set(u.join("a"), "user.overlay.overlay.escaped", b"e").unwrap();
    std::fs::write(u.join("x/xwh"), b"").unwrap();
    xattr::set(u.join("x/xwh"), "user.overlay.whiteout", b"").unwrap();
    xattr::set(u.join("x"), "user.overlay.opaque", b"x").unwrap();
    std::fs::write(u.join("y/twh"), b"").unwrap();
    xattr::set(u.join("y/twh"), "trusted.overlay.whiteout", b"").unwrap();
    xattr::set(u.join("y"), "trusted.overlay.opaque", b"x").unwrap();
    // An empty file that is not a whiteout stays a file.
    std::fs::write(u.join("y/empty"), b"").unwrap();
    for p in ["a", "a/opq", "x", "y", "y/empty"] {
        set_mtime(&u.join(p), 1_500_000_000, 0);
    }
    assert_listing(
        &listing(&layer_of(&u, &[])),
        &[
            "d a/ 755 0:0 t=1500000000 x[user.overlay.escaped=e]",
            "f a/.wh.wh 644 0:0 size=0 data= t=0",
            "d a/opq/ 755 0:0 t=1500000000",
            "f a/opq/.wh..wh..opq 644 0:0 size=0 data= t=0",
            "d x/ 755 0:0 t=1500000000",
            "f x/.wh.xwh 644 0:0 size=0 data= t=0",
            "d y/ 755 0:0 t=1500000000",
            "f y/.wh.twh 644 0:0 size=0 data= t=0",
            "f y/empty 644 0:0 size=0 data= t=1500000000",
        ],
    );
}

/// fuse-overlayfs's own forms: `.wh.NAME` files, `.wh..wh..opq` + `.wh..opq` in opaque dirs,
/// `user.fuseoverlayfs.opaque` when rootless, and its private xattrs dropped.
#[test]
fn fuse_overlayfs_upper() {
    if !require("root (for mknod)", is_root()) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let u = t.path().join("upper");
    std::fs::create_dir_all(u.join("d/opq")).unwrap();
    std::fs::create_dir_all(u.join("d/ropq")).unwrap();
    std::fs::write(u.join("d/.wh.deleted"), b"").unwrap();
    std::fs::write(u.join("d/opq/.wh..wh..opq"), b"").unwrap();
    mknod_whiteout(&u.join("d/opq/.wh..opq"));
    std::fs::write(u.join("d/opq/kept"), b"k").unwrap();
    xattr::set(u.join("d/ropq"), "user.fuseoverlayfs.opaque", b"y").unwrap();
    xattr::set(u.join("d/opq/kept"), "user.fuseoverlayfs.origin", b"zz").unwrap();
    for p in ["d", "d/opq", "d/ropq", "d/opq/kept"] {
        set_mtime(&u.join(p), 1_400_000_000, 0);
    }
    // An opaque root (it hides every lower) is a marker at the top of the layer.
    xattr::set(&u, "user.fuseoverlayfs.opaque", b"y").unwrap();
    assert_listing(
        &listing(&layer_of(&u, &[])),
        &[
            "f .wh..wh..opq 644 0:0 size=0 data= t=0",
            "d d/ 755 0:0 t=1400000000",
            "f d/.wh.deleted 644 0:0 size=0 data= t=0",
            "d d/opq/ 755 0:0 t=1400000000",
            "f d/opq/.wh..wh..opq 644 0:0 size=0 data= t=0",
            "f d/opq/kept 644 0:0 size=1 data=k t=1400000000",
            "d d/ropq/ 755 0:0 t=1400000000",
            "f d/ropq/.wh..wh..opq 644 0:0 size=0 data= t=0",
        ],
    );
}

/// A real root mount with redirect_dir=on,metacopy=on: without --lower the upper is refused
/// (naming the path, writing nothing); with it, the renamed dir is a whiteout plus an opaque
/// dir with its full content, and the chmod'ed file's data comes from the lower.
#[test]
fn redirect_dir_and_metacopy_from_a_real_mount() {
    if !require("root", is_root()) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let (l, u, w, m) = (d.join("l"), d.join("u"), d.join("w"), d.join("m"));
    for p in [&l, &u, &w, &m] {
        std::fs::create_dir(p).unwrap();
    }
    std::fs::create_dir_all(l.join("old/sub")).unwrap();
    std::fs::write(l.join("old/sub/deep"), b"deep").unwrap();
    std::fs::write(l.join("old/keep"), b"keep").unwrap();
    std::fs::write(l.join("old/drop"), b"drop").unwrap();
    std::fs::write(l.join("data"), vec![7u8; 100_000]).unwrap();
    std::fs::create_dir(l.join("elsewhere")).unwrap();
    let opts = format!(
        "lowerdir={},upperdir={},workdir={},redirect_dir=on,metacopy=on",
        l.display(),
        u.display(),
        w.display()
    );
    let mount = Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &opts])
        .arg(&m)
        .output()
        .unwrap();
    if !require(
        "an overlay mount with redirect_dir=on,metacopy=on",
        mount.status.success(),
    ) {
        return;
    }
    let script = Command::new("sh")
        .args([
            "-c",
            "mv old new && rm new/drop && echo added > new/added && chmod 4755 data && mv data elsewhere/data2",
        ])
        .current_dir(&m)
        .output()
        .unwrap();
    let merged =
        ovl_tests::snapshot::snapshot(&m, &ovl_tests::scenario::compare_options()).unwrap();
    run_ok(Command::new("umount").arg(&m));
    assert!(
        script.status.success(),
        "{}",
        String::from_utf8_lossy(&script.stderr)
    );
    assert!(
        xattr::get(u.join("new"), "trusted.overlay.redirect")
            .unwrap()
            .is_some(),
        "the kernel did not record a redirect: this test would prove nothing"
    );
    assert!(
        xattr::get(u.join("elsewhere/data2"), "trusted.overlay.metacopy")
            .unwrap()
            .is_some()
    );

    // Refused without the lowers: an error that names the path, and no output file.
    let out_file = d.join("layer.tar");
    let o = diff(&[u.as_os_str(), "-o".as_ref(), out_file.as_os_str()]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--lower"), "{err}");
    assert!(err.contains(&format!("{}/", u.display())), "{err}");
    assert!(!out_file.exists());
    assert_eq!(
        std::fs::read_dir(d).unwrap().count(),
        4,
        "a temporary file was left"
    );

    let lower_arg = format!("--lower={}", l.display());
    let layer = layer_of(&u, &[&lower_arg]);
    let names: Vec<String> = listing(&layer)
        .iter()
        .map(|l| l.split(' ').take(2).collect::<Vec<_>>().join(" "))
        .collect();
    assert_eq!(
        names,
        [
            "f .wh.data",
            "f .wh.old",
            "d elsewhere/",
            "f elsewhere/data2",
            "d new/",
            "f new/.wh..wh..opq",
            "f new/added",
            "f new/keep",
            "d new/sub/",
            "f new/sub/deep",
        ]
    );
    let l2 = listing(&layer);
    assert!(
        l2.iter()
            .any(|x| x.starts_with("f elsewhere/data2 4755 0:0 size=100000 data=0x0707")),
        "{l2:?}"
    );

    // And applied by umoci onto the lower, it is the merged view.
    if !require("umoci", ovl_tests::which("umoci").is_some()) {
        return;
    }
    let base = d.join("base.tar");
    run_ok(
        Command::new("tar")
            .arg("-cf")
            .arg(&base)
            .arg("-C")
            .arg(&l)
            .arg("."),
    );
    let layer_path = d.join("layer.tar");
    std::fs::write(&layer_path, &layer).unwrap();
    let work = d.join("umoci");
    std::fs::create_dir(&work).unwrap();
    let rootfs = ovl_tests::scenario::umoci_apply(&work, &[&base, &layer_path]);
    let applied =
        ovl_tests::snapshot::snapshot(&rootfs, &ovl_tests::scenario::compare_options()).unwrap();
    let diffs = ovl_tests::snapshot::differences(&merged, &applied);
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
}

/// A PAX record `LEN KEY=VALUE\n` (LEN counts itself).
fn pax_record(key: &[u8], value: &[u8]) -> Vec<u8> {
    let body = [b" ", key, b"=", value, b"\n"].concat();
    let mut len = body.len() + 1;
    while len.to_string().len() + body.len() != len {
        len = len.to_string().len() + body.len();
    }
    [len.to_string().as_bytes(), &body].concat()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// An upper file's xattrs whose names are not UTF-8 are exported as GNU tar writes them: the
/// same `SCHILY.xattr.<name bytes>` records and no `hdrcharset` (GNU tar writes none for an
/// xattr name), which GNU tar reads back to the same names and values (`getfattr`); an escaped
/// one (`user.overlay.overlay.<bytes>`) is unescaped. Failed before: ovl-diff dropped them
/// silently.
#[test]
fn xattr_names_that_are_not_utf8_are_exported_as_gnu_tar_writes_them() {
    if !require(
        "getfattr (package attr)",
        ovl_tests::which("getfattr").is_some(),
    ) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let set = |p: &Path, n: &[u8], v: &[u8]| {
        xattr::set(p, std::ffi::OsStr::from_bytes(n), v).unwrap();
    };
    let u = t.path().join("upper");
    std::fs::create_dir(&u).unwrap();
    std::fs::write(u.join("f"), b"hi").unwrap();
    set(&u.join("f"), b"user.\xff\xfe", b"1");
    set(&u.join("f"), b"user.ok", b"2");
    set(&u.join("f"), b"user.overlay.overlay.\xfd", b"\x003");
    // The file as the layer must carry it, archived by GNU tar.
    let r = t.path().join("ref");
    std::fs::create_dir(&r).unwrap();
    std::fs::write(r.join("f"), b"hi").unwrap();
    set(&r.join("f"), b"user.\xff\xfe", b"1");
    set(&r.join("f"), b"user.ok", b"2");
    set(&r.join("f"), b"user.overlay.\xfd", b"\x003");
    let gnu = run_ok(
        Command::new("tar")
            .args(["--format=pax", "--xattrs", "--xattrs-include=*", "-cf", "-"])
            .arg("-C")
            .arg(&r)
            .arg("f"),
    );
    let ours = layer_of(&u, &[]);
    for (k, v) in [
        (&b"SCHILY.xattr.user.\xff\xfe"[..], &b"1"[..]),
        (b"SCHILY.xattr.user.ok", b"2"),
        (b"SCHILY.xattr.user.overlay.\xfd", b"\x003"),
    ] {
        let rec = pax_record(k, v);
        assert!(contains(&gnu, &rec), "GNU tar wrote no {rec:?}");
        assert!(contains(&ours, &rec), "ovl-diff wrote no {rec:?}");
    }
    assert!(!contains(&gnu, b"hdrcharset"), "GNU tar writes hdrcharset");
    assert!(
        !contains(&ours, b"hdrcharset"),
        "ovl-diff writes hdrcharset"
    );

    let layer = t.path().join("layer.tar");
    std::fs::write(&layer, &ours).unwrap();
    let out = t.path().join("out");
    std::fs::create_dir(&out).unwrap();
    run_ok(
        Command::new("tar")
            .args(["--xattrs", "--xattrs-include=*", "-xf"])
            .arg(&layer)
            .arg("-C")
            .arg(&out),
    );
    let want = ovl_tests::getfattr(&r, &[b"f"]);
    assert!(want.contains("user.\\xff\\xfe=0x31"), "{want}");
    assert_eq!(ovl_tests::getfattr(&out, &[b"f"]), want);
}

/// The same upper gives the same bytes for every compression and thread count;
/// SOURCE_DATE_EPOCH clamps mtimes.
#[test]
fn reproducible_and_clamped() {
    let t = tempfile::tempdir().unwrap();
    let u = t.path().join("upper");
    std::fs::create_dir_all(u.join("d")).unwrap();
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(u.join("d/big"), &data).unwrap();
    std::fs::write(u.join("d/small"), b"small").unwrap();
    set_mtime(&u.join("d/small"), 2_000_000_000, 5);
    for c in ["none", "gzip", "zstd"] {
        let one = layer_of(&u, &["--compress", c, "--threads", "1"]);
        for n in ["2", "4"] {
            assert!(
                one == layer_of(&u, &["--compress", c, "--threads", n]),
                "{c} with {n} threads differs from 1 thread"
            );
        }
    }
    let gz = layer_of(&u, &["--compress", "gzip"]);
    let mut tar_bytes = Vec::new();
    // Several gzip members (one per MiB of tar): `GzDecoder` would stop after the first.
    flate2::read::MultiGzDecoder::new(&gz[..])
        .read_to_end(&mut tar_bytes)
        .unwrap();
    assert!(tar_bytes == layer_of(&u, &[]));

    let clamped = Command::new(BIN)
        .args(["-q"])
        .arg(&u)
        .env("SOURCE_DATE_EPOCH", "1000000000")
        .output()
        .unwrap();
    assert!(clamped.status.success());
    let l = listing(&clamped.stdout);
    assert!(
        l.iter()
            .any(|x| x.starts_with("f d/small") && x.ends_with("t=1000000000")),
        "{l:?}"
    );
}

/// --json describes the blob as stored, -o replaces a file whole, stdout that is a terminal is
/// refused.
#[test]
fn json_output_file_and_terminal() {
    let t = tempfile::tempdir().unwrap();
    let u = t.path().join("upper");
    std::fs::create_dir_all(u.join("d")).unwrap();
    std::fs::write(u.join("d/f"), b"hello").unwrap();
    let out = t.path().join("layer.tar.gz");
    let json = t.path().join("desc.json");
    let o = diff(&[
        "--compress".as_ref(),
        "gzip".as_ref(),
        "-o".as_ref(),
        out.as_os_str(),
        "--json".as_ref(),
        json.as_os_str(),
        u.as_os_str(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let desc: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let blob = std::fs::read(&out).unwrap();
    use sha2::Digest;
    assert_eq!(
        desc["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    assert_eq!(desc["size"], blob.len());
    assert_eq!(
        desc["digest"],
        format!("sha256:{}", hex::encode(sha2::Sha256::digest(&blob)))
    );
    let mut tar_bytes = Vec::new();
    flate2::read::MultiGzDecoder::new(&blob[..])
        .read_to_end(&mut tar_bytes)
        .unwrap();
    assert_eq!(
        desc["diffID"],
        format!("sha256:{}", hex::encode(sha2::Sha256::digest(&tar_bytes)))
    );
    assert_eq!(
        std::fs::read_dir(t.path()).unwrap().count(),
        3,
        "a temporary file was left"
    );

    // A terminal on stdout: refused before anything is written.
    let script = ovl_tests::which("script");
    if require("script (for a terminal on stdout)", script.is_some()) {
        let o = Command::new(script.expect("checked"))
            .args(["-qec"])
            .arg(format!("{BIN} {}", u.display()))
            .arg("/dev/null")
            .output()
            .unwrap();
        assert!(!o.status.success());
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(text.contains("terminal"), "{text}");
    }
}

/// --oci-layout makes a layout, then appends: configs carry every diffID and a history entry,
/// the tag names the newest manifest, and umoci unpacks it.
#[test]
fn oci_layout_append() {
    let t = tempfile::tempdir().unwrap();
    let (u1, u2) = (t.path().join("u1"), t.path().join("u2"));
    std::fs::create_dir_all(u1.join("etc")).unwrap();
    std::fs::write(u1.join("etc/one"), b"1").unwrap();
    std::fs::create_dir_all(u2.join("etc")).unwrap();
    std::fs::write(u2.join("etc/two"), b"2").unwrap();
    mknod_or_wh(&u2.join("etc/one"), &u2);
    let layout = t.path().join("img");
    let spec = format!("{}:v1", layout.display());
    for (u, c) in [(&u1, "gzip"), (&u2, "zstd")] {
        let o = diff(&[
            "-q".as_ref(),
            "--compress".as_ref(),
            c.as_ref(),
            "--oci-layout".as_ref(),
            spec.as_ref(),
            u.as_os_str(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let read = |p: &Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    };
    let blob = |d: &serde_json::Value| {
        layout
            .join("blobs/sha256")
            .join(d["digest"].as_str().unwrap().trim_start_matches("sha256:"))
    };
    let index = read(&layout.join("index.json"));
    let manifests = index["manifests"].as_array().unwrap();
    assert_eq!(manifests.len(), 1);
    assert_eq!(
        manifests[0]["annotations"]["org.opencontainers.image.ref.name"],
        "v1"
    );
    let manifest = read(&blob(&manifests[0]));
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2);
    assert_eq!(
        layers[0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    assert_eq!(
        layers[1]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+zstd"
    );
    let config = read(&blob(&manifest["config"]));
    assert_eq!(config["rootfs"]["diff_ids"].as_array().unwrap().len(), 2);
    assert_eq!(config["history"].as_array().unwrap().len(), 2);
    let text = config.to_string();
    assert!(
        !text.contains(t.path().to_str().unwrap()),
        "a host path in the image config: {text}"
    );
    let leftovers: Vec<_> = std::fs::read_dir(layout.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.as_bytes().starts_with(b"."))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    if require(
        "root and umoci (to unpack the layout)",
        is_root() && ovl_tests::which("umoci").is_some(),
    ) {
        // umoci 0.4.7 reads gzip layers only: check the layout through the first image.
        let t2 = tempfile::tempdir().unwrap();
        let l2 = t2.path().join("img");
        let spec2 = format!("{}:v1", l2.display());
        let o = diff(&[
            "-q".as_ref(),
            "--compress".as_ref(),
            "gzip".as_ref(),
            "--oci-layout".as_ref(),
            spec2.as_ref(),
            u1.as_os_str(),
        ]);
        assert!(o.status.success());
        let rootfs = t2.path().join("rootfs");
        run_ok(
            Command::new("umoci")
                .args(["raw", "unpack", "--image", &spec2])
                .arg(&rootfs),
        );
        assert_eq!(std::fs::read(rootfs.join("etc/one")).unwrap(), b"1");
    }
}

/// A gzip layer of several members (one per MiB of tar) reads back whole, byte for byte, through
/// the readers a layer meets: gzip (`gzip -t`, `gzip -d`: GNU tar -z), bsdtar (libarchive), and
/// Go's pgzip in umoci and skopeo (containers/image, as podman); containerd's readers are Go's
/// compress/gzip, multistream by default like pgzip. A reader that stopped after the first
/// member would lose most of the big file.
#[test]
fn multi_member_gzip_reads_back_whole() {
    let t = tempfile::tempdir().unwrap();
    let u = t.path().join("upper");
    std::fs::create_dir_all(u.join("d")).unwrap();
    // Compressible, not trivial: about 4 MiB of tar, so 4 or 5 members.
    let mut x = 0x2545_f491u32;
    let big: Vec<u8> = (0..4_000_000)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            if i % 3 == 0 {
                (x % 251) as u8
            } else {
                b'a' + (i % 26) as u8
            }
        })
        .collect();
    std::fs::write(u.join("d/big"), &big).unwrap();
    std::fs::write(u.join("d/last"), b"the end").unwrap();
    let plain = layer_of(&u, &[]);
    let gz_path = t.path().join("layer.tar.gz");
    let o = diff(&[
        "-q".as_ref(),
        "--compress".as_ref(),
        "gzip".as_ref(),
        "-o".as_ref(),
        gz_path.as_os_str(),
        u.as_os_str(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let gz = std::fs::read(&gz_path).unwrap();
    let members = gz
        .windows(10)
        .filter(|w| w == &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3])
        .count();
    assert!(members >= 4, "{members} gzip member headers");

    if require("gzip", ovl_tests::which("gzip").is_some()) {
        run_ok(Command::new("gzip").arg("-t").arg(&gz_path));
        let o = Command::new("gzip")
            .arg("-dc")
            .arg(&gz_path)
            .output()
            .unwrap();
        assert!(o.status.success());
        assert!(o.stdout == plain, "gzip -d gives another tar");
    }
    if require("bsdtar", ovl_tests::which("bsdtar").is_some()) {
        let x = t.path().join("bsdtar");
        std::fs::create_dir(&x).unwrap();
        run_ok(
            Command::new("bsdtar")
                .arg("-xzf")
                .arg(&gz_path)
                .arg("-C")
                .arg(&x),
        );
        assert!(
            std::fs::read(x.join("d/big")).unwrap() == big,
            "bsdtar: d/big differs"
        );
        assert_eq!(std::fs::read(x.join("d/last")).unwrap(), b"the end");
    }
    let layout = t.path().join("img");
    let spec = format!("{}:v1", layout.display());
    let o = diff(&[
        "-q".as_ref(),
        "--compress".as_ref(),
        "gzip".as_ref(),
        "--oci-layout".as_ref(),
        spec.as_ref(),
        u.as_os_str(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    if require(
        "root and umoci (to unpack the layout)",
        is_root() && ovl_tests::which("umoci").is_some(),
    ) {
        let rootfs = t.path().join("umoci");
        run_ok(
            Command::new("umoci")
                .args(["raw", "unpack", "--image", &spec])
                .arg(&rootfs),
        );
        assert!(
            std::fs::read(rootfs.join("d/big")).unwrap() == big,
            "umoci: d/big differs"
        );
        assert_eq!(std::fs::read(rootfs.join("d/last")).unwrap(), b"the end");
    }
    if require("skopeo", ovl_tests::which("skopeo").is_some()) {
        // Decompressed by containers/image into a dir: transport, which checks the diffID.
        let out = t.path().join("skopeo");
        run_ok(
            Command::new("skopeo")
                .args(["--insecure-policy", "copy", "--dest-decompress"])
                .arg(format!("oci:{spec}"))
                .arg(format!("dir:{}", out.display())),
        );
        let found = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| std::fs::read(e.unwrap().path()).unwrap())
            .any(|b| b == plain);
        assert!(found, "skopeo: no blob is the uncompressed layer");
    }
}

/// `--level N` and gzip's `-N` are one option; out of range, or with no compression, it is
/// refused, naming the range.
#[test]
fn compression_levels() {
    let t = tempfile::tempdir().unwrap();
    let u = t.path().join("upper");
    std::fs::create_dir_all(&u).unwrap();
    // Words and numbers in a pseudo-random order: each level finds other matches.
    let words = [
        "overlay", "layer", "whiteout", "opaque", "tar", "gzip", "lower", "upper",
    ];
    let mut x = 0x9e37_79b9u32;
    let text: Vec<u8> = (0..300_000)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            format!("{}{} ", words[(x % 8) as usize], (x >> 8) % 100).into_bytes()
        })
        .collect();
    std::fs::write(u.join("text"), &text).unwrap();
    let default = layer_of(&u, &["--compress", "gzip"]);
    let one = layer_of(&u, &["--compress", "gzip", "-1"]);
    assert!(one == layer_of(&u, &["--compress", "gzip", "--level", "1"]));
    let nine = layer_of(&u, &["--compress", "gzip", "-9"]);
    assert!(one.len() > default.len() && default.len() > nine.len());
    assert!(layer_of(&u, &["--compress", "zstd", "-1"]) != layer_of(&u, &["--compress", "zstd"]));
    for (args, msg) in [
        (
            &["--compress", "gzip", "--level", "13"][..],
            "gzip takes 1 to 12",
        ),
        (
            &["--compress", "zstd", "--level", "20"][..],
            "zstd takes 1 to 19",
        ),
        (&["-6"][..], "--level needs --compress gzip or zstd"),
    ] {
        let o = Command::new(BIN)
            .arg("-q")
            .args(args)
            .arg(&u)
            .output()
            .unwrap();
        assert!(!o.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(msg), "{args:?}: {err}");
    }
}

/// A whiteout in the form this process can make: a 0/0 device as root, else a fuse-overlayfs
/// `.wh.` file.
fn mknod_or_wh(p: &Path, _upper: &Path) {
    if is_root() {
        mknod_whiteout(p);
    } else {
        let name = p.file_name().unwrap().as_bytes();
        std::fs::write(
            p.with_file_name(std::ffi::OsStr::from_bytes(&[b".wh.", name].concat())),
            b"",
        )
        .unwrap();
    }
}

/// Run by the unprivileged owner outside any namespace, host ids come out as container ids
/// (through the user's subordinate ranges), and an id outside them is refused, never written.
#[test]
fn rootless_owner_gets_container_ids() {
    let Some(user) = ovl_tests::require_test_user() else {
        return;
    };
    let t = ovl_tests::user_tempdir(&user);
    let u = t.path().join("upper");
    std::fs::create_dir_all(u.join("etc")).unwrap();
    std::fs::write(u.join("etc/shadow"), b"secret").unwrap();
    std::fs::set_permissions(u.join("etc/shadow"), std::fs::Permissions::from_mode(0o640)).unwrap();
    std::fs::write(u.join("etc/mine"), b"mine").unwrap();
    let own = |p: &Path, uid: u32, gid: u32| {
        rustix::fs::chown(
            p,
            Some(rustix::fs::Uid::from_raw(uid)),
            Some(rustix::fs::Gid::from_raw(gid)),
        )
        .unwrap()
    };
    own(&u, user.uid, user.gid);
    own(&u.join("etc"), user.uid, user.gid);
    // Where container ids live on the host for this user (the same idmap code as the tools).
    let maps = ovl_layer::RootlessMaps::for_user(
        &user.name,
        user.uid,
        user.gid,
        Path::new("/etc/subuid"),
        Path::new("/etc/subgid"),
    )
    .unwrap();
    assert!(maps.has_subordinate_ids());
    let host_uid = |c: u32| maps.uid.to_host(c).unwrap();
    let host_gid = |c: u32| maps.gid.to_host(c).unwrap();
    own(&u.join("etc/shadow"), user.uid, host_gid(42));
    own(&u.join("etc/mine"), host_uid(1000), host_gid(1000));
    // nobody (65534) is a real container id: kept apart from unmapped host ids.
    std::fs::write(u.join("etc/nobody"), b"n").unwrap();
    own(&u.join("etc/nobody"), host_uid(65534), host_gid(65534));
    for p in ["etc", "etc/shadow", "etc/mine", "etc/nobody"] {
        set_mtime(&u.join(p), 1_300_000_000, 0);
    }
    let out = ovl_tests::command_as(&user, Path::new(BIN))
        .arg("-q")
        .arg(&u)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_listing(
        &listing(&out.stdout),
        &[
            "d etc/ 755 0:0 t=1300000000",
            "f etc/mine 644 1000:1000 size=4 data=mine t=1300000000",
            "f etc/nobody 644 65534:65534 size=1 data=n t=1300000000",
            "f etc/shadow 640 0:42 size=6 data=secret t=1300000000",
        ],
    );

    // A host id outside the user's ranges (here root's) cannot be expressed: refused.
    own(&u.join("etc/mine"), 0, 0);
    let out = ovl_tests::command_as(&user, Path::new(BIN))
        .arg("-q")
        .arg(&u)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("etc/mine") && err.contains("does not map"),
        "{err}"
    );
}

/// An `overlay.whiteout` file is a whiteout only in a directory marked `overlay.opaque=x`
/// (overlayfs.rst, "whiteouts and opaque directories"): elsewhere it is an ordinary empty file
/// of the merged view, and its private xattr is dropped.
#[test]
fn xattr_whiteout_without_an_opaque_x_parent_is_a_file() {
    let t = tempfile::tempdir().unwrap();
    let u = t.path().join("upper");
    std::fs::create_dir_all(u.join("plain")).unwrap();
    std::fs::create_dir_all(u.join("x")).unwrap();
    std::fs::write(u.join("plain/f"), b"").unwrap();
    xattr::set(u.join("plain/f"), "user.overlay.whiteout", b"").unwrap();
    std::fs::write(u.join("x/f"), b"").unwrap();
    xattr::set(u.join("x/f"), "user.overlay.whiteout", b"").unwrap();
    xattr::set(u.join("x"), "user.overlay.opaque", b"x").unwrap();
    for p in ["plain", "plain/f", "x"] {
        set_mtime(&u.join(p), 1_500_000_000, 0);
    }
    assert_listing(
        &listing(&layer_of(&u, &[])),
        &[
            "d plain/ 755 0:0 t=1500000000",
            "f plain/f 644 0:0 size=0 data= t=1500000000",
            "d x/ 755 0:0 t=1500000000",
            "f x/.wh.f 644 0:0 size=0 data= t=0",
        ],
    );
}

/// Sockets cannot be in a tar: a second name of a socket must not become a link entry to a
/// name the layer does not hold.
#[test]
fn hardlinked_sockets_leave_no_dangling_link() {
    let t = tempfile::tempdir().unwrap();
    let u = t.path().join("upper");
    std::fs::create_dir_all(u.join("run")).unwrap();
    let _l = std::os::unix::net::UnixListener::bind(u.join("run/a.sock")).unwrap();
    std::fs::hard_link(u.join("run/a.sock"), u.join("run/b.sock")).unwrap();
    std::fs::write(u.join("run/z"), b"z").unwrap();
    set_mtime(&u.join("run"), 1_500_000_000, 0);
    set_mtime(&u.join("run/z"), 1_500_000_000, 0);
    assert_listing(
        &listing(&layer_of(&u, &[])),
        &[
            "d run/ 755 0:0 t=1500000000",
            "f run/z 644 0:0 size=1 data=z t=1500000000",
        ],
    );
}

/// Appends to one layout at the same time (a fresh layout included) all land: index.json is
/// read, updated and replaced by one writer at a time, never a lost update.
#[test]
fn oci_layout_concurrent_appends() {
    let t = tempfile::tempdir().unwrap();
    let layout = t.path().join("img");
    let spec = format!("{}:v1", layout.display());
    let n = 8;
    let uppers: Vec<_> = (0..n)
        .map(|i| {
            let u = t.path().join(format!("u{i}"));
            std::fs::create_dir_all(&u).unwrap();
            std::fs::write(u.join(format!("f{i}")), format!("{i}")).unwrap();
            u
        })
        .collect();
    let children: Vec<_> = uppers
        .iter()
        .map(|u| {
            Command::new(BIN)
                .args(["-q", "--oci-layout", &spec])
                .arg(u)
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let read = |p: &Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    };
    let index = read(&layout.join("index.json"));
    let manifests = index["manifests"].as_array().unwrap();
    assert_eq!(manifests.len(), 1, "{index}");
    let digest = manifests[0]["digest"].as_str().unwrap();
    let manifest = read(
        &layout
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:")),
    );
    assert_eq!(
        manifest["layers"].as_array().unwrap().len(),
        n,
        "appends were lost: {manifest}"
    );
}

/// A sparse file on a filesystem that cannot tell its holes (FUSE without lseek, here
/// fuse-overlayfs; NFSv3 and compressed ZFS are the same: fewer blocks than bytes, no hole
/// found) is in the layer whole, on every output path, as GNU tar archives it. Looking for
/// its holes left the descriptor at the end of the file: ovl-diff to stdout, with a digest or
/// compressed failed with "the file shrank", and only `-q -o` (copied by offset) had it.
#[test]
fn a_sparse_file_whose_holes_cannot_be_found_is_exported_whole() {
    if !require("root (for a FUSE mount)", is_root()) {
        return;
    }
    let tools = ["fuse-overlayfs", "unshare", "tar"]
        .iter()
        .all(|t| ovl_tests::which(t).is_some());
    if !require("fuse-overlayfs, unshare and tar", tools) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    for p in ["l", "u", "w", "m"] {
        std::fs::create_dir(d.join(p)).unwrap();
    }
    let size = 1u64 << 20;
    let f = std::fs::File::create(d.join("l/sparse")).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"head", 0).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"tail", size - 4).unwrap();
    drop(f);
    let mut want = vec![0u8; size as usize];
    want[..4].copy_from_slice(b"head");
    want[size as usize - 4..].copy_from_slice(b"tail");
    // Mounted in a mount namespace of its own, unmounted however the script ends.
    let script = r#"
        d=$1; bin=$2
        fuse-overlayfs -o lowerdir=$d/l,upperdir=$d/u,workdir=$d/w $d/m || exit 3
        trap 'fusermount3 -u $d/m 2>/dev/null || fusermount -u $d/m 2>/dev/null || umount $d/m' EXIT
        set -e
        stat -c %b $d/m/sparse > $d/blocks
        "$bin" $d/m > $d/stdout.tar
        "$bin" -q $d/m -o $d/file.tar
        "$bin" -q --compress gzip $d/m -o $d/layer.tar.gz
        tar -C $d/m -cf $d/gnu.tar sparse
    "#;
    let out = ovl_tests::output(
        Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c", script, "sh"])
            .arg(d)
            .arg(BIN),
    );
    if !require("a fuse-overlayfs mount", out.status.code() != Some(3)) {
        return;
    }
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let blocks: u64 = std::fs::read_to_string(d.join("blocks"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        blocks * 512 < size,
        "the file is not sparse on the mount ({blocks} blocks): this test would prove nothing"
    );
    let data_of = |tar_bytes: &[u8]| -> Vec<u8> {
        let mut ar = tar::Archive::new(tar_bytes);
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            if e.path_bytes().as_ref() == b"sparse" {
                let mut v = Vec::new();
                e.read_to_end(&mut v).unwrap();
                return v;
            }
        }
        panic!("no entry \"sparse\" in the layer");
    };
    let mut gz = Vec::new();
    flate2::read::MultiGzDecoder::new(&std::fs::read(d.join("layer.tar.gz")).unwrap()[..])
        .read_to_end(&mut gz)
        .unwrap();
    let stdout = std::fs::read(d.join("stdout.tar")).unwrap();
    assert!(data_of(&std::fs::read(d.join("gnu.tar")).unwrap()) == want);
    assert!(data_of(&stdout) == want, "stdout (with a digest)");
    assert!(
        std::fs::read(d.join("file.tar")).unwrap() == stdout,
        "-q -o differs from stdout"
    );
    assert!(gz == stdout, "the gzip layer differs from the plain one");
}
