//! bulkhead: a resilient PostgreSQL connection proxy that runs beside each application node.
//!
//! Layout (see ARCHITECTURE.md for the whole map):
//! - [`config`]: the TOML schema, validated into typed settings.
//! - [`protocol`]: pure framing and the few messages bulkhead decodes; no I/O.
//! - [`pipe`]: one direction of a session's bytes, framed in place.
//! - `session`: one client's life, from the first packet to the last byte.
//! - [`upstream`]: connecting to servers and sending cancel requests.
//! - [`tls`]: TLS toward servers and from clients, and the stream type both sides use.
//! - [`workers`]: the threads sessions run on, one single-threaded runtime each.
//! - [`cancel`]: the map from the cancel keys clients hold to the servers' own.
//! - [`errors`]: the one place that turns a failure into SQLSTATE, message and hint.
//! - [`metrics`]: metric names and handles.
//!
//! State is passed, never global: [`Bulkhead`] owns everything one proxy needs, so a test can
//! run several in one process.

mod accept;
pub mod admission;
pub mod auth;
pub mod breaker;
pub mod cancel;
pub mod classify;
pub mod clock;
pub mod config;
pub mod demo;
pub mod detach;
pub mod errors;
pub mod evloop;
pub mod fds;
pub mod health;
pub mod http_get;
pub mod live;
pub mod metrics;
pub mod pipe;
pub mod pool;
pub mod probe;
pub mod protocol;
mod session;
pub mod sessions;
pub mod status;
pub mod tls;
pub mod tracker;
pub mod upstream;
pub mod workers;

use std::future::Future;
use std::io;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, info, warn};

pub use config::Config;
pub use metrics::Metrics;

/// Where the proxy is in its life. Sessions watch it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Running,
    /// Not accepting; sessions end at their next quiet point.
    Draining,
    /// The drain period is over: every session ends now.
    Closing,
}

/// What every session of one proxy shares.
pub(crate) struct Shared {
    /// Settings; SIGHUP may change timeouts, circuit and limits.
    pub live: live::Live,
    pub cancels: cancel::Registry,
    pub metrics: Metrics,
    pub phase: watch::Receiver<Phase>,
    /// Hosts, their roles and write circuits, and the primary, as the probe sees them.
    pub topology: probe::Topology,
    /// Client count and statement slots.
    pub admission: Arc<admission::Admission>,
    /// The data-path runtime's proof of life, for /livez.
    pub heartbeat: health::Heartbeat,
    /// TLS toward clients and servers, loaded at start and on SIGHUP.
    pub tls: tls::Current,
    /// The pooled modes: the users file (loaded at start and on SIGHUP), the auth query's
    /// connection, the key that makes unknown users' mock SCRAM verifiers, and the pools.
    pub users: std::sync::Mutex<Arc<auth::Users>>,
    pub auth_query: auth::query::AuthQuery,
    pub mock_key: [u8; 32],
    pub pools: pool::Pools,
    /// What each client session is doing, for /sessions.
    pub sessions: Arc<sessions::Registry>,
}

impl Shared {
    /// The users file as last loaded.
    pub fn users(&self) -> Arc<auth::Users> {
        self.users.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// One proxy instance.
pub struct Bulkhead {
    shared: Arc<Shared>,
    phase: watch::Sender<Phase>,
    /// How many worker threads `serve` starts for the sessions.
    workers: usize,
}

impl Bulkhead {
    /// Sets up a proxy for `config`. Fails when a TLS file it names cannot be used.
    pub fn new(config: Config) -> Result<Self, String> {
        let tls = tls::Tls::load(&config)?;
        let users = if config.auth.file.is_empty() {
            auth::Users::default()
        } else {
            auth::Users::load(&config.auth.file)?
        };
        let mut mock_key = [0u8; 32];
        getrandom::fill(&mut mock_key).map_err(|e| format!("no random source: {e}"))?;
        let workers = workers::default_count();
        let (phase, phase_rx) = watch::channel(Phase::Running);
        let metrics = Metrics::new();
        let topology = probe::Topology::new(&config.database.hosts, &metrics);
        topology.set_max_replica_lag(config.listen_readonly.max_replica_lag);
        if config.database.discovery == config::Discovery::Patroni {
            topology.follow_patroni();
        }
        let admission = Arc::new(admission::Admission::new(&config.limits, &metrics));
        let health = config.health.clone();
        let shared = Arc::new(Shared {
            live: live::Live::new(config),
            cancels: cancel::Registry::default(),
            metrics,
            phase: phase_rx,
            topology,
            admission,
            heartbeat: health::Heartbeat::new(workers, workers::relay_loops_on()),
            tls: tls::Current::new(tls),
            users: std::sync::Mutex::new(Arc::new(users)),
            auth_query: auth::query::AuthQuery::default(),
            mock_key,
            pools: pool::Pools::default(),
            sessions: Arc::new(sessions::Registry::new(
                health.sessions,
                health.show_statements,
            )),
        });
        Ok(Bulkhead {
            shared,
            phase,
            workers,
        })
    }

    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// Serves /livez, /readyz, /health and /metrics on `listener`, from a thread of its own.
    /// Runs until the returned server is dropped.
    pub fn start_health(
        &self,
        listener: std::net::TcpListener,
    ) -> io::Result<health::HealthServer> {
        health::spawn(self.shared.clone(), listener)
    }

    /// Hosts, roles, circuits and the primary as the probe last saw them.
    pub fn topology(&self) -> &probe::Topology {
        &self.shared.topology
    }

    /// Applies a reloaded configuration: timeouts, circuit and limits take effect for every
    /// session, running ones included. Returns the sections whose changes need a restart.
    /// The certificate and key files the running configuration names are read again, so
    /// certificates rotated in place take effect for new connections; if they cannot be used,
    /// the loaded ones stay and the log says why.
    pub fn reload(&self, config: Config) -> Vec<&'static str> {
        self.shared.admission.configure(&config.limits);
        let needs_restart = self.shared.live.reload(config);
        self.shared
            .topology
            .set_max_replica_lag(self.shared.live.get().listen_readonly.max_replica_lag);
        match tls::Tls::load(&self.shared.live.get()) {
            Ok(tls) => self.shared.tls.replace(tls),
            Err(e) => error!(error = %e, "reload: TLS files unusable; keeping the loaded ones"),
        }
        let file = self.shared.live.get().auth.file.clone();
        if !file.is_empty() {
            match auth::Users::load(&file) {
                Ok(users) => {
                    *self.shared.users.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(users)
                }
                Err(e) => error!(error = %e, "reload: users file unusable; keeping the loaded one"),
            }
        }
        needs_restart
    }

    /// Caps sessions at what the file descriptor limit allows (see [`fds::session_capacity`]).
    pub fn limit_clients_by_descriptors(&self, sessions: u32) {
        self.shared.admission.limit_by_descriptors(sessions);
    }

    /// Accepts clients on `listener` until `shutdown` resolves, then drains: stops accepting,
    /// lets sessions finish their transaction for up to [timeouts] drain, then closes the rest
    /// with 57P01. Returns when every session has ended.
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> io::Result<()> {
        self.serve_with_readonly(listener, None, shutdown).await
    }

    /// As [`Bulkhead::serve`], with the read-only listener ([listen_readonly]) beside the
    /// main one when there is one.
    pub async fn serve_with_readonly(
        &self,
        listener: TcpListener,
        readonly: Option<TcpListener>,
        shutdown: impl Future<Output = ()>,
    ) -> io::Result<()> {
        let (alive, mut all_ended) = mpsc::channel::<()>(1);
        let mut background = probe::spawn(&self.shared);
        background.push(tokio::spawn(housekeeping(self.shared.clone())));
        if self.shared.live.get().pool.mode != config::PoolMode::Passthrough {
            let shared = self.shared.clone();
            background.push(tokio::spawn(async move {
                let mut ticks = tokio::time::interval(std::time::Duration::from_secs(1));
                loop {
                    ticks.tick().await;
                    shared.pools.upkeep(&shared).await;
                }
            }));
        }
        background.push(tokio::spawn(health::heartbeat(self.shared.clone(), 0)));
        let shared = self.shared.clone();
        let workers = Arc::new(workers::Workers::start(self.workers, |i| {
            health::heartbeat(shared.clone(), i + 1)
        })?);
        let acceptor = accept::Acceptor {
            shared: self.shared.clone(),
            workers: workers.clone(),
            alive: alive.clone(),
        };
        // Both listeners leave this runtime's reactor for the accept loop's.
        let main = listener.into_std()?;
        let readonly = readonly.map(TcpListener::into_std).transpose()?;
        let (stop, stopped) = oneshot::channel();
        let accepting = acceptor.run(main, readonly, stopped);
        let mut accepting = if workers.count() == 1 {
            workers.run_on(0, accepting)
        } else {
            tokio::spawn(accepting)
        };
        tokio::pin!(shutdown);
        let ended = tokio::select! {
            () = &mut shutdown => None,
            ended = &mut accepting => Some(ended),
        };
        let ended = match ended {
            Some(ended) => ended,
            None => {
                let _ = stop.send(());
                accepting.await
            }
        };
        // The accept loop ends by itself only when a listener cannot be used at all.
        let failed = match ended {
            Ok(ended) => ended.err(),
            Err(e) => Some(io::Error::other(format!("the accept loop failed: {e}"))),
        };
        if let Some(e) = &failed {
            error!(error = %e, "no longer accepting clients");
        }
        let drain = self.shared.live.get().timeouts.drain;
        info!(
            ?drain,
            "draining: no new connections; sessions end when their transaction does"
        );
        self.phase.send_replace(Phase::Draining);
        drop(alive);
        if tokio::time::timeout(drain, all_ended.recv()).await.is_err() {
            warn!("drain period over; closing the remaining sessions");
            self.phase.send_replace(Phase::Closing);
            all_ended.recv().await;
        }
        info!("all sessions ended");
        for task in background {
            task.abort();
        }
        failed.map_or(Ok(()), Err)
    }
}

/// Background work that is not per session: the adaptive limit controller, the in-flight
/// gauges every `admission::ADAPTIVE_WINDOW`, and the metrics recorder's upkeep.
async fn housekeeping(shared: Arc<Shared>) {
    let gauges = shared.clone();
    let adaptive = tokio::spawn(admission::run_adaptive(
        shared.admission.clone(),
        move || gauges.live.get().limits.clone(),
    ));
    let _stop_with_us = AbortOnDrop(adaptive);
    let mut ticks = tokio::time::interval(admission::ADAPTIVE_WINDOW);
    let mut tick: u64 = 0;
    loop {
        ticks.tick().await;
        tick += 1;
        let (all, writes) = (shared.admission.all.held(), shared.admission.writes.held());
        shared
            .metrics
            .read
            .inflight
            .set(all.saturating_sub(writes) as f64);
        shared.metrics.write.inflight.set(writes as f64);
        // Every 5 s: fold histogram samples into buckets, or they pile up unscraped; and give
        // the pages of freed buffers back to the system.
        if tick.is_multiple_of(50) {
            shared.metrics.upkeep();
            release_free_memory();
        }
    }
}

/// Idle sessions free their buffers, but the allocator keeps the pages of a freed buffer that
/// sits between live allocations, so without this the memory of 1000 idle sessions would stay
/// as high as when they were busy. glibc's `malloc_trim` returns whole free pages in every arena
/// to the system (madvise), without moving anything.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory the allocator owns; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every idle client holds one session task, and most of what it costs is this future:
    /// 1.4 KiB in a release build. It was 4.8 KiB while it had room for startup and the
    /// farewell (now boxed) and while the worker's wrapper held the session twice.
    #[test]
    fn an_idle_sessions_task_holds_little_more_than_the_relay() {
        let proxy = Bulkhead::new(Config::parse("").unwrap()).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (alive, _ended) = mpsc::channel(1);
        let peer = client.local_addr().unwrap();
        let session = session::serve(
            proxy.shared.clone(),
            client,
            peer,
            1,
            true,
            false,
            alive,
            tracing::Span::none(),
        );
        let task = workers::counted(session, Default::default());
        let size = std::mem::size_of_val(&task);
        assert!(size <= 2048, "a session's task is {size} bytes");
    }
}
