//! Membership: forming a cluster, failure detection, graceful leave, restarts, seeds that
//! come up late.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use grid::MemberEvent;

use common::{cluster, init_tracing, member};

fn ids(g: &grid::Grid) -> BTreeSet<String> {
    g.cluster()
        .members()
        .iter()
        .map(|m| m.id.to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_members_agree_on_the_member_set_and_the_leader() {
    let grids = cluster("agree", 5).await;
    let expected: BTreeSet<String> = (0..5).map(|i| format!("m{i}")).collect();
    for g in &grids {
        assert_eq!(ids(g), expected);
        assert_eq!(&*g.cluster().oldest().id, "m0", "m0 started first");
    }
    assert_eq!(grids.iter().filter(|g| g.cluster().is_leader()).count(), 1);
    for g in &grids {
        g.shutdown().await;
    }
}

/// Waits on every watcher at once for the event about `who` that `is_it` accepts, and
/// returns how long each took from `start` (taken before the kill or the shutdown). Every
/// watcher must see it within `deadline` of that same start: one overall deadline, not one
/// per watcher after the previous one.
async fn time_until(
    start: Instant,
    watchers: Vec<grid::MembershipEvents>,
    who: &str,
    is_it: fn(&MemberEvent) -> bool,
    deadline: Duration,
) -> Vec<Duration> {
    let mut tasks = Vec::new();
    for mut events in watchers {
        let who = who.to_string();
        tasks.push(tokio::spawn(async move {
            while let Some(e) = events.recv().await {
                if *e.member().id == who && is_it(&e) {
                    return Some(start.elapsed());
                }
            }
            None
        }));
    }
    let until = tokio::time::Instant::from_std(start + deadline);
    let mut took = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        let seen = tokio::time::timeout_at(until, t)
            .await
            .ok()
            .and_then(|j| j.ok())
            .flatten();
        let Some(after) = seen else {
            panic!("watcher {i} did not see the event about {who} within {deadline:?} (others: {took:?})");
        };
        assert!(
            after <= deadline,
            "watcher {i} saw the event about {who} after {after:?}, not within {deadline:?}"
        );
        took.push(after);
    }
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_member_is_reported_failed_by_all_others_within_3s() {
    let grids = cluster("kill", 5).await;
    let watchers = grids[..4].iter().map(|g| g.cluster().events()).collect();
    let start = Instant::now();
    grids[4].kill();
    let took = time_until(
        start,
        watchers,
        "m4",
        |e| matches!(e, MemberEvent::Failed(_)),
        Duration::from_secs(3),
    )
    .await;
    println!("failure seen after {took:?}");
    for g in &grids[..4] {
        assert_eq!(g.cluster().members().len(), 4);
    }
    for g in &grids[..4] {
        g.shutdown().await;
    }
}

/// A member's `leaving` status travels by gossip and its leave notice by a direct request;
/// whichever arrives first, its departure is a departure. (CI once saw `Failed` here: the
/// gossip won the race and the member vanished from the view before the notice came.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_departure_seen_in_gossip_before_the_notice_is_reported_as_left() {
    let grids = cluster("gossip-leave", 3).await;
    let mut watchers: Vec<_> = grids[..2].iter().map(|g| g.cluster().events()).collect();
    grids[2].announce_leaving_by_gossip_only().await;
    for events in &mut watchers {
        let first = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match events.recv().await {
                    Some(e) if &*e.member().id == "m2" => break e,
                    Some(_) => {}
                    None => panic!("membership events ended"),
                }
            }
        })
        .await
        .expect("an event about m2 within 10 s");
        assert!(matches!(first, MemberEvent::Left(_)), "{first:?}");
    }
    for g in &grids {
        g.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_shutdown_is_reported_as_left_at_once() {
    let grids = cluster("leave", 5).await;
    // A graceful shutdown first hands the member's partitions off (its own test is in
    // tests/partitions.rs); do that before the clock starts, so that what is timed is the
    // departure notice alone.
    grids[4]
        .runtime()
        .drain(Duration::from_secs(30))
        .await
        .expect("partitions handed off");
    let watchers = grids[..4].iter().map(|g| g.cluster().events()).collect();
    let leaving = grids[4].clone();
    let start = Instant::now();
    let shutdown = tokio::spawn(async move { leaving.shutdown().await });
    // "At once": well before failure detection could have noticed (about 1 s).
    let took = time_until(
        start,
        watchers,
        "m4",
        |e| matches!(e, MemberEvent::Left(_)),
        Duration::from_millis(500),
    )
    .await;
    println!("departure seen after {took:?}");
    shutdown.await.unwrap();
    for g in &grids[..4] {
        assert!(!ids(g).contains("m4"));
        g.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_member_replaces_its_old_record() {
    let grids = cluster("restart", 3).await;
    let old = grids[2].cluster().local_member().clone();
    let mut events = grids[0].cluster().events();
    grids[2].kill();
    // Restart at once, before failure detection: same id, new generation.
    let again = member("restart", "m2")
        .seed(grids[0].addr())
        .start()
        .await
        .unwrap();
    let new_generation = again.cluster().local_member().generation;
    assert!(new_generation > old.generation);
    for g in [&grids[0], &grids[1], &again] {
        assert!(
            g.cluster()
                .wait_until(Duration::from_secs(10), |m| {
                    m.len() == 3
                        && m.iter()
                            .any(|x| &*x.id == "m2" && x.generation == new_generation)
                })
                .await,
            "{} does not see the new m2: {:?}",
            g.cluster().local_member().id,
            g.cluster().members()
        );
        // Never two records for one id.
        let members = g.cluster().members();
        let unique: BTreeSet<_> = members.iter().map(|m| m.id.clone()).collect();
        assert_eq!(unique.len(), members.len());
    }
    let mut seen = Vec::new();
    while let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(200), events.recv()).await {
        seen.push(e);
    }
    assert!(seen.contains(&MemberEvent::Failed(old.clone())), "{seen:?}");
    assert!(
        seen.iter()
            .any(|e| matches!(e, MemberEvent::Joined(m) if &*m.id == "m2" && m.generation == new_generation)),
        "{seen:?}"
    );
    for g in [&grids[0], &grids[1], &again] {
        g.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_joins_once_its_seed_comes_up() {
    init_tracing();
    // The seed is not up yet: its port is held by a socket that never answers.
    let silent = common::SilentAddr::new();
    let early = member("late-seed", "early")
        .seed(silent.addr())
        .start()
        .await
        .unwrap();
    assert!(
        !early
            .cluster()
            .wait_until(Duration::from_millis(500), |m| m.len() > 1)
            .await
    );
    let seed_addr = silent.release().to_string();
    let seed = member("late-seed", "seed")
        .bind(&seed_addr)
        .start()
        .await
        .unwrap();
    for g in [&early, &seed] {
        assert!(
            g.cluster()
                .wait_until(Duration::from_secs(10), |m| m.len() == 2)
                .await,
            "{} did not see the other member",
            g.cluster().local_member().id
        );
    }
    early.shutdown().await;
    seed.shutdown().await;
}

/// Seeds may be DNS names: `localhost:<port>` is resolved to the member listening there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seed_given_as_a_dns_name_is_resolved() {
    init_tracing();
    let seed = member("dns-seed", "seed").start().await.unwrap();
    let by_name = format!("localhost:{}", seed.addr().port());
    let other = member("dns-seed", "other")
        .seed(&by_name)
        .start()
        .await
        .unwrap();
    for g in [&seed, &other] {
        assert!(
            g.cluster()
                .wait_until(Duration::from_secs(10), |m| m.len() == 2)
                .await,
            "{} did not see the other member (seed {by_name})",
            g.cluster().local_member().id
        );
    }
    other.shutdown().await;
    seed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_attributes_and_lite_members_are_visible_everywhere() {
    init_tracing();
    let a = member("attrs", "a")
        .attribute("zone", "z1")
        .start()
        .await
        .unwrap();
    let b = member("attrs", "b")
        .lite_member()
        .seed(a.addr())
        .start()
        .await
        .unwrap();
    assert!(
        a.cluster()
            .wait_until(Duration::from_secs(10), |m| m.len() == 2)
            .await
    );
    let seen_b = a.cluster().member("b").unwrap();
    assert!(!seen_b.is_data_member());
    assert!(
        b.cluster()
            .wait_until(Duration::from_secs(10), |m| m
                .iter()
                .any(|x| &*x.id == "a" && x.attribute("zone") == Some("z1")))
            .await
    );
    a.shutdown().await;
    b.shutdown().await;
}
