//! Property test: random trees, written by GNU tar, imported by ovl-import, must be what GNU
//! tar itself extracts from the same archive.
//!
//! A tree has files of every size (empty, around the 512-byte block, up to 200 KiB, and sparse
//! ones with holes of up to 8 MiB), hardlinks, symlinks, fifos, names over 100 bytes and paths
//! over 255 bytes, non-UTF-8 names, binary xattrs (NUL and newline bytes; names not always UTF-8), setuid/setgid/sticky
//! modes, owners and nanosecond mtimes. Each tree is archived in one of GNU tar's formats: PAX,
//! GNU, and with `--sparse` PAX 0.0, 0.1, 1.0 and GNU. A fixed seed and 32 cases by default
//! (it runs in every CI); `OVL_PROPTEST_CASES=N` runs N. Needs root (owners, xattrs) and GNU tar.
//!
//! A second variant adds files of more than a writer's piece (1 MiB) and imports each archive
//! with one writer and with several (`--writers`): the trees must be the same as each other and
//! as GNU tar's.

use std::ffi::OsStr;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use ovl_tests::snapshot::{SnapshotOptions, differences, snapshot};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

/// The importer under test; `OVL_IMPORT_BIN` points the test at another build.
fn bin() -> std::path::PathBuf {
    std::env::var_os("OVL_IMPORT_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_ovl-import").into())
}

#[derive(Debug, Clone)]
enum Kind {
    /// Data runs at offsets (a sparse file when they leave gaps), and the file's size.
    File {
        runs: Vec<(u64, Vec<u8>)>,
        size: u64,
    },
    /// A hardlink to the n-th file made so far (modulo their count).
    Hardlink(usize),
    Symlink(Vec<u8>),
    Fifo,
    Dir,
}

#[derive(Debug, Clone)]
struct Node {
    /// The directory it goes in: an index into the directories made so far (modulo).
    parent: usize,
    name: Vec<u8>,
    kind: Kind,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: (i64, u32),
    xattrs: Vec<ovl_layer::Xattr>,
}

#[derive(Debug, Clone, Copy)]
enum Format {
    Pax,
    Gnu,
    PaxSparse00,
    PaxSparse01,
    PaxSparse10,
    GnuSparse,
}

impl Format {
    fn args(self) -> &'static [&'static str] {
        match self {
            Format::Pax => &["--format=posix"],
            Format::Gnu => &["--format=gnu"],
            Format::PaxSparse00 => &["--format=posix", "--sparse", "--sparse-version=0.0"],
            Format::PaxSparse01 => &["--format=posix", "--sparse", "--sparse-version=0.1"],
            Format::PaxSparse10 => &["--format=posix", "--sparse", "--sparse-version=1.0"],
            Format::GnuSparse => &["--format=gnu", "--sparse"],
        }
    }
}

fn name() -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![
        8 => prop::sample::select(b"abcxyz019-_.".to_vec()),
        1 => 0x80u8..=0xff,
        1 => 1u8..=0x7f,
    ]
    .prop_filter("no slash", |b| *b != b'/');
    prop_oneof![
        6 => prop::collection::vec(byte.clone(), 1..12),
        2 => prop::collection::vec(byte.clone(), 100..140),
        1 => prop::collection::vec(byte, 200..=255),
    ]
    .prop_filter("not . or .. or a whiteout", |n| {
        n != b"." && n != b".." && !n.starts_with(b".wh.")
    })
}

/// `big`: sometimes files of a few MiB (more than one writer's piece).
fn content(big: bool) -> impl Strategy<Value = (Vec<(u64, Vec<u8>)>, u64)> {
    let small = prop_oneof![
        Just(0usize),
        Just(1),
        Just(511),
        Just(512),
        Just(513),
        0usize..200_000,
    ];
    let sizes = if big {
        prop_oneof![6 => small, 1 => (1usize << 20)..(3 << 20)].boxed()
    } else {
        small.boxed()
    };
    prop_oneof![
        3 => (sizes, any::<u8>()).prop_map(|(n, seed)| {
            let data: Vec<u8> = (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect();
            (vec![(0, data)], n as u64)
        }),
        // Sparse: data runs with holes between, maybe a hole at the end.
        1 => (
            prop::collection::vec((0u64..8 << 20, prop::collection::vec(1u8..=255, 1..5000)), 1..4),
            0u64..1 << 20,
        )
            .prop_map(|(runs, tail)| {
                let end = runs.iter().map(|(o, d)| o + d.len() as u64).max().unwrap_or(0);
                (runs, end + tail)
            }),
    ]
}

fn xattrs() -> impl Strategy<Value = Vec<ovl_layer::Xattr>> {
    prop::collection::vec(
        (
            // Names are bytes: GNU tar keeps one that is not UTF-8 as it is.
            prop::collection::vec(prop_oneof![3 => b'a'..=b'z', 1 => 0x80u8..=0xff], 1..8)
                .prop_map(|s| [b"user.".as_slice(), &s].concat()),
            prop::collection::vec(prop_oneof![Just(0u8), Just(b'\n'), any::<u8>()], 0..64),
        ),
        0..3,
    )
}

fn node(big: bool) -> impl Strategy<Value = Node> {
    let kind = prop_oneof![
        5 => content(big).prop_map(|(runs, size)| Kind::File { runs, size }),
        1 => (0usize..8).prop_map(Kind::Hardlink),
        1 => prop::collection::vec(1u8..=255, 1..300).prop_map(Kind::Symlink),
        1 => Just(Kind::Fifo),
        2 => Just(Kind::Dir),
    ];
    (
        0usize..16,
        name(),
        kind,
        prop_oneof![
            Just(0o644u32),
            Just(0o755),
            Just(0o4755),
            Just(0o2750),
            Just(0o1777),
            0u32..0o7777
        ],
        prop_oneof![Just(0u32), 1u32..70_000],
        prop_oneof![Just(0u32), 1u32..70_000],
        (0i64..(1 << 33), 0u32..1_000_000_000),
        xattrs(),
    )
        .prop_map(|(parent, name, kind, mode, uid, gid, mtime, xattrs)| Node {
            parent,
            name,
            kind,
            mode,
            uid,
            gid,
            mtime,
            xattrs,
        })
}

fn format() -> impl Strategy<Value = Format> {
    prop_oneof![
        Just(Format::Pax),
        Just(Format::Gnu),
        Just(Format::PaxSparse00),
        Just(Format::PaxSparse01),
        Just(Format::PaxSparse10),
        Just(Format::GnuSparse),
    ]
}

fn set_times(p: &Path, (s, ns): (i64, u32)) {
    ovl_tests::set_times(p, s, ns);
}

/// Make the tree below `root`; directory metadata last, deepest first.
fn build(root: &Path, nodes: &[Node]) {
    let mut dirs: Vec<PathBuf> = vec![root.to_path_buf()];
    let mut files: Vec<PathBuf> = Vec::new();
    let mut dir_meta: Vec<(PathBuf, &Node)> = Vec::new();
    for n in nodes {
        let parent = dirs[n.parent % dirs.len()].clone();
        let p = parent.join(OsStr::from_bytes(&n.name));
        if p.symlink_metadata().is_ok() || p.as_os_str().len() > 3000 {
            continue;
        }
        match &n.kind {
            Kind::Dir => {
                std::fs::create_dir(&p).unwrap();
                dirs.push(p.clone());
                dir_meta.push((p, n));
                continue;
            }
            Kind::File { runs, size } => {
                let mut f = std::fs::File::create(&p).unwrap();
                for (off, data) in runs {
                    f.seek(SeekFrom::Start(*off)).unwrap();
                    f.write_all(data).unwrap();
                }
                f.set_len(*size).unwrap();
                files.push(p.clone());
            }
            Kind::Hardlink(i) => {
                if files.is_empty() {
                    continue;
                }
                std::fs::hard_link(&files[i % files.len()], &p).unwrap();
                // The link shares the inode: its metadata is the target's.
                continue;
            }
            Kind::Symlink(t) => {
                std::os::unix::fs::symlink(OsStr::from_bytes(t), &p).unwrap();
                std::os::unix::fs::lchown(&p, Some(n.uid), Some(n.gid)).unwrap();
                set_times(&p, n.mtime);
                continue;
            }
            Kind::Fifo => {
                rustix::fs::mknodat(
                    rustix::fs::CWD,
                    &p,
                    rustix::fs::FileType::Fifo,
                    rustix::fs::Mode::from_raw_mode(0o644),
                    0,
                )
                .unwrap();
            }
        }
        apply(&p, n);
    }
    for (p, n) in dir_meta.into_iter().rev() {
        apply(&p, n);
    }
}

fn apply(p: &Path, n: &Node) {
    use std::os::unix::fs::PermissionsExt;
    std::os::unix::fs::chown(p, Some(n.uid), Some(n.gid)).unwrap();
    // user.* xattrs exist on files and directories only.
    if matches!(n.kind, Kind::File { .. } | Kind::Dir) {
        for (k, v) in &n.xattrs {
            xattr::set(p, OsStr::from_bytes(k), v).unwrap();
        }
    }
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(n.mode)).unwrap();
    set_times(p, n.mtime);
}

/// Import `archive` into the new `dest` (`writers`: the `--writers` given, if any).
fn import(archive: &Path, dest: &Path, writers: Option<u32>) -> Result<(), TestCaseError> {
    let mut cmd = Command::new(bin());
    cmd.arg("-q");
    if let Some(n) = writers {
        cmd.arg(format!("--writers={n}"));
    }
    let out = cmd.arg(archive).arg(dest).output().unwrap();
    prop_assert!(
        out.status.success(),
        "ovl-import --writers {writers:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// How the archive is imported, and what the trees are compared with.
#[derive(Debug, Clone, Copy)]
enum Imports {
    /// As the command line chooses (compared with GNU tar).
    Default,
    /// With several writers, compared with one writer and with GNU tar.
    SingleAndMany,
}

fn check(nodes: &[Node], format: Format, imports: Imports) -> Result<(), TestCaseError> {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir(&src).unwrap();
    build(&src, nodes);
    let archive = t.path().join("a.tar");
    let out = Command::new("tar")
        .args(format.args())
        .args(["--xattrs", "--xattrs-include=*", "--numeric-owner", "-cf"])
        .arg(&archive)
        .arg("-C")
        .arg(&src)
        .arg(".")
        .output()
        .unwrap();
    // GNU format cannot hold xattrs (tar warns) or some long symlink targets in old forms:
    // only a failed write is a problem.
    prop_assert!(
        out.status.success() || archive.exists(),
        "tar -c failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let gnu = t.path().join("gnu");
    std::fs::create_dir(&gnu).unwrap();
    let out = Command::new("tar")
        .args([
            "--xattrs",
            "--xattrs-include=*",
            "--numeric-owner",
            "--same-owner",
            "-xpf",
        ])
        .arg(&archive)
        .arg("-C")
        .arg(&gnu)
        .output()
        .unwrap();
    prop_assert!(
        out.status.success(),
        "GNU tar -x failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dest = t.path().join("ovl");
    let opts = SnapshotOptions {
        skip_root: true,
        ..SnapshotOptions::merged_view()
    };
    match imports {
        Imports::Default => import(&archive, &dest, None)?,
        Imports::SingleAndMany => {
            // More writers than this machine has cores, so they contend.
            import(&archive, &dest, Some(4))?;
            let single = t.path().join("single");
            import(&archive, &single, Some(1))?;
            let diff = differences(
                &snapshot(&single, &opts).unwrap(),
                &snapshot(&dest, &opts).unwrap(),
            );
            prop_assert!(
                diff.is_empty(),
                "{format:?}: 4 writers differ from 1 (1 first):\n{}",
                diff.join("\n")
            );
        }
    }
    let want = snapshot(&gnu, &opts).unwrap();
    let got = snapshot(&dest, &opts).unwrap();
    let diff = differences(&want, &got);
    prop_assert!(
        diff.is_empty(),
        "{format:?}: ovl-import differs from GNU tar (GNU tar first):\n{}",
        diff.join("\n")
    );
    // The sparse files keep their holes.
    if matches!(
        format,
        Format::PaxSparse00 | Format::PaxSparse01 | Format::PaxSparse10 | Format::GnuSparse
    ) {
        for (p, e) in &got {
            if e.kind == 'f' && e.size > 4 << 20 {
                use std::os::unix::fs::MetadataExt;
                let md = dest.join(OsStr::from_bytes(p)).metadata().unwrap();
                prop_assert!(
                    md.blocks() * 512 < e.size / 2,
                    "{}: {} bytes in {} blocks: the holes were written",
                    ovl_layer::display_bytes(p),
                    e.size,
                    md.blocks()
                );
            }
        }
    }
    Ok(())
}

#[test]
fn random_trees_import_as_gnu_tar_extracts_them() {
    run(
        32,
        *b"ovl tar world proptest seed 0001",
        false,
        Imports::Default,
    );
}

#[test]
fn random_trees_import_the_same_with_one_writer_or_many() {
    run(
        16,
        *b"ovl tar world proptest writers 1",
        true,
        Imports::SingleAndMany,
    );
}

fn run(default_cases: u32, seed: [u8; 32], big: bool, imports: Imports) {
    if !ovl_tests::require("root", ovl_tests::is_root())
        || !ovl_tests::require("GNU tar", ovl_tests::which("tar").is_some())
    {
        return;
    }
    let cases = std::env::var("OVL_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_cases);
    let config = Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 200,
        ..Config::default()
    };
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &seed));
    let strategy = (prop::collection::vec(node(big), 0..24), format());
    if let Err(e) = runner.run(&strategy, |(nodes, format)| check(&nodes, format, imports)) {
        panic!("{e}");
    }
}
