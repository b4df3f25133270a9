//! `grid node` processes for the tests that run members as separate processes.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

/// A `grid` command with only the test's settings: GRID_* variables of the shell would
/// override them. Multicast off; the process dies with its handle.
pub fn grid_command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_grid"));
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_some_and(|n| n.starts_with("GRID_")) {
            command.env_remove(name);
        }
    }
    command
        .env("GRID_MULTICAST_ENABLED", "false")
        .kill_on_drop(true);
    command
}

/// `grid node` as member `id` of `cluster` (development secret `secret`) on a loopback
/// port of its own, seeded with `seed` (none: a cluster of its own).
pub fn node_command(cluster: &str, secret: &str, id: &str, seed: Option<SocketAddr>) -> Command {
    let mut command = grid_command();
    command
        .arg("node")
        .env("GRID_CLUSTER_NAME", cluster)
        .env("GRID_MEMBER_ID", id)
        .env("GRID_BIND", "127.0.0.1:0")
        .env(
            "GRID_SEEDS",
            seed.map(|s| s.to_string()).unwrap_or_default(),
        )
        .env("GRID_CLUSTER_SECRET", secret);
    command
}

/// Starts `command` (a `grid node`) with its standard output piped, and returns once it
/// printed the address it listens on: the child, that address and the rest of its output.
pub async fn spawn_listening(
    command: &mut Command,
) -> (Child, SocketAddr, Lines<BufReader<ChildStdout>>) {
    let mut child = command
        .stdout(Stdio::piped())
        .spawn()
        .expect("grid node starts");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let addr = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let line = lines.next_line().await.expect("output").expect("a line");
            if let Some(rest) = line.split(" listening on ").nth(1) {
                break rest
                    .split_whitespace()
                    .next()
                    .expect("an address")
                    .parse()
                    .expect("an address");
            }
        }
    })
    .await
    .expect("the node listens within 30 s");
    (child, addr, lines)
}
