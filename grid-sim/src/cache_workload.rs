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
use tokio::time::Instant;

use crate::linearizability::{self, Entry, Model};
use crate::schedule::{Fault, Schedule};
use crate::world::{derive, simulate, World, WorldConfig};

/// Keys of the workload.
const KEYS: usize = 4;
/// Search steps the linearizability checker may take per key before it gives up.
const CHECK_BUDGET: u64 = 2_000_000;
/// How long the world may take to form, or to settle after the faults.
const SETTLE_LIMIT: Duration = Duration::from_secs(60);

/// What to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The seed.
    pub seed: u64,
    /// Members.
    pub members: usize,
    /// Simulated length of the workload (faults happen in its first 80%).
    pub duration: Duration,
    /// Whether the seed may choose partitions.
    pub partitions: bool,
    /// Synchronous backups.
    pub backups: u8,
    /// Partition count.
    pub partition_count: u32,
    /// Wall-clock budget of the run: past it the seed fails as a livelock.
    pub wall_budget: Duration,
}

impl RunOptions {
    /// Defaults for `seed`: 5 members, 2 simulated minutes, partitions allowed.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            members: 5,
            duration: Duration::from_secs(120),
            partitions: true,
            backups: 1,
            partition_count: 271,
            wall_budget: Duration::from_secs(120),
        }
    }

    /// The command that replays this run.
    pub fn reproduce(&self) -> String {
        format!(
            "cargo run --release -p grid-sim --bin sim -- --workload cache --seed {} --members {} --seconds {}{}",
            self.seed,
            self.members,
            self.duration.as_secs(),
            if self.partitions { "" } else { " --no-partitions" }
        )
    }
}

/// What a run found.
#[derive(Debug, Clone)]
pub struct SeedReport {
    /// The seed.
    pub seed: u64,
    /// Violations found (empty: the seed passed).
    pub violations: Vec<String>,
    /// The faults.
    pub schedule: Schedule,
    /// Simulated time the run covered.
    pub simulated: Duration,
    /// Digest of the history.
    pub digest: u64,
    /// Operations run (answered and not).
    pub ops: usize,
    /// Operations without an answer (errors, timeouts).
    pub unknown: usize,
    /// The full failure report (seed, schedule, last operations, command), if any.
    pub report: Option<String>,
    /// The operations, in the order they were answered.
    pub history: Vec<Record>,
}

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

type Caches = Arc<Mutex<Vec<Option<Cache<String, i64>>>>>;
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
    start: Instant,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut n: i64 = 0;
    let ns = || Instant::now().saturating_duration_since(start).as_nanos() as u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let cache = caches.lock().unwrap_or_else(|e| e.into_inner())[member].clone();
        let Some(cache) = cache else {
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
        let ret = error.is_none().then(ns);
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

/// Applies one fault to the world (and the clients' cache handles). Returns a note when
/// it was skipped.
async fn apply(world: &mut World, caches: &Caches, fault: &Fault) -> Option<String> {
    let running = |w: &World, i: usize| w.slots[i].grid.is_some();
    let set = |i: usize, c: Option<Cache<String, i64>>| {
        caches.lock().unwrap_or_else(|e| e.into_inner())[i] = c;
    };
    let failing = matches!(
        fault,
        Fault::Kill(_) | Fault::Pause(_) | Fault::Leave(_) | Fault::Partition { .. }
    ) || fault.is_partition();
    if failing {
        // At most `backup_count` (1) failures at any moment: the previous one must have
        // been repaired (the cluster settled) before the next.
        if world
            .run_until(Duration::from_secs(30), |w| w.settled())
            .await
            .is_none()
        {
            return Some("skipped: the cluster had not settled".into());
        }
        if world.running().len() <= 2 {
            return Some("skipped: too few members".into());
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
        Fault::Kill(m) | Fault::Leave(m) if !running(world, *m) => {
            return Some("skipped: not running".into())
        }
        Fault::Kill(m) => {
            set(*m, None);
            world.kill(*m);
        }
        Fault::Leave(m) => {
            set(*m, None);
            world.leave(*m).await;
        }
        Fault::Restart(m) | Fault::Join(m) => {
            if running(world, *m) {
                return Some("skipped: already running".into());
            }
            if let Err(e) = world.start_member(*m).await {
                return Some(format!("restart failed: {e}"));
            }
            match open_cache(world, *m).await {
                Ok(c) => set(*m, Some(c)),
                Err(e) => return Some(format!("cache not opened after restart: {e}")),
            }
        }
        Fault::Pause(m) => {
            if !running(world, *m) {
                return Some("skipped: not running".into());
            }
            world.pause(*m);
        }
        Fault::Resume(m) => {
            if world.slots[*m].paused {
                world.resume(*m);
            }
        }
    }
    None
}

/// Runs seed `opts.seed` of the cache workload and checks it.
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
            return finish(report, opts, &[], &[]);
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
        report.simulated = world.elapsed();
        report.digest = world.digest();
        return finish(report, opts, &[], &[]);
    }
    let caches: Caches = Arc::new(Mutex::new(vec![None; opts.members]));
    for i in 0..opts.members {
        match open_cache(&world, i).await {
            Ok(c) => caches.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(c),
            Err(e) => report
                .violations
                .push(format!("cache not opened on m{i}: {e}")),
        }
    }
    let history = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let start = world.start;
    let workload_start = Instant::now();
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
                start,
                stop.clone(),
            )));
        }
    }
    let mut notes = Vec::new();
    for s in &schedule.faults {
        if world.out_of_time.is_some() {
            break;
        }
        let at = workload_start + s.at;
        if Instant::now() < at {
            let wait = at - Instant::now();
            world.run_for(wait).await;
        }
        let note = apply(&mut world, &caches, &s.fault).await;
        world
            .net
            .record(format!("{:?} {:?}", s.fault, note).as_bytes());
        notes.push((world.elapsed(), format!("{:?}", s.fault), note));
    }
    // The faults end: heal, resume, restart whoever is down.
    world.net.heal();
    world.net.set_faults(world.config.wire.clone());
    for i in 0..opts.members {
        if world.slots[i].paused {
            world.resume(i);
        }
        if world.slots[i].grid.is_none() {
            let _ = apply(&mut world, &caches, &Fault::Restart(i)).await;
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
    if world
        .run_until(SETTLE_LIMIT, |w| w.settled())
        .await
        .is_none()
    {
        if let Some(at) = world.out_of_time {
            report.violations.push(format!(
                "livelock: the run used its wall-clock budget ({:?}) at {:.3}s simulated \
                 (simulated time crawled: a busy retry loop?); {}",
                opts.wall_budget,
                at.as_secs_f64(),
                world.observe()
            ));
            report.simulated = world.elapsed();
            report.digest = world.digest();
            return finish(report, opts, &[], &[]);
        }
        report.violations.push(format!(
            "the cluster did not settle within {SETTLE_LIMIT:?} after the faults: {}",
            world.observe()
        ));
    }
    // Final reads: every member, every key.
    let ns = || Instant::now().saturating_duration_since(start).as_nanos() as u64;
    let mut finals: BTreeMap<usize, Vec<FinalRead>> = BTreeMap::new();
    for m in world.running() {
        let cache = caches.lock().unwrap_or_else(|e| e.into_inner())[m].clone();
        let Some(cache) = cache else { continue };
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
            report.violations.push(format!(
                "convergence: members read different values of {} after the faults: {:?}",
                key_name(*key),
                reads
            ));
        }
    }
    let history = history.lock().unwrap_or_else(|e| e.into_inner()).clone();
    report.ops = history.len();
    report.history = history.clone();
    report.unknown = history.iter().filter(|r| r.ret.is_none()).count();
    let mut bad_keys = Vec::new();
    if !schedule.partitions() {
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
                    report.violations.push(format!(
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
    report.simulated = world.elapsed();
    report.digest = world.digest();
    if let (Some(trace), Ok(path)) = (world.net.trace(), std::env::var("SIM_TRACE")) {
        let _ = std::fs::write(path, trace.join("\n"));
    }
    let notes: Vec<String> = notes
        .into_iter()
        .map(|(t, f, n)| {
            format!(
                "  {:>9.3}s  {f}{}",
                t.as_secs_f64(),
                n.map(|n| format!("  ({n})")).unwrap_or_default()
            )
        })
        .collect();
    finish(report, opts, &history, &bad_keys).with_notes(&notes)
}

impl SeedReport {
    fn with_notes(mut self, notes: &[String]) -> Self {
        if let Some(r) = &mut self.report {
            let _ = writeln!(r, "faults as applied (world time):");
            for n in notes {
                let _ = writeln!(r, "{n}");
            }
        }
        self
    }
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

fn finish(
    mut report: SeedReport,
    opts: &RunOptions,
    history: &[Record],
    keys: &[usize],
) -> SeedReport {
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
    let _ = writeln!(r, "reproduce: {}", opts.reproduce());
    report.report = Some(r);
    report
}
