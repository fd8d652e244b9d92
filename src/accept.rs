//! The accept loop: takes clients off the listeners and starts their sessions on the workers.
//!
//! With one worker (the default on up to three cores) the loop runs on that worker, so a new
//! client's accept and its whole login happen on one thread, as in PgBouncer's one event
//! loop; with several it runs on the runtime that called [`crate::Bulkhead::serve`] and hands
//! each session to the least busy worker. Either way a client's socket is taken with
//! `accept4(SOCK_NONBLOCK)` and registered with a reactor once, by its session, not first
//! with the accepting runtime's and then again with its worker's (that was two `epoll_ctl`s
//! more per connection, and a wake-up of another thread).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info_span};

use crate::workers::Workers;
use crate::{Shared, fds, session};

/// What the accept loop needs besides the listeners.
pub(crate) struct Acceptor {
    pub shared: Arc<Shared>,
    pub workers: Arc<Workers>,
    /// Every session holds a clone; the server has drained when all are dropped.
    pub alive: mpsc::Sender<()>,
}

impl Acceptor {
    /// Accepts on `main` (and `readonly`, when there is one) until `stop` fires or its sender is
    /// dropped; the listeners are closed when this returns. Must run on a runtime with I/O
    /// and timers enabled.
    pub async fn run(
        self,
        main: std::net::TcpListener,
        readonly: Option<std::net::TcpListener>,
        mut stop: oneshot::Receiver<()>,
    ) -> io::Result<()> {
        let main = listen(main)?;
        let readonly = readonly.map(listen).transpose()?;
        let reserve = fds::Reserve::new();
        let mut next_id: u64 = 0;
        loop {
            let (accepted, from, reads_only) = tokio::select! {
                _ = &mut stop => return Ok(()),
                accepted = accept(&main) => (accepted, &main, false),
                accepted = accept_if(readonly.as_ref()) => {
                    (accepted, readonly.as_ref().expect("accepted on it"), true)
                }
            };
            match accepted {
                Ok((socket, peer)) => {
                    next_id += 1;
                    self.start(socket, peer, next_id, reads_only);
                }
                Err(e) if fds::exhausted(&e) && reserve.release() => {
                    // Out of descriptors: the reserve one lets the client waiting be told
                    // so (53300) rather than hang in the backlog.
                    match accept(from).await {
                        Ok((socket, _)) => {
                            self.shared.admission.shed_for_descriptors();
                            tokio::spawn(session::refuse_out_of_descriptors(
                                socket,
                                reserve.clone(),
                            ));
                        }
                        Err(e) => {
                            reserve.restore();
                            error!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
                Err(e) if transient(&e) => {}
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    error!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Starts the session of a client just accepted.
    fn start(&self, socket: std::net::TcpStream, peer: SocketAddr, id: u64, reads_only: bool) {
        socket.set_nodelay(true).ok();
        let admitted = self.shared.admission.client_arrived();
        let span = if reads_only {
            info_span!("session", id, %peer, readonly = true)
        } else {
            info_span!("session", id, %peer)
        };
        self.workers.spawn(session::serve(
            self.shared.clone(),
            socket,
            peer,
            id,
            admitted,
            reads_only,
            self.alive.clone(),
            span,
        ));
    }
}

/// A listener as the accept loop waits on it: registered with this runtime's reactor, its
/// accepted sockets with none.
type Listener = AsyncFd<mio::net::TcpListener>;

fn listen(listener: std::net::TcpListener) -> io::Result<Listener> {
    listener.set_nonblocking(true)?;
    let listener = mio::net::TcpListener::from_std(listener);
    // SAFETY: the mio listener owns its descriptor, which stays open and the same until the
    // AsyncFd that owns the listener is dropped.
    Ok(unsafe { AsyncFd::register_with_interest(listener, Interest::READABLE) }?)
}

/// The next client on `listener`: a non-blocking socket, not yet registered with any reactor.
async fn accept(listener: &Listener) -> io::Result<(std::net::TcpStream, SocketAddr)> {
    loop {
        let mut ready = listener.readable().await?;
        // A would-block clears the readiness and waits again.
        if let Ok(accepted) = ready.try_io(|l| l.get_ref().accept()) {
            return accepted.map(|(socket, peer)| (socket.into(), peer));
        }
    }
}

/// The next client on `listener`, or never when there is none.
async fn accept_if(listener: Option<&Listener>) -> io::Result<(std::net::TcpStream, SocketAddr)> {
    match listener {
        Some(l) => accept(l).await,
        None => std::future::pending().await,
    }
}

/// An accept error that concerns only the one client it was for (it left before it was
/// accepted): the next accept may go ahead at once.
fn transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}
