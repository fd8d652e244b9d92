//! What the integration tests stand on: throwaway PostgreSQL clusters, an in-process bulkhead
//! on port 0, a raw protocol client for byte-level cases, and polling with a deadline.
#![allow(dead_code)]

pub mod fake;
pub mod patroni;
pub mod raw;
pub mod tls;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bulkhead::{Bulkhead, Config};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_postgres::{Client, NoTls};

/// The unprivileged user the server runs as when the tests run as root.
const SERVER_USER: &str = "postgres";

/// Directory holding initdb, pg_ctl and postgres. `BULKHEAD_PG_BIN` overrides the search.
pub fn pg_bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Ok(dir) = std::env::var("BULKHEAD_PG_BIN") {
            return PathBuf::from(dir);
        }
        let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path().join("bin"))
            .filter(|bin| bin.join("initdb").exists())
            .collect();
        // Highest major version first.
        found.sort_by_key(|p| {
            let v = p.parent().and_then(|v| v.file_name()).and_then(|v| v.to_str()).and_then(|v| v.parse::<u32>().ok());
            std::cmp::Reverse(v.unwrap_or(0))
        });
        if let Some(dir) = found.into_iter().next() {
            return dir;
        }
        if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if dir.join("initdb").exists() {
                return dir;
            }
        }
        panic!(
            "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found in /usr/lib/postgresql/*/bin \
             or via pg_config. Install them with `apt-get install -y postgresql` or point BULKHEAD_PG_BIN at them."
        )
    })
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A command for a server binary, run as the unprivileged user when we are root.
fn server_command(program: &str) -> Command {
    let path = pg_bin_dir().join(program);
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", SERVER_USER, "--"]).arg(path);
        c
    } else {
        Command::new(path)
    }
}

fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn give_to_server_user(path: &Path) {
    if is_root() {
        run(
            Command::new("chown").args(["-R", SERVER_USER]).arg(path),
            "chown",
        );
    }
}

/// A cluster initialised once per test run; each test copies it, which is far faster than initdb.
fn template() -> &'static Path {
    static TEMPLATE: OnceLock<PathBuf> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let version = pg_bin_dir()
            .parent()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned());
        let dir = base.join(format!("pg-template-{}", version.unwrap_or_default()));
        if dir.join("PG_VERSION").exists() {
            return dir;
        }
        let building = base.join(format!("pg-template-building-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&building);
        std::fs::create_dir_all(&building).unwrap();
        give_to_server_user(&building);
        let mut initdb = server_command("initdb");
        initdb.arg("-D").arg(&building).args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ]);
        run(&mut initdb, "initdb");
        std::fs::write(
            building.join("pg_hba.conf"),
            "local all all trust\n\
             host all scram_user 127.0.0.1/32 scram-sha-256\n\
             host all md5_user 127.0.0.1/32 md5\n\
             host all all 127.0.0.1/32 trust\n\
             host replication all 127.0.0.1/32 trust\n",
        )
        .unwrap();
        give_to_server_user(&building);
        // Another test process may have won the race; either copy is good.
        if std::fs::rename(&building, &dir).is_err() {
            let _ = std::fs::remove_dir_all(&building);
        }
        dir
    })
}

/// A throwaway PostgreSQL server on a free loopback port, stopped and removed when dropped.
pub struct Cluster {
    dir: tempfile::TempDir,
    pub port: u16,
}

impl Cluster {
    /// Starts a cluster with the given extra postgresql.conf lines.
    pub fn start_with(settings: &[&str]) -> Cluster {
        Cluster::start_prepared(settings, |_| {})
    }

    /// Starts a cluster with `ssl = on` and `pki`'s server certificate. It takes TLS
    /// connections only (pg_hba.conf has hostssl lines and rejects the rest), so a session
    /// that reaches it proves bulkhead spoke TLS.
    pub fn start_tls(pki: &tls::Pki) -> Cluster {
        Cluster::start_tls_with(
            pki,
            "hostssl all scram_user 127.0.0.1/32 scram-sha-256\n\
             hostssl all all 127.0.0.1/32 trust\n",
        )
    }

    /// As [`Cluster::start_tls`], but every TCP login is by client certificate (`cert`: signed
    /// by `pki`'s CA, with the user name as its CN), so a session proves bulkhead presented one.
    pub fn start_tls_cert_auth(pki: &tls::Pki) -> Cluster {
        Cluster::start_tls_with(pki, "hostssl all all 127.0.0.1/32 cert\n")
    }

    fn start_tls_with(pki: &tls::Pki, hba: &str) -> Cluster {
        Cluster::start_prepared(
            &[
                "ssl = on",
                "ssl_cert_file = 'server.pem'",
                "ssl_key_file = 'server.key'",
                "ssl_ca_file = 'ca.pem'",
            ],
            |data| {
                std::fs::copy(pki.cert(), data.join("server.pem")).unwrap();
                std::fs::copy(pki.key(), data.join("server.key")).unwrap();
                std::fs::copy(pki.ca(), data.join("ca.pem")).unwrap();
                run(
                    Command::new("chmod")
                        .arg("600")
                        .arg(data.join("server.key")),
                    "chmod server.key",
                );
                std::fs::write(
                    data.join("pg_hba.conf"),
                    format!(
                        "local all all trust\n\
                         hostnossl all all 127.0.0.1/32 reject\n\
                         {hba}\
                         hostssl replication all 127.0.0.1/32 trust\n"
                    ),
                )
                .unwrap();
            },
        )
    }

    /// Starts a cluster after `prepare` has had its way with the data directory.
    fn start_prepared(settings: &[&str], prepare: impl FnOnce(&Path)) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("bulkhead-pg-")
            .tempdir()
            .unwrap();
        let data = dir.path().join("data");
        run(
            Command::new("cp").arg("-a").arg(template()).arg(&data),
            "copy template cluster",
        );
        prepare(&data);
        let mut conf = format!(
            "\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             fsync = off\nfull_page_writes = off\nmax_connections = 200\n\
             wal_level = replica\nmax_wal_senders = 5\nhot_standby = on\nlog_min_messages = warning\n",
            dir.path().display()
        );
        for line in settings {
            conf.push_str(line);
            conf.push('\n');
        }
        std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .and_then(|mut f| std::io::Write::write_all(&mut f, conf.as_bytes()))
            .unwrap();
        give_to_server_user(dir.path());
        let mut cluster = Cluster { dir, port: 0 };
        cluster.start_on_free_port();
        cluster
    }

    pub fn start() -> Cluster {
        Cluster::start_with(&[])
    }

    fn start_on_free_port(&mut self) {
        for attempt in 0..5 {
            self.port = free_port();
            // Keep what else is there (a standby's primary_conninfo), set the port.
            let auto = self.data().join("postgresql.auto.conf");
            let kept: String = std::fs::read_to_string(&auto)
                .unwrap_or_default()
                .lines()
                .filter(|l| !l.trim_start().starts_with("port"))
                .map(|l| format!("{l}\n"))
                .collect();
            std::fs::write(&auto, format!("{kept}port = {}\n", self.port)).unwrap();
            give_to_server_user(&self.data());
            let mut cmd = self.pg_ctl();
            cmd.args(["start", "-w", "-t", "60", "-l"])
                .arg(self.dir.path().join("server.log"));
            let out = cmd.output().expect("run pg_ctl");
            if out.status.success() {
                return;
            }
            eprintln!(
                "pg_ctl start failed (attempt {attempt}): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        panic!("could not start PostgreSQL; its log:\n{}", self.log());
    }

    /// A streaming standby of `primary` (pg_basebackup -R), started on a port of its own.
    pub fn standby_of(primary: &Cluster) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("bulkhead-pg-")
            .tempdir()
            .unwrap();
        give_to_server_user(dir.path());
        let data = dir.path().join("data");
        let mut backup = server_command("pg_basebackup");
        backup.arg("-D").arg(&data).args([
            "-h",
            "127.0.0.1",
            "-p",
            &primary.port.to_string(),
            "-U",
            "postgres",
            "-R",
            "-X",
            "stream",
            "--no-sync",
        ]);
        run(&mut backup, "pg_basebackup");
        let socket_dir = format!("\nunix_socket_directories = '{}'\n", dir.path().display());
        std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .and_then(|mut f| std::io::Write::write_all(&mut f, socket_dir.as_bytes()))
            .unwrap();
        give_to_server_user(dir.path());
        let mut cluster = Cluster { dir, port: 0 };
        cluster.start_on_free_port();
        cluster
    }

    /// `pg_ctl promote`: the standby becomes a primary on the next timeline.
    pub fn promote(&self) {
        let mut c = self.pg_ctl();
        c.args(["promote", "-w", "-t", "60"]);
        run(&mut c, "pg_ctl promote");
    }

    /// The postmaster's process id.
    pub fn postmaster_pid(&self) -> i32 {
        let text =
            std::fs::read_to_string(self.data().join("postmaster.pid")).expect("postmaster.pid");
        text.lines().next().unwrap().trim().parse().unwrap()
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    fn pg_ctl(&self) -> Command {
        let mut c = server_command("pg_ctl");
        c.arg("-D").arg(self.data());
        c
    }

    /// `pg_ctl stop -m MODE` (smart, fast or immediate).
    pub fn stop(&self, mode: &str) {
        let mut c = self.pg_ctl();
        c.args(["stop", "-w", "-m", mode]);
        run(&mut c, "pg_ctl stop");
    }

    /// Starts a stopped cluster again on the same port.
    pub fn start_again(&self) {
        let mut c = self.pg_ctl();
        c.args(["start", "-w", "-t", "60", "-l"])
            .arg(self.dir.path().join("server.log"));
        run(&mut c, "pg_ctl start");
    }

    /// A direct connection, not through bulkhead, as the superuser.
    pub async fn connect(&self) -> Client {
        connect(&format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        ))
        .await
    }

    /// As [`Cluster::psql`], over the server's Unix socket: it works while TCP to the server
    /// is blackholed.
    pub fn psql_local(&self, sql: &str) -> String {
        let mut c = Command::new("psql");
        c.args([
            "-X",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-U",
            "postgres",
            "-d",
            "postgres",
        ])
        .arg("-h")
        .arg(self.dir.path())
        .args(["-p", &self.port.to_string(), "-c", sql]);
        run(&mut c, "psql").trim().to_string()
    }

    /// Runs SQL directly against the server with psql and returns its unaligned output.
    pub fn psql(&self, sql: &str) -> String {
        run(&mut self.psql_command(sql), "psql").trim().to_string()
    }

    /// The psql command `psql` runs (superuser, unaligned, stop on error), for a caller that
    /// must run it itself (e.g. in a thread, where it may wait).
    pub fn psql_command(&self, sql: &str) -> Command {
        let mut c = Command::new("psql");
        c.args([
            "-X",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-d",
            "postgres",
        ])
        .args(["-p", &self.port.to_string(), "-c", sql]);
        c
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self
            .pg_ctl()
            .args(["stop", "-w", "-m", "immediate"])
            .output();
    }
}

/// A port nobody listens on right now. Another process could take it before we do; callers
/// that bind it retry.
/// A port free now, and never handed out before in this test run: the kernel may give the
/// same port to two binds in a row once the first is closed, and a server not yet started
/// does not hold its port (two Patroni members were once both given one).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Connects with tokio-postgres and returns the client and the task driving its connection,
/// whose result tells how the server (or bulkhead) ended it.
pub async fn connect_watched(
    params: &str,
) -> (Client, JoinHandle<Result<(), tokio_postgres::Error>>) {
    let (client, connection) = tokio_postgres::connect(params, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {params}: {e}"));
    (client, tokio::spawn(connection))
}

/// The first column of the first row `sql` returns, as text (simple protocol), or "".
pub async fn first_value(c: &Client, sql: &str) -> String {
    let msgs = c
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    msgs.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("").to_string()),
            _ => None,
        })
        .unwrap_or_default()
}

/// Asserts that a session still answers statements (after an error, a cancel, a refusal).
pub async fn assert_answers(c: &Client) {
    let row = c
        .query_one("SELECT 42::int", &[])
        .await
        .expect("the session answers");
    assert_eq!(row.get::<_, i32>(0), 42);
}

/// Connects with tokio-postgres and drives the connection on its own task.
pub async fn connect(params: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(params, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {params}: {e:?}"));
    tokio::spawn(connection);
    client
}

/// A bulkhead running in this process on a port of its own.
pub struct Proxy {
    pub addr: SocketAddr,
    /// The read-only listener, on a port of its own, when the config asks for one.
    pub readonly_addr: Option<SocketAddr>,
    pub bulkhead: Arc<Bulkhead>,
    /// The health port, on a port of its own.
    pub health: bulkhead::health::HealthServer,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

/// A configuration that points at `cluster` and otherwise keeps the defaults.
pub fn config_for(cluster: &Cluster) -> Config {
    let mut config = Config::default();
    config.database.hosts = vec![cluster.addr()];
    config
}

impl Proxy {
    pub async fn start(config: Config) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let readonly = match config.listen_readonly.address {
            Some(_) => Some(TcpListener::bind("127.0.0.1:0").await.unwrap()),
            None => None,
        };
        let readonly_addr = readonly.as_ref().map(|l| l.local_addr().unwrap());
        let bulkhead = Arc::new(Bulkhead::new(config).expect("TLS files load"));
        let health = bulkhead
            .start_health(std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let b = bulkhead.clone();
        let task = tokio::spawn(async move {
            b.serve_with_readonly(listener, readonly, async move {
                let _ = stopped.await;
            })
            .await
        });
        Proxy {
            addr,
            readonly_addr,
            bulkhead,
            health,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn params(&self, user: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={user} dbname=postgres",
            self.addr.port()
        )
    }

    /// A tokio-postgres session through bulkhead, as the superuser.
    pub async fn connect(&self) -> Client {
        connect(&self.params("postgres")).await
    }

    /// Stops accepting, drains and waits for the proxy to finish.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Polls `probe` every 20 ms until it returns `Some`, or panics after `within` naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, within: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The SQLSTATE of a tokio-postgres error, or a panic that shows the error.
pub fn sqlstate(e: &tokio_postgres::Error) -> String {
    match e.code() {
        Some(code) => code.code().to_string(),
        None => panic!("expected a server error with a SQLSTATE, got: {e:?}"),
    }
}

/// The real `bulkhead` binary, started with a config file of its own; killed when dropped.
pub struct Binary {
    pub child: tokio::process::Child,
    pub port: u16,
    pub config_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Binary {
    /// Starts the binary with `[listen]` on a free port plus `extra` TOML, and waits until it
    /// accepts a session.
    pub async fn start(cluster: &Cluster, extra: &str) -> Binary {
        Binary::start_with_nofile(cluster, extra, None).await
    }

    /// As [`Binary::start`], with RLIMIT_NOFILE (soft and hard) set to `nofile` if given, and
    /// its log kept (see [`Binary::log`]).
    pub async fn start_with_nofile(cluster: &Cluster, extra: &str, nofile: Option<u64>) -> Binary {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let config_path = dir.path().join("bulkhead.toml");
        std::fs::write(&config_path, Binary::config_text(port, cluster, extra)).unwrap();
        let log = std::fs::File::create(dir.path().join("stderr.log")).unwrap();
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_bulkhead"));
        command
            .arg("--config")
            .arg(&config_path)
            .stderr(log)
            .kill_on_drop(true);
        if let Some(n) = nofile {
            // SAFETY: setrlimit is async-signal-safe and touches only the child's limits.
            unsafe {
                command.pre_exec(move || {
                    let limit = libc::rlimit {
                        rlim_cur: n as libc::rlim_t,
                        rlim_max: n as libc::rlim_t,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let child = command.spawn().unwrap();
        let b = Binary {
            child,
            port,
            config_path,
            _dir: dir,
        };
        eventually("bulkhead to accept", Duration::from_secs(10), || async {
            tokio_postgres::connect(&b.params(), NoTls)
                .await
                .ok()
                .map(|_| ())
        })
        .await;
        b
    }

    pub fn config_text(port: u16, cluster: &Cluster, extra: &str) -> String {
        format!(
            "[listen]\naddress = \"127.0.0.1:{port}\"\n[database]\nhosts = [\"{}\"]\n{extra}",
            cluster.addr()
        )
    }

    pub fn params(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        )
    }

    /// What the binary has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("stderr.log")).unwrap_or_default()
    }

    pub fn signal(&self, signal: i32) {
        let pid = self.child.id().expect("bulkhead still running") as i32;
        // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    }
}

/// An HTTP answer from the health port.
#[derive(Debug, Clone)]
pub struct Http {
    pub status: u16,
    pub body: String,
    pub took: Duration,
}

/// A blocking HTTP/1.1 request with plain std sockets, so it depends on no runtime.
pub fn http(addr: SocketAddr, method: &str, path: &str) -> Http {
    try_http(addr, method, path).expect("an answer from the health port")
}

/// [`http`], with a failed connection or read as an error rather than a panic.
pub fn try_http(addr: SocketAddr, method: &str, path: &str) -> std::io::Result<Http> {
    use std::io::{Read, Write};
    let started = std::time::Instant::now();
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: bulkhead\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let took = started.elapsed();
    let status = raw
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok(Http { status, body, took })
}

impl Proxy {
    /// The value of the metric line that starts with `line_start` (name and labels).
    pub fn metric(&self, line_start: &str) -> f64 {
        let text = self.bulkhead.metrics().render();
        text.lines()
            .find_map(|l| {
                l.strip_prefix(line_start)
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or_else(|| panic!("no metric line {line_start} in\n{text}"))
    }

    /// GET `path` on the health port, from a blocking thread.
    pub async fn get(&self, path: &str) -> Http {
        let (addr, path) = (self.health.addr, path.to_string());
        tokio::task::spawn_blocking(move || http(addr, "GET", &path))
            .await
            .unwrap()
    }

    /// GET `path` on the health port; `None` if the connection was refused or reset (the
    /// port's connection cap may still be full).
    pub async fn try_get(&self, path: &str) -> Option<Http> {
        let (addr, path) = (self.health.addr, path.to_string());
        tokio::task::spawn_blocking(move || try_http(addr, "GET", &path).ok())
            .await
            .unwrap()
    }

    /// The /health document.
    pub async fn health_json(&self) -> serde_json::Value {
        serde_json::from_str(&self.get("/health").await.body).expect("/health is JSON")
    }
}

/// A network blackhole for one TCP port on loopback, made with iptables (the suite runs as
/// root, as CI does): every packet to or from the port is dropped, so established connections
/// go silent without a reset, as after a VIP move or a partition. Removed when dropped.
pub struct Blackhole {
    port: u16,
    on: bool,
}

impl Blackhole {
    pub fn new(port: u16) -> Blackhole {
        Blackhole { port, on: false }
    }

    fn rules(&self, action: &str) {
        for dir in ["--dport", "--sport"] {
            let out = Command::new("iptables")
                .args([action, "INPUT", "-p", "tcp", "-i", "lo", dir, &self.port.to_string(), "-j", "DROP"])
                .output()
                .unwrap_or_else(|e| {
                    panic!("iptables: {e}; the network-fault tests need root and iptables (apt-get install iptables)")
                });
            assert!(
                out.status.success(),
                "iptables {action}: {}; the network-fault tests need root and iptables",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    pub fn start(&mut self) {
        if !self.on {
            self.rules("-I");
            self.on = true;
        }
    }

    pub fn heal(&mut self) {
        if self.on {
            self.rules("-D");
            self.on = false;
        }
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        self.heal();
    }
}

/// Stops (SIGSTOP) the postmaster and every backend (or some processes), and resumes them
/// when dropped.
pub struct Frozen(Vec<i32>);

impl Frozen {
    pub fn freeze(pg: &Cluster) -> Frozen {
        let master = pg.postmaster_pid();
        let children = std::fs::read_to_string(format!("/proc/{master}/task/{master}/children"))
            .unwrap_or_default();
        let mut pids: Vec<i32> = vec![master];
        pids.extend(
            children
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok()),
        );
        Frozen::stop(pids)
    }

    /// Stops these processes only.
    pub fn stop(pids: Vec<i32>) -> Frozen {
        for &pid in &pids {
            // SAFETY: kill has no memory-safety preconditions; these are the server's pids.
            unsafe { libc::kill(pid, libc::SIGSTOP) };
        }
        Frozen(pids)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        for &pid in &self.0 {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGCONT) };
        }
    }
}

/// Waits until the probe's heartbeat connection (an idle session whose last query was empty)
/// is open.
pub async fn heartbeat_connected(pg: &Cluster) {
    eventually(
        "the heartbeat connection",
        Duration::from_secs(20),
        || async {
            let beats = pg.psql(
                "SELECT count(*) FROM pg_stat_activity \
             WHERE application_name = 'bulkhead probe' AND query = ''",
            );
            (beats != "0").then_some(())
        },
    )
    .await;
}
