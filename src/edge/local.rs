//! What tfmirror answers itself, without the registry: readiness, the internal endpoints
//! (`/-/health`, `/-/readiness`, `/-/metrics` on the main listener), the admin purge, and
//! offline mode's refusal of what nothing cached can answer. Part of [`Proxy`]'s `impl`,
//! split off by concern as pingora splits its own.

use http::{header, Method, StatusCode};
use pingora::proxy::Session;
use pingora::{ErrorType, Result};

use super::proxy::Proxy;
use super::write;
use crate::cache::Writable;
use crate::metrics;
use crate::respond;
use crate::routes::Internal;

impl Proxy {
    /// Ready while tfmirror can serve: also while GitLab is down (`upstream_up`) and on a full
    /// cache disk (`cache_writable: false`: hits are served, the rest passed through), which
    /// taking the instance out of its balancer would only move onto GitLab. A cache directory
    /// that fails otherwise (permissions, read-only, gone) is not ready.
    pub(super) async fn readiness(&self) -> (StatusCode, serde_json::Value) {
        let up = self.health.is_up();
        match self.cache.check_writable().await {
            Writable::Yes => {
                metrics::CACHE_WRITABLE.set(1);
                let body = serde_json::json!({ "status": "ready", "upstream_up": up, "cache_writable": true });
                (StatusCode::OK, body)
            }
            Writable::Full => {
                metrics::CACHE_WRITABLE.set(0);
                tracing::warn!(
                    "cache directory is full: serving hits and passing the rest through, keeping nothing new"
                );
                let body = serde_json::json!({
                    "status": "ready", "upstream_up": up, "cache_writable": false,
                    "reason": "cache directory full"
                });
                (StatusCode::OK, body)
            }
            Writable::Broken(e) => {
                metrics::CACHE_WRITABLE.set(0);
                tracing::error!(error = %e, "cache directory is not writable");
                let body = serde_json::json!({ "status": "cache directory not writable", "cache_writable": false });
                (StatusCode::SERVICE_UNAVAILABLE, body)
            }
        }
    }

    /// tfmirror's own endpoints under `/-/`.
    pub(super) async fn serve_internal(
        &self,
        session: &mut Session,
        which: Internal,
    ) -> Result<()> {
        match which {
            Internal::Health => {
                write::json(session, StatusCode::OK, r#"{"status":"ok"}"#.into()).await
            }
            Internal::Readiness => {
                let (status, body) = self.readiness().await;
                write::json(session, status, body.to_string()).await
            }
            Internal::Metrics => {
                crate::edge::gauges::update(&self.cache, &self.health);
                let body = metrics::render();
                let reply = respond::Reply::full(StatusCode::OK, body)
                    .with(header::CONTENT_TYPE, "text/plain; version=0.0.4");
                write::reply(session, reply).await
            }
            Internal::AdminPurge => self.admin_purge(session).await,
            #[cfg(feature = "test-clock")]
            Internal::TestClock => test_clock(session).await,
        }
    }

    /// `POST /-/admin/purge?module=...`: the same purge as `tfmirror cache purge`, plus the
    /// in-memory grants of this process.
    pub(super) async fn admin_purge(&self, session: &mut Session) -> Result<()> {
        let Some(expected) = self.admin_token else {
            return write::error(session, StatusCode::NOT_FOUND).await;
        };
        let req = session.req_header();
        // Compare hashes: blake3::Hash equality is constant-time.
        let presented = req
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|t| blake3::hash(t.as_bytes()));
        if presented != Some(expected) {
            return write::error(session, StatusCode::UNAUTHORIZED).await;
        }
        if req.method != Method::POST {
            return write::error(session, StatusCode::METHOD_NOT_ALLOWED).await;
        }
        let spec = req.uri.query().and_then(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == "module")
                .map(|(_, v)| v.into_owned())
        });
        let Some(spec) = spec else {
            let body = serde_json::json!({ "error": "module is missing" }).to_string();
            return write::json(session, StatusCode::BAD_REQUEST, body).await;
        };
        // Through this server's own stores, so its byte accounting follows the removal.
        let admin = self.cache.admin(&self.cache_dir);
        let s = spec.clone();
        let purged = tokio::task::spawn_blocking(move || admin.purge(&s))
            .await
            .map_err(|e| pingora::Error::because(ErrorType::InternalError, "purge", e))?;
        match purged {
            Ok(n) => {
                let module = spec.split('@').next().unwrap_or_default();
                self.registry.forget_module(module);
                self.cache.forget_index();
                tracing::info!(records = n, "purged through the admin endpoint");
                let body = serde_json::json!({ "purged": n }).to_string();
                write::json(session, StatusCode::OK, body).await
            }
            Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {
                let body = serde_json::json!({ "error": "module is invalid" }).to_string();
                write::json(session, StatusCode::BAD_REQUEST, body).await
            }
            Err(e) => {
                tracing::error!(error = %e, "purge failed");
                write::error(session, StatusCode::INTERNAL_SERVER_ERROR).await
            }
        }
    }

    /// In offline mode nothing is proxied: what the cache cannot answer is unavailable.
    pub(super) async fn offline_refusal(&self, session: &mut Session) -> Result<bool> {
        if !self.health.is_offline_mode() {
            return Ok(false);
        }
        write::error(session, StatusCode::SERVICE_UNAVAILABLE).await?;
        Ok(true)
    }
}

/// `POST /-/test/clock?advance_ms=N` (test builds only): move this process's clock forward by
/// N milliseconds, for an integration test that would otherwise sleep out a TTL; answers the
/// shift now in force, `{"shift_ms":...}`.
#[cfg(feature = "test-clock")]
async fn test_clock(session: &mut Session) -> Result<()> {
    let req = session.req_header();
    if req.method != Method::POST {
        return write::error(session, StatusCode::METHOD_NOT_ALLOWED).await;
    }
    let ms = req.uri.query().and_then(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "advance_ms")
            .and_then(|(_, v)| v.parse::<u64>().ok())
    });
    let Some(ms) = ms else {
        let body = serde_json::json!({ "error": "advance_ms is missing" }).to_string();
        return write::json(session, StatusCode::BAD_REQUEST, body).await;
    };
    let shift = crate::clock::advance_process(ms);
    tracing::info!(
        advance_ms = ms,
        shift_ms = shift,
        "test clock moved forward"
    );
    let body = serde_json::json!({ "shift_ms": shift }).to_string();
    write::json(session, StatusCode::OK, body).await
}
