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
    /// Waited for another request's fill (in this process or another instance) and answered with it.
    Coalesced,
    /// This request triggered the fill; the upstream's answer was stored.
    MissStored,
    /// This request triggered the fill; the answer could not be stored (status, `no-store`, size…).
    MissNotStored,
    /// The route, method or request is not cacheable: passed through to the upstream.
    Bypass,
    /// No route matched: passed to the default upstream, or 404.
    UriMiss,
}

impl CacheOutcome {
    /// Every variant, for metrics that pre-register their labels.
    pub const ALL: [CacheOutcome; 7] = [
        CacheOutcome::Hit,
        CacheOutcome::Stale,
        CacheOutcome::Coalesced,
        CacheOutcome::MissStored,
        CacheOutcome::MissNotStored,
        CacheOutcome::Bypass,
        CacheOutcome::UriMiss,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheOutcome::Hit => "hit",
            CacheOutcome::Stale => "stale",
            CacheOutcome::Coalesced => "coalesced",
            CacheOutcome::MissStored => "miss_stored",
            CacheOutcome::MissNotStored => "miss",
            CacheOutcome::Bypass => "bypass",
            CacheOutcome::UriMiss => "uri_miss",
        }
    }

    /// The `Cache-Status` header value (RFC 9211), with `corral` as the cache's name.
    pub fn cache_status(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            CacheOutcome::Hit => "corral; hit",
            CacheOutcome::Stale => "corral; hit; detail=stale",
            CacheOutcome::Coalesced => "corral; hit; detail=coalesced",
            CacheOutcome::MissStored => "corral; fwd=miss; stored",
            CacheOutcome::MissNotStored => "corral; fwd=miss",
            CacheOutcome::Bypass => "corral; fwd=bypass",
            CacheOutcome::UriMiss => "corral; fwd=uri-miss",
        })
    }

    /// Whether the answer came from a stored entry (and so carries `Age`).
    pub fn is_hit(self) -> bool {
        matches!(
            self,
            CacheOutcome::Hit | CacheOutcome::Stale | CacheOutcome::Coalesced
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let headers: std::collections::HashSet<_> =
            CacheOutcome::ALL.iter().map(|o| o.cache_status()).collect();
        assert_eq!(labels.len(), CacheOutcome::ALL.len());
        assert_eq!(headers.len(), CacheOutcome::ALL.len());
    }
}
