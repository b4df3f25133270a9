//! When a member may act as the partition coordinator: not while it sees only a minority of
//! the members its table was planned for (sans-IO, unit-tested).
//!
//! A member cut off from the others, or paused and resumed, sees every other member fail at
//! once. Were it the oldest member it saw, it would coordinate a cluster of itself: promote
//! itself to owner of every partition, with no backups, and acknowledge writes that the
//! rest of the cluster — which promoted the backups of its partitions meanwhile — never
//! sees (the simulator found this: seed 3 of the cache workload). The rule: a member takes
//! the coordinator's duty only while it sees a strict majority of the data members of the
//! tables it held over the last `wait`. The window matters: a cut-off coordinator does not
//! see the others fail at once but one by one, and were each table it publishes the
//! reference, it would shrink the cluster to itself a member at a time (seed 0). Failures
//! far apart in time (or fewer than half within `wait`) keep ordinary failover unchanged.
//!
//! Two exceptions keep a cluster available:
//! - a table of one or two members: with two, the survivor cannot tell a dead peer from a
//!   cut-off one, and waiting would make every two-member cluster unavailable on the first
//!   failure (a two-member cluster is exposed to split brain; three members are not);
//! - after `wait` in the minority (`partitions.minority_takeover_ms`, default 30 s), the
//!   member proceeds anyway: a majority that died at once does not leave the survivors
//!   unavailable for ever. A split that lasts longer than `wait` becomes a split brain, as
//!   in Hazelcast; `None` never proceeds.

use std::sync::Arc;

use tokio::time::{Duration, Instant};

/// What the gate says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Takeover {
    /// This member sees a majority (or the table is too small to ask for one).
    Allowed,
    /// In the minority since `since`; allowed at `until` (`None`: never).
    Minority {
        since: Instant,
        until: Option<Instant>,
    },
    /// In the minority for longer than the wait: allowed, and worth a warning.
    AllowedAfterWait,
}

impl Takeover {
    #[cfg(test)]
    fn allowed(self) -> bool {
        !matches!(self, Self::Minority { .. })
    }
}

/// The gate's state: the members of recent tables, and since when this member has been in
/// the minority.
#[derive(Debug)]
pub(crate) struct TakeoverGate {
    wait: Option<Duration>,
    /// Each data member of a table this member held, and when it was last in one.
    recent: Vec<(Arc<str>, Instant)>,
    minority_since: Option<Instant>,
}

/// How long a member counts in the majority after it left the tables, when the minority
/// never takes over (`wait` is `None`).
const WINDOW_WITHOUT_WAIT: Duration = Duration::from_secs(30);

impl TakeoverGate {
    pub(crate) fn new(wait: Option<Duration>) -> Self {
        Self {
            wait,
            recent: Vec::new(),
            minority_since: None,
        }
    }

    /// Whether the last check found this member in the minority.
    pub(crate) fn in_minority(&self) -> bool {
        self.minority_since.is_some()
    }

    /// `table_members`: the data members of the newest table this member holds (empty
    /// before the first table), recorded on every call; `alive`: whether a member is
    /// alive in this member's view.
    pub(crate) fn check(
        &mut self,
        table_members: &[Arc<str>],
        alive: impl Fn(&str) -> bool,
        now: Instant,
    ) -> Takeover {
        for m in table_members {
            match self.recent.iter_mut().find(|(id, _)| id == m) {
                Some((_, at)) => *at = now,
                None => self.recent.push((m.clone(), now)),
            }
        }
        let window = self.wait.unwrap_or(WINDOW_WITHOUT_WAIT);
        self.recent
            .retain(|(_, at)| now.saturating_duration_since(*at) < window || *at == now);
        let n = self.recent.len();
        let seen = self.recent.iter().filter(|(m, _)| alive(m)).count();
        if n <= 2 || seen * 2 > n {
            self.minority_since = None;
            return Takeover::Allowed;
        }
        let since = *self.minority_since.get_or_insert(now);
        match self.wait.map(|w| since + w) {
            Some(until) if now >= until => Takeover::AllowedAfterWait,
            until => Takeover::Minority { since, until },
        }
    }

    /// How many members the majority is counted over (for logs).
    pub(crate) fn reference(&self) -> usize {
        self.recent.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(n: usize) -> Vec<Arc<str>> {
        (0..n).map(|i| Arc::from(format!("m{i}"))).collect()
    }

    fn alive(ids: &'static [&'static str]) -> impl Fn(&str) -> bool {
        move |m| ids.contains(&m)
    }

    #[test]
    fn a_majority_may_coordinate_a_minority_may_not() {
        let t = members(5);
        let now = Instant::now();
        let mut g = TakeoverGate::new(Some(Duration::from_secs(30)));
        assert_eq!(
            g.check(&t, alive(&["m0", "m1", "m2"]), now),
            Takeover::Allowed
        );
        let m = g.check(&t, alive(&["m3", "m4"]), now);
        assert!(!m.allowed());
        // Alone, as a paused member that resumes sees itself: never the coordinator.
        assert!(!g.check(&t, alive(&["m3"]), now).allowed());
    }

    #[test]
    fn failures_far_apart_never_close_the_gate() {
        let mut g = TakeoverGate::new(Some(Duration::from_secs(30)));
        let mut now = Instant::now();
        // 5 → 4 → 3 → 2 → 1, a minute apart: each table leaves out the member found dead.
        for n in (2..=5).rev() {
            let t: Vec<Arc<str>> = members(5).into_iter().skip(5 - n).collect();
            let dead = t[0].clone();
            assert!(
                g.check(&t, |m| *m != *dead, now).allowed(),
                "{n} members, one dead"
            );
            now += Duration::from_secs(60);
        }
    }

    #[test]
    fn a_cut_off_coordinator_that_sees_the_others_fail_one_by_one_stops() {
        // It publishes a table without each member it finds dead; the members of the
        // tables of the last `wait` still count, so it stops at the third.
        let mut g = TakeoverGate::new(Some(Duration::from_secs(30)));
        let now = Instant::now();
        let all = members(5);
        assert!(g.check(&all, |m| m != "m1", now).allowed());
        let t4: Vec<Arc<str>> = all.iter().filter(|m| &***m != "m1").cloned().collect();
        assert!(g.check(&t4, |m| m != "m1" && m != "m2", now).allowed());
        let t3: Vec<Arc<str>> = t4.iter().filter(|m| &***m != "m2").cloned().collect();
        let m = g.check(&t3, |m| m == "m0" || m == "m4", now);
        assert!(!m.allowed(), "2 of the 5 members seen in the window: {m:?}");
        assert_eq!(g.reference(), 5);
        // Once the window has passed, the members gone since count no more.
        let later = now + Duration::from_secs(31);
        assert_eq!(
            g.check(&t3, |m| m == "m0" || m == "m4", later),
            Takeover::Allowed
        );
    }

    #[test]
    fn tables_of_one_or_two_members_never_wait() {
        let mut g = TakeoverGate::new(None);
        let now = Instant::now();
        assert!(g.check(&members(2), alive(&["m1"]), now).allowed());
        assert!(g.check(&members(1), alive(&["m0"]), now).allowed());
        assert!(g.check(&[], alive(&[]), now).allowed());
    }

    #[test]
    fn the_minority_proceeds_after_the_wait_and_the_wait_restarts_with_a_majority() {
        let t = members(5);
        let start = Instant::now();
        let mut g = TakeoverGate::new(Some(Duration::from_secs(30)));
        let survivors = alive(&["m0", "m1"]);
        assert_eq!(
            g.check(&t, survivors, start),
            Takeover::Minority {
                since: start,
                until: Some(start + Duration::from_secs(30))
            }
        );
        let later = start + Duration::from_secs(29);
        assert!(!g.check(&t, alive(&["m0", "m1"]), later).allowed());
        let after = start + Duration::from_secs(30);
        assert_eq!(
            g.check(&t, alive(&["m0", "m1"]), after),
            Takeover::AllowedAfterWait
        );
        // Back to a majority, then a minority again: the wait starts over.
        assert!(g.check(&t, alive(&["m0", "m1", "m2"]), after).allowed());
        let again = after + Duration::from_secs(1);
        assert_eq!(
            g.check(&t, alive(&["m0"]), again),
            Takeover::Minority {
                since: again,
                until: Some(again + Duration::from_secs(30))
            }
        );
    }

    #[test]
    fn without_a_wait_the_minority_never_proceeds() {
        let t = members(3);
        let start = Instant::now();
        let mut g = TakeoverGate::new(None);
        let late = start + Duration::from_secs(86_400);
        g.check(&t, alive(&["m0"]), start);
        assert_eq!(
            g.check(&t, alive(&["m0"]), late),
            Takeover::Minority {
                since: start,
                until: None
            }
        );
    }
}
