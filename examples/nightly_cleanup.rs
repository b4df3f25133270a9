//! A small service run as several processes, with two scheduled jobs:
//!
//! - **the nightly cleanup**, once per cluster: a cron job ("night" comes every 10 seconds
//!   here: `0/10 * * * * ?` in `Europe/Paris`), run by one member at each slot, whichever
//!   processes are up; it survives the death of the member that owns it;
//! - **a cache warm-up**, local to each member (`RunMode::Locally`) every 3 seconds.
//!
//! ```sh
//! # three terminals (or `&`): every process runs the same program; kill one (Ctrl-C, or
//! # kill -9) and watch the cleanup go on, once per slot
//! cargo run --example nightly_cleanup -- 127.0.0.1:5811 127.0.0.1:5811
//! cargo run --example nightly_cleanup -- 127.0.0.1:5812 127.0.0.1:5811
//! cargo run --example nightly_cleanup -- 127.0.0.1:5813 127.0.0.1:5811
//!
//! # or all at once: starts three processes, kills one with SIGKILL after 25 s, stops the
//! # rest after 50 s, and checks that no slot of the cleanup ran twice
//! cargo run --example nightly_cleanup -- --demo
//! ```
//!
//! Arguments: the address to bind, then seed addresses. Each cleanup run appends a line
//! (slot, member) to the file named by `CLEANUP_LOG` (default
//! `$TMPDIR/grid-nightly-cleanup.log`), standing in for the work.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use grid::Grid;
use grid_exec::scheduler::{JobConfig, JobRequest, JobResponse, RunMode, Schedule};

fn log_path() -> std::path::PathBuf {
    std::env::var_os("CLEANUP_LOG")
        .map(Into::into)
        .unwrap_or_else(|| std::env::temp_dir().join("grid-nightly-cleanup.log"))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let bind = args.next().unwrap_or_else(|| "127.0.0.1:5811".into());
    if bind == "--demo" {
        return demo();
    }
    let seeds: Vec<String> = args.collect();
    let grid = Grid::builder()
        .cluster_name("cleanup-demo")
        .secret("cleanup demo secret")
        .bind(&bind)
        .seeds(seeds)
        .start()
        .await?;
    println!("ADDR {}", grid.addr());
    let me = grid.cluster().local_member().id.to_string();
    let scheduler = grid.scheduler();

    // Runners are per member and not persisted: every process registers them at start.
    let who = me.clone();
    scheduler
        .register_job_runner("cleanup", move |r: JobRequest| {
            let who = who.clone();
            async move {
                let days: u32 = r.parameters().map_err(|e| e.to_string())?;
                let late = r.fired_at_ms.saturating_sub(r.scheduled_at_ms);
                println!(
                    "{who}: cleanup of files older than {days} days for slot {} ({late} ms late, {} slot(s))",
                    r.scheduled_at_ms, r.slots
                );
                let mut log = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(log_path())
                    .map_err(|e| e.to_string())?;
                writeln!(log, "{} {who}", r.scheduled_at_ms).map_err(|e| e.to_string())?;
                tokio::time::sleep(Duration::from_millis(500)).await;
                Ok::<(), String>(())
            }
        })
        .await;
    let who = me.clone();
    scheduler
        .register_job_runner("warm-up", move |_r: JobRequest| {
            let who = who.clone();
            async move {
                println!("{who}: warming this member's cache");
                JobResponse::success()
            }
        })
        .await;

    // Every process schedules the cluster job at start: the same configuration again
    // changes nothing, so its slots go on and none runs twice.
    let nightly = JobConfig::for_runner("cleanup")
        .schedule(Schedule::cron("0/10 * * * * ?", "Europe/Paris")?)
        .parameters(&30u32)?;
    scheduler.schedule_job("nightly-cleanup", nightly).await?;
    let warm_up = JobConfig::for_runner("warm-up")
        .run_mode(RunMode::Locally)
        .schedule(Schedule::interval(Duration::from_secs(3), None));
    scheduler.schedule_job("cache-warm-up", warm_up).await?;

    let mut report = tokio::time::interval(Duration::from_secs(15));
    report.tick().await;
    loop {
        tokio::select! {
            _ = report.tick() => {}
            _ = tokio::signal::ctrl_c() => break,
        }
        match scheduler.job_details("nightly-cleanup").await {
            Ok(Some(d)) => {
                let last = d.history.last();
                println!(
                    "{me}: nightly-cleanup next at {:?}, last run {:?} on {:?}",
                    d.next_run_ms,
                    last.map(|r| r.outcome),
                    last.and_then(|r| r.member.clone())
                );
            }
            Ok(None) => println!("{me}: nightly-cleanup is not scheduled"),
            Err(e) => println!("{me}: {e}"),
        }
    }
    grid.shutdown().await;
    Ok(())
}

/// Three processes; one killed; then a check of the log.
fn demo() -> Result<(), Box<dyn std::error::Error>> {
    let exe = std::env::current_exe()?;
    let log = std::env::temp_dir().join(format!("grid-nightly-cleanup-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let spawn = |args: &[String]| {
        Command::new(&exe)
            .args(args)
            .env("CLEANUP_LOG", &log)
            .stdout(Stdio::piped())
            .spawn()
    };
    let mut first = spawn(&["127.0.0.1:0".to_string()])?;
    let mut lines = BufReader::new(first.stdout.take().ok_or("no stdout")?).lines();
    let seed = loop {
        let line = lines.next().ok_or("the first member exited")??;
        if let Some(addr) = line.strip_prefix("ADDR ") {
            break addr.to_string();
        }
    };
    let echo = |name: &'static str, lines: std::io::Lines<BufReader<std::process::ChildStdout>>| {
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                println!("[{name}] {line}");
            }
        })
    };
    echo("p0", lines);
    let mut children = vec![first];
    for name in ["p1", "p2"] {
        let mut child = spawn(&["127.0.0.1:0".to_string(), seed.clone()])?;
        let out = BufReader::new(child.stdout.take().ok_or("no stdout")?).lines();
        echo(name, out);
        children.push(child);
    }
    std::thread::sleep(Duration::from_secs(25));
    println!("--- killing p0 (SIGKILL) ---");
    children[0].kill()?;
    std::thread::sleep(Duration::from_secs(25));
    for c in &mut children {
        let _ = c.kill();
        let _ = c.wait();
    }
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let mut slots: Vec<u64> = text
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    let runs = slots.len();
    slots.sort();
    slots.dedup();
    println!(
        "--- {runs} cleanup runs, {} distinct slots: {} ---",
        slots.len(),
        if runs == slots.len() {
            "no slot ran twice"
        } else {
            "A SLOT RAN TWICE"
        }
    );
    let _ = std::fs::remove_file(&log);
    if runs != slots.len() || runs < 3 {
        return Err("the cleanup did not run once per slot".into());
    }
    Ok(())
}
