//! The one place where what went wrong becomes what a client reads: SQLSTATE, severity, a
//! message that begins "bulkhead:" and a HINT saying what to do (DESIGN.md §3.8).

use std::time::Duration;

use bytes::BytesMut;

use crate::metrics::Class;
use crate::protocol::backend::{ErrorFields, Severity, write_error};

/// Why bulkhead cancelled a statement: which deadline passed, or that the write circuit
/// opened while a commit waited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline {
    pub class: Class,
    pub limit: Duration,
    pub cause: Cause,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The server took longer than the deadline to answer.
    Elapsed,
    /// The server stopped reading what bulkhead sent it (TCP backpressure).
    Stalled,
    /// The write circuit of the host opened while this commit waited: commits there are
    /// failing, so it is answered now rather than at its deadline.
    CircuitOpened,
}

impl std::fmt::Display for Deadline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let limit = humantime::format_duration(self.limit);
        let class = self.class.label();
        match self.cause {
            Cause::Elapsed => write!(f, "the {class} deadline of {limit} passed"),
            Cause::Stalled => write!(
                f,
                "the server accepted no data for the {class} deadline of {limit}"
            ),
            Cause::CircuitOpened => write!(
                f,
                "the write circuit opened while it waited to commit (commits to this server are failing)"
            ),
        }
    }
}

/// What a lost server connection means for the client's work, for the hint it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lost {
    /// A write was sent and not answered, or anything inside a transaction: it may have
    /// committed (an autocommit write, a COMMIT).
    WriteInDoubt,
    /// A transaction was open and nothing was in flight: it cannot have committed.
    OpenTransaction,
    /// Nothing was in flight and no transaction was open (or the session was still logging in).
    Nothing,
}

/// An error bulkhead raises itself, toward a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The client sent something that is not valid protocol. FATAL 08P01.
    ClientProtocol(String),
    /// The client asked for a protocol version bulkhead cannot speak. FATAL 0A000, as
    /// PostgreSQL answers it.
    UnsupportedProtocol(String),
    /// The server connection broke or sent garbage mid-session. FATAL 08006; the hint says
    /// what became of the client's work.
    ServerLost(String, Lost),
    /// No server accepted the connection. FATAL 57P03.
    NoServer(String),
    /// bulkhead is shutting down. FATAL 57P01.
    ShuttingDown,
    /// The client took longer than [timeouts] startup to authenticate. FATAL 08P01.
    StartupTimeout,
    /// A deadline passed and the server cancelled the statement. ERROR 57014; the session goes on.
    Cancelled(Deadline),
    /// A deadline passed and the server did not answer the cancel within the grace period.
    /// FATAL 57014 for a read; 40003 for a write, whose outcome is unknown.
    Unanswered { deadline: Deadline, grace: Duration },
    /// bulkhead's cancel freed a COMMIT waiting for synchronous replication: committed locally,
    /// not confirmed by the standby. FATAL 40003.
    CommitUnconfirmed(Deadline),
    /// The probe found the session's server not answering twice in a row, and the session had
    /// a statement waiting there or was about to send one. FATAL 40003 when a write is in
    /// doubt, else 08006.
    Unresponsive(String, Lost),
    /// The server stopped answering while this statement (a read) was in flight. The session
    /// stays open; the server's late answer is dropped and its transaction rolled back.
    /// ERROR 57P03.
    Abandoned(String),
    /// The server is not answering, so the statement was not sent. ERROR 57P03; the session
    /// stays open.
    NotSent(String),
    /// Transaction pooling: the server connection was lost while this statement was in
    /// flight or its transaction open; it did not commit. ERROR 08006; the client's connection
    /// stays open and its next transaction gets another server connection.
    LostInTransaction(String),
    /// Transaction pooling: the server connection was lost while this COMMIT (or autocommit
    /// write) was in flight: it may or may not have committed. ERROR 40003; the connection
    /// stays open.
    CommitInDoubt(String),
    /// Transaction pooling: a statement in a block whose server connection was lost. ERROR
    /// 25P02, as PostgreSQL answers in a failed block, until ROLLBACK (answered by bulkhead).
    AbortedByLoss,
    /// Transaction pooling: no server connection for the client's next transaction (no
    /// writable primary within hold_new_connections, or none accepted). ERROR 57P03; the
    /// connection stays open.
    NoServerForTransaction(String),
    /// The write circuit is open; retry in `retry_in`. ERROR 57P03.
    CircuitOpen { retry_in: Duration },
    /// A statement in a block that failed because bulkhead refused a write. ERROR 25P02.
    InFailedBlock,
    /// No concurrency slot came free within queue_timeout. ERROR 53400.
    Shed { waited: Duration },
    /// More clients than [limits] max_clients. FATAL 53300.
    TooManyClients(u32),
    /// bulkhead has no file descriptor left for another session. FATAL 53300.
    OutOfDescriptors,
    /// No writable primary appeared within hold_new_connections. FATAL 57P03.
    NoPrimary(String),
    /// The session's primary was demoted or replaced. FATAL 57P01.
    Demoted,
    /// A read-only session's host no longer takes reads: its replay lag passed
    /// max_replica_lag, it stopped answering, or it is no longer a standby (or the primary
    /// while no standby qualifies). FATAL 57P01, at a quiet point.
    Unreadable,
    /// TLS to the server, as [database] tls asks, could not be set up. FATAL 08006.
    ServerTls(String),
    /// A plaintext session on a listener with tls = "require". FATAL 28000.
    TlsRequired,
    /// The client asked for SCRAM channel binding, which cannot cross bulkhead's two TLS
    /// sessions. FATAL 08P01.
    ChannelBinding(&'static str),
    /// The password (or the user) did not match, in a pooled mode. FATAL 28P01, worded as
    /// PostgreSQL words it.
    PasswordFailed(String),
    /// No server connection of the (user, database) pool came free within queue_timeout.
    /// FATAL 53300.
    PoolExhausted {
        user: String,
        database: String,
        waited: Duration,
    },
    /// The startup packet asks for something the pooled modes cannot give (replication, no
    /// user name). FATAL 0A000 or 28000.
    NotPoolable(&'static str, String),
}

impl Refusal {
    /// Appends the ErrorResponse for this refusal to `out`.
    pub fn write(&self, out: &mut BytesMut) {
        let (severity, code, message, hint): (Severity, &str, String, &str) = match self {
            Refusal::PasswordFailed(user) => (
                Severity::Fatal,
                "28P01",
                format!("password authentication failed for user \"{user}\""),
                "",
            ),
            Refusal::PoolExhausted {
                user,
                database,
                waited,
            } => (
                Severity::Fatal,
                "53300",
                format!(
                    "bulkhead: no server connection of pool {user}/{database} came free within {}",
                    humantime::format_duration(Duration::from_millis(waited.as_millis() as u64))
                ),
                "Every server connection of this pool is in use: raise [pool] size, or retry.",
            ),
            Refusal::NotPoolable(code, why) => (
                Severity::Fatal,
                code,
                format!("bulkhead: {why}"),
                "",
            ),
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
            Refusal::ServerLost(why, lost) => (
                Severity::Fatal,
                "08006",
                format!("bulkhead: lost the connection to the database server: {why}"),
                match lost {
                    Lost::WriteInDoubt => {
                        "Reconnect. The write in progress may or may not have been committed."
                    }
                    Lost::OpenTransaction => {
                        "Reconnect. The open transaction did not commit; run it again."
                    }
                    Lost::Nothing => "Reconnect.",
                },
            ),
            Refusal::Unresponsive(why, lost) => (
                Severity::Fatal,
                if *lost == Lost::WriteInDoubt {
                    "40003"
                } else {
                    "08006"
                },
                format!("bulkhead: the database server is not answering: {why}; closing the connection"),
                match lost {
                    Lost::WriteInDoubt => {
                        "Reconnect. The write in progress may or may not have been committed; check before retrying it."
                    }
                    Lost::OpenTransaction => {
                        "Reconnect. The open transaction did not commit; run it again."
                    }
                    Lost::Nothing => "Reconnect and retry; no write was in progress.",
                },
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
            Refusal::Cancelled(deadline) => (
                Severity::Error,
                "57014",
                format!("bulkhead: canceling statement because {deadline}"),
                match deadline.class {
                    Class::Write if deadline.cause == Cause::CircuitOpened => {
                        "The statement was cancelled on the server and did not take effect; the session goes on. \
                         Writes are refused while the write circuit is open; retry the transaction in a few seconds."
                    }
                    Class::Read => {
                        "The statement was cancelled on the server; the session goes on. Raise [timeouts] read if it needs longer."
                    }
                    Class::Write => {
                        "The statement was cancelled on the server and did not take effect; the session goes on. Raise [timeouts] write if it needs longer."
                    }
                },
            ),
            Refusal::Unanswered { deadline, grace } if deadline.class == Class::Read => (
                Severity::Fatal,
                "57014",
                format!(
                    "bulkhead: {deadline} and the server did not answer the cancel within {}; closing the connection",
                    humantime::format_duration(*grace)
                ),
                "The server may be overloaded or stuck. Reconnect and retry.",
            ),
            Refusal::Unanswered { deadline, grace } => (
                Severity::Fatal,
                "40003",
                format!(
                    "bulkhead: {deadline} and the server did not answer the cancel within {}; \
                     the write may or may not have been committed",
                    humantime::format_duration(*grace)
                ),
                "Check whether the write took effect before retrying it; if you check with pg_xact_status(), \
                 'in progress' means not decided yet, not lost: check again later. The connection was closed.",
            ),
            Refusal::CommitUnconfirmed(deadline) => (
                Severity::Fatal,
                "40003",
                format!(
                    "bulkhead: the commit waited for synchronous replication and was cancelled \
                     because {deadline}; it committed locally but no standby confirmed it"
                ),
                "The durability you asked for was not confirmed. Check the transaction with \
                 pg_xact_status() before retrying. The connection was closed.",
            ),
            Refusal::Abandoned(why) => (
                Severity::Error,
                "57P03",
                format!(
                    "bulkhead: the database server stopped answering while this statement was in flight: {why}; \
                     its result will be discarded, and a transaction it was in is rolled back"
                ),
                "The statement was a read; it may still run when the server wakes, and nothing of it reaches you. \
                 The connection stays open; retry in a few seconds. Until the server answers, statements are refused at once.",
            ),
            Refusal::NotSent(why) => (
                Severity::Error,
                "57P03",
                format!("bulkhead: the database server is not answering: {why}; the statement was not sent"),
                "The connection stays open; retry in a few seconds. Until the server answers, statements are refused at once.",
            ),
            Refusal::LostInTransaction(why) => (
                Severity::Error,
                "08006",
                format!("bulkhead: lost the connection to the database server: {why}"),
                "The transaction did not commit; run it again. This connection stays open: its next transaction \
                 goes to the current primary, with its settings and prepared statements.",
            ),
            Refusal::CommitInDoubt(why) => (
                Severity::Error,
                "40003",
                format!(
                    "bulkhead: lost the connection to the database server while a commit was in flight: {why}; \
                     the transaction may or may not have committed"
                ),
                "Check whether it took effect before running it again. This connection stays open.",
            ),
            Refusal::AbortedByLoss => (
                Severity::Error,
                "25P02",
                "bulkhead: current transaction is aborted, commands ignored until end of transaction block".into(),
                "The connection to the database server was lost during this transaction. End the block with \
                 ROLLBACK and run the transaction again.",
            ),
            Refusal::NoServerForTransaction(why) => (
                Severity::Error,
                "57P03",
                format!("bulkhead: no database server for this transaction: {why}; the statement was not sent"),
                "The database is failing over or unreachable. This connection stays open; retry in a few seconds.",
            ),
            Refusal::CircuitOpen { retry_in } => (
                Severity::Error,
                "57P03",
                format!(
                    "bulkhead: write refused: the write circuit is open after repeated write failures; retry in {}",
                    humantime::format_duration(round_up(*retry_in))
                ),
                "Writes fail fast while the database cannot commit (for example during a failover); reads go on. \
                 Retry the transaction after the time given.",
            ),
            Refusal::InFailedBlock => (
                Severity::Error,
                "25P02",
                "bulkhead: current transaction is aborted, commands ignored until end of transaction block".into(),
                "A write in this transaction was refused earlier. End the block with ROLLBACK and retry it.",
            ),
            Refusal::Shed { waited } => (
                Severity::Error,
                "53400",
                format!(
                    "bulkhead: statement shed: the database is at its concurrency limit and no slot came free within {}",
                    humantime::format_duration(*waited)
                ),
                "The database is overloaded; back off and retry. The statement did not run.",
            ),
            Refusal::TooManyClients(max) => (
                Severity::Fatal,
                "53300",
                format!("bulkhead: sorry, too many clients already (max_clients = {max})"),
                "Use fewer connections (a pool), or raise [limits] max_clients.",
            ),
            Refusal::OutOfDescriptors => (
                Severity::Fatal,
                "53300",
                "bulkhead: sorry, too many clients already: no file descriptor left for another session".into(),
                "Use fewer connections, or raise bulkhead's file descriptor limit (ulimit -n, LimitNOFILE=).",
            ),
            Refusal::NoPrimary(why) => (
                Severity::Fatal,
                "57P03",
                format!("bulkhead: no writable primary is available: {why}"),
                "The database is failing over or unreachable. Retry in a few seconds.",
            ),
            Refusal::Unreadable => (
                Severity::Fatal,
                "57P01",
                "bulkhead: terminating connection: this server no longer takes read-only sessions \
                 (replay lag over max_replica_lag, not answering, or its role changed)"
                    .into(),
                "Reconnect: the read-only listener sends the new session to a standby that is current.",
            ),
            Refusal::Demoted => (
                Severity::Fatal,
                "57P01",
                "bulkhead: terminating connection because its primary was replaced".into(),
                "Reconnect; new connections go to the new primary.",
            ),
            Refusal::ServerTls(why) => (
                Severity::Fatal,
                "08006",
                format!("bulkhead: cannot set up TLS to the database server: {why}"),
                "Check [database] tls, ca_file and the server's certificate; the health port's /health shows what the probe sees.",
            ),
            Refusal::TlsRequired => (
                Severity::Fatal,
                "28000",
                "bulkhead: this listener accepts only TLS connections ([listen] tls = \"require\")".into(),
                "Connect with sslmode=require, verify-ca or verify-full.",
            ),
            Refusal::ChannelBinding(why) => (
                Severity::Fatal,
                "08P01",
                format!("bulkhead: SCRAM channel binding cannot pass through bulkhead: {why}"),
                "bulkhead ends the client's TLS session and starts its own to the server, and their certificates differ, so no channel binding can match both. Connect with channel_binding=disable (SCRAM-SHA-256 without binding works), or to bulkhead without TLS; or give bulkhead's listener the server's own certificate and key, and binding passes through.",
            ),
        };
        write_error(
            out,
            &ErrorFields {
                severity,
                code,
                message: &message,
                hint: (!hint.is_empty()).then_some(hint),
            },
        );
    }
}

/// Whole seconds (at least one) for a retry hint.
fn round_up(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::backend::error_info;

    fn read() -> Deadline {
        Deadline {
            class: Class::Read,
            limit: Duration::from_secs(30),
            cause: Cause::Elapsed,
        }
    }

    fn write() -> Deadline {
        Deadline {
            class: Class::Write,
            limit: Duration::from_millis(500),
            cause: Cause::Elapsed,
        }
    }

    #[test]
    fn deadline_messages_say_which_deadline_passed() {
        let mut out = BytesMut::new();
        Refusal::Cancelled(write()).write(&mut out);
        let text = String::from_utf8_lossy(&out);
        assert!(
            text.contains("the write deadline of 500ms passed"),
            "{text}"
        );
        let stalled = Deadline {
            cause: Cause::Stalled,
            ..write()
        };
        assert!(stalled.to_string().contains("accepted no data"));
        let opened = Deadline {
            cause: Cause::CircuitOpened,
            ..write()
        };
        assert!(opened.to_string().contains("write circuit opened"));
        assert_eq!(error_info(&out[5..]).severity, Severity::Error);
    }

    #[test]
    fn every_refusal_has_sqlstate_message_and_hint() {
        let cases = [
            (Refusal::ClientProtocol("x".into()), "08P01"),
            (Refusal::UnsupportedProtocol("x".into()), "0A000"),
            (Refusal::ServerLost("x".into(), Lost::WriteInDoubt), "08006"),
            (Refusal::NoServer("x".into()), "57P03"),
            (Refusal::ShuttingDown, "57P01"),
            (Refusal::StartupTimeout, "08P01"),
            (Refusal::Cancelled(read()), "57014"),
            (
                Refusal::Unanswered {
                    deadline: read(),
                    grace: Duration::from_secs(1),
                },
                "57014",
            ),
            (
                Refusal::Unanswered {
                    deadline: write(),
                    grace: Duration::from_secs(1),
                },
                "40003",
            ),
            (Refusal::CommitUnconfirmed(write()), "40003"),
            (
                Refusal::CircuitOpen {
                    retry_in: Duration::from_millis(1500),
                },
                "57P03",
            ),
            (Refusal::InFailedBlock, "25P02"),
            (Refusal::NoPrimary("x".into()), "57P03"),
            (Refusal::TooManyClients(5), "53300"),
            (
                Refusal::Shed {
                    waited: Duration::from_millis(100),
                },
                "53400",
            ),
            (Refusal::Demoted, "57P01"),
            (Refusal::ServerTls("x".into()), "08006"),
            (Refusal::TlsRequired, "28000"),
            (Refusal::ChannelBinding("x"), "08P01"),
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
