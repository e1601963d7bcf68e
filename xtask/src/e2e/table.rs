//! The results: one row per (driver, step), printed as a table, then what went wrong.

use std::time::Duration;

/// How a step ended.
#[derive(Debug)]
pub enum Outcome {
    /// Passed; a short description of what was checked.
    Pass(String),
    /// Failed: the first line says what, the rest shows it (command output, differences).
    Fail(String),
    /// Could not run here, and why (a failure under OVL_REQUIRE_ALL).
    Skip(String),
    /// Not run because a step it needs did not pass.
    NotRun(String),
}

#[derive(Debug)]
pub struct Row {
    pub driver: String,
    pub step: &'static str,
    pub time: Option<Duration>,
    pub outcome: Outcome,
}

#[derive(Debug, Default)]
pub struct Counts {
    pub pass: usize,
    pub fail: usize,
    pub skip: usize,
    pub not_run: usize,
}

/// Prints the table and, below it, every failure in full; returns the counts.
pub fn print(rows: &[Row], require_all: bool) -> Counts {
    let mut counts = Counts::default();
    let header = ["driver", "step", "time ms", "result", "detail"];
    let cells: Vec<[String; 5]> = rows
        .iter()
        .map(|r| {
            let (result, detail) = match &r.outcome {
                Outcome::Pass(d) => {
                    counts.pass += 1;
                    ("PASS", d.clone())
                }
                Outcome::Fail(e) => {
                    counts.fail += 1;
                    ("FAIL", e.lines().next().unwrap_or("").to_string())
                }
                Outcome::Skip(why) => {
                    counts.skip += 1;
                    ("SKIP", why.clone())
                }
                Outcome::NotRun(why) => {
                    counts.not_run += 1;
                    ("-", why.clone())
                }
            };
            [
                r.driver.clone(),
                r.step.to_string(),
                r.time
                    .map_or_else(|| "-".to_string(), |t| t.as_millis().to_string()),
                result.to_string(),
                detail,
            ]
        })
        .collect();
    let mut width = header.map(str::len);
    for row in &cells {
        for (w, c) in width.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |row: [&str; 5]| {
        // Time right-aligned, the detail unpadded.
        format!(
            "{:<w0$}  {:<w1$}  {:>w2$}  {:<w3$}  {}",
            row[0],
            row[1],
            row[2],
            row[3],
            row[4],
            w0 = width[0],
            w1 = width[1],
            w2 = width[2],
            w3 = width[3]
        )
        .trim_end()
        .to_string()
    };
    println!();
    println!("{}", line(header));
    let rule = width.map(|w| "-".repeat(w));
    println!(
        "{}",
        line([&rule[0], &rule[1], &rule[2], &rule[3], &rule[4]])
    );
    for row in &cells {
        println!("{}", line([&row[0], &row[1], &row[2], &row[3], &row[4]]));
    }
    for r in rows {
        if let Outcome::Fail(e) = &r.outcome {
            println!("\nFAIL {} / {}:", r.driver, r.step);
            for l in e.lines() {
                println!("  {l}");
            }
        }
    }
    if require_all && counts.skip > 0 {
        println!("\nOVL_REQUIRE_ALL is set: every SKIP above is a failure.");
    }
    counts
}
