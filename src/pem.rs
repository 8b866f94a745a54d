//! PEM files: certificate chains (the upstream's extra CAs, the server certificate) and
//! private keys. A leaf, so that `config` can check the files at start without depending on
//! the modules that use them.

use std::path::Path;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Read every certificate of a PEM file. Fails when there is none. Messages name no path:
/// the caller names the setting (a path is a configured value, and values are never echoed).
pub fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("the certificate file cannot be read: {e}"))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("the certificate file is not valid PEM: {e}"))?;
    if certs.is_empty() {
        return Err("the certificate file holds no certificate".into());
    }
    Ok(certs)
}

/// Read the private key of a PEM file (messages name no path, as above).
pub fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| format!("the key file holds no readable private key: {e}"))
}
