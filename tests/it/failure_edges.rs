//! Issue 18: failure edges found against real faults: a server at max_connections, settings
//! that used to pass `--check` and crash.

use std::time::Duration;

use tokio_postgres::NoTls;

use crate::support::{Binary, Cluster, Proxy, config_for, eventually, free_port, sqlstate};

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
