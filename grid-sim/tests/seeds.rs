//! The fixed seeds of the cache workload that `cargo test` runs, and the seeds that found
//! grid bugs (ignored until the runtime is fixed: run them with `--ignored`).
//!
//! Unoptimised, the simulator runs about 1× real time for 5 members under the workload
//! (release: 10–15×), so the set here is small: 3 seeds × 20 simulated seconds. The `sim`
//! binary (release) runs many more.

use std::time::Duration;

use grid_sim::cache_workload::{run, RunOptions};

fn check(seed: u64, seconds: u64) {
    let mut opts = RunOptions::new(seed);
    opts.duration = Duration::from_secs(seconds);
    let r = run(&opts);
    if let Some(report) = &r.report {
        println!("{report}");
    }
    assert!(
        r.violations.is_empty(),
        "seed {seed}: {:?}\nreproduce: {}",
        r.violations,
        opts.reproduce()
    );
}

#[test]
fn fixed_seeds_pass() {
    for seed in [1, 8, 12] {
        check(seed, 20);
    }
}

/// A member paused for ~0.7 s (its datagrams held, then delivered): increments acknowledged
/// while it was paused are missing from a read right after (k0 read `None` after `Incr`
/// answered 4). Reported to the runtime's owner; see the report of `sim --seed 3`.
#[test]
#[ignore = "grid bug: acknowledged writes lost around a paused member (seed 3)"]
fn regression_seed_3_pause_loses_acknowledged_increments() {
    check(3, 30);
}
