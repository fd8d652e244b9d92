//! Does the relay path allocate per message in the steady state? A counting global allocator
//! answers it, twice:
//!
//! 1. The hot path alone (framing, classification, bookkeeping) over a stream of pgbench-like
//!    messages, no I/O.
//! 2. With `BULKHEAD_BENCH_PG=host:port`: a whole in-process bulkhead relaying real pgbench
//!    traffic. pgbench runs twice with different transaction counts and the same connections;
//!    the difference, divided by the extra transactions, is what each transaction costs (the
//!    per-connection allocations cancel out).
//!
//! 3. With a server too, in transaction pooling: the heap an idle pooled client holds (what
//!    500 clients logged in and quiet give back when they leave, per client), which with the
//!    allocator's own overhead is most of its RSS. `BULKHEAD_BENCH_SIZES=1` lists the blocks.
//!
//! `cargo bench --bench alloc` (benches/compare runs it with a server).

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bulkhead::classify::{Kind, classify};
use bulkhead::pipe::Pipe;
use bulkhead::protocol::backend::TxStatus;
use bulkhead::tracker::Tracker;

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
/// Bytes and blocks allocated and not yet freed.
static LIVE_BYTES: AtomicI64 = AtomicI64::new(0);
static LIVE_BLOCKS: AtomicI64 = AtomicI64::new(0);
/// Live blocks by size, in 16-byte classes up to 4 KiB (the last class: larger).
static LIVE_BY_SIZE: [AtomicI64; 257] = [const { AtomicI64::new(0) }; 257];

fn size_class(size: usize) -> usize {
    (size.div_ceil(16)).min(256)
}

// SAFETY: every call is passed to the system allocator unchanged; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        LIVE_BYTES.fetch_add(layout.size() as i64, Ordering::Relaxed);
        LIVE_BLOCKS.fetch_add(1, Ordering::Relaxed);
        LIVE_BY_SIZE[size_class(layout.size())].fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        LIVE_BLOCKS.fetch_sub(1, Ordering::Relaxed);
        LIVE_BY_SIZE[size_class(layout.size())].fetch_sub(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        LIVE_BYTES.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        LIVE_BY_SIZE[size_class(layout.size())].fetch_sub(1, Ordering::Relaxed);
        LIVE_BY_SIZE[size_class(new_size)].fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

fn live_by_size() -> Vec<i64> {
    LIVE_BY_SIZE
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .collect()
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.load(Ordering::Relaxed)
}

fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

fn hot_path_alone() {
    let mut client = msg(
        b'Q',
        b"SELECT abalance FROM pgbench_accounts WHERE aid = 1;\0",
    );
    client.extend(msg(
        b'B',
        b"\0P0_1\0\0\x01\0\0\0\x04\0\0\x30\x39\0\x01\0\x01",
    ));
    client.extend(msg(b'E', b"\0\0\0\0\0"));
    client.extend(msg(b'S', b""));
    let mut server = msg(b'D', b"\0\x01\0\0\0\x04\0\x01\xe2\x40");
    server.extend(msg(b'C', b"SELECT 1\0"));
    server.extend(msg(b'Z', b"I"));
    let mut cx = Context::from_waker(Waker::noop());
    let (mut up, mut down) = (Pipe::default(), Pipe::default());
    let now = bulkhead::clock::Instant::now();
    let mut tracker = Tracker::new(now);
    tracker.parse(b"P0_1", Kind::Read, now);
    let mut round = |up: &mut Pipe, down: &mut Pipe, tracker: &mut Tracker| {
        let mut source = &client[..];
        let Poll::Ready(Ok(_)) = up.poll_read_from(&mut cx, &mut source) else {
            panic!()
        };
        while let Some(h) = up.next(|t| matches!(t, b'Q' | b'B' | b'E')).unwrap() {
            match h.tag {
                b'Q' => tracker.query(classify(up.body(&h), true), now),
                b'B' => tracker.bind(b"", b"P0_1", now),
                b'E' => {
                    tracker.execute(tracker.portal_kind(b""), now);
                }
                _ => tracker.sync(now),
            }
            up.forward(&h);
        }
        let Poll::Ready(Ok(_)) = up.poll_write_to(&mut cx, &mut tokio::io::sink()) else {
            panic!()
        };
        for _ in 0..2 {
            let mut source = &server[..];
            let Poll::Ready(Ok(_)) = down.poll_read_from(&mut cx, &mut source) else {
                panic!()
            };
            while let Some(h) = down.next(|t| t == b'Z').unwrap() {
                if h.tag == b'Z' {
                    tracker.ready(TxStatus::Idle, now);
                }
                down.forward(&h);
            }
            let Poll::Ready(Ok(_)) = down.poll_write_to(&mut cx, &mut tokio::io::sink()) else {
                panic!()
            };
        }
    };
    for _ in 0..1000 {
        round(&mut up, &mut down, &mut tracker);
    }
    let before = allocations();
    let rounds = 100_000;
    for _ in 0..rounds {
        round(&mut up, &mut down, &mut tracker);
    }
    let per_message = (allocations() - before) as f64 / (rounds * 10) as f64;
    println!(
        "hot path alone: {per_message:.4} allocations per relayed message ({rounds} rounds of 10 messages)"
    );
}

fn pgbench() -> std::path::PathBuf {
    let mut found: Vec<_> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin/pgbench"))
        .filter(|p| p.exists())
        .collect();
    found.sort();
    found.pop().unwrap_or_else(|| "pgbench".into())
}

/// The password pgbench gives in transaction pooling, where bulkhead checks it itself against
/// a users file; the server trusts local connections and never asks.
const POOL_PASSWORD: &str = "alloc-bench";

/// With `pool`: transaction pooling, 4 pgbench clients over 2 server connections, so that
/// connections change hands between transactions and named statements are prepared again on
/// the connection a client gets.
fn whole_proxy(pg: &str, tls: bulkhead::config::ServerTls, pool: bool) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut config = bulkhead::Config::default();
    config.database.hosts = vec![pg.to_string()];
    config.database.tls = tls;
    config.probe.interval = Duration::from_secs(3600);
    config.limits.max_inflight = 256;
    config.limits.max_inflight_writes = 256;
    // Kept alive until the end: bulkhead reads the users file at startup and on SIGHUP.
    let users = tempfile_path("alloc-users");
    if pool {
        std::fs::write(&users, format!("\"postgres\" \"{POOL_PASSWORD}\"\n")).unwrap();
        config.pool.mode = bulkhead::config::PoolMode::Transaction;
        config.pool.size = 2;
        config.limits.queue_timeout = Duration::from_secs(30);
        config.auth.file = users.to_string_lossy().into_owned();
    }
    let port = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let proxy = bulkhead::Bulkhead::new(config).unwrap();
        tokio::spawn(async move { proxy.serve(listener, std::future::pending()).await });
        port
    });
    let run = |mode: &str, transactions: u32| {
        let out = std::process::Command::new(pgbench())
            .args([
                "-n",
                "-S",
                "-M",
                mode,
                "-c",
                "4",
                "-j",
                "2",
                "-t",
                &transactions.to_string(),
            ])
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-U",
                "postgres",
                "postgres",
            ])
            .env("PGPASSWORD", POOL_PASSWORD)
            .env("PGSSLMODE", "disable")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    for mode in ["simple", "extended", "prepared"] {
        run(mode, 2_000);
        let (short, long) = (5_000u32, 25_000u32);
        let before = allocations();
        run(mode, short);
        let middle = allocations();
        run(mode, long);
        let after = allocations();
        let extra = ((after - middle) as f64 - (middle - before) as f64).max(0.0);
        let per_tx = extra / (4.0 * (long - short) as f64);
        println!(
            "whole proxy, tls = {:?}{}, pgbench -S -M {mode}: {per_tx:.4} allocations per transaction in the steady state",
            tls.name(),
            if pool {
                ", transaction pooling (4 clients over 2 connections)"
            } else {
                ""
            }
        );
    }
    if pool {
        idle_pooled_clients(port);
    }
    let _ = std::fs::remove_file(&users);
}

/// Logs `N` clients in through `port` (blocking sockets, which allocate nothing on this
/// heap), lets them go quiet, and reports what bulkhead's heap gives back per client when
/// they leave.
fn idle_pooled_clients(port: u16) {
    const N: i64 = 500;
    let clients: Vec<std::net::TcpStream> = (0..N).map(|_| scram_login(port)).collect();
    // Sessions quiet for a second give their buffers back when their timer next fires.
    std::thread::sleep(Duration::from_secs(4));
    let (bytes0, blocks0, sizes0) = (
        LIVE_BYTES.load(Ordering::Relaxed),
        LIVE_BLOCKS.load(Ordering::Relaxed),
        live_by_size(),
    );
    // What they held is what their leaving gives back.
    drop(clients);
    std::thread::sleep(Duration::from_secs(3));
    let bytes = bytes0 - LIVE_BYTES.load(Ordering::Relaxed);
    let blocks = blocks0 - LIVE_BLOCKS.load(Ordering::Relaxed);
    println!(
        "idle pooled client (transaction pooling, {N} clients): {:.0} bytes in {:.1} allocations each, live on the heap",
        bytes as f64 / N as f64,
        blocks as f64 / N as f64
    );
    if std::env::var_os("BULKHEAD_BENCH_SIZES").is_some() {
        for (class, (before, after)) in sizes0.iter().zip(live_by_size()).enumerate() {
            let per = (before - after) as f64 / N as f64;
            if per.abs() >= 0.5 {
                println!(
                    "    blocks of {:>5} bytes or less: {per:.1} per client",
                    class * 16
                );
            }
        }
    }
}

fn send(s: &mut std::net::TcpStream, tag: u8, body: &[u8]) {
    s.write_all(&msg(tag, body)).unwrap();
}

fn recv(s: &mut std::net::TcpStream) -> (u8, Vec<u8>) {
    let mut head = [0u8; 5];
    s.read_exact(&mut head).unwrap();
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let mut body = vec![0; len - 4];
    s.read_exact(&mut body).unwrap();
    (head[0], body)
}

/// A blocking login as `postgres` with SCRAM-SHA-256, to ReadyForQuery.
fn scram_login(port: u16) -> std::net::TcpStream {
    use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let params = b"user\0postgres\0database\0postgres\0\0";
    let mut startup = ((8 + params.len()) as u32).to_be_bytes().to_vec();
    startup.extend(196608u32.to_be_bytes());
    startup.extend(params);
    s.write_all(&startup).unwrap();
    let mut scram = ScramSha256::new(POOL_PASSWORD.as_bytes(), ChannelBinding::unsupported());
    loop {
        let (tag, body) = recv(&mut s);
        match (
            tag,
            body.get(..4)
                .map(|c| u32::from_be_bytes(c.try_into().unwrap())),
        ) {
            (b'Z', _) => return s,
            (b'R', Some(10)) => {
                let mut initial = format!("{SCRAM_SHA_256}\0").into_bytes();
                initial.extend((scram.message().len() as u32).to_be_bytes());
                initial.extend(scram.message());
                send(&mut s, b'p', &initial);
            }
            (b'R', Some(11)) => {
                scram.update(&body[4..]).unwrap();
                send(&mut s, b'p', scram.message());
            }
            (b'R', Some(12)) => scram.finish(&body[4..]).unwrap(),
            (b'E', _) => panic!("login refused: {}", String::from_utf8_lossy(&body)),
            _ => {}
        }
    }
}

fn tempfile_path(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("bulkhead-{name}-{}", std::process::id()))
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // cargo test --benches asks for a list; there are no tests here.
    }
    hot_path_alone();
    match std::env::var("BULKHEAD_BENCH_PG") {
        Ok(pg) => {
            whole_proxy(&pg, bulkhead::config::ServerTls::Disable, false);
            // With TLS to the server too, when it has TLS (benches/compare sets this).
            if std::env::var_os("BULKHEAD_BENCH_TLS").is_some() {
                whole_proxy(&pg, bulkhead::config::ServerTls::Require, false);
            }
            whole_proxy(&pg, bulkhead::config::ServerTls::Disable, true);
        }
        Err(_) => {
            println!("whole proxy: skipped; set BULKHEAD_BENCH_PG=host:port (benches/compare does)")
        }
    }
}
