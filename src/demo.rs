//! `bulkhead demo`: a throwaway primary and streaming standby made from the machine's
//! PostgreSQL binaries, a bulkhead in front of them on the usual ports, a little traffic, and
//! optionally one of the incidents bulkhead exists for, played on a timer. Ctrl-C (or
//! `--stop-after`) removes everything it made.

use std::ffi::CString;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio_postgres::NoTls;

/// What `bulkhead demo` was asked for.
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// Play this incident on a timer: healthy for --after, faulty for --for, again and again.
    #[arg(long, value_enum)]
    pub fault: Option<Fault>,
    /// Healthy time before each fault.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub after: Duration,
    /// How long each fault lasts.
    #[arg(long = "for", default_value = "30s", value_parser = humantime::parse_duration)]
    pub lasts: Duration,
    /// bulkhead's port for sessions; the read-only listener takes the next one.
    #[arg(long, default_value_t = 6432)]
    pub port: u16,
    /// bulkhead's health port (/health, /readyz, /metrics, /sessions).
    #[arg(long, default_value_t = 9930)]
    pub health_port: u16,
    /// Send no demo traffic (one writer and one reader through bulkhead, summed up every 5 s).
    #[arg(long)]
    pub no_traffic: bool,
    /// Stop and clean up by itself after this long.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub stop_after: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Fault {
    /// The primary's commits hang (synchronous_standby_names names a standby that never
    /// comes): writes time out, then fail fast behind the open circuit; reads go on.
    Stuck,
    /// The primary stops dead and the standby is promoted; bulkhead moves writes to it. The
    /// old primary comes back as the new standby.
    Failover,
    /// Every process of the primary is frozen (SIGSTOP): it accepts connections and answers
    /// nothing, as a hung VM does.
    Frozen,
}

const INSTALL_HINT: &str = "\
bulkhead demo needs PostgreSQL's server binaries (initdb, pg_ctl, pg_basebackup).
Install them, then run it again:
  Debian, Ubuntu:   sudo apt-get install postgresql
  Fedora, RHEL:     sudo dnf install postgresql-server
  macOS (Homebrew): brew install postgresql@16
or point BULKHEAD_PG_BIN at the directory that holds them.";

pub fn run(options: Options) -> ExitCode {
    let Some(bin) = pg_bin_dir() else {
        eprintln!("{INSTALL_HINT}");
        return ExitCode::FAILURE;
    };
    for (port, what) in [
        (options.port, "--port"),
        (
            options.port.wrapping_add(1),
            "--port (the read-only listener takes port + 1)",
        ),
        (options.health_port, "--health-port"),
    ] {
        if let Err(e) = TcpListener::bind(("127.0.0.1", port)) {
            eprintln!(
                "bulkhead demo: port {port} on 127.0.0.1 is not free ({e}); choose another with {what}"
            );
            return ExitCode::FAILURE;
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bulkhead demo: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Ctrl-C and SIGTERM are caught from here on, so one that comes while the servers are
    // being made still lets the demo remove them (it is acted on once they are up).
    use tokio::signal::unix::{SignalKind, signal};
    let signals = {
        let _in_runtime = runtime.enter();
        (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        )
    };
    let (Ok(mut interrupt), Ok(mut terminate)) = signals else {
        eprintln!(
            "bulkhead demo: cannot catch Ctrl-C, so could not clean up after it; not starting"
        );
        return ExitCode::FAILURE;
    };
    let mut demo = match runtime.block_on(Demo::set_up(bin, &options)) {
        Ok(demo) => demo,
        Err(e) => {
            eprintln!("bulkhead demo: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(demo.play(&options, async {
        tokio::select! {
            _ = interrupt.recv() => println!("\nbulkhead demo: stopping"),
            _ = terminate.recv() => println!("bulkhead demo: SIGTERM: stopping"),
        }
    }));
    demo.tear_down();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bulkhead demo: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Where PostgreSQL's server binaries are: BULKHEAD_PG_BIN, the highest version under
/// /usr/lib/postgresql, `pg_config --bindir`, or PATH.
fn pg_bin_dir() -> Option<PathBuf> {
    let has = |dir: &Path| {
        ["initdb", "pg_ctl", "pg_basebackup"]
            .iter()
            .all(|b| dir.join(b).exists())
    };
    if let Ok(dir) = std::env::var("BULKHEAD_PG_BIN") {
        return has(Path::new(&dir)).then(|| PathBuf::from(dir));
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((version, e.path().join("bin")))
        })
        .filter(|(_, bin)| has(bin))
        .collect();
    found.sort();
    if let Some((_, dir)) = found.pop() {
        return Some(dir);
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if has(&dir) {
            return Some(dir);
        }
    }
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .find(|dir| has(dir))
}

/// The unprivileged user PostgreSQL runs as when the demo runs as root (PostgreSQL refuses
/// to run as root): `postgres` if it exists, else `nobody`.
fn server_user() -> Option<(u32, u32, String)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    for name in ["postgres", "nobody"] {
        let c = CString::new(name).expect("no NUL");
        // SAFETY: getpwnam reads a static buffer; we copy the ids out at once, on this thread.
        let pw = unsafe { libc::getpwnam(c.as_ptr()) };
        if !pw.is_null() {
            // SAFETY: non-null, points at a passwd entry.
            let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
            return Some((uid, gid, name.to_string()));
        }
    }
    None
}

/// One PostgreSQL server of the demo.
struct Node {
    name: &'static str,
    data: PathBuf,
    port: u16,
}

impl Node {
    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

struct Demo {
    dir: PathBuf,
    bin: PathBuf,
    run_as: Option<(u32, u32, String)>,
    nodes: [Node; 2],
    /// Which of `nodes` is the primary now.
    primary: usize,
    bulkhead: Option<Child>,
    /// Processes stopped by the frozen fault, to be let go.
    frozen: Vec<i32>,
    started: Instant,
    health: String,
}

impl Demo {
    async fn set_up(bin: PathBuf, options: &Options) -> Result<Demo, String> {
        let dir = std::env::temp_dir().join(format!("bulkhead-demo-{}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let free = || -> Result<u16, String> {
            TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .map_err(|e| format!("no free port: {e}"))
        };
        let (p0, mut p1) = (free()?, free()?);
        while p1 == p0 {
            p1 = free()?;
        }
        let mut demo = Demo {
            nodes: [
                Node {
                    name: "pg-a",
                    data: dir.join("pg-a"),
                    port: p0,
                },
                Node {
                    name: "pg-b",
                    data: dir.join("pg-b"),
                    port: p1,
                },
            ],
            dir,
            bin,
            run_as: server_user(),
            primary: 0,
            bulkhead: None,
            frozen: Vec::new(),
            started: Instant::now(),
            health: format!("127.0.0.1:{}", options.health_port),
        };
        // From here on, whatever fails leaves nothing behind (the caller's tear_down does not
        // run when set_up fails).
        match demo.build(options).await {
            Ok(()) => Ok(demo),
            Err(e) => {
                demo.tear_down();
                Err(e)
            }
        }
    }

    async fn build(&mut self, options: &Options) -> Result<(), String> {
        self.give_away(&self.dir.clone())?;
        println!(
            "bulkhead demo: PostgreSQL from {}, everything under {}",
            self.bin.display(),
            self.dir.display()
        );
        if let Some((_, _, user)) = &self.run_as {
            println!("bulkhead demo: running as root, so the servers run as {user}");
        }
        let a = &self.nodes[0];
        self.server_cmd("initdb", |c| {
            c.arg("-D").arg(&a.data).args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ]);
        })?;
        self.configure(0)?;
        self.start_node(0)?;
        self.base_backup(1, 0)?;
        self.start_node(1)?;
        self.psql(
            0,
            "CREATE TABLE demo_writes (id bigserial PRIMARY KEY, at timestamptz DEFAULT now())",
        )
        .await?;
        self.start_bulkhead(options)?;
        Ok(())
    }

    /// Runs a server binary (as the unprivileged user when root), waiting for it.
    fn server_cmd(&self, program: &str, args: impl FnOnce(&mut Command)) -> Result<String, String> {
        let mut c = Command::new(self.bin.join(program));
        args(&mut c);
        self.as_server_user(&mut c);
        let out = c
            .output()
            .map_err(|e| format!("cannot run {program}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "{program} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn as_server_user(&self, c: &mut Command) {
        use std::os::unix::process::CommandExt;
        if let Some((uid, gid, _)) = &self.run_as {
            c.uid(*uid).gid(*gid);
            c.current_dir(&self.dir);
        }
    }

    fn give_away(&self, path: &Path) -> Result<(), String> {
        if let Some((uid, gid, _)) = &self.run_as {
            std::os::unix::fs::chown(path, Some(*uid), Some(*gid))
                .map_err(|e| format!("cannot give {} to the server user: {e}", path.display()))?;
        }
        Ok(())
    }

    /// Port, loopback only, sockets in the demo's directory.
    fn configure(&self, i: usize) -> Result<(), String> {
        let n = &self.nodes[i];
        let auto = n.data.join("postgresql.auto.conf");
        let kept: String = std::fs::read_to_string(&auto)
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                !l.starts_with("port")
                    && !l.starts_with("listen_addresses")
                    && !l.starts_with("unix_socket")
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let text = format!(
            "{kept}port = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n",
            n.port,
            self.dir.display()
        );
        std::fs::write(&auto, text).map_err(|e| format!("cannot write {}: {e}", auto.display()))?;
        self.give_away(&auto)
    }

    fn start_node(&self, i: usize) -> Result<(), String> {
        let n = &self.nodes[i];
        let log = self.dir.join(format!("{}.log", n.name));
        self.server_cmd("pg_ctl", |c| {
            c.arg("-D")
                .arg(&n.data)
                .args(["-w", "-t", "60", "-l"])
                .arg(&log)
                .arg("start");
        })
        .map(|_| ())
    }

    /// Makes node `i` a fresh streaming standby of node `from`.
    fn base_backup(&self, i: usize, from: usize) -> Result<(), String> {
        let n = &self.nodes[i];
        let _ = std::fs::remove_dir_all(&n.data);
        let port = self.nodes[from].port.to_string();
        self.server_cmd("pg_basebackup", |c| {
            c.arg("-D").arg(&n.data).args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "postgres",
                "-R",
                "-X",
                "stream",
                "--no-sync",
            ]);
        })?;
        self.configure(i)
    }

    async fn psql(&self, i: usize, sql: &str) -> Result<(), String> {
        let port = self.nodes[i].port;
        let sql = sql.to_string();
        let run = async move {
            let (client, conn) = tokio_postgres::connect(
                &format!(
                    "host=127.0.0.1 port={port} user=postgres dbname=postgres connect_timeout=5"
                ),
                NoTls,
            )
            .await
            .map_err(|e| e.to_string())?;
            let conn = tokio::spawn(conn);
            let done = client.batch_execute(&sql).await.map_err(|e| e.to_string());
            drop(client);
            let _ = conn.await;
            done
        };
        tokio::time::timeout(Duration::from_secs(10), run)
            .await
            .unwrap_or_else(|_| Err(format!("{} gave no answer in 10 s", self.nodes[i].addr())))
    }

    fn start_bulkhead(&mut self, options: &Options) -> Result<(), String> {
        let config = format!(
            "# Written by bulkhead demo.\n\
             [listen]\naddress = \"127.0.0.1:{port}\"\n\n\
             [listen_readonly]\naddress = \"127.0.0.1:{ro}\"\n\n\
             [health]\naddress = \"{health}\"\nshow_statements = true\n\n\
             [database]\nhosts = [\"{a}\", \"{b}\"]\n",
            port = options.port,
            ro = options.port.wrapping_add(1),
            health = self.health,
            a = self.nodes[0].addr(),
            b = self.nodes[1].addr(),
        );
        let path = self.dir.join("bulkhead.toml");
        std::fs::write(&path, config)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        let log =
            std::fs::File::create(self.dir.join("bulkhead.log")).map_err(|e| e.to_string())?;
        let exe = std::env::current_exe().map_err(|e| format!("cannot find my own binary: {e}"))?;
        let child = Command::new(exe)
            .arg("--config")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start bulkhead: {e}"))?;
        self.bulkhead = Some(child);
        Ok(())
    }

    fn say(&self, what: &str) {
        let t = self.started.elapsed().as_secs();
        println!("[{:02}:{:02}] {what}", t / 60, t % 60);
    }

    /// Waits for bulkhead to be ready, tells the user how to use it, then plays the traffic and
    /// the fault until Ctrl-C, SIGTERM or `stop_after`.
    async fn play(
        &mut self,
        options: &Options,
        stop: impl Future<Output = ()>,
    ) -> Result<(), String> {
        // Generous: on a busy two-core machine (a test suite starting servers beside it) the
        // probe's first look at two fresh servers can take a while.
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Some(Ok(Some(status))) = self.bulkhead.as_mut().map(Child::try_wait) {
                return Err(format!(
                    "bulkhead exited ({status}); see {}",
                    self.dir.join("bulkhead.log").display()
                ));
            }
            match crate::http_get::get(&self.health, "/readyz", Duration::from_secs(1), 4096).await
            {
                Ok((s, _)) if s.is_success() => break,
                _ if Instant::now() > deadline => {
                    return Err(format!(
                        "bulkhead not ready within 90 s; see {}",
                        self.dir.join("bulkhead.log").display()
                    ));
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        let (port, ro) = (options.port, options.port.wrapping_add(1));
        println!(
            "\nbulkhead is in front of a primary ({}) and a streaming standby ({}).\n\n\
             \x20 psql \"host=127.0.0.1 port={port} user=postgres dbname=postgres\"   reads and writes, on the primary\n\
             \x20 psql \"host=127.0.0.1 port={ro} user=postgres dbname=postgres\"   reads only, on the standby\n\
             \x20 bulkhead status --health {h} --watch             bulkhead's view, redrawn every second\n\
             \x20 curl http://{h}/health                            also /readyz, /metrics, /sessions\n\n\
             Logs: {dir}/bulkhead.log, pg-a.log, pg-b.log. The servers trust every local login: a demo only.\n\
             {fault}Ctrl-C stops everything and removes {dir}.\n",
            self.nodes[0].addr(),
            self.nodes[1].addr(),
            h = self.health,
            dir = self.dir.display(),
            fault = match options.fault {
                None =>
                    "Try --fault stuck|failover|frozen to watch bulkhead through an incident.\n"
                        .to_string(),
                Some(f) => format!(
                    "The {} fault starts in {} and lasts {}, again and again.\n",
                    format!("{f:?}").to_lowercase(),
                    humantime::format_duration(options.after),
                    humantime::format_duration(options.lasts)
                ),
            },
        );
        let traffic = Arc::new(Traffic::default());
        let mut tasks = Vec::new();
        if !options.no_traffic {
            tasks.push(tokio::spawn(traffic_loop(traffic.clone(), port, true)));
            tasks.push(tokio::spawn(traffic_loop(traffic.clone(), port, false)));
        }
        let stop = async {
            tokio::select! {
                () = stop => {}
                _ = async { match options.stop_after { Some(d) => tokio::time::sleep(d).await, None => std::future::pending().await } } => {}
            }
        };
        tokio::pin!(stop);
        let mut report = tokio::time::interval(Duration::from_secs(5));
        report.tick().await;
        let mut next_fault = options
            .fault
            .map(|_| tokio::time::Instant::now() + options.after);
        let mut faulty = false;
        let result = loop {
            let fault_at = next_fault
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                () = &mut stop => break Ok(()),
                _ = report.tick(), if !options.no_traffic => self.say(&traffic.summary()),
                () = tokio::time::sleep_until(fault_at), if next_fault.is_some() => {
                    let fault = options.fault.expect("scheduled only with a fault");
                    let step = if faulty { self.heal(fault).await } else { self.break_it(fault).await };
                    if let Err(e) = step {
                        break Err(e);
                    }
                    faulty = !faulty;
                    next_fault = Some(tokio::time::Instant::now() + if faulty { options.lasts } else { options.after });
                }
            }
        };
        for t in tasks {
            t.abort();
        }
        result
    }

    async fn break_it(&mut self, fault: Fault) -> Result<(), String> {
        let p = self.primary;
        let primary = self.nodes[p].addr();
        match fault {
            Fault::Stuck => {
                self.psql(
                    p,
                    "ALTER SYSTEM SET synchronous_standby_names = 'nobody_comes'",
                )
                .await?;
                self.psql(p, "SELECT pg_reload_conf()").await?;
                self.say(&format!("FAULT: commits on the primary {primary} now hang (a synchronous standby that never comes). Writes time out, then the circuit opens and they fail fast; reads go on."));
            }
            Fault::Frozen => {
                self.frozen = process_tree(&self.nodes[p].data);
                for &pid in &self.frozen {
                    // SAFETY: kill has no memory-safety preconditions; these are our server's pids.
                    unsafe { libc::kill(pid, libc::SIGSTOP) };
                }
                self.say(&format!("FAULT: every process of the primary {primary} is frozen (SIGSTOP): connections are accepted, nothing is answered. bulkhead's heartbeat calls it not answering within a second; statements for it fail at once (57P03) instead of hanging."));
            }
            Fault::Failover => {
                let n = &self.nodes[p];
                self.server_cmd("pg_ctl", |c| {
                    c.arg("-D")
                        .arg(&n.data)
                        .args(["-w", "-m", "immediate", "stop"]);
                })?;
                let s = 1 - p;
                let sn = &self.nodes[s];
                self.server_cmd("pg_ctl", |c| {
                    c.arg("-D")
                        .arg(&sn.data)
                        .args(["-w", "-t", "60", "promote"]);
                })?;
                self.primary = s;
                self.say(&format!("FAULT: the primary {primary} stopped dead and the standby {} was promoted. bulkhead moves writes there: new connections wait for it (up to [circuit] hold_new_connections), a statement caught on the old primary gets 08006.", sn.addr()));
            }
        }
        Ok(())
    }

    async fn heal(&mut self, fault: Fault) -> Result<(), String> {
        let p = self.primary;
        match fault {
            Fault::Stuck => {
                self.psql(p, "ALTER SYSTEM RESET synchronous_standby_names")
                    .await?;
                self.psql(p, "SELECT pg_reload_conf()").await?;
                self.say(
                    "HEALED: commits go through again; the circuit closes after its trial write.",
                );
            }
            Fault::Frozen => {
                for pid in self.frozen.drain(..) {
                    // SAFETY: as above.
                    unsafe { libc::kill(pid, libc::SIGCONT) };
                }
                self.say("HEALED: the primary runs again; bulkhead sees it answer.");
            }
            Fault::Failover => {
                let old = 1 - p;
                self.base_backup(old, p)?;
                self.start_node(old)?;
                self.say(&format!("HEALED: the old primary is back, as a standby of {} (rebuilt with pg_basebackup).", self.nodes[p].addr()));
            }
        }
        Ok(())
    }

    /// Stops bulkhead and both servers, lets frozen processes go, removes the directory.
    fn tear_down(&mut self) {
        for pid in self.frozen.drain(..) {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGCONT) };
        }
        if let Some(mut child) = self.bulkhead.take() {
            // SAFETY: our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let until = Instant::now() + Duration::from_secs(5);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        for n in &self.nodes {
            if n.data.join("postmaster.pid").exists() {
                let _ = self.server_cmd("pg_ctl", |c| {
                    c.arg("-D")
                        .arg(&n.data)
                        .args(["-w", "-m", "immediate", "stop"]);
                });
            }
        }
        match std::fs::remove_dir_all(&self.dir) {
            Ok(()) => println!("bulkhead demo: stopped; removed {}", self.dir.display()),
            Err(e) => eprintln!(
                "bulkhead demo: could not remove {}: {e}",
                self.dir.display()
            ),
        }
    }
}

/// The postmaster of `data` and its children.
fn process_tree(data: &Path) -> Vec<i32> {
    let Some(master) = std::fs::read_to_string(data.join("postmaster.pid"))
        .ok()
        .and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<i32>().ok()))
    else {
        return Vec::new();
    };
    let children = std::fs::read_to_string(format!("/proc/{master}/task/{master}/children"))
        .unwrap_or_default();
    std::iter::once(master)
        .chain(children.split_whitespace().filter_map(|p| p.parse().ok()))
        .collect()
}

/// Counts of the demo traffic since the last summary.
#[derive(Default)]
struct Traffic {
    writes_ok: AtomicU64,
    writes_failed: AtomicU64,
    reads_ok: AtomicU64,
    reads_failed: AtomicU64,
    /// The last failure's SQLSTATE or message.
    last_error: std::sync::Mutex<String>,
}

impl Traffic {
    fn summary(&self) -> String {
        let take = |a: &AtomicU64| a.swap(0, Ordering::Relaxed);
        let (wo, wf, ro, rf) = (
            take(&self.writes_ok),
            take(&self.writes_failed),
            take(&self.reads_ok),
            take(&self.reads_failed),
        );
        let last = std::mem::take(&mut *self.last_error.lock().unwrap_or_else(|e| e.into_inner()));
        let mut s =
            format!("traffic, last 5 s: writes {wo} ok, {wf} failed; reads {ro} ok, {rf} failed");
        if !last.is_empty() {
            s.push_str(&format!(" (last error: {last})"));
        }
        s
    }
}

/// One client through bulkhead: an INSERT (or a SELECT) every 100 ms, reconnecting when its
/// connection is gone, each statement bounded by a minute of its own.
async fn traffic_loop(traffic: Arc<Traffic>, port: u16, writes: bool) {
    let params = format!(
        "host=127.0.0.1 port={port} user=postgres dbname=postgres connect_timeout=5 application_name=demo-{}",
        if writes { "writer" } else { "reader" }
    );
    let mut client: Option<tokio_postgres::Client> = None;
    loop {
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = match tokio_postgres::connect(&params, NoTls).await {
                Ok((c, conn)) => {
                    tokio::spawn(conn);
                    Some(c)
                }
                Err(e) => {
                    failed(&traffic, writes, &e);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
        }
        let c = client.as_ref().expect("connected above");
        let sql = if writes {
            "INSERT INTO demo_writes DEFAULT VALUES"
        } else {
            "SELECT count(*) FROM demo_writes"
        };
        match tokio::time::timeout(Duration::from_secs(60), c.batch_execute(sql)).await {
            Ok(Ok(())) => {
                let ok = if writes {
                    &traffic.writes_ok
                } else {
                    &traffic.reads_ok
                };
                ok.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Err(e)) => failed(&traffic, writes, &e),
            Err(_) => {
                *traffic.last_error.lock().unwrap_or_else(|e| e.into_inner()) =
                    "no answer in 60 s".into();
                client = None;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn failed(traffic: &Traffic, writes: bool, e: &tokio_postgres::Error) {
    let n = if writes {
        &traffic.writes_failed
    } else {
        &traffic.reads_failed
    };
    n.fetch_add(1, Ordering::Relaxed);
    let why = match e.as_db_error() {
        Some(db) => format!("{} {}", db.code().code(), db.message()),
        None => e.to_string(),
    };
    *traffic.last_error.lock().unwrap_or_else(|e| e.into_inner()) = why;
}
