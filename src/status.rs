//! `grid status`: joins the cluster as a lite member, with the configuration a member uses
//! (the same file and `GRID_*` variables: seeds, TLS files or secret, cluster name), prints
//! what it sees, and leaves.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use grid::{Grid, GridConfig};
use serde::Serialize;

/// `grid status`'s arguments.
#[derive(clap::Args, Debug)]
pub(crate) struct StatusArgs {
    /// TOML configuration file, as for `grid node` (GRID_* variables override it).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Print JSON (one object; one per line with --watch) instead of tables.
    #[arg(long)]
    json: bool,
    /// Refresh every SECONDS (default 2) until Ctrl-C.
    #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "2")]
    watch: Option<f64>,
    /// Seconds to wait for a seed to answer (and for the partition table) before giving up.
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
    timeout: f64,
}

/// What `grid status` prints.
#[derive(Debug, Serialize)]
struct Report {
    cluster: String,
    /// Version of the partition table, as the status member received it.
    table_version: u64,
    partitions: u32,
    /// The member coordinating the table (the oldest data member), if it answered.
    coordinator: Option<String>,
    /// Migrations waiting or under way, as the coordinator reports them.
    migrations_in_flight: Option<u64>,
    members: Vec<MemberReport>,
    /// Why cache sizes are missing, if they are.
    caches_error: Option<String>,
}

#[derive(Debug, Serialize)]
struct MemberReport {
    id: String,
    addr: SocketAddr,
    /// `data`, or `lite` (holds no data).
    role: &'static str,
    /// `alive` (only live members are listed; a member that failed or left is gone).
    state: &'static str,
    generation: u64,
    age_seconds: u64,
    attributes: BTreeMap<String, String>,
    /// The table version the member routes by (from its own status).
    table_version: Option<u64>,
    partitions_owned: usize,
    partitions_backup: usize,
    /// Entries per cache on this member.
    caches: BTreeMap<String, u64>,
    /// Why the member's own status is missing, if it is.
    error: Option<String>,
}

pub(crate) async fn run(args: StatusArgs) -> anyhow::Result<()> {
    let timeout = Duration::from_secs_f64(args.timeout.max(0.1));
    let mut config = GridConfig::load(args.config.as_deref())?;
    if config.network.seeds.is_empty() && !config.multicast.enabled {
        bail!("no seeds (network.seeds, GRID_SEEDS) and no multicast: no member to ask");
    }
    let cluster = config.cluster_name.clone();
    let seeds = config.network.seeds.join(", ");
    // A lite member on a port of its own, with the member's identity settings.
    config.member_id = Some(format!("status-{}", crate::random_member_id()));
    config.network.bind = SocketAddr::new(config.network.bind.ip(), 0);
    config.network.port_auto_increment = 0;
    config.network.advertise = None;
    config.network.bulk_endpoint = false;
    config.metrics.listen = None;
    config
        .attributes
        .insert("data".to_string(), "false".to_string());
    // It must not give up on the seeds before the timeout does.
    config.membership.join_timeout_ms = (timeout.as_millis() as u64).saturating_mul(2);
    let grid = Grid::start(config)
        .await
        .context("cannot start the status member")?;
    let result = watch(&grid, &args, timeout, &cluster, &seeds).await;
    grid.shutdown().await;
    result
}

async fn watch(
    grid: &Grid,
    args: &StatusArgs,
    timeout: Duration,
    cluster: &str,
    seeds: &str,
) -> anyhow::Result<()> {
    if !grid
        .cluster()
        .wait_until(timeout, |members| members.len() > 1)
        .await
    {
        bail!(
            "no member of cluster {cluster:?} answered within {:.1} s (seeds: {seeds}); is it up, \
             and do the cluster name and TLS settings match its members'?",
            timeout.as_secs_f64()
        );
    }
    // Lite members get the table from the coordinator (without it, report version 0); then
    // gossip brings the members the table names, which the first seed may not have yet.
    let deadline = tokio::time::Instant::now() + timeout;
    let mut table = grid.runtime().watch_table();
    let _ = tokio::time::timeout_at(deadline, table.wait_for(|t| t.version() > 0)).await;
    let wanted: Vec<_> = grid.runtime().table().members().to_vec();
    let _ = grid
        .cluster()
        .wait_until(
            deadline.saturating_duration_since(tokio::time::Instant::now()),
            |members| wanted.iter().all(|w| members.iter().any(|m| m.id == *w)),
        )
        .await;
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    loop {
        let report = collect(grid, cluster).await;
        if args.json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            if args.watch.is_some() {
                print!("\x1b[2J\x1b[H"); // clear the screen
            }
            print!("{}", render(&report));
        }
        let Some(every) = args.watch else {
            return Ok(());
        };
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs_f64(every.max(0.1))) => {}
            _ = interrupt.recv() => return Ok(()),
        }
    }
}

async fn collect(grid: &Grid, cluster: &str) -> Report {
    let me = grid.cluster().local_member().id.clone();
    let members: Vec<_> = grid
        .cluster()
        .members()
        .iter()
        .filter(|m| m.id != me)
        .cloned()
        .collect();
    let table = grid.runtime().table();
    let mut owned: BTreeMap<String, usize> = BTreeMap::new();
    let mut backups: BTreeMap<String, usize> = BTreeMap::new();
    for p in 0..table.partitions() {
        for (rank, r) in table.replicas(p).enumerate() {
            let count = if rank == 0 { &mut owned } else { &mut backups };
            *count.entry(r.to_string()).or_default() += 1;
        }
    }
    let statuses =
        futures::future::join_all(members.iter().map(|m| grid.member_status(&m.id))).await;
    let (sizes, caches_error) = match grid.cache_sizes().await {
        Ok(s) => (s, None),
        Err(e) => (Vec::new(), Some(e.to_string())),
    };
    let now_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64);
    let mut coordinator = None;
    let mut migrations_in_flight = None;
    let mut reports = Vec::new();
    for (m, status) in members.iter().zip(statuses) {
        let id = m.id.to_string();
        let (table_version, error) = match status {
            Ok(s) => {
                if s.coordinator.active {
                    coordinator = Some(id.clone());
                    migrations_in_flight = Some(s.coordinator.stats.in_flight);
                }
                (Some(s.table_version), None)
            }
            Err(e) => (None, Some(e.to_string())),
        };
        let caches = sizes
            .iter()
            .find(|s| s.member == id)
            .and_then(|s| s.sizes.as_ref().ok())
            .map(|v| v.iter().cloned().collect())
            .unwrap_or_default();
        reports.push(MemberReport {
            addr: m.addr,
            role: if m.is_data_member() { "data" } else { "lite" },
            state: "alive",
            generation: m.generation,
            age_seconds: now_us.saturating_sub(m.generation) / 1_000_000,
            attributes: m.attributes.clone(),
            table_version,
            partitions_owned: owned.get(&id).copied().unwrap_or(0),
            partitions_backup: backups.get(&id).copied().unwrap_or(0),
            caches,
            error,
            id,
        });
    }
    Report {
        cluster: cluster.to_string(),
        table_version: table.version(),
        partitions: table.partitions(),
        coordinator,
        migrations_in_flight,
        members: reports,
        caches_error,
    }
}

fn age(seconds: u64) -> String {
    match seconds {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{}s", s / 60, s % 60),
        s => format!("{}h{}m", s / 3600, s % 3600 / 60),
    }
}

/// Left-aligned columns.
fn columns(rows: &[Vec<String>]) -> String {
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..n)
        .map(|i| {
            rows.iter()
                .map(|r| r.get(i).map_or(0, |c| c.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn render(r: &Report) -> String {
    let mut out = format!(
        "cluster {:?}: {} members, table version {}, {} partitions, coordinator {}, {} migrations in flight\n\n",
        r.cluster,
        r.members.len(),
        r.table_version,
        r.partitions,
        r.coordinator.as_deref().unwrap_or("unknown"),
        r.migrations_in_flight
            .map_or_else(|| "?".to_string(), |n| n.to_string()),
    );
    let mut rows = vec![[
        "MEMBER",
        "ADDRESS",
        "ROLE",
        "STATE",
        "GENERATION",
        "AGE",
        "OWNED",
        "BACKUPS",
        "TABLE",
        "ATTRIBUTES",
    ]
    .map(String::from)
    .to_vec()];
    for m in &r.members {
        rows.push(vec![
            m.id.clone(),
            m.addr.to_string(),
            m.role.to_string(),
            m.state.to_string(),
            m.generation.to_string(),
            age(m.age_seconds),
            m.partitions_owned.to_string(),
            m.partitions_backup.to_string(),
            m.table_version
                .map_or_else(|| "?".to_string(), |v| v.to_string()),
            m.attributes
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(","),
        ]);
    }
    out.push_str(&columns(&rows));
    for m in r.members.iter().filter(|m| m.error.is_some()) {
        out.push_str(&format!(
            "  {}: no status: {}\n",
            m.id,
            m.error.as_deref().unwrap_or_default()
        ));
    }
    let names: std::collections::BTreeSet<&String> =
        r.members.iter().flat_map(|m| m.caches.keys()).collect();
    if let Some(e) = &r.caches_error {
        out.push_str(&format!("\ncaches: unknown ({e})\n"));
    } else if names.is_empty() {
        out.push_str("\ncaches: none\n");
    } else {
        out.push_str("\nentries per cache and member:\n");
        let mut header = vec!["CACHE".to_string()];
        header.extend(r.members.iter().map(|m| m.id.clone()));
        header.push("TOTAL".to_string());
        let mut rows = vec![header];
        for name in names {
            let mut row = vec![name.clone()];
            let mut total = 0;
            for m in &r.members {
                let n = m.caches.get(name).copied().unwrap_or(0);
                total += n;
                row.push(n.to_string());
            }
            row.push(total.to_string());
            rows.push(row);
        }
        out.push_str(&columns(&rows));
    }
    out
}
