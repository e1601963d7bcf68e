//! Progress bars: on stderr, and only when stderr is a terminal (never in a pipe, a log or a
//! layer). A bar is drawn by a ticker thread from a count the library keeps (an
//! `ovl_layer::Progress`, a step counter, bytes written), so the work itself never
//! waits on the terminal.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// What the count counts.
#[derive(Debug, Clone, Copy)]
pub enum Unit {
    Bytes,
    /// Things, named (`"entries"`, `"steps"`).
    Count(&'static str),
}

/// True when a bar would be seen: not `quiet`, and stderr is a terminal.
pub fn wanted(quiet: bool) -> bool {
    !quiet && std::io::stderr().is_terminal()
}

/// A bar that follows `poll` (done, total if known) until it is dropped; draws nothing unless
/// [`wanted`].
pub struct Bar {
    stop: Arc<AtomicBool>,
    ticker: Option<JoinHandle<()>>,
}

impl Bar {
    pub fn start(
        what: &str,
        unit: Unit,
        quiet: bool,
        poll: impl Fn() -> (u64, Option<u64>) + Send + 'static,
    ) -> Bar {
        let stop = Arc::new(AtomicBool::new(false));
        if !wanted(quiet) {
            return Bar { stop, ticker: None };
        }
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        bar.set_message(what.to_string());
        bar.set_style(style(unit, false));
        let flag = stop.clone();
        let ticker = std::thread::spawn(move || {
            let mut with_total = false;
            loop {
                let stopping = flag.load(Ordering::Acquire);
                let (done, total) = poll();
                if let Some(t) = total {
                    if !with_total {
                        with_total = true;
                        bar.set_style(style(unit, true));
                    }
                    bar.set_length(t.max(done));
                }
                bar.set_position(done);
                if stopping {
                    break;
                }
                std::thread::park_timeout(Duration::from_millis(50));
            }
            bar.finish_and_clear();
            let _ = std::io::stderr().flush();
        });
        Bar {
            stop,
            ticker: Some(ticker),
        }
    }

    /// Clear the bar (before a summary line is printed).
    pub fn finish(mut self) {
        self.stop_ticker();
    }

    fn stop_ticker(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.ticker.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.stop_ticker();
    }
}

fn style(unit: Unit, with_total: bool) -> ProgressStyle {
    let template = match (unit, with_total) {
        (Unit::Bytes, true) => {
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}".to_string()
        }
        (Unit::Bytes, false) => "{msg} {spinner} {bytes} {bytes_per_sec}".to_string(),
        (Unit::Count(name), true) => format!("{{msg}} [{{bar:30}}] {{pos}}/{{len}} {name}"),
        (Unit::Count(name), false) => format!("{{msg}} {{spinner}} {{pos}} {name}"),
    };
    ProgressStyle::with_template(&template)
        .expect("valid template")
        .progress_chars("=> ")
}

/// A writer that counts the bytes written through it (to show them with a [`Bar`]).
pub struct CountingWriter<W> {
    inner: W,
    count: Arc<AtomicU64>,
}

impl<W> CountingWriter<W> {
    pub fn new(inner: W) -> (Self, Arc<AtomicU64>) {
        let count = Arc::new(AtomicU64::new(0));
        (
            Self {
                inner,
                count: count.clone(),
            },
            count,
        )
    }

    pub fn into_inner(self) -> W {
        self.inner
    }
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
