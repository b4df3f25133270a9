//! The bucketed executor from submit to processed: a three-member grid (one process,
//! 127.0.0.1, backups 1), 1,000 buckets, tasks of about 100 bytes, against the same
//! producer/consumer shape on redis-server lists (LPUSH; one consumer per list, BLMOVE to a
//! processing list and LREM once processed, for at least once).
//!
//! - max rate, batch 1 and batch 100: `--producers` tasks submit as fast as they can for
//!   `--seconds` (producer `i` owns the buckets `b % producers == i` and submits to them in
//!   turn, each task numbered in its bucket); then the bench waits until everything is
//!   processed. Tasks per second = tasks / (last processed - first submitted). Batch 1:
//!   `submit` per task, processed one at a time; batch 100: `submit_all` of 100 tasks per
//!   call (one replicated write per partition they fall in), processed up to 100 at once.
//! - latency at half the batch-1 rate: the same producers, paced to half the rate measured;
//!   the time from the start of `submit` to the start of `process` (p50, p99).
//! - every processor checks each bucket's numbers: a gap or a step back is an order
//!   violation, a number seen twice a duplicate (at least once allows it; none is expected
//!   without faults), a task never processed is lost.
//!
//! ```sh
//! scripts/install-bench-deps.sh        # redis-server (Debian package), once
//! cargo run --release -p grid-bench --bin exec -- --json
//! ```
//!
//! With `--json` the last line of stdout is one JSON object (`tasks_per_s_grid_batch1`,
//! `tasks_per_s_redis_batch1`, `tasks_per_s_grid_batch100`, `p50_ms_half_rate`,
//! `p99_ms_half_rate`, `lost`, `order_violations`, and more); redis fields are `null` when
//! redis-server is missing.

#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use grid::{Batch, BucketedSettings, Concurrency, Grid};
use grid_bench::RedisServer;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

const MEMBERS: usize = 3;

#[derive(Parser, Debug, Clone)]
#[command(about = "Bucketed executor throughput and latency: grid against redis-server lists")]
struct Args {
    /// Seconds of submitting per scenario.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Buckets (redis: lists, one consumer each).
    #[arg(long, default_value_t = 1000)]
    buckets: u32,
    /// Concurrent producers.
    #[arg(long, default_value_t = 256)]
    producers: u32,
    /// Batches processed at once per member (grid).
    #[arg(long, default_value_t = 256)]
    concurrency: u32,
    /// Partitions of the grid.
    #[arg(long, default_value_t = 271)]
    partitions: u32,
    /// Skip redis even when redis-server is installed.
    #[arg(long)]
    no_redis: bool,
    /// Print one JSON object as the last line.
    #[arg(long)]
    json: bool,
}

/// A task: its bucket, its number in the bucket, when its submit started (µs since the
/// bench's epoch), and padding to about 100 bytes encoded.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Task {
    bucket: u32,
    seq: u64,
    sent_us: u64,
    #[serde(with = "serde_bytes")]
    pad: Vec<u8>,
}

fn task(bucket: u32, seq: u64, epoch: Instant) -> Task {
    Task {
        bucket,
        seq,
        sent_us: epoch.elapsed().as_micros() as u64,
        pad: vec![7; 80],
    }
}

/// What the processors saw.
struct Tracker {
    epoch: Instant,
    /// The last number processed per bucket.
    last: Vec<AtomicU64>,
    processed: AtomicU64,
    violations: AtomicU64,
    duplicates: AtomicU64,
    /// µs since the epoch of the last task processed.
    last_us: AtomicU64,
    latency: Mutex<Histogram<u64>>,
}

impl Tracker {
    fn new(buckets: u32, epoch: Instant) -> Arc<Self> {
        Arc::new(Self {
            epoch,
            last: (0..buckets).map(|_| AtomicU64::new(0)).collect(),
            processed: AtomicU64::new(0),
            violations: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            last_us: AtomicU64::new(0),
            latency: Mutex::new(Histogram::new_with_bounds(1, 600_000_000, 3).expect("bounds")),
        })
    }

    /// Numbers start at 1 per bucket.
    fn saw(&self, t: &Task) {
        let now = self.epoch.elapsed().as_micros() as u64;
        let Some(last) = self.last.get(t.bucket as usize) else {
            self.violations.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let prev = last.load(Ordering::Acquire);
        if t.seq == prev + 1 {
            last.store(t.seq, Ordering::Release);
            self.processed.fetch_add(1, Ordering::Relaxed);
        } else if t.seq <= prev {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
        } else {
            self.violations.fetch_add(1, Ordering::Relaxed);
            last.store(t.seq, Ordering::Release);
            self.processed.fetch_add(1, Ordering::Relaxed);
        }
        self.last_us.fetch_max(now, Ordering::Relaxed);
        let _ = self
            .latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record(now.saturating_sub(t.sent_us).max(1));
    }
}

/// What one scenario measured.
#[derive(Debug, Default, Clone, Serialize)]
struct Run {
    tasks: u64,
    per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    lost: u64,
    violations: u64,
    duplicates: u64,
}

/// Runs the producers: `submit(tasks)` with `chunk` tasks (bucket, seq) per call, for
/// `seconds`, at most `rate` tasks per second in all (0: as fast as they go). Returns how
/// many were submitted.
async fn produce<F, Fut>(args: &Args, rate: f64, chunk: usize, submit: F) -> anyhow::Result<u64>
where
    F: Fn(Vec<(u32, u64)>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let submit = Arc::new(submit);
    let end = Instant::now() + Duration::from_secs_f64(args.seconds);
    let chunk = chunk.max(1);
    let mut tasks = Vec::new();
    for i in 0..args.producers {
        let submit = submit.clone();
        let mine: Vec<u32> = (0..args.buckets)
            .filter(|b| b % args.producers == i)
            .collect();
        let interval = (rate > 0.0)
            .then(|| Duration::from_secs_f64(args.producers as f64 * chunk as f64 / rate));
        tasks.push(tokio::spawn(async move {
            let mut seqs = vec![0u64; mine.len()];
            let mut n = 0u64;
            let mut next = Instant::now();
            if mine.is_empty() {
                return anyhow::Ok(0);
            }
            while Instant::now() < end {
                if let Some(every) = interval {
                    next += every;
                    tokio::time::sleep_until(next.into()).await;
                }
                let mut call = Vec::with_capacity(chunk);
                for _ in 0..chunk {
                    let k = (n as usize) % mine.len();
                    seqs[k] += 1;
                    call.push((mine[k], seqs[k]));
                    n += 1;
                }
                submit(call).await?;
            }
            Ok(n)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total)
}

/// Waits until `tracker` processed `submitted` (at most 120 s), then reports.
async fn finish(tracker: &Tracker, submitted: u64, started_us: u64) -> Run {
    let deadline = Instant::now() + Duration::from_secs(120);
    while tracker.processed.load(Ordering::Relaxed) < submitted && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let processed = tracker.processed.load(Ordering::Relaxed);
    let span = tracker
        .last_us
        .load(Ordering::Relaxed)
        .saturating_sub(started_us)
        .max(1);
    let h = tracker.latency.lock().unwrap_or_else(|e| e.into_inner());
    Run {
        tasks: processed,
        per_s: processed as f64 / (span as f64 / 1e6),
        p50_ms: h.value_at_quantile(0.5) as f64 / 1e3,
        p99_ms: h.value_at_quantile(0.99) as f64 / 1e3,
        lost: submitted.saturating_sub(processed),
        violations: tracker.violations.load(Ordering::Relaxed),
        duplicates: tracker.duplicates.load(Ordering::Relaxed),
    }
}

// ---- grid ----

async fn start_cluster(args: &Args) -> anyhow::Result<Vec<Grid>> {
    grid_bench::start_cluster("exec", MEMBERS, args.partitions).await
}

async fn grid_run(
    args: &Args,
    grids: &[Grid],
    name: &str,
    batch: u32,
    rate: f64,
) -> anyhow::Result<Run> {
    let epoch = Instant::now();
    let tracker = Tracker::new(args.buckets, epoch);
    let mut execs = Vec::new();
    for g in grids {
        let t = tracker.clone();
        let settings = BucketedSettings::new(|t: &Task| t.bucket)
            .batch_size(batch)
            .max_queued_per_bucket(100_000)
            .max_queued_per_member(10_000_000)
            .max_concurrency(args.concurrency, Concurrency::PerNode)
            .processor(move |b: Batch<Task, u32>| {
                for task in &b.tasks {
                    t.saw(task);
                }
                async { Ok::<(), String>(()) }
            });
        execs.push(g.bucketed_executor(name, settings).await?);
    }
    // Every member knows the others' processors.
    let deadline = Instant::now() + Duration::from_secs(10);
    while grids
        .iter()
        .any(|g| g.bucketed_executors().service().processors(name).len() < MEMBERS)
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let execs = Arc::new(execs);
    // Batches of `batch` tasks are submitted `batch` at a time (one `submit_all`, one
    // write per partition), single tasks with `submit`.
    let submitted = produce(args, rate, batch as usize, move |call| {
        let exec = execs[call[0].0 as usize % MEMBERS].clone();
        let tasks: Vec<Task> = call.iter().map(|(b, seq)| task(*b, *seq, epoch)).collect();
        async move {
            if tasks.len() == 1 {
                let t = tasks.into_iter().next().expect("one task");
                Ok(exec.submit(t).await?)
            } else {
                Ok(exec.submit_all(tasks).await?)
            }
        }
    })
    .await?;
    Ok(finish(&tracker, submitted, 0).await)
}

// ---- redis ----

async fn redis_run(args: &Args, client: &redis::Client) -> anyhow::Result<Run> {
    let epoch = Instant::now();
    let tracker = Tracker::new(args.buckets, epoch);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut consumers = Vec::new();
    for bucket in 0..args.buckets {
        // A blocking BLMOVE holds its connection: one connection per consumer.
        let mut conn = client.get_multiplexed_async_connection().await?;
        let (tracker, stop) = (tracker.clone(), stop.clone());
        consumers.push(tokio::spawn(async move {
            let list = format!("bucket:{bucket}");
            let processing = format!("processing:{bucket}");
            while !stop.load(Ordering::Relaxed) {
                let got: Option<Vec<u8>> = redis::cmd("BLMOVE")
                    .arg(&list)
                    .arg(&processing)
                    .arg("RIGHT")
                    .arg("LEFT")
                    .arg(0.2)
                    .query_async(&mut conn)
                    .await?;
                let Some(bytes) = got else { continue };
                let t: Task = grid::codec::decode(&bytes)?;
                tracker.saw(&t);
                let _: i64 = redis::cmd("LREM")
                    .arg(&processing)
                    .arg(1)
                    .arg(&bytes)
                    .query_async(&mut conn)
                    .await?;
            }
            anyhow::Ok(())
        }));
    }
    let conn = client.get_multiplexed_async_connection().await?;
    let submitted = produce(args, 0.0, 1, move |call| {
        let mut conn = conn.clone();
        let (bucket, seq) = call[0];
        let t = task(bucket, seq, epoch);
        async move {
            let bytes = grid::codec::encode(&t)?;
            let _: i64 = redis::cmd("LPUSH")
                .arg(format!("bucket:{bucket}"))
                .arg(bytes)
                .query_async(&mut conn)
                .await?;
            Ok(())
        }
    })
    .await?;
    let run = finish(&tracker, submitted, 0).await;
    stop.store(true, Ordering::Relaxed);
    for c in consumers {
        c.await??;
    }
    Ok(run)
}

#[derive(Serialize)]
struct Report {
    tasks_per_s_grid_batch1: f64,
    tasks_per_s_redis_batch1: Option<f64>,
    tasks_per_s_grid_batch100: f64,
    p50_ms_half_rate: f64,
    p99_ms_half_rate: f64,
    lost: u64,
    order_violations: u64,
    duplicates: u64,
    half_rate_per_s: f64,
    p50_ms_grid_batch1_max: f64,
    p99_ms_grid_batch1_max: f64,
    p50_ms_redis_batch1_max: Option<f64>,
    p99_ms_redis_batch1_max: Option<f64>,
    buckets: u32,
    producers: u32,
    seconds: f64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let grids = start_cluster(&args).await?;
        let b1 = grid_run(&args, &grids, "batch1", 1, 0.0).await?;
        eprintln!("grid batch 1: {b1:?}");
        let b100 = grid_run(&args, &grids, "batch100", 100, 0.0).await?;
        eprintln!("grid batch 100: {b100:?}");
        let half = b1.per_s / 2.0;
        let lat = grid_run(&args, &grids, "half-rate", 1, half).await?;
        eprintln!("grid batch 1 at {half:.0}/s: {lat:?}");
        for g in &grids {
            g.shutdown().await;
        }
        let redis = if args.no_redis {
            None
        } else {
            match RedisServer::start().await? {
                Some((server, client)) => {
                    let run = redis_run(&args, &client).await?;
                    eprintln!("redis batch 1: {run:?}");
                    drop(server);
                    Some(run)
                }
                None => {
                    eprintln!("redis-server not installed (scripts/install-bench-deps.sh): no reference");
                    None
                }
            }
        };
        let runs = [&b1, &b100, &lat];
        let report = Report {
            tasks_per_s_grid_batch1: b1.per_s,
            tasks_per_s_redis_batch1: redis.as_ref().map(|r| r.per_s),
            tasks_per_s_grid_batch100: b100.per_s,
            p50_ms_half_rate: lat.p50_ms,
            p99_ms_half_rate: lat.p99_ms,
            lost: runs.iter().map(|r| r.lost).sum::<u64>()
                + redis.as_ref().map_or(0, |r| r.lost),
            order_violations: runs.iter().map(|r| r.violations).sum::<u64>()
                + redis.as_ref().map_or(0, |r| r.violations),
            duplicates: runs.iter().map(|r| r.duplicates).sum::<u64>()
                + redis.as_ref().map_or(0, |r| r.duplicates),
            half_rate_per_s: half,
            p50_ms_grid_batch1_max: b1.p50_ms,
            p99_ms_grid_batch1_max: b1.p99_ms,
            p50_ms_redis_batch1_max: redis.as_ref().map(|r| r.p50_ms),
            p99_ms_redis_batch1_max: redis.as_ref().map(|r| r.p99_ms),
            buckets: args.buckets,
            producers: args.producers,
            seconds: args.seconds,
        };
        println!(
            "grid: {:.0} tasks/s batch 1, {:.0} tasks/s batch 100; at {:.0}/s p50 {:.2} ms, p99 {:.2} ms; redis lists: {}",
            b1.per_s,
            b100.per_s,
            half,
            lat.p50_ms,
            lat.p99_ms,
            redis
                .as_ref()
                .map(|r| format!("{:.0} tasks/s", r.per_s))
                .unwrap_or_else(|| "-".into())
        );
        println!(
            "lost {}, order violations {}, duplicates {}",
            report.lost, report.order_violations, report.duplicates
        );
        if args.json {
            println!("{}", serde_json::to_string(&report)?);
        }
        anyhow::Ok(())
    })
}
