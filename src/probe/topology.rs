//! The topology the probes publish: each host's role, timeline and lag, the writable primary
//! chosen from them (with the fencing rule), the standbys that take reads, and one write
//! circuit per host.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::breaker::Circuit;
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
    /// Whether the probe's last connection was encrypted, or could not be.
    pub tls: TlsState,
    /// Why the last write check failed or did not commit in time; `None` once one commits.
    pub check_failing: Option<String>,
    /// When the write check in progress began, if one is.
    pub check_since: Option<Instant>,
    /// A standby's replay lag at the last probe.
    pub lag: Option<Duration>,
    /// Probes in a row that found its lag over max_replica_lag: it stops taking reads at the
    /// second, so that one unlucky reading (WAL received a moment before it is replayed)
    /// does not send its read-only sessions away.
    pub lag_over: u32,
}

/// TLS on the probe's last connection to a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsState {
    /// Not connected yet, or the host was unreachable.
    Unknown,
    On,
    /// Plaintext: [database] tls is "disable", or "prefer" and the server declined.
    Off,
    /// TLS as [database] tls asks could not be set up: see the host's error.
    Failed,
}

impl TlsState {
    pub fn label(self) -> &'static str {
        match self {
            TlsState::Unknown => "unknown",
            TlsState::On => "on",
            TlsState::Off => "off",
            TlsState::Failed => "failed",
        }
    }
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
    Up {
        in_recovery: bool,
        timeline: i64,
        tls: bool,
        /// A standby's replay lag: how long ago the last transaction it replayed committed,
        /// when it has received WAL it has not replayed yet; zero when it has replayed all.
        lag: Option<Duration>,
    },
    Down(String),
    /// No answer at all within the probe's timeout: the host may be frozen or cut off.
    Silent(String),
    /// The server is up but at max_connections (53300): it keeps the role it had, and
    /// sessions get the server's own error. An overload must not look like an outage.
    Full(String),
    /// No answer on a new connection within the timeout, while the heartbeat's connection
    /// answers: the server is slow to start sessions (an overloaded machine, a stopped
    /// postmaster), not gone. It keeps its role, as when full.
    Slow(String),
    /// Reachable, but TLS as configured could not be set up.
    TlsFailed(String),
}

/// Every host's state, the primary chosen from them, and each host's write circuit.
pub struct Topology {
    hosts: Mutex<Vec<HostInfo>>,
    /// The last host that was the writable primary, so a failover that passes through "no
    /// primary" (as real ones do) is still counted.
    last_primary: Mutex<Option<usize>>,
    circuits: Vec<Circuit>,
    /// Per host: a session lost its server connection, so the probe should look now.
    pub(super) wake: Vec<Notify>,
    /// Per host: a lost connection is waiting for the probe's verdict.
    pub(super) lost: Vec<AtomicBool>,
    /// Per host: when a session last logged in there, in milliseconds from `origin`
    /// (`u64::MAX`: never). Proof the host starts sessions, so the probe need not fork one.
    logins: Vec<AtomicU64>,
    origin: Instant,
    /// Since when no writable primary has been known (bulkhead's start, at first).
    no_primary_since: Mutex<Instant>,
    /// The highest timeline any host has claimed as primary since bulkhead started: a primary
    /// on a lower one is an old primary that came back, whatever else is reachable now.
    highest_timeline: AtomicI64,
    /// Two or more hosts claim primary on the highest timeline: why writes do not move.
    conflict: Mutex<Option<String>>,
    /// The host that was primary on the highest timeline, until it is seen as a standby.
    /// Another host claiming primary on that same timeline is a split brain, not a failover
    /// (a promotion always starts a new timeline), even while the holder is unreachable.
    holder: Mutex<Option<usize>>,
    primary: watch::Sender<Option<Primary>>,
    failovers: Counter,
    up: Vec<[Gauge; 2]>,
    probe_duration: Vec<Histogram>,
    lag_gauge: Vec<Gauge>,
    /// The standbys that take read-only sessions (bit per host): up, answering, replay lag
    /// within `max_replica_lag`. Read-only sessions follow it.
    readers: watch::Sender<u64>,
    /// [listen_readonly] max_replica_lag in milliseconds, as configured now.
    max_replica_lag_ms: AtomicU64,
    /// Read-only sessions (and read-only pooled connections) on each host, to spread new
    /// ones.
    reading: Arc<[AtomicU64]>,
    /// What Patroni says, with [database] discovery = "patroni"; `None` otherwise.
    patroni: Mutex<Option<PatroniView>>,
    patroni_gauge: Gauge,
    /// bulkhead_writable_primary.
    primary_gauge: Gauge,
}

/// Patroni's view of the cluster, as last read from its /cluster.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PatroniView {
    /// Patroni answered at the last read: its leader decides the primary.
    pub following: bool,
    /// The API that answered last.
    pub endpoint: Option<String>,
    /// Why the last read failed, if it did.
    pub error: Option<String>,
    /// The index of the host Patroni calls the leader, if there is one and it is listed in
    /// [database] hosts.
    pub leader: Option<usize>,
    pub members: Vec<PatroniMember>,
    pub read_at: Option<Instant>,
}

/// One member of the Patroni cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatroniMember {
    pub name: String,
    /// "leader", "replica", "sync_standby", "standby_leader", …
    pub role: String,
    pub state: String,
    /// `host:port` as Patroni gives it.
    pub address: String,
    pub timeline: Option<i64>,
    /// Bytes behind the leader, as Patroni reports it.
    pub lag: Option<i64>,
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
                tls: TlsState::Unknown,
                check_failing: None,
                check_since: None,
                lag: None,
                lag_over: 0,
            })
            .collect();
        let circuits = addresses
            .iter()
            .map(|a| Circuit::new(a.clone(), metrics))
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
            wake: addresses.iter().map(|_| Notify::new()).collect(),
            lost: addresses.iter().map(|_| AtomicBool::new(false)).collect(),
            logins: addresses.iter().map(|_| AtomicU64::new(u64::MAX)).collect(),
            origin: Instant::now(),
            no_primary_since: Mutex::new(Instant::now()),
            highest_timeline: AtomicI64::new(0),
            conflict: Mutex::new(None),
            holder: Mutex::new(None),
            primary: watch::channel(None).0,
            failovers: metrics.counter("bulkhead_failovers_total", &[]),
            up,
            probe_duration,
            lag_gauge: addresses
                .iter()
                .map(|a| metrics.gauge("bulkhead_backend_replay_lag_seconds", &[("backend", a)]))
                .collect(),
            readers: watch::channel(0).0,
            max_replica_lag_ms: AtomicU64::new(10_000),
            reading: addresses.iter().map(|_| AtomicU64::new(0)).collect(),
            patroni: Mutex::new(None),
            patroni_gauge: metrics.gauge("bulkhead_patroni_following", &[]),
            primary_gauge: {
                let g = metrics.gauge("bulkhead_writable_primary", &[]);
                g.set(0.0);
                g
            },
        }
    }

    /// Takes the primary from Patroni from now on, once it has answered
    /// ([database] discovery = "patroni").
    pub fn follow_patroni(&self) {
        *self.patroni.lock().unwrap_or_else(|e| e.into_inner()) = Some(PatroniView::default());
    }

    /// Patroni's view, if bulkhead follows Patroni.
    pub fn patroni(&self) -> Option<PatroniView> {
        self.patroni
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Patroni answered with `members` (from `endpoint`): its leader, if listed among the
    /// hosts, is the only host that may be the primary. When the leader changes, the probes
    /// of the old and the new leader look at once.
    pub fn patroni_seen(&self, members: Vec<PatroniMember>, endpoint: String) {
        let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        let leader_member = members.iter().find(|m| m.role == "leader");
        let leader = leader_member.and_then(|m| hosts.iter().position(|h| h.address == m.address));
        {
            let mut guard = self.patroni.lock().unwrap_or_else(|e| e.into_inner());
            let Some(view) = guard.as_mut() else {
                return;
            };
            if !view.following {
                info!(%endpoint, "Patroni answers: its leader decides the primary");
            }
            for m in &members {
                if !hosts.iter().any(|h| h.address == m.address)
                    && !view.members.iter().any(|k| k.address == m.address)
                {
                    warn!(member = %m.name, address = %m.address, "Patroni lists a member that is not in [database] hosts: bulkhead will not use it");
                }
            }
            if leader != view.leader || !view.following {
                match (leader_member, leader) {
                    (Some(m), Some(_)) => {
                        info!(leader = %m.name, address = %m.address, "Patroni's leader")
                    }
                    (Some(m), None) => {
                        warn!(leader = %m.name, address = %m.address, "Patroni's leader is not in [database] hosts: no writes")
                    }
                    (None, _) => warn!("Patroni reports no leader: no writes"),
                }
                for i in [view.leader, leader].into_iter().flatten() {
                    self.look_now(i);
                }
            }
            *view = PatroniView {
                following: true,
                endpoint: Some(endpoint),
                error: None,
                leader,
                members,
                read_at: Some(Instant::now()),
            };
        }
        self.patroni_gauge.set(1.0);
        self.choose_primary(&mut hosts);
        self.choose_readers(&hosts);
    }

    /// No Patroni API answered: the probe's own rules decide the primary until one does.
    pub fn patroni_unreachable(&self, why: String) {
        let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        {
            let mut guard = self.patroni.lock().unwrap_or_else(|e| e.into_inner());
            let Some(view) = guard.as_mut() else {
                return;
            };
            if view.following || view.read_at.is_none() && view.error.is_none() {
                warn!(%why, "Patroni does not answer: bulkhead's own probes decide the primary");
            }
            view.following = false;
            view.error = Some(why);
        }
        self.patroni_gauge.set(0.0);
        self.choose_primary(&mut hosts);
        self.choose_readers(&hosts);
    }

    /// While Patroni is followed: the one host that may be the primary, if any. Before its
    /// first answer (or first failure), none: a host Patroni has demoted must not get writes
    /// because bulkhead has just started.
    fn patroni_leader(&self) -> Option<Option<usize>> {
        let guard = self.patroni.lock().unwrap_or_else(|e| e.into_inner());
        let view = guard.as_ref()?;
        if view.read_at.is_none() && view.error.is_none() {
            return Some(None);
        }
        view.following.then_some(view.leader)
    }

    /// Sets [listen_readonly] max_replica_lag (at start and on reload).
    pub fn set_max_replica_lag(&self, max: Duration) {
        self.max_replica_lag_ms
            .store(max.as_millis() as u64, Ordering::Relaxed);
        let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        for h in hosts.iter_mut() {
            if h.lag.is_some_and(|lag| lag <= max) {
                h.lag_over = 0;
            }
        }
        self.choose_readers(&hosts);
    }

    /// Follows the standbys that take read-only sessions (a bit per host).
    pub fn watch_readers(&self) -> watch::Receiver<u64> {
        self.readers.subscribe()
    }

    /// Where a new read-only session goes: the qualifying standby with the fewest read-only
    /// sessions, else the primary; `None` if neither is there. Its address and index.
    pub fn pick_reader(&self) -> Option<(usize, String)> {
        let bits = *self.readers.borrow();
        let hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        let standby = (0..hosts.len())
            .filter(|&i| bits & (1 << i) != 0 && !self.circuits[i].is_unresponsive())
            .min_by_key(|&i| self.reading[i].load(Ordering::Relaxed));
        let chosen = standby.or_else(|| {
            self.primary
                .borrow()
                .as_ref()
                .map(|p| p.index)
                .filter(|&i| !self.circuits[i].is_unresponsive())
        })?;
        Some((chosen, hosts[chosen].address.clone()))
    }

    /// Whether host `index` takes read-only sessions now: a qualifying standby, or the
    /// primary while no standby qualifies.
    pub fn serves_reads(&self, index: usize) -> bool {
        let bits = *self.readers.borrow();
        if bits & (1 << index) != 0 {
            return true;
        }
        bits == 0
            && self
                .primary
                .borrow()
                .as_ref()
                .is_some_and(|p| p.index == index)
    }

    /// The per-host counts of read-only sessions, for the pools that keep their own.
    pub fn reader_counts(&self) -> Arc<[AtomicU64]> {
        self.reading.clone()
    }

    /// Counts a read-only session on host `index` (`started`), or one less.
    pub fn count_reader(&self, index: usize, started: bool) {
        if started {
            self.reading[index].fetch_add(1, Ordering::Relaxed);
        } else {
            self.reading[index].fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The standbys that qualify for reads, published when the set changes: up, answering,
    /// and not found over max_replica_lag twice in a row.
    fn choose_readers(&self, hosts: &[HostInfo]) {
        let bits = hosts
            .iter()
            .enumerate()
            .filter(|(i, h)| {
                *i < 64
                    && h.role == Role::Standby
                    && h.lag.is_some()
                    && h.lag_over < 2
                    && !self.circuits[*i].is_unresponsive()
            })
            .fold(0u64, |bits, (i, _)| bits | (1 << i));
        self.readers.send_if_modified(|now| {
            let changed = *now != bits;
            *now = bits;
            changed
        });
    }

    /// Follows the primary: its current value and every change.
    pub fn watch_primary(&self) -> watch::Receiver<Option<Primary>> {
        self.primary.subscribe()
    }

    /// The write circuit of host `index`.
    pub fn circuit(&self, index: usize) -> &Circuit {
        &self.circuits[index]
    }

    /// A session lost its connection to host `index` without the client having said goodbye.
    /// That alone proves nothing (one backend may have been terminated on a healthy server):
    /// the probe looks at the host now, and counts a write failure only if it finds it down.
    pub fn connection_lost(&self, index: usize) {
        self.lost[index].store(true, Ordering::Relaxed);
        self.wake[index].notify_one();
    }

    /// Asks the probe of host `index` to look at it now, through a new connection.
    pub fn look_now(&self, index: usize) {
        self.wake[index].notify_one();
    }

    /// A session (or a pooled connection) logged in to host `index`: the host starts
    /// sessions. Written at most once per 100 ms, so a storm of logins costs one shared write
    /// per tenth of a second.
    pub fn saw_login(&self, index: usize) {
        let now = self.origin.elapsed().as_millis() as u64;
        let last = self.logins[index].load(Ordering::Relaxed);
        if last == u64::MAX || now >= last + 100 {
            self.logins[index].store(now, Ordering::Relaxed);
        }
    }

    /// Whether a session logged in to host `index` within `window`.
    pub fn logged_in_within(&self, index: usize, window: Duration) -> bool {
        let at = self.logins[index].load(Ordering::Relaxed);
        at != u64::MAX
            && self.origin.elapsed().as_millis() as u64
                <= at.saturating_add(window.as_millis() as u64)
    }

    /// Two or more hosts claim primary on the same, highest timeline: what they are.
    pub fn conflict(&self) -> Option<String> {
        self.conflict
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Since when no writable primary has been known, if none is.
    pub fn no_primary_since(&self) -> Option<Instant> {
        if self.primary.borrow().is_some() {
            return None;
        }
        Some(
            *self
                .no_primary_since
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        )
    }

    pub(super) fn set_check(&self, index: usize, f: impl FnOnce(&mut HostInfo)) {
        f(&mut self.hosts.lock().unwrap_or_else(|e| e.into_inner())[index]);
    }

    /// Every host as last probed.
    pub fn hosts(&self) -> Vec<HostInfo> {
        self.hosts.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether host `index` was last found up (primary or standby), without copying the
    /// table.
    pub fn is_up(&self, index: usize) -> bool {
        let hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        matches!(hosts[index].role, Role::Primary | Role::Standby)
    }

    /// When every host fails TLS as configured, the first one's reason.
    pub fn tls_failure(&self) -> Option<String> {
        let hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        if hosts.iter().all(|h| h.tls == TlsState::Failed) {
            hosts.first().and_then(|h| h.error.clone())
        } else {
            None
        }
    }

    /// The first host's reason for failing TLS, if any host fails it.
    pub fn any_tls_failure(&self) -> Option<String> {
        let hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        hosts
            .iter()
            .find(|h| h.tls == TlsState::Failed)
            .and_then(|h| h.error.clone())
    }

    /// Records what a probe of host `index` found and chooses the primary again.
    pub fn report(&self, index: usize, report: Report, took: Duration) {
        let tls_failed = matches!(report, Report::TlsFailed(_));
        self.probe_duration[index].record(took.as_secs_f64());
        let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        let host = &mut hosts[index];
        let was = host.role;
        host.last_probe = Some(Instant::now());
        match report {
            Report::Up {
                in_recovery,
                timeline,
                tls,
                lag,
            } => {
                host.lag = lag;
                let max = Duration::from_millis(self.max_replica_lag_ms.load(Ordering::Relaxed));
                host.lag_over = match lag {
                    Some(lag) if lag > max => host.lag_over.saturating_add(1),
                    _ => 0,
                };
                self.lag_gauge[index].set(lag.map_or(0.0, |l| l.as_secs_f64()));
                host.tls = if tls { TlsState::On } else { TlsState::Off };
                host.role = if in_recovery {
                    Role::Standby
                } else {
                    Role::Primary
                };
                host.timeline = timeline;
                host.error = None;
                if in_recovery {
                    // A standby gets no write checks: an old verdict would only mislead.
                    host.check_failing = None;
                }
                if in_recovery && host.superseded {
                    info!(backend = %host.address, "superseded host is back as a standby");
                    host.superseded = false;
                }
            }
            Report::Full(why) | Report::Slow(why) => {
                if host.error.as_deref() != Some(why.as_str()) {
                    warn!(backend = %host.address, %why, "host refuses or delays new sessions; it keeps its role");
                }
                host.error = Some(why);
            }
            Report::Down(why) | Report::Silent(why) | Report::TlsFailed(why) => {
                // Said once, and again only when the reason changes.
                if was != Role::Unreachable || host.error.as_deref() != Some(why.as_str()) {
                    if tls_failed {
                        warn!(backend = %host.address, %why, "TLS to host failed");
                    } else {
                        warn!(backend = %host.address, %why, "host unreachable");
                    }
                }
                host.role = Role::Unreachable;
                host.tls = if tls_failed {
                    TlsState::Failed
                } else {
                    TlsState::Unknown
                };
                host.error = Some(why);
            }
        }
        if was != host.role {
            info!(backend = %host.address, role = host.role.label(), timeline = host.timeline, "host role");
            self.up[index][0].set(if host.role == Role::Primary { 1.0 } else { 0.0 });
            self.up[index][1].set(if host.role == Role::Standby { 1.0 } else { 0.0 });
        }
        if host.role != Role::Standby {
            host.lag = None;
            host.lag_over = 0;
        }
        self.choose_primary(&mut hosts);
        self.choose_readers(&hosts);
    }

    /// The fencing rule. A host that claims primary on a lower timeline than the highest any
    /// host has claimed is an old primary and is superseded: no writes until it reports as a
    /// standby, whatever the order of events (it may come back while the new primary misses a
    /// probe). A promotion always starts a new timeline, so two hosts claiming primary on the
    /// same, highest timeline are a split brain nobody can settle from here, even when one of
    /// them is unreachable at the moment: the current primary keeps the writes if it is one of
    /// them, and otherwise none gets them until one becomes a standby. Nothing is chosen before
    /// every host has been probed once, so a start among two such claimants does not guess.
    fn choose_primary(&self, hosts: &mut [HostInfo]) {
        let current = self.primary.borrow().as_ref().map(|p| p.index);
        let claimed = hosts
            .iter()
            .filter(|h| h.role == Role::Primary)
            .map(|h| h.timeline)
            .max()
            .unwrap_or(0);
        let before = self.highest_timeline.fetch_max(claimed, Ordering::Relaxed);
        let top = before.max(claimed);
        let mut holder = self.holder.lock().unwrap_or_else(|e| e.into_inner());
        if top > before {
            *holder = None; // a new timeline: whoever claims it first holds it
        }
        if let Some(h) = *holder
            && hosts[h].role == Role::Standby
        {
            *holder = None;
        }
        for h in hosts.iter_mut() {
            if h.role == Role::Primary && h.timeline < top && !h.superseded {
                warn!(
                    backend = %h.address, timeline = h.timeline, highest = top,
                    "an old primary: a primary on a lower timeline than one seen before; no writes until it is a standby"
                );
                h.superseded = true;
            }
        }
        // While Patroni answers, only its leader may be the primary: it settles who holds
        // the writes, and a host it has demoted gets none, whatever it says of itself.
        let patroni = self.patroni_leader();
        let mut claimants: Vec<usize> = hosts
            .iter()
            .enumerate()
            .filter(|(i, h)| {
                h.role == Role::Primary
                    && !h.superseded
                    && patroni.is_none_or(|leader| leader == Some(*i))
            })
            .map(|(i, _)| i)
            .collect();
        // The holder, unreachable now, still claims its timeline.
        if let Some(h) = *holder
            && patroni.is_none()
            && !claimants.contains(&h)
            && !claimants.is_empty()
        {
            claimants.insert(0, h);
        }
        let all_probed = hosts.iter().all(|h| h.role != Role::Unknown);
        let (best, conflict) = match claimants[..] {
            [] => (None, None),
            _ if !all_probed => (None, None),
            [one] => (Some(one), None),
            _ => {
                let names: Vec<&str> = claimants
                    .iter()
                    .map(|&i| hosts[i].address.as_str())
                    .collect();
                let why = format!(
                    "{} hosts claim primary on timeline {top}: {}",
                    names.len(),
                    names.join(", ")
                );
                match current.filter(|c| claimants.contains(c) && hosts[*c].role == Role::Primary) {
                    Some(c) => (
                        Some(c),
                        Some(format!("{why}; writes stay on {}", hosts[c].address)),
                    ),
                    None => (
                        None,
                        Some(format!(
                            "{why}; writes are refused until one of them is a standby"
                        )),
                    ),
                }
            }
        };
        if holder.is_none()
            && let Some(b) = best
        {
            *holder = Some(b);
        }
        drop(holder);
        {
            let mut known = self.conflict.lock().unwrap_or_else(|e| e.into_inner());
            if *known != conflict {
                if let Some(why) = &conflict {
                    warn!(%why, "split brain");
                }
                *known = conflict;
            }
        }
        let next = best.map(|i| Primary {
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
                None => {
                    warn!("no writable primary");
                    *self
                        .no_primary_since
                        .lock()
                        .unwrap_or_else(|e| e.into_inner()) = Instant::now();
                }
            }
            if let Some(p) = &next {
                *last = Some(p.index);
            }
            self.primary_gauge
                .set(if next.is_some() { 1.0 } else { 0.0 });
            self.primary.send_replace(next);
        }
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
            tls: false,
            lag: None,
        }
    }

    fn standby(timeline: i64) -> Report {
        Report::Up {
            in_recovery: true,
            timeline,
            tls: false,
            lag: Some(Duration::ZERO),
        }
    }

    #[tokio::test]
    async fn reads_go_to_standbys_within_the_lag_bound_and_to_the_primary_when_none_is() {
        let t = topology(3);
        t.set_max_replica_lag(Duration::from_secs(1));
        let lagging = |secs| Report::Up {
            in_recovery: true,
            timeline: 1,
            tls: false,
            lag: Some(Duration::from_secs(secs)),
        };
        t.report(0, primary(1), MS);
        t.report(1, standby(1), MS);
        t.report(2, lagging(5), MS);
        // One reading over the bound is not enough: it may have caught WAL not yet replayed.
        assert_eq!(*t.watch_readers().borrow(), 0b110);
        t.report(2, lagging(5), MS);
        assert_eq!(*t.watch_readers().borrow(), 0b010);
        assert!(t.serves_reads(1) && !t.serves_reads(2) && !t.serves_reads(0));
        assert_eq!(t.pick_reader().map(|(i, _)| i), Some(1));
        // Sessions spread: the next goes where there are fewer.
        t.set_max_replica_lag(Duration::from_secs(10));
        assert_eq!(*t.watch_readers().borrow(), 0b110);
        t.count_reader(1, true);
        assert_eq!(t.pick_reader().map(|(i, _)| i), Some(2));
        // No standby qualifies: the primary.
        t.set_max_replica_lag(Duration::from_millis(1));
        for _ in 0..2 {
            t.report(1, lagging(1), MS);
            t.report(2, lagging(1), MS);
        }
        assert_eq!(*t.watch_readers().borrow(), 0);
        assert!(t.serves_reads(0));
        assert_eq!(t.pick_reader().map(|(i, _)| i), Some(0));
        // Not answering: out, whatever its lag.
        t.set_max_replica_lag(Duration::from_secs(10));
        t.circuit(1).set_unresponsive(true);
        t.report(1, standby(1), MS);
        assert_eq!(*t.watch_readers().borrow(), 0b100);
    }

    #[tokio::test]
    async fn tls_failure_is_reported_only_when_every_host_fails_tls() {
        let t = topology(2);
        assert_eq!(t.tls_failure(), None);
        t.report(0, Report::TlsFailed("bad CA".into()), MS);
        assert_eq!(t.tls_failure(), None, "host 1 not probed yet");
        t.report(1, Report::Down("refused".into()), MS);
        assert_eq!(t.tls_failure(), None, "host 1 may come back");
        assert_eq!(t.any_tls_failure().as_deref(), Some("bad CA"));
        t.report(1, Report::TlsFailed("bad name".into()), MS);
        assert_eq!(t.tls_failure().as_deref(), Some("bad CA"));
        assert_eq!(t.hosts()[0].tls, TlsState::Failed);
        t.report(0, primary(1), MS);
        assert_eq!(t.tls_failure(), None);
        assert_eq!(t.hosts()[0].tls, TlsState::Off);
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

    /// The sequence that wrote to the old primary: primary killed, standby promoted, old
    /// primary restarted as it was, and the new primary misses one probe just then.
    #[tokio::test]
    async fn an_old_primary_back_while_the_new_one_misses_a_probe_gets_no_writes() {
        let t = topology(2);
        t.report(0, primary(1), MS);
        t.report(1, standby(1), MS);
        t.report(0, Report::Down("killed".into()), MS);
        t.report(1, primary(2), MS);
        assert_eq!(chosen(&t), Some(1));
        t.report(1, Report::Silent("no answer".into()), MS);
        t.report(0, primary(1), MS);
        assert_eq!(chosen(&t), None, "never back to the old primary");
        assert!(t.hosts()[0].superseded);
        t.report(1, primary(2), MS);
        assert_eq!(chosen(&t), Some(1));
    }

    #[tokio::test]
    async fn two_primaries_on_one_timeline_keep_writes_where_they_are_or_get_none() {
        // Already on host 0: a second claimant does not move writes.
        let t = topology(2);
        t.report(0, primary(3), MS);
        t.report(1, standby(3), MS);
        t.report(1, primary(3), MS);
        assert_eq!(chosen(&t), Some(0));
        assert!(t.conflict().unwrap().contains("writes stay on h0:5432"));
        // Nor when host 0 misses a probe: that is no promotion (no new timeline).
        t.report(0, Report::Silent("no answer".into()), MS);
        assert_eq!(chosen(&t), None);
        assert!(t.conflict().unwrap().contains("writes are refused"));
        t.report(0, primary(3), MS);
        assert_eq!(
            chosen(&t),
            None,
            "back, but no longer the current primary: no guess"
        );
        // Settled once one of them is a standby.
        t.report(1, standby(3), MS);
        assert_eq!(t.conflict(), None);
        assert_eq!(chosen(&t), Some(0));

        // Starting while two claim primary on the same timeline: no guess.
        let t = topology(2);
        t.report(0, primary(3), MS);
        assert_eq!(chosen(&t), None, "host 1 not probed yet");
        t.report(1, primary(3), MS);
        assert_eq!(chosen(&t), None);
        assert!(
            t.conflict()
                .unwrap()
                .contains("2 hosts claim primary on timeline 3")
        );
        t.report(0, standby(3), MS);
        assert_eq!(chosen(&t), Some(1));
    }

    fn members(leader: Option<usize>, n: usize) -> Vec<PatroniMember> {
        (0..n)
            .map(|i| PatroniMember {
                name: format!("pg{i}"),
                role: if leader == Some(i) {
                    "leader"
                } else {
                    "replica"
                }
                .into(),
                state: "running".into(),
                address: format!("h{i}:5432"),
                timeline: Some(1),
                lag: None,
            })
            .collect()
    }

    #[tokio::test]
    async fn while_patroni_answers_only_its_leader_gets_writes_and_without_it_the_probe_decides() {
        let t = topology(2);
        t.follow_patroni();
        t.report(0, primary(1), MS);
        t.report(1, standby(1), MS);
        // Before Patroni's first answer (or failure), no primary.
        assert_eq!(chosen(&t), None);
        t.patroni_seen(members(Some(0), 2), "api".into());
        assert_eq!(chosen(&t), Some(0));
        // Switchover: Patroni names host 1 while host 0 still says it is a primary. Host 0
        // gets no writes from that moment; host 1 gets them once the probe finds it writable.
        t.patroni_seen(members(Some(1), 2), "api".into());
        assert_eq!(chosen(&t), None);
        t.report(0, primary(1), MS);
        assert_eq!(chosen(&t), None, "demoted by Patroni, whatever it says");
        t.report(1, primary(2), MS);
        assert_eq!(chosen(&t), Some(1));
        // No leader in Patroni (a failover under way): no writes.
        t.patroni_seen(members(None, 2), "api".into());
        assert_eq!(chosen(&t), None);
        // Patroni unreachable: the probe's rules again (host 1 on the highest timeline; host 0
        // is fenced as an old primary).
        t.patroni_unreachable("no answer".into());
        assert_eq!(chosen(&t), Some(1));
        assert!(t.hosts()[0].superseded);
        let v = t.patroni().unwrap();
        assert!(!v.following && v.error.as_deref() == Some("no answer"));
        // A leader that is not among the hosts: no writes.
        let mut stranger = members(None, 2);
        stranger[1].role = "leader".into();
        stranger[1].address = "elsewhere:5432".into();
        t.patroni_seen(stranger, "api".into());
        assert_eq!(chosen(&t), None);
        assert_eq!(t.patroni().unwrap().leader, None);
    }

    #[tokio::test]
    async fn a_failover_is_counted_once() {
        let m = Metrics::new();
        let t = Topology::new(&["a:1".to_string(), "b:1".to_string()], &m);
        t.report(1, standby(1), MS);
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
