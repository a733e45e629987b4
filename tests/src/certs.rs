//! Certificates for TLS tests, generated with rcgen: a CA, a broker
//! certificate it signed (`localhost`, `127.0.0.1`) and a client's.

use std::path::{Path, PathBuf};

/// PEM files of one CA and the certificates it signed.
#[derive(Debug, Clone)]
pub struct Certs {
    /// The CA certificate.
    pub ca: PathBuf,
    /// The broker's certificate.
    pub server_cert: PathBuf,
    /// Its key.
    pub server_key: PathBuf,
    /// A client's certificate (mTLS).
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
}

/// A new CA and its certificates, written under `dir` as `TAG-*.pem`.
///
/// # Panics
/// When generating or writing fails.
pub fn certs(dir: &Path, tag: &str) -> Certs {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
    let leaf = |names: Vec<String>| {
        let key = KeyPair::generate().expect("key");
        let cert = CertificateParams::new(names)
            .expect("params")
            .signed_by(&key, &ca, &ca_key)
            .expect("certificate");
        (cert.pem(), key.serialize_pem())
    };
    let (sc, sk) = leaf(vec!["localhost".into(), "127.0.0.1".into()]);
    let (cc, ck) = leaf(vec!["client".into()]);
    let w = |name: &str, text: &str| {
        let p = dir.join(format!("{tag}-{name}.pem"));
        std::fs::write(&p, text).expect("write PEM");
        p
    };
    Certs {
        ca: w("ca", &ca.pem()),
        server_cert: w("server", &sc),
        server_key: w("server-key", &sk),
        client_cert: w("client", &cc),
        client_key: w("client-key", &ck),
    }
}
