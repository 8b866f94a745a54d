//! A private CA and a certificate for 127.0.0.1, for HTTPS tests (tfmirror's listener, fake
//! upstreams). Clients trust the CA through `SSL_CERT_FILE` or `--upstream-ca`.
// Shared with the benches, which use part of it.
#![allow(dead_code)]

/// A private CA and a certificate for 127.0.0.1 signed by it: (ca.pem, cert.pem, key.pem).
pub struct Pki {
    dir: tempfile::TempDir,
    pub ca: String,
}

impl Pki {
    pub fn new() -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let dir = tempfile::tempdir().unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "tfmirror test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&leaf_key, &ca, &ca_key)
            .unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.path().join("cert.pem"), leaf.pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), leaf_key.serialize_pem()).unwrap();
        Pki { dir, ca: ca.pem() }
    }

    pub fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_string()
    }

    pub fn cert_pem(&self) -> String {
        std::fs::read_to_string(self.path("cert.pem")).unwrap()
    }

    pub fn key_pem(&self) -> String {
        std::fs::read_to_string(self.path("key.pem")).unwrap()
    }

    /// An HTTPS client that trusts this CA only.
    pub fn client(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(self.ca.as_bytes()).unwrap())
            .build()
            .unwrap()
    }
}
