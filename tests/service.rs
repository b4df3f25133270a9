//! The service interface, as a service sees it on a real cluster: ownership hooks and owner
//! tasks that follow the partition when it moves or its owner dies, parked calls woken by
//! another member's change or reported abandoned when their caller gives up, timers that a
//! promoted backup re-arms, the member-departure hook, and service messages.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use grid::Grid;
use grid_core::runtime::service::*;
use serde::{Deserialize, Serialize};

use common::{data_cluster, eventually, settled};

#[derive(Debug, Serialize, Deserialize)]
enum Op {
    /// Adds to the partition's total; answers the new total.
    Add(u64),
    /// The partition's state.
    Get,
    /// Parks until the total is at least this much; answers the total.
    WaitAtLeast(u64),
    /// Forgets a parked call (its caller gave up).
    Forget(CallId),
    /// Arms the partition's timer.
    Arm,
    /// The timer fired.
    Fired,
}

#[derive(Debug, Serialize, Deserialize)]
enum Change {
    Add(u64),
    Park(CallId, u64),
    Forget(CallId),
    Arm,
    Fired,
}

#[derive(Debug, thiserror::Error, Serialize, Deserialize)]
#[error("ledger: {0}")]
struct LedgerError(String);

#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct State {
    total: u64,
    waiting: Vec<(CallId, u64)>,
    timer_armed: bool,
    fired: u64,
}

const TIMER: u64 = 9;
const TIMER_DELAY: Duration = Duration::from_millis(1500);

/// A counter per partition that records every hook it gets.
struct Ledger {
    parts: Mutex<Vec<State>>,
    /// Partitions this member was told it owns (on_owned minus on_disowned).
    owned: Mutex<BTreeSet<u32>>,
    /// Owner tasks alive (a guard in each counts itself out when dropped).
    tasks: Arc<AtomicUsize>,
    abandoned: AtomicUsize,
    left: Mutex<Vec<String>>,
    messages: Mutex<Vec<(String, String)>>,
}

impl Ledger {
    fn new(partitions: u32) -> Self {
        Self {
            parts: Mutex::new(vec![State::default(); partitions as usize]),
            owned: Mutex::default(),
            tasks: Arc::default(),
            abandoned: AtomicUsize::new(0),
            left: Mutex::default(),
            messages: Mutex::default(),
        }
    }

    fn state(&self, p: u32) -> State {
        self.parts.lock().unwrap()[p as usize].clone()
    }
}

struct TaskGuard(Arc<AtomicUsize>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl PartitionService for Ledger {
    type Op = Op;
    type Change = Change;
    type Answer = State;
    type Error = LedgerError;
    type Message = String;

    fn name(&self) -> &str {
        "ledger"
    }

    fn read(&self, ctx: &Ctx, op: &Op) -> Result<State, LedgerError> {
        match op {
            Op::Get => Ok(self.state(ctx.partition)),
            other => Err(LedgerError(format!("{other:?} is not a read"))),
        }
    }

    fn prepare(&self, ctx: &Ctx, op: Op) -> Result<Prepared<Self>, LedgerError> {
        let state = self.state(ctx.partition);
        Ok(match op {
            Op::Add(n) => Prepared::change(state, Change::Add(n)),
            Op::Get => Prepared::answer(state),
            Op::WaitAtLeast(n) if state.total >= n => Prepared::answer(state),
            Op::WaitAtLeast(n) => {
                let call = ctx.call.ok_or_else(|| LedgerError("no call".into()))?;
                Prepared::park(Change::Park(call, n))
            }
            Op::Forget(call) => Prepared::change(state, Change::Forget(call)),
            Op::Arm => Prepared::change(state, Change::Arm),
            Op::Fired => Prepared::change(state, Change::Fired),
        })
    }

    fn apply(&self, ctx: &Ctx, change: &Change, fx: &mut Effects<Self>) -> Result<(), LedgerError> {
        let mut parts = self.parts.lock().unwrap();
        let state = &mut parts[ctx.partition as usize];
        match change {
            Change::Add(n) => {
                state.total += n;
                let total = state.total;
                let snapshot = state.clone();
                state.waiting.retain(|(call, at_least)| {
                    let ready = total >= *at_least;
                    if ready {
                        fx.wake(*call, Ok(snapshot.clone()));
                    }
                    !ready
                });
            }
            Change::Park(call, n) => state.waiting.push((*call, *n)),
            Change::Forget(call) => state.waiting.retain(|(c, _)| c != call),
            Change::Arm => {
                state.timer_armed = true;
                fx.arm_timer(TIMER, ctx.now + TIMER_DELAY);
            }
            Change::Fired => {
                state.timer_armed = false;
                state.fired += 1;
            }
        }
        Ok(())
    }

    fn on_owned(&self, ctx: &Ctx, fx: &mut Effects<Self>) {
        assert!(
            self.owned.lock().unwrap().insert(ctx.partition),
            "on_owned twice"
        );
        // The timer is the owner's: a new owner re-arms it from the replicated state.
        if self.state(ctx.partition).timer_armed {
            fx.arm_timer(TIMER, ctx.now + TIMER_DELAY);
        }
    }

    fn on_disowned(&self, partition: u32) {
        assert!(
            self.owned.lock().unwrap().remove(&partition),
            "on_disowned without on_owned"
        );
    }

    fn on_timer(&self, _ctx: &Ctx, timer: u64, fx: &mut Effects<Self>) {
        assert_eq!(timer, TIMER);
        fx.submit(Op::Fired);
    }

    fn on_member_left(&self, ctx: &Ctx, member: &str, fx: &mut Effects<Self>) {
        // Called for every partition owned here: note it and tell ourselves once.
        let mut left = self.left.lock().unwrap();
        if !left.iter().any(|m| m == member) {
            left.push(member.to_string());
            fx.send(ctx.member.clone(), format!("{member} left"));
        }
    }

    fn on_abandoned(&self, _ctx: &Ctx, call: CallId, fx: &mut Effects<Self>) {
        self.abandoned.fetch_add(1, Ordering::SeqCst);
        fx.submit(Op::Forget(call));
    }

    fn on_message(&self, from: &str, message: String) {
        self.messages
            .lock()
            .unwrap()
            .push((from.to_string(), message));
    }

    fn owner_task(&self, _partition: u32, _handle: ServiceHandle<Self>) -> Option<OwnerTask> {
        self.tasks.fetch_add(1, Ordering::SeqCst);
        let guard = TaskGuard(self.tasks.clone());
        Some(Box::pin(async move {
            let _guard = guard;
            std::future::pending::<()>().await
        }))
    }

    fn snapshot(&self, p: u32, _chunk_bytes: usize) -> Snapshot {
        vec![grid_core::codec::encode(&self.state(p)).unwrap().into()]
    }

    fn rebuild(&self, _p: u32, chunks: Vec<bytes::Bytes>) -> Result<Rebuilt, LedgerError> {
        let chunk = chunks.first().ok_or_else(|| LedgerError("empty".into()))?;
        let state: State =
            grid_core::codec::decode(chunk).map_err(|e| LedgerError(e.to_string()))?;
        Ok(Box::new(state))
    }

    fn install(&self, p: u32, rebuilt: Rebuilt) -> Result<(), LedgerError> {
        let state = rebuilt
            .downcast::<State>()
            .map_err(|_| LedgerError("not a ledger partition".into()))?;
        self.parts.lock().unwrap()[p as usize] = *state;
        Ok(())
    }

    fn drop_partition(&self, p: u32) {
        self.parts.lock().unwrap()[p as usize] = State::default();
    }

    fn partition_len(&self, p: u32) -> usize {
        (self.state(p) != State::default()) as usize
    }
}

fn register(grids: &[Grid]) -> Vec<(Arc<Ledger>, ServiceHandle<Ledger>)> {
    grids
        .iter()
        .map(|g| {
            let ledger = Arc::new(Ledger::new(g.runtime().config().table.partitions));
            let handle = g.runtime().register_service(ledger.clone());
            (ledger, handle)
        })
        .collect()
}

/// Every partition is owned, by the service's own account, on exactly the member the
/// table names, with one owner task each.
fn hooks_follow_the_table(
    grids: &[Grid],
    ledgers: &[(Arc<Ledger>, ServiceHandle<Ledger>)],
) -> bool {
    let partitions = grids[0].runtime().config().table.partitions;
    let mut total_tasks = 0;
    for (g, (ledger, _)) in grids.iter().zip(ledgers) {
        let table = g.runtime().table();
        let me = g.runtime().member_id();
        let by_table: BTreeSet<u32> = (0..partitions)
            .filter(|p| table.owner(*p) == Some(me))
            .collect();
        if *ledger.owned.lock().unwrap() != by_table {
            let told = ledger.owned.lock().unwrap().clone();
            eprintln!(
                "{me}: told {:?} table {:?}",
                told.difference(&by_table).collect::<Vec<_>>(),
                by_table.difference(&told).collect::<Vec<_>>()
            );
            return false;
        }
        total_tasks += ledger.tasks.load(Ordering::SeqCst);
    }
    if total_tasks != partitions as usize {
        eprintln!("{total_tasks} owner tasks for {partitions} partitions");
    }
    total_tasks == partitions as usize
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ownership_hooks_and_owner_tasks_follow_partitions_through_a_join_and_a_kill() {
    let mut grids = data_cluster("svc-hooks", 3, |b| b.partitions(61).backups(1)).await;
    let mut ledgers = register(&grids);
    assert!(
        eventually(Duration::from_secs(10), || hooks_follow_the_table(
            &grids, &ledgers
        ))
        .await,
        "hooks did not follow the first table"
    );
    // A join moves partitions: their old owners are told and their tasks stop.
    let joined = common::member("svc-hooks", "m3")
        .partitions(61)
        .backups(1)
        .seed(grids[0].addr())
        .start()
        .await
        .unwrap();
    ledgers.extend(register(std::slice::from_ref(&joined)));
    grids.push(joined);
    assert!(settled(&grids, 4).await);
    assert!(
        eventually(Duration::from_secs(10), || hooks_follow_the_table(
            &grids, &ledgers
        ))
        .await,
        "hooks did not follow the join"
    );
    // A kill promotes backups: the new owners are told and start tasks.
    let victim = grids.remove(1);
    let (victim_ledger, _) = ledgers.remove(1);
    victim.kill();
    assert!(settled(&grids, 3).await);
    assert!(
        eventually(Duration::from_secs(10), || hooks_follow_the_table(
            &grids, &ledgers
        ))
        .await,
        "hooks did not follow the kill"
    );
    // Every survivor (each owns partitions) heard that the member left, and the message it
    // sent itself about it arrived.
    let gone = victim.runtime().member_id().to_string();
    assert!(
        eventually(Duration::from_secs(10), || {
            ledgers.iter().all(|(l, _)| {
                l.left.lock().unwrap().contains(&gone)
                    && l.messages
                        .lock()
                        .unwrap()
                        .iter()
                        .any(|(_, m)| *m == format!("{gone} left"))
            })
        })
        .await,
        "member-left hook or its message missing"
    );
    drop(victim_ledger);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_call_is_woken_by_another_members_change_and_a_given_up_one_is_forgotten() {
    let grids = data_cluster("svc-park", 3, |b| b.partitions(31).backups(1)).await;
    let ledgers = register(&grids);
    assert!(
        eventually(Duration::from_secs(10), || hooks_follow_the_table(
            &grids, &ledgers
        ))
        .await
    );
    let p = 7;
    // Park on m1 (wherever the owner is), wake from m2.
    let waiter = {
        let handle = ledgers[1].1.clone();
        tokio::spawn(async move { handle.execute(p, Op::WaitAtLeast(5), OpKind::Write).await })
    };
    let owner_index = |grids: &[Grid]| {
        let owner = grids[0].runtime().table().owner(p).cloned().unwrap();
        grids
            .iter()
            .position(|g| *g.runtime().member_id() == owner)
            .unwrap()
    };
    let o = owner_index(&grids);
    assert!(
        eventually(Duration::from_secs(5), || ledgers[o]
            .0
            .state(p)
            .waiting
            .len()
            == 1)
        .await,
        "the call did not park"
    );
    ledgers[2]
        .1
        .execute(p, Op::Add(2), OpKind::Write)
        .await
        .unwrap()
        .unwrap();
    assert!(!waiter.is_finished(), "woken too early");
    ledgers[2]
        .1
        .execute(p, Op::Add(3), OpKind::Write)
        .await
        .unwrap()
        .unwrap();
    let woken = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("the parked call was not woken")
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(woken.total, 5);
    // A caller that gives up: the owner hears of it and the waiter is forgotten, on the
    // owner and (being a replicated change) on its backup.
    let gave_up = tokio::time::timeout(
        Duration::from_millis(300),
        ledgers[1].1.execute(p, Op::WaitAtLeast(100), OpKind::Write),
    )
    .await;
    assert!(gave_up.is_err());
    assert!(
        eventually(Duration::from_secs(5), || {
            ledgers[o].0.abandoned.load(Ordering::SeqCst) == 1
                && ledgers.iter().all(|(l, _)| l.state(p).waiting.is_empty())
        })
        .await,
        "the abandoned call was not forgotten"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timer_fires_once_on_the_owner_and_a_promoted_backup_re_arms_it() {
    let mut grids = data_cluster("svc-timer", 3, |b| b.partitions(31).backups(1)).await;
    let mut ledgers = register(&grids);
    assert!(
        eventually(Duration::from_secs(10), || hooks_follow_the_table(
            &grids, &ledgers
        ))
        .await
    );
    // A timer on a partition that stays put fires once.
    let (a, b) = (3, 4);
    ledgers[0]
        .1
        .execute(a, Op::Arm, OpKind::Write)
        .await
        .unwrap()
        .unwrap();
    let read = |ledgers: &[(Arc<Ledger>, ServiceHandle<Ledger>)], p| {
        let handle = ledgers[0].1.clone();
        async move {
            handle
                .execute(p, Op::Get, OpKind::Read)
                .await
                .unwrap()
                .unwrap()
        }
    };
    assert!(
        common::eventually_async(Duration::from_secs(10), || async {
            read(&ledgers, a).await.fired == 1
        })
        .await,
        "the timer did not fire"
    );
    // A timer whose owner dies before it fires: the promoted backup fires it.
    let owner = grids[0].runtime().table().owner(b).cloned().unwrap();
    let i = grids
        .iter()
        .position(|g| *g.runtime().member_id() == owner)
        .unwrap();
    let other = (i + 1) % grids.len();
    ledgers[other]
        .1
        .execute(b, Op::Arm, OpKind::Write)
        .await
        .unwrap()
        .unwrap();
    grids.remove(i).kill();
    ledgers.remove(i);
    assert!(settled(&grids, 2).await);
    assert!(
        common::eventually_async(Duration::from_secs(15), || async {
            let s = read(&ledgers, b).await;
            s.fired == 1 && !s.timer_armed
        })
        .await,
        "the promoted backup did not fire the dead owner's timer"
    );
    // And only once.
    tokio::time::sleep(TIMER_DELAY * 2).await;
    assert_eq!(read(&ledgers, a).await.fired, 1);
    assert_eq!(read(&ledgers, b).await.fired, 1);
}
