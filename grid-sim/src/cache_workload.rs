//! The cache workload and its checkers.
//!
//! Clients on every member run get / put / put_if_absent / remove / an increment entry
//! processor on a few keys of a partitioned cache, while the seed's faults happen. Then the
//! faults end, the cluster settles, every member reads every key, and the checkers run:
//! - **linearizability** of each key's history (when no fault partitioned the cluster, so
//!   that failures stayed within `backup_count`): Wing & Gong's search with Lowe's
//!   memoisation ([`crate::linearizability`]). With the final reads in the history, this
//!   also finds any acknowledged write that was lost;
//! - **convergence**: after the faults, every member reads the same value of every key.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use grid::Cache;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::linearizability::{self, Entry, Model};
use crate::workload::{Handles, Harness, RunOptions, SeedReport};
use crate::world::{derive, simulate, World};

/// Keys of the workload.
const KEYS: usize = 4;
/// Search steps the linearizability checker may take per key before it gives up.
const CHECK_BUDGET: u64 = 2_000_000;
/// How long the world may take to settle after the faults.
const SETTLE_LIMIT: Duration = Duration::from_secs(60);

/// One cache operation and what it returned (`None` fields: no answer).
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// `get` → value.
    Get(Option<Option<i64>>),
    /// `put(v)` → previous value.
    Put(i64, Option<Option<i64>>),
    /// `put_if_absent(v)` → previous value.
    PutIfAbsent(i64, Option<Option<i64>>),
    /// `remove` → previous value.
    Remove(Option<Option<i64>>),
    /// The `incr` processor → the new value.
    Incr(Option<i64>),
}

impl Op {
    /// The same operation with its answer forgotten (as if still pending).
    fn unanswered(&self) -> Self {
        match self {
            Self::Get(_) => Self::Get(None),
            Self::Put(v, _) => Self::Put(*v, None),
            Self::PutIfAbsent(v, _) => Self::PutIfAbsent(*v, None),
            Self::Remove(_) => Self::Remove(None),
            Self::Incr(_) => Self::Incr(None),
        }
    }
}

/// The register a cache key is.
pub struct KeyModel;

impl Model for KeyModel {
    type State = Option<i64>;
    type Op = Op;

    fn step(s: &Option<i64>, op: &Op, _known: bool) -> Option<Option<i64>> {
        let seen = |out: &Option<Option<i64>>| out.is_none_or(|o| o == *s);
        match op {
            Op::Get(out) => seen(out).then_some(*s),
            Op::Put(v, out) => seen(out).then_some(Some(*v)),
            Op::PutIfAbsent(v, out) => seen(out).then_some(if s.is_none() { Some(*v) } else { *s }),
            Op::Remove(out) => seen(out).then_some(None),
            Op::Incr(out) => {
                let next = s.unwrap_or(0) + 1;
                out.is_none_or(|o| o == next).then_some(Some(next))
            }
        }
    }
}

/// One recorded operation.
#[derive(Debug, Clone)]
pub struct Record {
    /// Client (member index × 100 + client number; 9999 for the final reads).
    pub client: usize,
    /// Member it ran on.
    pub member: usize,
    /// Key index.
    pub key: usize,
    /// Invocation (ns since the world started).
    pub call: u64,
    /// Answer, if any.
    pub ret: Option<u64>,
    /// The operation and result.
    pub op: Op,
    /// The error, if it failed.
    pub error: Option<String>,
}

type Caches = Handles<Cache<String, i64>>;
/// A final read: the member and what it read.
type FinalRead = (usize, Result<Option<i64>, String>);

fn key_name(k: usize) -> String {
    format!("k{k}")
}

async fn open_cache(world: &World, i: usize) -> anyhow::Result<Cache<String, i64>> {
    let grid = world.slots[i]
        .grid
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("member {i} is not running"))?;
    let cache = grid.cache::<String, i64>("kv").await?;
    cache.register_processor(
        "incr",
        |entry: &mut grid::ProcessorEntry<String, i64>, (): ()| {
            let next = entry.value().copied().unwrap_or(0) + 1;
            entry.set_value(next);
            next
        },
    );
    Ok(cache)
}

/// Runs one client until `stop`, recording into `history`.
#[allow(clippy::too_many_arguments)]
async fn client(
    id: usize,
    member: usize,
    seed: u64,
    caches: Caches,
    history: Arc<Mutex<Vec<Record>>>,
    ns: impl Fn() -> u64,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut n: i64 = 0;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let Some(cache) = caches.get(member) else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let key = rng.gen_range(0..KEYS);
        let k = key_name(key);
        n += 1;
        let value = (id as i64) * 1_000_000 + n;
        let call = ns();
        let (op, error) = match rng.gen_range(0..10) {
            0..=3 => match cache.get(&k).await {
                Ok(v) => (Op::Get(Some(v)), None),
                Err(e) => (Op::Get(None), Some(e.to_string())),
            },
            4..=5 => match cache.put(&k, &value).await {
                Ok(v) => (Op::Put(value, Some(v)), None),
                Err(e) => (Op::Put(value, None), Some(e.to_string())),
            },
            6 => match cache.put_if_absent(&k, &value).await {
                Ok(v) => (Op::PutIfAbsent(value, Some(v)), None),
                Err(e) => (Op::PutIfAbsent(value, None), Some(e.to_string())),
            },
            7 => match cache.remove(&k).await {
                Ok(v) => (Op::Remove(Some(v)), None),
                Err(e) => (Op::Remove(None), Some(e.to_string())),
            },
            _ => match cache.execute_on_key::<(), i64>(&k, "incr", &()).await {
                Ok(v) => (Op::Incr(Some(v)), None),
                Err(e) => (Op::Incr(None), Some(e.to_string())),
            },
        };
        let ret = error.is_none().then(&ns);
        history
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Record {
                client: id,
                member,
                key,
                call,
                ret,
                op,
                error,
            });
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..50))).await;
    }
}

/// Runs seed `opts.seed` of the cache workload and checks it.
pub fn run(opts: &RunOptions) -> SeedReport {
    let opts = opts.clone();
    simulate(opts.seed, async move { run_in_world(&opts).await })
}

async fn run_in_world(opts: &RunOptions) -> SeedReport {
    let mut h = match Harness::start(opts).await {
        Ok(h) => h,
        Err(report) => return report,
    };
    let open = async |w: &World, i: usize| open_cache(w, i).await;
    let caches: Caches = Handles::new(opts.members);
    h.open_all(&caches, &open).await;
    let history = Arc::new(Mutex::new(Vec::new()));
    let mut clients = Vec::new();
    for m in 0..opts.members {
        for c in 0..2 {
            let id = m * 100 + c;
            clients.push(tokio::spawn(client(
                id,
                m,
                derive(opts.seed, &format!("client {id}")),
                caches.clone(),
                history.clone(),
                h.clock(),
                h.stop.clone(),
            )));
        }
    }
    h.drive_faults(&caches, &open).await;
    h.stop_clients(clients).await;
    if !h.settle(SETTLE_LIMIT).await && h.world.out_of_time.is_some() {
        return h.finish("");
    }
    // Final reads: every member, every key.
    let ns = h.clock();
    let mut finals: BTreeMap<usize, Vec<FinalRead>> = BTreeMap::new();
    for m in h.world.running() {
        let Some(cache) = caches.get(m) else { continue };
        for key in 0..KEYS {
            let call = ns();
            let got = cache.get(&key_name(key)).await.map_err(|e| e.to_string());
            let ret = ns();
            if let Ok(v) = &got {
                history
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(Record {
                        client: 9999,
                        member: m,
                        key,
                        call,
                        ret: Some(ret),
                        op: Op::Get(Some(*v)),
                        error: None,
                    });
            }
            finals.entry(key).or_default().push((m, got));
        }
    }
    for (key, reads) in &finals {
        let values: Vec<_> = reads.iter().map(|(_, r)| r.clone()).collect();
        if values.iter().any(|v| v.is_err()) || values.windows(2).any(|w| w[0] != w[1]) {
            h.report.violations.push(format!(
                "convergence: members read different values of {} after the faults: {:?}",
                key_name(*key),
                reads
            ));
        }
    }
    let history = history.lock().unwrap_or_else(|e| e.into_inner()).clone();
    h.report.ops = history.len();
    h.report.unknown = history.iter().filter(|r| r.ret.is_none()).count();
    let mut bad_keys = Vec::new();
    if !h.schedule.partitions() {
        for key in 0..KEYS {
            let entries: Vec<Entry<Op>> = history
                .iter()
                .filter(|r| r.key == key)
                .map(|r| Entry {
                    call: r.call,
                    ret: r.ret,
                    op: r.op.clone(),
                })
                .collect();
            match linearizability::check::<KeyModel>(None, &entries, CHECK_BUDGET) {
                Some(true) => {}
                Some(false) => {
                    bad_keys.push(key);
                    h.report.violations.push(format!(
                        "linearizability: the history of {} ({} operations) is not linearizable",
                        key_name(key),
                        entries.len()
                    ));
                }
                None => tracing::warn!(
                    seed = opts.seed,
                    key,
                    "linearizability check gave up (budget)"
                ),
            }
        }
    }
    let details = if h.report.violations.is_empty() {
        String::new()
    } else {
        details(&history, &bad_keys)
    };
    h.finish(&details)
}

/// The length of the shortest prefix of `ops` (sorted by invocation) whose history is not
/// linearizable, if the checker decides within its budget.
fn first_failing_prefix(ops: &[&Record]) -> Option<usize> {
    // The history as it stood when the n-th operation was invoked: operations answered
    // later count as pending. A linearizable history stays linearizable cut this way (an
    // operation answered by then saw only operations invoked before), so the search is
    // monotone and the prefix it finds ends where the first wrong answer was given.
    let fails = |n: usize| {
        let cut = ops[n - 1].call;
        let entries: Vec<Entry<Op>> = ops[..n]
            .iter()
            .map(|r| match r.ret {
                Some(ret) if ret <= cut => Entry {
                    call: r.call,
                    ret: Some(ret),
                    op: r.op.clone(),
                },
                _ => Entry {
                    call: r.call,
                    ret: None,
                    op: r.op.unanswered(),
                },
            })
            .collect();
        linearizability::check::<KeyModel>(None, &entries, CHECK_BUDGET) == Some(false)
    };
    if !fails(ops.len()) {
        return None;
    }
    let (mut lo, mut hi) = (1, ops.len());
    if fails(1) {
        return Some(1);
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fails(mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Some(hi)
}

/// The operations of each key in `keys` up to where its history stops being linearizable.
fn details(history: &[Record], keys: &[usize]) -> String {
    let mut r = String::new();
    for &key in keys {
        let mut ops: Vec<&Record> = history.iter().filter(|h| h.key == key).collect();
        ops.sort_by_key(|h| h.call);
        // Where the history stops being linearizable: the shortest prefix (by invocation)
        // that fails, found by bisection: it points at the fault that broke the key, not
        // at the run's end.
        let end = first_failing_prefix(&ops).unwrap_or(ops.len());
        let _ = writeln!(
            r,
            "operations on {} up to where its history stops being linearizable (operation {end} of {}):",
            key_name(key),
            ops.len()
        );
        for h in ops[..end].iter().skip(end.saturating_sub(30)) {
            let _ = writeln!(
                r,
                "  [{:>12.6}s → {}] client {} on m{}: {:?}{}",
                h.call as f64 / 1e9,
                h.ret
                    .map_or("?".to_string(), |t| format!("{:.6}s", t as f64 / 1e9)),
                h.client,
                h.member,
                h.op,
                h.error
                    .as_ref()
                    .map(|e| format!(" error: {e}"))
                    .unwrap_or_default()
            );
        }
    }
    r
}
