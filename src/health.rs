//! The health port: /livez, /readyz, /health and /metrics (DESIGN.md §3.6).
//!
//! It runs on its own OS thread with its own single-threaded runtime, so a data path that is
//! saturated, or a runtime that is stuck, cannot delay it. It reads only what the probe, the
//! circuits and admission publish: no database query per request, and no lock the data path
//! takes on its hot path.
//!
//! Liveness is a watchdog: a heartbeat task on each data-path runtime (the one that accepts,
//! and every worker) stamps the time every 100 ms; /livez answers 503 when any stamp is more
//! than a second old.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::sync::oneshot;
use tracing::{debug, warn};

use crate::breaker::State;
use crate::probe::{HostInfo, PatroniView, Role};
use crate::{Phase, Shared};

/// How often the data-path runtime proves it is alive.
pub const HEARTBEAT_EVERY: Duration = Duration::from_millis(100);

/// A heartbeat older than this makes /livez fail.
pub const HEARTBEAT_STALE: Duration = Duration::from_secs(1);

/// A connection to the health port may take this long in all; a slow client cannot pile up.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

/// The data path's proof of life, one stamp per runtime (the accepting one, then each worker,
/// then each worker's relay loop): milliseconds since `origin` at its last tick (0: none yet).
#[derive(Debug)]
pub struct Heartbeat {
    origin: std::time::Instant,
    workers: usize,
    last_ms: Box<[AtomicU64]>,
}

impl Heartbeat {
    /// For the accepting runtime, `workers` worker runtimes and, with `loops`, their relay
    /// loops.
    pub fn new(workers: usize, loops: bool) -> Self {
        Heartbeat {
            origin: std::time::Instant::now(),
            workers,
            last_ms: (0..=workers * (1 + loops as usize))
                .map(|_| AtomicU64::new(0))
                .collect(),
        }
    }

    /// What stamp `runtime` is, in words.
    fn name(&self, runtime: usize) -> String {
        match runtime {
            0 => "the data-path runtime that accepts connections".into(),
            n if n <= self.workers => format!("the data-path runtime of worker {n}"),
            n => format!("the relay loop of worker {}", n - self.workers),
        }
    }

    fn beat(&self, runtime: usize) {
        let ms = self.origin.elapsed().as_millis() as u64;
        self.last_ms[runtime].store(ms.max(1), Ordering::Relaxed);
    }

    /// The runtime that beat least recently and how long ago, or `None` if one has not beaten
    /// yet.
    fn oldest(&self) -> Option<(usize, Duration)> {
        let (runtime, last) = self
            .last_ms
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .enumerate()
            .min_by_key(|&(_, ms)| ms)?;
        (last > 0).then(|| {
            let age = self
                .origin
                .elapsed()
                .saturating_sub(Duration::from_millis(last));
            (runtime, age)
        })
    }
}

/// Runs on data-path runtime `runtime` (0 accepts; workers from 1): if it cannot run, that
/// runtime is stuck.
pub(crate) async fn heartbeat(shared: Arc<Shared>, runtime: usize) {
    let mut ticks = tokio::time::interval(HEARTBEAT_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        ticks.tick().await;
        shared.heartbeat.beat(runtime);
    }
}

/// The running health server; stops and joins its thread when dropped.
pub struct HealthServer {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for HealthServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Starts the health server on `listener`, on a thread of its own.
pub(crate) fn spawn(
    shared: Arc<Shared>,
    listener: std::net::TcpListener,
) -> io::Result<HealthServer> {
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = oneshot::channel();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let thread = std::thread::Builder::new()
        .name("bulkhead-health".into())
        .spawn(move || {
            runtime.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => return warn!(error = %e, "health port unusable"),
                };
                tokio::pin!(stopped);
                // Its own reserve descriptor, so that the health port answers even when the data
                // path has used up every one; and a cap on connections, so that idle ones to it
                // cannot use them up.
                let reserve = crate::fds::Reserve::new();
                let open = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
                tokio::spawn(publish_readiness(shared.clone()));
                loop {
                    let accepted = tokio::select! {
                        _ = &mut stopped => return,
                        accepted = listener.accept() => accepted,
                    };
                    let accepted = match accepted {
                        Err(e) if crate::fds::exhausted(&e) && reserve.release() => {
                            let again = listener.accept().await;
                            if again.is_err() {
                                reserve.restore();
                            }
                            again.map(|(stream, peer)| (stream, peer, Some(reserve.clone())))
                        }
                        other => other.map(|(stream, peer)| (stream, peer, None)),
                    };
                    match accepted {
                        Ok((stream, _, on_reserve)) => {
                            let Ok(permit) = open.clone().try_acquire_owned() else {
                                // At the cap: closed at once, its descriptor freed.
                                drop(stream);
                                continue;
                            };
                            let shared = shared.clone();
                            tokio::spawn(async move {
                                let _permit = permit;
                                let service = hyper::service::service_fn(move |req| {
                                    let answer = respond(&shared, &req);
                                    async move { Ok::<_, Infallible>(answer) }
                                });
                                let conn = hyper::server::conn::http1::Builder::new()
                                    .serve_connection(TokioIo::new(stream), service);
                                if let Ok(Err(e)) =
                                    tokio::time::timeout(CONNECTION_TIMEOUT, conn).await
                                {
                                    debug!(error = %e, "health connection");
                                }
                                if let Some(reserve) = on_reserve {
                                    reserve.restore();
                                }
                            });
                        }
                        Err(e) => {
                            warn!(error = %e, "health accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            })
        })?;
    Ok(HealthServer {
        addr,
        stop: Some(stop),
        thread: Some(thread),
    })
}

/// Health-port connections open at once; beyond this a new one is closed at once.
const MAX_CONNECTIONS: usize = 64;

fn respond(shared: &Shared, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET is served here\n".into(),
        );
        r.headers_mut().insert(
            hyper::header::ALLOW,
            "GET, HEAD".parse().expect("static header"),
        );
        return r;
    }
    match req.uri().path() {
        "/livez" => match livez(shared) {
            Ok(()) => text(StatusCode::OK, "ok\n".into()),
            Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
        },
        "/readyz" => match report(shared).not_ready {
            None => text(StatusCode::OK, "ready\n".into()),
            Some(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
        },
        "/health" => json(report(shared).json),
        "/sessions" if shared.sessions.enabled() => {
            json(shared.sessions.report(&shared.live.get().database.hosts))
        }
        "/metrics" => {
            let mut r = Response::new(Full::new(Bytes::from(shared.metrics.render())));
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8"
                    .parse()
                    .expect("static header"),
            );
            r
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /livez, /readyz, /health, /metrics or /sessions\n".into(),
        ),
    }
}

fn json(body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        "application/json".parse().expect("static header"),
    );
    r
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        "text/plain; charset=utf-8".parse().expect("static header"),
    );
    r
}

/// Alive while the data-path runtime runs its heartbeat. Never asks the database.
fn livez(shared: &Shared) -> Result<(), String> {
    match shared.heartbeat.oldest() {
        None => Err("the data path has not started".into()),
        Some((runtime, age)) if age > HEARTBEAT_STALE => Err(format!(
            "{} has not run its heartbeat for {} ms",
            shared.heartbeat.name(runtime),
            age.as_millis()
        )),
        Some(_) => Ok(()),
    }
}

struct Report {
    /// Why /readyz says no, if it does.
    not_ready: Option<String>,
    json: serde_json::Value,
}

/// Readiness and the /health document, from what the probe and circuits have published.
/// Why the host's commit path looks stuck to the probe, if it does: its last write check
/// failed or timed out, or the one in progress has not committed within the probe's timeout.
fn write_check_problem(h: &HostInfo, timeout: Duration) -> Option<String> {
    if let Some(why) = &h.check_failing {
        return Some(why.clone());
    }
    let since = h.check_since?;
    let waited = since.elapsed();
    (waited >= timeout).then(|| {
        format!(
            "the write check has not committed for {}",
            humantime::format_duration(Duration::from_millis(waited.as_millis() as u64))
        )
    })
}

fn report(shared: &Shared) -> Report {
    let config = shared.live.get();
    let stale_after = config.probe.interval * 3;
    let hosts = shared.topology.hosts();
    let primary = shared.topology.watch_primary().borrow().clone();
    let draining = *shared.phase.borrow() != Phase::Running;
    let backends: Vec<_> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let circuit = shared.topology.circuit(i);
            let state = circuit.published();
            let role = match h.role {
                Role::Primary if h.superseded => "superseded",
                r => r.label(),
            };
            json!({
                "address": h.address,
                "role": role,
                "circuit": state.label(),
                "circuit_reason": (state != State::Closed).then(|| circuit.reason()),
                "last_probe_age_ms": h.last_probe.map(|t| t.elapsed().as_millis() as u64),
                "timeline": h.timeline,
                "tls": h.tls.label(),
                "error": h.error,
                "write_check": write_check_problem(h, config.probe.timeout),
                "answering": !circuit.is_unresponsive(),
                "replay_lag_ms": h.lag.map(|l| l.as_millis() as u64),
                "takes_reads": shared.topology.serves_reads(i),
            })
        })
        .collect();
    let conflict = shared.topology.conflict();
    let patroni = shared.topology.patroni();
    let not_ready = match &primary {
        _ if draining => Some("bulkhead is draining".to_string()),
        None => Some(
            match (&conflict, patroni.as_ref().filter(|v| v.following)) {
                (_, Some(v)) => match v.members.iter().find(|m| m.role == "leader") {
                    None => "no writable primary: Patroni reports no leader".to_string(),
                    Some(m) if v.leader.is_none() => format!(
                        "no writable primary: Patroni's leader {} is not in [database] hosts",
                        m.address
                    ),
                    Some(m) => format!(
                        "no writable primary: Patroni's leader {} is not writable to the probe yet",
                        m.address
                    ),
                },
                (Some(why), None) => format!("no writable primary: {why}"),
                (None, None) => "no writable primary is known".to_string(),
            },
        ),
        Some(p) => {
            let circuit = shared.topology.circuit(p.index).published();
            let age = hosts[p.index].last_probe.map(|t| t.elapsed());
            if circuit != State::Closed {
                Some(format!(
                    "the write circuit of {} is {}",
                    p.address,
                    circuit.label()
                ))
            } else if let host = shared.topology.circuit(p.index)
                && host.is_unresponsive()
            {
                Some(host.reason_unresponsive())
            } else if let Some(why) = write_check_problem(&hosts[p.index], config.probe.timeout) {
                // Commits are stalling even if no client has waited out its deadline yet.
                Some(format!("{}: {why}", p.address))
            } else if age.is_none_or(|a| a > stale_after) {
                Some(format!(
                    "the last probe of {} is older than three intervals",
                    p.address
                ))
            } else {
                None
            }
        }
    };
    let some_unreachable = hosts
        .iter()
        .any(|h| h.role != Role::Primary && h.role != Role::Standby);
    let status = match (&primary, &not_ready) {
        (None, _) => "down",
        (Some(_), Some(_)) => "degraded",
        (Some(_), None) if some_unreachable || conflict.is_some() => "degraded",
        (Some(_), None) => "ok",
    };
    let json = json!({
        "status": status,
        "ready": not_ready.is_none(),
        "reason": not_ready,
        "draining": draining,
        "primary": primary.as_ref().map(|p| p.address.clone()),
        "conflict": conflict,
        "backends": backends,
        "clients": shared.admission.clients(),
        "inflight": shared.admission.all.held(),
        "inflight_writes": shared.admission.writes.held(),
        "discovery": discovery(patroni.as_ref(), &hosts),
        "pool_mode": config_mode(shared),
        "pools": shared.pools.info(),
    });
    Report { not_ready, json }
}

/// Where roles come from: the probe alone, or Patroni (and whether it answers).
fn discovery(patroni: Option<&PatroniView>, hosts: &[HostInfo]) -> serde_json::Value {
    let Some(v) = patroni else {
        return json!({ "source": "probe" });
    };
    let members: Vec<_> = v
        .members
        .iter()
        .map(|m| {
            json!({
                "name": m.name,
                "role": m.role,
                "state": m.state,
                "address": m.address,
                "timeline": m.timeline,
                "lag_bytes": m.lag,
                "listed": hosts.iter().any(|h| h.address == m.address),
            })
        })
        .collect();
    json!({
        "source": "patroni",
        "following": v.following,
        "decided_by": if v.following { "patroni" } else { "probe (Patroni does not answer)" },
        "endpoint": v.endpoint,
        "error": v.error,
        "leader": v.leader.map(|i| hosts[i].address.clone()),
        "read_age_ms": v.read_at.map(|t| t.elapsed().as_millis() as u64),
        "members": members,
    })
}

/// Readiness as a metric, for alerts (a scrape every 15 s or more would miss most flaps
/// of /readyz): `bulkhead_ready` and `bulkhead_readiness_changes_total`, worked out as /readyz
/// does, every `READINESS_EVERY`.
async fn publish_readiness(shared: Arc<Shared>) {
    let ready = shared.metrics.gauge("bulkhead_ready", &[]);
    let changes = shared
        .metrics
        .counter("bulkhead_readiness_changes_total", &[]);
    let mut was: Option<bool> = None;
    let mut ticks = tokio::time::interval(READINESS_EVERY);
    loop {
        ticks.tick().await;
        let now = report(&shared).not_ready.is_none();
        ready.set(if now { 1.0 } else { 0.0 });
        if was.is_some_and(|w| w != now) {
            changes.increment(1);
        }
        was = Some(now);
    }
}

/// How often readiness is worked out for the metrics.
const READINESS_EVERY: Duration = Duration::from_millis(250);

fn config_mode(shared: &Shared) -> &'static str {
    match shared.live.get().pool.mode {
        crate::config::PoolMode::Passthrough => "passthrough",
        crate::config::PoolMode::Session => "session",
        crate::config::PoolMode::Transaction => "transaction",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_runtime_speaks_for_all() {
        let h = Heartbeat::new(2, false);
        assert_eq!(h.oldest(), None);
        h.beat(0);
        h.beat(1);
        assert_eq!(h.oldest(), None, "worker 2 has not beaten yet");
        std::thread::sleep(Duration::from_millis(5));
        h.beat(2);
        std::thread::sleep(Duration::from_millis(5));
        h.beat(0);
        h.beat(2);
        let (runtime, age) = h.oldest().unwrap();
        assert_eq!(runtime, 1);
        assert!(age >= Duration::from_millis(5), "{age:?}");
    }

    #[test]
    fn relay_loops_have_stamps_of_their_own_and_are_named_in_the_answer() {
        let h = Heartbeat::new(2, true);
        for runtime in 0..4 {
            h.beat(runtime);
        }
        assert_eq!(h.oldest(), None, "the second relay loop has not beaten yet");
        h.beat(4);
        assert!(h.oldest().is_some());
        assert_eq!(h.name(2), "the data-path runtime of worker 2");
        assert_eq!(h.name(3), "the relay loop of worker 1");
    }
}
