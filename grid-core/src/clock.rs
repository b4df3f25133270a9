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

/// Now, on the runtime's clock.
pub fn now() -> Instant {
    Instant::now()
}

/// Milliseconds since the Unix epoch on the runtime's clock: the wall clock when the
/// process first asked, moved on by the runtime's clock since. Replicas agree on absolute
/// times (an entry's expiry) through it; a simulation sets the anchor with
/// [`set_unix_anchor`] so that a seed replays the same times.
pub fn unix_ms() -> u64 {
    let (at, wall) = anchor();
    wall.saturating_add(Instant::now().saturating_duration_since(at).as_millis() as u64)
}

/// Fixes the Unix time that the runtime's clock reads now (before anything read it; later
/// calls are ignored). Returns whether it took effect.
pub fn set_unix_anchor(unix_ms: u64) -> bool {
    ANCHOR.set((Instant::now(), unix_ms)).is_ok()
}
