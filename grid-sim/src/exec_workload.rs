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

use crate::cache_workload::{RunOptions, SeedReport};
use crate::schedule::{Fault, Schedule};
use crate::world::{derive, simulate, World, WorldConfig};

/// Buckets of the workload.
const BUCKETS: u32 = 200;
/// Batches at once per member.
pub const PER_MEMBER: u32 = 4;
/// How long the world may take to form, settle, or drain.
const SETTLE_LIMIT: Duration = Duration::from_secs(120);

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
type Execs = Arc<Mutex<Vec<Option<BucketedExecutor<Task>>>>>;

async fn open(
    world: &World,
    i: usize,
    calls: &Calls,
    start: Instant,
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
            async move {
                let ns = || Instant::now().saturating_duration_since(start).as_nanos() as u64;
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
    acked: Arc<Mutex<Vec<Task>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut n = 0u32;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let exec = execs.lock().unwrap_or_else(|e| e.into_inner())[member].clone();
        let Some(exec) = exec else {
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
            acked.lock().unwrap_or_else(|e| e.into_inner()).push(task);
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
    let window = opts.duration.mul_f64(0.8);
    let schedule = Schedule::generate(
        derive(opts.seed, "schedule"),
        opts.members,
        window,
        opts.partitions,
    );
    let mut config = WorldConfig::new(opts.seed, opts.members);
    config.backups = opts.backups;
    config.partitions = opts.partition_count;
    config.op_timeout = Duration::from_secs(5);
    let mut report = SeedReport {
        seed: opts.seed,
        violations: Vec::new(),
        schedule: schedule.clone(),
        simulated: Duration::ZERO,
        digest: 0,
        ops: 0,
        unknown: 0,
        report: None,
        history: Vec::new(),
    };
    let mut world = match World::start(config).await {
        Ok(mut w) => {
            w.wall_deadline = Some(std::time::Instant::now() + opts.wall_budget);
            w
        }
        Err(e) => {
            report
                .violations
                .push(format!("members did not start: {e}"));
            return finish(report, opts);
        }
    };
    if world
        .run_until(SETTLE_LIMIT, |w| w.settled())
        .await
        .is_none()
    {
        report.violations.push(format!(
            "the cluster did not form within {SETTLE_LIMIT:?}: {}",
            world.observe()
        ));
        return finish(report, opts);
    }
    let start = world.start;
    let ns = move || Instant::now().saturating_duration_since(start).as_nanos() as u64;
    let calls: Calls = Arc::default();
    let execs: Execs = Arc::new(Mutex::new(vec![None; opts.members]));
    for i in 0..opts.members {
        match open(&world, i, &calls, start).await {
            Ok(e) => execs.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(e),
            Err(e) => report
                .violations
                .push(format!("executor not opened on m{i}: {e}")),
        }
    }
    let acked = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workload_start = Instant::now();
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
                stop.clone(),
            )));
        }
    }
    // Faults that may make a member look dead while it runs a batch: (member or all, when).
    let mut troubled: Vec<(Option<usize>, u64)> = Vec::new();
    let mut faulty = false;
    for s in &schedule.faults {
        if world.out_of_time.is_some() {
            break;
        }
        let at = workload_start + s.at;
        if Instant::now() < at {
            world.run_for(at - Instant::now()).await;
        }
        let now = ns();
        match &s.fault {
            Fault::Kill(m) | Fault::Pause(m) | Fault::Leave(m) | Fault::Isolate(m) => {
                troubled.push((Some(*m), now));
                faulty = true;
            }
            Fault::Partition { .. } | Fault::OneWay { .. } => {
                troubled.push((None, now));
                faulty = true;
            }
            _ => {}
        }
        apply(&mut world, &execs, &calls, &s.fault, start).await;
    }
    world.net.heal();
    world.net.set_faults(world.config.wire.clone());
    for i in 0..opts.members {
        if world.slots[i].paused {
            world.resume(i);
            troubled.push((Some(i), ns()));
        }
        if world.slots[i].grid.is_none() {
            apply(&mut world, &execs, &calls, &Fault::Restart(i), start).await;
        }
    }
    let end = workload_start + opts.duration;
    if Instant::now() < end && world.out_of_time.is_none() {
        world.run_for(end - Instant::now()).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    if world.out_of_time.is_some() {
        for c in &clients {
            c.abort();
        }
    }
    for c in clients {
        let _ = c.await;
    }
    let acked: Vec<Task> = acked.lock().unwrap_or_else(|e| e.into_inner()).clone();
    report.ops = acked.len();
    // Drain: every acknowledged task processed.
    let want: BTreeSet<Task> = acked.iter().copied().collect();
    let drained = {
        let calls = calls.clone();
        let want = want.clone();
        world
            .run_until(SETTLE_LIMIT, move |_| {
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
        // Where the first lost task's bucket stands on every member.
        let mut state = String::new();
        if let Some(t) = lost.first() {
            let mut key = b"sim-exec".to_vec();
            key.push(0);
            key.extend_from_slice(&grid::codec::encode(&t.bucket).unwrap_or_default());
            for i in world.running() {
                let Some(g) = world.slots[i].grid.as_ref() else {
                    continue;
                };
                let p = g.runtime().partition_of(&key);
                let owner = g.runtime().table().owner(p).map(|o| o.to_string());
                let service = g.bucketed_executors().service();
                let bucket = service
                    .queues(p)
                    .and_then(|q| q.bucket("sim-exec", &key[9..]).cloned());
                let _ = write!(
                    state,
                    " [m{i}: p{p} owner {owner:?}, processors {:?}, bucket {:?}]",
                    service.processors("sim-exec"),
                    bucket.map(|b| (
                        b.queue.iter().map(|t| t.seq).collect::<Vec<_>>(),
                        b.in_flight,
                        b.attempts,
                        b.retry_at
                            .map(|r| r.saturating_duration_since(Instant::now()))
                    )),
                );
            }
        }
        report.violations.push(format!(
            "lost: {} of {} acknowledged tasks never processed (first: {lost:?}); {}{state}",
            want.difference(&got).count(),
            want.len(),
            world.observe()
        ));
    }
    check(&mut report, &acked, &calls, &troubled, faulty);
    report.simulated = world.elapsed();
    report.digest = world.digest();
    finish(report, opts)
}

/// The checkers (see the module docs).
fn check(
    report: &mut SeedReport,
    acked: &[Task],
    calls: &[Call],
    troubled: &[(Option<usize>, u64)],
    faulty: bool,
) {
    // A call is excused from exclusivity and concurrency if a fault hit its member (or the
    // whole cluster) while it ran.
    let excused = |c: &Call| {
        troubled
            .iter()
            .any(|(m, at)| m.is_none_or(|m| m == c.member) && c.start <= *at && *at <= c.end)
    };
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

async fn apply(world: &mut World, execs: &Execs, calls: &Calls, fault: &Fault, start: Instant) {
    let set = |i: usize, e: Option<BucketedExecutor<Task>>| {
        execs.lock().unwrap_or_else(|e| e.into_inner())[i] = e;
    };
    let running = |w: &World, i: usize| w.slots[i].grid.is_some();
    if matches!(fault, Fault::Kill(_) | Fault::Pause(_) | Fault::Leave(_)) || fault.is_partition() {
        // At most one failure at a time (backups 1): the last one repaired first.
        if world
            .run_until(Duration::from_secs(30), |w| w.settled())
            .await
            .is_none()
            || world.running().len() <= 2
        {
            return;
        }
    }
    let ip = |w: &World, i: usize| w.slots[i].addr.ip();
    match fault {
        Fault::Wire(w) => world.net.set_faults(w.clone()),
        Fault::CleanWire => world.net.set_faults(world.config.wire.clone()),
        Fault::Partition { side } => {
            for a in 0..world.slots.len() {
                for b in 0..world.slots.len() {
                    if side.contains(&a) != side.contains(&b) {
                        world.net.cut(ip(world, a), ip(world, b));
                    }
                }
            }
        }
        Fault::Isolate(m) => {
            for b in 0..world.slots.len() {
                if b != *m {
                    world.net.cut(ip(world, *m), ip(world, b));
                    world.net.cut(ip(world, b), ip(world, *m));
                }
            }
        }
        Fault::OneWay { from, to } => world.net.cut(ip(world, *from), ip(world, *to)),
        Fault::Heal => world.net.heal(),
        Fault::Kill(m) | Fault::Leave(m) if !running(world, *m) => {}
        Fault::Kill(m) => {
            set(*m, None);
            world.kill(*m);
        }
        Fault::Leave(m) => {
            set(*m, None);
            world.leave(*m).await;
        }
        Fault::Restart(m) | Fault::Join(m) => {
            if running(world, *m) || world.start_member(*m).await.is_err() {
                return;
            }
            if let Ok(e) = open(world, *m, calls, start).await {
                set(*m, Some(e));
            }
        }
        Fault::Pause(m) => {
            if running(world, *m) {
                world.pause(*m);
            }
        }
        Fault::Resume(m) => {
            if world.slots[*m].paused {
                world.resume(*m);
            }
        }
    }
}

fn finish(mut report: SeedReport, opts: &RunOptions) -> SeedReport {
    if report.violations.is_empty() {
        return report;
    }
    let mut r = String::new();
    let _ = writeln!(
        r,
        "seed {} FAILED ({} members, {:?} simulated)",
        opts.seed, opts.members, report.simulated
    );
    for v in &report.violations {
        let _ = writeln!(r, "  violation: {v}");
    }
    let _ = write!(r, "schedule: {}", report.schedule);
    let _ = writeln!(
        r,
        "reproduce: {}",
        opts.reproduce()
            .replace("--workload cache", "--workload exec")
    );
    report.report = Some(r);
    report
}
