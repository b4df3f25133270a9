//! grid: a peer-to-peer in-memory data grid for Rust services.
//!
//! Every process embeds a member; members find each other (seed list or multicast), agree
//! on membership by gossip, and talk over mutually authenticated QUIC. A single member is a
//! one-member cluster running the same code.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), grid::GridError> {
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize, Debug, PartialEq)]
//! struct Hello { from: String }
//!
//! let a = grid::Grid::builder().cluster_name("doc").bind("127.0.0.1:0").no_seeds().start().await?;
//! let b = grid::Grid::builder().cluster_name("doc").bind("127.0.0.1:0").seed(a.addr()).start().await?;
//! b.cluster().wait_until(std::time::Duration::from_secs(10), |m| m.len() == 2).await;
//!
//! let mut inbox = a.topic::<Hello>("greetings")?.subscribe();
//! b.topic::<Hello>("greetings")?.publish(&Hello { from: "b".into() }).await?;
//! assert_eq!(inbox.recv().await, Some(Hello { from: "b".into() }));
//!
//! b.shutdown().await;
//! a.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! # Layout
//! - [`Grid`] / [`GridBuilder`]: start and stop a member; get its primitives.
//! - [`Cluster`]: members, events, the leader (re-exported from `grid-net`).
//! - [`Topic`]: cluster messages (re-exported from `grid-net`).
//! - [`ClusterLock`] / [`KeyedLock`]: cluster locks with fencing tokens (`grid-lock`).
//! - [`BucketedExecutor`] / [`MemberExecutor`]: tasks in order per bucket, never lost; named
//!   tasks on chosen members (`grid-exec`).
//! - [`GridConfig`]: the configuration file and its environment overrides (`grid-core`).
//! - [`METRICS`]: every metric grid records; a member serves them for Prometheus, with
//!   health probes, when `metrics.listen` is set ([`GridBuilder::metrics_listen`]).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use grid_core::runtime::Runtime;
use serde::de::DeserializeOwned;
use serde::Serialize;

mod observe;

pub use grid_cache::{
    Cache, CacheBuilder, CacheEvent, CacheListener, CacheMode, CacheSettings, CacheStatistics,
    CachedReference, Eviction, Expiry, MemberCacheSizes, ProcessorEntry,
};
pub use grid_core::config::{MetricsConfig, PartitionConfig};
pub use grid_core::runtime::{CoordinatorStatus, MemberStatus, MigrationStats};
pub use grid_core::{codec, GridConfig, GridError};
pub use grid_exec::bucketed::{
    Batch, BucketedExecutor, BucketedExecutors, BucketedSettings, ClusterStatistics, Concurrency,
    DeadLetter, ExecError, ExecStatistics, FullQueue,
};
pub use grid_exec::member::{MemberExecutor, TaskError};
pub use grid_exec::scheduler::{
    JobConfig, JobRequest, JobResponse, MissedSlots, Outcome, RunMode, RunRecord, Schedule,
    Scheduler, SchedulerError,
};
pub use grid_lock::{ClusterLock, KeyedLock, LockError, LockGuard, LockOwner, LockSettings, Locks};
pub use grid_net::bulk_runtime::BulkPriority;
pub use grid_net::config::{MembershipConfig, MulticastConfig, NetworkConfig, TlsConfig};
pub use grid_net::malloc::keep_freed_memory;
pub use grid_net::membership::{Cluster, Member, MemberEvent, MembershipEvents};
pub use grid_net::topic::{Subscription, Topic, TopicError};
pub use grid_net::NetError;
pub use observe::{metrics_markdown, MetricDoc, METRICS};

/// Builds a member's configuration and starts it. Start from [`Grid::builder`].
#[derive(Debug, Clone, Default)]
pub struct GridBuilder {
    config: GridConfig,
    /// A listener for the metrics endpoint, bound by the caller.
    metrics_listener: Option<Arc<std::net::TcpListener>>,
    /// Sockets and seeds from a simulated environment (the simulator); `None`: the OS's.
    environment: Option<Arc<dyn grid_net::environment::NetEnvironment>>,
    /// Settings of the member's locks.
    lock_settings: LockSettings,
}

impl GridBuilder {
    /// Replaces the whole configuration (e.g. one loaded with [`GridConfig::load`]); later
    /// builder calls change it further.
    pub fn config(mut self, config: GridConfig) -> Self {
        self.config = config;
        self
    }

    /// The cluster's name.
    pub fn cluster_name(mut self, name: impl Into<String>) -> Self {
        self.config.cluster_name = name.into();
        self
    }

    /// This member's id (default: random).
    pub fn member_id(mut self, id: impl Into<String>) -> Self {
        self.config.member_id = Some(id.into());
        self
    }

    /// The address to bind, e.g. `"127.0.0.1:0"`.
    ///
    /// # Panics
    /// If `addr` is not a socket address: this is a programming error, not input.
    pub fn bind(mut self, addr: &str) -> Self {
        self.config.network.bind = addr.parse().expect("bind takes an IP:port literal");
        self
    }

    /// The address other members should dial, when it differs from the bound one.
    pub fn advertise(mut self, addr: SocketAddr) -> Self {
        self.config.network.advertise = Some(addr);
        self
    }

    /// Adds a seed member (`host:port`, or a `SocketAddr`).
    pub fn seed(mut self, seed: impl ToString) -> Self {
        if self.config.network.seeds == NetworkConfig::default().seeds {
            self.config.network.seeds.clear();
        }
        self.config.network.seeds.push(seed.to_string());
        self
    }

    /// Replaces the seed list.
    pub fn seeds<S: ToString>(mut self, seeds: impl IntoIterator<Item = S>) -> Self {
        self.config.network.seeds = seeds.into_iter().map(|s| s.to_string()).collect();
        self
    }

    /// No seeds: the member starts alone (and is found by others that have it as a seed, or
    /// by multicast).
    pub fn no_seeds(mut self) -> Self {
        self.config.network.seeds.clear();
        self
    }

    /// Turns multicast discovery on or off with the default group.
    pub fn multicast(mut self, enabled: bool) -> Self {
        self.config.multicast.enabled = enabled;
        self
    }

    /// Multicast discovery settings.
    pub fn multicast_config(mut self, multicast: MulticastConfig) -> Self {
        self.config.multicast = multicast;
        self
    }

    /// Development identity: the cluster CA is derived from this secret.
    pub fn secret(mut self, secret: impl Into<String>) -> Self {
        self.config.tls.secret = Some(secret.into());
        self
    }

    /// Production identity: the cluster CA, this member's certificate and key (PEM files).
    pub fn tls_files(
        mut self,
        ca: impl Into<PathBuf>,
        cert: impl Into<PathBuf>,
        key: impl Into<PathBuf>,
    ) -> Self {
        self.config.tls.ca = Some(ca.into());
        self.config.tls.cert = Some(cert.into());
        self.config.tls.key = Some(key.into());
        self
    }

    /// Sets a member attribute, gossiped to every member.
    pub fn attribute(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.config.attributes.insert(key.into(), value.into());
        self
    }

    /// A lite member: it can use everything but holds no data (`data=false`).
    pub fn lite_member(self) -> Self {
        self.attribute("data", "false")
    }

    /// Time between gossip rounds (default 100 ms).
    pub fn gossip_interval(mut self, interval: Duration) -> Self {
        self.config.membership.gossip_interval_ms = interval.as_millis() as u64;
        self
    }

    /// Synchronous backups per partition, 0 to 6 (default 1).
    pub fn backups(mut self, backups: u8) -> Self {
        self.config.partitions.backups = backups;
        self
    }

    /// Asynchronous backups per partition, after the synchronous ones (default 0): they get
    /// every change in order but nobody waits for them (Hazelcast's `async-backup-count`).
    pub fn async_backups(mut self, backups: u8) -> Self {
        self.config.partitions.async_backups = backups;
        self
    }

    /// Partition count (default 271), fixed for the life of the cluster.
    pub fn partitions(mut self, count: u32) -> Self {
        self.config.partitions.count = count;
        self
    }

    /// Put a partition's replicas on members with distinct values of this attribute.
    pub fn placement_attribute(mut self, attribute: impl Into<String>) -> Self {
        self.config.partitions.placement_attribute = Some(attribute.into());
        self
    }

    /// Deadline of one operation, retries included (default 10 s).
    pub fn op_timeout(mut self, timeout: Duration) -> Self {
        self.config.partitions.op_timeout_ms = timeout.as_millis() as u64;
        self
    }

    /// Largest frame sent or accepted (default 16 MiB).
    pub fn max_frame_size(mut self, bytes: usize) -> Self {
        self.config.network.max_frame_size = bytes;
        self
    }

    /// Serves Prometheus metrics (`/metrics`) and health probes (`/healthz`, `/readyz`) on
    /// `addr` over HTTP (the `metrics.listen` key; off by default). The first member of a
    /// process that serves metrics installs grid's recorder as the process's `metrics`
    /// recorder; starting fails if the process already has another one. Every metric is
    /// listed in [`METRICS`].
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), grid::GridError> {
    /// let grid = grid::Grid::builder()
    ///     .cluster_name("metrics-doc")
    ///     .bind("127.0.0.1:0")
    ///     .no_seeds()
    ///     .metrics_listen("127.0.0.1:0".parse().unwrap())
    ///     .start()
    ///     .await?;
    /// println!("scrape http://{}/metrics", grid.metrics_addr().unwrap());
    /// grid.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub fn metrics_listen(mut self, addr: SocketAddr) -> Self {
        self.config.metrics.listen = Some(addr);
        self
    }

    /// Serves metrics and health probes (see [`GridBuilder::metrics_listen`]) on a listener
    /// the caller bound (e.g. after trying several ports). It wins over `metrics.listen`.
    pub fn metrics_listener(mut self, listener: std::net::TcpListener) -> Self {
        self.metrics_listener = Some(Arc::new(listener));
        self
    }

    /// Takes sockets, the generation and protocol seeds from `environment` instead of the
    /// OS: how the deterministic simulator (`grid-sim`) runs members on its in-memory
    /// network. See `grid_net::environment`.
    #[doc(hidden)]
    pub fn environment(
        mut self,
        environment: Arc<dyn grid_net::environment::NetEnvironment>,
    ) -> Self {
        self.environment = Some(environment);
        self
    }

    /// Settings of this member's locks (lease, clock drift bound, minimum cluster size for
    /// the quorum; see [`LockSettings`]).
    pub fn lock_settings(mut self, settings: LockSettings) -> Self {
        self.lock_settings = settings;
        self
    }

    /// The configuration built so far.
    pub fn build_config(&self) -> &GridConfig {
        &self.config
    }

    /// Starts the member. Returns once its port is bound and gossip runs; other members
    /// appear in [`Grid::cluster`] as they are found. Operations can start at once: until
    /// the member has joined its cluster (it saw another member, or its seeds stayed silent
    /// for `membership.join_timeout_ms`), they wait for the cluster's partition table
    /// instead of running against a cluster of one.
    pub async fn start(self) -> Result<Grid, GridError> {
        self.config.validate()?;
        let listen = match (&self.metrics_listener, self.config.metrics.listen) {
            (Some(l), _) => Some(observe::Listen::Listener(l.try_clone().map_err(|e| {
                GridError::ConfigInvalid {
                    path: None,
                    message: format!("metrics listener: {e}"),
                }
            })?)),
            (None, Some(addr)) => Some(observe::Listen::Addr(addr)),
            (None, None) => None,
        };
        // Before anything records: what is recorded with no recorder is lost.
        let prometheus = listen
            .as_ref()
            .map(|_| observe::install_recorder())
            .transpose()?;
        let mut net_config = self.config.to_net_config();
        net_config.environment = self.environment.clone();
        let node = grid_net::node::Node::start(net_config).await?;
        let runtime = Runtime::start(
            node.transport().clone(),
            node.cluster().clone(),
            self.config.runtime_config(),
        );
        let caches = grid_cache::Caches::start(
            runtime.clone(),
            node.transport().clone(),
            node.cluster().clone(),
        );
        let locks = Locks::start(
            runtime.clone(),
            node.cluster().clone(),
            self.lock_settings.clone(),
        );
        let bucketed = BucketedExecutors::start(runtime.clone(), node.cluster().clone());
        let executor = MemberExecutor::start(
            node.transport().clone(),
            node.cluster().clone(),
            runtime.clone(),
        );
        let scheduler = Scheduler::start(runtime.clone(), node.cluster().clone());
        let probe = observe::Probe {
            runtime: runtime.clone(),
            cluster: node.cluster().clone(),
            caches: caches.clone(),
            locks: locks.clone(),
            cluster_name: self.config.cluster_name.as_str().into(),
            leaving: Arc::new(AtomicBool::new(false)),
        };
        let endpoint = match (listen, prometheus) {
            (Some(listen), Some(handle)) => {
                let endpoint = match observe::serve(listen, handle, probe.clone()).await {
                    Ok(e) => e,
                    Err(e) => {
                        node.shutdown().await;
                        return Err(e);
                    }
                };
                tracing::info!(
                    addr = %endpoint.addr(),
                    "serving /metrics, /healthz and /readyz over HTTP"
                );
                Some(Arc::new(endpoint))
            }
            _ => None,
        };
        Ok(Grid {
            node: Arc::new(node),
            runtime,
            caches,
            locks,
            bucketed,
            executor,
            scheduler,
            probe,
            endpoint,
        })
    }
}

/// A running member. Cheap to clone; the member stops when [`Grid::shutdown`] is called
/// (gracefully) or the last clone is dropped (abruptly: others see it fail).
#[derive(Debug, Clone)]
pub struct Grid {
    node: Arc<grid_net::node::Node>,
    runtime: Runtime,
    caches: grid_cache::Caches,
    locks: Locks,
    bucketed: BucketedExecutors,
    executor: MemberExecutor,
    scheduler: Scheduler,
    probe: observe::Probe,
    /// The metrics and health endpoint, when served; it stops with the last clone.
    endpoint: Option<Arc<observe::Endpoint>>,
}

impl Grid {
    /// A builder with the defaults (cluster `grid`, port 5701, seeds 127.0.0.1:5701–5703).
    pub fn builder() -> GridBuilder {
        GridBuilder::default()
    }

    /// Starts a member from a configuration.
    pub async fn start(config: GridConfig) -> Result<Self, GridError> {
        GridBuilder {
            config,
            metrics_listener: None,
            environment: None,
            lock_settings: LockSettings::default(),
        }
        .start()
        .await
    }

    /// Where the metrics and health endpoint listens, when it is served (see
    /// [`GridBuilder::metrics_listen`]).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.endpoint.as_ref().map(|e| e.addr())
    }

    /// Why this member is not ready, or `None` when it is: it has joined its cluster and
    /// holds the cluster's partition table, and it is not leaving. `/readyz` answers this.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), grid::GridError> {
    /// let grid = grid::Grid::builder().cluster_name("ready-doc").bind("127.0.0.1:0").no_seeds().start().await?;
    /// grid.cluster().joined().await;
    /// # let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    /// # while grid.not_ready_reason().is_some() && std::time::Instant::now() < deadline {
    /// #     tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    /// # }
    /// assert_eq!(grid.not_ready_reason(), None);
    /// grid.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub fn not_ready_reason(&self) -> Option<&'static str> {
        self.probe.not_ready()
    }

    /// Sets the metrics that are read from the member's state rather than recorded as
    /// things happen (those marked "at scrape" in [`METRICS`]). The metrics endpoint calls
    /// this at every scrape; a service that exports grid's metrics with a recorder of its
    /// own calls it before each export.
    pub fn record_metrics(&self) {
        self.probe.record();
    }

    /// Every cache's size on every live member (each member is asked; one that does not
    /// answer is reported with the reason) — what `grid status` prints.
    pub async fn cache_sizes(&self) -> Result<Vec<MemberCacheSizes>, GridError> {
        self.caches.sizes().await
    }

    /// The cluster as this member sees it.
    pub fn cluster(&self) -> &Cluster {
        self.node.cluster()
    }

    /// The address other members dial.
    pub fn addr(&self) -> SocketAddr {
        self.node.addr()
    }

    /// The channel `name` of messages of type `M`.
    pub fn topic<M: Serialize + DeserializeOwned>(
        &self,
        name: &str,
    ) -> Result<Topic<M>, GridError> {
        Ok(self.node.topic(name)?)
    }

    /// The cache `name` with keys `K` and values `V` (see [`Cache`]): `.await` it, after
    /// optionally giving `.settings(..)` and a `.loader(..)`. The same name is the same
    /// cache on every member; the types are the caller's promise, the settings are
    /// checked (a different one is [`GridError::SettingsConflict`]).
    pub fn cache<K, V>(&self, name: &str) -> CacheBuilder<K, V>
    where
        K: Serialize + DeserializeOwned + Send + Sync + 'static,
        V: Serialize + DeserializeOwned + Send + Sync + 'static,
    {
        CacheBuilder::new(&self.caches, name)
    }

    /// The cluster-wide value `name`, computed by `supplier` (once across the cluster)
    /// when absent (see [`CachedReference`]).
    pub async fn cached_reference<V, F, Fut, E>(
        &self,
        name: &str,
        supplier: F,
    ) -> Result<CachedReference<V>, GridError>
    where
        V: Serialize + DeserializeOwned + Send + Sync + 'static,
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<V, E>> + Send + 'static,
        E: std::fmt::Display,
    {
        grid_cache::reference::open(&self.caches, name, supplier).await
    }

    /// The cluster lock `name` (see [`ClusterLock`]): the same name is the same lock on
    /// every member.
    pub fn lock(&self, name: &str) -> ClusterLock {
        self.locks.lock(name)
    }

    /// The keyed lock `name` (see [`KeyedLock`]): one lock per key of type `K`.
    pub fn keyed_lock<K: Serialize>(&self, name: &str) -> KeyedLock<K> {
        self.locks.keyed_lock(name)
    }

    /// This member's lock service: the quorum's expected cluster size and the operator's
    /// call that lowers it ([`Locks::set_expected_members`]).
    pub fn locks(&self) -> &Locks {
        &self.locks
    }

    /// The bucketed executor `name` with tasks `T` (see [`BucketedExecutor`]): the same
    /// name is the same executor on every member; its settings must agree (a different one
    /// is [`ExecError::SettingsConflict`]). Give a processor in `settings` for this member
    /// to process its tasks; without one it only submits.
    pub async fn bucketed_executor<T, K>(
        &self,
        name: &str,
        settings: BucketedSettings<T, K>,
    ) -> Result<BucketedExecutor<T>, ExecError>
    where
        T: Serialize + DeserializeOwned + Send + Sync + 'static,
        K: Serialize + DeserializeOwned + Send + 'static,
    {
        self.bucketed.open(name, settings).await
    }

    /// This member's executor of named tasks (see [`MemberExecutor`]): register tasks
    /// here, run them on one member, on all, or on the owner of a key.
    pub fn executor(&self) -> &MemberExecutor {
        &self.executor
    }

    /// This member's bucketed executors (tests look inside).
    #[doc(hidden)]
    pub fn bucketed_executors(&self) -> &BucketedExecutors {
        &self.bucketed
    }

    /// This member's scheduler (see [`grid_exec::scheduler`]): jobs that fire once per
    /// cluster, or locally, on an interval, once, or on a cron expression.
    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }

    /// This member's caches (benchmarks and tests look inside).
    #[doc(hidden)]
    pub fn caches(&self) -> &grid_cache::Caches {
        &self.caches
    }

    /// Leaves the cluster gracefully: first hands this member's partitions to the others
    /// (so nothing is lost even without backups), then tells every member it is leaving —
    /// they report it as left at once.
    pub async fn shutdown(&self) {
        self.probe.leaving.store(true, Ordering::Relaxed);
        if self.cluster().local_member().is_data_member() && self.cluster().members().len() > 1 {
            if let Err(e) = self.runtime.drain(Duration::from_secs(60)).await {
                tracing::warn!(error = %e, "partitions not fully handed off before leaving");
            }
        }
        self.node.shutdown().await;
    }

    /// This member's status: the table it routes by, the partitions it owns, the
    /// coordinator's migrations (when it is the coordinator), what it copied.
    pub fn status(&self) -> MemberStatus {
        self.runtime.status()
    }

    /// The status of the live member `member` (by id; lite members may ask too), over the
    /// network — what a dashboard, or the rebalancing harness running members as processes,
    /// watches.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), grid::GridError> {
    /// let grid = grid::Grid::builder().bind("127.0.0.1:0").no_seeds().cluster_name("status-doc").start().await?;
    /// let me = grid.cluster().local_member().id.to_string();
    /// let status = grid.member_status(&me).await?;
    /// assert_eq!(status.member, me);
    /// assert_eq!(grid.status().member, me); // the same, without the network
    /// println!("table v{}, {} partitions owned", status.table_version, status.primaries);
    /// # grid.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn member_status(&self, member: &str) -> Result<MemberStatus, GridError> {
        self.runtime.member_status(member, false).await
    }

    /// The partition runtime (tests, benchmarks and services built on grid).
    #[doc(hidden)]
    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    /// Stops the member abruptly, without telling anyone (as if killed). For tests and demos.
    #[doc(hidden)]
    pub fn kill(&self) {
        self.node.kill();
    }

    /// Marks this member `leaving` in gossip only (see
    /// [`Node::announce_leaving_by_gossip_only`](grid_net::node::Node::announce_leaving_by_gossip_only)).
    /// For tests.
    #[doc(hidden)]
    pub async fn announce_leaving_by_gossip_only(&self) {
        self.node.announce_leaving_by_gossip_only().await;
    }

    /// The transport underneath (for services, tests and benchmarks).
    #[doc(hidden)]
    pub fn transport(&self) -> &grid_net::transport::Transport {
        self.node.transport()
    }
}

/// The README's examples, compiled as doc tests so that they stay true.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
