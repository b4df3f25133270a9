//! Near and replicated copies converge after the faults (`sim --workload copies`).
//!
//! Clients on every member write a few keys of a near cache and of a replicated cache
//! (`put`, `remove`) and read them (which fills the near copies) while the seed's faults
//! happen. Then the faults end, the cluster settles, and the checker reads every key on every
//! member, from its copy: within [`CONVERGE_LIMIT`] of simulated time, every member must
//! read the same value of every key of each cache — a near copy that missed an
//! invalidation, or a replicated copy that missed a change, stays different for ever.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use grid::{Cache, CacheSettings};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::workload::{Handles, Harness, RunOptions, SeedReport};
use crate::world::{derive, simulate, World};

/// Keys of each cache.
const KEYS: usize = 4;
/// How long the cluster may take to settle after the faults.
const SETTLE_LIMIT: Duration = Duration::from_secs(60);
/// How long the copies may take to converge once the cluster settled.
pub const CONVERGE_LIMIT: Duration = Duration::from_secs(30);

/// A member's two caches.
#[derive(Clone)]
struct Copies {
    near: Cache<String, i64>,
    replicated: Cache<String, i64>,
}

async fn open_copies(world: &World, i: usize) -> anyhow::Result<Copies> {
    let grid = world.slots[i]
        .grid
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("member {i} is not running"))?;
    let near = grid
        .cache::<String, i64>("near")
        .settings(CacheSettings::builder().near().build())
        .await?;
    let replicated = grid
        .cache::<String, i64>("replicated")
        .settings(CacheSettings::builder().replicated().build())
        .await?;
    Ok(Copies { near, replicated })
}

fn key_name(k: usize) -> String {
    format!("k{k}")
}

/// Runs one client until `stop`: random reads and writes on both caches; answers are not
/// checked (the near and replicated modes promise convergence, not linearizability).
async fn client(
    id: usize,
    member: usize,
    seed: u64,
    copies: Handles<Copies>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> usize {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut ops = 0;
    let mut n: i64 = 0;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let Some(c) = copies.get(member) else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let cache = if rng.gen_bool(0.5) {
            &c.near
        } else {
            &c.replicated
        };
        let k = key_name(rng.gen_range(0..KEYS));
        n += 1;
        let value = id as i64 * 1_000_000 + n;
        match rng.gen_range(0..10) {
            0..=4 => drop(cache.get(&k).await),
            5..=8 => drop(cache.put(&k, &value).await),
            _ => drop(cache.remove(&k).await),
        }
        ops += 1;
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..50))).await;
    }
    ops
}

/// Every running member's read of every key of each cache: (cache, key) → [(member, value)].
async fn read_all(
    world: &World,
    copies: &Handles<Copies>,
) -> BTreeMap<(&'static str, usize), Vec<(usize, Result<Option<i64>, String>)>> {
    let mut reads: BTreeMap<_, Vec<_>> = BTreeMap::new();
    for m in world.running() {
        let Some(c) = copies.get(m) else { continue };
        for key in 0..KEYS {
            let k = key_name(key);
            let near = c.near.get(&k).await.map_err(|e| e.to_string());
            reads.entry(("near", key)).or_default().push((m, near));
            let repl = c.replicated.get(&k).await.map_err(|e| e.to_string());
            reads
                .entry(("replicated", key))
                .or_default()
                .push((m, repl));
        }
    }
    reads
}

/// Runs seed `opts.seed` of the copies workload and checks it.
pub fn run(opts: &RunOptions) -> SeedReport {
    let opts = opts.clone();
    simulate(opts.seed, async move { run_in_world(&opts).await })
}

async fn run_in_world(opts: &RunOptions) -> SeedReport {
    let mut h = match Harness::start(opts).await {
        Ok(h) => h,
        Err(report) => return report,
    };
    let open = async |w: &World, i: usize| open_copies(w, i).await;
    let copies: Handles<Copies> = Handles::new(opts.members);
    h.open_all(&copies, &open).await;
    let mut clients = Vec::new();
    let (ops_tx, ops_rx) = std::sync::mpsc::channel();
    for m in 0..opts.members {
        for c in 0..2 {
            let id = m * 100 + c;
            let seed = derive(opts.seed, &format!("copies client {id}"));
            let (copies, stop, ops_tx) = (copies.clone(), h.stop.clone(), ops_tx.clone());
            clients.push(tokio::spawn(async move {
                let _ = ops_tx.send(client(id, m, seed, copies, stop).await);
            }));
        }
    }
    h.drive_faults(&copies, &open).await;
    h.stop_clients(clients).await;
    drop(ops_tx);
    h.report.ops = ops_rx.iter().sum();
    if !h.settle(SETTLE_LIMIT).await && h.world.out_of_time.is_some() {
        return h.finish("");
    }
    // Converge: read everything every second until every member agrees.
    let from = tokio::time::Instant::now();
    let disagree = loop {
        let reads = read_all(&h.world, &copies).await;
        let disagree: Vec<String> = reads
            .iter()
            .filter(|(_, rs)| {
                rs.iter().any(|(_, r)| r.is_err()) || rs.windows(2).any(|w| w[0].1 != w[1].1)
            })
            .map(|((cache, key), rs)| format!("{cache} {}: {rs:?}", key_name(*key)))
            .collect();
        if disagree.is_empty() || from.elapsed() >= CONVERGE_LIMIT || h.world.out_of_time.is_some()
        {
            break disagree;
        }
        h.world.run_for(Duration::from_secs(1)).await;
    };
    if !disagree.is_empty() {
        let mut v = format!(
            "convergence: {} of {} (cache, key) pairs still read differently {CONVERGE_LIMIT:?} after the cluster settled:",
            disagree.len(),
            2 * KEYS
        );
        for d in &disagree {
            let _ = write!(v, " [{d}]");
        }
        h.report.violations.push(v);
    }
    h.finish("")
}
