//! Reading a server's answers to bulkhead's own messages (its login, the reset and settings
//! before a connection is lent) in few system calls.
//!
//! Read message by message, each takes two reads (its header, then its body): a login's answer
//! (some fifteen ParameterStatus, BackendKeyData, ReadyForQuery) took over thirty, the reset
//! between two clients sixteen. On a plain socket [`Answers`] looks at what has arrived
//! (`MSG_PEEK`) and takes every whole message in it, up to and including the first
//! ReadyForQuery, with one read. Nothing after that ReadyForQuery is taken: whatever the server
//! sends next belongs to whoever reads the connection next. Over TLS rustls reads whole records
//! already, so messages are read one by one from what it holds.

use bytes::BytesMut;
use tokio::io::AsyncReadExt;

use crate::auth::client::{login_message_length, read_message};
use crate::protocol::backend;
use crate::tls::Stream;

/// How much is looked at in one peek: a login's whole answer (some 500 bytes) fits; what does
/// not is taken by the next peek.
const PEEK: usize = 1024;

/// The messages taken from the socket and not yet handed out.
#[derive(Default)]
pub struct Answers {
    taken: Vec<u8>,
    next: usize,
}

impl Answers {
    /// The next message's tag, its body in `body`. Errors as [`read_message`]'s.
    pub async fn next(
        &mut self,
        stream: &mut Stream,
        max: usize,
        body: &mut BytesMut,
    ) -> Result<u8, String> {
        if self.next == self.taken.len()
            && let Stream::Plain(tcp) = stream
        {
            self.taken.resize(PEEK, 0);
            self.next = 0;
            let seen = tcp
                .peek(&mut self.taken)
                .await
                .map_err(|e| format!("connection ended during login: {e}"))?;
            let whole = whole_messages(&self.taken[..seen], max)?;
            self.taken.truncate(whole);
            // Already there (just seen), so this read does not wait.
            tcp.read_exact(&mut self.taken)
                .await
                .map_err(|e| format!("connection ended during login: {e}"))?;
        }
        if self.next == self.taken.len() {
            // TLS, or the first message has not all arrived (or is larger than a peek).
            return read_message(stream, max, body).await;
        }
        let rest = &self.taken[self.next..];
        let len = u32::from_be_bytes(rest[1..5].try_into().expect("4 bytes")) as usize;
        body.clear();
        body.extend_from_slice(&rest[5..1 + len]);
        self.next += 1 + len;
        Ok(rest[0])
    }
}

/// How many bytes of `seen` are whole messages, up to and including the first ReadyForQuery.
/// An error for a length [`read_message`] would refuse.
fn whole_messages(seen: &[u8], max: usize) -> Result<usize, String> {
    let mut at = 0;
    while let Some(header) = seen.get(at..at + 5) {
        let len = login_message_length(header, max)?;
        if seen.len() < at + 1 + len {
            break;
        }
        at += 1 + len;
        if header[0] == backend::READY_FOR_QUERY_TAG {
            break;
        }
    }
    Ok(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&(4 + body.len() as u32).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    #[test]
    fn whole_messages_stop_after_the_first_ready_for_query_and_before_a_partial_one() {
        let status = message(b'S', b"application_name\0x\0");
        let ready = message(b'Z', b"I");
        let after = message(b'N', b"later");
        let seen = [status.clone(), ready.clone(), after.clone()].concat();
        assert_eq!(
            whole_messages(&seen, 1 << 20),
            Ok(status.len() + ready.len())
        );
        // A message cut short is left for the exact read.
        let cut = [status.clone(), after[..after.len() - 1].to_vec()].concat();
        assert_eq!(whole_messages(&cut, 1 << 20), Ok(status.len()));
        assert_eq!(whole_messages(&status[..3], 1 << 20), Ok(0));
        // Without a ReadyForQuery, every whole message.
        let two = [status.clone(), after.clone()].concat();
        assert_eq!(whole_messages(&two, 1 << 20), Ok(two.len()));
    }

    /// Over a real socket: everything up to the ReadyForQuery comes out message by message,
    /// and what the server sent after it is still in the socket for the next reader.
    #[tokio::test]
    async fn answers_are_taken_up_to_the_ready_for_query_and_what_follows_stays_in_the_socket() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut server = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let mut stream = Stream::Plain(listener.accept().await.unwrap().0);
        let after = message(b'N', b"for the relay");
        let all = [
            message(b'C', b"DISCARD ALL\0"),
            message(b'S', b"application_name\0\0"),
            message(b'Z', b"I"),
            after.clone(),
        ]
        .concat();
        server.write_all(&all).await.unwrap();
        let mut answers = Answers::default();
        let mut body = BytesMut::new();
        let mut tags = Vec::new();
        loop {
            let tag = answers.next(&mut stream, 1 << 20, &mut body).await.unwrap();
            tags.push(tag);
            if tag == b'Z' {
                assert_eq!(&body[..], b"I");
                break;
            }
        }
        assert_eq!(tags, b"CSZ");
        let Stream::Plain(tcp) = &mut stream else {
            unreachable!()
        };
        let mut rest = vec![0; after.len()];
        tokio::time::timeout(std::time::Duration::from_secs(5), tcp.read_exact(&mut rest))
            .await
            .expect("what followed the ReadyForQuery was taken from the socket")
            .unwrap();
        assert_eq!(rest, after);
    }

    #[test]
    fn a_length_read_message_would_refuse_is_an_error_here_too() {
        let mut bad = message(b'S', b"x");
        bad[1..5].copy_from_slice(&3u32.to_be_bytes());
        assert!(whole_messages(&bad, 1 << 20).is_err());
        let big = message(b'D', &[0; 100]);
        assert!(whole_messages(&big, 50).is_err());
    }
}
