//! Operating grid (issue 18): the Prometheus endpoint and its documented names, the health
//! probes, `grid status` against `grid node` processes, JSON logs, and the configuration
//! reference that cannot drift from the structs.
//!
//! `BLESS_DOCS=1 cargo test --test operate docs_` rewrites `docs/CONFIG.md`'s and
//! `docs/METRICS.md`'s tables from the code.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

mod common;

use common::process::{grid_command, node_command, spawn_listening};
use grid::{Grid, GridConfig, METRICS};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStderr, ChildStdout};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Checks that `file` holds `table` between its markers (or writes it there with
/// `BLESS_DOCS=1`).
fn check_generated(file: &Path, table: &str) {
    const BEGIN: &str = "<!-- generated: begin -->\n";
    const END: &str = "<!-- generated: end -->";
    let text = std::fs::read_to_string(file).expect("the doc exists");
    let start = text.find(BEGIN).expect("a begin marker") + BEGIN.len();
    let end = text.find(END).expect("an end marker");
    if std::env::var_os("BLESS_DOCS").is_some() {
        let new = format!("{}{table}{}", &text[..start], &text[end..]);
        std::fs::write(file, new).expect("write the doc");
        return;
    }
    assert_eq!(
        &text[start..end],
        table,
        "{} is out of date: run BLESS_DOCS=1 cargo test --test operate docs_",
        file.display()
    );
}

#[test]
fn docs_config_table_matches_the_config_structs() {
    // `REFERENCE` is tested against the structs and `apply_env` in grid-core; this checks
    // that the document shows it.
    check_generated(
        &root().join("docs/CONFIG.md"),
        &grid_core::config::reference_markdown(),
    );
    let documented: Vec<&str> = grid_core::config::REFERENCE
        .iter()
        .filter(|k| !k.key.is_empty())
        .map(|k| k.key)
        .collect();
    assert_eq!(documented, GridConfig::keys());
}

#[test]
fn docs_metrics_table_lists_every_metric() {
    check_generated(&root().join("docs/METRICS.md"), &grid::metrics_markdown());
}

/// Every metric name the sources record through the `metrics` macros is in [`METRICS`].
#[test]
fn every_metric_recorded_in_the_sources_is_documented() {
    let documented: BTreeSet<&str> = METRICS.iter().map(|m| m.name).collect();
    let mut found = BTreeSet::new();
    for dir in [
        "src",
        "grid-net/src",
        "grid-core/src",
        "grid-cache/src",
        "grid-lock/src",
        "grid-exec/src",
    ] {
        let mut stack = vec![root().join(dir)];
        while let Some(path) = stack.pop() {
            if path.is_dir() {
                for entry in std::fs::read_dir(&path).expect("a directory") {
                    stack.push(entry.expect("an entry").path());
                }
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("a source file");
            for (i, _) in text.match_indices("metrics::") {
                let rest = &text[i + "metrics::".len()..];
                let is_macro = ["counter!(", "gauge!(", "histogram!("]
                    .iter()
                    .any(|m| rest.starts_with(m));
                if !is_macro {
                    continue;
                }
                let open = &rest[rest.find('(').expect("a paren") + 1..];
                let open = open.trim_start();
                if let Some(name) = open.strip_prefix('"') {
                    let name = &name[..name.find('"').expect("a closing quote")];
                    found.insert((name.to_string(), path.display().to_string()));
                }
            }
        }
    }
    assert!(found.len() > 20, "the scan found the metrics: {found:?}");
    for (name, file) in &found {
        assert!(
            documented.contains(name.as_str()),
            "{name} (recorded in {file}) is not in grid::METRICS"
        );
        assert!(name.starts_with("grid_"), "{name} lacks the grid_ prefix");
    }
    for m in METRICS {
        match m.kind {
            "counter" => assert!(m.name.ends_with("_total"), "{}", m.name),
            "histogram" => assert!(m.name.ends_with("_seconds"), "{}", m.name),
            "gauge" => assert!(!m.name.ends_with("_total"), "{}", m.name),
            other => panic!("{}: unknown type {other}", m.name),
        }
    }
}

/// `GET path` over HTTP/1.1 on loopback: (status code, body).
async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .expect("connect within 10 s")
    .expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut response = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        stream.read_to_string(&mut response),
    )
    .await
    .expect("an answer within 10 s")
    .expect("read");
    let (head, body) = response.split_once("\r\n\r\n").expect("a header");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status code");
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    (
        status,
        if chunked {
            dechunk(body)
        } else {
            body.to_string()
        },
    )
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

async fn wait_for<F: std::future::Future<Output = bool>>(what: &str, mut cond: impl FnMut() -> F) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn member(cluster: &str, id: &str) -> grid::GridBuilder {
    Grid::builder()
        .cluster_name(cluster)
        .member_id(id)
        .secret(format!("operate test {cluster}"))
        .bind("127.0.0.1:0")
        .no_seeds()
}

/// (name, type) of every metric in a Prometheus text page.
fn types(page: &str) -> BTreeMap<String, String> {
    page.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            Some((parts.next()?.to_string(), parts.next()?.to_string()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scraped_member_serves_its_metrics_under_the_documented_names() {
    let cluster = "operate-scrape";
    let a = member(cluster, "a")
        .metrics_listen("127.0.0.1:0".parse().expect("an address"))
        .start()
        .await
        .expect("a starts");
    let addr = a.metrics_addr().expect("a serves metrics");
    let b = member(cluster, "b")
        .seed(a.addr())
        .start()
        .await
        .expect("b starts");
    wait_for("two members", || async {
        a.cluster().members().len() == 2 && a.runtime().coordinator_status().settled
    })
    .await;
    let cache = a
        .cache::<u32, u32>("scraped")
        .settings(grid::CacheSettings::builder().max_entries(10).build())
        .await
        .expect("a cache");
    for k in 0..50 {
        cache.put(&k, &k).await.expect("put");
        cache.get(&k).await.expect("get");
    }
    assert_eq!(cache.get(&1000).await.expect("a miss"), None);

    let (status, page) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200);
    let scraped = types(&page);
    let documented: BTreeMap<&str, &str> = METRICS.iter().map(|m| (m.name, m.kind)).collect();
    for (name, kind) in &scraped {
        assert_eq!(
            documented.get(name.as_str()),
            Some(&kind.as_str()),
            "{name} ({kind}) is served but not documented so in grid::METRICS"
        );
    }
    for name in [
        "grid_member_info",
        "grid_ready",
        "grid_members",
        "grid_data_members",
        "grid_member_events_total",
        "grid_gossip_messages_sent_total",
        "grid_partition_table_version",
        "grid_partitions_owned",
        "grid_partition_replicas_held",
        "grid_coordinator",
        "grid_migrations_in_flight",
        "grid_migrations_completed_total",
        "grid_migrations_failed_total",
        "grid_copied_bytes_total",
        "grid_op_seconds",
        "grid_operation_duration_seconds",
        "grid_cache_hits_total",
        "grid_cache_misses_total",
        "grid_cache_evictions_total",
        "grid_cache_entries",
    ] {
        assert!(scraped.contains_key(name), "{name} not served:\n{page}");
    }
    assert!(page.contains("grid_member_info{member=\"a\",cluster=\"operate-scrape\"} 1"));
    assert!(
        page.contains("grid_operation_duration_seconds_bucket{service=\"cache\",op=\"put\""),
        "latency histogram by service and operation:\n{page}"
    );
    assert!(page.contains("grid_cache_hits_total{cache=\"scraped\"}"));
    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_false_before_joining_and_true_after() {
    let cluster = "operate-ready";
    // A seed that never answers: `a` keeps looking for its cluster (for a minute).
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").expect("a silent port");
    let mut config = GridConfig::default();
    config.membership.join_timeout_ms = 60_000;
    let a = Grid::builder()
        .config(config)
        .cluster_name(cluster)
        .member_id("a")
        .secret(format!("operate test {cluster}"))
        .bind("127.0.0.1:0")
        .seeds([silent.local_addr().expect("its address")])
        .metrics_listen("127.0.0.1:0".parse().expect("an address"))
        .start()
        .await
        .expect("a starts");
    let addr = a.metrics_addr().expect("a serves probes");
    assert_eq!(http_get(addr, "/healthz").await.0, 200);
    let (status, body) = http_get(addr, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("not joined"), "{body}");
    assert!(a.not_ready_reason().is_some());

    // Another member seeds itself with `a`: both have joined, and the table follows.
    let b = member(cluster, "b")
        .seed(a.addr())
        .start()
        .await
        .expect("b starts");
    wait_for("a ready", || async {
        http_get(addr, "/readyz").await.0 == 200
    })
    .await;
    assert_eq!(a.not_ready_reason(), None);
    assert!(a.runtime().table().version() > 0);
    b.shutdown().await;
    a.shutdown().await;
}

const CLUSTER: &str = "operate-processes";
const SECRET: &str = "operate processes secret";

struct Node {
    _child: Child,
    addr: SocketAddr,
    _stdout: Lines<BufReader<ChildStdout>>,
    stderr: Lines<BufReader<ChildStderr>>,
}

async fn node(id: &str, seed: Option<SocketAddr>) -> Node {
    let (mut child, addr, stdout) = spawn_listening(
        node_command(CLUSTER, SECRET, id, seed)
            .env("GRID_LOG", "info")
            .env("GRID_LOG_FORMAT", "json")
            .stderr(Stdio::piped()),
    )
    .await;
    let stderr = BufReader::new(child.stderr.take().expect("stderr")).lines();
    Node {
        _child: child,
        addr,
        _stdout: stdout,
        stderr,
    }
}

async fn status(seeds: &str, args: &[&str]) -> std::process::Output {
    tokio::time::timeout(
        Duration::from_secs(60),
        grid_command()
            .arg("status")
            .args(args)
            .env("GRID_CLUSTER_NAME", CLUSTER)
            .env("GRID_SEEDS", seeds)
            .env("GRID_CLUSTER_SECRET", SECRET)
            .output(),
    )
    .await
    .expect("grid status ends within 60 s")
    .expect("grid status runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grid_status_prints_a_cluster_of_three_node_processes() {
    let mut a = node("a", None).await;
    let b = node("b", Some(a.addr)).await;
    let c = node("c", Some(a.addr)).await;

    // a's logs are JSON, one object a line, each with the member and cluster; the start-up
    // line says what is in force, and never the secret.
    let mut started = None;
    for _ in 0..20 {
        let line = tokio::time::timeout(Duration::from_secs(10), a.stderr.next_line())
            .await
            .expect("a logs")
            .expect("stderr")
            .expect("a line");
        assert!(!line.contains(SECRET), "the secret is logged: {line}");
        let json: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
        assert_eq!(json["member"], "a", "{line}");
        assert_eq!(json["cluster"], CLUSTER, "{line}");
        if json["fields"]["message"] == "member started" {
            started = Some(json);
            break;
        }
    }
    let started = started.expect("a start-up line");
    assert_eq!(started["fields"]["tls"], "secret-derived CA", "{started}");
    assert_eq!(
        started["fields"]["discovery"],
        "none (a cluster of its own until others seed it)"
    );
    assert!(started["fields"]["bulk"].is_string(), "{started}");

    // A lite member stores some entries, for the caches' sizes.
    let tester = Grid::builder()
        .cluster_name(CLUSTER)
        .member_id("tester")
        .secret(SECRET)
        .bind("127.0.0.1:0")
        .seed(a.addr)
        .lite_member()
        .start()
        .await
        .expect("the lite member starts");
    wait_for("the three members' table", || async {
        let t = tester.runtime().table();
        t.members().len() == 3
            && tester
                .member_status("a")
                .await
                .is_ok_and(|s| s.coordinator.settled && s.table_version == t.version())
    })
    .await;
    let cache = tester.cache::<u32, u32>("sized").await.expect("a cache");
    for k in 0..100 {
        cache.put(&k, &k).await.expect("put");
    }

    let seeds = format!("{},{}", b.addr, c.addr);
    let out = status(&seeds, &["--json"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "grid status failed: {stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let members = report["members"].as_array().expect("members");
    let ids: BTreeSet<&str> = members.iter().filter_map(|m| m["id"].as_str()).collect();
    assert!(
        ["a", "b", "c"].iter().all(|id| ids.contains(id)),
        "{report}"
    );
    assert_eq!(report["coordinator"], "a", "{report}");
    assert!(report["table_version"].as_u64().expect("a version") > 0);
    let owned: u64 = members
        .iter()
        .filter_map(|m| m["partitions_owned"].as_u64())
        .sum();
    assert_eq!(owned, 271, "{report}");
    let entries: u64 = members
        .iter()
        .filter_map(|m| m["caches"]["sized"].as_u64())
        .sum();
    assert_eq!(entries, 100, "{report}");
    assert!(members
        .iter()
        .filter(|m| m["role"] == "data")
        .all(|m| m["caches"]["sized"].as_u64().is_some()));

    // The tables, as a person reads them.
    let out = status(&a.addr.to_string(), &[]).await;
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in ["coordinator a", "MEMBER", "sized", "100"] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
    for id in ["a", "b", "c"] {
        assert!(
            text.lines().any(|l| l.starts_with(&format!("{id} "))),
            "{id} missing from:\n{text}"
        );
    }
    tester.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grid_status_fails_clearly_when_no_seed_answers() {
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").expect("a silent port");
    let seeds = silent.local_addr().expect("its address").to_string();
    let started = Instant::now();
    let out = status(&seeds, &["--timeout", "2"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "grid status succeeded: {stderr}");
    assert!(
        stderr.contains("no member of cluster") && stderr.contains(&seeds),
        "{stderr}"
    );
    assert!(started.elapsed() < Duration::from_secs(30), "it hung");
}

#[tokio::test]
async fn an_unknown_key_or_a_bad_value_is_refused_with_the_key_named() {
    let dir = std::env::temp_dir().join(format!("grid-operate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    for (toml, expected) in [
        (
            "[network]\nbnd = \"127.0.0.1:0\"\n",
            vec!["network.bnd", "bind"],
        ),
        (
            "[network]\nbulk_priority = \"low\"\n",
            vec!["network.bulk_priority", "idle", "nice", "normal"],
        ),
        (
            "[partitions]\nbackups = 9\n",
            vec!["partitions.backups", "0 to 6"],
        ),
    ] {
        let file = dir.join("grid.toml");
        std::fs::write(&file, toml).expect("write the configuration");
        let out = tokio::time::timeout(
            Duration::from_secs(30),
            grid_command()
                .args(["node", "--no-metrics", "--config"])
                .arg(&file)
                .output(),
        )
        .await
        .expect("grid node exits")
        .expect("grid node runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{toml} was accepted");
        for needle in expected {
            assert!(stderr.contains(needle), "{needle:?} missing from: {stderr}");
        }
    }
    // The same through the environment.
    let out = grid_command()
        .args(["node", "--no-metrics"])
        .env("GRID_BULK_PRIORITY", "low")
        .output()
        .await
        .expect("grid node runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("GRID_BULK_PRIORITY"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}
