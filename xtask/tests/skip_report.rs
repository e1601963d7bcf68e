//! The last test binary of `cargo test --workspace` (xtask sorts last, and this file last in
//! it): at its exit it prints how many tests of the whole run skipped and why, so that is what
//! the run's final lines say (see `ovl_tests::skips`).

#[test]
fn the_runs_skips_are_reported_at_its_end() {
    ovl_tests::skips::report_run_at_exit();
}
