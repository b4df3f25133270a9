//! The cache's features in in-process clusters: the loader's single flight, expiry on
//! every member, bounded size, the replicated and near modes, listeners, entry processors,
//! statistics and settings.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use grid::{Cache, CacheEvent, CacheMode, CacheSettings, Expiry, Grid, GridError};

use common::{data_cluster, eventually_async, member};

/// A `u32` key whose partition `grid` owns.
fn key_owned_by(grid: &Grid) -> u32 {
    let me = grid.cluster().local_member().id.clone();
    (0..1000u32)
        .find(|k| {
            let p = grid
                .runtime()
                .partition_of(&grid::codec::encode(k).unwrap());
            grid.runtime().table().owner(p) == Some(&me)
        })
        .expect("the member owns some key")
}

async fn open<V>(grids: &[Grid], name: &str, settings: &CacheSettings) -> Vec<Cache<u32, V>>
where
    V: serde::Serialize + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    let mut caches = Vec::new();
    for g in grids {
        caches.push(
            g.cache::<u32, V>(name)
                .settings(settings.clone())
                .await
                .unwrap(),
        );
    }
    caches
}

/// Waits until `n` callers wait on the load of `key` (on its owner), or `loads` reached
/// `n`: every caller waiting, merged into one load or (if single flight broke) each in a
/// load of its own. Panics if neither happens.
async fn until_every_caller_waits(grids: &[Grid], key: u32, n: usize, loads: impl Fn() -> u32) {
    let encoded = grid::codec::encode(&key).unwrap();
    let waiting = || {
        grids
            .iter()
            .map(|g| g.caches().callers_waiting_for_load("loaded", &encoded))
            .sum::<usize>()
    };
    assert!(
        common::eventually(Duration::from_secs(10), || waiting() >= n
            || loads() as usize >= n)
        .await,
        "{} of {n} callers wait on the load of {key}, {} loads",
        waiting(),
        loads()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loader_runs_once_when_sixty_callers_on_three_members_miss_together() {
    let grids = data_cluster("c-loader", 3, |b| b).await;
    let calls = Arc::new(AtomicU32::new(0));
    // The loads of keys 7 and 13 wait for their gate, opened once every caller waits.
    let (gate7, _) = tokio::sync::watch::channel(false);
    let (gate13, _) = tokio::sync::watch::channel(false);
    let (gate7, gate13) = (Arc::new(gate7), Arc::new(gate13));
    let mut caches = Vec::new();
    for g in &grids {
        let (calls, gate7, gate13) = (calls.clone(), gate7.clone(), gate13.clone());
        caches.push(
            g.cache::<u32, String>("loaded")
                .loader(move |k: u32| {
                    let calls = calls.clone();
                    let gate = match k {
                        7 => Some(gate7.subscribe()),
                        13 => Some(gate13.subscribe()),
                        _ => None,
                    };
                    async move {
                        calls.fetch_add(1, Ordering::SeqCst);
                        if let Some(mut gate) = gate {
                            let _ = gate.wait_for(|open| *open).await;
                        }
                        if k == 13 {
                            Err(format!("no value for {k}"))
                        } else {
                            Ok(Some(format!("loaded {k}")))
                        }
                    }
                })
                .await
                .unwrap(),
        );
    }
    let gets: Vec<_> = (0..60)
        .map(|t| {
            let c = caches[t % 3].clone();
            tokio::spawn(async move { c.get(&7).await })
        })
        .collect();
    until_every_caller_waits(&grids, 7, 60, || calls.load(Ordering::SeqCst)).await;
    gate7.send_replace(true);
    for g in gets {
        assert_eq!(g.await.unwrap().unwrap(), Some("loaded 7".to_string()));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1, "loader calls for one key");
    // Stored: later reads do not load.
    assert_eq!(caches[1].get(&7).await.unwrap(), Some("loaded 7".into()));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // contains_key never loads.
    assert!(!caches[2].contains_key(&8).await.unwrap());
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // An error reaches every waiting caller, typed, and is not cached.
    let gets: Vec<_> = (0..30)
        .map(|t| {
            let c = caches[t % 3].clone();
            tokio::spawn(async move { c.get(&13).await })
        })
        .collect();
    until_every_caller_waits(&grids, 13, 30, || calls.load(Ordering::SeqCst) - 1).await;
    gate13.send_replace(true);
    for g in gets {
        match g.await.unwrap() {
            Err(GridError::Loader { cache, message }) => {
                assert_eq!(cache, "loaded");
                assert!(message.contains("no value for 13"), "{message}");
            }
            other => panic!("expected a loader error, got {other:?}"),
        }
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "loader calls for the failing key"
    );
    assert!(caches[0].get(&13).await.is_err());
    assert_eq!(calls.load(Ordering::SeqCst), 3, "errors are not cached");
    let stats = caches[0].cluster_statistics().await.unwrap();
    assert_eq!(stats.loads, 3);
    assert_eq!(stats.load_failures, 2);
    assert_eq!(stats.load_successes, 1);
    assert!(stats.misses >= 60);

    // get_or_insert_with: one-off suppliers.
    let v = caches[2]
        .get_or_insert_with(&100, || async { "supplied".to_string() })
        .await;
    // The cache has a loader: it answers first.
    assert_eq!(v.unwrap(), "loaded 100");
    for g in grids {
        g.shutdown().await;
    }
}

/// Moves every member's store clock ahead by `by`: what expiry sees, with no waiting.
fn advance(grids: &[Grid], by: Duration) {
    for g in grids {
        g.caches().service().advance_clock_for_tests(by);
    }
}

/// Expiry driven by the stores' clock (moved ahead, not waited for): entries are there before
/// their time on every member, gone after it, and reported expired by their owners.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_and_idle_expiry_hold_on_every_member() {
    let grids = data_cluster("c-expiry", 3, |b| b).await;
    let ttl = open::<String>(
        &grids,
        "ttl",
        &CacheSettings::builder()
            .expire_after_write(Duration::from_secs(60))
            .build(),
    )
    .await;
    let mut expired = ttl[2].listen().await;
    for k in 0..20 {
        ttl[k as usize % 3].put(&k, &format!("v{k}")).await.unwrap();
    }
    // Per-entry expiry overrides the cache's.
    ttl[0]
        .put_with(
            &100,
            &"long".into(),
            Expiry::after_write(Duration::from_secs(600)),
        )
        .await
        .unwrap();
    advance(&grids, Duration::from_secs(59));
    for c in &ttl {
        for k in 0..20 {
            assert_eq!(
                c.get(&k).await.unwrap(),
                Some(format!("v{k}")),
                "key {k} before its ttl"
            );
        }
    }
    advance(&grids, Duration::from_secs(2));
    for c in &ttl {
        for k in 0..20 {
            assert_eq!(c.get(&k).await.unwrap(), None, "key {k} outlived its ttl");
            assert!(!c.contains_key(&k).await.unwrap());
        }
        assert_eq!(c.get(&100).await.unwrap(), Some("long".into()));
    }
    // The owners remove expired entries and say so.
    let mut seen = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    while seen < 20 && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(5), expired.recv()).await {
            Ok(Some(CacheEvent::Expired { .. })) => seen += 1,
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    assert_eq!(seen, 20, "expired events");
    assert_eq!(ttl[1].len().await.unwrap(), 1);

    // Idle expiry: reads from any member keep an entry alive; without them it goes. The
    // cache's idle time, and one given to an entry of a cache without expiry.
    let idle = open::<String>(
        &grids,
        "idle",
        &CacheSettings::builder()
            .expire_after_access(Duration::from_secs(60))
            .build(),
    )
    .await;
    let plain = open::<String>(&grids, "per-entry-idle", &CacheSettings::default()).await;
    idle[0].put(&1, &"kept".into()).await.unwrap();
    idle[0].put(&2, &"idle".into()).await.unwrap();
    let per_entry = Expiry::after_access(Duration::from_secs(60));
    plain[0]
        .put_with(&1, &"kept".into(), per_entry)
        .await
        .unwrap();
    plain[0]
        .put_with(&2, &"idle".into(), per_entry)
        .await
        .unwrap();
    plain[0].put(&3, &"forever".into()).await.unwrap();
    // 40 s steps, each ending with a read of key 1 from one member: 120 s in all, never
    // 60 s without a read of key 1, none of key 2.
    for step in 0..3 {
        advance(&grids, Duration::from_secs(40));
        for caches in [&idle, &plain] {
            assert_eq!(
                caches[step].get(&1).await.unwrap(),
                Some("kept".into()),
                "step {step}"
            );
        }
    }
    for caches in [&idle, &plain] {
        for c in caches {
            assert_eq!(
                c.get(&2).await.unwrap(),
                None,
                "idle entry outlived its idle time"
            );
            assert_eq!(c.get(&1).await.unwrap(), Some("kept".into()));
        }
    }
    assert_eq!(plain[1].get(&3).await.unwrap(), Some("forever".into()));
    for g in grids {
        g.shutdown().await;
    }
}

/// `get_or_insert_with` on a cache without a loader: the supplier runs on a miss and its
/// value is stored; a stored value is returned without calling it; of two callers that
/// missed together, the one that stores second gets the first one's value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_or_insert_with_without_a_loader_stores_the_supplied_value() {
    let grids = data_cluster("c-supply", 2, |b| b).await;
    let caches = open::<String>(&grids, "supplied", &CacheSettings::default()).await;
    let v = caches[0]
        .get_or_insert_with(&1, || async { "made".to_string() })
        .await
        .unwrap();
    assert_eq!(v, "made");
    assert_eq!(
        caches[1].get(&1).await.unwrap(),
        Some("made".into()),
        "stored"
    );
    let v = caches[1]
        .get_or_insert_with(&1, || async { panic!("called for a stored value") })
        .await
        .unwrap();
    assert_eq!(v, "made");
    // Two callers miss together (both suppliers run); the first stores, the second gets
    // the first's value rather than its own.
    let both_missed = Arc::new(tokio::sync::Barrier::new(2));
    let (first_stored_tx, first_stored_rx) = tokio::sync::oneshot::channel::<()>();
    let first = {
        let (c, both) = (caches[0].clone(), both_missed.clone());
        tokio::spawn(async move {
            c.get_or_insert_with(&2, || async move {
                both.wait().await;
                "first".to_string()
            })
            .await
        })
    };
    let second = {
        let (c, both) = (caches[1].clone(), both_missed.clone());
        tokio::spawn(async move {
            c.get_or_insert_with(&2, || async move {
                both.wait().await;
                let _ = first_stored_rx.await;
                "second".to_string()
            })
            .await
        })
    };
    assert_eq!(first.await.unwrap().unwrap(), "first");
    first_stored_tx.send(()).unwrap();
    assert_eq!(
        second.await.unwrap().unwrap(),
        "first",
        "the value stored first"
    );
    assert_eq!(caches[1].get(&2).await.unwrap(), Some("first".into()));
    for g in grids {
        g.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_entries_is_never_exceeded_by_more_than_the_documented_slack() {
    let grids = data_cluster("c-max", 3, |b| b.partitions(31)).await;
    let max = 200u32;
    let caches = open::<u32>(
        &grids,
        "bounded",
        &CacheSettings::builder().max_entries(max).build(),
    )
    .await;
    let mut listener = caches[0].listen().await;
    for k in 0..3000u32 {
        caches[k as usize % 3].put(&k, &k).await.unwrap();
    }
    let mut total = 0;
    for (i, c) in caches.iter().enumerate() {
        let stats = c.statistics();
        let table = grids[i].runtime().table();
        let me = grids[i].cluster().local_member().id.clone();
        let owned = table.primaries_per_member().get(&me).copied().unwrap_or(0) as u64;
        // The slack: one entry per owned partition (the bound is per partition, rounded up).
        assert!(
            stats.size <= max as u64 + owned,
            "member {i} holds {} entries, bound {max} + {owned}",
            stats.size
        );
        assert!(
            stats.size >= max as u64 / 2,
            "member {i} evicted too eagerly: {}",
            stats.size
        );
        total += stats.size;
    }
    let evictions = caches[0].cluster_statistics().await.unwrap().evictions;
    assert_eq!(
        total + evictions,
        3000,
        "every entry is either held or evicted"
    );
    // Listeners hear evictions.
    let mut evicted = 0;
    while evicted == 0 {
        match tokio::time::timeout(Duration::from_secs(5), listener.recv()).await {
            Ok(Some(CacheEvent::Evicted { .. })) => evicted += 1,
            Ok(Some(_)) => {}
            _ => panic!("no eviction event"),
        }
    }
    for g in grids {
        g.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicated_cache_converges_after_puts_a_join_and_a_leave() {
    let grids = data_cluster("c-repl", 2, |b| b).await;
    let settings = CacheSettings::builder().mode(CacheMode::Replicated).build();
    let caches = open::<String>(&grids, "repl", &settings).await;
    for k in 0..100u32 {
        caches[k as usize % 2]
            .put(&k, &format!("v{k}"))
            .await
            .unwrap();
    }
    caches[1].remove(&99).await.unwrap();
    for c in &caches {
        let ok = eventually_async(Duration::from_secs(5), || async {
            c.len().await.unwrap() == 99 && c.get(&98).await.unwrap() == Some("v98".into())
        })
        .await;
        assert!(ok, "a replica did not converge after the puts");
    }
    // A member joins and opens the cache: it gets a full copy, then every change.
    let third = member("c-repl", "m2")
        .seed(grids[0].addr())
        .start()
        .await
        .unwrap();
    let mut all = grids.clone();
    all.push(third.clone());
    assert!(common::settled(&all, 3).await);
    let joined = third
        .cache::<u32, String>("repl")
        .settings(settings.clone())
        .await
        .unwrap();
    assert_eq!(joined.len().await.unwrap(), 99);
    assert_eq!(joined.get(&5).await.unwrap(), Some("v5".into()));
    caches[0].put(&500, &"after join".into()).await.unwrap();
    joined
        .put(&501, &"from the new member".into())
        .await
        .unwrap();
    for c in caches.iter().chain([&joined]) {
        let ok = eventually_async(Duration::from_secs(5), || async {
            c.get(&500).await.unwrap() == Some("after join".into())
                && c.get(&501).await.unwrap() == Some("from the new member".into())
        })
        .await;
        assert!(ok, "a replica did not converge after the join");
    }
    // A member leaves: the others keep every entry and keep converging.
    grids[1].shutdown().await;
    let stayers = [&caches[0], &joined];
    assert!(common::settled(&[grids[0].clone(), third.clone()], 2).await);
    joined.put(&502, &"after the leave".into()).await.unwrap();
    for c in stayers {
        let ok = eventually_async(Duration::from_secs(5), || async {
            c.len().await.unwrap() == 102
                && c.get(&502).await.unwrap() == Some("after the leave".into())
        })
        .await;
        assert!(ok, "a replica did not converge after the leave");
    }
    // remove_all clears each partition through its owner; every copy ends empty.
    joined.remove_all().await.unwrap();
    for c in stayers {
        let ok = eventually_async(Duration::from_secs(5), || async {
            c.len().await.unwrap() == 0
        })
        .await;
        assert!(ok, "a replica kept entries after remove_all");
    }
    for g in [&grids[0], &third] {
        g.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_cache_stops_serving_a_value_within_100ms_of_a_put_elsewhere() {
    let grids = data_cluster("c-near", 3, |b| b).await;
    let caches = open::<String>(&grids, "near", &CacheSettings::builder().near().build()).await;
    for k in 0..50u32 {
        caches[0].put(&k, &"old".into()).await.unwrap();
    }
    // Every member reads (and copies) every key.
    for c in &caches {
        for k in 0..50u32 {
            assert_eq!(c.get(&k).await.unwrap(), Some("old".into()));
        }
    }
    let hits_before = caches[1].statistics().hits;
    for k in 0..50u32 {
        caches[1].get(&k).await.unwrap();
    }
    assert_eq!(caches[1].statistics().hits, hits_before + 50);
    for round in 0..20u32 {
        let k = round % 50;
        let value = format!("new {round}");
        caches[round as usize % 3].put(&k, &value).await.unwrap();
        let written = Instant::now();
        for (i, c) in caches.iter().enumerate() {
            let ok = eventually_async(Duration::from_millis(100), || async {
                c.get(&k).await.unwrap() == Some(value.clone())
            })
            .await;
            assert!(
                ok,
                "member {i} still served the old value of {k} {:?} after the put",
                written.elapsed()
            );
        }
    }
    for g in grids {
        g.shutdown().await;
    }
}

/// A key's owner reads its own store, not a near copy: a write acknowledged to another
/// member is what the owner reads next, with no invalidation to wait for. (When owners kept
/// near copies this passed too, mostly: their own invalidation usually won the race with
/// the answer's trip to the writer. A guard of the property, not a reproduction.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_near_cache_on_the_owner_reads_a_write_made_elsewhere_at_once() {
    let grids = data_cluster("c-near-owner", 3, |b| b).await;
    let caches = open::<u32>(&grids, "near", &CacheSettings::builder().near().build()).await;
    let k = key_owned_by(&grids[0]);
    for round in 0..200u32 {
        caches[0].get(&k).await.unwrap();
        caches[1 + round as usize % 2]
            .put(&k, &round)
            .await
            .unwrap();
        assert_eq!(
            caches[0].get(&k).await.unwrap(),
            Some(round),
            "round {round}"
        );
    }
    for g in grids {
        g.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_see_changes_from_other_members_in_order() {
    let grids = data_cluster("c-listen", 3, |b| b).await;
    let caches = open::<u32>(&grids, "events", &CacheSettings::default()).await;
    let mut listener = caches[0].listen().await;
    let mut other = caches[2].listen().await;
    for k in [1u32, 2, 3] {
        let writer = &caches[(k as usize) % 3];
        for v in 0..50u32 {
            writer.put(&k, &v).await.unwrap();
        }
        writer.remove(&k).await.unwrap();
    }
    for l in [&mut listener, &mut other] {
        let mut per_key: std::collections::HashMap<u32, Vec<CacheEvent<u32, u32>>> =
            Default::default();
        for _ in 0..153 {
            let ev = tokio::time::timeout(Duration::from_secs(5), l.recv())
                .await
                .expect("an event within 5 s")
                .expect("listener open");
            let key = match &ev {
                CacheEvent::Added { key, .. }
                | CacheEvent::Updated { key, .. }
                | CacheEvent::Removed { key, .. } => *key,
                other => panic!("unexpected event {other:?}"),
            };
            per_key.entry(key).or_default().push(ev);
        }
        for k in [1u32, 2, 3] {
            let evs = &per_key[&k];
            assert_eq!(evs[0], CacheEvent::Added { key: k, value: 0 });
            for v in 1..50u32 {
                assert_eq!(
                    evs[v as usize],
                    CacheEvent::Updated {
                        key: k,
                        old: v - 1,
                        value: v
                    }
                );
            }
            assert_eq!(evs[50], CacheEvent::Removed { key: k, old: 49 });
        }
    }
    // Dropping a listener unregisters it; the other keeps hearing.
    drop(listener);
    caches[1].put(&9, &9).await.unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(5), other.recv())
        .await
        .unwrap();
    assert_eq!(ev, Some(CacheEvent::Added { key: 9, value: 9 }));
    for g in grids {
        g.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incr_processor_from_3_members_times_64_tasks_times_100_ends_at_19200() {
    let grids = data_cluster("c-incr", 3, |b| b).await;
    let caches = open::<u64>(&grids, "counters", &CacheSettings::default()).await;
    for c in &caches {
        c.register_processor("incr", |entry, by: u64| {
            let next = entry.value().copied().unwrap_or(0) + by;
            entry.set_value(next);
            next
        });
    }
    let mut tasks = Vec::new();
    for c in &caches {
        for _ in 0..64 {
            let c = c.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..100 {
                    let _: u64 = c.execute_on_key(&1, "incr", &1u64).await.unwrap();
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(caches[2].get(&1).await.unwrap(), Some(19_200));
    // Several keys at once, results in order; an unknown processor is an error.
    let out: Vec<u64> = caches[0]
        .execute_on_keys(&[1, 2, 3], "incr", &10u64)
        .await
        .unwrap();
    assert_eq!(out, vec![19_210, 10, 10]);
    assert!(caches[1]
        .execute_on_key::<u64, u64>(&1, "nope", &1)
        .await
        .is_err());
    for g in grids {
        g.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn map_operations_statistics_and_settings() {
    let grids = data_cluster("c-ops", 2, |b| b).await;
    let caches = open::<String>(&grids, "ops", &CacheSettings::default()).await;
    let (a, b) = (&caches[0], &caches[1]);
    a.put_all((0..40u32).map(|k| (k, format!("v{k}"))))
        .await
        .unwrap();
    let got = b.get_all(&[1, 2, 3, 1000]).await.unwrap();
    assert_eq!(got.len(), 3);
    assert_eq!(got[&2], "v2");
    a.set(&41, &"set".into()).await.unwrap();
    assert_eq!(b.remove(&41).await.unwrap(), Some("set".into()));
    assert_eq!(b.replace(&1000, &"x".into()).await.unwrap(), None);
    assert!(!b.contains_key(&1000).await.unwrap());
    assert_eq!(
        b.replace(&1, &"one".into()).await.unwrap(),
        Some("v1".into())
    );
    assert!(!a.replace_if(&1, &"v1".into(), &"uno".into()).await.unwrap());
    assert!(a
        .replace_if(&1, &"one".into(), &"uno".into())
        .await
        .unwrap());
    assert!(!b.remove_if(&1, &"one".into()).await.unwrap());
    assert!(b.remove_if(&1, &"uno".into()).await.unwrap());
    let mut keys = a.keys().await.unwrap();
    keys.sort();
    assert_eq!(keys, (0..40).filter(|k| *k != 1).collect::<Vec<_>>());
    assert_eq!(b.len().await.unwrap(), 39);

    let stats = a.cluster_statistics().await.unwrap();
    assert_eq!(stats.size, 39);
    assert!(stats.heap_size >= 39 * 4);
    assert_eq!(stats.hits, 3, "get_all found three of four");
    assert!(stats.puts >= 42);
    assert_eq!(stats.removes, 2, "remove and remove_if");

    a.remove_all().await.unwrap();
    assert_eq!(b.len().await.unwrap(), 0);
    let fixed = grids[0]
        .cache::<u32, u32>("fixed")
        .settings(
            CacheSettings::builder()
                .flushable(false)
                .statistics(false)
                .build(),
        )
        .await
        .unwrap();
    assert!(matches!(
        fixed.remove_all().await,
        Err(GridError::NotAllowed(_))
    ));
    fixed.put(&1, &1).await.unwrap();
    assert_eq!(fixed.get(&1).await.unwrap(), Some(1));
    assert_eq!(fixed.statistics().hits, 0, "statistics off");

    // A loader that panics is an error for its callers, and does not poison the key.
    let panicky = grids[1]
        .cache::<u32, u32>("panicky")
        .loader(|k: u32| async move {
            if k == 1 {
                panic!("loader bug");
            }
            Ok::<_, String>(Some(k))
        })
        .await
        .unwrap();
    for _ in 0..2 {
        assert!(matches!(
            panicky.get(&1).await,
            Err(GridError::Loader { .. })
        ));
    }
    assert_eq!(panicky.get(&2).await.unwrap(), Some(2));

    // Same name, other settings: refused on any member.
    let clash = grids[1]
        .cache::<u32, u32>("fixed")
        .settings(CacheSettings::builder().max_entries(5).build())
        .await;
    assert!(
        matches!(clash, Err(GridError::SettingsConflict { .. })),
        "{clash:?}"
    );

    // A cached reference: computed once across the cluster, reset everywhere.
    let computed = Arc::new(AtomicU32::new(0));
    let mut refs = Vec::new();
    for g in &grids {
        let computed = computed.clone();
        refs.push(
            g.cached_reference("answer", move || {
                let computed = computed.clone();
                async move { Ok::<_, String>(40 + computed.fetch_add(1, Ordering::SeqCst) + 2) }
            })
            .await
            .unwrap(),
        );
    }
    assert_eq!(refs[0].get().await.unwrap(), 42);
    assert_eq!(refs[1].get().await.unwrap(), 42);
    refs[1].reset().await.unwrap();
    assert_eq!(refs[0].get().await.unwrap(), 43);
    for g in grids {
        g.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_cache_never_leaves_the_member() {
    let grids = data_cluster("c-local", 2, |b| b).await;
    let settings = CacheSettings::builder().local().max_entries(10).build();
    let caches = open::<u32>(&grids, "mine", &settings).await;
    let mut events = caches[0].listen().await;
    for k in 0..20 {
        caches[0].put(&k, &k).await.unwrap();
    }
    assert_eq!(caches[0].len().await.unwrap(), 10, "bounded at max_entries");
    assert_eq!(
        caches[1].len().await.unwrap(),
        0,
        "the other member's copy is its own"
    );
    assert_eq!(caches[1].get(&19).await.unwrap(), None);
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(1), events.recv())
            .await
            .unwrap(),
        Some(CacheEvent::Added { key: 0, value: 0 })
    );
    caches[0].register_processor("double", |e, (): ()| {
        let v = e.value().copied().unwrap_or(1) * 2;
        e.set_value(v);
        v
    });
    let v: u32 = caches[0].execute_on_key(&19, "double", &()).await.unwrap();
    assert_eq!(v, 38);
    assert_eq!(caches[0].statistics().evictions, 10);
    for g in grids {
        g.shutdown().await;
    }
}

/// Events dropped before they left the owner (its outbox full) reach the owner's own copies
/// and listeners as `Lost` too: its replicated copy (read locally) refills rather than keep
/// the old value, and its listener hears of the gap. (Before, only other members did.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_dropped_at_a_full_outbox_reach_the_owners_own_copies() {
    let grids = data_cluster("c-dropped", 2, |b| b).await;
    let repl = open::<String>(
        &grids,
        "dropped-repl",
        &CacheSettings::builder().mode(CacheMode::Replicated).build(),
    )
    .await;
    let mut listener = repl[0].listen().await;
    let key = key_owned_by(&grids[0]);
    repl[0].put(&key, &"old".into()).await.unwrap();
    assert!(
        eventually_async(Duration::from_secs(5), || async {
            repl[0].get(&key).await.unwrap().as_deref() == Some("old")
        })
        .await
    );
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(300), listener.recv()).await
    {
    }
    grids[0].caches().drop_next_events(1);
    repl[0].put(&key, &"new".into()).await.unwrap();
    for (i, c) in repl.iter().enumerate() {
        assert!(
            eventually_async(Duration::from_secs(3), || async {
                c.get(&key).await.unwrap().as_deref() == Some("new")
            })
            .await,
            "member {i} kept the value a dropped event had changed"
        );
    }
    let heard = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            match listener.recv().await {
                Some(CacheEvent::Lost) => return true,
                Some(_) => continue,
                None => return false,
            }
        }
    })
    .await;
    assert_eq!(heard, Ok(true), "the owner's listener heard no Lost");
    for g in grids {
        g.shutdown().await;
    }
}

/// Events lost on the way (a failed send) are noticed by the batch numbering: the near copy
/// that missed an invalidation empties itself, the replicated copy fills again, and a
/// listener hears `Lost` — rather than serving the old value until something else changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_events_empty_near_copies_refill_replicated_ones_and_reach_listeners() {
    let grids = data_cluster("c-lost", 2, |b| b).await;
    let near = open::<String>(
        &grids,
        "lost-near",
        &CacheSettings::builder().near().build(),
    )
    .await;
    let repl = open::<String>(
        &grids,
        "lost-repl",
        &CacheSettings::builder().mode(CacheMode::Replicated).build(),
    )
    .await;
    let mut listener = repl[1].listen().await;
    // A key member 0 owns: its events reach member 1 only over the network.
    let key = key_owned_by(&grids[0]);
    near[0].put(&key, &"old".into()).await.unwrap();
    repl[0].put(&key, &"old".into()).await.unwrap();
    // Whether member 1's near and replicated caches both give `value` for `key` in time.
    let member1_sees = |value: &'static str, within: Duration| {
        let (near, repl) = (&near[1], &repl[1]);
        eventually_async(within, move || async move {
            near.get(&key).await.unwrap().as_deref() == Some(value)
                && repl.get(&key).await.unwrap().as_deref() == Some(value)
        })
    };
    assert!(
        member1_sees("old", Duration::from_secs(5)).await,
        "member 1 never saw the first value"
    );
    // Drain the listener's events so far.
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(300), listener.recv()).await
    {
    }

    // Member 0's next batches to member 1 fail: the changes' events never arrive.
    grids[0].caches().fail_next_event_batches(2);
    near[0].put(&key, &"new".into()).await.unwrap();
    repl[0].put(&key, &"new".into()).await.unwrap();
    // No other change follows: the gap must still be noticed (an empty batch shows it).
    assert!(
        member1_sees("new", Duration::from_secs(3)).await,
        "member 1 kept serving the value a lost event had changed"
    );
    let mut heard_lost = false;
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_secs(2), listener.recv()).await {
        if matches!(ev, CacheEvent::Lost) {
            heard_lost = true;
            break;
        }
    }
    assert!(
        heard_lost,
        "the listener was not told that events were lost"
    );
    for g in grids {
        g.shutdown().await;
    }
}

/// An interest announcement that did not arrive leaves the owner not sending events, which no
/// numbering can show; the announcement is repeated, and when it gets through the near copy
/// empties itself (it may hold what changed meanwhile).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_interest_announcement_is_repeated_and_the_copy_repaired() {
    let grids = data_cluster("c-interest", 2, |b| b).await;
    let settings = CacheSettings::builder().near().build();
    let owner = grids[0]
        .cache::<u32, String>("i-near")
        .settings(settings.clone())
        .await
        .unwrap();
    // Member 1's announcement (to member 0, its only peer) is lost.
    grids[1].caches().fail_next_interest_announcements(1);
    let reader = grids[1]
        .cache::<u32, String>("i-near")
        .settings(settings)
        .await
        .unwrap();
    let key = key_owned_by(&grids[0]);
    owner.put(&key, &"old".into()).await.unwrap();
    assert_eq!(reader.get(&key).await.unwrap(), Some("old".into()));
    owner.put(&key, &"new".into()).await.unwrap();
    // Announcements are repeated every 5 s.
    let ok = eventually_async(Duration::from_secs(12), || async {
        reader.get(&key).await.unwrap() == Some("new".into())
    })
    .await;
    assert!(
        ok,
        "member 1 kept serving a value changed while its interest was unknown"
    );
    for g in grids {
        g.shutdown().await;
    }
}
