//! `sim`: runs seeds of a workload in the deterministic simulator, prints the failing
//! ones (with their fault schedule, the last operations of the keys involved and a command
//! that replays them) and exits non-zero if any failed.
//!
//! ```text
//! sim --workload cache --seeds 10000 --members 5 --minutes 2 [--json] [--jobs 2]
//! sim --workload cache --seed 42 --members 5 --seconds 120     # one seed, as reported
//! sim --workload exec --seeds 100 --members 5 --minutes 1       # the bucketed executor
//! sim --workload locks --seeds 24 --members 5 --seconds 30      # the cluster locks
//! sim --workload sched --seeds 24 --seconds 30                  # the cluster scheduler
//! ```

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Parser;
use grid_sim::workload::{self, RunOptions, Workload};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Parser, Debug)]
#[command(about = "Deterministic simulation of a grid cluster under random faults")]
struct Args {
    /// Workload: `cache`, `exec` (the bucketed executor), `locks`, `sched` (the scheduler),
    /// `copies` (near and replicated copies converge), or `scale` (the figures of
    /// `--members` members).
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
    /// Wall-clock seconds a seed may take before it fails as a livelock (each seed of a
    /// range runs in a child process, killed past this).
    #[arg(long, default_value_t = 120)]
    wall_budget: u64,
    /// Internal: run the one seed of `--seed` and print its outcome as JSON (how the
    /// parent runs each seed in a child process).
    #[arg(long, hide = true)]
    child: bool,
}

/// What one seed gave, as the child reports it.
struct Outcome {
    violations: Vec<String>,
    simulated_ms: u64,
    report: Option<String>,
}

/// Runs `seed` in a child process (so that a livelocked seed can be stopped), killed after
/// the wall budget.
fn run_child(args: &Args, seed: u64, duration: Duration) -> Outcome {
    let fail = |why: String| Outcome {
        violations: vec![why],
        simulated_ms: 0,
        report: None,
    };
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return fail(format!("cannot find the sim binary: {e}")),
    };
    let mut cmd = std::process::Command::new(exe);
    cmd.args([
        "--child",
        "--workload",
        &args.workload,
        "--seed",
        &seed.to_string(),
        "--members",
        &args.members.to_string(),
        "--seconds",
        &duration.as_secs().to_string(),
        "--wall-budget",
        &args.wall_budget.to_string(),
    ]);
    if args.no_partitions {
        cmd.arg("--no-partitions");
    }
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return fail(format!("cannot start a child: {e}")),
    };
    let mut stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut out);
        out
    });
    let deadline = Instant::now() + Duration::from_secs(args.wall_budget + 10);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                let _ = reader.join();
                return fail(format!(
                    "livelock or hang: no result within the wall budget of {} s \
                     (simulated time stood still)",
                    args.wall_budget
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return fail(format!("child lost: {e}")),
        }
    }
    let out = reader.join().unwrap_or_default();
    let Some(v) = out
        .lines()
        .last()
        .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
    else {
        return fail("the child ended without a result (crashed or panicked)".into());
    };
    Outcome {
        violations: v["violations"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default(),
        simulated_ms: v["simulated_ms"].as_u64().unwrap_or(0),
        report: v["report"].as_str().map(str::to_string),
    }
}

fn progress(bar: &ProgressBar, failed: &Mutex<Vec<u64>>, simulated_ms: &AtomicU64, wall: Instant) {
    let n_failed = failed.lock().unwrap_or_else(|e| e.into_inner()).len();
    let sim_s = simulated_ms.load(Ordering::Relaxed) as f64 / 1000.0;
    bar.set_message(format!(
        "{n_failed} failed, {:.0}x real time",
        sim_s / wall.elapsed().as_secs_f64().max(1e-9)
    ));
    bar.inc(1);
}

/// Log lines stamped with simulated time (since the first line), so they line up with the
/// report's history and fault times.
struct SimulatedTime;

impl tracing_subscriber::fmt::time::FormatTime for SimulatedTime {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        static FIRST: std::sync::OnceLock<tokio::time::Instant> = std::sync::OnceLock::new();
        let now = tokio::time::Instant::now();
        let first = *FIRST.get_or_init(|| now);
        write!(
            w,
            "{:>10.6}s",
            now.saturating_duration_since(first).as_secs_f64()
        )
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SIM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off")),
        )
        .with_writer(std::io::stderr)
        .with_timer(SimulatedTime)
        .with_ansi(false)
        .init();
    if args.workload == "scale" {
        let r = grid_sim::scale::run(args.seed.unwrap_or(1), args.members);
        println!("{r}");
        return Ok(());
    }
    let Some(kind) = Workload::from_name(&args.workload) else {
        let known: Vec<&str> = Workload::ALL.iter().map(|w| w.name()).collect();
        bail!(
            "unknown workload {:?} (known: {}, scale)",
            args.workload,
            known.join(", ")
        );
    };
    let run_seed = workload::run;
    let duration = Duration::from_secs(
        args.seconds
            .unwrap_or_else(|| (args.minutes * 60.0).round() as u64),
    );
    if args.child {
        let seed = args.seed.unwrap_or(0);
        let opts = RunOptions {
            seed,
            members: args.members,
            duration,
            partitions: !args.no_partitions,
            wall_budget: Duration::from_secs(args.wall_budget),
            ..RunOptions::new(kind, seed)
        };
        let r = run_seed(&opts);
        println!(
            "{}",
            serde_json::json!({
                "seed": seed,
                "violations": r.violations,
                "simulated_ms": r.simulated.as_millis() as u64,
                "digest": format!("{:016x}", r.digest),
                "report": r.report,
            })
        );
        return Ok(());
    }
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
                    wall_budget: Duration::from_secs(args.wall_budget),
                    ..RunOptions::new(kind, seed)
                };
                if seeds.len() > 1 {
                    let r = run_child(&args, seed, duration);
                    simulated_ms.fetch_add(r.simulated_ms, Ordering::Relaxed);
                    if !r.violations.is_empty() {
                        failed.lock().unwrap_or_else(|e| e.into_inner()).push(seed);
                        let line = format!(
                            "seed {seed} FAILED: {} (reproduce: {})",
                            r.violations.join("; "),
                            opts.reproduce()
                        );
                        if bar.is_hidden() {
                            println!("{line}");
                        } else {
                            bar.println(line);
                        }
                        if let Some(rep) = r.report {
                            reports.lock().unwrap_or_else(|e| e.into_inner()).push(rep);
                        }
                    }
                    progress(&bar, &failed, &simulated_ms, wall);
                    continue;
                }
                let r = run_seed(&opts);
                if seeds.len() == 1 {
                    println!(
                        "seed {seed}: digest {:016x}, {} operations ({} unanswered), {:.3}s simulated\n{}",
                        r.digest,
                        r.ops,
                        r.unknown,
                        r.simulated.as_secs_f64(),
                        r.schedule
                    );
                }
                simulated_ms.fetch_add(r.simulated.as_millis() as u64, Ordering::Relaxed);
                if !r.violations.is_empty() {
                    let mut f = failed.lock().unwrap_or_else(|e| e.into_inner());
                    f.push(seed);
                    let line = format!(
                        "seed {seed} FAILED: {} (reproduce: {})",
                        r.violations.join("; "),
                        opts.reproduce()
                    );
                    if bar.is_hidden() {
                        println!("{line}");
                    } else {
                        bar.println(line);
                    }
                    if let Some(rep) = r.report {
                        reports.lock().unwrap_or_else(|e| e.into_inner()).push(rep);
                    }
                }
                progress(&bar, &failed, &simulated_ms, wall);
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
