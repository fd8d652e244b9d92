//! The one place where what went wrong becomes what a client reads: SQLSTATE, severity, a
//! message that begins "bulkhead:" and a HINT saying what to do (DESIGN.md §3.8).

use bytes::BytesMut;

use crate::protocol::backend::{ErrorFields, Severity, write_error};

/// An error bulkhead raises itself, toward a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The client sent something that is not valid protocol. FATAL 08P01.
    ClientProtocol(String),
    /// The client asked for a protocol version bulkhead cannot speak. FATAL 0A000, as
    /// PostgreSQL answers it.
    UnsupportedProtocol(String),
    /// The server connection broke or sent garbage mid-session. FATAL 08006.
    ServerLost(String),
    /// No server accepted the connection. FATAL 57P03.
    NoServer(String),
    /// bulkhead is shutting down. FATAL 57P01.
    ShuttingDown,
    /// The client took longer than [timeouts] startup to authenticate. FATAL 08P01.
    StartupTimeout,
}

impl Refusal {
    /// Appends the ErrorResponse for this refusal to `out`.
    pub fn write(&self, out: &mut BytesMut) {
        let (severity, code, message, hint): (Severity, &str, String, &str) = match self {
            Refusal::ClientProtocol(why) => (
                Severity::Fatal,
                "08P01",
                format!("bulkhead: invalid message from client: {why}"),
                "The client or its driver broke the PostgreSQL protocol; the connection was closed.",
            ),
            Refusal::UnsupportedProtocol(why) => (
                Severity::Fatal,
                "0A000",
                format!("bulkhead: {why}"),
                "Use a client that speaks protocol 3.",
            ),
            Refusal::ServerLost(why) => (
                Severity::Fatal,
                "08006",
                format!("bulkhead: lost the connection to the database server: {why}"),
                "Reconnect. A write that was in progress may or may not have been committed.",
            ),
            Refusal::NoServer(why) => (
                Severity::Fatal,
                "57P03",
                format!("bulkhead: no database server accepted the connection: {why}"),
                "Retry in a few seconds.",
            ),
            Refusal::ShuttingDown => (
                Severity::Fatal,
                "57P01",
                "bulkhead: terminating connection because bulkhead is shutting down".into(),
                "Reconnect; the connection will go to a running bulkhead.",
            ),
            Refusal::StartupTimeout => (
                Severity::Fatal,
                "08P01",
                "bulkhead: the client did not complete startup in time".into(),
                "Raise [timeouts] startup if authentication is slow.",
            ),
        };
        write_error(
            out,
            &ErrorFields {
                severity,
                code,
                message: &message,
                hint: Some(hint),
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::backend::error_info;

    #[test]
    fn every_refusal_has_sqlstate_message_and_hint() {
        let cases = [
            (Refusal::ClientProtocol("x".into()), "08P01"),
            (Refusal::UnsupportedProtocol("x".into()), "0A000"),
            (Refusal::ServerLost("x".into()), "08006"),
            (Refusal::NoServer("x".into()), "57P03"),
            (Refusal::ShuttingDown, "57P01"),
            (Refusal::StartupTimeout, "08P01"),
        ];
        for (refusal, code) in cases {
            let mut out = BytesMut::new();
            refusal.write(&mut out);
            let info = error_info(&out[5..]);
            assert_eq!(info.code, code.as_bytes(), "{refusal:?}");
            assert!(out.windows(10).any(|w| w == b"Mbulkhead:"), "{refusal:?}");
            assert!(out.windows(1).any(|w| w == b"H"), "{refusal:?}");
        }
    }
}
