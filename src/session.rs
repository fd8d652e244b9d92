//! One client's life: the first packet, the server connection, the relay, and a clean end.
//!
//! The relay is one task that polls both directions itself, so neither can block the other:
//! a client busy sending COPY data while the server sends notices makes progress both ways.

use std::future::{Future, poll_fn};
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use atomic_waker::AtomicWaker;
use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep, timeout};
use tracing::{Instrument, Span, debug, info, warn};

use crate::breaker::{Decision, Success};
use crate::cancel::Target;
use crate::classify::{Control, Kind, Memo, classify, session_feature, transaction_control};
use crate::config::{Config, ListenTls, PoolMode};
use crate::detach::{Detached, Next};
use crate::errors::{Cause, Deadline, Lost, Refusal};
use crate::live::Snapshot;
use crate::metrics::{Class, Outcome};
use crate::pipe::Pipe;
use crate::pool::{self, lending::Lending};
use crate::probe::circuit_settings;
use crate::protocol::backend::{self, Severity, TxStatus};
use crate::protocol::framing::Header;
use crate::protocol::{frontend, startup};
use crate::tls::Stream;
use crate::tracker::{Effect, Refused, Tracker};
use crate::upstream::{self, ConnectError};
use crate::{Phase, Shared};

/// How long bulkhead's last words to a client may take to write before it gives up on them.
const FAREWELL_TIMEOUT: Duration = Duration::from_secs(1);

/// Serves one accepted client connection to its end. `_alive` is dropped when the session
/// ends, which is how the server knows it has drained.
///
/// Startup and the farewell run inside `span`. The relay in between does not enter it on every
/// wake-up (that was about 8% of the relay's user CPU); its few log lines name `span` as
/// their parent instead.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    client: std::net::TcpStream,
    admitted: bool,
    _alive: mpsc::Sender<()>,
    span: Span,
) {
    let _client_gauge = GaugeGuard::new(&shared.metrics.client_connections);
    let _client_count = ClientCount(&shared.admission);
    // Startup and the farewell are boxed: the task of an idle session holds only the relay's
    // state, not room for theirs too (that was 2 KiB more per idle session).
    let Some((mut relay, _server_gauge)) =
        Box::pin(start(&shared, client, admitted, span.clone()).instrument(span.clone())).await
    else {
        return;
    };
    let end = relay.run(&shared).await;
    Box::pin(
        async {
            if let Some((pid, secret)) = relay.client_key {
                shared.cancels.remove(pid, secret);
            }
            // The session takes no more statements: its slots go to others before the farewell.
            relay.release_slots(&shared);
            let reuse = relay.lending.is_some() && relay.server.is_some() && relay.reusable(&end);
            relay.finish(&shared, end, reuse).await;
            if let Some(lending) = relay.lending.take()
                && let Some(stream) = relay.server.take().filter(|_| reuse)
            {
                let config = relay.config.config().clone();
                lending.finish(stream, &config).await;
            }
        }
        .instrument(span),
    )
    .await
}

/// From the client's first packet to the startup packet sent on to the server (passthrough),
/// or to the client logged in with a pooled connection lent to it; the relay takes it from
/// there. `None` when the client has been answered already (refused, or a cancel request).
async fn start(
    shared: &Arc<Shared>,
    client: std::net::TcpStream,
    admitted: bool,
    span: Span,
) -> Option<(Relay, Option<GaugeGuard>)> {
    // Accepted on another runtime: register it with this worker's reactor.
    let client = match TcpStream::from_std(client) {
        Ok(client) => client,
        Err(e) => {
            warn!(error = %e, "cannot take over a client connection");
            return None;
        }
    };
    let config = Snapshot::new(&shared.live);
    let started = Instant::now();
    let startup_deadline = started + config.config().timeouts.startup;
    let mut client = Stream::Plain(client);
    let mut negotiations = 0;
    let first = loop {
        let step = tokio::time::timeout_at(
            startup_deadline,
            // Boxed, as are the other startup steps: their state (a TLS handshake's is
            // kilobytes) is freed when they finish instead of sizing the session's task.
            Box::pin(read_first_packet(
                shared,
                config.config(),
                &mut client,
                &mut negotiations,
            )),
        )
        .await;
        match step {
            Ok(Ok(First::Start(first))) => break first,
            Ok(Ok(First::Done)) => {
                // A cancel request that came over TLS (libpq 17's cancel API encrypts it):
                // end the TLS session properly, as PostgreSQL does. OpenSSL 3 reports a close
                // without close_notify as an error, and the client's cancel call fails.
                if client.is_tls() {
                    let _ = timeout(FAREWELL_TIMEOUT, client.shutdown()).await;
                }
                return None;
            }
            Ok(Ok(First::Upgrade)) => {
                match Box::pin(accept_tls(shared, client, startup_deadline)).await {
                    Some(tls) => client = tls,
                    None => return None,
                }
            }
            Ok(Err(refusal)) => {
                refuse(&mut client, refusal).await;
                return None;
            }
            Err(_) => {
                refuse(&mut client, Refusal::StartupTimeout).await;
                return None;
            }
        }
    };
    if !admitted {
        // Refused after the first packet, as PostgreSQL does, so every client can read it.
        let max = shared.admission.max_clients();
        refuse(&mut client, Refusal::TooManyClients(max)).await;
        return None;
    }
    if config.config().pool.mode != PoolMode::Passthrough {
        return Box::pin(start_pooled(
            shared,
            client,
            first,
            startup_deadline,
            config,
            span,
        ))
        .await;
    }
    let (mut server, addr, host) = match Box::pin(connect_primary(shared, config.config())).await {
        Ok(connected) => connected,
        Err(refusal) => {
            if let Refusal::NoPrimary(why) = &refusal {
                warn!(%why, "no writable primary for a new session");
            }
            refuse(&mut client, refusal).await;
            return None;
        }
    };
    let server_gauge = GaugeGuard::new(&shared.metrics.server_connections);
    debug!(server = %addr, "connected to server");
    let FirstPacket { packet, leftover } = first;
    if let Err(e) = server.write_all(&packet).await {
        refuse(
            &mut client,
            Refusal::ServerLost(e.to_string(), Lost::Nothing),
        )
        .await;
        return None;
    }
    // Not kept for the session's life: it shares its memory with `leftover`, copied below.
    drop(packet);
    let relay = Relay::new(
        client,
        Some(server),
        addr,
        host,
        leftover,
        startup_deadline,
        config,
        span,
    );
    Some((relay, Some(server_gauge)))
}

/// The pooled modes' startup: bulkhead logs the client in itself and lends it a server
/// connection of its pool (`crate::pool::login`).
async fn start_pooled(
    shared: &Arc<Shared>,
    mut client: Stream,
    first: FirstPacket,
    startup_deadline: Instant,
    config: Snapshot,
    span: Span,
) -> Option<(Relay, Option<GaugeGuard>)> {
    let FirstPacket { packet, leftover } = first;
    if !leftover.is_empty() {
        // Nothing can come before the server's first request but the startup packet.
        let why = "data after the startup packet before authentication".to_string();
        refuse(&mut client, Refusal::ClientProtocol(why)).await;
        return None;
    }
    let login = pool::login::log_in(shared, config.config(), &mut client, &packet);
    let logged = match tokio::time::timeout_at(startup_deadline, login).await {
        Ok(Ok(logged)) => logged,
        Ok(Err(pool::login::Failed::Refused(refusal))) => {
            info!(error = ?refusal, "pooled login refused");
            refuse(&mut client, refusal).await;
            return None;
        }
        Ok(Err(pool::login::Failed::Server(error))) => {
            // The server's own words (a role that may not log in, a setting it refused).
            let _ = timeout(FAREWELL_TIMEOUT, async {
                client.write_all(&error).await?;
                client.shutdown().await
            })
            .await;
            return None;
        }
        Err(_) => {
            refuse(&mut client, Refusal::StartupTimeout).await;
            return None;
        }
    };
    let mut lending = Box::new(logged.lending);
    let (stream, info) = lending.take_stream();
    let server_key = (info.pid, info.secret.clone());
    let (addr, host) = (info.addr, info.host);
    let mut relay = Relay::new(
        client,
        Some(stream),
        addr,
        host,
        leftover,
        startup_deadline,
        config,
        span,
    );
    relay.logged_in(server_key, logged.client_key, lending);
    if relay.lending.as_ref().is_some_and(|l| l.per_transaction) {
        // Transaction pooling: the connection lent for the login goes back at once.
        relay.release_server();
    }
    Some((relay, None))
}

/// Counts a client for max_clients while it is connected.
struct ClientCount<'a>(&'a crate::admission::Admission);

impl Drop for ClientCount<'_> {
    fn drop(&mut self) {
        self.0.client_left();
    }
}

/// A wait for a concurrency slot: which one, and the wait itself.
struct SlotWait {
    write: bool,
    wait: Pin<Box<dyn Future<Output = bool> + Send>>,
}

/// Connects to the writable primary, waiting up to [circuit] hold_new_connections for one to be
/// known and to accept, so a short failover is ridden through. The hold is counted from when
/// the primary was lost, not from each connection's arrival: once no primary has been known for
/// that long, no failover is in sight, and new connections are refused at once rather than each
/// holding an application worker for the whole hold. Returns the stream, the address reached
/// and the host's index. TLS that cannot be set up is reported at once: waiting would not fix a
/// certificate.
pub(crate) async fn connect_primary(
    shared: &Shared,
    config: &Config,
) -> Result<(Stream, SocketAddr, usize), Refusal> {
    let hold = config.circuit.hold_new_connections;
    let mut deadline = Instant::now() + hold;
    let mut primary = shared.topology.watch_primary();
    let mut last_error = String::from("none is known");
    loop {
        let known = primary.borrow_and_update().clone();
        if let Some(p) = known {
            match upstream::connect(
                &p.address,
                config.database.connect_timeout,
                &shared.tls.get(),
            )
            .await
            {
                Ok((stream, addr)) => return Ok((stream, addr, p.index)),
                Err(ConnectError::Tls(why)) => return Err(Refusal::ServerTls(why)),
                Err(ConnectError::NoDescriptors(_)) => return Err(Refusal::OutOfDescriptors),
                Err(ConnectError::Unreachable(why) | ConnectError::NoAnswer(why)) => {
                    last_error = why
                }
            }
        } else if let Some(why) = shared.topology.tls_failure() {
            // Every host fails TLS as configured: no primary will appear by waiting.
            return Err(Refusal::ServerTls(why));
        } else if let Some(since) = shared.topology.no_primary_since() {
            deadline = deadline.min(since + hold);
        }
        let now = Instant::now();
        if now >= deadline {
            let gone = shared
                .topology
                .no_primary_since()
                .map(|since| now.saturating_duration_since(since));
            let waited = match gone {
                Some(gone) if gone >= hold => format!(
                    "none for {}, longer than hold_new_connections",
                    humantime::format_duration(Duration::from_millis(gone.as_millis() as u64))
                ),
                _ => format!("waited {}", humantime::format_duration(hold)),
            };
            let mut why = format!("{last_error} ({waited})");
            // Some host fails TLS as configured: that may be why no primary is known.
            if let Some(tls) = shared.topology.any_tls_failure() {
                why.push_str(&format!("; TLS failed: {tls}"));
            }
            return Err(Refusal::NoPrimary(why));
        }
        // Wait for the probe to see a change, but look again at least every probe interval.
        let retry = (Instant::now() + config.probe.interval).min(deadline);
        let _ = tokio::time::timeout_at(retry, primary.changed()).await;
    }
}

/// Does the TLS handshake with a client that was answered 'S'. `None` when it failed; there
/// is no way left to tell the client why.
async fn accept_tls(shared: &Shared, client: Stream, deadline: Instant) -> Option<Stream> {
    let tls = shared.tls.get();
    let (Stream::Plain(tcp), Some(acceptor)) = (client, tls.acceptor()) else {
        return None;
    };
    match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => Some(Stream::Tls(Box::new(tls.into()))),
        Ok(Err(e)) => {
            info!(error = %e, "TLS handshake with a client failed");
            None
        }
        Err(_) => {
            info!("TLS handshake with a client did not finish within [timeouts] startup");
            None
        }
    }
}

/// A StartupMessage to forward, and anything the client sent after it.
struct FirstPacket {
    packet: BytesMut,
    leftover: BytesMut,
}

/// What the client's first packets came to.
enum First {
    /// A StartupMessage: the session begins.
    Start(FirstPacket),
    /// The client asked for TLS and was answered 'S': the handshake is next.
    Upgrade,
    /// Nothing more to do: a cancel request, or the client left.
    Done,
}

/// Reads the first packet, answering encryption requests and handling cancel requests on the
/// way. `negotiations` counts encryption requests across TLS upgrades.
async fn read_first_packet(
    shared: &Shared,
    config: &Config,
    client: &mut Stream,
    negotiations: &mut u32,
) -> Result<First, Refusal> {
    let mut buf = BytesMut::with_capacity(512);
    loop {
        let parsed = match startup::parse(&buf) {
            Ok(parsed) => parsed,
            Err(e) if e.closes_silently() => {
                // As PostgreSQL: logged, and the connection closed without an answer.
                info!(error = %e, "closing a connection whose first packet cannot be trusted");
                return Ok(First::Done);
            }
            Err(e @ startup::StartupError::UnsupportedProtocol { .. }) => {
                return Err(Refusal::UnsupportedProtocol(e.to_string()));
            }
            Err(e) => return Err(Refusal::ClientProtocol(e.to_string())),
        };
        let Some((packet, len)) = parsed else {
            match client.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return Ok(First::Done),
                Ok(_) => continue,
            }
        };
        match packet {
            startup::Startup::SslRequest | startup::Startup::GssEncRequest => {
                *negotiations += 1;
                if client.is_tls() {
                    return Err(Refusal::ClientProtocol(
                        "encryption requested inside a TLS session".into(),
                    ));
                }
                if *negotiations > 2 {
                    return Err(Refusal::ClientProtocol(
                        "too many encryption requests".into(),
                    ));
                }
                let tls = matches!(packet, startup::Startup::SslRequest)
                    && shared.tls.get().acceptor().is_some();
                if tls && buf.len() > len {
                    // Bytes sent before the handshake would be taken as if they came over
                    // TLS: the CVE-2021-23214 class of bug. PostgreSQL refuses them too.
                    return Err(Refusal::ClientProtocol(
                        "received unencrypted data after SSL request".into(),
                    ));
                }
                buf.advance(len);
                // 'S': TLS from the next byte. 'N': go on in plaintext (no GSSAPI here).
                if client
                    .write_all(if tls { b"S" } else { b"N" })
                    .await
                    .is_err()
                {
                    return Ok(First::Done);
                }
                if tls {
                    return Ok(First::Upgrade);
                }
            }
            startup::Startup::Cancel { pid, key } => {
                // Accepted in plaintext whatever [listen] tls says, as PostgreSQL does:
                // libpq sends cancel requests unencrypted.
                forward_cancel(shared, config, pid, key).await;
                return Ok(First::Done);
            }
            startup::Startup::Start { params, .. } => {
                debug!(
                    user = params.get("user").unwrap_or(""),
                    database = params.get("database").unwrap_or(""),
                    tls = client.is_tls(),
                    "startup"
                );
                if shared.tls.get().listen == ListenTls::Require && !client.is_tls() {
                    return Err(Refusal::TlsRequired);
                }
                let packet = buf.split_to(len);
                return Ok(First::Start(FirstPacket {
                    packet,
                    leftover: buf,
                }));
            }
        }
    }
}

/// Passes a client's CancelRequest to the backend its key stands for; drops it when the key is
/// not a live session's, so no client can cancel another's statement.
async fn forward_cancel(shared: &Shared, config: &Config, pid: i32, key: &[u8]) {
    match shared.cancels.lookup(pid, key) {
        Some(target) => {
            shared.metrics.cancels_forwarded.increment(1);
            debug!(pid, server = %target.addr, "forwarding client cancel request");
            if let Err(e) = upstream::send_cancel(
                target.addr,
                target.pid,
                &target.key,
                config.database.connect_timeout,
            )
            .await
            {
                warn!(error = %e, "could not forward cancel request");
            }
        }
        None => {
            shared.metrics.cancels_unknown.increment(1);
            match shared.cancels.unknown_key() {
                Some(dropped) => warn!(
                    pid,
                    dropped,
                    "dropped cancel requests with unknown keys (logged at most every 10 s)"
                ),
                None => debug!(pid, "dropped cancel request with an unknown key"),
            }
        }
    }
}

/// After a half-close, reads until the client closes too. Closing a socket that still has
/// unread input makes the kernel send a reset, and a reset can destroy the last words the
/// client has not read yet.
async fn linger(client: &mut (impl AsyncRead + Unpin)) -> io::Result<()> {
    let mut sink = [0u8; 512];
    while client.read(&mut sink).await? > 0 {}
    Ok(())
}

/// Answers a client accepted on the reserve descriptor when there were none left: FATAL 53300
/// after its first packet (or at once, if none comes quickly), then closes and gives the
/// descriptor back to the reserve.
pub(crate) async fn refuse_out_of_descriptors(client: TcpStream, reserve: crate::fds::Reserve) {
    let mut client = Stream::Plain(client);
    let mut first = [0u8; 1024];
    let _ = timeout(Duration::from_millis(200), client.read(&mut first)).await;
    refuse(&mut client, Refusal::OutOfDescriptors).await;
    drop(client);
    reserve.restore();
}

/// Sends a refusal to a client that has no server yet, then closes.
async fn refuse(client: &mut Stream, refusal: Refusal) {
    match refusal {
        // The probe reports the reason once; every session refused for it would repeat it.
        Refusal::ServerTls(_) => debug!(?refusal, "refusing connection"),
        _ => info!(?refusal, "refusing connection"),
    }
    let mut out = BytesMut::new();
    refusal.write(&mut out);
    let _ = timeout(FAREWELL_TIMEOUT, async {
        client.write_all(&out).await?;
        client.shutdown().await?;
        linger(client).await
    })
    .await;
}

/// Why the relay stopped.
#[derive(Debug)]
enum End {
    /// The client closed its connection (after Terminate or not).
    ClientLeft,
    /// The client broke the protocol.
    ClientBroke(String),
    /// The server closed or broke its connection.
    ServerLost(String),
    /// The server accepted the connection but did not answer the startup packet in time.
    ServerSilent(String),
    /// The session reached a point where it can close without losing anything, while draining.
    Drained,
    /// The session's primary was replaced, and the session reached a quiet point.
    Demoted,
    /// bulkhead is closing every session now.
    Closing,
    /// The client did not finish startup in time.
    StartupTimeout,
    /// A deadline passed and the server did not answer bulkhead's cancel in time.
    Unanswered(Deadline),
    /// bulkhead refused to go on, for the reason given.
    Refused(Refusal),
    /// bulkhead's cancel released a commit that was waiting for synchronous replication.
    CommitUnconfirmed(Deadline),
    /// The probe found the server not answering while this session had a statement there, or
    /// was about to send one.
    Unresponsive,
}

/// bulkhead has sent a CancelRequest because a deadline passed, and waits for the answer.
#[derive(Debug, Clone, Copy)]
struct Cancelling {
    deadline: Deadline,
    /// If the request is not answered by then, the session is closed.
    give_up_at: Instant,
}

/// The Sync that stands in for a refused Query: the server answers it with ReadyForQuery and
/// does nothing else.
const SYNC: &[u8] = b"S\0\0\0\x04";

/// A session quiet at least this long gives its buffers back when its timer next fires (within
/// a deadline period); they are allocated again on demand. A connection in steady use never
/// pays for it.
const IDLE_RELEASE: Duration = Duration::from_secs(1);

/// What a COMMIT in a failed block becomes, as PostgreSQL itself does.
const ROLLBACK_QUERY: &[u8] = b"Q\0\0\0\x0dROLLBACK\0";

/// Why `frame_client` stopped.
enum Hold {
    /// Everything buffered has been framed.
    Done,
    /// The next message must wait until earlier requests are answered.
    Wait,
}

struct Relay {
    client: Stream,
    /// `None` between transactions in transaction pooling.
    server: Option<Stream>,
    /// Client to server.
    up: Pipe,
    /// Server to client.
    down: Pipe,
    /// The last Parse text classified: drivers parse the same unnamed statement again and
    /// again.
    memo: Memo,
    /// The server address this session is connected to; cancels go there.
    server_addr: SocketAddr,
    /// Which of [database] hosts that is: its write circuit, and whether it is still primary.
    host: usize,
    /// The server's own cancel key, once it has sent BackendKeyData.
    server_key: Option<(i32, bytes::Bytes)>,
    /// The key bulkhead gave the client (its backend's pid, bulkhead's secret), to unregister at the end.
    client_key: Option<(i32, [u8; 4])>,
    /// Until the first ReadyForQuery, authentication is in progress and this is its deadline.
    startup_deadline: Option<Instant>,
    /// Until the server's first byte, how long it may stay silent after the startup packet.
    hello_deadline: Option<Instant>,
    /// Transaction status from the last ReadyForQuery.
    tx: TxStatus,
    /// The client believes its transaction block failed (bulkhead refused a write in it) while
    /// the server's block is still open: only ROLLBACK, ROLLBACK TO or COMMIT get through.
    client_tx_failed: bool,
    /// The rest of a refused extended-protocol batch is dropped up to its Sync.
    skip_to_sync: bool,
    /// Requests in flight, their classes and the head's clock.
    tracker: Tracker,
    /// The head request got an ErrorResponse (for the outcome metric).
    head_failed: bool,
    /// The head request got 25006 (read-only transaction): the host is no longer a primary.
    head_read_only: bool,
    /// bulkhead cancelled the head request because a deadline passed.
    head_timed_out: bool,
    /// Set while bulkhead waits for the server to answer its cancel.
    cancelling: Option<Cancelling>,
    /// Since when bytes for the server have been waiting because it does not read them.
    stalled_since: Option<Instant>,
    /// The server's last ErrorResponse was FATAL: it has told the client why it is leaving.
    server_said_fatal: bool,
    /// The client sent Terminate.
    client_terminated: bool,
    /// The client closed its side (EOF) with requests still in flight: until then their
    /// answers are still relayed, as PostgreSQL answers a client that half-closed after its
    /// Query; after it the client is taken to have vanished and its statement is cancelled.
    client_eof_until: Option<Instant>,
    /// End the session at its next quiet point, with this ending.
    leave_when_quiet: Option<fn() -> End>,
    /// One timer for the session, set to the earliest thing that can expire. It is moved
    /// earlier at once but later only lazily (when it fires early), so most requests cost no
    /// timer update.
    timer: Pin<Box<Sleep>>,
    /// What `timer` is set to, if it is armed.
    timer_at: Option<Instant>,
    /// `timer` has been polled since it was last set, so it holds the watches' waker and will
    /// raise the WATCHES bit when it fires; until then the relay need not poll it again.
    timer_polled: bool,
    /// A read from the client (the server) found nothing, and the socket has not woken the
    /// task since: it holds the client's (server's) waker and will, once there is more. Until
    /// then reading it again would only find nothing again.
    client_dry: bool,
    server_dry: bool,
    /// This session's copy of the settings, refreshed after a reload.
    config: Snapshot,
    /// The session holds an "all" slot, and a write slot, until its transaction ends.
    holds_all: bool,
    holds_write: bool,
    /// Waiting for a slot, at most queue_timeout.
    slot_wait: Option<SlotWait>,
    /// The wait ran out: the statement waiting for it is shed (true: for a write slot).
    shed_next: Option<bool>,
    /// Since when nothing has been in flight, while buffers are still held.
    idle_since: Option<Instant>,
    /// ParseCompletes the server owes for Parses bulkhead added itself; the client never
    /// asked for them, so they are dropped.
    swallow_parse_complete: u32,
    /// The server connection is TLS: the server may offer SCRAM channel binding, which cannot
    /// reach through bulkhead.
    server_tls: bool,
    /// The server offered SASL over TLS; the client's next password message picks the
    /// mechanism.
    sasl_offered: bool,
    /// The server stopped answering and bulkhead answers the client itself (see
    /// `crate::detach`).
    detached: Option<Detached>,
    /// The pooled modes: the client's hold on its pool's connections. The client's Terminate
    /// is not passed on to a pooled connection.
    lending: Option<Box<Lending>>,
    /// CloseCompletes the server owes for Closes bulkhead added itself (transaction pooling).
    swallow_close_complete: u32,
    /// The session's span: the relay's log lines name it as their parent.
    span: Span,
}

/// What woke a session's relay loop, as far as it must act on it.
enum Event {
    /// The phase watch changed (false: its sender is gone).
    Phase(bool),
    Primary,
    /// The host's alarm: its write circuit opened, or it stopped answering.
    Alarm,
    End(End),
}

/// Which of a session's sources woke its task since the relay last looked: one bit each.
#[derive(Default)]
struct Woke {
    bits: AtomicU8,
    task: AtomicWaker,
}

/// The phase and primary watches, and the session timer.
const WATCHES: u8 = 1;
/// The client's socket (readable, or writable again).
const CLIENT: u8 = 2;
/// The server's socket.
const SERVER: u8 = 4;

/// Wakes a session's task and records which source woke it.
struct BitWaker {
    woke: Arc<Woke>,
    bit: u8,
}

impl Wake for BitWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woke.bits.fetch_or(self.bit, Ordering::Release);
        self.woke.task.wake();
    }
}

/// The wakers a session polls its sources with, so that it knows which of them woke it and
/// polls only those: polling one that did not (a watch: its lock; a socket: tokio's readiness
/// machinery) costs about as much as relaying a message.
struct Wakers {
    watches: Waker,
    client: Waker,
    server: Waker,
}

impl Wakers {
    fn new(woke: &Arc<Woke>) -> Self {
        let waker = |bit| {
            Waker::from(Arc::new(BitWaker {
                woke: woke.clone(),
                bit,
            }))
        };
        Wakers {
            watches: waker(WATCHES),
            client: waker(CLIENT),
            server: waker(SERVER),
        }
    }
}

/// What admission says about the statement at hand.
enum Admit {
    Go,
    Wait,
    Shed { write_slot: bool },
}

impl Relay {
    #[allow(clippy::too_many_arguments)] // each is one thing startup learned
    fn new(
        client: Stream,
        server: Option<Stream>,
        server_addr: SocketAddr,
        host: usize,
        leftover: BytesMut,
        startup_deadline: Instant,
        config: Snapshot,
        span: Span,
    ) -> Self {
        let mut up = Pipe::default();
        up.preload(&leftover);
        let now = Instant::now();
        let hello_deadline = now + config.config().database.connect_timeout;
        Relay {
            server_tls: server.as_ref().is_some_and(Stream::is_tls),
            client,
            server,
            up,
            down: Pipe::default(),
            memo: Memo::default(),
            server_addr,
            host,
            server_key: None,
            client_key: None,
            startup_deadline: Some(startup_deadline),
            hello_deadline: Some(hello_deadline),
            tx: TxStatus::Idle,
            client_tx_failed: false,
            skip_to_sync: false,
            tracker: Tracker::new(now),
            head_failed: false,
            head_read_only: false,
            head_timed_out: false,
            cancelling: None,
            stalled_since: None,
            server_said_fatal: false,
            client_terminated: false,
            client_eof_until: None,
            leave_when_quiet: None,
            timer: Box::pin(tokio::time::sleep_until(
                hello_deadline.min(startup_deadline),
            )),
            timer_at: Some(hello_deadline.min(startup_deadline)),
            timer_polled: false,
            client_dry: false,
            server_dry: false,
            config,
            holds_all: false,
            holds_write: false,
            slot_wait: None,
            shed_next: None,
            idle_since: None,
            swallow_parse_complete: 0,
            sasl_offered: false,
            detached: None,
            lending: None,
            swallow_close_complete: 0,
            span,
        }
    }

    fn authenticated(&self) -> bool {
        self.startup_deadline.is_none()
    }

    /// A pooled session starts logged in: bulkhead answered the client's startup itself.
    fn logged_in(
        &mut self,
        server_key: (i32, bytes::Bytes),
        client_key: (i32, [u8; 4]),
        lending: Box<Lending>,
    ) {
        self.startup_deadline = None;
        self.hello_deadline = None;
        self.server_key = Some(server_key);
        self.client_key = Some(client_key);
        self.lending = Some(lending);
        self.idle_since = Some(Instant::now());
        self.timer_at = None;
    }

    /// Whether the server connection can go back to its pool after `end`: the client left with
    /// nothing in flight, no transaction open and the server's stream at a message boundary.
    fn reusable(&self, end: &End) -> bool {
        matches!(end, End::ClientLeft)
            && self.is_quiet()
            && self.detached.is_none()
            && self.cancelling.is_none()
            && !self.server_said_fatal
            && !self.down.mid_message()
            && self.swallow_parse_complete == 0
            && self.swallow_close_complete == 0
            && self.stalled_since.is_none()
    }

    /// Transaction pooling: whether the server connection can go back between transactions
    /// now: the server said idle, nothing is in flight or on its way, and the client is not
    /// pinned to it.
    fn releasable(&self) -> bool {
        self.server.is_some()
            && self
                .lending
                .as_ref()
                .is_some_and(|l| l.per_transaction && l.pinned.is_none() && !l.waiting())
            && self.tx == TxStatus::Idle
            && !self.client_tx_failed
            && self.tracker.in_flight() == 0
            && self.cancelling.is_none()
            && self.detached.is_none()
            && !self.up.has_output()
            && !self.up.mid_message()
            && !self.down.mid_message()
            && self.swallow_parse_complete == 0
            && self.swallow_close_complete == 0
            && self.stalled_since.is_none()
            && self.authenticated()
    }

    /// Gives the server connection back to the pool between transactions.
    fn release_server(&mut self) {
        let (Some(stream), Some(lending)) = (self.server.take(), self.lending.as_deref_mut())
        else {
            return;
        };
        lending.release(stream);
        self.server_key = None;
        self.server_dry = false;
    }

    fn per_transaction(&self) -> bool {
        self.lending.as_ref().is_some_and(|l| l.per_transaction)
    }

    /// Transaction pooling: a client's Parse. A named statement is remembered, to be prepared
    /// on other connections before its use; one that names a feature tied to the backend pins
    /// the client.
    fn track_parse(&mut self, h: &Header) {
        let whole = self.up.is_whole(h);
        let Some(l) = self.lending.as_deref_mut() else {
            return;
        };
        let body = self.up.body(h);
        let Some((name, text)) = frontend::parse_message(body) else {
            return;
        };
        if l.pinned.is_none()
            && let Some(feature) = session_feature(text)
        {
            l.pin(feature);
        }
        if name.is_empty() {
            return;
        }
        if !whole {
            // Not held whole, so it cannot be prepared again elsewhere.
            l.pin("a prepared statement larger than 64 KiB");
            return;
        }
        let injected = l.parse(name, body);
        self.put_before(injected);
    }

    /// Transaction pooling: a Bind or Describe of a named statement the connection lacks gets
    /// it prepared there first; a Close of one is followed. False: wait for earlier requests
    /// to be answered first.
    fn track_statement_use(&mut self, h: &Header) -> bool {
        let body = self.up.body(h);
        let statement = match h.tag {
            frontend::BIND_TAG => frontend::bind_names(body).map(|(_, s)| s),
            frontend::DESCRIBE_TAG | frontend::CLOSE_TAG => match frontend::close_target(body) {
                Some((b'S', name)) => Some(name),
                _ => None,
            },
            _ => None,
        };
        let (Some(name), Some(l)) = (statement, self.lending.as_deref_mut()) else {
            return true;
        };
        if name.is_empty() {
            return true;
        }
        if h.tag == frontend::CLOSE_TAG {
            l.close_statement(name);
            return true;
        }
        if !l.would_inject(name) {
            return true;
        }
        if self.tracker.before_open() > 0 {
            return false;
        }
        if let Some(injected) = l.use_statement(name) {
            self.put_before(injected);
        }
        true
    }

    /// Puts bulkhead's own messages in front of the client's current one, and notes the
    /// answers to drop.
    fn put_before(&mut self, injected: pool::lending::Injected) {
        if injected.bytes.is_empty() {
            return;
        }
        self.up.put_before(&injected.bytes);
        self.swallow_parse_complete += injected.parses;
        self.swallow_close_complete += injected.closes;
    }

    /// A connection was lent for the client's next transaction.
    fn attach(&mut self, stream: Stream) {
        let Some(info) = self.lending.as_deref_mut().and_then(|l| l.info()) else {
            return;
        };
        self.server_key = Some((info.pid, info.secret.clone()));
        self.server_addr = info.addr;
        self.host = info.host;
        self.server = Some(stream);
        self.server_dry = false;
        self.stalled_since = None;
    }

    /// Relays until the session has to end, and says why.
    async fn run(&mut self, shared: &Shared) -> End {
        let mut phase = shared.phase.clone();
        if *phase.borrow_and_update() != Phase::Running {
            return End::Closing;
        }
        let mut primary = shared.topology.watch_primary();
        primary.borrow_and_update();
        let mut primary_gone = false;
        let mut alarm = shared.topology.circuit(self.host).watch_alarm();
        alarm.borrow_and_update();
        let mut alarm_gone = false;
        let mut alarm_host = self.host;
        // The watches are polled only after they woke the session: polling a waiting watch
        // takes its lock, which every session shares, and the relay wakes the task for every
        // message. Likewise each socket is read only after it woke the session.
        let woke = Arc::new(Woke::default());
        let wakers = Wakers::new(&woke);
        loop {
            if alarm_host != self.host {
                // Transaction pooling moved the session to another host's connection.
                alarm = shared.topology.circuit(self.host).watch_alarm();
                alarm.borrow_and_update();
                alarm_gone = false;
                alarm_host = self.host;
            }
            // Whatever happened, look at every source once more.
            woke.bits
                .store(WATCHES | CLIENT | SERVER, Ordering::Relaxed);
            let event = {
                let mut phase_changed = pin!(phase.changed());
                let mut primary_changed = pin!(primary.changed());
                let mut alarm_raised = pin!(alarm.changed());
                poll_fn(|cx| {
                    woke.task.register(cx.waker());
                    let bits = woke.bits.swap(0, Ordering::AcqRel);
                    if bits & WATCHES != 0 {
                        let mut watch_cx = Context::from_waker(&wakers.watches);
                        if let Poll::Ready(r) = phase_changed.as_mut().poll(&mut watch_cx) {
                            return Poll::Ready(Event::Phase(r.is_ok()));
                        }
                        if !primary_gone
                            && let Poll::Ready(r) = primary_changed.as_mut().poll(&mut watch_cx)
                        {
                            if r.is_ok() {
                                return Poll::Ready(Event::Primary);
                            }
                            primary_gone = true;
                        }
                        if !alarm_gone
                            && let Poll::Ready(r) = alarm_raised.as_mut().poll(&mut watch_cx)
                        {
                            if r.is_ok() {
                                return Poll::Ready(Event::Alarm);
                            }
                            alarm_gone = true;
                        }
                    }
                    self.poll_relay(cx, &wakers, bits, shared).map(Event::End)
                })
                .await
            };
            match event {
                Event::Phase(open) => {
                    let now = if open {
                        *phase.borrow_and_update()
                    } else {
                        Phase::Closing
                    };
                    match now {
                        Phase::Running => {}
                        Phase::Draining if self.is_quiet() => return End::Drained,
                        Phase::Draining => self.leave_when_quiet = Some(|| End::Drained),
                        Phase::Closing => return End::Closing,
                    }
                }
                Event::Primary => {
                    // Another host is primary now: this session's server takes no more writes.
                    // (No primary at all is a failover in progress; the session ends on its own
                    // if its server is gone.)
                    let now_primary = primary.borrow_and_update().as_ref().map(|p| p.index);
                    let replaced = now_primary.is_some_and(|index| index != self.host);
                    if let Some(l) = self.lending.as_deref_mut() {
                        l.primary = now_primary;
                        // The pooled connection must not go back to the pool.
                        l.retire |= replaced && self.server.is_some();
                        if l.per_transaction {
                            // The next transaction gets a connection to the new primary.
                            continue;
                        }
                    }
                    if replaced {
                        info!(parent: &self.span, "primary replaced; the session ends when its transaction does");
                        if self.is_quiet() {
                            return End::Demoted;
                        }
                        self.leave_when_quiet = Some(|| End::Demoted);
                    }
                }
                Event::Alarm => {
                    alarm.borrow_and_update();
                    if let Some(end) = self.on_alarm(shared) {
                        return end;
                    }
                }
                Event::End(end) => return end,
            }
        }
    }

    /// Moves bytes both ways and keeps the deadlines until something ends the session.
    /// Returns `Pending` when neither side can make progress and no deadline has passed.
    /// Each socket is polled with its own waker from `wakers`, the timer with the watches'
    /// one; `bits` says which of them woke the task since the last poll.
    fn poll_relay(
        &mut self,
        cx: &mut Context<'_>,
        wakers: &Wakers,
        bits: u8,
        shared: &Shared,
    ) -> Poll<End> {
        self.config.current(&shared.live);
        let client_cx = &mut Context::from_waker(&wakers.client);
        let server_cx = &mut Context::from_waker(&wakers.server);
        self.client_dry &= bits & CLIENT == 0;
        self.server_dry &= bits & SERVER == 0;
        loop {
            let mut progress = false;

            if !self.client_dry && self.up.wants_read() {
                match self.up.poll_read_from(client_cx, &mut self.client) {
                    Poll::Ready(Ok(_)) => progress = true,
                    Poll::Ready(Err(e)) => {
                        debug!(parent: &self.span, error = %e, "client connection failed");
                        return Poll::Ready(End::ClientLeft);
                    }
                    Poll::Pending => self.client_dry = true,
                }
            }
            if let Some(w) = &mut self.slot_wait
                && let Poll::Ready(got) = w.wait.as_mut().poll(cx)
            {
                let write = w.write;
                self.slot_wait = None;
                progress = true;
                if got {
                    if write {
                        self.holds_write = true;
                    } else {
                        self.holds_all = true;
                    }
                } else {
                    self.shed_next = Some(write);
                }
            }
            if let Err(end) = self.frame_client(shared) {
                return Poll::Ready(end);
            }
            if self.lending.as_ref().is_some_and(|l| l.waiting()) {
                let lent = self
                    .lending
                    .as_deref_mut()
                    .map_or(Poll::Pending, |l| l.poll_wait(cx));
                match lent {
                    Poll::Ready(Ok(stream)) => {
                        self.attach(stream);
                        progress = true;
                        if let Err(end) = self.frame_client(shared) {
                            return Poll::Ready(end);
                        }
                    }
                    Poll::Ready(Err(pool::LendError::Refused(refusal))) => {
                        return Poll::Ready(End::Refused(refusal));
                    }
                    Poll::Ready(Err(pool::LendError::Server(error))) => {
                        let code = String::from_utf8_lossy(backend::error_info(&error[5..]).code)
                            .into_owned();
                        let why =
                            format!("the server refused a connection for this client ({code})");
                        return Poll::Ready(End::Refused(Refusal::NoServer(why)));
                    }
                    Poll::Pending => {}
                }
            }
            let Some(server) = self.server.as_mut() else {
                // Transaction pooling between transactions: only the client side moves.
                match self.down.poll_write_to(client_cx, &mut self.client) {
                    Poll::Ready(Ok(wrote)) => progress |= wrote,
                    Poll::Ready(Err(e)) => {
                        debug!(parent: &self.span, error = %e, "client connection failed");
                        return Poll::Ready(End::ClientLeft);
                    }
                    Poll::Pending => {}
                }
                if self.up.is_eof() && !self.up.mid_message() {
                    return Poll::Ready(End::ClientLeft);
                }
                if let Some(leave) = self.leave_when_quiet
                    && self.is_quiet()
                {
                    return Poll::Ready(leave());
                }
                if progress {
                    continue;
                }
                if let Some(end) = self.poll_deadlines(&wakers.watches, bits & WATCHES != 0, shared)
                {
                    return Poll::Ready(end);
                }
                return Poll::Pending;
            };
            let before = self.up.written();
            match self.up.poll_write_to(server_cx, server) {
                Poll::Ready(Ok(wrote)) => {
                    progress |= wrote;
                    self.stalled_since = None;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(self.server_gone(e.to_string())),
                // The server accepts nothing more for now: its stall clock runs from the last
                // byte it did accept.
                Poll::Pending if self.up.written() != before => {
                    progress = true;
                    self.stalled_since = Some(Instant::now());
                }
                Poll::Pending => {
                    self.stalled_since.get_or_insert_with(Instant::now);
                }
            }

            if !self.server_dry && self.down.wants_read() {
                match self.down.poll_read_from(server_cx, server) {
                    Poll::Ready(Ok(n)) => {
                        progress = true;
                        if n > 0 {
                            self.hello_deadline = None;
                        }
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(self.server_gone(e.to_string())),
                    Poll::Pending => self.server_dry = true,
                }
            }
            match self.frame_server(shared) {
                Ok(None) => {}
                Ok(Some(end)) => return Poll::Ready(end),
                Err(why) => return Poll::Ready(self.server_gone(why)),
            }
            if self.lending.is_some() && self.releasable() {
                self.release_server();
            }
            match self.down.poll_write_to(client_cx, &mut self.client) {
                Poll::Ready(Ok(wrote)) => progress |= wrote,
                Poll::Ready(Err(e)) => {
                    debug!(parent: &self.span, error = %e, "client connection failed");
                    return Poll::Ready(End::ClientLeft);
                }
                Poll::Pending => {}
            }

            if self.down.is_eof() && !self.down.has_output() {
                return Poll::Ready(self.server_gone("the server closed the connection".into()));
            }
            if self.up.is_eof() && !self.up.has_output() {
                // Half-closed after its last request, or gone: answer what is in flight for a
                // moment (a half-closed client reads it), then treat it as gone.
                if self.tracker.in_flight() == 0 || !self.authenticated() {
                    return Poll::Ready(End::ClientLeft);
                }
                if self.client_eof_until.is_none() {
                    self.client_eof_until =
                        Some(Instant::now() + self.config.config().timeouts.cancel_grace);
                    // Nothing more can come from this client: its slots go to others now.
                    self.release_slots(shared);
                }
            }
            if let Some(leave) = self.leave_when_quiet
                && self.is_quiet()
            {
                return Poll::Ready(leave());
            }
            if progress {
                continue;
            }
            // Checked once nothing moves, which a flow of bytes always comes to: the socket
            // runs dry or the task's cooperative budget runs out and reads return Pending.
            if let Some(end) = self.poll_deadlines(&wakers.watches, bits & WATCHES != 0, shared) {
                return Poll::Ready(end);
            }
            return Poll::Pending;
        }
    }

    /// The earliest moment something can expire: startup, the server's first answer, the head
    /// request's deadline, a stalled write, or the grace period of a cancel in progress.
    fn next_deadline(&self) -> Option<Instant> {
        if let Some(at) = self.startup_deadline {
            return Some(self.hello_deadline.map_or(at, |hello| hello.min(at)));
        }
        if let Some(c) = self.cancelling {
            return Some(c.give_up_at);
        }
        if let Some(at) = self.client_eof_until {
            return Some(at);
        }
        if self.detached.as_ref().is_some_and(|d| d.frozen) {
            // The abandoned request's clock starts again when the host answers.
            return None;
        }
        let t = &self.config.config().timeouts;
        let head = self.tracker.deadline(t.read, t.write);
        let stall = self.stalled_since.map(|since| since + t.write);
        match (head, stall) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (None, None) => self.idle_since.map(|since| since + IDLE_RELEASE),
            (a, b) => a.or(b),
        }
    }

    /// Keeps the timer on the earliest deadline and acts on any that has passed.
    ///
    /// The timer is polled with the watches' waker, so that a firing timer raises the WATCHES
    /// bit: it is polled again only when that bit was up (`flagged`) or it was just set.
    /// Polling it on every wake-up cost about 2.5% of the worker's instructions.
    fn poll_deadlines(&mut self, waker: &Waker, mut flagged: bool, shared: &Shared) -> Option<End> {
        loop {
            // With nothing to time, the timer stays armed where it is: re-arming it for the next
            // request would take the runtime's timer lock once per request. When it fires with
            // nothing due, that is one spurious wake-up.
            let want = self.next_deadline()?;
            // The idle release never pulls an armed timer earlier (sessions go idle between
            // every two transactions); it happens when the armed timer next fires.
            let idle_only = self.tracker.in_flight() == 0
                && self.stalled_since.is_none()
                && self.startup_deadline.is_none()
                && self.cancelling.is_none();
            if self.timer_at.is_none_or(|at| want < at && !idle_only) {
                self.timer.as_mut().reset(want);
                self.timer_at = Some(want);
                self.timer_polled = false;
            }
            if self.timer_polled && !flagged {
                return None;
            }
            self.timer_polled = true;
            if self
                .timer
                .as_mut()
                .poll(&mut Context::from_waker(waker))
                .is_pending()
            {
                return None;
            }
            flagged = false;
            self.timer_at = None;
            let now = Instant::now();
            if now < want {
                continue; // The timer was set for a deadline that has since moved later.
            }
            if self.hello_deadline.is_some_and(|at| at <= now) {
                let within =
                    humantime::format_duration(self.config.config().database.connect_timeout);
                return Some(End::ServerSilent(format!(
                    "{} accepted the connection but did not answer within {within}",
                    self.server_addr
                )));
            }
            if self.startup_deadline.is_some() {
                return Some(End::StartupTimeout);
            }
            if let Some(c) = self.cancelling {
                // A detached session's client has had its answer: the server is just gone.
                return Some(if self.detached.is_some() {
                    End::Unresponsive
                } else {
                    End::Unanswered(c.deadline)
                });
            }
            if self.client_eof_until.is_some_and(|at| at <= now) {
                return Some(End::ClientLeft);
            }
            if self.tracker.in_flight() == 0 && self.stalled_since.is_none() {
                // Quiet for IDLE_RELEASE: give the buffers back.
                if self.idle_since.take().is_some() {
                    self.up.release_if_empty();
                    self.down.release_if_empty();
                    self.memo.release();
                }
                continue;
            }
            self.start_cancel(shared, now, false);
        }
    }

    /// The host's alarm was raised. If the host no longer answers, a statement waiting there
    /// will not be answered either: end the session now. If the write circuit opened, a commit
    /// waiting there is cancelled and answered now rather than at its deadline, so the
    /// connection it holds goes back to the application.
    fn on_alarm(&mut self, shared: &Shared) -> Option<End> {
        if !self.authenticated() {
            return None;
        }
        let circuit = shared.topology.circuit(self.host);
        if self.detached.is_some() {
            self.follow_host(shared);
            return None;
        }
        if circuit.is_unresponsive() {
            return if self.tracker.in_flight() > 0 {
                self.detach(shared)
            } else {
                None
            };
        }
        if circuit.published() == crate::breaker::State::Open
            && self.cancelling.is_none()
            && self.head_commits()
        {
            self.start_cancel(shared, Instant::now(), true);
        }
        None
    }

    /// The host stopped answering with requests in flight: answer each of them now with an
    /// error and keep the session, dropping the server's late answers (see `crate::detach`).
    /// Returns the ending instead when answers cannot be cut in cleanly (part of a message is
    /// already out either way, or the session is in COPY, or its client has gone), or when a
    /// statement in flight may change the server for good and the status checks confirm the
    /// host silent; with such a statement and only the heartbeat's word, nothing changes.
    fn detach(&mut self, shared: &Shared) -> Option<End> {
        if self.down.is_streaming()
            || self.up.is_streaming()
            || self.tracker.in_copy()
            || self.client_eof_until.is_some()
        {
            return Some(End::Unresponsive);
        }
        // Only reads are cut loose. A write in flight may commit when the server wakes (an
        // autocommit write; a COMMIT, also inside a multi-statement Query; a write in a batch
        // the Sync that closes it would commit), and one that creates or closes a named
        // prepared statement would leave the server's statements other than the client
        // believes. Such a session is not detached: on the heartbeat's word alone it waits (for
        // its deadline, or the status checks: a server that is only slow may still answer);
        // once the status checks confirm the host silent it ends as before, FATAL 40003 for a
        // write, and its connection is reset so that nothing of it still in the kernel's send
        // queue (a blackhole) is delivered later.
        let keeps = self.tracker.requests().any(|(_, lasting)| lasting);
        if keeps {
            let confirmed = shared
                .topology
                .circuit(self.host)
                .is_confirmed_unresponsive();
            return confirmed.then_some(End::Unresponsive);
        }
        let now = Instant::now();
        let why = shared.topology.circuit(self.host).reason_unresponsive();
        let mut detached = Detached::new(why, self.client_tx(), 0);
        // A batch the client has not finished: the server gets a Sync to close what it has of
        // it (that answer is dropped too), and the client its error now, as PostgreSQL sends
        // an error at once, then ReadyForQuery at the client's Sync.
        let open = self.tracker.is_open();
        if open {
            self.up.inject().extend_from_slice(SYNC);
            self.tracker.sync(now);
        }
        let answered = self.tracker.in_flight() - usize::from(open);
        let out = self.down.inject();
        for (class, _) in self.tracker.requests().take(answered) {
            detached.abandon(out);
            shared
                .metrics
                .class(class)
                .statement(Outcome::Error)
                .increment(1);
        }
        if open {
            detached.refuse_open_batch(out);
        }
        detached.owed = self.tracker.in_flight();
        warn!(parent: &self.span, requests = detached.owed, "server not answering: the statements waiting there are answered now; the session stays open");
        self.detached = Some(detached);
        self.release_slots(shared);
        self.slot_wait = None;
        self.shed_next = None;
        self.head_done();
        self.client_tx_failed = false;
        self.skip_to_sync = false;
        self.stalled_since = None;
        self.swallow_parse_complete = 0;
        None
    }

    /// A detached session looks at its host again: once it answers, the abandoned head
    /// request's clock starts over (its deadline did not run while the host was frozen).
    fn follow_host(&mut self, shared: &Shared) {
        let frozen = shared.topology.circuit(self.host).is_unresponsive();
        let Some(d) = &mut self.detached else {
            return;
        };
        if d.frozen != frozen {
            d.frozen = frozen;
            if !frozen {
                let owed = d.owed;
                self.tracker.restart_clock(Instant::now());
                info!(parent: &self.span, owed, "server answers again; catching up");
            }
        }
    }

    /// For a detached session about to frame a client message: whether the message must wait
    /// (true) because the server, answering again, still owes answers to drop or a ROLLBACK of
    /// bulkhead's own. Once the server has caught up and the client is outside a transaction,
    /// rolls back a block the server still has open, then follows the server again.
    fn reattach(&mut self, shared: &Shared) -> bool {
        self.follow_host(shared);
        let Some(d) = &mut self.detached else {
            return false;
        };
        if d.frozen {
            return false; // Answered here.
        }
        if d.owed > 0 {
            return true;
        }
        if !d.client_idle() {
            return false; // The client ends its block first, answered here.
        }
        if self.tx != TxStatus::Idle {
            // The client was told its transaction ended; the server's is still open.
            self.up.inject().extend_from_slice(ROLLBACK_QUERY);
            self.tracker.query(Kind::Read, Instant::now());
            d.owed = 1;
            return true;
        }
        info!(parent: &self.span, "caught up with the server; relaying again");
        self.detached = None;
        self.idle_since = Some(Instant::now());
        false
    }

    /// Whether the request the server is working on would commit writes: an autocommit write,
    /// or the COMMIT of a transaction that wrote.
    fn head_commits(&self) -> bool {
        self.tracker.head() == Some(Class::Write)
            && !self.tracker.head_refused()
            && (self.tx == TxStatus::Idle || self.tracker.head_is_commit())
    }

    /// How the relay ends when the server side closes or fails: after the client's Terminate
    /// that is the normal end of a session (the server closes its side as it should, and
    /// whichever close bulkhead sees first), not a lost server.
    fn server_gone(&self, why: String) -> End {
        if self.client_terminated {
            End::ClientLeft
        } else {
            End::ServerLost(why)
        }
    }

    /// A deadline has passed (or, with `circuit_opened`, the write circuit opened while a
    /// commit waited): ask the server to cancel, and give it `cancel_grace` to answer.
    fn start_cancel(&mut self, shared: &Shared, now: Instant, circuit_opened: bool) {
        let t = &self.config.config().timeouts;
        let stalled = !circuit_opened
            && self
                .stalled_since
                .is_some_and(|since| since + t.write <= now);
        let class = if stalled {
            Class::Write
        } else {
            self.tracker.head().unwrap_or(Class::Write)
        };
        let limit = if class == Class::Write {
            t.write
        } else {
            t.read
        };
        let cause = if circuit_opened {
            Cause::CircuitOpened
        } else if stalled {
            Cause::Stalled
        } else {
            Cause::Elapsed
        };
        let deadline = Deadline {
            class,
            limit,
            cause,
        };
        info!(parent: &self.span, %deadline, "deadline passed; cancelling the statement on the server");
        self.cancelling = Some(Cancelling {
            deadline,
            give_up_at: now + t.cancel_grace,
        });
        self.head_timed_out = true;
        self.cancel_on_server(shared);
    }

    /// Frames what the client sent: classifies statements, keeps track of requests, and refuses
    /// what must not run.
    fn frame_client(&mut self, shared: &Shared) -> Result<Hold, End> {
        let sasl = self.sasl_offered;
        let describe = self.detached.is_some() || self.per_transaction();
        let inspect = |tag| {
            matches!(
                tag,
                frontend::QUERY_TAG
                    | frontend::PARSE_TAG
                    | frontend::BIND_TAG
                    | frontend::EXECUTE_TAG
                    | frontend::CLOSE_TAG
            ) || (sasl && tag == frontend::PASSWORD_TAG)
                || (describe && tag == frontend::DESCRIBE_TAG)
        };
        // One clock reading for everything framed in this pass: it all arrived together.
        let mut clock = None;
        loop {
            // Nothing after a refused request may run before its answer is known: it decides
            // whether the client's transaction block has failed.
            if self.detached.is_some() {
                if self.reattach(shared) {
                    return Ok(Hold::Wait);
                }
                // Answered here, one message after the other as the client reads them: a
                // client that sends without reading is held back as the server would.
                if self.detached.is_some() && self.down.has_output() {
                    return Ok(Hold::Wait);
                }
            }
            if self.detached.is_none()
                && self.authenticated()
                && self.tracker.refusal_in_flight()
                && !self.skip_to_sync
            {
                return Ok(Hold::Wait);
            }
            if self.server.is_none() && self.lending.is_some() {
                // Transaction pooling between transactions: the client's next message needs
                // a connection (but a goodbye does not).
                let Some(h) = self
                    .up
                    .next(|_| false)
                    .map_err(|e| End::ClientBroke(e.to_string()))?
                else {
                    return Ok(Hold::Done);
                };
                if h.tag == frontend::TERMINATE_TAG {
                    self.client_terminated = true;
                    self.up.skip(&h);
                    return Err(End::ClientLeft);
                }
                let l = self.lending.as_deref_mut().expect("checked");
                if l.waiting() {
                    return Ok(Hold::Wait);
                }
                match l.try_now(self.config.config()) {
                    Some(stream) => self.attach(stream),
                    None => {
                        l.start_wait(self.config.arc());
                        return Ok(Hold::Wait);
                    }
                }
            }
            let Some(h) = self
                .up
                .next(inspect)
                .map_err(|e| End::ClientBroke(e.to_string()))?
            else {
                return Ok(Hold::Done);
            };
            if !self.authenticated() {
                if h.tag == frontend::PASSWORD_TAG && self.sasl_offered {
                    self.sasl_offered = false;
                    if let Some(why) = channel_binding_problem(self.up.body(&h)) {
                        return Err(End::Refused(Refusal::ChannelBinding(why)));
                    }
                }
                self.up.forward(&h);
                continue;
            }
            let now = *clock.get_or_insert_with(Instant::now);
            self.idle_since = None;
            if let Some(d) = &mut self.detached {
                let tracker = &self.tracker;
                let answer = d.answer(
                    h.tag,
                    self.up.body(&h),
                    |statement| tracker.control_of(statement),
                    self.down.inject(),
                );
                self.up.skip(&h);
                if answer == Next::Terminate {
                    self.client_terminated = true;
                    return Err(End::ClientLeft);
                }
                continue;
            }
            // A statement for a host that stopped answering is answered here, not sent.
            if !self.tracker.is_open()
                && self.tracker.in_flight() == 0
                && shared.topology.circuit(self.host).is_unresponsive()
            {
                let why = shared.topology.circuit(self.host).reason_unresponsive();
                self.detached = Some(Detached::new(why, self.client_tx(), 0));
                self.client_tx_failed = false;
                continue;
            }
            if self.skip_to_sync {
                if h.tag == frontend::SYNC_TAG {
                    self.skip_to_sync = false;
                    self.tracker.sync(now);
                    self.up.forward(&h);
                } else {
                    self.up.skip(&h);
                }
                continue;
            }
            match h.tag {
                frontend::QUERY_TAG => {
                    if self.refusal_possible(shared) && self.tracker.in_flight() > 0 {
                        return Ok(Hold::Wait);
                    }
                    let text = frontend::query_text(self.up.body(&h));
                    if let Some(l) = self.lending.as_deref_mut()
                        && l.per_transaction
                        && l.pinned.is_none()
                        && let Some(feature) = session_feature(text)
                    {
                        l.pin(feature);
                    }
                    if self.client_tx_failed {
                        let control = transaction_control(text);
                        self.tracker.query(Kind::Read, now);
                        if self.in_failed_block(&h, control, true) {
                            continue;
                        }
                    } else {
                        let kind = classify(text, self.up.is_whole(&h));
                        let write = self.tracker.peek_class(kind) == Class::Write;
                        match self.admit(shared, write) {
                            Admit::Go => {}
                            Admit::Wait => return Ok(Hold::Wait),
                            Admit::Shed { write_slot } => {
                                self.tracker.query(kind, now);
                                self.shed(shared, write_slot, &h, true);
                                continue;
                            }
                        }
                        self.tracker.query(kind, now);
                        if write && !self.admit_write(shared) {
                            self.up.replace(&h, SYNC);
                            continue;
                        }
                    }
                }
                frontend::PARSE_TAG => {
                    if self.per_transaction()
                        && self.tracker.before_open() > 0
                        && frontend::parse_message(self.up.body(&h))
                            .is_some_and(|(name, _)| !name.is_empty())
                    {
                        // What the connection holds is known only once earlier requests are
                        // answered.
                        return Ok(Hold::Wait);
                    }
                    if self.client_tx_failed && !self.tracker.is_open() {
                        if self.tracker.in_flight() > 0 {
                            return Ok(Hold::Wait);
                        }
                        let (_, text) =
                            frontend::parse_message(self.up.body(&h)).unwrap_or((b"", b""));
                        let control = transaction_control(text);
                        self.tracker.extended(now);
                        if self.in_failed_block(&h, control, false) {
                            continue;
                        }
                    }
                    let (name, text) =
                        frontend::parse_message(self.up.body(&h)).unwrap_or((b"", b""));
                    let kind = self.memo.classify(text, self.up.is_whole(&h));
                    if kind != Kind::Write
                        && !name.is_empty()
                        && let Some(control) = transaction_control(text)
                    {
                        self.tracker.parse_control(name, control);
                    }
                    self.tracker.parse(name, kind, now);
                    if self.per_transaction() {
                        self.track_parse(&h);
                    }
                }
                frontend::EXECUTE_TAG => {
                    if self.refusal_possible(shared) {
                        if self.tracker.before_open() > 0 {
                            return Ok(Hold::Wait);
                        }
                        if shared.topology.circuit(self.host).is_unresponsive() {
                            // The batch's first messages went to the server: close it there
                            // and answer the client here.
                            if let Some(end) = self.detach(shared) {
                                return Err(end);
                            }
                            if self.detached.is_some() {
                                continue;
                            }
                        }
                    }
                    if self.client_tx_failed && self.failed_batch_starts(now, &h) {
                        continue;
                    }
                    let portal = frontend::execute_portal(self.up.body(&h)).unwrap_or(b"\0");
                    let kind = self.tracker.portal_kind(portal);
                    let write = self.tracker.peek_execute(kind) == Class::Write;
                    match self.admit(shared, write) {
                        Admit::Go => {}
                        Admit::Wait => return Ok(Hold::Wait),
                        Admit::Shed { write_slot } => {
                            self.tracker.extended(now);
                            self.shed(shared, write_slot, &h, false);
                            continue;
                        }
                    }
                    let became_write = self.tracker.execute(kind, now);
                    if became_write && !self.admit_write(shared) {
                        self.skip_to_sync = true;
                        self.up.skip(&h);
                        continue;
                    }
                }
                frontend::BIND_TAG
                | frontend::CLOSE_TAG
                | frontend::DESCRIBE_TAG
                | frontend::FLUSH_TAG => {
                    if self.client_tx_failed && self.failed_batch_starts(now, &h) {
                        continue;
                    }
                    if self.per_transaction() && !self.track_statement_use(&h) {
                        return Ok(Hold::Wait);
                    }
                    let body = self.up.body(&h);
                    match h.tag {
                        frontend::BIND_TAG => {
                            let (portal, statement) =
                                frontend::bind_names(body).unwrap_or((b"", b"\0"));
                            self.tracker.bind(portal, statement, now);
                        }
                        frontend::CLOSE_TAG => {
                            let (what, name) = frontend::close_target(body).unwrap_or((b'S', b""));
                            self.tracker.close(what, name, now);
                        }
                        _ => self.tracker.extended(now),
                    }
                }
                frontend::SYNC_TAG => self.tracker.sync(now),
                frontend::FUNCTION_CALL_TAG => {
                    self.tracker.function_call(now);
                    if self.client_tx_failed {
                        self.tracker
                            .mark_last(Effect::Refused(Refused::InFailedBlock));
                        self.up.replace(&h, SYNC);
                        continue;
                    }
                }
                frontend::COPY_DONE_TAG | frontend::COPY_FAIL_TAG => {
                    self.tracker.copy_in_ended(now)
                }
                frontend::TERMINATE_TAG => {
                    self.client_terminated = true;
                    if self.lending.is_some() {
                        // The server connection stays open for the pool's next client.
                        self.up.skip(&h);
                        return Err(End::ClientLeft);
                    }
                }
                _ => {}
            }
            self.up.forward(&h);
        }
    }

    /// Takes the slots a statement needs: an "all" slot unless the session holds one, and a
    /// write slot for a write unless it holds one. When one is not free, waits in turn (in
    /// the background, at most queue_timeout) — but only once the requests before this one
    /// have been answered, since shedding it depends on the transaction state they leave.
    fn admit(&mut self, shared: &Shared, write: bool) -> Admit {
        if let Some(write_slot) = self.shed_next.take() {
            return Admit::Shed { write_slot };
        }
        if self.slot_wait.is_some() {
            return Admit::Wait;
        }
        let admission = &shared.admission;
        // In transaction pooling the wait for a pooled connection is the queue for a
        // transaction: no second one for the "all" limit. The write limit stays, which keeps
        // stalled commits from holding every pooled connection.
        if !self.holds_all && !self.per_transaction() {
            if admission.all.try_acquire() {
                self.holds_all = true;
            } else {
                return self.wait_for_slot(shared, false);
            }
        }
        if write && !self.holds_write {
            if admission.writes.try_acquire() {
                self.holds_write = true;
            } else {
                return self.wait_for_slot(shared, true);
            }
        }
        Admit::Go
    }

    fn wait_for_slot(&mut self, shared: &Shared, write: bool) -> Admit {
        if self.tracker.before_open() > 0 {
            return Admit::Wait; // Asked again when the requests before it are answered.
        }
        let until = Instant::now() + self.config.config().limits.queue_timeout;
        let limit = if write {
            &shared.admission.writes
        } else {
            &shared.admission.all
        };
        self.slot_wait = Some(SlotWait {
            write,
            wait: Box::pin(limit.acquire_until(until)),
        });
        Admit::Wait
    }

    /// Refuses the newest request with 53400: no slot came free within queue_timeout.
    fn shed(&mut self, shared: &Shared, write_slot: bool, h: &Header, simple: bool) {
        shared.admission.shed(write_slot);
        let waited = self.config.config().limits.queue_timeout;
        self.tracker
            .mark_last(Effect::Refused(Refused::Shed { waited }));
        if simple {
            self.up.replace(h, SYNC);
        } else {
            self.skip_to_sync = true;
            self.up.skip(h);
        }
    }

    /// Gives back the session's slots; called when its transaction has ended and nothing is
    /// in flight, and when it ends.
    fn release_slots(&mut self, shared: &Shared) {
        if std::mem::take(&mut self.holds_all) {
            shared.admission.all.release();
        }
        if std::mem::take(&mut self.holds_write) {
            shared.admission.writes.release();
        }
    }

    /// Whether the next write might be refused, so that it must wait for the answers to the
    /// requests before it (the transaction status the refusal depends on). False in the
    /// healthy steady state, where it costs one atomic load.
    fn refusal_possible(&self, shared: &Shared) -> bool {
        self.client_tx_failed || shared.topology.circuit(self.host).is_troubled()
    }

    /// Asks the write circuit whether the newest request, a write, may run; marks it refused or
    /// as the trial if not plainly allowed.
    fn admit_write(&mut self, shared: &Shared) -> bool {
        let settings = circuit_settings(self.config.config());
        // Decided only with nothing before it in flight (see `refusal_possible`), so the
        // transaction status is the one this write runs in.
        let commits = self.tx == TxStatus::Idle || self.tracker.last_is_commit();
        match shared
            .topology
            .circuit(self.host)
            .decide(&settings, commits)
        {
            Decision::Allow => true,
            Decision::Trial => {
                self.tracker.mark_last(Effect::Trial);
                true
            }
            Decision::Refuse { retry_at } => {
                self.tracker
                    .mark_last(Effect::Refused(Refused::CircuitOpen { retry_at }));
                false
            }
        }
    }

    /// The client's block has failed but the server's has not: let ROLLBACK and ROLLBACK TO
    /// through, turn COMMIT into ROLLBACK (what PostgreSQL does with a failed block), refuse
    /// anything else with 25P02. `simple` is a Query; otherwise the first message of a batch.
    /// Returns true if the message was consumed (replaced or skipped), false if it is to be
    /// forwarded as it is.
    fn in_failed_block(&mut self, h: &Header, control: Option<Control>, simple: bool) -> bool {
        match control {
            Some(Control::Rollback | Control::RollbackTo) => {
                self.tracker.mark_last(Effect::EndsFailedBlock);
                false
            }
            Some(Control::Commit) if simple => {
                self.tracker.mark_last(Effect::EndsFailedBlock);
                self.up.replace(h, ROLLBACK_QUERY);
                true
            }
            Some(Control::Commit) => {
                self.tracker.mark_last(Effect::EndsFailedBlock);
                let name = frontend::parse_message(self.up.body(h))
                    .map(|(n, _)| n.to_vec())
                    .unwrap_or_default();
                self.tracker.parse(&name, Kind::Read, Instant::now());
                let mut parse = BytesMut::new();
                frontend::write_parse(&mut parse, &name, b"ROLLBACK");
                self.up.replace(h, &parse);
                true
            }
            None => {
                self.tracker
                    .mark_last(Effect::Refused(Refused::InFailedBlock));
                if simple {
                    self.up.replace(h, SYNC);
                } else {
                    self.skip_to_sync = true;
                    self.up.skip(h);
                }
                true
            }
        }
    }

    /// In a failed block, a batch that does not start with a Parse of ROLLBACK or COMMIT is
    /// refused whole. Returns true if the message was consumed that way.
    fn failed_batch_starts(&mut self, now: Instant, h: &Header) -> bool {
        if self.tracker.is_open() {
            return false;
        }
        self.tracker.extended(now);
        // A Bind of a ROLLBACK or COMMIT prepared earlier (drivers cache them) still ends the
        // block; a prepared COMMIT becomes a ROLLBACK, as PostgreSQL makes it.
        if h.tag == frontend::BIND_TAG {
            let (portal, statement) = frontend::bind_names(self.up.body(h)).unwrap_or((b"", b"\0"));
            match self.tracker.control_of(statement) {
                Some(Control::Rollback | Control::RollbackTo) => {
                    self.tracker.mark_last(Effect::EndsFailedBlock);
                    return false;
                }
                Some(Control::Commit) => {
                    let portal = portal.to_vec();
                    self.tracker.mark_last(Effect::EndsFailedBlock);
                    self.tracker.parse(b"", Kind::Read, now);
                    self.tracker.bind(&portal, b"", now);
                    let mut rollback = BytesMut::new();
                    frontend::write_parse(&mut rollback, b"", b"ROLLBACK");
                    frontend::write_bind(&mut rollback, &portal, b"");
                    self.up.replace(h, &rollback);
                    self.swallow_parse_complete += 1;
                    return true;
                }
                None => {}
            }
        }
        self.in_failed_block(h, None, false);
        true
    }

    /// Frames what the server sent: swaps its cancel key for the client's own, follows
    /// ReadyForQuery and errors, and turns the answer to one of bulkhead's cancels into the
    /// error the client should see.
    fn frame_server(&mut self, shared: &Shared) -> Result<Option<End>, String> {
        let cancelling = self.cancelling.is_some();
        let tls_login = self.server_tls && !self.authenticated();
        let per_transaction = self.per_transaction();
        let inspect = |tag| {
            matches!(
                tag,
                backend::READY_FOR_QUERY_TAG
                    | backend::ERROR_RESPONSE_TAG
                    | backend::BACKEND_KEY_DATA_TAG
            ) || (cancelling && tag == backend::NOTICE_RESPONSE_TAG)
                || (tls_login && tag == backend::AUTHENTICATION_TAG)
                || (per_transaction && tag == backend::PARAMETER_STATUS_TAG)
        };
        while let Some(h) = self
            .down
            .next(inspect)
            .map_err(|e| format!("invalid message from server: {e}"))?
        {
            if let Some(d) = &mut self.detached
                && d.owed > 0
            {
                // A late answer to a request the client was already answered for: dropped,
                // but for notifications, which belong to no request.
                match h.tag {
                    backend::NOTIFICATION_RESPONSE_TAG => {
                        self.down.forward(&h);
                        continue;
                    }
                    backend::READY_FOR_QUERY_TAG => {
                        let status = ready_status(self.down.body(&h))?;
                        self.tx = status;
                        self.tracker.ready(status, Instant::now());
                        d.owed -= 1;
                        self.head_done();
                    }
                    _ => {}
                }
                self.down.skip(&h);
                continue;
            }
            match h.tag {
                backend::READY_FOR_QUERY_TAG => {
                    let status = ready_status(self.down.body(&h))?;
                    let before = std::mem::replace(&mut self.tx, status);
                    if self.startup_deadline.take().is_some() {
                        self.idle_since = Some(Instant::now());
                        // The startup timer is set a minute out; re-arm once, at login, so an
                        // idle new session gives its buffers back soon.
                        self.timer_at = None;
                        self.down.forward(&h);
                        continue;
                    }
                    let failed = self.head_failed;
                    let own = self.request_finished(shared, status, before);
                    if let Some(l) = self.lending.as_deref_mut()
                        && l.per_transaction
                    {
                        l.request_done(!failed);
                        if self.tracker.in_flight() == 0 {
                            // Every answer owed has come (or an error ended its batch).
                            self.swallow_parse_complete = 0;
                            self.swallow_close_complete = 0;
                        }
                    }
                    if let Some(own) = own {
                        self.down.replace(&h, &own);
                        continue;
                    }
                }
                backend::ERROR_RESPONSE_TAG => {
                    let info = backend::error_info(self.down.body(&h));
                    self.server_said_fatal =
                        matches!(info.severity, Severity::Fatal | Severity::Panic);
                    self.head_failed = true;
                    self.head_read_only |= info.code == b"25006";
                    if let Some(c) = self.cancelling
                        && info.code == b"57014"
                        && info.severity == Severity::Error
                        && self.down.is_whole(&h)
                    {
                        // The server's "canceling statement due to user request" would
                        // puzzle the client: say which deadline passed instead.
                        let mut own = BytesMut::new();
                        Refusal::Cancelled(c.deadline).write(&mut own);
                        self.down.replace(&h, &own);
                        continue;
                    }
                }
                backend::NOTICE_RESPONSE_TAG => {
                    if let Some(c) = self.cancelling {
                        let info = backend::error_info(self.down.body(&h));
                        // The answer to cancelling a commit that waits for synchronous
                        // replication: a WARNING (01000) that it committed locally only.
                        if c.deadline.class == Class::Write && info.code == b"01000" {
                            return Ok(Some(End::CommitUnconfirmed(c.deadline)));
                        }
                    }
                }
                backend::PARSE_COMPLETE_TAG if self.swallow_parse_complete > 0 => {
                    self.swallow_parse_complete -= 1;
                    self.down.skip(&h);
                    continue;
                }
                backend::CLOSE_COMPLETE_TAG if self.swallow_close_complete > 0 => {
                    self.swallow_close_complete -= 1;
                    self.down.skip(&h);
                    continue;
                }
                backend::PARAMETER_STATUS_TAG if per_transaction && self.down.is_whole(&h) => {
                    if let Some(l) = self.lending.as_deref_mut()
                        && let Some((name, rest)) = crate::protocol::cstr(self.down.body(&h))
                        && let Some((value, _)) = crate::protocol::cstr(rest)
                        && let (Ok(name), Ok(value)) =
                            (std::str::from_utf8(name), std::str::from_utf8(value))
                    {
                        l.reported(name, value);
                    }
                }
                backend::COPY_IN_RESPONSE_TAG | backend::COPY_BOTH_RESPONSE_TAG => {
                    self.tracker.copy_in_started()
                }
                backend::AUTHENTICATION_TAG if tls_login && self.down.is_whole(&h) => {
                    let body = self.down.body(&h);
                    // With TLS on both sides and the server's own certificate on the
                    // listener, the client's channel binding (a hash of the certificate it
                    // saw) is the server's: SCRAM-SHA-256-PLUS passes through as offered.
                    let server_cert = self.server.as_ref().and_then(|s| s.server_certificate());
                    let binds = self.client.is_tls()
                        && server_cert.is_some_and(|c| shared.tls.get().presents(c));
                    debug!(parent: &self.span, binds, client_tls = self.client.is_tls(), server_cert = server_cert.map(<[u8]>::len), "the server offers SASL");
                    if !binds && backend::is_sasl_offer(body) {
                        self.sasl_offered = true;
                        // Otherwise SCRAM-SHA-256-PLUS would bind the login to bulkhead's TLS
                        // session with the server, which the client cannot see: never offer it.
                        let mut own = BytesMut::new();
                        if backend::write_sasl_offer_without_plus(&mut own, body) {
                            self.down.replace(&h, &own);
                            continue;
                        }
                    }
                }
                backend::BACKEND_KEY_DATA_TAG
                    if !self.authenticated() && self.down.is_whole(&h) =>
                {
                    let (pid, key) = backend::backend_key_data(self.down.body(&h))
                        .ok_or("invalid BackendKeyData from server")?;
                    let target = Target {
                        addr: self.server_addr,
                        pid,
                        key: bytes::Bytes::copy_from_slice(key),
                    };
                    self.server_key = Some((pid, bytes::Bytes::copy_from_slice(key)));
                    let (client_pid, secret) = shared.cancels.register(target);
                    self.client_key = Some((client_pid, secret));
                    let mut own = BytesMut::with_capacity(13);
                    backend::write_backend_key_data(&mut own, client_pid, &secret);
                    self.down.replace(&h, &own);
                    continue;
                }
                _ => {}
            }
            self.down.forward(&h);
        }
        Ok(None)
    }

    /// The head request's ReadyForQuery (`status`; `before` is the status it started in):
    /// record how it went, tell the write circuit, and start the next one's clock. Returns
    /// what the client gets instead of the server's ReadyForQuery, for a request bulkhead
    /// refused.
    fn request_finished(
        &mut self,
        shared: &Shared,
        status: TxStatus,
        before: TxStatus,
    ) -> Option<BytesMut> {
        let now = Instant::now();
        let done = self.tracker.ready(status, now)?;
        let outcome = match done.effect {
            Effect::Refused(_) => Outcome::Refused,
            _ if self.head_timed_out => Outcome::Timeout,
            _ if self.head_failed => Outcome::Error,
            _ => Outcome::Ok,
        };
        let m = shared.metrics.class(done.class);
        m.statement(outcome).increment(1);
        if !matches!(done.effect, Effect::Refused(_)) {
            m.duration.record(done.took);
            if self.config.config().limits.adaptive {
                shared.admission.all.sample(done.took);
                if done.class == Class::Write {
                    shared.admission.writes.sample(done.took);
                }
            }
        }
        if status == TxStatus::Idle && self.tracker.in_flight() == 0 {
            self.release_slots(shared);
        }
        if self.tracker.in_flight() == 0 {
            self.idle_since = Some(now);
        }
        // Only evidence about the commit path moves the write circuit: a commit confirmed
        // (the request ended outside a transaction, without error) or one that missed its
        // deadline. A write inside a transaction proves nothing about the COMMIT to come.
        if done.class == Class::Write && !matches!(done.effect, Effect::Refused(_)) {
            let settings = circuit_settings(self.config.config());
            let circuit = shared.topology.circuit(self.host);
            let commits = before == TxStatus::Idle || done.commit;
            if self.head_read_only {
                circuit.failure(&settings, "read-only transaction (25006) from a primary");
            } else if self.head_timed_out {
                if commits {
                    circuit.failure(&settings, "a commit missed the write deadline");
                }
            } else if status == TxStatus::Idle && !self.head_failed {
                let how = if done.effect == Effect::Trial {
                    Success::Trial
                } else {
                    Success::Commit
                };
                circuit.success(&settings, how);
            }
        }
        self.head_done();
        match done.effect {
            Effect::Refused(why) => {
                let refusal = match why {
                    Refused::CircuitOpen { retry_at } => Refusal::CircuitOpen {
                        retry_in: retry_at.saturating_duration_since(now),
                    },
                    Refused::InFailedBlock => Refusal::InFailedBlock,
                    Refused::Shed { waited } => Refusal::Shed { waited },
                };
                // Exactly as if the server had raised the error: outside a block nothing
                // changes; inside one, the block has failed.
                let client_status = if status == TxStatus::Idle {
                    TxStatus::Idle
                } else {
                    TxStatus::Failed
                };
                self.client_tx_failed =
                    client_status == TxStatus::Failed && status == TxStatus::InBlock;
                let mut own = BytesMut::new();
                refusal.write(&mut own);
                backend::write_ready_for_query(&mut own, client_status);
                Some(own)
            }
            Effect::EndsFailedBlock => {
                self.client_tx_failed = false;
                None
            }
            Effect::Normal | Effect::Trial => None,
        }
    }

    /// Forgets what was learned about the head request: it has been answered (or abandoned).
    fn head_done(&mut self) {
        self.head_failed = false;
        self.head_read_only = false;
        self.head_timed_out = false;
        self.cancelling = None;
    }

    /// Nothing in flight and no transaction open: closing now loses nothing.
    fn is_quiet(&self) -> bool {
        let settled = match &self.detached {
            // What the abandoned server still does is lost anyway.
            Some(d) => d.client_idle(),
            None => self.tracker.in_flight() == 0 && self.tx == TxStatus::Idle,
        };
        self.authenticated() && settled && !self.up.mid_message() && !self.up.has_output()
    }

    /// The transaction status the client was last given.
    fn client_tx(&self) -> TxStatus {
        if self.client_tx_failed {
            TxStatus::Failed
        } else {
            self.tx
        }
    }

    /// What losing the server now means for the client's work. Inside a transaction any
    /// statement in flight may be a COMMIT of writes the classifier cannot see (a function
    /// called from a SELECT), so only a transaction with nothing in flight is sure not to
    /// have committed.
    fn lost(&self) -> Lost {
        if let Some(d) = &self.detached {
            // The client has been answered for everything it sent; only its block is lost.
            return if d.client_tx == TxStatus::Idle {
                Lost::Nothing
            } else {
                Lost::OpenTransaction
            };
        }
        let in_transaction = self.authenticated() && self.tx != TxStatus::Idle;
        let in_flight = self.tracker.in_flight() > 0;
        if self.tracker.write_in_flight() || (in_transaction && in_flight) {
            Lost::WriteInDoubt
        } else if in_transaction {
            Lost::OpenTransaction
        } else {
            Lost::Nothing
        }
    }

    /// Ends the session: tells the client why when it should hear it, cancels a statement the
    /// server may still be running, and closes both connections.
    /// `keep_server`: the server connection goes back to its pool, so it is not closed.
    async fn finish(&mut self, shared: &Shared, end: End, keep_server: bool) {
        let refusal = match &end {
            End::ClientLeft => None,
            End::ClientBroke(why) => Some(Refusal::ClientProtocol(why.clone())),
            End::ServerLost(_) if self.server_said_fatal => None,
            End::ServerLost(why) => Some(Refusal::ServerLost(why.clone(), self.lost())),
            End::ServerSilent(why) => Some(Refusal::NoServer(why.clone())),
            End::Drained | End::Closing => Some(Refusal::ShuttingDown),
            End::Demoted => Some(Refusal::Demoted),
            End::StartupTimeout => Some(Refusal::StartupTimeout),
            End::Unanswered(deadline) => Some(Refusal::Unanswered {
                deadline: *deadline,
                grace: self.config.config().timeouts.cancel_grace,
            }),
            End::CommitUnconfirmed(deadline) => Some(Refusal::CommitUnconfirmed(*deadline)),
            End::Unresponsive => Some(Refusal::Unresponsive(
                shared.topology.circuit(self.host).reason_unresponsive(),
                self.lost(),
            )),
            End::Refused(refusal) => Some(refusal.clone()),
        };
        match &end {
            End::ClientLeft | End::Drained => debug!(?end, "session ended"),
            _ => info!(?end, "session ended"),
        }
        let settings = circuit_settings(self.config.config());
        let circuit = shared.topology.circuit(self.host);
        match &end {
            End::Unanswered(d) | End::CommitUnconfirmed(d) => {
                shared
                    .metrics
                    .class(d.class)
                    .statement(Outcome::Timeout)
                    .increment(1);
                if d.class == Class::Write && (d.cause == Cause::Stalled || self.head_commits()) {
                    let why = match end {
                        End::CommitUnconfirmed(_) => {
                            "a commit missed the write deadline waiting for synchronous replication"
                        }
                        _ if d.cause == Cause::Stalled => {
                            "the server accepted no data for the write deadline"
                        }
                        _ => "a commit missed the write deadline and the cancel went unanswered",
                    };
                    circuit.failure(&settings, why);
                }
            }
            // A lost connection alone proves nothing about the host (one backend may have been
            // terminated on a healthy server): the probe looks now, and counts a failure if
            // the host is down.
            End::ServerLost(_) => shared.topology.connection_lost(self.host),
            _ => {}
        }
        if matches!(
            end,
            End::Unanswered(_) | End::Unresponsive | End::ServerSilent(_)
        ) {
            // Giving up on a server that does not answer: whatever of the client's work is
            // still in the kernel's send queue (a COMMIT, in a network blackhole) must not be
            // delivered when the network heals.
            if let Some(server) = &self.server {
                server.close_abortively();
            }
        }
        let server_running = self.tracker.in_flight() > 0 || self.up.mid_message();
        let cancelled_already = matches!(end, End::Unanswered(_) | End::CommitUnconfirmed(_));
        if server_running && !cancelled_already && !matches!(end, End::ServerLost(_)) {
            self.cancel_on_server(shared);
        }
        let quiet = self.is_quiet();
        if let Some(server) = self.server.as_mut()
            && quiet
            && !self.client_terminated
            && !keep_server
        {
            // A polite goodbye keeps the server's log free of "unexpected EOF" lines.
            let _ = timeout(FAREWELL_TIMEOUT, server.write_all(b"X\0\0\0\x04")).await;
        }
        if let Some(refusal) = refusal {
            // A message half-sent to the client cannot be followed by an error it could parse.
            if self.down.discard_partial() {
                if cancelled_already {
                    // Whatever the server said about the abandoned request must not reach the
                    // client ahead of the verdict; drop what is framed and not yet written.
                    self.down.discard_framed();
                }
                refusal.write(self.down.inject());
            }
        }
        let client = &mut self.client;
        let down = &mut self.down;
        let _ = timeout(FAREWELL_TIMEOUT, async {
            poll_fn(|cx| down.poll_write_to(cx, client)).await?;
            client.shutdown().await?;
            linger(client).await
        })
        .await;
    }

    /// Sends a CancelRequest for whatever the server is running for this session. Runs on its
    /// own task so the session does not wait for it.
    fn cancel_on_server(&self, shared: &Shared) {
        let Some((pid, key)) = self.server_key.clone() else {
            return;
        };
        shared.metrics.cancels_sent.increment(1);
        let addr = self.server_addr;
        let c = self.config.config();
        let within = c.database.connect_timeout + c.timeouts.cancel_grace;
        debug!(parent: &self.span, server = %addr, pid, "sending cancel request");
        tokio::spawn(
            async move {
                if let Err(e) = upstream::send_cancel(addr, pid, &key, within).await {
                    warn!(error = %e, "cancel request failed");
                }
            }
            .instrument(self.span.clone()),
        );
    }
}

/// Why a client's SASLInitialResponse cannot succeed through bulkhead's TLS to the server, if
/// it cannot. A client that picked SCRAM-SHA-256-PLUS anyway, or that says it could bind but
/// thinks the server cannot (gs2 flag 'y', which a TLS client sends when the offer lacks -PLUS),
/// would be refused by the server as a downgrade attack; say why here instead.
/// The transaction status a ReadyForQuery from the server carries.
fn ready_status(body: &[u8]) -> Result<TxStatus, &'static str> {
    match body {
        [b] => TxStatus::from_byte(*b),
        _ => None,
    }
    .ok_or("invalid ReadyForQuery from server")
}

fn channel_binding_problem(body: &[u8]) -> Option<&'static str> {
    let (mechanism, data) = frontend::sasl_initial_response(body)?;
    if mechanism == backend::SCRAM_PLUS {
        Some("the client chose SCRAM-SHA-256-PLUS, which bulkhead does not offer")
    } else if data.starts_with(b"y") {
        Some(
            "the client's TLS session to bulkhead supports channel binding, and the server, \
             on its own TLS session with bulkhead, would take SCRAM without it as a downgrade",
        )
    } else {
        None
    }
}

/// Increments a gauge now and decrements it when dropped.
struct GaugeGuard(metrics::Gauge);

impl GaugeGuard {
    fn new(g: &metrics::Gauge) -> Self {
        g.increment(1.0);
        GaugeGuard(g.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}
