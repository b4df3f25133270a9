//! A raw quinn client with a valid certificate sends garbage, truncated and oversized
//! frames: the member closes that stream (or, past a limit, that connection), logs why, and
//! keeps serving everyone else.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use grid_net::tls::Identity;
use grid_net::transport::{LocalMember, Transport, TransportConfig};
use grid_net::wire_testing::{hello_stream, request_stream, StreamKind};
use grid_net::NetError;

const SECRET: &[u8] = b"frames test secret";

fn local(id: &str) -> LocalMember {
    LocalMember {
        cluster: "frames".into(),
        member_id: id.into(),
        generation: 1,
        settings: vec![],
    }
}

fn member(id: &str, config: TransportConfig) -> Transport {
    let identity = Identity::from_secret(SECRET, id).unwrap();
    let t = Transport::bind(
        "127.0.0.1:0".parse().unwrap(),
        None,
        &identity,
        local(id),
        config,
    )
    .unwrap();
    t.on_request("echo", |_peer, body| async move { Ok(body) });
    t
}

/// A quinn endpoint holding a certificate of the cluster, speaking ALPN `alpn`.
fn raw_endpoint(alpn: &[u8]) -> quinn::Endpoint {
    let identity = Identity::from_secret(SECRET, "raw").unwrap();
    let crypto = identity.client_config_with_alpn(alpn).unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(crypto).unwrap(),
    )));
    ep
}

async fn raw_connect(ep: &quinn::Endpoint, addr: SocketAddr) -> quinn::Connection {
    let conn = ep.connect(addr, "grid.member").unwrap().await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&hello_stream("frames", "raw", 1, ep.local_addr().unwrap()))
        .await
        .unwrap();
    send.finish().unwrap();
    let reply = recv.read_to_end(64 * 1024).await.unwrap();
    assert!(!reply.is_empty());
    conn
}

/// Sends `bytes` on a new bidirectional stream; the answer, or why there is none.
async fn raw_stream(conn: &quinn::Connection, bytes: &[u8]) -> Result<Vec<u8>, String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    // The member may stop the stream before reading it all: that is the point.
    let _ = send.write_all(bytes).await;
    let _ = send.finish();
    tokio::time::timeout(Duration::from_secs(5), recv.read_to_end(1 << 20))
        .await
        .map_err(|_| "no answer".to_string())?
        .map_err(|e| e.to_string())
}

async fn still_serves(member: &Transport, other: &Transport) {
    let reply = other
        .request(member.local_addr(), "echo", b"ping", Duration::from_secs(5))
        .await
        .expect("the member keeps serving other members");
    assert_eq!(&reply[..], b"ping");
}

/// Every log line of this test binary. One global subscriber (rather than one per test):
/// tracing caches per-callsite interest process-wide, and scoped subscribers in parallel
/// tests lose lines. Tests pick out their own lines by a marker (peer id or address).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);
impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
impl Logs {
    /// The lines that mention `marker`.
    fn lines_with(&self, marker: &str) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .filter(|l| l.contains(marker))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Waits until a line mentions both `marker` and `text`.
    async fn wait_for(&self, marker: &str, text: &str) -> bool {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            if self.lines_with(marker).contains(text) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn logs() -> Logs {
    static LOGS: std::sync::OnceLock<Logs> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Logs::default();
        let w = logs.clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter("warn")
            .with_ansi(false)
            .with_writer(move || w.clone())
            .try_init();
        logs
    })
    .clone()
}

#[tokio::test(flavor = "current_thread")]
async fn bad_frames_close_the_stream_and_the_member_keeps_serving() {
    let logs = logs();
    let m = member("m", TransportConfig::default());
    let other = member("other", TransportConfig::default());
    let ep = raw_endpoint(grid_net::tls::ALPN);
    let conn = raw_connect(&ep, m.local_addr()).await;

    // A well-formed request works on the raw connection.
    let ok = raw_stream(&conn, &request_stream("echo", b"hi"))
        .await
        .unwrap();
    assert_eq!(&ok[4..], b"\x00hi");

    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("unknown stream kind", vec![0xff, 0, 0, 0, 1, 0]),
        ("truncated frame", {
            let mut v = vec![StreamKind::Request as u8];
            v.extend_from_slice(&100u32.to_be_bytes());
            v.extend_from_slice(&[1; 10]);
            v
        }),
        ("oversized frame", {
            let mut v = vec![StreamKind::Request as u8];
            v.extend_from_slice(&u32::MAX.to_be_bytes());
            v.extend_from_slice(&[0; 1000]);
            v
        }),
        ("undecodable routed frame", {
            let mut v = vec![StreamKind::Request as u8];
            v.extend_from_slice(&3u32.to_be_bytes());
            v.extend_from_slice(&[9, b'a', b'b']);
            v
        }),
        ("empty stream", vec![]),
    ];
    for (what, bytes) in cases {
        let r = raw_stream(&conn, &bytes).await;
        assert!(r.is_err(), "{what}: the stream should be reset, got {r:?}");
        still_serves(&m, &other).await;
        // The same connection still serves well-formed requests.
        let ok = raw_stream(&conn, &request_stream("echo", b"again")).await;
        assert!(
            ok.is_ok(),
            "{what}: connection should survive one bad stream"
        );
    }

    // Garbage on unidirectional streams: a bad kind, and a gossip frame that is not gossip.
    for bytes in [vec![0xee, 1, 2, 3], {
        let mut v = vec![StreamKind::Gossip as u8];
        v.extend_from_slice(&5u32.to_be_bytes());
        v.extend_from_slice(b"junk!");
        v
    }] {
        let mut s = conn.open_uni().await.unwrap();
        s.write_all(&bytes).await.unwrap();
        s.finish().unwrap();
    }
    // An unknown route is an error answer, not a protocol violation.
    let r = other
        .request(m.local_addr(), "nope", b"", Duration::from_secs(5))
        .await;
    assert!(
        matches!(r, Err(NetError::Remote(ref e)) if e.contains("no handler")),
        "{r:?}"
    );
    still_serves(&m, &other).await;

    // The member logs each rejection (the raw client's address marks this test's lines).
    let marker = ep.local_addr().unwrap().to_string();
    for expected in [
        "bad_kind",
        "truncated",
        "too_large",
        "undecodable",
        "bad input from peer",
    ] {
        assert!(
            logs.wait_for(&marker, expected).await,
            "log should mention {expected}:\n{}",
            logs.lines_with(&marker)
        );
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_peer_that_keeps_sending_garbage_loses_its_connection() {
    let m = member("m", TransportConfig::default());
    let other = member("other", TransportConfig::default());
    let ep = raw_endpoint(grid_net::tls::ALPN);
    let conn = raw_connect(&ep, m.local_addr()).await;
    for _ in 0..TransportConfig::default().max_protocol_errors {
        let _ = raw_stream(&conn, &[0xff]).await;
    }
    let reason = tokio::time::timeout(Duration::from_secs(5), conn.closed())
        .await
        .expect("connection closed");
    assert!(
        reason.to_string().contains("too many protocol errors"),
        "{reason}"
    );
    still_serves(&m, &other).await;
}

#[tokio::test(flavor = "current_thread")]
async fn garbage_instead_of_a_hello_closes_the_connection() {
    let logs = logs();
    let m = member("m", TransportConfig::default());
    let other = member("other", TransportConfig::default());
    let ep = raw_endpoint(grid_net::tls::ALPN);
    let conn = ep
        .connect(m.local_addr(), "grid.member")
        .unwrap()
        .await
        .unwrap();
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    send.finish().unwrap();
    let reason = tokio::time::timeout(Duration::from_secs(5), conn.closed())
        .await
        .expect("connection closed");
    assert!(reason.to_string().contains("bad handshake"), "{reason}");
    still_serves(&m, &other).await;
    let marker = ep.local_addr().unwrap().to_string();
    assert!(
        logs.wait_for(&marker, "bad handshake").await,
        "{}",
        logs.lines_with(&marker)
    );
}

#[tokio::test(flavor = "current_thread")]
async fn oversized_requests_are_refused_before_sending() {
    let config = TransportConfig {
        max_frame_size: 1024,
        ..TransportConfig::default()
    };
    let m = member("m", config.clone());
    let other = member("other", config);
    let r = other
        .request(m.local_addr(), "echo", &[0u8; 2000], Duration::from_secs(5))
        .await;
    assert!(
        matches!(
            r,
            Err(NetError::FrameTooLarge {
                size: 2005,
                limit: 1024
            })
        ),
        "{r:?}"
    );
    // A response over the limit becomes an error answer.
    m.on_request("big", |_p, _b| async move { Ok(vec![7u8; 5000].into()) });
    let r = other
        .request(m.local_addr(), "big", b"", Duration::from_secs(5))
        .await;
    assert!(
        matches!(r, Err(NetError::Remote(ref e)) if e.contains("exceeds")),
        "{r:?}"
    );
    still_serves(&m, &other).await;
}

#[tokio::test(flavor = "current_thread")]
async fn another_protocol_version_is_refused_and_both_sides_say_so() {
    let logs = logs();
    let m = member("m", TransportConfig::default());
    let ep = raw_endpoint(b"grid/3");
    let r = ep.connect(m.local_addr(), "grid.member").unwrap().await;
    let err = r
        .expect_err("a grid/3 peer (the previous version) must be refused")
        .to_string();
    assert!(err.to_lowercase().contains("protocol"), "{err}");
    // The member's side of the story.
    let marker = ep.local_addr().unwrap().to_string();
    assert!(
        logs.wait_for(&marker, "another grid protocol version")
            .await,
        "{}",
        logs.lines_with(&marker)
    );
}

/// A lane request frame: `[u32 length][u64 id][u8 route length][route][body]`.
fn lane_request(id: u64, route: &str, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&((8 + 1 + route.len() + body.len()) as u32).to_be_bytes());
    v.extend_from_slice(&id.to_be_bytes());
    v.push(route.len() as u8);
    v.extend_from_slice(route.as_bytes());
    v.extend_from_slice(body);
    v
}

/// The lane reader cuts frames out of whatever arrives: several frames in one write, a frame
/// dribbled a byte at a time, a frame larger than a packet — every request is answered, by
/// id; then a frame that announces more than the lane allows closes the lane.
#[tokio::test(flavor = "current_thread")]
async fn lane_frames_are_cut_from_any_split_of_the_stream() {
    let m = member("m", TransportConfig::default());
    let ep = raw_endpoint(grid_net::tls::ALPN);
    let conn = raw_connect(&ep, m.local_addr()).await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&[StreamKind::Mux as u8]).await.unwrap();

    let big = vec![7u8; 40_000];
    let mut together = Vec::new();
    for id in 1..=3u64 {
        together.extend_from_slice(&lane_request(id, "echo", &id.to_be_bytes()));
    }
    send.write_all(&together).await.unwrap();
    for byte in lane_request(4, "echo", b"dribbled") {
        send.write_all(&[byte]).await.unwrap();
        tokio::task::yield_now().await;
    }
    send.write_all(&lane_request(5, "echo", &big))
        .await
        .unwrap();

    let mut answers = std::collections::HashMap::new();
    while answers.len() < 5 {
        let mut len = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(5), recv.read_exact(&mut len))
            .await
            .expect("an answer within 5 s")
            .unwrap();
        let mut frame = vec![0u8; u32::from_be_bytes(len) as usize];
        recv.read_exact(&mut frame).await.unwrap();
        let id = u64::from_be_bytes(frame[..8].try_into().unwrap());
        assert_eq!(frame[8], 0, "request {id} answered with an error");
        answers.insert(id, frame[9..].to_vec());
    }
    for id in 1..=3u64 {
        assert_eq!(answers[&id], id.to_be_bytes());
    }
    assert_eq!(answers[&4], b"dribbled");
    assert_eq!(answers[&5], big);

    // A frame longer than any lane request may be: the lane is reset, nothing is buffered.
    let mut oversized = u32::MAX.to_be_bytes().to_vec();
    oversized.extend_from_slice(&[0; 64]);
    let _ = send.write_all(&oversized).await;
    let mut rest = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_secs(5), recv.read(&mut rest))
        .await
        .expect("the lane ends within 5 s");
    assert!(r.is_err() || matches!(r, Ok(None)), "{r:?}");
    let other = member("other", TransportConfig::default());
    still_serves(&m, &other).await;
}

/// A lane cancel frame: `[u32 length = 8][u64 id]`.
fn lane_cancel(id: u64) -> Vec<u8> {
    let mut v = 8u32.to_be_bytes().to_vec();
    v.extend_from_slice(&id.to_be_bytes());
    v
}

/// Reads one lane answer: (id, status, body).
async fn lane_answer(recv: &mut quinn::RecvStream) -> (u64, u8, Vec<u8>) {
    let mut len = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), recv.read_exact(&mut len))
        .await
        .expect("an answer within 5 s")
        .unwrap();
    let mut frame = vec![0u8; u32::from_be_bytes(len) as usize];
    recv.read_exact(&mut frame).await.unwrap();
    let id = u64::from_be_bytes(frame[..8].try_into().unwrap());
    (id, frame[8], frame[9..].to_vec())
}

/// Cancels for ids the member does not run — never sent, answered already, sent twice —
/// are ignored: the lane keeps serving and nothing counts as bad input. A cancelled request
/// gets no answer.
#[tokio::test(flavor = "current_thread")]
async fn cancels_for_unknown_ids_are_ignored() {
    let m = member("m", TransportConfig::default());
    m.on_request("stuck", |_p, _b| async move {
        std::future::pending::<()>().await;
        Ok(Bytes::new())
    });
    let ep = raw_endpoint(grid_net::tls::ALPN);
    let conn = raw_connect(&ep, m.local_addr()).await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&[StreamKind::Mux as u8]).await.unwrap();

    send.write_all(&lane_cancel(42)).await.unwrap();
    send.write_all(&lane_request(1, "echo", b"one"))
        .await
        .unwrap();
    assert_eq!(lane_answer(&mut recv).await, (1, 0, b"one".to_vec()));
    let mut burst = Vec::new();
    for id in [1, 1, u64::MAX, 0] {
        burst.extend_from_slice(&lane_cancel(id));
    }
    // A stuck request and its cancel: no answer for it comes before the next one's.
    burst.extend_from_slice(&lane_request(7, "stuck", b""));
    burst.extend_from_slice(&lane_cancel(7));
    burst.extend_from_slice(&lane_cancel(7));
    burst.extend_from_slice(&lane_request(2, "echo", b"two"));
    send.write_all(&burst).await.unwrap();
    assert_eq!(lane_answer(&mut recv).await, (2, 0, b"two".to_vec()));
    assert!(conn.close_reason().is_none(), "{:?}", conn.close_reason());
    let other = member("other", TransportConfig::default());
    still_serves(&m, &other).await;
}
