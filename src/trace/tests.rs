//! Unit tests of [`crate::trace`]: header validation, carrying, the wire reference, attribution.

use super::*;

const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

#[test]
fn traceparent_validation_follows_the_w3c_format() {
    assert!(valid_traceparent(GOOD.as_bytes()));
    let bad = [
        "",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    ];
    for value in bad {
        assert!(!valid_traceparent(value.as_bytes()), "{value:?}");
    }
    // A later version may carry more fields.
    let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-beef";
    assert!(valid_traceparent(later.as_bytes()));
    let later_glued = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01beef";
    assert!(!valid_traceparent(later_glued.as_bytes()));
}

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) else {
            panic!("test header {name}: {value}");
        };
        map.append(name, value);
    }
    map
}

#[test]
fn a_valid_context_is_carried_and_an_invalid_one_is_not() {
    let from = headers(&[("traceparent", GOOD), ("tracestate", "congo=t61rcWkgMzE")]);
    let mut to = HeaderMap::new();
    carry(&from, &mut to);
    assert_eq!(to[&TRACEPARENT], GOOD);
    assert_eq!(to[&TRACESTATE], "congo=t61rcWkgMzE");

    let from = headers(&[("traceparent", "00-xyz"), ("tracestate", "congo=1")]);
    let mut to = headers(&[("traceparent", GOOD)]);
    carry(&from, &mut to);
    assert!(!to.contains_key(&TRACEPARENT));
    assert!(
        !to.contains_key(&TRACESTATE),
        "no tracestate without a parent"
    );

    let from = headers(&[("traceparent", GOOD), ("traceparent", GOOD)]);
    let mut to = HeaderMap::new();
    carry(&from, &mut to);
    assert!(!to.contains_key(&TRACEPARENT), "two parents: neither");
}

#[test]
fn pass_through_keeps_a_valid_context_and_drops_an_invalid_one() {
    let mut ok = headers(&[("traceparent", GOOD), ("tracestate", "a=1"), ("x", "y")]);
    sanitize(&mut ok);
    assert_eq!(ok[&TRACEPARENT], GOOD);
    assert_eq!(ok[&TRACESTATE], "a=1");
    let mut bad = headers(&[
        ("traceparent", "garbage"),
        ("tracestate", "a=1"),
        ("x", "y"),
    ]);
    sanitize(&mut bad);
    assert!(!bad.contains_key(&TRACEPARENT) && !bad.contains_key(&TRACESTATE));
    assert_eq!(bad["x"], "y");
    let long = "a=".to_owned() + &"b".repeat(MAX_TRACESTATE);
    let mut state = headers(&[("traceparent", GOOD), ("tracestate", &long)]);
    sanitize(&mut state);
    assert_eq!(state[&TRACEPARENT], GOOD);
    assert!(
        !state.contains_key(&TRACESTATE),
        "an oversized tracestate is dropped"
    );
}

#[test]
fn a_fill_reference_round_trips_and_foreign_bytes_are_left_alone() {
    let fill = FillRef {
        context: SpanContext::new(
            TraceId::from_bytes([7; 16]),
            SpanId::from_bytes([9; 8]),
            TraceFlags::SAMPLED,
            false,
            TraceState::NONE,
        ),
        remote: false,
    };
    let mut wire = fill.encode().to_vec();
    wire.extend_from_slice(b"entry");
    let (back, rest) = FillRef::split(&wire);
    let Some(back) = back else {
        panic!("the reference decodes");
    };
    assert!(back.remote);
    assert_eq!(back.context.trace_id(), fill.context.trace_id());
    assert_eq!(back.context.span_id(), fill.context.span_id());
    assert_eq!(back.context.trace_flags(), TraceFlags::SAMPLED);
    assert_eq!(rest, b"entry");
    // An entry (or anything else) without the marker is untouched.
    let entry = [0xC0u8; 40];
    assert_eq!(FillRef::split(&entry), (None, &entry[..]));
    assert_eq!(FillRef::split(b"short"), (None, &b"short"[..]));
}

#[test]
fn a_stored_notice_carries_the_reference_where_an_older_parser_finds_no_entry() {
    use crate::fleet::Notice;
    use std::sync::Arc;
    let fill = FillRef {
        context: SpanContext::new(
            TraceId::from_bytes([3; 16]),
            SpanId::from_bytes([4; 8]),
            TraceFlags::SAMPLED,
            true,
            TraceState::NONE,
        ),
        remote: true,
    };
    let entry = crate::entry::error_entry(http::StatusCode::OK, "x");
    let encoded = entry.encode();
    let stored = |parts: &[&[u8]]| {
        let mut payload = b"stored:".to_vec();
        for part in parts {
            payload.extend_from_slice(part);
        }
        payload
    };
    let reference = fill.encode();
    let traced = stored(&[&reference[..], &encoded[..]]);
    let with_entry = Some(Arc::new(entry.clone()));
    assert_eq!(
        Notice::parse(&traced),
        Some(Notice::Stored(with_entry.clone(), Some(fill.clone())))
    );
    assert_eq!(
        Notice::parse(&stored(&[&encoded[..]])),
        Some(Notice::Stored(with_entry, None))
    );
    assert_eq!(
        Notice::parse(&stored(&[&reference[..]])),
        Some(Notice::Stored(None, Some(fill.clone())))
    );
    assert_eq!(Notice::parse(b"stored"), Some(Notice::Stored(None, None)));
    // What a parser without the reference makes of it: not an entry, so it reads L2.
    let mut behind = fill.encode().to_vec();
    behind.extend_from_slice(&encoded);
    assert!(crate::entry::Entry::decode(bytes::Bytes::from(behind)).is_err());
    // The payload Corral publishes itself round-trips.
    let notice = Notice::Stored(None, Some(fill));
    assert_eq!(Notice::parse(&notice.payload()), Some(notice));
}

#[tokio::test]
async fn a_flight_reports_the_fill_noted_in_it() {
    let (out, by) = attributed(async { 1 }).await;
    assert_eq!((out, by), (1, None));
    let fill = FillRef {
        context: SpanContext::new(
            TraceId::from_bytes([1; 16]),
            SpanId::from_bytes([2; 8]),
            TraceFlags::SAMPLED,
            true,
            TraceState::NONE,
        ),
        remote: true,
    };
    let noted = fill.clone();
    let (_, by) = attributed(async move { attribute(noted) }).await;
    assert_eq!(by, Some(fill));
    // Outside a flight, noting is a no-op.
    attribute(FillRef {
        context: SpanContext::empty_context(),
        remote: false,
    });
}

#[test]
fn with_the_log_lines_alone_the_spans_are_not_built() {
    use tracing_subscriber::layer::SubscriberExt;
    let filter = tracing_subscriber::EnvFilter::new("trace")
        .add_directive(QUIET.parse().unwrap_or_else(|err| panic!("{QUIET}: {err}")));
    let lines = tracing_subscriber::fmt::layer().with_writer(std::io::sink);
    let subscriber = tracing_subscriber::registry().with(lines).with(filter);
    tracing::subscriber::with_default(subscriber, || {
        let headers = headers(&[("traceparent", GOOD)]);
        assert!(request_span(&http::Method::GET, &headers).is_disabled());
        assert!(wait_span(true).is_disabled());
        let key = crate::key::KeyHasher::new().finish();
        assert!(fill_span("r", &key).is_disabled());
        // Other targets still log at `trace`.
        assert!(tracing::enabled!(target: "corral::proxy", tracing::Level::TRACE));
    });
}
