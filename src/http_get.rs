//! One plain-HTTP GET with hyper's client, bounded in time and size: what the Patroni
//! follower and `bulkhead status` need, and nothing more (no TLS, no redirects).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;

/// GETs `path` from `authority` (`host:port`) within `within`; at most `max_body` bytes of
/// body are read. The error says what failed, without the URL (the caller names it).
pub async fn get(
    authority: &str,
    path: &str,
    within: Duration,
    max_body: usize,
) -> Result<(StatusCode, Bytes), String> {
    let fetch = async {
        let tcp = tokio::net::TcpStream::connect(authority)
            .await
            .map_err(|e| e.to_string())?;
        tcp.set_nodelay(true).ok();
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        let request = Request::get(path)
            .header(hyper::header::HOST, authority)
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        let body = Limited::new(response.into_body(), max_body)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, body))
    };
    match tokio::time::timeout(within, fetch).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "no answer within {}",
            humantime::format_duration(within)
        )),
    }
}
