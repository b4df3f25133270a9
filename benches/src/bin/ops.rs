//! Cache operations per second and their latency: a three-member grid against redis-server,
//! same keys, same value bytes, same load generator, same concurrency; and (`--memory`) what
//! one cache entry costs in resident memory.
//!
//! The ops run starts 3 members in this process on 127.0.0.1 (backups 1), loads `--keys`
//! entries (16-byte `String` keys, `ByteBuf` values of each `--value-sizes` size) through a
//! cache, then `--tasks` tokio tasks (task `i` on member `i % 3`) pick random keys (seeded
//! by `--seed`) for `--seconds` after a `--warmup` that is not counted, doing
//! `--get-percent` gets and the rest puts. Every operation's latency goes to an HDR
//! histogram. The same generator then runs against a `redis-server` this bench starts on a
//! free loopback port (`--save "" --appendonly no`), GET/SET, in two ways: one connection per
//! task, and one multiplexed (pipelining) connection shared by all tasks; grid is compared
//! with the faster. Last, a run with `--near-get-percent` gets on a near-mode cache (opened,
//! like every cache here, by [`open_cache`]), loaded like the first; before it, every member
//! reads every key once (not timed), so that the run measures warm near copies rather than
//! their filling (`--no-near-prime` skips this: with 100,000 keys and 5 s, most of such a
//! run is first reads).
//!
//! The load generator, the three members and the redis client share this process (2 worker
//! threads on a 2-core machine); redis-server is a separate, single-threaded process.
//!
//! ```sh
//! scripts/install-bench-deps.sh        # redis-server (Debian package), once
//! cargo run --release -p grid-bench --bin ops -- --json
//! cargo run --release -p grid-bench --bin ops -- --value-sizes 100 --seconds 10 --tasks 128
//! cargo run --release -p grid-bench --no-default-features --bin ops -- --memory --json
//! ```
//!
//! The bench runs on mimalloc (feature `mimalloc`, on by default): under glibc's malloc the
//! members' tasks spent a quarter of the CPU waiting on its arena locks. The memory figure
//! is taken with `--no-default-features`, under the system allocator a service gets by
//! default (mimalloc keeps the arenas' outgrown buffers resident: 68 instead of 55 bytes of
//! overhead per entry copy, measured).
//!
//! `--memory` (instead of the ops run) measures this process's resident set (from
//! `/proc/self/statm`) around inserting `--memory-entries` entries (16-byte keys, 100-byte
//! values): first into a plain `HashMap<Vec<u8>, Vec<u8>>` of the encoded keys and values
//! (the reference, kept alive so that the grid cannot reuse its memory), then through a
//! cache of 3 members with backups 1. Per entry copy: ΔRSS / (entries × (1 + backups));
//! overhead: that less the encoded key and value bytes (MessagePack, as the cache stores
//! them), so whatever the cache keeps beside them (table slots, allocator headers, spare
//! capacity) counts as overhead.
//!
//! With `--json` the last line of stdout is one JSON object: the fields of the 100-byte run
//! (or the first size) at the top level, plus `runs` with one object per size when there
//! are several; redis fields are `null` when redis-server is missing.

/// The allocator a service embedding grid would pick: glibc's malloc serialises the
/// members' tasks on its arena locks (measured: a quarter of the CPU in futex waits).
/// Redis, the reference, brings its own allocator (jemalloc) too.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The allocator this build uses (reported with every figure).
const ALLOCATOR_NAME: &str = if cfg!(feature = "mimalloc") {
    "mimalloc"
} else {
    "system (glibc malloc)"
};

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use grid::{Cache, Grid};
use grid_bench::{settled, RedisServer};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_bytes::ByteBuf;

#[derive(Parser, Debug)]
struct Args {
    /// Keys loaded before each run.
    #[arg(long, default_value_t = 100_000)]
    keys: usize,
    /// Concurrent load-generator tasks (task i uses member i % 3; for redis, connection i
    /// or the shared one).
    #[arg(long, default_value_t = 64)]
    tasks: usize,
    /// Measured seconds per run.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Warm-up seconds before each measured run (not counted).
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Percentage of gets (the rest are puts).
    #[arg(long, default_value_t = 80)]
    get_percent: u32,
    /// Percentage of gets of the near-mode run.
    #[arg(long, default_value_t = 95)]
    near_get_percent: u32,
    /// Value sizes in bytes, one full run each.
    #[arg(long, value_delimiter = ',', default_value = "100,1024")]
    value_sizes: Vec<usize>,
    /// Seed of the key and operation choice (printed; random if absent).
    #[arg(long)]
    seed: Option<u64>,
    /// Synchronous backups per partition.
    #[arg(long, default_value_t = 1)]
    backups: u8,
    /// Partition count.
    #[arg(long, default_value_t = 271)]
    partitions: u32,
    /// Skip reading every key on every member before the near-mode run (then it measures
    /// near copies being filled).
    #[arg(long)]
    no_near_prime: bool,
    /// Skip redis even when redis-server is installed.
    #[arg(long)]
    no_redis: bool,
    /// Measure memory per entry instead of operations.
    #[arg(long)]
    memory: bool,
    /// Entries inserted by `--memory`.
    #[arg(long, default_value_t = 1_000_000)]
    memory_entries: usize,
    /// Value size of `--memory`.
    #[arg(long, default_value_t = 100)]
    memory_value_size: usize,
    /// Print one JSON object as the last line.
    #[arg(long)]
    json: bool,
}

const MEMBERS: usize = 3;
/// Concurrent puts while loading.
const LOADERS: usize = 64;

/// Whether [`open_cache`] still opens a plain partitioned cache for near mode (then the near
/// run differs from the grid run only in its share of gets). Near: set to `false` together
/// with the change in [`open_cache`].
const NEAR_PENDING: bool = false;

/// The cache `name`, in near mode when `near`. The only place caches are opened.
async fn open_cache(grid: &Grid, name: &str, near: bool) -> anyhow::Result<Cache<String, ByteBuf>> {
    let settings = if near {
        grid::CacheSettings::builder().near().build()
    } else {
        grid::CacheSettings::default()
    };
    Ok(grid
        .cache::<String, ByteBuf>(name)
        .settings(settings)
        .await?)
}

/// Key `i`: 16 bytes.
fn key_of(i: usize) -> String {
    format!("key-{i:012}")
}

/// A value of `size` bytes, encoded as MessagePack binary (not as an array of numbers).
fn value_of(size: usize) -> ByteBuf {
    ByteBuf::from((0..size).map(|i| (i % 251) as u8).collect::<Vec<u8>>())
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1e3
}

// ---- the grid ----

async fn start_member(
    args: &Args,
    i: usize,
    seed: Option<SocketAddr>,
    backups: u8,
) -> anyhow::Result<Grid> {
    let b = Grid::builder()
        .cluster_name("ops")
        .member_id(format!("m{i}"))
        .secret("ops harness")
        .bind("127.0.0.1:0")
        .partitions(args.partitions)
        .backups(backups)
        .op_timeout(Duration::from_secs(30));
    let b = match seed {
        Some(s) => b.seed(s),
        None => b.no_seeds(),
    };
    Ok(b.start().await?)
}

async fn start_cluster(args: &Args, backups: u8) -> anyhow::Result<Vec<Grid>> {
    let spinner = ProgressBar::new_spinner().with_message("starting 3 members");
    spinner.enable_steady_tick(Duration::from_millis(100));
    let first = start_member(args, 0, None, backups).await?;
    let mut grids = vec![first.clone()];
    for i in 1..MEMBERS {
        grids.push(start_member(args, i, Some(first.addr()), backups).await?);
    }
    let ok = settled(&grids, MEMBERS, Duration::from_secs(60)).await;
    spinner.finish_and_clear();
    if !ok {
        bail!("the cluster did not settle within 60 s");
    }
    Ok(grids)
}

fn bar(len: u64, what: &str) -> ProgressBar {
    ProgressBar::new(len).with_style(
        ProgressStyle::with_template(&format!("{what} {{bar:40}} {{pos}}/{{len}} ({{per_sec}})"))
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    )
}

/// Puts key `i` → `value(i)` for every `i < count` through the cache `name`, `LOADERS` at a
/// time, spread over the members.
async fn load_grid(
    grids: &[Grid],
    name: &str,
    near: bool,
    count: usize,
    value: impl Fn(usize) -> ByteBuf + Clone + Send + 'static,
) -> anyhow::Result<()> {
    let bar = bar(count as u64, &format!("loading {name}"));
    let t0 = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut loaders = Vec::new();
    for t in 0..LOADERS {
        let cache = open_cache(&grids[t % grids.len()], name, near).await?;
        let (next, bar, value) = (next.clone(), bar.clone(), value.clone());
        loaders.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= count {
                    return anyhow::Ok(());
                }
                cache.put(&key_of(i), &value(i)).await?;
                bar.inc(1);
            }
        }));
    }
    for l in loaders {
        l.await??;
    }
    bar.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "loaded {count} entries into {name} in {secs:.1} s ({:.0} puts/s)",
        count as f64 / secs
    );
    Ok(())
}

/// Reads every key through each member's handle on the near cache `name`, so that every
/// member holds a near copy of every key.
async fn prime_near(grids: &[Grid], name: &str, keys: &Arc<[String]>) -> anyhow::Result<()> {
    let total = (keys.len() * grids.len()) as u64;
    let bar = bar(total, &format!("priming {name}"));
    let t0 = Instant::now();
    let per_member = (LOADERS / grids.len()).max(1);
    let mut readers = Vec::new();
    for g in grids {
        for first in 0..per_member {
            let cache = open_cache(g, name, true).await?;
            let (keys, bar) = (keys.clone(), bar.clone());
            readers.push(tokio::spawn(async move {
                for key in keys.iter().skip(first).step_by(per_member) {
                    cache.get(key).await?;
                    bar.inc(1);
                }
                anyhow::Ok(())
            }));
        }
    }
    for r in readers {
        r.await??;
    }
    bar.finish_and_clear();
    eprintln!(
        "primed {name}: {} keys on {} members in {:.1} s",
        keys.len(),
        grids.len(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn redis_version(conn: &mut redis::aio::MultiplexedConnection) -> String {
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(conn)
        .await
        .unwrap_or_default();
    info.lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .unwrap_or("?")
        .trim()
        .to_string()
}

/// SET of every key, in pipelines of 1000.
async fn load_redis(
    conn: &mut redis::aio::MultiplexedConnection,
    keys: &[String],
    value: &[u8],
) -> anyhow::Result<()> {
    redis::cmd("FLUSHALL").query_async::<()>(conn).await?;
    let bar = bar(keys.len() as u64, "loading redis");
    for chunk in keys.chunks(1000) {
        let mut pipe = redis::pipe();
        for k in chunk {
            pipe.cmd("SET").arg(k).arg(value).ignore();
        }
        pipe.query_async::<()>(conn).await?;
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok(())
}

// ---- the load generator ----

/// One task's view of a store: reads and writes key `i` (of the shared key list).
trait Store: Send + 'static {
    /// Reads key `i`; whether it had a value.
    fn get(&mut self, i: usize) -> impl Future<Output = anyhow::Result<bool>> + Send;
    /// Writes the run's value to key `i`.
    fn put(&mut self, i: usize) -> impl Future<Output = anyhow::Result<()>> + Send;
}

struct GridStore {
    cache: Cache<String, ByteBuf>,
    keys: Arc<[String]>,
    value: Arc<ByteBuf>,
}

impl Store for GridStore {
    async fn get(&mut self, i: usize) -> anyhow::Result<bool> {
        Ok(self.cache.get(&self.keys[i]).await?.is_some())
    }
    async fn put(&mut self, i: usize) -> anyhow::Result<()> {
        self.cache.set(&self.keys[i], &self.value).await?;
        Ok(())
    }
}

struct RedisStore {
    conn: redis::aio::MultiplexedConnection,
    keys: Arc<[String]>,
    value: Arc<ByteBuf>,
}

impl Store for RedisStore {
    async fn get(&mut self, i: usize) -> anyhow::Result<bool> {
        let v: Option<Vec<u8>> = redis::cmd("GET")
            .arg(&self.keys[i])
            .query_async(&mut self.conn)
            .await?;
        Ok(v.is_some())
    }
    async fn put(&mut self, i: usize) -> anyhow::Result<()> {
        redis::cmd("SET")
            .arg(&self.keys[i])
            .arg(self.value.as_slice())
            .query_async::<()>(&mut self.conn)
            .await?;
        Ok(())
    }
}

/// What one measured run gave.
struct Measured {
    ops_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    errors: u64,
    misses: u64,
}

#[derive(Clone, Copy)]
struct LoadSpec {
    get_percent: u32,
    warmup: Duration,
    measure: Duration,
    seed: u64,
}

/// Runs one task per store, each picking random keys and operations until the warm-up
/// and measured time are over; counts and times the operations started in the measured
/// window.
async fn run_load<S: Store>(
    label: &str,
    stores: Vec<S>,
    keys: usize,
    spec: LoadSpec,
) -> anyhow::Result<Measured> {
    let total = spec.warmup + spec.measure;
    let bar = ProgressBar::new(total.as_millis() as u64).with_style(
        ProgressStyle::with_template(&format!("{label:<32} {{bar:40}} {{elapsed}}"))
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let start = Instant::now();
    let (measure_from, end) = (start + spec.warmup, start + total);
    let ticker = {
        let bar = bar.clone();
        tokio::spawn(async move {
            while Instant::now() < end {
                bar.set_position(start.elapsed().as_millis() as u64);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let errors_printed = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for (t, mut store) in stores.into_iter().enumerate() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(spec.seed.wrapping_add(t as u64));
        let errors_printed = errors_printed.clone();
        tasks.push(tokio::spawn(async move {
            // 1 ns to 60 s, 3 significant digits.
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
            let (mut errors, mut misses) = (0u64, 0u64);
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                let i = rng.gen_range(0..keys);
                let r = if rng.gen_range(0..100) < spec.get_percent {
                    store.get(i).await.map(|found| {
                        if !found {
                            misses += 1;
                        }
                    })
                } else {
                    store.put(i).await
                };
                let took = t0.elapsed();
                if t0 < measure_from {
                    continue;
                }
                match r {
                    Ok(()) => hist.saturating_record(took.as_nanos() as u64),
                    Err(e) => {
                        errors += 1;
                        if errors_printed.fetch_add(1, Ordering::Relaxed) < 5 {
                            eprintln!("operation failed: {e:#}");
                        }
                    }
                }
            }
            anyhow::Ok((hist, errors, misses))
        }));
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    let (mut errors, mut misses) = (0, 0);
    for t in tasks {
        let (h, e, m) = t.await??;
        hist.add(&h)?;
        errors += e;
        misses += m;
    }
    ticker.abort();
    bar.finish_and_clear();
    Ok(Measured {
        ops_per_s: hist.len() as f64 / spec.measure.as_secs_f64(),
        p50_us: us(hist.value_at_quantile(0.50)),
        p99_us: us(hist.value_at_quantile(0.99)),
        errors,
        misses,
    })
}

// ---- the ops run ----

#[derive(Debug, Clone, Serialize)]
struct Run {
    value_size: usize,
    ops_per_s_grid: f64,
    p50_us_grid: f64,
    p99_us_grid: f64,
    /// The faster redis mode.
    ops_per_s_redis: Option<f64>,
    p50_us_redis: Option<f64>,
    p99_us_redis: Option<f64>,
    /// `per_task_conn` or `multiplexed`.
    redis_mode: Option<&'static str>,
    ops_per_s_redis_per_task_conn: Option<f64>,
    p50_us_redis_per_task_conn: Option<f64>,
    p99_us_redis_per_task_conn: Option<f64>,
    ops_per_s_redis_multiplexed: Option<f64>,
    p50_us_redis_multiplexed: Option<f64>,
    p99_us_redis_multiplexed: Option<f64>,
    /// Grid ops/s over the faster redis mode's.
    grid_vs_redis_throughput: Option<f64>,
    /// Grid p50 over the faster redis mode's.
    grid_vs_redis_p50: Option<f64>,
    ops_per_s_near: f64,
    p50_us_near: f64,
    p99_us_near: f64,
    errors_grid: u64,
    errors_redis: u64,
    errors_near: u64,
    /// Gets that found no value (every key is loaded: should be 0).
    misses: u64,
}

async fn ops_run(
    args: &Args,
    grids: &[Grid],
    redis: Option<&redis::Client>,
    seed: u64,
    size: usize,
) -> anyhow::Result<(Run, Vec<(String, u32, Measured)>)> {
    let keys: Arc<[String]> = (0..args.keys).map(key_of).collect();
    let value = Arc::new(value_of(size));
    let spec = LoadSpec {
        get_percent: args.get_percent,
        warmup: Duration::from_secs_f64(args.warmup),
        measure: Duration::from_secs_f64(args.seconds),
        seed,
    };
    let mut rows = Vec::new();

    // Grid.
    let name = format!("ops-{size}");
    let v = value.clone();
    load_grid(grids, &name, false, args.keys, move |_| (*v).clone()).await?;
    let mut stores = Vec::new();
    for t in 0..args.tasks {
        stores.push(GridStore {
            cache: open_cache(&grids[t % grids.len()], &name, false).await?,
            keys: keys.clone(),
            value: value.clone(),
        });
    }
    let grid = run_load("grid", stores, args.keys, spec).await?;

    // Redis, both ways.
    let (mut per_task, mut mux) = (None, None);
    if let Some(client) = redis {
        let mut conn = client.get_multiplexed_async_connection().await?;
        load_redis(&mut conn, &keys, &value).await?;
        let mut stores = Vec::new();
        for _ in 0..args.tasks {
            stores.push(RedisStore {
                conn: client.get_multiplexed_async_connection().await?,
                keys: keys.clone(),
                value: value.clone(),
            });
        }
        per_task = Some(run_load("redis, connection per task", stores, args.keys, spec).await?);
        let stores = (0..args.tasks)
            .map(|_| RedisStore {
                conn: conn.clone(),
                keys: keys.clone(),
                value: value.clone(),
            })
            .collect();
        mux = Some(run_load("redis, one multiplexed", stores, args.keys, spec).await?);
    }

    // Near mode.
    let near_name = format!("ops-near-{size}");
    let v = value.clone();
    load_grid(grids, &near_name, true, args.keys, move |_| (*v).clone()).await?;
    let mut stores = Vec::new();
    for t in 0..args.tasks {
        stores.push(GridStore {
            cache: open_cache(&grids[t % grids.len()], &near_name, true).await?,
            keys: keys.clone(),
            value: value.clone(),
        });
    }
    if !args.no_near_prime {
        prime_near(grids, &near_name, &keys).await?;
    }
    let near_spec = LoadSpec {
        get_percent: args.near_get_percent,
        ..spec
    };
    let near = run_load("grid, near mode", stores, args.keys, near_spec).await?;

    let faster = match (&per_task, &mux) {
        (Some(a), Some(b)) if b.ops_per_s >= a.ops_per_s => Some(("multiplexed", b)),
        (Some(a), Some(_)) => Some(("per_task_conn", a)),
        _ => None,
    };
    let run = Run {
        value_size: size,
        ops_per_s_grid: grid.ops_per_s,
        p50_us_grid: grid.p50_us,
        p99_us_grid: grid.p99_us,
        ops_per_s_redis: faster.map(|(_, m)| m.ops_per_s),
        p50_us_redis: faster.map(|(_, m)| m.p50_us),
        p99_us_redis: faster.map(|(_, m)| m.p99_us),
        redis_mode: faster.map(|(mode, _)| mode),
        ops_per_s_redis_per_task_conn: per_task.as_ref().map(|m| m.ops_per_s),
        p50_us_redis_per_task_conn: per_task.as_ref().map(|m| m.p50_us),
        p99_us_redis_per_task_conn: per_task.as_ref().map(|m| m.p99_us),
        ops_per_s_redis_multiplexed: mux.as_ref().map(|m| m.ops_per_s),
        p50_us_redis_multiplexed: mux.as_ref().map(|m| m.p50_us),
        p99_us_redis_multiplexed: mux.as_ref().map(|m| m.p99_us),
        grid_vs_redis_throughput: faster.map(|(_, m)| grid.ops_per_s / m.ops_per_s),
        grid_vs_redis_p50: faster.map(|(_, m)| grid.p50_us / m.p50_us),
        ops_per_s_near: near.ops_per_s,
        p50_us_near: near.p50_us,
        p99_us_near: near.p99_us,
        errors_grid: grid.errors,
        errors_redis: per_task.as_ref().map_or(0, |m| m.errors)
            + mux.as_ref().map_or(0, |m| m.errors),
        errors_near: near.errors,
        misses: grid.misses
            + near.misses
            + per_task.as_ref().map_or(0, |m| m.misses)
            + mux.as_ref().map_or(0, |m| m.misses),
    };
    let near_label = match (NEAR_PENDING, args.no_near_prime) {
        (true, _) => "grid, near mode (partitioned today)",
        (false, false) => "grid, near mode (copies primed)",
        (false, true) => "grid, near mode (cold copies)",
    };
    rows.push(("grid".to_string(), args.get_percent, grid));
    if let Some(m) = per_task {
        rows.push(("redis, connection per task".into(), args.get_percent, m));
    }
    if let Some(m) = mux {
        rows.push(("redis, one multiplexed conn".into(), args.get_percent, m));
    }
    rows.push((near_label.into(), args.near_get_percent, near));
    Ok((run, rows))
}

async fn ops_main(args: &Args, seed: u64) -> anyhow::Result<()> {
    if args.value_sizes.is_empty() || args.keys == 0 || args.tasks == 0 {
        bail!("--value-sizes, --keys and --tasks must not be empty or zero");
    }
    if args.get_percent > 100 || args.near_get_percent > 100 {
        bail!("get percentages are 0 to 100");
    }
    // Declared before the members so that it is dropped (killed) after them, also on error.
    let redis = if args.no_redis {
        None
    } else {
        match RedisServer::start().await? {
            Some(r) => Some(r),
            None => {
                println!(
                    "redis-server not found: run scripts/install-bench-deps.sh (apt-get install -y redis-server)"
                );
                None
            }
        }
    };
    let redis_version = match &redis {
        Some((_, client)) => {
            Some(redis_version(&mut client.get_multiplexed_async_connection().await?).await)
        }
        None => None,
    };
    let grids = start_cluster(args, args.backups).await?;
    let mut runs = Vec::new();
    let mut tables = Vec::new();
    for &size in &args.value_sizes {
        let (run, rows) = ops_run(args, &grids, redis.as_ref().map(|(_, c)| c), seed, size).await?;
        runs.push(run);
        tables.push((size, rows));
    }
    for g in &grids {
        g.kill();
    }
    drop(redis);

    println!(
        "ops: {MEMBERS} members in one process (backups {}, {} partitions) vs redis-server {} on loopback",
        args.backups,
        args.partitions,
        redis_version.as_deref().unwrap_or("(skipped)")
    );
    println!(
        "{} keys of 16 B, {} tasks, {} s measured after {} s warm-up, seed {seed}",
        args.keys, args.tasks, args.seconds, args.warmup
    );
    for ((size, rows), run) in tables.iter().zip(&runs) {
        println!();
        println!(
            "value {size} B        {:>38} {:>6} {:>12} {:>9} {:>9} {:>7}",
            "", "get %", "ops/s", "p50 µs", "p99 µs", "errors"
        );
        for (name, gets, m) in rows {
            println!(
                "  {name:<52} {gets:>6} {:>12.0} {:>9.1} {:>9.1} {:>7}",
                m.ops_per_s, m.p50_us, m.p99_us, m.errors
            );
        }
        if let (Some(t), Some(p), Some(mode)) = (
            run.grid_vs_redis_throughput,
            run.grid_vs_redis_p50,
            run.redis_mode,
        ) {
            println!(
                "  grid / redis ({mode}, the faster): throughput {t:.2}x, p50 latency {p:.2}x"
            );
        }
        if run.misses > 0 {
            println!("  warning: {} gets found no value", run.misses);
        }
    }
    if NEAR_PENDING {
        println!();
        println!(
            "note: near mode opens a partitioned cache until CacheSettings lands (open_cache)"
        );
    }

    if args.json {
        let top = runs
            .iter()
            .find(|r| r.value_size == 100)
            .unwrap_or(&runs[0]);
        let mut obj = serde_json::to_value(top)?;
        let extra = serde_json::json!({
            "keys": args.keys,
            "tasks": args.tasks,
            "seconds": args.seconds,
            "warmup_seconds": args.warmup,
            "get_percent": args.get_percent,
            "near_get_percent": args.near_get_percent,
            "near_pending": NEAR_PENDING,
            "near_primed": !args.no_near_prime,
            "members": MEMBERS,
            "backups": args.backups,
            "partitions": args.partitions,
            "redis_version": redis_version,
            "seed": seed,
        });
        if let (Some(o), Some(e)) = (obj.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
            if runs.len() > 1 {
                o.insert("runs".into(), serde_json::to_value(&runs)?);
            }
        }
        println!("{obj}");
    }
    Ok(())
}

// ---- the memory run ----

/// This process's resident set in bytes (`/proc/self/statm`: resident pages × page size).
fn rss_bytes() -> anyhow::Result<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").context("reading /proc/self/statm")?;
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .context("no resident field in /proc/self/statm")?
        .parse()?;
    Ok(pages * page_size())
}

fn page_size() -> u64 {
    // SAFETY: sysconf reads a configuration value; it has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 {
        size as u64
    } else {
        4096
    }
}

#[derive(Debug, Serialize)]
struct MemoryReport {
    memory_entries: usize,
    value_size: usize,
    backups: u8,
    encoded_key_bytes: usize,
    encoded_value_bytes: usize,
    bytes_per_entry_copy: f64,
    overhead_per_entry_copy: f64,
    hashmap_bytes_per_entry: f64,
    hashmap_overhead_per_entry: f64,
    rss_start_mb: f64,
    rss_after_hashmap_mb: f64,
    rss_after_grid_start_mb: f64,
    rss_after_grid_mb: f64,
    page_size: u64,
    allocator: &'static str,
}

async fn memory_main(args: &Args) -> anyhow::Result<()> {
    let n = args.memory_entries;
    if n == 0 {
        bail!("--memory-entries must not be zero");
    }
    let value = value_of(args.memory_value_size);
    let encoded_key = grid::codec::encode(&key_of(0))?.len();
    let encoded_value = grid::codec::encode(&value)?.len();
    let mb = |b: u64| b as f64 / (1 << 20) as f64;

    // Reference: a plain map of the encoded keys and values, kept alive until the end so
    // that the grid does not reuse its pages.
    let rss_start = rss_bytes()?;
    let mut map: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
    let bar = bar(n as u64, "HashMap");
    for i in 0..n {
        // Exact-size buffers, as decoded ones are (an encoder's buffer has spare capacity).
        let (mut k, mut v) = (
            grid::codec::encode(&key_of(i))?,
            grid::codec::encode(&value)?,
        );
        k.shrink_to_fit();
        v.shrink_to_fit();
        map.insert(k, v);
        if i % 10_000 == 0 {
            bar.set_position(i as u64);
        }
    }
    bar.finish_and_clear();
    let rss_map = rss_bytes()?;
    let hashmap_bytes = (rss_map.saturating_sub(rss_start)) as f64 / n as f64;

    // The grid.
    let grids = start_cluster(args, args.backups).await?;
    let rss_grid_start = rss_bytes()?;
    let name = "mem";
    let v = value.clone();
    load_grid(&grids, name, false, n, move |_| v.clone()).await?;
    if !settled(&grids, MEMBERS, Duration::from_secs(60)).await {
        eprintln!("warning: the partition table did not settle after loading");
    }
    let stored = open_cache(&grids[0], name, false).await?.len().await?;
    if stored != n {
        eprintln!("warning: the cache holds {stored} entries, not {n}");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_grid = rss_bytes()?;
    let copies = n as f64 * (1.0 + f64::from(args.backups.min((MEMBERS - 1) as u8)));
    let per_copy = rss_grid.saturating_sub(rss_grid_start) as f64 / copies;
    std::hint::black_box(&map);
    let report = MemoryReport {
        memory_entries: n,
        value_size: args.memory_value_size,
        backups: args.backups,
        encoded_key_bytes: encoded_key,
        encoded_value_bytes: encoded_value,
        bytes_per_entry_copy: per_copy,
        overhead_per_entry_copy: per_copy - (encoded_key + encoded_value) as f64,
        hashmap_bytes_per_entry: hashmap_bytes,
        hashmap_overhead_per_entry: hashmap_bytes - (encoded_key + encoded_value) as f64,
        rss_start_mb: mb(rss_start),
        rss_after_hashmap_mb: mb(rss_map),
        rss_after_grid_start_mb: mb(rss_grid_start),
        rss_after_grid_mb: mb(rss_grid),
        page_size: page_size(),
        allocator: ALLOCATOR_NAME,
    };
    drop(map);
    for g in &grids {
        g.kill();
    }

    println!(
        "memory: {n} entries, 16-byte String keys ({encoded_key} B encoded), {} B ByteBuf values ({encoded_value} B encoded)",
        args.memory_value_size
    );
    println!(
        "{:<44} {:>12} {:>14} {:>16}",
        "", "ΔRSS MiB", "B/entry copy", "overhead B/copy"
    );
    println!(
        "{:<44} {:>12.1} {:>14.1} {:>16.1}",
        "HashMap<Vec<u8>, Vec<u8>> (reference)",
        mb(rss_map.saturating_sub(rss_start)),
        report.hashmap_bytes_per_entry,
        report.hashmap_overhead_per_entry
    );
    println!(
        "{:<44} {:>12.1} {:>14.1} {:>16.1}",
        format!(
            "grid, {MEMBERS} members, backups {} ({copies} copies)",
            args.backups
        ),
        mb(rss_grid.saturating_sub(rss_grid_start)),
        report.bytes_per_entry_copy,
        report.overhead_per_entry_copy
    );
    println!(
        "(RSS from /proc/self/statm × page size {}; overhead = B/entry copy - encoded key and value; allocator: {})",
        report.page_size, report.allocator
    );
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(rand::random);
    let work = async {
        if args.memory {
            memory_main(&args).await
        } else {
            eprintln!("seed {seed}");
            ops_main(&args, seed).await
        }
    };
    // On Ctrl-C the work is dropped, and with it the redis-server child.
    tokio::select! {
        r = work => r,
        _ = tokio::signal::ctrl_c() => bail!("interrupted"),
    }
}
