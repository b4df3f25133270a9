//! chitchat over grid's QUIC connections: a chitchat [`chitchat::transport::Transport`]
//! whose socket sends each gossip message on its own unidirectional stream of the member's
//! one endpoint. Gossip is therefore authenticated and encrypted like every other byte, and
//! needs no second port.

use std::net::SocketAddr;

use async_trait::async_trait;
use bytes::Bytes;
use chitchat::transport::{RecvOutcome, SendOutcome, Socket};
use chitchat::ChitchatEnvelope;
use tokio::sync::mpsc;
use tracing::warn;

use crate::transport::Transport;

/// Gossip messages received and not yet handled by chitchat; more are dropped.
const GOSSIP_INBOX: usize = 1024;

/// The chitchat transport over a grid [`Transport`].
pub(crate) struct QuicGossip {
    transport: Transport,
}

impl QuicGossip {
    pub(crate) fn new(transport: Transport) -> Self {
        Self { transport }
    }
}

#[async_trait]
impl chitchat::transport::Transport for QuicGossip {
    async fn open(&self, _listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let (tx, rx) = mpsc::channel(GOSSIP_INBOX);
        self.transport.set_gossip_sink(tx);
        Ok(Box::new(QuicGossipSocket {
            transport: self.transport.clone(),
            inbox: rx,
        }))
    }
}

struct QuicGossipSocket {
    transport: Transport,
    inbox: mpsc::Receiver<(SocketAddr, Bytes)>,
}

#[async_trait]
impl Socket for QuicGossipSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.transport.advertise_addr())
    }

    async fn send(
        &mut self,
        to: SocketAddr,
        envelope: ChitchatEnvelope,
    ) -> anyhow::Result<SendOutcome> {
        // A round contacts a few peers, each with a Syn: one exchange per Syn.
        let kind = match envelope.message {
            chitchat::ChitchatMessage::Syn { .. } => "syn",
            chitchat::ChitchatMessage::SynAck { .. } => "synack",
            chitchat::ChitchatMessage::Ack { .. } => "ack",
            chitchat::ChitchatMessage::BadCluster => "bad_cluster",
        };
        metrics::counter!("grid_gossip_messages_sent_total", "kind" => kind).increment(1);
        let payload = envelope.serialize_to_vec();
        let num_bytes_sent = payload.len();
        // Never awaits the network: see `Transport::send_gossip`.
        self.transport.send_gossip(to, payload);
        Ok(SendOutcome { num_bytes_sent })
    }

    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        loop {
            let Some((from_addr, bytes)) = self.inbox.recv().await else {
                // The transport is gone: the member is shutting down.
                std::future::pending::<()>().await;
                unreachable!();
            };
            let mut cursor: &[u8] = &bytes;
            match ChitchatEnvelope::deserialize(&mut cursor) {
                Ok(envelope) => {
                    return Ok(RecvOutcome {
                        from_addr,
                        envelope,
                        num_bytes_received: bytes.len(),
                    })
                }
                Err(e) => {
                    warn!(%from_addr, error = %e, "undecodable gossip message dropped");
                    metrics::counter!(
                        "grid_net_frames_refused_total",
                        "reason" => "bad_gossip"
                    )
                    .increment(1);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, RngCore, SeedableRng};

    /// chitchat's decoder is fed whatever a peer sends: random and mutated input must give
    /// errors, never panics.
    #[test]
    fn random_gossip_bytes_never_panic() {
        let seed: u64 = std::env::var("GRID_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(rand::random);
        println!("seed {seed} (rerun with GRID_TEST_SEED={seed})");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for _ in 0..20_000 {
            let len = rng.gen_range(0..256);
            let mut buf = vec![0u8; len];
            rng.fill_bytes(&mut buf);
            if len >= 3 && rng.gen_bool(0.7) {
                // A valid header (magic number, version) so the decoder goes deeper.
                buf[0] = 0x53; // 45_139, little-endian
                buf[1] = 0xb0;
                buf[2] = rng.gen_range(0..2);
            }
            let _ = ChitchatEnvelope::deserialize(&mut &buf[..]);
        }
    }
}
