//! Splitting a byte stream into tagged messages: one tag byte, then a big-endian length that
//! counts itself and the body but not the tag.

use super::MAX_MESSAGE_LEN;

/// The five bytes that start every tagged message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub tag: u8,
    /// The length field: four length bytes plus the body.
    pub len: usize,
}

impl Header {
    /// Bytes on the wire for the whole message, tag included.
    pub fn total(&self) -> usize {
        1 + self.len
    }

    /// Bytes of body after the five header bytes.
    pub fn body_len(&self) -> usize {
        self.len - 4
    }
}

/// A length field no valid message can have. The stream cannot be resynchronised after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    TooShort { tag: u8, len: u32 },
    TooLong { tag: u8, len: u32 },
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            FrameError::TooShort { tag, len } => write!(
                f,
                "invalid message length {len} for message type {}",
                printable(tag)
            ),
            FrameError::TooLong { tag, len } => write!(
                f,
                "message type {} of length {len} exceeds the limit of {MAX_MESSAGE_LEN} bytes",
                printable(tag)
            ),
        }
    }
}

/// Shows a tag the way PostgreSQL's own messages do: the character when printable.
pub fn printable(tag: u8) -> String {
    if tag.is_ascii_graphic() {
        format!("\"{}\"", tag as char)
    } else {
        format!("0x{tag:02x}")
    }
}

/// Reads the header at the front of `buf`. `Ok(None)` means fewer than five bytes are there yet.
pub fn parse_header(buf: &[u8]) -> Result<Option<Header>, FrameError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let tag = buf[0];
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(FrameError::TooShort { tag, len });
    }
    if len as usize > MAX_MESSAGE_LEN {
        return Err(FrameError::TooLong { tag, len });
    }
    Ok(Some(Header {
        tag,
        len: len as usize,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fewer_than_five_bytes_is_not_yet_a_header() {
        for n in 0..5 {
            assert_eq!(parse_header(&b"Q\0\0\0\x09"[..n]), Ok(None));
        }
    }

    #[test]
    fn header_reads_tag_and_length() {
        let h = parse_header(b"Q\0\0\0\x0dSELECT 1\0").unwrap().unwrap();
        assert_eq!(h, Header { tag: b'Q', len: 13 });
        assert_eq!(h.total(), 14);
        assert_eq!(h.body_len(), 9);
    }

    #[test]
    fn header_is_read_before_the_body_arrives() {
        let h = parse_header(b"D\0\x10\0\0").unwrap().unwrap();
        assert_eq!(h.len, 0x0010_0000);
    }

    #[test]
    fn length_below_four_is_an_error() {
        for len in 0u8..4 {
            let buf = [b'Q', 0, 0, 0, len];
            assert_eq!(
                parse_header(&buf),
                Err(FrameError::TooShort {
                    tag: b'Q',
                    len: len as u32
                })
            );
        }
        assert!(parse_header(b"S\0\0\0\x04").unwrap().is_some());
    }

    #[test]
    fn length_over_postgres_limit_is_an_error() {
        assert!(
            parse_header(&[b'd', 0x3f, 0xff, 0xff, 0xff])
                .unwrap()
                .is_some()
        );
        assert_eq!(
            parse_header(&[b'd', 0x40, 0, 0, 0]),
            Err(FrameError::TooLong {
                tag: b'd',
                len: 0x4000_0000
            })
        );
        assert!(
            FrameError::TooLong {
                tag: 0,
                len: u32::MAX
            }
            .to_string()
            .contains("0x00")
        );
    }
}
