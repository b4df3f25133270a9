//! grid's cache: named maps of serde keys and values, partitioned across the members with
//! synchronous backups (or replicated, near-cached, or member-only), with expiry,
//! eviction, read-through loading, entry processors, listeners and statistics.
//!
//! # Layout
//! - [`settings`]: [`CacheSettings`], modes, eviction, per-entry [`Expiry`].
//! - [`cache`]: [`Cache<K, V>`], the typed handle, [`CacheBuilder`], events and listeners.
//! - [`caches`]: [`Caches`], a member's caches — opening, the loader's single flight, the
//!   expiry sweeper, member-to-member requests.
//! - [`store`]: the entries, per partition, and the runtime's view of them.
//! - `copies`: near and replicated copies; `events`: the event hub; [`ops`]: operations
//!   and replicated changes; [`processor`]: entry processors; [`stats`]: statistics;
//!   [`reference`]: [`CachedReference`].

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod cache;
pub mod caches;
mod copies;
mod events;
mod map;
pub mod ops;
pub mod processor;
pub mod reference;
pub mod settings;
pub mod stats;
pub mod store;

pub use cache::{Cache, CacheBuilder, CacheEvent, CacheListener};
pub use caches::{Caches, MemberCacheSizes};
pub use events::CacheMessage;
pub use events::EventKind;
pub use processor::ProcessorEntry;
pub use reference::CachedReference;
pub use settings::{CacheMode, CacheSettings, CacheSettingsBuilder, Eviction, Expiry};
pub use stats::CacheStatistics;
pub use store::CacheService;
