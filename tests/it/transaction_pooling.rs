//! Issue 20, transaction pooling: a server connection per transaction, settings and prepared
//! statements that follow the client, features that pin it. Real servers, tokio-postgres,
//! pgbench.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_postgres::{Client, NoTls};

use bulkhead::Config;
use bulkhead::config::PoolMode;

use crate::support::{Cluster, Proxy, config_for, first_value, sqlstate};

/// A cluster with a table the pooled user may use, a users file for `app` (SCRAM on the
/// server) and `postgres` (trusted by the server, plain secret for bulkhead).
pub(crate) struct Setup {
    pub pg: Cluster,
    _dir: tempfile::TempDir,
    users_file: std::path::PathBuf,
}

pub(crate) fn setup() -> Setup {
    let pg = Cluster::start_with(&["max_connections = 300"]);
    pg.psql_local(
        "SET password_encryption = 'scram-sha-256'; CREATE ROLE app LOGIN PASSWORD 'app-secret'; \
         CREATE TABLE ledger (client int, n int); GRANT ALL ON ledger TO app; \
         GRANT pg_read_all_stats TO app",
    );
    let verifier = pg.psql_local("SELECT rolpassword FROM pg_authid WHERE rolname = 'app'");
    let dir = tempfile::tempdir().unwrap();
    let users_file = dir.path().join("users.txt");
    std::fs::write(
        &users_file,
        format!("\"app\" \"{verifier}\"\n\"postgres\" \"pg-secret\"\n"),
    )
    .unwrap();
    Setup {
        pg,
        _dir: dir,
        users_file,
    }
}

pub(crate) fn pooled(s: &Setup, size: u32) -> Config {
    let mut config = config_for(&s.pg);
    config.pool.mode = PoolMode::Transaction;
    config.pool.size = size;
    config.auth.file = s.users_file.display().to_string();
    config.probe.interval = Duration::from_millis(200);
    config.limits.queue_timeout = Duration::from_secs(10);
    config
}

fn params(proxy: &Proxy, extra: &str) -> String {
    format!(
        "host=127.0.0.1 port={} user=app password=app-secret dbname=postgres {extra}",
        proxy.addr.port()
    )
}

pub(crate) async fn connect(proxy: &Proxy, extra: &str) -> Client {
    crate::support::connect(&params(proxy, extra)).await
}

pub(crate) fn metric(proxy: &Proxy, line_start: &str) -> f64 {
    let text = proxy.bulkhead.metrics().render();
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

const PINNED: &str = "bulkhead_pool_pinned_clients{user=\"app\",database=\"postgres\"}";

fn backends_of_app(pg: &Cluster) -> u32 {
    pg.psql("SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'")
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_clients_writing_in_transactions_share_three_server_connections() {
    let s = setup();
    let proxy = Arc::new(Proxy::start(pooled(&s, 3)).await);
    let mut clients = Vec::new();
    for _ in 0..50 {
        clients.push(connect(&proxy, "").await);
    }
    // Fifty clients are connected; the server has at most the pool's three for them.
    assert!(backends_of_app(&s.pg) <= 3);
    let mut tasks = Vec::new();
    for (i, c) in clients.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            for n in 0..10 {
                c.batch_execute(&format!(
                    "BEGIN; INSERT INTO ledger VALUES ({i}, {n}); COMMIT"
                ))
                .await
                .map_err(|e| format!("client {i}: {e:?}"))?;
                let seen: i64 = c
                    .query_one(
                        "SELECT count(*) FROM ledger WHERE client = $1",
                        &[&(i as i32)],
                    )
                    .await
                    .map_err(|e| format!("client {i}: {e:?}"))?
                    .get(0);
                assert_eq!(seen, n + 1);
            }
            Ok::<_, String>(c)
        }));
    }
    let mut kept = Vec::new();
    for t in tasks {
        kept.push(t.await.unwrap().unwrap());
    }
    assert_eq!(s.pg.psql("SELECT count(*) FROM ledger"), "500");
    assert!(backends_of_app(&s.pg) <= 3, "{}", backends_of_app(&s.pg));
    assert_eq!(metric(&proxy, PINNED), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_and_search_path_follow_each_client_to_whichever_connection_it_gets() {
    let s = setup();
    s.pg.psql("CREATE SCHEMA elsewhere; GRANT USAGE ON SCHEMA elsewhere TO app");
    let proxy = Proxy::start(pooled(&s, 1)).await;
    let a = connect(
        &proxy,
        "application_name=alpha options='-c search_path=elsewhere'",
    )
    .await;
    let b = connect(&proxy, "application_name=beta").await;
    for _ in 0..5 {
        assert_eq!(first_value(&a, "SHOW application_name").await, "alpha");
        assert_eq!(first_value(&b, "SHOW application_name").await, "beta");
        assert_eq!(first_value(&a, "SHOW search_path").await, "elsewhere");
        assert_eq!(
            first_value(&b, "SHOW search_path").await,
            "\"$user\", public"
        );
    }
    // One backend served both, one transaction at a time.
    assert_eq!(
        first_value(&a, "SELECT pg_backend_pid()::text").await,
        first_value(&b, "SELECT pg_backend_pid()::text").await
    );
    // A setting PostgreSQL reports follows a SET, without pinning.
    a.batch_execute("SET application_name = 'alpha2'; SET TimeZone = 'Asia/Tokyo'")
        .await
        .unwrap();
    assert_eq!(first_value(&b, "SHOW application_name").await, "beta");
    assert_eq!(
        first_value(&b, "SHOW TimeZone").await,
        s.pg.psql("SHOW TimeZone")
    );
    assert_eq!(first_value(&a, "SHOW application_name").await, "alpha2");
    assert_eq!(first_value(&a, "SHOW TimeZone").await, "Asia/Tokyo");
    assert_eq!(metric(&proxy, PINNED), 0.0);
}

/// Each feature whose state lives in the backend pins the client: it keeps seeing that state
/// while another client runs transactions on the pool, and is counted as pinned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_feature_tied_to_a_backend_pins_its_client() {
    let s = setup();
    let proxy = Proxy::start(pooled(&s, 2)).await;
    let features: [(&str, &str, &str); 7] = [
        ("SET work_mem = '1234kB'", "SHOW work_mem", "1234kB"),
        (
            "CREATE TEMP TABLE mine AS SELECT 7 AS x",
            "SELECT x::text FROM mine",
            "7",
        ),
        ("PREPARE p AS SELECT 8", "EXECUTE p", "8"),
        (
            "SELECT pg_advisory_lock(99)",
            "SELECT count(*)::text FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
            "1",
        ),
        (
            "LISTEN somewhere",
            "SELECT count(*)::text FROM pg_listening_channels()",
            "1",
        ),
        (
            "BEGIN; DECLARE c CURSOR WITH HOLD FOR SELECT 9; COMMIT",
            "SELECT count(*)::text FROM pg_cursors WHERE name = 'c'",
            "1",
        ),
        (
            "SELECT set_config('work_mem', '2345kB', false)",
            "SHOW work_mem",
            "2345kB",
        ),
    ];
    let other = connect(&proxy, "").await;
    for (feature, check, expected) in features {
        let c = connect(&proxy, "").await;
        c.batch_execute(feature).await.unwrap();
        let pid = first_value(&c, "SELECT pg_backend_pid()::text").await;
        assert_eq!(metric(&proxy, PINNED), 1.0, "{feature}");
        for _ in 0..3 {
            // The other client's transactions go to the other connection.
            assert_ne!(
                first_value(&other, "SELECT pg_backend_pid()::text").await,
                pid
            );
            assert_eq!(first_value(&c, check).await, expected, "{feature}");
            assert_eq!(first_value(&c, "SELECT pg_backend_pid()::text").await, pid);
        }
        drop(c);
        crate::support::eventually("the pinned client gone", Duration::from_secs(5), || async {
            (metric(&proxy, PINNED) == 0.0).then_some(())
        })
        .await;
    }
    // The connections were reset when their pinned clients left: nothing is left behind.
    assert_eq!(
        s.pg.psql("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"),
        "0"
    );
    for _ in 0..4 {
        assert_eq!(first_value(&other, "SHOW work_mem").await, "4MB");
        assert_eq!(
            first_value(&other, "SELECT count(*)::text FROM pg_prepared_statements").await,
            "0"
        );
    }
}

/// tokio-postgres prepares every statement under its own names (s0, s1, …), the same names in
/// every client for different statements: on whichever connection a client's transaction
/// lands, its names must mean its statements.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_follow_their_clients_across_server_connections() {
    let s = setup();
    let proxy = Arc::new(Proxy::start(pooled(&s, 3)).await);
    let mut tasks = Vec::new();
    for i in 0..20i32 {
        let proxy = proxy.clone();
        tasks.push(tokio::spawn(async move {
            let c = connect(&proxy, "").await;
            // Statement s0 of every client, each a different text.
            let mine = c
                .prepare(&format!("SELECT $1::int + {}", i * 1000))
                .await
                .unwrap();
            let pid = c.prepare("SELECT pg_backend_pid()").await.unwrap();
            let mut pids = std::collections::HashSet::new();
            for n in 0..40i32 {
                let v: i32 = c.query_one(&mine, &[&n]).await.unwrap().get(0);
                assert_eq!(v, i * 1000 + n, "client {i}");
                pids.insert(c.query_one(&pid, &[]).await.unwrap().get::<_, i32>(0));
            }
            pids.len()
        }));
    }
    let mut moved = 0;
    for t in tasks {
        if t.await.unwrap() > 1 {
            moved += 1;
        }
    }
    assert!(
        moved > 0,
        "no client's statements ran on more than one backend"
    );
    assert!(backends_of_app(&s.pg) <= 3);
    assert_eq!(metric(&proxy, PINNED), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_prepared_runs_clean_over_a_small_pool() {
    let s = setup();
    let bin = crate::support::pg_bin_dir();
    let init = Command::new(bin.join("pgbench"))
        .args(["-i", "-q", "-s", "1", "-h", "127.0.0.1", "-U", "postgres"])
        .args(["-p", &s.pg.port.to_string(), "postgres"])
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let proxy = Proxy::start(pooled(&s, 4)).await;
    let port = proxy.addr.port().to_string();
    // TPC-B holds a connection across statements; pgbench prepares each statement with a
    // blocking call, so clients sharing a pgbench thread would wait for each other's
    // connection (as through any transaction pooler): one thread per client there.
    for (mode, select_only, clients, threads) in [
        ("prepared", true, "20", "2"),
        ("prepared", false, "8", "8"),
        ("extended", false, "8", "8"),
        ("simple", false, "8", "8"),
    ] {
        let mut cmd = tokio::process::Command::new(bin.join("pgbench"));
        cmd.args(["-n", "-c", clients, "-j", threads, "-t", "50", "-M", mode])
            .args(["-h", "127.0.0.1", "-U", "postgres", "-p", &port, "postgres"])
            .env("PGPASSWORD", "pg-secret");
        if select_only {
            cmd.arg("-S");
        }
        let out = cmd.output().await.unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "-M {mode}: {text}");
        assert!(
            text.contains("number of failed transactions: 0") || !text.contains("failed"),
            "-M {mode}: {text}"
        );
        let total = clients.parse::<u32>().unwrap() * 50;
        assert!(
            text.contains(&format!("{total}/{total}")),
            "-M {mode}: {text}"
        );
    }
    let postgres_backends: u32 = s
        .pg
        .psql("SELECT count(*) FROM pg_stat_activity WHERE usename = 'postgres' AND application_name = 'pgbench'")
        .parse()
        .unwrap();
    assert!(postgres_backends <= 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_reaches_the_backend_running_the_clients_transaction_and_nothing_else() {
    let s = setup();
    let proxy = Proxy::start(pooled(&s, 2)).await;
    let c = connect(&proxy, "").await;
    let token = c.cancel_token();
    // Between transactions the key points nowhere: a cancel does nothing to anyone.
    let other = connect(&proxy, "").await;
    let busy =
        tokio::spawn(async move { other.simple_query("SELECT pg_sleep(1)").await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(200)).await;
    token.cancel_query(NoTls).await.unwrap();
    busy.await
        .unwrap()
        .expect("another client's statement was cancelled");
    // During its own statement it cancels that.
    let sleeper = tokio::spawn(async move { c.simple_query("SELECT pg_sleep(30)").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    token.cancel_query(NoTls).await.unwrap();
    let e = sleeper.await.unwrap().expect_err("the sleep was cancelled");
    assert_eq!(sqlstate(&e), "57014");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_cancels_the_statement_and_the_client_keeps_its_session_and_the_pool_its_connection()
 {
    let s = setup();
    let mut config = pooled(&s, 1);
    config.timeouts.read = Duration::from_millis(500);
    let proxy = Proxy::start(config).await;
    let c = connect(&proxy, "").await;
    let started = Instant::now();
    let e = c
        .simple_query("SELECT pg_sleep(10)")
        .await
        .expect_err("the deadline cancelled it");
    assert_eq!(sqlstate(&e), "57014");
    assert!(started.elapsed() < Duration::from_millis(500) + Duration::from_secs(1));
    // The session goes on, and the one connection went back: another client gets it.
    assert_eq!(first_value(&c, "SELECT 'again'").await, "again");
    let other = connect(&proxy, "").await;
    assert_eq!(first_value(&other, "SELECT 'other'").await, "other");
}

/// A failover under transaction pooling ends no session: the transaction in flight finishes on
/// the old primary's connection, which is then closed, and the next goes to the new primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failover_the_next_transaction_goes_to_the_new_primary_on_the_same_session() {
    let s = setup();
    let standby = Cluster::standby_of(&s.pg);
    let mut config = pooled(&s, 2);
    config.database.hosts = vec![s.pg.addr(), standby.addr()];
    config.probe.timeout = Duration::from_millis(400);
    let proxy = Proxy::start(config).await;
    let c = connect(&proxy, "").await;
    c.batch_execute("INSERT INTO ledger VALUES (1, 1)")
        .await
        .unwrap();
    standby.promote();
    crate::support::eventually(
        "a write on the new primary",
        Duration::from_secs(20),
        || async {
            c.batch_execute("INSERT INTO ledger VALUES (2, 2)")
                .await
                .ok()?;
            (standby.psql("SELECT count(*) FROM ledger WHERE client = 2") != "0").then_some(())
        },
    )
    .await;
    // Every write after the promotion was seen by the new primary only once, on this session.
    c.batch_execute("INSERT INTO ledger VALUES (3, 3)")
        .await
        .unwrap();
    assert_eq!(
        standby.psql("SELECT count(*) FROM ledger WHERE client = 3"),
        "1"
    );
    assert_eq!(
        s.pg.psql("SELECT count(*) FROM ledger WHERE client = 3"),
        "0"
    );
    // The old primary's pooled connections are closed (when returned, or by the pool's upkeep).
    crate::support::eventually(
        "no pooled connection left on the old primary",
        Duration::from_secs(5),
        || async {
            (s.pg
                .psql("SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'")
                == "0")
                .then_some(())
        },
    )
    .await;
}

/// In transaction pooling a connected client holds no backend between transactions; one of
/// the pool's idle backends ended by the server meanwhile is closed, not given to the client's
/// next transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_ended_while_idle_in_the_pool_does_not_fail_the_next_transaction() {
    let s = setup();
    let proxy = Proxy::start(pooled(&s, 1)).await;
    let c = connect(&proxy, "").await;
    c.batch_execute("SELECT 1").await.unwrap();
    assert_eq!(backends_of_app(&s.pg), 1);
    s.pg.psql_local("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'app'");
    crate::support::eventually("the backend gone", Duration::from_secs(5), || async {
        (backends_of_app(&s.pg) == 0).then_some(())
    })
    .await;
    for n in 0..3 {
        c.batch_execute(&format!("INSERT INTO ledger VALUES (1, {n})"))
            .await
            .unwrap_or_else(|e| panic!("transaction {n} after the kill: {e}"));
    }
    assert_eq!(
        first_value(&c, "SELECT count(*)::text FROM ledger").await,
        "3"
    );
}

/// bulkhead reads a client's login messages as they arrive, several at once when the client
/// sends ahead: a query sent with the last SASL message, before the login is confirmed (as
/// PostgreSQL allows, since it reads a client's bytes in bulk too), is answered after the
/// login, not lost or taken for part of the login.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_sent_with_the_last_login_message_is_answered_after_the_login() {
    use crate::support::raw::{Raw, msg};
    let s = setup();
    let proxy = Proxy::start(pooled(&s, 1)).await;
    let mut raw = Raw::connect(proxy.addr).await;
    let login = raw
        .login_scram_sending_ahead("app", "app-secret", &msg(b'Q', b"SELECT 41 + 1\0"))
        .await;
    assert_eq!(login.last().map(|m| m.0), Some(b'Z'), "{login:?}");
    let answer = raw.recv_until(b'Z').await;
    let tags: String = answer.iter().map(|m| m.0 as char).collect();
    assert_eq!(tags, "TDCZ", "{answer:?}");
    let row = &answer[1].1;
    assert_eq!(&row[6..], b"42");
}

/// Protocol-level statements as PostgreSQL has them, though the client's connection changes
/// under it and other clients use the same names: a name Parsed a second time gets 42P05 and
/// the client keeps its first statement; a Parse the server refused leaves the name free; a
/// name Parsed twice in one batch fails the batch at the second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_name_parsed_twice_gets_42p05_as_from_postgresql() {
    use crate::support::raw::{Raw, field, msg};
    let s = setup();
    let proxy = Proxy::start(pooled(&s, 1)).await;
    let mut a = Raw::connect(proxy.addr).await;
    a.login_scram("app", "app-secret").await;
    let mut b = Raw::connect(proxy.addr).await;
    b.login_scram("app", "app-secret").await;
    let parse = |name: &str, sql: &str| msg(b'P', format!("{name}\0{sql}\0\0\0").as_bytes());
    let run = |name: &str| {
        let mut m = msg(b'B', format!("\0{name}\0\0\0\0\0\0\0").as_bytes());
        m.extend(msg(b'E', b"\0\0\0\0\0"));
        m.extend(msg(b'S', b""));
        m
    };
    let sync = || msg(b'S', b"");
    // What a batch got: its message tags, the first error's SQLSTATE, the first value.
    async fn answer(raw: &mut Raw) -> (String, Option<String>, Option<String>) {
        let got = raw.recv_until(b'Z').await;
        let tags = got.iter().map(|m| m.0 as char).collect();
        let code = got
            .iter()
            .find(|m| m.0 == b'E')
            .and_then(|m| field(&m.1, b'C'));
        let value = got.iter().find(|m| m.0 == b'D').map(|m| {
            let len = i32::from_be_bytes(m.1[2..6].try_into().unwrap()) as usize;
            String::from_utf8_lossy(&m.1[6..6 + len]).into_owned()
        });
        (tags, code, value)
    }

    // A prepares "dup" (1); B, on the same server connection, prepares its own "dup" (2).
    a.send(&[parse("dup", "SELECT 1"), sync()].concat()).await;
    assert_eq!(answer(&mut a).await.0, "1Z");
    b.send(&[parse("dup", "SELECT 2"), run("dup")].concat())
        .await;
    assert_eq!(answer(&mut b).await.2.as_deref(), Some("2"));
    // A Parses "dup" again: PostgreSQL's 42P05, and A's "dup" is still SELECT 1.
    a.send(&[parse("dup", "SELECT 3"), run("dup")].concat())
        .await;
    let (tags, code, _) = answer(&mut a).await;
    assert_eq!((tags.as_str(), code.as_deref()), ("EZ", Some("42P05")));
    a.send(&run("dup")).await;
    assert_eq!(answer(&mut a).await.2.as_deref(), Some("1"));
    b.send(&run("dup")).await;
    assert_eq!(answer(&mut b).await.2.as_deref(), Some("2"));

    // A Parse the server refused leaves its name free.
    a.send(&[parse("broken", "SELEC 4"), sync()].concat()).await;
    assert_eq!(answer(&mut a).await.1.as_deref(), Some("42601"));
    a.send(&[parse("broken", "SELECT 4"), run("broken")].concat())
        .await;
    assert_eq!(answer(&mut a).await.2.as_deref(), Some("4"));

    // Twice in one batch: the second Parse fails it, the first statement stays.
    a.send(
        &[
            parse("twice", "SELECT 5"),
            parse("twice", "SELECT 6"),
            sync(),
        ]
        .concat(),
    )
    .await;
    let (tags, code, _) = answer(&mut a).await;
    assert_eq!((tags.as_str(), code.as_deref()), ("1EZ", Some("42P05")));
    a.send(&run("twice")).await;
    assert_eq!(answer(&mut a).await.2.as_deref(), Some("5"));

    // After a Close, the name can be prepared again.
    a.send(&[msg(b'C', b"Sdup\0"), parse("dup", "SELECT 7"), run("dup")].concat())
        .await;
    let (tags, code, value) = answer(&mut a).await;
    assert_eq!((code, value.as_deref()), (None, Some("7")), "{tags}");
    assert_eq!(metric(&proxy, PINNED), 0.0);
}
