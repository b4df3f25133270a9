//! The member runtime: routes a service's operations to the partition's owner, runs them
//! one at a time per partition, replicates their changes to the synchronous backups before
//! answering, applies the tables the coordinator publishes, and (on the coordinator) moves
//! partitions when members come and go.
//!
//! # Layout
//! - [`service`]: the interface a partitioned service implements ([`PartitionService`]):
//!   typed operations, changes, answers, errors and messages; a context on every call;
//!   effects; hooks; owner tasks. Its docs hold a complete example service.
//! - `erased`: a service with its types erased to bytes, as the runtime holds it.
//! - `handle`: [`ServiceHandle`], a registered service's typed door to the runtime.
//! - `hooks`: carrying out services' effects; ownership, member and timer hooks; parked
//!   calls.
//! - `timers`: the services' timers as data (sans-IO, unit-tested).
//! - `coordinator`: the coordinator's decisions, without IO (sans-IO state machine).
//! - `driver`: the coordinator's IO — runs on the oldest data member.
//! - `replica`: the owner's and the backups' side of an operation; full syncs; migrations.
//! - `replica_rules`: what a table means for each partition, what a write's
//!   acknowledgements mean, freezes, the grace of migrated data (sans-IO, unit-tested).
//! - `replica_state`: one replica's state and the rules by which it takes or refuses the
//!   changes and copies others send it (sans-IO, unit-tested).
//! - `takeover`: when a member may coordinate (not while it sees only a minority of its
//!   table's members; sans-IO, unit-tested).
//! - `pause_guard`: how a member notices it was paused, and stops serving until the
//!   cluster's table confirms what it owns (sans-IO, unit-tested).
//! - `messages`: what the runtime sends between members.
//! - `background`: the lower-priority threads that rebuild partition copies.
//!
//! # Guarantees
//! - An operation on one partition runs alone on its owner; a change is applied on the owner
//!   only after every live backup acknowledged it, so a read (even a lock-free local one)
//!   never sees a write that a failure of the owner could lose.
//! - A caller sees the answer, a typed error, or a timeout. An answer means the change is on
//!   the owner and every live synchronous backup; when a backup did not confirm it, or the
//!   owner vanished mid-call, operations that are safe to repeat are retried within the
//!   deadline and others return [`GridError::Indeterminate`]. A retry after an unconfirmed
//!   backup answers with the first application's answer (a put's previous value); after an
//!   owner that vanished mid-call there is none, and the retry's answer is given (a put may
//!   then report its own value as the previous one, as Hazelcast's retried invocations do).
//!   Either way the retry applies the change again, after any change made in between.
//! - Reads right after an ownership change may briefly go to the old owner, which answers
//!   from its (complete) copy until the new table reaches it.
//! - A member paused past failure detection (SIGSTOP, a frozen VM) is declared failed and
//!   its backups take over. When it runs again it serves nothing as an owner until it has
//!   asked the others for their newest table (`pause_guard`), and whatever it still sends
//!   for partitions it no longer owns — changes, copies, repairs — carries the version of
//!   its table and is refused by members whose newer table names another owner
//!   (`replica_state`); the change it was making is then neither applied nor acknowledged.
//!   What this does not cover: a member cut off by the network (not paused) keeps serving
//!   reads from its copy until it hears of the new table, and with no live backup in its
//!   view it acknowledges writes alone. Closing that takes quorum leases, which the lock
//!   service brings.

mod background;
pub(crate) mod coordinator;
mod driver;
mod erased;
mod handle;
mod hooks;
pub(crate) mod messages;
mod pause_guard;
mod replica;
mod replica_rules;
mod replica_state;
pub mod service;
mod takeover;
mod timers;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::time::Instant;

use grid_net::membership::{Cluster, Member};
use grid_net::transport::Transport;
use grid_net::NetError;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

pub use coordinator::MigrationStats;
pub use service::{
    CallId, Ctx, Effects, OwnerTask, PartitionService, Prepared, Rebuilt, Reply, Role,
    ServiceHandle, Snapshot, TimerCommand,
};

use crate::partition::table::{Candidate, PartitionTable, TableConfig};
use crate::GridError;
use messages::{routes, OpRequest, OpResponse, TableMessage};
use pause_guard::PauseGuard;
use replica_rules::TableEffect;
use replica_state::ReplicaState;

/// Settings of the runtime.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Partition count, backups and placement.
    pub table: TableConfig,
    /// Default deadline of an operation, retries included (default 10 s).
    pub op_timeout: Duration,
    /// Deadline of one backup acknowledgement (default 5 s); a backup that misses it is
    /// resynchronised later.
    pub backup_timeout: Duration,
    /// Of the table's backups, how many (the last ranks) are asynchronous: sent every
    /// change in order, not waited for (default 0).
    pub async_backups: u8,
    /// Migrations run at once by the coordinator (default 8).
    pub max_parallel_migrations: usize,
    /// Size of the chunks partitions are copied in (default 1 MiB).
    pub chunk_bytes: usize,
    /// Time between anti-entropy passes (default 5 s).
    pub anti_entropy_interval: Duration,
    /// Scheduling of the threads that rebuild partition copies (default: the
    /// idle class; the member's `network.bulk_priority`).
    pub copy_priority: grid_net::bulk_runtime::BulkPriority,
    /// A gap this long in the member's own activity means it may have been paused past
    /// failure detection: it serves nothing as an owner until the cluster's newest table
    /// confirms it still owns its partitions (default 500 ms; keep it well below the
    /// failure detection time).
    pub pause_threshold: Duration,
    /// The largest copy of one partition of one service this member accepts (default
    /// 1 GiB): a larger one is refused as it arrives, before it is held in memory.
    pub max_partition_copy_bytes: usize,
    /// How long a member that sees only a minority of its table's members waits before it
    /// coordinates anyway (default 30 s; `None`: never). See `takeover`.
    pub minority_takeover: Option<Duration>,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            table: TableConfig::default(),
            op_timeout: Duration::from_secs(10),
            backup_timeout: Duration::from_secs(5),
            async_backups: 0,
            max_parallel_migrations: 8,
            chunk_bytes: 1024 * 1024,
            anti_entropy_interval: Duration::from_secs(5),
            copy_priority: grid_net::bulk_runtime::BulkPriority::Idle,
            pause_threshold: Duration::from_millis(500),
            max_partition_copy_bytes: 1 << 30,
            minority_takeover: Some(Duration::from_secs(30)),
        }
    }
}

/// Changes queued for this member as an asynchronous backup.
const ASYNC_BACKUP_QUEUE: usize = 65_536;
/// How often a member checks that it was not paused (see `pause_guard`).
const PAUSE_TICK: Duration = Duration::from_millis(100);

struct ServiceSlot {
    service: Arc<dyn erased::ErasedService>,
    name: Arc<str>,
    replicas: Vec<tokio::sync::Mutex<ReplicaState>>,
    /// The version of the last change applied on the owner, per partition, for the
    /// context of lock-free reads.
    applied: Vec<std::sync::atomic::AtomicU64>,
    /// The owner tasks running for owned partitions.
    owner_tasks: Mutex<HashMap<u32, tokio::task::AbortHandle>>,
}

#[derive(Default)]
struct PartitionCtl {
    /// Frozen for a handoff (since the table of this version) until a table gives the
    /// partition to another member, or the deadline passes.
    frozen: Mutex<Option<(u64, Instant)>>,
    /// Members being filled by a migration: they get every change, like backups.
    extras: Mutex<Vec<(Arc<str>, Instant)>>,
}

/// Why an operation is retried while its owner confirms its ownership after a pause.
const CONFIRMING: &str = "the owner is confirming its ownership after a pause";
const BACKUP_GONE: &str =
    "a synchronous backup of the partition is not a live member; waiting for the next table";
/// At most this many members are asked for their table after a pause.
const CONFIRM_FANOUT: usize = 16;
/// How long a member waits for their answers.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(1);

/// Turns the pause guard every `PAUSE_TICK` for the life of the runtime, and confirms the
/// member's ownership whenever it finds a gap.
async fn pause_watch(weak: std::sync::Weak<Inner>) {
    let mut tick = tokio::time::interval(PAUSE_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = weak.upgrade() else { return };
        let rt = Runtime { inner };
        let turn = rt.with_pause_guard(|g| g.turn(Instant::now()));
        if turn == pause_guard::Turn::Gap {
            warn!(member = %rt.inner.me, "this member was paused or starved: confirming its ownership before it serves again");
            metrics::counter!("grid_pauses_detected_total").increment(1);
        }
        if turn != pause_guard::Turn::Serving
            && !rt
                .inner
                .confirming
                .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            tokio::spawn(async move {
                rt.confirm_ownership().await;
                rt.inner
                    .confirming
                    .store(false, std::sync::atomic::Ordering::SeqCst);
            });
        }
    }
}

/// What the coordinator is doing, as seen from its member.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CoordinatorStatus {
    /// Whether this member is the coordinator.
    pub active: bool,
    /// Whether the published table is the target one (no migration pending).
    pub settled: bool,
    /// Migration counters since this member became coordinator.
    pub stats: MigrationStats,
}

pub(crate) struct Inner {
    transport: Transport,
    cluster: Cluster,
    me: Arc<str>,
    config: RuntimeConfig,
    table: watch::Sender<Arc<PartitionTable>>,
    services: RwLock<HashMap<String, Arc<ServiceSlot>>>,
    partitions: Vec<PartitionCtl>,
    status: watch::Sender<CoordinatorStatus>,
    /// Who published the table we apply (a newly joined member adopts its coordinator's).
    table_source: Mutex<Option<Arc<str>>>,
    drains: mpsc::Sender<(Arc<str>, oneshot::Sender<()>)>,
    moved: Mutex<Copies>,
    /// Changes for this member as an asynchronous backup, applied in arrival order.
    async_in: mpsc::Sender<(Arc<str>, messages::BackupRequest)>,
    /// Where copies are rebuilt.
    background: background::Background,
    /// Backup requests still to refuse (fault injection for tests).
    refuse_backups: std::sync::atomic::AtomicU64,
    /// Whether this member may act as an owner (see `pause_guard`); turned by one task.
    pause: Mutex<PauseGuard>,
    /// What `pause` says, for the operations' hot path: until when (nanoseconds after
    /// `started`) this member may serve as an owner; 0 while it confirms a pause.
    serving_until_ns: std::sync::atomic::AtomicU64,
    /// When the runtime started: the origin of `serving_until_ns`.
    started: Instant,
    /// A confirmation of ownership after a pause is under way.
    confirming: std::sync::atomic::AtomicBool,
    /// The services' timers, and a nudge for the task that fires them.
    timers: Mutex<timers::Timers>,
    timers_changed: Arc<tokio::sync::Notify>,
    /// Calls waiting on this member for a service to wake them.
    parked: Mutex<HashMap<CallId, hooks::Parked>>,
    /// The next [`CallId`].
    next_call: std::sync::atomic::AtomicU64,
}

/// A member's partition runtime as it reports itself: locally with [`Runtime::status`], from
/// any member (lite ones too) with [`Runtime::member_status`]. What a dashboard or a
/// harness running members as separate processes watches.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemberStatus {
    /// The member's id.
    pub member: String,
    /// Version of the table the member routes by.
    pub table_version: u64,
    /// Data members in that table.
    pub table_members: usize,
    /// Members (data and lite) the member sees alive, itself included.
    pub cluster_members: usize,
    /// Partitions the member owns in that table.
    pub primaries: usize,
    /// The coordinator's state, when this member is the coordinator.
    pub coordinator: CoordinatorStatus,
    /// Entries and bytes the member copied out in migrations and syncs.
    pub moved_entries: u64,
    /// See `moved_entries`.
    pub moved_bytes: u64,
    /// [`Runtime::copy_window`] as wall-clock microseconds since the Unix epoch (comparable
    /// across processes on one machine).
    pub copy_window_unix_us: (Option<u64>, Option<u64>),
}

/// `at` as wall-clock microseconds since the Unix epoch.
fn unix_us(at: Instant) -> u64 {
    let back = Instant::now().saturating_duration_since(at).as_micros() as u64;
    (crate::clock::unix_ms() * 1000).saturating_sub(back)
}

/// What a member copied out (migrations and syncs), and when.
#[derive(Debug, Default)]
struct Copies {
    entries: u64,
    bytes: u64,
    /// When the first copy started.
    first_start: Option<Instant>,
    /// When the last copy ended (successfully or not).
    last_end: Option<Instant>,
}

/// A member's partition runtime. Cheap to clone.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("member", &self.inner.me)
            .field("table_version", &self.table().version())
            .finish()
    }
}

/// What an operation does, which decides how the runtime runs and retries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// Reads only: runs without waiting for the partition's queue (a change becomes
    /// visible only once acknowledged, so a read never sees a write that could be lost);
    /// retried freely.
    Read,
    /// Changes state, and repeating it alone leaves the same state (a plain set). Retried,
    /// like every write, only when the attempt certainly did not happen: a set repeated
    /// after another caller's write would undo that write, so an attempt whose outcome is
    /// unknown is reported as [`GridError::Indeterminate`] here too (the simulator's
    /// linearizability checker found the repeat: seed 3 of the cache workload).
    IdempotentWrite,
    /// Changes state and must not run twice (an increment, a put-if-absent): when the owner
    /// vanishes mid-call the caller gets [`GridError::Indeterminate`].
    Write,
}

/// How a call went, before retries.
enum Attempt {
    Done(Vec<u8>),
    Failed(String),
    Retry(String),
    Indeterminate(String),
    /// Applied on the owner but not confirmed by a backup.
    Unreplicated(String),
}

/// The first [`CallId`] of a member: call ids are recorded in replicated state (a parked
/// lock request) and outlive their owner's ownership, so two members, or two generations
/// of one, must not hand out the same ones. The top 24 bits come from the member's id and
/// generation, the low 40 count its calls (a trillion before they could wrap into
/// another member's range).
fn first_call_id(me: &str, generation: u64) -> u64 {
    let mut seed = me.as_bytes().to_vec();
    seed.extend_from_slice(&generation.to_le_bytes());
    (xxhash_rust::xxh3::xxh3_64(&seed) >> 40 << 40) | 1
}

/// A one-member runtime on loopback with `partitions` partitions, for the runnable
/// examples of the documentation (keep the node: dropping it stops the member).
#[doc(hidden)]
pub async fn single_member_runtime_for_docs(
    partitions: u32,
) -> Result<(Runtime, grid_net::node::Node), GridError> {
    let mut config = crate::GridConfig::default();
    config.partitions.count = partitions;
    config.partitions.backups = 0;
    let node = grid_net::node::Node::start(config.to_net_config()).await?;
    let runtime = Runtime::start(
        node.transport().clone(),
        node.cluster().clone(),
        config.runtime_config(),
    );
    Ok((runtime, node))
}

impl Runtime {
    /// Starts the runtime on a member's transport and membership. Registers its routes and
    /// the coordinator duty (active while this member is the oldest data member).
    pub fn start(transport: Transport, cluster: Cluster, config: RuntimeConfig) -> Self {
        let me: Arc<str> = cluster.local_member().id.clone();
        let cluster_generation = cluster.local_member().generation;
        let partitions = config.table.partitions;
        let (drain_tx, drain_rx) = mpsc::channel(64);
        let (async_tx, mut async_rx) = mpsc::channel(ASYNC_BACKUP_QUEUE);
        let started = Instant::now();
        let inner = Arc::new(Inner {
            transport,
            cluster,
            me: me.clone(),
            table: watch::Sender::new(Arc::new(PartitionTable::empty(partitions))),
            services: RwLock::new(HashMap::new()),
            partitions: (0..partitions).map(|_| PartitionCtl::default()).collect(),
            status: watch::Sender::new(CoordinatorStatus::default()),
            table_source: Mutex::new(None),
            drains: drain_tx,
            moved: Mutex::new(Copies::default()),
            async_in: async_tx,
            background: background::Background::start(
                &me,
                grid_net::bulk_runtime::bulk_threads(),
                config.copy_priority,
            ),
            refuse_backups: Default::default(),
            pause: Mutex::new(PauseGuard::new(config.pause_threshold, started)),
            serving_until_ns: std::sync::atomic::AtomicU64::new(
                config.pause_threshold.as_nanos() as u64
            ),
            started,
            confirming: Default::default(),
            timers: Mutex::new(timers::Timers::default()),
            timers_changed: Arc::new(tokio::sync::Notify::new()),
            parked: Mutex::new(HashMap::new()),
            next_call: std::sync::atomic::AtomicU64::new(first_call_id(&me, cluster_generation)),
            config,
        });
        let rt = Self { inner };
        rt.register_routes();
        let weak = Arc::downgrade(&rt.inner);
        tokio::spawn(async move {
            while let Some((sender, req)) = async_rx.recv().await {
                let Some(inner) = weak.upgrade() else { return };
                Self { inner }.on_async_backup(&sender, req).await;
            }
        });
        tokio::spawn(driver::run(Arc::downgrade(&rt.inner), drain_rx));
        tokio::spawn(pause_watch(Arc::downgrade(&rt.inner)));
        tokio::spawn(hooks::fire_timers(Arc::downgrade(&rt.inner)));
        tokio::spawn(hooks::follow_departures(Arc::downgrade(&rt.inner)));
        tokio::spawn(replica::anti_entropy_loop(
            Arc::downgrade(&rt.inner),
            rt.inner.config.anti_entropy_interval,
        ));
        rt
    }

    /// Registers a partitioned service and returns its handle. Every data member must
    /// register the same services. Partitions this member already owns are announced to
    /// it ([`PartitionService::on_owned`]) at once.
    pub fn register_service<S: PartitionService>(&self, service: Arc<S>) -> ServiceHandle<S> {
        let partitions = self.inner.config.table.partitions;
        let slot = ServiceSlot {
            replicas: (0..partitions)
                .map(|_| tokio::sync::Mutex::new(ReplicaState::default()))
                .collect(),
            applied: (0..partitions).map(|_| Default::default()).collect(),
            owner_tasks: Mutex::new(HashMap::new()),
            name: Arc::from(service.name()),
            service: Arc::new(erased::Typed(service.clone())),
        };
        let name = slot.service.name().to_string();
        self.inner
            .services
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name, Arc::new(slot));
        let table = self.table();
        for p in 0..partitions {
            if table.owner(p) == Some(&self.inner.me) {
                let rt = self.clone();
                tokio::spawn(async move { rt.ownership_changed(p).await });
            }
        }
        ServiceHandle::new(self.clone(), service)
    }

    /// Makes this member refuse the next `n` changes it gets as a backup, as a backup that
    /// did not answer in time would. For tests of unconfirmed writes.
    #[doc(hidden)]
    pub fn refuse_next_backups_for_tests(&self, n: u64) {
        self.inner
            .refuse_backups
            .store(n, std::sync::atomic::Ordering::SeqCst);
    }

    /// Throws away this member's copy of `partition` (every service) and its version, as a
    /// backup that missed changes would be. For tests of anti-entropy.
    #[doc(hidden)]
    pub async fn forget_replica_for_tests(&self, partition: u32) {
        for slot in self.slots() {
            let mut st = slot.replicas[partition as usize].lock().await;
            slot.service.drop_partition(partition);
            st.version = 0;
        }
    }

    /// This member's version of `partition` of `service` (0 for none): for tests that wait
    /// for a replica to catch up. (Per service: another service's idle partition stays at
    /// version 0 whatever happens to this one.)
    #[doc(hidden)]
    pub async fn replica_version_for_tests(&self, service: &str, partition: u32) -> u64 {
        match self.slot(service) {
            Some(slot) => slot.replicas[partition as usize].lock().await.version,
            None => 0,
        }
    }

    /// Waits (at most 10 s) until `partition` has an owner in this member's table and, if
    /// that is this member, until the services were told (`on_owned`).
    pub async fn wait_for_owner(&self, partition: u32) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut table = self.watch_table();
        loop {
            let owner = self.table().owner(partition).cloned();
            if let Some(owner) = owner {
                if owner != self.inner.me {
                    return true;
                }
                let mut hooked = true;
                for slot in self.slots() {
                    hooked &= slot.replicas[partition as usize].lock().await.hooked;
                }
                if hooked {
                    return true;
                }
            }
            let wait = tokio::time::timeout_at(deadline, async {
                tokio::select! {
                    _ = table.changed() => {}
                    _ = tokio::time::sleep(Duration::from_millis(5)) => {}
                }
            });
            if wait.await.is_err() {
                return false;
            }
        }
    }

    /// The partition of an encoded key.
    pub fn partition_of(&self, key: &[u8]) -> u32 {
        crate::partition::partition_of(key, self.inner.config.table.partitions)
    }

    /// The newest table this member applied.
    pub fn table(&self) -> Arc<PartitionTable> {
        self.inner.table.borrow().clone()
    }

    /// A watch of the applied table.
    pub fn watch_table(&self) -> watch::Receiver<Arc<PartitionTable>> {
        self.inner.table.subscribe()
    }

    /// Whether this member owns `partition` in its table and may serve it: not while it
    /// confirms its ownership after a pause (for lock-free local reads).
    pub fn owns(&self, partition: u32) -> bool {
        self.table()
            .owner(partition)
            .is_some_and(|o| *o == self.inner.me)
            && self.may_serve()
    }

    /// Whether this member may act as an owner now: it was not paused, or the cluster's
    /// table has since confirmed what it owns (see `pause_guard`).
    fn may_serve(&self) -> bool {
        let now = self.inner.started.elapsed().as_nanos() as u64;
        now <= self
            .inner
            .serving_until_ns
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Changes the pause guard and publishes what it then says (see `serving_until_ns`).
    fn with_pause_guard<T>(&self, change: impl FnOnce(&mut PauseGuard) -> T) -> T {
        let mut guard = self.inner.pause.lock().unwrap_or_else(|e| e.into_inner());
        let out = change(&mut guard);
        let until = guard.serving_until().map_or(0, |u| {
            u.saturating_duration_since(self.inner.started).as_nanos() as u64
        });
        self.inner
            .serving_until_ns
            .store(until, std::sync::atomic::Ordering::Release);
        out
    }

    /// This member saw a majority of its recent tables' members fail (see `takeover`): it
    /// may be the one cut off, and serves nothing as an owner until a table asked for once
    /// it sees a majority again confirms what it owns (the pause guard's confirmation).
    pub(super) fn suspect_isolation(&self) {
        self.with_pause_guard(|g| g.suspect(Instant::now()));
    }

    /// After a pause: asks the other members for their tables, applies the newest, and
    /// lifts the suspicion once one answered (or there is nobody to ask).
    async fn confirm_ownership(&self) {
        let asked_at = Instant::now();
        let others: Vec<Member> = self
            .inner
            .cluster
            .members()
            .iter()
            .filter(|m| m.id != self.inner.me)
            .take(CONFIRM_FANOUT)
            .cloned()
            .collect();
        let asks = others.iter().map(|m| {
            let transport = self.inner.transport.clone();
            async move {
                let got: Result<TableMessage, _> = transport
                    .request_typed(m.addr, routes::TABLE_GET, &(), CONFIRM_TIMEOUT)
                    .await;
                got.ok().map(|t| (m.id.clone(), t.table))
            }
        });
        let answers: Vec<_> = futures::future::join_all(asks)
            .await
            .into_iter()
            .flatten()
            .collect();
        if others.is_empty() && self.table().members().len() > 1 {
            // Alone in its view while its table names others: cut off, or they all died.
            // Wait for them, or for a table without them (see `takeover`).
            debug!("no other member to confirm this member's table with; asking again");
            return;
        }
        if !others.is_empty() && answers.is_empty() {
            debug!("nobody confirmed this member's table after a pause; asking again");
            return;
        }
        let answered: Vec<Arc<str>> = answers.iter().map(|(m, _)| m.clone()).collect();
        for (source, table) in answers {
            if let Some(table) = table {
                self.apply_table_from(&source, table);
            }
        }
        // Confirmed only by a strict majority of the table's members (this one counted):
        // two members cut off together must not confirm each other (seed 18 of the
        // executor's workload: both kept serving as owner and backup of the same
        // partitions, on the minority side). Tables of one or two members are exempt, as
        // in the takeover gate.
        let table = self.table();
        let members = table.members();
        if members.len() > 2 {
            let votes = 1 + answered
                .iter()
                .filter(|m| **m != self.inner.me && members.contains(m))
                .count();
            if votes * 2 <= members.len() {
                debug!(
                    votes,
                    members = members.len(),
                    table = table.version(),
                    "a minority of the table's members answered; not confirmed"
                );
                return;
            }
        }
        info!(member = %self.inner.me, table = self.table().version(), "ownership confirmed after a pause");
        self.with_pause_guard(|g| g.confirmed(asked_at));
    }

    /// This member's id.
    pub fn member_id(&self) -> &Arc<str> {
        &self.inner.me
    }

    /// The runtime's settings.
    pub fn config(&self) -> &RuntimeConfig {
        &self.inner.config
    }

    /// The coordinator's status (meaningful on the coordinator).
    pub fn coordinator_status(&self) -> CoordinatorStatus {
        self.inner.status.borrow().clone()
    }

    /// Entries and bytes this member copied out in migrations and syncs.
    pub fn moved(&self) -> (u64, u64) {
        let c = self.inner.moved.lock().unwrap_or_else(|e| e.into_inner());
        (c.entries, c.bytes)
    }

    /// When this member started its first partition copy (migration or sync) and ended its
    /// last: a rebalance's copying window is the earliest start to the latest end over the
    /// members, the denominator of its data rate (finding a joining member before it and
    /// settling the table after it are not copying).
    pub fn copy_window(&self) -> (Option<Instant>, Option<Instant>) {
        let c = self.inner.moved.lock().unwrap_or_else(|e| e.into_inner());
        (c.first_start, c.last_end)
    }

    /// Forgets the copying window (a harness measuring one rebalance calls this first).
    pub fn reset_copy_window(&self) {
        let mut c = self.inner.moved.lock().unwrap_or_else(|e| e.into_inner());
        c.first_start = None;
        c.last_end = None;
    }

    /// This member's status.
    pub fn status(&self) -> MemberStatus {
        let table = self.table();
        let (moved_entries, moved_bytes) = self.moved();
        let (first, last) = self.copy_window();
        MemberStatus {
            member: self.inner.me.to_string(),
            table_version: table.version(),
            table_members: table.members().len(),
            cluster_members: self.inner.cluster.members().len(),
            primaries: table.primaries_of(&self.inner.me),
            coordinator: self.coordinator_status(),
            moved_entries,
            moved_bytes,
            copy_window_unix_us: (first.map(unix_us), last.map(unix_us)),
        }
    }

    fn status_then_reset(&self, reset_copy_window: bool) -> MemberStatus {
        let status = self.status();
        if reset_copy_window {
            self.reset_copy_window();
        }
        status
    }

    /// The status of the live member `member` (this one included), asked over the network;
    /// with `reset_copy_window` the member then forgets its copying window. (Example on
    /// `grid::Grid::member_status`.)
    pub async fn member_status(
        &self,
        member: &str,
        reset_copy_window: bool,
    ) -> Result<MemberStatus, GridError> {
        if *member == *self.inner.me {
            return Ok(self.status_then_reset(reset_copy_window));
        }
        let m = self
            .inner
            .cluster
            .member(member)
            .ok_or_else(|| GridError::Service(format!("{member} is not a live member")))?;
        Ok(self
            .inner
            .transport
            .request_typed(
                m.addr,
                routes::STATUS,
                &reset_copy_window,
                Duration::from_secs(5),
            )
            .await?)
    }

    /// Runs `op` of `service` on `partition`'s owner and returns the service's answer.
    pub async fn execute(
        &self,
        service: &str,
        partition: u32,
        op: Vec<u8>,
        kind: OpKind,
    ) -> Result<Vec<u8>, GridError> {
        // Only a read may be repeated after an attempt whose outcome is unknown (see
        // `OpKind::IdempotentWrite`).
        let read = kind == OpKind::Read;
        let started = Instant::now();
        let deadline = started + self.inner.config.op_timeout;
        // Made at the first retry: most operations need none.
        let mut backoff: Option<grid_net::backoff::Backoff> = None;
        let req = OpRequest {
            service: service.to_string(),
            partition,
            op,
            read_only: read,
        };
        loop {
            let why = match self.attempt(&req, deadline).await {
                Attempt::Done(answer) => {
                    metrics::histogram!("grid_op_seconds").record(started.elapsed().as_secs_f64());
                    return Ok(answer);
                }
                Attempt::Failed(e) => return Err(GridError::Service(e)),
                // Only a read may be repeated after an attempt whose outcome is unknown; a
                // write applied on the owner but not confirmed by a backup is one too (see
                // `OpKind::IdempotentWrite`).
                Attempt::Indeterminate(e) | Attempt::Unreplicated(e) if !read => {
                    return Err(GridError::Indeterminate(e))
                }
                Attempt::Indeterminate(why) | Attempt::Retry(why) | Attempt::Unreplicated(why) => {
                    why
                }
            };
            let backoff = backoff.get_or_insert_with(|| {
                grid_net::backoff::Backoff::new(
                    Duration::from_millis(1),
                    Duration::from_millis(50),
                    self.inner
                        .next_call
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                )
            });
            let Some(delay) = backoff.next_delay_before(deadline) else {
                return Err(GridError::Timeout {
                    after: started.elapsed(),
                    last: why,
                });
            };
            debug!(partition, %why, "retrying operation");
            // A new table is the usual reason to try again: don't sleep past it.
            let mut table = self.inner.table.subscribe();
            tokio::select! {
                _ = table.changed() => {}
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    async fn attempt(&self, req: &OpRequest, deadline: Instant) -> Attempt {
        let table = self.table();
        let Some(owner) = table.owner(req.partition).cloned() else {
            return Attempt::Retry(format!("partition {} has no owner yet", req.partition));
        };
        if owner == self.inner.me {
            let local = self.execute_local(
                &req.service,
                req.partition,
                &req.op,
                req.read_only,
                self.inner.me.clone(),
            );
            // A read never waits (it takes no lock): only a write is bounded by the deadline
            // (a timer per operation costs the timer wheel a lock each way).
            let response = if req.read_only {
                local.await
            } else {
                match tokio::time::timeout_at(deadline, local).await {
                    Ok(response) => response,
                    // The write goes on in its own task; a parked call is abandoned.
                    Err(_) => {
                        return Attempt::Indeterminate("no answer before the deadline".into())
                    }
                }
            };
            return match response {
                OpResponse::Ok(a) => Attempt::Done(a),
                OpResponse::Failed(e) => Attempt::Failed(e),
                OpResponse::WrongOwner { .. } => Attempt::Retry("ownership moved".into()),
                OpResponse::Frozen => Attempt::Retry("partition is changing hands".into()),
                OpResponse::Confirming => Attempt::Retry(CONFIRMING.into()),
                OpResponse::BackupGone => Attempt::Retry(BACKUP_GONE.into()),
                OpResponse::Unreplicated { why, .. } => Attempt::Unreplicated(why),
            };
        }
        let Some(member) = self.inner.cluster.member(&owner) else {
            return Attempt::Retry(format!("owner {owner} is not a live member"));
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        let answer: Result<OpResponse, NetError> = self
            .inner
            .transport
            .request_typed(member.addr, routes::OP, req, remaining)
            .await;
        match answer {
            Ok(OpResponse::Ok(a)) => Attempt::Done(a),
            Ok(OpResponse::Failed(e)) => Attempt::Failed(e),
            Ok(OpResponse::WrongOwner { table_version }) => {
                if table_version > table.version() {
                    self.fetch_table_from(&member).await;
                }
                Attempt::Retry(format!(
                    "{owner} is not the owner (its table {table_version})"
                ))
            }
            Ok(OpResponse::Frozen) => Attempt::Retry("partition is changing hands".into()),
            Ok(OpResponse::Confirming) => Attempt::Retry(CONFIRMING.into()),
            Ok(OpResponse::BackupGone) => Attempt::Retry(BACKUP_GONE.into()),
            Ok(OpResponse::Unreplicated { why, .. }) => Attempt::Unreplicated(why),
            Err(NetError::Unreachable { reason, .. }) => Attempt::Retry(reason),
            Err(NetError::Refused { reason, .. }) => Attempt::Retry(reason),
            Err(NetError::ShuttingDown) => Attempt::Failed("this member is shutting down".into()),
            Err(e @ (NetError::ConnectionLost { .. } | NetError::Timeout { .. })) => {
                Attempt::Indeterminate(e.to_string())
            }
            Err(NetError::Remote(e)) => Attempt::Failed(e),
            Err(e) => Attempt::Failed(e.to_string()),
        }
    }

    /// Sends a typed request on `route` to the live member `member` (by id) as a nested
    /// request (`Transport::request_typed_nested`): a migration's catch-up is sent while serving
    /// the coordinator's request, and the coordinator's own requests (migrate, freeze) are
    /// better off not queueing behind crowds of callers' operations either.
    pub(crate) async fn ask<Req, Resp>(
        &self,
        member: &str,
        route: &str,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, String>
    where
        Req: serde::Serialize,
        Resp: serde::de::DeserializeOwned,
    {
        let m = self
            .inner
            .cluster
            .member(member)
            .ok_or_else(|| format!("{member} is not a live member"))?;
        self.inner
            .transport
            .request_typed_nested(m.addr, route, req, timeout)
            .await
            .map_err(|e| e.to_string())
    }

    async fn fetch_table_from(&self, member: &Member) {
        let got: Result<TableMessage, _> = self
            .inner
            .transport
            .request_typed(member.addr, routes::TABLE_GET, &(), Duration::from_secs(2))
            .await;
        if let Ok(TableMessage { table: Some(t) }) = got {
            self.apply_table_from(&member.id, t);
        }
    }

    /// Applies a table sent by `source` if it is newer than ours — or if `source` is the
    /// coordinator (the oldest data member) and ours came from elsewhere: a member that
    /// started alone coordinated a table of its own, and adopts the cluster's when it joins
    /// (what it stored while alone is discarded; grid does not merge split clusters yet).
    pub(crate) fn apply_table_from(&self, source: &Arc<str>, table: PartitionTable) {
        // A table from a peer is input like any other: wrong shapes are refused, not applied.
        if table.partitions() != self.inner.config.table.partitions
            || table.version() == u64::MAX
            || table.check_structure().is_err()
        {
            warn!(%source, version = table.version(), "malformed partition table ignored");
            return;
        }
        let coordinator = self
            .inner
            .cluster
            .members()
            .iter()
            .find(|m| m.is_data_member())
            .map(|m| m.id.clone());
        let mut current = self
            .inner
            .table_source
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // Adopting an older table is only for a member whose table is its own (it started
        // alone) meeting the cluster's coordinator. Not for a coordinator whose table names
        // others: after a split, the side that coordinated its own tables would swap its
        // newer table for the other side's older one and drop data (seed 18 of the
        // executor's workload); tables are ordered by version alone, and a coordinator
        // that takes over starts far ahead of the one before (`first_version_of_term`).
        let alone = self.table().members().iter().all(|m| *m == self.inner.me);
        let own = alone && current.as_ref().is_none_or(|c| *c == self.inner.me);
        let from_coordinator = *source != self.inner.me && coordinator.as_ref() == Some(source);
        // Two tables of one version: two members coordinated at once (members that formed
        // a cluster before they saw an older one, each publishing its first table). Equal
        // versions are never "newer", so without this the two groups keep their tables
        // for ever (locks workload, seeds 68, 132, 242: the cluster never formed); the
        // coordinator's wins.
        let tie = {
            let ours = self.table();
            table.version() == ours.version() && table != *ours
        };
        let adopt = from_coordinator && (own || tie);
        if table.version() > self.table().version() || adopt {
            *current = Some(source.clone());
            drop(current);
            self.apply_table(table, adopt);
        }
    }

    /// Applies a table if it is newer than ours (or `force`): drops the partitions this
    /// member no longer holds, lifts freezes the table supersedes. `force` adopts the
    /// cluster's table in place of one this member made alone: what it stored alone is
    /// discarded, epochs and versions included (they count in another history, and a copy
    /// from the cluster would look older than them).
    pub(crate) fn apply_table(&self, table: PartitionTable, force: bool) {
        let me = self.inner.me.clone();
        let new = Arc::new(table);
        // Compare and install in one step: two tables applied at once must not leave the
        // older one installed.
        let mut old = None;
        self.inner.table.send_if_modified(|current| {
            if new.version() <= current.version() && !force {
                return false;
            }
            old = Some(std::mem::replace(current, new.clone()));
            true
        });
        let Some(old) = old else { return };
        info!(member = %me, version = new.version(), owned = new.primaries_per_member().get(&me).copied().unwrap_or(0), "partition table applied");
        metrics::gauge!("grid_partition_table_version").set(new.version() as f64);
        let owned = new.primaries_per_member().get(&me).copied().unwrap_or(0);
        metrics::gauge!("grid_partitions_owned").set(owned as f64);
        let held = (0..new.partitions())
            .filter(|p| new.rank_of(*p, &me).is_some())
            .count();
        metrics::gauge!("grid_partition_replicas_held").set(held as f64);
        let now = Instant::now();
        for p in 0..new.partitions() {
            let ctl = &self.inner.partitions[p as usize];
            ctl.extras
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|(m, since)| replica_rules::keep_extra_target(&new, p, m, *since, now));
            let frozen = ctl
                .frozen
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some();
            // Only partitions whose replica set changed for this member need work (a task
            // each): tables come often during a rebalance, partitions are many.
            for effect in replica_rules::on_table(&old, &new, p, &me, force, frozen) {
                let rt = self.clone();
                match effect {
                    TableEffect::Unfreeze => {
                        *ctl.frozen.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    }
                    TableEffect::OwnershipChanged => {
                        tokio::spawn(async move { rt.ownership_changed(p).await });
                    }
                    TableEffect::Discard => {
                        tokio::spawn(async move { rt.discard_partition(p).await });
                    }
                    TableEffect::Drop => {
                        tokio::spawn(async move { rt.drop_partition(p, true).await });
                    }
                    TableEffect::ConfirmIncoming => {
                        tokio::spawn(async move { rt.confirm_partition(p, now).await });
                    }
                }
            }
        }
    }

    /// Forgets a partition this member no longer holds — but not data a migration brought
    /// in for a table still to come (unless it waited too long for it).
    async fn drop_partition(&self, p: u32, was_replica: bool) {
        for slot in self.slots() {
            let mut st = slot.replicas[p as usize].lock().await;
            let is_replica = self.table().rank_of(p, &self.inner.me).is_some();
            if replica_rules::may_drop(was_replica, is_replica, st.incoming_since, Instant::now()) {
                debug!(member = %self.inner.me, partition = p, table = self.table().version(), "dropping partition");
                slot.service.drop_partition(p);
                st.reset();
            }
        }
    }

    /// Forgets everything this member holds of `p`, whatever the table says.
    async fn discard_partition(&self, p: u32) {
        for slot in self.slots() {
            let mut st = slot.replicas[p as usize].lock().await;
            slot.service.drop_partition(p);
            st.reset();
        }
    }

    /// A table applied at `applied_at` lists this member as a replica of `p`: data a
    /// migration brought in before it is now ordinary replica data. (Data synced in after
    /// it may be meant for a later table, and stays marked.)
    async fn confirm_partition(&self, p: u32, applied_at: Instant) {
        for slot in self.slots() {
            let mut st = slot.replicas[p as usize].lock().await;
            if st.incoming_since.is_some_and(|t| t <= applied_at)
                && self.table().rank_of(p, &self.inner.me).is_some()
            {
                st.incoming_since = None;
            }
        }
    }

    fn slots(&self) -> Vec<Arc<ServiceSlot>> {
        let services = self
            .inner
            .services
            .read()
            .unwrap_or_else(|e| e.into_inner());
        let mut slots: Vec<_> = services.values().cloned().collect();
        slots.sort_by(|a, b| a.service.name().cmp(b.service.name()));
        slots
    }

    fn slot(&self, name: &str) -> Option<Arc<ServiceSlot>> {
        self.inner
            .services
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    fn register_routes(&self) {
        let t = &self.inner.transport;
        let rt = self.clone();
        t.on_request_typed(routes::OP, move |peer, req: OpRequest| {
            let rt = rt.clone();
            async move {
                if req.partition >= rt.inner.config.table.partitions {
                    return Err(format!("no partition {}", req.partition));
                }
                Ok(rt
                    .execute_local(
                        &req.service,
                        req.partition,
                        &req.op,
                        req.read_only,
                        peer.member_id.clone(),
                    )
                    .await)
            }
        });
        let weak = Arc::downgrade(&self.inner);
        t.on_message(routes::SERVICE_MESSAGE, move |peer, body| {
            let Some(inner) = weak.upgrade() else { return };
            let rt = Self { inner };
            let message = match grid_net::codec::decode::<messages::ServiceMessage>(&body) {
                Ok(m) => m,
                Err(e) => {
                    warn!(peer = %peer.member_id, error = %e, "undecodable service message dropped");
                    return;
                }
            };
            let Some(slot) = rt.slot(&message.service) else {
                debug!(peer = %peer.member_id, service = %message.service, "message for a service not on this member dropped");
                return;
            };
            if let Err(e) = slot.service.on_message(&peer.member_id, &message.body) {
                warn!(peer = %peer.member_id, service = %message.service, error = %e, "undecodable service message dropped");
            }
        });
        let rt = self.clone();
        t.on_request_typed(
            routes::SERVICE_ASK,
            move |peer, ask: messages::ServiceMessage| {
                let rt = rt.clone();
                async move {
                    let slot = rt
                        .slot(&ask.service)
                        .ok_or_else(|| format!("no service {:?} on this member", ask.service))?;
                    let body = slot.service.on_ask(&peer.member_id, &ask.body)?;
                    Ok::<_, String>(messages::ServiceMessage {
                        service: ask.service,
                        body,
                    })
                }
            },
        );
        let rt = self.clone();
        t.on_request_typed(routes::BACKUP, move |peer, req: messages::BackupRequest| {
            let rt = rt.clone();
            async move { rt.on_backup(&peer.member_id, req).await }
        });
        let weak = Arc::downgrade(&self.inner);
        t.on_message(routes::BACKUP_ASYNC, move |peer, body| {
            let Some(inner) = weak.upgrade() else { return };
            match grid_net::codec::decode::<messages::BackupRequest>(&body) {
                Ok(req) => {
                    if inner
                        .async_in
                        .try_send((peer.member_id.clone(), req))
                        .is_err()
                    {
                        // Anti-entropy repairs what a full queue drops.
                        metrics::counter!("grid_async_backups_dropped_total").increment(1);
                        debug!(peer = %peer.member_id, "asynchronous backup queue full; change dropped");
                    }
                }
                Err(e) => {
                    warn!(peer = %peer.member_id, error = %e, "undecodable asynchronous backup dropped")
                }
            }
        });
        let rt = self.clone();
        t.on_bulk(routes::SYNC, move |peer, header, chunks| {
            let rt = rt.clone();
            async move { rt.on_sync(&peer.member_id, header, chunks).await }
        });
        let rt = self.clone();
        t.on_request_typed(routes::TABLE_PUSH, move |peer, msg: TableMessage| {
            let rt = rt.clone();
            async move {
                if let Some(t) = msg.table {
                    if t.partitions() != rt.inner.config.table.partitions {
                        return Err("partition count differs".to_string());
                    }
                    rt.apply_table_from(&peer.member_id, t);
                }
                Ok(())
            }
        });
        let rt = self.clone();
        t.on_request_typed(routes::TABLE_GET, move |_peer, (): ()| {
            let rt = rt.clone();
            async move {
                let table = rt.table();
                Ok(TableMessage {
                    table: (table.version() > 0).then(|| (*table).clone()),
                })
            }
        });
        let rt = self.clone();
        t.on_request_typed(
            routes::MIGRATE,
            move |_peer, req: messages::MigrateRequest| {
                let rt = rt.clone();
                // In a task of its own: the transport drops a handler whose caller gave
                // up, and a migration half done (its change log started) should finish.
                async move {
                    tokio::spawn(async move { rt.on_migrate(req).await })
                        .await
                        .map_err(|e| format!("migration task failed: {e}"))?
                }
            },
        );
        let rt = self.clone();
        t.on_request_typed(
            routes::FREEZE,
            move |_peer, req: messages::FreezeRequest| {
                let rt = rt.clone();
                // A freeze checks the new owner under the partition's lock: it finishes
                // even if the coordinator stops waiting (see the migration above).
                async move {
                    tokio::spawn(async move { rt.on_freeze(req).await })
                        .await
                        .map_err(|e| format!("freeze task failed: {e}"))?
                }
            },
        );
        let rt = self.clone();
        t.on_request_typed(
            routes::ANTI_ENTROPY,
            move |peer, check: messages::VersionCheck| {
                let rt = rt.clone();
                async move { rt.on_version_check(&peer.member_id, check).await }
            },
        );
        let rt = self.clone();
        t.on_request_typed(routes::STATUS, move |_peer, reset_copy_window: bool| {
            let rt = rt.clone();
            async move { Ok::<_, String>(rt.status_then_reset(reset_copy_window)) }
        });
        let rt = self.clone();
        t.on_request_typed(routes::DRAIN, move |peer, (): ()| {
            let rt = rt.clone();
            async move {
                let (tx, rx) = oneshot::channel();
                rt.inner
                    .drains
                    .send((peer.member_id.clone(), tx))
                    .await
                    .map_err(|_| "runtime stopped".to_string())?;
                rx.await.map_err(|_| "not the coordinator".to_string())
            }
        });
    }

    /// Moves this member's partitions to the others before it leaves (graceful shutdown),
    /// waiting at most `timeout`. With backups or not, nothing is lost when it then goes.
    pub async fn drain(&self, timeout: Duration) -> Result<(), GridError> {
        let deadline = Instant::now() + timeout;
        let me = self.inner.me.clone();
        loop {
            if !self.table().members().contains(&me) {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(GridError::Timeout {
                    after: timeout,
                    last: "partitions still held".into(),
                });
            }
            let oldest = self
                .inner
                .cluster
                .members()
                .iter()
                .find(|m| m.is_data_member())
                .cloned();
            let result = match oldest {
                Some(c) if c.id == me => {
                    let (tx, rx) = oneshot::channel();
                    if self.inner.drains.send((me.clone(), tx)).await.is_err() {
                        return Ok(());
                    }
                    tokio::time::timeout(deadline - now, rx)
                        .await
                        .map_err(|_| "timeout".to_string())
                        .and_then(|r| r.map_err(|_| "coordinator changed".to_string()))
                }
                Some(c) => self
                    .inner
                    .transport
                    .request_typed::<(), ()>(c.addr, routes::DRAIN, &(), deadline - now)
                    .await
                    .map_err(|e| e.to_string()),
                None => return Ok(()),
            };
            if let Err(e) = result {
                debug!(error = %e, "drain not finished, asking again");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    fn candidates(&self, draining: &std::collections::BTreeSet<Arc<str>>) -> Vec<Candidate> {
        let attr = self.inner.config.table.placement_attribute.as_deref();
        self.inner
            .cluster
            .members()
            .iter()
            .filter(|m| m.is_data_member() && !draining.contains(&m.id))
            .map(|m| Candidate {
                id: m.id.clone(),
                group: attr.and_then(|a| m.attribute(a)).map(String::from),
            })
            .collect()
    }
}
