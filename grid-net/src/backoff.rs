//! Exponential backoff with jitter, for every retry loop of grid.
//!
//! The randomness comes from a seed the caller gives (or an RNG it lends), and the time
//! from tokio's clock ([`tokio::time::Instant`], [`tokio::time::sleep`]): under a
//! deterministic simulator, which seeds everything and pauses tokio's clock, a run of
//! retries replays exactly.
//!
//! Delays double from `initial` up to `max`. Each is "equal jitter": a delay whose base is
//! `b` lies in `[b/2, b]`, so members that failed together do not retry together, and each
//! delay is at least as long as the one before it until the cap is reached.
//!
//! # Examples
//!
//! ```
//! use std::time::Duration;
//! use grid_net::backoff::Backoff;
//!
//! # async fn demo() -> Result<(), String> {
//! # async fn try_once() -> Result<(), String> { Ok(()) }
//! let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
//! let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(500), 7);
//! loop {
//!     match try_once().await {
//!         Ok(()) => return Ok(()),
//!         // Sleeps the next delay, or says there is no time left for one.
//!         Err(e) if !backoff.wait_before(deadline).await => return Err(e),
//!         Err(_) => {}
//!     }
//! }
//! # }
//! ```

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

/// Exponentially growing, jittered delays between attempts (see the [module](self)).
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    /// The base of the next delay, before jitter.
    base: Duration,
    /// Delays handed out since the start or the last [`Backoff::reset`].
    attempts: u32,
    max_attempts: Option<u32>,
    rng: StdRng,
}

impl Backoff {
    /// Delays from `initial` (its first one lies in `[initial/2, initial]`), doubling up to
    /// `max`, jittered by an RNG seeded with `seed`: the same seed gives the same delays. A
    /// `max` under `initial` is taken as `initial`.
    pub fn new(initial: Duration, max: Duration, seed: u64) -> Self {
        Self {
            initial,
            max: max.max(initial),
            base: initial,
            attempts: 0,
            max_attempts: None,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// As [`Backoff::new`], seeded from `rng` (a simulator's, or a member's seeded RNG).
    pub fn with_rng(initial: Duration, max: Duration, rng: &mut impl Rng) -> Self {
        Self::new(initial, max, rng.gen())
    }

    /// At most `n` delays are handed out (until a [`Backoff::reset`]): with `n` retries, a
    /// loop makes at most `n + 1` attempts.
    #[must_use]
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = Some(n);
        self
    }

    /// Delays handed out since the start or the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Starts over from `initial` (after a success). The RNG goes on: the delays after a
    /// reset are not those of the start.
    pub fn reset(&mut self) {
        self.base = self.initial;
        self.attempts = 0;
    }

    /// The next delay, or `None` once [`Backoff::max_attempts`] delays were handed out.
    pub fn next_delay(&mut self) -> Option<Duration> {
        if self.max_attempts.is_some_and(|n| self.attempts >= n) {
            return None;
        }
        self.attempts += 1;
        let base = self.base;
        self.base = base.saturating_mul(2).min(self.max);
        // Equal jitter: half the base for sure, the other half at random. Nanoseconds fit
        // a u64 for 584 years.
        let nanos = u64::try_from(base.as_nanos()).unwrap_or(u64::MAX);
        let half = nanos / 2;
        Some(Duration::from_nanos(
            half + self.rng.gen_range(0..=nanos - half),
        ))
    }

    /// The next delay if, waited from `now`, it ends before `deadline`; `None` when it would
    /// not (there is no time for another attempt after it) or no attempt is left.
    pub fn next_delay_at(&mut self, now: Instant, deadline: Instant) -> Option<Duration> {
        let delay = self.next_delay()?;
        (now + delay < deadline).then_some(delay)
    }

    /// [`Backoff::next_delay_at`] from now, on tokio's clock.
    pub fn next_delay_before(&mut self, deadline: Instant) -> Option<Duration> {
        self.next_delay_at(Instant::now(), deadline)
    }

    /// Sleeps the next delay (on tokio's clock) and returns `true`; returns `false` at once
    /// when no delay is left or the next one would not end before `deadline`.
    pub async fn wait_before(&mut self, deadline: Instant) -> bool {
        match self.next_delay_before(deadline) {
            Some(delay) => {
                tokio::time::sleep(delay).await;
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn delays(b: &mut Backoff, n: usize) -> Vec<Duration> {
        (0..n).map(|_| b.next_delay().unwrap()).collect()
    }

    #[test]
    fn delays_grow_and_are_capped_with_jitter_in_bounds() {
        for seed in 0..200 {
            let mut b = Backoff::new(10 * MS, 300 * MS, seed);
            let d = delays(&mut b, 12);
            let mut base = 10 * MS;
            for (i, &delay) in d.iter().enumerate() {
                assert!(
                    delay >= base / 2 && delay <= base,
                    "seed {seed}, delay {i}: {delay:?} outside [{:?}, {base:?}]",
                    base / 2
                );
                if i > 0 && base < 300 * MS {
                    assert!(delay >= d[i - 1], "seed {seed}: {d:?} shrank at {i}");
                }
                base = (base * 2).min(300 * MS);
            }
            assert!(d.iter().all(|&x| x <= 300 * MS), "{d:?}");
        }
    }

    #[test]
    fn jitter_spreads_the_delays() {
        let firsts: std::collections::HashSet<Duration> = (0..50)
            .map(|seed| Backoff::new(100 * MS, 100 * MS, seed).next_delay().unwrap())
            .collect();
        assert!(firsts.len() > 40, "{} distinct first delays", firsts.len());
    }

    #[test]
    fn the_same_seed_gives_the_same_delays() {
        let a = delays(&mut Backoff::new(MS, 50 * MS, 42), 20);
        let b = delays(&mut Backoff::new(MS, 50 * MS, 42), 20);
        let c = delays(&mut Backoff::new(MS, 50 * MS, 43), 20);
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mut rng = StdRng::seed_from_u64(9);
        let mut rng2 = StdRng::seed_from_u64(9);
        assert_eq!(
            delays(&mut Backoff::with_rng(MS, 50 * MS, &mut rng), 10),
            delays(&mut Backoff::with_rng(MS, 50 * MS, &mut rng2), 10)
        );
    }

    #[test]
    fn attempts_are_capped_and_reset_starts_over() {
        let mut b = Backoff::new(MS, 8 * MS, 1).max_attempts(3);
        assert_eq!(delays(&mut b, 3).len(), 3);
        assert_eq!(b.attempts(), 3);
        assert_eq!(b.next_delay(), None);
        b.reset();
        assert_eq!(b.attempts(), 0);
        let d = b.next_delay().unwrap();
        assert!(d <= MS, "{d:?}");
    }

    #[test]
    fn the_deadline_is_respected() {
        let now = Instant::now();
        let mut b = Backoff::new(10 * MS, 10 * MS, 3);
        // Every delay is in [5, 10] ms.
        assert!(b.next_delay_at(now, now + 11 * MS).is_some());
        assert_eq!(b.next_delay_at(now, now + 5 * MS), None);
        assert_eq!(b.next_delay_at(now, now), None);
        assert_eq!(b.next_delay_at(now + 20 * MS, now), None);
    }

    #[test]
    fn odd_settings_do_not_panic() {
        let mut zero = Backoff::new(Duration::ZERO, Duration::ZERO, 0);
        assert_eq!(zero.next_delay(), Some(Duration::ZERO));
        let mut inverted = Backoff::new(10 * MS, MS, 0);
        let d = delays(&mut inverted, 5);
        assert!(d.iter().all(|&x| x <= 10 * MS && x >= 5 * MS), "{d:?}");
        let mut huge = Backoff::new(Duration::MAX, Duration::MAX, 0);
        assert!(huge.next_delay().is_some());
        assert!(huge.next_delay().is_some());
    }

    /// On tokio's real clock (the workspace's tokio has no `test-util`), with short delays.
    #[tokio::test]
    async fn waits_until_the_deadline_and_no_further() {
        let start = Instant::now();
        let deadline = start + 60 * MS;
        let mut b = Backoff::new(4 * MS, 16 * MS, 5);
        let mut waits = 0;
        while b.wait_before(deadline).await {
            waits += 1;
        }
        // The last delay handed out was refused: it would have ended past the deadline.
        assert_eq!(b.attempts(), waits + 1);
        assert!(waits >= 1, "{waits} waits");
        // Whether a sleep overran is the machine's business (a loaded one may): that no
        // sleep is begun that would end past the deadline is `the_deadline_is_respected`.
        assert!(Instant::now() >= start + 2 * MS);
    }
}
