//! Certificate material read from PEM files, shared by every TLS side of Corral: the roots a route
//! trusts ([`Roots`]), a client or server certificate with its key ([`Identity`]), and the
//! system's roots, read once. Each is read and checked when the configuration is validated, so a
//! missing file, a file without a certificate or a key that does not match its certificate is a
//! config error naming the file — and never quoting it: a key file's contents are a secret, and a
//! message says only what was expected and where.
//!
//! One crypto provider (rustls' `ring`) serves the whole process; [`provider`] is the one place
//! that names it.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Why a TLS file could not be used. Messages name the file and what was expected in it; they
/// never quote its contents.
#[derive(Debug, thiserror::Error)]
pub enum TlsFileError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} holds no PEM certificate (expected -----BEGIN CERTIFICATE-----)", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{} holds no usable PEM private key (expected PKCS#8, PKCS#1 or SEC1; its contents are not shown)", path.display())]
    NoKey { path: PathBuf },
    #[error("the key in {} is not a kind rustls can sign with (RSA, ECDSA P-256/P-384, Ed25519)", path.display())]
    UnsupportedKey { path: PathBuf },
    #[error("the key in {} does not belong to the certificate in {}", key.display(), cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("{} holds a certificate rustls cannot use as a root: {reason}", path.display())]
    BadRoot { path: PathBuf, reason: String },
}

/// The process's one crypto provider.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            // Parts of the redis crate build their rustls configs from the process default.
            let _ = rustls::crypto::ring::default_provider().install_default();
            Arc::new(rustls::crypto::ring::default_provider())
        })
        .clone()
}

/// A file's bytes, kept for the clients that want PEM (redis-rs) beside the parsed form.
fn read(path: &Path) -> Result<Vec<u8>, TlsFileError> {
    std::fs::read(path).map_err(|source| TlsFileError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Every certificate in a PEM file; at least one.
fn certificates(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsFileError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsFileError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// Certificates to trust instead of the system's (`ca_file`).
#[derive(Clone)]
pub struct Roots {
    pub path: PathBuf,
    pub pem: Vec<u8>,
    pub store: Arc<RootCertStore>,
}

impl Roots {
    pub fn load(path: &Path) -> Result<Roots, TlsFileError> {
        let pem = read(path)?;
        let mut store = RootCertStore::empty();
        for cert in certificates(path, &pem)? {
            store.add(cert).map_err(|err| TlsFileError::BadRoot {
                path: path.to_path_buf(),
                reason: err.to_string(),
            })?;
        }
        Ok(Roots {
            path: path.to_path_buf(),
            pem,
            store: Arc::new(store),
        })
    }

    /// The system's roots (`/etc/ssl/certs` and the like, as `rustls-native-certs` finds them),
    /// read once per process; empty when none are found (then only a route's `ca_file` can
    /// verify anything, and the failure says "unknown issuer").
    pub fn system() -> Arc<RootCertStore> {
        static SYSTEM: OnceLock<Arc<RootCertStore>> = OnceLock::new();
        SYSTEM
            .get_or_init(|| {
                let found = rustls_native_certs::load_native_certs();
                for err in &found.errors {
                    tracing::warn!(%err, "reading the system's TLS roots");
                }
                let mut store = RootCertStore::empty();
                let (added, ignored) = store.add_parsable_certificates(found.certs);
                if ignored > 0 {
                    tracing::debug!(added, ignored, "system TLS roots that rustls cannot use");
                }
                Arc::new(store)
            })
            .clone()
    }
}

impl fmt::Debug for Roots {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Roots({})", self.path.display())
    }
}

/// A certificate chain and its private key (a client certificate for mTLS, or the listener's).
/// `Debug` shows the paths only.
#[derive(Clone)]
pub struct Identity {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub cert_pem: Vec<u8>,
    /// The key file as read: sent to redis-rs, which takes PEM. Never shown.
    pub key_pem: Vec<u8>,
    pub certified: Arc<CertifiedKey>,
}

impl Identity {
    /// Reads both files and checks that the key signs for the certificate.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Identity, TlsFileError> {
        let cert_pem = read(cert_path)?;
        let chain = certificates(cert_path, &cert_pem)?;
        let key_pem = read(key_path)?;
        let no_key = || TlsFileError::NoKey {
            path: key_path.to_path_buf(),
        };
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| no_key())?;
        let signer = provider().key_provider.load_private_key(key).map_err(|_| {
            TlsFileError::UnsupportedKey {
                path: key_path.to_path_buf(),
            }
        })?;
        let certified = CertifiedKey::new(chain, signer);
        certified
            .keys_match()
            .map_err(|_| TlsFileError::KeyMismatch {
                cert: cert_path.to_path_buf(),
                key: key_path.to_path_buf(),
            })?;
        Ok(Identity {
            cert_path: cert_path.to_path_buf(),
            key_path: key_path.to_path_buf(),
            cert_pem,
            key_pem,
            certified: Arc::new(certified),
        })
    }

    /// The chain and a copy of the key, for a rustls client config.
    pub fn chain_and_key(&self) -> Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
        let key = PrivateKeyDer::from_pem_slice(&self.key_pem).ok()?;
        Some((self.certified.cert.clone(), key))
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Identity(cert {}, key {})",
            self.cert_path.display(),
            self.key_path.display()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_file_without_a_key_is_refused_without_quoting_it() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let key = dir.path().join("key.pem");
        let cert = dir.path().join("cert.pem");
        let write =
            |p: &Path, text: &str| std::fs::write(p, text).unwrap_or_else(|e| panic!("{e}"));
        write(&key, "TOPSECRET-KEY-MATERIAL\n");
        write(&cert, "not a certificate either\n");
        let err = match Identity::load(&cert, &key) {
            Ok(_) => panic!("garbage accepted"),
            Err(err) => err.to_string(),
        };
        assert!(err.contains("cert.pem"), "{err}");
        let err = match Roots::load(&key) {
            Ok(_) => panic!("garbage accepted"),
            Err(err) => err.to_string(),
        };
        assert!(!err.contains("TOPSECRET"), "{err}");
        assert!(matches!(
            Roots::load(&dir.path().join("missing.pem")),
            Err(TlsFileError::Read { .. })
        ));
    }
}
