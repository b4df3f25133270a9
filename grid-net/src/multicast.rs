//! Multicast discovery: members announce their QUIC address on a multicast group and dial
//! the addresses they hear. An announcement only carries an address — trust still comes from
//! the TLS handshake, so a forged announcement achieves nothing but a refused dial.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::config::MulticastConfig;
use crate::{codec, NetError};

const MAGIC: u32 = 0x6772_6964; // "grid"
const MAX_ANNOUNCEMENT: usize = 1024;

#[derive(Debug, Serialize, Deserialize)]
struct Announcement {
    magic: u32,
    cluster: String,
    member_id: String,
    addr: SocketAddr,
}

fn bind_socket(
    config: &MulticastConfig,
    interface: Ipv4Addr,
) -> std::io::Result<std::net::UdpSocket> {
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    #[cfg(unix)]
    socket.set_reuse_port(true)?;
    socket.bind(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, config.port).into())?;
    socket.join_multicast_v4(&config.group, &interface)?;
    socket.set_multicast_if_v4(&interface)?;
    socket.set_multicast_loop_v4(true)?;
    socket.set_multicast_ttl_v4(config.ttl)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Starts announcing `advertise` and calling `found` with the address of every member of
/// `cluster` heard on the group.
pub(crate) fn start(
    config: &MulticastConfig,
    cluster: &str,
    member_id: &str,
    advertise: SocketAddr,
    found: impl Fn(SocketAddr) + Send + 'static,
) -> Result<JoinHandle<()>, NetError> {
    let interface = config.interface.unwrap_or(match advertise.ip() {
        std::net::IpAddr::V4(ip) if !ip.is_unspecified() => ip,
        _ => Ipv4Addr::UNSPECIFIED,
    });
    let bind_addr = SocketAddr::from((config.group, config.port));
    let std_socket = bind_socket(config, interface).map_err(|source| NetError::Bind {
        addr: bind_addr,
        source,
    })?;
    let socket = tokio::net::UdpSocket::from_std(std_socket).map_err(|source| NetError::Bind {
        addr: bind_addr,
        source,
    })?;
    let announcement = codec::encode(&Announcement {
        magic: MAGIC,
        cluster: cluster.to_string(),
        member_id: member_id.to_string(),
        addr: advertise,
    })?;
    let cluster = cluster.to_string();
    let member_id = member_id.to_string();
    let interval = Duration::from_millis(config.interval_ms.max(50));
    info!(group = %bind_addr, %interface, "multicast discovery on");
    Ok(tokio::spawn(async move {
        let mut buf = vec![0u8; MAX_ANNOUNCEMENT];
        let mut sent = 0u32;
        let mut next = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {
                    if let Err(e) = socket.send_to(&announcement, bind_addr).await {
                        debug!(error = %e, "multicast announcement not sent");
                    }
                    sent += 1;
                    // The first announcements go out faster so that a new member is found
                    // quickly; then the configured interval.
                    let wait = if sent < 5 { interval.min(Duration::from_millis(200)) } else { interval };
                    next = tokio::time::Instant::now() + wait;
                }
                received = socket.recv_from(&mut buf) => {
                    let (n, from) = match received {
                        Ok(r) => r,
                        Err(e) => { debug!(error = %e, "multicast receive failed"); continue; }
                    };
                    match codec::decode::<Announcement>(&buf[..n]) {
                        Ok(a) if a.magic == MAGIC => {
                            if a.cluster == cluster && a.member_id != member_id {
                                found(a.addr);
                            }
                        }
                        _ => warn!(%from, "undecodable multicast announcement ignored"),
                    }
                }
            }
        }
    }))
}
