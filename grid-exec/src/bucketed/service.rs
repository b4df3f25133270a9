//! The bucket queues on the runtime's service interface ([`PartitionService`]), and the
//! processing side of a member.
//!
//! - **Owner side**: one [`PartitionQueues`] per partition, decided under the partition's
//!   lock (`prepare`), replicated, applied on the owner and its backups (`apply`). A batch
//!   started by a change is handed out by the owner once the change is applied: run here
//!   when this member has the processor, else sent to the member the change named
//!   ([`Message::Offer`]). An owner task per partition kicks the queues when something
//!   may start (a delay ended, a member left, a processor registered) and sends again the
//!   offers of batches in flight that were not completed after a while (a new owner sends
//!   them at once): an offer is a message, at most once.
//! - **Processing side**: a member runs at most one batch per bucket (a second offer for a
//!   bucket that runs here waits), at most its concurrency limit at once (offers beyond
//!   wait in a bounded queue, then are declined), and remembers the outcome of the batches
//!   it finished, so that an offer sent again is answered with the completion, not run
//!   twice. The completion is an operation on the bucket's partition: accepted only from
//!   the batch and attempt in flight.
//! - **Registrations** (who has which processor) travel as [`Message::Registry`]: a member
//!   sends its list to every member when it changes, to every member that joins, and
//!   every few seconds (messages are at most once); a member that leaves is forgotten.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use futures::future::BoxFuture;
use grid_core::runtime::service::*;
use grid_net::membership::{Cluster, MemberEvent};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::bucketed::queue::{
    Answer, Change, Env, ExecSettings, Offer, Op, Outcome, Output, PartitionCopy, PartitionQueues,
    Step,
};
use crate::bucketed::{ExecError, ExecStatistics};

/// An offer not completed after this long is sent again (to the same member: it runs a
/// batch once, and answers a repeat with the completion).
const RESEND: Duration = Duration::from_secs(3);
/// How often an owner task looks at its partition without being nudged.
const TICK: Duration = Duration::from_millis(500);
/// How often a member sends its registrations to everyone.
const REGISTRY_EVERY: Duration = Duration::from_secs(3);
/// Offers waiting for a free slot on a member, per executor, at most (more are declined).
const MAX_WAITING: usize = 16_384;
/// Finished batches a member remembers, per executor.
const MAX_FINISHED: usize = 16_384;
/// Attempts at delivering a completion before the member gives up (the owner then sends
/// the offer again, and the member answers with the outcome it remembers).
const COMPLETE_TRIES: u32 = 5;

/// What the service sends between members.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Message {
    /// A batch for the receiver to process.
    Offer(Offer),
    /// The executors the sender has a processor for (its whole list).
    Registry {
        /// Their names.
        execs: Vec<String>,
    },
    /// Asks for the receiver's statistics of an executor.
    StatsOf(String),
    /// The answer to [`Message::StatsOf`].
    Stats(ExecStatistics),
}

/// A processor, type-erased: (bucket, tasks, attempt) to an outcome.
pub(crate) type ErasedProcessor =
    Arc<dyn Fn(Vec<u8>, Vec<Vec<u8>>, u32) -> BoxFuture<'static, Result<(), String>> + Send + Sync>;
/// A dead-letter listener, type-erased: (bucket, tasks, attempts, last error).
pub(crate) type ErasedDeadLetter = Arc<dyn Fn(Vec<u8>, Vec<Vec<u8>>, u32, String) + Send + Sync>;

/// Counters of one executor on one member.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) processed: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) retried: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
    pub(crate) submitted: AtomicU64,
}

/// An executor this member processes.
pub(crate) struct LocalExec {
    pub(crate) settings: ExecSettings,
    pub(crate) processor: ErasedProcessor,
    pub(crate) dead_letter: Mutex<Vec<ErasedDeadLetter>>,
    pub(crate) stopped: AtomicBool,
    run: Mutex<Run>,
}

#[derive(Default)]
struct Run {
    /// Batches running here, by (partition, bucket).
    running: HashMap<(u32, Vec<u8>), u64>,
    /// Offers waiting for a slot or for their bucket.
    waiting: VecDeque<Offer>,
    /// Outcomes of finished batches, by (partition, batch): (attempt, outcome).
    finished: HashMap<(u32, u64), (u32, Outcome)>,
    finished_order: VecDeque<(u32, u64)>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the owner of a partition knows that is not replicated.
#[derive(Default)]
struct OwnerLocal {
    /// When each batch in flight was last offered.
    sent: HashMap<u64, Instant>,
    /// Tasks of each executor counted in `owned_queued` for this partition.
    counted: HashMap<String, usize>,
}

/// The bucketed executors' service of one member (registered on every member).
pub struct BucketedService {
    parts: Vec<Mutex<PartitionQueues>>,
    owner: Vec<Mutex<OwnerLocal>>,
    kicks: Vec<Notify>,
    me: Arc<str>,
    cluster: Cluster,
    /// Who has a processor, per executor (this member included).
    directory: Mutex<HashMap<String, BTreeSet<String>>>,
    /// Tasks per executor in the partitions this member owns.
    owned_queued: Mutex<HashMap<String, usize>>,
    /// Executors processed here.
    pub(crate) local: Mutex<HashMap<String, Arc<LocalExec>>>,
    /// Counters per executor (also for executors only submitted to here).
    counters: Mutex<HashMap<String, Arc<Counters>>>,
    handle: OnceLock<ServiceHandle<Self>>,
}

impl std::fmt::Debug for BucketedService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BucketedService")
            .field("member", &self.me)
            .finish()
    }
}

impl BucketedService {
    /// A service for `partitions` partitions on the member `cluster` runs.
    pub fn new(partitions: u32, cluster: Cluster) -> Self {
        Self {
            parts: (0..partitions).map(|_| Mutex::default()).collect(),
            owner: (0..partitions).map(|_| Mutex::default()).collect(),
            kicks: (0..partitions).map(|_| Notify::new()).collect(),
            me: cluster.local_member().id.clone(),
            cluster,
            directory: Mutex::default(),
            owned_queued: Mutex::default(),
            local: Mutex::default(),
            counters: Mutex::default(),
            handle: OnceLock::new(),
        }
    }

    /// Registers the service on `runtime` and starts following membership.
    pub fn start(runtime: &grid_core::runtime::Runtime, cluster: Cluster) -> ServiceHandle<Self> {
        let service = Arc::new(Self::new(
            runtime.config().table.partitions,
            cluster.clone(),
        ));
        let handle = runtime.register_service(service.clone());
        let _ = service.handle.set(handle.clone());
        let weak = Arc::downgrade(&service);
        let mut events = cluster.events();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(REGISTRY_EVERY);
            loop {
                tokio::select! {
                    event = events.recv() => {
                        let Some(event) = event else { return };
                        let Some(s) = weak.upgrade() else { return };
                        match event {
                            MemberEvent::Joined(m) => s.send_registry_to(&m.id),
                            MemberEvent::Left(m) | MemberEvent::Failed(m) => {
                                let mut d = lock(&s.directory);
                                for members in d.values_mut() {
                                    members.remove(&*m.id);
                                }
                                drop(d);
                                s.kick_all();
                            }
                        }
                    }
                    _ = every.tick() => {
                        let Some(s) = weak.upgrade() else { return };
                        s.broadcast_registry();
                        s.export_gauges();
                    }
                }
            }
        });
        handle
    }

    fn handle(&self) -> Option<&ServiceHandle<Self>> {
        self.handle.get()
    }

    /// The counters of `exec` on this member.
    pub(crate) fn counters(&self, exec: &str) -> Arc<Counters> {
        lock(&self.counters)
            .entry(exec.to_string())
            .or_default()
            .clone()
    }

    /// Sets the gauges of every executor this member knows of (its statistics, as
    /// `metrics` gauges labelled by executor), at each registry broadcast.
    fn export_gauges(&self) {
        let names: Vec<String> = lock(&self.counters).keys().cloned().collect();
        for exec in names {
            let s = self.statistics(&exec);
            let label = [("exec", exec)];
            metrics::gauge!("grid_exec_bucketed_queued", &label).set(s.queued as f64);
            metrics::gauge!("grid_exec_bucketed_in_flight", &label).set(s.in_flight as f64);
            metrics::gauge!("grid_exec_bucketed_processing", &label).set(s.processing as f64);
        }
    }

    /// This member's statistics of `exec`.
    pub fn statistics(&self, exec: &str) -> ExecStatistics {
        let c = self.counters(exec);
        let (queued, in_flight) = (0..self.parts.len() as u32)
            .filter(|p| self.owns(*p))
            .map(|p| {
                let q = lock(&self.parts[p as usize]);
                (q.queued(exec) as u64, q.in_flight(exec) as u64)
            })
            .fold((0, 0), |(a, b), (c, d)| (a + c, b + d));
        let running = lock(&self.local)
            .get(exec)
            .map_or(0, |l| lock(&l.run).running.len() as u64);
        ExecStatistics {
            member: self.me.to_string(),
            queued,
            in_flight,
            processing: running,
            processed: c.processed.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            retried: c.retried.load(Ordering::Relaxed),
            dead_lettered: c.dead_lettered.load(Ordering::Relaxed),
            submitted: c.submitted.load(Ordering::Relaxed),
        }
    }

    fn owns(&self, p: u32) -> bool {
        self.handle()
            .is_some_and(|h| h.runtime().table().owner(p) == Some(&self.me))
    }

    /// The live members' ids.
    pub(crate) fn cluster_members(&self) -> Vec<String> {
        self.cluster
            .members()
            .iter()
            .map(|m| m.id.to_string())
            .collect()
    }

    /// The members that have a processor for `exec` (this one included).
    pub fn processors(&self, exec: &str) -> Vec<String> {
        lock(&self.directory)
            .get(exec)
            .map(|m| m.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The queues of partition `p` (tests look inside).
    pub fn queues(&self, p: u32) -> Option<PartitionQueues> {
        self.parts.get(p as usize).map(|q| lock(q).clone())
    }

    /// Adds (or replaces) this member's processor for `exec`.
    pub(crate) fn register(&self, exec: &str, local: Arc<LocalExec>) {
        lock(&self.local).insert(exec.to_string(), local);
        lock(&self.directory)
            .entry(exec.to_string())
            .or_default()
            .insert(self.me.to_string());
        self.broadcast_registry();
        self.kick_all();
    }

    /// Stops processing `exec` here: offers waiting here are declined, running batches
    /// finish.
    pub(crate) fn unregister(&self, exec: &str) {
        let Some(local) = lock(&self.local).remove(exec) else {
            return;
        };
        local.stopped.store(true, Ordering::SeqCst);
        if let Some(members) = lock(&self.directory).get_mut(exec) {
            members.remove(&*self.me);
        }
        self.broadcast_registry();
        let waiting: Vec<Offer> = lock(&local.run).waiting.drain(..).collect();
        for offer in waiting {
            self.decline(offer);
        }
    }

    fn registry(&self) -> Message {
        Message::Registry {
            execs: lock(&self.local).keys().cloned().collect(),
        }
    }

    fn send_registry_to(&self, member: &str) {
        if *member == *self.me {
            return;
        }
        let Some(handle) = self.handle().cloned() else {
            return;
        };
        let message = self.registry();
        let member = member.to_string();
        tokio::spawn(async move {
            if let Err(e) = handle.send(&member, &message).await {
                debug!(%member, error = %e, "registrations not sent");
            }
        });
    }

    fn broadcast_registry(&self) {
        for m in self.cluster.members().iter() {
            self.send_registry_to(&m.id);
        }
    }

    fn kick_all(&self) {
        for k in &self.kicks {
            k.notify_one();
        }
    }

    /// Who processes a batch of `exec`'s `bucket`: this member if it has the processor,
    /// else one of those that do (the same one for a bucket while they stay).
    fn pick(&self, exec: &str, bucket: &[u8]) -> Option<String> {
        let d = lock(&self.directory);
        let members: Vec<&String> = d
            .get(exec)?
            .iter()
            .filter(|m| **m == *self.me || self.cluster.member(m).is_some())
            .collect();
        if members.iter().any(|m| **m == *self.me) {
            return Some(self.me.to_string());
        }
        if members.is_empty() {
            return None;
        }
        let i = grid_core::partition::partition_of(bucket, members.len() as u32);
        members.get(i as usize).map(|m| m.to_string())
    }

    fn alive(&self, member: &str) -> bool {
        *member == *self.me || self.cluster.member(member).is_some()
    }

    /// How many batches of `exec` may run on this member at once.
    fn limit(&self, exec: &LocalExec, name: &str) -> usize {
        let n = exec.settings.max_concurrency as usize;
        if !exec.settings.per_cluster {
            return n;
        }
        let members = lock(&self.directory)
            .get(name)
            .map_or(1, |m| m.len().max(1));
        n.div_ceil(members).max(1)
    }

    fn with_env<R>(&self, now: Instant, epoch: u64, f: impl FnOnce(&Env<'_>) -> R) -> R {
        let member_queued = |exec: &str| lock(&self.owned_queued).get(exec).copied().unwrap_or(0);
        let pick = |exec: &str, bucket: &[u8]| self.pick(exec, bucket);
        let alive = |m: &str| self.alive(m);
        f(&Env {
            now,
            epoch,
            member_queued: &member_queued,
            pick: &pick,
            alive: &alive,
        })
    }

    /// Recounts the tasks of partition `p` in `owned_queued` (`owned`: whether it counts).
    fn recount(&self, p: u32, owned: bool) {
        let now: HashMap<String, usize> = if owned {
            lock(&self.parts[p as usize])
                .execs
                .iter()
                .map(|(k, q)| (k.clone(), q.queued))
                .collect()
        } else {
            HashMap::new()
        };
        let mut local = lock(&self.owner[p as usize]);
        let mut total = lock(&self.owned_queued);
        for (exec, n) in local.counted.drain() {
            if let Some(t) = total.get_mut(&exec) {
                *t = t.saturating_sub(n);
            }
        }
        for (exec, n) in &now {
            *total.entry(exec.clone()).or_default() += n;
        }
        local.counted = now;
    }

    /// Hands an offer to its member (here, or by message).
    fn deliver(&self, offer: Offer, fx: Option<&mut Effects<Self>>) {
        lock(&self.owner[offer.partition as usize])
            .sent
            .insert(offer.batch, grid_core::clock::now());
        if offer.member == *self.me {
            self.accept(offer);
            return;
        }
        let member: Arc<str> = offer.member.as_str().into();
        match fx {
            Some(fx) => fx.send(member, Message::Offer(offer)),
            None => {
                let Some(handle) = self.handle().cloned() else {
                    return;
                };
                tokio::spawn(async move {
                    if let Err(e) = handle.send(&member, &Message::Offer(offer)).await {
                        debug!(%member, error = %e, "offer not sent");
                    }
                });
            }
        }
    }

    /// An offer for this member (see the module docs).
    fn accept(&self, offer: Offer) {
        let local = lock(&self.local).get(&offer.exec).cloned();
        let Some(local) = local.filter(|l| !l.stopped.load(Ordering::SeqCst)) else {
            self.decline(offer);
            return;
        };
        let limit = self.limit(&local, &offer.exec);
        let mut run = lock(&local.run);
        let key = (offer.partition, offer.bucket.clone());
        if let Some((attempt, outcome)) = run.finished.get(&(offer.partition, offer.batch)) {
            if *attempt == offer.attempt {
                // Done already: the completion did not land.
                let outcome = outcome.clone();
                drop(run);
                self.spawn_complete(local, offer, outcome);
                return;
            }
        }
        if run.running.get(&key) == Some(&offer.batch)
            || run
                .waiting
                .iter()
                .any(|w| w.partition == offer.partition && w.batch == offer.batch)
        {
            return;
        }
        if !run.running.contains_key(&key) && run.running.len() < limit {
            run.running.insert(key, offer.batch);
            drop(run);
            self.spawn_process(local, offer);
            return;
        }
        if run.waiting.len() >= MAX_WAITING {
            drop(run);
            warn!(exec = %offer.exec, "too many batches waiting on this member; one declined");
            self.decline(offer);
            return;
        }
        run.waiting.push_back(offer);
    }

    /// Starts waiting offers that may run now.
    fn pump(&self, name: &str, local: &Arc<LocalExec>) {
        let limit = self.limit(local, name);
        let mut start = Vec::new();
        {
            let mut run = lock(&local.run);
            let mut i = 0;
            while i < run.waiting.len() && run.running.len() < limit {
                let key = (run.waiting[i].partition, run.waiting[i].bucket.clone());
                if run.running.contains_key(&key) {
                    i += 1;
                    continue;
                }
                if let Some(offer) = run.waiting.remove(i) {
                    run.running.insert(key, offer.batch);
                    start.push(offer);
                }
            }
        }
        for offer in start {
            self.spawn_process(local.clone(), offer);
        }
    }

    fn decline(&self, offer: Offer) {
        let Some(handle) = self.handle().cloned() else {
            return;
        };
        tokio::spawn(async move {
            let op = Op::Decline {
                exec: offer.exec,
                bucket: offer.bucket,
                batch: offer.batch,
                attempt: offer.attempt,
            };
            if let Err(e) = handle.execute(offer.partition, op, OpKind::Write).await {
                debug!(error = %e, "decline not delivered (the offer comes again)");
            }
        });
    }

    fn spawn_process(&self, local: Arc<LocalExec>, offer: Offer) {
        let Some(handle) = self.handle().cloned() else {
            return;
        };
        let counters = self.counters(&offer.exec);
        tokio::spawn(async move {
            if offer.attempt > 1 {
                counters.retried.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("grid_exec_bucketed_retried_total").increment(1);
            }
            let started = Instant::now();
            let tasks: Vec<Vec<u8>> = offer.tasks.iter().map(|t| t.body.clone()).collect();
            let n = tasks.len() as u64;
            let run = (local.processor)(offer.bucket.clone(), tasks, offer.attempt);
            // In a task of its own: a panic is a failure, not the end of this loop.
            let outcome = match tokio::spawn(run).await {
                Ok(Ok(())) => Outcome::Done,
                Ok(Err(e)) => Outcome::Failed(e),
                Err(e) if e.is_panic() => Outcome::Failed("the processor panicked".into()),
                Err(e) => Outcome::Failed(e.to_string()),
            };
            metrics::histogram!("grid_exec_bucketed_process_seconds")
                .record(started.elapsed().as_secs_f64());
            match &outcome {
                Outcome::Done => {
                    counters.processed.fetch_add(n, Ordering::Relaxed);
                    metrics::counter!("grid_exec_bucketed_processed_total").increment(n);
                }
                Outcome::Failed(e) => {
                    counters.failed.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("grid_exec_bucketed_failed_total").increment(1);
                    debug!(exec = %offer.exec, attempt = offer.attempt, error = %e, "batch failed");
                }
            }
            {
                let mut run = lock(&local.run);
                run.finished.insert(
                    (offer.partition, offer.batch),
                    (offer.attempt, outcome.clone()),
                );
                run.finished_order.push_back((offer.partition, offer.batch));
                while run.finished_order.len() > MAX_FINISHED {
                    if let Some(old) = run.finished_order.pop_front() {
                        run.finished.remove(&old);
                    }
                }
            }
            let service = handle.service().clone();
            service.complete(&handle, &local, &offer, outcome).await;
            let key = (offer.partition, offer.bucket.clone());
            {
                let mut run = lock(&local.run);
                if run.running.get(&key) == Some(&offer.batch) {
                    run.running.remove(&key);
                }
            }
            service.pump(&offer.exec, &local);
        });
    }

    fn spawn_complete(&self, local: Arc<LocalExec>, offer: Offer, outcome: Outcome) {
        let Some(handle) = self.handle().cloned() else {
            return;
        };
        tokio::spawn(async move {
            let service = handle.service().clone();
            service.complete(&handle, &local, &offer, outcome).await;
        });
    }

    /// Reports a batch's outcome to its partition's owner; calls the dead-letter handlers
    /// when the owner says the batch is dead.
    async fn complete(
        &self,
        handle: &ServiceHandle<Self>,
        local: &LocalExec,
        offer: &Offer,
        outcome: Outcome,
    ) {
        let error = match &outcome {
            Outcome::Failed(e) => e.clone(),
            Outcome::Done => String::new(),
        };
        let op = Op::Complete {
            exec: offer.exec.clone(),
            bucket: offer.bucket.clone(),
            batch: offer.batch,
            attempt: offer.attempt,
            outcome,
        };
        for _ in 0..COMPLETE_TRIES {
            match handle
                .execute(offer.partition, op.clone(), OpKind::IdempotentWrite)
                .await
            {
                Ok(Ok(Answer::DeadLettered)) => {
                    let counters = self.counters(&offer.exec);
                    counters.dead_lettered.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("grid_exec_bucketed_dead_lettered_total").increment(1);
                    warn!(exec = %offer.exec, attempts = offer.attempt, %error, "batch dead-lettered");
                    let listeners = lock(&local.dead_letter).clone();
                    for l in listeners {
                        let tasks = offer.tasks.iter().map(|t| t.body.clone()).collect();
                        l(offer.bucket.clone(), tasks, offer.attempt, error.clone());
                    }
                    return;
                }
                Ok(Ok(_)) => return,
                Ok(Err(e)) => {
                    warn!(exec = %offer.exec, error = %e, "completion refused");
                    return;
                }
                Err(e) => {
                    debug!(exec = %offer.exec, error = %e, "completion not delivered; trying again");
                }
            }
        }
    }

    /// The owner's loop for partition `p` (see the module docs).
    async fn owner_loop(self: Arc<Self>, p: u32, handle: ServiceHandle<Self>) {
        loop {
            let now = grid_core::clock::now();
            let (needs, wake) = {
                let q = lock(&self.parts[p as usize]);
                let needs = self.with_env(now, 0, |env| q.needs_kick(env));
                (needs, q.next_wake())
            };
            if needs {
                if let Err(e) = handle.execute(p, Op::Kick, OpKind::IdempotentWrite).await {
                    debug!(partition = p, error = %e, "kick failed");
                }
            }
            // Offers not completed for a while (or never sent by this owner) go again.
            let resend: Vec<Offer> = {
                let q = lock(&self.parts[p as usize]);
                let mut local = lock(&self.owner[p as usize]);
                let mut live = BTreeSet::new();
                let sent = &local.sent;
                let resend = q.offers_where(p, |f| {
                    live.insert(f.batch);
                    sent.get(&f.batch)
                        .is_none_or(|at| now.saturating_duration_since(*at) >= RESEND)
                        && self.alive(&f.member)
                });
                local.sent.retain(|b, _| live.contains(b));
                resend
            };
            for offer in resend {
                debug!(partition = p, batch = offer.batch, member = %offer.member, "offer sent again");
                self.deliver(offer, None);
            }
            let until = wake.map_or(now + TICK, |w| w.min(now + TICK));
            tokio::select! {
                _ = tokio::time::sleep_until(until) => {}
                _ = self.kicks[p as usize].notified() => {}
            }
        }
    }

    fn part(&self, p: u32) -> Result<MutexGuard<'_, PartitionQueues>, ExecError> {
        self.parts
            .get(p as usize)
            .map(lock)
            .ok_or_else(|| ExecError::BadCopy(format!("no partition {p}")))
    }
}

/// The executors a change touches.
fn touched(change: &Change) -> BTreeSet<&str> {
    change
        .0
        .iter()
        .map(|s| match s {
            Step::Define { exec, .. }
            | Step::Enqueue { exec, .. }
            | Step::Release { exec, .. }
            | Step::Start { exec, .. }
            | Step::Remove { exec, .. }
            | Step::Requeue { exec, .. } => exec.as_str(),
        })
        .collect()
}

impl PartitionService for BucketedService {
    type Op = Op;
    type Change = Change;
    type Answer = Answer;
    type Error = ExecError;
    type Message = Message;

    fn name(&self) -> &str {
        "bucketed"
    }

    fn read(&self, _ctx: &Ctx, _op: &Op) -> Result<Answer, ExecError> {
        Err(ExecError::NotARead)
    }

    fn prepare(&self, ctx: &Ctx, op: Op) -> Result<Prepared<Self>, ExecError> {
        let q = self.part(ctx.partition)?;
        let (answer, change) = self.with_env(ctx.now, ctx.epoch, |env| q.decide(op, env))?;
        Ok(match change {
            Some(c) => Prepared::change(answer, c),
            None => Prepared::answer(answer),
        })
    }

    fn apply(&self, ctx: &Ctx, change: &Change, fx: &mut Effects<Self>) -> Result<(), ExecError> {
        let p = ctx.partition;
        let outputs = self.part(p)?.apply(change, p, ctx.now)?;
        if ctx.role != Role::Owner {
            return Ok(());
        }
        // The tasks of this partition, counted for the per-member bound.
        {
            let q = self.part(p)?;
            let mut local = lock(&self.owner[p as usize]);
            let mut total = lock(&self.owned_queued);
            for exec in touched(change) {
                let now = q.queued(exec);
                let before = local.counted.insert(exec.to_string(), now).unwrap_or(0);
                let t = total.entry(exec.to_string()).or_default();
                *t = (*t + now).saturating_sub(before);
            }
        }
        for Output::Offer(offer) in outputs {
            self.deliver(offer, Some(fx));
        }
        Ok(())
    }

    fn on_owned(&self, ctx: &Ctx, _fx: &mut Effects<Self>) {
        let p = ctx.partition;
        lock(&self.owner[p as usize]).sent.clear();
        self.recount(p, true);
        self.kicks[p as usize].notify_one();
    }

    fn on_disowned(&self, p: u32) {
        lock(&self.owner[p as usize]).sent.clear();
        self.recount(p, false);
    }

    fn on_member_left(&self, ctx: &Ctx, _member: &str, _fx: &mut Effects<Self>) {
        self.kicks[ctx.partition as usize].notify_one();
    }

    fn on_message(&self, from: &str, message: Message) {
        match message {
            Message::Offer(offer) => {
                if offer.member != *self.me {
                    return;
                }
                self.accept(offer);
            }
            Message::Registry { execs } => {
                let mut changed = false;
                let mut d = lock(&self.directory);
                for (name, members) in d.iter_mut() {
                    if !execs.contains(name) {
                        changed |= members.remove(from);
                    }
                }
                for name in execs
                    .into_iter()
                    .take(crate::bucketed::queue::MAX_DEFINITIONS)
                {
                    changed |= d.entry(name).or_default().insert(from.to_string());
                }
                drop(d);
                if changed {
                    self.kick_all();
                }
            }
            Message::StatsOf(_) | Message::Stats(_) => {}
        }
    }

    fn on_ask(&self, _from: &str, message: Message) -> Option<Message> {
        match message {
            Message::StatsOf(exec) => Some(Message::Stats(self.statistics(&exec))),
            _ => None,
        }
    }

    fn owner_task(&self, partition: u32, handle: ServiceHandle<Self>) -> Option<OwnerTask> {
        let service = handle.service().clone();
        Some(Box::pin(service.owner_loop(partition, handle)))
    }

    fn snapshot(&self, partition: u32, _chunk_bytes: usize) -> Snapshot {
        let copy = self
            .part(partition)
            .map(|q| q.to_copy(grid_core::clock::now()))
            .unwrap_or_default();
        match grid_core::codec::encode(&copy) {
            Ok(bytes) => vec![bytes.into()],
            Err(e) => {
                tracing::error!(partition, error = %e, "bucket queues did not encode");
                Vec::new()
            }
        }
    }

    fn rebuild(&self, partition: u32, chunks: Vec<bytes::Bytes>) -> Result<Rebuilt, ExecError> {
        let copy: PartitionCopy = match chunks.first() {
            None => PartitionCopy::default(),
            Some(chunk) => grid_core::codec::decode(chunk)
                .map_err(|e| ExecError::BadCopy(format!("partition {partition}: {e}")))?,
        };
        Ok(Box::new(copy))
    }

    fn install(&self, partition: u32, rebuilt: Rebuilt) -> Result<(), ExecError> {
        let copy = rebuilt
            .downcast::<PartitionCopy>()
            .map_err(|_| ExecError::BadCopy("not bucket queues".into()))?;
        let queues = PartitionQueues::from_copy(*copy, grid_core::clock::now())?;
        *self.part(partition)? = queues;
        Ok(())
    }

    fn drop_partition(&self, partition: u32) {
        if let Ok(mut q) = self.part(partition) {
            *q = PartitionQueues::default();
        }
    }

    fn partition_len(&self, partition: u32) -> usize {
        self.part(partition).map_or(0, |q| q.len())
    }
}

impl LocalExec {
    pub(crate) fn new(settings: ExecSettings, processor: ErasedProcessor) -> Self {
        Self {
            settings,
            processor,
            dead_letter: Mutex::default(),
            stopped: AtomicBool::new(false),
            run: Mutex::default(),
        }
    }
}
