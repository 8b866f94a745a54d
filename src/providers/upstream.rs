//! Talking to provider registries: service discovery, the provider registry protocol's
//! `versions` and `download` calls, and fetching the files a download answer names, with a
//! breaker per registry ([`crate::upstream::breaker`]). How each request is made, and where
//! it may be redirected, is [`crate::upstream::http`]'s.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Deserialize;
use url::Url;

use super::route::{Platform, ProviderId};
use crate::metrics;
use crate::upstream::breaker::{Breaker, RateLimits, Verdict};
pub use crate::upstream::http::{
    authority, carried, get_following, observed, read_limited, Http, Transport, UpError,
};

/// How long a registry's discovered `providers.v1` root is reused.
const DISCOVERY_TTL: Duration = Duration::from_secs(3600);

pub use crate::cache::records::VersionInfo;

#[derive(Deserialize)]
struct VersionsAnswer {
    versions: Vec<VersionInfo>,
}

/// The registry's `:version/download/:os/:arch` answer, its URLs resolved.
#[derive(Debug, Clone)]
pub struct DownloadAnswer {
    pub filename: String,
    pub download_url: Url,
    pub shasums_url: Url,
    pub shasums_signature_url: Url,
    pub shasum: String,
    /// `signing_keys.gpg_public_keys[].ascii_armor`.
    pub keys: Vec<String>,
    /// The answer as the registry sent it, for the registry protocol pass-through.
    pub raw: serde_json::Value,
}

impl DownloadAnswer {
    /// The hosts this answer names: the only ones its files may come from (plus the
    /// allowlist).
    pub fn named_hosts(&self) -> Vec<String> {
        [
            &self.download_url,
            &self.shasums_url,
            &self.shasums_signature_url,
        ]
        .iter()
        .filter_map(|u| authority(u))
        .collect()
    }
}

#[derive(Deserialize)]
struct RawDownload {
    filename: String,
    download_url: String,
    shasums_url: String,
    shasums_signature_url: String,
    shasum: String,
    #[serde(default)]
    signing_keys: RawKeys,
}

#[derive(Deserialize, Default)]
struct RawKeys {
    #[serde(default)]
    gpg_public_keys: Vec<RawKey>,
}

#[derive(Deserialize)]
struct RawKey {
    ascii_armor: String,
}

pub struct Registries {
    bases: BTreeMap<String, Url>,
    allowed: Vec<String>,
    http: Arc<dyn Transport>,
    discovered: moka::sync::Cache<String, Url>,
    max_small: usize,
    breakers: Mutex<BTreeMap<String, Breaker>>,
    /// Whether a registry's 429 is an outage: by default it is its caller's own.
    rate_limits: RateLimits,
    threshold: u32,
    offline: bool,
}

impl Registries {
    /// The registries of `config`, reached over https.
    pub fn new(config: &crate::config::Config) -> Result<Registries, String> {
        Ok(Registries::with_transport(
            config,
            Arc::new(Http::new(config)?),
        ))
    }

    /// The registries of `config`, reached through `http`.
    pub fn with_transport(config: &crate::config::Config, http: Arc<dyn Transport>) -> Registries {
        Registries {
            bases: config.providers.upstreams(),
            allowed: config.providers.allowed_hosts(),
            http,
            discovered: moka::sync::Cache::builder()
                .max_capacity(1000)
                .time_to_live(DISCOVERY_TTL)
                .build(),
            max_small: usize::try_from(config.limits.max_listing_size.as_u64())
                .unwrap_or(usize::MAX),
            breakers: Mutex::new(BTreeMap::new()),
            threshold: config.offline.breaker_threshold.max(1),
            rate_limits: RateLimits::default(),
            offline: config.offline.enabled,
        }
    }

    /// Is `host` a configured registry?
    pub fn knows(&self, host: &str) -> bool {
        self.bases.contains_key(host)
    }

    /// May calls go to `host` now? (Not in offline mode, breaker closed.)
    pub fn available(&self, host: &str) -> bool {
        !self.offline
            && self
                .breakers
                .lock()
                .expect("breakers lock")
                .get(host)
                .is_none_or(|b| b.available(Instant::now()))
    }

    pub fn is_offline(&self) -> bool {
        self.offline
    }

    /// Does `e` count as an outage of its registry (and allow stale answers)?
    pub fn is_outage(&self, e: &UpError) -> bool {
        e.is_outage(self.rate_limits)
    }

    fn record(&self, host: &str, result: &Result<(), UpError>) {
        let verdict = match result {
            Ok(()) => Verdict::Up,
            Err(e) => e
                .seen()
                .map_or(Verdict::Up, |seen| self.rate_limits.verdict(seen)),
        };
        let mut b = self.breakers.lock().expect("breakers lock");
        let entry = b.entry(host.to_string()).or_default();
        let was = entry.available(Instant::now());
        entry.record(verdict, self.threshold, Instant::now());
        if was && !entry.available(Instant::now()) {
            tracing::warn!(registry = host, "provider registry marked down");
        }
    }

    /// The root of a registry service (`providers.v1`, `modules.v1`), from its discovery.
    async fn service_root(&self, host: &str, service: &'static str) -> Result<Url, UpError> {
        let cache_key = format!("{host} {service}");
        if let Some(u) = self.discovered.get(&cache_key) {
            return Ok(u);
        }
        let base = self.bases.get(host).ok_or(UpError::NotFound)?;
        let well_known = base
            .join("/.well-known/terraform.json")
            .map_err(|_| UpError::Protocol("bad base URL"))?;
        let body = self
            .small(host, "provider_discovery", &well_known, &[])
            .await?;
        let v: serde_json::Value =
            serde_json::from_slice(&body).map_err(|_| UpError::Protocol("discovery not JSON"))?;
        // A registry without the service has nothing of that kind: 404.
        let root = v[service].as_str().ok_or(UpError::NotFound)?;
        let mut root = well_known
            .join(root)
            .map_err(|_| UpError::Protocol("bad service URL in discovery"))?;
        if root.scheme() != "https" {
            return Err(UpError::Protocol("discovered service is not https"));
        }
        if !root.path().ends_with('/') {
            root.set_path(&format!("{}/", root.path()));
        }
        self.discovered.insert(cache_key, root.clone());
        Ok(root)
    }

    async fn providers_root(&self, host: &str) -> Result<Url, UpError> {
        self.service_root(host, "providers.v1").await
    }

    /// `modules.v1` of a registry: `GET :namespace/:name/:system/versions`, the body as sent.
    pub async fn module_versions(
        &self,
        p: &ProviderId,
        system: &str,
    ) -> Result<serde_json::Value, UpError> {
        let root = self.service_root(&p.host, "modules.v1").await?;
        let url = root
            .join(&format!("{}/{}/{system}/versions", p.namespace, p.name))
            .map_err(|_| UpError::Protocol("bad versions URL"))?;
        let body = self
            .small(&p.host, "public_module_versions", &url, &[])
            .await?;
        let v: serde_json::Value =
            serde_json::from_slice(&body).map_err(|_| UpError::Protocol("versions not JSON"))?;
        if !v["modules"].is_array() {
            return Err(UpError::Protocol("module versions answer has no modules"));
        }
        Ok(v)
    }

    /// `modules.v1`: `GET :namespace/:name/:system/:version/download`, its `X-Terraform-Get`
    /// resolved against the answer's URL (as Terraform resolves it).
    pub async fn module_download(
        &self,
        p: &ProviderId,
        system: &str,
        version: &str,
    ) -> Result<String, UpError> {
        let root = self.service_root(&p.host, "modules.v1").await?;
        let url = root
            .join(&format!(
                "{}/{}/{system}/{version}/download",
                p.namespace, p.name
            ))
            .map_err(|_| UpError::Protocol("bad download URL"))?;
        let (headers, _) = self
            .small_with_headers(&p.host, "public_module_download", &url)
            .await?;
        let get = headers
            .get(crate::respond::TERRAFORM_GET)
            .and_then(|v| v.to_str().ok())
            .ok_or(UpError::Protocol("download answer has no X-Terraform-Get"))?;
        // go-getter forced sources (`git::https://...`) are not URLs to resolve.
        if get.contains("::") {
            return Ok(get.to_string());
        }
        url.join(get)
            .map(|u| u.to_string())
            .map_err(|_| UpError::Protocol("bad X-Terraform-Get"))
    }

    /// `GET :namespace/:type/versions`.
    pub async fn versions(&self, p: &ProviderId) -> Result<Vec<VersionInfo>, UpError> {
        let root = self.providers_root(&p.host).await?;
        let url = root
            .join(&format!("{}/{}/versions", p.namespace, p.name))
            .map_err(|_| UpError::Protocol("bad versions URL"))?;
        let body = self.small(&p.host, "provider_versions", &url, &[]).await?;
        let a: VersionsAnswer =
            serde_json::from_slice(&body).map_err(|_| UpError::Protocol("versions not JSON"))?;
        // Versions Terraform could not select are of no use; dropping them keeps paths valid.
        Ok(a.versions
            .into_iter()
            .filter(|v| semver::Version::parse(&v.version).is_ok())
            .collect())
    }

    /// `GET :namespace/:type/:version/download/:os/:arch`, its URLs resolved against the
    /// answer's own URL (as Terraform resolves them).
    pub async fn download(
        &self,
        p: &ProviderId,
        version: &str,
        platform: &Platform,
    ) -> Result<DownloadAnswer, UpError> {
        let root = self.providers_root(&p.host).await?;
        let url = root
            .join(&format!(
                "{}/{}/{version}/download/{}/{}",
                p.namespace, p.name, platform.os, platform.arch
            ))
            .map_err(|_| UpError::Protocol("bad download URL"))?;
        let body = self.small(&p.host, "provider_download", &url, &[]).await?;
        let value: serde_json::Value =
            serde_json::from_slice(&body).map_err(|_| UpError::Protocol("download not JSON"))?;
        let raw: RawDownload = serde_json::from_value(value.clone())
            .map_err(|_| UpError::Protocol("download answer lacks fields"))?;
        let resolve = |s: &str| {
            url.join(s)
                .map_err(|_| UpError::Protocol("bad URL in answer"))
        };
        Ok(DownloadAnswer {
            filename: raw.filename,
            download_url: resolve(&raw.download_url)?,
            shasums_url: resolve(&raw.shasums_url)?,
            shasums_signature_url: resolve(&raw.shasums_signature_url)?,
            shasum: raw.shasum,
            keys: raw
                .signing_keys
                .gpg_public_keys
                .into_iter()
                .map(|k| k.ascii_armor)
                .collect(),
            raw: value,
        })
    }

    /// A small file a download answer names (`SHA256SUMS`, its signature), read whole.
    pub async fn named_file(
        &self,
        p: &ProviderId,
        answer: &DownloadAnswer,
        url: &Url,
    ) -> Result<Bytes, UpError> {
        self.small(&p.host, "provider_shasums", url, &answer.named_hosts())
            .await
    }

    /// GET a small answer whole. `named`: when not empty, the fetch rules apply (files named
    /// by a download answer); registry calls go to the registry's own root.
    async fn small(
        &self,
        host: &str,
        label: &'static str,
        url: &Url,
        named: &[String],
    ) -> Result<Bytes, UpError> {
        self.exchange(host, label, url, named).await.map(|(_, b)| b)
    }

    /// A registry call whose headers matter (a module download's `X-Terraform-Get`).
    async fn small_with_headers(
        &self,
        host: &str,
        label: &'static str,
        url: &Url,
    ) -> Result<(http::HeaderMap, Bytes), UpError> {
        self.exchange(host, label, url, &[]).await
    }

    async fn exchange(
        &self,
        host: &str,
        label: &'static str,
        url: &Url,
        named: &[String],
    ) -> Result<(http::HeaderMap, Bytes), UpError> {
        let started = Instant::now();
        let result = async {
            let resp = get_following(&*self.http, url, named, &self.allowed).await?;
            let status = resp.status();
            if !status.is_success() {
                return Err(UpError::from_status(status, resp.headers()));
            }
            let headers = resp.headers().clone();
            Ok((headers, read_limited(resp, self.max_small).await?))
        }
        .await;
        metrics::UPSTREAM_DURATION
            .with_label_values(&[label])
            .observe(started.elapsed().as_secs_f64());
        let outcome = match &result {
            Ok(_) => "2xx",
            Err(e) => e.outcome(),
        };
        metrics::UPSTREAM_REQUESTS
            .with_label_values(&[label, outcome])
            .inc();
        self.record(host, &result.as_ref().map(|_| ()).map_err(Clone::clone));
        result
    }

    /// Open the package named by `answer` for streaming.
    pub async fn open_package(
        &self,
        p: &ProviderId,
        answer: &DownloadAnswer,
    ) -> Result<reqwest::Response, UpError> {
        let result = async {
            let resp = get_following(
                &*self.http,
                &answer.download_url,
                &answer.named_hosts(),
                &self.allowed,
            )
            .await?;
            match resp.status() {
                s if s.is_success() => Ok(resp),
                s => Err(UpError::from_status(s, resp.headers())),
            }
        }
        .await;
        let outcome = match &result {
            Ok(_) => "2xx",
            Err(e) => e.outcome(),
        };
        metrics::UPSTREAM_REQUESTS
            .with_label_values(&["provider_archive", outcome])
            .inc();
        self.record(&p.host, &result.as_ref().map(|_| ()).map_err(Clone::clone));
        result
    }
}
