//! `cargo xtask install [--prefix DIR]`: what a package maker runs. Builds the tools, then
//! installs each binary to PREFIX/bin, its man page (from `TOOL --generate man`) to
//! PREFIX/share/man/man1, and its bash, zsh and fish completions where those shells look
//! (share/bash-completion/completions, share/zsh/site-functions,
//! share/fish/vendor_completions.d). `--destdir` stages the whole tree under another root, as
//! `make install DESTDIR=` does. A user installs with `cargo install` instead (binaries only).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The binaries `install` puts in PREFIX/bin.
pub const TOOLS: [&str; 5] = [
    "ovl-import",
    "ovl-mount",
    "ovl-diff",
    "ovl-squash",
    "ovl-unshare",
];

#[derive(Debug, clap::Args)]
pub struct InstallArgs {
    /// The installation prefix.
    #[arg(long, value_name = "DIR", default_value = "/usr/local")]
    pub prefix: PathBuf,
    /// Stage the files under DIR (DIR/PREFIX/bin/...), for packaging.
    #[arg(long, value_name = "DIR")]
    pub destdir: Option<PathBuf>,
    /// The cargo profile to build and install (`dev` builds faster; for trying it out).
    #[arg(long, value_name = "NAME", default_value = "release")]
    pub profile: String,
}

/// Where each generated file goes, relative to PREFIX: (`--generate` kind, directory, file name).
fn generated(tool: &str) -> [(&'static str, &'static str, String); 4] {
    [
        ("man", "share/man/man1", format!("{tool}.1")),
        (
            "complete-bash",
            "share/bash-completion/completions",
            tool.to_string(),
        ),
        (
            "complete-zsh",
            "share/zsh/site-functions",
            format!("_{tool}"),
        ),
        (
            "complete-fish",
            "share/fish/vendor_completions.d",
            format!("{tool}.fish"),
        ),
    ]
}

pub fn run(args: &InstallArgs) -> Result<()> {
    let mut build = crate::cargo();
    build.current_dir(crate::workspace_root()).args([
        "build",
        "--bins",
        "--profile",
        &args.profile,
    ]);
    for tool in TOOLS {
        build.args(["-p", tool]);
    }
    eprintln!(
        "install: cargo build --profile {} (the tools)",
        args.profile
    );
    crate::run(&mut build)?;
    let built = crate::target_dir().join(match args.profile.as_str() {
        "dev" | "test" => "debug",
        "bench" => "release",
        other => other,
    });
    let root = match &args.destdir {
        Some(d) => d.join(args.prefix.strip_prefix("/").unwrap_or(&args.prefix)),
        None => args.prefix.clone(),
    };
    for tool in TOOLS {
        let from = built.join(tool);
        let bin = root.join("bin").join(tool);
        put(
            &bin,
            &fs::read(&from).with_context(|| format!("cannot read {}", from.display()))?,
            0o755,
        )?;
        for (kind, dir, name) in generated(tool) {
            let out = Command::new(&from)
                .args(["--generate", kind])
                .output()
                .with_context(|| format!("cannot run {}", from.display()))?;
            if !out.status.success() || out.stdout.is_empty() {
                bail!(
                    "{} --generate {kind} failed ({}): {}",
                    from.display(),
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            put(&root.join(dir).join(name), &out.stdout, 0o644)?;
        }
    }
    println!(
        "install: {} tools, their man pages and bash, zsh and fish completions under {}",
        TOOLS.len(),
        root.display()
    );
    if args.destdir.is_none() {
        let bin = root.join("bin");
        if let Some(dir) = ovl_tests::not_searchable_by_others(&bin) {
            println!(
                "install: warning: {} is not searchable by other users: a rootless user cannot \
                 run the tools from {}",
                dir.display(),
                bin.display()
            );
        }
        let in_path =
            std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d == bin));
        if !in_path {
            println!("install: note: {} is not in PATH", bin.display());
        }
    }
    Ok(())
}

/// Write `data` to `path` with `mode`, through a temporary sibling renamed into place (a running
/// binary is replaced, not overwritten), making the directories on the way.
fn put(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    let dir = path.parent().context("no parent directory")?;
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".xtask-install-{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    fs::write(&tmp, data).with_context(|| format!("cannot write {}", tmp.display()))?;
    let done = fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))
        .and_then(|()| fs::rename(&tmp, path));
    if let Err(e) = done {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot install {}", path.display()));
    }
    println!("  {}", path.display());
    Ok(())
}
