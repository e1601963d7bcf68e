//! Running a process inside a new user namespace, mapped with newuidmap/newgidmap.
//!
//! Owns the rootless re-exec every tool uses: `unshare(CLONE_NEWUSER)` fails in a multithreaded
//! process, so the namespace is made in the forked child (single-threaded by definition) right
//! before it execs, while a thread of the parent writes its id maps. The child waits on a pipe
//! until the maps are in place, so when the new program starts it already is container root.
//! Whether a tool needs this at all is decided by [`crate::identity`].

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus};

use crate::idmap::{IdMap, RootlessMaps};

/// Set in the environment of a program that [`reexec_self`] started inside the namespace.
pub const ENV_IN_USERNS: &str = "OVL_IN_USERNS";

#[derive(Debug, thiserror::Error)]
pub enum UsernsError {
    #[error(
        "cannot create a user namespace: {0} (are unprivileged user namespaces enabled? \
         check sysctl user.max_user_namespaces and kernel.apparmor_restrict_unprivileged_userns)"
    )]
    Unshare(std::io::Error),
    #[error(
        "{tool} not found in PATH: install the `uidmap` package to use your subordinate ids \
         from /etc/subuid and /etc/subgid"
    )]
    NoMapTool { tool: &'static str },
    #[error("writing the id map of the new user namespace failed: {0}")]
    Map(String),
    #[error("cannot start {program}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
}

/// What the new namespace looks like.
#[derive(Debug, Clone)]
pub struct UsernsPlan {
    pub maps: RootlessMaps,
    /// Also unshare the mount namespace (for mounting inside).
    pub mount_ns: bool,
}

impl UsernsPlan {
    /// The plan for the calling user: subordinate ids when it has them, else a single-id map.
    pub fn for_current_user(mount_ns: bool) -> std::io::Result<Self> {
        Ok(Self {
            maps: RootlessMaps::for_current_user()?,
            mount_ns,
        })
    }
}

/// True in a process that [`reexec_self`] started (not in any other user namespace: whether this
/// process is real root is [`crate::identity::Identity`]'s to say).
pub fn in_userns() -> bool {
    // The variable alone is not proof (it can be inherited or set by hand): the process must
    // also be in a user namespace, i.e. not see the initial identity map.
    std::env::var_os(ENV_IN_USERNS).is_some() && current_maps().uid != IdMap::identity()
}

/// The path of a program in PATH.
pub fn which(program: &str) -> Option<PathBuf> {
    let path =
        std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin:/usr/sbin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| rustix::fs::access(p, rustix::fs::Access::EXEC_OK).is_ok())
}

/// Run this program again with the same arguments inside a new user namespace, wait for it, and
/// return its exit code (128+N for a signal, as a shell reports it).
pub fn reexec_self(plan: &UsernsPlan) -> Result<i32, UsernsError> {
    let mut cmd = Command::new("/proc/self/exe");
    let mut args = std::env::args_os();
    if let Some(arg0) = args.next() {
        cmd.arg0(arg0);
    }
    cmd.args(args).env(ENV_IN_USERNS, "1");
    let mut child = spawn_in_userns(cmd, plan)?;
    // A SIGTERM (or SIGINT, SIGHUP) to us goes on to the child, which cleans up and exits
    // 128+N; dying here instead would SIGKILL it (PDEATHSIG) and leave its work behind.
    let forwarding = crate::staging::forward_interrupts(child.id());
    let status = child.wait();
    crate::staging::stop_forwarding();
    forwarding.map_err(|source| UsernsError::Spawn {
        program: "signal forwarding".into(),
        source,
    })?;
    let status = status.map_err(|source| UsernsError::Spawn {
        program: "/proc/self/exe".into(),
        source,
    })?;
    Ok(exit_code(status))
}

/// The exit code a shell would report for `status`.
pub fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// Spawn `cmd` inside a new user namespace described by `plan`.
pub fn spawn_in_userns(mut cmd: Command, plan: &UsernsPlan) -> Result<Child, UsernsError> {
    let tools = if plan.maps.uid.is_single() && plan.maps.gid.is_single() {
        None
    } else {
        let uid = which("newuidmap").ok_or(UsernsError::NoMapTool { tool: "newuidmap" })?;
        let gid = which("newgidmap").ok_or(UsernsError::NoMapTool { tool: "newgidmap" })?;
        Some((uid, gid))
    };
    let (to_parent_r, to_parent_w) = pipe()?;
    let (to_child_r, to_child_w) = pipe()?;
    let mut flags = libc::CLONE_NEWUSER;
    if plan.mount_ns {
        flags |= libc::CLONE_NEWNS;
    }
    let (w, r) = (to_parent_w.as_raw_fd(), to_child_r.as_raw_fd());
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the forked child and only makes raw syscalls (prctl, getppid,
    // unshare, getpid, write, read): nothing that allocates or takes a lock.
    unsafe {
        cmd.pre_exec(move || {
            // The namespaced child dies with us (a SIGTERM to the tool must not leave it
            // working on, or holding a mount namespace).
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 || libc::getppid() != parent
            {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            if libc::unshare(flags) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let pid = libc::getpid().to_ne_bytes();
            if libc::write(w, pid.as_ptr().cast(), pid.len()) != pid.len() as isize {
                return Err(std::io::Error::last_os_error());
            }
            let mut ok = [0u8; 1];
            if libc::read(r, ok.as_mut_ptr().cast(), 1) != 1 || ok[0] != b'1' {
                return Err(std::io::Error::from_raw_os_error(libc::EPERM));
            }
            Ok(())
        });
    }
    let program = cmd.get_program().to_string_lossy().into_owned();
    std::thread::scope(|s| {
        let mapper = s.spawn(move || -> Result<(), UsernsError> {
            let mut to_parent_r = std::fs::File::from(to_parent_r);
            let mut to_child_w = std::fs::File::from(to_child_w);
            let mut pid = [0u8; 4];
            if to_parent_r.read_exact(&mut pid).is_err() {
                return Ok(()); // the child failed before unsharing: spawn() reports why
            }
            let pid = i32::from_ne_bytes(pid);
            let res = write_maps(pid, plan, tools.as_ref());
            let _ = to_child_w.write_all(if res.is_ok() { b"1" } else { b"0" });
            res
        });
        let spawned = cmd.spawn();
        // Our copies of the child's pipe ends: closing them lets the mapper see EOF if the child
        // died before writing its pid.
        drop(to_parent_w);
        drop(to_child_r);
        let mapped = mapper.join().expect("id map thread panicked");
        match (spawned, mapped) {
            (Ok(child), Ok(())) => Ok(child),
            (Ok(mut child), Err(e)) => {
                let _ = child.wait();
                Err(e)
            }
            (Err(_), Err(e)) => Err(e),
            (Err(e), Ok(()))
                if e.raw_os_error() == Some(libc::EPERM)
                    || e.raw_os_error() == Some(libc::ENOSPC) =>
            {
                Err(UsernsError::Unshare(e))
            }
            (Err(source), Ok(())) => Err(UsernsError::Spawn { program, source }),
        }
    })
}

fn pipe() -> Result<(OwnedFd, OwnedFd), UsernsError> {
    rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).map_err(|e| UsernsError::Spawn {
        program: "pipe".into(),
        source: e.into(),
    })
}

fn write_maps(
    pid: i32,
    plan: &UsernsPlan,
    tools: Option<&(PathBuf, PathBuf)>,
) -> Result<(), UsernsError> {
    match tools {
        Some((newuidmap, newgidmap)) => {
            run_map_tool(newuidmap, pid, &plan.maps.uid)?;
            run_map_tool(newgidmap, pid, &plan.maps.gid)
        }
        None => {
            // Mapping only our own ids needs no helper, but gid_map needs setgroups denied first.
            let proc = format!("/proc/{pid}");
            let write = |file: &str, text: &str| {
                std::fs::write(format!("{proc}/{file}"), text)
                    .map_err(|e| UsernsError::Map(format!("{proc}/{file}: {e}")))
            };
            write("setgroups", "deny")?;
            write("uid_map", &plan.maps.uid.to_proc_text())?;
            write("gid_map", &plan.maps.gid.to_proc_text())
        }
    }
}

fn run_map_tool(tool: &PathBuf, pid: i32, map: &IdMap) -> Result<(), UsernsError> {
    let out = Command::new(tool)
        .arg(pid.to_string())
        .args(map.to_args())
        .output()
        .map_err(|e| UsernsError::Map(format!("{}: {e}", tool.display())))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(UsernsError::Map(format!(
            "{} {pid} {}: {}",
            tool.display(),
            map.to_args().join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// The id maps of the current process, read from /proc/self (identity for real root).
pub fn current_maps() -> RootlessMaps {
    let read = |f: &str| {
        std::fs::read_to_string(f)
            .ok()
            .and_then(|t| IdMap::parse_proc(&t))
            .unwrap_or_else(IdMap::identity)
    };
    RootlessMaps {
        uid: read("/proc/self/uid_map"),
        gid: read("/proc/self/gid_map"),
    }
}
