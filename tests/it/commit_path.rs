//! Issue 17: the write circuit moves only on evidence about the commit path, under the traffic
//! applications send (writes inside BEGIN … COMMIT, a connection per request, backends
//! terminated), and a stuck or frozen host gives its clients an answer within the probe's
//! detection time rather than at their deadlines.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use bulkhead::Config;

use crate::support::raw::{Raw, msg};
use crate::support::{
    Cluster, Frozen, Proxy, config_for, connect, connect_watched, eventually, first_value,
    heartbeat_connected, sqlstate,
};

const SECONDS_20: Duration = Duration::from_secs(20);

/// Quick probing and short deadlines, so faults show within seconds.
fn fast_config(pg: &Cluster) -> Config {
    let mut config = config_for(pg);
    config.database.connect_timeout = Duration::from_millis(1000);
    config.probe.interval = Duration::from_millis(200);
    config.probe.timeout = Duration::from_millis(400);
    config.timeouts.write = Duration::from_millis(800);
    config.timeouts.cancel_grace = Duration::from_millis(500);
    config.circuit.failure_threshold = 3;
    config.circuit.open_for = Duration::from_secs(1);
    config.circuit.hold_new_connections = Duration::from_secs(1);
    config
}

fn stall_commits(pg: &Cluster) {
    pg.psql("CREATE TABLE IF NOT EXISTS stall_witness (x int)");
    pg.psql("ALTER SYSTEM SET synchronous_standby_names = 'missing'");
    pg.psql("SELECT pg_reload_conf()");
    // The reload reaches backends before it reaches the checkpointer, which is what turns
    // synchronous replication on for everyone: on a loaded machine a COMMIT sent after a
    // backend already showed the new setting once went straight through. So a commit of the
    // test's own (psql, in a thread; it waits until `heal_commits`) must be seen waiting.
    let mut witness = pg.psql_command("INSERT INTO stall_witness VALUES (1)");
    std::thread::spawn(move || {
        let _ = witness.output();
    });
    let deadline = std::time::Instant::now() + SECONDS_20;
    while pg.psql(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE wait_event = 'SyncRep' AND query LIKE 'INSERT INTO stall_witness%'",
    ) == "0"
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no commit waited for the missing standby within {SECONDS_20:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn heal_commits(pg: &Cluster) {
    pg.psql("ALTER SYSTEM RESET synchronous_standby_names");
    pg.psql("SELECT pg_reload_conf()");
}

fn circuit_state(proxy: &Proxy) -> f64 {
    let text = proxy.bulkhead.metrics().render();
    text.lines()
        .find(|l| l.starts_with("bulkhead_circuit_state{"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(-1.0)
}

fn openings(proxy: &Proxy) -> f64 {
    proxy.metric(&format!(
        "bulkhead_circuit_openings_total{{backend=\"{}\"}}",
        proxy.bulkhead.topology().hosts()[0].address
    ))
}

/// `writers` tasks run `BEGIN; INSERT; COMMIT` in a loop, as the workers of a pooled web
/// application do: a connection that bulkhead closes (a FATAL) is replaced by a new one, as a
/// pool replaces it. Counts the commits that succeeded.
fn transactional_writers(
    params: String,
    writers: usize,
    stop: Arc<AtomicBool>,
) -> (Arc<AtomicU32>, Vec<tokio::task::JoinHandle<()>>) {
    let committed = Arc::new(AtomicU32::new(0));
    let tasks = (0..writers)
        .map(|n| {
            let (stop, committed, params) = (stop.clone(), committed.clone(), params.clone());
            tokio::spawn(async move {
                // Staggered, so that commits do not all stall and time out together.
                tokio::time::sleep(Duration::from_millis(37 * n as u64)).await;
                let mut i = 0;
                let mut conn: Option<tokio_postgres::Client> = None;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let c = match &mut conn {
                        Some(c) if !c.is_closed() => c,
                        _ => match tokio_postgres::connect(&params, tokio_postgres::NoTls).await {
                            Ok((c, driver)) => {
                                tokio::spawn(driver);
                                conn.insert(c)
                            }
                            Err(_) => {
                                tokio::time::sleep(Duration::from_millis(50)).await;
                                continue;
                            }
                        },
                    };
                    let id = n as i32 * 100_000 + i;
                    if let Ok(tx) = c.transaction().await
                        && tx
                            .execute("INSERT INTO tw VALUES ($1)", &[&id])
                            .await
                            .is_ok()
                        && tx.commit().await.is_ok()
                    {
                        committed.fetch_add(1, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(30)).await;
                }
            })
        })
        .collect();
    (committed, tasks)
}

/// The incident itself: an application that writes only inside transactions. Before, the
/// INSERT inside each new transaction counted as a successful write and undid the COMMIT that
/// had just failed, so the circuit never opened, or closed again while every COMMIT still hung.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactional_writers_with_commits_stalled_open_the_circuit_and_keep_it_open_until_the_stall_ends()
 {
    let pg = Cluster::start();
    pg.psql("CREATE TABLE tw (x int)");
    let proxy = Proxy::start(fast_config(&pg)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (committed, writers) = transactional_writers(proxy.params("postgres"), 6, stop.clone());
    eventually("healthy commits", SECONDS_20, || async {
        (committed.load(Ordering::Relaxed) >= 20).then_some(())
    })
    .await;

    stall_commits(&pg);
    let stalled = Instant::now();
    eventually("the write circuit to open", SECONDS_20, || async {
        (circuit_state(&proxy) == 2.0).then_some(())
    })
    .await;
    let opened_after = stalled.elapsed();
    // Stays out of "closed" for as long as commits stall, though the writers keep starting
    // transactions whose INSERTs would succeed (half-open is allowed: it refuses them too).
    let watch_until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < watch_until {
        assert_ne!(
            circuit_state(&proxy),
            0.0,
            "the circuit closed while commits still stalled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let during = committed.load(Ordering::Relaxed);

    heal_commits(&pg);
    let healed = Instant::now();
    eventually("the circuit to close", SECONDS_20, || async {
        (circuit_state(&proxy) == 0.0).then_some(())
    })
    .await;
    let closed_after = healed.elapsed();
    let c = proxy.connect().await;
    c.batch_execute("BEGIN; INSERT INTO tw VALUES (-1); COMMIT")
        .await
        .expect("a transaction commits after the heal");
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        let _ = w.await;
    }
    assert!(
        opened_after < Duration::from_secs(5),
        "opened {opened_after:?} into the stall"
    );
    assert!(
        closed_after < Duration::from_secs(3),
        "closed {closed_after:?} after the heal"
    );
    // Nothing committed while the circuit was open can have been acknowledged: those
    // transactions were refused at their INSERT.
    let _ = during;
    assert_eq!(pg.psql("SELECT count(*) FROM tw WHERE x = -1"), "1");
}

/// Applications that open a connection per request, and test suites that terminate backends,
/// do this all day on a healthy database. Before, the server's close after the client's
/// Terminate could be seen first and counted as a lost server, and a terminated backend
/// counted too; with a threshold of one, either opened the circuit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_per_request_cycles_and_terminated_idle_backends_never_open_the_circuit() {
    let pg = Cluster::start();
    pg.psql("CREATE TABLE cw (x int)");
    let mut config = fast_config(&pg);
    config.circuit.failure_threshold = 1;
    let proxy = Proxy::start(config).await;
    let writer = proxy.connect().await;

    let params = proxy.params("postgres");
    let cycles: Vec<_> = (0..4)
        .map(|_| {
            let params = params.clone();
            tokio::spawn(async move {
                for _ in 0..500 {
                    let c = connect(&params).await;
                    assert_eq!(first_value(&c, "SELECT 1").await, "1");
                    drop(c); // tokio-postgres sends Terminate and closes
                }
            })
        })
        .collect();
    let mut refused = 0;
    let mut i = 0;
    while cycles.iter().any(|c| !c.is_finished()) {
        i += 1;
        if let Err(e) = writer
            .simple_query(&format!("INSERT INTO cw VALUES ({i})"))
            .await
        {
            refused += 1;
            eprintln!("write refused: {e:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for c in cycles {
        c.await.unwrap();
    }

    // A client that says Terminate and keeps its socket open hears nothing more: no FATAL
    // about a lost server after its own goodbye.
    for _ in 0..20 {
        let mut raw = Raw::connect(proxy.addr).await;
        raw.login("postgres").await;
        raw.send(&msg(b'X', b"")).await;
        let after = tokio::time::timeout(Duration::from_secs(5), raw.recv())
            .await
            .expect("bulkhead closes the connection after Terminate");
        assert_eq!(after, None, "nothing may follow Terminate");
    }

    // Backends terminated on a healthy server, idle and busy.
    let admin = pg.connect().await;
    for _ in 0..5 {
        let (victim, conn) = connect_watched(&params).await;
        let pid: i32 = first_value(&victim, "SELECT pg_backend_pid()")
            .await
            .parse()
            .unwrap();
        admin
            .execute("SELECT pg_terminate_backend($1)", &[&pid])
            .await
            .unwrap();
        let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
    }
    // Give the probe the look the lost connections asked for, then write again.
    tokio::time::sleep(Duration::from_millis(600)).await;
    writer
        .simple_query("INSERT INTO cw VALUES (0)")
        .await
        .expect("writes still flow");

    assert_eq!(refused, 0, "no write was refused");
    assert_eq!(openings(&proxy), 0.0, "the circuit never opened");
}

/// A COMMIT that hangs on the commit path holds an application's pooled connection. When the
/// circuit opens (here on the probe's write check, with the deadline far away) it is answered
/// at once with the truth: 40003, it may or may not have committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_commit_is_answered_within_a_second_of_the_circuit_opening() {
    let pg = Cluster::start();
    pg.psql("CREATE TABLE sc (x int)");
    let mut config = fast_config(&pg);
    config.timeouts.write = Duration::from_secs(60);
    config.circuit.failure_threshold = 1;
    // The probe's check stalls as soon as commits do, and its failure opens the circuit: a
    // longer timeout keeps it closed until this test's COMMIT is waiting too.
    config.probe.timeout = Duration::from_secs(2);
    let proxy = Proxy::start(config).await;
    let (c, conn) = connect_watched(&proxy.params("postgres")).await;
    c.batch_execute("BEGIN").await.unwrap();
    c.execute("INSERT INTO sc VALUES (1)", &[]).await.unwrap();

    stall_commits(&pg);
    assert_eq!(
        circuit_state(&proxy),
        0.0,
        "the circuit opened before the COMMIT was sent"
    );
    let commit = tokio::spawn(async move {
        let r = c.batch_execute("COMMIT").await;
        (r, Instant::now())
    });
    let opened = eventually("the write circuit to open", SECONDS_20, || async {
        (circuit_state(&proxy) == 2.0).then(Instant::now)
    })
    .await;
    let (result, answered) = tokio::time::timeout(Duration::from_secs(10), commit)
        .await
        .expect("the COMMIT is answered long before its 60 s deadline")
        .unwrap();
    let err = result.unwrap_err();
    assert_eq!(sqlstate(&err), "40003", "{err:?}");
    let db = err.as_db_error().unwrap();
    assert_eq!(db.severity(), "FATAL");
    assert!(db.message().contains("write circuit opened"), "{db:?}");
    let late = answered.saturating_duration_since(opened);
    assert!(
        late < Duration::from_secs(1),
        "answered {late:?} after the opening"
    );
    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
    heal_commits(&pg);
}

/// Readiness follows the write check, so it tells the truth about commits with no client
/// traffic at all, on the default probe timing, and comes back as soon as a check commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_turns_503_within_two_seconds_of_commits_stalling_and_200_within_a_second_of_healing()
 {
    let pg = Cluster::start();
    let proxy = Proxy::start(config_for(&pg)).await; // probe every 1 s, 1 s timeout
    eventually("ready", SECONDS_20, || async {
        (proxy.get("/readyz").await.status == 200).then_some(())
    })
    .await;

    stall_commits(&pg);
    let stalled = Instant::now();
    let reason = eventually("/readyz to say 503", SECONDS_20, || async {
        let r = proxy.get("/readyz").await;
        (r.status == 503).then_some(r.body)
    })
    .await;
    let not_ready_after = stalled.elapsed();
    assert!(reason.contains("write check"), "{reason}");
    let health = proxy.health_json().await;
    assert_eq!(health["status"], "degraded", "{health}");

    // Long enough for the circuit to open on the probe's checks alone.
    eventually("the write circuit to open", SECONDS_20, || async {
        (circuit_state(&proxy) == 2.0).then_some(())
    })
    .await;
    heal_commits(&pg);
    let healed = Instant::now();
    eventually("/readyz to say 200", SECONDS_20, || async {
        (proxy.get("/readyz").await.status == 200).then_some(())
    })
    .await;
    let ready_after = healed.elapsed();
    assert!(
        not_ready_after < Duration::from_millis(2000 + 1000),
        "503 after {not_ready_after:?}"
    );
    assert!(
        ready_after < Duration::from_millis(1000 + 1000),
        "200 after {ready_after:?}"
    );
    assert_eq!(circuit_state(&proxy), 0.0);
}

/// The error a statement got, and how long it took to get it.
async fn refused_in(c: &tokio_postgres::Client, sql: &str) -> (String, Duration) {
    let started = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(10), c.simple_query(sql))
        .await
        .unwrap_or_else(|_| panic!("{sql}: no answer within 10 s"))
        .expect_err(sql);
    (sqlstate(&err), started.elapsed())
}

/// A frozen primary (accepts TCP, answers nothing): before, the pooled connections sat in
/// their statements until the read deadline plus grace, and every new connection was held
/// for hold_new_connections; then they were closed, and a pool reconnecting into a frozen
/// host waited out its own timeouts. Now the probe's verdict answers what waits there at
/// once: a read is abandoned with ERROR 57P03 and the session kept, also inside a block
/// (which has failed); a statement sent later is answered at once, never sent; a ROLLBACK
/// succeeds. A write in flight may still commit (an autocommit INSERT; one inside a block
/// could be followed by COMMIT in the same Query), so its session ends as before (FATAL 40003,
/// reset). After the thaw the kept connections work again, and the server holds no
/// transaction the clients were told ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_primary_answers_waiting_statements_at_once_and_the_sessions_survive_the_thaw() {
    let pg = Cluster::start();
    pg.psql("CREATE TABLE frozen_t (x int)");
    let mut config = fast_config(&pg);
    config.timeouts.read = Duration::from_secs(30);
    config.timeouts.write = Duration::from_secs(30);
    let proxy = Proxy::start(config).await;
    let params = proxy.params("postgres");
    let (reader, reader_conn) = connect_watched(&params).await;
    let (writer, writer_conn) = connect_watched(&params).await;
    let (block, block_conn) = connect_watched(&params).await;
    let (idle, idle_conn) = connect_watched(&params).await;
    reader.batch_execute("BEGIN; SELECT 1").await.unwrap();
    block
        .batch_execute("BEGIN; INSERT INTO frozen_t VALUES (3)")
        .await
        .unwrap();
    first_value(&idle, "SELECT 1").await;
    first_value(&writer, "SELECT 1").await;

    let frozen = Frozen::freeze(&pg);
    // Two silent probes of 400 ms each, every 200 ms: well under 3 s, against 30 s deadlines.
    let ((read, read_took), (write, write_took), (in_block, block_took)) = tokio::join!(
        refused_in(&reader, "SELECT 2"),
        refused_in(&writer, "INSERT INTO frozen_t VALUES (1)"),
        refused_in(&block, "INSERT INTO frozen_t VALUES (4)"),
    );
    assert_eq!(read, "57P03");
    assert_eq!(write, "40003", "an autocommit write in flight may commit");
    assert_eq!(in_block, "40003", "a write in flight is never cut loose");
    for conn in [writer_conn, block_conn] {
        let closed = tokio::time::timeout(Duration::from_secs(5), conn).await;
        assert!(closed.is_ok(), "a session with a write in flight is closed");
    }
    for took in [read_took, write_took, block_took] {
        assert!(took < Duration::from_secs(3), "answered after {took:?}");
    }
    // Sent now: answered at once, not sent. Inside the failed block, as PostgreSQL does.
    let (code, took) = refused_in(&idle, "SELECT 3").await;
    assert_eq!(code, "57P03");
    assert!(took < Duration::from_millis(500), "{took:?}");
    let (code, took) = refused_in(&reader, "SELECT 3").await;
    assert_eq!(code, "57P03");
    assert!(took < Duration::from_millis(500), "{took:?}");
    // The pool's ROLLBACK on return succeeds at once: the connection goes back to the pool.
    let started = Instant::now();
    reader
        .batch_execute("ROLLBACK")
        .await
        .expect("ROLLBACK answered");
    assert!(started.elapsed() < Duration::from_millis(500));

    // hold_new_connections (1 s) has passed since the primary was lost: no waiting.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let started = Instant::now();
    let err = tokio_postgres::connect(&params, tokio_postgres::NoTls)
        .await
        .err()
        .expect("refused");
    assert_eq!(sqlstate(&err), "57P03", "{err:?}");
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "refused after {:?}",
        started.elapsed()
    );
    let health = proxy.health_json().await;
    assert_eq!(health["status"], "down", "{health}");

    drop(frozen);
    // The same two connections work again.
    for c in [&reader, &idle] {
        eventually(
            "the session to follow the thawed server",
            SECONDS_20,
            || async { (c.simple_query("SELECT 4").await.is_ok()).then_some(()) },
        )
        .await;
    }
    for conn in [reader_conn, idle_conn] {
        assert!(
            !conn.is_finished(),
            "the sessions with only reads in flight stayed open"
        );
    }
    // The block of the closed session left nothing, and no backend is left inside a
    // transaction.
    assert_eq!(
        pg.psql("SELECT count(*) FROM frozen_t WHERE x IN (3, 4)"),
        "0"
    );
    assert_eq!(
        pg.psql(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE backend_type = 'client backend' AND state LIKE 'idle in transaction%'"
        ),
        "0"
    );
    // A transaction on a detached-then-reattached session runs normally.
    reader
        .batch_execute("BEGIN; INSERT INTO frozen_t VALUES (5); COMMIT")
        .await
        .unwrap();
    assert_eq!(pg.psql("SELECT count(*) FROM frozen_t WHERE x = 5"), "1");
}

/// The same through the extended protocol, as drivers that cache prepared statements use it:
/// a query in flight when the host froze, and queries sent while it is frozen, get 57P03;
/// the statement prepared before the freeze still works on the same connection after it (the
/// server kept it: bulkhead answered the client itself and never touched the server's state).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_survive_a_freeze_and_extended_queries_during_it_get_57p03() {
    let pg = Cluster::start();
    let mut config = fast_config(&pg);
    config.timeouts.read = Duration::from_secs(30);
    let proxy = Proxy::start(config).await;
    let (c, conn) = connect_watched(&proxy.params("postgres")).await;
    let statement = c.prepare("SELECT $1::int + 1").await.unwrap();
    let row = c.query_one(&statement, &[&1i32]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 2);

    let frozen = Frozen::freeze(&pg);
    let started = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(10), c.query_one(&statement, &[&2i32]))
        .await
        .expect("answered long before the read deadline")
        .unwrap_err();
    assert_eq!(sqlstate(&err), "57P03", "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // While frozen: a new statement (Parse) and the cached one (Bind), at once.
    for _ in 0..3 {
        let started = Instant::now();
        let err = c.query("SELECT $1::text", &[&"x"]).await.unwrap_err();
        assert_eq!(sqlstate(&err), "57P03", "{err:?}");
        let err = c.query_one(&statement, &[&3i32]).await.unwrap_err();
        assert_eq!(sqlstate(&err), "57P03", "{err:?}");
        assert!(started.elapsed() < Duration::from_millis(500));
    }

    drop(frozen);
    let row = eventually("the cached statement to work again", SECONDS_20, || async {
        c.query_one(&statement, &[&4i32]).await.ok()
    })
    .await;
    assert_eq!(row.get::<_, i32>(0), 5);
    let row = c.query_one("SELECT $1::text", &[&"y"]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "y");
    assert!(!conn.is_finished());
}

/// The heartbeat (an empty query every 100 ms on a connection kept open) notices a frozen
/// host within its 400 ms timeout, long before status checks on new connections can (here
/// every 5 s with a 2 s timeout, so at least 2.5 s): a read waiting there is answered within
/// about a second. A commit in flight is not given up on the heartbeat's word alone: it waits
/// for the status checks' verdict (then FATAL 40003), since a server only slow may answer it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_heartbeat_answers_reads_on_a_frozen_host_before_the_status_checks_could() {
    let pg = Cluster::start();
    pg.psql("CREATE TABLE beat_t (x int)");
    let mut config = fast_config(&pg);
    config.probe.interval = Duration::from_secs(5);
    config.probe.timeout = Duration::from_secs(2);
    config.timeouts.read = Duration::from_secs(30);
    config.timeouts.write = Duration::from_secs(30);
    let proxy = Proxy::start(config).await;
    let params = proxy.params("postgres");
    let (reader, reader_conn) = connect_watched(&params).await;
    let (writer, _writer_conn) = connect_watched(&params).await;
    first_value(&reader, "SELECT 1").await;
    writer
        .batch_execute("BEGIN; INSERT INTO beat_t VALUES (1)")
        .await
        .unwrap();
    heartbeat_connected(&pg).await;

    let frozen = Frozen::freeze(&pg);
    let commit = tokio::spawn(async move {
        let started = Instant::now();
        let r = writer.batch_execute("COMMIT").await;
        (r, started.elapsed())
    });
    let (code, took) = refused_in(&reader, "SELECT 2").await;
    assert_eq!(code, "57P03");
    assert!(
        took < Duration::from_millis(2000),
        "answered after {took:?}"
    );
    assert!(
        !commit.is_finished(),
        "the commit waits for the status checks"
    );
    // Readiness says so already: the primary does not answer.
    let ready = proxy.get("/readyz").await;
    assert_eq!(ready.status, 503);
    assert!(ready.body.contains("heartbeat"), "{}", ready.body);
    assert_eq!(proxy.health_json().await["backends"][0]["answering"], false);
    let (result, took) = tokio::time::timeout(Duration::from_secs(15), commit)
        .await
        .expect("the commit is answered once the status checks confirm")
        .unwrap();
    let err = result.unwrap_err();
    assert_eq!(sqlstate(&err), "40003", "{err:?}");
    assert_eq!(err.as_db_error().unwrap().severity(), "FATAL");
    assert!(took < Duration::from_secs(12), "{took:?}");

    drop(frozen);
    eventually(
        "the reader to follow the thawed server",
        SECONDS_20,
        || async { reader.simple_query("SELECT 3").await.is_ok().then_some(()) },
    )
    .await;
    assert!(!reader_conn.is_finished());
}

/// A driver that sends an extended batch and a Flush, then waits for results before its Sync
/// (a cursor, pipeline mode): when the host stops answering, it gets its error at once, as
/// PostgreSQL sends one, not only with its next message; ReadyForQuery comes at its Sync, and
/// the session follows the server again after the thaw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_waiting_after_flush_on_a_frozen_host_gets_its_error_at_once() {
    let pg = Cluster::start();
    let mut config = fast_config(&pg);
    config.timeouts.read = Duration::from_secs(30);
    let proxy = Proxy::start(config).await;
    let mut raw = Raw::connect(proxy.addr).await;
    raw.login("postgres").await;

    let frozen = Frozen::freeze(&pg);
    let started = Instant::now();
    let mut batch = msg(b'P', b"\0SELECT 1\0\0\0");
    batch.extend(msg(b'B', b"\0\0\0\0\0\0\0\0"));
    batch.extend(msg(b'E', b"\0\0\0\0\0"));
    batch.extend(msg(b'H', b""));
    raw.send(&batch).await;
    let answered =
        tokio::time::timeout(Duration::from_secs(10), raw.expect_error("ERROR", "57P03"))
            .await
            .expect("the error comes without a Sync");
    assert!(!answered.is_empty());
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    raw.send(&msg(b'S', b"")).await;
    let ready = raw.recv_until(b'Z').await;
    assert_eq!(ready.last().unwrap().1, b"I");

    drop(frozen);
    let deadline = Instant::now() + SECONDS_20;
    loop {
        raw.send(&msg(b'Q', b"SELECT 42\0")).await;
        let answer = raw.recv_until(b'Z').await;
        if answer.iter().any(|(tag, _)| *tag == b'D') {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the session never followed the thawed server"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An overload that slows new sessions must not look like an outage. With the postmaster
/// stopped, no new session can start while the backends that exist answer, the heartbeat's
/// among them. A new client gets an error within connect_timeout instead of a hang, and its
/// failed start makes the probe look through a new connection at once (it opens one only
/// every new_session_interval otherwise), which gets no answer either: the primary keeps its
/// role, its sessions go on reading and writing, and nothing is answered in their place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_slow_to_start_sessions_keeps_its_role_and_its_sessions_go_on() {
    let pg = Cluster::start();
    pg.psql("CREATE TABLE slow_t (x int)");
    let proxy = Proxy::start(fast_config(&pg)).await;
    let params = proxy.params("postgres");
    let (c, conn) = connect_watched(&params).await;
    first_value(&c, "SELECT 1").await;
    heartbeat_connected(&pg).await;

    let stopped = Frozen::stop(vec![pg.postmaster_pid()]);
    // A new client: the server cannot start its session; it is told so, promptly.
    let started = Instant::now();
    let refused = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_postgres::connect(&params, tokio_postgres::NoTls),
    )
    .await
    .expect("a new client is answered");
    let err = refused.err().expect("a session on a stopped postmaster");
    assert_eq!(sqlstate(&err), "57P03", "{err:?}");
    assert!(
        started.elapsed() < Duration::from_millis(1000 + 1000),
        "{:?}",
        started.elapsed()
    );
    eventually("a status check to find no answer", SECONDS_20, || async {
        let health = proxy.health_json().await;
        let error = health["backends"][0]["error"]
            .as_str()
            .unwrap_or("")
            .to_string();
        error.contains("no answer").then_some(())
    })
    .await;
    // Many probe rounds (200 ms apart, 400 ms timeout), each without an answer on a new
    // connection; the session is answered throughout.
    let mut written = 0;
    let until = Instant::now() + Duration::from_secs(3);
    let mut pace = tokio::time::interval(Duration::from_millis(20));
    while Instant::now() < until {
        pace.tick().await;
        c.batch_execute(&format!("INSERT INTO slow_t VALUES ({written})"))
            .await
            .unwrap_or_else(|e| panic!("write {written}: {e:?}"));
        written += 1;
        let count = first_value(&c, "SELECT count(*) FROM slow_t").await;
        assert_eq!(count, written.to_string());
    }
    let health = proxy.health_json().await;
    let backend = &health["backends"][0];
    assert_eq!(backend["role"], "primary", "{health}");
    assert_eq!(backend["answering"], true, "{health}");
    assert_eq!(backend["circuit"], "closed", "{health}");
    assert!(
        backend["error"]
            .as_str()
            .unwrap_or("")
            .contains("heartbeat's connection answers"),
        "{health}"
    );
    assert_eq!(proxy.get("/readyz").await.status, 200);

    drop(stopped);
    let fresh = connect(&params).await;
    assert_eq!(
        first_value(&fresh, "SELECT count(*) FROM slow_t").await,
        written.to_string()
    );
    assert!(!conn.is_finished());
}

/// A machine too busy to schedule the heartbeat's backend in time is not a frozen host (a full
/// benchmark run on two cores once had bulkhead refuse statements for that): while sessions'
/// requests are answered, an unanswered heartbeat (here its backend alone is stopped) does not
/// mark the host not answering, and no statement is refused. Once no session is answered
/// either, the silence counts for a moment: the probe looks through a new connection, finds the
/// host answering there, keeps that connection instead, and the host answers again without
/// the stuck backend ever answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_unanswered_while_sessions_are_answered_does_not_mark_the_host() {
    let pg = Cluster::start();
    let mut config = fast_config(&pg);
    // Status checks out of the way: they would speak for the host every 5 s.
    config.probe.interval = Duration::from_secs(5);
    config.probe.timeout = Duration::from_secs(2);
    let proxy = Proxy::start(config).await;
    let c = proxy.connect().await;
    first_value(&c, "SELECT 1").await;
    heartbeat_connected(&pg).await;
    let pid: i32 = pg
        .psql(
            "SELECT pid FROM pg_stat_activity \
             WHERE application_name = 'bulkhead probe' AND query = '' LIMIT 1",
        )
        .parse()
        .unwrap();
    let stopped = Frozen::stop(vec![pid]);
    let until = Instant::now() + Duration::from_secs(3);
    let mut reads = 0;
    while Instant::now() < until {
        c.simple_query("SELECT 1")
            .await
            .expect("a read while only the heartbeat's backend is stopped");
        reads += 1;
        if reads % 50 == 0 {
            assert_eq!(proxy.health_json().await["backends"][0]["answering"], true);
        }
    }
    assert_eq!(proxy.health_json().await["backends"][0]["answering"], true);
    // No session traffic now: the probe moves to a new kept connection (a status check found
    // the stuck one silent, or the heartbeat's silence sent it to a new connection).
    eventually("a new kept connection, answering", SECONDS_20, || async {
        let others = pg.psql(&format!(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE application_name = 'bulkhead probe' AND query = '' AND pid <> {pid}"
        ));
        let answering = proxy.health_json().await["backends"][0]["answering"] == true;
        (others != "0" && answering).then_some(())
    })
    .await;
    first_value(&c, "SELECT 2").await;
    drop(stopped);
}
