//! Issue 22: what the probe costs the database, and that it still finds trouble in time.
//! Sessions' own evidence (confirmed commits, logins) stands in for the probe's write check
//! and its new connections; the status checks run on a kept connection.

use std::process::Command;
use std::time::{Duration, Instant};

use bulkhead::Config;
use bulkhead::probe::Role;

use crate::support::*;

const SECONDS_20: Duration = Duration::from_secs(20);

/// Settings under which the old probe forked a session and wrote WAL five times a second.
fn busy_probe(pg: &Cluster) -> Config {
    let mut config = config_for(pg);
    config.database.connect_timeout = Duration::from_millis(1000);
    config.probe.interval = Duration::from_millis(200);
    config.probe.timeout = Duration::from_millis(400);
    config.timeouts.write = Duration::from_millis(800);
    config.timeouts.cancel_grace = Duration::from_millis(500);
    config
}

/// A cluster that logs every connection with its application_name, so the probe's logins can
/// be counted.
fn logged_cluster() -> Cluster {
    Cluster::start_with(&["log_connections = on", "log_line_prefix = '[%a] '"])
}

/// Logins by the probe so far.
fn probe_logins(pg: &Cluster) -> usize {
    pg.log()
        .lines()
        .filter(|l| l.contains("connection authorized") && l.contains("bulkhead probe"))
        .count()
}

/// The probe's WAL messages (its write checks) between two LSNs.
fn probe_wal_records(pg: &Cluster, from: &str, to: &str) -> usize {
    let out = Command::new(pg_bin_dir().join("pg_waldump"))
        .arg("-p")
        .arg(pg.data().join("pg_wal"))
        .args(["-s", from, "-e", to, "-r", "LogicalMessage"])
        .output()
        .expect("pg_waldump runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("prefix \"bulkhead\""))
        .count()
}

async fn current_lsn(c: &tokio_postgres::Client) -> String {
    first_value(c, "SELECT pg_current_wal_lsn()::text").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_sessions_commit_the_probe_forks_no_session_and_writes_no_wal_and_resumes_when_idle()
{
    let pg = logged_cluster();
    pg.psql("CREATE TABLE cost_t (x int)");
    let proxy = Proxy::start(busy_probe(&pg)).await;
    let direct = pg.connect().await;
    let c = proxy.connect().await;
    c.batch_execute("INSERT INTO cost_t VALUES (0)")
        .await
        .unwrap();
    // The probe has its kept connection and its write check's by now.
    eventually("the probe's first checks", SECONDS_20, || async {
        (probe_logins(&pg) >= 2).then_some(())
    })
    .await;

    // Traffic: an autocommit write every 20 ms on a connection that stays open, for 3 s
    // (fifteen probe intervals).
    let logins_before = probe_logins(&pg);
    let from = current_lsn(&direct).await;
    let until = Instant::now() + Duration::from_secs(3);
    let mut pace = tokio::time::interval(Duration::from_millis(20));
    let mut n = 0;
    while Instant::now() < until {
        pace.tick().await;
        n += 1;
        c.batch_execute(&format!("INSERT INTO cost_t VALUES ({n})"))
            .await
            .unwrap();
    }
    let to = current_lsn(&direct).await;
    let busy_logins = probe_logins(&pg) - logins_before;
    let busy_wal = probe_wal_records(&pg, &from, &to);
    // A write check may have been under way as the traffic began.
    assert!(
        busy_wal <= 1,
        "{busy_wal} probe WAL records in 3 s of confirmed commits"
    );
    assert_eq!(busy_logins, 0, "new probe sessions in 3 s of traffic");

    // Idle: the write checks come back within an interval or two, and still no new session.
    let from = current_lsn(&direct).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let to = current_lsn(&direct).await;
    let idle_wal = probe_wal_records(&pg, &from, &to);
    assert!(
        idle_wal >= 5,
        "only {idle_wal} probe WAL records in 2 s idle"
    );
    assert_eq!(probe_logins(&pg) - logins_before, 0);
    // Every status check still ran: the probe is fresh.
    let h = proxy.health_json().await;
    assert!(
        h["backends"][0]["last_probe_age_ms"].as_u64().unwrap() < 1000,
        "{h}"
    );
    assert_eq!(h["backends"][0]["role"], "primary");
}

/// Detection with the traffic that makes the probe skip its write check: commits that stall
/// are found by the probe within two intervals and a timeout (the write check resumes once
/// no commit has been confirmed for an interval), besides the sessions' own deadlines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_path_that_stalls_under_traffic_is_found_within_two_intervals_and_a_timeout() {
    let pg = Cluster::start();
    pg.psql("CREATE TABLE stall_t (x int)");
    let config = busy_probe(&pg);
    let bound = config.probe.interval * 2 + config.probe.timeout + Duration::from_secs(1);
    let proxy = Proxy::start(config).await;
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let params = proxy.params("postgres");
            tokio::spawn(async move {
                let c = connect(&params).await;
                let mut n = 0;
                // Until the stall (errors then: 57014 from the deadline, or the open circuit).
                while c
                    .batch_execute(&format!("INSERT INTO stall_t VALUES ({w}{n})"))
                    .await
                    .is_ok()
                {
                    n += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(proxy.bulkhead.topology().hosts()[0].check_failing.is_none());
    pg.psql("ALTER SYSTEM SET synchronous_standby_names = 'missing'");
    let stalled = Instant::now();
    pg.psql("SELECT pg_reload_conf()");
    eventually(
        "the probe to find the commit path stuck",
        SECONDS_20,
        || async { proxy.bulkhead.topology().hosts()[0].check_failing.clone() },
    )
    .await;
    let took = stalled.elapsed();
    assert!(took <= bound, "found after {took:?}, bound {bound:?}");
    for w in writers {
        w.await.unwrap();
    }
    pg.psql("ALTER SYSTEM RESET synchronous_standby_names");
    pg.psql("SELECT pg_reload_conf()");
}

/// With the default probe settings, a server shut down is seen within 2 s: its backends end,
/// the heartbeat finds the kept connection gone, and the probe looks through a new one at
/// once. A new client then gets 57P03, not a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_server_is_marked_unreachable_within_two_seconds_with_default_settings() {
    let pg = Cluster::start();
    let proxy = Proxy::start(config_for(&pg)).await;
    proxy.connect().await;
    heartbeat_connected(&pg).await;
    let stopping = Instant::now();
    pg.stop("fast");
    eventually("the host to be unreachable", SECONDS_20, || async {
        (proxy.bulkhead.topology().hosts()[0].role == Role::Unreachable).then_some(())
    })
    .await;
    let took = stopping.elapsed();
    assert!(
        took < Duration::from_secs(2) + Duration::from_secs(1),
        "seen after {took:?}"
    );
}

/// A frozen server stays "not answering" for as long as it is frozen. (A status check on the
/// kept connection that got no answer dropped it, and the heartbeat took that for a working
/// replacement and called the host answering again 400 ms later: sessions then sent statements
/// into the frozen server. Found by the incident replay.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_server_stays_not_answering_for_as_long_as_it_is_frozen() {
    let pg = Cluster::start();
    let proxy = Proxy::start(busy_probe(&pg)).await;
    let c = proxy.connect().await;
    first_value(&c, "SELECT 1").await;
    heartbeat_connected(&pg).await;
    let frozen = Frozen::freeze(&pg);
    let circuit = || proxy.bulkhead.topology().circuit(0);
    eventually("the host marked not answering", SECONDS_20, || async {
        circuit().is_unresponsive().then_some(())
    })
    .await;
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert!(
            circuit().is_unresponsive(),
            "called answering while frozen, {:?} before the end of the check",
            until - Instant::now()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(frozen);
    eventually("the host answering again", SECONDS_20, || async {
        (!circuit().is_unresponsive()).then_some(())
    })
    .await;
    assert_eq!(first_value(&c, "SELECT 2").await, "2");
}
