//! The one error enum of `grid-net`.

use std::net::SocketAddr;
use std::time::Duration;

/// Everything that can go wrong moving bytes between members.
///
/// Each variant says what the caller can do about it. None of them leaves local state
/// half-changed: a failed call had no local effect; whether the remote side ran it is
/// said per variant.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The TLS material could not be loaded or built. Fix the configuration; nothing started.
    #[error("TLS setup failed: {0}")]
    Tls(String),
    /// The UDP socket could not be bound or configured. Pick another address or port.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
    /// Could not reach the peer (dial failed or is backing off, or a request found its
    /// lane broken twice before its frame was written). The remote did not run anything;
    /// retry later.
    #[error("peer {addr} unreachable: {reason}")]
    Unreachable {
        /// The peer.
        addr: SocketAddr,
        /// Why: the last dial error, or the remaining backoff.
        reason: String,
    },
    /// The peer refused us at the handshake (wrong cluster, protocol or settings). Retrying
    /// will not help until the configurations agree.
    #[error("peer {addr} refused the connection: {reason}")]
    Refused {
        /// The peer.
        addr: SocketAddr,
        /// The reason the peer gave.
        reason: String,
    },
    /// The connection broke while the call was under way. The remote may or may not have
    /// run it.
    #[error("connection to {addr} lost: {reason}")]
    ConnectionLost {
        /// The peer.
        addr: SocketAddr,
        /// What quinn said.
        reason: String,
    },
    /// No answer within the deadline. The remote may or may not have run it.
    #[error("no answer from {addr} within {timeout:?}")]
    Timeout {
        /// The peer.
        addr: SocketAddr,
        /// The deadline that ran out.
        timeout: Duration,
    },
    /// A frame was larger than the configured limit. Nothing was sent (outgoing) or the
    /// stream was closed (incoming).
    #[error("frame of {size} bytes exceeds the limit of {limit} bytes")]
    FrameTooLarge {
        /// The frame's size.
        size: usize,
        /// The limit in force.
        limit: usize,
    },
    /// The peer sent something that is not a valid frame of the protocol.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The remote handler returned an error; it ran.
    #[error("remote error: {0}")]
    Remote(String),
    /// Encoding or decoding a value failed.
    #[error(transparent)]
    Codec(#[from] crate::codec::CodecError),
    /// This member is shutting down; nothing was sent.
    #[error("member is shutting down")]
    ShuttingDown,
}
