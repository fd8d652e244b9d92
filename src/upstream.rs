//! Connections to database servers: opening a session's connection and sending cancel
//! requests, each on its own short-lived connection as libpq does.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::protocol::startup::CANCEL_REQUEST_CODE;

/// Connects to `address` (`host:port`, resolved now) within `within`. Returns the stream and
/// the address it reached, so cancels go to that same address even if a name moves later.
pub async fn connect(address: &str, within: Duration) -> Result<(TcpStream, SocketAddr), String> {
    match timeout(within, TcpStream::connect(address)).await {
        Ok(Ok(stream)) => {
            stream.set_nodelay(true).ok();
            let addr = stream.peer_addr().map_err(|e| format!("{address}: {e}"))?;
            Ok((stream, addr))
        }
        Ok(Err(e)) => Err(format!("{address}: {e}")),
        Err(_) => Err(format!(
            "{address}: no answer within {}",
            humantime::format_duration(within)
        )),
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
