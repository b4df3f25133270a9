//! How values become bytes: MessagePack through `rmp-serde`, in its compact (array) form.
//!
//! Used for grid's own wire messages and for user keys, values and messages. It lives in
//! `grid-net` (not `grid-core`) because the transport is its first user and dependencies
//! point one way; `grid-core` re-exports it.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// A value could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The value could not be encoded (a `Serialize` impl failed, e.g. a map with non-string
    /// keys in a format that needs them). Nothing was sent.
    #[error("cannot encode value: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    /// The bytes are not a valid encoding of the expected type: a peer of another version,
    /// or corrupt input. The input was discarded.
    #[error("cannot decode value: {0}")]
    Decode(#[from] rmp_serde::decode::Error),
}

/// Encodes `value` into a new buffer.
///
/// ```
/// let bytes = grid_net::codec::encode(&("key", 42u32)).unwrap();
/// let back: (String, u32) = grid_net::codec::decode(&bytes).unwrap();
/// assert_eq!(back, ("key".to_string(), 42));
/// ```
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    Ok(rmp_serde::to_vec(value)?)
}

/// Decodes a value of type `T` from `bytes`. Never panics on malformed input.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    Ok(rmp_serde::from_slice(bytes)?)
}

/// `#[serde(with = "grid_net::codec::bin")]` on a `Vec<u8>` field: MessagePack binary
/// instead of an array of numbers (smaller, and copied in one piece).
pub mod bin {
    use serde::{Deserializer, Serializer};

    /// Writes the bytes as one binary value.
    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    /// Reads a binary value (or, from older peers, an array of numbers).
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Vec<u8>, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
                while let Some(b) = seq.next_element()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        d.deserialize_byte_buf(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for input in [
            &b""[..],
            &b"\xff\xff\xff"[..],
            &b"\x93\x01"[..],
            &[0xdc, 0xff, 0xff][..],
        ] {
            assert!(decode::<(String, u64, Vec<u8>)>(input).is_err());
        }
    }
}
