//! The cache's operations and the changes they replicate. An operation is what a caller
//! asks; a change is its effect, recorded so that every replica applies exactly the same
//! thing (a `put_if_absent` that found the key absent replicates as a plain set, with the
//! absolute expiry time the owner chose).

use serde::{Deserialize, Serialize};

use crate::settings::WriteParams;

/// Encoded bytes carried as MessagePack binary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Blob(#[serde(with = "grid_core::codec::bin")] pub Vec<u8>);

/// An operation, run on the key's owner.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum CacheOp {
    /// The value of `key` (a read: counts as an access for idle expiry and eviction).
    Get {
        /// Cache name.
        cache: String,
        /// Encoded key.
        key: Blob,
    },
    /// Whether `key` has a live value (not an access).
    ContainsKey {
        /// Cache name.
        cache: String,
        /// Encoded key.
        key: Blob,
    },
    /// Writes `key`, depending on `cond`; answers depend on `cond` (see [`PutIf`]).
    Put {
        /// Cache name.
        cache: String,
        /// Encoded key.
        key: Blob,
        /// Encoded value.
        value: Blob,
        /// When to write.
        cond: PutIf,
        /// Expiry and eviction.
        params: WriteParams,
    },
    /// Removes `key` (if it holds `expected`, when given).
    Remove {
        /// Cache name.
        cache: String,
        /// Encoded key.
        key: Blob,
        /// Only if the current value is this one.
        expected: Option<Blob>,
    },
    /// Runs the registered entry processor `processor` on `key`, atomically.
    Process {
        /// Cache name.
        cache: String,
        /// Encoded key.
        key: Blob,
        /// Processor name (registered on every member).
        processor: String,
        /// Encoded arguments.
        args: Blob,
        /// Expiry and eviction for a value the processor sets.
        params: WriteParams,
    },
    /// The partition's live entries of `cache`: (key, value or empty, expire_at, idle_ms).
    Entries {
        /// Cache name.
        cache: String,
        /// Whether to include the values.
        values: bool,
    },
    /// Removes every entry of `cache` in the partition.
    Clear {
        /// Cache name.
        cache: String,
    },
    /// Removes the partition's expired entries (every cache), at most `limit`.
    Expire {
        /// Most entries removed by one operation.
        limit: u32,
    },
}

impl CacheOp {
    /// The operation's name, as metrics label it (`get`, `put`, …).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Get { .. } => "get",
            Self::ContainsKey { .. } => "contains_key",
            Self::Put { .. } => "put",
            Self::Remove { .. } => "remove",
            Self::Process { .. } => "process",
            Self::Entries { .. } => "entries",
            Self::Clear { .. } => "clear",
            Self::Expire { .. } => "expire",
        }
    }
}

/// The condition of a [`CacheOp::Put`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PutIf {
    /// Always; answers the previous value.
    Always,
    /// Always; answers nothing.
    Set,
    /// Only when the key has no live value; answers the existing value.
    Absent,
    /// Only when the key has a live value; answers the previous value.
    Present,
    /// Only when the current value is this one; answers `Some(old)` when it wrote.
    Equals(Blob),
}

/// Why an entry went away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Removal {
    /// A caller removed it.
    Removed,
    /// Its time to live or idle time passed.
    Expired,
    /// `max_entries` made room for another.
    Evicted,
}

/// A replicated effect.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum CacheChange {
    /// Set a key.
    Set {
        /// Cache name.
        cache: String,
        /// Encoded key.
        key: Blob,
        /// Encoded value.
        value: Blob,
        /// Absolute expiry, ms since the Unix epoch (0: never).
        expire_at: u64,
        /// Idle time to live, ms (0: none).
        idle_ms: u32,
        /// Whether to track accesses (for LRU/LFU eviction).
        track: bool,
    },
    /// Remove a key.
    Delete {
        /// Cache name.
        cache: String,
        /// Encoded key.
        key: Blob,
        /// Why.
        why: Removal,
    },
    /// Remove every entry of a cache in the partition.
    Clear {
        /// Cache name.
        cache: String,
    },
    /// Several changes, applied in order as one.
    Many(Vec<Self>),
}

/// What a processor did to its entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Left the entry as it was.
    Keep,
    /// Set the value (encoded).
    Set(Vec<u8>),
    /// Removed the entry.
    Remove,
}
