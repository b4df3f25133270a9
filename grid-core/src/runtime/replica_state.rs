//! One replica's state and the decisions a replica makes about what other members send it,
//! without IO: whether a backup change is applied, a duplicate, a gap that needs a full
//! sync, or comes from an owner that the table has since replaced; whether a full copy may
//! replace the replica's state. The async side (`replica.rs`) takes the locks, moves the
//! bytes and acts on the verdicts; the rules are here, unit-tested.
//!
//! Why the sender's table version travels with every change and copy: a member paused
//! past failure detection (SIGSTOP, a long GC-like stall, a frozen VM) comes back still
//! believing it owns its partitions. Its backups have meanwhile been promoted, so its
//! changes and copies must be refused, not merely ordered: before these checks it pushed
//! full copies of its old partitions to the new owners, which installed them over newer,
//! acknowledged data.

use std::collections::VecDeque;
use tokio::time::Instant;

/// How many recent changes a replica remembers (version and digest), to check that a
/// duplicate it is sent is the change it already applied.
const RECENT_CHANGES: usize = 64;

/// A change's digest, to compare a duplicate with what was applied under its version.
pub(crate) fn digest(change: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(change)
}

/// What the receiving member's table says about a partition.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TableView<'a> {
    /// The receiver's table version.
    pub(crate) version: u64,
    /// The partition's owner in it.
    pub(crate) owner: Option<&'a str>,
    /// The partition's epoch in it (the version in which its owner got it).
    pub(crate) epoch: u64,
}

/// Who sent a change or a copy, and what it believed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sender<'a> {
    pub(crate) member: &'a str,
    /// The version of the table the sender acted on.
    pub(crate) table_version: u64,
    /// The partition's epoch in the sender's table.
    pub(crate) epoch: u64,
}

impl TableView<'_> {
    /// Whether the receiver knows that `sender` no longer owns the partition: its table
    /// is newer than the sender's and names another owner, or the sender's epoch is older
    /// than the receiver's (ownership changed hands since the sender got it). A sender with
    /// a newer table than the receiver's is believed: the receiver learns that table later.
    /// Returns the receiver's table version, for the sender to catch up with.
    pub(crate) fn superseded(&self, sender: &Sender<'_>) -> Option<u64> {
        let replaced = sender.table_version < self.version && self.owner != Some(sender.member);
        let older_epoch = sender.epoch < self.epoch;
        (replaced || older_epoch).then_some(self.version)
    }
}

/// What a backup does with one change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChangeVerdict {
    /// The next change: apply it.
    Apply,
    /// A change already applied, byte for byte: acknowledge it again.
    Duplicate,
    /// A gap, or another epoch: the owner must send the whole partition.
    NeedSync,
    /// A duplicate that differs from (or can no longer be checked against) what was applied
    /// under its version: the backup may hold a change its owner does not. It must be
    /// marked ([`ReplicaState::mark_diverged`]) and get the whole partition.
    Diverged,
    /// The sender is no longer the owner in the receiver's table of this version: refused.
    Superseded { table_version: u64 },
}

/// What a replica does with a full copy of its partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CopyVerdict {
    Install,
    /// The copy is older than the replica's state: installing it would undo changes.
    Older,
    /// See [`ChangeVerdict::Superseded`].
    Superseded {
        table_version: u64,
    },
}

/// One replica (one service's partition) on one member.
#[derive(Debug, Default)]
pub(crate) struct ReplicaState {
    /// The epoch of the owner the replica follows.
    pub(crate) epoch: u64,
    /// The version of the last change applied.
    pub(crate) version: u64,
    /// (version, digest) of the last changes applied, oldest first, at most
    /// `RECENT_CHANGES`.
    recent: VecDeque<(u64, u64)>,
    /// The replica holds a change its owner does not (a duplicate that differed): the next
    /// copy from an owner of this epoch replaces it even if its version is lower.
    diverged: bool,
    /// While a migration streams a snapshot, the changes made since, so that it can catch
    /// up without holding up writes; `None` when no migration is under way (no cost).
    pub(crate) log: Option<VecDeque<(u64, Vec<u8>)>>,
    log_bytes: usize,
    /// The log overflowed its bounds: the migration copies again, under the lock.
    log_overflowed: bool,
    /// Set when a migration filled this replica before the table that makes this member a
    /// replica arrived: such data must survive the tables published in between.
    pub(crate) incoming_since: Option<Instant>,
    /// The service was told this member owns the partition (`on_owned`) and not yet that
    /// it stopped (`on_disowned`): its timers, owner task and parked calls live here.
    pub(crate) hooked: bool,
}

/// Bounds of an owner's change log (entries, bytes).
const LOG_ENTRIES: usize = 16_384;
const LOG_BYTES: usize = 16 * 1024 * 1024;

impl ReplicaState {
    /// A backup's verdict on change `version` of `sender`'s epoch, whose digest is
    /// `change_digest`.
    pub(crate) fn judge_change(
        &self,
        view: &TableView<'_>,
        sender: &Sender<'_>,
        version: u64,
        change_digest: u64,
    ) -> ChangeVerdict {
        if let Some(table_version) = view.superseded(sender) {
            return ChangeVerdict::Superseded { table_version };
        }
        if sender.epoch != self.epoch || version > self.version.saturating_add(1) {
            return ChangeVerdict::NeedSync;
        }
        if version == self.version.saturating_add(1) {
            return ChangeVerdict::Apply;
        }
        // An older version: acknowledged again only if it is what was applied.
        match self.recent.iter().find(|(v, _)| *v == version) {
            Some((_, d)) if *d == change_digest => ChangeVerdict::Duplicate,
            _ => ChangeVerdict::Diverged,
        }
    }

    /// Records that a backup refused a duplicate it could not match: its state may hold a
    /// change its owner does not, so the owner's next copy replaces it.
    pub(crate) fn mark_diverged(&mut self) {
        self.diverged = true;
    }

    /// Records change `version` (epoch `epoch`) as applied.
    pub(crate) fn applied(&mut self, epoch: u64, version: u64, change_digest: u64) {
        self.epoch = epoch;
        self.version = version;
        if self.recent.len() == RECENT_CHANGES {
            self.recent.pop_front();
        }
        self.recent.push_back((version, change_digest));
    }

    /// A replica's verdict on a full copy taken by `sender` at (`sender.epoch`, `version`).
    pub(crate) fn judge_copy(
        &self,
        view: &TableView<'_>,
        sender: &Sender<'_>,
        version: u64,
    ) -> CopyVerdict {
        if let Some(table_version) = view.superseded(sender) {
            return CopyVerdict::Superseded { table_version };
        }
        let older = (sender.epoch, version) < (self.epoch, self.version);
        let replaceable = self.diverged && sender.epoch == self.epoch;
        // Epochs only grow along one line of tables. A receiver whose table is newer than
        // its replica's epoch, yet gives the partition an older epoch, holds a replica
        // from another line: tables a cut-off coordinator published during a split, which
        // the cluster's tables superseded at the heal. The cluster's copy replaces it
        // (else every copy is refused for ever and the cluster never settles: sched
        // workload, seed 18).
        let forked =
            view.epoch < self.epoch && view.version > self.epoch && sender.epoch >= view.epoch;
        if older && !replaceable && !forked {
            return CopyVerdict::Older;
        }
        CopyVerdict::Install
    }

    /// Records that a copy at (`epoch`, `version`) replaced the replica's state.
    pub(crate) fn installed(&mut self, epoch: u64, version: u64) {
        self.epoch = epoch;
        self.version = version;
        self.recent.clear();
        self.diverged = false;
    }

    /// Starts recording changes (a migration took its snapshot at the current version).
    pub(crate) fn start_log(&mut self) {
        self.log = Some(VecDeque::new());
        self.log_bytes = 0;
        self.log_overflowed = false;
    }

    pub(crate) fn log_change(&mut self, version: u64, change: &[u8]) {
        let Some(log) = self.log.as_mut() else { return };
        log.push_back((version, change.to_vec()));
        self.log_bytes += change.len();
        if log.len() > LOG_ENTRIES || self.log_bytes > LOG_BYTES {
            self.log = None;
            self.log_bytes = 0;
            self.log_overflowed = true;
        }
    }

    /// Stops recording and returns the changes after `since`, if all were recorded.
    pub(crate) fn take_log_since(&mut self, since: u64) -> Option<Vec<(u64, Vec<u8>)>> {
        let log = self.log.take();
        self.log_bytes = 0;
        if std::mem::take(&mut self.log_overflowed) {
            return None;
        }
        let changes: Vec<_> = log?.into_iter().filter(|(v, _)| *v > since).collect();
        let complete = changes
            .first()
            .map_or(self.version == since, |(v, _)| *v == since + 1)
            && changes.last().is_none_or(|(v, _)| *v == self.version);
        complete.then_some(changes)
    }

    /// Forgets everything: the member no longer holds the partition.
    pub(crate) fn reset(&mut self) {
        // Whether the service was told about ownership is not the replica's data: only
        // the ownership hooks change it.
        let hooked = self.hooked;
        *self = Self::default();
        self.hooked = hooked;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD_TABLE: u64 = 10;
    const NEW_TABLE: u64 = 12;

    /// A backup of "a"'s partition (epoch 5), at version 7, whose table is `OLD_TABLE`.
    fn backup_of_a() -> (ReplicaState, TableView<'static>) {
        let mut st = ReplicaState::default();
        for v in 1..=7 {
            st.applied(5, v, digest(&[v as u8]));
        }
        let view = TableView {
            version: OLD_TABLE,
            owner: Some("a"),
            epoch: 5,
        };
        (st, view)
    }

    fn from_a(table_version: u64) -> Sender<'static> {
        Sender {
            member: "a",
            table_version,
            epoch: 5,
        }
    }

    #[test]
    fn the_next_change_is_applied() {
        let (st, view) = backup_of_a();
        let verdict = st.judge_change(&view, &from_a(OLD_TABLE), 8, digest(&[8]));
        assert_eq!(verdict, ChangeVerdict::Apply);
    }

    #[test]
    fn a_gap_asks_for_a_sync() {
        let (st, view) = backup_of_a();
        let verdict = st.judge_change(&view, &from_a(OLD_TABLE), 9, digest(&[9]));
        assert_eq!(verdict, ChangeVerdict::NeedSync);
    }

    #[test]
    fn a_new_epoch_asks_for_a_sync() {
        let (st, mut view) = backup_of_a();
        view.epoch = 11;
        view.version = 11;
        let sender = Sender {
            member: "a",
            table_version: 11,
            epoch: 11,
        };
        assert_eq!(
            st.judge_change(&view, &sender, 8, digest(&[8])),
            ChangeVerdict::NeedSync
        );
    }

    #[test]
    fn a_duplicate_is_acknowledged_only_if_it_is_the_change_applied() {
        let (mut st, view) = backup_of_a();
        let a = from_a(OLD_TABLE);
        assert_eq!(
            st.judge_change(&view, &a, 6, digest(&[6])),
            ChangeVerdict::Duplicate
        );
        // Same version, other content: the backup does not have that change.
        assert_eq!(
            st.judge_change(&view, &a, 6, digest(b"something else")),
            ChangeVerdict::Diverged
        );
        // Too old to check: it cannot be acknowledged either.
        for v in 8..=200 {
            st.applied(5, v, digest(&[v as u8]));
        }
        assert_eq!(
            st.judge_change(&view, &a, 3, digest(&[3])),
            ChangeVerdict::Diverged
        );
    }

    #[test]
    fn a_diverged_backup_takes_its_owners_older_copy() {
        let (mut st, view) = backup_of_a();
        let a = from_a(OLD_TABLE);
        // The owner is at 6 (its change 7 was never applied there) and re-sends 7 with
        // other content: the backup refuses, then must accept the owner's copy at 6.
        assert_eq!(
            st.judge_change(&view, &a, 7, digest(b"other")),
            ChangeVerdict::Diverged
        );
        assert_eq!(st.judge_copy(&view, &a, 6), CopyVerdict::Older);
        st.mark_diverged();
        assert_eq!(st.judge_copy(&view, &a, 6), CopyVerdict::Install);
        st.installed(5, 6);
        assert_eq!(
            st.judge_change(&view, &a, 7, digest(b"other")),
            ChangeVerdict::Apply
        );
        assert_eq!(st.judge_copy(&view, &a, 5), CopyVerdict::Older);
    }

    #[test]
    fn a_copy_older_than_the_replica_is_refused() {
        let (st, view) = backup_of_a();
        let a = from_a(OLD_TABLE);
        assert_eq!(st.judge_copy(&view, &a, 6), CopyVerdict::Older);
        assert_eq!(st.judge_copy(&view, &a, 7), CopyVerdict::Install);
        assert_eq!(st.judge_copy(&view, &a, 9), CopyVerdict::Install);
        let older_epoch = Sender {
            member: "a",
            table_version: OLD_TABLE,
            epoch: 4,
        };
        // Refused either way: an older epoch than the receiver's table is superseded.
        assert_ne!(
            st.judge_copy(&view, &older_epoch, 100),
            CopyVerdict::Install
        );
    }

    /// A split: the replica took epoch 12 from a table of the cut-off side's coordinator;
    /// the cluster's tables (from 4,096 on) kept the partition at epoch 5 with "a". The
    /// cluster's copy replaces the forked replica; the same copy before the receiver
    /// learned the cluster's table is still refused.
    #[test]
    fn a_replica_from_a_forked_line_of_tables_takes_the_clusters_copy() {
        let (mut st, _) = backup_of_a();
        st.installed(12, 3);
        let cluster = TableView {
            version: 4_100,
            owner: Some("a"),
            epoch: 5,
        };
        assert_eq!(
            st.judge_copy(&cluster, &from_a(4_100), 7),
            CopyVerdict::Install
        );
        let before = TableView {
            version: NEW_TABLE,
            owner: Some("a"),
            epoch: 12,
        };
        assert_ne!(
            st.judge_copy(&before, &from_a(4_100), 7),
            CopyVerdict::Install
        );
    }

    /// The paused owner: "a" owned the partition in table 10 and was paused; "b", its
    /// backup, was promoted in table 12 (epoch 12) and took writes. "a" comes back with
    /// table 10 and sends what it had in flight, then a copy.
    #[test]
    fn a_paused_owner_that_comes_back_is_refused() {
        let (mut st, _) = backup_of_a();
        // b applied its own writes as owner of epoch 12.
        st.applied(12, 8, digest(b"b's write"));
        let promoted = TableView {
            version: NEW_TABLE,
            owner: Some("b"),
            epoch: NEW_TABLE,
        };
        let a = from_a(OLD_TABLE);
        let refused = ChangeVerdict::Superseded {
            table_version: NEW_TABLE,
        };
        assert_eq!(st.judge_change(&promoted, &a, 8, digest(&[8])), refused);
        assert_eq!(
            st.judge_copy(&promoted, &a, 1_000),
            CopyVerdict::Superseded {
                table_version: NEW_TABLE
            }
        );
        // Even before b itself wrote anything (its replica still says epoch 5).
        let (st, _) = backup_of_a();
        assert_eq!(st.judge_change(&promoted, &a, 8, digest(&[8])), refused);
        assert_ne!(st.judge_copy(&promoted, &a, 7), CopyVerdict::Install);
    }

    #[test]
    fn a_sender_with_a_newer_table_is_believed() {
        let (st, view) = backup_of_a();
        // "c" got the partition in table 11, which this backup has not seen yet.
        let c = Sender {
            member: "c",
            table_version: 11,
            epoch: 11,
        };
        assert_eq!(st.judge_copy(&view, &c, 7), CopyVerdict::Install);
        assert_eq!(
            st.judge_change(&view, &c, 1, digest(&[1])),
            ChangeVerdict::NeedSync
        );
    }

    #[test]
    fn a_migration_source_named_owner_in_an_older_table_is_believed() {
        // The destination's table is newer (other partitions moved) but still names "a"
        // as the owner: a's copy and changes are accepted.
        let st = ReplicaState::default();
        let view = TableView {
            version: NEW_TABLE,
            owner: Some("a"),
            epoch: 5,
        };
        let a = from_a(OLD_TABLE);
        assert_eq!(st.judge_copy(&view, &a, 7), CopyVerdict::Install);
    }

    #[test]
    fn the_change_log_returns_a_complete_tail_or_nothing() {
        let mut st = ReplicaState {
            version: 3,
            ..ReplicaState::default()
        };
        st.start_log();
        for v in 4..=6 {
            st.log_change(v, &[v as u8]);
            st.version = v;
        }
        let tail = st.take_log_since(3).expect("complete");
        assert_eq!(tail.iter().map(|(v, _)| *v).collect::<Vec<_>>(), [4, 5, 6]);
        assert!(st.log.is_none());
        // A log started after the snapshot's version misses changes.
        st.start_log();
        st.log_change(7, &[7]);
        st.version = 7;
        assert!(st.take_log_since(5).is_none());
        // An overflowing log is dropped.
        st.start_log();
        for v in 8..(8 + LOG_ENTRIES as u64 + 1) {
            st.log_change(v, &[0]);
        }
        assert!(st.log.is_none());
        assert!(st.take_log_since(7).is_none());
    }
}
