//! grid's cluster scheduler (Atlassian's `SchedulerService` API): jobs that fire once per
//! cluster at their time, never twice and never lost, or locally on one member.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use grid_exec::scheduler::{JobConfig, JobRequest, JobResponse, Schedule};
//!
//! let grid = grid::Grid::builder().cluster_name("scheduler-doc").bind("127.0.0.1:0").no_seeds().start().await?;
//! # grid.cluster().joined().await;
//! let scheduler = grid.scheduler();
//! let (tx, mut ran) = tokio::sync::mpsc::channel(8);
//! scheduler
//!     .register_job_runner("purge", move |request: JobRequest| {
//!         let tx = tx.clone();
//!         async move {
//!             let days: u32 = request.parameters().unwrap_or(30);
//!             let _ = tx.send(days).await;
//!             JobResponse::success()
//!         }
//!     })
//!     .await;
//! let config = JobConfig::for_runner("purge")
//!     .schedule(Schedule::interval(Duration::from_millis(200), None))
//!     .parameters(&7u32)?;
//! scheduler.schedule_job("purge-old-orders", config).await?;
//! assert_eq!(ran.recv().await, Some(7));
//! # let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
//! # while scheduler.run_history("purge-old-orders").await?.is_empty() && tokio::time::Instant::now() < deadline {
//! #     tokio::time::sleep(Duration::from_millis(20)).await;
//! # }
//! let history = scheduler.run_history("purge-old-orders").await?;
//! assert_eq!(history[0].outcome, grid_exec::scheduler::Outcome::Success);
//! scheduler.unschedule_job("purge-old-orders").await?;
//! assert!(scheduler.job_details("purge-old-orders").await?.is_none());
//! # grid.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! # Semantics
//! - **Once per cluster** ([`RunMode::OncePerCluster`]): a job lives in the partition of its
//!   id, on the owner and its backups, until unscheduled. The owner arms a timer at the
//!   partition's earliest slot; when it fires, the owner claims the due slots with a
//!   replicated change, then sends each run to a member that has the runner (itself when
//!   it has one), which runs it and reports the outcome with another operation. When no
//!   live member has the runner, the slot is recorded [`Outcome::Unavailable`].
//! - **Never twice**: a slot is claimed before its run is sent, and a claim moves the job's
//!   next slot past it on every replica, so a new owner (after a promotion or a migration),
//!   a repeated timer or a replaced job cannot claim it again. [`Scheduler::schedule_job`]
//!   replaces a job; scheduling the same configuration again changes nothing, and a
//!   replacement never fires a slot its predecessor fired: concurrent calls from several
//!   members leave one job and fire each slot once.
//! - **Never lost**: when the owner dies, the promoted backup has the job table; its slots
//!   that passed fire at once (missed slots of one job collapse into one run by default;
//!   [`MissedSlots`]). A run whose member dies is recorded [`Outcome::Aborted`] (or run once
//!   more elsewhere: [`JobConfig::retry_if_member_dies`]). No member tells the partition
//!   that it started a run (that would be one more replicated write per run), so a run
//!   claimed for a member that dies before starting it is `Aborted` as well, and a retried
//!   run may have started on the dead member already.
//! - **Runs wait for their claim**: a run is sent only once the backups confirmed the
//!   change that claimed it. When a backup did not confirm it, the owner holds the run and
//!   fires again every 100 ms (a change even when nothing is due) until a change is
//!   confirmed; the job's slots that come due meanwhile join the held run (it then stands
//!   for them too) instead of finding it "still running". A run on a member that has left
//!   does not count as running either.
//! - **Overlap**: a slot that finds the previous run still running is recorded
//!   [`Outcome::Aborted`], "still running" ([`JobConfig::allow_overlap`] to allow it).
//! - **Locally** ([`RunMode::Locally`]): the job lives on the member that scheduled it, is
//!   fired by its clock and run by its runner, and disappears with it.
//! - **Time**: slots are Unix ms on the runtime's clock ([`grid_core::clock::unix_ms`]),
//!   so tests and the simulator drive them.
//! - **Runners** are registered per member and are not persisted. Members tell each other
//!   which runners they have with a service message (on every change, when a member joins,
//!   and every [`ANNOUNCE_EVERY`]).
//!
//! # Layout
//! - [`schedule`]: [`Schedule`] (interval, one time, Quartz cron in a time zone).
//! - [`job`]: the job's configuration, request, response and records.
//! - [`table`]: one partition's job table as a sans-IO state machine (decide, apply).
//! - [`service`]: the table on the runtime's service interface ([`SchedulerService`]).

pub mod job;
mod local;
pub mod schedule;
pub mod service;
pub mod table;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;
use grid_core::runtime::service::{OpKind, ServiceHandle};
use grid_core::runtime::Runtime;
use grid_net::membership::{Cluster, MemberEvent};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::{debug, warn};

pub use job::{
    JobConfig, JobDetails, JobRequest, JobResponse, MissedSlots, Outcome, RunMode, RunRecord,
    Running,
};
pub use schedule::Schedule;
pub use service::SchedulerService;

use service::Msg;
use table::{Answer, Op};

/// How often a member tells the others its runner keys again (besides every change).
pub const ANNOUNCE_EVERY: Duration = Duration::from_secs(2);
/// How long [`Scheduler::jobs_by_runner`] waits for each member.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a scheduler operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum SchedulerError {
    /// The schedule does not parse (a cron expression, a time zone) or cannot be
    /// evaluated.
    #[error("bad schedule: {0}")]
    BadSchedule(String),
    /// The job id is longer than 1 KiB.
    #[error("job id is {len} bytes long; at most 1024")]
    IdTooLong {
        /// Its length.
        len: usize,
    },
    /// The encoded parameters are larger than 64 KiB.
    #[error("job parameters are {len} bytes; at most 65536")]
    ParametersTooLarge {
        /// Their size.
        len: usize,
    },
    /// Too many jobs in the job's partition.
    #[error("too many jobs in one partition (at most {limit})")]
    TooManyJobs {
        /// The limit.
        limit: usize,
    },
    /// Parameters could not be encoded or decoded.
    #[error("job parameters: {0}")]
    Parameters(String),
    /// A copy of a partition's job table was malformed (from the network).
    #[error("bad job table copy: {0}")]
    BadCopy(String),
    /// An operation that is not a read was sent as one.
    #[error("not a read")]
    NotARead,
    /// The cluster did not run the operation (no owner in time, shutting down, ...).
    #[error("cluster: {0}")]
    Cluster(String),
}

impl From<grid_core::GridError> for SchedulerError {
    fn from(e: grid_core::GridError) -> Self {
        Self::Cluster(e.to_string())
    }
}

/// Runs a job: an async closure `Fn(JobRequest) -> impl Future<Output = R>` where `R` is a
/// [`JobResponse`], `()` or `Result<(), E: Display>`, or a type of your own.
pub trait JobRunner: Send + Sync + 'static {
    /// Runs one slot of a job.
    fn run(&self, request: JobRequest) -> BoxFuture<'static, JobResponse>;
}

impl<F, Fut, R> JobRunner for F
where
    F: Fn(JobRequest) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = R> + Send + 'static,
    R: Into<JobResponse>,
{
    fn run(&self, request: JobRequest) -> BoxFuture<'static, JobResponse> {
        let fut = self(request);
        Box::pin(async move { fut.await.into() })
    }
}

struct Inner {
    handle: ServiceHandle<SchedulerService>,
    runtime: Runtime,
    cluster: Cluster,
    me: String,
    local: Arc<Mutex<local::LocalJobs>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Local jobs go with their member.
        local::stop_all(&self.local);
    }
}

/// A member's scheduler. Cheap to clone; `grid::Grid` starts one on every member
/// (`grid.scheduler()`).
#[derive(Clone)]
pub struct Scheduler {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("member", &self.inner.me)
            .finish()
    }
}

impl Scheduler {
    /// Registers the scheduler service on `runtime` (every member does, lite members too)
    /// and starts the member's run queue and runner announcements.
    pub fn start(runtime: Runtime, cluster: Cluster) -> Self {
        let (runs_tx, runs_rx) = mpsc::channel(service::RUN_QUEUE);
        let service = Arc::new(SchedulerService::new(
            runtime.config().table.partitions,
            cluster.clone(),
            runs_tx,
        ));
        let handle = runtime.register_service(service);
        let inner = Arc::new(Inner {
            handle,
            runtime,
            me: cluster.local_member().id.to_string(),
            cluster: cluster.clone(),
            local: Arc::new(Mutex::new(local::LocalJobs::default())),
        });
        tokio::spawn(run_queue(Arc::downgrade(&inner), runs_rx));
        tokio::spawn(announce(Arc::downgrade(&inner), cluster));
        Self { inner }
    }

    /// Registers `runner` under `key` on this member (a second registration replaces the
    /// first), and tells the other members. Not persisted: a member registers its runners
    /// when it starts.
    pub async fn register_job_runner(&self, key: &str, runner: impl JobRunner) {
        self.service()
            .runners
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.to_string(), Arc::new(runner));
        announce_to_all(&self.inner).await;
    }

    /// Unregisters runner `key` on this member, and tells the other members.
    pub async fn unregister_job_runner(&self, key: &str) {
        self.service()
            .runners
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
        announce_to_all(&self.inner).await;
    }

    /// Schedules job `id` (replacing a job with the same id). A cron expression that does
    /// not parse is an error here. Once per cluster, the job is kept in the grid until
    /// unscheduled; locally, on this member until it stops.
    pub async fn schedule_job(&self, id: &str, config: JobConfig) -> Result<(), SchedulerError> {
        config.schedule.check()?;
        match config.run_mode {
            RunMode::Locally => {
                local::schedule(&self.inner.local, self.service().clone(), id, config)
            }
            RunMode::OncePerCluster => {
                local::unschedule(&self.inner.local, id);
                let op = Op::Schedule {
                    id: id.to_string(),
                    config,
                };
                self.execute(id, op, OpKind::IdempotentWrite)
                    .await
                    .map(|_| ())
            }
        }
    }

    /// Removes job `id`, here and everywhere (an unknown id is ignored). A run under way
    /// goes on; no slot fires after this returns.
    pub async fn unschedule_job(&self, id: &str) -> Result<(), SchedulerError> {
        local::unschedule(&self.inner.local, id);
        let op = Op::Unschedule { id: id.to_string() };
        self.execute(id, op, OpKind::IdempotentWrite)
            .await
            .map(|_| ())
    }

    /// Job `id`'s configuration, next slot, runs under way and history (`None`: no such
    /// job). A local job of this member is found first.
    pub async fn job_details(&self, id: &str) -> Result<Option<JobDetails>, SchedulerError> {
        if let Some(d) = local::details(&self.inner.local, id) {
            return Ok(Some(d));
        }
        let op = Op::Details { id: id.to_string() };
        match self.execute(id, op, OpKind::Read).await? {
            Answer::Details(d) => Ok(d.map(|d| *d)),
            Answer::Done | Answer::Fired(_) => Ok(None),
        }
    }

    /// When job `id` fires next (Unix ms; `None`: no such job, or it will not fire again).
    pub async fn next_run_time(&self, id: &str) -> Result<Option<u64>, SchedulerError> {
        Ok(self.job_details(id).await?.and_then(|d| d.next_run_ms))
    }

    /// Job `id`'s last runs, oldest first (empty: no such job, or no run yet).
    pub async fn run_history(&self, id: &str) -> Result<Vec<RunRecord>, SchedulerError> {
        Ok(self
            .job_details(id)
            .await?
            .map(|d| d.history)
            .unwrap_or_default())
    }

    /// Every job of runner `key`: this member's local ones and the cluster's (each data
    /// member is asked for the partitions it owns; a member that does not answer in time
    /// is an error).
    pub async fn jobs_by_runner(&self, key: &str) -> Result<Vec<JobDetails>, SchedulerError> {
        let mut jobs = local::by_runner(&self.inner.local, key);
        let mut cluster_jobs: HashMap<String, JobDetails> = HashMap::new();
        for m in self
            .inner
            .cluster
            .members()
            .iter()
            .filter(|m| m.is_data_member())
        {
            let answer = self
                .inner
                .handle
                .ask(&m.id, &Msg::JobsByRunner(key.to_string()), ASK_TIMEOUT)
                .await?;
            if let Msg::Jobs(found) = answer {
                for j in found {
                    cluster_jobs.insert(j.id.clone(), j);
                }
            }
        }
        let mut cluster_jobs: Vec<JobDetails> = cluster_jobs.into_values().collect();
        cluster_jobs.sort_by(|a, b| a.id.cmp(&b.id));
        jobs.extend(cluster_jobs);
        Ok(jobs)
    }

    /// The members that have runner `key`, as this member knows (itself included).
    pub fn members_with_runner(&self, key: &str) -> Vec<String> {
        let mut members = self.service().members_with_runner(key);
        if self.service().has_runner(key) {
            members.push(self.inner.me.clone());
            members.sort();
        }
        members
    }

    /// The partition of job `id`.
    pub fn partition_of(&self, id: &str) -> u32 {
        self.inner.runtime.partition_of(id.as_bytes())
    }

    /// The scheduler service on this member (tests look inside).
    #[doc(hidden)]
    pub fn service(&self) -> &Arc<SchedulerService> {
        self.inner.handle.service()
    }

    async fn execute(&self, id: &str, op: Op, kind: OpKind) -> Result<Answer, SchedulerError> {
        let p = self.partition_of(id);
        self.inner.handle.execute(p, op, kind).await?
    }
}

/// Tells every live member this member's runner keys.
async fn announce_to_all(inner: &Inner) {
    let keys = inner.handle.service().runner_keys();
    let members: Vec<String> = inner
        .cluster
        .members()
        .iter()
        .filter(|m| *m.id != *inner.me)
        .map(|m| m.id.to_string())
        .collect();
    for m in members {
        if let Err(e) = inner.handle.send(&m, &Msg::Runners(keys.clone())).await {
            debug!(member = %m, error = %e, "runner keys not sent");
        }
    }
}

/// Tells the members this member's runners: every [`ANNOUNCE_EVERY`], and at once to a
/// member that joins. Forgets what a member that left gracefully said.
async fn announce(inner: Weak<Inner>, cluster: Cluster) {
    let mut events = cluster.events();
    let mut tick = tokio::time::interval(ANNOUNCE_EVERY);
    loop {
        tokio::select! {
            event = events.recv() => {
                let Some(event) = event else { return };
                let Some(inner) = inner.upgrade() else { return };
                match event {
                    MemberEvent::Joined(m) => {
                        let keys = inner.handle.service().runner_keys();
                        let _ = inner.handle.send(&m.id, &Msg::Runners(keys)).await;
                    }
                    MemberEvent::Left(m) => {
                        inner.handle.service().forget_member(&m.id);
                    }
                    // A member that failed keeps its runner keys here: a member falsely
                    // suspected (a pause, a lossy wire, or this member's own pause, after
                    // which it suspects everyone) is back without announcing them again,
                    // and until its next announcement this member would record its jobs
                    // `Unavailable`. The directory is read through liveness, and a restarted
                    // member announces its keys when it starts and registers its runners.
                    MemberEvent::Failed(_) => {}
                }
            }
            _ = tick.tick() => {
                let Some(inner) = inner.upgrade() else { return };
                announce_to_all(&inner).await;
            }
        }
    }
}

/// Starts the runs sent to this member, each in a task of its own, and reports their
/// outcome to the job's partition.
async fn run_queue(inner: Weak<Inner>, mut runs: mpsc::Receiver<JobRequest>) {
    while let Some(request) = runs.recv().await {
        let Some(inner) = inner.upgrade() else { return };
        tokio::spawn(run_one(inner, request));
    }
}

async fn run_one(inner: Arc<Inner>, request: JobRequest) {
    let runner = inner
        .handle
        .service()
        .runners
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .get(&request.runner_key)
        .cloned();
    let id = request.job_id.clone();
    let run_id = request.run_id;
    let started = grid_core::clock::unix_ms();
    let (started_at_ms, response) = match runner {
        None => (
            None,
            JobResponse {
                outcome: Outcome::Unavailable,
                message: Some(format!(
                    "runner {:?} is not registered on {}",
                    request.runner_key, inner.me
                )),
            },
        ),
        Some(runner) => {
            let run = std::panic::AssertUnwindSafe(runner.run(request)).catch_unwind();
            let response = run
                .await
                .unwrap_or_else(|_| JobResponse::failed("the runner panicked"));
            (Some(started), response)
        }
    };
    let duration = grid_core::clock::unix_ms().saturating_sub(started);
    metrics::counter!("grid_scheduler_runs_total", "outcome" => format!("{:?}", response.outcome))
        .increment(1);
    let op = Op::Finish {
        id: id.clone(),
        run_id,
        member: inner.me.clone(),
        started_at_ms,
        duration_ms: started_at_ms.map(|_| duration),
        outcome: response.outcome,
        message: response.message,
    };
    let p = inner.runtime.partition_of(id.as_bytes());
    // Finishing a run is idempotent (a run that is no longer under way is ignored).
    for attempt in 1..=5u32 {
        match inner
            .handle
            .execute(p, op.clone(), OpKind::IdempotentWrite)
            .await
        {
            Ok(_) => return,
            Err(e) => {
                warn!(job = %id, run = run_id, attempt, error = %e, "run outcome not recorded yet");
                tokio::time::sleep(Duration::from_millis(200) * attempt).await;
            }
        }
    }
}
