//! ovl-unshare: run a command in the user namespace the other ovl tools use, as `podman
//! unshare` does for podman's.
//!
//! Rootless boxes hold files of the user's subordinate ids (and overlayfs's mode-0 `work/work`),
//! which the user cannot remove or change from outside. Inside this namespace the user is
//! container root with the same map every tool uses ([`ovl_layer::UsernsPlan`]:
//! container 0 is the user, 1..=65536 its subordinate ids, or the single-id map), so `rm -rf`
//! works. This crate owns only the choice of where CMD runs and how its status comes back; the
//! namespace itself is [`ovl_layer::spawn_in_userns`].

use std::ffi::OsString;
use std::process::Command;

use ovl_layer::{Identity, Reexec, UsernsError, UsernsPlan};

#[derive(Debug, thiserror::Error)]
pub enum UnshareError {
    #[error("reading /etc/subuid and /etc/subgid")]
    SubIds(#[source] std::io::Error),
    #[error(transparent)]
    Userns(#[from] UsernsError),
    #[error("cannot run {program}")]
    Run {
        program: String,
        #[source]
        source: std::io::Error,
    },
}

impl UnshareError {
    /// The status a shell gives a command it cannot run: 127 not found, 126 otherwise.
    pub fn exit_code(&self) -> i32 {
        let io = match self {
            UnshareError::Run { source, .. }
            | UnshareError::Userns(UsernsError::Spawn { source, .. }) => source,
            _ => return 125,
        };
        if io.kind() == std::io::ErrorKind::NotFound {
            127
        } else {
            126
        }
    }
}

/// Where CMD runs.
#[derive(Debug, Clone)]
pub enum Where {
    /// Real root, or root of a user namespace already (ovl-mount's command, another
    /// `ovl-unshare`, `podman unshare`): as it is.
    Here,
    /// A new user namespace with this map.
    Userns(UsernsPlan),
}

/// Where CMD runs for this process: as it is for real root or root of a user namespace (the
/// tools' own rule, [`Identity::needs_reexec`]), else in the caller's rootless namespace, with
/// the map the tools re-execute into ([`Reexec::plan`]).
pub fn choose() -> Result<Where, UnshareError> {
    if !Identity::current().needs_reexec() {
        return Ok(Where::Here);
    }
    Ok(Where::Userns(
        Reexec::new("ovl-unshare")
            .plan()
            .map_err(UnshareError::SubIds)?,
    ))
}

/// The command line to run: CMD, or `$SHELL` (`/bin/sh` without one).
pub fn command_line(cmd: &[OsString]) -> (OsString, Vec<OsString>) {
    match cmd.split_first() {
        Some((program, args)) => (program.clone(), args.to_vec()),
        None => (
            std::env::var_os("SHELL")
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "/bin/sh".into()),
            Vec::new(),
        ),
    }
}

/// Run `cmd` (or the shell) at `place` with this process's working directory and environment,
/// and return its exit status (128+N for signal N).
pub fn run(cmd: &[OsString], place: &Where) -> Result<i32, UnshareError> {
    let (program, args) = command_line(cmd);
    let mut c = Command::new(&program);
    c.args(&args);
    let run_err = |source| UnshareError::Run {
        program: program.to_string_lossy().into_owned(),
        source,
    };
    let mut child = match place {
        Where::Here => c.spawn().map_err(run_err)?,
        Where::Userns(plan) => {
            // Tools run inside (`ovl-unshare ovl-diff ...`) are then already where they would
            // re-execute themselves to: the same map.
            c.env(ovl_layer::ENV_IN_USERNS, "1");
            ovl_layer::spawn_in_userns(c, plan)?
        }
    };
    // Like a shell waiting for its foreground job: ^C and ^\ are for CMD (it is in the same
    // process group); we wait for it and pass its status on.
    // SAFETY: setting a signal's disposition to SIG_IGN has no preconditions.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGQUIT, libc::SIG_IGN);
    }
    let status = child.wait().map_err(run_err)?;
    Ok(ovl_layer::exit_code(status))
}
