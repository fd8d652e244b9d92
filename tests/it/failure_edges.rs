//! Issue 18: failure edges found against real faults: a server at max_connections, settings
//! that used to pass `--check` and crash.

use std::time::Duration;

use tokio_postgres::NoTls;

use crate::support::{
    Binary, Blackhole, Cluster, Proxy, config_for, connect_watched, eventually, free_port, sqlstate,
};

const SECONDS_20: Duration = Duration::from_secs(20);

/// A server at max_connections is up and full, not gone. Before, the probe's 53300 marked it
/// unreachable, /readyz said 503 "no writable primary" on every sidecar at once (an overload
/// became an outage) and a new client waited hold_new_connections for a 57P03.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_server_keeps_its_role_and_new_clients_get_its_own_53300_at_once() {
    let pg = Cluster::start_with(&["max_connections = 6", "superuser_reserved_connections = 0"]);
    let mut config = config_for(&pg);
    config.probe.interval = Duration::from_millis(200);
    config.probe.timeout = Duration::from_millis(400);
    // Only a new connection finds the server full; the probe opens one every interval here.
    config.probe.new_session_interval = Duration::from_millis(200);
    config.circuit.hold_new_connections = Duration::from_secs(10);
    let proxy = Proxy::start(config).await;
    eventually("ready", SECONDS_20, || async {
        (proxy.get("/readyz").await.status == 200).then_some(())
    })
    .await;

    // Fill the server directly.
    let direct = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres",
        pg.port
    );
    let mut held = Vec::new();
    loop {
        match tokio_postgres::connect(&direct, NoTls).await {
            Ok((c, conn)) => {
                tokio::spawn(conn);
                held.push(c);
            }
            Err(e) => {
                assert_eq!(sqlstate(&e), "53300", "{e:?}");
                break;
            }
        }
        assert!(held.len() < 10, "max_connections did not bite");
    }
    // Several probes see the server full.
    eventually("the probe to see the server full", SECONDS_20, || async {
        let health = proxy.health_json().await;
        let error = health["backends"][0]["error"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        error.contains("53300").then_some(())
    })
    .await;
    let health = proxy.health_json().await;
    assert_eq!(health["backends"][0]["role"], "primary", "{health}");
    assert_eq!(proxy.get("/readyz").await.status, 200, "{health}");

    let started = std::time::Instant::now();
    let err = tokio_postgres::connect(&proxy.params("postgres"), NoTls)
        .await
        .err()
        .expect("the server is full");
    assert_eq!(sqlstate(&err), "53300", "the server's own error: {err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "answered after {:?}, not after hold_new_connections",
        started.elapsed()
    );

    held.clear();
    eventually("a session once a place is free", SECONDS_20, || async {
        let (c, conn) = tokio_postgres::connect(&proxy.params("postgres"), NoTls)
            .await
            .ok()?;
        tokio::spawn(conn);
        c.simple_query("SELECT 1").await.ok()
    })
    .await;
}

/// Durations that overflowed the clock (sessions panicked, the probe or health thread died)
/// and probe timings that could never find a primary are refused by `--check`, with key and
/// line, as by SIGHUP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_durations_fail_check_with_key_and_line() {
    let pg = Cluster::start();
    for (extra, key) in [
        (
            "[timeouts]\nwrite = \"18000000000000000000s\"\n",
            "timeouts.write",
        ),
        ("[probe]\ninterval = \"1ns\"\n", "probe.interval"),
        ("[probe]\ntimeout = \"1ns\"\n", "probe.timeout"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, Binary::config_text(free_port(), &pg, extra)).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_bulkhead"))
            .arg("--config")
            .arg(&path)
            .arg("--check")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{extra}: {stderr}");
        assert!(
            stderr.contains(key) && stderr.contains("(line "),
            "{extra}: {stderr}"
        );
    }
}

/// Blackholed mid-COMMIT, healed after bulkhead gave up: before, the client got FATAL 40003 and
/// the kernel kept retransmitting the COMMIT, which committed seconds after the heal, so a
/// client that checked and retried wrote twice. Giving up now resets the connection (SO_LINGER
/// 0), and nothing bulkhead had sent is delivered later. The network fault is made with
/// iptables on loopback: a userspace relay would acknowledge the bytes itself, and the bug is
/// in what the kernel does with unacknowledged ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_given_up_in_a_blackhole_is_not_delivered_after_the_heal() {
    let pg = Cluster::start();
    pg.psql("CREATE TABLE late (x int)");
    let mut config = config_for(&pg);
    config.timeouts.write = Duration::from_millis(800);
    config.timeouts.cancel_grace = Duration::from_millis(400);
    config.database.connect_timeout = Duration::from_millis(300);
    let proxy = Proxy::start(config).await;
    let (c, conn) = connect_watched(&proxy.params("postgres")).await;
    c.batch_execute("BEGIN; INSERT INTO late VALUES (1)")
        .await
        .unwrap();

    let mut hole = Blackhole::new(pg.port);
    hole.start();
    let err = tokio::time::timeout(SECONDS_20, c.batch_execute("COMMIT"))
        .await
        .expect("answered")
        .unwrap_err();
    assert_eq!(sqlstate(&err), "40003", "{err:?}");
    assert!(
        err.as_db_error()
            .unwrap()
            .hint()
            .unwrap_or_default()
            .contains("in progress"),
        "{err:?}"
    );
    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    hole.heal();
    // The kernel would have retransmitted within a few seconds of the heal.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(pg.psql_local("SELECT count(*) FROM late"), "0");
}

/// An idle session whose server side silently died (a blackhole: no reset, no FIN). Before,
/// nothing noticed until the next statement waited out its deadline; with keepalive on the
/// server socket bulkhead notices within seconds and tells the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_session_whose_server_silently_died_is_ended_within_seconds() {
    let pg = Cluster::start();
    let proxy = Proxy::start(config_for(&pg)).await;
    let (c, conn) = connect_watched(&proxy.params("postgres")).await;
    c.simple_query("SELECT 1").await.unwrap();
    let mut hole = Blackhole::new(pg.port);
    hole.start();
    let started = std::time::Instant::now();
    let end = tokio::time::timeout(Duration::from_secs(30), conn)
        .await
        .expect("the dead connection is noticed while idle")
        .unwrap();
    let took = started.elapsed();
    hole.heal();
    assert_eq!(sqlstate(&end.unwrap_err()), "08006");
    // Keepalive: 5 s idle, then 3 probes 2 s apart.
    assert!(took < Duration::from_secs(5 + 6 + 4), "after {took:?}");
}

/// The probe's write-check connection stops answering (its backend is stopped: the cancel
/// cannot free it either). Before, that check never ended, no other check could start, and
/// /readyz stayed 503 on a healthy database. Now the check is abandoned with its connection
/// and the next one, on a new connection, commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_check_stuck_on_a_dead_connection_is_abandoned_and_readiness_comes_back() {
    let pg = Cluster::start();
    let mut config = config_for(&pg);
    config.probe.interval = Duration::from_millis(200);
    config.probe.timeout = Duration::from_millis(400);
    config.database.connect_timeout = Duration::from_millis(500);
    let proxy = Proxy::start(config).await;
    let admin = pg.connect().await;
    let pid: i32 = eventually("the probe's write-check backend", SECONDS_20, || async {
        admin
            .query_opt(
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'bulkhead probe' \
                 AND query LIKE '%pg_logical_emit_message%'",
                &[],
            )
            .await
            .unwrap()
            .map(|r| r.get(0))
    })
    .await;
    let _resume = crate::support::Frozen::stop(vec![pid]);
    eventually(
        "/readyz to say 503 for the stuck check",
        SECONDS_20,
        || async { (proxy.get("/readyz").await.status == 503).then_some(()) },
    )
    .await;
    let stuck = std::time::Instant::now();
    eventually("/readyz to come back", SECONDS_20, || async {
        (proxy.get("/readyz").await.status == 200).then_some(())
    })
    .await;
    // Abandoned at twice the timeout plus a connect, then a check on a new connection.
    assert!(
        stuck.elapsed() < Duration::from_secs(4),
        "after {:?}",
        stuck.elapsed()
    );
}

/// One failed status check (one lost SYN under packet loss, a postmaster that stalls for a
/// moment) does not make the primary unknown: the probe asks again at once and believes two
/// failures in a row. Before, a single one left no writable primary for up to an interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_failed_status_check_does_not_demote_the_primary() {
    let pg = Cluster::start();
    let mut config = config_for(&pg);
    config.probe.interval = Duration::from_millis(200);
    config.probe.timeout = Duration::from_millis(400);
    let proxy = Proxy::start(config).await;
    let topology = proxy.bulkhead.topology();
    eventually("a primary", SECONDS_20, || async {
        topology.watch_primary().borrow().is_some().then_some(())
    })
    .await;
    let postmaster = pg.postmaster_pid();
    // Longer than the probe's timeout, shorter than two: one check fails, its retry does not.
    // SAFETY: kill has no memory-safety preconditions; the pid is the test cluster's postmaster.
    assert_eq!(unsafe { libc::kill(postmaster, libc::SIGSTOP) }, 0);
    let resumed = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(600));
        // SAFETY: as above.
        unsafe { libc::kill(postmaster, libc::SIGCONT) };
    });
    let until = std::time::Instant::now() + Duration::from_millis(1500);
    while std::time::Instant::now() < until {
        assert!(
            topology.watch_primary().borrow().is_some(),
            "the primary was dropped after one failed check: {:?}",
            topology.hosts()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    resumed.join().unwrap();
}

/// At a descriptor limit below what max_clients needs: bulkhead says so at start and caps
/// sessions at what the limit allows, so clients beyond it get 53300 at once (before, they got
/// no answer at all), and the health port keeps answering (before, /livez timed out, and a
/// liveness restart would have dropped every session) with the primary still known (before,
/// the probe's "Too many open files" made it unknown).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_clients_get_53300_and_the_health_port_still_answers() {
    let pg = Cluster::start();
    let health = free_port();
    let bin = Binary::start_with_nofile(
        &pg,
        &format!("[health]\naddress = \"127.0.0.1:{health}\"\n"),
        Some(128),
    )
    .await;
    assert!(
        bin.log().contains("file descriptor limit is below"),
        "{}",
        bin.log()
    );
    let mut sessions = Vec::new();
    let mut refused = None;
    for _ in 0..120 {
        let started = std::time::Instant::now();
        let attempt = tokio::time::timeout(
            Duration::from_secs(5),
            tokio_postgres::connect(&bin.params(), NoTls),
        )
        .await
        .unwrap_or_else(|_| {
            panic!(
                "every client gets an answer; after {} sessions:\n{}",
                sessions.len(),
                bin.log()
            )
        });
        match attempt {
            Ok((c, conn)) => {
                tokio::spawn(conn);
                sessions.push(c);
            }
            Err(e) => {
                refused = Some((e, started.elapsed()));
                break;
            }
        }
    }
    let (err, took) = refused.expect("the limit was reached");
    assert_eq!(sqlstate(&err), "53300", "{err:?}");
    assert!(took < Duration::from_secs(2), "refused after {took:?}");
    // (128 - 64 headroom) / 2.
    assert_eq!(sessions.len(), 32);
    let health = std::net::SocketAddr::from(([127, 0, 0, 1], health));
    for path in ["/livez", "/readyz"] {
        let r = tokio::task::spawn_blocking(move || crate::support::http(health, "GET", path))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{path}: {r:?}");
    }
    // A session that ends frees room for the next.
    sessions.truncate(sessions.len() - 2);
    eventually(
        "a session once descriptors are free",
        SECONDS_20,
        || async {
            let (c, conn) = tokio_postgres::connect(&bin.params(), NoTls).await.ok()?;
            tokio::spawn(conn);
            c.simple_query("SELECT 1").await.ok()
        },
    )
    .await;
}

/// Idle connections to the health port (1,100 of them, bound to 0.0.0.0 in the sidecar
/// example, starved the data path of descriptors before) are capped at 64: beyond that a new
/// one is closed at once, and the port still answers once they go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_health_port_connections_are_capped() {
    let pg = Cluster::start();
    let proxy = Proxy::start(config_for(&pg)).await;
    let mut idle = Vec::new();
    for _ in 0..100 {
        idle.push(
            tokio::net::TcpStream::connect(proxy.health.addr)
                .await
                .unwrap(),
        );
    }
    let mut closed = 0;
    for s in &mut idle {
        let mut buf = [0u8; 16];
        if let Ok(Ok(0)) = tokio::time::timeout(
            Duration::from_millis(100),
            tokio::io::AsyncReadExt::read(s, &mut buf),
        )
        .await
        {
            closed += 1;
        }
    }
    assert_eq!(
        closed,
        100 - 64,
        "connections beyond the cap are closed at once"
    );
    drop(idle);
    // Until the health thread has seen the idle connections go, a new one may still find the
    // cap full and be reset: that is a try, not a failure.
    eventually("/livez to answer", SECONDS_20, || async {
        (proxy.try_get("/livez").await?.status == 200).then_some(())
    })
    .await;
}

/// A client that half-closes after its Query (shutdown of its write side, as `nc -N` or a
/// script piping one statement does) is answered, as PostgreSQL answers it. Before, bulkhead
/// took the EOF for a vanished client and dropped the answer. A client that stays silent
/// beyond cancel_grace is still taken to have vanished, and its statement is cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_half_closes_after_its_query_gets_the_answer() {
    let pg = Cluster::start();
    let proxy = Proxy::start(config_for(&pg)).await;
    let mut r = crate::support::raw::Raw::connect(proxy.addr).await;
    r.login("postgres").await;
    r.send(&crate::support::raw::msg(
        b'Q',
        b"SELECT 41 + 1 AS answer, pg_sleep(0.2)\0",
    ))
    .await;
    tokio::io::AsyncWriteExt::shutdown(&mut r.stream)
        .await
        .unwrap();
    let out = r.recv_until(b'Z').await;
    let row = out.iter().find(|(t, _)| *t == b'D').expect("the row");
    assert!(String::from_utf8_lossy(&row.1).contains("42"), "{out:?}");
    assert_eq!(r.recv().await, None, "then the connection closes");
}
