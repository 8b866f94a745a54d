//! Bundle keys and signatures, with rpgp (`pgp`, pure Rust): an Ed25519 signing key made by
//! `tfmirror bundle keygen`, detached armored signatures over a manifest, and their check
//! against the trusted public keys. Signatures are standard OpenPGP, so `gpg --verify` checks
//! them too.

use std::io::Write;
use std::path::{Path, PathBuf};

use pgp::composed::{
    ArmorOptions, Deserializable, DetachedSignature, KeyType, SecretKeyParamsBuilder,
    SignedPublicKey, SignedSecretKey,
};
use pgp::crypto::hash::HashAlgorithm;
use pgp::types::{KeyDetails, Password};

/// Where `keygen --out KEY` writes the public half: `KEY.pub`.
pub fn public_path(secret: &Path) -> PathBuf {
    let mut name = secret.as_os_str().to_owned();
    name.push(".pub");
    PathBuf::from(name)
}

/// A new Ed25519 signing key (no passphrase: it signs unattended, and is protected by its
/// file's mode), armored: (secret, public).
pub fn generate(user_id: &str) -> Result<(String, String), String> {
    let key = SecretKeyParamsBuilder::default()
        // EdDSA over Ed25519 in the v4 form every gpg in use reads.
        .key_type(KeyType::Ed25519Legacy)
        .can_certify(true)
        .can_sign(true)
        .primary_user_id(user_id.into())
        .build()
        .map_err(|e| e.to_string())?
        .generate(rand::rngs::OsRng)
        .map_err(|e| e.to_string())?
        .sign(rand::rngs::OsRng, &Password::empty())
        .map_err(|e| e.to_string())?;
    let secret = key
        .to_armored_string(ArmorOptions::default())
        .map_err(|e| e.to_string())?;
    let public = SignedPublicKey::from(key)
        .to_armored_string(ArmorOptions::default())
        .map_err(|e| e.to_string())?;
    Ok((secret, public))
}

/// Write a new key pair to `out` (mode 0600, created new: an existing key is never
/// overwritten) and `out.pub`. Returns the key id.
pub fn keygen(out: &Path) -> Result<String, String> {
    let pub_path = public_path(out);
    for p in [out, pub_path.as_path()] {
        if p.exists() {
            return Err(format!("{} exists: not overwritten", p.display()));
        }
    }
    let (secret, public) = generate("tfmirror bundle signing key")?;
    let id = key_id(&public)?;
    write_new(out, secret.as_bytes(), 0o600)?;
    if let Err(e) = write_new(&pub_path, public.as_bytes(), 0o644) {
        let _ = std::fs::remove_file(out);
        return Err(e);
    }
    Ok(id)
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)?;
        // The mode is set again: `open`'s is filtered by the umask.
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(bytes)?;
        f.sync_all()
    };
    write().map_err(|e| format!("{}: {e}", path.display()))
}

/// The id (hex) of an armored public key.
pub fn key_id(armored_public: &str) -> Result<String, String> {
    let (key, _) = SignedPublicKey::from_string(armored_public)
        .map_err(|_| "not an armored OpenPGP public key".to_string())?;
    Ok(key.key_id().to_string())
}

/// Read an armored secret key (as `keygen` writes it).
pub fn read_secret(path: &Path) -> Result<SignedSecretKey, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    SignedSecretKey::from_string(&text)
        .map(|(k, _)| k)
        .map_err(|_| format!("{}: not an armored OpenPGP secret key", path.display()))
}

/// A detached, armored signature over `document`.
pub fn sign(key: &SignedSecretKey, document: &[u8]) -> Result<Vec<u8>, String> {
    let sig = DetachedSignature::sign_binary_data(
        rand::rngs::OsRng,
        &key.primary_key,
        &Password::empty(),
        HashAlgorithm::Sha256,
        document,
    )
    .map_err(|e| format!("signing failed: {e}"))?;
    sig.to_armored_bytes(ArmorOptions::default())
        .map_err(|e| format!("signing failed: {e}"))
}

/// Public keys read from armored files; a file that holds no valid key is an error naming it.
pub fn read_trusted(paths: &[PathBuf]) -> Result<Vec<SignedPublicKey>, String> {
    let mut keys = Vec::new();
    for p in paths {
        let text = std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
        let key = SignedPublicKey::from_string(&text)
            .ok()
            .map(|(k, _)| k)
            // A key whose own binding signatures do not verify is no key at all.
            .filter(|k| k.verify().is_ok())
            .ok_or_else(|| format!("{}: not an armored OpenPGP public key", p.display()))?;
        keys.push(key);
    }
    Ok(keys)
}

/// Check a detached signature (armored or binary) over `document` against `keys`. Returns
/// the id of the key that made it; `None` when no key did (or it is no signature).
pub fn verify(document: &[u8], signature: &[u8], keys: &[SignedPublicKey]) -> Option<String> {
    let sig = if signature.starts_with(b"-----BEGIN") {
        DetachedSignature::from_armor_single(signature)
            .ok()
            .map(|(s, _)| s)
    } else {
        DetachedSignature::from_bytes(signature).ok()
    }?;
    for key in keys {
        if sig.verify(key, document).is_ok() {
            return Some(key.key_id().to_string());
        }
        for sub in &key.public_subkeys {
            if sig.verify(sub, document).is_ok() {
                return Some(sub.key_id().to_string());
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_with_its_key_only_over_its_document() {
        let (secret, public) = generate("t").unwrap();
        let (_, other) = generate("u").unwrap();
        let key = SignedSecretKey::from_string(&secret).unwrap().0;
        let public = SignedPublicKey::from_string(&public).unwrap().0;
        let other = SignedPublicKey::from_string(&other).unwrap().0;
        let sig = sign(&key, b"manifest").unwrap();
        assert!(sig.starts_with(b"-----BEGIN PGP SIGNATURE-----"));
        let id = verify(b"manifest", &sig, std::slice::from_ref(&public)).unwrap();
        assert_eq!(id, public.key_id().to_string());
        assert_eq!(
            verify(b"manifest", &sig, &[other.clone(), public.clone()]),
            Some(id)
        );
        assert_eq!(verify(b"manifest", &sig, &[other]), None);
        assert_eq!(
            verify(b"Manifest", &sig, std::slice::from_ref(&public)),
            None
        );
        assert_eq!(verify(b"manifest", b"junk", &[public]), None);
    }
}
