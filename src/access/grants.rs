//! Access control with the upstream as the authority.
//!
//! A *grant* of (identity, module) records that GitLab answered that identity with success for
//! that module, and what it answered: the digest of each listing body that identity received,
//! and the versions its listing showed. While a grant is fresh (`auth.grant_ttl`), that
//! identity's listings and downloads may be served from the cache, in exactly the form GitLab
//! last gave *that* identity. Otherwise the request goes upstream with the caller's own
//! credentials and GitLab decides.
//!
//! Grants are persisted (hashed identities only) so they survive restarts, until they are past
//! any use (`auth.grant_ttl + cache.stale_if_error`, see
//! [`crate::cache::records::grant_expired`]). A refusal is persisted
//! only when it replaces a grant (a removed member: a restart must not bring the grant back);
//! refusals of identities that never had one (junk tokens, scanners) live in bounded memory,
//! so no caller can fill the disk with records. Raw credentials
//! live in memory only, for at most one grant lifetime after the caller last presented them,
//! to refresh or fill on the caller's behalf (GitLab, asked with them, decides).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, StatusCode};

use super::horizon::Horizon;
use crate::cache::meta::Records;
use crate::cache::records::{grant_key, version_listing, Grant, KIND_GRANT};
use crate::clock::now as unix_now;
use crate::identity::Identity;
use crate::routes::ModuleId;

/// Refusals of never-granted identities kept in memory (a few hundred bytes each).
const MAX_MEMORY_REFUSALS: u64 = 100_000;
/// GitLab's download JWTs live 5 minutes; reuse them for a little less.
const JWT_REUSE: Duration = Duration::from_secs(240);

impl Grant {
    pub fn is_fresh(&self, ttl: Duration) -> bool {
        self.refused_at.is_none()
            && unix_now().saturating_sub(self.checked_at) < ttl.as_secs().max(1)
    }

    /// May this identity download `version`? It must have seen it upstream: in its versions
    /// listing, or as a version's metadata. A versions listing prunes metadata of versions it
    /// no longer shows (see `Grant::set_versions`), so a deleted version is not allowed.
    pub fn allows_version(&self, version: &str) -> bool {
        self.versions.iter().any(|v| v == version)
            || self.bodies.contains_key(&version_listing(version))
    }
}

impl Grant {
    /// Record the versions GitLab's current listing shows, and forget the metadata of any
    /// version it no longer shows (deleted in GitLab).
    pub fn set_versions(&mut self, versions: Vec<String>) {
        self.bodies.retain(|op, _| match op.strip_prefix("v/") {
            Some(v) => versions.iter().any(|l| l == v),
            None => true,
        });
        self.versions = versions;
    }

    /// Add a version GitLab just allowed (a download URL, a project check).
    pub fn add_version(&mut self, version: &str) {
        if !self.versions.iter().any(|v| v == version) {
            self.versions.push(version.to_string());
        }
    }
}

/// A refusal worth replaying for a short while (401/403/404), to protect GitLab from storms.
#[derive(Debug, Clone)]
pub struct Negative {
    pub status: StatusCode,
    pub www_authenticate: Option<HeaderValue>,
    pub body: Bytes,
}

pub struct Auth {
    records: Records,
    /// The two caches every registry hit reads use foldhash, not SipHash: their keys are an
    /// identity (a keyed hash) and that identity with a module path, and foldhash's per-process
    /// seed keeps a flood of chosen keys from landing in one bucket.
    grants: moka::sync::Cache<String, Arc<Grant>, foldhash::fast::RandomState>,
    /// Credential and the instant its grant expires: never kept past that.
    creds: moka::sync::Cache<Identity, (HeaderValue, Instant), foldhash::fast::RandomState>,
    negative: moka::sync::Cache<(Identity, String), Negative>,
    /// Refusals of identities that never had a grant: memory only, bounded in count.
    refusals: moka::sync::Cache<String, Arc<Grant>>,
    jwts: moka::sync::Cache<(Identity, String), String>,
    /// (identity, module) -> end of the `Retry-After` GitLab gave that caller with a 429.
    held: moka::sync::Cache<(Identity, String), Instant>,
    /// Past these, `negative` and `held` hold nothing: the hit path skips their lookups.
    negative_horizon: Horizon,
    held_horizon: Horizon,
    negative_ttl: Duration,
    pub grant_ttl: Duration,
}

/// Longest `Retry-After` honoured for one caller: a bogus value must not shut it out for a day.
pub const MAX_HOLD: Duration = Duration::from_secs(300);

impl Auth {
    pub fn new(records: Records, grant_ttl: Duration, negative_ttl: Duration) -> Auth {
        Auth {
            records,
            // Re-read from disk now and then, so `tfmirror cache purge` reaches a running server.
            grants: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(30))
                .support_invalidation_closures()
                .build_with_hasher(foldhash::fast::RandomState::default()),
            creds: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(grant_ttl)
                .build_with_hasher(foldhash::fast::RandomState::default()),
            refusals: moka::sync::Cache::builder()
                .max_capacity(MAX_MEMORY_REFUSALS)
                .support_invalidation_closures()
                .build(),
            negative: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(negative_ttl.max(Duration::from_millis(1)))
                .build(),
            jwts: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(JWT_REUSE)
                .build(),
            held: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(MAX_HOLD)
                .build(),
            negative_horizon: Horizon::default(),
            held_horizon: Horizon::default(),
            negative_ttl,
            grant_ttl,
        }
    }

    /// The grant, from memory or disk. Expired grants are returned too: stale-if-error
    /// decides with them.
    pub async fn grant(&self, identity: Identity, module: &ModuleId) -> Option<Arc<Grant>> {
        let key = grant_key(identity, module);
        if let Some(g) = self.grants.get(&key) {
            return Some(g);
        }
        if let Some(g) = self.refusals.get(&key) {
            return Some(g);
        }
        let g: Grant = self.records.get(KIND_GRANT, key.clone()).await?;
        let g = Arc::new(g);
        self.grants.insert(key, g.clone());
        Some(g)
    }

    /// Record an upstream success for this identity, updating the grant with `update`.
    pub async fn record_success(
        &self,
        identity: Identity,
        credential: Option<&HeaderValue>,
        module: &ModuleId,
        update: impl FnOnce(&mut Grant),
    ) {
        if let Some(c) = credential {
            self.remember_credential(identity, c, self.grant_ttl);
        }
        let mut g = self
            .grant(identity, module)
            .await
            .map(|g| (*g).clone())
            .unwrap_or_default();
        g.checked_at = unix_now();
        g.refused_at = None;
        update(&mut g);
        self.store(identity, module, g).await;
    }

    async fn store(&self, identity: Identity, module: &ModuleId, g: Grant) {
        let key = grant_key(identity, module);
        self.refusals.invalidate(&key);
        let g = Arc::new(g);
        self.grants.insert(key.clone(), g.clone());
        if self.records.put(KIND_GRANT, key, g).await.is_err() {
            tracing::warn!("could not persist a grant; it stays in memory");
        }
    }

    /// The upstream refused this identity: forget what it was granted, and remember the
    /// refusal so that no stale answer is ever served to it. On disk only when it replaces a
    /// grant (which a restart would otherwise read back); in memory otherwise.
    pub async fn revoke(&self, identity: Identity, module: &ModuleId) {
        let key = grant_key(identity, module);
        self.creds.invalidate(&identity);
        let before = self.grant(identity, module).await;
        let refused = Arc::new(Grant {
            refused_at: Some(unix_now()),
            ..Grant::default()
        });
        match refusal_goes_to(before.as_deref()) {
            RefusalTo::Disk => {
                self.grants.insert(key.clone(), refused.clone());
                if self.records.put(KIND_GRANT, key, refused).await.is_err() {
                    // Without it, a restart could serve the old grant's answers again: drop
                    // the grant's record at least.
                    let key = grant_key(identity, module);
                    self.records.remove(KIND_GRANT, vec![key]).await;
                    tracing::warn!("could not persist a refusal; the grant record was removed");
                }
            }
            RefusalTo::Memory => {
                self.refusals.insert(key, refused);
            }
        }
    }

    /// GitLab answered this identity 429 for this module: hold it (and only it) back for
    /// `wait`, capped at [`MAX_HOLD`].
    pub fn hold(&self, identity: Identity, module: &ModuleId, wait: Duration) {
        let until = Instant::now() + wait.min(MAX_HOLD);
        self.held_horizon.extend_to(until);
        self.held.insert((identity, module.path()), until);
    }

    /// What is left at `now` of this caller's `Retry-After` for this module, if any.
    pub fn held(&self, identity: Identity, module: &ModuleId, now: Instant) -> Option<Duration> {
        if self.held_horizon.passed(now) {
            return None;
        }
        let until = self.held.get(&(identity, module.path()))?;
        until.checked_duration_since(now)
    }

    /// GitLab no longer has `version` for this identity (its listing dropped it, or it answered
    /// 404): it may no longer be downloaded on the strength of this grant.
    pub async fn forget_version(&self, identity: Identity, module: &ModuleId, version: &str) {
        let Some(g) = self.grant(identity, module).await else {
            return;
        };
        if !g.allows_version(version) {
            return;
        }
        let mut g = (*g).clone();
        g.versions.retain(|v| v != version);
        g.bodies.remove(&version_listing(version));
        self.store(identity, module, g).await;
    }

    /// Forget in-memory grants for a module (after a purge removed them from disk).
    pub fn forget_module(&self, module: &str) {
        let suffix = format!("/{module}");
        let s = suffix.clone();
        let _ = self
            .grants
            .invalidate_entries_if(move |k, _| k.ends_with(&s));
        let _ = self
            .refusals
            .invalidate_entries_if(move |k, _| k.ends_with(&suffix));
    }

    /// The credential this identity presented, while its grant lifetime lasts.
    pub fn credential(&self, identity: Identity, now: Instant) -> Option<HeaderValue> {
        self.creds
            .get(&identity)
            .filter(|(_, until)| now < *until)
            .map(|(c, _)| c)
    }

    /// Keep the credential of a request served under a fresh grant, until that grant expires,
    /// so a refill (say, after a restart emptied memory) can ask GitLab on the caller's behalf.
    ///
    /// `remembered` is what [`Auth::credential`] gave at the start of the request: this runs
    /// on every cache hit, and a second lookup would cost as much as the first.
    pub fn remember_for_grant(
        &self,
        identity: Identity,
        credential: Option<&HeaderValue>,
        remembered: Option<&HeaderValue>,
        grant: &Grant,
    ) {
        let Some(c) = credential else { return };
        if remembered == Some(c) {
            return;
        }
        let age = Duration::from_secs(unix_now().saturating_sub(grant.checked_at));
        if let Some(left) = self.grant_ttl.checked_sub(age) {
            self.remember_credential(identity, c, left);
        }
    }

    /// Keep the credential of a request answered from a stale grant (GitLab unreachable or
    /// failing), for one grant lifetime from now: the download URL just handed out may need
    /// a fill, and only GitLab, asked with this credential, can allow that fill.
    pub fn remember_for_stale(&self, identity: Identity, credential: Option<&HeaderValue>) {
        if let Some(c) = credential {
            self.remember_credential(identity, c, self.grant_ttl);
        }
    }

    fn remember_credential(&self, identity: Identity, credential: &HeaderValue, for_: Duration) {
        let until = Instant::now() + for_;
        self.creds.insert(identity, (credential.clone(), until));
    }

    pub fn negative(&self, identity: Identity, path: &str, now: Instant) -> Option<Negative> {
        if self.negative_horizon.passed(now) {
            return None;
        }
        self.negative.get(&(identity, path.to_string()))
    }

    pub fn remember_negative(&self, identity: Identity, path: &str, n: Negative) {
        self.negative_horizon
            .extend_to(Instant::now() + self.negative_ttl);
        self.negative.insert((identity, path.to_string()), n);
    }

    /// GitLab's download JWT for (identity, module@version), kept in memory only.
    pub fn gitlab_jwt(&self, identity: Identity, tarball: &str) -> Option<String> {
        self.jwts.get(&(identity, tarball.to_string()))
    }

    pub fn remember_gitlab_jwt(&self, identity: Identity, tarball: &str, jwt: String) {
        self.jwts.insert((identity, tarball.to_string()), jwt);
    }
}

/// Where a refusal is recorded, given what was known of the identity before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalTo {
    /// It replaces a grant (or a refusal that replaced one): on disk, so that a restart
    /// cannot bring the grant back.
    Disk,
    /// The identity never had a grant: bounded memory; nothing on disk to contradict.
    Memory,
}

pub fn refusal_goes_to(before: Option<&Grant>) -> RefusalTo {
    match before {
        Some(g) if g.refused_at.is_none() || g.checked_at > 0 => RefusalTo::Disk,
        _ => RefusalTo::Memory,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::meta::MetaStore;

    #[test]
    fn refusals_reach_the_disk_only_over_a_grant() {
        let granted = Grant {
            checked_at: 100,
            ..Grant::default()
        };
        let refused_after_grant = Grant {
            checked_at: 100,
            refused_at: Some(200),
            ..Grant::default()
        };
        let refused_only = Grant {
            refused_at: Some(200),
            ..Grant::default()
        };
        let table = [
            (None, RefusalTo::Memory),
            (Some(&granted), RefusalTo::Disk),
            (Some(&refused_after_grant), RefusalTo::Disk),
            (Some(&refused_only), RefusalTo::Memory),
        ];
        for (before, want) in table {
            assert_eq!(refusal_goes_to(before), want, "{before:?}");
        }
    }

    #[tokio::test]
    async fn never_granted_refusals_stay_off_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let meta = Arc::new(MetaStore::open(dir.path()).unwrap());
        let auth = Auth::new(
            Records::new(meta.clone()),
            Duration::from_secs(60),
            Duration::from_secs(5),
        );
        for i in 0..50u8 {
            auth.revoke(Identity([i + 1; 16]), &module()).await;
            let g = auth.grant(Identity([i + 1; 16]), &module()).await.unwrap();
            assert!(g.refused_at.is_some(), "remembered in memory");
        }
        assert!(meta.scan::<Grant>(KIND_GRANT).unwrap().is_empty());
        // Once GitLab says yes, the refusal is gone.
        let id = Identity([1; 16]);
        auth.record_success(id, None, &module(), |_| {}).await;
        assert!(auth
            .grant(id, &module())
            .await
            .unwrap()
            .refused_at
            .is_none());
    }

    fn module() -> ModuleId {
        ModuleId::new("infra", "vpc", "aws")
    }

    /// A credential is kept until its grant expires. When the caller comes back under a new
    /// grant with the same credential, it is kept again: the hit path passes what it found
    /// (nothing, once expired), and an expired entry that moka still holds must not count as
    /// "already remembered" (it did, when `remember_for_grant` looked the entry up itself).
    #[test]
    fn an_expired_credential_is_kept_again_under_a_new_grant() {
        let dir = tempfile::tempdir().unwrap();
        let meta = Arc::new(MetaStore::open(dir.path()).unwrap());
        let auth = Auth::new(
            Records::new(meta),
            Duration::from_secs(60),
            Duration::from_secs(5),
        );
        let id = Identity([4; 16]);
        let cred = HeaderValue::from_static("Bearer same-token");
        let old = Grant {
            checked_at: unix_now() - 59,
            ..Grant::default()
        };
        auth.remember_for_grant(id, Some(&cred), None, &old);
        let now = Instant::now();
        assert_eq!(auth.credential(id, now), Some(cred.clone()));
        // Past the old grant's end (one second left of 60), the credential is gone.
        let later = now + Duration::from_secs(3);
        let found = auth.credential(id, later);
        assert_eq!(found, None);
        let fresh = Grant {
            checked_at: unix_now(),
            ..Grant::default()
        };
        auth.remember_for_grant(id, Some(&cred), found.as_ref(), &fresh);
        assert_eq!(auth.credential(id, later), Some(cred));
    }

    #[tokio::test]
    async fn grants_persist_and_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let meta = Arc::new(MetaStore::open(dir.path()).unwrap());
        let id = Identity([3; 16]);
        let cred = HeaderValue::from_static("Bearer secret-token");
        {
            let auth = Auth::new(
                Records::new(meta.clone()),
                Duration::from_secs(60),
                Duration::from_secs(5),
            );
            auth.record_success(id, Some(&cred), &module(), |g| {
                g.versions = vec!["1.0.0".into()]
            })
            .await;
            assert_eq!(auth.credential(id, Instant::now()), Some(cred.clone()));
        }
        // A new instance (a restart) finds the grant on disk, but no credential.
        let auth = Auth::new(
            Records::new(meta),
            Duration::from_secs(60),
            Duration::from_secs(5),
        );
        let g = auth.grant(id, &module()).await.unwrap();
        assert!(g.is_fresh(Duration::from_secs(60)));
        assert!(g.allows_version("1.0.0"));
        assert!(!g.allows_version("2.0.0"));
        assert_eq!(auth.credential(id, Instant::now()), None);
        auth.revoke(id, &module()).await;
        let g = auth.grant(id, &module()).await.unwrap();
        assert!(g.refused_at.is_some());
        assert!(!g.is_fresh(Duration::from_secs(60)));
        assert!(g.versions.is_empty());
        // Nothing on disk names the token.
        let dump = std::process::Command::new("grep")
            .args(["-r", "secret-token", dir.path().to_str().unwrap()])
            .output()
            .unwrap();
        assert!(dump.stdout.is_empty());
    }
}
