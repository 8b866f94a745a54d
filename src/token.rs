//! tfmirror's own download tokens, handed out in `X-Terraform-Get` instead of GitLab's JWT.
//!
//! A token binds (module, version, identity, expiry) with a keyed blake3 MAC:
//! `<expiry unix secs>.<identity hex>.<mac hex>`. The module path is not inside the token; it
//! is the path the token arrives on, so a token for one module fails on every other. The
//! identity is a keyed hash, so a token reveals nothing about the credential behind it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::identity::Identity;
use crate::routes::ModuleId;

/// Why a token was refused. The reason goes to logs and metrics, never the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalid {
    Missing,
    Malformed,
    BadMac,
    Expired,
}

pub struct Tokens {
    key: [u8; 32],
    ttl: Duration,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Tokens {
    pub fn new(key: [u8; 32], ttl: Duration) -> Tokens {
        Tokens { key, ttl }
    }

    fn mac(
        &self,
        module: &ModuleId,
        version: &str,
        identity: Identity,
        expiry: u64,
    ) -> blake3::Hash {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        // Length-prefixed fields: no two distinct claim sets hash the same input.
        for field in [
            module.namespace.as_bytes(),
            module.name.as_bytes(),
            module.system.as_bytes(),
            version.as_bytes(),
        ] {
            h.update(&(field.len() as u64).to_le_bytes());
            h.update(field);
        }
        h.update(&identity.0);
        h.update(&expiry.to_le_bytes());
        h.finalize()
    }

    pub fn mint(&self, module: &ModuleId, version: &str, identity: Identity) -> String {
        let expiry = now() + self.ttl.as_secs();
        let mac = self.mac(module, version, identity, expiry);
        format!("{expiry}.{}.{}", identity.to_hex(), mac.to_hex())
    }

    /// The identity the token was minted for, if it is authentic, unexpired and for this path.
    pub fn verify(
        &self,
        token: Option<&str>,
        module: &ModuleId,
        version: &str,
    ) -> Result<Identity, Invalid> {
        let token = token.filter(|t| !t.is_empty()).ok_or(Invalid::Missing)?;
        let mut parts = token.split('.');
        let (Some(exp), Some(id), Some(mac), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(Invalid::Malformed);
        };
        let expiry: u64 = exp.parse().map_err(|_| Invalid::Malformed)?;
        let identity = Identity::from_hex(id).ok_or(Invalid::Malformed)?;
        let mac = blake3::Hash::from_hex(mac).map_err(|_| Invalid::Malformed)?;
        // blake3::Hash compares in constant time.
        if mac != self.mac(module, version, identity, expiry) {
            return Err(Invalid::BadMac);
        }
        if expiry < now() {
            return Err(Invalid::Expired);
        }
        Ok(identity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module(name: &str) -> ModuleId {
        ModuleId {
            namespace: "infra".into(),
            name: name.into(),
            system: "aws".into(),
        }
    }

    #[test]
    fn round_trip_and_refusals() {
        let t = Tokens::new([7; 32], Duration::from_secs(600));
        let id = Identity([9; 16]);
        let tok = t.mint(&module("vpc"), "1.0.0", id);
        assert_eq!(t.verify(Some(&tok), &module("vpc"), "1.0.0"), Ok(id));
        assert_eq!(
            t.verify(Some(&tok), &module("dns"), "1.0.0"),
            Err(Invalid::BadMac)
        );
        assert_eq!(
            t.verify(Some(&tok), &module("vpc"), "1.0.1"),
            Err(Invalid::BadMac)
        );
        assert_eq!(
            t.verify(None, &module("vpc"), "1.0.0"),
            Err(Invalid::Missing)
        );
        assert_eq!(
            t.verify(Some("x.y"), &module("vpc"), "1.0.0"),
            Err(Invalid::Malformed)
        );
        // Tampering with any field breaks the MAC.
        let (exp, rest) = tok.split_once('.').unwrap();
        let later = format!("{}.{rest}", exp.parse::<u64>().unwrap() + 1000);
        assert_eq!(
            t.verify(Some(&later), &module("vpc"), "1.0.0"),
            Err(Invalid::BadMac)
        );
        let other_id = tok.replace(&id.to_hex(), &Identity([8; 16]).to_hex());
        assert_eq!(
            t.verify(Some(&other_id), &module("vpc"), "1.0.0"),
            Err(Invalid::BadMac)
        );
        // Another instance's key is another world.
        let t2 = Tokens::new([8; 32], Duration::from_secs(600));
        assert_eq!(
            t2.verify(Some(&tok), &module("vpc"), "1.0.0"),
            Err(Invalid::BadMac)
        );
    }

    #[test]
    fn expired_tokens_are_refused() {
        let t = Tokens::new([7; 32], Duration::ZERO);
        let id = Identity([9; 16]);
        let expiry = now() - 1;
        let mac = t.mac(&module("vpc"), "1.0.0", id, expiry);
        let tok = format!("{expiry}.{}.{}", id.to_hex(), mac.to_hex());
        assert_eq!(
            t.verify(Some(&tok), &module("vpc"), "1.0.0"),
            Err(Invalid::Expired)
        );
    }
}
