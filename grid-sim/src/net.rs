//! The simulated network: an in-memory datagram network under quinn.
//!
//! Every member's QUIC endpoints run on [`SimSocket`]s (quinn's [`AsyncUdpSocket`]), so
//! TLS, QUIC and grid's transport stay in the loop; only the wire is replaced. A datagram
//! sent at `t` is delivered at `t + latency` by one driver task, in order of (delivery
//! time, send sequence): with the paused tokio clock that auto-advances to the next timer,
//! a run is a function of its seed. Faults act on the wire: per-link latency (a base per
//! link and an exponential jitter per datagram, hence reordering), loss, duplication,
//! one-way cuts (partitions), paused hosts (their datagrams held until resumed) and hosts
//! that are down (killed).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::Notify;
use tokio::time::Instant;

/// Datagrams waiting in one socket's receive queue; more are dropped (a full buffer).
const INBOX: usize = 8192;
/// Datagrams held for paused hosts; more are dropped.
const HELD: usize = 65_536;
/// First port handed out for binds on port 0.
const EPHEMERAL: u16 = 40_000;

/// How the wire treats datagrams, chosen per run by the seed.
#[derive(Debug, Clone, PartialEq)]
pub struct WireFaults {
    /// Smallest and largest base latency of a link (each directed link draws one).
    pub base_latency: (Duration, Duration),
    /// Mean of the exponential jitter added to each datagram (reorders datagrams).
    pub jitter_mean: Duration,
    /// Largest jitter.
    pub jitter_max: Duration,
    /// Probability that a datagram is lost.
    pub loss: f64,
    /// Probability that a datagram is delivered twice.
    pub duplicate: f64,
}

impl Default for WireFaults {
    fn default() -> Self {
        Self {
            base_latency: (Duration::from_micros(100), Duration::from_micros(500)),
            jitter_mean: Duration::from_micros(50),
            jitter_max: Duration::from_millis(5),
            loss: 0.0,
            duplicate: 0.0,
        }
    }
}

/// Counters of the wire.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WireStats {
    /// Datagrams sent.
    pub sent: u64,
    /// Datagrams delivered into a receive queue.
    pub delivered: u64,
    /// Datagrams dropped: lost, cut, to or from a down host, to no socket, queue full.
    pub dropped: u64,
    /// Extra copies delivered.
    pub duplicated: u64,
    /// Bytes sent, per source IP.
    pub bytes_by_ip: BTreeMap<IpAddr, u64>,
}

struct Datagram {
    from: SocketAddr,
    to: SocketAddr,
    data: Bytes,
}

struct Port {
    /// Which bind owns the port (a rebind after a restart takes it over).
    owner: u64,
    inbox: VecDeque<(SocketAddr, Bytes)>,
    waker: Option<Waker>,
}

struct State {
    rng: StdRng,
    seq: u64,
    next_owner: u64,
    faults: WireFaults,
    links: BTreeMap<(IpAddr, IpAddr), Duration>,
    ports: BTreeMap<SocketAddr, Port>,
    in_flight: BTreeMap<(Instant, u64), Datagram>,
    cut: BTreeSet<(IpAddr, IpAddr)>,
    paused: BTreeSet<IpAddr>,
    held: Vec<Datagram>,
    down: BTreeSet<IpAddr>,
    stats: WireStats,
    digest: xxhash_rust::xxh3::Xxh3,
    /// Whether deliveries go into the digest.
    digest_deliveries: bool,
    /// When the network was made: times in the digest are relative to it.
    start: Instant,
    /// The event log itself, when kept (`SIM_TRACE` set: to find where two runs differ).
    trace: Option<Vec<String>>,
}

struct Shared {
    state: Mutex<State>,
    wake_driver: Notify,
}

/// The simulated network (cheap to clone). Create it inside the simulation's runtime: it
/// spawns its delivery task there.
#[derive(Clone)]
pub struct SimNet {
    shared: Arc<Shared>,
}

impl fmt::Debug for SimNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SimNet")
    }
}

impl SimNet {
    /// A network whose randomness (latencies, losses) derives from `seed`.
    pub fn new(seed: u64, faults: WireFaults) -> Self {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                rng: StdRng::seed_from_u64(seed),
                seq: 0,
                next_owner: 1,
                faults,
                links: BTreeMap::new(),
                ports: BTreeMap::new(),
                in_flight: BTreeMap::new(),
                cut: BTreeSet::new(),
                paused: BTreeSet::new(),
                held: Vec::new(),
                down: BTreeSet::new(),
                stats: WireStats::default(),
                digest: xxhash_rust::xxh3::Xxh3::new(),
                digest_deliveries: true,
                start: Instant::now(),
                trace: std::env::var_os("SIM_TRACE").map(|_| Vec::new()),
            }),
            wake_driver: Notify::new(),
        });
        tokio::spawn(drive(shared.clone()));
        Self { shared }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Binds a socket at `addr` (port 0: the next free ephemeral port of that IP). A bind
    /// of a taken port takes it over: the old socket receives nothing more.
    pub fn bind(&self, addr: SocketAddr) -> io::Result<Arc<SimSocket>> {
        let mut st = self.lock();
        let mut addr = addr;
        if addr.port() == 0 {
            let port = (EPHEMERAL..u16::MAX)
                .find(|p| !st.ports.contains_key(&SocketAddr::new(addr.ip(), *p)))
                .ok_or_else(|| io::Error::new(io::ErrorKind::AddrInUse, "no port left"))?;
            addr.set_port(port);
        }
        let owner = st.next_owner;
        st.next_owner += 1;
        st.ports.insert(
            addr,
            Port {
                owner,
                inbox: VecDeque::new(),
                waker: None,
            },
        );
        Ok(Arc::new(SimSocket {
            net: self.clone(),
            addr,
            owner,
        }))
    }

    /// Replaces the wire's fault settings.
    pub fn set_faults(&self, faults: WireFaults) {
        let mut st = self.lock();
        st.faults = faults;
        st.links.clear();
    }

    /// Drops everything `from` sends to `to` (one way) until [`SimNet::heal`].
    pub fn cut(&self, from: IpAddr, to: IpAddr) {
        self.lock().cut.insert((from, to));
    }

    /// Removes every cut.
    pub fn heal(&self) {
        self.lock().cut.clear();
    }

    /// Holds every datagram from and to `host` until [`SimNet::resume`].
    pub fn pause(&self, host: IpAddr) {
        self.lock().paused.insert(host);
    }

    /// Releases what was held for `host`, each datagram with a fresh latency.
    pub fn resume(&self, host: IpAddr) {
        let mut st = self.lock();
        st.paused.remove(&host);
        let held = std::mem::take(&mut st.held);
        let now = Instant::now();
        for d in held {
            if st.paused.contains(&d.from.ip()) || st.paused.contains(&d.to.ip()) {
                st.held.push(d);
            } else {
                let at = now + st.latency(d.from.ip(), d.to.ip());
                st.schedule(at, d);
            }
        }
        drop(st);
        self.shared.wake_driver.notify_one();
    }

    /// Takes `host` off the network (killed): what it sends and what is sent to it is lost
    /// until [`SimNet::up`]; its sockets are closed.
    pub fn down(&self, host: IpAddr) {
        let mut st = self.lock();
        st.down.insert(host);
        st.ports.retain(|addr, _| addr.ip() != host);
        st.held.retain(|d| d.from.ip() != host && d.to.ip() != host);
    }

    /// Puts `host` back on the network (a restart binds new sockets).
    pub fn up(&self, host: IpAddr) {
        self.lock().down.remove(&host);
    }

    /// The wire's counters.
    pub fn stats(&self) -> WireStats {
        self.lock().stats.clone()
    }

    /// Whether deliveries are written into the digest (on by default).
    pub fn digest_deliveries(&self, on: bool) {
        self.lock().digest_deliveries = on;
    }

    /// Adds an event of the world's own to the digest.
    pub fn record(&self, event: &[u8]) {
        let mut st = self.lock();
        let t = Instant::now()
            .saturating_duration_since(st.start)
            .as_nanos() as u64;
        st.digest.update(&t.to_le_bytes());
        st.digest.update(event);
        if let Some(trace) = &mut st.trace {
            trace.push(format!("{t} {}", String::from_utf8_lossy(event)));
        }
    }

    /// The event log, if kept (`SIM_TRACE`).
    pub fn trace(&self) -> Option<Vec<String>> {
        self.lock().trace.clone()
    }

    /// The digest of every delivery and recorded event so far.
    pub fn digest(&self) -> u64 {
        self.lock().digest.digest()
    }

    fn send(&self, from: SocketAddr, owner: u64, to: SocketAddr, data: Bytes) {
        let mut st = self.lock();
        st.stats.sent += 1;
        *st.stats.bytes_by_ip.entry(from.ip()).or_default() += data.len() as u64;
        let alive = st.ports.get(&from).is_some_and(|p| p.owner == owner);
        if !alive
            || st.down.contains(&from.ip())
            || st.down.contains(&to.ip())
            || st.cut.contains(&(from.ip(), to.ip()))
        {
            st.stats.dropped += 1;
            return;
        }
        let faults = st.faults.clone();
        if faults.loss > 0.0 && st.rng.gen_bool(faults.loss.min(1.0)) {
            st.stats.dropped += 1;
            return;
        }
        let copies = if faults.duplicate > 0.0 && st.rng.gen_bool(faults.duplicate.min(1.0)) {
            st.stats.duplicated += 1;
            2
        } else {
            1
        };
        let now = Instant::now();
        for _ in 0..copies {
            let d = Datagram {
                from,
                to,
                data: data.clone(),
            };
            if st.paused.contains(&from.ip()) || st.paused.contains(&to.ip()) {
                if st.held.len() < HELD {
                    st.held.push(d);
                } else {
                    st.stats.dropped += 1;
                }
                continue;
            }
            let at = now + st.latency(from.ip(), to.ip());
            st.schedule(at, d);
        }
        drop(st);
        self.shared.wake_driver.notify_one();
    }
}

impl State {
    fn latency(&mut self, from: IpAddr, to: IpAddr) -> Duration {
        let (lo, hi) = self.faults.base_latency;
        let base = match self.links.get(&(from, to)) {
            Some(b) => *b,
            None => {
                let b = if hi > lo {
                    self.rng.gen_range(lo..=hi)
                } else {
                    lo
                };
                self.links.insert((from, to), b);
                b
            }
        };
        let mean = self.faults.jitter_mean.as_secs_f64();
        let jitter = if mean > 0.0 {
            let u: f64 = self.rng.gen_range(f64::EPSILON..1.0);
            Duration::from_secs_f64((-u.ln() * mean).min(self.faults.jitter_max.as_secs_f64()))
        } else {
            Duration::ZERO
        };
        base + jitter
    }

    fn schedule(&mut self, at: Instant, d: Datagram) {
        self.seq += 1;
        self.in_flight.insert((at, self.seq), d);
    }

    /// Delivers what is due; returns the wakers to wake once the lock is released.
    fn deliver_due(&mut self, now: Instant) -> Vec<Waker> {
        let mut wake = Vec::new();
        while let Some(entry) = self.in_flight.first_entry() {
            let (at, _) = *entry.key();
            if at > now {
                break;
            }
            let d = entry.remove();
            if self.paused.contains(&d.from.ip()) || self.paused.contains(&d.to.ip()) {
                if self.held.len() < HELD {
                    self.held.push(d);
                } else {
                    self.stats.dropped += 1;
                }
                continue;
            }
            if self.down.contains(&d.to.ip()) || self.cut.contains(&(d.from.ip(), d.to.ip())) {
                self.stats.dropped += 1;
                continue;
            }
            let Some(port) = self.ports.get_mut(&d.to) else {
                self.stats.dropped += 1;
                continue;
            };
            if port.inbox.len() >= INBOX {
                self.stats.dropped += 1;
                continue;
            }
            let len = d.data.len() as u64;
            port.inbox.push_back((d.from, d.data));
            if let Some(w) = port.waker.take() {
                wake.push(w);
            }
            self.stats.delivered += 1;
            if self.digest_deliveries {
                let t = at.saturating_duration_since(self.start).as_nanos() as u64;
                self.digest.update(&t.to_le_bytes());
                self.digest.update(d.from.to_string().as_bytes());
                self.digest.update(d.to.to_string().as_bytes());
                self.digest.update(&len.to_le_bytes());
                if let Some(trace) = &mut self.trace {
                    trace.push(format!("{t} {} -> {} {len}", d.from, d.to));
                }
            }
        }
        wake
    }
}

/// Delivers datagrams as they fall due (until the runtime stops).
async fn drive(sh: Arc<Shared>) {
    loop {
        let notified = sh.wake_driver.notified();
        tokio::pin!(notified);
        // Registered before the deliveries, so a send after them is not missed.
        notified.as_mut().enable();
        let next = {
            let mut st = sh.state.lock().unwrap_or_else(|e| e.into_inner());
            let wake = st.deliver_due(Instant::now());
            let next = st.in_flight.keys().next().map(|(t, _)| *t);
            drop(st);
            for w in wake {
                w.wake();
            }
            next
        };
        match next {
            Some(at) => {
                tokio::select! {
                    biased;
                    _ = tokio::time::sleep_until(at) => {}
                    _ = &mut notified => {}
                }
            }
            None => notified.await,
        }
    }
}

/// One bound port of the simulated network: quinn's [`AsyncUdpSocket`].
pub struct SimSocket {
    net: SimNet,
    addr: SocketAddr,
    owner: u64,
}

impl fmt::Debug for SimSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimSocket")
            .field("addr", &self.addr)
            .finish()
    }
}

#[derive(Debug)]
struct AlwaysWritable;

impl UdpPoller for AlwaysWritable {
    fn poll_writable(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncUdpSocket for SimSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(AlwaysWritable)
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        let contents = transmit.contents;
        match transmit.segment_size {
            Some(size) if size > 0 && contents.len() > size => {
                for chunk in contents.chunks(size) {
                    self.net.send(
                        self.addr,
                        self.owner,
                        transmit.destination,
                        Bytes::copy_from_slice(chunk),
                    );
                }
            }
            _ => self.net.send(
                self.addr,
                self.owner,
                transmit.destination,
                Bytes::copy_from_slice(contents),
            ),
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let mut st = self.net.lock();
        let Some(port) = st
            .ports
            .get_mut(&self.addr)
            .filter(|p| p.owner == self.owner)
        else {
            // Closed or taken over: nothing arrives any more.
            return Poll::Pending;
        };
        let mut n = 0;
        while n < bufs.len().min(meta.len()) {
            let Some((from, data)) = port.inbox.pop_front() else {
                break;
            };
            let len = data.len().min(bufs[n].len());
            bufs[n][..len].copy_from_slice(&data[..len]);
            meta[n] = RecvMeta {
                addr: from,
                len,
                stride: len,
                ecn: None,
                dst_ip: Some(self.addr.ip()),
            };
            n += 1;
        }
        if n > 0 {
            return Poll::Ready(Ok(n));
        }
        port.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.addr)
    }

    fn may_fragment(&self) -> bool {
        false
    }
}
