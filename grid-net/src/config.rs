//! A member's network settings. Each section deserializes from TOML (grid-core's
//! `GridConfig` puts them together and applies environment overrides); every field has a
//! default that works on one machine with no configuration.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Where the member listens and whom it asks first.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    /// UDP address of the member's QUIC port (default `127.0.0.1:5701`). Port 0 lets the OS
    /// choose. Partition copies use a second port on the same address (`bulk_port`).
    pub bind: SocketAddr,
    /// When the bind port is taken, try the next ones, this many (default 100; like
    /// Hazelcast's port auto-increment). Ignored for port 0.
    pub port_auto_increment: u16,
    /// The address other members dial, when it differs from `bind` (NAT, `0.0.0.0`).
    pub advertise: Option<SocketAddr>,
    /// Seed members as `host:port` (DNS names allowed). Seeds need not be up when the
    /// member starts; it joins when they appear. Default: ports 5701–5703 on 127.0.0.1, so
    /// that members started with no configuration on one machine find each other.
    pub seeds: Vec<String>,
    /// Largest frame accepted or sent, in bytes (default 16 MiB).
    pub max_frame_size: usize,
    /// Largest UDP payload QUIC's path MTU discovery may grow packets to (default 8952,
    /// jumbo Ethernet; 1200 to 65527). Packets start at 1200 bytes and only grow as far as
    /// the path carries them, so a high value is safe on any network.
    pub max_udp_payload: u16,
    /// Partition copies travel on a second QUIC port whose work runs at lower priority than
    /// operations, so that a rebalance slows operations less (default true; measurements in
    /// BENCHMARKS.md). Off, copies share the member's one port.
    pub bulk_endpoint: bool,
    /// UDP port of that second endpoint, on the bind address (default 0: any free port;
    /// set one when a firewall must let it through). Members learn it from each other.
    pub bulk_port: u16,
    /// How the threads that copy partitions are scheduled: `"idle"` (default: only on CPU
    /// that operations leave; fastest operations, slowest copies on a busy machine),
    /// `"nice"` (nice 10: about a tenth of a busy core) or `"normal"` (like the
    /// application's threads). See [`crate::bulk_runtime::BulkPriority`].
    pub bulk_priority: crate::bulk_runtime::BulkPriority,
    /// Receive and send buffer of each UDP socket, in bytes (default 4 MiB; 0: the OS
    /// default). Linux caps it at `net.core.rmem_max` / `wmem_max`, so raise those for a
    /// larger one. See [`crate::transport::TransportConfig::socket_buffer`].
    pub socket_buffer: usize,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 5701)),
            port_auto_increment: 100,
            advertise: None,
            seeds: (5701..=5703).map(|p| format!("127.0.0.1:{p}")).collect(),
            max_frame_size: 16 * 1024 * 1024,
            max_udp_payload: 8952,
            bulk_endpoint: true,
            bulk_port: 0,
            bulk_priority: crate::bulk_runtime::BulkPriority::Idle,
            socket_buffer: 4 << 20,
        }
    }
}

/// How the member proves it belongs to the cluster.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file of the cluster CA certificate (production; with `cert` and `key`).
    pub ca: Option<PathBuf>,
    /// PEM file of this member's certificate chain.
    pub cert: Option<PathBuf>,
    /// PEM file of this member's private key.
    pub key: Option<PathBuf>,
    /// Development setting: the shared secret the cluster CA is derived from. Default: derived
    /// from the cluster name, which anyone who knows the name can reproduce — a warning is
    /// logged at start.
    pub secret: Option<String>,
}

/// Multicast discovery (off by default).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MulticastConfig {
    /// Whether to announce and listen (default false).
    pub enabled: bool,
    /// The multicast group (default 224.2.2.3).
    pub group: Ipv4Addr,
    /// The UDP port (default 54327).
    pub port: u16,
    /// Time-to-live of announcements (default 1: the local network only).
    pub ttl: u32,
    /// The interface to join and send on (default: the bind address's if it is IPv4 and not
    /// unspecified, else the OS's choice).
    pub interface: Option<Ipv4Addr>,
    /// Milliseconds between announcements (default 1000; the first few go faster).
    pub interval_ms: u64,
}

impl Default for MulticastConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            group: Ipv4Addr::new(224, 2, 2, 3),
            port: 54327,
            ttl: 1,
            interface: None,
            interval_ms: 1000,
        }
    }
}

/// Gossip and failure detection.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MembershipConfig {
    /// Milliseconds between gossip rounds (default 100).
    pub gossip_interval_ms: u64,
    /// Phi-accrual threshold: a member is declared failed once no heartbeat arrived for
    /// this many mean heartbeat intervals (default 10; about 1–1.5 s on a LAN).
    pub phi_threshold: f64,
    /// How long a starting member with seeds (or multicast) looks for its cluster before it
    /// starts one of its own, in milliseconds (default 2000). It joins as soon as it sees
    /// another member; until then it coordinates nothing and owns no partition. A member
    /// without seeds or multicast starts its own cluster at once.
    pub join_timeout_ms: u64,
}

impl Default for MembershipConfig {
    fn default() -> Self {
        Self {
            gossip_interval_ms: 100,
            phi_threshold: 10.0,
            join_timeout_ms: 2000,
        }
    }
}

impl MembershipConfig {
    pub(crate) fn gossip_interval(&self) -> Duration {
        Duration::from_millis(self.gossip_interval_ms.max(10))
    }
}

/// Everything `grid-net` needs to start a member ([`crate::node::Node::start`]).
#[derive(Debug, Clone, Default)]
pub struct NetConfig {
    /// Cluster name; members of other clusters are refused (default `"grid"` via grid-core).
    pub cluster_name: String,
    /// Member id; random when `None`. Keep it stable across restarts to be recognised as
    /// the same member (the newest generation wins).
    pub member_id: Option<String>,
    /// Member attributes, gossiped to everyone (e.g. `zone`, `host`, `data=false`).
    pub attributes: BTreeMap<String, String>,
    /// Addresses.
    pub network: NetworkConfig,
    /// Identity.
    pub tls: TlsConfig,
    /// Multicast discovery.
    pub multicast: MulticastConfig,
    /// Gossip and failure detection.
    pub membership: MembershipConfig,
    /// Settings every member must agree on, checked at the handshake (filled by the layers
    /// above, e.g. the partition count).
    pub must_match: Vec<(String, String)>,
    /// Sockets, generation and seeds from a simulated environment instead of the OS
    /// (`None`, the default: real sockets). See [`crate::environment`].
    pub environment: Option<std::sync::Arc<dyn crate::environment::NetEnvironment>>,
}
