//! Scale figures in simulated time: N members (100 and more) on one thread. How long until
//! all see all, until all see a kill, until a table is published to all, how many
//! partition copies a join and a kill cost against the ideal, and how many bytes a member
//! sends per second in an idle cluster (gossip, plus QUIC's acknowledgements and
//! keep-alives: the wire cannot tell them apart).

use std::fmt;
use std::time::Duration;

use crate::world::{simulate, World, WorldConfig};

/// The figures of one scale run (`None`: not reached within the limit).
#[derive(Debug, Clone, Default)]
pub struct ScaleReport {
    /// Members.
    pub members: usize,
    /// Simulated time from the first start until every member sees every member.
    pub all_see_all: Option<Duration>,
    /// Until the coordinator's table covers everyone and every member routes by it.
    pub table_settled: Option<Duration>,
    /// Wire bytes sent per member per second over 10 idle seconds.
    pub idle_bytes_per_member_s: f64,
    /// After a kill: until every other member stopped listing it.
    pub kill_seen_by_all: Option<Duration>,
    /// After a kill: until the table without it is settled.
    pub kill_settled: Option<Duration>,
    /// Partition copies the coordinator completed for the kill, and the ideal.
    pub kill_copies: (u64, f64),
    /// After a join: until every member lists the newcomer.
    pub join_seen_by_all: Option<Duration>,
    /// After a join: until every member routes by a table that includes it.
    pub join_table_published: Option<Duration>,
    /// After a join: until settled.
    pub join_settled: Option<Duration>,
    /// Partition copies the coordinator completed for the join, and the ideal.
    pub join_copies: (u64, f64),
    /// Wall-clock seconds the run took.
    pub wall_seconds: f64,
    /// Simulated seconds the run covered.
    pub simulated_seconds: f64,
}

impl fmt::Display for ScaleReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = |x: Option<Duration>| {
            x.map_or("not reached".to_string(), |d| {
                format!("{:.2} s", d.as_secs_f64())
            })
        };
        writeln!(f, "members: {}", self.members)?;
        writeln!(f, "all see all: {}", d(self.all_see_all))?;
        writeln!(f, "table settled after start: {}", d(self.table_settled))?;
        writeln!(
            f,
            "idle wire bytes per member per second: {:.0}",
            self.idle_bytes_per_member_s
        )?;
        writeln!(f, "kill seen by all: {}", d(self.kill_seen_by_all))?;
        writeln!(f, "kill settled: {}", d(self.kill_settled))?;
        writeln!(
            f,
            "kill copies: {} (ideal {:.1})",
            self.kill_copies.0, self.kill_copies.1
        )?;
        writeln!(f, "join seen by all: {}", d(self.join_seen_by_all))?;
        writeln!(
            f,
            "join table published to all: {}",
            d(self.join_table_published)
        )?;
        writeln!(f, "join settled: {}", d(self.join_settled))?;
        writeln!(
            f,
            "join copies: {} (ideal {:.1})",
            self.join_copies.0, self.join_copies.1
        )?;
        write!(
            f,
            "{:.1} simulated seconds in {:.1} wall seconds",
            self.simulated_seconds, self.wall_seconds
        )
    }
}

fn completed(world: &World) -> u64 {
    world
        .running()
        .iter()
        .filter_map(|&i| world.slots[i].grid.as_ref())
        .map(|g| g.status().coordinator)
        .filter(|c| c.active)
        .map(|c| c.stats.completed)
        .sum()
}

/// Runs the scale scenario for `members` members under `seed`.
pub fn run(seed: u64, members: usize) -> ScaleReport {
    let wall = std::time::Instant::now();
    let mut r = simulate(seed, async move {
        let mut r = ScaleReport {
            members,
            ..ScaleReport::default()
        };
        let limit = Duration::from_secs(300);
        let mut world = match World::start(WorldConfig::new(seed, members)).await {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(error = %e, "members did not start");
                return r;
            }
        };
        let n = members;
        r.all_see_all = world
            .run_until(limit, |w| {
                w.running().iter().all(|&i| {
                    w.slots[i]
                        .grid
                        .as_ref()
                        .is_some_and(|g| g.cluster().members().len() == n)
                })
            })
            .await
            .map(|_| world.elapsed());
        r.table_settled = world
            .run_until(limit, |w| w.settled())
            .await
            .map(|_| world.elapsed());
        // Idle traffic.
        let before = world.net.stats();
        world.run_for(Duration::from_secs(10)).await;
        let after = world.net.stats();
        let sent: u64 =
            after.bytes_by_ip.values().sum::<u64>() - before.bytes_by_ip.values().sum::<u64>();
        r.idle_bytes_per_member_s = sent as f64 / n as f64 / 10.0;
        // A kill (not the coordinator, m0: its successor's handover is another figure).
        let victim = n - 1;
        let copies_before = completed(&world);
        world.kill(victim);
        let t0 = world.elapsed();
        let victim_id = world.slots[victim].id.clone();
        r.kill_seen_by_all = world
            .run_until(limit, |w| {
                w.running().iter().all(|&i| {
                    w.slots[i]
                        .grid
                        .as_ref()
                        .is_some_and(|g| g.cluster().member(&victim_id).is_none())
                })
            })
            .await
            .map(|_| world.elapsed() - t0);
        r.kill_settled = world
            .run_until(limit, |w| w.settled())
            .await
            .map(|_| world.elapsed() - t0);
        let replicas = 1.0 + f64::from(world.config.backups);
        let partitions = f64::from(world.config.partitions);
        r.kill_copies = (
            completed(&world).saturating_sub(copies_before),
            replicas * partitions / n as f64,
        );
        // A join (a new member).
        let joiner = world.add_slot();
        let copies_before = completed(&world);
        let t0 = world.elapsed();
        if world.start_member(joiner).await.is_ok() {
            let id = world.slots[joiner].id.clone();
            r.join_seen_by_all = world
                .run_until(limit, |w| {
                    w.running().iter().all(|&i| {
                        w.slots[i]
                            .grid
                            .as_ref()
                            .is_some_and(|g| g.cluster().member(&id).is_some())
                    })
                })
                .await
                .map(|_| world.elapsed() - t0);
            let running = world.running().len();
            r.join_table_published = world
                .run_until(limit, |w| {
                    w.running().iter().all(|&i| {
                        w.slots[i]
                            .grid
                            .as_ref()
                            .is_some_and(|g| g.status().table_members == running)
                    })
                })
                .await
                .map(|_| world.elapsed() - t0);
            r.join_settled = world
                .run_until(limit, |w| w.settled())
                .await
                .map(|_| world.elapsed() - t0);
            r.join_copies = (
                completed(&world).saturating_sub(copies_before),
                replicas * partitions / running as f64,
            );
        }
        r.simulated_seconds = world.elapsed().as_secs_f64();
        r
    });
    r.wall_seconds = wall.elapsed().as_secs_f64();
    r
}
