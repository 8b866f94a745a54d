//! Who is asking: a keyed blake3 hash of the credential a request presents.
//!
//! The key is secret (see [`crate::secret`]: per instance in the cache directory, or shared by
//! a set of replicas), so identities cannot be precomputed from a guessed token, and nothing
//! stored on disk reveals a credential. Anonymous requests share one identity of their own.
//! Raw credentials never touch the disk.

use std::fmt;

use http::HeaderValue;

pub use crate::secret::Secret;

impl Secret {
    /// The identity of a request's `Authorization` header (None: anonymous).
    pub fn identify(&self, authorization: Option<&HeaderValue>) -> Identity {
        match authorization {
            None => Identity::ANONYMOUS,
            Some(v) => {
                let h = blake3::keyed_hash(self.identity_key(), v.as_bytes());
                let mut id = [0u8; 16];
                id.copy_from_slice(&h.as_bytes()[..16]);
                // The all-zero value is reserved for anonymous.
                if id == [0u8; 16] {
                    id[0] = 1;
                }
                Identity(id)
            }
        }
    }
}

/// A 128-bit keyed hash of a credential. Printable as hex; its short prefix goes into logs.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity(pub [u8; 16]);

impl Identity {
    pub const ANONYMOUS: Identity = Identity([0u8; 16]);

    pub fn is_anonymous(&self) -> bool {
        *self == Identity::ANONYMOUS
    }

    pub fn to_hex(self) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut s = String::with_capacity(32);
        for b in self.0 {
            s.push(HEX[usize::from(b >> 4)] as char);
            s.push(HEX[usize::from(b & 15)] as char);
        }
        s
    }

    pub fn from_hex(s: &str) -> Option<Identity> {
        if s.len() != 32 {
            return None;
        }
        let mut id = [0u8; 16];
        for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
            let hex = std::str::from_utf8(chunk).ok()?;
            id[i] = u8::from_str_radix(hex, 16).ok()?;
        }
        Some(Identity(id))
    }

    /// Eight hex digits: enough to correlate log lines, useless to recover anything.
    pub fn short(self) -> String {
        if self.is_anonymous() {
            "anonymous".into()
        } else {
            self.to_hex()[..8].to_string()
        }
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Identity({})", self.short())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_depend_on_credential_and_key() {
        let s1 = Secret::from_master(&[1; 32]);
        let s2 = Secret::from_master(&[2; 32]);
        let t = HeaderValue::from_static("Bearer glpat-x");
        let u = HeaderValue::from_static("Bearer glpat-y");
        assert_ne!(s1.identify(Some(&t)), s1.identify(Some(&u)));
        assert_ne!(s1.identify(Some(&t)), s2.identify(Some(&t)));
        assert_eq!(s1.identify(None), Identity::ANONYMOUS);
        assert!(!s1.identify(Some(&t)).is_anonymous());
        let id = s1.identify(Some(&t));
        assert_eq!(Identity::from_hex(&id.to_hex()), Some(id));
        assert!(!id.to_hex().contains("glpat"));
    }

    #[test]
    fn identities_survive_a_token_key_rotation() {
        // Grants on disk are keyed by identity hashes: a rotation must not orphan them.
        let t = HeaderValue::from_static("Bearer glpat-x");
        let old = Secret::generate().unwrap();
        let new = old.rotated().unwrap();
        assert_eq!(old.identify(Some(&t)), new.identify(Some(&t)));
        assert_ne!(old.token_key(), new.token_key());
    }
}
