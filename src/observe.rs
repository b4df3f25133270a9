//! Operating a member: its metrics in Prometheus's text format and its health probes, on
//! one small HTTP server (`metrics.listen`, or [`GridBuilder::metrics_listener`]).
//!
//! - `GET /metrics`: every metric grid records ([`METRICS`]; `docs/METRICS.md`), through
//!   the `metrics` facade and `metrics-exporter-prometheus`'s recorder, which grid installs
//!   as the process's recorder the first time a member serves metrics.
//! - `GET /healthz`: 200 while the process serves.
//! - `GET /readyz`: 200 once the member has joined its cluster and holds the cluster's
//!   partition table; 503, with the reason, while it looks for its seeds, before the table
//!   reaches it, and once it is leaving.
//!
//! [`GridBuilder::metrics_listener`]: crate::GridBuilder::metrics_listener

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use grid_core::runtime::Runtime;
use grid_core::GridError;
use grid_net::membership::Cluster;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::sync::oneshot;

/// One metric grid records: its name, Prometheus type, labels and meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricDoc {
    /// The metric's name (`grid_` prefix; counters end in `_total`, durations in
    /// `_seconds`, sizes in `_bytes`).
    pub name: &'static str,
    /// `counter`, `gauge` or `histogram`.
    pub kind: &'static str,
    /// Its labels and their values, or `""`.
    pub labels: &'static str,
    /// What it counts or measures.
    pub meaning: &'static str,
}

const fn m(
    name: &'static str,
    kind: &'static str,
    labels: &'static str,
    meaning: &'static str,
) -> MetricDoc {
    MetricDoc {
        name,
        kind,
        labels,
        meaning,
    }
}

/// Every metric grid records, as `docs/METRICS.md` lists them (that file is
/// [`metrics_markdown`]'s output; a test scrapes a member and checks the names against
/// this list, and another checks that every metric the sources record is in it).
///
/// Metrics marked "at scrape" are read from the member when `/metrics` is asked (or when
/// [`Grid::record_metrics`](crate::Grid::record_metrics) is called); the others are
/// recorded where things happen. All of them describe the member that serves them.
pub const METRICS: &[MetricDoc] = &[
    m("grid_member_info", "gauge", "`member`, `cluster`", "Always 1: the member's id and cluster name (at scrape)."),
    m("grid_ready", "gauge", "", "1 when the member has joined and holds the cluster's table (what `/readyz` answers), else 0 (at scrape)."),
    m("grid_members", "gauge", "`state`: `alive`, `leaving`", "Members this one sees: in the member list (itself included), or announced leaving and not gone yet."),
    m("grid_data_members", "gauge", "", "Live members that hold data (lite members excluded)."),
    m("grid_member_events_total", "counter", "`event`: `joined`, `left`, `failed`", "Membership changes this member saw."),
    m("grid_gossip_messages_sent_total", "counter", "`kind`: `syn`, `synack`, `ack`, `bad_cluster`", "Gossip messages sent; a gossip round sends one `syn` to each peer it contacts."),
    m("grid_net_frames_refused_total", "counter", "`reason`: `empty_stream`, `bad_kind`, `truncated`, `undecodable`, `bad_hello`, `bad_gossip`", "Input from the network refused (the stream or connection closed, a warning logged)."),
    m("grid_net_handshakes_refused_total", "counter", "", "Incoming connections whose TLS handshake failed (strangers, wrong CA, wrong protocol)."),
    m("grid_net_members_refused_total", "counter", "", "Peers refused after the handshake (another cluster or partition count)."),
    m("grid_net_gossip_dropped_total", "counter", "", "Gossip messages dropped: too many in flight, or the inbox full."),
    m("grid_net_ordered_dropped_total", "counter", "", "Ordered messages (topics, events) that could not be delivered."),
    m("grid_topic_dropped_total", "counter", "", "Topic messages dropped because a subscriber's queue was full."),
    m("grid_partition_table_version", "gauge", "", "Version of the partition table the member routes by."),
    m("grid_partitions_owned", "gauge", "", "Partitions this member owns in that table."),
    m("grid_partition_replicas_held", "gauge", "", "Partition replicas (owned and backups) this member holds in that table."),
    m("grid_coordinator", "gauge", "", "1 on the coordinator (the oldest data member), else 0 (at scrape)."),
    m("grid_migrations_in_flight", "gauge", "", "Partition migrations waiting or under way (on the coordinator)."),
    m("grid_migrations_started_total", "counter", "", "Migrations started since this member became coordinator (at scrape)."),
    m("grid_migrations_completed_total", "counter", "", "Migrations completed since this member became coordinator (at scrape)."),
    m("grid_migrations_failed_total", "counter", "", "Migrations that failed (and were retried) since this member became coordinator (at scrape)."),
    m("grid_copied_entries_total", "counter", "", "Entries this member copied out in migrations and syncs (at scrape)."),
    m("grid_copied_bytes_total", "counter", "", "Bytes this member copied out in migrations and syncs (at scrape)."),
    m("grid_partition_sync_bytes_total", "counter", "", "Bytes of full partition copies sent to backups that fell behind."),
    m("grid_backup_misses_total", "counter", "", "Backups that did not acknowledge a change in time (left to anti-entropy)."),
    m("grid_anti_entropy_repairs_total", "counter", "", "Backup replicas repaired by anti-entropy."),
    m("grid_pauses_detected_total", "counter", "", "Times this member found it had been paused or starved past failure detection (it confirms its ownership before serving again)."),
    m("grid_backup_gone_refusals_total", "counter", "", "Writes an owner refused (the caller retries) because a synchronous backup its table names is not a live member, until the next table replaces it."),
    m("grid_stale_owner_refusals_total", "counter", "", "Changes and partition copies refused because their sender no longer owns the partition (a paused or cut-off former owner)."),
    m("grid_async_backups_dropped_total", "counter", "", "Changes not sent to an asynchronous backup (its queue was full)."),
    m("grid_service_timers_armed", "gauge", "", "Timers armed by partitioned services on this member (lock leases, expiry checks)."),
    m("grid_service_effects_dropped_total", "counter", "", "Operations submitted and messages sent by partitioned services that were dropped because too many were already under way."),
    m("grid_op_seconds", "histogram", "", "Duration of partition operations (any service) that succeeded, retries included, from the member that asked."),
    m("grid_operation_duration_seconds", "histogram", "`service`: `cache`; `op`: `get`, `contains_key`, `put`, `remove`, `process`, `entries`, `clear`, `expire`", "Duration of operations by service and kind, from the caller's side (local reads included)."),
    m("grid_operation_errors_total", "counter", "`service`, `op` (as above); `error`: `timeout`, `indeterminate`, `service`, `net`, `codec`, `loader`, `not_allowed`, `settings_conflict`, `topic`, `config`", "Operations that failed, by error kind."),
    m("grid_cache_hits_total", "counter", "`cache`", "Reads that found a value, by callers on this member (caches opened here; at scrape)."),
    m("grid_cache_misses_total", "counter", "`cache`", "Reads that found none (at scrape)."),
    m("grid_cache_puts_total", "counter", "`cache`", "Values written (at scrape)."),
    m("grid_cache_removes_total", "counter", "`cache`", "Removals by callers (at scrape)."),
    m("grid_cache_loads_total", "counter", "`cache`", "Loader calls made on this member (at scrape)."),
    m("grid_cache_evictions_total", "counter", "`cache`", "Entries evicted by `max_entries` on this member (at scrape)."),
    m("grid_cache_expirations_total", "counter", "`cache`", "Entries that expired on this member (at scrape)."),
    m("grid_cache_entries", "gauge", "`cache`", "Entries this member holds: those it owns, or its copy for replicated and local caches (at scrape)."),
    m("grid_cache_heap_bytes", "gauge", "`cache`", "Estimated bytes of those entries (at scrape)."),
    m("grid_cache_events_dropped_total", "counter", "", "Cache events this member could not queue for sending (listeners and near copies repair)."),
    m("grid_cache_event_batches_lost_total", "counter", "", "Batches of cache events lost on the way to another member."),
    m("grid_exec_bucketed_submitted_total", "counter", "", "Tasks submitted to bucketed executors from this member (durable on their owner and backups)."),
    m("grid_exec_bucketed_refused_total", "counter", "", "Submits refused because a bucketed executor's queue was full (each try of a waiting submit counts)."),
    m("grid_exec_bucketed_processed_total", "counter", "", "Tasks of bucketed executors processed on this member."),
    m("grid_exec_bucketed_failed_total", "counter", "", "Batches whose `process` failed (an error or a panic) on this member."),
    m("grid_exec_bucketed_retried_total", "counter", "", "Batches run on this member that were a retry (attempt > 1)."),
    m("grid_exec_bucketed_dead_lettered_total", "counter", "", "Batches that failed their last attempt on this member and went to the dead letters."),
    m("grid_exec_bucketed_process_seconds", "histogram", "", "Duration of `process` calls on this member."),
    m("grid_exec_bucketed_queued", "gauge", "`exec`", "Tasks queued (not yet completed) in the partitions this member owns, per executor; updated every registry broadcast (3 s)."),
    m("grid_exec_bucketed_in_flight", "gauge", "`exec`", "Batches handed out and not yet completed, of the partitions this member owns, per executor."),
    m("grid_exec_bucketed_processing", "gauge", "`exec`", "Batches running on this member now, per executor."),
    m("grid_exec_member_tasks_total", "counter", "", "Member-executor tasks this member asked to run (on any member)."),
    m("grid_lock_grants_total", "counter", "`how`: `free`, `queued`, `reentered`", "Lock grants made by this member as the owner of the locks' partitions: a free lock taken at once, the head of a queue given a released or expired lock (pushed to the waiter), a reentrant lock entered again."),
    m("grid_lock_releases_total", "counter", "`how`: `released`, `expired`, `exited`", "Locks freed by this member as their owner: released by their holder, freed because the holder's lease ran out (a dead, paused or cut-off holder), or one hold of a reentered lock left."),
    m("grid_lock_refusals_total", "counter", "`reason`: `no_quorum`, `not_holder`, `lost`, `not_reentrant`, `too_many_holds`, `too_many_waiters`, `too_many_locks`, `other`", "Lock operations this member refused as an owner: no quorum in view, an operation on a hold from someone else (a forged or stale unlock or renewal), a renewal after the lease ran out, a non-reentrant lock asked for again by its holder, limits."),
    m("grid_lock_held", "gauge", "", "Locks held in the partitions this member owns (at scrape)."),
    m("grid_lock_waiters", "gauge", "", "Callers queued for locks in the partitions this member owns (at scrape)."),
    m("grid_lock_wait_seconds", "histogram", "", "Time this member's callers took to get a lock (`lock()`, `try_lock()`): from the call to the grant."),
    m("grid_lock_leases_lost_total", "counter", "", "Locks held by this member's callers that were lost before their release (`LockGuard::lost` fired: the lease ran out or a renewal was refused)."),
    m("grid_scheduler_firings_total", "counter", "", "Slots of cluster-wide jobs fired by this member as their owner."),
    m("grid_scheduler_runs_total", "counter", "`outcome`", "Job runs that ended on this member, by outcome (`Success`, `Failed`, ...)."),
];

/// [`METRICS`] as a Markdown table (the body of `docs/METRICS.md`).
pub fn metrics_markdown() -> String {
    let mut out = String::from("| name | type | labels | meaning |\n|---|---|---|---|\n");
    for d in METRICS {
        out.push_str(&format!(
            "| `{}` | {} | {} | {} |\n",
            d.name, d.kind, d.labels, d.meaning
        ));
    }
    out
}

/// Histogram buckets of durations, in seconds: 100 µs to 10 s.
const SECONDS_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// The process's Prometheus recorder, installed once.
static PROMETHEUS: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();

fn prometheus() -> Result<PrometheusHandle, GridError> {
    PROMETHEUS
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .map_err(|e| e.to_string())?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).map_err(|_| {
                "another metrics recorder is installed in this process; grid serves only \
                 its own (leave metrics.listen unset and export with yours)"
                    .to_string()
            })?;
            for d in METRICS {
                let help = d.meaning;
                match d.kind {
                    "counter" => metrics::describe_counter!(d.name, help),
                    "gauge" => metrics::describe_gauge!(d.name, help),
                    _ => metrics::describe_histogram!(d.name, help),
                }
            }
            Ok(handle)
        })
        .clone()
        .map_err(|message| GridError::ConfigInvalid {
            path: None,
            message: format!("metrics.listen: {message}"),
        })
}

/// What the probes and the collector read.
#[derive(Clone)]
pub(crate) struct Probe {
    pub(crate) runtime: Runtime,
    pub(crate) cluster: Cluster,
    pub(crate) caches: grid_cache::Caches,
    pub(crate) locks: grid_lock::Locks,
    pub(crate) cluster_name: Arc<str>,
    pub(crate) leaving: Arc<AtomicBool>,
}

impl std::fmt::Debug for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Probe")
            .field("member", self.runtime.member_id())
            .finish()
    }
}

impl Probe {
    /// Why the member is not ready, if it is not.
    pub(crate) fn not_ready(&self) -> Option<&'static str> {
        if self.leaving.load(Ordering::Relaxed) {
            Some("leaving the cluster")
        } else if !self.cluster.has_joined() {
            Some("not joined: looking for the cluster's seeds")
        } else if self.runtime.table().version() == 0 {
            Some("joined, waiting for the cluster's partition table")
        } else {
            None
        }
    }

    /// Sets the metrics read from the member's state (those "at scrape" in [`METRICS`]).
    pub(crate) fn record(&self) {
        let me = self.runtime.member_id().to_string();
        metrics::gauge!("grid_member_info", "member" => me, "cluster" => self.cluster_name.to_string())
            .set(1.0);
        metrics::gauge!("grid_ready").set(if self.not_ready().is_none() { 1.0 } else { 0.0 });
        let coordinator = self.runtime.coordinator_status();
        metrics::gauge!("grid_coordinator").set(if coordinator.active { 1.0 } else { 0.0 });
        let stats = coordinator.stats;
        metrics::counter!("grid_migrations_started_total").absolute(stats.started);
        metrics::counter!("grid_migrations_completed_total").absolute(stats.completed);
        metrics::counter!("grid_migrations_failed_total").absolute(stats.failed);
        let (entries, bytes) = self.runtime.moved();
        metrics::counter!("grid_copied_entries_total").absolute(entries);
        metrics::counter!("grid_copied_bytes_total").absolute(bytes);
        let (held, waiting) = self.locks.service().owned_counts();
        metrics::gauge!("grid_lock_held").set(held as f64);
        metrics::gauge!("grid_lock_waiters").set(waiting as f64);
        for (name, s) in self.caches.opened_statistics() {
            let c = |metric: &'static str, v: u64| {
                metrics::counter!(metric, "cache" => name.clone()).absolute(v)
            };
            c("grid_cache_hits_total", s.hits);
            c("grid_cache_misses_total", s.misses);
            c("grid_cache_puts_total", s.puts);
            c("grid_cache_removes_total", s.removes);
            c("grid_cache_loads_total", s.loads);
            c("grid_cache_evictions_total", s.evictions);
            c("grid_cache_expirations_total", s.expirations);
            metrics::gauge!("grid_cache_entries", "cache" => name.clone()).set(s.size as f64);
            metrics::gauge!("grid_cache_heap_bytes", "cache" => name.clone())
                .set(s.heap_size as f64);
        }
    }
}

/// The running HTTP server; stops when dropped.
#[derive(Debug)]
pub(crate) struct Endpoint {
    addr: SocketAddr,
    stop: Mutex<Option<oneshot::Sender<()>>>,
}

impl Endpoint {
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = stop.send(());
        }
    }
}

/// Where to serve: an address to bind, or a listener bound by the caller.
#[derive(Debug)]
pub(crate) enum Listen {
    Addr(SocketAddr),
    Listener(std::net::TcpListener),
}

/// Installs the recorder (once per process), binds and serves `/metrics`, `/healthz` and
/// `/readyz`.
pub(crate) fn install_recorder() -> Result<PrometheusHandle, GridError> {
    prometheus()
}

pub(crate) async fn serve(
    listen: Listen,
    handle: PrometheusHandle,
    probe: Probe,
) -> Result<Endpoint, GridError> {
    let io = |addr: String, e: std::io::Error| GridError::ConfigInvalid {
        path: None,
        message: format!("metrics.listen: cannot listen on {addr}: {e}"),
    };
    let listener = match listen {
        Listen::Addr(addr) => tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| io(addr.to_string(), e))?,
        Listen::Listener(l) => {
            let addr = l
                .local_addr()
                .map_or_else(|_| "the given listener".to_string(), |a| a.to_string());
            l.set_nonblocking(true).map_err(|e| io(addr.clone(), e))?;
            tokio::net::TcpListener::from_std(l).map_err(|e| io(addr, e))?
        }
    };
    let addr = listener.local_addr().map_err(|e| io("?".into(), e))?;
    let state = Arc::new((handle, probe));
    let app = Router::new()
        .route("/metrics", get(metrics_page))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state.clone());
    let (stop_tx, stop_rx) = oneshot::channel();
    tokio::spawn(async move {
        let server = axum::serve(listener, app).with_graceful_shutdown(async {
            let _ = stop_rx.await;
        });
        // Histograms are drained into their buckets by the upkeep (and at each scrape).
        let upkeep = async {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                state.0.run_upkeep();
            }
        };
        tokio::select! {
            r = server => if let Err(e) = r {
                tracing::warn!(error = %e, "metrics endpoint stopped");
            },
            _ = upkeep => {}
        }
    });
    Ok(Endpoint {
        addr,
        stop: Mutex::new(Some(stop_tx)),
    })
}

type Shared = Arc<(PrometheusHandle, Probe)>;

async fn metrics_page(State(state): State<Shared>) -> impl IntoResponse {
    state.1.record();
    state.0.run_upkeep();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.0.render(),
    )
}

async fn readyz(State(state): State<Shared>) -> impl IntoResponse {
    match state.1.not_ready() {
        None => (StatusCode::OK, "ready\n".to_string()),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}
