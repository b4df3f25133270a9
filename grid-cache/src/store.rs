//! The per-partition maps of every cache on this member, and the runtime's view of them.

use std::collections::HashMap;
use std::sync::RwLock;

use grid_core::codec;
use grid_core::runtime::{PartitionService, Prepared};

use crate::ops::{cache_of, stored_key, CacheChange, CacheOp};

/// The runtime service name of the cache.
pub const SERVICE: &str = "cache";

type Map = HashMap<Vec<u8>, Vec<u8>>;

/// Every cache's entries on this member, one map per partition. Reads take a partition's
/// read lock only; writes come from the runtime, one at a time per partition.
pub struct CacheService {
    partitions: Vec<RwLock<Map>>,
}

impl std::fmt::Debug for CacheService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheService")
            .field("partitions", &self.partitions.len())
            .finish()
    }
}

impl CacheService {
    /// A service for `partitions` partitions.
    pub fn new(partitions: u32) -> Self {
        Self {
            partitions: (0..partitions).map(|_| RwLock::new(Map::new())).collect(),
        }
    }

    fn map(&self, p: u32) -> Result<&RwLock<Map>, String> {
        self.partitions
            .get(p as usize)
            .ok_or_else(|| format!("no partition {p}"))
    }

    /// The locally stored value of a key (the caller checked that this member owns it).
    pub fn get_local(&self, p: u32, cache: &str, key: &[u8]) -> Option<Vec<u8>> {
        let map = self.partitions.get(p as usize)?;
        let map = map.read().unwrap_or_else(|e| e.into_inner());
        map.get(&stored_key(cache, key)).cloned()
    }

    /// Entries of `cache` in partition `p` on this member.
    pub fn len_local(&self, p: u32, cache: &str) -> usize {
        let Some(map) = self.partitions.get(p as usize) else {
            return 0;
        };
        let map = map.read().unwrap_or_else(|e| e.into_inner());
        map.keys()
            .filter(|k| cache_of(k) == Some(cache.as_bytes()))
            .count()
    }
}

fn encode<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, String> {
    codec::encode(v).map_err(|e| e.to_string())
}

impl PartitionService for CacheService {
    fn name(&self) -> &str {
        SERVICE
    }

    fn prepare(&self, p: u32, op: &[u8]) -> Result<Prepared, String> {
        let op: CacheOp = codec::decode(op).map_err(|e| e.to_string())?;
        let map = self.map(p)?.read().unwrap_or_else(|e| e.into_inner());
        Ok(match op {
            CacheOp::Get { cache, key } => Prepared {
                answer: encode(&map.get(&stored_key(&cache, &key)).map(|v| serde_bytes(v)))?,
                change: None,
            },
            CacheOp::ContainsKey { cache, key } => Prepared {
                answer: encode(&map.contains_key(&stored_key(&cache, &key)))?,
                change: None,
            },
            CacheOp::Put { cache, key, value } => {
                let k = stored_key(&cache, &key);
                let old = map.get(&k).map(|v| serde_bytes(v));
                Prepared {
                    answer: encode(&old)?,
                    change: Some(encode(&CacheChange::Set(k, value))?),
                }
            }
            CacheOp::PutIfAbsent { cache, key, value } => {
                let k = stored_key(&cache, &key);
                match map.get(&k) {
                    Some(existing) => Prepared {
                        answer: encode(&Some(serde_bytes(existing)))?,
                        change: None,
                    },
                    None => Prepared {
                        answer: encode(&None::<Bytes>)?,
                        change: Some(encode(&CacheChange::Set(k, value))?),
                    },
                }
            }
            CacheOp::Len { cache } => Prepared {
                answer: encode(
                    &map.keys()
                        .filter(|k| cache_of(k) == Some(cache.as_bytes()))
                        .count(),
                )?,
                change: None,
            },
            CacheOp::Remove { cache, key } => {
                let k = stored_key(&cache, &key);
                match map.get(&k) {
                    Some(old) => Prepared {
                        answer: encode(&Some(serde_bytes(old)))?,
                        change: Some(encode(&CacheChange::Delete(k))?),
                    },
                    None => Prepared {
                        answer: encode(&None::<Bytes>)?,
                        change: None,
                    },
                }
            }
        })
    }

    fn apply(&self, p: u32, change: &[u8]) -> Result<(), String> {
        let change: CacheChange = codec::decode(change).map_err(|e| e.to_string())?;
        let mut map = self.map(p)?.write().unwrap_or_else(|e| e.into_inner());
        match change {
            CacheChange::Set(k, v) => {
                map.insert(k, v);
            }
            CacheChange::Delete(k) => {
                map.remove(&k);
            }
        }
        Ok(())
    }

    /// Chunks of MessagePack `bin` pairs (stored key, value), written straight from the map:
    /// no intermediate copies, as this is the bulk of a migration's work.
    fn snapshot(&self, p: u32, chunk_bytes: usize) -> Vec<Vec<u8>> {
        let Ok(map) = self.map(p) else {
            return Vec::new();
        };
        let map = map.read().unwrap_or_else(|e| e.into_inner());
        let mut chunks = Vec::new();
        let mut buf = Vec::with_capacity(chunk_bytes.min(8 << 20) + 1024);
        for (k, v) in map.iter() {
            // Writing to a Vec cannot fail.
            let _ = rmp::encode::write_bin(&mut buf, k);
            let _ = rmp::encode::write_bin(&mut buf, v);
            if buf.len() >= chunk_bytes {
                chunks.push(std::mem::replace(
                    &mut buf,
                    Vec::with_capacity(chunk_bytes.min(8 << 20) + 1024),
                ));
            }
        }
        if !buf.is_empty() {
            chunks.push(buf);
        }
        chunks
    }

    fn restore(&self, p: u32, chunks: Vec<bytes::Bytes>) -> Result<(), String> {
        fn bin<'a>(rd: &mut &'a [u8]) -> Result<&'a [u8], String> {
            let len =
                rmp::decode::read_bin_len(rd).map_err(|e| format!("bad snapshot: {e}"))? as usize;
            let (data, rest) = (rd.get(..len), rd.get(len..));
            match (data, rest) {
                (Some(d), Some(r)) => {
                    *rd = r;
                    Ok(d)
                }
                _ => Err("bad snapshot: truncated entry".to_string()),
            }
        }
        let mut fresh = Map::new();
        for chunk in chunks {
            let mut rd: &[u8] = &chunk;
            while !rd.is_empty() {
                let k = bin(&mut rd)?.to_vec();
                let v = bin(&mut rd)?.to_vec();
                fresh.insert(k, v);
            }
        }
        *self.map(p)?.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(())
    }

    fn drop_partition(&self, p: u32) {
        if let Ok(map) = self.map(p) {
            *map.write().unwrap_or_else(|e| e.into_inner()) = Map::new();
        }
    }

    fn partition_len(&self, p: u32) -> usize {
        self.map(p)
            .map(|m| m.read().unwrap_or_else(|e| e.into_inner()).len())
            .unwrap_or(0)
    }
}

/// Bytes that encode as MessagePack binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Bytes(pub(crate) Vec<u8>);

fn serde_bytes(v: &[u8]) -> Bytes {
    Bytes(v.to_vec())
}

impl serde::Serialize for Bytes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Bytes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        codec::bin::deserialize(d).map(Bytes)
    }
}
