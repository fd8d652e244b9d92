//! A session whose server stopped answering, kept open for its client.
//!
//! When the probe finds a host frozen (it accepts bytes and answers nothing), a session with
//! statements waiting there answers them at once with an error and stays open: its client
//! (usually a pooled connection) goes back to the application instead of waiting out a read
//! deadline, and the pool keeps its connections. Until the server answers again, bulkhead
//! answers every message itself (an error; a ROLLBACK succeeds). The server connection is
//! kept: the server's late answers to the abandoned statements are dropped, and if they leave
//! a transaction open that the client believes ended, bulkhead rolls it back before anything
//! of the client's runs there again. This module is the client-facing half: what the client
//! is told, message by message. Pure: no I/O, no clock.

use bytes::BytesMut;

use crate::classify::{Control, transaction_control};
use crate::errors::Refusal;
use crate::protocol::backend::{self, TxStatus};
use crate::protocol::frontend;

/// A session cut loose from its unresponsive server.
#[derive(Debug)]
pub struct Detached {
    /// Requests at the head of the session's queue whose answers are dropped when they come.
    pub owed: usize,
    /// The transaction status bulkhead last gave the client.
    pub client_tx: TxStatus,
    /// The host was not answering at the last look: the head request's deadline waits.
    pub frozen: bool,
    /// What the probe said, for the errors.
    why: String,
    /// What a statement gets until the client is idle again.
    rest: Refusal,
    /// The extended-protocol batch being answered, up to its Sync.
    batch: Option<Batch>,
    /// The client's next request is to be answered here, though it is idle (no server
    /// connection could be had for it).
    next_refused: bool,
    /// The server connection was lost, and with it any block the client had open: a COMMIT
    /// of that block gets an error, never the "ROLLBACK" that PostgreSQL answers a failed
    /// block with, since the client may not have seen why its block failed (an error for a
    /// Close that drivers send without reading the answer).
    lost_block: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Batch {
    /// Refused: the error went out with its first message; nothing more until the Sync.
    Refused,
    /// A ROLLBACK (or a COMMIT that commits nothing): its messages answered as done, with
    /// this command tag, until it has run; anything after it in the batch is refused.
    Ending { tag: &'static str, ran: bool },
}

/// What the relay does once a client message has been answered.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    Go,
    /// The client sent Terminate: the session ends.
    Terminate,
}

impl Detached {
    /// `client_tx`: the status the client was last given; `owed`: requests in flight, whose
    /// answers are to be dropped.
    pub fn new(why: String, client_tx: TxStatus, owed: usize) -> Self {
        Detached {
            owed,
            client_tx,
            frozen: true,
            rest: Refusal::NotSent(why.clone()),
            why,
            batch: None,
            next_refused: false,
            lost_block: false,
        }
    }

    /// Transaction pooling, with no server connection behind the session (it was lost, or
    /// none could be had for the next transaction): bulkhead answers the client until it is
    /// idle outside a block, every statement with `rest`; its next transaction gets a
    /// connection again.
    pub fn without_server(rest: Refusal, client_tx: TxStatus, why: String) -> Self {
        Detached {
            owed: 0,
            client_tx,
            frozen: false,
            why,
            rest,
            batch: None,
            next_refused: false,
            lost_block: true,
        }
    }

    /// The same, for a client whose next request could get no server connection: that
    /// request is answered with `refusal`.
    pub fn refusing_next(refusal: Refusal, client_tx: TxStatus) -> Self {
        let mut d = Self::without_server(refusal, client_tx, String::new());
        d.next_refused = true;
        d
    }

    /// The answer to a request in flight when the server connection was lost (or stopped answering): `refusal`,
    /// then ReadyForQuery; `ends_block` if it was a commit (its block is over, whatever its
    /// fate), else a block it was in has failed.
    pub fn lost(&mut self, refusal: &Refusal, ends_block: bool, out: &mut BytesMut) {
        refusal.write(out);
        self.after_error(ends_block);
        backend::write_ready_for_query(out, self.client_tx);
    }

    /// The client's extended-protocol batch was cut off by a lost connection: `refusal` now,
    /// ReadyForQuery at its Sync.
    pub fn lost_open_batch(&mut self, refusal: &Refusal, out: &mut BytesMut) {
        refusal.write(out);
        self.after_error(false);
        self.batch = Some(Batch::Refused);
    }

    /// The client is between requests, outside a transaction: the session can follow the
    /// server again once the server's state matches.
    pub fn client_idle(&self) -> bool {
        self.batch.is_none() && self.client_tx == TxStatus::Idle && !self.next_refused
    }

    /// The answer to a statement that was in flight when the server stopped answering (one
    /// that cannot commit: a read, or a statement inside a block, which bulkhead rolls back
    /// once the server answers): an error, then ReadyForQuery; a block has failed.
    pub fn abandon(&mut self, out: &mut BytesMut) {
        self.lost(&Refusal::Abandoned(self.why.clone()), false, out);
    }

    /// The client's extended-protocol batch was cut off mid-way: its error now, and
    /// ReadyForQuery at its Sync.
    pub fn refuse_open_batch(&mut self, out: &mut BytesMut) {
        self.refuse(false, out);
        self.batch = Some(Batch::Refused);
    }

    /// Answers one message from the client. `control_of` says which prepared statements
    /// are ROLLBACK or COMMIT.
    pub fn answer(
        &mut self,
        tag: u8,
        body: &[u8],
        control_of: impl Fn(&[u8]) -> Option<Control>,
        out: &mut BytesMut,
    ) -> Next {
        if tag == frontend::TERMINATE_TAG {
            return Next::Terminate;
        }
        self.next_refused = false;
        match tag {
            frontend::QUERY_TAG => {
                self.batch = None;
                let control = transaction_control(frontend::query_text(body));
                match self.ends_block(control) {
                    Some(done) => {
                        backend::write_command_complete(out, done);
                        self.client_tx = TxStatus::Idle;
                    }
                    None => self.refuse(control == Some(Control::Commit), out),
                }
                backend::write_ready_for_query(out, self.client_tx);
            }
            frontend::FUNCTION_CALL_TAG => {
                self.batch = None;
                self.refuse(false, out);
                backend::write_ready_for_query(out, self.client_tx);
            }
            frontend::SYNC_TAG => {
                if let Some(Batch::Ending { ran: true, .. }) = self.batch.take() {
                    self.client_tx = TxStatus::Idle;
                }
                backend::write_ready_for_query(out, self.client_tx);
            }
            frontend::PARSE_TAG
            | frontend::BIND_TAG
            | frontend::DESCRIBE_TAG
            | frontend::EXECUTE_TAG
            | frontend::CLOSE_TAG
            | frontend::FLUSH_TAG => {
                let batch = match self.batch {
                    Some(b) => b,
                    None => {
                        let control = match tag {
                            // A named statement answered here would not exist on the server.
                            frontend::PARSE_TAG => frontend::parse_message(body)
                                .filter(|(name, _)| name.is_empty())
                                .and_then(|(_, text)| transaction_control(text)),
                            frontend::BIND_TAG => frontend::bind_names(body)
                                .and_then(|(_, statement)| control_of(statement)),
                            _ => None,
                        };
                        let b = match self.ends_block(control) {
                            Some(tag) => Batch::Ending { tag, ran: false },
                            None => {
                                self.refuse(control == Some(Control::Commit), out);
                                Batch::Refused
                            }
                        };
                        self.batch = Some(b);
                        b
                    }
                };
                if let Batch::Ending { tag: done, ran } = batch {
                    // Only the messages of the one statement that ends the block; a named
                    // statement, a Close, or anything after it ran would not be the server's.
                    let named_parse = tag == frontend::PARSE_TAG
                        && frontend::parse_message(body).is_none_or(|(name, _)| !name.is_empty());
                    let after = ran
                        && matches!(
                            tag,
                            frontend::PARSE_TAG | frontend::BIND_TAG | frontend::EXECUTE_TAG
                        );
                    if named_parse || after || tag == frontend::CLOSE_TAG {
                        if ran {
                            self.client_tx = TxStatus::Idle;
                        }
                        self.refuse(false, out);
                        self.batch = Some(Batch::Refused);
                    } else {
                        match tag {
                            frontend::PARSE_TAG => backend::write_empty(out, b'1'),
                            frontend::BIND_TAG => backend::write_empty(out, b'2'),
                            frontend::DESCRIBE_TAG => {
                                if body.first() == Some(&b'S') {
                                    backend::write_no_parameters(out);
                                }
                                backend::write_empty(out, b'n');
                            }
                            frontend::EXECUTE_TAG => {
                                backend::write_command_complete(out, done);
                                self.batch = Some(Batch::Ending {
                                    tag: done,
                                    ran: true,
                                });
                            }
                            _ => {}
                        }
                    }
                }
            }
            // COPY data for a COPY that never started, and anything else: dropped.
            _ => {}
        }
        Next::Go
    }

    /// What PostgreSQL answers a statement that ends the transaction block without running
    /// anything, if `control` is one: ROLLBACK always; COMMIT of a failed block becomes
    /// ROLLBACK; COMMIT outside a block commits nothing.
    fn ends_block(&self, control: Option<Control>) -> Option<&'static str> {
        // (In a failed block, PostgreSQL answers COMMIT with ROLLBACK; outside one, COMMIT.)
        match (control?, self.client_tx) {
            (Control::Rollback, _) => Some("ROLLBACK"),
            (Control::Commit, TxStatus::Failed) if !self.lost_block => Some("ROLLBACK"),
            (Control::Commit, TxStatus::Idle) => Some("COMMIT"),
            _ => None,
        }
    }

    /// The statement was not sent: the error, and the block (if any) has failed — or ended,
    /// for a COMMIT, which then did not commit.
    fn refuse(&mut self, commit: bool, out: &mut BytesMut) {
        if commit && self.lost_block && self.client_tx != TxStatus::Idle {
            Refusal::LostInTransaction(self.why.clone()).write(out);
        } else {
            self.rest.write(out);
            if matches!(self.rest, Refusal::LostInTransaction(_)) {
                // Told once why; after that the block is simply aborted, as PostgreSQL says.
                self.rest = Refusal::AbortedByLoss;
            }
        }
        self.after_error(commit);
    }

    fn after_error(&mut self, ends_block: bool) {
        self.client_tx = match self.client_tx {
            _ if ends_block => TxStatus::Idle,
            TxStatus::Idle => TxStatus::Idle,
            _ => TxStatus::Failed,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::framing::parse_header;

    /// The (tag, sqlstate or tx byte) of each message in `out`.
    fn messages(out: &[u8]) -> Vec<(char, String)> {
        let mut at = 0;
        let mut seen = Vec::new();
        while let Ok(Some(h)) = parse_header(&out[at..]) {
            let body = &out[at + 5..at + h.total()];
            let detail = match h.tag {
                b'E' => backend::error_info(body).code.escape_ascii().to_string(),
                b'Z' => (body[0] as char).to_string(),
                b'C' => String::from_utf8_lossy(&body[..body.len() - 1]).into(),
                _ => String::new(),
            };
            seen.push((h.tag as char, detail));
            at += h.total();
        }
        seen
    }

    fn query(d: &mut Detached, sql: &str) -> Vec<(char, String)> {
        let mut body = sql.as_bytes().to_vec();
        body.push(0);
        let mut out = BytesMut::new();
        assert_eq!(
            d.answer(frontend::QUERY_TAG, &body, |_| None, &mut out),
            Next::Go
        );
        messages(&out)
    }

    fn m(tag: char, detail: &str) -> (char, String) {
        (tag, detail.to_string())
    }

    #[test]
    fn a_read_in_a_block_fails_the_block_and_the_pools_rollback_ends_it() {
        let mut d = Detached::new("frozen".into(), TxStatus::InBlock, 1);
        let mut out = BytesMut::new();
        d.abandon(&mut out);
        assert_eq!(messages(&out), vec![m('E', "57P03"), m('Z', "E")]);
        assert_eq!(
            query(&mut d, "SELECT 1"),
            vec![m('E', "57P03"), m('Z', "E")]
        );
        assert!(!d.client_idle());
        assert_eq!(
            query(&mut d, "ROLLBACK"),
            vec![m('C', "ROLLBACK"), m('Z', "I")]
        );
        assert!(d.client_idle());
    }

    #[test]
    fn outside_a_block_statements_are_refused_and_the_client_stays_idle() {
        let mut d = Detached::new("frozen".into(), TxStatus::Idle, 0);
        assert_eq!(query(&mut d, "BEGIN"), vec![m('E', "57P03"), m('Z', "I")]);
        assert_eq!(
            query(&mut d, "INSERT INTO t VALUES (1)"),
            vec![m('E', "57P03"), m('Z', "I")]
        );
        assert_eq!(query(&mut d, "COMMIT"), vec![m('C', "COMMIT"), m('Z', "I")]);
        assert!(d.client_idle());
    }

    #[test]
    fn a_commit_not_sent_in_an_open_block_ends_it_uncommitted() {
        let mut d = Detached::new("frozen".into(), TxStatus::InBlock, 0);
        assert_eq!(query(&mut d, "COMMIT"), vec![m('E', "57P03"), m('Z', "I")]);
        let mut d = Detached::new("frozen".into(), TxStatus::Failed, 0);
        assert_eq!(
            query(&mut d, "COMMIT"),
            vec![m('C', "ROLLBACK"), m('Z', "I")]
        );
    }

    /// Transaction pooling, the server connection lost: the request in flight gets its
    /// error, the block has failed, and its COMMIT gets an error too: the client may not have
    /// read the first one (drivers send a Close without reading its answer), and a "ROLLBACK"
    /// tag would look like success to most of them.
    #[test]
    fn after_a_lost_connection_a_commit_of_the_block_is_an_error_not_a_rollback_tag() {
        let mut d =
            Detached::without_server(Refusal::AbortedByLoss, TxStatus::InBlock, "gone".into());
        let mut out = BytesMut::new();
        d.lost(&Refusal::LostInTransaction("gone".into()), false, &mut out);
        assert_eq!(messages(&out), vec![m('E', "08006"), m('Z', "E")]);
        assert_eq!(
            query(&mut d, "SELECT 1"),
            vec![m('E', "25P02"), m('Z', "E")]
        );
        assert_eq!(query(&mut d, "COMMIT"), vec![m('E', "08006"), m('Z', "I")]);
        assert!(d.client_idle());

        // Nothing was in flight: the block's next statement is told why, then 25P02.
        let mut d = Detached::without_server(
            Refusal::LostInTransaction("gone".into()),
            TxStatus::InBlock,
            "gone".into(),
        );
        assert_eq!(
            query(&mut d, "INSERT INTO t VALUES (1)"),
            vec![m('E', "08006"), m('Z', "E")]
        );
        assert_eq!(
            query(&mut d, "SELECT 1"),
            vec![m('E', "25P02"), m('Z', "E")]
        );
        assert_eq!(
            query(&mut d, "ROLLBACK"),
            vec![m('C', "ROLLBACK"), m('Z', "I")]
        );
        assert!(d.client_idle());

        // A COMMIT in flight: its fate is unknown, and the block is over either way.
        let mut d =
            Detached::without_server(Refusal::AbortedByLoss, TxStatus::InBlock, "gone".into());
        let mut out = BytesMut::new();
        d.lost(&Refusal::CommitInDoubt("gone".into()), true, &mut out);
        assert_eq!(messages(&out), vec![m('E', "40003"), m('Z', "I")]);
        assert!(d.client_idle());
    }

    /// No server connection for the next transaction: that request alone is refused, as a
    /// whole extended batch up to its Sync.
    #[test]
    fn a_transaction_that_gets_no_connection_is_refused_up_to_its_sync() {
        let mut d = Detached::refusing_next(
            Refusal::NoServerForTransaction("none".into()),
            TxStatus::Idle,
        );
        assert!(!d.client_idle());
        let mut out = BytesMut::new();
        let mut parse = BytesMut::new();
        frontend::write_parse(&mut parse, b"s1", b"SELECT 1");
        for (tag, body) in [(b'P', &parse[5..]), (b'D', &b"Ss1\0"[..]), (b'S', &b""[..])] {
            d.answer(tag, body, |_| None, &mut out);
        }
        assert_eq!(messages(&out), vec![m('E', "57P03"), m('Z', "I")]);
        assert!(d.client_idle());
    }

    #[test]
    fn an_extended_rollback_is_answered_message_by_message() {
        let mut d = Detached::new("frozen".into(), TxStatus::Failed, 0);
        let mut out = BytesMut::new();
        let mut parse = BytesMut::new();
        frontend::write_parse(&mut parse, b"", b"ROLLBACK");
        let mut bind = BytesMut::new();
        frontend::write_bind(&mut bind, b"", b"");
        for (tag, body) in [
            (b'P', &parse[5..]),
            (b'B', &bind[5..]),
            (b'D', &b"P\0"[..]),
            (b'E', &b"\0\0\0\0\0"[..]),
            (b'S', &b""[..]),
        ] {
            d.answer(tag, body, |_| None, &mut out);
        }
        assert_eq!(
            messages(&out),
            vec![
                m('1', ""),
                m('2', ""),
                m('n', ""),
                m('C', "ROLLBACK"),
                m('Z', "I")
            ]
        );
        assert!(d.client_idle());
    }

    #[test]
    fn an_extended_batch_gets_one_error_and_a_prepared_rollback_still_ends_the_block() {
        let mut d = Detached::new("frozen".into(), TxStatus::InBlock, 0);
        let mut out = BytesMut::new();
        let mut parse = BytesMut::new();
        frontend::write_parse(&mut parse, b"s1", b"SELECT 1");
        d.answer(b'P', &parse[5..], |_| None, &mut out);
        d.answer(b'E', b"\0\0\0\0\0", |_| None, &mut out);
        d.answer(b'S', b"", |_| None, &mut out);
        assert_eq!(messages(&out), vec![m('E', "57P03"), m('Z', "E")]);
        let mut out = BytesMut::new();
        let mut bind = BytesMut::new();
        frontend::write_bind(&mut bind, b"", b"rb");
        let control = |s: &[u8]| (s == b"rb").then_some(Control::Rollback);
        d.answer(b'B', &bind[5..], control, &mut out);
        d.answer(b'E', b"\0\0\0\0\0", control, &mut out);
        d.answer(b'S', b"", control, &mut out);
        assert_eq!(
            messages(&out),
            vec![m('2', ""), m('C', "ROLLBACK"), m('Z', "I")]
        );
    }

    #[test]
    fn a_named_rollback_parse_is_refused_since_the_server_would_not_have_it() {
        let mut d = Detached::new("frozen".into(), TxStatus::Failed, 0);
        let mut out = BytesMut::new();
        let mut parse = BytesMut::new();
        frontend::write_parse(&mut parse, b"rb", b"ROLLBACK");
        d.answer(b'P', &parse[5..], |_| None, &mut out);
        d.answer(b'S', b"", |_| None, &mut out);
        assert_eq!(messages(&out), vec![m('E', "57P03"), m('Z', "E")]);
    }

    #[test]
    fn a_batch_cut_off_mid_way_gets_its_error_at_once_and_ready_at_its_sync() {
        let mut d = Detached::new("frozen".into(), TxStatus::Idle, 1);
        let mut out = BytesMut::new();
        d.refuse_open_batch(&mut out);
        assert_eq!(messages(&out), vec![m('E', "57P03")], "at once");
        d.answer(b'E', b"\0\0\0\0\0", |_| None, &mut out);
        d.answer(b'S', b"", |_| None, &mut out);
        assert_eq!(messages(&out), vec![m('E', "57P03"), m('Z', "I")]);
        assert!(d.client_idle());
    }

    #[test]
    fn what_follows_a_rollback_in_its_batch_is_refused_not_answered_as_done() {
        let mut d = Detached::new("frozen".into(), TxStatus::Failed, 0);
        let mut out = BytesMut::new();
        let mut rollback = BytesMut::new();
        frontend::write_parse(&mut rollback, b"", b"ROLLBACK");
        let mut named = BytesMut::new();
        frontend::write_parse(&mut named, b"s9", b"SELECT 1");
        d.answer(b'P', &rollback[5..], |_| None, &mut out);
        d.answer(b'E', b"\0\0\0\0\0", |_| None, &mut out);
        d.answer(b'P', &named[5..], |_| None, &mut out);
        d.answer(b'E', b"\0\0\0\0\0", |_| None, &mut out);
        d.answer(b'S', b"", |_| None, &mut out);
        assert_eq!(
            messages(&out),
            vec![m('1', ""), m('C', "ROLLBACK"), m('E', "57P03"), m('Z', "I")]
        );
        // A prepared COMMIT outside a block commits nothing: COMMIT, not ROLLBACK.
        let mut d = Detached::new("frozen".into(), TxStatus::Idle, 0);
        let mut out = BytesMut::new();
        let mut bind = BytesMut::new();
        frontend::write_bind(&mut bind, b"", b"c1");
        let control = |s: &[u8]| (s == b"c1").then_some(Control::Commit);
        d.answer(b'B', &bind[5..], control, &mut out);
        d.answer(b'E', b"\0\0\0\0\0", control, &mut out);
        d.answer(b'S', b"", control, &mut out);
        assert_eq!(
            messages(&out),
            vec![m('2', ""), m('C', "COMMIT"), m('Z', "I")]
        );
    }

    #[test]
    fn terminate_ends_the_session() {
        let mut d = Detached::new("frozen".into(), TxStatus::Idle, 0);
        let mut out = BytesMut::new();
        assert_eq!(
            d.answer(frontend::TERMINATE_TAG, b"", |_| None, &mut out),
            Next::Terminate
        );
        assert!(out.is_empty());
    }
}
