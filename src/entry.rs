//! Entries: stored responses, their freshness, and their wire format in Redis.
//!
//! Times are wall-clock milliseconds since the Unix epoch, because an entry written by one instance is
//! read by others; the fleet's clocks are assumed to agree to well under a `ttl`.
//!
//! Wire format (all integers little-endian), led by a magic byte and a version byte so the format can
//! change and a foreign value is recognised as such and treated as a miss, never served:
//!
//! ```text
//! 0xC0 0x01 | status u16 | stored_at u64 | fresh_until u64 | swr_until u64 | sie_until u64 | fill_ms u32
//! | n_headers u16 | (name_len u16, name, value_len u32, value)* | n_tags u16 | (len u16, tag)*
//! | n_vary u16 | (name_len u16, name, present u8, value_len u32, value)* | body…
//! ```
//!
//! Version 1 (no `n_vary` section) is still decoded, as an entry that does not vary.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use http::StatusCode;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::vary::{VaryField, VaryRecord};

const MAGIC: u8 = 0xC0;
const VERSION: u8 = 0x02;
/// The previous format (no variant fields), still read so a rolling upgrade keeps its entries.
const VERSION_1: u8 = 0x01;
/// The fewest bytes one encoded header takes: its two lengths and a one-byte name.
const MIN_HEADER_BYTES: usize = 2 + 1 + 4;
/// The fewest bytes one encoded tag takes: its length.
const MIN_TAG_BYTES: usize = 2;

/// How long an entry with a validator (`ETag` or `Last-Modified`) stays in L1 past its last usable
/// moment, served to nobody: a miss on its key then asks the upstream conditionally, and a `304`
/// renews it without a body transfer (RFC 9111 §4.3). L1 is bounded by bytes, so keeping costs
/// no more memory than the budget allows; an entry nobody asks for is evicted first.
pub const KEPT_FOR_REVALIDATION: Duration = Duration::from_secs(600);

/// A stored response.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub status: StatusCode,
    /// End-to-end headers worth keeping (no hop-by-hop, no `Set-Cookie`). `Age`, when present, is
    /// the upstream's: the entry's age when it was stored.
    pub headers: HeaderMap,
    pub body: Bytes,
    pub times: Lifetime,
    /// How long the fill took (upstream call), kept for early-refresh decisions.
    pub fill_ms: u32,
    /// Surrogate keys from `Surrogate-Key` / `Cache-Tag`.
    pub tags: Vec<String>,
    /// The headers the answer's `Vary` names and their values on the fill ([`crate::vary`]);
    /// empty when it does not vary.
    pub vary: VaryRecord,
}

/// When an entry was stored and until when it may be served, in Unix milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetime {
    pub stored_at: u64,
    pub fresh_until: u64,
    /// Served stale while one refresh runs, until this moment.
    pub swr_until: u64,
    /// Served stale when a refresh fails, until this moment.
    pub sie_until: u64,
}

/// Whether an entry may answer a request at a given moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    Fresh,
    /// Stale but inside `stale-while-revalidate`: answer and refresh in the background.
    StaleRevalidate,
    /// Stale, usable only if a refresh fails (`stale-if-error`).
    StaleIfError,
    Expired,
}

impl Lifetime {
    /// The last moment the entry is of any use: its time to live in L1 and L2.
    pub fn stale_until(&self) -> u64 {
        self.fresh_until.max(self.swr_until).max(self.sie_until)
    }

    pub fn freshness(&self, now: u64) -> Freshness {
        if now < self.fresh_until {
            Freshness::Fresh
        } else if now < self.swr_until {
            Freshness::StaleRevalidate
        } else if now < self.sie_until {
            Freshness::StaleIfError
        } else {
            Freshness::Expired
        }
    }

    /// Time left to live from `now`, or `None` when already dead.
    pub fn remaining(&self, now: u64) -> Option<Duration> {
        self.stale_until()
            .checked_sub(now)
            .filter(|ms| *ms > 0)
            .map(Duration::from_millis)
    }

    /// Whole seconds since storage, for the `Age` header.
    pub fn age_secs(&self, now: u64) -> u64 {
        now.saturating_sub(self.stored_at) / 1000
    }
}

/// The current wall-clock time in Unix milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Why a stored value could not be decoded. Such a value is a miss.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("not a corral entry (bad magic byte)")]
    Foreign,
    #[error("entry format version {0} is not understood by this build")]
    Version(u8),
    #[error("entry is truncated or garbled")]
    Garbled,
}

impl Entry {
    /// Whether the entry carries a validator a conditional request can name.
    pub fn has_validator(&self) -> bool {
        self.headers.contains_key(http::header::ETAG)
            || self.headers.contains_key(http::header::LAST_MODIFIED)
    }

    /// Until when L1 keeps the entry: its last usable moment, plus [`KEPT_FOR_REVALIDATION`] when
    /// it has a validator (past its usable life it only feeds a conditional fill).
    pub fn kept_until(&self) -> u64 {
        let end = self.times.stale_until();
        if self.has_validator() {
            let keep = u64::try_from(KEPT_FOR_REVALIDATION.as_millis()).unwrap_or(u64::MAX);
            end.saturating_add(keep)
        } else {
            end
        }
    }

    /// Time L1 still keeps the entry from `now` (see [`Entry::kept_until`]), or `None`.
    pub fn kept_for(&self, now: u64) -> Option<Duration> {
        self.kept_until()
            .checked_sub(now)
            .filter(|ms| *ms > 0)
            .map(Duration::from_millis)
    }

    /// Whole seconds of freshness left at `now` (negative once stale), counting the upstream's
    /// `Age`: RFC 9211's `ttl`.
    pub fn ttl_secs(&self, now: u64) -> i64 {
        let left = i128::from(self.times.fresh_until) - i128::from(now);
        i64::try_from(left.div_euclid(1000)).unwrap_or(i64::MAX)
    }

    /// The entry's current age in whole seconds (RFC 9111 §4.2.3): the upstream's `Age` when it
    /// was stored plus the time since.
    pub fn age_secs(&self, now: u64) -> u64 {
        let initial = upstream_age_secs(&self.headers).unwrap_or(0);
        initial.saturating_add(self.times.age_secs(now))
    }

    /// Bytes this entry costs in memory, for the L1 weigher: its body and headers plus what
    /// holding it costs around them — the header map's table and buckets, one allocation per
    /// header value, the entry and its `Arc`, moka's node, deque and timer slots. The constants
    /// come from measuring RSS under 100k cached 2 KiB entries (about 4.3 KiB each in all): an
    /// estimate that leaves them out lets the cache outgrow its byte budget by more than half.
    pub fn weight(&self) -> u32 {
        const PER_ENTRY: usize = 1856;
        const PER_HEADER: usize = 96;
        const PER_TAG: usize = 48;
        let headers: usize = self
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + PER_HEADER)
            .sum();
        let tags: usize = self.tags.iter().map(|t| t.len() + PER_TAG).sum();
        let vary: usize = self
            .vary
            .fields()
            .iter()
            .map(|f| f.name.as_str().len() + f.value.as_ref().map_or(0, String::len) + PER_TAG)
            .sum();
        let total = self.body.len() + headers + tags + vary + PER_ENTRY;
        u32::try_from(total).unwrap_or(u32::MAX)
    }

    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(self.body.len() + 256);
        out.put_u8(MAGIC);
        out.put_u8(VERSION);
        out.put_u16_le(self.status.as_u16());
        out.put_u64_le(self.times.stored_at);
        out.put_u64_le(self.times.fresh_until);
        out.put_u64_le(self.times.swr_until);
        out.put_u64_le(self.times.sie_until);
        out.put_u32_le(self.fill_ms);
        let headers: Vec<_> = self
            .headers
            .iter()
            .filter(|(n, v)| {
                n.as_str().len() <= usize::from(u16::MAX) && v.len() <= u32::MAX as usize
            })
            .take(usize::from(u16::MAX))
            .collect();
        out.put_u16_le(headers.len() as u16);
        for (name, value) in headers {
            out.put_u16_le(name.as_str().len() as u16);
            out.put_slice(name.as_str().as_bytes());
            out.put_u32_le(value.len() as u32);
            out.put_slice(value.as_bytes());
        }
        let tags: Vec<_> = self
            .tags
            .iter()
            .filter(|t| t.len() <= usize::from(u16::MAX))
            .take(usize::from(u16::MAX))
            .collect();
        out.put_u16_le(tags.len() as u16);
        for tag in tags {
            out.put_u16_le(tag.len() as u16);
            out.put_slice(tag.as_bytes());
        }
        // Header names are short and values come from one request header: both fit their
        // prefixes; an entry varying on more than u16::MAX names does not exist.
        let vary = self.vary.fields();
        out.put_u16_le(vary.len().min(usize::from(u16::MAX)) as u16);
        for field in vary.iter().take(usize::from(u16::MAX)) {
            out.put_u16_le(field.name.as_str().len() as u16);
            out.put_slice(field.name.as_str().as_bytes());
            match &field.value {
                None => out.put_u8(0),
                Some(v) => {
                    out.put_u8(1);
                    out.put_u32_le(v.len() as u32);
                    out.put_slice(v.as_bytes());
                }
            }
        }
        out.put_slice(&self.body);
        out.freeze()
    }

    /// Decodes a stored value. The body is a zero-copy slice of `raw`.
    pub fn decode(raw: Bytes) -> Result<Entry, DecodeError> {
        let mut r = Reader { raw: &raw, pos: 0 };
        if r.u8()? != MAGIC {
            return Err(DecodeError::Foreign);
        }
        let version = r.u8()?;
        if version != VERSION && version != VERSION_1 {
            return Err(DecodeError::Version(version));
        }
        let status = StatusCode::from_u16(r.u16()?).map_err(|_| DecodeError::Garbled)?;
        let times = Lifetime {
            stored_at: r.u64()?,
            fresh_until: r.u64()?,
            swr_until: r.u64()?,
            sie_until: r.u64()?,
        };
        let fill_ms = r.u32()?;
        // Every count is bounded by the bytes actually present (a header takes at least
        // `MIN_HEADER_BYTES`, a tag `MIN_TAG_BYTES`), so a hostile count costs no allocation, and the
        // header map is filled with `try_` calls, so no count can make it panic.
        let n_headers = usize::from(r.u16()?);
        if n_headers > r.remaining() / MIN_HEADER_BYTES {
            return Err(DecodeError::Garbled);
        }
        let mut headers =
            HeaderMap::try_with_capacity(n_headers).map_err(|_| DecodeError::Garbled)?;
        for _ in 0..n_headers {
            let name_len = usize::from(r.u16()?);
            let name =
                HeaderName::from_bytes(r.take(name_len)?).map_err(|_| DecodeError::Garbled)?;
            let value_len = r.u32()? as usize;
            let start = r.pos;
            r.take(value_len)?;
            let value = HeaderValue::from_maybe_shared(raw.slice(start..start + value_len))
                .map_err(|_| DecodeError::Garbled)?;
            headers
                .try_append(name, value)
                .map_err(|_| DecodeError::Garbled)?;
        }
        let n_tags = usize::from(r.u16()?);
        if n_tags > r.remaining() / MIN_TAG_BYTES {
            return Err(DecodeError::Garbled);
        }
        let mut tags = Vec::with_capacity(n_tags);
        for _ in 0..n_tags {
            let len = usize::from(r.u16()?);
            let tag = std::str::from_utf8(r.take(len)?).map_err(|_| DecodeError::Garbled)?;
            tags.push(tag.to_owned());
        }
        let mut vary = Vec::new();
        if version == VERSION {
            for _ in 0..r.u16()? {
                let len = usize::from(r.u16()?);
                let name =
                    HeaderName::from_bytes(r.take(len)?).map_err(|_| DecodeError::Garbled)?;
                let value = match r.u8()? {
                    0 => None,
                    1 => {
                        let len = r.u32()? as usize;
                        let text =
                            std::str::from_utf8(r.take(len)?).map_err(|_| DecodeError::Garbled)?;
                        Some(text.to_owned())
                    }
                    _ => return Err(DecodeError::Garbled),
                };
                vary.push(VaryField { name, value });
            }
        }
        let body = raw.slice(r.pos..);
        Ok(Entry {
            status,
            headers,
            body,
            times,
            fill_ms,
            tags,
            vary: VaryRecord::new(vary),
        })
    }
}

struct Reader<'a> {
    raw: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.raw.len().saturating_sub(self.pos)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).ok_or(DecodeError::Garbled)?;
        let slice = self.raw.get(self.pos..end).ok_or(DecodeError::Garbled)?;
        self.pos = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        self.take(N)?.try_into().map_err(|_| DecodeError::Garbled)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
}

/// The header naming the kind of failure behind an error answer (`upstream-timeout`,
/// `body-too-large`, …): what a client or an operator reading a client's report may know of it.
pub const ERROR_KIND: HeaderName = HeaderName::from_static("corral-error");

/// The body of a 5xx answer: its status and nothing else. The detail (which upstream, what went
/// wrong) would tell clients about the inside of the deployment; it goes to the log instead.
pub fn generic_body(status: StatusCode) -> String {
    format!(
        "{} {}\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("Error")
    )
}

/// The answer standing for a fill that got none (connection error, timeout), shared with the
/// waiters so they do not each try again — fleet-wide, so it carries no detail: a generic body and
/// the failure's `kind` in the `corral-error` header (see [`ERROR_KIND`]); the
/// detail (the upstream's address, the cause) is in the leader's log.
pub fn error_entry(status: StatusCode, kind: &'static str) -> Entry {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(ERROR_KIND, HeaderValue::from_static(kind));
    let now = now_ms();
    Entry {
        status,
        headers,
        body: Bytes::from(generic_body(status)),
        times: Lifetime {
            stored_at: now,
            fresh_until: now,
            swr_until: now,
            sie_until: now,
        },
        fill_ms: 0,
        tags: Vec::new(),
        vary: Default::default(),
    }
}

/// The upstream's `Age` (RFC 9111 §5.1) in seconds: the first member of the first field line
/// (`7200, 0` is 7200), parameters ignored; not a number: none.
pub fn upstream_age_secs(headers: &HeaderMap) -> Option<u64> {
    let line = headers.get(header::AGE)?.to_str().ok()?;
    let first = line.split(',').next()?;
    let value = first.split(';').next()?.trim();
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(value.parse::<u64>().unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header;

    #[test]
    fn an_entry_with_a_validator_is_kept_past_its_usable_life_to_revalidate() {
        let keep = u64::try_from(KEPT_FOR_REVALIDATION.as_millis()).unwrap_or(u64::MAX);
        let mut entry = sample();
        assert_eq!(
            entry.kept_until(),
            4,
            "no validator: kept until stale_until"
        );
        assert_eq!(entry.kept_for(4), None);
        for validator in [header::ETAG, header::LAST_MODIFIED] {
            let mut with = sample();
            with.headers
                .insert(validator, HeaderValue::from_static("\"v1\""));
            assert_eq!(with.kept_until(), 4 + keep);
            assert_eq!(with.times.freshness(5), Freshness::Expired);
            assert_eq!(with.kept_for(5), Some(Duration::from_millis(keep - 1)));
        }
        entry.times.sie_until = u64::MAX;
        assert_eq!(entry.kept_until(), u64::MAX);
    }

    fn sample() -> Entry {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.append("x-multi", HeaderValue::from_static("1"));
        headers.append("x-multi", HeaderValue::from_static("2"));
        Entry {
            status: StatusCode::OK,
            headers,
            body: Bytes::from_static(b"{\"ad\":42}"),
            times: Lifetime {
                stored_at: 1,
                fresh_until: 2,
                swr_until: 3,
                sie_until: 4,
            },
            fill_ms: 1000,
            tags: vec!["article-7".into(), "ads".into()],
            vary: VaryRecord::new(vec![
                VaryField {
                    name: header::ACCEPT_ENCODING,
                    value: Some("br,gzip".into()),
                },
                VaryField {
                    name: header::ACCEPT_LANGUAGE,
                    value: None,
                },
            ]),
        }
    }

    #[test]
    fn encode_decode_round_trips() {
        let e = sample();
        assert_eq!(Entry::decode(e.encode()), Ok(e));
    }

    #[test]
    fn version_1_entries_decode_as_not_varying() {
        let mut e = sample();
        e.vary = VaryRecord::default();
        let v2 = e.encode();
        // Version 1 is version 2 without the (empty) vary count.
        let mut v1 = BytesMut::new();
        v1.put_u8(MAGIC);
        v1.put_u8(VERSION_1);
        let body_at = v2.len() - e.body.len();
        v1.put_slice(&v2[2..body_at - 2]);
        v1.put_slice(&e.body);
        assert_eq!(Entry::decode(v1.freeze()), Ok(e));
    }

    #[test]
    fn foreign_and_truncated_values_are_errors() {
        assert_eq!(
            Entry::decode(Bytes::from_static(b"hello")),
            Err(DecodeError::Foreign)
        );
        assert_eq!(
            Entry::decode(Bytes::from_static(&[MAGIC, 9])),
            Err(DecodeError::Version(9))
        );
        let full = sample().encode();
        for cut in 0..40 {
            assert!(Entry::decode(full.slice(..cut)).is_err(), "cut at {cut}");
        }
    }

    /// A value claiming more headers than its bytes can hold is garbled, whatever the count: the
    /// claim must not size an allocation, nor reach `HeaderMap`'s capacity limit (which panics).
    #[test]
    fn hostile_counts_are_bounded_by_the_bytes_present() {
        let mut head = sample().encode().slice(..40).to_vec();
        head.extend_from_slice(&u16::MAX.to_le_bytes());
        assert_eq!(Entry::decode(head.into()), Err(DecodeError::Garbled));

        // 40,000 real one-byte headers: more than a `HeaderMap` can hold.
        let mut many = sample().encode().slice(..40).to_vec();
        many.extend_from_slice(&40_000u16.to_le_bytes());
        for _ in 0..40_000 {
            many.extend_from_slice(&1u16.to_le_bytes());
            many.push(b'x');
            many.extend_from_slice(&0u32.to_le_bytes());
        }
        many.extend_from_slice(&0u16.to_le_bytes());
        assert_eq!(Entry::decode(many.into()), Err(DecodeError::Garbled));

        let mut tags = sample().encode().slice(..40).to_vec();
        tags.extend_from_slice(&0u16.to_le_bytes());
        tags.extend_from_slice(&u16::MAX.to_le_bytes());
        assert_eq!(Entry::decode(tags.into()), Err(DecodeError::Garbled));
    }
}
