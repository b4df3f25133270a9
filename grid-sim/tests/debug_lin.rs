use std::time::Duration;

use grid_sim::cache_workload::{run, KeyModel, RunOptions};
use grid_sim::linearizability::{check, Entry};

#[test]
fn find_prefix() {
    let seed: u64 = std::env::var("SIM_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let mut opts = RunOptions::new(seed);
    opts.duration = Duration::from_secs(30);
    let r = run(&opts);
    let mut h: Vec<_> = r.history.iter().filter(|r| r.key == 0).cloned().collect();
    h.sort_by_key(|r| r.call);
    let es = |n: usize| -> Vec<Entry<_>> { h[..n].iter().map(|r| Entry { call: r.call, ret: r.ret, op: r.op.clone() }).collect() };
    let (mut lo, mut hi) = (0, h.len());
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if check::<KeyModel>(None, &es(mid), 10_000_000) == Some(true) { lo = mid } else { hi = mid }
    }
    println!("first failing prefix {hi} of {}", h.len());
    for r in &h[hi.saturating_sub(15)..hi] {
        println!("  [{:.6} -> {:?}] c{} m{} {:?} {:?}", r.call as f64 / 1e9, r.ret.map(|t| t as f64 / 1e9), r.client, r.member, r.op, r.error);
    }
}
