//! Gossip convergence: start N members in one process (each seeded with the first) and time
//! how long until every member sees all N; then kill one member abruptly and time how long
//! until every other member has reported it failed. Medians over `--rounds` fresh clusters.
//!
//! `cargo run --release -p grid-bench --bin gossip -- --members 5 --members 20 --json`

use std::time::{Duration, Instant};

use clap::Parser;
use grid::Grid;
use grid_bench::median;

#[derive(Parser)]
struct Args {
    /// Cluster sizes to measure (repeatable).
    #[arg(long = "members", default_values_t = vec![5usize, 20])]
    members: Vec<usize>,
    /// Fresh clusters per size.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Print one JSON object as the last line.
    #[arg(long)]
    json: bool,
}

async fn converge(n: usize, round: usize) -> anyhow::Result<(Duration, Duration, Duration)> {
    let cluster = format!("gossip-bench-{n}-{round}");
    let member = |i: usize| {
        Grid::builder()
            .cluster_name(&cluster)
            .member_id(format!("m{i}"))
            .secret("gossip bench")
            .bind("127.0.0.1:0")
    };
    let start = Instant::now();
    let first = member(0).no_seeds().start().await?;
    let mut grids = vec![first.clone()];
    for i in 1..n {
        grids.push(member(i).seed(first.addr()).start().await?);
    }
    let started = start.elapsed();
    for g in &grids {
        anyhow::ensure!(
            g.cluster()
                .wait_until(Duration::from_secs(30), |m| m.len() == n)
                .await,
            "{n} members did not converge within 30 s"
        );
    }
    let converged = start.elapsed();
    let victim = grids.pop().expect("n >= 2");
    let killed = Instant::now();
    victim.kill();
    for g in &grids {
        anyhow::ensure!(
            g.cluster()
                .wait_until(Duration::from_secs(30), |m| m.len() == n - 1)
                .await,
            "the killed member was not detected within 30 s"
        );
    }
    let detected = killed.elapsed();
    for g in &grids {
        g.kill();
    }
    Ok((started, converged, detected))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut results = serde_json::Map::new();
    println!(
        "gossip convergence on loopback, one process, median of {} rounds",
        args.rounds
    );
    println!(
        "{:>8} {:>14} {:>16} {:>22}",
        "members", "all started ms", "all see all ms", "kill seen by all ms"
    );
    for &n in &args.members {
        let mut started = Vec::new();
        let mut converged = Vec::new();
        let mut detected = Vec::new();
        for round in 0..args.rounds {
            let (s, c, d) = converge(n, round).await?;
            started.push(s.as_secs_f64() * 1e3);
            converged.push(c.as_secs_f64() * 1e3);
            detected.push(d.as_secs_f64() * 1e3);
        }
        let (s, c, d) = (median(&started), median(&converged), median(&detected));
        println!("{n:>8} {s:>14.0} {c:>16.0} {d:>22.0}");
        results.insert(
            format!("members_{n}"),
            serde_json::json!({
                "started_ms": s,
                "converged_ms": c,
                "failure_detected_ms": d,
                "converged_rounds_ms": converged,
                "failure_detected_rounds_ms": detected,
            }),
        );
    }
    if args.json {
        println!("{}", serde_json::Value::Object(results));
    }
    Ok(())
}
