//! The cluster scheduler's workload and its checkers (`sim --workload sched`).
//!
//! A few hundred once-per-cluster jobs — intervals of 1 to 5 s, cron expressions every 2 to
//! 5 s in several time zones, run-once jobs — scheduled from random members (some from two
//! members at once), with runners registered on some members only: `common` on m0, m1 and
//! m2 (at most one failure at a time leaves two of them), `rare` on m3 only, `none`
//! nowhere. A client unschedules and schedules again (same configuration) a tenth of the
//! interval and cron jobs while the seed's faults run. The runners record what they ran (job, slot, slots it
//! stands for, member, start); a historian reads every job's history every few seconds
//! (the history keeps the last 20 runs), so that the owner-side records of slots that did
//! not run (`Aborted`, `Unavailable`) are known. Then the faults end, the cluster settles,
//! and the checkers run:
//! - **never twice**: no slot is run twice (a run stands for the slots it collapses);
//! - **never lost, on time**: every slot of a job that was scheduled at that time (from
//!   the acknowledgement of its `schedule_job` to the call of its `unschedule_job`), from
//!   the first second to [`CHECK_MARGIN`] before the end, was run, or recorded `Aborted`
//!   (the job's previous run still running, or its member gone, which must then have been
//!   hit by a fault) or `Unavailable` (checked below), or its job was unscheduled within
//!   5 s after it while a fault hit its runner's members (its pending run and record went
//!   with the job before the historian could read them); and a run started no later than
//!   [`ON_TIME`] after its slot, or, when a fault happened between the slot and the run,
//!   no later than [`AFTER_FAULT`] after the later of the slot and the fault;
//! - **not after unschedule**: no slot later than an acknowledged `unschedule_job` runs
//!   until the job is scheduled again;
//! - **`Unavailable` exactly when no live member had the runner**: `none` is never run and
//!   always `Unavailable`; `common` is never `Unavailable` except after a partition of the
//!   cluster (the owner's side may have none of m0-m2); `rare` is `Unavailable` only when
//!   m3 was hit by a fault (or a partition happened) in the [`DIRECTORY_LAG`] before.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use grid::{JobConfig, JobRequest, JobResponse, Outcome, RunRecord, Schedule, Scheduler};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::workload::{Handles, Harness, RunOptions, SeedReport, Trouble};
use crate::world::{derive, simulate, World};

/// Interval jobs.
const INTERVAL_JOBS: u32 = 150;
/// Cron jobs.
const CRON_JOBS: u32 = 60;
/// Run-once jobs.
const ONCE_JOBS: u32 = 50;
/// Slots closer than this to the end are not checked for having run.
const CHECK_MARGIN: Duration = Duration::from_secs(5);
/// How late a slot may run without a fault around it. The firing path is a timer, one
/// replicated write (the claim), a message and a task start: a few ms of simulated time;
/// 1 s leaves room for a loaded owner and a slow wire (the seed's wire faults delay and
/// drop datagrams, and QUIC retransmits after its probe timeout).
const ON_TIME: Duration = Duration::from_secs(1);
/// How late a slot may run after a fault (counted from the later of the slot and the
/// fault): failure detection (phi 10 at 100 ms gossip: ~1-2 s once the wire is lossy),
/// the coordinator's new table, the promoted owner's firing — the issue's "failure
/// detection + 1 s" — plus the runtime's own repair: a partition that heals, a paused
/// member that must confirm its ownership, a lossy wire (see BENCHMARKS.md for the
/// distribution measured over seeds 0-23).
const AFTER_FAULT: Duration = Duration::from_secs(5);
/// How long after a fault on m3 (or a partition) the other members may still not know m3
/// has runner `rare` again (its announcement every 2 s, or at its join).
const DIRECTORY_LAG: Duration = Duration::from_secs(35);
/// The member with runner `rare`.
const RARE: usize = 3;

/// One run as its runner saw it.
#[derive(Debug, Clone)]
struct Run {
    job: u32,
    slot: u64,
    slots: u32,
    member: usize,
    started: u64,
}

/// A job of the workload.
#[derive(Debug, Clone)]
struct Job {
    id: String,
    key: &'static str,
    schedule: Schedule,
    /// Its slots (Unix ms) from its first to past the end of the run.
    slots: Vec<u64>,
    churned: bool,
}

/// A `schedule_job` (`on`) or `unschedule_job` call: invoked, acknowledged (Unix ms).
#[derive(Debug, Clone, Copy)]
struct Call {
    job: u32,
    on: bool,
    invoked: u64,
    acked: Option<u64>,
}

type Runs = Arc<Mutex<Vec<Run>>>;
type Scheds = Handles<Scheduler>;

fn job_id(i: u32) -> String {
    format!("job-{i}")
}

fn config(job: &Job) -> JobConfig {
    JobConfig::for_runner(job.key).schedule(job.schedule.clone())
}

/// Registers the runners of member `i` and returns its scheduler.
async fn open_scheduler(world: &World, i: usize, runs: &Runs) -> anyhow::Result<Scheduler> {
    let grid = world.slots[i]
        .grid
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("member {i} is not running"))?;
    let s = grid.scheduler().clone();
    let mut keys = Vec::new();
    if i < 3 {
        keys.push("common");
    }
    if i == RARE {
        keys.push("rare");
    }
    for key in keys {
        let runs = runs.clone();
        s.register_job_runner(key, move |r: JobRequest| {
            let job = r
                .job_id
                .strip_prefix("job-")
                .and_then(|j| j.parse().ok())
                .unwrap_or(u32::MAX);
            runs.lock().unwrap_or_else(|e| e.into_inner()).push(Run {
                job,
                slot: r.scheduled_at_ms,
                slots: r.slots,
                member: i,
                started: grid_core::clock::unix_ms(),
            });
            // A short run: a few ms (well under the shortest period).
            let work = Duration::from_millis(r.run_id % 20);
            async move {
                tokio::time::sleep(work).await;
                JobResponse::success()
            }
        })
        .await;
    }
    Ok(s)
}

/// The workload's jobs, from the seed.
/// Interval jobs' first slots are from `base` on; every job's slots are listed from `from`
/// (before it was scheduled: a cron job's first slot may come before `base`).
fn jobs(seed: u64, from: u64, base: u64, end: u64) -> Vec<Job> {
    let mut rng = StdRng::seed_from_u64(derive(seed, "sched jobs"));
    let crons = [
        "*/2 * * * * ?",
        "*/3 * * * * ?",
        "0/5 * * * * ?",
        "1/4 * * * * ?",
    ];
    let zones = ["UTC", "Europe/Paris", "America/New_York", "Asia/Kolkata"];
    let mut out = Vec::new();
    for i in 0..(INTERVAL_JOBS + CRON_JOBS + ONCE_JOBS) {
        let key = match rng.gen_range(0..10) {
            0..=6 => "common",
            7 | 8 => "rare",
            _ => "none",
        };
        let schedule = if i < INTERVAL_JOBS {
            let period = rng.gen_range(1..=5u64) * 1_000;
            Schedule::interval(
                Duration::from_millis(period),
                Some(base + rng.gen_range(0..period)),
            )
        } else if i < INTERVAL_JOBS + CRON_JOBS {
            let expr = crons[rng.gen_range(0..crons.len())];
            let zone = zones[rng.gen_range(0..zones.len())];
            match Schedule::cron(expr, zone) {
                Ok(s) => s,
                Err(_) => Schedule::run_once(base),
            }
        } else {
            Schedule::run_once(base + rng.gen_range(0..end.saturating_sub(base).max(1)))
        };
        let mut slots = Vec::new();
        let mut next = schedule.first_at_or_after(from).ok().flatten();
        while let Some(s) = next {
            if s > end + 300_000 || slots.len() > 10_000 {
                break;
            }
            slots.push(s);
            next = schedule.first_after(s).ok().flatten();
        }
        out.push(Job {
            id: job_id(i),
            key,
            schedule,
            slots,
            // Run-once jobs are not churned: scheduled again after their time, a run-once
            // job is a new job and runs its (past) slot again, as it should.
            churned: i % 10 == 3 && i < INTERVAL_JOBS + CRON_JOBS,
        });
    }
    out
}

/// Runs seed `opts.seed` of the scheduler workload and checks it.
pub fn run(opts: &RunOptions) -> SeedReport {
    let opts = opts.clone();
    simulate(opts.seed, async move { run_in_world(&opts).await })
}

async fn run_in_world(opts: &RunOptions) -> SeedReport {
    let mut h = match Harness::start(opts).await {
        Ok(h) => h,
        Err(report) => return report,
    };
    // Unix ms of the world, and the harness's ns clock in Unix ms.
    let unix = grid_core::clock::unix_ms;
    let ns = h.clock();
    let (unix0, ns0) = (unix(), ns());
    let ns_to_unix = move |n: u64| unix0 + n.saturating_sub(ns0) / 1_000_000;
    let runs: Runs = Arc::default();
    let scheds: Scheds = Handles::new(opts.members);
    let open = {
        let runs = runs.clone();
        async move |w: &World, i: usize| open_scheduler(w, i, &runs).await
    };
    h.open_all(&scheds, &open).await;
    let from = unix();
    let base = from + 3_000;
    let end = unix0 + opts.duration.as_millis() as u64;
    let jobs = Arc::new(jobs(opts.seed, from, base, end));
    let calls: Arc<Mutex<Vec<Call>>> = Arc::default();
    // Schedule every job from a random member; every fifth from two members at once.
    let mut rng = StdRng::seed_from_u64(derive(opts.seed, "sched schedulers"));
    let mut first = Vec::new();
    for (i, job) in jobs.iter().enumerate() {
        let members: Vec<usize> = if i % 5 == 0 {
            vec![
                rng.gen_range(0..opts.members),
                rng.gen_range(0..opts.members),
            ]
        } else {
            vec![rng.gen_range(0..opts.members)]
        };
        for m in members {
            let (scheds, calls, job) = (scheds.clone(), calls.clone(), job.clone());
            first.push(tokio::spawn(async move {
                schedule_until_done(&scheds, m, i as u32, &job, &calls).await;
            }));
        }
    }
    for t in first {
        let _ = t.await;
    }
    if unix() > base {
        h.report.violations.push(format!(
            "scheduling took longer than the head start ({} ms late)",
            unix() - base
        ));
    }
    // The churn client and the historian.
    let history: Arc<Mutex<BTreeMap<(u32, u64), RunRecord>>> = Arc::default();
    let clients = vec![
        tokio::spawn(churn(
            derive(opts.seed, "sched churn"),
            opts.members,
            jobs.clone(),
            scheds.clone(),
            calls.clone(),
            h.stop.clone(),
        )),
        tokio::spawn(historian(
            jobs.clone(),
            scheds.clone(),
            history.clone(),
            h.stop.clone(),
        )),
    ];
    h.drive_faults(&scheds, &open).await;
    h.stop_clients(clients).await;
    let ran_to = unix();
    h.settle(Duration::from_secs(60)).await;
    // A last look at the histories, and at every job's state.
    read_histories(&jobs, &scheds, &history).await;
    let mut finals: BTreeMap<u32, String> = BTreeMap::new();
    if let Some(s) = (0..opts.members).find_map(|m| scheds.get(m)) {
        for (i, job) in jobs.iter().enumerate() {
            let d = tokio::time::timeout(Duration::from_secs(1), s.job_details(&job.id)).await;
            let state = match d {
                Ok(Ok(Some(d))) => format!(
                    "next {:?}, last slot {:?}, running {:?}, owner {:?}",
                    d.next_run_ms,
                    d.last_slot_ms,
                    d.running
                        .iter()
                        .map(|r| (
                            r.run_id,
                            r.scheduled_at_ms,
                            r.slots,
                            r.member.clone(),
                            r.attempt
                        ))
                        .collect::<Vec<_>>(),
                    h.world.slots[0].grid.as_ref().and_then(|g| g
                        .runtime()
                        .table()
                        .owner(s.partition_of(&job.id))
                        .map(|o| o.to_string()))
                ),
                Ok(Ok(None)) => "no such job".to_string(),
                Ok(Err(e)) => format!("details: {e}"),
                Err(_) => "details: no answer in 1 s".to_string(),
            };
            finals.insert(i as u32, state);
        }
    }
    let runs: Vec<Run> = runs.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let calls: Vec<Call> = calls.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let history = history.lock().unwrap_or_else(|e| e.into_inner()).clone();
    h.report.ops = runs.len() + calls.len();
    h.report.unknown = calls.iter().filter(|c| c.acked.is_none()).count();
    let troubles: Vec<(Option<usize>, u64)> = h
        .troubles
        .iter()
        .map(|t: &Trouble| (t.member, ns_to_unix(t.at)))
        .collect();
    let check_to = ran_to.saturating_sub(CHECK_MARGIN.as_millis() as u64);
    let details = check(
        &mut h.report,
        &finals,
        &jobs,
        &runs,
        &calls,
        &history,
        &troubles,
        base,
        check_to,
    );
    h.finish(&details)
}

/// Schedules `job` from member `m` until a call is acknowledged (or the member is gone).
async fn schedule_until_done(
    scheds: &Scheds,
    m: usize,
    i: u32,
    job: &Job,
    calls: &Mutex<Vec<Call>>,
) {
    for _ in 0..20 {
        let Some(s) = scheds.get(m) else { return };
        let invoked = grid_core::clock::unix_ms();
        let r = s.schedule_job(&job.id, config(job)).await;
        let acked = r.is_ok().then(grid_core::clock::unix_ms);
        calls.lock().unwrap_or_else(|e| e.into_inner()).push(Call {
            job: i,
            on: true,
            invoked,
            acked,
        });
        if acked.is_some() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Unschedules and schedules again (same configuration) the churned jobs, at random.
async fn churn(
    seed: u64,
    members: usize,
    jobs: Arc<Vec<Job>>,
    scheds: Scheds,
    calls: Arc<Mutex<Vec<Call>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let churned: Vec<u32> = (0..jobs.len() as u32)
        .filter(|i| jobs[*i as usize].churned)
        .collect();
    let mut on: BTreeSet<u32> = churned.iter().copied().collect();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(300..900))).await;
        let i = churned[rng.gen_range(0..churned.len())];
        let m = rng.gen_range(0..members);
        let Some(s) = scheds.get(m) else { continue };
        let job = &jobs[i as usize];
        let turn_on = !on.contains(&i);
        let invoked = grid_core::clock::unix_ms();
        let r = if turn_on {
            s.schedule_job(&job.id, config(job)).await
        } else {
            s.unschedule_job(&job.id).await
        };
        let acked = r.is_ok().then(grid_core::clock::unix_ms);
        calls.lock().unwrap_or_else(|e| e.into_inner()).push(Call {
            job: i,
            on: turn_on,
            invoked,
            acked,
        });
        if acked.is_some() {
            if turn_on {
                on.insert(i);
            } else {
                on.remove(&i);
            }
        }
    }
}

/// Reads every job's history every 4 s (the history keeps the last 20 runs).
async fn historian(
    jobs: Arc<Vec<Job>>,
    scheds: Scheds,
    history: Arc<Mutex<BTreeMap<(u32, u64), RunRecord>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_secs(4)).await;
        read_histories(&jobs, &scheds, &history).await;
    }
}

async fn read_histories(
    jobs: &[Job],
    scheds: &Scheds,
    history: &Mutex<BTreeMap<(u32, u64), RunRecord>>,
) {
    for (i, job) in jobs.iter().enumerate() {
        let Some(s) = (0..5).find_map(|m| scheds.get(m)) else {
            return;
        };
        let read = tokio::time::timeout(Duration::from_secs(1), s.run_history(&job.id)).await;
        if let Ok(Ok(h)) = read {
            let mut all = history.lock().unwrap_or_else(|e| e.into_inner());
            for r in h {
                all.insert((i as u32, r.scheduled_at_ms), r);
            }
        }
    }
}

/// The members with runner `key`.
fn runner_members(key: &str) -> Vec<usize> {
    match key {
        "common" => vec![0, 1, 2],
        "rare" => vec![RARE],
        _ => Vec::new(),
    }
}

/// Whether job `i` was surely scheduled at `t` (a `schedule_job` acknowledged before it,
/// and no `unschedule_job` invoked between), and whether it was surely not (an
/// `unschedule_job` acknowledged before it and no `schedule_job` invoked since).
fn state_at(calls: &[&Call], t: u64) -> (bool, bool) {
    let mut on = false;
    let mut off = false;
    for c in calls {
        match c.acked {
            Some(acked) if acked <= t => {
                on = c.on;
                off = !c.on;
            }
            _ if c.invoked <= t => {
                on = false;
                off = false;
            }
            _ => {}
        }
    }
    (on, off)
}

/// The checkers (see the module docs). Returns details for the failure report.
#[allow(clippy::too_many_arguments)]
fn check(
    report: &mut SeedReport,
    finals: &BTreeMap<u32, String>,
    jobs: &[Job],
    runs: &[Run],
    calls: &[Call],
    history: &BTreeMap<(u32, u64), RunRecord>,
    troubles: &[(Option<usize>, u64)],
    base: u64,
    check_to: u64,
) -> String {
    let mut details = String::new();
    let mut by_job: BTreeMap<u32, Vec<&Run>> = BTreeMap::new();
    for r in runs {
        by_job.entry(r.job).or_default().push(r);
    }
    let mut calls_of: BTreeMap<u32, Vec<&Call>> = BTreeMap::new();
    for c in calls {
        calls_of.entry(c.job).or_default().push(c);
    }
    for cs in calls_of.values_mut() {
        cs.sort_by_key(|c| c.invoked);
    }
    let fault_between =
        |from: u64, to: u64| troubles.iter().any(|(_, at)| from <= *at && *at <= to);
    let member_hit = |m: usize, from: u64, to: u64| {
        troubles
            .iter()
            .any(|(who, at)| who.is_none_or(|w| w == m) && from <= *at && *at <= to)
    };
    let mut doubles = Vec::new();
    let mut lost = Vec::new();
    let mut late = Vec::new();
    let mut after_unschedule = Vec::new();
    let mut unavailable = Vec::new();
    let mut max_late = (0u64, 0u64);
    for (i, job) in jobs.iter().enumerate() {
        let i = i as u32;
        let job_runs = by_job.get(&i).map(Vec::as_slice).unwrap_or(&[]);
        let job_calls = calls_of.get(&i).map(Vec::as_slice).unwrap_or(&[]);
        // Which run stands for which slot.
        let mut ran: BTreeMap<u64, Vec<&Run>> = BTreeMap::new();
        for r in job_runs {
            if job.key == "none" {
                unavailable.push(format!("{} (runner none) ran on m{}", job.id, r.member));
            }
            let Ok(k) = job.slots.binary_search(&r.slot) else {
                doubles.push(format!(
                    "{}: a run for {} which is not a slot",
                    job.id, r.slot
                ));
                continue;
            };
            let from = k + 1 - (r.slots.max(1) as usize).min(k + 1);
            for s in &job.slots[from..=k] {
                ran.entry(*s).or_default().push(r);
            }
        }
        for (s, rs) in &ran {
            if rs.len() > 1 {
                doubles.push(format!(
                    "{} slot {s}: {:?}",
                    job.id,
                    rs.iter()
                        .map(|r| (r.member, r.started, r.slots))
                        .collect::<Vec<_>>()
                ));
            }
            if let Some(r) = rs.first() {
                let (_, off) = state_at(job_calls, *s);
                if off {
                    after_unschedule.push(format!(
                        "{} slot {s} ran on m{} at {} after an acknowledged unschedule",
                        job.id, r.member, r.started
                    ));
                }
                let lateness = r.started.saturating_sub(*s);
                if lateness > max_late.0 {
                    max_late = (lateness, *s);
                }
                let after_fault = AFTER_FAULT.as_millis() as u64;
                let ok = lateness <= ON_TIME.as_millis() as u64
                    || troubles.iter().any(|(_, at)| {
                        *at + after_fault >= *s
                            && *at <= r.started
                            && r.started <= (*s).max(*at) + after_fault
                    });
                if !ok {
                    late.push(format!(
                        "{} slot {s} ran {lateness} ms late on m{}",
                        job.id, r.member
                    ));
                }
            }
        }
        // Every slot it surely had, run or excused.
        for s in job
            .slots
            .iter()
            .filter(|s| **s >= base + 1_000 && **s <= check_to)
        {
            if ran.contains_key(s) || job.key == "none" && !state_at(job_calls, *s).0 {
                continue;
            }
            let (on, _) = state_at(job_calls, *s);
            let record = history.iter().find(|((j, at), r)| {
                *j == i && {
                    let k = job.slots.binary_search(at).ok();
                    k.is_some_and(|k| {
                        let from = k + 1 - (r.slots.max(1) as usize).min(k + 1);
                        job.slots[from..=k].contains(s)
                    })
                }
            });
            match record.map(|(_, r)| r) {
                Some(r) if r.outcome == Outcome::Unavailable => {
                    let excused = match job.key {
                        "none" => true,
                        "rare" => member_hit(
                            RARE,
                            r.fired_at_ms
                                .saturating_sub(DIRECTORY_LAG.as_millis() as u64),
                            r.fired_at_ms,
                        ),
                        _ => troubles.iter().any(|(who, at)| {
                            who.is_none()
                                && *at + DIRECTORY_LAG.as_millis() as u64 >= r.fired_at_ms
                                && *at <= r.fired_at_ms
                        }),
                    };
                    if !excused {
                        unavailable.push(format!(
                            "{} slot {s} (runner {}) recorded Unavailable at {} with the runner's members up: {:?}",
                            job.id, job.key, r.fired_at_ms, r.message
                        ));
                    }
                }
                Some(r) if r.outcome == Outcome::Aborted => {
                    // Still running (a previous run not finished) or its member gone: the
                    // latter only if a fault hit that member.
                    let member = r
                        .member
                        .as_deref()
                        .and_then(|m| m.strip_prefix('m'))
                        .and_then(|m| m.parse::<usize>().ok());
                    let gone = r.message.as_deref().is_some_and(|m| m.contains("left"));
                    if gone
                        && !member.is_some_and(|m| {
                            member_hit(m, s.saturating_sub(60_000), r.fired_at_ms + 60_000)
                        })
                    {
                        lost.push(format!(
                            "{} slot {s}: recorded Aborted ({:?}) but no fault hit {:?}",
                            job.id, r.message, r.member
                        ));
                    }
                }
                Some(r) if r.outcome == Outcome::Success || r.outcome == Outcome::Failed => {
                    // Recorded as run, but no runner saw it start: the runner records at
                    // start, so this is a run whose record lies.
                    lost.push(format!(
                        "{} slot {s}: recorded {:?} on {:?} but never started",
                        job.id, r.outcome, r.member
                    ));
                }
                // Its run (or record) may have been pending on a member a fault hit when
                // the job was unscheduled, before the historian read it: the record went
                // with the job. Excused.
                _ if job_calls.iter().any(|c| {
                    !c.on
                        && c.invoked > *s
                        && c.invoked <= s + 5_000
                        && runner_members(job.key)
                            .iter()
                            .any(|m| member_hit(*m, s.saturating_sub(10_000), c.invoked))
                }) => {}
                _ if on && job.key != "none" => {
                    lost.push(format!(
                        "{} slot {s} (runner {}) never ran and has no record{} [at the end: {}; calls (schedule?, invoked, acked): {:?}; runs around: {:?}]",
                        job.id,
                        job.key,
                        if fault_between(s.saturating_sub(10_000), s + 10_000) {
                            " (a fault near it)"
                        } else {
                            ""
                        },
                        finals.get(&i).map(String::as_str).unwrap_or("?"),
                        job_calls
                            .iter()
                            .map(|c| (c.on, c.invoked, c.acked))
                            .collect::<Vec<_>>(),
                        job_runs
                            .iter()
                            .filter(|r| r.slot + 10_000 >= *s && r.slot <= s + 10_000)
                            .map(|r| (r.slot, r.slots, r.member, r.started))
                            .collect::<Vec<_>>(),
                    ));
                }
                _ => {}
            }
        }
    }
    let mut push = |what: &str, v: &[String]| {
        if !v.is_empty() {
            report.violations.push(format!(
                "{what}: {} (first: {})",
                v.len(),
                v.iter().take(4).cloned().collect::<Vec<_>>().join("; ")
            ));
        }
    };
    push("slots run twice", &doubles);
    push("slots lost", &lost);
    push("slots late", &late);
    push("slots run after unschedule", &after_unschedule);
    push("Unavailable wrong", &unavailable);
    let _ = writeln!(
        details,
        "runs: {}, latest run: {} ms after its slot {}, troubles (member, Unix ms): {troubles:?}",
        runs.len(),
        max_late.0,
        max_late.1
    );
    details
}
