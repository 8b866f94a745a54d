//! TLS termination: the server certificate, reloaded when its files change.
//!
//! Terraform only talks HTTPS to a registry host it discovers, so a tfmirror that runners
//! reach without a `host` override terminates TLS itself. Certificates rotate (ACME, cert
//! managers writing into a volume): the resolver below re-reads the files when their
//! modification time changes, at most every [`CHECK_EVERY`], so a renewed certificate is
//! served without a restart. A file that fails to parse is logged and the old one kept.
//!
//! The other side of the same files: [`pinned_client_config`], with which `tfmirror health`
//! asks its own listener over HTTPS.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};

/// How often the files' modification times are looked at.
pub const CHECK_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<(Arc<CertifiedKey>, Option<SystemTime>)>,
    last_check: Mutex<Instant>,
}

/// Parse a PEM certificate chain and private key into a signing key.
pub fn load(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, String> {
    let chain = crate::pem::certs(cert)?;
    let key = crate::pem::private_key(key)?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| format!("unsupported private key: {e}"))?;
    Ok(Arc::new(CertifiedKey::new(chain, signing)))
}

fn newest_mtime(a: &Path, b: &Path) -> Option<SystemTime> {
    let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    m(a).max(m(b))
}

impl ReloadingCert {
    pub fn new(cert: &Path, key: &Path) -> Result<ReloadingCert, String> {
        let loaded = load(cert, key)?;
        Ok(ReloadingCert {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            current: RwLock::new((loaded, newest_mtime(cert, key))),
            last_check: Mutex::new(Instant::now()),
        })
    }

    fn maybe_reload(&self) {
        {
            let mut last = self.last_check.lock().expect("tls lock");
            if last.elapsed() < CHECK_EVERY {
                return;
            }
            *last = Instant::now();
        }
        let mtime = newest_mtime(&self.cert, &self.key);
        if mtime == self.current.read().expect("tls lock").1 {
            return;
        }
        match load(&self.cert, &self.key) {
            Ok(k) => {
                *self.current.write().expect("tls lock") = (k, mtime);
                tracing::info!("TLS certificate reloaded");
            }
            Err(e) => {
                tracing::error!(error = %e, "TLS certificate changed but cannot be loaded; keeping the old one")
            }
        }
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.maybe_reload();
        Some(self.current.read().expect("tls lock").0.clone())
    }
}

/// A TLS client configuration that trusts exactly the certificate `tls_cert` serves (the first
/// of its chain), for `tfmirror health` asking its own listener on a loopback address.
///
/// Pinned, not verified by name: the certificate names the host runners use
/// (`tfmirror.example.com`), rarely `127.0.0.1`, and may come from a CA the container does
/// not carry. Its validity period is not checked either: an expired certificate is a
/// renewal to make, not a process to restart. The handshake signature is checked as
/// always, so the listener proves it holds that certificate's key.
pub fn pinned_client_config(cert: &Path) -> Result<ClientConfig, String> {
    let leaf = crate::pem::certs(cert)?.swap_remove(0);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Pinned {
        leaf,
        provider: provider.clone(),
    };
    Ok(ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth())
}

/// Accepts one certificate, byte for byte ([`pinned_client_config`]).
#[derive(Debug)]
struct Pinned {
    leaf: CertificateDer<'static>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.leaf.as_ref() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "the listener presents another certificate than the one in `tls_cert`".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
