//! GitLab's ID-token signing keys (JWKS at `<upstream>/oauth/discovery/keys`) and the
//! verification of CI ID tokens with them: the I/O around [`crate::access::idtoken`].
//!
//! The keys are fetched at start and then every hour ([`KeepKeys`], a background service of
//! the server, whose runtime lives as long as the process), and again on an unknown `kid`, at
//! most once a minute; always through the breaker, with
//! `offline.deadline`. The last good
//! copy is kept on disk (`<cache_dir>/jwks.json`, written to a temporary file and renamed), so
//! a restart while GitLab is down verifies with it. A copy that does not parse is never used,
//! nor written.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::access::idtoken::{self, Expect, IdClaims, KeySet, Rejected};
use crate::config::Config;
use crate::upstream::gitlab::Fetcher;
use crate::upstream::health::Health;

/// GitLab's JWKS.
pub(super) const JWKS_PATH: &str = "/oauth/discovery/keys";
/// How often the keys are fetched.
pub const REFRESH_EVERY: Duration = Duration::from_secs(3600);
/// An unknown `kid` refetches the keys at most this often.
const UNKNOWN_KID_EVERY: Duration = Duration::from_secs(60);

pub struct IdKeys {
    audience: String,
    issuer: String,
    require_ref_protected: bool,
    file: PathBuf,
    keys: RwLock<Arc<KeySet>>,
    /// When an unknown `kid` last triggered a fetch.
    kid_fetch: Mutex<Option<Instant>>,
    /// When the last periodic fetch started.
    periodic: Mutex<Option<Instant>>,
    deadline: Duration,
}

impl IdKeys {
    /// `None` when `auth.id_token.audience` is unset (ID tokens are then only stripped).
    pub fn new(cfg: &Config) -> Option<IdKeys> {
        let audience = cfg.auth.id_token.audience.clone()?;
        let file = cfg.cache_dir.join("jwks.json");
        let keys = std::fs::read(&file)
            .ok()
            .and_then(|b| idtoken::parse_jwks(&b))
            .unwrap_or_default();
        Some(IdKeys {
            audience,
            issuer: cfg.auth.id_token.issuer_for(&cfg.upstream),
            require_ref_protected: cfg.auth.id_token.require_ref_protected,
            file,
            keys: RwLock::new(Arc::new(keys)),
            kid_fetch: Mutex::new(None),
            periodic: Mutex::new(None),
            deadline: cfg.offline.deadline,
        })
    }

    fn keys(&self) -> Arc<KeySet> {
        self.keys.read().expect("jwks lock").clone()
    }

    /// Fetch the keys from GitLab, unless it cannot be asked; keep them if they parse.
    pub async fn refresh(&self, upstream: &Arc<dyn Fetcher>, health: &Arc<Health>) -> bool {
        if health.is_offline_mode() || health.held() || health.unavailable() {
            return false;
        }
        let answer = tokio::time::timeout(self.deadline, upstream.registry(JWKS_PATH, None)).await;
        let small = match answer {
            Ok(Ok(small)) => small,
            Ok(Err(_)) | Err(_) => {
                tracing::warn!("could not fetch GitLab's ID token keys");
                return false;
            }
        };
        health.record_answer(small.status, &small.headers);
        let parsed = (small.status == http::StatusCode::OK)
            .then(|| idtoken::parse_jwks(&small.body))
            .flatten();
        let Some(keys) = parsed else {
            tracing::warn!(
                status = small.status.as_u16(),
                "GitLab's ID token keys did not parse; the last good copy stays"
            );
            return false;
        };
        if let Err(e) = self.save(&small.body) {
            tracing::warn!(error = %e, "could not keep GitLab's ID token keys on disk");
        }
        *self.keys.write().expect("jwks lock") = Arc::new(keys);
        true
    }

    /// Write the keys next to the cache's records, atomically (a reader finds the old copy or
    /// the new one, never half of one).
    fn save(&self, body: &[u8]) -> std::io::Result<()> {
        use std::io::Write as _;
        let tmp = self
            .file
            .with_extension(format!("json.{}.tmp", std::process::id()));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(body)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.file)
    }

    /// Verify an ID token; an unknown `kid` refetches the keys (at most once a minute).
    pub async fn verify(
        &self,
        token: &str,
        upstream: &Arc<dyn Fetcher>,
        health: &Arc<Health>,
    ) -> Result<IdClaims, Rejected> {
        let expect = Expect {
            audience: &self.audience,
            issuer: &self.issuer,
            require_ref_protected: self.require_ref_protected,
            now: crate::clock::now(),
        };
        match idtoken::verify(token, &self.keys(), &expect) {
            Err(Rejected::UnknownKid) if self.may_refetch() => {
                self.refresh(upstream, health).await;
                idtoken::verify(token, &self.keys(), &expect)
            }
            other => other,
        }
    }

    /// Fetch the keys in the background if the last periodic fetch is an hour old (or none
    /// was made since start).
    pub fn refresh_if_due(self: &Arc<Self>, upstream: &Arc<dyn Fetcher>, health: &Arc<Health>) {
        {
            let mut last = self.periodic.lock().expect("jwks periodic lock");
            let now = Instant::now();
            if last.is_some_and(|at| now.duration_since(at) < REFRESH_EVERY) {
                return;
            }
            *last = Some(now);
        }
        let (this, upstream, health) = (self.clone(), upstream.clone(), health.clone());
        tokio::spawn(async move {
            this.refresh(&upstream, &health).await;
        });
    }

    fn may_refetch(&self) -> bool {
        let mut last = self.kid_fetch.lock().expect("kid fetch lock");
        let now = Instant::now();
        if last.is_some_and(|at| now.duration_since(at) < UNKNOWN_KID_EVERY) {
            return false;
        }
        *last = Some(now);
        true
    }
}

/// The server's background service that fetches the keys at start and every
/// [`REFRESH_EVERY`] after, until shutdown: a job that starts right after a restart, or while
/// GitLab is down later, is verified against keys no older than an hour.
pub struct KeepKeys {
    pub(super) keys: Arc<IdKeys>,
    pub(super) upstream: Arc<dyn Fetcher>,
    pub(super) health: Arc<Health>,
}

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for KeepKeys {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        loop {
            // Counted as the periodic fetch, so a request does not start another one.
            *self.keys.periodic.lock().expect("jwks periodic lock") = Some(Instant::now());
            if !self.keys.refresh(&self.upstream, &self.health).await {
                tracing::info!("CI ID token keys not fetched now (GitLab cannot be asked); the kept copy is used");
            }
            tokio::select! {
                _ = tokio::time::sleep(REFRESH_EVERY) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}
