//! Runs each contender of a case N times (alternating A B A B ...), each run in a fresh directory
//! on one filesystem (tmpfs or disk), measuring wall time and peak RSS, and prints the results
//! table: the primary filesystem's figures (whose ratios the targets judge) with the other's
//! beside them.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// What one run executes: a command, or a pipeline of commands (`a | b | c`), with stdin from
/// /dev/null, stdout of the last stage to /dev/null or a file, stderr of all stages to a log.
#[derive(Debug)]
pub struct Job {
    stages: Vec<Command>,
    stdout: Option<PathBuf>,
}

impl Job {
    pub fn new(cmd: Command) -> Self {
        Job {
            stages: vec![cmd],
            stdout: None,
        }
    }

    /// Pipes the output of the job so far into `cmd`.
    pub fn pipe(mut self, cmd: Command) -> Self {
        self.stages.push(cmd);
        self
    }

    /// Sends the last stage's stdout to `path` (created or truncated).
    pub fn stdout_to(mut self, path: impl Into<PathBuf>) -> Self {
        self.stdout = Some(path.into());
        self
    }
}

/// `Command::new(program).args(args)`, for short job definitions: args may mix `&str` and paths,
/// e.g. `cmd("tar", &[&"-xzf", &tar_gz, &"-C", &dest])`.
pub fn cmd(program: impl AsRef<OsStr>, args: &[&dyn AsRef<OsStr>]) -> Command {
    let mut c = Command::new(program);
    c.args(args.iter().map(|a| a.as_ref()));
    c
}

type JobFn = Box<dyn Fn(&Path) -> Result<Job>>;

/// One tool in a case: how to build its job for a run directory, and what it is held to.
pub struct Contender {
    pub tool: &'static str,
    pub baseline: bool,
    /// (program, Debian package): the contender is skipped when a program is not in $PATH.
    pub requires: Vec<(&'static str, &'static str)>,
    /// Target: median wall time at most this many times the baseline's.
    pub max_ratio: Option<f64>,
    /// Target: peak RSS (max over runs) at most this many MiB.
    pub max_rss_mib: Option<f64>,
    job: JobFn,
}

impl Contender {
    /// `job` gets a fresh, empty directory for the run (under target/bench/runs/) and returns
    /// what to execute; it may prepare files in the directory first (untimed).
    pub fn new(tool: &'static str, job: impl Fn(&Path) -> Result<Job> + 'static) -> Self {
        Contender {
            tool,
            baseline: false,
            requires: Vec::new(),
            max_ratio: None,
            max_rss_mib: None,
            job: Box::new(job),
        }
    }

    /// Marks this contender as the one the ratios are computed against.
    pub fn baseline(mut self) -> Self {
        self.baseline = true;
        self
    }

    pub fn requires(mut self, program: &'static str, package: &'static str) -> Self {
        self.requires.push((program, package));
        self
    }

    pub fn target_ratio(mut self, max: f64) -> Self {
        self.max_ratio = Some(max);
        self
    }

    pub fn target_rss_mib(mut self, max: f64) -> Self {
        self.max_rss_mib = Some(max);
        self
    }

    fn missing(&self) -> Option<String> {
        let missing: Vec<String> = self
            .requires
            .iter()
            .filter(|(program, _)| crate::which(program).is_none())
            .map(|(program, package)| format!("{program} not found (apt-get install {package})"))
            .collect();
        (!missing.is_empty()).then(|| missing.join(", "))
    }
}

/// A benchmark case: the same work done by each contender.
pub struct Case {
    pub name: &'static str,
    pub contenders: Vec<Contender>,
}

/// One run's measurements.
#[derive(Debug, Clone, Copy)]
pub struct Measurement {
    pub wall: Duration,
    /// Peak RSS in KiB: the max over the job's processes (and their descendants).
    pub max_rss_kib: u64,
}

#[derive(Debug)]
pub enum Outcome {
    Skipped(String),
    Failed { run: usize, error: String },
    Measured(Vec<Measurement>),
}

/// One contender's runs on one filesystem.
#[derive(Debug)]
pub struct Row {
    pub case: &'static str,
    pub tool: &'static str,
    /// The filesystem the runs wrote to ("tmpfs", "disk").
    pub fs: &'static str,
    pub baseline: bool,
    pub max_ratio: Option<f64>,
    pub max_rss_mib: Option<f64>,
    pub outcome: Outcome,
}

pub struct Runner {
    /// The filesystem's name in the table ("tmpfs", "disk").
    pub fs: &'static str,
    /// Where run directories go: `<runs_dir>/<case>/<tool>-<run>/`.
    pub runs_dir: PathBuf,
    /// Keep each run's directory (for a look afterwards) or delete it once measured (on tmpfs
    /// they would fill memory).
    pub keep: bool,
    pub runs: usize,
    /// A run still going after this long is killed and reported as failed.
    pub timeout: Duration,
}

impl Runner {
    /// Runs every available contender `self.runs` times, alternating between them.
    pub fn run_case(&self, case: &Case) -> Vec<Row> {
        let mut outcomes: Vec<Outcome> = case
            .contenders
            .iter()
            .map(|c| match c.missing() {
                Some(why) => Outcome::Skipped(why),
                None => Outcome::Measured(Vec::new()),
            })
            .collect();
        for run in 1..=self.runs {
            for (contender, outcome) in case.contenders.iter().zip(outcomes.iter_mut()) {
                let Outcome::Measured(ms) = outcome else {
                    continue;
                };
                let label = format!(
                    "{} / {} / {} run {run}/{}",
                    self.fs, case.name, contender.tool, self.runs
                );
                match self.run_once(case, contender, run) {
                    Ok(m) => {
                        println!(
                            "  {label}: {:.2} s, peak RSS {:.1} MiB",
                            m.wall.as_secs_f64(),
                            m.max_rss_kib as f64 / 1024.0
                        );
                        ms.push(m);
                    }
                    Err(err) => {
                        let error = format!("{err:#}");
                        println!("  {label}: FAILED: {}", first_line(&error));
                        *outcome = Outcome::Failed { run, error };
                    }
                }
            }
        }
        case.contenders
            .iter()
            .zip(outcomes)
            .map(|(c, outcome)| Row {
                case: case.name,
                tool: c.tool,
                fs: self.fs,
                baseline: c.baseline,
                max_ratio: c.max_ratio,
                max_rss_mib: c.max_rss_mib,
                outcome,
            })
            .collect()
    }

    fn run_once(&self, case: &Case, contender: &Contender, run: usize) -> Result<Measurement> {
        let dir = self
            .runs_dir
            .join(case.name)
            .join(format!("{}-{run}", slug(contender.tool)));
        if dir.exists() {
            fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;
        }
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let job = (contender.job)(&dir)?;
        // Start each run with no dirty pages left over from the previous one (untimed).
        sync();
        let m = measure(job, &dir.join("stderr.log"), self.timeout);
        if !self.keep && m.is_ok() {
            fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;
        }
        m
    }
}

/// Runs `job`, returning its wall time and peak RSS; an error (with the job's stderr) if any
/// stage fails or the job outlives `timeout`.
pub fn measure(job: Job, stderr_path: &Path, timeout: Duration) -> Result<Measurement> {
    let stderr = File::create(stderr_path)
        .with_context(|| format!("cannot create {}", stderr_path.display()))?;
    let last_stdout = match &job.stdout {
        Some(path) => Stdio::from(
            File::create(path).with_context(|| format!("cannot create {}", path.display()))?,
        ),
        None => Stdio::null(),
    };
    let described: Vec<String> = job.stages.iter().map(describe).collect();
    let n = job.stages.len();
    let mut last_stdout = Some(last_stdout);
    let mut pids: Vec<libc::pid_t> = Vec::with_capacity(n);
    let mut prev: Option<ChildStdout> = None;

    reset_peak_rss();
    let start = Instant::now();
    for (i, mut cmd) in job.stages.into_iter().enumerate() {
        cmd.stdin(prev.take().map_or_else(Stdio::null, Stdio::from));
        cmd.stderr(stderr.try_clone()?);
        if i + 1 < n {
            cmd.stdout(Stdio::piped());
        } else {
            cmd.stdout(last_stdout.take().expect("one last stage"));
        }
        match cmd.spawn() {
            Ok(mut child) => {
                prev = child.stdout.take();
                pids.push(child.id() as libc::pid_t);
            }
            Err(err) => {
                for &pid in &pids {
                    // SAFETY: plain syscalls on pids we spawned and have not reaped.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                    let _ = wait4(pid);
                }
                bail!("cannot start {}: {err}", described[i]);
            }
        }
    }
    drop(prev);

    let reaped: Arc<Vec<AtomicBool>> =
        Arc::new(pids.iter().map(|_| AtomicBool::new(false)).collect());
    let timed_out = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let (pids, reaped, timed_out, done) = (
            pids.clone(),
            reaped.clone(),
            timed_out.clone(),
            done.clone(),
        );
        std::thread::spawn(move || {
            let deadline = Instant::now() + timeout;
            while !done.load(Ordering::Acquire) {
                if Instant::now() >= deadline {
                    timed_out.store(true, Ordering::Release);
                    for (pid, reaped) in pids.iter().zip(reaped.iter()) {
                        if !reaped.load(Ordering::Acquire) {
                            // SAFETY: a pid we spawned and have not reaped yet.
                            unsafe { libc::kill(*pid, libc::SIGKILL) };
                        }
                    }
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };

    let mut max_rss_kib = 0u64;
    let mut failures = Vec::new();
    for (i, &pid) in pids.iter().enumerate() {
        let (status, rusage) = wait4(pid)?;
        reaped[i].store(true, Ordering::Release);
        max_rss_kib = max_rss_kib.max(rusage.ru_maxrss.max(0) as u64);
        if let Some(why) = failure(status) {
            failures.push(format!("{} {why}", described[i]));
        }
    }
    let wall = start.elapsed();
    done.store(true, Ordering::Release);
    let _ = watchdog.join();

    if timed_out.load(Ordering::Acquire) {
        failures.insert(
            0,
            format!("killed after the {} s timeout", timeout.as_secs()),
        );
    }
    if !failures.is_empty() {
        bail!(
            "{}\n--- stderr ({}) ---\n{}",
            failures.join("; "),
            stderr_path.display(),
            tail(stderr_path, 20)
        );
    }
    Ok(Measurement { wall, max_rss_kib })
}

/// A child's peak RSS starts at its parent's peak RSS (the kernel counts the parent's memory
/// image that the child replaces at exec), so lower ours to our current RSS before spawning:
/// then a child's figure is its own unless it stays below our few MiB.
fn reset_peak_rss() {
    // "5" resets the peak RSS of the process (Linux >= 4.0); without it the figures are only
    // upper bounds, still good enough for an "RSS <= N MiB" target.
    let _ = fs::write("/proc/self/clear_refs", "5");
}

fn wait4(pid: libc::pid_t) -> Result<(libc::c_int, libc::rusage)> {
    let mut status = 0;
    // SAFETY: rusage is plain old data; all-zero is a valid value.
    let mut rusage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: valid pointers to locals; pid is our own child.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut rusage) };
        if r == pid {
            return Ok((status, rusage));
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            bail!("wait4({pid}): {err}");
        }
    }
}

fn failure(status: libc::c_int) -> Option<String> {
    if libc::WIFEXITED(status) {
        match libc::WEXITSTATUS(status) {
            0 => None,
            code => Some(format!("exited with status {code}")),
        }
    } else if libc::WIFSIGNALED(status) {
        Some(format!("killed by signal {}", libc::WTERMSIG(status)))
    } else {
        Some(format!("ended with wait status {status:#x}"))
    }
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// The last `n` lines of a (log) file.
fn tail(path: &Path, n: usize) -> String {
    match fs::read(path) {
        Ok(bytes) if bytes.is_empty() => "(empty)".to_string(),
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(err) => format!("(cannot read: {err})"),
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

fn slug(tool: &str) -> String {
    tool.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect()
}

/// Flushes dirty pages to disk.
pub fn sync() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

struct Stats {
    median: f64,
    min: f64,
    max: f64,
    rss_mib: f64,
}

fn stats(ms: &[Measurement]) -> Option<Stats> {
    if ms.is_empty() {
        return None;
    }
    let mut walls: Vec<f64> = ms.iter().map(|m| m.wall.as_secs_f64()).collect();
    walls.sort_by(f64::total_cmp);
    Some(Stats {
        median: median(&walls),
        min: walls[0],
        max: walls[walls.len() - 1],
        rss_mib: ms.iter().map(|m| m.max_rss_kib).max().unwrap_or(0) as f64 / 1024.0,
    })
}

/// What the table found: targets met, missed, and errors (failed runs).
#[derive(Debug, Default)]
pub struct Verdict {
    pub pass: usize,
    pub fail: usize,
    pub errors: usize,
}

/// The cells of one contender's runs on one filesystem: (median, min, max, RSS, ratio), and
/// the ratio itself.
fn cells(row: &Row, rows: &[Row]) -> ([String; 5], Option<f64>, Option<Stats>) {
    let dash = || "-".to_string();
    let Outcome::Measured(ms) = &row.outcome else {
        return ([dash(), dash(), dash(), dash(), dash()], None, None);
    };
    let Some(s) = stats(ms) else {
        return ([dash(), dash(), dash(), dash(), dash()], None, None);
    };
    let base = rows
        .iter()
        .find(|r| r.case == row.case && r.fs == row.fs && r.baseline)
        .and_then(|r| match &r.outcome {
            Outcome::Measured(ms) => stats(ms),
            _ => None,
        });
    let ratio = base.as_ref().map(|b| s.median / b.median);
    (
        [
            format!("{:.3}", s.median),
            format!("{:.3}", s.min),
            format!("{:.3}", s.max),
            format!("{:.1}", s.rss_mib),
            ratio.map_or_else(dash, |r| format!("{r:.2}x")),
        ],
        ratio,
        Some(s),
    )
}

/// Prints the results table (then the stderr of failed runs) and returns the verdict.
///
/// One line per contender: the full figures on `fs[0]` (the targets judge these), the median and
/// ratio on each further filesystem beside them.
pub fn print_table(rows: &[Row], fs: &[&'static str]) -> Verdict {
    let Some((&primary, others)) = fs.split_first() else {
        return Verdict::default();
    };
    let mut header: Vec<String> = vec!["case".into(), "tool".into()];
    for h in ["median s", "min s", "max s", "peak RSS MiB", "ratio"] {
        header.push(format!("{primary} {h}"));
    }
    for other in others {
        header.push(format!("{other} median s"));
        header.push(format!("{other} ratio"));
    }
    header.push("target".into());
    header.push("result".into());

    let mut table: Vec<Vec<String>> = Vec::new();
    let mut verdict = Verdict::default();
    let mut errors = String::new();
    let dash = || "-".to_string();
    for row in rows.iter().filter(|r| r.fs == primary) {
        let mut target = Vec::new();
        if row.baseline {
            target.push("baseline".to_string());
        }
        if let Some(r) = row.max_ratio {
            target.push(format!("<= {r:.2}x"));
        }
        if let Some(m) = row.max_rss_mib {
            target.push(format!("RSS <= {m:.0} MiB"));
        }
        let target = if target.is_empty() {
            dash()
        } else {
            target.join(", ")
        };
        let (main, ratio, s) = cells(row, rows);
        let mut line = vec![row.case.to_string(), row.tool.to_string()];
        line.extend(main);
        for other in others {
            match rows
                .iter()
                .find(|r| r.case == row.case && r.tool == row.tool && r.fs == *other)
            {
                Some(o) => {
                    let (c, _, _) = cells(o, rows);
                    line.push(c[0].clone());
                    line.push(c[4].clone());
                }
                None => line.extend([dash(), dash()]),
            }
        }
        let result = match &row.outcome {
            Outcome::Skipped(why) => format!("skipped: {why}"),
            Outcome::Failed { .. } => "ERROR (below)".to_string(),
            Outcome::Measured(_) if row.max_ratio.is_none() && row.max_rss_mib.is_none() => dash(),
            Outcome::Measured(_) => {
                let ratio_ok = match (row.max_ratio, ratio) {
                    (None, _) => Some(true),
                    (Some(max), Some(r)) => Some(r <= max),
                    (Some(_), None) => None,
                };
                let rss_ok = row
                    .max_rss_mib
                    .is_none_or(|max| s.as_ref().is_some_and(|s| s.rss_mib <= max));
                match (ratio_ok, rss_ok) {
                    (Some(true), true) => {
                        verdict.pass += 1;
                        "PASS".to_string()
                    }
                    (None, true) => "n/a (no baseline)".to_string(),
                    _ => {
                        verdict.fail += 1;
                        "FAIL".to_string()
                    }
                }
            }
        };
        line.push(target);
        line.push(result);
        table.push(line);
    }
    for row in rows {
        if let Outcome::Failed { run, error } = &row.outcome {
            verdict.errors += 1;
            let _ = writeln!(
                errors,
                "\n{} / {} / {} failed on run {run}:\n{error}",
                row.fs, row.case, row.tool
            );
        }
    }

    let mut widths: Vec<usize> = header.iter().map(String::len).collect();
    for line in &table {
        for (w, cell) in widths.iter_mut().zip(line) {
            *w = (*w).max(cell.len());
        }
    }
    let last = header.len() - 1;
    let fmt_line = |cells: &[String]| {
        let mut out = String::new();
        for (i, (cell, &w)) in cells.iter().zip(&widths).enumerate() {
            // Text columns left-aligned, numbers right-aligned; no padding after the last one.
            if i == last {
                out.push_str(cell);
            } else if i < 2 || i == last - 1 {
                out.push_str(&format!("{cell:<w$}  "));
            } else {
                out.push_str(&format!("{cell:>w$}  "));
            }
        }
        out
    };
    println!();
    println!("{}", fmt_line(&header));
    let rule: Vec<String> = widths.iter().map(|&w| "-".repeat(w)).collect();
    println!("{}", fmt_line(&rule));
    for line in &table {
        println!("{}", fmt_line(line));
    }
    if !errors.is_empty() {
        print!("{errors}");
    }
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        cmd("sh", &[&"-c", &script])
    }

    #[test]
    fn a_pipeline_runs_and_its_peak_rss_is_the_max_over_its_processes() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        // dd fills a 64 MiB buffer: the pipeline's peak is dd's, not the small first stage's.
        let job = Job::new(sh("printf hello"))
            .pipe(cmd("tr", &[&"a-z", &"A-Z"]))
            .pipe(sh(
                "cat; dd if=/dev/zero of=/dev/null bs=64M count=1 2>/dev/null",
            ))
            .stdout_to(&out);
        let m = measure(job, &tmp.path().join("err"), Duration::from_secs(60)).unwrap();
        assert_eq!(fs::read_to_string(&out).unwrap(), "HELLO");
        assert!(m.max_rss_kib >= 60 * 1024, "{m:?}");

        let small = measure(
            Job::new(sh("true")),
            &tmp.path().join("err"),
            Duration::from_secs(60),
        );
        assert!(small.unwrap().max_rss_kib < 32 * 1024);
    }

    #[test]
    fn a_failing_stage_is_an_error_with_its_stderr() {
        let tmp = tempfile::tempdir().unwrap();
        let job = Job::new(sh("echo hi")).pipe(sh("cat >/dev/null; echo oops >&2; exit 3"));
        let err = measure(job, &tmp.path().join("err"), Duration::from_secs(60)).unwrap_err();
        let err = format!("{err:#}");
        assert!(
            err.contains("exited with status 3") && err.contains("oops"),
            "{err}"
        );
    }

    #[test]
    fn a_run_past_the_timeout_is_killed() {
        let tmp = tempfile::tempdir().unwrap();
        let start = Instant::now();
        let err = measure(
            Job::new(sh("sleep 30")),
            &tmp.path().join("err"),
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(10));
        assert!(format!("{err:#}").contains("timeout"), "{err:#}");
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[1.0, 2.0, 10.0]), 2.0);
        assert_eq!(median(&[1.0, 2.0, 4.0, 10.0]), 3.0);
    }
}
