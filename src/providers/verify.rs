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
    /// Every refusal, for the tests that check each is counted and named.
    #[cfg(test)]
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

/// A `SHA256SUMS` document, read as Terraform reads it to find one package
/// (`matchingChecksumAuthentication` in `internal/getproviders/package_authentication.go`):
/// the bytes split on `\n`, each line split into whitespace-separated fields, and the
/// **first** line whose second field is the file name, byte for byte, gives its checksum.
/// A `*` before the name (`sha256sum -b`) is part of the name, so it matches nothing; lines
/// with fewer than two fields (blank lines, comments of one word) and later lines for the
/// same name are ignored; nothing else in the document makes it unreadable.
///
/// So a package is served only against the entry Terraform itself would check it against
/// when installing straight from the registry, and refused whenever Terraform would refuse it
/// (its first line's checksum is not 64 hex digits, or no line names it). Terraform decodes a
/// shorter hex string into a zero-padded sha256 that no real package has, and crashes on a
/// longer one: both are refused here.
///
/// (The `zh:` hashes Terraform records in a lock file after a signed install are a separate
/// reading: every line's, or none if any line is not `<64 hex> <name>`. A network mirror's
/// `hashes` never reach the lock file, so [`super::mirror`] lists each archive's own entry.)
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sums {
    /// Each name the document lists, with its first line's checksum: `None` when that is not
    /// a sha256 in hex (Terraform then refuses the file, whatever later lines say).
    first: BTreeMap<String, Option<Sha>>,
}

impl Sums {
    pub fn parse(doc: &[u8]) -> Sums {
        let mut first = BTreeMap::new();
        for line in doc.split(|&b| b == b'\n') {
            let mut fields = fields(line);
            let (Some(hex), Some(name)) = (fields.next(), fields.next()) else {
                continue;
            };
            // A name that is not UTF-8 never equals a registry's file name (a JSON string).
            let Ok(name) = std::str::from_utf8(name) else {
                continue;
            };
            first
                .entry(name.to_string())
                .or_insert_with(|| std::str::from_utf8(hex).ok().and_then(parse_hex));
        }
        Sums { first }
    }

    /// The checksum Terraform checks `filename` against.
    pub fn sha_of(&self, filename: &str) -> Result<Sha, Refusal> {
        self.first
            .get(filename)
            .copied()
            .flatten()
            .ok_or(Refusal::NotListed)
    }

    /// Every name Terraform would find a checksum for, with that checksum.
    pub fn listed(&self) -> impl Iterator<Item = (&str, Sha)> {
        self.first
            .iter()
            .filter_map(|(name, sha)| Some((name.as_str(), (*sha)?)))
    }
}

impl FromIterator<(String, Sha)> for Sums {
    fn from_iter<I: IntoIterator<Item = (String, Sha)>>(entries: I) -> Sums {
        Sums {
            first: entries.into_iter().map(|(n, s)| (n, Some(s))).collect(),
        }
    }
}

/// The whitespace-separated fields of `line`, as Go's `bytes.Fields` splits them: at Unicode
/// white space (which `char::is_whitespace` and Go's `unicode.IsSpace` agree on), with bytes
/// that are not UTF-8 taken as part of a field.
fn fields(line: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut spaces = Vec::new();
    let mut at = 0;
    for chunk in line.utf8_chunks() {
        for (i, c) in chunk.valid().char_indices() {
            if c.is_whitespace() {
                spaces.push((at + i, at + i + c.len_utf8()));
            }
        }
        at += chunk.valid().len() + chunk.invalid().len();
    }
    spaces.push((line.len(), line.len()));
    let mut start = 0;
    spaces.into_iter().filter_map(move |(from, to)| {
        let field = &line[start..from];
        start = to;
        (!field.is_empty()).then_some(field)
    })
}

/// A sha256 written as 64 hex digits, either case (as Go's `hex.Decode` reads them; nothing
/// else, not even a sign).
pub fn parse_hex(hex: &str) -> Option<Sha> {
    let digits = hex.as_bytes();
    if digits.len() != 64 {
        return None;
    }
    let nibble = |b: u8| char::from(b).to_digit(16);
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(digits.chunks(2)) {
        let (hi, lo) = (nibble(pair[0])?, nibble(pair[1])?);
        // Two nibbles: below 256.
        *byte = (hi << 4 | lo) as u8;
    }
    Some(out)
}

pub fn to_hex(sha: &Sha) -> String {
    sha.iter().map(|b| format!("{b:02x}")).collect()
}

/// Terraform's hash of a whole provider zip, as lock files and mirrors write it, from the
/// zip's sha256 in hex (as a verified `SHA256SUMS` lists it).
pub fn zh(sha256_hex: &str) -> String {
    format!("zh:{sha256_hex}")
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
    sums: &Sums,
    filename: &str,
    registry_shasum: Option<&str>,
) -> Result<Sha, Refusal> {
    let sha = sums.sha_of(filename)?;
    if let Some(claim) = registry_shasum {
        if parse_hex(claim) != Some(sha) {
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

#[cfg(test)]
pub fn sha256(bytes: &[u8]) -> Sha {
    Sha256::digest(bytes).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "aa00000000000000000000000000000000000000000000000000000000000000";

    /// Which checksum Terraform's lookup finds for `p.zip` in `doc`, as hex.
    fn looked_up(doc: &[u8]) -> Option<String> {
        Sums::parse(doc).sha_of("p.zip").ok().map(|s| to_hex(&s))
    }

    #[test]
    fn the_first_line_naming_the_file_byte_for_byte_wins() {
        let b = A.replace("aa", "bb");
        for (doc, found) in [
            (format!("{A}  p.zip\n"), Some(A)),
            (format!("{A}  p.zip"), Some(A)),
            (format!("{A}  p.zip\n{b}  p.zip\n"), Some(A)),
            (format!("{b}  q.zip\n{A}  p.zip\n"), Some(A)),
            // What Terraform ignores: lines with fewer than two fields, other names.
            (format!("# comment\n\n   \nREADME\n{A}  p.zip\n"), Some(A)),
            (format!("{A}  p.zip  third field\n"), Some(A)),
            // Go's white space: tab, CR, VT, FF, NEL, NBSP.
            (format!("{A}\tp.zip\r\n"), Some(A)),
            (format!("\x0b{A}\x0cp.zip\n"), Some(A)),
            (format!("{A}\u{85}p.zip\u{a0}\n"), Some(A)),
            (format!("{}  p.zip\n", A.to_uppercase()), Some(A)),
            // Not the name: `*` (binary mode) and case are part of it.
            (format!("{A} *p.zip\n"), None),
            (format!("{A}  P.zip\n"), None),
            (format!("{A}  ./p.zip\n"), None),
            // The first line for the name decides, even when it is unreadable.
            (format!("zz  p.zip\n{A}  p.zip\n"), None),
            (format!("{}  p.zip\n{A}  p.zip\n", &A[..62]), None),
            (format!("{A}0  p.zip\n"), None),
            ("p.zip\n".to_string(), None),
            (String::new(), None),
        ] {
            assert_eq!(looked_up(doc.as_bytes()).as_deref(), found, "{doc:?}");
        }
        // Bytes that are not UTF-8 belong to their field; they break nothing else.
        let mut doc = b"\xff\xfe  x.zip\n".to_vec();
        doc.extend(format!("{A}  p.zip\n").as_bytes());
        assert_eq!(looked_up(&doc).as_deref(), Some(A));
        let mut doc = format!("{A}  p.zip").into_bytes();
        doc.push(0xff);
        assert_eq!(looked_up(&doc), None);
    }

    #[test]
    fn listed_names_are_those_terraform_finds_a_checksum_for() {
        let b = A.replace("aa", "bb");
        let doc = format!("{A}  p.zip\n{b}  p.zip\nbad  q.zip\n{b}  q.zip\n{b} *r.zip\n");
        let listed: Vec<_> = Sums::parse(doc.as_bytes())
            .listed()
            .map(|(n, s)| (n.to_string(), to_hex(&s)))
            .collect();
        assert_eq!(
            listed,
            [
                ("*r.zip".to_string(), b.clone()),
                ("p.zip".to_string(), A.to_string())
            ]
        );
    }

    #[test]
    fn hex_is_64_digits_and_nothing_else() {
        assert_eq!(parse_hex(A).map(|s| s[0]), Some(0xaa));
        assert_eq!(parse_hex(&A.to_uppercase()).map(|s| s[0]), Some(0xaa));
        // `u8::from_str_radix` would take a sign: Go's hex.Decode does not.
        for bad in [
            format!("+a{}", &A[2..]),
            format!("-0{}", &A[2..]),
            format!(" a{}", &A[2..]),
            A[..62].to_string(),
            format!("{A}00"),
            format!("é{}", &A[2..]),
        ] {
            assert_eq!(parse_hex(&bad), None, "{bad:?}");
        }
    }

    #[test]
    fn expected_sha_needs_listing_and_agreement() {
        let s = Sums::parse(format!("{A}  p.zip\n").as_bytes());
        assert!(expected_sha(&s, "p.zip", Some(A)).is_ok());
        assert!(expected_sha(&s, "p.zip", Some(&A.to_uppercase())).is_ok());
        assert!(expected_sha(&s, "p.zip", None).is_ok());
        assert_eq!(expected_sha(&s, "q.zip", None), Err(Refusal::NotListed));
        let other = A.replace("aa", "bb");
        assert_eq!(
            expected_sha(&s, "p.zip", Some(&other)),
            Err(Refusal::ShasumMismatch)
        );
        assert_eq!(
            expected_sha(&s, "p.zip", Some(&format!("+a{}", &A[2..]))),
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
