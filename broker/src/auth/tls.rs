//! TLS of the listener (rustls with the ring provider; no OpenSSL), and
//! the client side of members' connections to each other.
//!
//! The handshake runs in the server's own accept path (`server.rs`), not
//! in tonic's, so that `handshake_timeout_ms` and
//! `max_handshaking_connections` bound it like the HTTP/2 preface.

use std::path::Path;
use std::sync::Arc;

use tokio_rustls::rustls::{
    self,
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
};

use super::config::TlsConfig;
use crate::config::ConfigError;

fn bad(key: &str, reason: String) -> ConfigError {
    ConfigError {
        key: key.into(),
        reason,
    }
}

fn certs(key: &str, p: &Path) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let v: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(p)
        .map_err(|e| bad(key, format!("{}: {e}", p.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad(key, format!("{}: {e}", p.display())))?;
    if v.is_empty() {
        return Err(bad(
            key,
            format!("{}: no PEM certificate in it", p.display()),
        ));
    }
    Ok(v)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The acceptor of `cfg` (certificate, key, and with `client_ca` the
/// verifier of client certificates); ALPN `h2`.
///
/// # Errors
/// [`ConfigError`] naming the file and what is wrong with it.
pub fn acceptor(cfg: &TlsConfig) -> Result<tokio_rustls::TlsAcceptor, ConfigError> {
    let chain = certs("tls.cert", &cfg.cert)?;
    let key = PrivateKeyDer::from_pem_file(&cfg.key)
        .map_err(|e| bad("tls.key", format!("{}: {e}", cfg.key.display())))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("tls", e.to_string()))?;
    let builder = if cfg.client_ca.as_os_str().is_empty() {
        builder.with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        for c in certs("tls.client_ca", &cfg.client_ca)? {
            roots
                .add(c)
                .map_err(|e| bad("tls.client_ca", e.to_string()))?;
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .build()
        .map_err(|e| bad("tls.client_ca", e.to_string()))?;
        builder.with_client_cert_verifier(verifier)
    };
    let mut server = builder
        .with_single_cert(chain, key)
        .map_err(|e| bad("tls.key", format!("does not fit the certificate: {e}")))?;
    server.alpn_protocols = vec![b"h2".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(server)))
}

/// The client TLS of a member's connections to the other members: their
/// certificates are checked against `peer_ca`; with `client_ca` set (the
/// others require client certificates), this member presents its own.
///
/// # Errors
/// [`ConfigError`] for a file that cannot be read.
pub fn peer_client(cfg: &TlsConfig) -> Result<tonic::transport::ClientTlsConfig, ConfigError> {
    let read = |key: &str, p: &Path| {
        std::fs::read(p).map_err(|e| bad(key, format!("{}: {e}", p.display())))
    };
    let mut c = tonic::transport::ClientTlsConfig::new().ca_certificate(
        tonic::transport::Certificate::from_pem(read("tls.peer_ca", &cfg.peer_ca)?),
    );
    if !cfg.client_ca.as_os_str().is_empty() {
        c = c.identity(tonic::transport::Identity::from_pem(
            read("tls.cert", &cfg.cert)?,
            read("tls.key", &cfg.key)?,
        ));
    }
    Ok(c)
}
