//! A session's beginning: the client's first packets (SSLRequest and the TLS handshake, or
//! 'N'; GSSENCRequest; a cancel request; the startup packet), then either the server
//! connection and the startup packet sent on to it (passthrough) or bulkhead's own login and a
//! pooled connection (the pooled modes). Ends with a `Relay`, or with the client answered.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

use tracing::{Span, debug, info, warn};

use super::{FAREWELL_TIMEOUT, GaugeGuard, Relay};
use crate::Shared;
use crate::config::{Config, ListenTls, PoolMode};
use crate::errors::{Lost, Refusal};
use crate::live::Snapshot;
use crate::pool;
use crate::protocol::startup;
use crate::tls::Stream;
use crate::upstream::{self, ConnectError};

/// From the client's first packet to the startup packet sent on to the server (passthrough),
/// or to the client logged in with a pooled connection lent to it; the relay takes it from
/// there. `None` when the client has been answered already (refused, or a cancel request).
pub(super) async fn start(
    shared: &Arc<Shared>,
    client: std::net::TcpStream,
    admitted: bool,
    readonly: bool,
    view: Option<Arc<crate::sessions::View>>,
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
    if let Some(view) = &view
        && let Ok(Some((startup::Startup::Start { params, .. }, _))) = startup::parse(&first.packet)
    {
        let param = |name| params.get(name).unwrap_or("");
        view.set_identity(crate::sessions::Identity::new(
            param("user"),
            param("database"),
            param("application_name"),
        ));
    }
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
            readonly,
            span,
        ))
        .await
        .map(|(mut relay, gauge)| {
            relay.view = view;
            (relay, gauge)
        });
    }
    let connected = if readonly {
        Box::pin(connect_reader(shared, config.config())).await
    } else {
        Box::pin(connect_primary(shared, config.config())).await
    };
    let (mut server, addr, host) = match connected {
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
    let FirstPacket {
        mut packet,
        leftover,
    } = first;
    if readonly {
        // On a standby writes fail anyway; on the primary (no standby qualifies) this makes
        // them fail the same way, with PostgreSQL's own 25006.
        if let Some(ro) = startup::with_param(&packet, "default_transaction_read_only", "on") {
            packet = BytesMut::from(&ro[..]);
        }
    }
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
    let mut relay = Relay::new(
        client,
        Some(server),
        addr,
        host,
        leftover,
        crate::clock::Instant::from_tokio(startup_deadline),
        config,
        span,
    );
    relay.view = view;
    if readonly {
        relay.readonly = true;
        shared.topology.count_reader(host, true);
    }
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
    readonly: bool,
    span: Span,
) -> Option<(Relay, Option<GaugeGuard>)> {
    let FirstPacket { packet, leftover } = first;
    if !leftover.is_empty() {
        // Nothing can come before the server's first request but the startup packet.
        let why = "data after the startup packet before authentication".to_string();
        refuse(&mut client, Refusal::ClientProtocol(why)).await;
        return None;
    }
    let login = pool::login::log_in(shared, config.config(), &mut client, &packet, readonly);
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
        logged.leftover,
        crate::clock::Instant::from_tokio(startup_deadline),
        config,
        span,
    );
    relay.logged_in(server_key, logged.client_key, lending);
    relay.readonly = readonly;
    if relay.lending.as_ref().is_some_and(|l| l.per_transaction) {
        // Transaction pooling: the connection lent for the login goes back at once.
        relay.release_server();
    }
    Some((relay, None))
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
                    // The probe may not have looked through a new connection for a while.
                    shared.topology.look_now(p.index);
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

/// Connects a session of the read-only listener: to the standby within max_replica_lag with
/// the fewest read-only sessions, else to the primary; waits up to hold_new_connections for
/// one of them to be known and to accept.
pub(crate) async fn connect_reader(
    shared: &Shared,
    config: &Config,
) -> Result<(Stream, SocketAddr, usize), Refusal> {
    let deadline = Instant::now() + config.circuit.hold_new_connections;
    let mut readers = shared.topology.watch_readers();
    let mut primary = shared.topology.watch_primary();
    let mut last_error = String::from("no standby within max_replica_lag, and no primary");
    loop {
        readers.borrow_and_update();
        primary.borrow_and_update();
        if let Some((index, address)) = shared.topology.pick_reader() {
            match upstream::connect(&address, config.database.connect_timeout, &shared.tls.get())
                .await
            {
                Ok((stream, addr)) => return Ok((stream, addr, index)),
                Err(ConnectError::Tls(why)) => return Err(Refusal::ServerTls(why)),
                Err(ConnectError::NoDescriptors(_)) => return Err(Refusal::OutOfDescriptors),
                Err(ConnectError::Unreachable(why) | ConnectError::NoAnswer(why)) => {
                    shared.topology.connection_lost(index);
                    last_error = why;
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(Refusal::NoServer(format!(
                "{last_error} (waited {} for a server that takes reads)",
                humantime::format_duration(config.circuit.hold_new_connections)
            )));
        }
        // Wait for the probe to see a change, but look again at least every probe interval.
        let retry = (Instant::now() + config.probe.interval).min(deadline);
        let _ = tokio::time::timeout_at(retry, async {
            tokio::select! {
                _ = readers.changed() => {}
                _ = primary.changed() => {}
            }
        })
        .await;
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
pub(super) async fn linger(client: &mut (impl AsyncRead + Unpin)) -> io::Result<()> {
    let mut sink = [0u8; 512];
    while client.read(&mut sink).await? > 0 {}
    Ok(())
}

/// Answers a client accepted on the reserve descriptor when there were none left: FATAL 53300
/// after its first packet (or at once, if none comes quickly), then closes and gives the
/// descriptor back to the reserve.
pub(crate) async fn refuse_out_of_descriptors(
    client: std::net::TcpStream,
    reserve: crate::fds::Reserve,
) {
    let Ok(client) = TcpStream::from_std(client) else {
        reserve.restore();
        return;
    };
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
