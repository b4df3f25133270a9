//! The cluster locks' workload and its checkers (`sim --workload locks`).
//!
//! Clients on every member take and release a few locks — [`PLAIN`] plain locks and
//! [`KEYS`] keys of one keyed lock, all with a lease of [`LEASE`] — with `lock()` (most of
//! the time) or `try_lock()`, hold them for a random time (at most [`MAX_HOLD`]) and
//! release them, while the seed's faults happen. Every grant is recorded with its fencing
//! token and the interval during which its holder believed it held the lock: from the
//! moment the guard was returned (if `is_held()` was true then) to the moment `lost()`
//! fired or the client called `unlock()`, whichever came first. Then the faults end, the
//! cluster settles, the clients stop and release, and the checkers run:
//! - **mutual exclusion**: no two believed-holding intervals of one lock overlap in
//!   simulated time (strictly: one may start at the instant the other ended);
//! - **fencing tokens**: per lock, tokens grow strictly in grant order (the order of the
//!   believed intervals);
//! - **no waiter left waiting**: every `lock()` completes (granted or refused) within
//!   [`WAIT_BOUND`] of the later of its call and the moment the cluster settled after the
//!   faults (even a call on a member that was killed meanwhile: it must fail, not hang);
//! - **all free at the end**: once every client has stopped, no owner keeps a record of
//!   any of the workload's locks within two leases (held, or a waiter on a free lock).
//!
//! Time: the simulator has one clock for every member, so clock drift between members is
//! not simulated; the locks' safety argument (grid-lock's crate docs, "Timing
//! assumption") allows rates that differ by [`grid::LockSettings::clock_drift`].

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use grid::{ClusterLock, Locks};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use crate::workload::{Handles, Harness, RunOptions, SeedReport};
use crate::world::{derive, simulate, World};

/// Plain locks of the workload.
pub const PLAIN: usize = 3;
/// Keys of the workload's keyed lock.
pub const KEYS: u32 = 4;
/// Lease of every lock of the workload.
pub const LEASE: Duration = Duration::from_secs(3);
/// Longest hold.
pub const MAX_HOLD: Duration = Duration::from_millis(800);
/// Clients per member.
pub const CLIENTS_PER_MEMBER: usize = 3;
/// How long a `lock()` may wait once the cluster has settled after the faults.
pub const WAIT_BOUND: Duration = Duration::from_secs(45);
/// The keyed lock's name.
const KEYED: &str = "sim-keyed";

/// The workload's locks, by index: the plain ones, then the keys.
pub fn lock_name(i: usize) -> String {
    if i < PLAIN {
        format!("sim-lock-{i}")
    } else {
        format!("{KEYED}[{}]", i - PLAIN)
    }
}

/// How many locks the workload uses.
pub const LOCKS: usize = PLAIN + KEYS as usize;

fn lock_of(locks: &Locks, i: usize) -> Option<ClusterLock> {
    if i < PLAIN {
        Some(locks.lock(&lock_name(i)).lease(LEASE))
    } else {
        locks
            .keyed_lock::<u32>(KEYED)
            .lease(LEASE)
            .for_key(&((i - PLAIN) as u32))
            .ok()
    }
}

/// One grant as its holder saw it (times in ns since the world started).
#[derive(Debug, Clone)]
pub struct Hold {
    /// The lock's index.
    pub lock: usize,
    /// The client.
    pub client: u32,
    /// The member it ran on.
    pub member: usize,
    /// The lock's partition.
    pub partition: u32,
    /// The fencing token.
    pub token: u64,
    /// When the guard was returned.
    pub start: u64,
    /// Whether the holder believed it held the lock when the guard was returned.
    pub believed: bool,
    /// When it stopped believing (`lost()` fired or `unlock()` was called); `None`: still
    /// held.
    pub end: Option<u64>,
    /// Whether `lost()` fired before the client let go.
    pub lost: bool,
    /// What `unlock()` returned (`None`: not returned yet).
    pub unlock: Option<Result<(), String>>,
}

/// One acquire call.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// The lock's index.
    pub lock: usize,
    /// The client.
    pub client: u32,
    /// The member it ran on.
    pub member: usize,
    /// `lock()` (true) or `try_lock()`.
    pub waits: bool,
    /// When it was called.
    pub start: u64,
    /// When it returned (`None`: still waiting).
    pub end: Option<u64>,
    /// What it returned: `granted`, `not granted`, or the error.
    pub outcome: String,
}

/// What the clients record.
#[derive(Debug, Default)]
pub struct Log {
    /// Grants, in the order they were returned.
    pub holds: Vec<Hold>,
    /// Acquire calls, in the order they were made.
    pub attempts: Vec<Attempt>,
}

/// The shared log.
pub type SharedLog = Arc<Mutex<Log>>;

fn log(l: &SharedLog) -> std::sync::MutexGuard<'_, Log> {
    l.lock().unwrap_or_else(|e| e.into_inner())
}

/// A member's lock service and the incarnation it belongs to.
pub type Handle = (u32, Locks);

/// A client: until `stop`, picks a lock, takes it (`lock()` 4 times in 5, else
/// `try_lock()`), holds it for a random time or until `lost()` fires, and releases it.
/// `handle` gives the member's current lock service (`None` while it is down). An acquire
/// whose member is killed or leaves while it waits is dropped (the process it ran in is
/// gone) and recorded as `member gone`.
pub async fn client(
    id: u32,
    member: usize,
    seed: u64,
    start: Instant,
    handle: impl Fn() -> Option<Handle>,
    record: SharedLog,
    stop: Arc<AtomicBool>,
) {
    let ns = move || Instant::now().saturating_duration_since(start).as_nanos() as u64;
    let mut rng = StdRng::seed_from_u64(seed);
    while !stop.load(Ordering::Relaxed) {
        let Some((incarnation, locks)) = handle() else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let gone = async {
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if handle().is_none_or(|(i, _)| i != incarnation) {
                    return;
                }
            }
        };
        let i = rng.gen_range(0..LOCKS);
        let Some(lock) = lock_of(&locks, i) else {
            continue;
        };
        let waits = rng.gen_bool(0.8);
        let a = {
            let mut l = log(&record);
            l.attempts.push(Attempt {
                lock: i,
                client: id,
                member,
                waits,
                start: ns(),
                end: None,
                outcome: String::new(),
            });
            l.attempts.len() - 1
        };
        let acquire = async {
            if waits {
                lock.lock().await.map(Some)
            } else {
                lock.try_lock().await
            }
        };
        let got = tokio::select! {
            got = acquire => Some(got),
            _ = gone => None,
        };
        {
            let mut l = log(&record);
            l.attempts[a].end = Some(ns());
            l.attempts[a].outcome = match &got {
                Some(Ok(Some(_))) => "granted".into(),
                Some(Ok(None)) => "not granted".into(),
                Some(Err(e)) => e.to_string(),
                None => "member gone".into(),
            };
        }
        let Some(got) = got else { continue };
        match got {
            Ok(Some(guard)) => {
                let h = {
                    let mut l = log(&record);
                    l.holds.push(Hold {
                        lock: i,
                        client: id,
                        member,
                        partition: lock.partition(),
                        token: guard.fencing_token(),
                        start: ns(),
                        believed: guard.is_held(),
                        end: None,
                        lost: false,
                        unlock: None,
                    });
                    l.holds.len() - 1
                };
                let hold = Duration::from_millis(rng.gen_range(0..=MAX_HOLD.as_millis() as u64));
                let lost = tokio::select! {
                    _ = tokio::time::sleep(hold) => false,
                    _ = guard.lost() => true,
                };
                {
                    let mut l = log(&record);
                    l.holds[h].end = Some(ns());
                    l.holds[h].lost = lost;
                }
                let released = guard.unlock().await.map_err(|e| e.to_string());
                log(&record).holds[h].unlock = Some(released);
            }
            Ok(None) => {}
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..200))).await;
    }
}

/// The checkers over the log: mutual exclusion and growing tokens per lock, and no
/// `lock()` waiting longer than [`WAIT_BOUND`] after `settled` (ns; `None`: the cluster
/// never settled, nothing to check). `now`: the end of the run (ns).
pub fn check(log: &Log, settled: Option<u64>, now: u64, violations: &mut Vec<String>) {
    let mut per_lock: BTreeMap<usize, Vec<&Hold>> = BTreeMap::new();
    for h in log.holds.iter().filter(|h| h.believed) {
        per_lock.entry(h.lock).or_default().push(h);
    }
    let show = |h: &Hold| {
        format!(
            "client {} on m{} p{} token {} [{:.3}s, {}]",
            h.client,
            h.member,
            h.partition,
            h.token,
            h.start as f64 / 1e9,
            h.end.map_or("still held".to_string(), |e| format!(
                "{:.3}s",
                e as f64 / 1e9
            ))
        )
    };
    for (lock, mut holds) in per_lock {
        holds.sort_by_key(|h| (h.start, h.end.unwrap_or(u64::MAX)));
        let mut overlaps = 0;
        let mut disorders = 0;
        for w in holds.windows(2) {
            let (a, b) = (w[0], w[1]);
            if b.start < a.end.unwrap_or(u64::MAX) {
                overlaps += 1;
                if overlaps == 1 {
                    violations.push(format!(
                        "two holders of {}: {} and {}",
                        lock_name(lock),
                        show(a),
                        show(b)
                    ));
                }
            }
            if b.token <= a.token {
                disorders += 1;
                if disorders == 1 {
                    violations.push(format!(
                        "tokens of {} not growing in grant order: {} then {}",
                        lock_name(lock),
                        show(a),
                        show(b)
                    ));
                }
            }
        }
        if overlaps > 1 || disorders > 1 {
            violations.push(format!(
                "{}: {overlaps} overlaps and {disorders} token inversions in all",
                lock_name(lock)
            ));
        }
    }
    let Some(settled) = settled else { return };
    let mut stuck = 0;
    for a in log.attempts.iter().filter(|a| a.waits) {
        let limit = a.start.max(settled) + WAIT_BOUND.as_nanos() as u64;
        let end = a.end.unwrap_or(now);
        if end <= limit {
            continue;
        }
        stuck += 1;
        if stuck <= 3 {
            violations.push(format!(
                "waiter left waiting: client {} on m{} called lock() on {} at {:.3}s, {} at {:.3}s \
                 (the cluster settled at {:.3}s; bound {WAIT_BOUND:?})",
                a.client,
                a.member,
                lock_name(a.lock),
                a.start as f64 / 1e9,
                if a.end.is_some() { "returned" } else { "still waiting" },
                end as f64 / 1e9,
                settled as f64 / 1e9,
            ));
        }
    }
    if stuck > 3 {
        violations.push(format!("{stuck} lock() calls waited past the bound in all"));
    }
}

/// A summary line of the log (for a failing seed's report).
pub fn summary(log: &Log) -> String {
    let mut outcomes: BTreeMap<&str, usize> = BTreeMap::new();
    for a in &log.attempts {
        let o = a.outcome.as_str();
        let key = if o.starts_with("no quorum") {
            "no quorum"
        } else if o.starts_with("cluster") {
            "cluster error"
        } else if o.is_empty() {
            "pending"
        } else {
            o
        };
        *outcomes.entry(key).or_default() += 1;
    }
    let lost = log.holds.iter().filter(|h| h.lost).count();
    let unbelieved = log.holds.iter().filter(|h| !h.believed).count();
    let mut s = String::new();
    let _ = write!(
        s,
        "{} acquires {outcomes:?}; {} grants, {lost} lost, {unbelieved} returned already expired",
        log.attempts.len(),
        log.holds.len()
    );
    s
}

/// The workload's lock records that owners still keep (held, or waited for), as
/// `member: lock (holder, waiters)`; empty when every lock is free.
pub fn records_left(world: &World) -> Vec<String> {
    let mut left = Vec::new();
    for i in world.running() {
        let Some(g) = world.slots[i].grid.as_ref() else {
            continue;
        };
        let table = g.runtime().table();
        let me = g.runtime().member_id().clone();
        let service = g.locks().service();
        for p in 0..world.config.partitions {
            if table.owner(p) != Some(&me) {
                continue;
            }
            let Some(t) = service.table(p) else { continue };
            for (id, r) in &t.records {
                if id.name.starts_with("sim-lock-") || id.name == KEYED {
                    left.push(format!(
                        "m{i} p{p}: {}{} holder {:?} waiters {}",
                        id.name,
                        if id.key.is_empty() { "" } else { "[key]" },
                        r.holder.as_ref().map(|h| (h.token, &h.who.member)),
                        r.waiters.len()
                    ));
                }
            }
        }
    }
    left
}

// ---- the run, on the shared harness

/// How long the cluster may take to settle after the faults.
const SETTLE_LIMIT: Duration = Duration::from_secs(120);

/// Runs seed `opts.seed` of the locks workload and checks it.
pub fn run(opts: &RunOptions) -> SeedReport {
    let opts = opts.clone();
    simulate(opts.seed, async move { run_in_world(&opts).await })
}

async fn open_locks(world: &World, i: usize) -> anyhow::Result<Handle> {
    let slot = &world.slots[i];
    slot.grid
        .as_ref()
        .map(|g| (slot.incarnation, g.locks().clone()))
        .ok_or_else(|| anyhow::anyhow!("member {i} is not running"))
}

async fn run_in_world(opts: &RunOptions) -> SeedReport {
    let mut h = match Harness::start(opts).await {
        Ok(h) => h,
        Err(report) => return report,
    };
    let ns = h.clock();
    let handles: Handles<Handle> = Handles::new(opts.members);
    let open = async |w: &World, i: usize| open_locks(w, i).await;
    h.open_all(&handles, &open).await;
    let record: SharedLog = Arc::default();
    let start = h.world.start;
    let mut clients = Vec::new();
    for m in 0..opts.members {
        for c in 0..CLIENTS_PER_MEMBER {
            let id = (m * 100 + c) as u32;
            let hs = handles.clone();
            clients.push(tokio::spawn(client(
                id,
                m,
                derive(opts.seed, &format!("locks client {id}")),
                start,
                move || hs.get(m),
                record.clone(),
                h.stop.clone(),
            )));
        }
    }
    h.drive_faults(&handles, &open).await;
    // From here on every lock() must end within the bound.
    let settled = if h.settle(SETTLE_LIMIT).await {
        Some(ns())
    } else {
        None
    };
    // The clients stop and finish what they do (a waiting lock() ends, a hold is
    // released); not awaited blindly: a lock() that never ends is what the check looks for.
    h.stop.store(true, Ordering::Relaxed);
    let drain = WAIT_BOUND + MAX_HOLD + LEASE * 2;
    let finished = h
        .world
        .run_until(drain, |_| clients.iter().all(|c| c.is_finished()))
        .await
        .is_some();
    for c in &clients {
        c.abort();
    }
    let now = ns();
    if finished {
        // Every lock free once its holders released (the leases of dead holders run out).
        let free = h
            .world
            .run_until(LEASE * 2 + Duration::from_secs(5), |w| {
                records_left(w).is_empty()
            })
            .await
            .is_some();
        if !free {
            let left = records_left(&h.world);
            h.report.violations.push(format!(
                "locks not free {:?} after every client stopped: {}",
                LEASE * 2 + Duration::from_secs(5),
                left.join("; ")
            ));
        }
    }
    let log = std::mem::take(&mut *log(&record));
    h.report.ops = log.attempts.len();
    h.report.unknown = log.attempts.iter().filter(|a| a.end.is_none()).count();
    check(&log, settled, now, &mut h.report.violations);
    let details = format!("workload: {}\n", summary(&log));
    h.finish(&details)
}
