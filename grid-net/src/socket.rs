//! The UDP socket under the QUIC endpoint, with a switch for fault injection.
//!
//! Tests (and the demo) use [`FaultSwitch`] to cut a member off the network without it
//! saying goodbye — the in-process equivalent of `kill -9` or a pulled cable — or to drop the
//! traffic to chosen peers (a network partition). With the switch untouched, a send costs
//! one relaxed atomic load more than quinn's own socket.

use std::collections::HashSet;
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{ready, Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

/// Drops a member's traffic on demand.
#[derive(Debug, Default)]
pub struct FaultSwitch {
    active: AtomicBool,
    killed: AtomicBool,
    blocked: RwLock<HashSet<SocketAddr>>,
}

impl FaultSwitch {
    /// Silences the member for good: nothing it sends leaves, nothing sent to it arrives.
    pub fn kill(&self) {
        self.killed.store(true, Ordering::SeqCst);
        self.active.store(true, Ordering::SeqCst);
    }

    /// Whether [`FaultSwitch::kill`] was called.
    pub fn is_killed(&self) -> bool {
        self.killed.load(Ordering::SeqCst)
    }

    /// Drops everything this member sends to `peer` (call it on both sides for a two-way
    /// partition).
    pub fn block(&self, peer: SocketAddr) {
        self.blocked
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(peer);
        self.active.store(true, Ordering::SeqCst);
    }

    /// Lets traffic to `peer` through again.
    pub fn unblock(&self, peer: SocketAddr) {
        self.blocked
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&peer);
    }

    fn drops_send_to(&self, dest: SocketAddr) -> bool {
        if !self.active.load(Ordering::Relaxed) {
            return false;
        }
        self.killed.load(Ordering::Relaxed)
            || self
                .blocked
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&dest)
    }
}

/// The most UDP payload one send may carry in all: a datagram's length field is 16 bits, and
/// an IPv4 header and the UDP header come out of it. Linux refuses a segmented send (GSO) of
/// more than this with `EMSGSIZE`.
pub(crate) const MAX_SEND_BYTES: usize = 65_507;

/// How many datagrams of up to `max_udp_payload` bytes one segmented send may carry.
///
/// quinn batches up to 10 datagrams of the current MTU into one send, and quinn-udp reports
/// the `EMSGSIZE` of a batch over [`MAX_SEND_BYTES`] as success (it expects that error only
/// from MTU probes): the whole batch vanishes. With 8,952-byte datagrams, every batch of 8
/// to 10 was lost; the losses looked like a black hole to MTU discovery, which fell back
/// to 1,200-byte datagrams for a minute, and a partition copy ran at that size, with a
/// congestion event per lost batch (measured with the `rebalance` harness, BENCHMARKS.md).
pub(crate) fn max_segments(max_udp_payload: u16) -> usize {
    (MAX_SEND_BYTES / usize::from(max_udp_payload.max(1))).max(1)
}

/// quinn's socket wrapped with a [`FaultSwitch`], sending batches that fit one send.
pub(crate) struct FaultySocket {
    inner: Arc<dyn AsyncUdpSocket>,
    faults: Arc<FaultSwitch>,
    /// See [`max_segments`].
    max_segments: usize,
}

impl FaultySocket {
    pub(crate) fn new(
        inner: Arc<dyn AsyncUdpSocket>,
        faults: Arc<FaultSwitch>,
        max_udp_payload: u16,
    ) -> Self {
        Self {
            inner,
            faults,
            max_segments: max_segments(max_udp_payload),
        }
    }
}

impl fmt::Debug for FaultySocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultySocket")
            .field("inner", &self.inner)
            .finish()
    }
}

impl AsyncUdpSocket for FaultySocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        if self.faults.drops_send_to(transmit.destination) {
            return Ok(());
        }
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        loop {
            let n = ready!(self.inner.poll_recv(cx, bufs, meta))?;
            if !self.faults.is_killed() {
                return Poll::Ready(Ok(n));
            }
            // Killed: swallow what arrived and wait for more (which is swallowed too).
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments().min(self.max_segments)
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::net::UdpSocket;
    use std::time::Duration;

    use quinn::udp::{Transmit, UdpSocketState};

    use super::*;

    /// The batch bound is the kernel's: a batch of `max_segments` datagrams leaves in one
    /// send and arrives whole; one datagram more is refused with `EMSGSIZE`, which quinn-udp
    /// would have reported as sent.
    #[test]
    fn a_full_batch_fits_one_send_and_one_more_does_not() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let state = UdpSocketState::new((&tx).into()).unwrap();
        if state.max_gso_segments() <= 1 {
            eprintln!("skipped: this kernel has no UDP segmentation offload");
            return;
        }
        for payload in [8952u16, 1452] {
            let n = max_segments(payload);
            let size = usize::from(payload);
            let batch = |segments: usize| vec![7u8; segments * size];
            let send = |contents: &[u8]| {
                state.try_send(
                    (&tx).into(),
                    &Transmit {
                        destination: rx.local_addr().unwrap(),
                        ecn: None,
                        contents,
                        segment_size: Some(size),
                        src_ip: None,
                    },
                )
            };
            send(&batch(n)).expect("a batch of max_segments datagrams is accepted");
            let mut buf = vec![0u8; 65_536];
            for _ in 0..n {
                assert_eq!(rx.recv(&mut buf).unwrap(), size);
            }
            if (n + 1) * size > MAX_SEND_BYTES && n < state.max_gso_segments() {
                let refused = send(&batch(n + 1)).unwrap_err();
                assert_eq!(refused.raw_os_error(), Some(libc::EMSGSIZE), "{payload}");
            }
        }
    }
}
