//! Listings and metadata (`versions`, latest, a version): fresh grants, refusals replayed,
//! stale answers under failure, and what an upstream answer teaches.

use std::sync::Arc;

use bytes::Bytes;

use http::{header, HeaderValue, StatusCode};
use pingora::proxy::Session;
use pingora::Result;

use super::reply::{write_answer, write_json, write_negative};
use super::{
    is_refusal, listed_versions, route_label, Asked, Outcome, Registry, SharedListing, KIND_SHARED,
    KIND_SHARED_PUBLIC,
};
use crate::access::{BodyRef, Grant, Negative};
use crate::cache::blobs::Hash;
use crate::cache::unix_now;
use crate::config::UnknownIdentity;
use crate::fetch::Small;
use crate::identity::Identity;
use crate::metrics::{self, Decision};
use crate::respond::CacheStatus;
use crate::routes::{ModuleId, ModuleRoute};

impl Registry {
    pub(super) async fn listing(
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
    pub(super) async fn replay_refusal(
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
    pub(super) async fn stale_listing(
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

    pub(super) fn grant_in_window(&self, g: &Grant) -> bool {
        unix_now().saturating_sub(g.checked_at)
            <= (self.auth.grant_ttl + self.cfg.stale_if_error).as_secs()
    }

    /// The module-wide record an identity without a grant may fall back on, and why.
    pub(super) async fn shared_for(
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

    pub(super) async fn shared(
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
    pub(super) async fn absorb_listing(
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
    pub(super) async fn record_shared(
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

    pub(super) async fn learn_refusal(
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

    pub(super) async fn body(&self, r: &BodyRef) -> Option<Bytes> {
        let hash = Hash::from_hex(&r.digest).ok()?;
        self.cache.get_small(hash).await.ok().flatten()
    }

    /// Refresh a listing with the caller's remembered credential. False when that is not
    /// possible (credential gone): the caller then goes upstream itself.
    pub(super) fn refresh_in_background(
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
}
