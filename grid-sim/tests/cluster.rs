use std::time::Duration;

use grid_sim::world::{simulate, World, WorldConfig};

fn form(seed: u64, members: usize) -> (Option<Duration>, u64, String) {
    simulate(seed, async move {
        let mut world = World::start(WorldConfig::new(seed, members)).await.unwrap();
        let took = world
            .run_until(Duration::from_secs(60), |w| w.settled())
            .await;
        let line = world.observe();
        world.run_for(Duration::from_secs(2)).await;
        (took, world.digest(), line)
    })
}

#[test]
fn five_members_form_a_cluster() {
    let t = std::time::Instant::now();
    let (took, digest, line) = form(1, 5);
    println!(
        "settled after {took:?} (simulated), {:?} wall; {line}; digest {digest:x}",
        t.elapsed()
    );
    assert!(took.is_some(), "seed 1: not settled: {line}");
}

#[test]
fn a_seed_replays_its_history() {
    let a = form(7, 5);
    let b = form(7, 5);
    let c = form(7, 5);
    println!("{:x} {:x} {:x}", a.1, b.1, c.1);
    assert_eq!(a.1, b.1, "seed 7: two runs differ");
    assert_eq!(a.1, c.1, "seed 7: two runs differ");
}
