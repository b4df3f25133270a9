//! The member executor on an in-process cluster: a task on one member, on all members
//! (with a dead member in the set), on the owner of a key; errors, timeouts and
//! cancellation reaching the member that runs the task.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use grid::{Grid, TaskError};

use common::{data_cluster, eventually};

fn id(g: &Grid) -> String {
    g.runtime().member_id().to_string()
}

/// Registers "whoami" (answers the member's id) and "fail" on every member.
fn register(grids: &[Grid]) {
    for g in grids {
        let me = id(g);
        g.executor().register_task("whoami", move |prefix: String| {
            let me = me.clone();
            async move { Ok::<String, String>(format!("{prefix}{me}")) }
        });
        g.executor().register_task("fail", |n: u32| async move {
            if n == 0 {
                panic!("a panicking task");
            }
            Err::<(), String>(format!("failed with {n}"))
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_runs_on_one_member_on_all_and_on_the_owner_of_a_key() {
    let grids = data_cluster("member-exec", 3, |b| b.partitions(31).backups(1)).await;
    register(&grids);
    let t = Duration::from_secs(10);
    let exec = grids[0].executor();
    // One member, remote and local.
    for g in &grids {
        let answer: String = exec.run_on(&id(g), "whoami", "at ", t).await.unwrap();
        assert_eq!(answer, format!("at {}", id(g)));
    }
    // All members: one answer each.
    let all = exec.run_on_all::<_, String>("whoami", "", t).await;
    assert_eq!(all.len(), 3);
    for (member, answer) in &all {
        assert_eq!(answer.as_ref().unwrap(), member);
    }
    // The owner of a key: the member that owns the key's partition.
    for key in ["alpha", "beta", "gamma", "delta"] {
        let answer: String = exec.run_on_key_owner(&key, "whoami", "", t).await.unwrap();
        let p = grids[0]
            .runtime()
            .partition_of(&grid::codec::encode(&key).unwrap());
        let owner = grids[0].runtime().table().owner(p).unwrap().to_string();
        assert_eq!(answer, owner);
    }
    // Errors reach the caller typed.
    let e = exec
        .run_on::<_, ()>(&id(&grids[1]), "fail", &7u32, t)
        .await
        .unwrap_err();
    assert_eq!(e, TaskError::Failed("failed with 7".into()));
    let e = exec
        .run_on::<_, ()>(&id(&grids[1]), "fail", &0u32, t)
        .await
        .unwrap_err();
    assert_eq!(e, TaskError::Panicked);
    let e = exec
        .run_on::<_, ()>(&id(&grids[2]), "nope", &(), t)
        .await
        .unwrap_err();
    assert!(matches!(e, TaskError::NoSuchTask { .. }), "{e}");
    let e = exec
        .run_on::<_, ()>("nobody", "whoami", "", t)
        .await
        .unwrap_err();
    assert_eq!(e, TaskError::NotAMember("nobody".into()));
    // The member is still fine after a panic.
    let answer: String = exec.run_on(&id(&grids[1]), "whoami", "", t).await.unwrap();
    assert_eq!(answer, id(&grids[1]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_member_in_the_set_is_reported_not_hidden() {
    let mut grids = data_cluster("member-exec-dead", 3, |b| b.partitions(31).backups(1)).await;
    register(&grids);
    let members: Vec<String> = grids.iter().map(id).collect();
    let victim = grids.remove(2);
    victim.kill();
    drop(victim);
    let answers = grids[0]
        .executor()
        .run_on_members::<_, String>(&members, "whoami", "", Duration::from_secs(3))
        .await;
    assert_eq!(answers.len(), 3);
    assert_eq!(answers[0].1.as_ref().unwrap(), &members[0]);
    assert_eq!(answers[1].1.as_ref().unwrap(), &members[1]);
    let dead = answers[2].1.as_ref().unwrap_err();
    assert!(
        matches!(
            dead,
            TaskError::Unreachable { .. } | TaskError::Timeout(_) | TaskError::NotAMember(_)
        ),
        "{dead}"
    );
    // Once the failure is detected, run_on_all no longer lists it; asking for it by name
    // still reports it.
    assert!(
        eventually(Duration::from_secs(30), || grids[0]
            .cluster()
            .members()
            .len()
            == 2)
        .await
    );
    let all = grids[0]
        .executor()
        .run_on_all::<_, String>("whoami", "", Duration::from_secs(3))
        .await;
    assert_eq!(all.len(), 2);
    assert!(all.iter().all(|(_, a)| a.is_ok()));
    let e = grids[0]
        .executor()
        .run_on::<_, String>(&members[2], "whoami", "", Duration::from_secs(3))
        .await
        .unwrap_err();
    assert_eq!(e, TaskError::NotAMember(members[2].clone()));
}

/// Counts the runs of "slow" that started and the ones that were dropped before the end.
struct Slow {
    started: Arc<AtomicUsize>,
    cancelled: Arc<AtomicUsize>,
    finished: Arc<AtomicUsize>,
}

struct OnDrop(Arc<AtomicUsize>, bool);

impl Drop for OnDrop {
    fn drop(&mut self) {
        if !self.1 {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

fn register_slow(g: &Grid) -> Slow {
    let slow = Slow {
        started: Arc::default(),
        cancelled: Arc::default(),
        finished: Arc::default(),
    };
    let (started, cancelled, finished) = (
        slow.started.clone(),
        slow.cancelled.clone(),
        slow.finished.clone(),
    );
    g.executor().register_task("slow", move |ms: u64| {
        let (started, cancelled, finished) = (started.clone(), cancelled.clone(), finished.clone());
        async move {
            started.fetch_add(1, Ordering::SeqCst);
            let mut guard = OnDrop(cancelled, false);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            guard.1 = true;
            finished.fetch_add(1, Ordering::SeqCst);
            Ok::<u64, String>(ms)
        }
    });
    slow
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_and_cancellation_reach_the_member_running_the_task() {
    let grids = data_cluster("member-exec-cancel", 2, |b| b.partitions(31).backups(1)).await;
    let remote = register_slow(&grids[1]);
    let local = register_slow(&grids[0]);
    let exec = grids[0].executor();
    let m1 = id(&grids[1]);
    // A timeout: the caller hears it, the remote task is dropped.
    let e = exec
        .run_on::<_, u64>(&m1, "slow", &60_000u64, Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(matches!(e, TaskError::Timeout(_)), "{e}");
    assert!(
        eventually(Duration::from_secs(10), || remote
            .cancelled
            .load(Ordering::SeqCst)
            == 1)
        .await,
        "the remote task was not cancelled"
    );
    // The caller drops its call: the remote task is dropped too.
    let call = {
        let exec = exec.clone();
        let m1 = m1.clone();
        tokio::spawn(async move {
            exec.run_on::<_, u64>(&m1, "slow", &60_000u64, Duration::from_secs(60))
                .await
        })
    };
    assert!(
        eventually(Duration::from_secs(10), || remote
            .started
            .load(Ordering::SeqCst)
            == 2)
        .await
    );
    call.abort();
    assert!(
        eventually(Duration::from_secs(10), || remote
            .cancelled
            .load(Ordering::SeqCst)
            == 2)
        .await,
        "the remote task outlived its caller"
    );
    // Locally the same.
    let me = id(&grids[0]);
    let e = exec
        .run_on::<_, u64>(&me, "slow", &60_000u64, Duration::from_millis(100))
        .await
        .unwrap_err();
    assert!(matches!(e, TaskError::Timeout(_)));
    assert_eq!(local.cancelled.load(Ordering::SeqCst), 1);
    // A task within its time answers.
    let ms: u64 = exec
        .run_on(&m1, "slow", &10u64, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(ms, 10);
    assert_eq!(remote.finished.load(Ordering::SeqCst), 1);
}
