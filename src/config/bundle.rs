//! The `bundle` section: what `tfmirror bundle import` trusts.

use super::*;

/// Signed bundles (`tfmirror bundle import`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BundleConfig {
    /// Armored OpenPGP public keys (files, as `tfmirror bundle keygen` writes `KEY.pub`)
    /// whose signatures `import` accepts, besides the ones given with `--trust`.
    pub trusted_keys: Vec<PathBuf>,
}

impl BundleConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        // Named files must exist now: a typo would otherwise surface only at the first
        // import, as an unknown signer.
        if let Some(p) = self.trusted_keys.iter().find(|p| !p.is_file()) {
            return Err(invalid(
                "bundle.trusted_keys",
                format!("{} is not a readable file", p.display()),
            ));
        }
        Ok(())
    }
}
