//! The `grid` binary: with no arguments, a demo cluster on loopback; `grid node` runs one
//! member from a configuration file and the `GRID_*` environment; `grid status` joins a
//! cluster as a lite member with the same configuration and prints what it sees.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use grid::{CacheEvent, CacheSettings, Grid, GridConfig, MemberEvent};
use serde::{Deserialize, Serialize};
use tracing_subscriber::EnvFilter;

mod logging;
mod status;

#[derive(Parser)]
#[command(name = "grid", version, about = "A peer-to-peer in-memory data grid")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Start 3 members in this process on 127.0.0.1, show them find each other, exchange
    /// messages, share a partitioned cache, and survive a killed member and a leaving one
    /// (the default).
    Demo,
    /// Run one member until Ctrl-C, printing membership changes.
    Node {
        /// TOML configuration file (every key optional; GRID_* variables override it).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Serve no metrics and health probes (by default they are served on
        /// metrics.listen, else on 127.0.0.1:9701 or the next free port).
        #[arg(long)]
        no_metrics: bool,
    },
    /// Join the cluster as a lite member (same configuration file and GRID_* variables as a
    /// member), print its members, partition table, migrations and caches, and leave.
    Status(status::StatusArgs),
}

/// The port `grid node` serves metrics on when `metrics.listen` is not set (or the next
/// free one of the following 99).
const DEFAULT_METRICS_PORT: u16 = 9701;

fn main() {
    // Errors are printed whole and briefly (no backtrace): `grid status` is run by scripts.
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

#[tokio::main]
async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The demo narrates what happens itself; a member run with `grid node` logs at info.
    let default_level = match cli.command {
        None | Some(Command::Demo) | Some(Command::Status(_)) => "error",
        Some(Command::Node { .. }) => "info",
    };
    let filter =
        EnvFilter::try_from_env("GRID_LOG").unwrap_or_else(|_| EnvFilter::new(default_level));
    logging::init(filter, std::env::var("GRID_LOG_FORMAT").ok().as_deref())?;
    match cli.command.unwrap_or(Command::Demo) {
        Command::Demo => demo().await,
        Command::Node { config, no_metrics } => node(config, no_metrics).await,
        Command::Status(args) => status::run(args).await,
    }
}

/// The member id of a member started without one: random, like the library's, but chosen
/// here so that every log line of the member, the first included, can carry it.
fn random_member_id() -> String {
    use std::hash::BuildHasher;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{:016x}",
        std::collections::hash_map::RandomState::new().hash_one((seed, std::process::id()))
    )
}

/// A listener on 127.0.0.1 at the default metrics port or the next free one.
fn default_metrics_listener() -> Option<std::net::TcpListener> {
    (DEFAULT_METRICS_PORT..DEFAULT_METRICS_PORT + 100)
        .find_map(|port| std::net::TcpListener::bind(("127.0.0.1", port)).ok())
}

async fn node(config: Option<PathBuf>, no_metrics: bool) -> anyhow::Result<()> {
    let mut config = GridConfig::load(config.as_deref())?;
    let id = config
        .member_id
        .get_or_insert_with(random_member_id)
        .clone();
    logging::set_member(&id, &config.cluster_name);
    let mut builder = Grid::builder();
    if no_metrics {
        config.metrics.listen = None;
    } else if config.metrics.listen.is_none() {
        match default_metrics_listener() {
            Some(listener) => builder = builder.metrics_listener(listener),
            None => tracing::warn!(
                "no free port in 127.0.0.1:{DEFAULT_METRICS_PORT}-{}: no metrics endpoint",
                DEFAULT_METRICS_PORT + 99
            ),
        }
    }
    let grid = builder.config(config).start().await?;
    println!(
        "member {} listening on {} (cluster {:?}); Ctrl-C to leave",
        grid.cluster().local_member().id,
        grid.addr(),
        grid.cluster().local_member().attributes
    );
    if let Some(addr) = grid.metrics_addr() {
        println!("metrics on http://{addr}/metrics; health on /healthz and /readyz");
    }
    let mut events = grid.cluster().events();
    // One listener for the whole run: a signal that arrives while an event is printed is
    // kept for the next turn.
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Some(e) => println!("{}", describe(&e)),
                None => break,
            },
            _ = interrupt.recv() => break,
        }
    }
    grid.shutdown().await;
    // What it did, for whoever watches (the rebalancing harness reads this line).
    println!("left: {}", serde_json::to_string(&grid.runtime().status())?);
    Ok(())
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
async fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while !cond() {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

fn describe(event: &MemberEvent) -> String {
    match event {
        MemberEvent::Joined(m) => format!("joined: {} at {}", m.id, m.addr),
        MemberEvent::Left(m) => format!("left:   {} at {}", m.id, m.addr),
        MemberEvent::Failed(m) => format!("failed: {} at {}", m.id, m.addr),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Chat {
    from: String,
    text: String,
}

async fn demo() -> anyhow::Result<()> {
    println!(
        "grid demo: 3 members in one process, on 127.0.0.1, QUIC + mutual TLS, gossip membership\n"
    );
    let t0 = Instant::now();
    let builder = |id: &str| {
        Grid::builder()
            .cluster_name("demo")
            .member_id(id)
            .secret("grid demo secret")
            .bind("127.0.0.1:0")
    };
    let m1 = builder("m1").no_seeds().start().await?;
    let m2 = builder("m2").seed(m1.addr()).start().await?;
    let m3 = builder("m3").seed(m1.addr()).start().await?;
    let members = [&m1, &m2, &m3];
    for m in members {
        println!(
            "  started {} on {}",
            m.cluster().local_member().id,
            m.addr()
        );
    }
    for m in members {
        if !m
            .cluster()
            .wait_until(Duration::from_secs(10), |v| v.len() == 3)
            .await
        {
            bail!("the cluster did not form within 10 s");
        }
    }
    let names: Vec<String> = m1
        .cluster()
        .members()
        .iter()
        .map(|m| m.id.to_string())
        .collect();
    println!(
        "\ncluster formed in {} ms: {} (oldest first; leader: {})",
        t0.elapsed().as_millis(),
        names.join(", "),
        m2.cluster().oldest().id
    );

    println!("\ncluster messages on topic \"demo.chat\":");
    let mut inboxes = Vec::new();
    for m in members {
        inboxes.push(m.topic::<Chat>("demo.chat")?.subscribe());
    }
    for (i, m) in members.iter().enumerate() {
        let from = m.cluster().local_member().id.to_string();
        let text = format!("hello from {from}");
        m.topic::<Chat>("demo.chat")?
            .publish(&Chat {
                from: from.clone(),
                text,
            })
            .await?;
        for (j, inbox) in inboxes.iter_mut().enumerate() {
            if i == j {
                continue; // the publisher does not hear itself
            }
            let got = tokio::time::timeout(Duration::from_secs(5), inbox.recv())
                .await
                .context("a message did not arrive within 5 s")?
                .context("subscription closed")?;
            println!(
                "  {} -> {}: {:?}",
                got.from,
                members[j].cluster().local_member().id,
                got.text
            );
        }
    }

    println!("\na partitioned cache (271 partitions, 1 synchronous backup):");
    let settle = Instant::now();
    // The coordinator (the oldest member, m1) says when no partition is left to move.
    let settled = wait_for(Duration::from_secs(20), || {
        let status = m1.runtime().coordinator_status();
        status.active
            && status.settled
            && m1.runtime().table().members().len() == 3
            && members
                .iter()
                .all(|m| m.runtime().table().version() == m1.runtime().table().version())
    })
    .await;
    if !settled {
        bail!("partitions did not settle on 3 members within 20 s");
    }
    let table = m1.runtime().table();
    let owned: Vec<String> = table
        .primaries_per_member()
        .iter()
        .map(|(m, n)| format!("{m} owns {n}"))
        .collect();
    println!(
        "  partitions spread in {} ms: {}",
        settle.elapsed().as_millis(),
        owned.join(", ")
    );
    let users = m1.cache::<u32, String>("users").await?;
    let t = Instant::now();
    for i in 0..1000u32 {
        users.put(&i, &format!("user {i}")).await?;
    }
    println!("  m1 wrote 1000 entries in {} ms", t.elapsed().as_millis());
    let on_m2 = m2.cache::<u32, String>("users").await?;
    println!(
        "  m2 reads key 42: {:?}; the cache holds {} entries",
        on_m2.get(&42).await?,
        on_m2.len().await?
    );

    cache_features(&m1, &m2, &m3).await?;

    println!("\nkilling m3 abruptly (no goodbye; its socket goes silent)...");
    let mut watchers = Vec::new();
    for m in [&m1, &m2] {
        let mut events = m.cluster().events();
        let me = m.cluster().local_member().id.clone();
        watchers.push(tokio::spawn(async move {
            let start = Instant::now();
            while let Some(e) = events.recv().await {
                if let MemberEvent::Failed(f) = &e {
                    if &*f.id == "m3" {
                        return Some((me, start.elapsed()));
                    }
                }
            }
            None
        }));
    }
    m3.kill();
    for w in watchers {
        match tokio::time::timeout(Duration::from_secs(10), w).await {
            Ok(Ok(Some((me, took)))) => {
                println!("  {me} saw m3 fail after {:.2} s", took.as_secs_f64())
            }
            _ => bail!("m3's failure was not detected within 10 s"),
        }
    }

    let mut missing = 0;
    for i in 0..1000u32 {
        if users.get(&i).await? != Some(format!("user {i}")) {
            missing += 1;
        }
    }
    println!(
        "  after m3's death, m1 reads back all 1000 entries: {} missing (backups took over)",
        missing
    );
    if missing > 0 {
        bail!("entries lost");
    }

    println!("\nm2 leaves gracefully (it hands its partitions to m1 first)...");
    let mut events = m1.cluster().events();
    let start = Instant::now();
    let watcher = tokio::spawn(async move {
        while let Some(e) = events.recv().await {
            if let MemberEvent::Left(l) = &e {
                if &*l.id == "m2" {
                    return Some(start.elapsed());
                }
            }
        }
        None
    });
    m2.shutdown().await;
    let Ok(Ok(Some(took))) = tokio::time::timeout(Duration::from_secs(5), watcher).await else {
        bail!("m2's departure was not seen within 5 s");
    };
    println!(
        "  m1 saw m2 leave after {} ms; members now: {}",
        took.as_millis(),
        m1.cluster()
            .members()
            .iter()
            .map(|m| m.id.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut missing = 0;
    for i in 0..1000u32 {
        if users.get(&i).await? != Some(format!("user {i}")) {
            missing += 1;
        }
    }
    println!(
        "  m1, alone now, holds {} entries; {} missing",
        users.len().await?,
        missing
    );
    if missing > 0 {
        bail!("entries lost");
    }
    m1.shutdown().await;
    println!("\ndone in {:.1} s", t0.elapsed().as_secs_f64());
    Ok(())
}

/// The cache's features across two members: a near cache kept coherent, listeners, an
/// entry processor run atomically on the owner, a loader that runs once. (`m3` only
/// registers the processor: the key's owner may be any member.)
async fn cache_features(m1: &Grid, m2: &Grid, m3: &Grid) -> anyhow::Result<()> {
    let near = CacheSettings::builder().near().build();
    let prices1 = m1
        .cache::<String, u64>("prices")
        .settings(near.clone())
        .await?;
    let prices2 = m2.cache::<String, u64>("prices").settings(near).await?;
    let mut events = prices2.listen().await;
    prices1.put(&"apple".into(), &3).await?;
    prices2.get(&"apple".into()).await?; // m2 now holds a near copy
    let t = Instant::now();
    prices1.put(&"apple".into(), &4).await?;
    while !matches!(
        events.recv().await,
        Some(CacheEvent::Updated { value: 4, .. })
    ) {}
    println!(
        "  near cache: m1 changed a price m2 had copied; m2 heard of it after {} µs and reads {:?}",
        t.elapsed().as_micros(),
        prices2.get(&"apple".into()).await?
    );

    // A processor runs on the key's owner: every member registers it.
    let mut counters = Vec::new();
    for m in [m1, m2, m3] {
        let c = m.cache::<String, u64>("counters").await?;
        c.register_processor("incr", |entry, by: u64| {
            let next = entry.value().copied().unwrap_or(0) + by;
            entry.set_value(next);
            next
        });
        counters.push(c);
    }
    counters.truncate(2);
    let visits = "visits".to_string();
    let runs = counters.iter().flat_map(|c| {
        let visits = &visits;
        (0..100).map(move |_| c.execute_on_key::<u64, u64>(visits, "incr", &1))
    });
    futures::future::try_join_all(runs).await?;
    println!(
        "  entry processor: 200 concurrent increments from two members: visits = {:?}",
        counters[0].get(&"visits".into()).await?
    );

    let loads = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let mut squares = Vec::new();
    for m in [m1, m2] {
        let loads = loads.clone();
        squares.push(
            m.cache::<u64, u64>("squares")
                .loader(move |k: u64| {
                    loads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    async move { Ok::<_, String>(Some(k * k)) }
                })
                .await?,
        );
    }
    let gets = squares
        .iter()
        .flat_map(|c| (0..20).map(move |_| c.get(&12)));
    let values = futures::future::try_join_all(gets).await?;
    println!(
        "  read-through: 40 concurrent misses on two members got {:?}; the loader ran {} time(s)",
        values[0],
        loads.load(std::sync::atomic::Ordering::Relaxed)
    );
    Ok(())
}
