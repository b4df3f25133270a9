//! Who is in the cluster: the member list derived from chitchat's live nodes, membership
//! events, and the oldest member.
//!
//! chitchat says which (id, generation, address) triples are alive. This module turns that
//! into members: one per id (a restarted member — same id, newer generation — replaces its
//! old record), only once the member has published its protocol version, and without the
//! members that announced they are leaving. A member that disappears after announcing its
//! departure is reported [`MemberEvent::Left`]; one that stops heartbeating,
//! [`MemberEvent::Failed`].

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chitchat::{ChitchatId, NodeState};
use tokio::sync::{broadcast, watch, Notify};
use tracing::{info, warn};

use crate::transport::Transport;

/// chitchat key of a member's protocol version.
pub(crate) const KEY_PROTOCOL: &str = "grid.proto";
/// chitchat key set to `leaving` by a member shutting down gracefully.
pub(crate) const KEY_STATUS: &str = "grid.status";
/// Prefix of attribute keys.
pub(crate) const ATTR_PREFIX: &str = "attr.";
/// Route of the leave announcement.
pub(crate) const ROUTE_LEAVE: &str = "grid.leave";

/// Events buffered per subscriber before the slowest one starts missing some.
const EVENT_BUFFER: usize = 1024;
/// Departed (id, generation) pairs remembered, so a departed member is not resurrected by
/// stale gossip.
const MAX_DEPARTED: usize = 10_000;

/// One member of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Member id (stable across restarts when configured).
    pub id: Arc<str>,
    /// Start generation (microseconds since the Unix epoch at start): larger is younger.
    pub generation: u64,
    /// The member's QUIC address.
    pub addr: SocketAddr,
    /// The member's wire protocol version.
    pub protocol: u32,
    /// User-set attributes (`host`, `zone`, `data`, …).
    pub attributes: BTreeMap<String, String>,
}

impl Member {
    /// The value of attribute `key`.
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }

    /// Whether the member holds data (false for lite members, `data=false`).
    pub fn is_data_member(&self) -> bool {
        self.attribute("data") != Some("false")
    }

    /// Ordering key: older members first, ties broken by id.
    fn age_key(&self) -> (u64, &str) {
        (self.generation, &self.id)
    }
}

/// A change of the member list, as seen by this member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberEvent {
    /// A member joined (or a restarted member's new generation appeared).
    Joined(Member),
    /// A member left gracefully.
    Left(Member),
    /// A member stopped answering (crash, kill, network partition), or was replaced by a
    /// newer generation of itself without having left.
    Failed(Member),
}

impl MemberEvent {
    /// The member the event is about.
    pub fn member(&self) -> &Member {
        match self {
            Self::Joined(m) | Self::Left(m) | Self::Failed(m) => m,
        }
    }
}

struct Shared {
    local: Member,
    view: watch::Receiver<Arc<Vec<Member>>>,
    /// Whether this member has joined: it saw another member, or had no one to look for,
    /// or looked for `join_timeout` in vain (see [`Cluster::has_joined`]).
    joined: watch::Receiver<bool>,
    events: broadcast::Sender<MemberEvent>,
    departed: Mutex<HashMap<Arc<str>, u64>>,
    nudge: Arc<Notify>,
}

impl Shared {
    fn record_departure(&self, id: &str, generation: u64) {
        let mut departed = self.departed.lock().unwrap_or_else(|e| e.into_inner());
        if departed.len() >= MAX_DEPARTED {
            departed.clear();
        }
        match departed.get_mut(id) {
            Some(g) => *g = (*g).max(generation),
            None => {
                departed.insert(Arc::from(id), generation);
            }
        }
    }
}

/// The cluster as this member sees it. Cheap to clone.
///
/// ```no_run
/// # async fn demo(cluster: grid_net::membership::Cluster) {
/// use grid_net::membership::MemberEvent;
/// println!("I am {} and the leader is {}", cluster.local_member().id, cluster.oldest().id);
/// let mut events = cluster.events();
/// while let Some(event) = events.recv().await {
///     if let MemberEvent::Failed(m) = event {
///         println!("{} failed", m.id);
///     }
/// }
/// # }
/// ```
#[derive(Clone)]
pub struct Cluster {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("local", &self.shared.local.id)
            .field("members", &self.members().len())
            .finish()
    }
}

/// A subscription to membership events. Events after the subscription, in order; a
/// subscriber more than 1024 events behind skips ahead (logged) — [`Cluster::members`] is
/// always the authoritative list.
pub struct MembershipEvents {
    rx: broadcast::Receiver<MemberEvent>,
}

impl MembershipEvents {
    /// The next event; `None` once the member has shut down.
    pub async fn recv(&mut self) -> Option<MemberEvent> {
        loop {
            match self.rx.recv().await {
                Ok(e) => return Some(e),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    warn!(missed = n, "membership event subscriber fell behind");
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

impl Cluster {
    /// This member.
    pub fn local_member(&self) -> &Member {
        &self.shared.local
    }

    /// The live members, oldest first (this member included).
    pub fn members(&self) -> Arc<Vec<Member>> {
        self.shared.view.borrow().clone()
    }

    /// The live member with this id.
    pub fn member(&self, id: &str) -> Option<Member> {
        self.members().iter().find(|m| &*m.id == id).cloned()
    }

    /// The oldest live member: the cluster's leader.
    pub fn oldest(&self) -> Member {
        self.members()
            .first()
            .cloned()
            .unwrap_or_else(|| self.shared.local.clone())
    }

    /// Whether this member is the oldest one.
    pub fn is_leader(&self) -> bool {
        self.oldest().id == self.shared.local.id
    }

    /// Subscribes to membership events from now on.
    pub fn events(&self) -> MembershipEvents {
        MembershipEvents {
            rx: self.shared.events.subscribe(),
        }
    }

    /// A watch of the member list (for `changed().await`).
    pub fn watch(&self) -> watch::Receiver<Arc<Vec<Member>>> {
        self.shared.view.clone()
    }

    /// Whether this member has joined its cluster: it has seen another member, or it had no
    /// seed to look for (nor multicast), or none answered within the join timeout
    /// (`membership.join_timeout_ms`) and it starts a cluster of its own.
    ///
    /// Until then its member list holds only itself, and that must not be taken for a
    /// cluster of one: a member that took the coordinator's role at once planned a table in
    /// which it owned every partition, served reads from its empty partitions and took
    /// writes that vanished when the cluster's table reached it.
    pub fn has_joined(&self) -> bool {
        *self.shared.joined.borrow()
    }

    /// Waits until [`Cluster::has_joined`] (for ever if the member stops before).
    pub async fn joined(&self) {
        let mut rx = self.shared.joined.clone();
        if rx.wait_for(|joined| *joined).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Waits until `pred` holds for the member list, at most `timeout`. Returns whether it
    /// did.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&[Member]) -> bool,
    ) -> bool {
        let mut rx = self.shared.view.clone();
        tokio::time::timeout(
            timeout,
            async move { rx.wait_for(|v| pred(v)).await.is_ok() },
        )
        .await
        .unwrap_or(false)
    }

    /// Records that member `id` (up to `generation`) left gracefully, and updates the view.
    pub(crate) fn mark_departed(&self, id: &str, generation: u64) {
        self.shared.record_departure(id, generation);
        self.shared.nudge.notify_one();
    }
}

/// The live nodes that announced, in gossip, that they are leaving.
fn leaving(live: &BTreeMap<ChitchatId, NodeState>) -> Vec<(&str, u64)> {
    live.iter()
        .filter(|(_, state)| state.get(KEY_STATUS) == Some("leaving"))
        .map(|(cid, _)| (cid.node_id.as_ref(), cid.generation_id))
        .collect()
}

/// Builds the member list from chitchat's live nodes, without the `departed` ones (which
/// include those that are [`leaving`]: the caller records them first).
fn members_from(
    live: &BTreeMap<ChitchatId, NodeState>,
    departed: &HashMap<Arc<str>, u64>,
) -> Vec<Member> {
    let mut by_id: HashMap<&str, Member> = HashMap::new();
    for (cid, state) in live {
        if departed
            .get(cid.node_id.as_ref())
            .is_some_and(|g| *g >= cid.generation_id)
        {
            continue;
        }
        let Some(protocol) = state.get(KEY_PROTOCOL).and_then(|p| p.parse().ok()) else {
            continue; // not fully announced yet
        };
        let attributes = state
            .key_values()
            .filter_map(|(k, v)| Some((k.strip_prefix(ATTR_PREFIX)?.to_string(), v.to_string())))
            .collect();
        let member = Member {
            id: Arc::from(cid.node_id.as_ref()),
            generation: cid.generation_id,
            addr: cid.gossip_advertise_addr,
            protocol,
            attributes,
        };
        match by_id.get(cid.node_id.as_ref()) {
            Some(existing) if existing.generation >= member.generation => {}
            _ => {
                by_id.insert(cid.node_id.as_ref(), member);
            }
        }
    }
    let mut members: Vec<Member> = by_id.into_values().collect();
    members.sort_by(|a, b| a.age_key().cmp(&b.age_key()));
    members
}

/// The events that turn `old` into `new`.
fn diff(old: &[Member], new: &[Member], departed: &HashMap<Arc<str>, u64>) -> Vec<MemberEvent> {
    let gone = |m: &Member| {
        if departed.get(&m.id).is_some_and(|g| *g >= m.generation) {
            MemberEvent::Left(m.clone())
        } else {
            MemberEvent::Failed(m.clone())
        }
    };
    let mut events = Vec::new();
    for m in old {
        match new.iter().find(|n| n.id == m.id) {
            None => events.push(gone(m)),
            Some(n) if n.generation != m.generation => events.push(gone(m)),
            Some(_) => {}
        }
    }
    for n in new {
        if !old
            .iter()
            .any(|m| m.id == n.id && m.generation == n.generation)
        {
            events.push(MemberEvent::Joined(n.clone()));
        }
    }
    events
}

/// Starts the task that maintains the member list. It ends when `live` closes (chitchat
/// stopped).
pub(crate) fn start(
    local: Member,
    mut live: watch::Receiver<BTreeMap<ChitchatId, NodeState>>,
    transport: Transport,
    join_timeout: Option<Duration>,
) -> Cluster {
    let (view_tx, view_rx) = watch::channel(Arc::new(vec![local.clone()]));
    let (events, _) = broadcast::channel(EVENT_BUFFER);
    let (joined_tx, joined_rx) = watch::channel(join_timeout.is_none());
    if let Some(timeout) = join_timeout {
        let mut view = view_rx.clone();
        tokio::spawn(async move {
            let found = tokio::time::timeout(timeout, view.wait_for(|v| v.len() > 1)).await;
            match found {
                Ok(Ok(_)) => {}
                Ok(Err(_)) => return, // shut down
                Err(_) => warn!(
                    after = ?timeout,
                    "no other member answered; this member starts a cluster of its own"
                ),
            }
            joined_tx.send_replace(true);
        });
    }
    let shared = Arc::new(Shared {
        local,
        view: view_rx,
        joined: joined_rx,
        events,
        departed: Mutex::new(HashMap::new()),
        nudge: Arc::new(Notify::new()),
    });
    let nudge = shared.nudge.clone();
    let cluster = Cluster {
        shared: shared.clone(),
    };
    let weak = Arc::downgrade(&shared);
    drop(shared);
    tokio::spawn(async move {
        let mut current: Vec<Member> = Vec::new();
        loop {
            {
                let Some(shared) = weak.upgrade() else { break };
                let (departed, mut next) = {
                    let live_now = live.borrow_and_update();
                    // A member's `leaving` status can reach us by gossip before its direct
                    // leave notice does: either one makes its disappearance a departure, not
                    // a failure.
                    let mut leaving_now = 0;
                    for (id, generation) in leaving(&live_now) {
                        shared.record_departure(id, generation);
                        leaving_now += 1;
                    }
                    metrics::gauge!("grid_members", "state" => "leaving").set(leaving_now as f64);
                    let departed = shared
                        .departed
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .clone();
                    let next = members_from(&live_now, &departed);
                    (departed, next)
                };
                if !next.iter().any(|m| m.id == shared.local.id) {
                    // Until chitchat lists us (it always does), keep ourselves in the view.
                    next.push(shared.local.clone());
                    next.sort_by(|a, b| a.age_key().cmp(&b.age_key()));
                }
                if next != current {
                    for event in diff(&current, &next, &departed) {
                        match &event {
                            MemberEvent::Joined(m) if m.id != shared.local.id => {
                                info!(member = %m.id, addr = %m.addr, "member joined")
                            }
                            MemberEvent::Left(m) => {
                                info!(member = %m.id, addr = %m.addr, "member left");
                                transport.forget(m.addr);
                            }
                            MemberEvent::Failed(m) => {
                                warn!(member = %m.id, addr = %m.addr, "member failed");
                                if !next.iter().any(|n| n.addr == m.addr) {
                                    transport.forget(m.addr);
                                }
                            }
                            MemberEvent::Joined(_) => {}
                        }
                        let name = match &event {
                            MemberEvent::Joined(_) => "joined",
                            MemberEvent::Left(_) => "left",
                            MemberEvent::Failed(_) => "failed",
                        };
                        metrics::counter!("grid_member_events_total", "event" => name).increment(1);
                        let _ = shared.events.send(event);
                    }
                    metrics::gauge!("grid_members", "state" => "alive").set(next.len() as f64);
                    let data = next.iter().filter(|m| m.is_data_member()).count();
                    metrics::gauge!("grid_data_members").set(data as f64);
                    current = next.clone();
                    let _ = view_tx.send(Arc::new(next));
                }
                drop(shared);
                tokio::select! {
                    changed = live.changed() => if changed.is_err() { break },
                    _ = nudge.notified() => {}
                }
            }
        }
    });
    cluster
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(id: &str, generation: u64) -> Member {
        Member {
            id: id.into(),
            generation,
            addr: "127.0.0.1:1".parse().unwrap(),
            protocol: 1,
            attributes: BTreeMap::new(),
        }
    }

    #[test]
    fn diff_reports_joins_failures_departures_and_restarts() {
        let mut departed = HashMap::new();
        departed.insert(Arc::from("b"), 1);
        let old = vec![m("a", 1), m("b", 1), m("c", 1)];
        let new = vec![m("a", 1), m("c", 2), m("d", 1)];
        let events = diff(&old, &new, &departed);
        assert_eq!(
            events,
            vec![
                MemberEvent::Left(m("b", 1)),
                MemberEvent::Failed(m("c", 1)),
                MemberEvent::Joined(m("c", 2)),
                MemberEvent::Joined(m("d", 1)),
            ]
        );
    }
}
