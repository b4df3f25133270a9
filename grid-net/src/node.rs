//! One member's networking, started in the right order: identity, QUIC endpoint, gossip,
//! member list, topics, multicast discovery — and stopped gracefully (announce, then close)
//! or abruptly (for tests).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chitchat::{spawn_chitchat, ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::config::NetConfig;
use crate::gossip::QuicGossip;
use crate::membership::{
    self, Cluster, Member, ATTR_PREFIX, KEY_PROTOCOL, KEY_STATUS, ROUTE_LEAVE,
};
use crate::tls::Identity;
use crate::topic::{Topic, TopicError, TopicRegistry, ROUTE_TOPIC};
use crate::transport::{LocalMember, Transport, TransportConfig};
use crate::{multicast, NetError, PROTOCOL_VERSION};

/// How long a leaving member waits for each peer to acknowledge its departure.
const LEAVE_TIMEOUT: Duration = Duration::from_millis(500);

/// A running member's networking: transport, gossip, membership, topics.
///
/// ```no_run
/// # async fn demo() -> Result<(), grid_net::NetError> {
/// use grid_net::config::NetConfig;
/// let mut config = NetConfig { cluster_name: "demo".into(), ..Default::default() };
/// config.network.bind = "127.0.0.1:0".parse().unwrap();
/// config.network.seeds = vec![];
/// let node = grid_net::node::Node::start(config).await?;
/// assert!(node.cluster().is_leader());
/// node.shutdown().await;
/// # Ok(()) }
/// ```
pub struct Node {
    transport: Transport,
    cluster: Cluster,
    chitchat: Arc<Mutex<Option<ChitchatHandle>>>,
    topics: Arc<TopicRegistry>,
    multicast: Option<JoinHandle<()>>,
    stopped: AtomicBool,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("member", &self.cluster.local_member().id)
            .field("addr", &self.transport.advertise_addr())
            .finish()
    }
}

fn random_member_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

fn identity(config: &NetConfig, member_id: &str) -> Result<Identity, NetError> {
    let tls = &config.tls;
    match (&tls.ca, &tls.cert, &tls.key) {
        (Some(ca), Some(cert), Some(key)) => Identity::from_pem_files(ca, cert, key),
        (None, None, None) => {
            let secret = match &tls.secret {
                Some(s) => s.clone(),
                None => {
                    warn!(
                        cluster = %config.cluster_name,
                        "DEVELOPMENT SETTING: no TLS files and no cluster secret configured; the \
                         cluster CA is derived from the cluster name, so anyone who knows the name \
                         can join. Set tls.secret, or tls.ca/cert/key, in production."
                    );
                    format!(
                        "grid development secret for cluster {}",
                        config.cluster_name
                    )
                }
            };
            Identity::from_secret(secret.as_bytes(), member_id)
        }
        _ => Err(NetError::Tls(
            "tls.ca, tls.cert and tls.key go together: set all three or none".into(),
        )),
    }
}

fn bind_socket(config: &NetConfig) -> Result<std::net::UdpSocket, NetError> {
    let bind = config.network.bind;
    let tries = if bind.port() == 0 {
        0
    } else {
        config.network.port_auto_increment
    };
    let mut last = None;
    for i in 0..=tries {
        let mut addr = bind;
        let Some(port) = bind.port().checked_add(i) else {
            break;
        };
        addr.set_port(port);
        match std::net::UdpSocket::bind(addr) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some((addr, e)),
        }
    }
    let (addr, source) = last.unwrap_or((
        bind,
        std::io::Error::new(std::io::ErrorKind::AddrInUse, "no port left to try"),
    ));
    Err(NetError::Bind { addr, source })
}

impl Node {
    /// Starts a member: binds its port, joins the cluster through the seeds (and multicast
    /// if enabled) and returns at once — other members appear in [`Node::cluster`] as gossip
    /// finds them.
    pub async fn start(config: NetConfig) -> Result<Self, NetError> {
        let member_id = config.member_id.clone().unwrap_or_else(random_member_id);
        let generation = match &config.environment {
            Some(env) => env.generation(),
            None => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_micros() as u64)
                .unwrap_or(1),
        };
        let identity = identity(&config, &member_id)?;
        let socket = match &config.environment {
            Some(env) => {
                Err(env
                    .bind_udp(config.network.bind)
                    .map_err(|source| NetError::Bind {
                        addr: config.network.bind,
                        source,
                    })?)
            }
            None => Ok(bind_socket(&config)?),
        };
        let bound = match &socket {
            Ok(os) => os.local_addr(),
            Err(provided) => provided.local_addr(),
        }
        .map_err(|source| NetError::Bind {
            addr: config.network.bind,
            source,
        })?;
        let advertise = config.network.advertise.unwrap_or(bound);
        if advertise.ip().is_unspecified() {
            return Err(NetError::Bind {
                addr: bound,
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "bound to an unspecified address: set network.advertise to the address other members should dial",
                ),
            });
        }
        let local_member = LocalMember {
            cluster: config.cluster_name.clone(),
            member_id: member_id.clone(),
            generation,
            settings: config.must_match.clone(),
        };
        let transport_config = TransportConfig {
            max_frame_size: config.network.max_frame_size,
            max_udp_payload: config.network.max_udp_payload,
            bulk_endpoint: config.network.bulk_endpoint,
            bulk_port: config.network.bulk_port,
            bulk_priority: config.network.bulk_priority,
            socket_buffer: config.network.socket_buffer,
            ..TransportConfig::default()
        };
        let transport = match (socket, &config.environment) {
            (Err(provided), Some(env)) => Transport::from_environment(
                env.clone(),
                provided,
                Some(advertise),
                &identity,
                local_member,
                transport_config,
            )?,
            (Ok(os), _) => Transport::from_socket(
                os,
                Some(advertise),
                &identity,
                local_member,
                transport_config,
            )?,
            (Err(_), None) => unreachable!("a provided socket comes with its environment"),
        };

        let gossip_interval = config.membership.gossip_interval();
        let chitchat_config = ChitchatConfig {
            chitchat_id: ChitchatId::new(member_id.clone(), generation, advertise),
            cluster_id: config.cluster_name.clone(),
            gossip_interval,
            listen_addr: advertise,
            seed_nodes: config.network.seeds.clone(),
            failure_detector_config: FailureDetectorConfig {
                phi_threshold: config.membership.phi_threshold,
                sampling_window_size: 200,
                max_interval: gossip_interval * 20,
                initial_interval: gossip_interval,
                dead_node_grace_period: Duration::from_secs(600),
            },
            marked_for_deletion_grace_period: Duration::from_secs(3600),
            catchup_callback: None,
            extra_liveness_predicate: None,
            protocol_version: chitchat::ProtocolVersion::V0,
        };
        let mut key_values = vec![
            (KEY_PROTOCOL.to_string(), PROTOCOL_VERSION.to_string()),
            (KEY_STATUS.to_string(), "up".to_string()),
        ];
        for (k, v) in &config.attributes {
            key_values.push((format!("{ATTR_PREFIX}{k}"), v.clone()));
        }
        let handle = spawn_chitchat(
            chitchat_config,
            key_values,
            &QuicGossip::new(transport.clone()),
        )
        .await
        .map_err(|e| NetError::Protocol(format!("gossip did not start: {e}")))?;
        let live = handle.with_chitchat(|c| c.live_nodes_watcher()).await;

        let local = Member {
            id: Arc::from(member_id.as_str()),
            generation,
            addr: advertise,
            protocol: PROTOCOL_VERSION,
            attributes: config.attributes.clone(),
        };
        // Someone to look for: a seed that is not this member, or multicast.
        let looks_for_others = config.multicast.enabled
            || config.network.seeds.iter().any(|seed| {
                seed.parse::<SocketAddr>()
                    .map_or(true, |a| a != advertise && a != bound)
            });
        let join_timeout =
            looks_for_others.then(|| Duration::from_millis(config.membership.join_timeout_ms));
        let cluster = membership::start(local, live, transport.clone(), join_timeout);
        {
            let cluster = cluster.clone();
            transport.on_request_typed(
                ROUTE_LEAVE,
                move |peer, (id, generation): (String, u64)| {
                    let cluster = cluster.clone();
                    async move {
                        if *peer.member_id != id {
                            return Err("a member can only announce its own departure".to_string());
                        }
                        cluster.mark_departed(&id, generation);
                        Ok(())
                    }
                },
            );
        }
        let topics = Arc::new(TopicRegistry::default());
        {
            let topics = topics.clone();
            transport.on_message(ROUTE_TOPIC, move |_peer, frame| topics.deliver_frame(frame));
        }
        let chitchat = Arc::new(Mutex::new(Some(handle)));
        let multicast = if config.multicast.enabled {
            let chitchat = chitchat.clone();
            Some(multicast::start(
                &config.multicast,
                &config.cluster_name,
                &member_id,
                advertise,
                move |addr| {
                    if let Some(h) = chitchat.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                        let _ = h.gossip(addr);
                    }
                },
            )?)
        } else {
            None
        };
        // What is in force, for whoever reads the log first (never the secret itself).
        let tls_mode = match (&config.tls.ca, &config.tls.secret) {
            (Some(ca), _) => format!("certificates (CA {})", ca.display()),
            (None, Some(_)) => "secret-derived CA".to_string(),
            (None, None) => "CA derived from the cluster name (development)".to_string(),
        };
        let discovery = match (config.multicast.enabled, config.network.seeds.is_empty()) {
            (true, true) => format!(
                "multicast {}:{}",
                config.multicast.group, config.multicast.port
            ),
            (true, false) => format!(
                "seeds and multicast {}:{}",
                config.multicast.group, config.multicast.port
            ),
            (false, false) => "seeds".to_string(),
            (false, true) => "none (a cluster of its own until others seed it)".to_string(),
        };
        info!(
            member = %member_id,
            cluster = %config.cluster_name,
            %advertise,
            bind = %transport.local_addr(),
            bulk = %transport.bulk_local_addr().map_or_else(|| "off (copies on the main port)".to_string(), |a| a.to_string()),
            tls = %tls_mode,
            seeds = %config.network.seeds.join(","),
            %discovery,
            "member started"
        );
        Ok(Self {
            transport,
            cluster,
            chitchat,
            topics,
            multicast,
            stopped: AtomicBool::new(false),
        })
    }

    /// The cluster as this member sees it.
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// The member's transport (for services built on grid-net).
    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// The address other members dial.
    pub fn addr(&self) -> SocketAddr {
        self.transport.advertise_addr()
    }

    /// A handle on the channel `name` carrying messages of type `M`.
    pub fn topic<M: Serialize + DeserializeOwned>(
        &self,
        name: &str,
    ) -> Result<Topic<M>, TopicError> {
        Topic::new(
            name,
            self.topics.clone(),
            self.cluster.clone(),
            self.transport.clone(),
        )
    }

    /// Leaves the cluster gracefully: marks itself leaving in gossip, tells every member
    /// directly (so they report it as left at once), then stops gossip and closes the
    /// endpoint.
    pub async fn shutdown(&self) {
        if self.stopped.swap(true, Ordering::SeqCst) {
            return;
        }
        let handle = self
            .chitchat
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(handle) = &handle {
            set_leaving(&handle.chitchat()).await;
        }
        let local = self.cluster.local_member().clone();
        let notice = (local.id.to_string(), local.generation);
        let peers: Vec<_> = self
            .cluster
            .members()
            .iter()
            .filter(|m| m.id != local.id)
            .map(|m| m.addr)
            .collect();
        let sends = peers.into_iter().map(|addr| {
            let t = self.transport.clone();
            let notice = notice.clone();
            async move {
                let r: Result<(), _> = t
                    .request_typed(addr, ROUTE_LEAVE, &notice, LEAVE_TIMEOUT)
                    .await;
                if let Err(e) = r {
                    warn!(%addr, error = %e, "leave notice not acknowledged");
                }
            }
        });
        futures::future::join_all(sends).await;
        if let Some(handle) = handle {
            let _ = handle.shutdown().await;
        }
        if let Some(m) = &self.multicast {
            m.abort();
        }
        self.transport.shutdown().await;
        info!(member = %local.id, "member left the cluster");
    }

    /// Marks this member `leaving` in gossip and does nothing else: no direct notices, no
    /// stop. Other members must then see its departure from gossip alone, as they do when a
    /// notice is lost or slower than gossip. For tests.
    #[doc(hidden)]
    pub async fn announce_leaving_by_gossip_only(&self) {
        let chitchat = self
            .chitchat
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(ChitchatHandle::chitchat);
        if let Some(chitchat) = chitchat {
            set_leaving(&chitchat).await;
        }
    }

    /// Stops the member abruptly, without a word to anyone: its socket goes silent and its
    /// tasks stop, as if the process had been killed. Other members notice through failure
    /// detection. For tests and demos.
    pub fn kill(&self) {
        if self.stopped.swap(true, Ordering::SeqCst) {
            return;
        }
        self.transport.kill();
        if let Some(handle) = self
            .chitchat
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            handle.abort();
        }
        if let Some(m) = &self.multicast {
            m.abort();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // A member dropped without `shutdown` stops its tasks; the others see it fail.
        self.kill();
    }
}

/// Sets this member's gossip status to `leaving`.
async fn set_leaving(chitchat: &tokio::sync::Mutex<chitchat::Chitchat>) {
    chitchat
        .lock()
        .await
        .self_node_state()
        .set(KEY_STATUS, "leaving");
}
