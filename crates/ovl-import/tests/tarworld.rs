//! ovl-import against the tar world: archives nobody here wrote (Go's archive/tar test corpus),
//! odd but valid archives as other producers write them (`fixtures/tarworld`, see its make.py),
//! and every GNU sparse format, each extracted by GNU tar, bsdtar and ovl-import and compared
//! ([`ovl_tests::tarworld`]). Needs root (owners, devices, `security.*` xattrs), GNU tar,
//! bsdtar, and for the corpus the `golang-src` package.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use ovl_layer::display_bytes;
use ovl_tests::tarworld::{self, Verdict};

/// The importer under test; `OVL_IMPORT_BIN` points the tests at another build (to show that
/// they fail on one without the fixes).
fn bin() -> PathBuf {
    std::env::var_os("OVL_IMPORT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_ovl-import")))
}

fn ready(needs_go: bool) -> bool {
    let mut ok = ovl_tests::require("root", ovl_tests::is_root())
        && ovl_tests::require("GNU tar", ovl_tests::which("tar").is_some())
        && ovl_tests::require(
            "bsdtar (libarchive-tools)",
            ovl_tests::which("bsdtar").is_some(),
        );
    if needs_go {
        ok = ok
            && ovl_tests::require(
                "Go's archive/tar testdata (golang-src)",
                go_corpus().is_some(),
            );
    }
    ok
}

fn go_corpus() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/share")
        .ok()?
        .flatten()
        .map(|e| e.path().join("src/archive/tar/testdata"))
        .filter(|p| {
            p.is_dir()
                && p.parent()
                    .and_then(|p| p.to_str())
                    .is_some_and(|s| s.starts_with("/usr/share/go"))
        })
        .collect();
    dirs.sort();
    dirs.pop()
}

/// The `ovl-import: warning:` lines of a run.
fn warnings(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| l.starts_with("ovl-import: warning:"))
        .collect()
}

struct Run {
    gnu: tarworld::Extracted,
    bsd: tarworld::Extracted,
    ovl: tarworld::Extracted,
    verdict: Verdict,
}

fn run(archive: &Path) -> Run {
    let since = tarworld::now();
    let gnu = tarworld::gnu_tar(archive);
    let bsd = tarworld::bsdtar(archive);
    let ovl = tarworld::ovl_import(&bin(), archive);
    let verdict = tarworld::compare(&gnu.tree, &bsd.tree, &ovl.tree, since);
    Run {
        gnu,
        bsd,
        ovl,
        verdict,
    }
}

/// The missing entries are exactly the ones a warning names, and there are `n` warnings.
fn check_skips(r: &Run, n: usize) -> Result<(), String> {
    let w = warnings(&r.ovl.stderr);
    if w.len() != n {
        return Err(format!("{} warnings, expected {n}: {w:?}", w.len()));
    }
    for p in &r.verdict.missing {
        let named = format!("\"{}\"", display_bytes(p));
        if !w.iter().any(|l| l.contains(&named)) {
            return Err(format!("{named} is missing but no warning names it: {w:?}"));
        }
    }
    if w.iter().any(|l| l.contains('\n')) {
        return Err("a warning holds a raw newline".into());
    }
    let other: Vec<&String> = r
        .verdict
        .mismatches
        .iter()
        .filter(|m| !m.contains("missing from ovl's tree"))
        .collect();
    if !other.is_empty() {
        return Err(format!("differs from the peers: {other:#?}"));
    }
    Ok(())
}

fn manifest() -> Vec<(String, String, String)> {
    let dir = ovl_tests::fixtures().join("tarworld");
    let text = std::fs::read_to_string(dir.join("MANIFEST.tsv"))
        .expect("fixtures/tarworld/MANIFEST.tsv (run python3 fixtures/tarworld/make.py)");
    text.lines()
        .skip(1)
        .filter(|l| !l.is_empty())
        .map(|l| {
            let c: Vec<&str> = l.split('\t').collect();
            (c[0].to_string(), c[1].to_string(), c[2].to_string())
        })
        .collect()
}

fn fixture(name: &str) -> Result<(), String> {
    let (file, check, _) = manifest()
        .into_iter()
        .find(|(f, _, _)| f == name)
        .unwrap_or_else(|| panic!("{name} is not in fixtures/tarworld/MANIFEST.tsv"));
    let path = ovl_tests::fixtures().join("tarworld").join(&file);
    let r = run(&path);
    if let Some(word) = check.strip_prefix("error:") {
        if r.ovl.ok {
            return Err("accepted, expected a refusal".into());
        }
        // The message must name the format, not merely repeat the file's name.
        let said = r.ovl.stderr.replace(&file, "");
        if !said.contains(word) {
            return Err(format!(
                "the error does not name {word:?}: {}",
                r.ovl.stderr
            ));
        }
        if r.ovl.dir.path().join("dest").exists() {
            return Err("DEST left behind".into());
        }
        return Ok(());
    }
    if !r.ovl.ok {
        return Err(format!("refused: {}", r.ovl.stderr.trim()));
    }
    if let Some(n) = check.strip_prefix("skipped:") {
        check_skips(&r, n.parse().unwrap())?;
    } else if check == "peers" {
        if !r.verdict.mismatches.is_empty() {
            return Err(format!(
                "differs from what GNU tar and bsdtar agree on: {:#?}",
                r.verdict.mismatches
            ));
        }
        if r.verdict.agreed == 0 {
            return Err(format!(
                "the peers agree on nothing (GNU tar: {}, bsdtar: {})",
                r.gnu.stderr, r.bsd.stderr
            ));
        }
    } else if check == "opaque" {
        check_opaque(&r.ovl.dir.path().join("dest"))?;
    } else {
        panic!("unknown check {check:?}");
    }
    Ok(())
}

/// d is opaque and holds no 0/0 device at any depth; the whiteout outside it is made.
fn check_opaque(dest: &Path) -> Result<(), String> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let opaque = xattr::get(dest.join("d"), "trusted.overlay.opaque")
        .ok()
        .flatten();
    if opaque.as_deref() != Some(b"y") {
        return Err(format!("d is not opaque: {opaque:?}"));
    }
    for e in walkdir::WalkDir::new(dest.join("d")) {
        let e = e.map_err(|e| e.to_string())?;
        let md = e.path().symlink_metadata().map_err(|e| e.to_string())?;
        if md.file_type().is_char_device() && md.rdev() == 0 {
            return Err(format!(
                "{} is a whiteout inside the opaque directory",
                e.path().display()
            ));
        }
    }
    let gone = dest
        .join("e/gone")
        .symlink_metadata()
        .map_err(|e| e.to_string())?;
    if !(gone.file_type().is_char_device() && gone.rdev() == 0) {
        return Err("e/gone is not a whiteout".into());
    }
    if std::fs::read(dest.join("d/new")).map_err(|e| e.to_string())? != b"new\n" {
        return Err("d/new is wrong".into());
    }
    Ok(())
}

macro_rules! fixture_tests {
    ($($test:ident => $file:literal,)*) => {
        $(
            #[test]
            fn $test() {
                if !ready(false) {
                    return;
                }
                if let Err(e) = fixture($file) {
                    panic!("{}: {e}", $file);
                }
            }
        )*

        #[test]
        fn manifest_matches_tests() {
            let listed: std::collections::BTreeSet<String> =
                manifest().into_iter().map(|(f, _, _)| f).collect();
            let tested: std::collections::BTreeSet<String> =
                [$($file),*].iter().map(|s| s.to_string()).collect();
            assert_eq!(listed, tested, "fixtures/tarworld/MANIFEST.tsv and fixture_tests! differ");
        }
    };
}

fixture_tests! {
    pax_value_with_newlines => "pax-xattr-newline.tar",
    blank_numeric_fields_are_zero => "blank-numeric.tar",
    gnu_volume_label_is_skipped => "volume-label.tar",
    gnu_dumpdir_is_a_directory => "dumpdir.tar",
    regular_entry_with_trailing_slash_is_a_directory => "regular-slash.tar",
    vendor_types_are_skipped_counted_and_named => "solaris-acl.tar",
    zero_zero_char_device_is_skipped_counted_and_named => "zero-chardev.tar",
    whiteouts_below_an_opaque_dir_opaque_first => "opaque-opaque-first.tar",
    whiteouts_below_an_opaque_dir_whiteouts_first => "opaque-whiteouts-first.tar",
    xz_rootfs => "rootfs.tar.xz",
    bzip2_rootfs => "rootfs.tar.bz2",
    zstd_with_a_leading_skippable_frame => "skippable.tar.zst",
    compress_z_is_named => "rootfs.tar.Z",
    lz4_is_named => "rootfs.tar.lz4",
    lzma_is_named => "rootfs.tar.lzma",
}

/// Why ovl may refuse an archive of Go's corpus: it is malformed. Either GNU tar or bsdtar (or
/// both) refuse it too, or it has no end-of-archive blocks (POSIX requires them; ovl refuses a
/// stream without them, since one cut on a block boundary would otherwise lose its tail in
/// silence).
fn refusal_allowed(r: &Run) -> Option<&'static str> {
    if !(r.gnu.ok && r.bsd.ok) {
        Some("a peer refuses it too")
    } else if r.ovl.stderr.contains("without its end-of-archive blocks") {
        Some("no end-of-archive blocks")
    } else {
        None
    }
}

#[test]
fn go_archive_tar_corpus() {
    if !ready(true) {
        return;
    }
    let dir = go_corpus().unwrap();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.ends_with(".tar") || n.ends_with(".tar.bz2")
        })
        .collect();
    files.sort();
    let mut table = String::new();
    let mut failures = Vec::new();
    let (mut agree, mut refused, mut split) = (0, 0, 0);
    for f in &files {
        let mut name = f.file_name().unwrap().to_string_lossy().into_owned();
        let mut r = run(f);
        // Refused only for its missing end-of-archive blocks: judge the rest of it too, with
        // them appended (Go's nil-uid.tar, pax-pos-size-file.tar, ... lack them).
        let with_end = tempfile::NamedTempFile::new().unwrap();
        if !r.ovl.ok
            && r.ovl.stderr.contains("without its end-of-archive blocks")
            && !name.ends_with(".bz2")
        {
            let mut bytes = std::fs::read(f).unwrap();
            bytes.extend([0u8; 1024]);
            std::fs::write(with_end.path(), bytes).unwrap();
            r = run(with_end.path());
            name.push_str(" +end");
        }
        let peers = match (r.gnu.ok, r.bsd.ok) {
            (true, true) => "both extract",
            (false, false) => "both refuse",
            (true, false) => "only GNU tar extracts",
            (false, true) => "only bsdtar extracts",
        };
        let line = if !r.ovl.ok {
            refused += 1;
            let full = r
                .ovl
                .stderr
                .lines()
                .find(|l| l.contains("error"))
                .unwrap_or("");
            // The reason, after the archive's path; huge names cut short.
            let why: String = full
                .rsplit_once(".tar: ")
                .or_else(|| full.rsplit_once(".bz2: "))
                .map_or(full, |(_, w)| w)
                .chars()
                .take(160)
                .collect();
            match refusal_allowed(&r) {
                Some(allowed) => format!("refused ({peers}; {allowed}): {why}"),
                None => {
                    failures.push(format!(
                        "{name}: refused, but GNU tar and bsdtar extract it: {why}"
                    ));
                    format!("REFUSED ({peers}): {why}")
                }
            }
        } else {
            // Only one peer extracts it: that one is the reference.
            let single = match (r.gnu.ok, r.bsd.ok) {
                (true, false) => Some(&r.gnu.tree),
                (false, true) => Some(&r.bsd.tree),
                _ => None,
            };
            let single_verdict =
                single.map(|t| tarworld::compare(t, t, &r.ovl.tree, tarworld::now() - 60));
            let v = single_verdict.as_ref().unwrap_or(&r.verdict);
            let skipped = warnings(&r.ovl.stderr);
            let unexplained: Vec<&String> = v
                .mismatches
                .iter()
                .filter(|m| {
                    // An entry ovl skips on purpose (and names) is not a mismatch.
                    !(m.contains("missing from ovl's tree")
                        && skipped
                            .iter()
                            .any(|w| m.contains(w.split('"').nth(1).unwrap_or("\u{0}"))))
                })
                .collect();
            if !unexplained.is_empty() {
                failures.push(format!("{name}: {unexplained:#?}"));
            }
            if v.peers_disagree.is_empty() {
                agree += 1;
            } else {
                split += 1;
            }
            format!(
                "accepted ({peers}): {} entries agree, {} the peers disagree on{}{}",
                v.agreed,
                v.peers_disagree.len(),
                if skipped.is_empty() {
                    String::new()
                } else {
                    format!(", skipped: {skipped:?}")
                },
                if unexplained.is_empty() {
                    String::new()
                } else {
                    format!(", MISMATCHES: {}", unexplained.len())
                }
            )
        };
        writeln!(table, "{name:28} {line}").unwrap();
    }
    eprintln!(
        "Go archive/tar corpus ({}): {} archives; accepted {} with the peers agreeing on every \
         entry, {} where they disagree on some; refused {}\n{table}",
        dir.display(),
        files.len(),
        agree,
        split,
        refused
    );
    assert!(files.len() > 30, "the corpus is incomplete");
    assert!(failures.is_empty(), "{failures:#?}");
}

/// A sparse file of 24 MiB with a few small data runs, archived by GNU tar in every sparse
/// format: ovl-import gives back every byte, the size and the holes.
#[test]
fn every_gnu_sparse_format() {
    if !ready(false) {
        return;
    }
    use std::io::{Seek, SeekFrom, Write};
    use std::os::unix::fs::MetadataExt;
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let mut f = std::fs::File::create(src.join("sparse")).unwrap();
    for (off, data) in [
        (0u64, &b"head"[..]),
        (5 << 20, b"five MiB"),
        (200 << 20, b"tail"),
    ] {
        f.seek(SeekFrom::Start(off)).unwrap();
        f.write_all(data).unwrap();
    }
    f.set_len(24 << 20).unwrap();
    drop(f);
    let mut failures = Vec::new();
    for (label, args) in [
        ("posix 0.0", &["--format=posix", "--sparse-version=0.0"][..]),
        ("posix 0.1", &["--format=posix", "--sparse-version=0.1"]),
        ("posix 1.0", &["--format=posix", "--sparse-version=1.0"]),
        ("gnu", &["--format=gnu"]),
        ("oldgnu", &["--format=oldgnu"]),
    ] {
        let archive = t.path().join(format!("{}.tar", label.replace(' ', "-")));
        let st = std::process::Command::new("tar")
            .args(args)
            .arg("--sparse")
            .arg("-cf")
            .arg(&archive)
            .arg("-C")
            .arg(&src)
            .arg("sparse")
            .status()
            .unwrap();
        assert!(st.success(), "{label}: tar -c failed");
        let r = run(&archive);
        if !r.ovl.ok {
            failures.push(format!("{label}: refused: {}", r.ovl.stderr.trim()));
            continue;
        }
        if !r.verdict.mismatches.is_empty() || r.verdict.agreed == 0 {
            failures.push(format!("{label}: {:#?}", r.verdict.mismatches));
        }
        let out = r.ovl.dir.path().join("dest/sparse");
        match out.symlink_metadata() {
            Ok(md) if md.size() == 24 << 20 && md.blocks() < 2048 => {}
            Ok(md) => failures.push(format!(
                "{label}: {} bytes in {} blocks",
                md.size(),
                md.blocks()
            )),
            Err(e) => failures.push(format!(
                "{label}: {e}; ovl's tree: {:?}",
                r.ovl
                    .tree
                    .keys()
                    .map(|k| display_bytes(k))
                    .collect::<Vec<_>>()
            )),
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// A file with file capabilities whose xattr holds a newline byte (cap_dac_override +
/// cap_fowner: 0x0a), written into a layer by ovl-diff and imported by ovl-import: the
/// capabilities survive, and GNU tar reads the layer the same way.
#[test]
fn file_capabilities_round_trip_through_ovl_diff_and_ovl_import() {
    if !ready(false)
        || !ovl_tests::require("setcap (libcap2-bin)", ovl_tests::which("setcap").is_some())
    {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let upper = t.path().join("upper");
    std::fs::create_dir(&upper).unwrap();
    std::fs::write(upper.join("tool"), b"#!/bin/sh\n").unwrap();
    ovl_tests::run_ok(
        std::process::Command::new("setcap")
            .arg("cap_dac_override,cap_fowner+ep")
            .arg(upper.join("tool")),
    );
    let caps = xattr::get(upper.join("tool"), "security.capability")
        .unwrap()
        .expect("setcap set security.capability");
    assert!(
        caps.contains(&b'\n'),
        "the capability bytes hold no newline: {caps:?}"
    );
    let layer = t.path().join("layer.tar");
    ovl_tests::run_ok(
        std::process::Command::new(ovl_tests::bin("ovl-diff"))
            .arg("-q")
            .arg(&upper)
            .arg("-o")
            .arg(&layer),
    );
    let r = run(&layer);
    assert!(
        r.ovl.ok,
        "ovl-import refused ovl-diff's layer: {}",
        r.ovl.stderr
    );
    assert!(
        r.verdict.mismatches.is_empty(),
        "{:#?}",
        r.verdict.mismatches
    );
    let got = xattr::get(r.ovl.dir.path().join("dest/tool"), "security.capability").unwrap();
    assert_eq!(got.as_deref(), Some(&caps[..]));
    let getcap = ovl_tests::run_ok(
        std::process::Command::new("getcap").arg(r.ovl.dir.path().join("dest/tool")),
    );
    let getcap = String::from_utf8_lossy(&getcap);
    assert!(
        getcap.contains("cap_dac_override,cap_fowner=ep"),
        "getcap says {getcap}"
    );
}
