//! The runtime's messages between members (MessagePack through `grid_net::codec`).

use serde::{Deserialize, Serialize};

use crate::partition::table::PartitionTable;

/// Routes of the runtime.
pub(crate) mod routes {
    pub(crate) const OP: &str = "grid.rt.op";
    pub(crate) const BACKUP: &str = "grid.rt.backup";
    pub(crate) const BACKUP_ASYNC: &str = "grid.rt.backup.async";
    pub(crate) const SYNC: &str = "grid.rt.sync";
    pub(crate) const TABLE_PUSH: &str = "grid.rt.table.push";
    pub(crate) const TABLE_GET: &str = "grid.rt.table.get";
    pub(crate) const MIGRATE: &str = "grid.rt.migrate";
    pub(crate) const FREEZE: &str = "grid.rt.freeze";
    pub(crate) const DRAIN: &str = "grid.rt.drain";
    pub(crate) const ANTI_ENTROPY: &str = "grid.rt.anti_entropy";
    pub(crate) const STATUS: &str = "grid.rt.status";
    pub(crate) const SERVICE_MESSAGE: &str = "grid.rt.service";
    pub(crate) const SERVICE_ASK: &str = "grid.rt.service.ask";
}

/// A service's own message to the same service on another member.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ServiceMessage {
    pub(crate) service: String,
    #[serde(with = "grid_net::codec::bin")]
    pub(crate) body: Vec<u8>,
}

/// An operation for a partition's owner.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct OpRequest {
    pub(crate) service: String,
    pub(crate) partition: u32,
    #[serde(with = "grid_net::codec::bin")]
    pub(crate) op: Vec<u8>,
    /// Reads skip the partition's queue.
    pub(crate) read_only: bool,
}

/// The owner's answer.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum OpResponse {
    /// Done; the service's answer.
    Ok(#[serde(with = "grid_net::codec::bin")] Vec<u8>),
    /// The service refused the operation (its error; nothing changed).
    Failed(String),
    /// This member is not the owner in its table of this version: refresh and retry.
    WrongOwner { table_version: u64 },
    /// The partition is being handed over: retry shortly.
    Frozen,
    /// The owner was paused (or starved) long enough to have been declared failed, and is
    /// asking the cluster whether it still owns its partitions: retry shortly.
    Confirming,
    /// A synchronous backup that the owner's table names is not a live member: the change
    /// was not made; retry once the coordinator's next table has replaced that backup.
    BackupGone,
    /// Applied on the owner, but a synchronous backup did not confirm it: the change may
    /// not survive the owner's death.
    Unreplicated {
        why: String,
        /// The service's answer to the change that was applied (a retry that applies the
        /// same change again answers as if after it: a put would return its own value as
        /// the previous one).
        #[serde(with = "grid_net::codec::bin")]
        answer: Vec<u8>,
    },
}

/// A change for a backup.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct BackupRequest {
    pub(crate) service: String,
    pub(crate) partition: u32,
    /// The version of the sender's table: a backup whose newer table names another owner
    /// refuses the change.
    pub(crate) table_version: u64,
    pub(crate) epoch: u64,
    pub(crate) version: u64,
    #[serde(with = "grid_net::codec::bin")]
    pub(crate) change: Vec<u8>,
}

/// A backup's answer.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) enum BackupResponse {
    Applied,
    /// The backup missed changes or follows another epoch: send it the whole partition.
    NeedSync,
    /// The backup's table of this version names another owner: the sender must not
    /// apply or acknowledge the change.
    Superseded {
        table_version: u64,
    },
}

/// Header of a full partition sync (a bulk stream of snapshot chunks follows).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct SyncHeader {
    pub(crate) service: String,
    pub(crate) partition: u32,
    /// The version of the sender's table (see [`BackupRequest::table_version`]).
    pub(crate) table_version: u64,
    pub(crate) epoch: u64,
    pub(crate) version: u64,
}

/// Coordinator to owner: copy a partition (every service) to `destination` and keep it in
/// sync until the table makes it a replica.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct MigrateRequest {
    pub(crate) table_version: u64,
    pub(crate) partition: u32,
    pub(crate) destination: String,
}

/// Answer to a migration: entries and bytes copied.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct MigrateResponse {
    pub(crate) entries: u64,
    pub(crate) bytes: u64,
}

/// Coordinator to owner: stop taking operations on `partition` until a table newer than
/// `table_version` arrives (or a timeout passes), so its ownership can change hands cleanly.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct FreezeRequest {
    pub(crate) table_version: u64,
    pub(crate) partition: u32,
    /// Who takes over: the old owner checks it has every change before answering.
    pub(crate) new_owner: String,
}

/// Owner to backup: the (epoch, version) of each replica the backup should hold like ours.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct VersionCheck {
    /// The version of the owner's table: a backup whose newer table names another owner
    /// refuses the check (and so the repair that would follow).
    pub(crate) table_version: u64,
    /// (service, partition, epoch, version).
    pub(crate) replicas: Vec<(String, u32, u64, u64)>,
}

/// The replicas that differ, as (service, partition).
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Stale {
    pub(crate) replicas: Vec<(String, u32)>,
}

/// A table, pushed by the coordinator or fetched by a member.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct TableMessage {
    pub(crate) table: Option<PartitionTable>,
}
