//! The skip report: a test that skips for want of root, a package or the test user still shows
//! as `ok` in libtest's output, and its notice goes to stderr, which libtest hides for passing
//! tests. So every skip is also recorded here, and when the test binary exits (after libtest's
//! `test result:` line) a summary goes straight to the terminal, past the capture: how many
//! tests of this binary skipped, why, what to do, and the total so far in this `cargo test` run
//! (kept in `target/ovl-test-skips/`, one file per run of cargo). The last test binary of the
//! workspace (xtask's `skip_report`) prints the run's total at its exit, so the last lines of
//! `cargo test --workspace` say it.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;

/// (test, what is missing), in the order they skipped.
static SKIPS: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

/// Record that the running test skipped for want of `what`.
pub fn record(what: &str) {
    let test = std::thread::current()
        .name()
        .filter(|n| *n != "main")
        .unwrap_or("(a test)")
        .to_string();
    let mut skips = SKIPS.lock().unwrap_or_else(|e| e.into_inner());
    if skips.is_empty() {
        // SAFETY: registers a plain `extern "C" fn()`; it runs once, at exit.
        unsafe {
            libc::atexit(report_at_exit);
        }
    }
    if let Some(file) = run_file() {
        // One line per skip, appended (O_APPEND: test binaries never run at once, but be safe).
        let binary = std::env::args().next().unwrap_or_default();
        let binary = binary.rsplit('/').next().unwrap_or("").to_string();
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&file)
        {
            let _ = writeln!(f, "{binary}\t{test}\t{what}");
        }
    }
    skips.push((test, what.to_string()));
}

/// This run's record: `target/ovl-test-skips/cargo-PID-START`, PID and START (its start time in
/// clock ticks) naming the `cargo test` that runs us, so two runs never share one.
fn run_file() -> Option<PathBuf> {
    let ppid = std::os::unix::process::parent_id();
    let stat = std::fs::read_to_string(format!("/proc/{ppid}/stat")).ok()?;
    // Field 22 (starttime), counted after the parenthesised command name.
    let start = stat
        .rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .to_string();
    let dir = crate::target_dir().join("ovl-test-skips");
    std::fs::create_dir_all(&dir).ok()?;
    Some(dir.join(format!("cargo-{ppid}-{start}")))
}

extern "C" fn report_at_exit() {
    let skips = match SKIPS.try_lock() {
        Ok(s) => s.clone(),
        Err(_) => return,
    };
    let text = report(&skips, run_file());
    // Straight to fd 2: libtest's capture only takes print!/eprint!, and this runs after it.
    let _ = std::io::stderr().write_all(text.as_bytes());
}

/// At this process's exit, print the total of this `cargo test` run's skips so far (nothing when
/// there were none). For the last test binary of the run.
pub fn report_run_at_exit() {
    extern "C" fn at_exit() {
        let Some(run) = run_file() else { return };
        let Ok(text) = std::fs::read_to_string(&run) else {
            return;
        };
        let mut reasons: Vec<(String, usize)> = Vec::new();
        for what in text.lines().filter_map(|l| l.splitn(3, '\t').nth(2)) {
            match reasons.iter_mut().find(|(w, _)| w == what) {
                Some((_, n)) => *n += 1,
                None => reasons.push((what.to_string(), 1)),
            }
        }
        let mut out = format!(
            "\n*** SKIPPED in this cargo test run: {} tests passed without checking what they test, for want of:\n",
            text.lines().count()
        );
        for (what, n) in reasons {
            out.push_str(&format!("***   {what}: {n}\n"));
        }
        out.push_str(&format!(
            "*** Which tests: {}. To run them: as root, with the packages README.md lists \
             (.ci/run sets it all up); OVL_REQUIRE_ALL=1 makes every skip a failure.\n",
            run.display()
        ));
        let _ = std::io::stderr().write_all(out.as_bytes());
    }
    static ONCE: std::sync::Once = std::sync::Once::new();
    // SAFETY: registers a plain `extern "C" fn()`; it runs once, at exit.
    ONCE.call_once(|| unsafe {
        libc::atexit(at_exit);
    });
}

/// The summary for `skips` (and, when given, the run's record so far).
pub fn report(skips: &[(String, String)], run: Option<PathBuf>) -> String {
    if skips.is_empty() {
        return String::new();
    }
    let mut reasons: Vec<(&str, Vec<&str>)> = Vec::new();
    for (test, what) in skips {
        match reasons.iter_mut().find(|(w, _)| w == what) {
            Some((_, tests)) => tests.push(test),
            None => reasons.push((what, vec![test])),
        }
    }
    let mut out = format!(
        "\n*** SKIPPED: {} of the tests above passed without checking what they test, for want of:\n",
        skips.len()
    );
    for (what, tests) in &reasons {
        let mut names = tests.iter().take(4).copied().collect::<Vec<_>>().join(", ");
        if tests.len() > 4 {
            names.push_str(&format!(", ... ({} more)", tests.len() - 4));
        }
        out.push_str(&format!("***   {what}: {} ({names})\n", tests.len()));
    }
    out.push_str(
        "*** To run them: run the tests as root (they then also run the rootless ones as the \
         test user ovltest) with the packages README.md lists; .ci/run sets it all up. \
         OVL_REQUIRE_ALL=1 turns every skip into a failure.\n",
    );
    let record = run.and_then(|r| std::fs::read_to_string(&r).ok().map(|t| (r, t)));
    if let Some((run, text)) = record {
        let lines = text.lines().count();
        let mut binaries: Vec<&str> = text.lines().filter_map(|l| l.split('\t').next()).collect();
        binaries.dedup();
        out.push_str(&format!(
            "*** This cargo test run so far: {lines} skipped in {} test binaries (all of them: {})\n",
            binaries.len(),
            run.display()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_report_counts_groups_and_says_what_to_do() {
        let skips = vec![
            ("a".to_string(), "root".to_string()),
            ("b".to_string(), "fuse-overlayfs".to_string()),
            ("c".to_string(), "root".to_string()),
        ];
        let text = super::report(&skips, None);
        assert!(text.contains("SKIPPED: 3 of the tests"), "{text}");
        assert!(text.contains("root: 2 (a, c)"), "{text}");
        assert!(text.contains("fuse-overlayfs: 1 (b)"), "{text}");
        assert!(text.contains("OVL_REQUIRE_ALL=1"), "{text}");
        assert_eq!(super::report(&[], None), "");
    }
}
