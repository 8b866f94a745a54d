//! Talking to provider registries: service discovery, the provider registry protocol's
//! `versions` and `download` calls, and fetching the files a download answer names.
//!
//! Where bytes may come from: a registry's download answer names the package, its
//! `SHA256SUMS` and the signature, usually on another host than the registry (a release CDN,
//! or GitHub, which redirects to its asset hosts). tfmirror fetches those URLs, and follows
//! redirects, only over https and only to hosts the answer names or `providers.allowed_hosts`
//! lists ([`may_fetch`]). No credential is ever sent with them. Registry calls themselves go
//! to the configured base URL's discovered `providers.v1` root, https only.
//!
//! URLs can carry signatures (presigned CDN links): none is ever logged, and reqwest's errors
//! are stripped of theirs ([`crate::upstream::gitlab::upstream_error`]).
//!
//! Every GET goes through a [`Transport`], the one seam between the mirror and the network
//! (as [`crate::upstream::gitlab::Fetcher`] is for GitLab): the real one is an https client, unit tests
//! put a stub there; discovery, fetch rules, redirects and breakers run above it either way.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, StatusCode};
use serde::Deserialize;
use url::Url;

use super::route::{Platform, ProviderId};
use crate::metrics;
use crate::upstream::breaker::{Breaker, RateLimits, Seen, Verdict};

const MAX_REDIRECTS: usize = 5;
/// How long a registry's discovered `providers.v1` root is reused.
const DISCOVERY_TTL: Duration = Duration::from_secs(3600);

/// Why an upstream call gave nothing usable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpError {
    /// The registry does not know this provider or version (404): relayed as 404.
    NotFound,
    /// The upstream answered with a failure status (5xx, other 4xx).
    Status(StatusCode),
    /// The upstream rate-limits this caller (429): relayed with its `Retry-After` (seconds).
    RateLimited { retry_after: Option<u64> },
    /// Unreachable, reset, timed out.
    Transport { timeout: bool },
    /// An answer that breaks the protocol or tfmirror's fetch rules.
    Protocol(&'static str),
}

impl UpError {
    /// What the upstream did, for its breaker ([`crate::upstream::breaker`]).
    pub fn seen(&self) -> Option<Seen> {
        match self {
            UpError::Transport { .. } => Some(Seen::Nothing),
            UpError::Status(s) => Some(Seen::Answer(*s)),
            UpError::RateLimited { .. } => Some(Seen::Answer(StatusCode::TOO_MANY_REQUESTS)),
            UpError::NotFound => Some(Seen::Answer(StatusCode::NOT_FOUND)),
            // An answer that breaks the protocol: the upstream runs, and is wrong.
            UpError::Protocol(_) => None,
        }
    }

    /// Does this count against the upstream's breaker, and allow stale answers, under `rule`?
    pub fn is_outage(&self, rule: RateLimits) -> bool {
        self.seen()
            .is_some_and(|seen| rule.verdict(seen) == Verdict::Outage)
    }

    /// The status a client gets for it: a 404 and a 429 are relayed, the rest is tfmirror's
    /// own 502 (or 504 when the registry timed out).
    pub fn status(&self) -> StatusCode {
        match self {
            UpError::NotFound => StatusCode::NOT_FOUND,
            UpError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            UpError::Transport { timeout: true } => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::BAD_GATEWAY,
        }
    }

    /// A 429's `Retry-After`, in seconds, to relay.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            UpError::RateLimited { retry_after } => *retry_after,
            _ => None,
        }
    }

    /// A failure status from the registry, with its headers.
    fn from_status(status: StatusCode, headers: &http::HeaderMap) -> UpError {
        match status {
            StatusCode::NOT_FOUND => UpError::NotFound,
            StatusCode::TOO_MANY_REQUESTS => UpError::RateLimited {
                retry_after: crate::upstream::health::retry_after(headers).map(|d| d.as_secs()),
            },
            s => UpError::Status(s),
        }
    }

    fn outcome(&self) -> &'static str {
        match self {
            UpError::NotFound | UpError::RateLimited { .. } => "4xx",
            UpError::Status(s) if s.is_client_error() => "4xx",
            UpError::Status(_) => "5xx",
            UpError::Transport { timeout: true } => "timeout",
            UpError::Transport { .. } => "error",
            UpError::Protocol(_) => "protocol",
        }
    }
}

pub use crate::cache::records::{PlatformInfo, VersionInfo};

tokio::task_local! {
    /// The last status an upstream answered on behalf of the request being served, for its
    /// access line ([`observed`]).
    static ANSWERED: Arc<AtomicU16>;
}

/// Run `f`, a request's answer, and say the last status an upstream gave for it (`None`:
/// no upstream was asked), as nginx's `$upstream_status` does.
pub async fn observed<T>(f: impl std::future::Future<Output = T>) -> (T, Option<u16>) {
    let seen = Arc::new(AtomicU16::new(0));
    let out = ANSWERED.scope(seen.clone(), f).await;
    let status = seen.load(Ordering::Relaxed);
    (out, (status != 0).then_some(status))
}

/// `f`, to be spawned, still reporting to the request that made it (a task does not inherit
/// its spawner's task-locals).
pub fn carried<F: std::future::Future>(f: F) -> impl std::future::Future<Output = F::Output> {
    let seen = ANSWERED.try_with(Arc::clone).ok();
    async move {
        match seen {
            Some(seen) => ANSWERED.scope(seen, f).await,
            None => f.await,
        }
    }
}

fn answered(status: StatusCode) {
    let _ = ANSWERED.try_with(|s| s.store(status.as_u16(), Ordering::Relaxed));
}

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

/// `host` or `host:port` of a URL, as hosts are named in the fetch rules.
pub fn authority(u: &Url) -> Option<String> {
    let host = u.host_str()?.to_ascii_lowercase();
    Some(match u.port() {
        Some(p) => format!("{host}:{p}"),
        None => host,
    })
}

/// May tfmirror fetch `url`? Only https, and only from a host the registry's answer named or
/// the operator allowed (`host`, `host:port`, or `*.domain` for any subdomain).
pub fn may_fetch(url: &Url, named: &[String], allowed: &[String]) -> bool {
    if url.scheme() != "https" || !url.username().is_empty() || url.password().is_some() {
        return false;
    }
    let Some(auth) = authority(url) else {
        return false;
    };
    let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
    named.contains(&auth)
        || allowed.iter().any(|a| match a.strip_prefix("*.") {
            Some(domain) => host.ends_with(&format!(".{domain}")) && url.port().is_none(),
            None => *a == auth,
        })
}

/// How tfmirror reaches provider registries and the files their answers name: one GET, no
/// redirect followed (each hop is checked against the fetch rules by the caller). The real
/// one is an https client ([`Registries::new`]); provider unit tests put a stub there, so
/// the mirror's decisions (stale lists, refusals, fills) are tested without a process.
#[async_trait::async_trait]
pub trait Transport: Send + Sync + 'static {
    /// GET `url` once; the response as soon as its head is in.
    async fn get(&self, url: &Url) -> Result<reqwest::Response, UpError>;
}

/// The https client: no proxy, no credential, redirects left to the caller, the head within
/// `timeouts.read`.
struct Http {
    client: reqwest::Client,
    read_timeout: Duration,
}

impl Http {
    fn new(config: &crate::config::Config) -> Result<Http, String> {
        // `providers.upstream_ca`, never GitLab's `upstream_ca` (see `upstream::tls`).
        let trust = crate::upstream::tls::Trust::providers(config)?;
        Ok(Http {
            client: crate::upstream::tls::http_client(
                &trust,
                &config.timeouts,
                crate::upstream::tls::Schemes::HttpsOnly,
            )?,
            read_timeout: config.timeouts.read,
        })
    }
}

#[async_trait::async_trait]
impl Transport for Http {
    async fn get(&self, url: &Url) -> Result<reqwest::Response, UpError> {
        tokio::time::timeout(self.read_timeout, self.client.get(url.clone()).send())
            .await
            .map_err(|_| UpError::Transport { timeout: true })?
            .map_err(|e| {
                let timeout = e.is_timeout();
                tracing::warn!(error = %crate::upstream::gitlab::upstream_error(e), "provider registry unreachable");
                UpError::Transport { timeout }
            })
    }
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
            .get("x-terraform-get")
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
            let resp = self.get_following(url, named).await?;
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
            let resp = self
                .get_following(&answer.download_url, &answer.named_hosts())
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

    /// GET `url`, following redirects by hand. With `named` empty the URL is a registry call
    /// (https enforced by the client); otherwise every hop must pass [`may_fetch`]. Each hop
    /// is one [`Transport::get`] (the https client's head must come within `timeouts.read`).
    async fn get_following(
        &self,
        url: &Url,
        named: &[String],
    ) -> Result<reqwest::Response, UpError> {
        let mut url = url.clone();
        for _ in 0..=MAX_REDIRECTS {
            if !named.is_empty() && !may_fetch(&url, named, &self.allowed) {
                tracing::warn!(
                    host = authority(&url).as_deref(),
                    "refused to fetch a provider file from a host the registry did not name"
                );
                return Err(UpError::Protocol("host not allowed for provider downloads"));
            }
            let resp = match self.http.get(&url).await {
                Ok(r) => r,
                Err(e) => {
                    // As nginx's `$upstream_status`: asked, and no answer came.
                    let none = match e {
                        UpError::Transport { timeout: true } => StatusCode::GATEWAY_TIMEOUT,
                        _ => StatusCode::BAD_GATEWAY,
                    };
                    answered(none);
                    return Err(e);
                }
            };
            if resp.status().is_redirection() {
                let next = resp
                    .headers()
                    .get(header::LOCATION)
                    .and_then(|l| l.to_str().ok())
                    .and_then(|l| url.join(l).ok())
                    .ok_or(UpError::Protocol("redirect without a usable Location"))?;
                // Registry calls may not be redirected to plain http either.
                if next.scheme() != "https" {
                    return Err(UpError::Protocol("redirect to plain http refused"));
                }
                url = next;
                continue;
            }
            answered(resp.status());
            return Ok(resp);
        }
        Err(UpError::Protocol("too many redirects"))
    }
}

async fn read_limited(mut resp: reqwest::Response, limit: usize) -> Result<Bytes, UpError> {
    if resp.content_length().is_some_and(|n| n > limit as u64) {
        return Err(UpError::Protocol(
            "answer larger than limits.max_listing_size",
        ));
    }
    let mut body = Vec::new();
    loop {
        let chunk = resp.chunk().await.map_err(|e| UpError::Transport {
            timeout: e.is_timeout(),
        })?;
        let Some(chunk) = chunk else { break };
        if body.len() + chunk.len() > limit {
            return Err(UpError::Protocol(
                "answer larger than limits.max_listing_size",
            ));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fetch_rules() {
        let named = vec![
            "releases.example.com".to_string(),
            "127.0.0.1:8443".to_string(),
        ];
        let allowed = vec![
            "*.githubusercontent.com".to_string(),
            "cdn.example.net".to_string(),
        ];
        let ok = |u: &str| may_fetch(&Url::parse(u).unwrap(), &named, &allowed);
        assert!(ok("https://releases.example.com/p.zip"));
        assert!(ok("https://RELEASES.example.com/p.zip"));
        assert!(ok("https://127.0.0.1:8443/p.zip"));
        assert!(ok("https://objects.githubusercontent.com/x?sig=1"));
        assert!(ok("https://cdn.example.net/p.zip"));
        assert!(!ok("http://releases.example.com/p.zip"), "plain http");
        assert!(!ok("https://127.0.0.1:8444/p.zip"), "another port");
        assert!(!ok("https://githubusercontent.com/x"), "the bare domain");
        assert!(!ok("https://evil.example.com/p.zip"));
        assert!(!ok("https://user:pw@releases.example.com/p.zip"));
        assert!(!ok("https://169.254.169.254/latest/meta-data"));
    }

    #[test]
    fn a_registrys_answers_under_the_default_rule() {
        let rule = RateLimits::default();
        assert!(!UpError::NotFound.is_outage(rule), "a refusal is an answer");
        assert!(UpError::Status(StatusCode::BAD_GATEWAY).is_outage(rule));
        assert!(UpError::Transport { timeout: false }.is_outage(rule));
        let limited = UpError::RateLimited {
            retry_after: Some(30),
        };
        assert!(!limited.is_outage(rule), "a 429 is the caller's own");
        assert!(limited.is_outage(RateLimits::Outage));
        assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(limited.retry_after(), Some(30));
    }
}
