use std::time::Duration;

use grid_sim::cache_workload::{run, RunOptions};

#[test]
fn one_seed() {
    let seed: u64 = std::env::var("SIM_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let mut opts = RunOptions::new(seed);
    opts.duration = Duration::from_secs(30);
    let t = std::time::Instant::now();
    let r = run(&opts);
    println!("seed {seed}: {:?} simulated in {:?} wall, {} ops ({} unknown), digest {:x}\n{}", r.simulated, t.elapsed(), r.ops, r.unknown, r.digest, r.schedule);
    if let Some(rep) = &r.report { println!("{rep}"); }
    assert!(r.violations.is_empty());
}
