//! Multicast discovery, tested only inside a network namespace this test creates
//! (`unshare -n`): the namespace has nothing but its own loopback, so no multicast packet
//! ever reaches the host's interfaces.

mod common;

use std::process::Command;
use std::time::Duration;

use grid::MulticastConfig;

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Where namespaces cannot be made, skip with the reason — except in CI, which must run it.
fn skip_or_fail(reason: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI must run the multicast test, but: {reason}");
    }
    println!("SKIPPED multicast discovery test: {reason}");
}

#[test]
fn multicast_discovery_of_three_members_in_a_network_namespace() {
    if !is_root() {
        return skip_or_fail("creating a network namespace needs root");
    }
    for tool in ["unshare", "ip"] {
        if !have(tool) {
            return skip_or_fail(&format!(
                "`{tool}` is not installed (iproute2 / util-linux)"
            ));
        }
    }
    let exe = std::env::current_exe().unwrap();
    // Inside the new namespace: bring loopback up, let it carry multicast, and run the
    // inner test of this same binary there.
    let script = "ip link set lo up && ip link set lo multicast on && \
                  ip route add 224.0.0.0/4 dev lo && \
                  exec \"$0\" multicast_members_find_each_other_inside_the_namespace \
                  --exact --ignored --nocapture --test-threads=1";
    let out = Command::new("unshare")
        .args(["-n", "sh", "-c", script])
        .arg(&exe)
        .env("GRID_IN_NETNS", "1")
        .output()
        .expect("run unshare");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() && stderr.contains("unshare failed") {
        return skip_or_fail(&format!(
            "unshare -n is not permitted here: {}",
            stderr.trim()
        ));
    }
    println!("{stdout}\n{stderr}");
    assert!(out.status.success(), "inner test failed");
    assert!(stdout.contains("1 passed"), "the inner test did not run");
}

#[test]
#[ignore = "run by multicast_discovery_of_three_members_in_a_network_namespace, inside the namespace it creates"]
fn multicast_members_find_each_other_inside_the_namespace() {
    assert_eq!(
        std::env::var("GRID_IN_NETNS").as_deref(),
        Ok("1"),
        "multicast tests run only inside a namespace made by the outer test"
    );
    common::init_tracing();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let multicast = MulticastConfig {
            enabled: true,
            interface: Some("127.0.0.1".parse().unwrap()),
            interval_ms: 200,
            ..MulticastConfig::default()
        };
        let mut grids = Vec::new();
        for i in 0..3 {
            grids.push(
                common::member("mc", &format!("m{i}"))
                    .multicast_config(multicast.clone())
                    .start()
                    .await
                    .unwrap(),
            );
        }
        // A member of another cluster on the same group hears the announcements and
        // ignores them (and is ignored).
        let stranger = common::member("other-cluster", "x")
            .multicast_config(multicast.clone())
            .start()
            .await
            .unwrap();
        for g in &grids {
            assert!(
                g.cluster()
                    .wait_until(Duration::from_secs(15), |m| m.len() == 3)
                    .await,
                "{} sees {:?}",
                g.cluster().local_member().id,
                g.cluster().members()
            );
        }
        assert_eq!(stranger.cluster().members().len(), 1);
        assert!(grids[0].cluster().member("x").is_none());
        for g in &grids {
            g.shutdown().await;
        }
        stranger.shutdown().await;
    });
}
