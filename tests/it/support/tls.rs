//! Certificates made by the test: a CA and a server certificate it signs, or a self-signed
//! one; and a tokio-postgres TLS connector that trusts a given CA.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

/// A directory holding `ca.pem`, `server.pem` and `server.key` (and, from [`Pki::new`],
/// `client.pem` and `client.key`).
pub struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// A fresh CA, and a server certificate it signs for `names` (host names or IP addresses).
    pub fn new(names: &[&str]) -> Pki {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        // A name of its own, so two test CAs are told apart by name, as real ones are.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        ca.distinguished_name.push(
            DnType::CommonName,
            format!("bulkhead test CA {} {n}", std::process::id()),
        );
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().unwrap();
        let cert = server_params(names).signed_by(&key, &issuer).unwrap();
        let pki = Pki::write(&ca_cert.pem(), &cert.pem(), &key.serialize_pem());
        // A client certificate for the user postgres, for servers that log in by certificate.
        let client_key = KeyPair::generate().unwrap();
        let mut client = CertificateParams::new(Vec::<String>::new()).unwrap();
        client
            .distinguished_name
            .push(DnType::CommonName, "postgres");
        let client_cert = client.signed_by(&client_key, &issuer).unwrap();
        std::fs::write(pki.client_cert(), client_cert.pem()).unwrap();
        std::fs::write(pki.client_key(), client_key.serialize_pem()).unwrap();
        pki
    }

    /// A certificate for `names` that signs itself; `ca.pem` is that same certificate.
    pub fn self_signed(names: &[&str]) -> Pki {
        let key = KeyPair::generate().unwrap();
        let cert = server_params(names).self_signed(&key).unwrap();
        Pki::write(&cert.pem(), &cert.pem(), &key.serialize_pem())
    }

    fn write(ca: &str, cert: &str, key: &str) -> Pki {
        let dir = tempfile::Builder::new()
            .prefix("bulkhead-pki-")
            .tempdir()
            .unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca).unwrap();
        std::fs::write(dir.path().join("server.pem"), cert).unwrap();
        std::fs::write(dir.path().join("server.key"), key).unwrap();
        Pki { dir }
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    pub fn cert(&self) -> PathBuf {
        self.dir.path().join("server.pem")
    }

    pub fn key(&self) -> PathBuf {
        self.dir.path().join("server.key")
    }

    /// A certificate with CN postgres, signed by the CA (made by [`Pki::new`] only).
    pub fn client_cert(&self) -> PathBuf {
        self.dir.path().join("client.pem")
    }

    pub fn client_key(&self) -> PathBuf {
        self.dir.path().join("client.key")
    }

    /// A tokio-postgres connector that trusts only this CA.
    pub fn connector(&self) -> tokio_postgres_rustls::MakeRustlsConnect {
        let mut roots = rustls::RootCertStore::empty();
        roots.add_parsable_certificates(certs(&self.ca()));
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        tokio_postgres_rustls::MakeRustlsConnect::new(config)
    }
}

fn server_params(names: &[&str]) -> CertificateParams {
    let mut params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(
        DnType::CommonName,
        names.first().copied().unwrap_or("server"),
    );
    params
}

fn certs(path: &Path) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_file_iter(path)
        .unwrap()
        .map(|c| c.unwrap())
        .collect()
}
