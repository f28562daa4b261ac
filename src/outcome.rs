//! How a request was answered. One enum feeds both the `Cache-Status` header (RFC 9211) and the
//! metric label, so the two can never disagree.

use http::HeaderValue;

/// The cache's part in answering one request. The discriminants index [`CacheOutcome::ALL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CacheOutcome {
    /// Answered from a fresh entry (L1 or L2) without waiting for anyone.
    Hit,
    /// Answered from a stale entry while one refresh runs in the background.
    Stale,
    /// Waited for another request's fill (in this process or another instance) and answered with
    /// it — its stored answer, or its error: RFC 9211's `collapsed`, never a `hit`.
    Coalesced,
    /// This request triggered the fill; the upstream's answer was stored.
    MissStored,
    /// This request triggered the fill; the answer could not be stored (status, `no-store`, size…).
    MissNotStored,
    /// This request triggered the fill, which was conditional on the expired entry Corral held:
    /// the upstream answered `304` and the renewed entry was stored and answered.
    Revalidated,
    /// The route, method or request is not cacheable: passed through to the upstream.
    Bypass,
    /// No route matched: passed to the default upstream, or 404.
    UriMiss,
}

impl CacheOutcome {
    /// Every variant, for metrics that pre-register their labels.
    pub const ALL: [CacheOutcome; 8] = [
        CacheOutcome::Hit,
        CacheOutcome::Stale,
        CacheOutcome::Coalesced,
        CacheOutcome::MissStored,
        CacheOutcome::MissNotStored,
        CacheOutcome::Revalidated,
        CacheOutcome::Bypass,
        CacheOutcome::UriMiss,
    ];

    /// The metric and log label: RFC 9211's words where it has one (`collapsed` for a waiter,
    /// as in `Cache-Status`).
    pub fn as_str(self) -> &'static str {
        match self {
            CacheOutcome::Hit => "hit",
            CacheOutcome::Stale => "stale",
            CacheOutcome::Coalesced => "collapsed",
            CacheOutcome::MissStored => "miss_stored",
            CacheOutcome::MissNotStored => "miss",
            CacheOutcome::Revalidated => "revalidated",
            CacheOutcome::Bypass => "bypass",
            CacheOutcome::UriMiss => "uri_miss",
        }
    }

    /// The `Cache-Status` header value (RFC 9211), with `corral` as the cache's name: `ttl` is the
    /// entry's freshness left (hits), `status` the upstream's status (forwards).
    ///
    /// | outcome | value |
    /// |---|---|
    /// | hit | `corral; hit; ttl=N` |
    /// | stale | `corral; hit; ttl=-N; detail=stale` |
    /// | collapsed | `corral; fwd=miss; fwd-status=S; collapsed` |
    /// | miss_stored | `corral; fwd=miss; fwd-status=S; stored` |
    /// | miss | `corral; fwd=miss; fwd-status=S` |
    /// | revalidated | `corral; fwd=stale; fwd-status=304; stored` |
    /// | bypass | `corral; fwd=bypass` |
    /// | uri_miss | `corral; fwd=uri-miss` |
    pub fn cache_status(self, ttl: Option<i64>, status: http::StatusCode) -> HeaderValue {
        use std::fmt::Write;
        // One buffer, handed to the header value without a copy: this runs on every hit.
        let mut value = String::with_capacity(48);
        let status = status.as_u16();
        // Writing into a String cannot fail.
        let _ = match self {
            CacheOutcome::Hit | CacheOutcome::Stale => {
                return hit_status(self == CacheOutcome::Stale, ttl);
            }
            CacheOutcome::Coalesced => {
                write!(value, "corral; fwd=miss; fwd-status={status}; collapsed")
            }
            CacheOutcome::MissStored => {
                write!(value, "corral; fwd=miss; fwd-status={status}; stored")
            }
            CacheOutcome::MissNotStored => write!(value, "corral; fwd=miss; fwd-status={status}"),
            // What the upstream returned was the 304; the client gets the renewed entry.
            CacheOutcome::Revalidated => {
                return HeaderValue::from_static("corral; fwd=stale; fwd-status=304; stored");
            }
            CacheOutcome::Bypass => return HeaderValue::from_static("corral; fwd=bypass"),
            CacheOutcome::UriMiss => return HeaderValue::from_static("corral; fwd=uri-miss"),
        };
        HeaderValue::from_maybe_shared(bytes::Bytes::from(value))
            .unwrap_or(HeaderValue::from_static("corral"))
    }

    /// The `Cache-Status` of a 5xx Corral made itself because no upstream answer stands behind
    /// it (the upstream refused, timed out, broke off, or had no free slot): no `fwd-status`,
    /// which RFC 9211 reserves for the status the next hop returned, and the failure's kind (as
    /// in `corral-error`) as `detail`.
    pub fn cache_status_unanswered(self, kind: &str) -> HeaderValue {
        let forward = match self {
            CacheOutcome::Coalesced => "fwd=miss; collapsed",
            CacheOutcome::Bypass => "fwd=bypass",
            CacheOutcome::UriMiss => "fwd=uri-miss",
            CacheOutcome::Revalidated => "fwd=stale",
            CacheOutcome::Hit
            | CacheOutcome::Stale
            | CacheOutcome::MissStored
            | CacheOutcome::MissNotStored => "fwd=miss",
        };
        // `kind` is one of Corral's own tokens; anything else is left out rather than sent.
        let detail = match kind.bytes().all(|b| b.is_ascii_lowercase() || b == b'-') {
            true if !kind.is_empty() => format!("; detail={kind}"),
            _ => String::new(),
        };
        HeaderValue::from_str(&format!("corral; {forward}{detail}"))
            .unwrap_or(HeaderValue::from_static("corral"))
    }

    /// Whether the answer came from a stored entry (and so carries `Age`).
    pub fn is_hit(self) -> bool {
        matches!(
            self,
            CacheOutcome::Hit | CacheOutcome::Stale | CacheOutcome::Coalesced
        )
    }
}

/// A `Cache-Status` value (as [`CacheOutcome::cache_status`] writes it) without the cache's name
/// and the per-answer numbers (`ttl`, `fwd-status`): the kind of answer, e.g. `hit` or
/// `fwd=miss; collapsed`, for summaries that count answers by kind (the demo, the load bench).
pub fn cache_status_kind(value: &str) -> String {
    value
        .split(';')
        .map(str::trim)
        .filter(|p| *p != "corral" && !p.starts_with("ttl=") && !p.starts_with("fwd-status="))
        .collect::<Vec<_>>()
        .join("; ")
}

/// A hit's `Cache-Status`: a fresh hit's common values are static ([`crate::numbers::HIT_TTL`]);
/// any other is written on the stack and copied once into the value, one allocation (a `String`
/// handed over would be two: its buffer, then `Bytes`' record of its spare room).
fn hit_status(stale: bool, ttl: Option<i64>) -> HeaderValue {
    if !stale
        && let Some(value) = ttl
            .and_then(|ttl| u64::try_from(ttl).ok())
            .and_then(|ttl| crate::numbers::HIT_TTL.value(ttl))
    {
        return value;
    }
    // "corral; hit; ttl=-9223372036854775808; detail=stale" is 51 bytes.
    let mut buf = [0u8; 64];
    let mut at = 0;
    let mut put = |bytes: &[u8]| {
        buf[at..at + bytes.len()].copy_from_slice(bytes);
        at += bytes.len();
    };
    match ttl {
        Some(ttl) => {
            put(crate::numbers::HIT_TTL_PREFIX);
            put(itoa::Buffer::new().format(ttl).as_bytes());
        }
        None => put(b"corral; hit"),
    }
    if stale {
        put(b"; detail=stale");
    }
    HeaderValue::from_bytes(&buf[..at]).unwrap_or(HeaderValue::from_static("corral"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hits_ttl_is_written_whole_and_signed() {
        let ok = http::StatusCode::OK;
        for (ttl, text) in [
            (0, "corral; hit; ttl=0"),
            (-7, "corral; hit; ttl=-7"),
            (i64::MIN, "corral; hit; ttl=-9223372036854775808"),
            (3_600, "corral; hit; ttl=3600"),
        ] {
            assert_eq!(CacheOutcome::Hit.cache_status(Some(ttl), ok), text);
        }
    }

    #[test]
    fn an_answer_nothing_gave_has_no_fwd_status_and_says_why() {
        let refused = CacheOutcome::MissNotStored.cache_status_unanswered("upstream-connect");
        assert_eq!(refused, "corral; fwd=miss; detail=upstream-connect");
        let shared = CacheOutcome::Coalesced.cache_status_unanswered("upstream-timeout");
        assert_eq!(
            shared,
            "corral; fwd=miss; collapsed; detail=upstream-timeout"
        );
        let odd = CacheOutcome::Bypass.cache_status_unanswered("x\"; y");
        assert_eq!(odd, "corral; fwd=bypass");
    }

    #[test]
    fn kinds_drop_the_name_and_the_per_answer_numbers() {
        let cases = [
            ("corral; hit; ttl=59", "hit"),
            ("corral; hit; ttl=-2; detail=stale", "hit; detail=stale"),
            (
                "corral; fwd=miss; fwd-status=200; collapsed",
                "fwd=miss; collapsed",
            ),
            ("corral; fwd=bypass", "fwd=bypass"),
        ];
        for (value, kind) in cases {
            assert_eq!(cache_status_kind(value), kind);
        }
    }

    #[test]
    fn header_values_follow_rfc_9211() {
        let ok = http::StatusCode::OK;
        let cases = [
            (CacheOutcome::Hit, Some(59), ok, "corral; hit; ttl=59"),
            (
                CacheOutcome::Stale,
                Some(-3),
                ok,
                "corral; hit; ttl=-3; detail=stale",
            ),
            (
                CacheOutcome::Coalesced,
                Some(5),
                ok,
                "corral; fwd=miss; fwd-status=200; collapsed",
            ),
            (
                CacheOutcome::Coalesced,
                None,
                http::StatusCode::BAD_GATEWAY,
                "corral; fwd=miss; fwd-status=502; collapsed",
            ),
            (
                CacheOutcome::MissStored,
                None,
                ok,
                "corral; fwd=miss; fwd-status=200; stored",
            ),
            (
                CacheOutcome::MissNotStored,
                None,
                ok,
                "corral; fwd=miss; fwd-status=200",
            ),
            (CacheOutcome::Bypass, None, ok, "corral; fwd=bypass"),
        ];
        for (outcome, ttl, status, want) in cases {
            assert_eq!(outcome.cache_status(ttl, status), want);
        }
    }

    #[test]
    fn all_is_indexed_by_discriminant() {
        for (i, outcome) in CacheOutcome::ALL.iter().enumerate() {
            assert_eq!(*outcome as usize, i);
        }
    }

    #[test]
    fn labels_and_headers_are_distinct() {
        let labels: std::collections::HashSet<_> =
            CacheOutcome::ALL.iter().map(|o| o.as_str()).collect();
        let headers: std::collections::HashSet<_> = CacheOutcome::ALL
            .iter()
            .map(|o| o.cache_status(None, http::StatusCode::OK))
            .collect();
        assert_eq!(labels.len(), CacheOutcome::ALL.len());
        assert_eq!(headers.len(), CacheOutcome::ALL.len());
    }
}
