//! The bucketed executor: tasks submitted on any member, queued per bucket in the bucket's
//! partition, processed in order per bucket, by one `process` call at a time per bucket
//! cluster-wide, in batches, retried, dead-lettered (Bitbucket's `BucketedExecutor`).
//!
//! ```
//! use grid_exec::bucketed::{Batch, BucketedSettings};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize, Clone, Debug)]
//! struct Hook { repo: String, event: u64 }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let grid = grid::Grid::builder().cluster_name("bucketed-doc").bind("127.0.0.1:0").no_seeds().start().await?;
//! let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
//! let settings = BucketedSettings::new(|h: &Hook| h.repo.clone())
//!     .batch_size(10)
//!     .max_attempts(3)
//!     .processor(move |batch: Batch<Hook, String>| {
//!         let tx = tx.clone();
//!         async move {
//!             // At least once: a batch may come again (attempt > 1) after a failure or
//!             // the death of the member that had it.
//!             for hook in batch.tasks {
//!                 let _ = tx.send((batch.bucket.clone(), hook.event));
//!             }
//!             Ok::<(), String>(())
//!         }
//!     });
//! let hooks = grid.bucketed_executor("webhooks", settings).await?;
//! hooks.submit(Hook { repo: "grid".into(), event: 1 }).await?; // durable once it returns
//! hooks.submit(Hook { repo: "grid".into(), event: 2 }).await?;
//! assert_eq!(rx.recv().await, Some(("grid".to_string(), 1)));
//! assert_eq!(rx.recv().await, Some(("grid".to_string(), 2)));
//! # grid.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! # Semantics
//! - **Durability**: `submit` returns once the task is queued on the bucket's partition
//!   owner and its synchronous backups. Queues move with migrations; when the owner dies,
//!   the promoted backup carries on from the same queue.
//! - **Order**: a bucket's tasks are processed in the order its owner accepted them; one
//!   submitter's tasks to one bucket, awaited one after the other, in the order submitted.
//! - **Exclusivity**: at most one batch per bucket is in flight, and the owner accepts the
//!   completion only from that batch's attempt. The member processing a batch runs one
//!   batch per bucket at a time; a batch offered again (a new owner, a lost message) to the
//!   member that has it is not run twice. A batch is handed to another member only when
//!   its member *left* the cluster (failed or shut down): a member that the others declare
//!   failed while it still runs a batch (a long pause) may overlap with the batch's next
//!   attempt, as with any lease-less scheme; its late completion is refused.
//! - **At least once**: a batch whose member dies is offered again as a new attempt
//!   ([`Batch::attempt`]); processors should be idempotent or check the attempt.
//! - **Failures**: a `process` that returns an error or panics is tried again whole (the
//!   same tasks) after [`BucketedSettings::retry_delay`]; after
//!   [`BucketedSettings::max_attempts`] the batch goes to the dead-letter handlers
//!   ([`BucketedSettings::on_dead_letter`], on the member that ran the last attempt) and
//!   the counter, and the bucket moves on. Attempts lost to a dying member count too.
//! - **Where**: on the bucket's owner when it has the processor, else on a member that has
//!   one (chosen by bucket, so a bucket's batches go to the same member while it stays). A
//!   member that registers no processor submits but never processes.
//! - **Concurrency**: [`BucketedSettings::max_concurrency`] bounds the batches a member
//!   runs at once: `n` per member, or per cluster `ceil(n / members with the processor)`.
//! - **Backpressure**: a bucket holds at most `max_queued_per_bucket` tasks, and the
//!   partitions one member owns at most `max_queued_per_member` of an executor; beyond,
//!   `submit` fails with [`ExecError::QueueFull`] (or waits, [`FullQueue::Wait`]).

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use grid_core::runtime::service::{OpKind, ServiceHandle};
use grid_core::runtime::Runtime;
use grid_core::GridError;
use grid_net::membership::Cluster;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub mod queue;
pub mod service;

use queue::{ExecSettings, NewTask, Op};
pub use service::BucketedService;
use service::{ErasedDeadLetter, ErasedProcessor, LocalExec, Message};

/// Why a bucketed executor's call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum ExecError {
    /// The queue is full: the bucket's, or the executor's on the member that owns the
    /// bucket's partition. Nothing was queued; try later (or use [`FullQueue::Wait`]).
    #[error("queue full: {queued} tasks in the {scope} (at most {limit})")]
    QueueFull {
        /// Tasks queued.
        queued: usize,
        /// The bound.
        limit: usize,
        /// `bucket` or `member`.
        scope: String,
    },
    /// The executor exists in the cluster with other settings. Open it with the same
    /// settings everywhere.
    #[error("executor {executor:?} already exists with other settings: {existing} (asked for {requested})")]
    SettingsConflict {
        /// The executor.
        executor: String,
        /// Its settings.
        existing: String,
        /// The settings asked for.
        requested: String,
    },
    /// The executor is open on this member with another task or key type, or already has
    /// a processor here.
    #[error("executor {executor:?}: {why}")]
    Conflict {
        /// The executor.
        executor: String,
        /// What conflicts.
        why: String,
    },
    /// A setting is out of range.
    #[error("invalid settings: {0}")]
    InvalidSettings(String),
    /// The executor name is longer than 255 bytes.
    #[error("executor name is {len} bytes long; at most 255")]
    NameTooLong {
        /// Its length.
        len: usize,
    },
    /// The encoded bucket key is larger than 1 KiB.
    #[error("encoded bucket key is {len} bytes; at most 1024")]
    BucketTooLarge {
        /// Its length.
        len: usize,
    },
    /// The encoded task is larger than 1 MiB.
    #[error("encoded task is {len} bytes; at most 1 MiB")]
    TaskTooLarge {
        /// Its length.
        len: usize,
    },
    /// Too many executors.
    #[error("too many executors (at most {limit})")]
    TooManyExecutors {
        /// The limit.
        limit: usize,
    },
    /// A task or key could not be encoded.
    #[error("codec: {0}")]
    Codec(String),
    /// A copy of a partition's queues was malformed (from the network), or a replica
    /// diverged.
    #[error("bad queue copy: {0}")]
    BadCopy(String),
    /// An operation that is not a read was sent as one.
    #[error("not a read")]
    NotARead,
    /// The cluster did not run the operation (no owner in time, shutting down, or the
    /// owner vanished mid-call: then the task may or may not be queued).
    #[error("cluster: {0}")]
    Cluster(String),
}

impl From<GridError> for ExecError {
    fn from(e: GridError) -> Self {
        Self::Cluster(e.to_string())
    }
}

impl From<grid_core::codec::CodecError> for ExecError {
    fn from(e: grid_core::codec::CodecError) -> Self {
        Self::Codec(e.to_string())
    }
}

/// One member's figures for one executor.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecStatistics {
    /// The member (empty in a sum).
    pub member: String,
    /// Tasks queued in the partitions this member owns (batches in flight included).
    pub queued: u64,
    /// Batches in flight from the partitions this member owns.
    pub in_flight: u64,
    /// Batches being processed on this member now.
    pub processing: u64,
    /// Tasks processed here (successfully).
    pub processed: u64,
    /// Batches that failed here (errors and panics).
    pub failed: u64,
    /// Batches run here that were a retry (attempt > 1).
    pub retried: u64,
    /// Batches dead-lettered here.
    pub dead_lettered: u64,
    /// Tasks submitted from here.
    pub submitted: u64,
}

impl ExecStatistics {
    fn add(&mut self, o: &Self) {
        self.queued += o.queued;
        self.in_flight += o.in_flight;
        self.processing += o.processing;
        self.processed += o.processed;
        self.failed += o.failed;
        self.retried += o.retried;
        self.dead_lettered += o.dead_lettered;
        self.submitted += o.submitted;
    }
}

/// Every member's figures for one executor, and their sum.
#[derive(Debug, Clone, Default)]
pub struct ClusterStatistics {
    /// Per member that answered.
    pub members: Vec<ExecStatistics>,
    /// Members that did not answer, with why.
    pub missing: Vec<(String, String)>,
    /// The sum of `members`.
    pub total: ExecStatistics,
}

/// How `max_concurrency` counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Concurrency {
    /// `n` batches at once on each member.
    PerNode,
    /// `n` batches at once in the cluster: `ceil(n / members with the processor)` each.
    PerCluster,
}

/// What `submit` does when the queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FullQueue {
    /// Fails with [`ExecError::QueueFull`].
    Refuse,
    /// Tries again until there is room, at most this long, then fails.
    Wait(Duration),
}

/// A batch for a processor: tasks of one bucket, in order.
#[derive(Debug, Clone)]
pub struct Batch<T, K> {
    /// The bucket.
    pub bucket: K,
    /// Its tasks, in the order they were accepted.
    pub tasks: Vec<T>,
    /// Which attempt this is, from 1 (a batch comes again after a failure or the death of
    /// the member that had it).
    pub attempt: u32,
}

/// A batch that failed its last attempt.
#[derive(Debug, Clone)]
pub struct DeadLetter<T, K> {
    /// The bucket.
    pub bucket: K,
    /// Its tasks (those that still decode).
    pub tasks: Vec<T>,
    /// Attempts made.
    pub attempts: u32,
    /// The last error.
    pub error: String,
}

/// An executor open on this member: its task and key types, and its `ExecInner<T>`.
type OpenExec = (TypeId, Arc<dyn Any + Send + Sync>);

type BucketFn<T> = Arc<dyn Fn(&T) -> Result<Vec<u8>, ExecError> + Send + Sync>;

/// Settings of a bucketed executor: the bucket function, the processor (optional), the
/// batch size, retries, concurrency and queue bounds.
pub struct BucketedSettings<T, K> {
    bucket: BucketFn<T>,
    processor: Option<ErasedProcessor>,
    dead_letter: Vec<ErasedDeadLetter>,
    replicated: ExecSettings,
    full: FullQueue,
    _key: PhantomData<fn() -> K>,
}

impl<T, K> BucketedSettings<T, K>
where
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
    K: Serialize + DeserializeOwned + Send + 'static,
{
    /// Settings with the bucket function `bucket` and the defaults: batch size 1, 3
    /// attempts 1 s apart, 16 batches at once per member, 10,000 tasks per bucket and
    /// 1,000,000 per member, refuse when full, no processor.
    pub fn new(bucket: impl Fn(&T) -> K + Send + Sync + 'static) -> Self {
        Self {
            bucket: Arc::new(move |t| Ok(grid_core::codec::encode(&bucket(t))?)),
            processor: None,
            dead_letter: Vec::new(),
            replicated: ExecSettings {
                batch_size: 1,
                max_attempts: 3,
                retry_delay_ms: 1_000,
                max_per_bucket: 10_000,
                max_per_member: 1_000_000,
                max_concurrency: 16,
                per_cluster: false,
            },
            full: FullQueue::Refuse,
            _key: PhantomData,
        }
    }

    /// Registers this member's processor: called with a bucket's tasks in order, one call
    /// per bucket at a time cluster-wide. An `Err` (or a panic) fails the batch.
    pub fn processor<F, Fut, E>(mut self, process: F) -> Self
    where
        F: Fn(Batch<T, K>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display,
    {
        let process = Arc::new(process);
        self.processor = Some(Arc::new(move |bucket, tasks, attempt| {
            let process = process.clone();
            Box::pin(async move {
                let bucket: K = grid_core::codec::decode(&bucket)
                    .map_err(|e| format!("bucket does not decode: {e}"))?;
                let tasks = tasks
                    .iter()
                    .map(|t| grid_core::codec::decode::<T>(t))
                    .collect::<Result<Vec<T>, _>>()
                    .map_err(|e| format!("task does not decode: {e}"))?;
                process(Batch {
                    bucket,
                    tasks,
                    attempt,
                })
                .await
                .map_err(|e| e.to_string())
            })
        }));
        self
    }

    /// Adds a dead-letter handler (runs on the member that ran the batch's last attempt).
    pub fn on_dead_letter(
        mut self,
        handler: impl Fn(DeadLetter<T, K>) + Send + Sync + 'static,
    ) -> Self {
        self.dead_letter
            .push(Arc::new(move |bucket, tasks, attempts, error| {
                let Ok(bucket) = grid_core::codec::decode::<K>(&bucket) else {
                    tracing::warn!("a dead-lettered bucket key does not decode");
                    return;
                };
                let tasks = tasks
                    .iter()
                    .filter_map(|t| grid_core::codec::decode::<T>(t).ok())
                    .collect();
                handler(DeadLetter {
                    bucket,
                    tasks,
                    attempts,
                    error,
                });
            }));
        self
    }

    /// Most tasks per `process` call (default 1).
    pub fn batch_size(mut self, n: u32) -> Self {
        self.replicated.batch_size = n;
        self
    }

    /// Attempts before a batch is dead-lettered (default 3).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.replicated.max_attempts = n;
        self
    }

    /// Delay before a failed batch is tried again (default 1 s).
    pub fn retry_delay(mut self, delay: Duration) -> Self {
        self.replicated.retry_delay_ms = delay.as_millis() as u64;
        self
    }

    /// Most batches processed at once (default 16 per node).
    pub fn max_concurrency(mut self, n: u32, mode: Concurrency) -> Self {
        self.replicated.max_concurrency = n;
        self.replicated.per_cluster = mode == Concurrency::PerCluster;
        self
    }

    /// Most tasks queued in one bucket (default 10,000).
    pub fn max_queued_per_bucket(mut self, n: u32) -> Self {
        self.replicated.max_per_bucket = n;
        self
    }

    /// Most tasks queued in the partitions one member owns (default 1,000,000).
    pub fn max_queued_per_member(mut self, n: u32) -> Self {
        self.replicated.max_per_member = n;
        self
    }

    /// What `submit` does when the queue is full (default: refuse).
    pub fn when_full(mut self, full: FullQueue) -> Self {
        self.full = full;
        self
    }
}

/// A member's bucketed executors. `grid::Grid` starts one on every member.
#[derive(Clone)]
pub struct BucketedExecutors {
    handle: ServiceHandle<BucketedService>,
    runtime: Runtime,
    open: Arc<Mutex<HashMap<String, OpenExec>>>,
}

impl std::fmt::Debug for BucketedExecutors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BucketedExecutors").finish_non_exhaustive()
    }
}

impl BucketedExecutors {
    /// Registers the service on `runtime` (every member does, lite members too).
    pub fn start(runtime: Runtime, cluster: Cluster) -> Self {
        let handle = BucketedService::start(&runtime, cluster);
        Self {
            handle,
            runtime,
            open: Arc::default(),
        }
    }

    /// The service on this member (tests look inside).
    #[doc(hidden)]
    pub fn service(&self) -> &Arc<BucketedService> {
        self.handle.service()
    }

    /// The executor `name` (see [`BucketedExecutor`]): the same name is the same executor
    /// on every member; its settings must agree ([`ExecError::SettingsConflict`]). On this
    /// member, opening it again returns the same executor (and may add a processor if it
    /// had none).
    pub async fn open<T, K>(
        &self,
        name: &str,
        settings: BucketedSettings<T, K>,
    ) -> Result<BucketedExecutor<T>, ExecError>
    where
        T: Serialize + DeserializeOwned + Send + Sync + 'static,
        K: Serialize + DeserializeOwned + Send + 'static,
    {
        if name.len() > queue::MAX_NAME_BYTES {
            return Err(ExecError::NameTooLong { len: name.len() });
        }
        settings.replicated.check()?;
        let conflict = |why: &str| ExecError::Conflict {
            executor: name.to_string(),
            why: why.to_string(),
        };
        let existing = lock(&self.open).get(name).cloned();
        let inner: Arc<ExecInner<T>> = match existing {
            Some((ty, any)) => {
                if ty != TypeId::of::<(T, K)>() {
                    return Err(conflict("opened here with other task or bucket types"));
                }
                let inner = any
                    .downcast::<ExecInner<T>>()
                    .map_err(|_| conflict("opened here with another task type"))?;
                if inner.settings != settings.replicated {
                    return Err(ExecError::SettingsConflict {
                        executor: name.to_string(),
                        existing: inner.settings.to_string(),
                        requested: settings.replicated.to_string(),
                    });
                }
                inner
            }
            None => {
                let p = self.runtime.partition_of(name.as_bytes());
                let define = Op::Define {
                    exec: name.to_string(),
                    settings: settings.replicated.clone(),
                };
                self.handle
                    .execute(p, define, OpKind::IdempotentWrite)
                    .await??;
                let inner = Arc::new(ExecInner {
                    name: name.to_string(),
                    settings: settings.replicated.clone(),
                    bucket: settings.bucket.clone(),
                    full: settings.full,
                    handle: self.handle.clone(),
                    runtime: self.runtime.clone(),
                });
                let mut open = lock(&self.open);
                let (_, any) = open
                    .entry(name.to_string())
                    .or_insert_with(|| (TypeId::of::<(T, K)>(), inner.clone()))
                    .clone();
                any.downcast::<ExecInner<T>>()
                    .map_err(|_| conflict("opened here with another task type"))?
            }
        };
        if let Some(processor) = settings.processor {
            let service = self.handle.service();
            if lock(&service.local).contains_key(name) {
                return Err(conflict("a processor is already registered on this member"));
            }
            let local = Arc::new(LocalExec::new(settings.replicated.clone(), processor));
            *lock(&local.dead_letter) = settings.dead_letter;
            service.register(name, local);
        }
        Ok(BucketedExecutor { inner })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct ExecInner<T> {
    name: String,
    settings: ExecSettings,
    bucket: BucketFn<T>,
    full: FullQueue,
    handle: ServiceHandle<BucketedService>,
    runtime: Runtime,
}

/// A bucketed executor (see the [module docs](self)). Cheap to clone.
pub struct BucketedExecutor<T> {
    inner: Arc<ExecInner<T>>,
}

impl<T> Clone for BucketedExecutor<T> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<T> std::fmt::Debug for BucketedExecutor<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BucketedExecutor")
            .field("name", &self.inner.name)
            .finish()
    }
}

/// The partition of an executor's bucket.
fn partition_of(runtime: &Runtime, exec: &str, bucket: &[u8]) -> u32 {
    let mut key = Vec::with_capacity(exec.len() + 1 + bucket.len());
    key.extend_from_slice(exec.as_bytes());
    key.push(0);
    key.extend_from_slice(bucket);
    runtime.partition_of(&key)
}

impl<T: Serialize + Send + Sync + 'static> BucketedExecutor<T> {
    /// The executor's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Queues `task` in its bucket; returns once it is durable (on the bucket's partition
    /// owner and its synchronous backups). An error means it was not queued, except
    /// [`ExecError::Cluster`] when the owner vanished mid-call (it may have been).
    pub async fn submit(&self, task: T) -> Result<(), ExecError> {
        self.queue(task, Duration::ZERO).await
    }

    /// Queues `task` to join its bucket's queue after `delay` (durable at once, like
    /// `submit`; the delay is counted on the owner, and starts again on a new owner only
    /// for what is left of it).
    pub async fn schedule(&self, task: T, delay: Duration) -> Result<(), ExecError> {
        self.queue(task, delay).await
    }

    /// Queues `tasks`, each in its bucket, in this order; returns once all are durable.
    /// Tasks whose buckets share a partition go in one replicated write (one round trip
    /// for all of them), which is what makes queuing many tasks much cheaper than
    /// `submit` in a loop; the partitions are written at once.
    ///
    /// Each partition's share is queued all or none. If one fails (a full queue, a lost
    /// owner), the error is returned, and the shares of other partitions that had
    /// succeeded stay queued: call again with what must not be lost, as after a failed
    /// `submit` (at least once).
    ///
    /// ```
    /// use grid_exec::bucketed::{Batch, BucketedSettings};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let grid = grid::Grid::builder().cluster_name("submit-all-doc").bind("127.0.0.1:0").no_seeds().start().await?;
    /// let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    /// let settings = BucketedSettings::new(|n: &u64| n % 4) // four buckets
    ///     .batch_size(100)
    ///     .processor(move |batch: Batch<u64, u64>| {
    ///         let tx = tx.clone();
    ///         async move {
    ///             let _ = tx.send(batch.tasks);
    ///             Ok::<(), String>(())
    ///         }
    ///     });
    /// let exec = grid.bucketed_executor("numbers", settings).await?;
    /// exec.submit_all(0..1000u64).await?; // one write per partition, not per task
    /// let mut seen = Vec::new();
    /// while seen.len() < 1000 {
    ///     let batch = rx.recv().await.expect("batches");
    ///     assert!(batch.windows(2).all(|w| w[0] < w[1])); // in order within a bucket
    ///     seen.extend(batch);
    /// }
    /// # grid.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub async fn submit_all(&self, tasks: impl IntoIterator<Item = T>) -> Result<(), ExecError> {
        let i = &self.inner;
        let mut shares: Vec<(u32, Vec<NewTask>)> = Vec::new();
        for task in tasks {
            let bucket = (i.bucket)(&task)?;
            let body = grid_core::codec::encode(&task)?;
            let p = partition_of(&i.runtime, &i.name, &bucket);
            let t = NewTask { bucket, task: body };
            match shares.iter_mut().find(|(q, _)| *q == p) {
                Some((_, ts)) => ts.push(t),
                None => shares.push((p, vec![t])),
            }
        }
        let writes = shares.into_iter().map(|(p, tasks)| {
            let n = tasks.len() as u64;
            self.execute_submit(p, n, move || Op::SubmitMany {
                exec: i.name.clone(),
                settings: i.settings.clone(),
                tasks: tasks.clone(),
                delay_ms: 0,
            })
        });
        let mut first_error = None;
        for result in futures::future::join_all(writes).await {
            if let (Err(e), None) = (result, &first_error) {
                first_error = Some(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    async fn queue(&self, task: T, delay: Duration) -> Result<(), ExecError> {
        let i = &self.inner;
        let bucket = (i.bucket)(&task)?;
        let body = grid_core::codec::encode(&task)?;
        let p = partition_of(&i.runtime, &i.name, &bucket);
        self.execute_submit(p, 1, || Op::Submit {
            exec: i.name.clone(),
            settings: i.settings.clone(),
            bucket: bucket.clone(),
            task: body.clone(),
            delay_ms: delay.as_millis() as u64,
        })
        .await
    }

    /// Runs a submit of `n` tasks to partition `p`, waiting and trying again on a full
    /// queue as the settings say.
    async fn execute_submit(&self, p: u32, n: u64, op: impl Fn() -> Op) -> Result<(), ExecError> {
        let i = &self.inner;
        let deadline = match i.full {
            FullQueue::Refuse => None,
            FullQueue::Wait(d) => Some(tokio::time::Instant::now() + d),
        };
        let mut pause = Duration::from_millis(5);
        loop {
            match i.handle.execute(p, op(), OpKind::Write).await? {
                Ok(_) => {
                    i.handle
                        .service()
                        .counters(&i.name)
                        .submitted
                        .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                    metrics::counter!("grid_exec_bucketed_submitted_total").increment(n);
                    return Ok(());
                }
                Err(e @ ExecError::QueueFull { .. }) => {
                    metrics::counter!("grid_exec_bucketed_refused_total").increment(n);
                    // Tried once more at the deadline, then given up.
                    let now = tokio::time::Instant::now();
                    match deadline {
                        Some(d) if now < d => {
                            tokio::time::sleep(pause.min(d - now)).await;
                            pause = (pause * 2).min(Duration::from_millis(200));
                        }
                        _ => return Err(e),
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Stops this member's processing of the executor (as Bitbucket's `shutdown`): batches
    /// running here finish, those waiting here go to other members; other members go on,
    /// and this member can still submit.
    pub fn shutdown(&self) {
        self.inner.handle.service().unregister(&self.inner.name);
    }

    /// This member's figures.
    pub fn statistics(&self) -> ExecStatistics {
        self.inner.handle.service().statistics(&self.inner.name)
    }

    /// Every live member's figures, and their sum; a member that does not answer within
    /// `timeout` is listed as missing.
    pub async fn cluster_statistics(&self, timeout: Duration) -> ClusterStatistics {
        let i = &self.inner;
        let mut out = ClusterStatistics::default();
        let ids = i.handle.service().cluster_members();
        let asks = ids.iter().map(|m| {
            let handle = i.handle.clone();
            let message = Message::StatsOf(i.name.clone());
            async move { (m.clone(), handle.ask(m, &message, timeout).await) }
        });
        for (member, answer) in futures::future::join_all(asks).await {
            match answer {
                Ok(Message::Stats(s)) => {
                    out.total.add(&s);
                    out.members.push(s);
                }
                Ok(_) => out.missing.push((member, "unexpected answer".into())),
                Err(e) => out.missing.push((member, e.to_string())),
            }
        }
        out
    }
}
