//! Shared helpers of the benchmark harnesses: percentiles, medians, waiting for a cluster
//! to settle, and the loopback identities both sides of a comparison use.

use std::time::{Duration, Instant};

use grid::Grid;

/// The `p`-th percentile (0–100) of `samples`, which it sorts.
pub fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    samples.sort_unstable();
    let rank = ((p / 100.0) * (samples.len() - 1) as f64).round() as usize;
    samples[rank.min(samples.len() - 1)]
}

/// The median of `values`.
pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len().is_multiple_of(2) {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    }
}

/// Starts `members` data members on loopback (ids `m0`, `m1`, …; backups 1; a 30 s
/// operation deadline) in cluster `name`, and waits until they have settled: the cluster
/// the `locks`, `exec` and `sched` harnesses measure.
pub async fn start_cluster(
    name: &str,
    members: usize,
    partitions: u32,
) -> anyhow::Result<Vec<Grid>> {
    let mut grids: Vec<Grid> = Vec::new();
    let mut seed: Option<std::net::SocketAddr> = None;
    for i in 0..members {
        let b = Grid::builder()
            .cluster_name(format!("{name}-bench"))
            .member_id(format!("m{i}"))
            .secret(format!("{name} harness"))
            .bind("127.0.0.1:0")
            .partitions(partitions)
            .backups(1)
            .op_timeout(Duration::from_secs(30));
        let b = match seed {
            Some(s) => b.seed(s),
            None => b.no_seeds(),
        };
        let g = b.start().await?;
        seed.get_or_insert(g.addr());
        grids.push(g);
    }
    if !settled(&grids, members, Duration::from_secs(60)).await {
        anyhow::bail!("the cluster did not settle within 60 s");
    }
    Ok(grids)
}

/// Whether every member sees `members` members and applied the coordinator's settled table.
pub async fn settled(grids: &[Grid], members: usize, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(c) = grids
            .iter()
            .find(|g| g.runtime().coordinator_status().active)
        {
            let version = c.runtime().table().version();
            if c.runtime().coordinator_status().settled
                && c.runtime().table().members().len() == members
                && grids.iter().all(|g| {
                    g.runtime().table().version() == version
                        && g.cluster().members().len() == members
                })
            {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    false
}

/// A redis-server child process on a free loopback port, killed when dropped.
pub struct RedisServer {
    child: std::process::Child,
    /// Its loopback port.
    pub port: u16,
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl RedisServer {
    /// Starts one and waits until it answers PING; `None` when redis-server is not installed.
    pub async fn start() -> anyhow::Result<Option<(Self, redis::Client)>> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = match std::process::Command::new("redis-server")
            .args(["--port", &port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
        {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(anyhow::Error::new(e).context("starting redis-server")),
        };
        let mut server = Self { child, port };
        let client = redis::Client::open(format!("redis://127.0.0.1:{}/", server.port))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = server.child.try_wait()? {
                anyhow::bail!("redis-server exited at start-up: {status}");
            }
            if let Ok(Ok(mut c)) = tokio::time::timeout(
                Duration::from_secs(1),
                client.get_multiplexed_async_connection(),
            )
            .await
            {
                if let Ok(pong) = redis::cmd("PING").query_async::<String>(&mut c).await {
                    if pong == "PONG" {
                        return Ok(Some((server, client)));
                    }
                }
            }
            if Instant::now() > deadline {
                anyhow::bail!("redis-server on port {} did not answer PING", server.port);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_medians() {
        let mut s: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        assert_eq!(percentile(&mut s, 50.0), Duration::from_micros(51));
        assert_eq!(percentile(&mut s, 99.0), Duration::from_micros(99));
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
