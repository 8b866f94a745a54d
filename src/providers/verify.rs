//! Is a provider package what its publisher signed? Pure checks, no I/O.
//!
//! The chain is the one Terraform itself follows for a registry install
//! (`internal/getproviders/package_authentication.go`):
//! 1. the detached OpenPGP signature (`SHA256SUMS.sig`) over the `SHA256SUMS` document verifies
//!    against one of the registry's `signing_keys.gpg_public_keys`;
//! 2. the zip's file name is listed in that document, with the sha256 the registry's download
//!    answer gives as `shasum`;
//! 3. the zip's bytes hash to that sha256 ([`sha256_checked`], while they stream).
//!
//! Signatures are checked with rpgp (`pgp`, pure Rust), never by hand.

use std::collections::BTreeMap;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use pgp::composed::{Deserializable, DetachedSignature, SignedPublicKey};
use sha2::{Digest, Sha256};

/// Why a package was refused. Each is a `result` label of
/// `tfmirror_provider_verifications_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The registry gave no signing key, and `providers.allow_unsigned` is off.
    NoSigningKeys,
    /// No key parsed, or none has valid self-signatures.
    BadKey,
    /// The signature does not verify against any of the keys.
    BadSignature,
    /// `SHA256SUMS` is not a checksum document, or does not list the package.
    NotListed,
    /// The registry's `shasum` differs from the signed document's.
    ShasumMismatch,
    /// The zip's bytes do not hash to the signed sha256.
    ChecksumMismatch,
}

impl Refusal {
    pub const ALL: [Refusal; 6] = [
        Refusal::NoSigningKeys,
        Refusal::BadKey,
        Refusal::BadSignature,
        Refusal::NotListed,
        Refusal::ShasumMismatch,
        Refusal::ChecksumMismatch,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Refusal::NoSigningKeys => "no_signing_keys",
            Refusal::BadKey => "bad_key",
            Refusal::BadSignature => "bad_signature",
            Refusal::NotListed => "not_listed",
            Refusal::ShasumMismatch => "shasum_mismatch",
            Refusal::ChecksumMismatch => "checksum_mismatch",
        }
    }
}

/// A sha256 digest.
pub type Sha = [u8; 32];

/// Parse a `SHA256SUMS` document (`<hex>  <file>` per line, as `sha256sum` writes it; a `*`
/// before the name marks binary mode). Any malformed line rejects the whole document.
pub fn parse_sums(doc: &[u8]) -> Result<BTreeMap<String, Sha>, Refusal> {
    let text = std::str::from_utf8(doc).map_err(|_| Refusal::NotListed)?;
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let (hex, name) = line
            .split_once(char::is_whitespace)
            .ok_or(Refusal::NotListed)?;
        let name = name.trim_start().trim_start_matches('*');
        let sha = parse_hex(hex).ok_or(Refusal::NotListed)?;
        if name.is_empty() || name.contains('/') {
            return Err(Refusal::NotListed);
        }
        out.insert(name.to_string(), sha);
    }
    if out.is_empty() {
        return Err(Refusal::NotListed);
    }
    Ok(out)
}

pub fn parse_hex(hex: &str) -> Option<Sha> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in hex.as_bytes().chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

pub fn to_hex(sha: &Sha) -> String {
    sha.iter().map(|b| format!("{b:02x}")).collect()
}

/// Terraform's hash of a whole provider zip, as lock files and mirrors write it.
pub fn zh(sha: &Sha) -> String {
    format!("zh:{}", to_hex(sha))
}

/// Check `signature` (binary or ASCII-armored, detached) over `document` against the armored
/// public keys. Returns the id (hex) of the key that made it.
pub fn check_signature(
    document: &[u8],
    signature: &[u8],
    armored_keys: &[String],
) -> Result<String, Refusal> {
    if armored_keys.is_empty() {
        return Err(Refusal::NoSigningKeys);
    }
    let keys: Vec<SignedPublicKey> = armored_keys
        .iter()
        .filter_map(|a| SignedPublicKey::from_string(a).ok().map(|(k, _)| k))
        // A key whose own binding signatures do not verify is no key at all.
        .filter(|k| k.verify().is_ok())
        .collect();
    if keys.is_empty() {
        return Err(Refusal::BadKey);
    }
    let sig = if signature.starts_with(b"-----BEGIN") {
        DetachedSignature::from_armor_single(signature).map(|(s, _)| s)
    } else {
        DetachedSignature::from_bytes(signature)
    }
    .map_err(|_| Refusal::BadSignature)?;
    for key in &keys {
        if sig.verify(key, document).is_ok() {
            return Ok(pgp::types::KeyDetails::key_id(key).to_string());
        }
        for sub in &key.public_subkeys {
            if sig.verify(sub, document).is_ok() {
                return Ok(pgp::types::KeyDetails::key_id(sub).to_string());
            }
        }
    }
    Err(Refusal::BadSignature)
}

/// The signed sha256 of `filename`, checked against the registry's own `shasum` claim.
pub fn expected_sha(
    sums: &BTreeMap<String, Sha>,
    filename: &str,
    registry_shasum: Option<&str>,
) -> Result<Sha, Refusal> {
    let sha = *sums.get(filename).ok_or(Refusal::NotListed)?;
    if let Some(claim) = registry_shasum {
        if parse_hex(&claim.to_ascii_lowercase()) != Some(sha) {
            return Err(Refusal::ShasumMismatch);
        }
    }
    Ok(sha)
}

/// The platform (`os_arch`) of a package file name
/// `terraform-provider-<type>_<version>_<os>_<arch>.zip`, for this provider and version.
pub fn platform_of(filename: &str, provider_type: &str, version: &str) -> Option<String> {
    let rest = filename
        .strip_prefix(&format!("terraform-provider-{provider_type}_{version}_"))?
        .strip_suffix(".zip")?;
    let (os, arch) = rest.split_once('_')?;
    let ok = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric());
    (ok(os) && ok(arch)).then(|| format!("{os}_{arch}"))
}

/// A body stream that hashes what passes and, at its end, fails unless the bytes hash to
/// `expected`. A fill reading it therefore never commits a package that does not match, and
/// its readers never get the end of one (see `mirror::serve_fill`).
pub fn sha256_checked(
    body: BoxStream<'static, Result<Bytes, &'static str>>,
    expected: Sha,
    on_mismatch: impl FnOnce() + Send + 'static,
) -> BoxStream<'static, Result<Bytes, &'static str>> {
    struct St {
        body: BoxStream<'static, Result<Bytes, &'static str>>,
        hasher: Option<Sha256>,
        on_mismatch: Option<Box<dyn FnOnce() + Send>>,
    }
    let st = St {
        body,
        hasher: Some(Sha256::new()),
        on_mismatch: Some(Box::new(on_mismatch)),
    };
    futures::stream::unfold((st, expected), |(mut st, expected)| async move {
        let hasher = st.hasher.as_mut()?;
        match st.body.next().await {
            Some(Ok(chunk)) => {
                hasher.update(&chunk);
                Some((Ok(chunk), (st, expected)))
            }
            Some(Err(e)) => {
                st.hasher = None;
                Some((Err(e), (st, expected)))
            }
            None => {
                let got: Sha = st.hasher.take()?.finalize().into();
                if got == expected {
                    None
                } else {
                    if let Some(f) = st.on_mismatch.take() {
                        f();
                    }
                    Some((Err("package checksum mismatch"), (st, expected)))
                }
            }
        }
    })
    .boxed()
}

pub fn sha256(bytes: &[u8]) -> Sha {
    Sha256::digest(bytes).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "aa00000000000000000000000000000000000000000000000000000000000000";

    #[test]
    fn sums_parse_as_sha256sum_writes_them() {
        let doc = format!("{A}  terraform-provider-x_1.0.0_linux_amd64.zip\n{A} *terraform-provider-x_1.0.0_manifest.json\n");
        let s = parse_sums(doc.as_bytes()).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s["terraform-provider-x_1.0.0_linux_amd64.zip"][0], 0xaa);
        for bad in [
            "",
            "zz  a.zip\n",
            &format!("{A}  a/../b.zip\n"),
            &format!("{A}\n"),
        ] {
            assert!(parse_sums(bad.as_bytes()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn expected_sha_needs_listing_and_agreement() {
        let s = parse_sums(format!("{A}  p.zip\n").as_bytes()).unwrap();
        assert!(expected_sha(&s, "p.zip", Some(A)).is_ok());
        assert!(expected_sha(&s, "p.zip", Some(&A.to_uppercase())).is_ok());
        assert!(expected_sha(&s, "p.zip", None).is_ok());
        assert_eq!(expected_sha(&s, "q.zip", None), Err(Refusal::NotListed));
        let other = A.replace("aa", "bb");
        assert_eq!(
            expected_sha(&s, "p.zip", Some(&other)),
            Err(Refusal::ShasumMismatch)
        );
    }

    #[test]
    fn platforms_come_from_canonical_file_names() {
        let p = |f| platform_of(f, "aws", "5.1.0");
        assert_eq!(
            p("terraform-provider-aws_5.1.0_linux_amd64.zip").as_deref(),
            Some("linux_amd64")
        );
        assert_eq!(p("terraform-provider-aws_5.1.0_manifest.json"), None);
        assert_eq!(p("terraform-provider-aws_5.1.1_linux_amd64.zip"), None);
        assert_eq!(p("terraform-provider-awsx_5.1.0_linux_amd64.zip"), None);
        assert_eq!(p("terraform-provider-aws_5.1.0_linux_.zip"), None);
    }

    #[test]
    fn every_refusal_is_exported_from_the_first_scrape() {
        for r in Refusal::ALL {
            assert!(
                crate::metrics::PROVIDER_VERIFICATION_RESULTS.contains(&r.label()),
                "{r:?}"
            );
        }
    }

    #[test]
    fn no_keys_is_its_own_refusal() {
        assert_eq!(
            check_signature(b"doc", b"sig", &[]),
            Err(Refusal::NoSigningKeys)
        );
        assert_eq!(
            check_signature(b"doc", b"sig", &["not a key".into()]),
            Err(Refusal::BadKey)
        );
    }

    fn key() -> pgp::composed::SignedSecretKey {
        use pgp::composed::{KeyType, SecretKeyParamsBuilder};
        let mut rng = rand::thread_rng();
        SecretKeyParamsBuilder::default()
            .key_type(KeyType::Ed25519Legacy)
            .can_certify(true)
            .can_sign(true)
            .primary_user_id("Test <t@example.test>".into())
            .build()
            .unwrap()
            .generate(&mut rng)
            .unwrap()
            .sign(&mut rng, &pgp::types::Password::empty())
            .unwrap()
    }

    fn detached(k: &pgp::composed::SignedSecretKey, doc: &[u8]) -> DetachedSignature {
        DetachedSignature::sign_binary_data(
            rand::thread_rng(),
            &k.primary_key,
            &pgp::types::Password::empty(),
            pgp::crypto::hash::HashAlgorithm::Sha256,
            doc,
        )
        .unwrap()
    }

    #[test]
    fn signatures_verify_only_with_the_named_key_over_the_exact_document() {
        use pgp::composed::ArmorOptions;
        use pgp::ser::Serialize;
        let (k, other) = (key(), key());
        let armored = |k: &pgp::composed::SignedSecretKey| {
            SignedPublicKey::from(k.clone())
                .to_armored_string(ArmorOptions::default())
                .unwrap()
        };
        let doc = b"aa  p.zip\n";
        let sig = detached(&k, doc);
        let binary = sig.to_bytes().unwrap();
        let id = check_signature(doc, &binary, &[armored(&k)]).unwrap();
        assert_eq!(id.len(), 16);
        // Armored signatures too, and any one of several keys.
        let text = sig.to_armored_bytes(ArmorOptions::default()).unwrap();
        assert!(check_signature(doc, &text, &[armored(&other), armored(&k)]).is_ok());
        for (d, s, keys, why) in [
            (
                &b"ab  p.zip\n"[..],
                binary.clone(),
                vec![armored(&k)],
                "other document",
            ),
            (doc, binary.clone(), vec![armored(&other)], "other key"),
            (
                doc,
                detached(&other, doc).to_bytes().unwrap(),
                vec![armored(&k)],
                "signed by another",
            ),
            (
                doc,
                b"garbage".to_vec(),
                vec![armored(&k)],
                "not a signature",
            ),
        ] {
            assert_eq!(
                check_signature(d, &s, &keys),
                Err(Refusal::BadSignature),
                "{why}"
            );
        }
    }

    #[tokio::test]
    async fn checked_stream_fails_at_the_end_on_mismatch() {
        let chunks = || {
            futures::stream::iter(vec![
                Ok(Bytes::from_static(b"ab")),
                Ok(Bytes::from_static(b"c")),
            ])
            .boxed()
        };
        let good: Vec<_> = sha256_checked(chunks(), sha256(b"abc"), || {})
            .collect()
            .await;
        assert_eq!(good.len(), 2);
        assert!(good.iter().all(Result::is_ok));
        let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let f = flag.clone();
        let bad: Vec<_> = sha256_checked(chunks(), sha256(b"abd"), move || {
            f.store(true, std::sync::atomic::Ordering::SeqCst)
        })
        .collect()
        .await;
        assert_eq!(bad.len(), 3);
        assert!(bad[2].is_err());
        assert!(flag.load(std::sync::atomic::Ordering::SeqCst));
    }
}
