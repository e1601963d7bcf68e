//! Running the command inside the mount.
//!
//! Owns the child process: its working directory (MERGED, or `/` of MERGED with `--chroot`),
//! the signals the supervising ovl-mount ignores while it waits (SIGINT and SIGQUIT belong to
//! the command) and restores for the command, its environment under `--chroot` (the standard PATH,
//! HOME=/root, the terminal and locale variables, nothing else of the host's), and its exit status as a shell reports it.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use crate::error::{MountError, Result};

/// PATH for a command run with `--chroot`.
pub(crate) const CHROOT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The variables of ovl-mount's environment a `--chroot` command keeps.
pub(crate) fn chroot_keeps(name: &str) -> bool {
    matches!(name, "TERM" | "LANG" | "TZ" | "COLORTERM") || name.starts_with("LC_")
}

/// Ignore the terminal's SIGINT and SIGQUIT in this (supervising) process.
pub(crate) fn ignore_terminal_signals() {
    // SAFETY: setting a signal disposition to SIG_IGN has no memory-safety preconditions.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGQUIT, libc::SIG_IGN);
    }
}

/// Run `argv` with MERGED as its working directory (or its root), as root of the user
/// namespace `userns` when given (a shifted mount), wait, and return its exit code (128+N for
/// a signal).
pub(crate) fn run(
    argv: &[OsString],
    merged: &Path,
    chroot: bool,
    userns: Option<std::os::fd::RawFd>,
) -> Result<i32> {
    let (program, args) = argv.split_first().expect("a command");
    let mut cmd = Command::new(program);
    // The command is not a re-executed ovl tool, even if it runs one.
    cmd.args(args).env_remove(ovl_layer::ENV_IN_USERNS);
    let root = if chroot {
        Some(crate::kernel::c_path(merged)?)
    } else {
        None
    };
    if root.is_none() {
        cmd.current_dir(merged);
    }
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure only makes async-signal-safe calls (prctl, getppid, signal, chroot,
    // chdir, setns, setgroups, setresgid, setresuid) on memory prepared before the fork; the
    // user namespace fd lives in the parent until the command has been waited for.
    unsafe {
        cmd.pre_exec(move || {
            // CMD must not outlive us (e.g. a SIGTERM to ovl-mount): it would keep the mount
            // namespace, and so the overlay and its upper, alive.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 || libc::getppid() != parent
            {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            libc::signal(libc::SIGQUIT, libc::SIG_DFL);
            if let Some(root) = &root {
                if libc::chroot(root.as_ptr()) != 0 || libc::chdir(c"/".as_ptr()) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // Last, as real root still: the command becomes root of the shifted namespace.
            // The change of uid clears the parent-death signal: set it again.
            if let Some(ns) = userns {
                ovl_layer::join_raw(ns)?;
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0
                    || libc::getppid() != parent
                {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
            }
            Ok(())
        });
    }
    if chroot {
        // The host's environment means little in the image (its PATH, HOME and SHELL may not
        // exist there): keep only the terminal and locale, as a container runtime would.
        let keep: Vec<(OsString, OsString)> = std::env::vars_os()
            .filter(|(k, _)| k.to_str().is_some_and(chroot_keeps))
            .collect();
        cmd.env_clear()
            .envs(keep)
            .env("PATH", CHROOT_PATH)
            .env("HOME", "/root");
    }
    let name = program.to_string_lossy().into_owned();
    let mut child = cmd.spawn().map_err(|source| MountError::Command {
        program: name.clone(),
        source,
    })?;
    let status = child.wait().map_err(|source| MountError::Command {
        program: name,
        source,
    })?;
    Ok(ovl_layer::exit_code(status))
}
