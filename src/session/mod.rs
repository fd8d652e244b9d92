//! One client's life: the first packet, the server connection, the relay, and a clean end.
//!
//! The relay is one task that polls both directions itself, so neither can block the other:
//! a client busy sending COPY data while the server sends notices makes progress both ways.

use std::future::{Future, poll_fn};
use std::hint::cold_path;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio::time::{Sleep, timeout};

use crate::clock::Instant;
use tracing::{Instrument, Span, debug, info, warn};

use crate::Shared;
use crate::breaker::{ANSWER_NOTE_EVERY, Decision, Success};
use crate::cancel::Target;
use crate::classify::{Control, Kind, Memo, session_feature, transaction_control};
use crate::detach::{Detached, Next};
use crate::errors::{Cause, Deadline, Lost, Refusal};
use crate::live::Snapshot;
use crate::metrics::{Class, Outcome};
use crate::pipe::Pipe;
use crate::pool::lending::Lending;
use crate::probe::circuit_settings;
use crate::protocol::backend::{self, Severity, TxStatus};
use crate::protocol::framing::Header;
use crate::protocol::frontend;
use crate::tls::Stream;
use crate::tracker::{Effect, Refused, Tracker};
use crate::upstream;

mod client;
mod pooled;
mod server;
mod start;
mod task;

pub(crate) use start::{connect_primary, connect_reader, refuse_out_of_descriptors};
use start::{linger, start};
use task::{CLIENT, SERVER, Session, WATCHES, Wakers};

/// How long bulkhead's last words to a client may take to write before it gives up on them.
const FAREWELL_TIMEOUT: Duration = Duration::from_secs(1);

/// Serves one accepted client connection to its end. `_alive` is dropped when the session
/// ends, which is how the server knows it has drained.
///
/// Startup and the farewell run inside `span`. The relay in between does not enter it on every
/// wake-up (that was about 8% of the relay's user CPU); its few log lines name `span` as
/// their parent instead.
#[allow(clippy::too_many_arguments)] // each is one thing the accept loop knows
pub(crate) async fn serve(
    shared: Arc<Shared>,
    client: std::net::TcpStream,
    peer: std::net::SocketAddr,
    id: u64,
    admitted: bool,
    readonly: bool,
    alive: mpsc::Sender<()>,
    span: Span,
) {
    let client_gauge = GaugeGuard::new(&shared.metrics.client_connections);
    let client_count = ClientCount(shared.clone());
    let registered = shared.sessions.register(id, Some(peer), readonly);
    let view = registered.as_ref().map(|r| r.view.clone());
    // Startup and the farewell are boxed: the task of an idle session holds only the relay's
    // state, not room for theirs too (that was 2 KiB more per idle session).
    let Some((relay, server_gauge)) = Box::pin(
        start(&shared, client, admitted, readonly, view, span.clone()).instrument(span.clone()),
    )
    .await
    else {
        return;
    };
    let relayed = Box::new(Relayed {
        shared,
        relay,
        _guards: (client_gauge, client_count, registered, alive, server_gauge),
    });
    // A passthrough session with plain sockets on both sides goes on on its worker's relay
    // loop (`crate::evloop`); the rest stay on tokio.
    if relayed.relay.loopable()
        && let Some((relay_loop, sessions)) = crate::workers::relay_loop()
    {
        relay_loop.spawn(move || {
            let session = match relayed.onto_loop() {
                Ok(relayed) => Session::new(relayed),
                Err(e) => {
                    warn!(parent: &span, error = %e, "cannot move a session to its relay loop");
                    Session::done()
                }
            };
            crate::workers::counted(session, sessions)
        });
        return;
    }
    Session::new(relayed).await;
}

/// A session from its relay on: the relay and what must live as long as the session.
struct Relayed {
    shared: Arc<Shared>,
    relay: Relay,
    /// Counted while the session lives (gauges, max_clients, /sessions, the drain's count).
    _guards: (
        GaugeGuard,
        ClientCount,
        Option<crate::sessions::Registered>,
        mpsc::Sender<()>,
        Option<GaugeGuard>,
    ),
}

impl Relayed {
    /// Its sockets taken off tokio's reactor and registered with this thread's relay loop.
    /// Out of line, as `farewell`: its temporaries are no part of the session task's frame.
    #[inline(never)]
    fn onto_loop(mut self: Box<Self>) -> std::io::Result<Box<Self>> {
        self.relay.client = self.relay.client.into_looped()?;
        self.relay.server = self.relay.server.map(Stream::into_looped).transpose()?;
        self.relay.client.attach()?;
        self.relay.server.as_mut().map_or(Ok(()), Stream::attach)?;
        Ok(self)
    }

    /// What follows the relay, boxed and built out of line: neither its future nor the room
    /// to build it is part of the frame that every wake-up of the relay polls through (with
    /// them that frame was 5 KiB, probed a page at a time on each wake-up).
    #[inline(never)]
    fn farewell(mut self: Box<Self>, end: End) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let Relayed { shared, relay, .. } = &mut *self;
        if relay.readonly && relay.lending.is_none() {
            // Passthrough: the session was counted on its host (a pool counts its connections).
            shared.topology.count_reader(relay.host, false);
        }
        let span = relay.span.clone();
        Box::pin(
            async move {
                let Relayed { shared, relay, .. } = &mut *self;
                if let Some((pid, secret)) = relay.client_key {
                    shared.cancels.remove(pid, secret);
                }
                // The session takes no more statements: its slots go to others before the farewell.
                relay.release_slots(shared);
                let reuse =
                    relay.lending.is_some() && relay.server.is_some() && relay.reusable(&end);
                relay.finish(shared, end, reuse).await;
                if let Some(lending) = relay.lending.take()
                    && let Some(stream) = relay.server.take().filter(|_| reuse)
                {
                    let config = relay.config.config().clone();
                    lending.finish(stream, &config).await;
                }
                // The session's guards are dropped with it, after the farewell.
                drop(self);
            }
            .instrument(span),
        )
    }
}

/// Counts a client for max_clients while it is connected.
struct ClientCount(Arc<Shared>);

impl Drop for ClientCount {
    fn drop(&mut self) {
        self.0.admission.client_left();
    }
}

/// A wait for a concurrency slot: which one, and the wait itself.
struct SlotWait {
    write: bool,
    wait: Pin<Box<dyn Future<Output = bool> + Send>>,
}

/// Why the relay stopped.
#[derive(Debug)]
enum End {
    /// The client closed its connection (after Terminate or not).
    ClientLeft,
    /// The client broke the protocol.
    ClientBroke(String),
    /// The server closed or broke its connection.
    ServerLost(String),
    /// The server accepted the connection but did not answer the startup packet in time.
    ServerSilent(String),
    /// The session reached a point where it can close without losing anything, while draining.
    Drained,
    /// The session's primary was replaced, and the session reached a quiet point.
    Demoted,
    /// A read-only session's host no longer takes reads (behind, not answering, no longer a
    /// standby), and the session reached a quiet point.
    Unreadable,
    /// bulkhead is closing every session now.
    Closing,
    /// The client did not finish startup in time.
    StartupTimeout,
    /// A deadline passed and the server did not answer bulkhead's cancel in time.
    Unanswered(Deadline),
    /// bulkhead refused to go on, for the reason given.
    Refused(Refusal),
    /// bulkhead's cancel released a commit that was waiting for synchronous replication.
    CommitUnconfirmed(Deadline),
    /// The probe found the server not answering while this session had a statement there, or
    /// was about to send one.
    Unresponsive,
}

/// bulkhead has sent a CancelRequest because a deadline passed, and waits for the answer.
#[derive(Debug, Clone, Copy)]
struct Cancelling {
    deadline: Deadline,
    /// If the request is not answered by then, the session is closed.
    give_up_at: Instant,
}

/// The Sync that stands in for a refused Query: the server answers it with ReadyForQuery and
/// does nothing else.
const SYNC: &[u8] = b"S\0\0\0\x04";

/// A session quiet at least this long gives its buffers back when its timer next fires (within
/// a deadline period); they are allocated again on demand. A connection in steady use never
/// pays for it.
const IDLE_RELEASE: Duration = Duration::from_secs(1);

/// What a COMMIT in a failed block becomes, as PostgreSQL itself does.
const ROLLBACK_QUERY: &[u8] = b"Q\0\0\0\x0dROLLBACK\0";

/// Why `frame_client` stopped.
enum Hold {
    /// Everything buffered has been framed.
    Done,
    /// The next message must wait until earlier requests are answered.
    Wait,
}

struct Relay {
    client: Stream,
    /// `None` between transactions in transaction pooling.
    server: Option<Stream>,
    /// Client to server.
    up: Pipe,
    /// Server to client.
    down: Pipe,
    /// The last Parse text classified: drivers parse the same unnamed statement again and
    /// again.
    memo: Memo,
    /// The server address this session is connected to; cancels go there.
    server_addr: SocketAddr,
    /// Which of [database] hosts that is: its write circuit, and whether it is still primary.
    host: usize,
    /// The server's own cancel key, once it has sent BackendKeyData.
    server_key: Option<(i32, bytes::Bytes)>,
    /// The key bulkhead gave the client (its backend's pid, bulkhead's secret), to unregister at the end.
    client_key: Option<(i32, [u8; 4])>,
    /// Until the first ReadyForQuery, authentication is in progress and this is its deadline.
    startup_deadline: Option<Instant>,
    /// Until the server's first byte, how long it may stay silent after the startup packet.
    hello_deadline: Option<Instant>,
    /// Transaction status from the last ReadyForQuery.
    tx: TxStatus,
    /// The client believes its transaction block failed (bulkhead refused a write in it) while
    /// the server's block is still open: only ROLLBACK, ROLLBACK TO or COMMIT get through.
    client_tx_failed: bool,
    /// The rest of a refused extended-protocol batch is dropped up to its Sync.
    skip_to_sync: bool,
    /// Requests in flight, their classes and the head's clock.
    tracker: Tracker,
    /// The head request got an ErrorResponse (for the outcome metric).
    head_failed: bool,
    /// The head request got 25006 (read-only transaction): the host is no longer a primary.
    head_read_only: bool,
    /// bulkhead cancelled the head request because a deadline passed.
    head_timed_out: bool,
    /// Set while bulkhead waits for the server to answer its cancel.
    cancelling: Option<Cancelling>,
    /// Since when bytes for the server have been waiting because it does not read them.
    stalled_since: Option<Instant>,
    /// The server's last ErrorResponse was FATAL: it has told the client why it is leaving.
    server_said_fatal: bool,
    /// The client sent Terminate.
    client_terminated: bool,
    /// The client closed its side (EOF) with requests still in flight: until then their
    /// answers are still relayed, as PostgreSQL answers a client that half-closed after its
    /// Query; after it the client is taken to have vanished and its statement is cancelled.
    client_eof_until: Option<Instant>,
    /// End the session at its next quiet point, with this ending.
    leave_when_quiet: Option<fn() -> End>,
    /// One timer for the session, set to the earliest thing that can expire. It is moved
    /// earlier at once but later only lazily (when it fires early), so most requests cost no
    /// timer update.
    timer: Pin<Box<Sleep>>,
    /// What `timer` is set to, if it is armed.
    timer_at: Option<Instant>,
    /// `timer` has been polled since it was last set, so it holds the watches' waker and will
    /// raise the WATCHES bit when it fires; until then the relay need not poll it again.
    timer_polled: bool,
    /// A read from the client (the server) found nothing, and the socket has not woken the
    /// task since: it holds the client's (server's) waker and will, once there is more. Until
    /// then reading it again would only find nothing again.
    client_dry: bool,
    server_dry: bool,
    /// This session's copy of the settings, refreshed after a reload.
    config: Snapshot,
    /// The session holds an "all" slot, and a write slot, until its transaction ends.
    holds_all: bool,
    holds_write: bool,
    /// Waiting for a slot, at most queue_timeout.
    slot_wait: Option<SlotWait>,
    /// The wait ran out: the statement waiting for it is shed (true: for a write slot).
    shed_next: Option<bool>,
    /// Since when nothing has been in flight, while buffers are still held.
    idle_since: Option<Instant>,
    /// ParseCompletes the server owes for Parses bulkhead added itself; the client never
    /// asked for them, so they are dropped.
    swallow_parse_complete: u32,
    /// The server connection is TLS: the server may offer SCRAM channel binding, which cannot
    /// reach through bulkhead.
    server_tls: bool,
    /// The server offered SASL over TLS; the client's next password message picks the
    /// mechanism.
    sasl_offered: bool,
    /// The server stopped answering and bulkhead answers the client itself (see
    /// `crate::detach`).
    detached: Option<Box<Detached>>,
    /// The pooled modes: the client's hold on its pool's connections. The client's Terminate
    /// is not passed on to a pooled connection.
    lending: Option<Box<Lending>>,
    /// CloseCompletes the server owes for Closes bulkhead added itself (transaction pooling).
    swallow_close_complete: u32,
    /// When this session may next tell its host's circuit that the host answered (it does at
    /// most every `breaker::ANSWER_NOTE_EVERY`).
    answer_note_due: Option<Instant>,
    /// A session of the read-only listener: on a standby (or the primary, read-only); writes
    /// get the server's 25006 and are no evidence for any write circuit.
    readonly: bool,
    /// The session's span: the relay's log lines name it as their parent.
    span: Span,
    /// What /sessions shows of this session, published once per wake-up (`None` with
    /// [health] sessions off).
    view: Option<Arc<crate::sessions::View>>,
}

/// What admission says about the statement at hand.
enum Admit {
    Go,
    Wait,
    Shed { write_slot: bool },
}

impl Relay {
    #[allow(clippy::too_many_arguments)] // each is one thing startup learned
    fn new(
        client: Stream,
        server: Option<Stream>,
        server_addr: SocketAddr,
        host: usize,
        leftover: BytesMut,
        startup_deadline: Instant,
        config: Snapshot,
        span: Span,
    ) -> Self {
        let mut up = Pipe::default();
        up.preload(&leftover);
        let now = Instant::now();
        let hello_deadline = now + config.config().database.connect_timeout;
        Relay {
            server_tls: server.as_ref().is_some_and(Stream::is_tls),
            client,
            server,
            up,
            down: Pipe::default(),
            memo: Memo::default(),
            server_addr,
            host,
            server_key: None,
            client_key: None,
            startup_deadline: Some(startup_deadline),
            hello_deadline: Some(hello_deadline),
            tx: TxStatus::Idle,
            client_tx_failed: false,
            skip_to_sync: false,
            tracker: Tracker::new(now),
            head_failed: false,
            head_read_only: false,
            head_timed_out: false,
            cancelling: None,
            stalled_since: None,
            server_said_fatal: false,
            client_terminated: false,
            client_eof_until: None,
            leave_when_quiet: None,
            timer: Box::pin(tokio::time::sleep_until(
                hello_deadline.min(startup_deadline).into_tokio(),
            )),
            timer_at: Some(hello_deadline.min(startup_deadline)),
            timer_polled: false,
            client_dry: false,
            server_dry: false,
            config,
            holds_all: false,
            holds_write: false,
            slot_wait: None,
            shed_next: None,
            idle_since: None,
            swallow_parse_complete: 0,
            sasl_offered: false,
            detached: None,
            lending: None,
            swallow_close_complete: 0,
            readonly: false,
            answer_note_due: None,
            span,
            view: None,
        }
    }

    /// A passthrough session whose sockets are both plain: one the relay loop can drive.
    fn loopable(&self) -> bool {
        self.lending.is_none()
            && matches!(self.client, Stream::Plain(_))
            && matches!(self.server, Some(Stream::Plain(_)))
    }

    fn authenticated(&self) -> bool {
        self.startup_deadline.is_none()
    }

    /// Tells /sessions what the session is doing: a few relaxed stores into its own view.
    fn publish(&mut self) {
        if let Some(view) = &self.view {
            let head = self.tracker.head();
            // Kept until there is a head to show it for.
            let moved = head.is_some() && self.tracker.take_head_moved();
            view.publish(
                self.server.as_ref().map(|_| self.host),
                self.authenticated().then(|| self.client_tx()),
                head,
                moved.then(|| self.tracker.head_started()),
            );
            if self.slot_wait.is_none() {
                view.not_waiting();
            }
        }
    }

    /// Moves bytes both ways and keeps the deadlines until something ends the session.
    /// Returns `Pending` when neither side can make progress and no deadline has passed.
    /// Each socket is polled with its own waker from `wakers`, the timer with the watches'
    /// one; `bits` says which of them woke the task since the last poll.
    #[inline(always)]
    fn poll_relay(
        &mut self,
        cx: &mut Context<'_>,
        wakers: &Wakers,
        bits: u8,
        shared: &Shared,
    ) -> Poll<End> {
        self.config.current(&shared.live);
        let client_cx = &mut Context::from_waker(&wakers.client);
        let server_cx = &mut Context::from_waker(&wakers.server);
        self.client_dry &= bits & CLIENT == 0;
        self.server_dry &= bits & SERVER == 0;
        loop {
            let mut progress = false;

            // Without a buffer (a new or idle session), none is taken until there is
            // something to read.
            if !self.client_dry
                && self.up.wants_read()
                && self.up.unallocated()
                && self.client.poll_readable(client_cx).is_pending()
            {
                self.client_dry = true;
            }
            if !self.client_dry && self.up.wants_read() {
                match self.up.poll_read_from_stream(client_cx, &mut self.client) {
                    Poll::Ready(Ok(_)) => {
                        progress = true;
                        // Read to the bottom, and waiting for more: no need to look again.
                        self.client_dry = self.client.read_dry();
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(self.client_failed(&e)),
                    Poll::Pending => self.client_dry = true,
                }
            }
            if let Some(w) = &mut self.slot_wait
                && let Poll::Ready(got) = w.wait.as_mut().poll(cx)
            {
                cold_path();
                let write = w.write;
                self.slot_wait = None;
                progress = true;
                if got {
                    if write {
                        self.holds_write = true;
                    } else {
                        self.holds_all = true;
                    }
                } else {
                    self.shed_next = Some(write);
                }
            }
            // With every byte framed and neither a detach nor a pool to look after, framing
            // has nothing to do (at most it would hold back nothing): not called.
            let framed =
                if self.up.all_framed() && self.detached.is_none() && self.lending.is_none() {
                    Hold::Done
                } else {
                    match self.frame_client(shared) {
                        Ok(hold) => hold,
                        Err(end) => {
                            cold_path();
                            return Poll::Ready(end);
                        }
                    }
                };
            if self.lending.as_ref().is_some_and(|l| l.waiting()) {
                match self.poll_lent(cx, shared) {
                    Poll::Ready(Ok(())) => progress = true,
                    Poll::Ready(Err(end)) => return Poll::Ready(end),
                    Poll::Pending => {}
                }
            }
            let Some(server) = self.server.as_mut() else {
                // Transaction pooling between transactions: only the client side moves.
                match self.serverless_pass(client_cx) {
                    Err(end) => return Poll::Ready(end),
                    Ok(wrote) if progress || wrote => continue,
                    Ok(_) => {}
                }
                if let Some(end) = self.poll_deadlines(&wakers.watches, bits & WATCHES != 0, shared)
                {
                    return Poll::Ready(end);
                }
                return Poll::Pending;
            };
            let before = self.up.written();
            match self.up.poll_write_to(server_cx, server) {
                Poll::Ready(Ok(wrote)) => {
                    progress |= wrote;
                    self.stalled_since = None;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(self.server_failed(&e)),
                // The server accepts nothing more for now: its stall clock runs from the last
                // byte it did accept.
                Poll::Pending if self.up.written() != before => {
                    cold_path();
                    progress = true;
                    self.stalled_since = Some(Instant::now());
                }
                Poll::Pending => {
                    cold_path();
                    self.stalled_since.get_or_insert_with(Instant::now);
                }
            }

            if !self.server_dry
                && self.down.wants_read()
                && self.down.unallocated()
                && server.poll_readable(server_cx).is_pending()
            {
                self.server_dry = true;
            }
            if !self.server_dry && self.down.wants_read() {
                match self.down.poll_read_from_stream(server_cx, server) {
                    Poll::Ready(Ok(n)) => {
                        progress = true;
                        if n > 0 {
                            self.hello_deadline = None;
                        }
                        self.server_dry = server.read_dry();
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(self.server_failed(&e)),
                    Poll::Pending => self.server_dry = true,
                }
            }
            // Nothing new from the server: nothing to frame.
            match if self.down.all_framed() {
                Ok(None)
            } else {
                self.frame_server(shared)
            } {
                Ok(None) => {}
                Ok(Some(end)) => {
                    cold_path();
                    return Poll::Ready(end);
                }
                Err(why) => {
                    cold_path();
                    return Poll::Ready(self.server_gone(why));
                }
            }
            if self.lending.is_some() && self.releasable() {
                self.release_server();
            }
            match self.down.poll_write_to(client_cx, &mut self.client) {
                Poll::Ready(Ok(wrote)) => progress |= wrote,
                Poll::Ready(Err(e)) => return Poll::Ready(self.client_failed(&e)),
                Poll::Pending => {}
            }

            if self.down.is_eof() && !self.down.has_output() {
                cold_path();
                return Poll::Ready(self.server_gone("the server closed the connection".into()));
            }
            if self.up.is_eof() && !self.up.has_output() {
                cold_path();
                // Half-closed after its last request, or gone: answer what is in flight for a
                // moment (a half-closed client reads it), then treat it as gone.
                if self.tracker.in_flight() == 0 || !self.authenticated() {
                    return Poll::Ready(End::ClientLeft);
                }
                if self.client_eof_until.is_none() {
                    self.client_eof_until =
                        Some(Instant::now() + self.config.config().timeouts.cancel_grace);
                    // Nothing more can come from this client: its slots go to others now.
                    self.release_slots(shared);
                }
            }
            if let Some(leave) = self.leave_when_quiet
                && self.is_quiet()
            {
                cold_path();
                return Poll::Ready(leave());
            }
            // Another pass can move something only if a side may have more to read, bytes read
            // are not yet framed (framing stops at some messages, e.g. during the login), the
            // client's framing was held back, or a write is unfinished. A pass that found both
            // sockets read to the bottom (with their wakers kept), everything framed and
            // written needs no second pass to prove that nothing moves.
            let settled = self.client_dry
                && self.server_dry
                && matches!(framed, Hold::Done)
                && self.lending.is_none()
                && self.slot_wait.is_none()
                && self.up.all_framed()
                && self.down.all_framed()
                && !self.up.has_output()
                && !self.down.has_output();
            if progress && !settled {
                continue;
            }
            // Checked once nothing moves, which a flow of bytes always comes to: the socket
            // runs dry or the task's cooperative budget runs out and reads return Pending.
            if let Some(end) = self.poll_deadlines(&wakers.watches, bits & WATCHES != 0, shared) {
                return Poll::Ready(end);
            }
            return Poll::Pending;
        }
    }

    /// The earliest moment something can expire: startup, the server's first answer, the head
    /// request's deadline, a stalled write, or the grace period of a cancel in progress.
    #[inline]
    fn next_deadline(&self) -> Option<Instant> {
        if let Some(at) = self.startup_deadline {
            return Some(self.hello_deadline.map_or(at, |hello| hello.min(at)));
        }
        if let Some(c) = self.cancelling {
            return Some(c.give_up_at);
        }
        if let Some(at) = self.client_eof_until {
            return Some(at);
        }
        if self.detached.as_ref().is_some_and(|d| d.frozen) {
            // The abandoned request's clock starts again when the host answers.
            return None;
        }
        let t = &self.config.config().timeouts;
        let head = self.tracker.deadline(t.read, t.write);
        let stall = self.stalled_since.map(|since| since + t.write);
        match (head, stall) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (None, None) => self.idle_since.map(|since| since + IDLE_RELEASE),
            (a, b) => a.or(b),
        }
    }

    /// Keeps the timer on the earliest deadline and acts on any that has passed.
    ///
    /// The timer is polled with the watches' waker, so that a firing timer raises the WATCHES
    /// bit: it is polled again only when that bit was up (`flagged`) or it was just set.
    /// Polling it on every wake-up cost about 2.5% of the worker's instructions.
    #[inline]
    fn poll_deadlines(&mut self, waker: &Waker, flagged: bool, shared: &Shared) -> Option<End> {
        // Most passes: the timer is armed no later than the earliest deadline, was polled
        // since, and did not fire. Inlined; the rest is out of line.
        let want = self.next_deadline()?;
        if self.timer_polled
            && !flagged
            && self
                .timer_at
                .is_some_and(|at| want >= at || self.only_idle_release())
        {
            return None;
        }
        self.poll_timer(waker, flagged, shared)
    }

    /// Whether the only deadline is the idle release, which never pulls an armed timer
    /// earlier (sessions go idle between every two transactions); it happens when the armed
    /// timer next fires.
    fn only_idle_release(&self) -> bool {
        self.tracker.in_flight() == 0
            && self.stalled_since.is_none()
            && self.startup_deadline.is_none()
            && self.cancelling.is_none()
    }

    /// [`Relay::poll_deadlines`] beyond its common case: (re-)arms the timer, polls it, and
    /// acts on what has passed.
    #[inline(never)]
    fn poll_timer(&mut self, waker: &Waker, mut flagged: bool, shared: &Shared) -> Option<End> {
        loop {
            // With nothing to time, the timer stays armed where it is: re-arming it for the next
            // request would take the runtime's timer lock once per request. When it fires with
            // nothing due, that is one spurious wake-up.
            let want = self.next_deadline()?;
            if self
                .timer_at
                .is_none_or(|at| want < at && !self.only_idle_release())
            {
                self.timer.as_mut().reset(want.into_tokio());
                self.timer_at = Some(want);
                self.timer_polled = false;
            }
            if self.timer_polled && !flagged {
                return None;
            }
            self.timer_polled = true;
            if self
                .timer
                .as_mut()
                .poll(&mut Context::from_waker(waker))
                .is_pending()
            {
                return None;
            }
            flagged = false;
            self.timer_at = None;
            let now = Instant::now();
            if now < want {
                continue; // The timer was set for a deadline that has since moved later.
            }
            if self.hello_deadline.is_some_and(|at| at <= now) {
                let within =
                    humantime::format_duration(self.config.config().database.connect_timeout);
                return Some(End::ServerSilent(format!(
                    "{} accepted the connection but did not answer within {within}",
                    self.server_addr
                )));
            }
            if self.startup_deadline.is_some() {
                return Some(End::StartupTimeout);
            }
            if let Some(c) = self.cancelling {
                // A detached session's client has had its answer: the server is just gone.
                return Some(if self.detached.is_some() {
                    End::Unresponsive
                } else {
                    End::Unanswered(c.deadline)
                });
            }
            if self.client_eof_until.is_some_and(|at| at <= now) {
                return Some(End::ClientLeft);
            }
            if self.tracker.in_flight() == 0 && self.stalled_since.is_none() {
                // Quiet for IDLE_RELEASE: give the buffers back.
                if self.idle_since.take().is_some() {
                    self.up.release_if_empty();
                    self.down.release_if_empty();
                    self.memo.release();
                    self.tracker.release();
                }
                continue;
            }
            self.start_cancel(shared, now, false);
        }
    }

    /// The host's alarm was raised. If the host no longer answers, a statement waiting there
    /// will not be answered either: end the session now. If the write circuit opened, a commit
    /// waiting there is cancelled and answered now rather than at its deadline, so the
    /// connection it holds goes back to the application.
    fn on_alarm(&mut self, shared: &Shared) -> Option<End> {
        if !self.authenticated() {
            return None;
        }
        let circuit = shared.topology.circuit(self.host);
        if self.detached.is_some() {
            self.follow_host(shared);
            return None;
        }
        if circuit.is_unresponsive() {
            return if self.tracker.in_flight() > 0 {
                self.detach(shared)
            } else {
                None
            };
        }
        if circuit.published() == crate::breaker::State::Open
            && !self.readonly
            && self.cancelling.is_none()
            && self.head_commits()
        {
            self.start_cancel(shared, Instant::now(), true);
        }
        None
    }

    /// The host stopped answering with requests in flight: answer each of them now with an
    /// error and keep the session, dropping the server's late answers (see `crate::detach`).
    /// Returns the ending instead when answers cannot be cut in cleanly (part of a message is
    /// already out either way, or the session is in COPY, or its client has gone), or when a
    /// statement in flight may change the server for good and the status checks confirm the
    /// host silent; with such a statement and only the heartbeat's word, nothing changes.
    fn detach(&mut self, shared: &Shared) -> Option<End> {
        if self.down.is_streaming()
            || self.up.is_streaming()
            || self.tracker.in_copy()
            || self.client_eof_until.is_some()
        {
            return Some(End::Unresponsive);
        }
        // Only reads are cut loose. A write in flight may commit when the server wakes (an
        // autocommit write; a COMMIT, also inside a multi-statement Query; a write in a batch
        // the Sync that closes it would commit), and one that creates or closes a named
        // prepared statement would leave the server's statements other than the client
        // believes. Such a session is not detached: on the heartbeat's word alone it waits (for
        // its deadline, or the status checks: a server that is only slow may still answer);
        // once the status checks confirm the host silent it ends as before, FATAL 40003 for a
        // write, and its connection is reset so that nothing of it still in the kernel's send
        // queue (a blackhole) is delivered later.
        let keeps = self.tracker.requests().any(|(_, lasting)| lasting);
        if keeps {
            let confirmed = shared
                .topology
                .circuit(self.host)
                .is_confirmed_unresponsive();
            return confirmed.then_some(End::Unresponsive);
        }
        let now = Instant::now();
        let why = shared.topology.circuit(self.host).reason_unresponsive();
        let mut detached = Box::new(Detached::new(why, self.client_tx(), 0));
        // A batch the client has not finished: the server gets a Sync to close what it has of
        // it (that answer is dropped too), and the client its error now, as PostgreSQL sends
        // an error at once, then ReadyForQuery at the client's Sync.
        let open = self.tracker.is_open();
        if open {
            self.up.inject().extend_from_slice(SYNC);
            self.tracker.sync(now);
        }
        let answered = self.tracker.in_flight() - usize::from(open);
        let out = self.down.inject();
        for (class, _) in self.tracker.requests().take(answered) {
            detached.abandon(out);
            shared
                .metrics
                .class(class)
                .statement(Outcome::Error)
                .increment(1);
        }
        if open {
            detached.refuse_open_batch(out);
        }
        detached.owed = self.tracker.in_flight();
        warn!(parent: &self.span, requests = detached.owed, "server not answering: the statements waiting there are answered now; the session stays open");
        self.detached = Some(detached);
        self.release_slots(shared);
        self.slot_wait = None;
        self.shed_next = None;
        self.head_done();
        self.client_tx_failed = false;
        self.skip_to_sync = false;
        self.stalled_since = None;
        self.swallow_parse_complete = 0;
        None
    }

    /// A detached session looks at its host again: once it answers, the abandoned head
    /// request's clock starts over (its deadline did not run while the host was frozen).
    fn follow_host(&mut self, shared: &Shared) {
        let frozen = shared.topology.circuit(self.host).is_unresponsive();
        let Some(d) = &mut self.detached else {
            return;
        };
        if d.frozen != frozen {
            d.frozen = frozen;
            if !frozen {
                let owed = d.owed;
                self.tracker.restart_clock(Instant::now());
                info!(parent: &self.span, owed, "server answers again; catching up");
            }
        }
    }

    /// For a detached session about to frame a client message: whether the message must wait
    /// (true) because the server, answering again, still owes answers to drop or a ROLLBACK of
    /// bulkhead's own. Once the server has caught up and the client is outside a transaction,
    /// rolls back a block the server still has open, then follows the server again.
    fn reattach(&mut self, shared: &Shared) -> bool {
        self.follow_host(shared);
        let Some(client_idle) = self.detached.as_deref().map(Detached::client_idle) else {
            return false;
        };
        if self.lending.as_ref().is_some_and(|l| l.per_transaction) {
            let moved = self.lending.as_ref().is_some_and(|l| !l.host_ok(self.host));
            if self.server.is_none() || (moved && client_idle && self.can_survive_loss()) {
                // Transaction pooling: once the client is idle it needs no server connection
                // of its own; one whose host is no longer primary is given up on, not waited
                // for, and the next transaction goes to the primary.
                if client_idle {
                    if let Some(server) = &self.server {
                        server.close_abortively();
                        self.drop_server(shared, false);
                    }
                    info!(parent: &self.span, "the client is idle and its server connection gone; its next transaction gets another");
                    self.detached = None;
                    self.idle_since = Some(Instant::now());
                }
                return false;
            }
        }
        let Some(d) = &mut self.detached else {
            return false;
        };
        if d.frozen {
            return false; // Answered here.
        }
        if d.owed > 0 {
            return true;
        }
        if !d.client_idle() {
            return false; // The client ends its block first, answered here.
        }
        if self.tx != TxStatus::Idle {
            // The client was told its transaction ended; the server's is still open.
            self.up.inject().extend_from_slice(ROLLBACK_QUERY);
            self.tracker.query(Kind::Read, Instant::now());
            d.owed = 1;
            return true;
        }
        info!(parent: &self.span, "caught up with the server; relaying again");
        self.detached = None;
        self.idle_since = Some(Instant::now());
        false
    }

    /// Whether the request the server is working on would commit writes: an autocommit write,
    /// or the COMMIT of a transaction that wrote.
    fn head_commits(&self) -> bool {
        self.tracker.head() == Some(Class::Write)
            && !self.tracker.head_refused()
            && (self.tx == TxStatus::Idle || self.tracker.head_is_commit())
    }

    /// The client's connection failed: the session ends.
    #[cold]
    #[inline(never)]
    fn client_failed(&self, e: &std::io::Error) -> End {
        debug!(parent: &self.span, error = %e, "client connection failed");
        End::ClientLeft
    }

    /// The server's connection failed: [`Relay::server_gone`].
    #[cold]
    #[inline(never)]
    fn server_failed(&self, e: &std::io::Error) -> End {
        self.server_gone(e.to_string())
    }

    /// How the relay ends when the server side closes or fails: after the client's Terminate
    /// that is the normal end of a session (the server closes its side as it should, and
    /// whichever close bulkhead sees first), not a lost server.
    fn server_gone(&self, why: String) -> End {
        if self.client_terminated {
            End::ClientLeft
        } else {
            End::ServerLost(why)
        }
    }

    /// A deadline has passed (or, with `circuit_opened`, the write circuit opened while a
    /// commit waited): ask the server to cancel, and give it `cancel_grace` to answer.
    fn start_cancel(&mut self, shared: &Shared, now: Instant, circuit_opened: bool) {
        let t = &self.config.config().timeouts;
        let stalled = !circuit_opened
            && self
                .stalled_since
                .is_some_and(|since| since + t.write <= now);
        let class = if stalled {
            Class::Write
        } else {
            self.tracker.head().unwrap_or(Class::Write)
        };
        let limit = if class == Class::Write {
            t.write
        } else {
            t.read
        };
        let cause = if circuit_opened {
            Cause::CircuitOpened
        } else if stalled {
            Cause::Stalled
        } else {
            Cause::Elapsed
        };
        let deadline = Deadline {
            class,
            limit,
            cause,
        };
        info!(parent: &self.span, %deadline, "deadline passed; cancelling the statement on the server");
        self.cancelling = Some(Cancelling {
            deadline,
            give_up_at: now + t.cancel_grace,
        });
        self.head_timed_out = true;
        self.cancel_on_server(shared);
    }

    /// Nothing in flight and no transaction open: closing now loses nothing.
    fn is_quiet(&self) -> bool {
        let settled = match &self.detached {
            // What the abandoned server still does is lost anyway.
            Some(d) => d.client_idle(),
            None => self.tracker.in_flight() == 0 && self.tx == TxStatus::Idle,
        };
        self.authenticated() && settled && !self.up.mid_message() && !self.up.has_output()
    }

    /// The transaction status the client was last given.
    fn client_tx(&self) -> TxStatus {
        if self.client_tx_failed {
            TxStatus::Failed
        } else {
            self.tx
        }
    }

    /// What losing the server now means for the client's work. Inside a transaction any
    /// statement in flight may be a COMMIT of writes the classifier cannot see (a function
    /// called from a SELECT), so only a transaction with nothing in flight is sure not to
    /// have committed.
    fn lost(&self) -> Lost {
        if let Some(d) = &self.detached {
            // The client has been answered for everything it sent; only its block is lost.
            return if d.client_tx == TxStatus::Idle {
                Lost::Nothing
            } else {
                Lost::OpenTransaction
            };
        }
        let in_transaction = self.authenticated() && self.tx != TxStatus::Idle;
        let in_flight = self.tracker.in_flight() > 0;
        if self.tracker.write_in_flight() || (in_transaction && in_flight) {
            Lost::WriteInDoubt
        } else if in_transaction {
            Lost::OpenTransaction
        } else {
            Lost::Nothing
        }
    }

    /// Ends the session: tells the client why when it should hear it, cancels a statement the
    /// server may still be running, and closes both connections.
    /// `keep_server`: the server connection goes back to its pool, so it is not closed.
    async fn finish(&mut self, shared: &Shared, end: End, keep_server: bool) {
        let refusal = match &end {
            End::ClientLeft => None,
            End::ClientBroke(why) => Some(Refusal::ClientProtocol(why.clone())),
            End::ServerLost(_) if self.server_said_fatal => None,
            End::ServerLost(why) => Some(Refusal::ServerLost(why.clone(), self.lost())),
            End::ServerSilent(why) => Some(Refusal::NoServer(why.clone())),
            End::Drained | End::Closing => Some(Refusal::ShuttingDown),
            End::Demoted => Some(Refusal::Demoted),
            End::Unreadable => Some(Refusal::Unreadable),
            End::StartupTimeout => Some(Refusal::StartupTimeout),
            End::Unanswered(deadline) => Some(Refusal::Unanswered {
                deadline: *deadline,
                grace: self.config.config().timeouts.cancel_grace,
            }),
            End::CommitUnconfirmed(deadline) => Some(Refusal::CommitUnconfirmed(*deadline)),
            End::Unresponsive => Some(Refusal::Unresponsive(
                shared.topology.circuit(self.host).reason_unresponsive(),
                self.lost(),
            )),
            End::Refused(refusal) => Some(refusal.clone()),
        };
        match &end {
            End::ClientLeft | End::Drained => debug!(?end, "session ended"),
            _ => info!(?end, "session ended"),
        }
        let settings = circuit_settings(self.config.config());
        let circuit = shared.topology.circuit(self.host);
        match &end {
            End::Unanswered(d) | End::CommitUnconfirmed(d) => {
                shared
                    .metrics
                    .class(d.class)
                    .statement(Outcome::Timeout)
                    .increment(1);
                if d.class == Class::Write && (d.cause == Cause::Stalled || self.head_commits()) {
                    let why = match end {
                        End::CommitUnconfirmed(_) => {
                            "a commit missed the write deadline waiting for synchronous replication"
                        }
                        _ if d.cause == Cause::Stalled => {
                            "the server accepted no data for the write deadline"
                        }
                        _ => "a commit missed the write deadline and the cancel went unanswered",
                    };
                    circuit.failure(&settings, why);
                }
            }
            // A lost connection alone proves nothing about the host (one backend may have been
            // terminated on a healthy server): the probe looks now, and counts a failure if
            // the host is down.
            End::ServerLost(_) => shared.topology.connection_lost(self.host),
            // A server that accepts connections but starts no session: the probe, which
            // opens new connections only now and then, looks through one now.
            End::ServerSilent(_) => shared.topology.look_now(self.host),
            _ => {}
        }
        if matches!(
            end,
            End::Unanswered(_) | End::Unresponsive | End::ServerSilent(_)
        ) {
            // Giving up on a server that does not answer: whatever of the client's work is
            // still in the kernel's send queue (a COMMIT, in a network blackhole) must not be
            // delivered when the network heals.
            if let Some(server) = &self.server {
                server.close_abortively();
            }
        }
        let server_running = self.tracker.in_flight() > 0 || self.up.mid_message();
        let cancelled_already = matches!(end, End::Unanswered(_) | End::CommitUnconfirmed(_));
        if server_running && !cancelled_already && !matches!(end, End::ServerLost(_)) {
            self.cancel_on_server(shared);
        }
        let quiet = self.is_quiet();
        if let Some(server) = self.server.as_mut()
            && quiet
            && !self.client_terminated
            && !keep_server
        {
            // A polite goodbye keeps the server's log free of "unexpected EOF" lines.
            let _ = timeout(FAREWELL_TIMEOUT, server.write_all(b"X\0\0\0\x04")).await;
        }
        if let Some(refusal) = refusal {
            // A message half-sent to the client cannot be followed by an error it could parse.
            if self.down.discard_partial() {
                if cancelled_already {
                    // Whatever the server said about the abandoned request must not reach the
                    // client ahead of the verdict; drop what is framed and not yet written.
                    self.down.discard_framed();
                }
                refusal.write(self.down.inject());
            }
        }
        let client = &mut self.client;
        let down = &mut self.down;
        let _ = timeout(FAREWELL_TIMEOUT, async {
            poll_fn(|cx| down.poll_write_to(cx, client)).await?;
            client.shutdown().await?;
            linger(client).await
        })
        .await;
    }

    /// Sends a CancelRequest for whatever the server is running for this session. Runs on its
    /// own task so the session does not wait for it.
    fn cancel_on_server(&self, shared: &Shared) {
        let Some((pid, key)) = self.server_key.clone() else {
            return;
        };
        shared.metrics.cancels_sent.increment(1);
        let addr = self.server_addr;
        let c = self.config.config();
        let within = c.database.connect_timeout + c.timeouts.cancel_grace;
        debug!(parent: &self.span, server = %addr, pid, "sending cancel request");
        tokio::spawn(
            async move {
                if let Err(e) = upstream::send_cancel(addr, pid, &key, within).await {
                    warn!(error = %e, "cancel request failed");
                }
            }
            .instrument(self.span.clone()),
        );
    }
}

/// Why a client's SASLInitialResponse cannot succeed through bulkhead's TLS to the server, if
/// it cannot. A client that picked SCRAM-SHA-256-PLUS anyway, or that says it could bind but
/// thinks the server cannot (gs2 flag 'y', which a TLS client sends when the offer lacks -PLUS),
/// would be refused by the server as a downgrade attack; say why here instead.
/// The transaction status a ReadyForQuery from the server carries.
fn ready_status(body: &[u8]) -> Result<TxStatus, &'static str> {
    match body {
        [b] => TxStatus::from_byte(*b),
        _ => None,
    }
    .ok_or("invalid ReadyForQuery from server")
}

fn channel_binding_problem(body: &[u8]) -> Option<&'static str> {
    let (mechanism, data) = frontend::sasl_initial_response(body)?;
    if mechanism == backend::SCRAM_PLUS {
        Some("the client chose SCRAM-SHA-256-PLUS, which bulkhead does not offer")
    } else if data.starts_with(b"y") {
        Some(
            "the client's TLS session to bulkhead supports channel binding, and the server, \
             on its own TLS session with bulkhead, would take SCRAM without it as a downgrade",
        )
    } else {
        None
    }
}

/// Increments a gauge now and decrements it when dropped.
struct GaugeGuard(metrics::Gauge);

impl GaugeGuard {
    fn new(g: &metrics::Gauge) -> Self {
        g.increment(1.0);
        GaugeGuard(g.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}
