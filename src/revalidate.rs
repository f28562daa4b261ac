//! Revalidation (RFC 9111 §4.3): the pure pieces of refreshing a stale entry with a conditional
//! request instead of a whole transfer.
//!
//! - [`conditional_headers`]: the `If-None-Match` / `If-Modified-Since` a refresh sends, from the
//!   stale entry's validators (`ETag`, `Last-Modified`); empty when it has none, and then the
//!   refresh is an ordinary whole fill.
//! - `renewed`: the entry an upstream `304 Not Modified` makes of the stale one (§4.3.4): its
//!   body, the stored header fields replaced by those the 304 carries, and a new lifetime computed
//!   from the merged fields as for a fresh answer — stored when that lifetime is worth storing,
//!   else shared with the fill's requesters only (validated, it answers them, §4.3.3). `None`
//!   when the 304 does not validate this entry (another strong `ETag`) or the merged answer may
//!   not be shared (`no-store`, `private`, `Set-Cookie`): the caller then fills unconditionally.
//!
//! Only a refresh under the fill lock uses them: its conditional request goes out on behalf of
//! the cache, never of a client, so a 304 is never handed to a requester as the answer.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, StatusCode};

use crate::cache_control::Directives;
use crate::config::RouteConfig;
use crate::entry::{Entry, now_ms};
use crate::purge::is_path_tag;
use crate::verdict::{Verdict, compact, lifetime, surrogate_keys};

/// The conditional headers a refresh of `stale` sends: `If-None-Match` with its `ETag`,
/// `If-Modified-Since` with its `Last-Modified` (both when it has both; RFC 9111 §4.3.1).
pub fn conditional_headers(stale: &Entry) -> HeaderMap {
    let mut h = HeaderMap::new();
    if let Some(etag) = stale.headers.get(header::ETAG) {
        h.insert(header::IF_NONE_MATCH, etag.clone());
    }
    if let Some(modified) = stale.headers.get(header::LAST_MODIFIED) {
        h.insert(header::IF_MODIFIED_SINCE, modified.clone());
    }
    h
}

/// Adds the conditional headers for `stale` to a fill request built by
/// [`crate::upstream::fill_request`]. Returns whether the request became conditional.
pub fn make_conditional<B>(req: &mut Request<B>, stale: &Entry) -> bool {
    let conditions = conditional_headers(stale);
    let conditional = !conditions.is_empty();
    req.headers_mut().extend(conditions);
    conditional
}

/// Fields a 304 never replaces in the stored answer: they describe the stored body or the
/// connection, not the representation's metadata (RFC 9111 §3.2).
const KEPT: [HeaderName; 4] = [
    header::CONTENT_LENGTH,
    header::CONTENT_RANGE,
    header::TRANSFER_ENCODING,
    header::CONNECTION,
];

/// The entry a `304 Not Modified` with `headers` makes of `stale`, as a verdict (`Store`, or
/// `Share` when its lifetime is not worth storing), or `None` (see the module docs). `fill_ms` is
/// how long the conditional request took.
pub(crate) fn renewed(
    route: &RouteConfig,
    stale: &Entry,
    headers: &HeaderMap,
    fill_ms: u32,
) -> Option<Verdict> {
    let stored_etag = stale.headers.get(header::ETAG);
    if let (Some(new), Some(old)) = (headers.get(header::ETAG), stored_etag)
        && !same_validator(new, old)
    {
        return None;
    }
    let mut merged = stale.headers.clone();
    // An `Age` stored with the old answer counted its age then; the 304's (or none) counts now.
    merged.remove(header::AGE);
    let names: Vec<&HeaderName> = headers.keys().filter(|n| !KEPT.contains(n)).collect();
    for name in names {
        merged.remove(name);
        for value in headers.get_all(name) {
            merged.append(name.clone(), value.clone());
        }
    }
    let (directives, _) = Directives::for_corral(&merged);
    if merged.contains_key(header::SET_COOKIE) || !directives.storable() {
        return None;
    }
    let now = now_ms();
    let (times, storable) = lifetime(route, stale.status, &merged, now);
    let headers = compact(&merged);
    let entry = Entry {
        status: stale.status,
        corral_only: crate::header_rules::holds_corral_only(&headers),
        // The upstream's tags as it sends them now; the path's, as the path, stay.
        tags: surrogate_keys(&merged, route)
            .into_iter()
            .chain(stale.tags.iter().filter(|t| is_path_tag(t)).cloned())
            .collect(),
        headers,
        body: stale.body.clone(),
        times,
        fill_ms,
        vary: stale.vary.clone(),
    };
    Some(if storable && times.stale_until() > now {
        Verdict::Store(entry)
    } else {
        Verdict::Share(entry)
    })
}

/// Whether a 304's `ETag` names the stored one (weak comparison: a 304 may carry the weak form).
fn same_validator(new: &HeaderValue, old: &HeaderValue) -> bool {
    let opaque = |v: &HeaderValue| {
        let text = v.to_str().unwrap_or_default().trim();
        text.strip_prefix("W/").unwrap_or(text).to_owned()
    };
    opaque(new) == opaque(old)
}

/// Whether an upstream answer to a conditional refresh is the 304 that `renewed` merges.
pub fn is_not_modified(status: StatusCode) -> bool {
    status == StatusCode::NOT_MODIFIED
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::Lifetime;
    use bytes::Bytes;

    fn route() -> RouteConfig {
        let text = "[[route]]\nname = \"r\"\npath_prefix = \"/\"\nupstream = \"http://127.0.0.1:1\"\nttl = \"0s\"\n";
        match crate::Config::parse(text, std::path::Path::new("<test>")) {
            Ok(mut c) => c.routes.remove(0),
            Err(e) => panic!("{e}"),
        }
    }

    fn stale(fields: &[(&'static str, &'static str)]) -> Entry {
        let mut headers = HeaderMap::new();
        for (n, v) in fields {
            headers.append(*n, HeaderValue::from_static(v));
        }
        Entry {
            status: StatusCode::OK,
            corral_only: crate::header_rules::holds_corral_only(&headers),
            headers,
            body: Bytes::from_static(b"stored body"),
            times: Lifetime {
                stored_at: 1,
                fresh_until: 2,
                swr_until: 2,
                sie_until: 2,
            },
            fill_ms: 5,
            tags: vec!["old".into()],
            vary: Default::default(),
        }
    }

    fn headers(fields: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in fields {
            h.append(*n, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn conditional_headers_come_from_the_validators() {
        const LM: &str = "Mon, 02 Nov 2026 10:00:00 GMT";
        let lm = LM;
        type Fields = &'static [(&'static str, &'static str)];
        let cases: [(Fields, Option<&str>, Option<&str>); 4] = [
            (&[("etag", "\"v1\"")], Some("\"v1\""), None),
            (&[("last-modified", LM)], None, Some(lm)),
            (
                &[("etag", "W/\"v1\""), ("last-modified", LM)],
                Some("W/\"v1\""),
                Some(lm),
            ),
            (&[("content-type", "text/plain")], None, None),
        ];
        for (fields, inm, ims) in cases {
            let h = conditional_headers(&stale(fields));
            let get = |n| h.get(n).and_then(|v| v.to_str().ok());
            assert_eq!(get(header::IF_NONE_MATCH), inm, "{fields:?}");
            assert_eq!(get(header::IF_MODIFIED_SINCE), ims, "{fields:?}");
        }
        let mut req = Request::new(());
        assert!(make_conditional(&mut req, &stale(&[("etag", "\"v1\"")])));
        assert_eq!(req.headers()[header::IF_NONE_MATCH], "\"v1\"");
    }

    #[test]
    fn a_304_renews_the_entry_with_its_headers_and_new_freshness() {
        let old = stale(&[
            ("etag", "\"v1\""),
            ("cache-control", "max-age=1"),
            ("content-type", "text/plain"),
            ("content-length", "11"),
            ("x-version", "1"),
            ("age", "50"),
            ("surrogate-key", "old"),
        ]);
        let not_modified = headers(&[
            ("etag", "\"v1\""),
            ("cache-control", "max-age=60"),
            ("x-version", "2"),
            ("content-length", "0"),
            ("surrogate-key", "new"),
        ]);
        let Some(Verdict::Store(renewed)) = renewed(&route(), &old, &not_modified, 7) else {
            panic!("a matching 304 renews the entry");
        };
        assert_eq!(renewed.body, old.body);
        assert_eq!(renewed.headers["x-version"], "2");
        assert_eq!(renewed.headers["content-length"], "11");
        assert_eq!(renewed.headers["content-type"], "text/plain");
        assert!(!renewed.headers.contains_key("age"));
        assert_eq!(renewed.tags, ["new"]);
        assert_eq!(renewed.fill_ms, 7);
        let now = now_ms();
        assert!(
            renewed.times.fresh_until > now + 50_000,
            "fresh for max-age=60 again"
        );
    }

    #[test]
    fn a_304_that_does_not_validate_or_forbids_sharing_renews_nothing() {
        let old = stale(&[("etag", "\"v1\""), ("cache-control", "max-age=1")]);
        let cases: [&[(&'static str, &'static str)]; 3] = [
            &[("etag", "\"v2\""), ("cache-control", "max-age=60")],
            &[("cache-control", "no-store")],
            &[("cache-control", "max-age=60"), ("set-cookie", "a=b")],
        ];
        for fields in cases {
            assert!(
                renewed(&route(), &old, &headers(fields), 1).is_none(),
                "{fields:?}"
            );
        }
        let weak = headers(&[("etag", "W/\"v1\""), ("cache-control", "max-age=60")]);
        assert!(matches!(
            renewed(&route(), &old, &weak, 1),
            Some(Verdict::Store(_))
        ));
    }

    /// A 304 whose merged fields leave no lifetime (here the stored `Expires` is already past the
    /// 304's `Date`) still validated the entry: it answers the fill's requesters (RFC 9111
    /// §4.3.3), and is not stored, so the next request revalidates again.
    #[test]
    fn a_304_that_leaves_no_lifetime_answers_the_fill_without_being_stored() {
        let old = stale(&[
            ("etag", "\"v1\""),
            ("date", "Mon, 02 Nov 2026 10:00:00 GMT"),
            ("expires", "Mon, 02 Nov 2026 10:00:01 GMT"),
        ]);
        for fields in [
            &[("date", "Mon, 02 Nov 2026 10:00:03 GMT")][..],
            &[("cache-control", "max-age=0"), ("x-new", "1")][..],
        ] {
            let Some(Verdict::Share(shared)) = renewed(&route(), &old, &headers(fields), 1) else {
                panic!("{fields:?}: a validated 304 answers the fill, unstored");
            };
            assert_eq!(shared.body, old.body, "{fields:?}");
        }
    }
}
