//! The job tables on the runtime's service interface ([`PartitionService`]): one
//! [`JobTable`] per partition, decided under the partition's lock (`prepare`), replicated,
//! applied on the owner and its backups (`apply`). The owner arms one timer per partition
//! at its earliest slot; when it fires, the owner submits [`Op::FireDue`], whose change
//! claims the due slots, and once that change is on the backups, sends each run to the
//! member that will run it ([`Msg::Run`]). Runs on members that leave are ended (or retried)
//! by [`Op::Reap`].
//!
//! Which member has which runner: every member tells every other its runner keys
//! ([`Msg::Runners`], a service message) when a runner is registered or unregistered, when
//! a member joins, and every few seconds; each member keeps the last list it got from each
//! live member (its *directory*).

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use grid_core::runtime::service::*;
use grid_net::membership::Cluster;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use super::job::{JobDetails, JobRequest};
use super::table::{Answer, Change, Env, FiringResult, JobTable, Op, Output, TableCopy};
use super::{JobRunner, SchedulerError};

/// The firing timer of a partition (one per partition: armed at its earliest slot).
const FIRE: u64 = 1;
/// When a firing could not run (its operation was dropped), try again this much later.
const FIRE_RETRY: Duration = Duration::from_millis(500);
/// While runs are held (their claim not confirmed), the owner tries to confirm this often.
const CONFIRM_RETRY: Duration = Duration::from_millis(100);
/// Runs received and not yet started, per member.
pub(crate) const RUN_QUEUE: usize = 16_384;
/// Runs remembered per member to ignore one sent twice.
const SEEN_RUNS: usize = 65_536;

/// What the scheduler's members tell each other.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Msg {
    /// Run this (from a partition's owner to the member chosen).
    Run(JobRequest),
    /// The sender's runner keys, all of them.
    Runners(Vec<String>),
    /// Asks for the jobs of a runner in the partitions the member owns.
    JobsByRunner(String),
    /// The answer to [`Msg::JobsByRunner`].
    Jobs(Vec<JobDetails>),
}

/// (job, run) pairs received lately: a set, and the order to forget them in.
type Seen = (HashSet<(String, u64)>, VecDeque<(String, u64)>);

/// The scheduler service of one member (registered on every member; lite members own
/// nothing but run jobs).
pub struct SchedulerService {
    parts: Vec<Mutex<JobTable>>,
    armed: Vec<Mutex<Option<Instant>>>,
    owned: Vec<AtomicBool>,
    /// Wakes the partition's owner task to fire its due slots.
    wake: Vec<Arc<Notify>>,
    /// Per partition, the runs this owner claimed (or moved to another member) whose
    /// change is not confirmed by the backups yet: held, not sent. The owner task sends
    /// them once a later change of its own is confirmed. Each with the partition version
    /// of the change that holds it.
    held: Vec<Mutex<HashMap<(String, u64), u64>>>,
    /// Per partition, the version the owner task's last firing's change has (or would
    /// have): once it is confirmed, so is every run held at or before it.
    fire_version: Vec<std::sync::atomic::AtomicU64>,
    cluster: Cluster,
    me: Arc<str>,
    /// This member's runners.
    pub(crate) runners: RwLock<HashMap<String, Arc<dyn JobRunner>>>,
    /// Who has which runner (the other members' last lists).
    directory: Mutex<HashMap<String, BTreeSet<String>>>,
    /// Runs to start on this member.
    runs: mpsc::Sender<JobRequest>,
    /// (job, run) pairs received lately, to ignore a run sent again.
    seen: Mutex<Seen>,
}

impl std::fmt::Debug for SchedulerService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchedulerService")
            .field("partitions", &self.parts.len())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn bad_partition(p: u32) -> SchedulerError {
    SchedulerError::BadCopy(format!("no partition {p}"))
}

impl SchedulerService {
    /// A service for `partitions` partitions on the member `cluster` runs; runs for this
    /// member go to `runs`.
    pub fn new(partitions: u32, cluster: Cluster, runs: mpsc::Sender<JobRequest>) -> Self {
        Self {
            parts: (0..partitions).map(|_| Mutex::default()).collect(),
            armed: (0..partitions).map(|_| Mutex::default()).collect(),
            owned: (0..partitions).map(|_| AtomicBool::new(false)).collect(),
            wake: (0..partitions).map(|_| Arc::new(Notify::new())).collect(),
            held: (0..partitions).map(|_| Mutex::default()).collect(),
            fire_version: (0..partitions)
                .map(|_| std::sync::atomic::AtomicU64::new(0))
                .collect(),
            me: cluster.local_member().id.clone(),
            cluster,
            runners: RwLock::new(HashMap::new()),
            directory: Mutex::new(HashMap::new()),
            runs,
            seen: Mutex::new((HashSet::new(), VecDeque::new())),
        }
    }

    /// This member's id.
    pub fn member(&self) -> &str {
        &self.me
    }

    /// The job table of partition `p` (tests look inside).
    pub fn table(&self, p: u32) -> Option<JobTable> {
        self.part(p).map(|t| t.clone())
    }

    /// Jobs in partition `p` on this member (owner or backup).
    pub fn jobs_in(&self, p: u32) -> usize {
        self.part(p).map(|t| t.jobs.len()).unwrap_or(0)
    }

    fn part(&self, p: u32) -> Option<MutexGuard<'_, JobTable>> {
        self.parts.get(p as usize).map(lock)
    }

    /// Whether this member has runner `key`.
    pub fn has_runner(&self, key: &str) -> bool {
        self.runners
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(key)
    }

    /// This member's runner keys.
    pub fn runner_keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self
            .runners
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        keys.sort();
        keys
    }

    /// The members (other than this one) that have runner `key`, as far as this member
    /// knows.
    pub fn members_with_runner(&self, key: &str) -> Vec<String> {
        let mut members: Vec<String> = lock(&self.directory)
            .iter()
            .filter(|(m, keys)| keys.contains(key) && self.is_live(m))
            .map(|(m, _)| m.clone())
            .collect();
        members.sort();
        members
    }

    /// Forgets what `member` said (it left gracefully).
    pub(crate) fn forget_member(&self, member: &str) {
        lock(&self.directory).remove(member);
    }

    fn is_live(&self, member: &str) -> bool {
        *member == *self.me || self.cluster.member(member).is_some()
    }

    /// Where a run of `key` for (job, slot) goes: here when this member has the runner,
    /// else one of the live members that have it (spread by job and slot).
    fn target(&self, key: &str, job: &str, slot: u64) -> Option<String> {
        if self.has_runner(key) {
            return Some(self.me.to_string());
        }
        let members = self.members_with_runner(key);
        if members.is_empty() {
            return None;
        }
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (job, slot).hash(&mut h);
        Some(members[(h.finish() % members.len() as u64) as usize].clone())
    }

    /// Arms the firing timer at `slot` (Unix ms) unless armed for an earlier time already.
    fn arm(&self, p: u32, slot: Option<u64>, now: Instant, fx: &mut Effects<Self>) {
        let Some(slot) = slot else { return };
        let Some(armed) = self.armed.get(p as usize) else {
            return;
        };
        let now_ms = grid_core::clock::unix_ms();
        let at = now + Duration::from_millis(slot.saturating_sub(now_ms));
        let mut armed = lock(armed);
        if armed.is_some_and(|a| a <= at) {
            return;
        }
        *armed = Some(at);
        fx.arm_timer(FIRE, at);
    }

    fn carry_out(&self, outputs: Vec<Output>, fx: &mut Effects<Self>) {
        for o in outputs {
            match o {
                Output::Dispatch { member, request } => {
                    fx.send(member.into(), Msg::Run(request));
                }
            }
        }
    }

    /// Whether partition `p` has held runs.
    fn has_held(&self, p: u32) -> bool {
        self.held
            .get(p as usize)
            .is_some_and(|h| !lock(h).is_empty())
    }

    /// Takes partition `p`'s runs held by changes up to the owner task's last firing
    /// (confirmed), as they stand in the table now (runs that ended meanwhile are gone;
    /// runs on members that left are not sent).
    fn take_held(&self, p: u32) -> Vec<Output> {
        let (Some(held), Some(upto)) =
            (self.held.get(p as usize), self.fire_version.get(p as usize))
        else {
            return Vec::new();
        };
        let upto = upto.load(Ordering::Acquire);
        let held: HashSet<(String, u64)> = {
            let mut held = lock(held);
            let confirmed: HashSet<(String, u64)> = held
                .iter()
                .filter(|(_, v)| **v <= upto)
                .map(|(k, _)| k.clone())
                .collect();
            held.retain(|k, _| !confirmed.contains(k));
            confirmed
        };
        if held.is_empty() {
            return Vec::new();
        }
        let Some(t) = self.part(p) else {
            return Vec::new();
        };
        t.resend()
            .into_iter()
            .filter(|Output::Dispatch { member, request }| {
                held.contains(&(request.job_id.clone(), request.run_id)) && self.is_live(member)
            })
            .collect()
    }

    /// A run sent to this member: queued for the run task, unless it came already.
    fn accept_run(&self, request: JobRequest) {
        let key = (request.job_id.clone(), request.run_id);
        {
            let mut seen = lock(&self.seen);
            if seen.0.contains(&key) {
                return;
            }
            if self.runs.try_send(request).is_err() {
                tracing::warn!(job = %key.0, run = key.1, "run queue full: run dropped (it is sent again later)");
                return;
            }
            seen.0.insert(key.clone());
            seen.1.push_back(key);
            while seen.1.len() > SEEN_RUNS {
                if let Some(old) = seen.1.pop_front() {
                    seen.0.remove(&old);
                }
            }
        }
    }

    /// Jobs of runner `key` in the partitions this member owns.
    pub fn owned_jobs_by_runner(&self, key: &str) -> Vec<JobDetails> {
        (0..self.parts.len() as u32)
            .filter(|p| self.owned[*p as usize].load(Ordering::Relaxed))
            .flat_map(|p| {
                self.part(p)
                    .map(|t| t.jobs_by_runner(key))
                    .unwrap_or_default()
            })
            .collect()
    }
}

impl PartitionService for SchedulerService {
    type Op = Op;
    type Change = Change;
    type Answer = Answer;
    type Error = SchedulerError;
    type Message = Msg;

    fn name(&self) -> &str {
        "scheduler"
    }

    fn read(&self, ctx: &Ctx, op: &Op) -> Result<Answer, SchedulerError> {
        match op {
            Op::Details { id } => {
                let t = self
                    .part(ctx.partition)
                    .ok_or(bad_partition(ctx.partition))?;
                Ok(Answer::Details(t.details(id).map(Box::new)))
            }
            _ => Err(SchedulerError::NotARead),
        }
    }

    fn prepare(&self, ctx: &Ctx, op: Op) -> Result<Prepared<Self>, SchedulerError> {
        let target = |key: &str, job: &str, slot: u64| self.target(key, job, slot);
        let live = |m: &str| self.is_live(m);
        let held_runs = self
            .held
            .get(ctx.partition as usize)
            .map(|h| lock(h).clone())
            .unwrap_or_default();
        let held = |id: &str, run: u64| held_runs.contains_key(&(id.to_string(), run));
        if matches!(op, Op::FireDue) {
            if let Some(v) = self.fire_version.get(ctx.partition as usize) {
                v.store(ctx.version.saturating_add(1), Ordering::Release);
            }
        }
        let env = Env {
            now_ms: grid_core::clock::unix_ms(),
            target: &target,
            live: &live,
            held: &held,
            confirm: !held_runs.is_empty(),
        };
        let t = self
            .part(ctx.partition)
            .ok_or(bad_partition(ctx.partition))?;
        let decision = t.decide(op, &env)?;
        Ok(match decision.change {
            Some(c) => Prepared::change(decision.answer, c),
            None => Prepared::answer(decision.answer),
        })
    }

    fn apply(
        &self,
        ctx: &Ctx,
        change: &Change,
        fx: &mut Effects<Self>,
    ) -> Result<(), SchedulerError> {
        let p = ctx.partition;
        let (outputs, earliest) = {
            let mut t = self.part(p).ok_or(bad_partition(p))?;
            let outputs = t.apply(change);
            (outputs, t.earliest())
        };
        if ctx.role != Role::Owner {
            return Ok(());
        }
        if let Change::Fire { firings, .. } = change {
            metrics::counter!("grid_scheduler_firings_total").increment(firings.len() as u64);
        }
        // Every run this change sends (a firing's, a retry's) is held until the owner
        // task sees a change of its own confirmed: sent before, it could run although a
        // promoted backup never heard of its claim, and fire its slot again.
        let mut new_runs = claimed_runs(change);
        new_runs.extend(
            outputs
                .into_iter()
                .map(|Output::Dispatch { request, .. }| (request.job_id, request.run_id)),
        );
        if !new_runs.is_empty() {
            if let Some(h) = self.held.get(p as usize) {
                lock(h).extend(new_runs.into_iter().map(|k| (k, ctx.version)));
            }
            if !matches!(change, Change::Fire { .. }) {
                // Not the owner task's own firing: wake it to confirm and send.
                if let Some(w) = self.wake.get(p as usize) {
                    w.notify_one();
                }
            }
        }
        self.arm(p, earliest, ctx.now, fx);
        Ok(())
    }

    fn on_owned(&self, ctx: &Ctx, fx: &mut Effects<Self>) {
        let p = ctx.partition;
        if let Some(o) = self.owned.get(p as usize) {
            o.store(true, Ordering::Relaxed);
        }
        if let Some(h) = self.held.get(p as usize) {
            lock(h).clear();
        }
        if let Some(a) = self.armed.get(p as usize) {
            *lock(a) = None;
        }
        let Some(t) = self.part(p) else { return };
        let live = |m: &str| self.is_live(m);
        if t.has_orphans(&live) {
            fx.submit(Op::Reap);
        }
        // The old owner may have claimed a slot and died before sending its run: send the
        // runs under way again (their members ignore one they have).
        let resend: Vec<Output> = t
            .resend()
            .into_iter()
            .filter(|Output::Dispatch { member, .. }| live(member))
            .collect();
        let earliest = t.earliest();
        drop(t);
        self.carry_out(resend, fx);
        // Missed slots are due: the timer fires at once.
        self.arm(p, earliest, ctx.now, fx);
    }

    fn on_disowned(&self, p: u32) {
        if let Some(o) = self.owned.get(p as usize) {
            o.store(false, Ordering::Relaxed);
        }
        if let Some(h) = self.held.get(p as usize) {
            lock(h).clear();
        }
        if let Some(a) = self.armed.get(p as usize) {
            *lock(a) = None;
        }
    }

    fn on_member_left(&self, ctx: &Ctx, member: &str, fx: &mut Effects<Self>) {
        // The member's runner keys are kept (see `announce`): it may be back at once (a
        // pause, a false suspicion), and the directory is read through liveness anyway.
        let gone = |m: &str| m != member && self.is_live(m);
        if self
            .part(ctx.partition)
            .is_some_and(|t| t.has_orphans(&gone))
        {
            fx.submit(Op::Reap);
        }
    }

    fn on_timer(&self, ctx: &Ctx, timer: u64, fx: &mut Effects<Self>) {
        if timer != FIRE {
            return;
        }
        let p = ctx.partition;
        let live = |m: &str| self.is_live(m);
        let (due, earliest, orphans) = match self.part(p) {
            Some(t) => (
                t.is_due(grid_core::clock::unix_ms()),
                t.earliest(),
                t.has_orphans(&live),
            ),
            None => return,
        };
        if orphans {
            // A run on a member that is gone (its departure was seen before the member
            // list dropped it): end it before it blocks the job's next slot.
            fx.submit(Op::Reap);
        }
        if let Some(a) = self.armed.get(p as usize) {
            *lock(a) = None;
        }
        if due {
            if let Some(w) = self.wake.get(p as usize) {
                w.notify_one();
            }
            // Should the firing be dropped (the partition moved meanwhile, a full queue),
            // look again a little later; its change re-arms for the next slot anyway.
            let retry = grid_core::clock::unix_ms() + FIRE_RETRY.as_millis() as u64;
            self.arm(p, Some(retry), ctx.now, fx);
        } else {
            self.arm(p, earliest, ctx.now, fx);
        }
    }

    fn owner_task(&self, partition: u32, handle: ServiceHandle<Self>) -> Option<OwnerTask> {
        let wake = self.wake.get(partition as usize)?.clone();
        Some(Box::pin(fire_loop(partition, handle, wake)))
    }

    fn on_message(&self, from: &str, message: Msg) {
        match message {
            Msg::Run(request) => self.accept_run(request),
            Msg::Runners(keys) => {
                if *from != *self.me {
                    lock(&self.directory).insert(from.to_string(), keys.into_iter().collect());
                }
            }
            Msg::JobsByRunner(_) | Msg::Jobs(_) => {}
        }
    }

    fn on_ask(&self, _from: &str, message: Msg) -> Option<Msg> {
        match message {
            Msg::JobsByRunner(key) => Some(Msg::Jobs(self.owned_jobs_by_runner(&key))),
            _ => None,
        }
    }

    fn snapshot(&self, partition: u32, _chunk_bytes: usize) -> Snapshot {
        let copy = self
            .part(partition)
            .map(|t| t.to_copy())
            .unwrap_or_default();
        match grid_core::codec::encode(&copy) {
            Ok(bytes) => vec![bytes.into()],
            Err(e) => {
                tracing::error!(partition, error = %e, "job table did not encode");
                Vec::new()
            }
        }
    }

    fn rebuild(
        &self,
        partition: u32,
        chunks: Vec<bytes::Bytes>,
    ) -> Result<Rebuilt, SchedulerError> {
        let copy: TableCopy = match chunks.first() {
            None => TableCopy::default(),
            Some(chunk) => grid_core::codec::decode(chunk)
                .map_err(|e| SchedulerError::BadCopy(format!("partition {partition}: {e}")))?,
        };
        Ok(Box::new(JobTable::from_copy(copy)))
    }

    fn install(&self, partition: u32, rebuilt: Rebuilt) -> Result<(), SchedulerError> {
        let table = rebuilt
            .downcast::<JobTable>()
            .map_err(|_| SchedulerError::BadCopy("not a job table".into()))?;
        *self.part(partition).ok_or(bad_partition(partition))? = *table;
        Ok(())
    }

    fn drop_partition(&self, partition: u32) {
        if let Some(mut t) = self.part(partition) {
            *t = JobTable::default();
        }
    }

    fn partition_len(&self, partition: u32) -> usize {
        self.jobs_in(partition)
    }
}

/// The owner task of a partition: fires its due slots when its timer says so, and sends
/// the runs a firing claimed only once the firing's change is confirmed by the backups. A
/// change the owner applied without a backup's confirmation could be lost if the owner
/// died now, and its slot fired again by the promoted backup: its runs are held
/// ([`SchedulerService::take_held`]), and the owner fires again every [`CONFIRM_RETRY`]
/// (a change even when nothing is due) until one is confirmed, then sends them. Slots
/// that come due meanwhile join the held runs of their jobs ([`FiringResult::Merged`](super::table::FiringResult::Merged))
/// rather than finding them "still running".
async fn fire_loop(p: u32, handle: ServiceHandle<SchedulerService>, wake: Arc<Notify>) {
    loop {
        if handle.service().has_held(p) {
            tokio::select! {
                () = wake.notified() => {}
                () = tokio::time::sleep(CONFIRM_RETRY) => {}
            }
        } else {
            wake.notified().await;
        }
        match handle.execute(p, Op::FireDue, OpKind::Write).await {
            Ok(Ok(Answer::Fired(mut runs))) => {
                // Confirmed: so is every change before it, and the held runs with them.
                let held = handle.service().take_held(p);
                let fresh: HashSet<(String, u64)> = held
                    .iter()
                    .map(|Output::Dispatch { request, .. }| {
                        (request.job_id.clone(), request.run_id)
                    })
                    .collect();
                runs.retain(|Output::Dispatch { request, .. }| {
                    !fresh.contains(&(request.job_id.clone(), request.run_id))
                });
                runs.extend(held);
                send_runs(&handle, runs).await;
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(partition = p, error = %e, "firing refused"),
            Err(e) => {
                tracing::debug!(partition = p, error = %e, "firing not confirmed; its runs are held");
            }
        }
    }
}

/// The runs a change claims (their sending waits for its confirmation).
fn claimed_runs(change: &Change) -> Vec<(String, u64)> {
    match change {
        Change::Fire { firings, .. } => firings
            .iter()
            .filter_map(|f| match &f.result {
                FiringResult::Run(run) => Some((f.id.clone(), run.run_id)),
                _ => None,
            })
            .collect(),
        Change::Many(changes) => changes.iter().flat_map(claimed_runs).collect(),
        _ => Vec::new(),
    }
}

async fn send_runs(handle: &ServiceHandle<SchedulerService>, runs: Vec<Output>) {
    for Output::Dispatch { member, request } in runs {
        let job = request.job_id.clone();
        if let Err(e) = handle.send(&member, &Msg::Run(request)).await {
            tracing::debug!(%member, %job, error = %e, "run not sent (sent again at the job's next slot)");
        }
    }
}
