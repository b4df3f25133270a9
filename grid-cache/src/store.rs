//! The entries of every cache on this member, split by partition, and the runtime's view
//! of them ([`CacheService`]): operations become changes on the owner; changes are applied
//! on the owner and its backups; the owner reports what happened to the entries (events).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use grid_core::codec;
use grid_core::runtime::{Ctx, Effects, PartitionService, Prepared, Rebuilt, Role, Snapshot};
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::events::{EventKind, EventSink, RawEvent};
use crate::map::{CacheMap, Meta};
use crate::ops::{Blob, CacheChange, CacheOp, Outcome, PutIf, Removal};
use crate::processor::ErasedProcessor;
use crate::settings::WriteParams;
use grid_net::buffers::BulkBuf;

/// The runtime service name of the cache.
pub const SERVICE: &str = "cache";

/// How often an owner looks for expired entries in each of its partitions (the timers of
/// the partitions are spread over it).
pub(crate) const EXPIRY_PERIOD: std::time::Duration = std::time::Duration::from_secs(1);
/// Most entries one expiry operation removes.
pub(crate) const EXPIRY_BATCH: u32 = 1024;
/// The id of a partition's expiry timer.
const EXPIRY_TIMER: u64 = 1;

/// When partition `p`'s next expiry check is due after `now`: the partitions' checks are
/// spread over the period, so they do not all run at once.
fn next_expiry_check(p: u32, now: tokio::time::Instant) -> tokio::time::Instant {
    let offset = EXPIRY_PERIOD.as_millis() as u64 * u64::from(p % 16) / 16;
    now + EXPIRY_PERIOD + std::time::Duration::from_millis(offset)
}

/// Milliseconds since the Unix epoch on the runtime's clock: expiry times are absolute so
/// that every replica agrees on them.
pub(crate) fn now_ms() -> u64 {
    grid_core::clock::unix_ms()
}

type Partition = HashMap<Arc<str>, CacheMap>;

/// What the owner's store counts per cache (evictions and expirations happen there, not
/// at a caller).
#[derive(Debug, Default)]
pub(crate) struct StoreCounters {
    pub(crate) evictions: AtomicU64,
    pub(crate) expirations: AtomicU64,
}

/// Every cache's entries on this member, by partition. Reads take a partition's read lock
/// only; writes come from the runtime, one at a time per partition.
pub struct CacheService {
    partitions: Vec<RwLock<Partition>>,
    /// Partitions this member owns (for the per-partition share of `max_entries`).
    owned: AtomicU32,
    processors: RwLock<HashMap<(String, String), ErasedProcessor>>,
    sink: OnceLock<Arc<dyn EventSink>>,
    /// Where the cache's messages between members go (the event hub).
    hub: OnceLock<std::sync::Weak<crate::events::EventHub>>,
    counters: RwLock<HashMap<String, Arc<StoreCounters>>>,
    /// How far tests moved this store's clock ahead of the wall clock, in ms.
    clock_ahead_ms: AtomicU64,
}

impl std::fmt::Debug for CacheService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheService")
            .field("partitions", &self.partitions.len())
            .finish()
    }
}

fn encode<T: Serialize>(v: &T) -> Result<Blob, CacheError> {
    codec::encode(v)
        .map(Blob)
        .map_err(|e| CacheError::Encode(e.to_string()))
}

/// Why the cache's store refused an operation or a copy: what crosses the runtime's
/// service interface, typed. The cache's public API reports it as
/// [`grid_core::GridError::Service`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum CacheError {
    /// No such partition on this member (a peer's bad input).
    #[error("no partition {0}")]
    NoPartition(u32),
    /// One cache's keys and values in one partition would pass 4 GiB.
    #[error("partition full: 4 GiB of keys and values of one cache in one partition")]
    PartitionFull,
    /// The entry processor is not registered on the key's owner.
    #[error("no entry processor {processor:?} registered for cache {cache:?} on the key's owner")]
    NoProcessor {
        /// The cache.
        cache: String,
        /// The processor's name.
        processor: String,
    },
    /// The entry processor failed (its message).
    #[error("entry processor failed: {0}")]
    Processor(String),
    /// An answer or change could not be encoded.
    #[error("cannot encode: {0}")]
    Encode(String),
    /// A partition copy that does not decode, or is not the cache's.
    #[error("bad partition copy: {0}")]
    BadCopy(String),
    /// A change that cannot be applied (the replica is resynchronised).
    #[error("cannot apply change: {0}")]
    Apply(String),
    /// The operation is not a read (sent on the read path).
    #[error("not a read: {0}")]
    NotARead(String),
}

impl From<CacheError> for grid_core::GridError {
    fn from(e: CacheError) -> Self {
        Self::Service(e.to_string())
    }
}

/// What the store decided for an operation (see [`CacheService::prepare_op`]).
#[derive(Debug)]
pub(crate) struct Decided {
    /// The answer, encoded as the operation's caller decodes it.
    pub(crate) answer: Blob,
    /// The change, if the operation changes anything.
    pub(crate) change: Option<CacheChange>,
}

fn blob(v: &[u8]) -> Blob {
    Blob(v.to_vec())
}

impl CacheService {
    /// A service for `partitions` partitions.
    pub fn new(partitions: u32) -> Self {
        Self {
            partitions: (0..partitions)
                .map(|_| RwLock::new(Partition::new()))
                .collect(),
            // Counted up by the runtime's ownership hooks.
            owned: AtomicU32::new(0),
            processors: RwLock::new(HashMap::new()),
            sink: OnceLock::new(),
            hub: OnceLock::new(),
            counters: RwLock::new(HashMap::new()),
            clock_ahead_ms: AtomicU64::new(0),
        }
    }

    /// This store's clock, in ms since the Unix epoch, by which entries are written, read,
    /// expired and evicted: the wall clock, plus what tests moved it ahead by.
    pub(crate) fn now(&self) -> u64 {
        now_ms().saturating_add(self.clock_ahead_ms.load(Ordering::Relaxed))
    }

    /// For tests: moves this store's clock `by` ahead (expiry and eviction then see the
    /// later time). Only the store's: near and replicated copies keep the wall clock, so
    /// move every member's store alike and test partitioned caches with it.
    #[doc(hidden)]
    pub fn advance_clock_for_tests(&self, by: std::time::Duration) {
        self.clock_ahead_ms
            .fetch_add(by.as_millis() as u64, Ordering::Relaxed);
    }

    fn part(&self, p: u32) -> Result<&RwLock<Partition>, CacheError> {
        self.partitions
            .get(p as usize)
            .ok_or(CacheError::NoPartition(p))
    }

    fn read(&self, p: u32) -> Option<std::sync::RwLockReadGuard<'_, Partition>> {
        Some(
            self.partitions
                .get(p as usize)?
                .read()
                .unwrap_or_else(|e| e.into_inner()),
        )
    }

    /// Where the cache's messages between members go.
    pub(crate) fn set_hub(&self, hub: std::sync::Weak<crate::events::EventHub>) {
        let _ = self.hub.set(hub);
    }

    /// Where the owner reports what happened to entries.
    pub(crate) fn set_sink(&self, sink: Arc<dyn EventSink>) {
        let _ = self.sink.set(sink);
    }

    /// Tells the store how many partitions this member owns.
    pub(crate) fn set_owned(&self, owned: u32) {
        self.owned.store(owned, Ordering::Relaxed);
    }

    pub(crate) fn register_processor(&self, cache: &str, name: &str, f: ErasedProcessor) {
        self.processors
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert((cache.to_string(), name.to_string()), f);
    }

    /// The counters of `cache`, if it ever counted anything here.
    pub(crate) fn counters_if_any(&self, cache: &str) -> Option<Arc<StoreCounters>> {
        self.counters
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(cache)
            .cloned()
    }

    pub(crate) fn counters(&self, cache: &str) -> Arc<StoreCounters> {
        if let Some(c) = self
            .counters
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(cache)
        {
            return c.clone();
        }
        self.counters
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(cache.to_string())
            .or_default()
            .clone()
    }

    /// The live value of a key in this member's copy, counted as a read (`touch`) or not.
    pub(crate) fn get_local(
        &self,
        p: u32,
        cache: &str,
        key: &[u8],
        touch: bool,
    ) -> Option<Vec<u8>> {
        let part = self.read(p)?;
        let now = self.now();
        let e = part.get(cache)?.live(key, now)?;
        if touch {
            e.touch(now);
        }
        Some(e.value.to_vec())
    }

    /// The live value and its expiry deadline (for near copies).
    pub(crate) fn get_with_deadline(
        &self,
        p: u32,
        cache: &str,
        key: &[u8],
    ) -> Option<(Vec<u8>, u64)> {
        let part = self.read(p)?;
        let now = self.now();
        let e = part.get(cache)?.live(key, now)?;
        e.touch(now);
        Some((e.value.to_vec(), e.deadline()))
    }

    /// Live entries of `cache` in the given partitions.
    pub(crate) fn count(&self, cache: &str, partitions: impl Iterator<Item = u32>) -> usize {
        let now = self.now();
        partitions
            .filter_map(|p| {
                let part = self.read(p)?;
                let map = part.get(cache)?;
                Some(if map.has_expiring() {
                    map.iter().filter(|e| e.is_live(now)).count()
                } else {
                    map.len()
                })
            })
            .sum()
    }

    /// Bytes of keys and values of `cache` in the given partitions, plus the per-entry
    /// bookkeeping: the statistics' heap size estimate.
    pub(crate) fn heap_estimate(&self, cache: &str, partitions: impl Iterator<Item = u32>) -> u64 {
        partitions
            .filter_map(|p| Some(self.read(p)?.get(cache)?.heap_bytes()))
            .sum()
    }

    /// Live entries of `cache` in the given partitions: (key, value, expire_at, idle_ms).
    pub(crate) fn entries(
        &self,
        cache: &str,
        partitions: impl Iterator<Item = u32>,
        with_values: bool,
    ) -> Vec<(Vec<u8>, Vec<u8>, u64, u32)> {
        let now = self.now();
        let mut out = Vec::new();
        for p in partitions {
            let Some(part) = self.read(p) else { continue };
            let Some(map) = part.get(cache) else { continue };
            out.extend(map.iter().filter(|e| e.is_live(now)).map(|e| {
                let value = if with_values {
                    e.value.to_vec()
                } else {
                    Vec::new()
                };
                (e.key.to_vec(), value, e.deadline(), e.idle_ms())
            }));
        }
        out
    }

    /// Partitions among `partitions` holding an entry that expired.
    pub(crate) fn with_expired(&self, partitions: impl Iterator<Item = u32>) -> Vec<u32> {
        let now = self.now();
        partitions
            .filter(|p| {
                self.read(*p).is_some_and(|part| {
                    part.values()
                        .any(|m| m.has_expiring() && m.iter().any(|e| !e.is_live(now)))
                })
            })
            .collect()
    }

    /// The answer to a read (`Get`, `ContainsKey`, `Entries`), without the partition's
    /// queue: a read changes nothing but the entries' access records (atomics). `None` for
    /// an operation that is not a read.
    pub(crate) fn read_op(&self, p: u32, op: &CacheOp) -> Result<Option<Blob>, CacheError> {
        let part = self.part(p)?.read().unwrap_or_else(|e| e.into_inner());
        let now = self.now();
        Ok(Some(match op {
            CacheOp::Get { cache, key } => {
                let found = part.get(cache.as_str()).and_then(|m| m.live(&key.0, now));
                if let Some(e) = found {
                    e.touch(now);
                }
                encode(&found.map(|e| (blob(e.value), e.deadline())))?
            }
            CacheOp::ContainsKey { cache, key } => encode(
                &part
                    .get(cache.as_str())
                    .and_then(|m| m.live(&key.0, now))
                    .is_some(),
            )?,
            CacheOp::Entries { cache, values } => {
                let entries: Vec<(Blob, Blob, u64, u32)> = part
                    .get(cache.as_str())
                    .map(|m| {
                        m.iter()
                            .filter(|e| e.is_live(now))
                            .map(|e| {
                                let v = if *values {
                                    blob(e.value)
                                } else {
                                    Blob::default()
                                };
                                (blob(e.key), v, e.deadline(), e.idle_ms())
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                encode(&entries)?
            }
            _ => return Ok(None),
        }))
    }

    /// The write `op` would make (and its answer), without making it.
    pub(crate) fn prepare_op(&self, p: u32, op: CacheOp) -> Result<Decided, CacheError> {
        if let Some(answer) = self.read_op(p, &op)? {
            return Ok(Decided {
                answer,
                change: None,
            });
        }
        let part = self.part(p)?.read().unwrap_or_else(|e| e.into_inner());
        let now = self.now();
        Ok(match op {
            // Answered by `read_op` above.
            CacheOp::Get { .. } | CacheOp::ContainsKey { .. } | CacheOp::Entries { .. } => {
                return Err(CacheError::NotARead("a read reached the write path".into()))
            }
            CacheOp::Put {
                cache,
                key,
                value,
                cond,
                params,
            } => {
                let map = part.get(cache.as_str());
                let current = map.and_then(|m| m.live(&key.0, now));
                let write = match &cond {
                    PutIf::Always | PutIf::Set => true,
                    PutIf::Absent => current.is_none(),
                    PutIf::Present => current.is_some(),
                    PutIf::Equals(v) => current.is_some_and(|e| e.value == &v.0[..]),
                };
                let answer = match (&cond, write) {
                    (PutIf::Equals(_), w) => encode(&w)?,
                    (PutIf::Set, _) => encode(&())?,
                    _ => encode(&current.map(|e| blob(e.value)))?,
                };
                let change = if write {
                    check_room(map, &key.0, &value.0)?;
                    let evict = self.eviction(map, &key.0, &params, now);
                    Some(with_evictions(
                        &cache,
                        evict,
                        set(&cache, key, value.0, &params, now),
                    ))
                } else {
                    None
                };
                Decided { answer, change }
            }
            CacheOp::Remove {
                cache,
                key,
                expected,
            } => {
                let current = part.get(cache.as_str()).and_then(|m| m.live(&key.0, now));
                let remove = match (&expected, current) {
                    (_, None) => false,
                    (None, Some(_)) => true,
                    (Some(v), Some(e)) => e.value == &v.0[..],
                };
                let answer = match expected {
                    Some(_) => encode(&remove)?,
                    None => encode(&current.map(|e| blob(e.value)))?,
                };
                let change = remove.then_some(CacheChange::Delete {
                    cache,
                    key,
                    why: Removal::Removed,
                });
                Decided { answer, change }
            }
            CacheOp::Process {
                cache,
                key,
                processor,
                args,
                params,
            } => {
                let f = self
                    .processors
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&(cache.clone(), processor.clone()))
                    .cloned()
                    .ok_or_else(|| CacheError::NoProcessor {
                        cache: cache.clone(),
                        processor: processor.clone(),
                    })?;
                let map = part.get(cache.as_str());
                let current = map.and_then(|m| m.live(&key.0, now));
                let (outcome, result) =
                    f(&key.0, current.map(|e| e.value), &args.0).map_err(CacheError::Processor)?;
                let change = match outcome {
                    Outcome::Keep => None,
                    Outcome::Remove if current.is_none() => None,
                    Outcome::Remove => Some(CacheChange::Delete {
                        cache,
                        key,
                        why: Removal::Removed,
                    }),
                    Outcome::Set(v) => {
                        check_room(map, &key.0, &v)?;
                        let evict = self.eviction(map, &key.0, &params, now);
                        Some(with_evictions(
                            &cache,
                            evict,
                            set(&cache, key, v, &params, now),
                        ))
                    }
                };
                Decided {
                    answer: encode(&Blob(result))?,
                    change,
                }
            }
            CacheOp::Clear { cache } => {
                let n = part.get(cache.as_str()).map_or(0, CacheMap::len);
                Decided {
                    answer: encode(&(n as u64))?,
                    change: (n > 0).then_some(CacheChange::Clear { cache }),
                }
            }
            CacheOp::Expire { limit } => {
                let mut gone = Vec::new();
                'maps: for (cache, map) in part.iter().filter(|(_, m)| m.has_expiring()) {
                    for e in map.iter() {
                        if gone.len() >= limit as usize {
                            break 'maps;
                        }
                        if !e.is_live(now) {
                            gone.push(CacheChange::Delete {
                                cache: cache.to_string(),
                                key: blob(e.key),
                                why: Removal::Expired,
                            });
                        }
                    }
                }
                Decided {
                    answer: encode(&(gone.len() as u32))?,
                    change: (!gone.is_empty()).then_some(CacheChange::Many(gone)),
                }
            }
        })
    }

    /// The entries that must go so that `key` fits under `max_entries`.
    fn eviction(
        &self,
        map: Option<&CacheMap>,
        key: &[u8],
        params: &WriteParams,
        now: u64,
    ) -> Vec<(Vec<u8>, bool)> {
        let Some(map) = map else { return Vec::new() };
        if params.max_entries == 0 || map.contains(key) {
            return Vec::new();
        }
        let owned = self.owned.load(Ordering::Relaxed).max(1);
        let cap = params.max_entries.div_ceil(owned).max(1) as usize;
        if map.len() < cap {
            return Vec::new();
        }
        map.victims(
            map.len() + 1 - cap,
            params.eviction,
            now,
            now ^ key.len() as u64 ^ (key.first().copied().unwrap_or(0) as u64) << 32,
        )
    }

    /// Applies a change to partition `p` of this store; the owner (`primary`) reports
    /// what happened to the entries.
    pub(crate) fn apply_change(
        &self,
        p: u32,
        change: CacheChange,
        primary: bool,
    ) -> Result<(), CacheError> {
        let sink = if primary { self.sink.get() } else { None };
        let mut part = self.part(p)?.write().unwrap_or_else(|e| e.into_inner());
        let now = self.now();
        let mut events = Vec::new();
        apply_to(&mut part, p, change, now, sink, &mut events);
        drop(part);
        for ev in events.into_iter().filter(|_| primary) {
            if ev.kind == EventKind::Evicted {
                self.counters(&ev.cache)
                    .evictions
                    .fetch_add(1, Ordering::Relaxed);
            } else if ev.kind == EventKind::Expired {
                self.counters(&ev.cache)
                    .expirations
                    .fetch_add(1, Ordering::Relaxed);
            }
            // Expired and evicted entries are counted whoever listens, reported only if
            // someone does.
            if let Some(sink) = sink.filter(|s| s.wants(&ev.cache)) {
                sink.emit(ev);
            }
        }
        Ok(())
    }
}

/// Refuses a write that would not fit its partition's arena.
fn check_room(map: Option<&CacheMap>, key: &[u8], value: &[u8]) -> Result<(), CacheError> {
    if map.is_none_or(|m| m.fits(key.len() + value.len())) {
        Ok(())
    } else {
        Err(CacheError::PartitionFull)
    }
}

/// Encodes a partition's maps as snapshot chunks of about `chunk_bytes` each, into recycled
/// buffers (see [`BulkBuf`]). Chunks hold groups: the cache name (bin), the entry count
/// (always a 5-byte u32, patched when the group ends), then per entry the key and value
/// (bin), the expiry (u64), the idle time (u32) and whether accesses are tracked (bool).
fn encode_snapshot(part: &Partition, chunk_bytes: usize) -> Snapshot {
    let chunk_bytes = chunk_bytes.max(1);
    let new_buf = || BulkBuf::with_capacity(chunk_bytes.min(8 << 20) + 1024);
    let mut chunks = Vec::new();
    let mut buf = new_buf();
    for (cache, map) in part {
        let mut entries = map.iter().peekable();
        while entries.peek().is_some() {
            // Writing to a Vec cannot fail.
            let _ = rmp::encode::write_bin(&mut *buf, cache.as_bytes());
            let at = buf.len();
            let _ = rmp::encode::write_u32(&mut *buf, 0);
            let mut n = 0u32;
            // At least one entry per group, then until the chunk is full.
            while n == 0 || buf.len() < chunk_bytes {
                let Some(e) = entries.next() else { break };
                let _ = rmp::encode::write_bin(&mut *buf, e.key);
                let _ = rmp::encode::write_bin(&mut *buf, e.value);
                let _ = rmp::encode::write_u64(&mut *buf, e.expire_at());
                let _ = rmp::encode::write_u32(&mut *buf, e.idle_ms());
                let _ = rmp::encode::write_bool(&mut *buf, e.tracked());
                n += 1;
            }
            patch_count(&mut buf, at, n);
            if buf.len() >= chunk_bytes {
                chunks.push(std::mem::replace(&mut buf, new_buf()).freeze());
            }
        }
    }
    if !buf.is_empty() {
        chunks.push(buf.freeze());
    }
    chunks
}

/// Writes `n` into the u32 (marker byte, then 4 bytes big-endian) at `at`.
fn patch_count(buf: &mut [u8], at: usize, n: u32) {
    buf[at + 1..at + 5].copy_from_slice(&n.to_be_bytes());
}

/// Calls `each(cache, key, value, meta)` for every entry of one snapshot chunk (see
/// [`SnapshotChunks`]); `meta` is the expiry and idle time of an entry with bookkeeping.
fn read_snapshot<'a>(
    chunk: &'a [u8],
    mut each: impl FnMut(&'a str, &'a [u8], &'a [u8], Option<(u64, u32)>) -> Result<(), String>,
) -> Result<(), String> {
    let bad = |e: &dyn std::fmt::Display| format!("bad snapshot: {e}");
    fn bin<'a>(rd: &mut &'a [u8]) -> Result<&'a [u8], String> {
        let len = rmp::decode::read_bin_len(rd).map_err(|e| format!("bad snapshot: {e}"))? as usize;
        match (rd.get(..len), rd.get(len..)) {
            (Some(d), Some(r)) => {
                *rd = r;
                Ok(d)
            }
            _ => Err("bad snapshot: truncated entry".to_string()),
        }
    }
    let mut rd = chunk;
    while !rd.is_empty() {
        let cache = std::str::from_utf8(bin(&mut rd)?).map_err(|e| bad(&e))?;
        let n: u32 = rmp::decode::read_int(&mut rd).map_err(|e| bad(&e))?;
        for _ in 0..n {
            let k = bin(&mut rd)?;
            let v = bin(&mut rd)?;
            let expire_at: u64 = rmp::decode::read_int(&mut rd).map_err(|e| bad(&e))?;
            let idle_ms: u32 = rmp::decode::read_int(&mut rd).map_err(|e| bad(&e))?;
            let tracked = rmp::decode::read_bool(&mut rd).map_err(|e| bad(&e))?;
            let meta = (expire_at != 0 || idle_ms != 0 || tracked).then_some((expire_at, idle_ms));
            each(cache, k, v, meta)?;
        }
    }
    Ok(())
}

fn set(cache: &str, key: Blob, value: Vec<u8>, params: &WriteParams, now: u64) -> CacheChange {
    CacheChange::Set {
        cache: cache.to_string(),
        key,
        value: Blob(value),
        expire_at: if params.ttl_ms > 0 {
            now.saturating_add(params.ttl_ms)
        } else {
            0
        },
        idle_ms: params.idle_ms,
        track: params.max_entries > 0,
    }
}

fn with_evictions(cache: &str, evict: Vec<(Vec<u8>, bool)>, change: CacheChange) -> CacheChange {
    if evict.is_empty() {
        return change;
    }
    let mut all: Vec<CacheChange> = evict
        .into_iter()
        .map(|(k, live)| CacheChange::Delete {
            cache: cache.to_string(),
            key: Blob(k),
            // A victim that had expired is reported (and counted) as expired.
            why: if live {
                Removal::Evicted
            } else {
                Removal::Expired
            },
        })
        .collect();
    all.push(change);
    CacheChange::Many(all)
}

/// Applies `change`, collecting events when `sink` wants them.
fn apply_to(
    part: &mut Partition,
    p: u32,
    change: CacheChange,
    now: u64,
    sink: Option<&Arc<dyn EventSink>>,
    events: &mut Vec<RawEvent>,
) {
    match change {
        CacheChange::Set {
            cache,
            key,
            value,
            expire_at,
            idle_ms,
            track,
        } => {
            let map = match part.get_mut(cache.as_str()) {
                Some(m) => m,
                None => part.entry(Arc::from(cache.as_str())).or_default(),
            };
            let wants = sink.is_some_and(|s| s.wants(&cache));
            let meta = (expire_at != 0 || idle_ms != 0 || track)
                .then(|| Meta::new(expire_at, idle_ms, now));
            let old = match map.insert(&key.0, &value.0, meta, now, wants) {
                Ok(old) => old,
                Err(e) => {
                    warn!(cache = %cache, error = %e, "entry not stored");
                    return;
                }
            };
            if wants {
                let old = old.filter(|o| o.live);
                events.push(RawEvent {
                    cache: cache.as_str().into(),
                    partition: p,
                    kind: if old.is_some() {
                        EventKind::Updated
                    } else {
                        EventKind::Added
                    },
                    key: key.0,
                    old: old.map(|o| Blob(o.value)),
                    value: Some(value),
                    expire_at,
                    idle_ms,
                });
            }
        }
        CacheChange::Delete { cache, key, why } => {
            let Some(map) = part.get_mut(cache.as_str()) else {
                return;
            };
            let wants = sink.is_some_and(|s| s.wants(&cache));
            let old = map.remove(&key.0, wants, now);
            if map.is_empty() {
                part.remove(cache.as_str());
            }
            if let Some(old) = old {
                let counted = why != Removal::Removed || old.live;
                if counted && (why != Removal::Removed || wants) {
                    events.push(RawEvent {
                        cache: cache.as_str().into(),
                        partition: p,
                        kind: match why {
                            Removal::Removed => EventKind::Removed,
                            Removal::Expired => EventKind::Expired,
                            Removal::Evicted => EventKind::Evicted,
                        },
                        key: key.0,
                        old: wants.then_some(Blob(old.value)),
                        value: None,
                        expire_at: 0,
                        idle_ms: 0,
                    });
                }
            }
        }
        CacheChange::Clear { cache } => {
            if part.remove(cache.as_str()).is_some() && sink.is_some_and(|s| s.wants(&cache)) {
                events.push(RawEvent {
                    cache: cache.as_str().into(),
                    partition: p,
                    kind: EventKind::Cleared,
                    key: Vec::new(),
                    old: None,
                    value: None,
                    expire_at: 0,
                    idle_ms: 0,
                });
            }
        }
        CacheChange::Many(all) => {
            for c in all {
                apply_to(part, p, c, now, sink, events);
            }
        }
    }
}

impl PartitionService for CacheService {
    type Op = CacheOp;
    type Change = CacheChange;
    /// Encoded as each operation's caller decodes it (the cache owns that codec).
    type Answer = Blob;
    type Error = CacheError;
    /// The event hub's messages between members.
    type Message = crate::events::CacheMessage;

    fn name(&self) -> &str {
        SERVICE
    }

    fn read(&self, ctx: &Ctx, op: &CacheOp) -> Result<Blob, CacheError> {
        match op {
            CacheOp::Get { .. } | CacheOp::ContainsKey { .. } | CacheOp::Entries { .. } => self
                .read_op(ctx.partition, op)?
                .ok_or_else(|| CacheError::NotARead("a write sent as a read".into())),
            _ => Err(CacheError::NotARead("a write sent as a read".into())),
        }
    }

    fn prepare(&self, ctx: &Ctx, op: CacheOp) -> Result<Prepared<Self>, CacheError> {
        let decided = self.prepare_op(ctx.partition, op)?;
        Ok(match decided.change {
            Some(change) => Prepared::change(decided.answer, change),
            None => Prepared::answer(decided.answer),
        })
    }

    fn apply(
        &self,
        ctx: &Ctx,
        change: &CacheChange,
        _effects: &mut Effects<Self>,
    ) -> Result<(), CacheError> {
        self.apply_change(ctx.partition, change.clone(), ctx.role == Role::Owner)
    }

    fn on_message(&self, from: &str, message: crate::events::CacheMessage) {
        if let Some(hub) = self.hub.get().and_then(std::sync::Weak::upgrade) {
            hub.on_message(from, message);
        }
    }

    fn on_ask(
        &self,
        from: &str,
        message: crate::events::CacheMessage,
    ) -> Option<crate::events::CacheMessage> {
        self.hub
            .get()
            .and_then(std::sync::Weak::upgrade)?
            .on_ask(from, message)
    }

    /// Counts the partition for `max_entries`' share, and starts its expiry checks.
    fn on_owned(&self, ctx: &Ctx, effects: &mut Effects<Self>) {
        self.owned.fetch_add(1, Ordering::Relaxed);
        effects.arm_timer(EXPIRY_TIMER, next_expiry_check(ctx.partition, ctx.now));
    }

    /// Removes the partition's expired entries through the write path (so backups follow
    /// and listeners hear of it), if it has any, and checks again a period later.
    fn on_timer(&self, ctx: &Ctx, timer: u64, effects: &mut Effects<Self>) {
        if timer != EXPIRY_TIMER {
            return;
        }
        if !self.with_expired(std::iter::once(ctx.partition)).is_empty() {
            effects.submit(CacheOp::Expire {
                limit: EXPIRY_BATCH,
            });
        }
        effects.arm_timer(EXPIRY_TIMER, ctx.now + EXPIRY_PERIOD);
    }

    fn on_disowned(&self, _partition: u32) {
        let _ = self
            .owned
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// The partition encoded under its read lock, straight from its maps: a copy of them
    /// (to encode after the lock) cost as much as the encoding, in fresh pages, and the
    /// encoding still followed (a profile of a 1M-entry copy: 17% of all CPU in that copy).
    fn snapshot(&self, p: u32, chunk_bytes: usize) -> Snapshot {
        match self.read(p) {
            Some(part) => encode_snapshot(&part, chunk_bytes),
            None => Vec::new(),
        }
    }

    fn rebuild(&self, _partition: u32, chunks: Vec<bytes::Bytes>) -> Result<Rebuilt, CacheError> {
        // Two passes: the first checks the structure and sizes every cache's map, so the
        // second copies each key and value once into arenas that do not grow meanwhile.
        let mut sizes: HashMap<&str, (usize, usize, usize)> = HashMap::new();
        for chunk in &chunks {
            read_snapshot(chunk, |cache, k, v, meta| {
                let (n, bytes, metas) = sizes.entry(cache).or_default();
                *n += 1;
                *bytes += k.len() + v.len();
                *metas += meta.is_some() as usize;
                Ok(())
            })
            .map_err(CacheError::BadCopy)?;
        }
        let now = self.now();
        let mut fresh = Partition::new();
        for (cache, (n, bytes, metas)) in &sizes {
            // Room to double, as a map that grew by itself would have: the partition keeps
            // taking writes, and an exactly full arena would be copied whole by the first
            // (untouched room costs address space, not memory).
            let map = CacheMap::with_capacity(*n, bytes.saturating_mul(2), *metas);
            fresh.insert(Arc::from(*cache), map);
        }
        for chunk in &chunks {
            read_snapshot(chunk, |cache, k, v, meta| {
                let map = fresh
                    .get_mut(cache)
                    .ok_or_else(|| "bad snapshot: a cache changed between passes".to_string())?;
                let meta = meta.map(|(expire_at, idle_ms)| Meta::new(expire_at, idle_ms, now));
                map.insert(k, v, meta, now, false).map(drop)
            })
            .map_err(CacheError::BadCopy)?;
        }
        Ok(Box::new(fresh))
    }

    fn install(&self, p: u32, rebuilt: Rebuilt) -> Result<(), CacheError> {
        let fresh = rebuilt.downcast::<Partition>().map_err(|_| {
            CacheError::BadCopy(format!("partition {p}: not a cache partition to install"))
        })?;
        let old = std::mem::replace(
            &mut *self.part(p)?.write().unwrap_or_else(|e| e.into_inner()),
            *fresh,
        );
        // Freed after the store's lock is released.
        drop(old);
        Ok(())
    }

    fn drop_partition(&self, p: u32) {
        if let Ok(part) = self.part(p) {
            *part.write().unwrap_or_else(|e| e.into_inner()) = Partition::new();
        }
    }

    fn partition_len(&self, p: u32) -> usize {
        self.read(p)
            .map(|part| part.values().map(CacheMap::len).sum())
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::PutIf;

    fn run(s: &CacheService, op: CacheOp) -> Vec<u8> {
        let prepared = s.prepare_op(0, op).unwrap();
        if let Some(c) = prepared.change {
            s.apply_change(0, c, true).unwrap();
        }
        prepared.answer.0
    }

    /// `rebuild` then `install`, as the runtime restores a copy.
    fn restore(s: &CacheService, chunks: Vec<bytes::Bytes>) -> Result<(), CacheError> {
        let rebuilt = s.rebuild(0, chunks)?;
        s.install(0, rebuilt)
    }

    fn put(cache: &str, k: &[u8], v: &[u8], params: WriteParams) -> CacheOp {
        CacheOp::Put {
            cache: cache.into(),
            key: blob(k),
            value: blob(v),
            cond: PutIf::Always,
            params,
        }
    }

    #[test]
    fn snapshot_round_trips_every_cache_and_expiry() {
        let s = CacheService::new(1);
        // An idle time long enough that a slow machine does not expire the entries between
        // the rebuild and the read (7 ms once failed under load).
        let far = WriteParams {
            ttl_ms: 3_600_000,
            idle_ms: 600_000,
            ..Default::default()
        };
        for i in 0..1000u32 {
            run(
                &s,
                put(
                    if i % 2 == 0 { "a" } else { "b" },
                    &i.to_be_bytes(),
                    &[7; 100],
                    far,
                ),
            );
        }
        let chunks = s.snapshot(0, 4096);
        assert!(chunks.len() > 10);
        // Each chunk is full (but the last), and overshoots by less than one entry.
        let (last, full) = chunks.split_last().unwrap();
        assert!(full.iter().all(|c| (4096..4096 + 140).contains(&c.len())));
        assert!(!last.is_empty() && last.len() < 4096 + 140);
        let t = CacheService::new(1);
        restore(&t, chunks).unwrap();
        assert_eq!(t.partition_len(0), 1000);
        let e = t.entries("a", 0..1, true);
        assert_eq!(e.len(), 500);
        assert!(e
            .iter()
            .all(|(_, v, _, idle)| v.len() == 100 && *idle == 600_000));
    }

    #[test]
    fn a_rebuilt_partition_changes_nothing_until_installed() {
        let source = CacheService::new(1);
        run(&source, put("a", b"new", b"1", WriteParams::default()));
        let chunks = source.snapshot(0, 4096);
        let t = CacheService::new(1);
        run(&t, put("a", b"old", b"2", WriteParams::default()));
        let rebuilt = t.rebuild(0, chunks).unwrap();
        // Still the old state: changes applied meanwhile land in it.
        run(&t, put("a", b"meanwhile", b"3", WriteParams::default()));
        assert_eq!(t.partition_len(0), 2);
        t.install(0, rebuilt).unwrap();
        let keys: Vec<Vec<u8>> = t
            .entries("a", 0..1, false)
            .into_iter()
            .map(|(k, ..)| k)
            .collect();
        assert_eq!(keys, vec![b"new".to_vec()]);
        // Something else than a rebuilt cache partition is refused, not installed.
        assert!(t.install(0, Box::new(7u32)).is_err());
        assert_eq!(t.partition_len(0), 1);
    }

    #[test]
    fn restore_refuses_garbage_without_panicking() {
        let t = CacheService::new(1);
        for junk in [
            &b"\xc4\x05ab"[..],
            b"\xc4\x01a\x05",
            b"\xff\xff",
            b"\xc4\x01a\x01\xc4",
        ] {
            assert!(restore(&t, vec![bytes::Bytes::copy_from_slice(junk)]).is_err());
        }
    }

    fn bounded(max_entries: u32, eviction: crate::settings::Eviction) -> WriteParams {
        WriteParams {
            max_entries,
            eviction,
            ..Default::default()
        }
    }

    fn key(i: u32) -> [u8; 4] {
        i.to_be_bytes()
    }

    /// The keys of cache "c" in partition 0, in the map's order (the order eviction samples
    /// in).
    fn keys_in_order(s: &CacheService) -> Vec<Vec<u8>> {
        let part = s.read(0).unwrap();
        part.get("c")
            .map(|m| m.iter().map(|e| e.key.to_vec()).collect())
            .unwrap_or_default()
    }

    /// Reads `k` once, one ms after the previous step (every access at its own time).
    fn read(s: &CacheService, k: u32) {
        s.advance_clock_for_tests(std::time::Duration::from_millis(1));
        assert!(
            s.get_local(0, "c", &key(k), true).is_some(),
            "key {k} present"
        );
    }

    /// Puts `k`, one ms after the previous step; returns the keys it evicted.
    fn put_evicting(s: &CacheService, k: u32, params: WriteParams) -> Vec<Vec<u8>> {
        s.advance_clock_for_tests(std::time::Duration::from_millis(1));
        let before = keys_in_order(s);
        run(s, put("c", &key(k), b"v", params));
        let after = keys_in_order(s);
        before.into_iter().filter(|b| !after.contains(b)).collect()
    }

    fn seeded() -> (u64, rand::rngs::StdRng) {
        use rand::SeedableRng;
        let seed: u64 = rand::random();
        println!("seed {seed}");
        (seed, rand::rngs::StdRng::seed_from_u64(seed))
    }

    /// With no more entries than the sample (16), the sample is the whole map: LRU evicts
    /// exactly the least recently used entry.
    #[test]
    fn lru_evicts_the_least_recently_used_entry_of_a_small_map() {
        use rand::seq::SliceRandom;
        let (seed, mut rng) = seeded();
        let s = CacheService::new(1);
        s.set_owned(1);
        let params = bounded(10, crate::settings::Eviction::Lru);
        for k in 0..10 {
            assert!(put_evicting(&s, k, params).is_empty());
        }
        // Read in a random order: that order, oldest first, is the order of eviction.
        let mut order: Vec<u32> = (0..10).collect();
        order.shuffle(&mut rng);
        for &k in &order {
            read(&s, k);
        }
        for (round, &oldest) in order.iter().enumerate() {
            let evicted = put_evicting(&s, 100 + round as u32, params);
            assert_eq!(
                evicted,
                vec![key(oldest).to_vec()],
                "round {round}: read order {order:?} (seed {seed})"
            );
        }
    }

    /// LFU evicts the entry read least often; a new entry, never read, goes next.
    #[test]
    fn lfu_evicts_the_least_frequently_used_entry_of_a_small_map() {
        use rand::seq::SliceRandom;
        let (seed, mut rng) = seeded();
        let s = CacheService::new(1);
        s.set_owned(1);
        let params = bounded(10, crate::settings::Eviction::Lfu);
        for k in 0..10 {
            assert!(put_evicting(&s, k, params).is_empty());
        }
        // Key k is read reads[k] times, each a different count (1..=10); reads interleaved
        // at random so that recency says nothing.
        let mut counts: Vec<u32> = (1..=10).collect();
        counts.shuffle(&mut rng);
        let mut reads: Vec<u32> = (0..10u32)
            .flat_map(|k| std::iter::repeat_n(k, counts[k as usize] as usize))
            .collect();
        reads.shuffle(&mut rng);
        for &k in &reads {
            read(&s, k);
        }
        let mut by_use: Vec<u32> = (0..10).collect();
        by_use.sort_by_key(|&k| counts[k as usize]);
        let evicted = put_evicting(&s, 100, params);
        assert_eq!(
            evicted,
            vec![key(by_use[0]).to_vec()],
            "read counts {counts:?} (seed {seed})"
        );
        // The newcomer has no reads: it is the least frequently used now.
        let evicted = put_evicting(&s, 101, params);
        assert_eq!(evicted, vec![key(100).to_vec()], "seed {seed}");
        // Read once, it still has fewer reads than everyone but the next least used.
        read(&s, 101);
        let evicted = put_evicting(&s, 102, params);
        assert_eq!(
            evicted,
            vec![key(101).to_vec()],
            "1 read against at least 2 (seed {seed})"
        );
    }

    /// In a map larger than the sample, each victim is the lowest-ranked entry of some run
    /// of 16 consecutive entries of the map (cyclically): the documented sampling slack, and
    /// nothing more.
    #[test]
    fn eviction_in_a_large_map_takes_the_lowest_ranked_of_a_sample() {
        use rand::seq::SliceRandom;
        use std::collections::HashMap;
        for policy in [
            crate::settings::Eviction::Lru,
            crate::settings::Eviction::Lfu,
        ] {
            let (seed, mut rng) = seeded();
            let s = CacheService::new(1);
            s.set_owned(1);
            let n = 200u32;
            let params = bounded(n, policy);
            // rank[k]: last access time (LRU) or reads (LFU), all different.
            let mut rank: HashMap<Vec<u8>, u64> = HashMap::new();
            for k in 0..n {
                put_evicting(&s, k, params);
            }
            let mut order: Vec<u32> = (0..n).collect();
            order.shuffle(&mut rng);
            for (i, &k) in order.iter().enumerate() {
                let times = match policy {
                    crate::settings::Eviction::Lru => 1,
                    crate::settings::Eviction::Lfu => i + 1,
                };
                for _ in 0..times {
                    read(&s, k);
                }
                rank.insert(key(k).to_vec(), i as u64 + 1);
            }
            let sample = crate::settings::EVICTION_SAMPLE;
            for round in 0..40u32 {
                let in_order = keys_in_order(&s);
                let evicted = put_evicting(&s, 10_000 + round, params);
                assert_eq!(evicted.len(), 1, "{policy:?} round {round} (seed {seed})");
                let victim = &evicted[0];
                let len = in_order.len();
                let at = in_order.iter().position(|k| k == victim).unwrap();
                let lowest_of_a_window = (0..sample).any(|back| {
                    let start = (at + len - back) % len;
                    (0..sample)
                        .map(|j| &in_order[(start + j) % len])
                        .all(|k| rank[k] >= rank[victim])
                });
                assert!(
                    lowest_of_a_window,
                    "{policy:?} round {round}: victim of rank {} is not the lowest of any \
                     {sample} consecutive entries (seed {seed})",
                    rank[victim]
                );
                // The newcomer ranks above everyone (LRU: latest; LFU: given more reads).
                let newcomer = 10_000 + round;
                let reads = match policy {
                    crate::settings::Eviction::Lru => 1,
                    crate::settings::Eviction::Lfu => n as usize + 1,
                };
                for _ in 0..reads {
                    read(&s, newcomer);
                }
                rank.insert(key(newcomer).to_vec(), n as u64 + 1 + round as u64);
                rank.remove(victim);
            }
        }
    }

    #[test]
    fn max_entries_evicts_least_recently_used_of_a_sample() {
        let s = CacheService::new(1);
        s.set_owned(1);
        let params = WriteParams {
            max_entries: 10,
            ..Default::default()
        };
        for i in 0..100u32 {
            run(&s, put("c", &i.to_be_bytes(), b"v", params));
            assert!(s.count("c", 0..1) <= 10);
        }
        assert_eq!(s.count("c", 0..1), 10);
        assert_eq!(s.counters("c").evictions.load(Ordering::Relaxed), 90);
    }
}
