//! Copies of a cache kept on a member beside the partitioned entries: the near copy
//! (what this member read, dropped when anyone changes it) and the replicated copy (every
//! entry, kept up to date by the owners' events).

use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use crate::events::{EventKind, RawEvent};
use crate::map::Meta;
use crate::store::now_ms;

/// A copied entry: its value and expiry.
struct Entry {
    value: Box<[u8]>,
    meta: Meta,
}

impl Entry {
    fn new(value: Vec<u8>, expire_at: u64, idle_ms: u32, now: u64) -> Self {
        Self {
            value: value.into_boxed_slice(),
            meta: Meta::new(expire_at, idle_ms, now),
        }
    }

    fn is_live(&self, now: u64) -> bool {
        self.meta.is_live(now)
    }
}

type Map = HashMap<Box<[u8]>, Entry>;

/// Invalidation counters, striped by key hash: a read that fetched a value stores it only
/// if no invalidation of its stripe arrived meanwhile, so a copy never keeps a value that
/// a concurrent change superseded.
const STRIPES: usize = 1024;
/// The near copy is split into this many maps, each behind its own lock: a near read is
/// the hottest path of a near cache (a local lookup, ~1 µs), and one lock shared by every
/// reading thread made its cache line travel between cores on every read.
const SHARDS: usize = 16;

type NearMap = hashbrown::HashMap<Box<[u8]>, Entry>;

/// What this member read of a near cache.
pub(crate) struct NearCopy {
    shards: Vec<RwLock<NearMap>>,
    stripes: Vec<AtomicU64>,
    /// One hash per key picks its shard and its stripe (foldhash, randomly seeded).
    hasher: hashbrown::DefaultHashBuilder,
    /// Most entries kept per shard (the cache's near capacity spread over the shards);
    /// when a shard is full, new reads are not copied into it (rounded up: at most 15
    /// entries over the capacity in all).
    shard_capacity: usize,
}

impl std::fmt::Debug for NearCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NearCopy")
            .field("capacity", &(self.shard_capacity * SHARDS))
            .finish()
    }
}

impl NearCopy {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| RwLock::new(NearMap::new())).collect(),
            stripes: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
            hasher: hashbrown::DefaultHashBuilder::default(),
            shard_capacity: capacity.div_ceil(SHARDS),
        }
    }

    /// The key's shard and invalidation stripe.
    fn place(&self, key: &[u8]) -> (&RwLock<NearMap>, &AtomicU64) {
        let h = self.hasher.hash_one(key);
        (
            &self.shards[(h >> 56) as usize % SHARDS],
            &self.stripes[h as usize % STRIPES],
        )
    }

    /// The copied value, if live.
    pub(crate) fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        let (shard, _) = self.place(key);
        let map = shard.read().unwrap_or_else(|e| e.into_inner());
        let e = map.get(key)?;
        // Most copies never expire (and near copies have no idle time): no clock read.
        if e.meta.expire_at != 0 && !e.is_live(now_ms()) {
            return None;
        }
        Some(e.value.to_vec())
    }

    /// The invalidation mark to pass to [`NearCopy::insert`] (taken before fetching).
    pub(crate) fn mark(&self, key: &[u8]) -> u64 {
        self.place(key).1.load(Ordering::Acquire)
    }

    /// Copies a fetched value unless an invalidation arrived since `mark`.
    pub(crate) fn insert(&self, key: &[u8], value: Vec<u8>, deadline: u64, mark: u64) {
        let (shard, stripe) = self.place(key);
        let mut map = shard.write().unwrap_or_else(|e| e.into_inner());
        if stripe.load(Ordering::Acquire) != mark
            || (map.len() >= self.shard_capacity && !map.contains_key(key))
        {
            return;
        }
        map.insert(key.into(), Entry::new(value, deadline, 0, now_ms()));
    }

    pub(crate) fn invalidate(&self, key: &[u8]) {
        let (shard, stripe) = self.place(key);
        let mut map = shard.write().unwrap_or_else(|e| e.into_inner());
        stripe.fetch_add(1, Ordering::AcqRel);
        map.remove(key);
    }

    pub(crate) fn clear(&self) {
        // Every shard's lock at once, so that no insert sees an old mark in between.
        let mut maps: Vec<_> = self
            .shards
            .iter()
            .map(|s| s.write().unwrap_or_else(|e| e.into_inner()))
            .collect();
        for s in &self.stripes {
            s.fetch_add(1, Ordering::AcqRel);
        }
        for map in &mut maps {
            map.clear();
        }
    }

    pub(crate) fn on_event(&self, ev: &RawEvent) {
        match ev.kind {
            EventKind::Cleared | EventKind::Lost => self.clear(),
            _ => self.invalidate(&ev.key),
        }
    }
}

/// Changes seen while a replicated copy is filled (first, or again after lost events).
#[derive(Default)]
struct Filling {
    /// Keys set or removed by events.
    keys: HashSet<Box<[u8]>>,
    /// Partitions cleared by events.
    cleared: HashSet<u32>,
    /// Events were lost during the fill: fill again.
    lost: bool,
}

/// Every entry of a replicated cache.
pub(crate) struct ReplicatedCopy {
    /// The cluster's partition count (to tell which keys a `Cleared` event covers).
    partitions: u32,
    map: RwLock<Map>,
    /// While the copy is first filled: what changed since, which the fill's older values
    /// must not overwrite.
    filling: Mutex<Option<Filling>>,
}

impl std::fmt::Debug for ReplicatedCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicatedCopy").finish()
    }
}

impl ReplicatedCopy {
    pub(crate) fn new(partitions: u32) -> Self {
        Self {
            partitions,
            map: RwLock::new(Map::new()),
            filling: Mutex::new(None),
        }
    }

    pub(crate) fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        let now = now_ms();
        let e = map.get(key).filter(|e| e.is_live(now))?;
        e.meta.touch(now);
        Some(e.value.to_vec())
    }

    pub(crate) fn contains(&self, key: &[u8]) -> bool {
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        map.get(key).is_some_and(|e| e.is_live(now_ms()))
    }

    pub(crate) fn set(&self, key: &[u8], value: Vec<u8>, expire_at: u64, idle_ms: u32) {
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        self.note(key);
        map.insert(key.into(), Entry::new(value, expire_at, idle_ms, now_ms()));
    }

    pub(crate) fn remove(&self, key: &[u8]) {
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        self.note(key);
        map.remove(key);
    }

    fn note(&self, key: &[u8]) {
        if let Some(changed) = self
            .filling
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            changed.keys.insert(key.into());
        }
    }

    pub(crate) fn on_event(&self, ev: &RawEvent) {
        match (ev.kind, ev.value_bytes()) {
            (EventKind::Added | EventKind::Updated, Some(v)) => {
                self.set(&ev.key, v.to_vec(), ev.expire_at, ev.idle_ms)
            }
            (EventKind::Cleared, _) => {
                // One partition was cleared (`remove_all` clears each through its owner,
                // in its own order): only that partition's keys go.
                let partitions = self.partitions;
                let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
                map.retain(|k, _| {
                    grid_core::partition::partition_of(k, partitions) != ev.partition
                });
                if let Some(f) = self
                    .filling
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .as_mut()
                {
                    f.cleared.insert(ev.partition);
                }
            }
            // Handled by whoever fills the copy (see `lost`).
            (EventKind::Lost, _) => {}
            _ => self.remove(&ev.key),
        }
    }

    /// Starts the first fill: events from now on win over the fill's values.
    pub(crate) fn begin_fill(&self) {
        *self.filling.lock().unwrap_or_else(|e| e.into_inner()) = Some(Filling::default());
    }

    /// Replaces the copy by the fill's entries (key, value, expire_at, idle), except where
    /// events changed it since [`ReplicatedCopy::begin_fill`]: those keys keep what the
    /// events made of them.
    pub(crate) fn fill(&self, entries: Vec<(Vec<u8>, Vec<u8>, u64, u32)>) {
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        let filling = self.filling.lock().unwrap_or_else(|e| e.into_inner());
        let now = now_ms();
        let mut fresh = Map::with_capacity(entries.len());
        for (k, v, expire_at, idle) in entries {
            if filling.as_ref().is_some_and(|f| {
                f.keys.contains(&k[..])
                    || f.cleared
                        .contains(&grid_core::partition::partition_of(&k, self.partitions))
            }) {
                continue;
            }
            fresh.insert(k.into_boxed_slice(), Entry::new(v, expire_at, idle, now));
        }
        if let Some(f) = filling.as_ref() {
            for k in &f.keys {
                if let Some(e) = map.remove(k) {
                    fresh.insert(k.clone(), e);
                }
            }
        }
        *map = fresh;
    }

    /// Ends a fill; returns whether events were lost meanwhile (then fill again).
    pub(crate) fn end_fill(&self) -> bool {
        self.filling
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .is_some_and(|f| f.lost)
    }

    /// Events were lost: returns whether the caller must start a fill (none is under way;
    /// one is begun), or notes the loss for the fill under way.
    pub(crate) fn lost(&self) -> bool {
        let mut filling = self.filling.lock().unwrap_or_else(|e| e.into_inner());
        match filling.as_mut() {
            Some(f) => {
                f.lost = true;
                false
            }
            None => {
                *filling = Some(Filling::default());
                true
            }
        }
    }

    /// Live (key, value) pairs.
    pub(crate) fn entries(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let now = now_ms();
        self.map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, e)| e.is_live(now))
            .map(|(k, e)| (k.to_vec(), e.value.to_vec()))
            .collect()
    }

    pub(crate) fn len(&self) -> usize {
        let now = now_ms();
        self.map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|e| e.is_live(now))
            .count()
    }

    pub(crate) fn heap(&self) -> u64 {
        let per = (size_of::<Entry>() + 17) as u64;
        self.map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, e)| k.len() as u64 + e.value.len() as u64 + per)
            .sum()
    }
}
