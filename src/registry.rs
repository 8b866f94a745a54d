//! Cache decisions for the namespace registry routes: share bytes, never access.
//!
//! | route | fresh grant for this identity | otherwise |
//! |---|---|---|
//! | versions, latest, a version | the body *this identity* last received (HIT; UPDATING past `listing_ttl`, refreshed in the background) | upstream with the caller's credential; 200 records the grant (MISS/REVALIDATED); 401/403/404 pass through unchanged |
//! | `:version/download` | a 204 minted here, if the version was in the identity's listing | upstream; GitLab's JWT is swapped for a tfmirror token |
//! | `:version/file` | no grant needed: a valid tfmirror token for this exact module path | the same |
//!
//! `/file` is served from the blob store (HIT), or filled from GitLab on the token holder's
//! behalf with one upstream fetch however many clients wait (MISS). GitLab's JWT stays in
//! memory; clients only ever see tfmirror tokens.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::{BoxFuture, Shared};
use futures::{FutureExt, StreamExt, TryStreamExt};
use http::{header, HeaderValue, Method, StatusCode};
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::{Error, ErrorType, Result};
use serde::{Deserialize, Serialize};

use crate::auth::{Auth, BodyRef, Grant, Negative};
use crate::cache::blobs::Hash;
use crate::cache::fill::{FillError, Source};
use crate::cache::{project_tarball_key, tarball_key, unix_now, Cache, TarballEntry};
use crate::config::{CacheConfig, UnknownIdentity};
use crate::fetch::{self, Small};
use crate::health::Health;
use crate::identity::{Identity, Secret};
use crate::metrics::{self, Decision};
use crate::respond::{self, CacheStatus, HeaderValueLike as V};
use crate::rewrite::PublicBase;
use crate::routes::{ModuleId, ModuleOp, ModuleRoute, ProjectOp, ProjectRoute, MODULES_V1};
use crate::token::Tokens;
use crate::upstream::Upstream;

const JSON: &str = "application/json";
/// RFC 7234's warning for stale answers, as the issue asks, next to `X-Cache-Status: STALE`.
const STALE_WARNING: &str = "110 - \"Response is Stale\"";
const OCTETS: &str = "application/octet-stream";
/// Chunk size for streaming large blobs from disk.
const DISK_CHUNK: usize = 256 * 1024;

type SharedFetch = Shared<BoxFuture<'static, std::result::Result<Small, Arc<Error>>>>;

/// Module-wide views of listings, for offline fallback: any authorized caller's last body,
/// and the last body GitLab served to an anonymous caller (the module is then public).
pub const KIND_SHARED: &str = "shared";
pub const KIND_SHARED_PUBLIC: &str = "shared-public";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SharedListing {
    digest: String,
    fetched_at: u64,
    /// For a versions listing: the versions it shows.
    versions: Vec<String>,
}

/// What asking the upstream produced.
enum Asked {
    /// An answer to act on: success or refusal.
    Answer(Small),
    /// Nothing usable: the upstream is down, failed, timed out, or answered 5xx/429 (kept, to
    /// relay when no stale answer may be served).
    Failed {
        answer: Option<Small>,
        status: StatusCode,
    },
}

/// What happened, for the access log and metrics.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    pub cache: CacheStatus,
    pub upstream_status: Option<u16>,
    pub identity: Identity,
}

pub struct Registry {
    upstream: Arc<Upstream>,
    pub cache: Arc<Cache>,
    pub auth: Auth,
    secret: Secret,
    tokens: Tokens,
    cfg: CacheConfig,
    health: Arc<Health>,
    soft_timeout: Duration,
    unknown_identity: UnknownIdentity,
    /// In-flight registry fetches, per (identity, path): concurrent misses share one.
    inflight: Arc<Mutex<HashMap<String, SharedFetch>>>,
    /// Background refreshes under way (stale-while-revalidate), per (identity, path).
    refreshing: Mutex<HashSet<String>>,
    /// (name, system) -> unix seconds of the last upload through tfmirror.
    uploads: moka::sync::Cache<(String, String), u64>,
}

impl Registry {
    pub fn new(
        upstream: Arc<Upstream>,
        cache: Arc<Cache>,
        secret: Secret,
        health: Arc<Health>,
        cfg: &crate::config::Config,
    ) -> Registry {
        Registry {
            auth: Auth::new(
                cache.meta.clone(),
                cfg.auth.grant_ttl,
                cfg.auth.negative_ttl,
            ),
            tokens: Tokens::new(*secret.token_key(), cfg.auth.token_ttl),
            upstream,
            cache,
            secret,
            cfg: cfg.cache.clone(),
            health,
            soft_timeout: cfg.offline.soft_timeout,
            unknown_identity: cfg.offline.unknown_identity,
            inflight: Arc::new(Mutex::new(HashMap::new())),
            refreshing: Mutex::new(HashSet::new()),
            uploads: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(Duration::from_secs(24 * 3600))
                .build(),
        }
    }

    /// Answer a namespace route. Always writes a response, except for the latest-download
    /// redirect, which is left to the proxy (`Ok(None)`).
    pub async fn handle(
        self: &Arc<Self>,
        session: &mut Session,
        route: &ModuleRoute,
        public: &PublicBase,
    ) -> Result<Option<Outcome>> {
        let out = match &route.op {
            ModuleOp::Versions => self.listing(session, route, "versions".into()).await?,
            ModuleOp::Latest => self.listing(session, route, "latest".into()).await?,
            ModuleOp::Version(v) => self.listing(session, route, format!("v/{v}")).await?,
            ModuleOp::Download(v) => {
                self.download(session, route, &v.to_string(), public)
                    .await?
            }
            ModuleOp::File(v) => self.file(session, route, &v.to_string()).await?,
            ModuleOp::LatestDownload => return Ok(None),
        };
        Ok(Some(out))
    }

    /// Refresh the gauges that are read rather than counted (on each scrape).
    pub fn update_gauges(&self, health: &Health) {
        metrics::UPSTREAM_UP.set(i64::from(health.is_up()));
        metrics::CACHE_BYTES
            .with_label_values(&["memory"])
            .set(self.cache.memory_bytes() as i64);
        metrics::CACHE_BYTES
            .with_label_values(&["disk"])
            .set(self.cache.blobs.total_bytes() as i64);
        metrics::CACHE_ENTRIES
            .with_label_values(&["memory", "blob"])
            .set(self.cache.memory_entries() as i64);
        metrics::CACHE_ENTRIES
            .with_label_values(&["disk", "blob"])
            .set(self.cache.blobs.count() as i64);
        metrics::CACHE_ENTRIES
            .with_label_values(&["memory", "fill"])
            .set(self.cache.fills.in_flight() as i64);
        metrics::CACHE_EVICTIONS
            .with_label_values(&["disk"])
            .set(self.cache.blobs.evictions() as i64);
        metrics::CACHE_EVICTIONS
            .with_label_values(&["memory"])
            .set(self.cache.memory_evictions() as i64);
    }

    /// An upload through tfmirror changes that module's listings: stop serving cached ones.
    pub fn invalidate_uploads_of(&self, name: &str, system: &str) {
        self.uploads
            .insert((name.to_string(), system.to_string()), unix_now());
    }

    fn invalidated(&self, module: &ModuleId, fetched_at: u64) -> bool {
        self.uploads
            .get(&(module.name.clone(), module.system.clone()))
            .is_some_and(|at| at >= fetched_at)
    }

    // -----------------------------------------------------------------------------------------
    // Listings and metadata

    async fn listing(
        self: &Arc<Self>,
        session: &mut Session,
        route: &ModuleRoute,
        op: String,
    ) -> Result<Outcome> {
        let cred = session
            .req_header()
            .headers
            .get(header::AUTHORIZATION)
            .cloned();
        let identity = self.secret.identify(cred.as_ref());
        let grant = self.auth.grant(identity, &route.module).await;
        let previous = grant.as_ref().and_then(|g| g.bodies.get(&op).cloned());
        let outcome = |cache, upstream_status| Outcome {
            cache,
            upstream_status,
            identity,
        };

        // A fresh grant: the body this identity last received, without asking GitLab.
        if let (Some(g), Some(body_ref)) = (&grant, &previous) {
            if g.is_fresh(self.auth.grant_ttl)
                && !self.invalidated(&route.module, body_ref.fetched_at)
            {
                if let Some(body) = self.body(body_ref).await {
                    let age = unix_now().saturating_sub(body_ref.fetched_at);
                    let fresh = age < self.cfg.listing_ttl.as_secs();
                    let revalidating = !fresh
                        && !self.health.unavailable()
                        && age < (self.cfg.listing_ttl + self.cfg.stale_while_revalidate).as_secs()
                        && self.refresh_in_background(identity, route, op.clone());
                    if fresh || revalidating {
                        self.auth.remember_for_grant(identity, cred.as_ref(), g);
                        metrics::decision(Decision::Granted);
                        let status = if fresh {
                            CacheStatus::Hit
                        } else {
                            CacheStatus::Updating
                        };
                        write_json(session, status, age, false, body).await?;
                        return Ok(outcome(status, None));
                    }
                }
            }
        }
        // Past the hit path: only now is the upstream path needed.
        let path = route.upstream_path();
        if self.replay_refusal(session, identity, &path).await? {
            return Ok(outcome(CacheStatus::Hit, None));
        }

        let stale = self
            .stale_listing(
                identity,
                cred.is_some(),
                &route.module,
                &op,
                grant.as_deref(),
            )
            .await;
        match self
            .ask(
                identity,
                &path,
                cred.clone(),
                stale.is_some(),
                route_label(route),
            )
            .await
        {
            Asked::Answer(small) => {
                let status = self
                    .absorb_listing(
                        identity,
                        cred.as_ref(),
                        &route.module,
                        &path,
                        &op,
                        &small,
                        previous.as_ref(),
                    )
                    .await;
                write_answer(session, &small, status).await?;
                Ok(outcome(status, Some(small.status.as_u16())))
            }
            Asked::Failed { answer, status } => match stale {
                Some((body, age, decision)) => {
                    metrics::decision(decision);
                    metrics::STALE_SERVED.inc();
                    write_json(session, CacheStatus::Stale, age, true, body).await?;
                    Ok(outcome(
                        CacheStatus::Stale,
                        answer.map(|a| a.status.as_u16()),
                    ))
                }
                None => {
                    self.nothing_to_serve(session, answer, status, identity)
                        .await
                }
            },
        }
    }

    /// Replay a refusal GitLab gave this identity moments ago, sparing GitLab a storm of
    /// identical requests. True when a response was written.
    async fn replay_refusal(
        &self,
        session: &mut Session,
        identity: Identity,
        path: &str,
    ) -> Result<bool> {
        match self.auth.negative(identity, path) {
            Some(neg) => write_negative(session, &neg).await.map(|_| true),
            None => Ok(false),
        }
    }

    /// A stale answer this identity may have while the upstream fails: its own last body
    /// (grant expired or not), or a module-wide one where the module is public or the
    /// `offline.unknown_identity` policy allows it. A refused identity gets none.
    async fn stale_listing(
        &self,
        identity: Identity,
        has_credential: bool,
        module: &ModuleId,
        op: &str,
        grant: Option<&Grant>,
    ) -> Option<(Bytes, u64, Decision)> {
        let window = (self.cfg.listing_ttl + self.cfg.stale_if_error).as_secs();
        if let Some(g) = grant {
            if g.refused_at.is_some() {
                return None;
            }
            if self.grant_in_window(g) {
                if let Some(r) = g.bodies.get(op) {
                    let age = unix_now().saturating_sub(r.fetched_at);
                    if age <= window {
                        if let Some(body) = self.body(r).await {
                            return Some((body, age, Decision::StaleGrant));
                        }
                    }
                }
            }
        }
        let (shared, decision) = self
            .shared_for(identity, has_credential, module, op)
            .await?;
        let age = unix_now().saturating_sub(shared.fetched_at);
        if age > window {
            return None;
        }
        let body = self
            .body(&BodyRef {
                digest: shared.digest,
                fetched_at: shared.fetched_at,
            })
            .await?;
        Some((body, age, decision))
    }

    fn grant_in_window(&self, g: &Grant) -> bool {
        unix_now().saturating_sub(g.checked_at)
            <= (self.auth.grant_ttl + self.cfg.stale_if_error).as_secs()
    }

    /// The module-wide record an identity without a grant may fall back on, and why.
    async fn shared_for(
        &self,
        identity: Identity,
        has_credential: bool,
        module: &ModuleId,
        op: &str,
    ) -> Option<(SharedListing, Decision)> {
        // What GitLab served anonymously is public: anyone may have it.
        if let Some(p) = self.shared(KIND_SHARED_PUBLIC, module, op).await {
            return Some((p, Decision::StalePublic));
        }
        let decision = match (self.unknown_identity, has_credential) {
            (UnknownIdentity::Anyone, _) => Decision::UnknownAnyone,
            (UnknownIdentity::Authenticated, true) => Decision::UnknownAuthenticated,
            _ => {
                metrics::decision(Decision::UnknownDenied);
                tracing::info!(identity = %identity.short(), "upstream down: unknown identity refused by policy");
                return None;
            }
        };
        let s = self.shared(KIND_SHARED, module, op).await?;
        Some((s, decision))
    }

    async fn shared(
        &self,
        kind: &'static str,
        module: &ModuleId,
        op: &str,
    ) -> Option<SharedListing> {
        let meta = self.cache.meta.clone();
        let key = format!("{module}/{op}");
        tokio::task::spawn_blocking(move || meta.get(kind, &key))
            .await
            .ok()
            .flatten()
    }

    /// Learn from an upstream listing answer: record grants on success, forget them on
    /// refusal. Returns the cache status to report.
    #[allow(clippy::too_many_arguments)]
    async fn absorb_listing(
        &self,
        identity: Identity,
        cred: Option<&HeaderValue>,
        module: &ModuleId,
        path: &str,
        op: &str,
        small: &Small,
        previous: Option<&BodyRef>,
    ) -> CacheStatus {
        match small.status {
            StatusCode::OK => {
                metrics::decision(Decision::UpstreamAllowed);
                let digest = match self.cache.put_small(small.body.clone()).await {
                    Ok(h) => h.to_hex().to_string(),
                    Err(e) => {
                        tracing::error!(error = %e, "could not store a listing");
                        return CacheStatus::Miss;
                    }
                };
                let unchanged = previous.is_some_and(|p| p.digest == digest);
                let versions = (op == "versions").then(|| listed_versions(&small.body));
                let shared = SharedListing {
                    digest: digest.clone(),
                    fetched_at: unix_now(),
                    versions: versions.clone().unwrap_or_default(),
                };
                self.record_shared(identity, module, op, shared).await;
                let op = op.to_string();
                self.auth
                    .record_success(identity, cred, module, move |g| {
                        g.bodies.insert(
                            op,
                            BodyRef {
                                digest,
                                fetched_at: unix_now(),
                            },
                        );
                        if let Some(v) = versions {
                            g.versions = v;
                        }
                    })
                    .await;
                if unchanged {
                    CacheStatus::Revalidated
                } else {
                    CacheStatus::Miss
                }
            }
            s if is_refusal(s) => {
                self.learn_refusal(identity, module, path, small).await;
                CacheStatus::Miss
            }
            _ => CacheStatus::Miss,
        }
    }

    /// Keep the module-wide view of a listing: for offline fallback by policy, and, when
    /// GitLab served it to an anonymous caller, as public.
    async fn record_shared(
        &self,
        identity: Identity,
        module: &ModuleId,
        op: &str,
        shared: SharedListing,
    ) {
        let meta = self.cache.meta.clone();
        let key = format!("{module}/{op}");
        let public = identity.is_anonymous();
        let _ = tokio::task::spawn_blocking(move || {
            if public {
                meta.put(KIND_SHARED_PUBLIC, &key, &shared)?;
            }
            meta.put(KIND_SHARED, &key, &shared)
        })
        .await;
    }

    async fn learn_refusal(
        &self,
        identity: Identity,
        module: &ModuleId,
        path: &str,
        small: &Small,
    ) {
        metrics::decision(Decision::UpstreamRefused);
        if matches!(
            small.status,
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
        ) {
            self.auth.revoke(identity, module).await;
        }
        self.auth.remember_negative(
            identity,
            path,
            Negative {
                status: small.status,
                www_authenticate: small.headers.get(header::WWW_AUTHENTICATE).cloned(),
                body: small.body.clone(),
            },
        );
    }

    async fn body(&self, r: &BodyRef) -> Option<Bytes> {
        let hash = Hash::from_hex(&r.digest).ok()?;
        self.cache.get_small(hash).await.ok().flatten()
    }

    /// Refresh a listing with the caller's remembered credential. False when that is not
    /// possible (credential gone): the caller then goes upstream itself.
    fn refresh_in_background(
        self: &Arc<Self>,
        identity: Identity,
        route: &ModuleRoute,
        op: String,
    ) -> bool {
        let cred = match self.auth.credential(identity) {
            Some(c) => Some(c),
            None if identity.is_anonymous() => None,
            None => return false,
        };
        let path = route.upstream_path();
        let key = format!("{}{path}", identity.to_hex());
        if !self
            .refreshing
            .lock()
            .expect("refresh lock")
            .insert(key.clone())
        {
            return true; // one is already running
        }
        let this = self.clone();
        let module = route.module.clone();
        let label = route_label(route);
        tokio::spawn(async move {
            if let Asked::Answer(small) =
                this.ask(identity, &path, cred.clone(), false, label).await
            {
                let previous = this
                    .auth
                    .grant(identity, &module)
                    .await
                    .and_then(|g| g.bodies.get(&op).cloned());
                this.absorb_listing(
                    identity,
                    cred.as_ref(),
                    &module,
                    &path,
                    &op,
                    &small,
                    previous.as_ref(),
                )
                .await;
            }
            this.refreshing.lock().expect("refresh lock").remove(&key);
        });
        true
    }

    /// Ask the upstream, unless it is known to be down. With a stale answer at hand, wait at
    /// most `offline.soft_timeout`: the request keeps going in the background, but the client
    /// gets the stale answer now.
    async fn ask(
        &self,
        identity: Identity,
        path: &str,
        cred: Option<HeaderValue>,
        stale_at_hand: bool,
        label: &'static str,
    ) -> Asked {
        if self.health.unavailable() {
            return Asked::Failed {
                answer: None,
                status: StatusCode::BAD_GATEWAY,
            };
        }
        let fut = self.fetch_shared(identity, path, cred, label);
        let result = if stale_at_hand {
            match tokio::time::timeout(self.soft_timeout, fut).await {
                Ok(r) => r,
                Err(_) => {
                    self.health.record_failure(&self.upstream);
                    return Asked::Failed {
                        answer: None,
                        status: StatusCode::GATEWAY_TIMEOUT,
                    };
                }
            }
        } else {
            fut.await
        };
        match result {
            Ok(small) => {
                self.health.record_answer(small.status, &small.headers);
                if small.status.is_server_error() || small.status == StatusCode::TOO_MANY_REQUESTS {
                    let status = small.status;
                    Asked::Failed {
                        answer: Some(small),
                        status,
                    }
                } else {
                    Asked::Answer(small)
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "upstream registry call failed");
                if matches!(
                    e.etype(),
                    ErrorType::ConnectError
                        | ErrorType::ConnectTimedout
                        | ErrorType::ConnectRefused
                        | ErrorType::ConnectNoRoute
                        | ErrorType::ReadTimedout
                        | ErrorType::ReadError
                ) {
                    self.health.record_failure(&self.upstream);
                }
                Asked::Failed {
                    answer: None,
                    status: fetch::failure_status(&e),
                }
            }
        }
    }

    /// GET a registry path upstream; concurrent identical requests of one identity share it.
    /// The request runs as a task of its own, so a caller that stops waiting (soft timeout,
    /// client gone) does not cancel it for the others.
    fn fetch_shared(
        &self,
        identity: Identity,
        path: &str,
        cred: Option<HeaderValue>,
        label: &'static str,
    ) -> SharedFetch {
        let key = format!("{}{path}", identity.to_hex());
        let mut inflight = self.inflight.lock().expect("inflight lock");
        if let Some(f) = inflight.get(&key) {
            metrics::COALESCED_WAITS.inc();
            return f.clone();
        }
        let upstream = self.upstream.clone();
        let map = self.inflight.clone();
        let (path, k) = (path.to_string(), key.clone());
        let fut = async move {
            let started = std::time::Instant::now();
            let result = fetch::registry(&upstream, &path, cred.as_ref()).await;
            metrics::UPSTREAM_DURATION
                .with_label_values(&[label])
                .observe(started.elapsed().as_secs_f64());
            let outcome = match &result {
                Ok(s) => status_class(s.status),
                Err(e) if e.etype() == &ErrorType::ReadTimedout => "timeout",
                Err(_) => "error",
            };
            metrics::UPSTREAM_REQUESTS
                .with_label_values(&[label, outcome])
                .inc();
            map.lock().expect("inflight lock").remove(&k);
            result.map_err(Arc::from)
        }
        .boxed()
        .shared();
        inflight.insert(key, fut.clone());
        tokio::spawn(fut.clone());
        fut
    }

    /// The upstream gave nothing usable and no stale answer is allowed: relay its error
    /// answer if there was one, or say it is unreachable.
    async fn nothing_to_serve(
        &self,
        session: &mut Session,
        answer: Option<Small>,
        status: StatusCode,
        identity: Identity,
    ) -> Result<Outcome> {
        let upstream_status = answer.as_ref().map(|a| a.status.as_u16());
        match answer {
            Some(small) => write_answer(session, &small, CacheStatus::Miss).await?,
            None => respond::error(session, status).await?,
        }
        Ok(Outcome {
            cache: CacheStatus::Miss,
            upstream_status,
            identity,
        })
    }

    // -----------------------------------------------------------------------------------------
    // Download URLs

    fn x_terraform_get(
        &self,
        public: &PublicBase,
        module: &ModuleId,
        version: &str,
        identity: Identity,
    ) -> String {
        let token = self.tokens.mint(module, version, identity);
        format!(
            "{}{MODULES_V1}{}/{}/{}/{version}/file?token={token}&archive=tgz",
            public.prefix, module.namespace, module.name, module.system
        )
    }

    async fn download(
        self: &Arc<Self>,
        session: &mut Session,
        route: &ModuleRoute,
        version: &str,
        public: &PublicBase,
    ) -> Result<Outcome> {
        let cred = session
            .req_header()
            .headers
            .get(header::AUTHORIZATION)
            .cloned();
        let identity = self.secret.identify(cred.as_ref());
        let outcome = |cache, upstream_status| Outcome {
            cache,
            upstream_status,
            identity,
        };
        let grant = self.auth.grant(identity, &route.module).await;
        if let Some(g) = grant
            .as_ref()
            .filter(|g| g.is_fresh(self.auth.grant_ttl) && g.allows_version(version))
        {
            self.auth.remember_for_grant(identity, cred.as_ref(), g);
            metrics::decision(Decision::Granted);
            let get = self.x_terraform_get(public, &route.module, version, identity);
            write_download(session, CacheStatus::Hit, get).await?;
            return Ok(outcome(CacheStatus::Hit, None));
        }
        let path = route.upstream_path();
        if self.replay_refusal(session, identity, &path).await? {
            return Ok(outcome(CacheStatus::Hit, None));
        }
        let stale = self
            .stale_download(
                identity,
                cred.is_some(),
                &route.module,
                version,
                grant.as_deref(),
            )
            .await;
        let small = match self
            .ask(
                identity,
                &path,
                cred.clone(),
                stale.is_some(),
                route_label(route),
            )
            .await
        {
            Asked::Answer(small) => small,
            Asked::Failed { answer, status } => {
                return match stale {
                    Some(decision) => {
                        metrics::decision(decision);
                        metrics::STALE_SERVED.inc();
                        self.auth.remember_for_stale(identity, cred.as_ref());
                        let get = self.x_terraform_get(public, &route.module, version, identity);
                        write_download(session, CacheStatus::Stale, get).await?;
                        Ok(outcome(
                            CacheStatus::Stale,
                            answer.map(|a| a.status.as_u16()),
                        ))
                    }
                    None => {
                        self.nothing_to_serve(session, answer, status, identity)
                            .await
                    }
                };
            }
        };
        let upstream_status = Some(small.status.as_u16());
        let jwt = small
            .headers
            .get("x-terraform-get")
            .and_then(|v| v.to_str().ok())
            .and_then(gitlab_token);
        match (small.status.is_success(), jwt) {
            (true, Some(jwt)) => {
                metrics::decision(Decision::UpstreamAllowed);
                self.auth
                    .remember_gitlab_jwt(identity, &tarball_key(&route.module, version), jwt);
                let v = version.to_string();
                self.auth
                    .record_success(identity, cred.as_ref(), &route.module, move |g| {
                        if !g.versions.contains(&v) {
                            g.versions.push(v);
                        }
                    })
                    .await;
                let get = self.x_terraform_get(public, &route.module, version, identity);
                write_download(session, CacheStatus::Miss, get).await?;
            }
            (true, None) => {
                // A success without a usable download URL: nothing safe to hand out.
                respond::error(session, StatusCode::BAD_GATEWAY).await?;
            }
            (false, _) => {
                if is_refusal(small.status) {
                    self.learn_refusal(identity, &route.module, &path, &small)
                        .await;
                }
                write_answer(session, &small, CacheStatus::Miss).await?;
            }
        }
        Ok(outcome(CacheStatus::Miss, upstream_status))
    }

    /// May this identity get a download URL for `version` while the upstream fails?
    async fn stale_download(
        &self,
        identity: Identity,
        has_credential: bool,
        module: &ModuleId,
        version: &str,
        grant: Option<&Grant>,
    ) -> Option<Decision> {
        if let Some(g) = grant {
            if g.refused_at.is_some() {
                return None;
            }
            if self.grant_in_window(g) && g.allows_version(version) {
                return Some(Decision::StaleGrant);
            }
        }
        let (shared, decision) = self
            .shared_for(identity, has_credential, module, "versions")
            .await?;
        let window = (self.cfg.listing_ttl + self.cfg.stale_if_error).as_secs();
        let listed = shared.versions.iter().any(|v| v == version);
        (listed && unix_now().saturating_sub(shared.fetched_at) <= window).then_some(decision)
    }

    // -----------------------------------------------------------------------------------------
    // Tarballs

    async fn file(
        self: &Arc<Self>,
        session: &mut Session,
        route: &ModuleRoute,
        version: &str,
    ) -> Result<Outcome> {
        let token = session.req_header().uri.query().and_then(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == "token")
                .map(|(_, v)| v.into_owned())
        });
        let identity = match self.tokens.verify(token.as_deref(), &route.module, version) {
            Ok(id) => id,
            Err(why) => {
                tracing::info!(reason = ?why, "download token refused");
                respond::error(session, StatusCode::UNAUTHORIZED).await?;
                return Ok(Outcome {
                    cache: CacheStatus::Hit,
                    upstream_status: None,
                    identity: Identity::ANONYMOUS,
                });
            }
        };
        let key = tarball_key(&route.module, version);
        let this = self.clone();
        let (module, v) = (route.module.clone(), version.to_string());
        let open = move || {
            let (this, module, v) = (this.clone(), module.clone(), v.clone());
            async move { this.open_tarball(identity, &module, &v).await }.boxed()
        };
        self.serve_tarball(session, &key, identity, open).await
    }

    /// Serve a tarball from the cache, or fill it with `open` (one fill per key). HEAD never
    /// starts a fill: Terraform sends HEAD before GET, and the GET does the work.
    async fn serve_tarball(
        &self,
        session: &mut Session,
        key: &str,
        identity: Identity,
        open: impl Fn() -> crate::cache::fill::Opener,
    ) -> Result<Outcome> {
        let head = session.req_header().method == Method::HEAD;
        let outcome = |cache, upstream_status| Outcome {
            cache,
            upstream_status,
            identity,
        };
        if let Some(entry) = self.cache.tarball(key).await {
            if let Some(hash) = entry.hash() {
                if self
                    .serve_blob(session, key, hash, entry.size, head)
                    .await?
                {
                    return Ok(outcome(CacheStatus::Hit, None));
                }
            }
            // The blob was evicted or corrupt: forget the entry and fill again.
            self.cache.drop_tarball(key).await;
        }
        if head {
            let headers = [
                (header::CONTENT_TYPE, V::Static(OCTETS)),
                (respond::CACHE_STATUS, V::Static("MISS")),
            ];
            respond::full(session, StatusCode::OK, &headers, Bytes::new()).await?;
            return Ok(outcome(CacheStatus::Miss, None));
        }

        let (fill, leader) = match self.start_fill(key, &open) {
            Ok(f) => f,
            Err(e) => {
                // No temp file (disk full, read-only): serve without caching.
                metrics::CACHE_WRITE_ERRORS.inc();
                tracing::error!(error = %e, "cannot write to the cache; serving without caching");
                return self.pass_through(session, identity, open()).await;
            }
        };
        if !leader {
            metrics::COALESCED_WAITS.inc();
        }

        let len = match fill.started().await {
            Ok(len) => len,
            Err(FillError::NoRoom) => {
                metrics::CACHE_WRITE_ERRORS.inc();
                tracing::error!(
                    "the cache disk has no room for this tarball; serving it without caching"
                );
                return self.pass_through(session, identity, open()).await;
            }
            Err(e) => {
                let status = match e {
                    FillError::Refused(s) => s,
                    _ => StatusCode::BAD_GATEWAY,
                };
                respond::error(session, status).await?;
                return Ok(outcome(CacheStatus::Miss, Some(status.as_u16())));
            }
        };
        write_tarball_head(session, CacheStatus::Miss, len, false).await?;
        let mut reader = fill.reader();
        loop {
            match reader.next().await {
                Ok(Some(chunk)) => session.write_response_body(Some(chunk), false).await?,
                Ok(None) => break,
                // Cut the connection: the client must not take a partial body for a whole one.
                Err(_) => {
                    return Err(
                        Error::explain(ErrorType::ReadError, "tarball fill failed").into_up()
                    )
                }
            }
        }
        session
            .write_response_body(Some(Bytes::new()), true)
            .await?;
        Ok(outcome(CacheStatus::Miss, Some(200)))
    }

    /// Stream a tarball straight from the upstream, uncached (the cache cannot take it).
    async fn pass_through(
        &self,
        session: &mut Session,
        identity: Identity,
        opened: crate::cache::fill::Opener,
    ) -> Result<Outcome> {
        let outcome = |upstream_status| Outcome {
            cache: CacheStatus::Bypass,
            upstream_status,
            identity,
        };
        let Source { len, mut body } = match opened.await {
            Ok(s) => s,
            Err(e) => {
                let status = match e {
                    FillError::Refused(s) => s,
                    _ => StatusCode::BAD_GATEWAY,
                };
                respond::error(session, status).await?;
                return Ok(outcome(Some(status.as_u16())));
            }
        };
        write_tarball_head(session, CacheStatus::Bypass, len, false).await?;
        while let Some(chunk) = body.next().await {
            match chunk {
                Ok(c) => session.write_response_body(Some(c), false).await?,
                Err(_) => {
                    return Err(
                        Error::explain(ErrorType::ReadError, "upstream body failed").into_up()
                    )
                }
            }
        }
        session
            .write_response_body(Some(Bytes::new()), true)
            .await?;
        Ok(outcome(Some(200)))
    }

    /// Join or start the fill of a tarball; its commit indexes it under `key`.
    fn start_fill(
        &self,
        key: &str,
        open: impl FnOnce() -> crate::cache::fill::Opener,
    ) -> std::io::Result<(Arc<crate::cache::fill::Fill>, bool)> {
        let meta = self.cache.meta.clone();
        let index_key = key.to_string();
        self.cache
            .fills
            .join_or_start(key, self.cache.blobs.clone(), open, move |hash, size| {
                let entry = TarballEntry {
                    hash: hash.to_hex().to_string(),
                    size,
                    fetched_at: unix_now(),
                };
                if let Err(e) = Cache::index_tarball_blocking(&meta, &index_key, &entry) {
                    tracing::error!(error = %e, "could not index a tarball");
                }
            })
    }

    /// Fill the cache for `module` on behalf of the holder of `cred`, before an outage:
    /// its versions listing (recording the holder's grant) and the tarball of every listed
    /// version matching `constraint`. Returns the versions now cached.
    pub async fn warm_module(
        self: &Arc<Self>,
        cred: Option<HeaderValue>,
        module: &ModuleId,
        constraint: &crate::constraint::Constraint,
    ) -> std::result::Result<Vec<String>, String> {
        let identity = self.secret.identify(cred.as_ref());
        let route = |op| ModuleRoute {
            module: module.clone(),
            op,
        };
        let path = route(ModuleOp::Versions).upstream_path();
        let small = fetch::registry(&self.upstream, &path, cred.as_ref())
            .await
            .map_err(|e| format!("{module}: GitLab unreachable ({})", e.etype().as_str()))?;
        if small.status != StatusCode::OK {
            return Err(format!("{module}: GitLab answered {}", small.status));
        }
        self.absorb_listing(
            identity,
            cred.as_ref(),
            module,
            &path,
            "versions",
            &small,
            None,
        )
        .await;
        let mut wanted: Vec<semver::Version> = listed_versions(&small.body)
            .iter()
            .filter_map(|v| semver::Version::parse(v).ok())
            .filter(|v| constraint.matches(v))
            .collect();
        wanted.sort();
        let mut warmed = Vec::new();
        for version in wanted {
            let v = version.to_string();
            let dl = fetch::registry(
                &self.upstream,
                &route(ModuleOp::Download(version)).upstream_path(),
                cred.as_ref(),
            )
            .await
            .map_err(|e| format!("{module}@{v}: GitLab unreachable ({})", e.etype().as_str()))?;
            let jwt = dl
                .headers
                .get("x-terraform-get")
                .and_then(|h| h.to_str().ok())
                .and_then(gitlab_token)
                .filter(|_| dl.status.is_success())
                .ok_or_else(|| format!("{module}@{v}: GitLab answered {}", dl.status))?;
            let key = tarball_key(module, &v);
            self.auth.remember_gitlab_jwt(identity, &key, jwt);
            let recorded = v.clone();
            self.auth
                .record_success(identity, cred.as_ref(), module, move |g| {
                    if !g.versions.contains(&recorded) {
                        g.versions.push(recorded);
                    }
                })
                .await;
            let cached = match self.cache.tarball(&key).await.and_then(|e| e.hash()) {
                Some(h) => self.cache.blobs.path(&h).exists(),
                None => false,
            };
            if !cached {
                let this = self.clone();
                let (m, ver) = (module.clone(), v.clone());
                let open =
                    move || async move { this.open_tarball(identity, &m, &ver).await }.boxed();
                let (fill, _) = self
                    .start_fill(&key, open)
                    .map_err(|e| format!("{key}: {e}"))?;
                fill.finished().await.map_err(|e| format!("{key}: {e:?}"))?;
            }
            warmed.push(v);
        }
        Ok(warmed)
    }

    /// Open the upstream tarball on behalf of `identity`: GitLab's JWT (remembered from its
    /// download answer, or asked for again with the remembered credential), then `/file`.
    async fn open_tarball(
        &self,
        identity: Identity,
        module: &ModuleId,
        version: &str,
    ) -> std::result::Result<Source, FillError> {
        let tarball = format!("{module}@{version}");
        let base = format!(
            "{MODULES_V1}{}/{}/{}/{version}",
            module.namespace, module.name, module.system
        );
        let jwt = match self.auth.gitlab_jwt(identity, &tarball) {
            Some(j) => j,
            None => {
                let cred = match (identity.is_anonymous(), self.auth.credential(identity)) {
                    (true, _) => None,
                    (false, Some(c)) => Some(c),
                    // The credential is no longer in memory (restart, or grant lifetime over).
                    (false, None) => return Err(FillError::Refused(StatusCode::UNAUTHORIZED)),
                };
                let small =
                    fetch::registry(&self.upstream, &format!("{base}/download"), cred.as_ref())
                        .await
                        .map_err(|_| FillError::Upstream("download URL request failed"))?;
                if !small.status.is_success() {
                    return Err(FillError::Refused(small.status));
                }
                small
                    .headers
                    .get("x-terraform-get")
                    .and_then(|v| v.to_str().ok())
                    .and_then(gitlab_token)
                    .ok_or(FillError::Upstream("no download URL"))?
            }
        };
        let path = format!("{base}/file?token={jwt}");
        source(fetch::open(&self.upstream, &path, None).await)
    }

    // -----------------------------------------------------------------------------------------
    // Project routes

    /// A project-route tarball (`GET PP[/:version]`, Basic auth). GitLab stays the authority:
    /// an identity without a fresh grant is checked with `?terraform-get=1`, a 204 that costs
    /// GitLab no bytes; the bytes then come from the cache, shared with every other route.
    pub async fn project_download(
        self: &Arc<Self>,
        session: &mut Session,
        p: &ProjectRoute,
    ) -> Result<Outcome> {
        let cred = session
            .req_header()
            .headers
            .get(header::AUTHORIZATION)
            .cloned();
        let identity = self.secret.identify(cred.as_ref());
        let grant_of = ModuleId {
            namespace: format!("project:{}", p.project),
            name: p.name.clone(),
            system: p.system.clone(),
        };
        // Validated parts only; the project path's slashes are re-encoded as GitLab wants.
        let base = format!(
            "/api/v4/projects/{}/packages/terraform/modules/{}/{}",
            p.project.replace('/', "%2F"),
            p.name,
            p.system
        );
        let requested = match &p.op {
            ProjectOp::Download { version } => version.as_ref().map(ToString::to_string),
            ProjectOp::Upload { .. } => None,
        };
        let grant = self.auth.grant(identity, &grant_of).await;
        let fresh = match (&grant, &requested) {
            (Some(g), Some(v)) if g.is_fresh(self.auth.grant_ttl) && g.allows_version(v) => {
                self.auth.remember_for_grant(identity, cred.as_ref(), g);
                true
            }
            _ => false,
        };
        let version = if fresh {
            requested.expect("fresh implies a version")
        } else {
            let check = match &requested {
                Some(v) => format!("{base}/{v}?terraform-get=1"),
                None => format!("{base}?terraform-get=1"),
            };
            // While GitLab fails, an identity it authorized before keeps its versions.
            let stale_ok = match (&grant, &requested) {
                (Some(g), Some(v)) => {
                    g.refused_at.is_none() && self.grant_in_window(g) && g.allows_version(v)
                }
                _ => false,
            };
            let small = match self
                .ask(identity, &check, cred.clone(), stale_ok, "project_download")
                .await
            {
                Asked::Answer(small) => small,
                Asked::Failed { answer, status } => {
                    if !stale_ok {
                        return self
                            .nothing_to_serve(session, answer, status, identity)
                            .await;
                    }
                    metrics::decision(Decision::StaleGrant);
                    metrics::STALE_SERVED.inc();
                    let version = requested.expect("stale implies a version");
                    let key = project_tarball_key(&p.project, &p.name, &p.system, &version);
                    // Offline, nothing can be filled: cached bytes or an error.
                    let open = || async { Err(FillError::Upstream("upstream down")) }.boxed();
                    let mut out = self.serve_tarball(session, &key, identity, open).await?;
                    if out.cache == CacheStatus::Hit {
                        out.cache = CacheStatus::Stale;
                    }
                    return Ok(out);
                }
            };
            // The version is the last path segment of GitLab's absolute X-Terraform-Get.
            let granted = small
                .headers
                .get("x-terraform-get")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split('?').next())
                .and_then(|v| v.rsplit('/').next())
                .and_then(|v| semver::Version::parse(v).ok());
            match (small.status.is_success(), granted) {
                (true, Some(v)) => {
                    let version = v.to_string();
                    let recorded = version.clone();
                    self.auth
                        .record_success(identity, cred.as_ref(), &grant_of, move |g| {
                            if !g.versions.contains(&recorded) {
                                g.versions.push(recorded);
                            }
                        })
                        .await;
                    version
                }
                (true, None) => {
                    respond::error(session, StatusCode::BAD_GATEWAY).await?;
                    return Ok(Outcome {
                        cache: CacheStatus::Miss,
                        upstream_status: Some(small.status.as_u16()),
                        identity,
                    });
                }
                (false, _) => {
                    if is_refusal(small.status) {
                        self.learn_refusal(identity, &grant_of, &check, &small)
                            .await;
                    }
                    let mut headers = vec![
                        (header::CONTENT_TYPE, V::Static(JSON)),
                        (respond::CACHE_STATUS, V::Static("MISS")),
                    ];
                    if let Some(w) = small.headers.get(header::WWW_AUTHENTICATE) {
                        headers.push((header::WWW_AUTHENTICATE, V::Value(w.clone())));
                    }
                    respond::full(session, small.status, &headers, small.body.clone()).await?;
                    return Ok(Outcome {
                        cache: CacheStatus::Miss,
                        upstream_status: Some(small.status.as_u16()),
                        identity,
                    });
                }
            }
        };
        let key = project_tarball_key(&p.project, &p.name, &p.system, &version);
        let upstream = self.upstream.clone();
        let path = format!("{base}/{version}");
        let open = move || {
            let (upstream, path, cred) = (upstream.clone(), path.clone(), cred.clone());
            async move { source(fetch::open(&upstream, &path, cred.as_ref()).await) }.boxed()
        };
        self.serve_tarball(session, &key, identity, open).await
    }

    /// Serve a cached blob, verified. False when it is gone or corrupt (nothing was written).
    /// Small blobs are verified whole before the first byte; large ones are streamed with the
    /// last chunk held back until the hash checks out, so a corrupt blob never reaches a
    /// client complete (the connection is cut instead).
    async fn serve_blob(
        &self,
        session: &mut Session,
        key: &str,
        hash: Hash,
        size: u64,
        head: bool,
    ) -> Result<bool> {
        if size <= self.cache.memory_max_object() {
            let Some(bytes) = self.cache.get_small(hash).await.ok().flatten() else {
                return Ok(false);
            };
            let headers = [
                (header::CONTENT_TYPE, V::Static(OCTETS)),
                (respond::CACHE_STATUS, V::Static("HIT")),
            ];
            respond::full(session, StatusCode::OK, &headers, bytes).await?;
            return Ok(true);
        }
        let blobs = self.cache.blobs.clone();
        let opened = tokio::task::spawn_blocking(move || blobs.open_blob(&hash))
            .await
            .map_err(|e| Error::because(ErrorType::InternalError, "blob open", e))?
            .map_err(|e| Error::because(ErrorType::InternalError, "blob open", e))?;
        let Some((file, len)) = opened else {
            return Ok(false);
        };
        write_tarball_head(session, CacheStatus::Hit, Some(len), head).await?;
        if head {
            return Ok(true);
        }
        let file = Arc::new(file);
        let mut hasher = blake3::Hasher::new();
        let mut pending: Option<Bytes> = None;
        let mut offset = 0u64;
        loop {
            let f = file.clone();
            let chunk = tokio::task::spawn_blocking(move || {
                use std::os::unix::fs::FileExt;
                let mut buf = vec![0u8; DISK_CHUNK];
                let n = f.read_at(&mut buf, offset)?;
                buf.truncate(n);
                Ok::<_, std::io::Error>(buf)
            })
            .await
            .map_err(|e| Error::because(ErrorType::InternalError, "blob read", e))?
            .map_err(|e| Error::because(ErrorType::InternalError, "blob read", e))?;
            if chunk.is_empty() {
                break;
            }
            offset += chunk.len() as u64;
            hasher.update(&chunk);
            if let Some(p) = pending.replace(Bytes::from(chunk)) {
                session.write_response_body(Some(p), false).await?;
            }
        }
        if hasher.finalize() != hash || offset != len {
            tracing::error!(blob = %hash.to_hex(), "corrupt tarball on disk: deleted, will refetch");
            self.cache.blobs.remove(&hash);
            self.cache.forget(&hash);
            self.cache.drop_tarball(key).await;
            return Error::e_explain(
                ErrorType::InternalError,
                "cached tarball failed verification",
            );
        }
        session.write_response_body(pending, true).await?;
        Ok(true)
    }
}

/// A download as a fill source: a success streams, a refusal is relayed, the rest is a 502.
fn source(opened: Result<reqwest::Response>) -> std::result::Result<Source, FillError> {
    match opened {
        Ok(r) if r.status().is_success() => Ok(Source {
            len: r.content_length(),
            body: r.bytes_stream().map_err(|_| "upstream body failed").boxed(),
        }),
        Ok(r) => Err(FillError::Refused(r.status())),
        Err(e) => {
            tracing::warn!(error = %e, "tarball fill could not reach the upstream");
            Err(FillError::Upstream("upstream unreachable"))
        }
    }
}

fn is_refusal(s: StatusCode) -> bool {
    matches!(
        s,
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::NOT_FOUND
    )
}

/// The versions a listing body shows: `modules[0].versions[].version`, as Terraform reads it.
fn listed_versions(body: &[u8]) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    v["modules"][0]["versions"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e["version"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The raw `token` parameter of GitLab's `X-Terraform-Get` (kept encoded, as sent).
fn gitlab_token(x_terraform_get: &str) -> Option<String> {
    let query = x_terraform_get.split_once('?')?.1;
    query
        .split('&')
        .find_map(|p| p.strip_prefix("token="))
        .map(str::to_string)
}

/// The label of a route in upstream metrics.
fn route_label(route: &ModuleRoute) -> &'static str {
    crate::routes::Route::Module(route.clone()).template()
}

fn status_class(s: StatusCode) -> &'static str {
    match s.as_u16() {
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// Relay an upstream answer read whole (refusals, errors, listings).
async fn write_answer(session: &mut Session, small: &Small, cache: CacheStatus) -> Result<()> {
    let ct = small
        .headers
        .get(header::CONTENT_TYPE)
        .cloned()
        .unwrap_or(HeaderValue::from_static(JSON));
    let mut headers = vec![
        (header::CONTENT_TYPE, V::Value(ct)),
        (respond::CACHE_STATUS, V::Static(cache.as_str())),
    ];
    for name in [header::WWW_AUTHENTICATE, header::RETRY_AFTER] {
        if let Some(v) = small.headers.get(&name) {
            headers.push((name, V::Value(v.clone())));
        }
    }
    respond::full(session, small.status, &headers, small.body.clone()).await
}

async fn write_json(
    session: &mut Session,
    cache: CacheStatus,
    age: u64,
    stale: bool,
    body: Bytes,
) -> Result<()> {
    let mut headers = vec![
        (header::CONTENT_TYPE, V::Static(JSON)),
        (respond::CACHE_STATUS, V::Static(cache.as_str())),
        (header::AGE, V::Owned(age.to_string())),
    ];
    if stale {
        headers.push((header::WARNING, V::Static(STALE_WARNING)));
    }
    respond::full(session, StatusCode::OK, &headers, body).await
}

/// The head of a tarball answer; the length when it is known.
async fn write_tarball_head(
    session: &mut Session,
    cache: CacheStatus,
    len: Option<u64>,
    end: bool,
) -> Result<()> {
    let mut h = ResponseHeader::build(StatusCode::OK, Some(3))?;
    h.insert_header(header::CONTENT_TYPE, OCTETS)?;
    h.insert_header(respond::CACHE_STATUS, cache.as_str())?;
    if let Some(len) = len {
        h.insert_header(header::CONTENT_LENGTH, len)?;
    }
    session.write_response_header(Box::new(h), end).await
}

async fn write_negative(session: &mut Session, neg: &Negative) -> Result<()> {
    let mut headers = vec![
        (header::CONTENT_TYPE, V::Static(JSON)),
        (respond::CACHE_STATUS, V::Static("HIT")),
    ];
    if let Some(w) = &neg.www_authenticate {
        headers.push((header::WWW_AUTHENTICATE, V::Value(w.clone())));
    }
    respond::full(session, neg.status, &headers, neg.body.clone()).await
}

async fn write_download(session: &mut Session, cache: CacheStatus, get: String) -> Result<()> {
    let headers = [
        (
            http::HeaderName::from_static("x-terraform-get"),
            V::Owned(get),
        ),
        (respond::CACHE_STATUS, V::Static(cache.as_str())),
    ];
    respond::full(session, StatusCode::NO_CONTENT, &headers, Bytes::new()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gitlab_token_is_extracted_raw() {
        let v =
            "/api/v4/packages/terraform/modules/v1/g/n/s/1.0.0/file?token=eyJ.a-b_c.d&archive=tgz";
        assert_eq!(gitlab_token(v).as_deref(), Some("eyJ.a-b_c.d"));
        assert_eq!(
            gitlab_token("/x/file?archive=tgz&token="),
            Some(String::new())
        );
        assert_eq!(gitlab_token("/x/file"), None);
    }

    #[test]
    fn versions_are_read_as_terraform_reads_them() {
        let body = br#"{"modules":[{"versions":[{"version":"1.0.0"},{"version":"1.10.0"}],"source":"x"}]}"#;
        assert_eq!(listed_versions(body), vec!["1.0.0", "1.10.0"]);
        assert!(listed_versions(b"{}").is_empty());
        assert!(listed_versions(b"not json").is_empty());
    }
}
