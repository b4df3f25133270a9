//! [`Cache<K, V>`]: the typed handle on one named cache, and [`CacheBuilder`], which opens
//! one.

use std::collections::HashMap;
use std::fmt::Display;
use std::future::{Future, IntoFuture};
use std::hash::Hash;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::time::Instant;

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use grid_core::codec;
use grid_core::runtime::OpKind;
use grid_core::GridError;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::mpsc;
use tracing::warn;

use crate::caches::{Caches, ErasedLoader, Shared};
use crate::events::{EventKind, HandlerGuard, RawEvent, Want};
use crate::ops::{Blob, CacheOp, PutIf};
use crate::processor::{erase, ProcessorEntry};
use crate::settings::{CacheSettings, Expiry, WriteParams};
use crate::stats::CacheStatistics;
use crate::store::SERVICE;

/// Callers running at once in `get_all`, `put_all`, `execute_on_keys` and `remove_all`.
const FAN_OUT: usize = 64;
/// Events a listener can fall behind by before new ones are dropped (and counted).
const LISTENER_QUEUE: usize = 16_384;

/// A named cache: entries of serde keys and values, stored encoded, shared by the whole
/// cluster (see [`crate::CacheMode`] for where entries live). Cheap to clone; the same name
/// is the same cache on every member.
///
/// In partitioned and near modes a write is acknowledged once the key's owner and every
/// live synchronous backup have it; reads of keys this member owns are served from local
/// memory without a network hop.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), grid_core::GridError> {
/// # let grid = grid::Grid::builder().bind("127.0.0.1:0").no_seeds().cluster_name("cache-doc").start().await?;
/// use std::time::Duration;
/// use grid::{CacheSettings, Expiry};
///
/// let users = grid.cache::<u64, String>("users").await?;
/// users.put(&42, &"ada".to_string()).await?;
/// assert_eq!(users.get(&42).await?, Some("ada".to_string()));
/// assert_eq!(users.put_if_absent(&42, &"bob".to_string()).await?, Some("ada".to_string()));
/// assert!(users.replace_if(&42, &"ada".to_string(), &"grace".to_string()).await?);
/// users.put_with(&7, &"short-lived".to_string(), Expiry::after_write(Duration::from_secs(30))).await?;
/// assert_eq!(users.len().await?, 2);
/// assert_eq!(users.remove(&42).await?, Some("grace".to_string()));
/// assert!(!users.contains_key(&42).await?);
///
/// // Read-through: the loader runs once per missing key, on the key's owner.
/// let squares = grid
///     .cache::<u64, u64>("squares")
///     .settings(CacheSettings::builder().expire_after_write(Duration::from_secs(60)).build())
///     .loader(|k: u64| async move { Ok::<_, String>(Some(k * k)) })
///     .await?;
/// assert_eq!(squares.get(&12).await?, Some(144));
/// assert_eq!(squares.statistics().loads, 1);
/// # grid.shutdown().await;
/// # Ok(()) }
/// ```
pub struct Cache<K, V> {
    caches: Caches,
    shared: Arc<Shared>,
    _types: PhantomData<fn(K) -> V>,
}

impl<K, V> Clone for Cache<K, V> {
    fn clone(&self) -> Self {
        Self {
            caches: self.caches.clone(),
            shared: self.shared.clone(),
            _types: PhantomData,
        }
    }
}

impl<K, V> std::fmt::Debug for Cache<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("name", &self.shared.name)
            .field("settings", &self.shared.settings)
            .finish()
    }
}

/// Opens a cache: `.settings(..)` and `.loader(..)` are optional; `.await` it.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), grid_core::GridError> {
/// # let grid = grid::Grid::builder().bind("127.0.0.1:0").no_seeds().cluster_name("builder-doc").start().await?;
/// use grid::{CacheMode, CacheSettings};
/// let sessions = grid
///     .cache::<String, Vec<u8>>("sessions")
///     .settings(CacheSettings::builder().mode(CacheMode::Near).max_entries(50_000).build())
///     .await?;
/// // The same name with other settings is refused.
/// let clash = grid.cache::<String, Vec<u8>>("sessions").await;
/// assert!(matches!(clash, Err(grid_core::GridError::SettingsConflict { .. })));
/// # drop(sessions); grid.shutdown().await;
/// # Ok(()) }
/// ```
#[must_use = "a cache builder does nothing until awaited"]
pub struct CacheBuilder<K, V> {
    caches: Caches,
    name: String,
    settings: CacheSettings,
    loader: Option<ErasedLoader>,
    _types: PhantomData<fn(K) -> V>,
}

impl<K, V> std::fmt::Debug for CacheBuilder<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheBuilder")
            .field("name", &self.name)
            .finish()
    }
}

impl<K, V> CacheBuilder<K, V>
where
    K: Serialize + DeserializeOwned + Send + Sync + 'static,
    V: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    /// A builder for the cache `name` of `caches` (see `Grid::cache`).
    pub fn new(caches: &Caches, name: &str) -> Self {
        Self {
            caches: caches.clone(),
            name: name.to_string(),
            settings: CacheSettings::default(),
            loader: None,
            _types: PhantomData,
        }
    }

    /// The cache's settings (default: [`CacheSettings::default`]).
    pub fn settings(mut self, settings: CacheSettings) -> Self {
        self.settings = settings;
        self
    }

    /// The read-through loader: called on a miss, once per key across the cluster (on the
    /// key's owner), its value stored. `Ok(None)` means "no value" (nothing stored); an
    /// `Err` reaches every waiting caller as [`GridError::Loader`] and is not cached.
    /// Every member should open the cache with the same loader.
    pub fn loader<F, Fut, E>(mut self, loader: F) -> Self
    where
        F: Fn(K) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Option<V>, E>> + Send + 'static,
        E: Display,
    {
        let loader = Arc::new(loader);
        self.loader = Some(Arc::new(move |key: Vec<u8>| {
            let loader = loader.clone();
            async move {
                let key: K = codec::decode(&key).map_err(|e| e.to_string())?;
                match loader(key).await {
                    Ok(Some(v)) => codec::encode(&v).map(Some).map_err(|e| e.to_string()),
                    Ok(None) => Ok(None),
                    Err(e) => Err(e.to_string()),
                }
            }
            .boxed()
        }));
        self
    }

    /// Opens the cache (what `.await` does).
    pub async fn open(self) -> Result<Cache<K, V>, GridError> {
        let shared = self
            .caches
            .open(&self.name, self.settings, self.loader)
            .await?;
        Ok(Cache {
            caches: self.caches,
            shared,
            _types: PhantomData,
        })
    }
}

impl<K, V> IntoFuture for CacheBuilder<K, V>
where
    K: Serialize + DeserializeOwned + Send + Sync + 'static,
    V: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    type Output = Result<Cache<K, V>, GridError>;
    type IntoFuture = BoxFuture<'static, Self::Output>;

    fn into_future(self) -> Self::IntoFuture {
        self.open().boxed()
    }
}

/// Runs `op` on the key's owner (or in the member-only store).
pub(crate) async fn execute(
    caches: &Caches,
    shared: &Shared,
    key: &[u8],
    op: &CacheOp,
    kind: OpKind,
) -> Result<Vec<u8>, GridError> {
    let started = Instant::now();
    let result = if let Some(local) = &shared.local {
        local.run(op.clone())
    } else {
        let p = caches.inner.runtime.partition_of(key);
        caches.inner.run(p, op.clone(), kind).await
    };
    observe(op.name(), started, &result);
    result
}

/// Records one cache operation: its latency, and its error if it failed.
fn observe<T>(op: &'static str, started: Instant, result: &Result<T, GridError>) {
    metrics::histogram!("grid_operation_duration_seconds", "service" => SERVICE, "op" => op)
        .record(started.elapsed().as_secs_f64());
    if let Err(e) = result {
        metrics::counter!(
            "grid_operation_errors_total",
            "service" => SERVICE,
            "op" => op,
            "error" => e.kind()
        )
        .increment(1);
    }
}

/// The current value of an encoded key, as this member sees it: no loader, no statistics.
pub(crate) async fn lookup(
    caches: &Caches,
    shared: &Shared,
    key: &[u8],
) -> Result<Option<Vec<u8>>, GridError> {
    let started = Instant::now();
    let result = lookup_untimed(caches, shared, key).await;
    observe("get", started, &result);
    result
}

async fn lookup_untimed(
    caches: &Caches,
    shared: &Shared,
    key: &[u8],
) -> Result<Option<Vec<u8>>, GridError> {
    if let Some(local) = &shared.local {
        return Ok(local.service.get_local(0, &shared.name, key, true));
    }
    if let Some(copy) = &shared.replicated {
        return Ok(copy.get(key));
    }
    let runtime = &caches.inner.runtime;
    let p = runtime.partition_of(key);
    if runtime.owns(p) {
        // The owner's own store: as cheap as a near copy, and never behind (an owner's near
        // copy is invalidated only when its event goes round, after the write's answer).
        let found = caches.inner.service.get_with_deadline(p, &shared.name, key);
        return Ok(found.map(|(value, _)| value));
    }
    let mark = match &shared.near {
        Some(near) => match near.get(key) {
            Some(v) => return Ok(Some(v)),
            None => Some(near.mark(key)),
        },
        None => None,
    };
    let found = {
        let op = CacheOp::Get {
            cache: shared.name.to_string(),
            key: Blob(key.to_vec()),
        };
        let answer = caches.inner.run(p, op, OpKind::Read).await?;
        codec::decode::<Option<(Blob, u64)>>(&answer)?.map(|(b, d)| (b.0, d))
    };
    Ok(found.map(|(value, deadline)| {
        if let (Some(near), Some(mark)) = (&shared.near, mark) {
            near.insert(key, value.clone(), deadline, mark);
        }
        value
    }))
}

/// Drops this member's near copy of a key it just changed (the owner's invalidation
/// follows; this makes the writer read its own write at once). Replicated copies are left to
/// the owner's events, which carry every change in the owner's order: applying a write here
/// too could put an older value over a newer one that arrived first.
pub(crate) fn invalidate_near(shared: &Shared, key: &[u8]) {
    if let Some(near) = &shared.near {
        near.invalidate(key);
    }
}

fn decode_opt<V: DeserializeOwned>(raw: Option<Vec<u8>>) -> Result<Option<V>, GridError> {
    raw.map(|b| codec::decode(&b).map_err(GridError::from))
        .transpose()
}

fn decode_old<V: DeserializeOwned>(answer: &[u8]) -> Result<Option<V>, GridError> {
    let raw: Option<Blob> = codec::decode(answer)?;
    decode_opt(raw.map(|b| b.0))
}

impl<K, V> Cache<K, V>
where
    K: Serialize + DeserializeOwned + Send + Sync + 'static,
    V: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    /// The cache's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The cache's settings.
    pub fn settings(&self) -> &CacheSettings {
        &self.shared.settings
    }

    async fn run(&self, key: &[u8], op: &CacheOp, kind: OpKind) -> Result<Vec<u8>, GridError> {
        execute(&self.caches, &self.shared, key, op, kind).await
    }

    fn put_op(&self, key: Vec<u8>, value: Vec<u8>, cond: PutIf, params: WriteParams) -> CacheOp {
        CacheOp::Put {
            cache: self.shared.name.to_string(),
            key: Blob(key),
            value: Blob(value),
            cond,
            params,
        }
    }

    /// The value of `key`; on a miss, the loader's (if the cache has one).
    pub async fn get(&self, key: &K) -> Result<Option<V>, GridError> {
        let key = codec::encode(key)?;
        let started = Instant::now();
        if let Some(v) = lookup(&self.caches, &self.shared, &key).await? {
            self.shared.counters.hit();
            return Ok(Some(codec::decode(&v)?));
        }
        let loaded = match self.shared.loader() {
            Some(_) => self.caches.load(&self.shared, &key).await,
            None => Ok(None),
        };
        self.shared.counters.miss(started.elapsed());
        if let Ok(Some(_)) = &loaded {
            invalidate_near(&self.shared, &key);
        }
        decode_opt(loaded?)
    }

    /// The value of `key`, or the one `supplier` makes (stored, unless another caller
    /// stored one first: that one is returned).
    pub async fn get_or_insert_with<F, Fut>(&self, key: &K, supplier: F) -> Result<V, GridError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V>,
    {
        if let Some(v) = self.get(key).await? {
            return Ok(v);
        }
        let value = supplier().await;
        Ok(self.put_if_absent(key, &value).await?.unwrap_or(value))
    }

    /// The values of `keys` that have one (loading misses, if the cache has a loader).
    pub async fn get_all<'a>(
        &self,
        keys: impl IntoIterator<Item = &'a K>,
    ) -> Result<HashMap<K, V>, GridError>
    where
        K: Eq + Hash + Clone + 'a,
    {
        let gets = keys
            .into_iter()
            .map(|k| async move { self.get(k).await.map(|v| v.map(|v| (k.clone(), v))) });
        let mut found = HashMap::new();
        let mut results = futures::stream::iter(gets).buffer_unordered(FAN_OUT);
        while let Some(r) = results.next().await {
            if let Some((k, v)) = r? {
                found.insert(k, v);
            }
        }
        Ok(found)
    }

    /// Whether `key` has a value (never calls the loader).
    pub async fn contains_key(&self, key: &K) -> Result<bool, GridError> {
        let key = codec::encode(key)?;
        if let Some(local) = &self.shared.local {
            return Ok(local
                .service
                .get_local(0, &self.shared.name, &key, false)
                .is_some());
        }
        if let Some(copy) = &self.shared.replicated {
            return Ok(copy.contains(&key));
        }
        let runtime = &self.caches.inner.runtime;
        let p = runtime.partition_of(&key);
        if runtime.owns(p) {
            return Ok(self
                .caches
                .inner
                .service
                .get_local(p, &self.shared.name, &key, false)
                .is_some());
        }
        let op = CacheOp::ContainsKey {
            cache: self.shared.name.to_string(),
            key: Blob(key.clone()),
        };
        Ok(codec::decode(&self.run(&key, &op, OpKind::Read).await?)?)
    }

    /// Sets `key` to `value`; returns the previous value.
    pub async fn put(&self, key: &K, value: &V) -> Result<Option<V>, GridError> {
        self.put_with(key, value, Expiry::default()).await
    }

    /// Sets `key` to `value` without fetching the previous value (Hazelcast's `set`, Redis's
    /// `SET`): less to send back than [`Cache::put`].
    pub async fn set(&self, key: &K, value: &V) -> Result<(), GridError> {
        let (key, value) = (codec::encode(key)?, codec::encode(value)?);
        let op = self.put_op(key.clone(), value.clone(), PutIf::Set, self.shared.params);
        self.run(&key, &op, OpKind::IdempotentWrite).await?;
        self.shared.counters.put(1);
        invalidate_near(&self.shared, &key);
        Ok(())
    }

    /// Sets `key` to `value` with its own expiry (overriding the cache's); returns the
    /// previous value.
    pub async fn put_with(
        &self,
        key: &K,
        value: &V,
        expiry: Expiry,
    ) -> Result<Option<V>, GridError> {
        let (key, value) = (codec::encode(key)?, codec::encode(value)?);
        let op = self.put_op(
            key.clone(),
            value.clone(),
            PutIf::Always,
            expiry.apply(self.shared.params),
        );
        // Setting the same value twice leaves the same state: safe to retry.
        let old = decode_old(&self.run(&key, &op, OpKind::IdempotentWrite).await?)?;
        self.shared.counters.put(1);
        invalidate_near(&self.shared, &key);
        Ok(old)
    }

    /// Sets every entry (in parallel; not atomic as a whole).
    pub async fn put_all(
        &self,
        entries: impl IntoIterator<Item = (K, V)>,
    ) -> Result<(), GridError> {
        let puts = entries
            .into_iter()
            .map(|(k, v)| async move { self.put(&k, &v).await.map(|_| ()) });
        let mut results = futures::stream::iter(puts).buffer_unordered(FAN_OUT);
        while let Some(r) = results.next().await {
            r?;
        }
        Ok(())
    }

    /// Sets `key` to `value` unless it already has one; returns the existing value (`None`
    /// when this call stored `value`).
    pub async fn put_if_absent(&self, key: &K, value: &V) -> Result<Option<V>, GridError> {
        let (key, value) = (codec::encode(key)?, codec::encode(value)?);
        let op = self.put_op(
            key.clone(),
            value.clone(),
            PutIf::Absent,
            self.shared.params,
        );
        let existing: Option<V> = decode_old(&self.run(&key, &op, OpKind::Write).await?)?;
        if existing.is_none() {
            self.shared.counters.put(1);
            invalidate_near(&self.shared, &key);
        }
        Ok(existing)
    }

    /// Sets `key` to `value` only if it has a value; returns the value replaced (`None`:
    /// nothing was written).
    pub async fn replace(&self, key: &K, value: &V) -> Result<Option<V>, GridError> {
        let (key, value) = (codec::encode(key)?, codec::encode(value)?);
        let op = self.put_op(
            key.clone(),
            value.clone(),
            PutIf::Present,
            self.shared.params,
        );
        let old: Option<V> = decode_old(&self.run(&key, &op, OpKind::IdempotentWrite).await?)?;
        if old.is_some() {
            self.shared.counters.put(1);
            invalidate_near(&self.shared, &key);
        }
        Ok(old)
    }

    /// Sets `key` to `new` only if its value is `old` (compared encoded); whether it did.
    pub async fn replace_if(&self, key: &K, old: &V, new: &V) -> Result<bool, GridError> {
        let (key, new) = (codec::encode(key)?, codec::encode(new)?);
        let op = self.put_op(
            key.clone(),
            new.clone(),
            PutIf::Equals(Blob(codec::encode(old)?)),
            self.shared.params,
        );
        let done: bool = codec::decode(&self.run(&key, &op, OpKind::Write).await?)?;
        if done {
            self.shared.counters.put(1);
            invalidate_near(&self.shared, &key);
        }
        Ok(done)
    }

    /// Removes `key`; returns the value it had.
    pub async fn remove(&self, key: &K) -> Result<Option<V>, GridError> {
        let key = codec::encode(key)?;
        let op = CacheOp::Remove {
            cache: self.shared.name.to_string(),
            key: Blob(key.clone()),
            expected: None,
        };
        let old: Option<V> = decode_old(&self.run(&key, &op, OpKind::Write).await?)?;
        if old.is_some() {
            self.shared.counters.remove(1);
        }
        invalidate_near(&self.shared, &key);
        Ok(old)
    }

    /// Removes `key` only if its value is `value` (compared encoded); whether it did.
    pub async fn remove_if(&self, key: &K, value: &V) -> Result<bool, GridError> {
        let key = codec::encode(key)?;
        let op = CacheOp::Remove {
            cache: self.shared.name.to_string(),
            key: Blob(key.clone()),
            expected: Some(Blob(codec::encode(value)?)),
        };
        let done: bool = codec::decode(&self.run(&key, &op, OpKind::Write).await?)?;
        if done {
            self.shared.counters.remove(1);
            invalidate_near(&self.shared, &key);
        }
        Ok(done)
    }

    /// The keys that have a value (a snapshot: exact when nothing changes meanwhile).
    pub async fn keys(&self) -> Result<Vec<K>, GridError> {
        let raw: Vec<Vec<u8>> = if let Some(local) = &self.shared.local {
            local
                .service
                .entries(&self.shared.name, 0..1, false)
                .into_iter()
                .map(|e| e.0)
                .collect()
        } else if let Some(copy) = &self.shared.replicated {
            copy.entries().into_iter().map(|e| e.0).collect()
        } else {
            self.caches
                .all_entries(&self.shared.name, false)
                .await?
                .into_iter()
                .map(|e| e.0)
                .collect()
        };
        raw.iter().map(|k| Ok(codec::decode(k)?)).collect()
    }

    /// The number of entries (exact when nothing changes meanwhile).
    pub async fn len(&self) -> Result<usize, GridError> {
        if let Some(local) = &self.shared.local {
            return Ok(local.service.count(&self.shared.name, 0..1));
        }
        if let Some(copy) = &self.shared.replicated {
            return Ok(copy.len());
        }
        Ok(self.caches.member_count(&self.shared.name).await? as usize)
    }

    /// Whether the cache has no entries.
    pub async fn is_empty(&self) -> Result<bool, GridError> {
        Ok(self.len().await? == 0)
    }

    /// Removes every entry (listeners hear `Cleared`). Refused unless the cache is
    /// flushable.
    pub async fn remove_all(&self) -> Result<(), GridError> {
        if !self.shared.settings.flushable() {
            return Err(GridError::NotAllowed(format!(
                "cache {:?} is not flushable",
                self.shared.name
            )));
        }
        let op = CacheOp::Clear {
            cache: self.shared.name.to_string(),
        };
        if let Some(local) = &self.shared.local {
            local.run(op)?;
            return Ok(());
        }
        let inner = &self.caches.inner;
        let clears = (0..inner.runtime.table().partitions()).map(|p| {
            let op = op.clone();
            async move { inner.run(p, op, OpKind::IdempotentWrite).await }
        });
        let mut results = futures::stream::iter(clears).buffer_unordered(FAN_OUT);
        while let Some(r) = results.next().await {
            r?;
        }
        if let Some(near) = &self.shared.near {
            near.clear();
        }
        Ok(())
    }

    /// Registers the entry processor `name` on this member (register it on every member).
    /// It runs on the key's owner, alone on its partition, and may read, set or remove
    /// the entry; what it returns reaches the caller of [`Cache::execute_on_key`].
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), grid_core::GridError> {
    /// # let grid = grid::Grid::builder().bind("127.0.0.1:0").no_seeds().cluster_name("proc-doc").start().await?;
    /// let counters = grid.cache::<String, u64>("counters").await?;
    /// counters.register_processor("incr", |entry, by: u64| {
    ///     let next = entry.value().copied().unwrap_or(0) + by;
    ///     entry.set_value(next);
    ///     next
    /// });
    /// let n: u64 = counters.execute_on_key(&"hits".to_string(), "incr", &5u64).await?;
    /// assert_eq!(n, 5);
    /// # grid.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub fn register_processor<A, R, F>(&self, name: &str, processor: F)
    where
        A: DeserializeOwned,
        R: Serialize,
        F: Fn(&mut ProcessorEntry<K, V>, A) -> R + Send + Sync + 'static,
    {
        let erased = erase(processor);
        match &self.shared.local {
            Some(local) => local
                .service
                .register_processor(&self.shared.name, name, erased),
            None => self
                .caches
                .inner
                .service
                .register_processor(&self.shared.name, name, erased),
        }
    }

    /// Runs the processor `name` on `key`'s entry, atomically on its owner; returns what
    /// it returned. Not retried if the owner vanishes mid-call
    /// ([`GridError::Indeterminate`]).
    pub async fn execute_on_key<A, R>(&self, key: &K, name: &str, args: &A) -> Result<R, GridError>
    where
        A: Serialize,
        R: DeserializeOwned,
    {
        let key = codec::encode(key)?;
        let op = CacheOp::Process {
            cache: self.shared.name.to_string(),
            key: Blob(key.clone()),
            processor: name.to_string(),
            args: Blob(codec::encode(args)?),
            params: self.shared.params,
        };
        let result: Blob = codec::decode(&self.run(&key, &op, OpKind::Write).await?)?;
        if let Some(near) = &self.shared.near {
            near.invalidate(&key);
        }
        Ok(codec::decode(&result.0)?)
    }

    /// Runs the processor `name` on each key (in parallel); results in the keys' order.
    pub async fn execute_on_keys<'a, A, R>(
        &self,
        keys: impl IntoIterator<Item = &'a K>,
        name: &str,
        args: &A,
    ) -> Result<Vec<R>, GridError>
    where
        K: 'a,
        A: Serialize + Sync,
        R: DeserializeOwned,
    {
        let runs = keys
            .into_iter()
            .map(|k| self.execute_on_key::<A, R>(k, name, args));
        futures::stream::iter(runs)
            .buffered(FAN_OUT)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect()
    }

    /// Listens to the cache's entry events, from changes made anywhere in the cluster, in
    /// order per key. Returns once every member knows to send them; dropping the listener
    /// unregisters it.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), grid_core::GridError> {
    /// # let grid = grid::Grid::builder().bind("127.0.0.1:0").no_seeds().cluster_name("listen-doc").start().await?;
    /// use grid::CacheEvent;
    /// let cache = grid.cache::<u32, String>("watched").await?;
    /// let mut events = cache.listen().await;
    /// cache.put(&1, &"one".to_string()).await?;
    /// assert_eq!(events.recv().await, Some(CacheEvent::Added { key: 1, value: "one".to_string() }));
    /// # grid.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub async fn listen(&self) -> CacheListener<K, V> {
        let (tx, rx) = mpsc::channel(LISTENER_QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let d = dropped.clone();
        let handler = Arc::new(move |ev: &RawEvent| {
            if tx.try_send(ev.clone()).is_err() {
                d.fetch_add(1, Ordering::Relaxed);
            }
        });
        let guard = self
            .caches
            .inner
            .hub
            .add_handler(&self.shared.name, Want::Values, handler)
            .await;
        CacheListener {
            rx,
            _guard: guard,
            dropped,
            _types: PhantomData,
        }
    }

    /// This member's statistics of the cache.
    pub fn statistics(&self) -> CacheStatistics {
        self.caches.local_statistics(&self.shared.name)
    }

    /// The cache's statistics summed over every member.
    pub async fn cluster_statistics(&self) -> Result<CacheStatistics, GridError> {
        let mut total = CacheStatistics::default();
        for s in self.caches.member_statistics(&self.shared.name).await? {
            total.add(&s);
        }
        if self.shared.local.is_some() {
            // A member-only cache is this member's alone.
            return Ok(self.statistics());
        }
        Ok(total)
    }
}

/// An entry event, as a listener sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheEvent<K, V> {
    /// `key` got a value.
    Added {
        /// The key.
        key: K,
        /// Its value.
        value: V,
    },
    /// `key`'s value changed.
    Updated {
        /// The key.
        key: K,
        /// The value before.
        old: V,
        /// The value now.
        value: V,
    },
    /// `key` was removed by a caller.
    Removed {
        /// The key.
        key: K,
        /// The value it had.
        old: V,
    },
    /// `key` expired.
    Expired {
        /// The key.
        key: K,
        /// The value it had.
        old: V,
    },
    /// `key` was evicted by `max_entries`.
    Evicted {
        /// The key.
        key: K,
        /// The value it had.
        old: V,
    },
    /// Entries were removed by `remove_all` (one event per partition that had some).
    Cleared,
    /// Events from another member were lost on the way to this one (its event queue was
    /// full, or the connection failed): entries may have changed without an event
    /// (Hazelcast's `EventLostEvent`). Near and replicated copies repair themselves;
    /// a listener that mirrors the cache should read again what it needs.
    Lost,
}

/// Receives a cache's entry events (see [`Cache::listen`]). Dropping it unregisters.
pub struct CacheListener<K, V> {
    rx: mpsc::Receiver<RawEvent>,
    _guard: HandlerGuard,
    dropped: Arc<AtomicU64>,
    _types: PhantomData<fn() -> (K, V)>,
}

impl<K, V> std::fmt::Debug for CacheListener<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheListener").finish()
    }
}

impl<K: DeserializeOwned, V: DeserializeOwned> CacheListener<K, V> {
    /// The next event (`None` once the member stopped).
    pub async fn recv(&mut self) -> Option<CacheEvent<K, V>> {
        loop {
            let raw = self.rx.recv().await?;
            match decode_event(&raw) {
                Ok(ev) => return Some(ev),
                Err(e) => warn!(cache = %raw.cache, error = %e, "undecodable cache event skipped"),
            }
        }
    }

    /// Events dropped because this listener fell more than 16,384 behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

fn decode_event<K: DeserializeOwned, V: DeserializeOwned>(
    raw: &RawEvent,
) -> Result<CacheEvent<K, V>, GridError> {
    let key = || -> Result<K, GridError> { Ok(codec::decode(&raw.key)?) };
    let val = |b: &Option<Blob>| -> Result<V, GridError> {
        let b = b
            .as_ref()
            .ok_or_else(|| GridError::Service("event without a value".into()))?;
        Ok(codec::decode(&b.0)?)
    };
    Ok(match raw.kind {
        EventKind::Added => CacheEvent::Added {
            key: key()?,
            value: val(&raw.value)?,
        },
        EventKind::Updated => CacheEvent::Updated {
            key: key()?,
            old: val(&raw.old)?,
            value: val(&raw.value)?,
        },
        EventKind::Removed => CacheEvent::Removed {
            key: key()?,
            old: val(&raw.old)?,
        },
        EventKind::Expired => CacheEvent::Expired {
            key: key()?,
            old: val(&raw.old)?,
        },
        EventKind::Evicted => CacheEvent::Evicted {
            key: key()?,
            old: val(&raw.old)?,
        },
        EventKind::Cleared => CacheEvent::Cleared,
        EventKind::Lost => CacheEvent::Lost,
    })
}
