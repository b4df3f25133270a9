//! Partitions in in-process clusters: owners die and backups take over, members join while
//! writers write, members leave gracefully without backups — and nothing acknowledged is lost.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use grid::Grid;

use common::{eventually, eventually_async, init_tracing, member, settled};

async fn data_cluster(name: &str, n: usize, backups: u8) -> Vec<Grid> {
    common::data_cluster(name, n, |b| b.backups(backups)).await
}

fn owner_of(grids: &[Grid], cache: &grid::Cache<u32, u32>, key: u32) -> usize {
    let _ = cache;
    let encoded = grid::codec::encode(&key).unwrap();
    let p = grids[0].runtime().partition_of(&encoded);
    let table = grids[0].runtime().table();
    let owner = table.owner(p).expect("owned").clone();
    grids
        .iter()
        .position(|g| g.cluster().local_member().id == owner)
        .expect("owner is one of ours")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_one_backup_a_killed_owners_keys_stay_readable_and_writable() {
    let mut grids = data_cluster("p-kill1", 3, 1).await;
    let cache = grids[0].cache::<u32, u32>("c").await.unwrap();
    for k in 0..300 {
        cache.put(&k, &(k * 10)).await.unwrap();
    }
    let victim = owner_of(&grids, &cache, 7);
    let dead = grids.remove(victim);
    dead.kill();
    let survivor = grids[0].cache::<u32, u32>("c").await.unwrap();
    assert_eq!(survivor.get(&7).await.unwrap(), Some(70), "backup promoted");
    survivor.put(&7, &71).await.unwrap();
    assert_eq!(
        grids[1]
            .cache::<u32, u32>("c")
            .await
            .unwrap()
            .get(&7)
            .await
            .unwrap(),
        Some(71)
    );
    for k in 0..300 {
        if k != 7 {
            assert_eq!(survivor.get(&k).await.unwrap(), Some(k * 10), "key {k}");
        }
    }
    // Re-replication restores one backup for everything on the two survivors.
    assert!(settled(&grids, 2).await);
    for g in &grids {
        g.shutdown().await;
    }
}

/// Partitions of more than 64 entries are copied on the bulk path (second endpoint,
/// low-priority threads, several chunks); the other tests' partitions are small copies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_partitions_move_on_the_bulk_path_and_lose_nothing() {
    let mut grids = common::data_cluster("p-bulk", 2, |b| b.backups(1).partitions(7)).await;
    let cache = grids[0].cache::<u32, Vec<u8>>("c").await.unwrap();
    // About 200 entries of 8 KiB per partition: 1.6 MB, two chunks each.
    for k in 0..1400u32 {
        cache.put(&k, &vec![(k % 251) as u8; 8192]).await.unwrap();
    }
    let joiner = member("p-bulk", "m2")
        .backups(1)
        .partitions(7)
        .seed(grids[0].addr())
        .start()
        .await
        .unwrap();
    grids.push(joiner);
    assert!(settled(&grids, 3).await, "rebalancing did not finish");
    let status = grids[2].status();
    assert!(status.primaries > 0, "{status:?}");
    let moved: u64 = grids.iter().map(|g| g.status().moved_bytes).sum();
    assert!(moved > 2_000_000, "moved {moved} bytes");
    let reader = grids[2].cache::<u32, Vec<u8>>("c").await.unwrap();
    for k in 0..1400u32 {
        let v = reader.get(&k).await.unwrap().expect("present");
        assert_eq!((v.len(), v[0]), (8192, (k % 251) as u8), "key {k}");
    }
    for g in &grids {
        g.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_backups_killing_two_of_five_at_once_loses_nothing() {
    let mut grids = data_cluster("p-kill2", 5, 2).await;
    let cache = grids[0].cache::<u32, u32>("c").await.unwrap();
    for k in 0..500 {
        cache.put(&k, &(k + 1)).await.unwrap();
    }
    let b = grids.remove(4);
    let a = grids.remove(3);
    a.kill();
    b.kill();
    let cache = grids[1].cache::<u32, u32>("c").await.unwrap();
    for k in 0..500 {
        assert_eq!(cache.get(&k).await.unwrap(), Some(k + 1), "key {k}");
    }
    cache.put(&1, &1000).await.unwrap();
    assert_eq!(
        grids[2]
            .cache::<u32, u32>("c")
            .await
            .unwrap()
            .get(&1)
            .await
            .unwrap(),
        Some(1000)
    );
    assert!(settled(&grids, 3).await);
    for k in 0..500 {
        let expect = if k == 1 { 1000 } else { k + 1 };
        assert_eq!(
            grids[0]
                .cache::<u32, u32>("c")
                .await
                .unwrap()
                .get(&k)
                .await
                .unwrap(),
            Some(expect)
        );
    }
    for g in &grids {
        g.shutdown().await;
    }
}

/// Writes go on while a member joins and partitions change hands: each write is
/// acknowledged (a write that meets a partition frozen for its switch waits and goes to the
/// new owner, within the operation's deadline), and every acknowledged write can be read
/// back afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_write_survives_a_join_under_64_writers() {
    let mut grids = data_cluster("p-join", 3, 1).await;
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<HashMap<(u32, u32), u32>>> = Arc::default();
    let acked_writes = Arc::new(AtomicU64::new(0));
    let failures: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut writers = Vec::new();
    for w in 0..64u32 {
        let cache = grids[(w % 3) as usize]
            .cache::<(u32, u32), u32>("w")
            .await
            .unwrap();
        let (stop, acked, acked_writes, failures) = (
            stop.clone(),
            acked.clone(),
            acked_writes.clone(),
            failures.clone(),
        );
        writers.push(tokio::spawn(async move {
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let key = (w, n % 50);
                match cache.put(&key, &n).await {
                    Ok(_) => {
                        acked.lock().unwrap().insert(key, n);
                        acked_writes.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => failures.lock().unwrap().push(format!("{key:?}: {e}")),
                }
                n += 1;
            }
            n
        }));
    }
    // Some acknowledged writes before the join.
    assert!(
        eventually(Duration::from_secs(10), || acked_writes
            .load(Ordering::Relaxed)
            >= 500)
        .await,
        "the writers barely ran before the join: {} acknowledged, failures {:?}",
        acked_writes.load(Ordering::Relaxed),
        failures.lock().unwrap().iter().take(5).collect::<Vec<_>>()
    );
    let before_join = acked_writes.load(Ordering::Relaxed);
    let joiner = member("p-join", "m3")
        .backups(1)
        .seed(grids[0].addr())
        .start()
        .await
        .unwrap();
    grids.push(joiner);
    assert!(settled(&grids, 4).await, "rebalancing did not finish");
    let during_join = acked_writes.load(Ordering::Relaxed) - before_join;
    // And some after it, on the new table.
    let after_join = acked_writes.load(Ordering::Relaxed);
    assert!(
        eventually(Duration::from_secs(10), || {
            acked_writes.load(Ordering::Relaxed) >= after_join + 500
        })
        .await,
        "the writers stalled after the join"
    );
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for w in writers {
        total += w.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let acked_writes = acked_writes.load(Ordering::Relaxed);
    let failures = failures.lock().unwrap().clone();
    println!(
        "{total} writes: {acked_writes} acknowledged ({during_join} while the member joined), \
         {} failed; {} keys acknowledged",
        failures.len(),
        acked.len()
    );
    assert_eq!(
        acked_writes + failures.len() as u64,
        total as u64,
        "every write either acknowledged or failed"
    );
    assert!(
        failures.is_empty(),
        "{} of {total} writes failed during the join, e.g. {:?}",
        failures.len(),
        failures.iter().take(5).collect::<Vec<_>>()
    );
    assert!(
        during_join > 0,
        "no write was acknowledged while the member joined"
    );
    let reader = grids[3].cache::<(u32, u32), u32>("w").await.unwrap();
    for (key, value) in &acked {
        let p = grids[0]
            .runtime()
            .partition_of(&grid::codec::encode(key).unwrap());
        let table = grids[0].runtime().table();
        assert_eq!(
            reader.get(key).await.unwrap(),
            Some(*value),
            "key {key:?} in partition {p}, replicas {:?} in table {}",
            table.replicas(p).collect::<Vec<_>>(),
            table.version()
        );
    }
    for g in &grids {
        g.shutdown().await;
    }
}

/// A write that arrives while its partition is frozen for a switch waits (the owner answers
/// "frozen", the caller tries again), then succeeds on the new owner once the table moves
/// the partition. The partitions are frozen on their owner by the coordinator's own request
/// (route and message as the runtime defines them), renewed until the switch, so that the
/// old owner never takes the write; then the owner drains, which switches them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_to_a_frozen_partition_waits_and_succeeds_on_the_new_owner() {
    /// `grid_core::runtime::messages::FreezeRequest`, encoded the same way.
    #[derive(serde::Serialize)]
    struct FreezeRequest {
        table_version: u64,
        partition: u32,
        new_owner: String,
    }
    let grids = data_cluster("p-frozen", 3, 1).await;
    let old_owner = grids[2].clone();
    let old_id = old_owner.cluster().local_member().id.clone();
    let table = grids[0].runtime().table();
    // One key in each of five partitions the old owner holds.
    let mut keys: Vec<(u32, u32)> = Vec::new();
    for k in 0..100_000u32 {
        let p = grids[0]
            .runtime()
            .partition_of(&grid::codec::encode(&k).unwrap());
        if table.owner(p) == Some(&old_id) && !keys.iter().any(|(q, _)| *q == p) {
            keys.push((p, k));
            if keys.len() == 5 {
                break;
            }
        }
    }
    assert_eq!(keys.len(), 5, "m2 owns partitions");
    let cache = grids[0].cache::<u32, u32>("c").await.unwrap();
    for (_, k) in &keys {
        cache.put(k, &1).await.unwrap();
    }
    // Freeze them (a new owner that is no member: nothing to check first), and keep them
    // frozen: a freeze lapses after a few seconds without the table that ends it.
    let freeze = {
        let (from, to) = (grids[0].clone(), old_owner.addr());
        let partitions: Vec<u32> = keys.iter().map(|(p, _)| *p).collect();
        let version = table.version();
        move || {
            let (from, partitions) = (from.clone(), partitions.clone());
            async move {
                for &partition in &partitions {
                    let req = FreezeRequest {
                        table_version: version,
                        partition,
                        new_owner: "nobody".into(),
                    };
                    from.transport()
                        .request_typed::<_, ()>(to, "grid.rt.freeze", &req, Duration::from_secs(5))
                        .await
                        .expect("freeze");
                }
            }
        }
    };
    freeze().await;
    let renew = tokio::spawn({
        let freeze = freeze.clone();
        async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                freeze().await;
            }
        }
    });
    let mut writes = tokio::task::JoinSet::new();
    for (_, k) in &keys {
        let (cache, k) = (cache.clone(), *k);
        writes.spawn(async move { (k, cache.put(&k, &2).await) });
    }
    // The writes wait: none is acknowledged while the partitions are frozen.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), writes.join_next())
            .await
            .is_err(),
        "a write to a frozen partition finished"
    );
    // The old owner hands its partitions off: the switch ends the freeze.
    old_owner
        .runtime()
        .drain(Duration::from_secs(8))
        .await
        .expect("partitions handed off");
    while let Some(done) = writes.join_next().await {
        let (k, r) = done.unwrap();
        assert_eq!(
            r.unwrap(),
            Some(1),
            "key {k}: the write saw the value before it"
        );
    }
    renew.abort();
    let table = grids[0].runtime().table();
    for (p, k) in &keys {
        let owner = table.owner(*p).expect("owned");
        assert_ne!(owner, &old_id, "partition {p} moved");
        let new_owner = grids
            .iter()
            .find(|g| g.cluster().local_member().id == *owner)
            .unwrap();
        let on_owner = new_owner.cache::<u32, u32>("c").await.unwrap();
        assert_eq!(
            on_owner.get(k).await.unwrap(),
            Some(2),
            "key {k} on {owner}"
        );
    }
    // The old owner never held the write: gone, and the value is still there.
    old_owner.kill();
    for (_, k) in &keys {
        assert_eq!(cache.get(k).await.unwrap(), Some(2), "key {k}");
    }
    for g in &grids[..2] {
        g.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_shutdown_without_backups_loses_nothing() {
    let grids = data_cluster("p-leave0", 3, 0).await;
    let cache = grids[0].cache::<u32, u32>("c").await.unwrap();
    for k in 0..300 {
        cache.put(&k, &k).await.unwrap();
    }
    grids[2].shutdown().await;
    let rest = &grids[..2];
    let cache = rest[1].cache::<u32, u32>("c").await.unwrap();
    for k in 0..300 {
        assert_eq!(cache.get(&k).await.unwrap(), Some(k), "key {k}");
    }
    assert_eq!(cache.len().await.unwrap(), 300);
    for g in rest {
        g.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_with_another_partition_count_is_refused() {
    init_tracing();
    let a = member("p-count", "a").start().await.unwrap();
    let b = member("p-count", "b")
        .partitions(1999)
        .seed(a.addr())
        .start()
        .await
        .unwrap();
    assert!(
        !a.cluster()
            .wait_until(Duration::from_millis(1500), |m| m.len() > 1)
            .await
    );
    let err = b
        .transport()
        .request(a.addr(), "grid.rt.table.get", b"", Duration::from_secs(2))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("partitions"), "{err}");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_map_operations_work_from_every_member() {
    let grids = data_cluster("p-ops", 3, 1).await;
    let mut caches = Vec::new();
    for g in &grids {
        caches.push(g.cache::<String, String>("ops").await.unwrap());
    }
    for i in 0..50 {
        let k = format!("k{i}");
        assert_eq!(caches[i % 3].put(&k, &format!("v{i}")).await.unwrap(), None);
    }
    for (i, c) in caches.iter().enumerate() {
        assert_eq!(
            c.get(&"k5".to_string()).await.unwrap(),
            Some("v5".to_string()),
            "member {i}"
        );
        assert!(c.contains_key(&"k6".to_string()).await.unwrap());
        assert!(!c.contains_key(&"nope".to_string()).await.unwrap());
    }
    assert_eq!(
        caches[1]
            .put_if_absent(&"k1".to_string(), &"x".to_string())
            .await
            .unwrap(),
        Some("v1".to_string())
    );
    assert_eq!(
        caches[2]
            .put_if_absent(&"new".to_string(), &"n".to_string())
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        caches[0].remove(&"k2".to_string()).await.unwrap(),
        Some("v2".to_string())
    );
    assert_eq!(caches[0].remove(&"k2".to_string()).await.unwrap(), None);
    assert_eq!(caches[1].len().await.unwrap(), 50);
    // Another cache of the same member is another map.
    assert_eq!(
        grids[0]
            .cache::<String, String>("other")
            .await
            .unwrap()
            .len()
            .await
            .unwrap(),
        0
    );
    for g in &grids {
        g.shutdown().await;
    }
}

/// A put whose backup did not confirm it says its outcome is unknown, like every write: it
/// was applied on the owner, but repeating it could undo a later write of another caller
/// (the simulator's linearizability checker caught the repeat). The next acknowledged write
/// brings the backup up to date.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unconfirmed_put_reports_an_unknown_outcome_and_the_next_write_repairs_the_backup() {
    init_tracing();
    let grids = data_cluster("p-unconfirmed", 2, 1).await;
    let cache = grids[0].cache::<u32, u32>("c").await.unwrap();
    for key in 0..8u32 {
        cache.put(&key, &1).await.unwrap();
        let owner = owner_of(&grids, &cache, key);
        grids[1 - owner].runtime().refuse_next_backups_for_tests(1);
        let r = cache.put(&key, &2).await;
        assert!(
            matches!(r, Err(grid::GridError::Indeterminate(_))),
            "key {key}: {r:?}"
        );
        // Applied on the owner: a read sees it.
        assert_eq!(cache.get(&key).await.unwrap(), Some(2));
        let other = key + 100;
        grids[1 - owner_of(&grids, &cache, other)]
            .runtime()
            .refuse_next_backups_for_tests(1);
        let r = cache.put_if_absent(&other, &3).await;
        assert!(matches!(r, Err(grid::GridError::Indeterminate(_))), "{r:?}");
        // The next write finds the backup behind and brings it up to date.
        assert_eq!(cache.put(&key, &4).await.unwrap(), Some(2), "key {key}");
    }
    // The values survive their owner's death.
    grids[1].kill();
    let survivor = grids[0].cache::<u32, u32>("c").await.unwrap();
    for key in 0..8u32 {
        assert_eq!(survivor.get(&key).await.unwrap(), Some(4), "key {key}");
    }
    grids[0].shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anti_entropy_repairs_a_backup_that_missed_a_change() {
    init_tracing();
    let tuned = |id: &str| {
        let b = member("p-ae", id).backups(1);
        let mut config = b.build_config().clone();
        config.partitions.anti_entropy_ms = 200;
        config.partitions.backup_timeout_ms = 200;
        b.config(config)
    };
    let a = tuned("a").start().await.unwrap();
    let b = tuned("b").seed(a.addr()).start().await.unwrap();
    let grids = vec![a, b];
    assert!(settled(&grids, 2).await);
    let cache = grids[0].cache::<u32, u32>("c").await.unwrap();
    cache.put(&1, &1).await.unwrap();
    cache.put(&1, &2).await.unwrap();
    let owner = owner_of(&grids, &cache, 1);
    let backup = 1 - owner;
    // The backup loses its copy of the key's partition (as if it had missed changes), and
    // no further change comes to resynchronise it.
    let p = grids[0]
        .runtime()
        .partition_of(&grid::codec::encode(&1u32).unwrap());
    grids[backup].runtime().forget_replica_for_tests(p).await;
    // Anti-entropy notices the backup differs and resends the partition; then the owner
    // dies, and the promoted backup must have the acknowledged write.
    let owners = grids[owner]
        .runtime()
        .replica_version_for_tests("cache", p)
        .await;
    assert!(owners > 0);
    assert!(
        eventually_async(Duration::from_secs(10), || async {
            grids[backup]
                .runtime()
                .replica_version_for_tests("cache", p)
                .await
                == owners
        })
        .await,
        "anti-entropy did not repair the backup"
    );
    grids[owner].kill();
    let survivor = grids[backup].cache::<u32, u32>("c").await.unwrap();
    assert_eq!(survivor.get(&1).await.unwrap(), Some(2));
    grids[backup].shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anti_entropy_repair_streams_without_holding_the_partition_lock() {
    init_tracing();
    let tuned = |id: &str| {
        let b = member("p-ae-lock", id).backups(1).partitions(7);
        let mut config = b.build_config().clone();
        // Passes only when the test asks.
        config.partitions.anti_entropy_ms = 600_000;
        b.config(config)
    };
    let a = tuned("a").start().await.unwrap();
    let b = tuned("b").seed(a.addr()).start().await.unwrap();
    let grids = vec![a, b];
    assert!(settled(&grids, 2).await);
    // One partition with 24 MiB in it: a copy that takes a while.
    let p = 3;
    let keys: Vec<u32> = (0u32..)
        .filter(|k| {
            grids[0]
                .runtime()
                .partition_of(&grid::codec::encode(k).unwrap())
                == p
        })
        .take(24)
        .collect();
    let cache = grids[0].cache::<u32, Vec<u8>>("big").await.unwrap();
    for k in &keys {
        cache.put(k, &vec![7u8; 1 << 20]).await.unwrap();
    }
    let owner_id = grids[0].runtime().table().owner(p).cloned().unwrap();
    let owner = grids
        .iter()
        .position(|g| *g.runtime().member_id() == owner_id)
        .unwrap();
    let backup = 1 - owner;
    grids[backup].runtime().forget_replica_for_tests(p).await;
    let rt = grids[owner].runtime().clone();
    rt.reset_copy_window();
    let pass = tokio::spawn({
        let rt = rt.clone();
        async move { rt.anti_entropy_pass_for_tests().await }
    });
    assert!(
        eventually(Duration::from_secs(60), || rt.copy_window().0.is_some()).await,
        "the repair did not start"
    );
    // While the copy streams, the partition's lock (which writes, freezes and migrations
    // take) is free: taking it does not wait for the copy's end.
    let version = tokio::time::timeout(
        Duration::from_secs(30),
        rt.replica_version_for_tests("cache", p),
    )
    .await
    .expect("the partition lock stayed taken");
    assert!(
        rt.copy_window().1.is_none(),
        "the partition's lock was held until the copy ended"
    );
    pass.await.unwrap();
    assert!(
        eventually_async(Duration::from_secs(20), || async {
            grids[backup]
                .runtime()
                .replica_version_for_tests("cache", p)
                .await
                == version
        })
        .await,
        "anti-entropy did not repair the backup"
    );
    grids[owner].kill();
    let survivor = grids[backup].cache::<u32, Vec<u8>>("big").await.unwrap();
    for k in &keys {
        assert_eq!(
            survivor.get(k).await.unwrap().map(|v| v.len()),
            Some(1 << 20)
        );
    }
    grids[backup].shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lite_member_owns_nothing_and_uses_everything() {
    init_tracing();
    let a = member("p-lite", "a").start().await.unwrap();
    let lite = member("p-lite", "lite")
        .lite_member()
        .seed(a.addr())
        .start()
        .await
        .unwrap();
    let grids = vec![a, lite];
    assert!(
        grids[1]
            .cluster()
            .wait_until(Duration::from_secs(10), |m| m.len() == 2)
            .await
    );
    assert!(
        eventually(Duration::from_secs(10), || grids[1]
            .runtime()
            .table()
            .version()
            > 0
            && grids[1].runtime().table().version()
                == grids[0].runtime().table().version())
        .await
    );
    let table = grids[1].runtime().table();
    assert!(
        table.members().iter().all(|m| &**m != "lite"),
        "a lite member holds no partition"
    );
    let cache = grids[1].cache::<u32, String>("c").await.unwrap();
    cache.put(&7, &"seven".to_string()).await.unwrap();
    assert_eq!(
        grids[0]
            .cache::<u32, String>("c")
            .await
            .unwrap()
            .get(&7)
            .await
            .unwrap(),
        Some("seven".to_string())
    );
    for g in &grids {
        g.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asynchronous_backups_catch_up_and_take_over_when_the_owner_dies() {
    use grid_core::runtime::PartitionService;
    let grids = common::data_cluster("p-async", 3, |b| b.backups(0).async_backups(1)).await;
    let cache = grids[0].cache::<u32, u32>("c").await.unwrap();
    for k in 0..200u32 {
        cache.put(&k, &(k * 3)).await.unwrap();
    }
    // Nobody waited for the asynchronous copies; they arrive all the same: every replica
    // of every partition (by the table) holds what its owner holds.
    let by_id = |id: &str| {
        grids
            .iter()
            .find(|g| &*g.cluster().local_member().id == id)
            .expect("a member of ours")
    };
    let caught_up = || {
        let table = grids[0].runtime().table();
        (0..table.partitions()).all(|p| {
            let lens: Vec<usize> = table
                .replicas(p)
                .map(|m| by_id(m).caches().service().partition_len(p))
                .collect();
            lens.len() == 2 && lens[0] == lens[1]
        })
    };
    assert!(
        eventually(Duration::from_secs(10), caught_up).await,
        "asynchronous backups did not catch up"
    );
    let victim = owner_of(&grids, &cache, 7);
    grids[victim].kill();
    let survivor = grids[(victim + 1) % 3]
        .cache::<u32, u32>("c")
        .await
        .unwrap();
    for k in 0..200u32 {
        assert_eq!(survivor.get(&k).await.unwrap(), Some(k * 3), "key {k}");
    }
}

/// A member that starts with a seed sees only itself until gossip reaches it. It must not
/// take that for a cluster of one: before joining was waited for, it planned a table of its
/// own in which it owned every partition, and a read made right after it started found its
/// empty partitions (and a write there vanished when the cluster's table arrived).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_reads_the_clusters_data_from_the_moment_it_starts() {
    let grids = data_cluster("p-join-read", 2, 1).await;
    let cache = grids[0].cache::<u32, u32>("c").await.unwrap();
    for k in 0..50 {
        cache.put(&k, &(k + 1000)).await.unwrap();
    }
    let joiner = member("p-join-read", "m2")
        .seed(grids[0].addr())
        .start()
        .await
        .unwrap();
    let mine = joiner.cache::<u32, u32>("c").await.unwrap();
    for k in 0..50 {
        assert_eq!(mine.get(&k).await.unwrap(), Some(k + 1000), "key {k}");
    }
    mine.put(&100, &7).await.unwrap();
    assert_eq!(cache.get(&100).await.unwrap(), Some(7));
    assert!(joiner.cluster().has_joined());
    joiner.shutdown().await;
    for g in &grids {
        g.shutdown().await;
    }
}

/// A member whose seeds never answer starts a cluster of its own after the join timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_seeds_never_answer_starts_its_own_cluster() {
    init_tracing();
    let silent = common::SilentAddr::new();
    let builder = member("p-join-alone", "m0").seeds([silent.addr()]);
    let mut config = builder.build_config().clone();
    config.membership.join_timeout_ms = 1000;
    let alone = builder.config(config).start().await.unwrap();
    assert!(!alone.cluster().has_joined(), "joined before the timeout");
    let cache = alone.cache::<u32, u32>("c").await.unwrap();
    cache.put(&1, &2).await.unwrap();
    assert!(alone.cluster().has_joined());
    assert_eq!(cache.get(&1).await.unwrap(), Some(2));
    alone.shutdown().await;
}
