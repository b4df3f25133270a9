//! [`CacheSettings`]: how a named cache behaves, the same on every member.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Where a cache keeps its entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum CacheMode {
    /// Each entry lives on its partition's owner and backups (Hazelcast's IMap,
    /// atlassian-cache's "remote"). Reads of a key this member owns are local.
    #[default]
    Partitioned,
    /// A full copy on every member that opened the cache: reads are local, changes are
    /// ordered by the key's partition owner and reach every copy asynchronously
    /// (Hazelcast's ReplicatedMap).
    Replicated,
    /// Partitioned, plus a local copy of what this member reads; a change anywhere
    /// invalidates the copies cluster-wide (atlassian-cache's "hybrid": replicate via
    /// invalidation, Hazelcast's near cache).
    Near,
    /// This member only: nothing leaves the process (atlassian-cache's "local").
    Local,
}

/// Which entry `max_entries` evicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Eviction {
    /// The least recently used of a sample of entries (as Hazelcast and Redis do).
    #[default]
    Lru,
    /// The least frequently used (fewest reads) of a sample of entries.
    Lfu,
}

/// Entries sampled to choose an eviction victim (Hazelcast samples 15, Redis 5).
pub const EVICTION_SAMPLE: usize = 16;

/// How a cache behaves. Build with [`CacheSettings::builder`]; every member must open a
/// cache with the same settings (a different one is refused with
/// [`crate::CacheError::SettingsConflict`]).
///
/// `max_entries` is a per-member bound on the entries the member owns (backups are not
/// counted, as in Hazelcast's `PER_NODE` policy). It is enforced per partition, at
/// `ceil(max_entries / partitions owned)`, so a member can hold up to one entry per owned
/// partition more than `max_entries` (the documented slack), and more for a moment while
/// partitions move between members.
///
/// ```
/// use std::time::Duration;
/// use grid_cache::{CacheMode, CacheSettings, Eviction};
/// let settings = CacheSettings::builder()
///     .mode(CacheMode::Near)
///     .expire_after_write(Duration::from_secs(300))
///     .expire_after_access(Duration::from_secs(60))
///     .max_entries(10_000)
///     .eviction(Eviction::Lfu)
///     .statistics(true)
///     .build();
/// assert_eq!(settings.mode(), CacheMode::Near);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheSettings {
    mode: CacheMode,
    expire_after_write_ms: u64,
    expire_after_access_ms: u32,
    max_entries: u32,
    eviction: Eviction,
    statistics: bool,
    flushable: bool,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            mode: CacheMode::Partitioned,
            expire_after_write_ms: 0,
            expire_after_access_ms: 0,
            max_entries: 0,
            eviction: Eviction::Lru,
            statistics: true,
            flushable: true,
        }
    }
}

impl CacheSettings {
    /// Settings with the defaults: partitioned, no expiry, unbounded, statistics on,
    /// flushable.
    pub fn builder() -> CacheSettingsBuilder {
        CacheSettingsBuilder(Self::default())
    }

    /// The mode.
    pub fn mode(&self) -> CacheMode {
        self.mode
    }

    /// Time to live after a write (`None`: never expires).
    pub fn expire_after_write(&self) -> Option<Duration> {
        (self.expire_after_write_ms > 0).then(|| Duration::from_millis(self.expire_after_write_ms))
    }

    /// Time to live after the last read or write (`None`: never idles out).
    pub fn expire_after_access(&self) -> Option<Duration> {
        (self.expire_after_access_ms > 0)
            .then(|| Duration::from_millis(self.expire_after_access_ms as u64))
    }

    /// The per-member bound on owned entries (`None`: unbounded).
    pub fn max_entries(&self) -> Option<u32> {
        (self.max_entries > 0).then_some(self.max_entries)
    }

    /// Which entries `max_entries` evicts.
    pub fn eviction(&self) -> Eviction {
        self.eviction
    }

    /// Whether statistics are kept.
    pub fn statistics(&self) -> bool {
        self.statistics
    }

    /// Whether `remove_all` is allowed.
    pub fn flushable(&self) -> bool {
        self.flushable
    }

    pub(crate) fn write_params(&self) -> WriteParams {
        WriteParams {
            ttl_ms: self.expire_after_write_ms,
            idle_ms: self.expire_after_access_ms,
            max_entries: self.max_entries,
            eviction: self.eviction,
        }
    }
}

/// Builds [`CacheSettings`].
#[derive(Debug, Clone)]
pub struct CacheSettingsBuilder(CacheSettings);

impl CacheSettingsBuilder {
    /// Where entries live (default [`CacheMode::Partitioned`]).
    pub fn mode(mut self, mode: CacheMode) -> Self {
        self.0.mode = mode;
        self
    }

    /// Shorthand for `mode(CacheMode::Near)`.
    pub fn near(self) -> Self {
        self.mode(CacheMode::Near)
    }

    /// Shorthand for `mode(CacheMode::Replicated)`.
    pub fn replicated(self) -> Self {
        self.mode(CacheMode::Replicated)
    }

    /// Shorthand for `mode(CacheMode::Local)`.
    pub fn local(self) -> Self {
        self.mode(CacheMode::Local)
    }

    /// Entries expire this long after they were written (rounded to milliseconds).
    pub fn expire_after_write(mut self, ttl: Duration) -> Self {
        self.0.expire_after_write_ms = ttl.as_millis().clamp(1, u64::MAX as u128) as u64;
        self
    }

    /// Entries expire this long after they were last read or written (at most ~49 days).
    pub fn expire_after_access(mut self, idle: Duration) -> Self {
        self.0.expire_after_access_ms = ttl_u32(idle);
        self
    }

    /// Bounds the entries each member owns; adding beyond it evicts (see [`CacheSettings`]).
    pub fn max_entries(mut self, max: u32) -> Self {
        self.0.max_entries = max;
        self
    }

    /// Which entries `max_entries` evicts (default LRU).
    pub fn eviction(mut self, eviction: Eviction) -> Self {
        self.0.eviction = eviction;
        self
    }

    /// Keeps statistics or not (default on).
    pub fn statistics(mut self, on: bool) -> Self {
        self.0.statistics = on;
        self
    }

    /// Whether `remove_all` is allowed (default yes).
    pub fn flushable(mut self, on: bool) -> Self {
        self.0.flushable = on;
        self
    }

    /// The settings.
    pub fn build(self) -> CacheSettings {
        self.0
    }
}

pub(crate) fn ttl_u32(d: Duration) -> u32 {
    d.as_millis().clamp(1, u32::MAX as u128) as u32
}

/// What the owner needs to know about a cache to run a write: sent with every write, so
/// an owner needs no registry of settings (and one that never opened the cache can serve
/// it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct WriteParams {
    /// Time to live after the write, in ms (0: none).
    pub ttl_ms: u64,
    /// Time to live after the last access, in ms (0: none).
    pub idle_ms: u32,
    /// Per-member bound on owned entries (0: none).
    pub max_entries: u32,
    /// Victim choice.
    pub eviction: Eviction,
}

/// Per-entry expiry for [`crate::Cache::put_with`], overriding the cache's settings.
///
/// ```
/// use std::time::Duration;
/// let expiry = grid_cache::Expiry::after_write(Duration::from_secs(5))
///     .and_after_access(Duration::from_secs(1));
/// # let _ = expiry;
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Expiry {
    pub(crate) ttl: Option<Duration>,
    pub(crate) idle: Option<Duration>,
}

impl Expiry {
    /// Expires this long after the write.
    pub fn after_write(ttl: Duration) -> Self {
        Self {
            ttl: Some(ttl),
            idle: None,
        }
    }

    /// Expires this long after the last access.
    pub fn after_access(idle: Duration) -> Self {
        Self {
            ttl: None,
            idle: Some(idle),
        }
    }

    /// Also expires this long after the last access.
    pub fn and_after_access(mut self, idle: Duration) -> Self {
        self.idle = Some(idle);
        self
    }

    pub(crate) fn apply(&self, mut params: WriteParams) -> WriteParams {
        if let Some(ttl) = self.ttl {
            params.ttl_ms = ttl.as_millis().clamp(1, u64::MAX as u128) as u64;
        }
        if let Some(idle) = self.idle {
            params.idle_ms = ttl_u32(idle);
        }
        params
    }
}
