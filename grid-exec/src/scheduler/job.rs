//! What a job is: its configuration ([`JobConfig`]), what a run gets ([`JobRequest`]) and
//! answers ([`JobResponse`]), and what is recorded of it ([`RunRecord`], [`JobDetails`]).

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{Schedule, SchedulerError};

/// Where a job runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RunMode {
    /// At each slot, one member of the cluster runs it (one that has the runner). The job
    /// is kept in the grid (the partition of its id, with backups) until unscheduled.
    OncePerCluster,
    /// Only on the member that scheduled it, by its clock; not kept anywhere else, gone
    /// with the member.
    Locally,
}

/// What to do with slots that passed without firing (the owner died, the cluster was
/// down, or a run took longer than several periods).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MissedSlots {
    /// Several missed slots of one job make one run (the latest slot's), fired at once.
    /// The default (Atlassian's behaviour).
    Collapse,
    /// Every missed slot fires, one run each, one after the other.
    FireEach,
    /// Slots later than [`JobConfig::missed_grace`] are skipped; the next one on time fires.
    Skip,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Outcome {
    /// The runner said so.
    Success,
    /// The runner failed (it returned an error, or panicked).
    Failed,
    /// Not run to its end: the previous run was still running, the running member died,
    /// or the runner aborted it.
    Aborted,
    /// No live member had the job's runner.
    Unavailable,
}

/// A job: which runner runs it, where, when, with what. Build one with
/// [`JobConfig::for_runner`].
///
/// ```
/// use std::time::Duration;
/// use grid_exec::scheduler::{JobConfig, RunMode, Schedule, MissedSlots};
///
/// let config = JobConfig::for_runner("cleanup")
///     .schedule(Schedule::cron("0 0 3 * * ?", "Europe/Paris")?)
///     .parameters(&("tmp", 7u32))?
///     .missed_slots(MissedSlots::Collapse);
/// assert_eq!(config.run_mode, RunMode::OncePerCluster);
/// # Ok::<(), grid_exec::scheduler::SchedulerError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobConfig {
    /// The runner's key (see `Scheduler::register_job_runner`).
    pub runner_key: String,
    /// Once per cluster (default) or locally.
    pub run_mode: RunMode,
    /// When it fires.
    pub schedule: Schedule,
    /// Its parameters, MessagePack-encoded (see [`JobConfig::parameters`] and
    /// [`JobRequest::parameters`]).
    #[serde(with = "grid_core::codec::bin")]
    pub parameters: Vec<u8>,
    /// What to do with missed slots (default [`MissedSlots::Collapse`]).
    pub missed_slots: MissedSlots,
    /// How late a slot may fire before [`MissedSlots::Skip`] skips it, in ms (default
    /// 10 s: more than failure detection, so that a promotion's late slot still fires).
    pub missed_grace_ms: u64,
    /// Whether a slot may fire while the previous run of the job is still running
    /// (default false: the slot is recorded [`Outcome::Aborted`], "still running").
    pub allow_overlap: bool,
    /// Whether a run whose member died is run again once, on another member (default
    /// false: it is recorded [`Outcome::Aborted`]).
    pub retry_if_member_dies: bool,
}

impl JobConfig {
    /// A job for the runner `key`: once per cluster, every minute from a minute after it is
    /// scheduled, no parameters.
    pub fn for_runner(key: &str) -> Self {
        Self {
            runner_key: key.to_string(),
            run_mode: RunMode::OncePerCluster,
            schedule: Schedule::interval(Duration::from_secs(60), None),
            parameters: Vec::new(),
            missed_slots: MissedSlots::Collapse,
            missed_grace_ms: 10_000,
            allow_overlap: false,
            retry_if_member_dies: false,
        }
    }

    /// When it fires.
    pub fn schedule(mut self, schedule: Schedule) -> Self {
        self.schedule = schedule;
        self
    }

    /// Where it runs.
    pub fn run_mode(mut self, mode: RunMode) -> Self {
        self.run_mode = mode;
        self
    }

    /// Its parameters: any serde value, read back typed by [`JobRequest::parameters`].
    pub fn parameters<P: Serialize>(mut self, parameters: &P) -> Result<Self, SchedulerError> {
        self.parameters = grid_core::codec::encode(parameters)
            .map_err(|e| SchedulerError::Parameters(e.to_string()))?;
        Ok(self)
    }

    /// What to do with missed slots.
    pub fn missed_slots(mut self, missed: MissedSlots) -> Self {
        self.missed_slots = missed;
        self
    }

    /// How late a slot may be before [`MissedSlots::Skip`] skips it.
    pub fn missed_grace(mut self, grace: Duration) -> Self {
        self.missed_grace_ms = grace.as_millis() as u64;
        self
    }

    /// Allows a slot to fire while the previous run still runs.
    pub fn allow_overlap(mut self, allow: bool) -> Self {
        self.allow_overlap = allow;
        self
    }

    /// Runs a run whose member died once more, elsewhere.
    pub fn retry_if_member_dies(mut self, retry: bool) -> Self {
        self.retry_if_member_dies = retry;
        self
    }

    /// The parameters, decoded.
    pub fn decode_parameters<P: DeserializeOwned>(&self) -> Result<P, SchedulerError> {
        grid_core::codec::decode(&self.parameters)
            .map_err(|e| SchedulerError::Parameters(e.to_string()))
    }
}

/// What a runner gets for one run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRequest {
    /// The job.
    pub job_id: String,
    /// The run (unique within the job's partition).
    pub run_id: u64,
    /// The runner's key.
    pub runner_key: String,
    /// Once per cluster or locally.
    pub run_mode: RunMode,
    /// The slot this run is for (Unix ms): when it was due.
    pub scheduled_at_ms: u64,
    /// When the slot was claimed (Unix ms).
    pub fired_at_ms: u64,
    /// How many slots this run stands for (more than 1 when missed slots were collapsed).
    pub slots: u32,
    /// The parameters (see [`JobRequest::parameters`]).
    #[serde(with = "grid_core::codec::bin")]
    pub raw_parameters: Vec<u8>,
}

impl JobRequest {
    /// The parameters, decoded as the type they were given as.
    pub fn parameters<P: DeserializeOwned>(&self) -> Result<P, SchedulerError> {
        grid_core::codec::decode(&self.raw_parameters)
            .map_err(|e| SchedulerError::Parameters(e.to_string()))
    }
}

/// What a runner answers: the outcome and a message for the run history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobResponse {
    /// Success, failed or aborted.
    pub outcome: Outcome,
    /// A message for the history.
    pub message: Option<String>,
}

impl JobResponse {
    /// The run succeeded.
    pub fn success() -> Self {
        Self {
            outcome: Outcome::Success,
            message: None,
        }
    }

    /// The run failed, with why.
    pub fn failed(message: impl Into<String>) -> Self {
        Self {
            outcome: Outcome::Failed,
            message: Some(message.into()),
        }
    }

    /// The run was given up, with why.
    pub fn aborted(message: impl Into<String>) -> Self {
        Self {
            outcome: Outcome::Aborted,
            message: Some(message.into()),
        }
    }
}

impl From<()> for JobResponse {
    fn from(_: ()) -> Self {
        Self::success()
    }
}

impl<E: std::fmt::Display> From<Result<(), E>> for JobResponse {
    fn from(r: Result<(), E>) -> Self {
        match r {
            Ok(()) => Self::success(),
            Err(e) => Self::failed(e.to_string()),
        }
    }
}

/// One run, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRecord {
    /// The run.
    pub run_id: u64,
    /// The slot it was for (Unix ms).
    pub scheduled_at_ms: u64,
    /// When the slot was claimed (Unix ms).
    pub fired_at_ms: u64,
    /// When the runner started (Unix ms; `None`: it never did).
    pub started_at_ms: Option<u64>,
    /// How long the runner ran, in ms.
    pub duration_ms: Option<u64>,
    /// How it ended.
    pub outcome: Outcome,
    /// The runner's message, or why it did not run.
    pub message: Option<String>,
    /// The member that ran it (or was to).
    pub member: Option<String>,
    /// How many slots it stood for.
    pub slots: u32,
}

/// A run under way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Running {
    /// The run.
    pub run_id: u64,
    /// The slot.
    pub scheduled_at_ms: u64,
    /// When the slot was claimed.
    pub fired_at_ms: u64,
    /// How many slots it stands for.
    pub slots: u32,
    /// The member it was sent to.
    pub member: String,
    /// 1, or 2 for the retry after a member died.
    pub attempt: u8,
}

/// What `Scheduler::job_details` tells about a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobDetails {
    /// The job.
    pub id: String,
    /// Its configuration.
    pub config: JobConfig,
    /// Its next slot (Unix ms; `None`: it will not fire again).
    pub next_run_ms: Option<u64>,
    /// The last slot fired (Unix ms).
    pub last_slot_ms: Option<u64>,
    /// Runs under way.
    pub running: Vec<Running>,
    /// The last runs, oldest first.
    pub history: Vec<RunRecord>,
}
