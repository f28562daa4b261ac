//! The validated `tls` tables: a route's upstream, `[redis]` and the proxy listener. Their files
//! are read and checked during validation (see [`crate::tls`]), so a running Corral never finds
//! out at its first connection that a certificate is missing.

use std::time::Duration;

use crate::tls::{Identity, Roots};

/// `tls = { ca_file, server_name, client_cert_file, client_key_file, handshake_timeout }` on a
/// route with an `https://` upstream. Every field is optional; without the table an `https://`
/// upstream is verified against the system's roots under its own host name.
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    /// Replaces the system's roots for this route.
    pub roots: Option<Roots>,
    /// The name sent as SNI and verified in the certificate, instead of the upstream's host.
    pub server_name: Option<String>,
    /// The client certificate (mTLS): `client_cert_file` and `client_key_file`, both or neither.
    pub identity: Option<Identity>,
    /// Bound on connecting and the handshake together. Default 5s; never zero.
    pub handshake_timeout: Duration,
}

impl UpstreamTls {
    /// What identifies the material in use, so a reload rebuilds a route's connections only when
    /// a file's contents or a setting changed.
    pub fn fingerprint(&self) -> [u8; 32] {
        let mut hasher = blake3::Hasher::new();
        let mut part = |bytes: &[u8]| {
            hasher.update(&(bytes.len() as u64).to_le_bytes());
            hasher.update(bytes);
        };
        part(self.roots.as_ref().map_or(&[][..], |r| &r.pem));
        part(self.server_name.as_deref().unwrap_or("").as_bytes());
        part(self.identity.as_ref().map_or(&[][..], |i| &i.cert_pem));
        part(self.identity.as_ref().map_or(&[][..], |i| &i.key_pem));
        part(&self.handshake_timeout.as_nanos().to_le_bytes());
        *hasher.finalize().as_bytes()
    }
}

/// `[redis] tls = { ca_file, client_cert_file, client_key_file }`: used by every `rediss://`
/// connection (single node, cluster nodes, sentinels and the master they name).
#[derive(Debug, Clone)]
pub struct RedisTls {
    pub roots: Option<Roots>,
    pub identity: Option<Identity>,
}

impl RedisTls {
    /// What identifies the material (file contents), to tell a reload that changed it.
    pub fn fingerprint(&self) -> [u8; 32] {
        let mut hasher = blake3::Hasher::new();
        for bytes in [
            self.roots.as_ref().map_or(&[][..], |r| &r.pem),
            self.identity.as_ref().map_or(&[][..], |i| &i.cert_pem),
            self.identity.as_ref().map_or(&[][..], |i| &i.key_pem),
        ] {
            hasher.update(&(bytes.len() as u64).to_le_bytes());
            hasher.update(bytes);
        }
        *hasher.finalize().as_bytes()
    }
}

/// `[server] tls = { cert_file, key_file }`: the proxy listener speaks TLS (HTTP/1.1 and HTTP/2
/// by ALPN). A reload reads the files again: new connections get the new certificate, open ones
/// keep theirs.
#[derive(Debug, Clone)]
pub struct ListenerTls {
    pub identity: Identity,
}

pub(crate) const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
