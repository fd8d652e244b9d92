//! Issue 8: TLS toward servers that require it and from clients that ask for it. Servers here
//! run with ssl = on and a certificate the test made; the TLS-only ones reject plaintext in
//! pg_hba.conf, so a session that gets through proves bulkhead spoke TLS.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use tokio::time::Instant;
use tokio_postgres::config::{ChannelBinding, SslMode};
use tokio_postgres::{Client, NoTls};

use bulkhead::Config;
use bulkhead::config::{ListenTls, ServerTls};

use crate::support::raw::{self, Raw};
use crate::support::tls::Pki;
use crate::support::{Cluster, Proxy, eventually, first_value, sqlstate};

const SECONDS_20: Duration = Duration::from_secs(20);

/// bulkhead in front of `pg` with [database] tls = `mode`, probing quickly.
fn config(pg: &Cluster, mode: ServerTls, ca: Option<&Path>) -> Config {
    let mut config = Config::default();
    config.database.hosts = vec![pg.addr()];
    config.database.tls = mode;
    config.database.ca_file = ca.map(|p| p.display().to_string()).unwrap_or_default();
    config.probe.interval = Duration::from_millis(200);
    config.circuit.hold_new_connections = Duration::from_secs(10);
    config
}

/// The same, and clients may (or must) use TLS with `pki`'s server certificate.
fn config_with_client_tls(pg: &Cluster, pki: &Pki, listen: ListenTls) -> Config {
    let mut config = config(pg, ServerTls::VerifyFull, Some(&pki.ca()));
    config.listen.tls = listen;
    config.listen.tls_cert_file = pki.cert().display().to_string();
    config.listen.tls_key_file = pki.key().display().to_string();
    config
}

/// Whether the server sees this session's connection (bulkhead's) as TLS.
async fn server_side_is_tls(c: &Client) -> bool {
    first_value(
        c,
        "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
    )
    .await
        == "t"
}

/// A session through bulkhead must fail: returns its SQLSTATE, message and how long it took.
async fn refused(proxy: &Proxy) -> (String, String, Duration) {
    let started = Instant::now();
    let e = tokio_postgres::connect(&proxy.params("postgres"), NoTls)
        .await
        .err()
        .expect("the session is refused");
    let message = e
        .as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_default();
    (sqlstate(&e), message, started.elapsed())
}

/// What bulkhead's /health says about the one host.
async fn host_health(proxy: &Proxy) -> serde_json::Value {
    proxy.health_json().await["backends"][0].clone()
}

/// psql through bulkhead with extra connection settings; `password` goes in PGPASSWORD.
fn psql(proxy: &Proxy, settings: &str, user: &str, password: &str, sql: &str) -> Output {
    Command::new("psql")
        .arg(format!(
            "host=127.0.0.1 port={} user={user} dbname=postgres {settings}",
            proxy.addr.port()
        ))
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .env("PGPASSWORD", password)
        .env_remove("PGSSLMODE")
        .output()
        .expect("run psql")
}

/// psql logs in through bulkhead as `scram_user` (password "scram-secret") with `settings`.
fn scram_user_logs_in(proxy: &Proxy, settings: &str) {
    let out = psql(
        proxy,
        settings,
        "scram_user",
        "scram-secret",
        "SELECT current_user",
    );
    assert_eq!(
        text(&out).trim(),
        "scram_user",
        "{settings}: {}",
        text(&out)
    );
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_with_the_right_ca_and_name_reaches_a_tls_only_server() {
    let pki = Pki::new(&["127.0.0.1", "localhost"]);
    let pg = Cluster::start_tls(&pki);
    let proxy = Proxy::start(config(&pg, ServerTls::VerifyFull, Some(&pki.ca()))).await;
    let c = proxy.connect().await;
    assert!(server_side_is_tls(&c).await);
    c.batch_execute("CREATE TABLE over_tls (x int); INSERT INTO over_tls VALUES (7)")
        .await
        .unwrap();
    assert_eq!(pg.psql("SELECT x FROM over_tls"), "7");
    // The probe goes the same way, and the health port says so.
    let host = eventually("the probe to report TLS", SECONDS_20, || async {
        let h = host_health(&proxy).await;
        (h["tls"] == "on" && h["role"] == "primary").then_some(h)
    })
    .await;
    assert!(host["error"].is_null(), "{host}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_with_the_wrong_ca_is_a_fatal_08006_that_names_the_ca() {
    let pki = Pki::new(&["127.0.0.1"]);
    let other = Pki::new(&["127.0.0.1"]);
    let pg = Cluster::start_tls(&pki);
    let proxy = Proxy::start(config(&pg, ServerTls::VerifyFull, Some(&other.ca()))).await;
    let (code, message, took) = refused(&proxy).await;
    assert_eq!(code, "08006", "{message}");
    assert!(message.contains("not signed by a trusted CA"), "{message}");
    // Told at once, not after hold_new_connections (10 s): waiting does not fix a certificate.
    assert!(took < Duration::from_secs(5), "took {took:?}");
    let host = host_health(&proxy).await;
    assert_eq!(host["tls"], "failed", "{host}");
    assert!(
        host["error"].as_str().unwrap().contains("trusted CA"),
        "{host}"
    );
    assert_eq!(proxy.get("/readyz").await.status, 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_another_host_merely_down_the_57p03_still_names_the_tls_failure() {
    let pki = Pki::new(&["127.0.0.1"]);
    let other = Pki::new(&["127.0.0.1"]);
    let pg = Cluster::start_tls(&pki);
    let mut cfg = config(&pg, ServerTls::VerifyFull, Some(&other.ca()));
    let nobody = format!("127.0.0.1:{}", crate::support::free_port());
    cfg.database.hosts = vec![pg.addr(), nobody];
    cfg.circuit.hold_new_connections = Duration::from_millis(1500);
    let proxy = Proxy::start(cfg).await;
    eventually("the probe to fail TLS", SECONDS_20, || async {
        (host_health(&proxy).await["tls"] == "failed").then_some(())
    })
    .await;
    // The other host may yet become primary, so the session waits; then it is told both.
    let (code, message, _) = refused(&proxy).await;
    assert_eq!(code, "57P03", "{message}");
    assert!(
        message.contains("TLS failed") && message.contains("trusted CA"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_refuses_a_certificate_for_another_name_and_verify_ca_accepts_it() {
    let pki = Pki::new(&["db.example.internal"]);
    let pg = Cluster::start_tls(&pki);
    let proxy = Proxy::start(config(&pg, ServerTls::VerifyFull, Some(&pki.ca()))).await;
    let (code, message, _) = refused(&proxy).await;
    assert_eq!(code, "08006", "{message}");
    assert!(
        message.contains("does not match host \"127.0.0.1\"")
            && message.contains("db.example.internal"),
        "{message}"
    );
    proxy.shutdown().await;

    // verify-ca checks the chain only, as libpq does.
    let proxy = Proxy::start(config(&pg, ServerTls::VerifyCa, Some(&pki.ca()))).await;
    let c = proxy.connect().await;
    assert!(server_side_is_tls(&c).await);
    // A CA that did not sign it still fails under verify-ca.
    let other = Pki::new(&["db.example.internal"]);
    let proxy = Proxy::start(config(&pg, ServerTls::VerifyCa, Some(&other.ca()))).await;
    let (code, message, _) = refused(&proxy).await;
    assert_eq!(code, "08006", "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_accepts_a_self_signed_certificate_and_refuses_a_server_without_tls() {
    let pki = Pki::self_signed(&["somewhere.else"]);
    let pg = Cluster::start_tls(&pki);
    let proxy = Proxy::start(config(&pg, ServerTls::Require, None)).await;
    let c = proxy.connect().await;
    assert!(server_side_is_tls(&c).await);

    let plain = Cluster::start();
    let proxy = Proxy::start(config(&plain, ServerTls::Require, None)).await;
    let (code, message, took) = refused(&proxy).await;
    assert_eq!(code, "08006", "{message}");
    assert!(message.contains("does not accept TLS"), "{message}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefer_uses_tls_when_offered_and_plaintext_when_not_and_disable_never_asks() {
    let pki = Pki::self_signed(&["somewhere.else"]);
    let tls_only = Cluster::start_tls(&pki);
    let proxy = Proxy::start(config(&tls_only, ServerTls::Prefer, None)).await;
    assert!(server_side_is_tls(&proxy.connect().await).await);

    let plain = Cluster::start();
    let proxy = Proxy::start(config(&plain, ServerTls::Prefer, None)).await;
    let c = proxy.connect().await;
    assert!(!server_side_is_tls(&c).await);
    let host = eventually("the probe to report plaintext", SECONDS_20, || async {
        let h = host_health(&proxy).await;
        (h["tls"] == "off").then_some(h)
    })
    .await;
    assert_eq!(host["role"], "primary");

    // disable: plaintext, which this server's pg_hba.conf rejects; the probe says so, and
    // with no usable primary a session is refused with 57P03.
    let mut cfg = config(&tls_only, ServerTls::Disable, None);
    cfg.circuit.hold_new_connections = Duration::from_millis(500);
    let proxy = Proxy::start(cfg).await;
    let host = eventually("the probe to be rejected", SECONDS_20, || async {
        let h = host_health(&proxy).await;
        h["error"].as_str()?.contains("no encryption").then_some(h)
    })
    .await;
    assert_eq!(host["tls"], "unknown", "{host}");
    let (code, message, _) = refused(&proxy).await;
    assert_eq!(code, "57P03", "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_logs_bulkhead_and_its_probe_in_where_the_server_demands_one() {
    let pki = Pki::new(&["127.0.0.1"]);
    let pg = Cluster::start_tls_cert_auth(&pki);
    let mut cfg = config(&pg, ServerTls::VerifyFull, Some(&pki.ca()));
    cfg.database.cert_file = pki.client_cert().display().to_string();
    cfg.database.key_file = pki.client_key().display().to_string();
    let proxy = Proxy::start(cfg).await;
    let c = proxy.connect().await;
    assert_eq!(
        first_value(
            &c,
            "SELECT client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        )
        .await,
        "/CN=postgres"
    );
    eventually("the probe to log in by certificate", SECONDS_20, || async {
        (host_health(&proxy).await["tls"] == "on").then_some(())
    })
    .await;
    proxy.shutdown().await;

    // Without the certificate the server refuses the login, and the probe says why.
    let mut cfg = config(&pg, ServerTls::VerifyFull, Some(&pki.ca()));
    cfg.circuit.hold_new_connections = Duration::from_millis(500);
    let proxy = Proxy::start(cfg).await;
    let host = eventually("the probe to be refused", SECONDS_20, || async {
        let h = host_health(&proxy).await;
        h["error"].as_str()?.contains("28000").then_some(h)
    })
    .await;
    assert!(
        host["error"].as_str().unwrap().contains("certificate"),
        "{host}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_connects_with_sslmode_require_and_verify_full_through_bulkhead() {
    let pki = Pki::new(&["127.0.0.1"]);
    let pg = Cluster::start_tls(&pki);
    let proxy = Proxy::start(config_with_client_tls(&pg, &pki, ListenTls::Prefer)).await;
    let ca = pki.ca().display().to_string();
    for settings in [
        "sslmode=require".to_string(),
        format!("sslmode=verify-full sslrootcert={ca}"),
    ] {
        let out = psql(&proxy, &settings, "postgres", "", "\\conninfo");
        assert!(out.status.success(), "{settings}: {}", text(&out));
        assert!(
            text(&out).contains("SSL connection"),
            "{settings}: {}",
            text(&out)
        );
        let out = psql(
            &proxy,
            &settings,
            "postgres",
            "",
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        );
        assert_eq!(text(&out).trim(), "t", "{settings}");
    }
    // Under "prefer" a plaintext client still gets in.
    let out = psql(&proxy, "sslmode=disable", "postgres", "", "SELECT 1");
    assert!(out.status.success(), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_clients_are_refused_with_28000_when_the_listener_requires_tls() {
    let pki = Pki::new(&["127.0.0.1"]);
    let pg = Cluster::start_tls(&pki);
    let proxy = Proxy::start(config_with_client_tls(&pg, &pki, ListenTls::Require)).await;
    let (code, message, _) = refused(&proxy).await;
    assert_eq!(code, "28000", "{message}");
    assert!(message.contains("accepts only TLS"), "{message}");
    let out = psql(&proxy, "sslmode=disable", "postgres", "", "SELECT 1");
    assert!(!out.status.success());
    assert!(text(&out).contains("accepts only TLS"), "{}", text(&out));
    // TLS clients are served.
    let mut params: tokio_postgres::Config = proxy.params("postgres").parse().unwrap();
    params.ssl_mode(SslMode::Require);
    let (c, conn) = params.connect(pki.connector()).await.unwrap();
    tokio::spawn(conn);
    assert!(server_side_is_tls(&c).await);
    // A cancel request over TLS, as tokio-postgres (and libpq 17) send it.
    let token = c.cancel_token();
    let sleeper = tokio::spawn(async move { c.simple_query("SELECT pg_sleep(30)").await });
    eventually("the sleep to run on the server", SECONDS_20, || async {
        let running = pg.psql(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE state = 'active' AND query = 'SELECT pg_sleep(30)'",
        );
        (running == "1").then_some(())
    })
    .await;
    token.cancel_query(pki.connector()).await.unwrap();
    let e = sleeper.await.unwrap().expect_err("cancelled");
    assert_eq!(sqlstate(&e), "57014");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_sent_after_ssl_request_before_the_handshake_are_refused() {
    let pki = Pki::new(&["127.0.0.1"]);
    let pg = Cluster::start_tls(&pki);
    let proxy = Proxy::start(config_with_client_tls(&pg, &pki, ListenTls::Prefer)).await;
    let mut client = Raw::connect(proxy.addr).await;
    let mut bytes = raw::first_packet(80_877_103, b"");
    bytes.extend(raw::startup_packet(0, &[("user", "postgres")]));
    client.send(&bytes).await;
    let body = client.expect_error("FATAL", "08P01").await;
    let message = raw::field(&body, b'M').unwrap();
    assert!(
        message.contains("unencrypted data after SSL request"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_works_over_tls_on_both_sides_without_channel_binding() {
    let pki = Pki::new(&["127.0.0.1"]);
    let pg = Cluster::start_tls(&pki);
    pg.psql(
        "SET password_encryption = 'scram-sha-256'; \
         CREATE ROLE scram_user LOGIN PASSWORD 'scram-secret'",
    );
    // bulkhead's listener has a certificate of its own, not the server's.
    let own = Pki::new(&["127.0.0.1"]);
    let mut config = config_with_client_tls(&pg, &pki, ListenTls::Prefer);
    config.listen.tls_cert_file = own.cert().display().to_string();
    config.listen.tls_key_file = own.key().display().to_string();
    let pki = own;
    let proxy = Proxy::start(config).await;
    // TLS on both sides: the client must not try to bind its login to a TLS session. A
    // plaintext client with TLS only toward the server: plain SCRAM, as offered.
    for settings in ["sslmode=require channel_binding=disable", "sslmode=disable"] {
        scram_user_logs_in(&proxy, settings);
    }
    // libpq's default (channel_binding=prefer) over TLS would be taken by the server as a
    // downgrade; bulkhead says why and what to do instead.
    let out = psql(
        &proxy,
        "sslmode=require",
        "scram_user",
        "scram-secret",
        "SELECT 1",
    );
    assert!(!out.status.success());
    assert!(
        text(&out).contains("channel binding cannot pass through bulkhead")
            && text(&out).contains("channel_binding=disable"),
        "{}",
        text(&out)
    );
    // tokio-postgres over TLS: the same both ways.
    let mut params: tokio_postgres::Config = proxy.params("scram_user").parse().unwrap();
    params.password("scram-secret").ssl_mode(SslMode::Require);
    let e = params
        .connect(pki.connector())
        .await
        .err()
        .expect("refused");
    assert_eq!(sqlstate(&e), "08P01");
    params.channel_binding(ChannelBinding::Disable);
    let (c, conn) = params.connect(pki.connector()).await.unwrap();
    tokio::spawn(conn);
    assert_eq!(first_value(&c, "SELECT current_user").await, "scram_user");
    assert!(server_side_is_tls(&c).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_cancel_statements_on_a_tls_only_server() {
    let pki = Pki::new(&["127.0.0.1"]);
    let pg = Cluster::start_tls(&pki);
    let mut cfg = config(&pg, ServerTls::VerifyFull, Some(&pki.ca()));
    cfg.timeouts.read = Duration::from_millis(500);
    let proxy = Proxy::start(cfg).await;
    let c = proxy.connect().await;
    let started = Instant::now();
    let e = c
        .simple_query("SELECT pg_sleep(30)")
        .await
        .expect_err("cancelled at the read deadline");
    assert_eq!(sqlstate(&e), "57014");
    // Cancelled on the server (the CancelRequest went in plaintext, which hostnossl-reject
    // does not stop), so the answer came well within the deadline plus the grace period.
    assert!(started.elapsed() < Duration::from_millis(500 + 1000 + 1000));
    assert_eq!(first_value(&c, "SELECT 1").await, "1");
    assert!(server_side_is_tls(&c).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_follow_a_failover_between_tls_only_servers() {
    let pki = Pki::new(&["127.0.0.1"]);
    let primary = Cluster::start_tls(&pki);
    let standby = Cluster::standby_of(&primary);
    let mut cfg = config(&primary, ServerTls::VerifyFull, Some(&pki.ca()));
    cfg.database.hosts = vec![primary.addr(), standby.addr()];
    cfg.database.connect_timeout = Duration::from_secs(1);
    cfg.probe.timeout = Duration::from_millis(500);
    let proxy = Proxy::start(cfg).await;
    let c = proxy.connect().await;
    c.batch_execute("CREATE TABLE moved (x int); INSERT INTO moved VALUES (1)")
        .await
        .unwrap();
    eventually("the standby to replay the table", SECONDS_20, || async {
        (standby.psql("SELECT count(*) FROM pg_class WHERE relname = 'moved'") == "1").then_some(())
    })
    .await;
    primary.stop("immediate");
    standby.promote();
    let c = eventually("a session on the new primary", SECONDS_20, || async {
        let c = tokio_postgres::connect(&proxy.params("postgres"), NoTls)
            .await
            .ok()
            .map(|(c, conn)| {
                tokio::spawn(conn);
                c
            })?;
        c.batch_execute("INSERT INTO moved VALUES (2)").await.ok()?;
        Some(c)
    })
    .await;
    assert!(server_side_is_tls(&c).await);
    assert_eq!(standby.psql("SELECT count(*) FROM moved"), "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_tls_both_ways_and_check_names_a_missing_certificate() {
    let pki = Pki::new(&["127.0.0.1"]);
    let pg = Cluster::start_tls(&pki);
    let port = crate::support::free_port();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bulkhead.toml");
    std::fs::write(
        &path,
        format!(
            "[listen]\naddress = \"127.0.0.1:{port}\"\ntls = \"prefer\"\n\
             tls_cert_file = \"{cert}\"\ntls_key_file = \"{key}\"\n\
             [health]\naddress = \"127.0.0.1:{health}\"\n\
             [database]\nhosts = [\"{host}\"]\ntls = \"verify-full\"\nca_file = \"{ca}\"\n",
            health = crate::support::free_port(),
            host = pg.addr(),
            ca = pki.ca().display(),
            cert = pki.cert().display(),
            key = pki.key().display(),
        ),
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_bulkhead");
    let check = Command::new(bin)
        .arg("--config")
        .arg(&path)
        .arg("--check")
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", text(&check));
    let _child = tokio::process::Command::new(bin)
        .arg("--config")
        .arg(&path)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let conninfo = format!(
        "host=127.0.0.1 port={port} user=postgres dbname=postgres sslmode=verify-full sslrootcert={}",
        pki.ca().display()
    );
    let out = eventually("psql through the binary", SECONDS_20, || async {
        let out = Command::new("psql")
            .arg(&conninfo)
            .args([
                "-X",
                "-A",
                "-t",
                "-c",
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            ])
            .output()
            .unwrap();
        out.status.success().then_some(out)
    })
    .await;
    assert_eq!(text(&out).trim(), "t");

    // A certificate file that is not there: --check says which key and which file.
    let missing = dir.path().join("missing.toml");
    std::fs::write(
        &missing,
        "[listen]\ntls_cert_file = \"/nonexistent/server.pem\"\ntls_key_file = \"/nonexistent/server.key\"\n",
    )
    .unwrap();
    let check = Command::new(bin)
        .arg("--config")
        .arg(&missing)
        .arg("--check")
        .output()
        .unwrap();
    assert_eq!(check.status.code(), Some(1));
    assert!(
        text(&check).contains("listen.tls_cert_file")
            && text(&check).contains("/nonexistent/server.pem"),
        "{}",
        text(&check)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_values_and_pipelines_cross_tls_on_both_sides_intact() {
    let pki = Pki::new(&["127.0.0.1"]);
    let pg = Cluster::start_tls(&pki);
    let proxy = Proxy::start(config_with_client_tls(&pg, &pki, ListenTls::Require)).await;
    let mut params: tokio_postgres::Config = proxy.params("postgres").parse().unwrap();
    params
        .ssl_mode(SslMode::Require)
        .channel_binding(ChannelBinding::Disable);
    let (c, conn) = params.connect(pki.connector()).await.unwrap();
    tokio::spawn(conn);
    // 8 MiB each way: many TLS records, partial reads and writes on both sides.
    let value: Vec<u8> = (0..8 * 1024 * 1024u32)
        .map(|i| (i * 31 % 251) as u8)
        .collect();
    let row = c
        .query_one("SELECT $1::bytea, md5($1::bytea)", &[&value])
        .await
        .unwrap();
    assert_eq!(row.get::<_, Vec<u8>>(0), value);
    assert_eq!(row.get::<_, String>(1).len(), 32);
    // A pipeline of 200 statements in flight at once.
    let statement = c.prepare("SELECT $1::int * 2").await.unwrap();
    let queries = (0..200).map(|i| {
        let (c, statement) = (&c, &statement);
        async move {
            c.query_one(statement, &[&i])
                .await
                .unwrap()
                .get::<_, i32>(0)
        }
    });
    let answers = futures_util::future::join_all(queries).await;
    assert_eq!(answers, (0..200).map(|i| i * 2).collect::<Vec<_>>());
    assert!(server_side_is_tls(&c).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_picks_up_certificates_rotated_in_place_and_keeps_them_if_broken() {
    let old = Pki::new(&["127.0.0.1"]);
    let new = Pki::new(&["127.0.0.1"]);
    let pg = Cluster::start_tls(&old);
    // bulkhead's own certificate lives at fixed paths, as a mounted secret does.
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::copy(old.cert(), &cert).unwrap();
    std::fs::copy(old.key(), &key).unwrap();
    let mut cfg = config_with_client_tls(&pg, &old, ListenTls::Require);
    cfg.listen.tls_cert_file = cert.display().to_string();
    cfg.listen.tls_key_file = key.display().to_string();
    let proxy = Proxy::start(cfg.clone()).await;
    let trusting = |pki: &Pki| {
        let mut params: tokio_postgres::Config = proxy.params("postgres").parse().unwrap();
        params.ssl_mode(SslMode::Require);
        let connector = pki.connector();
        async move {
            params.connect(connector).await.map(|(c, conn)| {
                tokio::spawn(conn);
                c
            })
        }
    };
    assert!(trusting(&old).await.is_ok());
    assert!(
        trusting(&new).await.is_err(),
        "the new CA is not in use yet"
    );

    std::fs::copy(new.cert(), &cert).unwrap();
    std::fs::copy(new.key(), &key).unwrap();
    assert!(proxy.bulkhead.reload(cfg.clone()).is_empty());
    let c = trusting(&new)
        .await
        .expect("the rotated certificate is served");
    assert_eq!(first_value(&c, "SELECT 1").await, "1");
    assert!(trusting(&old).await.is_err(), "the old certificate is gone");

    // A broken file on reload: the loaded certificate stays.
    std::fs::write(&key, "not a key").unwrap();
    proxy.bulkhead.reload(cfg);
    assert!(trusting(&new).await.is_ok());
}

/// libpq 17's cancel API (PQcancelBlocking, used by psycopg 3.3's cancel) sends its
/// CancelRequest over TLS and reads to the end; OpenSSL 3 reports a close without TLS
/// close_notify as "unexpected eof", and the cancel call fails. psycopg's own suite failed
/// five cancel tests through bulkhead for this. The TLS session is now ended properly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_request_over_tls_ends_with_close_notify() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = Pki::new(&["localhost"]);
    let pg = Cluster::start_tls(&pki);
    let proxy = Proxy::start(config_with_client_tls(&pg, &pki, ListenTls::Prefer)).await;
    let mut tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    tcp.write_all(&raw::first_packet(80_877_103, b""))
        .await
        .unwrap();
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"S");
    let mut roots = rustls::RootCertStore::empty();
    {
        use rustls::pki_types::pem::PemObject;
        for c in rustls::pki_types::CertificateDer::pem_file_iter(pki.ca()).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
    }
    let client_config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client_config));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    // A key no session holds: bulkhead drops it, and closes.
    tls.write_all(&raw::first_packet(80_877_102, &[0, 0, 0, 1, 9, 9, 9, 9]))
        .await
        .unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(SECONDS_20, tls.read_to_end(&mut rest))
        .await
        .expect("closed");
    assert!(
        read.is_ok(),
        "the TLS session ends with close_notify: {read:?}"
    );
    assert!(rest.is_empty());
}

/// libpq reads into 8 KiB of free buffer; a TLS record carrying more leaves decrypted bytes
/// inside OpenSSL where a client waiting on the socket never looks (psycopg's
/// `test_adapt::test_random` hung through bulkhead about once in a few hundred large
/// results). PostgreSQL's records carry at most 8 KiB; bulkhead's toward clients must too.
/// A tap between client and bulkhead reads the TLS record headers bulkhead writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_records_toward_clients_carry_at_most_8_kib_as_postgresql_writes_them() {
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = Pki::new(&["127.0.0.1"]);
    let pg = Cluster::start_tls(&pki);
    let proxy = Proxy::start(config_with_client_tls(&pg, &pki, ListenTls::Require)).await;
    let tap = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tap_addr = tap.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::<u8>::new()));
    let record = seen.clone();
    let bulkhead = proxy.addr;
    tokio::spawn(async move {
        let (client, _) = tap.accept().await.unwrap();
        let server = tokio::net::TcpStream::connect(bulkhead).await.unwrap();
        let (mut client_read, mut client_write) = client.into_split();
        let (mut server_read, mut server_write) = server.into_split();
        tokio::spawn(async move { tokio::io::copy(&mut client_read, &mut server_write).await });
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = server_read.read(&mut buf).await.unwrap_or(0);
            if n == 0 || client_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
            record.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    let mut params: tokio_postgres::Config = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres",
        tap_addr.port()
    )
    .parse()
    .unwrap();
    params
        .ssl_mode(SslMode::Require)
        .channel_binding(ChannelBinding::Disable);
    let (c, conn) = params.connect(pki.connector()).await.unwrap();
    tokio::spawn(conn);
    let rows = c
        .query(
            "SELECT repeat(md5(g::text), 100) FROM generate_series(1, 400) g",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 400);
    let bytes = seen.lock().unwrap().clone();
    assert_eq!(bytes.first(), Some(&b'S'), "the answer to SSLRequest");
    let (mut at, mut records, mut largest) = (1, 0, 0);
    while at + 5 <= bytes.len() {
        let length = u16::from_be_bytes([bytes[at + 3], bytes[at + 4]]) as usize;
        largest = largest.max(length);
        records += 1;
        at += 5 + length;
    }
    assert!(records > 20, "{records} records carried 1.3 MB");
    // 8 KiB of data plus the record's own overhead (content type and AEAD tag).
    assert!(
        largest <= 8192 + 64,
        "the largest record bulkhead wrote carried {largest} bytes"
    );
}

/// SCRAM channel binding (tls-server-end-point) is a hash of the certificate the client saw.
/// With the server's own certificate and key on bulkhead's listener, the client's binding is
/// the one the server computes, so SCRAM-SHA-256-PLUS passes through: libpq with
/// channel_binding=require logs in (node-postgres' `sasl-scram-tests.js` needs this), and so
/// does tokio-postgres, which binds whenever it is offered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_binding_passes_through_when_the_listener_presents_the_servers_certificate() {
    let pki = Pki::new(&["127.0.0.1"]);
    let pg = Cluster::start_tls(&pki);
    pg.psql(
        "SET password_encryption = 'scram-sha-256'; \
         CREATE ROLE scram_user LOGIN PASSWORD 'scram-secret'",
    );
    let proxy = Proxy::start(config_with_client_tls(&pg, &pki, ListenTls::Prefer)).await;
    for settings in [
        "sslmode=require channel_binding=require",
        "sslmode=require",
        "sslmode=disable",
    ] {
        scram_user_logs_in(&proxy, settings);
    }
    // A wrong password still fails: the binding is checked, not waved through.
    let out = psql(
        &proxy,
        "sslmode=require channel_binding=require",
        "scram_user",
        "wrong",
        "SELECT 1",
    );
    assert!(!out.status.success());
    assert!(
        text(&out).contains("password authentication failed"),
        "{}",
        text(&out)
    );
    let mut params: tokio_postgres::Config = proxy.params("scram_user").parse().unwrap();
    params
        .password("scram-secret")
        .ssl_mode(SslMode::Require)
        .channel_binding(ChannelBinding::Require);
    let (c, conn) = params.connect(pki.connector()).await.unwrap();
    tokio::spawn(conn);
    assert_eq!(first_value(&c, "SELECT current_user").await, "scram_user");
    assert!(server_side_is_tls(&c).await);
}
