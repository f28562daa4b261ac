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

use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::vary::VaryRecord;

mod lifetime;
mod wire;
pub use lifetime::{Answerable, Freshness, Lifetime, now_ms};
pub use wire::{DecodeError, LIFETIME_AT, LIFETIME_LEN};

/// How long an entry with a validator (`ETag` or `Last-Modified`) stays in L1 past its last usable
/// moment, served to nobody: a miss on its key then asks the upstream conditionally, and a `304`
/// renews it without a body transfer (RFC 9111 §4.3). L1 is bounded by bytes, so keeping costs
/// no more memory than the budget allows; an entry nobody asks for is evicted first.
pub const KEPT_FOR_REVALIDATION: Duration = Duration::from_secs(600);

/// Header fields an answer from an entry adds to the stored ones: `Age` and `Cache-Status`. A
/// stored header map's table is made with room for them, so that a hit's copy (which keeps the
/// table's size) takes them without growing: a grow rehashes every field, ~0.5k instructions a
/// hit.
pub const ANSWER_FIELDS: usize = 2;

/// A stored response.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub status: StatusCode,
    /// End-to-end headers worth keeping (no hop-by-hop, no `Set-Cookie`). `Age`, when present, is
    /// the upstream's: the entry's age when it was stored.
    pub headers: HeaderMap,
    /// Whether `headers` hold a field that never reaches a client (`Corral-Cache-Control`,
    /// `Surrogate-Key`, `Cache-Tag`): they stay stored, since revalidation, soft purges and tags
    /// read them, and an answer removes them only when this says they are there. Made with the
    /// headers ([`crate::header_rules::holds_corral_only`]); `true` is always safe.
    pub corral_only: bool,
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

impl Entry {
    /// Whether the entry carries a validator a conditional request can name.
    pub fn has_validator(&self) -> bool {
        self.headers.contains_key(http::header::ETAG)
            || self.headers.contains_key(http::header::LAST_MODIFIED)
    }

    /// This entry after a soft purge at `at` (see [`Lifetime::marked_stale`]), or `None` when
    /// the purge leaves it alone. Whether it may be served stale is its own directives' say, as
    /// when it was stored ([`crate::cache_control::Directives::forbids_stale`]).
    pub fn marked_stale(&self, at: u64) -> Option<Entry> {
        let (directives, _) = crate::cache_control::Directives::for_corral(&self.headers);
        let times = self.times.marked_stale(at, directives.forbids_stale())?;
        Some(Entry {
            times,
            ..self.clone()
        })
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

    /// Whether L1 still keeps the entry at `now`: [`Entry::kept_until`] is later, asked without
    /// looking for a validator while the entry is still usable.
    pub fn kept_at(&self, now: u64) -> bool {
        self.times.stale_until() > now || self.kept_until() > now
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
        corral_only: crate::header_rules::holds_corral_only(&headers),
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
    use crate::vary::VaryField;
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

    pub(super) fn sample() -> Entry {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.append("x-multi", HeaderValue::from_static("1"));
        headers.append("x-multi", HeaderValue::from_static("2"));
        Entry {
            status: StatusCode::OK,
            corral_only: false,
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
}
