//! The lock API: a member's lock service ([`Locks`]), [`ClusterLock`], [`KeyedLock`],
//! [`LockGuard`] and [`LockOwner`].

use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use grid_core::runtime::service::{OpKind, ServiceHandle};
use grid_core::runtime::Runtime;
use grid_core::GridError;
use grid_net::membership::{Cluster, MemberEvent};
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::quorum::Quorum;
use crate::service::LockService;
use crate::table::{Answer, LockId, Op, Who};
use crate::LockError;

/// Settings of a member's locks.
#[derive(Debug, Clone)]
pub struct LockSettings {
    /// Lease of a hold (default 10 s): how long a holder that stops renewing (dead, cut
    /// off) keeps the lock. The guard renews it every third of it.
    pub lease: Duration,
    /// Bound on how far two members' clock rates may differ, as a fraction (default 0.01):
    /// a holder believes it holds the lock for `lease * (1 - clock_drift)` after a renewal.
    pub clock_drift: f64,
    /// The smallest number of data members the cluster is expected to have (default 1):
    /// grants need a majority of `max(this, largest size seen)`.
    pub min_cluster_size: usize,
    /// How many times one owner may enter a reentrant lock (default 64).
    pub max_reentrant_holds: u32,
}

impl Default for LockSettings {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(10),
            clock_drift: 0.01,
            min_cluster_size: 1,
            max_reentrant_holds: 64,
        }
    }
}

static NEXT_OWNER: AtomicU64 = AtomicU64::new(1);
static NEXT_NONCE: AtomicU64 = AtomicU64::new(1);

/// Who holds a lock, for reentrancy: async Rust has no thread identity, so a task that
/// wants to re-enter a reentrant lock says who it is with an explicit owner (clone it into
/// the code that re-enters). Without one, every acquire is a new owner. Meaningful within
/// this process only.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LockOwner(u64);

impl LockOwner {
    /// A new owner, distinct from every other in this process.
    pub fn new() -> Self {
        Self(NEXT_OWNER.fetch_add(1, Ordering::Relaxed))
    }
}

impl Default for LockOwner {
    fn default() -> Self {
        Self::new()
    }
}

struct Inner {
    handle: ServiceHandle<LockService>,
    runtime: Runtime,
    member: String,
    generation: u64,
    settings: LockSettings,
    quorum: Arc<Mutex<Quorum>>,
}

/// A member's lock service: hands out [`ClusterLock`]s and [`KeyedLock`]s, and holds the
/// quorum settings. Cheap to clone. `grid::Grid` starts one on every member.
#[derive(Clone)]
pub struct Locks {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Locks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Locks")
            .field("member", &self.inner.member)
            .finish()
    }
}

fn data_members(cluster: &Cluster) -> usize {
    cluster
        .members()
        .iter()
        .filter(|m| m.is_data_member())
        .count()
}

impl Locks {
    /// Registers the lock service on `runtime` (every member does, lite members too: they
    /// own nothing) and follows `cluster`'s membership for the quorum.
    pub fn start(runtime: Runtime, cluster: Cluster, settings: LockSettings) -> Self {
        let quorum = Arc::new(Mutex::new(Quorum::new(settings.min_cluster_size)));
        let mut events = cluster.events();
        lock_quorum(&quorum).seen(data_members(&cluster));
        let service = Arc::new(LockService::new(
            runtime.config().table.partitions,
            quorum.clone(),
            cluster.clone(),
        ));
        let handle = runtime.register_service(service);
        let weak: Weak<Mutex<Quorum>> = Arc::downgrade(&quorum);
        let watched = cluster.clone();
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                let Some(quorum) = weak.upgrade() else { return };
                let live = data_members(&watched);
                let mut q = lock_quorum(&quorum);
                match event {
                    MemberEvent::Joined(m) if m.is_data_member() => q.seen(live),
                    MemberEvent::Left(m) if m.is_data_member() => q.left(live),
                    MemberEvent::Failed(m) if m.is_data_member() => q.failed(),
                    _ => {}
                }
                debug!(expected = q.expected(), live, "lock quorum");
            }
        });
        let local = cluster.local_member();
        Self {
            inner: Arc::new(Inner {
                handle,
                runtime,
                member: local.id.to_string(),
                generation: local.generation,
                settings,
                quorum,
            }),
        }
    }

    /// The lock `name` (any UTF-8 up to 255 bytes; a longer name fails at its first use
    /// with [`LockError::NameTooLong`]). The same name is the same lock on every member.
    pub fn lock(&self, name: &str) -> ClusterLock {
        ClusterLock::new(
            self.clone(),
            LockId {
                name: name.to_string(),
                key: Vec::new(),
            },
        )
    }

    /// The keyed lock `name`: one lock per key, keys independent of each other.
    pub fn keyed_lock<K: Serialize>(&self, name: &str) -> KeyedLock<K> {
        KeyedLock {
            locks: self.clone(),
            name: name.to_string(),
            reentrant: 0,
            lease: None,
            _key: PhantomData,
        }
    }

    /// The number of data members this member expects the cluster to have (see
    /// [`crate::quorum`]).
    pub fn expected_members(&self) -> usize {
        lock_quorum(&self.inner.quorum).expected()
    }

    /// The operator's call: the cluster now has `n` data members (after members were lost
    /// for good, so that the rest regain a quorum; or ahead of a planned size). Applies to
    /// this member's view: call it on every member (or at least on the survivors).
    pub fn set_expected_members(&self, n: usize) {
        lock_quorum(&self.inner.quorum).set_expected(n);
    }

    /// Whether this member sees a quorum now.
    pub fn quorum(&self) -> Result<(), LockError> {
        self.inner.handle.service().quorum()
    }

    /// The lock service on this member (tests look inside).
    #[doc(hidden)]
    pub fn service(&self) -> &Arc<LockService> {
        self.inner.handle.service()
    }

    /// The service's handle (tests send raw operations, e.g. forged ones).
    #[doc(hidden)]
    pub fn handle(&self) -> &ServiceHandle<LockService> {
        &self.inner.handle
    }

    /// The partition of a lock (tests).
    #[doc(hidden)]
    pub fn partition_of(&self, name: &str) -> u32 {
        self.lock(name).partition
    }
}

fn lock_quorum(q: &Mutex<Quorum>) -> std::sync::MutexGuard<'_, Quorum> {
    q.lock().unwrap_or_else(|e| e.into_inner())
}

/// A cluster-wide lock (Beehive's `ClusterLock`, with fencing tokens and leases). Cheap to
/// clone; the same name is the same lock on every member.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let grid = grid::Grid::builder().cluster_name("cluster-lock-doc").bind("127.0.0.1:0").no_seeds().start().await?;
/// let lock = grid.lock("billing-run");
/// let guard = lock.lock().await?;
/// assert!(lock.is_locked().await?);
/// assert!(lock.try_lock().await?.is_none(), "held: someone else does not get it");
/// let first = guard.fencing_token();
/// guard.unlock().await?;
///
/// let again = lock.try_lock_for(std::time::Duration::from_secs(1)).await?.expect("free");
/// assert!(again.fencing_token() > first);
/// drop(again); // dropping a guard releases the lock too
///
/// // Reentrancy, off by default, needs an explicit owner.
/// let lock = grid.lock("reentrant-doc").reentrant();
/// let me = grid_lock::LockOwner::new();
/// let outer = lock.lock_as(&me).await?;
/// let inner = lock.lock_as(&me).await?;
/// assert_eq!(inner.fencing_token(), outer.fencing_token());
/// inner.unlock().await?;
/// outer.unlock().await?;
/// # grid.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct ClusterLock {
    locks: Locks,
    id: LockId,
    partition: u32,
    reentrant: u32,
    lease: Duration,
}

impl ClusterLock {
    fn new(locks: Locks, id: LockId) -> Self {
        let partition = match grid_core::codec::encode(&id) {
            Ok(bytes) => locks.inner.runtime.partition_of(&bytes),
            Err(_) => 0,
        };
        let lease = locks.inner.settings.lease;
        Self {
            locks,
            id,
            partition,
            reentrant: 0,
            lease,
        }
    }

    /// Makes this handle's acquires reentrant for the same [`LockOwner`], up to
    /// [`LockSettings::max_reentrant_holds`].
    pub fn reentrant(mut self) -> Self {
        self.reentrant = self.locks.inner.settings.max_reentrant_holds.max(1);
        self
    }

    /// Makes this handle's acquires reentrant up to `limit` holds.
    pub fn reentrant_limit(mut self, limit: u32) -> Self {
        self.reentrant = limit;
        self
    }

    /// This handle's lease (default: [`LockSettings::lease`]).
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease.clamp(Duration::from_millis(10), crate::table::MAX_LEASE);
        self
    }

    /// The lock's name.
    pub fn name(&self) -> &str {
        &self.id.name
    }

    /// The partition the lock's record lives in (tests and the simulator).
    #[doc(hidden)]
    pub fn partition(&self) -> u32 {
        self.partition
    }

    /// Waits for the lock (first come, first served) and returns its guard. Fails at once
    /// without a quorum ([`LockError::NoQuorum`]). Dropping the future leaves the queue.
    pub async fn lock(&self) -> Result<LockGuard, LockError> {
        self.lock_as(&LockOwner::new()).await
    }

    /// [`ClusterLock::lock`] for `owner` (re-enters if the lock is reentrant and `owner`
    /// holds it).
    pub async fn lock_as(&self, owner: &LockOwner) -> Result<LockGuard, LockError> {
        match self.acquire(owner, true).await? {
            Some(guard) => Ok(guard),
            None => Err(LockError::Cluster("not granted".into())),
        }
    }

    /// Takes the lock if it is free now; `None` if someone holds it.
    pub async fn try_lock(&self) -> Result<Option<LockGuard>, LockError> {
        self.acquire(&LockOwner::new(), false).await
    }

    /// [`ClusterLock::try_lock`] for `owner`.
    pub async fn try_lock_as(&self, owner: &LockOwner) -> Result<Option<LockGuard>, LockError> {
        self.acquire(owner, false).await
    }

    /// Waits for the lock at most `wait`; `None` if it did not come (the caller then left
    /// the queue).
    pub async fn try_lock_for(&self, wait: Duration) -> Result<Option<LockGuard>, LockError> {
        match tokio::time::timeout(wait, self.lock()).await {
            Ok(got) => got.map(Some),
            Err(_) => Ok(None),
        }
    }

    /// Whether someone holds the lock now (a read: the answer may be stale by the time it
    /// arrives).
    pub async fn is_locked(&self) -> Result<bool, LockError> {
        self.id.check()?;
        let op = Op::IsLocked {
            lock: self.id.clone(),
        };
        match self
            .locks
            .inner
            .handle
            .execute(self.partition, op, OpKind::Read)
            .await??
        {
            Answer::Locked(held) => Ok(held),
            other => Err(LockError::Cluster(format!("unexpected answer {other:?}"))),
        }
    }

    async fn acquire(&self, owner: &LockOwner, wait: bool) -> Result<Option<LockGuard>, LockError> {
        self.id.check()?;
        let called = grid_core::clock::now();
        // A grant that came too late to be used (its lease over before it could be
        // confirmed) is given back and asked for again: a waiting acquire until it gets one,
        // a `try_lock` a few times.
        let mut tries = 0;
        loop {
            tries += 1;
            match self.attempt(owner, wait).await? {
                Attempt::Granted(guard) => {
                    metrics::histogram!("grid_lock_wait_seconds").record(
                        grid_core::clock::now()
                            .saturating_duration_since(called)
                            .as_secs_f64(),
                    );
                    return Ok(Some(guard));
                }
                Attempt::NotGranted => return Ok(None),
                Attempt::Stale if wait || tries < 3 => {
                    debug!(lock = %self.id.name, "grant arrived too late to use; asking again");
                }
                Attempt::Stale => return Ok(None),
            }
        }
    }

    /// One acquire attempt (one nonce): asked until the owner answers.
    async fn attempt(&self, owner: &LockOwner, wait: bool) -> Result<Attempt, LockError> {
        let inner = &self.locks.inner;
        let who = Who {
            member: inner.member.clone(),
            generation: inner.generation,
            owner: owner.0,
            nonce: NEXT_NONCE.fetch_add(1, Ordering::Relaxed),
        };
        // Until an answer arrives, dropping this future withdraws the attempt (a grant that
        // raced with the drop is released).
        let mut withdraw = Withdraw {
            lock: Some(self.clone()),
            who: who.clone(),
        };
        let mut backoff = Duration::from_millis(5);
        loop {
            let sent = grid_core::clock::now();
            let op = Op::Acquire {
                lock: self.id.clone(),
                who: who.clone(),
                lease_ms: self.lease.as_millis() as u64,
                reentrant: self.reentrant,
                wait,
            };
            let answer = inner
                .handle
                .execute(self.partition, op, OpKind::IdempotentWrite)
                .await;
            match answer {
                Ok(Ok(Answer::Granted { token, .. })) => {
                    // The owner granted the lock after `sent` (also a grant from the queue:
                    // the waiter was parked by this very request), so every replica counts
                    // the lease from a later moment: the holder counts it from `sent`. If
                    // little of it is left (a long wait in the queue, a slow answer), the
                    // holder first renews it, and counts from that renewal.
                    let mut from = sent;
                    let received = grid_core::clock::now();
                    if received + self.lease / 3 >= from + self.believed() {
                        let renewing = grid_core::clock::now();
                        let op = Op::Renew {
                            lock: self.id.clone(),
                            who: who.clone(),
                            token,
                            lease_ms: self.lease.as_millis() as u64,
                        };
                        let renewal = inner
                            .handle
                            .execute(self.partition, op, OpKind::IdempotentWrite)
                            .await;
                        match renewal {
                            Ok(Ok(_)) => from = renewing,
                            // Refused (its lease ran out: the lock may be someone else's
                            // already) or no answer: not ours to use. `withdraw` gives it
                            // back if it is still ours.
                            _ => return Ok(Attempt::Stale),
                        }
                        if grid_core::clock::now() >= from + self.believed() {
                            return Ok(Attempt::Stale);
                        }
                    }
                    withdraw.lock = None;
                    return Ok(Attempt::Granted(LockGuard::new(self, who, token, from)));
                }
                Ok(Ok(Answer::NotGranted)) => {
                    withdraw.lock = None;
                    return Ok(Attempt::NotGranted);
                }
                Ok(Ok(other)) => {
                    return Err(LockError::Cluster(format!("unexpected answer {other:?}")))
                }
                Ok(Err(refused)) => return Err(refused),
                Err(e) if wait && retryable(&e) => {
                    // A parked call that waited out the runtime's operation timeout, or an
                    // owner that moved: ask again with the same attempt, which keeps its
                    // place in the queue.
                    debug!(lock = %self.id.name, error = %e, "acquire again");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(200));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The part of a lease a holder counts on: `lease * (1 - clock_drift)`.
    fn believed(&self) -> Duration {
        let drift = self.locks.inner.settings.clock_drift.clamp(0.0, 0.5);
        self.lease.mul_f64(1.0 - drift)
    }

    fn release_in_background(&self, who: Who, token: Option<u64>) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let lock = self.clone();
        rt.spawn(async move {
            let op = match token {
                Some(token) => Op::Release {
                    lock: lock.id.clone(),
                    who,
                    token,
                },
                None => Op::Cancel {
                    lock: lock.id.clone(),
                    who,
                },
            };
            let res = lock
                .locks
                .inner
                .handle
                .execute(lock.partition, op, OpKind::IdempotentWrite)
                .await;
            if let Err(e) = res {
                debug!(lock = %lock.id.name, error = %e, "background release did not run; the lease will end it");
            }
        });
    }
}

/// What one acquire attempt came to.
enum Attempt {
    /// The lock, with enough of its lease left.
    Granted(LockGuard),
    /// Held by someone else (`try_lock`).
    NotGranted,
    /// Granted, but too late to use: its lease ran out before a renewal confirmed it.
    Stale,
}

/// Whether a waiting acquire asks again after `e`: the runtime's deadline, an owner that
/// vanished mid-call, or a parked call that the owner stopped waiting for (its operation
/// timeout). Not: a member shutting down, a full queue of parked calls, ...
fn retryable(e: &GridError) -> bool {
    match e {
        GridError::Timeout { .. } | GridError::Indeterminate(_) => true,
        GridError::Service(why) => why.starts_with("not woken within"),
        _ => false,
    }
}

/// Withdraws an acquire attempt whose future was dropped before its answer.
struct Withdraw {
    lock: Option<ClusterLock>,
    who: Who,
}

impl Drop for Withdraw {
    fn drop(&mut self) {
        if let Some(lock) = self.lock.take() {
            lock.release_in_background(self.who.clone(), None);
        }
    }
}

struct Shared {
    lock: ClusterLock,
    who: Who,
    token: u64,
    /// When this member stops believing it holds the lock, unless renewed.
    deadline: Mutex<Instant>,
    lost: watch::Sender<bool>,
}

impl Shared {
    fn deadline(&self) -> Instant {
        *self.deadline.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_deadline(&self, at: Instant) {
        *self.deadline.lock().unwrap_or_else(|e| e.into_inner()) = at;
    }

    fn mark_lost(&self, why: &str) {
        if !*self.lost.borrow() {
            warn!(lock = %self.lock.id.name, token = self.token, why, "lock lost");
            metrics::counter!("grid_lock_leases_lost_total").increment(1);
            self.lost.send_replace(true);
        }
    }

    /// The part of a lease this member counts on.
    fn believed(&self) -> Duration {
        self.lock.believed()
    }
}

/// A held lock. Dropping it releases the lock (in the background); [`LockGuard::unlock`]
/// releases it and says whether it was still held. A task renews its lease meanwhile.
#[must_use = "dropping the guard releases the lock at once"]
pub struct LockGuard {
    shared: Arc<Shared>,
    renewer: tokio::task::AbortHandle,
    released: bool,
}

impl std::fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockGuard")
            .field("lock", &self.shared.lock.id.name)
            .field("token", &self.shared.token)
            .finish()
    }
}

impl LockGuard {
    /// A guard whose lease is counted from `from` (when the request that got or renewed
    /// it was sent).
    fn new(lock: &ClusterLock, who: Who, token: u64, from: Instant) -> Self {
        let (lost, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            lock: lock.clone(),
            who,
            token,
            deadline: Mutex::new(from + lock.believed()),
            lost,
        });
        let renewer = tokio::spawn(renew(shared.clone(), from)).abort_handle();
        Self {
            shared,
            renewer,
            released: false,
        }
    }

    /// The fencing token of this hold: greater than every token of earlier holds of this
    /// lock. Give it to the resource the lock protects.
    pub fn fencing_token(&self) -> u64 {
        self.shared.token
    }

    /// Until when this member believes it holds the lock unless renewed (tests).
    #[doc(hidden)]
    pub fn held_until(&self) -> Instant {
        self.shared.deadline()
    }

    /// Whether this member still believes it holds the lock (its lease is current).
    pub fn is_held(&self) -> bool {
        !*self.shared.lost.borrow() && grid_core::clock::now() < self.shared.deadline()
    }

    /// Resolves when the lock is lost: the lease ran out without a renewal (cut off from
    /// the owner, no quorum), or a renewal was refused. Long work selects on it to stop.
    pub fn lost(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.shared.lost.subscribe();
        async move {
            let _ = rx.wait_for(|lost| *lost).await;
        }
    }

    /// Releases the lock. [`LockError::Lost`] if it had already been lost.
    pub async fn unlock(mut self) -> Result<(), LockError> {
        self.released = true;
        self.renewer.abort();
        let shared = self.shared.clone();
        let was_held = self.is_held();
        let lock = &shared.lock;
        let op = Op::Release {
            lock: lock.id.clone(),
            who: shared.who.clone(),
            token: shared.token,
        };
        let answer = lock
            .locks
            .inner
            .handle
            .execute(lock.partition, op, OpKind::IdempotentWrite)
            .await;
        match answer {
            Ok(Ok(_)) if was_held => Ok(()),
            Ok(Ok(_)) | Ok(Err(LockError::NotHolder)) => Err(LockError::Lost),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(e.into()),
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if !self.released {
            self.renewer.abort();
            self.shared
                .lock
                .release_in_background(self.shared.who.clone(), Some(self.shared.token));
        }
    }
}

/// Renews a guard's lease every third of it until the guard goes (the task is aborted) or
/// the lease is lost.
async fn renew(shared: Arc<Shared>, from: Instant) {
    let lock = shared.lock.clone();
    let period = lock.lease / 3;
    // Counted from when the lease was: a guard whose grant waited renews sooner.
    let mut last = from;
    loop {
        let deadline = shared.deadline();
        tokio::time::sleep_until((last + period).min(deadline)).await;
        let sent = grid_core::clock::now();
        if sent >= deadline {
            shared.mark_lost("lease ran out without a renewal");
            return;
        }
        let op = Op::Renew {
            lock: lock.id.clone(),
            who: shared.who.clone(),
            token: shared.token,
            lease_ms: lock.lease.as_millis() as u64,
        };
        let renewal = lock
            .locks
            .inner
            .handle
            .execute(lock.partition, op, OpKind::IdempotentWrite);
        match tokio::time::timeout_at(deadline, renewal).await {
            Err(_) => {
                shared.mark_lost("lease ran out while renewing");
                return;
            }
            Ok(Ok(Ok(_))) => {
                shared.set_deadline(sent + shared.believed());
                last = sent;
            }
            Ok(Ok(Err(refused))) => {
                shared.mark_lost(&refused.to_string());
                return;
            }
            Ok(Err(e)) => {
                debug!(lock = %lock.id.name, error = %e, "renewal failed; trying again");
                tokio::time::sleep(Duration::from_millis(50).min(period)).await;
            }
        }
    }
}

/// A named family of locks, one per key (Bitbucket's `LockService`): work on one key is
/// serial cluster-wide, work on different keys runs concurrently. Keys are serde types.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let grid = grid::Grid::builder().cluster_name("keyed-lock-doc").bind("127.0.0.1:0").no_seeds().start().await?;
/// let repos = grid.keyed_lock::<u64>("repository");
/// let first = repos.lock(&1).await?;
/// // Another key is another lock.
/// let other = repos.try_lock(&2).await?.expect("key 2 is free");
/// assert!(repos.try_lock(&1).await?.is_none());
/// drop((first, other));
/// let n = repos.with_lock(&1, async { 40 + 2 }).await?;
/// assert_eq!(n, 42);
/// # grid.shutdown().await;
/// # Ok(()) }
/// ```
pub struct KeyedLock<K> {
    locks: Locks,
    name: String,
    reentrant: u32,
    lease: Option<Duration>,
    _key: PhantomData<fn(&K)>,
}

impl<K> Clone for KeyedLock<K> {
    fn clone(&self) -> Self {
        Self {
            locks: self.locks.clone(),
            name: self.name.clone(),
            reentrant: self.reentrant,
            lease: self.lease,
            _key: PhantomData,
        }
    }
}

impl<K> std::fmt::Debug for KeyedLock<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyedLock")
            .field("name", &self.name)
            .finish()
    }
}

impl<K: Serialize> KeyedLock<K> {
    /// Makes the keys' locks reentrant for the same [`LockOwner`].
    pub fn reentrant(mut self) -> Self {
        self.reentrant = self.locks.inner.settings.max_reentrant_holds.max(1);
        self
    }

    /// The keys' lease (default: [`LockSettings::lease`]).
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = Some(lease);
        self
    }

    /// The lock of one key.
    pub fn for_key(&self, key: &K) -> Result<ClusterLock, LockError> {
        let key = grid_core::codec::encode(key).map_err(|e| LockError::Key(e.to_string()))?;
        let mut lock = ClusterLock::new(
            self.locks.clone(),
            LockId {
                name: self.name.clone(),
                key,
            },
        );
        lock.reentrant = self.reentrant;
        if let Some(lease) = self.lease {
            lock = lock.lease(lease);
        }
        Ok(lock)
    }

    /// Waits for `key`'s lock.
    pub async fn lock(&self, key: &K) -> Result<LockGuard, LockError> {
        self.for_key(key)?.lock().await
    }

    /// Takes `key`'s lock if it is free now.
    pub async fn try_lock(&self, key: &K) -> Result<Option<LockGuard>, LockError> {
        self.for_key(key)?.try_lock().await
    }

    /// Runs `work` holding `key`'s lock, then releases it. [`LockError::Lost`] if the lock
    /// was lost before `work` ended (it ran, but maybe not alone).
    pub async fn with_lock<T>(
        &self,
        key: &K,
        work: impl std::future::Future<Output = T>,
    ) -> Result<T, LockError> {
        let guard = self.lock(key).await?;
        let out = work.await;
        guard.unlock().await?;
        Ok(out)
    }
}
