//! Verdicts: what an upstream answer allows — stored and shared, shared with its fill's waiters
//! only, or its requester's alone — and for how long it stays fresh and usable stale.
//!
//! The directives are `Corral-Cache-Control`'s, else `CDN-Cache-Control`'s (RFC 9213: they then
//! replace `Cache-Control` and `Expires`), else `Cache-Control`'s.
//! Freshness is `s-maxage`, else `max-age`, else `Expires`, else (heuristic, for the route's
//! `heuristic_statuses`) the route's `ttl` (`error_ttl` for an error status), minus the
//! upstream's `Age`; the stale windows come from `stale-while-revalidate=N` / `stale-if-error=N`,
//! else the route's. What comes from the route is shortened by its `ttl_jitter` (one uniform
//! draw per answer), so entries filled together do not expire together; what comes from the
//! upstream is kept exact. `must-revalidate`/`proxy-revalidate` close the stale windows. An
//! answer with `Set-Cookie`, `private`, `no-store`, `no-cache` or `Vary: *`, and a 206 or 304,
//! is never shared.

use std::time::Duration;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};

use crate::body::ProxyBody;
use crate::cache_control::Directives;
use crate::config::RouteConfig;
use crate::entry::{ANSWER_FIELDS, Entry, Lifetime, now_ms, upstream_age_secs};
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

/// Decides what an upstream answer allows, and computes its lifetime (RFC 9111 §4.2).
///
/// The freshness lifetime is `s-maxage`, else `max-age`, else `Expires − Date` (explicit
/// freshness), else — for the route's `heuristic_statuses` only — the route's `ttl` (`error_ttl`
/// for an error). The upstream's `Age` counts against it, and is kept so that Corral's own `Age`
/// includes it. The stale windows come from `stale-while-revalidate=N` / `stale-if-error=N`, else
/// the route's; `must-revalidate` and `proxy-revalidate` close them. A 206 or 304 (which a fill,
/// being unconditional and whole, never asks for) is only for its requester.
pub(crate) fn judge(route: &RouteConfig, answer: Buffered, fill_ms: u32) -> Verdict {
    let (directives, _) = Directives::for_corral(&answer.headers);
    let partial = matches!(
        answer.status,
        StatusCode::PARTIAL_CONTENT | StatusCode::NOT_MODIFIED
    );
    if answer.headers.contains_key(header::SET_COOKIE)
        || !directives.storable()
        || partial
        || vary_star(&answer.headers)
    {
        return Verdict::Private(answer);
    }
    let now = now_ms();
    let (times, storable_status) = lifetime(route, answer.status, &answer.headers, now);
    let tags = surrogate_keys(&answer.headers, route);
    let headers = compact(&answer.headers);
    let vary = crate::vary::recorded(&answer.headers, &answer.sent);
    let entry = Entry {
        status: answer.status,
        corral_only: crate::header_rules::holds_corral_only(&headers),
        headers,
        body: answer.body,
        times,
        fill_ms,
        tags,
        vary,
    };
    // Worth storing while any of it can still be served: fresh, or stale within a window.
    if storable_status && entry.times.stale_until() > now {
        Verdict::Store(entry)
    } else {
        Verdict::Share(entry)
    }
}

/// The lifetime of an answer with `status` and `headers` received at `now`, and whether its
/// status may be stored with the kind of freshness it has (explicit or heuristic).
pub(crate) fn lifetime(
    route: &RouteConfig,
    status: StatusCode,
    headers: &HeaderMap,
    now: u64,
) -> (Lifetime, bool) {
    let (directives, targeted) = Directives::for_corral(headers);
    let status = status.as_u16();
    let explicit = if targeted {
        // A targeted field (RFC 9213 §2.1) replaces Cache-Control and Expires.
        directives
            .s_maxage
            .or(directives.max_age)
            .map(|s| s.saturating_mul(1000))
    } else {
        explicit_lifetime(&directives, headers, now)
    };
    // What Corral decides itself is shortened by one draw of the route's jitter; what the
    // upstream says is kept exact.
    let jitter = Jitter::draw(route.ttl_jitter);
    let (lifetime, storable_status) = match explicit {
        Some(ms) => (ms, route.cache_statuses.contains(&status)),
        None => {
            let ttl = if status >= 400 {
                route.error_ttl
            } else {
                route.ttl
            };
            let heuristic = jitter.shorten(millis(ttl));
            (heuristic, route.heuristic_statuses.contains(&status))
        }
    };
    let age = upstream_age_secs(headers).unwrap_or(0);
    let fresh = lifetime.saturating_sub(age.saturating_mul(1000));
    let (swr, sie) = if directives.forbids_stale() {
        (0, 0)
    } else {
        let secs = |s: u64| s.saturating_mul(1000);
        let own = |d: Duration| jitter.shorten(millis(d));
        (
            directives
                .stale_while_revalidate
                .map_or_else(|| own(route.stale_while_revalidate), secs),
            directives
                .stale_if_error
                .map_or_else(|| own(route.stale_if_error), secs),
        )
    };
    let fresh_until = now.saturating_add(fresh);
    let times = Lifetime {
        stored_at: now,
        fresh_until,
        swr_until: fresh_until.saturating_add(swr),
        sie_until: fresh_until.saturating_add(sie),
    };
    (times, storable_status)
}

/// The explicit freshness lifetime in milliseconds: `s-maxage`, else `max-age`, else
/// `Expires − Date` (`Date` absent: the time of receipt). An `Expires` that is not a valid date
/// means "already expired" (RFC 9111 §5.3).
fn explicit_lifetime(d: &Directives, headers: &HeaderMap, now: u64) -> Option<u64> {
    if let Some(secs) = d.s_maxage.or(d.max_age) {
        return Some(secs.saturating_mul(1000));
    }
    let expires = headers.get(header::EXPIRES)?;
    let Some(expires) = http_date_ms(expires) else {
        return Some(0);
    };
    let date = headers
        .get(header::DATE)
        .and_then(http_date_ms)
        .unwrap_or(now);
    Some(expires.saturating_sub(date))
}

/// An HTTP date (RFC 9110 §5.6.7) as Unix milliseconds: IMF-fixdate, or one of the obsolete
/// RFC 850 and asctime forms, with the leniency of [`lenient_http_date`].
pub(crate) fn http_date_ms(value: &HeaderValue) -> Option<u64> {
    let text = value.to_str().ok()?.trim();
    let at = httpdate::parse_http_date(text)
        .ok()
        .or_else(|| lenient_http_date(text))?;
    let since = at.duration_since(std::time::UNIX_EPOCH).ok()?;
    u64::try_from(since.as_millis()).ok()
}

/// An HTTP date that differs from the exact grammar only where a recipient loses nothing by
/// accepting it (RFC 9110 §5.6.7 asks recipients to be robust): day names, month names and `GMT`
/// in any case, and a day name that does not match the date (it is redundant). Anything else —
/// another zone, a two-digit year in IMF-fixdate, a missing comma, extra spaces, other
/// separators, a one-digit hour — stays invalid, and an invalid `Expires` means "expired".
fn lenient_http_date(text: &str) -> Option<std::time::SystemTime> {
    const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
    const LONG_DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let canonical = |word: &str| {
        DAYS.iter()
            .chain(&LONG_DAYS)
            .chain(&MONTHS)
            .chain(&["GMT"])
            .find(|known| known.eq_ignore_ascii_case(word))
            .map_or_else(|| word.to_owned(), |known| (*known).to_owned())
    };
    // The leading day name, then the rest with every name in its canonical case.
    let day_len = text.find(|c: char| !c.is_ascii_alphabetic())?;
    let (day, rest) = text.split_at(day_len);
    let mut tail = String::with_capacity(rest.len());
    let mut word = String::new();
    for c in rest.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_alphabetic() {
            word.push(c);
            continue;
        }
        if !word.is_empty() {
            tail.push_str(&canonical(&word));
            word.clear();
        }
        tail.push(c);
    }
    tail.pop();
    let names = if day.len() > 3 { &LONG_DAYS } else { &DAYS };
    if !names.iter().any(|d| d.eq_ignore_ascii_case(day)) {
        return None;
    }
    // Only the day that matches the date parses: trying each one ignores the one given.
    names
        .iter()
        .find_map(|d| httpdate::parse_http_date(&format!("{d}{tail}")).ok())
}

/// `Vary: *`: no later request can be known to match, so nothing is shared.
fn vary_star(headers: &HeaderMap) -> bool {
    crate::vary::names(headers).is_none()
}

/// The headers an entry keeps, in allocations of their own. hyper hands out header values as slices
/// of its connection read buffer: kept as they are, each cached entry would pin that whole buffer
/// (measured: ~11 KiB of memory per 2 KiB entry, far past the L1 byte budget). The upstream's `Age`
/// is kept (it is the entry's age when stored); Corral-only fields are not.
pub(crate) fn compact(headers: &HeaderMap) -> HeaderMap {
    let mut kept = HeaderMap::with_capacity(headers.len() + ANSWER_FIELDS);
    for (name, value) in headers {
        let mut owned = HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| value.clone());
        owned.set_sensitive(value.is_sensitive());
        kept.append(name.clone(), owned);
    }
    // A copy keeps the table's room for an answer's fields (`ANSWER_FIELDS`) and holds the
    // fields in a list of their own size: what is stored costs no spare buckets.
    kept.clone()
}

/// Longest tag indexed; longer ones are dropped (each would be a Redis key of that length).
const MAX_TAG_BYTES: usize = 1024;

/// Tags from `Surrogate-Key` (space-separated) and `Cache-Tag` (comma-separated), at most the
/// route's `max_tags` of them (the first in sorted order) and none longer than `MAX_TAG_BYTES`:
/// each tag becomes a Redis key, and the upstream's answer must not decide how many.
pub(crate) fn surrogate_keys(headers: &HeaderMap, route: &RouteConfig) -> Vec<String> {
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

/// The fraction by which one fill shortens the lifetimes Corral decides itself (route `ttl`,
/// `error_ttl` and the route's stale windows): uniform in `[0, ttl_jitter)`, drawn once per
/// answer, so that entries filled in one burst expire spread over `[ttl·(1 − j), ttl]`.
#[derive(Debug, Clone, Copy)]
struct Jitter(f64);

impl Jitter {
    fn draw(ttl_jitter: f64) -> Jitter {
        Jitter(rand::random::<f64>() * ttl_jitter)
    }

    /// `ms` shortened by the drawn fraction (never below zero, never above `ms`).
    fn shorten(self, ms: u64) -> u64 {
        // The fraction is in [0, 1): the cut is at most `ms`, and a float cast saturates.
        let cut = (ms as f64 * self.0) as u64;
        ms.saturating_sub(cut)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    /// A route of `ttl = "10s"` with `extra` lines.
    fn route_with(extra: &str) -> RouteConfig {
        let text = format!(
            "[[route]]\nname = \"r\"\npath_prefix = \"/\"\nupstream = \"http://127.0.0.1:1\"\n\
             ttl = \"10s\"\n{extra}\n"
        );
        match crate::Config::parse(&text, std::path::Path::new("<test>")) {
            Ok(mut config) => config.routes.remove(0),
            Err(err) => panic!("{err}"),
        }
    }

    #[test]
    fn heuristic_lifetimes_and_the_routes_stale_windows_spread_within_the_jitter() {
        let route = route_with(
            "ttl_jitter = 0.5\nstale_while_revalidate = \"4s\"\nstale_if_error = \"8s\"",
        );
        let now = 1_000_000;
        let mut fresh = std::collections::BTreeSet::new();
        for _ in 0..1000 {
            let (times, storable) = lifetime(&route, StatusCode::OK, &HeaderMap::new(), now);
            assert!(storable);
            let ttl = times.fresh_until - now;
            assert!((5_000..=10_000).contains(&ttl), "ttl {ttl}");
            let swr = times.swr_until - times.fresh_until;
            assert!((2_000..=4_000).contains(&swr), "swr {swr}");
            let sie = times.sie_until - times.fresh_until;
            assert!((4_000..=8_000).contains(&sie), "sie {sie}");
            fresh.insert(ttl);
        }
        // 1000 draws over 5000 possible milliseconds: spread, not a handful of values.
        assert!(fresh.len() > 500, "only {} distinct lifetimes", fresh.len());
        let (low, high) = (fresh.first(), fresh.last());
        assert!(
            low.zip(high).is_some_and(|(l, h)| h - l > 2_500),
            "{low:?}..{high:?}"
        );
    }

    #[test]
    fn the_upstreams_freshness_and_stale_windows_are_kept_exact() {
        let route = route_with("ttl_jitter = 0.9\nstale_while_revalidate = \"4s\"");
        let now = 1_000_000;
        let answers = [
            ("cache-control", "max-age=60", 60_000, Some(4_000)),
            (
                "cache-control",
                "s-maxage=30, max-age=60",
                30_000,
                Some(4_000),
            ),
            (
                "cache-control",
                "max-age=60, stale-while-revalidate=7",
                60_000,
                Some(7_000),
            ),
            (
                "cache-control",
                "max-age=60, must-revalidate",
                60_000,
                Some(0),
            ),
            (
                "expires",
                "Thu, 01 Jan 1970 00:17:40 GMT",
                60_000,
                Some(4_000),
            ),
        ];
        for (name, value, ttl, swr) in answers {
            let mut headers = HeaderMap::new();
            headers.insert(name, HeaderValue::from_static(value));
            for _ in 0..100 {
                let (times, _) = lifetime(&route, StatusCode::OK, &headers, now);
                assert_eq!(times.fresh_until - now, ttl, "{value}");
                let own = times.swr_until - times.fresh_until;
                // The route's window (no directive) is jittered; the upstream's is not.
                match swr {
                    Some(4_000) => assert!((400..=4_000).contains(&own), "{value}: {own}"),
                    Some(exact) => assert_eq!(own, exact, "{value}"),
                    None => {}
                }
            }
        }
        let none = route_with("ttl_jitter = 0");
        for _ in 0..100 {
            let (times, _) = lifetime(&none, StatusCode::OK, &HeaderMap::new(), now);
            assert_eq!(times.fresh_until - now, 10_000, "no jitter: exact");
        }
    }

    #[test]
    fn dates_are_read_leniently_only_where_nothing_is_lost() {
        let ms = |text: &'static str| http_date_ms(&HeaderValue::from_static(text));
        let exact = ms("Thu, 18 Aug 2050 02:01:18 GMT");
        assert!(exact.is_some());
        for lenient in [
            "THU, 18 Aug 2050 02:01:18 GMT",
            "Thu, 18 AUG 2050 02:01:18 GMT",
            "Thu, 18 Aug 2050 02:01:18 gMT",
            "Mon, 18 Aug 2050 02:01:18 GMT",
            "Thursday, 18-Aug-50 02:01:18 GMT",
            "thursday, 18-aug-50 02:01:18 gmt",
            "Mon Aug 18 02:01:18 2050",
        ] {
            assert_eq!(ms(lenient), exact, "{lenient}");
        }
        assert_eq!(
            ms("Thu Aug  8 02:01:18 2050"),
            ms("Mon, 08 Aug 2050 02:01:18 GMT"),
            "asctime with a day name that does not match"
        );
        for invalid in [
            "Thu, 18 Aug 2050 02:01:18 UTC",
            "Thu, 18 Aug 2050 02:01:18 AEST",
            "Thu, 18 Aug 50 02:01:18 GMT",
            "Thu 18 Aug 2050 02:01:18 GMT",
            "Thu, 18  Aug  2050 02:01:18 GMT",
            "Thu, 18-Aug-2050 02:01:18 GMT",
            "Thu, 18 Aug 2050 02.01.18 GMT",
            "Thu, 18 Aug 2050 2:01:18 GMT",
            "Fri, 18 Aug 2050 02:01:18 GMTX",
            "Xyz, 18 Aug 2050 02:01:18 GMT",
            "0",
            "",
        ] {
            assert_eq!(ms(invalid), None, "{invalid}");
        }
    }

    #[test]
    fn age_parsing_table() {
        let cases = [
            (vec!["60"], Some(60)),
            (vec!["7200, 0"], Some(7200)),
            (vec!["0, 7200"], Some(0)),
            (vec!["7200", "0"], Some(7200)),
            (vec!["7200;foo=bar"], Some(7200)),
            (vec![" 12 "], Some(12)),
            (vec!["-1"], None),
            (vec!["1.5"], None),
            (vec!["abc"], None),
            (vec!["99999999999999999999999"], Some(u64::MAX)),
        ];
        for (lines, want) in cases {
            let mut h = HeaderMap::new();
            for line in &lines {
                if let Ok(v) = HeaderValue::from_str(line) {
                    h.append(header::AGE, v);
                }
            }
            assert_eq!(upstream_age_secs(&h), want, "{lines:?}");
        }
    }

    #[test]
    fn stored_headers_do_not_pin_the_connection_buffer() {
        let read_buffer = Bytes::from(vec![b'x'; 8192]);
        let mut headers = HeaderMap::new();
        let shared = HeaderValue::from_maybe_shared(read_buffer.slice(0..16));
        headers.insert(
            header::CONTENT_TYPE,
            shared.unwrap_or(HeaderValue::from_static("x")),
        );
        let kept = compact(&headers);
        let range = read_buffer.as_ptr_range();
        for value in kept.values() {
            assert!(
                !range.contains(&value.as_bytes().as_ptr()),
                "still a slice of the buffer"
            );
        }
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[header::CONTENT_TYPE].as_bytes(), &[b'x'; 16]);
    }
}
