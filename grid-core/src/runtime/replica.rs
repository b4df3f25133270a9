//! One partition replica's side of things: the owner running an operation and replicating
//! its change, a backup applying changes in order, full syncs when a backup fell behind or
//! follows another epoch, migrations (a full sync to a new replica that then receives every
//! change) and freezes before a handoff.

use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use bytes::Bytes;
use grid_net::codec;
use grid_net::transport::BulkReceiver;
use tracing::{debug, warn};

use super::hooks::Written;
use super::messages::{
    routes, BackupRequest, BackupResponse, FreezeRequest, MigrateRequest, MigrateResponse,
    OpResponse, Stale, SyncHeader, VersionCheck,
};
use super::replica_rules::{write_outcome, Replicated, WriteOutcome};
use super::replica_state::{digest, ChangeVerdict, CopyVerdict, Sender, TableView};
use super::service::{CallId, Ctx, Role};
use super::{ReplicaState, Runtime, ServiceSlot};
use crate::partition::table::PartitionTable;

/// (service, partition, epoch, version) of one replica, as anti-entropy compares them.
type ReplicaVersion = (String, u32, u64, u64);

/// How long a freeze holds without the table that ends it.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(5);
/// A partition copy smaller than this travels between the main endpoints and is rebuilt at
/// once, at the application's priority: small copies are latency work (see
/// `send_snapshot`). Rebuilding this much takes a fraction of a millisecond.
const SMALL_COPY: usize = 256 * 1024;

/// How long a migration source waits to hear of a destination the coordinator named.
const DESTINATION_GRACE: Duration = Duration::from_secs(3);

/// The message that carries one change of partition `p` to a backup.
fn backup_request(
    slot: &ServiceSlot,
    p: u32,
    table: &PartitionTable,
    st: &ReplicaState,
    version: u64,
    change: &[u8],
) -> BackupRequest {
    BackupRequest {
        service: slot.service.name().to_string(),
        partition: p,
        table_version: table.version(),
        epoch: st.epoch,
        version,
        change: change.to_vec(),
    }
}

/// What this member's `table` says about partition `p`, for judging what others send.
fn view_of(table: &PartitionTable, p: u32) -> TableView<'_> {
    TableView {
        version: table.version(),
        owner: table.owner(p).map(|o| &**o),
        epoch: table.epoch(p),
    }
}

impl Runtime {
    /// A frozen partition stays frozen until a table takes its ownership away from this
    /// member — not merely until any newer table: the coordinator may publish other
    /// partitions' moves while this one's handoff is under way — or until the freeze times
    /// out (the coordinator died mid-handoff).
    fn frozen(&self, p: u32, table: &PartitionTable) -> bool {
        let ctl = &self.inner.partitions[p as usize];
        let until = ctl
            .frozen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|(_, u)| u);
        super::replica_rules::is_frozen(
            until,
            table.owner(p) == Some(&self.inner.me),
            Instant::now(),
        )
    }

    /// The members that get this partition's changes: backups, then migration targets.
    fn change_targets(&self, p: u32, table: &PartitionTable) -> Vec<Arc<str>> {
        let mut targets: Vec<Arc<str>> = table.replicas(p).skip(1).cloned().collect();
        let extras = self.inner.partitions[p as usize]
            .extras
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for (m, _) in extras.iter() {
            if !targets.contains(m) && *m != self.inner.me {
                targets.push(m.clone());
            }
        }
        targets
    }

    /// The owner's side of an operation. A write runs in a task of its own: if the caller
    /// gives up (timeout, select, or the transport cancelling its handler), the write still
    /// completes on the owner as it did on the backups; only the wait of a parked call is
    /// given up (and reported to the service, see `hooks`).
    pub(super) async fn execute_local(
        &self,
        service: &str,
        p: u32,
        op: &[u8],
        read_only: bool,
        caller: Arc<str>,
    ) -> OpResponse {
        let Some(slot) = self.slot(service) else {
            return OpResponse::Failed(format!("no service {service:?} on this member"));
        };
        if read_only {
            // No queue: changes are applied only once acknowledged, so whatever a read sees
            // survives the owner's death. Reads go on during a handoff's freeze too: the old
            // owner's copy is complete until the table moves the partition.
            let table = self.table();
            if table.owner(p) != Some(&self.inner.me) {
                return OpResponse::WrongOwner {
                    table_version: table.version(),
                };
            }
            if !self.may_serve() {
                return OpResponse::Confirming;
            }
            let ctx = Ctx {
                partition: p,
                epoch: table.epoch(p),
                version: slot.applied[p as usize].load(std::sync::atomic::Ordering::Acquire),
                table_version: table.version(),
                member: self.inner.me.clone(),
                caller: Some(caller),
                call: None,
                now: crate::clock::now(),
                role: Role::Owner,
            };
            return match slot.service.read(&ctx, op) {
                Ok(answer) => OpResponse::Ok(answer),
                Err(e) => OpResponse::Failed(e),
            };
        }
        let rt = self.clone();
        let op = op.to_vec();
        let written = tokio::spawn(async move { rt.write_local(&slot, p, &op, caller).await });
        match written.await {
            Ok(Written::Answered(response)) => response,
            Ok(Written::Parked(guard, answer)) => self.wait_parked(guard, answer).await,
            Err(e) => OpResponse::Failed(format!("operation task failed: {e}")),
        }
    }

    /// A write on the owner, under the partition's lock: prepare, replicate, apply, carry
    /// out the effects.
    async fn write_local(
        &self,
        slot: &Arc<ServiceSlot>,
        p: u32,
        op: &[u8],
        caller: Arc<str>,
    ) -> Written {
        let mut st = slot.replicas[p as usize].lock().await;
        // Checked under the lock: the table or a freeze may have changed while we waited.
        let table = self.table();
        if table.owner(p) != Some(&self.inner.me) {
            return Written::Answered(OpResponse::WrongOwner {
                table_version: table.version(),
            });
        }
        if self.frozen(p, &table) {
            return Written::Answered(OpResponse::Frozen);
        }
        if !self.may_serve() {
            return Written::Answered(OpResponse::Confirming);
        }
        st.epoch = table.epoch(p);
        let call = CallId(
            self.inner
                .next_call
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        );
        let mut ctx = Ctx {
            partition: p,
            epoch: st.epoch,
            version: st.version,
            table_version: table.version(),
            member: self.inner.me.clone(),
            caller: Some(caller),
            call: Some(call),
            now: crate::clock::now(),
            role: Role::Owner,
        };
        let prepared = match slot.service.prepare(&ctx, op) {
            Ok(p) => p,
            Err(e) => return Written::Answered(OpResponse::Failed(e)),
        };
        // A parked call is registered before its change is applied: the change (or one
        // right after it) may wake it.
        let parked = match prepared.reply {
            Some(_) => None,
            None => match self.park(&slot.name, p, call) {
                Ok(rx) => Some(rx),
                Err(response) => return Written::Answered(response),
            },
        };
        let answered = |unreplicated: Option<String>| match (parked, &prepared.reply) {
            (Some(rx), _) => Written::Parked(self.abandon_guard(call), rx),
            (None, Some(answer)) => Written::Answered(match unreplicated {
                None => OpResponse::Ok(answer.clone()),
                Some(why) => OpResponse::Unreplicated {
                    why,
                    answer: answer.clone(),
                },
            }),
            (None, None) => Written::Answered(OpResponse::Failed("no answer".into())),
        };
        let Some(change) = prepared.change.as_deref() else {
            return answered(None);
        };
        let Some(version) = st.version.checked_add(1) else {
            self.unpark(call);
            return Written::Answered(OpResponse::Failed("partition version exhausted".into()));
        };
        let targets = self.change_targets(p, &table);
        let backups = table.replicas(p).count().saturating_sub(1);
        let sync_backups = backups.saturating_sub(self.inner.config.async_backups as usize);
        // Asynchronous backups (the ranks after the synchronous ones) get the change on
        // the ordered one-way channel; synchronous backups and migration targets are
        // waited for.
        for t in targets.iter().take(backups).skip(sync_backups) {
            self.send_async_backup(slot, p, &table, &st, version, change, t)
                .await;
        }
        let waited: Vec<&Arc<str>> = targets
            .iter()
            .take(sync_backups)
            .chain(targets.iter().skip(backups))
            .collect();
        // A synchronous backup that is not a live member: checked before anything is sent,
        // so that no backup takes a change the owner then refuses (the race where one
        // departs during the sends ends the same way, and the digest check repairs it).
        let outcome = match waited
            .iter()
            .take(sync_backups)
            .position(|t| self.inner.cluster.member(t).is_none())
        {
            Some(missing) => WriteOutcome::BackupGone { missing },
            None => {
                let sends = waited
                    .iter()
                    .map(|t| self.replicate(slot, p, &table, &st, version, change, t));
                let acked = futures::future::join_all(sends).await;
                write_outcome(&acked, sync_backups)
            }
        };
        // A member whose table names another owner: this member was paused, or cut off,
        // past failure detection, and the change must not happen here (a backup on the
        // older table may have taken it: the new owner resynchronises it).
        if let WriteOutcome::Superseded { by, table_version } = outcome {
            let refuser = waited[by];
            warn!(partition = p, backup = %refuser, table_version, "a backup has a newer table without this member as owner; change refused");
            self.unpark(call);
            if let Some(member) = self.inner.cluster.member(refuser) {
                self.fetch_table_from(&member).await;
            }
            return Written::Answered(OpResponse::WrongOwner { table_version });
        }
        if let WriteOutcome::BackupGone { missing } = outcome {
            // A backup that took the change anyway (it departed during the sends) has a
            // version this owner reuses: the digest check makes it ask for a full copy.
            debug!(partition = p, backup = %waited[missing], "a synchronous backup is not a live member; the change waits for the next table");
            self.unpark(call);
            metrics::counter!("grid_backup_gone_refusals_total").increment(1);
            return Written::Answered(OpResponse::BackupGone);
        }
        // Otherwise the change is applied whatever the backups said: some may have it
        // already, and the owner must not fall behind them.
        ctx.version = version;
        let effects = match slot.service.apply(&ctx, change) {
            Ok(fx) => fx,
            Err(e) => {
                warn!(partition = p, error = %e, "owner could not apply its own change");
                self.unpark(call);
                return Written::Answered(OpResponse::Failed(e));
            }
        };
        let epoch = st.epoch;
        st.applied(epoch, version, digest(change));
        st.log_change(version, change);
        slot.applied[p as usize].store(version, std::sync::atomic::Ordering::Release);
        // An acknowledgement promises the change is on every live synchronous backup.
        // A backup (not a migration target) that did not confirm it breaks that promise:
        // the caller hears the outcome is unknown, and the backup is repaired by its
        // next change or by anti-entropy. Callers this change wakes hear the same.
        let unreplicated = match outcome {
            WriteOutcome::Unreplicated { missed } => Some(format!(
                "applied on the owner, but backup {} did not confirm it",
                waited[missed]
            )),
            _ => None,
        };
        self.carry_out(slot, p, effects, unreplicated.as_deref());
        answered(unreplicated)
    }

    /// Queues one change for an asynchronous backup. Lost messages leave a gap the backup
    /// notices (its next change does not follow) and anti-entropy repairs.
    #[allow(clippy::too_many_arguments)]
    async fn send_async_backup(
        &self,
        slot: &ServiceSlot,
        p: u32,
        table: &PartitionTable,
        st: &ReplicaState,
        version: u64,
        change: &[u8],
        target: &Arc<str>,
    ) {
        let Some(member) = self.inner.cluster.member(target) else {
            return;
        };
        let req = backup_request(slot, p, table, st, version, change);
        let sent = match codec::encode(&req) {
            Ok(body) => self
                .inner
                .transport
                .send_ordered(member.addr, routes::BACKUP_ASYNC, &body)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = sent {
            debug!(partition = p, backup = %target, error = %e, "asynchronous backup not sent");
            metrics::counter!("grid_backup_misses_total").increment(1);
        }
    }

    /// An asynchronous backup's side of a change (in arrival order, one at a time).
    pub(super) async fn on_async_backup(&self, sender: &str, req: BackupRequest) {
        let p = req.partition;
        match self.on_backup(sender, req).await {
            Ok(BackupResponse::Applied) => {}
            Ok(BackupResponse::Superseded { table_version }) => {
                debug!(
                    partition = p,
                    %sender,
                    table_version,
                    "asynchronous backup from a replaced owner refused"
                )
            }
            Ok(BackupResponse::NeedSync) => {
                debug!(
                    partition = p,
                    "asynchronous backup behind; anti-entropy will repair it"
                )
            }
            Err(e) => debug!(partition = p, error = %e, "asynchronous backup refused"),
        }
    }

    /// Sends one change to one backup; a backup that fell behind gets the whole partition
    /// first. A backup that cannot be reached is left behind (and resynchronised by its next
    /// change) — the member list decides whether it is dead.
    #[allow(clippy::too_many_arguments)]
    async fn replicate(
        &self,
        slot: &ServiceSlot,
        p: u32,
        table: &PartitionTable,
        st: &ReplicaState,
        version: u64,
        change: &[u8],
        target: &Arc<str>,
    ) -> Replicated {
        let Some(member) = self.inner.cluster.member(target) else {
            // Not a live member in this view: the owner's write waits for the table that
            // replaces it (see `WriteOutcome::BackupGone`).
            return Replicated::Departed;
        };
        let req = backup_request(slot, p, table, st, version, change);
        let timeout = self.inner.config.backup_timeout;
        for attempt in 0..2 {
            let request = self.inner.transport.request_typed_nested(
                member.addr,
                routes::BACKUP,
                &req,
                timeout,
            );
            // A backup found dead while we wait: stop waiting (the connection to a dead
            // member may take seconds to time out, and the partition's lock is held), and
            // let the write wait for the table that replaces it.
            let answer: Result<BackupResponse, _> = tokio::select! {
                answer = request => answer,
                () = self.departure_of(target) => return Replicated::Departed,
            };
            match answer {
                Ok(BackupResponse::Applied) => return Replicated::Acked,
                Ok(BackupResponse::Superseded { table_version }) => {
                    return Replicated::Superseded(table_version)
                }
                Ok(BackupResponse::NeedSync) if attempt == 0 => {
                    if let Err(e) = self.sync_to(slot, p, st, &member.id).await {
                        warn!(partition = p, backup = %target, error = %e, "full sync failed");
                        break;
                    }
                }
                Ok(BackupResponse::NeedSync) => break,
                Err(e) => {
                    warn!(partition = p, backup = %target, error = %e, "backup missed a change; it will be resynchronised");
                    break;
                }
            }
        }
        metrics::counter!("grid_backup_misses_total").increment(1);
        Replicated::Missed
    }

    /// Resolves once `id` is no longer a live member in this member's view.
    async fn departure_of(&self, id: &str) {
        let mut view = self.inner.cluster.watch();
        if view
            .wait_for(|members| !members.iter().any(|m| &*m.id == id))
            .await
            .is_err()
        {
            // The member list is gone (the member is stopping): never resolve.
            std::future::pending::<()>().await;
        }
    }

    /// Copies the whole partition of one service to `target`, at the state `st` describes.
    /// The caller holds the replica's lock, so the copy is consistent.
    async fn sync_to(
        &self,
        slot: &ServiceSlot,
        p: u32,
        st: &ReplicaState,
        target: &Arc<str>,
    ) -> Result<(u64, u64), String> {
        let entries = slot.service.partition_len(p) as u64;
        let chunks = self.take_snapshot(slot, p).await?;
        self.send_snapshot(slot, p, st.epoch, st.version, entries, chunks, target)
            .await
    }

    /// Takes a snapshot of one service's partition off the runtime's workers; the caller
    /// holds the replica's lock, so it is consistent. A snapshot encodes megabytes: on a
    /// worker, the operations queued behind it waited for that (a copy of the maps, as
    /// snapshots were then, was 4.5% of all CPU during a 1M-entry rebalance, all of it on
    /// the workers, in a profile). Not on a copy thread:
    /// those get no CPU while operations want it all, and this runs under the lock that the
    /// partition's writes wait for.
    async fn take_snapshot(&self, slot: &ServiceSlot, p: u32) -> Result<super::Snapshot, String> {
        let service = slot.service.clone();
        let chunk_bytes = self.inner.config.chunk_bytes;
        if grid_net::environment::single_threaded() {
            // A deterministic simulation: on the one thread (`grid_net::environment`).
            return Ok(service.snapshot(p, chunk_bytes));
        }
        tokio::task::spawn_blocking(move || service.snapshot(p, chunk_bytes))
            .await
            .map_err(|e| format!("snapshot of partition {p} failed: {e}"))
    }

    /// Sends a snapshot taken at (`epoch`, `version`) to `target`. The loop runs on the
    /// runtime that serves operations (the stream's connection is driven by the bulk
    /// runtime): moved to the bulk runtime as well, p99 latency during a 1M-entry rebalance
    /// was 1.5 times higher in three runs each (BENCHMARKS.md).
    #[allow(clippy::too_many_arguments)]
    async fn send_snapshot(
        &self,
        slot: &ServiceSlot,
        p: u32,
        epoch: u64,
        version: u64,
        entries: u64,
        chunks: super::Snapshot,
        target: &Arc<str>,
    ) -> Result<(u64, u64), String> {
        let member = self
            .inner
            .cluster
            .member(target)
            .ok_or_else(|| format!("{target} is not a live member"))?;
        let _copying = CopyUnderWay::new(&self.inner.moved);
        let header = codec::encode(&SyncHeader {
            service: slot.service.name().to_string(),
            partition: p,
            table_version: self.table().version(),
            epoch,
            version,
        })
        .map_err(|e| e.to_string())?;
        // A small copy (under SMALL_COPY bytes: a join of a 10k-entry cache moves 798 of
        // them) is latency work: it travels between the main endpoints and is rebuilt at
        // once, at the application's priority. On the low-priority bulk path, every hop of it
        // waited for a core the load left free: a 4→5 join took 3.2 s instead of 0.6 s under
        // a busy load (BENCHMARKS.md). Anything bigger is bulk work, below the operations.
        let size: usize = chunks.iter().map(Bytes::len).sum();
        let transport = &self.inner.transport;
        let mut bulk = if size < SMALL_COPY {
            transport
                .open_bulk_on_main(member.addr, routes::SYNC, &header)
                .await
        } else {
            transport
                .open_bulk(member.addr, routes::SYNC, &header)
                .await
        }
        .map_err(|e| e.to_string())?;
        for chunk in chunks {
            bulk.send_bytes(chunk).await.map_err(|e| e.to_string())?;
        }
        let bytes = size as u64;
        let link = bulk.link_stats();
        debug!(
            partition = p,
            %target,
            mtu = link.mtu,
            rtt_us = link.rtt.as_micros() as u64,
            lost_packets = link.lost_packets,
            black_holes = link.black_holes,
            "partition sent; the link so far"
        );
        bulk.finish(Duration::from_secs(60))
            .await
            .map_err(|e| e.to_string())?;
        {
            let mut moved = self.inner.moved.lock().unwrap_or_else(|e| e.into_inner());
            moved.entries += entries;
            moved.bytes += bytes;
        }
        metrics::counter!("grid_partition_sync_bytes_total").increment(bytes);
        Ok((entries, bytes))
    }

    /// A backup's side of a change sent by `sender` (see `ReplicaState::judge_change`).
    pub(super) async fn on_backup(
        &self,
        sender: &str,
        req: BackupRequest,
    ) -> Result<BackupResponse, String> {
        let refuse = self.inner.refuse_backups.fetch_update(
            std::sync::atomic::Ordering::SeqCst,
            std::sync::atomic::Ordering::SeqCst,
            |n| n.checked_sub(1),
        );
        if refuse.is_ok() {
            return Err("refused (fault injected by a test)".into());
        }
        let slot = self
            .slot(&req.service)
            .ok_or_else(|| format!("no service {:?} on this member", req.service))?;
        let replica = slot
            .replicas
            .get(req.partition as usize)
            .ok_or_else(|| format!("no partition {}", req.partition))?;
        let mut st = replica.lock().await;
        let table = self.table();
        let from = Sender {
            member: sender,
            table_version: req.table_version,
            epoch: req.epoch,
        };
        let change_digest = digest(&req.change);
        match st.judge_change(
            &view_of(&table, req.partition),
            &from,
            req.version,
            change_digest,
        ) {
            ChangeVerdict::Apply => {
                let ctx = Ctx {
                    partition: req.partition,
                    epoch: req.epoch,
                    version: req.version,
                    table_version: table.version(),
                    member: self.inner.me.clone(),
                    caller: None,
                    call: None,
                    now: crate::clock::now(),
                    role: Role::Backup,
                };
                // A backup's effects are discarded: only the owner acts.
                slot.service.apply(&ctx, &req.change)?;
                st.applied(req.epoch, req.version, change_digest);
                Ok(BackupResponse::Applied)
            }
            ChangeVerdict::Duplicate => Ok(BackupResponse::Applied),
            ChangeVerdict::NeedSync => Ok(BackupResponse::NeedSync),
            ChangeVerdict::Diverged => {
                warn!(partition = req.partition, %sender, version = req.version, "a change differs from the one this backup applied under its version; asking for the whole partition");
                st.mark_diverged();
                Ok(BackupResponse::NeedSync)
            }
            ChangeVerdict::Superseded { table_version } => {
                warn!(partition = req.partition, %sender, table_version, "change from a member that no longer owns the partition refused");
                metrics::counter!("grid_stale_owner_refusals_total").increment(1);
                Ok(BackupResponse::Superseded { table_version })
            }
        }
    }

    /// Judges a full copy of `slot`'s partition from `sender` against the replica's state.
    fn judge_copy(
        &self,
        st: &ReplicaState,
        sender: &str,
        header: &SyncHeader,
    ) -> Result<(), String> {
        let table = self.table();
        let from = Sender {
            member: sender,
            table_version: header.table_version,
            epoch: header.epoch,
        };
        match st.judge_copy(&view_of(&table, header.partition), &from, header.version) {
            CopyVerdict::Install => Ok(()),
            CopyVerdict::Older => Err(format!(
                "copy of partition {} at ({}, {}) refused: this replica is at ({}, {})",
                header.partition, header.epoch, header.version, st.epoch, st.version
            )),
            CopyVerdict::Superseded { table_version } => {
                metrics::counter!("grid_stale_owner_refusals_total").increment(1);
                Err(format!(
                    "copy of partition {} refused: {sender} does not own it in table {table_version}",
                    header.partition
                ))
            }
        }
    }

    /// A full partition copy from `sender` arriving (resync or migration). A copy this
    /// replica must not take (see `ReplicaState::judge_copy`) is refused before it is
    /// received, and again before it is installed; one over the size cap as it arrives.
    pub(super) async fn on_sync(
        &self,
        sender: &str,
        header: Bytes,
        mut chunks: BulkReceiver,
    ) -> Result<Bytes, String> {
        let header: SyncHeader = codec::decode(&header).map_err(|e| e.to_string())?;
        let slot = self
            .slot(&header.service)
            .ok_or_else(|| format!("no service {:?} on this member", header.service))?;
        let replica = slot
            .replicas
            .get(header.partition as usize)
            .ok_or_else(|| format!("no partition {}", header.partition))?;
        if let Err(e) = self.judge_copy(&*replica.lock().await, sender, &header) {
            warn!(partition = header.partition, %sender, error = %e, "partition copy refused");
            return Err(e);
        }
        let cap = self.inner.config.max_partition_copy_bytes;
        let mut received = Vec::new();
        let mut received_bytes = 0usize;
        let opened = Instant::now();
        let mut first_ms = None;
        while let Some(chunk) = chunks.next().await.map_err(|e| e.to_string())? {
            first_ms.get_or_insert_with(|| opened.elapsed().as_secs_f64() * 1e3);
            received_bytes = received_bytes.saturating_add(chunk.len());
            if received_bytes > cap {
                warn!(partition = header.partition, %sender, cap, "partition copy over the size cap refused");
                return Err(format!(
                    "copy of partition {} is over this member's cap of {cap} bytes",
                    header.partition
                ));
            }
            received.push(chunk);
        }
        let received_ms = opened.elapsed().as_secs_f64() * 1e3;
        // Rebuilding a partition takes milliseconds: on a copy thread, below the operations
        // the runtime's workers go on serving meanwhile — and without the replica's lock,
        // because a copy thread gets no CPU while operations want it all, and changes for
        // this partition must not wait for that. Only the swap happens under the lock. A
        // small partition (see `send_snapshot`) is rebuilt here at once.
        let (service, p) = (slot.service.clone(), header.partition);
        let size: usize = received.iter().map(Bytes::len).sum();
        let chunk_count = received.len();
        let rebuilt = if size < SMALL_COPY {
            service.rebuild(p, received)
        } else {
            self.inner
                .background
                .run(move || service.rebuild(p, received))
                .await
                .map_err(|e| format!("restoring partition {p} failed: {e}"))?
        }?;
        let mut st = replica.lock().await;
        // Changes or another copy may have come while this one arrived.
        if let Err(e) = self.judge_copy(&st, sender, &header) {
            warn!(partition = p, %sender, error = %e, "partition copy refused");
            return Err(e);
        }
        slot.service.install(p, rebuilt)?;
        st.installed(header.epoch, header.version);
        // Possibly for a table still to come (a migration): kept until a table confirms it,
        // even if the tables in between say this member holds nothing of the partition.
        st.incoming_since = Some(Instant::now());
        debug!(
            member = %self.inner.me,
            partition = p,
            epoch = header.epoch,
            version = header.version,
            chunks = chunk_count,
            ?first_ms,
            received_ms,
            installed_ms = opened.elapsed().as_secs_f64() * 1e3,
            size,
            "partition installed"
        );
        Ok(Bytes::new())
    }

    /// The owner's side of a migration: copy every service's partition to the destination
    /// — a snapshot taken under the partition's lock, streamed without it, then the changes
    /// made meanwhile from the change log — after which the destination gets every change,
    /// like a backup, until the table makes it a replica.
    pub(super) async fn on_migrate(&self, req: MigrateRequest) -> Result<MigrateResponse, String> {
        // Go to a task of its own: the transport runs a handler's first poll on the task
        // reading the connection's requests, and a snapshot would hold those up.
        tokio::task::yield_now().await;
        let p = req.partition;
        if p >= self.inner.config.table.partitions {
            return Err(format!("no partition {p}"));
        }
        let destination: Arc<str> = Arc::from(req.destination.as_str());
        // The coordinator may have heard of a new member before this one did: give gossip
        // a moment rather than failing the migration (and retrying it).
        let known = self
            .inner
            .cluster
            .wait_until(DESTINATION_GRACE, |members| {
                members.iter().any(|m| m.id == destination)
            })
            .await;
        if !known {
            return Err(format!("{destination} is not a live member"));
        }
        let mut total = MigrateResponse::default();
        for slot in self.slots() {
            let started = Instant::now();
            let not_owner = |table: &PartitionTable| {
                format!(
                    "not the owner of partition {p} in table {}",
                    table.version()
                )
            };
            // 1. Snapshot, under the lock (encoded into memory: writes wait only for that).
            let (epoch, since, entries, chunks) = {
                let mut st = slot.replicas[p as usize].lock().await;
                let table = self.table();
                if table.owner(p) != Some(&self.inner.me) {
                    return Err(not_owner(&table));
                }
                st.epoch = table.epoch(p);
                let entries = slot.service.partition_len(p) as u64;
                let chunks = self.take_snapshot(&slot, p).await?;
                st.start_log();
                (st.epoch, st.version, entries, chunks)
            };
            let snapshot_ms = started.elapsed().as_secs_f64() * 1e3;
            // 2. Stream it while writes go on.
            let sent = self
                .send_snapshot(&slot, p, epoch, since, entries, chunks, &destination)
                .await;
            let (_, bytes) = match sent {
                Ok(s) => s,
                Err(e) => {
                    slot.replicas[p as usize].lock().await.log = None;
                    return Err(e);
                }
            };
            total.entries += entries;
            total.bytes += bytes;
            debug!(
                partition = p,
                %destination,
                snapshot_ms,
                sent_ms = started.elapsed().as_secs_f64() * 1e3,
                bytes,
                "partition copied out"
            );
            // 3. Catch up and switch to live replication, under the lock.
            let mut st = slot.replicas[p as usize].lock().await;
            let changes = st.take_log_since(since);
            let table = self.table();
            if table.owner(p) != Some(&self.inner.me) || st.epoch != epoch {
                return Err(not_owner(&table));
            }
            match changes {
                Some(changes) => {
                    for (version, change) in changes {
                        let req = BackupRequest {
                            service: slot.service.name().to_string(),
                            partition: p,
                            table_version: table.version(),
                            epoch,
                            version,
                            change,
                        };
                        let answer: BackupResponse = self
                            .ask(
                                &destination,
                                routes::BACKUP,
                                &req,
                                self.inner.config.backup_timeout,
                            )
                            .await?;
                        if answer != BackupResponse::Applied {
                            return Err("destination refused the catch-up".into());
                        }
                    }
                }
                // Too much changed meanwhile: copy again, this time under the lock.
                None => {
                    let (entries, bytes) = self.sync_to(&slot, p, &st, &destination).await?;
                    total.entries += entries;
                    total.bytes += bytes;
                }
            }
            let mut extras = self.inner.partitions[p as usize]
                .extras
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if !extras.iter().any(|(m, _)| *m == destination) {
                extras.push((destination.clone(), Instant::now()));
            }
        }
        Ok(total)
    }

    /// Stops operations on a partition before its ownership changes hands. Returns once
    /// every operation that started before is fully replicated.
    pub(super) async fn on_freeze(&self, req: FreezeRequest) -> Result<(), String> {
        // A task of its own (see `on_migrate`): it may wait, or copy the partition.
        tokio::task::yield_now().await;
        let p = req.partition;
        let ctl = self
            .inner
            .partitions
            .get(p as usize)
            .ok_or_else(|| format!("no partition {p}"))?;
        *ctl.frozen.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((req.table_version, Instant::now() + FREEZE_TIMEOUT));
        let new_owner: Arc<str> = Arc::from(req.new_owner.as_str());
        let live = self.inner.cluster.member(&new_owner).is_some();
        for slot in self.slots() {
            // Waits out the operations already running (they hold the lock)...
            let mut st = slot.replicas[p as usize].lock().await;
            // ...then makes sure the new owner has everything: a change that missed it
            // would otherwise be lost at the switch.
            if !live {
                continue;
            }
            let table = self.table();
            if table.owner(p) == Some(&self.inner.me) {
                st.epoch = table.epoch(p);
            }
            let check = VersionCheck {
                table_version: table.version(),
                replicas: vec![(slot.service.name().to_string(), p, st.epoch, st.version)],
            };
            let stale: Stale = self
                .ask(
                    &new_owner,
                    routes::ANTI_ENTROPY,
                    &check,
                    Duration::from_secs(5),
                )
                .await
                .map_err(|e| format!("cannot check the new owner: {e}"))?;
            if !stale.replicas.is_empty() {
                warn!(partition = p, new_owner = %new_owner, "new owner behind at handoff; copying the partition again");
                self.sync_to(&slot, p, &st, &new_owner).await?;
            }
        }
        // The deadline counts from now: waiting for the locks may have taken a while.
        *ctl.frozen.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((req.table_version, Instant::now() + FREEZE_TIMEOUT));
        Ok(())
    }
}

impl Runtime {
    /// A backup's side of anti-entropy: which of the owner's replicas it does not match.
    /// A check from a member that this one's table no longer names as the owner is
    /// refused: its repairs would overwrite newer state.
    pub(super) async fn on_version_check(
        &self,
        sender: &str,
        check: VersionCheck,
    ) -> Result<Stale, String> {
        let table = self.table();
        for (_, p, epoch, _) in &check.replicas {
            let from = Sender {
                member: sender,
                table_version: check.table_version,
                epoch: *epoch,
            };
            if let Some(newer) = view_of(&table, *p).superseded(&from) {
                metrics::counter!("grid_stale_owner_refusals_total").increment(1);
                return Err(format!(
                    "{sender} does not own partition {p} in table {newer}"
                ));
            }
        }
        let mut stale = Stale::default();
        for (service, p, epoch, version) in check.replicas {
            let Some(slot) = self.slot(&service) else {
                continue;
            };
            let Some(replica) = slot.replicas.get(p as usize) else {
                continue;
            };
            let st = replica.lock().await;
            // A healthy backup is at the owner's version or one ahead (it applies a change
            // before the owner does); behind, or on another epoch, it missed something.
            if st.epoch != epoch || st.version < version {
                stale.replicas.push((service, p));
            }
        }
        Ok(stale)
    }

    /// One anti-entropy pass: for every partition this member owns, compare each backup's
    /// (epoch, version) with ours and send the whole partition to backups that differ. It
    /// repairs a backup that missed a change on a partition that has not changed since (the
    /// next change would have resynchronised it anyway).
    pub(super) async fn anti_entropy_pass(&self) {
        // A member that was paused must first learn whether it still owns anything: its
        // timer fires at once when it resumes, with the table it had before.
        if !self.may_serve() {
            return;
        }
        let table = self.table();
        let me = self.inner.me.clone();
        let mut per_backup: std::collections::BTreeMap<Arc<str>, Vec<ReplicaVersion>> =
            std::collections::BTreeMap::new();
        for slot in self.slots() {
            for p in 0..table.partitions() {
                if table.owner(p) != Some(&me) {
                    continue;
                }
                let mut st = slot.replicas[p as usize].lock().await;
                st.epoch = table.epoch(p);
                for b in table.replicas(p).skip(1) {
                    per_backup.entry(b.clone()).or_default().push((
                        slot.service.name().to_string(),
                        p,
                        st.epoch,
                        st.version,
                    ));
                }
            }
        }
        for (backup, replicas) in per_backup {
            let Some(member) = self.inner.cluster.member(&backup) else {
                continue;
            };
            let stale: Result<Stale, _> = self
                .inner
                .transport
                .request_typed(
                    member.addr,
                    routes::ANTI_ENTROPY,
                    &VersionCheck {
                        table_version: table.version(),
                        replicas,
                    },
                    Duration::from_secs(10),
                )
                .await;
            let Ok(stale) = stale else { continue };
            for (service, p) in stale.replicas {
                let Some(slot) = self.slot(&service) else {
                    continue;
                };
                let Some(replica) = slot.replicas.get(p as usize) else {
                    continue;
                };
                // The snapshot is taken under the partition's lock; the transfer runs
                // without it, so that writes, freezes and migrations of the partition do
                // not wait for a copy that may take seconds. A write made meanwhile finds
                // the backup still behind and resynchronises it itself; this copy, older
                // by then, is refused (or lands first and the change follows it).
                let (epoch, version, entries, chunks) = {
                    let mut st = replica.lock().await;
                    let table = self.table();
                    if table.owner(p) != Some(&me)
                        || table.rank_of(p, &backup).is_none()
                        || !self.may_serve()
                    {
                        continue;
                    }
                    st.epoch = table.epoch(p);
                    let entries = slot.service.partition_len(p) as u64;
                    match self.take_snapshot(&slot, p).await {
                        Ok(chunks) => (st.epoch, st.version, entries, chunks),
                        Err(e) => {
                            warn!(partition = p, %backup, error = %e, "anti-entropy snapshot failed");
                            continue;
                        }
                    }
                };
                tracing::info!(partition = p, %backup, "anti-entropy: backup differs, resynchronising");
                metrics::counter!("grid_anti_entropy_repairs_total").increment(1);
                let sent = self
                    .send_snapshot(&slot, p, epoch, version, entries, chunks, &backup)
                    .await;
                if let Err(e) = sent {
                    warn!(partition = p, %backup, error = %e, "anti-entropy sync failed");
                }
            }
        }
    }
}

impl Runtime {
    /// Runs one anti-entropy pass now (for tests; passes also run on their own timer).
    #[doc(hidden)]
    pub async fn anti_entropy_pass_for_tests(&self) {
        self.anti_entropy_pass().await;
    }
}

/// Runs anti-entropy passes every `interval` for the life of the runtime.
pub(super) async fn anti_entropy_loop(weak: std::sync::Weak<super::Inner>, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(inner) = weak.upgrade() else { return };
        Runtime { inner }.anti_entropy_pass().await;
    }
}

/// Records when partition copies start and end (see `Runtime::copy_window`).
struct CopyUnderWay<'a>(&'a std::sync::Mutex<super::Copies>);

impl<'a> CopyUnderWay<'a> {
    fn new(copies: &'a std::sync::Mutex<super::Copies>) -> Self {
        copies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .first_start
            .get_or_insert_with(Instant::now);
        Self(copies)
    }
}

impl Drop for CopyUnderWay<'_> {
    fn drop(&mut self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).last_end = Some(Instant::now());
    }
}
