//! Tarballs: token check, cached blobs verified as they stream, coalesced fills, pass-through.

use std::sync::Arc;

use futures::FutureExt;
use http::{header, Method, StatusCode};
use pingora::proxy::Session;
use pingora::{Error, ErrorType, Result};

use super::reply::write_tarball_head;
use super::{gitlab_token, source, Outcome, Registry, OCTETS};
use crate::cache::blobs::Hash;
use crate::cache::body::BodyError;
use crate::cache::fill::{End, FillError, Source};
use crate::cache::records::{tarball_key, TarballEntry, KIND_TARBALL};
use crate::cache::verified::VerifiedBlob;
use crate::cache::{republish, Cache};
use crate::clock::now as unix_now;
use crate::fetch;
use crate::identity::Identity;
use crate::metrics;
use crate::respond::{self, CacheStatus, HeaderValueLike as V};
use crate::routes::{ModuleId, ModuleRoute, MODULES_V1};
use crate::token::Authority;

impl Registry {
    pub(super) async fn file(
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
        let claims = self
            .tokens
            .open(token.as_deref(), &route.module, version, unix_now());
        let (identity, authority) = match claims {
            Ok(c) => (c.identity, c.authority),
            Err(why) => {
                tracing::info!(reason = ?why, "download token refused");
                metrics::decision(metrics::Decision::TokenRefused);
                respond::registry_error(session, StatusCode::UNAUTHORIZED, CacheStatus::Hit)
                    .await?;
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
            let authority = authority.clone();
            async move { this.open_tarball(identity, &authority, &module, &v).await }.boxed()
        };
        self.serve_tarball(session, &key, identity, open).await
    }

    /// Serve a tarball from the cache, or fill it with `open` (one fill per key). HEAD never
    /// starts a fill: Terraform sends HEAD before GET, and the GET does the work.
    pub(super) async fn serve_tarball(
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
        let earlier = match self.serve_cached(session, key, head).await? {
            Cached::Served => return Ok(outcome(CacheStatus::Hit, None)),
            Cached::Missed { earlier } => earlier,
        };
        if head {
            // The length is unknown until a GET fills it: say nothing rather than 0.
            write_tarball_head(session, CacheStatus::Miss, None, true).await?;
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
                let (cache, status) = self.fill_failed(session, key, &e, earlier).await?;
                return Ok(outcome(cache, Some(status.as_u16())));
            }
        };
        write_tarball_head(session, CacheStatus::Miss, len, false).await?;
        // An error cuts the connection: the client must not take a partial body for a whole.
        respond::stream_body(session, fill.body(), cut).await?;
        Ok(outcome(CacheStatus::Miss, Some(200)))
    }

    /// Serve `key` from the cache when its bytes are there and still current. A blob that
    /// was evicted or corrupt is forgotten, to be filled again.
    async fn serve_cached(&self, session: &mut Session, key: &str, head: bool) -> Result<Cached> {
        let Some(entry) = self.cache.tarball(key).await else {
            return Ok(Cached::Missed { earlier: None });
        };
        // A version seen coming back in a listing since these bytes were fetched may have
        // been re-published: refill (the entry stays, for the fill to compare).
        if republish::needs_refill(&entry, self.cache.reappeared.since(key)) {
            let earlier = entry.hash().map(|h| (h, entry.size));
            return Ok(Cached::Missed { earlier });
        }
        if let Some(hash) = entry.hash() {
            if self
                .serve_blob(session, key, hash, entry.size, head, CacheStatus::Hit)
                .await?
            {
                return Ok(Cached::Served);
            }
        }
        // The blob was evicted or corrupt: forget the entry and fill again.
        self.cache.drop_tarball(key).await;
        Ok(Cached::Missed { earlier: None })
    }

    /// Answer a fill that failed before its body: GitLab unreachable or failing while a
    /// reappeared version is checked serves the `earlier` bytes as stale, as listings are;
    /// a refusal (gone, denied) is relayed. Returns what the cache did and GitLab's status.
    async fn fill_failed(
        &self,
        session: &mut Session,
        key: &str,
        e: &FillError,
        earlier: Option<(Hash, u64)>,
    ) -> Result<(CacheStatus, StatusCode)> {
        let status = e.status();
        let unreachable = matches!(e, FillError::Upstream(_))
            || status.is_server_error()
            || status == StatusCode::TOO_MANY_REQUESTS;
        if let (true, Some((hash, size))) = (unreachable, earlier) {
            if self
                .serve_blob(session, key, hash, size, false, CacheStatus::Stale)
                .await?
            {
                metrics::STALE_SERVED.inc();
                return Ok((CacheStatus::Stale, status));
            }
        }
        respond::registry_error(session, status, CacheStatus::Miss).await?;
        Ok((CacheStatus::Miss, status))
    }

    /// Stream a tarball straight from the upstream, uncached (the cache cannot take it).
    pub(super) async fn pass_through(
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
        let source = match opened.await {
            Ok(s) => s,
            Err(e) => {
                let status = match e {
                    FillError::Refused(s) => s,
                    _ => StatusCode::BAD_GATEWAY,
                };
                respond::registry_error(session, status, CacheStatus::Bypass).await?;
                return Ok(outcome(Some(status.as_u16())));
            }
        };
        if source.end == End::Close {
            crate::metrics::FILLS_NOT_KEPT
                .with_label_values(&["unframed"])
                .inc();
        }
        write_tarball_head(session, CacheStatus::Bypass, source.declared_len(), false).await?;
        respond::stream_body(session, source.body, |_| {
            Error::explain(ErrorType::ReadError, "upstream body failed").into_up()
        })
        .await?;
        Ok(outcome(Some(200)))
    }

    /// Join or start the fill of a tarball; its commit indexes it under `key`.
    pub(super) fn start_fill(
        &self,
        key: &str,
        open: impl FnOnce() -> crate::cache::fill::Opener,
    ) -> std::io::Result<(Arc<crate::cache::fill::Fill>, bool)> {
        let meta = self.cache.meta.clone();
        let front = self.cache.index_front();
        let index_key = key.to_string();
        self.cache
            .fills
            .join_or_start(key, self.cache.blobs.clone(), open, move |hash, size| {
                let previous: Option<TarballEntry> = meta.get(KIND_TARBALL, &index_key);
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
                if let Err(e) = Cache::index_tarball_blocking(&meta, &index_key, &entry) {
                    tracing::error!(error = %e, "could not index a tarball");
                }
                front.insert(index_key.clone(), entry);
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
            module.namespace, module.name, module.system
        );
        let sealed_jwt = match authority {
            Authority::GitLabJwt(j) => Some(j.clone()),
            _ => None,
        };
        let jwt = match sealed_jwt.or_else(|| self.auth.gitlab_jwt(identity, &tarball)) {
            Some(j) => j,
            None => {
                let sealed_cred = match authority {
                    Authority::Credential(c) => Some(c.clone()),
                    _ => None,
                };
                let cred = match (
                    identity.is_anonymous(),
                    sealed_cred.or_else(|| self.auth.credential(identity)),
                ) {
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

    /// Serve a cached blob, verified. False when it is gone or corrupt (nothing was written).
    /// Small blobs are verified whole before the first byte; large ones are streamed with the
    /// last chunk held back until the hash checks out, so a corrupt blob never reaches a
    /// client complete (the connection is cut instead).
    pub(super) async fn serve_blob(
        &self,
        session: &mut Session,
        key: &str,
        hash: Hash,
        size: u64,
        head: bool,
        status: CacheStatus,
    ) -> Result<bool> {
        if size <= self.cache.memory_max_object() {
            let Some(bytes) = self.cache.get_small(hash).await.ok().flatten() else {
                return Ok(false);
            };
            let headers = [
                (header::CONTENT_TYPE, V::Static(OCTETS)),
                (respond::CACHE_STATUS, V::Static(status.as_str())),
            ];
            respond::full(session, StatusCode::OK, &headers, bytes).await?;
            return Ok(true);
        }
        let opened = VerifiedBlob::open(&self.cache, key, hash, "tarball")
            .await
            .map_err(|e| Error::because(ErrorType::InternalError, "blob open", e))?;
        // The index says how long the blob is: a file of another length is found out (and
        // deleted) before a head that would announce its wrong length goes out.
        let Some(blob) = opened.and_then(|b| b.with_len(size)) else {
            return Ok(false);
        };
        write_tarball_head(session, status, Some(size), head).await?;
        if head {
            return Ok(true);
        }
        respond::stream_body(session, blob.into_body(), cut).await?;
        Ok(true)
    }
}

/// Where a tarball request stands after the cache was looked at.
enum Cached {
    /// Answered from the cache.
    Served,
    /// To be filled; `earlier` are bytes to fall back on when a refill of a reappeared
    /// version cannot reach GitLab.
    Missed { earlier: Option<(Hash, u64)> },
}

/// The request's error when a tarball body stops short; pingora then cuts the response.
fn cut(e: BodyError) -> Box<Error> {
    match e {
        BodyError::Corrupt => Error::explain(
            ErrorType::InternalError,
            "cached tarball failed verification",
        ),
        BodyError::Read(e) => Error::because(ErrorType::InternalError, "blob read", e),
        BodyError::Fill(_) => Error::explain(ErrorType::ReadError, "tarball fill failed").into_up(),
    }
}
