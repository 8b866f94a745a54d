//! CI ID tokens, as pure code: splitting `<job token>~<ID token>` off a credential, reading
//! GitLab's JWKS, and verifying an ID token (RS256, `aud`, `iss`, `exp`, `nbf`).
//!
//! A job may present `Bearer <job token>~<ID token>` (Basic `gitlab-ci-token:<job token>~<ID
//! token>` on project routes). Neither GitLab tokens nor JWTs contain `~`, so the split is
//! unambiguous; anything that does not look like one (no `glcbt-` before the `~`, no
//! three-segment base64url JWT after it) is left as it is. The ID token never goes to GitLab.
//!
//! While GitLab cannot be asked, a verified ID token stands in for `GET /api/v4/job`: it names
//! the job's project (`job_project_id`, never `project_id`, which is the fork for a fork's
//! merge request) and user, signed by the key GitLab publishes at `/oauth/discovery/keys`.

use std::collections::HashMap;

use base64::Engine;
use http::HeaderValue;

use super::principal::{decimal, JOB_TOKEN_PREFIX};

/// Leeway on `exp` and `nbf`, seconds.
pub const LEEWAY: u64 = 60;
/// The shortest RSA modulus accepted, bits.
const MIN_RSA_BITS: usize = 2048;
/// The longest ID token considered (GitLab's are about 1 KiB).
const MAX_ID_TOKEN: usize = 16 * 1024;

const B64URL: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Is `s` a three-segment base64url JWT (by its shape only)?
fn jwt_shaped(s: &str) -> bool {
    s.len() <= MAX_ID_TOKEN
        && s.split('.').count() == 3
        && s.split('.').all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Split `<job token>~<ID token>` in a job token and an ID token, when the parts are one.
fn split_token(token: &str) -> Option<(&str, &str)> {
    let (job, id) = token.split_once('~')?;
    (job.starts_with(JOB_TOKEN_PREFIX) && jwt_shaped(id)).then_some((job, id))
}

/// The credential to use (and forward) without the ID token, and the ID token, when the
/// credential carries one. `None`: the credential is used as it is.
pub fn split(authorization: &HeaderValue) -> Option<(HeaderValue, String)> {
    let v = authorization.to_str().ok()?;
    let (scheme, rest) = v.split_once(' ')?;
    if scheme.eq_ignore_ascii_case("bearer") {
        let (job, id) = split_token(rest.trim())?;
        let stripped = HeaderValue::from_str(&format!("{scheme} {job}")).ok()?;
        return Some((stripped, id.to_string()));
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let std = base64::engine::general_purpose::STANDARD;
        let text = String::from_utf8(std.decode(rest.trim()).ok()?).ok()?;
        let (user, password) = text.split_once(':')?;
        let (job, id) = split_token(password)?;
        let encoded = std.encode(format!("{user}:{job}"));
        let stripped = HeaderValue::from_str(&format!("{scheme} {encoded}")).ok()?;
        return Some((stripped, id.to_string()));
    }
    None
}

/// An RSA public key of the JWKS.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RsaKey {
    n: Vec<u8>,
    e: Vec<u8>,
}

/// The signing keys GitLab publishes, by `kid`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeySet {
    keys: HashMap<String, RsaKey>,
}

impl KeySet {
    #[cfg(test)]
    pub fn knows(&self, kid: &str) -> bool {
        self.keys.contains_key(kid)
    }
}

/// Read a JWKS. Only `kty: RSA` keys of 2048 bits or more, with `alg` RS256 or absent, and a
/// `kid` no other key has, are kept. `None` when the document is not a JWKS at all: such a
/// copy is never used, nor kept.
pub fn parse_jwks(body: &[u8]) -> Option<KeySet> {
    let doc: serde_json::Value = serde_json::from_slice(body).ok()?;
    let keys = doc.get("keys")?.as_array()?;
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut found = HashMap::new();
    for k in keys {
        let Some(kid) = k["kid"].as_str() else {
            continue;
        };
        *seen.entry(kid.to_string()).or_default() += 1;
        if k["kty"].as_str() != Some("RSA") {
            continue;
        }
        if !matches!(k.get("alg").and_then(|a| a.as_str()), None | Some("RS256")) {
            continue;
        }
        let (Some(n), Some(e)) = (
            k["n"].as_str().and_then(|n| B64URL.decode(n).ok()),
            k["e"].as_str().and_then(|e| B64URL.decode(e).ok()),
        ) else {
            continue;
        };
        let bits = n.iter().skip_while(|b| **b == 0).count() * 8;
        if bits < MIN_RSA_BITS {
            continue;
        }
        found.insert(kid.to_string(), RsaKey { n, e });
    }
    // A kid named twice could be either key: neither is used.
    found.retain(|kid, _| seen.get(kid) == Some(&1));
    Some(KeySet { keys: found })
}

/// What a verified ID token must say.
#[derive(Debug, Clone, Copy)]
pub struct Expect<'a> {
    pub audience: &'a str,
    pub issuer: &'a str,
    pub require_ref_protected: bool,
    pub now: u64,
}

/// What tfmirror takes from a verified ID token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdClaims {
    pub job_project_id: u64,
    pub user_id: u64,
    pub exp: u64,
}

/// Why an ID token is not taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejected {
    Malformed,
    /// `alg` other than RS256 (`none` included).
    Alg,
    /// A `kid` the key set does not have (the JWKS may be refetched).
    UnknownKid,
    Signature,
    Audience,
    Issuer,
    Expired,
    NotYetValid,
    RefNotProtected,
    /// No `job_project_id` or `user_id`: no identity (never `project_id` instead).
    NoIdentity,
}

/// Verify an ID token against `keys` and `expect`.
pub fn verify(token: &str, keys: &KeySet, expect: &Expect<'_>) -> Result<IdClaims, Rejected> {
    if !jwt_shaped(token) {
        return Err(Rejected::Malformed);
    }
    let mut parts = token.split('.');
    let (h, p, s) = match (parts.next(), parts.next(), parts.next()) {
        (Some(h), Some(p), Some(s)) => (h, p, s),
        _ => return Err(Rejected::Malformed),
    };
    let json = |part: &str| {
        B64URL
            .decode(part)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .filter(serde_json::Value::is_object)
            .ok_or(Rejected::Malformed)
    };
    let header = json(h)?;
    if header["alg"].as_str() != Some("RS256") {
        return Err(Rejected::Alg);
    }
    let kid = header["kid"].as_str().ok_or(Rejected::UnknownKid)?;
    let key = keys.keys.get(kid).ok_or(Rejected::UnknownKid)?;
    let sig = B64URL.decode(s).map_err(|_| Rejected::Malformed)?;
    let signed = &token[..h.len() + 1 + p.len()];
    ring::signature::RsaPublicKeyComponents {
        n: &key.n,
        e: &key.e,
    }
    .verify(
        &ring::signature::RSA_PKCS1_2048_8192_SHA256,
        signed.as_bytes(),
        &sig,
    )
    .map_err(|_| Rejected::Signature)?;
    let claims = json(p)?;
    check_claims(&claims, expect)
}

/// The claims of a token whose signature checked out.
fn check_claims(c: &serde_json::Value, expect: &Expect<'_>) -> Result<IdClaims, Rejected> {
    let audience_ok = match &c["aud"] {
        serde_json::Value::String(a) => a == expect.audience,
        serde_json::Value::Array(all) => all.iter().any(|a| a.as_str() == Some(expect.audience)),
        _ => false,
    };
    if !audience_ok {
        return Err(Rejected::Audience);
    }
    if c["iss"].as_str() != Some(expect.issuer) {
        return Err(Rejected::Issuer);
    }
    let exp = c["exp"].as_u64().ok_or(Rejected::Expired)?;
    if expect.now > exp.saturating_add(LEEWAY) {
        return Err(Rejected::Expired);
    }
    if c["nbf"]
        .as_u64()
        .is_some_and(|nbf| nbf > expect.now.saturating_add(LEEWAY))
    {
        return Err(Rejected::NotYetValid);
    }
    if expect.require_ref_protected && c["ref_protected"].as_str() != Some("true") {
        return Err(Rejected::RefNotProtected);
    }
    let job_project_id = decimal(&c["job_project_id"]).ok_or(Rejected::NoIdentity)?;
    let user_id = decimal(&c["user_id"]).ok_or(Rejected::NoIdentity)?;
    Ok(IdClaims {
        job_project_id,
        user_id,
        exp,
    })
}

#[cfg(test)]
#[path = "idtoken_tests.rs"]
mod tests;
