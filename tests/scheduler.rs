//! The cluster scheduler on in-process clusters: a job scheduled from two members at once
//! fires once per slot; the owner killed just before a slot fires it once on the new
//! owner; an unregistered runner gives `Unavailable`; run history and next run time; local
//! jobs stay local and vanish with their member; unschedule stops a job everywhere. (The
//! cron-across-DST test drives the Unix clock, so it has a test binary of its own:
//! `tests/scheduler_dst.rs`.)

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use grid::Grid;
use grid_core::clock::unix_ms;
use grid_exec::scheduler::{JobConfig, JobRequest, JobResponse, Outcome, RunMode, Schedule};

use common::{data_cluster, eventually, eventually_async, settled};

/// Every run the runners saw: (job, slot) -> the members that ran it.
#[derive(Clone, Default)]
struct Runs(Arc<Mutex<RunMap>>);

type RunMap = HashMap<(String, u64), Vec<String>>;

impl Runs {
    fn of(&self, job: &str) -> Vec<(u64, Vec<String>)> {
        let mut v: Vec<(u64, Vec<String>)> = self
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|((j, _), _)| j == job)
            .map(|((_, s), m)| (*s, m.clone()))
            .collect();
        v.sort();
        v
    }

    fn count(&self, job: &str) -> usize {
        self.of(job).iter().map(|(_, m)| m.len()).sum()
    }

    fn doubles(&self) -> Vec<((String, u64), Vec<String>)> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, m)| m.len() > 1)
            .map(|(k, m)| (k.clone(), m.clone()))
            .collect()
    }
}

/// Registers runner `key` on `grid`, recording into `runs`.
async fn counting_runner(grid: &Grid, key: &str, runs: &Runs) {
    let runs = runs.clone();
    let me = grid.runtime().member_id().to_string();
    grid.scheduler()
        .register_job_runner(key, move |r: JobRequest| {
            runs.0
                .lock()
                .unwrap()
                .entry((r.job_id.clone(), r.scheduled_at_ms))
                .or_default()
                .push(me.clone());
            async { JobResponse::success() }
        })
        .await;
}

/// Waits until every member knows that `members` have runner `key`.
async fn runner_known(grids: &[Grid], key: &str, members: usize) -> bool {
    eventually(Duration::from_secs(15), || {
        grids
            .iter()
            .all(|g| g.scheduler().members_with_runner(key).len() == members)
    })
    .await
}

fn index_of(grids: &[Grid], member: &str) -> usize {
    grids
        .iter()
        .position(|g| &**g.runtime().member_id() == member)
        .unwrap()
}

fn owner_of(grids: &[Grid], id: &str) -> usize {
    let p = grids[0].scheduler().partition_of(id);
    let owner = grids[0].runtime().table().owner(p).cloned().unwrap();
    index_of(grids, &owner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_scheduled_from_two_members_at_once_fires_once_per_slot() {
    let grids = data_cluster("sched-two", 3, |b| b.partitions(31).backups(1)).await;
    let runs = Runs::default();
    for g in &grids {
        counting_runner(g, "count", &runs).await;
    }
    assert!(runner_known(&grids, "count", 3).await);
    let first = unix_ms() + 1_000;
    let same = JobConfig::for_runner("count")
        .schedule(Schedule::interval(Duration::from_millis(300), Some(first)));
    // The same job from two members at once; and a job whose two schedulers disagree on
    // its parameters (the second replaces the first), also at once.
    let (a, b, c, d) = tokio::join!(
        grids[0].scheduler().schedule_job("same", same.clone()),
        grids[1].scheduler().schedule_job("same", same.clone()),
        grids[1]
            .scheduler()
            .schedule_job("differ", same.clone().parameters(&1u8).unwrap()),
        grids[2]
            .scheduler()
            .schedule_job("differ", same.clone().parameters(&2u8).unwrap()),
    );
    for r in [a, b, c, d] {
        r.unwrap();
    }
    assert!(
        eventually(Duration::from_secs(30), || runs.of("same").len() >= 8
            && runs.of("differ").len() >= 8)
        .await,
        "the jobs did not fire 8 times in 30 s"
    );
    for id in ["same", "differ"] {
        let seen = grids[2].scheduler().job_details(id).await.unwrap().unwrap();
        assert_eq!(seen.id, id);
    }
    for g in &grids {
        g.scheduler().unschedule_job("same").await.unwrap();
        g.scheduler().unschedule_job("differ").await.unwrap();
    }
    assert!(
        runs.doubles().is_empty(),
        "slots ran twice: {:?}",
        runs.doubles()
    );
    for id in ["same", "differ"] {
        let slots: Vec<u64> = runs.of(id).iter().map(|(s, _)| *s).collect();
        // Slots on the grid of the schedule, none skipped between the first and the last
        // (nothing was late enough to collapse under this load... allow a collapse, but no
        // slot off the grid).
        assert!(
            slots.iter().all(|s| (s - first) % 300 < 1),
            "{id}: {slots:?}"
        );
        assert_eq!(slots[0], first, "{id}: the first slot did not fire");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_owner_killed_just_before_a_slot_fires_it_once_on_the_new_owner() {
    let mut grids = data_cluster("sched-kill", 3, |b| b.partitions(31).backups(1)).await;
    let runs = Runs::default();
    for g in &grids {
        counting_runner(g, "count", &runs).await;
    }
    assert!(runner_known(&grids, "count", 3).await);
    let id = "nightly";
    let o = owner_of(&grids, id);
    let other = (o + 1) % 3;
    let slot = unix_ms() + 2_000;
    grids[other]
        .scheduler()
        .schedule_job(
            id,
            JobConfig::for_runner("count").schedule(Schedule::run_once(slot)),
        )
        .await
        .unwrap();
    assert_eq!(
        grids[other].scheduler().next_run_time(id).await.unwrap(),
        Some(slot)
    );
    // Just before the slot, the owner dies (abruptly: killed, then dropped).
    tokio::time::sleep(Duration::from_millis(slot.saturating_sub(unix_ms() + 300))).await;
    let victim = grids.remove(o);
    let victim_id = victim.runtime().member_id().to_string();
    victim.kill();
    drop(victim);
    let killed_at = unix_ms();
    assert!(runs.count(id) == 0, "fired before its slot");
    assert!(
        eventually(Duration::from_secs(30), || runs.count(id) >= 1).await,
        "the slot did not fire within 30 s of the owner's death"
    );
    let fired_at = unix_ms();
    assert!(settled(&grids, 2).await);
    // Long enough for a second firing to show.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(runs.of(id), vec![(slot, runs.of(id)[0].1.clone())]);
    assert_eq!(runs.count(id), 1, "fired twice: {:?}", runs.of(id));
    let ran_on = runs.of(id)[0].1[0].clone();
    assert_ne!(ran_on, victim_id, "the dead owner ran it");
    eprintln!(
        "slot fired on {ran_on} {} ms after the owner {victim_id}'s death ({} ms late)",
        fired_at - killed_at,
        fired_at - slot
    );
    let history = grids[0].scheduler().run_history(id).await.unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].outcome, Outcome::Success);
    assert_eq!(history[0].scheduled_at_ms, slot);
    assert_eq!(grids[0].scheduler().next_run_time(id).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_registered_runner_a_slot_is_unavailable() {
    let grids = data_cluster("sched-unavail", 3, |b| b.partitions(31).backups(1)).await;
    let runs = Runs::default();
    // Only m2 has the runner: every run goes there, whoever owns the job.
    counting_runner(&grids[2], "only-m2", &runs).await;
    assert!(runner_known(&grids, "only-m2", 1).await);
    let every = |ms| Schedule::interval(Duration::from_millis(ms), None);
    grids[0]
        .scheduler()
        .schedule_job(
            "nobody",
            JobConfig::for_runner("unknown").schedule(every(200)),
        )
        .await
        .unwrap();
    grids[0]
        .scheduler()
        .schedule_job(
            "somebody",
            JobConfig::for_runner("only-m2").schedule(every(200)),
        )
        .await
        .unwrap();
    let s = grids[1].scheduler().clone();
    assert!(
        eventually_async(Duration::from_secs(20), || {
            let s = s.clone();
            async move { s.run_history("nobody").await.unwrap().len() >= 2 }
        })
        .await
    );
    for r in s.run_history("nobody").await.unwrap() {
        assert_eq!(r.outcome, Outcome::Unavailable);
        assert!(r.started_at_ms.is_none());
    }
    assert!(eventually(Duration::from_secs(20), || runs.count("somebody") >= 2).await);
    assert!(runs
        .of("somebody")
        .iter()
        .all(|(_, m)| m == &vec!["m2".to_string()]));
    // m2 unregisters it: the job's slots become Unavailable.
    grids[2].scheduler().unregister_job_runner("only-m2").await;
    assert!(runner_known(&grids, "only-m2", 0).await);
    let before = runs.count("somebody");
    assert!(
        eventually_async(Duration::from_secs(20), || {
            let s = s.clone();
            async move {
                s.run_history("somebody")
                    .await
                    .unwrap()
                    .last()
                    .is_some_and(|r| r.outcome == Outcome::Unavailable)
            }
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        runs.count("somebody") <= before + 1,
        "ran after unregistering"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_history_and_next_run_time() {
    let grids = data_cluster("sched-history", 2, |b| b.partitions(31).backups(1)).await;
    let calls = Arc::new(Mutex::new(0u32));
    for g in &grids {
        let calls = calls.clone();
        g.scheduler()
            .register_job_runner("flaky", move |r: JobRequest| {
                let n = {
                    let mut c = calls.lock().unwrap();
                    *c += 1;
                    *c
                };
                async move {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    let limit: u32 = r.parameters().unwrap();
                    if n % 2 == 0 {
                        Err(format!("run {n} failed (limit {limit})"))
                    } else {
                        Ok(())
                    }
                }
            })
            .await;
    }
    assert!(runner_known(&grids, "flaky", 2).await);
    let first = unix_ms() + 1_000;
    let config = JobConfig::for_runner("flaky")
        .schedule(Schedule::interval(Duration::from_millis(250), Some(first)))
        .parameters(&5u32)
        .unwrap();
    let s = grids[1].scheduler().clone();
    s.schedule_job("flaky-job", config.clone()).await.unwrap();
    assert_eq!(s.next_run_time("flaky-job").await.unwrap(), Some(first));
    let d = s.job_details("flaky-job").await.unwrap().unwrap();
    assert_eq!(d.config, config);
    assert!(d.history.is_empty());
    assert!(eventually(Duration::from_secs(30), || *calls.lock().unwrap() >= 25).await);
    // The 25th run's outcome is recorded a moment after it ends.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let history = s.run_history("flaky-job").await.unwrap();
    assert_eq!(
        history.len(),
        grid_exec::scheduler::table::MAX_HISTORY,
        "bounded"
    );
    assert!(history
        .windows(2)
        .all(|w| w[0].scheduled_at_ms < w[1].scheduled_at_ms));
    for r in &history {
        assert_eq!((r.scheduled_at_ms - first) % 250, 0);
        assert!(r.fired_at_ms >= r.scheduled_at_ms);
        assert!(r.started_at_ms.unwrap() >= r.fired_at_ms);
        assert!(r.duration_ms.unwrap() >= 15);
        assert!(r.member.is_some());
        match r.outcome {
            Outcome::Success => assert!(r.message.is_none()),
            Outcome::Failed => assert!(r.message.as_deref().unwrap().contains("limit 5")),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(history.iter().any(|r| r.outcome == Outcome::Failed));
    assert!(history.iter().any(|r| r.outcome == Outcome::Success));
    let next = s.next_run_time("flaky-job").await.unwrap().unwrap();
    assert!(next > history.last().unwrap().scheduled_at_ms);
    assert_eq!((next - first) % 250, 0);
    let by_runner = grids[0].scheduler().jobs_by_runner("flaky").await.unwrap();
    assert_eq!(by_runner.len(), 1);
    assert_eq!(by_runner[0].id, "flaky-job");
    assert!(grids[0]
        .scheduler()
        .jobs_by_runner("other")
        .await
        .unwrap()
        .is_empty());
    s.unschedule_job("flaky-job").await.unwrap();
    assert_eq!(s.next_run_time("flaky-job").await.unwrap(), None);
    assert!(s.run_history("flaky-job").await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_jobs_stay_local_and_vanish_with_their_member() {
    let mut grids = data_cluster("sched-local", 3, |b| b.partitions(31).backups(1)).await;
    let runs = Runs::default();
    for g in &grids {
        counting_runner(g, "warm", &runs).await;
    }
    let local = JobConfig::for_runner("warm")
        .run_mode(RunMode::Locally)
        .schedule(Schedule::interval(Duration::from_millis(100), None));
    grids[1]
        .scheduler()
        .schedule_job("warm-up", local.clone())
        .await
        .unwrap();
    assert!(eventually(Duration::from_secs(10), || runs.count("warm-up") >= 5).await);
    assert!(runs
        .of("warm-up")
        .iter()
        .all(|(_, m)| m == &vec!["m1".to_string()]));
    // Only its member knows it.
    let d = grids[1]
        .scheduler()
        .job_details("warm-up")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(d.config.run_mode, RunMode::Locally);
    assert!(d.next_run_ms.is_some());
    assert!(!d.history.is_empty());
    assert!(d.history.iter().all(|r| r.outcome == Outcome::Success));
    assert!(grids[0]
        .scheduler()
        .job_details("warm-up")
        .await
        .unwrap()
        .is_none());
    assert!(grids[2]
        .scheduler()
        .job_details("warm-up")
        .await
        .unwrap()
        .is_none());
    let by_runner = grids[1].scheduler().jobs_by_runner("warm").await.unwrap();
    assert_eq!(by_runner.len(), 1);
    assert!(grids[0]
        .scheduler()
        .jobs_by_runner("warm")
        .await
        .unwrap()
        .is_empty());
    // Each member may have a local job of the same id: they are separate.
    grids[2]
        .scheduler()
        .schedule_job("warm-up", local)
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(10), || runs
            .of("warm-up")
            .iter()
            .any(|(_, m)| m == &vec!["m2".to_string()]))
        .await
    );
    // Its member dies: its local job is gone with it, the other member's goes on.
    let victim = grids.remove(1);
    victim.kill();
    drop(victim);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let by_m1 = |runs: &Runs| {
        runs.of("warm-up")
            .iter()
            .filter(|(_, m)| m.contains(&"m1".to_string()))
            .count()
    };
    let m1_before = by_m1(&runs);
    let all_before = runs.count("warm-up");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        by_m1(&runs),
        m1_before,
        "a dead member's local job still runs"
    );
    assert!(
        runs.count("warm-up") >= all_before + 5,
        "m2's local job stopped"
    );
    grids[1]
        .scheduler()
        .unschedule_job("warm-up")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unschedule_stops_a_job_everywhere() {
    let grids = data_cluster("sched-unschedule", 3, |b| b.partitions(31).backups(1)).await;
    let runs = Runs::default();
    for g in &grids {
        counting_runner(g, "tick", &runs).await;
    }
    assert!(runner_known(&grids, "tick", 3).await);
    grids[0]
        .scheduler()
        .schedule_job(
            "ticker",
            JobConfig::for_runner("tick")
                .schedule(Schedule::interval(Duration::from_millis(100), None)),
        )
        .await
        .unwrap();
    assert!(eventually(Duration::from_secs(10), || runs.count("ticker") >= 5).await);
    grids[2].scheduler().unschedule_job("ticker").await.unwrap();
    let after = runs.count("ticker");
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert!(
        runs.count("ticker") <= after + 1,
        "ran {} times after unschedule",
        runs.count("ticker") - after
    );
    for g in &grids {
        assert!(g.scheduler().job_details("ticker").await.unwrap().is_none());
        let p = g.scheduler().partition_of("ticker");
        assert_eq!(g.scheduler().service().table(p).unwrap().jobs.len(), 0);
    }
    // Unknown ids are ignored.
    grids[1]
        .scheduler()
        .unschedule_job("never-was")
        .await
        .unwrap();
}
