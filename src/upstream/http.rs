//! HTTP to provider registries and to the hosts their answers name, and the one rule for
//! where those requests may go.
//!
//! Where bytes may come from: a registry's download answer names the package, its
//! `SHA256SUMS` and the signature, usually on another host than the registry (a release CDN,
//! or GitHub, which redirects to its asset hosts). tfmirror fetches those URLs, and follows
//! redirects ([`get_following`]), only over https and only to hosts the answer names or
//! `providers.allowed_hosts` lists ([`may_fetch`]). No credential is ever sent with them.
//! GitLab's own hop rule (its credential to its origin only, object storage followed) is
//! [`super::gitlab::open`]'s.
//!
//! Every GET goes through a [`Transport`], the one seam between the mirror and the network
//! (as [`super::gitlab::Fetcher`] is for GitLab): the real one is the https client built by
//! [`super::tls::http_client`], unit tests put a stub there. Small answers are read with a
//! bound ([`read_limited`], `limits.max_listing_size`). [`observed`] tells a request's access
//! line what the upstream answered for it.

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, StatusCode};
use url::Url;

use super::breaker::{RateLimits, Seen, Verdict};

const MAX_REDIRECTS: usize = 5;

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
    pub fn from_status(status: StatusCode, headers: &http::HeaderMap) -> UpError {
        match status {
            StatusCode::NOT_FOUND => UpError::NotFound,
            StatusCode::TOO_MANY_REQUESTS => UpError::RateLimited {
                retry_after: crate::upstream::health::retry_after(headers).map(|d| d.as_secs()),
            },
            s => UpError::Status(s),
        }
    }

    /// The metric label of this failure (`tfmirror_upstream_requests_total`).
    pub fn outcome(&self) -> &'static str {
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
pub struct Http {
    client: reqwest::Client,
    read_timeout: Duration,
}

impl Http {
    pub fn new(config: &crate::config::Config) -> Result<Http, String> {
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

/// GET `url`, following redirects by hand. With `named` empty the URL is a registry call
/// (https enforced by the client); otherwise every hop must pass [`may_fetch`]. Each hop
/// is one [`Transport::get`] (the https client's head must come within `timeouts.read`).
pub async fn get_following(
    http: &dyn Transport,
    url: &Url,
    named: &[String],
    allowed: &[String],
) -> Result<reqwest::Response, UpError> {
    let mut url = url.clone();
    for _ in 0..=MAX_REDIRECTS {
        if !named.is_empty() && !may_fetch(&url, named, allowed) {
            tracing::warn!(
                host = authority(&url).as_deref(),
                "refused to fetch a provider file from a host the registry did not name"
            );
            return Err(UpError::Protocol("host not allowed for provider downloads"));
        }
        let resp = match http.get(&url).await {
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

/// Read a small answer whole, refusing one over `limit` bytes (`limits.max_listing_size`):
/// a declared length over it before a byte is read, an undeclared one as soon as it passes.
pub async fn read_limited(mut resp: reqwest::Response, limit: usize) -> Result<Bytes, UpError> {
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
