//! One partition's bucket queues, without IO: the tasks queued per bucket, the batch in
//! flight per bucket (its id, attempt and the member processing it), the time before which
//! a failed batch is not retried, delayed tasks, and the executors' settings. Operations
//! come in with an [`Env`] (now, the partition's epoch, who may process, who is alive);
//! [`PartitionQueues::decide`] answers them with a [`Change`] (a list of deterministic
//! [`Step`]s) that [`PartitionQueues::apply`] carries out on every replica, returning the
//! [`Output`]s (batches to offer) that the owner acts on.
//!
//! Invariants (checked by the tests below):
//! - **Exclusivity**: a bucket has at most one batch in flight; a new batch of a bucket is
//!   started only by the change that ends the previous one (done, retry, dead letter,
//!   lost), and a completion is accepted only from the batch id *and* attempt in flight
//!   (anything else is [`Answer::Stale`] and changes nothing).
//! - **Order**: a bucket's tasks are queued in the order the owner accepted them; a batch
//!   is always the head of the queue; a failed batch is retried whole (the same tasks, even
//!   if more arrived meanwhile).
//! - **Bounds**: tasks per bucket, tasks per member (those queued in the partitions the
//!   member owns), task size, batch starts per operation, executor definitions.
//! - **Batch ids** grow per partition across owners: `max(last + 1, epoch << 32)`, so a
//!   completion meant for a batch of an earlier owner never matches a later batch.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::bucketed::ExecError;

/// Largest encoded task, in bytes.
pub const MAX_TASK_BYTES: usize = 1 << 20;
/// Longest executor name, in bytes.
pub const MAX_NAME_BYTES: usize = 255;
/// Largest encoded bucket key, in bytes.
pub const MAX_BUCKET_BYTES: usize = 1_024;
/// Most batches one operation starts (a kick starts the rest with the next one).
pub const MAX_STARTS_PER_OP: usize = 4_096;
/// Most executors defined in one partition.
pub const MAX_DEFINITIONS: usize = 4_096;
/// How long a bucket whose batch was declined (the member was shutting down, or its
/// local queue was full) waits before it is offered again.
pub const DECLINE_BACKOFF: Duration = Duration::from_millis(200);

/// The settings of an executor that the partitions need (replicated with its tasks), and
/// that must agree cluster-wide.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecSettings {
    /// Most tasks in one `process` call.
    pub batch_size: u32,
    /// Attempts before a batch goes to the dead letters.
    pub max_attempts: u32,
    /// Delay before a failed batch is tried again, in ms.
    pub retry_delay_ms: u64,
    /// Most tasks queued in one bucket.
    pub max_per_bucket: u32,
    /// Most tasks queued in the partitions one member owns.
    pub max_per_member: u32,
    /// `max_concurrency`'s `n`.
    pub max_concurrency: u32,
    /// Whether `max_concurrency` is per cluster (else per member).
    pub per_cluster: bool,
}

impl std::fmt::Display for ExecSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "batch_size={} max_attempts={} retry_delay={}ms max_per_bucket={} max_per_member={} max_concurrency={} {}",
            self.batch_size,
            self.max_attempts,
            self.retry_delay_ms,
            self.max_per_bucket,
            self.max_per_member,
            self.max_concurrency,
            if self.per_cluster { "per cluster" } else { "per node" }
        )
    }
}

impl ExecSettings {
    /// Checks the values (they may come from the network).
    pub fn check(&self) -> Result<(), ExecError> {
        if self.batch_size == 0 || self.max_attempts == 0 || self.max_concurrency == 0 {
            return Err(ExecError::InvalidSettings(
                "batch_size, max_attempts and max_concurrency must be at least 1".into(),
            ));
        }
        if self.max_per_bucket == 0 || self.max_per_member == 0 {
            return Err(ExecError::InvalidSettings(
                "queue bounds must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// A queued task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    /// Its sequence number in the partition (the order the owner accepted it).
    pub seq: u64,
    /// The encoded task.
    #[serde(with = "grid_core::codec::bin")]
    pub body: Vec<u8>,
}

/// The batch a bucket has in flight.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InFlight {
    /// The batch id (unique per partition, growing).
    pub batch: u64,
    /// How many tasks from the head of the queue it holds.
    pub count: u32,
    /// Its attempt, from 1.
    pub attempt: u32,
    /// The member processing it.
    pub member: String,
}

/// One bucket.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bucket {
    /// Queued tasks, in order; an in-flight batch is the head.
    pub queue: VecDeque<Task>,
    /// The batch in flight.
    pub in_flight: Option<InFlight>,
    /// Attempts made so far on the head batch (0: it was never tried, or succeeded).
    pub attempts: u32,
    /// The size of the head batch when it was tried before (it is retried whole).
    pub retry_count: Option<u32>,
    /// Not started again before this (a failed attempt's delay).
    pub retry_at: Option<Instant>,
}

impl Bucket {
    fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.in_flight.is_none() && self.attempts == 0
    }

    /// Whether a batch may start now (nothing in flight, something queued, no delay).
    pub fn ready(&self, now: Instant) -> bool {
        self.in_flight.is_none()
            && !self.queue.is_empty()
            && self.retry_at.is_none_or(|at| at <= now)
    }

    /// The size of the next batch (with `extra` more tasks queued than now).
    fn next_count(&self, batch_size: u32, extra: usize) -> u32 {
        let len = (self.queue.len() + extra) as u32;
        match self.retry_count {
            Some(c) => c.min(len),
            None => batch_size.min(len),
        }
    }
}

/// A task waiting for its delay (`schedule`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delayed {
    /// Its bucket.
    pub bucket: Vec<u8>,
    /// The task.
    pub task: Task,
    /// When it joins its bucket's queue.
    pub due: Instant,
}

/// One executor's queues in the partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecQueues {
    /// Its settings (the latest a task came with).
    pub settings: ExecSettings,
    /// Buckets with work (an idle bucket is removed).
    pub buckets: BTreeMap<Vec<u8>, Bucket>,
    /// Delayed tasks by sequence number.
    pub delayed: BTreeMap<u64, Delayed>,
    /// Tasks queued (in buckets and delayed).
    pub queued: usize,
}

impl ExecQueues {
    fn new(settings: ExecSettings) -> Self {
        Self {
            settings,
            buckets: BTreeMap::new(),
            delayed: BTreeMap::new(),
            queued: 0,
        }
    }
}

/// How a batch's processing ended, as its member reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Processed: the batch leaves the queue.
    Done,
    /// Failed (an error or a panic): retried after the delay, or dead-lettered.
    Failed(String),
}

/// What callers (and the owner itself) ask a partition's queues.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Defines executor `exec` with `settings` (refused if it exists with others).
    Define {
        /// The executor.
        exec: String,
        /// Its settings.
        settings: ExecSettings,
    },
    /// Queues a task.
    Submit {
        /// The executor.
        exec: String,
        /// Its settings.
        settings: ExecSettings,
        /// The encoded bucket key.
        #[serde(with = "grid_core::codec::bin")]
        bucket: Vec<u8>,
        /// The encoded task.
        #[serde(with = "grid_core::codec::bin")]
        task: Vec<u8>,
        /// Joins the queue this much later (0: now).
        delay_ms: u64,
    },
    /// Queues several tasks, all or none, in this order (one change: one replicated write).
    SubmitMany {
        /// The executor.
        exec: String,
        /// Its settings.
        settings: ExecSettings,
        /// The tasks, with their buckets.
        tasks: Vec<NewTask>,
        /// They join their queues this much later (0: now).
        delay_ms: u64,
    },
    /// A member reports how a batch went.
    Complete {
        /// The executor.
        exec: String,
        /// The bucket.
        #[serde(with = "grid_core::codec::bin")]
        bucket: Vec<u8>,
        /// The batch.
        batch: u64,
        /// The attempt.
        attempt: u32,
        /// How it went.
        outcome: Outcome,
    },
    /// A member will not process a batch offered to it (shutting down, or full).
    Decline {
        /// The executor.
        exec: String,
        /// The bucket.
        #[serde(with = "grid_core::codec::bin")]
        bucket: Vec<u8>,
        /// The batch.
        batch: u64,
        /// The attempt.
        attempt: u32,
    },
    /// The owner's own: start what is ready, release due delayed tasks, take back batches
    /// of members that are gone.
    Kick,
}

/// A task of [`Op::SubmitMany`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewTask {
    /// The encoded bucket key.
    #[serde(with = "grid_core::codec::bin")]
    pub bucket: Vec<u8>,
    /// The encoded task.
    #[serde(with = "grid_core::codec::bin")]
    pub task: Vec<u8>,
}

/// What the queues answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Answer {
    /// The executor is defined with these settings.
    Defined,
    /// The task is queued (durable once this answer arrives).
    Accepted {
        /// Its sequence number.
        seq: u64,
    },
    /// The batch left the queue.
    Completed,
    /// The batch failed and will be tried again.
    Retrying,
    /// The batch failed its last attempt and left the queue: call the dead-letter handler.
    DeadLettered,
    /// Not the batch in flight (an old attempt, or already completed): nothing changed.
    Stale,
    /// The decline was taken: the batch is offered again later.
    Declined,
    /// A kick: batches started.
    Kicked {
        /// How many.
        started: u32,
    },
}

/// One deterministic step of a change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Step {
    /// Records an executor's settings.
    Define {
        /// The executor.
        exec: String,
        /// Its settings.
        settings: ExecSettings,
    },
    /// A task joins the tail of its bucket's queue (after `delay_ms`, when not 0).
    Enqueue {
        /// The executor.
        exec: String,
        /// Its settings.
        settings: ExecSettings,
        /// The bucket.
        #[serde(with = "grid_core::codec::bin")]
        bucket: Vec<u8>,
        /// The task.
        task: Task,
        /// Delay, ms.
        delay_ms: u64,
    },
    /// Delayed tasks join their buckets' queues, in this order.
    Release {
        /// The executor.
        exec: String,
        /// Their sequence numbers.
        seqs: Vec<u64>,
    },
    /// The head of a bucket's queue goes to `member` as batch `batch`.
    Start {
        /// The executor.
        exec: String,
        /// The bucket.
        #[serde(with = "grid_core::codec::bin")]
        bucket: Vec<u8>,
        /// The batch id.
        batch: u64,
        /// Its size.
        count: u32,
        /// Its attempt.
        attempt: u32,
        /// Who processes it.
        member: String,
    },
    /// The batch in flight is done (processed, or dead-lettered): it leaves the queue.
    Remove {
        /// The executor.
        exec: String,
        /// The bucket.
        #[serde(with = "grid_core::codec::bin")]
        bucket: Vec<u8>,
        /// The batch.
        batch: u64,
    },
    /// The batch in flight goes back to the head of the queue, with `attempts` made,
    /// not started again for `delay_ms`.
    Requeue {
        /// The executor.
        exec: String,
        /// The bucket.
        #[serde(with = "grid_core::codec::bin")]
        bucket: Vec<u8>,
        /// The batch.
        batch: u64,
        /// Attempts made on it.
        attempts: u32,
        /// Delay, ms.
        delay_ms: u64,
    },
}

/// A change: steps applied in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change(pub Vec<Step>);

/// A batch for the owner to hand to its member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    /// The executor.
    pub exec: String,
    /// The partition (where the completion goes).
    pub partition: u32,
    /// The bucket.
    #[serde(with = "grid_core::codec::bin")]
    pub bucket: Vec<u8>,
    /// The batch id.
    pub batch: u64,
    /// The attempt, from 1.
    pub attempt: u32,
    /// Who processes it.
    pub member: String,
    /// The tasks, in order.
    pub tasks: Vec<Task>,
}

/// What `apply` asks the owner to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Hand this batch to its member.
    Offer(Offer),
}

/// What `decide` needs beside the queues.
pub struct Env<'a> {
    /// Now.
    pub now: Instant,
    /// The partition's epoch.
    pub epoch: u64,
    /// Tasks of an executor queued in the partitions this member owns.
    pub member_queued: &'a dyn Fn(&str) -> usize,
    /// Who should process a batch of (executor, bucket) now (`None`: nobody can).
    pub pick: &'a dyn Fn(&str, &[u8]) -> Option<String>,
    /// Whether a member is alive.
    pub alive: &'a dyn Fn(&str) -> bool,
}

/// One partition's queues.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartitionQueues {
    /// Executors with work here.
    pub execs: BTreeMap<String, ExecQueues>,
    /// Executors defined here (the partition of the executor's name).
    pub definitions: BTreeMap<String, ExecSettings>,
    /// The next task sequence number.
    pub next_seq: u64,
    /// The last batch id given.
    pub last_batch: u64,
}

/// The copy of a partition's queues (delays as time left).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PartitionCopy {
    execs: Vec<ExecCopy>,
    definitions: Vec<(String, ExecSettings)>,
    next_seq: u64,
    last_batch: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ExecCopy {
    name: String,
    settings: ExecSettings,
    buckets: Vec<BucketCopy>,
    delayed: Vec<DelayedCopy>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct BucketCopy {
    #[serde(with = "grid_core::codec::bin")]
    key: Vec<u8>,
    queue: Vec<Task>,
    in_flight: Option<InFlight>,
    attempts: u32,
    retry_count: Option<u32>,
    retry_in_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct DelayedCopy {
    #[serde(with = "grid_core::codec::bin")]
    bucket: Vec<u8>,
    task: Task,
    due_in_ms: u64,
}

fn ms(d: u64) -> Duration {
    Duration::from_millis(d)
}

fn check_name(exec: &str) -> Result<(), ExecError> {
    if exec.len() > MAX_NAME_BYTES {
        return Err(ExecError::NameTooLong { len: exec.len() });
    }
    Ok(())
}

impl PartitionQueues {
    /// The next batch id after `last` in `epoch`.
    fn next_batch(last: u64, epoch: u64) -> u64 {
        (last + 1).max(epoch.saturating_mul(1 << 32))
    }

    /// The bucket `bucket` of `exec`, if it has work.
    pub fn bucket(&self, exec: &str, bucket: &[u8]) -> Option<&Bucket> {
        self.execs.get(exec).and_then(|e| e.buckets.get(bucket))
    }

    /// Tasks of `exec` queued here (delayed ones included).
    pub fn queued(&self, exec: &str) -> usize {
        self.execs.get(exec).map_or(0, |e| e.queued)
    }

    /// Batches of `exec` in flight here.
    pub fn in_flight(&self, exec: &str) -> usize {
        self.execs.get(exec).map_or(0, |e| {
            e.buckets.values().filter(|b| b.in_flight.is_some()).count()
        })
    }

    /// Every task queued here, all executors.
    pub fn len(&self) -> usize {
        self.execs.values().map(|e| e.queued).sum()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Decides how to answer `op` and what changes, without changing anything.
    pub fn decide(&self, op: Op, env: &Env<'_>) -> Result<(Answer, Option<Change>), ExecError> {
        match op {
            Op::Define { exec, settings } => self.decide_define(exec, settings),
            Op::Submit {
                exec,
                settings,
                bucket,
                task,
                delay_ms,
            } => self.decide_submit(exec, settings, bucket, task, delay_ms, env),
            Op::SubmitMany {
                exec,
                settings,
                tasks,
                delay_ms,
            } => self.decide_submit_many(exec, settings, tasks, delay_ms, env),
            Op::Complete {
                exec,
                bucket,
                batch,
                attempt,
                outcome,
            } => Ok(self.decide_complete(exec, bucket, batch, attempt, outcome, env)),
            Op::Decline {
                exec,
                bucket,
                batch,
                attempt,
            } => Ok(self.decide_decline(exec, bucket, batch, attempt)),
            Op::Kick => Ok(self.decide_kick(env)),
        }
    }

    fn decide_define(
        &self,
        exec: String,
        settings: ExecSettings,
    ) -> Result<(Answer, Option<Change>), ExecError> {
        check_name(&exec)?;
        settings.check()?;
        match self.definitions.get(&exec) {
            Some(existing) if *existing == settings => Ok((Answer::Defined, None)),
            Some(existing) => Err(ExecError::SettingsConflict {
                executor: exec,
                existing: existing.to_string(),
                requested: settings.to_string(),
            }),
            None if self.definitions.len() >= MAX_DEFINITIONS => Err(ExecError::TooManyExecutors {
                limit: MAX_DEFINITIONS,
            }),
            None => Ok((
                Answer::Defined,
                Some(Change(vec![Step::Define { exec, settings }])),
            )),
        }
    }

    fn decide_submit(
        &self,
        exec: String,
        settings: ExecSettings,
        bucket: Vec<u8>,
        task: Vec<u8>,
        delay_ms: u64,
        env: &Env<'_>,
    ) -> Result<(Answer, Option<Change>), ExecError> {
        check_name(&exec)?;
        settings.check()?;
        if bucket.len() > MAX_BUCKET_BYTES {
            return Err(ExecError::BucketTooLarge { len: bucket.len() });
        }
        if task.len() > MAX_TASK_BYTES {
            return Err(ExecError::TaskTooLarge { len: task.len() });
        }
        let queues = self.execs.get(&exec);
        let current = queues.and_then(|e| e.buckets.get(&bucket));
        let in_bucket = current.map_or(0, |b| b.queue.len())
            + queues.map_or(0, |e| {
                e.delayed.values().filter(|d| d.bucket == bucket).count()
            });
        if in_bucket >= settings.max_per_bucket as usize {
            return Err(ExecError::QueueFull {
                queued: in_bucket,
                limit: settings.max_per_bucket as usize,
                scope: "bucket".into(),
            });
        }
        let in_member = (env.member_queued)(&exec);
        if in_member >= settings.max_per_member as usize {
            return Err(ExecError::QueueFull {
                queued: in_member,
                limit: settings.max_per_member as usize,
                scope: "member".into(),
            });
        }
        let seq = self.next_seq;
        let mut steps = vec![Step::Enqueue {
            exec: exec.clone(),
            settings: settings.clone(),
            bucket: bucket.clone(),
            task: Task { seq, body: task },
            delay_ms,
        }];
        if delay_ms == 0 {
            let empty = Bucket::default();
            let b = current.unwrap_or(&empty);
            if b.in_flight.is_none() && b.retry_at.is_none_or(|at| at <= env.now) {
                if let Some(member) = (env.pick)(&exec, &bucket) {
                    steps.push(Step::Start {
                        count: b.next_count(settings.batch_size, 1),
                        attempt: b.attempts + 1,
                        batch: Self::next_batch(self.last_batch, env.epoch),
                        exec,
                        bucket,
                        member,
                    });
                }
            }
        }
        Ok((Answer::Accepted { seq }, Some(Change(steps))))
    }

    fn decide_submit_many(
        &self,
        exec: String,
        settings: ExecSettings,
        tasks: Vec<NewTask>,
        delay_ms: u64,
        env: &Env<'_>,
    ) -> Result<(Answer, Option<Change>), ExecError> {
        check_name(&exec)?;
        settings.check()?;
        let first = self.next_seq;
        if tasks.is_empty() {
            return Ok((Answer::Accepted { seq: first }, None));
        }
        // Tasks per bucket, buckets in the order they first appear.
        let mut added: Vec<(&[u8], usize)> = Vec::new();
        for t in &tasks {
            if t.bucket.len() > MAX_BUCKET_BYTES {
                return Err(ExecError::BucketTooLarge {
                    len: t.bucket.len(),
                });
            }
            if t.task.len() > MAX_TASK_BYTES {
                return Err(ExecError::TaskTooLarge { len: t.task.len() });
            }
            match added.iter_mut().find(|(b, _)| *b == t.bucket.as_slice()) {
                Some((_, n)) => *n += 1,
                None => added.push((&t.bucket, 1)),
            }
        }
        let queues = self.execs.get(&exec);
        for (bucket, n) in &added {
            let in_bucket = queues.map_or(0, |e| {
                e.buckets.get(*bucket).map_or(0, |b| b.queue.len())
                    + e.delayed
                        .values()
                        .filter(|d| d.bucket.as_slice() == *bucket)
                        .count()
            });
            if in_bucket + n > settings.max_per_bucket as usize {
                return Err(ExecError::QueueFull {
                    queued: in_bucket,
                    limit: settings.max_per_bucket as usize,
                    scope: "bucket".into(),
                });
            }
        }
        let in_member = (env.member_queued)(&exec);
        if in_member + tasks.len() > settings.max_per_member as usize {
            return Err(ExecError::QueueFull {
                queued: in_member,
                limit: settings.max_per_member as usize,
                scope: "member".into(),
            });
        }
        let mut starts = Vec::new();
        if delay_ms == 0 {
            let empty = Bucket::default();
            let mut last = self.last_batch;
            for (bucket, n) in &added {
                let b = queues
                    .and_then(|e| e.buckets.get(*bucket))
                    .unwrap_or(&empty);
                if b.in_flight.is_some() || b.retry_at.is_some_and(|at| at > env.now) {
                    continue;
                }
                let Some(member) = (env.pick)(&exec, bucket) else {
                    continue;
                };
                let batch = Self::next_batch(last, env.epoch);
                last = batch;
                starts.push(Step::Start {
                    count: b.next_count(settings.batch_size, *n),
                    attempt: b.attempts + 1,
                    batch,
                    exec: exec.clone(),
                    bucket: bucket.to_vec(),
                    member,
                });
            }
        }
        let mut steps: Vec<Step> = tasks
            .into_iter()
            .enumerate()
            .map(|(i, t)| Step::Enqueue {
                exec: exec.clone(),
                settings: settings.clone(),
                bucket: t.bucket,
                task: Task {
                    seq: first + i as u64,
                    body: t.task,
                },
                delay_ms,
            })
            .collect();
        steps.extend(starts);
        Ok((Answer::Accepted { seq: first }, Some(Change(steps))))
    }

    fn decide_complete(
        &self,
        exec: String,
        bucket: Vec<u8>,
        batch: u64,
        attempt: u32,
        outcome: Outcome,
        env: &Env<'_>,
    ) -> (Answer, Option<Change>) {
        let Some(queues) = self.execs.get(&exec) else {
            return (Answer::Stale, None);
        };
        let Some(b) = queues.buckets.get(&bucket) else {
            return (Answer::Stale, None);
        };
        let Some(f) = &b.in_flight else {
            return (Answer::Stale, None);
        };
        if f.batch != batch || f.attempt != attempt {
            return (Answer::Stale, None);
        }
        let settings = &queues.settings;
        let (answer, step, left, next_retry) = match outcome {
            Outcome::Done => (
                Answer::Completed,
                Step::Remove {
                    exec: exec.clone(),
                    bucket: bucket.clone(),
                    batch,
                },
                b.queue.len() - (f.count as usize).min(b.queue.len()),
                None,
            ),
            Outcome::Failed(_) if attempt >= settings.max_attempts => (
                Answer::DeadLettered,
                Step::Remove {
                    exec: exec.clone(),
                    bucket: bucket.clone(),
                    batch,
                },
                b.queue.len() - (f.count as usize).min(b.queue.len()),
                None,
            ),
            Outcome::Failed(_) => (
                Answer::Retrying,
                Step::Requeue {
                    exec: exec.clone(),
                    bucket: bucket.clone(),
                    batch,
                    attempts: attempt,
                    delay_ms: settings.retry_delay_ms,
                },
                b.queue.len(),
                Some((attempt, f.count)),
            ),
        };
        let mut steps = vec![step];
        // The bucket's next batch starts with the same change (no delay: none, or zero).
        let delayed = next_retry.is_some() && settings.retry_delay_ms > 0;
        if left > 0 && !delayed {
            if let Some(member) = (env.pick)(&exec, &bucket) {
                let (attempts, count) = match next_retry {
                    Some((attempts, count)) => (attempts, count.min(left as u32)),
                    None => (0, settings.batch_size.min(left as u32)),
                };
                steps.push(Step::Start {
                    exec,
                    bucket,
                    batch: Self::next_batch(self.last_batch, env.epoch),
                    count,
                    attempt: attempts + 1,
                    member,
                });
            }
        }
        (answer, Some(Change(steps)))
    }

    fn decide_decline(
        &self,
        exec: String,
        bucket: Vec<u8>,
        batch: u64,
        attempt: u32,
    ) -> (Answer, Option<Change>) {
        let matches = self
            .bucket(&exec, &bucket)
            .and_then(|b| b.in_flight.as_ref())
            .is_some_and(|f| f.batch == batch && f.attempt == attempt);
        if !matches {
            return (Answer::Stale, None);
        }
        (
            Answer::Declined,
            Some(Change(vec![Step::Requeue {
                exec,
                bucket,
                batch,
                attempts: attempt.saturating_sub(1),
                delay_ms: DECLINE_BACKOFF.as_millis() as u64,
            }])),
        )
    }

    fn decide_kick(&self, env: &Env<'_>) -> (Answer, Option<Change>) {
        let mut steps = Vec::new();
        let mut batch = self.last_batch;
        let mut started = 0u32;
        for (name, queues) in &self.execs {
            // Due delayed tasks join their queues (in sequence order) first.
            let due: Vec<u64> = queues
                .delayed
                .iter()
                .filter(|(_, d)| d.due <= env.now)
                .map(|(seq, _)| *seq)
                .collect();
            let mut joined: BTreeMap<&[u8], usize> = BTreeMap::new();
            for seq in &due {
                if let Some(d) = queues.delayed.get(seq) {
                    *joined.entry(&d.bucket).or_default() += 1;
                }
            }
            if !due.is_empty() {
                steps.push(Step::Release {
                    exec: name.clone(),
                    seqs: due,
                });
            }
            for (key, b) in &queues.buckets {
                if started as usize >= MAX_STARTS_PER_OP {
                    break;
                }
                let extra = joined.remove(key.as_slice()).unwrap_or(0);
                let mut attempts = b.attempts;
                let mut retry_at = b.retry_at;
                if let Some(f) = &b.in_flight {
                    if (env.alive)(&f.member) {
                        continue;
                    }
                    // Its member is gone: the batch is offered again, as a new attempt.
                    steps.push(Step::Requeue {
                        exec: name.clone(),
                        bucket: key.clone(),
                        batch: f.batch,
                        attempts: f.attempt,
                        delay_ms: 0,
                    });
                    attempts = f.attempt;
                    retry_at = None;
                }
                if b.queue.len() + extra == 0 || retry_at.is_some_and(|at| at > env.now) {
                    continue;
                }
                let Some(member) = (env.pick)(name, key) else {
                    continue;
                };
                let count = match (&b.in_flight, b.retry_count) {
                    (Some(f), _) => f.count,
                    (None, _) => b.next_count(queues.settings.batch_size, extra),
                };
                batch = Self::next_batch(batch, env.epoch);
                started += 1;
                steps.push(Step::Start {
                    exec: name.clone(),
                    bucket: key.clone(),
                    batch,
                    count,
                    attempt: attempts + 1,
                    member,
                });
            }
            // Tasks released into buckets that had none.
            for (key, extra) in joined {
                if started as usize >= MAX_STARTS_PER_OP {
                    break;
                }
                let Some(member) = (env.pick)(name, key) else {
                    continue;
                };
                batch = Self::next_batch(batch, env.epoch);
                started += 1;
                steps.push(Step::Start {
                    exec: name.clone(),
                    bucket: key.to_vec(),
                    batch,
                    count: queues.settings.batch_size.min(extra as u32),
                    attempt: 1,
                    member,
                });
            }
        }
        if steps.is_empty() {
            return (Answer::Kicked { started: 0 }, None);
        }
        (Answer::Kicked { started }, Some(Change(steps)))
    }

    /// Whether a [`Op::Kick`] would change anything now: a delayed task is due, a ready
    /// bucket has someone to process it, or a batch's member is gone.
    pub fn needs_kick(&self, env: &Env<'_>) -> bool {
        self.execs.iter().any(|(name, q)| {
            q.delayed.values().any(|d| d.due <= env.now)
                || q.buckets.iter().any(|(key, b)| match &b.in_flight {
                    Some(f) => !(env.alive)(&f.member),
                    None => b.ready(env.now) && (env.pick)(name, key).is_some(),
                })
        })
    }

    /// The earliest instant at which a delay ends (a retry, a delayed task).
    pub fn next_wake(&self) -> Option<Instant> {
        self.execs
            .values()
            .flat_map(|q| {
                q.delayed.values().map(|d| d.due).chain(
                    q.buckets
                        .values()
                        .filter(|b| b.in_flight.is_none())
                        .filter_map(|b| b.retry_at),
                )
            })
            .min()
    }

    /// The offers for every batch in flight here (to send again: a new owner, or a lost
    /// message).
    pub fn offers(&self, partition: u32) -> Vec<Offer> {
        self.offers_where(partition, |_| true)
    }

    /// The offers of the batches in flight here that `want` (by batch id and member),
    /// without copying the others' tasks.
    pub fn offers_where(
        &self,
        partition: u32,
        mut want: impl FnMut(&InFlight) -> bool,
    ) -> Vec<Offer> {
        let mut out = Vec::new();
        for (name, q) in &self.execs {
            for (key, b) in &q.buckets {
                if let Some(f) = b.in_flight.as_ref().filter(|f| want(f)) {
                    out.push(offer(name, partition, key, b, f));
                }
            }
        }
        out
    }

    /// Applies a change (on the owner and every backup) at `now`; returns the batches to
    /// offer. A step that does not fit the state (a replica that diverged) is an error:
    /// the replica is then resynchronised.
    pub fn apply(
        &mut self,
        change: &Change,
        partition: u32,
        now: Instant,
    ) -> Result<Vec<Output>, ExecError> {
        let mut out = Vec::new();
        for step in &change.0 {
            self.apply_step(step, partition, now, &mut out)?;
        }
        Ok(out)
    }

    fn apply_step(
        &mut self,
        step: &Step,
        partition: u32,
        now: Instant,
        out: &mut Vec<Output>,
    ) -> Result<(), ExecError> {
        let diverged = |what: &str| ExecError::BadCopy(format!("replica diverged: {what}"));
        match step {
            Step::Define { exec, settings } => {
                self.definitions.insert(exec.clone(), settings.clone());
            }
            Step::Enqueue {
                exec,
                settings,
                bucket,
                task,
                delay_ms,
            } => {
                let q = self
                    .execs
                    .entry(exec.clone())
                    .or_insert_with(|| ExecQueues::new(settings.clone()));
                q.settings = settings.clone();
                q.queued += 1;
                self.next_seq = self.next_seq.max(task.seq + 1);
                if *delay_ms == 0 {
                    q.buckets
                        .entry(bucket.clone())
                        .or_default()
                        .queue
                        .push_back(task.clone());
                } else {
                    q.delayed.insert(
                        task.seq,
                        Delayed {
                            bucket: bucket.clone(),
                            task: task.clone(),
                            due: now + ms(*delay_ms),
                        },
                    );
                }
            }
            Step::Release { exec, seqs } => {
                let q = self
                    .execs
                    .get_mut(exec)
                    .ok_or_else(|| diverged("release"))?;
                for seq in seqs {
                    let d = q.delayed.remove(seq).ok_or_else(|| diverged("release"))?;
                    q.buckets
                        .entry(d.bucket)
                        .or_default()
                        .queue
                        .push_back(d.task);
                }
            }
            Step::Start {
                exec,
                bucket,
                batch,
                count,
                attempt,
                member,
            } => {
                let q = self.execs.get_mut(exec).ok_or_else(|| diverged("start"))?;
                let b = q.buckets.get_mut(bucket).ok_or_else(|| diverged("start"))?;
                if b.in_flight.is_some() || *count == 0 || *count as usize > b.queue.len() {
                    return Err(diverged("start"));
                }
                let f = InFlight {
                    batch: *batch,
                    count: *count,
                    attempt: *attempt,
                    member: member.clone(),
                };
                self.last_batch = self.last_batch.max(*batch);
                out.push(Output::Offer(offer(exec, partition, bucket, b, &f)));
                b.in_flight = Some(f);
                b.retry_at = None;
            }
            Step::Remove {
                exec,
                bucket,
                batch,
            } => {
                let q = self.execs.get_mut(exec).ok_or_else(|| diverged("remove"))?;
                let b = q
                    .buckets
                    .get_mut(bucket)
                    .ok_or_else(|| diverged("remove"))?;
                let f = b
                    .in_flight
                    .take()
                    .filter(|f| f.batch == *batch)
                    .ok_or_else(|| diverged("remove"))?;
                let n = (f.count as usize).min(b.queue.len());
                b.queue.drain(..n);
                q.queued -= n.min(q.queued);
                b.attempts = 0;
                b.retry_count = None;
                b.retry_at = None;
                if b.is_idle() {
                    q.buckets.remove(bucket);
                }
            }
            Step::Requeue {
                exec,
                bucket,
                batch,
                attempts,
                delay_ms,
            } => {
                let q = self
                    .execs
                    .get_mut(exec)
                    .ok_or_else(|| diverged("requeue"))?;
                let b = q
                    .buckets
                    .get_mut(bucket)
                    .ok_or_else(|| diverged("requeue"))?;
                let f = b
                    .in_flight
                    .take()
                    .filter(|f| f.batch == *batch)
                    .ok_or_else(|| diverged("requeue"))?;
                b.attempts = *attempts;
                b.retry_count = (*attempts > 0).then_some(f.count);
                b.retry_at = (*delay_ms > 0).then(|| now + ms(*delay_ms));
            }
        }
        Ok(())
    }

    /// The state as a copy (delays as time left from `now`).
    pub fn to_copy(&self, now: Instant) -> PartitionCopy {
        let left = |at: Instant| at.saturating_duration_since(now).as_millis() as u64;
        PartitionCopy {
            execs: self
                .execs
                .iter()
                .map(|(name, q)| ExecCopy {
                    name: name.clone(),
                    settings: q.settings.clone(),
                    buckets: q
                        .buckets
                        .iter()
                        .map(|(key, b)| BucketCopy {
                            key: key.clone(),
                            queue: b.queue.iter().cloned().collect(),
                            in_flight: b.in_flight.clone(),
                            attempts: b.attempts,
                            retry_count: b.retry_count,
                            retry_in_ms: b.retry_at.map(left),
                        })
                        .collect(),
                    delayed: q
                        .delayed
                        .values()
                        .map(|d| DelayedCopy {
                            bucket: d.bucket.clone(),
                            task: d.task.clone(),
                            due_in_ms: left(d.due),
                        })
                        .collect(),
                })
                .collect(),
            definitions: self
                .definitions
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            next_seq: self.next_seq,
            last_batch: self.last_batch,
        }
    }

    /// The state a copy describes, delays counted from `now`. Checks the bounds: a copy
    /// comes from the network.
    pub fn from_copy(copy: PartitionCopy, now: Instant) -> Result<Self, ExecError> {
        let bad = |what: &str| ExecError::BadCopy(what.to_string());
        if copy.definitions.len() > MAX_DEFINITIONS || copy.execs.len() > MAX_DEFINITIONS {
            return Err(bad("too many executors"));
        }
        let mut execs = BTreeMap::new();
        for e in copy.execs {
            check_name(&e.name).map_err(|e| bad(&e.to_string()))?;
            e.settings.check().map_err(|e| bad(&e.to_string()))?;
            let mut q = ExecQueues::new(e.settings);
            for b in e.buckets {
                if b.key.len() > MAX_BUCKET_BYTES
                    || b.queue.len() > q.settings.max_per_bucket as usize
                    || b.queue.iter().any(|t| t.body.len() > MAX_TASK_BYTES)
                {
                    return Err(bad("bucket out of bounds"));
                }
                if b.in_flight
                    .as_ref()
                    .is_some_and(|f| f.count as usize > b.queue.len())
                {
                    return Err(bad("batch larger than its queue"));
                }
                q.queued += b.queue.len();
                q.buckets.insert(
                    b.key,
                    Bucket {
                        queue: b.queue.into(),
                        in_flight: b.in_flight,
                        attempts: b.attempts,
                        retry_count: b.retry_count,
                        retry_at: b.retry_in_ms.map(|m| now + ms(m)),
                    },
                );
            }
            for d in e.delayed {
                if d.bucket.len() > MAX_BUCKET_BYTES || d.task.body.len() > MAX_TASK_BYTES {
                    return Err(bad("delayed task out of bounds"));
                }
                q.queued += 1;
                q.delayed.insert(
                    d.task.seq,
                    Delayed {
                        bucket: d.bucket,
                        task: d.task,
                        due: now + ms(d.due_in_ms),
                    },
                );
            }
            if q.queued > q.settings.max_per_member as usize {
                return Err(bad("more tasks than the executor's bound"));
            }
            execs.insert(e.name, q);
        }
        Ok(Self {
            execs,
            definitions: copy.definitions.into_iter().collect(),
            next_seq: copy.next_seq,
            last_batch: copy.last_batch,
        })
    }
}

fn offer(exec: &str, partition: u32, bucket: &[u8], b: &Bucket, f: &InFlight) -> Offer {
    Offer {
        exec: exec.to_string(),
        partition,
        bucket: bucket.to_vec(),
        batch: f.batch,
        attempt: f.attempt,
        member: f.member.clone(),
        tasks: b.queue.iter().take(f.count as usize).cloned().collect(),
    }
}

#[cfg(test)]
mod tests;
