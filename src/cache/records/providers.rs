//! The provider mirror's records (see `providers`). Their kinds and key forms are in the
//! parent module's table; these are their schemas.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::PROVIDER_KEY_PREFIX;
use crate::routes::provider::{Platform, ProviderId};

/// Key of a provider's version list: `host/ns/type`.
pub fn provider_versions_key(p: &ProviderId) -> String {
    p.to_string()
}

/// Key of a public registry module's version list: `module:host/ns/name/system`.
pub fn registry_module_versions_key(m: &ProviderId, system: &str) -> String {
    format!("module:{m}/{system}")
}

/// Key of a provider version's verified checksums: `host/ns/type@version`.
pub fn provider_sums_key(p: &ProviderId, version: &str) -> String {
    format!("{p}@{version}")
}

/// Key of a provider platform's download answer: `host/ns/type@version/os_arch`.
pub fn provider_download_key(p: &ProviderId, version: &str, platform: &Platform) -> String {
    format!("{p}@{version}/{platform}")
}

/// Key of a public module version's source: `module:host/ns/name/system@version`.
pub fn public_module_download_key(m: &ProviderId, system: &str, version: &str) -> String {
    format!("module:{m}/{system}@{version}")
}

/// Key of a provider package in the tarball index: `provider:host/ns/type@version/os_arch`.
pub fn provider_archive_key(p: &ProviderId, version: &str, platform: &Platform) -> String {
    format!("{PROVIDER_KEY_PREFIX}{p}@{version}/{platform}")
}

/// A registry's version list for one provider, or (`modules.v1` pass-through) the
/// registry's answer for one module, as it sent it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VersionsRecord {
    pub versions: Vec<VersionInfo>,
    pub fetched_at: u64,
    #[serde(default)]
    pub module_listing: Option<serde_json::Value>,
}

/// One version in a registry's `versions` answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VersionInfo {
    pub version: String,
    #[serde(default)]
    pub protocols: Vec<String>,
    #[serde(default)]
    pub platforms: Vec<PlatformInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PlatformInfo {
    pub os: String,
    pub arch: String,
}

/// A module download answer of a public registry (`X-Terraform-Get`, resolved).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModuleDownloadRecord {
    pub location: String,
    pub fetched_at: u64,
}

/// A version's verified checksums, by platform.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SumsRecord {
    /// `os_arch` -> package.
    pub archives: BTreeMap<String, Package>,
    /// Id of the key whose signature verified; None when accepted unsigned
    /// (`providers.allow_unsigned`).
    pub signed_by: Option<String>,
    pub fetched_at: u64,
    /// blake3 (hex) of the blobs holding `SHA256SUMS` and its signature, byte for byte, for
    /// clients that verify them themselves (the registry protocol pass-through).
    #[serde(default)]
    pub document: Option<String>,
    #[serde(default)]
    pub signature: Option<String>,
}

/// A registry's download answer for one platform, as it sent it (its URLs are rewritten
/// onto tfmirror when served). Recorded once the package it names checked out against the
/// version's verified checksums.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DownloadRecord {
    pub answer: serde_json::Value,
    pub fetched_at: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Package {
    pub filename: String,
    /// sha256 of the zip, hex, from the signed `SHA256SUMS`.
    pub sha256: String,
    /// Terraform's `h1:` hash of the zip's contents, when the package came with one (a
    /// `terraform providers mirror` directory gives it, and it was checked on import):
    /// served before `zh:`, so clients see the hash their mirror directory gave.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub h1: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The provider records' JSON, pinned: a field renamed here would make every cached
    /// provider answer unreadable after an upgrade.
    #[test]
    fn provider_records_keep_their_on_disk_form() {
        fn json<T: Serialize>(v: &T) -> String {
            serde_json::to_string(v).unwrap()
        }
        let versions = VersionsRecord {
            versions: vec![VersionInfo {
                version: "1.0.0".into(),
                protocols: vec!["5.0".into()],
                platforms: vec![PlatformInfo {
                    os: "linux".into(),
                    arch: "amd64".into(),
                }],
            }],
            fetched_at: 1,
            module_listing: None,
        };
        assert_eq!(
            json(&versions),
            r#"{"versions":[{"version":"1.0.0","protocols":["5.0"],"platforms":[{"os":"linux","arch":"amd64"}]}],"fetched_at":1,"module_listing":null}"#
        );
        let sums = SumsRecord {
            archives: BTreeMap::from([(
                "linux_amd64".to_string(),
                Package {
                    filename: "p.zip".into(),
                    sha256: "ab".into(),
                    h1: None,
                },
            )]),
            signed_by: Some("K".into()),
            fetched_at: 2,
            document: Some("cd".into()),
            signature: None,
        };
        assert_eq!(
            json(&sums),
            r#"{"archives":{"linux_amd64":{"filename":"p.zip","sha256":"ab"}},"signed_by":"K","fetched_at":2,"document":"cd","signature":null}"#
        );
        let download = DownloadRecord {
            answer: serde_json::json!({"os": "linux"}),
            fetched_at: 3,
        };
        assert_eq!(
            json(&download),
            r#"{"answer":{"os":"linux"},"fetched_at":3}"#
        );
        let module = ModuleDownloadRecord {
            location: "git::x".into(),
            fetched_at: 4,
        };
        assert_eq!(json(&module), r#"{"location":"git::x","fetched_at":4}"#);
        // Records written before the pass-through fields existed still load.
        let old: SumsRecord =
            serde_json::from_str(r#"{"archives":{},"signed_by":null,"fetched_at":5}"#).unwrap();
        assert_eq!((old.document, old.signature), (None, None));
    }

    /// A package's h1, when it has one, beside its sha256; none: the form without it.
    #[test]
    fn a_package_keeps_its_h1_only_when_it_has_one() {
        let json = |v: &Package| serde_json::to_string(v).unwrap();
        let with_h1 = Package {
            filename: "p.zip".into(),
            sha256: "ab".into(),
            h1: Some("h1:x".into()),
        };
        assert_eq!(
            json(&with_h1),
            r#"{"filename":"p.zip","sha256":"ab","h1":"h1:x"}"#
        );
        // Packages recorded before h1 existed load without one.
        let old: Package = serde_json::from_str(r#"{"filename":"p.zip","sha256":"ab"}"#).unwrap();
        assert_eq!(old.h1, None);
    }
}
