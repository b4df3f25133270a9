//! Entry processors: named functions, registered on every member, that the key's owner
//! runs atomically on one entry (Hazelcast's `EntryProcessor`).

use std::sync::Arc;

use grid_core::codec;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::ops::Outcome;

/// A processor with its types erased: (key, current value, args) → (what it did, result).
pub(crate) type ErasedProcessor =
    Arc<dyn Fn(&[u8], Option<&[u8]>, &[u8]) -> Result<(Outcome, Vec<u8>), String> + Send + Sync>;

/// The entry an entry processor works on. Changes made through it are applied (and
/// replicated) when the processor returns.
#[derive(Debug)]
pub struct ProcessorEntry<K, V> {
    key: K,
    value: Option<V>,
    outcome: Outcome,
}

impl<K, V: Serialize> ProcessorEntry<K, V> {
    /// The key.
    pub fn key(&self) -> &K {
        &self.key
    }

    /// The current value, if any (as changed by this processor so far).
    pub fn value(&self) -> Option<&V> {
        self.value.as_ref()
    }

    /// Sets the value.
    pub fn set_value(&mut self, value: V) {
        self.outcome = Outcome::Set(Vec::new());
        self.value = Some(value);
    }

    /// Removes the entry.
    pub fn remove(&mut self) {
        self.outcome = Outcome::Remove;
        self.value = None;
    }
}

/// Wraps a typed processor for the store.
pub(crate) fn erase<K, V, A, R, F>(f: F) -> ErasedProcessor
where
    K: DeserializeOwned,
    V: Serialize + DeserializeOwned,
    A: DeserializeOwned,
    R: Serialize,
    F: Fn(&mut ProcessorEntry<K, V>, A) -> R + Send + Sync + 'static,
{
    Arc::new(move |key: &[u8], value: Option<&[u8]>, args: &[u8]| {
        let err = |e: codec::CodecError| e.to_string();
        let mut entry = ProcessorEntry {
            key: codec::decode::<K>(key).map_err(err)?,
            value: value.map(codec::decode::<V>).transpose().map_err(err)?,
            outcome: Outcome::Keep,
        };
        let args: A = codec::decode(args).map_err(err)?;
        let result = codec::encode(&f(&mut entry, args)).map_err(err)?;
        let outcome = match (entry.outcome, entry.value) {
            (Outcome::Set(_), Some(v)) => Outcome::Set(codec::encode(&v).map_err(err)?),
            (o, _) => o,
        };
        Ok((outcome, result))
    })
}
