//! [`Cache<K, V>`]: the typed handle on one named cache.

use std::marker::PhantomData;
use std::sync::Arc;

use grid_core::codec;
use grid_core::runtime::{OpKind, Runtime};
use grid_core::GridError;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::ops::CacheOp;
use crate::store::{Bytes, CacheService, SERVICE};

/// A named, partitioned cache: each entry lives on its partition's owner and its backups.
/// Cheap to clone; the same name is the same cache on every member.
///
/// Reads of a key this member owns are served from local memory without a network hop or
/// a queue; everything else goes to the key's owner. A write is acknowledged once the owner
/// and every live synchronous backup have it.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), grid_core::GridError> {
/// # let grid = grid::Grid::builder().bind("127.0.0.1:0").no_seeds().cluster_name("cache-doc").start().await?;
/// let users = grid.cache::<u64, String>("users");
/// users.put(&42, &"ada".to_string()).await?;
/// assert_eq!(users.get(&42).await?, Some("ada".to_string()));
/// assert_eq!(users.put_if_absent(&42, &"bob".to_string()).await?, Some("ada".to_string()));
/// assert_eq!(users.remove(&42).await?, Some("ada".to_string()));
/// assert!(!users.contains_key(&42).await?);
/// # grid.shutdown().await;
/// # Ok(()) }
/// ```
pub struct Cache<K, V> {
    name: Arc<str>,
    runtime: Runtime,
    service: Arc<CacheService>,
    _types: PhantomData<fn(K) -> V>,
}

impl<K, V> Clone for Cache<K, V> {
    fn clone(&self) -> Self {
        Self {
            name: self.name.clone(),
            runtime: self.runtime.clone(),
            service: self.service.clone(),
            _types: PhantomData,
        }
    }
}

impl<K, V> std::fmt::Debug for Cache<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache").field("name", &self.name).finish()
    }
}

fn decode_value<V: DeserializeOwned>(answer: &[u8]) -> Result<Option<V>, GridError> {
    let raw: Option<Bytes> = codec::decode(answer)?;
    raw.map(|b| codec::decode(&b.0).map_err(GridError::from))
        .transpose()
}

impl<K: Serialize, V: Serialize + DeserializeOwned> Cache<K, V> {
    /// A handle on the cache `name` (see `Grid::cache`).
    pub fn new(name: &str, runtime: Runtime, service: Arc<CacheService>) -> Self {
        Self {
            name: name.into(),
            runtime,
            service,
            _types: PhantomData,
        }
    }

    /// The cache's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    async fn run(&self, partition: u32, op: &CacheOp, kind: OpKind) -> Result<Vec<u8>, GridError> {
        self.runtime
            .execute(SERVICE, partition, codec::encode(op)?, kind)
            .await
    }

    /// The value of `key`, if any.
    pub async fn get(&self, key: &K) -> Result<Option<V>, GridError> {
        let key = codec::encode(key)?;
        let p = self.runtime.partition_of(&key);
        if self.runtime.owns(p) {
            return match self.service.get_local(p, &self.name, &key) {
                Some(v) => Ok(Some(codec::decode(&v)?)),
                None => Ok(None),
            };
        }
        let op = CacheOp::Get {
            cache: self.name.to_string(),
            key,
        };
        decode_value(&self.run(p, &op, OpKind::Read).await?)
    }

    /// Whether `key` has a value.
    pub async fn contains_key(&self, key: &K) -> Result<bool, GridError> {
        let key = codec::encode(key)?;
        let p = self.runtime.partition_of(&key);
        if self.runtime.owns(p) {
            return Ok(self.service.get_local(p, &self.name, &key).is_some());
        }
        let op = CacheOp::ContainsKey {
            cache: self.name.to_string(),
            key,
        };
        Ok(codec::decode(&self.run(p, &op, OpKind::Read).await?)?)
    }

    /// Sets `key` to `value`; returns the previous value.
    pub async fn put(&self, key: &K, value: &V) -> Result<Option<V>, GridError> {
        let key = codec::encode(key)?;
        let p = self.runtime.partition_of(&key);
        let op = CacheOp::Put {
            cache: self.name.to_string(),
            key,
            value: codec::encode(value)?,
        };
        // Setting the same value twice leaves the same state: safe to retry.
        decode_value(&self.run(p, &op, OpKind::IdempotentWrite).await?)
    }

    /// Sets `key` to `value` unless it already has one; returns the existing value (`None`
    /// when this call stored `value`).
    pub async fn put_if_absent(&self, key: &K, value: &V) -> Result<Option<V>, GridError> {
        let key = codec::encode(key)?;
        let p = self.runtime.partition_of(&key);
        let op = CacheOp::PutIfAbsent {
            cache: self.name.to_string(),
            key,
            value: codec::encode(value)?,
        };
        decode_value(&self.run(p, &op, OpKind::Write).await?)
    }

    /// Removes `key`; returns the value it had.
    pub async fn remove(&self, key: &K) -> Result<Option<V>, GridError> {
        let key = codec::encode(key)?;
        let p = self.runtime.partition_of(&key);
        let op = CacheOp::Remove {
            cache: self.name.to_string(),
            key,
        };
        decode_value(&self.run(p, &op, OpKind::Write).await?)
    }

    /// The number of entries in the cache, summed over every partition's owner. Exact when
    /// no write runs concurrently.
    pub async fn len(&self) -> Result<usize, GridError> {
        let partitions = self.runtime.table().partitions();
        let counts = (0..partitions).map(|p| {
            let op = CacheOp::Len {
                cache: self.name.to_string(),
            };
            async move {
                let answer = self.run(p, &op, OpKind::Read).await?;
                Ok::<usize, GridError>(codec::decode(&answer)?)
            }
        });
        let mut total = 0;
        for c in futures::future::join_all(counts).await {
            total += c?;
        }
        Ok(total)
    }

    /// Whether the cache has no entries.
    pub async fn is_empty(&self) -> Result<bool, GridError> {
        Ok(self.len().await? == 0)
    }
}
