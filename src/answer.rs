//! Answers: a response and the cache's part in it ([`CacheOutcome`]), built from an entry, a
//! personal answer or an error. Errors become statuses here and nowhere else.

use std::sync::atomic::{AtomicU64, Ordering};

use http::header::{self, HeaderName, HeaderValue};
use http::{Response, StatusCode};

use crate::body::ProxyBody;
use crate::entry::{ERROR_KIND, Entry, generic_body, now_ms};
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
    /// Whether the response may hold a field that never reaches a client (`Corral-Cache-Control`,
    /// `Surrogate-Key`, `Cache-Tag`), which the way out then removes: `true` unless the answer
    /// comes from an entry known to hold none ([`Entry::corral_only`]).
    pub corral_only: bool,
}

impl Answer {
    pub fn new(outcome: CacheOutcome, response: Response<ProxyBody>) -> Answer {
        Answer {
            outcome,
            response,
            ttl: None,
            fwd_status: None,
            corral_only: true,
        }
    }

    /// The `Cache-Status` value of this answer.
    pub fn cache_status(&self) -> HeaderValue {
        // Corral's own 5xx (or one a failed fill shared): no upstream answer stands behind it.
        // (Corral's 4xx refusals of a request never carried a `fwd-status`.)
        if self.response.status().is_server_error()
            && let Some(kind) = self.response.headers().get(ERROR_KIND)
        {
            return self
                .outcome
                .cache_status_unanswered(kind.to_str().unwrap_or(""));
        }
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
    #[error("{0} is not allowed here")]
    MethodNotAllowed(http::Method),
}

impl ProxyError {
    /// The failure's kind, for the `corral-error` header.
    pub fn kind(&self) -> &'static str {
        match self {
            ProxyError::BodyTooLarge { .. } => "body-too-large",
            ProxyError::BodyUnreadable(_) => "body-unreadable",
            ProxyError::BodyTimeout(_) => "body-timeout",
            ProxyError::BadKey(_) => "bad-key",
            ProxyError::NoRoute => "no-route",
            ProxyError::Upstream(err) => err.kind(),
            ProxyError::Fill(err) => err.kind(),
            ProxyError::FillPanicked => "fill-failed",
            ProxyError::Crowded(_) => "too-many-waiters",
            ProxyError::MethodNotAllowed(_) => "method-not-allowed",
            ProxyError::Target(_) => "bad-target",
        }
    }

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
            ProxyError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::Upstream(_) | ProxyError::FillPanicked => StatusCode::BAD_GATEWAY,
        }
    }

    /// The one place where errors become answers. A 5xx gets a generic body (its detail, such as
    /// the upstream's address, is logged, at most [`WARNINGS_PER_SECOND`] lines a second); a 4xx,
    /// the client's own fault, says what was wrong with the request. Both name the failure's kind
    /// in `corral-error`.
    pub fn into_answer(self, outcome: CacheOutcome) -> Answer {
        let status = self.status();
        let body = if status.is_server_error() {
            if let Some(suppressed) = WARNINGS.allow(now_ms() / 1000) {
                tracing::warn!(%status, err = %self, suppressed, "answering with an error");
            }
            generic_body(status)
        } else {
            tracing::debug!(%status, err = %self, "rejecting request");
            format!("{self}\n")
        };
        let mut resp = Response::new(ProxyBody::full(body));
        *resp.status_mut() = status;
        let headers = resp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        headers.insert(ERROR_KIND, HeaderValue::from_static(self.kind()));
        if status == StatusCode::METHOD_NOT_ALLOWED {
            // What Corral passes on; the upstream may accept fewer.
            let allow = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";
            headers.insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        Answer::new(outcome, resp)
    }
}

/// Most error warnings logged per second; the rest are counted and the count is logged with the
/// next one, so an upstream outage cannot flood the log.
pub const WARNINGS_PER_SECOND: u64 = 10;

static WARNINGS: LogBudget = LogBudget::new(WARNINGS_PER_SECOND);

/// A per-second budget of log lines, shared by every thread.
pub struct LogBudget {
    per_second: u64,
    /// The second the budget is for, and how many lines it has spent (the high and low 32 bits
    /// of one atomic, so both change together).
    window: AtomicU64,
    /// Lines refused since the last one logged.
    suppressed: AtomicU64,
}

impl LogBudget {
    pub const fn new(per_second: u64) -> LogBudget {
        LogBudget {
            per_second,
            window: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Whether a line may be logged in second `now_secs`: `Some(n)` with the number of lines
    /// refused since the last one allowed, or `None` when this second's budget is spent.
    pub fn allow(&self, now_secs: u64) -> Option<u64> {
        let second = now_secs & 0xFFFF_FFFF;
        let spent = self
            .window
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                let (at, used) = (w >> 32, w & 0xFFFF_FFFF);
                match (at == second, used < self.per_second) {
                    (false, _) => Some((second << 32) | 1),
                    (true, true) => Some(w + 1),
                    (true, false) => None,
                }
            });
        match spent {
            Ok(_) => Some(self.suppressed.swap(0, Ordering::AcqRel)),
            Err(_) => {
                self.suppressed.fetch_add(1, Ordering::AcqRel);
                None
            }
        }
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
    // A clone, not a map built header by header: measured (callgrind), rebuilding costs more
    // than the growth the added `Age` and `Cache-Status` cause.
    let headers = resp.headers_mut();
    headers.clone_from(&entry.headers);
    if outcome.is_hit() {
        headers.insert(header::AGE, age_value(entry.age_secs(now)));
    }
    let mut answer = Answer::new(outcome, resp);
    if outcome.is_hit() {
        answer.ttl = Some(entry.ttl_secs(now));
    }
    answer.corral_only = entry.corral_only;
    answer
}

/// An `Age` value: a static one from [`crate::numbers::AGE`] for the common ages, no
/// allocation.
fn age_value(secs: u64) -> HeaderValue {
    crate::numbers::AGE
        .value(secs)
        .unwrap_or_else(|| HeaderValue::from(secs))
}

/// An answer meant for one requester only.
pub fn private_answer(buffered: &Buffered) -> Answer {
    let mut resp = Response::new(ProxyBody::full(buffered.body.clone()));
    *resp.status_mut() = buffered.status;
    *resp.headers_mut() = buffered.headers.clone();
    Answer::new(CacheOutcome::MissNotStored, resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_budget_refuses_past_its_rate_and_counts_what_it_refused() {
        let budget = LogBudget::new(3);
        let allowed: Vec<_> = (0..10).map(|_| budget.allow(100)).collect();
        assert_eq!(allowed[..3], [Some(0), Some(0), Some(0)]);
        assert!(allowed[3..].iter().all(Option::is_none));
        // The next second opens a new budget, and its first line says how many were dropped.
        assert_eq!(budget.allow(101), Some(7));
        assert_eq!(budget.allow(101), Some(0));
    }

    #[test]
    fn an_age_reads_as_its_number_whether_from_the_table_or_formatted() {
        let tabulated = crate::numbers::TABULATED;
        let edges = [tabulated, tabulated + 1, 99_999, u64::MAX];
        for secs in (0..tabulated).chain(edges) {
            assert_eq!(age_value(secs), HeaderValue::from(secs), "{secs}");
        }
    }
}
