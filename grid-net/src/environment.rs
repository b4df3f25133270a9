//! What a member takes from its surroundings — UDP sockets, its start generation, the seeds
//! of its protocol randomness — when those do not come from the operating system: the
//! deterministic simulator (`grid-sim`) supplies an in-memory network and seeds here.
//!
//! A member started without an environment ([`crate::config::NetConfig::environment`] is
//! `None`, the default) binds real sockets and seeds from the OS, exactly as before.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use quinn::AsyncUdpSocket;

/// A replacement for the operating system's network and randomness, for one member.
pub trait NetEnvironment: Send + Sync + fmt::Debug + 'static {
    /// A datagram socket bound at `addr` (port 0: any free port), on which a QUIC endpoint
    /// runs. Nothing else is asked of it than quinn's [`AsyncUdpSocket`].
    fn bind_udp(&self, addr: SocketAddr) -> io::Result<Arc<dyn AsyncUdpSocket>>;

    /// The generation of the member starting now (larger is younger); by default the
    /// microseconds since the Unix epoch.
    fn generation(&self) -> u64;

    /// A seed for the randomness of the protocol named `purpose` (e.g. `"quic"` for the
    /// QUIC endpoint's connection ids and packet-number skips).
    fn seed(&self, purpose: &str) -> [u8; 32];
}

/// Where copy work runs. A deterministic simulation runs the whole cluster on one thread,
/// and marks that thread with [`set_single_threaded`]: work that a member would otherwise
/// hand to other threads (the bulk runtime, copy threads, `spawn_blocking`) then runs on
/// the calling thread, so that nothing outside the simulation's scheduler wakes a task.
pub fn single_threaded() -> bool {
    SINGLE_THREADED.with(std::cell::Cell::get)
}

/// Marks (or unmarks) the calling thread as one on which everything must run (see
/// [`single_threaded`]).
pub fn set_single_threaded(on: bool) {
    SINGLE_THREADED.with(|c| c.set(on));
}

thread_local! {
    static SINGLE_THREADED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}
