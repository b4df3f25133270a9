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

/// quinn's socket wrapped with a [`FaultSwitch`].
pub(crate) struct FaultySocket {
    inner: Arc<dyn AsyncUdpSocket>,
    faults: Arc<FaultSwitch>,
}

impl FaultySocket {
    pub(crate) fn new(inner: Arc<dyn AsyncUdpSocket>, faults: Arc<FaultSwitch>) -> Self {
        Self { inner, faults }
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
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}
