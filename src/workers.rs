//! The data path's threads: one single-threaded tokio runtime per worker (half the cores, or
//! `BULKHEAD_WORKERS`), each on its own OS thread with its own epoll and timers. A session is handed to the worker with the fewest
//! sessions when it is accepted and stays there, so its wake-ups never cross threads and no
//! worker ever wakes another to steal work (tokio's multi-threaded scheduler does both, and on
//! a small machine that cross-thread signalling costs more CPU than the relay itself).
//!
//! The probes and housekeeping stay on the runtime that calls [`crate::Bulkhead::serve`]; so
//! does the accept loop when there are several workers (with one, it runs on the worker: see
//! [`crate::accept`]).

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use std::cell::RefCell;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

use crate::evloop;

thread_local! {
    /// On a worker's thread: its relay loop, and its count of sessions.
    static RELAY_LOOP: RefCell<Option<(evloop::Spawner, Arc<AtomicUsize>)>> =
        const { RefCell::new(None) };
}

/// This worker's relay loop and session count, on a worker's thread with a relay loop.
pub(crate) fn relay_loop() -> Option<(evloop::Spawner, Arc<AtomicUsize>)> {
    RELAY_LOOP.with(|l| l.borrow().clone())
}

/// Whether workers relay passthrough sessions on relay loops: yes unless
/// `BULKHEAD_RELAY_LOOP=0` (for comparing with tokio's reactor).
pub(crate) fn relay_loops_on() -> bool {
    std::env::var("BULKHEAD_RELAY_LOOP").map_or(true, |v| v != "0")
}

/// How many workers to start: `BULKHEAD_WORKERS` if set, else half the cores this process may
/// use (at least one). A sidecar shares its node with the application it serves and with
/// PostgreSQL's clients; on two cores one worker costs less CPU per transaction than two (see
/// the README's benchmarks).
pub fn default_count() -> usize {
    std::env::var("BULKHEAD_WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n: &usize| n > 0)
        .unwrap_or_else(|| {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            (cores / 2).max(1)
        })
}

struct Worker {
    /// The worker's relay loop (stopped first: its sessions hold the runtime's timers).
    _relay_loop: Option<evloop::Handle>,
    handle: Handle,
    /// Sessions on this worker now.
    sessions: Arc<AtomicUsize>,
    /// Dropping it ends the worker's runtime, and every task still on it.
    _stop: oneshot::Sender<()>,
}

/// The running workers. Dropping this stops them.
pub struct Workers {
    workers: Vec<Worker>,
}

impl Workers {
    /// Starts `count` workers; `on_start(i)` runs on worker `i`'s runtime first (its heartbeat),
    /// and `on_start(count + i)` on its relay loop.
    pub fn start<F, Fut>(count: usize, on_start: F) -> io::Result<Workers>
    where
        F: Fn(usize) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let mut workers = Vec::with_capacity(count);
        for i in 0..count {
            // Sockets and timers only. `enable_all` would add the signal and process drivers,
            // whose every park also checks a queue of orphaned child processes behind a lock
            // that all runtimes in the process share; sessions need neither. (No difference in
            // CPU per transaction could be measured; it keeps a shared lock off the path.)
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .enable_time()
                .build()?;
            let handle = runtime.handle().clone();
            let (stop, stopped) = oneshot::channel::<()>();
            handle.spawn(on_start(i));
            let sessions = Arc::new(AtomicUsize::new(0));
            let relay_loop = relay_loops_on()
                .then(|| evloop::Handle::start(format!("bulkhead-relay-{i}"), handle.clone()))
                .transpose()?;
            if let Some(l) = &relay_loop {
                let beat = on_start(count + i);
                l.spawner().spawn(move || beat);
            }
            let here = relay_loop
                .as_ref()
                .map(|l| (l.spawner().clone(), sessions.clone()));
            std::thread::Builder::new()
                .name(format!("bulkhead-worker-{i}"))
                .spawn(move || {
                    RELAY_LOOP.with(|l| *l.borrow_mut() = here);
                    runtime.block_on(async {
                        let _ = stopped.await;
                    });
                    // Dropping the runtime here cancels the sessions still on it.
                })?;
            workers.push(Worker {
                _relay_loop: relay_loop,
                handle,
                sessions,
                _stop: stop,
            });
        }
        Ok(Workers { workers })
    }

    /// How many workers there are.
    pub fn count(&self) -> usize {
        self.workers.len()
    }

    /// Runs `task` on worker `i`'s runtime (not counted as a session).
    pub fn run_on<T: Send + 'static>(
        &self,
        i: usize,
        task: impl Future<Output = T> + Send + 'static,
    ) -> tokio::task::JoinHandle<T> {
        self.workers[i].handle.spawn(task)
    }

    /// Runs `session` on the least busy worker. A socket it uses must be moved there as a
    /// `std::net::TcpStream` registered with no reactor yet (the accept loop takes sockets so)
    /// and registered on arrival.
    pub fn spawn(&self, session: impl Future<Output = ()> + Send + 'static) {
        let worker = self
            .workers
            .iter()
            .min_by_key(|w| w.sessions.load(Ordering::Relaxed))
            .expect("at least one worker");
        worker
            .handle
            .spawn(counted(session, worker.sessions.clone()));
    }
}

/// What a worker runs for a session: the session, counted in `sessions` while it lives.
pub(crate) fn counted<F: Future<Output = ()>>(
    session: F,
    sessions: Arc<AtomicUsize>,
) -> impl Future<Output = ()> {
    sessions.fetch_add(1, Ordering::Relaxed);
    Counted {
        session,
        _count: Count(sessions),
    }
}

pin_project_lite::pin_project! {
    /// A session and its count on its worker. A struct rather than an `async` block around
    /// the session: such a block holds the session future twice (as captured, and as awaited),
    /// doubling what every idle session costs.
    struct Counted<F> {
        #[pin]
        session: F,
        _count: Count,
    }
}

impl<F: Future<Output = ()>> Future for Counted<F> {
    type Output = ();

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        self.project().session.poll(cx)
    }
}

/// Counts a session on its worker while it lives.
struct Count(Arc<AtomicUsize>);

impl Drop for Count {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
