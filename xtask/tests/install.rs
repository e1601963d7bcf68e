//! `cargo xtask install --prefix DIR`: binaries, man pages and completions where each belongs,
//! and what it installs works (the binary runs, man renders the page, bash reads the script).

use std::process::Command;

#[test]
fn install_puts_binaries_man_pages_and_completions_under_the_prefix() {
    let t = tempfile::tempdir().unwrap();
    let prefix = t.path().join("usr");
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["install", "--profile", "dev", "--prefix"])
        .arg(&prefix)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "xtask install failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for tool in xtask::install::TOOLS {
        let bin = prefix.join("bin").join(tool);
        let v = Command::new(&bin).arg("--version").output().unwrap();
        assert!(v.status.success(), "{}", bin.display());
        assert!(String::from_utf8_lossy(&v.stdout).starts_with(tool));

        let page = prefix.join("share/man/man1").join(format!("{tool}.1"));
        if which("man") {
            let man = Command::new("man")
                .arg("-l")
                .arg(&page)
                .env("MANPAGER", "cat")
                .output()
                .unwrap();
            assert!(man.status.success(), "man -l {}", page.display());
            assert!(String::from_utf8_lossy(&man.stdout).contains("SYNOPSIS"));
        } else {
            assert!(std::fs::read_to_string(&page).unwrap().contains(".TH"));
        }
        let bash = prefix.join("share/bash-completion/completions").join(tool);
        let n = Command::new("bash").arg("-n").arg(&bash).status().unwrap();
        assert!(n.success(), "bash -n {}", bash.display());
        for f in [
            prefix
                .join("share/zsh/site-functions")
                .join(format!("_{tool}")),
            prefix
                .join("share/fish/vendor_completions.d")
                .join(format!("{tool}.fish")),
        ] {
            assert!(std::fs::metadata(&f).unwrap().len() > 0, "{}", f.display());
        }
    }
}

fn which(program: &str) -> bool {
    xtask::which(program).is_some()
}
