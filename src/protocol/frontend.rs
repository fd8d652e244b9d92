//! Messages a client sends, and the fields of the few bulkhead looks inside. Every decoder
//! takes a message body (after the five header bytes) that may be truncated; a field that does
//! not fit is `None`.

use super::cstr;

pub const BIND_TAG: u8 = b'B';
pub const CLOSE_TAG: u8 = b'C';
pub const COPY_DATA_TAG: u8 = b'd';
pub const COPY_DONE_TAG: u8 = b'c';
pub const COPY_FAIL_TAG: u8 = b'f';
pub const DESCRIBE_TAG: u8 = b'D';
pub const EXECUTE_TAG: u8 = b'E';
pub const FLUSH_TAG: u8 = b'H';
pub const FUNCTION_CALL_TAG: u8 = b'F';
pub const PARSE_TAG: u8 = b'P';
pub const PASSWORD_TAG: u8 = b'p';
pub const QUERY_TAG: u8 = b'Q';
pub const SYNC_TAG: u8 = b'S';
pub const TERMINATE_TAG: u8 = b'X';

/// Appends a Parse of `text` as statement `name`, with no parameter types.
pub fn write_parse(out: &mut bytes::BytesMut, name: &[u8], text: &[u8]) {
    use bytes::BufMut;
    out.put_u8(PARSE_TAG);
    out.put_u32((4 + name.len() + 1 + text.len() + 1 + 2) as u32);
    out.put_slice(name);
    out.put_u8(0);
    out.put_slice(text);
    out.put_u8(0);
    out.put_u16(0);
}

/// Appends a Bind of `statement` to `portal` with no parameters and default result formats.
pub fn write_bind(out: &mut bytes::BytesMut, portal: &[u8], statement: &[u8]) {
    use bytes::BufMut;
    out.put_u8(BIND_TAG);
    out.put_u32((4 + portal.len() + 1 + statement.len() + 1 + 2 + 2 + 2) as u32);
    out.put_slice(portal);
    out.put_u8(0);
    out.put_slice(statement);
    out.put_u8(0);
    out.put_u16(0);
    out.put_u16(0);
    out.put_u16(0);
}

/// The statement text of a Query: all but its final NUL (all of it if it was cut off). A
/// text with a NUL inside never runs: PostgreSQL refuses the message (08P01), so a text
/// taken past that NUL misleads nothing; not searching for one saves a pass per statement.
pub fn query_text(body: &[u8]) -> &[u8] {
    body.strip_suffix(&[0]).unwrap_or(body)
}

/// Statement name and text of a Parse. The text may be cut short if the body was.
pub fn parse_message(body: &[u8]) -> Option<(&[u8], &[u8])> {
    let (name, rest) = cstr(body)?;
    Some((name, cstr(rest).map_or(rest, |(text, _)| text)))
}

/// Portal and statement names of a Bind.
pub fn bind_names(body: &[u8]) -> Option<(&[u8], &[u8])> {
    let (portal, rest) = cstr(body)?;
    let (statement, _) = cstr(rest)?;
    Some((portal, statement))
}

/// Portal name of an Execute.
pub fn execute_portal(body: &[u8]) -> Option<&[u8]> {
    cstr(body).map(|(portal, _)| portal)
}

/// What a Close names: `(b'S', statement)` or `(b'P', portal)`.
pub fn close_target(body: &[u8]) -> Option<(u8, &[u8])> {
    let (&kind, rest) = body.split_first()?;
    let (name, _) = cstr(rest)?;
    Some((kind, name))
}

/// Mechanism and first client message of a SASLInitialResponse. The message is empty when the
/// client sent none (length -1).
pub fn sasl_initial_response(body: &[u8]) -> Option<(&[u8], &[u8])> {
    let (mechanism, rest) = cstr(body)?;
    let len = i32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
    let data = if len < 0 {
        &[][..]
    } else {
        rest.get(4..4 + len as usize)?
    };
    Some((mechanism, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoders_read_their_fields() {
        assert_eq!(query_text(b"SELECT 1\0"), b"SELECT 1");
        assert_eq!(query_text(b"SELECT 1 /* cut"), b"SELECT 1 /* cut");
        assert_eq!(
            parse_message(b"s1\0INSERT INTO t VALUES ($1)\0\0\0"),
            Some((&b"s1"[..], &b"INSERT INTO t VALUES ($1)"[..]))
        );
        assert_eq!(parse_message(b"no terminator"), None);
        assert_eq!(bind_names(b"\0s1\0\0\0"), Some((&b""[..], &b"s1"[..])));
        assert_eq!(bind_names(b"p\0"), None);
        assert_eq!(execute_portal(b"p1\0\0\0\0\0"), Some(&b"p1"[..]));
        assert_eq!(close_target(b"Ss1\0"), Some((b'S', &b"s1"[..])));
        assert_eq!(close_target(b""), None);
        assert_eq!(
            sasl_initial_response(b"SCRAM-SHA-256\0\0\0\0\x04y,,n"),
            Some((&b"SCRAM-SHA-256"[..], &b"y,,n"[..]))
        );
        assert_eq!(
            sasl_initial_response(b"M\0\xff\xff\xff\xff"),
            Some((&b"M"[..], &b""[..]))
        );
        assert_eq!(sasl_initial_response(b"M\0\0\0\0\x09short"), None);
        assert_eq!(sasl_initial_response(b"M"), None);
    }

    #[test]
    fn built_parse_and_bind_decode_back() {
        let mut out = bytes::BytesMut::new();
        write_parse(&mut out, b"s1", b"ROLLBACK");
        write_bind(&mut out, b"p", b"s1");
        let h = crate::protocol::framing::parse_header(&out)
            .unwrap()
            .unwrap();
        assert_eq!(
            parse_message(&out[5..h.total()]),
            Some((&b"s1"[..], &b"ROLLBACK"[..]))
        );
        let rest = &out[h.total()..];
        let b = crate::protocol::framing::parse_header(rest)
            .unwrap()
            .unwrap();
        assert_eq!(b.total(), rest.len());
        assert_eq!(bind_names(&rest[5..]), Some((&b"p"[..], &b"s1"[..])));
    }
}
