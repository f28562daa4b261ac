//! The request target, made one for everyone who reads it: routing, the cache key and the
//! upstream request all see the same normalized path (RFC 3986 §6.2.2: percent-encoded unreserved
//! characters decoded, other percent-encodings upper-cased, dot segments removed), so
//! `/r/../secret/x` can never match route `r` and reach the upstream as `/secret/x`.
//!
//! Targets an upstream could read differently from Corral are refused with 400: a dot segment
//! hidden behind an encoded separator (`..%2f`, `%2e%2e%5c`), a NUL. So are HTTP/1.1 requests
//! without exactly one `Host` (RFC 9112 §3.2). An absolute-form target's authority wins over
//! `Host` (RFC 9112 §3.2.2): it replaces it.

use http::header::{self, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use http::{Request, Version};

/// The scheme a client spoke to Corral in: what `X-Forwarded-Proto` and `Forwarded: proto=` tell
/// the upstream, and so part of the cache key ([`crate::key::CacheKey::for_scheme`]). It is the
/// listener's kind, fixed at start; the listener puts it in each request's extensions, and a
/// request without one (built in-process) is taken as plain `http`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ClientScheme {
    #[default]
    Http,
    Https,
}

impl ClientScheme {
    /// The scheme `parts` arrived over.
    pub fn of(parts: &http::request::Parts) -> ClientScheme {
        parts.extensions.get().copied().unwrap_or_default()
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ClientScheme::Http => "http",
            ClientScheme::Https => "https",
        }
    }
}

/// Why a request target was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("an HTTP/1.1 request must carry exactly one Host header (it carries {0})")]
    Host(usize),
    #[error("the request path hides a dot segment behind an encoded separator")]
    HiddenDotSegment,
    #[error("the request path is not a valid path")]
    BadPath,
}

/// Checks the request's `Host` and replaces its target with the normalized one.
pub fn normalize<B>(req: &mut Request<B>) -> Result<(), TargetError> {
    if req.version() == Version::HTTP_11 {
        // A pass over the request's few fields costs less than hashing the name to look it up.
        let hosts = req
            .headers()
            .iter()
            .filter(|(name, _)| *name == header::HOST)
            .count();
        if hosts != 1 {
            return Err(TargetError::Host(hosts));
        }
    }
    if let Some(authority) = req.uri().authority()
        && let Ok(host) = HeaderValue::from_str(authority.as_str())
        && req.version() <= Version::HTTP_11
    {
        req.headers_mut().insert(header::HOST, host);
    }
    let raw = req.uri().path();
    // Most paths are already normal: no percent-encoding, no dot segment, no backslash. One
    // pass over the bytes (a substring search sets up a searcher first, ~0.4k instructions).
    let bytes = raw.as_bytes();
    let plain = bytes
        .iter()
        .enumerate()
        .all(|(i, &b)| b != b'%' && b != b'\\' && !(b == b'.' && i > 0 && bytes[i - 1] == b'/'));
    if plain {
        return Ok(());
    }
    let path = normalize_path(raw)?;
    if path != req.uri().path() {
        let joined = match req.uri().query() {
            Some(q) => format!("{path}?{q}"),
            None => path,
        };
        let pq = PathAndQuery::try_from(joined).map_err(|_| TargetError::BadPath)?;
        let mut parts = req.uri().clone().into_parts();
        parts.path_and_query = Some(pq);
        *req.uri_mut() = Uri::from_parts(parts).map_err(|_| TargetError::BadPath)?;
    }
    Ok(())
}

/// The normalized form of an origin-form path (see the module docs).
pub fn normalize_path(path: &str) -> Result<String, TargetError> {
    let decoded = decode_unreserved(path)?;
    for segment in decoded.split('/') {
        if hides_dot_segment(segment) {
            return Err(TargetError::HiddenDotSegment);
        }
    }
    Ok(remove_dot_segments(&decoded))
}

/// Decodes `%XX` of unreserved characters and upper-cases the others' hex digits.
fn decode_unreserved(path: &str) -> Result<String, TargetError> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b != b'%' {
            out.push(char::from(b));
            i += 1;
            continue;
        }
        let hex = bytes.get(i + 1..i + 3).ok_or(TargetError::BadPath)?;
        let text = std::str::from_utf8(hex).map_err(|_| TargetError::BadPath)?;
        let value = u8::from_str_radix(text, 16).map_err(|_| TargetError::BadPath)?;
        if value == 0 {
            return Err(TargetError::BadPath);
        }
        if value.is_ascii_alphanumeric() || matches!(value, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(value));
        } else {
            out.push('%');
            out.push_str(&text.to_ascii_uppercase());
        }
        i += 3;
    }
    Ok(out)
}

/// Whether a segment (already free of encoded unreserved characters) turns into a dot segment
/// once an encoded `/` or `\`, or a literal `\`, is read as a separator.
fn hides_dot_segment(segment: &str) -> bool {
    let upper = segment.to_ascii_uppercase();
    if !(upper.contains("%2F") || upper.contains("%5C") || upper.contains('\\')) {
        return false;
    }
    upper
        .replace("%2F", "/")
        .replace("%5C", "/")
        .replace('\\', "/")
        .split('/')
        .any(|part| part == "." || part == "..")
}

/// RFC 3986 §5.2.4, on an absolute path.
fn remove_dot_segments(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    for (i, segment) in segments.iter().enumerate() {
        match *segment {
            "." => {
                if i == last {
                    out.push("");
                }
            }
            ".." => {
                out.pop();
                if i == last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    format!("/{}", out.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_table() {
        let cases: [(&str, Result<&str, TargetError>); 16] = [
            ("/", Ok("/")),
            ("/a/b", Ok("/a/b")),
            ("/r/../secret/x", Ok("/secret/x")),
            ("/r/./x", Ok("/r/x")),
            ("/r/%2e%2e/secret/x", Ok("/secret/x")),
            ("/r/%2E%2e/secret", Ok("/secret")),
            ("/r/.%2e/x", Ok("/x")),
            ("/../../x", Ok("/x")),
            ("/a/b/..", Ok("/a/")),
            ("/a/b/.", Ok("/a/b/")),
            ("/%7euser/%41", Ok("/~user/A")),
            ("/a%2fb", Ok("/a%2Fb")),
            ("/r/..%2fsecret/x", Err(TargetError::HiddenDotSegment)),
            ("/r/%2e%2e%5csecret", Err(TargetError::HiddenDotSegment)),
            ("/r/%00", Err(TargetError::BadPath)),
            ("/r/%zz", Err(TargetError::BadPath)),
        ];
        for (path, want) in cases {
            assert_eq!(normalize_path(path).as_deref(), want.as_deref(), "{path}");
        }
    }

    fn req(version: Version, uri: &str, hosts: &[&str]) -> Request<()> {
        let mut builder = Request::builder().version(version).uri(uri);
        for h in hosts {
            builder = builder.header("host", *h);
        }
        match builder.body(()) {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn host_rules() {
        let v11 = Version::HTTP_11;
        assert_eq!(
            normalize(&mut req(v11, "/x", &[])),
            Err(TargetError::Host(0))
        );
        assert_eq!(
            normalize(&mut req(v11, "/x", &["a", "b"])),
            Err(TargetError::Host(2))
        );
        assert_eq!(normalize(&mut req(v11, "/x", &["a"])), Ok(()));
        assert_eq!(normalize(&mut req(Version::HTTP_10, "/x", &[])), Ok(()));
        let mut absolute = req(v11, "http://real.example/r/../x?q=1", &["other"]);
        assert_eq!(normalize(&mut absolute), Ok(()));
        assert_eq!(absolute.headers()["host"], "real.example");
        assert_eq!(absolute.uri().path(), "/x");
        assert_eq!(absolute.uri().query(), Some("q=1"));
    }
}
