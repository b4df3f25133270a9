//! The bucketed executor's workload and its checkers.
//!
//! Clients on every member submit numbered tasks to a few hundred buckets of one executor
//! that every member processes (batch size 3, at most [`PER_MEMBER`] batches at once per
//! member; the processor takes a few milliseconds and fails the first attempt of some
//! tasks), while the seed's faults happen. Then the faults end, the cluster settles and the
//! queues drain, and the checkers run over what the processors recorded (bucket, tasks,
//! start, end, member):
//! - **nothing lost**: every acknowledged task was processed at least once; and exactly once
//!   when the seed has no fault that kills, pauses, cuts or removes a member;
//! - **order**: per bucket and client, tasks were first processed in the order the client
//!   submitted them (each submit awaited before the next);
//! - **exclusivity**: no two `process` calls of one bucket overlapped, except a call on a
//!   member that a fault killed, paused or cut off while it ran (the others then consider
//!   it dead: the documented limit of a lease-less scheme);
//! - **concurrency**: no member ran more than [`PER_MEMBER`] batches at once (same
//!   exception).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use grid::{Batch, BucketedExecutor, BucketedSettings, Concurrency};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::workload::{Handles, Harness, RunOptions, SeedReport, Trouble};
use crate::world::{derive, simulate, World};

/// Buckets of the workload.
const BUCKETS: u32 = 200;
/// Batches at once per member.
pub const PER_MEMBER: u32 = 4;
/// How long the queues may take to drain after the faults.
const DRAIN_LIMIT: Duration = Duration::from_secs(120);

/// A task: who submitted it, its number for that client, its bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
struct Task {
    client: u32,
    n: u32,
    bucket: u32,
}

/// One `process` call that succeeded: member, incarnation, bucket, tasks, start, end (ns of
/// world time).
#[derive(Debug, Clone)]
struct Call {
    member: usize,
    bucket: u32,
    tasks: Vec<Task>,
    start: u64,
    end: u64,
}

type Calls = Arc<Mutex<Vec<Call>>>;
type Execs = Handles<BucketedExecutor<Task>>;

async fn open_executor(
    world: &World,
    i: usize,
    calls: &Calls,
    ns: impl Fn() -> u64 + Clone + Send + Sync + 'static,
) -> anyhow::Result<BucketedExecutor<Task>> {
    let grid = world.slots[i]
        .grid
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("member {i} is not running"))?;
    let calls = calls.clone();
    let settings = BucketedSettings::new(|t: &Task| t.bucket)
        .batch_size(3)
        .max_attempts(1_000)
        .retry_delay(Duration::from_millis(100))
        .max_concurrency(PER_MEMBER, Concurrency::PerNode)
        .processor(move |batch: Batch<Task, u32>| {
            let calls = calls.clone();
            let ns = ns.clone();
            async move {
                let began = ns();
                let work = 1 + batch.tasks.iter().map(|t| t.n % 7).sum::<u32>();
                tokio::time::sleep(Duration::from_millis(work as u64)).await;
                if batch.attempt == 1 && batch.tasks.iter().any(|t| t.n % 11 == 5) {
                    return Err("the first attempt of a task numbered 5 mod 11 fails");
                }
                calls.lock().unwrap_or_else(|e| e.into_inner()).push(Call {
                    member: i,
                    bucket: batch.bucket,
                    tasks: batch.tasks,
                    start: began,
                    end: ns(),
                });
                Ok(())
            }
        });
    Ok(grid.bucketed_executor("sim-exec", settings).await?)
}

/// A client: numbered tasks to random buckets, each awaited; records the acknowledged ones.
async fn client(
    id: u32,
    member: usize,
    seed: u64,
    execs: Execs,
    acked: Arc<Mutex<Vec<(Task, u64)>>>,
    ns: impl Fn() -> u64,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut n = 0u32;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let Some(exec) = execs.get(member) else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        n += 1;
        let task = Task {
            client: id,
            n,
            bucket: rng.gen_range(0..BUCKETS),
        };
        if exec.submit(task).await.is_ok() {
            acked
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((task, ns()));
        }
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..40))).await;
    }
}

/// Runs seed `opts.seed` of the executor workload and checks it.
pub fn run(opts: &RunOptions) -> SeedReport {
    let opts = opts.clone();
    simulate(opts.seed, async move { run_in_world(&opts).await })
}

async fn run_in_world(opts: &RunOptions) -> SeedReport {
    let mut h = match Harness::start(opts).await {
        Ok(h) => h,
        Err(report) => return report,
    };
    let ns = h.clock();
    let calls: Calls = Arc::default();
    let execs: Execs = Handles::new(opts.members);
    let open = {
        let (calls, ns) = (calls.clone(), ns.clone());
        async move |w: &World, i: usize| open_executor(w, i, &calls, ns.clone()).await
    };
    h.open_all(&execs, &open).await;
    let acked = Arc::new(Mutex::new(Vec::new()));
    let mut clients = Vec::new();
    for m in 0..opts.members {
        for c in 0..2 {
            let id = (m * 100 + c) as u32;
            clients.push(tokio::spawn(client(
                id,
                m,
                derive(opts.seed, &format!("exec client {id}")),
                execs.clone(),
                acked.clone(),
                ns.clone(),
                h.stop.clone(),
            )));
        }
    }
    h.drive_faults(&execs, &open).await;
    h.stop_clients(clients).await;
    let acked_at: Vec<(Task, u64)> = acked.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let acked: Vec<Task> = acked_at.iter().map(|(t, _)| *t).collect();
    h.report.ops = acked.len();
    // Drain: every acknowledged task processed.
    let want: BTreeSet<Task> = acked.iter().copied().collect();
    let drained = {
        let calls = calls.clone();
        let want = want.clone();
        h.world
            .run_until(DRAIN_LIMIT, move |_| {
                let got: BTreeSet<Task> = calls
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .flat_map(|c| c.tasks.iter().copied())
                    .collect();
                want.is_subset(&got)
            })
            .await
            .is_some()
    };
    let calls: Vec<Call> = calls.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if !drained {
        let got: BTreeSet<Task> = calls.iter().flat_map(|c| c.tasks.iter().copied()).collect();
        let lost: Vec<&Task> = want.difference(&got).take(5).collect();
        let state = lost
            .first()
            .map(|t| bucket_state(&h.world, t.bucket))
            .unwrap_or_default();
        // When the lost tasks were acknowledged, and to clients of which members.
        let lost_at: Vec<(u64, usize)> = acked_at
            .iter()
            .filter(|(t, _)| !got.contains(t))
            .map(|(t, at)| (*at, t.client as usize / 100))
            .collect();
        let first = lost_at.iter().map(|(at, _)| *at).min().unwrap_or(0);
        let last = lost_at.iter().map(|(at, _)| *at).max().unwrap_or(0);
        let members: BTreeSet<usize> = lost_at.iter().map(|(_, m)| *m).collect();
        let seen = h.world.observe();
        h.report.violations.push(format!(
            "lost: {} of {} acknowledged tasks never processed (first: {lost:?}), acknowledged \
             between {:.3}s and {:.3}s to clients on members {members:?}; {seen}{state}",
            lost_at.len(),
            want.len(),
            first as f64 / 1e9,
            last as f64 / 1e9,
        ));
    }
    let (troubles, faulty) = (h.troubles.clone(), h.faulty);
    check(&mut h.report, &acked, &calls, &troubles, faulty);
    h.finish("")
}

/// Where `bucket` stands on every member: its partition's owner, the processors each
/// member knows, and the bucket's queue, in-flight batch, attempts and retry time.
fn bucket_state(world: &World, bucket: u32) -> String {
    let mut state = String::new();
    let mut key = b"sim-exec".to_vec();
    key.push(0);
    key.extend_from_slice(&grid::codec::encode(&bucket).unwrap_or_default());
    for i in world.running() {
        let Some(g) = world.slots[i].grid.as_ref() else {
            continue;
        };
        let p = g.runtime().partition_of(&key);
        let owner = g.runtime().table().owner(p).map(|o| o.to_string());
        let service = g.bucketed_executors().service();
        let b = service
            .queues(p)
            .and_then(|q| q.bucket("sim-exec", &key[9..]).cloned());
        let _ = write!(
            state,
            " [m{i}: p{p} owner {owner:?}, processors {:?}, bucket {:?}]",
            service.processors("sim-exec"),
            b.map(|b| (
                b.queue.iter().map(|t| t.seq).collect::<Vec<_>>(),
                b.in_flight,
                b.attempts,
                b.retry_at
                    .map(|r| r.saturating_duration_since(Instant::now()))
            )),
        );
    }
    state
}

/// The checkers (see the module docs).
fn check(
    report: &mut SeedReport,
    acked: &[Task],
    calls: &[Call],
    troubles: &[Trouble],
    faulty: bool,
) {
    // A call is excused from exclusivity and concurrency if a fault hit its member (or the
    // whole cluster) while it ran.
    let excused = |c: &Call| troubles.iter().any(|t| t.hits(c.member, c.start, c.end));
    // Exactly once without faults.
    let mut times: BTreeMap<Task, usize> = BTreeMap::new();
    for c in calls {
        for t in &c.tasks {
            *times.entry(*t).or_default() += 1;
        }
    }
    if !faulty {
        let twice: Vec<_> = times.iter().filter(|(_, n)| **n > 1).take(5).collect();
        if !twice.is_empty() {
            report.violations.push(format!(
                "processed more than once without a fault: {twice:?}"
            ));
        }
    }
    // Order: per bucket and client, first processings in submission order.
    let mut by_start: Vec<&Call> = calls.iter().collect();
    by_start.sort_by_key(|c| (c.start, c.end, c.member));
    let mut first: BTreeMap<(u32, u32), u32> = BTreeMap::new();
    let mut seen: BTreeSet<Task> = BTreeSet::new();
    let acked_set: BTreeSet<Task> = acked.iter().copied().collect();
    for c in &by_start {
        for t in &c.tasks {
            if !seen.insert(*t) {
                continue;
            }
            if let Some(prev) = first.insert((t.bucket, t.client), t.n) {
                if prev > t.n && acked_set.contains(t) {
                    report.violations.push(format!(
                        "order: bucket {} client {}: task {} first processed after task {prev}",
                        t.bucket, t.client, t.n
                    ));
                }
            }
        }
    }
    // Exclusivity and concurrency.
    let mut per_bucket: BTreeMap<u32, Vec<&Call>> = BTreeMap::new();
    for c in calls.iter().filter(|c| !excused(c)) {
        per_bucket.entry(c.bucket).or_default().push(c);
    }
    for (bucket, mut cs) in per_bucket {
        cs.sort_by_key(|c| c.start);
        for w in cs.windows(2) {
            if w[1].start < w[0].end {
                report.violations.push(format!(
                    "exclusivity: bucket {bucket}: m{} [{}, {}] overlaps m{} [{}, {}]",
                    w[0].member, w[0].start, w[0].end, w[1].member, w[1].start, w[1].end
                ));
                break;
            }
        }
    }
    let mut events: BTreeMap<usize, Vec<(u64, i32)>> = BTreeMap::new();
    for c in calls.iter().filter(|c| !excused(c)) {
        let e = events.entry(c.member).or_default();
        e.push((c.start, 1));
        e.push((c.end, -1));
    }
    for (member, mut e) in events {
        e.sort();
        let mut now = 0;
        for (at, d) in e {
            now += d;
            if now > PER_MEMBER as i32 {
                report.violations.push(format!(
                    "concurrency: m{member} ran {now} batches at once at {at} ns (limit {PER_MEMBER})"
                ));
                break;
            }
        }
    }
}
