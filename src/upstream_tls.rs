//! TLS trust for the upstream: one verifier, used by both clients that reach GitLab.
//!
//! **Trust.** The system roots (honouring `SSL_CERT_FILE`/`SSL_CERT_DIR`) plus the certificates
//! of `upstream_ca`, checked by rustls's WebPki verifier. On top of that, [`PinningVerifier`]
//! accepts a server certificate that is *byte-identical* to one of `upstream_ca`'s, as
//! Terraform (Go), curl and browsers do: a GitLab on-premises often presents a self-signed
//! certificate that is its own CA (`basicConstraints CA:TRUE`, what `openssl req -x509` makes),
//! which WebPki refuses as `CaUsedAsEndEntity` (or `UnknownIssuer` for one that is not in the
//! roots). The name and validity period are still checked, and the handshake signature still
//! proves the server holds that certificate's key.
//!
//! **Both paths.** `reqwest` (registry calls, downloads) takes this configuration as is.
//! Pingora 0.9.1's rustls connector (pass-through, uploads) builds its own verifier from a
//! root store and offers only full, skip-hostname or skip-all verification
//! (`pingora-core/src/connectors/tls/rustls/mod.rs`): no custom verifier, so a self-signed
//! upstream would be refused there. Pingora does take a custom L4 connector
//! (`PeerOptions::custom_l4`) that may return any stream (`VirtualSocket`): [`TlsL4`] connects
//! TCP, runs the TLS handshake with this same configuration, and hands pingora the finished
//! TLS stream as a plain connection. Pingora then speaks HTTP/1.1 over it, pools and reuses it
//! as any other; one trust decision covers every upstream path.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use pingora::protocols::l4::socket::SocketAddr as PingoraAddr;
use pingora::protocols::l4::stream::Stream;
use pingora::protocols::l4::virt::{VirtualSockOpt, VirtualSocket, VirtualSocketStream};
use pingora::{Error, ErrorType, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The rustls configuration for the upstream, with `alpn` offered.
pub fn client_config(
    extra: &[CertificateDer<'static>],
    alpn: &[&[u8]],
) -> std::result::Result<ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = PinningVerifier::new(extra, provider.clone())?;
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// WebPki's verification, plus: a server certificate byte-identical to one of `upstream_ca`'s
/// is trusted (see the module docs).
#[derive(Debug)]
pub struct PinningVerifier {
    webpki: Arc<WebPkiServerVerifier>,
    /// The certificates of `upstream_ca`, as DER.
    pinned: Vec<CertificateDer<'static>>,
}

impl PinningVerifier {
    fn new(
        extra: &[CertificateDer<'static>],
        provider: Arc<rustls::crypto::CryptoProvider>,
    ) -> std::result::Result<PinningVerifier, String> {
        let mut roots = RootCertStore::empty();
        // Unparsable system roots are skipped, as every TLS client does.
        roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        let (_, rejected) = roots.add_parsable_certificates(extra.iter().cloned());
        if rejected > 0 {
            return Err("a certificate of the CA file is not usable as a trust root".into());
        }
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| format!("no usable trust roots: {e}"))?;
        Ok(PinningVerifier {
            webpki,
            pinned: extra.to_vec(),
        })
    }
}

impl ServerCertVerifier for PinningVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let refused =
            match self
                .webpki
                .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
            {
                Ok(ok) => return Ok(ok),
                Err(e) => e,
            };
        // Only the refusals a self-signed certificate meets: `CaUsedAsEndEntity` (which rustls
        // passes on as `Other`) and `UnknownIssuer`. Any other (expired, wrong name) stands.
        let self_signed_refusal = matches!(
            &refused,
            rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer | CertificateError::Other(_)
            )
        );
        if !self_signed_refusal
            || !self
                .pinned
                .iter()
                .any(|p| p.as_ref() == end_entity.as_ref())
        {
            return Err(refused);
        }
        pinned_leaf_is_valid(end_entity, server_name, now)?;
        Ok(ServerCertVerified::assertion())
    }

    // The handshake signature is checked as always, with the presented certificate's key: the
    // server proves it holds the key of the pinned certificate.
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// A pinned certificate is still checked for the name and the validity period.
fn pinned_leaf_is_valid(
    cert: &CertificateDer<'_>,
    server_name: &ServerName<'_>,
    now: UnixTime,
) -> std::result::Result<(), rustls::Error> {
    let parsed = rustls::server::ParsedCertificate::try_from(cert)?;
    rustls::client::verify_server_name(&parsed, server_name)?;
    let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
    let validity = x509.validity();
    let now = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
    if now < validity.not_before.timestamp() {
        return Err(rustls::Error::InvalidCertificate(
            CertificateError::NotValidYet,
        ));
    }
    if now > validity.not_after.timestamp() {
        return Err(rustls::Error::InvalidCertificate(CertificateError::Expired));
    }
    Ok(())
}

/// Pingora's L4 connector for a TLS upstream: TCP, then the TLS handshake with tfmirror's own
/// configuration (see the module docs). Pingora sees a plain connection.
#[derive(Debug)]
pub struct TlsL4 {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
    /// Bounds the TCP connect and, separately, the handshake (`timeouts.connect`).
    connect_timeout: Duration,
}

impl TlsL4 {
    /// `host` is the upstream host name (or IP literal, unbracketed): SNI and name checks.
    pub fn new(
        extra: &[CertificateDer<'static>],
        host: &str,
        connect_timeout: Duration,
    ) -> std::result::Result<TlsL4, String> {
        // Pingora speaks HTTP/1.1 on these connections.
        let config = client_config(extra, &[b"http/1.1"])?;
        let name = ServerName::try_from(host.to_string())
            .map_err(|_| "the upstream host is not a valid TLS server name".to_string())?;
        Ok(TlsL4 {
            config: Arc::new(config),
            name,
            connect_timeout,
        })
    }
}

#[async_trait::async_trait]
impl pingora::connectors::L4Connect for TlsL4 {
    async fn connect(&self, addr: &PingoraAddr) -> Result<Stream> {
        let PingoraAddr::Inet(inet) = addr else {
            return Error::e_explain(ErrorType::ConnectError, "the upstream is not a TCP address");
        };
        let tcp = match tokio::time::timeout(self.connect_timeout, TcpStream::connect(*inet)).await
        {
            Err(_) => return Error::e_explain(ErrorType::ConnectTimedout, "connecting upstream"),
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
                return Error::e_because(ErrorType::ConnectRefused, "connecting upstream", e)
            }
            Ok(Err(e)) => {
                return Error::e_because(ErrorType::ConnectError, "connecting upstream", e)
            }
            Ok(Ok(tcp)) => tcp,
        };
        let _ = tcp.set_nodelay(true);
        let connector = tokio_rustls::TlsConnector::from(self.config.clone());
        let handshake = connector.connect(self.name.clone(), tcp);
        let tls = match tokio::time::timeout(self.connect_timeout, handshake).await {
            Err(_) => {
                return Error::e_explain(
                    ErrorType::TLSHandshakeTimedout,
                    "TLS handshake with the upstream",
                )
            }
            Ok(Err(e)) => {
                let etype = match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                    Some(rustls::Error::InvalidCertificate(_)) => ErrorType::InvalidCert,
                    _ => ErrorType::TLSHandshakeFailure,
                };
                return Error::e_because(etype, "TLS handshake with the upstream failed", e);
            }
            Ok(Ok(tls)) => tls,
        };
        Ok(Stream::from(VirtualSocketStream::new(Box::new(TlsSocket(
            tls,
        )))))
    }
}

/// A finished TLS client connection, as pingora's virtual socket.
#[derive(Debug)]
struct TlsSocket(tokio_rustls::client::TlsStream<TcpStream>);

impl VirtualSocket for TlsSocket {
    fn set_socket_option(&self, opt: VirtualSockOpt) -> io::Result<()> {
        match opt {
            VirtualSockOpt::NoDelay => self.0.get_ref().0.set_nodelay(true),
            // tfmirror sets no keep-alive on upstream peers.
            _ => Ok(()),
        }
    }
}

impl AsyncRead for TlsSocket {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsSocket {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};

    /// A self-signed certificate that is its own CA, as `openssl req -x509` makes.
    fn self_signed_ca(names: &[&str]) -> CertificateDer<'static> {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.self_signed(&key).unwrap().der().clone()
    }

    fn verify(
        pinned: &[CertificateDer<'static>],
        leaf: &CertificateDer<'static>,
        name: &str,
    ) -> std::result::Result<(), rustls::Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = PinningVerifier::new(pinned, provider).unwrap();
        let name = ServerName::try_from(name.to_string()).unwrap();
        verifier
            .verify_server_cert(leaf, &[], &name, &[], UnixTime::now())
            .map(|_| ())
    }

    #[test]
    fn a_self_signed_leaf_given_as_the_ca_is_trusted_for_its_names_only() {
        let leaf = self_signed_ca(&["gitlab.example", "127.0.0.1"]);
        // Plain WebPki refuses it, even with the certificate as a root.
        let mut roots = RootCertStore::empty();
        roots.add(leaf.clone()).unwrap();
        let webpki = WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let plain = webpki.verify_server_cert(
            &leaf,
            &[],
            &ServerName::try_from("gitlab.example").unwrap(),
            &[],
            UnixTime::now(),
        );
        assert!(plain.is_err(), "WebPki alone: {plain:?}");

        assert!(verify(std::slice::from_ref(&leaf), &leaf, "gitlab.example").is_ok());
        assert!(verify(std::slice::from_ref(&leaf), &leaf, "127.0.0.1").is_ok());
        // The name is still checked.
        let e = verify(std::slice::from_ref(&leaf), &leaf, "other.example").unwrap_err();
        assert!(
            matches!(
                e,
                rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext { .. })
            ),
            "{e:?}"
        );
        // Not in the CA file: refused.
        let other = self_signed_ca(&["gitlab.example"]);
        assert!(verify(std::slice::from_ref(&other), &leaf, "gitlab.example").is_err());
        assert!(verify(&[], &leaf, "gitlab.example").is_err());
    }

    #[test]
    fn an_expired_pinned_leaf_is_refused() {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec!["gitlab.example".to_string()]).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.not_before = rcgen::date_time_ymd(2000, 1, 1);
        p.not_after = rcgen::date_time_ymd(2001, 1, 1);
        let leaf = p.self_signed(&key).unwrap().der().clone();
        assert!(verify(std::slice::from_ref(&leaf), &leaf, "gitlab.example").is_err());
    }
}
