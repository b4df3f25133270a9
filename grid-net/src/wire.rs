//! What goes on a stream: the kind byte that opens every stream, the handshake messages,
//! and the layouts of routed frames and responses.

use std::net::SocketAddr;

use bytes::Bytes;
#[cfg(test)]
use bytes::{BufMut, BytesMut};
use serde::{Deserialize, Serialize};

/// The version of the wire protocol; also in the ALPN name `grid/4`. (2: an owner's
/// `Unreplicated` answer carries the service's answer; members report their status. 3:
/// changes, copies and version checks carry the sender's table version, so that an owner
/// paused past failure detection is refused; an owner may answer `Confirming`. 4: a caller
/// that gives up sends a cancel frame on its request lane, which a member of protocol 3
/// would take for a malformed frame.)
pub const PROTOCOL_VERSION: u32 = 4;

/// The first byte of every stream says what the stream carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum StreamKind {
    /// Bidirectional, first stream of a connection: [`Hello`] then [`HelloReply`].
    Hello = b'H',
    /// Bidirectional: one routed request frame, then one response frame.
    Request = b'R',
    /// Unidirectional: one frame holding one chitchat envelope.
    Gossip = b'G',
    /// Unidirectional, long-lived: routed one-way frames, delivered in order.
    Ordered = b'O',
    /// Bidirectional: a routed header frame, chunk frames until the end of the stream, then
    /// one response frame.
    Bulk = b'B',
    /// Bidirectional, long-lived: id-tagged requests one way, id-tagged answers the other
    /// (see `mux`).
    Mux = b'M',
}

impl StreamKind {
    pub(crate) fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            b'H' => Self::Hello,
            b'R' => Self::Request,
            b'G' => Self::Gossip,
            b'O' => Self::Ordered,
            b'B' => Self::Bulk,
            b'M' => Self::Mux,
            _ => return None,
        })
    }
}

/// Application close and stream reset codes.
pub(crate) mod codes {
    use quinn::VarInt;
    pub(crate) const CLOSE_REJECTED: VarInt = VarInt::from_u32(0x10);
    pub(crate) const CLOSE_DUPLICATE: VarInt = VarInt::from_u32(0x11);
    pub(crate) const CLOSE_SHUTDOWN: VarInt = VarInt::from_u32(0x12);
    pub(crate) const CLOSE_PROTOCOL: VarInt = VarInt::from_u32(0x13);
    pub(crate) const CLOSE_FORGOTTEN: VarInt = VarInt::from_u32(0x14);
    pub(crate) const STREAM_BAD_INPUT: VarInt = VarInt::from_u32(0x20);
    /// The caller gave up on a request that has a stream of its own.
    pub(crate) const STREAM_CANCELLED: VarInt = VarInt::from_u32(0x21);
}

/// Sent by the dialer on the first stream of a connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Hello {
    pub(crate) cluster: String,
    pub(crate) protocol: u32,
    pub(crate) member_id: String,
    pub(crate) generation: u64,
    /// Where the dialer accepts connections (its one QUIC port).
    pub(crate) addr: SocketAddr,
    /// Settings that must be equal on every member (e.g. the partition count).
    pub(crate) settings: Vec<(String, String)>,
}

/// The acceptor's answer to [`Hello`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum HelloReply {
    Accepted { member_id: String, generation: u64 },
    Rejected { reason: String },
}

/// Longest route name accepted.
pub(crate) const MAX_ROUTE_LEN: usize = 255;

/// `[u8 route length][route][body]` (the transport builds it in place, with the frame header).
#[cfg(test)]
pub(crate) fn encode_routed(route: &str, body: &[u8]) -> Bytes {
    debug_assert!(route.len() <= MAX_ROUTE_LEN);
    let mut buf = BytesMut::with_capacity(1 + route.len() + body.len());
    buf.put_u8(route.len() as u8);
    buf.put_slice(route.as_bytes());
    buf.put_slice(body);
    buf.freeze()
}

/// Splits a routed frame; `None` if it is malformed.
pub(crate) fn decode_routed(frame: &Bytes) -> Option<(&str, Bytes)> {
    let len = *frame.first()? as usize;
    let route = frame.get(1..1 + len)?;
    let route = std::str::from_utf8(route).ok()?;
    Some((route, frame.slice(1 + len..)))
}

/// Response status byte.
pub(crate) const RESPONSE_OK: u8 = 0;
pub(crate) const RESPONSE_ERR: u8 = 1;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routed_round_trip_and_garbage() {
        let f = encode_routed("cache.get", b"body");
        let (r, b) = decode_routed(&f).unwrap();
        assert_eq!((r, &b[..]), ("cache.get", &b"body"[..]));
        assert!(decode_routed(&Bytes::from_static(b"")).is_none());
        assert!(decode_routed(&Bytes::from_static(b"\x09abc")).is_none());
        assert!(decode_routed(&Bytes::from_static(b"\x02\xff\xfe")).is_none());
    }
}

/// Raw wire building blocks, for tests that play a misbehaving peer.
#[doc(hidden)]
pub mod testing {
    use std::net::SocketAddr;

    use bytes::{BufMut, BytesMut};

    pub use super::StreamKind;

    /// The bytes a dialer writes on its first stream: kind byte, framed hello.
    pub fn hello_stream(
        cluster: &str,
        member_id: &str,
        generation: u64,
        addr: SocketAddr,
    ) -> Vec<u8> {
        let hello = super::Hello {
            cluster: cluster.to_string(),
            protocol: super::PROTOCOL_VERSION,
            member_id: member_id.to_string(),
            generation,
            addr,
            settings: vec![],
        };
        let body = crate::codec::encode(&hello).unwrap_or_default();
        let mut buf = BytesMut::new();
        buf.put_u8(StreamKind::Hello as u8);
        buf.put_u32(body.len() as u32);
        buf.put_slice(&body);
        buf.to_vec()
    }

    /// A well-formed request stream: kind byte, framed routed request.
    pub fn request_stream(route: &str, body: &[u8]) -> Vec<u8> {
        let mut buf = BytesMut::new();
        buf.put_u8(StreamKind::Request as u8);
        buf.put_u32((1 + route.len() + body.len()) as u32);
        buf.put_u8(route.len() as u8);
        buf.put_slice(route.as_bytes());
        buf.put_slice(body);
        buf.to_vec()
    }
}
