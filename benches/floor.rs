//! The least a TCP relay can do, as a yardstick for proxy CPU: one thread, edge-triggered
//! epoll (mio) with registrations kept for the connection's life, bytes read and written
//! straight through, no parsing, no deadlines, no metrics. Not a proxy anyone should run: it
//! has no error handling beyond dropping the pair, and it exits if the server refuses.
//!
//!     floor LISTEN_ADDRESS SERVER_ADDRESS [--uring]
//!
//! With `--uring` it reads each ready socket as before but holds what it read until the whole
//! batch of readiness events is handled, then hands every send of the batch to the kernel in
//! one `io_uring_enter` (non-blocking sends; what a send leaves over is written the plain way).
//! On this kernel a process is switched out only on its way back to user space, so that is one
//! chance per batch, not one per send, for the process a send woke to take the relay's CPU:
//! the yardstick for what batching system calls could save.
//!
//! `benches/compare --floor` runs both beside the others. Run by `cargo bench` without
//! addresses, it prints this usage and exits.

use io_uring::{IoUring, opcode, types};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use std::io::{self, ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

const LISTENER: Token = Token(usize::MAX);
/// Submission queue entries; a batch with more sends is submitted in parts.
const RING: usize = 256;

/// Bytes read from one side and not yet written to the other.
struct Half {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// In the batch's list of sends (`--uring`).
    queued: bool,
}

impl Half {
    fn new() -> Half {
        Half {
            buf: vec![0; 16384],
            start: 0,
            end: 0,
            queued: false,
        }
    }

    fn held(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Reads from `from` what fits behind what is held. Ok(false) once `from` has closed,
    /// Ok(true) with `self.end == self.buf.len()` when `from` may hold more.
    fn fill(&mut self, from: &mut TcpStream) -> io::Result<bool> {
        while self.end < self.buf.len() {
            match from.read(&mut self.buf[self.end..]) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.end += n;
                    if self.end < self.buf.len() {
                        return Ok(true);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(true),
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Writes what is held. Ok(()) also when the socket takes no more for now: its writable
    /// event brings the rest.
    fn flush(&mut self, to: &mut TcpStream) -> io::Result<()> {
        while self.start < self.end {
            match to.write(&self.buf[self.start..self.end]) {
                Ok(n) => self.start += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        self.start = 0;
        self.end = 0;
        Ok(())
    }

    /// Reads from `from` and writes to `to` until `from` runs dry or `to` is full. A read
    /// shorter than the buffer means the socket is dry (as tokio assumes too), so no read
    /// ends in EAGAIN. Ok(false) once `from` has closed.
    fn relay(&mut self, from: &mut TcpStream, to: &mut TcpStream) -> io::Result<bool> {
        loop {
            self.flush(to)?;
            if self.start < self.end {
                return Ok(true);
            }
            match from.read(&mut self.buf) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.end = n;
                    if n < self.buf.len() {
                        self.flush(to)?;
                        return Ok(true);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(true),
                Err(e) => return Err(e),
            }
        }
    }
}

struct Pair {
    client: TcpStream,
    server: TcpStream,
    up: Half,
    down: Half,
}

impl Pair {
    /// The half carrying bytes towards the server (`up`) or the client, and the socket it
    /// writes to and the one it reads from.
    fn half(&mut self, up: bool) -> (&mut Half, &mut TcpStream, &mut TcpStream) {
        if up {
            (&mut self.up, &mut self.server, &mut self.client)
        } else {
            (&mut self.down, &mut self.client, &mut self.server)
        }
    }
}

/// The sends of one batch (`--uring`): (pair, towards the server?).
struct Batch {
    ring: IoUring,
    sends: Vec<(usize, bool)>,
}

impl Batch {
    /// Sends what every queued half holds, `RING` at a time, one `io_uring_enter` each, and
    /// adds the pairs whose sockets failed to `dead`.
    fn flush(&mut self, pairs: &mut [Option<Pair>], dead: &mut Vec<usize>) -> io::Result<()> {
        for part in self.sends.chunks(RING) {
            let mut n = 0;
            for (k, &(i, up)) in part.iter().enumerate() {
                let Some(pair) = pairs[i].as_mut() else {
                    continue;
                };
                let (half, to, _) = pair.half(up);
                let held = half.held();
                let send =
                    opcode::Send::new(types::Fd(to.as_raw_fd()), held.as_ptr(), held.len() as u32)
                        .flags(libc::MSG_DONTWAIT)
                        .build()
                        .user_data(k as u64);
                // SAFETY: the buffer is the half's and stays put: nothing touches it before
                // the completion below, which submit_and_wait waits for (MSG_DONTWAIT: every
                // send completes within the call).
                unsafe { self.ring.submission().push(&send) }.expect("a part fits the ring");
                n += 1;
            }
            self.ring.submit_and_wait(n)?;
            for done in self.ring.completion() {
                let (i, up) = part[done.user_data() as usize];
                let Some(pair) = pairs[i].as_mut() else {
                    continue;
                };
                let (half, to, from) = pair.half(up);
                half.queued = false;
                match done.result() {
                    n if n >= 0 => half.start += n as usize,
                    e if e == -libc::EAGAIN => {}
                    _ => {
                        dead.push(i);
                        continue;
                    }
                }
                // What the send left, or what the read could not fit, goes the plain way.
                let full = half.end == half.buf.len();
                let open = if full && half.start == half.end {
                    half.start = 0;
                    half.end = 0;
                    half.relay(from, to)
                } else {
                    half.flush(to).map(|()| true)
                };
                if !open.unwrap_or(false) {
                    dead.push(i);
                }
            }
        }
        self.sends.clear();
        Ok(())
    }
}

fn main() -> io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let addresses: Vec<SocketAddr> = args.iter().filter_map(|a| a.parse().ok()).collect();
    let [listen, server] = addresses[..] else {
        println!(
            "floor: a bare TCP relay for benches/compare --floor; usage: floor LISTEN SERVER [--uring]"
        );
        return Ok(());
    };
    let mut batch = match args.iter().any(|a| a == "--uring") {
        true => Some(Batch {
            ring: IoUring::new(RING as u32)?,
            sends: Vec::with_capacity(1024),
        }),
        false => None,
    };
    let mut dead = Vec::new();
    let mut poll = Poll::new()?;
    let mut listener = TcpListener::bind(listen)?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    let mut pairs: Vec<Option<Pair>> = Vec::new();
    let mut events = Events::with_capacity(1024);
    loop {
        poll.poll(&mut events, None)?;
        for event in events.iter() {
            if event.token() == LISTENER {
                while let Ok((client, _)) = listener.accept() {
                    let upstream = std::net::TcpStream::connect(server)?;
                    upstream.set_nonblocking(true)?;
                    let mut pair = Pair {
                        client,
                        server: TcpStream::from_std(upstream),
                        up: Half::new(),
                        down: Half::new(),
                    };
                    pair.client.set_nodelay(true)?;
                    pair.server.set_nodelay(true)?;
                    let i = pairs.iter().position(Option::is_none).unwrap_or_else(|| {
                        pairs.push(None);
                        pairs.len() - 1
                    });
                    let both = Interest::READABLE | Interest::WRITABLE;
                    poll.registry()
                        .register(&mut pair.client, Token(2 * i), both)?;
                    poll.registry()
                        .register(&mut pair.server, Token(2 * i + 1), both)?;
                    pairs[i] = Some(pair);
                }
                continue;
            }
            let i = event.token().0 / 2;
            let Some(pair) = pairs[i].as_mut() else {
                continue;
            };
            // Token 2i is the client's socket, 2i + 1 the server's.
            let from_client = event.token().0 % 2 == 0;
            let mut open = true;
            if event.is_writable() {
                let (into_this, this, _) = pair.half(!from_client);
                open &= into_this.queued || into_this.flush(this).is_ok();
            }
            if event.is_readable() || event.is_read_closed() {
                let (into_other, other, this) = pair.half(from_client);
                match &mut batch {
                    None => open &= into_other.relay(this, other).unwrap_or(false),
                    Some(batch) => {
                        open &= into_other.fill(this).unwrap_or(false);
                        if !into_other.held().is_empty() {
                            into_other.queued = true;
                            batch.sends.push((i, from_client));
                        }
                    }
                }
            }
            if !open {
                dead.push(i);
            }
        }
        if let Some(batch) = &mut batch {
            batch.flush(&mut pairs, &mut dead)?;
        }
        for i in dead.drain(..) {
            if let Some(mut pair) = pairs[i].take() {
                poll.registry().deregister(&mut pair.client).ok();
                poll.registry().deregister(&mut pair.server).ok();
            }
        }
    }
}
