//! Admission: how many clients may connect, and how many transactions may hold the database
//! at once (DESIGN.md §3.5).
//!
//! A session takes an "all" slot for its first statement and a write slot for its first write,
//! and keeps them until its transaction ends (an autocommit statement is a transaction of its
//! own). So a session inside a transaction never waits for a slot: it cannot be starved by
//! newcomers while it holds locks they are waiting on, and COMMIT always gets through. The
//! limits therefore bound concurrent transactions, as a pooler's pool size does; newcomers wait
//! first-come first-served up to queue_timeout and are then shed with 53400.
//!
//! Taking or giving back a slot is one atomic operation while nobody waits; a queue (and its
//! mutex) is used only when a limit is reached. Lowering a limit below what is in use is paid
//! off as slots are released.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::{Counter, Gauge};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::config::Limits;
use crate::metrics::Metrics;

/// One limit: a count of free slots that may go negative (a lowered limit is paid back as
/// slots are released), and a first-come first-served queue used only while someone waits.
/// Taking and giving back a slot are single atomic operations when nobody is queued; the
/// queue's mutex is taken only on the waiting path.
#[derive(Debug)]
pub struct Limit {
    /// Free slots; negative while more are held than a lowered limit allows.
    free: AtomicI64,
    /// The limit in force.
    limit: AtomicU32,
    /// Sessions queued for a slot. While any are, newcomers queue behind them.
    queued: AtomicU32,
    queue: Mutex<Queue>,
    limit_gauge: Gauge,
    /// Sum of latencies (µs) and count of statements since the controller last looked.
    latency_sum_us: AtomicU64,
    latency_count: AtomicU64,
}

/// A place in a limit's queue. Unless its slot was claimed, dropping it leaves the queue or,
/// if a slot was granted meanwhile, gives that slot back; both under the queue's lock, where
/// grants are made, so the two cannot be confused.
struct Ticket {
    limit: Arc<Limit>,
    id: u64,
    wait: oneshot::Receiver<()>,
    claimed: bool,
}

impl Ticket {
    fn enqueue(limit: Arc<Limit>) -> Self {
        let (granted, wait) = oneshot::channel();
        let mut q = limit.queue.lock().unwrap_or_else(|e| e.into_inner());
        q.next_id += 1;
        let id = q.next_id;
        q.waiters.push_back((id, granted));
        limit.queued.fetch_add(1, Ordering::SeqCst);
        drop(q);
        Ticket {
            limit,
            id,
            wait,
            claimed: false,
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.claimed {
            return;
        }
        let mut q = self.limit.queue.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(at) = q.waiters.iter().position(|(w, _)| *w == self.id) {
            q.waiters.remove(at);
            self.limit.queued.fetch_sub(1, Ordering::SeqCst);
        } else if self.wait.try_recv().is_ok() {
            drop(q);
            self.limit.release();
        }
    }
}

#[derive(Debug, Default)]
struct Queue {
    next_id: u64,
    waiters: VecDeque<(u64, oneshot::Sender<()>)>,
}

impl Limit {
    pub(crate) fn new(limit: u32, limit_gauge: Gauge) -> Self {
        limit_gauge.set(limit as f64);
        Limit {
            free: AtomicI64::new(limit as i64),
            limit: AtomicU32::new(limit),
            queued: AtomicU32::new(0),
            queue: Mutex::new(Queue::default()),
            limit_gauge,
            latency_sum_us: AtomicU64::new(0),
            latency_count: AtomicU64::new(0),
        }
    }

    /// Takes a slot if one is free and nobody is queued for one.
    pub fn try_acquire(&self) -> bool {
        if self.queued.load(Ordering::SeqCst) > 0 {
            return false;
        }
        self.take_free()
    }

    fn take_free(&self) -> bool {
        let mut free = self.free.load(Ordering::SeqCst);
        while free > 0 {
            match self.free.compare_exchange_weak(
                free,
                free - 1,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => return true,
                Err(now) => free = now,
            }
        }
        false
    }

    /// Waits for a slot, in turn, until `until`. True if one was granted. Dropping the future
    /// at any point loses nothing: it leaves the queue, or gives back a slot granted to it.
    pub fn acquire_until(
        self: &Arc<Self>,
        until: Instant,
    ) -> impl Future<Output = bool> + Send + 'static {
        let this = self.clone();
        async move {
            let mut ticket = Ticket::enqueue(this);
            // A slot freed between the failed try and joining the queue is handed over now.
            ticket.limit.hand_over();
            let granted = match tokio::time::timeout_at(until, &mut ticket.wait).await {
                Ok(result) => result.is_ok(),
                // Granted just as the wait ran out: the slot is ours all the same.
                Err(_) => ticket.wait.try_recv().is_ok(),
            };
            ticket.claimed = granted;
            granted
        }
    }

    /// Gives a slot back: to the first in the queue if anyone waits, else to the free count.
    pub fn release(&self) {
        self.free.fetch_add(1, Ordering::SeqCst);
        if self.queued.load(Ordering::SeqCst) > 0 {
            self.hand_over();
        }
    }

    /// Grants free slots to waiters, first come first served.
    fn hand_over(&self) {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        while !q.waiters.is_empty() && self.take_free() {
            let (_, granted) = q.waiters.pop_front().expect("not empty");
            self.queued.fetch_sub(1, Ordering::SeqCst);
            if granted.send(()).is_err() {
                // That waiter is gone; the slot goes back for the next one.
                self.free.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    /// Changes the limit; slots held above a lowered limit are paid back as they come back.
    pub fn set(&self, new: u32) {
        let old = self.limit.swap(new, Ordering::SeqCst);
        self.free
            .fetch_add(new as i64 - old as i64, Ordering::SeqCst);
        if new > old && self.queued.load(Ordering::SeqCst) > 0 {
            self.hand_over();
        }
        self.limit_gauge.set(new as f64);
    }

    pub fn limit(&self) -> u32 {
        self.limit.load(Ordering::Relaxed)
    }

    /// Waiting for a slot now.
    pub fn queued(&self) -> u32 {
        self.queued.load(Ordering::Relaxed)
    }

    /// Slots held now.
    pub fn held(&self) -> u32 {
        (self.limit() as i64 - self.free.load(Ordering::Relaxed)).max(0) as u32
    }

    /// Records a statement's latency for the adaptive controller.
    pub fn sample(&self, took: Duration) {
        self.latency_sum_us
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        self.latency_count.fetch_add(1, Ordering::Relaxed);
    }

    /// Mean latency since the last call, if any statement finished.
    fn take_mean(&self) -> Option<Duration> {
        let n = self.latency_count.swap(0, Ordering::Relaxed);
        let sum = self.latency_sum_us.swap(0, Ordering::Relaxed);
        (n > 0).then(|| Duration::from_micros(sum / n))
    }
}

/// Client count and the two statement limits of one proxy.
#[derive(Debug)]
pub struct Admission {
    clients: AtomicU32,
    max_clients: AtomicU32,
    /// Sessions the file descriptor limit allows (see `fds`); no limit unless set.
    descriptor_capacity: AtomicU32,
    pub all: Arc<Limit>,
    pub writes: Arc<Limit>,
    shed_clients: Counter,
    shed_all: Counter,
    shed_writes: Counter,
    shed_descriptors: Counter,
}

impl Admission {
    pub fn new(limits: &Limits, metrics: &Metrics) -> Self {
        Admission {
            clients: AtomicU32::new(0),
            max_clients: AtomicU32::new(limits.max_clients),
            descriptor_capacity: AtomicU32::new(u32::MAX),
            all: Arc::new(Limit::new(limits.max_inflight, metrics.read.limit.clone())),
            writes: Arc::new(Limit::new(
                limits.max_inflight_writes,
                metrics.write.limit.clone(),
            )),
            shed_clients: metrics.counter("bulkhead_shed_total", &[("reason", "max_clients")]),
            shed_all: metrics.counter("bulkhead_shed_total", &[("reason", "max_inflight")]),
            shed_writes: metrics
                .counter("bulkhead_shed_total", &[("reason", "max_inflight_writes")]),
            shed_descriptors: metrics
                .counter("bulkhead_shed_total", &[("reason", "file_descriptors")]),
        }
    }

    /// Caps clients at what the file descriptor limit allows, below max_clients if need be.
    pub fn limit_by_descriptors(&self, sessions: u32) {
        self.descriptor_capacity.store(sessions, Ordering::Relaxed);
    }

    /// The client limit in force: max_clients, or fewer if descriptors allow fewer.
    pub fn max_clients(&self) -> u32 {
        self.max_clients
            .load(Ordering::Relaxed)
            .min(self.descriptor_capacity.load(Ordering::Relaxed))
    }

    /// A client connected. False if that makes more than max_clients: refuse it.
    pub fn client_arrived(&self) -> bool {
        let before = self.clients.fetch_add(1, Ordering::Relaxed);
        let ok = before < self.max_clients();
        if !ok {
            self.shed_clients.increment(1);
        }
        ok
    }

    pub fn client_left(&self) {
        self.clients.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn clients(&self) -> u32 {
        self.clients.load(Ordering::Relaxed)
    }

    /// Counts a client refused because bulkhead had no file descriptor left for it.
    pub fn shed_for_descriptors(&self) {
        self.shed_descriptors.increment(1);
    }

    /// Counts a statement shed for want of a slot.
    pub fn shed(&self, write_slot: bool) {
        if write_slot {
            &self.shed_writes
        } else {
            &self.shed_all
        }
        .increment(1);
    }

    /// Applies reloaded limits. With adaptive limits the maxima move and the controller
    /// follows; otherwise the limits are set at once.
    pub fn configure(&self, limits: &Limits) {
        self.max_clients
            .store(limits.max_clients, Ordering::Relaxed);
        for (limit, max) in [
            (&self.all, limits.max_inflight),
            (&self.writes, limits.max_inflight_writes),
        ] {
            if !limits.adaptive || limit.limit() > max {
                limit.set(max);
            }
        }
    }
}

/// How far the fast latency average may run ahead of the slow one before it counts as overload.
const TOLERANCE: f64 = 2.0;

/// A gradient controller in the manner of Netflix's concurrency-limits (Gradient2): compares a
/// fast average of latency with a slow one. When latency rises beyond [`TOLERANCE`] times the
/// usual, the limit shrinks in proportion (at most halving per step); when it is steady the
/// limit grows by about its square root per step, up to the configured maximum. Never below
/// `floor`.
#[derive(Debug, Clone, PartialEq)]
pub struct Gradient {
    pub limit: f64,
    pub floor: f64,
    pub max: f64,
    short: Option<f64>,
    long: Option<f64>,
}

impl Gradient {
    pub fn new(max: u32) -> Self {
        let floor = (max as f64 / 8.0).clamp(1.0, 4.0);
        Gradient {
            limit: max as f64,
            floor,
            max: max as f64,
            short: None,
            long: None,
        }
    }

    /// Feeds one window's mean latency; returns the new limit.
    pub fn update(&mut self, mean: Duration) -> u32 {
        let x = mean.as_secs_f64().max(1e-6);
        let short = self.short.map_or(x, |s| s + 0.5 * (x - s));
        // The slow average follows rises slowly and falls quickly, so a recovery is seen at once.
        let long = self.long.map_or(x, |l| {
            if x < l {
                l + 0.5 * (x - l)
            } else {
                l + 0.05 * (x - l)
            }
        });
        self.short = Some(short);
        self.long = Some(long);
        // Tolerance, as in Gradient2: jitter up to twice the usual latency is not overload.
        let gradient = (TOLERANCE * long / short).clamp(0.5, 1.0);
        let headroom = if gradient >= 0.95 {
            self.limit.sqrt()
        } else {
            0.0
        };
        let target = self.limit * gradient + headroom;
        self.limit = (0.8 * self.limit + 0.2 * target).clamp(self.floor, self.max);
        if gradient >= 0.95 && target >= self.max {
            self.limit = self.max;
        }
        self.limit.round() as u32
    }

    pub fn set_max(&mut self, max: u32) {
        self.max = max as f64;
        self.limit = self.limit.min(self.max);
    }
}

/// How often the adaptive controller looks at latency.
pub const ADAPTIVE_WINDOW: Duration = Duration::from_millis(100);

/// Runs the adaptive controller for both limits until aborted. Limits come from `current`,
/// read every window so a reload of the maxima or of `adaptive` is followed.
pub async fn run_adaptive(
    admission: Arc<Admission>,
    current: impl Fn() -> Limits + Send + 'static,
) {
    let mut ticks = tokio::time::interval(ADAPTIVE_WINDOW);
    let first = current();
    let mut all = Gradient::new(first.max_inflight);
    let mut writes = Gradient::new(first.max_inflight_writes);
    loop {
        ticks.tick().await;
        let limits = current();
        if !limits.adaptive {
            continue;
        }
        all.set_max(limits.max_inflight);
        writes.set_max(limits.max_inflight_writes);
        for (limit, controller) in [(&admission.all, &mut all), (&admission.writes, &mut writes)] {
            if let Some(mean) = limit.take_mean() {
                let next = controller.update(mean);
                if next != limit.limit() {
                    limit.set(next);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(n: u32) -> Limit {
        Limit::new(n, Metrics::new().read.limit.clone())
    }

    #[tokio::test(start_paused = true)]
    async fn raising_the_limit_serves_a_waiter() {
        let l = Arc::new(limit(1));
        assert!(l.try_acquire());
        let waiter = tokio::spawn(l.acquire_until(Instant::now() + Duration::from_secs(1)));
        tokio::task::yield_now().await;
        l.set(2);
        assert!(waiter.await.unwrap());
        assert_eq!(l.held(), 2);
    }

    #[tokio::test]
    async fn a_wait_dropped_after_its_grant_gives_the_slot_back() {
        let l = Arc::new(limit(1));
        assert!(l.try_acquire());
        let mut wait = Box::pin(l.acquire_until(Instant::now() + Duration::from_secs(60)));
        assert!(futures_util::poll!(wait.as_mut()).is_pending(), "queued");
        l.release(); // granted to the waiter, which is never polled again
        drop(wait);
        assert_eq!(l.held(), 0, "the granted slot came back");
        assert!(l.try_acquire());
        // And one dropped while still queued leaves the queue.
        let mut wait = Box::pin(l.acquire_until(Instant::now() + Duration::from_secs(60)));
        assert!(futures_util::poll!(wait.as_mut()).is_pending());
        drop(wait);
        l.release();
        assert!(l.try_acquire(), "no stale waiter took the slot");
    }

    #[test]
    fn slots_run_out_and_come_back() {
        let l = limit(2);
        assert!(l.try_acquire());
        assert!(l.try_acquire());
        assert!(!l.try_acquire());
        l.release();
        assert!(l.try_acquire());
        assert_eq!(l.held(), 2);
    }

    #[test]
    fn lowering_below_use_is_paid_off_on_release() {
        let l = limit(4);
        for _ in 0..4 {
            assert!(l.try_acquire());
        }
        l.set(2);
        l.release();
        l.release();
        assert!(!l.try_acquire(), "two still held, limit two");
        l.release();
        assert!(l.try_acquire());
        assert!(!l.try_acquire());
        l.set(3);
        assert!(l.try_acquire());
        assert!(!l.try_acquire());
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_are_served_in_turn_and_time_out() {
        let l = Arc::new(limit(1));
        assert!(l.try_acquire());
        let until = Instant::now() + Duration::from_millis(100);
        let first = tokio::spawn(l.acquire_until(until));
        let second = tokio::spawn(l.acquire_until(until));
        tokio::task::yield_now().await;
        assert!(!l.try_acquire(), "a newcomer does not jump the queue");
        l.release();
        assert!(first.await.unwrap());
        assert!(!second.await.unwrap(), "timed out at queue_timeout");
    }

    #[test]
    fn gradient_falls_when_latency_rises_and_recovers_after() {
        let mut g = Gradient::new(32);
        for _ in 0..20 {
            assert_eq!(g.update(Duration::from_millis(2)), 32);
        }
        let mut low = 32;
        for _ in 0..10 {
            low = g.update(Duration::from_millis(50));
        }
        assert!(low < 16, "limit fell to {low}");
        assert!(low >= 4, "never below the floor");
        let mut back = low;
        for _ in 0..40 {
            back = g.update(Duration::from_millis(2));
        }
        assert_eq!(back, 32, "limit recovered to the maximum");
    }

    #[test]
    fn gradient_never_exceeds_a_lowered_maximum() {
        let mut g = Gradient::new(32);
        g.set_max(10);
        for _ in 0..5 {
            assert!(g.update(Duration::from_millis(1)) <= 10);
        }
    }

    #[test]
    fn max_clients_counts_and_sheds() {
        let m = Metrics::new();
        let limits = Limits {
            max_clients: 2,
            ..Limits::default()
        };
        let a = Admission::new(&limits, &m);
        assert!(a.client_arrived());
        assert!(a.client_arrived());
        assert!(!a.client_arrived());
        a.client_left();
        a.client_left();
        assert!(a.client_arrived());
        assert!(
            m.render()
                .contains("bulkhead_shed_total{reason=\"max_clients\"} 1")
        );
    }
}
