//! A handler is dropped on the serving member when its caller gives up: the caller's
//! deadline passes, the caller drops its request future, or the connection closes. Each
//! test's handler waits forever while holding a guard that reports when it is dropped.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use grid_net::tls::Identity;
use grid_net::transport::{LocalMember, Transport, TransportConfig};
use grid_net::NetError;

/// How long a cancellation may take to reach the handler.
const CANCEL_DEADLINE: Duration = Duration::from_secs(5);

fn member(id: &str) -> Transport {
    let identity = Identity::from_secret(b"cancel tests", id).unwrap();
    let local = LocalMember {
        cluster: "cancel".into(),
        member_id: id.into(),
        generation: 1,
        settings: vec![],
    };
    Transport::bind(
        "127.0.0.1:0".parse().unwrap(),
        None,
        &identity,
        local,
        TransportConfig::default(),
    )
    .unwrap()
}

/// Counts handlers started and handlers dropped (finished or cancelled).
#[derive(Default, Clone)]
struct Handlers {
    started: Arc<AtomicUsize>,
    dropped: Arc<AtomicUsize>,
}

/// Held by a handler while it runs; counts its drop.
struct DropGuard(Arc<AtomicUsize>);

impl Drop for DropGuard {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

impl Handlers {
    /// Registers on `member` a raw route `stuck` and a typed route `stuck.typed` whose
    /// handlers never answer.
    fn register(&self, member: &Transport) {
        let this = self.clone();
        member.on_request("stuck", move |_peer, _body| {
            let this = this.clone();
            async move {
                let _guard = DropGuard(this.dropped.clone());
                this.started.fetch_add(1, Ordering::SeqCst);
                std::future::pending::<()>().await;
                Ok(Bytes::new())
            }
        });
        let this = self.clone();
        member.on_request_typed("stuck.typed", move |_peer, (): ()| {
            let this = this.clone();
            async move {
                let _guard = DropGuard(this.dropped.clone());
                this.started.fetch_add(1, Ordering::SeqCst);
                std::future::pending::<()>().await;
                Ok::<_, String>(())
            }
        });
    }

    fn started(&self) -> usize {
        self.started.load(Ordering::SeqCst)
    }

    fn dropped(&self) -> usize {
        self.dropped.load(Ordering::SeqCst)
    }
}

/// Polls `cond` until it holds or `timeout` passes; whether it held.
async fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while !cond() {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}

/// The member still answers on the same connection after its handlers were cancelled,
/// with a handler that takes one of the lane's handler slots (it does not finish on its
/// first poll).
async fn still_answers(server: &Transport, client: &Transport) {
    let reply = client
        .request(
            server.local_addr(),
            "later",
            b"ping",
            Duration::from_secs(5),
        )
        .await
        .expect("the member still answers");
    assert_eq!(&reply[..], b"ping");
}

fn pair() -> (Transport, Transport, Handlers) {
    let server = member("server");
    let client = member("client");
    let handlers = Handlers::default();
    handlers.register(&server);
    server.on_request("later", |_peer, body| async move {
        tokio::task::yield_now().await;
        Ok(body)
    });
    (server, client, handlers)
}

/// A small request (on a lane) whose deadline passes: its handler is dropped.
#[tokio::test]
async fn a_timed_out_request_cancels_its_handler() {
    let (server, client, handlers) = pair();
    let r = client
        .request(
            server.local_addr(),
            "stuck",
            b"x",
            Duration::from_millis(100),
        )
        .await;
    assert!(matches!(r, Err(NetError::Timeout { .. })), "{r:?}");
    assert!(
        eventually(CANCEL_DEADLINE, || handlers.started() == 1).await,
        "the handler never started"
    );
    assert!(
        eventually(CANCEL_DEADLINE, || handlers.dropped() == 1).await,
        "the handler still runs after its caller's deadline"
    );
    still_answers(&server, &client).await;
}

/// Typed and nested typed requests take the same lanes: their handlers are dropped too.
#[tokio::test]
async fn timed_out_typed_and_nested_requests_cancel_their_handlers() {
    let (server, client, handlers) = pair();
    let addr = server.local_addr();
    let r: Result<(), _> = client
        .request_typed(addr, "stuck.typed", &(), Duration::from_millis(100))
        .await;
    assert!(matches!(r, Err(NetError::Timeout { .. })), "{r:?}");
    let r: Result<(), _> = client
        .request_typed_nested(addr, "stuck.typed", &(), Duration::from_millis(100))
        .await;
    assert!(matches!(r, Err(NetError::Timeout { .. })), "{r:?}");
    assert!(
        eventually(CANCEL_DEADLINE, || handlers.dropped() == 2).await,
        "{} of 2 handlers dropped",
        handlers.dropped()
    );
    assert_eq!(handlers.started(), 2);
    still_answers(&server, &client).await;
}

/// A request too large for a lane takes a stream of its own: when its caller's deadline
/// passes, the stream is stopped and the handler dropped.
#[tokio::test]
async fn a_timed_out_large_request_cancels_its_handler() {
    let (server, client, handlers) = pair();
    let body = vec![7u8; 200 * 1024];
    let r = client
        .request(
            server.local_addr(),
            "stuck",
            &body,
            Duration::from_millis(300),
        )
        .await;
    assert!(matches!(r, Err(NetError::Timeout { .. })), "{r:?}");
    assert!(
        eventually(CANCEL_DEADLINE, || handlers.started() == 1).await,
        "the handler never started"
    );
    assert!(
        eventually(CANCEL_DEADLINE, || handlers.dropped() == 1).await,
        "the handler still runs after its caller's deadline"
    );
    still_answers(&server, &client).await;
}

/// The caller drops its request future (another branch of a `select!` won): the handler is
/// dropped, on a lane and on a stream of its own.
#[tokio::test]
async fn a_dropped_request_future_cancels_its_handler() {
    let (server, client, handlers) = pair();
    for (n, size) in [(1, 10), (2, 200 * 1024)] {
        let body = vec![1u8; size];
        let request = client.request(server.local_addr(), "stuck", &body, Duration::from_secs(60));
        let started = {
            let handlers = handlers.clone();
            async move { eventually(CANCEL_DEADLINE, || handlers.started() == n).await }
        };
        tokio::select! {
            r = request => panic!("a stuck handler answered: {r:?}"),
            started = started => assert!(started, "handler {n} never started"),
        }
        // The request future is dropped here, its handler still running.
        assert!(
            eventually(CANCEL_DEADLINE, || handlers.dropped() == n).await,
            "handler {n} still runs after its caller dropped the request"
        );
    }
    still_answers(&server, &client).await;
}

/// When the caller's connection closes, the handlers running for it are dropped.
#[tokio::test]
async fn a_closed_connection_cancels_its_handlers() {
    let (server, client, handlers) = pair();
    let addr = server.local_addr();
    let mut calls = Vec::new();
    for size in [10, 10, 200 * 1024] {
        let client = client.clone();
        calls.push(tokio::spawn(async move {
            client
                .request(addr, "stuck", &vec![0u8; size], Duration::from_secs(60))
                .await
        }));
    }
    assert!(
        eventually(CANCEL_DEADLINE, || handlers.started() == 3).await,
        "{} of 3 handlers started",
        handlers.started()
    );
    assert_eq!(handlers.dropped(), 0);
    client.shutdown().await;
    assert!(
        eventually(CANCEL_DEADLINE, || handlers.dropped() == 3).await,
        "{} of 3 handlers dropped after the connection closed",
        handlers.dropped()
    );
    for call in calls {
        let r = call.await.unwrap();
        assert!(r.is_err(), "{r:?}");
    }
}

/// Abandoned handlers take every handler slot of a lane: the cancels free them and the
/// lane serves again (without cancels, it would wait for a slot forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lane_full_of_abandoned_handlers_recovers() {
    let (server, client, handlers) = pair();
    let addr = server.local_addr();
    // The member's handler slots per lane.
    const STUCK: usize = 1024;
    let mut calls = Vec::new();
    for _ in 0..STUCK {
        let client = client.clone();
        calls.push(tokio::spawn(async move {
            client
                .request(addr, "stuck", b"", Duration::from_millis(500))
                .await
        }));
    }
    for call in calls {
        let r = call.await.unwrap();
        assert!(matches!(r, Err(NetError::Timeout { .. })), "{r:?}");
    }
    assert!(
        eventually(CANCEL_DEADLINE, || handlers.dropped() == STUCK).await,
        "{} of {} started handlers dropped",
        handlers.dropped(),
        handlers.started()
    );
    assert_eq!(handlers.started(), STUCK);
    still_answers(&server, &client).await;
}
