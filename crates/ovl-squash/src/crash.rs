//! The crash hook the crash tests use: with `OVL_SQUASH_CRASH_AFTER=k` in the environment the
//! process kills itself with SIGKILL right after its k-th mutation, so a test can stop a squash
//! at every step deterministically (a plain SIGKILL at a random time only samples them). With
//! `OVL_SQUASH_INTERRUPT_AFTER=k` it sends itself SIGINT there instead and stops at that step
//! boundary, so a test can check what the signal clean-up leaves after each step.
//!
//! A mutation is one change on disk that the crash argument of [`crate::inplace`] or the
//! staging of [`crate::output`] reasons about: a link, a rename, a removal, a metadata update.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// The environment variable that arms the hook.
pub(crate) const ENV: &str = "OVL_SQUASH_CRASH_AFTER";

/// The environment variable that arms the SIGINT hook.
pub(crate) const INTERRUPT_ENV: &str = "OVL_SQUASH_INTERRUPT_AFTER";

static LIMIT: OnceLock<Option<u64>> = OnceLock::new();
static INTERRUPT_AT: OnceLock<Option<u64>> = OnceLock::new();
static COUNT: AtomicU64 = AtomicU64::new(0);

/// Count one mutation (call it right after the mutation is done).
pub(crate) fn step() {
    // Also where a SIGINT, SIGTERM or SIGHUP stops an --in-place run: between two steps.
    ovl_layer::step_boundary();
    let n = COUNT.fetch_add(1, Ordering::SeqCst) + 1;
    let limit = LIMIT.get_or_init(|| std::env::var(ENV).ok().and_then(|v| v.parse().ok()));
    if *limit == Some(n) {
        // SIGKILL, not abort or exit: no destructor, no buffered write, no cleanup runs.
        let _ =
            rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
    }
    let at = INTERRUPT_AT.get_or_init(|| {
        std::env::var(INTERRUPT_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
    });
    if *at == Some(n) {
        let _ =
            rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::INT);
        // Stop at this boundary, not a later one: wait until the clean-up has begun.
        for _ in 0..10_000 {
            if ovl_layer::cleanup_started() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        ovl_layer::step_boundary();
    }
}

/// Mutations so far.
pub(crate) fn steps() -> u64 {
    COUNT.load(Ordering::SeqCst)
}
