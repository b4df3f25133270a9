//! What grid members agree on: configuration, errors and the value codec. Later the
//! partition table and the member runtime live here too.
//!
//! # Layout
//! - [`config`]: [`GridConfig`], loaded from TOML with `GRID_*` environment overrides.
//! - [`error`]: [`GridError`], the error of grid's public API.
//! - [`codec`]: re-export of `grid_net::codec` (MessagePack), so services need not depend on
//!   the transport crate for it.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod config;
pub mod error;

pub use config::GridConfig;
pub use error::GridError;
pub use grid_net::codec;
