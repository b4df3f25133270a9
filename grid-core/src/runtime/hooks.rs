//! The runtime's side of the service interface beyond operations: carrying out effects
//! (wake a parked call, send a message, arm a timer, submit an operation), the ownership
//! hooks and owner tasks, the member-departure hook, the timers' firing, and parked calls.
//!
//! Every hook runs on the owner under the partition's lock, like `prepare` and `apply`, so a
//! service never sees two of them at once for one partition.

use std::sync::Arc;
use std::time::Duration;

use grid_net::membership::MemberEvent;
use tokio::sync::oneshot;
use tracing::{debug, warn};

use super::erased::ErasedEffects;
use super::messages::OpResponse;
use super::service::{CallId, Ctx, Role, TimerCommand};
use super::{Inner, OpKind, Runtime, ServiceSlot};

/// Calls parked on this member at most (a call beyond it fails at once).
const MAX_PARKED: usize = 65_536;
/// Submitted operations and service messages under way at most; beyond it they are
/// dropped (logged and counted): a service that produces them faster than they run is
/// refused rather than buffered without bound.
const MAX_BACKGROUND: usize = 4_096;
/// A timer due while this member confirms its ownership after a pause fires this much
/// later instead.
const TIMER_RETRY: Duration = Duration::from_millis(100);

/// A call waiting for a service to wake it.
pub(crate) struct Parked {
    service: Arc<str>,
    partition: u32,
    answer: oneshot::Sender<OpResponse>,
}

/// How a write on the owner ended.
pub(crate) enum Written {
    /// With this response.
    Answered(OpResponse),
    /// Parked: the answer comes on the receiver. The guard reports the call abandoned if
    /// this value is dropped before the answer (its caller gave up even before the wait).
    Parked(AbandonOnDrop, oneshot::Receiver<OpResponse>),
}

/// Reports a parked call whose caller gave up, unless it was answered first.
pub(crate) struct AbandonOnDrop {
    runtime: Runtime,
    call: CallId,
}

impl Drop for AbandonOnDrop {
    fn drop(&mut self) {
        let parked = self
            .runtime
            .inner
            .parked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.call);
        if let Some(parked) = parked {
            let rt = self.runtime.clone();
            let call = self.call;
            // Drop may run outside a runtime only when the whole runtime is going away.
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move { rt.abandoned(parked, call).await });
            }
        }
    }
}

static BACKGROUND: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Counts a background task for `MAX_BACKGROUND` while it lives.
struct BackgroundSlot;

impl BackgroundSlot {
    fn take() -> Option<Self> {
        let n = BACKGROUND.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        if n >= MAX_BACKGROUND {
            BACKGROUND.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
            metrics::counter!("grid_service_effects_dropped_total").increment(1);
            return None;
        }
        Some(Self)
    }
}

impl Drop for BackgroundSlot {
    fn drop(&mut self) {
        BACKGROUND.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl Runtime {
    /// The context of a hook on the owner.
    fn owner_ctx(&self, p: u32, version: u64) -> Ctx {
        let table = self.table();
        Ctx {
            partition: p,
            epoch: table.epoch(p),
            version,
            table_version: table.version(),
            member: self.inner.me.clone(),
            caller: None,
            call: None,
            now: crate::clock::now(),
            role: Role::Owner,
        }
    }

    /// Registers a parked call of `service` on `p`.
    pub(super) fn park(
        &self,
        service: &Arc<str>,
        p: u32,
        call: CallId,
    ) -> Result<oneshot::Receiver<OpResponse>, OpResponse> {
        let mut parked = self.inner.parked.lock().unwrap_or_else(|e| e.into_inner());
        if parked.len() >= MAX_PARKED {
            return Err(OpResponse::Failed(format!(
                "too many calls waiting on this member ({MAX_PARKED})"
            )));
        }
        let (tx, rx) = oneshot::channel();
        parked.insert(
            call,
            Parked {
                service: service.clone(),
                partition: p,
                answer: tx,
            },
        );
        Ok(rx)
    }

    /// The guard of a parked call (see [`Written::Parked`]).
    pub(super) fn abandon_guard(&self, call: CallId) -> AbandonOnDrop {
        AbandonOnDrop {
            runtime: self.clone(),
            call,
        }
    }

    /// Forgets a parked call whose operation did not happen.
    pub(super) fn unpark(&self, call: CallId) {
        self.inner
            .parked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&call);
    }

    /// Waits for a parked call's answer, at most the operation timeout; a wait that ends
    /// without one (the caller gave up, or the timeout) is reported to the service.
    pub(super) async fn wait_parked(
        &self,
        guard: AbandonOnDrop,
        answer: oneshot::Receiver<OpResponse>,
    ) -> OpResponse {
        let got = tokio::time::timeout(self.inner.config.op_timeout, answer).await;
        drop(guard);
        match got {
            Ok(Ok(response)) => response,
            Ok(Err(_)) => OpResponse::Failed("the runtime stopped".into()),
            Err(_) => OpResponse::Failed(format!(
                "not woken within {:?}",
                self.inner.config.op_timeout
            )),
        }
    }

    /// Tells the service that a parked call's caller is gone.
    async fn abandoned(&self, parked: Parked, call: CallId) {
        let Some(slot) = self.slot(&parked.service) else {
            return;
        };
        let p = parked.partition;
        let st = slot.replicas[p as usize].lock().await;
        if !st.hooked {
            return;
        }
        let ctx = self.owner_ctx(p, st.version);
        let fx = slot.service.on_abandoned(&ctx, call);
        self.carry_out(&slot, p, fx, None);
    }

    /// Carries out what a service asked for on partition `p` (the caller holds the
    /// partition's lock). Woken callers whose answer comes from a change that a backup did
    /// not confirm hear that (`unreplicated`).
    pub(super) fn carry_out(
        &self,
        slot: &Arc<ServiceSlot>,
        p: u32,
        fx: ErasedEffects,
        unreplicated: Option<&str>,
    ) {
        if fx.is_empty() {
            return;
        }
        if !fx.wakes.is_empty() {
            let mut parked = self.inner.parked.lock().unwrap_or_else(|e| e.into_inner());
            for (call, answer) in fx.wakes {
                let Some(waiting) = parked.remove(&call) else {
                    debug!(?call, "woken call is no longer parked here");
                    continue;
                };
                let response = match unreplicated {
                    None => OpResponse::Ok(answer),
                    Some(why) => OpResponse::Unreplicated {
                        why: why.to_string(),
                        answer,
                    },
                };
                let _ = waiting.answer.send(response);
            }
        }
        if !fx.timers.is_empty() {
            let mut timers = self.inner.timers.lock().unwrap_or_else(|e| e.into_inner());
            for command in fx.timers {
                match command {
                    TimerCommand::Arm { id, at } => {
                        timers.arm((slot.name.clone(), p, id), at);
                    }
                    TimerCommand::Cancel { id } => timers.cancel(&(slot.name.clone(), p, id)),
                }
            }
            drop(timers);
            self.inner.timers_changed.notify_one();
        }
        for (member, message) in fx.messages {
            let Some(background) = BackgroundSlot::take() else {
                warn!(service = %slot.name, %member, "too many service messages under way; one dropped");
                continue;
            };
            let rt = self.clone();
            let service = slot.name.clone();
            tokio::spawn(async move {
                let _background = background;
                if let Err(e) = super::handle::send_encoded(&rt, &service, &member, message).await {
                    debug!(%service, %member, error = %e, "service message not sent");
                }
            });
        }
        for op in fx.submits {
            let Some(background) = BackgroundSlot::take() else {
                warn!(service = %slot.name, partition = p, "too many submitted operations under way; one dropped");
                continue;
            };
            let rt = self.clone();
            let service = slot.name.clone();
            tokio::spawn(async move {
                let _background = background;
                if let Err(e) = rt.execute(&service, p, op, OpKind::Write).await {
                    warn!(%service, partition = p, error = %e, "operation submitted by the service failed");
                }
            });
        }
    }

    /// Tells every service whether this member now owns `p` (`on_owned`, then the owner
    /// task; or `on_disowned`, with its timers, owner task and parked calls dropped). Runs
    /// under each service's partition lock and acts on the table of that moment, so that
    /// hooks spawned for tables in quick succession converge on the last one.
    pub(super) async fn ownership_changed(&self, p: u32) {
        for slot in self.slots() {
            let mut st = slot.replicas[p as usize].lock().await;
            let table = self.table();
            let owned = table.owner(p) == Some(&self.inner.me);
            if owned && !st.hooked {
                st.hooked = true;
                st.epoch = table.epoch(p);
                let ctx = self.owner_ctx(p, st.version);
                slot.applied[p as usize].store(st.version, std::sync::atomic::Ordering::Release);
                let fx = slot.service.on_owned(&ctx);
                self.carry_out(&slot, p, fx, None);
                if let Some(task) = slot.service.owner_task(p, self) {
                    let handle = tokio::spawn(task).abort_handle();
                    let old = slot
                        .owner_tasks
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(p, handle);
                    if let Some(old) = old {
                        old.abort();
                    }
                }
            } else if !owned && st.hooked {
                st.hooked = false;
                self.disown(&slot, p, table.version());
            }
        }
    }

    /// The service's state of `p` that lives only on the owner goes (see
    /// `ownership_changed`).
    fn disown(&self, slot: &Arc<ServiceSlot>, p: u32, table_version: u64) {
        if let Some(task) = slot
            .owner_tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&p)
        {
            task.abort();
        }
        self.inner
            .timers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .cancel_partition(&slot.name, p);
        let moved: Vec<Parked> = {
            let mut parked = self.inner.parked.lock().unwrap_or_else(|e| e.into_inner());
            let calls: Vec<CallId> = parked
                .iter()
                .filter(|(_, w)| w.service == slot.name && w.partition == p)
                .map(|(c, _)| *c)
                .collect();
            calls.iter().filter_map(|c| parked.remove(c)).collect()
        };
        // Their callers ask the new owner.
        for waiting in moved {
            let _ = waiting
                .answer
                .send(OpResponse::WrongOwner { table_version });
        }
        slot.service.on_disowned(p);
    }

    /// Fires one timer that came due, unless it was re-armed, cancelled or its partition
    /// moved meanwhile.
    async fn fire_timer(&self, key: super::timers::TimerKey, generation: u64) {
        let (service, p, id) = key.clone();
        let Some(slot) = self.slot(&service) else {
            return;
        };
        let st = slot.replicas[p as usize].lock().await;
        if !st.hooked
            || !self
                .inner
                .timers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_current(&key, generation)
        {
            return;
        }
        if !self.may_serve() {
            // Paused: the timer waits until this member knows it still owns `p`.
            let mut timers = self.inner.timers.lock().unwrap_or_else(|e| e.into_inner());
            timers.arm(key, crate::clock::now() + TIMER_RETRY);
            drop(timers);
            self.inner.timers_changed.notify_one();
            return;
        }
        let ctx = self.owner_ctx(p, st.version);
        let fx = slot.service.on_timer(&ctx, id);
        self.carry_out(&slot, p, fx, None);
    }

    /// Tells the services of every partition owned here that `member` left.
    async fn member_left(&self, member: &str) {
        for slot in self.slots() {
            for p in 0..self.inner.config.table.partitions {
                if self.table().owner(p) != Some(&self.inner.me) {
                    continue;
                }
                let st = slot.replicas[p as usize].lock().await;
                if !st.hooked {
                    continue;
                }
                let ctx = self.owner_ctx(p, st.version);
                let fx = slot.service.on_member_left(&ctx, member);
                self.carry_out(&slot, p, fx, None);
            }
        }
    }
}

/// Fires the services' timers for the life of the runtime.
pub(super) async fn fire_timers(weak: std::sync::Weak<Inner>) {
    // How long the loop sleeps with no timer armed before it checks the runtime is alive.
    const IDLE: Duration = Duration::from_secs(1);
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let nudge = inner.timers_changed.clone();
        // Registered before the deadline is read: an arming in between still wakes us.
        let changed = nudge.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let rt = Runtime { inner };
        fire_due(&rt);
        let (next, armed) = {
            let timers = rt.inner.timers.lock().unwrap_or_else(|e| e.into_inner());
            (timers.next_deadline(), timers.len())
        };
        metrics::gauge!("grid_service_timers_armed").set(armed as f64);
        drop(rt);
        let until = next.unwrap_or_else(|| crate::clock::now() + IDLE);
        tokio::select! {
            _ = tokio::time::sleep_until(until) => {}
            _ = &mut changed => {}
        }
    }
}

fn fire_due(rt: &Runtime) {
    let due = rt
        .inner
        .timers
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .due(crate::clock::now());
    for (key, generation) in due {
        let rt = rt.clone();
        tokio::spawn(async move { rt.fire_timer(key, generation).await });
    }
}

/// Calls `on_member_left` for every member that leaves or fails, for the life of the
/// runtime.
pub(super) async fn follow_departures(weak: std::sync::Weak<Inner>) {
    let Some(mut events) = weak.upgrade().map(|i| i.cluster.events()) else {
        return;
    };
    while let Some(event) = events.recv().await {
        let (MemberEvent::Left(m) | MemberEvent::Failed(m)) = event else {
            continue;
        };
        let Some(inner) = weak.upgrade() else { return };
        let rt = Runtime { inner };
        tokio::spawn(async move { rt.member_left(&m.id).await });
    }
}
