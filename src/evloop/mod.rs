//! The relay's own event loop: one thread per worker that drives passthrough sessions once
//! their sockets are plain and their login has been handed to the server (issue 20's
//! passthrough CPU target).
//!
//! Why not tokio: per relayed transaction, tokio's reactor and scheduler cost about as many
//! instructions as PgBouncer spends in all (readiness bits checked and cleared through
//! `Registration`, a waker stored behind a lock per wait, a task state machine and a
//! cooperative budget per poll; see the README's "Passthrough CPU"). This loop keeps only
//! what a relay needs: `epoll` (through mio) with each socket registered once for its life,
//! edge-triggered; a readiness byte and two wakers per socket; a queue of task numbers. A
//! task's waker, woken on the loop's own thread, pushes the task's number onto that queue;
//! woken from another thread (a watch, a semaphore, tokio's timer) it queues the number
//! behind a lock and wakes the loop through an eventfd.
//!
//! Everything else a session touches stays tokio's: the thread runs inside its worker's tokio
//! context (`Handle::enter`), so timers, spawned tasks and the odd connection (a cancel
//! request) work as on the worker, driven by the worker's runtime on its own thread.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::JoinHandle;

use mio::{Events, Token};

mod socket;

pub use socket::Socket;
use socket::dispatch;

/// The eventfd's token; sockets' tokens are a slot number and a generation.
const WAKE: Token = Token(usize::MAX);

/// How many operations a socket that never runs dry may make before its task must let others
/// run (what tokio's cooperative budget does for its tasks).
const BUDGET: u32 = 128;

/// Makes a session's future on the loop's thread (where its sockets are registered).
type Job = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()>>> + Send>;

/// What other threads share with a loop.
struct Shared {
    waker: mio::Waker,
    inbox: Mutex<Inbox>,
    stop: AtomicBool,
}

#[derive(Default)]
struct Inbox {
    jobs: Vec<Job>,
    woken: Vec<usize>,
    /// The eventfd has been written since the loop last emptied the inbox.
    signalled: bool,
}

impl Shared {
    fn post(&self, put: impl FnOnce(&mut Inbox)) {
        let mut inbox = self.inbox.lock().unwrap_or_else(|p| p.into_inner());
        put(&mut inbox);
        if !inbox.signalled {
            inbox.signalled = true;
            if let Err(e) = self.waker.wake() {
                tracing::error!(error = %e, "cannot wake a relay loop");
            }
        }
    }
}

/// A running loop; dropping it stops the loop (its sessions are dropped on its thread) and
/// waits for the thread.
pub struct Handle {
    spawner: Spawner,
    thread: Option<JoinHandle<()>>,
}

/// Hands sessions to a loop, from any thread.
#[derive(Clone)]
pub struct Spawner {
    shared: Arc<Shared>,
}

impl Handle {
    /// Starts a loop on a thread named `name`, inside the tokio context of `tokio`.
    pub fn start(name: String, tokio: tokio::runtime::Handle) -> io::Result<Handle> {
        let poll = mio::Poll::new()?;
        let registry = poll.registry().try_clone()?;
        let shared = Arc::new(Shared {
            waker: mio::Waker::new(poll.registry(), WAKE)?,
            inbox: Mutex::new(Inbox::default()),
            stop: AtomicBool::new(false),
        });
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new().name(name).spawn(move || {
                let _tokio = tokio.enter();
                Loop::new(shared, poll, registry).run();
            })?
        };
        Ok(Handle {
            spawner: Spawner { shared },
            thread: Some(thread),
        })
    }

    pub fn spawner(&self) -> &Spawner {
        &self.spawner
    }
}

impl Spawner {
    /// Runs the future `make` returns on the loop; `make` runs there, so the sockets it
    /// attaches (`Socket::attach`) are registered with this loop.
    pub fn spawn<F, M>(&self, make: M)
    where
        M: FnOnce() -> F + Send + 'static,
        F: Future<Output = ()> + 'static,
    {
        let job: Job = Box::new(move || Box::pin(make()));
        self.shared.post(|inbox| inbox.jobs.push(job));
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        let shared = &self.spawner.shared;
        shared.stop.store(true, Ordering::Release);
        shared.post(|_| {});
        if let Some(thread) = self.thread.take()
            && thread.thread().id() != std::thread::current().id()
        {
            let _ = thread.join();
        }
    }
}

/// A task's waker: its number on its loop.
struct TaskWaker {
    id: usize,
    /// Queued to run and not yet polled: further wake-ups need not queue it again.
    queued: AtomicBool,
    shared: Arc<Shared>,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if self.queued.swap(true, Ordering::AcqRel) {
            return;
        }
        let here = LOCAL.with(|l| {
            if std::ptr::eq(l.shared.get(), Arc::as_ptr(&self.shared)) {
                l.ready.borrow_mut().push_back(self.id);
                true
            } else {
                false
            }
        });
        if !here {
            self.shared.post(|inbox| inbox.woken.push(self.id));
        }
    }
}

struct Task {
    future: Pin<Box<dyn Future<Output = ()>>>,
    waker: Arc<TaskWaker>,
    /// `waker` as a `Waker`, made once.
    handle: Waker,
}

/// The loop's state its sockets and wakers reach through the thread: which loop runs here,
/// the tasks ready to run, the socket registrations.
struct Local {
    shared: Cell<*const Shared>,
    ready: RefCell<VecDeque<usize>>,
    sockets: RefCell<Option<socket::Registrations>>,
}

thread_local! {
    static LOCAL: Local = const {
        Local {
            shared: Cell::new(std::ptr::null()),
            ready: RefCell::new(VecDeque::new()),
            sockets: RefCell::new(None),
        }
    };
}

struct Loop {
    shared: Arc<Shared>,
    poll: mio::Poll,
    /// The tasks of this round (swapped with the ready queue).
    running: RefCell<VecDeque<usize>>,
    /// Task numbers woken from other threads, swapped with the inbox's list.
    woken: Vec<usize>,
    tasks: Vec<Option<Task>>,
    free: Vec<usize>,
}

impl Loop {
    fn new(shared: Arc<Shared>, poll: mio::Poll, registry: mio::Registry) -> Loop {
        LOCAL.with(|l| {
            l.shared.set(Arc::as_ptr(&shared));
            *l.sockets.borrow_mut() = Some(socket::Registrations::new(registry));
        });
        Loop {
            shared,
            poll,
            running: RefCell::new(VecDeque::new()),
            woken: Vec::new(),
            tasks: Vec::new(),
            free: Vec::new(),
        }
    }

    fn run(mut self) {
        let mut events = Events::with_capacity(256);
        loop {
            // The tasks ready now; those they wake run after the next look at the sockets.
            LOCAL.with(|l| l.ready.swap(&self.running));
            let mut running = self.running.take();
            for id in running.drain(..) {
                self.poll_task(id);
            }
            // Kept for its capacity.
            *self.running.borrow_mut() = running;
            if self.shared.stop.load(Ordering::Acquire) {
                break;
            }
            let idle = LOCAL.with(|l| l.ready.borrow().is_empty());
            let timeout = (!idle).then_some(std::time::Duration::ZERO);
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!(error = %e, "a relay loop cannot wait for its sockets");
                break;
            }
            let posted = LOCAL.with(|l| {
                let sockets = l.sockets.borrow();
                let mut posted = false;
                for event in &events {
                    match sockets.as_ref() {
                        _ if event.token() == WAKE => posted = true,
                        Some(sockets) => dispatch(sockets, event),
                        None => {}
                    }
                }
                posted
            });
            if posted {
                self.take_inbox();
            }
        }
        // Sessions are dropped here, on the thread their sockets are registered on.
        self.tasks.clear();
        LOCAL.with(|l| {
            l.ready.borrow_mut().clear();
            l.shared.set(std::ptr::null());
        });
    }

    fn take_inbox(&mut self) {
        let jobs = {
            let mut inbox = self.shared.inbox.lock().unwrap_or_else(|p| p.into_inner());
            inbox.signalled = false;
            // Swapped, not taken: both lists keep their room, so a wake-up from another thread
            // (a timer, a watch) allocates nothing.
            std::mem::swap(&mut inbox.woken, &mut self.woken);
            std::mem::take(&mut inbox.jobs)
        };
        // Their wakers marked them queued already; a number whose task has ended is skipped
        // when its turn comes.
        LOCAL.with(|l| l.ready.borrow_mut().extend(self.woken.drain(..)));
        for job in jobs {
            let id = self.free.pop().unwrap_or_else(|| {
                self.tasks.push(None);
                self.tasks.len() - 1
            });
            let waker = Arc::new(TaskWaker {
                id,
                queued: AtomicBool::new(true),
                shared: self.shared.clone(),
            });
            let handle = Waker::from(waker.clone());
            // The job makes its future here, with this loop's context in place.
            let Ok(future) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)) else {
                tracing::error!("a session could not start on a relay loop (panicked)");
                self.free.push(id);
                continue;
            };
            self.tasks[id] = Some(Task {
                future,
                waker,
                handle,
            });
            LOCAL.with(|l| l.ready.borrow_mut().push_back(id));
        }
    }

    fn poll_task(&mut self, id: usize) {
        let Some(Some(task)) = self.tasks.get_mut(id) else {
            return;
        };
        task.waker.queued.store(false, Ordering::Release);
        let mut cx = Context::from_waker(&task.handle);
        // A task that panics ends alone, as on tokio; the loop and its other sessions go on.
        let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            task.future.as_mut().poll(&mut cx)
        }));
        if polled.is_err() {
            tracing::error!("a session on a relay loop panicked; it is dropped");
        }
        if !matches!(polled, Ok(Poll::Pending)) {
            let ended = self.tasks[id].take();
            self.free.push(id);
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(ended)));
        }
    }
}

#[cfg(test)]
mod tests;
