//! A real Patroni cluster on loopback: one etcd, and Patroni nodes that each run a PostgreSQL
//! (the distribution's `patroni` and `etcd-server` packages). Bootstrap takes the first node as
//! leader; the others join as streaming replicas. Dropping it stops everything it started and
//! removes its files.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{SERVER_USER, free_port, is_root, pg_bin_dir};

pub struct PatroniCluster {
    dir: tempfile::TempDir,
    etcd: Child,
    pub nodes: Vec<Node>,
}

pub struct Node {
    pub name: String,
    pub pg_port: u16,
    pub api_port: u16,
    child: Option<Child>,
    config: PathBuf,
    data: PathBuf,
}

impl Node {
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.pg_port)
    }

    pub fn api(&self) -> String {
        format!("http://127.0.0.1:{}", self.api_port)
    }

    /// The Patroni process (not its PostgreSQL).
    pub fn patroni_pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }
}

/// The uid and gid of the unprivileged server user, when we are root.
fn server_ids() -> Option<(u32, u32)> {
    if !is_root() {
        return None;
    }
    let id = |flag: &str| {
        let out = Command::new("id")
            .args([flag, SERVER_USER])
            .output()
            .expect("id runs");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse::<u32>()
            .expect("a numeric id")
    };
    Some((id("-u"), id("-g")))
}

fn as_server_user(c: &mut Command) -> &mut Command {
    if let Some((uid, gid)) = server_ids() {
        c.uid(uid).gid(gid).env("HOME", "/tmp");
    }
    c
}

fn need(program: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).exists()))
        .unwrap_or(false);
    assert!(
        found,
        "{program} not found: install it with `apt-get install -y {package}` (.ci/run does)"
    );
}

impl PatroniCluster {
    /// Starts etcd and `n` Patroni nodes, and waits until the first is the leader and every
    /// other one a running replica.
    pub fn start(n: usize) -> PatroniCluster {
        need("patroni", "patroni");
        need("etcd", "etcd-server");
        let dir = tempfile::Builder::new()
            .prefix("bulkhead-patroni-")
            .tempdir()
            .unwrap();
        let (client, peer) = (free_port(), free_port());
        let etcd = Command::new("etcd")
            .args(["--name", "e1", "--data-dir"])
            .arg(dir.path().join("etcd"))
            .arg(format!("--listen-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--advertise-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{peer}"
            ))
            .arg(format!("--initial-cluster=e1=http://127.0.0.1:{peer}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("etcd.log")).unwrap())
            .spawn()
            .expect("etcd starts");
        let scope = format!("bh{client}");
        let nodes: Vec<Node> = (0..n)
            .map(|i| {
                let name = format!("pg{i}");
                let (pg_port, api_port) = (free_port(), free_port());
                let data = dir.path().join(&name);
                let config = dir.path().join(format!("{name}.yml"));
                std::fs::write(
                    &config,
                    node_config(&scope, &name, pg_port, api_port, client, dir.path()),
                )
                .unwrap();
                Node {
                    name,
                    pg_port,
                    api_port,
                    child: None,
                    config,
                    data,
                }
            })
            .collect();
        if is_root() {
            let ok = Command::new("chown")
                .args(["-R", SERVER_USER])
                .arg(dir.path())
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown");
        }
        let mut cluster = PatroniCluster { dir, etcd, nodes };
        for i in 0..n {
            cluster.start_node(i);
            if i == 0 {
                cluster.wait_for("the first node to lead", Duration::from_secs(60), |c| {
                    c.leader().as_deref() == Some("pg0")
                });
            }
        }
        cluster.wait_for("every replica to run", Duration::from_secs(90), |c| {
            c.cluster().is_some_and(|m| {
                m.len() == n
                    && m.iter()
                        .all(|m| m["state"] == "running" || m["state"] == "streaming")
            })
        });
        cluster
    }

    fn start_node(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let log =
            std::fs::File::create(self.dir.path().join(format!("{}.log", node.name))).unwrap();
        let mut cmd = Command::new("patroni");
        cmd.arg(&node.config)
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        as_server_user(&mut cmd);
        node.child = Some(cmd.spawn().expect("patroni starts"));
    }

    /// /cluster's members, from the first API that answers.
    pub fn cluster(&self) -> Option<Vec<serde_json::Value>> {
        self.nodes.iter().find_map(|n| self.cluster_from(&n.name))
    }

    /// /cluster's members, as node `name`'s API gives them.
    pub fn cluster_from(&self, name: &str) -> Option<Vec<serde_json::Value>> {
        let out = Command::new("curl")
            .args(["-s", "-m", "1"])
            .arg(format!("{}/cluster", self.node(name).api()))
            .output()
            .ok()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        v["members"].as_array().cloned()
    }

    /// The name of the member /cluster calls the leader.
    pub fn leader(&self) -> Option<String> {
        leader_of(&self.cluster()?)
    }

    /// The leader as node `name`'s API says: `None` if it does not answer, `Some(None)` if
    /// there is no leader.
    pub fn leader_from(&self, name: &str) -> Option<Option<String>> {
        self.cluster_from(name).map(|m| leader_of(&m))
    }

    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .expect("a node by that name")
    }

    /// Asks Patroni for a switchover to `candidate`; returns once Patroni says it is done.
    pub fn switchover(&self, leader: &str, candidate: &str) {
        let out = Command::new("curl")
            .args(["-s", "-m", "60", "-XPOST"])
            .arg(format!("{}/switchover", self.node(leader).api()))
            .arg("-d")
            .arg(format!(
                "{{\"leader\":\"{leader}\",\"candidate\":\"{candidate}\"}}"
            ))
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(said.contains("witched over"), "switchover: {said}");
    }

    pub fn wait_for(&self, what: &str, within: Duration, ok: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + within;
        while !ok(self) {
            assert!(
                Instant::now() < deadline,
                "{what}: not within {within:?}; logs:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn logs(&self) -> String {
        let mut all = String::new();
        for n in &self.nodes {
            let log = std::fs::read_to_string(self.dir.path().join(format!("{}.log", n.name)))
                .unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            all.push_str(&format!("--- {} ---\n", n.name));
            for l in tail.into_iter().rev() {
                all.push_str(l);
                all.push('\n');
            }
        }
        all
    }

    /// psql as the superuser on node `name`'s PostgreSQL.
    pub fn psql(&self, name: &str, sql: &str) -> String {
        let out = Command::new(pg_bin_dir().join("psql"))
            .args([
                "-XAtq",
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-p",
            ])
            .arg(self.node(name).pg_port.to_string())
            .args(["-c", sql])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "psql on {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

fn leader_of(members: &[serde_json::Value]) -> Option<String> {
    members
        .iter()
        .find(|m| m["role"] == "leader")
        .and_then(|m| m["name"].as_str().map(str::to_string))
}

fn node_config(scope: &str, name: &str, pg: u16, api: u16, etcd: u16, dir: &Path) -> String {
    let bin = pg_bin_dir().display();
    let dir = dir.display();
    format!(
        "scope: {scope}
name: {name}
log:
  level: WARNING
restapi:
  listen: 127.0.0.1:{api}
  connect_address: 127.0.0.1:{api}
etcd3:
  hosts: 127.0.0.1:{etcd}
bootstrap:
  dcs:
    ttl: 20
    loop_wait: 1
    retry_timeout: 5
    postgresql:
      use_pg_rewind: false
      parameters:
        wal_level: replica
        hot_standby: 'on'
        max_wal_senders: 5
        fsync: 'off'
        full_page_writes: 'off'
  initdb:
    - encoding: UTF8
  pg_hba:
    - host replication all 127.0.0.1/32 trust
    - host all all 127.0.0.1/32 trust
    - local all all trust
postgresql:
  listen: 127.0.0.1:{pg}
  connect_address: 127.0.0.1:{pg}
  data_dir: {dir}/{name}
  bin_dir: {bin}
  pgpass: {dir}/{name}.pgpass
  authentication:
    superuser: {{username: postgres, password: x}}
    replication: {{username: postgres, password: x}}
  parameters:
    unix_socket_directories: {dir}
"
    )
}

impl Drop for PatroniCluster {
    fn drop(&mut self) {
        // Patroni stops its PostgreSQL on SIGTERM; whatever is left after that is killed.
        for n in &mut self.nodes {
            if let Some(c) = &n.child {
                // SAFETY: kill has no memory-safety preconditions; this is our child.
                unsafe {
                    libc::kill(c.id() as i32, libc::SIGCONT);
                    libc::kill(c.id() as i32, libc::SIGTERM);
                }
            }
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(100));
                }
                let _ = c.kill();
                let _ = c.wait();
            }
            if n.data.join("postmaster.pid").exists() {
                let mut stop = Command::new(pg_bin_dir().join("pg_ctl"));
                stop.arg("-D")
                    .arg(&n.data)
                    .args(["stop", "-m", "immediate"]);
                as_server_user(&mut stop);
                let _ = stop.output();
            }
        }
        let _ = self.etcd.kill();
        let _ = self.etcd.wait();
    }
}
