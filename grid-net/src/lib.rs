//! How bytes move between grid members and who is alive.
//!
//! # Layout
//! - [`tls`]: the cluster CA and member certificates ([`tls::Identity`]), rustls configs.
//! - [`transport`]: the QUIC endpoint ([`transport::Transport`]): connection cache,
//!   request/response, ordered one-way messages, bulk streams; frames and their limits.
//! - `gossip`: chitchat carried over the QUIC connections.
//! - [`membership`]: the member list, events and the oldest member ([`membership::Cluster`]).
//! - `multicast`: multicast discovery (announces addresses; trust still comes from TLS).
//! - [`topic`]: cluster messages on named channels ([`topic::Topic`]).
//! - [`node`]: starts all of the above for one member ([`node::Node`]).
//! - [`codec`]: MessagePack encoding of values.
//! - `socket`: the UDP socket with a fault-injection switch ([`FaultSwitch`]).
//! - [`bulk_runtime`]: the lower-priority runtime that carries bulk streams.
//! - [`environment`]: the seam through which the simulator supplies sockets and seeds.
//! - [`malloc`]: glibc allocator settings for processes that run members.
//! - [`backoff`]: exponential backoff with seeded jitter, for retry loops ([`backoff::Backoff`]).

// `deny`, not `forbid`: two places allow it (`bulk_runtime::sched_idle` and
// `malloc::keep_freed_memory`: system and libc calls, each with its proof).
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod backoff;
pub mod buffers;
pub mod bulk_runtime;
pub mod codec;
pub mod config;
pub mod environment;
mod error;
mod frame;
mod gossip;
pub mod malloc;
pub mod membership;
mod multicast;
mod mux;
pub mod node;
mod socket;
pub mod tls;
pub mod topic;
pub mod transport;
mod wire;

pub use error::NetError;
pub use socket::FaultSwitch;
#[doc(hidden)]
pub use wire::testing as wire_testing;
pub use wire::PROTOCOL_VERSION;
