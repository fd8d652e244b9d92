//! Issue 5: the database never sees more than it can take, and nothing waits unbounded.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use tokio_postgres::NoTls;

use bulkhead::Config;

use crate::support::{Cluster, Proxy, config_for, connect, eventually, sqlstate};

const SECONDS_20: Duration = Duration::from_secs(20);

fn limited(pg: &Cluster) -> Config {
    let mut config = config_for(pg);
    config.limits.max_inflight_writes = 4;
    config.limits.queue_timeout = Duration::from_millis(100);
    // The stalled commits must not open the circuit: this is about shedding.
    config.circuit.failure_threshold = 1000;
    config.timeouts.write = Duration::from_secs(3);
    config.timeouts.cancel_grace = Duration::from_millis(500);
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_commits_hold_at_most_max_inflight_writes_and_the_rest_are_shed_fast() {
    let pg = Cluster::start();
    pg.psql("CREATE TABLE shed (x int)");
    let proxy = Proxy::start(limited(&pg)).await;
    pg.psql("ALTER SYSTEM SET synchronous_standby_names = 'missing'");
    pg.psql("SELECT pg_reload_conf()");

    // Watch pg_stat_activity the whole time.
    let admin = pg.connect().await;
    let most_active = Arc::new(AtomicI64::new(0));
    let watching = Arc::new(AtomicBool::new(true));
    let watcher = {
        let (most, watching) = (most_active.clone(), watching.clone());
        tokio::spawn(async move {
            while watching.load(Ordering::Relaxed) {
                let n: i64 = admin
                    .query_one("SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'INSERT INTO shed%' AND state = 'active'", &[])
                    .await
                    .unwrap()
                    .get(0);
                most.fetch_max(n, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    // Readers keep going meanwhile.
    let mut readers = Vec::new();
    for _ in 0..4 {
        let c = proxy.connect().await;
        let watching = watching.clone();
        readers.push(tokio::spawn(async move {
            let mut ok = 0;
            while watching.load(Ordering::Relaxed) {
                c.simple_query("SELECT count(*) FROM shed").await.unwrap();
                ok += 1;
            }
            ok
        }));
    }
    let mut sessions = Vec::new();
    for _ in 0..60 {
        sessions.push(connect(&proxy.params("postgres")).await);
    }
    let writes = sessions.iter().enumerate().map(|(i, c)| async move {
        let started = Instant::now();
        let result = c
            .simple_query(&format!("INSERT INTO shed VALUES ({i})"))
            .await;
        (result.err().map(|e| sqlstate(&e)), started.elapsed())
    });
    let results = futures_util::future::join_all(writes).await;
    watching.store(false, Ordering::Relaxed);
    watcher.await.unwrap();
    let fast_sheds = results
        .iter()
        .filter(|(code, took)| {
            code.as_deref() == Some("53400") && *took < Duration::from_millis(100 + 300)
        })
        .count();
    assert!(
        fast_sheds >= 50,
        "only {fast_sheds} of 60 were shed within queue_timeout + 300 ms: {results:?}"
    );
    assert!(
        most_active.load(Ordering::Relaxed) <= 4,
        "{} INSERTs were active at once",
        most_active.load(Ordering::Relaxed)
    );
    for r in readers {
        assert!(r.await.unwrap() > 0, "a reader made no progress");
    }
    assert!(proxy.metric("bulkhead_shed_total{reason=\"max_inflight_writes\"}") >= 50.0);

    pg.psql("ALTER SYSTEM RESET synchronous_standby_names");
    pg.psql("SELECT pg_reload_conf()");
    let c = proxy.connect().await;
    c.simple_query("INSERT INTO shed VALUES (1000)")
        .await
        .unwrap();
    assert_eq!(pg.psql("SELECT count(*) FROM shed WHERE x = 1000"), "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_over_max_clients_gets_53300_at_once_and_a_freed_place_is_reused() {
    let pg = Cluster::start();
    let mut config = config_for(&pg);
    config.limits.max_clients = 5;
    let proxy = Proxy::start(config).await;
    let mut clients = Vec::new();
    for _ in 0..5 {
        clients.push(proxy.connect().await);
    }
    let started = Instant::now();
    let err = tokio_postgres::connect(&proxy.params("postgres"), NoTls)
        .await
        .err()
        .expect("a sixth client got in");
    assert_eq!(sqlstate(&err), "53300");
    assert!(started.elapsed() < Duration::from_secs(1));
    drop(clients.pop());
    let sixth = eventually("a freed place to be reused", SECONDS_20, || async {
        tokio_postgres::connect(&proxy.params("postgres"), NoTls)
            .await
            .ok()
    })
    .await;
    drop(sixth);
    for c in &clients {
        c.simple_query("SELECT 1").await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_shed_inside_a_block_fails_the_block_until_rollback_and_the_server_is_idle() {
    let pg = Cluster::start();
    pg.psql("CREATE TABLE blk (x int)");
    let mut config = limited(&pg);
    config.limits.max_inflight_writes = 1;
    let proxy = Proxy::start(config).await;
    // Another session's write transaction holds the one write slot while it stays open.
    let holder = proxy.connect().await;
    holder
        .batch_execute("BEGIN; INSERT INTO blk VALUES (1)")
        .await
        .unwrap();

    let c = proxy.connect().await;
    let pid = c.simple_query("SELECT pg_backend_pid()").await.unwrap();
    let pid = match &pid[1] {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).unwrap().to_string(),
        _ => panic!(),
    };
    c.batch_execute("BEGIN").await.unwrap();
    c.batch_execute("SELECT 1").await.unwrap();
    let started = Instant::now();
    let err = c
        .batch_execute("INSERT INTO blk VALUES (2)")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), "53400");
    assert!(started.elapsed() < Duration::from_millis(100 + 300));
    assert_eq!(
        sqlstate(&c.batch_execute("SELECT 2").await.unwrap_err()),
        "25P02"
    );
    c.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(
        pg.psql(&format!(
            "SELECT state FROM pg_stat_activity WHERE pid = {pid}"
        )),
        "idle"
    );
    holder.batch_execute("COMMIT").await.unwrap();
    // The slot is free again once the holder's transaction ended.
    c.batch_execute("INSERT INTO blk VALUES (3)").await.unwrap();
    assert_eq!(
        pg.psql("SELECT string_agg(x::text, ',' ORDER BY x) FROM blk"),
        "1,3"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adaptive_limit_falls_as_latency_rises_and_rises_when_it_recovers() {
    let pg = Cluster::start();
    let mut config = config_for(&pg);
    config.limits.adaptive = true;
    config.limits.max_inflight = 32;
    let proxy = Proxy::start(config).await;
    let limit = |p: &Proxy| p.metric("bulkhead_concurrency_limit{class=\"read\"}");
    let load = |sql: &'static str, stop: Arc<AtomicBool>| {
        let params = proxy.params("postgres");
        tokio::spawn(async move {
            let c = connect(&params).await;
            while !stop.load(Ordering::Relaxed) {
                if let Err(e) = c.simple_query(sql).await {
                    assert!(!c.is_closed(), "a loader's session was closed: {e:?}");
                }
            }
        })
    };
    // Fast statements first: the limit stays at its maximum.
    let stop = Arc::new(AtomicBool::new(false));
    let fast: Vec<_> = (0..3).map(|_| load("SELECT 1", stop.clone())).collect();
    eventually("a baseline at the maximum", SECONDS_20, || async {
        (limit(&proxy) == 32.0).then_some(())
    })
    .await;
    // The controller learns the fast baseline from a few windows of samples.
    eventually("a baseline of fast statements", SECONDS_20, || async {
        (proxy.metric("bulkhead_statements_total{class=\"read\",outcome=\"ok\"}") >= 600.0)
            .then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for t in fast {
        t.await.unwrap();
    }
    // Latency rises: the limit falls.
    let stop = Arc::new(AtomicBool::new(false));
    let slow: Vec<_> = (0..3)
        .map(|_| load("SELECT pg_sleep(0.05)", stop.clone()))
        .collect();
    let low = eventually("the limit to fall", SECONDS_20, || async {
        let l = limit(&proxy);
        (l <= 16.0).then_some(l)
    })
    .await;
    assert!(low >= 1.0);
    stop.store(true, Ordering::Relaxed);
    for t in slow {
        t.await.unwrap();
    }
    // Latency recovers: the limit rises again.
    let stop = Arc::new(AtomicBool::new(false));
    let fast: Vec<_> = (0..3).map(|_| load("SELECT 1", stop.clone())).collect();
    eventually("the limit to rise again", SECONDS_20, || async {
        (limit(&proxy) > low + 8.0).then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for t in fast {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloaded_limits_apply_without_dropping_sessions() {
    let pg = Cluster::start();
    let mut config = config_for(&pg);
    config.limits.max_clients = 10;
    let proxy = Proxy::start(config.clone()).await;
    let kept: Vec<_> = futures_util::future::join_all((0..3).map(|_| proxy.connect())).await;
    config.limits.max_clients = 3;
    config.limits.max_inflight_writes = 2;
    assert!(proxy.bulkhead.reload(config).is_empty());
    let err = tokio_postgres::connect(&proxy.params("postgres"), NoTls)
        .await
        .err()
        .expect("over the new limit");
    assert_eq!(sqlstate(&err), "53300");
    assert_eq!(
        proxy.metric("bulkhead_concurrency_limit{class=\"write\"}"),
        2.0
    );
    for c in &kept {
        c.simple_query("SELECT 1").await.unwrap();
    }
}
