//! Split-brain protection, without IO: how many data members this member expects the
//! cluster to have, and whether the members it sees make a majority of them.
//!
//! - The expected size is the largest number of data members seen at once, never below the
//!   configured minimum ([`crate::LockSettings::min_cluster_size`]).
//! - A member that fails (crash, kill, network partition: it stops answering) does **not**
//!   lower it: a side cut off from the rest cannot requalify itself by re-planning its table.
//! - A member that leaves gracefully lowers it by one, and so can an operator
//!   ([`crate::Locks::set_expected_members`]) after losing members for good.
//! - A grant or a renewal needs `expected / 2 + 1` live data members.

use crate::LockError;

/// The expected cluster size and the quorum it implies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quorum {
    expected: usize,
    minimum: usize,
}

impl Quorum {
    /// A tracker that expects at least `minimum` data members.
    pub fn new(minimum: usize) -> Self {
        Self {
            expected: minimum.max(1),
            minimum: minimum.max(1),
        }
    }

    /// The data members the cluster is expected to have.
    pub fn expected(&self) -> usize {
        self.expected
    }

    /// Live data members needed for a grant.
    pub fn needed(&self) -> usize {
        self.expected / 2 + 1
    }

    /// This member sees `live` data members (after a join, or at start).
    pub fn seen(&mut self, live: usize) {
        self.expected = self.expected.max(live);
    }

    /// A data member left gracefully; `live` data members remain in view.
    pub fn left(&mut self, live: usize) {
        self.expected = self.expected.saturating_sub(1).max(live).max(self.minimum);
    }

    /// A data member failed: nothing changes (see the module docs).
    pub fn failed(&mut self) {}

    /// The operator says the cluster now has `n` data members (lowering after members were
    /// lost for good, or raising ahead of a planned size). Never below the minimum.
    pub fn set_expected(&mut self, n: usize) {
        self.expected = n.max(self.minimum).max(1);
    }

    /// Whether `live` data members make a quorum.
    pub fn check(&self, live: usize) -> Result<(), LockError> {
        let needed = self.needed();
        if live >= needed {
            Ok(())
        } else {
            Err(LockError::NoQuorum { live, needed })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_do_not_lower_the_expected_size_but_leaves_do() {
        let mut q = Quorum::new(1);
        for n in 1..=5 {
            q.seen(n);
        }
        assert_eq!((q.expected(), q.needed()), (5, 3));
        // Two fail: 3 of 5 is still a majority.
        q.failed();
        q.failed();
        assert!(q.check(3).is_ok());
        // A third fails: 2 of 5 is not.
        q.failed();
        assert_eq!(q.check(2), Err(LockError::NoQuorum { live: 2, needed: 3 }));
        // Had two of them left gracefully instead, 2 of 3 would do.
        let mut q = Quorum::new(1);
        q.seen(5);
        q.left(4);
        q.left(3);
        assert_eq!(q.expected(), 3);
        assert!(q.check(2).is_ok());
        assert!(q.check(1).is_err());
    }

    #[test]
    fn the_operator_and_the_minimum_set_the_floor() {
        let mut q = Quorum::new(3);
        q.seen(1);
        assert_eq!(q.check(1), Err(LockError::NoQuorum { live: 1, needed: 2 }));
        q.seen(5);
        q.set_expected(2);
        assert_eq!(q.expected(), 3, "never below the configured minimum");
        let mut q = Quorum::new(1);
        q.seen(5);
        q.set_expected(1);
        assert!(q.check(1).is_ok());
        // A single member is its own quorum.
        assert!(Quorum::new(1).check(1).is_ok());
        // A graceful leave never drops below what is in view.
        let mut q = Quorum::new(1);
        q.seen(3);
        q.left(3);
        assert_eq!(q.expected(), 3);
    }
}
