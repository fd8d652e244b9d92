//! Messages a server sends: their tags, the few bulkhead decodes, and builders for the ones
//! bulkhead sends to a client itself (its own errors, its own cancel key).

use bytes::{BufMut, BytesMut};

use super::cstr;

pub const AUTHENTICATION_TAG: u8 = b'R';
pub const BACKEND_KEY_DATA_TAG: u8 = b'K';
pub const CLOSE_COMPLETE_TAG: u8 = b'3';
pub const COMMAND_COMPLETE_TAG: u8 = b'C';
pub const COPY_IN_RESPONSE_TAG: u8 = b'G';
pub const COPY_OUT_RESPONSE_TAG: u8 = b'H';
pub const COPY_BOTH_RESPONSE_TAG: u8 = b'W';
pub const DATA_ROW_TAG: u8 = b'D';
pub const ERROR_RESPONSE_TAG: u8 = b'E';
pub const NOTICE_RESPONSE_TAG: u8 = b'N';
pub const NOTIFICATION_RESPONSE_TAG: u8 = b'A';
pub const PARAMETER_STATUS_TAG: u8 = b'S';
pub const PARSE_COMPLETE_TAG: u8 = b'1';
pub const READY_FOR_QUERY_TAG: u8 = b'Z';

/// Transaction status carried by ReadyForQuery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxStatus {
    Idle,
    InBlock,
    Failed,
}

impl TxStatus {
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            b'I' => Some(TxStatus::Idle),
            b'T' => Some(TxStatus::InBlock),
            b'E' => Some(TxStatus::Failed),
            _ => None,
        }
    }

    pub fn byte(self) -> u8 {
        match self {
            TxStatus::Idle => b'I',
            TxStatus::InBlock => b'T',
            TxStatus::Failed => b'E',
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
    Panic,
    /// Notices and anything else that is not an error.
    Other,
}

/// The fields of an ErrorResponse (or NoticeResponse) that bulkhead acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorInfo<'a> {
    pub severity: Severity,
    pub code: &'a [u8],
    /// The primary message ('M'), empty if absent.
    pub message: &'a [u8],
}

/// Decodes the severity, SQLSTATE and message of an ErrorResponse body. Prefers the non-localised
/// severity field 'V' (9.6+) over 'S'.
pub fn error_info(body: &[u8]) -> ErrorInfo<'_> {
    let mut severity_v = None;
    let mut severity_s = None;
    let mut code: &[u8] = b"";
    let mut message: &[u8] = b"";
    let mut rest = body;
    while let Some((&field, after)) = rest.split_first() {
        if field == 0 {
            break;
        }
        let Some((value, after)) = cstr(after) else {
            break;
        };
        match field {
            b'V' => severity_v = Some(value),
            b'S' => severity_s = Some(value),
            b'C' => code = value,
            b'M' => message = value,
            _ => {}
        }
        rest = after;
    }
    let severity = match severity_v.or(severity_s) {
        Some(b"ERROR") => Severity::Error,
        Some(b"FATAL") => Severity::Fatal,
        Some(b"PANIC") => Severity::Panic,
        _ => Severity::Other,
    };
    ErrorInfo {
        severity,
        code,
        message,
    }
}

/// An error or notice that bulkhead raises itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorFields<'a> {
    pub severity: Severity,
    pub code: &'a str,
    pub message: &'a str,
    pub hint: Option<&'a str>,
}

/// Appends an ErrorResponse to `out`.
pub fn write_error(out: &mut BytesMut, e: &ErrorFields<'_>) {
    let severity = match e.severity {
        Severity::Error => "ERROR",
        Severity::Fatal => "FATAL",
        Severity::Panic => "PANIC",
        Severity::Other => "WARNING",
    };
    let start = begin(out, ERROR_RESPONSE_TAG);
    for (field, value) in [
        (b'S', severity),
        (b'V', severity),
        (b'C', e.code),
        (b'M', e.message),
    ] {
        put_field(out, field, value);
    }
    if let Some(hint) = e.hint {
        put_field(out, b'H', hint);
    }
    out.put_u8(0);
    finish(out, start);
}

/// Appends ReadyForQuery to `out`.
pub fn write_ready_for_query(out: &mut BytesMut, status: TxStatus) {
    out.put_u8(READY_FOR_QUERY_TAG);
    out.put_u32(5);
    out.put_u8(status.byte());
}

/// Appends CommandComplete with `tag` (e.g. "ROLLBACK").
pub fn write_command_complete(out: &mut BytesMut, tag: &str) {
    let start = begin(out, COMMAND_COMPLETE_TAG);
    out.put_slice(tag.as_bytes());
    out.put_u8(0);
    finish(out, start);
}

/// Appends a message with no body: ParseComplete ('1'), BindComplete ('2'), CloseComplete
/// ('3'), NoData ('n').
pub fn write_empty(out: &mut BytesMut, tag: u8) {
    out.put_u8(tag);
    out.put_u32(4);
}

/// Appends a ParameterDescription of no parameters.
pub fn write_no_parameters(out: &mut BytesMut) {
    out.put_u8(b't');
    out.put_u32(6);
    out.put_u16(0);
}

/// Appends BackendKeyData to `out`.
pub fn write_backend_key_data(out: &mut BytesMut, pid: i32, key: &[u8]) {
    let start = begin(out, BACKEND_KEY_DATA_TAG);
    out.put_i32(pid);
    out.put_slice(key);
    finish(out, start);
}

/// Splits a BackendKeyData body into process id and secret key.
pub fn backend_key_data(body: &[u8]) -> Option<(i32, &[u8])> {
    if body.len() < 8 {
        return None;
    }
    Some((
        i32::from_be_bytes([body[0], body[1], body[2], body[3]]),
        &body[4..],
    ))
}

/// The SASL mechanism that binds authentication to the TLS session it runs on.
pub const SCRAM_PLUS: &[u8] = b"SCRAM-SHA-256-PLUS";

/// Whether an Authentication body is AuthenticationSASL (code 10), the server's list of SASL
/// mechanisms.
pub fn is_sasl_offer(body: &[u8]) -> bool {
    body.starts_with(&10i32.to_be_bytes())
}

/// For an AuthenticationSASL body that offers SCRAM-SHA-256-PLUS: the whole message again
/// without it, appended to `out`. Returns false, and writes nothing, for anything else.
pub fn write_sasl_offer_without_plus(out: &mut BytesMut, body: &[u8]) -> bool {
    if !is_sasl_offer(body) {
        return false;
    }
    let mut names = Vec::new();
    let mut rest = &body[4..];
    while let Some((name, after)) = cstr(rest) {
        if name.is_empty() {
            break;
        }
        names.push(name);
        rest = after;
    }
    if !names.contains(&SCRAM_PLUS) {
        return false;
    }
    let start = begin(out, AUTHENTICATION_TAG);
    out.put_i32(10);
    for name in names.into_iter().filter(|n| *n != SCRAM_PLUS) {
        out.put_slice(name);
        out.put_u8(0);
    }
    out.put_u8(0);
    finish(out, start);
    true
}

fn put_field(out: &mut BytesMut, field: u8, value: &str) {
    out.put_u8(field);
    // An embedded NUL would end the field early; bulkhead's own texts never have one.
    out.put_slice(value.as_bytes());
    out.put_u8(0);
}

/// Writes the tag and a placeholder length; returns where the length goes.
fn begin(out: &mut BytesMut, tag: u8) -> usize {
    out.put_u8(tag);
    let at = out.len();
    out.put_u32(0);
    at
}

fn finish(out: &mut BytesMut, at: usize) {
    let len = (out.len() - at) as u32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::framing::parse_header;

    #[test]
    fn sasl_offer_loses_only_the_plus_mechanism() {
        let body = b"\0\0\0\x0aSCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0";
        let mut out = BytesMut::new();
        assert!(write_sasl_offer_without_plus(&mut out, body));
        assert_eq!(&out[..], b"R\0\0\0\x17\0\0\0\x0aSCRAM-SHA-256\0\0");
        let h = parse_header(&out).unwrap().unwrap();
        assert_eq!(h.total(), out.len());
        // Nothing to remove, or not a SASL offer: left alone.
        let mut out = BytesMut::new();
        assert!(!write_sasl_offer_without_plus(
            &mut out,
            b"\0\0\0\x0aSCRAM-SHA-256\0\0"
        ));
        assert!(!write_sasl_offer_without_plus(&mut out, b"\0\0\0\x05salt"));
        assert!(!write_sasl_offer_without_plus(&mut out, b"\0\0"));
        assert!(out.is_empty());
    }

    #[test]
    fn error_response_round_trips() {
        let mut out = BytesMut::new();
        write_error(
            &mut out,
            &ErrorFields {
                severity: Severity::Fatal,
                code: "08P01",
                message: "bulkhead: bad",
                hint: Some("fix it"),
            },
        );
        let h = parse_header(&out).unwrap().unwrap();
        assert_eq!(h.tag, b'E');
        assert_eq!(h.total(), out.len());
        let info = error_info(&out[5..]);
        assert_eq!(
            info,
            ErrorInfo {
                severity: Severity::Fatal,
                code: b"08P01",
                message: b"bulkhead: bad",
            }
        );
        assert!(out.windows(6).any(|w| w == b"Hfix i"));
    }

    #[test]
    fn error_info_prefers_nonlocalised_severity() {
        let body = b"SFEHLER\0VERROR\0C57014\0Mcanceled\0\0";
        assert_eq!(
            error_info(body),
            ErrorInfo {
                severity: Severity::Error,
                code: b"57014",
                message: b"canceled",
            }
        );
        let body = b"SFATAL\0C57P01\0\0";
        assert_eq!(error_info(body).severity, Severity::Fatal);
        assert_eq!(error_info(b"").severity, Severity::Other);
        assert_eq!(error_info(b"Sunterminated").code, b"");
    }

    #[test]
    fn ready_for_query_and_key_data() {
        let mut out = BytesMut::new();
        write_ready_for_query(&mut out, TxStatus::InBlock);
        assert_eq!(&out[..], b"Z\0\0\0\x05T");
        out.clear();
        write_backend_key_data(&mut out, 7, &[1, 2, 3, 4]);
        assert_eq!(&out[..], b"K\0\0\0\x0c\0\0\0\x07\x01\x02\x03\x04");
        assert_eq!(backend_key_data(&out[5..]), Some((7, &[1u8, 2, 3, 4][..])));
        assert_eq!(backend_key_data(b"abc"), None);
    }
}
