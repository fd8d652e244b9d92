//! A pooled server connection: logging in to the server as a client's user (with the
//! credential that client's login left), running bulkhead's own statements on it (the
//! parameters a client asked for, the reset before it is lent again), and what it reported.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

use super::answers::Answers;
use crate::auth::scram::KeyedClient;
use crate::auth::{Credential, md5_salted};
use crate::protocol::backend::{self, Severity};
use crate::protocol::cstr;
use crate::tls::Stream;

/// The largest message bulkhead reads whole from a server during login or its own
/// statements.
const MAX_MESSAGE: usize = 1 << 20;

/// A logged-in server connection, with what it told about itself.
pub struct ServerConn {
    pub stream: Stream,
    pub info: ConnInfo,
}

/// What bulkhead knows of a pooled connection besides its socket (which the relay holds while
/// the connection is lent).
pub struct ConnInfo {
    pub addr: SocketAddr,
    pub host: usize,
    /// The backend's pid and cancel secret.
    pub pid: i32,
    pub secret: bytes::Bytes,
    /// Protocol-level prepared statements it holds for clients (transaction pooling): name to
    /// the Parse message body that made it, and when it was made (for eviction).
    /// `None`: a statement by that name may or may not be there (its batch failed).
    pub prepared: std::collections::HashMap<Vec<u8>, Prepared>,
    pub prepared_seq: u64,
    /// The parameters it reported (ParameterStatus), kept current.
    pub params: Vec<(String, String)>,
    /// The settings it was given (or later set to) for its clients: name to value.
    pub settings: Vec<(String, String)>,
    pub born: Instant,
    pub idle_since: Instant,
}

/// A statement on a connection: the Parse body that made it (`None`: unknown whether it is
/// there), and when it was made.
pub type Prepared = (Option<std::sync::Arc<[u8]>>, u64);

/// Why a login or one of bulkhead's statements failed.
#[derive(Debug)]
pub enum ServerError {
    /// The server said no with this ErrorResponse (the whole message): the client gets it as
    /// the server sent it.
    Refused(BytesMut),
    /// The connection broke or the server broke the protocol.
    Broken(String),
}

fn broken(why: impl Into<String>) -> ServerError {
    ServerError::Broken(why.into())
}

/// The startup packet for `user` on `database` with `settings`.
fn startup_packet(user: &str, database: &str, settings: &[(String, String)]) -> BytesMut {
    let mut out = BytesMut::new();
    out.put_u32(0);
    out.put_u32(196_608);
    for (k, v) in [("user", user), ("database", database)]
        .into_iter()
        .chain(settings.iter().map(|(k, v)| (k.as_str(), v.as_str())))
    {
        out.put_slice(k.as_bytes());
        out.put_u8(0);
        out.put_slice(v.as_bytes());
        out.put_u8(0);
    }
    out.put_u8(0);
    let len = out.len() as u32;
    out[..4].copy_from_slice(&len.to_be_bytes());
    out
}

fn password_message(data: &[u8], out: &mut BytesMut) {
    out.clear();
    out.put_u8(b'p');
    out.put_u32(4 + data.len() as u32);
    out.put_slice(data);
}

fn sasl_initial(mechanism: &[u8], data: &[u8], out: &mut BytesMut) {
    out.clear();
    out.put_u8(b'p');
    out.put_u32(4 + mechanism.len() as u32 + 1 + 4 + data.len() as u32);
    out.put_slice(mechanism);
    out.put_u8(0);
    out.put_u32(data.len() as u32);
    out.put_slice(data);
}

/// SCRAM toward the server, with either a password or a client's revealed key.
enum Scram {
    Password(ScramSha256),
    Keys(KeyedClient),
}

/// Logs in on `stream` as `user` to `database` with `credential`, and reads up to the first
/// ReadyForQuery. The caller bounds the time. No settings go in the startup packet: they
/// would become the connection's defaults, which RESET and DISCARD ALL return to; clients'
/// settings are set after login (`adopt`).
pub async fn log_in(
    mut stream: Stream,
    addr: SocketAddr,
    host: usize,
    user: &str,
    database: &str,
    credential: Option<&Credential>,
) -> Result<ServerConn, ServerError> {
    stream
        .write_all(&startup_packet(user, database, &[]))
        .await
        .map_err(|e| broken(e.to_string()))?;
    let mut out = BytesMut::new();
    let mut body = BytesMut::new();
    let mut answers = Answers::default();
    let mut scram: Option<Scram> = None;
    let (mut pid, mut secret) = (0, bytes::Bytes::new());
    let mut params = Vec::new();
    let no_secret = || {
        broken(format!(
            "the server asks user {user:?} for a password bulkhead does not have"
        ))
    };
    loop {
        let tag = answers
            .next(&mut stream, MAX_MESSAGE, &mut body)
            .await
            .map_err(broken)?;
        match tag {
            backend::AUTHENTICATION_TAG => {
                let code = i32::from_be_bytes(
                    body.get(..4)
                        .ok_or_else(|| broken("short Authentication message"))?
                        .try_into()
                        .expect("4 bytes"),
                );
                let data = &body[4..];
                match (code, credential) {
                    (0, _) => continue,
                    (3, Some(Credential::Password(pw))) => {
                        let mut d = pw.as_bytes().to_vec();
                        d.push(0);
                        password_message(&d, &mut out);
                    }
                    (5, Some(c @ (Credential::Password(_) | Credential::Md5(_)))) => {
                        let salt: [u8; 4] = data
                            .get(..4)
                            .and_then(|s| s.try_into().ok())
                            .ok_or_else(|| broken("short md5 salt"))?;
                        let answer = match c {
                            Credential::Password(pw) => {
                                postgres_protocol::authentication::md5_hash(
                                    user.as_bytes(),
                                    pw.as_bytes(),
                                    salt,
                                )
                            }
                            Credential::Md5(stored) => md5_salted(stored, salt),
                            Credential::ScramKeys { .. } => unreachable!("matched above"),
                        };
                        let mut d = answer.into_bytes();
                        d.push(0);
                        password_message(&d, &mut out);
                    }
                    (10, Some(Credential::Password(pw))) => {
                        let client = ScramSha256::new(pw.as_bytes(), ChannelBinding::unsupported());
                        sasl_initial(b"SCRAM-SHA-256", client.message(), &mut out);
                        scram = Some(Scram::Password(client));
                    }
                    (
                        10,
                        Some(Credential::ScramKeys {
                            client_key,
                            verifier,
                        }),
                    ) => {
                        let (client, first) = KeyedClient::start(*client_key, verifier.clone());
                        sasl_initial(b"SCRAM-SHA-256", first.as_bytes(), &mut out);
                        scram = Some(Scram::Keys(client));
                    }
                    (11, _) => {
                        let reply = match scram.as_mut() {
                            Some(Scram::Password(c)) => {
                                c.update(data).map_err(|e| broken(e.to_string()))?;
                                c.message().to_vec()
                            }
                            Some(Scram::Keys(c)) => c
                                .respond(data)
                                .map_err(|e| broken(format!("{e:?}")))?
                                .into_bytes(),
                            None => return Err(broken("SASLContinue without SASL")),
                        };
                        password_message(&reply, &mut out);
                    }
                    (12, _) => {
                        match scram.as_mut() {
                            Some(Scram::Password(c)) => {
                                c.finish(data).map_err(|e| broken(e.to_string()))?
                            }
                            Some(Scram::Keys(c)) => {
                                c.verify(data).map_err(|e| broken(format!("{e:?}")))?
                            }
                            None => return Err(broken("SASLFinal without SASL")),
                        }
                        continue;
                    }
                    (3 | 5 | 10, _) => return Err(no_secret()),
                    (code, _) => {
                        return Err(broken(format!(
                            "the server asks for authentication method {code}, which bulkhead cannot use"
                        )));
                    }
                }
                stream
                    .write_all(&out)
                    .await
                    .map_err(|e| broken(e.to_string()))?;
            }
            backend::BACKEND_KEY_DATA_TAG => {
                let (p, s) = backend::backend_key_data(&body)
                    .ok_or_else(|| broken("invalid BackendKeyData"))?;
                pid = p;
                secret = bytes::Bytes::copy_from_slice(s);
            }
            backend::PARAMETER_STATUS_TAG => record_parameter(&mut params, &body),
            backend::ERROR_RESPONSE_TAG => return Err(ServerError::Refused(whole(tag, &body))),
            backend::NOTICE_RESPONSE_TAG => {}
            backend::READY_FOR_QUERY_TAG => {
                let now = Instant::now();
                return Ok(ServerConn {
                    stream,
                    info: ConnInfo {
                        addr,
                        host,
                        pid,
                        secret,
                        prepared: Default::default(),
                        prepared_seq: 0,
                        params,
                        settings: Vec::new(),
                        born: now,
                        idle_since: now,
                    },
                });
            }
            other => {
                return Err(broken(format!(
                    "unexpected message '{}' during login",
                    crate::protocol::framing::printable(other)
                )));
            }
        }
    }
}

/// A message again, with its tag and length.
fn whole(tag: u8, body: &[u8]) -> BytesMut {
    let mut out = BytesMut::with_capacity(5 + body.len());
    out.put_u8(tag);
    out.put_u32(4 + body.len() as u32);
    out.put_slice(body);
    out
}

/// Records a ParameterStatus (name, value) in `params`, replacing an earlier value.
fn record_parameter(params: &mut Vec<(String, String)>, body: &[u8]) {
    let Some((name, rest)) = cstr(body) else {
        return;
    };
    let Some((value, _)) = cstr(rest) else {
        return;
    };
    // Borrowed, not copied, unless new: a connection reports the same names again and again.
    let (name, value) = (
        String::from_utf8_lossy(name),
        String::from_utf8_lossy(value),
    );
    match params.iter_mut().find(|(n, _)| *n == name) {
        Some((_, v)) if *v == value => {}
        Some((_, v)) => {
            v.clear();
            v.push_str(&value);
        }
        None => params.push((name.into_owned(), value.into_owned())),
    }
}

impl ServerConn {
    /// Runs `queries` (simple queries bulkhead wrote, sent together) within `within`, and
    /// reads to the ReadyForQuery of each, which must say idle. Parameter changes are recorded.
    pub async fn run(&mut self, queries: &[&str], within: Duration) -> Result<(), ServerError> {
        let mut out = BytesMut::with_capacity(queries.iter().map(|q| q.len() + 6).sum());
        for sql in queries {
            out.put_u8(b'Q');
            out.put_u32(4 + sql.len() as u32 + 1);
            out.put_slice(sql.as_bytes());
            out.put_u8(0);
        }
        let mut owed = queries.len();
        tokio::time::timeout(within, async {
            self.stream
                .write_all(&out)
                .await
                .map_err(|e| broken(e.to_string()))?;
            let mut error = None;
            let mut body = out;
            let mut answers = Answers::default();
            loop {
                let tag = answers
                    .next(&mut self.stream, MAX_MESSAGE, &mut body)
                    .await
                    .map_err(broken)?;
                match tag {
                    backend::PARAMETER_STATUS_TAG => record_parameter(&mut self.info.params, &body),
                    backend::ERROR_RESPONSE_TAG => {
                        let info = backend::error_info(&body);
                        if matches!(info.severity, Severity::Fatal | Severity::Panic) {
                            return Err(ServerError::Refused(whole(tag, &body)));
                        }
                        error = Some(whole(tag, &body));
                    }
                    backend::READY_FOR_QUERY_TAG => {
                        owed -= 1;
                        if body.first() != Some(&b'I') {
                            return Err(broken("not idle after bulkhead's statement"));
                        }
                        if owed == 0 {
                            return error.map_or(Ok(()), |e| Err(ServerError::Refused(e)));
                        }
                    }
                    _ => {}
                }
            }
        })
        .await
        .map_err(|_| broken("no answer to bulkhead's statement in time"))?
    }

    /// Makes the connection's settings the client's: sets those that differ, resets those
    /// the client did not ask for. Nothing is sent when they match.
    pub async fn adopt(
        &mut self,
        wanted: &[(String, String)],
        within: Duration,
    ) -> Result<(), ServerError> {
        let sql = settings_sql(&self.info.settings, wanted);
        if sql.is_empty() {
            return Ok(());
        }
        self.run(&[&sql], within).await?;
        self.info.settings = wanted.to_vec();
        Ok(())
    }

    /// Makes the connection as fresh as a new one for its next client (`DISCARD ALL`: the
    /// transaction-independent state, prepared statements, temporary tables, LISTENs, advisory
    /// locks, settings), then sets the settings it had again, in the same round trip, so the
    /// next client with the same settings needs none.
    pub async fn reset(&mut self, within: Duration) -> Result<(), ServerError> {
        let again = settings_sql(&[], &self.info.settings);
        self.info.prepared.clear();
        if again.is_empty() {
            self.run(&["DISCARD ALL"], within).await
        } else {
            self.run(&["DISCARD ALL", &again], within).await
        }
    }
}

impl ConnInfo {
    /// Whether the connection may be lent again: not older than `lifetime` ("0s": no limit).
    pub fn expired(&self, lifetime: Duration, now: Instant) -> bool {
        !lifetime.is_zero() && now.saturating_duration_since(self.born) >= lifetime
    }
}

/// The statements that take a connection from settings `have` to `want`.
fn settings_sql(have: &[(String, String)], want: &[(String, String)]) -> String {
    let mut sql = String::new();
    for (name, value) in want {
        if !have.iter().any(|(n, v)| n == name && v == value) {
            if !sql.is_empty() {
                sql.push(';');
            }
            sql.push_str("SELECT pg_catalog.set_config(");
            push_literal(&mut sql, name);
            sql.push_str(", ");
            push_literal(&mut sql, value);
            sql.push_str(", false)");
        }
    }
    for (name, _) in have {
        if !want.iter().any(|(n, _)| n == name) {
            if !sql.is_empty() {
                sql.push(';');
            }
            sql.push_str("RESET ");
            push_quoted(&mut sql, '"', name);
        }
    }
    sql
}

/// Appends a string literal for SQL: E'…' with quotes and backslashes doubled.
fn push_literal(sql: &mut String, s: &str) {
    sql.push('E');
    push_quoted(sql, '\'', s);
}

/// Appends `s` between `quote`s, doubling the quote and backslashes in it (in a quoted
/// identifier a backslash is an ordinary character: only the double quote is doubled).
fn push_quoted(sql: &mut String, quote: char, s: &str) {
    sql.push(quote);
    for c in s.chars() {
        if c == quote || (c == '\\' && quote == '\'') {
            sql.push(c);
        }
        sql.push(c);
    }
    sql.push(quote);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_and_identifiers_are_quoted() {
        let quoted = |f: fn(&mut String, &str), s: &str| {
            let mut out = String::new();
            f(&mut out, s);
            out
        };
        assert_eq!(quoted(push_literal, r"a'b\c"), r"E'a''b\\c'");
        assert_eq!(
            quoted(|o, s| push_quoted(o, '"', s), "a\"b\\"),
            "\"a\"\"b\\\""
        );
        let p = startup_packet("u", "d", &[("application_name".into(), "x".into())]);
        assert_eq!(
            u32::from_be_bytes(p[..4].try_into().unwrap()) as usize,
            p.len()
        );
        assert!(p.ends_with(b"application_name\0x\0\0"));
    }

    #[test]
    fn settings_move_from_one_clients_to_anothers() {
        let s = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        assert_eq!(settings_sql(&s(&[("a", "1")]), &s(&[("a", "1")])), "");
        assert_eq!(
            settings_sql(&s(&[("a", "1"), ("b", "2")]), &s(&[("a", "3")])),
            "SELECT pg_catalog.set_config(E'a', E'3', false);RESET \"b\""
        );
    }

    #[test]
    fn parameter_status_replaces_earlier_values() {
        let mut params = Vec::new();
        record_parameter(&mut params, b"TimeZone\0UTC\0");
        record_parameter(&mut params, b"TimeZone\0Europe/Oslo\0");
        assert_eq!(
            params,
            vec![("TimeZone".to_string(), "Europe/Oslo".to_string())]
        );
    }
}
