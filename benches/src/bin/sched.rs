//! The cluster scheduler's firing lateness, its cost, and what a kill does to it: three
//! members in one process (127.0.0.1, backups 1), `--jobs` jobs (default 10,000) on a
//! `--period-ms` interval (default 1 s, first slots spread over one period), every member
//! with the runner.
//!
//! - without faults, for `--seconds`: firings, lateness (the runner's start minus the
//!   slot) p50/p99/max, and the process's CPU time (user + system) per firing;
//! - then one member is killed (abruptly: `kill`, then dropped) and the rest run for
//!   `--fault-seconds`: slots run twice (goal 0), slots lost (goal 0: a slot whose run is
//!   neither recorded nor covered by a collapsed run; slots up to 3 s before the end are
//!   checked) and the longest delay of a missed slot (from the earliest slot a run covers
//!   to its start).
//!
//! ```sh
//! cargo run --release -p grid-bench --bin sched -- --seconds 20 --fault-seconds 15 --json
//! ```
//!
//! With `--json` the last line of stdout is one JSON object with `firings`,
//! `lateness_p50_ms`, `lateness_p99_ms`, `lateness_max_ms`, `double_fires`, `lost_slots`,
//! `missed_slot_delay_ms`, `cpu_us_per_firing`, and more.

#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::bail;
use clap::Parser;
use grid::{Grid, JobConfig, JobRequest, JobResponse, Schedule};
use hdrhistogram::Histogram;
use serde::Serialize;

const MEMBERS: usize = 3;

#[derive(Parser, Debug)]
#[command(about = "Cluster scheduler: firing lateness, CPU per firing, and a kill's effect")]
struct Args {
    /// Jobs scheduled.
    #[arg(long, default_value_t = 10_000)]
    jobs: usize,
    /// The jobs' interval, in ms.
    #[arg(long, default_value_t = 1_000)]
    period_ms: u64,
    /// Seconds measured without faults.
    #[arg(long, default_value_t = 60.0)]
    seconds: f64,
    /// Seconds run after the kill.
    #[arg(long, default_value_t = 15.0)]
    fault_seconds: f64,
    /// Partitions of the grid.
    #[arg(long, default_value_t = 271)]
    partitions: u32,
    /// Jobs retry a run whose member died (`JobConfig::retry_if_member_dies`).
    #[arg(long)]
    retry: bool,
    /// Print one JSON object as the last line.
    #[arg(long)]
    json: bool,
}

/// One run as the runner saw it.
#[derive(Debug, Clone, Copy)]
struct Seen {
    job: u32,
    slot: u64,
    slots: u32,
    member: u8,
    started: u64,
}

#[derive(Debug, Serialize)]
struct Report {
    jobs: usize,
    period_ms: u64,
    seconds: f64,
    firings: u64,
    firings_per_s: f64,
    lateness_p50_ms: f64,
    lateness_p99_ms: f64,
    lateness_max_ms: f64,
    cpu_us_per_firing: f64,
    fault_firings: u64,
    double_fires: u64,
    lost_slots: u64,
    missed_slot_delay_ms: u64,
    killed: String,
    /// Slots run twice whose slot came before the kill.
    double_fires_before_kill: u64,
    /// Runs the killed member started more than 1 s after it was killed.
    victim_runs_after_kill: u64,
    /// Runs per member (m0, m1, m2), over the whole run.
    runs_per_member: Vec<u64>,
}

fn cpu_time() -> Duration {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the struct we own.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1_000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

async fn start_cluster(args: &Args) -> anyhow::Result<Vec<Grid>> {
    grid_bench::start_cluster("sched", MEMBERS, args.partitions).await
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut grids = start_cluster(&args).await?;
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::new(Mutex::new(Vec::with_capacity(1 << 20)));
    for (i, g) in grids.iter().enumerate() {
        let seen = seen.clone();
        g.scheduler()
            .register_job_runner("bench", move |r: JobRequest| {
                let started = grid_core::clock::unix_ms();
                if let Some(job) = r.job_id.strip_prefix('j').and_then(|j| j.parse().ok()) {
                    seen.lock().unwrap().push(Seen {
                        job,
                        slot: r.scheduled_at_ms,
                        slots: r.slots,
                        member: i as u8,
                        started,
                    });
                }
                async { JobResponse::success() }
            })
            .await;
    }
    // Every member knows the others' runners (announced at registration).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while grids
        .iter()
        .any(|g| g.scheduler().members_with_runner("bench").len() < MEMBERS)
    {
        if tokio::time::Instant::now() > deadline {
            bail!("runners not announced in 10 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Schedule: first slots spread over one period, starting a few seconds from now.
    let p = args.period_ms;
    let base = grid_core::clock::unix_ms() + 5_000 + (args.jobs as u64 / 2_000) * 1_000;
    let first = |i: usize| base + (i as u64 * p) / args.jobs as u64;
    let t = std::time::Instant::now();
    let mut tasks = Vec::new();
    let per_task = args.jobs.div_ceil(64);
    let retry = args.retry;
    for chunk in 0..64 {
        let s = grids[chunk % MEMBERS].scheduler().clone();
        let range = (chunk * per_task)..((chunk + 1) * per_task).min(args.jobs);
        let firsts: Vec<(usize, u64)> = range.map(|i| (i, first(i))).collect();
        tasks.push(tokio::spawn(async move {
            for (i, f) in firsts {
                let config = JobConfig::for_runner("bench")
                    .schedule(Schedule::interval(Duration::from_millis(p), Some(f)))
                    .retry_if_member_dies(retry);
                s.schedule_job(&format!("j{i}"), config).await?;
            }
            Ok::<(), grid::SchedulerError>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    eprintln!("{} jobs scheduled in {:?}", args.jobs, t.elapsed());
    if grid_core::clock::unix_ms() > base {
        bail!("scheduling took longer than the head start");
    }
    // Warm-up: the first period.
    let measure_from = base + p;
    tokio::time::sleep(Duration::from_millis(
        measure_from - grid_core::clock::unix_ms(),
    ))
    .await;
    let cpu0 = cpu_time();
    let measure_to = measure_from + (args.seconds * 1_000.0) as u64;
    tokio::time::sleep(Duration::from_millis(
        measure_to - grid_core::clock::unix_ms(),
    ))
    .await;
    let cpu = cpu_time() - cpu0;
    // The kill.
    let victim = grids.remove(MEMBERS - 1);
    let killed = victim.runtime().member_id().to_string();
    victim.kill();
    drop(victim);
    let kill_at = grid_core::clock::unix_ms();
    eprintln!("killed {killed}");
    let end = kill_at + (args.fault_seconds * 1_000.0) as u64;
    tokio::time::sleep(Duration::from_millis(end - grid_core::clock::unix_ms())).await;
    let all = seen.lock().unwrap().clone();

    // Without faults: slots in [measure_from, measure_to).
    let mut lateness = Histogram::<u64>::new(3)?;
    let mut firings = 0u64;
    for s in all
        .iter()
        .filter(|s| s.slot >= measure_from && s.slot < measure_to)
    {
        firings += 1;
        lateness.record(s.started.saturating_sub(s.slot))?;
    }
    // Doubles, over the whole run.
    let mut by_slot: HashMap<(u32, u64), u32> = HashMap::new();
    for s in &all {
        *by_slot.entry((s.job, s.slot)).or_default() += 1;
    }
    let double_fires = by_slot
        .values()
        .filter(|n| **n > 1)
        .map(|n| u64::from(n - 1))
        .sum();
    // Where the doubles are: before the kill, and with a run on the killed member after
    // the kill (a killed member of this process is not a dead process: see BENCHMARKS.md).
    let double_fires_before_kill = by_slot
        .iter()
        .filter(|((_, slot), n)| **n > 1 && *slot < kill_at)
        .count() as u64;
    for ((job, slot), _) in by_slot.iter().filter(|(_, n)| **n > 1).take(5) {
        let runs: Vec<(u8, u64, u32)> = all
            .iter()
            .filter(|s| s.job == *job && s.slot == *slot)
            .map(|s| (s.member, s.started, s.slots))
            .collect();
        eprintln!(
            "slot run twice: job {job} slot {slot} (kill at {kill_at}): (member, started, slots) {runs:?}"
        );
    }
    let victim_index = (MEMBERS - 1) as u8;
    let victim_runs_after_kill = all
        .iter()
        .filter(|s| s.member == victim_index && s.started > kill_at + 1_000)
        .count() as u64;
    // Lost: every slot of every job from the first to 3 s before the end must be run or
    // covered by a collapsed run.
    let check_to = end.saturating_sub(3_000);
    let mut covered: HashMap<u32, Vec<(u64, u64)>> = HashMap::new();
    let mut missed_delay = 0u64;
    let mut worst = None;
    for s in &all {
        let from = s.slot - (u64::from(s.slots.max(1)) - 1) * p;
        covered.entry(s.job).or_default().push((from, s.slot));
        if s.slot >= kill_at.saturating_sub(2 * p) {
            let delay = s.started.saturating_sub(from);
            if delay > missed_delay {
                worst = Some((s.job, from as i64 - kill_at as i64, s.slots, s.member));
            }
            missed_delay = missed_delay.max(delay);
        }
    }
    let mut lost = 0u64;
    let mut lost_slots: Vec<(u32, u64)> = Vec::new();
    for job in 0..args.jobs as u32 {
        let spans = covered.get(&job).map(Vec::as_slice).unwrap_or(&[]);
        let mut slot = first(job as usize);
        while slot < check_to {
            if !spans.iter().any(|(a, b)| *a <= slot && slot <= *b) {
                lost += 1;
                lost_slots.push((job, slot));
            }
            slot += p;
        }
    }
    // Why: the record of the job's history that stands for the lost slot (its outcome and
    // message), or none.
    let mut lost_by_cause: std::collections::BTreeMap<String, u64> = Default::default();
    for (job, slot) in lost_slots.iter().take(2_000) {
        let details = grids[0].scheduler().job_details(&format!("j{job}")).await?;
        let cause = match details {
            None => "no such job".to_string(),
            Some(d) => {
                let record = d.history.iter().find(|r| {
                    let from = r.scheduled_at_ms - (u64::from(r.slots.max(1)) - 1) * p;
                    from <= *slot && *slot <= r.scheduled_at_ms
                });
                match record {
                    Some(r) => format!(
                        "{:?}: {} (member {:?}, {} slots, fired {} ms late)",
                        r.outcome,
                        r.message.clone().unwrap_or_default(),
                        r.member,
                        r.slots,
                        r.fired_at_ms.saturating_sub(*slot) / 100 * 100
                    ),
                    None if d.running.iter().any(|r| r.scheduled_at_ms >= *slot) => {
                        "still under way at the end".to_string()
                    }
                    None => format!(
                        "no record (last slot {:?}, next {:?})",
                        d.last_slot_ms.map(|l| l as i64 - *slot as i64),
                        d.next_run_ms.map(|l| l as i64 - *slot as i64)
                    ),
                }
            }
        };
        *lost_by_cause.entry(cause).or_default() += 1;
    }
    for (cause, n) in &lost_by_cause {
        eprintln!("lost {n}: {cause}");
    }
    eprintln!(
        "lost slots relative to the kill (ms): {:?}",
        lost_slots
            .iter()
            .take(20)
            .map(|(_, s)| *s as i64 - kill_at as i64)
            .collect::<Vec<_>>()
    );
    eprintln!(
        "longest missed-slot delay: (job, its first slot - kill ms, slots, member) {worst:?}"
    );
    let mut runs_per_member = vec![0u64; MEMBERS];
    for s in &all {
        runs_per_member[s.member as usize] += 1;
    }
    let fault_firings = all.iter().filter(|s| s.started >= kill_at).count() as u64;
    let report = Report {
        jobs: args.jobs,
        period_ms: p,
        seconds: args.seconds,
        firings,
        firings_per_s: firings as f64 / args.seconds,
        lateness_p50_ms: lateness.value_at_quantile(0.5) as f64,
        lateness_p99_ms: lateness.value_at_quantile(0.99) as f64,
        lateness_max_ms: lateness.max() as f64,
        cpu_us_per_firing: cpu.as_micros() as f64 / firings.max(1) as f64,
        fault_firings,
        double_fires,
        lost_slots: lost,
        missed_slot_delay_ms: missed_delay,
        killed,
        double_fires_before_kill,
        victim_runs_after_kill,
        runs_per_member,
    };
    eprintln!("{report:#?}");
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    for g in &grids {
        g.shutdown().await;
    }
    Ok(())
}
