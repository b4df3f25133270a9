//! The cache's operations and the changes they replicate. An operation is what a caller
//! asks; a change is its effect, recorded so that every replica applies exactly the same
//! thing (a `put_if_absent` that found the key absent replicates as a plain set).

use serde::{Deserialize, Serialize};

/// An operation, run on the key's owner.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum CacheOp {
    /// The value of `key`.
    Get {
        /// Cache name.
        cache: String,
        /// Encoded key.
        #[serde(with = "grid_core::codec::bin")]
        key: Vec<u8>,
    },
    /// Whether `key` has a value.
    ContainsKey {
        /// Cache name.
        cache: String,
        /// Encoded key.
        #[serde(with = "grid_core::codec::bin")]
        key: Vec<u8>,
    },
    /// Sets `key` to `value`; answers the previous value.
    Put {
        /// Cache name.
        cache: String,
        /// Encoded key.
        #[serde(with = "grid_core::codec::bin")]
        key: Vec<u8>,
        /// Encoded value.
        #[serde(with = "grid_core::codec::bin")]
        value: Vec<u8>,
    },
    /// Sets `key` to `value` unless it has a value; answers the existing value.
    PutIfAbsent {
        /// Cache name.
        cache: String,
        /// Encoded key.
        #[serde(with = "grid_core::codec::bin")]
        key: Vec<u8>,
        /// Encoded value.
        #[serde(with = "grid_core::codec::bin")]
        value: Vec<u8>,
    },
    /// Entries of `cache` in the partition the operation is sent to.
    Len {
        /// Cache name.
        cache: String,
    },
    /// Removes `key`; answers the previous value.
    Remove {
        /// Cache name.
        cache: String,
        /// Encoded key.
        #[serde(with = "grid_core::codec::bin")]
        key: Vec<u8>,
    },
}

/// A replicated effect.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum CacheChange {
    /// Set a stored key (cache-prefixed) to a value.
    Set(
        #[serde(with = "grid_core::codec::bin")] Vec<u8>,
        #[serde(with = "grid_core::codec::bin")] Vec<u8>,
    ),
    /// Remove a stored key.
    Delete(#[serde(with = "grid_core::codec::bin")] Vec<u8>),
}

/// The stored form of a key: the cache name, then the encoded key, so that one partition's
/// map holds every cache's entries for that partition.
pub(crate) fn stored_key(cache: &str, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + cache.len() + key.len());
    k.extend_from_slice(&(cache.len() as u16).to_be_bytes());
    k.extend_from_slice(cache.as_bytes());
    k.extend_from_slice(key);
    k
}

/// The cache name of a stored key.
pub(crate) fn cache_of(stored: &[u8]) -> Option<&[u8]> {
    let len = u16::from_be_bytes(stored.get(..2)?.try_into().ok()?) as usize;
    stored.get(2..2 + len)
}
