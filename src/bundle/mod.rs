//! Signed bundles for air-gapped sites: `tfmirror bundle keygen | export | import`.
//!
//! A bundle is a tar. Its first member is `manifest.json` (every item's path, size and
//! sha256), its second `manifest.json.asc` (a detached, armored OpenPGP signature over the
//! manifest's bytes), then the items, each once, in the manifest's order. Anyone can check one
//! by hand: extract, `gpg --verify manifest.json.asc manifest.json`, then `sha256sum -c` the
//! manifest's items.
//!
//! Items, by path (a *card* describes each module or provider and names its files):
//!
//! | path | what |
//! |---|---|
//! | `modules/<ns>/<name>/<system>/module.json` | [`ModuleCard`] |
//! | `modules/<ns>/<name>/<system>/listing/versions.json`, `latest.json`, `v/<version>.json` | listing bodies, as GitLab sent them (versions filtered to the bundle's) |
//! | `modules/<ns>/<name>/<system>/tarball/<version>.tgz` | module packages |
//! | `providers/<host>/<ns>/<type>/provider.json` | [`ProviderCard`] |
//! | `providers/<host>/<ns>/<type>/<version>/SHA256SUMS`, `SHA256SUMS.sig` | the registry's checksums and signature, byte for byte |
//! | `providers/<host>/<ns>/<type>/<version>/<os>_<arch>.zip` | provider packages |
//!
//! - [`sign`]: keys (`keygen`), the signature over a manifest and its check.
//! - [`export`]: a selection of a cache directory as a bundle's items (no network);
//!   [`mod@write`]: those items hashed, signed and written as one file, atomically.
//! - [`import`]: a bundle read, every check made, then installed (`install`).
//! - [`mirrordir`]: a `terraform providers mirror` directory (`import --providers-dir`), each
//!   package checked against its `h1:`/`zh:` hashes, then installed as a bundle's providers
//!   are (`install`), with a `SHA256SUMS` of tfmirror's own and no signature.
//!
//! Trust: the bundle's signature stands for the origin. Provider packages are checked again
//! against the bundle's own `SHA256SUMS`, whose registry signature is not re-checked (the
//! sealed side has no registry to fetch keys from). A mirror directory carries no signature:
//! the operator who ran `terraform providers mirror` stands for it.

pub mod export;
pub mod import;
mod install;
pub mod mirrordir;
pub mod sign;
pub mod write;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::cache::records::{DownloadRecord, Package, VersionInfo};

pub const MANIFEST: &str = "manifest.json";
pub const SIGNATURE: &str = "manifest.json.asc";
/// The manifest's `format`: a reader refuses any other.
pub const FORMAT: &str = "tfmirror-bundle/1";

/// The signed list of items.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    /// Unix seconds of the export.
    pub created_at: u64,
    pub items: Vec<Item>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Item {
    pub path: String,
    pub size: u64,
    /// sha256 of the bytes, lowercase hex.
    pub sha256: String,
}

/// One module: whether GitLab served it to anonymous callers, its listings and tarballs.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ModuleCard {
    /// `namespace/name/system`.
    pub module: String,
    pub public: bool,
    /// Listing op (`versions`, `latest`, `v/<version>`) -> when GitLab answered it.
    pub listings: BTreeMap<String, Fetched>,
    /// Version -> when its tarball was fetched.
    pub tarballs: BTreeMap<String, Fetched>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Fetched {
    /// Unix seconds.
    pub fetched_at: u64,
}

/// One provider: its version list (the bundle's versions only) and, per version, the
/// verified checksums and the platforms whose packages are in the bundle.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderCard {
    /// `host/namespace/type`.
    pub provider: String,
    pub versions: Vec<VersionInfo>,
    pub fetched_at: u64,
    pub releases: BTreeMap<String, Release>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Release {
    /// `os_arch` -> package (file name and sha256 as the signed `SHA256SUMS` says).
    pub archives: BTreeMap<String, Package>,
    pub signed_by: Option<String>,
    pub fetched_at: u64,
    /// Whether `SHA256SUMS.sig` is in the bundle.
    pub signature: bool,
    /// `os_arch` -> when the package was fetched, and the registry's download answer when
    /// the cache had one (the registry protocol pass-through records it; the network mirror
    /// needs none).
    pub platforms: BTreeMap<String, Platform>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Platform {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub download: Option<DownloadRecord>,
    pub package_fetched_at: u64,
}

/// Paths of a module's items.
pub(crate) fn module_dir(module: &str) -> String {
    format!("modules/{module}")
}

pub(crate) fn listing_path(module: &str, op: &str) -> String {
    format!("{}/listing/{op}.json", module_dir(module))
}

pub(crate) fn tarball_path(module: &str, version: &str) -> String {
    format!("{}/tarball/{version}.tgz", module_dir(module))
}

pub(crate) fn provider_dir(provider: &str) -> String {
    format!("providers/{provider}")
}

pub(crate) fn sums_path(provider: &str, version: &str, file: &str) -> String {
    format!("{}/{version}/{file}", provider_dir(provider))
}

pub(crate) fn zip_path(provider: &str, version: &str, platform: &str) -> String {
    format!("{}/{version}/{platform}.zip", provider_dir(provider))
}

/// Is `path` a path a bundle may hold? Relative, under `modules/` or `providers/`, made of
/// plain segments (no `.`, `..`, empty or hidden segment, no backslash), so that no item can
/// name anything outside the bundle's own tree, whatever a reader does with it.
pub fn safe_path(path: &str) -> bool {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || "._+~@:-".contains(c);
    (path.starts_with("modules/") || path.starts_with("providers/"))
        && path.len() <= 1024
        && path
            .split('/')
            .all(|seg| !seg.is_empty() && !seg.starts_with('.') && seg.chars().all(ok_char))
}

/// sha256 of bytes, lowercase hex.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex(&sha2::Sha256::digest(bytes))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_relative_paths_under_the_two_trees() {
        for ok in [
            "modules/infra/vpc/aws/tarball/1.0.0+b.tgz",
            "providers/registry.example:8443/hashicorp/null/1.0.0/SHA256SUMS",
        ] {
            assert!(safe_path(ok), "{ok}");
        }
        for bad in [
            "/modules/a",
            "modules/../x",
            "modules/a/../../etc/passwd",
            "modules//a",
            "modules/./a",
            "modules/.hidden",
            "modules\\a",
            "other/a",
            "modules/a b",
            "manifest.json",
            "",
        ] {
            assert!(!safe_path(bad), "{bad}");
        }
    }
}
