//! [`Caches`]: a member's caches — opening them (settings checked cluster-wide), their
//! shared per-member state, the loader's single flight on the owner, the expiry sweeper,
//! and the member-to-member requests for statistics, sizes and keys.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::time::Instant;

use futures::future::{BoxFuture, FutureExt, Shared as SharedFuture};
use futures::StreamExt;
use grid_core::codec;
use grid_core::runtime::{OpKind, Runtime, ServiceHandle};
use grid_core::GridError;
use grid_net::membership::Cluster;
use grid_net::transport::Transport;
use grid_net::NetError;
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use crate::copies::{NearCopy, ReplicatedCopy};
use crate::events::{EventHub, EventKind, HandlerGuard, LocalSink, RawEvent, Want};
use crate::ops::{Blob, CacheOp, PutIf};
use crate::settings::{CacheMode, CacheSettings, WriteParams};
use crate::stats::{CacheStatistics, Counters};
use crate::store::CacheService;

/// A loader with its types erased: encoded key → encoded value (or none).
pub(crate) type ErasedLoader =
    Arc<dyn Fn(Vec<u8>) -> BoxFuture<'static, Result<Option<Vec<u8>>, String>> + Send + Sync>;

type Flight = SharedFuture<BoxFuture<'static, Result<Option<Vec<u8>>, String>>>;
/// Flights under way, by (cache, encoded key).
type Flights = HashMap<(Arc<str>, Vec<u8>), Flight>;

/// The internal cache holding every cache's settings, keyed by cache name.
const SETTINGS_CACHE: &str = "__grid.cache-settings";
/// How often the owner looks for expired entries to remove (and report): one tenth of its
/// partitions per tick, so each partition once a second. Reads never see an expired entry
/// whatever the sweeper does; the sweep frees memory and tells listeners.
/// Near copies keep at most this many entries (or `max_entries`, if smaller).
const NEAR_CAPACITY: usize = 100_000;

mod routes {
    pub(super) const LOAD: &str = "cache.load";
    pub(super) const STATS: &str = "cache.stats";
    pub(super) const COUNT: &str = "cache.count";
    pub(super) const SIZES: &str = "cache.sizes";
}

/// The caches' sizes on one member, as [`Caches::sizes`] reports them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberCacheSizes {
    /// The member's id.
    pub member: String,
    /// Entries per cache on that member (the entries it owns; its copy for replicated and
    /// local caches), by cache name; or why the member did not answer.
    pub sizes: Result<Vec<(String, u64)>, String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct LoadRequest {
    cache: String,
    key: Blob,
    params: WriteParams,
}

#[derive(Debug, Serialize, Deserialize)]
enum LoadAnswer {
    Value(Option<Blob>),
    NoLoader,
    Failed(String),
}

/// A member-only store (local mode): the same entry logic, one partition, no network.
pub(crate) struct LocalStore {
    pub(crate) service: CacheService,
    writes: Mutex<()>,
}

impl LocalStore {
    fn new() -> Self {
        let service = CacheService::new(1);
        service.set_owned(1);
        Self {
            service,
            writes: Mutex::new(()),
        }
    }

    /// Runs an operation: prepare and apply under one lock, as the runtime would.
    pub(crate) fn run(&self, op: CacheOp) -> Result<Vec<u8>, GridError> {
        let _one_at_a_time = self.writes.lock().unwrap_or_else(|e| e.into_inner());
        let decided = self.service.prepare_op(0, op)?;
        if let Some(change) = decided.change {
            self.service.apply_change(0, change, true)?;
        }
        Ok(decided.answer.0)
    }
}

/// One cache's state on this member, shared by its handles.
pub(crate) struct Shared {
    pub(crate) name: Arc<str>,
    pub(crate) settings: CacheSettings,
    pub(crate) params: WriteParams,
    pub(crate) counters: Counters,
    pub(crate) loader: RwLock<Option<ErasedLoader>>,
    pub(crate) near: Option<Arc<NearCopy>>,
    pub(crate) replicated: Option<Arc<ReplicatedCopy>>,
    pub(crate) local: Option<Arc<LocalStore>>,
    /// Keeps the copies' event handlers registered while the cache is open here.
    _guards: Vec<HandlerGuard>,
}

impl Shared {
    pub(crate) fn loader(&self) -> Option<ErasedLoader> {
        self.loader
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

pub(crate) struct Inner {
    pub(crate) runtime: Runtime,
    /// The cache service's door to the runtime.
    pub(crate) handle: ServiceHandle<CacheService>,
    pub(crate) transport: Transport,
    pub(crate) cluster: Cluster,
    pub(crate) service: Arc<CacheService>,
    pub(crate) hub: Arc<EventHub>,
    opened: tokio::sync::Mutex<HashMap<String, Arc<Shared>>>,
    /// The same map, readable without waiting (for the sweeper and the routes).
    open_now: RwLock<HashMap<String, Arc<Shared>>>,
    flights: Mutex<Flights>,
}

/// A member's caches. Cheap to clone.
#[derive(Clone)]
pub struct Caches {
    pub(crate) inner: Arc<Inner>,
}

impl Inner {
    /// Runs `op` on partition `p`'s owner; the answer as the operation's caller decodes it.
    pub(crate) async fn run(
        &self,
        p: u32,
        op: CacheOp,
        kind: OpKind,
    ) -> Result<Vec<u8>, GridError> {
        Ok(self.handle.execute(p, op, kind).await??.0)
    }
}

impl std::fmt::Debug for Caches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Caches").finish()
    }
}

impl Caches {
    /// Starts the cache service on a member: registers it with the runtime, its routes,
    /// the event hub and the expiry sweeper.
    pub fn start(runtime: Runtime, transport: Transport, cluster: Cluster) -> Self {
        let service = Arc::new(CacheService::new(runtime.config().table.partitions));
        let handle = runtime.register_service(service.clone());
        let hub = EventHub::start(handle.clone(), cluster.clone());
        service.set_sink(hub.clone());
        service.set_hub(Arc::downgrade(&hub));
        let inner = Arc::new(Inner {
            runtime,
            handle,
            transport,
            cluster,
            service,
            hub,
            opened: tokio::sync::Mutex::new(HashMap::new()),
            open_now: RwLock::new(HashMap::new()),
            flights: Mutex::new(HashMap::new()),
        });
        register_routes(&inner);
        tokio::spawn(sweep(Arc::downgrade(&inner)));
        Self { inner }
    }

    /// The partitioned store (benchmarks and tests look at it).
    pub fn service(&self) -> &Arc<CacheService> {
        &self.inner.service
    }

    /// Events this member could not queue for sending (a full outbox).
    pub fn events_dropped(&self) -> u64 {
        self.inner.hub.dropped()
    }

    /// Opens `name` with `settings` on this member (or returns its state if already
    /// open with the same settings).
    pub(crate) async fn open(
        &self,
        name: &str,
        settings: CacheSettings,
        loader: Option<ErasedLoader>,
    ) -> Result<Arc<Shared>, GridError> {
        if name.is_empty() || name.starts_with("__grid.") {
            return Err(GridError::NotAllowed(format!(
                "cache name {name:?} is empty or reserved"
            )));
        }
        let mut opened = self.inner.opened.lock().await;
        if let Some(shared) = opened.get(name) {
            if shared.settings != settings {
                return Err(conflict(name, &shared.settings, &settings));
            }
            if let Some(l) = loader {
                *shared.loader.write().unwrap_or_else(|e| e.into_inner()) = Some(l);
            }
            return Ok(shared.clone());
        }
        self.check_cluster_settings(name, &settings).await?;
        let inner = &self.inner;
        let mut guards = Vec::new();
        let (mut near, mut replicated, mut local) = (None, None, None);
        match settings.mode() {
            CacheMode::Partitioned => {}
            CacheMode::Near => {
                let cap = settings
                    .max_entries()
                    .map_or(NEAR_CAPACITY, |m| (m as usize).min(NEAR_CAPACITY));
                let copy = Arc::new(NearCopy::new(cap));
                let c = copy.clone();
                guards.push(
                    inner
                        .hub
                        .add_handler(name, Want::Keys, Arc::new(move |ev| c.on_event(ev)))
                        .await,
                );
                near = Some(copy);
            }
            CacheMode::Replicated => {
                let copy = Arc::new(ReplicatedCopy::new(inner.runtime.config().table.partitions));
                copy.begin_fill();
                let (c, weak, cache) =
                    (copy.clone(), Arc::downgrade(inner), Arc::<str>::from(name));
                let handler = move |ev: &RawEvent| {
                    // Lost events: fill the copy again from the owners.
                    if ev.kind == EventKind::Lost {
                        if c.lost() {
                            tokio::spawn(refill(weak.clone(), cache.clone(), c.clone()));
                        }
                    } else {
                        c.on_event(ev)
                    }
                };
                guards.push(
                    inner
                        .hub
                        .add_handler(name, Want::Values, Arc::new(handler))
                        .await,
                );
                // Every member now sends this one the changes; fetch what is already
                // there (changes that arrive meanwhile win over the fetched values).
                let entries = self.all_entries(name, true).await?;
                copy.fill(entries);
                if copy.end_fill() && copy.lost() {
                    tokio::spawn(refill(Arc::downgrade(inner), name.into(), copy.clone()));
                }
                replicated = Some(copy);
            }
            CacheMode::Local => {
                let store = Arc::new(LocalStore::new());
                store
                    .service
                    .set_sink(Arc::new(LocalSink(Arc::downgrade(&inner.hub))));
                local = Some(store);
            }
        }
        let shared = Arc::new(Shared {
            name: name.into(),
            params: settings.write_params(),
            counters: Counters::new(settings.statistics()),
            settings,
            loader: RwLock::new(loader),
            near,
            replicated,
            local,
            _guards: guards,
        });
        opened.insert(name.to_string(), shared.clone());
        inner
            .open_now
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), shared.clone());
        Ok(shared)
    }

    /// Records `settings` for `name` in the cluster, or checks them against the recorded
    /// ones.
    async fn check_cluster_settings(
        &self,
        name: &str,
        settings: &CacheSettings,
    ) -> Result<(), GridError> {
        let key = codec::encode(name)?;
        let p = self.inner.runtime.partition_of(&key);
        let op = CacheOp::Put {
            cache: SETTINGS_CACHE.into(),
            key: Blob(key),
            value: Blob(codec::encode(settings)?),
            cond: PutIf::Absent,
            params: WriteParams::default(),
        };
        let answer = match self.inner.run(p, op, OpKind::Write).await {
            Ok(a) => a,
            // The owner vanished mid-call: read back what is recorded.
            Err(GridError::Indeterminate(_)) => {
                let op = CacheOp::Get {
                    cache: SETTINGS_CACHE.into(),
                    key: Blob(codec::encode(name)?),
                };
                let got: Option<(Blob, u64)> =
                    codec::decode(&self.inner.run(p, op, OpKind::Read).await?)?;
                codec::encode(&got.map(|(b, _)| b))?
            }
            Err(e) => return Err(e),
        };
        let existing: Option<Blob> = codec::decode(&answer)?;
        if let Some(existing) = existing {
            let existing: CacheSettings = codec::decode(&existing.0)?;
            if &existing != settings {
                return Err(conflict(name, &existing, settings));
            }
        }
        Ok(())
    }

    /// Fault injection for tests: the next `n` batches of cache events this member sends
    /// to other members fail, as a broken connection would make them.
    #[doc(hidden)]
    pub fn fail_next_event_batches(&self, n: u64) {
        self.inner.hub.fail_next_batches(n);
    }

    /// Fault injection for tests: the next `n` events this member's owners emit are dropped,
    /// as a full event outbox drops them.
    #[doc(hidden)]
    pub fn drop_next_events(&self, n: u64) {
        self.inner.hub.drop_next_events(n);
    }

    /// Fault injection for tests: the next `n` announcements of this member's interest in a
    /// cache's events do not reach the member they are sent to.
    #[doc(hidden)]
    pub fn fail_next_interest_announcements(&self, n: u64) {
        self.inner.hub.fail_next_announcements(n);
    }

    /// For tests: how many callers wait on this member's load of the encoded `key` of
    /// `cache` (callers on other members wait here too, through the key's owner); 0 when no
    /// load of it is under way.
    #[doc(hidden)]
    pub fn callers_waiting_for_load(&self, cache: &str, key: &[u8]) -> usize {
        let id: (Arc<str>, Vec<u8>) = (Arc::from(cache), key.to_vec());
        self.inner
            .flights
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            // One clone is the map's own.
            .and_then(|f| f.strong_count())
            .map_or(0, |n| n.saturating_sub(1))
    }

    /// Every live entry of `cache`, read from each partition's owner (keys only unless
    /// `values`): (key, value, expire_at, idle_ms). One bounded answer per partition.
    pub(crate) async fn all_entries(
        &self,
        cache: &str,
        values: bool,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>, u64, u32)>, GridError> {
        let inner = &self.inner;
        let op = CacheOp::Entries {
            cache: cache.to_string(),
            values,
        };
        let reads = (0..inner.runtime.table().partitions()).map(|p| {
            let op = op.clone();
            async move {
                let answer = inner.run(p, op, OpKind::Read).await?;
                Ok::<_, GridError>(codec::decode::<Vec<(Blob, Blob, u64, u32)>>(&answer)?)
            }
        });
        let mut all = Vec::new();
        let mut results = futures::stream::iter(reads).buffer_unordered(16);
        while let Some(part) = results.next().await {
            all.extend(part?.into_iter().map(|(k, v, e, i)| (k.0, v.0, e, i)));
        }
        Ok(all)
    }

    /// The number of live entries of `cache` the members own, summed.
    pub(crate) async fn member_count(&self, cache: &str) -> Result<u64, GridError> {
        let counts = self
            .ask_all(routes::COUNT, &cache.to_string(), |inner| {
                owned_count(inner, cache)
            })
            .await?;
        Ok(counts.into_iter().sum())
    }

    /// Statistics of `cache` on every member.
    pub(crate) async fn member_statistics(
        &self,
        cache: &str,
    ) -> Result<Vec<CacheStatistics>, GridError> {
        self.ask_all(routes::STATS, &cache.to_string(), |inner| {
            local_statistics(inner, cache)
        })
        .await
    }

    pub(crate) fn local_statistics(&self, cache: &str) -> CacheStatistics {
        local_statistics(&self.inner, cache)
    }

    /// This member's statistics of each cache opened on it, by name.
    pub fn opened_statistics(&self) -> Vec<(String, CacheStatistics)> {
        let mut names: Vec<String> = self
            .inner
            .open_now
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        names.sort_unstable();
        names
            .into_iter()
            .map(|n| {
                let s = local_statistics(&self.inner, &n);
                (n, s)
            })
            .collect()
    }

    /// The name of every cache opened in the cluster so far (each one's settings are
    /// recorded when it is first opened), sorted.
    pub async fn cluster_cache_names(&self) -> Result<Vec<String>, GridError> {
        let mut names = Vec::new();
        for (key, _, _, _) in self.all_entries(SETTINGS_CACHE, false).await? {
            names.push(codec::decode::<String>(&key)?);
        }
        names.sort_unstable();
        Ok(names)
    }

    /// Every cache's size on every live member, asked of each (this one included); a
    /// member that does not answer within the operation timeout is reported with the
    /// reason.
    pub async fn sizes(&self) -> Result<Vec<MemberCacheSizes>, GridError> {
        let names = self.cluster_cache_names().await?;
        let timeout = self.inner.runtime.config().op_timeout;
        let me = self.inner.runtime.member_id().clone();
        let members = self.inner.cluster.members();
        let asks = members.iter().map(|m| {
            let names = &names;
            let me = &me;
            async move {
                let sizes = if m.id == *me {
                    Ok(sizes_here(&self.inner, names))
                } else {
                    self.inner
                        .transport
                        .request_typed::<_, Vec<(String, u64)>>(
                            m.addr,
                            routes::SIZES,
                            names,
                            timeout,
                        )
                        .await
                        .map_err(|e| e.to_string())
                };
                MemberCacheSizes {
                    member: m.id.to_string(),
                    sizes,
                }
            }
        });
        Ok(futures::future::join_all(asks).await)
    }

    /// Asks every live member: the others over the network, this one by `local`.
    async fn ask_all<Req, Resp>(
        &self,
        route: &str,
        req: &Req,
        local: impl FnOnce(&Inner) -> Resp,
    ) -> Result<Vec<Resp>, GridError>
    where
        Req: Serialize + Sync,
        Resp: serde::de::DeserializeOwned,
    {
        let timeout = self.inner.runtime.config().op_timeout;
        let me = self.inner.runtime.member_id().clone();
        let asks = self
            .inner
            .cluster
            .members()
            .iter()
            .filter(|m| m.id != me)
            .map(|m| {
                let addr = m.addr;
                async move {
                    self.inner
                        .transport
                        .request_typed::<Req, Resp>(addr, route, req, timeout)
                        .await
                }
            })
            .collect::<Vec<_>>();
        let mut out = vec![local(&self.inner)];
        for r in futures::future::join_all(asks).await {
            out.push(r?);
        }
        Ok(out)
    }

    /// Loads `key` of `shared`'s cache once across the cluster: on the key's owner when it
    /// has the cache's loader, else here (still once per member).
    pub(crate) async fn load(
        &self,
        shared: &Arc<Shared>,
        key: &[u8],
    ) -> Result<Option<Vec<u8>>, GridError> {
        let inner = &self.inner;
        if shared.local.is_none() {
            let p = inner.runtime.partition_of(key);
            let owner = inner.runtime.table().owner(p).cloned();
            if let Some(owner) = owner.filter(|o| *o != *inner.runtime.member_id()) {
                if let Some(m) = inner.cluster.member(&owner) {
                    let req = LoadRequest {
                        cache: shared.name.to_string(),
                        key: Blob(key.to_vec()),
                        params: shared.params,
                    };
                    let r: Result<LoadAnswer, _> = inner
                        .transport
                        .request_typed(
                            m.addr,
                            routes::LOAD,
                            &req,
                            inner.runtime.config().op_timeout,
                        )
                        .await;
                    match r {
                        Ok(LoadAnswer::Value(v)) => return Ok(v.map(|b| b.0)),
                        Ok(LoadAnswer::Failed(message)) => {
                            return Err(GridError::Loader {
                                cache: shared.name.to_string(),
                                message,
                            })
                        }
                        Ok(LoadAnswer::NoLoader) => {}
                        // Only an owner that was never reached leaves the loading to us; one
                        // that is slow may be loading still (loading here too would run the
                        // loader twice).
                        Err(e @ (NetError::Unreachable { .. } | NetError::Refused { .. })) => {
                            debug!(error = %e, "owner unreachable; loading here")
                        }
                        Err(e) => {
                            return Err(GridError::Loader {
                                cache: shared.name.to_string(),
                                message: format!("the key's owner did not answer: {e}"),
                            })
                        }
                    }
                }
            }
        }
        let loader = shared.loader().ok_or_else(|| {
            GridError::NotAllowed(format!("cache {:?} has no loader", shared.name))
        })?;
        fly(inner, shared.clone(), loader, key.to_vec())
            .await
            .map_err(|message| GridError::Loader {
                cache: shared.name.to_string(),
                message,
            })
    }
}

fn conflict(name: &str, existing: &CacheSettings, requested: &CacheSettings) -> GridError {
    GridError::SettingsConflict {
        cache: name.to_string(),
        existing: format!("{existing:?}"),
        requested: format!("{requested:?}"),
    }
}

/// Joins or starts the single flight loading `key`: the loader runs once however many
/// callers wait; its value is stored (unless someone stored one meanwhile, which wins).
fn fly(
    inner: &Arc<Inner>,
    shared: Arc<Shared>,
    loader: ErasedLoader,
    key: Vec<u8>,
) -> impl Future<Output = Result<Option<Vec<u8>>, String>> {
    let id = (shared.name.clone(), key.clone());
    let mut flights = inner.flights.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(f) = flights.get(&id) {
        return f.clone();
    }
    let weak = Arc::downgrade(inner);
    let flight_id = id.clone();
    let flight = async move {
        let result = load_and_store(&weak, &shared, &loader, key).await;
        if let Some(inner) = weak.upgrade() {
            inner
                .flights
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&flight_id);
        }
        result
    }
    .boxed()
    .shared();
    flights.insert(id, flight.clone());
    flight
}

async fn load_and_store(
    inner: &std::sync::Weak<Inner>,
    shared: &Arc<Shared>,
    loader: &ErasedLoader,
    key: Vec<u8>,
) -> Result<Option<Vec<u8>>, String> {
    let inner = inner.upgrade().ok_or("member stopped")?;
    let caches = Caches {
        inner: inner.clone(),
    };
    // A caller that missed just before the previous flight stored its value must not
    // load again.
    if let Ok(Some(v)) = crate::cache::lookup(&caches, shared, &key).await {
        return Ok(Some(v));
    }
    let started = Instant::now();
    // A panicking loader is an error for its waiters, not a poisoned flight.
    let loaded = std::panic::AssertUnwindSafe(loader(key.clone()))
        .catch_unwind()
        .await
        .unwrap_or_else(|_| Err("the loader panicked".to_string()));
    shared.counters.load(loaded.is_ok(), started.elapsed());
    let Some(value) = loaded? else {
        return Ok(None);
    };
    let op = CacheOp::Put {
        cache: shared.name.to_string(),
        key: Blob(key.clone()),
        value: Blob(value.clone()),
        cond: PutIf::Absent,
        params: shared.params,
    };
    let existing: Option<Blob> =
        match crate::cache::execute(&caches, shared, &key, &op, OpKind::Write).await {
            Ok(answer) => codec::decode(&answer).map_err(|e| e.to_string())?,
            Err(e) => {
                warn!(cache = %shared.name, error = %e, "loaded value not stored");
                None
            }
        };
    shared.counters.put(existing.is_none() as u64);
    let value = existing.map(|b| b.0).unwrap_or(value);
    crate::cache::invalidate_near(shared, &key);
    Ok(Some(value))
}

fn shared_of(inner: &Inner, cache: &str) -> Option<Arc<Shared>> {
    inner
        .open_now
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .get(cache)
        .cloned()
}

fn owned_partitions(inner: &Inner) -> Vec<u32> {
    let table = inner.runtime.table();
    let me = inner.runtime.member_id();
    (0..table.partitions())
        .filter(|p| table.owner(*p) == Some(me))
        .collect()
}

fn owned_count(inner: &Inner, cache: &str) -> u64 {
    inner
        .service
        .count(cache, owned_partitions(inner).into_iter()) as u64
}

fn local_statistics(inner: &Inner, cache: &str) -> CacheStatistics {
    let shared = shared_of(inner, cache);
    let mut stats = shared
        .as_ref()
        .map(|s| s.counters.snapshot())
        .unwrap_or_default();
    let local = shared.as_ref().and_then(|s| s.local.clone());
    let replicated = shared.as_ref().and_then(|s| s.replicated.clone());
    let (size, heap, store_counters) = match (local, replicated) {
        (Some(store), _) => {
            let svc = &store.service;
            (
                svc.count(cache, 0..1) as u64,
                svc.heap_estimate(cache, 0..1),
                svc.counters_if_any(cache),
            )
        }
        (None, Some(copy)) => (
            copy.len() as u64,
            copy.heap(),
            inner.service.counters_if_any(cache),
        ),
        (None, None) => {
            let owned = owned_partitions(inner);
            (
                inner.service.count(cache, owned.iter().copied()) as u64,
                inner.service.heap_estimate(cache, owned.into_iter()),
                inner.service.counters_if_any(cache),
            )
        }
    };
    stats.size = size;
    stats.heap_size = heap;
    // Looked up, not created: any member may ask about any name.
    if let Some(c) = store_counters.filter(|_| shared.as_ref().is_none_or(|s| s.counters.enabled)) {
        stats.evictions = c.evictions.load(std::sync::atomic::Ordering::Relaxed);
        stats.expirations = c.expirations.load(std::sync::atomic::Ordering::Relaxed);
    }
    stats
}

/// The size of each of `names` on this member.
fn sizes_here(inner: &Inner, names: &[String]) -> Vec<(String, u64)> {
    names
        .iter()
        .take(MAX_SIZES)
        .map(|n| (n.clone(), local_statistics(inner, n).size))
        .collect()
}

/// Caches one size request may ask about.
const MAX_SIZES: usize = 10_000;

fn register_routes(inner: &Arc<Inner>) {
    let t = &inner.transport;
    let weak = Arc::downgrade(inner);
    t.on_request_typed(routes::SIZES, move |_peer, names: Vec<String>| {
        let inner = weak.upgrade();
        async move {
            let inner = inner.ok_or("member stopped")?;
            Ok(sizes_here(&inner, &names))
        }
    });
    let weak = Arc::downgrade(inner);
    t.on_request_typed(routes::LOAD, move |_peer, req: LoadRequest| {
        let inner = weak.upgrade();
        async move {
            let inner = inner.ok_or("member stopped")?;
            let Some(shared) = shared_of(&inner, &req.cache) else {
                return Ok(LoadAnswer::NoLoader);
            };
            let Some(loader) = shared.loader() else {
                return Ok(LoadAnswer::NoLoader);
            };
            Ok(match fly(&inner, shared, loader, req.key.0).await {
                Ok(v) => LoadAnswer::Value(v.map(Blob)),
                Err(e) => LoadAnswer::Failed(e),
            })
        }
    });
    let weak = Arc::downgrade(inner);
    t.on_request_typed(routes::STATS, move |_peer, cache: String| {
        let inner = weak.upgrade();
        async move {
            let inner = inner.ok_or("member stopped")?;
            Ok(local_statistics(&inner, &cache))
        }
    });
    let weak = Arc::downgrade(inner);
    t.on_request_typed(routes::COUNT, move |_peer, cache: String| {
        let inner = weak.upgrade();
        async move {
            let inner = inner.ok_or("member stopped")?;
            Ok(owned_count(&inner, &cache))
        }
    });
}

/// Removes the expired entries of the member-only stores (a partitioned cache's owners
/// expire theirs on a timer of each partition: see `CacheService::on_timer`).
async fn sweep(inner: std::sync::Weak<Inner>) {
    let mut tick = tokio::time::interval(crate::store::EXPIRY_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let locals: Vec<Arc<LocalStore>> = inner
            .open_now
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter_map(|s| s.local.clone())
            .collect();
        drop(inner);
        for store in locals {
            if !store.service.with_expired(0..1).is_empty() {
                let _ = store.run(CacheOp::Expire {
                    limit: crate::store::EXPIRY_BATCH,
                });
            }
        }
    }
}

/// A seed for the jitter of `name`'s retries (repeatable under a simulator's seed).
fn fnv_seed(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Fills a replicated copy again after events were lost (its fill is begun), until a fill
/// completes with no loss meanwhile; a failed read of the owners is retried.
async fn refill(inner: std::sync::Weak<Inner>, cache: Arc<str>, copy: Arc<ReplicatedCopy>) {
    let mut backoff = grid_net::backoff::Backoff::new(
        Duration::from_millis(50),
        Duration::from_secs(2),
        fnv_seed(&cache),
    );
    loop {
        let Some(inner) = inner.upgrade() else { return };
        let caches = Caches { inner };
        match caches.all_entries(&cache, true).await {
            Ok(entries) => {
                copy.fill(entries);
                if !(copy.end_fill() && copy.lost()) {
                    return;
                }
            }
            Err(e) => {
                warn!(%cache, error = %e, "replicated copy not refilled; retrying");
                drop(caches);
                // Unbounded attempts: a replicated copy is refilled until it is whole.
                let delay = backoff.next_delay().unwrap_or(Duration::from_secs(2));
                tokio::time::sleep(delay).await;
            }
        }
    }
}
