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
        self.issue(names, &[ExtendedKeyUsagePurpose::ServerAuth], false)
    }

    /// A server certificate for `names` that expired in 2020.
    pub fn expired_server(&self, names: &[&str]) -> Leaf {
        self.issue(names, &[ExtendedKeyUsagePurpose::ServerAuth], true)
    }

    /// A client certificate (for mTLS) named `name`.
    pub fn client(&self, name: &str) -> Leaf {
        self.issue(&[name], &[ExtendedKeyUsagePurpose::ClientAuth], false)
    }

    /// A certificate for a Redis node that is a server and a client at once: replicas, sentinels
    /// and cluster nodes connect to each other with it (`tls-replication`, `tls-cluster`), so
    /// it carries both `serverAuth` and `clientAuth`.
    pub fn node(&self, names: &[&str]) -> Leaf {
        let usages = [
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        self.issue(names, &usages, false)
    }

    fn issue(&self, names: &[&str], usages: &[ExtendedKeyUsagePurpose], expired: bool) -> Leaf {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names.clone()).expect("valid SANs");
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        params.extended_key_usages = usages.to_vec();
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

/// What a deployment of Redis processes that speak TLS only (client port, replication, the
/// sentinels' links, a cluster's bus) is given: one node certificate for `127.0.0.1` (server and
/// client at once, see [`Pki::node`]), the CA, a client certificate for the fixture's own probes
/// and one for Corral. Every client must present a certificate (`tls-auth-clients yes`).
#[derive(Clone)]
pub struct NodeTls {
    pub node: Leaf,
    pub ca: PathBuf,
    pub fixture: Leaf,
    pub corral: Leaf,
}

impl NodeTls {
    /// Material issued by `pki`.
    pub fn new(pki: &Pki) -> NodeTls {
        NodeTls {
            node: pki.node(&["127.0.0.1", "localhost"]),
            ca: pki.ca_file(),
            fixture: pki.client("fixture"),
            corral: pki.client("corral"),
        }
    }

    /// The settings every process gets, as `(name, value)`: for `--name value` arguments or the
    /// lines of a config file. Replication and the sentinels' links to the servers go over TLS
    /// (`tls-replication`); `tls-port` is the caller's.
    pub fn settings(&self) -> Vec<(&'static str, String)> {
        let path = |p: &std::path::Path| p.display().to_string();
        vec![
            ("tls-cert-file", path(&self.node.cert)),
            ("tls-key-file", path(&self.node.key)),
            ("tls-ca-cert-file", path(&self.ca)),
            ("tls-auth-clients", "yes".to_owned()),
            ("tls-replication", "yes".to_owned()),
        ]
    }

    /// [`NodeTls::settings`] as `redis-server` arguments.
    pub fn args(&self) -> Vec<String> {
        self.settings()
            .into_iter()
            .flat_map(|(name, value)| [format!("--{name}"), value])
            .collect()
    }

    /// The `redis-cli` arguments that connect as the fixture.
    pub fn cli_args(&self) -> Vec<String> {
        let path = |p: &std::path::Path| p.display().to_string();
        vec![
            "--tls".to_owned(),
            "--cacert".to_owned(),
            path(&self.ca),
            "--cert".to_owned(),
            path(&self.fixture.cert),
            "--key".to_owned(),
            path(&self.fixture.key),
        ]
    }

    /// The fixture's material for a redis-rs client (a cluster client, say).
    pub fn certificates(&self) -> ::redis::TlsCertificates {
        let read = |p: &std::path::Path| {
            std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
        };
        ::redis::TlsCertificates {
            client_tls: Some(::redis::ClientTlsConfig {
                client_cert: read(&self.fixture.cert),
                client_key: read(&self.fixture.key),
            }),
            root_cert: Some(read(&self.ca)),
        }
    }

    /// A client for the process on `port`, presenting the fixture's certificate.
    pub fn client(&self, port: u16) -> ::redis::Client {
        super::redis::tls_client(port, &self.ca, &self.fixture)
    }

    /// The `tls = { .. }` line of a Corral `[redis]` table: trusting the CA, presenting Corral's
    /// own client certificate.
    pub fn corral_table(&self) -> String {
        format!(
            "tls = {{ ca_file = \"{}\", client_cert_file = \"{}\", client_key_file = \"{}\" }}\n",
            self.ca.display(),
            self.corral.cert.display(),
            self.corral.key.display()
        )
    }
}
