//! Noticing that this member was paused, without IO.
//!
//! A member stopped for longer than failure detection (SIGSTOP, a frozen VM, a machine
//! that swapped) is declared failed by the others, and its backups are promoted. When it
//! runs again, its table still says it owns its partitions, and nothing it has heard yet
//! says otherwise: for a moment it would serve reads of data that newer writes replaced,
//! and start writes and repairs for partitions it no longer owns. So a member measures
//! its own liveness: a ticker records each turn; a gap between two turns (or since the last
//! one, seen by an operation that comes first) longer than `max_gap` means the member may
//! have been declared failed, and it serves nothing as an owner until it has asked the
//! others for their newest table *after* the gap and applied it.
//!
//! `max_gap` must stay well below the time failure detection takes (about one second with
//! the default gossip settings), so that a pause the others can have noticed is always one
//! this member notices too.

use std::time::Duration;
use tokio::time::Instant;

/// What a turn of the ticker found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Turn {
    /// On time, and nothing to confirm.
    Serving,
    /// A gap since the last turn: the member may have been declared failed.
    Gap,
    /// On time, but an earlier gap is not confirmed yet.
    Confirming,
}

/// How a member's own liveness stands (see the module's documentation).
#[derive(Debug)]
pub(crate) struct PauseGuard {
    max_gap: Duration,
    last_turn: Instant,
    /// When the member last found it had been paused, until the cluster's table,
    /// asked for after that moment, confirms (or corrects) its ownership.
    suspect_since: Option<Instant>,
}

impl PauseGuard {
    pub(crate) fn new(max_gap: Duration, now: Instant) -> Self {
        Self {
            max_gap,
            last_turn: now,
            suspect_since: None,
        }
    }

    /// A turn of the ticker at `now`. Unless it says [`Turn::Serving`], the member must ask
    /// the cluster for its table (and call [`PauseGuard::confirmed`]).
    pub(crate) fn turn(&mut self, now: Instant) -> Turn {
        let gap = now.saturating_duration_since(self.last_turn) > self.max_gap;
        self.last_turn = self.last_turn.max(now);
        if gap {
            self.suspect_since = Some(now);
            Turn::Gap
        } else if self.suspect_since.is_some() {
            Turn::Confirming
        } else {
            Turn::Serving
        }
    }

    /// Whether the member may act as an owner at `now`: no gap found, none under way. (The
    /// runtime reads the same answer through [`PauseGuard::serving_until`].)
    #[cfg(test)]
    pub(crate) fn may_serve(&self, now: Instant) -> bool {
        self.serving_until().is_some_and(|until| now <= until)
    }

    /// Until when the member may act as an owner without another turn; `None` while it
    /// confirms a gap. (The runtime publishes this in an atomic, so that the operations'
    /// hot path reads it without taking the guard's lock.)
    pub(crate) fn serving_until(&self) -> Option<Instant> {
        self.suspect_since
            .is_none()
            .then(|| self.last_turn + self.max_gap)
    }

    /// This member has reason to think it was cut off (it saw a majority of its recent
    /// tables' members fail; see `takeover`): as after a gap, it serves nothing as an owner
    /// until a table asked for after `now` is applied. Called again while the reason lasts,
    /// so that only a table asked for once it is over lifts the suspicion.
    pub(crate) fn suspect(&mut self, now: Instant) {
        self.suspect_since = Some(self.suspect_since.map_or(now, |s| s.max(now)));
    }

    /// The cluster's table, asked for at `asked_at`, has been applied: a suspicion that
    /// began no later than the question is lifted.
    pub(crate) fn confirmed(&mut self, asked_at: Instant) {
        if self.suspect_since.is_some_and(|since| since <= asked_at) {
            self.suspect_since = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_that_sees_the_majority_fail_serves_nothing_until_a_later_table() {
        let t0 = Instant::now();
        let mut g = PauseGuard::new(GAP, t0);
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(g.turn(t1), Turn::Serving);
        g.suspect(t1);
        assert!(!g.may_serve(t1));
        assert_eq!(g.turn(t1 + Duration::from_millis(100)), Turn::Confirming);
        // Still cut off at t2: a table asked for before then lifts nothing.
        let t2 = t1 + Duration::from_millis(200);
        g.suspect(t2);
        g.confirmed(t1 + Duration::from_millis(150));
        assert!(!g.may_serve(t2));
        g.confirmed(t2 + Duration::from_millis(10));
        assert_eq!(g.turn(t2 + Duration::from_millis(50)), Turn::Serving);
        assert!(g.may_serve(t2 + Duration::from_millis(60)));
    }

    const GAP: Duration = Duration::from_millis(500);

    #[test]
    fn regular_turns_keep_the_member_serving() {
        let t0 = Instant::now();
        let mut g = PauseGuard::new(GAP, t0);
        for i in 1..50 {
            let now = t0 + Duration::from_millis(100 * i);
            assert_eq!(g.turn(now), Turn::Serving);
            assert!(g.may_serve(now + Duration::from_millis(50)));
        }
    }

    #[test]
    fn an_operation_that_runs_before_the_ticker_after_a_pause_is_not_served() {
        let t0 = Instant::now();
        let g = PauseGuard::new(GAP, t0);
        assert!(!g.may_serve(t0 + Duration::from_secs(8)));
    }

    #[test]
    fn a_gap_suspends_serving_until_a_table_asked_for_after_it_is_applied() {
        let t0 = Instant::now();
        let mut g = PauseGuard::new(GAP, t0);
        let resumed = t0 + Duration::from_secs(8);
        assert_eq!(g.turn(resumed), Turn::Gap);
        assert!(!g.may_serve(resumed));
        // The next turns come on time, but the member still waits for the cluster.
        let next = resumed + Duration::from_millis(100);
        assert_eq!(g.turn(next), Turn::Confirming);
        assert!(!g.may_serve(next));
        // An answer to a question asked before the gap was noticed proves nothing.
        g.confirmed(resumed - Duration::from_millis(1));
        assert!(!g.may_serve(next));
        g.confirmed(next);
        assert!(g.may_serve(next));
        assert_eq!(g.turn(next + Duration::from_millis(100)), Turn::Serving);
    }

    #[test]
    fn a_second_pause_while_confirming_needs_a_second_confirmation() {
        let t0 = Instant::now();
        let mut g = PauseGuard::new(GAP, t0);
        let first = t0 + Duration::from_secs(2);
        assert_eq!(g.turn(first), Turn::Gap);
        let asked = first + Duration::from_millis(1);
        let second = first + Duration::from_secs(3);
        assert_eq!(g.turn(second), Turn::Gap);
        g.confirmed(asked);
        assert!(
            !g.may_serve(second),
            "the question predates the second pause"
        );
        g.confirmed(second);
        assert!(g.may_serve(second));
    }

    #[test]
    fn a_clock_read_out_of_order_does_not_move_the_last_turn_back() {
        let t0 = Instant::now();
        let mut g = PauseGuard::new(GAP, t0 + Duration::from_millis(100));
        assert_eq!(g.turn(t0), Turn::Serving);
        assert!(g.may_serve(t0 + Duration::from_millis(550)));
    }
}
