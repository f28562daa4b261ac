//! Redis over TLS: `rediss://` URLs, verified against the system's roots or `[redis] tls.ca_file`,
//! with an optional client certificate (`client_cert_file`, `client_key_file`). Every client
//! Corral opens to a Redis node — the command connection, the pub/sub hub, a cluster's nodes —
//! is built here, so each one gets the same trust and identity.

use redis::{
    Client, ClientTlsConfig, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, RedisResult,
    TlsCertificates,
};

use crate::config::RedisTls;

/// What redis-rs takes: the PEM bytes that validation read and checked.
pub(crate) fn certificates(tls: &RedisTls) -> TlsCertificates {
    // Installs the process's rustls provider, which redis-rs' configs use.
    let _ = crate::tls::provider();
    TlsCertificates {
        client_tls: tls.identity.as_ref().map(|id| ClientTlsConfig {
            client_cert: id.cert_pem.clone(),
            client_key: id.key_pem.clone(),
        }),
        root_cert: tls.roots.as_ref().map(|r| r.pem.clone()),
    }
}

/// A client for one node: over TLS with `tls`'s material when the URL is `rediss://` and the
/// config has a `tls` table; as redis-rs opens it otherwise (`rediss://` then trusts the system's
/// roots).
pub(crate) fn client(url: &str, tls: Option<&RedisTls>) -> RedisResult<Client> {
    client_for(url.into_connection_info()?, tls)
}

/// [`client`] for a node's connection info (a URL with settings changed, e.g. RESP3).
pub(crate) fn client_for(info: ConnectionInfo, tls: Option<&RedisTls>) -> RedisResult<Client> {
    let _ = crate::tls::provider();
    match tls {
        Some(tls) if matches!(info.addr(), ConnectionAddr::TcpTls { .. }) => {
            Client::build_with_tls(info, certificates(tls))
        }
        _ => Client::open(info),
    }
}
