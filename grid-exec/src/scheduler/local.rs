//! Local jobs ([`RunMode::Locally`](super::RunMode::Locally)): kept on the member that
//! scheduled them, fired by its clock, run by its runner, gone with it. One task per job.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use futures::FutureExt;
use tokio::task::AbortHandle;

use super::job::{
    JobConfig, JobDetails, JobRequest, JobResponse, MissedSlots, Outcome, RunRecord, Running,
};
use super::service::SchedulerService;
use super::table::{latest_due, MAX_HISTORY};
use super::SchedulerError;

/// A member's local jobs.
#[derive(Default)]
pub(crate) struct LocalJobs {
    jobs: HashMap<String, LocalJob>,
    next_run: u64,
}

struct LocalJob {
    config: JobConfig,
    next_ms: Option<u64>,
    last_slot: Option<u64>,
    running: Option<Running>,
    history: VecDeque<RunRecord>,
    task: AbortHandle,
}

fn lock(m: &Mutex<LocalJobs>) -> MutexGuard<'_, LocalJobs> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Schedules (or replaces) local job `id`.
pub(crate) fn schedule(
    jobs: &Arc<Mutex<LocalJobs>>,
    service: Arc<SchedulerService>,
    id: &str,
    config: JobConfig,
) -> Result<(), SchedulerError> {
    let first = config
        .schedule
        .first_at_or_after(grid_core::clock::unix_ms())?;
    let mut all = lock(jobs);
    let history = match all.jobs.remove(id) {
        Some(old) => {
            old.task.abort();
            old.history
        }
        None => VecDeque::new(),
    };
    let task = tokio::spawn(run_local(
        Arc::downgrade(jobs),
        service,
        id.to_string(),
        config.clone(),
        first,
    ))
    .abort_handle();
    all.jobs.insert(
        id.to_string(),
        LocalJob {
            config,
            next_ms: first,
            last_slot: None,
            running: None,
            history,
            task,
        },
    );
    Ok(())
}

/// Removes local job `id` (its run under way, if any, is stopped).
pub(crate) fn unschedule(jobs: &Mutex<LocalJobs>, id: &str) {
    if let Some(old) = lock(jobs).jobs.remove(id) {
        old.task.abort();
    }
}

/// Stops every local job (the member stops).
pub(crate) fn stop_all(jobs: &Mutex<LocalJobs>) {
    for (_, job) in lock(jobs).jobs.drain() {
        job.task.abort();
    }
}

/// Local job `id`'s details.
pub(crate) fn details(jobs: &Mutex<LocalJobs>, id: &str) -> Option<JobDetails> {
    lock(jobs).jobs.get(id).map(|j| to_details(id, j))
}

/// Local jobs of runner `key`.
pub(crate) fn by_runner(jobs: &Mutex<LocalJobs>, key: &str) -> Vec<JobDetails> {
    let all = lock(jobs);
    let mut found: Vec<JobDetails> = all
        .jobs
        .iter()
        .filter(|(_, j)| j.config.runner_key == key)
        .map(|(id, j)| to_details(id, j))
        .collect();
    found.sort_by(|a, b| a.id.cmp(&b.id));
    found
}

fn to_details(id: &str, j: &LocalJob) -> JobDetails {
    JobDetails {
        id: id.to_string(),
        config: j.config.clone(),
        next_run_ms: j.next_ms,
        last_slot_ms: j.last_slot,
        running: j.running.iter().cloned().collect(),
        history: j.history.iter().cloned().collect(),
    }
}

async fn run_local(
    jobs: Weak<Mutex<LocalJobs>>,
    service: Arc<SchedulerService>,
    id: String,
    config: JobConfig,
    first: Option<u64>,
) {
    let me = service.member().to_string();
    let mut next = first;
    while let Some(slot) = next {
        let wait = slot.saturating_sub(grid_core::clock::unix_ms());
        if wait > 0 {
            tokio::time::sleep(Duration::from_millis(wait)).await;
        }
        let now = grid_core::clock::unix_ms();
        let (slot, slots) = match config.missed_slots {
            MissedSlots::FireEach => (slot, 1),
            MissedSlots::Collapse | MissedSlots::Skip => latest_due(&config.schedule, slot, now),
        };
        next = config.schedule.first_after(slot).ok().flatten();
        let skip = config.missed_slots == MissedSlots::Skip
            && now.saturating_sub(slot) > config.missed_grace_ms;
        let run_id = {
            let Some(jobs) = jobs.upgrade() else { return };
            let mut all = lock(&jobs);
            let run_id = all.next_run;
            all.next_run += 1;
            let Some(job) = all.jobs.get_mut(&id) else {
                return;
            };
            job.last_slot = Some(slot);
            job.next_ms = next;
            if skip {
                continue;
            }
            job.running = Some(Running {
                run_id,
                scheduled_at_ms: slot,
                fired_at_ms: now,
                slots,
                member: me.clone(),
                attempt: 1,
            });
            run_id
        };
        let runner = service
            .runners
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&config.runner_key)
            .cloned();
        let request = JobRequest {
            job_id: id.clone(),
            run_id,
            runner_key: config.runner_key.clone(),
            run_mode: config.run_mode,
            scheduled_at_ms: slot,
            fired_at_ms: now,
            slots,
            raw_parameters: config.parameters.clone(),
        };
        let started = grid_core::clock::unix_ms();
        let (started_at_ms, response) = match runner {
            None => (
                None,
                JobResponse {
                    outcome: Outcome::Unavailable,
                    message: Some(format!(
                        "runner {:?} is not registered on {me}",
                        config.runner_key
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
        let Some(jobs) = jobs.upgrade() else { return };
        let mut all = lock(&jobs);
        let Some(job) = all.jobs.get_mut(&id) else {
            return;
        };
        job.running = None;
        job.history.push_back(RunRecord {
            run_id,
            scheduled_at_ms: slot,
            fired_at_ms: now,
            started_at_ms,
            duration_ms: started_at_ms.map(|_| duration),
            outcome: response.outcome,
            message: response.message,
            member: Some(me.clone()),
            slots,
        });
        while job.history.len() > MAX_HISTORY {
            job.history.pop_front();
        }
    }
}
