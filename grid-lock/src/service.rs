//! The lock table on the runtime's service interface ([`PartitionService`]): one
//! [`PartitionLocks`] per partition, decided under the partition's lock (`prepare`),
//! replicated, applied on the owner and its backups (`apply`); grants pushed to parked
//! callers with [`Effects::wake`]; lease expiry on one timer per partition; waiters whose
//! caller gave up or whose member left removed by operations of the service's own.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};

use grid_core::runtime::service::*;
use grid_net::membership::Cluster;
use tokio::time::Instant;

use crate::quorum::Quorum;
use crate::table::{Answer, Change, Env, Op, Output, PartitionCopy, PartitionLocks, Reply};
use crate::LockError;

/// The expiry timer of a partition (one per partition: armed at its earliest lease end).
const EXPIRY: u64 = 1;
/// When an expiry could not run (its operation was dropped), try again this much later.
const EXPIRY_RETRY: std::time::Duration = std::time::Duration::from_millis(500);

/// What the owner of a partition knows that is not replicated.
#[derive(Debug, Default)]
struct Local {
    /// Calls parked here (alive until woken, forgotten or disowned).
    live: HashSet<CallId>,
    /// When the expiry timer is armed for (`None`: not armed, or fired).
    armed: Option<Instant>,
    /// Whether this member owns the partition (for the metrics read at scrape).
    owned: bool,
    /// The largest fencing token of any table of this partition this member threw away or
    /// replaced (member-local, kept across drops): a table that comes back empty or stale
    /// (the runtime discarding a replica, a stale copy) never grants a smaller token here.
    floor: u64,
    /// Until when the partition grants no lock its table has no holder for: this member
    /// threw away a copy of it whose holders' leases ran until then (member-local, kept
    /// across drops; see [`crate::table::Env::quiet_until`]).
    quiet_until: Option<Instant>,
}

/// The lock service of one member (registered on every member; lite members own nothing).
pub struct LockService {
    parts: Vec<Mutex<PartitionLocks>>,
    local: Vec<Mutex<Local>>,
    quorum: Arc<Mutex<Quorum>>,
    cluster: Cluster,
}

impl std::fmt::Debug for LockService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockService")
            .field("partitions", &self.parts.len())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl LockService {
    /// A service for `partitions` partitions, checking grants against `quorum` with the
    /// data members `cluster` shows.
    pub fn new(partitions: u32, quorum: Arc<Mutex<Quorum>>, cluster: Cluster) -> Self {
        Self {
            parts: (0..partitions).map(|_| Mutex::default()).collect(),
            local: (0..partitions).map(|_| Mutex::default()).collect(),
            quorum,
            cluster,
        }
    }

    /// Data members in this member's view.
    pub fn live_data_members(&self) -> usize {
        self.cluster
            .members()
            .iter()
            .filter(|m| m.is_data_member())
            .count()
    }

    /// Whether this member sees a quorum.
    pub fn quorum(&self) -> Result<(), LockError> {
        let live = self.live_data_members();
        lock(&self.quorum).check(live)
    }

    /// Locks recorded in partition `p` (held or waited for).
    pub fn locks_in(&self, p: u32) -> usize {
        self.part(p).map(|t| t.records.len()).unwrap_or(0)
    }

    /// Locks held and callers waiting in the partitions this member owns (what the
    /// `grid_lock_held` and `grid_lock_waiters` gauges show).
    pub fn owned_counts(&self) -> (usize, usize) {
        let (mut held, mut waiting) = (0, 0);
        for p in 0..self.parts.len() as u32 {
            if !self.local(p).is_some_and(|l| l.owned) {
                continue;
            }
            if let Some(t) = self.part(p) {
                for r in t.records.values() {
                    held += usize::from(r.holder.is_some());
                    waiting += r.waiters.len();
                }
            }
        }
        (held, waiting)
    }

    /// The table of partition `p` (tests look inside).
    pub fn table(&self, p: u32) -> Option<PartitionLocks> {
        self.part(p).map(|t| t.clone())
    }

    fn part(&self, p: u32) -> Option<MutexGuard<'_, PartitionLocks>> {
        self.parts.get(p as usize).map(lock)
    }

    fn local(&self, p: u32) -> Option<MutexGuard<'_, Local>> {
        self.local.get(p as usize).map(lock)
    }

    /// Remembers `token` as the smallest token this member may grant next in `p`.
    fn raise_floor(&self, p: u32, token: u64) {
        if let Some(mut l) = self.local(p) {
            l.floor = l.floor.max(token);
        }
    }

    /// Arms the expiry timer at `at` unless it is armed for an earlier time already (a
    /// timer that fires early finds nothing expired and re-arms for the earliest lease).
    fn arm_expiry(local: &mut Local, at: Option<Instant>, fx: &mut Effects<Self>) {
        let Some(at) = at else { return };
        if local.armed.is_some_and(|armed| armed <= at) {
            return;
        }
        local.armed = Some(at);
        fx.arm_timer(EXPIRY, at);
    }
}

fn bad_partition(p: u32) -> LockError {
    LockError::BadCopy(format!("no partition {p}"))
}

impl PartitionService for LockService {
    type Op = Op;
    type Change = Change;
    type Answer = Answer;
    type Error = LockError;
    type Message = ();

    fn name(&self) -> &str {
        "lock"
    }

    fn read(&self, ctx: &Ctx, op: &Op) -> Result<Answer, LockError> {
        match op {
            Op::IsLocked { lock } => {
                let t = self
                    .part(ctx.partition)
                    .ok_or(bad_partition(ctx.partition))?;
                Ok(Answer::Locked(t.is_locked(lock, ctx.now)))
            }
            _ => Err(LockError::NotARead),
        }
    }

    fn prepare(&self, ctx: &Ctx, op: Op) -> Result<Prepared<Self>, LockError> {
        let p = ctx.partition;
        let quorum = self.quorum();
        let live_calls: HashSet<CallId> = self.local(p).map(|l| l.live.clone()).unwrap_or_default();
        let call = ctx.call;
        let is_live = move |c: CallId| live_calls.contains(&c) || Some(c) == call;
        let (floor, quiet_until) = self
            .local(p)
            .map_or((0, None), |l| (l.floor, l.quiet_until));
        let t = self.part(p).ok_or(bad_partition(p))?;
        let env = Env {
            now: ctx.now,
            epoch: ctx.epoch,
            me: &ctx.member,
            caller: ctx.caller.as_deref(),
            call: ctx.call,
            quorum,
            live: &is_live,
            floor,
            quiet_until,
        };
        let decision = t.decide(op, &env).inspect_err(|e| {
            metrics::counter!("grid_lock_refusals_total", "reason" => refusal(e)).increment(1);
        })?;
        Ok(match (decision.reply, decision.change) {
            (Reply::Now(a), None) => Prepared::answer(a),
            (Reply::Now(a), Some(c)) => Prepared::change(a, c),
            (Reply::Park, Some(c)) => Prepared::park(c),
            (Reply::Park, None) => return Err(LockError::NotHolder),
        })
    }

    fn apply(&self, ctx: &Ctx, change: &Change, fx: &mut Effects<Self>) -> Result<(), LockError> {
        let p = ctx.partition;
        let (outputs, stranded) = {
            let mut t = self.part(p).ok_or(bad_partition(p))?;
            if ctx.role == Role::Owner {
                count_change(&t, change, ctx.now);
            }
            let outputs = t.apply(change, ctx.now);
            // A waiter parked on a lock nobody holds (while the partition was quiet) is
            // served by the expiry.
            let stranded = match change {
                Change::Park { lock, .. } => {
                    t.records.get(lock).is_some_and(|r| r.holder.is_none())
                }
                _ => false,
            };
            (outputs, stranded)
        };
        if ctx.role != Role::Owner {
            return Ok(());
        }
        let mut local = self.local(p).ok_or(bad_partition(p))?;
        note_parked(change, &mut local.live);
        let mut earliest: Option<Instant> = None;
        for o in outputs {
            match o {
                Output::Wake(call, answer) => {
                    local.live.remove(&call);
                    fx.wake(call, answer);
                }
                Output::Deadline(at) => earliest = Some(earliest.map_or(at, |e| e.min(at))),
            }
        }
        // Renewals only push leases later: a timer armed for an earlier lease end fires
        // early, harmlessly (`on_timer` re-arms). Waiters parked while the partition is quiet
        // are served when it ends.
        let quiet = local.quiet_until.filter(|q| *q > ctx.now);
        let quiet = if stranded {
            Some(quiet.unwrap_or(ctx.now))
        } else {
            quiet
        };
        let earliest = match (earliest, quiet) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Self::arm_expiry(&mut local, earliest, fx);
        Ok(())
    }

    fn on_owned(&self, ctx: &Ctx, fx: &mut Effects<Self>) {
        let p = ctx.partition;
        // A new owner (promoted backup, migration's destination) waits out a whole lease
        // before any lock can expire.
        let (next, stranded) = self.part(p).map_or((None, false), |mut t| {
            let stranded = t
                .records
                .values()
                .any(|r| r.holder.is_none() && !r.waiters.is_empty());
            (t.restart_leases(ctx.now), stranded)
        });
        if let Some(mut l) = self.local(p) {
            l.live.clear();
            l.armed = None;
            l.owned = true;
            // Waiters of a lock nobody holds (parked on an earlier owner while it was
            // quiet) are served by the expiry, once this member's own quiet ends.
            let quiet = l.quiet_until.filter(|q| *q > ctx.now);
            let quiet = if stranded {
                Some(quiet.unwrap_or(ctx.now))
            } else {
                quiet
            };
            Self::arm_expiry(&mut l, next, fx);
            Self::arm_expiry(&mut l, quiet, fx);
        }
    }

    fn on_disowned(&self, p: u32) {
        if let Some(mut l) = self.local(p) {
            l.live.clear();
            l.armed = None;
            l.owned = false;
        }
    }

    fn on_member_left(&self, ctx: &Ctx, member: &str, fx: &mut Effects<Self>) {
        // Its waiters go; its holds stay until their lease runs out (the member may only be
        // cut off, and still believe it holds them until then).
        let has = self
            .part(ctx.partition)
            .is_some_and(|t| t.has_waiters_of(member));
        if has {
            fx.submit(Op::MemberLeft(member.to_string()));
        }
    }

    fn on_timer(&self, ctx: &Ctx, timer: u64, fx: &mut Effects<Self>) {
        if timer != EXPIRY {
            return;
        }
        let quiet = self
            .local(ctx.partition)
            .and_then(|l| l.quiet_until)
            .filter(|q| *q > ctx.now);
        let Some(t) = self.part(ctx.partition) else {
            return;
        };
        let expired = t.records.values().any(|r| match &r.holder {
            Some(h) => h.deadline <= ctx.now,
            None => quiet.is_none() && !r.waiters.is_empty(),
        });
        let later = t
            .records
            .values()
            .filter_map(|r| r.holder.as_ref().map(|h| h.deadline))
            .filter(|d| *d > ctx.now)
            .min();
        drop(t);
        let later = match (later, quiet) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let Some(mut local) = self.local(ctx.partition) else {
            return;
        };
        local.armed = None;
        if expired {
            fx.submit(Op::Expire);
            let retry = ctx.now + EXPIRY_RETRY;
            Self::arm_expiry(&mut local, Some(later.map_or(retry, |l| l.min(retry))), fx);
        } else {
            Self::arm_expiry(&mut local, later, fx);
        }
    }

    fn on_abandoned(&self, ctx: &Ctx, call: CallId, fx: &mut Effects<Self>) {
        if let Some(mut l) = self.local(ctx.partition) {
            l.live.remove(&call);
        }
        fx.submit(Op::Forget(call));
    }

    fn snapshot(&self, partition: u32, _chunk_bytes: usize) -> Snapshot {
        let copy = self
            .part(partition)
            .map(|t| t.to_copy(grid_core::clock::now()))
            .unwrap_or_default();
        match grid_core::codec::encode(&copy) {
            Ok(bytes) => vec![bytes.into()],
            Err(e) => {
                tracing::error!(partition, error = %e, "lock table did not encode");
                Vec::new()
            }
        }
    }

    fn rebuild(&self, partition: u32, chunks: Vec<bytes::Bytes>) -> Result<Rebuilt, LockError> {
        let copy: PartitionCopy = match chunks.first() {
            None => PartitionCopy::default(),
            Some(chunk) => grid_core::codec::decode(chunk)
                .map_err(|e| LockError::BadCopy(format!("partition {partition}: {e}")))?,
        };
        Ok(Box::new(copy))
    }

    fn install(&self, partition: u32, rebuilt: Rebuilt) -> Result<(), LockError> {
        let copy = rebuilt
            .downcast::<PartitionCopy>()
            .map_err(|_| LockError::BadCopy("not a lock table".into()))?;
        let mut table = PartitionLocks::from_copy(*copy, grid_core::clock::now())?;
        let old = {
            let mut t = self.part(partition).ok_or(bad_partition(partition))?;
            table.high_water = table.high_water.max(t.high_water);
            std::mem::replace(&mut *t, table).high_water
        };
        self.raise_floor(partition, old);
        Ok(())
    }

    fn drop_partition(&self, partition: u32) {
        let old = self.part(partition).map(|mut t| std::mem::take(&mut *t));
        if let Some(old) = old {
            self.raise_floor(partition, old.high_water);
            // Its holders may still believe they hold their locks until their leases end
            // (counted on this replica from after they asked): should this member own the
            // partition again meanwhile, with a table that lost them, it waits.
            if let (Some(until), Some(mut l)) = (old.next_deadline_max(), self.local(partition)) {
                l.quiet_until = l.quiet_until.max(Some(until));
            }
        }
    }

    fn partition_len(&self, partition: u32) -> usize {
        self.locks_in(partition)
    }
}

/// The `reason` label of `grid_lock_refusals_total`.
fn refusal(e: &LockError) -> &'static str {
    match e {
        LockError::NoQuorum { .. } => "no_quorum",
        LockError::NotHolder => "not_holder",
        LockError::Lost => "lost",
        LockError::NotReentrant => "not_reentrant",
        LockError::TooManyHolds { .. } => "too_many_holds",
        LockError::TooManyWaiters { .. } => "too_many_waiters",
        LockError::TooManyLocks { .. } => "too_many_locks",
        _ => "other",
    }
}

/// Counts the grants and releases a change makes (on the owner, before applying it to `t`).
fn count_change(t: &PartitionLocks, change: &Change, now: Instant) {
    match change {
        Change::Grant { .. } => {
            metrics::counter!("grid_lock_grants_total", "how" => "free").increment(1);
        }
        Change::Reenter { .. } => {
            metrics::counter!("grid_lock_grants_total", "how" => "reentered").increment(1);
        }
        Change::Exit { .. } => {
            metrics::counter!("grid_lock_releases_total", "how" => "exited").increment(1);
        }
        Change::Free { lock, next, .. } => {
            let holder = t.records.get(lock).and_then(|r| r.holder.as_ref());
            if let Some(h) = holder {
                let how = if h.deadline <= now {
                    "expired"
                } else {
                    "released"
                };
                metrics::counter!("grid_lock_releases_total", "how" => how).increment(1);
            }
            if next.is_some() {
                metrics::counter!("grid_lock_grants_total", "how" => "queued").increment(1);
            }
        }
        Change::Many(changes) => changes.iter().for_each(|c| count_change(t, c, now)),
        Change::Renew { .. } | Change::Park { .. } | Change::Unpark { .. } => {}
    }
}

/// Records the calls a change parks (owner-local knowledge of live calls).
fn note_parked(change: &Change, live: &mut HashSet<CallId>) {
    match change {
        Change::Park { waiter, .. } => {
            live.insert(waiter.call);
        }
        Change::Unpark { calls, .. } | Change::Free { dropped: calls, .. } => {
            calls.iter().for_each(|c| {
                live.remove(c);
            });
        }
        Change::Many(changes) => changes.iter().for_each(|c| note_parked(c, live)),
        _ => {}
    }
}
