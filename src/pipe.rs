//! One direction of a session: bytes read from one peer, framed into messages in place, and
//! written to the other peer.
//!
//! A message is held whole only when bulkhead must look inside it and it is no larger than
//! [`INSPECT_LIMIT`]; every other message is forwarded as soon as its header has been read, and
//! the rest of it streams through. So a 1 GiB DataRow or CopyData costs no more memory than a
//! small one, and everything framed in one read goes out in one write.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::protocol::framing::{FrameError, Header, parse_header};

/// The most of one message held for inspection. Statement text beyond it is not seen.
pub const INSPECT_LIMIT: usize = 64 * 1024;

/// Stop reading from the source while this much is buffered: backpressure.
const HIGH_WATER: usize = 2 * INSPECT_LIMIT;

/// Spare room made before each read.
const READ_CHUNK: usize = 16 * 1024;

#[derive(Debug, Default)]
pub struct Pipe {
    /// Bytes read from the source and not yet written to the destination.
    buf: BytesMut,
    /// `buf[..ready]` has been framed and may be written.
    ready: usize,
    /// Bytes of the current message still to come from the source. They pass through without
    /// framing, so a large message is never held whole.
    streaming: usize,
    /// Messages bulkhead made itself, written after `buf[..ready]`. While any wait, framing
    /// pauses, so nothing the source sends later can overtake them.
    inject: BytesMut,
    /// The source has closed.
    eof: bool,
    /// A flush of the destination said Pending: it is owed until one completes. A TLS stream
    /// takes bytes into its own buffer and says so before they reach the socket; only a flush
    /// (or more writes) gets them out, so one that stalled must be tried again even when
    /// nothing new is written.
    unflushed: bool,
    /// Bytes written to the destination so far, so a caller can tell progress from none.
    written: u64,
    /// Bytes of a skipped message still to come from the source; they are dropped on arrival.
    discard: usize,
}

impl Pipe {
    /// The header of the next message if it can be decided on now: a message whose tag
    /// `inspect` selects needs its whole body (or [`INSPECT_LIMIT`] of it) buffered; any other
    /// needs only its header. `Ok(None)` means read more first.
    pub fn next(&self, inspect: impl Fn(u8) -> bool) -> Result<Option<Header>, FrameError> {
        if self.streaming > 0 || self.discard > 0 || !self.inject.is_empty() {
            return Ok(None);
        }
        let unframed = &self.buf[self.ready..];
        let Some(h) = parse_header(unframed)? else {
            return Ok(None);
        };
        let needed = if inspect(h.tag) {
            h.total().min(5 + INSPECT_LIMIT)
        } else {
            5
        };
        Ok((unframed.len() >= needed).then_some(h))
    }

    /// The body of the message `next` returned, as much of it as is buffered (all of it when
    /// it was selected for inspection and fits in [`INSPECT_LIMIT`]).
    pub fn body(&self, h: &Header) -> &[u8] {
        let start = self.ready + 5;
        let end = (self.ready + h.total()).min(self.buf.len());
        &self.buf[start..end]
    }

    /// Whether the whole message is buffered.
    pub fn is_whole(&self, h: &Header) -> bool {
        self.buf.len() - self.ready >= h.total()
    }

    /// Passes the current message on; whatever of it has not arrived yet will stream.
    pub fn forward(&mut self, h: &Header) {
        let have = (self.buf.len() - self.ready).min(h.total());
        self.ready += have;
        self.streaming = h.total() - have;
    }

    /// Drops the current message: what is buffered now, and the rest as it arrives.
    pub fn skip(&mut self, h: &Header) {
        let have = (self.buf.len() - self.ready).min(h.total());
        self.remove_at_ready(have);
        self.discard = h.total() - have;
    }

    /// Puts `bytes` (whole messages of bulkhead's own) in front of the current message, framed:
    /// they go out before it. The current message is then framed again from its new place.
    pub fn put_before(&mut self, bytes: &[u8]) {
        let tail = self.buf.split_off(self.ready);
        self.buf.extend_from_slice(bytes);
        self.ready += bytes.len();
        self.buf.unsplit(tail);
    }

    /// Replaces the current message with `with`, which keeps its place in the stream.
    pub fn replace(&mut self, h: &Header, with: &[u8]) {
        self.skip(h);
        self.inject.extend_from_slice(with);
    }

    fn remove_at_ready(&mut self, len: usize) {
        let start = self.ready;
        self.buf.copy_within(start + len.., start);
        self.buf.truncate(self.buf.len() - len);
    }

    /// Puts bytes already read from the source (before the relay began) in front of the
    /// stream, to be framed like any other.
    pub fn preload(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Drops a message that has been read only in part and none of which was forwarded, so an
    /// error of bulkhead's own can follow cleanly. Returns false if part of a message has
    /// already gone out, when nothing the peer could parse can follow it.
    pub fn discard_partial(&mut self) -> bool {
        if self.streaming > 0 {
            return false;
        }
        self.buf.truncate(self.ready);
        true
    }

    /// The destination is gone for good (transaction pooling: the server connection was
    /// lost) and another may take its place: what was framed or injected for it is dropped,
    /// and the rest of a message that was streaming to it is dropped as it arrives.
    pub fn destination_lost(&mut self) {
        self.discard_framed();
        self.inject.clear();
        self.discard += std::mem::take(&mut self.streaming);
        self.unflushed = false;
    }

    /// The source is gone for good and another may take its place: what it sent of a message
    /// not yet framed is dropped, and the next source starts at a message boundary. Callers
    /// check first that no message is part-way out (`is_streaming`).
    pub fn source_lost(&mut self) {
        debug_assert_eq!(self.streaming, 0);
        self.buf.truncate(self.ready);
        self.discard = 0;
        self.eof = false;
    }

    /// Drops everything framed and not yet written.
    pub fn discard_framed(&mut self) {
        self.buf.advance(self.ready);
        self.ready = 0;
    }

    /// Bytes written to the destination so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Queues a message of bulkhead's own after everything framed so far.
    pub fn inject(&mut self) -> &mut BytesMut {
        &mut self.inject
    }

    /// Whether anything is waiting to be written.
    pub fn has_output(&self) -> bool {
        self.ready > 0 || !self.inject.is_empty() || self.unflushed
    }

    /// Whether every byte read has been framed (a message whose start is buffered but not
    /// yet framed, whole or not, says no).
    pub fn all_framed(&self) -> bool {
        self.buf.len() == self.ready
    }

    /// Whether the source has been read to its end.
    pub fn is_eof(&self) -> bool {
        self.eof
    }

    /// Whether a message is part-way through: its start went out and the rest has not, so
    /// nothing of bulkhead's own can be put in now.
    pub fn is_streaming(&self) -> bool {
        self.streaming > 0
    }

    /// Whether part of a message has been read but not all of it.
    pub fn mid_message(&self) -> bool {
        self.streaming > 0 || self.discard > 0 || self.buf.len() > self.ready
    }

    /// Whether reading more is allowed now; false means the destination is behind.
    pub fn wants_read(&self) -> bool {
        !self.eof && self.buf.len() < HIGH_WATER
    }

    /// Whether the buffer was given back (or never taken): the next read allocates it.
    pub fn unallocated(&self) -> bool {
        self.buf.capacity() == 0
    }

    /// Reads what the source has. `Ready(Ok(0))` means it closed.
    pub fn poll_read_from<R: AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        source: &mut R,
    ) -> Poll<io::Result<usize>> {
        self.make_room();
        let n = ready!(tokio_util::io::poll_read_buf(
            Pin::new(source),
            cx,
            &mut self.buf
        ))?;
        Poll::Ready(Ok(self.took(n)))
    }

    /// `poll_read_from` for a session's socket: one on a relay loop reads straight into the
    /// buffer's free space.
    #[inline(always)]
    pub fn poll_read_from_stream(
        &mut self,
        cx: &mut Context<'_>,
        source: &mut crate::tls::Stream,
    ) -> Poll<io::Result<usize>> {
        let crate::tls::Stream::Looped(socket) = source else {
            return self.poll_read_from(cx, source);
        };
        self.make_room();
        let n = ready!(socket.poll_recv_into(cx, &mut self.buf))?;
        Poll::Ready(Ok(self.took(n)))
    }

    fn make_room(&mut self) {
        if self.buf.capacity() - self.buf.len() < READ_CHUNK / 2 {
            self.buf.reserve(READ_CHUNK);
        }
    }

    /// After a read of `n` bytes into the buffer.
    fn took(&mut self, n: usize) -> usize {
        if n == 0 {
            self.eof = true;
        }
        self.absorb();
        n
    }

    /// Takes in newly read bytes: those of a skipped message are dropped; those of a message
    /// already being streamed need no framing.
    fn absorb(&mut self) {
        let dropped = (self.buf.len() - self.ready).min(self.discard);
        self.remove_at_ready(dropped);
        self.discard -= dropped;
        let through = (self.buf.len() - self.ready).min(self.streaming);
        self.ready += through;
        self.streaming -= through;
    }

    /// Writes everything framed, then everything injected. `Ready(Ok(true))` if any bytes
    /// went out, `Ready(Ok(false))` if there was nothing to write.
    ///
    /// The relay asks each pipe to write on every pass of its loop and most passes find
    /// nothing to write: that answer is given inline, without the call.
    #[inline]
    pub fn poll_write_to<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        dest: &mut W,
    ) -> Poll<io::Result<bool>> {
        if self.ready == 0 && self.inject.is_empty() && !self.unflushed {
            return Poll::Ready(Ok(false));
        }
        self.write_out(cx, dest)
    }

    #[inline(never)]
    fn write_out<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        dest: &mut W,
    ) -> Poll<io::Result<bool>> {
        let mut wrote = false;
        while self.ready > 0 {
            let n = ready!(Pin::new(&mut *dest).poll_write(cx, &self.buf[..self.ready]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            if n == self.buf.len() {
                // All of it: the buffer starts over at the front, its room kept (cheaper than
                // advancing, and no later move to reclaim the front).
                self.buf.clear();
            } else {
                self.buf.advance(n);
            }
            self.ready -= n;
            self.written += n as u64;
            wrote = true;
        }
        while !self.inject.is_empty() {
            let n = ready!(Pin::new(&mut *dest).poll_write(cx, &self.inject))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.inject.advance(n);
            self.written += n as u64;
            wrote = true;
        }
        if wrote || self.unflushed {
            self.unflushed = true;
            ready!(Pin::new(&mut *dest).poll_flush(cx))?;
            self.unflushed = false;
        }
        Poll::Ready(Ok(wrote))
    }

    /// Gives the buffers' memory back when nothing is in them, so an idle session costs
    /// little. The next read allocates again.
    pub fn release_if_empty(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > 0 {
            self.buf = BytesMut::new();
        }
        if self.inject.is_empty() && self.inject.capacity() > 0 {
            self.inject = BytesMut::new();
        }
    }

    #[cfg(test)]
    fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        self.absorb();
    }

    #[cfg(test)]
    fn take_output(&mut self) -> Vec<u8> {
        let mut out = self.buf.split_to(self.ready).to_vec();
        self.ready = 0;
        out.extend_from_slice(&self.inject.split());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn bytes_put_before_a_message_go_out_first_and_it_is_framed_again() {
        let mut p = Pipe::default();
        let (first, second) = (msg(b'B', b"one"), msg(b'E', b"two"));
        p.feed(&[first.clone(), second.clone()].concat());
        let h = p.next(|_| true).unwrap().unwrap();
        p.forward(&h);
        let h = p.next(|_| true).unwrap().unwrap();
        assert_eq!(h.tag, b'E');
        let own = msg(b'P', b"mine");
        p.put_before(&own);
        let again = p.next(|_| true).unwrap().unwrap();
        assert_eq!((again.tag, p.body(&again)), (b'E', &b"two"[..]));
        p.forward(&again);
        assert_eq!(p.take_output(), [first, own, second].concat());
    }

    fn inspect_queries(tag: u8) -> bool {
        tag == b'Q'
    }

    /// Frames everything available, forwarding each message; returns the tags seen.
    fn drain(p: &mut Pipe) -> Vec<u8> {
        let mut tags = vec![];
        while let Some(h) = p.next(inspect_queries).unwrap() {
            tags.push(h.tag);
            p.forward(&h);
        }
        tags
    }

    /// Takes every write at once, as a TLS stream does into its buffer, but its first flush
    /// says Pending.
    #[derive(Default)]
    struct BufferingWriter {
        taken: Vec<u8>,
        flushes: usize,
        flushed: bool,
    }

    impl AsyncWrite for BufferingWriter {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.taken.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.flushes += 1;
            if self.flushes == 1 {
                return Poll::Pending;
            }
            self.flushed = true;
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn a_flush_that_said_pending_is_tried_again_when_nothing_new_is_written() {
        let mut p = Pipe::default();
        p.feed(&msg(b'Q', b"SELECT 1\0"));
        drain(&mut p);
        let mut dest = BufferingWriter::default();
        let cx = &mut Context::from_waker(std::task::Waker::noop());
        assert!(p.poll_write_to(cx, &mut dest).is_pending());
        assert!(
            p.has_output(),
            "bytes still in the writer's buffer are output"
        );
        assert!(matches!(
            p.poll_write_to(cx, &mut dest),
            Poll::Ready(Ok(false))
        ));
        assert!(dest.flushed);
        assert!(!p.has_output());
        assert_eq!(dest.taken, msg(b'Q', b"SELECT 1\0"));
    }

    #[test]
    fn two_messages_in_one_read_are_both_framed() {
        let mut p = Pipe::default();
        let mut bytes = msg(b'Q', b"SELECT 1\0");
        bytes.extend(msg(b'S', b""));
        p.feed(&bytes);
        assert_eq!(drain(&mut p), b"QS");
        assert_eq!(p.take_output(), bytes);
        assert!(!p.mid_message());
    }

    #[test]
    fn inspected_message_waits_until_whole() {
        let bytes = msg(b'Q', b"SELECT 1\0");
        let mut p = Pipe::default();
        for i in 0..bytes.len() - 1 {
            p.feed(&bytes[i..i + 1]);
            assert!(
                p.next(inspect_queries).unwrap().is_none(),
                "after {} bytes",
                i + 1
            );
        }
        p.feed(&bytes[bytes.len() - 1..]);
        let h = p.next(inspect_queries).unwrap().unwrap();
        assert_eq!(p.body(&h), b"SELECT 1\0");
        p.forward(&h);
        assert_eq!(p.take_output(), bytes);
    }

    #[test]
    fn uninspected_message_streams_after_its_header() {
        let body = vec![7u8; 100_000];
        let bytes = msg(b'd', &body);
        let mut p = Pipe::default();
        p.feed(&bytes[..3]);
        assert!(p.next(inspect_queries).unwrap().is_none());
        p.feed(&bytes[3..1000]);
        let h = p.next(inspect_queries).unwrap().unwrap();
        assert_eq!(h.tag, b'd');
        p.forward(&h);
        assert!(p.mid_message());
        let mut out = p.take_output();
        assert_eq!(out.len(), 1000);
        // The rest arrives in pieces and passes straight through, unframed.
        for chunk in bytes[1000..].chunks(30_000) {
            p.feed(chunk);
            assert!(p.next(inspect_queries).unwrap().is_none());
            out.extend(p.take_output());
        }
        assert!(!p.mid_message());
        assert_eq!(out, bytes);
        // A message after it is framed again.
        p.feed(&msg(b'S', b""));
        assert_eq!(drain(&mut p), b"S");
    }

    #[test]
    fn oversized_inspected_message_is_inspected_by_its_prefix_then_streamed() {
        let mut text = b"SELECT '".to_vec();
        text.extend(vec![b'x'; 200_000]);
        text.extend_from_slice(b"'\0");
        let bytes = msg(b'Q', &text);
        let mut p = Pipe::default();
        p.feed(&bytes[..5 + INSPECT_LIMIT - 1]);
        assert!(p.next(inspect_queries).unwrap().is_none());
        p.feed(&bytes[5 + INSPECT_LIMIT - 1..5 + INSPECT_LIMIT + 10]);
        let h = p.next(inspect_queries).unwrap().unwrap();
        assert!(!p.is_whole(&h));
        assert!(p.body(&h).starts_with(b"SELECT '"));
        assert_eq!(p.body(&h).len(), INSPECT_LIMIT + 10);
        p.forward(&h);
        let mut out = p.take_output();
        p.feed(&bytes[5 + INSPECT_LIMIT + 10..]);
        out.extend(p.take_output());
        assert_eq!(out, bytes);
    }

    #[test]
    fn bad_lengths_are_frame_errors() {
        let mut p = Pipe::default();
        p.feed(b"Q\0\0\0\x03");
        assert!(matches!(
            p.next(inspect_queries),
            Err(FrameError::TooShort { .. })
        ));
        let mut p = Pipe::default();
        p.feed(&[b'Q', 0x7f, 0xff, 0xff, 0xff]);
        assert!(matches!(
            p.next(inspect_queries),
            Err(FrameError::TooLong { .. })
        ));
    }

    #[test]
    fn replaced_message_keeps_its_place_in_the_stream() {
        let mut p = Pipe::default();
        let mut bytes = msg(b'A', b"1");
        bytes.extend(msg(b'K', b"12345678"));
        bytes.extend(msg(b'Z', b"I"));
        p.feed(&bytes);
        let h = p.next(|_| true).unwrap().unwrap();
        p.forward(&h);
        let h = p.next(|_| true).unwrap().unwrap();
        assert_eq!(h.tag, b'K');
        p.replace(&h, &msg(b'K', b"abcdefgh"));
        // Framing pauses until the replacement is written, so Z cannot overtake it.
        assert!(p.next(|_| true).unwrap().is_none());
        let mut out = p.take_output();
        out.extend(drain_all(&mut p));
        let mut want = msg(b'A', b"1");
        want.extend(msg(b'K', b"abcdefgh"));
        want.extend(msg(b'Z', b"I"));
        assert_eq!(out, want);
    }

    #[test]
    fn skipped_message_is_dropped_even_while_it_streams() {
        let mut p = Pipe::default();
        let big = msg(b'B', &vec![1u8; 100_000]);
        let mut bytes = msg(b'P', b"\0x\0\0\0");
        bytes.extend_from_slice(&big[..1000]);
        p.feed(&bytes);
        let h = p.next(|_| false).unwrap().unwrap();
        p.forward(&h);
        let h = p.next(|_| false).unwrap().unwrap();
        assert_eq!(h.tag, b'B');
        p.skip(&h);
        p.feed(&big[1000..50_000]);
        assert!(p.next(|_| false).unwrap().is_none());
        let mut rest = big[50_000..].to_vec();
        rest.extend(msg(b'S', b""));
        p.feed(&rest);
        assert_eq!(drain(&mut p), b"S");
        let mut want = msg(b'P', b"\0x\0\0\0");
        want.extend(msg(b'S', b""));
        assert_eq!(p.take_output(), want);
    }

    fn drain_all(p: &mut Pipe) -> Vec<u8> {
        drain(p);
        p.take_output()
    }

    #[test]
    fn release_gives_back_memory_only_when_empty() {
        let mut p = Pipe::default();
        p.feed(&msg(b'Q', b"SELECT 1\0"));
        p.release_if_empty();
        assert!(p.buf.capacity() > 0);
        drain_all(&mut p);
        p.release_if_empty();
        assert_eq!(p.buf.capacity(), 0);
    }
}
