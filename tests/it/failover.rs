//! Issue 4: bulkhead follows the primary, and while the database cannot commit, writes fail fast
//! behind the circuit breaker while reads go on. Real primaries and streaming standbys.

use std::time::Duration;

use tokio::time::Instant;
use tokio_postgres::{Client, NoTls};

use bulkhead::Config;
use bulkhead::probe::Role;

use crate::support::{
    Cluster, Frozen, Proxy, connect, connect_watched, eventually, first_value, sqlstate,
};

const SECONDS_20: Duration = Duration::from_secs(20);

/// Quick probing and short deadlines, so faults show within seconds.
fn fast_config(hosts: &[&Cluster]) -> Config {
    let mut config = Config::default();
    config.database.hosts = hosts.iter().map(|c| c.addr()).collect();
    config.database.connect_timeout = Duration::from_millis(1000);
    config.probe.interval = Duration::from_millis(200);
    config.probe.timeout = Duration::from_millis(400);
    config.timeouts.write = Duration::from_millis(500);
    config.timeouts.cancel_grace = Duration::from_millis(500);
    config.circuit.failure_threshold = 3;
    config.circuit.open_for = Duration::from_secs(1);
    config.circuit.hold_new_connections = Duration::from_secs(10);
    config
}

/// Stalls the commit path (synchronous replication to a standby that does not exist) and
/// waits until bulkhead's write circuit has opened.
async fn wedge_until_circuit_opens(pg: &Cluster, proxy: &Proxy) {
    pg.psql("ALTER SYSTEM SET synchronous_standby_names = 'missing'");
    pg.psql("SELECT pg_reload_conf()");
    eventually("the write circuit to open", SECONDS_20, || async {
        (circuit_state(proxy) == 2.0).then_some(())
    })
    .await;
}

fn unwedge(pg: &Cluster) {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_land_on_the_primary_even_when_a_standby_is_listed_first() {
    let primary = Cluster::start();
    let standby = Cluster::standby_of(&primary);
    let proxy = Proxy::start(fast_config(&[&standby, &primary])).await;
    let c = proxy.connect().await;
    assert_eq!(first_value(&c, "SELECT pg_is_in_recovery()").await, "f");
    c.batch_execute("CREATE TABLE landed (x int); INSERT INTO landed VALUES (1)")
        .await
        .unwrap();
    assert_eq!(primary.psql("SELECT count(*) FROM landed"), "1");
    let hosts = proxy.bulkhead.topology().hosts();
    assert_eq!(hosts[0].role, Role::Standby);
    assert_eq!(hosts[1].role, Role::Primary);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wedged_commit_path_opens_the_circuit_then_writes_fail_fast_while_reads_go_on() {
    let pg = Cluster::start();
    pg.psql("CREATE TABLE w (x int)");
    let proxy = Proxy::start(fast_config(&[&pg])).await;
    let reader = proxy.connect().await;
    wedge_until_circuit_opens(&pg, &proxy).await;

    let writer = proxy.connect().await;
    for i in 0..20 {
        let started = Instant::now();
        let err = writer
            .simple_query(&format!("INSERT INTO w VALUES ({i})"))
            .await
            .unwrap_err();
        let took = started.elapsed();
        assert_eq!(sqlstate(&err), "57P03", "{err:?}");
        let db = err.as_db_error().unwrap();
        assert!(db.message().contains("retry in"), "{}", db.message());
        assert!(db.hint().is_some());
        assert!(took < Duration::from_millis(50), "refusal took {took:?}");
        assert_eq!(
            first_value(&reader, "SELECT count(*) FROM w").await,
            "0",
            "reads go on"
        );
    }
    assert!(
        proxy
            .bulkhead
            .metrics()
            .render()
            .contains("bulkhead_statements_total{class=\"write\",outcome=\"refused\"} 20")
    );

    unwedge(&pg);
    eventually("writes to flow again", SECONDS_20, || async {
        writer.simple_query("INSERT INTO w VALUES (100)").await.ok()
    })
    .await;
    assert_eq!(circuit_state(&proxy), 0.0);
    assert_eq!(pg.psql("SELECT count(*) FROM w WHERE x = 100"), "1");
}

/// A primary that stays primary (not in recovery) but takes no writes, as managed services make
/// one whose storage is full: every write would fail with 25006. The probe's write check must
/// see that by itself, with no client writing; before it did, its check kept succeeding and
/// kept such a circuit closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_primary_opens_the_circuit_on_the_probe_alone_and_closes_when_writable_again() {
    let pg = Cluster::start();
    pg.psql("CREATE TABLE ro (x int)");
    let mut config = fast_config(&[&pg]);
    config.circuit.open_for = Duration::from_secs(2);
    let proxy = Proxy::start(config).await;
    let c = proxy.connect().await;
    c.simple_query("INSERT INTO ro VALUES (1)").await.unwrap();

    pg.psql("ALTER SYSTEM SET default_transaction_read_only = on");
    pg.psql("SELECT pg_reload_conf()");
    eventually(
        "the probe to open the write circuit",
        SECONDS_20,
        || async { (circuit_state(&proxy) == 2.0).then_some(()) },
    )
    .await;
    let health = proxy.health_json().await;
    assert_eq!(health["backends"][0]["role"], "primary", "{health}");
    assert_eq!(health["backends"][0]["circuit"], "open", "{health}");
    let why = health["backends"][0]["circuit_reason"]
        .as_str()
        .unwrap_or_default();
    assert!(why.contains("transaction_read_only is on"), "{health}");
    assert_eq!(health["ready"], false, "{health}");

    let started = Instant::now();
    let err = c
        .simple_query("INSERT INTO ro VALUES (2)")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), "57P03", "refused, not sent: {err:?}");
    assert!(started.elapsed() < Duration::from_millis(50));
    assert_eq!(
        first_value(&c, "SELECT count(*) FROM ro").await,
        "1",
        "reads go on"
    );

    pg.psql("ALTER SYSTEM RESET default_transaction_read_only");
    pg.psql("SELECT pg_reload_conf()");
    eventually("writes to flow again", SECONDS_20, || async {
        c.simple_query("INSERT INTO ro VALUES (3)").await.ok()
    })
    .await;
    assert_eq!(circuit_state(&proxy), 0.0);
    assert_eq!(
        pg.psql("SELECT string_agg(x::text, ',' ORDER BY x) FROM ro"),
        "1,3"
    );
}

/// Read-only for the application's role only, so the probe (another user) can still write:
/// the 25006 errors the sessions see are what opens the circuit. Each reaches its client as
/// the server's own error until the circuit refuses writes itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_errors_seen_by_sessions_open_the_circuit_though_the_probe_can_write() {
    let pg = Cluster::start();
    pg.psql("CREATE ROLE app LOGIN");
    pg.psql("CREATE TABLE ro (x int)");
    pg.psql("GRANT SELECT, INSERT ON ro TO app");
    pg.psql("ALTER ROLE app SET default_transaction_read_only = on");
    let mut config = fast_config(&[&pg]);
    // Open long enough that /health still tells why when the test asks: with 1 s, a loaded
    // machine (the whole suite in parallel) let the circuit go half-open and the probe's own
    // write (another role) close it between the refusal and the look at /health.
    config.circuit.open_for = Duration::from_secs(30);
    let proxy = Proxy::start(config).await;
    let app = connect(&proxy.params("app")).await;

    let seen = std::sync::Mutex::new(Vec::new());
    let refused = eventually("writes to be refused", SECONDS_20, || async {
        let err = app
            .simple_query("INSERT INTO ro VALUES (1)")
            .await
            .unwrap_err();
        seen.lock().unwrap().push(sqlstate(&err).to_string());
        (sqlstate(&err) == "57P03").then_some(err)
    })
    .await;
    let seen = seen.into_inner().unwrap();
    assert!(seen.len() >= 4, "three 25006 first: {seen:?}");
    assert!(
        seen[..seen.len() - 1].iter().all(|c| c == "25006"),
        "{seen:?}"
    );
    assert!(
        refused
            .as_db_error()
            .unwrap()
            .message()
            .contains("retry in")
    );
    let health = proxy.health_json().await;
    let why = health["backends"][0]["circuit_reason"]
        .as_str()
        .unwrap_or_default();
    assert!(why.contains("25006"), "{health}");
    assert_eq!(
        first_value(&app, "SELECT count(*) FROM ro").await,
        "0",
        "reads go on"
    );
    assert_eq!(pg.psql("SELECT count(*) FROM ro"), "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_write_in_a_psql_transaction_block_fails_the_block_and_commit_rolls_back() {
    let pg = Cluster::start();
    pg.psql("CREATE TABLE b (x int)");
    let proxy = Proxy::start(fast_config(&[&pg])).await;
    wedge_until_circuit_opens(&pg, &proxy).await;
    let script = "\\set VERBOSITY verbose\nBEGIN;\nSELECT 1 AS one;\nINSERT INTO b VALUES (1);\nSELECT 2 AS two;\nCOMMIT;\nSELECT 3 AS three;\n";
    let out = tokio::task::spawn_blocking({
        let port = proxy.addr.port().to_string();
        move || {
            let mut child = std::process::Command::new("psql")
                .args([
                    "-X",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port,
                    "-U",
                    "postgres",
                    "-d",
                    "postgres",
                ])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            std::io::Write::write_all(child.stdin.as_mut().unwrap(), script.as_bytes()).unwrap();
            child.wait_with_output().unwrap()
        }
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("ERROR:  57P03: bulkhead: write refused"),
        "{stderr}"
    );
    assert!(stderr.contains("ERROR:  25P02:"), "{stderr}");
    assert!(
        stdout.contains("ROLLBACK"),
        "COMMIT of a failed block answers ROLLBACK: {stdout}"
    );
    assert!(!stdout.contains("two"), "{stdout}");
    assert!(
        stdout.contains("three"),
        "session usable after the block: {stdout}"
    );
    unwedge(&pg);
    assert_eq!(pg.psql("SELECT count(*) FROM b"), "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_prepared_write_in_a_transaction_leaves_client_and_server_agreeing() {
    let pg = Cluster::start();
    pg.psql("CREATE TABLE p (x int)");
    let proxy = Proxy::start(fast_config(&[&pg])).await;
    let c = proxy.connect().await;
    let insert = c.prepare("INSERT INTO p VALUES ($1)").await.unwrap();
    let select = c.prepare("SELECT count(*) FROM p").await.unwrap();
    let pid = first_value(&c, "SELECT pg_backend_pid()").await;
    wedge_until_circuit_opens(&pg, &proxy).await;

    c.batch_execute("BEGIN").await.unwrap();
    c.query_one(&select, &[]).await.unwrap();
    let err = c.execute(&insert, &[&1i32]).await.unwrap_err();
    assert_eq!(sqlstate(&err), "57P03");
    let err = c.query_one(&select, &[]).await.unwrap_err();
    assert_eq!(sqlstate(&err), "25P02");
    c.batch_execute("ROLLBACK").await.unwrap();
    let state = pg.psql(&format!(
        "SELECT state FROM pg_stat_activity WHERE pid = {pid}"
    ));
    assert_eq!(state, "idle", "the server's transaction ended too");
    // The next transaction works (reads, while the circuit is open).
    c.batch_execute("BEGIN").await.unwrap();
    assert_eq!(c.query_one(&select, &[]).await.unwrap().get::<_, i64>(0), 0);
    c.batch_execute("COMMIT").await.unwrap();
    unwedge(&pg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_and_commit_prepared_before_the_failure_still_end_the_failed_block() {
    let pg = Cluster::start();
    pg.psql("CREATE TABLE q (x int)");
    let proxy = Proxy::start(fast_config(&[&pg])).await;
    let c = proxy.connect().await;
    // Prepared while healthy, as drivers that cache transaction commands do.
    let rollback = c.prepare("ROLLBACK").await.unwrap();
    let commit = c.prepare("COMMIT").await.unwrap();
    let insert = c.prepare("INSERT INTO q VALUES ($1)").await.unwrap();
    let pid = first_value(&c, "SELECT pg_backend_pid()").await;
    wedge_until_circuit_opens(&pg, &proxy).await;
    let state = || {
        pg.psql(&format!(
            "SELECT state FROM pg_stat_activity WHERE pid = {pid}"
        ))
    };
    for end in [&rollback, &commit] {
        c.batch_execute("BEGIN").await.unwrap();
        assert_eq!(
            sqlstate(&c.execute(&insert, &[&1i32]).await.unwrap_err()),
            "57P03"
        );
        c.execute(end, &[]).await.unwrap();
        assert_eq!(state(), "idle", "the server's transaction ended");
        assert_eq!(first_value(&c, "SELECT count(*) FROM q").await, "0");
    }
    unwedge(&pg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_under_a_steady_writer_loses_no_acknowledged_write_and_the_old_primary_gets_none()
{
    let primary = Cluster::start();
    primary.psql("CREATE TABLE acks (id int PRIMARY KEY)");
    let standby = Cluster::standby_of(&primary);
    let proxy = Proxy::start(fast_config(&[&primary, &standby])).await;
    let params = proxy.params("postgres");

    // A writer that inserts 1, 2, 3, ... and remembers what was acknowledged.
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let writer = tokio::spawn(async move {
        let mut acked = Vec::new();
        let mut next = 1;
        let mut client: Option<Client> = None;
        loop {
            if stop_rx.try_recv().is_ok() {
                return acked;
            }
            if client.as_ref().is_none_or(|c| c.is_closed()) {
                client = match tokio_postgres::connect(&params, NoTls).await {
                    Ok((c, conn)) => {
                        tokio::spawn(conn);
                        Some(c)
                    }
                    Err(_) => None,
                };
                if client.is_none() {
                    continue;
                }
            }
            let c = client.as_ref().unwrap();
            if c.simple_query(&format!("INSERT INTO acks VALUES ({next})"))
                .await
                .is_ok()
            {
                acked.push(next);
            }
            next += 1;
        }
    });
    eventually("some writes on the first primary", SECONDS_20, || async {
        (primary
            .psql("SELECT count(*) FROM acks")
            .parse::<i32>()
            .unwrap()
            >= 20)
            .then_some(())
    })
    .await;

    primary.stop("fast");
    standby.promote();
    let inherited: i64 = standby.psql("SELECT count(*) FROM acks").parse().unwrap();
    let started = Instant::now();
    eventually(
        "a new session to write on the new primary",
        SECONDS_20,
        || async {
            let (c, conn) = tokio_postgres::connect(&proxy.params("postgres"), NoTls)
                .await
                .ok()?;
            tokio::spawn(conn);
            c.simple_query("INSERT INTO acks VALUES (-1)").await.ok()
        },
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    eventually(
        "the writer to make progress on the new primary",
        SECONDS_20,
        || async {
            (standby
                .psql("SELECT count(*) FROM acks WHERE id > 0")
                .parse::<i64>()
                .unwrap()
                > inherited + 5)
                .then_some(())
        },
    )
    .await;

    // The old primary comes back, still a primary on the old timeline: it gets no writes.
    primary.start_again();
    eventually(
        "the old primary to be seen and superseded",
        SECONDS_20,
        || async {
            let hosts = proxy.bulkhead.topology().hosts();
            (hosts[0].role == Role::Primary && hosts[0].superseded).then_some(())
        },
    )
    .await;
    let c = connect(&proxy.params("postgres")).await;
    c.batch_execute("INSERT INTO acks VALUES (-2)")
        .await
        .unwrap();

    let _ = stop_tx.send(());
    let acked = writer.await.unwrap();
    let on_new: Vec<i32> = standby
        .psql("SELECT string_agg(id::text, ',') FROM acks WHERE id > 0")
        .split(',')
        .filter_map(|v| v.parse().ok())
        .collect();
    let lost: Vec<_> = acked.iter().filter(|id| !on_new.contains(id)).collect();
    assert!(
        lost.is_empty(),
        "acknowledged writes missing on the new primary: {lost:?}"
    );
    assert_eq!(
        primary.psql("SELECT count(*) FROM acks WHERE id = -2"),
        "0",
        "a write reached the old primary"
    );
    assert_eq!(standby.psql("SELECT count(*) FROM acks WHERE id = -2"), "1");
    assert!(
        proxy
            .bulkhead
            .metrics()
            .render()
            .contains("bulkhead_failovers_total 1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promoted_standby_takes_over_and_sessions_on_the_old_primary_close_with_57p01() {
    let primary = Cluster::start();
    primary.psql("CREATE TABLE s (x int)");
    let standby = Cluster::standby_of(&primary);
    let proxy = Proxy::start(fast_config(&[&primary, &standby])).await;
    let (idle, idle_conn) = connect_watched(&proxy.params("postgres")).await;
    let (busy, busy_conn) = connect_watched(&proxy.params("postgres")).await;
    busy.batch_execute("BEGIN; INSERT INTO s VALUES (1)")
        .await
        .unwrap();

    // Split brain: the standby is promoted while the old primary still runs.
    standby.promote();
    let idle_end = tokio::time::timeout(SECONDS_20, idle_conn)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(sqlstate(&idle_end.unwrap_err()), "57P01");
    drop(idle);
    // The open transaction may finish; then its session closes too.
    busy.batch_execute("COMMIT").await.unwrap();
    let busy_end = tokio::time::timeout(SECONDS_20, busy_conn)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(sqlstate(&busy_end.unwrap_err()), "57P01");
    // New sessions go to the new primary.
    let c = connect(&proxy.params("postgres")).await;
    c.batch_execute("INSERT INTO s VALUES (2)").await.unwrap();
    assert_eq!(standby.psql("SELECT count(*) FROM s WHERE x = 2"), "1");
    assert_eq!(primary.psql("SELECT count(*) FROM s WHERE x = 2"), "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_postmaster_is_marked_unreachable_and_new_sessions_fail_in_bounded_time() {
    let pg = Cluster::start();
    let mut config = fast_config(&[&pg]);
    config.circuit.hold_new_connections = Duration::from_secs(2);
    // The status checks decide alone: with a heartbeat answering on its kept connection, a
    // stopped postmaster only makes the host slow to start sessions (see commit_path's
    // a_primary_slow_to_start_sessions_keeps_its_role_and_its_sessions_go_on).
    config.probe.heartbeat = Duration::ZERO;
    let proxy = Proxy::start(config).await;
    connect(&proxy.params("postgres")).await;
    let stopped = Frozen::stop(vec![pg.postmaster_pid()]);
    let started = Instant::now();
    let err = tokio_postgres::connect(&proxy.params("postgres"), NoTls)
        .await
        .err()
        .expect("connected to a stopped server");
    let took = started.elapsed();
    eventually(
        "the probe to mark the host unreachable",
        SECONDS_20,
        || async { (proxy.bulkhead.topology().hosts()[0].role == Role::Unreachable).then_some(()) },
    )
    .await;
    drop(stopped);
    assert_eq!(sqlstate(&err), "57P03", "{err:?}");
    assert!(
        took < Duration::from_secs(2) + Duration::from_secs(3),
        "took {took:?}"
    );
    eventually("the server to come back", SECONDS_20, || async {
        let (c, conn) = tokio_postgres::connect(&proxy.params("postgres"), NoTls)
            .await
            .ok()?;
        tokio::spawn(conn);
        c.simple_query("SELECT 1").await.ok()
    })
    .await;
}

/// Issue 18's split brain: the primary is killed, its standby promoted, the old primary
/// restarted as it was (a primary on timeline 1 again) and, just then, the new primary misses
/// probes. Before, bulkhead moved writes to the old primary and they were acknowledged there
/// only. Now the old primary is fenced by the highest timeline ever seen, whatever the order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_primary_restarted_while_the_new_one_misses_probes_gets_no_write() {
    let old = Cluster::start();
    old.psql("CREATE TABLE fence (x int)");
    let new = Cluster::standby_of(&old);
    let proxy = Proxy::start(fast_config(&[&old, &new])).await;
    let c = proxy.connect().await;
    c.simple_query("INSERT INTO fence VALUES (0)")
        .await
        .unwrap();
    drop(c);

    old.stop("immediate");
    new.promote();
    eventually("the promoted standby to be primary", SECONDS_20, || async {
        let p = proxy.bulkhead.topology().watch_primary().borrow().clone();
        (p.map(|p| p.index) == Some(1)).then_some(())
    })
    .await;
    let tl = proxy.bulkhead.topology().hosts()[1].timeline;
    assert_eq!(
        tl, 2,
        "the new primary's timeline is read from its WAL at once"
    );

    // The new primary stops answering (the whole server: a stopped postmaster alone only
    // delays new sessions, and a host whose connections answer keeps its role), and the old
    // one comes back as it was.
    let frozen = Frozen::freeze(&new);
    eventually("the new primary to miss its probe", SECONDS_20, || async {
        (proxy.bulkhead.topology().hosts()[1].role == Role::Unreachable).then_some(())
    })
    .await;
    old.start_again();
    let until = Instant::now() + Duration::from_secs(4);
    let mut refused = 0;
    let mut i = 1;
    while Instant::now() < until {
        if let Ok((c, conn)) = tokio_postgres::connect(&proxy.params("postgres"), NoTls).await {
            tokio::spawn(conn);
            if c.simple_query(&format!("INSERT INTO fence VALUES ({i})"))
                .await
                .is_err()
            {
                refused += 1;
            }
        } else {
            refused += 1;
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let hosts = proxy.bulkhead.topology().hosts();
    drop(frozen);
    assert_eq!(
        hosts[0].role,
        Role::Primary,
        "the old primary is up and claims primary"
    );
    assert!(hosts[0].superseded, "{hosts:?}");
    assert_eq!(old.psql("SELECT count(*) FROM fence WHERE x > 0"), "0");
    assert!(refused > 0);

    eventually("writes to reach the new primary", SECONDS_20, || async {
        let (c, conn) = tokio_postgres::connect(&proxy.params("postgres"), NoTls)
            .await
            .ok()?;
        tokio::spawn(conn);
        c.simple_query("INSERT INTO fence VALUES (-1)").await.ok()
    })
    .await;
    assert_eq!(new.psql("SELECT count(*) FROM fence WHERE x = -1"), "1");
    assert_eq!(old.psql("SELECT count(*) FROM fence WHERE x = -1"), "0");
}

/// Two hosts that both claim primary on the same timeline (two clusters never related, or a
/// split brain bulkhead cannot settle): a bulkhead starting among them refuses writes rather
/// than guess, and says why on /health and /readyz.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starting_among_two_primaries_on_one_timeline_chooses_none_and_says_so() {
    let a = Cluster::start();
    let b = Cluster::start();
    let proxy = Proxy::start(fast_config(&[&a, &b])).await;
    let reason = eventually("/readyz to name the conflict", SECONDS_20, || async {
        let r = proxy.get("/readyz").await;
        (r.status == 503 && r.body.contains("claim primary")).then_some(r.body)
    })
    .await;
    assert!(reason.contains("writes are refused"), "{reason}");
    let health = proxy.health_json().await;
    assert_eq!(health["primary"], serde_json::Value::Null, "{health}");
    assert!(
        health["conflict"]
            .as_str()
            .unwrap_or_default()
            .contains("2 hosts claim primary on timeline 1"),
        "{health}"
    );
    // New sessions are not sent to either.
    let mut config = fast_config(&[&a, &b]);
    config.circuit.hold_new_connections = Duration::from_millis(300);
    let quick = Proxy::start(config).await;
    let err = tokio_postgres::connect(&quick.params("postgres"), NoTls)
        .await
        .err()
        .expect("refused");
    assert_eq!(sqlstate(&err), "57P03", "{err:?}");
}
