//! What a new user meets first, for every tool: `--generate` (man page, completions),
//! `--version` with the git commit, usage lines, where `--json` goes, progress bars on a
//! terminal, and error messages that say each cause once and what to do.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use ovl_tests::{TOOLS, bin, output, require, run_ok, which};

fn tool(name: &str) -> Command {
    Command::new(bin(name))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn every_tool_generates_its_man_page_and_completions() {
    for name in TOOLS {
        let man = run_ok(tool(name).args(["--generate", "man"]));
        let man = String::from_utf8(man).unwrap();
        assert!(man.contains(".TH") && man.contains(name), "{name}: {man}");
        assert!(
            man.contains("generate"),
            "{name}: the man page lacks --generate"
        );

        let bash = run_ok(tool(name).args(["--generate", "complete-bash"]));
        assert!(String::from_utf8_lossy(&bash).contains(name), "{name}");
        for (kind, marker) in [
            ("complete-zsh", "#compdef"),
            ("complete-fish", "complete -c"),
        ] {
            let text = run_ok(tool(name).args(["--generate", kind]));
            let text = String::from_utf8_lossy(&text);
            assert!(
                text.contains(marker) && text.contains(name),
                "{name} {kind}: {text}"
            );
        }
    }
}

#[test]
fn bash_accepts_every_completion_script() {
    for name in TOOLS {
        let script = run_ok(tool(name).args(["--generate", "complete-bash"]));
        let t = tempfile::tempdir().unwrap();
        let file = t.path().join(name);
        std::fs::write(&file, &script).unwrap();
        let out = output(Command::new("bash").arg("-n").arg(&file));
        assert!(out.status.success(), "{name}: bash -n: {}", stderr(&out));
    }
}

#[test]
fn man_renders_every_page() {
    if !require("man (package man-db)", which("man").is_some()) {
        return;
    }
    for name in TOOLS {
        let page = run_ok(tool(name).args(["--generate", "man"]));
        let t = tempfile::tempdir().unwrap();
        let file = t.path().join(format!("{name}.1"));
        std::fs::write(&file, &page).unwrap();
        let out = output(
            Command::new("man")
                .arg("-l")
                .arg(&file)
                .env("MANPAGER", "cat")
                .env("MANWIDTH", "100")
                .env("LC_ALL", "C.UTF-8"),
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{name}: man -l: {}", stderr(&out));
        assert!(
            text.contains("NAME") && text.contains("SYNOPSIS") && text.contains("--generate"),
            "{name}: {text}"
        );
        assert!(
            !stderr(&out).contains("warning"),
            "{name}: roff warnings: {}",
            stderr(&out)
        );
    }
}

#[test]
fn the_version_names_the_git_commit() {
    let head = Command::new("git")
        .arg("-C")
        .arg(env!("CARGO_MANIFEST_DIR"))
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    for name in TOOLS {
        let v = String::from_utf8(run_ok(tool(name).arg("--version"))).unwrap();
        let want = match &head {
            Some(h) => format!("{name} {} (git {h})", env!("CARGO_PKG_VERSION")),
            None => format!("{name} {} (git unknown)", env!("CARGO_PKG_VERSION")),
        };
        assert_eq!(v.trim(), want);
    }
}

#[test]
fn squash_usage_shows_the_required_choice() {
    let help = String::from_utf8(run_ok(tool("ovl-squash").arg("--help"))).unwrap();
    assert!(
        help.contains("(--output NEWDIR | --in-place)"),
        "usage: {help}"
    );
    let out = output(tool("ovl-squash").args(["--lower", "l", "--upper", "u"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("(--output NEWDIR | --in-place)"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn diff_to_a_file_writes_the_json_descriptor_to_stdout() {
    let t = tempfile::tempdir().unwrap();
    let upper = t.path().join("upper");
    std::fs::create_dir(&upper).unwrap();
    std::fs::write(upper.join("f"), "x").unwrap();
    let layer = t.path().join("layer.tar");
    let out = output(
        tool("ovl-diff")
            .arg(&upper)
            .arg("-o")
            .arg(&layer)
            .arg("--json"),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let json = String::from_utf8_lossy(&out.stdout);
    assert!(
        json.trim_start().starts_with('{') && json.contains("\"digest\": \"sha256:"),
        "stdout: {json:?}"
    );
    assert!(!stderr(&out).contains("\"digest\""), "{}", stderr(&out));
    assert!(layer.is_file());
}

/// Run `cmd` (a shell command line) on a pseudo-terminal; what the terminal showed.
fn on_a_terminal(cmd: &str, log: &Path) -> String {
    run_ok(
        Command::new("script")
            .args(["-qec", cmd])
            .arg(log)
            .stdin(Stdio::null()),
    );
    String::from_utf8_lossy(&std::fs::read(log).unwrap()).into_owned()
}

/// A tree big enough to take a while (many files of some size).
fn busy_tree(dir: &Path) {
    std::fs::create_dir(dir).unwrap();
    let data = vec![7u8; 256 * 1024];
    for i in 0..200 {
        std::fs::write(dir.join(format!("f{i}")), &data).unwrap();
    }
}

#[test]
fn diff_and_squash_show_progress_on_a_terminal_and_never_with_quiet() {
    if !require(
        "script (util-linux) for a pseudo-terminal",
        which("script").is_some(),
    ) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (lower, upper) = (t.path().join("lower"), t.path().join("upper"));
    std::fs::create_dir(&lower).unwrap();
    busy_tree(&upper);
    let p = |p: &Path| p.display().to_string();
    let diff = |extra: &str, n: &str| {
        on_a_terminal(
            &format!(
                "{} {extra} {} -o {}",
                p(&bin("ovl-diff")),
                p(&upper),
                p(&t.path().join(format!("{n}.tar")))
            ),
            &t.path().join(format!("{n}.log")),
        )
    };
    let shown = diff("", "a");
    assert!(
        shown.contains("diff ") && shown.contains("B/s"),
        "no bar: {shown:?}"
    );
    let quiet = diff("--quiet", "b");
    assert!(!quiet.contains("B/s"), "--quiet drew a bar: {quiet:?}");

    let squash = |extra: &str, n: &str| {
        on_a_terminal(
            &format!(
                "{} {extra} --lower {} --upper {} --output {}",
                p(&bin("ovl-squash")),
                p(&lower),
                p(&upper),
                p(&t.path().join(n))
            ),
            &t.path().join(format!("{n}.log")),
        )
    };
    let shown = squash("", "c");
    assert!(
        shown.contains("squash ") && shown.contains(" steps"),
        "no bar: {shown:?}"
    );
    let quiet = squash("--quiet", "d");
    assert!(!quiet.contains(" steps"), "--quiet drew a bar: {quiet:?}");
}

/// Each cause once: the OS error text appears exactly once in the message.
fn says_once(out: &Output, cause: &str) {
    let e = stderr(out);
    assert!(!out.status.success(), "{e}");
    assert_eq!(
        e.matches(cause).count(),
        1,
        "{cause:?} not said exactly once: {e}"
    );
    assert_eq!(e.lines().count(), 1, "one line: {e}");
}

#[test]
fn each_cause_is_said_once() {
    let t = tempfile::tempdir().unwrap();
    let lower = t.path().join("lower");
    std::fs::create_dir(&lower).unwrap();
    let missing = t.path().join("box/overlay/uper");
    const ENOENT: &str = "No such file or directory";

    let out = output(
        tool("ovl-squash")
            .arg("--lower")
            .arg(&lower)
            .arg("--upper")
            .arg(&missing)
            .arg("--output")
            .arg(t.path().join("out")),
    );
    says_once(&out, ENOENT);
    assert_eq!(
        stderr(&out)
            .matches(&*missing.display().to_string())
            .count(),
        2,
        "{}",
        stderr(&out)
    );

    let out = output(
        tool("ovl-diff")
            .arg(&missing)
            .arg("-o")
            .arg(t.path().join("l.tar")),
    );
    says_once(&out, ENOENT);

    let out = output(
        tool("ovl-import")
            .arg(t.path().join("no-such.tar"))
            .arg(t.path().join("dest")),
    );
    says_once(&out, ENOENT);

    let out = output(
        tool("ovl-mount")
            .arg("--lower")
            .arg(t.path().join("no-lower"))
            .arg(&lower)
            .args(["--", "true"]),
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).matches("no-lower").count() <= 2,
        "{}",
        stderr(&out)
    );
    assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
}

#[test]
fn a_missing_parent_says_what_to_mkdir() {
    let t = tempfile::tempdir().unwrap();
    let lower = t.path().join("lower");
    std::fs::create_dir(&lower).unwrap();
    let upper = t.path().join("upper");
    std::fs::create_dir(&upper).unwrap();
    let archive = t.path().join("a.tar");
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(1);
    h.set_mode(0o644);
    b.append_data(&mut h, "f", &b"x"[..]).unwrap();
    std::fs::write(&archive, b.into_inner().unwrap()).unwrap();
    let parent = t.path().join("no/such/dir");
    let want = format!("mkdir -p {}", parent.display());

    let out = output(tool("ovl-import").arg(&archive).arg(parent.join("dest")));
    assert!(stderr(&out).contains(&want), "{}", stderr(&out));
    let out = output(
        tool("ovl-squash")
            .arg("--lower")
            .arg(&lower)
            .arg("--upper")
            .arg(&upper)
            .arg("--output")
            .arg(parent.join("out")),
    );
    assert!(stderr(&out).contains(&want), "{}", stderr(&out));
    let out = output(
        tool("ovl-diff")
            .arg(&upper)
            .arg("-o")
            .arg(parent.join("l.tar")),
    );
    assert!(stderr(&out).contains(&want), "{}", stderr(&out));
}
