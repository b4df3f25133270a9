//! What grid members agree on: configuration, errors, the value codec, the partition table
//! and the member runtime that routes, replicates and migrates partitions.
//!
//! # Layout
//! - [`clock`]: the one clock every decision reads (tokio's, so tests and the simulator
//!   drive it).
//! - [`config`]: [`GridConfig`], loaded from TOML with `GRID_*` environment overrides.
//! - [`error`]: [`GridError`], the error of grid's public API.
//! - [`partition`]: [`partition_of`](partition::partition_of) and the partition table planner,
//!   a pure function from (previous table, members, configuration) to the next table.
//! - [`runtime`]: the member runtime ([`runtime::Runtime`]) and the service interface
//!   ([`runtime::service`]).
//!
//! # Writing a partitioned service
//!
//! A service (the cache, and next locks, the bucketed executor and the scheduler) splits
//! its state by partition and implements [`runtime::PartitionService`]: typed operations,
//! changes, answers, errors and messages (serde types the runtime encodes), a [`Ctx`] on
//! every call with the partition, epoch, version, caller and `now` from [`clock`], a
//! lock-free `read` path, `prepare` (decide, don't touch) and `apply` (change, on the owner
//! after the backups have it, and on every backup), [`runtime::Effects`] (wake a parked
//! caller, send a message, arm or cancel a timer, submit an operation of its own), hooks
//! for ownership gained and lost, a member's departure, a timer and an abandoned call, an
//! owner task per owned partition, and the copy functions that move partitions.
//! [`runtime::Runtime::register_service`] gives back a typed [`runtime::ServiceHandle`].
//! The [`runtime::service`] module's documentation states the contract and holds a complete
//! example service that runs as a doc test.
//!
//! [`Ctx`]: runtime::Ctx
//! - [`codec`]: re-export of `grid_net::codec` (MessagePack), so services need not depend on
//!   the transport crate for it.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod clock;
pub mod config;
pub mod error;
pub mod partition;
pub mod runtime;

pub use config::GridConfig;
pub use error::GridError;
pub use grid_net::codec;
