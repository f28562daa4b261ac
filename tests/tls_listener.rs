//! The TLS listener (issue 18): `[server] tls = { cert_file, key_file }` serves HTTP/1.1 and
//! HTTP/2 chosen by ALPN, and a reload (what SIGHUP runs) that finds new files rotates the
//! certificate: new connections get the new one while an open connection keeps serving.
//!
//! Connections are made by hand (tokio-rustls, then hyper's connection API) so the test knows
//! which connection each request uses and which certificate each handshake presented.

mod support;

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use support::{Pki, Upstream};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// A TLS connection to `addr` trusting `pki`, offering `alpn`: the stream, the certificate the
/// server presented, and the protocol agreed.
async fn connect(
    addr: std::net::SocketAddr,
    pki: &Pki,
    alpn: &[&[u8]],
) -> (
    TlsStream<TcpStream>,
    CertificateDer<'static>,
    Option<Vec<u8>>,
) {
    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(pki.ca_file()).expect("read the CA");
    use rustls::pki_types::pem::PemObject;
    roots
        .add(CertificateDer::from_pem_slice(&ca).expect("CA PEM"))
        .expect("add the CA");
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("127.0.0.1").expect("an IP server name");
    let tls = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("TLS handshake with Corral");
    let (_, session) = tls.get_ref();
    let cert = session.peer_certificates().expect("a server certificate")[0].clone();
    let agreed = session.alpn_protocol().map(<[u8]>::to_vec);
    (tls, cert, agreed)
}

fn request(path: &str) -> Request<Empty<Bytes>> {
    Request::builder()
        .uri(path)
        .header("host", "corral.test")
        .body(Empty::new())
        .expect("a request")
}

/// Writes the config naming `cert` and `key` (copied to fixed paths in `dir`) to `dir/corral.toml`,
/// with the `/recommend` route and `more_routes`.
fn write_config(dir: &Path, upstream: &str, leaf: &support::Leaf) -> std::path::PathBuf {
    write_config_with(dir, upstream, leaf, "")
}

fn write_config_with(
    dir: &Path,
    upstream: &str,
    leaf: &support::Leaf,
    more_routes: &str,
) -> std::path::PathBuf {
    std::fs::copy(&leaf.cert, dir.join("listener.pem")).expect("copy the certificate");
    std::fs::copy(&leaf.key, dir.join("listener.key")).expect("copy the key");
    let path = dir.join("corral.toml");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_timeout = \"2s\"\n\
         tls = {{ cert_file = \"listener.pem\", key_file = \"listener.key\" }}\n\n{}{more_routes}",
        support::corral::recommend_route(upstream, "")
    );
    std::fs::write(&path, text).expect("write the config");
    path
}

#[tokio::test]
async fn http1_and_h2_by_alpn_and_a_reload_rotates_the_certificate_without_dropping_connections() {
    let pki = Pki::new();
    let upstream = Upstream::start().await;
    let first = pki.server(&["127.0.0.1"]);
    let path = write_config(&pki.dir(), &upstream.url(), &first);
    let config = corral::Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let instance = corral::Instance::start(&config)
        .await
        .expect("start corral");
    let addr = instance.addr();

    // HTTP/1.1, by ALPN.
    let (tls, cert_a, agreed) = connect(addr, &pki, &[b"http/1.1"]).await;
    assert_eq!(agreed.as_deref(), Some(&b"http/1.1"[..]));
    let (mut h1, conn) = http1::handshake(TokioIo::new(tls)).await.expect("h1");
    tokio::spawn(conn);
    let resp = h1
        .send_request(request("/recommend?a=1"))
        .await
        .expect("h1 answer");
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.expect("body");

    // HTTP/2, by ALPN, on a connection kept open across the rotation.
    let (tls, cert_h2, agreed) = connect(addr, &pki, &[b"h2", b"http/1.1"]).await;
    assert_eq!(agreed.as_deref(), Some(&b"h2"[..]));
    assert_eq!(cert_h2, cert_a);
    let (mut h2, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
        .await
        .expect("h2");
    tokio::spawn(conn);
    let resp = h2
        .send_request(request("/recommend?a=1"))
        .await
        .expect("h2 answer");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    resp.into_body().collect().await.expect("body");

    // Rotation: new files at the same paths, then the reload SIGHUP runs.
    let second = pki.server(&["127.0.0.1"]);
    write_config(&pki.dir(), &upstream.url(), &second);
    let reloaded = instance.control().reload().expect("the reload is accepted");
    assert!(reloaded.restart_needed.is_empty(), "{reloaded:?}");

    // A new connection gets the new certificate…
    let (_, cert_b, _) = connect(addr, &pki, &[b"h2"]).await;
    assert_ne!(cert_b, cert_a, "the new certificate");
    assert_eq!(cert_b, second.material().0[0]);
    // …and both open connections still serve.
    let resp = h2
        .send_request(request("/recommend?a=2"))
        .await
        .expect("h2 after rotation");
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.expect("body");
    let resp = h1
        .send_request(request("/recommend?a=3"))
        .await
        .expect("h1 after rotation");
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.expect("body");
    assert_eq!(upstream.calls(), 3);
    instance.shutdown().await;
}

/// Behind the TLS listener, the upstream is told the client spoke HTTPS: on a shared fill
/// (`X-Forwarded-Proto` and `Forwarded: proto=`, Corral's own) and on a pass-through (appended
/// to the forwarding chain).
#[tokio::test]
async fn the_upstream_is_told_https_on_fills_and_pass_throughs() {
    let pki = Pki::new();
    let upstream = Upstream::start().await;
    let leaf = pki.server(&["127.0.0.1"]);
    let pass = format!(
        "[[route]]\nname = \"pass\"\npath_prefix = \"/pass\"\nupstream = \"{}\"\ncache = false\n",
        upstream.url()
    );
    let path = write_config_with(&pki.dir(), &upstream.url(), &leaf, &pass);
    let config = corral::Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let instance = corral::Instance::start(&config)
        .await
        .expect("start corral");
    let (tls, _, _) = connect(instance.addr(), &pki, &[b"http/1.1"]).await;
    let (mut h1, conn) = http1::handshake(TokioIo::new(tls)).await.expect("h1");
    tokio::spawn(conn);
    for path in ["/recommend?p=1", "/pass?p=1"] {
        let resp = h1.send_request(request(path)).await.expect("an answer");
        assert_eq!(resp.status(), 200, "{path}");
        resp.into_body().collect().await.expect("body");
    }

    let fill = upstream
        .last_headers("/recommend?p=1")
        .expect("the fill reached the upstream");
    assert_eq!(fill["x-forwarded-proto"], "https", "fill: {fill:?}");
    assert_eq!(fill["forwarded"], "proto=https", "fill: {fill:?}");
    let passed = upstream
        .last_headers("/pass?p=1")
        .expect("the pass-through reached the upstream");
    assert_eq!(passed["x-forwarded-proto"], "https", "pass: {passed:?}");
    let forwarded = passed["forwarded"].to_str().expect("ASCII");
    assert!(
        forwarded.starts_with("for=127.0.0.1;proto=https;"),
        "pass: {forwarded}"
    );
    instance.shutdown().await;
}

/// A fleet on one Redis with a TLS instance and a plain one: the upstream is told each request's
/// scheme, so each scheme has its own entry (and fill) for the same path. A purge by path removes
/// both; one by a URL with a scheme, that scheme's only.
#[tokio::test]
async fn a_fleet_of_tls_and_plain_listeners_keeps_each_schemes_answer_apart() {
    let pki = Pki::new();
    let redis = support::RedisServer::start().await;
    let upstream = Upstream::start().await;
    let leaf = pki.server(&["127.0.0.1"]);
    let tls_path = write_config_with(&pki.dir(), &upstream.url(), &leaf, "");
    let tls_text = std::fs::read_to_string(&tls_path).expect("read the config back");
    let tls_text = tls_text.replacen(
        "[[route]]",
        &format!("{}\n[[route]]", support::corral::redis_table(&redis.url())),
        1,
    );
    std::fs::write(&tls_path, tls_text).expect("write the config");
    let tls_config = corral::Config::load(&tls_path).unwrap_or_else(|e| panic!("{e}"));
    let secure = corral::Instance::start(&tls_config)
        .await
        .expect("start the TLS instance");
    let plain_config = support::corral::config(
        Some(&redis.url()),
        &support::corral::recommend_route(&upstream.url(), ""),
    );
    let plain = corral::Instance::start(&plain_config)
        .await
        .expect("start the plain instance");
    let client = support::Client::new();
    let (tls, _, _) = connect(secure.addr(), &pki, &[b"http/1.1"]).await;
    let (mut h1, conn) = http1::handshake(TokioIo::new(tls)).await.expect("h1");
    tokio::spawn(conn);

    let path = "/recommend?s=1";
    let mut over_tls = async || {
        let resp = h1.send_request(request(path)).await.expect("an answer");
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        let told = upstream
            .last_headers(path)
            .expect("a fill reached the upstream");
        (body, told["x-forwarded-proto"].clone())
    };
    let over_plain = async || {
        let resp = client.get(&support::corral::url(&plain, path), &[]).await;
        assert_eq!(resp.status, 200);
        resp.body
    };

    // Each scheme's first request fills its own entry, and is told its own scheme.
    let (secure_body, told) = over_tls().await;
    assert_eq!(told, "https");
    let plain_body = over_plain().await;
    assert_ne!(
        plain_body, secure_body,
        "the plain client got the https answer"
    );
    assert_eq!(
        upstream.last_headers(path).expect("a fill")["x-forwarded-proto"],
        "http"
    );
    assert_eq!(upstream.calls_for(path), 2);
    // Each is then a hit, on its own answer.
    assert_eq!(over_tls().await.0, secure_body);
    assert_eq!(over_plain().await, plain_body);
    assert_eq!(upstream.calls_for(path), 2);

    // A purge of the https URL removes only the https entry.
    let proxy = plain.proxy();
    let purge = async |body: String| {
        let purge = corral::purge::PurgeRequest::parse(body.as_bytes()).expect("a purge body");
        proxy.purge(&purge).await.expect("purged")
    };
    assert_eq!(
        purge(format!(r#"{{"url":"https://corral.test{path}"}}"#)).await,
        1
    );
    assert_eq!(over_plain().await, plain_body);
    let (refilled, told) = over_tls().await;
    assert_ne!(refilled, secure_body);
    assert_eq!(told, "https");
    assert_eq!(upstream.calls_for(path), 3);
    // A purge of the path removes both.
    assert_eq!(purge(format!(r#"{{"url":"{path}"}}"#)).await, 2);
    assert_ne!(over_plain().await, plain_body);
    assert_ne!(over_tls().await.0, refilled);
    assert_eq!(upstream.calls_for(path), 5);
    secure.shutdown().await;
    plain.shutdown().await;
}
