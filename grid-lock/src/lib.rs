//! grid's cluster locks: [`ClusterLock`] (one name) and [`KeyedLock`] (one name, many
//! independent keys), with fencing tokens, leases, FIFO waiters and split-brain protection.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let grid = grid::Grid::builder().cluster_name("lock-crate-doc").bind("127.0.0.1:0").no_seeds().start().await?;
//! let reindex = grid.lock("nightly-reindex");
//! if let Some(guard) = reindex.try_lock().await? {
//!     // Pass the token to whatever the work writes to: it refuses a smaller one.
//!     println!("reindexing with fencing token {}", guard.fencing_token());
//!     guard.unlock().await?;
//! }
//! # grid.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! # Semantics
//! - A lock's record lives in the partition of its name (and key), on the partition's owner
//!   and its synchronous backups; a grant, renewal or release is answered only once the
//!   backups have it. It moves with migrations and survives its owner's death by promotion.
//! - **Fencing tokens** grow strictly per lock across every grant, migration and promotion
//!   (see [`table`] for how: a per-partition high-water mark, floored by the partition's
//!   epoch). Pass [`LockGuard::fencing_token`] to the resource the lock protects and have it
//!   refuse tokens smaller than the largest it saw: that, not the lock alone, is what makes
//!   a paused or cut-off holder harmless.
//! - **Leases**: a holder's member renews its lease (a task of the guard, every third of
//!   the lease). A holder whose member dies or is cut off loses the lock once the failure
//!   is detected and the lease has run out; the next holder's token is greater.
//! - **Waiters** queue at the owner in arrival order; a grant is pushed to the waiting
//!   caller (no polling); a `lock()` future that is dropped leaves the queue. A free record
//!   with no waiters is removed.
//! - **Split-brain protection** ([`quorum`]): a grant or a renewal needs the owner to see a
//!   majority of the data members the cluster is expected to have. Failures do not lower
//!   that number; graceful leaves and [`Locks::set_expected_members`] do. On the minority
//!   side `lock()` fails with [`LockError::NoQuorum`] and holders see
//!   [`LockGuard::lost`].
//! - **Bad input**: an operation on a hold from anyone but its holder (another member, or
//!   another [`LockOwner`]) is refused ([`LockError::NotHolder`]) and changes nothing.
//!
//! # Timing assumption
//! Mutual exclusion between a holder that is cut off and the next holder rests on leases,
//! so on clocks. With lease `L` ([`LockSettings::lease`]) and drift bound `ρ`
//! ([`LockSettings::clock_drift`]):
//! - The holder counts its lease from the moment it *sent* the request that got or renewed
//!   it — also for a grant from the queue, since the waiter was parked by that very request
//!   — and believes it holds the lock for `L·(1-ρ)` only. A grant that arrives with less
//!   than `L/3` of that left (a long wait in the queue, a slow answer) is first confirmed
//!   by a renewal, counted from the renewal's sending; one whose lease is over before that
//!   is given back and asked for again. No bound on how long a grant takes to arrive is
//!   assumed.
//! - Every replica counts the same lease from when it applied the change, which is after
//!   the holder sent it; a new owner (a promoted backup, a migration's destination) waits a
//!   whole `L` from taking over before any lease can end; a minority-side owner refuses
//!   renewals as soon as it sees no quorum, and renewals that did not reach a backup are
//!   not counted by the holder.
//! - So the holder stops believing before any replica can grant again, provided two
//!   members' clocks run at rates within `ρ` of each other over one lease. Defaults: `L` =
//!   10 s, `ρ` = 1%. A member paused for longer than its lease (a frozen VM) is covered by
//!   `lost()` only once it runs again: fencing tokens are the defence for what it does
//!   meanwhile.
//! - It also assumes what the runtime promises: one owner per partition at a time, whose
//!   replicas hold every acknowledged change (at most `backup_count` members failed at
//!   once). A partition whose every replica is lost starts empty on its next owner, which
//!   may then grant a lock that a cut-off holder still believes it holds.
//! - The simulator (`sim --workload locks`) checks mutual exclusion under kills, pauses
//!   and partitions on one shared clock: clock drift between members is not simulated yet.
//!
//! # Metrics
//! Through the `metrics` facade (listed in `docs/METRICS.md`): on the owner of a lock's
//! partition, `grid_lock_grants_total` (`how`: free, queued, reentered),
//! `grid_lock_releases_total` (`how`: released, expired, exited) and
//! `grid_lock_refusals_total` (`reason`: no_quorum, not_holder — a forged or stale unlock
//! or renewal —, lost, limits); read at scrape, `grid_lock_held` and `grid_lock_waiters`
//! for the partitions a member owns; on the caller's member, `grid_lock_wait_seconds`
//! (call to grant) and `grid_lock_leases_lost_total` (`lost()` fired).
//!
//! # Layout
//! - [`table`]: one partition's lock table as a sans-IO state machine (decide, apply).
//! - [`quorum`]: the expected cluster size and the quorum (sans-IO).
//! - [`service`]: the table on the runtime's service interface ([`LockService`]).
//! - `lock`: the API: [`Locks`] (a member's lock service), [`ClusterLock`],
//!   [`KeyedLock`], [`LockGuard`], [`LockOwner`], [`LockSettings`].

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod lock;
pub mod quorum;
pub mod service;
pub mod table;

pub use lock::{ClusterLock, KeyedLock, LockGuard, LockOwner, LockSettings, Locks};
pub use service::LockService;

use serde::{Deserialize, Serialize};

/// Why a lock operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum LockError {
    /// The lock name is longer than 255 bytes. Nothing was sent.
    #[error("lock name is {len} bytes long; at most 255")]
    NameTooLong {
        /// Its length.
        len: usize,
    },
    /// The encoded key of a keyed lock is larger than 1 KiB. Nothing was sent.
    #[error("encoded lock key is {len} bytes; at most 1024")]
    KeyTooLarge {
        /// Its length.
        len: usize,
    },
    /// The owner of the lock's partition does not see a majority of the data members the
    /// cluster is expected to have (a network partition, or too many failures): no grant,
    /// no renewal. Retry once the cluster heals, or lower the expected size with
    /// [`Locks::set_expected_members`] if members are gone for good.
    #[error("no quorum: {live} data members in view, {needed} needed")]
    NoQuorum {
        /// Data members the owner sees.
        live: usize,
        /// Data members needed.
        needed: usize,
    },
    /// The caller does not hold the lock (a forged or stale unlock or renewal, or the lease
    /// ran out and the lock went to someone else). Nothing changed.
    #[error("not the lock's holder")]
    NotHolder,
    /// The lock was lost (its lease ran out, or a renewal was refused) before this call:
    /// the work done under it may not have been alone.
    #[error("the lock was lost before it was released")]
    Lost,
    /// The owner already holds this lock, which is not reentrant (it would wait for
    /// itself). Nothing changed.
    #[error("the lock is already held by this owner and is not reentrant")]
    NotReentrant,
    /// The owner re-entered the lock as many times as its reentrancy limit allows.
    #[error("reentrant lock entered {limit} times already")]
    TooManyHolds {
        /// The limit.
        limit: u32,
    },
    /// Too many callers wait for this lock; try later.
    #[error("too many waiters on this lock (at most {limit})")]
    TooManyWaiters {
        /// The limit.
        limit: usize,
    },
    /// Too many locks in this lock's partition; try later.
    #[error("too many locks in one partition (at most {limit})")]
    TooManyLocks {
        /// The limit.
        limit: usize,
    },
    /// A key could not be encoded.
    #[error("lock key: {0}")]
    Key(String),
    /// A copy of a partition's lock table was malformed (from the network).
    #[error("bad lock table copy: {0}")]
    BadCopy(String),
    /// An operation that is not a read was sent as one.
    #[error("not a read")]
    NotARead,
    /// The cluster did not run the operation: the runtime's error (no owner in time, the
    /// member is shutting down, ...). A lock acquire that ended so is withdrawn.
    #[error("cluster: {0}")]
    Cluster(String),
}

impl From<grid_core::GridError> for LockError {
    fn from(e: grid_core::GridError) -> Self {
        Self::Cluster(e.to_string())
    }
}
