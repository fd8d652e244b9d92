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
    // Most are names, a few bytes long: a plain look at the first bytes costs less than
    // memchr's set-up; a longer string (a statement's text) gets memchr.
    const SHORT: usize = 16;
    let mut end = 0;
    while end < buf.len() && end < SHORT {
        if buf[end] == 0 {
            return Some((&buf[..end], &buf[end + 1..]));
        }
        end += 1;
    }
    if buf.len() <= SHORT {
        return None;
    }
    let end = SHORT + memchr::memchr(0, &buf[SHORT..])?;
    Some((&buf[..end], &buf[end + 1..]))
}

#[cfg(test)]
mod tests {
    use super::cstr;

    #[test]
    fn cstr_splits_at_the_first_nul_short_or_long_and_needs_one() {
        for len in 0..40 {
            let mut buf = vec![b'a'; len];
            assert_eq!(cstr(&buf), None, "no NUL in {len} bytes");
            buf.extend_from_slice(b"\0rest\0");
            assert_eq!(
                cstr(&buf),
                Some((&buf[..len], &b"rest\0"[..])),
                "NUL at {len}"
            );
        }
    }
}
