//! Everything tfmirror sends upstream, in one place: GitLab and provider registries alike.
//!
//! - [`tls`]: the one TLS trust decision per upstream (system roots, `upstream_ca`'s CA
//!   certificates as roots, every certificate of `upstream_ca` pinned) and the one builder of
//!   upstream `reqwest` clients (clippy forbids any other `ClientBuilder::build`).
//! - [`gitlab`]: the GitLab adapter ([`gitlab::Fetcher`], the seam a test stub fills):
//!   registry calls with a bounded read, and downloads followed through redirects with the
//!   credential sent to GitLab's origin only.
//! - [`breaker`]: what an answer says about an upstream as a whole (the 429 rule is its one
//!   parameter), and the breaker type provider registries count with.
//! - [`health`]: GitLab's breaker and its background probe.
//! - This module: the upstream's address, DNS off the request path, timeouts, and pingora's
//!   [`HttpPeer`] for what is proxied.
//!
//! Provider registries are reached through `providers::upstream` on top of these (the same
//! client builder and trust, the same outage rule); where their files may come from is its
//! `may_fetch` rule.
//!
//! Pingora's [`HttpPeer`] carries proxied requests (pass-through, uploads).
//! `HttpPeer::new` resolves names with a *blocking* `to_socket_addrs()`, so tfmirror resolves
//! the upstream host itself with tokio's resolver (off the async workers), caches the answer
//! and hands pingora a ready `SocketAddr`. The SNI is always the upstream host name: with
//! rustls an empty SNI would disable certificate verification. A `reqwest` client fetches
//! what tfmirror itself must read and follow: `/file`, which GitLab may answer with a 302 to
//! object storage on another host. Following that redirect here keeps presigned URLs away
//! from clients.

pub mod breaker;
pub mod gitlab;
pub mod health;
pub mod http;
pub mod tls;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pingora::prelude::HttpPeer;
use pingora::{Error, ErrorType, OrErr, Result};
use url::Url;

use crate::config::{Config, Timeouts};
use tls::{Schemes, TlsL4, Trust};

/// How long a DNS answer is used before it is refreshed in the background.
const DNS_TTL: Duration = Duration::from_secs(30);

/// What kind of exchange a peer is for; it decides the read timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// Small JSON answers: Terraform waits 10 s at most, so should we.
    Registry,
    /// Tarballs, uploads, anything of unknown size: long per-read timeouts.
    Transfer,
}

pub struct Upstream {
    url: Url,
    host: String,
    /// `Host` header value: the host, plus the port when it is not the scheme's default.
    authority: String,
    /// Relative URL root, without a trailing slash (empty for most GitLabs).
    prefix: String,
    /// For a TLS upstream: the handshake pingora's peers run through (see `upstream::tls`).
    tls_l4: Option<Arc<TlsL4>>,
    timeouts: Timeouts,
    /// `limits.max_listing_size`: the largest registry answer tfmirror reads into memory.
    max_listing: usize,
    dns: Resolver,
    /// Client for the fetches tfmirror reads itself (see module docs).
    pub http: reqwest::Client,
}

impl Upstream {
    pub fn new(config: &Config) -> std::result::Result<Upstream, String> {
        let url = config.upstream.clone();
        let tls = url.scheme() == "https";
        let host = url.host_str().ok_or("upstream has no host")?.to_string();
        let port = url.port_or_known_default().ok_or("upstream has no port")?;
        let authority = match url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.clone(),
        };
        // IPv6 literals come bracketed from `Url`; SNI and resolution want them bare.
        let bare_host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();

        let trust = Trust::gitlab(config)?;
        if tls && trust.is_empty() {
            return Err(
                "no certificate to verify the upstream with: the system has no CA \
                        certificates and `upstream_ca` is unset"
                    .into(),
            );
        }
        let tls_l4 = if tls {
            Some(Arc::new(TlsL4::new(
                &trust,
                &bare_host,
                config.timeouts.connect,
            )?))
        } else {
            None
        };
        // The same trust as pingora's peers, also for redirects to object storage.
        let http = tls::http_client(&trust, &config.timeouts, Schemes::Any)?;

        Ok(Upstream {
            prefix: url.path().trim_end_matches('/').to_string(),
            dns: Resolver::new(bare_host.clone(), port),
            url,
            host: bare_host,
            authority,
            tls_l4,
            timeouts: config.timeouts.clone(),
            max_listing: usize::try_from(config.limits.max_listing_size.as_u64())
                .unwrap_or(usize::MAX),
            http,
        })
    }

    /// The `Host` header to send upstream.
    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// The upstream path for a tfmirror path: the relative URL root, then the path.
    pub fn path(&self, path_and_query: &str) -> String {
        format!("{}{}", self.prefix, path_and_query)
    }

    /// The absolute upstream URL for a tfmirror path (for the reqwest client).
    pub fn url_for(&self, path_and_query: &str) -> String {
        format!(
            "{}://{}{}",
            self.url.scheme(),
            self.authority,
            self.path(path_and_query)
        )
    }

    /// Total time allowed for a registry answer tfmirror reads itself.
    pub fn registry_timeout(&self) -> Duration {
        self.timeouts.read
    }

    /// The largest registry answer (listing, metadata) read into memory.
    pub fn max_listing(&self) -> usize {
        self.max_listing
    }

    pub fn base_url(&self) -> &Url {
        &self.url
    }

    /// A peer for pingora, with a pre-resolved address, SNI and timeouts.
    pub async fn peer(&self, profile: Profile) -> Result<Box<HttpPeer>> {
        let addr = self.dns.pick().await?;
        // A TLS upstream's handshake runs in tfmirror's own L4 connector, with tfmirror's
        // verifier: pingora sees a plain connection (see `upstream::tls`).
        let mut peer = HttpPeer::new(addr, false, self.host.clone());
        let t = &self.timeouts;
        let o = &mut peer.options;
        o.connection_timeout = Some(t.connect);
        o.total_connection_timeout = Some(t.connect * 2);
        let io = match profile {
            Profile::Registry => t.read,
            Profile::Transfer => t.transfer,
        };
        o.read_timeout = Some(io);
        o.write_timeout = Some(io);
        o.idle_timeout = Some(t.idle);
        o.custom_l4 = self
            .tls_l4
            .clone()
            .map(|l4| l4 as Arc<dyn pingora::connectors::L4Connect + Send + Sync>);
        Ok(Box::new(peer))
    }
}

/// The last DNS answer and when it was obtained.
type DnsAnswer = Mutex<Option<(Arc<[SocketAddr]>, Instant)>>;

/// Caches the upstream's addresses; refreshes them in the background once stale, so only the
/// very first request (or one after a long failure) ever waits on DNS.
struct Resolver {
    host: String,
    port: u16,
    literal: Option<SocketAddr>,
    state: Arc<DnsAnswer>,
    refreshing: Arc<AtomicBool>,
    next: AtomicUsize,
}

impl Resolver {
    fn new(host: String, port: u16) -> Self {
        let literal = host
            .parse::<std::net::IpAddr>()
            .ok()
            .map(|ip| SocketAddr::new(ip, port));
        Resolver {
            host,
            port,
            literal,
            state: Arc::new(Mutex::new(None)),
            refreshing: Arc::new(AtomicBool::new(false)),
            next: AtomicUsize::new(0),
        }
    }

    async fn pick(&self) -> Result<SocketAddr> {
        if let Some(addr) = self.literal {
            return Ok(addr);
        }
        let cached = self.state.lock().expect("dns lock").clone();
        let addrs = match cached {
            Some((addrs, at)) => {
                if at.elapsed() > DNS_TTL {
                    self.refresh_in_background();
                }
                addrs
            }
            None => self.resolve().await?,
        };
        let i = self.next.fetch_add(1, Ordering::Relaxed) % addrs.len();
        Ok(addrs[i])
    }

    async fn resolve(&self) -> Result<Arc<[SocketAddr]>> {
        resolve_into(&self.host, self.port, &self.state).await
    }

    fn refresh_in_background(&self) {
        if self.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let (host, port) = (self.host.clone(), self.port);
        let (state, flag) = (self.state.clone(), self.refreshing.clone());
        tokio::spawn(async move {
            // On failure the old answer stays: a DNS blip must not take the upstream away.
            if let Err(e) = resolve_into(&host, port, &state).await {
                tracing::warn!(error = %e, "upstream DNS refresh failed; keeping the last answer");
            }
            flag.store(false, Ordering::Release);
        });
    }
}

async fn resolve_into(host: &str, port: u16, state: &DnsAnswer) -> Result<Arc<[SocketAddr]>> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .or_err(ErrorType::ConnectNoRoute, "resolving the upstream host")?
        .collect();
    if addrs.is_empty() {
        return Error::e_explain(ErrorType::ConnectNoRoute, "upstream host has no address");
    }
    let addrs: Arc<[SocketAddr]> = addrs.into();
    *state.lock().expect("dns lock") = Some((addrs.clone(), Instant::now()));
    Ok(addrs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora::upstreams::peer::Peer;

    fn upstream(url: &str) -> Upstream {
        let config = Config {
            upstream: Url::parse(url).unwrap(),
            ..Config::default()
        };
        Upstream::new(&config).unwrap()
    }

    #[test]
    fn paths_keep_the_relative_url_root() {
        let u = upstream("https://example.com/gitlab/");
        assert_eq!(u.path("/api/v4/x?y=1"), "/gitlab/api/v4/x?y=1");
        assert_eq!(u.url_for("/a"), "https://example.com/gitlab/a");
        assert_eq!(u.authority(), "example.com");
        let u = upstream("http://127.0.0.1:8929");
        assert_eq!(u.authority(), "127.0.0.1:8929");
        assert_eq!(u.url_for("/a"), "http://127.0.0.1:8929/a");
    }

    #[tokio::test]
    async fn peers_carry_sni_and_timeouts() {
        let u = upstream("https://127.0.0.1:8443");
        let p = u.peer(Profile::Registry).await.unwrap();
        assert_eq!(p.sni, "127.0.0.1");
        assert_eq!(p.options.connection_timeout, Some(Duration::from_secs(2)));
        assert_eq!(p.options.read_timeout, Some(Duration::from_secs(30)));
        let p = u.peer(Profile::Transfer).await.unwrap();
        assert_eq!(p.options.read_timeout, Some(Duration::from_secs(60)));
    }

    #[tokio::test]
    async fn names_are_resolved_without_blocking_and_cached() {
        let u = upstream("http://localhost:1");
        let a = u.peer(Profile::Registry).await.unwrap();
        assert!(a.address().to_string().ends_with(":1"));
        assert!(u.dns.state.lock().unwrap().is_some());
    }
}
