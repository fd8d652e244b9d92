//! Issue 23: GET /sessions shows what each client is doing right now — who, from where, on
//! which host, in which transaction state, the class and age of its statement in flight, and
//! whether it waits for a slot — without statement text unless switched on.

use std::time::Duration;

use serde_json::Value;

use crate::support::{Cluster, Proxy, config_for, connect, eventually};

const SECONDS_20: Duration = Duration::from_secs(20);

async fn sessions(proxy: &Proxy) -> Value {
    let r = proxy.get("/sessions").await;
    assert_eq!(r.status, 200, "{}", r.body);
    serde_json::from_str(&r.body).expect("/sessions is JSON")
}

/// The entry whose application_name is `name`, if it is listed.
fn entry(doc: &Value, name: &str) -> Option<Value> {
    doc["sessions"]
        .as_array()?
        .iter()
        .find(|e| e["application_name"] == name)
        .cloned()
}

fn params(proxy: &Proxy, application: &str) -> String {
    format!(
        "{} application_name={application}",
        proxy.params("postgres")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_shows_a_stuck_write_its_client_and_age_and_no_statement_text_by_default() {
    let pg = Cluster::start();
    pg.psql("CREATE TABLE held (id int)");
    let mut config = config_for(&pg);
    config.timeouts.write = Duration::from_secs(60); // stuck for as long as the test looks
    let proxy = Proxy::start(config).await;

    let idle = connect(&params(&proxy, "idle-app")).await;
    let in_tx = connect(&params(&proxy, "tx-app")).await;
    in_tx.batch_execute("BEGIN; SELECT 1").await.unwrap();

    // A write stuck behind a lock held directly on the server.
    let mut locker = pg.connect().await;
    let lock = locker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE held").await.unwrap();
    let writer = connect(&params(&proxy, "checkout")).await;
    let stuck = tokio::spawn(async move {
        writer
            .batch_execute("BEGIN; INSERT INTO held VALUES (1)")
            .await
            .map(|()| writer)
    });

    let doc = eventually("the stuck write to be a second old", SECONDS_20, || async {
        let doc = sessions(&proxy).await;
        let e = entry(&doc, "checkout")?;
        (e["statement"]["seconds"].as_f64()? >= 1.0).then_some(doc)
    })
    .await;
    let e = entry(&doc, "checkout").unwrap();
    assert_eq!(
        doc["sessions"][0]["application_name"], "checkout",
        "the longest-running statement first: {doc}"
    );
    assert_eq!(e["state"], "active", "{e}");
    assert_eq!(e["statement"]["class"], "write", "{e}");
    assert_eq!(e["user"], "postgres");
    assert_eq!(e["database"], "postgres");
    assert_eq!(e["host"], pg.addr());
    assert_eq!(e["listener"], "primary");
    assert!(
        e["client"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{e}"
    );
    assert!(e["waiting"].is_null(), "{e}");
    assert!(
        e.get("last_statement").is_none(),
        "no statement text by default: {e}"
    );
    assert_eq!(doc["show_statements"], false);
    let t = entry(&doc, "tx-app").unwrap();
    assert_eq!(t["state"], "idle in transaction", "{t}");
    assert_eq!(t["transaction"], "in transaction");
    assert!(t["statement"].is_null(), "{t}");
    let i = entry(&doc, "idle-app").unwrap();
    assert_eq!(i["state"], "idle", "{i}");
    assert_eq!(i["transaction"], "idle");
    assert!(!doc.to_string().contains("INSERT"), "{doc}");

    // The lock goes: the write finishes, and the session shows it is in its transaction.
    lock.rollback().await.unwrap();
    let writer = stuck
        .await
        .unwrap()
        .expect("the write ran once the lock went");
    eventually(
        "the writer to be idle in its transaction",
        SECONDS_20,
        || async {
            let e = entry(&sessions(&proxy).await, "checkout")?;
            (e["state"] == "idle in transaction" && e["statement"].is_null()).then_some(())
        },
    )
    .await;

    // A client that leaves is gone from the list.
    drop(writer);
    drop(idle);
    eventually(
        "the clients that left to be unlisted",
        SECONDS_20,
        || async {
            let doc = sessions(&proxy).await;
            (entry(&doc, "checkout").is_none() && entry(&doc, "idle-app").is_none()).then_some(())
        },
    )
    .await;
    assert!(entry(&sessions(&proxy).await, "tx-app").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_show_statements_a_waiting_write_shows_its_slot_wait_and_its_text_cut_short() {
    let pg = Cluster::start();
    pg.psql("CREATE TABLE waits (note text)");
    let mut config = config_for(&pg);
    config.health.show_statements = true;
    config.limits.max_inflight_writes = 1;
    config.limits.queue_timeout = Duration::from_secs(30);
    let proxy = Proxy::start(config).await;

    // The only write slot, held until this transaction ends.
    let holder = connect(&params(&proxy, "holder")).await;
    holder
        .batch_execute("BEGIN; INSERT INTO waits VALUES ('first')")
        .await
        .unwrap();
    let long = format!("INSERT INTO waits VALUES ('{}')", "x".repeat(600));
    let waiter = connect(&params(&proxy, "waiter")).await;
    let sql = long.clone();
    // The client is handed back, so its session stays for the test to look at.
    let waiting = tokio::spawn(async move { waiter.batch_execute(&sql).await.map(|()| waiter) });

    let e = eventually(
        "the second write to wait for a slot",
        SECONDS_20,
        || async {
            let e = entry(&sessions(&proxy).await, "waiter")?;
            (e["state"] == "waiting for a slot").then_some(e)
        },
    )
    .await;
    assert_eq!(e["waiting"]["slot"], "write", "{e}");
    assert!(e["waiting"]["seconds"].as_f64().unwrap() >= 0.0);
    let text = e["last_statement"].as_str().unwrap();
    assert_eq!(text.len(), 256, "cut to 256 bytes: {text}");
    assert!(long.starts_with(text));
    let h = entry(&sessions(&proxy).await, "holder").unwrap();
    assert_eq!(
        h["last_statement"],
        "BEGIN; INSERT INTO waits VALUES ('first')"
    );

    holder.batch_execute("COMMIT").await.unwrap();
    let _waiter = waiting.await.unwrap().expect("the write got the slot");
    let e = eventually("the wait to be over", SECONDS_20, || async {
        let e = entry(&sessions(&proxy).await, "waiter")?;
        (e["state"] == "idle").then_some(e)
    })
    .await;
    assert!(e["waiting"].is_null(), "{e}");
    assert_eq!(
        pg.psql("SELECT count(*) FROM waits").trim(),
        "2",
        "both writes landed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_switched_off_answers_404_and_health_still_answers() {
    let pg = Cluster::start();
    let mut config = config_for(&pg);
    config.health.sessions = false;
    let proxy = Proxy::start(config).await;
    let _client = proxy.connect().await;
    assert_eq!(proxy.get("/sessions").await.status, 404);
    assert_eq!(proxy.get("/health").await.status, 200);
}
