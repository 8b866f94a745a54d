//! TLS trust for tfmirror's upstreams, and the one place their clients are built.
//!
//! **One trust decision per upstream.** GitLab's side (registry calls, downloads and the object
//! storage GitLab redirects them to, pass-through) trusts `upstream_ca`; the provider side
//! (provider registries and the hosts their packages come from) trusts `providers.upstream_ca`.
//! Neither file touches the other side's client. Both trust the system roots (honouring
//! `SSL_CERT_FILE`/`SSL_CERT_DIR`). A [`Trust`] is made from the file's certificates:
//!
//! - A CA certificate (`basicConstraints CA:TRUE`) is a root for that side's client, checked by
//!   rustls's WebPki verifier. It is also accepted as the server's own certificate when the
//!   server presents it byte-identical: a GitLab on-premises often presents a self-signed
//!   certificate that is its own CA (what `openssl req -x509` makes), which WebPki refuses as
//!   `CaUsedAsEndEntity`. Terraform (Go), curl and browsers accept it.
//! - Any other certificate (no `basicConstraints`, or `CA:FALSE`) is a pin: accepted only when
//!   the server presents exactly that certificate, and never a root. WebPki ignores
//!   `basicConstraints` on trust anchors, so a leaf in the root store would let whoever holds its
//!   key (a stolen GitLab TLS key) sign a certificate for any host name, object storage or
//!   registry.terraform.io alike.
//!
//! A certificate accepted as pinned still has its names and validity period checked, and the
//! handshake signature, checked as always, proves the server holds its key.
//!
//! **One builder.** [`http_client`] builds every `reqwest` client tfmirror uses (clippy's
//! `disallowed-methods` in `.clippy.toml` keeps it the only place), [`client_config`] the
//! rustls configuration under it.
//!
//! **Pingora.** Pingora 0.9.1's rustls connector (pass-through, uploads) builds its own verifier
//! from a root store and offers only full, skip-hostname or skip-all verification
//! (`pingora-core/src/connectors/tls/rustls/mod.rs`): no custom verifier, so a pinned or
//! self-signed upstream would be refused there. Pingora does take a custom L4 connector
//! (`PeerOptions::custom_l4`) that may return any stream (`VirtualSocket`): [`TlsL4`] connects
//! TCP, runs the TLS handshake with GitLab's [`Trust`], and hands pingora the finished TLS
//! stream as a plain connection. Pingora then speaks HTTP/1.1 over it, pools and reuses it as
//! any other; one trust decision covers every path to GitLab.

use std::io;
use std::path::Path;
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
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::config::{Config, Timeouts};

/// What one side's clients trust: the system roots, the CA certificates of its file as roots,
/// and every certificate of its file as a pin (see the module docs).
#[derive(Debug, Clone)]
pub struct Trust {
    /// The system roots and the file's CA certificates.
    roots: Arc<RootCertStore>,
    /// Every certificate of the file, as DER: accepted when presented byte-identical.
    pins: Arc<[CertificateDer<'static>]>,
}

impl Trust {
    /// GitLab's side: `upstream_ca`.
    pub fn gitlab(config: &Config) -> std::result::Result<Trust, String> {
        Trust::load("upstream_ca", config.upstream_ca.as_deref())
    }

    /// The provider registries' side: `providers.upstream_ca`.
    pub fn providers(config: &Config) -> std::result::Result<Trust, String> {
        Trust::load(
            "providers.upstream_ca",
            config.providers.upstream_ca.as_deref(),
        )
    }

    /// The trust of the PEM file of setting `key`. Messages name the setting, never the path.
    fn load(key: &str, path: Option<&Path>) -> std::result::Result<Trust, String> {
        let given = match path {
            Some(p) => crate::pem::certs(p).map_err(|e| format!("`{key}`: {e}"))?,
            None => Vec::new(),
        };
        // Unparsable system roots are skipped, as every TLS client does.
        let system = rustls_native_certs::load_native_certs().certs;
        Trust::new(system, &given).map_err(|e| format!("`{key}`: {e}"))
    }

    /// `system`: the roots every client trusts; `given`: the certificates of the file.
    fn new(
        system: Vec<CertificateDer<'static>>,
        given: &[CertificateDer<'static>],
    ) -> std::result::Result<Trust, String> {
        let mut roots = RootCertStore::empty();
        roots.add_parsable_certificates(system);
        for cert in given {
            if is_ca(cert)? {
                roots.add(cert.clone()).map_err(|e| {
                    format!("a CA certificate of the file is not usable as a trust root: {e}")
                })?;
            }
        }
        Ok(Trust {
            roots: Arc::new(roots),
            pins: given.into(),
        })
    }

    /// Nothing to verify a server with: no system roots and no file.
    pub fn is_empty(&self) -> bool {
        self.roots.is_empty() && self.pins.is_empty()
    }
}

/// Is this a CA certificate (`basicConstraints CA:TRUE`)? Anything else is a pin only.
fn is_ca(cert: &CertificateDer<'_>) -> std::result::Result<bool, String> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|_| "a certificate of the file cannot be parsed".to_string())?;
    let constraints = x509
        .basic_constraints()
        .map_err(|_| "a certificate of the file has a malformed basicConstraints".to_string())?;
    Ok(constraints.is_some_and(|c| c.value.ca))
}

/// Which URLs a client may fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schemes {
    /// http and https (GitLab may be plain http, on a private network).
    Any,
    /// https only (provider registries and their download hosts).
    HttpsOnly,
}

/// The one place tfmirror builds an HTTP client: `trust` decides which servers it accepts;
/// no proxy (only explicit configuration decides where tfmirror connects); no redirect
/// followed (callers follow them by hand, deciding what each hop receives and where it may
/// go); the upstream timeouts of `timeouts`.
pub fn http_client(
    trust: &Trust,
    timeouts: &Timeouts,
    schemes: Schemes,
) -> std::result::Result<reqwest::Client, String> {
    let tls = client_config(trust, &[b"h2", b"http/1.1"])?;
    #[allow(clippy::disallowed_methods)] // this is the one builder (see the module docs)
    let client = reqwest::Client::builder()
        .user_agent(concat!("tfmirror/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(timeouts.connect)
        .read_timeout(timeouts.transfer)
        .pool_idle_timeout(timeouts.idle)
        .redirect(reqwest::redirect::Policy::none())
        .https_only(schemes == Schemes::HttpsOnly)
        .no_proxy()
        .use_preconfigured_tls(tls)
        .build()
        .map_err(|e| e.to_string())?;
    Ok(client)
}

/// The rustls configuration for an upstream trusted by `trust`, with `alpn` offered.
pub fn client_config(trust: &Trust, alpn: &[&[u8]]) -> std::result::Result<ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = TrustVerifier::new(trust, &provider)?;
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// A [`Trust`] as a rustls verifier: a pinned certificate presented byte-identical, else
/// WebPki's verification against the roots (see the module docs).
#[derive(Debug)]
struct TrustVerifier {
    /// `None` when there is no root at all (a host without system roots): pins only.
    webpki: Option<Arc<WebPkiServerVerifier>>,
    pins: Arc<[CertificateDer<'static>]>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl TrustVerifier {
    fn new(
        trust: &Trust,
        provider: &Arc<CryptoProvider>,
    ) -> std::result::Result<TrustVerifier, String> {
        let webpki = if trust.roots.is_empty() {
            None
        } else {
            let built =
                WebPkiServerVerifier::builder_with_provider(trust.roots.clone(), provider.clone())
                    .build()
                    .map_err(|e| format!("no usable trust roots: {e}"))?;
            Some(built)
        };
        Ok(TrustVerifier {
            webpki,
            pins: trust.pins.clone(),
            algorithms: provider.signature_verification_algorithms,
        })
    }
}

impl ServerCertVerifier for TrustVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        if self.pins.iter().any(|p| p.as_ref() == end_entity.as_ref()) {
            pinned_leaf_is_valid(end_entity, server_name, now)?;
            return Ok(ServerCertVerified::assertion());
        }
        match &self.webpki {
            Some(webpki) => {
                webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
            }
            None => Err(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer,
            )),
        }
    }

    // The handshake signature is checked as always, with the presented certificate's key: the
    // server proves it holds the key of the certificate it presented.
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
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
/// configuration, GitLab's [`Trust`] (see the module docs). Pingora sees a plain connection.
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
        trust: &Trust,
        host: &str,
        connect_timeout: Duration,
    ) -> std::result::Result<TlsL4, String> {
        // Pingora speaks HTTP/1.1 on these connections.
        let config = client_config(trust, &[b"http/1.1"])?;
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
    use rcgen::{BasicConstraints, Certificate, CertificateParams, IsCa, KeyPair};

    /// A certificate for `names`, self-signed or signed by `issuer`.
    fn cert(
        names: &[&str],
        is_ca: IsCa,
        issuer: Option<&(Certificate, KeyPair)>,
    ) -> (Certificate, KeyPair) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
        p.is_ca = is_ca;
        p.distinguished_name.push(
            rcgen::DnType::CommonName,
            names.first().copied().unwrap_or("a CA"),
        );
        let cert = match issuer {
            None => p.self_signed(&key).unwrap(),
            Some((ca, ca_key)) => p.signed_by(&key, ca, ca_key).unwrap(),
        };
        (cert, key)
    }

    fn ca() -> IsCa {
        IsCa::Ca(BasicConstraints::Unconstrained)
    }

    /// A self-signed certificate that is its own CA, as `openssl req -x509` makes.
    fn self_signed_ca(names: &[&str]) -> CertificateDer<'static> {
        cert(names, ca(), None).0.der().clone()
    }

    /// A trust made of `given` alone, without the system roots.
    fn trust(given: &[CertificateDer<'static>]) -> Trust {
        Trust::new(Vec::new(), given).unwrap()
    }

    fn verify(
        trust: &Trust,
        leaf: &CertificateDer<'static>,
        name: &str,
    ) -> std::result::Result<(), rustls::Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = TrustVerifier::new(trust, &provider).unwrap();
        let name = ServerName::try_from(name.to_string()).unwrap();
        verifier
            .verify_server_cert(leaf, &[], &name, &[], UnixTime::now())
            .map(|_| ())
    }

    /// Issue 26, item 10: a leaf given as `upstream_ca` (a pin for GitLab) used to be a root for
    /// every host name, so whoever held its key could sign a certificate for any upstream.
    #[test]
    fn a_leaf_given_is_a_pin_for_its_own_names_and_signs_nothing() {
        let corporate_ca = cert(&[], ca(), None);
        // Without basicConstraints (rcgen's default), and with an explicit CA:FALSE.
        for is_ca in [IsCa::NoCa, IsCa::ExplicitNoCa] {
            let leaf = cert(&["gitlab.example"], is_ca, Some(&corporate_ca));
            let given = leaf.0.der().clone();
            let trust = trust(std::slice::from_ref(&given));
            // The leaf's key signs a certificate for another host: not trusted.
            for other in ["registry.terraform.io", "gitlab.example"] {
                let forged = cert(&[other], IsCa::NoCa, Some(&leaf)).0.der().clone();
                let e = verify(&trust, &forged, other).unwrap_err();
                assert_eq!(
                    e,
                    rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
                );
            }
            // With the system roots as well: the leaf is in no root store.
            let with_system = Trust::new(
                rustls_native_certs::load_native_certs().certs,
                std::slice::from_ref(&given),
            )
            .unwrap();
            let forged = cert(&["objects.example"], IsCa::NoCa, Some(&leaf));
            assert!(verify(&with_system, forged.0.der(), "objects.example").is_err());
            // The leaf itself, presented: trusted for its names only.
            assert!(verify(&trust, &given, "gitlab.example").is_ok());
            assert!(verify(&with_system, &given, "gitlab.example").is_ok());
            let e = verify(&trust, &given, "registry.terraform.io").unwrap_err();
            assert!(
                matches!(
                    e,
                    rustls::Error::InvalidCertificate(
                        CertificateError::NotValidForNameContext { .. }
                    )
                ),
                "{e:?}"
            );
        }
    }

    #[test]
    fn a_ca_given_is_a_root_for_what_it_signs() {
        let root = cert(&[], ca(), None);
        let trust = trust(&[root.0.der().clone()]);
        let signed = cert(&["registry.example"], IsCa::NoCa, Some(&root));
        assert!(verify(&trust, signed.0.der(), "registry.example").is_ok());
        assert!(verify(&trust, signed.0.der(), "other.example").is_err());
        // Signed by another key: refused.
        let stranger = cert(&[], ca(), None);
        let unknown = cert(&["registry.example"], IsCa::NoCa, Some(&stranger));
        assert!(verify(&trust, unknown.0.der(), "registry.example").is_err());
    }

    #[test]
    fn a_self_signed_ca_given_is_trusted_when_presented_for_its_names() {
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

        let given = trust(std::slice::from_ref(&leaf));
        assert!(verify(&given, &leaf, "gitlab.example").is_ok());
        assert!(verify(&given, &leaf, "127.0.0.1").is_ok());
        // The name is still checked.
        let e = verify(&given, &leaf, "other.example").unwrap_err();
        assert!(
            matches!(
                e,
                rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext { .. })
            ),
            "{e:?}"
        );
        // Not in the file: refused.
        let other = self_signed_ca(&["gitlab.example"]);
        assert!(verify(&trust(&[other]), &leaf, "gitlab.example").is_err());
        assert!(verify(&trust(&[]), &leaf, "gitlab.example").is_err());
    }

    #[test]
    fn an_expired_pinned_leaf_is_refused() {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec!["gitlab.example".to_string()]).unwrap();
        p.is_ca = ca();
        p.not_before = rcgen::date_time_ymd(2000, 1, 1);
        p.not_after = rcgen::date_time_ymd(2001, 1, 1);
        let leaf = p.self_signed(&key).unwrap().der().clone();
        let e = verify(&trust(std::slice::from_ref(&leaf)), &leaf, "gitlab.example").unwrap_err();
        assert_eq!(
            e,
            rustls::Error::InvalidCertificate(CertificateError::Expired)
        );
    }

    /// `upstream_ca` is GitLab's; provider registries trust `providers.upstream_ca` only, and
    /// GitLab's side never trusts `providers.upstream_ca`.
    #[test]
    fn each_side_trusts_its_own_file_only() {
        let dir = tempfile::tempdir().unwrap();
        let (gitlab_ca, providers_ca) = (cert(&[], ca(), None), cert(&[], ca(), None));
        let (gitlab_pem, providers_pem) = (dir.path().join("g.pem"), dir.path().join("p.pem"));
        std::fs::write(&gitlab_pem, gitlab_ca.0.pem()).unwrap();
        std::fs::write(&providers_pem, providers_ca.0.pem()).unwrap();
        let mut config = Config {
            upstream_ca: Some(gitlab_pem),
            ..Config::default()
        };
        config.providers.upstream_ca = Some(providers_pem);
        let host = "registry.example";
        let by_gitlab_ca = cert(&[host], IsCa::NoCa, Some(&gitlab_ca)).0.der().clone();
        let by_providers_ca = cert(&[host], IsCa::NoCa, Some(&providers_ca))
            .0
            .der()
            .clone();

        let gitlab = Trust::gitlab(&config).unwrap();
        assert!(verify(&gitlab, &by_gitlab_ca, host).is_ok());
        assert!(verify(&gitlab, &by_providers_ca, host).is_err());
        let providers = Trust::providers(&config).unwrap();
        assert!(verify(&providers, &by_providers_ca, host).is_ok());
        assert!(verify(&providers, &by_gitlab_ca, host).is_err());

        // Unset: the system roots alone.
        config.providers.upstream_ca = None;
        let providers = Trust::providers(&config).unwrap();
        assert!(verify(&providers, &by_gitlab_ca, host).is_err());
        assert!(verify(&providers, &by_providers_ca, host).is_err());
    }
}
