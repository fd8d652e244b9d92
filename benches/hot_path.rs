//! Micro-benchmarks of the relay's hot path, per message: framing a stream of typical
//! messages through a `Pipe`, classifying statements, and the per-statement bookkeeping.
//! `cargo bench --bench hot_path`.

use std::hint::black_box;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bulkhead::classify::classify;
use bulkhead::clock::Instant;
use bulkhead::pipe::Pipe;
use bulkhead::protocol::backend::TxStatus;
use bulkhead::tracker::Tracker;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// What pgbench -S -M prepared sends per transaction, and what the server answers.
fn prepared_select() -> (Vec<u8>, Vec<u8>, usize, usize) {
    let mut client = msg(b'B', b"\0P0_1\0\0\x01\0\0\0\x04\0\0\x30\x39\0\x01\0\x01");
    client.extend(msg(b'E', b"\0\0\0\0\0"));
    client.extend(msg(b'S', b""));
    let mut server = msg(b'2', b"");
    server.extend(msg(b'D', b"\0\x01\0\0\0\x04\0\x01\xe2\x40"));
    server.extend(msg(b'C', b"SELECT 1\0"));
    server.extend(msg(b'Z', b"I"));
    (client, server, 3, 4)
}

/// Frames `stream` through a pipe `times` times, forwarding every message.
fn relay(pipe: &mut Pipe, stream: &[u8], inspect: fn(u8) -> bool, cx: &mut Context<'_>) {
    let mut source = stream;
    let Poll::Ready(Ok(_)) = pipe.poll_read_from(cx, &mut source) else {
        panic!("read")
    };
    while let Some(h) = pipe.next(inspect).unwrap() {
        black_box(pipe.body(&h));
        pipe.forward(&h);
    }
    let mut sink = tokio::io::sink();
    let Poll::Ready(Ok(_)) = pipe.poll_write_to(cx, &mut sink) else {
        panic!("write")
    };
}

fn framing(c: &mut Criterion) {
    let (client, server, n_client, n_server) = prepared_select();
    let mut cx = Context::from_waker(Waker::noop());
    let mut g = c.benchmark_group("framing");
    g.throughput(Throughput::Elements(n_client as u64));
    let mut up = Pipe::default();
    g.bench_function("client_messages", |b| {
        b.iter(|| {
            relay(
                &mut up,
                &client,
                |t| matches!(t, b'Q' | b'P' | b'B' | b'E' | b'C'),
                &mut cx,
            )
        })
    });
    g.throughput(Throughput::Elements(n_server as u64));
    let mut down = Pipe::default();
    g.bench_function("server_messages", |b| {
        b.iter(|| {
            relay(
                &mut down,
                &server,
                |t| matches!(t, b'Z' | b'E' | b'K'),
                &mut cx,
            )
        })
    });
    // A batch of 100 DataRows, as a larger result arrives.
    let mut rows = Vec::new();
    for _ in 0..100 {
        rows.extend(msg(b'D', b"\0\x02\0\0\0\x04abcd\0\0\0\x0chello, world"));
    }
    g.throughput(Throughput::Elements(100));
    let mut down = Pipe::default();
    g.bench_function("data_rows_x100", |b| {
        b.iter(|| relay(&mut down, &rows, |t| t == b'Z', &mut cx))
    });
    g.finish();
}

fn classification(c: &mut Criterion) {
    let mut g = c.benchmark_group("classify");
    g.throughput(Throughput::Elements(1));
    for (name, sql) in [
        (
            "pgbench_select",
            "SELECT abalance FROM pgbench_accounts WHERE aid = $1;",
        ),
        (
            "pgbench_update",
            "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2;",
        ),
        (
            "commented_cte",
            "/* app:orders */ WITH recent AS (SELECT * FROM orders WHERE ts > now() - interval '1 day') SELECT count(*) FROM recent",
        ),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| classify(black_box(sql.as_bytes()), true))
        });
    }
    g.finish();
}

fn bookkeeping(c: &mut Criterion) {
    let mut g = c.benchmark_group("tracker");
    g.throughput(Throughput::Elements(1));
    let now = Instant::now();
    let mut t = Tracker::new(now);
    t.parse(b"P0_1", bulkhead::classify::Kind::Read, now);
    t.sync(now);
    t.ready(TxStatus::Idle, now);
    g.bench_function("prepared_statement_cycle", |b| {
        b.iter(|| {
            t.bind(b"", b"P0_1", now);
            t.execute(t.portal_kind(b""), now);
            t.sync(now);
            black_box(t.deadline(Duration::from_secs(30), Duration::from_secs(5)));
            black_box(t.ready(TxStatus::Idle, now));
        })
    });
    g.finish();
}

criterion_group!(benches, framing, classification, bookkeeping);
criterion_main!(benches);
