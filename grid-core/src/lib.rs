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
//! - [`runtime`]: the member runtime ([`runtime::Runtime`]) and the service SPI.
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
