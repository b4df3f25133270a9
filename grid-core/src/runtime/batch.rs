//! [`Batcher`]: many small requests to one member, sent as one.
//!
//! Each request on its own costs a QUIC frame, usually a datagram, a `sendmsg` on one side
//! and a `recvmsg` and task wake-up on the other — most of a small operation's cost
//! (measured with `perf` under the `ops` bench: a fifth of the CPU in UDP send/receive).
//! Requests to one member queue here; a sender per member takes whatever has queued and
//! sends it as one batch, with at most `MAX_IN_FLIGHT` batches under way. When the member
//! is idle a request goes at once, alone (no added delay); under load batches grow by
//! themselves, as requests queue while earlier batches travel.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use grid_net::transport::Transport;
use grid_net::NetError;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, Semaphore};

/// Most requests in one batch.
pub(crate) const MAX_BATCH: usize = 256;
/// Largest request (encoded) that is batched; bigger ones go alone, so a batch stays far
/// below the frame limit (256 × 16 KiB = 4 MiB).
pub(crate) const MAX_BATCHED_BYTES: usize = 16 * 1024;
/// Batches under way to one member at once. Fewer in flight make bigger batches: with 4
/// the `ops` bench ran no faster than without batching, with 2 (or 1) about 20% faster;
/// 2 keeps one slow batch (a write waiting for a backup) from holding up everything else.
const MAX_IN_FLIGHT: usize = 2;
/// Requests waiting for one member; beyond it callers wait.
const QUEUE: usize = 4096;
/// A member's sender stops after this long without requests.
const IDLE: Duration = Duration::from_secs(60);

/// How a batched request failed (the same for every request of its batch).
#[derive(Debug, Clone)]
pub(crate) enum BatchError {
    /// The member could not be reached; nothing was delivered.
    Unreachable(String),
    /// The batch may or may not have been delivered (connection lost, no answer in time).
    Lost(String),
    /// This member is shutting down.
    ShuttingDown,
    /// Refused or malformed.
    Failed(String),
}

impl std::fmt::Display for BatchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unreachable(e) | Self::Lost(e) | Self::Failed(e) => f.write_str(e),
            Self::ShuttingDown => f.write_str("this member is shutting down"),
        }
    }
}

impl From<NetError> for BatchError {
    fn from(e: NetError) -> Self {
        match e {
            NetError::Unreachable { .. } | NetError::Refused { .. } => {
                Self::Unreachable(e.to_string())
            }
            NetError::ConnectionLost { .. } | NetError::Timeout { .. } => Self::Lost(e.to_string()),
            NetError::ShuttingDown => Self::ShuttingDown,
            NetError::Remote(e) => Self::Failed(e),
            e => Self::Failed(e.to_string()),
        }
    }
}

struct Pending<Req, Resp> {
    req: Req,
    deadline: Instant,
    reply: oneshot::Sender<Result<Resp, BatchError>>,
}

type Queues<Req, Resp> = Mutex<HashMap<SocketAddr, mpsc::Sender<Pending<Req, Resp>>>>;

/// Sends requests of type `Req` on `route` in batches (`Vec<Req>` → `Vec<Resp>`, answers
/// in request order).
pub(crate) struct Batcher<Req, Resp> {
    transport: Transport,
    route: &'static str,
    queues: Arc<Queues<Req, Resp>>,
    _types: PhantomData<fn(Req) -> Resp>,
}

impl<Req, Resp> Batcher<Req, Resp>
where
    Req: Serialize + Send + Sync + 'static,
    Resp: DeserializeOwned + Send + 'static,
{
    pub(crate) fn new(transport: Transport, route: &'static str) -> Self {
        Self {
            transport,
            route,
            queues: Arc::new(Mutex::new(HashMap::new())),
            _types: PhantomData,
        }
    }

    /// Sends `req` to `addr` in the next batch; waits at most `timeout` for its answer.
    pub(crate) async fn call(
        &self,
        addr: SocketAddr,
        req: Req,
        timeout: Duration,
    ) -> Result<Resp, BatchError> {
        let (reply, answer) = oneshot::channel();
        let mut pending = Pending {
            req,
            deadline: Instant::now() + timeout,
            reply,
        };
        // A sender that stopped for idleness refuses; the second queue is a fresh one.
        for _ in 0..2 {
            match self.queue(addr).send(pending).await {
                Ok(()) => {
                    return match tokio::time::timeout(timeout, answer).await {
                        Ok(Ok(r)) => r,
                        Ok(Err(_)) => Err(BatchError::Lost("batch abandoned".into())),
                        Err(_) => Err(BatchError::Lost(format!("no answer within {timeout:?}"))),
                    };
                }
                Err(mpsc::error::SendError(p)) => {
                    pending = p;
                    self.queues
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&addr);
                }
            }
        }
        Err(BatchError::ShuttingDown)
    }

    fn queue(&self, addr: SocketAddr) -> mpsc::Sender<Pending<Req, Resp>> {
        let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = queues.get(&addr).filter(|tx| !tx.is_closed()) {
            return tx.clone();
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        queues.insert(addr, tx.clone());
        tokio::spawn(send_batches(
            self.transport.clone(),
            self.route,
            addr,
            rx,
            Arc::downgrade(&self.queues),
        ));
        tx
    }
}

/// The sender of one member's batches.
async fn send_batches<Req, Resp>(
    transport: Transport,
    route: &'static str,
    addr: SocketAddr,
    mut rx: mpsc::Receiver<Pending<Req, Resp>>,
    queues: Weak<Queues<Req, Resp>>,
) where
    Req: Serialize + Send + Sync + 'static,
    Resp: DeserializeOwned + Send + 'static,
{
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        match tokio::time::timeout(IDLE, rx.recv_many(&mut batch, MAX_BATCH)).await {
            Ok(0) => return,
            Ok(_) => {}
            Err(_) => {
                // Idle: stop, unless a request slipped in meanwhile.
                rx.close();
                if let Some(q) = queues.upgrade() {
                    let mut q = q.lock().unwrap_or_else(|e| e.into_inner());
                    if q.get(&addr).is_some_and(|tx| tx.is_closed()) {
                        q.remove(&addr);
                    }
                }
                while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
                    send_one(&transport, route, addr, std::mem::take(&mut batch)).await;
                }
                return;
            }
        }
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        // What queued while we waited for a slot joins this batch.
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let batch = std::mem::replace(&mut batch, Vec::with_capacity(MAX_BATCH));
        let transport = transport.clone();
        tokio::spawn(async move {
            send_one(&transport, route, addr, batch).await;
            drop(permit);
        });
    }
}

async fn send_one<Req, Resp>(
    transport: &Transport,
    route: &'static str,
    addr: SocketAddr,
    batch: Vec<Pending<Req, Resp>>,
) where
    Req: Serialize + Send + Sync + 'static,
    Resp: DeserializeOwned + Send + 'static,
{
    // Callers that gave up are not sent for.
    let batch: Vec<_> = batch.into_iter().filter(|p| !p.reply.is_closed()).collect();
    let Some(deadline) = batch.iter().map(|p| p.deadline).max() else {
        return;
    };
    let timeout = deadline.saturating_duration_since(Instant::now());
    let reqs: Vec<&Req> = batch.iter().map(|p| &p.req).collect();
    let answer: Result<Vec<Resp>, NetError> =
        transport.request_typed(addr, route, &reqs, timeout).await;
    match answer {
        Ok(resps) if resps.len() == batch.len() => {
            for (p, r) in batch.into_iter().zip(resps) {
                let _ = p.reply.send(Ok(r));
            }
        }
        Ok(resps) => {
            let e = BatchError::Failed(format!(
                "{} answers to a batch of {}",
                resps.len(),
                batch.len()
            ));
            for p in batch {
                let _ = p.reply.send(Err(e.clone()));
            }
        }
        Err(e) => {
            let e = BatchError::from(e);
            for p in batch {
                let _ = p.reply.send(Err(e.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use grid_net::tls::Identity;
    use grid_net::transport::{LocalMember, TransportConfig};

    use super::*;

    fn transport(id: &str) -> Transport {
        let identity = Identity::from_secret(b"batch test", id).unwrap();
        let local = LocalMember {
            cluster: "batch".into(),
            member_id: id.into(),
            generation: 1,
            settings: vec![],
        };
        Transport::bind(
            "127.0.0.1:0".parse().unwrap(),
            None,
            &identity,
            local,
            TransportConfig::default(),
        )
        .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_calls_share_batches_and_each_gets_its_own_answer() {
        let (server, client) = (transport("server"), transport("client"));
        let batches = Arc::new(AtomicUsize::new(0));
        let seen = batches.clone();
        server.on_request_typed("double", move |_peer, reqs: Vec<u64>| {
            seen.fetch_add(1, Ordering::Relaxed);
            async move { Ok::<_, String>(reqs.into_iter().map(|r| r * 2).collect::<Vec<_>>()) }
        });
        let batcher = Arc::new(Batcher::<u64, u64>::new(client.clone(), "double"));
        let calls: Vec<_> = (0..2000u64)
            .map(|i| {
                let (b, addr) = (batcher.clone(), server.local_addr());
                tokio::spawn(async move { b.call(addr, i, Duration::from_secs(10)).await })
            })
            .collect();
        for (i, c) in calls.into_iter().enumerate() {
            assert_eq!(c.await.unwrap().unwrap(), 2 * i as u64);
        }
        let n = batches.load(Ordering::Relaxed);
        assert!(n < 2000, "{n} batches for 2000 concurrent calls");
        client.shutdown().await;
        server.shutdown().await;
    }

    #[tokio::test]
    async fn a_member_that_is_not_there_is_unreachable_for_every_call_of_the_batch() {
        let client = transport("client");
        let gone = {
            let t = transport("gone");
            let addr = t.local_addr();
            t.shutdown().await;
            addr
        };
        let batcher = Batcher::<u64, u64>::new(client.clone(), "double");
        let r = batcher.call(gone, 1, Duration::from_secs(2)).await;
        assert!(
            matches!(r, Err(BatchError::Unreachable(_) | BatchError::Lost(_))),
            "{r:?}"
        );
        client.shutdown().await;
    }
}
