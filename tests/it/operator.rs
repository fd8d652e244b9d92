//! Issue 23: the operator's commands, run as the real binary. `bulkhead status` reads a
//! running bulkhead's health port and shows what a person at a terminal needs; `bulkhead demo`
//! builds a primary, a standby and a bulkhead from nothing, plays an incident, and leaves
//! nothing behind.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::Command;

use crate::support::{Binary, Cluster, eventually, free_port};

const BIN: &str = env!("CARGO_BIN_EXE_bulkhead");

async fn status(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .arg("status")
        .args(args)
        .output()
        .await
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_hosts_circuits_and_the_longest_running_statement_first() {
    let pg = Cluster::start();
    pg.psql("CREATE TABLE held (id int)");
    let health = format!("127.0.0.1:{}", free_port());
    let bulkhead = Binary::start(
        &pg,
        &format!("[health]\naddress = \"{health}\"\n[timeouts]\nwrite = \"60s\"\n"),
    )
    .await;
    let mut locker = pg.connect().await;
    let lock = locker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE held").await.unwrap();
    let (writer, conn) = tokio_postgres::connect(
        &format!("{} application_name=checkout", bulkhead.params()),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let (_idle, conn) = tokio_postgres::connect(
        &format!("{} application_name=browsing", bulkhead.params()),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let stuck =
        tokio::spawn(async move { writer.batch_execute("INSERT INTO held VALUES (1)").await });

    // Read from the config file's [health] address, as an operator on the host would.
    let config = bulkhead.config_path.to_str().unwrap().to_string();
    let shown = eventually(
        "status to show the stuck write",
        Duration::from_secs(20),
        || async {
            let (ok, out, err) = status(&["--config", &config]).await;
            assert!(ok, "status failed: {err}");
            out.lines()
                .any(|l| l.contains("checkout") && l.contains("write"))
                .then_some(out)
        },
    )
    .await;
    assert!(shown.contains(&format!("bulkhead at {health}")), "{shown}");
    assert!(shown.contains("ready"), "{shown}");
    let host = shown
        .lines()
        .find(|l| l.starts_with(&pg.addr()))
        .expect("the host's row");
    assert!(
        host.contains("primary") && host.contains("closed") && host.contains("yes"),
        "{host}"
    );
    let rows: Vec<&str> = shown
        .lines()
        .skip_while(|l| !l.starts_with("ID "))
        .skip(1)
        .collect();
    assert!(
        rows[0].contains("checkout") && rows[0].contains("active"),
        "longest first: {shown}"
    );
    assert!(
        rows.iter()
            .any(|r| r.contains("browsing") && r.contains("idle")),
        "{shown}"
    );
    assert!(
        !shown.contains("INSERT"),
        "no statement text by default: {shown}"
    );

    lock.rollback().await.unwrap();
    stuck.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_fails_with_a_clear_message_when_nothing_answers_on_the_health_port() {
    let nowhere = format!("127.0.0.1:{}", free_port());
    let (ok, out, err) = status(&["--health", &nowhere]).await;
    assert!(!ok, "{out}");
    assert!(
        err.contains(&format!("cannot read bulkhead's health port at {nowhere}")),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_watch_redraws_until_interrupted() {
    let pg = Cluster::start();
    let health = format!("127.0.0.1:{}", free_port());
    let _bulkhead = Binary::start(&pg, &format!("[health]\naddress = \"{health}\"\n")).await;
    let mut watch = Command::new(BIN)
        .args(["status", "--health", &health, "--watch", "200ms"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = watch.stdout.take().unwrap();
    let mut seen = Vec::new();
    let frames = tokio::time::timeout(Duration::from_secs(20), async {
        let mut buf = [0u8; 4096];
        loop {
            let n = stdout.read(&mut buf).await.unwrap();
            assert!(n > 0, "status --watch ended by itself");
            seen.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&seen);
            let frames = text.matches("\x1b[H\x1b[2J").count();
            if frames >= 3 && text.matches(&pg.addr()).count() >= 3 {
                return frames;
            }
        }
    })
    .await
    .expect("three frames within 20 s");
    assert!(frames >= 3);
    watch.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_without_postgresql_binaries_says_how_to_install_them() {
    let out = Command::new(BIN)
        .args(["demo", "--port", &free_port().to_string()])
        .env("BULKHEAD_PG_BIN", "/nonexistent/bin")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("apt-get install postgresql"), "{err}");
    assert!(err.contains("BULKHEAD_PG_BIN"), "{err}");
}

/// A running `bulkhead demo`, its output collected line by line.
struct Demo {
    child: tokio::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
    health: String,
}

impl Demo {
    async fn start(fault: &str, stop_after: &str) -> Demo {
        let port = loop {
            // The demo takes port and port + 1.
            let p = free_port();
            if std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
                break p;
            }
        };
        let health_port = free_port();
        let mut child = Command::new(BIN)
            .args([
                "demo",
                "--fault",
                fault,
                "--after",
                "3s",
                "--for",
                "8s",
                "--stop-after",
                stop_after,
            ])
            .args([
                "--port",
                &port.to_string(),
                "--health-port",
                &health_port.to_string(),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let lines = lines.clone();
            tokio::spawn(async move {
                let mut reader = BufReader::new(stream).lines();
                while let Ok(Some(line)) = reader.next_line().await {
                    lines.lock().unwrap().push(line);
                }
            });
        }
        Demo {
            child,
            lines,
            health: format!("127.0.0.1:{health_port}"),
        }
    }

    fn output(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    async fn health(&self) -> Option<serde_json::Value> {
        let addr = self.health.parse().unwrap();
        let r =
            tokio::task::spawn_blocking(move || crate::support::try_http(addr, "GET", "/health"))
                .await
                .ok()?
                .ok()?;
        serde_json::from_str(&r.body).ok()
    }

    /// Waits until the demo's bulkhead says it is ready, and returns its /health. Panics with
    /// the demo's own output if the demo exits first or `within` passes: on two busy cores,
    /// with the rest of the suite starting servers beside it, the demo's two servers and its
    /// base backup can take more than a minute.
    async fn ready(&mut self, within: Duration) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(h) = self.health().await
                && h["ready"] == true
            {
                return h;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "the demo exited ({status}) before its bulkhead was ready:\n{}",
                    self.output()
                );
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the demo's bulkhead was not ready within {within:?}:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits for the demo to stop by itself; returns its output and the directory it used.
    async fn finish(mut self) -> (String, String) {
        let status = tokio::time::timeout(Duration::from_secs(90), self.child.wait())
            .await
            .expect("the demo stops by itself after --stop-after")
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await; // the readers' last lines
        let out = self.output();
        assert!(status.success(), "{out}");
        let dir = out
            .lines()
            .find_map(|l| {
                l.split_once("everything under ")
                    .map(|(_, d)| d.to_string())
            })
            .expect("the demo names its directory");
        (out, dir)
    }
}

/// After the demo: its directory is gone and no server of it runs.
fn assert_left_nothing(dir: &str, out: &str) {
    assert!(
        !std::path::Path::new(dir).exists(),
        "{dir} still there:\n{out}"
    );
    let ps = std::process::Command::new("ps")
        .args(["-eo", "args"])
        .output()
        .unwrap();
    let ps = String::from_utf8_lossy(&ps.stdout);
    assert!(!ps.contains(dir), "processes of the demo still run:\n{ps}");
    assert!(out.contains(&format!("removed {dir}")), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_plays_stuck_commits_writes_fail_fast_reads_go_on_and_it_cleans_up() {
    let mut demo = Demo::start("stuck", "30s").await;
    demo.ready(Duration::from_secs(150)).await;
    let h = eventually(
        "the stuck commits to open the write circuit",
        Duration::from_secs(30),
        || async {
            let h = demo.health().await?;
            (h["backends"][0]["circuit"] != "closed").then_some(h)
        },
    )
    .await;
    assert_eq!(h["ready"], false, "{h}");
    eventually(
        "the circuit to close once commits go through",
        Duration::from_secs(30),
        || async { (demo.health().await?["ready"] == true).then_some(()) },
    )
    .await;
    let (out, dir) = demo.finish().await;
    assert!(out.contains("FAULT: commits on the primary"), "{out}");
    assert!(out.contains("HEALED"), "{out}");
    // While the fault was on, writes failed fast (57P03) and reads went on.
    let during = out
        .lines()
        .skip_while(|l| !l.contains("FAULT"))
        .skip(2)
        .find(|l| l.contains("traffic"))
        .expect("a traffic summary during the fault");
    assert!(
        during.contains("writes 0 ok") && during.contains("57P03"),
        "{out}"
    );
    assert!(!during.contains("reads 0 ok"), "{out}");
    assert_left_nothing(&dir, &out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_plays_a_failover_bulkhead_follows_the_promoted_standby_and_it_cleans_up() {
    let mut demo = Demo::start("failover", "25s").await;
    let first = demo.ready(Duration::from_secs(150)).await["primary"]
        .as_str()
        .unwrap()
        .to_string();
    eventually(
        "bulkhead to follow the promoted standby",
        Duration::from_secs(30),
        || async {
            let h = demo.health().await?;
            (h["ready"] == true && h["primary"].as_str()? != first).then_some(())
        },
    )
    .await;
    let (out, dir) = demo.finish().await;
    assert!(out.contains("was promoted"), "{out}");
    assert!(
        out.contains("HEALED: the old primary is back, as a standby"),
        "{out}"
    );
    let after = out
        .lines()
        .skip_while(|l| !l.contains("HEALED"))
        .find(|l| l.contains("traffic"))
        .expect("a traffic summary after the failover");
    assert!(
        !after.contains("writes 0 ok"),
        "writes go on on the new primary: {out}"
    );
    assert_left_nothing(&dir, &out);
}
