//! Partitioning: which partition a key lives in, and which members hold each partition.
//!
//! The key space is cut into a fixed number of partitions (271 by default) so that
//! ownership moves a partition at a time, never a key at a time: a membership change
//! costs a few hundred table entries, not a scan of the data. The number of partitions is
//! fixed for the life of a cluster, since changing it would rehash every key.
//!
//! - [`partition_of`]: key → partition, the same on every member and every version.
//! - [`table`]: the [`PartitionTable`](table::PartitionTable) and its planner, a pure
//!   function of (previous table, data members, [`TableConfig`](table::TableConfig)), so
//!   that any member can recompute and verify what the coordinator publishes.

pub mod table;

/// The partition that `key` belongs to, in `0..partitions`.
///
/// XXH3 is used because it is fast on short keys, well distributed in its low bits (so a
/// plain modulo is fair enough for a few thousand partitions) and specified byte for byte:
/// every member, whatever its platform or version of grid, must map a key to the same
/// partition, which rules out `std`'s randomly seeded `Hash`.
///
/// ```
/// use grid_core::partition::partition_of;
///
/// let p = partition_of(b"order:42", 271);
/// assert!(p < 271);
/// // Stable: the same key always lands in the same partition.
/// assert_eq!(p, partition_of(b"order:42", 271));
/// ```
///
/// # Panics
///
/// If `partitions` is 0.
pub fn partition_of(key: &[u8], partitions: u32) -> u32 {
    // The remainder is below `partitions`, so it fits in a u32.
    (xxhash_rust::xxh3::xxh3_64(key) % u64::from(partitions)) as u32
}
