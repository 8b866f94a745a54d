//! Tarballs: token check, cached blobs verified as they stream, coalesced fills, pass-through.

use std::sync::Arc;

use futures::{FutureExt, StreamExt};
use http::StatusCode;
use pingora::{Error, ErrorType, Result};

use super::reply;
use super::{gitlab_token, source, Call, Outcome, Registry};
use crate::cache::artifact::Sink;
use crate::cache::blobs::Hash;
use crate::cache::fill::{End, FillError, Source};
use crate::cache::records::tarball_key;
use crate::cache::republish;
use crate::clock::now as unix_now;
use crate::identity::Identity;
use crate::metrics;
use crate::respond::{BodyCut, CacheStatus, Reply};
use crate::routes::{ModuleId, ModuleRoute, MODULES_V1};
use crate::token::Authority;

impl Registry {
    pub(super) async fn file(
        self: &Arc<Self>,
        call: &Call,
        route: &ModuleRoute,
        version: &str,
    ) -> Result<(Reply, Outcome)> {
        let claims = self
            .tokens
            .open(call.token.as_deref(), &route.module, version, unix_now());
        let (identity, authority) = match claims {
            Ok(c) => {
                if let Some(refused) = self
                    .refused_since_mint(c.identity, &route.module, c.expiry)
                    .await
                {
                    return Ok(refused);
                }
                (c.identity, c.authority)
            }
            Err(why) => {
                tracing::info!(reason = ?why, "download token refused");
                metrics::decision(metrics::Decision::TokenRefused);
                let reply = Reply::registry_error(StatusCode::UNAUTHORIZED, CacheStatus::Hit);
                let out = Outcome::new(Identity::ANONYMOUS, CacheStatus::Hit, None);
                return Ok((reply, out));
            }
        };
        let key = tarball_key(&route.module, version);
        let this = self.clone();
        let (module, v) = (route.module.clone(), version.to_string());
        let open = move || {
            let (this, module, v) = (this.clone(), module.clone(), v.clone());
            let authority = authority.clone();
            async move { this.open_tarball(identity, &authority, &module, &v).await }.boxed()
        };
        self.serve_tarball(call, &key, identity, open).await
    }

    /// GitLab's refusal, when GitLab refused `identity` for `module` after the token expiring
    /// at `expiry` was minted: the token dies with the access it stood for, instead of
    /// living out its `auth.token_ttl`.
    pub(super) async fn refused_since_mint(
        &self,
        identity: Identity,
        module: &ModuleId,
        expiry: u64,
    ) -> Option<(Reply, Outcome)> {
        let minted = self.tokens.minted_at(expiry);
        let refusal = self.auth.refused_since(identity, module, minted).await?;
        tracing::info!(identity = %identity.short(), module = %module, "download token of an identity GitLab refused since: refused");
        metrics::decision(metrics::Decision::TokenRefused);
        let out = Outcome::new(identity, CacheStatus::Hit, None);
        Some((reply::refused(&refusal), out))
    }

    /// Serve a tarball from the cache, or fill it with `open` (one fill per key). HEAD never
    /// starts a fill: Terraform sends HEAD before GET, and the GET does the work.
    pub(super) async fn serve_tarball(
        &self,
        call: &Call,
        key: &str,
        identity: Identity,
        open: impl Fn() -> crate::cache::fill::Opener,
    ) -> Result<(Reply, Outcome)> {
        let outcome = |cache, upstream_status| Outcome::new(identity, cache, upstream_status);
        let earlier = match self.cached_tarball(key, call.sink).await? {
            Cached::Reply(reply) => return Ok((reply, outcome(CacheStatus::Hit, None))),
            Cached::Refill(earlier) => earlier,
            Cached::Nothing => None,
        };
        if call.head {
            // The length is unknown until a GET fills it: say nothing rather than 0.
            let reply = reply::tarball(CacheStatus::Miss, None, futures::stream::empty().boxed());
            return Ok((reply, outcome(CacheStatus::Miss, None)));
        }
        let (fill, leader) = match self.start_fill(key, &open) {
            Ok(f) => f,
            Err(e) => {
                // No temp file (disk full, read-only): serve without caching.
                metrics::CACHE_WRITE_ERRORS.inc();
                tracing::error!(error = %e, "cannot write to the cache; serving without caching");
                return Ok(self.pass_through(identity, open()).await);
            }
        };
        if !leader {
            metrics::COALESCED_WAITS.inc();
        }
        match fill.started().await {
            Ok(len) => {
                let chunks = fill.body().map(|c| c.map_err(Into::into)).boxed();
                let reply = reply::tarball(CacheStatus::Miss, len, chunks);
                Ok((reply, outcome(CacheStatus::Miss, Some(200))))
            }
            Err(FillError::NoRoom) => {
                metrics::CACHE_WRITE_ERRORS.inc();
                tracing::error!(
                    "the cache disk has no room for this tarball; serving it without caching"
                );
                Ok(self.pass_through(identity, open()).await)
            }
            Err(e) => {
                let (reply, cache, status) = self.fill_failed(key, e, earlier, call.sink).await?;
                Ok((reply, outcome(cache, Some(status.as_u16()))))
            }
        }
    }

    /// What the cache holds for `key`: an answer, bytes to check against a refill (a version
    /// seen coming back in a listing since they were fetched may have been re-published),
    /// or nothing usable (an evicted or corrupt blob's entry is forgotten).
    async fn cached_tarball(&self, key: &str, sink: Sink) -> Result<Cached> {
        let Some(entry) = self.cache.tarball(key).await else {
            return Ok(Cached::Nothing);
        };
        if republish::needs_refill(&entry, self.cache.reappeared_since(key)) {
            // The entry stays, for the fill to compare.
            return Ok(Cached::Refill(entry.hash().map(|h| (h, entry.size))));
        }
        if let Some(hash) = entry.hash() {
            if let Some(reply) = self
                .blob_reply(key, hash, entry.size, CacheStatus::Hit, sink)
                .await?
            {
                return Ok(Cached::Reply(reply));
            }
        }
        // Gone or damaged (`Cache::artifact` dropped its record): fill again, now.
        Ok(Cached::Nothing)
    }

    /// A fill that could not start. GitLab unreachable or failing while a reappeared version
    /// is checked: the bytes it had are served as stale, as listings are. A refusal (gone,
    /// denied) is relayed.
    async fn fill_failed(
        &self,
        key: &str,
        e: FillError,
        earlier: Option<(Hash, u64)>,
        sink: Sink,
    ) -> Result<(Reply, CacheStatus, StatusCode)> {
        let status = match e {
            FillError::Refused(s) => s,
            _ => StatusCode::BAD_GATEWAY,
        };
        let unreachable = matches!(e, FillError::Upstream(_))
            || status.is_server_error()
            || status == StatusCode::TOO_MANY_REQUESTS;
        if let (true, Some((hash, size))) = (unreachable, earlier) {
            if let Some(reply) = self
                .blob_reply(key, hash, size, CacheStatus::Stale, sink)
                .await?
            {
                metrics::STALE_SERVED.inc();
                return Ok((reply, CacheStatus::Stale, status));
            }
        }
        let reply = Reply::registry_error(status, CacheStatus::Miss);
        Ok((reply, CacheStatus::Miss, status))
    }

    /// Stream a tarball straight from the upstream, uncached (the cache cannot take it).
    pub(super) async fn pass_through(
        &self,
        identity: Identity,
        opened: crate::cache::fill::Opener,
    ) -> (Reply, Outcome) {
        let outcome =
            |upstream_status| Outcome::new(identity, CacheStatus::Bypass, upstream_status);
        let source = match opened.await {
            Ok(s) => s,
            Err(e) => {
                let status = match e {
                    FillError::Refused(s) => s,
                    _ => StatusCode::BAD_GATEWAY,
                };
                let reply = Reply::registry_error(status, CacheStatus::Bypass);
                return (reply, outcome(Some(status.as_u16())));
            }
        };
        if source.end == End::Close {
            crate::metrics::FILLS_NOT_KEPT
                .with_label_values(&["unframed"])
                .inc();
        }
        let len = source.declared_len();
        let chunks = source
            .body
            .map(|c| c.map_err(|why| BodyCut::from(format!("upstream body failed: {why}"))))
            .boxed();
        (
            reply::tarball(CacheStatus::Bypass, len, chunks),
            outcome(Some(200)),
        )
    }

    /// Join or start the fill of a tarball; its commit indexes it under `key`.
    pub(super) fn start_fill(
        &self,
        key: &str,
        open: impl FnOnce() -> crate::cache::fill::Opener,
    ) -> std::io::Result<(Arc<crate::cache::fill::Fill>, bool)> {
        let index_key = key.to_string();
        self.cache
            .fill_tarball(key, open, move |previous, hash, size| {
                let (entry, change) = republish::after_fill(
                    previous.as_ref(),
                    hash.to_hex().to_string(),
                    size,
                    crate::clock::now_ms(),
                );
                if let Some(old) = change {
                    metrics::REPUBLISHED.inc();
                    tracing::warn!(
                        tarball = %index_key,
                        old_blake3 = %old.hash,
                        new_blake3 = %entry.hash,
                        "re-published: GitLab now serves other bytes for this version"
                    );
                }
                entry
            })
    }

    /// Open the upstream tarball on behalf of `identity`: GitLab's JWT (sealed in the token,
    /// or remembered from a download answer), else one asked for with the caller's
    /// credential (sealed in the token, or remembered), then `/file`. What the token carries
    /// comes first, so a replica that never saw this caller fills as well as the one that did.
    pub(super) async fn open_tarball(
        &self,
        identity: Identity,
        authority: &Authority,
        module: &ModuleId,
        version: &str,
    ) -> std::result::Result<Source, FillError> {
        let tarball = format!("{module}@{version}");
        let base = format!(
            "{MODULES_V1}{}/{}/{}/{version}",
            module.namespace(),
            module.name(),
            module.system()
        );
        // The caller's credential: what the token carries first, else what is remembered.
        let cred = match authority {
            Authority::Credential(c) => Some(c.clone()),
            _ => None,
        }
        .or_else(|| self.auth.credential(identity, crate::clock::instant()))
        .filter(|_| !identity.is_anonymous());
        let sealed_jwt = match authority {
            Authority::GitLabJwt(j) => Some(j.clone()),
            _ => None,
        };
        let jwt = match sealed_jwt.or_else(|| self.auth.gitlab_jwt(identity, &tarball)) {
            Some(j) => j,
            None => {
                if cred.is_none() && !identity.is_anonymous() {
                    // The credential is no longer in memory (restart, or grant lifetime over).
                    return Err(FillError::Refused(StatusCode::UNAUTHORIZED));
                }
                let small = self
                    .upstream
                    .registry(&format!("{base}/download"), cred.as_ref())
                    .await
                    .map_err(|_| FillError::Upstream("download URL request failed"))?;
                if !small.status.is_success() {
                    return Err(FillError::Refused(small.status));
                }
                small
                    .headers
                    .get(crate::respond::TERRAFORM_GET)
                    .and_then(|v| v.to_str().ok())
                    .and_then(gitlab_token)
                    .ok_or(FillError::Upstream("no download URL"))?
            }
        };
        let path = format!("{base}/file?token={jwt}");
        let counted_as = cred.filter(counts_against_its_owner);
        source(self.upstream.open(&path, counted_as.as_ref()).await)
    }

    /// A cached blob as an answer, verified; `None` when it is gone or damaged (its length
    /// is wrong). Small blobs come from the memory tier, verified whole; large ones stream
    /// with the last chunk held back until the hash checks out, so a corrupt blob never
    /// reaches a client complete (the stream fails, the writer cuts).
    pub(super) async fn blob_reply(
        &self,
        key: &str,
        hash: Hash,
        size: u64,
        status: CacheStatus,
        sink: Sink,
    ) -> Result<Option<Reply>> {
        let found = self
            .cache
            .artifact(key, hash, size, "tarball", sink)
            .await
            .map_err(|e| Error::because(ErrorType::InternalError, "blob open", e))?;
        Ok(found.map(|artifact| reply::tarball_cached(status, artifact)))
    }
}

/// What [`Registry::cached_tarball`] found.
enum Cached {
    Reply(Reply),
    Refill(Option<(Hash, u64)>),
    Nothing,
}

/// Whether the caller's credential, sent beside GitLab's JWT on a `/file` fill, makes GitLab
/// count the fill against the caller instead of tfmirror's address. GitLab authorizes
/// `/file` by the JWT alone (the `token` parameter; headers are not read for access), but
/// its rate limiter (Rack::Attack, through `Gitlab::Auth::RequestAuthenticator`) names the
/// requester from the headers first: a personal or OAuth token with `api` or `read_api`
/// scope, or a deploy token, is that user; without one, the fill is unauthenticated and
/// counted per IP, where every fill of every caller shares tfmirror's one budget. A job
/// token gains nothing there (the limiter reads the `token` parameter as a job token before
/// the header, and fails), so it is not sent a second time. The header goes to GitLab's
/// origin only: `upstream::gitlab::open` never sends it across a redirect.
fn counts_against_its_owner(cred: &http::HeaderValue) -> bool {
    crate::access::principal::job_token(cred).is_none()
        && !crate::access::principal::is_basic_job_user(cred)
}
