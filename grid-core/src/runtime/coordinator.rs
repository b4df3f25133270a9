//! The coordinator's decisions, without IO: which table to publish and which partitions to
//! copy where, given membership changes and migration results.
//!
//! The coordinator is the oldest live data member. It keeps two tables: the *published*
//! one, which every member routes by and in which every replica really holds its data, and
//! the *target* one ([`PartitionTable::plan`]) it is heading for. The difference is a set
//! of moves, (partition, destination) pairs, each a copy of the partition from its owner.
//! A partition switches to its target replicas once all its moves are done — and, when its
//! owner changes hands, once the old owner has frozen it, so that no write can land on the
//! old owner after the new one takes over.
//!
//! Failures take a shortcut: a dead member's replicas are dropped from the published table
//! at once (the first surviving backup becomes owner, which needs no copy), and the copies
//! that restore the backup count are ordinary moves.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;

use crate::partition::table::{data_moves, Candidate, PartitionTable, TableConfig};

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Effect {
    /// Send this table to every member.
    Publish(PartitionTable),
    /// Ask `source` (the partition's owner) to copy `partition` to `destination`.
    Migrate {
        partition: u32,
        source: Arc<str>,
        destination: Arc<str>,
    },
    /// Ask `owner` to stop taking operations on `partition` before it changes hands to
    /// `new_owner`.
    Freeze {
        partition: u32,
        owner: Arc<str>,
        new_owner: Arc<str>,
    },
}

/// Counters, for observability and the rebalancing harness.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MigrationStats {
    /// Migrations started.
    pub started: u64,
    /// Migrations completed.
    pub completed: u64,
    /// Migrations that failed (and were retried).
    pub failed: u64,
    /// Migrations waiting or under way.
    pub in_flight: u64,
}

/// The coordinator state machine.
#[derive(Debug)]
pub(crate) struct Coordinator {
    config: TableConfig,
    published: PartitionTable,
    target: PartitionTable,
    pending: BTreeSet<(u32, Arc<str>)>,
    in_flight: BTreeSet<(u32, Arc<str>)>,
    /// Partitions whose moves are all done and whose old owner must freeze first.
    freezing: BTreeSet<u32>,
    /// Partitions ready to switch to their target replicas at the next publication.
    ready: BTreeMap<u32, bool>,
    max_parallel: usize,
    stats: MigrationStats,
    /// The least version this coordinator publishes (see [`first_version_of_term`]).
    first_version: u64,
}

/// How far ahead of the newest table a new coordinator starts (a power of two).
const TERM_STRIDE: u64 = 1 << 12;

/// The first version a new coordinator publishes after `newest`: the next multiple of
/// [`TERM_STRIDE`] (4,096) above it, a new "term". Two coordinators at once (a split: the
/// old one still planning on the minority side, cut off but not yet seeing it, while the
/// majority side's oldest member takes over) then publish tables that every member orders
/// the same way, the new coordinator's first, unless the old one made 4,096 tables after
/// the split (the takeover gate stops it once it sees a majority fail, within failure
/// detection): the sides converge on the coordinator that took over instead of on whichever
/// made more tables. The stride is small because services build ids above epochs (a lock's
/// fencing tokens and the executor's batch ids are `epoch << 32` at least): 2^20
/// coordinator changes before a version needs 32 bits.
fn first_version_of_term(newest: u64) -> u64 {
    (newest / TERM_STRIDE + 1) * TERM_STRIDE
}

impl Coordinator {
    /// Starts from the newest table any member holds.
    pub(crate) fn new(newest: PartitionTable, config: TableConfig, max_parallel: usize) -> Self {
        Self {
            config,
            target: newest.clone(),
            pending: BTreeSet::new(),
            in_flight: BTreeSet::new(),
            freezing: BTreeSet::new(),
            ready: BTreeMap::new(),
            max_parallel: max_parallel.max(1),
            stats: MigrationStats::default(),
            first_version: first_version_of_term(newest.version()),
            published: newest,
        }
    }

    /// The version of the next table this coordinator publishes.
    fn next_version(&self) -> u64 {
        (self.published.version() + 1).max(self.first_version)
    }

    pub(crate) fn published(&self) -> &PartitionTable {
        &self.published
    }

    pub(crate) fn stats(&self) -> MigrationStats {
        MigrationStats {
            in_flight: (self.pending.len() + self.in_flight.len()) as u64,
            ..self.stats.clone()
        }
    }

    /// Whether the published table is the target (no migration left).
    pub(crate) fn is_settled(&self) -> bool {
        self.pending.is_empty()
            && self.in_flight.is_empty()
            && self.freezing.is_empty()
            && self.ready.is_empty()
            && self.published.version() > 0
            && (0..self.published.partitions())
                .all(|p| self.published.replicas(p).eq(self.target.replicas(p)))
    }

    /// The data members changed: `members` may hold partitions; `draining` are alive and
    /// still serve what they hold, but must hand it all to `members`.
    pub(crate) fn on_members(
        &mut self,
        members: &[Candidate],
        draining: &[Arc<str>],
    ) -> Vec<Effect> {
        let mut effects = Vec::new();
        let alive: HashSet<&str> = members
            .iter()
            .map(|c| &*c.id)
            .chain(draining.iter().map(|d| &**d))
            .collect();
        // 1. Drop the dead from the published table: promotion, no data moves.
        let published_members: BTreeSet<&Arc<str>> = self.published.members().iter().collect();
        if published_members.iter().any(|m| !alive.contains(&***m)) || self.published.version() == 0
        {
            let version = self.next_version();
            let mut assignments = Vec::new();
            let mut epochs = Vec::new();
            for p in 0..self.published.partitions() {
                let old_owner = self.published.owner(p).cloned();
                let survivors: Vec<Arc<str>> = self
                    .published
                    .replicas(p)
                    .filter(|m| alive.contains(&***m))
                    .cloned()
                    .collect();
                let epoch = if survivors.first() == old_owner.as_ref() {
                    self.published.epoch(p)
                } else {
                    version
                };
                assignments.push(survivors);
                epochs.push(epoch);
            }
            let interim = PartitionTable::from_assignments(
                version,
                self.published.partitions(),
                assignments,
                epochs,
            );
            // A brand new cluster has nothing to copy: publish the plan itself.
            let first = self.published.version() == 0;
            self.published = interim;
            if first {
                let planned = PartitionTable::plan(&self.published, members, &self.config);
                self.published = planned;
            } else if self.published.members().is_empty() {
                // Every replica of everything died: start over from a plan.
                let planned = PartitionTable::plan(&self.published, members, &self.config);
                self.published = planned;
            }
            effects.push(Effect::Publish(self.published.clone()));
        }
        // Moves to a destination that died are moot (a late answer is ignored).
        self.pending.retain(|(_, d)| alive.contains(&**d));
        self.in_flight.retain(|(_, d)| alive.contains(&**d));
        // So are moves to a member that became a replica meanwhile (a backup promoted to
        // owner when the owner died): copying to it would copy from it to itself, refused
        // at every retry (locks workload, seed 35: the cluster never settled).
        let published = &self.published;
        self.in_flight
            .retain(|(p, d)| published.rank_of(*p, d).is_none());
        // 2. Head for the plan from here.
        self.target = PartitionTable::plan(&self.published, members, &self.config);
        let moves: BTreeSet<(u32, Arc<str>)> = data_moves(&self.published, &self.target)
            .into_iter()
            .collect();
        self.pending = moves
            .iter()
            .filter(|m| !self.in_flight.contains(m))
            .cloned()
            .collect();
        // Partitions with no live replica at all cannot be copied: take the target as is.
        let mut lost = false;
        for p in 0..self.published.partitions() {
            if self.published.owner(p).is_none() && self.target.owner(p).is_some() {
                self.pending.retain(|(q, _)| *q != p);
                self.ready.insert(p, false);
                lost = true;
            }
        }
        self.freezing.retain(|p| moves.iter().all(|(q, _)| q != p));
        self.ready
            .retain(|p, _| moves.iter().all(|(q, _)| q != p) || self.published.owner(*p).is_none());
        // A partition made ready under the previous target may now change owner: that
        // needs a freeze first, whatever it needed before.
        let recheck: Vec<u32> = self
            .ready
            .keys()
            .copied()
            .filter(|p| {
                self.published.owner(*p).is_some()
                    && self.target.owner(*p) != self.published.owner(*p)
            })
            .collect();
        for p in recheck {
            self.ready.remove(&p);
            self.partition_done(p, &mut effects);
        }
        // Partitions whose replicas change without any copy (e.g. a backup dropped).
        for p in 0..self.published.partitions() {
            let differs = !self.published.replicas(p).eq(self.target.replicas(p));
            let has_moves = moves.iter().any(|(q, _)| *q == p);
            if differs && !has_moves && !self.ready.contains_key(&p) {
                self.partition_done(p, &mut effects);
            }
        }
        if lost {
            effects.extend(self.flush());
        }
        self.start_moves(&mut effects);
        effects
    }

    fn start_moves(&mut self, effects: &mut Vec<Effect>) {
        while self.in_flight.len() < self.max_parallel {
            let Some(next) = self.pending.iter().next().cloned() else {
                break;
            };
            self.pending.remove(&next);
            let Some(source) = self.published.owner(next.0).cloned() else {
                continue;
            };
            if self.published.rank_of(next.0, &next.1).is_some() {
                continue; // already a replica: nothing to copy
            }
            self.in_flight.insert(next.clone());
            self.stats.started += 1;
            effects.push(Effect::Migrate {
                partition: next.0,
                source,
                destination: next.1,
            });
        }
    }

    /// All copies for `p` are done: switch it, after a freeze if its owner changes.
    fn partition_done(&mut self, p: u32, effects: &mut Vec<Effect>) {
        let old = self.published.owner(p).cloned();
        let new = self.target.owner(p).cloned();
        match (old, new) {
            (Some(old), Some(new)) if old != new => {
                if self.freezing.insert(p) {
                    effects.push(Effect::Freeze {
                        partition: p,
                        owner: old,
                        new_owner: new,
                    });
                }
            }
            _ => {
                self.ready.insert(p, true);
            }
        }
    }

    /// A migration ended.
    pub(crate) fn on_migrated(
        &mut self,
        partition: u32,
        destination: &Arc<str>,
        ok: bool,
    ) -> Vec<Effect> {
        let mut effects = Vec::new();
        let key = (partition, destination.clone());
        if !self.in_flight.remove(&key) {
            return effects; // superseded by a membership change
        }
        let wanted = self.target.rank_of(partition, destination).is_some()
            && self.published.rank_of(partition, destination).is_none();
        if ok {
            self.stats.completed += 1;
        } else {
            self.stats.failed += 1;
            if wanted {
                self.pending.insert(key);
            }
        }
        // The partition is done once no move the target still wants is left, whichever
        // move ended last. Counting moves the target no longer wants (a destination dropped
        // from the plan by a later membership change, still copying) left a partition whose
        // wanted copies were done switched by nobody: published with one replica where two
        // were planned, nothing pending, never settled until membership changed again.
        let still_moving = self
            .pending
            .iter()
            .chain(self.in_flight.iter())
            .any(|(q, d)| *q == partition && self.target.rank_of(partition, d).is_some());
        let differs = !self
            .published
            .replicas(partition)
            .eq(self.target.replicas(partition));
        if !still_moving && differs && (ok || !wanted) {
            self.partition_done(partition, &mut effects);
        }
        self.start_moves(&mut effects);
        effects
    }

    /// The old owner froze `partition` (or could not be reached, `ok == false`).
    pub(crate) fn on_frozen(&mut self, partition: u32, ok: bool) -> Vec<Effect> {
        if self.freezing.remove(&partition) {
            // A clean handoff keeps the epoch: the new owner's state is exactly the old one's.
            // Without the freeze acknowledged, the switch is treated like a failover.
            self.ready.insert(partition, ok);
        }
        Vec::new()
    }

    /// Publishes the partitions that are ready, if any.
    pub(crate) fn flush(&mut self) -> Option<Effect> {
        if self.ready.is_empty() {
            return None;
        }
        let version = self.next_version();
        let mut assignments = Vec::new();
        let mut epochs = Vec::new();
        for p in 0..self.published.partitions() {
            match self.ready.get(&p) {
                Some(&clean) => {
                    let new: Vec<Arc<str>> = self.target.replicas(p).cloned().collect();
                    let owner_changed = new.first() != self.published.owner(p);
                    epochs.push(if owner_changed && !clean {
                        version
                    } else {
                        self.published.epoch(p)
                    });
                    assignments.push(new);
                }
                None => {
                    assignments.push(self.published.replicas(p).cloned().collect());
                    epochs.push(self.published.epoch(p));
                }
            }
        }
        self.ready.clear();
        self.published = PartitionTable::from_assignments(
            version,
            self.published.partitions(),
            assignments,
            epochs,
        );
        Some(Effect::Publish(self.published.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(ids: &[&str]) -> Vec<Candidate> {
        ids.iter()
            .map(|id| Candidate {
                id: Arc::from(*id),
                group: None,
            })
            .collect()
    }

    fn config(partitions: u32, backups: u8) -> TableConfig {
        TableConfig {
            partitions,
            backups,
            placement_attribute: None,
        }
    }

    fn published(effects: &[Effect]) -> Option<&PartitionTable> {
        effects.iter().rev().find_map(|e| match e {
            Effect::Publish(t) => Some(t),
            _ => None,
        })
    }

    /// Drives migrations to completion the way a perfect network would.
    fn drive(c: &mut Coordinator, mut effects: Vec<Effect>) -> Vec<Effect> {
        let mut all = Vec::new();
        while !effects.is_empty() {
            let mut next = Vec::new();
            for e in effects {
                match &e {
                    Effect::Migrate {
                        partition,
                        destination,
                        ..
                    } => next.extend(c.on_migrated(*partition, destination, true)),
                    Effect::Freeze { partition, .. } => next.extend(c.on_frozen(*partition, true)),
                    Effect::Publish(_) => {}
                }
                all.push(e);
            }
            next.extend(c.flush());
            effects = next;
        }
        all
    }

    /// Seed 18 of the executor's workload: a split of {a, b} from {c, d, e}. The old
    /// coordinator a, not yet seeing it is cut off, drops the others one at a time and
    /// publishes several tables; c takes over on the majority side from the table of the
    /// split and publishes fewer. Every member must order c's tables first.
    #[test]
    fn a_coordinator_that_takes_over_outranks_every_table_of_the_one_before() {
        let cfg = config(31, 1);
        let mut old = Coordinator::new(PartitionTable::empty(31), cfg.clone(), 4);
        let e = old.on_members(&members(&["a", "b", "c", "d", "e"]), &[]);
        drive(&mut old, e);
        let split = old.published().clone();
        for alive in [&["a", "b", "c", "d"][..], &["a", "b", "c"], &["a", "b"]] {
            let e = old.on_members(&members(alive), &[]);
            drive(&mut old, e);
        }
        assert!(old.published().version() >= split.version() + 3);
        let mut new = Coordinator::new(split.clone(), cfg, 4);
        let e = new.on_members(&members(&["c", "d", "e"]), &[]);
        let first = published(&e).expect("a table").clone();
        assert!(first.version() > old.published().version());
        // Within its term, a coordinator counts one by one.
        drive(&mut new, e);
        assert!(new.published().version() >= first.version());
        assert_eq!(
            new.published().version() / TERM_STRIDE,
            first.version() / TERM_STRIDE
        );
    }

    #[test]
    fn a_new_cluster_publishes_its_plan_at_once() {
        let mut c = Coordinator::new(PartitionTable::empty(31), config(31, 1), 4);
        let effects = c.on_members(&members(&["a", "b", "c"]), &[]);
        let t = published(&effects).expect("a table");
        assert!(t.check(&config(31, 1)).is_ok());
        assert!(!effects.iter().any(|e| matches!(e, Effect::Migrate { .. })));
        assert!(c.is_settled());
    }

    #[test]
    fn a_join_copies_before_it_switches_and_freezes_owners_that_change() {
        let cfg = config(61, 1);
        let mut c = Coordinator::new(PartitionTable::empty(61), cfg.clone(), 4);
        let e = c_on(&mut c, &["a", "b", "c"]);
        drive(&mut c, e);
        let before = c.published().clone();
        let effects = c.on_members(&members(&["a", "b", "c", "d"]), &[]);
        // Nothing switches before its data is copied.
        assert!(published(&effects).is_none());
        assert!(
            effects
                .iter()
                .filter(|e| matches!(e, Effect::Migrate { .. }))
                .count()
                <= 4
        );
        let all = drive(&mut c, effects);
        let after = c.published();
        assert!(c.is_settled());
        assert!(after.version() > before.version());
        assert!(after.primaries_per_member().get("d").copied().unwrap_or(0) >= 61 / 4);
        // Every partition whose owner changed was frozen on its old owner first.
        for p in 0..61 {
            if before.owner(p) != after.owner(p) {
                assert!(all.contains(&Effect::Freeze {
                    partition: p,
                    owner: before.owner(p).unwrap().clone(),
                    new_owner: after.owner(p).unwrap().clone(),
                }));
                assert_eq!(
                    after.epoch(p),
                    before.epoch(p),
                    "clean handoff keeps the epoch"
                );
            }
        }
    }

    /// The unsettled fresh cluster (issue 13): a partition copying to two members, one of
    /// which a later join drops from the plan. The wanted copy ends first, the unwanted one
    /// last: the partition must still switch, and the cluster settle.
    #[test]
    fn a_partition_whose_last_move_is_no_longer_wanted_still_switches() {
        let cfg = config(271, 1);
        let mut c = Coordinator::new(PartitionTable::empty(271), cfg.clone(), 10_000);
        c.on_members(&members(&["a"]), &[]);
        // d joins: every partition copies to d.
        let first = c.on_members(&members(&["a", "d"]), &[]);
        // e joins while those copies run: some partitions now want e and not d.
        let second = c.on_members(&members(&["a", "d", "e"]), &[]);
        let moves = |effects: &[Effect]| -> Vec<(u32, Arc<str>)> {
            effects
                .iter()
                .filter_map(|e| match e {
                    Effect::Migrate {
                        partition,
                        destination,
                        ..
                    } => Some((*partition, destination.clone())),
                    _ => None,
                })
                .collect()
        };
        let (to_d, to_e) = (moves(&first), moves(&second));
        let unwanted: Vec<(u32, Arc<str>)> = to_d
            .iter()
            .filter(|(p, d)| c.target.rank_of(*p, d).is_none())
            .cloned()
            .collect();
        assert!(
            unwanted
                .iter()
                .any(|(p, _)| to_e.iter().any(|(q, _)| q == p)),
            "the scenario needs a partition copying to d (no longer wanted) and to e"
        );
        // Wanted copies end first, then the unwanted ones; every freeze succeeds.
        let mut effects = Vec::new();
        for (p, d) in to_d.iter().chain(&to_e) {
            if c.target.rank_of(*p, d).is_some() {
                effects.extend(c.on_migrated(*p, d, true));
            }
        }
        for (p, d) in &unwanted {
            effects.extend(c.on_migrated(*p, d, true));
        }
        effects.extend(c.flush());
        drive(&mut c, effects);
        assert!(
            c.is_settled(),
            "not settled: {} partitions differ from the plan",
            (0..271)
                .filter(|p| !c.published().replicas(*p).eq(c.target.replicas(*p)))
                .count()
        );
    }

    fn c_on(c: &mut Coordinator, ids: &[&str]) -> Vec<Effect> {
        c.on_members(&members(ids), &[])
    }

    #[test]
    fn a_failure_promotes_at_once_then_restores_backups() {
        let cfg = config(41, 1);
        let mut c = Coordinator::new(PartitionTable::empty(41), cfg.clone(), 8);
        let e = c_on(&mut c, &["a", "b", "c"]);
        drive(&mut c, e);
        let before = c.published().clone();
        let effects = c.on_members(&members(&["a", "b"]), &[]);
        let interim = published(&effects).expect("published at once").clone();
        for p in 0..41 {
            if before.owner(p).map(|o| &**o) == Some("c") {
                let first_backup = before.replicas(p).nth(1).cloned();
                assert_eq!(interim.owner(p), first_backup.as_ref(), "promoted");
                assert_ne!(
                    interim.epoch(p),
                    before.epoch(p),
                    "a failover starts a new epoch"
                );
            }
        }
        drive(&mut c, effects);
        assert!(c.is_settled());
        assert!(c.published().check(&cfg).is_ok());
        for p in 0..41 {
            assert_eq!(
                c.published().replicas(p).count(),
                2,
                "backup count restored"
            );
        }
    }

    #[test]
    fn a_failed_migration_is_retried_and_a_dead_destination_is_forgotten() {
        let cfg = config(13, 1);
        let mut c = Coordinator::new(PartitionTable::empty(13), cfg, 1);
        let e = c_on(&mut c, &["a", "b"]);
        drive(&mut c, e);
        let effects = c.on_members(&members(&["a", "b", "c"]), &[]);
        let Some(Effect::Migrate {
            partition,
            destination,
            ..
        }) = effects
            .iter()
            .find(|e| matches!(e, Effect::Migrate { .. }))
            .cloned()
        else {
            panic!("a migration")
        };
        let retry = c.on_migrated(partition, &destination, false);
        assert!(retry
            .iter()
            .any(|e| matches!(e, Effect::Migrate { partition: q, .. } if *q == partition)));
        // The destination dies mid-migration: its moves are dropped, nothing hangs — the
        // coordinator settles with nothing left waiting for the dead member.
        let effects = c.on_members(&members(&["a", "b"]), &[]);
        drive(&mut c, effects);
        assert!(
            c.is_settled(),
            "not settled after the destination died: {:?}",
            c.stats()
        );
        assert_eq!(c.stats().in_flight, 0);
        let version = c.published().version();
        // A late answer is ignored: no effect, nothing published, still settled.
        let late = c.on_migrated(partition, &destination, true);
        assert!(late.is_empty(), "a late answer had effects: {late:?}");
        assert!(c.flush().is_none(), "a late answer made something ready");
        assert!(c.is_settled());
        assert_eq!(c.published().version(), version);
        assert!(c.published().members().iter().all(|m| &**m != "c"));
    }

    /// Which members hold which partitions' data, and the invariants every publication must
    /// keep: a table names only replicas that hold the partition's data, and — as long as
    /// no more members failed than there are backups — no partition is ever published
    /// without a member that holds its data (the model does not re-seed it empty then).
    struct Model {
        holds: BTreeSet<(u32, Arc<str>)>,
        last: Option<PartitionTable>,
        backups: usize,
        /// Members killed since the coordinator last settled.
        failures: usize,
    }

    impl Model {
        fn new(cfg: &TableConfig) -> Self {
            Self {
                holds: BTreeSet::new(),
                last: None,
                backups: cfg.backups as usize,
                failures: 0,
            }
        }

        fn publish(&mut self, t: &PartitionTable) {
            // Losing data is allowed only for a brand new table's partitions, or after more
            // failures than backups.
            let may_lose = self.last.is_none() || self.failures > self.backups;
            for p in 0..t.partitions() {
                let any_holder = self.holds.iter().any(|(q, _)| *q == p);
                assert!(
                    may_lose || any_holder,
                    "table {} publishes partition {p} on {:?}, but no member holds its data: \
                     lost after {} failure(s) with {} backup(s)",
                    t.version(),
                    t.replicas(p).collect::<Vec<_>>(),
                    self.failures,
                    self.backups
                );
                assert!(
                    may_lose || t.replicas(p).next().is_some(),
                    "table {} publishes partition {p} with no replica, dropping the data {:?} \
                     hold, after {} failure(s) with {} backup(s)",
                    t.version(),
                    self.holds
                        .iter()
                        .filter(|(q, _)| *q == p)
                        .map(|(_, m)| m)
                        .collect::<Vec<_>>(),
                    self.failures,
                    self.backups
                );
                for m in t.replicas(p) {
                    assert!(
                        !any_holder || self.holds.contains(&(p, m.clone())),
                        "table {} names {m} for partition {p}, which it does not hold",
                        t.version()
                    );
                }
                if !any_holder {
                    // Brand new (or lost beyond the backups): the new replicas start empty.
                    for m in t.replicas(p) {
                        self.holds.insert((p, m.clone()));
                    }
                }
                if let Some(last) = &self.last {
                    for m in last.replicas(p) {
                        if t.rank_of(p, m).is_none() {
                            self.holds.remove(&(p, m.clone()));
                        }
                    }
                }
            }
            self.last = Some(t.clone());
        }

        fn kill(&mut self, dead: &str) {
            self.holds.retain(|(_, m)| &**m != dead);
            self.failures += 1;
        }

        /// Carries out effects, completing at most `budget` migrations (the rest stay in
        /// flight, as if the network were slow). Returns the migrations left in flight.
        fn run(
            &mut self,
            c: &mut Coordinator,
            effects: Vec<Effect>,
            mut budget: usize,
        ) -> Vec<Effect> {
            let mut queue = effects;
            let mut stalled = Vec::new();
            while !queue.is_empty() {
                let mut next = Vec::new();
                for e in queue {
                    match &e {
                        Effect::Publish(t) => self.publish(t),
                        Effect::Migrate {
                            partition,
                            source,
                            destination,
                        } => {
                            if budget == 0 {
                                stalled.push(e);
                                continue;
                            }
                            budget -= 1;
                            let ok = self.holds.contains(&(*partition, source.clone()));
                            if ok {
                                self.holds.insert((*partition, destination.clone()));
                            }
                            next.extend(c.on_migrated(*partition, destination, ok));
                        }
                        Effect::Freeze { partition, .. } => {
                            next.extend(c.on_frozen(*partition, true))
                        }
                    }
                }
                if let Some(p) = c.flush() {
                    next.push(p);
                }
                queue = next;
            }
            if c.is_settled() {
                // Every backup restored: the next failures start from a full count.
                self.failures = 0;
            }
            stalled
        }
    }

    fn start(ids: &[&str], cfg: &TableConfig) -> (Coordinator, Model) {
        let mut c = Coordinator::new(PartitionTable::empty(cfg.partitions), cfg.clone(), 4);
        let mut m = Model::new(cfg);
        let e = c.on_members(&members(ids), &[]);
        m.run(&mut c, e, usize::MAX);
        assert!(c.is_settled());
        (c, m)
    }

    #[test]
    fn the_coordinator_dying_mid_migration_loses_nothing() {
        let cfg = config(97, 1);
        let (mut c, mut model) = start(&["a", "b", "c"], &cfg);
        let e = c.on_members(&members(&["a", "b", "c", "d"]), &[]);
        let stalled = model.run(&mut c, e, 5);
        assert!(!stalled.is_empty(), "some migrations still in flight");
        // "a" (the coordinator) dies. The next oldest starts from the newest table anyone
        // holds; the old coordinator's in-flight copies are abandoned.
        let newest = c.published().clone();
        model.kill("a");
        let mut c2 = Coordinator::new(newest, cfg.clone(), 4);
        let e = c2.on_members(&members(&["b", "c", "d"]), &[]);
        model.run(&mut c2, e, usize::MAX);
        assert!(c2.is_settled());
        let t = c2.published();
        assert!(t.check(&cfg).is_ok(), "{:?}", t.check(&cfg));
        for p in 0..97 {
            assert_eq!(
                t.replicas(p).count(),
                2,
                "partition {p} has its backup back"
            );
        }
    }

    #[test]
    fn members_dying_mid_migration_lose_nothing_with_one_backup() {
        let cfg = config(97, 1);
        // A destination dies mid-migration; the copies still under way to others finish.
        let (mut c, mut model) = start(&["a", "b", "c"], &cfg);
        let e = c.on_members(&members(&["a", "b", "c", "d"]), &[]);
        let stalled = model.run(&mut c, e, 7);
        model.kill("d");
        let mut e = c.on_members(&members(&["a", "b", "c"]), &[]);
        e.extend(stalled);
        model.run(&mut c, e, usize::MAX);
        assert!(c.is_settled());
        // A source dies mid-migration: its copies fail, the backups take over.
        let e = c.on_members(&members(&["a", "b", "c", "e"]), &[]);
        let stalled = model.run(&mut c, e, 3);
        model.kill("b");
        let mut e = c.on_members(&members(&["a", "c", "e"]), &[]);
        e.extend(stalled); // copies from b now fail (the model says b holds nothing)
        model.run(&mut c, e, usize::MAX);
        assert!(c.is_settled());
        for p in 0..97 {
            assert_eq!(c.published().replicas(p).count(), 2);
        }
    }

    #[test]
    fn a_drained_member_hands_everything_off_before_it_is_dropped() {
        let cfg = config(53, 0);
        let (mut c, mut model) = start(&["a", "b", "c"], &cfg);
        let draining = [Arc::from("c")];
        let e = c.on_members(&members(&["a", "b"]), &draining);
        // Nothing is published that drops c's partitions before they are copied.
        model.run(&mut c, e, usize::MAX);
        assert!(c.is_settled());
        assert!(!c.published().members().iter().any(|m| &**m == "c"));
        for p in 0..53 {
            assert_eq!(c.published().replicas(p).count(), 1);
        }
    }
}
