//! Entry events: what the owner reports after applying a change, and how those reports
//! reach the members that want them (listeners, near copies, replicated copies).
//!
//! A member that wants a cache's events tells every member ("interest"), and tells each
//! member that joins later. An owner sends a cache's events only to the members interested
//! in it, on the ordered one-way channel, so the events of one key (one partition, one
//! owner applying one change at a time) arrive in the order they happened.
//!
//! Each member numbers the batches it sends to each other member (and skips a number when
//! its outbox had to drop events), so a receiver notices any loss: its handlers then get a
//! `Lost` event — near copies empty themselves, replicated copies fill again, listeners
//! hear it — instead of serving what a lost event would have changed.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use grid_core::runtime::ServiceHandle;
use grid_net::membership::{Cluster, MemberEvent};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::{debug, warn};

/// What happened to an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    /// A key got a value.
    Added,
    /// A key's value changed.
    Updated,
    /// A key was removed by a caller.
    Removed,
    /// A key's time to live or idle time passed.
    Expired,
    /// A key made room under `max_entries`.
    Evicted,
    /// Every entry of a partition was removed (`remove_all`).
    Cleared,
    /// Events from a member were lost on the way here (its queue was full, or a send
    /// failed): entries may have changed without an event.
    Lost,
}

/// An event as the owner reports it: encoded keys and values.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct RawEvent {
    pub(crate) cache: Arc<str>,
    /// The key's partition (for `Cleared`, the partition cleared).
    pub(crate) partition: u32,
    pub(crate) kind: EventKind,
    #[serde(with = "grid_core::codec::bin")]
    pub(crate) key: Vec<u8>,
    pub(crate) old: Option<crate::ops::Blob>,
    pub(crate) value: Option<crate::ops::Blob>,
    /// For copies: when the new value expires (0: never) and its idle time to live.
    pub(crate) expire_at: u64,
    pub(crate) idle_ms: u32,
}

impl RawEvent {
    /// A `Lost` event for `cache`'s handlers.
    pub(crate) fn lost(cache: Arc<str>) -> Self {
        Self {
            cache,
            partition: 0,
            kind: EventKind::Lost,
            key: Vec::new(),
            old: None,
            value: None,
            expire_at: 0,
            idle_ms: 0,
        }
    }

    pub(crate) fn value_bytes(&self) -> Option<&[u8]> {
        self.value.as_ref().map(|b| &b.0[..])
    }
}

/// Where a store reports events.
pub(crate) trait EventSink: Send + Sync {
    /// Whether anyone wants `cache`'s events (so the store does not copy values for
    /// nobody).
    fn wants(&self, cache: &str) -> bool;
    /// Reports an event. Must not block.
    fn emit(&self, event: RawEvent);
}

type Handler = Arc<dyn Fn(&RawEvent) + Send + Sync>;
/// Each cache's handlers on this member, with their ids and what they want.
type Handlers = HashMap<Arc<str>, Vec<(u64, Want, Handler)>>;

/// What the cache service sends between members (through the runtime's service messages:
/// the hub has no routes of its own).
#[derive(Debug, Serialize, Deserialize)]
pub struct CacheMessage(pub(crate) HubMessage);

#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum HubMessage {
    /// Events for a member that wants them (one-way, ordered).
    Events(EventBatch),
    /// A member's interest in a cache's events (asked: the answer confirms it arrived).
    Interest(Interest),
    /// The answer to `Interest`.
    Noted,
}

/// How long an interest announcement waits for its confirmation.
const INTEREST_TIMEOUT: Duration = Duration::from_secs(5);

/// Most events queued for sending on one member; beyond it events are dropped (counted
/// and logged), as a slow listener must not stall writes.
const OUTBOX: usize = 65_536;
/// Most events in one message.
const BATCH: usize = 256;

/// What a member wants of a cache's events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub(crate) enum Want {
    /// Which keys changed (near copies): events without values.
    Keys,
    /// Everything, values included (listeners, replicated copies).
    Values,
}

/// A member's interest in a cache's events (`None`: none any more). `seq` orders a
/// member's announcements, which may arrive out of order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Interest {
    cache: String,
    want: Option<Want>,
    seq: u64,
}

/// A numbered batch of events from one member to another.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct EventBatch {
    /// The sender's start generation: numbering restarts with it.
    incarnation: u64,
    /// This batch's number in the sender's stream to the receiver (from 1).
    seq: u64,
    events: Vec<RawEvent>,
}

/// What a receiver expects next from each sender: (incarnation, next batch number).
#[derive(Debug, Default)]
pub(crate) struct Expected(HashMap<Arc<str>, (u64, u64)>);

impl Expected {
    /// Records a batch from `sender`; returns whether batches were lost before it.
    pub(crate) fn arrived(&mut self, sender: &Arc<str>, incarnation: u64, seq: u64) -> bool {
        let next = match self.0.get(sender) {
            Some(&(inc, next)) if inc == incarnation => next,
            // A sender (or an incarnation of it) not heard from before starts at 1.
            _ => 1,
        };
        self.0
            .insert(sender.clone(), (incarnation, seq.saturating_add(1)));
        seq != next
    }

    fn forget(&mut self, sender: &str) {
        self.0.remove(sender);
    }
}

/// Who wants a cache's events: member → (what, sequence of the announcement).
type Interested = BTreeMap<Arc<str>, (Option<Want>, u64)>;

/// The member's event hub.
pub(crate) struct EventHub {
    /// The cache service's door to the runtime: the hub's messages go through it.
    handle: ServiceHandle<crate::store::CacheService>,
    cluster: Cluster,
    me: Arc<str>,
    /// Members (this one included) that want each cache's events.
    interest: RwLock<HashMap<Arc<str>, Interested>>,
    /// Sequence of this member's announcements.
    seq: AtomicU64,
    /// This member's handlers of each cache's events.
    handlers: RwLock<Handlers>,
    next_id: AtomicU64,
    outbox: mpsc::Sender<RawEvent>,
    dropped: AtomicU64,
    /// This member's start generation, which numbers its batches (see [`EventBatch`]).
    incarnation: u64,
    /// What this hub expects from each sender.
    expected: std::sync::Mutex<Expected>,
    /// Batches lost on the way here, as noticed by the numbering.
    lost: AtomicU64,
    /// Fault injection: this many of the next outgoing batches fail.
    fail_batches: AtomicU64,
    /// Fault injection: this many of the next interest announcements count as failed.
    fail_interest: AtomicU64,
    /// Events still to drop at the outbox (fault injection).
    drop_events: AtomicU64,
    /// (cache, member) whose last interest announcement did not arrive.
    unconfirmed: std::sync::Mutex<std::collections::HashSet<(Arc<str>, Arc<str>)>>,
}

impl std::fmt::Debug for EventHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventHub").field("me", &self.me).finish()
    }
}

/// Keeps a handler registered; dropping it unregisters (and, for the last handler of a
/// cache, withdraws this member's interest).
pub(crate) struct HandlerGuard {
    hub: Weak<EventHub>,
    cache: Arc<str>,
    id: u64,
}

impl Drop for HandlerGuard {
    fn drop(&mut self) {
        if let Some(hub) = self.hub.upgrade() {
            hub.remove_handler(&self.cache, self.id);
        }
    }
}

impl EventHub {
    pub(crate) fn start(
        handle: ServiceHandle<crate::store::CacheService>,
        cluster: Cluster,
    ) -> Arc<Self> {
        let (tx, rx) = mpsc::channel(OUTBOX);
        let cluster_generation = cluster.local_member().generation;
        let hub = Arc::new(Self {
            me: cluster.local_member().id.clone(),
            handle,
            cluster,
            interest: RwLock::new(HashMap::new()),
            seq: AtomicU64::new(1),
            handlers: RwLock::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            outbox: tx,
            dropped: AtomicU64::new(0),
            incarnation: cluster_generation,
            expected: std::sync::Mutex::new(Expected::default()),
            lost: AtomicU64::new(0),
            fail_batches: AtomicU64::new(0),
            fail_interest: AtomicU64::new(0),
            drop_events: AtomicU64::new(0),
            unconfirmed: std::sync::Mutex::new(std::collections::HashSet::new()),
        });
        tokio::spawn(dispatch(Arc::downgrade(&hub), rx));
        tokio::spawn(follow_members(Arc::downgrade(&hub), hub.cluster.clone()));
        tokio::spawn(reannounce(Arc::downgrade(&hub)));
        hub
    }

    /// A message of the cache service from `from` (see [`CacheMessage`]).
    pub(crate) fn on_message(&self, from: &str, message: CacheMessage) {
        match message.0 {
            HubMessage::Events(batch) => self.on_events(&Arc::from(from), batch),
            other => debug!(%from, message = ?other, "unexpected cache message dropped"),
        }
    }

    /// A request of the cache service from `from`: an interest announcement.
    pub(crate) fn on_ask(&self, from: &str, message: CacheMessage) -> Option<CacheMessage> {
        match message.0 {
            HubMessage::Interest(req) => {
                self.set_interest(&req.cache, &Arc::from(from), req.want, req.seq);
                Some(CacheMessage(HubMessage::Noted))
            }
            _ => None,
        }
    }

    /// A batch of events from `sender`: a gap in its numbering means events were lost.
    fn on_events(&self, sender: &Arc<str>, batch: EventBatch) {
        let gap = self
            .expected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .arrived(sender, batch.incarnation, batch.seq);
        if gap {
            self.on_lost(sender);
        }
        batch.events.iter().for_each(|e| self.deliver_local(e));
    }

    /// Records what `member` wants of `cache`, unless a later announcement of its own
    /// already arrived.
    fn set_interest(&self, cache: &str, member: &Arc<str>, want: Option<Want>, seq: u64) {
        let mut interest = self.interest.write().unwrap_or_else(|e| e.into_inner());
        let members = interest.entry(cache.into()).or_default();
        match members.get(member) {
            Some((_, newer)) if *newer > seq => {}
            _ => {
                members.insert(member.clone(), (want, seq));
            }
        }
        if members.values().all(|(w, _)| w.is_none()) {
            interest.remove(cache);
        }
    }

    /// What this member's handlers of `cache` want together.
    fn local_want(&self, cache: &str) -> Option<Want> {
        self.handlers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(cache)
            .and_then(|list| list.iter().map(|(_, w, _)| *w).max())
    }

    /// Registers `handler` for `cache`'s events on this member; returns once every
    /// current member knows this member wants them.
    pub(crate) async fn add_handler(
        self: &Arc<Self>,
        cache: &str,
        want: Want,
        handler: Handler,
    ) -> HandlerGuard {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let before = self.local_want(cache);
        self.handlers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(cache.into())
            .or_default()
            .push((id, want, handler));
        let after = self.local_want(cache);
        if after != before {
            self.announce(cache, after).await;
        }
        HandlerGuard {
            hub: Arc::downgrade(self),
            cache: cache.into(),
            id,
        }
    }

    fn remove_handler(self: &Arc<Self>, cache: &Arc<str>, id: u64) {
        let before = self.local_want(cache);
        {
            let mut handlers = self.handlers.write().unwrap_or_else(|e| e.into_inner());
            let Some(list) = handlers.get_mut(cache) else {
                return;
            };
            list.retain(|(i, _, _)| *i != id);
            if list.is_empty() {
                handlers.remove(cache);
            }
        }
        let after = self.local_want(cache);
        if after != before {
            let hub = self.clone();
            let cache = cache.clone();
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move { hub.announce(&cache, after).await });
            }
        }
    }

    /// Tells every member (this one included) what this member wants of `cache`.
    async fn announce(&self, cache: &str, want: Option<Want>) {
        let req = Interest {
            cache: cache.to_string(),
            want,
            seq: self.seq.fetch_add(1, Ordering::Relaxed),
        };
        self.set_interest(cache, &self.me, want, req.seq);
        let members = self.cluster.members();
        let sends = members
            .iter()
            .filter(|m| m.id != self.me)
            .map(|m| self.tell(m, &req))
            .collect::<Vec<_>>();
        futures::future::join_all(sends).await;
    }

    /// Sends an interest announcement to `member`. One that fails leaves `member` not
    /// sending this cache's events, unseen by any numbering: once an announcement to it
    /// gets through again (they are repeated), the cache's handlers hear `Lost`, since
    /// copies made meanwhile may have missed changes.
    async fn tell(&self, member: &grid_net::membership::Member, req: &Interest) {
        let r: Result<(), grid_core::GridError> = if take_one(&self.fail_interest) {
            Err(grid_core::GridError::Service("injected failure".into()))
        } else {
            self.handle
                .ask(
                    &member.id,
                    &CacheMessage(HubMessage::Interest(req.clone())),
                    INTEREST_TIMEOUT,
                )
                .await
                .map(drop)
        };
        let key: (Arc<str>, Arc<str>) = (req.cache.as_str().into(), member.id.clone());
        let mut unconfirmed = self.unconfirmed.lock().unwrap_or_else(|e| e.into_inner());
        match r {
            Err(e) => {
                debug!(member = %member.id, error = %e, "interest not delivered");
                unconfirmed.insert(key);
            }
            Ok(()) => {
                if unconfirmed.remove(&key) {
                    drop(unconfirmed);
                    debug!(member = %member.id, cache = %req.cache, "interest delivered late");
                    self.deliver_local(&RawEvent::lost(key.0));
                }
            }
        }
    }

    /// Runs this member's handlers of the event's cache.
    pub(crate) fn deliver_local(&self, event: &RawEvent) {
        let handlers = self.handlers.read().unwrap_or_else(|e| e.into_inner());
        if let Some(list) = handlers.get(&event.cache) {
            for (_, _, h) in list {
                h(event);
            }
        }
    }

    /// Whether this member has handlers for `cache`.
    pub(crate) fn has_local(&self, cache: &str) -> bool {
        self.handlers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(cache)
    }

    fn targets(&self, cache: &str) -> Vec<(Arc<str>, Want)> {
        self.interest
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(cache)
            .map(|s| {
                s.iter()
                    .filter_map(|(m, (w, _))| w.map(|w| (m.clone(), w)))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Events dropped because the outbox was full.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Fault injection for tests: the next `n` batches this member sends fail as a broken
    /// connection would make them.
    pub(crate) fn fail_next_batches(&self, n: u64) {
        self.fail_batches.store(n, Ordering::Relaxed);
    }

    /// Fault injection for tests: the next `n` events are dropped as a full outbox drops
    /// them.
    pub(crate) fn drop_next_events(&self, n: u64) {
        self.drop_events.store(n, Ordering::Relaxed);
    }

    /// Fault injection for tests: the next `n` interest announcements count as failed (the
    /// member does not learn of them).
    pub(crate) fn fail_next_announcements(&self, n: u64) {
        self.fail_interest.store(n, Ordering::Relaxed);
    }

    /// Events from `sender` were lost: every handler hears `Lost` (which caches the lost
    /// events were of is unknown).
    fn on_lost(&self, sender: &Arc<str>) {
        let n = self.lost.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("grid_cache_event_batches_lost_total").increment(1);
        if n.is_power_of_two() {
            warn!(%sender, lost = n + 1, "cache events from a member were lost; copies refill");
        }
        for cache in self.handled_caches() {
            self.deliver_local(&RawEvent::lost(cache));
        }
    }

    /// The caches this member has handlers of.
    fn handled_caches(&self) -> Vec<Arc<str>> {
        self.handlers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }
}

impl EventSink for EventHub {
    fn wants(&self, cache: &str) -> bool {
        self.interest
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(cache)
    }

    fn emit(&self, event: RawEvent) {
        if take_one(&self.drop_events) || self.outbox.try_send(event).is_err() {
            let n = self.dropped.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("grid_cache_events_dropped_total").increment(1);
            if n.is_power_of_two() {
                warn!(dropped = n + 1, "cache event outbox full: events dropped");
            }
        }
    }
}

/// Events of a member-only store: delivered to this member's handlers, nowhere else.
pub(crate) struct LocalSink(pub(crate) Weak<EventHub>);

impl EventSink for LocalSink {
    fn wants(&self, cache: &str) -> bool {
        self.0.upgrade().is_some_and(|h| h.has_local(cache))
    }

    fn emit(&self, event: RawEvent) {
        if let Some(h) = self.0.upgrade() {
            h.deliver_local(&event);
        }
    }
}

/// Takes one from a fault-injection countdown; whether there was one to take.
fn take_one(countdown: &AtomicU64) -> bool {
    countdown
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
        .is_ok()
}

/// How soon a member that may have missed events hears of it when no other events follow.
const GAP_PROBE: Duration = Duration::from_millis(250);

/// Sends queued events to the members that want them, in batches, in order.
async fn dispatch(hub: Weak<EventHub>, mut rx: mpsc::Receiver<RawEvent>) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut out = Outgoing::default();
    let mut dropped_seen = 0;
    let mut probe = tokio::time::interval(GAP_PROBE);
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let got = tokio::select! {
            n = rx.recv_many(&mut batch, BATCH) => if n == 0 { return } else { true },
            _ = probe.tick() => false,
        };
        if got && batch.len() < BATCH {
            // As a lane writer does: let the tasks that are ready emit theirs first, so that
            // one batch (one frame per member) carries them all.
            tokio::task::yield_now().await;
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(ev) => batch.push(ev),
                    Err(_) => break,
                }
            }
        }
        let Some(hub) = hub.upgrade() else { return };
        out.forget_departed(&hub.cluster);
        let dropped = hub.dropped();
        if dropped != dropped_seen {
            // Events were dropped before they had a destination: skip a number for every
            // member that may have wanted them, so that each notices.
            dropped_seen = dropped;
            for m in hub.cluster.members().iter().filter(|m| m.id != hub.me) {
                out.skip((m.id.clone(), m.generation));
            }
            // This member's own copies and listeners were among those that may have wanted
            // them (they are served by this loop too).
            hub.on_lost(&hub.me);
        }
        if !got {
            // Members owed news of a gap get an empty batch (which shows it).
            for key in std::mem::take(&mut out.owed) {
                out.send(&hub, key, Vec::new()).await;
            }
            continue;
        }
        // Members that want keys only get events without values: less to copy and send.
        let mut per_member: HashMap<Arc<str>, Vec<RawEvent>> = HashMap::new();
        for ev in &batch {
            for (m, want) in hub.targets(&ev.cache) {
                if m == hub.me {
                    hub.deliver_local(ev);
                    continue;
                }
                let ev = match want {
                    Want::Values => ev.clone(),
                    Want::Keys => RawEvent {
                        old: None,
                        value: None,
                        key: ev.key.clone(),
                        cache: ev.cache.clone(),
                        ..*ev
                    },
                };
                per_member.entry(m).or_default().push(ev);
            }
        }
        for (member, events) in per_member {
            let Some(m) = hub.cluster.member(&member) else {
                continue;
            };
            out.owed.remove(&(member.clone(), m.generation));
            out.send(&hub, (member, m.generation), events).await;
        }
        batch.clear();
    }
}

/// The dispatcher's numbering of its batches to each member (by id and start generation:
/// a restarted member expects 1 again).
#[derive(Default)]
struct Outgoing {
    next_seq: HashMap<(Arc<str>, u64), u64>,
    /// Members whose stream has a gap they have not been sent a batch after yet.
    owed: std::collections::HashSet<(Arc<str>, u64)>,
}

impl Outgoing {
    fn forget_departed(&mut self, cluster: &Cluster) {
        let live = |(id, generation): &(Arc<str>, u64)| {
            cluster
                .member(id)
                .is_some_and(|m| m.generation == *generation)
        };
        self.next_seq.retain(|k, _| live(k));
        self.owed.retain(live);
    }

    /// Leaves a gap in `member`'s numbering.
    fn skip(&mut self, member: (Arc<str>, u64)) {
        *self.next_seq.entry(member.clone()).or_insert(1) += 1;
        self.owed.insert(member);
    }

    async fn send(&mut self, hub: &EventHub, member: (Arc<str>, u64), events: Vec<RawEvent>) {
        let Some(m) = hub.cluster.member(&member.0) else {
            return;
        };
        let seq = self.next_seq.entry(member.clone()).or_insert(1);
        let batch = EventBatch {
            incarnation: hub.incarnation,
            seq: *seq,
            events,
        };
        // Taken even if the send fails: the member notices the gap.
        *seq += 1;
        if take_one(&hub.fail_batches) {
            debug!(member = %member.0, "cache events not sent (injected failure)");
            self.owed.insert(member);
            return;
        }
        if let Err(e) = hub
            .handle
            .send(&m.id, &CacheMessage(HubMessage::Events(batch)))
            .await
        {
            debug!(member = %member.0, error = %e, "cache events not sent");
            self.owed.insert(member);
        }
    }
}

/// How often a member repeats what it wants to every member: an announcement that did not
/// arrive would otherwise leave an owner not sending events that nobody misses.
const REANNOUNCE: Duration = Duration::from_secs(5);

/// Repeats this member's interests to every member, every [`REANNOUNCE`].
async fn reannounce(hub: Weak<EventHub>) {
    let mut tick = tokio::time::interval(REANNOUNCE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(hub) = hub.upgrade() else { return };
        // What each cache wants and the announcement's number, read together under the
        // handlers' lock: a handler added or removed meanwhile announces with a later number,
        // which wins.
        let reqs: Vec<Interest> = {
            let handlers = hub.handlers.read().unwrap_or_else(|e| e.into_inner());
            handlers
                .iter()
                .map(|(cache, list)| Interest {
                    cache: cache.to_string(),
                    want: list.iter().map(|(_, w, _)| *w).max(),
                    seq: hub.seq.fetch_add(1, Ordering::Relaxed),
                })
                .collect()
        };
        let members = hub.cluster.members();
        for req in &reqs {
            let sends = members
                .iter()
                .filter(|m| m.id != hub.me)
                .map(|m| hub.tell(m, req));
            futures::future::join_all(sends).await;
        }
    }
}

/// Tells joining members what this member wants; forgets what departed members wanted.
async fn follow_members(hub: Weak<EventHub>, cluster: Cluster) {
    let mut events = cluster.events();
    while let Some(ev) = events.recv().await {
        let Some(hub) = hub.upgrade() else { return };
        match ev {
            MemberEvent::Joined(m) => {
                let caches = hub.handled_caches();
                let hub = hub.clone();
                tokio::spawn(async move {
                    for cache in caches {
                        let req = Interest {
                            cache: cache.to_string(),
                            want: hub.local_want(&cache),
                            seq: hub.seq.fetch_add(1, Ordering::Relaxed),
                        };
                        hub.tell(&m, &req).await;
                    }
                });
            }
            MemberEvent::Left(m) | MemberEvent::Failed(m) => {
                hub.expected
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .forget(&m.id);
                let mut interest = hub.interest.write().unwrap_or_else(|e| e.into_inner());
                for members in interest.values_mut() {
                    members.remove(&m.id);
                }
                interest.retain(|_, s| s.values().any(|(w, _)| w.is_some()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbering_notices_every_gap() {
        let mut e = Expected::default();
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        assert!(!e.arrived(&a, 7, 1));
        assert!(!e.arrived(&a, 7, 2));
        assert!(e.arrived(&a, 7, 4), "batch 3 was lost");
        assert!(!e.arrived(&a, 7, 5));
        // Another sender, heard first after its first batch was lost.
        assert!(e.arrived(&b, 1, 2));
        // A restarted sender numbers from 1 again.
        assert!(!e.arrived(&a, 8, 1));
        assert!(
            e.arrived(&a, 7, 6),
            "an old incarnation after a new one is a new stream"
        );
        e.forget("a");
        assert!(!e.arrived(&a, 9, 1));
    }
}
