//! What GitLab's answers teach: grants recorded on success, revoked on refusal, versions
//! forgotten when GitLab no longer has them, a caller held back by its own 429, and the
//! module-wide records kept for the offline fallback (dropped when the module turns private).
//!
//! Every answer goes through [`Registry::learn`], the ones that came in time and the ones that
//! came after the deadline alike.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, StatusCode};

use super::ask::gitlab_did;
use super::{download_jwt, Lesson, Registry};
use crate::access::policy::Gitlab;
use crate::access::Negative;
use crate::cache::blobs::Hash;
use crate::cache::records::{
    shared_key, tarball_key, version_listing, BodyRef, Grant, ListingKey, Refusal, SharedListing,
    KIND_SHARED, KIND_SHARED_PUBLIC,
};
use crate::cache::{records, republish};
use crate::clock::now as unix_now;
use crate::identity::Identity;
use crate::metrics::{self, Decision};
use crate::respond::listed_versions;
use crate::respond::CacheStatus;
use crate::routes::ModuleId;
use crate::upstream::gitlab::Small;
use crate::upstream::health::retry_after;

/// `Retry-After` when a 429 carries none: GitLab's RackAttack windows are a minute.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(60);

impl Registry {
    /// Learn from one GitLab answer. Returns the cache status to report for it.
    pub(super) async fn learn(
        &self,
        identity: Identity,
        cred: Option<&HeaderValue>,
        lesson: &Lesson,
        small: &Small,
    ) -> CacheStatus {
        let module = lesson.module();
        match gitlab_did(small.status, lesson) {
            Gitlab::RateLimited => {
                let wait = retry_after(&small.headers).unwrap_or(DEFAULT_RETRY_AFTER);
                self.auth.hold(identity, module, wait);
                metrics::RATE_LIMITED.inc();
                tracing::info!(identity = %identity.short(), module = %module, wait_s = wait.as_secs(), "GitLab rate-limited this caller; holding it back alone");
                CacheStatus::Miss
            }
            Gitlab::Refused
                if small.status == StatusCode::UNAUTHORIZED
                    && self.is_principal_of(identity, cred) =>
            {
                // A job token's 401: its job is over. The token's, not its principal's.
                if let Some(c) = cred {
                    self.auth.forget_credential(identity, c);
                    self.job_finished(c, negative(small));
                }
                CacheStatus::Miss
            }
            Gitlab::Refused => {
                self.learn_refusal(identity, module, lesson.path(), small, true)
                    .await;
                CacheStatus::Miss
            }
            Gitlab::Failed | Gitlab::NotAsked => CacheStatus::Miss,
            Gitlab::Answered if small.is_stale() => {
                self.learn_stale(identity, cred, lesson, small);
                CacheStatus::Stale
            }
            Gitlab::Answered => self.learn_answer(identity, cred, lesson, small).await,
        }
    }

    /// A tfmirror tier's stale answer (GitLab failed behind it): relayed as stale, and it
    /// refreshes no grant, no listing and no module-wide record. A download URL's token is
    /// still kept: it is what the tarball behind the relayed URL is filled with.
    fn learn_stale(
        &self,
        identity: Identity,
        cred: Option<&HeaderValue>,
        lesson: &Lesson,
        small: &Small,
    ) {
        if let Lesson::Download {
            module, version, ..
        } = lesson
        {
            if let Some(jwt) = download_jwt(small) {
                let key = tarball_key(module, version);
                let owner = self.jwt_owner(identity, cred);
                self.auth.remember_gitlab_jwt(owner, &key, jwt);
            }
        }
    }

    /// Is `version` of `module` in the versions GitLab last listed to an anonymous caller?
    /// An identity GitLab allowed no more than that is as good as anonymous for the module.
    async fn public_lists(&self, identity: Identity, module: &ModuleId, version: &str) -> bool {
        if identity.is_anonymous() {
            return false;
        }
        self.shared(KIND_SHARED_PUBLIC, module, &ListingKey::Versions)
            .await
            .is_some_and(|p| p.versions.iter().any(|v| v == version))
    }

    /// An answer that is neither a refusal nor a failure: what it teaches depends on the route.
    async fn learn_answer(
        &self,
        identity: Identity,
        cred: Option<&HeaderValue>,
        lesson: &Lesson,
        small: &Small,
    ) -> CacheStatus {
        match lesson {
            Lesson::Listing {
                module,
                op,
                previous,
                path,
            } => {
                if small.status == StatusCode::OK {
                    let previous = previous.as_ref();
                    let sent_ms = small.sent_ms;
                    return self
                        .absorb_listing(identity, cred, module, op, &small.body, previous, sent_ms)
                        .await;
                }
                if small.status == StatusCode::NOT_FOUND {
                    // A version's metadata GitLab no longer has: the version is gone.
                    if let ListingKey::Version(v) = op {
                        let v = v.to_string();
                        self.auth.forget_version(identity, module, &v).await;
                    }
                    self.learn_refusal(identity, module, path, small, false)
                        .await;
                }
            }
            Lesson::Download {
                module,
                version,
                path,
            } => {
                self.learn_download(identity, cred, module, version, path, small)
                    .await;
            }
            Lesson::ProjectCheck {
                module, version, ..
            } if small.status.is_success() => {
                metrics::decision(Decision::UpstreamAllowed);
                let public_like = match version {
                    Some(v) => self.public_lists(identity, module, v).await,
                    None => false,
                };
                let v = version.clone();
                let update = move |g: &mut Grant| {
                    if let Some(v) = v {
                        g.add_version(&v);
                    }
                };
                self.auth
                    .record_success(identity, cred, module, small.sent_ms, public_like, update)
                    .await;
                if let Some(v) = version {
                    self.share_project_version(identity, module, v).await;
                }
            }
            Lesson::ProjectCheck { .. } => {}
        }
        CacheStatus::Miss
    }

    /// A download URL GitLab answered: its JWT is kept for the fill and the version recorded;
    /// a 404 means the version is gone.
    async fn learn_download(
        &self,
        identity: Identity,
        cred: Option<&HeaderValue>,
        module: &ModuleId,
        version: &str,
        path: &str,
        small: &Small,
    ) {
        match (small.status.is_success(), download_jwt(small)) {
            (true, Some(jwt)) => {
                metrics::decision(Decision::UpstreamAllowed);
                let owner = self.jwt_owner(identity, cred);
                self.auth
                    .remember_gitlab_jwt(owner, &tarball_key(module, version), jwt);
                let public_like = self.public_lists(identity, module, version).await;
                let v = version.to_string();
                let update = move |g: &mut Grant| g.add_version(&v);
                self.auth
                    .record_success(identity, cred, module, small.sent_ms, public_like, update)
                    .await;
            }
            (false, _) if small.status == StatusCode::NOT_FOUND => {
                self.auth.forget_version(identity, module, version).await;
                self.learn_refusal(identity, module, path, small, false)
                    .await;
            }
            _ => {}
        }
    }

    /// A 200 listing: keep the body, record the grant (and for a versions listing, exactly the
    /// versions it shows), and keep the module-wide view. MISS, or REVALIDATED when this
    /// identity already had the same body. `sent_ms`: when the request was sent.
    ///
    /// A body equal to the one GitLab last gave an anonymous caller teaches nothing an offline
    /// fallback needs (the public record serves it): the grant stays in memory, so junk
    /// credentials on a public module cost no disk.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn absorb_listing(
        &self,
        identity: Identity,
        cred: Option<&HeaderValue>,
        module: &ModuleId,
        op: &ListingKey,
        body: &Bytes,
        previous: Option<&BodyRef>,
        sent_ms: u64,
    ) -> CacheStatus {
        metrics::decision(Decision::UpstreamAllowed);
        let digest = match self.cache.put_small(body.clone()).await {
            Ok(h) => h.to_hex().to_string(),
            Err(e) => {
                tracing::error!(error = %e, "could not store a listing");
                return CacheStatus::Miss;
            }
        };
        let unchanged = previous.is_some_and(|p| p.digest == digest);
        let versions = (*op == ListingKey::Versions).then(|| listed_versions(body));
        if let Some(now) = &versions {
            self.note_reappeared(module, now).await;
        }
        let shared = SharedListing {
            digest: digest.clone(),
            fetched_at: unix_now(),
            versions: versions.clone().unwrap_or_default(),
        };
        let public_like = !identity.is_anonymous()
            && self
                .shared(KIND_SHARED_PUBLIC, module, op)
                .await
                .is_some_and(|p| p.digest == digest);
        self.record_shared(identity, module, op, shared).await;
        let op = op.as_str().into_owned();
        let update = move |g: &mut Grant| {
            g.bodies.insert(
                op,
                BodyRef {
                    digest,
                    fetched_at: sent_ms / 1000,
                },
            );
            if let Some(v) = versions {
                g.set_versions(v);
            }
        };
        self.auth
            .record_success(identity, cred, module, sent_ms, public_like, update)
            .await;
        if unchanged {
            CacheStatus::Revalidated
        } else {
            CacheStatus::Miss
        }
    }

    /// Versions the module's previous listing did not show and this one does may have been
    /// deleted and uploaded again with other bytes: their cached tarballs are refilled before
    /// they are served again (see `cache::republish`).
    async fn note_reappeared(&self, module: &ModuleId, now: &[String]) {
        let previous = self
            .shared(KIND_SHARED, module, &ListingKey::Versions)
            .await;
        let back = republish::reappeared(previous.as_ref().map(|p| &p.versions[..]), now);
        if back.is_empty() {
            return;
        }
        let ids: Vec<String> = back
            .iter()
            .map(|v| records::module_version_id(module, v))
            .collect();
        for v in &back {
            tracing::info!(%module, version = %v, "version listed again: cached bytes will be checked");
        }
        self.cache.note_reappeared(ids).await;
    }

    /// Keep the module-wide view of a listing: for offline fallback by policy, and, when
    /// GitLab served it to an anonymous caller, as public.
    async fn record_shared(
        &self,
        identity: Identity,
        module: &ModuleId,
        op: &ListingKey,
        shared: SharedListing,
    ) {
        let key = shared_key(module, op);
        let records = self.cache.records();
        let shared = std::sync::Arc::new(shared);
        // The public copy first; when it cannot be written (a full disk, the record cap),
        // the module-wide one is not tried either.
        if identity.is_anonymous()
            && records
                .put(KIND_SHARED_PUBLIC, key.clone(), shared.clone())
                .await
                .is_err()
        {
            return;
        }
        let _ = records.put(KIND_SHARED, key, shared).await;
    }

    /// A project route has no listing: its module-wide view is the versions GitLab allowed
    /// through `?terraform-get=1`, kept as a versions record of the project's module key.
    async fn share_project_version(&self, identity: Identity, module: &ModuleId, version: &str) {
        let mut record = self
            .shared(KIND_SHARED, module, &ListingKey::Versions)
            .await
            .unwrap_or_else(|| SharedListing {
                digest: String::new(),
                fetched_at: 0,
                versions: Vec::new(),
            });
        if !record.versions.iter().any(|v| v == version) {
            record.versions.push(version.to_string());
        }
        record.fetched_at = unix_now();
        self.record_shared(identity, module, &ListingKey::Versions, record)
            .await;
    }

    /// GitLab refused (`revoke`: 401/403, or a project check's 404) or does not have the
    /// thing (404): remember it for a few seconds, to spare GitLab a storm of the same request.
    /// A refusal revokes the identity's grant, and a refusal to an anonymous caller means the
    /// module is no longer public: its public record goes.
    async fn learn_refusal(
        &self,
        identity: Identity,
        module: &ModuleId,
        path: &str,
        small: &Small,
        revoke: bool,
    ) {
        if revoke {
            let www_authenticate = small.headers.get(header::WWW_AUTHENTICATE);
            metrics::decision(Decision::UpstreamRefused);
            let refusal = Refusal::of(small.status, www_authenticate, &small.body);
            self.auth.revoke(identity, module, refusal).await;
            if identity.is_anonymous() {
                self.drop_public(module).await;
            }
        }
        self.auth.remember_negative(identity, path, negative(small));
    }

    /// Whose GitLab `/file` JWT a download answer gives: it wraps the raw token, so it stays
    /// with that token, never with the principal the token shares grants with.
    pub(super) fn jwt_owner(&self, identity: Identity, cred: Option<&HeaderValue>) -> Identity {
        if self.is_principal_of(identity, cred) {
            self.secret.identify(cred)
        } else {
            identity
        }
    }

    /// The module turned private: nothing of it is served as public any more.
    async fn drop_public(&self, module: &ModuleId) {
        let versions = self
            .shared(KIND_SHARED_PUBLIC, module, &ListingKey::Versions)
            .await
            .map(|r| r.versions)
            .unwrap_or_default();
        let keys: Vec<String> = [ListingKey::Versions, ListingKey::Latest]
            .iter()
            .map(|op| shared_key(module, op))
            .chain(
                versions
                    .iter()
                    .map(|v| shared_key(module, version_listing(v))),
            )
            .collect();
        self.cache.records().remove(KIND_SHARED_PUBLIC, keys).await;
        tracing::info!(module = %module, "GitLab refused an anonymous caller: the module is no longer served as public");
    }

    pub(super) async fn shared(
        &self,
        kind: &'static str,
        module: &ModuleId,
        op: &ListingKey,
    ) -> Option<SharedListing> {
        self.cache.records().get(kind, shared_key(module, op)).await
    }

    pub(super) async fn body(&self, r: &BodyRef) -> Option<Bytes> {
        let hash = Hash::from_hex(&r.digest).ok()?;
        self.cache.get_small(hash).await.ok().flatten()
    }
}

/// GitLab's refusal, to replay.
fn negative(small: &Small) -> Negative {
    Negative {
        status: small.status,
        www_authenticate: small.headers.get(header::WWW_AUTHENTICATE).cloned(),
        body: small.body.clone(),
    }
}

#[cfg(test)]
#[path = "learn_tests.rs"]
mod tests;
