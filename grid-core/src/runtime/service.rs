//! The service interface: what a partitioned service (cache, locks, executor, scheduler)
//! gives the runtime so that the runtime can route its operations, replicate their effects,
//! move its partitions, and drive its timers, hooks and owner-side tasks.
//!
//! # The contract
//!
//! The runtime owns ordering, durability and ownership; the service owns its data and its
//! rules. Everything a service is told comes with a [`Ctx`]: the partition, its epoch and
//! version, the table version, the member that asked, and `now` from the runtime's clock
//! ([`crate::clock`]), so that a test or the simulator drives time.
//!
//! - **Reads** ([`PartitionService::read`]) run on the owner *without* the partition's lock,
//!   possibly beside a write. They must only read state, and they see only what
//!   [`PartitionService::apply`] made visible, which is acknowledged state: a change is
//!   applied on the owner only after every live synchronous backup has it.
//! - **Writes** run in two steps on the owner, one at a time per partition (under its lock):
//!   [`PartitionService::prepare`] decides the answer and the *change*, a deterministic
//!   record of the effect ("set k to v", never "put if absent"), without touching the data;
//!   the runtime sends the change to the synchronous backups, waits for them, and then calls
//!   [`PartitionService::apply`] on the owner. Backups call `apply` with
//!   [`Role::Backup`], in version order.
//! - **Parking**: `prepare` may answer [`Reply::Park`]: the caller waits until a later
//!   `apply` or hook wakes it with [`Effects::wake`] and its [`CallId`] (a lock request
//!   waits for the lock). A caller that gives up (its deadline, or it dropped the call)
//!   is reported to [`PartitionService::on_abandoned`]; a parked call whose partition moves
//!   to another owner is told to retry there.
//! - **Effects** ([`Effects`]), returned by `apply` on the owner and by every hook: wake a
//!   parked caller, send a message to a member, arm or cancel a timer of the partition, or
//!   submit an operation of the service's own (it then runs through the write path like a
//!   caller's: replicated before it is applied). On a backup they are discarded: only the
//!   owner acts, so that each effect happens once.
//! - **Hooks**, all on the owner under the partition's lock, in the order the runtime sees
//!   the events: [`PartitionService::on_owned`] when the partition becomes owned here (the
//!   first table, a migration, a promotion), [`PartitionService::on_disowned`] when it
//!   stops being owned here, [`PartitionService::on_member_left`] for every owned partition
//!   when a member leaves or fails, [`PartitionService::on_timer`] when a timer armed on
//!   the partition fires. Timers and parked calls belong to the owner: when ownership
//!   moves they are dropped, and the new owner's `on_owned` re-arms what the replicated
//!   state needs (a lease).
//! - **Owner tasks** ([`PartitionService::owner_task`]): a future per owned partition that
//!   the runtime starts when the partition becomes owned here and drops when it stops being
//!   owned (an executor's processing loop).
//! - **Messages** ([`PartitionService::Message`]): one-way, ordered per pair of members,
//!   at most once, routed by the runtime to the same service on the other member
//!   ([`ServiceHandle::send`], [`PartitionService::on_message`]); or a request that gets an
//!   answer ([`ServiceHandle::ask`], [`PartitionService::on_ask`]).
//! - **Copies**: [`PartitionService::snapshot`], [`PartitionService::rebuild`] and
//!   [`PartitionService::install`] move a partition's whole state (migrations, resyncs).
//!
//! Operations, changes, answers, errors and messages are the service's own serde types:
//! the runtime encodes them (MessagePack) and a service's error reaches its caller typed.
//!
//! # Example: a replicated register that also counts writes and expires
//!
//! A register per partition: `Set` writes it and counts the write, `Get` reads it, `WaitFor`
//! parks until the register holds a value, and a timer clears it a while after each write.
//! It shows every hook.
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use std::time::Duration;
//! use grid_core::runtime::service::*;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize)]
//! enum Op { Set(String), Get, WaitFor, Clear, Forget(CallId) }
//! #[derive(Serialize, Deserialize)]
//! enum Change { Set(String), Park(CallId), Clear, Forget(CallId) }
//! #[derive(Debug, thiserror::Error, Serialize, Deserialize)]
//! #[error("register: {0}")]
//! struct RegisterError(String);
//!
//! #[derive(Default, Clone, Serialize, Deserialize)]
//! struct State { value: Option<String>, writes: u64, waiting: Vec<CallId> }
//!
//! #[derive(Default)]
//! struct Register { parts: Mutex<Vec<State>>, lost: Mutex<Vec<String>> }
//!
//! const CLEAR_TIMER: u64 = 1;
//!
//! impl PartitionService for Register {
//!     type Op = Op;
//!     type Change = Change;
//!     type Answer = Option<String>;
//!     type Error = RegisterError;
//!     type Message = String;
//!
//!     fn name(&self) -> &str { "register" }
//!
//!     fn read(&self, ctx: &Ctx, op: &Op) -> Result<Option<String>, RegisterError> {
//!         match op {
//!             Op::Get => Ok(self.parts.lock().unwrap()[ctx.partition as usize].value.clone()),
//!             _ => Err(RegisterError("not a read".into())),
//!         }
//!     }
//!
//!     fn prepare(&self, ctx: &Ctx, op: Op) -> Result<Prepared<Self>, RegisterError> {
//!         let state = self.parts.lock().unwrap()[ctx.partition as usize].clone();
//!         Ok(match op {
//!             Op::Set(v) => Prepared::change(state.value, Change::Set(v)),
//!             Op::Get => Prepared::answer(state.value),
//!             Op::Clear => Prepared::change(state.value, Change::Clear),
//!             Op::Forget(call) => Prepared::change(None, Change::Forget(call)),
//!             // Already set: answer at once. Otherwise park; the waiter is replicated
//!             // state, so a promoted backup knows it too.
//!             Op::WaitFor => match state.value {
//!                 Some(v) => Prepared::answer(Some(v)),
//!                 None => Prepared::park(Change::Park(ctx.call.expect("a caller's op"))),
//!             },
//!         })
//!     }
//!
//!     fn apply(&self, ctx: &Ctx, change: &Change, fx: &mut Effects<Self>) -> Result<(), RegisterError> {
//!         let mut parts = self.parts.lock().unwrap();
//!         let state = &mut parts[ctx.partition as usize];
//!         match change {
//!             Change::Set(v) => {
//!                 state.value = Some(v.clone());
//!                 state.writes += 1;
//!                 for call in state.waiting.drain(..) {
//!                     fx.wake(call, Ok(Some(v.clone())));
//!                 }
//!                 fx.arm_timer(CLEAR_TIMER, ctx.now + Duration::from_secs(60));
//!             }
//!             Change::Park(call) => state.waiting.push(*call),
//!             Change::Clear => {
//!                 state.value = None;
//!                 fx.cancel_timer(CLEAR_TIMER);
//!             }
//!             Change::Forget(call) => state.waiting.retain(|c| c != call),
//!         }
//!         Ok(())
//!     }
//!
//!     fn on_owned(&self, ctx: &Ctx, fx: &mut Effects<Self>) {
//!         // Timers are the owner's: a new owner re-arms what its state needs.
//!         if self.parts.lock().unwrap()[ctx.partition as usize].value.is_some() {
//!             fx.arm_timer(CLEAR_TIMER, ctx.now + Duration::from_secs(60));
//!         }
//!     }
//!
//!     fn on_disowned(&self, _partition: u32) {}
//!
//!     fn on_timer(&self, _ctx: &Ctx, timer: u64, fx: &mut Effects<Self>) {
//!         // State changes go through the write path, replicated like a caller's.
//!         if timer == CLEAR_TIMER {
//!             fx.submit(Op::Clear);
//!         }
//!     }
//!
//!     fn on_member_left(&self, _ctx: &Ctx, member: &str, fx: &mut Effects<Self>) {
//!         // Tell someone (here: ourselves, as an example of a message).
//!         fx.send(member.into(), format!("{member} left"));
//!     }
//!
//!     fn on_abandoned(&self, _ctx: &Ctx, call: CallId, fx: &mut Effects<Self>) {
//!         // The waiter is replicated state: forgetting it is a change like any other.
//!         fx.submit(Op::Forget(call));
//!     }
//!
//!     fn on_message(&self, _from: &str, message: String) {
//!         self.lost.lock().unwrap().push(message);
//!     }
//!
//!     fn snapshot(&self, p: u32, _chunk_bytes: usize) -> Snapshot {
//!         let state = self.parts.lock().unwrap()[p as usize].clone();
//!         vec![grid_core::codec::encode(&state).unwrap().into()]
//!     }
//!
//!     fn rebuild(&self, _p: u32, chunks: Vec<bytes::Bytes>) -> Result<Rebuilt, RegisterError> {
//!         let chunk = chunks.first().ok_or_else(|| RegisterError("empty copy".into()))?;
//!         let state: State = grid_core::codec::decode(chunk)
//!             .map_err(|e| RegisterError(e.to_string()))?;
//!         Ok(Box::new(state))
//!     }
//!
//!     fn install(&self, p: u32, rebuilt: Rebuilt) -> Result<(), RegisterError> {
//!         let state = rebuilt.downcast::<State>().map_err(|_| RegisterError("not ours".into()))?;
//!         self.parts.lock().unwrap()[p as usize] = *state;
//!         Ok(())
//!     }
//!
//!     fn drop_partition(&self, p: u32) {
//!         self.parts.lock().unwrap()[p as usize] = State::default();
//!     }
//!
//!     fn partition_len(&self, p: u32) -> usize {
//!         self.parts.lock().unwrap()[p as usize].value.is_some() as usize
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> anyhow::Result<()> {
//! # let (runtime, _member) = grid_core::runtime::single_member_runtime_for_docs(7).await?;
//! let register = Arc::new(Register::default());
//! *register.parts.lock().unwrap() = vec![State::default(); 7];
//! let handle = runtime.register_service(register.clone());
//! runtime.wait_for_owner(3).await;
//!
//! // A parked call, woken by a later write.
//! let waiter = {
//!     let handle = handle.clone();
//!     tokio::spawn(async move { handle.execute(3, Op::WaitFor, OpKind::Write).await })
//! };
//! handle.execute(3, Op::Set("hello".into()), OpKind::Write).await??;
//! assert_eq!(waiter.await??.unwrap(), Some("hello".to_string()));
//! assert_eq!(handle.execute(3, Op::Get, OpKind::Read).await??, Some("hello".into()));
//! assert_eq!(register.parts.lock().unwrap()[3].writes, 1);
//! # Ok(())
//! # }
//! ```

use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::time::Instant;

pub use super::OpKind;

/// A partition's state as chunks (see [`PartitionService::snapshot`]).
pub type Snapshot = Vec<bytes::Bytes>;

/// A partition's state rebuilt from a snapshot, not yet in place (see
/// [`PartitionService::rebuild`]); only the service that built it knows its type.
pub type Rebuilt = Box<dyn std::any::Any + Send>;

/// A future the runtime runs for a service (see [`PartitionService::owner_task`]).
pub type OwnerTask = futures::future::BoxFuture<'static, ()>;

/// Identifies one call of an operation on its owner: unique in the member for the life of
/// the runtime. A service that parks a call keeps it to wake the call later.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct CallId(pub u64);

/// Which replica a call happens on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The partition's owner: effects are carried out.
    Owner,
    /// A backup (or a migration's destination): effects are discarded.
    Backup,
}

/// What the runtime tells a service with every call.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// The partition.
    pub partition: u32,
    /// The partition's epoch (the number of owner changes it went through).
    pub epoch: u64,
    /// The replica's version: the number of changes applied in this epoch (for `apply`,
    /// the version of the change being applied).
    pub version: u64,
    /// The version of the table the runtime acts on.
    pub table_version: u64,
    /// The member this replica runs on.
    pub member: Arc<str>,
    /// The member whose caller asked (for `read` and `prepare`; `None` for the runtime's
    /// own calls: hooks, timers, backups).
    pub caller: Option<Arc<str>>,
    /// The call (for `prepare` of a caller's operation; see [`Reply::Park`]).
    pub call: Option<CallId>,
    /// Now, on the runtime's clock.
    pub now: Instant,
    /// Owner or backup.
    pub role: Role,
}

/// How `prepare` answers the caller.
#[derive(Debug)]
pub enum Reply<A> {
    /// With this answer, once the change (if any) is replicated and applied.
    Now(A),
    /// Later: the caller waits for an [`Effects::wake`] of its [`CallId`] (the change, if
    /// any, is replicated and applied first).
    Park,
}

/// What [`PartitionService::prepare`] decided.
pub struct Prepared<S: PartitionService + ?Sized> {
    /// The caller's answer.
    pub reply: Reply<S::Answer>,
    /// The change to replicate and apply, if the operation changes anything.
    pub change: Option<S::Change>,
}

impl<S: PartitionService + ?Sized> Prepared<S> {
    /// Answers at once and changes nothing.
    pub fn answer(answer: S::Answer) -> Self {
        Self {
            reply: Reply::Now(answer),
            change: None,
        }
    }

    /// Makes `change`, then answers.
    pub fn change(answer: S::Answer, change: S::Change) -> Self {
        Self {
            reply: Reply::Now(answer),
            change: Some(change),
        }
    }

    /// Makes `change` (which should record the call, to wake it later), then parks the
    /// caller.
    pub fn park(change: S::Change) -> Self {
        Self {
            reply: Reply::Park,
            change: Some(change),
        }
    }
}

/// One timer command (see [`Effects::arm_timer`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerCommand {
    /// Fire timer `id` of the partition at `at` (replaces an armed timer of that id).
    Arm {
        /// The service's name for the timer.
        id: u64,
        /// When.
        at: Instant,
    },
    /// Forget timer `id` of the partition.
    Cancel {
        /// The service's name for the timer.
        id: u64,
    },
}

/// A woken call and its answer.
type Wake<S> = (
    CallId,
    Result<<S as PartitionService>::Answer, <S as PartitionService>::Error>,
);

/// What a service asks the runtime to do (on the owner only; see the module docs).
pub struct Effects<S: PartitionService + ?Sized> {
    pub(crate) wakes: Vec<Wake<S>>,
    pub(crate) messages: Vec<(Arc<str>, S::Message)>,
    pub(crate) timers: Vec<TimerCommand>,
    pub(crate) submits: Vec<S::Op>,
}

impl<S: PartitionService + ?Sized> Default for Effects<S> {
    fn default() -> Self {
        Self {
            wakes: Vec::new(),
            messages: Vec::new(),
            timers: Vec::new(),
            submits: Vec::new(),
        }
    }
}

impl<S: PartitionService + ?Sized> Effects<S> {
    /// Answers the parked call `call` (ignored if it is no longer parked here).
    pub fn wake(&mut self, call: CallId, answer: Result<S::Answer, S::Error>) {
        self.wakes.push((call, answer));
    }

    /// Sends `message` to the same service on `member` (at most once, in order).
    pub fn send(&mut self, member: Arc<str>, message: S::Message) {
        self.messages.push((member, message));
    }

    /// Fires [`PartitionService::on_timer`] with `id` at `at`, on this partition's owner,
    /// unless cancelled or re-armed first, or ownership moves.
    pub fn arm_timer(&mut self, id: u64, at: Instant) {
        self.timers.push(TimerCommand::Arm { id, at });
    }

    /// Cancels timer `id` of this partition.
    pub fn cancel_timer(&mut self, id: u64) {
        self.timers.push(TimerCommand::Cancel { id });
    }

    /// Runs `op` on this partition through the write path (replicated, then applied),
    /// after the current call.
    pub fn submit(&mut self, op: S::Op) {
        self.submits.push(op);
    }

    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.wakes.is_empty()
            && self.messages.is_empty()
            && self.timers.is_empty()
            && self.submits.is_empty()
    }
}

/// A service whose state is split by partition (see the module docs for the contract).
pub trait PartitionService: Send + Sync + 'static {
    /// What a caller asks.
    type Op: Serialize + DeserializeOwned + Send + 'static;
    /// The recorded effect of a write, replicated to the backups.
    type Change: Serialize + DeserializeOwned + Send + Sync + 'static;
    /// What a caller gets back.
    type Answer: Serialize + DeserializeOwned + Send + 'static;
    /// Why the service refused an operation; reaches the caller typed.
    type Error: std::error::Error + Serialize + DeserializeOwned + Send + Sync + 'static;
    /// What the service sends between members.
    type Message: Serialize + DeserializeOwned + Send + 'static;

    /// The service's name, unique in the member (e.g. `"cache"`).
    fn name(&self) -> &str;

    /// Answers a read ([`OpKind::Read`]) without the partition's lock, from applied
    /// (acknowledged) state. May run beside `prepare` and `apply`.
    fn read(&self, ctx: &Ctx, op: &Self::Op) -> Result<Self::Answer, Self::Error>;

    /// Decides the answer to a write and the change it makes, without changing anything.
    /// An `Err` reaches the caller; nothing is replicated.
    fn prepare(&self, ctx: &Ctx, op: Self::Op) -> Result<Prepared<Self>, Self::Error>;

    /// Applies a change produced by `prepare`: on the owner after the synchronous backups
    /// have it ([`Role::Owner`]: effects are carried out), and on every backup
    /// ([`Role::Backup`]: effects are discarded). An `Err` here means the replica cannot
    /// follow the owner: it is logged and the replica is resynchronised.
    fn apply(
        &self,
        ctx: &Ctx,
        change: &Self::Change,
        effects: &mut Effects<Self>,
    ) -> Result<(), Self::Error>;

    /// The partition became owned by this member.
    fn on_owned(&self, _ctx: &Ctx, _effects: &mut Effects<Self>) {}

    /// The partition stopped being owned by this member (its timers are dropped, its owner
    /// task is cancelled, its parked callers are told to retry on the new owner).
    fn on_disowned(&self, _partition: u32) {}

    /// A member left or failed (called for every partition owned here).
    fn on_member_left(&self, _ctx: &Ctx, _member: &str, _effects: &mut Effects<Self>) {}

    /// A timer armed on the partition fired.
    fn on_timer(&self, _ctx: &Ctx, _timer: u64, _effects: &mut Effects<Self>) {}

    /// A parked call's caller gave up (timeout, or the call was dropped).
    fn on_abandoned(&self, _ctx: &Ctx, _call: CallId, _effects: &mut Effects<Self>) {}

    /// A message from the same service on `from` ([`ServiceHandle::send`]). Runs on the
    /// connection's reader: must not block (hand long work to a bounded queue).
    fn on_message(&self, _from: &str, _message: Self::Message) {}

    /// A request from the same service on `from` ([`ServiceHandle::ask`]); the answer goes
    /// back to the asker (`None`: no answer, an error there). Runs on the connection's
    /// reader: must not block.
    fn on_ask(&self, _from: &str, _message: Self::Message) -> Option<Self::Message> {
        None
    }

    /// A task to run while the partition is owned here (`None`: none). Started after
    /// `on_owned`, dropped when the partition stops being owned here.
    fn owner_task(&self, _partition: u32, _handle: ServiceHandle<Self>) -> Option<OwnerTask>
    where
        Self: Sized,
    {
        None
    }

    /// The partition's whole state at this moment, encoded as chunks of about
    /// `chunk_bytes` each (the last may be smaller, and one holding a single large item
    /// larger). Called under the partition's lock, off the runtime's workers: writes to the
    /// partition wait for it.
    fn snapshot(&self, partition: u32, chunk_bytes: usize) -> Snapshot;

    /// Builds the state that `chunks` (from `snapshot`) describe, without touching the
    /// partition's live state; [`PartitionService::install`] puts it in place. Called
    /// without the partition's lock, on a low-priority thread or inline for a small copy.
    /// The chunks come from the network: malformed ones are an error, never a panic.
    fn rebuild(&self, partition: u32, chunks: Vec<bytes::Bytes>) -> Result<Rebuilt, Self::Error>;

    /// Replaces the partition's state with one that `rebuild` returned for it. Called under
    /// the partition's lock: should only swap.
    fn install(&self, partition: u32, rebuilt: Rebuilt) -> Result<(), Self::Error>;

    /// Forgets the partition: this member no longer holds a replica of it.
    fn drop_partition(&self, partition: u32);

    /// Number of items in the partition, for statistics and the rebalancing harness.
    fn partition_len(&self, partition: u32) -> usize;
}

pub use super::handle::ServiceHandle;
