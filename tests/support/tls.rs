//! Certificates made at test time with `rcgen`: a [`Pki`] is a private CA in a tempdir, which
//! issues server certificates (for a name, expired, or for the wrong name) and client
//! certificates, each written as PEM files that a Corral config or a `redis-server` can name,
//! and turned into rustls configs for the in-process servers ([`super::Upstream::start_tls`]).
//! Another [`Pki`] is another, unknown, authority. Dropping it removes the files.

use std::path::PathBuf;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tempfile::TempDir;

/// A private certificate authority and the files it wrote.
pub struct Pki {
    dir: TempDir,
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
    issued: std::sync::atomic::AtomicUsize,
}

/// A certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct Leaf {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Leaf {
    /// The certificate chain and key, for a rustls config.
    pub fn material(&self) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let certs = CertificateDer::pem_file_iter(&self.cert)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .unwrap_or_else(|e| panic!("read {}: {e}", self.cert.display()));
        let key = PrivateKeyDer::from_pem_file(&self.key)
            .unwrap_or_else(|e| panic!("read {}: {e}", self.key.display()));
        (certs, key)
    }
}

impl Pki {
    /// A new CA, its certificate written to [`Pki::ca_file`].
    pub fn new() -> Pki {
        let provider = rustls::crypto::ring::default_provider();
        let _ = provider.install_default();
        let dir = tempfile::Builder::new()
            .prefix("corral-pki-")
            .tempdir()
            .expect("create a tempdir for certificates");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("empty SANs");
        params.distinguished_name.push(
            DnType::CommonName,
            format!("corral test CA {}", rand_suffix()),
        );
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("generate the CA key");
        let cert = params.self_signed(&key).expect("self-sign the CA");
        let ca_pem = cert.pem();
        std::fs::write(dir.path().join("ca.pem"), &ca_pem).expect("write ca.pem");
        Pki {
            dir,
            issuer: Issuer::new(params, key),
            ca_pem,
            issued: Default::default(),
        }
    }

    /// The CA certificate (PEM), for `ca_file`.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The directory the files are in.
    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// A server certificate for `names` (DNS names or IP addresses), valid now.
    pub fn server(&self, names: &[&str]) -> Leaf {
        self.issue(names, ExtendedKeyUsagePurpose::ServerAuth, false)
    }

    /// A server certificate for `names` that expired in 2020.
    pub fn expired_server(&self, names: &[&str]) -> Leaf {
        self.issue(names, ExtendedKeyUsagePurpose::ServerAuth, true)
    }

    /// A client certificate (for mTLS) named `name`.
    pub fn client(&self, name: &str) -> Leaf {
        self.issue(&[name], ExtendedKeyUsagePurpose::ClientAuth, false)
    }

    fn issue(&self, names: &[&str], usage: ExtendedKeyUsagePurpose, expired: bool) -> Leaf {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names.clone()).expect("valid SANs");
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        params.extended_key_usages = vec![usage];
        if expired {
            params.not_before = rcgen::date_time_ymd(2019, 1, 1);
            params.not_after = rcgen::date_time_ymd(2020, 1, 1);
        }
        let key = KeyPair::generate().expect("generate a key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        let n = self
            .issued
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let leaf = Leaf {
            cert: self.dir.path().join(format!("leaf{n}.pem")),
            key: self.dir.path().join(format!("leaf{n}.key")),
        };
        std::fs::write(&leaf.cert, cert.pem()).expect("write a certificate");
        std::fs::write(&leaf.key, key.serialize_pem()).expect("write a key");
        leaf
    }

    /// A rustls server config presenting `leaf`, offering `alpn` (e.g. `[b"h2", b"http/1.1"]`),
    /// and, with `clients`, requiring a client certificate signed by that CA.
    pub fn server_config(
        &self,
        leaf: &Leaf,
        alpn: &[&[u8]],
        clients: Option<&Pki>,
    ) -> Arc<rustls::ServerConfig> {
        let (chain, key) = leaf.material();
        let builder = rustls::ServerConfig::builder();
        let builder = match clients {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                let der = CertificateDer::from_pem_slice(ca.ca_pem.as_bytes()).expect("CA PEM");
                roots.add(der).expect("add the client CA");
                let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
                    .build()
                    .expect("a client verifier");
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder
            .with_single_cert(chain, key)
            .expect("a server certificate rustls accepts");
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}

/// Tells the CAs of one test apart by name, as two real authorities are.
fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}
