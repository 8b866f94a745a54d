//! Who is asking: a keyed blake3 hash of the credential a request presents.
//!
//! The key is a per-instance secret kept in the cache directory (mode 0600), so identities
//! cannot be precomputed from a guessed token, and nothing stored on disk reveals a credential.
//! Anonymous requests share one identity of their own. Raw credentials never touch the disk.

use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use http::HeaderValue;

const SECRET_FILE: &str = "secret.key";

/// The per-instance secret. Sub-keys for each use are derived from it, so the identity hash
/// and the download-token MAC never share a key.
#[derive(Clone)]
pub struct Secret {
    identity_key: [u8; 32],
    token_key: [u8; 32],
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// Load the secret from `cache_dir`, creating it on first start.
    pub fn load_or_create(cache_dir: &Path) -> std::io::Result<Secret> {
        let path = cache_dir.join(SECRET_FILE);
        let raw = match fs::read(&path) {
            Ok(raw) if raw.len() == 32 => raw,
            Ok(_) => {
                return Err(std::io::Error::other(format!(
                    "{} is corrupt (expected 32 bytes)",
                    path.display()
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => create(&path)?,
            Err(e) => return Err(e),
        };
        let mode = fs::metadata(&path)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
        }
        let mut master = [0u8; 32];
        master.copy_from_slice(&raw);
        Ok(Secret::from_master(&master))
    }

    pub fn from_master(master: &[u8; 32]) -> Secret {
        Secret {
            identity_key: blake3::derive_key("tfmirror 2026 identity v1", master),
            token_key: blake3::derive_key("tfmirror 2026 download token v1", master),
        }
    }

    pub fn token_key(&self) -> &[u8; 32] {
        &self.token_key
    }

    /// The identity of a request's `Authorization` header (None: anonymous).
    pub fn identify(&self, authorization: Option<&HeaderValue>) -> Identity {
        match authorization {
            None => Identity::ANONYMOUS,
            Some(v) => {
                let h = blake3::keyed_hash(&self.identity_key, v.as_bytes());
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

/// Write 32 random bytes with mode 0600, atomically: two processes starting at once (a
/// graceful upgrade) must end up with the same secret.
fn create(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut raw = [0u8; 32];
    getrandom::getrandom(&mut raw).map_err(std::io::Error::other)?;
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&raw)?;
        f.sync_all()?;
    }
    // hard_link fails if another process won the race: then use theirs.
    let won = fs::hard_link(&tmp, path).is_ok();
    let _ = fs::remove_file(&tmp);
    if won {
        Ok(raw.to_vec())
    } else {
        fs::read(path)
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
    fn secret_is_created_once_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let a = Secret::load_or_create(dir.path()).unwrap();
        let b = Secret::load_or_create(dir.path()).unwrap();
        let auth = HeaderValue::from_static("Bearer t");
        assert_eq!(a.identify(Some(&auth)), b.identify(Some(&auth)));
        let mode = fs::metadata(dir.path().join(SECRET_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

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
}
