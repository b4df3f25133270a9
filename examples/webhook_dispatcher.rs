//! A webhook dispatcher run as two or three processes: every process accepts events (here:
//! it makes some up), submits a delivery task bucketed by repository, and delivers the
//! tasks of the repositories it is given — in order per repository, one delivery at a time
//! per repository across all processes, retried, and dead-lettered after three attempts.
//! Kill a process (Ctrl-C, or `kill -9`): its queued deliveries and the batch it was
//! delivering are taken over by the others; nothing acknowledged is lost.
//!
//! ```sh
//! # three terminals (or `&`): every process runs the same program
//! cargo run --example webhook_dispatcher -- 127.0.0.1:5811 127.0.0.1:5811
//! cargo run --example webhook_dispatcher -- 127.0.0.1:5812 127.0.0.1:5811
//! cargo run --example webhook_dispatcher -- 127.0.0.1:5813 127.0.0.1:5811
//! ```
//!
//! Arguments: the address to bind, then seed addresses. Set `NO_DELIVERY=1` for a process
//! that only submits (it registers no processor, and never delivers). The "HTTP endpoint"
//! is a function that fails now and then (and always for the repository `broken`), so that
//! retries and the dead letter show.

use std::collections::HashMap;
use std::time::Duration;

use grid::{Batch, BucketedSettings, Concurrency, Grid};
use serde::{Deserialize, Serialize};

/// One webhook delivery.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Delivery {
    repository: String,
    /// The event's number in its repository (to show the order).
    event: u64,
    url: String,
    payload: String,
}

/// Stands in for the HTTP POST: slow-ish, fails sometimes, always for `broken`.
async fn post(d: &Delivery, attempt: u32) -> Result<(), String> {
    tokio::time::sleep(Duration::from_millis(50)).await;
    if d.repository == "broken" {
        return Err(format!("{} answered 500", d.url));
    }
    // A flaky endpoint: the first attempt of every seventh event times out.
    if d.event % 7 == 3 && attempt == 1 {
        return Err(format!("{} timed out", d.url));
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let bind = args.next().unwrap_or_else(|| "127.0.0.1:5811".into());
    let seeds: Vec<String> = args.collect();
    let grid = Grid::builder()
        .cluster_name("webhook-demo")
        .secret("webhook demo secret")
        .bind(&bind)
        .seeds(seeds)
        .start()
        .await?;
    let me = grid.cluster().local_member().id.to_string();
    let delivers = std::env::var_os("NO_DELIVERY").is_none();

    let mut settings = BucketedSettings::new(|d: &Delivery| d.repository.clone())
        .batch_size(10)
        .max_attempts(3)
        .retry_delay(Duration::from_secs(1))
        .max_concurrency(8, Concurrency::PerCluster)
        .max_queued_per_bucket(1_000);
    if delivers {
        let who = me.clone();
        settings = settings
            .processor(move |batch: Batch<Delivery, String>| {
                let who = who.clone();
                async move {
                    // All or nothing: a failure sends the whole batch again (at least once:
                    // the receiving end should dedupe by repository and event).
                    for d in &batch.tasks {
                        post(d, batch.attempt).await?;
                    }
                    let events: Vec<u64> = batch.tasks.iter().map(|d| d.event).collect();
                    println!(
                        "{who}: delivered {} {:?} (attempt {})",
                        batch.bucket, events, batch.attempt
                    );
                    Ok::<(), String>(())
                }
            })
            .on_dead_letter(|dead| {
                println!(
                    "dead letter: {} events of {} after {} attempts: {}",
                    dead.tasks.len(),
                    dead.bucket,
                    dead.attempts,
                    dead.error
                );
            });
    }
    let hooks = grid.bucketed_executor("webhooks", settings).await?;

    // Incoming events: a few repositories, numbered per repository by this process.
    let repos = ["grid", "linux", "tokio", "serde", "broken"];
    let mut numbers: HashMap<&str, u64> = HashMap::new();
    let mut last_stats = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut n = 0usize;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => break,
        }
        let repo = repos[n % repos.len()];
        n += 1;
        let event = numbers.entry(repo).or_default();
        *event += 1;
        let delivery = Delivery {
            repository: repo.to_string(),
            event: *event,
            url: format!("https://hooks.example/{repo}"),
            payload: format!("{me} push #{event}"),
        };
        // Durable on two members once this returns.
        if let Err(e) = hooks.submit(delivery).await {
            println!("{me}: not queued: {e}");
        }
        if last_stats.elapsed() > Duration::from_secs(5) {
            last_stats = tokio::time::Instant::now();
            let s = hooks.cluster_statistics(Duration::from_secs(2)).await;
            println!(
                "cluster: {} queued, {} in flight, {} delivered, {} retried, {} dead-lettered ({} members answered)",
                s.total.queued,
                s.total.in_flight,
                s.total.processed,
                s.total.retried,
                s.total.dead_lettered,
                s.members.len()
            );
        }
    }
    hooks.shutdown();
    grid.shutdown().await;
    Ok(())
}
