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
use http::{header, StatusCode};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{Error, ErrorType, Result};

use super::write;
use crate::cache::Cache;
use crate::identity::Identity;
use crate::providers;
use crate::registry::{self, Outcome, Registry};
use crate::respond::{self, CacheStatus, TERRAFORM_GET};
use crate::rewrite::{PublicBase, Rewriter};
use crate::routes::{self, ProjectOp, Route, MODULES_V1};
use crate::upstream::health::Health;
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

pub struct Proxy {
    pub(super) upstream: Arc<Upstream>,
    pub(super) cache: Arc<Cache>,
    pub(super) registry: Arc<Registry>,
    pub(super) health: Arc<Health>,
    rewriter: Rewriter,
    /// Configured public URL; when unset, each request's own `Host` is used.
    public_url: Option<PublicBase>,
    /// The scheme clients use to reach this listener.
    scheme: &'static str,
    /// blake3 of the admin token; admin endpoints are off without one.
    pub(super) admin_token: Option<blake3::Hash>,
    pub(super) cache_dir: std::path::PathBuf,
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
                write::json(session, StatusCode::OK, body.to_string()).await?;
                Ok(true)
            }
            Route::Internal(which) => {
                self.serve_internal(session, *which).await?;
                Ok(true)
            }
            Route::Module(m) => {
                let call = registry_call(session);
                match self.registry.answer(&call, m, public).await? {
                    Some((reply, out)) => {
                        write::reply(session, reply).await?;
                        ctx.record(out);
                        Ok(true)
                    }
                    None => self.offline_refusal(session).await,
                }
            }
            Route::Provider(p) => {
                let Some(providers) = &self.providers else {
                    write::error(session, StatusCode::NOT_FOUND).await?;
                    return Ok(true);
                };
                let call = providers::mirror::Call {
                    sink: write::sink(session),
                    ..providers::mirror::Call::of(session.req_header())
                };
                let (answer, upstream_status) =
                    providers::upstream::observed(providers.answer(&call, p, public)).await;
                let (reply, cache) = answer?;
                write::reply(session, reply).await?;
                ctx.cache = Some(cache);
                ctx.upstream_status = upstream_status;
                Ok(true)
            }
            Route::Project(p) if matches!(p.op, ProjectOp::Download { .. }) => {
                let call = registry_call(session);
                let (reply, out) = self.registry.project_answer(&call, p, public).await?;
                write::reply(session, reply).await?;
                ctx.record(out);
                Ok(true)
            }
            _ => self.offline_refusal(session).await,
        }
    }
}

/// What the registry reads of this request, with how its connection takes a large file.
fn registry_call(session: &Session) -> registry::Call {
    registry::Call {
        sink: write::sink(session),
        ..registry::Call::of(session.req_header())
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
        crate::edge::downstream::head_received();
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
            write::json(session, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, body).await?;
            return Ok(true);
        }
        let route = match routes::parse(&req.method, req.uri.path()) {
            Ok(r) => r,
            Err(reject) => {
                write::json(session, reject.status, reject.body()).await?;
                return Ok(true);
            }
        };
        let Some(public) = self.public_base(req) else {
            let body = serde_json::json!({ "error": "Host header is invalid" }).to_string();
            write::json(session, StatusCode::BAD_REQUEST, body).await?;
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
        crate::edge::downstream::request_body_read(end_of_stream);
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
        crate::edge::downstream::request_body_awaited();
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
            let _ = write::registry_error(session, status, cache).await;
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
        crate::edge::accesslog::record(&crate::edge::accesslog::Entry {
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
