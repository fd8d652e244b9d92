//! Issue 2: bulkhead is invisible to clients. Everything a client does against PostgreSQL
//! directly works the same through it, and bad input gets a clear error.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt, TryStreamExt};
use tokio::time::Instant;
use tokio_postgres::{AsyncMessage, NoTls, SimpleQueryMessage};

use crate::support::raw::{Raw, field, first_packet, msg, startup_packet};
use crate::support::{
    Binary, Cluster, Proxy, assert_answers, config_for, connect_watched, eventually, first_value,
    free_port, sqlstate,
};

const SECONDS_10: Duration = Duration::from_secs(10);

async fn setup() -> (Cluster, Proxy) {
    let pg = Cluster::start();
    let proxy = Proxy::start(config_for(&pg)).await;
    (pg, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_and_extended_queries_return_what_the_server_returns() {
    let (pg, proxy) = setup().await;
    let c = proxy.connect().await;
    let msgs = c
        .simple_query("SELECT 1 AS one, 'two' AS two; SELECT 3")
        .await
        .unwrap();
    let rows: Vec<_> = msgs
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap().to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(rows, ["1", "3"]);
    let row = c
        .query_one("SELECT $1::int + 1, $2::text || '!'", &[&41i32, &"hi"])
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, i32>(0), row.get::<_, String>(1)),
        (42, "hi!".to_string())
    );
    c.batch_execute("CREATE TABLE items (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let insert = c
        .prepare("INSERT INTO items VALUES ($1, $2)")
        .await
        .unwrap();
    for i in 0..20i32 {
        assert_eq!(
            c.execute(&insert, &[&i, &format!("v{i}")]).await.unwrap(),
            1
        );
    }
    assert_eq!(pg.psql("SELECT count(*), max(v) FROM items"), "20|v9");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_of_500_statements_answers_each_in_order() {
    let (_pg, proxy) = setup().await;
    let c = proxy.connect().await;
    let stmt = c.prepare("SELECT $1::int * 2").await.unwrap();
    let queries = (0..500i32).map(|i| {
        let (c, stmt) = (&c, &stmt);
        async move { c.query_one(stmt, &[&i]).await.map(|r| r.get::<_, i32>(0)) }
    });
    let results = futures_util::future::join_all(queries).await;
    let values: Vec<i32> = results.into_iter().map(Result::unwrap).collect();
    assert_eq!(values, (0..500).map(|i| i * 2).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_in_the_middle_of_a_pipeline_leaves_the_session_usable() {
    let (_pg, proxy) = setup().await;
    let c = proxy.connect().await;
    let (a, b, d) = tokio::join!(
        c.query_one("SELECT 1::int", &[]),
        c.query_one("SELECT 1/0", &[]),
        c.query_one("SELECT 3::int", &[])
    );
    assert_eq!(a.unwrap().get::<_, i32>(0), 1);
    assert_eq!(sqlstate(&b.unwrap_err()), "22012");
    assert_eq!(d.unwrap().get::<_, i32>(0), 3);
    assert_answers(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_executes_before_one_sync_skip_to_sync_after_an_error() {
    let (_pg, proxy) = setup().await;
    let mut r = Raw::connect(proxy.addr).await;
    r.login("postgres").await;
    let mut batch = vec![];
    for sql in ["SELECT 1", "SELECT 1/0", "SELECT 3"] {
        batch.extend(msg(b'P', format!("\0{sql}\0\0\0").as_bytes()));
        batch.extend(msg(b'B', b"\0\0\0\0\0\0\0\0"));
        batch.extend(msg(b'E', b"\0\0\0\0\0"));
    }
    batch.extend(msg(b'H', b""));
    r.send(&batch).await;
    // Flush: the first result and the error arrive before any Sync.
    let seen = r.recv_until(b'E').await;
    assert!(
        seen.iter().any(|(t, b)| *t == b'D' && b.ends_with(b"1")),
        "{seen:?}"
    );
    r.send(&msg(b'S', b"")).await;
    let rest = r.recv_until(b'Z').await;
    assert_eq!(
        rest.len(),
        1,
        "messages after the error were skipped by the server: {rest:?}"
    );
    assert_eq!(rest[0].1, b"I");
    r.send(&msg(b'Q', b"SELECT 7\0")).await;
    let out = r.recv_until(b'Z').await;
    assert!(out.iter().any(|(t, b)| *t == b'D' && b.ends_with(b"7")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_of_100k_rows_in_and_out_is_byte_identical() {
    let (pg, proxy) = setup().await;
    let c = proxy.connect().await;
    c.batch_execute("CREATE TABLE copied (id int, name text, note text)")
        .await
        .unwrap();
    let mut data = String::new();
    for i in 0..100_000 {
        data.push_str(&format!(
            "{i}\tname {i}\ta note with a \\t tab and ünïcode {}\n",
            i * 7
        ));
    }
    let sink = c.copy_in("COPY copied FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    for chunk in data.as_bytes().chunks(50_000) {
        sink.send(Bytes::copy_from_slice(chunk)).await.unwrap();
    }
    assert_eq!(sink.finish().await.unwrap(), 100_000);
    assert_eq!(pg.psql("SELECT count(*) FROM copied"), "100000");
    let out: Vec<Bytes> = c
        .copy_out("COPY copied TO STDOUT")
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let out = out.concat();
    assert!(
        out == data.as_bytes(),
        "COPY OUT differs from what went in ({} vs {} bytes)",
        out.len(),
        data.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_and_notices_reach_the_client() {
    let (_pg, proxy) = setup().await;
    let (client, mut connection) = tokio_postgres::connect(&proxy.params("postgres"), NoTls)
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            let _ = tx.send(m);
        }
    });
    client.batch_execute("LISTEN events").await.unwrap();
    let other = proxy.connect().await;
    other.batch_execute("NOTIFY events, 'hello'").await.unwrap();
    client
        .batch_execute("DO $$ BEGIN RAISE NOTICE 'careful'; END $$")
        .await
        .unwrap();
    let mut got = (None, None);
    while got.0.is_none() || got.1.is_none() {
        match tokio::time::timeout(SECONDS_10, rx.recv())
            .await
            .expect("async message")
            .unwrap()
        {
            AsyncMessage::Notification(n) => {
                got.0 = Some((n.channel().to_string(), n.payload().to_string()))
            }
            AsyncMessage::Notice(n) => got.1 = Some(n.message().to_string()),
            _ => {}
        }
    }
    assert_eq!(got.0, Some(("events".into(), "hello".into())));
    assert_eq!(got.1.as_deref(), Some("careful"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_cancel_stops_pg_sleep_and_the_session_goes_on() {
    let (pg, proxy) = setup().await;
    let c = proxy.connect().await;
    let token = c.cancel_token();
    let sleeper = tokio::spawn(async move {
        let result = c.simple_query("SELECT pg_sleep(30) /* cancel me */").await;
        (result, c)
    });
    let admin = pg.connect().await;
    wait_until_active(&admin, "cancel me").await;
    let started = Instant::now();
    token.cancel_query(NoTls).await.unwrap();
    let (result, c) = sleeper.await.unwrap();
    let err = result.unwrap_err();
    assert_eq!(sqlstate(&err), "57014");
    // The client's own cancel gets the server's answer unchanged.
    assert_eq!(
        err.as_db_error().unwrap().message(),
        "canceling statement due to user request"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_answers(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_with_a_wrong_key_is_dropped() {
    let (_pg, proxy) = setup().await;
    let mut r = Raw::connect(proxy.addr).await;
    let login = r.login("postgres").await;
    let key = &login
        .iter()
        .find(|(t, _)| *t == b'K')
        .expect("BackendKeyData")
        .1;
    assert_eq!(
        key.len(),
        8,
        "bulkhead hands out a 4-byte pid and a 4-byte secret"
    );
    r.send(&msg(b'Q', b"SELECT pg_sleep(1)\0")).await;
    let mut wrong = key.clone();
    wrong[7] ^= 0xff;
    let mut cancel = Raw::connect(proxy.addr).await;
    cancel.send(&first_packet(80_877_102, &wrong)).await;
    // bulkhead closes the cancel connection once it has dealt with the request.
    assert!(cancel.recv().await.is_none());
    let out = r.recv_until(b'Z').await;
    assert!(
        !out.iter().any(|(t, _)| *t == b'E'),
        "the statement was cancelled: {out:?}"
    );
    // Counted, so a flood of guessed keys shows on /metrics (and in the log, at a rate).
    for _ in 0..9 {
        let mut cancel = Raw::connect(proxy.addr).await;
        cancel.send(&first_packet(80_877_102, &wrong)).await;
        assert!(cancel.recv().await.is_none());
    }
    assert_eq!(
        proxy.metric("bulkhead_cancel_requests_total{result=\"unknown_key\"}"),
        10.0
    );
    assert_eq!(
        proxy.metric("bulkhead_cancel_requests_total{result=\"forwarded\"}"),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_and_md5_logins_pass_through_and_a_wrong_password_is_refused() {
    let (pg, proxy) = setup().await;
    pg.psql("SET password_encryption = 'scram-sha-256'; CREATE ROLE scram_user LOGIN PASSWORD 'scram-secret'");
    pg.psql("SET password_encryption = 'md5'; CREATE ROLE md5_user LOGIN PASSWORD 'md5-secret'");
    for (user, password) in [("scram_user", "scram-secret"), ("md5_user", "md5-secret")] {
        let ok =
            crate::support::connect(&format!("{} password={password}", proxy.params(user))).await;
        assert_eq!(
            ok.query_one("SELECT current_user::text", &[])
                .await
                .unwrap()
                .get::<_, String>(0),
            user
        );
        let err = tokio_postgres::connect(&format!("{} password=wrong", proxy.params(user)), NoTls)
            .await
            .err()
            .expect("wrong password accepted");
        assert_eq!(sqlstate(&err), "28P01", "{user}");
    }
    // libpq's SCRAM too, through psql.
    let out = std::process::Command::new("psql")
        .args([
            "-X",
            "-A",
            "-t",
            "-h",
            "127.0.0.1",
            "-p",
            &proxy.addr.port().to_string(),
        ])
        .args([
            "-U",
            "scram_user",
            "-d",
            "postgres",
            "-c",
            "SELECT 'scram ok'",
        ])
        .env("PGPASSWORD", "scram-secret")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "scram ok",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_of_32_mib_pass_both_ways() {
    let (pg, proxy) = setup().await;
    let c = proxy.connect().await;
    let big: Vec<u8> = (0..32 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    c.batch_execute("CREATE TABLE big (b bytea)").await.unwrap();
    c.execute("INSERT INTO big VALUES ($1)", &[&big])
        .await
        .unwrap();
    assert_eq!(
        pg.psql("SELECT length(b) FROM big"),
        (32 * 1024 * 1024).to_string()
    );
    let back: Vec<u8> = c.query_one("SELECT b FROM big", &[]).await.unwrap().get(0);
    assert!(back == big, "32 MiB value came back different");
    // A 32 MiB simple Query message too.
    let literal = "x".repeat(32 * 1024 * 1024);
    let msgs = c
        .simple_query(&format!("SELECT length('{literal}')"))
        .await
        .unwrap();
    let SimpleQueryMessage::Row(row) = &msgs[1] else {
        panic!("{:?}", msgs.len())
    };
    assert_eq!(row.get(0), Some("33554432"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_in_every_query_mode_has_no_failed_transactions() {
    let (_pg, proxy) = setup().await;
    let port = proxy.addr.port().to_string();
    let pgbench = move |args: &[&str]| {
        let out = std::process::Command::new(crate::support::pg_bin_dir().join("pgbench"))
            .args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres"])
            .args(args)
            .arg("postgres")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "pgbench {args:?}: {text}");
        text
    };
    tokio::task::spawn_blocking(move || {
        pgbench(&["-i", "-q", "-s", "1"]);
        for mode in ["simple", "extended", "prepared"] {
            let out = pgbench(&["-M", mode, "-c", "4", "-j", "2", "-t", "200"]);
            assert!(
                out.contains("number of transactions actually processed: 800/800"),
                "{mode}: {out}"
            );
            assert!(
                out.contains("number of failed transactions: 0 "),
                "{mode}: {out}"
            );
        }
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_scripts_with_errors_copy_and_ssl_negotiation_work() {
    let (_pg, proxy) = setup().await;
    let port = proxy.addr.port().to_string();
    let psql = |sslmode: &str, script: &str| {
        std::process::Command::new("psql")
            .args(["-X", "-A", "-t", "-d"])
            .arg(format!(
                "host=127.0.0.1 port={port} user=postgres dbname=postgres sslmode={sslmode}"
            ))
            .args(["-c", script])
            .output()
            .unwrap()
    };
    // sslmode=prefer sends SSLRequest first; bulkhead answers 'N' and psql goes on in plaintext.
    let out = psql(
        "prefer",
        "CREATE TABLE p (x int); INSERT INTO p SELECT generate_series(1, 3); SELECT sum(x) FROM p",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        ["CREATE TABLE", "INSERT 0 3", "6"],
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = psql("disable", "SELECT 1/0");
    assert!(String::from_utf8_lossy(&out.stderr).contains("division by zero"));
    let out = psql("require", "SELECT 1");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not support SSL"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssl_and_gssenc_requests_are_declined_then_startup_proceeds() {
    let (_pg, proxy) = setup().await;
    let mut r = Raw::connect(proxy.addr).await;
    r.send(&first_packet(80_877_104, b"")).await;
    assert_eq!(r.read_byte().await, b'N');
    r.send(&first_packet(80_877_103, b"")).await;
    assert_eq!(r.read_byte().await, b'N');
    let login = r.login("postgres").await;
    assert_eq!(login.first().map(|m| m.0), Some(b'R'));
    assert_eq!(login.last().unwrap(), &(b'Z', b"I".to_vec()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newer_protocol_minor_gets_the_servers_negotiate_protocol_version() {
    let (_pg, proxy) = setup().await;
    let mut r = Raw::connect(proxy.addr).await;
    r.send(&startup_packet(
        2,
        &[
            ("user", "postgres"),
            ("database", "postgres"),
            ("_pq_.not_a_thing", "1"),
        ],
    ))
    .await;
    let login = r.recv_until(b'Z').await;
    let (tag, body) = &login[0];
    assert_eq!(*tag, b'v', "{login:?}");
    // Newest minor the server supports, then the unrecognised option.
    assert!(
        body.windows(16).any(|w| w == b"_pq_.not_a_thing"),
        "{body:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_startup_packets_get_what_postgresql_sends_and_others_are_unaffected() {
    let (_pg, proxy) = setup().await;
    let bystander = proxy.connect().await;
    // `None`: PostgreSQL closes without a word (it logs the error only); bulkhead does too.
    // Drivers raise a stray error as an error (node-postgres's quick-disconnect test sends
    // Terminate as its very first bytes).
    let cases: Vec<(&str, Vec<u8>, Option<&str>)> = vec![
        (
            "http request",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            None,
        ),
        ("length below 8", vec![0, 0, 0, 7, 0, 0, 0, 0], None),
        ("length over 10000", vec![0, 0, 0x27, 0x11], None),
        ("Terminate before startup", b"X\0\0\0\x04".to_vec(), None),
        (
            "cancel of the wrong size",
            first_packet(80_877_102, b"\0\0\0\x01"),
            None,
        ),
        (
            "unterminated parameters",
            first_packet(196_608, b"user\0postgres"),
            Some("08P01"),
        ),
        (
            "protocol 2.0",
            first_packet(131_072, b"user\0postgres\0\0"),
            Some("0A000"),
        ),
    ];
    for (what, bytes, code) in cases {
        let mut r = Raw::connect(proxy.addr).await;
        r.send(&bytes).await;
        match code {
            Some(code) => {
                let body = r.expect_error("FATAL", code).await;
                let message = field(&body, b'M').unwrap();
                assert!(message.starts_with("bulkhead:"), "{what}: {message}");
                assert!(field(&body, b'H').is_some(), "{what}: no hint");
            }
            None => assert_eq!(r.recv().await, None, "{what}: closed without a word"),
        }
    }
    assert_answers(&bystander).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_messages_after_login_get_08p01() {
    let (_pg, proxy) = setup().await;
    let bystander = proxy.connect().await;
    for bad in [
        vec![b'Q', 0, 0, 0, 2],
        vec![b'Q', 0x40, 0, 0, 0],
        vec![b'd', 0xff, 0xff, 0xff, 0xff],
    ] {
        let mut r = Raw::connect(proxy.addr).await;
        r.login("postgres").await;
        r.send(&bad).await;
        r.expect_error("FATAL", "08P01").await;
    }
    assert_answers(&bystander).await;
}

/// xorshift64*: deterministic, so a failing stream can be replayed from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A valid frontend message of a random kind, then, half the time, its body mangled: bytes
/// flipped or zeroed, cut short or lengthened. The length field always matches the body, so
/// every message is framed; what is inside may be anything. A FunctionCall keeps its function
/// (int4abs), so no mangling can call something that sleeps.
fn mangled_message(rng: &mut Rng) -> Vec<u8> {
    let int4 = |v: i32| v.to_be_bytes().to_vec();
    let int2 = |v: i16| v.to_be_bytes().to_vec();
    // What a Describe or Close names: the statement or the portal.
    let target = |rng: &mut Rng| match rng.below(2) {
        0 => b"Ss1\0".to_vec(),
        _ => b"Pp1\0".to_vec(),
    };
    let (tag, mut body, keep): (u8, Vec<u8>, usize) = match rng.below(10) {
        0 => (b'Q', b"SELECT 1\0".to_vec(), 0),
        1 => (
            b'P',
            [&b"s1\0SELECT $1::int\0"[..], &int2(1), &int4(23)].concat(),
            0,
        ),
        2 => {
            let params = [&int2(0)[..], &int2(1), &int4(1), b"7", &int2(0)].concat();
            (b'B', [&b"p1\0s1\0"[..], &params].concat(), 0)
        }
        3 => (b'D', target(rng), 0),
        4 => (b'E', [&b"p1\0"[..], &int4(0)].concat(), 0),
        5 => (b'C', target(rng), 0),
        6 => (b'S', vec![], 0),
        7 => (b'H', vec![], 0),
        8 => {
            let call = [
                &int4(1397)[..],
                &int2(0),
                &int2(1),
                &int4(4),
                &int4(-5),
                &int2(0),
            ];
            (b'F', call.concat(), 4)
        }
        _ => (
            b'd',
            (0..rng.below(32)).map(|_| rng.next() as u8).collect(),
            0,
        ),
    };
    if rng.below(16) == 0 {
        // A letter that is no frontend message (Terminate excepted: it ends a session quietly).
        let other = b'a' + rng.below(26) as u8;
        return msg(if other == b'X' { b'x' } else { other }, &body);
    }
    if rng.below(2) == 0 && body.len() > keep {
        match rng.below(4) {
            0 => {
                for _ in 0..=rng.below(3) {
                    let i = keep + rng.below(body.len() - keep);
                    body[i] ^= 1 << rng.below(8);
                }
            }
            1 => {
                let i = keep + rng.below(body.len() - keep);
                body[i] = 0;
            }
            2 => body.truncate(keep + rng.below(body.len() - keep)),
            _ => body.extend((0..=rng.below(16)).map(|_| rng.next() as u8)),
        }
    }
    msg(tag, &body)
}

/// A header no message may have: a length under four, or one past the largest message.
fn broken_header(rng: &mut Rng) -> Vec<u8> {
    let len: u32 = if rng.below(2) == 0 {
        rng.below(4) as u32
    } else {
        u32::MAX
    };
    [&[b'Q'][..], &len.to_be_bytes()].concat()
}

/// Ends a mangled stream: a Sync, then a query whose answer shows the session is still in step.
/// Returns whether the session came through alive and how many errors it was sent; panics
/// (naming the seed) unless it either answered that query or closed after a FATAL error.
async fn survives(proxy: &Proxy, seed: u64, stream: &[u8]) -> (bool, usize) {
    let mut r = Raw::connect(proxy.addr).await;
    r.login("postgres").await;
    let end = [msg(b'S', b""), msg(b'Q', b"SELECT 'fuzz-end'\0")].concat();
    // One write, so the proxy has read everything before it answers (a socket closed with
    // unread bytes in it is reset, and the reset could overtake the answer).
    let _ = tokio::io::AsyncWriteExt::write_all(&mut r.stream, &[stream, &end].concat()).await;
    let (mut last, mut ended, mut errors) = (None, false, 0);
    while let Some((tag, body)) = r.recv().await {
        ended |= tag == b'D' && body.ends_with(b"fuzz-end");
        errors += usize::from(tag == b'E');
        if ended && tag == b'Z' {
            return (true, errors);
        }
        last = Some((tag, body));
    }
    match last {
        Some((b'E', body)) if field(&body, b'V').as_deref() == Some("FATAL") => (false, errors),
        other => panic!(
            "seed {seed}: the connection closed without a FATAL error; last message {other:?}; \
             stream {stream:?}"
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mangled_messages_after_login_get_an_error_or_an_answer_never_a_silent_close() {
    let (_pg, proxy) = setup().await;
    let first: u64 = std::env::var("BULKHEAD_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed);
    let (mut alive, mut closed, mut with_errors) = (0, 0, 0);
    for seed in first..first + 150 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let mut stream: Vec<u8> = (0..=rng.below(12))
            .flat_map(|_| mangled_message(&mut rng))
            .collect();
        if rng.below(8) == 0 {
            stream.extend(broken_header(&mut rng));
        }
        let (answered, errors) = survives(&proxy, seed, &stream).await;
        alive += usize::from(answered);
        closed += usize::from(!answered);
        with_errors += usize::from(errors > 0);
    }
    // The mangling must provoke errors of both kinds for the test to prove anything.
    assert!(closed >= 5, "{closed} of 150 closed with FATAL");
    assert!(
        alive >= 50 && with_errors >= 50,
        "{alive} alive, {with_errors} got errors"
    );
    let c = proxy.connect().await;
    c.simple_query("SELECT 1").await.unwrap();
    assert_eq!(proxy.get("/livez").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_that_sends_nothing_is_closed_after_the_startup_timeout() {
    let pg = Cluster::start();
    let mut config = config_for(&pg);
    config.timeouts.startup = Duration::from_millis(300);
    let proxy = Proxy::start(config).await;
    let mut r = Raw::connect(proxy.addr).await;
    let started = Instant::now();
    r.expect_error("FATAL", "08P01").await;
    assert!(started.elapsed() < Duration::from_millis(300) + Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_reachable_server_gives_57p03() {
    let mut config = bulkhead::Config::default();
    config.database.hosts = vec![format!("127.0.0.1:{}", free_port())];
    let proxy = Proxy::start(config).await;
    let err = tokio_postgres::connect(&proxy.params("postgres"), NoTls)
        .await
        .err()
        .expect("connected to nothing");
    assert_eq!(sqlstate(&err), "57P03");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_terminating_the_session_reaches_the_client_as_the_servers_own_fatal() {
    let (pg, proxy) = setup().await;
    let c = proxy.connect().await;
    let pid: i32 = c
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let sleeper = tokio::spawn(async move {
        c.simple_query("SELECT pg_sleep(30) /* terminate me */")
            .await
    });
    let admin = pg.connect().await;
    wait_until_active(&admin, "terminate me").await;
    admin
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    let err = tokio::time::timeout(SECONDS_10, sleeper)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert_eq!(sqlstate(&err), "57P01");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_connection_lost_mid_statement_gives_08006() {
    let (pg, proxy) = setup().await;
    let c = proxy.connect().await;
    let pid: i32 = c
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let sleeper =
        tokio::spawn(async move { c.simple_query("SELECT pg_sleep(30) /* kill me */").await });
    let admin = pg.connect().await;
    wait_until_active(&admin, "kill me").await;
    // SAFETY: kill has no memory-safety preconditions; pid is the backend we just looked up.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let err = tokio::time::timeout(SECONDS_10, sleeper)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert_eq!(sqlstate(&err), "08006");
    let db = err.as_db_error().unwrap();
    assert!(db.message().starts_with("bulkhead:"), "{}", db.message());
    assert_eq!(
        db.hint(),
        Some("Reconnect."),
        "a read was lost: nothing in doubt"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_vanishing_mid_statement_gets_its_statement_cancelled() {
    let (pg, proxy) = setup().await;
    let (client, conn_task) = connect_watched(&proxy.params("postgres")).await;
    tokio::spawn(async move {
        client
            .simple_query("SELECT pg_sleep(60) /* orphan */")
            .await
    });
    let admin = pg.connect().await;
    wait_until_active(&admin, "orphan").await;
    conn_task.abort();
    eventually(
        "the orphaned pg_sleep to be cancelled",
        SECONDS_10,
        || async { (active_count(&admin, "orphan").await == 0).then_some(()) },
    )
    .await;
    assert!(
        proxy
            .bulkhead
            .metrics()
            .render()
            .contains("bulkhead_cancels_sent_total 1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_lets_open_transactions_commit_and_closes_idle_sessions_with_57p01() {
    let (pg, proxy) = setup().await;
    let (idle, idle_conn) = connect_watched(&proxy.params("postgres")).await;
    let (busy, busy_conn) = connect_watched(&proxy.params("postgres")).await;
    busy.batch_execute("CREATE TABLE drained (x int); BEGIN; INSERT INTO drained VALUES (1)")
        .await
        .unwrap();
    let addr = proxy.addr;
    let shutdown = tokio::spawn(proxy.shutdown());
    // The idle session is closed with 57P01 straight away.
    let idle_end = tokio::time::timeout(SECONDS_10, idle_conn)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(sqlstate(&idle_end.unwrap_err()), "57P01");
    assert!(idle.is_closed());
    eventually("the listener to close", SECONDS_10, || async {
        tokio::net::TcpStream::connect(addr)
            .await
            .is_err()
            .then_some(())
    })
    .await;
    // The open transaction may finish; then its session closes too.
    busy.batch_execute("INSERT INTO drained VALUES (2); COMMIT")
        .await
        .unwrap();
    let busy_end = tokio::time::timeout(SECONDS_10, busy_conn)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(sqlstate(&busy_end.unwrap_err()), "57P01");
    tokio::time::timeout(SECONDS_10, shutdown)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(pg.psql("SELECT count(*) FROM drained"), "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_period_over_closes_open_transactions_and_they_roll_back() {
    let pg = Cluster::start();
    let mut config = config_for(&pg);
    config.timeouts.drain = Duration::from_millis(500);
    let proxy = Proxy::start(config).await;
    let (busy, busy_conn) = connect_watched(&proxy.params("postgres")).await;
    busy.batch_execute("CREATE TABLE abandoned (x int)")
        .await
        .unwrap();
    busy.batch_execute("BEGIN; INSERT INTO abandoned VALUES (1)")
        .await
        .unwrap();
    let started = Instant::now();
    tokio::time::timeout(SECONDS_10, proxy.shutdown())
        .await
        .unwrap();
    assert!(started.elapsed() < Duration::from_millis(500) + Duration::from_secs(2));
    let end = tokio::time::timeout(SECONDS_10, busy_conn)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(sqlstate(&end.unwrap_err()), "57P01");
    eventually(
        "the abandoned transaction to roll back",
        SECONDS_10,
        || async {
            (pg.psql("SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in%'") == "0")
                .then_some(())
        },
    )
    .await;
    assert_eq!(pg.psql("SELECT count(*) FROM abandoned"), "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_binary_drains_on_sigterm_and_exits_zero() {
    let pg = Cluster::start();
    let mut bin = Binary::start(&pg, "").await;
    let (c, conn) = connect_watched(&bin.params()).await;
    // A simple query: query_one would leave a statement whose Close the client sends later,
    // and a Close racing the shutdown takes the 57P01 meant for the connection.
    assert_eq!(c.simple_query("SELECT 1").await.unwrap().len(), 3);
    bin.signal(libc::SIGTERM);
    let end = tokio::time::timeout(SECONDS_10, conn)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(sqlstate(&end.unwrap_err()), "57P01");
    let status = tokio::time::timeout(SECONDS_10, bin.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
}

#[test]
fn check_flag_accepts_the_example_config_and_rejects_a_typo() {
    let bin = env!("CARGO_BIN_EXE_bulkhead");
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/bulkhead.toml");
    let out = std::process::Command::new(bin)
        .args(["--config", example, "--check"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[timeouts]\nread = \"1s\"\nwirte = \"1s\"\n").unwrap();
    let out = std::process::Command::new(bin)
        .args(["--config"])
        .arg(&bad)
        .arg("--check")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("wirte") && err.contains("line 3"), "{err}");
}

async fn active_count(admin: &tokio_postgres::Client, marker: &str) -> i64 {
    admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE '%' || $1 || '%' AND pid <> pg_backend_pid()",
            &[&marker],
        )
        .await
        .unwrap()
        .get(0)
}

async fn wait_until_active(admin: &tokio_postgres::Client, marker: &str) {
    eventually(
        &format!("a statement marked {marker:?} to be running"),
        SECONDS_10,
        || async { (active_count(admin, marker).await > 0).then_some(()) },
    )
    .await;
}

/// Issue 19's second cause: drivers use the pid from BackendKeyData the way applications do:
/// `pg_terminate_backend(pid)`, matching a NOTIFY's pid against their own, finding themselves
/// in pg_stat_activity. In session passthrough the client is on one backend for its life, so
/// it is told that backend's real pid; the cancel secret stays bulkhead's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pid_a_client_is_told_is_its_backends_and_its_cancel_still_works() {
    let (pg, proxy) = setup().await;
    let mut r = Raw::connect(proxy.addr).await;
    let login = r.login("postgres").await;
    let key = &login
        .iter()
        .find(|(t, _)| *t == b'K')
        .expect("BackendKeyData")
        .1;
    let told = i32::from_be_bytes([key[0], key[1], key[2], key[3]]);
    r.send(&msg(
        b'Q',
        b"LISTEN chan; NOTIFY chan; SELECT pg_backend_pid()\0",
    ))
    .await;
    let out = r.recv_until(b'Z').await;
    let notify = out
        .iter()
        .find(|(t, _)| *t == b'A')
        .expect("the notification");
    let notifier = i32::from_be_bytes([notify.1[0], notify.1[1], notify.1[2], notify.1[3]]);
    assert_eq!(notifier, told, "a NOTIFY's pid matches the client's own");
    let row = out.iter().find(|(t, _)| *t == b'D').expect("a row");
    let text = String::from_utf8_lossy(&row.1[6..]).to_string();
    assert_eq!(text.parse::<i32>().unwrap(), told);

    // Its own cancel, by that key, reaches its statement.
    r.send(&msg(b'Q', b"SELECT pg_sleep(30)\0")).await;
    let admin = pg.connect().await;
    eventually("the sleep to run", Duration::from_secs(10), || async {
        let n: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND query LIKE '%pg_sleep(30)%'",
                &[&told],
            )
            .await
            .unwrap()
            .get(0);
        (n == 1).then_some(())
    })
    .await;
    let mut cancel = Raw::connect(proxy.addr).await;
    cancel.send(&first_packet(80_877_102, key)).await;
    assert!(cancel.recv().await.is_none());
    let out = r.recv_until(b'Z').await;
    let error = out
        .iter()
        .find(|(t, _)| *t == b'E')
        .expect("the cancel's error");
    assert_eq!(field(&error.1, b'C').as_deref(), Some("57014"), "{out:?}");

    // And pg_terminate_backend(pid) from another session ends it, as it would directly.
    let (victim, conn) = connect_watched(&proxy.params("postgres")).await;
    let pid: i32 = first_value(&victim, "SELECT pg_backend_pid()")
        .await
        .parse()
        .unwrap();
    let c = proxy.connect().await;
    assert_eq!(
        first_value(&c, &format!("SELECT pg_terminate_backend({pid})")).await,
        "t"
    );
    let end = tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(sqlstate(&end.unwrap_err()), "57P01");
}

/// asyncpg prepares with Parse, Describe, Flush (no Sync) and then sends a simple Query;
/// pgjdbc with autosave sends an unsynced BEGIN and then a Query. The server answers both
/// with the Query's one ReadyForQuery. bulkhead must count one request, not two: a request it
/// thought unanswered would hold the session "busy" and end it at the read deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_after_an_unsynced_extended_batch_leaves_nothing_in_flight() {
    let pg = Cluster::start();
    let mut config = config_for(&pg);
    config.timeouts.read = Duration::from_secs(1);
    config.timeouts.cancel_grace = Duration::from_millis(500);
    let proxy = Proxy::start(config).await;
    let mut raw = Raw::connect(proxy.addr).await;
    raw.login("postgres").await;
    let mut batch = msg(b'P', b"stmt_1\0SELECT 1\0\0\0");
    batch.extend(msg(b'D', b"Sstmt_1\0"));
    batch.extend(msg(b'H', b""));
    raw.send(&batch).await;
    let tags: Vec<u8> = raw.recv_until(b'T').await.iter().map(|m| m.0).collect();
    assert_eq!(tags, b"1tT");
    raw.send(&msg(b'Q', b"BEGIN\0")).await;
    let tags: Vec<u8> = raw.recv_until(b'Z').await.iter().map(|m| m.0).collect();
    assert_eq!(tags, b"CZ");
    // Nothing is in flight: idle well past the read deadline and the cancel's grace (had a
    // request been left in flight, the session would end 1.5 s from now), the session is not
    // ended, and the statement prepared in the batch runs. The sleep is the point: it proves
    // that nothing happens.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut run = msg(b'B', b"\0stmt_1\0\0\0\0\0\0\0");
    run.extend(msg(b'E', b"\0\0\0\0\0"));
    run.extend(msg(b'S', b""));
    raw.send(&run).await;
    let got = raw.recv_until(b'Z').await;
    let tags: Vec<u8> = got.iter().map(|m| m.0).collect();
    assert_eq!(tags, b"2DCZ", "{got:?}");
    assert_eq!(got.last().unwrap().1, b"T", "still inside the BEGIN");
}
