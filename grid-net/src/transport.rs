//! The QUIC endpoint: one UDP socket that accepts and dials, a cache of one connection per
//! peer, and the four ways bytes move between members — request/response, ordered one-way
//! messages, gossip datagrams-on-streams and bulk streams.
//!
//! Bulk streams (partition copies) take a second endpoint of the same kind, on its own UDP
//! port, whose tasks run on the lower-priority runtime of [`crate::bulk_runtime`]: the
//! kernel then runs operations first and copies on the CPU left over. A member asks a peer
//! for its bulk port (route `grid.net.bulk_addr`, over the main connection) and falls back
//! to the main endpoint when the peer has none or it cannot be reached.
//!
//! Every stream starts with a kind byte ([`StreamKind`]); every frame is length-prefixed and
//! checked against [`TransportConfig::max_frame_size`] before it is buffered. Bad input from a
//! peer resets that stream with a warning; a peer that keeps sending bad input loses its
//! connection. Nothing a peer sends can panic this module.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use tokio::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::FutureExt;
use quinn::{Connection, Endpoint, RecvStream, SendStream};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::runtime::Handle;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::{AbortHandle, JoinSet};
use tracing::{debug, info, trace, warn};

use crate::backoff::Backoff;
use crate::bulk_runtime::BulkPriority;
use crate::codec;
use crate::environment::NetEnvironment;
use crate::frame::{read_frame, FrameError, FrameReader};
use crate::mux::{
    self, LaneClass, LaneFrame, MuxClient, MuxError, Outgoing, MAX_LANE_TASKS, MUX_MAX_PAYLOAD,
};
use crate::socket::{FaultSwitch, FaultySocket};
use crate::tls::{explain_handshake_error, HandshakeWarnings, Identity, SERVER_NAME};
use crate::wire::{
    codes, decode_routed, Hello, HelloReply, StreamKind, MAX_ROUTE_LEN, PROTOCOL_VERSION,
    RESPONSE_ERR, RESPONSE_OK,
};
use crate::NetError;

/// The route on which a member tells the UDP port of its bulk endpoint.
const BULK_ADDR_ROUTE: &str = "grid.net.bulk_addr";

/// Largest gossip message: chitchat's own datagram limit. Gossip is compressed, so this
/// also bounds what one message can decompress to.
pub(crate) const MAX_GOSSIP_FRAME: usize = 65_507;

/// Tuning of the transport. The defaults suit a LAN or one machine.
#[derive(Debug, Clone)]
pub struct TransportConfig {
    /// Largest frame accepted or sent (default 16 MiB).
    pub max_frame_size: usize,
    /// How long a dial (QUIC and TLS handshake plus grid's hello) may take (default 2 s).
    pub connect_timeout: Duration,
    /// Idle timeout of a connection; keep-alives go out at half of it (default 6 s).
    pub idle_timeout: Duration,
    /// First wait after a failed dial before the next one (default 50 ms), doubled on each
    /// failure up to [`TransportConfig::max_backoff`]. Each wait is jittered down by up to
    /// half ([`crate::backoff`]), from a seed made of this member's id and generation and the
    /// peer's address: members do not redial together, and a simulated run replays.
    pub initial_backoff: Duration,
    /// Longest wait between dials to an unreachable peer (default 1 s).
    pub max_backoff: Duration,
    /// Ordered one-way messages queued per peer before `send_ordered` waits (default 8192).
    pub ordered_queue: usize,
    /// Concurrent streams a peer may open to us, per direction kind (default 1024).
    pub max_concurrent_streams: u32,
    /// Bad frames a connection may send before it is closed (default 16).
    pub max_protocol_errors: u32,
    /// Gossip sends in flight at once; more are dropped and counted (default 256).
    pub max_gossip_in_flight: usize,
    /// Largest UDP payload a connection may grow its packets to (default 8952: jumbo
    /// Ethernet frames). Packets start at 1200 bytes; QUIC's path MTU discovery then finds
    /// what the path carries, up to this, and on a 1500-byte network simply stays at 1452.
    /// Bigger packets cut the per-packet work (encryption, acknowledgements, system calls)
    /// of bulk copies and large values (measurements in BENCHMARKS.md). One send carries at
    /// most 64 KiB of datagrams (7 of 8,952 bytes; quinn would batch 10, which the kernel
    /// refuses), so the larger this, the fewer datagrams per system call.
    pub max_udp_payload: u16,
    /// Bulk streams (partition copies) travel on a second QUIC endpoint whose tasks run
    /// at lower priority ([`crate::bulk_runtime`]), so that copies do not slow operations
    /// (default on). Its UDP port is [`TransportConfig::bulk_port`]; peers learn it by
    /// asking. Off, bulk streams share the member's one endpoint.
    pub bulk_endpoint: bool,
    /// UDP port of the bulk endpoint, on the member's bind address (default 0: any free
    /// port — set one when a firewall must let it through).
    pub bulk_port: u16,
    /// Scheduling of the bulk endpoint's threads (default [`BulkPriority::Idle`]). They
    /// are shared by every member of a process: the first member to start decides.
    pub bulk_priority: BulkPriority,
    /// Receive and send buffer of each UDP socket, in bytes (default 4 MiB; 0 leaves the
    /// OS default, 208 KiB on Linux). The kernel caps it at `net.core.rmem_max` /
    /// `wmem_max`. A default-sized buffer holds about fifteen 9 KB packets: a bulk copy's
    /// bursts overflowed it whenever the receiving thread was preempted, and every drop
    /// cut QUIC's congestion window (BENCHMARKS.md).
    pub socket_buffer: usize,
}

impl Default for TransportConfig {
    fn default() -> Self {
        Self {
            max_frame_size: 16 * 1024 * 1024,
            connect_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(6),
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(1),
            ordered_queue: 8192,
            max_concurrent_streams: 1024,
            max_protocol_errors: 16,
            max_gossip_in_flight: 256,
            max_udp_payload: 8952,
            bulk_endpoint: true,
            bulk_port: 0,
            bulk_priority: BulkPriority::Idle,
            socket_buffer: 4 << 20,
        }
    }
}

/// What this member says about itself in the handshake.
#[derive(Debug, Clone)]
pub struct LocalMember {
    /// Cluster name; a peer of another cluster is refused.
    pub cluster: String,
    /// Member id, stable across restarts if the user sets it.
    pub member_id: String,
    /// Start generation: higher means started later.
    pub generation: u64,
    /// Settings every member must agree on, e.g. `("partitions", "271")`.
    pub settings: Vec<(String, String)>,
}

/// The other end of a connection, as it introduced itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// The peer's member id.
    pub member_id: Arc<str>,
    /// The peer's start generation.
    pub generation: u64,
    /// Where the peer accepts connections.
    pub addr: SocketAddr,
}

type RequestFn = dyn Fn(PeerInfo, Bytes) -> BoxFuture<'static, Result<Bytes, String>> + Send + Sync;
type MessageFn = dyn Fn(PeerInfo, Bytes) + Send + Sync;
type BulkFn = dyn Fn(PeerInfo, Bytes, BulkReceiver) -> BoxFuture<'static, Result<Bytes, String>>
    + Send
    + Sync;

#[derive(Clone)]
enum Route {
    Request(Arc<RequestFn>),
    Message(Arc<MessageFn>),
    Bulk(Arc<BulkFn>),
}

#[derive(Clone)]
struct Live {
    conn: Connection,
    peer: PeerInfo,
    dialed_by_us: bool,
    /// Our request lanes on this connection.
    mux: Arc<MuxClient>,
}

#[derive(Default)]
struct SlotState {
    conn: Option<Live>,
    /// Waits between failed dials; `None` until a dial fails, and again after one succeeds.
    backoff: Option<Backoff>,
    /// No dial before this (tokio's clock, which a simulator drives).
    retry_at: Option<Instant>,
    last_error: String,
    ordered: Option<mpsc::Sender<Bytes>>,
}

struct PeerSlot {
    dial: tokio::sync::Mutex<()>,
    state: Mutex<SlotState>,
}

impl PeerSlot {
    fn lock(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn live(&self) -> Option<Live> {
        let st = self.lock();
        st.conn
            .as_ref()
            .filter(|l| l.conn.close_reason().is_none())
            .cloned()
    }
}

struct Inner {
    endpoint: Endpoint,
    client_config: quinn::ClientConfig,
    local: LocalMember,
    advertise: SocketAddr,
    config: TransportConfig,
    peers: Mutex<HashMap<SocketAddr, Arc<PeerSlot>>>,
    routes: RwLock<HashMap<String, Route>>,
    gossip_sink: OnceLock<mpsc::Sender<(SocketAddr, Bytes)>>,
    gossip_permits: Arc<Semaphore>,
    faults: Arc<FaultSwitch>,
    closing: AtomicBool,
    /// The runtime this transport's tasks run on.
    spawner: Handle,
    /// The endpoint for bulk streams, if separate.
    bulk: Option<Transport>,
    /// Peers' bulk endpoint addresses, by their main address (the main address itself for
    /// a peer without one, or whose bulk endpoint could not be reached).
    bulk_addrs: Mutex<HashMap<SocketAddr, SocketAddr>>,
}

/// The member's QUIC endpoint and everything that moves bytes through it. Cheap to clone.
///
/// ```no_run
/// # async fn demo() -> Result<(), grid_net::NetError> {
/// use grid_net::transport::{LocalMember, Transport, TransportConfig};
/// use grid_net::tls::Identity;
/// use std::time::Duration;
///
/// let local = |id: &str| LocalMember {
///     cluster: "demo".into(),
///     member_id: id.into(),
///     generation: 1,
///     settings: vec![],
/// };
/// let id = Identity::from_secret(b"secret", "a")?;
/// let a = Transport::bind("127.0.0.1:0".parse().unwrap(), None, &id, local("a"), TransportConfig::default())?;
/// let b = Transport::bind("127.0.0.1:0".parse().unwrap(), None, &id, local("b"), TransportConfig::default())?;
/// a.on_request_typed("echo", |_peer, s: String| async move { Ok::<_, String>(s) });
/// let reply: String = b.request_typed(a.local_addr(), "echo", &"hi".to_string(), Duration::from_secs(1)).await?;
/// assert_eq!(reply, "hi");
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Transport {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("member", &self.inner.local.member_id)
            .field("addr", &self.inner.advertise)
            .finish()
    }
}

/// Logs a failed handshake — a warning for what configuration must fix (certificates,
/// protocol version), debug for a peer that is down or leaving — and returns why.
/// Warnings are limited per peer address ([`HandshakeWarnings`]).
fn log_handshake_failure(peer: SocketAddr, text: &str, context: &str) -> &'static str {
    static WARNINGS: OnceLock<HandshakeWarnings> = OnceLock::new();
    let (serious, why) = explain_handshake_error(text);
    if serious {
        match WARNINGS
            .get_or_init(HandshakeWarnings::default)
            .admit(peer, Instant::now())
        {
            Some(suppressed) => warn!(%peer, error = %text, suppressed, "{context}: {why}"),
            None => debug!(%peer, error = %text, "{context}: {why}"),
        }
    } else {
        debug!(%peer, error = %text, "{context}: {why}");
    }
    why
}

fn lost(addr: SocketAddr, e: impl std::fmt::Display) -> NetError {
    NetError::ConnectionLost {
        addr,
        reason: e.to_string(),
    }
}

/// Builds `[kind?][u32 len][u8 route len][route][body]` in one buffer.
fn routed_frame(kind: Option<StreamKind>, route: &str, body: &[u8]) -> Bytes {
    let inner_len = 1 + route.len() + body.len();
    let mut buf = BytesMut::with_capacity(5 + inner_len);
    if let Some(k) = kind {
        buf.put_u8(k as u8);
    }
    buf.put_u32(inner_len as u32);
    buf.put_u8(route.len() as u8);
    buf.put_slice(route.as_bytes());
    buf.put_slice(body);
    buf.freeze()
}

fn framed(prefix: Option<u8>, body: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(5 + body.len());
    if let Some(p) = prefix {
        buf.put_u8(p);
    }
    buf.put_u32(body.len() as u32);
    buf.put_slice(body);
    buf.freeze()
}

/// Asks for `bytes` of receive and send buffer on `socket`. The kernel may grant less (it
/// caps the size at `net.core.rmem_max` / `wmem_max`): logged, not an error.
fn set_socket_buffers(socket: &std::net::UdpSocket, bytes: usize) {
    let sock = socket2::SockRef::from(socket);
    if let Err(e) = sock.set_recv_buffer_size(bytes) {
        warn!(error = %e, bytes, "UDP receive buffer not set");
    }
    if let Err(e) = sock.set_send_buffer_size(bytes) {
        warn!(error = %e, bytes, "UDP send buffer not set");
    }
    debug!(
        asked = bytes,
        receive = ?sock.recv_buffer_size(),
        send = ?sock.send_buffer_size(),
        "UDP socket buffers"
    );
}

/// A UDP socket from the OS, or one an environment provided (the simulator's).
enum Bound {
    Os(std::net::UdpSocket),
    Provided(Arc<dyn quinn::AsyncUdpSocket>),
}

impl Bound {
    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match self {
            Self::Os(s) => s.local_addr(),
            Self::Provided(s) => s.local_addr(),
        }
    }
}

impl Transport {
    /// Binds the member's UDP socket at `bind` (and, with [`TransportConfig::bulk_endpoint`],
    /// the bulk endpoint's on the same address) and starts accepting connections.
    /// `advertise` is the address other members should dial (default: the bound address).
    pub fn bind(
        bind: SocketAddr,
        advertise: Option<SocketAddr>,
        identity: &Identity,
        local: LocalMember,
        config: TransportConfig,
    ) -> Result<Self, NetError> {
        let socket = std::net::UdpSocket::bind(bind)
            .map_err(|source| NetError::Bind { addr: bind, source })?;
        Self::from_socket(socket, advertise, identity, local, config)
    }

    /// As [`Transport::bind`], on a socket the caller bound.
    pub fn from_socket(
        socket: std::net::UdpSocket,
        advertise: Option<SocketAddr>,
        identity: &Identity,
        local: LocalMember,
        config: TransportConfig,
    ) -> Result<Self, NetError> {
        Self::start(Bound::Os(socket), advertise, identity, local, config, None)
    }

    /// As [`Transport::from_socket`], on a socket that `environment` (the simulator's
    /// network) bound, with the bulk endpoint's socket and the QUIC endpoints' seeds taken
    /// from it too. Everything, the bulk endpoint included, runs on the caller's runtime.
    pub fn from_environment(
        environment: Arc<dyn NetEnvironment>,
        socket: Arc<dyn quinn::AsyncUdpSocket>,
        advertise: Option<SocketAddr>,
        identity: &Identity,
        local: LocalMember,
        config: TransportConfig,
    ) -> Result<Self, NetError> {
        Self::start(
            Bound::Provided(socket),
            advertise,
            identity,
            local,
            config,
            Some(environment),
        )
    }

    fn start(
        socket: Bound,
        advertise: Option<SocketAddr>,
        identity: &Identity,
        local: LocalMember,
        config: TransportConfig,
        environment: Option<Arc<dyn NetEnvironment>>,
    ) -> Result<Self, NetError> {
        let spawner = Handle::try_current()
            .map_err(|_| NetError::Tls("no tokio runtime: start the member inside one".into()))?;
        let faults = Arc::new(FaultSwitch::default());
        // The bulk runtime (threads) only starts for a member that has a bulk endpoint; in
        // a provided environment (the simulator) the bulk endpoint runs on the caller's.
        let bulk_runtime = if !config.bulk_endpoint {
            None
        } else if environment.is_some() {
            Some(spawner.clone())
        } else {
            crate::bulk_runtime::handle(config.bulk_priority)
        };
        let bulk = match bulk_runtime {
            Some(on) => {
                let ip = socket
                    .local_addr()
                    .map_err(|source| NetError::Bind {
                        addr: "0.0.0.0:0".parse().expect("literal address"),
                        source,
                    })?
                    .ip();
                let addr = SocketAddr::new(ip, config.bulk_port);
                let bulk_socket = match &environment {
                    Some(env) => Bound::Provided(
                        env.bind_udp(addr)
                            .map_err(|source| NetError::Bind { addr, source })?,
                    ),
                    None => Bound::Os(
                        std::net::UdpSocket::bind(addr)
                            .map_err(|source| NetError::Bind { addr, source })?,
                    ),
                };
                let bulk_advertise = advertise.map(|a| {
                    let port = bulk_socket.local_addr().map_or(0, |b| b.port());
                    SocketAddr::new(a.ip(), port)
                });
                // Everything of the bulk endpoint runs on the bulk runtime: its accept loop
                // and connections (spawned inside `build`) and quinn's drivers.
                let _on = on.enter();
                Some(Self::build(
                    bulk_socket,
                    bulk_advertise,
                    identity,
                    local.clone(),
                    config.clone(),
                    faults.clone(),
                    on.clone(),
                    None,
                    environment.as_ref().map(|e| e.seed("quic bulk")),
                )?)
            }
            _ => None,
        };
        let seed = environment.as_ref().map(|e| e.seed("quic"));
        let transport = Self::build(
            socket, advertise, identity, local, config, faults, spawner, bulk, seed,
        )?;
        if let Some(bulk) = &transport.inner.bulk {
            let port = bulk.advertise_addr().port();
            transport.on_request(BULK_ADDR_ROUTE, move |_peer, _body| async move {
                Ok(Bytes::copy_from_slice(&port.to_be_bytes()))
            });
        }
        Ok(transport)
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        socket: Bound,
        advertise: Option<SocketAddr>,
        identity: &Identity,
        local: LocalMember,
        config: TransportConfig,
        faults: Arc<FaultSwitch>,
        spawner: Handle,
        bulk: Option<Self>,
        rng_seed: Option<[u8; 32]>,
    ) -> Result<Self, NetError> {
        let bound = socket.local_addr().map_err(|source| NetError::Bind {
            addr: "0.0.0.0:0".parse().expect("literal address"),
            source,
        })?;
        if let (Bound::Os(socket), true) = (&socket, config.socket_buffer > 0) {
            set_socket_buffers(socket, config.socket_buffer);
        }
        let mut transport = quinn::TransportConfig::default();
        let idle = quinn::IdleTimeout::try_from(config.idle_timeout)
            .map_err(|e| NetError::Tls(format!("idle timeout: {e}")))?;
        transport
            .max_idle_timeout(Some(idle))
            .keep_alive_interval(Some(config.idle_timeout / 2))
            .max_concurrent_bidi_streams(config.max_concurrent_streams.into())
            .max_concurrent_uni_streams(config.max_concurrent_streams.into())
            // Bound what one connection can make us buffer.
            .receive_window(quinn::VarInt::from_u32(64 * 1024 * 1024))
            .stream_receive_window(quinn::VarInt::from_u32(8 * 1024 * 1024))
            .send_window(64 * 1024 * 1024);
        let max_udp_payload = config.max_udp_payload.clamp(1200, 65_527);
        let mut mtu = quinn::MtuDiscoveryConfig::default();
        mtu.upper_bound(max_udp_payload);
        transport.mtu_discovery_config(Some(mtu));
        let transport = Arc::new(transport);

        let server_crypto =
            quinn::crypto::rustls::QuicServerConfig::try_from(identity.server_config()?)
                .map_err(|e| NetError::Tls(format!("QUIC server config: {e}")))?;
        let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
        server_config.transport_config(transport.clone());
        let client_crypto =
            quinn::crypto::rustls::QuicClientConfig::try_from(identity.client_config()?)
                .map_err(|e| NetError::Tls(format!("QUIC client config: {e}")))?;
        let mut client_config = quinn::ClientConfig::new(Arc::new(client_crypto));
        client_config.transport_config(transport);

        let runtime: Arc<dyn quinn::Runtime> =
            Arc::new(crate::bulk_runtime::OnRuntime(spawner.clone()));
        let udp = match socket {
            Bound::Os(socket) => {
                runtime
                    .wrap_udp_socket(socket)
                    .map_err(|source| NetError::Bind {
                        addr: bound,
                        source,
                    })?
            }
            Bound::Provided(socket) => socket,
        };
        let mut endpoint_config = quinn::EndpointConfig::default();
        endpoint_config.rng_seed(rng_seed);
        endpoint_config
            .max_udp_payload_size(max_udp_payload)
            .map_err(|e| NetError::Tls(format!("max UDP payload: {e}")))?;
        let endpoint = Endpoint::new_with_abstract_socket(
            endpoint_config,
            Some(server_config),
            Arc::new(FaultySocket::new(udp, faults.clone(), max_udp_payload)),
            runtime,
        )
        .map_err(|source| NetError::Bind {
            addr: bound,
            source,
        })?;

        let inner = Arc::new(Inner {
            endpoint,
            client_config,
            local,
            advertise: advertise.unwrap_or(bound),
            gossip_permits: Arc::new(Semaphore::new(config.max_gossip_in_flight)),
            config,
            peers: Mutex::new(HashMap::new()),
            routes: RwLock::new(HashMap::new()),
            gossip_sink: OnceLock::new(),
            faults,
            closing: AtomicBool::new(false),
            spawner,
            bulk,
            bulk_addrs: Mutex::new(HashMap::new()),
        });
        let accept = Arc::downgrade(&inner);
        let endpoint = inner.endpoint.clone();
        inner.spawner.spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                let Some(inner) = accept.upgrade() else { break };
                let this = Self { inner };
                this.spawn(this.clone().handle_incoming(incoming));
            }
        });
        Ok(Self { inner })
    }

    /// Starts a task on this transport's runtime (the bulk endpoint's run on the bulk
    /// runtime, whoever calls).
    fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.inner.spawner.spawn(task);
    }

    /// The address the socket is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner
            .endpoint
            .local_addr()
            .unwrap_or(self.inner.advertise)
    }

    /// The address the bulk endpoint's socket is bound to, if there is one
    /// ([`TransportConfig::bulk_endpoint`]).
    pub fn bulk_local_addr(&self) -> Option<SocketAddr> {
        self.inner.bulk.as_ref().map(Self::local_addr)
    }

    /// The address other members dial.
    pub fn advertise_addr(&self) -> SocketAddr {
        self.inner.advertise
    }

    /// This member's handshake identity.
    pub fn local_member(&self) -> &LocalMember {
        &self.inner.local
    }

    /// The transport's configuration.
    pub fn config(&self) -> &TransportConfig {
        &self.inner.config
    }

    /// The fault-injection switch under this member's socket.
    pub fn faults(&self) -> &FaultSwitch {
        &self.inner.faults
    }

    /// Connections currently open on the endpoint (both directions).
    pub fn open_connections(&self) -> usize {
        self.inner.endpoint.open_connections()
    }

    /// The peers this member has a live cached connection to.
    pub fn connected_peers(&self) -> Vec<PeerInfo> {
        let peers = self.inner.peers.lock().unwrap_or_else(|e| e.into_inner());
        peers
            .values()
            .filter_map(|s| s.live().map(|l| l.peer))
            .collect()
    }

    fn route(&self, route: &str, r: Route) {
        assert!(
            route.len() <= MAX_ROUTE_LEN,
            "route names are at most 255 bytes"
        );
        self.inner
            .routes
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(route.to_string(), r);
    }

    /// Registers the handler of requests on `route`. A handler's `Err(String)` reaches the
    /// caller as [`NetError::Remote`].
    ///
    /// # Cancellation
    ///
    /// When the caller gives up — its deadline passes, it drops the request future, or its
    /// connection closes — the handler's future is dropped, at whichever await point it is
    /// waiting, and nothing is answered. A handler must therefore not leave shared state
    /// half changed across an await: a critical section that must finish once begun goes
    /// into a task of its own (`tokio::spawn`), which the handler may await. Cancellation
    /// is best effort: a handler may also run to its end after its caller gave up.
    pub fn on_request<F, Fut>(&self, route: &str, handler: F)
    where
        F: Fn(PeerInfo, Bytes) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Bytes, String>> + Send + 'static,
    {
        self.route(
            route,
            Route::Request(Arc::new(move |p, b| Box::pin(handler(p, b)))),
        );
    }

    /// Registers a typed request handler: the request is decoded with [`codec`], the answer
    /// encoded. An undecodable request is answered with an error.
    ///
    /// Like every request handler, it may be dropped at any await point when its caller
    /// gives up (see [Cancellation](Transport::on_request#cancellation)): spawn what must
    /// finish.
    pub fn on_request_typed<Req, Resp, F, Fut>(&self, route: &str, handler: F)
    where
        Req: DeserializeOwned + Send + 'static,
        Resp: Serialize + Send + 'static,
        F: Fn(PeerInfo, Req) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Resp, String>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        self.on_request(route, move |peer, body| {
            let handler = handler.clone();
            async move {
                let req: Req = codec::decode(&body).map_err(|e| e.to_string())?;
                let resp = handler(peer, req).await?;
                codec::encode(&resp)
                    .map(Bytes::from)
                    .map_err(|e| e.to_string())
            }
        });
    }

    /// Registers the handler of one-way ordered messages on `route`. It runs on the
    /// connection's reader and must not block: hand the message to a bounded queue.
    pub fn on_message<F>(&self, route: &str, handler: F)
    where
        F: Fn(PeerInfo, Bytes) + Send + Sync + 'static,
    {
        self.route(route, Route::Message(Arc::new(handler)));
    }

    /// Registers the handler of bulk streams on `route`: it gets the header and a
    /// [`BulkReceiver`] of chunks, and returns the answer sent once the stream ends.
    ///
    /// Like a request handler, it is dropped at any await point when the sender gives up
    /// (drops its [`BulkSender`], or its [`BulkSender::finish`] deadline passes) or the
    /// connection closes (see [Cancellation](Transport::on_request#cancellation)).
    pub fn on_bulk<F, Fut>(&self, route: &str, handler: F)
    where
        F: Fn(PeerInfo, Bytes, BulkReceiver) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Bytes, String>> + Send + 'static,
    {
        let handler: Arc<BulkFn> = Arc::new(move |p, h, r| Box::pin(handler(p, h, r)));
        if let Some(bulk) = &self.inner.bulk {
            bulk.route(route, Route::Bulk(handler.clone()));
        }
        self.route(route, Route::Bulk(handler));
    }

    fn find_route(&self, route: &str) -> Option<Route> {
        self.inner
            .routes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(route)
            .cloned()
    }

    fn slot(&self, addr: SocketAddr) -> Arc<PeerSlot> {
        let mut peers = self.inner.peers.lock().unwrap_or_else(|e| e.into_inner());
        peers
            .entry(addr)
            .or_insert_with(|| {
                Arc::new(PeerSlot {
                    dial: tokio::sync::Mutex::new(()),
                    state: Mutex::new(SlotState::default()),
                })
            })
            .clone()
    }

    fn check_frame(&self, size: usize) -> Result<(), NetError> {
        let limit = self.inner.config.max_frame_size;
        if size > limit {
            return Err(NetError::FrameTooLarge { size, limit });
        }
        Ok(())
    }

    /// The cached connection to `addr`, dialing it if needed (one dial at a time per peer,
    /// failed dials backed off exponentially).
    async fn connection(&self, addr: SocketAddr) -> Result<Live, NetError> {
        if self.inner.closing.load(Ordering::Relaxed) {
            return Err(NetError::ShuttingDown);
        }
        let slot = self.slot(addr);
        if let Some(live) = slot.live() {
            return Ok(live);
        }
        let _dialing = slot.dial.lock().await;
        if let Some(live) = slot.live() {
            return Ok(live);
        }
        {
            let st = slot.lock();
            if let Some(at) = st.retry_at {
                let now = Instant::now();
                if at > now {
                    return Err(NetError::Unreachable {
                        addr,
                        reason: format!(
                            "{} (next dial in {:?})",
                            st.last_error,
                            at.saturating_duration_since(now)
                        ),
                    });
                }
            }
        }
        let dialed = tokio::time::timeout(self.inner.config.connect_timeout, self.dial(addr))
            .await
            .unwrap_or_else(|_| {
                Err(NetError::Unreachable {
                    addr,
                    reason: format!(
                        "dial timed out after {:?}",
                        self.inner.config.connect_timeout
                    ),
                })
            });
        match dialed {
            Ok(live) => {
                {
                    let mut st = slot.lock();
                    st.backoff = None;
                    st.retry_at = None;
                }
                self.spawn(self.clone().serve(live.clone()));
                Ok(self.install(&slot, live))
            }
            Err(e) => {
                let mut st = slot.lock();
                let config = &self.inner.config;
                let backoff = st.backoff.get_or_insert_with(|| {
                    Backoff::new(
                        config.initial_backoff,
                        config.max_backoff,
                        self.backoff_seed(addr),
                    )
                });
                // No attempt cap: a peer is dialed again as long as someone asks for it.
                let delay = backoff.next_delay().unwrap_or(config.max_backoff);
                st.retry_at = Some(Instant::now() + delay);
                st.last_error = e.to_string();
                Err(e)
            }
        }
    }

    /// The seed of the dial backoff to `addr`: a function of who dials whom, so that
    /// members do not redial a peer in step, and a simulated run (same ids, same
    /// addresses) gets the same delays.
    fn backoff_seed(&self, addr: SocketAddr) -> u64 {
        use std::hash::{Hash, Hasher};
        // Every `DefaultHasher::new` of one build hashes alike (not so across Rust releases).
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.inner.local.member_id.hash(&mut h);
        self.inner.local.generation.hash(&mut h);
        addr.hash(&mut h);
        h.finish()
    }

    async fn dial(&self, addr: SocketAddr) -> Result<Live, NetError> {
        let unreachable = |reason: String| NetError::Unreachable { addr, reason };
        let connecting = self
            .inner
            .endpoint
            .connect_with(self.inner.client_config.clone(), addr, SERVER_NAME)
            .map_err(|e| unreachable(e.to_string()))?;
        let conn = match connecting.await {
            Ok(c) => c,
            Err(e) => {
                let text = e.to_string();
                let why = log_handshake_failure(addr, &text, "cannot connect");
                return Err(unreachable(format!("{why}: {text}")));
            }
        };
        let hello = Hello {
            cluster: self.inner.local.cluster.clone(),
            protocol: PROTOCOL_VERSION,
            member_id: self.inner.local.member_id.clone(),
            generation: self.inner.local.generation,
            addr: self.inner.advertise,
            settings: self.inner.local.settings.clone(),
        };
        let hello = codec::encode(&hello)?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| lost(addr, e))?;
        send.write_chunk(framed(Some(StreamKind::Hello as u8), &hello))
            .await
            .map_err(|e| lost(addr, e))?;
        let _ = send.finish();
        let reply = match read_frame(&mut recv, 64 * 1024).await {
            Ok(Some(frame)) => codec::decode::<HelloReply>(&frame)?,
            Ok(None) | Err(_) => {
                let reason = match conn.close_reason() {
                    Some(quinn::ConnectionError::ApplicationClosed(c)) => {
                        String::from_utf8_lossy(&c.reason).into_owned()
                    }
                    other => format!("no handshake answer ({other:?})"),
                };
                warn!(%addr, %reason, "peer refused the connection");
                return Err(NetError::Refused { addr, reason });
            }
        };
        match reply {
            HelloReply::Accepted {
                member_id,
                generation,
            } => {
                if member_id == self.inner.local.member_id
                    && generation == self.inner.local.generation
                {
                    conn.close(codes::CLOSE_REJECTED, b"connected to itself");
                    return Err(NetError::Refused {
                        addr,
                        reason: "that address is this member".into(),
                    });
                }
                Ok(Live {
                    conn,
                    peer: PeerInfo {
                        member_id: member_id.into(),
                        generation,
                        addr,
                    },
                    dialed_by_us: true,
                    mux: Arc::default(),
                })
            }
            HelloReply::Rejected { reason } => {
                warn!(%addr, %reason, "peer refused this member");
                conn.close(codes::CLOSE_REJECTED, b"refused");
                Err(NetError::Refused { addr, reason })
            }
        }
    }

    /// Caches `live` for its peer. When two live connections to one peer exist (both sides
    /// dialed at once), both sides keep the one dialed by the member with the smaller
    /// (id, generation); the other is closed after a grace period, so calls already on it
    /// finish. A connection from a newer generation of the peer always replaces an older one.
    fn install(&self, slot: &PeerSlot, live: Live) -> Live {
        let mut st = slot.lock();
        let winner = match st.conn.take() {
            Some(cur)
                if cur.conn.close_reason().is_none()
                    && cur.conn.stable_id() != live.conn.stable_id() =>
            {
                let new_wins = if cur.peer.generation != live.peer.generation {
                    live.peer.generation > cur.peer.generation
                } else if cur.dialed_by_us == live.dialed_by_us {
                    true
                } else {
                    let ours = (
                        self.inner.local.member_id.as_str(),
                        self.inner.local.generation,
                    );
                    let theirs = (&*live.peer.member_id, live.peer.generation);
                    // The connection we keep is the one the smaller member dialed.
                    live.dialed_by_us == (ours < theirs)
                };
                let (winner, loser) = if new_wins { (live, cur) } else { (cur, live) };
                let grace = self.inner.config.idle_timeout;
                debug!(peer = %winner.peer.addr, "duplicate connection, closing one after {grace:?}");
                self.spawn(async move {
                    tokio::time::sleep(grace).await;
                    loser
                        .conn
                        .close(codes::CLOSE_DUPLICATE, b"duplicate connection");
                });
                winner
            }
            _ => live,
        };
        st.conn = Some(winner.clone());
        winner
    }

    async fn handle_incoming(self, incoming: quinn::Incoming) {
        let remote = incoming.remote_address();
        if self.inner.closing.load(Ordering::Relaxed) {
            incoming.refuse();
            return;
        }
        let conn = match incoming.await {
            Ok(c) => c,
            Err(e) => {
                log_handshake_failure(remote, &e.to_string(), "refused incoming connection");
                metrics::counter!("grid_net_handshakes_refused_total").increment(1);
                return;
            }
        };
        let hello = tokio::time::timeout(self.inner.config.connect_timeout, async {
            let (send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
            let mut kind = [0u8; 1];
            recv.read_exact(&mut kind)
                .await
                .map_err(|e| e.to_string())?;
            if kind[0] != StreamKind::Hello as u8 {
                return Err(format!(
                    "first stream is of kind {:#04x}, not a hello",
                    kind[0]
                ));
            }
            let frame = read_frame(&mut recv, 64 * 1024)
                .await
                .map_err(|e| e.to_string())?
                .ok_or("empty hello")?;
            let hello: Hello = codec::decode(&frame).map_err(|e| e.to_string())?;
            Ok::<_, String>((send, hello))
        })
        .await
        .unwrap_or_else(|_| Err("no hello within the connect timeout".into()));
        let (mut send, hello) = match hello {
            Ok(h) => h,
            Err(e) => {
                warn!(%remote, error = %e, "closing connection: bad handshake");
                metrics::counter!("grid_net_frames_refused_total", "reason" => "bad_hello")
                    .increment(1);
                conn.close(codes::CLOSE_PROTOCOL, b"bad handshake");
                return;
            }
        };
        if let Some(reason) = self.refusal(&hello) {
            warn!(%remote, peer = %hello.member_id, %reason, "refusing member");
            metrics::counter!("grid_net_members_refused_total").increment(1);
            if let Ok(reply) = codec::encode(&HelloReply::Rejected {
                reason: reason.clone(),
            }) {
                let _ = send.write_chunk(framed(None, &reply)).await;
                let _ = send.finish();
            }
            // Give the reply a moment to arrive before the close overtakes it.
            let _ = tokio::time::timeout(Duration::from_secs(1), conn.closed()).await;
            conn.close(codes::CLOSE_REJECTED, reason.as_bytes());
            return;
        }
        let reply = HelloReply::Accepted {
            member_id: self.inner.local.member_id.clone(),
            generation: self.inner.local.generation,
        };
        let Ok(reply) = codec::encode(&reply) else {
            return;
        };
        if send.write_chunk(framed(None, &reply)).await.is_err() {
            return;
        }
        let _ = send.finish();
        let live = Live {
            conn,
            peer: PeerInfo {
                member_id: hello.member_id.into(),
                generation: hello.generation,
                addr: hello.addr,
            },
            dialed_by_us: false,
            mux: Arc::default(),
        };
        debug!(peer = %live.peer.member_id, addr = %live.peer.addr, "accepted connection");
        let slot = self.slot(live.peer.addr);
        self.install(&slot, live.clone());
        self.serve(live).await;
    }

    fn refusal(&self, hello: &Hello) -> Option<String> {
        let local = &self.inner.local;
        if hello.cluster != local.cluster {
            return Some(format!(
                "wrong cluster name: the peer is in cluster {:?}, this member in {:?}",
                hello.cluster, local.cluster
            ));
        }
        if hello.protocol != PROTOCOL_VERSION {
            return Some(format!(
                "wrong protocol version: the peer speaks {}, this member {}",
                hello.protocol, PROTOCOL_VERSION
            ));
        }
        for (k, v) in &local.settings {
            let theirs = hello
                .settings
                .iter()
                .find(|(hk, _)| hk == k)
                .map(|(_, v)| v);
            if theirs != Some(v) {
                return Some(format!(
                    "setting {k:?} differs: this member has {v:?}, the peer {theirs:?}"
                ));
            }
        }
        if hello.member_id == local.member_id && hello.generation == local.generation {
            return Some("connected to itself".into());
        }
        None
    }

    /// Accepts the streams a peer opens on `live` until the connection ends.
    async fn serve(self, live: Live) {
        let errors = Arc::new(AtomicU32::new(0));
        loop {
            tokio::select! {
                bi = live.conn.accept_bi() => match bi {
                    Ok((send, recv)) => {
                        self.spawn(self.clone().handle_bi(live.clone(), send, recv, errors.clone()));
                    }
                    Err(_) => break,
                },
                uni = live.conn.accept_uni() => match uni {
                    Ok(recv) => {
                        self.spawn(self.clone().handle_uni(live.clone(), recv, errors.clone()));
                    }
                    Err(_) => break,
                },
            }
        }
        if let Some(reason) = live.conn.close_reason() {
            debug!(peer = %live.peer.member_id, %reason, "connection ended");
        }
        let slot = self.slot(live.peer.addr);
        let mut st = slot.lock();
        if st
            .conn
            .as_ref()
            .is_some_and(|c| c.conn.stable_id() == live.conn.stable_id())
        {
            st.conn = None;
        }
    }

    /// Records bad input from a peer: a warning, a metric, the stream reset, and the
    /// connection closed once it has sent too much of it.
    fn bad_input(
        &self,
        live: &Live,
        errors: &AtomicU32,
        kind: &'static str,
        detail: &dyn std::fmt::Display,
        send: Option<&mut SendStream>,
        recv: &mut RecvStream,
    ) {
        warn!(peer = %live.peer.member_id, addr = %live.peer.addr, kind, %detail, "bad input from peer, stream closed");
        metrics::counter!("grid_net_frames_refused_total", "reason" => kind).increment(1);
        let _ = recv.stop(codes::STREAM_BAD_INPUT);
        if let Some(send) = send {
            let _ = send.reset(codes::STREAM_BAD_INPUT);
        }
        let n = errors.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= self.inner.config.max_protocol_errors {
            warn!(peer = %live.peer.member_id, "too much bad input, closing the connection");
            live.conn
                .close(codes::CLOSE_PROTOCOL, b"too many protocol errors");
        }
    }

    async fn read_kind(recv: &mut RecvStream) -> Result<Option<u8>, String> {
        let mut kind = [0u8; 1];
        match recv.read_exact(&mut kind).await {
            Ok(()) => Ok(Some(kind[0])),
            Err(quinn::ReadExactError::FinishedEarly(_)) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    async fn handle_bi(
        self,
        live: Live,
        mut send: SendStream,
        mut recv: RecvStream,
        errors: Arc<AtomicU32>,
    ) {
        let limit = self.inner.config.max_frame_size;
        let kind = match Self::read_kind(&mut recv).await {
            Ok(Some(k)) => k,
            Ok(None) => {
                self.bad_input(
                    &live,
                    &errors,
                    "empty_stream",
                    &"no kind byte",
                    Some(&mut send),
                    &mut recv,
                );
                return;
            }
            Err(_) => return,
        };
        let kind = match StreamKind::from_byte(kind) {
            Some(StreamKind::Mux) => {
                self.serve_mux(&live, send, recv, &errors).await;
                return;
            }
            Some(k @ (StreamKind::Request | StreamKind::Bulk)) => k,
            _ => {
                self.bad_input(
                    &live,
                    &errors,
                    "bad_kind",
                    &format!("bidirectional stream of kind {kind:#04x}"),
                    Some(&mut send),
                    &mut recv,
                );
                return;
            }
        };
        let frame = match read_frame(&mut recv, limit).await {
            Ok(Some(f)) => f,
            Ok(None) => {
                self.bad_input(
                    &live,
                    &errors,
                    "truncated",
                    &"stream ended before its frame",
                    Some(&mut send),
                    &mut recv,
                );
                return;
            }
            Err(FrameError::Stream(_)) => return,
            Err(e) => {
                self.bad_input(&live, &errors, e.kind(), &e, Some(&mut send), &mut recv);
                return;
            }
        };
        let Some((route, body)) = decode_routed(&frame) else {
            self.bad_input(
                &live,
                &errors,
                "undecodable",
                &"malformed routed frame",
                Some(&mut send),
                &mut recv,
            );
            return;
        };
        let call = match (kind, self.find_route(route)) {
            (StreamKind::Request, Some(Route::Request(h))) => h(live.peer.clone(), body),
            (StreamKind::Bulk, Some(Route::Bulk(h))) => {
                h(live.peer.clone(), body, BulkReceiver { recv, limit })
            }
            (_, _) => Box::pin(std::future::ready(Err(format!(
                "no handler for route {route:?} on this member"
            )))),
        };
        // A caller that gives up stops reading its answer (or its connection closes): the
        // handler is dropped then, and nothing is sent.
        let result = tokio::select! {
            biased;
            result = call => result,
            why = send.stopped() => {
                debug!(peer = %live.peer.member_id, route, ?why, "caller gave up, handler dropped");
                return;
            }
        };
        let response = match result {
            Ok(body) => {
                if body.len() + 1 > limit {
                    let mut b = BytesMut::new();
                    b.put_u8(RESPONSE_ERR);
                    b.put_slice(
                        format!("response of {} bytes exceeds the frame limit", body.len())
                            .as_bytes(),
                    );
                    framed(None, &b)
                } else {
                    let mut buf = BytesMut::with_capacity(5 + body.len());
                    buf.put_u32(body.len() as u32 + 1);
                    buf.put_u8(RESPONSE_OK);
                    buf.put_slice(&body);
                    buf.freeze()
                }
            }
            Err(msg) => {
                let mut b = BytesMut::new();
                b.put_u8(RESPONSE_ERR);
                b.put_slice(msg.as_bytes());
                framed(None, &b)
            }
        };
        if send.write_chunk(response).await.is_ok() {
            let _ = send.finish();
        }
    }

    /// Answers the requests a peer sends on one of its lanes, each in its own task, answers
    /// in completion order. A cancel from the peer drops the handler it names; when the
    /// lane breaks (connection closed, stream reset, bad input), every handler still
    /// running for it is dropped: nobody could receive their answers.
    async fn serve_mux(
        &self,
        live: &Live,
        send: SendStream,
        mut recv: RecvStream,
        errors: &AtomicU32,
    ) {
        let limit = self.inner.config.max_frame_size;
        // The peer's callers learn of unanswered requests when the lane closes.
        let out = mux::lane_writer(send, |_| true, |_, _| {});
        // Handlers still running on this lane; past the bound the lane stops reading, which
        // pushes back on the peer through QUIC flow control.
        let running = Arc::new(Semaphore::new(MAX_LANE_TASKS));
        // The handler tasks, aborted all at once when this function returns other than at a
        // clean end of the lane; and the running ones by request id, for the peer's cancels.
        // Both hold at most the lane's MAX_LANE_TASKS running handlers, plus those that
        // finished since the last frame was read (reaped before each new one).
        let mut tasks = JoinSet::new();
        let mut by_id: HashMap<u64, AbortHandle> = HashMap::new();
        // Senders put only small requests on lanes (larger ones get their own stream).
        let frame_limit = (MUX_MAX_PAYLOAD + 9 + 1 + MAX_ROUTE_LEN).min(limit + 9);
        let mut reader = FrameReader::default();
        loop {
            let frame = match reader.next(&mut recv, frame_limit).await {
                Ok(Some(f)) => f,
                Ok(None) => {
                    // The peer finished the lane in good order: what it asked still gets
                    // its answer.
                    tasks.detach_all();
                    return;
                }
                Err(FrameError::Stream(_)) => return,
                Err(e) => {
                    self.bad_input(live, errors, e.kind(), &e, None, &mut recv);
                    let _ = out.send(Outgoing::Reset(codes::STREAM_BAD_INPUT)).await;
                    return;
                }
            };
            while let Some(done) = tasks.try_join_next_with_id() {
                match done {
                    // Only if the entry is still this task's: a peer may reuse an id.
                    Ok((task, id)) => {
                        if by_id.get(&id).is_some_and(|h| h.id() == task) {
                            by_id.remove(&id);
                        }
                    }
                    // Cancelled tasks left the map when they were cancelled.
                    Err(e) if e.is_cancelled() => {}
                    // A handler panicked (rare): find its entry the slow way.
                    Err(e) => {
                        let task = e.id();
                        by_id.retain(|_, h| h.id() != task);
                    }
                }
            }
            let (id, route, body) = match mux::parse_lane_frame(&frame) {
                Some(LaneFrame::Request { id, route, body }) => (id, route, body),
                Some(LaneFrame::Cancel { id }) => {
                    match by_id.remove(&id) {
                        // Dropped at its next await point; its permit goes with it, and it
                        // answers nothing.
                        Some(task) => task.abort(),
                        // Answered already (the answer and the cancel crossed), or an id
                        // this lane never ran: nothing to do.
                        None => trace!(id, "cancel for a request not running, ignored"),
                    }
                    continue;
                }
                None => {
                    let why = &"malformed lane frame";
                    self.bad_input(live, errors, "undecodable", why, None, &mut recv);
                    let _ = out.send(Outgoing::Reset(codes::STREAM_BAD_INPUT)).await;
                    return;
                }
            };
            let handler = match self.find_route(route) {
                Some(Route::Request(h)) => Ok(h),
                _ => Err(format!("no handler for route {route:?} on this member")),
            };
            let mut call = match handler {
                Ok(h) => h(live.peer.clone(), body),
                Err(e) => Box::pin(std::future::ready(Err(e))),
            };
            // Most handlers (a local map lookup) finish on their first poll: answer inline
            // and save a task. The others get a task, so one slow handler holds up nobody.
            if let Some(result) = (&mut call).now_or_never() {
                let frame = mux::response_frame(id, &result, limit);
                if out.send(Outgoing::Frame { id, frame }).await.is_err() {
                    return;
                }
                continue;
            }
            // Waiting for a slot, the lane reads nothing, so no cancel can free one: only a
            // handler finishing can, or the connection closing, which ends them all.
            let permit = tokio::select! {
                permit = running.clone().acquire_owned() => permit,
                _ = live.conn.closed() => return,
            };
            let Ok(permit) = permit else {
                return;
            };
            let out = out.clone();
            let task = tasks.spawn(async move {
                let result = call.await;
                let frame = mux::response_frame(id, &result, limit);
                let _ = out.send(Outgoing::Frame { id, frame }).await;
                drop(permit);
                id
            });
            by_id.insert(id, task);
        }
    }

    async fn handle_uni(self, live: Live, mut recv: RecvStream, errors: Arc<AtomicU32>) {
        let limit = self.inner.config.max_frame_size;
        let kind = match Self::read_kind(&mut recv).await {
            Ok(Some(k)) => k,
            Ok(None) => {
                self.bad_input(
                    &live,
                    &errors,
                    "empty_stream",
                    &"no kind byte",
                    None,
                    &mut recv,
                );
                return;
            }
            Err(_) => return,
        };
        match StreamKind::from_byte(kind) {
            Some(StreamKind::Gossip) => match read_frame(&mut recv, MAX_GOSSIP_FRAME).await {
                Ok(Some(frame)) => {
                    if let Some(sink) = self.inner.gossip_sink.get() {
                        if sink.try_send((live.peer.addr, frame)).is_err() {
                            metrics::counter!("grid_net_gossip_dropped_total").increment(1);
                            debug!("gossip inbox full, message dropped");
                        }
                    }
                }
                Ok(None) => self.bad_input(
                    &live,
                    &errors,
                    "truncated",
                    &"empty gossip stream",
                    None,
                    &mut recv,
                ),
                Err(FrameError::Stream(_)) => {}
                Err(e) => self.bad_input(&live, &errors, e.kind(), &e, None, &mut recv),
            },
            Some(StreamKind::Ordered) => loop {
                match read_frame(&mut recv, limit).await {
                    Ok(Some(frame)) => {
                        let Some((route, body)) = decode_routed(&frame) else {
                            self.bad_input(
                                &live,
                                &errors,
                                "undecodable",
                                &"malformed routed frame",
                                None,
                                &mut recv,
                            );
                            return;
                        };
                        match self.find_route(route) {
                            Some(Route::Message(h)) => h(live.peer.clone(), body),
                            _ => debug!(route, "no handler for one-way message, dropped"),
                        }
                    }
                    Ok(None) | Err(FrameError::Stream(_)) => return,
                    Err(e) => {
                        self.bad_input(&live, &errors, e.kind(), &e, None, &mut recv);
                        return;
                    }
                }
            },
            _ => self.bad_input(
                &live,
                &errors,
                "bad_kind",
                &format!("unidirectional stream of kind {kind:#04x}"),
                None,
                &mut recv,
            ),
        }
    }

    /// Sends a request on `route` to the member at `addr` and waits for its answer, at
    /// most `timeout` (dial included).
    pub async fn request(
        &self,
        addr: SocketAddr,
        route: &str,
        body: &[u8],
        timeout: Duration,
    ) -> Result<Bytes, NetError> {
        self.request_in(LaneClass::Calls, addr, route, body, timeout)
            .await
    }

    async fn request_in(
        &self,
        class: LaneClass,
        addr: SocketAddr,
        route: &str,
        body: &[u8],
        timeout: Duration,
    ) -> Result<Bytes, NetError> {
        self.check_frame(1 + route.len() + body.len())?;
        let call = async {
            if body.len() <= MUX_MAX_PAYLOAD {
                self.request_on_lane(class, addr, route, body).await
            } else {
                self.request_inner(addr, routed_frame(Some(StreamKind::Request), route, body))
                    .await
            }
        };
        tokio::time::timeout(timeout, call)
            .await
            .unwrap_or(Err(NetError::Timeout { addr, timeout }))
    }

    async fn request_on_lane(
        &self,
        class: LaneClass,
        addr: SocketAddr,
        route: &str,
        body: &[u8],
    ) -> Result<Bytes, NetError> {
        let limit = self.inner.config.max_frame_size;
        let mut last = String::new();
        for _attempt in 0..2 {
            let live = self.connection(addr).await?;
            match live
                .mux
                .request(&live.conn, class, route, body, limit)
                .await
            {
                Ok(reply) => return reply,
                Err(MuxError::NotSent(e)) => {
                    // Nothing reached the peer: drop a dead connection and try once more.
                    if live.conn.close_reason().is_some() {
                        self.evict(addr, &live.conn);
                    }
                    last = e;
                }
                Err(MuxError::Lost(e)) => return Err(lost(addr, e)),
            }
        }
        // Twice not sent: the peer ran nothing, which is what `Unreachable` says (callers may
        // retry even a request that must not run twice).
        Err(NetError::Unreachable { addr, reason: last })
    }

    async fn open_bi_retrying(
        &self,
        addr: SocketAddr,
    ) -> Result<(Connection, SendStream, RecvStream), NetError> {
        let live = self.connection(addr).await?;
        match live.conn.open_bi().await {
            Ok((send, recv)) => Ok((live.conn, send, recv)),
            Err(e) => {
                // The cached connection died under us: drop it and dial once more.
                debug!(%addr, error = %e, "cached connection dead, redialing");
                self.evict(addr, &live.conn);
                let live = self.connection(addr).await?;
                let (send, recv) = live.conn.open_bi().await.map_err(|e| lost(addr, e))?;
                Ok((live.conn, send, recv))
            }
        }
    }

    async fn request_inner(&self, addr: SocketAddr, frame: Bytes) -> Result<Bytes, NetError> {
        let (_, mut send, recv) = self.open_bi_retrying(addr).await?;
        // If this future is dropped before the answer (the caller's deadline, a select),
        // the peer learns it and drops the handler.
        let mut recv = StopOnDrop(recv);
        send.write_chunk(frame).await.map_err(|e| lost(addr, e))?;
        let _ = send.finish();
        self.read_response(addr, &mut recv.0).await
    }

    async fn read_response(
        &self,
        addr: SocketAddr,
        recv: &mut RecvStream,
    ) -> Result<Bytes, NetError> {
        match read_frame(recv, self.inner.config.max_frame_size).await {
            Ok(Some(frame)) => match frame.first() {
                Some(&RESPONSE_OK) => Ok(frame.slice(1..)),
                Some(&RESPONSE_ERR) => Err(NetError::Remote(
                    String::from_utf8_lossy(&frame[1..]).into_owned(),
                )),
                _ => Err(NetError::Protocol("response with unknown status".into())),
            },
            Ok(None) => Err(lost(addr, "stream ended without an answer")),
            Err(FrameError::Stream(e)) => Err(lost(addr, e)),
            Err(e) => Err(NetError::Protocol(e.to_string())),
        }
    }

    /// Typed [`Transport::request`]: encodes `req`, decodes the answer.
    pub async fn request_typed<Req, Resp>(
        &self,
        addr: SocketAddr,
        route: &str,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, NetError>
    where
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned,
    {
        self.request_typed_in(LaneClass::Calls, addr, route, req, timeout)
            .await
    }

    /// [`Transport::request_typed`] for a handler that waits for this answer while it
    /// serves another request (an owner asking its backups): when the callers' lane to the
    /// peer is crowded, such requests take a lane of their own, so that a peer whose lane
    /// handlers all wait cannot hold up what they wait for. (Bodies over 64 KiB take a
    /// stream of their own, like any request: those are bounded by QUIC's stream limit
    /// instead.)
    pub async fn request_typed_nested<Req, Resp>(
        &self,
        addr: SocketAddr,
        route: &str,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, NetError>
    where
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned,
    {
        self.request_typed_in(LaneClass::Nested, addr, route, req, timeout)
            .await
    }

    async fn request_typed_in<Req, Resp>(
        &self,
        class: LaneClass,
        addr: SocketAddr,
        route: &str,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, NetError>
    where
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned,
    {
        let body = codec::encode(req)?;
        let resp = self.request_in(class, addr, route, &body, timeout).await?;
        Ok(codec::decode(&resp)?)
    }

    /// Queues a one-way message on `route` to `addr`. Messages to one peer are delivered in
    /// the order they were queued, at most once: a message queued while the peer is
    /// unreachable is dropped (logged and counted). Waits while the peer's queue is full.
    pub async fn send_ordered(
        &self,
        addr: SocketAddr,
        route: &str,
        body: &[u8],
    ) -> Result<(), NetError> {
        self.check_frame(1 + route.len() + body.len())?;
        if self.inner.closing.load(Ordering::Relaxed) {
            return Err(NetError::ShuttingDown);
        }
        let frame = routed_frame(None, route, body);
        let tx = self.ordered_sender(addr);
        tx.send(frame).await.map_err(|_| NetError::ShuttingDown)
    }

    fn ordered_sender(&self, addr: SocketAddr) -> mpsc::Sender<Bytes> {
        let slot = self.slot(addr);
        let mut st = slot.lock();
        if let Some(tx) = st.ordered.as_ref().filter(|tx| !tx.is_closed()) {
            return tx.clone();
        }
        let (tx, rx) = mpsc::channel(self.inner.config.ordered_queue);
        st.ordered = Some(tx.clone());
        self.spawn(self.clone().ordered_writer(addr, rx));
        tx
    }

    async fn ordered_writer(self, addr: SocketAddr, mut rx: mpsc::Receiver<Bytes>) {
        let mut stream: Option<(usize, SendStream)> = None;
        while let Some(frame) = rx.recv().await {
            let mut delivered = false;
            for _attempt in 0..2 {
                if stream.is_none() {
                    let opened = async {
                        let live = self.connection(addr).await?;
                        let mut s = live.conn.open_uni().await.map_err(|e| lost(addr, e))?;
                        s.write_all(&[StreamKind::Ordered as u8])
                            .await
                            .map_err(|e| lost(addr, e))?;
                        Ok::<_, NetError>((live.conn.stable_id(), s))
                    }
                    .await;
                    match opened {
                        Ok(s) => stream = Some(s),
                        Err(e) => {
                            debug!(%addr, error = %e, "ordered message dropped: peer unreachable");
                            break;
                        }
                    }
                }
                if let Some((_, s)) = stream.as_mut() {
                    if s.write_chunk(frame.clone()).await.is_ok() {
                        delivered = true;
                        break;
                    }
                    stream = None;
                }
            }
            if !delivered {
                metrics::counter!("grid_net_ordered_dropped_total").increment(1);
            }
        }
        if let Some((_, mut s)) = stream {
            let _ = s.finish();
        }
    }

    /// Opens a bulk stream on `route` to the member at `addr`, sending `header` first. With
    /// a separate bulk endpoint ([`TransportConfig::bulk_endpoint`]) on both sides, the
    /// stream goes from ours to the peer's.
    pub async fn open_bulk(
        &self,
        addr: SocketAddr,
        route: &str,
        header: &[u8],
    ) -> Result<BulkSender, NetError> {
        if let Some(bulk) = &self.inner.bulk {
            let to = self.bulk_addr(addr).await?;
            if to != addr {
                match bulk.open_bulk_here(to, route, header).await {
                    Ok(sender) => return Ok(sender),
                    // Nothing was sent yet: the main endpoint takes this stream and, until the
                    // peer is forgotten, the next ones (a firewall may block the bulk port).
                    Err(e) => {
                        warn!(%addr, bulk = %to, error = %e, "peer's bulk endpoint unreachable, copies to it use its main endpoint");
                        self.inner
                            .bulk_addrs
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(addr, addr);
                    }
                }
            }
        }
        self.open_bulk_here(addr, route, header).await
    }

    /// Opens a bulk stream like [`Transport::open_bulk`], but always between the main
    /// endpoints, whose work runs at the application's priority: for small copies, where
    /// the copy's latency matters more than the CPU it takes.
    pub async fn open_bulk_on_main(
        &self,
        addr: SocketAddr,
        route: &str,
        header: &[u8],
    ) -> Result<BulkSender, NetError> {
        self.open_bulk_here(addr, route, header).await
    }

    /// Where the member at `addr` takes bulk streams: its bulk endpoint, or `addr` itself
    /// when it has none.
    async fn bulk_addr(&self, addr: SocketAddr) -> Result<SocketAddr, NetError> {
        if let Some(&known) = self
            .inner
            .bulk_addrs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&addr)
        {
            return Ok(known);
        }
        let timeout = self.inner.config.connect_timeout;
        let to = match self.request(addr, BULK_ADDR_ROUTE, &[], timeout).await {
            // Only the port comes from the peer: bulk streams go to the host we already
            // reach it at, never elsewhere.
            Ok(reply) => <[u8; 2]>::try_from(&reply[..])
                .map(|port| SocketAddr::new(addr.ip(), u16::from_be_bytes(port)))
                .map_err(|_| NetError::Protocol("undecodable bulk endpoint port".into()))?,
            // A member without a bulk endpoint has no handler for the route.
            Err(NetError::Remote(_)) => addr,
            Err(e) => return Err(e),
        };
        self.inner
            .bulk_addrs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(addr, to);
        Ok(to)
    }

    async fn open_bulk_here(
        &self,
        addr: SocketAddr,
        route: &str,
        header: &[u8],
    ) -> Result<BulkSender, NetError> {
        self.check_frame(1 + route.len() + header.len())?;
        let (conn, mut send, recv) = self.open_bi_retrying(addr).await?;
        send.write_chunk(routed_frame(Some(StreamKind::Bulk), route, header))
            .await
            .map_err(|e| lost(addr, e))?;
        Ok(BulkSender {
            transport: self.clone(),
            addr,
            send,
            recv,
            conn,
        })
    }

    pub(crate) fn set_gossip_sink(&self, sink: mpsc::Sender<(SocketAddr, Bytes)>) {
        let _ = self.inner.gossip_sink.set(sink);
    }

    /// Sends one gossip message on its own unidirectional stream, without waiting: gossip
    /// must never stall on a slow or dead peer. Dropped (and counted) when too many are in
    /// flight or the peer is unreachable.
    pub(crate) fn send_gossip(&self, addr: SocketAddr, payload: Vec<u8>) {
        if self.inner.closing.load(Ordering::Relaxed) {
            return;
        }
        if payload.len() > MAX_GOSSIP_FRAME {
            warn!(%addr, size = payload.len(), "gossip message over the frame limit, dropped");
            return;
        }
        let Ok(permit) = self.inner.gossip_permits.clone().try_acquire_owned() else {
            metrics::counter!("grid_net_gossip_dropped_total").increment(1);
            return;
        };
        let this = self.clone();
        self.spawn(async move {
            let _permit = permit;
            let sent = async {
                let live = this.connection(addr).await?;
                let mut s = live.conn.open_uni().await.map_err(|e| lost(addr, e))?;
                s.write_chunk(framed(Some(StreamKind::Gossip as u8), &payload))
                    .await
                    .map_err(|e| lost(addr, e))?;
                let _ = s.finish();
                Ok::<_, NetError>(())
            }
            .await;
            if let Err(e) = sent {
                debug!(%addr, error = %e, "gossip not sent");
            }
        });
    }

    fn evict(&self, addr: SocketAddr, conn: &Connection) {
        let slot = self.slot(addr);
        let mut st = slot.lock();
        if st
            .conn
            .as_ref()
            .is_some_and(|c| c.conn.stable_id() == conn.stable_id())
        {
            st.conn = None;
        }
    }

    /// Drops everything cached for the peer at `addr` (its connection is closed, its queued
    /// one-way messages dropped). Called when a member is known dead or gone.
    pub fn forget(&self, addr: SocketAddr) {
        let bulk_addr = self
            .inner
            .bulk_addrs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&addr);
        if let (Some(bulk), Some(bulk_addr)) = (&self.inner.bulk, bulk_addr) {
            if bulk_addr != addr {
                bulk.forget(bulk_addr);
            }
        }
        let slot = {
            let mut peers = self.inner.peers.lock().unwrap_or_else(|e| e.into_inner());
            peers.remove(&addr)
        };
        if let Some(slot) = slot {
            let mut st = slot.lock();
            if let Some(live) = st.conn.take() {
                // Not at once: the answer to a leaving member's goodbye may still be on its
                // way over this connection.
                self.spawn(async move {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    live.conn
                        .close(codes::CLOSE_FORGOTTEN, b"member left the cluster");
                });
            }
            st.ordered = None;
        }
    }

    /// Closes every connection (peers see a clean close) and the endpoint, waiting up to a
    /// second for the closes to go out.
    pub async fn shutdown(&self) {
        if self.inner.closing.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Some(bulk) = &self.inner.bulk {
            Box::pin(bulk.shutdown()).await;
        }
        self.inner
            .endpoint
            .close(codes::CLOSE_SHUTDOWN, b"member shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.inner.endpoint.wait_idle()).await;
        self.inner
            .peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        info!(member = %self.inner.local.member_id, "transport closed");
    }

    /// Cuts the member off abruptly: from now on nothing it sends leaves the socket and
    /// nothing arrives, as if the process had been killed. For tests and demos.
    pub fn kill(&self) {
        if let Some(bulk) = &self.inner.bulk {
            bulk.kill();
        }
        self.inner.faults.kill();
        self.inner.closing.store(true, Ordering::SeqCst);
        self.inner.endpoint.close(codes::CLOSE_SHUTDOWN, b"killed");
        self.inner
            .peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}

/// The receiving half of a request's own stream: dropped before the whole answer was read,
/// it stops the stream with [`codes::STREAM_CANCELLED`], which tells the peer to drop the
/// request's handler. (quinn stops an unread stream on drop too, with code 0: this names
/// the reason.) Stopping a stream read to its end does nothing.
struct StopOnDrop(RecvStream);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let _ = self.0.stop(codes::STREAM_CANCELLED);
    }
}

/// The sending half of a bulk stream (see [`Transport::open_bulk`]).
pub struct BulkSender {
    transport: Transport,
    addr: SocketAddr,
    send: SendStream,
    recv: RecvStream,
    conn: Connection,
}

impl BulkSender {
    /// What QUIC knows of the path this stream takes, over the life of its connection.
    pub fn link_stats(&self) -> LinkStats {
        LinkStats::from(self.conn.stats())
    }

    /// Sends one chunk; waits while the peer's flow-control window is full.
    pub async fn send(&mut self, chunk: &[u8]) -> Result<(), NetError> {
        self.transport.check_frame(chunk.len())?;
        self.send
            .write_chunk(framed(None, chunk))
            .await
            .map_err(|e| lost(self.addr, e))
    }

    /// Sends one chunk without copying it (the length header goes out as its own piece).
    pub async fn send_bytes(&mut self, chunk: Bytes) -> Result<(), NetError> {
        self.transport.check_frame(chunk.len())?;
        let header = Bytes::copy_from_slice(&(chunk.len() as u32).to_be_bytes());
        self.send
            .write_all_chunks(&mut [header, chunk])
            .await
            .map_err(|e| lost(self.addr, e))
    }

    /// Ends the stream and waits for the handler's answer, at most `timeout`.
    pub async fn finish(mut self, timeout: Duration) -> Result<Bytes, NetError> {
        let _ = self.send.finish();
        let addr = self.addr;
        tokio::time::timeout(timeout, self.transport.read_response(addr, &mut self.recv))
            .await
            .unwrap_or(Err(NetError::Timeout { addr, timeout }))
    }
}

/// What QUIC knows of the path to a peer, from one connection's statistics (cumulative over
/// the connection's life).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkStats {
    /// The datagram size in use, after MTU discovery (1,200 at the start, and after a
    /// suspected black hole).
    pub mtu: u16,
    /// The smoothed round-trip time.
    pub rtt: Duration,
    /// The congestion window, in bytes.
    pub cwnd: u64,
    /// Packets sent.
    pub sent_packets: u64,
    /// Packets declared lost.
    pub lost_packets: u64,
    /// Times losses were taken for an MTU black hole (the MTU then falls back to 1,200).
    pub black_holes: u64,
    /// Times the congestion window was cut.
    pub congestion_events: u64,
}

impl From<quinn::ConnectionStats> for LinkStats {
    fn from(s: quinn::ConnectionStats) -> Self {
        Self {
            mtu: s.path.current_mtu,
            rtt: s.path.rtt,
            cwnd: s.path.cwnd,
            sent_packets: s.path.sent_packets,
            lost_packets: s.path.lost_packets,
            black_holes: s.path.black_holes_detected,
            congestion_events: s.path.congestion_events,
        }
    }
}

/// The receiving half of a bulk stream, handed to a bulk handler.
pub struct BulkReceiver {
    recv: RecvStream,
    limit: usize,
}

impl BulkReceiver {
    /// The next chunk, or `None` once the sender finished.
    pub async fn next(&mut self) -> Result<Option<Bytes>, NetError> {
        read_frame(&mut self.recv, self.limit)
            .await
            .map_err(|e| match e {
                FrameError::TooLarge { size, limit } => {
                    let _ = self.recv.stop(codes::STREAM_BAD_INPUT);
                    NetError::FrameTooLarge { size, limit }
                }
                other => NetError::Protocol(other.to_string()),
            })
    }
}
