//! The PostgreSQL v3 wire protocol as bulkhead needs it: framing, the untagged startup packet,
//! and the handful of messages it looks inside or builds itself. Pure functions over byte
//! slices; no I/O happens here.
//!
//! Split by direction as in postgres-protocol: [`frontend`] is what clients send, [`backend`]
//! is what servers send (and what bulkhead sends when it answers a client itself).

pub mod backend;
pub mod framing;
pub mod frontend;
pub mod startup;

/// The largest length field PostgreSQL accepts for a message: `PQ_LARGE_MESSAGE_LIMIT`,
/// which is `MaxAllocSize - 1`. Anything longer cannot be a valid message.
pub const MAX_MESSAGE_LEN: usize = 0x3fff_ffff;

/// Reads a NUL-terminated string at the front of `buf`; returns it and the rest after the NUL.
pub fn cstr(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = memchr::memchr(0, buf)?;
    Some((&buf[..end], &buf[end + 1..]))
}
