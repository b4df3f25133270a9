//! Topics: order per publisher, publisher exclusion, unsubscribe, slow-subscriber
//! isolation, bounds.

mod common;

use std::time::Duration;

use grid::{GridError, TopicError};
use serde::{Deserialize, Serialize};

use common::{cluster, init_tracing, member};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Msg {
    from: String,
    seq: u32,
}

async fn recv(sub: &mut grid::Subscription<Msg>) -> Msg {
    tokio::time::timeout(Duration::from_secs(10), sub.recv())
        .await
        .expect("message within 10 s")
        .expect("subscription open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_arrive_in_publish_order_per_publisher() {
    let grids = cluster("topic-order", 3).await;
    let mut sub = grids[0]
        .topic::<Msg>("orders")
        .unwrap()
        .subscribe_with_capacity(10_000);
    const N: u32 = 2000;
    let mut publishers = Vec::new();
    for g in &grids[1..] {
        let topic = g.topic::<Msg>("orders").unwrap();
        let from = g.cluster().local_member().id.to_string();
        publishers.push(tokio::spawn(async move {
            for seq in 0..N {
                topic
                    .publish(&Msg {
                        from: from.clone(),
                        seq,
                    })
                    .await
                    .unwrap();
            }
        }));
    }
    let mut next = std::collections::HashMap::new();
    for _ in 0..2 * N {
        let m = recv(&mut sub).await;
        let expected = next.entry(m.from.clone()).or_insert(0u32);
        assert_eq!(m.seq, *expected, "out of order from {}", m.from);
        *expected += 1;
    }
    for p in publishers {
        p.await.unwrap();
    }
    assert_eq!(next.values().copied().collect::<Vec<_>>(), vec![N, N]);
    assert_eq!(sub.dropped(), 0);
    for g in &grids {
        g.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publisher_is_excluded_unless_asked() {
    let grids = cluster("topic-self", 2).await;
    let topic = grids[0].topic::<Msg>("news").unwrap();
    let mut own = topic.subscribe();
    let mut remote = grids[1].topic::<Msg>("news").unwrap().subscribe();
    topic
        .publish(&Msg {
            from: "m0".into(),
            seq: 1,
        })
        .await
        .unwrap();
    assert_eq!(recv(&mut remote).await.seq, 1);
    let including = topic.clone().including_publisher();
    including
        .publish(&Msg {
            from: "m0".into(),
            seq: 2,
        })
        .await
        .unwrap();
    assert_eq!(recv(&mut remote).await.seq, 2);
    // The publisher's own subscriber got only the second message.
    assert_eq!(recv(&mut own).await.seq, 2);
    assert!(own.try_recv().is_none());
    for g in &grids {
        g.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_subscription_unsubscribes() {
    let grids = cluster("topic-unsub", 2).await;
    let publisher = grids[0].topic::<Msg>("t").unwrap();
    let topic = grids[1].topic::<Msg>("t").unwrap();
    let mut kept = topic.subscribe();
    let dropped = topic.subscribe();
    assert_eq!(topic.local_subscriber_count(), 2);
    drop(dropped);
    assert_eq!(topic.local_subscriber_count(), 1);
    // A subscription made after the drop sees messages; the dropped one is gone from the
    // registry, so delivery to it is not even attempted (no drop counted anywhere).
    publisher
        .publish(&Msg {
            from: "m0".into(),
            seq: 7,
        })
        .await
        .unwrap();
    assert_eq!(recv(&mut kept).await.seq, 7);
    assert_eq!(kept.dropped(), 0);
    drop(kept);
    assert_eq!(topic.local_subscriber_count(), 0);
    let mut later = topic.subscribe();
    publisher
        .publish(&Msg {
            from: "m0".into(),
            seq: 8,
        })
        .await
        .unwrap();
    assert_eq!(
        recv(&mut later).await.seq,
        8,
        "only messages after subscribing"
    );
    for g in &grids {
        g.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_subscriber_loses_messages_without_holding_up_others() {
    let grids = cluster("topic-slow", 2).await;
    let topic = grids[1].topic::<Msg>("firehose").unwrap();
    let slow = topic.subscribe_with_capacity(8); // never read
    let mut fast = topic.subscribe_with_capacity(1000);
    let publisher = grids[0].topic::<Msg>("firehose").unwrap();
    for seq in 0..500 {
        publisher
            .publish(&Msg {
                from: "m0".into(),
                seq,
            })
            .await
            .unwrap();
    }
    for seq in 0..500 {
        assert_eq!(recv(&mut fast).await.seq, seq);
    }
    assert_eq!(
        slow.dropped(),
        492,
        "8 queued, the rest dropped and counted"
    );
    // The connection still carries other channels.
    let mut other = grids[1].topic::<Msg>("other").unwrap().subscribe();
    grids[0]
        .topic::<Msg>("other")
        .unwrap()
        .publish(&Msg {
            from: "m0".into(),
            seq: 1,
        })
        .await
        .unwrap();
    assert_eq!(recv(&mut other).await.seq, 1);
    for g in &grids {
        g.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_and_sizes_are_bounded() {
    init_tracing();
    let g = member("topic-bounds", "a")
        .max_frame_size(64 * 1024)
        .start()
        .await
        .unwrap();
    assert!(matches!(
        g.topic::<Msg>(""),
        Err(GridError::Topic(TopicError::BadName { .. }))
    ));
    assert!(matches!(
        g.topic::<Msg>(&"x".repeat(201)),
        Err(GridError::Topic(TopicError::BadName { len: 201, max: 200 }))
    ));
    let big = g.topic::<Vec<u8>>("big").unwrap();
    let r = big.publish(&vec![1u8; 100 * 1024]).await;
    assert!(
        matches!(r, Err(TopicError::MessageTooLarge { .. })),
        "{r:?}"
    );
    assert!(big.publish(&vec![1u8; 1024]).await.is_ok());
    g.shutdown().await;
}
