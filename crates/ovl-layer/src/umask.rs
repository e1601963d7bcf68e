//! The process umask while extractions run.
//!
//! Owns one rule: extraction creates files with their final permission bits (no chmod per
//! file), so the umask must be 0 while it runs. The umask is the process's, not the thread's:
//! when several extractions run at once (the layers of an image), saving and restoring it per
//! call lets one that ends put 022 back while another is still creating files, which then get
//! the wrong modes. So the first one in clears it, and the last one out restores it.

use std::sync::Mutex;

use rustix::fs::Mode;

/// (extractions running, the umask before the first of them).
static UMASK: Mutex<(usize, Option<Mode>)> = Mutex::new((0, None));

/// Held while an extraction runs: the umask is 0 until the last guard is dropped.
pub(crate) struct NoUmask(());

impl NoUmask {
    pub(crate) fn enter() -> NoUmask {
        let mut g = UMASK.lock().unwrap_or_else(|e| e.into_inner());
        if g.0 == 0 {
            g.1 = Some(rustix::process::umask(Mode::empty()));
        }
        g.0 += 1;
        NoUmask(())
    }
}

impl Drop for NoUmask {
    fn drop(&mut self) {
        let mut g = UMASK.lock().unwrap_or_else(|e| e.into_inner());
        g.0 -= 1;
        if g.0 == 0
            && let Some(old) = g.1.take()
        {
            rustix::process::umask(old);
        }
    }
}
