//! `Cache-Control` (RFC 9111 §5.2): the directives a response gives a shared cache.
//!
//! The field is a comma-separated list of `token[=(token|quoted-string)]`; a quoted string may
//! hold commas, `=` and escaped quotes (`\"`), so the list is split by a small tokenizer rather
//! than on every comma. Unknown directives are ignored (§5.2.3); a malformed number makes its
//! directive absent, except `max-age`/`s-maxage`, where a malformed value means "stale at once"
//! (§4.2.1: a cache must not reuse on an invalid freshness value).

use http::{HeaderMap, HeaderName, header};

/// Directives for Corral alone (RFC 9213 targeted field): read first, and stripped from every
/// answer, so an upstream can tell Corral to keep an answer while clients see `no-store`.
pub const CORRAL_CACHE_CONTROL: HeaderName = HeaderName::from_static("corral-cache-control");

/// Directives for CDNs and reverse proxies (RFC 9213): read when there is no
/// `Corral-Cache-Control`, and passed on.
pub const CDN_CACHE_CONTROL: HeaderName = HeaderName::from_static("cdn-cache-control");

/// What the upstream's `Cache-Control` says about storing and reusing a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Directives {
    pub no_store: bool,
    pub private: bool,
    pub no_cache: bool,
    pub must_revalidate: bool,
    pub proxy_revalidate: bool,
    pub max_age: Option<u64>,
    pub s_maxage: Option<u64>,
    pub stale_while_revalidate: Option<u64>,
    pub stale_if_error: Option<u64>,
}

impl Directives {
    /// Reads every `Cache-Control` field line of `headers`.
    pub fn from_headers(headers: &HeaderMap) -> Directives {
        Directives::from_fields(
            headers
                .get_all(header::CACHE_CONTROL)
                .iter()
                .filter_map(|v| v.to_str().ok()),
        )
    }

    /// The directives that govern Corral's own caching (RFC 9213): `Corral-Cache-Control` if it
    /// holds any directive, else `CDN-Cache-Control`, else `Cache-Control`. `true` with them when
    /// they come from a targeted field, which then overrides `Cache-Control` and `Expires`.
    pub fn for_corral(headers: &HeaderMap) -> (Directives, bool) {
        for targeted in [CORRAL_CACHE_CONTROL, CDN_CACHE_CONTROL] {
            let fields: Vec<&str> = headers
                .get_all(&targeted)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            let joined = fields.join(", ");
            if !parse_list(&joined).is_empty() && targeted_valid(&joined) {
                return (Directives::from_fields(fields), true);
            }
        }
        (Directives::from_headers(headers), false)
    }

    /// Reads field values given as text (one per field line).
    pub fn from_fields<'a>(fields: impl IntoIterator<Item = &'a str>) -> Directives {
        let mut d = Directives::default();
        for field in fields {
            for (name, arg) in parse_list(field) {
                let secs = arg.as_deref().and_then(delta_seconds);
                match name.to_ascii_lowercase().as_str() {
                    "no-store" => d.no_store = true,
                    "private" => d.private = true,
                    "no-cache" => d.no_cache = true,
                    "must-revalidate" => d.must_revalidate = true,
                    "proxy-revalidate" => d.proxy_revalidate = true,
                    // An invalid value counts as 0: stale at once, never fresh by mistake.
                    "max-age" => d.max_age = Some(secs.unwrap_or(0)),
                    "s-maxage" => d.s_maxage = Some(secs.unwrap_or(0)),
                    "stale-while-revalidate" => d.stale_while_revalidate = secs,
                    "stale-if-error" => d.stale_if_error = secs,
                    _ => {}
                }
            }
        }
        d
    }

    /// Whether a shared cache may store the response at all. `no-cache` responses are not stored:
    /// Corral would have to revalidate them on every use.
    pub fn storable(&self) -> bool {
        !(self.no_store || self.private || self.no_cache)
    }

    /// Whether a stale copy may never be served (RFC 9111 §5.2.2.2, §5.2.2.8).
    pub fn forbids_stale(&self) -> bool {
        self.must_revalidate || self.proxy_revalidate
    }
}

/// Whether a targeted field (RFC 9213 §2.1) is valid: a Structured Fields dictionary (RFC 8941
/// §3.2) whose freshness members are integers. An invalid one is ignored as if absent.
fn targeted_valid(field: &str) -> bool {
    let mut rest = field.trim_matches([' ', '\t']);
    loop {
        let Some(after_key) = sf_key(rest) else {
            return false;
        };
        let key = &rest[..rest.len() - after_key.len()];
        rest = after_key;
        if let Some(value) = rest.strip_prefix('=') {
            let Some((item, after)) = sf_bare_item(value) else {
                return false;
            };
            let numeric = [
                "max-age",
                "s-maxage",
                "stale-while-revalidate",
                "stale-if-error",
            ];
            if numeric.contains(&key) && !matches!(item, Item::Integer) {
                return false;
            }
            rest = after;
        }
        // Parameters: `;key[=item]`.
        while let Some(after) = rest.strip_prefix(';') {
            let after = after.trim_start_matches(' ');
            let Some(after_key) = sf_key(after) else {
                return false;
            };
            rest = after_key;
            if let Some(value) = rest.strip_prefix('=') {
                let Some((_, after)) = sf_bare_item(value) else {
                    return false;
                };
                rest = after;
            }
        }
        rest = rest.trim_start_matches([' ', '\t']);
        if rest.is_empty() {
            return true;
        }
        let Some(after) = rest.strip_prefix(',') else {
            return false;
        };
        rest = after.trim_start_matches([' ', '\t']);
        if rest.is_empty() {
            return false;
        }
    }
}

/// An SF key at the start of `s`; returns what follows it.
fn sf_key(s: &str) -> Option<&str> {
    let mut chars = s.char_indices();
    let (_, first) = chars.next()?;
    if !(first.is_ascii_lowercase() || first == '*') {
        return None;
    }
    let end = chars
        .find(|(_, c)| !(c.is_ascii_lowercase() || c.is_ascii_digit() || "_-.*".contains(*c)))
        .map_or(s.len(), |(i, _)| i);
    Some(&s[end..])
}

/// The type of an SF bare item.
enum Item {
    Integer,
    Other,
}

/// An SF bare item at the start of `s`: its type and what follows it.
fn sf_bare_item(s: &str) -> Option<(Item, &str)> {
    let bytes = s.as_bytes();
    match *bytes.first()? {
        b'-' | b'0'..=b'9' => {
            let digits = s.trim_start_matches('-');
            let int_len = digits.bytes().take_while(u8::is_ascii_digit).count();
            let after_int = &digits[int_len..];
            if int_len == 0 {
                return None;
            }
            if let Some(frac) = after_int.strip_prefix('.') {
                let frac_len = frac.bytes().take_while(u8::is_ascii_digit).count();
                (int_len <= 12 && (1..=3).contains(&frac_len))
                    .then(|| (Item::Other, &frac[frac_len..]))
            } else {
                (int_len <= 15).then_some((Item::Integer, after_int))
            }
        }
        b'"' => {
            let mut escaped = false;
            for (i, c) in s.char_indices().skip(1) {
                match (escaped, c) {
                    (true, '"' | '\\') => escaped = false,
                    (true, _) => return None,
                    (false, '\\') => escaped = true,
                    (false, '"') => return Some((Item::Other, &s[i + 1..])),
                    (false, c) if !(' '..='~').contains(&c) => return None,
                    _ => {}
                }
            }
            None
        }
        b'?' => match bytes.get(1)? {
            b'0' | b'1' => Some((Item::Other, &s[2..])),
            _ => None,
        },
        b':' => {
            let end = s[1..].find(':')? + 1;
            let ok = s[1..end]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b));
            ok.then(|| (Item::Other, &s[end + 1..]))
        }
        b if b.is_ascii_alphabetic() || b == b'*' => {
            let end = s
                .char_indices()
                .find(|(_, c)| !(c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~:/".contains(*c)))
                .map_or(s.len(), |(i, _)| i);
            Some((Item::Other, &s[end..]))
        }
        _ => None,
    }
}

/// `delta-seconds` (RFC 9111 §1.2.2): digits only; too large saturates.
fn delta_seconds(arg: &str) -> Option<u64> {
    if arg.is_empty() || !arg.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(arg.parse::<u64>().unwrap_or(u64::MAX))
}

/// Splits a `Cache-Control` field value into directives: `(name, argument)` with quotes and
/// escapes removed from a quoted argument. Empty list elements are skipped.
pub fn parse_list(field: &str) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    let mut chars = field.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return out;
        }
        let mut name = String::new();
        while let Some(&c) = chars.peek() {
            if c == ',' || c == '=' {
                break;
            }
            name.push(c);
            chars.next();
        }
        let name = name.trim().to_owned();
        let mut arg = None;
        if chars.peek() == Some(&'=') {
            chars.next();
            while chars.peek().is_some_and(|c| *c == ' ' || *c == '\t') {
                chars.next();
            }
            let mut value = String::new();
            if chars.peek() == Some(&'"') {
                chars.next();
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => {
                            if let Some(escaped) = chars.next() {
                                value.push(escaped);
                            }
                        }
                        c => value.push(c),
                    }
                }
                // Anything between the closing quote and the next comma is malformed: skipped.
                while chars.peek().is_some_and(|c| *c != ',') {
                    chars.next();
                }
            } else {
                while let Some(&c) = chars.peek() {
                    if c == ',' {
                        break;
                    }
                    value.push(c);
                    chars.next();
                }
                value = value.trim().to_owned();
            }
            arg = Some(value);
        }
        if !name.is_empty() {
            out.push((name, arg));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directives_table() {
        let cases: [(&str, Directives); 8] = [
            (
                "Public, MAX-AGE=60 , s-maxage=\"30\"",
                Directives {
                    max_age: Some(60),
                    s_maxage: Some(30),
                    ..Default::default()
                },
            ),
            (
                // A comma and a directive name inside a quoted string are not directives.
                "foo=\"a, no-store, max-age=0\", max-age=5",
                Directives {
                    max_age: Some(5),
                    ..Default::default()
                },
            ),
            (
                "ext=\"quoted \\\" private\", max-age=7",
                Directives {
                    max_age: Some(7),
                    ..Default::default()
                },
            ),
            (
                "no-cache=\"set-cookie, x-a\"",
                Directives {
                    no_cache: true,
                    ..Default::default()
                },
            ),
            (
                "max-age=abc, stale-if-error=-1",
                Directives {
                    max_age: Some(0),
                    ..Default::default()
                },
            ),
            (
                "must-revalidate, max-age=99999999999999999999999",
                Directives {
                    must_revalidate: true,
                    max_age: Some(u64::MAX),
                    ..Default::default()
                },
            ),
            (
                "proxy-revalidate,,stale-while-revalidate=5",
                Directives {
                    proxy_revalidate: true,
                    stale_while_revalidate: Some(5),
                    ..Default::default()
                },
            ),
            ("", Directives::default()),
        ];
        for (field, want) in cases {
            assert_eq!(Directives::from_fields([field]), want, "{field:?}");
        }
    }

    #[test]
    fn targeted_fields_must_be_sf_dictionaries() {
        let cases = [
            ("max-age=60", true),
            ("max-age=60, no-store", true),
            ("max-age=60,stale-if-error=5;x=\"a,b\"", true),
            ("private, foo=\"bar\", baz=?1, q=0.5, t=abc, b=:aGk=:", true),
            ("max-age =100", false),
            ("max-age= 100", false),
            ("max-age=10000, &&&&&", false),
            ("max-age=\"10000\"", false),
            ("max-age=1.5", false),
            ("Max-Age=60", false),
            ("max-age=60,", false),
            ("max-age=9999999999999999", false),
        ];
        for (field, valid) in cases {
            assert_eq!(targeted_valid(field), valid, "{field:?}");
        }
    }

    #[test]
    fn targeted_fields_win_in_order() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CACHE_CONTROL,
            http::HeaderValue::from_static("no-store"),
        );
        assert_eq!(
            Directives::for_corral(&h),
            (
                Directives {
                    no_store: true,
                    ..Default::default()
                },
                false
            )
        );
        h.insert(
            CDN_CACHE_CONTROL,
            http::HeaderValue::from_static("max-age=30"),
        );
        let cdn = Directives {
            max_age: Some(30),
            ..Default::default()
        };
        assert_eq!(Directives::for_corral(&h), (cdn, true));
        h.insert(CORRAL_CACHE_CONTROL, http::HeaderValue::from_static(" "));
        assert_eq!(
            Directives::for_corral(&h),
            (cdn, true),
            "an empty field is not valid"
        );
        h.insert(
            CORRAL_CACHE_CONTROL,
            http::HeaderValue::from_static("max-age=60"),
        );
        let corral = Directives {
            max_age: Some(60),
            ..Default::default()
        };
        assert_eq!(Directives::for_corral(&h), (corral, true));
    }

    #[test]
    fn unterminated_quotes_do_not_panic_or_leak_directives() {
        let d = Directives::from_fields(["a=\"no-store, max-age=1"]);
        assert_eq!(d, Directives::default());
        assert!(d.storable());
    }
}
