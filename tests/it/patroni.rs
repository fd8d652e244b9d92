//! Issue 22: topology from Patroni, against a real Patroni cluster with a real etcd.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bulkhead::Config;
use bulkhead::config::Discovery;

use crate::support::patroni::PatroniCluster;
use crate::support::*;

const SECONDS_30: Duration = Duration::from_secs(30);

fn following(cluster: &PatroniCluster) -> Config {
    let mut config = Config::default();
    config.database.hosts = cluster.nodes.iter().map(|n| n.addr()).collect();
    config.database.discovery = Discovery::Patroni;
    config.database.patroni = cluster.nodes.iter().map(|n| n.api()).collect();
    config.database.patroni_interval = Duration::from_millis(100);
    config.database.connect_timeout = Duration::from_secs(1);
    config.circuit.hold_new_connections = Duration::from_secs(10);
    config
}

fn primary_of(proxy: &Proxy) -> Option<String> {
    proxy
        .bulkhead
        .topology()
        .watch_primary()
        .borrow()
        .as_ref()
        .map(|p| p.address.clone())
}

/// Writers through bulkhead, each a connection per write (the shape that finds the primary
/// anew every time): every row records the server's port and when it was written.
fn start_writers(
    proxy: &Proxy,
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..2)
        .map(|_| {
            let params = proxy.params("postgres");
            let stop = stop.clone();
            let ok = ok.clone();
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((c, conn)) =
                        tokio_postgres::connect(&params, tokio_postgres::NoTls).await
                    {
                        tokio::spawn(conn);
                        if c.batch_execute(
                            "INSERT INTO written SELECT inet_server_port(), clock_timestamp()",
                        )
                        .await
                        .is_ok()
                        {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        })
        .collect()
}

/// A switchover: writes move to the new leader within a second of Patroni reporting it, and
/// none lands on the old leader after that; then Patroni's APIs stop answering (their
/// processes frozen) and bulkhead goes on with its own probes, saying so on /health, until
/// Patroni answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulkhead_follows_a_patroni_switchover_and_falls_back_to_its_probes_when_patroni_is_gone() {
    let cluster = tokio::task::spawn_blocking(|| PatroniCluster::start(2))
        .await
        .unwrap();
    let cluster = Arc::new(cluster);
    cluster.psql("pg0", "CREATE TABLE written (port int, at timestamptz)");
    let proxy = Proxy::start(following(&cluster)).await;
    eventually("Patroni's leader to be the primary", SECONDS_30, || async {
        (primary_of(&proxy) == Some(cluster.node("pg0").addr())).then_some(())
    })
    .await;
    let h = proxy.health_json().await;
    assert_eq!(h["discovery"]["source"], "patroni", "{h}");
    assert_eq!(h["discovery"]["following"], true, "{h}");
    assert_eq!(h["discovery"]["leader"], cluster.node("pg0").addr(), "{h}");
    assert_eq!(
        h["discovery"]["members"].as_array().unwrap().len(),
        2,
        "{h}"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let writers = start_writers(&proxy, stop.clone(), ok.clone());
    eventually("writes", SECONDS_30, || async {
        (ok.load(Ordering::Relaxed) > 10).then_some(())
    })
    .await;

    // The switchover; the test watches /cluster itself for the moment Patroni reports it.
    let c2 = cluster.clone();
    let switching = tokio::task::spawn_blocking(move || c2.switchover("pg0", "pg1"));
    let c3 = cluster.clone();
    let reported = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if c3.leader().as_deref() == Some("pg1") {
                return Instant::now();
            }
            assert!(
                Instant::now() < deadline,
                "Patroni never reported pg1 as leader"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await
    .unwrap();
    let new = cluster.node("pg1").addr();
    eventually("bulkhead to follow the switchover", SECONDS_30, || async {
        (primary_of(&proxy) == Some(new.clone())).then_some(())
    })
    .await;
    let followed = reported.elapsed();
    eprintln!("bulkhead followed the switchover {followed:?} after Patroni reported it");
    switching.await.unwrap();
    assert!(
        followed <= Duration::from_secs(1) + Duration::from_secs(1),
        "followed {followed:?} after Patroni reported the switchover"
    );
    // Writes go on, on the new leader.
    let before = ok.load(Ordering::Relaxed);
    eventually("writes on the new leader", SECONDS_30, || async {
        (ok.load(Ordering::Relaxed) > before + 10).then_some(())
    })
    .await;

    // Patroni's APIs stop answering: bulkhead's own probes decide, and /health says so.
    let frozen = Frozen::stop(cluster.nodes.iter().map(|n| n.patroni_pid()).collect());
    eventually(
        "bulkhead to fall back to its probes",
        SECONDS_30,
        || async {
            let h = proxy.health_json().await;
            (h["discovery"]["following"] == false).then_some(h)
        },
    )
    .await;
    let h = proxy.health_json().await;
    assert_eq!(
        h["discovery"]["decided_by"], "probe (Patroni does not answer)",
        "{h}"
    );
    assert!(
        h["discovery"]["error"]
            .as_str()
            .unwrap()
            .contains("no answer"),
        "{h}"
    );
    assert_eq!(h["primary"], new, "{h}");
    assert_eq!(proxy.metric("bulkhead_patroni_following "), 0.0);
    let before = ok.load(Ordering::Relaxed);
    eventually("writes while Patroni is gone", SECONDS_30, || async {
        (ok.load(Ordering::Relaxed) > before + 10).then_some(())
    })
    .await;
    drop(frozen);
    eventually("bulkhead to follow Patroni again", SECONDS_30, || async {
        let h = proxy.health_json().await;
        (h["discovery"]["following"] == true).then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }

    // No write reached the old leader after Patroni reported the switchover. Rows carry the
    // port they were written on and clock_timestamp(), from this machine's clock; the new
    // leader has every row the old one took before it was demoted (a switchover waits for
    // the replica to catch up), and the old one may still be restarting as a replica.
    let since_report = reported.elapsed().as_secs_f64();
    let late = cluster.psql(
        "pg1",
        &format!(
            "SELECT count(*) FROM written WHERE port = {} \
             AND at > clock_timestamp() - interval '{since_report} seconds'",
            cluster.node("pg0").pg_port
        ),
    );
    assert_eq!(late, "0", "writes on the old leader after the switchover");
    let on_new = cluster.psql(
        "pg1",
        &format!(
            "SELECT count(*) FROM written WHERE port = {}",
            cluster.node("pg1").pg_port
        ),
    );
    assert_ne!(on_new, "0");
}

/// The old leader's Patroni freezes while its PostgreSQL goes on as a primary: Patroni's
/// leader key expires and the replica is promoted. From the moment Patroni names the new
/// leader, the old primary, which still says it is one, gets no write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_patroni_has_replaced_gets_no_write_even_while_it_still_claims_to_be_primary() {
    let cluster = tokio::task::spawn_blocking(|| PatroniCluster::start(2))
        .await
        .unwrap();
    let cluster = Arc::new(cluster);
    cluster.psql("pg0", "CREATE TABLE written (port int, at timestamptz)");
    let proxy = Proxy::start(following(&cluster)).await;
    eventually("Patroni's leader to be the primary", SECONDS_30, || async {
        (primary_of(&proxy) == Some(cluster.node("pg0").addr())).then_some(())
    })
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let writers = start_writers(&proxy, stop.clone(), ok.clone());

    let frozen = Frozen::stop(vec![cluster.node("pg0").patroni_pid()]);
    // When Patroni (pg1's API: pg0's is frozen) stops naming pg0 the leader (its leader key
    // expired), and when it names pg1.
    let c2 = cluster.clone();
    let (demoted, reported) = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut demoted = None;
        loop {
            let leader = c2.leader_from("pg1").unwrap_or_else(|| Some("pg0".into()));
            if leader.as_deref() != Some("pg0") {
                demoted.get_or_insert_with(Instant::now);
            }
            if leader.as_deref() == Some("pg1") {
                return (demoted.unwrap(), Instant::now());
            }
            assert!(Instant::now() < deadline, "Patroni never promoted pg1");
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await
    .unwrap();
    let new = cluster.node("pg1").addr();
    eventually("bulkhead to follow the failover", SECONDS_30, || async {
        (primary_of(&proxy) == Some(new.clone())).then_some(())
    })
    .await;
    let followed = reported.elapsed();
    eprintln!("bulkhead followed the new leader {followed:?} after Patroni named it");
    // The old primary is still one: its Patroni cannot demote it.
    assert_eq!(cluster.psql("pg0", "SELECT pg_is_in_recovery()"), "f");
    let before = ok.load(Ordering::Relaxed);
    eventually("writes on the new leader", SECONDS_30, || async {
        (ok.load(Ordering::Relaxed) > before + 10).then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    // Not later than half a second after Patroni stopped naming it the leader (bulkhead
    // reads /cluster every 100 ms here). bulkhead's own probes alone would keep writing to
    // the old primary until they found the new one writable, after its promotion.
    let since_report = demoted.elapsed().as_secs_f64() - 0.5;
    let late = cluster.psql(
        "pg0",
        &format!(
            "SELECT count(*) FROM written WHERE port = {} \
             AND at > clock_timestamp() - interval '{since_report} seconds'",
            cluster.node("pg0").pg_port
        ),
    );
    assert_eq!(
        late, "0",
        "writes on the replaced primary after Patroni named the new leader"
    );
    assert!(
        followed <= Duration::from_secs(2) + Duration::from_secs(1),
        "followed {followed:?} after Patroni reported the new leader"
    );
    drop(frozen);
}
