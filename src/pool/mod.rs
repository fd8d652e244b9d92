//! Server connection pools, one per (user, database), for the pooled modes. A client that
//! logged in borrows a connection (`Pool::lend`): an idle one if there is one, else a new one
//! opened to the current primary with the credential its login left; it gives it back when it
//! leaves (`Lent::give_back`), reset, to be lent again. `[pool] size` bounds the connections a
//! pool has open, idle and lent together; a client waits for one at most queue_timeout, and
//! that wait is the only queue (the admission queue of the pooled modes).
//!
//! The pool's lock is taken when a connection is lent and returned, not per message.

mod answers;
pub mod lending;
pub mod login;
pub mod server;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram};
use tokio::time::Instant;
use tracing::{debug, info};

use crate::Shared;
use crate::admission::Limit;
use crate::auth::Credential;
use crate::config::Config;
use crate::errors::Refusal;
pub use server::{ServerConn, ServerError};

/// How long bulkhead's own statements on a pooled connection (settings, the reset) may take.
const OWN_STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Pools by user, then database.
type ByName = HashMap<String, HashMap<String, Arc<Pool>>>;

/// Every pool of one proxy.
#[derive(Default)]
pub struct Pools {
    /// By user, then database: a login looks its pool up with the names it has, copying
    /// nothing once the pool exists. The main listener's pools, then the read-only one's.
    pools: [Mutex<ByName>; 2],
}

/// One (user, database) pool.
pub struct Pool {
    pub user: String,
    pub database: String,
    /// A pool of the read-only listener: its connections go to standbys that take reads (or
    /// the primary while none does), not to the primary.
    pub readonly: bool,
    /// For a read-only pool, the topology's count of read-only connections per host, which
    /// its connections join while open.
    reading: Option<Arc<[std::sync::atomic::AtomicU64]>>,
    idle: Mutex<Vec<ServerConn>>,
    /// How many are idle, for /health.
    idle_count: std::sync::atomic::AtomicU32,
    /// Connections open (idle and lent) and being opened.
    open: std::sync::atomic::AtomicU32,
    /// One slot per connection a client holds; waiting for one is the admission queue.
    slots: Arc<Limit>,
    /// The last credential that logged in, for opening connections in the background.
    credential: Mutex<Option<Arc<Credential>>>,
    metrics: PoolMetrics,
}

struct PoolMetrics {
    idle: Gauge,
    active: Gauge,
    waiting: Gauge,
    wait: Histogram,
    logins_ok: Counter,
    logins_failed: Counter,
    /// bulkhead_server_connections, which counts pooled connections while they are open.
    server_connections: Gauge,
    /// Clients pinned to their connection (a client's lending moves it).
    pinned: Gauge,
}

/// Why no connection could be lent.
#[derive(Debug)]
pub enum LendError {
    /// bulkhead says why (no primary, the wait ran out, …).
    Refused(Refusal),
    /// The server refused the login or a setting: its ErrorResponse, as it sent it.
    Server(bytes::BytesMut),
}

/// A state of one pool, for /health.
#[derive(Debug, serde::Serialize)]
pub struct PoolInfo {
    pub user: String,
    pub database: String,
    pub readonly: bool,
    pub idle: usize,
    pub active: u32,
    pub waiting: u32,
    pub size: u32,
}

impl Pools {
    /// The pool for (user, database), made on first use.
    pub(crate) fn get(
        &self,
        shared: &Shared,
        user: &str,
        database: &str,
        readonly: bool,
    ) -> Arc<Pool> {
        let mut pools = self.pools[usize::from(readonly)]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(pool) = pools.get(user).and_then(|by_db| by_db.get(database)) {
            return pool.clone();
        }
        pools
            .entry(user.to_string())
            .or_default()
            .entry(database.to_string())
            .or_insert_with(|| {
                let size = shared.live.get().pool.size;
                // A read-only listener's pool is told apart by one more label.
                let mut base = vec![("user", user), ("database", database)];
                if readonly {
                    base.push(("readonly", "true"));
                }
                let with = |extra: (&'static str, &'static str)| {
                    let mut labels = base.clone();
                    labels.push(extra);
                    labels
                };
                let labels = &base[..];
                let m = &shared.metrics;
                let state = |s| m.gauge("bulkhead_pool_server_connections", &with(("state", s)));
                Arc::new(Pool {
                    user: user.to_string(),
                    database: database.to_string(),
                    readonly,
                    reading: readonly.then(|| shared.topology.reader_counts()),
                    idle: Mutex::new(Vec::new()),
                    idle_count: 0.into(),
                    open: 0.into(),
                    slots: Arc::new(Limit::new(size, m.gauge("bulkhead_pool_size", labels))),
                    credential: Mutex::new(None),
                    metrics: PoolMetrics {
                        idle: state("idle"),
                        active: state("active"),
                        waiting: m.gauge("bulkhead_pool_clients_waiting", labels),
                        wait: m.histogram("bulkhead_pool_wait_seconds", labels),
                        logins_ok: m
                            .counter("bulkhead_pool_server_logins_total", &with(("result", "ok"))),
                        logins_failed: m.counter(
                            "bulkhead_pool_server_logins_total",
                            &with(("result", "failed")),
                        ),
                        server_connections: m.server_connections.clone(),
                        pinned: m.gauge("bulkhead_pool_pinned_clients", labels),
                    },
                })
            })
            .clone()
    }

    fn all(&self) -> Vec<Arc<Pool>> {
        let mut all = Vec::new();
        for pools in &self.pools {
            let pools = pools.lock().unwrap_or_else(|e| e.into_inner());
            all.extend(pools.values().flat_map(|by_db| by_db.values().cloned()));
        }
        all
    }

    /// Each pool's state, for /health.
    pub fn info(&self) -> Vec<PoolInfo> {
        let mut out: Vec<PoolInfo> = self.all().iter().map(|p| p.info()).collect();
        out.sort_by(|a, b| {
            (a.readonly, &a.user, &a.database).cmp(&(b.readonly, &b.user, &b.database))
        });
        out
    }

    /// Upkeep, every second: sizes from the settings in force, idle connections past
    /// idle_timeout or lifetime or on a host that is no longer primary closed, min_idle kept.
    pub(crate) async fn upkeep(&self, shared: &Arc<Shared>) {
        let config = shared.live.get();
        let primary = shared.topology.watch_primary().borrow().clone();
        for pool in self.all() {
            if pool.slots.limit() != config.pool.size {
                pool.slots.set(config.pool.size);
            }
            let primary = primary.as_ref().map(|p| p.index);
            if pool.readonly {
                pool.prune(&config, |host| shared.topology.serves_reads(host));
            } else {
                pool.prune(&config, |host| Some(host) == primary);
            }
            pool.keep_min_idle(shared, &config).await;
        }
    }
}

impl Pool {
    fn info(&self) -> PoolInfo {
        // Atomics only: the health thread never waits for a session.
        let idle = self.idle_count.load(std::sync::atomic::Ordering::Relaxed) as usize;
        PoolInfo {
            user: self.user.clone(),
            database: self.database.clone(),
            readonly: self.readonly,
            idle,
            active: self.slots.held(),
            waiting: self.slots.queued(),
            size: self.slots.limit(),
        }
    }

    fn open_count(&self) -> u32 {
        self.open.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Lends a connection with the client's `settings` applied, waiting for a slot until
    /// `until`. `credential` is what the client's login left.
    pub(crate) async fn lend(
        self: &Arc<Self>,
        shared: &Shared,
        config: &Config,
        credential: &Arc<Credential>,
        settings: &[(String, String)],
        until: Instant,
    ) -> Result<Lent, LendError> {
        *self.credential.lock().unwrap_or_else(|e| e.into_inner()) = Some(credential.clone());
        let started = Instant::now();
        if !self.slots.try_acquire() {
            self.metrics.waiting.increment(1.0);
            let got = self.slots.acquire_until(until).await;
            self.metrics.waiting.decrement(1.0);
            if !got {
                return Err(LendError::Refused(Refusal::PoolExhausted {
                    user: self.user.clone(),
                    database: self.database.clone(),
                    waited: started.elapsed(),
                }));
            }
        }
        self.metrics.wait.record(started.elapsed().as_secs_f64());
        let mut lent = Lent {
            pool: self.clone(),
            held: Held::Nothing,
        };
        let primary = shared
            .topology
            .watch_primary()
            .borrow()
            .as_ref()
            .map(|p| p.index);
        let wanted = |host| {
            if self.readonly {
                shared.topology.serves_reads(host)
            } else {
                Some(host) == primary
            }
        };
        let now = Instant::now();
        let reused = loop {
            let next = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            match next {
                Some(conn)
                    if wanted(conn.info.host)
                        && !conn.info.expired(config.pool.lifetime, now)
                        && conn.stream.still_quiet() =>
                {
                    self.idle_gone();
                    break Some(conn);
                }
                Some(conn) => {
                    self.idle_gone();
                    self.close(conn);
                }
                None => break None,
            }
        };
        let mut conn = match reused {
            Some(conn) => conn,
            None => self.open(shared, config, Some(credential)).await?,
        };
        self.metrics.active.increment(1.0);
        if let Err(e) = conn.adopt(settings, OWN_STATEMENT_TIMEOUT).await {
            lent.held = Held::Whole(conn);
            lent.discard();
            return Err(match e {
                ServerError::Refused(error) => LendError::Server(error),
                ServerError::Broken(why) => {
                    LendError::Refused(Refusal::ServerLost(why, crate::errors::Lost::Nothing))
                }
            });
        }
        lent.held = Held::Whole(conn);
        Ok(lent)
    }

    /// Lends an idle connection at once, without waiting or any I/O (but a read that finds
    /// nothing, and no system call at all unless the socket was reported readable), if a slot
    /// is free and an idle connection to `primary` already has `settings` and is still quiet:
    /// the common case in transaction pooling, which then allocates nothing.
    pub fn try_lend_now(
        self: &Arc<Self>,
        wanted: impl Fn(usize) -> bool,
        settings: &[(String, String)],
        lifetime: Duration,
    ) -> Option<Lent> {
        if !self.slots.try_acquire() {
            return None;
        }
        let lent = Lent {
            pool: self.clone(),
            held: Held::Nothing,
        };
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        // The most recently returned first: its memory is warm.
        let at = idle.iter().rposition(|c| {
            wanted(c.info.host) && c.info.settings == settings && !c.info.expired(lifetime, now)
        });
        let conn = idle.swap_remove(at?);
        drop(idle);
        self.idle_gone();
        if !conn.stream.still_quiet() {
            // Ended by the server while idle (or gone): closed; the client waits for another.
            self.close(conn);
            return None;
        }
        self.metrics.active.increment(1.0);
        let mut lent = lent;
        lent.held = Held::Whole(conn);
        Some(lent)
    }

    /// Opens and logs in a new connection to the primary. Counts it open from the start.
    async fn open(
        &self,
        shared: &Shared,
        config: &Config,
        credential: Option<&Credential>,
    ) -> Result<ServerConn, LendError> {
        self.open.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        // A primary shutting down (or one still starting) refuses logins with 57P03 for a
        // moment: a failover under way, ridden through like a refused connect, for up to
        // hold_new_connections. The probe is told, and the next try waits for its word.
        let give_up = Instant::now() + config.circuit.hold_new_connections;
        let opened = loop {
            let attempt = self.open_once(shared, config, credential).await;
            match attempt {
                Err((LendError::Server(e), Some(host)))
                    if crate::protocol::backend::error_info(&e[5..]).code == b"57P03"
                        && Instant::now() < give_up =>
                {
                    debug!(user = %self.user, database = %self.database, host, "the primary refused a login with 57P03; waiting for the probe");
                    shared.topology.connection_lost(host);
                    let mut primary = shared.topology.watch_primary();
                    primary.borrow_and_update();
                    let wait = config
                        .probe
                        .interval
                        .min(give_up.saturating_duration_since(Instant::now()));
                    let _ = tokio::time::timeout(wait, primary.changed()).await;
                }
                attempt => break attempt.map_err(|(e, _)| e),
            }
        };
        match &opened {
            Ok(conn) => {
                shared.topology.saw_login(conn.info.host);
                self.metrics.logins_ok.increment(1);
                self.metrics.server_connections.increment(1.0);
                if let Some(reading) = &self.reading {
                    // Read-only connections spread over the standbys as sessions do.
                    reading[conn.info.host].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                debug!(user = %self.user, database = %self.database, server = %conn.info.addr, "pooled connection opened");
            }
            Err(_) => {
                self.metrics.logins_failed.increment(1);
                self.open.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
        opened
    }

    /// One try at a new connection: to the primary (waiting for one as connect_primary
    /// does), then the login. A failure says which host refused, if one was reached.
    async fn open_once(
        &self,
        shared: &Shared,
        config: &Config,
        credential: Option<&Credential>,
    ) -> Result<ServerConn, (LendError, Option<usize>)> {
        let connected = if self.readonly {
            crate::session::connect_reader(shared, config).await
        } else {
            crate::session::connect_primary(shared, config).await
        };
        let (stream, addr, host) = connected.map_err(|r| (LendError::Refused(r), None))?;
        let login = server::log_in(stream, addr, host, &self.user, &self.database, credential);
        let failed = |e| (e, Some(host));
        // A host that accepted the connection and then did not complete the login: the probe
        // looks through a new connection of its own now.
        let broken = |why| {
            shared.topology.look_now(host);
            failed(LendError::Refused(Refusal::NoServer(why)))
        };
        match tokio::time::timeout(
            config.database.connect_timeout + OWN_STATEMENT_TIMEOUT,
            login,
        )
        .await
        {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(ServerError::Refused(e))) => Err(failed(LendError::Server(e))),
            Ok(Err(ServerError::Broken(why))) => Err(broken(why)),
            Err(_) => Err(broken(
                "the server did not complete the login in time".into(),
            )),
        }
    }

    /// Counts a connection to `host` closed; dropping its socket closes it.
    fn closed(&self, host: usize) {
        self.open.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        self.metrics.server_connections.decrement(1.0);
        if let Some(reading) = &self.reading {
            reading[host].fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn close(&self, conn: ServerConn) {
        self.closed(conn.info.host);
        drop(conn);
    }

    /// Closes idle connections that are too old, idle too long (above min_idle), on a host
    /// that is no longer the primary, or ended by the server while idle; and those above a
    /// lowered size.
    fn prune(&self, config: &Config, wanted: impl Fn(usize) -> bool) {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let before = idle.len();
        let mut kept = Vec::with_capacity(idle.len());
        // Oldest-idle first: the list is pushed in return order.
        let mut closing = Vec::new();
        let over = (self.open_count() as usize).saturating_sub(config.pool.size as usize);
        for (i, conn) in idle.drain(..).enumerate() {
            let stale =
                now.saturating_duration_since(conn.info.idle_since) >= config.pool.idle_timeout;
            if !wanted(conn.info.host)
                || conn.info.expired(config.pool.lifetime, now)
                || !conn.stream.still_quiet()
                || i < over
                || (stale && kept.len() + before.saturating_sub(i) > config.pool.min_idle as usize)
            {
                closing.push(conn);
            } else {
                kept.push(conn);
            }
        }
        *idle = kept;
        drop(idle);
        for conn in closing {
            self.idle_gone();
            self.close(conn);
        }
    }

    /// Opens connections in the background up to min_idle, once a credential is known.
    async fn keep_min_idle(&self, shared: &Shared, config: &Config) {
        let credential = self
            .credential
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some(credential) = credential else {
            return;
        };
        loop {
            let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).len();
            if idle >= config.pool.min_idle as usize || self.open_count() >= config.pool.size {
                return;
            }
            match self.open(shared, config, Some(credential.as_ref())).await {
                Ok(conn) => self.put_idle(conn),
                Err(e) => {
                    info!(user = %self.user, database = %self.database, error = ?e, "could not open an idle pooled connection");
                    return;
                }
            }
        }
    }

    /// One connection less in the idle list.
    fn idle_gone(&self) {
        self.idle_count
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        self.metrics.idle.decrement(1.0);
    }

    fn put_idle(&self, mut conn: ServerConn) {
        conn.info.idle_since = Instant::now();
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(conn);
        self.idle_count
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.metrics.idle.increment(1.0);
    }
}

/// A connection lent to a client, with its slot. Dropped without `give_back`, the connection
/// is closed and the slot returned.
pub struct Lent {
    pool: Arc<Pool>,
    held: Held,
}

/// What a `Lent` holds of its connection (one of the two, so that a client between
/// transactions, which holds neither, keeps little room for them).
enum Held {
    Nothing,
    /// Socket and facts, before the relay takes the socket.
    Whole(ServerConn),
    /// The connection's facts while its socket is in the relay.
    Away(server::ConnInfo),
}

impl Lent {
    /// The connection's socket, to move into the relay; its facts stay here.
    pub fn take_stream(&mut self) -> (crate::tls::Stream, &server::ConnInfo) {
        let Held::Whole(ServerConn { stream, info }) =
            std::mem::replace(&mut self.held, Held::Nothing)
        else {
            panic!("the socket is taken once");
        };
        self.held = Held::Away(info);
        (stream, self.info())
    }

    pub fn conn(&self) -> &ServerConn {
        match &self.held {
            Held::Whole(conn) => conn,
            _ => panic!("not taken yet"),
        }
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The facts of the connection whose socket the relay had.
    fn take_away(&mut self) -> server::ConnInfo {
        match std::mem::replace(&mut self.held, Held::Nothing) {
            Held::Away(info) => info,
            _ => panic!("the socket was taken"),
        }
    }

    /// Returns the socket the relay had, reset, to the pool for the next client; closes it if
    /// the reset fails or the connection is too old.
    pub async fn give_back(mut self, stream: crate::tls::Stream, config: &Config) {
        let info = self.take_away();
        let mut conn = ServerConn { stream, info };
        if conn.info.expired(config.pool.lifetime, Instant::now()) {
            self.held = Held::Whole(conn);
            return;
        }
        match conn.reset(OWN_STATEMENT_TIMEOUT).await {
            Ok(()) => {
                self.pool.metrics.active.decrement(1.0);
                self.pool.put_idle(conn);
                // The slot goes back when `self` drops, after the connection is idle.
            }
            Err(e) => {
                debug!(error = ?e, "reset of a pooled connection failed; closing it");
                self.held = Held::Whole(conn);
            }
        }
    }

    /// The facts of the connection whose socket the relay holds.
    pub fn info(&self) -> &server::ConnInfo {
        match &self.held {
            Held::Away(info) => info,
            _ => panic!("the socket was taken"),
        }
    }

    /// The same, to change.
    pub fn info_mut(&mut self) -> &mut server::ConnInfo {
        match &mut self.held {
            Held::Away(info) => info,
            _ => panic!("the socket was taken"),
        }
    }

    /// Returns the socket the relay had to the pool as it is, without a reset: transaction
    /// pooling, between transactions. No I/O.
    pub fn give_back_now(mut self, stream: crate::tls::Stream) {
        let info = self.take_away();
        self.pool.metrics.active.decrement(1.0);
        self.pool.put_idle(ServerConn { stream, info });
    }

    /// Closes the connection whose socket the relay holds.
    pub fn close(mut self, stream: crate::tls::Stream) {
        let info = self.take_away();
        self.held = Held::Whole(ServerConn { stream, info });
    }

    /// Closes the connection instead of returning it.
    fn discard(&mut self) {
        match std::mem::replace(&mut self.held, Held::Nothing) {
            Held::Whole(conn) => {
                self.pool.metrics.active.decrement(1.0);
                self.pool.close(conn);
            }
            Held::Away(info) => {
                // Its socket ended with the relay.
                self.pool.metrics.active.decrement(1.0);
                self.pool.closed(info.host);
            }
            Held::Nothing => {}
        }
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        self.discard();
        self.pool.slots.release();
    }
}
