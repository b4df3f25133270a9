//! What every workload shares: the options of a run, its report, and the [`Harness`] that
//! starts a world, drives the seed's faults through it and ends them.
//!
//! A workload is then only its own part: how to open its handle on a member (a cache, an
//! executor, a lock service), its clients, and its checkers. Its `run` looks like this:
//!
//! ```text
//! let mut h = match Harness::start(opts).await { Ok(h) => h, Err(report) => return report };
//! let handles = Handles::new(opts.members);
//! h.open_all(&handles, &open).await;          // open: async |&World, member| -> Result<H>
//! let clients = ...spawn clients reading `handles` until `h.stop`...;
//! h.drive_faults(&handles, &open).await;      // the faults, then heal and restart all
//! h.stop_clients(clients).await;
//! ...wait for the world to drain or settle, check, push violations to h.report...
//! h.finish(details)
//! ```

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::schedule::{Fault, Schedule};
use crate::world::{derive, World, WorldConfig};

/// How long a world may take to form.
const FORM_LIMIT: Duration = Duration::from_secs(120);
/// How long the previous failure may take to be repaired before the next is applied.
const REPAIR_LIMIT: Duration = Duration::from_secs(30);

/// The simulator's workloads (`sim --workload <name>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// The partitioned cache ([`crate::cache_workload`]).
    Cache,
    /// The bucketed executor ([`crate::exec_workload`]).
    Exec,
    /// The cluster locks ([`crate::locks_workload`]).
    Locks,
    /// The cluster scheduler ([`crate::sched_workload`]).
    Sched,
    /// Near and replicated copies converge ([`crate::copies_workload`]).
    Copies,
}

impl Workload {
    /// Every workload.
    pub const ALL: &'static [Self] = &[
        Self::Cache,
        Self::Exec,
        Self::Locks,
        Self::Sched,
        Self::Copies,
    ];

    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Cache => "cache",
            Self::Exec => "exec",
            Self::Locks => "locks",
            Self::Sched => "sched",
            Self::Copies => "copies",
        }
    }

    /// The workload called `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|w| w.name() == name)
    }
}

/// Runs seed `opts.seed` of `opts.workload` and checks it.
pub fn run(opts: &RunOptions) -> SeedReport {
    match opts.workload {
        Workload::Cache => crate::cache_workload::run(opts),
        Workload::Exec => crate::exec_workload::run(opts),
        Workload::Locks => crate::locks_workload::run(opts),
        Workload::Sched => crate::sched_workload::run(opts),
        Workload::Copies => crate::copies_workload::run(opts),
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The workload.
    pub workload: Workload,
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
    /// Defaults for `seed` of `workload`: 5 members, 2 simulated minutes, partitions
    /// allowed, one backup.
    pub fn new(workload: Workload, seed: u64) -> Self {
        Self {
            workload,
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
            "cargo run --release -p grid-sim --bin sim -- --workload {} --seed {} --members {} --seconds {}{}",
            self.workload.name(),
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
    /// The full failure report (seed, violations, schedule, the workload's details, the
    /// faults as applied, the command that replays it), if the seed failed.
    pub report: Option<String>,
}

/// A workload's handle (cache, executor, ...) on each member: `None` while the member is
/// down. Clients read it before each operation, the harness replaces it on a restart.
pub struct Handles<H>(Arc<Mutex<Vec<Option<H>>>>);

impl<H> Clone for Handles<H> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<H: Clone> Handles<H> {
    /// No handle on any of `members` members.
    pub fn new(members: usize) -> Self {
        Self(Arc::new(Mutex::new(vec![None; members])))
    }

    /// Member `i`'s handle, if it is up.
    pub fn get(&self, i: usize) -> Option<H> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())[i].clone()
    }

    /// Sets member `i`'s handle.
    pub fn set(&self, i: usize, h: Option<H>) {
        self.0.lock().unwrap_or_else(|e| e.into_inner())[i] = h;
    }
}

/// A fault that may have made the others consider a member dead while it went on working
/// (killed, paused, cut off, leaving), or the whole cluster (`member: None`, a partition):
/// work it did around then is excused from exclusivity checks.
#[derive(Debug, Clone, Copy)]
pub struct Trouble {
    /// The member, or `None` for all.
    pub member: Option<usize>,
    /// When (ns since the world started).
    pub at: u64,
}

impl Trouble {
    /// Whether this trouble hit `member` between `start` and `end` (ns).
    pub fn hits(&self, member: usize, start: u64, end: u64) -> bool {
        self.member.is_none_or(|m| m == member) && start <= self.at && self.at <= end
    }
}

/// One started world with its fault schedule, and what the run found so far.
pub struct Harness {
    /// The options.
    pub opts: RunOptions,
    /// The world.
    pub world: World,
    /// The seed's faults.
    pub schedule: Schedule,
    /// The report under construction: workloads push their violations here.
    pub report: SeedReport,
    /// Set when the workload's time is over: clients stop.
    pub stop: Arc<AtomicBool>,
    /// Faults that may have made a member look dead while it worked.
    pub troubles: Vec<Trouble>,
    /// Whether any fault killed, paused, cut off or removed a member.
    pub faulty: bool,
    notes: Vec<(Duration, String, Option<String>)>,
}

impl Harness {
    /// Starts the world of `opts` and waits until it has formed; a world that does not
    /// start or form is a failed seed (`Err`, its report finished).
    pub async fn start(opts: &RunOptions) -> Result<Self, SeedReport> {
        let schedule = Schedule::generate(
            derive(opts.seed, "schedule"),
            opts.members,
            opts.duration.mul_f64(0.8),
            opts.partitions,
        );
        let mut config = WorldConfig::new(opts.seed, opts.members);
        config.backups = opts.backups;
        config.partitions = opts.partition_count;
        config.op_timeout = Duration::from_secs(5);
        let report = SeedReport {
            seed: opts.seed,
            violations: Vec::new(),
            schedule: schedule.clone(),
            simulated: Duration::ZERO,
            digest: 0,
            ops: 0,
            unknown: 0,
            report: None,
        };
        let world = match World::start(config).await {
            Ok(mut w) => {
                w.wall_deadline = Some(std::time::Instant::now() + opts.wall_budget);
                w
            }
            Err(e) => {
                let mut report = report;
                report
                    .violations
                    .push(format!("members did not start: {e}"));
                return Err(finish_report(report, opts, &[], ""));
            }
        };
        let mut h = Self {
            opts: opts.clone(),
            world,
            schedule,
            report,
            stop: Arc::new(AtomicBool::new(false)),
            troubles: Vec::new(),
            faulty: false,
            notes: Vec::new(),
        };
        if h.world
            .run_until(FORM_LIMIT, |w| w.settled())
            .await
            .is_none()
        {
            let seen = h.world.observe();
            h.report.violations.push(format!(
                "the cluster did not form within {FORM_LIMIT:?}: {seen}"
            ));
            return Err(h.finish(""));
        }
        Ok(h)
    }

    /// A clock for records: ns since the world started.
    pub fn clock(&self) -> impl Fn() -> u64 + Clone + Send + 'static {
        let start = self.world.start;
        move || Instant::now().saturating_duration_since(start).as_nanos() as u64
    }

    /// Opens the workload's handle on every running member; a failure is a violation.
    pub async fn open_all<H: Clone>(
        &mut self,
        handles: &Handles<H>,
        open: &impl AsyncFn(&World, usize) -> anyhow::Result<H>,
    ) {
        for i in self.world.running() {
            match open(&self.world, i).await {
                Ok(h) => handles.set(i, Some(h)),
                Err(e) => self.report.violations.push(format!(
                    "{} not opened on m{i}: {e}",
                    self.opts.workload.name()
                )),
            }
        }
    }

    /// Runs the workload's time: the seed's faults at their times (at most one failure at a
    /// time: the previous one repaired first), then heals the network, resumes and restarts
    /// every member (reopening its handle with `open`), and runs until the workload's
    /// duration is over. Does not stop the clients: [`Harness::stop_clients`] does.
    pub async fn drive_faults<H: Clone>(
        &mut self,
        handles: &Handles<H>,
        open: &impl AsyncFn(&World, usize) -> anyhow::Result<H>,
    ) {
        let workload_start = Instant::now();
        let faults = self.schedule.faults.clone();
        for s in &faults {
            if self.world.out_of_time.is_some() {
                break;
            }
            let at = workload_start + s.at;
            if Instant::now() < at {
                self.world.run_for(at - Instant::now()).await;
            }
            let note = self.apply(handles, open, &s.fault).await;
            self.world
                .net
                .record(format!("{:?} {:?}", s.fault, note).as_bytes());
            self.notes
                .push((self.world.elapsed(), format!("{:?}", s.fault), note));
        }
        // The faults end: heal, resume, restart whoever is down.
        self.world.net.heal();
        let wire = self.world.config.wire.clone();
        self.world.net.set_faults(wire);
        for i in 0..self.world.slots.len() {
            if self.world.slots[i].paused {
                self.world.resume(i);
                let at = self.clock()();
                self.troubles.push(Trouble {
                    member: Some(i),
                    at,
                });
            }
            if self.world.slots[i].grid.is_none() {
                let _ = self.apply(handles, open, &Fault::Restart(i)).await;
            }
        }
        let end = workload_start + self.opts.duration;
        if Instant::now() < end && self.world.out_of_time.is_none() {
            self.world.run_for(end - Instant::now()).await;
        }
    }

    /// Stops the clients and waits for them (aborts them if the run is out of wall time).
    pub async fn stop_clients(&mut self, clients: Vec<JoinHandle<()>>) {
        self.stop.store(true, Ordering::Relaxed);
        if self.world.out_of_time.is_some() {
            for c in &clients {
                c.abort();
            }
        }
        for c in clients {
            let _ = c.await;
        }
    }

    /// Waits until the cluster has settled after the faults; if it does not within `limit`,
    /// a violation (a livelock if the wall-clock budget ran out). Returns whether it
    /// settled.
    pub async fn settle(&mut self, limit: Duration) -> bool {
        if self.world.run_until(limit, |w| w.settled()).await.is_some() {
            return true;
        }
        let seen = self.world.observe();
        let why = match self.world.out_of_time {
            Some(at) => format!(
                "livelock: the run used its wall-clock budget ({:?}) at {:.3}s simulated \
                 (simulated time crawled: a busy retry loop?); {seen}",
                self.opts.wall_budget,
                at.as_secs_f64(),
            ),
            None => format!("the cluster did not settle within {limit:?} after the faults: {seen}"),
        };
        self.report.violations.push(why);
        false
    }

    /// The report: simulated time, digest and, if the seed failed, the full text with the
    /// workload's `details` (e.g. the operations around the failure).
    pub fn finish(mut self, details: &str) -> SeedReport {
        self.report.simulated = self.world.elapsed();
        self.report.digest = self.world.digest();
        if let (Some(trace), Ok(path)) = (self.world.net.trace(), std::env::var("SIM_TRACE")) {
            let _ = std::fs::write(path, trace.join("\n"));
        }
        let notes: Vec<String> = self
            .notes
            .iter()
            .map(|(t, f, n)| {
                format!(
                    "  {:>9.3}s  {f}{}",
                    t.as_secs_f64(),
                    n.as_ref().map(|n| format!("  ({n})")).unwrap_or_default()
                )
            })
            .collect();
        finish_report(self.report, &self.opts, &notes, details)
    }

    /// Applies one fault (and keeps the handles in step). Returns a note when it was
    /// skipped.
    async fn apply<H: Clone>(
        &mut self,
        handles: &Handles<H>,
        open: &impl AsyncFn(&World, usize) -> anyhow::Result<H>,
        fault: &Fault,
    ) -> Option<String> {
        let world = &mut self.world;
        let running = |w: &World, i: usize| w.slots[i].grid.is_some();
        let failing = matches!(fault, Fault::Kill(_) | Fault::Pause(_) | Fault::Leave(_))
            || fault.is_partition();
        if failing {
            // At most `backup_count` (1) failures at any moment: the previous one must have
            // been repaired (the cluster settled) before the next.
            if world
                .run_until(REPAIR_LIMIT, |w| w.settled())
                .await
                .is_none()
            {
                return Some("skipped: the cluster had not settled".into());
            }
            if world.running().len() <= 2 {
                return Some("skipped: too few members".into());
            }
        }
        let now = Instant::now()
            .saturating_duration_since(world.start)
            .as_nanos() as u64;
        let ip = |w: &World, i: usize| w.slots[i].addr.ip();
        let mut trouble = |member: Option<usize>| {
            self.troubles.push(Trouble { member, at: now });
            self.faulty = true;
        };
        match fault {
            Fault::Wire(w) => world.net.set_faults(w.clone()),
            Fault::CleanWire => world.net.set_faults(world.config.wire.clone()),
            Fault::Partition { side } => {
                trouble(None);
                for a in 0..world.slots.len() {
                    for b in 0..world.slots.len() {
                        if side.contains(&a) != side.contains(&b) {
                            world.net.cut(ip(world, a), ip(world, b));
                        }
                    }
                }
            }
            Fault::Isolate(m) => {
                trouble(Some(*m));
                for b in 0..world.slots.len() {
                    if b != *m {
                        world.net.cut(ip(world, *m), ip(world, b));
                        world.net.cut(ip(world, b), ip(world, *m));
                    }
                }
            }
            Fault::OneWay { from, to } => {
                trouble(None);
                world.net.cut(ip(world, *from), ip(world, *to))
            }
            Fault::Heal => world.net.heal(),
            Fault::Kill(m) | Fault::Leave(m) if !running(world, *m) => {
                return Some("skipped: not running".into())
            }
            Fault::Kill(m) => {
                trouble(Some(*m));
                handles.set(*m, None);
                world.kill(*m);
            }
            Fault::Leave(m) => {
                trouble(Some(*m));
                handles.set(*m, None);
                world.leave(*m).await;
            }
            Fault::Restart(m) | Fault::Join(m) => {
                if running(world, *m) {
                    return Some("skipped: already running".into());
                }
                if let Err(e) = world.start_member(*m).await {
                    return Some(format!("restart failed: {e}"));
                }
                match open(world, *m).await {
                    Ok(h) => handles.set(*m, Some(h)),
                    Err(e) => return Some(format!("not reopened after restart: {e}")),
                }
            }
            Fault::Pause(m) => {
                if !running(world, *m) {
                    return Some("skipped: not running".into());
                }
                trouble(Some(*m));
                world.pause(*m);
            }
            Fault::Resume(m) => {
                if world.slots[*m].paused {
                    trouble(Some(*m));
                    world.resume(*m);
                }
            }
        }
        None
    }
}

/// The failure report of a seed (nothing if it passed).
fn finish_report(
    mut report: SeedReport,
    opts: &RunOptions,
    notes: &[String],
    details: &str,
) -> SeedReport {
    if report.violations.is_empty() {
        return report;
    }
    let mut r = String::new();
    let _ = writeln!(
        r,
        "seed {} of workload {} FAILED ({} members, {:?} simulated)",
        opts.seed,
        opts.workload.name(),
        opts.members,
        report.simulated
    );
    for v in &report.violations {
        let _ = writeln!(r, "  violation: {v}");
    }
    let _ = write!(r, "schedule: {}", report.schedule);
    r.push_str(details);
    if !notes.is_empty() {
        let _ = writeln!(r, "faults as applied (world time):");
        for n in notes {
            let _ = writeln!(r, "{n}");
        }
    }
    let _ = writeln!(r, "reproduce: {}", opts.reproduce());
    report.report = Some(r);
    report
}
