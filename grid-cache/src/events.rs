//! Entry events: what the owner reports after applying a change, and how those reports
//! reach the members that want them (listeners, near copies, replicated copies).
//!
//! A member that wants a cache's events tells every member ("interest"), and tells each
//! member that joins later. An owner sends a cache's events only to the members interested
//! in it, on the ordered one-way channel, so the events of one key (one partition, one
//! owner applying one change at a time) arrive in the order they happened.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use grid_core::codec;
use grid_net::membership::{Cluster, MemberEvent};
use grid_net::transport::Transport;
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
}

/// An event as the owner reports it: encoded keys and values.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct RawEvent {
    pub(crate) cache: Arc<str>,
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
/// Each cache's handlers on this member, with their ids.
type Handlers = HashMap<Arc<str>, Vec<(u64, Handler)>>;

mod routes {
    pub(super) const EVENTS: &str = "cache.events";
    pub(super) const INTEREST: &str = "cache.interest";
}

/// Most events queued for sending on one member; beyond it events are dropped (counted
/// and logged), as a slow listener must not stall writes.
const OUTBOX: usize = 65_536;
/// Most events in one message.
const BATCH: usize = 256;

#[derive(Debug, Serialize, Deserialize)]
struct Interest {
    cache: String,
    on: bool,
}

/// The member's event hub.
pub(crate) struct EventHub {
    transport: Transport,
    cluster: Cluster,
    me: Arc<str>,
    /// Members (this one included) that want each cache's events.
    interest: RwLock<HashMap<Arc<str>, BTreeSet<Arc<str>>>>,
    /// This member's handlers of each cache's events.
    handlers: RwLock<Handlers>,
    next_id: AtomicU64,
    outbox: mpsc::Sender<RawEvent>,
    dropped: AtomicU64,
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
    pub(crate) fn start(transport: Transport, cluster: Cluster) -> Arc<Self> {
        let (tx, rx) = mpsc::channel(OUTBOX);
        let hub = Arc::new(Self {
            me: cluster.local_member().id.clone(),
            transport,
            cluster,
            interest: RwLock::new(HashMap::new()),
            handlers: RwLock::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            outbox: tx,
            dropped: AtomicU64::new(0),
        });
        let weak = Arc::downgrade(&hub);
        hub.transport.on_message(routes::EVENTS, move |peer, body: Bytes| {
            let Some(hub) = weak.upgrade() else { return };
            match codec::decode::<Vec<RawEvent>>(&body) {
                Ok(events) => events.iter().for_each(|e| hub.deliver_local(e)),
                Err(e) => warn!(peer = %peer.member_id, error = %e, "undecodable cache events dropped"),
            }
        });
        let weak = Arc::downgrade(&hub);
        hub.transport
            .on_request_typed(routes::INTEREST, move |peer, req: Interest| {
                let hub = weak.upgrade();
                async move {
                    if let Some(hub) = hub {
                        hub.set_interest(&req.cache, &peer.member_id, req.on);
                    }
                    Ok(())
                }
            });
        tokio::spawn(dispatch(Arc::downgrade(&hub), rx));
        tokio::spawn(follow_members(Arc::downgrade(&hub), hub.cluster.clone()));
        hub
    }

    fn set_interest(&self, cache: &str, member: &Arc<str>, on: bool) {
        let mut interest = self.interest.write().unwrap_or_else(|e| e.into_inner());
        if on {
            interest
                .entry(cache.into())
                .or_default()
                .insert(member.clone());
        } else if let Some(set) = interest.get_mut(cache) {
            set.remove(member);
            if set.is_empty() {
                interest.remove(cache);
            }
        }
    }

    /// Registers `handler` for `cache`'s events on this member; returns once every
    /// current member knows this member wants them.
    pub(crate) async fn add_handler(
        self: &Arc<Self>,
        cache: &str,
        handler: Handler,
    ) -> HandlerGuard {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let first = {
            let mut handlers = self.handlers.write().unwrap_or_else(|e| e.into_inner());
            let list = handlers.entry(cache.into()).or_default();
            list.push((id, handler));
            list.len() == 1
        };
        self.set_interest(cache, &self.me.clone(), true);
        if first {
            self.announce(cache, true).await;
        }
        HandlerGuard {
            hub: Arc::downgrade(self),
            cache: cache.into(),
            id,
        }
    }

    fn remove_handler(self: &Arc<Self>, cache: &Arc<str>, id: u64) {
        let last = {
            let mut handlers = self.handlers.write().unwrap_or_else(|e| e.into_inner());
            let Some(list) = handlers.get_mut(cache) else {
                return;
            };
            list.retain(|(i, _)| *i != id);
            let empty = list.is_empty();
            if empty {
                handlers.remove(cache);
            }
            empty
        };
        if last {
            self.set_interest(cache, &self.me.clone(), false);
            let hub = self.clone();
            let cache = cache.clone();
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move { hub.announce(&cache, false).await });
            }
        }
    }

    async fn announce(&self, cache: &str, on: bool) {
        let req = Interest {
            cache: cache.to_string(),
            on,
        };
        let sends = self
            .cluster
            .members()
            .iter()
            .filter(|m| m.id != self.me)
            .map(|m| {
                let req = &req;
                let addr = m.addr;
                async move {
                    let r: Result<(), _> = self
                        .transport
                        .request_typed(addr, routes::INTEREST, req, Duration::from_secs(5))
                        .await;
                    if let Err(e) = r {
                        debug!(%addr, error = %e, "interest not delivered");
                    }
                }
            })
            .collect::<Vec<_>>();
        futures::future::join_all(sends).await;
    }

    /// Runs this member's handlers of the event's cache.
    pub(crate) fn deliver_local(&self, event: &RawEvent) {
        let handlers = self.handlers.read().unwrap_or_else(|e| e.into_inner());
        if let Some(list) = handlers.get(&event.cache) {
            for (_, h) in list {
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

    fn targets(&self, cache: &str) -> Vec<Arc<str>> {
        self.interest
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(cache)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Events dropped because the outbox was full.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
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
        if self.outbox.try_send(event).is_err() {
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

/// Sends queued events to the members that want them, in batches, in order.
async fn dispatch(hub: Weak<EventHub>, mut rx: mpsc::Receiver<RawEvent>) {
    let mut batch = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        let Some(hub) = hub.upgrade() else { return };
        let mut per_member: HashMap<Arc<str>, Vec<&RawEvent>> = HashMap::new();
        for ev in &batch {
            for m in hub.targets(&ev.cache) {
                if m == hub.me {
                    hub.deliver_local(ev);
                } else {
                    per_member.entry(m).or_default().push(ev);
                }
            }
        }
        for (member, events) in per_member {
            let Some(m) = hub.cluster.member(&member) else {
                continue;
            };
            match codec::encode(&events) {
                Ok(body) => {
                    if let Err(e) = hub
                        .transport
                        .send_ordered(m.addr, routes::EVENTS, &body)
                        .await
                    {
                        debug!(member = %member, error = %e, "cache events not sent");
                    }
                }
                Err(e) => warn!(error = %e, "cache events not encodable"),
            }
        }
        batch.clear();
    }
}

/// Tells joining members what this member wants; forgets what departed members wanted.
async fn follow_members(hub: Weak<EventHub>, cluster: Cluster) {
    let mut events = cluster.events();
    while let Some(ev) = events.recv().await {
        let Some(hub) = hub.upgrade() else { return };
        match ev {
            MemberEvent::Joined(m) => {
                let caches: Vec<Arc<str>> = hub
                    .handlers
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .keys()
                    .cloned()
                    .collect();
                let hub = hub.clone();
                tokio::spawn(async move {
                    for cache in caches {
                        let req = Interest {
                            cache: cache.to_string(),
                            on: true,
                        };
                        let r: Result<(), _> = hub
                            .transport
                            .request_typed(m.addr, routes::INTEREST, &req, Duration::from_secs(5))
                            .await;
                        if let Err(e) = r {
                            debug!(member = %m.id, error = %e, "interest not delivered to a new member");
                        }
                    }
                });
            }
            MemberEvent::Left(m) | MemberEvent::Failed(m) => {
                let mut interest = hub.interest.write().unwrap_or_else(|e| e.into_inner());
                for set in interest.values_mut() {
                    set.remove(&m.id);
                }
                interest.retain(|_, s| !s.is_empty());
            }
        }
    }
}
