//! A raw protocol client for the cases real drivers will not produce: garbage, bad lengths,
//! exact byte sequences.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct Raw {
    pub stream: TcpStream,
    buf: BytesMut,
}

/// A tagged message.
pub fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// An untagged first packet with the given code and body.
pub fn first_packet(code: u32, body: &[u8]) -> Vec<u8> {
    let mut v = ((body.len() + 8) as u32).to_be_bytes().to_vec();
    v.extend_from_slice(&code.to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// A protocol 3.`minor` StartupMessage with these parameters.
pub fn startup_packet(minor: u16, params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = vec![];
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    first_packet((3 << 16) | minor as u32, &body)
}

/// The value of one field of an ErrorResponse or NoticeResponse body.
pub fn field(body: &[u8], code: u8) -> Option<String> {
    let mut rest = body;
    while let Some((&f, after)) = rest.split_first() {
        if f == 0 {
            break;
        }
        let end = after.iter().position(|&b| b == 0)?;
        if f == code {
            return Some(String::from_utf8_lossy(&after[..end]).into_owned());
        }
        rest = &after[end + 1..];
    }
    None
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Raw {
        let stream = TcpStream::connect(addr).await.unwrap();
        Raw {
            stream,
            buf: BytesMut::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Reads one byte that is not part of a tagged message (the answer to SSLRequest).
    pub async fn read_byte(&mut self) -> u8 {
        if self.buf.is_empty() {
            self.fill().await;
        }
        assert!(!self.buf.is_empty(), "connection closed");
        self.buf.get_u8()
    }

    async fn fill(&mut self) -> usize {
        tokio::time::timeout(Duration::from_secs(20), self.stream.read_buf(&mut self.buf))
            .await
            .expect("no answer within 20 s")
            .unwrap_or(0)
    }

    /// The next message, or `None` when the connection closed.
    pub async fn recv(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize;
                if self.buf.len() > len {
                    let tag = self.buf.get_u8();
                    self.buf.advance(4);
                    return Some((tag, self.buf.split_to(len - 4).to_vec()));
                }
            }
            if self.fill().await == 0 {
                return None;
            }
        }
    }

    /// Reads messages up to and including one with `tag`; returns them all.
    pub async fn recv_until(&mut self, tag: u8) -> Vec<(u8, Vec<u8>)> {
        let mut seen = vec![];
        loop {
            let m = self
                .recv()
                .await
                .unwrap_or_else(|| panic!("closed before {:?}; saw {seen:?}", tag as char));
            let done = m.0 == tag;
            seen.push(m);
            if done {
                return seen;
            }
        }
    }

    /// Logs in as `user` with trust authentication and waits for ReadyForQuery.
    pub async fn login(&mut self, user: &str) -> Vec<(u8, Vec<u8>)> {
        self.send(&startup_packet(
            0,
            &[("user", user), ("database", "postgres")],
        ))
        .await;
        self.recv_until(b'Z').await
    }

    /// Logs in as `user` with SCRAM-SHA-256 (bulkhead's own authentication in the pooled
    /// modes) and waits for ReadyForQuery.
    pub async fn login_scram(&mut self, user: &str, password: &str) -> Vec<(u8, Vec<u8>)> {
        self.login_scram_sending_ahead(user, password, &[]).await
    }

    /// As [`Raw::login_scram`], with `ahead` sent in the same write as the last SASL message,
    /// before the server has said the login succeeded.
    pub async fn login_scram_sending_ahead(
        &mut self,
        user: &str,
        password: &str,
        ahead: &[u8],
    ) -> Vec<(u8, Vec<u8>)> {
        use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
        self.send(&startup_packet(
            0,
            &[("user", user), ("database", "postgres")],
        ))
        .await;
        let auth_code = |m: &(u8, Vec<u8>), code: u32| {
            assert_eq!(m.0, b'R', "{m:?}");
            assert_eq!(&m.1[..4], code.to_be_bytes(), "{m:?}");
        };
        let offer = self.recv().await.expect("SASL offer");
        auth_code(&offer, 10);
        let mut scram = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
        let mut initial = format!("{SCRAM_SHA_256}\0").into_bytes();
        initial.extend((scram.message().len() as u32).to_be_bytes());
        initial.extend(scram.message());
        self.send(&msg(b'p', &initial)).await;
        let cont = self.recv().await.expect("SASLContinue");
        auth_code(&cont, 11);
        scram.update(&cont.1[4..]).unwrap();
        self.send(&[msg(b'p', scram.message()), ahead.to_vec()].concat())
            .await;
        let fin = self.recv().await.expect("SASLFinal");
        auth_code(&fin, 12);
        scram.finish(&fin.1[4..]).unwrap();
        self.recv_until(b'Z').await
    }

    /// Expects an ErrorResponse of the given severity next, then the connection to close if it
    /// is FATAL. Returns the ErrorResponse body.
    pub async fn expect_error(&mut self, severity: &str, code: &str) -> Vec<u8> {
        let (tag, body) = self
            .recv()
            .await
            .expect("connection closed without an error");
        assert_eq!(
            tag,
            b'E',
            "expected ErrorResponse, got {:?}: {:?}",
            tag as char,
            String::from_utf8_lossy(&body)
        );
        assert_eq!(
            field(&body, b'C').as_deref(),
            Some(code),
            "{:?}",
            String::from_utf8_lossy(&body)
        );
        assert_eq!(field(&body, b'V').as_deref(), Some(severity));
        if severity == "FATAL" {
            assert!(
                self.recv().await.is_none(),
                "connection stayed open after FATAL"
            );
        }
        body
    }
}
