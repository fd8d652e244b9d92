//! The prober: one task per host, on its own connections, never through the data path.
//!
//! Every [probe] interval a status check asks the host whether it is in recovery, on which
//! timeline and how far behind, on a connection kept open (shared with the heartbeat); on a
//! primary, a write check writes WAL and commits (`pg_logical_emit_message(true, …)`), so a
//! commit path that hangs while reads work (a synchronous standby that is gone, a full disk) is
//! caught, and it fails on a primary that has been made read-only. At most one write check per
//! host is outstanding: a stuck one is cancelled and not followed by another until it ends.
//!
//! The probe costs the server only what traffic has not already shown (issue 22): no write
//! check while sessions confirm commits on a closed circuit, and a new connection (a fork and
//! a login) only every [probe] new_session_interval unless a session logged in there, or at
//! once when something looks wrong. What the checks find goes to the [`Topology`], which picks
//! the primary (see `topology`); with Patroni, its leader decides (see `patroni`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

use crate::Shared;
use crate::breaker::{Settings, State, Success};
use crate::config::{Config, Discovery};
use crate::upstream::{self, ConnectError};

pub mod patroni;
mod topology;

pub use topology::{
    HostInfo, PatroniMember, PatroniView, Primary, Report, Role, TlsState, Topology,
};

/// Starts one probe task per host; they run until aborted.
pub(crate) fn spawn(shared: &Arc<Shared>) -> Vec<JoinHandle<()>> {
    let config = shared.live.get();
    let mut tasks: Vec<JoinHandle<()>> = (0..config.database.hosts.len())
        .map(|index| tokio::spawn(probe_host(shared.clone(), config.clone(), index)))
        .collect();
    if config.database.discovery == Discovery::Patroni {
        tasks.push(tokio::spawn(patroni::follow(shared.clone())));
    }
    tasks
}

/// A write check in progress.
struct WriteCheck {
    started: Instant,
    task: JoinHandle<(Option<Conn>, Verdict)>,
    cancel: Option<(tokio_postgres::CancelToken, SocketAddr)>,
    /// Counted as failed already; its eventual result no longer matters.
    timed_out: bool,
}

/// What a write check found.
enum Verdict {
    Committed,
    Failed(String),
    /// No connection could be had because the server is full: nothing learned.
    Unknown,
}

/// One of the probe's connections: the client, the address it reached, and whether it is
/// TLS.
struct Conn {
    client: Client,
    addr: SocketAddr,
    tls: bool,
}

/// Why a probe connection could not be had.
enum ProbeError {
    Down(String),
    /// No answer at all while connecting.
    Silent(String),
    Tls(String),
    /// No room for a connection: the server answered 53300 (it is up and at
    /// max_connections), or bulkhead is out of file descriptors. Nothing learned of the host.
    Full(String),
}

impl ProbeError {
    fn into_report(self) -> Report {
        match self {
            ProbeError::Down(why) => Report::Down(why),
            ProbeError::Silent(why) => Report::Silent(why),
            ProbeError::Tls(why) => Report::TlsFailed(why),
            ProbeError::Full(why) => Report::Full(why),
        }
    }

    fn into_string(self) -> String {
        match self {
            ProbeError::Down(why)
            | ProbeError::Silent(why)
            | ProbeError::Tls(why)
            | ProbeError::Full(why) => why,
        }
    }
}

/// Where and how the probe connects to its host.
#[derive(Clone)]
struct Dial {
    shared: Arc<Shared>,
    address: String,
    params: tokio_postgres::Config,
    within: Duration,
}

impl Dial {
    /// A new connection, with TLS exactly as sessions get it.
    async fn connect(&self) -> Result<Conn, ProbeError> {
        let (stream, addr) = upstream::connect(&self.address, self.within, &self.shared.tls.get())
            .await
            .map_err(|e| match e {
                ConnectError::Unreachable(why) => ProbeError::Down(why),
                ConnectError::NoAnswer(why) => ProbeError::Silent(why),
                ConnectError::Tls(why) => ProbeError::Tls(why),
                // bulkhead's own shortage says nothing about the host: keep its role.
                ConnectError::NoDescriptors(why) => {
                    ProbeError::Full(format!("bulkhead is out of file descriptors: {why}"))
                }
            })?;
        let tls = stream.is_tls();
        let (client, connection) = self.params.connect_raw(stream, NoTls).await.map_err(|e| {
            if e.code() == Some(&tokio_postgres::error::SqlState::TOO_MANY_CONNECTIONS) {
                ProbeError::Full(describe(&e))
            } else {
                ProbeError::Down(describe(&e))
            }
        })?;
        tokio::spawn(connection);
        Ok(Conn { client, addr, tls })
    }
}

/// What woke a host's probe task.
enum Wake {
    Tick,
    /// Something looks wrong (a session lost its connection to the host, the heartbeat's
    /// connection was lost, Patroni changed its mind): look now, through a new connection.
    Look,
    /// The write check in progress reached its timeout (or, timed out already, the point
    /// where it is abandoned).
    CheckDue,
    CheckDone(Box<Result<(Option<Conn>, Verdict), tokio::task::JoinError>>),
}

async fn probe_host(shared: Arc<Shared>, config: Arc<Config>, index: usize) {
    let address = config.database.hosts[index].clone();
    let dial = Dial {
        shared: shared.clone(),
        params: connection_config(&config),
        address,
        within: config.database.connect_timeout,
    };
    let host = HostLink {
        beat: LastBeat::new(),
        kept: Kept::default(),
    };
    tokio::join!(
        check_host(&shared, &config, &dial, index, &host),
        heartbeat(&shared, &config, index, &host)
    );
}

/// What a host's status checks and its heartbeat share.
struct HostLink {
    beat: LastBeat,
    kept: Kept,
}

/// The connection kept open to a host for its status checks and its heartbeat. A status check
/// on a new connection makes it; it is dropped when a check or a beat on it fails, and the
/// next status check, at once, goes through a new connection again.
#[derive(Default)]
struct Kept(std::sync::Mutex<Option<Arc<Conn>>>);

impl Kept {
    /// The kept connection, if there is one still open.
    fn get(&self) -> Option<Arc<Conn>> {
        let mut kept = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if kept.as_ref().is_some_and(|c| c.client.is_closed()) {
            *kept = None;
        }
        kept.clone()
    }

    /// Keeps `conn`, a new connection that just answered a status check, instead of the one
    /// kept so far (which may be the reason a new one was needed: a beat stuck on one backend
    /// is let go, see `heartbeat`).
    fn replace(&self, conn: Conn) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(conn));
    }

    /// Whether another connection than `conn` is kept now: a new one that answered a status
    /// check. (Merely dropped, because a check on it got no answer, is not replaced.)
    fn replaced(&self, conn: &Arc<Conn>) -> bool {
        let kept = self.0.lock().unwrap_or_else(|e| e.into_inner());
        kept.as_ref().is_some_and(|c| !Arc::ptr_eq(c, conn))
    }

    /// Drops the kept connection if it is still `conn`.
    fn drop_if(&self, conn: &Arc<Conn>) {
        let mut kept = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if kept.as_ref().is_some_and(|c| Arc::ptr_eq(c, conn)) {
            *kept = None;
        }
    }
}

/// When a host's heartbeat last got an answer, for its status checks.
struct LastBeat {
    origin: Instant,
    /// Milliseconds from `origin`; `u64::MAX` before the first answer.
    at_ms: AtomicU64,
}

impl LastBeat {
    fn new() -> Self {
        LastBeat {
            origin: Instant::now(),
            at_ms: AtomicU64::new(u64::MAX),
        }
    }

    fn answered(&self) {
        let ms = self.origin.elapsed().as_millis() as u64;
        self.at_ms.store(ms, Ordering::Relaxed);
    }

    /// Whether the last answer came within `window`.
    fn within(&self, window: Duration) -> bool {
        let at = self.at_ms.load(Ordering::Relaxed);
        at != u64::MAX
            && (self.origin.elapsed().as_millis() as u64)
                <= at.saturating_add(window.as_millis() as u64)
    }
}

/// Every [probe] heartbeat, an empty query on the connection kept open to the host while it
/// is up. One unanswered for [probe] heartbeat_timeout marks the host not answering at once
/// (a frozen server, a blackholed network), well before two status checks on new
/// connections can; its answer, whenever it comes, clears the mark. A server that is up
/// answers an empty query on an idle backend in well under a millisecond: it forks nothing,
/// takes no lock and writes nothing, so commits stuck on the commit path do not delay it.
/// When the kept connection is lost, the status checks are asked to look at once (a stopped
/// server ends its backends: this is how a stop is seen within a heartbeat). While sessions'
/// requests are being answered there, no beat is sent: their answers say the same.
async fn heartbeat(shared: &Shared, config: &Config, index: usize, link: &HostLink) {
    let every = config.probe.heartbeat;
    if every.is_zero() {
        return;
    }
    let within = config.probe.heartbeat_timeout;
    let topology = &shared.topology;
    let circuit = topology.circuit(index);
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut had = false;
    // The last tick sent no beat because sessions' requests were being answered.
    let mut skipped = false;
    loop {
        ticks.tick().await;
        // Only a host that is up has a heartbeat; the status checks speak for the others.
        if !topology.is_up(index) {
            circuit.set_beat_silent(false);
            continue;
        }
        let Some(c) = link.kept.get() else {
            if std::mem::take(&mut had) {
                topology.look_now(index);
            }
            continue;
        };
        had = true;
        if circuit.answered_within(every) {
            // A session's request was answered there within the period: the host is not
            // frozen, and the beat would only add a query.
            skipped = true;
            continue;
        }
        // After beats skipped for sessions' answers, the silence is counted from the last of
        // them (but the beat gets at least half its timeout): a host that froze just after
        // answering is found as soon as when every beat was sent.
        let mut wait = within;
        if std::mem::take(&mut skipped)
            && let Some(ago) = circuit.answered_ago()
        {
            // (10 ms past the timeout, so that the last answer is older than it by then.)
            wait = (within.saturating_sub(ago) + Duration::from_millis(10)).max(within / 2);
        }
        let answered = {
            let beat = c.client.simple_query("");
            tokio::pin!(beat);
            loop {
                let waited = tokio::time::timeout(wait, &mut beat).await;
                wait = within;
                match waited {
                    Ok(result) => break Some(result.is_ok()),
                    // A status check replaced the connection: it found the host answering on
                    // a new one (one stuck backend is not a frozen host). The beat is let go.
                    Err(_) if link.kept.replaced(&c) => break None,
                    Err(_) => {
                        // Silent for `within`, looked at again every `within` until the answer
                        // (or the connection's end: keepalive and TCP_USER_TIMEOUT close a dead
                        // one) comes. A frozen host answers nobody; a machine too busy to
                        // schedule the heartbeat's backend in time still answers the sessions,
                        // and their answers keep it from counting as not answering.
                        circuit.set_beat_silent(!circuit.answered_within(within));
                    }
                }
            }
        };
        circuit.set_beat_silent(false);
        match answered {
            Some(true) => link.beat.answered(),
            Some(false) => {
                link.kept.drop_if(&c);
                had = false;
                topology.look_now(index);
            }
            None => {}
        }
    }
}

/// A random fraction of `period`: where in its period a probe starts, so that the probes of
/// a fleet started together are spread over the period instead of arriving in lockstep. The
/// period itself is kept exactly, so detection bounds and per-minute costs stay as configured.
fn phase(period: Duration) -> Duration {
    let mut bytes = [0u8; 4];
    let r = match getrandom::fill(&mut bytes) {
        Ok(()) => u32::from_le_bytes(bytes) as f64 / (u32::MAX as f64 + 1.0),
        Err(_) => 0.5,
    };
    period.mul_f64(r)
}

/// The status check every [probe] interval (role, timeline, lag, whether the host answers at
/// all) and the write check.
///
/// What it costs the server is kept to what traffic has not already shown. The status check
/// runs on the kept connection; a new connection (the check that catches a server that no
/// longer starts sessions) is opened only every [probe] new_session_interval unless a session
/// logged in there meanwhile, and at once when something looks wrong: the host is not known
/// up, the kept connection or the heartbeat failed, a session lost its connection, or a
/// write check timed out. The write check is skipped while sessions are confirming commits
/// on a closed circuit. After the first check, at once, the checks keep a random phase.
async fn check_host(
    shared: &Arc<Shared>,
    config: &Config,
    dial: &Dial,
    index: usize,
    link: &HostLink,
) {
    let probe = &config.probe;
    let topology = &shared.topology;
    let circuit = topology.circuit(index);
    let start = Instant::now();
    // The first status check at once; the next at a random point of the first interval.
    let mut next_tick = start;
    let mut next_new_session = start + phase(probe.new_session_interval);
    let mut write_conn: Option<Conn> = None;
    let mut write_used = Instant::now();
    let mut check: Option<WriteCheck> = None;
    // Something looked wrong: the next status check goes through a new connection.
    let mut suspect = false;
    // Status checks in a row that got no answer at all (not a refusal).
    let mut silent = 0u32;
    loop {
        // A check that timed out is given as long again, plus a connect, to end after its
        // cancel; then it is abandoned with its connection (which may be dead).
        let due = check.as_ref().map(|c| {
            if c.timed_out {
                c.started + probe.timeout * 2 + config.database.connect_timeout
            } else {
                c.started + probe.timeout
            }
        });
        let wake = tokio::select! {
            _ = tokio::time::sleep_until(next_tick) => {
                next_tick = if next_tick == start {
                    start + phase(probe.interval)
                } else {
                    // As MissedTickBehavior::Delay: a late tick does not bring a burst.
                    (next_tick + probe.interval).max(Instant::now())
                };
                Wake::Tick
            }
            _ = topology.wake[index].notified() => Wake::Look,
            _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => Wake::CheckDue,
            done = async { (&mut check.as_mut().expect("guarded").task).await }, if check.is_some() => Wake::CheckDone(Box::new(done)),
        };
        let settings = circuit_settings(&shared.live.get());
        match wake {
            Wake::Tick => {}
            Wake::Look => suspect = true,
            Wake::CheckDone(done) => {
                let c = check.take().expect("guarded");
                let (conn, verdict) =
                    (*done).unwrap_or((None, Verdict::Failed("write check panicked".into())));
                write_conn = conn;
                if !c.timed_out {
                    match verdict {
                        Verdict::Unknown => {
                            topology.set_check(index, |h| h.check_since = None);
                        }
                        Verdict::Committed => {
                            topology.set_check(index, |h| {
                                h.check_failing = None;
                                h.check_since = None;
                            });
                            circuit.success(&settings, Success::Check { started: c.started });
                        }
                        Verdict::Failed(e) => {
                            let why = format!("write check failed: {e}");
                            topology.set_check(index, |h| {
                                h.check_failing = Some(why.clone());
                                h.check_since = None;
                            });
                            circuit.failure(&settings, &why);
                        }
                    }
                } else {
                    topology.set_check(index, |h| h.check_since = None);
                }
                continue;
            }
            Wake::CheckDue => {
                let c = check.as_mut().expect("guarded");
                if c.timed_out {
                    // Its cancel did not end it either: the connection is likely dead.
                    c.task.abort();
                    check = None;
                    write_conn = None;
                    topology.set_check(index, |h| h.check_since = None);
                    continue;
                }
                c.timed_out = true;
                let why = format!(
                    "write check did not commit within {}",
                    humantime::format_duration(probe.timeout)
                );
                topology.set_check(index, |h| h.check_failing = Some(why.clone()));
                circuit.failure(&settings, &why);
                if let Some((token, addr)) = c.cancel.take() {
                    // In plaintext on its own connection, as sessions' cancels go.
                    let within = config.database.connect_timeout + probe.timeout;
                    tokio::spawn(tokio::time::timeout(within, async move {
                        let tcp = tokio::net::TcpStream::connect(addr).await?;
                        token
                            .cancel_query_raw(tcp, NoTls)
                            .await
                            .map_err(std::io::Error::other)
                    }));
                }
                // Is the host still there at all? Look through a new connection, now.
                suspect = true;
            }
        }
        let lost = topology.lost[index].swap(false, Ordering::Relaxed);
        let started = Instant::now();
        let was_up = topology.is_up(index);
        // Proof that the host still starts sessions: a session logged in there lately, or
        // the last new connection of our own.
        if started >= next_new_session
            && topology.logged_in_within(index, probe.new_session_interval)
        {
            next_new_session = started + probe.new_session_interval;
        }
        let new_session =
            suspect || lost || !was_up || circuit.is_beat_silent() || started >= next_new_session;
        suspect = false;
        let on_kept = if new_session {
            None
        } else {
            match link.kept.get() {
                Some(c) => {
                    match tokio::time::timeout(probe.heartbeat_timeout, status_on(&c)).await {
                        Ok(Ok(report)) => Some(report),
                        // It failed or did not answer: look again through a new connection.
                        _ => {
                            link.kept.drop_if(&c);
                            None
                        }
                    }
                }
                None => None,
            }
        };
        let report = match on_kept {
            Some(report) => report,
            None => {
                next_new_session = started + probe.new_session_interval;
                // One failed check does not demote a host that was up (one lost SYN under
                // packet loss would make the primary unknown for an interval): ask twice,
                // and believe two in a row.
                let (report, conn) = if was_up {
                    status_twice(dial, probe.timeout, &mut silent).await
                } else {
                    status_within(dial, probe.timeout).await
                };
                if let Some(conn) = conn {
                    link.kept.replace(conn);
                }
                // Until a new connection works again, every check uses one.
                suspect = !matches!(report, Report::Up { .. });
                // A new session got no answer, but the heartbeat's connection answered lately
                // (well after a frozen or cut-off host's heartbeat would have gone silent):
                // the host is slow to start sessions, as on a machine overloaded for a moment,
                // and the sessions it has are answered. It keeps its role; nothing stuck there
                // is answered for it, and the silence is not counted (below).
                let window = probe.heartbeat + probe.heartbeat_timeout;
                match report {
                    Report::Silent(why)
                        if was_up
                            && !circuit.is_beat_silent()
                            && (link.beat.within(window) || circuit.answered_within(window)) =>
                    {
                        Report::Slow(format!(
                            "{why} on a new connection, while the heartbeat's connection answers"
                        ))
                    }
                    report => report,
                }
            }
        };
        let is_primary = matches!(
            report,
            Report::Up {
                in_recovery: false,
                ..
            }
        );
        match &report {
            Report::Up { .. } | Report::Slow(_) => silent = 0,
            Report::Silent(_) => silent += 1,
            _ => {}
        }
        // Twice in a row, so that one slow fork or one lost SYN does not end sessions.
        circuit.set_unresponsive(silent >= 2);
        if lost && let Report::Down(why) | Report::Silent(why) = &report {
            circuit.failure(
                &settings,
                &format!("a server connection was lost and the probe found the host down: {why}"),
            );
        }
        topology.report(index, report, started.elapsed());

        if check.is_some() || !is_primary {
            continue;
        }
        // Sessions' confirmed commits on a closed circuit prove the commit path as well as a
        // write check would: no WAL of ours, and the write check's connection is let go once
        // it has not been needed for a new-session interval.
        if circuit.published() == State::Closed && circuit.committed_within(probe.interval) {
            topology.set_check(index, |h| h.check_failing = None);
            if write_conn.is_some() && write_used.elapsed() >= probe.new_session_interval {
                write_conn = None;
            }
            continue;
        }
        write_used = Instant::now();
        let conn = write_conn.take();
        let cancel = conn.as_ref().map(|c| (c.client.cancel_token(), c.addr));
        let dial = dial.clone();
        let task = tokio::spawn(async move { write_check(conn, &dial).await });
        let started = Instant::now();
        topology.set_check(index, |h| h.check_since = Some(started));
        check = Some(WriteCheck {
            started,
            task,
            cancel,
            timed_out: false,
        });
    }
}

/// A status check on a new connection within `timeout`; no answer at all is `Silent`. The
/// connection, if the check succeeded.
async fn status_within(dial: &Dial, timeout: Duration) -> (Report, Option<Conn>) {
    match tokio::time::timeout(timeout, status(dial)).await {
        Ok(Ok((report, conn))) => (report, Some(conn)),
        Ok(Err(e)) => (e.into_report(), None),
        Err(_) => (
            Report::Silent(format!(
                "no answer within {}",
                humantime::format_duration(timeout)
            )),
            None,
        ),
    }
}

/// A status check of a host that was up, confirmed by a second one when it fails. The second
/// does not wait for the first to time out: if the first has no answer after a quarter of the
/// timeout (a healthy server answers in milliseconds), the second starts beside it, so a
/// frozen host is known after about 1.25 timeouts rather than two. Counts each silent check
/// that did not end in an answer into `silent`; the report is the first good one, else the
/// second's.
async fn status_twice(dial: &Dial, timeout: Duration, silent: &mut u32) -> (Report, Option<Conn>) {
    let first = status_within(dial, timeout);
    tokio::pin!(first);
    let early = tokio::select! {
        report = &mut first => Some(report),
        _ = tokio::time::sleep(timeout / 4) => None,
    };
    let failed = |r: &Report| matches!(r, Report::Down(_) | Report::Silent(_));
    let (first, second) = match early {
        Some(report) if !failed(&report.0) => return report,
        Some(report) => (report, status_within(dial, timeout).await),
        None => tokio::join!(first, status_within(dial, timeout)),
    };
    if !failed(&first.0) {
        return first;
    }
    if matches!(first.0, Report::Silent(_)) {
        *silent += 1;
    }
    second
}

/// In recovery, and on which timeline. A primary's timeline is read from the WAL it writes
/// now: `pg_control_checkpoint()` keeps the old timeline on a promoted server until its first
/// checkpoint after promotion completes, which on a busy server takes minutes, and an old
/// primary restarted meanwhile would tie with it. (A standby's timeline decides nothing.)
///
/// A standby's replay lag, in seconds: none while it has replayed all it received; else how
/// long ago the last transaction it replayed committed on the primary (the usual measure: it
/// grows while replay is paused or slow and WAL keeps coming, as the probe's own write checks
/// make it come every interval).
const STATUS: &str = "SELECT pg_is_in_recovery(), CASE WHEN pg_is_in_recovery() \
                      THEN (SELECT timeline_id::int8 FROM pg_control_checkpoint()) \
                      ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int8 END, \
                      CASE WHEN NOT pg_is_in_recovery() THEN NULL \
                      WHEN pg_last_wal_receive_lsn() IS NOT DISTINCT FROM pg_last_wal_replay_lsn() THEN 0::float8 \
                      ELSE coalesce(extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8, 0) END";

/// A status check on a new connection: what matters then is whether a new session can be had
/// (a server whose postmaster is stopped still serves the backends it already has).
async fn status(dial: &Dial) -> Result<(Report, Conn), ProbeError> {
    let conn = dial.connect().await?;
    let report = status_on(&conn)
        .await
        .map_err(|e| ProbeError::Down(describe(&e)))?;
    Ok((report, conn))
}

/// Reachable? In recovery? Which timeline? How far behind? On connection `conn`.
async fn status_on(conn: &Conn) -> Result<Report, tokio_postgres::Error> {
    let row = conn.client.query_one(STATUS, &[]).await?;
    let lag = row.try_get::<_, Option<f64>>(2).ok().flatten();
    Ok(Report::Up {
        in_recovery: row.get(0),
        timeline: row.try_get::<_, Option<i64>>(1).ok().flatten().unwrap_or(0),
        tls: conn.tls,
        lag: lag.map(|secs| Duration::from_secs_f64(secs.clamp(0.0, 1e9))),
    })
}

/// The write check's statement. The WHERE clause makes it write nothing and return no row on
/// a server that is up and not in recovery but takes no writes (`default_transaction_read_only`
/// on, as some managed services set it when storage runs out): there every application write fails
/// with 25006, so the check must fail too, or it would close the circuit those failures opened.
const WRITE_CHECK: &str = "SELECT pg_logical_emit_message(true, 'bulkhead', 'probe') \
                           WHERE current_setting('transaction_read_only') = 'off'";

/// A write that must reach WAL and commit: it waits for synchronous replication like any
/// application commit, needs no table and no superuser, and fails on a standby and on a
/// read-only primary.
async fn write_check(conn: Option<Conn>, dial: &Dial) -> (Option<Conn>, Verdict) {
    let conn = match conn {
        Some(c) if !c.client.is_closed() => c,
        _ => match dial.connect().await {
            Ok(c) => c,
            // A full server says nothing about its commit path.
            Err(ProbeError::Full(_)) => return (None, Verdict::Unknown),
            Err(e) => return (None, Verdict::Failed(e.into_string())),
        },
    };
    let result = match conn.client.simple_query(WRITE_CHECK).await {
        Ok(messages)
            if messages
                .iter()
                .any(|m| matches!(m, SimpleQueryMessage::Row(_))) =>
        {
            Verdict::Committed
        }
        Ok(_) => Verdict::Failed(
            "the server takes no writes: transaction_read_only is on \
             (default_transaction_read_only, for the server or the probe's user)"
                .to_string(),
        ),
        Err(e) => Verdict::Failed(describe(&e)),
    };
    (Some(conn), result)
}

/// A tokio-postgres error with what the server said, which its Display leaves out.
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} {}: {}", db.severity(), db.code().code(), db.message()),
        None => match std::error::Error::source(e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        },
    }
}

/// Login settings for the probe; the connection itself is made by [`upstream::connect`].
fn connection_config(config: &Config) -> tokio_postgres::Config {
    let mut params = tokio_postgres::Config::new();
    params
        .user(&config.probe.user)
        .dbname(&config.probe.database)
        .application_name("bulkhead probe")
        .ssl_mode(tokio_postgres::config::SslMode::Disable);
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
