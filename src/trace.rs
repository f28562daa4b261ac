//! W3C trace context (`traceparent`, `tracestate`) and the spans of the request path.
//!
//! # What travels upstream
//! A shared fill forwards only keyed inputs and the route's `forward_headers` (see
//! [`crate::upstream::fill_request`]), plus the leader's trace context: it names a trace, it
//! cannot change the answer, so the answer stays right for every waiter. A pass-through request
//! keeps its own. Either way a `traceparent` that is not well formed (W3C Trace Context §3.2) is
//! dropped, and its `tracestate` with it (§3.3: a `tracestate` means nothing without a valid
//! parent). With OpenTelemetry export on ([`crate::telemetry`]), the forwarded `traceparent`
//! names the fill's span (or the pass-through request's) as the parent of the upstream's work.
//!
//! # Spans
//! All of target [`TARGET`], so the log lines never show them and, with no exporter installed,
//! they are disabled at their call sites (one atomic load, no allocation):
//! - `request` — one per request: `route`, `outcome` (the `Cache-Status` word), `status`; its
//!   parent is the client's `traceparent` when it sent a valid one.
//! - `wait` — a request waiting for its key's flight (`role`: leader or follower).
//! - `fill` — the one upstream call that fills a key, and its store: `route`, `key` (the first
//!   12 hex digits), `upstream.status`.
//!
//! A request answered by a fill it did not run — a follower in this process, or any request of
//! an instance that waited for another instance's fill — carries a span link to that `fill`
//! span. In the process the link comes with the flight's result ([`attributed`]); across the
//! fleet, in the fill notice (see [`crate::fleet::Notice`] and [`FillRef::encode`]).

use std::cell::RefCell;
use std::future::Future;

use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::key::CacheKey;

/// The target of every span of the request path.
pub const TARGET: &str = "corral::trace";

/// The log-filter directive that keeps those spans out of the log lines (see [`TARGET`]).
pub const QUIET: &str = "corral::trace=off";

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// Longest `tracestate` forwarded (W3C Trace Context §3.3.1.1 asks for at least 512 bytes to be
/// propagated; a longer one is dropped rather than cut, which could break a member).
const MAX_TRACESTATE: usize = 512;

/// Whether `value` is a well-formed `traceparent`: `version-traceid-parentid-flags` in lowercase
/// hex, version not `ff`, neither id all zeros; version `00` is exactly 55 bytes, a later version
/// may carry more after a `-` (§3.2.4).
pub fn valid_traceparent(value: &[u8]) -> bool {
    if value.len() < 55 {
        return false;
    }
    let hex = |range: std::ops::Range<usize>| {
        value[range]
            .iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
    };
    let dashes = value[2] == b'-' && value[35] == b'-' && value[52] == b'-';
    let fields = hex(0..2) && hex(3..35) && hex(36..52) && hex(53..55);
    let zero = |range: std::ops::Range<usize>| value[range].iter().all(|b| *b == b'0');
    let version = &value[0..2];
    let length = match version {
        b"00" => value.len() == 55,
        _ => value.len() == 55 || value[55] == b'-',
    };
    dashes && fields && version != b"ff" && !zero(3..35) && !zero(36..52) && length
}

/// Whether a `tracestate` value may be forwarded: printable ASCII, at most [`MAX_TRACESTATE`].
fn valid_tracestate(value: &HeaderValue) -> bool {
    value.len() <= MAX_TRACESTATE && value.as_bytes().iter().all(|b| (0x20..0x7f).contains(b))
}

/// The requester's trace context, if its `traceparent` is well formed: the one `traceparent`
/// and the `tracestate` values worth forwarding.
fn context_of(headers: &HeaderMap) -> Option<(&HeaderValue, Vec<&HeaderValue>)> {
    let mut parents = headers.get_all(&TRACEPARENT).iter();
    let parent = parents.next()?;
    // Two `traceparent` fields: which one names the parent is anyone's guess (§3.2).
    if parents.next().is_some() || !valid_traceparent(parent.as_bytes()) {
        return None;
    }
    let states: Vec<&HeaderValue> = headers.get_all(&TRACESTATE).iter().collect();
    let total: usize = states.iter().map(|v| v.len()).sum();
    let states = if total <= MAX_TRACESTATE && states.iter().all(|v| valid_tracestate(v)) {
        states
    } else {
        Vec::new()
    };
    Some((parent, states))
}

/// Copies the requester's trace context (`from`) onto a fill's upstream request (`to`), when its
/// `traceparent` is well formed.
pub fn carry(from: &HeaderMap, to: &mut HeaderMap) {
    to.remove(&TRACEPARENT);
    to.remove(&TRACESTATE);
    if let Some((parent, states)) = context_of(from) {
        to.insert(TRACEPARENT, parent.clone());
        for state in states {
            to.append(TRACESTATE, state.clone());
        }
    }
}

/// Keeps a pass-through request's own trace context only if it is well formed.
pub fn sanitize(headers: &mut HeaderMap) {
    if !headers.contains_key(&TRACEPARENT) && !headers.contains_key(&TRACESTATE) {
        return;
    }
    let kept = context_of(headers).map(|(p, s)| {
        let states: Vec<HeaderValue> = s.into_iter().cloned().collect();
        (p.clone(), states)
    });
    headers.remove(&TRACEPARENT);
    headers.remove(&TRACESTATE);
    if let Some((parent, states)) = kept {
        headers.insert(TRACEPARENT, parent);
        for state in states {
            headers.append(TRACESTATE, state);
        }
    }
}

/// With export on, names `span` as the parent of the upstream's work: `traceparent` becomes the
/// span's trace and id (its `tracestate`, inherited from the requester's, goes along). Does
/// nothing when the span is not recorded.
pub fn inject(span: &Span, headers: &mut HeaderMap) {
    if span.is_disabled() {
        return;
    }
    let context = span.context();
    let span_context = context.span().span_context().clone();
    if !span_context.is_valid() {
        return;
    }
    let parent = format!(
        "00-{}-{}-{:02x}",
        span_context.trace_id(),
        span_context.span_id(),
        span_context.trace_flags().to_u8()
    );
    if let Ok(value) = HeaderValue::from_str(&parent) {
        headers.insert(TRACEPARENT, value);
    }
    let state = span_context.trace_state().header();
    headers.remove(&TRACESTATE);
    if !state.is_empty()
        && let Ok(value) = HeaderValue::from_str(&state)
    {
        headers.insert(TRACESTATE, value);
    }
}

/// Reads W3C headers for the propagator.
struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

/// The span of one request; a child of the client's trace when it sent a valid `traceparent`.
/// Disabled (and free) when no exporter is installed.
pub fn request_span(method: &http::Method, headers: &HeaderMap) -> Span {
    let span = tracing::info_span!(
        target: TARGET,
        "request",
        otel.kind = "server",
        http.method = %method,
        route = tracing::field::Empty,
        outcome = tracing::field::Empty,
        status = tracing::field::Empty,
    );
    if !span.is_disabled() && context_of(headers).is_some() {
        let parent = TraceContextPropagator::new().extract(&Headers(headers));
        let _ = span.set_parent(parent);
    }
    span
}

/// Records how a request ended on its span.
pub fn finish(span: &Span, route: &str, outcome: &str, status: u16) {
    if span.is_disabled() {
        return;
    }
    span.record("route", route);
    span.record("outcome", outcome);
    span.record("status", status);
}

/// The span of a request waiting for its key's flight.
pub fn wait_span(leader: bool) -> Span {
    let role = if leader { "leader" } else { "follower" };
    tracing::info_span!(target: TARGET, "wait", role)
}

/// The span of one fill (a child of the current span: the flight's leader's request). Also
/// recorded as the fill that answers the flight, when one is being [`attributed`].
pub fn fill_span(route: &str, key: &CacheKey) -> Span {
    let span = tracing::info_span!(
        target: TARGET,
        "fill",
        otel.kind = "client",
        route,
        key = tracing::field::Empty,
        upstream.status = tracing::field::Empty,
    );
    if span.is_disabled() {
        return span;
    }
    span.record("key", key.short());
    let context = span.context().span().span_context().clone();
    attribute(FillRef {
        context,
        remote: false,
    });
    span
}

/// The fill whose answer a flight shares: its span, and whether it ran on another instance.
#[derive(Debug, Clone, PartialEq)]
pub struct FillRef {
    pub context: SpanContext,
    pub remote: bool,
}

/// A fill's trace reference on the wire, in a fill notice: a marker byte that no entry starts
/// with, then the trace id (16 bytes), the span id (8) and the trace flags (1).
const WIRE_MARK: u8 = 0x54;
pub const WIRE_LEN: usize = 1 + 16 + 8 + 1;

impl FillRef {
    /// The fill's reference as a notice carries it (see [`WIRE_LEN`]).
    pub fn encode(&self) -> [u8; WIRE_LEN] {
        let mut out = [0u8; WIRE_LEN];
        out[0] = WIRE_MARK;
        out[1..17].copy_from_slice(&self.context.trace_id().to_bytes());
        out[17..25].copy_from_slice(&self.context.span_id().to_bytes());
        out[25] = self.context.trace_flags().to_u8();
        out
    }

    /// Splits a notice's trace reference off the front of `payload`: the reference (if one is
    /// there and valid) and the rest.
    pub fn split(payload: &[u8]) -> (Option<FillRef>, &[u8]) {
        let Some((head, rest)) = payload.split_first_chunk::<WIRE_LEN>() else {
            return (None, payload);
        };
        if head[0] != WIRE_MARK {
            return (None, payload);
        }
        let mut trace = [0u8; 16];
        trace.copy_from_slice(&head[1..17]);
        let mut span = [0u8; 8];
        span.copy_from_slice(&head[17..25]);
        let context = SpanContext::new(
            TraceId::from_bytes(trace),
            SpanId::from_bytes(span),
            TraceFlags::new(head[25]),
            true,
            TraceState::NONE,
        );
        let fill = context.is_valid().then_some(FillRef {
            context,
            remote: true,
        });
        (fill, rest)
    }
}

tokio::task_local! {
    /// The fill that answers the flight running in this task (see [`attributed`]).
    static ANSWERED_BY: RefCell<Option<FillRef>>;
}

/// Runs a flight, noting which fill answered it: one run here ([`fill_span`]) or one another
/// instance ran (its notice, [`attribute`]). Only recorded spans are noted.
pub async fn attributed<T>(flight: impl Future<Output = T>) -> (T, Option<FillRef>) {
    ANSWERED_BY
        .scope(RefCell::new(None), async {
            let out = flight.await;
            let by = ANSWERED_BY.with(|cell| cell.borrow_mut().take());
            (out, by)
        })
        .await
}

/// Notes `fill` as the fill that answers the current flight (a no-op outside one).
pub fn attribute(fill: FillRef) {
    let _ = ANSWERED_BY.try_with(|cell| *cell.borrow_mut() = Some(fill));
}

/// The reference of the fill the current flight runs, for its notice: `None` when no fill span
/// is recorded here.
pub fn current_fill() -> Option<FillRef> {
    ANSWERED_BY
        .try_with(|cell| cell.borrow().clone())
        .ok()
        .flatten()
        .filter(|f| !f.remote)
}

/// Links the current span (a request's) to the fill that answered it, unless that fill is its
/// own child (the leader's local fill).
pub fn link(fill: Option<&FillRef>, leader: bool) {
    let Some(fill) = fill else {
        return;
    };
    if leader && !fill.remote {
        return;
    }
    let span = Span::current();
    if !span.is_disabled() {
        span.add_link(fill.context.clone());
    }
}

#[cfg(test)]
mod tests;
