//! The first packet of a connection: untagged, a length and then a 32-bit code that says what
//! it is (a StartupMessage's code is its protocol version).

use super::cstr;

pub const CANCEL_REQUEST_CODE: u32 = 80_877_102;
pub const SSL_REQUEST_CODE: u32 = 80_877_103;
pub const GSSENC_REQUEST_CODE: u32 = 80_877_104;

/// PostgreSQL's `MAX_STARTUP_PACKET_LENGTH`: a longer first packet is refused.
pub const MAX_STARTUP_LEN: usize = 10_000;

/// Protocol 3.2 (PostgreSQL 18) lets a cancel key be up to 256 bytes.
pub const MAX_CANCEL_KEY_LEN: usize = 256;

/// What the first packet asks for. Borrows from the read buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Startup<'a> {
    SslRequest,
    GssEncRequest,
    Cancel {
        pid: i32,
        key: &'a [u8],
    },
    /// A StartupMessage for protocol 3.x; `params` are the raw name/value pairs, NUL-terminated.
    Start {
        minor: u16,
        params: Params<'a>,
    },
}

/// Why a first packet was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupError {
    /// The length field is below the smallest packet or above `MAX_STARTUP_LEN`.
    BadLength(u32),
    /// The packet is framed correctly but its content is not valid.
    Malformed(&'static str),
    /// Protocol major version other than 3 (2.0 and older are long gone).
    UnsupportedProtocol { major: u16, minor: u16 },
}

impl StartupError {
    /// Whether PostgreSQL closes the connection without a word for this (it reports the
    /// class of error to its log only, COMMERROR): a length it cannot trust, including a
    /// cancel request of the wrong size. A client that sends Terminate as its very first bytes
    /// (node-postgres does, to disconnect before startup) lands here.
    pub fn closes_silently(&self) -> bool {
        matches!(
            self,
            StartupError::BadLength(_)
                | StartupError::Malformed("cancel request of the wrong length")
        )
    }
}

impl std::fmt::Display for StartupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartupError::BadLength(n) => write!(f, "invalid length of startup packet: {n}"),
            StartupError::Malformed(what) => write!(f, "invalid startup packet: {what}"),
            StartupError::UnsupportedProtocol { major, minor } => write!(
                f,
                "unsupported frontend protocol {major}.{minor}: bulkhead supports 3.0 to 3.x"
            ),
        }
    }
}

/// Parses the first packet at the front of `buf`. `Ok(None)` means more bytes are needed;
/// otherwise returns the packet and how many bytes it took.
pub fn parse(buf: &[u8]) -> Result<Option<(Startup<'_>, usize)>, StartupError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if len < 8 || len as usize > MAX_STARTUP_LEN {
        return Err(StartupError::BadLength(len));
    }
    let len = len as usize;
    if buf.len() < len {
        return Ok(None);
    }
    let code = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
    let body = &buf[8..len];
    let packet = match code {
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE if !body.is_empty() => {
            return Err(StartupError::Malformed("encryption request with a body"));
        }
        SSL_REQUEST_CODE => Startup::SslRequest,
        GSSENC_REQUEST_CODE => Startup::GssEncRequest,
        CANCEL_REQUEST_CODE => {
            if body.len() < 8 || body.len() > 4 + MAX_CANCEL_KEY_LEN {
                return Err(StartupError::Malformed(
                    "cancel request of the wrong length",
                ));
            }
            let pid = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
            Startup::Cancel {
                pid,
                key: &body[4..],
            }
        }
        _ => {
            let (major, minor) = ((code >> 16) as u16, (code & 0xffff) as u16);
            if major != 3 {
                return Err(StartupError::UnsupportedProtocol { major, minor });
            }
            Startup::Start {
                minor,
                params: Params::new(body)?,
            }
        }
    };
    Ok(Some((packet, len)))
}

/// Startup parameters, validated once: name/value C strings ending in an empty name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params<'a>(&'a [u8]);

impl<'a> Params<'a> {
    fn new(body: &'a [u8]) -> Result<Self, StartupError> {
        let mut rest = body;
        loop {
            let (name, after) =
                cstr(rest).ok_or(StartupError::Malformed("missing terminator in parameters"))?;
            if name.is_empty() {
                if !after.is_empty() {
                    return Err(StartupError::Malformed("bytes after the final terminator"));
                }
                return Ok(Params(body));
            }
            let (_, after) = cstr(after).ok_or(StartupError::Malformed(
                "parameter without a terminated value",
            ))?;
            rest = after;
        }
    }

    /// The value of parameter `name`, if the client sent it.
    pub fn get(&self, name: &str) -> Option<&'a str> {
        self.iter()
            .find(|(n, _)| *n == name.as_bytes())
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    /// Every name/value pair, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&'a [u8], &'a [u8])> {
        let mut rest = self.0;
        std::iter::from_fn(move || {
            let (name, after) = cstr(rest)?;
            if name.is_empty() {
                return None;
            }
            let (value, after) = cstr(after)?;
            rest = after;
            Some((name, value))
        })
    }
}

/// The StartupMessage `packet` (whole, as `parse` took it) with parameter `name` set to
/// `value`: any value the client sent for it is dropped. `None` if it is not a StartupMessage.
pub fn with_param(packet: &[u8], name: &str, value: &str) -> Option<Vec<u8>> {
    let (Startup::Start { params, .. }, len) = parse(packet).ok()?? else {
        return None;
    };
    let mut out = Vec::with_capacity(len + name.len() + value.len() + 2);
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&packet[4..8]);
    for (n, v) in params.iter().filter(|(n, _)| *n != name.as_bytes()) {
        for part in [n, v] {
            out.extend_from_slice(part);
            out.push(0);
        }
    }
    for part in [name.as_bytes(), value.as_bytes()] {
        out.extend_from_slice(part);
        out.push(0);
    }
    out.push(0);
    let total = out.len() as u32;
    out[..4].copy_from_slice(&total.to_be_bytes());
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parameter_is_set_in_a_startup_packet_replacing_the_clients() {
        let body = b"user\0app\0default_transaction_read_only\0off\0database\0db\0\0";
        let p = packet(0x0003_0000, body);
        let out = with_param(&p, "default_transaction_read_only", "on").unwrap();
        let (Startup::Start { params, minor }, len) = parse(&out).unwrap().unwrap() else {
            panic!("not a startup packet");
        };
        assert_eq!((minor, len), (0, out.len()));
        assert_eq!(params.get("user"), Some("app"));
        assert_eq!(params.get("database"), Some("db"));
        assert_eq!(params.get("default_transaction_read_only"), Some("on"));
        assert_eq!(params.iter().count(), 3);
        assert!(with_param(&packet(SSL_REQUEST_CODE, b""), "a", "b").is_none());
    }

    fn packet(code: u32, body: &[u8]) -> Vec<u8> {
        let mut v = ((8 + body.len()) as u32).to_be_bytes().to_vec();
        v.extend_from_slice(&code.to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn ssl_and_gssenc_requests() {
        let p = packet(SSL_REQUEST_CODE, b"");
        assert_eq!(parse(&p).unwrap(), Some((Startup::SslRequest, 8)));
        let p = packet(GSSENC_REQUEST_CODE, b"");
        assert_eq!(parse(&p).unwrap(), Some((Startup::GssEncRequest, 8)));
        let p = packet(SSL_REQUEST_CODE, b"x");
        assert!(matches!(parse(&p), Err(StartupError::Malformed(_))));
    }

    #[test]
    fn cancel_request_with_classic_and_long_keys() {
        let p = packet(CANCEL_REQUEST_CODE, &[0, 0, 0, 42, 1, 2, 3, 4]);
        assert_eq!(
            parse(&p).unwrap(),
            Some((
                Startup::Cancel {
                    pid: 42,
                    key: &[1, 2, 3, 4]
                },
                16
            ))
        );
        let mut body = vec![0, 0, 1, 0];
        body.extend_from_slice(&[9; 32]);
        let p = packet(CANCEL_REQUEST_CODE, &body);
        assert!(
            matches!(parse(&p).unwrap(), Some((Startup::Cancel { pid: 256, key }, 44)) if key.len() == 32)
        );
        let p = packet(CANCEL_REQUEST_CODE, &[0, 0, 0, 42]);
        assert!(matches!(parse(&p), Err(StartupError::Malformed(_))));
    }

    #[test]
    fn startup_message_parameters() {
        let p = packet(196_608, b"user\0alice\0database\0db\0\0");
        let (s, n) = parse(&p).unwrap().unwrap();
        assert_eq!(n, p.len());
        let Startup::Start { minor, params } = s else {
            panic!("{s:?}")
        };
        assert_eq!(minor, 0);
        assert_eq!(params.get("user"), Some("alice"));
        assert_eq!(params.get("database"), Some("db"));
        assert_eq!(params.get("options"), None);
        assert_eq!(params.iter().count(), 2);
    }

    #[test]
    fn protocol_3_2_is_accepted_and_2_0_refused() {
        let p = packet(196_610, b"user\0a\0\0");
        assert!(matches!(
            parse(&p).unwrap(),
            Some((Startup::Start { minor: 2, .. }, _))
        ));
        let p = packet(131_072, b"user\0a\0\0");
        assert_eq!(
            parse(&p),
            Err(StartupError::UnsupportedProtocol { major: 2, minor: 0 })
        );
    }

    #[test]
    fn malformed_parameters() {
        for body in [
            &b"user\0alice\0"[..],
            b"user\0alice",
            b"user\0",
            b"user\0a\0\0junk",
            b"",
        ] {
            let p = packet(196_608, body);
            assert!(
                matches!(parse(&p), Err(StartupError::Malformed(_))),
                "{body:?}"
            );
        }
    }

    #[test]
    fn lengths_out_of_range() {
        assert_eq!(
            parse(&[0, 0, 0, 7, 0, 0, 0, 0]),
            Err(StartupError::BadLength(7))
        );
        assert_eq!(
            parse(&[0, 0, 0x27, 0x11]),
            Err(StartupError::BadLength(10_001))
        );
        assert_eq!(
            parse(&[0xff, 0xff, 0xff, 0xff]),
            Err(StartupError::BadLength(u32::MAX))
        );
    }

    #[test]
    fn partial_packets_need_more() {
        let p = packet(196_608, b"user\0alice\0\0");
        for n in 0..p.len() {
            assert_eq!(parse(&p[..n]), Ok(None), "prefix of {n}");
        }
    }
}
