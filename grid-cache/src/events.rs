//! Entry events: what the owner reports after applying a change, and how those reports
//! reach the members that want them (listeners, near copies, replicated copies).
//!
//! A member that wants a cache's events tells every member ("interest"), and tells each
//! member that joins later. An owner sends a cache's events only to the members interested
//! in it, on the ordered one-way channel, so the events of one key (one partition, one
//! owner applying one change at a time) arrive in the order they happened.

use std::collections::{BTreeMap, HashMap};
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

mod routes {
    pub(super) const EVENTS: &str = "cache.events";
    pub(super) const INTEREST: &str = "cache.interest";
}

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
#[derive(Debug, Serialize, Deserialize)]
struct Interest {
    cache: String,
    want: Option<Want>,
    seq: u64,
}

/// Who wants a cache's events: member → (what, sequence of the announcement).
type Interested = BTreeMap<Arc<str>, (Option<Want>, u64)>;

/// The member's event hub.
pub(crate) struct EventHub {
    transport: Transport,
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
            seq: AtomicU64::new(1),
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
                        hub.set_interest(&req.cache, &peer.member_id, req.want, req.seq);
                    }
                    Ok(())
                }
            });
        tokio::spawn(dispatch(Arc::downgrade(&hub), rx));
        tokio::spawn(follow_members(Arc::downgrade(&hub), hub.cluster.clone()));
        hub
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
        let sends = self
            .cluster
            .members()
            .iter()
            .filter(|m| m.id != self.me)
            .map(|m| self.tell(m.addr, &req))
            .collect::<Vec<_>>();
        futures::future::join_all(sends).await;
    }

    async fn tell(&self, addr: std::net::SocketAddr, req: &Interest) {
        let r: Result<(), _> = self
            .transport
            .request_typed(addr, routes::INTEREST, req, Duration::from_secs(5))
            .await;
        if let Err(e) = r {
            debug!(%addr, error = %e, "interest not delivered");
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
                            want: hub.local_want(&cache),
                            seq: hub.seq.fetch_add(1, Ordering::Relaxed),
                        };
                        hub.tell(m.addr, &req).await;
                    }
                });
            }
            MemberEvent::Left(m) | MemberEvent::Failed(m) => {
                let mut interest = hub.interest.write().unwrap_or_else(|e| e.into_inner());
                for members in interest.values_mut() {
                    members.remove(&m.id);
                }
                interest.retain(|_, s| s.values().any(|(w, _)| w.is_some()));
            }
        }
    }
}
