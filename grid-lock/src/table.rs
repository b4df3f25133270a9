//! The lock table of one partition, without IO: its records, the decisions an operation
//! leads to ([`PartitionLocks::decide`]), and the deterministic changes that carry them out
//! on every replica ([`PartitionLocks::apply`]). Time comes in as `now`; the quorum and the
//! owner-local knowledge of which parked calls are alive come in through [`Env`]. Effects
//! come out as [`Output`]s.
//!
//! Fencing tokens: every grant in a partition takes `max(high_water + 1, epoch << 32)`,
//! where `high_water` is the partition's largest token so far (replicated state, kept when
//! a record is removed) and `epoch` the partition's number of owner changes (in the table,
//! which outlives every replica). Tokens therefore only grow per partition, hence per lock,
//! across grants, migrations and promotions, and even across the loss of every replica of
//! the partition, as long as an epoch sees fewer than 2^32 grants.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use grid_core::runtime::service::CallId;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::LockError;

/// Most waiters queued on one lock; one more is refused ([`LockError::TooManyWaiters`]).
pub const MAX_WAITERS: usize = 4_096;
/// Most lock records in one partition; a new lock beyond it is refused
/// ([`LockError::TooManyLocks`]).
pub const MAX_LOCKS_PER_PARTITION: usize = 65_536;
/// Longest lock name, in bytes.
pub const MAX_NAME_BYTES: usize = 255;
/// Longest encoded key of a keyed lock, in bytes.
pub const MAX_KEY_BYTES: usize = 1_024;
/// Longest lease a caller may ask for.
pub const MAX_LEASE: Duration = Duration::from_secs(3_600);

/// A lock: its name and, for a keyed lock, its encoded key (empty for a plain lock: an
/// encoded key is never empty).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LockId {
    /// The name, at most [`MAX_NAME_BYTES`].
    pub name: String,
    /// The encoded key (MessagePack), at most [`MAX_KEY_BYTES`]; empty for a plain lock.
    #[serde(with = "grid_core::codec::bin")]
    pub key: Vec<u8>,
}

impl LockId {
    /// Checks the size limits.
    pub fn check(&self) -> Result<(), LockError> {
        if self.name.len() > MAX_NAME_BYTES {
            return Err(LockError::NameTooLong {
                len: self.name.len(),
            });
        }
        if self.key.len() > MAX_KEY_BYTES {
            return Err(LockError::KeyTooLarge {
                len: self.key.len(),
            });
        }
        Ok(())
    }
}

/// Who asks: a [`crate::LockOwner`] on one incarnation of one member, and the acquire
/// attempt (`nonce`, so that a retried acquire is recognised).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Who {
    /// The member id.
    pub member: String,
    /// The member's start generation (a restarted member is someone else).
    pub generation: u64,
    /// The owner token within that member.
    pub owner: u64,
    /// The acquire attempt.
    pub nonce: u64,
}

impl Who {
    /// Same owner (whatever the attempt).
    pub fn same_owner(&self, other: &Self) -> bool {
        self.owner == other.owner
            && self.generation == other.generation
            && self.member == other.member
    }
}

/// The current holder of a lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    /// Who holds it (the nonce of the first acquire).
    pub who: Who,
    /// How many times it was entered (reentrant locks).
    pub count: u32,
    /// Its fencing token.
    pub token: u64,
    /// Its lease.
    pub lease_ms: u64,
    /// When the lease ends on this replica (local: never leaves the member as an instant).
    pub deadline: Instant,
}

/// A queued acquire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Waiter {
    /// The parked call to wake.
    pub call: CallId,
    /// Who waits.
    pub who: Who,
    /// The lease it asked for.
    pub lease_ms: u64,
}

/// One lock's record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    /// The holder, if held.
    pub holder: Option<Hold>,
    /// Waiters, first come first served.
    pub waiters: VecDeque<Waiter>,
}

impl Record {
    fn is_empty(&self) -> bool {
        self.holder.is_none() && self.waiters.is_empty()
    }
}

/// What a caller asks the lock table.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Op {
    /// Take `lock` for `who`, or queue (`wait`), or answer [`Answer::NotGranted`].
    /// `reentrant`: how many holds one owner may stack (0: not reentrant).
    Acquire {
        /// The lock.
        lock: LockId,
        /// Who.
        who: Who,
        /// Lease asked for.
        lease_ms: u64,
        /// Reentrancy limit (0: off).
        reentrant: u32,
        /// Queue when held.
        wait: bool,
    },
    /// Leave one hold of `lock` (the holder's owner, with its token).
    Release {
        /// The lock.
        lock: LockId,
        /// The holder.
        who: Who,
        /// Its token.
        token: u64,
    },
    /// Extend the holder's lease.
    Renew {
        /// The lock.
        lock: LockId,
        /// The holder.
        who: Who,
        /// Its token.
        token: u64,
        /// The new lease, from now.
        lease_ms: u64,
    },
    /// Withdraw the acquire attempt `who` (its nonce): leave the queue, or release the lock
    /// if that attempt got it (a grant that raced with the caller giving up).
    Cancel {
        /// The lock.
        lock: LockId,
        /// The attempt.
        who: Who,
    },
    /// Whether `lock` is held (a read).
    IsLocked {
        /// The lock.
        lock: LockId,
    },
    /// The owner's own: a parked call was abandoned.
    Forget(CallId),
    /// The owner's own: free every lock whose lease ran out.
    Expire,
    /// The owner's own: drop the waiters of a departed member.
    MemberLeft(String),
}

/// What the lock table answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Answer {
    /// The lock is the caller's: its fencing token, its hold count, and whether the caller
    /// waited in the queue (then its lease started when it was woken, not when it asked).
    Granted {
        /// Fencing token.
        token: u64,
        /// Hold count (1 unless reentered).
        holds: u32,
        /// Whether the grant came from the queue.
        queued: bool,
    },
    /// Held by someone else (`try_lock`).
    NotGranted,
    /// Released; holds left (reentrant).
    Released(u32),
    /// Lease renewed.
    Renewed,
    /// Whether the lock is held.
    Locked(bool),
    /// Done (internal operations).
    Done,
}

/// A grant to the head of the queue, decided with the change that frees the lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Next {
    /// The waiter's call.
    pub call: CallId,
    /// Its token.
    pub token: u64,
}

/// A deterministic change to the table, replicated to the backups.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// `who` holds `lock` with `token` (a fresh grant, replacing an expired holder).
    Grant {
        /// The lock.
        lock: LockId,
        /// The holder.
        who: Who,
        /// Its token.
        token: u64,
        /// Its lease.
        lease_ms: u64,
    },
    /// The holder entered once more, lease renewed.
    Reenter {
        /// The lock.
        lock: LockId,
        /// Lease.
        lease_ms: u64,
    },
    /// The holder's lease starts again.
    Renew {
        /// The lock.
        lock: LockId,
        /// Lease.
        lease_ms: u64,
    },
    /// A waiter joins the queue (or replaces its own earlier entry, keeping its place).
    Park {
        /// The lock.
        lock: LockId,
        /// The waiter.
        waiter: Waiter,
    },
    /// Waiters leave the queue (by call).
    Unpark {
        /// The lock.
        lock: LockId,
        /// Their calls.
        calls: Vec<CallId>,
    },
    /// The holder leaves one hold.
    Exit {
        /// The lock.
        lock: LockId,
    },
    /// The lock is free: it goes to `next` (a waiter), after `dropped` waiters (whose calls
    /// are gone) leave the queue; with `refuse`, every waiter is sent away (no quorum).
    Free {
        /// The lock.
        lock: LockId,
        /// Waiters dropped first.
        dropped: Vec<CallId>,
        /// The next holder.
        next: Option<Next>,
        /// Send every waiter away.
        refuse: bool,
    },
    /// Several changes, in order.
    Many(Vec<Self>),
}

/// What applying a change asks the owner to do.
#[derive(Debug)]
pub enum Output {
    /// Answer a parked call.
    Wake(CallId, Result<Answer, LockError>),
    /// A lease ends at this instant (arm the expiry timer no later).
    Deadline(Instant),
}

/// How `decide` answers.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// At once.
    Now(Answer),
    /// Park the call until a change wakes it.
    Park,
}

/// What `decide` returns: the reply and the change to replicate.
#[derive(Debug, PartialEq, Eq)]
pub struct Decision {
    /// The caller's reply.
    pub reply: Reply,
    /// The change, if any.
    pub change: Option<Change>,
}

impl Decision {
    fn now(answer: Answer) -> Self {
        Self {
            reply: Reply::Now(answer),
            change: None,
        }
    }
    fn change(answer: Answer, change: Change) -> Self {
        Self {
            reply: Reply::Now(answer),
            change: Some(change),
        }
    }
}

/// What `decide` needs to know beside the table.
pub struct Env<'a> {
    /// Now.
    pub now: Instant,
    /// The partition's epoch.
    pub epoch: u64,
    /// The member this replica runs on.
    pub me: &'a str,
    /// The member whose caller asked (`None`: the runtime's own).
    pub caller: Option<&'a str>,
    /// The caller's call (to park it).
    pub call: Option<CallId>,
    /// `Err(NoQuorum)` when this member does not see a quorum.
    pub quorum: Result<(), LockError>,
    /// Whether a queued call is parked on this member and alive (owner-local knowledge:
    /// after a promotion, the queue's calls were parked on the old owner).
    pub live: &'a dyn Fn(CallId) -> bool,
    /// The smallest token this member may grant next, whatever the table says: the largest
    /// token of any earlier table of this partition the member threw away or replaced
    /// (member-local knowledge; 0 if none).
    pub floor: u64,
    /// Until when no lock of the partition may be granted unless this table records its
    /// holder: the member threw away a copy of the partition whose holders' leases may still
    /// run (member-local knowledge; `None` if none). Acquires wait (or `try_lock` is not
    /// granted) until then; [`Op::Expire`] grants them afterwards.
    pub quiet_until: Option<Instant>,
}

/// The lock table of one partition.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartitionLocks {
    /// Records by lock.
    pub records: HashMap<LockId, Record>,
    /// The largest fencing token granted in the partition.
    pub high_water: u64,
}

/// A partition's table as it travels (leases as the time they have left).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PartitionCopy {
    records: Vec<(LockId, Option<HoldCopy>, Vec<Waiter>)>,
    high_water: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct HoldCopy {
    who: Who,
    count: u32,
    token: u64,
    lease_ms: u64,
    remaining_ms: u64,
}

fn ms(d: u64) -> Duration {
    Duration::from_millis(d)
}

impl PartitionLocks {
    /// The next fencing token after `high_water` in `epoch`.
    fn next_token(high_water: u64, epoch: u64) -> u64 {
        (high_water + 1).max(epoch.saturating_mul(1 << 32))
    }

    fn check_caller(env: &Env<'_>, who: &Who) -> Result<(), LockError> {
        match env.caller {
            Some(c) if c == who.member => Ok(()),
            _ => Err(LockError::NotHolder),
        }
    }

    fn check_internal(env: &Env<'_>) -> Result<(), LockError> {
        match env.caller {
            Some(c) if c == env.me => Ok(()),
            _ => Err(LockError::NotHolder),
        }
    }

    /// Decides what `op` does, without changing anything.
    pub fn decide(&self, op: Op, env: &Env<'_>) -> Result<Decision, LockError> {
        match op {
            Op::Acquire {
                lock,
                who,
                lease_ms,
                reentrant,
                wait,
            } => self.acquire(lock, who, lease_ms, reentrant, wait, env),
            Op::Release { lock, who, token } => {
                Self::check_caller(env, &who)?;
                let hold = self
                    .records
                    .get(&lock)
                    .and_then(|r| r.holder.as_ref())
                    .filter(|h| h.who.same_owner(&who) && h.token == token)
                    .ok_or(LockError::NotHolder)?;
                if hold.count > 1 {
                    return Ok(Decision::change(
                        Answer::Released(hold.count - 1),
                        Change::Exit { lock },
                    ));
                }
                let mut high_water = self.high_water.max(env.floor);
                let free = self.free(&lock, &mut high_water, env);
                Ok(Decision::change(Answer::Released(0), free))
            }
            Op::Renew {
                lock,
                who,
                token,
                lease_ms,
            } => {
                Self::check_caller(env, &who)?;
                env.quorum.clone()?;
                let hold = self
                    .records
                    .get(&lock)
                    .and_then(|r| r.holder.as_ref())
                    .filter(|h| h.who.same_owner(&who) && h.token == token)
                    .ok_or(LockError::NotHolder)?;
                if hold.deadline <= env.now {
                    return Err(LockError::Lost);
                }
                Ok(Decision::change(
                    Answer::Renewed,
                    Change::Renew {
                        lock,
                        lease_ms: lease_ms.min(MAX_LEASE.as_millis() as u64),
                    },
                ))
            }
            Op::Cancel { lock, who } => {
                Self::check_caller(env, &who)?;
                let Some(record) = self.records.get(&lock) else {
                    return Ok(Decision::now(Answer::Done));
                };
                if let Some(h) = &record.holder {
                    if h.who == who && h.count == 1 {
                        let mut high_water = self.high_water.max(env.floor);
                        let free = self.free(&lock, &mut high_water, env);
                        return Ok(Decision::change(Answer::Done, free));
                    }
                }
                let calls: Vec<CallId> = record
                    .waiters
                    .iter()
                    .filter(|w| w.who == who)
                    .map(|w| w.call)
                    .collect();
                if calls.is_empty() {
                    return Ok(Decision::now(Answer::Done));
                }
                Ok(Decision::change(
                    Answer::Done,
                    Change::Unpark { lock, calls },
                ))
            }
            Op::IsLocked { lock } => Ok(Decision::now(Answer::Locked(
                self.is_locked(&lock, env.now),
            ))),
            Op::Forget(call) => {
                Self::check_internal(env)?;
                let found = self
                    .records
                    .iter()
                    .find(|(_, r)| r.waiters.iter().any(|w| w.call == call));
                Ok(match found {
                    Some((lock, _)) => Decision::change(
                        Answer::Done,
                        Change::Unpark {
                            lock: lock.clone(),
                            calls: vec![call],
                        },
                    ),
                    None => Decision::now(Answer::Done),
                })
            }
            Op::Expire => {
                Self::check_internal(env)?;
                let mut high_water = self.high_water.max(env.floor);
                let quiet = env.quiet_until.is_some_and(|q| env.now < q);
                // Holds whose lease ran out, and (once the partition is no longer quiet)
                // waiters of locks nobody holds.
                let mut expired: Vec<&LockId> = self
                    .records
                    .iter()
                    .filter(|(_, r)| match &r.holder {
                        Some(h) => h.deadline <= env.now,
                        None => !quiet && !r.waiters.is_empty(),
                    })
                    .map(|(l, _)| l)
                    .collect();
                // Deterministic order of the tokens.
                expired.sort();
                let changes: Vec<Change> = expired
                    .into_iter()
                    .map(|l| self.free(l, &mut high_water, env))
                    .collect();
                Ok(match changes.len() {
                    0 => Decision::now(Answer::Done),
                    _ => Decision::change(Answer::Done, Change::Many(changes)),
                })
            }
            Op::MemberLeft(member) => {
                Self::check_internal(env)?;
                let mut changes = Vec::new();
                for (lock, r) in &self.records {
                    let calls: Vec<CallId> = r
                        .waiters
                        .iter()
                        .filter(|w| w.who.member == member)
                        .map(|w| w.call)
                        .collect();
                    if !calls.is_empty() {
                        changes.push(Change::Unpark {
                            lock: lock.clone(),
                            calls,
                        });
                    }
                }
                Ok(match changes.len() {
                    0 => Decision::now(Answer::Done),
                    _ => Decision::change(Answer::Done, Change::Many(changes)),
                })
            }
        }
    }

    fn acquire(
        &self,
        lock: LockId,
        who: Who,
        lease_ms: u64,
        reentrant: u32,
        wait: bool,
        env: &Env<'_>,
    ) -> Result<Decision, LockError> {
        lock.check()?;
        Self::check_caller(env, &who)?;
        env.quorum.clone()?;
        let lease_ms = lease_ms.clamp(1, MAX_LEASE.as_millis() as u64);
        let record = self.records.get(&lock);
        let grant = |high_water: u64| {
            let token = Self::next_token(high_water, env.epoch);
            Decision::change(
                Answer::Granted {
                    token,
                    holds: 1,
                    queued: false,
                },
                Change::Grant {
                    lock: lock.clone(),
                    who: who.clone(),
                    token,
                    lease_ms,
                },
            )
        };
        let quiet = env.quiet_until.is_some_and(|q| env.now < q);
        let empty = Record::default();
        let record = match record {
            Some(r) => r,
            None if self.records.len() >= MAX_LOCKS_PER_PARTITION => {
                return Err(LockError::TooManyLocks {
                    limit: MAX_LOCKS_PER_PARTITION,
                });
            }
            None if !quiet => return Ok(grant(self.high_water.max(env.floor))),
            // A holder this table lost may still hold it: wait (below) as for a held lock.
            None => &empty,
        };
        match &record.holder {
            None if record.waiters.is_empty() && !quiet => {
                return Ok(grant(self.high_water.max(env.floor)))
            }
            Some(h) if h.who.same_owner(&who) => {
                if h.who.nonce == who.nonce {
                    // A retried acquire that got the lock: the same grant, lease renewed.
                    return Ok(Decision::change(
                        Answer::Granted {
                            token: h.token,
                            holds: h.count,
                            queued: false,
                        },
                        Change::Renew { lock, lease_ms },
                    ));
                }
                if reentrant == 0 {
                    return Err(LockError::NotReentrant);
                }
                if h.count >= reentrant {
                    return Err(LockError::TooManyHolds { limit: reentrant });
                }
                return Ok(Decision::change(
                    Answer::Granted {
                        token: h.token,
                        holds: h.count + 1,
                        queued: false,
                    },
                    Change::Reenter { lock, lease_ms },
                ));
            }
            Some(h) if h.deadline <= env.now && record.waiters.is_empty() && !quiet => {
                // The holder's lease ran out (its expiry is on its way): take it now.
                return Ok(grant(self.high_water.max(env.floor)));
            }
            _ => {}
        }
        if !wait {
            return Ok(Decision::now(Answer::NotGranted));
        }
        let call = env.call.ok_or(LockError::NotHolder)?;
        let again = record.waiters.iter().any(|w| w.who == who);
        if !again && record.waiters.len() >= MAX_WAITERS {
            return Err(LockError::TooManyWaiters { limit: MAX_WAITERS });
        }
        Ok(Decision {
            reply: Reply::Park,
            change: Some(Change::Park {
                lock,
                waiter: Waiter {
                    call,
                    who,
                    lease_ms,
                },
            }),
        })
    }

    /// The change that frees `lock` (held) and hands it to the first live waiter.
    fn free(&self, lock: &LockId, high_water: &mut u64, env: &Env<'_>) -> Change {
        let mut dropped = Vec::new();
        let mut next = None;
        let mut refuse = false;
        if let Some(record) = self.records.get(lock) {
            if !record.waiters.is_empty() && env.quorum.is_err() {
                refuse = true;
            } else {
                for w in &record.waiters {
                    if (env.live)(w.call) {
                        let token = Self::next_token(*high_water, env.epoch);
                        *high_water = token;
                        next = Some(Next {
                            call: w.call,
                            token,
                        });
                        break;
                    }
                    dropped.push(w.call);
                }
            }
        }
        Change::Free {
            lock: lock.clone(),
            dropped,
            next,
            refuse,
        }
    }

    /// Whether `lock` is held (and its lease not over) at `now`.
    pub fn is_locked(&self, lock: &LockId, now: Instant) -> bool {
        self.records
            .get(lock)
            .and_then(|r| r.holder.as_ref())
            .is_some_and(|h| h.deadline > now)
    }

    /// Applies a change (on every replica), returning what the owner should do.
    pub fn apply(&mut self, change: &Change, now: Instant) -> Vec<Output> {
        let mut out = Vec::new();
        self.apply_into(change, now, &mut out);
        out
    }

    fn apply_into(&mut self, change: &Change, now: Instant, out: &mut Vec<Output>) {
        match change {
            Change::Grant {
                lock,
                who,
                token,
                lease_ms,
            } => {
                let deadline = now + ms(*lease_ms);
                self.records.entry(lock.clone()).or_default().holder = Some(Hold {
                    who: who.clone(),
                    count: 1,
                    token: *token,
                    lease_ms: *lease_ms,
                    deadline,
                });
                self.high_water = self.high_water.max(*token);
                out.push(Output::Deadline(deadline));
            }
            Change::Reenter { lock, lease_ms } | Change::Renew { lock, lease_ms } => {
                if let Some(h) = self.records.get_mut(lock).and_then(|r| r.holder.as_mut()) {
                    if matches!(change, Change::Reenter { .. }) {
                        h.count = h.count.saturating_add(1);
                    }
                    h.lease_ms = *lease_ms;
                    h.deadline = h.deadline.max(now + ms(*lease_ms));
                    out.push(Output::Deadline(h.deadline));
                }
            }
            Change::Park { lock, waiter } => {
                let record = self.records.entry(lock.clone()).or_default();
                match record.waiters.iter_mut().find(|w| w.who == waiter.who) {
                    Some(w) => *w = waiter.clone(),
                    None => record.waiters.push_back(waiter.clone()),
                }
            }
            Change::Unpark { lock, calls } => {
                if let Some(r) = self.records.get_mut(lock) {
                    r.waiters.retain(|w| !calls.contains(&w.call));
                }
                self.remove_if_empty(lock);
            }
            Change::Exit { lock } => {
                if let Some(h) = self.records.get_mut(lock).and_then(|r| r.holder.as_mut()) {
                    h.count = h.count.saturating_sub(1).max(1);
                }
            }
            Change::Free {
                lock,
                dropped,
                next,
                refuse,
            } => {
                if let Some(r) = self.records.get_mut(lock) {
                    r.holder = None;
                    r.waiters.retain(|w| !dropped.contains(&w.call));
                    if *refuse {
                        for w in r.waiters.drain(..) {
                            out.push(Output::Wake(
                                w.call,
                                Err(LockError::NoQuorum { live: 0, needed: 0 }),
                            ));
                        }
                    }
                    if let Some(next) = next {
                        if let Some(i) = r.waiters.iter().position(|w| w.call == next.call) {
                            if let Some(w) = r.waiters.remove(i) {
                                let deadline = now + ms(w.lease_ms);
                                r.holder = Some(Hold {
                                    who: w.who,
                                    count: 1,
                                    token: next.token,
                                    lease_ms: w.lease_ms,
                                    deadline,
                                });
                                self.high_water = self.high_water.max(next.token);
                                out.push(Output::Deadline(deadline));
                                out.push(Output::Wake(
                                    next.call,
                                    Ok(Answer::Granted {
                                        token: next.token,
                                        holds: 1,
                                        queued: true,
                                    }),
                                ));
                            }
                        }
                    }
                }
                self.remove_if_empty(lock);
            }
            Change::Many(changes) => {
                for c in changes {
                    self.apply_into(c, now, out);
                }
            }
        }
    }

    fn remove_if_empty(&mut self, lock: &LockId) {
        if self.records.get(lock).is_some_and(Record::is_empty) {
            self.records.remove(lock);
        }
    }

    /// The earliest lease deadline, if any lock is held.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.records
            .values()
            .filter_map(|r| r.holder.as_ref().map(|h| h.deadline))
            .min()
    }

    /// The latest lease deadline, if any lock is held.
    pub fn next_deadline_max(&self) -> Option<Instant> {
        self.records
            .values()
            .filter_map(|r| r.holder.as_ref().map(|h| h.deadline))
            .max()
    }

    /// Whether some waiter belongs to `member`.
    pub fn has_waiters_of(&self, member: &str) -> bool {
        self.records
            .values()
            .any(|r| r.waiters.iter().any(|w| w.who.member == member))
    }

    /// A new owner takes over: no lease ends before a whole lease from `now` (the old
    /// owner may have granted or renewed one a moment ago that this replica counted from
    /// earlier). Returns the earliest deadline.
    pub fn restart_leases(&mut self, now: Instant) -> Option<Instant> {
        for r in self.records.values_mut() {
            if let Some(h) = &mut r.holder {
                h.deadline = h.deadline.max(now + ms(h.lease_ms));
            }
        }
        self.next_deadline()
    }

    /// The table as it travels, leases as time left at `now`.
    pub fn to_copy(&self, now: Instant) -> PartitionCopy {
        let mut records: Vec<_> = self
            .records
            .iter()
            .map(|(lock, r)| {
                let hold = r.holder.as_ref().map(|h| HoldCopy {
                    who: h.who.clone(),
                    count: h.count,
                    token: h.token,
                    lease_ms: h.lease_ms,
                    remaining_ms: h.deadline.saturating_duration_since(now).as_millis() as u64,
                });
                (lock.clone(), hold, r.waiters.iter().cloned().collect())
            })
            .collect();
        records.sort_by(|a, b| a.0.cmp(&b.0));
        PartitionCopy {
            records,
            high_water: self.high_water,
        }
    }

    /// The table a copy describes, leases counted from `now` (a copy arrives after it was
    /// taken, so leases end no earlier than on the replica it came from). Checks the
    /// bounds: a copy comes from the network.
    pub fn from_copy(copy: PartitionCopy, now: Instant) -> Result<Self, LockError> {
        if copy.records.len() > MAX_LOCKS_PER_PARTITION {
            return Err(LockError::BadCopy("too many locks".into()));
        }
        let mut records = HashMap::with_capacity(copy.records.len());
        for (lock, hold, waiters) in copy.records {
            lock.check()
                .map_err(|e| LockError::BadCopy(e.to_string()))?;
            if waiters.len() > MAX_WAITERS {
                return Err(LockError::BadCopy("too many waiters".into()));
            }
            let holder = hold.map(|h| Hold {
                who: h.who,
                count: h.count,
                token: h.token,
                lease_ms: h.lease_ms.min(MAX_LEASE.as_millis() as u64),
                deadline: now + ms(h.remaining_ms.min(MAX_LEASE.as_millis() as u64)),
            });
            records.insert(
                lock,
                Record {
                    holder,
                    waiters: waiters.into(),
                },
            );
        }
        Ok(Self {
            records,
            high_water: copy.high_water,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lock(name: &str) -> LockId {
        LockId {
            name: name.into(),
            key: Vec::new(),
        }
    }

    fn who(member: &str, owner: u64, nonce: u64) -> Who {
        Who {
            member: member.into(),
            generation: 1,
            owner,
            nonce,
        }
    }

    impl<'a> Env<'a> {
        fn with_now(self, now: Instant) -> Self {
            Self { now, ..self }
        }
    }

    fn all_live(_: CallId) -> bool {
        true
    }

    fn env<'a>(now: Instant, caller: &'a str, call: u64) -> Env<'a> {
        Env {
            now,
            epoch: 0,
            me: "owner",
            caller: Some(caller),
            call: Some(CallId(call)),
            quorum: Ok(()),
            live: &all_live,
            floor: 0,
            quiet_until: None,
        }
    }

    fn acquire(l: &str, w: Who, wait: bool) -> Op {
        Op::Acquire {
            lock: lock(l),
            who: w,
            lease_ms: 1_000,
            reentrant: 0,
            wait,
        }
    }

    /// Decides and applies; returns the reply and the outputs.
    fn run(t: &mut PartitionLocks, op: Op, e: &Env<'_>) -> Result<(Reply, Vec<Output>), LockError> {
        let d = t.decide(op, e)?;
        let out = d.change.map(|c| t.apply(&c, e.now)).unwrap_or_default();
        Ok((d.reply, out))
    }

    fn granted(reply: &Reply) -> u64 {
        match reply {
            Reply::Now(Answer::Granted { token, .. }) => *token,
            other => panic!("not granted: {other:?}"),
        }
    }

    fn woken(out: &[Output]) -> Vec<(CallId, u64)> {
        out.iter()
            .filter_map(|o| match o {
                Output::Wake(c, Ok(Answer::Granted { token, .. })) => Some((*c, *token)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_free_lock_is_granted_and_released_and_its_record_removed() {
        let now = Instant::now();
        let mut t = PartitionLocks::default();
        let (r, out) = run(
            &mut t,
            acquire("a", who("m1", 1, 1), true),
            &env(now, "m1", 1),
        )
        .unwrap();
        assert_eq!(granted(&r), 1);
        assert!(matches!(out[..], [Output::Deadline(d)] if d == now + ms(1_000)));
        assert!(t.is_locked(&lock("a"), now));
        let (r, _) = run(
            &mut t,
            Op::Release {
                lock: lock("a"),
                who: who("m1", 1, 1),
                token: 1,
            },
            &env(now, "m1", 2),
        )
        .unwrap();
        assert_eq!(r, Reply::Now(Answer::Released(0)));
        assert!(t.records.is_empty());
        assert_eq!(t.high_water, 1);
        // The counter survives the record.
        let (r, _) = run(
            &mut t,
            acquire("a", who("m1", 1, 3), true),
            &env(now, "m1", 3),
        )
        .unwrap();
        assert_eq!(granted(&r), 2);
    }

    #[test]
    fn waiters_are_granted_in_arrival_order_with_growing_tokens() {
        let now = Instant::now();
        let mut t = PartitionLocks::default();
        run(
            &mut t,
            acquire("a", who("m1", 1, 1), true),
            &env(now, "m1", 1),
        )
        .unwrap();
        for i in 2..=4 {
            let (r, _) = run(
                &mut t,
                acquire("a", who("m2", i, i), true),
                &env(now, "m2", i),
            )
            .unwrap();
            assert_eq!(r, Reply::Park);
        }
        let mut holder = (who("m1", 1, 1), 1);
        for expect in 2..=4 {
            let (_, out) = run(
                &mut t,
                Op::Release {
                    lock: lock("a"),
                    who: holder.0.clone(),
                    token: holder.1,
                },
                &env(now, &holder.0.member.clone(), 99),
            )
            .unwrap();
            let w = woken(&out);
            assert_eq!(w, vec![(CallId(expect), expect)]);
            holder = (who("m2", expect, expect), expect);
        }
        assert!(t.records[&lock("a")].waiters.is_empty());
    }

    #[test]
    fn try_lock_on_a_held_lock_is_not_granted_and_changes_nothing() {
        let now = Instant::now();
        let mut t = PartitionLocks::default();
        run(
            &mut t,
            acquire("a", who("m1", 1, 1), true),
            &env(now, "m1", 1),
        )
        .unwrap();
        let before = t.clone();
        let d = t
            .decide(acquire("a", who("m2", 2, 2), false), &env(now, "m2", 2))
            .unwrap();
        assert_eq!(d, Decision::now(Answer::NotGranted));
        assert_eq!(t, before);
    }

    #[test]
    fn a_forged_or_stale_release_is_refused() {
        let now = Instant::now();
        let mut t = PartitionLocks::default();
        run(
            &mut t,
            acquire("a", who("m1", 1, 1), true),
            &env(now, "m1", 1),
        )
        .unwrap();
        // Another member claiming to be the holder.
        let forged = Op::Release {
            lock: lock("a"),
            who: who("m1", 1, 1),
            token: 1,
        };
        assert_eq!(
            t.decide(forged, &env(now, "m2", 2)),
            Err(LockError::NotHolder)
        );
        // Another owner on the holder's member.
        let other = Op::Release {
            lock: lock("a"),
            who: who("m1", 7, 7),
            token: 1,
        };
        assert_eq!(
            t.decide(other, &env(now, "m1", 2)),
            Err(LockError::NotHolder)
        );
        // A stale token.
        let stale = Op::Release {
            lock: lock("a"),
            who: who("m1", 1, 1),
            token: 0,
        };
        assert_eq!(
            t.decide(stale, &env(now, "m1", 2)),
            Err(LockError::NotHolder)
        );
        // A renewal by a stranger.
        let renew = Op::Renew {
            lock: lock("a"),
            who: who("m2", 1, 1),
            token: 1,
            lease_ms: 5,
        };
        assert_eq!(
            t.decide(renew, &env(now, "m2", 2)),
            Err(LockError::NotHolder)
        );
        // Internal operations from outside.
        assert_eq!(
            t.decide(Op::Expire, &env(now, "m2", 2)),
            Err(LockError::NotHolder)
        );
        assert_eq!(
            t.decide(Op::Forget(CallId(1)), &env(now, "m2", 2)),
            Err(LockError::NotHolder)
        );
        assert!(t.is_locked(&lock("a"), now));
    }

    #[test]
    fn reentrancy_only_when_asked_and_up_to_the_limit() {
        let now = Instant::now();
        let mut t = PartitionLocks::default();
        run(
            &mut t,
            acquire("a", who("m1", 1, 1), true),
            &env(now, "m1", 1),
        )
        .unwrap();
        assert_eq!(
            t.decide(acquire("a", who("m1", 1, 2), true), &env(now, "m1", 2)),
            Err(LockError::NotReentrant)
        );
        let re = |nonce| Op::Acquire {
            lock: lock("a"),
            who: who("m1", 1, nonce),
            lease_ms: 1_000,
            reentrant: 2,
            wait: true,
        };
        let (r, _) = run(&mut t, re(2), &env(now, "m1", 2)).unwrap();
        assert_eq!(
            r,
            Reply::Now(Answer::Granted {
                token: 1,
                holds: 2,
                queued: false
            })
        );
        assert_eq!(
            t.decide(re(3), &env(now, "m1", 3)),
            Err(LockError::TooManyHolds { limit: 2 })
        );
        let release = Op::Release {
            lock: lock("a"),
            who: who("m1", 1, 9),
            token: 1,
        };
        let (r, _) = run(&mut t, release.clone(), &env(now, "m1", 4)).unwrap();
        assert_eq!(r, Reply::Now(Answer::Released(1)));
        let (r, _) = run(&mut t, release, &env(now, "m1", 5)).unwrap();
        assert_eq!(r, Reply::Now(Answer::Released(0)));
        assert!(t.records.is_empty());
    }

    #[test]
    fn a_retried_acquire_gets_the_same_grant_and_a_retried_park_keeps_its_place() {
        let now = Instant::now();
        let mut t = PartitionLocks::default();
        let (r, _) = run(
            &mut t,
            acquire("a", who("m1", 1, 1), true),
            &env(now, "m1", 1),
        )
        .unwrap();
        let (r2, _) = run(
            &mut t,
            acquire("a", who("m1", 1, 1), true),
            &env(now, "m1", 2),
        )
        .unwrap();
        assert_eq!(granted(&r), granted(&r2));
        run(
            &mut t,
            acquire("a", who("m2", 2, 2), true),
            &env(now, "m2", 3),
        )
        .unwrap();
        run(
            &mut t,
            acquire("a", who("m3", 3, 3), true),
            &env(now, "m3", 4),
        )
        .unwrap();
        // m2 retries (new call): same place.
        run(
            &mut t,
            acquire("a", who("m2", 2, 2), true),
            &env(now, "m2", 5),
        )
        .unwrap();
        let calls: Vec<_> = t.records[&lock("a")]
            .waiters
            .iter()
            .map(|w| w.call)
            .collect();
        assert_eq!(calls, vec![CallId(5), CallId(4)]);
    }

    #[test]
    fn cancel_leaves_the_queue_or_releases_a_raced_grant() {
        let now = Instant::now();
        let mut t = PartitionLocks::default();
        run(
            &mut t,
            acquire("a", who("m1", 1, 1), true),
            &env(now, "m1", 1),
        )
        .unwrap();
        run(
            &mut t,
            acquire("a", who("m2", 2, 2), true),
            &env(now, "m2", 2),
        )
        .unwrap();
        run(
            &mut t,
            Op::Cancel {
                lock: lock("a"),
                who: who("m2", 2, 2),
            },
            &env(now, "m2", 3),
        )
        .unwrap();
        assert!(t.records[&lock("a")].waiters.is_empty());
        run(
            &mut t,
            Op::Cancel {
                lock: lock("a"),
                who: who("m1", 1, 1),
            },
            &env(now, "m1", 4),
        )
        .unwrap();
        assert!(t.records.is_empty());
    }

    #[test]
    fn forget_removes_an_abandoned_waiter_and_member_left_removes_its_waiters() {
        let now = Instant::now();
        let mut t = PartitionLocks::default();
        run(
            &mut t,
            acquire("a", who("m1", 1, 1), true),
            &env(now, "m1", 1),
        )
        .unwrap();
        run(
            &mut t,
            acquire("a", who("m2", 2, 2), true),
            &env(now, "m2", 2),
        )
        .unwrap();
        run(
            &mut t,
            acquire("a", who("m3", 3, 3), true),
            &env(now, "m3", 3),
        )
        .unwrap();
        run(&mut t, Op::Forget(CallId(2)), &env(now, "owner", 0)).unwrap();
        assert_eq!(t.records[&lock("a")].waiters.len(), 1);
        run(&mut t, Op::MemberLeft("m3".into()), &env(now, "owner", 0)).unwrap();
        assert!(t.records[&lock("a")].waiters.is_empty());
        assert!(!t.has_waiters_of("m3"));
    }

    #[test]
    fn an_expired_lease_frees_the_lock_for_the_next_waiter() {
        let now = Instant::now();
        let mut t = PartitionLocks::default();
        run(
            &mut t,
            acquire("a", who("m1", 1, 1), true),
            &env(now, "m1", 1),
        )
        .unwrap();
        run(
            &mut t,
            acquire("a", who("m2", 2, 2), true),
            &env(now, "m2", 2),
        )
        .unwrap();
        assert_eq!(t.next_deadline(), Some(now + ms(1_000)));
        // Not yet.
        let d = t
            .decide(Op::Expire, &env(now + ms(999), "owner", 0))
            .unwrap();
        assert_eq!(d.change, None);
        let later = now + ms(1_000);
        let (_, out) = run(&mut t, Op::Expire, &env(later, "owner", 0)).unwrap();
        assert_eq!(woken(&out), vec![(CallId(2), 2)]);
        // The old holder can neither renew nor release.
        let renew = Op::Renew {
            lock: lock("a"),
            who: who("m1", 1, 1),
            token: 1,
            lease_ms: 5,
        };
        assert_eq!(
            t.decide(renew, &env(later, "m1", 3)),
            Err(LockError::NotHolder)
        );
    }

    #[test]
    fn an_expired_holder_without_waiters_is_replaced_at_once() {
        let now = Instant::now();
        let mut t = PartitionLocks::default();
        run(
            &mut t,
            acquire("a", who("m1", 1, 1), true),
            &env(now, "m1", 1),
        )
        .unwrap();
        let later = now + ms(1_001);
        let (r, _) = run(
            &mut t,
            acquire("a", who("m2", 2, 2), false),
            &env(later, "m2", 2),
        )
        .unwrap();
        assert_eq!(granted(&r), 2);
    }

    #[test]
    fn renewal_extends_the_lease_and_needs_a_quorum() {
        let now = Instant::now();
        let mut t = PartitionLocks::default();
        run(
            &mut t,
            acquire("a", who("m1", 1, 1), true),
            &env(now, "m1", 1),
        )
        .unwrap();
        let renew = Op::Renew {
            lock: lock("a"),
            who: who("m1", 1, 1),
            token: 1,
            lease_ms: 1_000,
        };
        let at = now + ms(500);
        run(&mut t, renew.clone(), &env(at, "m1", 2)).unwrap();
        assert_eq!(t.next_deadline(), Some(at + ms(1_000)));
        let mut minority = env(at, "m1", 3);
        minority.quorum = Err(LockError::NoQuorum { live: 1, needed: 2 });
        assert_eq!(
            t.decide(renew, &minority),
            Err(LockError::NoQuorum { live: 1, needed: 2 })
        );
        assert!(matches!(
            t.decide(acquire("b", who("m1", 1, 4), true), &minority),
            Err(LockError::NoQuorum { .. })
        ));
    }

    #[test]
    fn without_quorum_a_release_sends_the_waiters_away() {
        let now = Instant::now();
        let mut t = PartitionLocks::default();
        run(
            &mut t,
            acquire("a", who("m1", 1, 1), true),
            &env(now, "m1", 1),
        )
        .unwrap();
        run(
            &mut t,
            acquire("a", who("m2", 2, 2), true),
            &env(now, "m2", 2),
        )
        .unwrap();
        let mut minority = env(now, "m1", 3);
        minority.quorum = Err(LockError::NoQuorum { live: 1, needed: 2 });
        let (_, out) = run(
            &mut t,
            Op::Release {
                lock: lock("a"),
                who: who("m1", 1, 1),
                token: 1,
            },
            &minority,
        )
        .unwrap();
        assert!(matches!(
            out[..],
            [Output::Wake(CallId(2), Err(LockError::NoQuorum { .. }))]
        ));
        assert!(t.records.is_empty());
    }

    #[test]
    fn waiters_whose_calls_are_gone_are_skipped() {
        let now = Instant::now();
        let mut t = PartitionLocks::default();
        run(
            &mut t,
            acquire("a", who("m1", 1, 1), true),
            &env(now, "m1", 1),
        )
        .unwrap();
        run(
            &mut t,
            acquire("a", who("m2", 2, 2), true),
            &env(now, "m2", 2),
        )
        .unwrap();
        run(
            &mut t,
            acquire("a", who("m3", 3, 3), true),
            &env(now, "m3", 3),
        )
        .unwrap();
        let only_3 = |c: CallId| c == CallId(3);
        let mut e = env(now, "m1", 4);
        e.live = &only_3;
        let (_, out) = run(
            &mut t,
            Op::Release {
                lock: lock("a"),
                who: who("m1", 1, 1),
                token: 1,
            },
            &e,
        )
        .unwrap();
        assert_eq!(woken(&out), vec![(CallId(3), 2)]);
        assert!(t.records[&lock("a")].waiters.is_empty());
    }

    #[test]
    fn tokens_jump_to_the_epoch_and_survive_a_copy() {
        let now = Instant::now();
        let mut t = PartitionLocks::default();
        run(
            &mut t,
            acquire("a", who("m1", 1, 1), true),
            &env(now, "m1", 1),
        )
        .unwrap();
        let copy = t.to_copy(now + ms(400));
        let bytes = grid_core::codec::encode(&copy).unwrap();
        let back: PartitionCopy = grid_core::codec::decode(&bytes).unwrap();
        let mut moved = PartitionLocks::from_copy(back, now + ms(500)).unwrap();
        // 600 ms were left at the copy, counted again from its arrival.
        assert_eq!(moved.next_deadline(), Some(now + ms(1_100)));
        assert_eq!(moved.high_water, 1);
        // A promotion waits a whole lease.
        assert_eq!(moved.restart_leases(now + ms(800)), Some(now + ms(1_800)));
        // A new epoch starts above every token of the old ones.
        let mut e = env(now + ms(2_000), "m2", 2);
        e.epoch = 3;
        let (r, _) = run(&mut moved, acquire("b", who("m2", 2, 2), true), &e).unwrap();
        assert_eq!(granted(&r), 3 << 32);
        let (r, _) = run(&mut moved, acquire("c", who("m2", 2, 3), true), &e).unwrap();
        assert_eq!(granted(&r), (3 << 32) + 1);
    }

    #[test]
    fn a_quiet_partition_grants_nothing_it_has_no_holder_for_until_it_ends() {
        let mut t = PartitionLocks::default();
        let now = Instant::now();
        let quiet = |now: Instant, call: u64| Env {
            quiet_until: Some(now + Duration::from_secs(5)),
            ..env(now, "a", call)
        };
        // A free lock is not granted to a try, and a waiter queues.
        let (reply, _) = run(&mut t, acquire("x", who("a", 1, 1), false), &quiet(now, 1)).unwrap();
        assert_eq!(reply, Reply::Now(Answer::NotGranted));
        let (reply, _) = run(&mut t, acquire("x", who("a", 1, 2), true), &quiet(now, 2)).unwrap();
        assert_eq!(reply, Reply::Park);
        // Still quiet: expiry leaves the waiter.
        let (_, out) = run(
            &mut t,
            Op::Expire,
            &Env {
                caller: Some("owner"),
                ..quiet(now, 0)
            },
        )
        .unwrap();
        assert!(woken(&out).is_empty());
        // Once it ends, expiry grants the waiter.
        let later = now + Duration::from_secs(5);
        let (_, out) = run(
            &mut t,
            Op::Expire,
            &Env {
                caller: Some("owner"),
                ..quiet(now, 0).with_now(later)
            },
        )
        .unwrap();
        assert_eq!(woken(&out).len(), 1);
    }

    #[test]
    fn bounds_are_enforced() {
        let now = Instant::now();
        let long = LockId {
            name: "x".repeat(256),
            key: Vec::new(),
        };
        assert_eq!(long.check(), Err(LockError::NameTooLong { len: 256 }));
        let mut t = PartitionLocks::default();
        run(
            &mut t,
            acquire("a", who("m1", 1, 1), true),
            &env(now, "m1", 1),
        )
        .unwrap();
        for i in 0..MAX_WAITERS as u64 {
            run(
                &mut t,
                acquire("a", who("m2", 10 + i, 10 + i), true),
                &env(now, "m2", 10 + i),
            )
            .unwrap();
        }
        assert_eq!(
            t.decide(acquire("a", who("m2", 1, 1), true), &env(now, "m2", 1)),
            Err(LockError::TooManyWaiters { limit: MAX_WAITERS })
        );
    }
}
