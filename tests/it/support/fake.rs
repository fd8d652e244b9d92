//! A scripted PostgreSQL server, for what a real one never sends: broken messages, a close in
//! the middle of an answer, silence. It answers bulkhead's probe as a healthy primary, so
//! sessions are routed to it; every other session logs in at once (trust) and is answered per
//! query by [`answer`], which picks a script by the `case:NAME` the query text names. A
//! session whose startup packet has `application_name=case:NAME` gets that script instead of
//! a normal login.

use std::net::SocketAddr;

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::raw::msg;

pub struct FakeServer {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeServer {
    pub async fn start() -> FakeServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream));
            }
        });
        FakeServer { addr, task }
    }
}

/// What the script does after writing its bytes.
#[derive(PartialEq)]
enum Then {
    Continue,
    Close,
    /// Read on but never answer again.
    Silence,
}

async fn serve(mut s: TcpStream) {
    let mut buf = BytesMut::new();
    let Some(startup) = read_startup(&mut s, &mut buf).await else {
        return; // a CancelRequest, or gone
    };
    let app = param(&startup, b"application_name").unwrap_or_default();
    let probe = app == b"bulkhead probe";
    let login = [
        msg(b'R', &0i32.to_be_bytes()),
        msg(b'S', b"server_version\x0015.0\0"),
        msg(
            b'K',
            &[&7i32.to_be_bytes()[..], &42i32.to_be_bytes()].concat(),
        ),
        msg(b'Z', b"I"),
    ]
    .concat();
    let (bytes, then) = match app.strip_prefix(b"case:") {
        Some(b"close-at-login") => (vec![], Then::Close),
        Some(b"short-key-data") => (
            [msg(b'R', &0i32.to_be_bytes()), msg(b'K', b"\0\0\0")].concat(),
            Then::Silence,
        ),
        Some(b"auth-garbage") => (msg(b'R', b"\xff"), Then::Close),
        _ => (login, Then::Continue),
    };
    if s.write_all(&bytes).await.is_err() || then == Then::Close {
        return;
    }
    let mut silent = then == Then::Silence;
    while let Some((tag, body)) = read_message(&mut s, &mut buf).await {
        let (bytes, then) = match (probe, tag) {
            (_, b'X') => return,
            (true, _) => (probe_answer(tag, &body), Then::Continue),
            (false, b'Q') if !silent => answer(&body),
            _ => continue,
        };
        if s.write_all(&bytes).await.is_err() || then == Then::Close {
            return;
        }
        silent |= then == Then::Silence;
    }
}

/// The answer to a client's Query, by the case its text names.
fn answer(query: &[u8]) -> (Vec<u8>, Then) {
    let case = query
        .windows(5)
        .position(|w| w == b"case:")
        .map(|i| &query[i + 5..])
        .and_then(|rest| rest.split(|&b| b == b'\'' || b == 0).next())
        .unwrap_or_default();
    let row = || {
        [
            msg(
                b'T',
                b"\0\x01c\0\0\0\0\0\0\0\0\0\0\x19\xff\xff\xff\xff\xff\xff\0\0",
            ),
            msg(b'D', b"\0\x01\0\0\0\x02ok"),
            msg(b'C', b"SELECT 1\0"),
        ]
        .concat()
    };
    let ready = msg(b'Z', b"I");
    match case {
        b"rfq-empty" => ([row(), msg(b'Z', b"")].concat(), Then::Continue),
        b"rfq-bad-status" => ([row(), msg(b'Z', b"x")].concat(), Then::Continue),
        b"length-under-four" => (b"D\0\0\0\x02".to_vec(), Then::Continue),
        b"length-too-large" => (b"D\x7f\xff\xff\xff".to_vec(), Then::Continue),
        b"error-garbage" => (
            [msg(b'E', b"\xffno terminator"), ready].concat(),
            Then::Continue,
        ),
        b"notice-garbage" => ([msg(b'N', b"S"), row(), ready].concat(), Then::Continue),
        b"close-between-messages" => (row(), Then::Close),
        b"close-mid-message" => {
            let mut partial = b"D\0\0\0\x64\0\x01\0\0\0\x5c".to_vec();
            partial.extend_from_slice(b"only part of it");
            (partial, Then::Close)
        }
        b"fatal-then-close" => (
            msg(b'E', b"SFATAL\0VFATAL\0C57P01\0Mterminating connection\0\0"),
            Then::Close,
        ),
        b"silent" => (vec![], Then::Silence),
        b"begin" => ([row(), msg(b'Z', b"T")].concat(), Then::Continue),
        b"begin-then-close" => ([row(), msg(b'Z', b"T")].concat(), Then::Close),
        _ => ([row(), ready].concat(), Then::Continue),
    }
}

/// What tokio-postgres needs to hear for the probe's status query (extended protocol, binary
/// results: not in recovery, timeline 1) and its write check (simple protocol, one row).
fn probe_answer(tag: u8, body: &[u8]) -> Vec<u8> {
    let columns = |format: u8| {
        let mut t = BytesMut::new();
        t.put_i16(2);
        for (name, oid, len) in [(&b"r\0"[..], 16, 1i16), (b"t\0", 20, 8)] {
            t.put_slice(name);
            t.put_i32(0);
            t.put_i16(0);
            t.put_i32(oid);
            t.put_i16(len);
            t.put_i32(-1);
            t.put_i16(format.into());
        }
        msg(b'T', &t)
    };
    match tag {
        b'P' => msg(b'1', b""),
        b'D' if body.first() == Some(&b'S') => [msg(b't', b"\0\0"), columns(0)].concat(),
        b'D' => columns(1),
        b'B' => msg(b'2', b""),
        b'E' => {
            let row = [&b"\0\x02\0\0\0\x01\0\0\0\0\x08"[..], &1i64.to_be_bytes()].concat();
            [msg(b'D', &row), msg(b'C', b"SELECT 1\0")].concat()
        }
        b'C' => msg(b'3', b""),
        b'S' => msg(b'Z', b"I"),
        b'Q' => [
            msg(
                b'T',
                b"\0\x01m\0\0\0\0\0\0\0\0\0\0\x19\xff\xff\xff\xff\xff\xff\0\0",
            ),
            msg(b'D', b"\0\x01\0\0\0\x010"),
            msg(b'C', b"SELECT 1\0"),
            msg(b'Z', b"I"),
        ]
        .concat(),
        _ => vec![],
    }
}

/// The startup packet's parameters, or None for a CancelRequest or a closed connection. TLS
/// and GSS encryption requests are declined.
async fn read_startup(s: &mut TcpStream, buf: &mut BytesMut) -> Option<Vec<u8>> {
    loop {
        while buf.len() < 8 || buf.len() < u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize
        {
            if s.read_buf(buf).await.ok()? == 0 {
                return None;
            }
        }
        let len = buf.get_u32() as usize;
        let code = buf.get_u32();
        let params = buf.split_to(len.checked_sub(8)?).to_vec();
        match code {
            196608 => return Some(params),
            80877103 | 80877104 => s.write_all(b"N").await.ok()?,
            _ => return None,
        }
    }
}

fn param<'a>(params: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let mut fields = params.split(|&b| b == 0);
    while let Some(key) = fields.next() {
        let value = fields.next()?;
        if key == name {
            return Some(value);
        }
    }
    None
}

async fn read_message(s: &mut TcpStream, buf: &mut BytesMut) -> Option<(u8, Vec<u8>)> {
    loop {
        if buf.len() >= 5 {
            let len = u32::from_be_bytes(buf[1..5].try_into().unwrap()) as usize;
            if buf.len() > len {
                let tag = buf.get_u8();
                buf.advance(4);
                return Some((tag, buf.split_to(len - 4).to_vec()));
            }
        }
        if s.read_buf(buf).await.ok()? == 0 {
            return None;
        }
    }
}
