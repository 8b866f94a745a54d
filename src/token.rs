//! tfmirror's own download tokens, handed out in `X-Terraform-Get` instead of GitLab's JWT.
//!
//! A token is self-sufficient: any replica holding the set's key can verify it *and* fill the
//! tarball behind it, though Terraform sends no credential with `/file` and the replica that
//! minted it may be gone. Its claims are sealed with XChaCha20-Poly1305 under the token key:
//!
//! ```text
//! base64url( nonce[24] || seal( expiry u64 LE || identity[16] || kind u8 || authority ) )
//! ```
//!
//! - The module path and version are the AEAD's associated data, not inside the token: a token
//!   for one module fails on every other path.
//! - The *authority* is what lets a replica fill: GitLab's download JWT for that tarball when
//!   one is at hand (then `/file` is the only upstream call), else the caller's
//!   `Authorization` value (a replica asks GitLab for a JWT with it first), nothing for an
//!   anonymous caller. It is sealed, never readable from the URL; a token reveals nothing
//!   about the credential behind it, not even its identity hash.
//! - Size: 65 bytes of overhead plus the authority, base64-encoded: 87 characters without an
//!   authority, 87 + 4/3 of the JWT's length with one. Authorities over [`MAX_AUTHORITY`]
//!   are not sealed (the minting replica still fills from memory).
//!
//! After a rotation, tokens sealed under the previous key (`secret_previous_file`) still
//! open until they expire; new ones are always sealed under the current key.

use std::fmt;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use http::HeaderValue;

use crate::clock::now;
use crate::identity::{Identity, Secret};
use crate::routes::ModuleId;

/// The largest authority sealed into a token (GitLab's JWTs are a few hundred bytes).
pub const MAX_AUTHORITY: usize = 2048;
/// The longest `auth.token_ttl` allowed.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);
/// How far the clocks of the replicas of a set may disagree: a token whose expiry lies
/// further ahead than `token_ttl` plus this was not minted under this configuration.
pub const CLOCK_SKEW: u64 = 60;
const NONCE: usize = 24;
const TAG: usize = 16;
const SEAL_CONTEXT: &str = "tfmirror 2026 download token v2 seal";
const AAD_DOMAIN: &[u8] = b"tfmirror download token v2";

/// Why a token was refused. The reason goes to logs and metrics, never the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalid {
    Missing,
    Malformed,
    /// Not sealed under any key in force, or tampered with, or for another path.
    BadMac,
    Expired,
    /// Its expiry lies further ahead than `auth.token_ttl` allows (plus [`CLOCK_SKEW`]): a
    /// token minted under an older, longer setting (or a longer-lived key) is not honoured.
    TooLong,
}

/// What lets any replica fill the tarball behind a token. Its `Debug` shows the kind only.
#[derive(Clone, PartialEq, Eq)]
pub enum Authority {
    /// Nothing to act with: an anonymous caller (or an authority too large to seal).
    None,
    /// GitLab's download JWT for this very tarball (`/file?token=`), as GitLab sent it.
    GitLabJwt(String),
    /// The caller's `Authorization` header value.
    Credential(HeaderValue),
}

impl fmt::Debug for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Authority::None => "Authority::None",
            Authority::GitLabJwt(_) => "Authority::GitLabJwt(..)",
            Authority::Credential(_) => "Authority::Credential(..)",
        })
    }
}

impl Authority {
    fn kind(&self) -> u8 {
        match self {
            Authority::None => 0,
            Authority::GitLabJwt(_) => 1,
            Authority::Credential(_) => 2,
        }
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Authority::None => &[],
            Authority::GitLabJwt(j) => j.as_bytes(),
            Authority::Credential(c) => c.as_bytes(),
        }
    }

    fn decode(kind: u8, bytes: &[u8]) -> Option<Authority> {
        match kind {
            0 if bytes.is_empty() => Some(Authority::None),
            1 => std::str::from_utf8(bytes)
                .ok()
                .map(|s| Authority::GitLabJwt(s.to_string())),
            2 => HeaderValue::from_bytes(bytes)
                .ok()
                .map(Authority::Credential),
            _ => None,
        }
    }
}

/// What a valid token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub identity: Identity,
    pub expiry: u64,
    pub authority: Authority,
}

pub struct Tokens {
    current: XChaCha20Poly1305,
    previous: Option<XChaCha20Poly1305>,
    ttl: Duration,
}

fn cipher(token_key: &[u8; 32]) -> XChaCha20Poly1305 {
    XChaCha20Poly1305::new(&blake3::derive_key(SEAL_CONTEXT, token_key).into())
}

/// Length-prefixed fields: no two distinct paths give the same associated data.
fn aad(module: &ModuleId, version: &str) -> Vec<u8> {
    let mut a = AAD_DOMAIN.to_vec();
    for field in [
        module.namespace().as_bytes(),
        module.name().as_bytes(),
        module.system().as_bytes(),
        version.as_bytes(),
    ] {
        a.extend_from_slice(&(field.len() as u64).to_le_bytes());
        a.extend_from_slice(field);
    }
    a
}

impl Tokens {
    /// Tokens sealed and opened under one key.
    pub fn new(token_key: [u8; 32], ttl: Duration) -> Tokens {
        Tokens {
            current: cipher(&token_key),
            previous: None,
            ttl,
        }
    }

    /// Tokens under a secret's token key, also opening those of its previous key.
    pub fn from_secret(secret: &Secret, ttl: Duration) -> Tokens {
        Tokens {
            previous: secret.previous_token_key().map(cipher),
            ..Tokens::new(*secret.token_key(), ttl)
        }
    }

    /// A token for (module, version, identity), valid `ttl` from `now`, carrying `authority`.
    pub fn seal(
        &self,
        module: &ModuleId,
        version: &str,
        identity: Identity,
        authority: &Authority,
        now: u64,
    ) -> String {
        let authority = if authority.bytes().len() > MAX_AUTHORITY {
            &Authority::None
        } else {
            authority
        };
        let mut plain = Vec::with_capacity(25 + authority.bytes().len());
        plain.extend_from_slice(&(now + self.ttl.as_secs()).to_le_bytes());
        plain.extend_from_slice(&identity.0);
        plain.push(authority.kind());
        plain.extend_from_slice(authority.bytes());
        let mut nonce = [0u8; NONCE];
        // A random 192-bit nonce never repeats in practice; without randomness, no token.
        getrandom::getrandom(&mut nonce).expect("the OS random source works");
        let sealed = self
            .current
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &plain,
                    aad: &aad(module, version),
                },
            )
            .expect("sealing a bounded message cannot fail");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        URL_SAFE_NO_PAD.encode(out)
    }

    /// The claims of `token` if it was sealed under a key in force, for this exact path, and
    /// has not expired at `now`.
    pub fn open(
        &self,
        token: Option<&str>,
        module: &ModuleId,
        version: &str,
        now: u64,
    ) -> Result<Claims, Invalid> {
        let token = token.filter(|t| !t.is_empty()).ok_or(Invalid::Missing)?;
        // Bound the work a hostile query can cause before any decoding.
        if token.len() > (NONCE + TAG + 25 + MAX_AUTHORITY) * 4 / 3 + 4 {
            return Err(Invalid::Malformed);
        }
        let raw = URL_SAFE_NO_PAD
            .decode(token)
            .map_err(|_| Invalid::Malformed)?;
        if raw.len() < NONCE + TAG + 25 {
            return Err(Invalid::Malformed);
        }
        let (nonce, sealed) = raw.split_at(NONCE);
        let aad = aad(module, version);
        let payload = || Payload {
            msg: sealed,
            aad: &aad,
        };
        let nonce = XNonce::from_slice(nonce);
        let plain = self
            .current
            .decrypt(nonce, payload())
            .or_else(|_| match &self.previous {
                Some(p) => p.decrypt(nonce, payload()),
                None => Err(chacha20poly1305::aead::Error),
            })
            .map_err(|_| Invalid::BadMac)?;
        // Authentic from here on: only tfmirror wrote these bytes.
        // At least 25 bytes: the length check above bounds the message below.
        let mut exp = [0u8; 8];
        exp.copy_from_slice(&plain[..8]);
        let expiry = u64::from_le_bytes(exp);
        let mut id = [0u8; 16];
        id.copy_from_slice(&plain[8..24]);
        let authority = Authority::decode(plain[24], &plain[25..]).ok_or(Invalid::Malformed)?;
        if expiry < now {
            return Err(Invalid::Expired);
        }
        if expiry > now + self.ttl.as_secs() + CLOCK_SKEW {
            return Err(Invalid::TooLong);
        }
        Ok(Claims {
            identity: Identity(id),
            expiry,
            authority,
        })
    }

    /// When a token expiring at `expiry` was minted (unix seconds), under today's
    /// `auth.token_ttl`: a refusal learned at or after it stops the token.
    pub fn minted_at(&self, expiry: u64) -> u64 {
        expiry.saturating_sub(self.ttl.as_secs())
    }

    /// A token without authority, valid from now (the minting replica fills from memory).
    pub fn mint(&self, module: &ModuleId, version: &str, identity: Identity) -> String {
        self.seal(module, version, identity, &Authority::None, now())
    }

    /// The identity the token was minted for, if it is authentic, unexpired and for this path.
    pub fn verify(
        &self,
        token: Option<&str>,
        module: &ModuleId,
        version: &str,
    ) -> Result<Identity, Invalid> {
        self.open(token, module, version, now()).map(|c| c.identity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module(name: &str) -> ModuleId {
        ModuleId::new("infra", name, "aws")
    }

    const NOW: u64 = 1_800_000_000;
    const JWT: &str = "eyJhbGciOiJIUzI1NiJ9.eyJ0b2tlbiI6ImdsY2J0LXNlY3JldCJ9.c2lnbmF0dXJl";

    fn tokens(key: u8) -> Tokens {
        Tokens::new([key; 32], Duration::from_secs(600))
    }

    #[test]
    fn any_replica_with_the_key_opens_what_another_sealed() {
        let (a, b) = (tokens(7), tokens(7));
        let id = Identity([9; 16]);
        for authority in [
            Authority::None,
            Authority::GitLabJwt(JWT.into()),
            Authority::Credential(HeaderValue::from_static("Bearer glcbt-64_secret")),
        ] {
            let tok = a.seal(&module("vpc"), "1.0.0", id, &authority, NOW);
            let claims = b
                .open(Some(&tok), &module("vpc"), "1.0.0", NOW + 1)
                .unwrap();
            assert_eq!(claims.identity, id);
            assert_eq!(claims.expiry, NOW + 600);
            assert_eq!(claims.authority, authority);
            // The URL never shows the authority, the identity hash, or anything readable.
            assert!(!tok.contains("eyJ") && !tok.contains("glcbt") && !tok.contains("Bearer"));
            assert!(!tok.contains(&id.to_hex()));
            assert!(
                tok.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'),
                "URL-safe without escaping"
            );
        }
    }

    #[test]
    fn refusals() {
        let t = tokens(7);
        let id = Identity([9; 16]);
        let tok = t.seal(
            &module("vpc"),
            "1.0.0",
            id,
            &Authority::GitLabJwt(JWT.into()),
            NOW,
        );
        let open = |tok: &str, m: &str, v: &str, now: u64| t.open(Some(tok), &module(m), v, now);
        assert!(open(&tok, "vpc", "1.0.0", NOW).is_ok());
        assert_eq!(open(&tok, "dns", "1.0.0", NOW), Err(Invalid::BadMac));
        assert_eq!(open(&tok, "vpc", "1.0.1", NOW), Err(Invalid::BadMac));
        assert_eq!(open(&tok, "vpc", "1.0.0", NOW + 601), Err(Invalid::Expired));
        assert_eq!(open(&tok, "vpc", "1.0.0", NOW + 600).map(|_| ()), Ok(()));
        // Issue 26, item 12: a token whose expiry lies beyond the ttl (plus the clock skew
        // between replicas) is refused: minted with a longer ttl, or by a clock far ahead.
        let long = Tokens::new([7; 32], Duration::from_secs(7 * 24 * 3600));
        let far = long.seal(&module("vpc"), "1.0.0", id, &Authority::None, NOW);
        assert_eq!(open(&far, "vpc", "1.0.0", NOW), Err(Invalid::TooLong));
        let ahead = t.seal(&module("vpc"), "1.0.0", id, &Authority::None, NOW + 61);
        assert_eq!(open(&ahead, "vpc", "1.0.0", NOW), Err(Invalid::TooLong));
        let skewed = t.seal(&module("vpc"), "1.0.0", id, &Authority::None, NOW + 60);
        assert!(
            open(&skewed, "vpc", "1.0.0", NOW).is_ok(),
            "within the skew"
        );
        assert_eq!(t.minted_at(NOW + 600), NOW);
        assert_eq!(
            t.open(None, &module("vpc"), "1.0.0", NOW),
            Err(Invalid::Missing)
        );
        assert_eq!(
            t.open(Some(""), &module("vpc"), "1.0.0", NOW),
            Err(Invalid::Missing)
        );
        for bad in ["x.y", "not base64!", "AAAA", &"A".repeat(5000)] {
            assert_eq!(
                open(bad, "vpc", "1.0.0", NOW),
                Err(Invalid::Malformed),
                "{bad}"
            );
        }
        // Flipping any bit anywhere breaks the seal.
        let raw = URL_SAFE_NO_PAD.decode(&tok).unwrap();
        for i in 0..raw.len() {
            let mut r = raw.clone();
            r[i] ^= 1;
            let forged = URL_SAFE_NO_PAD.encode(&r);
            assert_eq!(
                open(&forged, "vpc", "1.0.0", NOW),
                Err(Invalid::BadMac),
                "byte {i}"
            );
        }
        // Another set's key is another world.
        assert_eq!(
            tokens(8).open(Some(&tok), &module("vpc"), "1.0.0", NOW),
            Err(Invalid::BadMac)
        );
        // Length-prefixed path fields: moving a character between fields is another path.
        let a = ModuleId::new("ab", "c", "d");
        let b = ModuleId::new("a", "bc", "d");
        let tok = t.seal(&a, "1.0.0", id, &Authority::None, NOW);
        assert_eq!(t.open(Some(&tok), &b, "1.0.0", NOW), Err(Invalid::BadMac));
    }

    #[test]
    fn previous_key_opens_after_a_rotation_until_its_tokens_expire() {
        let old = Secret::generate().unwrap();
        let new = old.rotated().unwrap().with_previous(&old).unwrap();
        let before = Tokens::from_secret(&old, Duration::from_secs(600));
        let after = Tokens::from_secret(&new, Duration::from_secs(600));
        let id = Identity([1; 16]);
        let old_tok = before.seal(&module("vpc"), "1.0.0", id, &Authority::None, NOW);
        let new_tok = after.seal(&module("vpc"), "1.0.0", id, &Authority::None, NOW);
        assert!(after
            .open(Some(&old_tok), &module("vpc"), "1.0.0", NOW)
            .is_ok());
        assert!(after
            .open(Some(&new_tok), &module("vpc"), "1.0.0", NOW)
            .is_ok());
        assert_eq!(
            after.open(Some(&old_tok), &module("vpc"), "1.0.0", NOW + 601),
            Err(Invalid::Expired)
        );
        // Without the previous key, the old token is refused; new tokens never use it.
        let only_new = Tokens::new(*new.token_key(), Duration::from_secs(600));
        assert_eq!(
            only_new.open(Some(&old_tok), &module("vpc"), "1.0.0", NOW),
            Err(Invalid::BadMac)
        );
        assert_eq!(
            before.open(Some(&new_tok), &module("vpc"), "1.0.0", NOW),
            Err(Invalid::BadMac)
        );
    }

    #[test]
    fn sizes_stay_fit_for_a_url() {
        let t = tokens(7);
        let id = Identity([9; 16]);
        let bare = t.seal(&module("vpc"), "1.0.0", id, &Authority::None, NOW);
        assert_eq!(bare.len(), 87);
        // A GitLab-sized JWT (~400 characters) gives a token well under URL limits.
        let jwt = Authority::GitLabJwt("e".repeat(400));
        assert!(t.seal(&module("vpc"), "1.0.0", id, &jwt, NOW).len() < 700);
        // An oversized authority is dropped rather than sealed.
        let huge = Authority::GitLabJwt("e".repeat(MAX_AUTHORITY + 1));
        let tok = t.seal(&module("vpc"), "1.0.0", id, &huge, NOW);
        assert_eq!(tok.len(), bare.len());
        let claims = t.open(Some(&tok), &module("vpc"), "1.0.0", NOW).unwrap();
        assert_eq!(claims.authority, Authority::None);
        let max = Authority::GitLabJwt("e".repeat(MAX_AUTHORITY));
        let tok = t.seal(&module("vpc"), "1.0.0", id, &max, NOW);
        assert_eq!(
            t.open(Some(&tok), &module("vpc"), "1.0.0", NOW)
                .unwrap()
                .authority,
            max
        );
    }

    #[test]
    fn debug_output_never_shows_the_authority() {
        let c = Claims {
            identity: Identity([9; 16]),
            expiry: NOW,
            authority: Authority::GitLabJwt(JWT.into()),
        };
        assert!(!format!("{c:?}").contains("eyJ"));
        let c = Authority::Credential(HeaderValue::from_static("Bearer glpat-x"));
        assert!(!format!("{c:?}").contains("glpat"));
    }
}
