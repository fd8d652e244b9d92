//! What one session has asked the server and not yet had answered: the requests in flight,
//! their classes, and when the one the server is working on must finish. Pure bookkeeping,
//! with the clock passed in.
//!
//! A request is everything up to the ReadyForQuery that answers it: one Query, one
//! FunctionCall, or the extended-protocol messages up to and including a Sync. The server works
//! on them in order, so only the head of the queue runs; its clock starts when it was sent or
//! when the request before it completed, whichever is later (DESIGN.md §3.2).

use std::collections::VecDeque;
use std::time::Duration;

// Statement and portal names hash with foldhash, seeded at random per map: far cheaper than
// SipHash per Bind, and still not a table a client can predict.
use crate::clock::Instant;
use foldhash::{HashMap, HashMapExt};

use crate::classify::{Control, Kind};
use crate::metrics::Class;
use crate::protocol::backend::TxStatus;

/// What bulkhead does with a request besides relaying it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Relayed as it is.
    Normal,
    /// The one trial write of a half-open circuit: its result closes or reopens it.
    Trial,
    /// Not run: the server got a Sync in its place, and the client gets this error in front of
    /// the ReadyForQuery that answers it.
    Refused(Refused),
    /// A ROLLBACK (or a COMMIT turned into one) that ends a block bulkhead failed.
    EndsFailedBlock,
}

/// Why a request was not run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The write circuit is open.
    CircuitOpen { retry_at: Instant },
    /// The transaction block failed earlier (a refused write), so commands are ignored until
    /// it ends, as PostgreSQL does.
    InFailedBlock,
    /// No concurrency slot within queue_timeout (how long it waited).
    Shed { waited: Duration },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Request {
    class: Class,
    effect: Effect,
    /// A COMMIT (END, PREPARE TRANSACTION) of a transaction that wrote.
    commit: bool,
    /// It creates or closes a named prepared statement: it changes the session's state.
    named: bool,
}

/// Requests in flight beyond which the queue grows instead of reusing its space; pipelines
/// deeper than this cost one allocation, once. Small, because every idle session holds it
/// (16 cost an idle session 512 bytes).
const QUEUE_CAPACITY: usize = 4;

#[derive(Debug)]
pub struct Tracker {
    /// Each request sent and not yet answered, oldest first.
    queue: VecDeque<Request>,
    /// How many of them bulkhead refused (kept, so asking costs nothing per message).
    refused: usize,
    /// The newest request has extended-protocol messages but no Sync yet.
    open: bool,
    /// When the head request's clock started.
    head_started: Instant,
    /// `head_started` moved since [`Tracker::take_head_moved`] last asked.
    head_moved: bool,
    /// The server is waiting for the client's COPY data: the clock is paused.
    copy_in: bool,
    /// A write was sent since the last time the session was idle outside a transaction, so a
    /// COMMIT now is a write.
    tx_wrote: bool,
    /// Named prepared statements and what they do.
    statements: HashMap<Box<[u8]>, Kind>,
    /// Statements Binds named lately, if their names are short, and what they do: drivers
    /// bind the same few statements again and again, and a comparison costs less than a hash
    /// lookup. Made at the first Bind of a named statement (most sessions never bind one),
    /// emptied at every Parse and Close of a statement, given back by [`Tracker::release`].
    bound: Option<Box<BoundNames>>,
    unnamed_statement: Kind,
    /// Prepared statements that are ROLLBACK, ROLLBACK TO or COMMIT: what a failed block
    /// accepts, even when executed long after it was prepared.
    controls: HashMap<Box<[u8]>, Control>,
    /// Named portals and what they do; they die with their transaction.
    portals: HashMap<Box<[u8]>, Kind>,
    unnamed_portal: Kind,
}

/// [`Tracker`]'s memory of the statements Binds named lately: eight slots, chosen by a name's
/// length and last byte (a driver's statements are mostly numbered, so their last bytes
/// differ), each with up to 15 bytes of name in place, so remembering allocates nothing once
/// the slots exist. An empty name is never remembered (it is the unnamed statement):
/// `len == 0` is a free slot.
#[derive(Debug, Clone, Copy)]
struct BoundNames([BoundName; 8]);

#[derive(Debug, Clone, Copy)]
struct BoundName {
    len: u8,
    kind: Kind,
    name: [u8; 15],
}

impl BoundNames {
    const NONE: BoundNames = BoundNames(
        [BoundName {
            len: 0,
            kind: Kind::Write,
            name: [0; 15],
        }; 8],
    );

    fn slot(name: &[u8]) -> usize {
        (name.len() + usize::from(name.last().copied().unwrap_or(0))) % 8
    }

    /// What `name` (not empty) does, if remembered.
    fn kind_of(&self, name: &[u8]) -> Option<Kind> {
        let b = &self.0[Self::slot(name)];
        (usize::from(b.len) == name.len() && &b.name[..name.len()] == name).then_some(b.kind)
    }

    /// Remembers `name` (not empty) if it is short enough, in place of its slot's last one.
    fn remember(&mut self, name: &[u8], kind: Kind) {
        let b = &mut self.0[Self::slot(name)];
        if name.len() <= b.name.len() {
            b.len = name.len() as u8;
            b.name[..name.len()].copy_from_slice(name);
            b.kind = kind;
        }
    }
}

/// A request the server has answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finished {
    pub class: Class,
    pub took: Duration,
    pub effect: Effect,
    /// It was a COMMIT of a transaction that wrote.
    pub commit: bool,
}

impl Tracker {
    pub fn new(now: Instant) -> Self {
        Tracker {
            queue: VecDeque::with_capacity(QUEUE_CAPACITY),
            refused: 0,
            open: false,
            head_started: now,
            head_moved: true,
            copy_in: false,
            tx_wrote: false,
            statements: HashMap::new(),
            bound: None,
            unnamed_statement: Kind::Read,
            controls: HashMap::new(),
            portals: HashMap::new(),
            unnamed_portal: Kind::Read,
        }
    }

    /// A simple Query went to the server.
    ///
    /// After extended-protocol messages with no Sync (asyncpg's Parse, Describe, Flush; pgjdbc's
    /// unsynced BEGIN), the server answers both with the Query's one ReadyForQuery: the Query
    /// joins and ends the open request. (Had the open batch failed, the server would skip the
    /// Query until a Sync, whose ReadyForQuery then ends the request; a driver sends that Sync
    /// when it sees the error, before its next Query.)
    #[inline]
    pub fn query(&mut self, kind: Kind, now: Instant) {
        let commit = kind == Kind::Commit && self.tx_wrote;
        let class = self.resolve(kind);
        self.end_open_with(class, commit, now);
    }

    /// A FunctionCall went to the server. What a function does is unknown: a write. Like a
    /// Query, it ends an open request.
    pub fn function_call(&mut self, now: Instant) {
        self.end_open_with(Class::Write, false, now);
    }

    /// A message answered by its own ReadyForQuery: a request of its own, or the end of the
    /// open one, which becomes at least as strong as it.
    fn end_open_with(&mut self, class: Class, commit: bool, now: Instant) {
        if !std::mem::take(&mut self.open) {
            self.push(class, now);
        }
        if let Some(last) = self.queue.back_mut() {
            if class == Class::Write {
                last.class = Class::Write;
            }
            last.commit |= commit;
        }
    }

    /// The class a query of `kind` would have now, without sending it.
    pub fn peek_class(&self, kind: Kind) -> Class {
        match kind {
            Kind::Read => Class::Read,
            Kind::Commit if !self.tx_wrote => Class::Read,
            Kind::Commit | Kind::Write => Class::Write,
        }
    }

    /// What `portal` runs: the kind of the statement it was bound from. An unknown portal is a
    /// write.
    pub fn portal_kind(&self, portal: &[u8]) -> Kind {
        if portal.is_empty() {
            self.unnamed_portal
        } else {
            self.portals.get(portal).copied().unwrap_or(Kind::Write)
        }
    }

    /// The class of the open request once an Execute of a portal of `kind` is added, without
    /// adding it.
    pub fn peek_execute(&self, kind: Kind) -> Class {
        let open_write = self.open && self.last() == Some(Class::Write);
        if open_write {
            Class::Write
        } else {
            self.peek_class(kind)
        }
    }

    /// Parse: remember what the statement does.
    pub fn parse(&mut self, name: &[u8], kind: Kind, now: Instant) {
        self.extended(now);
        self.forget_bound();
        if name.is_empty() {
            self.unnamed_statement = kind;
        } else {
            self.statements.insert(name.into(), kind);
            self.mark_named();
        }
    }

    fn forget_bound(&mut self) {
        if let Some(b) = self.bound.as_deref_mut() {
            *b = BoundNames::NONE;
        }
    }

    /// Gives back memory an idle session need not hold: what Binds named lately.
    pub fn release(&mut self) {
        self.bound = None;
    }

    fn mark_named(&mut self) {
        if let Some(last) = self.queue.back_mut() {
            last.named = true;
        }
    }

    /// Parse of a named statement that is transaction control.
    pub fn parse_control(&mut self, name: &[u8], control: Control) {
        if !name.is_empty() {
            self.controls.insert(name.into(), control);
        }
    }

    /// Whether the named prepared statement is transaction control.
    pub fn control_of(&self, statement: &[u8]) -> Option<Control> {
        self.controls.get(statement).copied()
    }

    /// Bind: the portal does what its statement does. An unknown statement is a write.
    pub fn bind(&mut self, portal: &[u8], statement: &[u8], now: Instant) {
        self.extended(now);
        let kind = if statement.is_empty() {
            self.unnamed_statement
        } else if let Some(kind) = self.bound.as_ref().and_then(|b| b.kind_of(statement)) {
            kind
        } else {
            let kind = self
                .statements
                .get(statement)
                .copied()
                .unwrap_or(Kind::Write);
            self.bound
                .get_or_insert_with(|| Box::new(BoundNames::NONE))
                .remember(statement, kind);
            kind
        };
        if portal.is_empty() {
            self.unnamed_portal = kind;
        } else {
            self.portals.insert(portal.into(), kind);
        }
    }

    /// Execute of a portal of `kind` (see `portal_kind`): the open request is at least as
    /// strong as the portal it runs. Returns true if this made a read request a write.
    pub fn execute(&mut self, kind: Kind, now: Instant) -> bool {
        self.extended(now);
        let commit = kind == Kind::Commit && self.tx_wrote;
        let class = self.resolve(kind);
        if commit && let Some(last) = self.queue.back_mut() {
            last.commit = true;
        }
        match self.queue.back_mut() {
            Some(last) if class == Class::Write && last.class == Class::Read => {
                last.class = Class::Write;
                true
            }
            _ => false,
        }
    }

    /// Close of a statement (`b'S'`) or portal (`b'P'`).
    pub fn close(&mut self, what: u8, name: &[u8], now: Instant) {
        self.extended(now);
        match what {
            b'S' => {
                self.forget_bound();
                self.statements.remove(name);
                self.controls.remove(name);
                if !name.is_empty() {
                    self.mark_named();
                }
            }
            _ => {
                self.portals.remove(name);
            }
        }
    }

    /// Any other extended-protocol message (Describe, Flush): part of the open request.
    pub fn extended(&mut self, now: Instant) {
        if !self.open {
            self.open = true;
            self.push(Class::Read, now);
        }
    }

    /// Sync: ends the open request, or is a request of its own.
    pub fn sync(&mut self, now: Instant) {
        self.extended(now);
        self.open = false;
    }

    /// The server is now waiting for COPY data from the client; the clock pauses.
    pub fn copy_in_started(&mut self) {
        self.copy_in = true;
    }

    /// The client finished (or abandoned) its COPY data; the server's clock starts again.
    pub fn copy_in_ended(&mut self, now: Instant) {
        if self.copy_in {
            self.copy_in = false;
            self.start_head_clock(now);
        }
    }

    /// ReadyForQuery: the head request is answered.
    #[inline]
    pub fn ready(&mut self, status: TxStatus, now: Instant) -> Option<Finished> {
        let Request {
            class,
            effect,
            commit,
            ..
        } = self.queue.pop_front()?;
        if matches!(effect, Effect::Refused(_)) {
            self.refused -= 1;
        }
        let took = now.saturating_duration_since(self.head_started);
        self.start_head_clock(now);
        self.copy_in = false;
        if self.queue.is_empty() && status == TxStatus::Idle {
            self.tx_wrote = false;
            if !self.portals.is_empty() {
                self.portals.clear();
            }
        }
        Some(Finished {
            class,
            took,
            effect,
            commit,
        })
    }

    /// The class of the request the server is working on, if any.
    pub fn head(&self) -> Option<Class> {
        self.queue.front().map(|r| r.class)
    }

    /// When the clock of the request the server is working on started.
    pub fn head_started(&self) -> Instant {
        self.head_started
    }

    /// Whether the head request's clock moved since the last call (for /sessions, which is
    /// told only then).
    pub fn take_head_moved(&mut self) -> bool {
        std::mem::take(&mut self.head_moved)
    }

    fn start_head_clock(&mut self, now: Instant) {
        self.head_started = now;
        self.head_moved = true;
    }

    /// Whether the request the server is working on is a COMMIT of a transaction that wrote.
    pub fn head_is_commit(&self) -> bool {
        self.queue.front().is_some_and(|r| r.commit)
    }

    /// Whether the request the server is working on is one bulkhead refused (the server got a
    /// Sync in its place).
    pub fn head_refused(&self) -> bool {
        self.queue
            .front()
            .is_some_and(|r| matches!(r.effect, Effect::Refused(_)))
    }

    /// Whether the newest request is a COMMIT of a transaction that wrote.
    pub fn last_is_commit(&self) -> bool {
        self.queue.back().is_some_and(|r| r.commit)
    }

    /// The class of the newest request, if any.
    pub fn last(&self) -> Option<Class> {
        self.queue.back().map(|r| r.class)
    }

    /// Sets what bulkhead does with the newest request.
    pub fn mark_last(&mut self, effect: Effect) {
        if let Some(last) = self.queue.back_mut() {
            let was = matches!(last.effect, Effect::Refused(_));
            let is = matches!(effect, Effect::Refused(_));
            self.refused = self.refused + usize::from(is) - usize::from(was);
            last.effect = effect;
        }
    }

    /// Whether the newest request still takes extended messages (no Sync yet).
    pub fn is_open(&self) -> bool {
        self.open
    }

    /// Requests in flight before the open one: those the server must answer first.
    pub fn before_open(&self) -> usize {
        self.queue.len() - usize::from(self.open)
    }

    /// Whether a write went to the server and has not been answered.
    pub fn write_in_flight(&self) -> bool {
        self.queue
            .iter()
            .any(|r| r.class == Class::Write && !matches!(r.effect, Effect::Refused(_)))
    }

    /// Whether a refused request is in flight: then client framing waits for its answer.
    /// Asked for every client message, so it reads the count kept as requests come and go
    /// (scanning the queue was some 170 instructions a transaction with `pgbench -M prepared`).
    #[inline]
    pub fn refusal_in_flight(&self) -> bool {
        debug_assert_eq!(
            self.refused,
            self.queue
                .iter()
                .filter(|r| matches!(r.effect, Effect::Refused(_)))
                .count(),
            "the count of refused requests in flight"
        );
        self.refused > 0
    }

    /// When the head request must be answered, given the deadline for each class; `None` while
    /// nothing runs or the server waits for COPY data.
    pub fn deadline(&self, read: Duration, write: Duration) -> Option<Instant> {
        let head = self.queue.front()?;
        if self.copy_in || matches!(head.effect, Effect::Refused(_)) {
            return None;
        }
        let class = head.class;
        Some(self.head_started + if class == Class::Write { write } else { read })
    }

    /// Each request in flight, oldest first: its class, and whether it may change the server
    /// beyond its transaction: a write the server got (it may commit), or one that creates or
    /// closes a named prepared statement.
    pub fn requests(&self) -> impl Iterator<Item = (Class, bool)> + '_ {
        self.queue.iter().map(|r| {
            let sent_write = r.class == Class::Write && !matches!(r.effect, Effect::Refused(_));
            (r.class, sent_write || r.named)
        })
    }

    /// The server connection is gone (transaction pooling): every request in flight is
    /// forgotten, with its portals and the open batch; named statements stay (the client
    /// keeps them). Returns each request's class and whether it may have committed: a write
    /// the server got that is a COMMIT, or any such write when the session was outside a
    /// block (`in_block` false: autocommit).
    pub fn abandon(&mut self, in_block: bool, now: Instant) -> Vec<(Class, bool)> {
        let lost = self
            .queue
            .drain(..)
            .map(|r| {
                let sent_write = r.class == Class::Write && !matches!(r.effect, Effect::Refused(_));
                (r.class, sent_write && (r.commit || !in_block))
            })
            .collect();
        self.refused = 0;
        self.open = false;
        self.start_head_clock(now);
        self.copy_in = false;
        self.tx_wrote = false;
        self.portals.clear();
        self.unnamed_portal = Kind::Read;
        lost
    }

    /// Starts the head request's clock again: its server was frozen and answers again.
    pub fn restart_clock(&mut self, now: Instant) {
        self.start_head_clock(now);
    }

    /// The server waits for the client's COPY data.
    pub fn in_copy(&self) -> bool {
        self.copy_in
    }

    /// Requests sent and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.queue.len()
    }

    fn resolve(&mut self, kind: Kind) -> Class {
        match kind {
            Kind::Read => Class::Read,
            Kind::Commit if !self.tx_wrote => Class::Read,
            Kind::Commit | Kind::Write => {
                self.tx_wrote = true;
                Class::Write
            }
        }
    }

    fn push(&mut self, class: Class, now: Instant) {
        if self.queue.is_empty() {
            self.start_head_clock(now);
        }
        self.queue.push_back(Request {
            class,
            effect: Effect::Normal,
            commit: false,
            named: false,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const READ: Duration = Duration::from_secs(30);
    const WRITE: Duration = Duration::from_secs(5);

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn a_query_after_an_unsynced_batch_ends_it_with_one_ready_for_query() {
        let t0 = Instant::now();
        let mut t = Tracker::new(t0);
        // asyncpg's prepare: Parse, Describe, Flush; then a Query, BEGIN.
        t.parse(b"__asyncpg_stmt_1__", Kind::Read, t0);
        t.extended(t0);
        t.extended(t0);
        t.query(Kind::Write, t0);
        assert_eq!(t.in_flight(), 1, "one ReadyForQuery answers both");
        assert!(!t.is_open());
        assert_eq!(
            t.head(),
            Some(Class::Write),
            "the request is as strong as the Query"
        );
        assert!(t.ready(TxStatus::Idle, at(t0, 1)).is_some());
        assert_eq!(t.in_flight(), 0);
        // The next batch is a request of its own.
        t.extended(at(t0, 2));
        t.sync(at(t0, 2));
        assert_eq!(t.in_flight(), 1);
        assert!(t.ready(TxStatus::Idle, at(t0, 3)).is_some());
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn simple_query_deadline_follows_its_class() {
        let t0 = Instant::now();
        let mut t = Tracker::new(t0);
        assert_eq!(t.deadline(READ, WRITE), None);
        t.query(Kind::Read, t0);
        assert_eq!(t.deadline(READ, WRITE), Some(t0 + READ));
        let done = t.ready(TxStatus::Idle, at(t0, 7)).unwrap();
        assert_eq!(
            done,
            Finished {
                class: Class::Read,
                took: Duration::from_millis(7),
                effect: Effect::Normal,
                commit: false,
            }
        );
        t.query(Kind::Write, at(t0, 10));
        assert_eq!(t.deadline(READ, WRITE), Some(at(t0, 10) + WRITE));
    }

    #[test]
    fn pipelined_request_clock_starts_when_the_one_before_completes() {
        let t0 = Instant::now();
        let mut t = Tracker::new(t0);
        t.query(Kind::Read, t0);
        t.query(Kind::Write, at(t0, 1));
        t.ready(TxStatus::Idle, at(t0, 500));
        assert_eq!(t.head(), Some(Class::Write));
        assert_eq!(t.deadline(READ, WRITE), Some(at(t0, 500) + WRITE));
        assert_eq!(t.in_flight(), 1);
    }

    #[test]
    fn execute_inherits_the_class_of_its_prepared_statement() {
        let t0 = Instant::now();
        let mut t = Tracker::new(t0);
        t.parse(b"ins", Kind::Write, t0);
        t.parse(b"sel", Kind::Read, t0);
        t.sync(t0);
        assert_eq!(
            t.ready(TxStatus::Idle, t0).unwrap().class,
            Class::Read,
            "Parse alone writes nothing"
        );
        t.bind(b"", b"sel", t0);
        t.execute(t.portal_kind(b""), t0);
        t.sync(t0);
        t.bind(b"p1", b"ins", t0);
        assert!(
            t.execute(t.portal_kind(b"p1"), t0),
            "the request became a write"
        );
        t.sync(t0);
        assert_eq!(t.ready(TxStatus::Idle, t0).unwrap().class, Class::Read);
        assert_eq!(t.ready(TxStatus::Idle, t0).unwrap().class, Class::Write);
        // Unknown statement or portal: a write.
        t.bind(b"", b"never-parsed", t0);
        t.execute(t.portal_kind(b""), t0);
        t.sync(t0);
        assert_eq!(t.head(), Some(Class::Write));
    }

    #[test]
    fn closed_statement_is_forgotten() {
        let t0 = Instant::now();
        let mut t = Tracker::new(t0);
        t.parse(b"s", Kind::Read, t0);
        t.close(b'S', b"s", t0);
        t.bind(b"", b"s", t0);
        t.execute(t.portal_kind(b""), t0);
        assert_eq!(t.head(), Some(Class::Write));
    }

    #[test]
    fn a_statement_bound_again_after_it_was_closed_and_parsed_anew_takes_its_new_kind() {
        let t0 = Instant::now();
        let mut t = Tracker::new(t0);
        let kind_bound = |t: &mut Tracker, name: &[u8]| {
            t.bind(b"", name, t0);
            t.portal_kind(b"")
        };
        t.parse(b"s", Kind::Read, t0);
        assert_eq!(kind_bound(&mut t, b"s"), Kind::Read);
        assert_eq!(kind_bound(&mut t, b"s"), Kind::Read, "remembered");
        t.close(b'S', b"s", t0);
        assert_eq!(kind_bound(&mut t, b"s"), Kind::Write, "closed: unknown");
        t.parse(b"s", Kind::Read, t0);
        assert_eq!(kind_bound(&mut t, b"s"), Kind::Read, "parsed again");
        // Names that share a slot, and a name too long to remember, are looked up.
        t.parse(b"s2", Kind::Write, t0);
        t.parse(b"r", Kind::Read, t0);
        for _ in 0..2 {
            assert_eq!(kind_bound(&mut t, b"s"), Kind::Read);
            assert_eq!(kind_bound(&mut t, b"s2"), Kind::Write);
            assert_eq!(kind_bound(&mut t, b"r"), Kind::Read);
        }
        // Given back when idle; looked up again after.
        t.release();
        assert_eq!(kind_bound(&mut t, b"s2"), Kind::Write);
        let long = [b'n'; 40];
        t.parse(&long, Kind::Read, t0);
        assert_eq!(kind_bound(&mut t, &long), Kind::Read);
        assert_eq!(kind_bound(&mut t, &long[..39]), Kind::Write);
    }

    #[test]
    fn commit_is_a_write_only_after_the_transaction_wrote() {
        let t0 = Instant::now();
        let mut t = Tracker::new(t0);
        t.query(Kind::Read, t0); // BEGIN
        t.ready(TxStatus::InBlock, t0);
        t.query(Kind::Commit, t0);
        assert_eq!(t.head(), Some(Class::Read));
        t.ready(TxStatus::Idle, t0);
        t.query(Kind::Read, t0); // BEGIN
        t.ready(TxStatus::InBlock, t0);
        t.query(Kind::Write, t0);
        assert!(
            !t.head_is_commit(),
            "an INSERT inside the block commits nothing"
        );
        t.ready(TxStatus::InBlock, t0);
        t.query(Kind::Commit, t0);
        assert_eq!(t.head(), Some(Class::Write));
        assert!(t.head_is_commit() && t.last_is_commit());
        let done = t.ready(TxStatus::Idle, t0).unwrap();
        assert!(
            done.commit,
            "the write circuit counts it as commit-path evidence"
        );
        t.query(Kind::Commit, t0);
        assert_eq!(
            t.head(),
            Some(Class::Read),
            "the next transaction starts clean"
        );
        assert!(!t.head_is_commit());
    }

    #[test]
    fn copy_in_pauses_the_clock_until_the_client_is_done() {
        let t0 = Instant::now();
        let mut t = Tracker::new(t0);
        t.query(Kind::Write, t0);
        t.copy_in_started();
        assert_eq!(t.deadline(READ, WRITE), None);
        t.copy_in_ended(at(t0, 60_000));
        assert_eq!(t.deadline(READ, WRITE), Some(at(t0, 60_000) + WRITE));
    }

    #[test]
    fn named_portals_die_with_their_transaction() {
        let t0 = Instant::now();
        let mut t = Tracker::new(t0);
        t.parse(b"s", Kind::Read, t0);
        t.bind(b"p", b"s", t0);
        t.sync(t0);
        t.ready(TxStatus::Idle, t0);
        t.execute(t.portal_kind(b"p"), t0);
        assert_eq!(
            t.head(),
            Some(Class::Write),
            "p no longer exists; unknown is a write"
        );
    }

    #[test]
    fn refused_request_has_no_deadline_and_holds_the_client_back() {
        let t0 = Instant::now();
        let mut t = Tracker::new(t0);
        t.query(Kind::Write, t0);
        t.mark_last(Effect::Refused(Refused::InFailedBlock));
        assert_eq!(t.deadline(READ, WRITE), None);
        assert!(t.refusal_in_flight());
        let done = t.ready(TxStatus::InBlock, t0).unwrap();
        assert_eq!(done.effect, Effect::Refused(Refused::InFailedBlock));
        assert!(!t.refusal_in_flight());
    }

    #[test]
    fn requests_before_the_open_one_are_counted() {
        let t0 = Instant::now();
        let mut t = Tracker::new(t0);
        t.query(Kind::Read, t0);
        t.parse(b"", Kind::Write, t0);
        assert!(t.is_open());
        assert_eq!(t.before_open(), 1);
        t.sync(t0);
        assert_eq!(t.before_open(), 2);
    }

    #[test]
    fn a_lone_sync_is_a_request_of_its_own() {
        let t0 = Instant::now();
        let mut t = Tracker::new(t0);
        t.sync(t0);
        t.sync(t0);
        assert_eq!(t.in_flight(), 2);
        assert!(t.ready(TxStatus::Idle, t0).is_some());
        assert!(t.ready(TxStatus::Idle, t0).is_some());
        assert!(
            t.ready(TxStatus::Idle, t0).is_none(),
            "a stray ReadyForQuery finishes nothing"
        );
    }
}
