//! The write circuit of one database host.
//!
//! [`Breaker`] is the pure state machine, with the clock passed in:
//!
//! ```text
//!   Closed ──(failure_threshold consecutive failures)──► Open
//!   Open ──(open_for has passed)──► HalfOpen
//!   Open ──(a write check begun after the opening commits)──► Closed
//!   HalfOpen ──(a successful write check, or a successful trial commit)──► Closed
//!   HalfOpen ──(the trial or a check fails)──► Open
//! ```
//!
//! Only evidence about the commit path moves it (see [`Success`]): a confirmed commit, or the
//! probe's write check. A statement inside a transaction proves nothing about whether commits
//! get through, so it neither resets the count nor serves as the half-open trial.
//!
//! [`Circuit`] shares one breaker among all sessions. While it is closed and healthy, asking it
//! costs one atomic load; the mutex is taken only while something is wrong. It also carries the
//! host's *alarm*: a watch that sessions on the host follow, bumped when the circuit opens or
//! the probe finds the host not answering, so that statements stuck there are answered at once.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    HalfOpen,
    Open,
}

impl State {
    /// The value of bulkhead_circuit_state: 0 closed, 1 half-open, 2 open.
    pub fn gauge(self) -> f64 {
        match self {
            State::Closed => 0.0,
            State::HalfOpen => 1.0,
            State::Open => 2.0,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::HalfOpen => "half_open",
            State::Open => "open",
        }
    }

    fn as_u8(self) -> u8 {
        self.gauge() as u8
    }
}

/// Evidence that the commit path works.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Success {
    /// A commit a client saw confirmed: an autocommit write, or the COMMIT of a transaction
    /// that wrote, answered with ReadyForQuery outside a transaction.
    Commit,
    /// The same, for the one trial commit of a half-open circuit.
    Trial,
    /// The probe's write check committed; it began at the instant given.
    Check { started: Instant },
}

/// What to do with a write that is about to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Allowed as the one trial write of a half-open circuit; report how it went.
    Trial,
    /// Refused; try again at `retry_at`.
    Refuse {
        retry_at: Instant,
    },
}

/// The settings the breaker runs on (from `[circuit]`, reloadable).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub failure_threshold: u32,
    pub open_for: Duration,
    /// A trial write not reported within this long no longer blocks the next trial.
    pub trial_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Breaker {
    state: State,
    failures: u32,
    opened_at: Instant,
    trial_started: Option<Instant>,
}

impl Breaker {
    pub fn new(now: Instant) -> Self {
        Breaker {
            state: State::Closed,
            failures: 0,
            opened_at: now,
            trial_started: None,
        }
    }

    /// The state at `now` (an open circuit whose time is up is half-open).
    pub fn state(&mut self, now: Instant, s: &Settings) -> State {
        if self.state == State::Open && now >= self.opened_at + s.open_for {
            self.state = State::HalfOpen;
            self.trial_started = None;
        }
        self.state
    }

    /// `commits`: the write would commit if it succeeds (an autocommit write, or the COMMIT
    /// of a transaction that wrote). Only such a write can be the half-open trial; a write
    /// inside a transaction is refused until the circuit closes, since its success would say
    /// nothing about the commit that is to follow.
    pub fn decide(&mut self, now: Instant, s: &Settings, commits: bool) -> Decision {
        match self.state(now, s) {
            State::Closed => Decision::Allow,
            State::Open => Decision::Refuse {
                retry_at: self.opened_at + s.open_for,
            },
            State::HalfOpen if !commits => Decision::Refuse {
                // The probe's next write check may close it; its interval is not known here.
                retry_at: now + Duration::from_secs(1),
            },
            State::HalfOpen => match self.trial_started {
                Some(t) if now < t + s.trial_timeout => Decision::Refuse {
                    retry_at: t + s.trial_timeout,
                },
                _ => {
                    self.trial_started = Some(now);
                    Decision::Trial
                }
            },
        }
    }

    /// A commit was confirmed, or the write check committed.
    pub fn success(&mut self, now: Instant, s: &Settings, how: Success) {
        let closes = match (self.state(now, s), how) {
            (State::Closed, _) => {
                self.failures = 0;
                false
            }
            (State::HalfOpen, Success::Trial | Success::Check { .. }) => true,
            // The probe's own commit, begun after the circuit opened, went through: the commit
            // path has healed, and waiting out open_for would only refuse writes that would
            // succeed. (A check begun before the opening may have been freed by its cancel.)
            (State::Open, Success::Check { started }) => started >= self.opened_at,
            // A commit that started before the circuit opened proves little.
            _ => false,
        };
        if closes {
            self.state = State::Closed;
            self.failures = 0;
            self.trial_started = None;
        }
    }

    /// A commit failed in a way that counts: it missed its deadline, a read-only error from a
    /// host that was primary, a failed write check, or a lost connection the probe confirmed.
    pub fn failure(&mut self, now: Instant, s: &Settings) {
        match self.state(now, s) {
            State::Closed => {
                self.failures += 1;
                if self.failures >= s.failure_threshold {
                    self.open(now);
                }
            }
            State::HalfOpen => self.open(now),
            State::Open => {}
        }
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }

    fn open(&mut self, now: Instant) {
        self.state = State::Open;
        self.opened_at = now;
        self.trial_started = None;
    }
}

/// One host's breaker, shared by every session and the probe.
#[derive(Debug)]
pub struct Circuit {
    /// The backend this circuit guards, for logs.
    name: String,
    /// Mirror of the breaker's state, for the lock-free fast path.
    state: AtomicU8,
    /// Some failure has been counted since the last success: a success must take the lock.
    dirty: AtomicBool,
    breaker: Mutex<Breaker>,
    /// The last failure counted, for the log line that says the circuit opened and for the
    /// health port while it is not closed. Written only when a failure is counted.
    reason: Mutex<String>,
    gauge: metrics::Gauge,
    openings: metrics::Counter,
    unresponsive_gauge: metrics::Gauge,
    /// Bumped when the circuit opens or the host stops answering: sessions on the host follow
    /// it and answer what is stuck there.
    alarm: watch::Sender<u64>,
    /// The probe's status checks found the host not answering (twice in a row): statements
    /// sent there would hang, so sessions answer them instead (see `crate::detach`).
    unresponsive: AtomicBool,
    /// The probe's heartbeat has gone unanswered for its timeout: the first, fast sign.
    beat_silent: AtomicBool,
    /// When a session last had a request answered by the host, in milliseconds from
    /// `origin` (`u64::MAX`: never). Sessions write it at most every `ANSWER_NOTE_EVERY`.
    last_answer_ms: AtomicU64,
    /// When a session last saw a commit confirmed there, likewise; written at most every
    /// `ANSWER_NOTE_EVERY`.
    last_commit_ms: AtomicU64,
    origin: Instant,
}

/// How often a session notes that its host answered (see `Circuit::saw_answer`): rarely
/// enough that the shared line costs nothing measurable, often enough for the heartbeat's
/// hundreds of milliseconds.
pub const ANSWER_NOTE_EVERY: std::time::Duration = std::time::Duration::from_millis(50);

impl Circuit {
    /// A closed circuit for backend `name`, publishing to the metrics of `m`.
    pub fn new(name: String, m: &crate::metrics::Metrics) -> Self {
        let gauge = m.gauge("bulkhead_circuit_state", &[("backend", &name)]);
        gauge.set(0.0);
        let unresponsive_gauge = m.gauge("bulkhead_backend_unresponsive", &[("backend", &name)]);
        unresponsive_gauge.set(0.0);
        let openings = m.counter("bulkhead_circuit_openings_total", &[("backend", &name)]);
        Circuit {
            name,
            state: AtomicU8::new(State::Closed.as_u8()),
            dirty: AtomicBool::new(false),
            breaker: Mutex::new(Breaker::new(Instant::now())),
            reason: Mutex::new(String::new()),
            gauge,
            openings,
            unresponsive_gauge,
            alarm: watch::channel(0).0,
            unresponsive: AtomicBool::new(false),
            beat_silent: AtomicBool::new(false),
            last_answer_ms: AtomicU64::new(u64::MAX),
            last_commit_ms: AtomicU64::new(u64::MAX),
            origin: Instant::now(),
        }
    }

    /// A session had a request answered by the host at `now`: the host is not frozen, only
    /// perhaps slow for the probe's own connection (a busy machine).
    pub fn saw_answer(&self, now: Instant) {
        let ms = now.saturating_duration_since(self.origin).as_millis() as u64;
        self.last_answer_ms.store(ms, Ordering::Relaxed);
    }

    /// How long ago a session last had a request answered by the host, if ever.
    pub fn answered_ago(&self) -> Option<std::time::Duration> {
        let at = self.last_answer_ms.load(Ordering::Relaxed);
        (at != u64::MAX).then(|| {
            std::time::Duration::from_millis(
                (self.origin.elapsed().as_millis() as u64).saturating_sub(at),
            )
        })
    }

    /// Whether some session had a request answered by the host within `window`.
    pub fn answered_within(&self, window: std::time::Duration) -> bool {
        let at = self.last_answer_ms.load(Ordering::Relaxed);
        at != u64::MAX
            && (self.origin.elapsed().as_millis() as u64)
                <= at.saturating_add(window.as_millis() as u64)
    }

    /// A session saw a commit confirmed by the host at `now`: the commit path works, and the
    /// probe need not write to find out. A read of a line written at most every
    /// `ANSWER_NOTE_EVERY`, and then that write: sessions on every worker call it per commit.
    pub fn saw_commit(&self, now: Instant) {
        let ms = now.saturating_duration_since(self.origin).as_millis() as u64;
        let last = self.last_commit_ms.load(Ordering::Relaxed);
        if last == u64::MAX || ms >= last + ANSWER_NOTE_EVERY.as_millis() as u64 {
            self.last_commit_ms.store(ms, Ordering::Relaxed);
        }
    }

    /// Whether a session saw a commit confirmed by the host within `window`.
    pub fn committed_within(&self, window: std::time::Duration) -> bool {
        let at = self.last_commit_ms.load(Ordering::Relaxed);
        at != u64::MAX
            && (self.origin.elapsed().as_millis() as u64)
                <= at.saturating_add(window.as_millis() as u64)
    }

    /// Why statements to the host are not sent, while it is unresponsive.
    pub fn reason_unresponsive(&self) -> String {
        if self.is_confirmed_unresponsive() {
            format!("{} did not answer the probe twice in a row", self.name)
        } else {
            format!("{} stopped answering the probe's heartbeat", self.name)
        }
    }

    /// Whether the host is not answering, by either sign: statements there are answered
    /// by bulkhead, not sent.
    pub fn is_unresponsive(&self) -> bool {
        self.is_beat_silent() || self.is_confirmed_unresponsive()
    }

    /// Whether the probe's status checks confirmed it (two in a row got no answer): then
    /// even a session with a commit in flight is ended rather than left waiting.
    pub fn is_confirmed_unresponsive(&self) -> bool {
        self.unresponsive.load(Ordering::Relaxed)
    }

    /// Records what the status checks found: a host that stops answering, or answers again,
    /// raises the alarm.
    pub fn set_unresponsive(&self, unresponsive: bool) {
        if self.unresponsive.swap(unresponsive, Ordering::Relaxed) != unresponsive {
            if unresponsive {
                warn!(backend = %self.name, "host not answering the probe's status checks: statements stuck there are answered now");
            } else {
                warn!(backend = %self.name, "host answers the probe's status checks again");
            }
            self.changed_answering();
        }
    }

    /// Whether the heartbeat is waiting for an answer past its timeout now.
    pub fn is_beat_silent(&self) -> bool {
        self.beat_silent.load(Ordering::Relaxed)
    }

    /// Records what the heartbeat found, likewise.
    pub fn set_beat_silent(&self, silent: bool) {
        if self.beat_silent.swap(silent, Ordering::Relaxed) != silent {
            if silent {
                warn!(backend = %self.name, "host stopped answering the probe's heartbeat: statements waiting there are answered now");
            } else {
                info!(backend = %self.name, "host answers the probe's heartbeat again");
            }
            self.changed_answering();
        }
    }

    fn changed_answering(&self) {
        self.unresponsive_gauge
            .set(if self.is_unresponsive() { 1.0 } else { 0.0 });
        // Sessions there look at what they have in flight, or follow the host again.
        self.raise_alarm();
    }

    /// Follows the host's alarm (see [`Circuit::raise_alarm`]).
    pub fn watch_alarm(&self) -> watch::Receiver<u64> {
        self.alarm.subscribe()
    }

    /// Tells every session on the host to look at what it has in flight there: the circuit
    /// opened, or the host stopped answering.
    pub fn raise_alarm(&self) {
        self.alarm.send_modify(|n| *n += 1);
    }

    /// Whether the circuit is anything but closed, or the host is not answering: then
    /// statements must be decided with care. Two relaxed atomic loads.
    pub fn is_troubled(&self) -> bool {
        self.state.load(Ordering::Relaxed) != State::Closed.as_u8() || self.is_unresponsive()
    }

    pub fn decide(&self, s: &Settings, commits: bool) -> Decision {
        if self.state.load(Ordering::Relaxed) == State::Closed.as_u8() {
            return Decision::Allow;
        }
        self.with(|b, now| b.decide(now, s, commits), s)
    }

    pub fn success(&self, s: &Settings, how: Success) {
        if self.state.load(Ordering::Relaxed) == State::Closed.as_u8()
            && !self.dirty.load(Ordering::Relaxed)
        {
            return;
        }
        self.with(|b, now| b.success(now, s, how), s);
    }

    pub fn failure(&self, s: &Settings, why: &str) {
        tracing::debug!(backend = %self.name, why, "write failure counted");
        // Failures while open count for nothing; keep the reason that opened it.
        if self.published() != State::Open {
            let mut reason = self.reason.lock().unwrap_or_else(|e| e.into_inner());
            reason.clear();
            reason.push_str(why);
        }
        self.with(|b, now| b.failure(now, s), s);
    }

    /// The last failure counted: why the circuit opened, while it is not closed.
    pub fn reason(&self) -> String {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The state as last published, read without the lock (for the health port). An open
    /// circuit whose time is up shows as open until the next write or probe touches it.
    pub fn published(&self) -> State {
        match self.state.load(Ordering::Relaxed) {
            0 => State::Closed,
            1 => State::HalfOpen,
            _ => State::Open,
        }
    }

    /// The state now, for health reports.
    pub fn state(&self, s: &Settings) -> State {
        self.with(|b, now| b.state(now, s), s)
    }

    /// Runs `f` on the breaker under the lock; logs and publishes a change of state once.
    fn with<T>(&self, f: impl FnOnce(&mut Breaker, Instant) -> T, s: &Settings) -> T {
        let mut b = self.breaker.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        // What was last published, not `b.state(now)`: that would already have moved an open
        // circuit whose time is up to half-open, and the change would go unlogged and unshown.
        let before = self.published();
        let out = f(&mut b, now);
        let after = b.state(now, s);
        self.dirty.store(b.failures() > 0, Ordering::Relaxed);
        if before != after {
            self.state.store(after.as_u8(), Ordering::Relaxed);
            self.gauge.set(after.gauge());
            match after {
                State::Open => {
                    let why = self.reason();
                    warn!(backend = %self.name, open_for = ?s.open_for, why, "write circuit opened: writes are refused");
                    self.openings.increment(1);
                    self.raise_alarm();
                }
                State::HalfOpen => {
                    warn!(backend = %self.name, "write circuit half-open: the next confirmed commit or write check closes it")
                }
                State::Closed => {
                    warn!(backend = %self.name, "write circuit closed: writes flow again")
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Settings = Settings {
        failure_threshold: 3,
        open_for: Duration::from_secs(5),
        trial_timeout: Duration::from_secs(2),
    };

    #[tokio::test(start_paused = true)]
    async fn opens_after_threshold_consecutive_failures_and_a_success_resets_the_count() {
        let mut b = Breaker::new(Instant::now());
        let now = Instant::now();
        b.failure(now, &S);
        b.failure(now, &S);
        b.success(now, &S, Success::Commit);
        b.failure(now, &S);
        b.failure(now, &S);
        assert_eq!(b.decide(now, &S, true), Decision::Allow);
        b.failure(now, &S);
        assert_eq!(
            b.decide(now, &S, true),
            Decision::Refuse {
                retry_at: now + S.open_for
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn half_opens_after_open_for_and_one_trial_closes_it() {
        let mut b = Breaker::new(Instant::now());
        for _ in 0..3 {
            b.failure(Instant::now(), &S);
        }
        tokio::time::advance(Duration::from_millis(4999)).await;
        assert_eq!(b.state(Instant::now(), &S), State::Open);
        tokio::time::advance(Duration::from_millis(1)).await;
        let now = Instant::now();
        assert_eq!(b.state(now, &S), State::HalfOpen);
        assert!(
            matches!(b.decide(now, &S, false), Decision::Refuse { .. }),
            "a write inside a transaction is never the trial"
        );
        assert_eq!(b.decide(now, &S, true), Decision::Trial);
        assert!(
            matches!(b.decide(now, &S, true), Decision::Refuse { .. }),
            "one trial at a time"
        );
        b.success(now, &S, Success::Commit);
        assert_eq!(
            b.state(now, &S),
            State::HalfOpen,
            "a commit that is not the trial proves little"
        );
        b.success(now, &S, Success::Trial);
        assert_eq!(b.state(now, &S), State::Closed);
        assert_eq!(b.decide(now, &S, true), Decision::Allow);
    }

    #[tokio::test(start_paused = true)]
    async fn failed_trial_opens_again_for_a_full_period() {
        let mut b = Breaker::new(Instant::now());
        for _ in 0..3 {
            b.failure(Instant::now(), &S);
        }
        tokio::time::advance(S.open_for).await;
        assert_eq!(b.decide(Instant::now(), &S, true), Decision::Trial);
        tokio::time::advance(Duration::from_millis(300)).await;
        b.failure(Instant::now(), &S);
        let reopened = Instant::now();
        assert_eq!(
            b.decide(reopened, &S, true),
            Decision::Refuse {
                retry_at: reopened + S.open_for
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn lost_trial_stops_blocking_after_the_trial_timeout() {
        let mut b = Breaker::new(Instant::now());
        for _ in 0..3 {
            b.failure(Instant::now(), &S);
        }
        tokio::time::advance(S.open_for).await;
        assert_eq!(b.decide(Instant::now(), &S, true), Decision::Trial);
        tokio::time::advance(S.trial_timeout).await;
        assert_eq!(b.decide(Instant::now(), &S, true), Decision::Trial);
    }

    #[tokio::test(start_paused = true)]
    async fn only_a_write_check_begun_after_the_opening_closes_an_open_circuit() {
        let mut b = Breaker::new(Instant::now());
        let before = Instant::now();
        tokio::time::advance(Duration::from_millis(10)).await;
        for _ in 0..3 {
            b.failure(Instant::now(), &S);
        }
        b.success(Instant::now(), &S, Success::Check { started: before });
        b.success(Instant::now(), &S, Success::Commit);
        assert_eq!(
            b.state(Instant::now(), &S),
            State::Open,
            "a check begun before the opening, or a client's commit, proves little"
        );
        tokio::time::advance(Duration::from_millis(10)).await;
        let after = Instant::now();
        tokio::time::advance(Duration::from_millis(10)).await;
        b.success(Instant::now(), &S, Success::Check { started: after });
        assert_eq!(b.state(Instant::now(), &S), State::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_check_closes_a_half_open_circuit() {
        let mut b = Breaker::new(Instant::now());
        let before = Instant::now();
        for _ in 0..3 {
            b.failure(Instant::now(), &S);
        }
        tokio::time::advance(S.open_for).await;
        b.success(Instant::now(), &S, Success::Check { started: before });
        assert_eq!(b.state(Instant::now(), &S), State::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn shared_circuit_publishes_half_open_when_open_for_is_over() {
        let m = crate::metrics::Metrics::new();
        let c = Circuit::new("db:5432".into(), &m);
        for _ in 0..3 {
            c.failure(&S, "stalled");
        }
        tokio::time::advance(S.open_for).await;
        assert_eq!(c.state(&S), State::HalfOpen);
        assert_eq!(c.published(), State::HalfOpen);
        assert!(
            m.render()
                .contains("bulkhead_circuit_state{backend=\"db:5432\"} 1")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn shared_circuit_publishes_its_state() {
        let m = crate::metrics::Metrics::new();
        let c = Circuit::new("db:5432".into(), &m);
        assert_eq!(c.decide(&S, true), Decision::Allow);
        let alarm = c.watch_alarm();
        c.failure(&S, "first");
        c.failure(&S, "second");
        c.failure(&S, "third, which opens it");
        c.failure(&S, "one while open, which counts for nothing");
        assert_eq!(c.reason(), "third, which opens it");
        assert!(matches!(c.decide(&S, true), Decision::Refuse { .. }));
        assert!(
            m.render()
                .contains("bulkhead_circuit_state{backend=\"db:5432\"} 2")
        );
        assert_eq!(*alarm.borrow(), 1, "the opening raised the alarm once");
        tokio::time::advance(S.open_for).await;
        c.success(&S, Success::Trial);
        assert_eq!(c.state(&S), State::Closed);
        assert_eq!(c.decide(&S, true), Decision::Allow);
        assert!(
            m.render()
                .contains("bulkhead_circuit_state{backend=\"db:5432\"} 0")
        );
    }
}
