//! The least a TCP relay can do, as a yardstick for proxy CPU: one thread, edge-triggered
//! epoll (mio) with registrations kept for the connection's life, bytes read and written
//! straight through, no parsing, no deadlines, no metrics. Not a proxy anyone should run: it
//! has no error handling beyond dropping the pair, and it exits if the server refuses.
//!
//!     floor LISTEN_ADDRESS SERVER_ADDRESS
//!
//! `benches/compare --floor` runs it beside the others. Run by `cargo bench` without
//! addresses, it prints this usage and exits.

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use std::io::{self, ErrorKind, Read, Write};
use std::net::SocketAddr;

const LISTENER: Token = Token(usize::MAX);

/// Bytes read from one side and not yet written to the other.
struct Half {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Half {
    fn new() -> Half {
        Half {
            buf: vec![0; 16384],
            start: 0,
            end: 0,
        }
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

fn main() -> io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let addresses: Vec<SocketAddr> = args.iter().filter_map(|a| a.parse().ok()).collect();
    let [listen, server] = addresses[..] else {
        println!("floor: a bare TCP relay for benches/compare --floor; usage: floor LISTEN SERVER");
        return Ok(());
    };
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
            let Some(Pair {
                client,
                server,
                up,
                down,
            }) = pairs[i].as_mut()
            else {
                continue;
            };
            // Token 2i is the client's socket, 2i + 1 the server's.
            let (this, other, into_other, into_this) = if event.token().0 % 2 == 0 {
                (client, server, up, down)
            } else {
                (server, client, down, up)
            };
            let mut open = true;
            if event.is_writable() {
                open &= into_this.flush(this).is_ok();
            }
            if event.is_readable() || event.is_read_closed() {
                open &= into_other.relay(this, other).unwrap_or(false);
            }
            if !open && let Some(mut pair) = pairs[i].take() {
                poll.registry().deregister(&mut pair.client).ok();
                poll.registry().deregister(&mut pair.server).ok();
            }
        }
    }
}
