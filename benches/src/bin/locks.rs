//! Cluster locks per second and their waits: a three-member grid (one process, 127.0.0.1,
//! backups 1) against redis-server's idiom (SET key token NX PX + a compare-and-delete
//! script, one multiplexed connection shared by every task, as in `ops`), same tasks, same
//! names, same duration.
//!
//! - uncontended: `--tasks` tasks (task `i` on member `i % 3`), each on a name of its own:
//!   acquire + release per second, and the latency of the pair (p50/p99);
//! - contended: `--tasks` tasks on one name: hand-offs per second, the wait of each acquire
//!   (p50/p99) and the longest wait over the median (fairness). Redis spins: a refused
//!   SET NX is retried after `--redis-retry-ms`;
//! - keyed: `--tasks` tasks on `--keys` keys of one `KeyedLock<u64>` (random keys, seeded):
//!   acquire + release per second (grid only: for redis it is the uncontended idiom).
//!
//! - etcd (built with `--features etcd`): the uncontended scenario against `etcd` (Debian
//!   package etcd-server, started by the bench on free loopback ports with a temporary data
//!   directory), through the `etcd-client` crate: each task takes a lease once, then
//!   `Lock(name, lease)` + `Unlock(key)` on its own name. Without the feature, or without
//!   etcd installed, `uncontended_per_s_etcd` is `null`.
//!
//! ```sh
//! scripts/install-bench-deps.sh        # redis-server, etcd-server, protobuf-compiler, once
//! cargo run --release -p grid-bench --bin locks --features etcd -- --json
//! ```
//!
//! With `--json` the last line of stdout is one JSON object (`uncontended_per_s_grid`,
//! `uncontended_per_s_redis`, `uncontended_per_s_etcd`, `handoffs_per_s_grid`,
//! `handoffs_per_s_redis`, `p50_wait_us_grid`, `p99_wait_us_grid`, `keyed_per_s_grid`, and
//! more); redis fields are `null` when redis-server is missing.

#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use grid::Grid;
use grid_bench::RedisServer;
use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};
use serde::Serialize;

const MEMBERS: usize = 3;

#[derive(Parser, Debug)]
#[command(about = "Cluster lock throughput and waits: grid against redis-server")]
struct Args {
    /// Seconds measured per scenario.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Seconds run before each measurement, not counted.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Concurrent tasks.
    #[arg(long, default_value_t = 64)]
    tasks: usize,
    /// Keys of the keyed scenario.
    #[arg(long, default_value_t = 1000)]
    keys: u64,
    /// Partitions of the grid.
    #[arg(long, default_value_t = 271)]
    partitions: u32,
    /// Delay before a refused SET NX is tried again (redis, contended).
    #[arg(long, default_value_t = 1)]
    redis_retry_ms: u64,
    /// Seed of the keyed scenario's key choice.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Skip redis even when redis-server is installed.
    #[arg(long)]
    no_redis: bool,
    /// Skip etcd even when built with it and etcd is installed.
    #[arg(long)]
    no_etcd: bool,
    /// Print one JSON object as the last line.
    #[arg(long)]
    json: bool,
}

/// What a scenario measured.
#[derive(Debug, Default, Clone, Serialize)]
struct Run {
    per_s: f64,
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds")
}

/// Runs `tasks` copies of `op` (given the task index; returns the latency to record) for
/// warmup + seconds; counts and records only what completes inside the measured window.
async fn drive<F, Fut>(args: &Args, op: F) -> anyhow::Result<Run>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<Duration>> + Send,
{
    let op = Arc::new(op);
    let start = Instant::now() + Duration::from_secs_f64(args.warmup);
    let end = start + Duration::from_secs_f64(args.seconds);
    let mut tasks = Vec::new();
    for i in 0..args.tasks {
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let mut h = hist();
            let mut n = 0u64;
            loop {
                let latency = op(i).await?;
                let now = Instant::now();
                if now >= end {
                    return anyhow::Ok((n, h));
                }
                if now >= start {
                    n += 1;
                    h.record(latency.as_micros().max(1) as u64)?;
                }
            }
        }));
    }
    let mut total = 0;
    let mut h = hist();
    for t in tasks {
        let (n, th) = t.await??;
        total += n;
        h.add(th)?;
    }
    Ok(Run {
        per_s: total as f64 / args.seconds,
        p50_us: h.value_at_quantile(0.5) as f64,
        p99_us: h.value_at_quantile(0.99) as f64,
        max_us: h.max() as f64,
    })
}

// ---- grid ----

async fn start_cluster(args: &Args) -> anyhow::Result<Vec<Grid>> {
    grid_bench::start_cluster("locks", MEMBERS, args.partitions).await
}

async fn grid_runs(args: &Args) -> anyhow::Result<(Run, Run, Run)> {
    let grids = Arc::new(start_cluster(args).await?);
    let g = grids.clone();
    let uncontended = drive(args, move |i| {
        let lock = g[i % MEMBERS].lock(&format!("uncontended-{i}"));
        async move {
            let t0 = Instant::now();
            let guard = lock.lock().await?;
            guard.unlock().await?;
            Ok(t0.elapsed())
        }
    })
    .await?;
    eprintln!("grid uncontended: {uncontended:?}");
    let g = grids.clone();
    let contended = drive(args, move |i| {
        let lock = g[i % MEMBERS].lock("contended");
        async move {
            let t0 = Instant::now();
            let guard = lock.lock().await?;
            let waited = t0.elapsed();
            guard.unlock().await?;
            Ok(waited)
        }
    })
    .await?;
    eprintln!("grid contended: {contended:?}");
    let g = grids.clone();
    let keys = args.keys;
    let seed = args.seed;
    let rngs: Arc<Vec<std::sync::Mutex<rand::rngs::StdRng>>> = Arc::new(
        (0..args.tasks)
            .map(|i| std::sync::Mutex::new(rand::rngs::StdRng::seed_from_u64(seed + i as u64)))
            .collect(),
    );
    let keyed = drive(args, move |i| {
        let lock = g[i % MEMBERS].keyed_lock::<u64>("repository");
        let key = rngs[i]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .gen_range(0..keys);
        async move {
            let t0 = Instant::now();
            let guard = lock.lock(&key).await?;
            guard.unlock().await?;
            Ok(t0.elapsed())
        }
    })
    .await?;
    eprintln!("grid keyed: {keyed:?}");
    for g in grids.iter() {
        g.shutdown().await;
    }
    Ok((uncontended, contended, keyed))
}

/// Deletes the key only if it still holds our token.
const UNLOCK: &str =
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end";

async fn redis_try(
    conn: &mut redis::aio::MultiplexedConnection,
    key: &str,
    token: &str,
) -> anyhow::Result<bool> {
    let ok: Option<String> = redis::cmd("SET")
        .arg(key)
        .arg(token)
        .arg("NX")
        .arg("PX")
        .arg(10_000)
        .query_async(conn)
        .await?;
    Ok(ok.is_some())
}

async fn redis_unlock(
    conn: &mut redis::aio::MultiplexedConnection,
    sha: &str,
    key: &str,
    token: &str,
) -> anyhow::Result<()> {
    let _: i64 = redis::cmd("EVALSHA")
        .arg(sha)
        .arg(1)
        .arg(key)
        .arg(token)
        .query_async(conn)
        .await?;
    Ok(())
}

async fn redis_runs(args: &Args, client: &redis::Client) -> anyhow::Result<(Run, Run)> {
    let mut conn = client.get_multiplexed_async_connection().await?;
    // The compare-and-delete script, loaded once and called by its digest (EVALSHA).
    let sha: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(UNLOCK)
        .query_async(&mut conn)
        .await?;
    let script: Arc<str> = Arc::from(sha);
    let counter = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (c, s, n) = (conn.clone(), script.clone(), counter.clone());
    let uncontended = drive(args, move |i| {
        let (mut conn, script) = (c.clone(), s.clone());
        let token = n
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .to_string();
        async move {
            let key = format!("uncontended-{i}");
            let t0 = Instant::now();
            while !redis_try(&mut conn, &key, &token).await? {}
            redis_unlock(&mut conn, &script, &key, &token).await?;
            Ok(t0.elapsed())
        }
    })
    .await?;
    eprintln!("redis uncontended: {uncontended:?}");
    let retry = Duration::from_millis(args.redis_retry_ms);
    let (c, s, n) = (conn.clone(), script.clone(), counter.clone());
    let contended = drive(args, move |_| {
        let (mut conn, script) = (c.clone(), s.clone());
        let token = n
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .to_string();
        async move {
            let t0 = Instant::now();
            while !redis_try(&mut conn, "contended", &token).await? {
                tokio::time::sleep(retry).await;
            }
            let waited = t0.elapsed();
            redis_unlock(&mut conn, &script, "contended", &token).await?;
            Ok(waited)
        }
    })
    .await?;
    eprintln!("redis contended: {contended:?}");
    Ok((uncontended, contended))
}

// ---- etcd ----

#[cfg(feature = "etcd")]
mod etcd {
    use std::time::{Duration, Instant};

    use etcd_client::{Client, LockOptions};

    use super::{drive, Args, Run};

    /// An etcd server on free loopback ports with a temporary data directory; killed and its
    /// directory removed when dropped.
    pub(crate) struct EtcdServer {
        child: std::process::Child,
        dir: std::path::PathBuf,
        pub(crate) endpoint: String,
    }

    impl Drop for EtcdServer {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn free_port() -> anyhow::Result<u16> {
        Ok(std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port())
    }

    impl EtcdServer {
        /// Starts one and waits until it answers; `None` when etcd is not installed.
        pub(crate) async fn start() -> anyhow::Result<Option<(Self, Client)>> {
            let (client_port, peer_port) = (free_port()?, free_port()?);
            let dir = std::env::temp_dir().join(format!("grid-bench-etcd-{}", std::process::id()));
            let client_url = format!("http://127.0.0.1:{client_port}");
            let peer_url = format!("http://127.0.0.1:{peer_port}");
            let child = match std::process::Command::new("etcd")
                .args(["--name", "bench"])
                .arg("--data-dir")
                .arg(&dir)
                .args(["--listen-client-urls", &client_url])
                .args(["--advertise-client-urls", &client_url])
                .args(["--listen-peer-urls", &peer_url])
                .args(["--initial-advertise-peer-urls", &peer_url])
                .args(["--initial-cluster", &format!("bench={peer_url}")])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
            {
                Ok(c) => c,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(anyhow::Error::new(e).context("starting etcd")),
            };
            let mut server = Self {
                child,
                dir,
                endpoint: client_url,
            };
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Some(status) = server.child.try_wait()? {
                    anyhow::bail!("etcd exited at start-up: {status}");
                }
                let attempt = async {
                    let mut c = Client::connect([server.endpoint.as_str()], None).await?;
                    c.status().await?;
                    anyhow::Ok(c)
                };
                if let Ok(Ok(c)) = tokio::time::timeout(Duration::from_secs(2), attempt).await {
                    return Ok(Some((server, c)));
                }
                if Instant::now() > deadline {
                    anyhow::bail!("etcd did not answer within 20 s");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// The uncontended scenario: each task takes a lease (10 s, kept alive by nobody: the
    /// run is shorter) once, then locks and unlocks a name of its own.
    pub(crate) async fn uncontended(args: &Args, client: &Client) -> anyhow::Result<Run> {
        let mut leases = Vec::with_capacity(args.tasks);
        let mut c = client.clone();
        for _ in 0..args.tasks {
            let ttl = (args.warmup + args.seconds) as i64 + 30;
            leases.push(c.lease_grant(ttl, None).await?.id());
        }
        let client = client.clone();
        drive(args, move |i| {
            let mut c = client.clone();
            let lease = leases[i];
            async move {
                let name = format!("uncontended-{i}");
                let t0 = Instant::now();
                let held = c
                    .lock(name, Some(LockOptions::new().with_lease(lease)))
                    .await?;
                c.unlock(held.key().to_vec()).await?;
                Ok(t0.elapsed())
            }
        })
        .await
    }
}

#[derive(Serialize)]
struct Report {
    uncontended_per_s_grid: f64,
    uncontended_per_s_redis: Option<f64>,
    uncontended_per_s_etcd: Option<f64>,
    handoffs_per_s_grid: f64,
    handoffs_per_s_redis: Option<f64>,
    p50_wait_us_grid: f64,
    p99_wait_us_grid: f64,
    max_over_p50_wait_grid: f64,
    keyed_per_s_grid: f64,
    uncontended_p50_us_grid: f64,
    uncontended_p99_us_grid: f64,
    uncontended_p50_us_redis: Option<f64>,
    uncontended_p99_us_redis: Option<f64>,
    p50_wait_us_redis: Option<f64>,
    p99_wait_us_redis: Option<f64>,
    max_over_p50_wait_redis: Option<f64>,
    keyed_p50_us_grid: f64,
    keyed_p99_us_grid: f64,
    uncontended_p50_us_etcd: Option<f64>,
    uncontended_p99_us_etcd: Option<f64>,
    tasks: usize,
    seconds: f64,
    redis_retry_ms: u64,
}

/// The etcd reference, if built with it (`--features etcd`) and etcd is installed.
async fn etcd_run(args: &Args) -> anyhow::Result<Option<Run>> {
    if args.no_etcd {
        return Ok(None);
    }
    #[cfg(feature = "etcd")]
    {
        match etcd::EtcdServer::start().await? {
            Some((server, client)) => {
                let run = etcd::uncontended(args, &client).await?;
                eprintln!("etcd uncontended: {run:?}");
                drop(server);
                Ok(Some(run))
            }
            None => {
                eprintln!("etcd not installed (scripts/install-bench-deps.sh): no etcd reference");
                Ok(None)
            }
        }
    }
    #[cfg(not(feature = "etcd"))]
    {
        eprintln!(
            "built without the etcd reference (--features etcd): uncontended_per_s_etcd is null"
        );
        Ok(None)
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let (u, c, k) = grid_runs(&args).await?;
        let redis = if args.no_redis {
            None
        } else {
            match RedisServer::start().await? {
                Some((server, client)) => {
                    let runs = redis_runs(&args, &client).await?;
                    drop(server);
                    Some(runs)
                }
                None => {
                    eprintln!("redis-server not installed (scripts/install-bench-deps.sh): no reference");
                    None
                }
            }
        };
        let etcd = etcd_run(&args).await?;
        let ratio = |r: &Run| r.max_us / r.p50_us.max(1.0);
        let report = Report {
            uncontended_per_s_grid: u.per_s,
            uncontended_per_s_redis: redis.as_ref().map(|r| r.0.per_s),
            uncontended_per_s_etcd: etcd.as_ref().map(|r| r.per_s),
            handoffs_per_s_grid: c.per_s,
            handoffs_per_s_redis: redis.as_ref().map(|r| r.1.per_s),
            p50_wait_us_grid: c.p50_us,
            p99_wait_us_grid: c.p99_us,
            max_over_p50_wait_grid: ratio(&c),
            keyed_per_s_grid: k.per_s,
            uncontended_p50_us_grid: u.p50_us,
            uncontended_p99_us_grid: u.p99_us,
            uncontended_p50_us_redis: redis.as_ref().map(|r| r.0.p50_us),
            uncontended_p99_us_redis: redis.as_ref().map(|r| r.0.p99_us),
            p50_wait_us_redis: redis.as_ref().map(|r| r.1.p50_us),
            p99_wait_us_redis: redis.as_ref().map(|r| r.1.p99_us),
            max_over_p50_wait_redis: redis.as_ref().map(|r| ratio(&r.1)),
            keyed_p50_us_grid: k.p50_us,
            keyed_p99_us_grid: k.p99_us,
            uncontended_p50_us_etcd: etcd.as_ref().map(|r| r.p50_us),
            uncontended_p99_us_etcd: etcd.as_ref().map(|r| r.p99_us),
            tasks: args.tasks,
            seconds: args.seconds,
            redis_retry_ms: args.redis_retry_ms,
        };
        println!(
            "uncontended: grid {:.0}/s (p50 {} us, p99 {} us), redis {}",
            u.per_s,
            u.p50_us,
            u.p99_us,
            redis
                .as_ref()
                .map(|r| format!("{:.0}/s (p50 {} us, p99 {} us)", r.0.per_s, r.0.p50_us, r.0.p99_us))
                .unwrap_or_else(|| "-".into())
        );
        if let Some(e) = &etcd {
            println!(
                "uncontended: etcd {:.0}/s (p50 {} us, p99 {} us)",
                e.per_s, e.p50_us, e.p99_us
            );
        }
        println!(
            "contended: grid {:.0} hand-offs/s (wait p50 {} us, p99 {} us, max/p50 {:.1}), redis {}",
            c.per_s,
            c.p50_us,
            c.p99_us,
            ratio(&c),
            redis
                .as_ref()
                .map(|r| format!(
                    "{:.0} hand-offs/s (wait p50 {} us, p99 {} us, max/p50 {:.1})",
                    r.1.per_s,
                    r.1.p50_us,
                    r.1.p99_us,
                    ratio(&r.1)
                ))
                .unwrap_or_else(|| "-".into())
        );
        println!(
            "keyed ({} keys): grid {:.0}/s (p50 {} us, p99 {} us)",
            args.keys, k.per_s, k.p50_us, k.p99_us
        );
        if args.json {
            println!("{}", serde_json::to_string(&report)?);
        }
        anyhow::Ok(())
    })
}
