//! Pass-through: requests that go to an upstream uncached — bypassed (`cache = false`, a method
//! the route does not cache, credentials) and unrouted (`server.default_upstream`) alike — with
//! the limits of cached requests: the client's body within `body_read_timeout` (a malformed one is
//! the client's 400, not a 502), the route's upstream slot held until the answer has streamed, the
//! upstream metrics, and a body that can be replayed when a pooled connection fails under it.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use http::request::Parts;
use http::{Method, Request, Uri, header};
use http_body_util::Either;
use hyper::body::Incoming;

use super::Proxy;
use super::steps::read_body;
use crate::answer::{Answer, ProxyError};
use crate::body::{BodyFault, ClientBody, ProxyBody};
use crate::config::RouteConfig;
use crate::fill::FillError;
use crate::metrics::UNROUTED;
use crate::outcome::CacheOutcome;
use crate::upstream::endpoints::judged;
use crate::upstream::{UpstreamBody, rewrite};

impl Proxy {
    /// A request the cache must not answer, passed through. A small body of an idempotent request
    /// is read first, so that the request can be sent again if a pooled connection fails under it
    /// (see `UpstreamClient::send`); any other body is streamed within `body_read_timeout`.
    pub(super) async fn bypass(
        &self,
        route: &RouteConfig,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Answer {
        let (parts, body) = req.into_parts();
        let upstream = &route.upstream;
        let answer = if replayable_size(&parts, route.max_body) {
            let limit = self.body_read_timeout;
            let read = read_body(&parts.headers, body, route.max_body);
            let read = tokio::time::timeout(limit, read).await;
            let body = match read.unwrap_or(Err(ProxyError::BodyTimeout(limit))) {
                Ok(body) => Either::Left(http_body_util::Full::new(body)),
                Err(err) => return err.into_answer(CacheOutcome::Bypass),
            };
            self.forward(route, upstream, &parts, body, peer, None)
                .await
        } else {
            let (body, fault) = ClientBody::new(body, self.body_read_timeout);
            let body = Either::Right(body);
            self.forward(route, upstream, &parts, body, peer, Some(fault))
                .await
        };
        // An update that went through invalidates what it changed, fleet-wide (RFC 9111 §4.4).
        self.invalidate_after(&parts, &answer.response).await;
        answer
    }

    /// Passes a request through to a route's upstream, under its `upstream_concurrency` cap (the
    /// slot is held until the answer's body has streamed). `fault` is set when the request body
    /// is the client's, streamed: a failure of that body is the client's fault, not the upstream's.
    pub(super) async fn forward(
        &self,
        route: &RouteConfig,
        upstream: &Uri,
        parts: &Parts,
        body: UpstreamBody,
        peer: SocketAddr,
        fault: Option<Arc<OnceLock<BodyFault>>>,
    ) -> Answer {
        let outcome = CacheOutcome::Bypass;
        let slot = match self.caps.slot(route, &crate::budget::Weight::one()).await {
            Ok(slot) => slot,
            Err(err) => return ProxyError::from(FillError::from(err)).into_answer(outcome),
        };
        // A route with several endpoints: the one picked gets the call (once: a client's
        // request is not replayed elsewhere) and its result counts toward its health.
        let endpoints = self.caps.endpoints(route);
        let picked = endpoints.as_deref().and_then(|set| set.pick());
        let call = Call {
            metric: &route.name,
            upstream: picked.map_or(upstream, |(_, uri)| uri),
            limit: route.upstream_timeout,
            slot,
            fault,
        };
        let answer = self.pass(call, parts, body, peer, outcome).await;
        if let (Some(set), Some((index, _))) = (&endpoints, picked) {
            set.record(index, judged(Some(answer.response.status())));
        }
        answer
    }

    pub(super) async fn unrouted(&self, req: Request<Incoming>, peer: SocketAddr) -> Answer {
        let outcome = CacheOutcome::UriMiss;
        let Some((upstream, limit)) = &self.default_upstream else {
            return ProxyError::NoRoute.into_answer(outcome);
        };
        let (parts, body) = req.into_parts();
        let (body, fault) = ClientBody::new(body, self.body_read_timeout);
        let call = Call {
            metric: UNROUTED,
            upstream,
            limit: *limit,
            slot: crate::budget::Slot::default(),
            fault: Some(fault),
        };
        self.pass(call, &parts, Either::Right(body), peer, outcome)
            .await
    }

    /// One pass-through upstream call, counted in the upstream metrics under `call.metric`.
    async fn pass(
        &self,
        call: Call<'_>,
        parts: &Parts,
        body: UpstreamBody,
        peer: SocketAddr,
        outcome: CacheOutcome,
    ) -> Answer {
        let mut upstream_req = rewrite(parts, body, call.upstream, peer);
        crate::trace::sanitize(upstream_req.headers_mut());
        crate::trace::inject(&tracing::Span::current(), upstream_req.headers_mut());
        self.handles.client().mark(&mut upstream_req, call.metric);
        let started = Instant::now();
        let sent = self
            .handles
            .client()
            .send(upstream_req, call.upstream, call.limit)
            .await;
        if let Err(err @ crate::upstream::UpstreamError::Tls { .. }) = &sent {
            tracing::warn!(route = call.metric, %err, "upstream TLS failed");
        }
        let status = sent.as_ref().ok().map(|r| r.status().as_u16());
        self.handles
            .metrics()
            .upstream_call(call.metric, status, started.elapsed());
        match sent {
            Ok(resp) => Answer::new(
                outcome,
                resp.map(|b| ProxyBody::held(b, call.slot.into_guard())),
            ),
            // The client's body failed (malformed, too slow): its fault, whatever the upstream
            // client made of it.
            Err(err) => match call.fault.as_deref().and_then(OnceLock::get) {
                Some(BodyFault::Unreadable(why)) => ProxyError::BodyUnreadable(why.clone()),
                Some(BodyFault::Timeout(limit)) => ProxyError::BodyTimeout(*limit),
                None => ProxyError::from(err),
            }
            .into_answer(outcome),
        }
    }
}

/// Where a pass-through call goes and what bounds it.
struct Call<'a> {
    metric: &'a str,
    upstream: &'a Uri,
    /// The wait for the response head.
    limit: std::time::Duration,
    /// The route's upstream slot, held by the answer's body.
    slot: crate::budget::Slot,
    fault: Option<Arc<OnceLock<BodyFault>>>,
}

/// Whether a bypassed request is idempotent and declares a body of at most `max_body` bytes
/// (`Content-Length`; a chunked body is streamed, its size unknown).
fn replayable_size(parts: &Parts, max_body: u64) -> bool {
    let idempotent = [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::PUT,
        Method::DELETE,
    ];
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    idempotent.contains(&parts.method)
        && !parts.headers.contains_key(header::TRANSFER_ENCODING)
        && declared.is_some_and(|n| n > 0 && n <= max_body)
}
