//! The service SPI: what a partitioned service (cache, locks, executor, scheduler) gives the
//! runtime so that the runtime can route its operations, replicate their effects and move
//! its partitions.
//!
//! The runtime owns ordering and durability; the service owns its data. An operation runs in
//! two steps on the partition's owner, under the partition's lock: [`PartitionService::prepare`]
//! computes the answer and the *change* (a deterministic record of the effect, e.g. "set k to
//! v", never "put if absent") without touching the data; the runtime sends the change to the
//! synchronous backups, waits for their acknowledgements, and only then calls
//! [`PartitionService::apply`] on the owner. A change is therefore visible (even to lock-free
//! reads) only once every live backup has it.

/// A partition's state as chunks (see [`PartitionService::snapshot`]).
pub type Snapshot = Vec<bytes::Bytes>;

/// A partition's state rebuilt from a snapshot, not yet in place (see
/// [`PartitionService::rebuild`]); only the service that built it knows its type.
pub type Rebuilt = Box<dyn std::any::Any + Send>;

/// What [`PartitionService::prepare`] decided.
#[derive(Debug, Clone, Default)]
pub struct Prepared {
    /// The answer for the caller (encoded by the service).
    pub answer: Vec<u8>,
    /// The change to replicate and apply, if the operation changes anything.
    pub change: Option<Vec<u8>>,
}

/// A service whose state is split by partition. The methods that read or change a
/// partition's state are called by the runtime never concurrently for the same partition
/// ([`PartitionService::rebuild`], which touches no live state, may run beside them).
pub trait PartitionService: Send + Sync + 'static {
    /// The service's name, unique in the member (e.g. `"cache:users"`).
    fn name(&self) -> &str;

    /// Computes the answer to `op` and the change it makes, without changing anything.
    /// An `Err` reaches the caller; nothing is replicated.
    fn prepare(&self, partition: u32, op: &[u8]) -> Result<Prepared, String>;

    /// Applies a change produced by `prepare` (on the owner after the backups acknowledged
    /// it, with `primary` set, and on every backup). Only the owner's application reports
    /// effects to the outside (events, notifications), so that each happens once.
    fn apply(&self, partition: u32, change: &[u8], primary: bool) -> Result<(), String>;

    /// The partition's whole state at this moment, encoded as chunks of about
    /// `chunk_bytes` each (the last may be smaller, and one holding a single large item
    /// larger). Called under the partition's lock, off the runtime's workers: writes to the
    /// partition wait for it. Encoding straight from the live state costs what a copy of it
    /// would, and a copy would then still have to be encoded; chunks written into
    /// [`grid_net::buffers::BulkBuf`]s reuse the pages of earlier copies.
    fn snapshot(&self, partition: u32, chunk_bytes: usize) -> Snapshot;

    /// Builds the state that `chunks` (from `snapshot`) describe, without touching the
    /// partition's live state; [`PartitionService::install`] puts it in place. Called
    /// without the partition's lock (it is the slow half of a restore): on a low-priority
    /// thread, or inline for a copy under 256 KiB. The chunks come from the network:
    /// malformed ones are an error, never a panic.
    fn rebuild(&self, partition: u32, chunks: Vec<bytes::Bytes>) -> Result<Rebuilt, String>;

    /// Replaces the partition's state with one that [`PartitionService::rebuild`] returned
    /// for it. Called under the partition's lock: should only swap.
    fn install(&self, partition: u32, rebuilt: Rebuilt) -> Result<(), String>;

    /// Replaces the partition's state with the one `chunks` describe: `rebuild`, then
    /// `install`.
    fn restore(&self, partition: u32, chunks: Vec<bytes::Bytes>) -> Result<(), String> {
        let rebuilt = self.rebuild(partition, chunks)?;
        self.install(partition, rebuilt)
    }

    /// Forgets the partition: this member no longer holds a replica of it.
    fn drop_partition(&self, partition: u32);

    /// Number of entries in the partition, for statistics and the rebalancing harness.
    fn partition_len(&self, partition: u32) -> usize;
}
