//! Corral answering conditional and range requests itself, from the answer it holds (RFC 9110
//! §13, §14): a shared fill never carries them (see [`crate::upstream::fill_request`]), so the
//! requester's `If-None-Match`, `If-Modified-Since`, `If-Match`, `If-Unmodified-Since`, `Range`
//! and `If-Range` are evaluated here against the entry's validators and body.
//!
//! Order (RFC 9110 §13.2.2): `If-Match`, else `If-Unmodified-Since` (412 when false); then
//! `If-None-Match` (weak comparison), else `If-Modified-Since` (304 when the representation did
//! not change, GET and HEAD only); then one `Range` on a 200 (206, or 416 when unsatisfiable),
//! unless `If-Range` no longer matches. Several ranges get the whole 200, which RFC 9110 §14.2
//! allows. A HEAD gets the GET answer's headers with no body.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};

use crate::answer::Answer;
use crate::body::ProxyBody;
use crate::verdict::http_date_ms;

mod range;
use range::{RangeAsk, byte_range, partial, unsatisfiable};

/// The request headers [`Conditions::of`] takes.
const ASKING: [header::HeaderName; 6] = [
    header::IF_MATCH,
    header::IF_UNMODIFIED_SINCE,
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
    header::RANGE,
    header::IF_RANGE,
];

/// The conditional and range fields of one request, kept while its answer is computed.
#[derive(Debug, Clone, Default)]
pub struct Conditions {
    head: bool,
    get: bool,
    if_match: Option<HeaderValue>,
    if_unmodified_since: Option<HeaderValue>,
    if_none_match: Option<HeaderValue>,
    if_modified_since: Option<HeaderValue>,
    range: Option<HeaderValue>,
    if_range: Option<HeaderValue>,
}

impl Conditions {
    /// Takes what a request asks of its answer.
    pub fn of(method: &Method, headers: &HeaderMap) -> Conditions {
        let head = method == Method::HEAD;
        let get = method == Method::GET || head;
        // Most requests carry none of these: one pass over their few names instead of six
        // lookups.
        if !headers.keys().any(|name| ASKING.contains(name)) {
            return Conditions {
                head,
                get,
                ..Conditions::default()
            };
        }
        let take = |name: header::HeaderName| headers.get(name).cloned();
        Conditions {
            head,
            get,
            if_match: take(header::IF_MATCH),
            if_unmodified_since: take(header::IF_UNMODIFIED_SINCE),
            if_none_match: take(header::IF_NONE_MATCH),
            if_modified_since: take(header::IF_MODIFIED_SINCE),
            range: take(header::RANGE),
            if_range: take(header::IF_RANGE),
        }
    }

    /// Applies the conditions to an answer Corral holds whole (a cached, shared or buffered
    /// one); a streamed answer is the upstream's and passes as it is (HEAD aside).
    pub fn apply(&self, answer: Answer) -> Answer {
        // The common request asks nothing of its answer: it passes untouched, without a look at
        // its validators (a date to parse) or a reference taken on its body.
        if self.asks_nothing() {
            return answer;
        }
        let Answer {
            outcome,
            mut response,
            ttl,
            fwd_status,
            corral_only,
        } = answer;
        let original = response.status();
        let body = match response.body_mut() {
            ProxyBody::Full(bytes) => Some(bytes.clone().unwrap_or_default()),
            _ => None,
        };
        if let Some(body) = body
            && response.status().is_success()
        {
            response = self.evaluate(response, body);
        }
        if self.head {
            let len = match response.body() {
                ProxyBody::Full(bytes) => bytes.as_ref().map_or(0, Bytes::len),
                _ => 0,
            };
            if matches!(response.body(), ProxyBody::Full(_))
                && !response.headers().contains_key(header::CONTENT_LENGTH)
                && response.status() != StatusCode::NOT_MODIFIED
            {
                response
                    .headers_mut()
                    .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
            }
            *response.body_mut() = ProxyBody::Full(None);
        }
        let changed = response.status() != original;
        Answer {
            outcome,
            response,
            ttl,
            fwd_status: fwd_status.or(changed.then_some(original)),
            // What it makes of the response only removes fields, or keeps a few validators.
            corral_only,
        }
    }

    /// Whether nothing here can change an answer: no condition, no range (`If-Range` alone is
    /// void), not a HEAD.
    fn asks_nothing(&self) -> bool {
        !self.head
            && self.if_match.is_none()
            && self.if_unmodified_since.is_none()
            && self.if_none_match.is_none()
            && self.if_modified_since.is_none()
            && self.range.is_none()
    }

    fn evaluate(&self, response: Response<ProxyBody>, body: Bytes) -> Response<ProxyBody> {
        let headers = response.headers();
        let etag = headers.get(header::ETAG).and_then(|v| v.to_str().ok());
        let modified = headers.get(header::LAST_MODIFIED).and_then(http_date_ms);
        if let Some(wanted) = &self.if_match {
            if !list_matches(wanted, etag, true) {
                return failed(response);
            }
        } else if let (Some(since), Some(modified)) = (
            self.if_unmodified_since.as_ref().and_then(http_date_ms),
            modified,
        ) && modified > since
        {
            return failed(response);
        }
        if let Some(wanted) = &self.if_none_match {
            if list_matches(wanted, etag, false) {
                return if self.get {
                    not_modified(response)
                } else {
                    failed(response)
                };
            }
        } else if self.get
            && let Some(since) = self.if_modified_since.as_ref().and_then(http_date_ms)
        {
            let changed = modified.or_else(|| headers.get(header::DATE).and_then(http_date_ms));
            if changed.is_some_and(|at| at <= since) {
                return not_modified(response);
            }
        }
        if self.get
            && response.status() == StatusCode::OK
            && let Some(range) = &self.range
            && self.if_range_holds(etag, modified)
        {
            return match byte_range(range, body.len() as u64) {
                RangeAsk::Whole => response,
                RangeAsk::Part(first, last) => partial(response, &body, first, last),
                RangeAsk::Unsatisfiable => unsatisfiable(response, body.len()),
            };
        }
        response
    }

    /// `If-Range`: a strong entity tag equal to the current one, or the exact `Last-Modified`.
    fn if_range_holds(&self, etag: Option<&str>, modified: Option<u64>) -> bool {
        let Some(value) = &self.if_range else {
            return true;
        };
        let Ok(text) = value.to_str() else {
            return false;
        };
        let text = text.trim();
        if text.starts_with('"') {
            return etag.is_some_and(|e| !e.starts_with("W/") && e == text);
        }
        if text.starts_with("W/") {
            return false;
        }
        httpdate::parse_http_date(text).ok().is_some_and(|at| {
            at.duration_since(std::time::UNIX_EPOCH)
                .ok()
                .and_then(|d| u64::try_from(d.as_millis()).ok())
                == modified
        })
    }
}

/// Whether an `If-Match`/`If-None-Match` list matches the current `ETag`: `*` matches any
/// representation; otherwise strong (both tags strong and equal) or weak comparison (opaque tags
/// equal) per RFC 9110 §8.8.3.2.
fn list_matches(wanted: &HeaderValue, etag: Option<&str>, strong: bool) -> bool {
    let Ok(list) = wanted.to_str() else {
        return false;
    };
    if list.trim() == "*" {
        return true;
    }
    let Some(current) = etag.map(str::trim) else {
        return false;
    };
    let opaque = |t: &str| t.strip_prefix("W/").unwrap_or(t).to_owned();
    list.split(',').map(str::trim).any(|tag| {
        if strong {
            !tag.starts_with("W/") && !current.starts_with("W/") && tag == current
        } else {
            opaque(tag) == opaque(current)
        }
    })
}

fn not_modified(mut response: Response<ProxyBody>) -> Response<ProxyBody> {
    *response.status_mut() = StatusCode::NOT_MODIFIED;
    *response.body_mut() = ProxyBody::Full(None);
    let headers = response.headers_mut();
    for name in [
        header::CONTENT_LENGTH,
        header::CONTENT_TYPE,
        header::CONTENT_ENCODING,
        header::CONTENT_LANGUAGE,
        header::CONTENT_RANGE,
    ] {
        headers.remove(name);
    }
    response
}

fn failed(response: Response<ProxyBody>) -> Response<ProxyBody> {
    let mut failed = Response::new(ProxyBody::Full(None));
    *failed.status_mut() = StatusCode::PRECONDITION_FAILED;
    for name in [header::ETAG, header::LAST_MODIFIED, header::AGE] {
        if let Some(value) = response.headers().get(&name) {
            failed.headers_mut().insert(name, value.clone());
        }
    }
    failed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::CacheOutcome;

    const BODY: &str = "0123456789";
    const MODIFIED: &str = "Mon, 02 Nov 2026 10:00:00 GMT";

    fn held() -> Answer {
        let mut resp = Response::new(ProxyBody::full(BODY));
        let h = resp.headers_mut();
        h.insert(header::ETAG, HeaderValue::from_static("\"v1\""));
        h.insert(header::LAST_MODIFIED, HeaderValue::from_static(MODIFIED));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        Answer::new(CacheOutcome::Hit, resp)
    }

    fn run(method: Method, fields: &[(&str, &str)]) -> (u16, Option<String>, String) {
        let mut headers = HeaderMap::new();
        for (name, value) in fields {
            if let (Ok(n), Ok(v)) = (
                header::HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(value),
            ) {
                headers.append(n, v);
            }
        }
        let answer = Conditions::of(&method, &headers).apply(held());
        let status = answer.response.status().as_u16();
        let range = answer
            .response
            .headers()
            .get(header::CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = match answer.response.body() {
            ProxyBody::Full(b) => String::from_utf8_lossy(b.as_deref().unwrap_or_default()).into(),
            _ => String::from("<stream>"),
        };
        (status, range, body)
    }

    #[test]
    fn conditions_table() {
        let later = "Tue, 03 Nov 2026 10:00:00 GMT";
        let earlier = "Sun, 01 Nov 2026 10:00:00 GMT";
        let get = Method::GET;
        type Case<'a> = (
            Method,
            Vec<(&'a str, &'a str)>,
            u16,
            Option<&'a str>,
            &'a str,
        );
        let cases: Vec<Case> = vec![
            (get.clone(), vec![], 200, None, BODY),
            (
                get.clone(),
                vec![("if-none-match", "\"v1\"")],
                304,
                None,
                "",
            ),
            (
                get.clone(),
                vec![("if-none-match", "W/\"v1\"")],
                304,
                None,
                "",
            ),
            (
                get.clone(),
                vec![("if-none-match", "\"x\", \"v1\"")],
                304,
                None,
                "",
            ),
            (get.clone(), vec![("if-none-match", "*")], 304, None, ""),
            (
                get.clone(),
                vec![("if-none-match", "\"v2\"")],
                200,
                None,
                BODY,
            ),
            (
                get.clone(),
                vec![("if-modified-since", MODIFIED)],
                304,
                None,
                "",
            ),
            (
                get.clone(),
                vec![("if-modified-since", later)],
                304,
                None,
                "",
            ),
            (
                get.clone(),
                vec![("if-modified-since", earlier)],
                200,
                None,
                BODY,
            ),
            (
                get.clone(),
                vec![("if-modified-since", "garbage")],
                200,
                None,
                BODY,
            ),
            // If-None-Match wins over If-Modified-Since.
            (
                get.clone(),
                vec![("if-none-match", "\"v2\""), ("if-modified-since", later)],
                200,
                None,
                BODY,
            ),
            (get.clone(), vec![("if-match", "\"v2\"")], 412, None, ""),
            (get.clone(), vec![("if-match", "W/\"v1\"")], 412, None, ""),
            (get.clone(), vec![("if-match", "\"v1\"")], 200, None, BODY),
            (
                get.clone(),
                vec![("if-unmodified-since", earlier)],
                412,
                None,
                "",
            ),
            (
                get.clone(),
                vec![("if-unmodified-since", later)],
                200,
                None,
                BODY,
            ),
            (
                get.clone(),
                vec![("range", "bytes=0-3")],
                206,
                Some("bytes 0-3/10"),
                "0123",
            ),
            (
                get.clone(),
                vec![("range", "bytes=8-")],
                206,
                Some("bytes 8-9/10"),
                "89",
            ),
            (
                get.clone(),
                vec![("range", "bytes=-3")],
                206,
                Some("bytes 7-9/10"),
                "789",
            ),
            (
                get.clone(),
                vec![("range", "bytes=5-99")],
                206,
                Some("bytes 5-9/10"),
                "56789",
            ),
            (
                get.clone(),
                vec![("range", "bytes=10-")],
                416,
                Some("bytes */10"),
                "",
            ),
            (
                get.clone(),
                vec![("range", "bytes=0-1,4-5")],
                200,
                None,
                BODY,
            ),
            (get.clone(), vec![("range", "items=0-1")], 200, None, BODY),
            (get.clone(), vec![("range", "bytes=3-1")], 200, None, BODY),
            (
                get.clone(),
                vec![("range", "bytes=0-1"), ("if-range", "\"v1\"")],
                206,
                Some("bytes 0-1/10"),
                "01",
            ),
            (
                get.clone(),
                vec![("range", "bytes=0-1"), ("if-range", "\"v0\"")],
                200,
                None,
                BODY,
            ),
            (
                get.clone(),
                vec![("range", "bytes=0-1"), ("if-range", MODIFIED)],
                206,
                Some("bytes 0-1/10"),
                "01",
            ),
            (
                get.clone(),
                vec![("range", "bytes=0-1"), ("if-range", later)],
                200,
                None,
                BODY,
            ),
            (Method::HEAD, vec![], 200, None, ""),
            (
                Method::HEAD,
                vec![("if-none-match", "\"v1\"")],
                304,
                None,
                "",
            ),
            (
                Method::POST,
                vec![("if-none-match", "\"v1\"")],
                412,
                None,
                "",
            ),
            (Method::POST, vec![("range", "bytes=0-1")], 200, None, BODY),
        ];
        for (method, fields, status, range, body) in cases {
            let got = run(method.clone(), &fields);
            assert_eq!(
                got,
                (status, range.map(str::to_owned), body.to_owned()),
                "{method} {fields:?}"
            );
        }
    }

    #[test]
    fn head_keeps_the_get_length() {
        let answer = Conditions::of(&Method::HEAD, &HeaderMap::new()).apply(held());
        assert_eq!(answer.response.headers()[header::CONTENT_LENGTH], "10");
        assert!(matches!(answer.response.body(), ProxyBody::Full(None)));
    }
}
