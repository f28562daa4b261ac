//! Answers: a response and the cache's part in it ([`CacheOutcome`]), built from an entry, a
//! personal answer or an error. Errors become statuses here and nowhere else.

use http::header::{self, HeaderName, HeaderValue};
use http::{Response, StatusCode};

use crate::body::ProxyBody;
use crate::entry::{Entry, now_ms};
use crate::fill::FillError;
use crate::flight::Crowded;
use crate::key::KeyError;
use crate::outcome::CacheOutcome;
use crate::target::TargetError;
use crate::upstream::{Buffered, UpstreamError};

/// A response and how the cache took part in it.
pub struct Answer {
    pub outcome: CacheOutcome,
    pub response: Response<ProxyBody>,
    /// Seconds of freshness left in the entry answered from (negative: stale), for
    /// `Cache-Status: …; ttl=N`.
    pub ttl: Option<i64>,
    /// The status the upstream gave, when Corral answered with another (a 304 or 206 it made
    /// itself); `None`: the response's own.
    pub fwd_status: Option<StatusCode>,
}

impl Answer {
    pub fn new(outcome: CacheOutcome, response: Response<ProxyBody>) -> Answer {
        Answer {
            outcome,
            response,
            ttl: None,
            fwd_status: None,
        }
    }

    /// The `Cache-Status` value of this answer.
    pub fn cache_status(&self) -> HeaderValue {
        let status = self.fwd_status.unwrap_or(self.response.status());
        self.outcome.cache_status(self.ttl, status)
    }
}

/// Why a request got an error answer.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("request body larger than {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error("request body could not be read: {0}")]
    BodyUnreadable(String),
    #[error("request body not received within {0:?}")]
    BodyTimeout(std::time::Duration),
    #[error("request cannot be keyed: {0}")]
    BadKey(#[from] KeyError),
    #[error("no route matches and no default upstream is configured")]
    NoRoute,
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error(transparent)]
    Fill(#[from] FillError),
    #[error("the fill for this key failed unexpectedly")]
    FillPanicked,
    #[error("too many requests wait for this key: {0}")]
    Crowded(#[from] Crowded),
    #[error("bad request target: {0}")]
    Target(#[from] TargetError),
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::BodyUnreadable(_) | ProxyError::BadKey(_) | ProxyError::Target(_) => {
                StatusCode::BAD_REQUEST
            }
            ProxyError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::Upstream(UpstreamError::Timeout { .. }) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Fill(err) => err.status(),
            ProxyError::Crowded(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Upstream(_) | ProxyError::FillPanicked => StatusCode::BAD_GATEWAY,
        }
    }

    /// The one place where errors become answers.
    pub fn into_answer(self, outcome: CacheOutcome) -> Answer {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(%status, err = %self, "answering with an error");
        } else {
            tracing::debug!(%status, err = %self, "rejecting request");
        }
        let mut resp = Response::new(ProxyBody::full(format!("{self}\n")));
        *resp.status_mut() = status;
        let headers = resp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        Answer::new(outcome, resp)
    }
}

pub const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// An answer from an entry.
pub fn answer(entry: &Entry, outcome: CacheOutcome) -> Answer {
    answer_at(entry, outcome, now_ms())
}

/// An answer from an entry, its `Age` taken at `now`.
pub fn answer_at(entry: &Entry, outcome: CacheOutcome, now: u64) -> Answer {
    let mut resp = Response::new(ProxyBody::full(entry.body.clone()));
    *resp.status_mut() = entry.status;
    let headers = resp.headers_mut();
    headers.clone_from(&entry.headers);
    if outcome.is_hit() {
        headers.insert(header::AGE, HeaderValue::from(entry.age_secs(now)));
    }
    let mut answer = Answer::new(outcome, resp);
    if outcome.is_hit() {
        answer.ttl = Some(entry.ttl_secs(now));
    }
    answer
}

/// An answer meant for one requester only.
pub fn private_answer(buffered: &Buffered) -> Answer {
    let mut resp = Response::new(ProxyBody::full(buffered.body.clone()));
    *resp.status_mut() = buffered.status;
    *resp.headers_mut() = buffered.headers.clone();
    Answer::new(CacheOutcome::MissNotStored, resp)
}
