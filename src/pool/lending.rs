//! A pooled client's hold on server connections, which the relay keeps beside its sockets.
//! In session pooling it holds one connection from login to goodbye. In transaction pooling it
//! borrows one when a transaction begins and gives it back when the server says idle, unless
//! the client used something tied to that backend (it is then *pinned* to it until it
//! leaves); and it keeps the client's protocol-level prepared statements, so that whichever
//! connection the client gets has them: a statement the connection lacks is prepared there
//! just before its use, and the extra answers are dropped.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{BufMut, BytesMut};
use tokio::time::Instant;

use super::{LendError, Lent, Pool};
use crate::Shared;
use crate::auth::Credential;
use crate::cancel::{Slot, Target};
use crate::config::Config;
use crate::tls::Stream;

/// The most prepared statements bulkhead keeps on one server connection for its clients; the
/// oldest is closed to make room for another.
pub const MAX_PREPARED_PER_CONNECTION: usize = 512;

type Pending = Pin<Box<dyn Future<Output = Result<Lent, LendError>> + Send>>;

pub struct Lending {
    shared: Arc<Shared>,
    pool: Arc<Pool>,
    /// Shared with the waits for a connection, which need it for their own: a wait allocates
    /// no copy of it (nor of the settings).
    credential: Arc<Credential>,
    /// The settings the client wants on whichever connection it gets: its startup
    /// parameters, then what the server reports as it changes them.
    pub settings: Arc<Vec<(String, String)>>,
    /// Transaction pooling: the connection goes back between transactions.
    pub per_transaction: bool,
    /// The connection held now, its socket in the relay.
    lent: Option<Lent>,
    /// A connection being waited for or opened.
    pending: Option<Pending>,
    /// Why the client keeps its connection until it leaves.
    pub pinned: Option<&'static str>,
    /// The held connection's host is no longer the primary: close it instead of returning it.
    pub retire: bool,
    /// The primary as the session last heard of it.
    pub primary: Option<usize>,
    /// The standbys that take reads (a bit per host), as the session last heard of them; for
    /// a client of the read-only listener (its pool is a read-only one).
    pub readers: u64,
    /// The client's named statements: name to Parse body, and whether the server took it.
    statements: HashMap<Vec<u8>, (Arc<[u8]>, Taken)>,
    /// The client's Parses in the request in flight (a named Parse waits for earlier requests,
    /// so they are all in the oldest one).
    parsed: Vec<Vec<u8>>,
    /// Statements put on the held connection by the request in flight, forgotten again if it
    /// fails (the server may not have them).
    unconfirmed: Vec<Vec<u8>>,
    /// Where the client's cancel key points.
    pub cancel: Arc<Slot>,
}

/// Whether the server took a client's Parse, as far as bulkhead can tell.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Taken {
    /// Its request is in flight.
    Pending,
    /// Its request ended without an error: the client has the statement, and a second Parse
    /// of the name must fail as PostgreSQL fails it (42P05).
    Yes,
    /// Its request failed, before or after the Parse: a second Parse is let through.
    Unknown,
}

/// Messages bulkhead puts on the wire before a client's own, and the answers to drop for them.
#[derive(Default)]
pub struct Injected {
    pub bytes: BytesMut,
    pub parses: u32,
    pub closes: u32,
}

fn write_close_statement(out: &mut BytesMut, name: &[u8]) {
    out.put_u8(b'C');
    out.put_u32((4 + 1 + name.len() + 1) as u32);
    out.put_u8(b'S');
    out.put_slice(name);
    out.put_u8(0);
}

fn write_parse_body(out: &mut BytesMut, body: &[u8]) {
    out.put_u8(b'P');
    out.put_u32((4 + body.len()) as u32);
    out.put_slice(body);
}

impl Lending {
    #[allow(clippy::too_many_arguments)] // each is one thing the login learned
    pub(crate) fn new(
        shared: Arc<Shared>,
        pool: Arc<Pool>,
        credential: Arc<Credential>,
        settings: Vec<(String, String)>,
        per_transaction: bool,
        lent: Lent,
        cancel: Arc<Slot>,
        primary: Option<usize>,
        readers: u64,
    ) -> Self {
        Lending {
            shared,
            pool,
            credential,
            settings: Arc::new(settings),
            per_transaction,
            lent: Some(lent),
            pending: None,
            pinned: None,
            retire: false,
            primary,
            readers,
            statements: HashMap::new(),
            parsed: Vec::new(),
            unconfirmed: Vec::new(),
            cancel,
        }
    }

    /// The connection held, if any.
    pub fn held(&self) -> bool {
        self.lent.is_some()
    }

    /// Takes the socket of the connection lent at login (session pooling keeps it).
    pub fn take_stream(&mut self) -> (Stream, &super::server::ConnInfo) {
        self.lent.as_mut().expect("lent at login").take_stream()
    }

    fn attached(&mut self, mut lent: Lent) -> Stream {
        let (stream, info) = lent.take_stream();
        self.cancel.set(Some(Target {
            addr: info.addr,
            pid: info.pid,
            key: info.secret.clone(),
        }));
        self.lent = Some(lent);
        stream
    }

    /// Whether the client's transactions may go to `host`: the primary; for a client of the
    /// read-only listener, a standby that takes reads, or the primary while none does. From
    /// what the session last heard, so asking takes no lock.
    pub fn host_ok(&self, host: usize) -> bool {
        if !self.pool.readonly {
            return self.primary == Some(host);
        }
        if self.readers != 0 {
            host < 64 && self.readers & (1 << host) != 0
        } else {
            self.primary == Some(host)
        }
    }

    /// A connection at once, if an idle one with the client's settings is there.
    pub fn try_now(&mut self, config: &Config) -> Option<Stream> {
        let lent = {
            let this = &*self;
            this.pool
                .try_lend_now(|h| this.host_ok(h), &this.settings, config.pool.lifetime)?
        };
        Some(self.attached(lent))
    }

    /// Starts waiting for a connection (at most queue_timeout), opening one if the pool has
    /// room, with the client's settings applied.
    pub fn start_wait(&mut self, config: Arc<Config>) {
        if self.pending.is_some() {
            return;
        }
        let (shared, pool, credential, settings) = (
            self.shared.clone(),
            self.pool.clone(),
            self.credential.clone(),
            self.settings.clone(),
        );
        let until = Instant::now() + config.limits.queue_timeout;
        self.pending = Some(Box::pin(async move {
            pool.lend(&shared, &config, &credential, &settings[..], until)
                .await
        }));
    }

    pub fn waiting(&self) -> bool {
        self.pending.is_some()
    }

    /// Polls the wait: the socket once a connection is lent.
    pub fn poll_wait(&mut self, cx: &mut Context<'_>) -> Poll<Result<Stream, LendError>> {
        let Some(pending) = self.pending.as_mut() else {
            return Poll::Pending;
        };
        let lent = std::task::ready!(pending.as_mut().poll(cx));
        self.pending = None;
        Poll::Ready(lent.map(|lent| self.attached(lent)))
    }

    /// The held connection's facts.
    pub fn info(&mut self) -> Option<&mut super::server::ConnInfo> {
        self.lent.as_mut().map(|l| l.info_mut())
    }

    /// Gives the held connection back between transactions (or closes it, if retired). The
    /// client's settings are the connection's now.
    pub fn release(&mut self, stream: Stream) {
        self.unconfirmed.clear();
        self.settle_parses(false);
        self.cancel.set(None);
        let Some(mut lent) = self.lent.take() else {
            return;
        };
        let info = lent.info_mut();
        if info.settings != *self.settings {
            info.settings = (*self.settings).clone();
        }
        if std::mem::take(&mut self.retire) {
            lent.close(stream);
        } else {
            lent.give_back_now(stream);
        }
    }

    /// The held connection was lost, or is given up on (its host stopped answering or is
    /// no longer the primary): it is closed, not returned, and its slot freed. Statements the
    /// request in flight put there are forgotten with it; the client keeps its own.
    pub fn drop_connection(&mut self) {
        self.settle_parses(false);
        self.unconfirmed.clear();
        self.cancel.set(None);
        self.retire = false;
        // Its socket went with the relay; dropping the loan counts it closed.
        self.lent = None;
    }

    /// At the session's end: the connection back to the pool, reset first if the client
    /// changed it beyond what bulkhead follows (session pooling, or pinned).
    pub async fn finish(mut self, stream: Stream, config: &Config) {
        self.cancel.set(None);
        let reset = !self.per_transaction || self.pinned.is_some();
        if self.pinned.take().is_some() {
            self.pool.metrics.pinned.decrement(1.0);
        }
        let Some(mut lent) = self.lent.take() else {
            return;
        };
        if self.retire {
            lent.close(stream);
            return;
        }
        let info = lent.info_mut();
        if info.settings != *self.settings {
            info.settings = (*self.settings).clone();
        }
        if reset {
            lent.give_back(stream, config).await;
        } else {
            lent.give_back_now(stream);
        }
    }

    /// The client used `feature`, tied to its backend: it keeps the connection until it leaves.
    pub fn pin(&mut self, feature: &'static str) {
        if self.pinned.is_none() {
            self.pinned = Some(feature);
            self.pool.metrics.pinned.increment(1.0);
        }
    }

    /// A ParameterStatus from the server: a setting the client changed follows it.
    pub fn reported(&mut self, name: &str, value: &str) {
        if !crate::classify::REPORTED_SETTINGS
            .iter()
            .any(|s| s.eq_ignore_ascii_case(name))
        {
            return;
        }
        let known = self
            .settings
            .iter()
            .position(|(n, _)| n.eq_ignore_ascii_case(name));
        match known {
            Some(at) if self.settings[at].1 == value => {}
            Some(at) => Arc::make_mut(&mut self.settings)[at].1 = value.to_string(),
            None => Arc::make_mut(&mut self.settings).push((name.to_string(), value.to_string())),
        }
    }

    /// The request in flight ended (`ok`: without an error): statements it put on the
    /// connection are there for good, or, after an error, perhaps not.
    pub fn request_done(&mut self, ok: bool) {
        self.settle_parses(ok);
        if !ok && let Some(lent) = self.lent.as_mut() {
            // Whether the server got to them is unknown: the next use closes and prepares.
            let info = lent.info_mut();
            for name in self.unconfirmed.drain(..) {
                if let Some(entry) = info.prepared.get_mut(&name) {
                    entry.0 = None;
                }
            }
        }
        self.unconfirmed.clear();
    }

    /// The client's Parse of a named statement (`body` is the whole message body). What must
    /// go before it: a Close of the name if the connection holds another statement by it.
    ///
    /// A name the client already has (or is preparing in this batch) goes to the server as
    /// sent, on a connection that has the client's statement by that name, so that PostgreSQL
    /// answers 42P05 and skips the batch as it would without bulkhead; the client keeps its
    /// statement.
    pub fn parse(&mut self, name: &[u8], body: &[u8]) -> Injected {
        if self
            .statements
            .get(name)
            .is_some_and(|(_, taken)| *taken != Taken::Unknown)
        {
            return self.use_statement(name).unwrap_or_default();
        }
        let statement: Arc<[u8]> = Arc::from(body);
        self.statements
            .insert(name.to_vec(), (statement.clone(), Taken::Pending));
        self.parsed.push(name.to_vec());
        let mut injected = Injected::default();
        if let Some(info) = self.lent.as_mut().map(|l| l.info_mut()) {
            if info.prepared.remove(name).is_some() {
                write_close_statement(&mut injected.bytes, name);
                injected.closes += 1;
            }
            Self::make_room(info, &mut injected);
            info.prepared_seq += 1;
            info.prepared
                .insert(name.to_vec(), (Some(statement), info.prepared_seq));
            self.unconfirmed.push(name.to_vec());
        }
        injected
    }

    /// Whether a Bind or Describe of `name` would need bulkhead's own messages first.
    pub fn would_inject(&self, name: &[u8]) -> bool {
        let (Some((statement, _)), Some(lent)) = (self.statements.get(name), self.lent.as_ref())
        else {
            return false;
        };
        !matches!(lent.info().prepared.get(name), Some((Some(s), _)) if Arc::ptr_eq(s, statement) || **s == **statement)
    }

    /// A Bind or Describe of the client's named statement: if the connection lacks it (or has
    /// another by that name), what prepares it there first.
    pub fn use_statement(&mut self, name: &[u8]) -> Option<Injected> {
        let (statement, _) = self.statements.get(name)?;
        let info = self.lent.as_mut()?.info_mut();
        let mut injected = Injected::default();
        match info.prepared.get(name) {
            Some((Some(s), _)) if Arc::ptr_eq(s, statement) || **s == **statement => return None,
            Some(_) => {
                write_close_statement(&mut injected.bytes, name);
                injected.closes += 1;
                info.prepared.remove(name);
            }
            None => {}
        }
        Self::make_room(info, &mut injected);
        write_parse_body(&mut injected.bytes, statement);
        injected.parses += 1;
        info.prepared_seq += 1;
        info.prepared
            .insert(name.to_vec(), (Some(statement.clone()), info.prepared_seq));
        self.unconfirmed.push(name.to_vec());
        Some(injected)
    }

    /// The client closed its named statement. Whether the server did depends on its batch:
    /// the connection's entry becomes unknown (closed again before the name is used again).
    pub fn close_statement(&mut self, name: &[u8]) {
        self.statements.remove(name);
        if let Some(lent) = self.lent.as_mut()
            && let Some(entry) = lent.info_mut().prepared.get_mut(name)
        {
            entry.0 = None;
        }
    }

    /// The client's Parses in flight were taken (`ok`), or perhaps not.
    fn settle_parses(&mut self, ok: bool) {
        for name in self.parsed.drain(..) {
            if let Some((_, taken)) = self.statements.get_mut(&name)
                && *taken == Taken::Pending
            {
                *taken = if ok { Taken::Yes } else { Taken::Unknown };
            }
        }
    }

    /// Closes the connection's oldest statement when it holds as many as it may.
    fn make_room(info: &mut super::server::ConnInfo, injected: &mut Injected) {
        if info.prepared.len() < MAX_PREPARED_PER_CONNECTION {
            return;
        }
        let oldest = info
            .prepared
            .iter()
            .min_by_key(|(_, (_, seq))| *seq)
            .map(|(name, _)| name.clone());
        if let Some(name) = oldest {
            info.prepared.remove(&name);
            write_close_statement(&mut injected.bytes, &name);
            injected.closes += 1;
        }
    }
}

impl Drop for Lending {
    fn drop(&mut self) {
        if self.pinned.is_some() {
            self.pool.metrics.pinned.decrement(1.0);
        }
    }
}
