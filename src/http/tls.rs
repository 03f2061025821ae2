//! TLS for the listener (rustls with the `ring` provider): `server.tls_cert` / `server.tls_key`
//! PEM files, ALPN `h2` and `http/1.1`, TLS 1.2 and 1.3.
//!
//! The certificate is served through a resolver holding the current [`CertifiedKey`], so
//! [`Tls::reload`] (on SIGHUP) swaps it for new handshakes while connections already open carry
//! on with the one they negotiated. A reload that fails (unreadable file, key not matching the
//! certificate) keeps the current certificate and reports why.

use std::path::Path;
use std::sync::{Arc, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::{ConfigError, TlsConfig};

/// The TLS side of the listener.
pub struct Tls {
    paths: TlsConfig,
    resolver: Arc<Resolver>,
    acceptor: TlsAcceptor,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("paths", &self.paths).finish()
    }
}

#[derive(Debug)]
struct Resolver(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.read().ok().map(|k| k.clone())
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads a certificate chain and its private key and checks that they belong together.
fn load(paths: &TlsConfig) -> Result<CertifiedKey, (&'static str, String)> {
    let show = |p: &Path| p.display().to_string();
    let certs = CertificateDer::pem_file_iter(&paths.cert)
        .map_err(|e| ("server.tls_cert", format!("{}: {e}", show(&paths.cert))))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ("server.tls_cert", format!("{}: {e}", show(&paths.cert))))?;
    if certs.is_empty() {
        return Err((
            "server.tls_cert",
            format!("{}: no CERTIFICATE in the file", show(&paths.cert)),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&paths.key)
        .map_err(|e| ("server.tls_key", format!("{}: {e}", show(&paths.key))))?;
    CertifiedKey::from_der(certs, key, &provider()).map_err(|e| {
        (
            "server.tls_key",
            format!(
                "{} does not fit the certificate in {}: {e}",
                show(&paths.key),
                show(&paths.cert)
            ),
        )
    })
}

impl Tls {
    /// Loads `server.tls_cert` / `server.tls_key`; errors name the key at fault.
    pub fn new(paths: &TlsConfig) -> Result<Arc<Tls>, ConfigError> {
        let key = load(paths).map_err(|(key, message)| ConfigError::Invalid {
            key: key.into(),
            message,
        })?;
        let resolver = Arc::new(Resolver(RwLock::new(Arc::new(key))));
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| ConfigError::Invalid {
                key: "server.tls_cert".into(),
                message: e.to_string(),
            })?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(Tls {
            paths: paths.clone(),
            resolver,
            acceptor: TlsAcceptor::from(Arc::new(config)),
        }))
    }

    /// Re-reads the PEM files; new handshakes use them, open connections are untouched.
    pub fn reload(&self) -> Result<(), String> {
        let key = load(&self.paths).map_err(|(k, m)| format!("{k}: {m}"))?;
        if let Ok(mut current) = self.resolver.0.write() {
            *current = Arc::new(key);
        }
        Ok(())
    }

    /// The handshake side for accepted connections.
    pub fn acceptor(&self) -> TlsAcceptor {
        self.acceptor.clone()
    }
}
