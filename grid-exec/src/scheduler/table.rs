//! The job table of one partition, without IO: its jobs, the decisions an operation leads
//! to ([`JobTable::decide`]), and the deterministic changes that carry them out on every
//! replica ([`JobTable::apply`]). Time comes in as `now_ms` (Unix ms on the runtime's
//! clock); who has which runner and who is alive come in through [`Env`]. Effects come out
//! as [`Output`]s: runs to send to a member, and the next slot to wake up for.
//!
//! **A slot fires at most once.** A firing is a [`Change::Fire`] that moves the job's
//! `next_slot` past the slot it claims; it is decided under the partition's lock from
//! applied state, and replicated to the backups before the run is sent. A second firing of
//! the same slot (a timer that fired twice, a new owner after a promotion or migration, a
//! replaced job) finds `next_slot` past it. Replacing a job keeps its last claimed slot,
//! and its new first slot is after it.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use super::job::{JobConfig, JobDetails, JobRequest, MissedSlots, Outcome, RunRecord, Running};
use super::{Schedule, SchedulerError};

/// Runs kept in a job's history.
pub const MAX_HISTORY: usize = 20;
/// Runs of one job under way at once (with [`JobConfig::allow_overlap`]).
pub const MAX_RUNNING: usize = 16;
/// Jobs in one partition; one more is refused ([`SchedulerError::TooManyJobs`]).
pub const MAX_JOBS_PER_PARTITION: usize = 100_000;
/// Longest job id, in bytes.
pub const MAX_ID_BYTES: usize = 1_024;
/// Largest encoded parameters, in bytes.
pub const MAX_PARAMETER_BYTES: usize = 64 * 1024;
/// Jobs fired by one [`Change::Fire`]; more due jobs wait for the next one (at once).
pub const MAX_FIRINGS_PER_CHANGE: usize = 1_024;
/// Missed slots of one job counted one by one when collapsing; beyond, the count stops.
const MAX_SLOT_SCAN: u32 = 100_000;

/// One job of the table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// Its configuration.
    pub config: JobConfig,
    /// Its next slot (Unix ms; `None`: it will not fire again).
    pub next_slot: Option<u64>,
    /// The last slot claimed (Unix ms): no later firing is for it or an earlier one.
    pub last_slot: Option<u64>,
    /// Runs under way.
    pub running: Vec<Running>,
    /// The last runs, oldest first, at most [`MAX_HISTORY`].
    pub history: VecDeque<RunRecord>,
}

/// What a caller, or the owner itself, asks a partition's job table.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Op {
    /// Schedule (or replace) job `id`.
    Schedule {
        /// The job.
        id: String,
        /// Its configuration (run mode once per cluster).
        config: JobConfig,
    },
    /// Remove job `id` (unknown ids are ignored).
    Unschedule {
        /// The job.
        id: String,
    },
    /// A read: job `id`'s details.
    Details {
        /// The job.
        id: String,
    },
    /// The owner's own: fire every job whose slot is due (and, while the owner holds runs
    /// whose claim is not confirmed, write a change even when nothing is due:
    /// [`Env::confirm`]).
    FireDue,
    /// A run ended (from the member that ran it, or that refused it).
    Finish {
        /// The job.
        id: String,
        /// The run.
        run_id: u64,
        /// The member that reports.
        member: String,
        /// When the runner started (Unix ms; `None`: it did not).
        started_at_ms: Option<u64>,
        /// How long it ran.
        duration_ms: Option<u64>,
        /// How it ended.
        outcome: Outcome,
        /// Its message.
        message: Option<String>,
    },
    /// The owner's own: runs on members that are gone end (or are retried).
    Reap,
}

/// What the job table answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Answer {
    /// Done.
    Done,
    /// A job's details (`None`: no such job).
    Details(Option<Box<JobDetails>>),
    /// The runs a firing claimed (and runs under way to send again): the owner sends them
    /// once the firing's change is confirmed by the backups, never before.
    Fired(Vec<Output>),
}

/// One job's firing, as replicated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Firing {
    /// The job.
    pub id: String,
    /// The slot claimed (the latest one when several collapse; `None`: every due slot was
    /// skipped).
    pub slot: u64,
    /// The job's next slot after this firing.
    pub next_slot: Option<u64>,
    /// What became of the slot: a run sent to a member, or a record at once (Unavailable,
    /// still running), or nothing (skipped).
    pub result: FiringResult,
}

/// What became of a claimed slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FiringResult {
    /// Sent to a member.
    Run(Running),
    /// Recorded at once (not run).
    Record(RunRecord),
    /// Skipped ([`MissedSlots::Skip`]).
    Skipped,
    /// Added to a run of the job that this owner claimed but has not sent yet (its claim
    /// is not confirmed by the backups): the run now stands for this slot too (its slot
    /// becomes this one, its slot count grows by `slots`). A slot is not "still running"
    /// behind a run that has not started.
    Merged {
        /// The run.
        run_id: u64,
        /// The slots added.
        slots: u32,
    },
}

/// A deterministic record of a decision, applied on the owner and every backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// Put job `id` with its first slot (a replaced job keeps its history and runs).
    Put {
        /// The job.
        id: String,
        /// Its configuration.
        config: JobConfig,
        /// Its first slot.
        next_slot: Option<u64>,
    },
    /// Remove job `id`.
    Remove {
        /// The job.
        id: String,
    },
    /// Slots claimed; `next_run` is the partition's run counter after them.
    Fire {
        /// The firings.
        firings: Vec<Firing>,
        /// The run counter after them.
        next_run: u64,
    },
    /// A run ended.
    Finish {
        /// The job.
        id: String,
        /// Its record.
        record: RunRecord,
    },
    /// A run whose member died is sent to `member` (its second attempt).
    Retry {
        /// The job.
        id: String,
        /// The run.
        run_id: u64,
        /// The new member.
        member: String,
    },
    /// Several changes, in order.
    Many(Vec<Self>),
}

/// What the table needs to know of the world to decide.
pub struct Env<'a> {
    /// Now, in Unix ms on the runtime's clock.
    pub now_ms: u64,
    /// The member a run of `runner_key` for (job, slot) should go to: this member when it
    /// has the runner, else a live member that has it; `None` when no live member has it.
    pub target: &'a dyn Fn(&str, &str, u64) -> Option<String>,
    /// Whether a member is alive.
    pub live: &'a dyn Fn(&str) -> bool,
    /// Whether run `(job, run_id)` was claimed by this owner and not sent yet (its claim
    /// is not confirmed by the backups yet): a due slot of the job joins it
    /// ([`FiringResult::Merged`]).
    pub held: &'a dyn Fn(&str, u64) -> bool,
    /// Whether [`Op::FireDue`] must write a change even when nothing is due: the owner has
    /// held runs, and sends them once a change of its own is confirmed.
    pub confirm: bool,
}

/// What a decision is: the answer and the change to replicate, if any.
#[derive(Debug)]
pub struct Decision {
    /// The answer.
    pub answer: Answer,
    /// The change.
    pub change: Option<Change>,
}

/// What applying a change asks the owner to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Output {
    /// Send this run to `member`.
    Dispatch {
        /// Where.
        member: String,
        /// The run.
        request: JobRequest,
    },
}

/// The job table of one partition.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobTable {
    /// Jobs by id.
    pub jobs: BTreeMap<String, Job>,
    /// The partition's run counter: the next run's id.
    pub next_run: u64,
    /// (next slot, id) of every job that has one: what is due first.
    due: BTreeSet<(u64, String)>,
}

/// A partition's job table as it travels (snapshots).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TableCopy {
    /// Jobs by id.
    pub jobs: BTreeMap<String, Job>,
    /// The run counter.
    pub next_run: u64,
}

impl JobTable {
    /// The table's copy, for a snapshot.
    pub fn to_copy(&self) -> TableCopy {
        TableCopy {
            jobs: self.jobs.clone(),
            next_run: self.next_run,
        }
    }

    /// The table a copy describes.
    pub fn from_copy(copy: TableCopy) -> Self {
        let due = copy
            .jobs
            .iter()
            .filter_map(|(id, j)| j.next_slot.map(|s| (s, id.clone())))
            .collect();
        Self {
            jobs: copy.jobs,
            next_run: copy.next_run,
            due,
        }
    }

    /// The earliest next slot of the partition (Unix ms).
    pub fn earliest(&self) -> Option<u64> {
        self.due.iter().next().map(|(s, _)| *s)
    }

    /// Whether some slot is due at `now_ms`.
    pub fn is_due(&self, now_ms: u64) -> bool {
        self.earliest().is_some_and(|s| s <= now_ms)
    }

    /// A job's details.
    pub fn details(&self, id: &str) -> Option<JobDetails> {
        self.jobs.get(id).map(|j| JobDetails {
            id: id.to_string(),
            config: j.config.clone(),
            next_run_ms: j.next_slot,
            last_slot_ms: j.last_slot,
            running: j.running.clone(),
            history: j.history.iter().cloned().collect(),
        })
    }

    /// Details of every job of runner `key`.
    pub fn jobs_by_runner(&self, key: &str) -> Vec<JobDetails> {
        self.jobs
            .iter()
            .filter(|(_, j)| j.config.runner_key == key)
            .filter_map(|(id, _)| self.details(id))
            .collect()
    }

    /// Whether a run is under way on a member that `live` says is gone.
    pub fn has_orphans(&self, live: &dyn Fn(&str) -> bool) -> bool {
        self.jobs
            .values()
            .any(|j| j.running.iter().any(|r| !live(&r.member)))
    }

    /// The runs under way, to send again (a new owner does: the send of the old one may
    /// not have happened; members ignore a run they already have).
    pub fn resend(&self) -> Vec<Output> {
        self.jobs
            .iter()
            .flat_map(|(id, j)| j.running.iter().map(move |r| dispatch(id, &j.config, r)))
            .collect()
    }

    /// Decides `op` at `env.now_ms` (a read, [`Op::Details`], is answered too).
    pub fn decide(&self, op: Op, env: &Env<'_>) -> Result<Decision, SchedulerError> {
        match op {
            Op::Schedule { id, config } => self.decide_schedule(id, config, env.now_ms),
            Op::Unschedule { id } => Ok(Decision {
                answer: Answer::Done,
                change: self.jobs.contains_key(&id).then_some(Change::Remove { id }),
            }),
            Op::Details { id } => Ok(Decision {
                answer: Answer::Details(self.details(&id).map(Box::new)),
                change: None,
            }),
            Op::FireDue => Ok(self.decide_fire(env)),
            Op::Finish {
                id,
                run_id,
                member,
                started_at_ms,
                duration_ms,
                outcome,
                message,
            } => {
                let run = self
                    .jobs
                    .get(&id)
                    .and_then(|j| j.running.iter().find(|r| r.run_id == run_id));
                // A run that is not under way (finished already: a repeated report; or its
                // job was unscheduled) changes nothing; nor does a report from a member
                // the run is not on (a first attempt's member reporting after a retry).
                let change = run.filter(|r| r.member == member).map(|r| Change::Finish {
                    id: id.clone(),
                    record: RunRecord {
                        run_id,
                        scheduled_at_ms: r.scheduled_at_ms,
                        fired_at_ms: r.fired_at_ms,
                        started_at_ms,
                        duration_ms,
                        outcome,
                        message,
                        member: Some(member),
                        slots: r.slots,
                    },
                });
                Ok(Decision {
                    answer: Answer::Done,
                    change,
                })
            }
            Op::Reap => Ok(self.decide_reap(env)),
        }
    }

    fn decide_schedule(
        &self,
        id: String,
        config: JobConfig,
        now_ms: u64,
    ) -> Result<Decision, SchedulerError> {
        if id.len() > MAX_ID_BYTES {
            return Err(SchedulerError::IdTooLong { len: id.len() });
        }
        if config.parameters.len() > MAX_PARAMETER_BYTES {
            return Err(SchedulerError::ParametersTooLarge {
                len: config.parameters.len(),
            });
        }
        config.schedule.check()?;
        let old = self.jobs.get(&id);
        if old.is_none() && self.jobs.len() >= MAX_JOBS_PER_PARTITION {
            return Err(SchedulerError::TooManyJobs {
                limit: MAX_JOBS_PER_PARTITION,
            });
        }
        if old.is_some_and(|o| o.config == config) {
            // The same job again (several members schedule it at start): nothing changes,
            // its slots go on.
            return Ok(Decision {
                answer: Answer::Done,
                change: None,
            });
        }
        let mut next = config.schedule.first_at_or_after(now_ms)?;
        // Never a slot at or before one already claimed (a replacement must not fire a
        // slot its predecessor fired).
        if let Some(last) = old.and_then(|o| o.last_slot) {
            if next.is_some_and(|n| n <= last) {
                next = config.schedule.first_after(last.max(now_ms))?;
            }
        }
        Ok(Decision {
            answer: Answer::Done,
            change: Some(Change::Put {
                id,
                config,
                next_slot: next,
            }),
        })
    }

    fn decide_fire(&self, env: &Env<'_>) -> Decision {
        let now = env.now_ms;
        let mut firings = Vec::new();
        let mut next_run = self.next_run;
        for (slot, id) in self.due.iter().take_while(|(s, _)| *s <= now) {
            if firings.len() >= MAX_FIRINGS_PER_CHANGE {
                break;
            }
            let Some(job) = self.jobs.get(id) else {
                continue;
            };
            firings.push(fire_one(id, job, *slot, env, &mut next_run));
        }
        // Runs held by this owner are sent by it once this change is confirmed, not here.
        let live_unheld =
            |id: &str, r: &Running| (env.live)(&r.member) && !(env.held)(id, r.run_id);
        let mut runs = Vec::new();
        for f in &firings {
            let Some(job) = self.jobs.get(&f.id) else {
                continue;
            };
            match &f.result {
                FiringResult::Run(run) => runs.push(dispatch(&f.id, &job.config, run)),
                FiringResult::Record(r) if r.message.as_deref() == Some(STILL_RUNNING) => {
                    // Send the run under way again: if its member never got it (a message
                    // lost), it runs now instead of blocking the job.
                    runs.extend(
                        job.running
                            .iter()
                            .filter(|r| live_unheld(&f.id, r))
                            .map(|r| dispatch(&f.id, &job.config, r)),
                    );
                }
                _ => {}
            }
        }
        let change = if !firings.is_empty() {
            Some(Change::Fire { firings, next_run })
        } else if env.confirm {
            Some(Change::Many(Vec::new()))
        } else {
            None
        };
        Decision {
            answer: Answer::Fired(runs),
            change,
        }
    }

    fn decide_reap(&self, env: &Env<'_>) -> Decision {
        let mut changes = Vec::new();
        for (id, job) in &self.jobs {
            for run in job.running.iter().filter(|r| !(env.live)(&r.member)) {
                let retry = (job.config.retry_if_member_dies && run.attempt == 1)
                    .then(|| (env.target)(&job.config.runner_key, id, run.scheduled_at_ms))
                    .flatten()
                    .filter(|m| (env.live)(m));
                changes.push(match retry {
                    Some(member) => Change::Retry {
                        id: id.clone(),
                        run_id: run.run_id,
                        member,
                    },
                    None => Change::Finish {
                        id: id.clone(),
                        record: RunRecord {
                            run_id: run.run_id,
                            scheduled_at_ms: run.scheduled_at_ms,
                            fired_at_ms: run.fired_at_ms,
                            started_at_ms: None,
                            duration_ms: None,
                            outcome: Outcome::Aborted,
                            message: Some(format!("member {} left during the run", run.member)),
                            member: Some(run.member.clone()),
                            slots: run.slots,
                        },
                    },
                });
            }
        }
        Decision {
            answer: Answer::Done,
            change: (!changes.is_empty()).then_some(Change::Many(changes)),
        }
    }

    /// Applies `change` (on the owner and every backup, in the same order); returns what
    /// the owner should do.
    pub fn apply(&mut self, change: &Change) -> Vec<Output> {
        let mut out = Vec::new();
        self.apply_into(change, &mut out);
        out
    }

    fn set_next(&mut self, id: &str, next: Option<u64>) {
        let Some(job) = self.jobs.get_mut(id) else {
            return;
        };
        if let Some(old) = job.next_slot {
            self.due.remove(&(old, id.to_string()));
        }
        job.next_slot = next;
        if let Some(n) = next {
            self.due.insert((n, id.to_string()));
        }
    }

    fn apply_into(&mut self, change: &Change, out: &mut Vec<Output>) {
        match change {
            Change::Put {
                id,
                config,
                next_slot,
            } => {
                let job = self.jobs.entry(id.clone()).or_insert_with(|| Job {
                    config: config.clone(),
                    next_slot: None,
                    last_slot: None,
                    running: Vec::new(),
                    history: VecDeque::new(),
                });
                job.config = config.clone();
                self.set_next(id, *next_slot);
            }
            Change::Remove { id } => {
                self.set_next(id, None);
                self.jobs.remove(id);
            }
            Change::Fire { firings, next_run } => {
                self.next_run = self.next_run.max(*next_run);
                for f in firings {
                    let Some(job) = self.jobs.get_mut(&f.id) else {
                        continue;
                    };
                    job.last_slot = Some(job.last_slot.map_or(f.slot, |l| l.max(f.slot)));
                    // The runs are sent by the owner once this change is confirmed
                    // ([`Answer::Fired`]), not here.
                    match &f.result {
                        FiringResult::Run(run) => job.running.push(run.clone()),
                        FiringResult::Record(record) => push_history(job, record.clone()),
                        FiringResult::Skipped => {}
                        FiringResult::Merged { run_id, slots } => {
                            if let Some(run) = job.running.iter_mut().find(|r| r.run_id == *run_id)
                            {
                                run.scheduled_at_ms = f.slot;
                                run.slots = run.slots.saturating_add(*slots);
                            }
                        }
                    }
                    self.set_next(&f.id, f.next_slot);
                }
            }
            Change::Finish { id, record } => {
                if let Some(job) = self.jobs.get_mut(id) {
                    let before = job.running.len();
                    job.running.retain(|r| r.run_id != record.run_id);
                    if job.running.len() < before {
                        push_history(job, record.clone());
                    }
                }
            }
            Change::Retry { id, run_id, member } => {
                if let Some(job) = self.jobs.get_mut(id) {
                    if let Some(run) = job.running.iter_mut().find(|r| r.run_id == *run_id) {
                        run.member = member.clone();
                        run.attempt = run.attempt.saturating_add(1);
                        out.push(dispatch(id, &job.config, run));
                    }
                }
            }
            Change::Many(changes) => {
                for c in changes {
                    self.apply_into(c, out);
                }
            }
        }
    }
}

/// The message of a firing that found the previous run still running.
pub const STILL_RUNNING: &str = "still running";

fn push_history(job: &mut Job, record: RunRecord) {
    job.history.push_back(record);
    while job.history.len() > MAX_HISTORY {
        job.history.pop_front();
    }
}

fn dispatch(id: &str, config: &JobConfig, run: &Running) -> Output {
    Output::Dispatch {
        member: run.member.clone(),
        request: JobRequest {
            job_id: id.to_string(),
            run_id: run.run_id,
            runner_key: config.runner_key.clone(),
            run_mode: config.run_mode,
            scheduled_at_ms: run.scheduled_at_ms,
            fired_at_ms: run.fired_at_ms,
            slots: run.slots,
            raw_parameters: config.parameters.clone(),
        },
    }
}

/// The latest slot of `job` due at `now` from `first`, and how many there are (at most
/// [`MAX_SLOT_SCAN`] counted).
pub(crate) fn latest_due(schedule: &Schedule, first: u64, now: u64) -> (u64, u32) {
    let mut latest = first;
    let mut count = 1u32;
    while count < MAX_SLOT_SCAN {
        match schedule.first_after(latest) {
            Ok(Some(next)) if next <= now => {
                latest = next;
                count += 1;
            }
            _ => break,
        }
    }
    if count >= MAX_SLOT_SCAN {
        // An interval far behind: jump straight to its last due slot.
        if let Some(period) = schedule.period() {
            let period = (period.as_millis() as u64).max(1);
            latest += (now - latest) / period * period;
        }
    }
    (latest, count)
}

fn fire_one(id: &str, job: &Job, first: u64, env: &Env<'_>, next_run: &mut u64) -> Firing {
    let now = env.now_ms;
    let next_after = |slot: u64| job.config.schedule.first_after(slot).ok().flatten();
    let (slot, slots) = match job.config.missed_slots {
        MissedSlots::FireEach => (first, 1),
        MissedSlots::Collapse | MissedSlots::Skip => latest_due(&job.config.schedule, first, now),
    };
    let next_slot = next_after(slot);
    // A run this owner claimed and has not sent yet (its claim waits for the backups'
    // confirmation) takes the slot: it will stand for it once sent.
    if job.config.missed_slots != MissedSlots::FireEach {
        if let Some(held) = job.running.iter().find(|r| (env.held)(id, r.run_id)) {
            return Firing {
                id: id.to_string(),
                slot,
                next_slot,
                result: FiringResult::Merged {
                    run_id: held.run_id,
                    slots,
                },
            };
        }
    }
    if job.config.missed_slots == MissedSlots::Skip
        && now.saturating_sub(slot) > job.config.missed_grace_ms
    {
        return Firing {
            id: id.to_string(),
            slot,
            next_slot,
            result: FiringResult::Skipped,
        };
    }
    let run_id = *next_run;
    *next_run += 1;
    let record = |outcome, message: String, member: Option<String>| {
        FiringResult::Record(RunRecord {
            run_id,
            scheduled_at_ms: slot,
            fired_at_ms: now,
            started_at_ms: None,
            duration_ms: None,
            outcome,
            message: Some(message),
            member,
            slots,
        })
    };
    // A run on a member that is gone is not running (it is ended, or retried, by the
    // owner's [`Op::Reap`]): it must not turn the next slot into "still running".
    let mut under_way = job.running.iter().filter(|r| (env.live)(&r.member));
    let result = if let Some(on) = under_way.next().filter(|_| !job.config.allow_overlap) {
        let on = Some(on.member.clone());
        record(Outcome::Aborted, STILL_RUNNING.to_string(), on)
    } else if job.running.len() >= MAX_RUNNING {
        record(
            Outcome::Aborted,
            format!("{MAX_RUNNING} runs under way already"),
            None,
        )
    } else {
        match (env.target)(&job.config.runner_key, id, slot) {
            Some(member) => FiringResult::Run(Running {
                run_id,
                scheduled_at_ms: slot,
                fired_at_ms: now,
                slots,
                member,
                attempt: 1,
            }),
            None => record(
                Outcome::Unavailable,
                format!("no live member has runner {:?}", job.config.runner_key),
                None,
            ),
        }
    };
    Firing {
        id: id.to_string(),
        slot,
        next_slot,
        result,
    }
}

#[cfg(test)]
#[path = "table_tests.rs"]
mod tests;
