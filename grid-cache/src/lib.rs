//! The cache service: a map split by partition across the members, with synchronous
//! backups (see `grid_core::runtime`).
//!
//! # Layout
//! - [`store`]: the per-partition maps and the [`store::CacheService`] the runtime drives.
//! - [`ops`]: the operations and the changes they replicate.
//! - [`cache`]: [`Cache<K, V>`], the typed handle users hold.
//!
//! This is the cache's core map (`get`, `put`, `remove`, `put_if_absent`, `contains_key`,
//! `len`): the first service on the partition runtime. Expiry, eviction, loaders, listeners,
//! statistics and the other modes come with the cache issue.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod cache;
pub mod ops;
pub mod store;

pub use cache::Cache;
pub use store::CacheService;
