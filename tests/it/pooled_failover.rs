//! Issue 21, failover that clients do not feel: in transaction pooling a client outside a
//! transaction keeps its connection through a failover, one inside gets one error for that
//! transaction and keeps its connection too, and a transaction that finds no primary fails
//! alone. Real primary/standby clusters, tokio-postgres.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_postgres::Client;
use tokio_postgres::error::Severity;

use crate::support::{Cluster, Frozen, Proxy, eventually, first_value};
use bulkhead::Config;

use crate::transaction_pooling::{Setup, connect, pooled, setup};

/// The SQLSTATE of an error a client got, which must be an ERROR (the connection goes on),
/// not a FATAL or a closed connection.
fn error_code(e: &tokio_postgres::Error) -> String {
    let db = e
        .as_db_error()
        .unwrap_or_else(|| panic!("expected an error from the server, got: {e:?}"));
    assert_eq!(
        db.parsed_severity(),
        Some(Severity::Error),
        "a FATAL would end the connection: {db:?}"
    );
    db.code().code().to_string()
}

/// Transaction pooling over `size` connections in front of the setup's primary and `standby`,
/// with a quick probe and a hold long enough for a promotion.
fn with_standby(s: &Setup, standby: &Cluster, size: u32) -> Config {
    let mut config = pooled(s, size);
    config.database.hosts = vec![s.pg.addr(), standby.addr()];
    config.probe.timeout = Duration::from_millis(400);
    config.circuit.hold_new_connections = Duration::from_secs(30);
    config
}

async fn ledger_rows(c: &Client) -> HashSet<(i32, i32)> {
    c.query("SELECT client, n FROM ledger", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// 200 idle clients and 20 writers (BEGIN, INSERT, COMMIT through a pool of 10) through a
/// failover: the primary shut down, the standby promoted. No client's connection is closed;
/// the writers' errors are ERRORs of the transactions in flight; writes resume on the new
/// primary soon after the promotion; every acknowledged write is there; and a statement a
/// client prepared before runs on the new primary without the client preparing it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_failover_in_transaction_mode_no_client_is_closed_and_no_acknowledged_write_is_lost()
 {
    let s = setup();
    let standby = Cluster::standby_of(&s.pg);
    let mut config = with_standby(&s, &standby, 10);
    config.limits.queue_timeout = Duration::from_secs(30);
    config.limits.max_clients = 1000;
    let probe_interval = config.probe.interval;
    let proxy = Arc::new(Proxy::start(config).await);

    let mut idle = Vec::new();
    for _ in 0..200 {
        let c = connect(&proxy, "").await;
        c.batch_execute("SELECT 1").await.unwrap();
        idle.push(c);
    }
    let prepared_client = connect(&proxy, "").await;
    let insert = prepared_client
        .prepare("INSERT INTO ledger VALUES ($1, $2)")
        .await
        .unwrap();
    prepared_client
        .execute(&insert, &[&1000i32, &0i32])
        .await
        .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::<(i32, i32, Instant, i32)>::new()));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut writers = Vec::new();
    for w in 0..20i32 {
        let c = connect(&proxy, "").await;
        let (stop, acked, errors) = (stop.clone(), acked.clone(), errors.clone());
        writers.push(tokio::spawn(async move {
            let mut c = c;
            let mut n = 0i32;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let result = async {
                    let tx = c.transaction().await?;
                    // Which server took it, for a failure's message.
                    let port: i32 = tx
                        .query_one(
                            "INSERT INTO ledger VALUES ($1, $2) RETURNING inet_server_port()",
                            &[&w, &n],
                        )
                        .await?
                        .get(0);
                    tx.commit().await.map(|()| port)
                }
                .await;
                match result {
                    Ok(port) => acked.lock().unwrap().push((w, n, Instant::now(), port)),
                    Err(e) => {
                        errors.lock().unwrap().push(error_code(&e));
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            c
        }));
    }
    eventually("writes acknowledged", Duration::from_secs(20), || async {
        (acked.lock().unwrap().len() >= 100).then_some(())
    })
    .await;

    // The failover: the primary shuts down (its walsenders send the standby everything
    // first), the standby is promoted.
    let stopped = Instant::now();
    tokio::task::block_in_place(|| s.pg.stop("fast"));
    tokio::task::block_in_place(|| standby.promote());
    let promoted = Instant::now();

    let first_after = eventually(
        "a write acknowledged by the new primary",
        Duration::from_secs(30),
        || async {
            acked
                .lock()
                .unwrap()
                .iter()
                .find(|(_, _, at, _)| *at > promoted)
                .map(|(_, _, at, _)| at.duration_since(promoted))
        },
    )
    .await;
    // Let them write on the new primary for a while.
    let count = acked.lock().unwrap().len();
    eventually(
        "more writes on the new primary",
        Duration::from_secs(20),
        || async { (acked.lock().unwrap().len() >= count + 100).then_some(()) },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let mut writer_clients = Vec::new();
    for w in writers {
        writer_clients.push(w.await.unwrap());
    }

    // No client's connection was closed: each answers on the new primary.
    for c in idle.iter().chain(&writer_clients) {
        assert!(!c.is_closed(), "a client's connection was closed");
        c.batch_execute("SELECT 1").await.unwrap();
    }
    // The statement prepared before the failover runs on the new primary as it is.
    prepared_client
        .execute(&insert, &[&1000i32, &1i32])
        .await
        .expect("the prepared statement on the new primary");

    let direct = standby.connect().await;
    let rows = ledger_rows(&direct).await;
    let acked = acked.lock().unwrap().clone();
    let stopped_at = stopped;
    let missing: Vec<_> = acked
        .iter()
        .filter(|(w, n, _, _)| !rows.contains(&(*w, *n)))
        .map(|(w, n, at, port)| {
            format!(
                "({w}, {n}) on port {port}, {:?} after the stop began",
                at.checked_duration_since(stopped_at)
                    .map(|d| format!("{d:?}"))
                    .unwrap_or_else(|| format!("-{:?}", stopped_at.duration_since(*at)))
            )
        })
        .collect();
    if !missing.is_empty() {
        tokio::task::block_in_place(|| s.pg.start_again());
        for (w, n, _, _) in acked
            .iter()
            .filter(|(w, n, _, _)| !rows.contains(&(*w, *n)))
        {
            eprintln!(
                "old primary {} new {}: old has ({w}, {n}): {:?}",
                s.pg.addr(),
                standby.addr(),
                s.pg.psql(&format!(
                    "SELECT count(*) FROM ledger WHERE client = {w} AND n = {n}"
                ))
            );
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged writes missing on the new primary: {missing:?}",
        missing.len(),
        acked.len()
    );
    assert!(rows.contains(&(1000, 1)));
    let errors = errors.lock().unwrap().clone();
    for code in &errors {
        assert!(
            ["08006", "40003", "25P02", "57P03"].contains(&code.as_str()),
            "unexpected error {code} (all: {errors:?})"
        );
    }
    // Generous: the promotion is seen at the next probe round, and a transaction waiting for a
    // connection gets one then.
    assert!(
        first_after <= probe_interval + Duration::from_secs(3),
        "first write on the new primary {first_after:?} after the promotion"
    );
    eprintln!(
        "failover: {} writes acknowledged, {} transactions failed ({errors:?}), first write on the new primary {first_after:?} after promotion",
        acked.len(),
        errors.len()
    );
}

/// A transaction whose server connection is lost gets one error for it, and the connection
/// goes on: with nothing in flight, its next statement gets 08006, then 25P02 until the
/// ROLLBACK (answered by bulkhead); with a COMMIT in flight (waiting for a synchronous
/// standby that is not there), 40003, since it may have committed — and it did, locally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_that_loses_its_server_connection_gets_one_error_and_the_connection_goes_on()
{
    let s = setup();
    let proxy = Proxy::start(pooled(&s, 2)).await;
    let c = connect(&proxy, "").await;
    let terminate_app = || {
        s.pg.psql_local(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'app'",
        )
    };

    // Idle in a transaction when its backend ends.
    c.batch_execute("BEGIN; INSERT INTO ledger VALUES (1, 1)")
        .await
        .unwrap();
    tokio::task::block_in_place(terminate_app);
    let e = c
        .batch_execute("INSERT INTO ledger VALUES (1, 2)")
        .await
        .unwrap_err();
    assert_eq!(error_code(&e), "08006", "{e}");
    let e = c.batch_execute("SELECT 1").await.unwrap_err();
    assert_eq!(error_code(&e), "25P02", "{e}");
    c.batch_execute("ROLLBACK").await.unwrap();
    c.batch_execute("INSERT INTO ledger VALUES (1, 3)")
        .await
        .unwrap();
    assert!(!c.is_closed());

    // A COMMIT in flight when its backend ends.
    s.pg.psql_local("ALTER SYSTEM SET synchronous_standby_names = 'missing'");
    s.pg.psql_local("SELECT pg_reload_conf()");
    c.batch_execute("BEGIN; INSERT INTO ledger VALUES (2, 1)")
        .await
        .unwrap();
    // pg_reload_conf() returns before the backends have reloaded: each does when it next
    // starts a statement. This transaction keeps its server connection, so once it sees the
    // setting its COMMIT will wait.
    eventually(
        "the transaction's backend to see synchronous_standby_names",
        Duration::from_secs(10),
        || async {
            (first_value(&c, "SHOW synchronous_standby_names").await == "missing").then_some(())
        },
    )
    .await;
    let (commit_result, ()) = tokio::join!(c.batch_execute("COMMIT"), async {
        eventually(
            "the COMMIT waiting for the synchronous standby",
            Duration::from_secs(10),
            || async {
                (s.pg.psql(
                    "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' AND wait_event = 'SyncRep'",
                ) == "1")
                    .then_some(())
            },
        )
        .await;
        tokio::task::block_in_place(terminate_app);
    });
    let e = commit_result.unwrap_err();
    assert_eq!(error_code(&e), "40003", "{e}");
    s.pg.psql_local("ALTER SYSTEM RESET synchronous_standby_names");
    s.pg.psql_local("SELECT pg_reload_conf()");
    assert!(!c.is_closed());
    assert_eq!(
        first_value(
            &c,
            "SELECT string_agg(client || ':' || n, ',' ORDER BY client, n) FROM ledger"
        )
        .await,
        // (1, 1) and (1, 2) rolled back with their connection; (2, 1) committed locally
        // before its backend ended, which is why its fate was reported unknown.
        "1:3,2:1"
    );
}

/// A transaction that begins while no writable primary is known waits up to
/// hold_new_connections, then fails with 57P03; the connection stays open and its next
/// transaction runs once a primary is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_with_no_primary_in_sight_gets_57p03_and_the_connection_stays_open() {
    let s = setup();
    let mut config = pooled(&s, 2);
    config.circuit.hold_new_connections = Duration::from_secs(1);
    let proxy = Proxy::start(config).await;
    let c = connect(&proxy, "").await;
    c.batch_execute("SELECT 1").await.unwrap();
    tokio::task::block_in_place(|| s.pg.stop("fast"));

    let started = Instant::now();
    let e = c.batch_execute("SELECT 1").await.unwrap_err();
    assert_eq!(error_code(&e), "57P03", "{e}");
    assert!(
        started.elapsed() <= Duration::from_secs(1) + Duration::from_secs(3),
        "refused after {:?}",
        started.elapsed()
    );
    // The extended protocol too: the Parse is refused, the rest of the batch skipped.
    let e = c.query_one("SELECT $1::int", &[&1i32]).await.unwrap_err();
    assert_eq!(error_code(&e), "57P03", "{e}");
    assert!(!c.is_closed());

    tokio::task::block_in_place(|| s.pg.start_again());
    eventually(
        "a transaction once the primary is back",
        Duration::from_secs(30),
        || async { c.query_one("SELECT $1::int", &[&7i32]).await.ok() },
    )
    .await;
    assert_eq!(first_value(&c, "SELECT 'back'").await, "back");
}

/// The primary freezes (every process stopped) with one client's COMMIT in flight and another
/// client idle in a block, and the standby is promoted. The COMMIT gets 40003 once the probe
/// confirms the host silent (its write deadline is far off), the idle block's next statement
/// an error and its ROLLBACK success, and both clients' next transactions run on the new
/// primary, on the connections they had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_primary_costs_each_client_its_open_transaction_and_nothing_more() {
    let s = setup();
    let standby = Cluster::standby_of(&s.pg);
    let mut config = with_standby(&s, &standby, 4);
    config.timeouts.write = Duration::from_secs(60);
    let proxy = Proxy::start(config).await;
    let committing = connect(&proxy, "").await;
    let in_block = connect(&proxy, "").await;
    for (c, n) in [(&committing, 1), (&in_block, 2)] {
        c.batch_execute(&format!("BEGIN; INSERT INTO ledger VALUES ({n}, 1)"))
            .await
            .unwrap();
    }

    let frozen = Frozen::freeze(&s.pg);
    let started = Instant::now();
    let e = committing.batch_execute("COMMIT").await.unwrap_err();
    assert_eq!(error_code(&e), "40003", "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the COMMIT was answered after {:?}",
        started.elapsed()
    );
    let e = in_block
        .batch_execute("INSERT INTO ledger VALUES (2, 2)")
        .await
        .unwrap_err();
    assert_eq!(error_code(&e), "57P03", "{e}");
    in_block.batch_execute("ROLLBACK").await.unwrap();

    tokio::task::block_in_place(|| standby.promote());
    for (c, n) in [(&committing, 1), (&in_block, 2)] {
        eventually(
            "a transaction on the new primary",
            Duration::from_secs(30),
            || async {
                c.batch_execute(&format!(
                    "BEGIN; INSERT INTO ledger VALUES ({n}, 3); COMMIT"
                ))
                .await
                .ok()
            },
        )
        .await;
        assert!(!c.is_closed());
    }
    let direct = standby.connect().await;
    let rows = ledger_rows(&direct).await;
    assert!(rows.contains(&(1, 3)) && rows.contains(&(2, 3)), "{rows:?}");
    assert!(
        !rows.contains(&(2, 1)) && !rows.contains(&(2, 2)),
        "{rows:?}"
    );
    drop(frozen);
}

/// The primary crashes (`pg_ctl stop -m immediate`: a WARNING, then the socket closes) with a
/// client idle in a block: its next statement gets 08006, its ROLLBACK succeeds, and once the
/// server is back its next transaction runs, on the same client connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_primary_costs_a_client_its_open_block_and_not_its_connection() {
    let s = setup();
    let proxy = Proxy::start(pooled(&s, 2)).await;
    let c = connect(&proxy, "").await;
    c.batch_execute("BEGIN; INSERT INTO ledger VALUES (1, 1)")
        .await
        .unwrap();
    tokio::task::block_in_place(|| s.pg.stop("immediate"));
    let e = c
        .batch_execute("INSERT INTO ledger VALUES (1, 2)")
        .await
        .unwrap_err();
    assert_eq!(error_code(&e), "08006", "{e}");
    c.batch_execute("ROLLBACK").await.unwrap();
    tokio::task::block_in_place(|| s.pg.start_again());
    eventually(
        "a transaction once the server is back",
        Duration::from_secs(30),
        || async {
            c.batch_execute("INSERT INTO ledger VALUES (1, 3)")
                .await
                .ok()
        },
    )
    .await;
    assert!(!c.is_closed());
    assert_eq!(
        first_value(&c, "SELECT string_agg(n::text, ',' ORDER BY n) FROM ledger").await,
        "3"
    );
}
