//! The rebalancing harness: how a cluster moves its partitions when members come and go,
//! while a load generator keeps reading and writing.
//!
//! It starts `--members` members in this process, loads `--entries` entries of
//! `--value-size` bytes through a cache, starts the load, then adds (`--add`), kills
//! abruptly (`--kill`) or shuts down gracefully (`--shutdown`) members, waits until the
//! coordinator has no migration left, stops the load and reads every key back.
//!
//! With `--processes` every member is a separate `grid node` process instead (the `grid`
//! binary next to this one, or `--grid-bin`), started from a generated configuration file;
//! the harness then joins the cluster as a lite member that runs the load and the read-back
//! and watches the members through their status route. A kill is `SIGKILL`, a shutdown
//! `SIGINT` (the member hands its partitions off, then exits).
//!
//! ```sh
//! cargo run --release -p grid-bench --bin rebalance -- --members 4 --add 1 --entries 10000 \
//!     --value-size 1024 --partitions 1999 --json
//! cargo build --release --bin grid && cargo run --release -p grid-bench --bin rebalance -- \
//!     --processes --members 5 --kill 1 --json
//! ```
//!
//! With `--json` the last line is one JSON object (fields in `Report`). The figure
//! `quinn_bulk_mb_per_s` is a raw quinn single-stream bulk transfer measured in the same
//! run, the reference for `migration_mb_per_s`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use futures::StreamExt;
use std::net::SocketAddr;

/// The allocator a service embedding grid would pick (as in the `ops` bench): under glibc's
/// malloc, operations' threads waited on its arena locks behind the copy's idle-class
/// threads during a rebalance (BENCHMARKS.md).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's transparent huge pages, off unless the environment says otherwise: the new
/// member's partitions are fresh memory, and with them on the copy moved at 240–307 MB/s
/// (6 runs) instead of 301–699 (12 runs; BENCHMARKS.md). mimalloc reads the setting once, before `main`, so
/// the harness runs itself again with it set.
#[cfg(all(feature = "mimalloc", target_os = "linux"))]
fn without_transparent_huge_pages() -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    const VAR: &str = "MIMALLOC_ALLOW_THP";
    if std::env::var_os(VAR).is_some() {
        return Ok(());
    }
    let exe = std::env::current_exe().context("locating the harness binary")?;
    let error = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env(VAR, "0")
        .exec();
    Err(error).context("running the harness again with MIMALLOC_ALLOW_THP=0")
}

use grid::MemberStatus;
use grid::{BulkPriority, Grid, GridConfig};
use grid_bench::{percentile, settled};
use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_bytes::ByteBuf;

#[derive(Parser, Debug)]
struct Args {
    /// Members at the start.
    #[arg(long, default_value_t = 4)]
    members: usize,
    /// Members to add.
    #[arg(long, default_value_t = 0)]
    add: usize,
    /// Members to kill abruptly, all at once.
    #[arg(long, default_value_t = 0)]
    kill: usize,
    /// Members to shut down gracefully, one after the other.
    #[arg(long, default_value_t = 0)]
    shutdown: usize,
    /// Entries loaded before the change.
    #[arg(long, default_value_t = 10_000)]
    entries: u64,
    /// Value size in bytes.
    #[arg(long, default_value_t = 1024)]
    value_size: usize,
    /// Partition count.
    #[arg(long, default_value_t = 271)]
    partitions: u32,
    /// Synchronous backups.
    #[arg(long, default_value_t = 1)]
    backups: u8,
    /// Concurrent load-generator tasks during the change.
    #[arg(long, default_value_t = 16)]
    load_tasks: usize,
    /// Operations per second of the whole load generator, spread evenly over its tasks
    /// (0: every task runs its next operation as soon as the last one ends, which on a small
    /// machine takes all the CPU the copies do not).
    #[arg(long, default_value_t = 0)]
    load_rate: u64,
    /// Largest UDP payload QUIC may grow packets to (the member's `network.max_udp_payload`).
    #[arg(long, default_value_t = 8952)]
    max_udp_payload: u16,
    /// Copies share the members' one QUIC port instead of a lower-priority second one
    /// (the member's `network.bulk_endpoint = false`).
    #[arg(long)]
    no_bulk_endpoint: bool,
    /// How the threads that copy partitions are scheduled: idle, nice or normal (the
    /// member's `network.bulk_priority`).
    #[arg(long, default_value = "idle")]
    bulk_priority: BulkPriority,
    /// Call `grid::keep_freed_memory` in this process (in-process members only): glibc keeps
    /// freed memory for reuse.
    #[arg(long)]
    keep_freed_memory: bool,
    /// Receive and send buffer of the members' UDP sockets in bytes, 0 for the OS default
    /// (the member's `network.socket_buffer`).
    #[arg(long, default_value_t = 4 << 20)]
    socket_buffer: usize,
    /// Partition copies at once.
    #[arg(long, default_value_t = 8)]
    parallel: usize,
    /// Seed of the load generator's key choice (printed; random if absent).
    #[arg(long)]
    seed: Option<u64>,
    /// Write every operation started during the change to this file, one line each:
    /// milliseconds since the change began, latency in microseconds, `get` or `put`.
    #[arg(long)]
    latency_log: Option<std::path::PathBuf>,
    /// Skip the raw quinn bulk-transfer reference.
    #[arg(long)]
    no_reference: bool,
    /// Run every member as a separate `grid node` process (the harness joins as a lite
    /// member for the load).
    #[arg(long)]
    processes: bool,
    /// The `grid` binary for `--processes` (default: next to this one; build it with
    /// `cargo build --release --bin grid`).
    #[arg(long)]
    grid_bin: Option<std::path::PathBuf>,
    /// Print one JSON object as the last line.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct Report {
    migrations: u64,
    rebalance_ms: f64,
    entries_moved: u64,
    entries_moved_ideal: u64,
    bytes_moved: u64,
    ops_ok: u64,
    ops_failed: u64,
    entries_lost: u64,
    p50_us_before: f64,
    p99_us_before: f64,
    p50_us_during: f64,
    p99_us_during: f64,
    max_primaries_per_member: usize,
    min_primaries_per_member: usize,
    /// The first partition copy's start to the last one's end.
    copying_ms: f64,
    /// Bytes moved over `copying_ms`: the migration data rate.
    migration_mb_per_s: f64,
    /// Bytes moved over `rebalance_ms` (which also counts finding the new member and
    /// settling the table).
    rebalance_mb_per_s: f64,
    quinn_bulk_mb_per_s: f64,
    seed: u64,
}

/// The value of `key`: `size` bytes, encoded as MessagePack binary (not as an array of
/// numbers, which is what a plain `Vec<u8>` becomes).
fn value_for(key: u64, size: usize) -> ByteBuf {
    let mut v = vec![(key % 251) as u8; size];
    if size >= 8 {
        v[..8].copy_from_slice(&key.to_le_bytes());
    }
    ByteBuf::from(v)
}

/// The configuration of member `i` (member `i > 0` seeded with `seed`).
fn member_config(args: &Args, i: usize, seed: Option<SocketAddr>) -> GridConfig {
    let mut b = Grid::builder()
        .cluster_name("rebalance")
        .member_id(format!("m{i}"))
        .secret("rebalance harness")
        .bind("127.0.0.1:0")
        .partitions(args.partitions)
        .backups(args.backups)
        .op_timeout(Duration::from_secs(30));
    b = match seed {
        Some(s) => b.seed(s),
        None => b.no_seeds(),
    };
    let mut config = b.build_config().clone();
    config.partitions.max_parallel_migrations = args.parallel;
    config.network.max_udp_payload = args.max_udp_payload;
    config.network.bulk_endpoint = !args.no_bulk_endpoint;
    config.network.bulk_priority = args.bulk_priority;
    config.network.socket_buffer = args.socket_buffer;
    config
}

/// How `grid node` starts the line with its status as it leaves (src/main.rs).
const LEFT_PREFIX: &str = "left: ";

/// A member under test: in this process, or a `grid node` child process.
enum Member {
    InProcess(Grid),
    Process {
        id: String,
        child: Box<tokio::process::Child>,
        /// The status the member prints as it leaves (after a graceful shutdown).
        last_words: tokio::sync::watch::Receiver<Option<MemberStatus>>,
    },
}

/// The members under test, and the member this harness talks to the cluster through: the
/// first member in-process, a lite member of its own with `--processes`.
struct Cluster {
    members: Vec<Member>,
    client: Grid,
    /// Members the client counts besides the members under test (itself, when lite).
    extra: usize,
    seed_addr: SocketAddr,
}

impl Cluster {
    async fn start(args: &Args) -> anyhow::Result<Self> {
        if !args.processes {
            let first = Grid::start(member_config(args, 0, None)).await?;
            let seed_addr = first.addr();
            let mut members = vec![Member::InProcess(first.clone())];
            for i in 1..args.members {
                let config = member_config(args, i, Some(seed_addr));
                members.push(Member::InProcess(Grid::start(config).await?));
            }
            return Ok(Self {
                members,
                client: first,
                extra: 0,
                seed_addr,
            });
        }
        let (first, seed_addr) = spawn_member(args, 0, None).await?;
        let mut members = vec![first];
        for i in 1..args.members {
            members.push(spawn_member(args, i, Some(seed_addr)).await?.0);
        }
        let mut config = member_config(args, 0, Some(seed_addr));
        config.member_id = Some("harness".to_string());
        config.attributes.insert("data".into(), "false".into());
        let client = Grid::start(config).await?;
        Ok(Self {
            members,
            client,
            extra: 1,
            seed_addr,
        })
    }

    async fn add(&mut self, args: &Args) -> anyhow::Result<()> {
        let i = self.members.len();
        let member = if args.processes {
            spawn_member(args, i, Some(self.seed_addr)).await?.0
        } else {
            let config = member_config(args, i, Some(self.seed_addr));
            Member::InProcess(Grid::start(config).await?)
        };
        self.members.push(member);
        Ok(())
    }

    /// The grid a load task or reader `t` uses.
    fn grid_for(&self, t: usize, among: usize) -> &Grid {
        match &self.members[t % among] {
            Member::InProcess(g) => g,
            Member::Process { .. } => &self.client,
        }
    }

    async fn status(&self, member: &Member, reset: bool) -> anyhow::Result<MemberStatus> {
        Ok(match member {
            Member::InProcess(g) => {
                let me = g.cluster().local_member().id.clone();
                g.runtime().member_status(&me, reset).await?
            }
            Member::Process { id, .. } => self.client.runtime().member_status(id, reset).await?,
        })
    }

    /// The statuses of `members` (those that answer).
    async fn statuses(&self, members: &[Member], reset: bool) -> Vec<MemberStatus> {
        let mut out = Vec::new();
        for m in members {
            if let Ok(s) = self.status(m, reset).await {
                out.push(s);
            }
        }
        out
    }

    /// Whether every member sees `n` members (plus the harness) and applied the
    /// coordinator's settled table.
    async fn settled(&self, n: usize, timeout: Duration) -> bool {
        if !matches!(self.members.first(), Some(Member::Process { .. })) {
            let grids: Vec<Grid> = self
                .members
                .iter()
                .filter_map(|m| match m {
                    Member::InProcess(g) => Some(g.clone()),
                    Member::Process { .. } => None,
                })
                .collect();
            return settled(&grids, n, timeout).await;
        }
        let deadline = Instant::now() + timeout;
        let mut last = Vec::new();
        while Instant::now() < deadline {
            let statuses = self.statuses(&self.members, false).await;
            if let Some(c) = statuses.iter().find(|s| s.coordinator.active) {
                if c.coordinator.settled
                    && c.table_members == n
                    && statuses.len() == n
                    && statuses.iter().all(|s| {
                        s.table_version == c.table_version && s.cluster_members == n + self.extra
                    })
                    && self.client.runtime().table().version() == c.table_version
                {
                    return true;
                }
            }
            last = statuses;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let seen: Vec<String> = last
            .iter()
            .map(|s| {
                format!(
                    "{} (table v{} of {} members, sees {}, coordinator {}{})",
                    s.member,
                    s.table_version,
                    s.table_members,
                    s.cluster_members,
                    s.coordinator.active,
                    if s.coordinator.settled {
                        ", settled"
                    } else {
                        ""
                    }
                )
            })
            .collect();
        eprintln!(
            "not settled after {timeout:?}: harness table v{}; {} statuses: {}",
            self.client.runtime().table().version(),
            last.len(),
            seen.join(", ")
        );
        false
    }
}

impl Member {
    /// What a departed member copied: read in-process, or the status a process printed as
    /// it left (a killed process printed none).
    async fn final_status(&mut self) -> Option<MemberStatus> {
        match self {
            Self::InProcess(g) => Some(g.runtime().status()),
            Self::Process {
                child, last_words, ..
            } => {
                // Its output is read to the end once it exited.
                let _ = child.wait().await;
                let _ = tokio::time::timeout(Duration::from_secs(5), last_words.changed()).await;
                last_words.borrow().clone()
            }
        }
    }

    fn kill(&mut self) -> anyhow::Result<()> {
        match self {
            Self::InProcess(g) => g.kill(),
            Self::Process { child, .. } => child.start_kill()?,
        }
        Ok(())
    }

    async fn shutdown(&mut self) -> anyhow::Result<()> {
        match self {
            Self::InProcess(g) => g.shutdown().await,
            Self::Process { id, child, .. } => {
                let pid = child
                    .id()
                    .and_then(|p| rustix::process::Pid::from_raw(p as i32))
                    .context("the member already exited")?;
                rustix::process::kill_process(pid, rustix::process::Signal::INT)?;
                // A handoff of this harness's sizes takes seconds; past this, it is stuck.
                let status =
                    match tokio::time::timeout(Duration::from_secs(300), child.wait()).await {
                        Ok(status) => status?,
                        Err(_) => {
                            child.start_kill()?;
                            bail!("member {id} did not leave within 300 s of SIGINT (killed)");
                        }
                    };
                if !status.success() {
                    bail!("member {id} exited with {status}");
                }
            }
        }
        Ok(())
    }
}

/// Starts member `i` as a `grid node` process; returns it and its address (from the line
/// the node prints once it listens).
async fn spawn_member(
    args: &Args,
    i: usize,
    seed: Option<SocketAddr>,
) -> anyhow::Result<(Member, SocketAddr)> {
    use tokio::io::AsyncBufReadExt;
    let bin = match &args.grid_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()?.with_file_name("grid"),
    };
    if !bin.exists() {
        bail!(
            "{} not found: build it with `cargo build --release --bin grid` (or pass --grid-bin)",
            bin.display()
        );
    }
    let config_file =
        std::env::temp_dir().join(format!("grid-rebalance-{}-m{i}.toml", std::process::id()));
    // A new file (an existing one, or a link planted under that name, is an error).
    let text = toml::to_string(&member_config(args, i, seed))?;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&config_file)
        .and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes()))
        .with_context(|| format!("writing {}", config_file.display()))?;
    let mut command = tokio::process::Command::new(&bin);
    // The configuration file says it all: GRID_* variables of this shell would override it
    // (GRID_MEMBER_ID would give every member the same id).
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_some_and(|n| n.starts_with("GRID_")) {
            command.env_remove(name);
        }
    }
    command
        .arg("node")
        .arg("--config")
        .arg(&config_file)
        .env(
            "GRID_LOG",
            std::env::var("GRID_LOG").unwrap_or("warn".into()),
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true);
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe calls are allowed; it makes one `prctl` system call (no allocation,
    // no lock) and touches nothing of the parent's state.
    unsafe {
        command.pre_exec(|| {
            // A member outlives nothing: if this harness dies (even by SIGKILL, where
            // `kill_on_drop` cannot act), its members are killed too.
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
                .map_err(std::io::Error::from)
        });
    }
    let child = command
        .spawn()
        .with_context(|| format!("starting {}", bin.display()));
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            let _ = std::fs::remove_file(&config_file);
            return Err(e);
        }
    };
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let addr = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await? {
            // "member m0 listening on 127.0.0.1:40123 (cluster …); Ctrl-C to leave"
            if let Some(rest) = line.split(" listening on ").nth(1) {
                let addr = rest.split_whitespace().next().unwrap_or_default();
                return Ok(addr.parse::<SocketAddr>()?);
            }
        }
        bail!("member m{i} exited before listening")
    })
    .await
    .context("member did not start within 30 s");
    // The member has read its configuration (or failed).
    let _ = std::fs::remove_file(&config_file);
    let addr = addr??;
    // Keep reading what it prints (so that it never blocks on a full pipe), for the status
    // it prints as it leaves.
    let (tx, last_words) = tokio::sync::watch::channel(None);
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(json) = line.strip_prefix(LEFT_PREFIX) {
                let _ = tx.send(serde_json::from_str(json).ok());
            }
        }
    });
    Ok((
        Member::Process {
            id: format!("m{i}"),
            child: Box::new(child),
            last_words,
        },
        addr,
    ))
}

/// Raw quinn: one stream carrying `total` bytes in 1 MiB writes, in this process.
async fn quinn_bulk_mb_per_s(total: usize) -> anyhow::Result<f64> {
    let server_id = grid_net::tls::Identity::from_secret(b"bulk", "server")?;
    let client_id = grid_net::tls::Identity::from_secret(b"bulk", "client")?;
    let server_cfg = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(server_id.server_config()?)?,
    ));
    let server = quinn::Endpoint::server(server_cfg, "127.0.0.1:0".parse()?)?;
    let addr = server.local_addr()?;
    let receiver = tokio::spawn(async move {
        let conn = server.accept().await.context("no connection")?.await?;
        let mut recv = conn.accept_uni().await?;
        let mut got = 0usize;
        while let Some(chunk) = recv.read_chunk(usize::MAX, true).await? {
            got += chunk.bytes.len();
        }
        anyhow::Ok(got)
    });
    let mut client = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    client.set_default_client_config(quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(client_id.client_config()?)?,
    )));
    let conn = client.connect(addr, "grid.member")?.await?;
    let start = Instant::now();
    let mut send = conn.open_uni().await?;
    let chunk = bytes::Bytes::from(vec![7u8; 1 << 20]);
    let mut sent = 0;
    while sent < total {
        send.write_chunk(chunk.clone()).await?;
        sent += chunk.len();
    }
    send.finish()?;
    let got = receiver.await??;
    let secs = start.elapsed().as_secs_f64();
    anyhow::ensure!(got == sent, "bulk transfer lost bytes");
    Ok(got as f64 / secs / 1e6)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    #[cfg(all(feature = "mimalloc", target_os = "linux"))]
    without_transparent_huge_pages()?;
    if args.keep_freed_memory {
        grid::keep_freed_memory();
    }
    // Members' logs on stderr when RUST_LOG asks (e.g. RUST_LOG=grid_core=warn).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .try_init();
    if args.kill > 0 && args.kill > args.backups as usize {
        eprintln!(
            "note: killing {} members with {} backups can lose data (that is what it measures)",
            args.kill, args.backups
        );
    }
    if args.kill + args.shutdown >= args.members {
        bail!("keep at least one member");
    }
    let seed = args.seed.unwrap_or_else(rand::random);
    eprintln!("seed {seed}");

    // Members.
    let mut cluster = Cluster::start(&args).await?;
    if !cluster.settled(args.members, Duration::from_secs(60)).await {
        bail!("the cluster did not settle");
    }

    // Data.
    let bar = ProgressBar::new(args.entries).with_style(
        ProgressStyle::with_template("loading {bar:40} {pos}/{len} entries ({per_sec})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let next = Arc::new(AtomicU64::new(0));
    let loading = Instant::now();
    let mut loaders = Vec::new();
    for t in 0..64 {
        let cache = cluster
            .grid_for(t, args.members)
            .cache::<u64, ByteBuf>("data")
            .await?;
        let (next, bar, size, entries) = (next.clone(), bar.clone(), args.value_size, args.entries);
        loaders.push(tokio::spawn(async move {
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= entries {
                    return anyhow::Ok(());
                }
                cache.set(&k, &value_for(k, size)).await?;
                bar.inc(1);
            }
        }));
    }
    for l in loaders {
        l.await??;
    }
    bar.finish_and_clear();
    eprintln!(
        "loaded {} entries in {:.1} s",
        args.entries,
        loading.elapsed().as_secs_f64()
    );

    // Load generator: reads and rewrites (with the same value, so that every key's final
    // value is known) random keys; latencies go to the phase they started in.
    let stop = Arc::new(AtomicBool::new(false));
    let during = Arc::new(AtomicBool::new(false));
    let before_lat: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let during_lat: Arc<Mutex<Vec<(Instant, Duration, bool)>>> = Arc::default();
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    // Load runs on members that stay.
    let stayers = args.members - args.kill - args.shutdown;
    let mut load = Vec::new();
    for t in 0..args.load_tasks {
        let cache = cluster
            .grid_for(t, stayers)
            .cache::<u64, ByteBuf>("data")
            .await?;
        let (stop, during, bl, dl, ok, failed) = (
            stop.clone(),
            during.clone(),
            before_lat.clone(),
            during_lat.clone(),
            ok.clone(),
            failed.clone(),
        );
        let (entries, size) = (args.entries, args.value_size);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(t as u64));
        // Paced: this task's share of the rate, on a fixed schedule (a late operation does
        // not push the later ones back), started at a random offset.
        let interval = (args.load_rate > 0)
            .then(|| Duration::from_secs_f64(args.load_tasks as f64 / args.load_rate as f64));
        let mut next_at = tokio::time::Instant::now()
            + interval.map_or(Duration::ZERO, |i| i.mul_f64(rng.gen::<f64>()));
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if let Some(i) = interval {
                    tokio::time::sleep_until(next_at).await;
                    next_at += i;
                }
                let k = rng.gen_range(0..entries);
                let phase_during = during.load(Ordering::Relaxed);
                let t0 = Instant::now();
                let is_get = rng.gen_bool(0.8);
                let r = if is_get {
                    cache.get(&k).await.map(|_| ())
                } else {
                    cache.put(&k, &value_for(k, size)).await.map(|_| ())
                };
                let took = t0.elapsed();
                match r {
                    Ok(()) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                        if phase_during {
                            dl.lock().unwrap().push((t0, took, is_get))
                        } else {
                            bl.lock().unwrap().push(took)
                        }
                    }
                    Err(e) => {
                        if failed.fetch_add(1, Ordering::Relaxed) < 5 {
                            eprintln!("operation failed: {e}");
                        }
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The change.
    let before = cluster.statuses(&cluster.members, true).await;
    if before.len() != cluster.members.len() {
        eprintln!("warning: a member did not report its status: its copies are not counted");
    }
    let coordinator_before = before
        .iter()
        .find(|s| s.coordinator.active)
        .map(|s| (s.member.clone(), s.coordinator.stats.clone()));
    let moved_before: std::collections::HashMap<String, (u64, u64)> = before
        .iter()
        .map(|s| (s.member.clone(), (s.moved_entries, s.moved_bytes)))
        .collect();
    let members_after = args.members + args.add - args.kill - args.shutdown;
    let replicas = (args.backups as u64 + 1).min(members_after as u64);
    let ideal = if args.add > 0 {
        args.entries * replicas * args.add as u64 / members_after as u64
    } else {
        let gone = (args.kill + args.shutdown) as u64;
        args.entries * replicas * gone / args.members as u64
    };
    eprintln!("changing the membership");
    during.store(true, Ordering::Relaxed);
    let spinner = ProgressBar::new_spinner().with_message("rebalancing");
    spinner.enable_steady_tick(Duration::from_millis(100));
    let t0 = Instant::now();
    let changed_at = t0;
    let mut departed = Vec::new();
    for _ in 0..args.add {
        cluster.add(&args).await?;
    }
    for _ in 0..args.kill {
        let mut m = cluster.members.pop().context("a member to kill")?;
        m.kill()?;
        departed.push(m);
    }
    let mut shutdowns = Vec::new();
    for _ in 0..args.shutdown {
        let mut m = cluster.members.pop().context("a member to shut down")?;
        shutdowns.push(tokio::spawn(async move { m.shutdown().await.map(|()| m) }));
    }
    for s in shutdowns {
        departed.push(s.await??);
    }
    let settled_ok = cluster
        .settled(members_after, Duration::from_secs(600))
        .await;
    let rebalance = t0.elapsed();
    spinner.finish_and_clear();
    if !settled_ok {
        eprintln!("warning: not settled after {rebalance:?}");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for l in load {
        let _ = l.await;
    }

    // Read everything back.
    let reader = cluster.grid_for(0, 1).cache::<u64, ByteBuf>("data").await?;
    let size = args.value_size;
    let lost = futures::stream::iter(0..args.entries)
        .map(|k| {
            let reader = &reader;
            async move {
                match reader.get(&k).await {
                    Ok(Some(v)) if v == value_for(k, size) => 0u64,
                    _ => 1,
                }
            }
        })
        .buffer_unordered(64)
        .fold(0u64, |lost, l| async move { lost + l })
        .await;

    let mut after = cluster.statuses(&cluster.members, false).await;
    if after.len() != cluster.members.len() {
        eprintln!("warning: a member did not report its status: its copies are not counted");
    }
    for m in &mut departed {
        after.extend(m.final_status().await);
    }
    let after = after.iter();
    // Per member, what it copied since the change (a killed process's count is lost with
    // it, but it copies nothing once killed).
    let since = |s: &MemberStatus| {
        let (e, b) = moved_before.get(&s.member).copied().unwrap_or_default();
        (
            s.moved_entries.saturating_sub(e),
            s.moved_bytes.saturating_sub(b),
        )
    };
    let moved: u64 = after.clone().map(|s| since(s).0).sum();
    let bytes: u64 = after.clone().map(|s| since(s).1).sum();
    // Copying window: the first copy's start to the last one's end, over all members.
    let copying = match (
        after.clone().filter_map(|s| s.copy_window_unix_us.0).min(),
        after.clone().filter_map(|s| s.copy_window_unix_us.1).max(),
    ) {
        (Some(first), Some(last)) if last > first => Duration::from_micros(last - first),
        _ => rebalance,
    };
    let coordinator = after
        .clone()
        .find(|s| s.coordinator.active)
        .map(|s| {
            let mut status = s.coordinator.clone();
            // Counters run since the member became coordinator: count this change only.
            if let Some((before_id, before)) = &coordinator_before {
                if *before_id == s.member {
                    status.stats.started -= before.started;
                    status.stats.completed -= before.completed;
                    status.stats.failed -= before.failed;
                }
            }
            status
        })
        .unwrap_or_default();
    let table = cluster.client.runtime().table();
    let primaries = table.primaries_per_member();
    let mut bl = before_lat.lock().unwrap().clone();
    let during_ops = during_lat.lock().unwrap().clone();
    if let Some(path) = &args.latency_log {
        let mut log = String::new();
        for (start, took, is_get) in &during_ops {
            let at = start.saturating_duration_since(changed_at).as_secs_f64() * 1e3;
            let op = if *is_get { "get" } else { "put" };
            log.push_str(&format!("{at:.3} {:.0} {op}\n", took.as_secs_f64() * 1e6));
        }
        std::fs::write(path, log).with_context(|| format!("writing {}", path.display()))?;
    }
    let mut dl: Vec<Duration> = during_ops.iter().map(|(_, took, _)| *took).collect();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let quinn = if args.no_reference {
        0.0
    } else {
        quinn_bulk_mb_per_s(256 << 20).await?
    };
    let report = Report {
        migrations: coordinator.stats.completed,
        rebalance_ms: rebalance.as_secs_f64() * 1e3,
        entries_moved: moved,
        entries_moved_ideal: ideal,
        bytes_moved: bytes,
        ops_ok: ok.load(Ordering::Relaxed),
        ops_failed: failed.load(Ordering::Relaxed),
        entries_lost: lost,
        p50_us_before: us(percentile(&mut bl, 50.0)),
        p99_us_before: us(percentile(&mut bl, 99.0)),
        p50_us_during: us(percentile(&mut dl, 50.0)),
        p99_us_during: us(percentile(&mut dl, 99.0)),
        max_primaries_per_member: primaries.values().copied().max().unwrap_or(0),
        min_primaries_per_member: primaries.values().copied().min().unwrap_or(0),
        copying_ms: copying.as_secs_f64() * 1e3,
        migration_mb_per_s: bytes as f64 / copying.as_secs_f64() / 1e6,
        rebalance_mb_per_s: bytes as f64 / rebalance.as_secs_f64() / 1e6,
        quinn_bulk_mb_per_s: quinn,
        seed,
    };
    println!(
        "members {} -> {} (add {}, kill {}, shutdown {}), {} entries x {} B, P = {}, backups {}",
        args.members,
        members_after,
        args.add,
        args.kill,
        args.shutdown,
        args.entries,
        args.value_size,
        args.partitions,
        args.backups
    );
    println!(
        "  rebalanced in        {:>10.0} ms ({} migrations; {} started, {} failed and retried)",
        report.rebalance_ms, report.migrations, coordinator.stats.started, coordinator.stats.failed
    );
    println!(
        "  entries moved        {:>10} (ideal {}, ratio {:.3})",
        report.entries_moved,
        report.entries_moved_ideal,
        report.entries_moved as f64 / report.entries_moved_ideal.max(1) as f64
    );
    println!(
        "  bytes moved          {:>10} ({:.1} MB/s over {:.0} ms of copying, {:.1} MB/s over the rebalance; raw quinn stream {:.1} MB/s)",
        report.bytes_moved,
        report.migration_mb_per_s,
        report.copying_ms,
        report.rebalance_mb_per_s,
        report.quinn_bulk_mb_per_s
    );
    println!(
        "  operations           {:>10} ok, {} failed",
        report.ops_ok, report.ops_failed
    );
    println!("  entries lost         {:>10}", report.entries_lost);
    println!(
        "  latency p50/p99 µs   before {:.0}/{:.0}, during {:.0}/{:.0}",
        report.p50_us_before, report.p99_us_before, report.p50_us_during, report.p99_us_during
    );
    println!(
        "  primaries per member {}..{} (floor {}, ceil {})",
        report.min_primaries_per_member,
        report.max_primaries_per_member,
        args.partitions as usize / members_after,
        (args.partitions as usize).div_ceil(members_after)
    );
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    for m in cluster.members.iter_mut().chain(departed.iter_mut()) {
        let _ = m.kill();
    }
    cluster.client.kill();
    Ok(())
}
