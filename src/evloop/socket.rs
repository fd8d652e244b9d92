//! A TCP socket on a relay loop: registered with the loop's epoll once, edge-triggered, for
//! reading and writing, until it is closed. Readiness is one byte per socket, set by the loop
//! when epoll reports the socket and cleared by a read or write that found nothing (or, for a
//! read, less than it asked for: the socket is empty then, and more data brings a new edge).

use std::cell::Cell;
use std::io;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use mio::event::Event;
use mio::unix::SourceFd;
use mio::{Interest, Token};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{BUDGET, LOCAL};

const READABLE: u8 = 1;
const WRITABLE: u8 = 2;
/// Sticky: the peer closed its side, or the socket failed. A read or write that finds
/// nothing does not clear these (the edge that reported them came with the last data), so
/// the end or the error is always read.
const READ_CLOSED: u8 = 4;
const WRITE_CLOSED: u8 = 8;

/// What the loop and a socket share: readiness and who to wake for each direction.
///
/// Plain cells, no atomics and no lock: they are touched only on the thread of the loop the
/// socket is attached to, by `dispatch` (the loop itself) and by `poll_io` (the session's task,
/// which that loop polls). Other threads only move a socket before it is attached and drop
/// their `Arc` (which touches no cell).
pub(super) struct IoState {
    ready: Cell<u8>,
    reader: Waiter,
    writer: Waiter,
}

// SAFETY: see above: the cells are only ever used from one thread, the attached loop's; a
// socket polled or dispatched elsewhere would be a bug in this module (`poll_io` checks it in
// debug builds).
unsafe impl Sync for IoState {}

/// Who waits for one direction of a socket. The waker stays after a wake-up (woken by
/// reference) until another replaces it: a session's is the same for its whole life, so a
/// wake-up costs no clone and no drop.
#[derive(Default)]
struct Waiter(Cell<Option<Waker>>);

impl Waiter {
    fn register(&self, waker: &Waker) {
        match self.0.take() {
            Some(held) if held.will_wake(waker) => self.0.set(Some(held)),
            _ => self.0.set(Some(waker.clone())),
        }
    }

    fn wake(&self) {
        // Taken out while it runs, so that nothing it does can reach the cell.
        if let Some(w) = self.0.take() {
            w.wake_by_ref();
            let newer = self.0.replace(Some(w));
            if newer.is_some() {
                self.0.set(newer);
            }
        }
    }
}

/// Where a loop keeps its sockets' states, by token: the slot number in the low 32 bits, the
/// slot's generation above, so an event for a socket closed since finds nothing.
pub(super) struct Registrations {
    registry: mio::Registry,
    slots: Vec<(u32, Option<Arc<IoState>>)>,
    free: Vec<usize>,
}

impl Registrations {
    pub(super) fn new(registry: mio::Registry) -> Self {
        Registrations {
            registry,
            slots: Vec::new(),
            free: Vec::new(),
        }
    }

    fn add(&mut self, fd: i32, state: &Arc<IoState>) -> io::Result<Token> {
        let slot = self.free.pop().unwrap_or_else(|| {
            self.slots.push((0, None));
            self.slots.len() - 1
        });
        let generation = self.slots[slot].0.wrapping_add(1);
        let token = Token(slot | (generation as usize) << 32);
        if let Err(e) = self.registry.register(
            &mut SourceFd(&fd),
            token,
            Interest::READABLE | Interest::WRITABLE,
        ) {
            self.free.push(slot);
            return Err(e);
        }
        self.slots[slot] = (generation, Some(state.clone()));
        Ok(token)
    }

    fn remove(&mut self, token: Token) {
        let slot = token.0 & 0xffff_ffff;
        if let Some(entry) = self.slots.get_mut(slot)
            && entry.0 as usize == token.0 >> 32
            && entry.1.take().is_some()
        {
            self.free.push(slot);
        }
    }
}

/// Records what epoll reported for one socket and wakes whoever waits for it.
pub(super) fn dispatch(sockets: &Registrations, event: &Event) {
    let token = event.token().0;
    let Some((generation, Some(state))) = sockets.slots.get(token & 0xffff_ffff) else {
        return;
    };
    if *generation as usize != token >> 32 {
        return;
    }
    let trouble = event.is_error();
    let mut bits = 0;
    if event.is_readable() {
        bits |= READABLE;
    }
    if event.is_read_closed() || trouble {
        bits |= READABLE | READ_CLOSED;
    }
    if event.is_writable() {
        bits |= WRITABLE;
    }
    if event.is_write_closed() || trouble {
        bits |= WRITABLE | WRITE_CLOSED;
    }
    // Only a bit that was clear can have a waiter: a task waits after it found its bit clear.
    // (Every edge for new data reports the socket writable too; the writer is woken only if
    // it had run out of room.)
    let was = state.ready.get();
    state.ready.set(was | bits);
    let new = bits & !was;
    if new & (READABLE | READ_CLOSED) != 0 {
        state.reader.wake();
    }
    if new & (WRITABLE | WRITE_CLOSED) != 0 {
        state.writer.wake();
    }
}

/// A plain TCP socket driven by the relay loop of the thread that attached it.
pub struct Socket {
    tcp: TcpStream,
    state: Arc<IoState>,
    /// `None` until attached to a loop.
    token: Option<Token>,
    /// Operations since the socket last ran dry: at `BUDGET` the task lets others run.
    busy: Cell<u32>,
    /// The waker each direction's waiter holds (its data and vtable addresses), so that
    /// registering the same one again needs no lock.
    holds: [Cell<(usize, usize)>; 2],
}

impl Socket {
    /// A socket to be attached to a loop; it must be in non-blocking mode and registered with
    /// no other reactor.
    pub fn new(tcp: TcpStream) -> Socket {
        Socket {
            tcp,
            state: Arc::new(IoState {
                // Until epoll says otherwise, try: a read that finds nothing costs one system
                // call.
                ready: Cell::new(READABLE | WRITABLE),
                reader: Waiter::default(),
                writer: Waiter::default(),
            }),
            token: None,
            busy: Cell::new(0),
            holds: [Cell::new((0, 0)), Cell::new((0, 0))],
        }
    }

    /// Registers the socket with this thread's loop. Fails off a loop's thread. Until it is
    /// attached a socket is never woken: it must be attached before it is used.
    pub fn attach(&mut self) -> io::Result<()> {
        if self.token.is_some() {
            return Ok(());
        }
        let fd = self.tcp.as_raw_fd();
        let added = LOCAL.with(|l| {
            l.sockets
                .borrow_mut()
                .as_mut()
                .map(|sockets| sockets.add(fd, &self.state))
        });
        self.token =
            Some(added.unwrap_or_else(|| Err(io::Error::other("not on a relay loop's thread")))?);
        Ok(())
    }

    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// Runs `op` (a non-blocking system call) once the socket may be ready for `bit`, and
    /// keeps the readiness in step with what it found.
    fn poll_io<T>(
        &self,
        cx: &mut Context<'_>,
        bit: u8,
        mut op: impl FnMut() -> io::Result<(T, bool)>,
    ) -> Poll<io::Result<T>> {
        debug_assert!(
            LOCAL.with(|l| !l.shared.get().is_null()),
            "a relay loop's socket polled off a loop's thread"
        );
        let state = &*self.state;
        let (waiter, ready, holds) = if bit == READABLE {
            (&state.reader, READABLE | READ_CLOSED, &self.holds[0])
        } else {
            (&state.writer, WRITABLE | WRITE_CLOSED, &self.holds[1])
        };
        let register = || {
            let w = cx.waker();
            let id = (w.data() as usize, w.vtable() as *const _ as usize);
            if holds.get() != id {
                waiter.register(w);
                holds.set(id);
            }
        };
        loop {
            if state.ready.get() & ready == 0 {
                // No event can come between the check and the registration: the loop that
                // reports them is this thread.
                register();
                return Poll::Pending;
            }
            let busy = self.busy.get();
            if busy >= BUDGET {
                // Always more to move: let the loop's other tasks run first.
                self.busy.set(0);
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            match op() {
                Ok((value, drained)) => {
                    if drained {
                        state.ready.set(state.ready.get() & !bit);
                        // Held already (a session's waker does not change), so `read_dry`
                        // can be believed.
                        register();
                        self.busy.set(0);
                    } else {
                        self.busy.set(busy + 1);
                    }
                    return Poll::Ready(Ok(value));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.busy.set(0);
                    let left = state.ready.get() & !bit;
                    state.ready.set(left);
                    if left & ready != 0 {
                        // Reported closed, yet nothing to take: wait for the next event
                        // rather than spin.
                        register();
                        return Poll::Pending;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Reads into `buf`'s free space.
    #[inline(always)]
    pub fn poll_recv_into(
        &self,
        cx: &mut Context<'_>,
        buf: &mut bytes::BytesMut,
    ) -> Poll<io::Result<usize>> {
        let n = std::task::ready!(self.poll_recv(cx, buf.spare_capacity_mut()))?;
        // SAFETY: the kernel initialised the first `n` bytes of the free space.
        unsafe { buf.set_len(buf.len() + n) };
        Poll::Ready(Ok(n))
    }

    /// Reads into `into`; the first `n` bytes are initialised when it returns `n`.
    #[inline(always)]
    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        into: &mut [std::mem::MaybeUninit<u8>],
    ) -> Poll<io::Result<usize>> {
        let fd = self.tcp.as_raw_fd();
        let (ptr, len) = (into.as_mut_ptr().cast(), into.len());
        self.poll_io(cx, READABLE, || {
            recv(fd, ptr, len, 0).map(|n| (n, 0 < n && n < len))
        })
    }

    /// The last read took everything there was, and the reader's waker is held for the next
    /// edge.
    pub fn read_dry(&self) -> bool {
        self.state.ready.get() & (READABLE | READ_CLOSED) == 0 && self.holds[0].get() != (0, 0)
    }

    /// Waits until a read would find something (or the end), without taking it.
    pub fn poll_peek(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let fd = self.tcp.as_raw_fd();
        self.poll_io(cx, READABLE, || {
            let mut byte = 0u8;
            recv(fd, (&mut byte as *mut u8).cast(), 1, libc::MSG_PEEK).map(|_| ((), false))
        })
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        if let Some(token) = self.token.take() {
            // Closing the descriptor (next, when `tcp` drops) takes it out of epoll; the slot
            // is freed for the next socket. Off the loop's thread (not expected) the slot is
            // left, and its generation keeps any event from reaching a later socket.
            let _ = LOCAL.try_with(|l| {
                if let Ok(mut sockets) = l.sockets.try_borrow_mut()
                    && let Some(sockets) = sockets.as_mut()
                {
                    sockets.remove(token);
                }
            });
        }
    }
}

/// recv(2) as a raw system call: glibc's wrapper is a cancellation point, which costs two
/// calls around every read (the relay's threads are never cancelled).
fn recv(fd: i32, buf: *mut libc::c_void, len: usize, flags: i32) -> io::Result<usize> {
    // SAFETY: `buf` is valid for `len` bytes of writing (the callers' contract); the null
    // address arguments mean none is wanted.
    let n = unsafe {
        libc::syscall(
            libc::SYS_recvfrom,
            fd,
            buf,
            len,
            flags,
            std::ptr::null_mut::<libc::sockaddr>(),
            std::ptr::null_mut::<libc::socklen_t>(),
        )
    };
    syscall_result(n)
}

fn send(fd: i32, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reading for its length; no address is given.
    let n = unsafe {
        libc::syscall(
            libc::SYS_sendto,
            fd,
            buf.as_ptr(),
            buf.len(),
            libc::MSG_NOSIGNAL,
            std::ptr::null::<libc::sockaddr>(),
            0 as libc::socklen_t,
        )
    };
    syscall_result(n)
}

/// A byte count, or the error `errno` names.
fn syscall_result(n: libc::c_long) -> io::Result<usize> {
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // SAFETY: recv writes at most `unfilled.len()` bytes into it and they are marked
        // initialised only as far as it wrote.
        let n = std::task::ready!(self.poll_recv(cx, unsafe { buf.unfilled_mut() }))?;
        // SAFETY: the kernel initialised the first `n` bytes.
        unsafe { buf.assume_init(n) };
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Socket {
    #[inline(always)]
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let fd = self.tcp.as_raw_fd();
        // A short write means the send buffer is full: the next would find no room.
        self.poll_io(cx, WRITABLE, || {
            send(fd, data).map(|n| (n, 0 < n && n < data.len()))
        })
    }

    #[inline]
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.tcp.shutdown(std::net::Shutdown::Write))
    }
}
