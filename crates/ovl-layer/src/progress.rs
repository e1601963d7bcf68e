//! Progress counts: how far a long operation has got, for a command line to show.
//!
//! Owns the library side of progress only: a library bumps a shared [`Progress`] and never
//! draws; the tools draw it (ovl-cli: on stderr, only on a terminal). A tool that shows nothing
//! passes no `Progress`, and nothing is counted.

use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Units done so far, of a total when it is known.
#[derive(Debug, Default)]
pub struct Progress {
    done: AtomicU64,
    /// 0: not known (yet).
    total: AtomicU64,
}

impl Progress {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn set_total(&self, total: Option<u64>) {
        self.total.store(total.unwrap_or(0), Ordering::Relaxed);
    }

    pub fn inc(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
    }

    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    pub fn total(&self) -> Option<u64> {
        Some(self.total.load(Ordering::Relaxed)).filter(|&t| t > 0)
    }
}

/// Counts the bytes read through it into a [`Progress`] (when there is one).
pub struct ProgressReader<R> {
    inner: R,
    progress: Option<Arc<Progress>>,
}

impl<R> ProgressReader<R> {
    pub fn new(inner: R, progress: Option<Arc<Progress>>) -> Self {
        Self { inner, progress }
    }
}

impl<R: Read> Read for ProgressReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(p) = &self.progress {
            p.inc(n as u64);
        }
        Ok(n)
    }
}
