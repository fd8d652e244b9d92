//! The login exchange with a client, bulkhead as the server: SCRAM-SHA-256 (and -PLUS over
//! TLS, bound to the certificate bulkhead's listener presents) for SCRAM and plain secrets,
//! md5 for md5 secrets. Runs inside the startup deadline the caller sets.

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::scram::{Failure, ServerExchange};
use super::{Credential, Secret, Verifier};
use crate::errors::Refusal;
use crate::protocol::backend::AUTHENTICATION_TAG;
use crate::protocol::{cstr, frontend};

/// The longest password message a client may send during login.
const MAX_PASSWORD_MESSAGE: usize = 8192;

/// Reads one message from a peer into `body` (its old contents dropped, its room kept):
/// returns the tag, the length checked against `max`.
pub async fn read_message(
    stream: &mut (impl AsyncRead + Unpin),
    max: usize,
    body: &mut BytesMut,
) -> Result<u8, String> {
    let mut header = [0u8; 5];
    stream
        .read_exact(&mut header)
        .await
        .map_err(|e| format!("connection ended during login: {e}"))?;
    let len = login_message_length(&header, max)?;
    body.clear();
    body.resize(len - 4, 0);
    stream
        .read_exact(body)
        .await
        .map_err(|e| format!("connection ended during login: {e}"))?;
    Ok(header[0])
}

/// The length field of a login message's 5-byte `header` (it counts itself and the body, not
/// the tag), or why the message cannot be taken: shorter than the field itself, or a body
/// longer than `max`.
pub fn login_message_length(header: &[u8], max: usize) -> Result<usize, String> {
    let len = u32::from_be_bytes(header[1..5].try_into().expect("4 bytes")) as usize;
    if !(4..=max + 4).contains(&len) {
        return Err(format!(
            "message '{}' of {len} bytes during login",
            crate::protocol::framing::printable(header[0])
        ));
    }
    Ok(len)
}

/// Appends an Authentication message: its code and data.
pub fn write_authentication(out: &mut BytesMut, code: i32, data: &[u8]) {
    out.put_u8(AUTHENTICATION_TAG);
    out.put_u32(8 + data.len() as u32);
    out.put_i32(code);
    out.put_slice(data);
}

const SASL: i32 = 10;
const SASL_CONTINUE: i32 = 11;
const SASL_FINAL: i32 = 12;
const MD5: i32 = 5;

async fn send(stream: &mut (impl AsyncWrite + Unpin), out: &[u8]) -> Result<(), Refusal> {
    stream
        .write_all(out)
        .await
        .map_err(|e| Refusal::ClientProtocol(format!("connection ended during login: {e}")))
}

/// Reads a PasswordMessage (or SASL response) into `body`. What the client sends is read into
/// `incoming` as it arrives, a whole message in one read where its header and its body took
/// two (and a third that found nothing, tokio's readiness not being cleared by an exact read);
/// whatever follows the message stays there for the relay, as PostgreSQL keeps what a
/// client sent ahead.
async fn password_message(
    stream: &mut (impl AsyncRead + Unpin),
    incoming: &mut BytesMut,
    body: &mut BytesMut,
) -> Result<(), Refusal> {
    let len = loop {
        if let Some(header) = incoming.get(..5) {
            let len = login_message_length(header, MAX_PASSWORD_MESSAGE)
                .map_err(Refusal::ClientProtocol)?;
            if incoming.len() > len {
                break len;
            }
            incoming.reserve(1 + len - incoming.len());
        }
        match stream.read_buf(incoming).await {
            Ok(0) => {
                return Err(Refusal::ClientProtocol(
                    "connection ended during login: early eof".into(),
                ));
            }
            Ok(_) => {}
            Err(e) => {
                return Err(Refusal::ClientProtocol(format!(
                    "connection ended during login: {e}"
                )));
            }
        }
    };
    let tag = incoming[0];
    body.clear();
    body.extend_from_slice(&incoming[5..1 + len]);
    bytes::Buf::advance(incoming, 1 + len);
    if tag != b'p' {
        return Err(Refusal::ClientProtocol(format!(
            "expected a password message during login, got '{}'",
            crate::protocol::framing::printable(tag)
        )));
    }
    Ok(())
}

/// Authenticates `user` with `secret` (`None`: no such user; the exchange runs to its end
/// against a mock verifier and fails as a wrong password does). `binding` is the
/// tls-server-end-point data when the client is on TLS: SCRAM-SHA-256-PLUS is offered then.
/// Sends nothing on success: the caller sends AuthenticationOk once a server connection is
/// ready. What the client sent after its last login message is left in `incoming`.
pub async fn authenticate(
    stream: &mut (impl AsyncRead + AsyncWrite + Unpin),
    incoming: &mut BytesMut,
    user: &str,
    secret: Option<&Secret>,
    mock_key: &[u8; 32],
    binding: Option<Vec<u8>>,
) -> Result<Credential, Refusal> {
    let wrong = || Refusal::PasswordFailed(user.to_string());
    // One buffer for what is sent, one for what is read, through the whole exchange.
    let mut out = BytesMut::with_capacity(256);
    let mut body = BytesMut::with_capacity(256);
    if let Some(secret @ Secret::Md5(stored)) = secret {
        let mut salt = [0u8; 4];
        getrandom::fill(&mut salt).expect("the system's random source works");
        write_authentication(&mut out, MD5, &salt);
        send(stream, &out).await?;
        password_message(stream, incoming, &mut body).await?;
        let (answer, _) = cstr(&body)
            .ok_or_else(|| Refusal::ClientProtocol("malformed password message".into()))?;
        return if secret.md5_matches(user, salt, answer) {
            Ok(Credential::Md5(stored.clone()))
        } else {
            Err(wrong())
        };
    }
    let verifier = match secret {
        Some(Secret::Scram(v)) | Some(Secret::Plain { verifier: v, .. }) => v.clone(),
        _ => Verifier::mock(user, mock_key),
    };
    let offer: &[u8] = if binding.is_some() {
        b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0"
    } else {
        b"SCRAM-SHA-256\0\0"
    };
    write_authentication(&mut out, SASL, offer);
    send(stream, &out).await?;
    password_message(stream, incoming, &mut body).await?;
    let (mechanism, first) = frontend::sasl_initial_response(&body)
        .ok_or_else(|| Refusal::ClientProtocol("malformed SASLInitialResponse".into()))?;
    let failed = |f: Failure| match f {
        Failure::Password => wrong(),
        Failure::Protocol(why) => Refusal::ClientProtocol(why),
    };
    let exchange =
        ServerExchange::start(verifier.clone(), binding, mechanism, first).map_err(failed)?;
    out.clear();
    write_authentication(&mut out, SASL_CONTINUE, exchange.server_first().as_bytes());
    send(stream, &out).await?;
    password_message(stream, incoming, &mut body).await?;
    let proven = exchange.finish(&body).map_err(failed)?;
    if secret.is_none() {
        // A mock verifier cannot be matched, but never let it through.
        return Err(wrong());
    }
    out.clear();
    write_authentication(&mut out, SASL_FINAL, proven.server_final.as_bytes());
    send(stream, &out).await?;
    Ok(match secret {
        Some(Secret::Plain { password, .. }) => Credential::Password(password.clone()),
        _ => Credential::ScramKeys {
            client_key: proven.client_key,
            verifier,
        },
    })
}

/// The channel binding data for a client on TLS: the hash of the listener's certificate.
pub fn binding_for(client_tls: bool, tls: &crate::tls::Tls) -> Option<Vec<u8>> {
    if !client_tls {
        return None;
    }
    tls.listen_binding().map(<[u8]>::to_vec)
}
