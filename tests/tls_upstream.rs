//! HTTPS upstreams (issue 18): a rustls server in the test process, certificates made by
//! `rcgen` at test time, Corral in between.
//!
//! - a cached route through HTTPS: one upstream call, then hits;
//! - each failure — unknown CA, name mismatch, expired certificate, handshake timeout — is a 502
//!   with its own `corral-error` kind, at once, and no retry of a refused certificate;
//! - `server_name` verifies a certificate for another name than the URL's host;
//! - HTTP/2 by ALPN, HTTP/1.1 when the upstream offers only that;
//! - mTLS: without the client certificate the upstream refuses, with it the call goes through;
//! - 1000 sequential requests through a pass-through route reuse pooled connections: a handful
//!   of handshakes, counted by Corral's metric and by the upstream alike.

mod support;

use std::sync::Arc;

use support::corral::{config, start, url};
use support::{Client, Pki, Upstream};

/// A route named `secure` on `upstream` with a `tls` table of `tls` (may be empty).
fn route(upstream: &str, tls: &str, extra: &str) -> String {
    let tls = if tls.is_empty() {
        String::new()
    } else {
        format!("tls = {{ {tls} }}\n")
    };
    format!(
        "[[route]]\nname = \"secure\"\npath_prefix = \"/\"\nupstream = \"{upstream}\"\n{tls}{extra}\n"
    )
}

fn ca(pki: &Pki) -> String {
    format!("ca_file = \"{}\"", pki.ca_file().display())
}

async fn https_upstream(pki: &Pki, names: &[&str], alpn: &[&[u8]]) -> Upstream {
    let leaf = pki.server(names);
    Upstream::start_tls(pki.server_config(&leaf, alpn, None)).await
}

#[tokio::test]
async fn a_cached_route_through_https_calls_the_upstream_once() {
    let pki = Pki::new();
    let upstream = https_upstream(&pki, &["127.0.0.1"], &[b"h2", b"http/1.1"]).await;
    let cfg = config(None, &route(&upstream.url(), &ca(&pki), ""));
    let fleet = start(1, &cfg).await;
    let client = Client::new();
    let first = client.get(&url(&fleet[0], "/a?x=1"), &[]).await;
    assert_eq!(first.status, 200, "{}", first.text());
    for _ in 0..5 {
        let again = client.get(&url(&fleet[0], "/a?x=1"), &[]).await;
        assert_eq!(again.status, 200);
        assert_eq!(again.body, first.body, "the cached body");
    }
    assert_eq!(upstream.calls_for("/a?x=1"), 1);
    assert_eq!(upstream.connections(), 1, "one handshake");
    // The upstream offered h2 and http/1.1: Corral chose h2.
    assert_eq!(upstream.last_version("/a?x=1"), Some(http::Version::HTTP_2));
}

#[tokio::test]
async fn an_upstream_offering_only_http1_is_spoken_to_in_http1() {
    let pki = Pki::new();
    let upstream = https_upstream(&pki, &["127.0.0.1"], &[b"http/1.1"]).await;
    let cfg = config(None, &route(&upstream.url(), &ca(&pki), ""));
    let fleet = start(1, &cfg).await;
    let resp = Client::new().get(&url(&fleet[0], "/one"), &[]).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(upstream.last_version("/one"), Some(http::Version::HTTP_11));
}

/// Asserts a 502 with this `corral-error` kind and that the upstream answered nothing.
async fn assert_refused(cfg: &corral::Config, upstream: &Upstream, kind: &str) {
    let fleet = start(1, cfg).await;
    let client = Client::new();
    for path in ["/cached", "/other"] {
        let resp = client.get(&url(&fleet[0], path), &[]).await;
        assert_eq!(resp.status, 502, "{kind}: {}", resp.text());
        assert_eq!(resp.header("corral-error"), Some(kind));
    }
    assert_eq!(
        upstream.calls(),
        0,
        "{kind}: no request reached the upstream"
    );
}

#[tokio::test]
async fn an_unknown_authority_is_a_502_naming_it() {
    let pki = Pki::new();
    let stranger = Pki::new();
    let upstream = https_upstream(&stranger, &["127.0.0.1"], &[b"http/1.1"]).await;
    // Trusting our CA only (and, without a ca_file, the system's roots: neither signed it).
    let cfg = config(None, &route(&upstream.url(), &ca(&pki), ""));
    assert_refused(&cfg, &upstream, "upstream-tls-unknown-ca").await;
    let cfg = config(None, &route(&upstream.url(), "", ""));
    assert_refused(&cfg, &upstream, "upstream-tls-unknown-ca").await;
    // A refused certificate is not retried: one handshake per request.
    assert_eq!(upstream.connections(), 0);
}

#[tokio::test]
async fn a_name_mismatch_is_a_502_and_server_name_fixes_it() {
    let pki = Pki::new();
    let upstream = https_upstream(&pki, &["api.internal"], &[b"http/1.1"]).await;
    let cfg = config(None, &route(&upstream.url(), &ca(&pki), ""));
    assert_refused(&cfg, &upstream, "upstream-tls-name-mismatch").await;
    let tls = format!("{}, server_name = \"api.internal\"", ca(&pki));
    let cfg = config(None, &route(&upstream.url(), &tls, ""));
    let fleet = start(1, &cfg).await;
    let resp = Client::new().get(&url(&fleet[0], "/named"), &[]).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(upstream.calls_for("/named"), 1);
}

#[tokio::test]
async fn an_expired_certificate_is_a_502() {
    let pki = Pki::new();
    let leaf = pki.expired_server(&["127.0.0.1"]);
    let upstream = Upstream::start_tls(pki.server_config(&leaf, &[b"http/1.1"], None)).await;
    let cfg = config(None, &route(&upstream.url(), &ca(&pki), ""));
    assert_refused(&cfg, &upstream, "upstream-tls-expired").await;
}

#[tokio::test]
async fn a_silent_peer_is_a_handshake_timeout_not_a_hang() {
    // Accepts connections and never says a word.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let held = Arc::new(tokio::sync::Mutex::new(Vec::new()));
    let keep = held.clone();
    let silent = tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            keep.lock().await.push(conn);
        }
    });
    let pki = Pki::new();
    let tls = format!("{}, handshake_timeout = \"200ms\"", ca(&pki));
    let cfg = config(
        None,
        &route(
            &format!("https://{addr}"),
            &tls,
            "upstream_timeout = \"20s\"",
        ),
    );
    let fleet = start(1, &cfg).await;
    let resp = Client::new().get(&url(&fleet[0], "/silent"), &[]).await;
    assert_eq!(resp.status, 502, "{}", resp.text());
    assert_eq!(resp.header("corral-error"), Some("upstream-tls-timeout"));
    silent.abort();
}

#[tokio::test]
async fn mtls_sends_the_client_certificate_the_upstream_requires() {
    let pki = Pki::new();
    let clients = Pki::new();
    let leaf = pki.server(&["127.0.0.1"]);
    let config_with_clients = pki.server_config(&leaf, &[b"h2", b"http/1.1"], Some(&clients));
    let upstream = Upstream::start_tls(config_with_clients).await;
    // Without a client certificate the upstream ends the handshake.
    let cfg = config(None, &route(&upstream.url(), &ca(&pki), ""));
    let fleet = start(1, &cfg).await;
    let resp = Client::new().get(&url(&fleet[0], "/mtls"), &[]).await;
    assert_eq!(resp.status, 502, "{}", resp.text());
    assert!(
        resp.header("corral-error")
            .is_some_and(|k| k.starts_with("upstream")),
        "{:?}",
        resp.headers
    );
    assert_eq!(upstream.calls(), 0);
    // With one signed by the CA it trusts, the call goes through.
    let me = clients.client("corral");
    let tls = format!(
        "{}, client_cert_file = \"{}\", client_key_file = \"{}\"",
        ca(&pki),
        me.cert.display(),
        me.key.display()
    );
    let cfg = config(None, &route(&upstream.url(), &tls, ""));
    let fleet = start(1, &cfg).await;
    let resp = Client::new().get(&url(&fleet[0], "/mtls"), &[]).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(upstream.calls_for("/mtls"), 1);
}

/// The `corral_upstream_tls_handshakes_total` value on an instance's metrics page.
async fn handshakes(instance: &corral::Instance) -> u64 {
    let page = instance.proxy().render_metrics().await;
    page.lines()
        .filter(|l| l.starts_with("corral_upstream_tls_handshakes_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test]
async fn pooled_tls_connections_are_reused_over_1000_requests() {
    let pki = Pki::new();
    let both: [&[u8]; 2] = [b"h2", b"http/1.1"];
    let http1: [&[u8]; 1] = [b"http/1.1"];
    for alpn in [&both[..], &http1[..]] {
        let upstream = https_upstream(&pki, &["127.0.0.1"], alpn).await;
        // `cache = false`: every request reaches the upstream.
        let cfg = config(None, &route(&upstream.url(), &ca(&pki), "cache = false"));
        let fleet = start(1, &cfg).await;
        let client = Client::new();
        for i in 0..1000 {
            let resp = client
                .get(&url(&fleet[0], &format!("/seq?i={i}")), &[])
                .await;
            assert_eq!(resp.status, 200, "request {i}: {}", resp.text());
        }
        assert_eq!(upstream.calls(), 1000);
        let made = handshakes(&fleet[0]).await;
        assert!(made >= 1, "{alpn:?}: counted");
        assert!(
            made <= 3,
            "{alpn:?}: {made} handshakes for 1000 sequential requests"
        );
        assert_eq!(made, upstream.connections() as u64, "{alpn:?}");
    }
}
