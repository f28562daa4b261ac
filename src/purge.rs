//! Purges: removing entries by key, route or tag — from L2, and from every instance's L1 through
//! one invalidation channel (`corral:{namespace}:invalidate`) that every instance subscribes to.
//!
//! The purging instance deletes from Redis, then PUBLISHes the invalidation; every instance
//! (itself included) drops the matching L1 entries when it arrives. An instance whose pub/sub
//! connection dropped may have missed invalidations, so it drops its whole L1 when it has
//! re-subscribed (entries are then re-read from Redis on demand).
//!
//! A soft purge (`"soft": true`, [`Mode::MarkStale`]) marks the entries it covers stale instead of
//! removing them — in Redis in place, then in every L1 by the same channel: the next request
//! answers the stale entry and starts the one refresh of its key the fleet makes (the
//! stale-while-revalidate path), so a purge of a large tag is not a burst of cold misses. See
//! [`crate::entry::Lifetime::marked_stale`] for how long a marked entry stays servable.

use std::collections::BTreeMap;

use crate::key::CacheKey;

mod fence;
mod order;
pub use fence::Fence;
pub use order::{Mode, PurgeOrder};

/// The body of `POST /purge`: exactly one of `url`, `route`, `tag`, `prefix`, and optionally
/// `soft` (a boolean, default false: mark stale instead of removing). For `url`, `method`
/// (default GET), `headers` and `body` (a JSON value, or a string sent as is) complete the request
/// whose key is purged, for routes keyed on them. `prefix` names a path: every entry whose path
/// is it or lies below it (on a `/` boundary, as a route's `path_prefix` matches) is purged.
#[derive(Debug)]
pub struct PurgeRequest {
    pub url: Option<String>,
    pub method: Option<String>,
    pub headers: BTreeMap<String, String>,
    pub body: Option<serde_json::Value>,
    pub route: Option<String>,
    pub tag: Option<String>,
    pub prefix: Option<String>,
    /// Mark the entries stale instead of removing them.
    pub soft: bool,
}

/// Why a purge could not be done.
#[derive(Debug, thiserror::Error)]
pub enum PurgeError {
    #[error("purge body: {0}")]
    Malformed(String),
    #[error("no cached route matches {0:?}")]
    NoRoute(String),
    #[error("no route named {0:?}")]
    UnknownRoute(String),
    /// Redis could not take the purge (the error is the Redis tier's).
    #[error(transparent)]
    Redis(Box<dyn std::error::Error + Send + Sync>),
}

/// The fields `POST /purge` accepts, as the error messages list them.
const PURGE_FIELDS: &str = "`url`, `method`, `headers`, `body`, `route`, `tag`, `prefix`, `soft`";

impl PurgeRequest {
    /// Reads a `POST /purge` body. Every refusal is worded for the operator who sent it (what is
    /// wrong and what would be right), not in the JSON parser's terms.
    pub fn parse(body: &[u8]) -> Result<PurgeRequest, PurgeError> {
        let malformed = |why: String| PurgeError::Malformed(why);
        if body.iter().all(u8::is_ascii_whitespace) {
            return Err(malformed(
                "empty; send a JSON object with one of `url`, `route`, `tag`, `prefix`".to_owned(),
            ));
        }
        let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
            malformed(format!(
                "not valid JSON (line {}, column {}); send an object such as \
                 {{\"url\": \"/path?query\"}}",
                e.line(),
                e.column()
            ))
        })?;
        let serde_json::Value::Object(fields) = value else {
            return Err(malformed(format!(
                "a JSON {} where an object with one of `url`, `route`, `tag`, `prefix` belongs",
                json_kind(&value)
            )));
        };
        let mut request = PurgeRequest {
            url: None,
            method: None,
            headers: BTreeMap::new(),
            body: None,
            route: None,
            tag: None,
            prefix: None,
            soft: false,
        };
        for (name, value) in fields {
            let text = || match &value {
                serde_json::Value::String(s) => Ok(Some(s.clone())),
                serde_json::Value::Null => Ok(None),
                other => Err(malformed(format!(
                    "`{name}` must be a string, not a JSON {}",
                    json_kind(other)
                ))),
            };
            match name.as_str() {
                "url" => request.url = text()?,
                "method" => request.method = text()?,
                "route" => request.route = text()?,
                "tag" => request.tag = text()?,
                "prefix" => request.prefix = text()?,
                "body" => request.body = Some(value),
                "headers" => request.headers = headers(&value)?,
                "soft" => {
                    request.soft = match value {
                        serde_json::Value::Bool(soft) => soft,
                        serde_json::Value::Null => false,
                        other => {
                            return Err(malformed(format!(
                                "`soft` must be true or false, not a JSON {}",
                                json_kind(&other)
                            )));
                        }
                    }
                }
                _ => {
                    return Err(malformed(format!(
                        "unknown field `{name}` (known: {PURGE_FIELDS})"
                    )));
                }
            }
        }
        let given = [&request.url, &request.route, &request.tag, &request.prefix]
            .iter()
            .filter(|f| f.is_some())
            .count();
        if given != 1 {
            return Err(PurgeError::Malformed(
                "give exactly one of `url`, `route`, `tag`, `prefix`".to_owned(),
            ));
        }
        if request.url.is_none()
            && (request.method.is_some() || !request.headers.is_empty() || request.body.is_some())
        {
            return Err(PurgeError::Malformed(
                "`method`, `headers` and `body` go with `url`".to_owned(),
            ));
        }
        Ok(request)
    }

    /// What the purge names, for its log line: `url GET /a?b`, `route r`, `tag t`, `prefix /p/`,
    /// led by `soft ` for a soft purge.
    pub fn describe(&self) -> String {
        let what = self.target();
        if self.soft {
            format!("soft {what}")
        } else {
            what
        }
    }

    fn target(&self) -> String {
        match (&self.url, &self.route, &self.tag, &self.prefix) {
            (Some(url), ..) => {
                let method = self.method.as_deref().unwrap_or("GET").to_ascii_uppercase();
                format!("url {method} {url}")
            }
            (None, Some(route), ..) => format!("route {route}"),
            (None, None, Some(tag), _) => format!("tag {tag}"),
            (None, None, None, Some(prefix)) => format!("prefix {prefix}"),
            (None, None, None, None) => "nothing".to_owned(),
        }
    }

    /// The request body to key on: a JSON string is sent as is, any other value as JSON.
    pub fn body_bytes(&self) -> Vec<u8> {
        match &self.body {
            None => Vec::new(),
            Some(serde_json::Value::String(s)) => s.clone().into_bytes(),
            Some(other) => other.to_string().into_bytes(),
        }
    }
}

/// `headers` of a purge: an object of header names to string values.
fn headers(value: &serde_json::Value) -> Result<BTreeMap<String, String>, PurgeError> {
    let serde_json::Value::Object(map) = value else {
        return Err(PurgeError::Malformed(format!(
            "`headers` must be an object of names to values, not a JSON {}",
            json_kind(value)
        )));
    };
    map.iter()
        .map(|(name, value)| match value {
            serde_json::Value::String(s) => Ok((name.clone(), s.clone())),
            other => Err(PurgeError::Malformed(format!(
                "header `{name}` must be a string, not a JSON {}",
                json_kind(other)
            ))),
        })
        .collect()
}

/// A JSON value's kind, as a message names it.
fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "boolean",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "array",
        serde_json::Value::Object(_) => "object",
    }
}

/// Marks the tags Corral gives an entry for the path prefixes it lies under (see [`path_tags`]).
/// An upstream's surrogate key can never start with it: tags from `Surrogate-Key` are split on
/// whitespace and those from `Cache-Tag` trimmed of it.
const PATH_TAG: &str = " path:";

/// How many path segments below its route's `path_prefix` an entry is indexed for purges by
/// prefix. Each is a tag (a Redis set) written with the entry, and the client chooses the path,
/// so the depth is bounded; a purge by a deeper prefix is refused, never half done.
pub const MAX_PREFIX_DEPTH: usize = 4;

/// The tags of an entry stored for `path` on a route whose `path_prefix` is `route_prefix`: one
/// per path prefix ending on a segment boundary strictly below the route's prefix, at most
/// [`MAX_PREFIX_DEPTH`] of them (`/recs` and `/recs/v2/items/7` give `/recs/v2`,
/// `/recs/v2/items`, `/recs/v2/items/7`). A prefix at or above the route's is a purge of the
/// whole route, which needs no tag.
pub fn path_tags(route_prefix: &str, path: &str) -> Vec<String> {
    let base = route_prefix.trim_end_matches('/');
    let Some(below) = path.strip_prefix(base) else {
        return Vec::new();
    };
    let mut tags = Vec::new();
    let (mut rest, mut end) = (below, base.len());
    while let Some(after) = rest.strip_prefix('/') {
        if tags.len() == MAX_PREFIX_DEPTH {
            break;
        }
        let segment = after.find('/').unwrap_or(after.len());
        end += 1 + segment;
        if segment > 0 {
            tags.push(format!("{PATH_TAG}{}", &path[..end]));
        }
        rest = &after[segment..];
    }
    tags
}

/// The tag of the entries under `prefix` (a path, trailing `/` or not), as [`path_tags`] gives it.
pub fn prefix_tag(prefix: &str) -> String {
    format!("{PATH_TAG}{}", prefix.trim_end_matches('/'))
}

/// Whether `tag` is one of Corral's path tags (kept through a revalidation, as the path is).
pub fn is_path_tag(tag: &str) -> bool {
    tag.starts_with(PATH_TAG)
}

/// What to remove.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Purge {
    /// One key of one route.
    Key { route: String, key: CacheKey },
    /// Every entry of a route.
    Route(String),
    /// Every entry carrying a surrogate key.
    Tag(String),
    /// Everything in L1 (sent to oneself after a pub/sub reconnect, never published).
    All,
}

impl Purge {
    /// The metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            Purge::Key { .. } => "url",
            Purge::Route(_) => "route",
            Purge::Tag(_) => "tag",
            Purge::All => "all",
        }
    }

    /// The invalidation message: `key <route> <key>`, `route <name>`, `tag <tag>`, `all`, where
    /// `<key>` is the key's text (64 hex digits, then `:https` for an https key, which instances
    /// older than that form refuse: see [`CacheKey::parse`]).
    pub fn payload(&self) -> String {
        match self {
            Purge::Key { route, key } => format!("key {route} {key}"),
            Purge::Route(route) => format!("route {route}"),
            Purge::Tag(tag) => format!("tag {tag}"),
            Purge::All => "all".to_owned(),
        }
    }

    pub fn parse(payload: &[u8]) -> Option<Purge> {
        let text = std::str::from_utf8(payload).ok()?;
        let (kind, rest) = text.split_once(' ').unwrap_or((text, ""));
        match kind {
            "key" => {
                let (route, key) = rest.split_once(' ')?;
                Some(Purge::Key {
                    route: route.to_owned(),
                    key: CacheKey::parse(key)?,
                })
            }
            "route" if !rest.is_empty() => Some(Purge::Route(rest.to_owned())),
            "tag" if !rest.is_empty() => Some(Purge::Tag(rest.to_owned())),
            "all" => Some(Purge::All),
            _ => None,
        }
    }

    /// Whether this purge removes an entry of `route` under `key` carrying `tags`.
    pub fn covers(&self, route: &str, key: &CacheKey, tags: &[String]) -> bool {
        match self {
            Purge::Key { route: r, key: k } => r == route && k == key,
            Purge::Route(r) => r == route,
            Purge::Tag(tag) => tags.iter().any(|t| t == tag),
            Purge::All => true,
        }
    }

    /// Whether fills under way must heed this purge. `All` is not a purge anyone asked for: it
    /// drops an L1 that may have missed purges while pub/sub was down, and refusing every fill
    /// that spans a reconnection would stampede the upstream right after it. (A key purge
    /// missed meanwhile still refuses the store through Redis: it marked the key's lock.)
    pub(crate) fn fences(&self) -> bool {
        !matches!(self, Purge::All)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purge_bodies_are_refused_in_our_own_words() {
        let cases: [(&str, &str); 8] = [
            ("", "empty; send a JSON object"),
            ("purge everything", "not valid JSON (line 1, column 1)"),
            ("[1]", "a JSON array where an object"),
            (
                r#"{"colour": "red"}"#,
                "unknown field `colour` (known: `url`",
            ),
            (r#"{"url": 7}"#, "`url` must be a string, not a JSON number"),
            (
                r#"{"url": "/a", "headers": {"x": 1}}"#,
                "header `x` must be a string",
            ),
            (r#"{"url": "/a", "tag": "t"}"#, "give exactly one of"),
            (r#"{"tag": "t", "method": "GET"}"#, "go with `url`"),
        ];
        for (body, wanted) in cases {
            let err = PurgeRequest::parse(body.as_bytes())
                .expect_err(body)
                .to_string();
            assert!(err.starts_with("purge body: "), "{body:?}: {err}");
            assert!(err.contains(wanted), "{body:?}: {err:?} lacks {wanted:?}");
            // serde's own phrasing never reaches the operator.
            assert!(
                !err.contains("expected") && !err.contains("at line"),
                "{body:?}: {err}"
            );
        }
        let ok = PurgeRequest::parse(br#"{"url": "/a", "method": null, "body": {"k": 1}}"#)
            .expect("a good body");
        assert_eq!(ok.url.as_deref(), Some("/a"));
        assert_eq!(ok.body_bytes(), br#"{"k":1}"#);
    }

    #[test]
    fn an_entry_is_tagged_with_each_prefix_below_its_route_up_to_the_depth() {
        let tags = path_tags("/recs", "/recs/v2/items/7");
        let want: Vec<String> = ["/recs/v2", "/recs/v2/items", "/recs/v2/items/7"]
            .iter()
            .map(|p| prefix_tag(p))
            .collect();
        assert_eq!(tags, want);
        assert_eq!(path_tags("/recs/", "/recs/v2/"), [prefix_tag("/recs/v2/")]);
        assert!(path_tags("/recs", "/recs").is_empty(), "the route itself");
        assert!(path_tags("/", "/a/b/c/d/e/f").len() == MAX_PREFIX_DEPTH);
        assert!(path_tags("/", "/a/b")[0].starts_with(PATH_TAG));
        assert!(is_path_tag(&tags[0]) && !is_path_tag("article-7"));
    }

    #[test]
    fn payloads_round_trip() {
        let mut h = crate::key::KeyHasher::new();
        h.field(b"k");
        let https = h.finish().for_scheme(crate::target::ClientScheme::Https);
        let purges = [
            Purge::Key {
                route: "recommend".into(),
                key: h.finish(),
            },
            Purge::Key {
                route: "recommend".into(),
                key: https,
            },
            Purge::Route("recommend".into()),
            Purge::Tag("article-7".into()),
            Purge::All,
        ];
        for purge in purges {
            assert_eq!(
                Purge::parse(purge.payload().as_bytes()),
                Some(purge.clone())
            );
            let hard = PurgeOrder::delete(purge.clone());
            assert_eq!(
                hard.payload(),
                purge.payload(),
                "understood by older instances"
            );
            assert_eq!(PurgeOrder::parse(hard.payload().as_bytes()), Some(hard));
            if purge == Purge::All {
                continue;
            }
            let soft = PurgeOrder {
                purge,
                mode: Mode::MarkStale {
                    at: 1_700_000_000_123,
                },
            };
            assert!(soft.payload().starts_with("soft 1700000000123 "));
            assert_eq!(PurgeOrder::parse(soft.payload().as_bytes()), Some(soft));
        }
        assert_eq!(Purge::parse(b"tag "), None);
        assert_eq!(Purge::parse(b"key recommend nothex"), None);
        // An https key's message names its scheme, in a form an instance that reads 64 hex
        // digits alone refuses rather than take for the plain key.
        let payload = PurgeOrder::delete(Purge::Key {
            route: "recommend".into(),
            key: https,
        })
        .payload();
        let (_, text) = payload.rsplit_once(' ').expect("a key message");
        assert_eq!(text, format!("{}:https", https.digest_hex()));
        assert!(blake3::Hash::from_hex(text).is_err());
        for bad in [":http", ":HTTPS", "https", ":https:https", ":https "] {
            let message = format!("key recommend {}{bad}", https.digest_hex());
            assert_eq!(Purge::parse(message.as_bytes()), None, "{message}");
        }
        for bad in [
            "soft 12 all",
            "soft x tag t",
            "soft 12",
            "soft 12 tag ",
            "soft tag t",
        ] {
            assert_eq!(PurgeOrder::parse(bad.as_bytes()), None, "{bad}");
        }
    }

    #[test]
    fn soft_is_a_boolean_that_goes_with_any_target() {
        for (body, soft) in [
            (r#"{"tag": "t"}"#, false),
            (r#"{"tag": "t", "soft": true}"#, true),
            (r#"{"url": "/a", "soft": true}"#, true),
            (r#"{"route": "r", "soft": false}"#, false),
            (r#"{"prefix": "/p", "soft": null}"#, false),
        ] {
            let parsed = PurgeRequest::parse(body.as_bytes());
            assert_eq!(parsed.map(|r| r.soft).ok(), Some(soft), "{body}");
        }
        let soft = PurgeRequest::parse(br#"{"tag": "t", "soft": true}"#);
        assert_eq!(
            soft.map(|r| r.describe()).ok().as_deref(),
            Some("soft tag t")
        );
        for (body, kind) in [
            (r#"{"tag": "t", "soft": "yes"}"#, "string"),
            (r#"{"tag": "t", "soft": 1}"#, "number"),
            (r#"{"tag": "t", "soft": [true]}"#, "array"),
        ] {
            let err = PurgeRequest::parse(body.as_bytes())
                .map(|_| ())
                .unwrap_err();
            let want = format!("purge body: `soft` must be true or false, not a JSON {kind}");
            assert_eq!(err.to_string(), want, "{body}");
        }
        let alone = PurgeRequest::parse(br#"{"soft": true}"#)
            .map(|_| ())
            .unwrap_err();
        assert!(alone.to_string().contains("give exactly one of"), "{alone}");
    }
}
