//! Staging siblings: a new directory or file is built beside its destination, then renamed into
//! place, and nothing is left behind by a failed or interrupted run.
//!
//! Owns, for every tool that creates an output (ovl-import's DEST, ovl-squash's `--output`,
//! ovl-diff's `-o FILE`) or needs a scratch directory beside a path ([`Scratch`]: ovl-squash
//! `--in-place`'s work and swap siblings):
//! - the sibling: a directory `.NAME.<tool>-TOKEN` in DEST's parent (TOKEN: 16 random hex
//!   digits, so nobody can plant it in advance). It holds `lock`, the marker, and `new`, the
//!   output under construction, which the commit renames to DEST. Everything in it is created
//!   with O_EXCL|O_NOFOLLOW relative to a directory fd.
//! - the marker `lock`: text naming the tool and TOKEN, written while its writer holds an
//!   exclusive `flock` on it for as long as it lives (a lock dies with its process, even one
//!   killed by SIGKILL).
//! - the sweep: the next run into the same parent removes a sibling only when it is provably a
//!   dead one of ours: its marker is there, says what its name says, and its lock can be taken.
//!   A directory of someone else's that happens to match the name pattern is never touched.
//! - the signal clean-up: on SIGINT, SIGTERM or SIGHUP every sibling of the process is removed,
//!   one line on stderr names it, and the process exits 128+N (130, 143, 129), as a shell
//!   reports a death by that signal. The handler only writes the signal number to a pipe; a
//!   watcher thread does the work. A supervisor (the rootless re-exec) instead forwards those
//!   signals to its child ([`forward_interrupts`]), which then cleans up itself. Signals that
//!   were ignored when the process started (`nohup`) stay ignored. Other temporary names are
//!   registered for the same clean-up ([`Registry`]: the OCI layout writer's temporary files),
//!   and work made of steps that a signal must not cut in two ([`Steps`]) is stopped at a step
//!   boundary first.

use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};

use rustix::fs::{FileType, FlockOperation, Mode, OFlags, RenameFlags};

use crate::fsops;

#[derive(Debug, thiserror::Error)]
pub enum StagingError {
    #[error("{0}: already exists")]
    DestExists(PathBuf),
    #[error("the parent directory {0} does not exist: create it first (mkdir -p {0})")]
    NoParent(PathBuf),
    #[error("{path}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io_err(e: impl Into<io::Error>, p: &Path) -> StagingError {
    StagingError::Io {
        path: p.to_path_buf(),
        source: e.into(),
    }
}

/// The marker inside a sibling.
const LOCK: &CStr = c"lock";
/// The output under construction inside a sibling.
const NEW: &CStr = c"new";
/// Random bytes in a sibling's name (printed as twice as many hex digits).
const TOKEN_BYTES: usize = 8;

/// Debug builds only: with this variable naming a FIFO (or any file), a commit first reads it
/// to its end, so a test can signal a run whose output is complete but not yet renamed.
pub const HOLD_ENV: &str = "OVL_STAGING_HOLD";

/// A new directory under construction in a sibling of `dest`; removed on drop unless committed.
#[derive(Debug)]
pub struct Staging {
    pub dest: PathBuf,
    /// The directory to fill.
    pub tmp: PathBuf,
    sib: Sibling,
}

impl Staging {
    /// Refuse an existing `dest`, sweep dead siblings of `tool` for it, make the sibling.
    pub fn new(dest: &Path, tool: &str) -> Result<Staging, StagingError> {
        let sib = Sibling::make(dest, tool, SiblingKind::Dir)?;
        Ok(Staging {
            dest: dest.to_path_buf(),
            tmp: sib.path.join(OsStr::from_bytes(NEW.to_bytes())),
            sib,
        })
    }

    /// Flush everything written below the sibling to disk, then rename it to `dest` (refusing
    /// to replace a `dest` that appeared meanwhile), then flush the parent.
    pub fn commit(mut self) -> Result<(), StagingError> {
        hold_for_tests();
        let fd = fsops::open_dir_at(&self.sib.wrapper, NEW).map_err(|e| io_err(e, &self.tmp))?;
        // One syncfs instead of an fsync per file: the same durability for a fresh tree.
        rustix::fs::syncfs(&fd).map_err(|e| io_err(e, &self.tmp))?;
        self.sib
            .rename_into_place(RenameFlags::NOREPLACE)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EEXIST) => StagingError::DestExists(self.dest.clone()),
                _ => io_err(e, &self.dest),
            })
    }
}

/// How much a file commit flushes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flush {
    /// fsync the file before the rename: after a crash, DEST is the old file or the new one.
    Data,
    /// Only the rename: the name never shows a partial file while the system runs, but a crash
    /// soon after may leave it short (for outputs that are cheap to make again).
    RenameOnly,
}

/// A new file under construction in a sibling of `dest`, renamed over `dest` (replacing it)
/// when complete; removed on drop unless committed.
#[derive(Debug)]
pub struct StagedFile {
    pub dest: PathBuf,
    /// The file being written.
    pub tmp: PathBuf,
    file: Option<File>,
    sib: Sibling,
}

impl StagedFile {
    /// Sweep dead siblings of `tool` for `dest`, make the sibling and the file in it.
    pub fn create(dest: &Path, tool: &str) -> Result<StagedFile, StagingError> {
        let mut sib = Sibling::make(dest, tool, SiblingKind::File)?;
        let tmp = sib.path.join(OsStr::from_bytes(NEW.to_bytes()));
        let file = sib.new_file.take().map(File::from);
        Ok(StagedFile {
            dest: dest.to_path_buf(),
            tmp,
            file,
            sib,
        })
    }

    pub fn file(&mut self) -> &mut File {
        self.file.as_mut().expect("open until committed")
    }

    pub fn commit(mut self, flush: Flush) -> Result<(), StagingError> {
        let f = self.file.take().expect("open until committed");
        if flush == Flush::Data {
            f.sync_all().map_err(|e| io_err(e, &self.tmp))?;
        }
        drop(f);
        hold_for_tests();
        self.sib
            .rename_into_place(RenameFlags::empty())
            .map_err(|e| io_err(e, &self.dest))
    }
}

/// The sibling directory with its locked marker, registered for the signal clean-up.
#[derive(Debug)]
struct Sibling {
    /// DEST's parent, and DEST's name in it.
    parent: OwnedFd,
    name: CString,
    /// The sibling's name in the parent, an fd of it, and its path (for messages).
    wrapper_name: CString,
    wrapper: OwnedFd,
    path: PathBuf,
    /// The marker, locked for as long as we live.
    _lock: OwnedFd,
    /// `new`, when it is a file.
    new_file: Option<OwnedFd>,
    registration: Registration,
}

/// What a sibling holds and when it may be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SiblingKind {
    /// A new directory for a DEST that must not exist.
    Dir,
    /// A new file, to replace DEST.
    File,
    /// A scratch directory beside an existing path, never renamed.
    Scratch,
}

/// DEST's parent (opened) and DEST's final name.
fn open_beside(dest: &Path) -> Result<(OwnedFd, CString), StagingError> {
    let name = dest.file_name().ok_or_else(|| {
        io_err(
            io::Error::other("the output needs a final name component"),
            dest,
        )
    })?;
    let name = fsops::cstr(name.as_bytes()).map_err(|e| io_err(e, dest))?;
    let parent_path = parent_of(dest);
    let parent = open_parent(&parent_path).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOENT) => StagingError::NoParent(parent_path.clone()),
        _ => io_err(e, &parent_path),
    })?;
    Ok((parent, name))
}

impl Sibling {
    fn make(dest: &Path, tool: &str, kind: SiblingKind) -> Result<Sibling, StagingError> {
        let (parent, name) = open_beside(dest)?;
        let parent_path = parent_of(dest);
        let dir = kind != SiblingKind::File;
        if kind == SiblingKind::Dir
            && fsops::stat_at(&parent, &name)
                .map_err(|e| io_err(e, dest))?
                .is_some()
        {
            return Err(StagingError::DestExists(dest.to_path_buf()));
        }
        sweep(&parent, name.as_bytes(), tool);

        // Registered under the same lock that the watcher takes: a signal from here on waits
        // until the sibling is either registered or not made at all.
        let mut reg = Registry::lock().map_err(|e| io_err(e, Path::new("signal handler")))?;
        let mut attempt = 0;
        let (wrapper_name, token, path) = loop {
            let token = token().map_err(|e| io_err(e, Path::new("getrandom")))?;
            let mut n = prefix(name.as_bytes(), tool);
            n.extend_from_slice(token.as_bytes());
            let n = fsops::cstr(&n).map_err(|e| io_err(e, dest))?;
            let path = parent_path.join(OsStr::from_bytes(n.as_bytes()));
            match rustix::fs::mkdirat(&parent, &n, Mode::from_raw_mode(0o700)) {
                Ok(()) => break (n, token, path),
                Err(rustix::io::Errno::EXIST) if attempt < 3 => attempt += 1,
                Err(e) => return Err(io_err(e, &path)),
            }
        };
        let made = (|| -> io::Result<(OwnedFd, OwnedFd, Option<OwnedFd>)> {
            let wrapper = fsops::open_dir_at(&parent, &wrapper_name)?;
            let lock = rustix::fs::openat(
                &wrapper,
                LOCK,
                OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )?;
            // Locked before it says anything: a sweeper that sees the marker's text while it
            // holds the lock knows the writer is gone.
            rustix::fs::flock(&lock, FlockOperation::LockExclusive)?;
            let text = marker_text(tool, &token);
            rustix::io::write(&lock, text.as_bytes())?;
            let new_file = if dir {
                rustix::fs::mkdirat(&wrapper, NEW, Mode::from_raw_mode(0o777))?;
                None
            } else {
                Some(rustix::fs::openat(
                    &wrapper,
                    NEW,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o666),
                )?)
            };
            Ok((wrapper, lock, new_file))
        })();
        let (wrapper, lock, new_file, registration) = match made
            .and_then(|(w, l, n)| Ok((w, l, n, reg.add(tool, &parent, &wrapper_name, &path)?)))
        {
            Ok(m) => m,
            Err(e) => {
                let _ = fsops::remove_at(&parent, &wrapper_name);
                return Err(io_err(e, &path));
            }
        };
        drop(reg);
        Ok(Sibling {
            parent,
            name,
            wrapper_name,
            wrapper,
            path,
            _lock: lock,
            new_file,
            registration,
        })
    }

    /// Rename `new` to DEST, then remove the rest of the sibling (the marker).
    fn rename_into_place(&mut self, flags: RenameFlags) -> io::Result<()> {
        let (wrapper, parent, name) = (&self.wrapper, &self.parent, &self.name);
        let wrapper_name = &self.wrapper_name;
        self.registration.end(|| {
            rustix::fs::renameat_with(wrapper, NEW, parent, name, flags)?;
            let _ = fsops::remove_at(parent, wrapper_name);
            Ok(())
        })?;
        let _ = rustix::fs::fsync(&self.parent);
        Ok(())
    }
}

impl Drop for Sibling {
    fn drop(&mut self) {
        let (parent, wrapper_name, new_file) =
            (&self.parent, &self.wrapper_name, &mut self.new_file);
        let _ = self.registration.end(|| {
            drop(new_file.take());
            remove_racing_writers(parent, wrapper_name)
        });
    }
}

/// A scratch directory beside a path: a sibling like [`Staging`]'s (same name pattern, marker,
/// lock, sweep and signal clean-up) that is never renamed into place, only removed when
/// dropped. For work that must be on the same filesystem as the path but never inside it
/// (ovl-squash `--in-place`: entries built there are renamed into the lower, and its upper is
/// exchanged with an empty directory made there).
#[derive(Debug)]
pub struct Scratch {
    /// The directory to use (`new` in the sibling).
    pub dir: PathBuf,
    sib: Sibling,
}

impl Scratch {
    /// Sweep dead scratch siblings of `tool` beside `beside`, make a new one.
    pub fn new(beside: &Path, tool: &str) -> Result<Scratch, StagingError> {
        let sib = Sibling::make(beside, tool, SiblingKind::Scratch)?;
        Ok(Scratch {
            dir: sib.path.join(OsStr::from_bytes(NEW.to_bytes())),
            sib,
        })
    }

    /// The sibling's directory (`dir`'s parent) and `dir`'s name in it, for `*at` calls.
    pub fn at(&self) -> (&OwnedFd, &CStr) {
        (&self.sib.wrapper, NEW)
    }
}

/// Remove the dead siblings of `tool` beside `beside` (see the module doc) without making one:
/// for a run that makes its [`Scratch`] only when it needs one, so leftovers of a killed run
/// go in any case. Returns how many were removed.
pub fn sweep_beside(beside: &Path, tool: &str) -> Result<usize, StagingError> {
    let (parent, name) = open_beside(beside)?;
    Ok(sweep(&parent, name.as_bytes(), tool))
}

fn parent_of(p: &Path) -> PathBuf {
    match p.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The parent for reading (listing, fsync), else only for `*at` calls.
fn open_parent(p: &Path) -> io::Result<OwnedFd> {
    let dir = OFlags::DIRECTORY | OFlags::CLOEXEC;
    match rustix::fs::open(p, OFlags::RDONLY | dir, Mode::empty()) {
        Err(rustix::io::Errno::ACCESS) => {
            rustix::fs::open(p, OFlags::PATH | dir, Mode::empty()).map_err(Into::into)
        }
        r => r.map_err(Into::into),
    }
}

/// `.NAME.<tool>-`: the start of every sibling's name for `name`.
fn prefix(name: &[u8], tool: &str) -> Vec<u8> {
    let mut s = b".".to_vec();
    s.extend_from_slice(name);
    s.extend_from_slice(format!(".{tool}-").as_bytes());
    s
}

fn token() -> io::Result<String> {
    let mut b = [0u8; TOKEN_BYTES];
    let mut got = 0;
    while got < b.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `b`.
        let n = unsafe { libc::getrandom(b[got..].as_mut_ptr().cast(), b.len() - got, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        } else {
            got += n as usize;
        }
    }
    Ok(hex::encode(b))
}

fn is_token(b: &[u8]) -> bool {
    b.len() == 2 * TOKEN_BYTES && b.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
}

/// What the marker of `tool`'s sibling with `token` says (its pid only helps a reader).
fn marker_text(tool: &str, token: &str) -> String {
    format!("{}pid {}\n", marker_head(tool, token), std::process::id())
}

fn marker_head(tool: &str, token: &str) -> String {
    format!("ovl staging sibling\ntool {tool}\ntoken {token}\n")
}

/// Remove the siblings of `tool` for `name` in `parent` that are provably dead ones of ours
/// (see the module doc). Returns how many were removed.
fn sweep(parent: &OwnedFd, name: &[u8], tool: &str) -> usize {
    let prefix = prefix(name, tool);
    let Ok(dir) = rustix::fs::Dir::read_from(parent) else {
        return 0;
    };
    let mut removed = 0;
    for ent in dir.flatten() {
        let n = ent.file_name();
        let Some(token) = n.to_bytes().strip_prefix(prefix.as_slice()) else {
            continue;
        };
        if !is_token(token) {
            continue;
        }
        let token = String::from_utf8_lossy(token).into_owned();
        // Hold the lock while removing, so two sweepers never work on the same sibling.
        if let Some(_lock) = dead_sibling(parent, n, tool, &token) {
            if remove_racing_writers(parent, n).is_ok() {
                removed += 1;
            }
        }
    }
    removed
}

/// The locked marker of sibling `n` when it is a dead one of ours.
fn dead_sibling(parent: &OwnedFd, n: &CStr, tool: &str, token: &str) -> Option<OwnedFd> {
    let wrapper = fsops::open_dir_at(parent, n).ok()?;
    // NONBLOCK: a FIFO planted as the marker must not hang us.
    let lock = rustix::fs::openat(
        &wrapper,
        LOCK,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    let st = rustix::fs::fstat(&lock).ok()?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return None;
    }
    // Held: its writer lives.
    rustix::fs::flock(&lock, FlockOperation::NonBlockingLockExclusive).ok()?;
    let mut text = Vec::new();
    File::from(rustix::io::fcntl_dupfd_cloexec(&lock, 0).ok()?)
        .take(256)
        .read_to_end(&mut text)
        .ok()?;
    text.starts_with(marker_head(tool, token).as_bytes())
        .then_some(lock)
}

/// Remove `name` in `dir` (a tree) while another thread of ours may still be writing into it:
/// a pass fails when an entry appears or vanishes under it, so pass again. Once the top is
/// gone nothing can be created below it.
fn remove_racing_writers(dir: &impl AsFd, name: &CStr) -> io::Result<()> {
    let mut last = None;
    for _ in 0..1000 {
        match fsops::remove_at(dir, name) {
            Ok(_) => return Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENOTEMPTY | libc::ENOENT | libc::EEXIST)
                ) =>
            {
                last = Some(e)
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("could not remove")))
}

/// Debug builds: wait until the test that set [`HOLD_ENV`] closes the FIFO.
pub(crate) fn hold_for_tests() {
    #[cfg(debug_assertions)]
    if let Some(p) = std::env::var_os(HOLD_ENV) {
        if let Ok(mut f) = File::open(p) {
            let _ = io::copy(&mut f, &mut io::sink());
        }
    }
}

// ---- the signal clean-up ----

/// One sibling to remove if a signal ends the process.
#[derive(Debug)]
struct Registered {
    id: u64,
    tool: String,
    parent: OwnedFd,
    name: CString,
    path: PathBuf,
}

static REGISTRY: Mutex<Vec<Registered>> = Mutex::new(Vec::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(1);
/// Set by the watcher before it takes the registry: from then on, it removes the siblings.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// The write end of the handler's pipe.
static PIPE_W: AtomicI32 = AtomicI32::new(-1);
/// A child to pass the signals on to, instead of cleaning up and exiting.
static FORWARD_TO: AtomicI32 = AtomicI32::new(0);

const SIGNALS: [libc::c_int; 3] = [libc::SIGHUP, libc::SIGINT, libc::SIGTERM];

fn registry() -> MutexGuard<'static, Vec<Registered>> {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

/// The registry, locked: what is made while it is held and then [`Registry::add`]ed is either
/// removed by a signal's clean-up or not made at all.
pub(crate) struct Registry(MutexGuard<'static, Vec<Registered>>);

impl Registry {
    /// Install the signal handlers (once per process) and lock the registry.
    pub(crate) fn lock() -> io::Result<Registry> {
        install_handler()?;
        Ok(Registry(registry()))
    }

    /// Register `name` in `dir` (`path`: how a message names it) for the signal clean-up of
    /// `tool`'s process.
    pub(crate) fn add(
        &mut self,
        tool: &str,
        dir: &impl AsFd,
        name: &CStr,
        path: &Path,
    ) -> io::Result<Registration> {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        self.0.push(Registered {
            id,
            tool: tool.to_string(),
            parent: rustix::io::fcntl_dupfd_cloexec(dir, 0)?,
            name: name.to_owned(),
            path: path.to_path_buf(),
        });
        Ok(Registration { id })
    }
}

/// One name that a signal's clean-up removes, until [`Registration::end`] ends it.
#[derive(Debug)]
pub(crate) struct Registration {
    /// The key in [`REGISTRY`]; 0 once ended.
    id: u64,
}

impl Registration {
    /// Do `f`, the step that ends the name's life (its rename into place or its removal),
    /// then forget the name, unless `f` fails. A signal's clean-up never runs during `f`: once
    /// it has begun, this waits for the process to end instead.
    pub(crate) fn end<T>(&mut self, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        if self.id == 0 {
            return Err(io::Error::other("already ended"));
        }
        let mut reg = registry();
        if INTERRUPTED.load(Ordering::SeqCst) {
            drop(reg);
            wait_for_exit();
        }
        let t = f()?;
        let id = self.id;
        reg.retain(|r| r.id != id);
        self.id = 0;
        Ok(t)
    }
}

/// The program's name (argv\[0\]'s last component), for messages of what has no tool name.
pub(crate) fn program_name() -> String {
    std::env::args_os()
        .next()
        .map(PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "ovl".into())
}

// ---- steps a signal must not cut in two ----

/// Threads in [`Steps`] that have not yet reached a step boundary since a signal.
static STEPPING: Mutex<u32> = Mutex::new(0);
static STEPPED: std::sync::Condvar = std::sync::Condvar::new();

std::thread_local! {
    static IN_STEPS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Work made of steps, each of which leaves things consistent but none of which may be cut
/// in two by a signal's clean-up (ovl-squash `--in-place`: its crash argument holds after
/// every step; a [`Scratch`] removed in the middle of one, while entries are built in it or
/// renamed out of it, would not be a state any step leaves). While a `Steps` lives, the
/// clean-up waits until its thread calls [`step_boundary`] (or drops it), and the thread then
/// stops there for good.
#[derive(Debug)]
pub struct Steps {
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Steps {
    pub fn begin() -> Steps {
        if INTERRUPTED.load(Ordering::SeqCst) {
            wait_for_exit();
        }
        *STEPPING.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        IN_STEPS.with(|c| c.set(true));
        Steps {
            _not_send: std::marker::PhantomData,
        }
    }
}

impl Drop for Steps {
    fn drop(&mut self) {
        IN_STEPS.with(|c| c.set(false));
        left_steps();
    }
}

fn left_steps() {
    let mut n = STEPPING.lock().unwrap_or_else(|e| e.into_inner());
    *n = n.saturating_sub(1);
    STEPPED.notify_all();
}

/// A point between two steps of [`Steps`]: if a signal's clean-up is waiting, let it run (this
/// thread stops here for good). Elsewhere, nothing.
pub fn step_boundary() {
    if INTERRUPTED.load(Ordering::SeqCst) && IN_STEPS.with(|c| c.get()) {
        wait_for_exit();
    }
}

/// A signal's clean-up has begun (the process is about to end).
pub fn cleanup_started() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Park this thread for good: the watcher is removing our siblings and will end the process.
fn wait_for_exit() -> ! {
    if IN_STEPS.with(|c| c.replace(false)) {
        left_steps();
    }
    loop {
        std::thread::park();
    }
}

/// Pass SIGINT, SIGTERM and SIGHUP on to process `pid` (a child we wait for) instead of dying:
/// the child then cleans up after itself and its exit code tells the caller what happened.
/// Call [`stop_forwarding`] once the child is reaped.
pub(crate) fn forward_interrupts(pid: u32) -> io::Result<()> {
    FORWARD_TO.store(pid as i32, Ordering::SeqCst);
    install_handler()
}

/// Undo [`forward_interrupts`]: a signal now ends this process (with nothing of its own to
/// remove, exit code 128+N).
pub(crate) fn stop_forwarding() {
    FORWARD_TO.store(0, Ordering::SeqCst);
}

extern "C" fn on_signal(sig: libc::c_int) {
    // Only async-signal-safe calls: one write(2) to a non-blocking pipe, with errno kept for
    // the code we interrupted.
    // SAFETY: __errno_location returns this thread's errno; the buffer is one byte on our
    // stack; a bad or full pipe only makes the write fail.
    unsafe {
        let errno = *libc::__errno_location();
        let b = sig as u8;
        libc::write(PIPE_W.load(Ordering::Relaxed), (&raw const b).cast(), 1);
        *libc::__errno_location() = errno;
    }
}

/// Install the handlers and start the watcher, once per process.
fn install_handler() -> io::Result<()> {
    static DONE: OnceLock<Result<(), i32>> = OnceLock::new();
    DONE.get_or_init(|| install().map_err(|e| e.raw_os_error().unwrap_or(libc::EIO)))
        .map_err(io::Error::from_raw_os_error)
}

fn install() -> io::Result<()> {
    let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    rustix::fs::fcntl_setfl(&w, OFlags::NONBLOCK)?;
    // The write end lives as long as the process: the handler may run at any time.
    PIPE_W.store(w.as_raw_fd(), Ordering::SeqCst);
    std::mem::forget(w);
    std::thread::Builder::new()
        .name("ovl-signals".into())
        .spawn(move || watch(r))?;
    for sig in SIGNALS {
        // SAFETY: plain sigaction calls with zeroed, then filled, structs; the handler only
        // makes async-signal-safe calls.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut old) != 0 {
                return Err(io::Error::last_os_error());
            }
            if old.sa_sigaction == libc::SIG_IGN {
                continue; // nohup and friends: keep ignoring it
            }
            let mut new: libc::sigaction = std::mem::zeroed();
            new.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            new.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut new.sa_mask);
            if libc::sigaction(sig, &new, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

/// The watcher thread: for each signal the handler wrote, forward it or clean up and exit.
fn watch(r: OwnedFd) {
    let mut b = [0u8; 1];
    loop {
        match rustix::io::read(&r, &mut b) {
            Ok(1) => {}
            Err(rustix::io::Errno::INTR) => continue,
            _ => return,
        }
        let sig = libc::c_int::from(b[0]);
        let pid = FORWARD_TO.load(Ordering::SeqCst);
        if pid > 0 {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, sig) };
            continue;
        }
        clean_up_and_exit(sig);
    }
}

fn signal_name(sig: libc::c_int) -> &'static str {
    match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        _ => "a signal",
    }
}

fn clean_up_and_exit(sig: libc::c_int) -> ! {
    INTERRUPTED.store(true, Ordering::SeqCst);
    // Let every thread in the middle of a step finish it.
    let mut n = STEPPING.lock().unwrap_or_else(|e| e.into_inner());
    while *n > 0 {
        n = STEPPED.wait(n).unwrap_or_else(|e| e.into_inner());
    }
    drop(n);
    let reg = registry();
    for r in reg.iter() {
        let what = match remove_racing_writers(&r.parent, &r.name) {
            Ok(()) => format!("removed {}", r.path.display()),
            Err(e) => format!("could not remove {}: {e}", r.path.display()),
        };
        let line = format!("{}: interrupted by {}: {what}\n", r.tool, signal_name(sig));
        // Straight to fd 2: the stderr lock may be held by a thread we interrupted.
        let _ = rustix::io::write(io::stderr().as_fd(), line.as_bytes());
    }
    let _ = io::stderr().flush();
    std::process::exit(128 + sig)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    fn parent_fd(p: &Path) -> OwnedFd {
        open_parent(p).unwrap()
    }

    #[test]
    fn commit_renames_and_drop_cleans() {
        let t = tempfile::tempdir().unwrap();
        let dest = t.path().join("d");
        let s = Staging::new(&dest, "t").unwrap();
        std::fs::write(s.tmp.join("f"), b"x").unwrap();
        assert!(!dest.exists());
        assert_eq!(names(t.path()).len(), 1);
        s.commit().unwrap();
        assert_eq!(std::fs::read(dest.join("f")).unwrap(), b"x");
        assert_eq!(names(t.path()), ["d"], "the sibling is gone");
        assert!(matches!(
            Staging::new(&dest, "t"),
            Err(StagingError::DestExists(_))
        ));
        let other = t.path().join("e");
        let s = Staging::new(&other, "t").unwrap();
        std::fs::create_dir_all(s.tmp.join("a/b")).unwrap();
        drop(s);
        assert_eq!(names(t.path()), ["d"]);
    }

    #[test]
    fn a_file_replaces_dest_only_on_commit() {
        let t = tempfile::tempdir().unwrap();
        let dest = t.path().join("out.tar");
        std::fs::write(&dest, b"old").unwrap();
        let mut f = StagedFile::create(&dest, "t").unwrap();
        f.file().write_all(b"new").unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"old");
        f.commit(Flush::Data).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"new");
        assert_eq!(names(t.path()), ["out.tar"]);
        let mut f = StagedFile::create(&dest, "t").unwrap();
        f.file().write_all(b"half").unwrap();
        drop(f);
        assert_eq!(names(t.path()), ["out.tar"]);
        assert_eq!(std::fs::read(&dest).unwrap(), b"new");
    }

    #[test]
    fn the_sibling_name_cannot_be_guessed() {
        let t = tempfile::tempdir().unwrap();
        let a = Staging::new(&t.path().join("d"), "t").unwrap();
        let b = Staging::new(&t.path().join("d"), "t").unwrap();
        assert_ne!(a.tmp, b.tmp);
        let n = a.tmp.parent().unwrap().file_name().unwrap().as_bytes();
        let token = n.strip_prefix(b".d.t-").unwrap();
        assert!(is_token(token), "{}", String::from_utf8_lossy(n));
    }

    /// A scratch sibling goes beside an existing path (which a staging sibling refuses), is
    /// removed when dropped, and a dead one is swept by `sweep_beside`, a live one not.
    #[test]
    fn scratch_beside_an_existing_path() {
        let t = tempfile::tempdir().unwrap();
        let lower = t.path().join("lower");
        std::fs::create_dir(&lower).unwrap();
        let s = Scratch::new(&lower, "t").unwrap();
        std::fs::write(s.dir.join("f"), b"x").unwrap();
        assert_eq!(names(t.path()).len(), 2);
        drop(s);
        assert_eq!(names(t.path()), ["lower"]);
        let live = Scratch::new(&lower, "t").unwrap();
        let dead_token = "0123456789abcdef";
        let dead = t.path().join(format!(".lower.t-{dead_token}"));
        std::fs::create_dir_all(dead.join("new/x")).unwrap();
        std::fs::write(dead.join("lock"), marker_text("t", dead_token)).unwrap();
        assert_eq!(sweep_beside(&lower, "t").unwrap(), 1);
        assert!(!dead.exists() && live.dir.exists());
    }

    /// Only a sibling with our marker whose lock is free is removed; a live one (locked), one
    /// of another tool, and anything else matching the name pattern are left alone.
    #[test]
    fn only_dead_siblings_of_ours_are_swept() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path();
        // A live one: ours, marker locked (by this process, through another open file).
        let live = Staging::new(&p.join("d"), "t").unwrap();
        let other_tool = Staging::new(&p.join("d"), "u").unwrap();
        let dead_token = "0123456789abcdef";
        let dead = p.join(format!(".d.t-{dead_token}"));
        std::fs::create_dir_all(dead.join("new/x/y")).unwrap();
        std::fs::write(dead.join("lock"), marker_text("t", dead_token)).unwrap();
        // Someone else's directories that match the pattern.
        let foreign = [
            ".d.t-4194305",
            ".d.t-fedcba9876543210",
            ".d.t-00000000000000aa",
        ];
        for f in foreign {
            std::fs::create_dir_all(p.join(f).join("theirs")).unwrap();
        }
        // ... one with a marker for another name's token, one whose marker is a symlink.
        std::fs::write(
            p.join(".d.t-fedcba9876543210/lock"),
            marker_text("t", dead_token),
        )
        .unwrap();
        std::os::unix::fs::symlink(dead.join("lock"), p.join(".d.t-00000000000000aa/lock"))
            .unwrap();
        assert_eq!(sweep(&parent_fd(p), b"d", "t"), 1);
        assert!(!dead.exists());
        for f in foreign {
            assert!(p.join(f).join("theirs").exists(), "{f}");
        }
        assert!(live.tmp.exists() && other_tool.tmp.exists());
        drop(live);
        drop(other_tool);
        assert_eq!(names(p).len(), foreign.len());
    }
}
