//! The decisions a member makes about its replicas that `replica_state` does not (that one
//! judges what others send): what a newly applied table means for each partition, what a
//! write's acknowledgements mean with synchronous and asynchronous backups, when a frozen
//! partition thaws, when data a migration brought in may be dropped, and which migration
//! targets still get changes. Plain functions of their inputs and `now`, so the async
//! driver (`mod.rs`, `replica.rs`) only carries them out, and each input has a unit test.

use std::time::Duration;

use tokio::time::Instant;

use crate::partition::table::PartitionTable;

/// What a partition needs when a table replaces another (see [`on_table`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TableEffect {
    /// A freeze for a handoff ends: the partition went to another owner.
    Unfreeze,
    /// This member became, or stopped being, the owner: the services' ownership hooks.
    OwnershipChanged,
    /// Forget everything held of the partition: the table was adopted by force (a member
    /// that started alone met the cluster), and what it held counts in another history.
    Discard,
    /// This member no longer holds a replica: drop it (unless a migration just brought it
    /// in for a table still to come: see [`may_drop`]).
    Drop,
    /// This member became a replica: data a migration brought in before this table is now
    /// ordinary replica data.
    ConfirmIncoming,
}

/// What partition `p` needs on `me` when `new` replaces `old` (`force`: adopted although not
/// newer; `frozen`: a freeze is in force on `p`).
pub(crate) fn on_table(
    old: &PartitionTable,
    new: &PartitionTable,
    p: u32,
    me: &str,
    force: bool,
    frozen: bool,
) -> Vec<TableEffect> {
    let mut effects = Vec::new();
    let owns = |t: &PartitionTable| t.owner(p).is_some_and(|o| **o == *me);
    if frozen && !owns(new) {
        effects.push(TableEffect::Unfreeze);
    }
    if owns(old) != owns(new) {
        effects.push(TableEffect::OwnershipChanged);
    }
    let was_replica = old.rank_of(p, me).is_some();
    let is_replica = new.rank_of(p, me).is_some();
    if force && was_replica {
        effects.push(TableEffect::Discard);
    } else if was_replica && !is_replica {
        effects.push(TableEffect::Drop);
    } else if !was_replica && is_replica {
        effects.push(TableEffect::ConfirmIncoming);
    }
    effects
}

/// How long data copied in by a migration waits for the table that uses it before it is
/// treated as abandoned.
pub(crate) const INCOMING_GRACE: Duration = Duration::from_secs(60);

/// Whether a replica that the table no longer gives this member may be dropped now:
/// `was_replica` (the table took it away) or data a migration brought in that waited past
/// [`INCOMING_GRACE`] for its table; never data still within its grace, and never while the
/// current table names this member (`is_replica`).
pub(crate) fn may_drop(
    was_replica: bool,
    is_replica: bool,
    incoming_since: Option<Instant>,
    now: Instant,
) -> bool {
    let within_grace =
        incoming_since.is_some_and(|t| now.saturating_duration_since(t) < INCOMING_GRACE);
    let abandoned = incoming_since.is_some() && !within_grace;
    (was_replica || abandoned) && !within_grace && !is_replica
}

/// How long a migration target that no table made a replica keeps getting changes.
pub(crate) const EXTRA_TARGET_GRACE: Duration = Duration::from_secs(60);

/// Whether a member filled by a migration (`since`) still gets the partition's changes
/// under `table`: until the table lists it as a replica (it then gets them as one), or
/// the grace passes (the migration was abandoned).
pub(crate) fn keep_extra_target(
    table: &PartitionTable,
    p: u32,
    member: &str,
    since: Instant,
    now: Instant,
) -> bool {
    table.rank_of(p, member).is_none() && now.saturating_duration_since(since) < EXTRA_TARGET_GRACE
}

/// Whether partition `p` is frozen for a handoff: a freeze holds until a table takes the
/// ownership away from this member (not merely until any newer table: the coordinator may
/// publish other partitions' moves meanwhile) or its deadline passes (the coordinator died
/// mid-handoff).
pub(crate) fn is_frozen(freeze_until: Option<Instant>, owner_is_me: bool, now: Instant) -> bool {
    freeze_until.is_some_and(|until| owner_is_me && now < until)
}

/// How one backup took one change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Replicated {
    /// It has the change.
    Acked,
    /// It is not a live member in this owner's view: nothing was sent.
    Departed,
    /// It did not confirm the change: it is repaired later.
    Missed,
    /// Its table of this version names another owner.
    Superseded(u64),
}

/// What the owner does with a change once the members it waited for answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum WriteOutcome {
    /// Apply it and answer.
    Acknowledged,
    /// Apply it (some backups may have it: the owner must not fall behind them), and tell
    /// the caller that the backup at this index of `answers` did not confirm it.
    Unreplicated { missed: usize },
    /// Neither apply nor acknowledge it: a member's table of this version names another
    /// owner (this member was paused or cut off past failure detection); the index is the
    /// member that said so.
    Superseded { by: usize, table_version: u64 },
    /// Neither apply nor acknowledge it: the synchronous backup at this index is not a live
    /// member. Until the coordinator's next table replaces it, the owner cannot tell a dead
    /// backup from its own isolation (cut off, or paused and resumed, it sees every other
    /// member fail at once): acknowledging alone would lose the change if the others have
    /// promoted that backup meanwhile. The caller retries.
    BackupGone { missing: usize },
}

/// Judges the answers of the members a change was sent to and waited for: the synchronous
/// backups first (`sync_backups` of them), then migration targets (which are waited for, so
/// that they follow, but whose misses do not weaken the acknowledgement: they are not
/// replicas yet). Asynchronous backups are never waited for and never appear here.
pub(crate) fn write_outcome(answers: &[Replicated], sync_backups: usize) -> WriteOutcome {
    if let Some((by, table_version)) = answers.iter().enumerate().find_map(|(i, r)| match r {
        Replicated::Superseded(v) => Some((i, *v)),
        _ => None,
    }) {
        return WriteOutcome::Superseded { by, table_version };
    }
    if let Some(missing) = answers
        .iter()
        .take(sync_backups)
        .position(|r| *r == Replicated::Departed)
    {
        return WriteOutcome::BackupGone { missing };
    }
    // A migration target that departed is not a replica yet: nothing to wait for.
    match answers
        .iter()
        .take(sync_backups)
        .position(|r| *r != Replicated::Acked)
    {
        Some(missed) => WriteOutcome::Unreplicated { missed },
        None => WriteOutcome::Acknowledged,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// A one-partition table at `version` with these replicas (owner first).
    fn table(version: u64, replicas: &[&str]) -> PartitionTable {
        PartitionTable::from_assignments(
            version,
            1,
            vec![replicas.iter().map(|m| Arc::from(*m)).collect()],
            vec![version],
        )
    }

    #[test]
    fn a_table_that_makes_this_member_owner_runs_the_ownership_hooks() {
        // A promotion: backup b becomes the owner.
        let fx = on_table(
            &table(1, &["a", "b"]),
            &table(2, &["b"]),
            0,
            "b",
            false,
            false,
        );
        assert_eq!(fx, vec![TableEffect::OwnershipChanged]);
        // The old owner, removed from the partition: hooks, then drop.
        let fx = on_table(
            &table(1, &["a", "b"]),
            &table(2, &["b"]),
            0,
            "a",
            false,
            false,
        );
        assert_eq!(fx, vec![TableEffect::OwnershipChanged, TableEffect::Drop]);
        // A backup that stays a backup: nothing.
        let fx = on_table(
            &table(1, &["a", "b"]),
            &table(2, &["a", "b"]),
            0,
            "b",
            false,
            false,
        );
        assert!(fx.is_empty());
    }

    #[test]
    fn a_frozen_partition_thaws_only_when_the_table_gives_it_away() {
        let old = table(1, &["a", "b"]);
        // Another partition moved: this one is still a's, and stays frozen.
        assert!(on_table(&old, &table(2, &["a", "b"]), 0, "a", false, true).is_empty());
        // The handoff: a becomes a backup.
        let fx = on_table(&old, &table(3, &["b", "a"]), 0, "a", false, true);
        assert_eq!(
            fx,
            vec![TableEffect::Unfreeze, TableEffect::OwnershipChanged]
        );
    }

    #[test]
    fn a_new_replica_confirms_what_a_migration_brought_in() {
        let fx = on_table(
            &table(1, &["a"]),
            &table(2, &["a", "c"]),
            0,
            "c",
            false,
            false,
        );
        assert_eq!(fx, vec![TableEffect::ConfirmIncoming]);
    }

    #[test]
    fn a_table_adopted_by_force_discards_what_this_member_held() {
        // A member that started alone (its own table, version 9) meets the cluster's
        // coordinator, whose table is older by number.
        let fx = on_table(
            &table(9, &["x"]),
            &table(4, &["a", "x"]),
            0,
            "x",
            true,
            false,
        );
        assert_eq!(
            fx,
            vec![TableEffect::OwnershipChanged, TableEffect::Discard]
        );
        // It held nothing of the partition: nothing to discard.
        let fx = on_table(
            &table(9, &["y"]),
            &table(4, &["a", "x"]),
            0,
            "x",
            true,
            false,
        );
        assert_eq!(fx, vec![TableEffect::ConfirmIncoming]);
    }

    #[test]
    fn migrated_data_waits_for_its_table_within_the_grace_only() {
        let now = Instant::now() + Duration::from_secs(3600);
        let fresh = Some(now - Duration::from_secs(1));
        let stale = Some(now - INCOMING_GRACE - Duration::from_secs(1));
        // A replica the table took away is dropped...
        assert!(may_drop(true, false, None, now));
        // ...but not data a migration just brought in for a table still to come.
        assert!(!may_drop(true, false, fresh, now));
        assert!(!may_drop(false, false, fresh, now));
        // Data whose table never came is dropped after the grace.
        assert!(may_drop(false, false, stale, now));
        // Never while the current table names this member.
        assert!(!may_drop(true, true, None, now));
        assert!(!may_drop(false, true, stale, now));
        // Nothing to drop for a member that was no replica and got nothing.
        assert!(!may_drop(false, false, None, now));
    }

    #[test]
    fn a_migration_target_gets_changes_until_it_is_a_replica_or_the_grace_passes() {
        let now = Instant::now() + Duration::from_secs(3600);
        let t = table(2, &["a", "b"]);
        assert!(keep_extra_target(
            &t,
            0,
            "c",
            now - Duration::from_secs(5),
            now
        ));
        assert!(!keep_extra_target(
            &t,
            0,
            "b",
            now - Duration::from_secs(5),
            now
        ));
        assert!(!keep_extra_target(
            &t,
            0,
            "c",
            now - EXTRA_TARGET_GRACE,
            now
        ));
    }

    #[test]
    fn a_freeze_holds_while_this_member_owns_the_partition_until_its_deadline() {
        let now = Instant::now();
        let until = Some(now + Duration::from_secs(5));
        assert!(is_frozen(until, true, now));
        assert!(!is_frozen(until, false, now));
        assert!(!is_frozen(until, true, now + Duration::from_secs(5)));
        assert!(!is_frozen(None, true, now));
    }

    #[test]
    fn acknowledgements_with_synchronous_and_asynchronous_backups_and_migration_targets() {
        use Replicated::*;
        // Every synchronous backup and the migration target have it.
        assert_eq!(
            write_outcome(&[Acked, Acked], 1),
            WriteOutcome::Acknowledged
        );
        // No backup to wait for (asynchronous ones are not waited for): acknowledged.
        assert_eq!(write_outcome(&[], 0), WriteOutcome::Acknowledged);
        // A synchronous backup missed it: applied, but the caller hears it.
        assert_eq!(
            write_outcome(&[Acked, Missed], 2),
            WriteOutcome::Unreplicated { missed: 1 }
        );
        // A migration target missed it: still acknowledged (it is repaired before the
        // table makes it a replica).
        assert_eq!(
            write_outcome(&[Acked, Missed], 1),
            WriteOutcome::Acknowledged
        );
    }

    #[test]
    fn an_owner_that_sees_its_synchronous_backup_gone_does_not_acknowledge_alone() {
        use Replicated::*;
        // Cut off or resumed after a pause, an owner sees every other member fail at once:
        // counting the departed backup as an acknowledgement let it acknowledge writes the
        // rest of the cluster (which promoted that backup) never saw (simulator, seed 3).
        assert_eq!(
            write_outcome(&[Departed], 1),
            WriteOutcome::BackupGone { missing: 0 }
        );
        assert_eq!(
            write_outcome(&[Acked, Departed], 2),
            WriteOutcome::BackupGone { missing: 1 }
        );
        // A departed migration target (after the synchronous backups) is not a replica.
        assert_eq!(
            write_outcome(&[Acked, Departed], 1),
            WriteOutcome::Acknowledged
        );
        // A newer table somewhere still wins: this member must fetch it.
        assert!(matches!(
            write_outcome(&[Departed, Superseded(9)], 1),
            WriteOutcome::Superseded { by: 1, .. }
        ));
    }

    #[test]
    fn a_paused_owner_that_comes_back_is_refused_by_the_promoted_backup() {
        use Replicated::*;
        // The former backup, promoted while this owner was paused, answers with its newer
        // table: the change is neither applied nor acknowledged, whatever the others said.
        assert_eq!(
            write_outcome(&[Acked, Superseded(12)], 1),
            WriteOutcome::Superseded {
                by: 1,
                table_version: 12
            }
        );
        assert_eq!(
            write_outcome(&[Superseded(12), Missed], 2),
            WriteOutcome::Superseded {
                by: 0,
                table_version: 12
            }
        );
    }
}
