//! TLS on both sides of a session, with rustls (the `ring` provider).
//!
//! Toward servers, [database] tls takes libpq's sslmode values with libpq's meanings:
//! - `disable`: plaintext.
//! - `prefer`: ask for TLS; go on in plaintext if the server declines it, or if the handshake
//!   fails (on a new connection, as libpq does). The certificate is not checked.
//! - `require`: TLS or nothing; the certificate is not checked, unless `ca_file` is set, when
//!   it must chain to that CA (libpq does the same when a root certificate file exists).
//! - `verify-ca`: TLS with a certificate that chains to `ca_file`, or to the system roots.
//! - `verify-full`: as verify-ca, and the certificate must name the host bulkhead dialled.
//!
//! From clients, [listen] tls_cert_file and tls_key_file turn TLS on: SSLRequest is answered
//! 'S' and the session is TLS from the next byte. [listen] tls = "require" refuses plaintext
//! sessions; "disable" answers 'N' even with a certificate configured.
//!
//! Files are read at start and again on SIGHUP ([`Current`]). A session's bytes pass through [`Stream`], which is a plain
//! socket or a TLS one; the relay does not know which.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::config::{Config, ListenTls, ServerTls};

/// The ALPN protocol name PostgreSQL 17 registers; harmless to older servers.
const ALPN: &[u8] = b"postgresql";

/// The most data bulkhead puts in one TLS record toward a client: PostgreSQL's own limit.
const MAX_RECORD_DATA: usize = 8192;

/// One side of a session: a plain socket or a TLS session over one.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::TlsStream<TcpStream>>),
    /// A plain socket on a relay loop (`crate::evloop`): a passthrough session's, once relayed.
    /// Boxed: it is bigger than the others, and pools move streams around.
    Looped(Box<crate::evloop::Socket>),
}

impl Stream {
    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        match self {
            Stream::Plain(s) => s.as_fd(),
            Stream::Tls(s) => s.get_ref().0.as_fd(),
            Stream::Looped(s) => s.tcp().as_fd(),
        }
    }

    /// For the relay loop: the plain socket taken off tokio's reactor, to be attached to the
    /// loop (`Stream::attach`) on the loop's thread. A TLS stream is returned as it is.
    pub fn into_looped(self) -> io::Result<Stream> {
        match self {
            Stream::Plain(s) => Ok(Stream::Looped(Box::new(crate::evloop::Socket::new(
                s.into_std()?,
            )))),
            other => Ok(other),
        }
    }

    /// Registers a looped socket with this thread's relay loop (others need nothing).
    pub fn attach(&mut self) -> io::Result<()> {
        match self {
            Stream::Looped(s) => s.attach(),
            _ => Ok(()),
        }
    }

    /// Whether reading may find something: a plain socket is peeked at (so that an idle
    /// session needs no read buffer until its client speaks; readiness alone can be stale
    /// after the login's exact reads); a TLS one may have decrypted data buffered already, so
    /// it is always worth a read.
    pub fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Stream::Plain(s) => {
                let mut byte = [0u8; 1];
                let mut peek = ReadBuf::new(&mut byte);
                s.poll_peek(cx, &mut peek).map_ok(|_| ())
            }
            Stream::Tls(_) => Poll::Ready(Ok(())),
            Stream::Looped(s) => s.poll_peek(cx),
        }
    }

    /// Whether the last read took everything there was and the socket will wake the reader
    /// when more comes (known only on a relay loop; elsewhere `false`: read again to see).
    #[inline]
    pub fn read_dry(&self) -> bool {
        matches!(self, Stream::Looped(s) if s.read_dry())
    }

    /// Whether a connection that should be quiet (idle in a pool) still is: nothing to read and
    /// not closed. A server only speaks to an idle connection to end it (FATAL 57P01 from
    /// `pg_terminate_backend`, a shutdown, `idle_session_timeout`) or when it is gone. Costs no
    /// system call while the socket has not been reported readable; what it reads (only from a
    /// connection it then calls not quiet) is lost, so the connection must be closed.
    pub fn still_quiet(&self) -> bool {
        let mut byte = 0u8;
        // SAFETY: one byte of writable memory; the socket is non-blocking.
        let n = unsafe {
            libc::recv(
                std::os::fd::AsRawFd::as_raw_fd(&self.fd()),
                (&mut byte as *mut u8).cast(),
                1,
                libc::MSG_DONTWAIT,
            )
        };
        n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock
    }

    /// The certificate the peer presented, on a TLS connection bulkhead made (toward a server).
    pub fn server_certificate(&self) -> Option<&[u8]> {
        match self {
            Stream::Tls(s) => match s.as_ref() {
                tokio_rustls::TlsStream::Client(c) => c
                    .get_ref()
                    .1
                    .peer_certificates()?
                    .first()
                    .map(|c| c.as_ref()),
                tokio_rustls::TlsStream::Server(_) => None,
            },
            Stream::Plain(_) | Stream::Looped(_) => None,
        }
    }

    pub fn peer_addr(&self) -> io::Result<std::net::SocketAddr> {
        match self {
            Stream::Plain(s) => s.peer_addr(),
            Stream::Tls(s) => s.get_ref().0.peer_addr(),
            Stream::Looped(s) => s.tcp().peer_addr(),
        }
    }

    /// Makes the coming close abortive (SO_LINGER 0: a reset, and whatever bulkhead sent that
    /// the peer has not acknowledged is dropped). For giving up on a server: a COMMIT still in
    /// the kernel's send queue would otherwise be retransmitted after a network heals and
    /// commit long after its client was told its fate is unknown.
    pub fn close_abortively(&self) {
        crate::upstream::set_linger_zero(self.fd());
    }
}

impl fmt::Debug for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.is_tls() { "Tls" } else { "Plain" };
        f.debug_tuple(kind).field(&self.peer_addr().ok()).finish()
    }
}

impl AsyncRead for Stream {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::Looped(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    #[inline(always)]
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Looped(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    /// Only TLS buffers what it is given; a plain socket's flush is nothing, and the relay
    /// flushes after every write, so that case must cost no call.
    #[inline(always)]
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tls(s) => flush_tls(s, cx),
            Stream::Plain(_) | Stream::Looped(_) => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::Looped(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[inline(never)]
fn flush_tls(
    s: &mut tokio_rustls::TlsStream<TcpStream>,
    cx: &mut Context<'_>,
) -> Poll<io::Result<()>> {
    Pin::new(s).poll_flush(cx)
}

/// The TLS settings of one proxy, loaded from the files the configuration names.
pub struct Tls {
    /// For clients: what [listen] tls says, and the acceptor when a certificate is configured
    /// and tls is not "disable".
    pub listen: ListenTls,
    acceptor: Option<TlsAcceptor>,
    /// The certificate the acceptor presents (the first of its chain).
    listen_cert: Option<CertificateDer<'static>>,
    /// Its SCRAM channel binding data (tls-server-end-point), worked out once.
    listen_binding: Option<Vec<u8>>,
    /// Toward servers: the mode, and the connector for every mode but "disable".
    pub server: ServerTls,
    connector: Option<TlsConnector>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("listen", &self.listen)
            .field("accepts_tls", &self.acceptor.is_some())
            .field("server", &self.server)
            .finish()
    }
}

impl Tls {
    /// Reads the certificate and key files `config` names. The error names the key and file.
    pub fn load(config: &Config) -> Result<Tls, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let listen = &config.listen;
        let mut listen_cert = None;
        let acceptor = if listen.tls_cert_file.is_empty() || listen.tls == ListenTls::Disable {
            None
        } else {
            let certs = read_certs("listen.tls_cert_file", &listen.tls_cert_file)?;
            listen_cert = certs.first().cloned();
            let key = read_key("listen.tls_key_file", &listen.tls_key_file)?;
            let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .map_err(|e| {
                    format!("listen.tls_cert_file and listen.tls_key_file do not match: {e}")
                })?;
            server.alpn_protocols = vec![ALPN.to_vec()];
            // Records of at most 8 KiB of data, as PostgreSQL writes (its send buffer):
            // libpq reads into 8 KiB of free buffer, so a 16 KiB record leaves decrypted
            // bytes inside OpenSSL where a client that waits on the socket (psycopg, any
            // libpq async-API user) never looks, and its query hangs. rustls counts the
            // 5-byte record header in this size.
            server.max_fragment_size = Some(MAX_RECORD_DATA + 5);
            Some(TlsAcceptor::from(Arc::new(server)))
        };
        let db = &config.database;
        let connector = if db.tls == ServerTls::Disable {
            None
        } else {
            let verifier: Arc<dyn ServerCertVerifier> = match db.tls {
                ServerTls::Prefer => Arc::new(Lenient::any(&provider)),
                ServerTls::Require if db.ca_file.is_empty() => Arc::new(Lenient::any(&provider)),
                mode => {
                    let roots = Arc::new(roots(&db.ca_file)?);
                    let webpki =
                        WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                            .build()
                            .map_err(|e| format!("database.ca_file: {e}"))?;
                    if mode == ServerTls::VerifyFull {
                        webpki
                    } else {
                        Arc::new(Lenient::any_name(&provider, webpki))
                    }
                }
            };
            let builder = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .dangerous()
                .with_custom_certificate_verifier(verifier);
            let mut client = match (db.cert_file.is_empty(), db.key_file.is_empty()) {
                (true, true) => builder.with_no_client_auth(),
                (false, false) => builder
                    .with_client_auth_cert(
                        read_certs("database.cert_file", &db.cert_file)?,
                        read_key("database.key_file", &db.key_file)?,
                    )
                    .map_err(|e| {
                        format!("database.cert_file and database.key_file do not match: {e}")
                    })?,
                _ => return Err("database.cert_file and database.key_file go together".into()),
            };
            client.alpn_protocols = vec![ALPN.to_vec()];
            Some(TlsConnector::from(Arc::new(client)))
        };
        Ok(Tls {
            listen: listen.tls,
            acceptor,
            listen_binding: listen_cert
                .as_ref()
                .map(|c| crate::auth::scram::server_end_point(c.as_ref())),
            listen_cert,
            server: db.tls,
            connector,
        })
    }

    /// The acceptor, when SSLRequest is to be answered 'S'.
    pub fn acceptor(&self) -> Option<&TlsAcceptor> {
        self.acceptor.as_ref()
    }

    /// Whether the listener presents exactly this certificate (DER). When a server presents the
    /// same one, SCRAM channel binding (tls-server-end-point: a hash of the server's
    /// certificate) computes the same on both of bulkhead's TLS sessions, and can pass through.
    pub fn presents(&self, certificate: &[u8]) -> bool {
        self.listen_cert
            .as_ref()
            .is_some_and(|c| c.as_ref() == certificate)
    }

    /// The SCRAM channel binding data (tls-server-end-point) of the certificate the listener
    /// presents, if it accepts TLS.
    pub fn listen_binding(&self) -> Option<&[u8]> {
        self.listen_binding.as_deref()
    }

    /// The connector, unless [database] tls is "disable".
    pub fn connector(&self) -> Option<&TlsConnector> {
        self.connector.as_ref()
    }
}

/// The TLS settings in force. SIGHUP loads them again, so certificates rotated in place (by
/// cert-manager, a Vault agent, …) are picked up without a restart. Read once per connection,
/// never on the relay path.
#[derive(Debug)]
pub struct Current(Mutex<Arc<Tls>>);

impl Current {
    pub fn new(tls: Tls) -> Self {
        Current(Mutex::new(Arc::new(tls)))
    }

    pub fn get(&self) -> Arc<Tls> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// New connections use `tls` from now on; those already set up keep theirs.
    pub fn replace(&self, tls: Tls) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(tls);
    }
}

/// The server name to check a certificate against: the host part of `host:port`.
pub fn server_name(address: &str) -> Result<ServerName<'static>, String> {
    let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string())
        .map_err(|_| format!("{host:?} is not a valid host name for TLS"))
}

/// Says what went wrong in a TLS handshake in words an operator can act on.
pub fn describe_handshake_error(e: &io::Error, name: &ServerName<'_>) -> String {
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return format!("TLS handshake failed: {e}");
    };
    match tls {
        // BadSignature: an issuer of the same name is trusted, but it did not sign this.
        #[allow(deprecated)]
        rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        ) => "the server's certificate is not signed by a trusted CA (database.ca_file)".into(),
        rustls::Error::InvalidCertificate(
            c @ (CertificateError::NotValidForName
            | CertificateError::NotValidForNameContext { .. }),
        ) => format!(
            "the server's certificate does not match host {:?}: {c}",
            name.to_str()
        ),
        rustls::Error::InvalidCertificate(c) => {
            format!("the server's certificate was refused: {c}")
        }
        other => format!("TLS handshake failed: {other}"),
    }
}

fn read_certs(key: &str, path: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{key}: cannot read certificates from {path}: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{key}: no certificate in {path}"));
    }
    Ok(certs)
}

fn read_key(key: &str, path: &str) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| format!("{key}: cannot read a private key from {path}: {e}"))
}

/// The CAs a server certificate must chain to: `ca_file`, or the system's roots.
fn roots(ca_file: &str) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    if ca_file.is_empty() {
        let found = rustls_native_certs::load_native_certs();
        let (added, _) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            return Err(
                "database.tls: no system root certificates found; set database.ca_file".into(),
            );
        }
    } else {
        for cert in read_certs("database.ca_file", ca_file)? {
            roots
                .add(cert)
                .map_err(|e| format!("database.ca_file: {ca_file}: {e}"))?;
        }
    }
    Ok(roots)
}

/// The checks libpq makes short of verify-full. Without `chain` ("prefer", and "require" without
/// a CA) any certificate is taken; with it ("verify-ca") the chain must be trusted but the name
/// in the certificate does not matter. Either way the handshake's signatures are checked, so the
/// session is encrypted to whoever holds the certificate's key.
#[derive(Debug)]
struct Lenient {
    chain: Option<Arc<WebPkiServerVerifier>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl Lenient {
    fn any(provider: &CryptoProvider) -> Self {
        Lenient {
            chain: None,
            algorithms: provider.signature_verification_algorithms,
        }
    }

    fn any_name(provider: &CryptoProvider, chain: Arc<WebPkiServerVerifier>) -> Self {
        Lenient {
            chain: Some(chain),
            ..Lenient::any(provider)
        }
    }
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::parse(text).unwrap()
    }

    /// A session reads its client only once there is something to read, so that an idle one
    /// holds no buffer: after the login's exact reads the socket's readiness is stale, and
    /// the peek must still say "nothing yet".
    #[tokio::test]
    async fn a_plain_stream_is_readable_only_when_bytes_wait() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let mut stream = Stream::Plain(listener.accept().await.unwrap().0);
        client.write_all(b"abcd").await.unwrap();
        let mut four = [0u8; 4];
        stream.read_exact(&mut four).await.unwrap();
        let pending = std::future::poll_fn(|cx| Poll::Ready(stream.poll_readable(cx).is_pending()));
        assert!(pending.await, "nothing waits after an exact read");
        client.write_all(b"e").await.unwrap();
        let ready = std::future::poll_fn(|cx| stream.poll_readable(cx));
        tokio::time::timeout(std::time::Duration::from_secs(10), ready)
            .await
            .expect("readable once a byte waits")
            .unwrap();
        let mut one = [0u8; 1];
        stream.read_exact(&mut one).await.unwrap();
        assert_eq!(&one, b"e", "the peek consumed nothing");
    }

    #[test]
    fn missing_files_are_named_with_their_key() {
        let e = Tls::load(&config(
            "[listen]\ntls_cert_file = \"/nonexistent/c.pem\"\ntls_key_file = \"/nonexistent/k.pem\"\n",
        ))
        .unwrap_err();
        assert!(
            e.contains("listen.tls_cert_file") && e.contains("/nonexistent/c.pem"),
            "{e}"
        );
        let e = Tls::load(&config(
            "[database]\ntls = \"verify-full\"\nca_file = \"/nonexistent/ca.pem\"\n",
        ))
        .unwrap_err();
        assert!(e.contains("database.ca_file"), "{e}");
    }

    #[test]
    fn a_file_without_certificates_is_refused() {
        let dir = std::env::temp_dir().join(format!("bulkhead-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = Tls::load(&config(&format!(
            "[database]\ntls = \"verify-ca\"\nca_file = \"{}\"\n",
            empty.display()
        )))
        .unwrap_err();
        assert!(e.contains("no certificate"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn modes_without_files_need_nothing_loaded() {
        for mode in ["disable", "prefer", "require"] {
            let tls = Tls::load(&config(&format!("[database]\ntls = \"{mode}\"\n"))).unwrap();
            assert_eq!(tls.connector().is_some(), mode != "disable", "{mode}");
            assert!(tls.acceptor().is_none());
        }
    }

    #[test]
    fn server_names_come_from_the_host_part() {
        assert_eq!(
            server_name("db.internal:5432").unwrap(),
            ServerName::try_from("db.internal").unwrap()
        );
        assert!(matches!(
            server_name("127.0.0.1:5432").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("[::1]:5432").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(server_name("bad name!:5432").is_err());
    }
}
