//! The `[telemetry]` table: where spans are exported (OTLP over HTTP), under which service name,
//! and what share of new traces is kept.

use toml::Spanned;

use super::{Checked, Checker};
use crate::config::raw::RawTelemetry;
use crate::telemetry::{DEFAULT_SERVICE_NAME, TelemetryConfig};

impl Checker<'_> {
    /// `[telemetry]`: `otlp_endpoint` is required (the table is how export is turned on).
    pub(super) fn telemetry(&self, table: &Spanned<RawTelemetry>) -> Checked<TelemetryConfig> {
        let raw = table.get_ref();
        let at = (None, "telemetry.otlp_endpoint");
        let Some(endpoint) = raw.otlp_endpoint.as_ref() else {
            let why = "required: the collector's OTLP/HTTP URL, e.g. \"http://127.0.0.1:4318\" (omit [telemetry] to export nothing)";
            return self.fail(table.span(), at, why);
        };
        let text = endpoint.get_ref();
        let uri: http::Uri = text
            .parse()
            .map_err(|e| self.error(endpoint.span(), at, format!("invalid URL {text:?} ({e})")))?;
        let problem = match (uri.scheme_str(), uri.authority()) {
            (Some("http"), Some(a)) if a.as_str().contains('@') => "must not carry credentials",
            (Some("http"), Some(_)) if uri.query().is_none() => "",
            (Some("http"), Some(_)) => "must not have a query",
            (Some("https"), _) => "https collectors are not supported yet; use http://",
            _ => "must be an absolute http:// URL with a host, e.g. \"http://127.0.0.1:4318\"",
        };
        if !problem.is_empty() {
            return self.fail(endpoint.span(), at, format!("{text:?}: {problem}"));
        }
        let service_name = match raw.service_name.as_ref() {
            None => DEFAULT_SERVICE_NAME.to_owned(),
            Some(name) if name.get_ref().trim().is_empty() => {
                let at = (None, "telemetry.service_name");
                return self.fail(name.span(), at, "must not be empty");
            }
            Some(name) => name.get_ref().clone(),
        };
        let sample_ratio = match raw.sample_ratio.as_ref() {
            None => 1.0,
            Some(r) if (0.0..=1.0).contains(r.get_ref()) => *r.get_ref(),
            Some(r) => {
                let at = (None, "telemetry.sample_ratio");
                let why = format!("must be between 0.0 and 1.0, not {}", r.get_ref());
                return self.fail(r.span(), at, why);
            }
        };
        Ok(TelemetryConfig {
            otlp_endpoint: uri,
            service_name,
            sample_ratio,
        })
    }
}
