//! Trace context and span export, end to end: `corral run` processes export OTLP/HTTP to a
//! collector in this test process, which decodes every batch. A coalesced burst must give one
//! `fill` span that every waiter's `request` span links to — in the leader's process and on
//! another instance (the link travels in the fill notice) — and the upstream must see the
//! leader's trace, with the fill's span as its parent. Spans are flushed by a graceful shutdown
//! (SIGTERM), so the test reads them once the processes have exited.

mod support;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use support::corral::{config_text, recommend_route};
use support::streaming::StreamingUpstream;
use support::{Client, CorralProcess, RedisServer, Resp, Upstream, eventually};

/// How long a process gets to flush its spans and exit after SIGTERM.
const EXIT: Duration = Duration::from_secs(20);

/// A span as the collector received it, with the `service.name` that sent it.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    span: Span,
}

/// An OTLP/HTTP collector on `127.0.0.1:<ephemeral>`: decodes every `POST /v1/traces` and keeps
/// its spans. Anything else, or a body that does not decode, is a 400 (and fails the test, as
/// nothing arrives).
struct Collector {
    addr: std::net::SocketAddr,
    spans: Arc<Mutex<Vec<Received>>>,
    server: JoinHandle<()>,
}

impl Collector {
    async fn start() -> Collector {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let spans = Arc::new(Mutex::new(Vec::new()));
        let kept = spans.clone();
        let server = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let kept = kept.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| receive(req, kept.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Collector {
            addr,
            spans,
            server,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn spans(&self) -> Vec<Received> {
        self.spans.lock().expect("collector lock").clone()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn receive(
    req: Request<Incoming>,
    kept: Arc<Mutex<Vec<Received>>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let bad = |why: &str| {
        let mut resp = Response::new(Full::new(Bytes::from(why.to_owned())));
        *resp.status_mut() = http::StatusCode::BAD_REQUEST;
        Ok(resp)
    };
    if req.method() != http::Method::POST || req.uri().path() != "/v1/traces" {
        return bad("not an OTLP traces export");
    }
    let Ok(body) = req.into_body().collect().await else {
        return bad("unreadable body");
    };
    let Ok(export) = ExportTraceServiceRequest::decode(body.to_bytes()) else {
        return bad("not an ExportTraceServiceRequest");
    };
    let mut spans = kept.lock().expect("collector lock");
    for resource in export.resource_spans {
        let attributes = resource.resource.map(|r| r.attributes).unwrap_or_default();
        let service = text(&attributes, "service.name").unwrap_or_default();
        for scope in resource.scope_spans {
            for span in scope.spans {
                spans.push(Received {
                    service: service.clone(),
                    span,
                });
            }
        }
    }
    let mut resp = Response::new(Full::new(Bytes::new()));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/x-protobuf"),
    );
    Ok(resp)
}

/// An attribute's value as text (strings as they are, numbers in decimal).
fn text(attributes: &[KeyValue], key: &str) -> Option<String> {
    let value = attributes.iter().find(|kv| kv.key == key)?.value.as_ref()?;
    match value.value.as_ref()? {
        Value::StringValue(s) => Some(s.clone()),
        Value::IntValue(n) => Some(n.to_string()),
        Value::BoolValue(b) => Some(b.to_string()),
        other => Some(format!("{other:?}")),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A `traceparent` for trace `n` (32 hex digits) and a client span.
fn traceparent(trace: &str) -> String {
    format!("00-{trace}-00f067aa0ba902b7-01")
}

fn trace_id(n: u32) -> String {
    format!("{n:032x}")
}

/// The one span named `name` in trace `trace` from `service`.
fn one<'a>(spans: &'a [Received], service: &str, name: &str, trace: &str) -> &'a Span {
    let found: Vec<&Received> = spans
        .iter()
        .filter(|r| r.service == service && r.span.name == name && hex(&r.span.trace_id) == trace)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one {name:?} span of {service} in trace {trace}; got {found:#?}"
    );
    &found[0].span
}

/// Whether `span` links to `target`.
fn links_to(span: &Span, target: &Span) -> bool {
    span.links
        .iter()
        .any(|l| l.trace_id == target.trace_id && l.span_id == target.span_id)
}

fn telemetry(collector: &Collector, service: &str) -> String {
    format!(
        "\n[telemetry]\notlp_endpoint = \"{}\"\nservice_name = \"{service}\"\n",
        collector.url()
    )
}

fn get_traced(client: &Client, url: String, trace: &str) -> JoinHandle<Resp> {
    let client = client.clone();
    let parent = traceparent(trace);
    tokio::spawn(async move {
        let headers = [("traceparent", parent.as_str()), ("tracestate", "vendor=1")];
        client.get(&url, &headers).await
    })
}

async fn shut_down(process: &mut CorralProcess) {
    process.terminate();
    let status = process.wait_exit(EXIT).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "corral exits cleanly on SIGTERM: {status:?}\n{}",
        process.logs().join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_coalesced_burst_exports_one_fill_that_every_waiter_links_to() {
    let collector = Collector::start().await;
    let redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    upstream.set_delay(Duration::from_secs(2));
    let toml = config_text(
        "",
        Some(&redis.url()),
        &recommend_route(&upstream.url(), ""),
    ) + &telemetry(&collector, "corral-a");
    let mut corral = CorralProcess::start(&toml).await;
    let client = Client::new();
    let path = "/recommend?segment=traced";
    let leader_trace = trace_id(1);

    // Step 1: the leader's request reaches the upstream; then five followers join its flight.
    let leader = get_traced(&client, corral.url(path), &leader_trace);
    upstream.wait_in_flight(1).await;
    let follower_traces: Vec<String> = (10..15).map(trace_id).collect();
    let followers: Vec<_> = follower_traces
        .iter()
        .map(|t| get_traced(&client, corral.url(path), t))
        .collect();
    let leader = leader.await.expect("leader task");
    assert_eq!(leader.status, 200);
    for follower in followers {
        let answer = follower.await.expect("follower task");
        assert_eq!(answer.status, 200);
        let status = answer.cache_status().unwrap_or_default();
        assert!(status.ends_with("collapsed"), "a follower: {status}");
    }
    assert_eq!(upstream.calls_for(path), 1, "one fill for the burst");

    // Step 2: pass-through requests keep a valid trace context and lose an invalid one.
    upstream.set_delay(Duration::ZERO);
    let auth = ("authorization", "Bearer x");
    let valid = traceparent(&trace_id(20));
    let passed = client
        .get(
            &corral.url("/recommend?pass=valid"),
            &[auth, ("traceparent", &valid)],
        )
        .await;
    assert_eq!(passed.cache_status().as_deref(), Some("corral; fwd=bypass"));
    let invalid = [auth, ("traceparent", "00-nothex"), ("tracestate", "a=1")];
    client
        .get(&corral.url("/recommend?pass=invalid"), &invalid)
        .await;

    // Step 3: a graceful shutdown flushes the spans.
    shut_down(&mut corral).await;
    let spans = collector.spans();
    let fill = one(&spans, "corral-a", "fill", &leader_trace);
    let request = one(&spans, "corral-a", "request", &leader_trace);
    assert_eq!(hex(&request.parent_span_id), "00f067aa0ba902b7");
    assert_eq!(
        fill.parent_span_id, request.span_id,
        "the fill is the leader's"
    );
    assert_eq!(
        text(&fill.attributes, "route").as_deref(),
        Some("recommend")
    );
    assert_eq!(
        text(&fill.attributes, "upstream.status").as_deref(),
        Some("200")
    );
    assert_eq!(text(&fill.attributes, "key").map(|k| k.len()), Some(12));
    assert_eq!(
        text(&request.attributes, "outcome").as_deref(),
        Some("miss_stored")
    );
    assert!(request.links.is_empty(), "the leader links to nothing");

    // The upstream saw the leader's trace, the fill's span as its parent, and the tracestate.
    let sent = upstream.last_headers(path).expect("the fill's headers");
    let expected = format!("00-{leader_trace}-{}-01", hex(&fill.span_id));
    assert_eq!(sent["traceparent"], expected.as_str());
    assert_eq!(sent["tracestate"], "vendor=1");

    for trace in &follower_traces {
        let request = one(&spans, "corral-a", "request", trace);
        assert_eq!(
            text(&request.attributes, "outcome").as_deref(),
            Some("collapsed")
        );
        assert!(
            links_to(request, fill),
            "follower {trace} links to the fill"
        );
        let wait = one(&spans, "corral-a", "wait", trace);
        assert_eq!(wait.parent_span_id, request.span_id);
        assert_eq!(text(&wait.attributes, "role").as_deref(), Some("follower"));
    }

    let sent = upstream
        .last_headers("/recommend?pass=valid")
        .expect("passed");
    let passed_span = one(&spans, "corral-a", "request", &trace_id(20));
    let expected = format!("00-{}-{}-01", trace_id(20), hex(&passed_span.span_id));
    assert_eq!(sent["traceparent"], expected.as_str());
    // An invalid traceparent is dropped with its tracestate; the request starts a trace of its
    // own, which the upstream joins.
    let sent = upstream
        .last_headers("/recommend?pass=invalid")
        .expect("passed");
    assert!(
        !sent.contains_key("tracestate"),
        "no tracestate without its parent"
    );
    let own = sent["traceparent"].to_str().expect("ASCII").to_owned();
    let own_trace = own.split('-').nth(1).expect("a trace id").to_owned();
    let passed_span = one(&spans, "corral-a", "request", &own_trace);
    assert_eq!(
        own,
        format!("00-{own_trace}-{}-01", hex(&passed_span.span_id))
    );
    assert!(passed_span.parent_span_id.is_empty(), "a root span");
}

#[tokio::test]
async fn without_telemetry_the_trace_context_is_forwarded_as_sent_and_an_invalid_one_dropped() {
    let upstream = Upstream::start().await;
    let cfg = support::corral::config(None, &recommend_route(&upstream.url(), ""));
    let fleet = support::corral::start(1, &cfg).await;
    let client = Client::new();
    let parent = traceparent(&trace_id(7));
    let traced = [("traceparent", parent.as_str()), ("tracestate", "vendor=1")];

    // A fill (keyed on the query only) carries the leader's context unchanged.
    let fill = client
        .get(
            &support::corral::url(&fleet[0], "/recommend?fill=1"),
            &traced,
        )
        .await;
    assert_eq!(fill.status, 200);
    let sent = upstream.last_headers("/recommend?fill=1").expect("filled");
    assert_eq!(sent["traceparent"], parent.as_str());
    assert_eq!(sent["tracestate"], "vendor=1");

    // A fill and a pass-through with a malformed traceparent forward neither header.
    let malformed = [("traceparent", "00-abc-01"), ("tracestate", "vendor=1")];
    client
        .get(
            &support::corral::url(&fleet[0], "/recommend?fill=2"),
            &malformed,
        )
        .await;
    let bypass = [malformed[0], malformed[1], ("authorization", "Bearer x")];
    client
        .get(
            &support::corral::url(&fleet[0], "/recommend?pass=2"),
            &bypass,
        )
        .await;
    for path in ["/recommend?fill=2", "/recommend?pass=2"] {
        let sent = upstream.last_headers(path).expect("called");
        assert!(!sent.contains_key("traceparent"), "{path}");
        assert!(!sent.contains_key("tracestate"), "{path}");
    }

    // A pass-through with a valid one keeps it as sent.
    let bypass = [traced[0], traced[1], ("authorization", "Bearer x")];
    client
        .get(
            &support::corral::url(&fleet[0], "/recommend?pass=3"),
            &bypass,
        )
        .await;
    let sent = upstream.last_headers("/recommend?pass=3").expect("called");
    assert_eq!(sent["traceparent"], parent.as_str());
    assert_eq!(sent["tracestate"], "vendor=1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiters_on_another_instance_link_to_the_fill_through_its_notice() {
    let collector = Collector::start().await;
    let redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    // Well within the default lease (2s): B learns of the fill from its notice, not from a
    // re-read when the lease would have lapsed (which finds the entry but not who filled it).
    upstream.set_delay(Duration::from_secs(1));
    let route = recommend_route(&upstream.url(), "");
    let base = config_text("", Some(&redis.url()), &route);
    let mut a = CorralProcess::start(&(base.clone() + &telemetry(&collector, "corral-a"))).await;
    let mut b = CorralProcess::start(&(base + &telemetry(&collector, "corral-b"))).await;
    let client = Client::new();
    let path = "/recommend?segment=fleet";
    let leader_trace = trace_id(100);

    // Step 1: A's request takes the fill lock and calls the upstream.
    let leader = get_traced(&client, a.url(path), &leader_trace);
    upstream.wait_in_flight(1).await;

    // Step 2: three requests on B wait for A's fill, subscribed to its notice.
    let (waiter_traces, waiters) = waiting_on(&client, &b, path, &redis, 110).await;
    assert_eq!(leader.await.expect("leader task").status, 200);
    for waiter in waiters {
        let answer = waiter.await.expect("waiter task");
        assert_eq!(answer.status, 200);
        let status = answer.cache_status().unwrap_or_default();
        assert!(status.ends_with("collapsed"), "a waiter on B: {status}");
    }
    assert_eq!(upstream.calls(), 1, "one fill for the fleet");

    // Step 3: B's requests link to A's fill span.
    shut_down(&mut a).await;
    shut_down(&mut b).await;
    b_links_to_a_fill(
        &collector.spans(),
        &leader_trace,
        &waiter_traces,
        "the notice",
    );
}

/// A streamed fill reaches the other instance through its relay log, not its `stored` notice:
/// the log's head names the fill, and B's requests link to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiters_tailing_another_instances_streamed_fill_link_to_it() {
    let collector = Collector::start().await;
    let redis = RedisServer::start().await;
    let upstream = StreamingUpstream::start().await;
    let route = recommend_route(&upstream.url, "");
    let base = config_text("", Some(&redis.url()), &route);
    let mut a = CorralProcess::start(&(base.clone() + &telemetry(&collector, "corral-a"))).await;
    let mut b = CorralProcess::start(&(base + &telemetry(&collector, "corral-b"))).await;
    let client = Client::new();
    let path = "/recommend?segment=streamed";
    let leader_trace = trace_id(200);

    // Step 1: A's request takes the fill lock and calls the upstream, which holds its head.
    let leader = get_traced(&client, a.url(path), &leader_trace);
    let answer = upstream.next_call().await;

    // Step 2: three requests on B wait for A's fill.
    let (waiter_traces, waiters) = waiting_on(&client, &b, path, &redis, 210).await;

    // Step 3: the head and a first event go out; A relays them, and B tails the log (it reads
    // it) while the body is still open — so B's answer comes from the relay, not the store.
    let first = Bytes::from_static(b"data: one\n\n");
    assert!(answer.bytes(first).await, "corral reads the body");
    eventually(
        "B tails the relay log",
        Duration::from_secs(10),
        async || redis.commandstats().await.calls("xread") > 0,
    )
    .await;
    let last = Bytes::from_static(b"data: two\n\n");
    assert!(answer.bytes(last).await, "corral reads the body");
    drop(answer);

    assert_eq!(leader.await.expect("leader task").status, 200);
    for waiter in waiters {
        let answer = waiter.await.expect("waiter task");
        assert_eq!(answer.status, 200);
        assert_eq!(answer.text(), "data: one\n\ndata: two\n\n");
        let status = answer.cache_status().unwrap_or_default();
        assert!(status.ends_with("collapsed"), "a waiter on B: {status}");
    }
    assert_eq!(upstream.calls(), 1, "one fill for the fleet");

    // Step 4: B's requests link to A's fill span, learnt from the log's head.
    shut_down(&mut a).await;
    shut_down(&mut b).await;
    b_links_to_a_fill(
        &collector.spans(),
        &leader_trace,
        &waiter_traces,
        "the relay log",
    );
}

#[test]
fn a_bad_telemetry_table_names_its_line_and_field() {
    let route =
        "[[route]]\nname = \"r\"\npath_prefix = \"/\"\nupstream = \"http://127.0.0.1:5000\"\n";
    let cases = [
        (
            "[telemetry]\nservice_name = \"x\"\n",
            6,
            "telemetry.otlp_endpoint",
            "required",
        ),
        (
            "[telemetry]\notlp_endpoint = \"https://collector:4318\"\n",
            7,
            "telemetry.otlp_endpoint",
            "https",
        ),
        (
            "[telemetry]\notlp_endpoint = \"http://user:secret@collector:4318\"\n",
            7,
            "telemetry.otlp_endpoint",
            "credentials",
        ),
        (
            "[telemetry]\notlp_endpoint = \"http://c:4318\"\nsample_ratio = 2\n",
            8,
            "telemetry.sample_ratio",
            "between 0.0 and 1.0",
        ),
        (
            "[telemetry]\notlp_endpoint = \"http://c:4318\"\nservice_name = \" \"\n",
            8,
            "telemetry.service_name",
            "empty",
        ),
        (
            "[telemetry]\notlp_endpoint = \"http://c:4318\"\nendpoint = \"x\"\n",
            8,
            "telemetry.endpoint",
            "unknown field",
        ),
    ];
    for (table, line, field, why) in cases {
        let text = format!("{route}\n{table}");
        let err = match corral::Config::parse(&text, std::path::Path::new("corral.toml")) {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(err) => err.to_string(),
        };
        assert!(err.starts_with(&format!("corral.toml:{line}:")), "{err}");
        assert!(err.contains(field), "{err}");
        assert!(err.contains(why), "{err}");
        assert!(
            !err.contains("secret"),
            "a credential is never echoed: {err}"
        );
    }
    let text = format!("{route}\n[telemetry]\notlp_endpoint = \"http://127.0.0.1:4318\"\n");
    let config = corral::Config::parse(&text, std::path::Path::new("corral.toml"))
        .unwrap_or_else(|err| panic!("{err}"));
    let telemetry = config.telemetry.expect("[telemetry] is on");
    assert_eq!(telemetry.service_name, "corral");
    assert_eq!(telemetry.sample_ratio, 1.0);
    assert_eq!(corral::telemetry::ACCESS_LOG, corral::proxy::ACCESS_LOG);
    let off = corral::Config::parse(route, std::path::Path::new("corral.toml"))
        .unwrap_or_else(|err| panic!("{err}"));
    assert!(off.telemetry.is_none(), "off by default");
}

/// Three requests on `b` for `path`, traced from `first_trace` on, once all three wait for
/// another instance's fill (subscribed to its notice): their traces and their tasks.
async fn waiting_on(
    client: &Client,
    b: &CorralProcess,
    path: &str,
    redis: &RedisServer,
    first_trace: u32,
) -> (Vec<String>, Vec<JoinHandle<Resp>>) {
    let traces: Vec<String> = (first_trace..first_trace + 3).map(trace_id).collect();
    let tasks = traces
        .iter()
        .map(|t| get_traced(client, b.url(path), t))
        .collect();
    eventually("B waits on the fill", Duration::from_secs(10), async || {
        redis.fill_subscribers().await == 1
    })
    .await;
    (traces, tasks)
}

/// Each of B's requests (by trace) links to A's one fill span (of the leader's trace), learnt
/// through `how`, and B ran no fill of its own.
fn b_links_to_a_fill(spans: &[Received], leader_trace: &str, waiter_traces: &[String], how: &str) {
    let fill = one(spans, "corral-a", "fill", leader_trace);
    for trace in waiter_traces {
        let request = one(spans, "corral-b", "request", trace);
        assert!(
            links_to(request, fill),
            "B's request {trace} links to A's fill through {how}: {request:#?}"
        );
    }
    assert!(
        !spans
            .iter()
            .any(|r| r.service == "corral-b" && r.span.name == "fill"),
        "B did not fill"
    );
}
