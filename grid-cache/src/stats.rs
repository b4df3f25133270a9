//! Cache statistics, as atlassian-cache reports them, per member and summed over the
//! cluster.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A cache's statistics on one member (or summed over the cluster by
/// [`crate::Cache::cluster_statistics`]).
///
/// Hits, misses, puts, removes, loads and their times are counted by the member whose
/// caller made the request; evictions, size and heap size by the member holding the
/// entries (size counts the entries it owns, or its copy for replicated and local caches).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheStatistics {
    /// Reads that found a value (with or without a near copy).
    pub hits: u64,
    /// Reads that found none (before any load).
    pub misses: u64,
    /// Writes of a value (put, put_all, replace, loads stored, processors that set).
    pub puts: u64,
    /// Removals by callers.
    pub removes: u64,
    /// Loader calls made on this member.
    pub loads: u64,
    /// Loader calls that produced a value.
    pub load_successes: u64,
    /// Loader calls that failed.
    pub load_failures: u64,
    /// Time spent in loader calls, in nanoseconds.
    pub total_load_time_ns: u64,
    /// Time spent by reads that missed (load included), in nanoseconds.
    pub total_miss_time_ns: u64,
    /// Entries evicted by `max_entries`.
    pub evictions: u64,
    /// Entries that expired.
    pub expirations: u64,
    /// Reads: hits + misses.
    pub requests: u64,
    /// Entries held (see above).
    pub size: u64,
    /// Estimated bytes of those entries: keys, values and per-entry bookkeeping.
    pub heap_size: u64,
}

impl CacheStatistics {
    /// Hits over requests (0 when there were none).
    pub fn hit_ratio(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.hits as f64 / self.requests as f64
        }
    }

    /// Adds another member's statistics.
    pub fn add(&mut self, o: &Self) {
        self.hits += o.hits;
        self.misses += o.misses;
        self.puts += o.puts;
        self.removes += o.removes;
        self.loads += o.loads;
        self.load_successes += o.load_successes;
        self.load_failures += o.load_failures;
        self.total_load_time_ns += o.total_load_time_ns;
        self.total_miss_time_ns += o.total_miss_time_ns;
        self.evictions += o.evictions;
        self.expirations += o.expirations;
        self.requests += o.requests;
        self.size += o.size;
        self.heap_size += o.heap_size;
    }
}

/// The counters a member keeps for one cache.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) enabled: bool,
    hits: AtomicU64,
    misses: AtomicU64,
    puts: AtomicU64,
    removes: AtomicU64,
    loads: AtomicU64,
    load_successes: AtomicU64,
    load_failures: AtomicU64,
    load_ns: AtomicU64,
    miss_ns: AtomicU64,
}

fn bump(c: &AtomicU64, by: u64) {
    c.fetch_add(by, Ordering::Relaxed);
}

impl Counters {
    pub(crate) fn new(enabled: bool) -> Self {
        Self {
            enabled,
            ..Default::default()
        }
    }

    pub(crate) fn hit(&self) {
        if self.enabled {
            bump(&self.hits, 1);
        }
    }

    pub(crate) fn miss(&self, took: Duration) {
        if self.enabled {
            bump(&self.misses, 1);
            bump(&self.miss_ns, took.as_nanos() as u64);
        }
    }

    pub(crate) fn put(&self, n: u64) {
        if self.enabled {
            bump(&self.puts, n);
        }
    }

    pub(crate) fn remove(&self, n: u64) {
        if self.enabled {
            bump(&self.removes, n);
        }
    }

    pub(crate) fn load(&self, ok: bool, took: Duration) {
        if self.enabled {
            bump(&self.loads, 1);
            bump(
                if ok {
                    &self.load_successes
                } else {
                    &self.load_failures
                },
                1,
            );
            bump(&self.load_ns, took.as_nanos() as u64);
        }
    }

    pub(crate) fn snapshot(&self) -> CacheStatistics {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CacheStatistics {
            hits: g(&self.hits),
            misses: g(&self.misses),
            puts: g(&self.puts),
            removes: g(&self.removes),
            loads: g(&self.loads),
            load_successes: g(&self.load_successes),
            load_failures: g(&self.load_failures),
            total_load_time_ns: g(&self.load_ns),
            total_miss_time_ns: g(&self.miss_ns),
            requests: g(&self.hits) + g(&self.misses),
            ..Default::default()
        }
    }
}
