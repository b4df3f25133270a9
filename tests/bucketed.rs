//! The bucketed executor on in-process clusters: order per bucket from several submitters,
//! exclusivity under 3 members x 16 concurrent batches, a kill of the owner mid-batch,
//! retries then the dead letter, per-node and per-cluster concurrency measured, a full
//! queue, a member without the processor, settings conflicts, and `shutdown`.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use grid::{Batch, BucketedSettings, Concurrency, ExecError, FullQueue, Grid};
use serde::{Deserialize, Serialize};

use common::{data_cluster, eventually, settled};

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
struct Job {
    bucket: u32,
    submitter: u32,
    n: u32,
}

fn by_bucket(j: &Job) -> u32 {
    j.bucket
}

/// What processors saw: (member, bucket, tasks, attempt), in the order they ran.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<Run>>>);

/// One `process` call: member, bucket, tasks, attempt.
type Run = (String, u32, Vec<Job>, u32);
/// A dead letter: bucket, tasks, attempts, error.
type Dead = (u32, Vec<Job>, u32, String);

impl Seen {
    fn tasks(&self) -> Vec<Job> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .flat_map(|(_, _, t, _)| t.clone())
            .collect()
    }
    fn count(&self) -> usize {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|(_, _, t, _)| t.len())
            .sum()
    }
}

/// A processor that records what it saw on `member`, taking `work` per batch.
fn recording(
    settings: BucketedSettings<Job, u32>,
    seen: &Seen,
    member: &str,
    work: Duration,
) -> BucketedSettings<Job, u32> {
    let seen = seen.clone();
    let member = member.to_string();
    settings.processor(move |batch: Batch<Job, u32>| {
        let seen = seen.clone();
        let member = member.clone();
        async move {
            if !work.is_zero() {
                tokio::time::sleep(work).await;
            }
            seen.0
                .lock()
                .unwrap()
                .push((member, batch.bucket, batch.tasks, batch.attempt));
            Ok::<(), String>(())
        }
    })
}

fn id(g: &Grid) -> String {
    g.runtime().member_id().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tasks_of_a_bucket_are_processed_in_order_from_several_submitters() {
    let grids = data_cluster("exec-order", 3, |b| b.partitions(31).backups(1)).await;
    let seen = Seen::default();
    let mut execs = Vec::new();
    for g in &grids {
        let s = recording(
            BucketedSettings::new(by_bucket).batch_size(7),
            &seen,
            &id(g),
            Duration::ZERO,
        );
        execs.push(g.bucketed_executor("order", s).await.unwrap());
    }
    let mut submitters = Vec::new();
    for (s, exec) in execs.iter().enumerate() {
        let exec = exec.clone();
        submitters.push(tokio::spawn(async move {
            for n in 0..40u32 {
                for bucket in 0..10u32 {
                    exec.submit(Job {
                        bucket,
                        submitter: s as u32,
                        n,
                    })
                    .await
                    .unwrap();
                }
            }
        }));
    }
    for s in submitters {
        s.await.unwrap();
    }
    assert!(
        eventually(Duration::from_secs(60), || seen.count() >= 1_200).await,
        "only {} of 1200 tasks processed",
        seen.count()
    );
    // Each bucket's tasks in its processing order: per submitter, increasing.
    let mut per_bucket: BTreeMap<u32, Vec<Job>> = BTreeMap::new();
    for t in seen.tasks() {
        per_bucket.entry(t.bucket).or_default().push(t);
    }
    for (bucket, tasks) in per_bucket {
        assert_eq!(tasks.len(), 120, "bucket {bucket}: lost or doubled tasks");
        for s in 0..3 {
            let ns: Vec<u32> = tasks
                .iter()
                .filter(|t| t.submitter == s)
                .map(|t| t.n)
                .collect();
            assert_eq!(
                ns,
                (0..40).collect::<Vec<_>>(),
                "bucket {bucket}, submitter {s}"
            );
        }
    }
    let stats = execs[0].cluster_statistics(Duration::from_secs(5)).await;
    assert!(stats.missing.is_empty(), "{:?}", stats.missing);
    assert_eq!(stats.total.processed, 1_200);
    assert_eq!(stats.total.submitted, 1_200);
    assert!(
        eventually(Duration::from_secs(10), || {
            grids.iter().map(|g| execs_queued(g, "order")).sum::<u64>() == 0
        })
        .await
    );
}

/// `submit_all` from three members at once: every task once, each submitter's tasks in
/// order within each bucket, and the statistics count them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn submit_all_queues_every_task_in_order_from_several_submitters() {
    let grids = data_cluster("exec-submit-all", 3, |b| b.partitions(31).backups(1)).await;
    let seen = Seen::default();
    let mut execs = Vec::new();
    for g in &grids {
        let s = recording(
            BucketedSettings::new(by_bucket).batch_size(50),
            &seen,
            &id(g),
            Duration::ZERO,
        );
        execs.push(g.bucketed_executor("submit-all", s).await.unwrap());
    }
    let mut submitters = Vec::new();
    for (s, exec) in execs.iter().enumerate() {
        let exec = exec.clone();
        submitters.push(tokio::spawn(async move {
            // Four calls of 100 tasks (10 per bucket), each awaited before the next.
            for round in 0..4u32 {
                let tasks = (0..100u32).map(|i| Job {
                    bucket: i % 10,
                    submitter: s as u32,
                    n: round * 10 + i / 10,
                });
                exec.submit_all(tasks).await.unwrap();
            }
        }));
    }
    for s in submitters {
        s.await.unwrap();
    }
    assert!(
        eventually(Duration::from_secs(60), || seen.count() >= 1_200).await,
        "only {} of 1200 tasks processed",
        seen.count()
    );
    let mut per_bucket: BTreeMap<u32, Vec<Job>> = BTreeMap::new();
    for t in seen.tasks() {
        per_bucket.entry(t.bucket).or_default().push(t);
    }
    for (bucket, tasks) in per_bucket {
        assert_eq!(tasks.len(), 120, "bucket {bucket}: lost or doubled tasks");
        for s in 0..3 {
            let ns: Vec<u32> = tasks
                .iter()
                .filter(|t| t.submitter == s)
                .map(|t| t.n)
                .collect();
            assert_eq!(
                ns,
                (0..40).collect::<Vec<_>>(),
                "bucket {bucket}, submitter {s}"
            );
        }
    }
    let stats = execs[0].cluster_statistics(Duration::from_secs(5)).await;
    assert_eq!(stats.total.submitted, 1_200);
    assert_eq!(stats.total.processed, 1_200);
}

fn execs_queued(g: &Grid, name: &str) -> u64 {
    g.bucketed_executors().service().statistics(name).queued
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_exclusivity_detector_never_fires_under_3_members_times_16_processors() {
    let grids = data_cluster("exec-exclusive", 3, |b| b.partitions(31).backups(1)).await;
    let busy: Arc<Mutex<HashSet<u32>>> = Arc::default();
    let fired = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let active = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let mut execs = Vec::new();
    for g in &grids {
        let (busy, fired, done, active, most) = (
            busy.clone(),
            fired.clone(),
            done.clone(),
            active.clone(),
            most.clone(),
        );
        let s = BucketedSettings::new(by_bucket)
            .batch_size(3)
            .max_concurrency(16, Concurrency::PerNode)
            .processor(move |batch: Batch<Job, u32>| {
                let (busy, fired, done, active, most) = (
                    busy.clone(),
                    fired.clone(),
                    done.clone(),
                    active.clone(),
                    most.clone(),
                );
                async move {
                    if !busy.lock().unwrap().insert(batch.bucket) {
                        fired.fetch_add(1, Ordering::SeqCst);
                    }
                    let now = active.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(1 + (batch.tasks[0].n % 4) as u64))
                        .await;
                    active.fetch_sub(1, Ordering::SeqCst);
                    busy.lock().unwrap().remove(&batch.bucket);
                    done.fetch_add(batch.tasks.len(), Ordering::SeqCst);
                    Ok::<(), String>(())
                }
            });
        execs.push(g.bucketed_executor("exclusive", s).await.unwrap());
    }
    let mut submitters = Vec::new();
    for (s, exec) in execs.iter().enumerate() {
        for lane in 0..8u32 {
            let exec = exec.clone();
            submitters.push(tokio::spawn(async move {
                for n in 0..25u32 {
                    for b in 0..8u32 {
                        let bucket = lane * 8 + b;
                        exec.submit(Job {
                            bucket,
                            submitter: s as u32,
                            n,
                        })
                        .await
                        .unwrap();
                    }
                }
            }));
        }
    }
    for s in submitters {
        s.await.unwrap();
    }
    let total = 3 * 8 * 25 * 8;
    assert!(
        eventually(Duration::from_secs(120), || done.load(Ordering::SeqCst)
            >= total)
        .await,
        "only {} of {total} processed",
        done.load(Ordering::SeqCst)
    );
    assert_eq!(
        fired.load(Ordering::SeqCst),
        0,
        "two batches of one bucket overlapped"
    );
    assert!(
        most.load(Ordering::SeqCst) > 3,
        "the test never ran batches concurrently ({})",
        most.load(Ordering::SeqCst)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_kill_of_the_owner_mid_batch_loses_nothing() {
    let mut grids = data_cluster("exec-kill", 3, |b| b.partitions(31).backups(1)).await;
    let seen = Seen::default();
    let running = Arc::new(AtomicBool::new(false));
    let mut execs = Vec::new();
    for g in &grids {
        let seen = seen.clone();
        let member = id(g);
        let running = running.clone();
        let s = BucketedSettings::new(by_bucket).batch_size(5).processor(
            move |batch: Batch<Job, u32>| {
                let seen = seen.clone();
                let member = member.clone();
                let running = running.clone();
                async move {
                    running.store(true, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    seen.0
                        .lock()
                        .unwrap()
                        .push((member, batch.bucket, batch.tasks, batch.attempt));
                    Ok::<(), String>(())
                }
            },
        );
        execs.push(g.bucketed_executor("kill", s).await.unwrap());
    }
    // Buckets whose partition m0 owns: m0 processes them itself.
    let m0 = id(&grids[0]);
    let owned: Vec<u32> = (0..2_000u32)
        .filter(|b| {
            let key = grid::codec::encode(b).unwrap();
            let mut k = b"kill".to_vec();
            k.push(0);
            k.extend_from_slice(&key);
            let p = grids[0].runtime().partition_of(&k);
            grids[0].runtime().table().owner(p).map(|o| o.to_string()) == Some(m0.clone())
        })
        .take(6)
        .collect();
    assert_eq!(owned.len(), 6);
    let mut acked = Vec::new();
    for n in 0..20u32 {
        for &bucket in &owned {
            let job = Job {
                bucket,
                submitter: 1,
                n,
            };
            execs[1].submit(job.clone()).await.unwrap();
            acked.push(job);
        }
    }
    assert!(eventually(Duration::from_secs(10), || running.load(Ordering::SeqCst)).await);
    // m0 dies with batches in flight on itself.
    let victim = grids.remove(0);
    victim.kill();
    drop(victim);
    assert!(settled(&grids, 2).await);
    let want: HashSet<Job> = acked.iter().cloned().collect();
    assert!(
        eventually(Duration::from_secs(90), || {
            let got: HashSet<Job> = seen.tasks().into_iter().collect();
            want.is_subset(&got)
        })
        .await,
        "acknowledged tasks lost: {} of {} processed",
        seen.tasks()
            .into_iter()
            .collect::<HashSet<_>>()
            .intersection(&want)
            .count(),
        want.len()
    );
    // The survivors end with empty queues, and the batches lost with m0 came again.
    assert!(
        eventually(Duration::from_secs(30), || {
            grids.iter().map(|g| execs_queued(g, "kill")).sum::<u64>() == 0
        })
        .await
    );
    let runs = seen.0.lock().unwrap().clone();
    assert!(
        runs.iter()
            .any(|(m, _, _, attempt)| *m != m0 && *attempt >= 2),
        "no batch was taken over from the dead member"
    );
    // Order per bucket on the survivors' runs: each bucket's tasks increase, apart from
    // the batch offered again.
    for &bucket in &owned {
        let ns: Vec<u32> = runs
            .iter()
            .filter(|(m, b, _, _)| *m != m0 && *b == bucket)
            .flat_map(|(_, _, t, _)| t.iter().map(|j| j.n))
            .collect();
        assert!(
            ns.windows(2).all(|w| w[0] < w[1]),
            "bucket {bucket}: {ns:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_keeps_failing_is_tried_max_attempts_times_then_dead_lettered() {
    let grids = data_cluster("exec-dead", 2, |b| b.partitions(31).backups(1)).await;
    let attempts: Arc<Mutex<Vec<(u32, u32)>>> = Arc::default();
    let dead: Arc<Mutex<Vec<Dead>>> = Arc::default();
    let mut execs = Vec::new();
    for g in &grids {
        let (attempts, dead) = (attempts.clone(), dead.clone());
        let s = BucketedSettings::new(by_bucket)
            .max_attempts(3)
            .retry_delay(Duration::from_millis(50))
            .processor(move |batch: Batch<Job, u32>| {
                let attempts = attempts.clone();
                async move {
                    let n = batch.tasks[0].n;
                    attempts.lock().unwrap().push((n, batch.attempt));
                    if n == 0 {
                        return Err(format!("poison {n}"));
                    }
                    if n == 1 && batch.attempt == 1 {
                        panic!("a panic is a failure too");
                    }
                    Ok(())
                }
            })
            .on_dead_letter(move |d| {
                dead.lock()
                    .unwrap()
                    .push((d.bucket, d.tasks, d.attempts, d.error));
            });
        execs.push(g.bucketed_executor("dead", s).await.unwrap());
    }
    for n in 0..3 {
        execs[0]
            .submit(Job {
                bucket: 9,
                submitter: 0,
                n,
            })
            .await
            .unwrap();
    }
    assert!(
        eventually(Duration::from_secs(30), || {
            attempts.lock().unwrap().iter().any(|(n, _)| *n == 2)
        })
        .await
    );
    let attempts = attempts.lock().unwrap().clone();
    // In order: the poison three times, then the panicking one twice, then the last.
    assert_eq!(
        attempts,
        vec![(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (2, 1)]
    );
    let dead = dead.lock().unwrap().clone();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].0, 9);
    assert_eq!(dead[0].1[0].n, 0);
    assert_eq!(dead[0].2, 3);
    assert!(dead[0].3.contains("poison 0"), "{}", dead[0].3);
    let stats = execs[0].cluster_statistics(Duration::from_secs(5)).await;
    assert_eq!(stats.total.dead_lettered, 1);
    assert_eq!(stats.total.failed, 4);
    assert_eq!(stats.total.retried, 3);
    assert_eq!(stats.total.processed, 2);
}

/// Runs 40 single-task buckets with `limit` on 3 members; returns the most batches seen at
/// once per member and in the cluster.
async fn measure_concurrency(cluster: &str, n: u32, mode: Concurrency) -> (usize, usize) {
    let grids = data_cluster(cluster, 3, |b| b.partitions(31).backups(1)).await;
    let cluster_now = Arc::new(AtomicUsize::new(0));
    let cluster_most = Arc::new(AtomicUsize::new(0));
    let member_most = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let mut execs = Vec::new();
    for g in &grids {
        let member_now = Arc::new(AtomicUsize::new(0));
        let (cluster_now, cluster_most, member_most, done) = (
            cluster_now.clone(),
            cluster_most.clone(),
            member_most.clone(),
            done.clone(),
        );
        let s = BucketedSettings::new(by_bucket)
            .max_concurrency(n, mode)
            .processor(move |_batch: Batch<Job, u32>| {
                let (member_now, cluster_now, cluster_most, member_most, done) = (
                    member_now.clone(),
                    cluster_now.clone(),
                    cluster_most.clone(),
                    member_most.clone(),
                    done.clone(),
                );
                async move {
                    member_most.fetch_max(
                        member_now.fetch_add(1, Ordering::SeqCst) + 1,
                        Ordering::SeqCst,
                    );
                    cluster_most.fetch_max(
                        cluster_now.fetch_add(1, Ordering::SeqCst) + 1,
                        Ordering::SeqCst,
                    );
                    tokio::time::sleep(Duration::from_millis(60)).await;
                    member_now.fetch_sub(1, Ordering::SeqCst);
                    cluster_now.fetch_sub(1, Ordering::SeqCst);
                    done.fetch_add(1, Ordering::SeqCst);
                    Ok::<(), String>(())
                }
            });
        execs.push(g.bucketed_executor("limits", s).await.unwrap());
    }
    // Every member knows every other's processor before the load starts.
    assert!(
        eventually(Duration::from_secs(10), || grids.iter().all(|g| g
            .bucketed_executors()
            .service()
            .processors("limits")
            .len()
            == 3))
        .await
    );
    let subs = (0..40u32).map(|bucket| {
        let exec = execs[bucket as usize % 3].clone();
        async move {
            exec.submit(Job {
                bucket,
                submitter: 0,
                n: 0,
            })
            .await
        }
    });
    for r in futures::future::join_all(subs).await {
        r.unwrap();
    }
    assert!(
        eventually(Duration::from_secs(60), || done.load(Ordering::SeqCst)
            == 40)
        .await
    );
    (
        member_most.load(Ordering::SeqCst),
        cluster_most.load(Ordering::SeqCst),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn per_node_concurrency_is_held() {
    let (member, cluster) = measure_concurrency("exec-per-node", 2, Concurrency::PerNode).await;
    assert!(member <= 2, "{member} batches at once on one member");
    assert!(member == 2, "the limit was never reached ({member})");
    assert!(cluster <= 6, "{cluster} at once in the cluster");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn per_cluster_concurrency_is_held() {
    // 3 per cluster over 3 members with the processor: 1 each.
    let (member, cluster) =
        measure_concurrency("exec-per-cluster", 3, Concurrency::PerCluster).await;
    assert_eq!(member, 1, "{member} batches at once on one member");
    assert!(cluster <= 3, "{cluster} at once in the cluster");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_and_a_waiting_submit_gives_up_at_its_deadline() {
    let grids = data_cluster("exec-full", 2, |b| b.partitions(31).backups(1)).await;
    // No processor anywhere: nothing drains.
    let exec = grids[0]
        .bucketed_executor(
            "full",
            BucketedSettings::new(by_bucket).max_queued_per_bucket(5),
        )
        .await
        .unwrap();
    for n in 0..5 {
        exec.submit(Job {
            bucket: 1,
            submitter: 0,
            n,
        })
        .await
        .unwrap();
    }
    let e = exec
        .submit(Job {
            bucket: 1,
            submitter: 0,
            n: 5,
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            ExecError::QueueFull {
                queued: 5,
                limit: 5,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("queue full"), "{e}");
    // Another bucket still has room.
    exec.submit(Job {
        bucket: 2,
        submitter: 0,
        n: 0,
    })
    .await
    .unwrap();
    let waiting = grids[1]
        .bucketed_executor(
            "full",
            BucketedSettings::new(by_bucket).max_queued_per_bucket(5),
        )
        .await
        .unwrap();
    let waiting_settings = BucketedSettings::new(by_bucket)
        .max_queued_per_bucket(5)
        .when_full(FullQueue::Wait(Duration::from_millis(300)));
    let waiting2 = grids[1]
        .bucketed_executor("full-wait", waiting_settings)
        .await
        .unwrap();
    for n in 0..5 {
        waiting2
            .submit(Job {
                bucket: 1,
                submitter: 1,
                n,
            })
            .await
            .unwrap();
    }
    let started = tokio::time::Instant::now();
    let e = waiting2
        .submit(Job {
            bucket: 1,
            submitter: 1,
            n: 5,
        })
        .await
        .unwrap_err();
    assert!(matches!(e, ExecError::QueueFull { .. }));
    assert!(started.elapsed() >= Duration::from_millis(200));
    // The per-member bound.
    let member_bound = grids[0]
        .bucketed_executor(
            "member-bound",
            BucketedSettings::new(by_bucket).max_queued_per_member(3),
        )
        .await
        .unwrap();
    let mut refused = 0;
    for bucket in 0..40 {
        if let Err(ExecError::QueueFull { scope, .. }) = member_bound
            .submit(Job {
                bucket,
                submitter: 0,
                n: 0,
            })
            .await
        {
            assert_eq!(scope, "member");
            refused += 1;
        }
    }
    // Two members own the partitions: at most 3 tasks queued on each.
    assert_eq!(refused, 40 - 6);
    drop(waiting);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_without_the_processor_never_processes() {
    let grids = data_cluster("exec-noproc", 3, |b| b.partitions(31).backups(1)).await;
    let seen = Seen::default();
    let m0 = id(&grids[0]);
    let mut execs = vec![grids[0]
        .bucketed_executor(
            "noproc",
            recording(BucketedSettings::new(by_bucket), &seen, &m0, Duration::ZERO),
        )
        .await
        .unwrap()];
    for g in &grids[1..] {
        execs.push(
            g.bucketed_executor("noproc", BucketedSettings::new(by_bucket))
                .await
                .unwrap(),
        );
    }
    for (s, exec) in execs.iter().enumerate() {
        for bucket in 0..30 {
            exec.submit(Job {
                bucket,
                submitter: s as u32,
                n: 0,
            })
            .await
            .unwrap();
        }
    }
    assert!(
        eventually(Duration::from_secs(30), || seen.count() == 90).await,
        "{} of 90 processed",
        seen.count()
    );
    let stats = execs[0].cluster_statistics(Duration::from_secs(5)).await;
    for s in &stats.members {
        if s.member == m0 {
            assert_eq!(s.processed, 90);
        } else {
            assert_eq!(s.processed, 0, "{} processed without a processor", s.member);
            assert_eq!(s.processing, 0);
        }
    }
    // Some of those buckets live on the others' partitions: they were sent to m0.
    let owners: HashSet<String> = (0..30u32)
        .filter_map(|b| {
            let mut k = b"noproc".to_vec();
            k.push(0);
            k.extend_from_slice(&grid::codec::encode(&b).unwrap());
            let p = grids[0].runtime().partition_of(&k);
            grids[0].runtime().table().owner(p).map(|o| o.to_string())
        })
        .collect();
    assert!(owners.len() > 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_name_is_the_same_executor_and_other_settings_conflict() {
    let grids = data_cluster("exec-conflict", 2, |b| b.partitions(31).backups(1)).await;
    let a = grids[0]
        .bucketed_executor("same", BucketedSettings::new(by_bucket).batch_size(4))
        .await
        .unwrap();
    let again = grids[0]
        .bucketed_executor("same", BucketedSettings::new(by_bucket).batch_size(4))
        .await
        .unwrap();
    assert_eq!(a.name(), again.name());
    // Another member, other settings: a clear error.
    let e = grids[1]
        .bucketed_executor("same", BucketedSettings::new(by_bucket).batch_size(5))
        .await
        .unwrap_err();
    assert!(matches!(e, ExecError::SettingsConflict { .. }), "{e}");
    assert!(e.to_string().contains("batch_size=4"), "{e}");
    // This member, other types.
    let e = grids[0]
        .bucketed_executor(
            "same",
            BucketedSettings::new(|s: &String| s.clone()).batch_size(4),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, ExecError::Conflict { .. }), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_shutdown_a_member_stops_processing_and_the_others_take_over() {
    let grids = data_cluster("exec-shutdown", 2, |b| b.partitions(31).backups(1)).await;
    let seen = Seen::default();
    let mut execs = Vec::new();
    for g in &grids {
        let s = recording(
            BucketedSettings::new(by_bucket),
            &seen,
            &id(g),
            Duration::ZERO,
        );
        execs.push(g.bucketed_executor("stop", s).await.unwrap());
    }
    let m1 = id(&grids[1]);
    execs[0].shutdown();
    assert!(
        eventually(Duration::from_secs(10), || grids[1]
            .bucketed_executors()
            .service()
            .processors("stop")
            == vec![m1.clone()])
        .await
    );
    for bucket in 0..20 {
        execs[0]
            .submit(Job {
                bucket,
                submitter: 0,
                n: 0,
            })
            .await
            .unwrap();
    }
    assert!(eventually(Duration::from_secs(30), || seen.count() == 20).await);
    let members: HashMap<String, usize> =
        seen.0
            .lock()
            .unwrap()
            .iter()
            .fold(HashMap::new(), |mut m, (member, _, _, _)| {
                *m.entry(member.clone()).or_default() += 1;
                m
            });
    assert_eq!(members.keys().cloned().collect::<Vec<_>>(), vec![m1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_task_runs_after_its_delay() {
    let grids = data_cluster("exec-schedule", 1, |b| b.partitions(31).backups(0)).await;
    let seen = Seen::default();
    let exec = grids[0]
        .bucketed_executor(
            "later",
            recording(
                BucketedSettings::new(by_bucket),
                &seen,
                "m0",
                Duration::ZERO,
            ),
        )
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    exec.schedule(
        Job {
            bucket: 1,
            submitter: 0,
            n: 1,
        },
        Duration::from_millis(300),
    )
    .await
    .unwrap();
    exec.submit(Job {
        bucket: 1,
        submitter: 0,
        n: 0,
    })
    .await
    .unwrap();
    assert!(eventually(Duration::from_secs(10), || seen.count() == 2).await);
    assert!(started.elapsed() >= Duration::from_millis(300));
    let ns: Vec<u32> = seen.tasks().iter().map(|j| j.n).collect();
    assert_eq!(ns, vec![0, 1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_migration_under_load_keeps_order_and_exclusivity_and_loses_nothing() {
    let mut grids = data_cluster("exec-migrate", 2, |b| b.partitions(31).backups(1)).await;
    let busy: Arc<Mutex<HashSet<u32>>> = Arc::default();
    let fired = Arc::new(AtomicU64::new(0));
    let seen = Seen::default();
    let open = |g: Grid, busy: Arc<Mutex<HashSet<u32>>>, fired: Arc<AtomicU64>, seen: Seen| async move {
        let member = id(&g);
        let s = BucketedSettings::new(by_bucket).batch_size(4).processor(
            move |batch: Batch<Job, u32>| {
                let (busy, fired, seen, member) =
                    (busy.clone(), fired.clone(), seen.clone(), member.clone());
                async move {
                    if !busy.lock().unwrap().insert(batch.bucket) {
                        fired.fetch_add(1, Ordering::SeqCst);
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    busy.lock().unwrap().remove(&batch.bucket);
                    seen.0
                        .lock()
                        .unwrap()
                        .push((member, batch.bucket, batch.tasks, batch.attempt));
                    Ok::<(), String>(())
                }
            },
        );
        g.bucketed_executor("migrate", s).await.unwrap()
    };
    let mut execs = Vec::new();
    for g in &grids {
        execs.push(open(g.clone(), busy.clone(), fired.clone(), seen.clone()).await);
    }
    let producer = {
        let exec = execs[0].clone();
        tokio::spawn(async move {
            for n in 0..60u32 {
                for bucket in 0..20u32 {
                    exec.submit(Job {
                        bucket,
                        submitter: 0,
                        n,
                    })
                    .await
                    .unwrap();
                }
            }
        })
    };
    // A third member joins mid-load: partitions (and their queues, batches in flight
    // included) migrate to it.
    assert!(eventually(Duration::from_secs(30), || seen.count() > 100).await);
    let joined = common::member("exec-migrate", "m2")
        .partitions(31)
        .backups(1)
        .seed(grids[0].addr())
        .start()
        .await
        .unwrap();
    execs.push(open(joined.clone(), busy.clone(), fired.clone(), seen.clone()).await);
    grids.push(joined);
    producer.await.unwrap();
    assert!(settled(&grids, 3).await);
    assert!(
        eventually(Duration::from_secs(60), || {
            seen.tasks().into_iter().collect::<HashSet<_>>().len() == 1_200
        })
        .await,
        "{} of 1200 processed",
        seen.tasks().into_iter().collect::<HashSet<_>>().len()
    );
    assert_eq!(
        fired.load(Ordering::SeqCst),
        0,
        "two batches of one bucket overlapped"
    );
    // A migration is no fault: exactly once, in order.
    assert_eq!(seen.count(), 1_200, "a task was processed twice");
    let mut per_bucket: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for t in seen.tasks() {
        per_bucket.entry(t.bucket).or_default().push(t.n);
    }
    for (bucket, ns) in per_bucket {
        assert_eq!(ns, (0..60).collect::<Vec<_>>(), "bucket {bucket}");
    }
}
