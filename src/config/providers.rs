//! The `providers` section: which provider registries the mirror fronts, and where their
//! files may come from.

use super::*;

/// The provider mirror (`/providers/mirror/`): which registries, and which packages to keep.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProvidersConfig {
    /// Registry hostname (as in provider source addresses) -> base URL, https only; the
    /// registry's service discovery runs against the base URL. Unset: registry.terraform.io
    /// and registry.opentofu.org. A hostname not listed gets 404.
    pub upstreams: Option<std::collections::BTreeMap<String, Url>>,
    /// Hosts (`host`, `host:port` or `*.domain`) package downloads may also be fetched from,
    /// besides the hosts named in the registry's download answer: redirect targets such as
    /// GitHub's release asset hosts. Only https is ever fetched. Unset: GitHub's two asset hosts.
    pub allowed_hosts: Option<Vec<String>>,
    /// Keep and serve packages of registries that publish no signing key, checked against
    /// their `SHA256SUMS` only. Off: such packages are refused.
    pub allow_unsigned: bool,
    /// A PEM file of certificates trusted for provider registries and their download hosts,
    /// besides the system roots, with `upstream_ca`'s rules. `upstream_ca` never applies here.
    pub upstream_ca: Option<PathBuf>,
}

impl ProvidersConfig {
    pub fn upstreams(&self) -> std::collections::BTreeMap<String, Url> {
        self.upstreams.clone().unwrap_or_else(|| {
            ["registry.terraform.io", "registry.opentofu.org"]
                .into_iter()
                .map(|h| {
                    let url = Url::parse(&format!("https://{h}/")).expect("static URL");
                    (h.to_string(), url)
                })
                .collect()
        })
    }

    pub fn allowed_hosts(&self) -> Vec<String> {
        self.allowed_hosts.clone().unwrap_or_else(|| {
            vec![
                "objects.githubusercontent.com".into(),
                "release-assets.githubusercontent.com".into(),
            ]
        })
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if let Some(ca) = &self.upstream_ca {
            crate::pem::certs(ca).map_err(|e| invalid("providers.upstream_ca", e))?;
        }
        for (host, url) in self.upstreams() {
            // The hostname is a key the operator wrote; the URL is not echoed.
            let key = format!("providers.upstreams.{host}");
            if !crate::routes::provider::valid_host(&host) {
                return Err(invalid(
                    "providers.upstreams",
                    "hostnames must be lowercase host[:port]",
                ));
            }
            check_base_url(&key, &url)?;
            if url.scheme() != "https" {
                return Err(invalid(&key, "must be an https URL"));
            }
        }
        for pattern in self.allowed_hosts() {
            let bare = pattern.strip_prefix("*.").unwrap_or(&pattern);
            if !crate::routes::provider::valid_host(bare) {
                return Err(invalid(
                    "providers.allowed_hosts",
                    "entries must be lowercase host, host:port or *.domain",
                ));
            }
        }
        Ok(())
    }
}
