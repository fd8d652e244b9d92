//! Connections to database servers: opening a session's (or the probe's) connection with TLS as
//! configured, and sending cancel requests, each on its own short-lived plaintext connection as
//! libpq does (servers take a CancelRequest without TLS whatever pg_hba.conf says).

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;
use tracing::debug;

use crate::config::ServerTls;
use crate::protocol::startup::{CANCEL_REQUEST_CODE, SSL_REQUEST_CODE};
use crate::tls::{self, Stream, Tls};

/// Why no connection could be had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectError {
    /// Not reachable: worth trying again, or another host.
    Unreachable(String),
    /// No answer in time at all (a frozen server, a blackholed network): likewise.
    NoAnswer(String),
    /// Reachable, but TLS as configured could not be set up: trying again will not help.
    Tls(String),
    /// bulkhead itself has no file descriptor left: says nothing about the server.
    NoDescriptors(String),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Unreachable(why)
            | ConnectError::NoAnswer(why)
            | ConnectError::Tls(why)
            | ConnectError::NoDescriptors(why) => f.write_str(why),
        }
    }
}

/// Connects to `address` (`host:port`, resolved now) and sets up TLS as [database] tls says,
/// all within `within`. Returns the stream and the address it reached, so cancels go to that
/// same address even if a name moves later.
pub async fn connect(
    address: &str,
    within: Duration,
    tls: &Tls,
) -> Result<(Stream, SocketAddr), ConnectError> {
    let deadline = tokio::time::Instant::now() + within;
    let timed_out = || {
        ConnectError::NoAnswer(format!(
            "{address}: no answer within {}",
            humantime::format_duration(within)
        ))
    };
    let (tcp, addr) = tokio::time::timeout_at(deadline, connect_tcp(address))
        .await
        .map_err(|_| timed_out())??;
    let Some(connector) = tls.connector() else {
        return Ok((Stream::Plain(tcp), addr));
    };
    match tokio::time::timeout_at(deadline, negotiate(tcp, address, connector, tls.server)).await {
        Ok(Ok(stream)) => Ok((stream, addr)),
        Ok(Err(Negotiation::Failed(e))) => Err(e),
        Err(_) => Err(timed_out()),
        // libpq's "prefer": when the handshake fails, a new connection in plaintext.
        Ok(Err(Negotiation::Declined(why))) => {
            debug!(%why, "TLS did not work out; plaintext, as database.tls = \"prefer\" allows");
            let (tcp, addr) = tokio::time::timeout_at(deadline, connect_tcp(address))
                .await
                .map_err(|_| timed_out())??;
            Ok((Stream::Plain(tcp), addr))
        }
    }
}

async fn connect_tcp(address: &str) -> Result<(TcpStream, SocketAddr), ConnectError> {
    let unreachable = |e: io::Error| {
        if crate::fds::exhausted(&e) {
            ConnectError::NoDescriptors(format!("{address}: {e}"))
        } else {
            ConnectError::Unreachable(format!("{address}: {e}"))
        }
    };
    let stream = TcpStream::connect(address).await.map_err(unreachable)?;
    stream.set_nodelay(true).ok();
    detect_dead_peers(&stream);
    let addr = stream.peer_addr().map_err(unreachable)?;
    Ok((stream, addr))
}

/// How asking for TLS went wrong.
enum Negotiation {
    /// Under "prefer" this means: try again in plaintext.
    Declined(String),
    /// Nothing to fall back on.
    Failed(ConnectError),
}

/// Sends SSLRequest and, if the server agrees, does the handshake.
async fn negotiate(
    mut tcp: TcpStream,
    address: &str,
    connector: &TlsConnector,
    mode: ServerTls,
) -> Result<Stream, Negotiation> {
    let prefer = mode == ServerTls::Prefer;
    let tls_error = |why: String| {
        if prefer {
            Negotiation::Declined(format!("{address}: {why}"))
        } else {
            Negotiation::Failed(ConnectError::Tls(format!("{address}: {why}")))
        }
    };
    let lost =
        |e: io::Error| Negotiation::Failed(ConnectError::Unreachable(format!("{address}: {e}")));
    let name = tls::server_name(address).map_err(|e| Negotiation::Failed(ConnectError::Tls(e)))?;
    let mut request = [0u8; 8];
    request[..4].copy_from_slice(&8u32.to_be_bytes());
    request[4..].copy_from_slice(&SSL_REQUEST_CODE.to_be_bytes());
    tcp.write_all(&request).await.map_err(lost)?;
    // Exactly one byte: anything after it belongs to the TLS handshake, never to the session
    // (CVE-2021-23222).
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.map_err(lost)?;
    match answer[0] {
        b'S' => match connector.connect(name.clone(), tcp).await {
            Ok(tls) => Ok(Stream::Tls(Box::new(tls.into()))),
            Err(e) => Err(tls_error(tls::describe_handshake_error(&e, &name))),
        },
        b'N' if prefer => Ok(Stream::Plain(tcp)),
        b'N' => Err(tls_error(format!(
            "the server does not accept TLS (database.tls = \"{}\")",
            mode.name()
        ))),
        // An ErrorResponse: a server too old to know SSLRequest.
        b'E' => Err(tls_error(
            "the server does not understand SSLRequest".into(),
        )),
        other => Err(Negotiation::Failed(ConnectError::Tls(format!(
            "{address}: unexpected answer {other:#04x} to SSLRequest"
        )))),
    }
}

/// Asks the server at `addr` to cancel what backend `pid` is running, like
/// `pg_cancel_backend`. Waits for the server to close the connection, which it does once it
/// has handled the request.
pub async fn send_cancel(
    addr: SocketAddr,
    pid: i32,
    key: &[u8],
    within: Duration,
) -> io::Result<()> {
    let mut packet = BytesMut::with_capacity(12 + key.len());
    packet.put_u32((12 + key.len()) as u32);
    packet.put_u32(CANCEL_REQUEST_CODE);
    packet.put_i32(pid);
    packet.put_slice(key);
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(&packet).await?;
        let mut sink = [0u8; 64];
        while stream.read(&mut sink).await? > 0 {}
        Ok(())
    };
    timeout(within, exchange).await.unwrap_or_else(|_| {
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "cancel request not answered",
        ))
    })
}

/// TCP keepalive after 5 s of silence, probed every 2 s, given up after 3 unanswered probes;
/// and TCP_USER_TIMEOUT of 10 s, after which data the server has not acknowledged ends the
/// connection. So a server connection whose other end silently died (a moved virtual IP, a
/// conntrack reset, a host gone) fails within about 10 s, idle or busy, instead of at the
/// read deadline plus grace, and the probe's own connections likewise. A long query is not
/// affected: the server acknowledges what it was sent and answers keepalive probes while it
/// works.
fn detect_dead_peers(stream: &TcpStream) {
    use std::os::fd::AsRawFd;
    let fd = stream.as_raw_fd();
    let set = |level: libc::c_int, name: libc::c_int, value: libc::c_int| {
        // SAFETY: fd is an open socket owned by `stream`; the option value is a c_int that
        // lives for the call.
        unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        }
    };
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 5);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 2);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3);
    set(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, 10_000);
}

/// SO_LINGER with a zero timeout: closing the socket resets the connection and drops any
/// unacknowledged data instead of retransmitting it.
pub(crate) fn set_linger_zero(stream: impl std::os::fd::AsRawFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: the fd is an open socket owned by `stream`; `linger` lives for the call.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}
