//! A simulated world: N real grid members (`grid::Grid`: networking, gossip, coordinator,
//! runtime, caches) on one thread, on the simulated network, under one seed.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use grid::Grid;
use grid_net::environment::NetEnvironment;
use tokio::time::Instant;

use crate::net::{SimNet, WireFaults};

/// The Unix time (ms) at which every simulated world starts (2030-01-01).
pub const SIM_EPOCH_MS: u64 = 1_893_456_000_000;
/// The member port.
pub const PORT: u16 = 5701;

/// What a world is made of.
#[derive(Debug, Clone)]
pub struct WorldConfig {
    /// The seed of everything.
    pub seed: u64,
    /// Members started at the beginning.
    pub members: usize,
    /// Synchronous backups per partition.
    pub backups: u8,
    /// Partition count.
    pub partitions: u32,
    /// The wire at the start.
    pub wire: WireFaults,
    /// Gossip interval.
    pub gossip_interval: Duration,
    /// Operation deadline.
    pub op_timeout: Duration,
}

impl WorldConfig {
    /// `members` members, seed `seed`, 1 backup, 271 partitions, a clean wire.
    pub fn new(seed: u64, members: usize) -> Self {
        Self {
            seed,
            members,
            backups: 1,
            partitions: 271,
            wire: WireFaults::default(),
            gossip_interval: Duration::from_millis(100),
            op_timeout: Duration::from_secs(10),
        }
    }
}

/// Derives a sub-seed from a seed and a label.
pub fn derive(seed: u64, label: &str) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::with_seed(seed);
    h.update(label.as_bytes());
    h.digest()
}

/// One member's environment: the simulated network, its seeds, its generation.
#[derive(Debug)]
struct SimEnv {
    net: SimNet,
    seed: u64,
    generation: u64,
}

impl NetEnvironment for SimEnv {
    fn bind_udp(&self, addr: SocketAddr) -> io::Result<Arc<dyn quinn::AsyncUdpSocket>> {
        Ok(self.net.bind(addr)?)
    }

    fn generation(&self) -> u64 {
        self.generation
    }

    fn seed(&self, purpose: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, chunk) in out.chunks_mut(8).enumerate() {
            let v = derive(self.seed, &format!("{purpose}/{i}"));
            chunk.copy_from_slice(&v.to_le_bytes());
        }
        out
    }
}

/// A member slot: its identity and, while it runs, its handle.
#[derive(Debug)]
pub struct Slot {
    /// Member id (`m0`, `m1`, …): kept across restarts.
    pub id: String,
    /// Its address on the simulated network.
    pub addr: SocketAddr,
    /// The running member.
    pub grid: Option<Grid>,
    /// How many times it was started.
    pub incarnation: u32,
    /// Whether the world paused it.
    pub paused: bool,
}

/// The simulated cluster.
pub struct World {
    /// The network.
    pub net: SimNet,
    /// Configuration.
    pub config: WorldConfig,
    /// Members, by index.
    pub slots: Vec<Slot>,
    /// When the world started (simulated clock).
    pub start: Instant,
    /// Wall-clock deadline of the run: past it, [`World::run_until`] stops waiting and
    /// [`World::out_of_time`] is set (a livelock: simulated time crawls or stands still).
    pub wall_deadline: Option<std::time::Instant>,
    /// Whether the wall-clock deadline passed (the simulated time then, for the report).
    pub out_of_time: Option<Duration>,
    last_observed: String,
}

/// The address of member `i`.
pub fn member_addr(i: usize) -> SocketAddr {
    let i = i + 1;
    SocketAddr::new(
        IpAddr::V4(Ipv4Addr::new(10, 0, (i / 250) as u8, (i % 250) as u8)),
        PORT,
    )
}

/// Runs `f` on a fresh single-threaded runtime with a paused, auto-advancing clock, with
/// this thread marked single-threaded for grid and chitchat seeded from `seed`.
pub fn simulate<T>(seed: u64, f: impl std::future::Future<Output = T>) -> T {
    grid_net::environment::set_single_threaded(true);
    chitchat::seed_thread_rng(Some(derive(seed, "chitchat")));
    let mut builder = tokio::runtime::Builder::new_current_thread();
    builder.enable_all().start_paused(true);
    seed_tokio(&mut builder, seed);
    let rt = builder.build().expect("a current-thread runtime");
    let out = rt.block_on(f);
    // Stop every task of the world before the next one starts on this thread.
    rt.shutdown_background();
    chitchat::seed_thread_rng(None);
    grid_net::environment::set_single_threaded(false);
    out
}

/// Seeds tokio's own randomness (the order in which `select!` polls its branches). Only
/// tokio built with `--cfg tokio_unstable` lets a runtime take a seed; without it, two
/// branches ready at once are polled in a random order, and a seed replays its faults and
/// workload but not always the exact interleaving (measured: about 1 run in 6 of a 30 s
/// seed differs from the others).
#[allow(unexpected_cfgs)]
fn seed_tokio(builder: &mut tokio::runtime::Builder, seed: u64) {
    #[cfg(tokio_unstable)]
    builder.rng_seed(tokio::runtime::RngSeed::from_bytes(
        &derive(seed, "tokio").to_le_bytes(),
    ));
    #[cfg(not(tokio_unstable))]
    let _ = (builder, seed);
}

impl World {
    /// Creates the world and starts its members (inside [`simulate`]).
    pub async fn start(config: WorldConfig) -> anyhow::Result<Self> {
        grid_core::clock::set_thread_unix_anchor(SIM_EPOCH_MS);
        let net = SimNet::new(derive(config.seed, "net"), config.wire.clone());
        let slots = (0..config.members)
            .map(|i| Slot {
                id: format!("m{i}"),
                addr: member_addr(i),
                grid: None,
                incarnation: 0,
                paused: false,
            })
            .collect();
        let mut world = Self {
            net,
            config,
            slots,
            start: Instant::now(),
            wall_deadline: None,
            out_of_time: None,
            last_observed: String::new(),
        };
        for i in 0..world.config.members {
            world.start_member(i).await?;
        }
        Ok(world)
    }

    /// Simulated time since the start.
    pub fn elapsed(&self) -> Duration {
        Instant::now().saturating_duration_since(self.start)
    }

    /// Adds a member slot (not started).
    pub fn add_slot(&mut self) -> usize {
        let i = self.slots.len();
        self.slots.push(Slot {
            id: format!("m{i}"),
            addr: member_addr(i),
            grid: None,
            incarnation: 0,
            paused: false,
        });
        i
    }

    /// Starts (or restarts, same id, new generation) member `i`.
    pub async fn start_member(&mut self, i: usize) -> anyhow::Result<()> {
        let slot = &mut self.slots[i];
        slot.incarnation += 1;
        let addr = slot.addr;
        self.net.up(addr.ip());
        let elapsed_us = Instant::now()
            .saturating_duration_since(self.start)
            .as_micros() as u64;
        let env = SimEnv {
            net: self.net.clone(),
            seed: derive(
                self.config.seed,
                &format!("member {i} incarnation {}", slot.incarnation),
            ),
            // Distinct and growing: the start time, with the index as a tie-break.
            generation: (SIM_EPOCH_MS * 1000 + elapsed_us) * 128 + i as u64 % 128,
        };
        let seeds: Vec<String> = (0..self.config.members.clamp(1, 3))
            .map(|s| member_addr(s).to_string())
            .collect();
        let grid = Grid::builder()
            .cluster_name("sim")
            .member_id(slot.id.clone())
            .bind(&addr.to_string())
            .seeds(seeds)
            .secret("grid simulation")
            .backups(self.config.backups)
            .partitions(self.config.partitions)
            .gossip_interval(self.config.gossip_interval)
            .op_timeout(self.config.op_timeout)
            .environment(Arc::new(env))
            .start()
            .await?;
        let incarnation = slot.incarnation;
        slot.grid = Some(grid);
        slot.paused = false;
        self.net
            .record(format!("start {i} incarnation {incarnation}").as_bytes());
        Ok(())
    }

    /// Kills member `i` without a goodbye: its network goes silent, its tasks stop.
    pub fn kill(&mut self, i: usize) {
        if let Some(grid) = self.slots[i].grid.take() {
            grid.kill();
            drop(grid);
        }
        self.net.down(self.slots[i].addr.ip());
        self.net.record(format!("kill {i}").as_bytes());
    }

    /// Stops member `i` gracefully (hands its partitions off, tells everyone).
    pub async fn leave(&mut self, i: usize) {
        if let Some(grid) = self.slots[i].grid.take() {
            grid.shutdown().await;
        }
        self.net.down(self.slots[i].addr.ip());
        self.net.record(format!("leave {i}").as_bytes());
    }

    /// Freezes member `i`'s network (datagrams held) until [`World::resume`].
    pub fn pause(&mut self, i: usize) {
        self.slots[i].paused = true;
        self.net.pause(self.slots[i].addr.ip());
        self.net.record(format!("pause {i}").as_bytes());
    }

    /// Releases member `i`'s held datagrams.
    pub fn resume(&mut self, i: usize) {
        self.slots[i].paused = false;
        self.net.resume(self.slots[i].addr.ip());
        self.net.record(format!("resume {i}").as_bytes());
    }

    /// Indices of running members.
    pub fn running(&self) -> Vec<usize> {
        (0..self.slots.len())
            .filter(|i| self.slots[*i].grid.is_some())
            .collect()
    }

    /// A line describing every running member's view: members seen, table version,
    /// primaries. Recorded into the digest when it changed.
    pub fn observe(&mut self) -> String {
        let mut line = String::new();
        for i in self.running() {
            let g = self.slots[i].grid.as_ref().expect("running");
            let st = g.status();
            line.push_str(&format!(
                "{}:{}/{}/{}/{} ",
                i,
                g.cluster().members().len(),
                st.table_version,
                st.table_members,
                st.primaries
            ));
        }
        if line != self.last_observed {
            self.net.record(line.as_bytes());
            self.last_observed = line.clone();
        }
        line
    }

    /// Whether every running, unpaused member sees exactly the running members, routes by
    /// the same table of them, and the coordinator has no migration pending.
    pub fn settled(&self) -> bool {
        let running = self.running();
        let n = running.len();
        let mut version = None;
        let mut coordinator_settled = false;
        for &i in &running {
            let g = self.slots[i].grid.as_ref().expect("running");
            if g.cluster().members().len() != n {
                return false;
            }
            let st = g.status();
            if st.table_members != n || st.table_version == 0 {
                return false;
            }
            if *version.get_or_insert(st.table_version) != st.table_version {
                return false;
            }
            if st.coordinator.active && st.coordinator.settled {
                coordinator_settled = true;
            }
        }
        coordinator_settled
    }

    /// Runs (simulated time) until `done(self)` or `limit` passed; observes every 10 ms.
    /// Returns the time it took, or `None` at the limit.
    pub async fn run_until(
        &mut self,
        limit: Duration,
        mut done: impl FnMut(&Self) -> bool,
    ) -> Option<Duration> {
        let from = Instant::now();
        loop {
            self.observe();
            if done(self) {
                return Some(from.elapsed());
            }
            if from.elapsed() >= limit {
                return None;
            }
            if self.out_of_time.is_some()
                || self
                    .wall_deadline
                    .is_some_and(|d| std::time::Instant::now() > d)
            {
                self.out_of_time.get_or_insert(self.elapsed());
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Lets simulated time pass, observing.
    pub async fn run_for(&mut self, d: Duration) {
        let _ = self.run_until(d, |_| false).await;
    }

    /// The digest of the history so far.
    pub fn digest(&self) -> u64 {
        self.net.digest()
    }
}
