//! Issue 20: bulkhead authenticating clients itself and pooling server connections (session
//! mode). Real servers, real clients: tokio-postgres, psql with libpq's defaults, pgbench.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use tokio::time::Instant;
use tokio_postgres::NoTls;

use bulkhead::Config;
use bulkhead::config::{ListenTls, PoolMode, ServerTls};

use crate::support::tls::Pki;
use crate::support::{Cluster, Proxy, config_for, first_value, sqlstate};

/// A cluster with scram_user (SCRAM, password "scram-secret") and md5_user (md5, "md5-secret"),
/// and a users file holding what the server keeps for each: the SCRAM verifier and the md5
/// hash, no plaintext.
struct Setup {
    pg: Cluster,
    _dir: tempfile::TempDir,
    users_file: PathBuf,
}

fn setup_with(pg: Cluster) -> Setup {
    pg.psql_local(
        "SET password_encryption = 'scram-sha-256'; CREATE ROLE scram_user LOGIN PASSWORD 'scram-secret'; \
         SET password_encryption = 'md5'; CREATE ROLE md5_user LOGIN PASSWORD 'md5-secret'; \
         GRANT pg_read_all_stats TO scram_user",
    );
    let secrets = pg.psql_local(
        "SELECT string_agg(format('\"%s\" \"%s\"', rolname, rolpassword), E'\\n') \
         FROM pg_authid WHERE rolname IN ('scram_user', 'md5_user')",
    );
    let dir = tempfile::tempdir().unwrap();
    let users_file = dir.path().join("users.txt");
    std::fs::write(
        &users_file,
        format!("; what pg_authid keeps\n{secrets}\n\"plain_user\" \"plain-secret\"\n"),
    )
    .unwrap();
    Setup {
        pg,
        _dir: dir,
        users_file,
    }
}

fn setup() -> Setup {
    setup_with(Cluster::start())
}

/// Session pooling in front of the setup's cluster with its users file.
fn pooled(s: &Setup, size: u32) -> Config {
    let mut config = config_for(&s.pg);
    config.pool.mode = PoolMode::Session;
    config.pool.size = size;
    config.auth.file = s.users_file.display().to_string();
    config.probe.interval = Duration::from_millis(200);
    config
}

fn params(proxy: &Proxy, user: &str, password: &str) -> String {
    format!(
        "host=127.0.0.1 port={} user={user} password={password} dbname=postgres",
        proxy.addr.port()
    )
}

async fn connect(proxy: &Proxy, user: &str, password: &str) -> tokio_postgres::Client {
    crate::support::connect(&params(proxy, user, password)).await
}

fn metric(proxy: &Proxy, line_start: &str) -> f64 {
    let text = proxy.bulkhead.metrics().render();
    if std::env::var("SHOW_METRICS").is_ok() {
        eprintln!("{text}");
    }
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_log_in_to_bulkhead_and_reuse_one_server_backend_logged_in_with_their_scram_key() {
    let s = setup();
    let proxy = Proxy::start(pooled(&s, 2)).await;
    let mut pids = Vec::new();
    for _ in 0..5 {
        let c = connect(&proxy, "scram_user", "scram-secret").await;
        assert_eq!(
            first_value(&c, "SELECT current_user::text").await,
            "scram_user"
        );
        pids.push(first_value(&c, "SELECT pg_backend_pid()::text").await);
        drop(c);
        // The connection goes back once the session has ended: wait for it to be idle.
        crate::support::eventually("the connection back in the pool", Duration::from_secs(5), || async {
            (metric(&proxy, "bulkhead_pool_server_connections{user=\"scram_user\",database=\"postgres\",state=\"idle\"}") == 1.0)
                .then_some(())
        })
        .await;
    }
    pids.dedup();
    assert_eq!(pids.len(), 1, "one backend served every client: {pids:?}");
    // One login to the server, made with the key the first client's proof revealed (the users
    // file has only the verifier): the server saw a correct SCRAM proof.
    assert_eq!(
        metric(
            &proxy,
            "bulkhead_pool_server_logins_total{user=\"scram_user\",database=\"postgres\",result=\"ok\"}"
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_and_an_unknown_user_get_the_same_28p01() {
    let s = setup();
    let proxy = Proxy::start(pooled(&s, 2)).await;
    let mut messages = Vec::new();
    for (user, password) in [
        ("scram_user", "wrong"),
        ("nobody", "whatever"),
        ("md5_user", "wrong"),
        ("plain_user", "wrong"),
    ] {
        let e = tokio_postgres::connect(&params(&proxy, user, password), NoTls)
            .await
            .err()
            .unwrap_or_else(|| panic!("{user} with a wrong password got in"));
        assert_eq!(sqlstate(&e), "28P01", "{user}: {e}");
        let message = e.as_db_error().unwrap().message().to_string();
        messages.push(message.replace(user, "USER"));
    }
    messages.dedup();
    assert_eq!(
        messages,
        ["password authentication failed for user \"USER\""]
    );
    // No server connection was opened for any of them.
    assert_eq!(metric(&proxy, "bulkhead_pool_server_logins_total"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn md5_and_plain_secrets_log_in_and_psql_uses_them() {
    let s = setup();
    s.pg.psql_local("CREATE ROLE plain_user LOGIN PASSWORD 'plain-secret'");
    let proxy = Proxy::start(pooled(&s, 2)).await;
    // md5: bulkhead challenges the client with md5 and logs in to the server with the hash.
    let c = connect(&proxy, "md5_user", "md5-secret").await;
    assert_eq!(
        first_value(&c, "SELECT current_user::text").await,
        "md5_user"
    );
    // A plain secret: SCRAM with the client; toward this server (trust) no password is asked.
    let out = Command::new("psql")
        .arg(format!(
            "host=127.0.0.1 port={} user=plain_user dbname=postgres",
            proxy.addr.port()
        ))
        .args(["-X", "-A", "-t", "-c", "SELECT current_user"])
        .env("PGPASSWORD", "plain-secret")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "plain_user",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returned_connection_carries_nothing_of_its_last_client() {
    let s = setup();
    let proxy = Proxy::start(pooled(&s, 1)).await;
    let url = |app: &str| {
        format!(
            "{} application_name={app} options='-c search_path=elsewhere,public'",
            params(&proxy, "scram_user", "scram-secret")
        )
    };
    let a = crate::support::connect(&url("first")).await;
    let pid = first_value(&a, "SELECT pg_backend_pid()::text").await;
    assert_eq!(
        first_value(&a, "SHOW search_path").await,
        "elsewhere,public"
    );
    a.batch_execute(
        "SET work_mem = '1234kB'; CREATE TEMP TABLE mine (x int); PREPARE p AS SELECT 1; \
         SELECT pg_advisory_lock(42); LISTEN somewhere",
    )
    .await
    .unwrap();
    drop(a);
    // The next client, with other settings, on the same backend (the pool has one).
    let b = crate::support::connect(&format!(
        "{} application_name=second",
        params(&proxy, "scram_user", "scram-secret")
    ))
    .await;
    assert_eq!(first_value(&b, "SELECT pg_backend_pid()::text").await, pid);
    assert_eq!(first_value(&b, "SHOW application_name").await, "second");
    assert_eq!(
        first_value(&b, "SHOW search_path").await,
        "\"$user\", public"
    );
    assert_eq!(first_value(&b, "SHOW work_mem").await, "4MB");
    assert_eq!(
        first_value(&b, "SELECT count(*)::text FROM pg_prepared_statements").await,
        "0"
    );
    assert_eq!(
        first_value(&b, "SELECT to_regclass('pg_temp.mine') IS NULL").await,
        "t"
    );
    assert_eq!(
        first_value(&b, "SELECT count(*)::text FROM pg_listening_channels()").await,
        "0"
    );
    assert_eq!(
        s.pg.psql("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"),
        "0"
    );
    drop(b);
    // And a client with no settings at all gets the server's defaults.
    let c = connect(&proxy, "scram_user", "scram-secret").await;
    assert_eq!(first_value(&c, "SELECT pg_backend_pid()::text").await, pid);
    assert_eq!(first_value(&c, "SHOW application_name").await, "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_clients_share_a_pool_of_ten_server_connections() {
    let s = setup();
    let mut config = pooled(&s, 10);
    config.limits.queue_timeout = Duration::from_secs(60);
    config.limits.max_clients = 1000;
    let proxy = std::sync::Arc::new(Proxy::start(config).await);
    let mut tasks = Vec::new();
    for i in 0..500 {
        let proxy = proxy.clone();
        tasks.push(tokio::spawn(async move {
            // md5: a SCRAM login costs the client 4096 HMAC rounds, and 500 of them in this
            // debug build would starve the test's runtime, bulkhead's probe included.
            let (c, conn) =
                tokio_postgres::connect(&params(&proxy, "md5_user", "md5-secret"), NoTls)
                    .await
                    .map_err(|e| format!("client {i}: {e:?}"))?;
            tokio::spawn(conn);
            let n: i32 = c
                .query_one("SELECT $1::int", &[&i])
                .await
                .map_err(|e| format!("client {i}: {e}"))?
                .get(0);
            assert_eq!(n, i);
            Ok::<_, String>(())
        }));
    }
    let mut failed = Vec::new();
    for t in tasks {
        if let Err(e) = t.await.unwrap() {
            failed.push(e);
        }
    }
    assert!(
        failed.is_empty(),
        "{} failed, e.g. {:?}",
        failed.len(),
        failed.first()
    );
    let logins = metric(
        &proxy,
        "bulkhead_pool_server_logins_total{user=\"md5_user\",database=\"postgres\",result=\"ok\"}",
    );
    assert!(
        (1.0..=10.0).contains(&logins),
        "{logins} server logins for 500 clients"
    );
    assert!(
        s.pg.psql("SELECT count(*) FROM pg_stat_activity WHERE usename = 'md5_user'")
            .parse::<u32>()
            .unwrap()
            <= 10
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_waits_longer_than_queue_timeout_for_the_pool_gets_53300() {
    let s = setup();
    let mut config = pooled(&s, 1);
    config.limits.queue_timeout = Duration::from_millis(300);
    let proxy = Proxy::start(config).await;
    let holder = connect(&proxy, "scram_user", "scram-secret").await;
    let started = Instant::now();
    let e = tokio_postgres::connect(&params(&proxy, "scram_user", "scram-secret"), NoTls)
        .await
        .err()
        .expect("a second client got a connection from a pool of one");
    assert_eq!(sqlstate(&e), "53300", "{e}");
    assert!(started.elapsed() < Duration::from_millis(300) + Duration::from_secs(1));
    // The holder is unaffected; once it leaves, the next client gets its connection.
    assert_eq!(first_value(&holder, "SELECT 1::text").await, "1");
    drop(holder);
    let c = crate::support::eventually("a connection again", Duration::from_secs(5), || async {
        tokio_postgres::connect(&params(&proxy, "scram_user", "scram-secret"), NoTls)
            .await
            .ok()
    })
    .await;
    tokio::spawn(c.1);
    assert_eq!(first_value(&c.0, "SELECT 2::text").await, "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_the_backend_the_client_holds() {
    let s = setup();
    let proxy = Proxy::start(pooled(&s, 2)).await;
    let c = connect(&proxy, "scram_user", "scram-secret").await;
    let token = c.cancel_token();
    let sleeper = tokio::spawn(async move { c.simple_query("SELECT pg_sleep(30)").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    token.cancel_query(NoTls).await.unwrap();
    let e = sleeper.await.unwrap().expect_err("the sleep was cancelled");
    assert_eq!(sqlstate(&e), "57014");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_auth_query_finds_secrets_on_the_server() {
    let s = setup();
    let mut config = pooled(&s, 2);
    config.auth.file = String::new();
    config.auth.user = "postgres".into();
    let proxy = Proxy::start(config).await;
    let c = connect(&proxy, "scram_user", "scram-secret").await;
    assert_eq!(
        first_value(&c, "SELECT current_user::text").await,
        "scram_user"
    );
    let e = tokio_postgres::connect(&params(&proxy, "scram_user", "wrong"), NoTls)
        .await
        .err()
        .unwrap();
    assert_eq!(sqlstate(&e), "28P01");
    let c = connect(&proxy, "md5_user", "md5-secret").await;
    assert_eq!(
        first_value(&c, "SELECT current_user::text").await,
        "md5_user"
    );
}

/// psql with libpq's defaults (sslmode=prefer, channel_binding=prefer) over TLS to bulkhead,
/// whose certificate is not the server's, and TLS to a server that takes scram_user only by
/// SCRAM over TLS: bulkhead offers SCRAM-SHA-256-PLUS bound to its own certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_with_libpq_defaults_logs_in_with_channel_binding_over_tls_on_both_sides() {
    let server_pki = Pki::new(&["127.0.0.1", "localhost"]);
    let s = setup_with(Cluster::start_tls(&server_pki));
    let listener_pki = Pki::new(&["127.0.0.1", "localhost"]);
    let mut config = pooled(&s, 2);
    config.database.tls = ServerTls::VerifyFull;
    config.database.ca_file = server_pki.ca().display().to_string();
    config.listen.tls = ListenTls::Prefer;
    config.listen.tls_cert_file = listener_pki.cert().display().to_string();
    config.listen.tls_key_file = listener_pki.key().display().to_string();
    let proxy = Proxy::start(config).await;
    for settings in [
        "",
        "channel_binding=require",
        "channel_binding=disable",
        "sslmode=disable",
    ] {
        let out = Command::new("psql")
            .arg(format!(
                "host=127.0.0.1 port={} user=scram_user dbname=postgres {settings}",
                proxy.addr.port()
            ))
            .args([
                "-X",
                "-A",
                "-t",
                "-c",
                "SELECT current_user || ' ' || ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            ])
            .env("PGPASSWORD", "scram-secret")
            .env_remove("PGSSLMODE")
            .env_remove("PGCHANNELBINDING")
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "scram_user true",
            "{settings:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // channel_binding=require without TLS to bulkhead cannot bind, and libpq refuses.
    let out = Command::new("psql")
        .arg(format!(
            "host=127.0.0.1 port={} user=scram_user dbname=postgres sslmode=disable channel_binding=require",
            proxy.addr.port()
        ))
        .args(["-X", "-A", "-t", "-c", "SELECT 1"])
        .env("PGPASSWORD", "scram-secret")
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failover_pooled_connections_to_the_old_primary_are_closed_and_new_ones_go_to_the_new()
 {
    let s = setup();
    s.pg.psql("CREATE TABLE moved (x int); GRANT ALL ON moved TO scram_user");
    let standby = Cluster::standby_of(&s.pg);
    let mut config = pooled(&s, 4);
    config.database.hosts = vec![s.pg.addr(), standby.addr()];
    config.pool.min_idle = 2;
    config.probe.timeout = Duration::from_millis(400);
    let proxy = Proxy::start(config).await;
    let c = connect(&proxy, "scram_user", "scram-secret").await;
    c.batch_execute("INSERT INTO moved VALUES (1)")
        .await
        .unwrap();
    drop(c);
    // min_idle keeps two open on the primary.
    let idle = "bulkhead_pool_server_connections{user=\"scram_user\",database=\"postgres\",state=\"idle\"}";
    crate::support::eventually("two idle connections", Duration::from_secs(10), || async {
        (metric(&proxy, idle) == 2.0).then_some(())
    })
    .await;
    let on_old = || {
        s.pg.psql("SELECT count(*) FROM pg_stat_activity WHERE usename = 'scram_user'")
            .parse::<u32>()
            .unwrap()
    };
    assert_eq!(on_old(), 2);
    standby.promote();
    // The old primary's pooled connections are closed; min_idle refills on the new one.
    crate::support::eventually(
        "the old primary's connections closed",
        Duration::from_secs(20),
        || async { (on_old() == 0).then_some(()) },
    )
    .await;
    let c = crate::support::eventually(
        "a session on the new primary",
        Duration::from_secs(20),
        || async {
            let (c, conn) =
                tokio_postgres::connect(&params(&proxy, "scram_user", "scram-secret"), NoTls)
                    .await
                    .ok()?;
            tokio::spawn(conn);
            Some(c)
        },
    )
    .await;
    c.batch_execute("INSERT INTO moved VALUES (2)")
        .await
        .unwrap();
    assert_eq!(standby.psql("SELECT count(*) FROM moved WHERE x = 2"), "1");
    assert_eq!(s.pg.psql("SELECT count(*) FROM moved WHERE x = 2"), "0");
    assert_eq!(on_old(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_changes_the_pool_size_live() {
    let s = setup();
    let mut config = pooled(&s, 1);
    config.limits.queue_timeout = Duration::from_millis(200);
    let proxy = Proxy::start(config.clone()).await;
    let _first = connect(&proxy, "scram_user", "scram-secret").await;
    let second =
        tokio_postgres::connect(&params(&proxy, "scram_user", "scram-secret"), NoTls).await;
    assert_eq!(sqlstate(&second.err().unwrap()), "53300");
    config.pool.size = 3;
    assert!(proxy.bulkhead.reload(config).is_empty());
    let _second =
        crate::support::eventually("room in the pool", Duration::from_secs(5), || async {
            let (c, conn) =
                tokio_postgres::connect(&params(&proxy, "scram_user", "scram-secret"), NoTls)
                    .await
                    .ok()?;
            tokio::spawn(conn);
            Some(c)
        })
        .await;
    let _third = connect(&proxy, "scram_user", "scram-secret").await;
    assert_eq!(
        proxy.health_json().await["pools"][0]["size"],
        serde_json::json!(3)
    );
}

/// A backend ended while its connection sat idle in the pool (pg_terminate_backend, as
/// node-postgres' own tests do) is not lent: the next client gets a live connection, not the
/// dead one's FATAL 57P01.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_pooled_connection_the_server_ended_is_not_lent_again() {
    let s = setup();
    let proxy = Proxy::start(pooled(&s, 2)).await;
    let c = connect(&proxy, "scram_user", "scram-secret").await;
    let pid = first_value(&c, "SELECT pg_backend_pid()::text").await;
    drop(c);
    let idle = "bulkhead_pool_server_connections{user=\"scram_user\",database=\"postgres\",state=\"idle\"}";
    crate::support::eventually(
        "the connection back in the pool",
        Duration::from_secs(5),
        || async { (metric(&proxy, idle) == 1.0).then_some(()) },
    )
    .await;
    assert_eq!(
        s.pg.psql_local(&format!("SELECT pg_terminate_backend({pid})")),
        "t"
    );
    crate::support::eventually("the backend gone", Duration::from_secs(5), || async {
        (s.pg.psql_local(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}"
        )) == "0")
            .then_some(())
    })
    .await;
    let c = connect(&proxy, "scram_user", "scram-secret").await;
    let second = first_value(&c, "SELECT pg_backend_pid()::text").await;
    assert_ne!(second, pid, "a new backend, not the ended one");
}
