//! `ovl-diff --oci-layout` into a layout someone else can write to: nothing planted in it makes
//! ovl-diff write outside it, and a hostile `index.json`, manifest or config (a digest that is
//! a path, a FIFO, a symlink to /dev/zero, 300 MB of JSON, a size that lies) is refused quickly
//! with a message naming it, before the layer is written, leaving the layout as it was.
//!
//! Every run goes through `sh` under `ulimit -v` (a run that reads /dev/zero must not take the
//! machine's memory with it) and is killed after 30 s (a run that opens a FIFO would wait
//! forever); `sh` waits for a line on stdin before it execs ovl-diff, so a test knows the PID
//! ovl-diff will have and can plant things at the names a PID-based scheme would use.

use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use sha2::Digest;

const BIN: &str = env!("CARGO_BIN_EXE_ovl-diff");

/// Run ovl-diff with `args`; `plant` runs with its PID before it starts. `None`: killed after
/// 30 s.
fn run(args: &[&std::ffi::OsStr], plant: impl FnOnce(u32)) -> Option<Output> {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(r#"ulimit -v 4000000; read _ || exit 99; exec "$0" "$@""#)
        .arg(BIN)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    plant(child.id());
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(child.wait_with_output().unwrap())
}

fn append(layout: &Path, upper: &Path, plant: impl FnOnce(u32)) -> Option<Output> {
    let spec = format!("{}:v1", layout.display());
    run(
        &[
            "-q".as_ref(),
            "--oci-layout".as_ref(),
            spec.as_ref(),
            upper.as_os_str(),
        ],
        plant,
    )
}

fn upper(t: &Path, name: &str) -> PathBuf {
    let u = t.join(name);
    std::fs::create_dir_all(u.join("etc")).unwrap();
    std::fs::write(u.join("etc").join(name), name).unwrap();
    u
}

/// A layout made by ovl-diff, with one image tagged v1.
fn layout(t: &Path, name: &str) -> PathBuf {
    let l = t.join(name);
    let o = append(&l, &upper(t, &format!("{name}-base")), |_| {}).expect("ovl-diff hung");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    l
}

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn blob(l: &Path, digest: &str) -> PathBuf {
    l.join("blobs/sha256")
        .join(digest.strip_prefix("sha256:").unwrap())
}

fn put(l: &Path, bytes: &[u8]) -> String {
    let d = format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)));
    std::fs::write(blob(l, &d), bytes).unwrap();
    d
}

/// The descriptor of the v1 image in index.json.
fn top(l: &Path) -> serde_json::Value {
    json(&l.join("index.json"))["manifests"][0].clone()
}

fn set_top(l: &Path, desc: serde_json::Value) {
    let mut index = json(&l.join("index.json"));
    index["manifests"][0] = desc;
    std::fs::write(l.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
}

fn mkfifo(p: &Path) {
    let _ = std::fs::remove_file(p);
    rustix::fs::mknodat(
        rustix::fs::CWD,
        p,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
}

/// Every name below `dir` with what it is (a FIFO is not opened, a large file not read).
fn state(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut v: Vec<_> = walkdir::WalkDir::new(dir)
        .into_iter()
        .map(|e| {
            let e = e.unwrap();
            let ft = e.file_type();
            let what = if ft.is_symlink() {
                format!("-> {}", std::fs::read_link(e.path()).unwrap().display())
            } else if ft.is_fifo() {
                "fifo".into()
            } else if ft.is_file() && e.metadata().unwrap().len() > 1 << 20 {
                format!("{} bytes", e.metadata().unwrap().len())
            } else if ft.is_file() {
                hex::encode(sha2::Sha256::digest(std::fs::read(e.path()).unwrap()))
            } else {
                "dir".into()
            };
            (e.path().to_path_buf(), what)
        })
        .collect();
    v.sort();
    v
}

/// Symlinks at the names the temporary files of a PID-named scheme would have, and a symlinked
/// `blobs/`: an append writes none of their targets and still lands; the symlinked `blobs/` is
/// refused.
#[test]
fn nothing_planted_in_the_layout_makes_ovl_diff_write_outside_it() {
    let t = tempfile::tempdir().unwrap();
    let l = layout(t.path(), "img");
    let victims: Vec<PathBuf> = (0..3)
        .map(|i| t.path().join(format!("victim{i}")))
        .collect();
    for v in &victims {
        std::fs::write(v, b"precious").unwrap();
    }
    let u = upper(t.path(), "two");
    let o = append(&l, &u, |pid| {
        // What ovl-diff used to open with create+truncate, following symlinks.
        for (name, v) in [
            (format!("blobs/sha256/.ovl-diff-{pid}.tmp"), &victims[0]),
            (format!(".index.json.ovl-diff-{pid}"), &victims[1]),
            (format!(".oci-layout.ovl-diff-{pid}"), &victims[2]),
        ] {
            std::os::unix::fs::symlink(v, l.join(name)).unwrap();
        }
    })
    .expect("ovl-diff hung");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for v in &victims {
        let now = std::fs::read(v).unwrap();
        assert!(
            now == b"precious",
            "{} was written ({} bytes)",
            v.display(),
            now.len()
        );
    }
    assert!(
        std::fs::symlink_metadata(l.join("index.json"))
            .unwrap()
            .is_file()
    );
    let manifest = json(&blob(&l, top(&l)["digest"].as_str().unwrap()));
    assert_eq!(manifest["layers"].as_array().unwrap().len(), 2);
    // Nothing of ovl-diff's own left behind: only the planted links start with a dot.
    let dots = std::fs::read_dir(l.join("blobs/sha256"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().as_bytes().starts_with(b"."))
        .count();
    assert_eq!(dots, 1);

    // `blobs` a symlink to a directory outside the layout: refused, nothing written there.
    let l2 = layout(t.path(), "img2");
    let outside = t.path().join("outside");
    std::fs::rename(l2.join("blobs"), &outside).unwrap();
    std::os::unix::fs::symlink(&outside, l2.join("blobs")).unwrap();
    let before = (state(&outside), state(&l2));
    let o = append(&l2, &u, |_| {}).expect("ovl-diff hung");
    assert!(
        !o.status.success(),
        "a symlinked blobs/ was written through"
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("blobs: not a directory (a symlink)"), "{err}");
    assert_eq!((state(&outside), state(&l2)), before);
}

/// Each hostile layout: what is done to it, and what the error must say.
fn tamper(l: &Path, what: &str) {
    let desc = top(l);
    let manifest_path = blob(l, desc["digest"].as_str().unwrap());
    let manifest = json(&manifest_path);
    match what {
        "index-digest-abs" => {
            let mut d = desc;
            d["digest"] = "sha256:/etc/hostname".into();
            set_top(l, d);
        }
        "config-digest-dotdot" => {
            let mut m = manifest;
            m["config"]["digest"] = "sha256:../../../../../../../../../../dev/zero".into();
            let bytes = serde_json::to_vec(&m).unwrap();
            let mut d = desc;
            d["digest"] = put(l, &bytes).into();
            d["size"] = bytes.len().into();
            set_top(l, d);
        }
        "index-300mb" => {
            let f = std::fs::File::create(l.join("index.json")).unwrap();
            f.set_len(300 << 20).unwrap();
        }
        "index-fifo" => mkfifo(&l.join("index.json")),
        "manifest-fifo" => mkfifo(&manifest_path),
        "config-dev-zero" => {
            let p = blob(l, manifest["config"]["digest"].as_str().unwrap());
            std::fs::remove_file(&p).unwrap();
            std::os::unix::fs::symlink("/dev/zero", &p).unwrap();
        }
        "manifest-size-lies" => {
            let mut d = desc;
            d["size"] = (d["size"].as_u64().unwrap() + 1).into();
            set_top(l, d);
        }
        _ => unreachable!(),
    }
}

#[test]
fn a_hostile_layout_is_refused_quickly_and_left_as_it_was() {
    let t = tempfile::tempdir().unwrap();
    let u = upper(t.path(), "new");
    let mut problems = Vec::new();
    for (what, says) in [
        ("index-digest-abs", "not a digest"),
        ("config-digest-dotdot", "not a digest"),
        ("index-300mb", "more than the 4 MiB"),
        ("index-fifo", "not a regular file (a FIFO)"),
        ("manifest-fifo", "not a regular file (a FIFO)"),
        ("config-dev-zero", "not a regular file (a symlink)"),
        ("manifest-size-lies", "its descriptor says"),
    ] {
        let l = layout(t.path(), what);
        tamper(&l, what);
        let before = state(&l);
        let Some(o) = append(&l, &u, |_| {}) else {
            problems.push(format!("{what}: still running after 30 s"));
            continue;
        };
        let err = String::from_utf8_lossy(&o.stderr);
        if o.status.success() || o.status.code().is_none() {
            problems.push(format!("{what}: {:?}, not a clean error: {err}", o.status));
        } else if !err.contains(says) {
            problems.push(format!("{what}: the error does not say {says:?}: {err}"));
        }
        if state(&l) != before {
            problems.push(format!("{what}: the layout changed"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
