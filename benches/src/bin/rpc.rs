//! RPC request/response on loopback, 100-byte payloads: grid's transport against raw quinn
//! in the same process, same TLS identities, interleaved rounds.
//!
//! Three contenders:
//! - `quinn-stream`: raw quinn, one bidirectional stream per request (the reference);
//! - `quinn-mux`: raw quinn, one long-lived stream carrying id-tagged frames both ways
//!   (the "multiplexed long-lived stream" design, measured to choose between the two);
//! - `grid`: `Transport::request` (stream per request, with route, frame limits, handler
//!   lookup and connection cache).
//!
//! For each: sequential latency (p50, p99) over `--sequential` requests, and throughput with
//! `--in-flight` concurrent requests. Every figure is the median over `--rounds` rounds.
//!
//! `cargo run --release -p grid-bench --bin rpc -- --json`

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use grid_bench::{median, percentile};
use grid_net::tls::Identity;
use grid_net::transport::{LocalMember, Transport, TransportConfig};
use tokio::sync::oneshot;

#[derive(Parser)]
struct Args {
    /// Sequential requests per round (latency).
    #[arg(long, default_value_t = 5000)]
    sequential: usize,
    /// Concurrent requests in flight (throughput).
    #[arg(long, default_value_t = 64)]
    in_flight: usize,
    /// Requests per round of the throughput run.
    #[arg(long, default_value_t = 40_000)]
    requests: usize,
    /// Rounds (figures are medians over rounds).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 100)]
    payload: usize,
    /// Print one JSON object as the last line.
    #[arg(long)]
    json: bool,
}

/// Something that answers a request with the same bytes.
trait Echo: Clone + Send + Sync + 'static {
    fn call(
        &self,
        payload: Bytes,
    ) -> impl std::future::Future<Output = anyhow::Result<Bytes>> + Send;
}

fn identity(name: &str) -> Identity {
    Identity::from_secret(b"rpc bench", name).expect("identity")
}

fn quinn_server(id: &Identity) -> anyhow::Result<quinn::Endpoint> {
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(id.server_config()?)?;
    let config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    Ok(quinn::Endpoint::server(config, "127.0.0.1:0".parse()?)?)
}

fn quinn_client(id: &Identity) -> anyhow::Result<quinn::Endpoint> {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(id.client_config()?)?;
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    Ok(ep)
}

// ---- raw quinn, stream per request ----

#[derive(Clone)]
struct QuinnStream {
    conn: quinn::Connection,
}

async fn start_quinn_stream() -> anyhow::Result<QuinnStream> {
    let server = quinn_server(&identity("server"))?;
    let addr = server.local_addr()?;
    tokio::spawn(async move {
        while let Some(incoming) = server.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    tokio::spawn(async move {
                        if let Ok(data) = recv.read_to_end(1 << 20).await {
                            let _ = send.write_all(&data).await;
                            let _ = send.finish();
                        }
                    });
                }
            });
        }
    });
    let client = quinn_client(&identity("client"))?;
    let conn = client.connect(addr, "grid.member")?.await?;
    Ok(QuinnStream { conn })
}

impl Echo for QuinnStream {
    async fn call(&self, payload: Bytes) -> anyhow::Result<Bytes> {
        let (mut send, mut recv) = self.conn.open_bi().await?;
        send.write_chunk(payload).await?;
        send.finish()?;
        Ok(recv.read_to_end(1 << 20).await?.into())
    }
}

// ---- raw quinn, one multiplexed stream ----

#[derive(Clone)]
struct QuinnMux {
    send: Arc<tokio::sync::Mutex<quinn::SendStream>>,
    pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Bytes>>>>,
    next: Arc<AtomicU64>,
}

async fn read_mux_frame(recv: &mut quinn::RecvStream) -> Option<(u64, Bytes)> {
    let mut head = [0u8; 12];
    recv.read_exact(&mut head).await.ok()?;
    let id = u64::from_be_bytes(head[..8].try_into().ok()?);
    let len = u32::from_be_bytes(head[8..].try_into().ok()?) as usize;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await.ok()?;
    Some((id, body.into()))
}

fn mux_frame(id: u64, body: &[u8]) -> Bytes {
    let mut v = Vec::with_capacity(12 + body.len());
    v.extend_from_slice(&id.to_be_bytes());
    v.extend_from_slice(&(body.len() as u32).to_be_bytes());
    v.extend_from_slice(body);
    v.into()
}

async fn start_quinn_mux() -> anyhow::Result<QuinnMux> {
    let server = quinn_server(&identity("server"))?;
    let addr = server.local_addr()?;
    tokio::spawn(async move {
        while let Some(incoming) = server.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    tokio::spawn(async move {
                        while let Some((id, body)) = read_mux_frame(&mut recv).await {
                            if send.write_chunk(mux_frame(id, &body)).await.is_err() {
                                break;
                            }
                        }
                    });
                }
            });
        }
    });
    let client = quinn_client(&identity("client"))?;
    let conn = client.connect(addr, "grid.member")?.await?;
    let (send, mut recv) = conn.open_bi().await?;
    let pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Bytes>>>> = Arc::default();
    let p = pending.clone();
    tokio::spawn(async move {
        let _conn = conn;
        while let Some((id, body)) = read_mux_frame(&mut recv).await {
            if let Some(tx) = p.lock().unwrap().remove(&id) {
                let _ = tx.send(body);
            }
        }
    });
    Ok(QuinnMux {
        send: Arc::new(tokio::sync::Mutex::new(send)),
        pending,
        next: Arc::new(AtomicU64::new(0)),
    })
}

impl Echo for QuinnMux {
    async fn call(&self, payload: Bytes) -> anyhow::Result<Bytes> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(id, tx);
        self.send
            .lock()
            .await
            .write_chunk(mux_frame(id, &payload))
            .await?;
        Ok(rx.await?)
    }
}

// ---- grid ----

#[derive(Clone)]
struct Grid {
    client: Transport,
    server: SocketAddr,
}

async fn start_grid() -> anyhow::Result<Grid> {
    let local = |id: &str| LocalMember {
        cluster: "bench".into(),
        member_id: id.into(),
        generation: 1,
        settings: vec![],
    };
    let bind = "127.0.0.1:0".parse()?;
    let server = Transport::bind(
        bind,
        None,
        &identity("server"),
        local("server"),
        TransportConfig::default(),
    )?;
    server.on_request("echo", |_peer, body| async move { Ok(body) });
    let client = Transport::bind(
        bind,
        None,
        &identity("client"),
        local("client"),
        TransportConfig::default(),
    )?;
    let g = Grid {
        server: server.local_addr(),
        client,
    };
    std::mem::forget(server); // lives for the whole run
    Ok(g)
}

impl Echo for Grid {
    async fn call(&self, payload: Bytes) -> anyhow::Result<Bytes> {
        Ok(self
            .client
            .request(self.server, "echo", &payload, Duration::from_secs(10))
            .await?)
    }
}

// ---- measurement ----

struct Round {
    p50_us: f64,
    p99_us: f64,
    ops_per_s: f64,
}

async fn round<E: Echo>(e: &E, args: &Args) -> anyhow::Result<Round> {
    let payload = Bytes::from(vec![0x5au8; args.payload]);
    // Warm up the connection.
    for _ in 0..200 {
        e.call(payload.clone()).await?;
    }
    let mut lat = Vec::with_capacity(args.sequential);
    for _ in 0..args.sequential {
        let t = Instant::now();
        let r = e.call(payload.clone()).await?;
        lat.push(t.elapsed());
        anyhow::ensure!(r.len() == payload.len(), "bad echo");
    }
    let p50 = percentile(&mut lat, 50.0);
    let p99 = percentile(&mut lat, 99.0);

    let per_task = args.requests / args.in_flight;
    let start = Instant::now();
    let tasks: Vec<_> = (0..args.in_flight)
        .map(|_| {
            let e = e.clone();
            let payload = payload.clone();
            tokio::spawn(async move {
                for _ in 0..per_task {
                    e.call(payload.clone()).await?;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    let ops = (per_task * args.in_flight) as f64 / start.elapsed().as_secs_f64();
    Ok(Round {
        p50_us: p50.as_secs_f64() * 1e6,
        p99_us: p99.as_secs_f64() * 1e6,
        ops_per_s: ops,
    })
}

#[derive(Default)]
struct Figures {
    p50: Vec<f64>,
    p99: Vec<f64>,
    ops: Vec<f64>,
}

impl Figures {
    fn push(&mut self, r: Round) {
        self.p50.push(r.p50_us);
        self.p99.push(r.p99_us);
        self.ops.push(r.ops_per_s);
    }
    fn medians(&self) -> (f64, f64, f64) {
        (median(&self.p50), median(&self.p99), median(&self.ops))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let stream = start_quinn_stream()
        .await
        .context("raw quinn (stream per request)")?;
    let mux = start_quinn_mux().await.context("raw quinn (multiplexed)")?;
    let grid = start_grid().await.context("grid transport")?;
    let (mut fs, mut fm, mut fg) = (Figures::default(), Figures::default(), Figures::default());
    for r in 0..args.rounds {
        // Interleaved, so that machine noise hits every contender alike.
        fs.push(round(&stream, &args).await?);
        fm.push(round(&mux, &args).await?);
        fg.push(round(&grid, &args).await?);
        eprintln!("round {}/{} done", r + 1, args.rounds);
    }
    let (s50, s99, sops) = fs.medians();
    let (m50, m99, mops) = fm.medians();
    let (g50, g99, gops) = fg.medians();
    println!(
        "RPC on loopback, {} B payload, medians of {} rounds ({} sequential; {} requests with {} in flight)",
        args.payload, args.rounds, args.sequential, args.requests, args.in_flight
    );
    println!("{:<14} {:>9} {:>9} {:>12}", "", "p50 µs", "p99 µs", "ops/s");
    for (name, p50, p99, ops) in [
        ("quinn-stream", s50, s99, sops),
        ("quinn-mux", m50, m99, mops),
        ("grid", g50, g99, gops),
    ] {
        println!("{name:<14} {p50:>9.1} {p99:>9.1} {ops:>12.0}");
    }
    println!(
        "grid / quinn-stream: throughput {:.2}x, p50 latency {:.2}x",
        gops / sops,
        g50 / s50
    );
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "payload_bytes": args.payload,
                "rounds": args.rounds,
                "quinn_stream": {"p50_us": s50, "p99_us": s99, "ops_per_s": sops},
                "quinn_mux": {"p50_us": m50, "p99_us": m99, "ops_per_s": mops},
                "grid": {"p50_us": g50, "p99_us": g99, "ops_per_s": gops},
                "grid_vs_quinn_throughput": gops / sops,
                "grid_vs_quinn_p50": g50 / s50,
            })
        );
    }
    Ok(())
}
