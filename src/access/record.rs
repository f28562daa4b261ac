//! A line as the request's thread leaves it: its fields copied as they are into the thread's
//! buffer, a record the writer formats later ([`super::format`]). The request's thread then runs
//! a few copies instead of the formatting's code: callgrind's cache simulation counted the line's
//! cost as much in a hit's instruction-cache misses (the formatting's code evicting the request
//! path's) as in its instructions, while the writer formats a whole batch in one loop whose code
//! stays cached.
//!
//! A record: the wall clock (seconds, nanoseconds), status, outcome, which optional fields
//! follow, the duration, the method (a byte for a standard one), the lengths of the five strings;
//! then the bytes sent and the client's address when present; then the strings one after the
//! other (another method's text, path, route, query, request id; an absent one is empty, and
//! not copied). Native byte order: a record never leaves the process.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::time::Duration;

use http::Method;

use super::AccessLine;
use crate::outcome::CacheOutcome;

const QUERY: u8 = 1;
const CLIENT_V4: u8 = 2;
const CLIENT_V6: u8 = 4;
const REQUEST_ID: u8 = 8;
const BYTES: u8 = 16;

/// The methods recorded as their index here plus one (0: another method, its text recorded): a
/// byte instead of a copy of the text.
static METHODS: [Method; 9] = [
    Method::GET,
    Method::HEAD,
    Method::POST,
    Method::PUT,
    Method::DELETE,
    Method::OPTIONS,
    Method::PATCH,
    Method::TRACE,
    Method::CONNECT,
];

/// Appends `line` to `buf` as a record.
pub(super) fn put(buf: &mut Vec<u8>, line: &AccessLine<'_>) {
    let mut flags = 0;
    if line.query.is_some() {
        flags |= QUERY;
    }
    match line.client {
        Some(SocketAddr::V4(_)) => flags |= CLIENT_V4,
        Some(SocketAddr::V6(_)) => flags |= CLIENT_V6,
        None => {}
    }
    if line.request_id.is_some() {
        flags |= REQUEST_ID;
    }
    if line.bytes.is_some() {
        flags |= BYTES;
    }
    let method = METHODS
        .iter()
        .position(|method| method == line.method)
        .map_or(0, |i| i + 1);
    let strings = [
        if method == 0 {
            line.method.as_str()
        } else {
            ""
        },
        line.path,
        line.route,
        line.query.unwrap_or_default(),
        line.request_id.unwrap_or_default(),
    ];
    // Nothing this process accepted holds a string past 4 GiB: cut, never wrapped.
    let lens = strings.map(|s| u32::try_from(s.len()).unwrap_or(u32::MAX));
    let mut head = [0u8; HEAD];
    head[..8].copy_from_slice(&line.at.as_secs().to_ne_bytes());
    head[8..12].copy_from_slice(&line.at.subsec_nanos().to_ne_bytes());
    head[12..14].copy_from_slice(&line.status.to_ne_bytes());
    // Its index in `CacheOutcome::ALL`, which lists the variants in their order.
    head[14] = line.outcome as u8;
    head[15] = flags;
    head[16..24].copy_from_slice(&line.micros.to_ne_bytes());
    // At most `METHODS.len()`.
    head[24] = u8::try_from(method).unwrap_or(0);
    for (i, len) in lens.iter().enumerate() {
        head[25 + 4 * i..29 + 4 * i].copy_from_slice(&len.to_ne_bytes());
    }
    buf.extend_from_slice(&head);
    if let Some(bytes) = line.bytes {
        buf.extend_from_slice(&bytes.to_ne_bytes());
    }
    match line.client {
        Some(SocketAddr::V4(v4)) => {
            buf.extend_from_slice(&v4.ip().octets());
            buf.extend_from_slice(&v4.port().to_ne_bytes());
        }
        Some(SocketAddr::V6(v6)) => {
            buf.extend_from_slice(&v6.ip().octets());
            buf.extend_from_slice(&v6.port().to_ne_bytes());
            buf.extend_from_slice(&v6.flowinfo().to_ne_bytes());
            buf.extend_from_slice(&v6.scope_id().to_ne_bytes());
        }
        None => {}
    }
    for (s, len) in strings.iter().zip(lens) {
        // An absent string costs no copy (a call to `memcpy`, even of nothing). `len` is at
        // most `s.len()`, and a u32 fits a usize wherever std runs with 32-bit or wider pointers.
        if len != 0 {
            let len = usize::try_from(len).unwrap_or(s.len());
            buf.extend_from_slice(&s.as_bytes()[..len]);
        }
    }
}

/// Bytes of a record before its optional fields: clock, status, outcome, flags, duration, method,
/// and the five strings' lengths.
const HEAD: usize = 25 + 5 * 4;

/// A line as the writer reads it back: [`AccessLine`]'s fields, its strings as the bytes
/// recorded. They were `str`s when recorded and are only copied out, so they are not checked as
/// UTF-8 again (that check was a tenth of the writer's cost per line).
#[derive(Debug)]
pub(super) struct Recorded<'a> {
    pub(super) at: Duration,
    pub(super) method: &'a [u8],
    pub(super) path: &'a [u8],
    pub(super) route: &'a [u8],
    pub(super) status: u16,
    pub(super) outcome: CacheOutcome,
    pub(super) micros: u64,
    pub(super) query: Option<&'a [u8]>,
    pub(super) client: Option<SocketAddr>,
    pub(super) request_id: Option<&'a [u8]>,
    pub(super) bytes: Option<u64>,
}

impl<'a> From<&AccessLine<'a>> for Recorded<'a> {
    fn from(line: &AccessLine<'a>) -> Recorded<'a> {
        Recorded {
            at: line.at,
            method: line.method.as_str().as_bytes(),
            path: line.path.as_bytes(),
            route: line.route.as_bytes(),
            status: line.status,
            outcome: line.outcome,
            micros: line.micros,
            query: line.query.map(str::as_bytes),
            client: line.client,
            request_id: line.request_id.map(str::as_bytes),
            bytes: line.bytes,
        }
    }
}

/// Hands each line recorded in `buf` to `each`, in order. A record that does not read back
/// whole ends the batch (it cannot happen: `put` wrote every one).
pub(super) fn each(buf: &[u8], mut each: impl FnMut(&Recorded<'_>)) {
    let mut reader = Records(buf);
    while !reader.0.is_empty() {
        let Some(()) = reader.line(&mut each) else {
            return;
        };
    }
}

/// What is left of a batch of records to read.
struct Records<'a>(&'a [u8]);

impl<'a> Records<'a> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (bytes, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*bytes)
    }

    fn u16(&mut self) -> Option<u16> {
        self.take().map(u16::from_ne_bytes)
    }

    fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_ne_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.take().map(u64::from_ne_bytes)
    }

    /// The strings, whose lengths are `lens`.
    fn strs(&mut self, lens: [usize; 5]) -> Option<[&'a [u8]; 5]> {
        let mut strs: [&[u8]; 5] = [b""; 5];
        for (s, len) in strs.iter_mut().zip(lens) {
            (*s, self.0) = self.0.split_at_checked(len)?;
        }
        Some(strs)
    }

    /// Reads one record and hands its line to `each`.
    fn line(&mut self, each: &mut impl FnMut(&Recorded<'_>)) -> Option<()> {
        let (secs, nanos) = (self.u64()?, self.u32()?);
        let status = self.u16()?;
        let [outcome, flags] = self.take()?;
        let micros = self.u64()?;
        let [method] = self.take()?;
        let mut lens = [0; 5];
        for len in &mut lens {
            *len = usize::try_from(self.u32()?).ok()?;
        }
        let bytes = match flags & BYTES {
            0 => None,
            _ => Some(self.u64()?),
        };
        let client = if flags & CLIENT_V4 != 0 {
            let ip = Ipv4Addr::from(self.take::<4>()?);
            Some(SocketAddr::V4(SocketAddrV4::new(ip, self.u16()?)))
        } else if flags & CLIENT_V6 != 0 {
            let ip = Ipv6Addr::from(self.take::<16>()?);
            let (port, flow, scope) = (self.u16()?, self.u32()?, self.u32()?);
            Some(SocketAddr::V6(SocketAddrV6::new(ip, port, flow, scope)))
        } else {
            None
        };
        let [other_method, path, route, query, request_id] = self.strs(lens)?;
        let method = match usize::from(method).checked_sub(1) {
            Some(i) => METHODS.get(i)?.as_str().as_bytes(),
            None => other_method,
        };
        let line = Recorded {
            at: Duration::from_secs(secs).checked_add(Duration::from_nanos(u64::from(nanos)))?,
            method,
            path,
            route,
            status,
            outcome: *CacheOutcome::ALL.get(usize::from(outcome))?,
            micros,
            query: (flags & QUERY != 0).then_some(query),
            client,
            request_id: (flags & REQUEST_ID != 0).then_some(request_id),
            bytes,
        };
        each(&line);
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use http::Method;

    use super::*;

    #[test]
    fn every_outcome_is_recorded_as_its_index_in_all() {
        for (i, outcome) in CacheOutcome::ALL.iter().enumerate() {
            assert_eq!(*outcome as u8 as usize, i, "{outcome:?}");
        }
    }

    /// Lines with every optional field present or absent, every outcome, both address families.
    fn lines<'a>(methods: &'a [Method]) -> Vec<AccessLine<'a>> {
        let v6 = SocketAddr::V6(SocketAddrV6::new(
            "fe80::1".parse().unwrap_or(Ipv6Addr::LOCALHOST),
            8080,
            7,
            3,
        ));
        let at = Duration::new(1_786_000_000, 123_456_789);
        let mut out: Vec<AccessLine<'a>> = methods
            .iter()
            .map(|method| AccessLine::new(method, "/m", "m", 200, CacheOutcome::Hit, 1))
            .collect();
        for (i, outcome) in CacheOutcome::ALL.into_iter().enumerate() {
            let method = &methods[i % methods.len()];
            let mut line = AccessLine::new(method, "/p/ä", "route", 200 + i as u16, outcome, 9);
            line.at = at + Duration::from_nanos(i as u64);
            out.push(line);
            let full = AccessLine::new(method, "/q", "r", 503, outcome, u64::MAX);
            let client = if i % 2 == 0 {
                v6
            } else {
                ([10, 0, 0, 255], 1).into()
            };
            out.push(full.of_request(Some("a=1&b=\"2\""), client, Some("id ✓"), Some(i as u64)));
        }
        out
    }

    #[test]
    fn every_line_reads_back_as_it_was_recorded() {
        let mut methods = METHODS.to_vec();
        methods.push(Method::from_bytes(b"PURGE").unwrap_or(Method::GET));
        let sent = lines(&methods);
        let mut buf = Vec::new();
        for line in &sent {
            put(&mut buf, line);
        }
        let mut read = Vec::new();
        each(&buf, |line| read.push(format!("{line:?}")));
        let sent: Vec<String> = sent
            .iter()
            .map(|line| format!("{:?}", Recorded::from(line)))
            .collect();
        assert_eq!(read, sent);
    }

    #[test]
    fn a_batch_cut_short_yields_its_whole_records_and_no_panic() {
        let methods = [Method::GET];
        let sent = lines(&methods);
        let mut buf = Vec::new();
        put(&mut buf, &sent[0]);
        let first = buf.len();
        put(&mut buf, &sent[1]);
        for cut in 0..buf.len() {
            let mut read = 0;
            each(&buf[..cut], |_| read += 1);
            assert_eq!(read, usize::from(cut >= first), "cut at {cut}");
        }
    }
}
