//! TLS termination: the server certificate, reloaded when its files change.
//!
//! Terraform only talks HTTPS to a registry host it discovers, so a tfmirror that runners
//! reach without a `host` override terminates TLS itself. Certificates rotate (ACME, cert
//! managers writing into a volume): the resolver below re-reads the files when their
//! modification time changes, at most every [`CHECK_EVERY`], so a renewed certificate is
//! served without a restart. A file that fails to parse is logged and the old one kept.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

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
