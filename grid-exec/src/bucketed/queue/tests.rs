//! The bucket queues' rules, one scenario each. Every change is applied to the owner and
//! to a backup, which must end equal (the change is deterministic).

use std::collections::{BTreeSet, HashMap};

use super::*;

const P: u32 = 7;

fn settings() -> ExecSettings {
    ExecSettings {
        batch_size: 2,
        max_attempts: 3,
        retry_delay_ms: 1_000,
        max_per_bucket: 5,
        max_per_member: 100,
        max_concurrency: 4,
        per_cluster: false,
    }
}

/// One partition, its owner and one backup, and what the owner knows of the cluster.
struct World {
    owner: PartitionQueues,
    backup: PartitionQueues,
    now: Instant,
    epoch: u64,
    /// Members with the processor; the first is picked.
    processors: Vec<String>,
    alive: BTreeSet<String>,
    settings: ExecSettings,
    /// Offers made, by batch.
    offers: HashMap<u64, Offer>,
}

impl World {
    fn new() -> Self {
        Self {
            owner: PartitionQueues::default(),
            backup: PartitionQueues::default(),
            now: Instant::now(),
            epoch: 1,
            processors: vec!["a".into()],
            alive: ["a", "b", "c"].iter().map(|s| s.to_string()).collect(),
            settings: settings(),
            offers: HashMap::new(),
        }
    }

    fn run(&mut self, op: Op) -> Result<(Answer, Vec<Offer>), ExecError> {
        let processors = self.processors.clone();
        let alive = self.alive.clone();
        let queued = self.owner.queued("x");
        let member_queued = move |_: &str| queued;
        let pick = move |_: &str, _: &[u8]| processors.iter().find(|m| alive.contains(*m)).cloned();
        let alive = self.alive.clone();
        let is_alive = move |m: &str| alive.contains(m);
        let env = Env {
            now: self.now,
            epoch: self.epoch,
            member_queued: &member_queued,
            pick: &pick,
            alive: &is_alive,
        };
        let (answer, change) = self.owner.decide(op, &env)?;
        let mut offers = Vec::new();
        if let Some(change) = change {
            // Through the wire, as a backup gets it.
            let bytes = grid_core::codec::encode(&change).unwrap();
            let copy: Change = grid_core::codec::decode(&bytes).unwrap();
            self.backup.apply(&copy, P, self.now).unwrap();
            for Output::Offer(o) in self.owner.apply(&change, P, self.now).unwrap() {
                self.offers.insert(o.batch, o.clone());
                offers.push(o);
            }
            assert_eq!(self.owner, self.backup, "owner and backup diverged");
        }
        Ok((answer, offers))
    }

    fn submit(&mut self, bucket: &str, task: &str) -> Result<(Answer, Vec<Offer>), ExecError> {
        self.run(Op::Submit {
            exec: "x".into(),
            settings: self.settings.clone(),
            bucket: bucket.as_bytes().to_vec(),
            task: task.as_bytes().to_vec(),
            delay_ms: 0,
        })
    }

    fn complete(&mut self, o: &Offer, outcome: Outcome) -> (Answer, Vec<Offer>) {
        self.run(Op::Complete {
            exec: o.exec.clone(),
            bucket: o.bucket.clone(),
            batch: o.batch,
            attempt: o.attempt,
            outcome,
        })
        .unwrap()
    }

    fn kick(&mut self) -> (Answer, Vec<Offer>) {
        self.run(Op::Kick).unwrap()
    }

    fn in_flight(&self, bucket: &str) -> Option<InFlight> {
        self.owner
            .bucket("x", bucket.as_bytes())
            .and_then(|b| b.in_flight.clone())
    }
}

fn bodies(o: &Offer) -> Vec<String> {
    o.tasks
        .iter()
        .map(|t| String::from_utf8(t.body.clone()).unwrap())
        .collect()
}

fn failed() -> Outcome {
    Outcome::Failed("boom".into())
}

#[test]
fn a_task_into_an_idle_bucket_starts_at_once_and_the_rest_waits_in_order() {
    let mut w = World::new();
    let (a, offers) = w.submit("b1", "t1").unwrap();
    assert_eq!(a, Answer::Accepted { seq: 0 });
    assert_eq!(offers.len(), 1);
    assert_eq!(bodies(&offers[0]), ["t1"]);
    assert_eq!(offers[0].attempt, 1);
    assert_eq!(offers[0].member, "a");
    // In flight: more tasks queue behind, nothing else starts.
    for t in ["t2", "t3", "t4"] {
        let (_, offers) = w.submit("b1", t).unwrap();
        assert!(offers.is_empty(), "a second batch of one bucket started");
    }
    assert_eq!(w.kick().1, vec![]);
    let first = w.offers.values().next().unwrap().clone();
    let (a, next) = w.complete(&first, Outcome::Done);
    assert_eq!(a, Answer::Completed);
    // The next batch starts with the completion: batch_size 2, in order.
    assert_eq!(next.len(), 1);
    assert_eq!(bodies(&next[0]), ["t2", "t3"]);
    assert!(next[0].batch > first.batch);
    let (_, last) = w.complete(&next[0], Outcome::Done);
    assert_eq!(bodies(&last[0]), ["t4"]);
    let (_, none) = w.complete(&last[0], Outcome::Done);
    assert!(none.is_empty());
    assert!(
        w.owner.bucket("x", b"b1").is_none(),
        "an idle bucket is removed"
    );
    assert_eq!(w.owner.queued("x"), 0);
}

#[test]
fn buckets_are_independent() {
    let mut w = World::new();
    let (_, o1) = w.submit("b1", "t1").unwrap();
    let (_, o2) = w.submit("b2", "u1").unwrap();
    assert_eq!(o1.len() + o2.len(), 2);
    assert_ne!(o1[0].batch, o2[0].batch);
    assert_eq!(w.owner.in_flight("x"), 2);
}

#[test]
fn a_completion_from_another_batch_or_attempt_is_stale_and_changes_nothing() {
    let mut w = World::new();
    let (_, o) = w.submit("b1", "t1").unwrap();
    let o = o[0].clone();
    let before = w.owner.clone();
    let mut wrong = o.clone();
    wrong.attempt += 1;
    assert_eq!(w.complete(&wrong, Outcome::Done).0, Answer::Stale);
    let mut wrong = o.clone();
    wrong.batch += 1;
    assert_eq!(w.complete(&wrong, Outcome::Done).0, Answer::Stale);
    assert_eq!(w.owner, before);
    assert_eq!(w.complete(&o, Outcome::Done).0, Answer::Completed);
    // Twice: the second is stale (a retried completion).
    assert_eq!(w.complete(&o, Outcome::Done).0, Answer::Stale);
}

#[test]
fn a_failed_batch_is_retried_whole_after_the_delay_then_dead_lettered() {
    let mut w = World::new();
    let (_, o) = w.submit("b1", "t1").unwrap();
    w.submit("b1", "t2").unwrap();
    let mut o = o[0].clone();
    assert_eq!(bodies(&o), ["t1"]);
    w.submit("b1", "t3").unwrap();
    for attempt in 1..=3u32 {
        assert_eq!(o.attempt, attempt);
        // Retried whole: the same single task, though more arrived.
        assert_eq!(bodies(&o), ["t1"]);
        let (a, started) = w.complete(&o, failed());
        if attempt == 3 {
            assert_eq!(a, Answer::DeadLettered);
            // The bucket moves on.
            assert_eq!(bodies(&started[0]), ["t2", "t3"]);
            assert_eq!(started[0].attempt, 1);
            return;
        }
        assert_eq!(a, Answer::Retrying);
        assert!(started.is_empty(), "retried before the delay");
        assert_eq!(w.kick().1, vec![], "kicked before the delay");
        assert_eq!(
            w.owner.next_wake(),
            Some(w.now + Duration::from_millis(1_000))
        );
        w.now += Duration::from_millis(999);
        assert_eq!(w.kick().1, vec![]);
        w.now += Duration::from_millis(1);
        let (_, started) = w.kick();
        assert_eq!(started.len(), 1);
        o = started[0].clone();
    }
}

#[test]
fn without_delay_a_retry_starts_with_the_failure() {
    let mut w = World::new();
    w.settings.retry_delay_ms = 0;
    let (_, o) = w.submit("b1", "t1").unwrap();
    let (a, again) = w.complete(&o[0], failed());
    assert_eq!(a, Answer::Retrying);
    assert_eq!(again[0].attempt, 2);
    assert_eq!(bodies(&again[0]), ["t1"]);
}

#[test]
fn a_batch_of_a_member_that_left_is_offered_again_as_a_new_attempt() {
    let mut w = World::new();
    w.processors = vec!["a".into(), "b".into()];
    let (_, o) = w.submit("b1", "t1").unwrap();
    assert_eq!(o[0].member, "a");
    w.submit("b1", "t2").unwrap();
    // Still alive: nothing to do.
    assert_eq!(w.kick().1, vec![]);
    w.alive.remove("a");
    let probe_alive = w.alive.clone();
    let probe_processors = w.processors.clone();
    let alive = move |m: &str| probe_alive.contains(m);
    let pick = move |_: &str, _: &[u8]| probe_processors.iter().find(|m| alive(m)).cloned();
    let alive2 = w.alive.clone();
    let is_alive = move |m: &str| alive2.contains(m);
    let none = |_: &str| 0;
    assert!(w.owner.needs_kick(&Env {
        now: w.now,
        epoch: 1,
        member_queued: &none,
        pick: &pick,
        alive: &is_alive,
    }));
    let (_, again) = w.kick();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].member, "b");
    assert_eq!(again[0].attempt, 2);
    assert_eq!(bodies(&again[0]), ["t1"], "the same batch, whole");
    // The dead member's late completion is refused.
    assert_eq!(w.complete(&o[0], Outcome::Done).0, Answer::Stale);
    assert_eq!(w.complete(&again[0], Outcome::Done).0, Answer::Completed);
}

#[test]
fn with_nobody_to_process_tasks_wait_and_start_once_someone_registers() {
    let mut w = World::new();
    w.processors.clear();
    let (_, o) = w.submit("b1", "t1").unwrap();
    assert!(o.is_empty());
    assert_eq!(w.kick().1, vec![]);
    w.processors = vec!["c".into()];
    let (a, o) = w.kick();
    assert_eq!(a, Answer::Kicked { started: 1 });
    assert_eq!(o[0].member, "c");
}

#[test]
fn a_member_that_left_with_nobody_else_leaves_the_batch_queued() {
    let mut w = World::new();
    let (_, o) = w.submit("b1", "t1").unwrap();
    w.alive.remove("a");
    let (_, again) = w.kick();
    assert!(again.is_empty());
    let b = w.owner.bucket("x", b"b1").unwrap();
    assert!(b.in_flight.is_none());
    assert_eq!(b.attempts, 1);
    w.alive.insert("a".into());
    let (_, again) = w.kick();
    assert_eq!(again[0].attempt, 2);
    assert_eq!(again[0].tasks, o[0].tasks);
}

#[test]
fn a_declined_batch_is_offered_again_later_without_counting_an_attempt() {
    let mut w = World::new();
    let (_, o) = w.submit("b1", "t1").unwrap();
    let o = o[0].clone();
    let (a, _) = w
        .run(Op::Decline {
            exec: "x".into(),
            bucket: b"b1".to_vec(),
            batch: o.batch,
            attempt: o.attempt,
        })
        .unwrap();
    assert_eq!(a, Answer::Declined);
    assert!(w.in_flight("b1").is_none());
    assert_eq!(w.kick().1, vec![]);
    w.now += DECLINE_BACKOFF;
    let (_, again) = w.kick();
    assert_eq!(again[0].attempt, 1);
}

#[test]
fn full_bucket_and_full_member_refuse() {
    let mut w = World::new();
    for i in 0..5 {
        w.submit("b1", &format!("t{i}")).unwrap();
    }
    let e = w.submit("b1", "t5").unwrap_err();
    assert!(matches!(e, ExecError::QueueFull { limit: 5, .. }), "{e}");
    // Another bucket still takes tasks.
    w.submit("b2", "u").unwrap();
    w.settings.max_per_member = 6;
    let e = w.submit("b3", "v").unwrap_err();
    assert!(matches!(e, ExecError::QueueFull { limit: 6, .. }), "{e}");
    // Room again once a batch is done.
    let o = w
        .offers
        .values()
        .find(|o| o.bucket == b"b1")
        .unwrap()
        .clone();
    w.complete(&o, Outcome::Done);
    w.submit("b1", "t5").unwrap();
}

#[test]
fn delayed_tasks_join_their_queue_when_due() {
    let mut w = World::new();
    let (_, o) = w
        .run(Op::Submit {
            exec: "x".into(),
            settings: w.settings.clone(),
            bucket: b"b1".to_vec(),
            task: b"later".to_vec(),
            delay_ms: 500,
        })
        .unwrap();
    assert!(o.is_empty());
    let (_, o) = w.submit("b1", "now").unwrap();
    assert_eq!(bodies(&o[0]), ["now"]);
    assert_eq!(w.owner.queued("x"), 2);
    w.now += Duration::from_millis(500);
    // Released behind the queue; the bucket is busy, so it waits.
    let (_, o2) = w.kick();
    assert!(o2.is_empty());
    let (_, next) = w.complete(&o[0], Outcome::Done);
    assert_eq!(bodies(&next[0]), ["later"]);
    // A delayed task into an idle bucket starts with its release.
    w.run(Op::Submit {
        exec: "x".into(),
        settings: w.settings.clone(),
        bucket: b"b9".to_vec(),
        task: b"solo".to_vec(),
        delay_ms: 10,
    })
    .unwrap();
    w.now += Duration::from_millis(10);
    let (_, o) = w.kick();
    assert_eq!(bodies(&o[0]), ["solo"]);
}

#[test]
fn batch_ids_grow_across_epochs_so_an_old_owners_batch_never_matches() {
    let mut w = World::new();
    let (_, o) = w.submit("b1", "t1").unwrap();
    let old = o[0].clone();
    w.complete(&old, Outcome::Done);
    w.epoch = 2;
    let (_, o) = w.submit("b1", "t2").unwrap();
    assert!(o[0].batch >= 2 << 32);
    assert!(o[0].batch > old.batch);
}

#[test]
fn a_new_owner_offers_the_batches_in_flight_again_unchanged() {
    let mut w = World::new();
    let (_, o) = w.submit("b1", "t1").unwrap();
    w.submit("b2", "u1").unwrap();
    let copy = w.owner.to_copy(w.now);
    let bytes = grid_core::codec::encode(&copy).unwrap();
    let moved =
        PartitionQueues::from_copy(grid_core::codec::decode(&bytes).unwrap(), w.now).unwrap();
    assert_eq!(moved, w.owner);
    let offers = moved.offers(P);
    assert_eq!(offers.len(), 2);
    assert!(offers.contains(&o[0]), "the same batch, attempt and member");
}

#[test]
fn copies_keep_delays_as_time_left() {
    let mut w = World::new();
    let (_, o) = w.submit("b1", "t1").unwrap();
    w.complete(&o[0], failed());
    let copy = w.owner.to_copy(w.now + Duration::from_millis(400));
    let later = w.now + Duration::from_secs(5);
    let moved = PartitionQueues::from_copy(copy, later).unwrap();
    assert_eq!(
        moved.bucket("x", b"b1").unwrap().retry_at,
        Some(later + Duration::from_millis(600))
    );
}

#[test]
fn a_malformed_copy_is_refused() {
    let mut w = World::new();
    w.submit("b1", "t1").unwrap();
    let mut copy = w.owner.to_copy(w.now);
    copy.execs[0].buckets[0].in_flight.as_mut().unwrap().count = 9;
    assert!(matches!(
        PartitionQueues::from_copy(copy, w.now),
        Err(ExecError::BadCopy(_))
    ));
    let mut copy = w.owner.to_copy(w.now);
    copy.execs[0].settings.batch_size = 0;
    assert!(PartitionQueues::from_copy(copy, w.now).is_err());
}

#[test]
fn a_change_that_does_not_fit_is_an_error_not_a_panic() {
    let mut q = PartitionQueues::default();
    let change = Change(vec![Step::Remove {
        exec: "x".into(),
        bucket: b"b".to_vec(),
        batch: 1,
    }]);
    assert!(q.apply(&change, P, Instant::now()).is_err());
    let change = Change(vec![Step::Start {
        exec: "x".into(),
        bucket: b"b".to_vec(),
        batch: 1,
        count: 1,
        attempt: 1,
        member: "a".into(),
    }]);
    assert!(q.apply(&change, P, Instant::now()).is_err());
}

#[test]
fn definitions_conflict_clearly() {
    let mut w = World::new();
    let define = |s: ExecSettings| Op::Define {
        exec: "x".into(),
        settings: s,
    };
    assert_eq!(w.run(define(settings())).unwrap().0, Answer::Defined);
    assert_eq!(w.run(define(settings())).unwrap().0, Answer::Defined);
    let mut other = settings();
    other.batch_size = 9;
    let e = w.run(define(other)).unwrap_err();
    assert!(e.to_string().contains("batch_size=2"), "{e}");
    assert!(matches!(e, ExecError::SettingsConflict { .. }));
    let mut bad = settings();
    bad.max_attempts = 0;
    assert!(matches!(
        w.run(Op::Define {
            exec: "y".into(),
            settings: bad
        }),
        Err(ExecError::InvalidSettings(_))
    ));
}

#[test]
fn oversized_input_is_refused() {
    let mut w = World::new();
    let e = w
        .submit(&"k".repeat(MAX_BUCKET_BYTES + 1), "t")
        .unwrap_err();
    assert!(matches!(e, ExecError::BucketTooLarge { .. }));
    let e = w.submit("b", &"t".repeat(MAX_TASK_BYTES + 1)).unwrap_err();
    assert!(matches!(e, ExecError::TaskTooLarge { .. }));
}

/// Random operations in random order (a seeded generator): a bucket never has two
/// batches in flight, every task is offered in order, and every accepted task leaves the
/// queue exactly once (processed or dead-lettered).
#[test]
fn random_histories_keep_order_and_exclusivity() {
    for seed in 0..50u64 {
        let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut next = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let mut w = World::new();
        w.settings.max_per_bucket = 1_000;
        w.settings.max_per_member = 10_000;
        w.settings.retry_delay_ms = 0;
        w.processors = vec!["a".into(), "b".into()];
        let mut accepted: HashMap<String, Vec<String>> = HashMap::new();
        let mut finished: HashMap<String, Vec<String>> = HashMap::new();
        let mut pending: Vec<Offer> = Vec::new();
        for i in 0..400 {
            match next(6) {
                0..=2 => {
                    let bucket = format!("b{}", next(4));
                    let task = format!("t{i}");
                    let (_, o) = w.submit(&bucket, &task).unwrap();
                    accepted.entry(bucket).or_default().push(task);
                    pending.extend(o);
                }
                3 if !pending.is_empty() => {
                    let o = pending.remove(next(pending.len() as u64) as usize);
                    let outcome = if next(4) == 0 {
                        failed()
                    } else {
                        Outcome::Done
                    };
                    let (a, started) = w.complete(&o, outcome);
                    if matches!(a, Answer::Completed | Answer::DeadLettered) {
                        let bucket = String::from_utf8(o.bucket.clone()).unwrap();
                        finished.entry(bucket).or_default().extend(bodies(&o));
                    }
                    pending.extend(started);
                }
                4 => {
                    // A member dies or comes back.
                    let m = if next(2) == 0 { "a" } else { "b" };
                    if !w.alive.remove(m) {
                        w.alive.insert(m.into());
                    }
                    let (_, o) = w.kick();
                    pending.extend(o);
                }
                _ => {
                    let (_, o) = w.kick();
                    pending.extend(o);
                }
            }
            // Exclusivity: one live offer per bucket at most, and it is the one in flight.
            let mut live = BTreeSet::new();
            pending.retain(|o| {
                w.in_flight(std::str::from_utf8(&o.bucket).unwrap())
                    .is_some_and(|f| f.batch == o.batch && f.attempt == o.attempt)
            });
            for o in &pending {
                assert!(
                    live.insert(o.bucket.clone()),
                    "seed {seed}: two batches in flight"
                );
            }
        }
        // Drain: everyone alive, complete everything.
        w.alive.insert("a".into());
        w.alive.insert("b".into());
        let (_, o) = w.kick();
        pending.extend(o);
        while let Some(o) = pending.pop() {
            let (a, started) = w.complete(&o, Outcome::Done);
            if matches!(a, Answer::Completed) {
                let bucket = String::from_utf8(o.bucket.clone()).unwrap();
                finished.entry(bucket).or_default().extend(bodies(&o));
            }
            pending.extend(started);
        }
        assert_eq!(w.owner.queued("x"), 0, "seed {seed}");
        assert_eq!(
            accepted, finished,
            "seed {seed}: lost, doubled or reordered"
        );
    }
}

fn submit_many(w: &mut World, tasks: &[(&str, &str)]) -> Result<(Answer, Vec<Offer>), ExecError> {
    w.run(Op::SubmitMany {
        exec: "x".into(),
        settings: w.settings.clone(),
        tasks: tasks
            .iter()
            .map(|(b, t)| NewTask {
                bucket: b.as_bytes().to_vec(),
                task: t.as_bytes().to_vec(),
            })
            .collect(),
        delay_ms: 0,
    })
}

#[test]
fn many_tasks_queue_in_one_change_in_order_and_start_each_idle_bucket_once() {
    let mut w = World::new();
    let (_, busy) = w.submit("b2", "t0").unwrap();
    assert_eq!(busy.len(), 1);
    let (a, offers) = submit_many(
        &mut w,
        &[
            ("b1", "t1"),
            ("b2", "t2"),
            ("b1", "t3"),
            ("b3", "t4"),
            ("b1", "t5"),
        ],
    )
    .unwrap();
    assert_eq!(a, Answer::Accepted { seq: 1 });
    // b1 and b3 were idle: one batch each (b1's of batch_size 2, in order); b2 has one in
    // flight and waits.
    let mut started: Vec<(String, Vec<String>)> = offers
        .iter()
        .map(|o| (String::from_utf8(o.bucket.clone()).unwrap(), bodies(o)))
        .collect();
    started.sort();
    assert_eq!(
        started,
        [
            ("b1".to_string(), vec!["t1".to_string(), "t3".to_string()]),
            ("b3".to_string(), vec!["t4".to_string()]),
        ]
    );
    let batches: BTreeSet<u64> = offers.iter().map(|o| o.batch).collect();
    assert_eq!(batches.len(), 2, "distinct batch ids");
    assert!(batches.iter().all(|b| *b > busy[0].batch));
    assert_eq!(w.owner.queued("x"), 6);
    // The rest of b1 follows in order.
    let b1 = offers.iter().find(|o| o.bucket == b"b1").unwrap().clone();
    let (_, next) = w.complete(&b1, Outcome::Done);
    assert_eq!(bodies(&next[0]), ["t5"]);
}

#[test]
fn many_tasks_are_queued_all_or_none() {
    let mut w = World::new();
    w.submit("b1", "t0").unwrap();
    // max_per_bucket 5: one queued, five more do not fit; nothing is queued.
    let six = [
        ("b2", "x"),
        ("b1", "1"),
        ("b1", "2"),
        ("b1", "3"),
        ("b1", "4"),
        ("b1", "5"),
    ];
    let err = submit_many(&mut w, &six).unwrap_err();
    assert!(matches!(err, ExecError::QueueFull { .. }), "{err:?}");
    assert_eq!(w.owner.queued("x"), 1);
    assert!(w.owner.bucket("x", b"b2").is_none());
    // Four do.
    submit_many(&mut w, &six[..5]).unwrap();
    assert_eq!(w.owner.queued("x"), 6);
    // None at all is an answer without a change.
    assert_eq!(submit_many(&mut w, &[]).unwrap().1, vec![]);
}
