//! OpenTelemetry export of the request path's spans ([`crate::trace`]), when `[telemetry]` is
//! configured: OTLP over HTTP/protobuf to a collector.
//!
//! Off by default. Off, nothing is installed: the spans are disabled where they are written and
//! cost no allocation. On, [`Telemetry::start`] gives a `tracing` layer that turns them into
//! OpenTelemetry spans, batched by the SDK's own thread and sent by a hyper client whose calls
//! run on the process's tokio runtime (the SDK's thread has none, so a client that needs one
//! cannot run there). [`Telemetry::shutdown`] flushes what is batched; the binary calls it on a
//! graceful shutdown.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use opentelemetry::trace::TracerProvider;
use opentelemetry_http::{HttpClient, HttpError};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing::Subscriber;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::registry::LookupSpan;

/// `[telemetry]`: where spans go, under which service name, and how many traces are kept.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetryConfig {
    /// The collector's OTLP/HTTP base URL (`http://host:4318`); spans are POSTed to
    /// `/v1/traces` under it, unless the URL names a path of its own.
    pub otlp_endpoint: Uri,
    /// `service.name` of every span. Default `corral`.
    pub service_name: String,
    /// The share of new traces recorded, in `0.0..=1.0` (default 1). A request that arrives with a
    /// sampled `traceparent` is recorded whatever the ratio: the caller decided.
    pub sample_ratio: f64,
}

pub const DEFAULT_SERVICE_NAME: &str = "corral";

/// The access log's target (the proxy's `ACCESS_LOG`, named here so that this module depends on
/// no other; `tests/tracing.rs` checks they agree): never exported.
pub const ACCESS_LOG: &str = "corral::access";

/// How long one export may take, connection included.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest collector answer read (an OTLP answer is a few bytes; a partial-success one more).
const MAX_ANSWER: usize = 64 * 1024;

/// Why export could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("telemetry needs a tokio runtime to send spans from")]
    NoRuntime,
    #[error("telemetry: the OTLP exporter for {endpoint}: {reason}")]
    Exporter { endpoint: String, reason: String },
}

/// The running export. Dropping it without [`Telemetry::shutdown`] loses the last batch.
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    /// Builds the exporter and the layer that feeds it. Call within the tokio runtime that will
    /// carry the exports.
    pub fn start<S>(
        config: &TelemetryConfig,
    ) -> Result<(Telemetry, impl Layer<S> + Send + Sync + 'static), TelemetryError>
    where
        S: Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
    {
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|_| TelemetryError::NoRuntime)?;
        let endpoint = traces_url(&config.otlp_endpoint);
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(Sender::new(runtime))
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(endpoint.clone())
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|err| TelemetryError::Exporter {
                endpoint,
                reason: err.to_string(),
            })?;
        let sampler =
            Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(config.sample_ratio)));
        let resource = Resource::builder()
            .with_service_name(config.service_name.clone())
            .build();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_sampler(sampler)
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("corral");
        // Corral's own spans and events (events become span events); nothing of the crates below.
        // The access log line says nothing the request span does not, and would make it look
        // enabled to the hit path when its lines are off.
        let only_corral = Targets::new()
            .with_target("corral", tracing::Level::INFO)
            .with_target(ACCESS_LOG, tracing::level_filters::LevelFilter::OFF);
        let layer = tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(only_corral);
        Ok((Telemetry { provider }, layer))
    }

    /// Sends what is batched and stops the exporter; bounded by the export timeout.
    pub async fn shutdown(self) {
        let provider = self.provider;
        let done = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        match done {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::warn!(%err, "telemetry: the last spans may be lost"),
            Err(err) => tracing::warn!(%err, "telemetry: the last spans may be lost"),
        }
    }
}

/// The URL spans are POSTed to: the endpoint's own path, or `/v1/traces` under a bare base URL.
fn traces_url(endpoint: &Uri) -> String {
    let base = endpoint.to_string();
    match endpoint.path() {
        "" | "/" => format!("{}/v1/traces", base.trim_end_matches('/')),
        _ => base,
    }
}

/// The exporter's HTTP client: hyper, each call spawned on the process's runtime, so that the
/// SDK's export thread (which has no runtime) only awaits its outcome.
struct Sender {
    client: Client<HttpConnector, Full<Bytes>>,
    runtime: tokio::runtime::Handle,
    /// Whether the last export failed: a failing collector is logged once, not per batch.
    failing: Arc<AtomicBool>,
}

impl Sender {
    fn new(runtime: tokio::runtime::Handle) -> Sender {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(EXPORT_TIMEOUT));
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Sender {
            client,
            runtime,
            failing: Arc::default(),
        }
    }

    /// Logs the first failure of a run of them, and the recovery.
    fn note(&self, outcome: Result<http::StatusCode, &HttpError>) {
        let failed = match outcome {
            Ok(status) if status.is_success() => None,
            Ok(status) => Some(format!("the collector answered {status}")),
            Err(err) => Some(err.to_string()),
        };
        match failed {
            Some(why) if !self.failing.swap(true, Ordering::AcqRel) => {
                tracing::warn!(%why, "telemetry: spans could not be exported (logged once until it recovers)");
            }
            None if self.failing.swap(false, Ordering::AcqRel) => {
                tracing::info!("telemetry: exporting spans again");
            }
            _ => {}
        }
    }
}

impl std::fmt::Debug for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sender(hyper)")
    }
}

#[async_trait::async_trait]
impl HttpClient for Sender {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let client = self.client.clone();
        let call = async move {
            let (parts, body) = request.into_parts();
            let request = Request::from_parts(parts, Full::new(body));
            let answer = client.request(request).await?;
            let (parts, body) = answer.into_parts();
            let body = Limited::new(body, MAX_ANSWER).collect().await?.to_bytes();
            Ok::<_, HttpError>(Response::from_parts(parts, body))
        };
        let bounded = async move {
            match tokio::time::timeout(EXPORT_TIMEOUT, call).await {
                Ok(answer) => answer,
                Err(_) => Err(format!("no answer within {EXPORT_TIMEOUT:?}").into()),
            }
        };
        let answer = self.runtime.spawn(bounded).await?;
        self.note(answer.as_ref().map(Response::status));
        answer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_go_to_v1_traces_under_a_base_url_or_where_the_url_says() {
        let cases = [
            ("http://127.0.0.1:4318", "http://127.0.0.1:4318/v1/traces"),
            ("http://127.0.0.1:4318/", "http://127.0.0.1:4318/v1/traces"),
            (
                "http://collector/otlp/v1/traces",
                "http://collector/otlp/v1/traces",
            ),
        ];
        for (given, sent) in cases {
            let Ok(uri) = given.parse::<Uri>() else {
                panic!("{given}");
            };
            assert_eq!(traces_url(&uri), sent);
        }
    }
}
