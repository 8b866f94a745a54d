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
    #[allow(clippy::disallowed_methods)] // a test's client, not tfmirror's
    pub fn client(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(self.ca.as_bytes()).unwrap())
            .build()
            .unwrap()
    }
}

/// A certificate and its key, made by [`issue`].
pub struct Issued {
    pub cert: rcgen::Certificate,
    pub key: rcgen::KeyPair,
}

impl Issued {
    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// Write the certificate (PEM) to `dir/name`; its path.
    pub fn write(&self, dir: &std::path::Path, name: &str) -> String {
        let path = dir.join(name);
        std::fs::write(&path, self.pem()).unwrap();
        path.to_str().unwrap().to_string()
    }
}

/// A certificate for `names`: a CA (`basicConstraints CA:TRUE`) or a leaf (`CA:FALSE`),
/// self-signed or signed by `issuer`'s key.
pub fn issue(names: &[&str], ca: bool, issuer: Option<&Issued>) -> Issued {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let key = KeyPair::generate().unwrap();
    let mut p =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    p.is_ca = if ca {
        IsCa::Ca(BasicConstraints::Unconstrained)
    } else {
        IsCa::ExplicitNoCa
    };
    let cn = names.first().copied().unwrap_or("tfmirror test CA");
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    let cert = match issuer {
        None => p.self_signed(&key).unwrap(),
        Some(i) => p.signed_by(&key, &i.cert, &i.key).unwrap(),
    };
    Issued { cert, key }
}
