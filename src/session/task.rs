//! A session's task from its relay on: one hand-written future that polls the relay and,
//! when the relay ends, the farewell.
//!
//! Every wake-up of a session goes through this future, so it is as flat as it can be: the
//! task polls [`Session`], which polls the relay's pass (`Relay::poll_relay`, inlined) with
//! the wakers that tell it which source woke it. The watches (phase, primary, the host's alarm,
//! the readers) are futures of their own, boxed and owned, so that nothing borrows from the
//! task's state across wake-ups and no `async` state machine sits between the task and the
//! relay (three of them did: each wake-up resumed through their jump tables and frames).

use std::future::Future;
use std::hint::cold_path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use tokio::sync::watch;
use tracing::info;

use super::{End, Relay, Relayed};
use crate::{Phase, Shared};

/// Which of a session's sources woke its task since the relay last looked: one bit each.
#[derive(Default)]
struct Woke {
    bits: AtomicU8,
}

/// The watches (phase, primary, the host's alarm, the readers) and the session timer.
pub(super) const WATCHES: u8 = 1;
/// The client's socket (readable, or writable again).
pub(super) const CLIENT: u8 = 2;
/// The server's socket.
pub(super) const SERVER: u8 = 4;
/// Every source: after anything happened, the relay looks at each once more.
const ALL: u8 = WATCHES | CLIENT | SERVER;

/// Wakes a session's task and records which source woke it.
struct BitWaker {
    woke: Arc<Woke>,
    bit: u8,
    /// The task's own waker, woken by reference: kept for as long as the task's waker stays
    /// the same, so a wake-up neither takes it nor clones it.
    task: Waker,
}

impl Wake for BitWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woke.bits.fetch_or(self.bit, Ordering::Release);
        self.task.wake_by_ref();
    }
}

/// The wakers a session polls its sources with, so that it knows which of them woke it and
/// polls only those: polling one that did not (a watch: its lock; a socket: the readiness
/// machinery) costs about as much as relaying a message.
pub(super) struct Wakers {
    pub(super) watches: Waker,
    pub(super) client: Waker,
    pub(super) server: Waker,
    /// The task's waker they wake.
    task: Waker,
}

impl Wakers {
    fn new(woke: &Arc<Woke>, task: &Waker) -> Self {
        let waker = |bit| {
            Waker::from(Arc::new(BitWaker {
                woke: woke.clone(),
                bit,
                task: task.clone(),
            }))
        };
        Wakers {
            watches: waker(WATCHES),
            client: waker(CLIENT),
            server: waker(SERVER),
            task: task.clone(),
        }
    }
}

/// A watch's next change, owned: it hands the receiver back with whether the sender is
/// still there. Made again after each change (a watch changes a few times in a session's
/// life, if ever).
type Changed<T> = Pin<Box<dyn Future<Output = (bool, watch::Receiver<T>)> + Send>>;

fn changed<T: Send + Sync + 'static>(mut rx: watch::Receiver<T>) -> Changed<T> {
    Box::pin(async move {
        let open = rx.changed().await.is_ok();
        (open, rx)
    })
}

/// What woke a session's relay, as far as it must act on it.
enum Event {
    /// The phase changed (`Closing` too when its sender is gone).
    Phase(Phase),
    /// The primary changed.
    Primary,
    /// The standbys that take reads changed (read-only sessions only).
    Readers,
    /// The host's alarm: its write circuit opened, or it stopped answering.
    Alarm,
    End(End),
}

/// The watches a session follows, each with the value it last saw. A watch whose sender is
/// gone is `None`.
struct Watches {
    phase: Changed<Phase>,
    primary: Option<Changed<Option<crate::probe::Primary>>>,
    primary_now: Option<usize>,
    alarm: Option<Changed<u64>>,
    /// The host whose alarm `alarm` follows: transaction pooling moves a session between
    /// hosts' connections.
    alarm_host: usize,
    /// Read-only sessions follow which hosts take reads; others never look.
    readers: Option<Changed<u64>>,
    readers_now: u64,
}

impl Watches {
    /// The watches, their current values seen; `Err(End::Closing)` if bulkhead no longer runs.
    fn new(relay: &Relay, shared: &Shared) -> Result<Self, End> {
        let mut phase = shared.phase.clone();
        if *phase.borrow_and_update() != Phase::Running {
            return Err(End::Closing);
        }
        let mut primary = shared.topology.watch_primary();
        let primary_now = primary.borrow_and_update().as_ref().map(|p| p.index);
        let (readers, readers_now) = if relay.readonly {
            let mut readers = shared.topology.watch_readers();
            let now = *readers.borrow_and_update();
            (Some(changed(readers)), now)
        } else {
            (None, 0)
        };
        Ok(Watches {
            phase: changed(phase),
            primary: Some(changed(primary)),
            primary_now,
            alarm: Some(Self::alarm_of(relay.host, shared)),
            alarm_host: relay.host,
            readers,
            readers_now,
        })
    }

    fn alarm_of(host: usize, shared: &Shared) -> Changed<u64> {
        let mut alarm = shared.topology.circuit(host).watch_alarm();
        alarm.borrow_and_update();
        changed(alarm)
    }

    /// The first watch that changed, its new value seen; each polled with `waker`.
    #[inline(never)]
    fn poll(&mut self, waker: &Waker) -> Option<Event> {
        let cx = &mut Context::from_waker(waker);
        if let Poll::Ready((open, mut rx)) = self.phase.as_mut().poll(cx) {
            let now = if open {
                *rx.borrow_and_update()
            } else {
                Phase::Closing
            };
            self.phase = changed(rx);
            return Some(Event::Phase(now));
        }
        if let Some(primary) = &mut self.primary
            && let Poll::Ready((open, mut rx)) = primary.as_mut().poll(cx)
        {
            if open {
                self.primary_now = rx.borrow_and_update().as_ref().map(|p| p.index);
                self.primary = Some(changed(rx));
                return Some(Event::Primary);
            }
            self.primary = None;
        }
        if let Some(alarm) = &mut self.alarm
            && let Poll::Ready((open, rx)) = alarm.as_mut().poll(cx)
        {
            if open {
                self.alarm = Some(changed(rx));
                return Some(Event::Alarm);
            }
            self.alarm = None;
        }
        if let Some(readers) = &mut self.readers
            && let Poll::Ready((open, mut rx)) = readers.as_mut().poll(cx)
        {
            if open {
                self.readers_now = *rx.borrow_and_update();
                self.readers = Some(changed(rx));
                return Some(Event::Readers);
            }
            self.readers = None;
        }
        None
    }

    /// Follows the alarm of the host the session is on now.
    #[inline(never)]
    fn follow_alarm(&mut self, host: usize, shared: &Shared) {
        self.alarm = Some(Self::alarm_of(host, shared));
        self.alarm_host = host;
    }
}

/// The relay's side of the task: the watches and the wakers.
struct Running {
    watches: Watches,
    woke: Arc<Woke>,
    /// Made at the first poll, with the task's waker.
    wakers: Option<Wakers>,
}

impl Running {
    /// Relays until the session has to end, and says why.
    ///
    /// The watches are polled only after they woke the session: polling a waiting watch takes
    /// its lock, which every session shares, and the relay wakes the task for every message.
    /// Likewise each socket is read only after it woke the session.
    #[inline(always)]
    fn poll(&mut self, relay: &mut Relay, shared: &Shared, cx: &mut Context<'_>) -> Poll<End> {
        let Running {
            watches,
            woke,
            wakers,
        } = self;
        let mut bits = woke.bits.swap(0, Ordering::AcqRel);
        let wakers = match wakers {
            Some(w) if w.task.will_wake(cx.waker()) => w,
            w => {
                // New (or a new task waker): every source is polled again, so each holds a
                // waker that wakes this one.
                cold_path();
                bits = ALL;
                w.insert(Wakers::new(woke, cx.waker()))
            }
        };
        loop {
            let event = if bits & WATCHES != 0
                && let Some(event) = watches.poll(&wakers.watches)
            {
                event
            } else {
                let polled = relay.poll_relay(cx, wakers, bits, shared);
                relay.publish();
                match polled {
                    Poll::Pending if watches.alarm_host == relay.host => return Poll::Pending,
                    Poll::Pending => {
                        // Transaction pooling moved the session to another host's connection
                        // (and nothing may wake it until its statement there is answered): it
                        // follows that host's alarm from now on, whose future is polled at
                        // once so that it holds the watches' waker.
                        cold_path();
                        watches.follow_alarm(relay.host, shared);
                        bits = WATCHES;
                        continue;
                    }
                    Poll::Ready(end) => Event::End(end),
                }
            };
            if let Err(end) = relay.on_event(event, watches, shared) {
                return Poll::Ready(end);
            }
            // Whatever happened, look at every source once more.
            bits = ALL;
        }
    }
}

impl Relay {
    /// Acts on what woke the relay: ends the session (`Err`), or lets it go on.
    #[inline(never)]
    fn on_event(&mut self, event: Event, watches: &Watches, shared: &Shared) -> Result<(), End> {
        match event {
            Event::Phase(Phase::Running) => {}
            Event::Phase(Phase::Draining) if self.is_quiet() => return Err(End::Drained),
            Event::Phase(Phase::Draining) => self.leave_when_quiet = Some(|| End::Drained),
            Event::Phase(Phase::Closing) => return Err(End::Closing),
            Event::Primary | Event::Readers if self.readonly => {
                if let Some(l) = self.lending.as_deref_mut() {
                    l.primary = watches.primary_now;
                    l.readers = watches.readers_now;
                    if l.per_transaction && l.pinned.is_none() {
                        // Its next transaction goes to a host that takes reads; the one it
                        // holds is closed, not returned, if its host no longer does.
                        l.retire |= self.server.is_some() && !l.host_ok(self.host);
                        return Ok(());
                    }
                }
                if !shared.topology.serves_reads(self.host) {
                    info!(parent: &self.span, "this host no longer takes read-only sessions; the session ends at its next quiet point");
                    if self.is_quiet() {
                        return Err(End::Unreadable);
                    }
                    self.leave_when_quiet = Some(|| End::Unreadable);
                }
            }
            Event::Readers => {}
            Event::Primary => {
                // Another host is primary now: this session's server takes no more writes.
                // (No primary at all is a failover in progress; the session ends on its own
                // if its server is gone.)
                let now_primary = watches.primary_now;
                let replaced = now_primary.is_some_and(|index| index != self.host);
                if let Some(l) = self.lending.as_deref_mut() {
                    l.primary = now_primary;
                    // The pooled connection must not go back to the pool.
                    l.retire |= replaced && self.server.is_some();
                    if l.per_transaction && l.pinned.is_none() {
                        // The next transaction gets a connection to the new primary.
                        return Ok(());
                    }
                }
                if replaced {
                    info!(parent: &self.span, "primary replaced; the session ends when its transaction does");
                    if self.is_quiet() {
                        return Err(End::Demoted);
                    }
                    self.leave_when_quiet = Some(|| End::Demoted);
                }
            }
            Event::Alarm => {
                if let Some(end) = self.on_alarm(shared) {
                    self.survive(shared, end)?;
                }
            }
            // Transaction pooling: the client stays; its next transaction gets another
            // server connection.
            Event::End(end) => self.survive(shared, end)?,
        }
        Ok(())
    }
}

/// A session from its relay on, as one future: the relay, then the farewell.
pub(super) struct Session {
    stage: Stage,
}

enum Stage {
    Relaying(Box<Relayed>, Running),
    Farewell(Pin<Box<dyn Future<Output = ()> + Send>>),
    Done,
}

impl Session {
    pub(super) fn new(relayed: Box<Relayed>) -> Self {
        let stage = match Watches::new(&relayed.relay, &relayed.shared) {
            Ok(watches) => Stage::Relaying(
                relayed,
                Running {
                    watches,
                    woke: Arc::default(),
                    wakers: None,
                },
            ),
            Err(end) => Stage::Farewell(relayed.farewell(end)),
        };
        Session { stage }
    }

    /// A session that has nothing left to do.
    pub(super) fn done() -> Self {
        Session { stage: Stage::Done }
    }

    /// The relay ended: the farewell follows.
    #[inline(never)]
    fn ended(&mut self, end: End) {
        if let Stage::Relaying(relayed, _) = std::mem::replace(&mut self.stage, Stage::Done) {
            self.stage = Stage::Farewell(relayed.farewell(end));
        }
    }

    #[inline(never)]
    fn poll_farewell(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if let Stage::Farewell(farewell) = &mut self.stage {
            std::task::ready!(farewell.as_mut().poll(cx));
        }
        self.stage = Stage::Done;
        Poll::Ready(())
    }
}

impl Future for Session {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if let Stage::Relaying(relayed, running) = &mut this.stage {
            let Relayed { shared, relay, .. } = &mut **relayed;
            match running.poll(relay, shared, cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(end) => this.ended(end),
            }
        }
        this.poll_farewell(cx)
    }
}
