//! The services' timers, as data: which timer of which partition fires when. Arming a
//! timer again replaces it; each arming gets a generation, so a firing that was already
//! under way for a replaced or cancelled timer is recognised as stale and ignored. The
//! runtime's driver sleeps until [`Timers::next_deadline`] and fires [`Timers::due`].

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use tokio::time::Instant;

/// (service, partition, the service's timer id).
pub(crate) type TimerKey = (Arc<str>, u32, u64);

/// Every armed timer of a member.
#[derive(Debug, Default)]
pub(crate) struct Timers {
    by_key: HashMap<TimerKey, (Instant, u64)>,
    by_time: BTreeMap<(Instant, u64), TimerKey>,
    /// The generation of each key's last arming or cancellation: a firing of an older
    /// generation is stale.
    touched: HashMap<TimerKey, u64>,
    generation: u64,
}

impl Timers {
    /// Arms `key` at `at`, replacing its earlier arming. Returns the arming's generation.
    pub(crate) fn arm(&mut self, key: TimerKey, at: Instant) -> u64 {
        self.unschedule(&key);
        self.generation += 1;
        let generation = self.generation;
        self.by_time.insert((at, generation), key.clone());
        self.by_key.insert(key.clone(), (at, generation));
        self.touched.insert(key, generation);
        generation
    }

    /// Forgets `key`.
    pub(crate) fn cancel(&mut self, key: &TimerKey) {
        self.unschedule(key);
        self.generation += 1;
        if let Some(g) = self.touched.get_mut(key) {
            *g = self.generation;
        }
    }

    fn unschedule(&mut self, key: &TimerKey) {
        if let Some(slot) = self.by_key.remove(key) {
            self.by_time.remove(&slot);
        }
    }

    /// Whether a firing of `key`'s arming `generation` is still wanted: neither re-armed
    /// nor cancelled since, nor its partition moved.
    pub(crate) fn is_current(&self, key: &TimerKey, generation: u64) -> bool {
        self.touched.get(key) == Some(&generation)
    }

    /// Forgets every timer of `service`'s `partition` (its ownership moved).
    pub(crate) fn cancel_partition(&mut self, service: &str, partition: u32) {
        let keys: Vec<TimerKey> = self
            .by_key
            .keys()
            .filter(|(s, p, _)| **s == *service && *p == partition)
            .cloned()
            .collect();
        for key in keys {
            self.unschedule(&key);
        }
        self.touched
            .retain(|(s, p, _), _| !(**s == *service && *p == partition));
    }

    /// When the next timer fires.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.by_time.keys().next().map(|(at, _)| *at)
    }

    /// Takes the timers due at `now`, in order of their deadlines, each with its
    /// generation.
    pub(crate) fn due(&mut self, now: Instant) -> Vec<(TimerKey, u64)> {
        let mut out = Vec::new();
        while let Some(entry) = self.by_time.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let ((_, generation), key) = entry.remove_entry();
            self.by_key.remove(&key);
            out.push((key, generation));
        }
        out
    }

    /// Armed timers.
    pub(crate) fn len(&self) -> usize {
        self.by_key.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn key(p: u32, id: u64) -> TimerKey {
        (Arc::from("svc"), p, id)
    }

    #[test]
    fn timers_fire_in_deadline_order_once() {
        let t0 = Instant::now();
        let mut timers = Timers::default();
        timers.arm(key(1, 1), t0 + Duration::from_secs(2));
        timers.arm(key(2, 1), t0 + Duration::from_secs(1));
        assert_eq!(timers.next_deadline(), Some(t0 + Duration::from_secs(1)));
        assert!(timers.due(t0).is_empty());
        let due: Vec<_> = timers
            .due(t0 + Duration::from_secs(5))
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(due, vec![key(2, 1), key(1, 1)]);
        assert!(timers.due(t0 + Duration::from_secs(9)).is_empty());
        assert_eq!(timers.len(), 0);
    }

    #[test]
    fn arming_again_replaces_and_cancel_forgets() {
        let t0 = Instant::now();
        let mut timers = Timers::default();
        let first = timers.arm(key(1, 7), t0 + Duration::from_secs(1));
        let second = timers.arm(key(1, 7), t0 + Duration::from_secs(3));
        assert!(second > first);
        assert!(timers.due(t0 + Duration::from_secs(2)).is_empty());
        assert_eq!(
            timers.due(t0 + Duration::from_secs(3)),
            vec![(key(1, 7), second)]
        );
        assert!(timers.is_current(&key(1, 7), second));
        assert!(!timers.is_current(&key(1, 7), first));
        let third = timers.arm(key(1, 8), t0);
        let due = timers.due(t0);
        assert_eq!(due, vec![(key(1, 8), third)]);
        // Cancelled after it came due but before it fired: the firing is stale.
        timers.cancel(&key(1, 8));
        assert!(!timers.is_current(&key(1, 8), third));
        assert!(timers.due(t0 + Duration::from_secs(9)).is_empty());
    }

    #[test]
    fn a_partition_that_moves_loses_its_timers_only() {
        let t0 = Instant::now();
        let mut timers = Timers::default();
        timers.arm(key(1, 1), t0);
        timers.arm(key(1, 2), t0);
        timers.arm(key(2, 1), t0);
        timers.arm((Arc::from("other"), 1, 1), t0);
        let moved = timers.arm(key(1, 3), t0);
        timers.cancel_partition("svc", 1);
        assert!(!timers.is_current(&key(1, 3), moved));
        let mut due: Vec<_> = timers.due(t0).into_iter().map(|(k, _)| k).collect();
        due.sort();
        assert_eq!(due, vec![(Arc::from("other"), 1, 1), key(2, 1)]);
    }
}
