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

    /// The identity of a CI principal (job project, user, scoped user): what every job token
    /// of that principal shares grants under. The input starts with a NUL byte, which no
    /// header value holds, so it never equals a credential's identity.
    pub fn identify_principal(
        &self,
        job_project: u64,
        user: u64,
        scoped_user: Option<u64>,
    ) -> Identity {
        let scoped = scoped_user.map_or_else(|| "-".to_string(), |s| s.to_string());
        let text = format!("\0ci-principal\0{job_project}\0{user}\0{scoped}");
        let h = blake3::keyed_hash(self.identity_key(), text.as_bytes());
        let mut id = [0u8; 16];
        id.copy_from_slice(&h.as_bytes()[..16]);
        if id == [0u8; 16] {
            id[0] = 1;
        }
        Identity(id)
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
        let mut s = String::with_capacity(32);
        self.push_hex(&mut s);
        s
    }

    /// Append the 32 hex digits of [`to_hex`](Self::to_hex) to `out`.
    pub fn push_hex(self, out: &mut String) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        for b in self.0 {
            out.push(HEX[usize::from(b >> 4)] as char);
            out.push(HEX[usize::from(b & 15)] as char);
        }
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
        self.short_name().as_str().to_string()
    }

    /// [`short`](Self::short) without a heap allocation, for the access line of every request.
    pub fn short_name(self) -> ShortName {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        if self.is_anonymous() {
            return ShortName(*b"anonymous", 9);
        }
        let mut text = [0u8; 9];
        for (i, b) in self.0[..4].iter().enumerate() {
            text[2 * i] = HEX[usize::from(b >> 4)];
            text[2 * i + 1] = HEX[usize::from(b & 15)];
        }
        ShortName(text, 8)
    }
}

/// An identity's short form ([`Identity::short_name`]): ASCII held inline.
#[derive(Clone, Copy)]
pub struct ShortName([u8; 9], u8);

impl ShortName {
    pub fn as_str(&self) -> &str {
        // Only ASCII hex digits or "anonymous" are ever put in.
        std::str::from_utf8(&self.0[..usize::from(self.1)]).unwrap_or_default()
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
    fn the_short_name_is_the_hex_prefix_or_anonymous() {
        let id = Identity([0xa1, 0x0b, 0xff, 0x00, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9]);
        assert_eq!(id.short_name().as_str(), "a10bff00");
        assert_eq!(id.short_name().as_str(), &id.to_hex()[..8]);
        assert_eq!(id.short(), "a10bff00");
        assert_eq!(Identity::ANONYMOUS.short_name().as_str(), "anonymous");
        assert_eq!(Identity::ANONYMOUS.short(), "anonymous");
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
