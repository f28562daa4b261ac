//! The steps between a request's way in and its way out: a routed request keyed and answered
//! from L1 at once ([`Proxy::begin`]), or what it waits for ([`Proxy::resume`]).

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::Request;
use http::header;
use http::request::Parts;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use super::Proxy;
use crate::answer::{Answer, ProxyError};
use crate::conditional::Conditions;
use crate::config::RouteConfig;
use crate::fill::FillRequest;
use crate::key::CacheKey;
use crate::outcome::CacheOutcome;
use crate::route::{cache_method, check_cacheable};
use crate::target::ClientScheme;

impl Proxy {
    /// A routed request: passed through, or keyed and answered from L1 when its body is
    /// already whole (most cacheable requests have none: no timer for them).
    pub(super) fn routed(
        &self,
        route: &Arc<RouteConfig>,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Next {
        if let Err(why) = check_cacheable(route, req.method(), req.headers()) {
            tracing::debug!(route = %route.name, ?why, "bypassing the cache");
            return Next::Later(Work::Bypass(route.clone(), req));
        }
        let (parts, body) = req.into_parts();
        if !http_body::Body::is_end_stream(&body) {
            return Next::Later(Work::Body(route.clone(), parts, body));
        }
        match self.cacheable(route, parts, Bytes::new(), peer) {
            Ok(answer) => Next::Answer(answer),
            Err(lookup) => Next::Later(Work::Lookup(lookup)),
        }
    }

    pub(super) async fn work(&self, work: Work, peer: SocketAddr) -> Answer {
        match work {
            Work::Unrouted(req) => self.unrouted(req, peer).await,
            Work::Bypass(route, req) => self.bypass(&route, req, peer).await,
            Work::Body(route, parts, body) => {
                let limit = self.body_read_timeout;
                let read = read_body(&parts.headers, body, route.max_body);
                let read = tokio::time::timeout(limit, read).await;
                match read.unwrap_or(Err(ProxyError::BodyTimeout(limit))) {
                    Ok(body) => match self.cacheable(&route, parts, body, peer) {
                        Ok(answer) => answer,
                        Err(lookup) => self.looked_up(*lookup).await,
                    },
                    Err(err) => err.into_answer(CacheOutcome::Bypass),
                }
            }
            Work::Lookup(lookup) => self.looked_up(*lookup).await,
        }
    }

    /// Keys a cacheable request and answers it from a fresh L1 entry when there is one; else
    /// the lookup that answers it. Its conditionals, `Range` and HEAD are answered by Corral from
    /// what it holds (see [`Conditions`]). A HEAD is keyed, looked up and filled as a GET, so it
    /// shares GET's entries and flights.
    pub(super) fn cacheable(
        &self,
        route: &Arc<RouteConfig>,
        mut parts: Parts,
        body: Bytes,
        peer: SocketAddr,
    ) -> Result<Answer, Box<Lookup>> {
        let conditions = Conditions::of(&parts.method, &parts.headers);
        parts.method = cache_method(&parts.method).clone();
        let key = match CacheKey::derive(
            &route.name,
            &route.key,
            &parts.method,
            &parts.uri,
            &parts.headers,
            &body,
        ) {
            // The scheme the client spoke is told to the upstream: it is keyed.
            Ok(key) => key.for_scheme(ClientScheme::of(&parts)),
            Err(err) => return Ok(ProxyError::from(err).into_answer(CacheOutcome::Bypass)),
        };
        if let Some(hit) = self.fresh_hit(route, &key, &parts) {
            return Ok(conditions.apply(hit));
        }
        let req = FillRequest {
            route: route.clone(),
            key,
            parts,
            body,
            peer,
            validators: None,
            hold: None,
            weight: crate::budget::Weight::one(),
        };
        Err(Box::new(Lookup { req, conditions }))
    }

    pub(super) async fn looked_up(&self, Lookup { req, conditions }: Lookup) -> Answer {
        conditions.apply(self.lookup(req).await)
    }
}

/// What [`Proxy::begin`] found to do.
pub(super) enum Next {
    Answer(Answer),
    Later(Work),
}

/// What waits, and for what.
pub(super) enum Work {
    /// On the default upstream, or a 404.
    Unrouted(Request<Incoming>),
    /// On the route's upstream, uncached.
    Bypass(Arc<RouteConfig>, Request<Incoming>),
    /// On the request's body, to key it.
    Body(Arc<RouteConfig>, Parts, Incoming),
    /// On L2, a flight, the upstream.
    Lookup(Box<Lookup>),
}

/// A keyed request L1 could not answer, and the conditionals its answer is for.
pub(super) struct Lookup {
    req: FillRequest,
    conditions: Conditions,
}

/// Reads a request body of at most `limit` bytes; a declared length over the limit is refused
/// before anything is read.
pub(super) async fn read_body(
    headers: &http::HeaderMap,
    body: Incoming,
    limit: u64,
) -> Result<Bytes, ProxyError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ProxyError::BodyTooLarge { limit });
    }
    let cap = usize::try_from(limit).unwrap_or(usize::MAX);
    match Limited::new(body, cap).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) if err.is::<http_body_util::LengthLimitError>() => {
            Err(ProxyError::BodyTooLarge { limit })
        }
        Err(err) => Err(ProxyError::BodyUnreadable(err.to_string())),
    }
}
