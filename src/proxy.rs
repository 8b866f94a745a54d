//! The pingora [`ProxyHttp`] implementation: one request flows from parsing
//! ([`routes::parse`]), through a decision (answer locally, fetch a download, or proxy), to a
//! response.
//!
//! Hooks used, in the order pingora runs them:
//! 1. `request_filter`: parse the route once, refuse bad input, and answer everything
//!    tfmirror answers itself: discovery, `/-/...`, and the registry routes through
//!    [`crate::registry`]. Returning `Ok(true)` ends the request there.
//! 2. `upstream_peer`: a pre-resolved peer with SNI and the route's timeout profile.
//! 3. `upstream_request_filter`: path under the upstream's URL root, `Host`,
//!    `X-Forwarded-*`, no hop-by-hop headers.
//! 4. `upstream_response_filter`: rewrite `X-Terraform-Get` and `Location` so clients come
//!    back through tfmirror; an upload's 201 invalidates that module's cached listings.
//! 5. `fail_to_proxy`: GitLab-shaped 502/504 instead of pingora's plain error page.
//! 6. `logging`: the access log line and request metrics.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use http::{header, HeaderName, Method, StatusCode};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{Error, ErrorType, Result};

use crate::cache::{Cache, Writable};
use crate::health::Health;
use crate::identity::Identity;
use crate::metrics;
use crate::registry::{Outcome, Registry};
use crate::respond::{self, CacheStatus};
use crate::rewrite::{PublicBase, Rewriter};
use crate::routes::{self, Internal, ProjectOp, Route, MODULES_V1};
use crate::upstream::{Profile, Upstream};

/// Headers that describe one connection, not the request: never forwarded (RFC 9110 §7.6.1).
/// `Upgrade` is left to pingora, which handles protocol upgrades itself.
const HOP_BY_HOP: [&str; 5] = [
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "te",
    "trailer",
];

/// Total request header bytes accepted. Pingora reads up to ~1 MiB of headers; registry
/// requests need a few hundred bytes, and nginx's default large-header buffers hold 32 KiB.
const MAX_HEADER_BYTES: usize = 32 * 1024;

const TERRAFORM_GET: HeaderName = HeaderName::from_static("x-terraform-get");

pub struct Proxy {
    upstream: Arc<Upstream>,
    cache: Arc<Cache>,
    registry: Arc<Registry>,
    health: Arc<Health>,
    rewriter: Rewriter,
    /// Configured public URL; when unset, each request's own `Host` is used.
    public_url: Option<PublicBase>,
    /// The scheme clients use to reach this listener.
    scheme: &'static str,
    /// blake3 of the admin token; admin endpoints are off without one.
    admin_token: Option<blake3::Hash>,
    cache_dir: std::path::PathBuf,
    /// `listen`, for requests without a `Host`.
    listen: String,
    /// `timeouts.client_stall`.
    client_stall: std::time::Duration,
    /// The provider mirror (`/providers/`); absent, those routes are 404.
    providers: Option<Arc<crate::providers::Providers>>,
}

/// Per-request state, filled in as the request moves through the hooks.
pub struct RequestCtx {
    started: Instant,
    route: Option<Route>,
    public: Option<PublicBase>,
    upstream_status: Option<u16>,
    cache: Option<CacheStatus>,
    identity: Option<Identity>,
}

impl RequestCtx {
    /// What a registry decision did, for the access log and metrics.
    fn record(&mut self, out: Outcome) {
        self.cache = Some(out.cache);
        self.upstream_status = out.upstream_status;
        self.identity = Some(out.identity);
    }
}

impl Proxy {
    pub fn new(
        upstream: Arc<Upstream>,
        cache: Arc<Cache>,
        registry: Arc<Registry>,
        health: Arc<Health>,
        config: &crate::config::Config,
    ) -> Self {
        let public_url = config.public_url.as_ref();
        Proxy {
            rewriter: Rewriter::new(upstream.base_url()),
            upstream,
            cache,
            registry,
            health,
            public_url: public_url.map(PublicBase::from_url),
            scheme: if config.tls_cert.is_some() {
                "https"
            } else {
                "http"
            },
            admin_token: config
                .admin_token
                .as_ref()
                .map(|t| blake3::hash(t.as_bytes())),
            cache_dir: config.cache_dir.clone(),
            listen: config.listen.to_string(),
            client_stall: config.timeouts.client_stall,
            providers: None,
        }
    }

    pub fn with_providers(mut self, providers: Arc<crate::providers::Providers>) -> Self {
        self.providers = Some(providers);
        self
    }

    /// Where this client reaches tfmirror. `None` when the request's `Host` is unusable.
    fn public_base(&self, req: &RequestHeader) -> Option<PublicBase> {
        if let Some(p) = &self.public_url {
            return Some(p.clone());
        }
        let host = match req.headers.get(header::HOST) {
            Some(h) => h.to_str().ok()?,
            // HTTP/1.0 clients may send no Host: the listener's own address then.
            None => req
                .uri
                .authority()
                .map_or(self.listen.as_str(), |a| a.as_str()),
        };
        // Only a plain authority may end up inside a URL handed back to the client.
        let authority: http::uri::Authority = host.parse().ok()?;
        if authority.as_str().contains('@') {
            return None;
        }
        Some(PublicBase::from_request(self.scheme, authority))
    }

    /// The decision for a parsed route. `Ok(true)`: the response is written.
    async fn serve_locally(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        route: &Route,
        public: &PublicBase,
    ) -> Result<bool> {
        match route {
            Route::Discovery => {
                let body =
                    serde_json::json!({ "modules.v1": format!("{}{MODULES_V1}", public.prefix()) });
                respond::json(session, StatusCode::OK, body.to_string()).await?;
                Ok(true)
            }
            Route::Internal(which) => {
                self.serve_internal(session, *which).await?;
                Ok(true)
            }
            Route::Module(m) => match self.registry.handle(session, m, public).await? {
                Some(out) => {
                    ctx.record(out);
                    Ok(true)
                }
                None => self.offline_refusal(session).await,
            },
            Route::Provider(p) => {
                let Some(providers) = &self.providers else {
                    respond::error(session, StatusCode::NOT_FOUND).await?;
                    return Ok(true);
                };
                ctx.cache = Some(providers.handle(session, p, public).await?);
                Ok(true)
            }
            Route::Project(p) if matches!(p.op, ProjectOp::Download { .. }) => {
                let out = self.registry.handle_project(session, p, public).await?;
                ctx.record(out);
                Ok(true)
            }
            _ => self.offline_refusal(session).await,
        }
    }

    /// Ready while tfmirror can serve: also while GitLab is down (`upstream_up`) and on a full
    /// cache disk (`cache_writable: false`: hits are served, the rest passed through), which
    /// taking the instance out of its balancer would only move onto GitLab. A cache directory
    /// that fails otherwise (permissions, read-only, gone) is not ready.
    async fn readiness(&self) -> (StatusCode, serde_json::Value) {
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
    async fn serve_internal(&self, session: &mut Session, which: Internal) -> Result<()> {
        match which {
            Internal::Health => {
                respond::json(session, StatusCode::OK, r#"{"status":"ok"}"#.into()).await
            }
            Internal::Readiness => {
                let (status, body) = self.readiness().await;
                respond::json(session, status, body.to_string()).await
            }
            Internal::Metrics => {
                crate::edge::gauges::update(&self.cache, &self.health);
                let body = metrics::render();
                let reply = respond::Reply::full(StatusCode::OK, body)
                    .with(header::CONTENT_TYPE, "text/plain; version=0.0.4");
                respond::write(session, reply).await
            }
            Internal::AdminPurge => self.admin_purge(session).await,
        }
    }

    /// `POST /-/admin/purge?module=...`: the same purge as `tfmirror cache purge`, plus the
    /// in-memory grants of this process.
    async fn admin_purge(&self, session: &mut Session) -> Result<()> {
        let Some(expected) = self.admin_token else {
            return respond::error(session, StatusCode::NOT_FOUND).await;
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
            return respond::error(session, StatusCode::UNAUTHORIZED).await;
        }
        if req.method != Method::POST {
            return respond::error(session, StatusCode::METHOD_NOT_ALLOWED).await;
        }
        let spec = req.uri.query().and_then(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == "module")
                .map(|(_, v)| v.into_owned())
        });
        let Some(spec) = spec else {
            let body = serde_json::json!({ "error": "module is missing" }).to_string();
            return respond::json(session, StatusCode::BAD_REQUEST, body).await;
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
                self.registry.auth.forget_module(module);
                self.cache.forget_index();
                tracing::info!(records = n, "purged through the admin endpoint");
                let body = serde_json::json!({ "purged": n }).to_string();
                respond::json(session, StatusCode::OK, body).await
            }
            Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {
                let body = serde_json::json!({ "error": "module is invalid" }).to_string();
                respond::json(session, StatusCode::BAD_REQUEST, body).await
            }
            Err(e) => {
                tracing::error!(error = %e, "purge failed");
                respond::error(session, StatusCode::INTERNAL_SERVER_ERROR).await
            }
        }
    }

    /// In offline mode nothing is proxied: what the cache cannot answer is unavailable.
    async fn offline_refusal(&self, session: &mut Session) -> Result<bool> {
        if !self.health.is_offline_mode() {
            return Ok(false);
        }
        respond::error(session, StatusCode::SERVICE_UNAVAILABLE).await?;
        Ok(true)
    }
}

fn path_and_query(req: &RequestHeader) -> String {
    req.uri
        .path_and_query()
        .map_or_else(|| req.uri.path().to_string(), |pq| pq.as_str().to_string())
}

fn with_query(path: &str, req: &RequestHeader) -> String {
    match req.uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    }
}

#[async_trait]
impl ProxyHttp for Proxy {
    type CTX = RequestCtx;

    /// Called once, when the service is built. No downstream modules: pingora's default adds
    /// a response-compression module that is disabled (level 0) yet built for every request
    /// and run on every response head and body chunk. tfmirror relays bodies as they are
    /// (tarballs are gzip already; GitLab's own `Content-Encoding` passes through).
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            started: Instant::now(),
            route: None,
            public: None,
            upstream_status: None,
            cache: None,
            identity: None,
        }
    }

    /// Runs first, as soon as a request head is parsed. Lifts the head deadline, bounds body
    /// reads and writes by `timeouts.client_stall`, and lets HTTP/1.1 clients pipeline: they
    /// get their answers in order (pingora otherwise closes the connection and drops the
    /// pipelined requests).
    async fn early_request_filter(
        &self,
        session: &mut Session,
        _ctx: &mut RequestCtx,
    ) -> Result<()> {
        // The head is in: lift its deadline (see `downstream`), and from here on bound
        // each body read and write instead, so a stalled client is dropped.
        crate::downstream::head_received();
        let downstream = session.as_downstream_mut();
        downstream.set_pipelining_enabled(true);
        downstream.set_read_timeout(Some(self.client_stall));
        downstream.set_write_timeout(Some(self.client_stall));
        Ok(())
    }

    /// Runs first for every request: parse, validate, and answer locally where possible.
    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let req = session.req_header();
        let header_bytes: usize = req
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum();
        if header_bytes > MAX_HEADER_BYTES {
            session.set_keepalive(None);
            let body = serde_json::json!({ "error": "request headers are too large" }).to_string();
            respond::json(session, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, body).await?;
            return Ok(true);
        }
        let route = match routes::parse(&req.method, req.uri.path()) {
            Ok(r) => r,
            Err(reject) => {
                respond::json(session, reject.status, reject.body()).await?;
                return Ok(true);
            }
        };
        let Some(public) = self.public_base(req) else {
            let body = serde_json::json!({ "error": "Host header is invalid" }).to_string();
            respond::json(session, StatusCode::BAD_REQUEST, body).await?;
            return Ok(true);
        };
        // Into the context only afterwards: lent meanwhile, not cloned (a route owns its
        // module's strings). Whatever the outcome, the later hooks and the log find them.
        let served = self.serve_locally(session, ctx, &route, &public).await;
        ctx.route = Some(route);
        ctx.public = Some(public);
        served
    }

    /// Registry calls get the short timeout profile; anything that may stream a large body
    /// (uploads, pass-through) gets the long one.
    async fn upstream_peer(&self, _s: &mut Session, ctx: &mut RequestCtx) -> Result<Box<HttpPeer>> {
        let profile = match ctx.route {
            Some(Route::Module(_)) | Some(Route::Project(_)) => Profile::Registry,
            _ => Profile::Transfer,
        };
        let profile = match &ctx.route {
            Some(Route::Project(p)) if matches!(p.op, ProjectOp::Upload { .. }) => {
                Profile::Transfer
            }
            _ => profile,
        };
        self.upstream.peer(profile).await
    }

    /// Each piece of a request body pingora forwards upstream: an HTTP/2 body that stops
    /// moving is cut at `timeouts.client_stall` by `downstream::http2` (pingora applies the
    /// read timeout set above to HTTP/1 only).
    async fn request_body_filter(
        &self,
        _session: &mut Session,
        _body: &mut Option<bytes::Bytes>,
        end_of_stream: bool,
        _ctx: &mut RequestCtx,
    ) -> Result<()> {
        crate::downstream::request_body_read(end_of_stream);
        Ok(())
    }

    /// Runs after the peer is chosen, before the request head goes upstream.
    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        up: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // pingora reads the request body from here on: an HTTP/2 body's stall timer starts.
        crate::downstream::request_body_awaited();
        // Registry routes go out rebuilt from their validated parts; the rest unchanged.
        let target = match &ctx.route {
            Some(Route::Module(m)) => with_query(&m.upstream_path(), up),
            _ => path_and_query(up),
        };
        let uri = self
            .upstream
            .path(&target)
            .parse()
            .map_err(|_| Error::explain(ErrorType::InvalidHTTPHeader, "bad upstream path"))?;
        up.set_uri(uri);
        up.insert_header(header::HOST, self.upstream.authority())?;
        // A CI ID token (`<job token>~<ID token>`) is tfmirror's alone: never forwarded.
        if let Some((stripped, _)) = up
            .headers
            .get(header::AUTHORIZATION)
            .and_then(crate::access::idtoken::split)
        {
            up.insert_header(header::AUTHORIZATION, stripped)?;
        }

        let connection_tokens: Vec<String> = up
            .headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|t| t.trim().to_ascii_lowercase())
            .filter(|t| !t.is_empty() && t != "upgrade")
            .collect();
        for name in HOP_BY_HOP
            .iter()
            .copied()
            .chain(connection_tokens.iter().map(String::as_str))
        {
            up.remove_header(name);
        }

        if let Some(addr) = session.client_addr().and_then(|a| a.as_inet()) {
            let ip = addr.ip().to_string();
            let xff = match up
                .headers
                .get("x-forwarded-for")
                .and_then(|v| v.to_str().ok())
            {
                Some(prev) => format!("{prev}, {ip}"),
                None => ip,
            };
            up.insert_header("x-forwarded-for", xff)?;
        }
        up.insert_header("x-forwarded-proto", self.scheme)?;
        Ok(())
    }

    /// Runs on each upstream response head, before it goes to the client.
    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        ctx.upstream_status = Some(resp.status.as_u16());
        if let Some(Route::Project(p)) = &ctx.route {
            if matches!(p.op, ProjectOp::Upload { .. }) && resp.status == StatusCode::CREATED {
                self.registry.invalidate_uploads_of(&p.name, &p.system);
            }
        }
        // Whatever is proxied bypasses the cache, and says so (every answer carries
        // X-Cache-Status); the access line records it for registry routes.
        if matches!(ctx.route, Some(Route::Module(_) | Route::Project(_))) {
            ctx.cache = Some(CacheStatus::Bypass);
        }
        resp.insert_header(respond::CACHE_STATUS, CacheStatus::Bypass.as_str())?;
        let Some(public) = &ctx.public else {
            return Ok(());
        };
        for name in [TERRAFORM_GET, header::LOCATION] {
            let new = resp
                .headers
                .get(&name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| self.rewriter.rewrite(v, public));
            if let Some(v) = new {
                resp.insert_header(name, v)?;
            }
        }
        Ok(())
    }

    /// The upstream could not be reached or failed mid-response: answer in GitLab's shape.
    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy
    where
        RequestCtx: Send + Sync,
    {
        let status = match e.etype() {
            ErrorType::HTTPStatus(code) => {
                StatusCode::from_u16(*code).unwrap_or(StatusCode::BAD_GATEWAY)
            }
            ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout => {
                StatusCode::GATEWAY_TIMEOUT
            }
            _ => match e.esource() {
                pingora::ErrorSource::Downstream => StatusCode::BAD_REQUEST,
                _ => StatusCode::BAD_GATEWAY,
            },
        };
        // Nothing can be written once the response has started or the client is gone.
        let client_gone = e.esource() == &pingora::ErrorSource::Downstream
            && matches!(
                e.etype(),
                ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed
            );
        let code = if session.response_written().is_none() && !client_gone {
            // The connection is not reused after an error: say so, or the client's next
            // request on it would meet a reset.
            session.set_keepalive(None);
            // The upstream was asked (or was to be asked) and failed: a miss, unless the
            // route already said what the cache did.
            let cache = ctx.cache.unwrap_or(CacheStatus::Miss);
            let _ = respond::registry_error(session, status, cache).await;
            status.as_u16()
        } else {
            0
        };
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    /// Pingora puts this in its error log lines. The default includes the URI, whose query
    /// may carry a JWT or a token: only the method and the route template go there.
    fn request_summary(&self, session: &Session, ctx: &RequestCtx) -> String {
        let route = ctx.route.as_ref().map_or("unparsed", Route::template);
        format!("{} {route}", session.req_header().method)
    }

    /// Runs last, for every request: the access log and request metrics.
    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        let at = Instant::now();
        crate::accesslog::record(&crate::accesslog::Entry {
            method: &session.req_header().method,
            route: ctx.route.as_ref(),
            status: session.response_written().map_or(0, |r| r.status.as_u16()),
            upstream_status: ctx.upstream_status,
            cache: ctx.cache,
            identity: ctx.identity,
            bytes: session.body_bytes_sent(),
            elapsed: at.saturating_duration_since(ctx.started),
            at,
            error: e.map(|e| e.etype().as_str()),
        });
    }
}
