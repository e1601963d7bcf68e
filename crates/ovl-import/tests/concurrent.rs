//! `ovl-import oci: --jobs N`: the layers of an image extracted at once give the trees that
//! extracting them in turn (`--jobs 1`) gives, byte for byte: owners, modes, ns mtimes, xattrs,
//! hardlinks, whiteouts and opaque directories, also where a layer's entries depend on the
//! layers below it (implicit parents, hardlinks to lower files) and while the process umask is
//! 022. A failing layer leaves nothing, and the error is the one `--jobs 1` reports.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use ovl_tests::oci::oci_layout;
use ovl_tests::snapshot::{SnapshotOptions, differences, snapshot};
use ovl_tests::{bin, is_root, output, require, run_ok};

const GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
const PLAIN: &str = "application/vnd.oci.image.layer.v1.tar";

/// A layer blob in the given media type.
fn compress(tar: &[u8], media: &'static str) -> (Vec<u8>, &'static str) {
    use std::io::Write;
    match media {
        GZIP => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(tar).unwrap();
            (e.finish().unwrap(), media)
        }
        ZSTD => (zstd::encode_all(tar, 3).unwrap(), media),
        _ => (tar.to_vec(), media),
    }
}

/// A layer tar, entry by entry, each with its owner, ns mtime and xattrs (PAX).
struct Layer(tar::Builder<Vec<u8>>);

#[derive(Clone, Copy)]
struct Meta {
    mode: u32,
    uid: u64,
    gid: u64,
    /// Seconds and nanoseconds.
    mtime: (u64, u32),
    xattrs: &'static [(&'static str, &'static [u8])],
}

const M: Meta = Meta {
    mode: 0o644,
    uid: 0,
    gid: 0,
    mtime: (1_600_000_000, 0),
    xattrs: &[],
};

impl Layer {
    fn new() -> Self {
        Layer(tar::Builder::new(Vec::new()))
    }

    fn entry(&mut self, path: &str, kind: tar::EntryType, m: Meta, data: &[u8], link: &str) {
        let mut pax: Vec<(String, Vec<u8>)> = vec![(
            "mtime".into(),
            format!("{}.{:09}", m.mtime.0, m.mtime.1).into_bytes(),
        )];
        for (k, v) in m.xattrs {
            pax.push((format!("SCHILY.xattr.{k}"), v.to_vec()));
        }
        self.0
            .append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
            .unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(m.mode);
        h.set_uid(m.uid);
        h.set_gid(m.gid);
        h.set_mtime(m.mtime.0);
        h.set_size(data.len() as u64);
        if kind == tar::EntryType::Link || kind == tar::EntryType::Symlink {
            self.0.append_link(&mut h, path, link).unwrap();
        } else {
            self.0.append_data(&mut h, path, data).unwrap();
        }
    }
    fn dir(&mut self, path: &str, m: Meta) -> &mut Self {
        self.entry(path, tar::EntryType::Directory, m, b"", "");
        self
    }
    fn file(&mut self, path: &str, m: Meta, data: &[u8]) -> &mut Self {
        self.entry(path, tar::EntryType::Regular, m, data, "");
        self
    }
    fn link(&mut self, path: &str, target: &str) -> &mut Self {
        self.entry(path, tar::EntryType::Link, M, b"", target);
        self
    }
    fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        let m = Meta { mode: 0o777, ..M };
        self.entry(path, tar::EntryType::Symlink, m, b"", target);
        self
    }
    fn whiteout(&mut self, path: &str) -> &mut Self {
        self.file(path, M, b"")
    }
    /// `n` files of a few KiB under `dir`: a layer that takes a while, so the layers above it
    /// are extracted while it is still being written.
    fn filler(&mut self, dir: &str, n: usize) -> &mut Self {
        self.dir(dir, Meta { mode: 0o755, ..M });
        for i in 0..n {
            let data = vec![b'a' + (i % 26) as u8; 2000 + (i * 131) % 6000];
            self.file(&format!("{dir}/f{i}"), M, &data);
        }
        self
    }
    fn finish(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

/// `system.posix_acl_default` of `setfacl -d -m o::-`: files made below lose their "other" bits.
const DEFAULT_ACL: &[u8] = &[
    2, 0, 0, 0, 1, 0, 7, 0, 255, 255, 255, 255, 4, 0, 5, 0, 255, 255, 255, 255, 0x20, 0, 0, 0, 255,
    255, 255, 255,
];

/// Layers whose entries depend on the layers below: implicit parents taking a lower
/// directory's owner, mode, ns mtime and xattrs (through a chain of implicit ones, under a
/// whiteout, over an opaque directory), hardlinks to files only a lower layer holds (twice to
/// one file, a link to the copy, copies replaced by later entries while a link to them stays),
/// whiteouts and opaque directories across layers; and the cases deferral cannot settle
/// (a hardlink to a lower symlink, an implicit directory listed later in its layer, a lower
/// default ACL, a copy made under a default ACL). Layer 0 is big, the others small, in every compression.
fn dependent_layers() -> Vec<(Vec<u8>, &'static str)> {
    let ns = |s: u64, n: u32| (s, n);
    let mut l0 = Layer::new();
    l0.dir(
        "etc",
        Meta {
            mode: 0o750,
            uid: 1,
            gid: 2,
            mtime: ns(1_500_000_000, 123_456_789),
            xattrs: &[("user.etc", b"lower\nxattr")],
        },
    )
    .file("etc/passwd", M, b"root:x:0:0::/root:/bin/sh\n")
    .dir(
        "tmp",
        Meta {
            mode: 0o1777,
            mtime: ns(1_500_000_001, 5),
            ..M
        },
    )
    .dir(
        "usr",
        Meta {
            mode: 0o755,
            uid: 3,
            ..M
        },
    )
    .dir(
        "usr/lib",
        Meta {
            mode: 0o705,
            uid: 3,
            gid: 4,
            mtime: ns(1_500_000_002, 999_999_999),
            xattrs: &[("user.lib", b"1")],
        },
    )
    .file(
        "usr/lib/libx.so",
        Meta {
            mode: 0o755,
            uid: 5,
            gid: 6,
            mtime: ns(1_500_000_003, 42),
            xattrs: &[("user.libx", b"x")],
        },
        b"\x7fELF libx",
    )
    .symlink("usr/lib/link", "libx.so")
    .dir("bin", Meta { mode: 0o755, ..M })
    .file(
        "bin/busybox",
        Meta {
            mode: 0o4755,
            mtime: ns(1_500_000_004, 7),
            ..M
        },
        b"\x7fELF busybox",
    )
    .dir("d", Meta { mode: 0o755, ..M })
    .file("d/a", M, b"a\n")
    .dir("d/sub", Meta { mode: 0o700, ..M })
    .file("d/sub/deep", M, b"deep\n")
    .dir(
        "o",
        Meta {
            mode: 0o711,
            uid: 7,
            ..M
        },
    )
    .file("o/old", M, b"old\n")
    .dir(
        "acl",
        Meta {
            mode: 0o755,
            xattrs: &[("system.posix_acl_default", DEFAULT_ACL)],
            ..M
        },
    )
    .filler("fill", 1500);

    let mut l1 = Layer::new();
    l1.file("etc/new", M, b"new\n")
        .file("usr/lib/extra/f", M, b"no lower extra\n")
        .link("bin/sh", "bin/busybox")
        .link("bin/ash", "bin/busybox")
        .link("bin/sh2", "bin/sh")
        .whiteout("d/.wh.a")
        .whiteout("d/.wh.sub")
        .whiteout("o/.wh..wh..opq")
        .file("o/new", M, b"o new\n")
        .file("tmp/x", M, b"tmp\n")
        .filler("fill1", 200);

    let mut l2 = Layer::new();
    l2.file("etc/deeper/x", M, b"chain\n")
        .link("usr/lib/libx2.so", "usr/lib/libx.so")
        .link("etc/new-link", "etc/new")
        .file("d/sub/new", M, b"under a whiteout\n")
        .file("o/z/f", M, b"over an opaque dir\n")
        .link("repl", "bin/busybox")
        .file("repl", M, b"replaced\n")
        .link("repl2", "usr/lib/libx.so")
        .link("keep", "repl2")
        .file("repl2", M, b"replaced too\n")
        .filler("fill2", 50);

    let mut l3 = Layer::new();
    l3.link("lnk", "usr/lib/link").file("bin/x", M, b"x\n");

    let mut l4 = Layer::new();
    l4.file("etc/q", M, b"q\n").dir(
        "etc",
        Meta {
            mode: 0o755,
            xattrs: &[("user.top", b"1")],
            ..M
        },
    );

    let mut l5 = Layer::new();
    l5.file("acl/f", M, b"acl\n").link("bin/y", "bin/busybox");

    let mut l6 = Layer::new();
    l6.dir(
        "acl2",
        Meta {
            mode: 0o755,
            xattrs: &[("system.posix_acl_default", DEFAULT_ACL)],
            ..M
        },
    )
    .link("acl2/passwd", "etc/passwd");

    vec![
        compress(&l0.finish(), GZIP),
        compress(&l1.finish(), ZSTD),
        compress(&l2.finish(), PLAIN),
        compress(&l3.finish(), GZIP),
        compress(&l4.finish(), ZSTD),
        compress(&l5.finish(), PLAIN),
        compress(&l6.finish(), GZIP),
    ]
}

/// Layer `n` for the umask test: files in directories with modes a umask would change (0777,
/// 0666, setuid), a hardlink, a symlink, a whiteout of the layer below's first file and an
/// opaque directory over its `opq/`.
fn busy_layer(n: usize, files: usize) -> Vec<u8> {
    let mut l = Layer::new();
    let m = |mode| Meta {
        mode,
        mtime: (1_700_000_000 + n as u64, 0),
        ..M
    };
    l.dir("d", m(0o777))
        .dir("opq", m(0o777))
        .whiteout("opq/.wh..wh..opq")
        .file(&format!("opq/only-{n}"), m(0o666), b"x");
    if n > 0 {
        l.whiteout(&format!("d/.wh.l{}-0", n - 1));
    }
    for i in 0..files {
        let dir = format!("d/s{}", i % 7);
        if i < 7 {
            l.dir(&dir, m(0o2777));
        }
        let data = vec![b'a' + (i % 26) as u8; 1000 + (i * 37) % 9000];
        let mode = [0o666, 0o777, 0o4755, 0o640][i % 4];
        l.file(&format!("{dir}/l{n}-{i}"), m(mode), &data);
    }
    l.link("d/hard", &format!("d/s0/l{n}-0"))
        .symlink("d/sym", "s1");
    l.finish()
}

/// Six busy layers of quite different sizes (some end while others are still being written).
fn busy_layers() -> Vec<(Vec<u8>, &'static str)> {
    (0..6)
        .map(|n| {
            let tar = busy_layer(n, [150, 20, 600, 5, 300, 60][n]);
            compress(&tar, [GZIP, ZSTD, PLAIN][n % 3])
        })
        .collect()
}

/// The Alpine minirootfs cut into four layers: every directory in layer 0 (so the others have
/// only implicit parents, taken from it), every other entry in the layer its path hashes to,
/// a hardlink at or above its target's layer (a copy when below it).
fn alpine_layers(tgz: &Path) -> Vec<(Vec<u8>, &'static str)> {
    let file = std::fs::File::open(tgz).unwrap();
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let mut layers: Vec<tar::Builder<Vec<u8>>> =
        (0..4).map(|_| tar::Builder::new(Vec::new())).collect();
    let mut placed = std::collections::HashMap::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let path = e.path_bytes().into_owned();
        let mut h = e.header().clone();
        let n = match h.entry_type() {
            tar::EntryType::Directory => 0,
            tar::EntryType::Link => {
                let target = e.link_name_bytes().unwrap().into_owned();
                let at = placed.get(&target).copied().unwrap_or(0);
                at.max(path.iter().map(|&b| b as usize).sum::<usize>() % 4)
            }
            _ => path.iter().map(|&b| b as usize).sum::<usize>() % 4,
        };
        placed.insert(path.clone(), n);
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut data).unwrap();
        let path = std::ffi::OsStr::from_bytes(&path);
        match e.link_name_bytes() {
            Some(link) => {
                let link = std::ffi::OsStr::from_bytes(&link).to_owned();
                layers[n].append_link(&mut h, path, link).unwrap();
            }
            None => layers[n].append_data(&mut h, path, &data[..]).unwrap(),
        }
    }
    layers
        .into_iter()
        .enumerate()
        .map(|(i, b)| compress(&b.into_inner().unwrap(), [GZIP, ZSTD, PLAIN, GZIP][i]))
        .collect()
}

fn is_whiteout(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_char_device() && m.rdev() == 0)
}

/// ovl-import with a umask that would change the layers' modes if it leaked into extraction.
fn import(source: &str, dest: &Path, jobs: usize) -> std::process::Output {
    import_as(None, source, dest, jobs)
}

/// [`import`], as `user` when given.
fn import_as(
    user: Option<&ovl_tests::TestUser>,
    source: &str,
    dest: &Path,
    jobs: usize,
) -> std::process::Output {
    let mut sh = match user {
        Some(u) => ovl_tests::command_as(u, Path::new("/bin/sh")),
        None => Command::new("sh"),
    };
    output(
        sh.arg("-c")
            .arg("umask 022; exec \"$0\" \"$@\"")
            .arg(bin("ovl-import"))
            .args(["--jobs", &jobs.to_string(), source])
            .arg(dest),
    )
}

/// Sets to 0 the mtimes an import does not take from the layers: of DEST, of each lowerdir
/// (when its layer has no root entry) and of the whiteouts (made at the time).
fn zero_import_times(dest: &Path) {
    let zero = |p: &Path| {
        run_ok(Command::new("touch").args(["-h", "-d", "@0"]).arg(p));
    };
    zero(dest);
    for lower in std::fs::read_dir(dest).unwrap() {
        zero(&lower.unwrap().path());
    }
    for e in walkdir::WalkDir::new(dest) {
        let e = e.unwrap();
        if is_whiteout(e.path()) {
            zero(e.path());
        }
    }
}

/// Import `layers` with each of `jobs` and with `--jobs 1`: the same stdout (the lowerdirs),
/// the same summary and the same trees. The `--jobs 1` DEST.
fn assert_jobs_agree(t: &Path, layers: &[(Vec<u8>, &str)], jobs: &[usize]) -> PathBuf {
    assert_jobs_agree_as(None, t, layers, jobs)
}

/// [`assert_jobs_agree`], the imports run as `user` when given.
fn assert_jobs_agree_as(
    user: Option<&ovl_tests::TestUser>,
    t: &Path,
    layers: &[(Vec<u8>, &str)],
    jobs: &[usize],
) -> PathBuf {
    let layout = t.join("image");
    oci_layout(&layout, "v1", layers);
    let source = format!("oci:{}:v1", layout.display());
    let one = t.join("one");
    let out = import_as(user, &source, &one, 1);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "--jobs 1: {err}");
    let summary = |err: &str| {
        err.lines()
            .find(|l| l.contains(" entries, "))
            .map(|l| l.split(" in ").next().unwrap().to_string())
    };
    let summary_one = summary(&err);
    let lowers_one = String::from_utf8(out.stdout).unwrap();
    zero_import_times(&one);
    let tree_one = snapshot(&one, &SnapshotOptions::default()).unwrap();
    for &n in jobs {
        let many = t.join(format!("jobs-{n}"));
        let out = import_as(user, &source, &many, n);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "--jobs {n}: {err}");
        assert_eq!(summary(&err), summary_one, "--jobs {n}: the summary");
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            lowers_one.replace(&one.display().to_string(), &many.display().to_string())
        );
        zero_import_times(&many);
        let diff = differences(
            &tree_one,
            &snapshot(&many, &SnapshotOptions::default()).unwrap(),
        );
        assert!(
            diff.is_empty(),
            "--jobs {n} differs from --jobs 1 (--jobs 1 first):\n{}",
            diff.join("\n")
        );
        std::fs::remove_dir_all(&many).unwrap();
    }
    one
}

fn root() -> bool {
    // Owners other than ours and the trusted opaque xattr.
    require("root", is_root())
}

#[test]
fn layers_that_depend_on_lower_layers_import_concurrently_as_in_turn() {
    if !root() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let one = assert_jobs_agree(t.path(), &dependent_layers(), &[2, 3, 6]);
    // The cases are what they say (in the --jobs 1 tree, which the others equal).
    let meta = |p: &str| std::fs::symlink_metadata(one.join(p)).unwrap();
    let etc = meta("1/etc");
    assert_eq!(
        (etc.mode() & 0o7777, etc.uid(), etc.gid(), etc.mtime_nsec()),
        (0o750, 1, 2, 123_456_789)
    );
    assert_eq!(
        meta("2/etc").mtime_nsec(),
        123_456_789,
        "the implicit chain"
    );
    assert_eq!(meta("1/usr/lib/extra").mtime(), 0);
    let sh = meta("1/bin/sh");
    assert_eq!((sh.mode() & 0o7777, sh.nlink()), (0o4755, 3));
    assert_eq!(std::fs::read(one.join("2/keep")).unwrap(), b"\x7fELF libx");
    assert_eq!(meta("2/keep").uid(), 5);
    assert!(meta("3/lnk").file_type().is_symlink());
    assert!(is_whiteout(&one.join("1/d/a")));
    // Under the lower's default ACL the file lost its "other" bits.
    assert_eq!(meta("5/acl/f").mode() & 0o777, 0o640);
}

/// Rootless with no subordinate ids: owners and modes are recorded in xattrs, also those an
/// implicit directory or a lower hardlink's copy takes from a lower layer.
#[test]
fn rootless_recorded_owners_agree_whatever_the_jobs() {
    let Some(user) = ovl_tests::require_test_user_without_subids() else {
        return;
    };
    let t = ovl_tests::user_tempdir(&user);
    let one = assert_jobs_agree_as(Some(&user), t.path(), &dependent_layers(), &[3]);
    let etc = one.join("1/etc");
    assert!(
        xattr::get(&etc, "user.rootlesscontainers")
            .unwrap()
            .is_some(),
        "the implicit etc has the lower's owner record"
    );
}

#[test]
fn busy_layers_import_concurrently_as_in_turn_under_umask_022() {
    let t = tempfile::tempdir().unwrap();
    let one = assert_jobs_agree(t.path(), &busy_layers(), &[2, 6]);
    // The modes are the layers', not the umask's.
    let m = std::fs::symlink_metadata(one.join("4/d/s1/l4-1")).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o777);
    assert!(is_whiteout(&one.join("1/d/l0-0")));
}

#[test]
fn alpine_split_into_layers_imports_concurrently_as_in_turn() {
    if !root() {
        return;
    }
    let Some(tgz) = ovl_tests::alpine_minirootfs() else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let one = assert_jobs_agree(t.path(), &alpine_layers(&tgz), &[2, 4]);
    // The upper layers' parents are implicit, taken from layer 0.
    let lib = std::fs::symlink_metadata(one.join("3/lib")).unwrap();
    let lib0 = std::fs::symlink_metadata(one.join("0/lib")).unwrap();
    assert_eq!((lib.mtime(), lib.mode()), (lib0.mtime(), lib0.mode()));
}

#[test]
fn a_failing_layer_leaves_nothing_and_the_lowest_error_is_reported_whatever_the_jobs() {
    let t = tempfile::tempdir().unwrap();
    let layout = t.path().join("image");
    let mut layers = busy_layers();
    layers.truncate(4);
    // Layer 0 (gzip, big) truncated near its end, layer 3 (small) a byte flipped in its
    // frame: importing in turn fails on layer 0, whichever fails first here.
    let n = layers[0].0.len();
    layers[0].0.truncate(n - 100);
    let mid = layers[3].0.len() / 2;
    layers[3].0[mid] ^= 0x55;
    oci_layout(&layout, "v1", &layers);
    let source = format!("oci:{}:v1", layout.display());
    let mut errors = Vec::new();
    for jobs in [1, 2, 4] {
        let dest = t.path().join(format!("dest-{jobs}"));
        let out = import(&source, &dest, jobs);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "jobs {jobs}: the import succeeded");
        assert!(err.contains("layer 0"), "jobs {jobs}: {err}");
        assert!(!err.contains("cancelled"), "jobs {jobs}: {err}");
        assert!(!dest.exists(), "jobs {jobs}: DEST exists");
        errors.push(err.replace(&format!("dest-{jobs}"), "dest"));
    }
    assert!(errors.windows(2).all(|w| w[0] == w[1]), "{errors:#?}");
    // Layer 1 alone corrupt: it fails, the layers above it are cancelled, not reported.
    let mut layers = busy_layers();
    layers.truncate(4);
    let mid = layers[1].0.len() / 2;
    layers[1].0[mid] ^= 0x55;
    let layout = t.path().join("image2");
    oci_layout(&layout, "v1", &layers);
    let source = format!("oci:{}:v1", layout.display());
    for jobs in [1, 2, 4] {
        let dest = t.path().join(format!("dest2-{jobs}"));
        let out = import(&source, &dest, jobs);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "jobs {jobs}: the import succeeded");
        assert!(err.contains("layer 1"), "jobs {jobs}: {err}");
        assert!(!err.contains("cancelled"), "jobs {jobs}: {err}");
        assert!(!dest.exists(), "jobs {jobs}: DEST exists");
    }
    let left: Vec<String> = std::fs::read_dir(t.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".ovl-import-"))
        .collect();
    assert!(left.is_empty(), "staging left behind: {left:?}");
}
