//! The access line's text, written by hand: `core::fmt`'s machinery was most of a line's cost.

use std::io::Write;
use std::time::Duration;

use super::{ACCESS_LOG, AccessLine, LineFormat};

/// Formats one line into `buf`, without `core::fmt` (measured: its machinery was most of the
/// writer's cost per line).
pub(super) fn format_line(buf: &mut Vec<u8>, format: LineFormat, line: &AccessLine<'_>) {
    match format {
        LineFormat::Text => {
            timestamp(buf, line.at);
            buf.extend_from_slice(b"  INFO ");
            buf.extend_from_slice(ACCESS_LOG.as_bytes());
            buf.extend_from_slice(b": request method=");
            buf.extend_from_slice(line.method.as_bytes());
            buf.extend_from_slice(b" path=");
            buf.extend_from_slice(line.path.as_bytes());
            if let Some(query) = line.query {
                buf.extend_from_slice(b" query=\"");
                buf.extend_from_slice(query.as_bytes());
                buf.push(b'"');
            }
            if let Some(client) = &line.client {
                buf.extend_from_slice(b" client=");
                socket_addr(buf, client);
            }
            if let Some(id) = line.request_id {
                buf.extend_from_slice(b" request_id=\"");
                buf.extend_from_slice(id.as_bytes());
                buf.push(b'"');
            }
            buf.extend_from_slice(b" route=");
            buf.extend_from_slice(line.route.as_bytes());
            buf.extend_from_slice(b" status=");
            decimal(buf, u64::from(line.status));
            buf.extend_from_slice(b" outcome=\"");
            buf.extend_from_slice(line.outcome.as_str().as_bytes());
            buf.push(b'"');
            if let Some(bytes) = line.bytes {
                buf.extend_from_slice(b" bytes=");
                decimal(buf, bytes);
            }
            buf.extend_from_slice(b" micros=");
            decimal(buf, line.micros);
            buf.push(b'\n');
        }
        LineFormat::Json => {
            buf.extend_from_slice(b"{\"timestamp\":\"");
            timestamp(buf, line.at);
            buf.extend_from_slice(
                b"\",\"level\":\"INFO\",\"fields\":{\"message\":\"request\",\"method\":",
            );
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
                socket_addr(buf, client);
                buf.push(b'"');
            }
            if let Some(id) = line.request_id {
                buf.extend_from_slice(b",\"request_id\":");
                json_string(buf, id);
            }
            buf.extend_from_slice(b",\"route\":");
            json_string(buf, line.route);
            buf.extend_from_slice(b",\"status\":");
            decimal(buf, u64::from(line.status));
            buf.extend_from_slice(b",\"outcome\":\"");
            buf.extend_from_slice(line.outcome.as_str().as_bytes());
            buf.push(b'"');
            if let Some(bytes) = line.bytes {
                buf.extend_from_slice(b",\"bytes\":");
                decimal(buf, bytes);
            }
            buf.extend_from_slice(b",\"micros\":");
            decimal(buf, line.micros);
            buf.extend_from_slice(b"},\"target\":\"");
            buf.extend_from_slice(ACCESS_LOG.as_bytes());
            buf.extend_from_slice(b"\"}\n");
        }
    }
}

/// A client's address as `Display` writes it (`1.2.3.4:5`, `[::1]:5`); an IPv4 one without
/// `core::fmt`, assembled on the stack from a table of the octets' digits and copied once
/// (measured: formatting it was a third of the line's cost, then a sixth).
pub(super) fn socket_addr(buf: &mut Vec<u8>, addr: &std::net::SocketAddr) {
    match addr {
        std::net::SocketAddr::V4(v4) => {
            // "255.255.255.255:65535" is 21 bytes; each octet is copied as 3 bytes, of which
            // the next write covers those past its digits.
            let mut text = [0u8; 21];
            let mut len = 0;
            for (i, octet) in v4.ip().octets().into_iter().enumerate() {
                if i > 0 {
                    text[len] = b'.';
                    len += 1;
                }
                let (digits, count) = OCTETS[usize::from(octet)];
                text[len..len + 3].copy_from_slice(&digits);
                len += count;
            }
            text[len] = b':';
            len += 1;
            let mut port = itoa::Buffer::new();
            let port = port.format(v4.port()).as_bytes();
            text[len..len + port.len()].copy_from_slice(port);
            len += port.len();
            buf.extend_from_slice(&text[..len]);
        }
        std::net::SocketAddr::V6(_) => {
            let _ = write!(buf, "{addr}");
        }
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

/// `n` in decimal; up to three digits by a fixed-size copy (a run-time length calls `memcpy`).
pub(super) fn decimal(buf: &mut Vec<u8>, n: u64) {
    let digit = |n: u64| b'0' + (n % 10) as u8;
    match n {
        0..=9 => buf.push(digit(n)),
        10..=99 => buf.extend_from_slice(&[digit(n / 10), digit(n)]),
        100..=999 => buf.extend_from_slice(&[digit(n / 100), digit(n / 10), digit(n)]),
        _ => buf.extend_from_slice(itoa::Buffer::new().format(n).as_bytes()),
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
pub(super) fn json_string(buf: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
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

/// RFC 3339 in UTC with microseconds, as `tracing-subscriber` writes it, of a time since the Unix
/// epoch: `2026-01-02T03:04:05.678901Z`.
pub(super) fn timestamp(buf: &mut Vec<u8>, since: Duration) {
    let secs = since.as_secs();
    // The writer formats thousands of lines within one second: their date and time up to the
    // second are written once (`YYYY-MM-DDTHH:MM:SS`, 19 bytes) and copied after.
    thread_local! {
        static SECOND: std::cell::Cell<(u64, [u8; 19])> = const { std::cell::Cell::new((u64::MAX, [0; 19])) };
    }
    let (cached, text) = SECOND.get();
    if cached == secs {
        buf.extend_from_slice(&text);
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
            SECOND.set((secs, text));
        }
    }
    // The microseconds (< 1,000,000) as three pairs of digits from a table.
    let micros = usize::try_from(since.subsec_micros()).unwrap_or(0);
    let pair = |n: usize| PAIRS[n % 100];
    let ([a, b], [c, d], [e, f]) = (pair(micros / 10_000), pair(micros / 100), pair(micros));
    buf.extend_from_slice(&[b'.', a, b, c, d, e, f, b'Z']);
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
