//! CI ID tokens for the tests: GitLab's signing key (published by the fake at
//! `/oauth/discovery/keys`) and a forger's key (never published), both RS256.

#![allow(dead_code)]

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use ring::signature::{KeyPair, RsaKeyPair, RSA_PKCS1_SHA256};
use serde_json::{json, Value};

/// The `kid` of the fake GitLab's ID token key.
pub const KID: &str = "fake-gitlab-ci-jwt-1";

#[derive(Debug, Clone, Copy)]
pub enum Key {
    /// The key GitLab publishes.
    Gitlab,
    /// A key nobody published: signatures with it are forgeries.
    Forger,
}

fn pkcs8(key: Key) -> &'static [u8] {
    match key {
        Key::Gitlab => include_bytes!("../data/keys/gitlab.pk8"),
        Key::Forger => include_bytes!("../data/keys/forger.pk8"),
    }
}

/// The JWKS GitLab serves: its one key.
pub fn jwks() -> Value {
    let pair = RsaKeyPair::from_pkcs8(pkcs8(Key::Gitlab)).unwrap();
    let c = ring::rsa::PublicKeyComponents::<Vec<u8>>::from(pair.public_key());
    json!({ "keys": [{
        "kty": "RSA", "kid": KID, "use": "sig", "alg": "RS256",
        "n": B64.encode(&c.n), "e": B64.encode(&c.e),
    }]})
}

/// GitLab's header for an ID token.
pub fn header() -> Value {
    json!({ "alg": "RS256", "kid": KID, "typ": "JWT" })
}

/// Sign `claims` under `header` with `key` (RS256).
pub fn sign(key: Key, header: &Value, claims: &Value) -> String {
    let pair = RsaKeyPair::from_pkcs8(pkcs8(key)).unwrap();
    let input = format!(
        "{}.{}",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string())
    );
    let mut sig = vec![0; pair.public().modulus_len()];
    let rng = ring::rand::SystemRandom::new();
    pair.sign(&RSA_PKCS1_SHA256, &rng, input.as_bytes(), &mut sig)
        .unwrap();
    format!("{input}.{}", B64.encode(sig))
}

/// An unsigned token (`alg: none`).
pub fn unsigned(claims: &Value) -> String {
    format!(
        "{}.{}.",
        B64.encode(json!({ "alg": "none", "kid": KID }).to_string()),
        B64.encode(claims.to_string())
    )
}
