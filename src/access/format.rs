//! The access line's text, written by hand: `core::fmt`'s machinery was most of a line's cost.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use super::LineFormat;
use super::record::Recorded;

/// The text format's line up to the method's value: the level, the target
/// ([`super::ACCESS_LOG`]) and the message, copied as one constant.
pub(super) const TEXT_HEAD: &[u8] = b"  INFO corral::access: request method=";

/// The JSON format's line from after its timestamp to the method's value.
const JSON_HEAD: &[u8] = b"\",\"level\":\"INFO\",\"fields\":{\"message\":\"request\",\"method\":";

/// The JSON format's line after its last field: the target ([`super::ACCESS_LOG`]).
pub(super) const JSON_TAIL: &[u8] = b"},\"target\":\"corral::access\"}\n";

/// The writer's formatting of lines, with what it remembers from one line to the next: the
/// date and time of the last second it wrote, the text of the last client address.
pub(super) struct LineText {
    format: LineFormat,
    /// The last second written and its `YYYY-MM-DDTHH:MM:SS` (19 bytes).
    second: (u64, [u8; 19]),
    /// The last IPv4 client and its text (at most 15 bytes, zeros after them) with its length:
    /// the lines of one connection, or of one sidecar's one neighbour, share it.
    ip: (Option<Ipv4Addr>, [u8; 16], usize),
}

impl LineText {
    pub(super) fn new(format: LineFormat) -> LineText {
        LineText {
            format,
            second: (u64::MAX, [0; 19]),
            ip: (None, [0; 16], 0),
        }
    }

    /// Formats one line into `buf`, without `core::fmt` (measured: its machinery was most of
    /// the writer's cost per line).
    pub(super) fn line(&mut self, buf: &mut Vec<u8>, line: &Recorded<'_>) {
        match self.format {
            LineFormat::Text => {
                self.timestamp(buf, line.at);
                buf.extend_from_slice(TEXT_HEAD);
                buf.extend_from_slice(line.method);
                buf.extend_from_slice(b" path=");
                buf.extend_from_slice(line.path);
                if let Some(query) = line.query {
                    buf.extend_from_slice(b" query=\"");
                    buf.extend_from_slice(query);
                    buf.push(b'"');
                }
                if let Some(client) = &line.client {
                    buf.extend_from_slice(b" client=");
                    self.socket_addr(buf, client);
                }
                if let Some(id) = line.request_id {
                    buf.extend_from_slice(b" request_id=\"");
                    buf.extend_from_slice(id);
                    buf.push(b'"');
                }
                buf.extend_from_slice(b" route=");
                buf.extend_from_slice(line.route);
                answer_fields(buf, line, TEXT_LABELS);
                buf.push(b'\n');
            }
            LineFormat::Json => {
                buf.extend_from_slice(b"{\"timestamp\":\"");
                self.timestamp(buf, line.at);
                buf.extend_from_slice(JSON_HEAD);
                json_string(buf, line.method);
                buf.extend_from_slice(b",\"path\":");
                json_string(buf, line.path);
                if let Some(query) = line.query {
                    buf.extend_from_slice(b",\"query\":");
                    json_string(buf, query);
                }
                if let Some(client) = &line.client {
                    // An address has nothing a JSON string must escape.
                    buf.extend_from_slice(b",\"client\":\"");
                    self.socket_addr(buf, client);
                    buf.push(b'"');
                }
                if let Some(id) = line.request_id {
                    buf.extend_from_slice(b",\"request_id\":");
                    json_string(buf, id);
                }
                buf.extend_from_slice(b",\"route\":");
                json_string(buf, line.route);
                answer_fields(buf, line, JSON_LABELS);
                buf.extend_from_slice(JSON_TAIL);
            }
        }
    }

    /// A client's address as `Display` writes it (`1.2.3.4:5`, `[::1]:5`); an IPv4 one without
    /// `core::fmt`, assembled on the stack from the last address's text, or a table of the
    /// octets' digits, and copied once (measured: formatting it was a third of the line's cost,
    /// then a sixth, then a ninth).
    pub(super) fn socket_addr(&mut self, buf: &mut Vec<u8>, addr: &SocketAddr) {
        let SocketAddr::V4(v4) = addr else {
            let _ = write!(buf, "{addr}");
            return;
        };
        let ip = *v4.ip();
        if self.ip.0 != Some(ip) {
            self.ip = (Some(ip), [0; 16], 0);
            let (_, text, len) = &mut self.ip;
            for (i, octet) in ip.octets().into_iter().enumerate() {
                if i > 0 {
                    text[*len] = b'.';
                    *len += 1;
                }
                // Each octet is copied as 3 bytes, of which the next write covers those past
                // its digits.
                let (digits, count) = OCTETS[usize::from(octet)];
                text[*len..*len + 3].copy_from_slice(&digits);
                *len += count;
            }
        }
        // "255.255.255.255:65535" is 21 bytes; the port is copied as 5 bytes.
        let mut text = [0u8; 24];
        text[..16].copy_from_slice(&self.ip.1);
        let mut len = self.ip.2;
        text[len] = b':';
        len += 1;
        let (digits, count) = port_digits(v4.port());
        text[len..len + 5].copy_from_slice(&digits);
        len += count;
        buf.extend_from_slice(&text[..len]);
    }

    /// RFC 3339 in UTC with microseconds, as `tracing-subscriber` writes it, of a time since
    /// the Unix epoch: `2026-01-02T03:04:05.678901Z`.
    pub(super) fn timestamp(&mut self, buf: &mut Vec<u8>, since: Duration) {
        let secs = since.as_secs();
        // The writer formats thousands of lines within one second: their date and time up to
        // the second are written once and copied after.
        if self.second.0 == secs {
            buf.extend_from_slice(&self.second.1);
        } else {
            let start = buf.len();
            let (days, of_day) = (secs / 86_400, secs % 86_400);
            let (year, month, day) = civil(days);
            padded(buf, year, 4);
            buf.push(b'-');
            padded(buf, month, 2);
            buf.push(b'-');
            padded(buf, day, 2);
            buf.push(b'T');
            padded(buf, of_day / 3600, 2);
            buf.push(b':');
            padded(buf, of_day / 60 % 60, 2);
            buf.push(b':');
            padded(buf, of_day % 60, 2);
            if let Ok(text) = <[u8; 19]>::try_from(&buf[start..]) {
                self.second = (secs, text);
            }
        }
        // The microseconds (< 1,000,000) as three pairs of digits from a table.
        let micros = usize::try_from(since.subsec_micros()).unwrap_or(0);
        let pair = |n: usize| PAIRS[n % 100];
        let ([a, b], [c, d], [e, f]) = (pair(micros / 10_000), pair(micros / 100), pair(micros));
        buf.extend_from_slice(&[b'.', a, b, c, d, e, f, b'Z']);
    }
}

/// What comes before each of the answer's fields in a format: status, outcome (its value is
/// quoted in both), bytes, micros.
type Labels = [&'static [u8]; 4];

const TEXT_LABELS: Labels = [b" status=", b" outcome=\"", b" bytes=", b" micros="];

const JSON_LABELS: Labels = [
    b",\"status\":",
    b",\"outcome\":\"",
    b",\"bytes\":",
    b",\"micros\":",
];

/// The answer's fields, which both formats write alike but for their labels. Inlined into each
/// format so its labels are constants (a label of run-time length would cost a `memcpy` call).
#[inline(always)]
fn answer_fields(buf: &mut Vec<u8>, line: &Recorded<'_>, [status, outcome, bytes, micros]: Labels) {
    buf.extend_from_slice(status);
    decimal(buf, u64::from(line.status));
    buf.extend_from_slice(outcome);
    buf.extend_from_slice(line.outcome.as_str().as_bytes());
    buf.push(b'"');
    if let Some(sent) = line.bytes {
        buf.extend_from_slice(bytes);
        decimal(buf, sent);
    }
    buf.extend_from_slice(micros);
    decimal(buf, line.micros);
}

/// A port's decimal digits, first to last (zeros after them to 5 bytes), and how many they are.
fn port_digits(port: u16) -> ([u8; 5], usize) {
    let n = usize::from(port);
    let [c, d] = PAIRS[n / 100 % 100];
    let [e, f] = PAIRS[n % 100];
    match n {
        0..=9 => ([f, 0, 0, 0, 0], 1),
        10..=99 => ([e, f, 0, 0, 0], 2),
        100..=999 => ([d, e, f, 0, 0], 3),
        1000..=9999 => ([c, d, e, f, 0], 4),
        _ => ([PAIRS[n / 10_000][1], c, d, e, f], 5),
    }
}

/// Each octet's decimal digits (padded with zeros after them to 3 bytes) and how many they are.
const OCTETS: [([u8; 3], usize); 256] = {
    let mut table = [([0u8; 3], 0usize); 256];
    let mut n = 0;
    while n < 256 {
        let (hundreds, tens, ones) = (
            b'0' + (n / 100) as u8,
            b'0' + (n / 10 % 10) as u8,
            b'0' + (n % 10) as u8,
        );
        table[n] = match n {
            0..=9 => ([ones, 0, 0], 1),
            10..=99 => ([tens, ones, 0], 2),
            _ => ([hundreds, tens, ones], 3),
        };
        n += 1;
    }
    table
};

/// `n` in decimal; up to four digits (a status, a hit's microseconds) by fixed-size copies from
/// the table of pairs (a run-time length calls `memcpy`).
pub(super) fn decimal(buf: &mut Vec<u8>, n: u64) {
    let Ok(small @ 0..=9999) = usize::try_from(n) else {
        buf.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
        return;
    };
    let ([a, b], [c, d]) = (PAIRS[small / 100], PAIRS[small % 100]);
    match small {
        0..=9 => buf.push(d),
        10..=99 => buf.extend_from_slice(&[c, d]),
        100..=999 => buf.extend_from_slice(&[b, c, d]),
        _ => buf.extend_from_slice(&[a, b, c, d]),
    }
}

/// `n` in decimal, zero-padded to `width` digits (`n` has no more).
pub(super) fn padded(buf: &mut Vec<u8>, n: u64, width: usize) {
    let mut digits = [b'0'; 20];
    let mut rest = n;
    for at in (0..width).rev() {
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
    }
    buf.extend_from_slice(&digits[..width]);
}

/// A JSON string literal: quotes, backslashes and control characters escaped. A string with
/// none of them (nearly every one) is copied whole after a check of 8 bytes at a time; else byte
/// by byte, the runs between escapes copied whole (a UTF-8 sequence's bytes are all ≥ 0x80, never
/// escaped): decoding each character was the line's largest cost, then the byte loop was.
pub(super) fn json_string(buf: &mut Vec<u8>, bytes: &[u8]) {
    buf.push(b'"');
    if needs_escape(bytes) {
        escaped(buf, bytes);
    } else {
        buf.extend_from_slice(bytes);
    }
    buf.push(b'"');
}

/// Whether any byte is a quote, a backslash or a control character: per 8 bytes, the classic
/// bit tests for a byte below 0x20 and for a zero byte in `word ^ c` (each exact in saying
/// whether any byte matches, which is all that is asked).
pub(super) fn needs_escape(bytes: &[u8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    let below = |word: u64, n: u8| word.wrapping_sub(ONES * u64::from(n)) & !word & HIGHS;
    let mut chunks = bytes.chunks_exact(8);
    let mut found = 0;
    for chunk in &mut chunks {
        let word = chunk
            .try_into()
            .map_or(0, |eight: [u8; 8]| u64::from_ne_bytes(eight));
        found |= below(word, 0x20)
            | below(word ^ (ONES * u64::from(b'"')), 1)
            | below(word ^ (ONES * u64::from(b'\\')), 1);
    }
    found != 0
        || chunks
            .remainder()
            .iter()
            .any(|&b| b < 0x20 || b == b'"' || b == b'\\')
}

/// `bytes` with JSON's escapes, without the quotes.
fn escaped(buf: &mut Vec<u8>, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut copied = 0;
    for (at, &byte) in bytes.iter().enumerate() {
        let control;
        let escape: &[u8] = match byte {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            0..0x20 => {
                control = [
                    b'\\',
                    b'u',
                    b'0',
                    b'0',
                    HEX[usize::from(byte >> 4)],
                    HEX[usize::from(byte & 0xf)],
                ];
                &control
            }
            _ => continue,
        };
        buf.extend_from_slice(&bytes[copied..at]);
        buf.extend_from_slice(escape);
        copied = at + 1;
    }
    buf.extend_from_slice(&bytes[copied..]);
}

/// The two decimal digits of each number below 100.
const PAIRS: [[u8; 2]; 100] = {
    let mut table = [[0u8; 2]; 100];
    let mut n = 0;
    while n < 100 {
        table[n] = [b'0' + (n / 10) as u8, b'0' + (n % 10) as u8];
        n += 1;
    }
    table
};

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, for days ≥ 0).
pub(super) fn civil(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}
