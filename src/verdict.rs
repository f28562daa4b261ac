//! Verdicts: what an upstream answer allows — stored and shared, shared with its fill's waiters
//! only, or its requester's alone — and for how long it stays fresh and usable stale.
//!
//! Freshness is `s-maxage`, else `max-age`, else the route's `ttl` (`error_ttl` for a listed
//! error status); the stale windows come from `stale-while-revalidate=N` / `stale-if-error=N`,
//! else the route's. An answer with `Set-Cookie`, `private`, `no-store` or `no-cache` is never
//! shared.

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};

use crate::body::ProxyBody;
use crate::config::RouteConfig;
use crate::entry::{Directives, Entry, Lifetime, now_ms};
use crate::upstream::Buffered;

/// What the upstream's answer allows.
pub(crate) enum Verdict {
    /// May be stored and shared.
    Store(Entry),
    /// May be shared with this fill's waiters but not stored (status not cached, zero lifetime).
    Share(Entry),
    /// Only for the requester: `Set-Cookie`, `private`, `no-store`, `no-cache`.
    Private(Buffered),
    /// Larger than `max_entry_size`: streamed to the requester, never stored.
    Oversized(Response<ProxyBody>),
}

/// The answer standing for a fill that got none (connection error, timeout), shared with the
/// waiters so they do not each try again — fleet-wide, so it carries no detail: a generic body and
/// the failure's `kind` in the `corral-error` header (see [`crate::answer::ERROR_KIND`]); the
/// detail (the upstream's address, the cause) is in the leader's log.
pub fn error_entry(status: StatusCode, kind: &'static str) -> Entry {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(crate::answer::ERROR_KIND, HeaderValue::from_static(kind));
    let now = now_ms();
    Entry {
        status,
        headers,
        body: Bytes::from(crate::answer::generic_body(status)),
        times: Lifetime {
            stored_at: now,
            fresh_until: now,
            swr_until: now,
            sie_until: now,
        },
        fill_ms: 0,
        tags: Vec::new(),
    }
}

/// Decides what an upstream answer allows, and computes its lifetime: `s-maxage`, else `max-age`,
/// else the route's `ttl` (`error_ttl` for a listed error status); the stale windows from the
/// header, else the route's.
pub(crate) fn judge(route: &RouteConfig, answer: Buffered, fill_ms: u32) -> Verdict {
    let directives = Directives::from_headers(&answer.headers);
    if answer.headers.contains_key(header::SET_COOKIE) || !directives.storable() {
        return Verdict::Private(answer);
    }
    let now = now_ms();
    let secs = |s: u64| s.saturating_mul(1000);
    let default_ttl = if answer.status.as_u16() >= 400 {
        route.error_ttl
    } else {
        route.ttl
    };
    let fresh = directives
        .s_maxage
        .or(directives.max_age)
        .map_or(millis(default_ttl), secs);
    let swr = directives
        .stale_while_revalidate
        .map_or(millis(route.stale_while_revalidate), secs);
    let sie = directives
        .stale_if_error
        .map_or(millis(route.stale_if_error), secs);
    let fresh_until = now.saturating_add(fresh);
    let times = Lifetime {
        stored_at: now,
        fresh_until,
        swr_until: fresh_until.saturating_add(swr),
        sie_until: fresh_until.saturating_add(sie),
    };
    let storable_status = route.cache_statuses.contains(&answer.status.as_u16());
    let tags = surrogate_keys(&answer.headers, route);
    let headers = compact(&answer.headers);
    let entry = Entry {
        status: answer.status,
        headers,
        body: answer.body,
        times,
        fill_ms,
        tags,
    };
    // Worth storing while any of it can still be served: fresh, or stale within a window.
    if storable_status && entry.times.stale_until() > now {
        Verdict::Store(entry)
    } else {
        Verdict::Share(entry)
    }
}

/// The headers an entry keeps, in allocations of their own. hyper hands out header values as slices
/// of its connection read buffer: kept as they are, each cached entry would pin that whole buffer
/// (measured: ~11 KiB of memory per 2 KiB entry, far past the L1 byte budget).
fn compact(headers: &HeaderMap) -> HeaderMap {
    let mut kept = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        if name == header::AGE {
            continue;
        }
        let mut owned = HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| value.clone());
        owned.set_sensitive(value.is_sensitive());
        kept.append(name.clone(), owned);
    }
    kept
}

/// Longest tag indexed; longer ones are dropped (each would be a Redis key of that length).
const MAX_TAG_BYTES: usize = 1024;

/// Tags from `Surrogate-Key` (space-separated) and `Cache-Tag` (comma-separated), at most the
/// route's `max_tags` of them (the first in sorted order) and none longer than `MAX_TAG_BYTES`:
/// each tag becomes a Redis key, and the upstream's answer must not decide how many.
fn surrogate_keys(headers: &HeaderMap, route: &RouteConfig) -> Vec<String> {
    let spaced = headers
        .get_all("surrogate-key")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split_ascii_whitespace());
    let commas = headers
        .get_all("cache-tag")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim);
    let mut tags: Vec<String> = spaced
        .chain(commas)
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect();
    tags.sort();
    tags.dedup();
    let found = tags.len();
    tags.retain(|t| t.len() <= MAX_TAG_BYTES);
    let too_long = found - tags.len();
    tags.truncate(route.max_tags);
    let dropped = found - tags.len();
    if dropped > 0 {
        tracing::warn!(
            route = %route.name,
            found,
            kept = tags.len(),
            too_long,
            max_tags = route.max_tags,
            "dropped surrogate keys past the route's limit"
        );
    }
    tags
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_headers_do_not_pin_the_connection_buffer() {
        let read_buffer = Bytes::from(vec![b'x'; 8192]);
        let mut headers = HeaderMap::new();
        let shared = HeaderValue::from_maybe_shared(read_buffer.slice(0..16));
        headers.insert(
            header::CONTENT_TYPE,
            shared.unwrap_or(HeaderValue::from_static("x")),
        );
        headers.insert(header::AGE, HeaderValue::from_static("5"));
        let kept = compact(&headers);
        let range = read_buffer.as_ptr_range();
        for value in kept.values() {
            assert!(
                !range.contains(&value.as_bytes().as_ptr()),
                "still a slice of the buffer"
            );
        }
        assert_eq!(kept.len(), 1, "Age is not kept");
        assert_eq!(kept[header::CONTENT_TYPE].as_bytes(), &[b'x'; 16]);
    }
}
