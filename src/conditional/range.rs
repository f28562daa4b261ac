//! One byte range (RFC 9110 §14) cut from the body Corral holds: the `Range` value read, and
//! the 206 or 416 it answers.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

use crate::body::ProxyBody;

/// A `Range` value read as one byte range over `len` bytes.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum RangeAsk {
    /// Not one satisfiable-or-not byte range Corral serves (other unit, several ranges,
    /// malformed): the whole representation.
    Whole,
    /// Bytes `first..=last`.
    Part(u64, u64),
    Unsatisfiable,
}

pub(super) fn byte_range(value: &HeaderValue, len: u64) -> RangeAsk {
    let Some(spec) = value
        .to_str()
        .ok()
        .and_then(|v| v.trim().strip_prefix("bytes="))
    else {
        return RangeAsk::Whole;
    };
    if spec.contains(',') {
        return RangeAsk::Whole;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return RangeAsk::Whole;
    };
    let number = |s: &str| {
        let s = s.trim();
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse::<u64>().unwrap_or(u64::MAX))
    };
    match (number(first), number(last), first.trim().is_empty()) {
        // `-N`: the last N bytes.
        (None, Some(n), true) => match (n, len) {
            (0, _) | (_, 0) => RangeAsk::Unsatisfiable,
            (n, len) => RangeAsk::Part(len.saturating_sub(n), len - 1),
        },
        (Some(first), None, false) if last.trim().is_empty() => {
            if first < len {
                RangeAsk::Part(first, len - 1)
            } else {
                RangeAsk::Unsatisfiable
            }
        }
        (Some(first), Some(last), false) if first <= last => {
            if first < len {
                RangeAsk::Part(first, last.min(len - 1))
            } else {
                RangeAsk::Unsatisfiable
            }
        }
        _ => RangeAsk::Whole,
    }
}

pub(super) fn partial(
    mut response: Response<ProxyBody>,
    body: &Bytes,
    first: u64,
    last: u64,
) -> Response<ProxyBody> {
    let (Ok(start), Ok(end)) = (usize::try_from(first), usize::try_from(last)) else {
        return response;
    };
    let Some(part) = body.get(start..=end).map(|_| body.slice(start..=end)) else {
        return response;
    };
    *response.status_mut() = StatusCode::PARTIAL_CONTENT;
    let headers = response.headers_mut();
    headers.remove(header::CONTENT_LENGTH);
    if let Ok(range) = HeaderValue::from_str(&format!("bytes {first}-{last}/{}", body.len())) {
        headers.insert(header::CONTENT_RANGE, range);
    }
    *response.body_mut() = ProxyBody::full(part);
    response
}

pub(super) fn unsatisfiable(response: Response<ProxyBody>, len: usize) -> Response<ProxyBody> {
    let mut refused = Response::new(ProxyBody::Full(None));
    *refused.status_mut() = StatusCode::RANGE_NOT_SATISFIABLE;
    if let Ok(range) = HeaderValue::from_str(&format!("bytes */{len}")) {
        refused.headers_mut().insert(header::CONTENT_RANGE, range);
    }
    for name in [header::ETAG, header::LAST_MODIFIED] {
        if let Some(value) = response.headers().get(&name) {
            refused.headers_mut().insert(name, value.clone());
        }
    }
    refused
}
