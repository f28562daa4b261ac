//! The admin listener (`server.admin_listen`), apart from proxy traffic:
//!
//! | endpoint | answer |
//! |---|---|
//! | `GET /healthz` | 200 `ok` while the process runs |
//! | `GET /readyz` | 200 `ready`; with Redis down, 200 `degraded` or 503 per `server.ready_when_degraded` |
//! | `GET /metrics` | the Prometheus/OpenMetrics text page |
//! | `POST /purge` | purge by `url`, `route` or `tag` (JSON); 200 `{"purged": n}` |
//! | `POST /reload` | re-read the config file; 200 or 400 with the error, the old config kept |
//!
//! `POST` endpoints need `Authorization: Bearer <server.admin_token>` when a token is set
//! (compared in constant time); without it they answer 401.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::ServerConfig;
use crate::conn::{self, Activity, Tracked};
use crate::control::Control;
use crate::proxy::Readiness;
use crate::purge::PurgeRequest;

/// Largest admin request body.
const MAX_ADMIN_BODY: usize = 64 * 1024;

/// Serves the admin listener until `stopped` turns true.
pub async fn serve(
    listener: TcpListener,
    control: Arc<Control>,
    mut stopped: watch::Receiver<bool>,
    server: ServerConfig,
) {
    // The proxy listener's limits: an unfinished head is closed at `header_read_timeout`.
    let builder = conn::builder(&server);
    let idle_limit = server.header_read_timeout;
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(err) => {
                    tracing::warn!(%err, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = stopped.changed() => return,
        };
        let control = control.clone();
        let activity = Activity::new();
        let requests = activity.clone();
        let service = service_fn(move |req| {
            let control = control.clone();
            let in_flight = requests.begin();
            async move {
                let resp = handle(&control, req, peer).await;
                Ok::<_, Infallible>(resp.map(|body| Tracked::new(body, in_flight)))
            }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        tokio::spawn(async move {
            if let Some(Err(err)) = conn::drive(conn, &activity, idle_limit).await {
                tracing::debug!(%peer, %err, "admin connection ended with an error");
            }
        });
    }
}

async fn handle(
    control: &Control,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    tracing::debug!(%method, %path, %peer, "admin request");
    match (method, path.as_str()) {
        (Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (Method::GET, "/readyz") => ready(control),
        (Method::GET, "/metrics") => {
            let page = control.proxy().render_metrics().await;
            let mut resp = text(StatusCode::OK, page);
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            resp
        }
        (Method::POST, _) if !authorized(control, &req) => unauthorized(),
        (Method::POST, "/purge") => purge(control, req).await,
        (Method::POST, "/reload") => match control.reload() {
            Ok(reloaded) => json(
                StatusCode::OK,
                &serde_json::json!({
                    "reloaded": true,
                    "routes": reloaded.routes,
                    "restart_needed": reloaded.restart_needed,
                }),
            ),
            Err(err) => json(
                StatusCode::BAD_REQUEST,
                &serde_json::json!({ "error": err.to_string() }),
            ),
        },
        (_, "/healthz" | "/readyz" | "/metrics") => method_not_allowed("GET"),
        (_, "/purge" | "/reload") => method_not_allowed("POST"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// A known endpoint asked with the wrong method: 405 with the `Allow` it takes (RFC 9110 §15.5.6).
fn method_not_allowed(allow: &'static str) -> Response<Full<Bytes>> {
    let mut resp = text(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method not allowed; use {allow}\n"),
    );
    resp.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    resp
}

fn ready(control: &Control) -> Response<Full<Bytes>> {
    if control.draining() {
        return text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n");
    }
    match control.proxy().readiness() {
        Readiness::Ready => return text(StatusCode::OK, "ready\n"),
        Readiness::Starting => {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                "starting: waiting for redis to answer\n",
            );
        }
        Readiness::Degraded => {}
    }
    let status = if control.ready_when_degraded() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    text(
        status,
        "degraded: redis unreachable, serving from L1 and the upstream\n",
    )
}

async fn purge(control: &Control, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let body = match Limited::new(req.into_body(), MAX_ADMIN_BODY)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(err) => {
            let why = if err.is::<http_body_util::LengthLimitError>() {
                format!("purge body: larger than {} KiB", MAX_ADMIN_BODY / 1024)
            } else {
                "purge body: could not be read (the connection failed)".to_owned()
            };
            return json(
                StatusCode::BAD_REQUEST,
                &serde_json::json!({ "error": why }),
            );
        }
    };
    let request = match PurgeRequest::parse(&body) {
        Ok(request) => request,
        Err(err) => {
            return json(
                StatusCode::BAD_REQUEST,
                &serde_json::json!({ "error": err.to_string() }),
            );
        }
    };
    match control.proxy().purge(&request).await {
        // A soft purge removes nothing: it says how many entries it marked stale.
        Ok(marked) if request.soft => {
            json(StatusCode::OK, &serde_json::json!({ "marked": marked }))
        }
        Ok(purged) => json(StatusCode::OK, &serde_json::json!({ "purged": purged })),
        Err(err @ crate::purge::PurgeError::Redis(_)) => {
            tracing::warn!(%err, "purge failed");
            json(
                StatusCode::SERVICE_UNAVAILABLE,
                &serde_json::json!({ "error": err.to_string() }),
            )
        }
        Err(err) => json(
            StatusCode::BAD_REQUEST,
            &serde_json::json!({ "error": err.to_string() }),
        ),
    }
}

/// Whether the request carries the bearer token (always, when none is configured).
fn authorized(control: &Control, req: &Request<Incoming>) -> bool {
    let Some(token) = control.admin_token() else {
        return true;
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        // The scheme is case-insensitive (RFC 9110 §11.1); the token is not.
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map_or("", |(_, token)| token.trim_start());
    constant_time_eq(given.as_bytes(), token.as_bytes())
}

fn unauthorized() -> Response<Full<Bytes>> {
    let mut resp = text(
        StatusCode::UNAUTHORIZED,
        "a valid bearer token is required\n",
    );
    resp.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    resp
}

/// Compares without stopping at the first difference, so timing does not reveal the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    diff == 0
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(value.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"secret"));
    }
}
