//! Per-route rules for the response headers a client receives: `response_headers = { remove =
//! [..], set = { name = "value" } }` in a `[[route]]`.
//!
//! They apply to every answer of the route — hits, fills, waiters' answers, pass-through and
//! Corral's own errors — after Corral has built it, so they change what the client sees and
//! never what is stored: one entry serves routes with different rules the same way it would
//! without them. `remove` runs first, then `set` (which replaces every value of the name).
//! Headers that frame the message or carry Corral's own word (`content-length`,
//! `transfer-encoding`, `connection`, `cache-status`, `age`) are refused at load time.
//!
//! Whatever the rules, `Surrogate-Key` and `Cache-Tag` — the upstream's purge tags, meant for the
//! cache alone — never reach a client (see [`strip_cache_only`]).

use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};

use crate::cache_control::CORRAL_CACHE_CONTROL;

/// Headers no rule may remove or set: they frame the message, or are Corral's account of it.
pub const PROTECTED: [&str; 5] = [
    "content-length",
    "transfer-encoding",
    "connection",
    "cache-status",
    "age",
];

/// Headers meant for the cache alone, removed from every answer: the upstream's surrogate keys.
/// Names made once: removing by a `&str` parses it first, on every answer.
const CACHE_ONLY: [HeaderName; 2] = [
    HeaderName::from_static("surrogate-key"),
    HeaderName::from_static("cache-tag"),
];

/// A route's response header rules. Empty by default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderRules {
    /// Names removed from every answer.
    pub remove: Vec<HeaderName>,
    /// Names set to a value on every answer (replacing what the answer had).
    pub set: Vec<(HeaderName, HeaderValue)>,
}

impl HeaderRules {
    /// Applies the rules to an answer's headers: removals first, then sets.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
    }

    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty()
    }
}

/// Removes the headers meant for the cache alone (`Surrogate-Key`, `Cache-Tag`) from an answer.
pub fn strip_cache_only(headers: &mut HeaderMap) {
    for name in CACHE_ONLY {
        headers.remove(name);
    }
}

/// Whether `headers` hold a field that never reaches a client: Corral's own
/// `Corral-Cache-Control` or a cache-only one. Entries keep them (revalidation, soft purges and
/// tags read them), so an entry records this once and answers from it skip
/// [`strip_corral_only`] when it is `false`.
pub fn holds_corral_only(headers: &HeaderMap) -> bool {
    headers.contains_key(CORRAL_CACHE_CONTROL) || CACHE_ONLY.iter().any(|n| headers.contains_key(n))
}

/// Removes every field that never reaches a client: `Corral-Cache-Control` and the cache-only
/// ones ([`strip_cache_only`]).
pub fn strip_corral_only(headers: &mut HeaderMap) {
    headers.remove(CORRAL_CACHE_CONTROL);
    strip_cache_only(headers);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removals_run_before_sets_and_a_set_replaces_every_value() {
        let rules = HeaderRules {
            remove: vec![HeaderName::from_static("x-internal")],
            set: vec![(
                HeaderName::from_static("x-served-by"),
                HeaderValue::from_static("corral"),
            )],
        };
        let mut headers = HeaderMap::new();
        headers.insert("x-internal", HeaderValue::from_static("1"));
        headers.append("x-served-by", HeaderValue::from_static("a"));
        headers.append("x-served-by", HeaderValue::from_static("b"));
        headers.insert("content-type", HeaderValue::from_static("text/plain"));
        rules.apply(&mut headers);
        assert!(!headers.contains_key("x-internal"));
        let served: Vec<_> = headers.get_all("x-served-by").iter().collect();
        assert_eq!(served, ["corral"]);
        assert_eq!(headers["content-type"], "text/plain");
    }

    #[test]
    fn surrogate_keys_never_reach_a_client() {
        let mut headers = HeaderMap::new();
        headers.insert("surrogate-key", HeaderValue::from_static("a b"));
        headers.insert("cache-tag", HeaderValue::from_static("c"));
        headers.insert("etag", HeaderValue::from_static("\"x\""));
        strip_cache_only(&mut headers);
        assert_eq!(headers.len(), 1);
    }

    #[test]
    fn corral_only_fields_are_found_and_removed() {
        let mut headers = HeaderMap::new();
        headers.insert("etag", HeaderValue::from_static("\"x\""));
        assert!(!holds_corral_only(&headers));
        for name in ["corral-cache-control", "surrogate-key", "cache-tag"] {
            let mut with = headers.clone();
            with.insert(name, HeaderValue::from_static("max-age=1"));
            assert!(holds_corral_only(&with), "{name}");
            strip_corral_only(&mut with);
            assert_eq!(with, headers, "{name}");
        }
    }
}
