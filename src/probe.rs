//! The prober and the topology it publishes.
//!
//! One task per host checks it every [probe] interval on its own connections, never through
//! the data path: is it reachable, is it a primary or a standby, on which timeline, and — on a
//! primary — does a write commit within [probe] timeout? The write check writes WAL and commits
//! (`pg_logical_emit_message(true, …)`), so a commit path that hangs while reads work (a
//! synchronous standby that is gone, a full disk) is caught. At most one write check per host is
//! outstanding: a stuck one is cancelled and not followed by another until it ends.
//!
//! From the hosts' reports the topology picks the writable primary: among hosts that say they
//! are primary and have not been superseded, the highest timeline wins. A primary seen beside
//! one on a higher timeline is superseded and gets no writes again until it reports as a
//! standby. Sessions learn the primary from a watch channel, read only when they connect and
//! when it changes.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_postgres::{Client, NoTls};
use tracing::{info, warn};

use crate::Shared;
use crate::breaker::{Circuit, Settings};
use crate::config::Config;
use crate::metrics::Metrics;

/// What a host was at its last probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Not probed yet.
    Unknown,
    Primary,
    Standby,
    Unreachable,
}

impl Role {
    pub fn label(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Standby => "standby",
            Role::Unknown | Role::Unreachable => "unreachable",
        }
    }
}

/// One host as the probe last saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostInfo {
    pub address: String,
    pub role: Role,
    pub timeline: i64,
    pub last_probe: Option<Instant>,
    /// It claimed to be primary beside a primary on a higher timeline: no writes until it
    /// comes back as a standby.
    pub superseded: bool,
    /// Why the last probe failed, if it did.
    pub error: Option<String>,
}

/// The writable primary sessions should use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Primary {
    pub index: usize,
    pub address: String,
}

/// What one probe of a host found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    Up { in_recovery: bool, timeline: i64 },
    Down(String),
}

/// Every host's state, the primary chosen from them, and each host's write circuit.
pub struct Topology {
    hosts: Mutex<Vec<HostInfo>>,
    /// The last host that was the writable primary, so a failover that passes through "no
    /// primary" (as real ones do) is still counted.
    last_primary: Mutex<Option<usize>>,
    circuits: Vec<Circuit>,
    primary: watch::Sender<Option<Primary>>,
    failovers: Counter,
    up: Vec<[Gauge; 2]>,
    probe_duration: Vec<Histogram>,
}

impl Topology {
    pub fn new(addresses: &[String], metrics: &Metrics) -> Self {
        let hosts = addresses
            .iter()
            .map(|a| HostInfo {
                address: a.clone(),
                role: Role::Unknown,
                timeline: 0,
                last_probe: None,
                superseded: false,
                error: None,
            })
            .collect();
        let circuits = addresses
            .iter()
            .map(|a| {
                Circuit::new(
                    a.clone(),
                    metrics.gauge("bulkhead_circuit_state", &[("backend", a)]),
                )
            })
            .collect();
        let up = addresses
            .iter()
            .map(|a| {
                ["primary", "standby"].map(|role| {
                    metrics.gauge("bulkhead_backend_up", &[("backend", a), ("role", role)])
                })
            })
            .collect();
        let probe_duration = addresses
            .iter()
            .map(|a| metrics.histogram("bulkhead_probe_duration_seconds", &[("backend", a)]))
            .collect();
        Topology {
            hosts: Mutex::new(hosts),
            last_primary: Mutex::new(None),
            circuits,
            primary: watch::channel(None).0,
            failovers: metrics.counter("bulkhead_failovers_total", &[]),
            up,
            probe_duration,
        }
    }

    /// Follows the primary: its current value and every change.
    pub fn watch_primary(&self) -> watch::Receiver<Option<Primary>> {
        self.primary.subscribe()
    }

    /// The write circuit of host `index`.
    pub fn circuit(&self, index: usize) -> &Circuit {
        &self.circuits[index]
    }

    /// Every host as last probed.
    pub fn hosts(&self) -> Vec<HostInfo> {
        self.hosts.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Records what a probe of host `index` found and chooses the primary again.
    pub fn report(&self, index: usize, report: Report, took: Duration) {
        self.probe_duration[index].record(took.as_secs_f64());
        let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        let host = &mut hosts[index];
        let was = host.role;
        host.last_probe = Some(Instant::now());
        match report {
            Report::Up {
                in_recovery,
                timeline,
            } => {
                host.role = if in_recovery {
                    Role::Standby
                } else {
                    Role::Primary
                };
                host.timeline = timeline;
                host.error = None;
                if in_recovery && host.superseded {
                    info!(backend = %host.address, "superseded host is back as a standby");
                    host.superseded = false;
                }
            }
            Report::Down(why) => {
                if was != Role::Unreachable {
                    warn!(backend = %host.address, %why, "host unreachable");
                }
                host.role = Role::Unreachable;
                host.error = Some(why);
            }
        }
        if was != host.role {
            info!(backend = %host.address, role = host.role.label(), timeline = host.timeline, "host role");
            self.up[index][0].set(if host.role == Role::Primary { 1.0 } else { 0.0 });
            self.up[index][1].set(if host.role == Role::Standby { 1.0 } else { 0.0 });
        }
        self.choose_primary(&mut hosts);
    }

    fn choose_primary(&self, hosts: &mut [HostInfo]) {
        let current = self.primary.borrow().as_ref().map(|p| p.index);
        let best = hosts
            .iter()
            .enumerate()
            .filter(|(_, h)| h.role == Role::Primary && !h.superseded)
            // Highest timeline; on a tie keep the current primary, else the first listed.
            .max_by_key(|(i, h)| (h.timeline, Some(*i) == current, std::cmp::Reverse(*i)))
            .map(|(i, h)| (i, h.timeline));
        if let Some((best_index, best_timeline)) = best {
            for (i, h) in hosts.iter_mut().enumerate() {
                if i != best_index
                    && h.role == Role::Primary
                    && h.timeline < best_timeline
                    && !h.superseded
                {
                    warn!(
                        backend = %h.address, timeline = h.timeline, winner = %hosts_address(best_index, best_timeline),
                        "two primaries: this one is on a lower timeline and gets no writes until it is a standby"
                    );
                    h.superseded = true;
                }
            }
        }
        let next = best.map(|(i, _)| Primary {
            index: i,
            address: hosts[i].address.clone(),
        });
        if next.as_ref().map(|p| p.index) != current {
            let mut last = self.last_primary.lock().unwrap_or_else(|e| e.into_inner());
            match &next {
                Some(p) if last.is_some_and(|l| l != p.index) => {
                    self.failovers.increment(1);
                    warn!(primary = %p.address, "primary changed");
                }
                Some(p) => info!(primary = %p.address, "writable primary found"),
                None => warn!("no writable primary"),
            }
            if let Some(p) = &next {
                *last = Some(p.index);
            }
            self.primary.send_replace(next);
        }
    }
}

fn hosts_address(index: usize, timeline: i64) -> String {
    format!("host #{index} on timeline {timeline}")
}

/// Starts one probe task per host; they run until aborted.
pub(crate) fn spawn(shared: &Arc<Shared>) -> Vec<JoinHandle<()>> {
    let config = shared.live.get();
    (0..config.database.hosts.len())
        .map(|index| tokio::spawn(probe_host(shared.clone(), config.clone(), index)))
        .collect()
}

/// A write check in progress.
struct WriteCheck {
    started: Instant,
    task: JoinHandle<(Option<Client>, Result<(), String>)>,
    cancel: Option<tokio_postgres::CancelToken>,
    /// Counted as failed already; its eventual result no longer matters.
    timed_out: bool,
}

async fn probe_host(shared: Arc<Shared>, config: Arc<Config>, index: usize) {
    let address = config.database.hosts[index].clone();
    let params = connection_config(&config, &address);
    let probe = &config.probe;
    let mut ticks = tokio::time::interval(probe.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut write_conn: Option<Client> = None;
    let mut check: Option<WriteCheck> = None;
    loop {
        ticks.tick().await;
        let settings = circuit_settings(&shared.live.get());
        let started = Instant::now();
        let report = match tokio::time::timeout(probe.timeout, status(&params)).await {
            Ok(Ok((in_recovery, timeline))) => Report::Up {
                in_recovery,
                timeline,
            },
            Ok(Err(e)) => Report::Down(e),
            Err(_) => Report::Down(format!(
                "no answer within {}",
                humantime::format_duration(probe.timeout)
            )),
        };
        let is_primary = matches!(
            report,
            Report::Up {
                in_recovery: false,
                ..
            }
        );
        shared.topology.report(index, report, started.elapsed());
        let circuit = shared.topology.circuit(index);

        // The write check: finish the outstanding one, or start the next.
        if let Some(c) = &mut check {
            if c.task.is_finished() {
                let (conn, result) = (&mut c.task)
                    .await
                    .unwrap_or((None, Err("write check panicked".into())));
                write_conn = conn;
                if !c.timed_out {
                    match result {
                        Ok(()) => circuit.success(&settings, true),
                        Err(e) => circuit.failure(&settings, &format!("write check failed: {e}")),
                    }
                }
                check = None;
            } else if !c.timed_out && c.started.elapsed() >= probe.timeout {
                c.timed_out = true;
                circuit.failure(&settings, "write check did not commit in time");
                if let Some(token) = c.cancel.take() {
                    tokio::spawn(async move { token.cancel_query(NoTls).await });
                }
            }
        }
        if check.is_none() && is_primary {
            let conn = write_conn.take();
            let cancel = conn.as_ref().map(|c| c.cancel_token());
            let params = params.clone();
            let task = tokio::spawn(async move { write_check(conn, &params).await });
            check = Some(WriteCheck {
                started: Instant::now(),
                task,
                cancel,
                timed_out: false,
            });
        }
    }
}

/// Reachable? In recovery? Which timeline? On a fresh connection every time: what matters is
/// whether a new session can be had (a server whose postmaster is stopped still serves the
/// backends it already has).
async fn status(params: &tokio_postgres::Config) -> Result<(bool, i64), String> {
    let client = connect(params).await?;
    let row = client
        .query_one(
            "SELECT pg_is_in_recovery(), (SELECT timeline_id::int8 FROM pg_control_checkpoint())",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok((
        row.get(0),
        row.try_get::<_, Option<i64>>(1).ok().flatten().unwrap_or(0),
    ))
}

/// A write that must reach WAL and commit: it waits for synchronous replication like any
/// application commit, needs no table and no superuser, and fails on a standby.
async fn write_check(
    conn: Option<Client>,
    params: &tokio_postgres::Config,
) -> (Option<Client>, Result<(), String>) {
    let client = match conn {
        Some(c) if !c.is_closed() => c,
        _ => match connect(params).await {
            Ok(c) => c,
            Err(e) => return (None, Err(e)),
        },
    };
    let result = client
        .simple_query("SELECT pg_logical_emit_message(true, 'bulkhead', 'probe')")
        .await
        .map(|_| ())
        .map_err(|e| e.to_string());
    (Some(client), result)
}

async fn connect(params: &tokio_postgres::Config) -> Result<Client, String> {
    let (client, connection) = params.connect(NoTls).await.map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    Ok(client)
}

fn connection_config(config: &Config, address: &str) -> tokio_postgres::Config {
    let (host, port) = address.rsplit_once(':').unwrap_or((address, "5432"));
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let mut params = tokio_postgres::Config::new();
    params
        .host(host)
        .port(port.parse().unwrap_or(5432))
        .user(&config.probe.user)
        .dbname(&config.probe.database)
        .application_name("bulkhead probe")
        .connect_timeout(config.database.connect_timeout);
    if let Ok(password) = std::env::var(&config.probe.password_env) {
        params.password(password);
    }
    params
}

/// The breaker settings in force.
pub(crate) fn circuit_settings(config: &Config) -> Settings {
    Settings {
        failure_threshold: config.circuit.failure_threshold,
        open_for: config.circuit.open_for,
        trial_timeout: config.timeouts.write + config.timeouts.cancel_grace,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topology(n: usize) -> Topology {
        let hosts: Vec<String> = (0..n).map(|i| format!("h{i}:5432")).collect();
        Topology::new(&hosts, &Metrics::new())
    }

    fn chosen(t: &Topology) -> Option<usize> {
        t.watch_primary().borrow().as_ref().map(|p| p.index)
    }

    const MS: Duration = Duration::from_millis(1);

    fn primary(timeline: i64) -> Report {
        Report::Up {
            in_recovery: false,
            timeline,
        }
    }

    fn standby(timeline: i64) -> Report {
        Report::Up {
            in_recovery: true,
            timeline,
        }
    }

    #[tokio::test]
    async fn the_primary_is_found_wherever_it_is_listed() {
        let t = topology(2);
        t.report(0, standby(1), MS);
        assert_eq!(chosen(&t), None);
        t.report(1, primary(1), MS);
        assert_eq!(chosen(&t), Some(1));
    }

    #[tokio::test]
    async fn unreachable_primary_leaves_no_writable_primary() {
        let t = topology(2);
        t.report(0, primary(1), MS);
        t.report(1, standby(1), MS);
        t.report(0, Report::Down("refused".into()), MS);
        assert_eq!(chosen(&t), None);
        assert_eq!(t.hosts()[0].role, Role::Unreachable);
    }

    #[tokio::test]
    async fn higher_timeline_wins_and_the_loser_stays_out_until_it_is_a_standby() {
        let t = topology(2);
        t.report(0, primary(1), MS);
        t.report(1, standby(1), MS);
        // Failover: 0 goes away, 1 is promoted to timeline 2.
        t.report(0, Report::Down("gone".into()), MS);
        t.report(1, primary(2), MS);
        assert_eq!(chosen(&t), Some(1));
        // The old primary comes back, still a primary on the old timeline.
        t.report(0, primary(1), MS);
        assert_eq!(chosen(&t), Some(1));
        assert!(t.hosts()[0].superseded);
        // Even if the new primary becomes unreachable, the superseded one gets no writes.
        t.report(1, Report::Down("gone".into()), MS);
        assert_eq!(chosen(&t), None);
        // Rejoining as a standby clears it.
        t.report(0, standby(2), MS);
        assert!(!t.hosts()[0].superseded);
    }

    #[tokio::test]
    async fn a_failover_is_counted_once() {
        let m = Metrics::new();
        let t = Topology::new(&["a:1".to_string(), "b:1".to_string()], &m);
        t.report(0, primary(1), MS);
        t.report(0, primary(1), MS);
        t.report(1, primary(2), MS);
        t.report(1, primary(2), MS);
        assert!(
            m.render().contains("bulkhead_failovers_total 1"),
            "{}",
            m.render()
        );
    }
}
