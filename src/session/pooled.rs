//! The relay's pooled half: a session of the pooled modes starts logged in with a connection
//! lent by its pool; in transaction pooling the server side is attached when a transaction
//! begins and given back when the server says idle, and the client's named statements are
//! prepared on whichever connection it holds (see `crate::pool::lending`).

use std::task::{Context, Poll, ready};

use crate::clock::Instant;

use tracing::info;

use super::{End, Relay};
use crate::Shared;
use crate::classify::session_feature;
use crate::detach::Detached;
use crate::errors::Refusal;
use crate::metrics::{Class, Outcome};
use crate::pool::{self, lending::Lending};
use crate::protocol::backend::{self, TxStatus};
use crate::protocol::framing::Header;
use crate::protocol::frontend;
use crate::tls::Stream;

impl Relay {
    /// A pooled session starts logged in: bulkhead answered the client's startup itself.
    pub(super) fn logged_in(
        &mut self,
        server_key: (i32, bytes::Bytes),
        client_key: (i32, [u8; 4]),
        lending: Box<Lending>,
    ) {
        self.startup_deadline = None;
        self.hello_deadline = None;
        self.server_key = Some(server_key);
        self.client_key = Some(client_key);
        self.lending = Some(lending);
        self.idle_since = Some(Instant::now());
        self.timer_at = None;
    }

    /// Whether the server connection can go back to its pool after `end`: the client left with
    /// nothing in flight, no transaction open and the server's stream at a message boundary.
    pub(super) fn reusable(&self, end: &End) -> bool {
        matches!(end, End::ClientLeft)
            && self.is_quiet()
            && self.detached.is_none()
            && self.cancelling.is_none()
            && !self.server_said_fatal
            && !self.down.mid_message()
            && self.swallow_parse_complete == 0
            && self.swallow_close_complete == 0
            && self.stalled_since.is_none()
    }

    /// Transaction pooling: whether the server connection can go back between transactions
    /// now: the server said idle, nothing is in flight or on its way, and the client is not
    /// pinned to it.
    pub(super) fn releasable(&self) -> bool {
        self.server.is_some()
            && self
                .lending
                .as_ref()
                .is_some_and(|l| l.per_transaction && l.pinned.is_none() && !l.waiting())
            && self.tx == TxStatus::Idle
            && !self.client_tx_failed
            && self.tracker.in_flight() == 0
            && self.cancelling.is_none()
            && self.detached.is_none()
            && !self.up.has_output()
            && !self.up.mid_message()
            && !self.down.mid_message()
            && self.swallow_parse_complete == 0
            && self.swallow_close_complete == 0
            && self.stalled_since.is_none()
            && self.authenticated()
    }

    /// Gives the server connection back to the pool between transactions.
    pub(super) fn release_server(&mut self) {
        let (Some(stream), Some(lending)) = (self.server.take(), self.lending.as_deref_mut())
        else {
            return;
        };
        lending.release(stream);
        self.server_key = None;
        self.server_dry = false;
    }

    pub(super) fn per_transaction(&self) -> bool {
        self.lending.as_ref().is_some_and(|l| l.per_transaction)
    }

    /// Transaction pooling: a client's Parse. A named statement is remembered, to be prepared
    /// on other connections before its use; one that names a feature tied to the backend pins
    /// the client.
    pub(super) fn track_parse(&mut self, h: &Header) {
        let whole = self.up.is_whole(h);
        let Some(l) = self.lending.as_deref_mut() else {
            return;
        };
        let body = self.up.body(h);
        let Some((name, text)) = frontend::parse_message(body) else {
            return;
        };
        if l.pinned.is_none()
            && let Some(feature) = session_feature(text)
        {
            l.pin(feature);
        }
        if name.is_empty() {
            return;
        }
        if !whole {
            // Not held whole, so it cannot be prepared again elsewhere.
            l.pin("a prepared statement larger than 64 KiB");
            return;
        }
        let injected = l.parse(name, body);
        self.put_before(injected);
    }

    /// Transaction pooling: a Bind or Describe of a named statement the connection lacks gets
    /// it prepared there first; a Close of one is followed. False: wait for earlier requests
    /// to be answered first.
    pub(super) fn track_statement_use(&mut self, h: &Header) -> bool {
        let body = self.up.body(h);
        let statement = match h.tag {
            frontend::BIND_TAG => frontend::bind_names(body).map(|(_, s)| s),
            frontend::DESCRIBE_TAG | frontend::CLOSE_TAG => match frontend::close_target(body) {
                Some((b'S', name)) => Some(name),
                _ => None,
            },
            _ => None,
        };
        let (Some(name), Some(l)) = (statement, self.lending.as_deref_mut()) else {
            return true;
        };
        if name.is_empty() {
            return true;
        }
        if h.tag == frontend::CLOSE_TAG {
            l.close_statement(name);
            return true;
        }
        if !l.would_inject(name) {
            return true;
        }
        if self.tracker.before_open() > 0 {
            return false;
        }
        if let Some(injected) = l.use_statement(name) {
            self.put_before(injected);
        }
        true
    }

    /// Puts bulkhead's own messages in front of the client's current one, and notes the
    /// answers to drop.
    pub(super) fn put_before(&mut self, injected: pool::lending::Injected) {
        if injected.bytes.is_empty() {
            return;
        }
        self.up.put_before(&injected.bytes);
        self.swallow_parse_complete += injected.parses;
        self.swallow_close_complete += injected.closes;
    }

    /// Polls for the connection the client waits for. Ready(Ok): it came and framing went
    /// on, or it could not be had and the transaction was answered with an error; Ready(Err):
    /// the session ends. Out of line: passthrough never waits for a lent connection.
    #[inline(never)]
    pub(super) fn poll_lent(
        &mut self,
        cx: &mut Context<'_>,
        shared: &Shared,
    ) -> Poll<Result<(), End>> {
        let lent = self
            .lending
            .as_deref_mut()
            .map_or(Poll::Pending, |l| l.poll_wait(cx));
        match ready!(lent) {
            Ok(stream) => self.attach(stream),
            Err(e) => {
                let refusal = match e {
                    pool::LendError::Refused(refusal) => refusal,
                    pool::LendError::Server(error) => {
                        let code = backend::error_info(&error[5..]).code;
                        Refusal::NoServer(format!(
                            "the server refused a connection for this client ({})",
                            String::from_utf8_lossy(code)
                        ))
                    }
                };
                // Transaction pooling: that transaction fails, the client stays.
                if !self.refuse_transaction(&refusal) {
                    return Poll::Ready(Err(End::Refused(refusal)));
                }
            }
        }
        // Framing goes on here, out of line too (the relay's own call has it inlined).
        Poll::Ready(self.frame_client(shared).map(drop))
    }

    /// One pass of the relay while the client holds no server connection (transaction pooling
    /// between transactions): only answers bulkhead wrote itself go to the client. Ok: whether
    /// it wrote any; Err: the session ends.
    #[inline(never)]
    pub(super) fn serverless_pass(&mut self, client_cx: &mut Context<'_>) -> Result<bool, End> {
        let wrote = match self.down.poll_write_to(client_cx, &mut self.client) {
            Poll::Ready(Ok(wrote)) => wrote,
            Poll::Ready(Err(e)) => return Err(self.client_failed(&e)),
            Poll::Pending => false,
        };
        if self.up.is_eof() && !self.up.mid_message() {
            return Err(End::ClientLeft);
        }
        if let Some(leave) = self.leave_when_quiet
            && self.is_quiet()
        {
            return Err(leave());
        }
        Ok(wrote)
    }

    /// A connection was lent for the client's next transaction.
    pub(super) fn attach(&mut self, stream: Stream) {
        let Some(info) = self.lending.as_deref_mut().and_then(|l| l.info()) else {
            return;
        };
        self.server_key = Some((info.pid, info.secret.clone()));
        self.server_addr = info.addr;
        self.host = info.host;
        self.server = Some(stream);
        self.server_dry = false;
        self.stalled_since = None;
    }

    /// Transaction pooling, not pinned: whether the server connection can be lost without
    /// losing the client: nothing of a message is part-way to the client, no COPY, the client
    /// still there, and the server's own FATAL not passed on.
    pub(super) fn can_survive_loss(&self) -> bool {
        self.server.is_some()
            && self
                .lending
                .as_ref()
                .is_some_and(|l| l.per_transaction && l.pinned.is_none())
            && self.authenticated()
            && !self.down.is_streaming()
            && !self.tracker.in_copy()
            && self.client_eof_until.is_none()
            && !self.client_terminated
            && !self.server_said_fatal
    }

    /// Transaction pooling: the server connection was lost (`End::ServerLost`) or stopped
    /// answering (`End::Unresponsive`). The client keeps its connection: each request in
    /// flight is answered with an error (40003 for a commit whose fate is unknown, else
    /// 08006), a block it was in has failed (bulkhead answers it until the client's ROLLBACK),
    /// and its next transaction gets a connection to whichever host is primary then. Any
    /// other ending, or one that cannot be survived, comes back.
    pub(super) fn survive(&mut self, shared: &Shared, end: End) -> Result<(), End> {
        if !self.can_survive_loss() {
            return Err(end);
        }
        let why = match &end {
            End::ServerLost(why) => {
                // The probe looks now; a lost connection alone proves nothing about the host.
                shared.topology.connection_lost(self.host);
                why.clone()
            }
            End::Unresponsive => {
                let why = shared.topology.circuit(self.host).reason_unresponsive();
                if let Some(server) = &self.server {
                    // Nothing of the client's still in the kernel's queue may reach it later.
                    server.close_abortively();
                }
                if self.tracker.in_flight() > 0 {
                    self.cancel_on_server(shared);
                }
                format!("the server stopped answering: {why}")
            }
            _ => return Err(end),
        };
        let client_tx = self.client_tx();
        let in_block = client_tx != TxStatus::Idle;
        let open = self.tracker.is_open();
        let lost = self.drop_server(shared, in_block);
        if let Some(d) = &mut self.detached {
            // Its client was already answered for everything; nothing more is owed.
            d.owed = 0;
            d.frozen = false;
            info!(parent: &self.span, %why, "server connection lost while detached; the next transaction gets another");
            return Ok(());
        }
        let rest = if lost.is_empty() {
            Refusal::LostInTransaction(why.clone())
        } else {
            Refusal::AbortedByLoss
        };
        let mut detached = Detached::without_server(rest, client_tx, why.clone());
        let out = self.down.inject();
        let answered = lost.len() - usize::from(open);
        for &(class, in_doubt) in &lost[..answered] {
            let refusal = if in_doubt {
                Refusal::CommitInDoubt(why.clone())
            } else {
                Refusal::LostInTransaction(why.clone())
            };
            detached.lost(&refusal, in_doubt, out);
            shared
                .metrics
                .class(class)
                .statement(Outcome::Error)
                .increment(1);
        }
        if let Some(&(class, _)) = lost.get(answered) {
            detached.lost_open_batch(&Refusal::LostInTransaction(why.clone()), out);
            shared
                .metrics
                .class(class)
                .statement(Outcome::Error)
                .increment(1);
        }
        info!(parent: &self.span, %why, requests = lost.len(), in_block, "server connection lost; the client stays, its next transaction gets another connection");
        if !detached.client_idle() {
            self.detached = Some(Box::new(detached));
        }
        Ok(())
    }

    /// Transaction pooling: lets go of the server connection for good (it is closed, not
    /// returned): what was on its way to it or from it is dropped, and the requests in flight
    /// are forgotten. Returns them (class, whether it may have committed) for their answers.
    pub(super) fn drop_server(&mut self, shared: &Shared, in_block: bool) -> Vec<(Class, bool)> {
        let now = Instant::now();
        self.server = None;
        self.up.destination_lost();
        self.down.source_lost();
        let lost = self.tracker.abandon(in_block, now);
        if let Some(l) = self.lending.as_deref_mut() {
            l.drop_connection();
        }
        self.server_key = None;
        self.server_dry = false;
        self.server_said_fatal = false;
        self.stalled_since = None;
        self.hello_deadline = None;
        self.tx = TxStatus::Idle;
        self.client_tx_failed = false;
        self.skip_to_sync = false;
        self.swallow_parse_complete = 0;
        self.swallow_close_complete = 0;
        self.head_done();
        self.release_slots(shared);
        self.slot_wait = None;
        self.shed_next = None;
        self.idle_since = Some(now);
        lost
    }

    /// Transaction pooling: no connection could be had for the client's next transaction
    /// (no writable primary within hold_new_connections, or none accepted): that request is
    /// answered with an error and the client keeps its connection. False: the refusal ends
    /// the session (other modes, or a reason a retry will not cure soon).
    pub(super) fn refuse_transaction(&mut self, refusal: &Refusal) -> bool {
        let why = match refusal {
            Refusal::NoPrimary(why) | Refusal::NoServer(why) | Refusal::ServerLost(why, _) => why,
            _ => return false,
        };
        if !self.per_transaction() || self.server.is_some() {
            return false;
        }
        info!(parent: &self.span, %why, "no server connection for the next transaction; answering it with an error");
        self.detached = Some(Box::new(Detached::refusing_next(
            Refusal::NoServerForTransaction(why.clone()),
            self.client_tx(),
        )));
        true
    }
}
