//! Requests multiplexed on a long-lived stream (a "lane") per connection and direction —
//! and a second one for requests that handlers wait for, when the first is crowded (see
//! [`LaneClass`]).
//!
//! Measured on loopback (BENCHMARKS.md), a stream per request costs quinn about twice the
//! work of a frame on a stream that already exists, so small requests travel on lanes: the
//! caller tags each request with an id, the callee answers on the same lane with that id, in
//! whatever order the handlers finish. Large payloads (over [`MUX_MAX_PAYLOAD`]) keep a stream
//! of their own so that they cannot hold up the small ones behind them.
//!
//! Each lane's sending half belongs to one writer task fed by a bounded queue. The writer
//! lets the tasks that are ready run before it writes (`yield_now`), so the frames they
//! queue meanwhile leave together: under load one QUIC packet carries many requests or
//! answers instead of one each (a packet costs quinn and the kernel far more than a frame).
//!
//! Lane frames, inside the usual `u32` length prefix:
//! - request: `[u64 id][u8 route length][route][body]` (at least 9 bytes)
//! - cancel: `[u64 id]` (exactly 8 bytes; since protocol 4): the caller gave up on request
//!   `id`. The callee drops that handler and answers nothing; a cancel for an id it does not
//!   run (answered already, never seen) is ignored.
//! - response: `[u64 id][u8 status][body]`
//!
//! Cancels travel on the lane itself, behind the request they cancel, so a callee never
//! sees a cancel before its request, and reads a lane's cancels in the order its callers
//! gave up. The limit: a callee whose handler slots for a lane are all taken
//! ([`MAX_LANE_TASKS`]) reads no further on it, so cancels queued behind a request waiting
//! for a slot wait with it, until a handler finishes (or the connection closes, which drops
//! them all). Cancels that are already read free slots for the requests behind them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{BufMut, Bytes, BytesMut};
use quinn::{Connection, RecvStream, SendStream};
use tokio::sync::{mpsc, oneshot};
use tracing::debug;

use crate::frame::{FrameError, FrameReader};
use crate::wire::{codes, StreamKind, RESPONSE_ERR, RESPONSE_OK};
use crate::NetError;

/// Requests with a body larger than this take a stream of their own.
pub(crate) const MUX_MAX_PAYLOAD: usize = 64 * 1024;
/// Frames queued for one lane's writer; past it, senders wait (and a caller giving up
/// hands its cancel to a task of its own).
const LANE_QUEUE: usize = 512;
/// Frames a writer takes from its queue at once.
const WRITE_BATCH: usize = 64;
/// quinn sends the data of higher-priority streams first: lanes go ahead of bulk streams
/// (priority 0), so that an operation's frames do not queue behind a partition copy.
const LANE_PRIORITY: i32 = 1;

type Reply = Result<Bytes, NetError>;
/// What a caller waiting on a lane gets: the answer, or why its request was never sent.
type Outcome = Result<Reply, String>;

/// A frame for a lane's writer, or the order to reset the lane.
pub(crate) enum Outgoing {
    /// A frame; `id` names the request it carries or answers.
    Frame { id: u64, frame: Bytes },
    /// Resets the stream with this error code; nothing after it is written.
    Reset(quinn::VarInt),
}

/// Starts the writer task of a lane's sending half and returns its queue. Before it writes
/// frames it tells `writing` their ids, and writes nothing if told `false` (the lane was
/// given up: whoever gave it up answered their callers). When the stream fails or is
/// reset, `unsent` hears, once, the ids of the frames that were not written whole.
pub(crate) fn lane_writer(
    send: SendStream,
    writing: impl FnMut(&[u64]) -> bool + Send + 'static,
    unsent: impl FnOnce(Vec<u64>, &str) + Send + 'static,
) -> mpsc::Sender<Outgoing> {
    let (tx, rx) = mpsc::channel(LANE_QUEUE);
    let _ = send.set_priority(LANE_PRIORITY);
    tokio::spawn(write_lane(send, rx, writing, unsent));
    tx
}

async fn write_lane(
    mut send: SendStream,
    mut rx: mpsc::Receiver<Outgoing>,
    mut writing: impl FnMut(&[u64]) -> bool,
    unsent: impl FnOnce(Vec<u64>, &str),
) {
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    let (mut frames, mut ids) = (
        Vec::with_capacity(WRITE_BATCH),
        Vec::with_capacity(WRITE_BATCH),
    );
    let mut lost = Vec::new();
    let why = loop {
        if rx.recv_many(&mut batch, WRITE_BATCH).await == 0 {
            let _ = send.finish();
            return;
        }
        if batch.len() < WRITE_BATCH {
            // Tokio runs a yielded task once its worker has nothing else ready, or at its
            // next maintenance (every 61 polls) under a load that never lets up: the tasks
            // that are ready queue their frames first, and all of them leave together.
            tokio::task::yield_now().await;
            while batch.len() < WRITE_BATCH {
                match rx.try_recv() {
                    Ok(out) => batch.push(out),
                    Err(_) => break,
                }
            }
        }
        // The batch's frames go to quinn in one call (one lock of the connection, one wake
        // of its driver) up to a reset, if any.
        let mut failed = None;
        for out in batch.drain(..) {
            match out {
                Outgoing::Frame { id, frame } => {
                    ids.push(id);
                    frames.push(frame);
                }
                Outgoing::Reset(code) => {
                    if failed.is_none() {
                        failed =
                            write_frames(&mut send, &mut frames, &mut ids, &mut lost, &mut writing)
                                .await;
                    }
                    if failed.is_none() {
                        let _ = send.reset(code);
                        failed = Some("lane reset".to_string());
                    }
                }
            }
        }
        if failed.is_none() {
            failed = write_frames(&mut send, &mut frames, &mut ids, &mut lost, &mut writing).await;
        }
        lost.append(&mut ids);
        frames.clear();
        if let Some(why) = failed {
            break why;
        }
    };
    // Whatever is still queued, or queued until the senders see the queue closed, was
    // never sent.
    rx.close();
    while let Some(out) = rx.recv().await {
        if let Outgoing::Frame { id, .. } = out {
            lost.push(id);
        }
    }
    unsent(lost, &why);
}

/// Writes `frames` (of the requests `ids`) whole into quinn's buffer, or fails: then the
/// frames not written whole join `lost`, and the error is returned. Leaves both lists empty.
async fn write_frames(
    send: &mut SendStream,
    frames: &mut Vec<Bytes>,
    ids: &mut Vec<u64>,
    lost: &mut Vec<u64>,
    writing: &mut impl FnMut(&[u64]) -> bool,
) -> Option<String> {
    let mut done = 0;
    let mut failed = None;
    if !ids.is_empty() && !writing(ids) {
        lost.append(ids);
        frames.clear();
        return Some("lane closed".to_string());
    }
    while done < frames.len() {
        match send.write_chunks(&mut frames[done..]).await {
            // A partly written frame stays first, advanced past what was written.
            Ok(written) => done += written.chunks,
            Err(e) => {
                lost.extend_from_slice(&ids[done..]);
                failed = Some(e.to_string());
                break;
            }
        }
    }
    frames.clear();
    ids.clear();
    failed
}

/// Why a lane request got no answer.
#[derive(Debug)]
pub(crate) enum MuxError {
    /// The request was not sent: retrying cannot run it twice.
    NotSent(String),
    /// The request was sent and the lane broke before the answer: it may have run.
    Lost(String),
}

/// A caller waiting on a lane.
struct Waiter {
    answer: oneshot::Sender<Outcome>,
    /// Its frame went to the lane's writer to be written: from then on a broken lane means
    /// the request may have run. Set under the pending map's lock, which is also where a
    /// lane is given up, so a frame never marked can never be written afterwards.
    written: bool,
}

type Pending = Mutex<Option<HashMap<u64, Waiter>>>;

struct Lane {
    outbox: mpsc::Sender<Outgoing>,
    /// `None` once the lane is dead.
    pending: Arc<Pending>,
    /// Requests queued or sent whose callers still wait for the answer. A caller that gives
    /// up sends a cancel behind its request, so the peer, reading the lane in order, runs
    /// no more of this lane's handlers than this when it reads the next request (save the
    /// few cancelled handlers whose tasks are still being dropped).
    unanswered: AtomicUsize,
}

impl Lane {
    fn is_dead(&self) -> bool {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none()
    }

    /// Marks the lane dead: callers whose frames were never written hear so (a retry cannot
    /// run them twice); the others see their answer channel close (they may have run).
    fn fail_all(&self, why: &str) {
        fail_all(&self.pending, why);
    }
}

fn fail_all(pending: &Pending, why: &str) {
    if let Some(waiting) = pending.lock().unwrap_or_else(|e| e.into_inner()).take() {
        give_up(waiting, why);
    }
}

/// Answers the callers of a lane given up: those whose frames were never written hear
/// `why` (not sent); the others see their answer channel close (they may have run).
fn give_up(waiting: HashMap<u64, Waiter>, why: &str) {
    let mut lost = 0;
    for (_, waiter) in waiting {
        if waiter.written {
            lost += 1;
        } else {
            let _ = waiter.answer.send(Err(why.to_string()));
        }
    }
    if lost > 0 {
        debug!(waiting = lost, why, "request lane closed");
    }
}

/// Removes a request's pending entry when its caller is done with it, so that entries never
/// outlive their callers; and if the caller gave up (deadline, dropped future) after its
/// request was queued and before the answer, tells the peer to drop the handler.
struct PendingGuard<'a> {
    lane: &'a Lane,
    id: u64,
    /// The request frame went to the lane's writer.
    queued: bool,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        let waiting = self
            .lane
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
            .and_then(|map| map.remove(&self.id));
        // No entry: answered, or the lane is dead (the peer drops the handlers of a lane
        // that closes). An entry left means the caller gave up.
        if waiting.is_some() && self.queued {
            let _ = self
                .lane
                .unanswered
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
            send_cancel(&self.lane.outbox, self.id);
        }
    }
}

/// A cancel frame for a lane: `[u32 len = 8][u64 id]`.
fn cancel_frame(id: u64) -> Bytes {
    let mut frame = BytesMut::with_capacity(12);
    frame.put_u32(8);
    frame.put_u64(id);
    frame.freeze()
}

/// Queues a cancel for request `id`, best effort. A full queue (the writer is behind) hands
/// it to a task that waits for a place: one small task per caller that gave up, ended as
/// soon as the lane has room or dies.
fn send_cancel(outbox: &mpsc::Sender<Outgoing>, id: u64) {
    let out = Outgoing::Frame {
        id,
        frame: cancel_frame(id),
    };
    match outbox.try_send(out) {
        Ok(()) => {}
        Err(mpsc::error::TrySendError::Closed(_)) => {}
        Err(mpsc::error::TrySendError::Full(out)) => {
            // A guard dropped outside any runtime (a runtime shutting down) sends nothing:
            // the peer drops the handler when the connection closes.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let outbox = outbox.clone();
                rt.spawn(async move {
                    let _ = outbox.send(out).await;
                });
            } else {
                debug!(id, "request cancel not sent: no runtime");
            }
        }
    }
}

/// Handlers a member runs at once for one lane; past it, it stops reading the lane (which
/// pushes back on the caller through QUIC flow control).
pub(crate) const MAX_LANE_TASKS: usize = 1024;

/// Nested requests take the callers' lane while it has fewer unanswered requests than
/// this: half the peer's bound, a margin for requests other tasks queue meanwhile.
const NESTED_ON_CALLS_BELOW: usize = MAX_LANE_TASKS / 2;

/// Which lane of a connection a request takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LaneClass {
    /// Requests of callers.
    Calls = 0,
    /// Requests a handler sends while it serves another request and that it waits for (a
    /// write's owner asking its backups). They must not queue behind callers' requests on
    /// a lane whose reader stopped (every handler slot taken): two members doing that to
    /// each other would wait for one another until the deadlines. So they take the callers'
    /// lane only while it has too few requests in flight for its reader to stop (the peer
    /// runs at most as many of a lane's handlers as the caller has requests waiting on it),
    /// and a lane of their own otherwise. (Always a lane of their own cost the `ops` bench
    /// a fifth of its throughput: fewer frames per packet on each lane.)
    Nested = 1,
}

/// The calling side of one connection's lanes.
///
/// One callers' lane per connection and direction: its writer sends together what is
/// queued on it, and two lanes for the same traffic halved the frames per packet (2.8
/// against 5.5 under the `ops` bench's load). The price: a large answer holds up the answers
/// queued behind it on the lane.
#[derive(Default)]
pub(crate) struct MuxClient {
    lanes: [Mutex<Option<Arc<Lane>>>; 2],
    next_id: AtomicU64,
}

impl MuxClient {
    /// The lane for a request of `class`, opened if need be: the callers' lane, unless the
    /// request is nested and that lane is crowded (see [`LaneClass::Nested`]).
    async fn lane_for(
        &self,
        conn: &Connection,
        class: LaneClass,
        limit: usize,
    ) -> Result<Arc<Lane>, String> {
        let calls = self.lane(conn, LaneClass::Calls, limit).await?;
        if class == LaneClass::Nested
            && calls.unanswered.load(Ordering::Relaxed) >= NESTED_ON_CALLS_BELOW
        {
            return self.lane(conn, LaneClass::Nested, limit).await;
        }
        Ok(calls)
    }

    async fn lane(
        &self,
        conn: &Connection,
        class: LaneClass,
        limit: usize,
    ) -> Result<Arc<Lane>, String> {
        let slot = &self.lanes[class as usize];
        {
            let lane = slot.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(lane) = lane.as_ref().filter(|l| !l.is_dead()) {
                return Ok(lane.clone());
            }
        }
        let (mut send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        send.write_all(&[StreamKind::Mux as u8])
            .await
            .map_err(|e| e.to_string())?;
        let pending: Arc<Pending> = Arc::new(Mutex::new(Some(HashMap::new())));
        let unsent = {
            let pending = pending.clone();
            move |ids: Vec<u64>, why: &str| {
                // These callers learn that their requests never left: retrying cannot run
                // them twice. Requests sent before the failure are lost with the stream.
                let waiting = pending.lock().unwrap_or_else(|e| e.into_inner()).take();
                if let Some(mut waiting) = waiting {
                    for id in ids {
                        if let Some(w) = waiting.remove(&id) {
                            let _ = w.answer.send(Err(why.to_string()));
                        }
                    }
                    // The rest were written, or never will be.
                    give_up(waiting, why);
                }
            }
        };
        let writing = {
            let pending = pending.clone();
            move |ids: &[u64]| {
                let mut pending = pending.lock().unwrap_or_else(|e| e.into_inner());
                let Some(map) = pending.as_mut() else {
                    return false;
                };
                for id in ids {
                    // A caller that gave up left no entry: its frame goes anyway.
                    if let Some(w) = map.get_mut(id) {
                        w.written = true;
                    }
                }
                true
            }
        };
        let lane = Arc::new(Lane {
            outbox: lane_writer(send, writing, unsent),
            pending,
            unanswered: AtomicUsize::new(0),
        });
        let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(existing) = slot.as_ref().filter(|l| !l.is_dead()) {
            // Another caller opened it meanwhile; ours is dropped (its stream finishes).
            return Ok(existing.clone());
        }
        *slot = Some(lane.clone());
        tokio::spawn(read_responses(lane.clone(), recv, limit));
        Ok(lane)
    }

    /// Sends one request on a lane of `conn` and waits for its answer (the caller bounds
    /// the wait).
    pub(crate) async fn request(
        &self,
        conn: &Connection,
        class: LaneClass,
        route: &str,
        body: &[u8],
        limit: usize,
    ) -> Result<Reply, MuxError> {
        let lane = self
            .lane_for(conn, class, limit)
            .await
            .map_err(MuxError::NotSent)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, mut rx) = oneshot::channel();
        {
            let mut pending = lane.pending.lock().unwrap_or_else(|e| e.into_inner());
            match pending.as_mut() {
                Some(map) => map.insert(
                    id,
                    Waiter {
                        answer: tx,
                        written: false,
                    },
                ),
                None => return Err(MuxError::NotSent("lane closed".into())),
            };
        }
        let mut guard = PendingGuard {
            lane: &lane,
            id,
            queued: false,
        };
        let inner_len = 8 + 1 + route.len() + body.len();
        let mut frame = BytesMut::with_capacity(4 + inner_len);
        frame.put_u32(inner_len as u32);
        frame.put_u64(id);
        frame.put_u8(route.len() as u8);
        frame.put_slice(route.as_bytes());
        frame.put_slice(body);
        let out = Outgoing::Frame {
            id,
            frame: frame.freeze(),
        };
        // A place in the queue first: a caller that gives up while waiting for one never
        // counted its request as unanswered. A lane given up meanwhile answers at once (the
        // writer may be stuck behind flow control and never free a place).
        let place = tokio::select! {
            // A free place (the usual case) is taken without touching the answer channel.
            biased;
            place = lane.outbox.reserve() => place,
            given_up = &mut rx => {
                // Never queued: whatever the lane said, the peer cannot have run it.
                let why = match given_up {
                    Ok(Err(why)) => why,
                    _ => "lane closed".to_string(),
                };
                return Err(MuxError::NotSent(why));
            }
        };
        let Ok(place) = place else {
            lane.fail_all("lane closed");
            return Err(MuxError::NotSent("lane closed".into()));
        };
        lane.unanswered.fetch_add(1, Ordering::Relaxed);
        place.send(out);
        guard.queued = true;
        match rx.await {
            Ok(Ok(reply)) => Ok(reply),
            // A failed write may have sent part of the frame, never all of it: the peer
            // cannot have run the request.
            Ok(Err(why)) => Err(MuxError::NotSent(why)),
            Err(_) => Err(MuxError::Lost("lane closed before the answer".into())),
        }
    }
}

async fn read_responses(lane: Arc<Lane>, mut recv: RecvStream, limit: usize) {
    let mut reader = FrameReader::default();
    loop {
        match reader.next(&mut recv, limit + 9).await {
            Ok(Some(frame)) if frame.len() >= 9 => {
                let mut id = [0u8; 8];
                id.copy_from_slice(&frame[..8]);
                let id = u64::from_be_bytes(id);
                let reply = match frame[8] {
                    RESPONSE_OK => Ok(frame.slice(9..)),
                    RESPONSE_ERR => Err(NetError::Remote(
                        String::from_utf8_lossy(&frame[9..]).into_owned(),
                    )),
                    _ => Err(NetError::Protocol("response with unknown status".into())),
                };
                let waiter = lane
                    .pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .as_mut()
                    .and_then(|m| m.remove(&id));
                // Only an answer someone waits for is counted off: a caller that gave up
                // counted its request off when it sent the cancel (the peer may have
                // answered before it read the cancel), and a peer answering an id twice
                // must not wrap the count.
                if let Some(w) = waiter {
                    let _ =
                        lane.unanswered
                            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                                n.checked_sub(1)
                            });
                    let _ = w.answer.send(Ok(reply));
                }
            }
            Ok(Some(_)) => {
                debug!("short frame on a request lane, lane closed");
                let _ = recv.stop(codes::STREAM_BAD_INPUT);
                break;
            }
            Ok(None) | Err(FrameError::Stream(_)) => break,
            Err(e) => {
                debug!(error = %e, "bad frame on a request lane, lane closed");
                let _ = recv.stop(codes::STREAM_BAD_INPUT);
                break;
            }
        }
    }
    lane.fail_all("request lane closed");
}

/// A response frame for a lane: `[u32 len][u64 id][u8 status][body]`.
pub(crate) fn response_frame(id: u64, result: &Result<Bytes, String>, limit: usize) -> Bytes {
    let (status, body): (u8, &[u8]) = match result {
        Ok(b) if b.len() <= limit => (RESPONSE_OK, b),
        Ok(_) => (RESPONSE_ERR, b"response exceeds the frame limit"),
        Err(e) => (RESPONSE_ERR, e.as_bytes()),
    };
    let mut frame = BytesMut::with_capacity(13 + body.len());
    frame.put_u32(9 + body.len() as u32);
    frame.put_u64(id);
    frame.put_u8(status);
    frame.put_slice(body);
    frame.freeze()
}

/// What a caller sent on a lane.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum LaneFrame<'a> {
    /// Run the handler of `route` on `body`; answer with `id`.
    Request {
        id: u64,
        route: &'a str,
        body: Bytes,
    },
    /// The caller of request `id` gave up.
    Cancel { id: u64 },
}

/// Splits a lane frame into a request (id, route, body) or a cancel (id); `None` if
/// malformed.
pub(crate) fn parse_lane_frame(frame: &Bytes) -> Option<LaneFrame<'_>> {
    let id = u64::from_be_bytes(frame.get(..8)?.try_into().ok()?);
    if frame.len() == 8 {
        return Some(LaneFrame::Cancel { id });
    }
    let len = *frame.get(8)? as usize;
    let route = std::str::from_utf8(frame.get(9..9 + len)?).ok()?;
    Some(LaneFrame::Request {
        id,
        route,
        body: frame.slice(9 + len..),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_frames_parse_and_garbage_does_not() {
        let mut f = BytesMut::new();
        f.put_u64(7);
        f.put_u8(4);
        f.put_slice(b"echo");
        f.put_slice(b"body");
        let f = f.freeze();
        assert_eq!(
            parse_lane_frame(&f),
            Some(LaneFrame::Request {
                id: 7,
                route: "echo",
                body: Bytes::from_static(b"body")
            })
        );
        for bad in [
            &b""[..],
            &b"\0\0\0\0\0\0\x07"[..],
            &b"\0\0\0\0\0\0\0\x07\x09ab"[..],
            &b"\0\0\0\0\0\0\0\x07\x01"[..],
        ] {
            assert!(
                parse_lane_frame(&Bytes::copy_from_slice(bad)).is_none(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn cancel_frames_parse() {
        let f = cancel_frame(u64::MAX - 3);
        assert_eq!(&f[..4], &8u32.to_be_bytes());
        assert_eq!(
            parse_lane_frame(&f.slice(4..)),
            Some(LaneFrame::Cancel { id: u64::MAX - 3 })
        );
    }
}
