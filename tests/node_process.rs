//! Members as separate processes: two `grid node` processes form a cluster with a lite
//! member in this test, which stores through them, asks them for their status over the
//! network, and sees a member that is told to leave (SIGINT) hand its partitions off and
//! report its status as it exits. (What the rebalancing harness's `--processes` mode
//! stands on.)

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use grid::{Grid, MemberStatus};
use tokio::io::{BufReader, Lines};
use tokio::process::{Child, ChildStdout};

mod common;

use common::process::{node_command, spawn_listening};

const CLUSTER: &str = "node-process-test";
const SECRET: &str = "node process test";

/// Starts `grid node` as member `id`; returns it, its address and the rest of its output.
async fn node(
    id: &str,
    seed: Option<SocketAddr>,
) -> (Child, SocketAddr, Lines<BufReader<ChildStdout>>) {
    spawn_listening(node_command(CLUSTER, SECRET, id, seed).env("GRID_LOG", "warn")).await
}

/// A lite member of the test's cluster, seeded with `seed`.
async fn lite_member(seed: SocketAddr) -> Grid {
    Grid::builder()
        .cluster_name(CLUSTER)
        .member_id("lite")
        .secret(SECRET)
        .bind("127.0.0.1:0")
        .seed(seed)
        .lite_member()
        .start()
        .await
        .expect("the lite member starts")
}

async fn wait_for<F: std::future::Future<Output = bool>>(what: &str, mut cond: impl FnMut() -> F) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until coordinator "a" reports a settled table of `members` data members and `rt`
/// routes by it.
async fn wait_for_settled(rt: &grid_core::runtime::Runtime, members: usize) {
    wait_for("a settled table of every member", || {
        let rt = rt.clone();
        async move {
            let Ok(s) = rt.member_status("a", false).await else {
                return false;
            };
            s.coordinator.settled
                && s.table_members == members
                && rt.table().version() == s.table_version
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn separate_processes_form_a_cluster_report_status_and_hand_off_on_sigint() {
    let (_a, a_addr, _a_out) = node("a", None).await;
    let (mut b, _b_addr, mut b_out) = node("b", Some(a_addr)).await;
    let lite = lite_member(a_addr).await;
    let rt = lite.runtime().clone();
    wait_for_settled(&rt, 2).await;

    let cache = lite.cache::<u32, String>("c").await.expect("a cache");
    for k in 0..200 {
        cache.put(&k, &format!("v{k}")).await.expect("put");
    }
    let a = rt.member_status("a", false).await.expect("a's status");
    let b_status = rt.member_status("b", false).await.expect("b's status");
    assert_eq!((a.member.as_str(), b_status.member.as_str()), ("a", "b"));
    assert!(
        a.coordinator.active && !b_status.coordinator.active,
        "{a:?} {b_status:?}"
    );
    assert_eq!(a.primaries + b_status.primaries, 271);
    assert_eq!(
        a.cluster_members, 3,
        "a sees both processes and the lite member"
    );

    // SIGINT: b hands its partitions to a, prints what it copied, and exits cleanly.
    let pid = rustix::process::Pid::from_raw(b.id().expect("b runs") as i32).expect("a pid");
    rustix::process::kill_process(pid, rustix::process::Signal::INT).expect("signal");
    let exit = tokio::time::timeout(Duration::from_secs(60), b.wait())
        .await
        .expect("b exits within 60 s")
        .expect("b's exit status");
    assert!(exit.success(), "b exited with {exit}");
    let mut last: Option<MemberStatus> = None;
    while let Ok(Some(line)) = b_out.next_line().await {
        if let Some(json) = line.strip_prefix("left: ") {
            last = Some(serde_json::from_str(json).expect("a status"));
        }
    }
    let last = last.expect("b printed its status as it left");
    assert_eq!(last.member, "b");
    // It left only once the table gave its partitions away (a held backups of them all:
    // promoted, nothing to copy).
    assert_eq!((last.primaries, last.table_members), (0, 1), "{last:?}");

    // Nothing lost (backup 1 and a graceful handoff).
    for k in 0..200 {
        assert_eq!(
            cache.get(&k).await.expect("get"),
            Some(format!("v{k}")),
            "key {k}"
        );
    }
    lite.shutdown().await;
}

/// What one writer saw of its keys: the value last acknowledged for each, and every answer
/// older than an acknowledged write.
#[derive(Default)]
struct WriterReport {
    acked: std::collections::BTreeMap<u64, u64>,
    acked_puts: u64,
    failed_puts: u64,
    stale: Vec<String>,
}

/// One writer: puts increasing values to its own keys and reads each back. A put's previous
/// value and a read after an acknowledged put must be at least the acknowledged value (a
/// write that failed may or may not have happened, so higher values are fine).
async fn write_and_check(
    cache: grid::Cache<u64, u64>,
    keys: std::ops::Range<u64>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> WriterReport {
    let mut report = WriterReport::default();
    let mut next = 0u64;
    while !*stop.borrow() {
        for k in keys.clone() {
            next += 1;
            let before = report.acked.get(&k).copied().unwrap_or(0);
            match cache.put(&k, &next).await {
                Ok(previous) => {
                    report.acked_puts += 1;
                    if previous.unwrap_or(0) < before {
                        report.stale.push(format!(
                            "put {k}={next} saw {previous:?} after {before} was acknowledged"
                        ));
                    }
                    report.acked.insert(k, next);
                }
                Err(_) => report.failed_puts += 1,
            }
            let acked = report.acked.get(&k).copied().unwrap_or(0);
            if let Ok(read) = cache.get(&k).await {
                if read.unwrap_or(0) < acked {
                    report.stale.push(format!(
                        "get {k} read {read:?} after {acked} was acknowledged"
                    ));
                }
            }
        }
    }
    report
}

/// The paused owner (issue 13): a member stopped with SIGSTOP past failure detection, under
/// a write load, is declared failed and its backups promoted; when it resumes it must not
/// serve, acknowledge or push anything for the partitions it no longer owns. Every
/// acknowledged write is still there, and no read or put answered with a value older than
/// an acknowledged one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_paused_past_failure_detection_loses_no_acknowledged_write() {
    let (_a, a_addr, _a_out) = node("a", None).await;
    let mut others = Vec::new();
    for id in ["b", "c", "d", "e"] {
        others.push(node(id, Some(a_addr)).await);
    }
    let lite = lite_member(a_addr).await;
    let rt = lite.runtime().clone();
    wait_for_settled(&rt, 5).await;

    let cache = lite.cache::<u64, u64>("paused").await.expect("a cache");
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let writers: Vec<_> = (0..16u64)
        .map(|w| {
            tokio::spawn(write_and_check(
                cache.clone(),
                w * 8..w * 8 + 8,
                stop.clone(),
            ))
        })
        .collect();
    // Load first, then the pause: the member's partitions have writes in flight.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (paused, _, _) = &others[1];
    let pid = rustix::process::Pid::from_raw(paused.id().expect("c runs") as i32).expect("a pid");
    rustix::process::kill_process(pid, rustix::process::Signal::STOP).expect("SIGSTOP");
    // Past failure detection (about 1.5 s) and the promotion of c's backups: the scenario,
    // not a wait for a condition.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let table_without_c = rt.table();
    rustix::process::kill_process(pid, rustix::process::Signal::CONT).expect("SIGCONT");
    // Writes go on while c comes back, finds it was paused and learns the new table.
    tokio::time::sleep(Duration::from_secs(6)).await;
    stop_tx.send(true).expect("writers listen");
    let mut acked = std::collections::BTreeMap::new();
    let (mut acked_puts, mut failed_puts, mut stale) = (0, 0, Vec::new());
    for w in writers {
        let r = w.await.expect("writer");
        acked.extend(r.acked);
        acked_puts += r.acked_puts;
        failed_puts += r.failed_puts;
        stale.extend(r.stale);
    }
    eprintln!(
        "{acked_puts} puts acknowledged, {failed_puts} failed; table {} while c was paused",
        table_without_c.version()
    );
    assert!(
        !table_without_c.members().iter().any(|m| &**m == "c"),
        "c was declared failed while paused (table {})",
        table_without_c.version()
    );
    assert!(
        stale.is_empty(),
        "{} stale answers: {:?}",
        stale.len(),
        &stale[..stale.len().min(10)]
    );
    let mut lost = Vec::new();
    for (k, v) in &acked {
        let read = cache.get(k).await.expect("get");
        if read.unwrap_or(0) < *v {
            lost.push(format!("{k}: acknowledged {v}, read {read:?}"));
        }
    }
    assert!(
        lost.is_empty(),
        "{} acknowledged writes lost: {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    assert_eq!(acked.len(), 128, "every key was written");
    lite.shutdown().await;
}
