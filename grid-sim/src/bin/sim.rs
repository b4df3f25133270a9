//! `sim`: runs seeds of a workload in the deterministic simulator, prints the failing
//! ones (with their fault schedule, the last operations of the keys involved and a command
//! that replays them) and exits non-zero if any failed.
//!
//! ```text
//! sim --workload cache --seeds 10000 --members 5 --minutes 2 [--json] [--jobs 2]
//! sim --workload cache --seed 42 --members 5 --seconds 120     # one seed, as reported
//! ```

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Parser;
use grid_sim::cache_workload::{self, RunOptions};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Parser, Debug)]
#[command(about = "Deterministic simulation of a grid cluster under random faults")]
struct Args {
    /// Workload: `cache` (the next services add `locks`, `exec`, `sched`).
    #[arg(long, default_value = "cache")]
    workload: String,
    /// How many seeds to run (from --first-seed).
    #[arg(long, default_value_t = 100)]
    seeds: u64,
    /// First seed of the range.
    #[arg(long, default_value_t = 0)]
    first_seed: u64,
    /// Run this one seed only (overrides --seeds/--first-seed).
    #[arg(long)]
    seed: Option<u64>,
    /// Members per world.
    #[arg(long, default_value_t = 5)]
    members: usize,
    /// Simulated minutes of workload per seed.
    #[arg(long, default_value_t = 2.0)]
    minutes: f64,
    /// Simulated seconds per seed (overrides --minutes).
    #[arg(long)]
    seconds: Option<u64>,
    /// Leave partitions out of the fault schedules.
    #[arg(long)]
    no_partitions: bool,
    /// Seeds run at once, each on its own thread (default 1).
    #[arg(long, default_value_t = 1)]
    jobs: usize,
    /// Print a JSON summary as the last line.
    #[arg(long)]
    json: bool,
    /// Print each failing seed's full report (default: the first 3).
    #[arg(long, default_value_t = 3)]
    reports: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SIM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off")),
        )
        .with_writer(std::io::stderr)
        .init();
    if args.workload != "cache" {
        bail!("unknown workload {:?} (known: cache)", args.workload);
    }
    let duration = Duration::from_secs(
        args.seconds
            .unwrap_or_else(|| (args.minutes * 60.0).round() as u64),
    );
    let seeds: Vec<u64> = match args.seed {
        Some(s) => vec![s],
        None => (args.first_seed..args.first_seed + args.seeds).collect(),
    };
    let bar = ProgressBar::new(seeds.len() as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:40}] {pos}/{len} seeds, {msg} ({eta} left)",
        )?
        .progress_chars("=> "),
    );
    let wall = Instant::now();
    let next = AtomicUsize::new(0);
    let simulated_ms = AtomicU64::new(0);
    let failed: Mutex<Vec<u64>> = Mutex::new(Vec::new());
    let reports: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let seeds = Arc::new(seeds);
    std::thread::scope(|scope| {
        for _ in 0..args.jobs.max(1) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&seed) = seeds.get(i) else { return };
                let opts = RunOptions {
                    seed,
                    members: args.members,
                    duration,
                    partitions: !args.no_partitions,
                    ..RunOptions::new(seed)
                };
                let r = cache_workload::run(&opts);
                simulated_ms.fetch_add(r.simulated.as_millis() as u64, Ordering::Relaxed);
                if !r.violations.is_empty() {
                    let mut f = failed.lock().unwrap_or_else(|e| e.into_inner());
                    f.push(seed);
                    bar.println(format!(
                        "seed {seed} FAILED: {} (reproduce: {})",
                        r.violations.join("; "),
                        opts.reproduce()
                    ));
                    if let Some(rep) = r.report {
                        reports.lock().unwrap_or_else(|e| e.into_inner()).push(rep);
                    }
                }
                let n_failed = failed.lock().unwrap_or_else(|e| e.into_inner()).len();
                let sim_s = simulated_ms.load(Ordering::Relaxed) as f64 / 1000.0;
                bar.set_message(format!(
                    "{n_failed} failed, {:.0}x real time",
                    sim_s / wall.elapsed().as_secs_f64().max(1e-9)
                ));
                bar.inc(1);
            });
        }
    });
    bar.finish();
    let mut failed = failed.into_inner().unwrap_or_else(|e| e.into_inner());
    failed.sort_unstable();
    let reports = reports.into_inner().unwrap_or_else(|e| e.into_inner());
    for rep in reports.iter().take(args.reports) {
        println!("{rep}");
    }
    let simulated = simulated_ms.load(Ordering::Relaxed) as f64 / 1000.0;
    let wall_s = wall.elapsed().as_secs_f64();
    println!(
        "{} seeds, {} failed{}; {:.0} simulated seconds in {:.1} wall seconds ({:.1}x)",
        seeds.len(),
        failed.len(),
        if failed.is_empty() {
            String::new()
        } else {
            format!(" ({failed:?})")
        },
        simulated,
        wall_s,
        simulated / wall_s.max(1e-9)
    );
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "workload": args.workload,
                "seeds": seeds.len(),
                "failed": failed.len(),
                "failed_seeds": failed,
                "simulated_seconds": simulated,
                "wall_seconds": wall_s,
            })
        );
    }
    if !failed.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}
