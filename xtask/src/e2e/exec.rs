//! Running one command of a step: stdin from /dev/null, output captured (or stdout to a file),
//! a time limit, and on failure an error that quotes the exact command line and its output.

use std::fs::File;
use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// No single command of the e2e should take this long; one that does is killed (with every
/// process of its group) and reported, so a hung mount cannot hang CI.
pub const TIMEOUT: Duration = Duration::from_secs(300);

/// What a finished command printed.
#[derive(Debug)]
pub struct Output {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Runs `cmd` to completion (stdout to `stdout_to` when given, else captured); an error naming
/// the command line, its exit status and the tail of its output unless it exits 0.
pub fn run(mut cmd: Command, stdout_to: Option<&Path>) -> Result<Output> {
    let line = command_line(&cmd);
    cmd.stdin(Stdio::null()).stderr(Stdio::piped());
    match stdout_to {
        Some(path) => {
            let f =
                File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
            cmd.stdout(f)
        }
        None => cmd.stdout(Stdio::piped()),
    };
    // Its own process group, so that a timeout kills everything it started (fuse-overlayfs,
    // the command inside the mount, ...).
    cmd.process_group(0);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{line}`"))?;
    let pgid = child.id() as libc::pid_t;
    let reader = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out_thread = reader(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let err_thread = reader(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + TIMEOUT;
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            timed_out = true;
            // SAFETY: a plain syscall on the process group of a child we started.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            break child.wait()?;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let out = Output {
        stdout: out_thread.join().unwrap_or_default(),
        stderr: err_thread.join().unwrap_or_default(),
    };
    if timed_out {
        bail!(
            "`{line}` was killed after {} s\n{}",
            TIMEOUT.as_secs(),
            tails(&out)
        );
    }
    if !status.success() {
        bail!("`{line}` failed ({})\n{}", describe(status), tails(&out));
    }
    Ok(out)
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => status.to_string(),
    }
}

/// The last lines of the output, labelled.
fn tails(out: &Output) -> String {
    let mut s = String::new();
    for (name, bytes) in [("stderr", &out.stderr), ("stdout", &out.stdout)] {
        let text = String::from_utf8_lossy(bytes);
        let lines: Vec<&str> = text.lines().collect();
        if lines.is_empty() {
            continue;
        }
        let from = lines.len().saturating_sub(20);
        s.push_str(&format!(
            "--- {name}{} ---\n",
            if from > 0 { " (last 20 lines)" } else { "" }
        ));
        for l in &lines[from..] {
            s.push_str(l);
            s.push('\n');
        }
    }
    if s.is_empty() {
        s.push_str("(no output)\n");
    }
    s
}

/// The command as a shell line, quoted where needed, to copy and paste.
pub fn command_line(cmd: &Command) -> String {
    let mut parts = Vec::new();
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            parts.push(format!(
                "{}={}",
                k.to_string_lossy(),
                quote(&v.to_string_lossy())
            ));
        }
    }
    parts.push(quote(&cmd.get_program().to_string_lossy()));
    parts.extend(cmd.get_args().map(|a| quote(&a.to_string_lossy())));
    parts.join(" ")
}

fn quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:=+,@%".contains(&b));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}
