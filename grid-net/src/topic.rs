//! Cluster messages on named channels (Hazelcast's `ITopic`, Crowd's
//! `ClusterMessageService`).
//!
//! A message published on a member goes to the subscribers on every other live member, in
//! the order that member published (one ordered QUIC stream per pair of members); the
//! publisher's own subscribers get it only when the topic was opened with
//! [`Topic::including_publisher`]. Delivery is at most once: a member that is unreachable
//! when the message is sent misses it. Every subscriber has its own bounded queue: a slow
//! subscriber loses the messages that overflow it (counted in
//! [`Subscription::dropped`], logged, and in the `grid_topic_dropped_total` metric) and
//! never holds up other subscribers or the connection.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use bytes::{BufMut, Bytes, BytesMut};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::mpsc;
use tracing::warn;

use crate::codec;
use crate::membership::Cluster;
use crate::transport::Transport;
use crate::NetError;

pub(crate) const ROUTE_TOPIC: &str = "grid.topic";
/// Longest channel name, in bytes.
pub const MAX_CHANNEL_NAME: usize = 200;
/// Default queue length of a subscription.
pub const DEFAULT_SUBSCRIBER_QUEUE: usize = 1024;

/// Why a topic operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    /// The channel name is empty or longer than [`MAX_CHANNEL_NAME`] bytes.
    #[error("channel name must be 1 to {max} bytes, got {len}")]
    BadName {
        /// The name's length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The encoded message is larger than the topic's limit; nothing was sent.
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    MessageTooLarge {
        /// The encoded size.
        size: usize,
        /// The limit (the transport's frame size minus the envelope).
        limit: usize,
    },
    /// The message could not be encoded; nothing was sent.
    #[error(transparent)]
    Codec(#[from] codec::CodecError),
    /// The member is shutting down.
    #[error(transparent)]
    Net(#[from] NetError),
}

struct Subscriber {
    id: u64,
    tx: mpsc::Sender<Bytes>,
    dropped: Arc<AtomicU64>,
}

/// The subscribers of every channel on this member.
#[derive(Default)]
pub(crate) struct TopicRegistry {
    channels: RwLock<HashMap<Arc<str>, Vec<Subscriber>>>,
    next_id: AtomicU64,
}

impl TopicRegistry {
    /// Hands `body` to every subscriber of `channel` without waiting.
    pub(crate) fn deliver(&self, channel: &str, body: Bytes) {
        let channels = self.channels.read().unwrap_or_else(|e| e.into_inner());
        let Some(subs) = channels.get(channel) else {
            return;
        };
        for sub in subs {
            if sub.tx.try_send(body.clone()).is_err() && !sub.tx.is_closed() {
                let n = sub.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                metrics::counter!("grid_topic_dropped_total").increment(1);
                if n.is_power_of_two() {
                    warn!(
                        channel,
                        dropped = n,
                        "topic subscriber is too slow, messages dropped"
                    );
                }
            }
        }
    }

    /// Decodes a message from the wire and delivers it.
    pub(crate) fn deliver_frame(&self, frame: Bytes) {
        let Some(&len) = frame.first() else {
            warn!("empty topic message dropped");
            return;
        };
        let len = len as usize;
        let Some(name) = frame
            .get(1..1 + len)
            .and_then(|n| std::str::from_utf8(n).ok())
        else {
            warn!("malformed topic message dropped");
            return;
        };
        self.deliver(name, frame.slice(1 + len..));
    }

    fn add(
        &self,
        channel: &Arc<str>,
        capacity: usize,
    ) -> (u64, mpsc::Receiver<Bytes>, Arc<AtomicU64>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let dropped = Arc::new(AtomicU64::new(0));
        self.channels
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(channel.clone())
            .or_default()
            .push(Subscriber {
                id,
                tx,
                dropped: dropped.clone(),
            });
        (id, rx, dropped)
    }

    fn count(&self, channel: &str) -> usize {
        self.channels
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(channel)
            .map_or(0, Vec::len)
    }

    fn remove(&self, channel: &str, id: u64) {
        let mut channels = self.channels.write().unwrap_or_else(|e| e.into_inner());
        if let Some(subs) = channels.get_mut(channel) {
            subs.retain(|s| s.id != id);
            if subs.is_empty() {
                channels.remove(channel);
            }
        }
    }
}

/// A named channel of messages of type `M`. Cheap to clone.
///
/// ```no_run
/// # async fn demo(grid: grid_net::node::Node) -> Result<(), grid_net::topic::TopicError> {
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize, Debug)]
/// struct Invalidate { key: String }
///
/// let topic = grid.topic::<Invalidate>("cache-invalidation")?;
/// let mut sub = topic.subscribe(); // dropping `sub` unsubscribes
/// topic.publish(&Invalidate { key: "user:42".into() }).await?; // to every other member
/// # let _ = sub.recv().await;
/// # Ok(()) }
/// ```
pub struct Topic<M> {
    name: Arc<str>,
    registry: Arc<TopicRegistry>,
    cluster: Cluster,
    transport: Transport,
    include_publisher: bool,
    _message: PhantomData<fn() -> M>,
}

impl<M> Clone for Topic<M> {
    fn clone(&self) -> Self {
        Self {
            name: self.name.clone(),
            registry: self.registry.clone(),
            cluster: self.cluster.clone(),
            transport: self.transport.clone(),
            include_publisher: self.include_publisher,
            _message: PhantomData,
        }
    }
}

impl<M: Serialize + DeserializeOwned> Topic<M> {
    pub(crate) fn new(
        name: &str,
        registry: Arc<TopicRegistry>,
        cluster: Cluster,
        transport: Transport,
    ) -> Result<Self, TopicError> {
        if name.is_empty() || name.len() > MAX_CHANNEL_NAME {
            return Err(TopicError::BadName {
                len: name.len(),
                max: MAX_CHANNEL_NAME,
            });
        }
        Ok(Self {
            name: name.into(),
            registry,
            cluster,
            transport,
            include_publisher: false,
            _message: PhantomData,
        })
    }

    /// The channel's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// This handle's messages also reach subscribers on the publishing member.
    pub fn including_publisher(mut self) -> Self {
        self.include_publisher = true;
        self
    }

    /// The largest encoded message this topic sends.
    pub fn max_message_size(&self) -> usize {
        // The routed frame carries the route, the channel name and their lengths.
        self.transport.config().max_frame_size - 2 - ROUTE_TOPIC.len() - self.name.len()
    }

    /// Publishes `message` to the subscribers on every other live member (and on this one
    /// with [`Topic::including_publisher`]). Returns once the message is queued for every
    /// member; waits while a member's queue is full.
    pub async fn publish(&self, message: &M) -> Result<(), TopicError> {
        let body = codec::encode(message)?;
        let limit = self.max_message_size();
        if body.len() > limit {
            return Err(TopicError::MessageTooLarge {
                size: body.len(),
                limit,
            });
        }
        let mut frame = BytesMut::with_capacity(1 + self.name.len() + body.len());
        frame.put_u8(self.name.len() as u8);
        frame.put_slice(self.name.as_bytes());
        frame.put_slice(&body);
        let local = self.cluster.local_member().id.clone();
        for member in self.cluster.members().iter().filter(|m| m.id != local) {
            match self
                .transport
                .send_ordered(member.addr, ROUTE_TOPIC, &frame)
                .await
            {
                Ok(()) => {}
                Err(NetError::ShuttingDown) => return Err(NetError::ShuttingDown.into()),
                Err(e) => warn!(member = %member.id, error = %e, "topic message not sent"),
            }
        }
        if self.include_publisher {
            self.registry.deliver(&self.name, Bytes::from(body));
        }
        Ok(())
    }

    /// How many subscriptions this channel has on this member.
    pub fn local_subscriber_count(&self) -> usize {
        self.registry.count(&self.name)
    }

    /// Subscribes with the default queue of [`DEFAULT_SUBSCRIBER_QUEUE`] messages.
    pub fn subscribe(&self) -> Subscription<M> {
        self.subscribe_with_capacity(DEFAULT_SUBSCRIBER_QUEUE)
    }

    /// Subscribes with a queue of `capacity` messages; messages arriving while it is full
    /// are dropped and counted.
    pub fn subscribe_with_capacity(&self, capacity: usize) -> Subscription<M> {
        let (id, rx, dropped) = self.registry.add(&self.name, capacity);
        Subscription {
            name: self.name.clone(),
            id,
            rx,
            dropped,
            registry: self.registry.clone(),
            _message: PhantomData,
        }
    }
}

/// Messages of one channel, for one subscriber. Dropping it unsubscribes.
pub struct Subscription<M> {
    name: Arc<str>,
    id: u64,
    rx: mpsc::Receiver<Bytes>,
    dropped: Arc<AtomicU64>,
    registry: Arc<TopicRegistry>,
    _message: PhantomData<fn() -> M>,
}

impl<M: DeserializeOwned> Subscription<M> {
    /// The next message. Messages that do not decode as `M` (a publisher with another
    /// message type on the same channel) are skipped with a warning.
    pub async fn recv(&mut self) -> Option<M> {
        loop {
            let bytes = self.rx.recv().await?;
            match codec::decode(&bytes) {
                Ok(m) => return Some(m),
                Err(e) => {
                    warn!(channel = %self.name, error = %e, "undecodable topic message skipped")
                }
            }
        }
    }

    /// The next message if one is queued.
    pub fn try_recv(&mut self) -> Option<M> {
        while let Ok(bytes) = self.rx.try_recv() {
            if let Ok(m) = codec::decode(&bytes) {
                return Some(m);
            }
        }
        None
    }

    /// Messages dropped because this subscriber's queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl<M> Drop for Subscription<M> {
    fn drop(&mut self) {
        self.registry.remove(&self.name, self.id);
    }
}
