//! The one clock of grid's decisions. Every deadline, lease, expiry and timer reads
//! [`now`] (tokio's clock, which a test or the simulator can pause and move by hand) and
//! every absolute time (expiry instants that replicas must agree on) reads [`unix_ms`],
//! which follows the same clock from an anchor taken from the wall clock once per process.
//! Reading `std::time::Instant` or `SystemTime` directly would put a clock outside the
//! simulator's control.

use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

pub use tokio::time::Instant;

/// (tokio instant, Unix milliseconds) read together once: the anchor of [`unix_ms`].
static ANCHOR: OnceLock<(Instant, u64)> = OnceLock::new();

fn anchor() -> (Instant, u64) {
    *ANCHOR.get_or_init(|| {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        (Instant::now(), wall)
    })
}

thread_local! {
    /// An anchor for this thread only (a simulated world: one thread, one paused clock),
    /// which takes precedence over [`ANCHOR`]. Worlds run one after the other (or side by
    /// side, one per thread) in one process, each with a clock of its own: a process-wide
    /// anchor would carry the wall time between two worlds into the second one's Unix
    /// times, and a seed would not replay.
    static THREAD_ANCHOR: std::cell::Cell<Option<(Instant, u64)>> = const { std::cell::Cell::new(None) };
}

/// Now, on the runtime's clock.
pub fn now() -> Instant {
    Instant::now()
}

/// Milliseconds since the Unix epoch on the runtime's clock: the wall clock when the
/// process first asked, moved on by the runtime's clock since. Replicas agree on absolute
/// times (an entry's expiry) through it; a simulation sets the anchor with
/// [`set_unix_anchor`] so that a seed replays the same times.
pub fn unix_ms() -> u64 {
    let (at, wall) = THREAD_ANCHOR.with(|a| a.get()).unwrap_or_else(anchor);
    wall.saturating_add(Instant::now().saturating_duration_since(at).as_millis() as u64)
}

/// Fixes the Unix time that the runtime's clock reads now (before anything read it; later
/// calls are ignored). Returns whether it took effect.
pub fn set_unix_anchor(unix_ms: u64) -> bool {
    ANCHOR.set((Instant::now(), unix_ms)).is_ok()
}

/// Fixes the Unix time that the runtime's clock reads now, for the calling thread only,
/// replacing any earlier anchor of this thread (a simulated world sets it when it starts).
pub fn set_thread_unix_anchor(unix_ms: u64) {
    THREAD_ANCHOR.with(|a| a.set(Some((Instant::now(), unix_ms))));
}
