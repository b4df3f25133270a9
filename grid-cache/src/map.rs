//! [`CacheMap`]: one cache's entries in one partition, packed for memory.
//!
//! Keys and values live back to back in one byte arena; the hash table holds 16-byte slots
//! (offset and lengths) instead of two boxed slices and their allocations. That saves the
//! per-entry allocator overhead and two fat pointers: about 40 bytes per entry instead of
//! about 150 at hashbrown's emptiest load (see BENCHMARKS.md, "Memory"). Replaced values
//! leave dead bytes behind; the arena is compacted when they make up half of it.
//!
//! Entries of caches that expire or evict also have a [`Meta`] (expiry, last access, hits)
//! in a side vector; plain caches pay nothing for it.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use hashbrown::HashTable;

use crate::settings::{Eviction, EVICTION_SAMPLE};

/// Expiry and access bookkeeping of an entry.
#[derive(Debug, Default)]
pub(crate) struct Meta {
    /// Absolute expiry in ms since the epoch (0: never).
    pub(crate) expire_at: u64,
    /// Last read or write in ms since the epoch (idle expiry, LRU). Reads update it under
    /// the read lock, hence atomic.
    touched: AtomicU64,
    /// Idle time to live in ms (0: none).
    pub(crate) idle_ms: u32,
    /// Reads, saturating (LFU).
    hits: AtomicU32,
}

impl Clone for Meta {
    fn clone(&self) -> Self {
        Self {
            expire_at: self.expire_at,
            touched: AtomicU64::new(self.touched.load(Ordering::Relaxed)),
            idle_ms: self.idle_ms,
            hits: AtomicU32::new(self.hits.load(Ordering::Relaxed)),
        }
    }
}

impl Meta {
    pub(crate) fn new(expire_at: u64, idle_ms: u32, now: u64) -> Self {
        Self {
            expire_at,
            touched: AtomicU64::new(now),
            idle_ms,
            hits: AtomicU32::new(0),
        }
    }

    pub(crate) fn is_live(&self, now: u64) -> bool {
        (self.expire_at == 0 || now < self.expire_at)
            && (self.idle_ms == 0
                || now < self.touched.load(Ordering::Relaxed) + self.idle_ms as u64)
    }

    pub(crate) fn touch(&self, now: u64) {
        self.touched.fetch_max(now, Ordering::Relaxed);
        let _ = self
            .hits
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |h| h.checked_add(1));
    }

    /// When this entry expires if it is not read again (0: never).
    pub(crate) fn deadline(&self) -> u64 {
        let idle = if self.idle_ms > 0 {
            self.touched.load(Ordering::Relaxed) + self.idle_ms as u64
        } else {
            0
        };
        match (self.expire_at, idle) {
            (0, i) => i,
            (e, 0) => e,
            (e, i) => e.min(i),
        }
    }

    fn can_expire(&self) -> bool {
        self.expire_at != 0 || self.idle_ms != 0
    }

    fn eviction_rank(&self, policy: Eviction) -> u64 {
        match policy {
            Eviction::Lru => self.touched.load(Ordering::Relaxed),
            Eviction::Lfu => self.hits.load(Ordering::Relaxed) as u64,
        }
    }
}

/// No [`Meta`] for this entry.
const NO_META: u32 = u32::MAX;
/// Compaction starts once dead bytes are half the arena and at least this many.
const MIN_GARBAGE: usize = 64 * 1024;
/// Largest arena (offsets are 32-bit): 4 GiB of keys and values per cache and partition.
pub(crate) const MAX_ARENA: usize = u32::MAX as usize;

#[derive(Debug, Clone, Copy)]
struct Slot {
    offset: u32,
    key_len: u32,
    value_len: u32,
    meta: u32,
}

/// An entry as the map lends it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EntryRef<'a> {
    pub(crate) key: &'a [u8],
    pub(crate) value: &'a [u8],
    pub(crate) meta: Option<&'a Meta>,
}

impl EntryRef<'_> {
    pub(crate) fn is_live(&self, now: u64) -> bool {
        self.meta.is_none_or(|m| m.is_live(now))
    }

    pub(crate) fn touch(&self, now: u64) {
        if let Some(m) = self.meta {
            m.touch(now);
        }
    }

    pub(crate) fn deadline(&self) -> u64 {
        self.meta.map_or(0, Meta::deadline)
    }

    pub(crate) fn expire_at(&self) -> u64 {
        self.meta.map_or(0, |m| m.expire_at)
    }

    pub(crate) fn idle_ms(&self) -> u32 {
        self.meta.map_or(0, |m| m.idle_ms)
    }

    /// Whether the entry has access bookkeeping.
    pub(crate) fn tracked(&self) -> bool {
        self.meta.is_some()
    }

    fn eviction_rank(&self, policy: Eviction) -> u64 {
        self.meta.map_or(0, |m| m.eviction_rank(policy))
    }
}

/// An entry taken out of the map.
#[derive(Debug)]
pub(crate) struct Removed {
    pub(crate) value: Vec<u8>,
    pub(crate) live: bool,
}

fn hash(key: &[u8]) -> u64 {
    // Seeded differently from the partition function, whose hash all keys of a partition
    // share modulo the partition count.
    xxhash_rust::xxh3::xxh3_64_with_seed(key, 0x9e37_79b9_7f4a_7c15)
}

/// One cache's entries in one partition.
#[derive(Debug, Default, Clone)]
pub(crate) struct CacheMap {
    table: HashTable<Slot>,
    arena: Vec<u8>,
    /// Bytes of the arena no slot refers to.
    garbage: usize,
    metas: Vec<Meta>,
    free_metas: Vec<u32>,
    /// Entries that can expire: the sweeper skips maps without any.
    expiring: usize,
}

impl CacheMap {
    /// An empty map with room for `entries` entries of `bytes` key and value bytes in all,
    /// `metas` of them with bookkeeping (a restored partition: no growth while filling).
    pub(crate) fn with_capacity(entries: usize, bytes: usize, metas: usize) -> Self {
        Self {
            table: HashTable::with_capacity(entries),
            arena: Vec::with_capacity(bytes.min(MAX_ARENA)),
            metas: Vec::with_capacity(metas),
            ..Self::default()
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.table.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// Whether some entry can expire.
    pub(crate) fn has_expiring(&self) -> bool {
        self.expiring > 0
    }

    fn entry_of(&self, s: &Slot) -> EntryRef<'_> {
        let start = s.offset as usize;
        let mid = start + s.key_len as usize;
        let end = mid + s.value_len as usize;
        EntryRef {
            key: &self.arena[start..mid],
            value: &self.arena[mid..end],
            meta: (s.meta != NO_META).then(|| &self.metas[s.meta as usize]),
        }
    }

    /// The entry of `key`, live or not.
    pub(crate) fn get(&self, key: &[u8]) -> Option<EntryRef<'_>> {
        let arena = &self.arena;
        let slot = self.table.find(hash(key), |s| {
            s.key_len as usize == key.len()
                && &arena[s.offset as usize..s.offset as usize + key.len()] == key
        })?;
        Some(self.entry_of(slot))
    }

    /// The entry of `key` if it is live.
    pub(crate) fn live(&self, key: &[u8], now: u64) -> Option<EntryRef<'_>> {
        self.get(key).filter(|e| e.is_live(now))
    }

    pub(crate) fn contains(&self, key: &[u8]) -> bool {
        self.get(key).is_some()
    }

    /// Every entry, live or not.
    pub(crate) fn iter(&self) -> impl Iterator<Item = EntryRef<'_>> {
        self.table.iter().map(|s| self.entry_of(s))
    }

    /// Whether adding `extra` bytes of key and value fits the arena (after compaction).
    pub(crate) fn fits(&self, extra: usize) -> bool {
        self.arena.len() - self.garbage + extra <= MAX_ARENA
    }

    /// Sets `key`; returns the entry it replaced (its value only if `want_old`). Returns
    /// `Err` when the arena is full (4 GiB), leaving the map unchanged.
    pub(crate) fn insert(
        &mut self,
        key: &[u8],
        value: &[u8],
        meta: Option<Meta>,
        now: u64,
        want_old: bool,
    ) -> Result<Option<Removed>, String> {
        let old = self.remove(key, want_old, now);
        let needed = key.len() + value.len();
        if self.arena.len() + needed > MAX_ARENA {
            self.compact();
            if self.arena.len() + needed > MAX_ARENA {
                return Err("partition full: 4 GiB of keys and values in one cache".into());
            }
        }
        let offset = self.arena.len() as u32;
        self.arena.extend_from_slice(key);
        self.arena.extend_from_slice(value);
        let meta = match meta {
            None => NO_META,
            Some(m) => {
                if m.can_expire() {
                    self.expiring += 1;
                }
                match self.free_metas.pop() {
                    Some(i) => {
                        self.metas[i as usize] = m;
                        i
                    }
                    None => {
                        self.metas.push(m);
                        (self.metas.len() - 1) as u32
                    }
                }
            }
        };
        let slot = Slot {
            offset,
            key_len: key.len() as u32,
            value_len: value.len() as u32,
            meta,
        };
        let arena = &self.arena;
        self.table.insert_unique(hash(key), slot, |s| {
            hash(&arena[s.offset as usize..s.offset as usize + s.key_len as usize])
        });
        Ok(old)
    }

    /// Removes `key`; returns what it held (its value only if `want_value`).
    pub(crate) fn remove(&mut self, key: &[u8], want_value: bool, now: u64) -> Option<Removed> {
        let arena = &self.arena;
        let found = self.table.find_entry(hash(key), |s| {
            s.key_len as usize == key.len()
                && &arena[s.offset as usize..s.offset as usize + key.len()] == key
        });
        let (slot, _) = found.ok()?.remove();
        let entry = self.entry_of(&slot);
        let removed = Removed {
            value: if want_value {
                entry.value.to_vec()
            } else {
                Vec::new()
            },
            live: entry.is_live(now),
        };
        if slot.meta != NO_META {
            let m = std::mem::take(&mut self.metas[slot.meta as usize]);
            if m.can_expire() {
                self.expiring = self.expiring.saturating_sub(1);
            }
            self.free_metas.push(slot.meta);
        }
        self.garbage += (slot.key_len + slot.value_len) as usize;
        if self.table.is_empty() {
            *self = Self::default();
        } else if self.garbage > MIN_GARBAGE && self.garbage * 2 > self.arena.len() {
            self.compact();
        }
        Some(removed)
    }

    /// Moves the bytes slots refer to to the front of the arena, in place: a fresh arena
    /// of exactly the live size would be outgrown by the next write, and growing it copies
    /// the whole arena again into freshly faulted pages (a fifth of a member's CPU under
    /// steady overwrites). The capacity stays; it is given back when it is four times what
    /// is left.
    fn compact(&mut self) {
        let mut spans: Vec<(u32, u32)> = self
            .table
            .iter()
            .map(|s| (s.offset, s.key_len + s.value_len))
            .collect();
        spans.sort_unstable();
        let mut moved_to = Vec::with_capacity(spans.len());
        let mut cursor = 0usize;
        for &(offset, len) in &spans {
            let (start, len) = (offset as usize, len as usize);
            // Spans do not overlap and are visited in order, so `cursor <= start`.
            self.arena.copy_within(start..start + len, cursor);
            moved_to.push(cursor as u32);
            cursor += len;
        }
        for s in self.table.iter_mut() {
            if let Ok(i) = spans.binary_search_by_key(&s.offset, |&(offset, _)| offset) {
                s.offset = moved_to[i];
            }
        }
        self.arena.truncate(cursor);
        if self.arena.capacity() > 4 * cursor + MIN_GARBAGE {
            self.arena.shrink_to(2 * cursor);
        }
        self.garbage = 0;
    }

    /// Up to `n` victims, each the lowest-ranked of `EVICTION_SAMPLE` entries taken from a
    /// pseudo-random place in the table; expired entries go first.
    /// Each victim comes with whether it was still live.
    pub(crate) fn victims(
        &self,
        n: usize,
        policy: Eviction,
        now: u64,
        seed: u64,
    ) -> Vec<(Vec<u8>, bool)> {
        let len = self.table.len();
        let mut chosen: Vec<(Vec<u8>, bool)> = Vec::new();
        let mut seed = seed | 1;
        for _ in 0..n {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let start = (seed % len.max(1) as u64) as usize;
            let best = self
                .iter()
                .skip(start)
                .chain(self.iter())
                .take(EVICTION_SAMPLE.min(len))
                .filter(|e| !chosen.iter().any(|(c, _)| c[..] == *e.key))
                .min_by_key(|e| (e.is_live(now), e.eviction_rank(policy)));
            match best {
                Some(e) => chosen.push((e.key.to_vec(), e.is_live(now))),
                None => break,
            }
        }
        chosen
    }

    /// Bytes this map takes: arena, table and bookkeeping.
    pub(crate) fn heap_bytes(&self) -> u64 {
        (self.arena.capacity()
            + self.table.capacity() * (size_of::<Slot>() + 1)
            + self.metas.capacity() * size_of::<Meta>()) as u64
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use rand::{Rng, SeedableRng};

    use super::*;

    /// Random inserts, replacements and removals agree with a `HashMap`, across
    /// compactions.
    #[test]
    fn behaves_like_a_hash_map() {
        let seed: u64 = rand::random();
        println!("seed {seed}");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut map = CacheMap::default();
        let mut model: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
        for step in 0..50_000 {
            let key = format!("k{}", rng.gen_range(0..2_000)).into_bytes();
            match rng.gen_range(0..10) {
                0..=5 => {
                    let value = vec![rng.gen::<u8>(); rng.gen_range(0..300)];
                    let meta = rng.gen_bool(0.3).then(|| Meta::new(0, 0, 1));
                    let old = map.insert(&key, &value, meta, 1, true).unwrap();
                    assert_eq!(
                        old.map(|o| o.value),
                        model.insert(key, value),
                        "step {step}, seed {seed}"
                    );
                }
                6..=8 => {
                    let old = map.remove(&key, true, 1);
                    assert_eq!(
                        old.map(|o| o.value),
                        model.remove(&key),
                        "step {step}, seed {seed}"
                    );
                }
                _ => {
                    assert_eq!(
                        map.get(&key).map(|e| e.value.to_vec()),
                        model.get(&key).cloned()
                    );
                }
            }
            assert_eq!(map.len(), model.len());
        }
        for e in map.iter() {
            assert_eq!(model.get(e.key).map(|v| &v[..]), Some(e.value));
        }
        assert!(map.garbage * 2 <= map.arena.len() || map.garbage <= MIN_GARBAGE);
    }

    /// Overwrites compact the arena in place: once it has grown to twice the live bytes it
    /// is never reallocated again (a fresh, exactly full arena after each compaction was
    /// regrown by the very next write), and every value survives the moves.
    #[test]
    fn steady_overwrites_do_not_regrow_the_arena() {
        let mut map = CacheMap::default();
        let value = |k: u32, round: u32| {
            let mut v = vec![(k ^ round) as u8; 1000];
            v[..4].copy_from_slice(&k.to_le_bytes());
            v[4..8].copy_from_slice(&round.to_le_bytes());
            v
        };
        for k in 0..500u32 {
            map.insert(&k.to_le_bytes(), &value(k, 0), None, 1, false)
                .unwrap();
        }
        let mut capacities = std::collections::BTreeSet::new();
        for round in 1..40u32 {
            for k in 0..500u32 {
                map.insert(&k.to_le_bytes(), &value(k, round), None, 1, false)
                    .unwrap();
                if round >= 4 {
                    capacities.insert(map.arena.capacity());
                }
            }
            for k in 0..500u32 {
                assert_eq!(map.get(&k.to_le_bytes()).unwrap().value, value(k, round));
            }
        }
        assert_eq!(
            capacities.len(),
            1,
            "the arena was reallocated: {capacities:?}"
        );
        assert!(map.arena.capacity() <= 4 * 500 * 1004 + MIN_GARBAGE);
    }

    #[test]
    fn expiry_and_idle_follow_the_meta() {
        let mut map = CacheMap::default();
        map.insert(b"ttl", b"v", Some(Meta::new(100, 0, 0)), 0, false)
            .unwrap();
        map.insert(b"idle", b"v", Some(Meta::new(0, 50, 0)), 0, false)
            .unwrap();
        map.insert(b"plain", b"v", None, 0, false).unwrap();
        assert!(map.has_expiring());
        assert!(map.live(b"ttl", 99).is_some() && map.live(b"ttl", 100).is_none());
        map.get(b"idle").unwrap().touch(40);
        assert!(map.live(b"idle", 89).is_some() && map.live(b"idle", 90).is_none());
        assert!(map.live(b"plain", u64::MAX - 1).is_some());
        map.remove(b"ttl", false, 0);
        map.remove(b"idle", false, 0);
        assert!(!map.has_expiring());
    }
}
