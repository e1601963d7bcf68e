//! Model-based fuzz test of every reader of kernel-written layers (issue 11), with the kernel as
//! the model: random sequences of operations (create, write, truncate, chmod, chown, setxattr,
//! mkdir, rename of files and directories within and across directories, rm, rm -rf, rm -rf
//! then mkdir (an opaque directory), rmdir, hardlink, symlink) run through real read-write
//! kernel overlay mounts with redirect_dir, metacopy and index on, for 1 to 4 uppers, each rotated into the lowers of the next. Then
//! every tool's result is compared with a fresh read-only kernel mount of the layers (see
//! [`ovl_tests::stack`]): the ovl-diff layers applied by umoci, `ovl-squash --output` of the
//! whole stack, and `ovl-squash --in-place` of each upper in turn.
//!
//! A tool may refuse a stack it cannot read exactly (an `index=on` copy-up of a hardlinked lower
//! file whose other names are not in the upper; a cycle of renames for `--in-place`): counted,
//! never a failure. Anything else that differs fails, after the case is shrunk (whole layers,
//! then single operations dropped while it still fails) and printed as shell commands.
//!
//! `cargo test` runs a fixed seed; `OVL_FUZZ_CASES=N` (and `OVL_FUZZ_SEED=S`) run more.

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use ovl_tests::stack::{RW_OPTS, Stack, compare, snap};
use ovl_tests::{is_root, require, which};

/// xorshift64*: small, seedable, the same everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a, T>(&mut self, v: &'a [T]) -> Option<&'a T> {
        (!v.is_empty()).then(|| &v[self.below(v.len())])
    }
}

/// One operation on the merged view (paths relative to it).
#[derive(Clone, Debug)]
enum Op {
    Write(String, u8),
    Append(String, u8),
    Truncate(String, u64),
    Chmod(String, u32),
    Chown(String, u32, u32),
    SetXattr(String, u8),
    Mkdir(String),
    Rename(String, String),
    Rm(String),
    RmTree(String),
    /// `rm -rf D && mkdir D`: an opaque directory over what was there.
    Recreate(String),
    Rmdir(String),
    Link(String, String),
    Symlink(String, String),
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Write(p, c) => write!(f, "printf '{}' > {p}", content(*c)),
            Op::Append(p, c) => write!(f, "printf '{}' >> {p}", content(*c)),
            Op::Truncate(p, n) => write!(f, "truncate -s {n} {p}"),
            Op::Chmod(p, m) => write!(f, "chmod {m:o} {p}"),
            Op::Chown(p, u, g) => write!(f, "chown -h {u}:{g} {p}"),
            Op::SetXattr(p, v) => write!(f, "setfattr -h -n user.k{} -v {v} {p}", v % 2),
            Op::Mkdir(p) => write!(f, "mkdir {p}"),
            Op::Rename(a, b) => write!(f, "mv -T {a} {b}"),
            Op::Rm(p) => write!(f, "rm {p}"),
            Op::RmTree(p) => write!(f, "rm -rf {p}"),
            Op::Recreate(p) => write!(f, "rm -rf {p} && mkdir {p}"),
            Op::Rmdir(p) => write!(f, "rmdir {p}"),
            Op::Link(a, b) => write!(f, "ln {a} {b}"),
            Op::Symlink(t, p) => write!(f, "ln -s {t} {p}"),
        }
    }
}

fn content(c: u8) -> String {
    std::iter::repeat_n((b'a' + c % 26) as char, 1 + (c as usize % 7) * 3).collect()
}

impl Op {
    /// Run it in the tree at `root`; errors (a name that is not there, a directory that is
    /// not empty, a rename the kernel refuses) are part of the game and ignored.
    fn run(&self, root: &Path) {
        let p = |s: &str| root.join(s);
        let is_link =
            |s: &str| std::fs::symlink_metadata(p(s)).is_ok_and(|m| m.file_type().is_symlink());
        let _ = match self {
            Op::Write(a, c) => std::fs::write(p(a), content(*c)),
            Op::Append(a, c) => {
                use std::io::Write;
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(p(a))
                    .and_then(|mut f| f.write_all(content(*c).as_bytes()))
            }
            Op::Truncate(a, n) => std::fs::OpenOptions::new()
                .write(true)
                .open(p(a))
                .and_then(|f| f.set_len(*n)),
            Op::Chmod(a, m) if !is_link(a) => {
                std::fs::set_permissions(p(a), std::fs::Permissions::from_mode(*m))
            }
            Op::Chmod(..) => Ok(()),
            Op::Chown(a, u, g) => rustix::fs::chownat(
                rustix::fs::CWD,
                p(a),
                Some(rustix::fs::Uid::from_raw(*u)),
                Some(rustix::fs::Gid::from_raw(*g)),
                rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(Into::into),
            Op::SetXattr(a, v) if !is_link(a) => {
                xattr::set(p(a), format!("user.k{}", v % 2), &[b'0' + v % 10])
            }
            Op::SetXattr(..) => Ok(()),
            Op::Mkdir(a) => std::fs::create_dir(p(a)),
            Op::Rename(a, b) => std::fs::rename(p(a), p(b)),
            Op::Rm(a) => std::fs::remove_file(p(a)),
            Op::RmTree(a) => std::fs::remove_dir_all(p(a)),
            Op::Recreate(a) => {
                std::fs::remove_dir_all(p(a)).and_then(|()| std::fs::create_dir(p(a)))
            }
            Op::Rmdir(a) => std::fs::remove_dir(p(a)),
            Op::Link(a, b) => std::fs::hard_link(p(a), p(b)),
            Op::Symlink(t, a) => std::os::unix::fs::symlink(t, p(a)),
        };
    }
}

/// What a tree holds, for choosing operands: (path, is a directory), sorted.
fn entries(root: &Path) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    for e in walkdir::WalkDir::new(root)
        .min_depth(1)
        .follow_links(false)
        .sort_by_file_name()
        .into_iter()
        .flatten()
    {
        let rel = e.path().strip_prefix(root).unwrap();
        out.push((rel.to_string_lossy().into_owned(), e.file_type().is_dir()));
    }
    out
}

const NAMES: [&str; 5] = ["a", "b", "c", "d", "e"];

/// A random operation on the tree at `root`, its operands mostly taken from what is there.
fn random_op(rng: &mut Rng, root: &Path) -> Op {
    let all = entries(root);
    let dirs: Vec<String> = std::iter::once(String::new())
        .chain(all.iter().filter(|e| e.1).map(|e| e.0.clone()))
        .collect();
    let files: Vec<String> = all.iter().filter(|e| !e.1).map(|e| e.0.clone()).collect();
    let any: Vec<String> = all.iter().map(|e| e.0.clone()).collect();
    let new_name = |rng: &mut Rng| {
        let d = rng.pick(&dirs).cloned().unwrap_or_default();
        let n = NAMES[rng.below(NAMES.len())];
        if d.is_empty() {
            n.to_string()
        } else {
            format!("{d}/{n}")
        }
    };
    let existing = |rng: &mut Rng, v: &[String]| -> String {
        match rng.pick(v) {
            Some(p) => p.clone(),
            None => NAMES[rng.below(NAMES.len())].to_string(),
        }
    };
    let c = rng.below(20) as u8;
    match rng.below(18) {
        0 | 1 => Op::Write(new_name(rng), c),
        2 => Op::Write(existing(rng, &files), c),
        3 => Op::Append(existing(rng, &files), c),
        4 => Op::Truncate(existing(rng, &files), [0, 1, 5, 5000][rng.below(4)]),
        5 => Op::Chmod(
            existing(rng, &any),
            [0o600, 0o640, 0o755, 0o4755, 0o700][rng.below(5)],
        ),
        6 => Op::Chown(
            existing(rng, &any),
            rng.below(3) as u32,
            rng.below(3) as u32,
        ),
        7 => Op::SetXattr(existing(rng, &any), c),
        8 | 9 => Op::Mkdir(new_name(rng)),
        10 | 11 => {
            let src = existing(rng, &any);
            // Mostly directories: what redirect_dir is about.
            let src = if rng.below(3) > 0 && dirs.len() > 1 {
                dirs[1 + rng.below(dirs.len() - 1)].clone()
            } else {
                src
            };
            Op::Rename(src, new_name(rng))
        }
        12 => Op::Rm(existing(rng, &files)),
        13 => Op::RmTree(existing(rng, &dirs[1..])),
        14 => Op::Rmdir(existing(rng, &dirs[1..])),
        15 => Op::Link(existing(rng, &files), new_name(rng)),
        16 => Op::Recreate(existing(rng, &dirs[1..])),
        _ => Op::Symlink(
            ["a", "../b", "/c", "d/e"][rng.below(4)].to_string(),
            new_name(rng),
        ),
    }
}

/// A case: the operations that make the base (on a plain directory), then those of each upper.
#[derive(Clone, Debug)]
struct Case {
    base: Vec<Op>,
    uppers: Vec<Vec<Op>>,
}

impl fmt::Display for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "# base (a plain directory)")?;
        for op in &self.base {
            writeln!(f, "{op}")?;
        }
        for (k, ops) in self.uppers.iter().enumerate() {
            writeln!(
                f,
                "# upper {} (mounted over the {} layer(s) below, {RW_OPTS})",
                k + 1,
                k + 1
            )?;
            for op in ops {
                writeln!(f, "{op}")?;
            }
        }
        Ok(())
    }
}

/// How a case ended.
#[derive(Debug)]
enum Outcome {
    Exact,
    /// A tool refused a stack it cannot read exactly: (which tool, why).
    Refused(String),
    Failed(String),
}

/// Refusals that are the promise kept ("refuse it; never guess"), not bugs.
fn known_refusal(err: &str) -> bool {
    err.contains("index=on") || err.contains("in a cycle")
}

/// Build the stack of `case` in `dir` (generating its operations with `rng` when given) and
/// check every tool against a fresh mount.
fn run_case(dir: &Path, case: &mut Case, rng: Option<&mut Rng>, ops_per_layer: usize) -> Outcome {
    let mut s = Stack::new(dir);
    let mut rng = rng;
    if let Some(r) = rng.as_deref_mut() {
        for _ in 0..ops_per_layer * 2 {
            let op = random_op(r, &s.base);
            op.run(&s.base);
            case.base.push(op);
        }
    } else {
        for op in &case.base {
            op.run(&s.base);
        }
    }
    for k in 0..case.uppers.len() {
        let ops = s.add_layer(RW_OPTS, |m| match rng.as_deref_mut() {
            Some(r) => {
                let n = 1 + r.below(ops_per_layer);
                let mut ops = Vec::new();
                for _ in 0..n {
                    let op = random_op(r, m);
                    op.run(m);
                    ops.push(op);
                }
                ops
            }
            None => {
                for op in &case.uppers[k] {
                    op.run(m);
                }
                case.uppers[k].clone()
            }
        });
        case.uppers[k] = ops;
    }
    let want = s.merged();
    let mut refused = Vec::new();
    let checks: [(&str, Box<Check>); 3] = [
        (
            "ovl-diff layers applied by umoci",
            Box::new(|| {
                let w = dir.join("diff");
                std::fs::create_dir_all(&w).unwrap();
                s.diff_applied(&w)
            }),
        ),
        (
            "squash --output",
            Box::new(|| {
                let out = dir.join("out");
                s.squash_output(&out).map(|()| out)
            }),
        ),
        (
            "squash --in-place, layer by layer",
            Box::new(|| s.in_place_chain(dir)),
        ),
    ];
    for (what, check) in checks {
        match check() {
            Ok(result) => {
                let d = compare(&want, &snap(&result));
                if !d.is_empty() {
                    return Outcome::Failed(format!(
                        "{what}: {} differences with a fresh mount:\n{}",
                        d.len(),
                        d.join("\n")
                    ));
                }
            }
            Err(e) if known_refusal(&e) => refused.push(format!("{what}: {}", e.trim())),
            Err(e) => return Outcome::Failed(format!("{what} failed: {e}")),
        }
    }
    if refused.is_empty() {
        Outcome::Exact
    } else {
        Outcome::Refused(refused.join("; "))
    }
}

/// One tool's result for the stack: the tree it made, or its error.
type Check<'a> = dyn Fn() -> Result<std::path::PathBuf, String> + 'a;

fn replay(case: &Case) -> Outcome {
    let t = tempfile::tempdir().unwrap();
    let mut c = case.clone();
    run_case(t.path(), &mut c, None, 0)
}

/// The smallest case that still fails: whole uppers, then single operations left out while
/// the failure stays (at most `budget` replays).
fn shrink(mut case: Case, mut budget: usize) -> (Case, String) {
    let mut last = match replay(&case) {
        Outcome::Failed(m) => m,
        other => return (case, format!("(did not fail again: {other:?})")),
    };
    let mut progress = true;
    while progress && budget > 0 {
        progress = false;
        let mut candidates: Vec<Case> = Vec::new();
        for k in (0..case.uppers.len()).rev() {
            if case.uppers.len() > 1 {
                let mut c = case.clone();
                c.uppers.remove(k);
                candidates.push(c);
            }
        }
        for k in (0..case.uppers.len()).rev() {
            for i in (0..case.uppers[k].len()).rev() {
                let mut c = case.clone();
                c.uppers[k].remove(i);
                candidates.push(c);
            }
        }
        for i in (0..case.base.len()).rev() {
            let mut c = case.clone();
            c.base.remove(i);
            candidates.push(c);
        }
        for c in candidates {
            if budget == 0 {
                break;
            }
            budget -= 1;
            if let Outcome::Failed(m) = replay(&c) {
                case = c;
                last = m;
                progress = true;
                break;
            }
        }
    }
    (case, last)
}

#[test]
fn kernel_layers_read_back_exactly() {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !require("root (kernel overlay mounts)", is_root())
        || !require("umoci", which("umoci").is_some())
    {
        return;
    }
    let cases: usize = std::env::var("OVL_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32);
    let seed: u64 = std::env::var("OVL_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x0c11_5eed_2026);
    let mut rng = Rng(seed | 1);
    let (mut exact, mut refused, mut layers, mut ops) = (0, 0, 0, 0);
    for n in 0..cases {
        let uppers = 1 + rng.below(4);
        let mut case = Case {
            base: Vec::new(),
            uppers: vec![Vec::new(); uppers],
        };
        let t = tempfile::tempdir().unwrap();
        let outcome = run_case(t.path(), &mut case, Some(&mut rng), 8);
        layers += uppers;
        ops += case.base.len() + case.uppers.iter().map(Vec::len).sum::<usize>();
        match outcome {
            Outcome::Exact => exact += 1,
            Outcome::Refused(why) => {
                refused += 1;
                eprintln!("case {n}: refused (allowed): {why}");
            }
            Outcome::Failed(first) => {
                eprintln!("case {n} failed:\n{first}\n{case}\nshrinking...");
                let (small, msg) = shrink(case, 300);
                panic!("case {n} (seed {seed}) fails; a minimal sequence:\n{small}\n{msg}");
            }
        }
    }
    eprintln!(
        "fuzz: {cases} cases (seed {seed}), {layers} uppers over a base, {ops} operations, \
         {RW_OPTS}: {exact} exact, {refused} refused as unreadable"
    );
}
