//! The job table's decisions and changes, replayed on an owner and a backup, with time
//! and the world (who has the runner, who is alive) given by the test.

use std::cell::RefCell;
use std::collections::HashSet;
use std::time::Duration;

use super::*;
use crate::scheduler::job::RunMode;

/// An owner and a backup of one partition, and the world they see.
struct World {
    owner: JobTable,
    backup: JobTable,
    now: u64,
    /// Members with the runner (in order of preference; the first is "this member").
    runners: RefCell<Vec<String>>,
    dead: RefCell<HashSet<String>>,
    /// Runs sent, in order.
    sent: Vec<(String, JobRequest)>,
    /// Runs claimed whose claim the owner has not seen confirmed (not sent yet).
    held: RefCell<HashSet<(String, u64)>>,
}

impl World {
    fn new() -> Self {
        Self {
            owner: JobTable::default(),
            backup: JobTable::default(),
            now: 1_000_000,
            runners: RefCell::new(vec!["m0".into()]),
            dead: RefCell::new(HashSet::new()),
            sent: Vec::new(),
            held: RefCell::new(HashSet::new()),
        }
    }

    fn op(&mut self, op: Op) -> Result<Answer, SchedulerError> {
        let runners = self.runners.borrow().clone();
        let dead = self.dead.borrow().clone();
        let target =
            |_: &str, _: &str, _: u64| runners.iter().find(|m| !dead.contains(*m)).cloned();
        let live = |m: &str| !dead.contains(m);
        let held_runs = self.held.borrow().clone();
        let held = |id: &str, run: u64| held_runs.contains(&(id.to_string(), run));
        let env = Env {
            now_ms: self.now,
            target: &target,
            live: &live,
            held: &held,
            confirm: !held_runs.is_empty(),
        };
        let decision = self.owner.decide(op, &env)?;
        if let Answer::Fired(runs) = &decision.answer {
            for Output::Dispatch { member, request } in runs.clone() {
                self.sent.push((member, request));
            }
        }
        if let Some(change) = decision.change {
            // Replicated: the backup applies it too, and ends in the same state.
            let _ = self.backup.apply(&change);
            for Output::Dispatch { member, request } in self.owner.apply(&change) {
                self.sent.push((member, request));
            }
            assert_eq!(self.owner, self.backup, "backup diverged after {change:?}");
        }
        Ok(decision.answer)
    }

    fn schedule(&mut self, id: &str, config: JobConfig) {
        self.op(Op::Schedule {
            id: id.into(),
            config,
        })
        .unwrap();
    }

    fn fire(&mut self) {
        self.op(Op::FireDue).unwrap();
    }

    fn finish(&mut self, id: &str, run_id: u64, member: &str, outcome: Outcome) {
        self.op(Op::Finish {
            id: id.into(),
            run_id,
            member: member.into(),
            started_at_ms: Some(self.now),
            duration_ms: Some(5),
            outcome,
            message: None,
        })
        .unwrap();
    }

    fn job(&self, id: &str) -> &Job {
        &self.owner.jobs[id]
    }

    fn slots_sent(&self, id: &str) -> Vec<u64> {
        self.sent
            .iter()
            .filter(|(_, r)| r.job_id == id)
            .map(|(_, r)| r.scheduled_at_ms)
            .collect()
    }
}

fn every(ms: u64, first: u64) -> JobConfig {
    JobConfig::for_runner("r").schedule(Schedule::interval(Duration::from_millis(ms), Some(first)))
}

#[test]
fn a_due_slot_is_claimed_once_and_sent_to_the_member_with_the_runner() {
    let mut w = World::new();
    w.schedule("a", every(1_000, 1_001_000));
    assert_eq!(w.job("a").next_slot, Some(1_001_000));
    // Not due yet: nothing happens.
    w.now = 1_000_999;
    w.fire();
    assert!(w.sent.is_empty());
    assert_eq!(w.owner.earliest(), Some(1_001_000));
    w.now = 1_001_003;
    w.fire();
    w.fire(); // a second firing finds the slot claimed
    assert_eq!(w.slots_sent("a"), vec![1_001_000]);
    assert_eq!(w.sent[0].0, "m0");
    assert_eq!(w.job("a").last_slot, Some(1_001_000));
    assert_eq!(w.job("a").next_slot, Some(1_002_000));
    assert_eq!(w.job("a").running.len(), 1);
    let run = w.sent[0].1.run_id;
    w.finish("a", run, "m0", Outcome::Success);
    assert!(w.job("a").running.is_empty());
    let h = &w.job("a").history;
    assert_eq!(h.len(), 1);
    assert_eq!(h[0].outcome, Outcome::Success);
    assert_eq!(h[0].scheduled_at_ms, 1_001_000);
    assert_eq!(h[0].fired_at_ms, 1_001_003);
    // A repeated report changes nothing.
    w.finish("a", run, "m0", Outcome::Failed);
    assert_eq!(w.job("a").history.len(), 1);
}

#[test]
fn no_live_runner_is_recorded_unavailable_and_the_job_goes_on() {
    let mut w = World::new();
    w.runners.borrow_mut().clear();
    w.schedule("a", every(1_000, 1_001_000));
    w.now = 1_001_000;
    w.fire();
    assert!(w.sent.is_empty());
    let h = &w.job("a").history;
    assert_eq!(h[0].outcome, Outcome::Unavailable);
    assert_eq!(w.job("a").next_slot, Some(1_002_000));
    // A runner appears: the next slot runs.
    w.runners.borrow_mut().push("m2".into());
    w.now = 1_002_000;
    w.fire();
    assert_eq!(w.sent[0].0, "m2");
}

#[test]
fn missed_slots_collapse_into_one_run_by_default() {
    let mut w = World::new();
    w.schedule("a", every(1_000, 1_001_000));
    w.now = 1_005_500; // slots 1_001_000 ..= 1_005_000 missed
    w.fire();
    assert_eq!(w.slots_sent("a"), vec![1_005_000]);
    assert_eq!(w.sent[0].1.slots, 5);
    assert_eq!(w.job("a").next_slot, Some(1_006_000));
    w.fire();
    assert_eq!(w.sent.len(), 1);
}

#[test]
fn missed_slots_fire_each_when_asked() {
    let mut w = World::new();
    w.schedule(
        "a",
        every(1_000, 1_001_000)
            .missed_slots(MissedSlots::FireEach)
            .allow_overlap(true),
    );
    w.now = 1_003_500;
    for _ in 0..5 {
        w.fire();
    }
    assert_eq!(w.slots_sent("a"), vec![1_001_000, 1_002_000, 1_003_000]);
    assert_eq!(w.job("a").next_slot, Some(1_004_000));
}

#[test]
fn missed_slots_are_skipped_past_the_grace_when_asked() {
    let mut w = World::new();
    w.schedule(
        "a",
        every(1_000, 1_001_000)
            .missed_slots(MissedSlots::Skip)
            .missed_grace(Duration::from_millis(200)),
    );
    w.now = 1_003_500; // the latest due slot is 500 ms late: skipped
    w.fire();
    assert!(w.sent.is_empty());
    assert!(w.job("a").history.is_empty());
    assert_eq!(w.job("a").next_slot, Some(1_004_000));
    w.now = 1_004_100; // 100 ms late: within the grace
    w.fire();
    assert_eq!(w.slots_sent("a"), vec![1_004_000]);
}

#[test]
fn a_slot_that_finds_the_previous_run_still_running_is_aborted_and_the_run_resent() {
    let mut w = World::new();
    w.schedule("a", every(1_000, 1_001_000));
    w.now = 1_001_000;
    w.fire();
    let first = w.sent[0].1.run_id;
    w.now = 1_002_000;
    w.fire();
    let h = &w.job("a").history;
    assert_eq!(h.len(), 1);
    assert_eq!(h[0].outcome, Outcome::Aborted);
    assert_eq!(h[0].message.as_deref(), Some(STILL_RUNNING));
    assert_eq!(h[0].scheduled_at_ms, 1_002_000);
    // The run under way was sent again (its member ignores a copy).
    assert_eq!(w.sent.len(), 2);
    assert_eq!(w.sent[1].1.run_id, first);
    assert_eq!(w.job("a").running.len(), 1);
}

#[test]
fn a_run_on_a_dead_member_does_not_make_the_next_slot_still_running() {
    // The owner claimed slot 1 for m1 and m1 died before running it; the next owner's
    // first firing comes before its reap: the missed slot fires, it is not "still running".
    let mut w = World::new();
    *w.runners.borrow_mut() = vec!["m1".into(), "m2".into()];
    w.schedule("a", every(1_000, 1_001_000));
    w.now = 1_001_000;
    w.fire();
    assert_eq!(w.sent.last().unwrap().0, "m1");
    w.dead.borrow_mut().insert("m1".into());
    w.now = 1_003_100;
    w.fire();
    let (member, request) = w.sent.last().unwrap().clone();
    assert_eq!(member, "m2");
    assert_eq!((request.scheduled_at_ms, request.slots), (1_003_000, 2));
    assert!(w.job("a").history.is_empty(), "{:?}", w.job("a").history);
    // The reap then ends the dead member's run; the new one goes on.
    w.op(Op::Reap).unwrap();
    assert_eq!(w.job("a").history[0].outcome, Outcome::Aborted);
    assert_eq!(w.job("a").running.len(), 1);
    assert_eq!(w.job("a").running[0].member, "m2");
}

#[test]
fn slots_due_while_a_run_is_held_unconfirmed_join_it_instead_of_being_aborted() {
    // The owner claimed slot 1 but its backup did not confirm the claim: the run is held
    // (not sent). Slots 2 and 3 come meanwhile; when the owner fires again (to confirm),
    // they join the held run, which then stands for slots 1-3.
    let mut w = World::new();
    w.schedule("a", every(1_000, 1_001_000));
    w.now = 1_001_000;
    w.fire();
    let (_, first) = w.sent.pop().unwrap();
    w.held.borrow_mut().insert(("a".into(), first.run_id));
    w.now = 1_003_050;
    let versions_before = w.owner.clone();
    w.fire();
    assert_ne!(w.owner, versions_before);
    assert!(w.sent.is_empty(), "a held run was sent: {:?}", w.sent);
    let job = w.job("a");
    assert!(job.history.is_empty(), "{:?}", job.history);
    assert_eq!(job.running.len(), 1);
    assert_eq!(job.running[0].run_id, first.run_id);
    assert_eq!(
        (job.running[0].scheduled_at_ms, job.running[0].slots),
        (1_003_000, 3)
    );
    assert_eq!(job.next_slot, Some(1_004_000));
    assert_eq!(job.last_slot, Some(1_003_000));
    // Nothing due, runs held: the firing still writes a change, for the owner to confirm.
    let decision = {
        let live = |_: &str| true;
        let target = |_: &str, _: &str, _: u64| Some("m0".to_string());
        let held = |_: &str, _: u64| true;
        let env = Env {
            now_ms: w.now,
            target: &target,
            live: &live,
            held: &held,
            confirm: true,
        };
        w.owner.decide(Op::FireDue, &env).unwrap()
    };
    assert_eq!(decision.change, Some(Change::Many(Vec::new())));
    // Once confirmed and sent, the run is an ordinary one: the next slot finds it running.
    w.held.borrow_mut().clear();
    w.now = 1_004_000;
    w.fire();
    assert_eq!(
        w.job("a").history[0].message.as_deref(),
        Some(STILL_RUNNING)
    );
}

#[test]
fn overlap_when_allowed_runs_side_by_side_up_to_a_bound() {
    let mut w = World::new();
    w.schedule("a", every(1_000, 1_001_000).allow_overlap(true));
    for i in 1..=(MAX_RUNNING as u64 + 2) {
        w.now = 1_000_000 + i * 1_000;
        w.fire();
    }
    assert_eq!(w.job("a").running.len(), MAX_RUNNING);
    assert_eq!(w.job("a").history.len(), 2);
    assert!(w
        .job("a")
        .history
        .iter()
        .all(|r| r.outcome == Outcome::Aborted));
}

#[test]
fn a_run_whose_member_died_is_aborted_or_retried_once() {
    let mut w = World::new();
    *w.runners.borrow_mut() = vec!["m1".into(), "m2".into()];
    w.schedule("plain", every(1_000, 1_001_000));
    w.schedule(
        "retried",
        every(1_000, 1_001_000).retry_if_member_dies(true),
    );
    w.now = 1_001_000;
    w.fire();
    assert!(w.sent.iter().all(|(m, _)| m == "m1"));
    w.dead.borrow_mut().insert("m1".into());
    let live = |m: &str| m != "m1";
    assert!(w.owner.has_orphans(&live));
    w.op(Op::Reap).unwrap();
    let plain = &w.job("plain");
    assert!(plain.running.is_empty());
    assert_eq!(plain.history[0].outcome, Outcome::Aborted);
    let retried = &w.job("retried");
    assert_eq!(retried.running[0].member, "m2");
    assert_eq!(retried.running[0].attempt, 2);
    assert_eq!(w.sent.last().unwrap().0, "m2");
    // A late report from the first member is ignored; the second's counts.
    let run = retried.running[0].run_id;
    w.finish("retried", run, "m1", Outcome::Success);
    assert_eq!(w.job("retried").running.len(), 1);
    // The second member dies too: no second retry.
    w.dead.borrow_mut().insert("m2".into());
    w.op(Op::Reap).unwrap();
    let retried = &w.job("retried");
    assert!(retried.running.is_empty());
    assert_eq!(retried.history[0].outcome, Outcome::Aborted);
}

#[test]
fn rescheduling_the_same_job_changes_nothing_and_a_replacement_never_refires_a_slot() {
    let mut w = World::new();
    let config = every(1_000, 1_001_000);
    w.schedule("a", config.clone());
    w.now = 1_001_000;
    w.fire();
    // The same configuration from another member, at the same instant: no change.
    let before = w.owner.clone();
    w.schedule("a", config.clone());
    assert_eq!(w.owner, before);
    // A different configuration whose first slot is the one already fired: it starts
    // after it.
    w.schedule("a", config.clone().parameters(&1u8).unwrap());
    assert_eq!(w.job("a").next_slot, Some(1_002_000));
    assert_eq!(w.job("a").running.len(), 1, "the run under way goes on");
    w.fire();
    assert_eq!(w.slots_sent("a"), vec![1_001_000]);
}

#[test]
fn a_new_owner_built_from_a_copy_sees_the_claimed_slot() {
    let mut w = World::new();
    w.schedule("a", every(1_000, 1_001_000));
    w.now = 1_001_000;
    w.fire();
    // The owner dies; the backup (a copy) takes over, later, and fires again.
    let copy: TableCopy =
        grid_core::codec::decode(&grid_core::codec::encode(&w.backup.to_copy()).unwrap()).unwrap();
    w.owner = JobTable::from_copy(copy);
    w.backup = w.owner.clone();
    w.now = 1_001_900;
    w.fire();
    assert_eq!(w.slots_sent("a"), vec![1_001_000], "the slot fired twice");
    // Its runs under way are sent again.
    assert_eq!(w.owner.resend().len(), 1);
    w.now = 1_002_000;
    w.fire();
    assert_eq!(
        w.job("a").history[0].message.as_deref(),
        Some(STILL_RUNNING)
    );
}

#[test]
fn unschedule_stops_the_slots_and_ignores_unknown_ids() {
    let mut w = World::new();
    w.schedule("a", every(1_000, 1_001_000));
    w.op(Op::Unschedule { id: "a".into() }).unwrap();
    w.op(Op::Unschedule { id: "zzz".into() }).unwrap();
    assert!(w.owner.jobs.is_empty());
    assert_eq!(w.owner.earliest(), None);
    w.now = 2_000_000;
    w.fire();
    assert!(w.sent.is_empty());
    match w.op(Op::Details { id: "a".into() }).unwrap() {
        Answer::Details(d) => assert!(d.is_none()),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_one_time_job_fires_once_and_keeps_its_history() {
    let mut w = World::new();
    w.schedule(
        "once",
        JobConfig::for_runner("r").schedule(Schedule::run_once(1_000_500)),
    );
    w.now = 1_000_600;
    w.fire();
    w.now = 1_900_000;
    w.fire();
    assert_eq!(w.slots_sent("once"), vec![1_000_500]);
    let run = w.sent[0].1.run_id;
    w.finish("once", run, "m0", Outcome::Failed);
    let d = w.owner.details("once").unwrap();
    assert_eq!(d.next_run_ms, None);
    assert_eq!(d.history[0].outcome, Outcome::Failed);
}

#[test]
fn history_is_bounded_and_run_ids_grow() {
    let mut w = World::new();
    w.runners.borrow_mut().clear();
    w.schedule("a", every(1_000, 1_001_000));
    for i in 1..=(MAX_HISTORY as u64 + 5) {
        w.now = 1_000_000 + i * 1_000;
        w.fire();
    }
    let h = &w.job("a").history;
    assert_eq!(h.len(), MAX_HISTORY);
    assert!(h
        .iter()
        .zip(h.iter().skip(1))
        .all(|(a, b)| a.run_id < b.run_id));
    assert_eq!(
        h.back().unwrap().scheduled_at_ms,
        1_000_000 + (MAX_HISTORY as u64 + 5) * 1_000
    );
}

#[test]
fn bad_input_is_refused_without_a_change() {
    let mut w = World::new();
    let too_long = "x".repeat(MAX_ID_BYTES + 1);
    assert!(matches!(
        w.op(Op::Schedule {
            id: too_long,
            config: every(1_000, 0)
        }),
        Err(SchedulerError::IdTooLong { .. })
    ));
    let mut big = every(1_000, 0);
    big.parameters = vec![0; MAX_PARAMETER_BYTES + 1];
    assert!(matches!(
        w.op(Op::Schedule {
            id: "a".into(),
            config: big
        }),
        Err(SchedulerError::ParametersTooLarge { .. })
    ));
    let bad = JobConfig::for_runner("r").schedule(Schedule::Cron {
        expr: "not cron".into(),
        time_zone: "UTC".into(),
    });
    assert!(matches!(
        w.op(Op::Schedule {
            id: "a".into(),
            config: bad
        }),
        Err(SchedulerError::BadSchedule(_))
    ));
    // A report for a run that never was, or a job that is not there.
    w.finish("nope", 7, "m0", Outcome::Success);
    assert!(w.owner.jobs.is_empty());
}

#[test]
fn many_due_jobs_fire_in_bounded_changes() {
    let mut w = World::new();
    let n = MAX_FIRINGS_PER_CHANGE + 10;
    for i in 0..n {
        w.schedule(&format!("j{i}"), every(10_000, 1_001_000));
    }
    w.now = 1_001_000;
    w.fire();
    assert_eq!(w.sent.len(), MAX_FIRINGS_PER_CHANGE);
    assert!(w.owner.is_due(w.now), "the rest is still due");
    w.fire();
    assert_eq!(w.sent.len(), n);
    assert!(!w.owner.is_due(w.now));
    let mut ids: Vec<&str> = w.sent.iter().map(|(_, r)| r.job_id.as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n, "a job fired twice");
}

#[test]
fn a_cron_job_runs_on_its_wall_clock_with_its_parameters() {
    let mut w = World::new();
    // 2026-03-08 is New York's spring change; 09:00 local is 14:00 UTC before, 13:00 after.
    let mar7_14h = 1_772_892_000_000u64;
    let mar8_13h = 1_772_974_800_000u64;
    w.now = mar7_14h - 60_000;
    let config = JobConfig::for_runner("r")
        .schedule(Schedule::cron("0 0 9 * * ?", "America/New_York").unwrap())
        .parameters(&("reindex", 3u32))
        .unwrap();
    w.schedule("daily", config);
    w.now = mar7_14h;
    w.fire();
    let run = w.sent[0].1.run_id;
    w.finish("daily", run, "m0", Outcome::Success);
    assert_eq!(w.job("daily").next_slot, Some(mar8_13h));
    w.now = mar8_13h;
    w.fire();
    assert_eq!(w.slots_sent("daily"), vec![mar7_14h, mar8_13h]);
    let p: (String, u32) = w.sent[1].1.parameters().unwrap();
    assert_eq!(p, ("reindex".to_string(), 3));
    assert_eq!(w.sent[1].1.run_mode, RunMode::OncePerCluster);
}
