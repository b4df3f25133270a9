//! Helpers shared by the integration tests: in-process clusters on 127.0.0.1, port 0.

#![allow(dead_code, unreachable_pub)]

pub mod process;

use std::io::Write;
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use grid::{Grid, GridBuilder};

/// Logs go to the test's output (shown on failure); `RUST_LOG` sets the level.
pub fn init_tracing() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_test_writer()
            .try_init();
    });
}

/// A builder for a test member of `cluster`: loopback, port 0, no default seeds.
pub fn member(cluster: &str, id: &str) -> GridBuilder {
    Grid::builder()
        .cluster_name(cluster)
        .member_id(id)
        .secret(format!("test secret {cluster}"))
        .bind("127.0.0.1:0")
        .no_seeds()
}

/// A loopback UDP port held by a socket that never reads or answers: a seed that is not
/// up yet, or never will be. Bound to port 0 and kept bound, so that nothing else (another
/// test process, or the member under test binding its own port 0) can take the port while
/// the test relies on it being silent.
pub struct SilentAddr {
    socket: std::net::UdpSocket,
    addr: std::net::SocketAddr,
}

impl SilentAddr {
    pub fn new() -> Self {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind a loopback port");
        let addr = socket.local_addr().expect("its address");
        Self { socket, addr }
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// Gives the port up, for a member to bind it at once (a seed coming up late). The port
    /// is free only between this call and that bind.
    pub fn release(self) -> std::net::SocketAddr {
        drop(self.socket);
        self.addr
    }
}

/// Starts `n` members m0..m{n-1}, all seeded with m0, and waits until every member sees all.
pub async fn cluster(name: &str, n: usize) -> Vec<Grid> {
    init_tracing();
    let first = member(name, "m0").start().await.expect("start m0");
    let mut grids = vec![first.clone()];
    for i in 1..n {
        grids.push(
            member(name, &format!("m{i}"))
                .seed(first.addr())
                .start()
                .await
                .expect("start member"),
        );
    }
    for g in &grids {
        assert!(
            g.cluster()
                .wait_until(Duration::from_secs(15), |m| m.len() == n)
                .await,
            "{} sees {} members, not {n}",
            g.cluster().local_member().id,
            g.cluster().members().len()
        );
    }
    grids
}

/// Log text captured by [`capture_logs`].
#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    /// The captured lines that mention any of `markers` (e.g. the members' addresses).
    pub fn lines_with(&self, markers: &[String]) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .filter(|l| markers.iter().any(|m| l.contains(m.as_str())))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Captures every warning of this test binary. One global subscriber, not one per test:
/// tracing caches per-callsite interest process-wide, and scoped subscribers in parallel
/// tests lose lines. Tests pick out their own lines (see [`Logs::lines_with`]).
pub fn capture_logs() -> Logs {
    static LOGS: std::sync::OnceLock<Logs> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Logs::default();
        let writer = logs.clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter("warn")
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .try_init();
        logs
    })
    .clone()
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub async fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls the async `cond` every 20 ms until it holds or `timeout` passes.
pub async fn eventually_async<F, Fut>(timeout: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts `n` data members m0.. (each builder passed through `configure`), all seeded
/// with m0, and waits until the partition table covers all of them.
pub async fn data_cluster(
    name: &str,
    n: usize,
    configure: impl Fn(GridBuilder) -> GridBuilder,
) -> Vec<Grid> {
    init_tracing();
    let first = configure(member(name, "m0")).start().await.unwrap();
    let mut grids = vec![first.clone()];
    for i in 1..n {
        grids.push(
            configure(member(name, &format!("m{i}")))
                .seed(first.addr())
                .start()
                .await
                .unwrap(),
        );
    }
    for g in &grids {
        assert!(
            g.cluster()
                .wait_until(Duration::from_secs(15), |m| m.len() == n)
                .await
        );
    }
    assert!(
        settled(&grids, n).await,
        "partitions did not settle on {n} members"
    );
    grids
}

/// Waits until the coordinator has no migration left and every member applied a table
/// that spreads the partitions over `n` members.
pub async fn settled(grids: &[Grid], n: usize) -> bool {
    eventually(Duration::from_secs(30), || {
        let coordinator = grids
            .iter()
            .find(|g| g.runtime().coordinator_status().active);
        let Some(c) = coordinator else { return false };
        let status = c.runtime().coordinator_status();
        let version = c.runtime().table().version();
        status.settled
            && c.runtime().table().members().len() == n
            && grids
                .iter()
                .all(|g| g.runtime().table().version() == version)
    })
    .await
}
