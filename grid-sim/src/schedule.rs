//! Faults as data: a schedule the seed generates, the runner applies and a failure report
//! prints. Each seed also picks which kinds of fault are on at all (swarm testing).

use std::fmt;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::net::WireFaults;

/// One fault (or its end).
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// The wire becomes noisy: latency, loss, duplication, reordering.
    Wire(WireFaults),
    /// The wire is clean again.
    CleanWire,
    /// Two halves that cannot talk (members of `side` against the rest).
    Partition {
        /// One side.
        side: Vec<usize>,
    },
    /// One member cut from everyone (both ways).
    Isolate(usize),
    /// `from` cannot reach `to` (one way).
    OneWay {
        /// Sender whose datagrams are dropped.
        from: usize,
        /// Receiver.
        to: usize,
    },
    /// Every cut removed.
    Heal,
    /// A member killed without a goodbye.
    Kill(usize),
    /// A member restarted with the same id and a new generation.
    Restart(usize),
    /// A member's network frozen (its datagrams held).
    Pause(usize),
    /// Its held datagrams released.
    Resume(usize),
    /// A member leaves gracefully.
    Leave(usize),
    /// A member that left joins again.
    Join(usize),
}

impl Fault {
    /// Whether the fault cuts the cluster (beyond what `backup_count` failures cover).
    pub fn is_partition(&self) -> bool {
        matches!(
            self,
            Self::Partition { .. } | Self::Isolate(_) | Self::OneWay { .. }
        )
    }
}

/// A fault at a simulated time after the start of the workload.
#[derive(Debug, Clone, PartialEq)]
pub struct Scheduled {
    /// When.
    pub at: Duration,
    /// What.
    pub fault: Fault,
}

/// Which kinds of fault a seed turned on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Swarm {
    /// Latency, loss, duplication, reordering.
    pub wire: bool,
    /// Kill and restart.
    pub kill: bool,
    /// Pause and resume.
    pub pause: bool,
    /// Partitions (halves, isolation, one-way).
    pub partition: bool,
    /// Graceful leave and join.
    pub leave: bool,
}

impl fmt::Display for Swarm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let on: Vec<&str> = [
            (self.wire, "wire"),
            (self.kill, "kill"),
            (self.pause, "pause"),
            (self.partition, "partition"),
            (self.leave, "leave"),
        ]
        .iter()
        .filter(|(b, _)| *b)
        .map(|(_, n)| *n)
        .collect();
        if on.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&on.join("+"))
        }
    }
}

/// A seed's faults.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    /// The kinds turned on.
    pub swarm: Swarm,
    /// The faults in time order.
    pub faults: Vec<Scheduled>,
}

impl Schedule {
    /// Whether any fault partitions the cluster (then only convergence is checked).
    pub fn partitions(&self) -> bool {
        self.faults.iter().any(|s| s.fault.is_partition())
    }

    /// Generates the faults of `seed` for `members` members over `window`; `allow_partitions`
    /// off leaves partitions out of the swarm.
    pub fn generate(seed: u64, members: usize, window: Duration, allow_partitions: bool) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let swarm = Swarm {
            wire: rng.gen_bool(0.5),
            kill: rng.gen_bool(0.6),
            pause: rng.gen_bool(0.4),
            partition: allow_partitions && rng.gen_bool(0.3),
            leave: rng.gen_bool(0.3),
        };
        let mut kinds = Vec::new();
        if swarm.wire {
            kinds.push(0);
        }
        if swarm.kill {
            kinds.push(1);
        }
        if swarm.pause {
            kinds.push(2);
        }
        if swarm.partition {
            kinds.push(3);
        }
        if swarm.leave {
            kinds.push(4);
        }
        let mut faults = Vec::new();
        let ms = |rng: &mut StdRng, lo: u64, hi: u64| Duration::from_millis(rng.gen_range(lo..=hi));
        let mut t = ms(&mut rng, 1_000, 5_000);
        while !kinds.is_empty() && t < window {
            let kind = kinds[rng.gen_range(0..kinds.len())];
            let m = rng.gen_range(0..members);
            let (start, end, hold) = match kind {
                0 => {
                    let loss = [0.0, 0.01, 0.05, 0.2][rng.gen_range(0..4)];
                    let w = WireFaults {
                        base_latency: (
                            Duration::from_micros(rng.gen_range(50..=500)),
                            Duration::from_micros(rng.gen_range(500..=20_000)),
                        ),
                        jitter_mean: Duration::from_micros(rng.gen_range(0..=5_000)),
                        jitter_max: Duration::from_millis(rng.gen_range(1..=100)),
                        loss,
                        duplicate: [0.0, 0.01, 0.1][rng.gen_range(0..3)],
                    };
                    (
                        Fault::Wire(w),
                        Fault::CleanWire,
                        ms(&mut rng, 2_000, 20_000),
                    )
                }
                1 => (Fault::Kill(m), Fault::Restart(m), ms(&mut rng, 500, 15_000)),
                2 => (Fault::Pause(m), Fault::Resume(m), ms(&mut rng, 100, 6_000)),
                3 => {
                    let start = match rng.gen_range(0..3) {
                        0 => {
                            let mut side: Vec<usize> =
                                (0..members).filter(|_| rng.gen_bool(0.5)).collect();
                            if side.is_empty() {
                                side.push(m);
                            }
                            Fault::Partition { side }
                        }
                        1 => Fault::Isolate(m),
                        _ => {
                            let to = (m + rng.gen_range(1..members.max(2))) % members.max(1);
                            Fault::OneWay { from: m, to }
                        }
                    };
                    (start, Fault::Heal, ms(&mut rng, 500, 10_000))
                }
                _ => (Fault::Leave(m), Fault::Join(m), ms(&mut rng, 1_000, 10_000)),
            };
            faults.push(Scheduled {
                at: t,
                fault: start,
            });
            let end_at = (t + hold).min(window);
            faults.push(Scheduled {
                at: end_at,
                fault: end,
            });
            // The next fault after this one ended, plus a quiet spell.
            t = end_at + ms(&mut rng, 500, 10_000);
        }
        Self { swarm, faults }
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "faults on: {}", self.swarm)?;
        for s in &self.faults {
            writeln!(f, "  {:>9.3}s  {:?}", s.at.as_secs_f64(), s.fault)?;
        }
        Ok(())
    }
}
