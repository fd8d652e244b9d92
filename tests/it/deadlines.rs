//! Issue 3: no statement hangs a client past its deadline, and the client always learns the
//! truth. Faults are real: locks, a stalled commit path, stopped backends.

use std::time::Duration;

use tokio::time::Instant;
use tokio_postgres::{Client, NoTls};

use crate::support::{
    Binary, Cluster, Frozen, Proxy, assert_answers, config_for, connect_watched, eventually,
    sqlstate,
};

const READ: Duration = Duration::from_millis(1500);
const WRITE: Duration = Duration::from_millis(500);
const GRACE: Duration = Duration::from_millis(700);
const SLACK: Duration = Duration::from_secs(1);

async fn setup_with(settings: &[&str]) -> (Cluster, Proxy) {
    let pg = Cluster::start_with(settings);
    pg.psql(
        "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'old'), (2, 'two')",
    );
    let mut config = config_for(&pg);
    config.timeouts.read = READ;
    config.timeouts.write = WRITE;
    config.timeouts.cancel_grace = GRACE;
    // These tests cause write timeouts on purpose; the circuit is tested on its own.
    config.circuit.failure_threshold = 1000;
    // And some run more statements at once than the default limits admit.
    config.limits.max_inflight = 100;
    config.limits.max_inflight_writes = 100;
    let proxy = Proxy::start(config).await;
    (pg, proxy)
}

async fn setup() -> (Cluster, Proxy) {
    setup_with(&[]).await
}

/// A direct session that holds row 1 of t locked until dropped or committed.
async fn lock_row(pg: &Cluster) -> Client {
    let holder = pg.connect().await;
    holder
        .batch_execute("BEGIN; SELECT * FROM t WHERE id = 1 FOR UPDATE")
        .await
        .unwrap();
    holder
}

/// The server pid behind a session. A simple query, because query_one would leave behind a
/// statement whose deferred Close becomes the next request on the wire.
async fn backend_pid(client: &Client) -> i32 {
    let msgs = client
        .simple_query("SELECT pg_backend_pid()")
        .await
        .unwrap();
    match &msgs[1] {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).unwrap().parse().unwrap(),
        _ => panic!("no row"),
    }
}

fn error_message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_else(|| e.to_string())
}

async fn value_of_row_1(pg: &Cluster) -> String {
    pg.psql("SELECT v FROM t WHERE id = 1")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_sleep_beyond_the_read_deadline_gets_57014_and_the_session_goes_on() {
    let (pg, proxy) = setup().await;
    let c = proxy.connect().await;
    let started = Instant::now();
    let err = c
        .simple_query("SELECT pg_sleep(30) /* too slow */")
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert_eq!(sqlstate(&err), "57014");
    assert!(
        error_message(&err).contains("read deadline of 1s 500ms passed"),
        "{}",
        error_message(&err)
    );
    assert!(
        took >= READ && took < READ + GRACE + SLACK,
        "answered after {took:?}"
    );
    assert_answers(&c).await;
    let gone = pg.psql("SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%too slow%' AND state = 'active' AND pid <> pg_backend_pid()");
    assert_eq!(gone, "0");
    assert_eq!(
        proxy.metric("bulkhead_statements_total{class=\"read\",outcome=\"timeout\"}"),
        1.0
    );
    assert_eq!(proxy.metric("bulkhead_cancels_sent_total"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_longer_than_the_write_deadline_but_within_the_read_deadline_succeeds() {
    let (_pg, proxy) = setup().await;
    let c = proxy.connect().await;
    c.simple_query("SELECT pg_sleep(0.8)").await.unwrap();
    let row = c
        .query_one("SELECT pg_sleep(0.8)::text, 7::int", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(1), 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_blocked_by_a_row_lock_is_cancelled_at_the_write_deadline() {
    let (pg, proxy) = setup().await;
    let holder = lock_row(&pg).await;
    let c = proxy.connect().await;
    let started = Instant::now();
    let err = c
        .simple_query("UPDATE t SET v = 'new' WHERE id = 1")
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert_eq!(sqlstate(&err), "57014");
    assert!(
        error_message(&err).contains("write deadline of 500ms"),
        "{}",
        error_message(&err)
    );
    assert!(
        took >= WRITE && took < WRITE + GRACE + SLACK,
        "answered after {took:?}"
    );
    holder.batch_execute("COMMIT").await.unwrap();
    assert_eq!(value_of_row_1(&pg).await, "old");
    c.simple_query("UPDATE t SET v = 'later' WHERE id = 1")
        .await
        .unwrap();
    assert_eq!(value_of_row_1(&pg).await, "later");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_update_inside_a_transaction_block_aborts_it_and_rollback_recovers() {
    let (pg, proxy) = setup().await;
    let holder = lock_row(&pg).await;
    let c = proxy.connect().await;
    c.batch_execute("BEGIN").await.unwrap();
    c.batch_execute("UPDATE t SET v = 'in-tx' WHERE id = 2")
        .await
        .unwrap();
    let err = c
        .batch_execute("UPDATE t SET v = 'new' WHERE id = 1")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), "57014");
    let err = c.batch_execute("SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&err), "25P02");
    c.batch_execute("ROLLBACK").await.unwrap();
    holder.batch_execute("COMMIT").await.unwrap();
    assert_eq!(
        pg.psql("SELECT string_agg(v, ',' ORDER BY id) FROM t"),
        "old,two"
    );
    assert_answers(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_prepared_statement_and_pipelined_neighbours_each_get_the_truth() {
    let (pg, proxy) = setup().await;
    let holder = lock_row(&pg).await;
    let c = proxy.connect().await;
    let update = c
        .prepare("UPDATE t SET v = $1 WHERE id = $2")
        .await
        .unwrap();
    let started = Instant::now();
    let err = c.execute(&update, &[&"prepared", &1i32]).await.unwrap_err();
    assert_eq!(sqlstate(&err), "57014");
    assert!(started.elapsed() < WRITE + GRACE + SLACK);
    // In a pipeline: the request before the stuck one succeeds, the stuck one is cancelled at
    // its own deadline, and the one after it runs normally.
    let (before, stuck, after) = tokio::join!(
        c.query_one("SELECT 'before'::text", &[]),
        c.execute(&update, &[&"pipelined", &1i32]),
        c.execute(&update, &[&"after", &2i32]),
    );
    assert_eq!(before.unwrap().get::<_, String>(0), "before");
    assert_eq!(sqlstate(&stuck.unwrap_err()), "57014");
    assert_eq!(after.unwrap(), 1);
    holder.batch_execute("COMMIT").await.unwrap();
    assert_eq!(
        pg.psql("SELECT string_agg(v, ',' ORDER BY id) FROM t"),
        "old,after"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_commit_path_gets_a_truthful_answer_in_bounded_time() {
    let (pg, proxy) = setup().await;
    pg.psql("ALTER SYSTEM SET synchronous_standby_names = 'missing'");
    pg.psql("SELECT pg_reload_conf()");
    let c = proxy.params("postgres");
    // Autocommit INSERT and an explicit COMMIT, each through its own session.
    let autocommit = async {
        let (client, conn) = tokio_postgres::connect(&c, NoTls).await.unwrap();
        tokio::spawn(conn);
        let started = Instant::now();
        let result = client
            .simple_query("INSERT INTO t VALUES (10, 'autocommit')")
            .await;
        (result.map(|_| ()), started.elapsed())
    };
    let explicit = async {
        let (client, conn) = tokio_postgres::connect(&c, NoTls).await.unwrap();
        tokio::spawn(conn);
        client
            .batch_execute("BEGIN; INSERT INTO t VALUES (11, 'explicit')")
            .await
            .unwrap();
        let started = Instant::now();
        let result = client.batch_execute("COMMIT").await;
        (result, started.elapsed())
    };
    let (a, b) = tokio::join!(autocommit, explicit);
    pg.psql("ALTER SYSTEM RESET synchronous_standby_names");
    pg.psql("SELECT pg_reload_conf()");
    for ((result, took), id) in [(a, 10), (b, 11)] {
        assert!(
            took < WRITE + GRACE + SLACK,
            "row {id}: answered after {took:?}"
        );
        let present = pg.psql(&format!("SELECT count(*) FROM t WHERE id = {id}")) == "1";
        match result {
            Ok(()) => assert!(
                present,
                "row {id}: success reported but the row is not there"
            ),
            Err(e) if sqlstate(&e) == "57014" => {
                assert!(!present, "row {id}: 57014 but the row is there")
            }
            Err(e) => {
                assert_eq!(sqlstate(&e), "40003", "row {id}: {e:?}");
                let db = e.as_db_error().unwrap();
                assert!(
                    db.message().contains("synchronous replication"),
                    "{}",
                    db.message()
                );
                assert!(db.hint().unwrap_or("").contains("pg_xact_status"));
            }
        }
    }
    assert!(proxy.metric("bulkhead_statements_total{class=\"write\",outcome=\"timeout\"}") >= 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_backend_gets_fatal_40003_for_a_write_and_57014_for_a_read() {
    let (pg, proxy) = setup().await;
    let admin = pg.connect().await;
    for (sql, class_deadline, code) in [
        ("INSERT INTO t VALUES (20, 'stopped')", WRITE, "40003"),
        ("SELECT count(*) FROM t", READ, "57014"),
    ] {
        let (client, conn) = connect_watched(&proxy.params("postgres")).await;
        let pid = backend_pid(&client).await;
        let stopped = Frozen::stop(vec![pid]);
        let started = Instant::now();
        let err = client.simple_query(sql).await.unwrap_err();
        let took = started.elapsed();
        drop(stopped);
        assert_eq!(sqlstate(&err), code, "{sql}: {err:?}");
        assert_eq!(err.as_db_error().unwrap().severity(), "FATAL");
        assert!(
            took >= class_deadline && took < class_deadline + GRACE + SLACK,
            "{sql}: after {took:?}"
        );
        tokio::time::timeout(Duration::from_secs(5), conn)
            .await
            .expect("client connection closed")
            .unwrap()
            .ok();
        // The resumed backend finds its connection closed and goes away without harm.
        eventually(
            "the resumed backend to exit",
            Duration::from_secs(10),
            || async {
                let n: i64 = admin
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity WHERE pid = $1",
                        &[&pid],
                    )
                    .await
                    .unwrap()
                    .get(0);
                (n == 0).then_some(())
            },
        )
        .await;
    }
    assert_answers(&proxy.connect().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_clients_stuck_on_one_lock_are_each_answered_within_the_deadline() {
    let (pg, proxy) = setup().await;
    let holder = lock_row(&pg).await;
    let mut waiters = Vec::new();
    for i in 0..40 {
        let params = proxy.params("postgres");
        waiters.push(tokio::spawn(async move {
            let (client, conn) = tokio_postgres::connect(&params, NoTls).await.unwrap();
            tokio::spawn(conn);
            let started = Instant::now();
            let result = client
                .simple_query(&format!("UPDATE t SET v = 'w{i}' WHERE id = 1"))
                .await;
            (result.err().map(|e| sqlstate(&e)), started.elapsed())
        }));
    }
    for w in waiters {
        let (code, took) = w.await.unwrap();
        assert_eq!(code.as_deref(), Some("57014"));
        assert!(took < WRITE + GRACE + SLACK, "answered after {took:?}");
    }
    holder.batch_execute("COMMIT").await.unwrap();
    assert_eq!(value_of_row_1(&pg).await, "old");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_that_stops_reading_counts_as_a_stuck_write() {
    let (_pg, proxy) = setup().await;
    let (client, conn) = tokio_postgres::connect(&proxy.params("postgres"), NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let pid = backend_pid(&client).await;
    let stopped = Frozen::stop(vec![pid]);
    // A pipeline of reads, each small enough to be classified whole (so a read, with the long
    // read deadline) but together far more than the socket buffers hold: bulkhead's writes to
    // the stopped server block, and that stall is what must be caught.
    let query = format!("SELECT length('{}')", "x".repeat(50_000));
    let started = Instant::now();
    let results =
        futures_util::future::join_all((0..400).map(|_| client.simple_query(&query))).await;
    let took = started.elapsed();
    drop(stopped);
    let fatal = results
        .iter()
        .find_map(|r| {
            r.as_ref().err().and_then(|e| {
                e.as_db_error()
                    .map(|d| (d.code().code().to_string(), d.message().to_string()))
            })
        })
        .expect("a FATAL error for the stuck request");
    assert_eq!(fatal.0, "40003");
    assert!(
        fatal
            .1
            .contains("accepted no data for the write deadline of 500ms"),
        "{}",
        fatal.1
    );
    assert!(took < WRITE + GRACE + SLACK, "after {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_changes_the_deadline_of_sessions_already_open() {
    let pg = Cluster::start();
    let bin = Binary::start(&pg, "[timeouts]\nread = \"30s\"\n").await;
    let c = crate::support::connect(&bin.params()).await;
    let pid = backend_pid(&c).await;
    c.simple_query("SELECT pg_sleep(0.6)").await.unwrap();
    std::fs::write(
        &bin.config_path,
        Binary::config_text(bin.port, &pg, "[timeouts]\nread = \"300ms\"\n"),
    )
    .unwrap();
    bin.signal(libc::SIGHUP);
    let err = eventually(
        "the new read deadline to apply",
        Duration::from_secs(10),
        || async { c.simple_query("SELECT pg_sleep(0.6)").await.err() },
    )
    .await;
    assert_eq!(sqlstate(&err), "57014");
    assert!(
        error_message(&err).contains("read deadline of 300ms"),
        "{}",
        error_message(&err)
    );
    assert_eq!(backend_pid(&c).await, pid, "the session was kept");
}
