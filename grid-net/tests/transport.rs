//! The transport between two members: typed requests, errors and deadlines, bulk streams,
//! ordered messages, connection de-duplication, reconnection after a peer restarts.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use grid_net::tls::Identity;
use grid_net::transport::{LocalMember, Transport, TransportConfig};
use grid_net::NetError;

fn member_at(id: &str, generation: u64, addr: &str, config: TransportConfig) -> Transport {
    let identity = Identity::from_secret(b"transport tests", id).unwrap();
    let local = LocalMember {
        cluster: "t".into(),
        member_id: id.into(),
        generation,
        settings: vec![("partitions".into(), "271".into())],
    };
    Transport::bind(addr.parse().unwrap(), None, &identity, local, config).unwrap()
}

fn member(id: &str) -> Transport {
    member_at(id, 1, "127.0.0.1:0", TransportConfig::default())
}

async fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while !cond() {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

#[tokio::test]
async fn typed_requests_errors_and_deadlines() {
    let a = member("a");
    let b = member("b");
    a.on_request_typed("add", |_p, (x, y): (u64, u64)| async move {
        Ok::<_, String>(x + y)
    });
    a.on_request_typed("fail", |_p, (): ()| async move {
        Err::<(), _>("no luck".to_string())
    });
    a.on_request_typed("slow", |_p, (): ()| async move {
        tokio::time::sleep(Duration::from_secs(5)).await;
        Ok::<_, String>(())
    });
    let sum: u64 = b
        .request_typed(
            a.local_addr(),
            "add",
            &(2u64, 40u64),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert_eq!(sum, 42);
    let r: Result<(), _> = b
        .request_typed(a.local_addr(), "fail", &(), Duration::from_secs(5))
        .await;
    assert!(
        matches!(r, Err(NetError::Remote(ref m)) if m == "no luck"),
        "{r:?}"
    );
    let r: Result<(), _> = b
        .request_typed(a.local_addr(), "slow", &(), Duration::from_millis(200))
        .await;
    assert!(matches!(r, Err(NetError::Timeout { .. })), "{r:?}");
    // A request of the wrong type is answered with an error, not a crash.
    let r: Result<u64, _> = b
        .request_typed(
            a.local_addr(),
            "add",
            &"not numbers",
            Duration::from_secs(5),
        )
        .await;
    assert!(matches!(r, Err(NetError::Remote(_))), "{r:?}");
}

#[tokio::test]
async fn mismatched_settings_are_refused() {
    let a = member("a");
    let identity = Identity::from_secret(b"transport tests", "odd").unwrap();
    let odd = Transport::bind(
        "127.0.0.1:0".parse().unwrap(),
        None,
        &identity,
        LocalMember {
            cluster: "t".into(),
            member_id: "odd".into(),
            generation: 1,
            settings: vec![("partitions".into(), "1999".into())],
        },
        TransportConfig::default(),
    )
    .unwrap();
    a.on_request("echo", |_p, b| async move { Ok(b) });
    let r = odd
        .request(a.local_addr(), "echo", b"x", Duration::from_secs(5))
        .await;
    match r {
        Err(NetError::Refused { reason, .. }) => assert!(reason.contains("partitions"), "{reason}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn bulk_streams_carry_many_chunks() {
    let a = member("a");
    let b = member("b");
    a.on_bulk("sink", |_p, header, mut chunks| async move {
        let mut total = 0u64;
        let mut n = 0u64;
        while let Some(c) = chunks.next().await.map_err(|e| e.to_string())? {
            total += c.len() as u64;
            n += 1;
        }
        Ok(format!("{}:{n}:{total}", String::from_utf8_lossy(&header))
            .into_bytes()
            .into())
    });
    let mut s = b
        .open_bulk(a.local_addr(), "sink", b"partition-7")
        .await
        .unwrap();
    let chunk = vec![0xabu8; 1 << 20];
    for _ in 0..20 {
        s.send(&chunk).await.unwrap();
    }
    let answer = s.finish(Duration::from_secs(30)).await.unwrap();
    assert_eq!(&answer[..], b"partition-7:20:20971520");
}

/// Bulk streams go between the members' bulk endpoints, whose tasks run on the
/// lower-priority bulk runtime; to a member without one they take its main endpoint.
#[tokio::test]
async fn bulk_streams_take_the_bulk_endpoint_when_both_have_one() {
    let without = TransportConfig {
        bulk_endpoint: false,
        ..TransportConfig::default()
    };
    let a = member("a");
    let b = member("b");
    let c = member_at("c", 1, "127.0.0.1:0", without.clone());
    let without_f = without.clone();
    let d = member_at("d", 1, "127.0.0.1:0", without);
    for m in [&a, &c] {
        m.on_bulk("where", |peer, _header, mut chunks| async move {
            while chunks.next().await.map_err(|e| e.to_string())?.is_some() {}
            let thread = std::thread::current().name().unwrap_or("").to_string();
            Ok(format!("{} {thread}", peer.addr).into_bytes().into())
        });
    }
    let ask = |from: &Transport, to: &Transport| {
        let (from, to) = (from.clone(), to.clone());
        async move {
            let mut s = from.open_bulk(to.local_addr(), "where", b"").await.unwrap();
            s.send(b"some bytes").await.unwrap();
            let answer = s.finish(Duration::from_secs(10)).await.unwrap();
            let answer = String::from_utf8(answer.to_vec()).unwrap();
            let (addr, thread) = answer.split_once(' ').unwrap();
            (
                addr.parse::<std::net::SocketAddr>().unwrap(),
                thread.to_string(),
            )
        }
    };
    // Both have one: the stream arrives from b's bulk endpoint, on a bulk thread.
    let (from, thread) = ask(&b, &a).await;
    assert_ne!(from, b.local_addr(), "came in over b's main endpoint");
    assert_eq!(from.ip(), b.local_addr().ip());
    assert_eq!(thread, "grid-bulk");
    // Only the sender has one, or neither: main endpoints, and the stream still arrives.
    assert_eq!(ask(&b, &c).await.0, b.local_addr());
    assert_eq!(ask(&d, &c).await.0, d.local_addr());
    // Only the receiver has one: the sender has no bulk endpoint to send from.
    assert_eq!(ask(&d, &a).await.0, d.local_addr());

    // A bulk endpoint that cannot be reached (a firewall): the main endpoint carries the
    // stream, and the next ones without trying again.
    let quick = TransportConfig {
        connect_timeout: Duration::from_millis(300),
        ..TransportConfig::default()
    };
    // Failed dials backed off for 1 ms only: a new attempt would really dial.
    let quick_g = TransportConfig {
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(1),
        ..quick.clone()
    };
    let e = member_at("e", 1, "127.0.0.1:0", quick);
    e.faults().block(a.bulk_local_addr().unwrap());
    assert_eq!(ask(&e, &a).await.0, e.local_addr());
    assert_eq!(ask(&e, &a).await.0, e.local_addr());

    // The attempts counted: a peer (no bulk endpoint of its own) advertises a bulk port where
    // a socket that never answers records each connection attempt — the destination
    // connection id of each QUIC long-header packet (retransmissions and the abandoned
    // attempt's close reuse it; a new attempt picks a new one).
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    silent
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let port = silent.local_addr().unwrap().port();
    let attempts = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let listener = {
        let (attempts, done) = (attempts.clone(), done.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !done.load(Ordering::Relaxed) {
                let Ok(n) = silent.recv(&mut buf) else {
                    continue;
                };
                let packet = &buf[..n];
                // Long header: form bit, version (4 bytes), DCID length, DCID.
                if n > 6 && packet[0] & 0x80 != 0 {
                    let len = packet[5] as usize;
                    if let Some(dcid) = packet.get(6..6 + len) {
                        attempts.lock().unwrap().insert(dcid.to_vec());
                    }
                }
            }
        })
    };
    let f = member_at("f", 1, "127.0.0.1:0", without_f);
    f.on_request("grid.net.bulk_addr", move |_peer, _body| async move {
        Ok(port.to_be_bytes().to_vec().into())
    });
    f.on_bulk("where", |peer, _header, mut chunks| async move {
        while chunks.next().await.map_err(|e| e.to_string())?.is_some() {}
        let thread = std::thread::current().name().unwrap_or("").to_string();
        Ok(format!("{} {thread}", peer.addr).into_bytes().into())
    });
    let g = member_at("g", 1, "127.0.0.1:0", quick_g);
    assert_eq!(
        ask(&g, &f).await.0,
        g.local_addr(),
        "fell back to the main endpoint"
    );
    let first = attempts.lock().unwrap().len();
    assert_eq!(first, 1, "one attempt to reach the silent bulk endpoint");
    // A new attempt would wait out the connect timeout (300 ms) after sending its first
    // packet, which the listener reads within 50 ms: counted by the time the stream is done.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(5)).await; // past the dial backoff
        assert_eq!(ask(&g, &f).await.0, g.local_addr());
    }
    assert_eq!(
        attempts.lock().unwrap().len(),
        first,
        "tried the unreachable bulk endpoint again"
    );
    done.store(true, Ordering::Relaxed);
    listener.join().unwrap();
}

#[tokio::test]
async fn ordered_messages_arrive_in_order() {
    let a = member("a");
    let b = member("b");
    let next = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    {
        let (next, errors) = (next.clone(), errors.clone());
        a.on_message("seq", move |_p, body| {
            let n = u64::from_be_bytes(body[..8].try_into().unwrap());
            if next.fetch_add(1, Ordering::SeqCst) != n {
                errors.fetch_add(1, Ordering::SeqCst);
            }
        });
    }
    for i in 0..10_000u64 {
        b.send_ordered(a.local_addr(), "seq", &i.to_be_bytes())
            .await
            .unwrap();
    }
    assert!(
        eventually(Duration::from_secs(10), || next.load(Ordering::SeqCst)
            == 10_000)
        .await
    );
    assert_eq!(errors.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn simultaneous_dials_settle_on_one_connection() {
    let config = TransportConfig {
        idle_timeout: Duration::from_secs(1),
        ..TransportConfig::default()
    };
    let a = member_at("a", 1, "127.0.0.1:0", config.clone());
    let b = member_at("b", 1, "127.0.0.1:0", config);
    for t in [&a, &b] {
        t.on_request("echo", |_p, b| async move { Ok(b) });
    }
    // Both dial each other at the same moment, many times over.
    let mut calls = Vec::new();
    for _ in 0..20 {
        let (a2, b2) = (a.clone(), b.clone());
        let (aa, ba) = (a.local_addr(), b.local_addr());
        calls.push(tokio::spawn(async move {
            a2.request(ba, "echo", b"x", Duration::from_secs(5)).await
        }));
        calls.push(tokio::spawn(async move {
            b2.request(aa, "echo", b"x", Duration::from_secs(5)).await
        }));
    }
    for c in calls {
        c.await
            .unwrap()
            .expect("every call succeeds, duplicate or not");
    }
    // The duplicate is closed after its grace period; both sides keep the same one.
    assert!(
        eventually(Duration::from_secs(5), || a.open_connections() == 1
            && b.open_connections() == 1)
        .await,
        "a has {} connections, b has {}",
        a.open_connections(),
        b.open_connections()
    );
    for _ in 0..10 {
        a.request(b.local_addr(), "echo", b"y", Duration::from_secs(5))
            .await
            .unwrap();
        b.request(a.local_addr(), "echo", b"y", Duration::from_secs(5))
            .await
            .unwrap();
    }
    assert_eq!((a.open_connections(), b.open_connections()), (1, 1));
}

#[tokio::test]
async fn a_restarted_peer_is_reached_again() {
    let a = member("a");
    let b = member("b");
    b.on_request("who", |_p, _b| async move { Ok(b"old".to_vec().into()) });
    let addr = b.local_addr();
    assert_eq!(
        &a.request(addr, "who", b"", Duration::from_secs(5))
            .await
            .unwrap()[..],
        b"old"
    );
    b.kill();
    drop(b);
    let r = a
        .request(addr, "who", b"", Duration::from_millis(500))
        .await;
    assert!(r.is_err(), "a killed peer does not answer");
    // Same address, new generation.
    let again = member_at("b", 2, &addr.to_string(), TransportConfig::default());
    again.on_request("who", |_p, _b| async move { Ok(b"new".to_vec().into()) });
    let mut answer = None;
    for _ in 0..50 {
        if let Ok(r) = a
            .request(addr, "who", b"", Duration::from_millis(500))
            .await
        {
            answer = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(answer.as_deref(), Some(&b"new"[..]));
}

/// Two members each serve more requests at once than a lane runs handlers for (1,024), and
/// each handler waits for a request of its own to the other member (as a write's owner
/// waits for its backup). Sent with `request_typed_nested`, those find the callers' lane crowded,
/// take a lane of their own and everything completes; on the callers' lane (plain
/// `request_typed`: checked, it fails) they queue behind readers that stopped reading, on
/// both sides, until the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handlers_waiting_on_each_other_do_not_stall_full_lanes() {
    const EACH_WAY: usize = 1_100;
    let a = member("a");
    let b = member("b");
    for (me, other) in [(&a, &b), (&b, &a)] {
        let (t, to) = (me.clone(), other.local_addr());
        // Every handler waits until the lane runs as many as it will: its reader then
        // stops (the other requests are sent by then), and the nested requests follow.
        let running = Arc::new(tokio::sync::watch::Sender::new(0usize));
        me.on_request_typed("op", move |_p, x: u64| {
            let (t, running) = (t.clone(), running.clone());
            async move {
                running.send_modify(|n| *n += 1);
                let _ = running.subscribe().wait_for(|n| *n >= 1_024).await;
                // Not a synchronisation: gives the callers' remaining requests time to be
                // queued ahead of the nested ones, which is what made the callers' lane
                // stall (without it, the test could pass on the callers' lane by luck).
                tokio::time::sleep(Duration::from_millis(100)).await;
                t.request_typed_nested::<_, u64>(to, "backup", &x, Duration::from_secs(20))
                    .await
                    .map_err(|e| e.to_string())
            }
        });
        me.on_request_typed("backup", |_p, x: u64| async move {
            // Not done on the first poll, like a backup waiting for its partition.
            tokio::task::yield_now().await;
            Ok::<_, String>(x + 1)
        });
    }
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..EACH_WAY as u64 {
        for (from, to) in [(a.clone(), b.local_addr()), (b.clone(), a.local_addr())] {
            calls.spawn(async move {
                let r: Result<u64, _> = from
                    .request_typed(to, "op", &i, Duration::from_secs(20))
                    .await;
                (i, r)
            });
        }
    }
    // Each call has its own deadline (20 s): a stalled lane shows as timeouts, not as a
    // performance bound of this test.
    while let Some(done) = calls.join_next().await {
        let (i, r) = done.unwrap();
        assert_eq!(r.unwrap(), i + 1);
    }
}

/// A lane breaks (its peer vanished) with requests still queued behind a peer that stopped
/// reading: requests whose frames never left are reported as not sent — the caller then
/// gets `Unreachable`, which promises the peer ran nothing — and no request reported so ran
/// on the peer, whichever of the lane's reader and writer noticed the break first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_reported_unreachable_never_ran() {
    let quick = TransportConfig {
        idle_timeout: Duration::from_secs(1),
        connect_timeout: Duration::from_secs(1),
        ..TransportConfig::default()
    };
    let a = member_at("a", 1, "127.0.0.1:0", quick.clone());
    let b = member_at("b", 1, "127.0.0.1:0", quick);
    let ran = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    {
        let ran = ran.clone();
        b.on_request("hold", move |_p, body| {
            let ran = ran.clone();
            async move {
                let id = u64::from_be_bytes(body[..8].try_into().unwrap());
                ran.lock().unwrap().insert(id);
                std::future::pending::<()>().await;
                Ok(body)
            }
        });
    }
    // 1,024 handlers run and hold; then b stops reading, QUIC's flow control stops a's
    // writer, and a's lane queue fills behind it.
    const REQUESTS: u64 = 2_500;
    let mut calls = tokio::task::JoinSet::new();
    for id in 0..REQUESTS {
        let (a, to) = (a.clone(), b.local_addr());
        calls.spawn(async move {
            let mut body = vec![0u8; 8 * 1024];
            body[..8].copy_from_slice(&id.to_be_bytes());
            (
                id,
                a.request(to, "hold", &body, Duration::from_secs(30)).await,
            )
        });
    }
    assert!(
        eventually(Duration::from_secs(10), || ran.lock().unwrap().len()
            >= 1_024)
        .await,
        "b never ran its 1,024 handlers"
    );
    b.kill();
    let (mut unreachable, mut lost) = (0, 0);
    while let Some(done) = calls.join_next().await {
        let (id, r) = done.unwrap();
        match r {
            Err(NetError::Unreachable { .. }) => {
                unreachable += 1;
                assert!(
                    !ran.lock().unwrap().contains(&id),
                    "request {id} was reported unreachable but ran"
                );
            }
            Err(NetError::ConnectionLost { .. }) => lost += 1,
            other => panic!("request {id}: {other:?}"),
        }
    }
    assert!(lost >= 1_024, "the requests that ran are lost: {lost}");
    // Past the ~1,025 frames b read and the ~900 its stream's flow-control window holds,
    // a's writer held one batch (counted as written) and ~500 more were queued or waiting
    // for a place, never written: about 516 unreachable. (When the reader
    // noticed the break first, all of them used to be reported lost: 0 to 4 unreachable,
    // measured.) The bound follows from the window: a larger one leaves fewer unwritten.
    assert!(
        unreachable >= 256,
        "queued requests should be reported unsent: {unreachable} unreachable, {lost} lost"
    );
}
