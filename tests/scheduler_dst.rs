//! A cron job in a time zone across a daylight-saving change, with the clock driven by the
//! test: the Unix clock of this process ([`grid_core::clock::set_unix_anchor`], once per
//! process, hence a test binary of its own) is set to a few seconds before New York's
//! spring change (2026-03-08, 02:00 EST -> 03:00 EDT). A job at 03:00 local time is then
//! due 5 s later, not an hour later (what a fixed offset would give); a job at 02:30, a
//! time that does not exist that day, fires at the first instant after the gap, 03:00 EDT;
//! and the day after, both are back at their local times.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use grid_core::clock::unix_ms;
use grid_exec::scheduler::{JobConfig, JobRequest, JobResponse, Outcome, Schedule};

use common::{data_cluster, eventually_async};

/// 2026-03-08 07:00:00 UTC = 03:00 EDT, the first instant after New York's spring gap.
const AFTER_GAP: u64 = 1_772_953_200_000;
const DAY: u64 = 86_400_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cron_job_in_new_york_fires_on_time_across_the_spring_change() {
    // 01:59:54 EST: six seconds before the gap.
    assert!(
        grid_core::clock::set_unix_anchor(AFTER_GAP - 6_000),
        "something read the clock first"
    );
    let grids = data_cluster("sched-dst", 2, |b| b.partitions(31).backups(1)).await;
    let ran = Arc::new(Mutex::new(Vec::new()));
    for g in &grids {
        let ran = ran.clone();
        g.scheduler()
            .register_job_runner("report", move |r: JobRequest| {
                ran.lock()
                    .unwrap()
                    .push((r.job_id.clone(), r.scheduled_at_ms, unix_ms()));
                async { JobResponse::success() }
            })
            .await;
    }
    assert!(
        unix_ms() < AFTER_GAP - 1_000,
        "the cluster took too long to start"
    );
    let s = grids[0].scheduler().clone();
    let three = JobConfig::for_runner("report")
        .schedule(Schedule::cron("0 0 3 * * ?", "America/New_York").unwrap());
    let half_past_two = JobConfig::for_runner("report")
        .schedule(Schedule::cron("0 30 2 * * ?", "America/New_York").unwrap());
    s.schedule_job("at-three", three).await.unwrap();
    s.schedule_job("at-half-past-two", half_past_two)
        .await
        .unwrap();
    assert_eq!(s.next_run_time("at-three").await.unwrap(), Some(AFTER_GAP));
    assert_eq!(
        s.next_run_time("at-half-past-two").await.unwrap(),
        Some(AFTER_GAP)
    );
    for id in ["at-three", "at-half-past-two"] {
        let s = s.clone();
        assert!(
            eventually_async(Duration::from_secs(30), || {
                let s = s.clone();
                async move { !s.run_history(id).await.unwrap().is_empty() }
            })
            .await,
            "{id} did not fire"
        );
        let h = s.run_history(id).await.unwrap();
        assert_eq!(h[0].scheduled_at_ms, AFTER_GAP);
        assert_eq!(h[0].outcome, Outcome::Success);
    }
    // Fired once each, on time (within the test's slack), by this test's clock.
    let ran = ran.lock().unwrap().clone();
    assert_eq!(ran.len(), 2, "{ran:?}");
    for (id, slot, at) in &ran {
        assert_eq!(*slot, AFTER_GAP, "{id}");
        assert!(
            *at >= AFTER_GAP && *at < AFTER_GAP + 5_000,
            "{id} ran at {at}"
        );
    }
    // The next day, summer time: 03:00 EDT is 07:00 UTC, 02:30 EDT is 06:30 UTC.
    assert_eq!(
        s.next_run_time("at-three").await.unwrap(),
        Some(AFTER_GAP + DAY)
    );
    assert_eq!(
        s.next_run_time("at-half-past-two").await.unwrap(),
        Some(AFTER_GAP + DAY - 1_800_000)
    );
}
