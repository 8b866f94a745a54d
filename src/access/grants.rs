//! Access control with the upstream as the authority.
//!
//! A *grant* of (identity, module) records that GitLab answered that identity with success for
//! that module, and what it answered: the digest of each listing body that identity received,
//! and the versions its listing showed. While a grant is fresh (`auth.grant_ttl`), that
//! identity's listings and downloads may be served from the cache, in exactly the form GitLab
//! last gave *that* identity. Otherwise the request goes upstream with the caller's own
//! credentials and GitLab decides.
//!
//! **What is kept where, and bounded how.**
//! - Grants are persisted (hashed identities only) so they survive restarts, until they are
//!   past any use (`auth.grant_ttl + cache.stale_if_error`, see
//!   [`crate::cache::records::grant_expired`]). Past `limits.max_records`, the record nearest its
//!   expiry makes room (`cache::meta`).
//! - A grant whose every answer is the one GitLab gives anonymous callers (any credential GitLab
//!   ignores, on a public module: junk `Authorization` values, an unknown scheme) is kept in
//!   memory only: offline, the module's public records serve such a caller anyway, so a disk
//!   record would add nothing but a file per junk value.
//! - A refusal is persisted only when it replaces a grant on disk (a removed member: a restart
//!   must not bring the grant back); refusals of identities that never had one (junk tokens,
//!   scanners) live in memory.
//! - Every memory cache here is bounded in bytes (moka weighers), whatever callers send.
//! - Raw credentials live in memory only, for at most one grant lifetime after the caller last
//!   presented them, to refresh or fill on the caller's behalf (GitLab, asked with them,
//!   decides).
//!
//! **Late answers.** Every answer is learned with the time its request was *sent*. A success
//! sent before a refusal was learned changes nothing (it may describe access GitLab has since
//! withdrawn), and a grant's clock starts at its request's send time, never at its arrival.

use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, StatusCode};

use super::horizon::Horizon;
use crate::cache::meta::Records;
use crate::cache::records::{grant_expiry, grant_key, version_listing, Grant, Refusal, KIND_GRANT};
use crate::clock::now as unix_now;
use crate::identity::Identity;
use crate::routes::ModuleId;

/// Memory for grants read from disk (re-read after 30 s, so a purge reaches a running server).
const DISK_GRANT_BYTES: u64 = 64 << 20;
/// Memory for grants and refusals that are never written (see the module docs).
const MEMORY_GRANT_BYTES: u64 = 64 << 20;
/// Memory for raw credentials (a header may be up to 32 KiB: the bound is in bytes).
const CREDENTIAL_BYTES: u64 = 32 << 20;
/// Memory for GitLab's download JWTs.
const JWT_BYTES: u64 = 16 << 20;
/// Memory for refusals replayed for `auth.negative_ttl`.
const NEGATIVE_BYTES: u64 = 16 << 20;
/// Modules whose latest refusal time is remembered (see [`Auth::refused_since`]).
const REFUSED_MODULES: u64 = 100_000;
/// GitLab's download JWTs live 5 minutes; reuse them for a little less.
const JWT_REUSE: Duration = Duration::from_secs(240);
/// The most of GitLab's refusal body kept to replay (GitLab's are a few dozen bytes).
const MAX_REFUSAL_BODY: usize = 2048;

impl Grant {
    /// May this identity download `version`? It must have seen it upstream: in its versions
    /// listing, or as a version's metadata. A versions listing prunes metadata of versions it
    /// no longer shows (see `Grant::set_versions`), so a deleted version is not allowed.
    pub fn allows_version(&self, version: &str) -> bool {
        self.versions.iter().any(|v| v == version)
            || self.bodies.contains_key(&version_listing(version))
    }

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

    /// About how many bytes it holds in memory, for the caches' weighers.
    fn weight(&self) -> u32 {
        let versions: usize = self.versions.iter().map(|v| v.len() + 24).sum();
        let bodies: usize = self.bodies.keys().map(|k| k.len() + 120).sum();
        let refusal = self.refusal.as_ref().map_or(0, |r| r.body.len() + 64);
        u32::try_from(128 + versions + bodies + refusal).unwrap_or(u32::MAX)
    }
}

impl Refusal {
    /// GitLab's refusal as it answered it, to keep with the refusal (body capped; a body that
    /// is not text is replaced by GitLab's own plain message for the status).
    pub fn of(status: StatusCode, www_authenticate: Option<&HeaderValue>, body: &[u8]) -> Refusal {
        let body = match std::str::from_utf8(body) {
            Ok(b) if b.len() <= MAX_REFUSAL_BODY => b.to_string(),
            _ => Refusal::plain_body(status),
        };
        Refusal {
            status: status.as_u16(),
            body,
            www_authenticate: www_authenticate
                .and_then(|w| w.to_str().ok())
                .map(str::to_string),
        }
    }

    /// What a refusal recorded by an older release (which kept no answer) is replayed as.
    pub fn forbidden() -> Refusal {
        Refusal {
            status: 403,
            body: Refusal::plain_body(StatusCode::FORBIDDEN),
            www_authenticate: None,
        }
    }

    fn plain_body(status: StatusCode) -> String {
        let reason = status.canonical_reason().unwrap_or("Refused");
        serde_json::json!({ "message": format!("{} {reason}", status.as_u16()) }).to_string()
    }
}

/// A refusal worth replaying for a short while (401/403/404), to protect GitLab from storms.
#[derive(Debug, Clone)]
pub struct Negative {
    pub status: StatusCode,
    pub www_authenticate: Option<HeaderValue>,
    pub body: Bytes,
}

/// Weighers, in bytes (moka weighs in `u32`).
#[allow(clippy::ptr_arg)] // moka hands the key as it is stored
fn weigh_grant(key: &String, g: &Arc<Grant>) -> u32 {
    g.weight().saturating_add(key.len() as u32)
}

fn weigh_credential(_: &Identity, (c, _): &(HeaderValue, Instant)) -> u32 {
    u32::try_from(c.len() + 64).unwrap_or(u32::MAX)
}

#[allow(clippy::ptr_arg)] // moka hands the value as it is stored
fn weigh_jwt((_, tarball): &(Identity, String), jwt: &String) -> u32 {
    u32::try_from(jwt.len() + tarball.len() + 64).unwrap_or(u32::MAX)
}

fn weigh_negative((_, path): &(Identity, String), (n, _): &(Negative, Instant)) -> u32 {
    u32::try_from(n.body.len() + path.len() + 128).unwrap_or(u32::MAX)
}

pub struct Auth {
    records: Records,
    /// Grants read from or written to disk. The two caches every registry hit reads use
    /// foldhash, not SipHash: their keys are an identity (a keyed hash) and that identity with
    /// a module path, and foldhash's per-process seed keeps a flood of chosen keys from landing
    /// in one bucket.
    grants: moka::sync::Cache<String, Arc<Grant>, foldhash::fast::RandomState>,
    /// Grants and refusals never written (see the module docs). Read before `grants`: what is
    /// here is the newest word on its identity.
    memory: moka::sync::Cache<String, Arc<Grant>, foldhash::fast::RandomState>,
    /// Credential and the instant its grant expires: never kept past that.
    creds: moka::sync::Cache<Identity, (HeaderValue, Instant), foldhash::fast::RandomState>,
    /// A refusal to replay, and the instant it stops answering (moka's own expiry follows the
    /// real clock; this one [`crate::clock::instant`]).
    negative: moka::sync::Cache<(Identity, String), (Negative, Instant)>,
    jwts: moka::sync::Cache<(Identity, String), String>,
    /// (identity, module) -> end of the `Retry-After` GitLab gave that caller with a 429.
    held: moka::sync::Cache<(Identity, String), Instant>,
    /// Past these, `negative` and `held` hold nothing: the hit path skips their lookups.
    negative_horizon: Horizon,
    held_horizon: Horizon,
    /// Module -> the latest refusal of any identity for it, learned by this process.
    refused_modules: moka::sync::Cache<String, u64>,
    /// No refusal older than this is known by module: the start of this process (a refusal on
    /// disk may predate it), raised to the time of any entry `refused_modules` evicts.
    refusal_floor: Arc<Mutex<u64>>,
    negative_ttl: Duration,
    pub grant_ttl: Duration,
    /// `auth.grant_ttl + cache.stale_if_error`, seconds: when a grant record is past any use.
    horizon: u64,
}

/// Longest `Retry-After` honoured for one caller: a bogus value must not shut it out for a day.
pub const MAX_HOLD: Duration = Duration::from_secs(300);

fn weighed<K, V>(
    bytes: u64,
    weigher: fn(&K, &V) -> u32,
) -> moka::sync::CacheBuilder<K, V, moka::sync::Cache<K, V>>
where
    K: std::hash::Hash + Eq + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    moka::sync::Cache::builder()
        .max_capacity(bytes)
        .weigher(weigher)
}

impl Auth {
    pub fn new(
        records: Records,
        grant_ttl: Duration,
        negative_ttl: Duration,
        stale_if_error: Duration,
    ) -> Auth {
        let floor = Arc::new(Mutex::new(unix_now()));
        let evicted = floor.clone();
        Auth {
            records,
            // Re-read from disk now and then, so `tfmirror cache purge` reaches a running server.
            grants: weighed(DISK_GRANT_BYTES, weigh_grant)
                .time_to_live(Duration::from_secs(30))
                .support_invalidation_closures()
                .build_with_hasher(foldhash::fast::RandomState::default()),
            memory: weighed(MEMORY_GRANT_BYTES, weigh_grant)
                .support_invalidation_closures()
                .build_with_hasher(foldhash::fast::RandomState::default()),
            creds: weighed(CREDENTIAL_BYTES, weigh_credential)
                .time_to_live(grant_ttl)
                .build_with_hasher(foldhash::fast::RandomState::default()),
            negative: weighed(NEGATIVE_BYTES, weigh_negative)
                .time_to_live(negative_ttl.max(Duration::from_millis(1)))
                .build(),
            jwts: weighed(JWT_BYTES, weigh_jwt)
                .time_to_live(JWT_REUSE)
                .build(),
            held: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(MAX_HOLD)
                .build(),
            negative_horizon: Horizon::default(),
            held_horizon: Horizon::default(),
            refused_modules: moka::sync::Cache::builder()
                .max_capacity(REFUSED_MODULES)
                // An entry pushed out by the bound takes its knowledge with it: every module
                // then counts as refused at that time at the latest (more lookups, never fewer).
                .eviction_listener(move |_, at: u64, cause: moka::notification::RemovalCause| {
                    if cause.was_evicted() {
                        let mut floor = evicted.lock().expect("refusal floor");
                        *floor = (*floor).max(at);
                    }
                })
                .build(),
            refusal_floor: floor,
            negative_ttl,
            grant_ttl,
            horizon: (grant_ttl + stale_if_error).as_secs(),
        }
    }

    /// Write a grant (or a refusal) with the time it is past any use: past
    /// `limits.max_records`, the record nearest its expiry makes room for a new one.
    async fn persist(&self, key: String, g: Arc<Grant>) -> std::io::Result<()> {
        let expiry = grant_expiry(&g, self.horizon);
        self.records.put_expiring(KIND_GRANT, key, g, expiry).await
    }

    /// The grant, from memory or disk. Expired grants are returned too: stale-if-error
    /// decides with them.
    pub async fn grant(&self, identity: Identity, module: &ModuleId) -> Option<Arc<Grant>> {
        let key = grant_key(identity, module);
        if let Some(g) = self.memory.get(&key) {
            return Some(g);
        }
        if let Some(g) = self.grants.get(&key) {
            return Some(g);
        }
        let g: Grant = self.records.get(KIND_GRANT, key.clone()).await?;
        let g = Arc::new(g);
        self.grants.insert(key, g.clone());
        Some(g)
    }

    /// Record an upstream success for this identity, updating the grant with `update`.
    ///
    /// `sent_ms` is when the request GitLab answered was sent (unix milliseconds): a success
    /// sent no later than the identity's latest refusal was learned, or before the success
    /// already recorded, changes nothing (a late answer), and the grant's clock starts at its
    /// send time.
    /// `public_like`: GitLab's answer is the one it gives anonymous callers; the grant then
    /// stays in memory unless it is already on disk. Returns whether the success was recorded.
    pub async fn record_success(
        &self,
        identity: Identity,
        credential: Option<&HeaderValue>,
        module: &ModuleId,
        sent_ms: u64,
        public_like: bool,
        update: impl FnOnce(&mut Grant),
    ) -> bool {
        let before = self.grant(identity, module).await;
        let sent_at = sent_ms / 1000;
        if before.as_ref().is_some_and(|g| !success_counts(g, sent_ms)) {
            return false;
        }
        if let Some(c) = credential {
            self.remember_credential(identity, c, self.grant_ttl);
        }
        let memory_only = public_like && before.as_ref().is_none_or(|g| g.memory_only);
        let mut g = before.map(|g| (*g).clone()).unwrap_or_default();
        g.checked_at = sent_at;
        g.refused_at = None;
        g.refusal = None;
        g.memory_only = memory_only;
        update(&mut g);
        self.store(identity, module, g).await;
        true
    }

    async fn store(&self, identity: Identity, module: &ModuleId, g: Grant) {
        let key = grant_key(identity, module);
        let g = Arc::new(g);
        if g.memory_only {
            self.memory.insert(key, g);
            return;
        }
        self.memory.invalidate(&key);
        self.grants.insert(key.clone(), g.clone());
        if self.persist(key, g).await.is_err() {
            tracing::warn!("could not persist a grant; it stays in memory");
        }
    }

    /// The upstream refused this identity: forget what it was granted, and remember the
    /// refusal, with GitLab's answer, so that no stale answer is ever served to it and its
    /// refusal is replayed while GitLab cannot be asked. On disk only when it replaces a grant
    /// on disk (which a restart would otherwise read back); in memory otherwise.
    pub async fn revoke(&self, identity: Identity, module: &ModuleId, refusal: Refusal) {
        let key = grant_key(identity, module);
        self.creds.invalidate(&identity);
        let before = self.grant(identity, module).await;
        let now_ms = crate::clock::now_ms();
        let now = now_ms / 1000;
        self.refused_modules.insert(module.path(), now);
        let mut refused = Grant {
            refused_at: Some(now),
            refused_at_ms: now_ms,
            refusal: Some(refusal),
            ..Grant::default()
        };
        match refusal_goes_to(before.as_deref()) {
            RefusalTo::Disk => {
                let refused = Arc::new(refused);
                self.memory.invalidate(&key);
                self.grants.insert(key.clone(), refused.clone());
                if self.persist(key, refused).await.is_err() {
                    // Without it, a restart could serve the old grant's answers again: drop
                    // the grant's record at least.
                    let key = grant_key(identity, module);
                    self.records.remove(KIND_GRANT, vec![key]).await;
                    tracing::warn!("could not persist a refusal; the grant record was removed");
                }
            }
            RefusalTo::Memory => {
                refused.memory_only = true;
                self.memory.insert(key, Arc::new(refused));
            }
        }
    }

    /// GitLab's refusal of this identity for this module, if its standing is a refusal.
    pub async fn refusal(&self, identity: Identity, module: &ModuleId) -> Option<Refusal> {
        let g = self.grant(identity, module).await?;
        g.refused_at?;
        Some(g.refusal.clone().unwrap_or_else(Refusal::forbidden))
    }

    /// GitLab's refusal of this identity for this module if it was learned at or after
    /// `since` (unix seconds): a download token minted before a revocation stops working.
    /// Nearly always answered without a lookup: only modules refused at or after `since`
    /// (or before this process started, as far as it can tell) are looked up.
    pub async fn refused_since(
        &self,
        identity: Identity,
        module: &ModuleId,
        since: u64,
    ) -> Option<Refusal> {
        let floor = *self.refusal_floor.lock().expect("refusal floor");
        let latest = self.refused_modules.get(&module.path()).unwrap_or(floor);
        if since > floor && since > latest {
            return None;
        }
        let g = self.grant(identity, module).await?;
        let at = g.refused_at?;
        (at >= since).then(|| g.refusal.clone().unwrap_or_else(Refusal::forbidden))
    }

    /// GitLab answered this identity 429 for this module: hold it (and only it) back for
    /// `wait`, capped at [`MAX_HOLD`].
    pub fn hold(&self, identity: Identity, module: &ModuleId, wait: Duration) {
        let until = crate::clock::instant() + wait.min(MAX_HOLD);
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
        for cache in [&self.grants, &self.memory] {
            let s = suffix.clone();
            let _ = cache.invalidate_entries_if(move |k, _| k.ends_with(&s));
        }
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

    /// `credential` no longer works (a finished job's token): never use it for `identity`
    /// again, if it is the one remembered.
    pub fn forget_credential(&self, identity: Identity, credential: &HeaderValue) {
        // A race with a newer credential of the same identity only costs that one a refill
        // from the request it comes with.
        if self
            .creds
            .get(&identity)
            .is_some_and(|(c, _)| c == credential)
        {
            self.creds.invalidate(&identity);
        }
    }

    fn remember_credential(&self, identity: Identity, credential: &HeaderValue, for_: Duration) {
        let until = crate::clock::instant() + for_;
        self.creds.insert(identity, (credential.clone(), until));
    }

    pub fn negative(&self, identity: Identity, path: &str, now: Instant) -> Option<Negative> {
        if self.negative_horizon.passed(now) {
            return None;
        }
        self.negative
            .get(&(identity, path.to_string()))
            .filter(|(_, until)| now < *until)
            .map(|(n, _)| n)
    }

    pub fn remember_negative(&self, identity: Identity, path: &str, n: Negative) {
        let until = crate::clock::instant() + self.negative_ttl;
        self.negative_horizon.extend_to(until);
        self.negative
            .insert((identity, path.to_string()), (n, until));
    }

    /// GitLab's download JWT for (identity, module@version), kept in memory only.
    pub fn gitlab_jwt(&self, identity: Identity, tarball: &str) -> Option<String> {
        self.jwts.get(&(identity, tarball.to_string()))
    }

    pub fn remember_gitlab_jwt(&self, identity: Identity, tarball: &str, jwt: String) {
        self.jwts.insert((identity, tarball.to_string()), jwt);
    }

    /// Run the memory caches' pending evictions (tests weigh what they hold).
    #[cfg(test)]
    fn settle(&self) {
        self.creds.run_pending_tasks();
        self.memory.run_pending_tasks();
        self.jwts.run_pending_tasks();
    }
}

/// Does a success to a request sent at `sent_ms` change grant `g`? Not when it was sent no
/// later than `g`'s refusal was learned (it may describe access GitLab has withdrawn since),
/// nor when a success to a later request is recorded already.
fn success_counts(g: &Grant, sent_ms: u64) -> bool {
    match g.refused_at {
        // Records of older releases know the refusal to the second only.
        Some(at) if g.refused_at_ms == 0 => sent_ms / 1000 > at,
        Some(_) => sent_ms > g.refused_at_ms,
        None => sent_ms / 1000 >= g.checked_at,
    }
}

/// Where a refusal is recorded, given what was known of the identity before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalTo {
    /// It replaces a grant on disk (or a refusal that replaced one): on disk, so that a
    /// restart cannot bring the grant back.
    Disk,
    /// The identity never had a grant on disk: bounded memory; nothing on disk to contradict.
    Memory,
}

pub fn refusal_goes_to(before: Option<&Grant>) -> RefusalTo {
    match before {
        Some(g) if !g.memory_only && (g.refused_at.is_none() || g.checked_at > 0) => {
            RefusalTo::Disk
        }
        _ => RefusalTo::Memory,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::meta::MetaStore;
    use crate::clock::now_ms;

    fn new_auth(meta: &Arc<MetaStore>) -> Auth {
        Auth::new(
            Records::new(meta.clone()),
            Duration::from_secs(60),
            Duration::from_secs(5),
            Duration::from_secs(600),
        )
    }

    fn store() -> (tempfile::TempDir, Arc<MetaStore>) {
        let dir = tempfile::tempdir().unwrap();
        let meta = Arc::new(MetaStore::open(dir.path()).unwrap());
        (dir, meta)
    }

    fn forbidden() -> Refusal {
        Refusal::of(
            StatusCode::FORBIDDEN,
            None,
            br#"{"message":"403 Forbidden"}"#,
        )
    }

    #[test]
    fn refusals_reach_the_disk_only_over_a_grant_on_disk() {
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
        let in_memory = Grant {
            checked_at: 100,
            memory_only: true,
            ..Grant::default()
        };
        let table = [
            (None, RefusalTo::Memory),
            (Some(&granted), RefusalTo::Disk),
            (Some(&refused_after_grant), RefusalTo::Disk),
            (Some(&refused_only), RefusalTo::Memory),
            (Some(&in_memory), RefusalTo::Memory),
        ];
        for (before, want) in table {
            assert_eq!(refusal_goes_to(before), want, "{before:?}");
        }
    }

    #[tokio::test]
    async fn never_granted_refusals_stay_off_the_disk() {
        let (_dir, meta) = store();
        let auth = new_auth(&meta);
        for i in 0..50u8 {
            auth.revoke(Identity([i + 1; 16]), &module(), forbidden())
                .await;
            let g = auth.grant(Identity([i + 1; 16]), &module()).await.unwrap();
            assert!(g.refused_at.is_some(), "remembered in memory");
        }
        assert!(meta.scan::<Grant>(KIND_GRANT).unwrap().is_empty());
        // Once GitLab says yes (to a request sent after the refusal), the refusal is gone.
        let id = Identity([1; 16]);
        crate::clock::advance(Duration::from_millis(1));
        assert!(
            auth.record_success(id, None, &module(), now_ms(), false, |_| {})
                .await
        );
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
        let (_dir, meta) = store();
        let auth = new_auth(&meta);
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
    async fn grants_persist_and_revoke_with_gitlabs_answer() {
        let (dir, meta) = store();
        let id = Identity([3; 16]);
        let cred = HeaderValue::from_static("Bearer secret-token");
        {
            let auth = new_auth(&meta);
            let recorded = auth
                .record_success(id, Some(&cred), &module(), now_ms(), false, |g| {
                    g.versions = vec!["1.0.0".into()]
                })
                .await;
            assert!(recorded);
            assert_eq!(auth.credential(id, Instant::now()), Some(cred.clone()));
        }
        // A new instance (a restart) finds the grant on disk, but no credential.
        let auth = new_auth(&meta);
        let g = auth.grant(id, &module()).await.unwrap();
        assert!(g.refused_at.is_none() && !g.memory_only);
        assert!(g.allows_version("1.0.0"));
        assert!(!g.allows_version("2.0.0"));
        assert_eq!(auth.credential(id, Instant::now()), None);
        let www = HeaderValue::from_static("Basic realm=\"GitLab Packages Registry\"");
        let refusal = Refusal::of(
            StatusCode::UNAUTHORIZED,
            Some(&www),
            br#"{"message":"401 Unauthorized"}"#,
        );
        auth.revoke(id, &module(), refusal.clone()).await;
        // The refusal replaced the grant on disk, GitLab's answer with it.
        let again = new_auth(&meta);
        let g = again.grant(id, &module()).await.unwrap();
        assert!(g.refused_at.is_some());
        assert!(g.versions.is_empty());
        assert_eq!(again.refusal(id, &module()).await, Some(refusal));
        // Nothing on disk names the token.
        let dump = std::process::Command::new("grep")
            .args(["-r", "secret-token", dir.path().to_str().unwrap()])
            .output()
            .unwrap();
        assert!(dump.stdout.is_empty());
    }

    /// Issue 26, item 11: a slow 200 to a request sent before a member's removal, arriving
    /// after GitLab's 403 to a later request, must not grant her again.
    #[tokio::test]
    async fn a_late_yes_does_not_undo_a_later_no() {
        let (_dir, meta) = store();
        let auth = new_auth(&meta);
        let id = Identity([5; 16]);
        let t0 = now_ms();
        assert!(
            auth.record_success(id, None, &module(), t0, false, |g| g.add_version("1.0.0"))
                .await
        );
        // A request sent a moment later is slow; meanwhile another one is refused.
        crate::clock::advance(Duration::from_millis(300));
        auth.revoke(id, &module(), forbidden()).await;
        // The slow yes arrives: it was sent before the refusal was learned.
        let late = auth
            .record_success(id, None, &module(), t0 + 100, false, |g| {
                g.add_version("1.0.0")
            })
            .await;
        assert!(!late, "a yes older than the refusal changes nothing");
        assert!(auth.refusal(id, &module()).await.is_some());
        // A yes to a request sent after the refusal was learned counts, from its send time,
        // even within the same second.
        crate::clock::advance(Duration::from_millis(1));
        let sent = now_ms();
        crate::clock::advance(Duration::from_secs(3));
        assert!(
            auth.record_success(id, None, &module(), sent, false, |_| {})
                .await
        );
        let g = auth.grant(id, &module()).await.unwrap();
        assert_eq!(
            g.checked_at,
            sent / 1000,
            "the grant clock starts at the send time"
        );
        // And an older yes than the one recorded does not turn the clock back.
        assert!(
            !auth
                .record_success(id, None, &module(), sent - 1000, false, |_| {})
                .await
        );
    }

    /// Issue 26, item 4: answers GitLab gives anonymous callers too leave no record on disk;
    /// one that differs from them does, and then stays on disk.
    #[tokio::test]
    async fn public_like_grants_stay_in_memory() {
        let (_dir, meta) = store();
        let auth = new_auth(&meta);
        for i in 0..20u8 {
            let id = Identity([i + 10; 16]);
            auth.record_success(id, None, &module(), now_ms(), true, |_| {})
                .await;
            let g = auth.grant(id, &module()).await.unwrap();
            assert!(g.memory_only && g.refused_at.is_none());
        }
        assert!(meta.scan::<Grant>(KIND_GRANT).unwrap().is_empty());
        let id = Identity([10; 16]);
        auth.record_success(id, None, &module(), now_ms(), false, |_| {})
            .await;
        assert_eq!(meta.scan::<Grant>(KIND_GRANT).unwrap().len(), 1);
        auth.record_success(id, None, &module(), now_ms(), true, |_| {})
            .await;
        let g = auth.grant(id, &module()).await.unwrap();
        assert!(!g.memory_only, "once on disk, a grant stays there");
        // A refusal over a memory-only grant stays in memory too.
        let junk = Identity([11; 16]);
        auth.revoke(junk, &module(), forbidden()).await;
        assert_eq!(meta.scan::<Grant>(KIND_GRANT).unwrap().len(), 1);
        assert!(auth.refusal(junk, &module()).await.is_some());
    }

    /// Issue 26, item 4: raw credentials and JWTs are bounded in bytes, not in count.
    #[test]
    fn credentials_and_jwts_are_bounded_in_bytes() {
        let (_dir, meta) = store();
        let auth = new_auth(&meta);
        let big = "x".repeat(30 * 1024);
        for i in 0..3_000u32 {
            let mut raw = [0u8; 16];
            raw[..4].copy_from_slice(&i.to_le_bytes());
            raw[15] = 1;
            let cred = HeaderValue::from_str(&format!("Negotiate {i}{big}")).unwrap();
            auth.remember_for_stale(Identity(raw), Some(&cred));
            auth.remember_gitlab_jwt(Identity(raw), "infra/vpc/aws@1.0.0", big.clone());
        }
        auth.settle();
        assert!(auth.creds.weighted_size() <= CREDENTIAL_BYTES);
        assert!(auth.jwts.weighted_size() <= JWT_BYTES);
        assert!(auth.creds.weighted_size() > CREDENTIAL_BYTES / 2);
    }

    /// Issue 26, item 12: a token minted before a refusal is refused; the check costs no
    /// lookup for modules not refused since the token was minted.
    #[tokio::test]
    async fn refused_since_sees_refusals_after_a_mint_only() {
        let (_dir, meta) = store();
        let auth = new_auth(&meta);
        let id = Identity([6; 16]);
        auth.record_success(id, None, &module(), now_ms(), false, |_| {})
            .await;
        crate::clock::advance(Duration::from_secs(5));
        let minted = unix_now();
        assert_eq!(auth.refused_since(id, &module(), minted).await, None);
        crate::clock::advance(Duration::from_secs(5));
        auth.revoke(id, &module(), forbidden()).await;
        assert_eq!(
            auth.refused_since(id, &module(), minted).await,
            Some(forbidden())
        );
        // A token minted after the refusal is not refused by this check (the policy refuses
        // to mint one anyway).
        crate::clock::advance(Duration::from_secs(5));
        assert_eq!(auth.refused_since(id, &module(), unix_now()).await, None);
        // Another identity of the same module is not refused.
        let other = Identity([7; 16]);
        assert_eq!(auth.refused_since(other, &module(), minted).await, None);
    }
}
