//! HTTPS to upstreams: the connector every pooled client uses, what it verifies, how its failures
//! are told apart, and how many handshakes it made.
//!
//! One connector speaks both `http://` and `https://`. Over TLS it sends SNI and verifies the
//! upstream's certificate (against the system's roots, or the route's `ca_file`), offers a client
//! certificate when the route has one, and asks for HTTP/2 then HTTP/1.1 by ALPN; a connection
//! that agreed on `h2` is spoken to in HTTP/2. Connecting and the handshake together are bounded
//! by the route's `tls.handshake_timeout` (5 s by default), so a peer that accepts and says
//! nothing is a clear failure, never a hang. Each handshake is counted
//! (`corral_upstream_tls_handshakes_total{upstream}`): pooled connections are reused, so the
//! count grows with new connections, not with requests.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_rustls::{
    FixedServerNameResolver, HttpsConnector, HttpsConnectorBuilder, MaybeHttpsStream,
};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use rustls::{CertificateError, ClientConfig};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;

use crate::config::UpstreamTls;
use crate::metrics::UpstreamLabel;
use crate::tls::{Roots, provider};

/// The bound on connecting and the handshake of routes without a `tls` table.
const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The handshakes made, by upstream authority.
pub type Handshakes = Family<UpstreamLabel, Counter>;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a TLS connection to an upstream could not be made: what a client may know of it is
/// [`TlsFailure::kind`], the `corral-error` header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsFailure {
    #[error(
        "the upstream's certificate is signed by an unknown authority (check the route's tls.ca_file)"
    )]
    UnknownIssuer,
    #[error(
        "the upstream's certificate is not valid for the name asked for (check tls.server_name)"
    )]
    NameMismatch,
    #[error("the upstream's certificate has expired or is not valid yet")]
    Expired,
    #[error("no TLS handshake within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("TLS: {0}")]
    Other(String),
}

impl TlsFailure {
    pub fn kind(&self) -> &'static str {
        match self {
            TlsFailure::UnknownIssuer => "upstream-tls-unknown-ca",
            TlsFailure::NameMismatch => "upstream-tls-name-mismatch",
            TlsFailure::Expired => "upstream-tls-expired",
            TlsFailure::HandshakeTimeout(_) => "upstream-tls-timeout",
            TlsFailure::Other(_) => "upstream-tls",
        }
    }

    fn from_rustls(err: &rustls::Error) -> TlsFailure {
        use CertificateError as C;
        match err {
            rustls::Error::InvalidCertificate(cert) => match cert {
                // A certificate signed by a key other than the trusted authority's of that name
                // is, to the operator, just as unknown.
                C::UnknownIssuer | C::BadSignature => TlsFailure::UnknownIssuer,
                C::NotValidForName | C::NotValidForNameContext { .. } => TlsFailure::NameMismatch,
                C::Expired
                | C::ExpiredContext { .. }
                | C::NotValidYet
                | C::NotValidYetContext { .. } => TlsFailure::Expired,
                other => TlsFailure::Other(format!("invalid certificate: {other:?}")),
            },
            other => TlsFailure::Other(other.to_string()),
        }
    }

    /// The TLS failure under a failed client call, if that is why it failed.
    pub fn of(err: &(dyn std::error::Error + 'static)) -> Option<TlsFailure> {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(err);
        while let Some(err) = cause {
            if let Some(timeout) = err.downcast_ref::<HandshakeTimeout>() {
                return Some(TlsFailure::HandshakeTimeout(timeout.0));
            }
            if let Some(tls) = err.downcast_ref::<rustls::Error>() {
                return Some(TlsFailure::from_rustls(tls));
            }
            // io::Error's `source` skips the error it wraps (hyper-rustls wraps tokio-rustls'
            // io::Error, which wraps rustls'): step into it instead.
            cause = match err.downcast_ref::<std::io::Error>() {
                Some(io) => match io.get_ref() {
                    Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
                    None => None,
                },
                None => err.source(),
            };
        }
        None
    }
}

/// Connecting and the TLS handshake took longer than the route allows.
#[derive(Debug, thiserror::Error)]
#[error("no TLS handshake within {0:?}")]
pub struct HandshakeTimeout(pub Duration);

/// Why a route's connector could not be built (a client certificate rustls refused).
#[derive(Debug, thiserror::Error)]
#[error("TLS setup: {0}")]
pub struct TlsSetupError(String);

/// The connector of one pooled client: plain TCP for `http://`, rustls for `https://`, each
/// handshake counted and bounded.
#[derive(Clone)]
pub struct Connector {
    inner: HttpsConnector<HttpConnector>,
    handshakes: Handshakes,
    timeout: Duration,
}

impl Connector {
    /// The connector for routes without a `tls` table: the system's roots, the upstream's host
    /// name, no client certificate.
    pub fn system(handshakes: Handshakes) -> Connector {
        let config = builder()
            .with_root_certificates(Roots::system())
            .with_no_client_auth();
        Connector::build(config, None, handshakes)
    }

    /// The connector of one route's `tls` table. Fails only when rustls refuses its client
    /// certificate (validation already checked that the key matches it).
    pub fn new(tls: &UpstreamTls, handshakes: Handshakes) -> Result<Connector, TlsSetupError> {
        let roots = tls
            .roots
            .as_ref()
            .map_or_else(Roots::system, |r| r.store.clone());
        let builder = builder().with_root_certificates(roots);
        let config = match &tls.identity {
            None => builder.with_no_client_auth(),
            Some(identity) => {
                let (chain, key) = identity
                    .chain_and_key()
                    .ok_or_else(|| TlsSetupError("the client key cannot be read back".into()))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| TlsSetupError(format!("client certificate: {e}")))?
            }
        };
        Ok(Connector::build(config, Some(tls), handshakes))
    }

    fn build(config: ClientConfig, tls: Option<&UpstreamTls>, handshakes: Handshakes) -> Connector {
        let mut tcp = HttpConnector::new();
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(Duration::from_secs(5)));
        tcp.enforce_http(false);
        let builder = HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_or_http();
        let name = tls.and_then(|t| t.server_name.as_deref());
        let builder = match name.map(|n| ServerName::try_from(n.to_owned())) {
            Some(Ok(name)) => builder.with_server_name_resolver(FixedServerNameResolver::new(name)),
            // Validation checked the name; without one, the upstream's host is the name.
            _ => builder,
        };
        Connector {
            inner: builder.enable_all_versions().wrap_connector(tcp),
            handshakes,
            timeout: tls.map_or(DEFAULT_HANDSHAKE_TIMEOUT, |t| t.handshake_timeout),
        }
    }
}

/// A rustls client config builder on the process's provider: `ClientConfig::builder` picks the
/// process default, which [`provider`] installs (`ring`, the only one compiled in), with the
/// safe default protocol versions.
fn builder() -> rustls::ConfigBuilder<ClientConfig, rustls::WantsVerifier> {
    let _ = provider();
    ClientConfig::builder()
}

impl tower_service::Service<Uri> for Connector {
    type Response = MaybeHttpsStream<TokioIo<TcpStream>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let https = uri.scheme() == Some(&http::uri::Scheme::HTTPS);
        if https {
            let upstream = uri.authority().map_or_else(String::new, |a| a.to_string());
            self.handshakes
                .get_or_create(&UpstreamLabel { upstream })
                .inc();
        }
        let limit = self.timeout;
        let connecting = self.inner.call(uri);
        Box::pin(async move {
            if !https {
                return connecting.await;
            }
            match tokio::time::timeout(limit, connecting).await {
                Ok(done) => done,
                Err(_) => Err(Box::new(HandshakeTimeout(limit)) as BoxError),
            }
        })
    }
}

/// Whether a route's `tls` still describes the same connections: a reload keeps its pool then.
pub fn same(a: Option<&UpstreamTls>, b: Option<&UpstreamTls>) -> bool {
    a.map(UpstreamTls::fingerprint) == b.map(UpstreamTls::fingerprint)
}

/// Marks a request for the client of its route's `tls` table (see `UpstreamClient::send`).
#[derive(Debug, Clone)]
pub struct TlsRoute(pub Arc<str>);
