//! The relay's pooled half: a session of the pooled modes starts logged in with a connection
//! lent by its pool; in transaction pooling the server side is attached when a transaction
//! begins and given back when the server says idle, and the client's named statements are
//! prepared on whichever connection it holds (see `crate::pool::lending`).

use tokio::time::Instant;

use super::{End, Relay};
use crate::classify::session_feature;
use crate::pool::{self, lending::Lending};
use crate::protocol::backend::TxStatus;
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
}
