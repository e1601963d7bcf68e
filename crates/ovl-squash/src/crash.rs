//! The crash hook the crash tests use: with `OVL_SQUASH_CRASH_AFTER=k` in the environment the
//! process kills itself with SIGKILL right after its k-th mutation, so a test can stop a squash
//! at every step deterministically (a plain SIGKILL at a random time only samples them).
//!
//! A mutation is one change on disk that the crash argument of [`crate::inplace`] or the
//! staging of [`crate::output`] reasons about: a link, a rename, a removal, a metadata update.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// The environment variable that arms the hook.
pub const ENV: &str = "OVL_SQUASH_CRASH_AFTER";

static LIMIT: OnceLock<Option<u64>> = OnceLock::new();
static COUNT: AtomicU64 = AtomicU64::new(0);

/// Count one mutation (call it right after the mutation is done).
pub fn step() {
    let n = COUNT.fetch_add(1, Ordering::SeqCst) + 1;
    let limit = LIMIT.get_or_init(|| std::env::var(ENV).ok().and_then(|v| v.parse().ok()));
    if *limit == Some(n) {
        // SIGKILL, not abort or exit: no destructor, no buffered write, no cleanup runs.
        let _ =
            rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
    }
}

/// Mutations so far.
pub fn steps() -> u64 {
    COUNT.load(Ordering::SeqCst)
}
