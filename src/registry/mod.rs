//! Cache decisions for the namespace registry routes: share bytes, never access.
//!
//! | route | fresh grant for this identity | otherwise |
//! |---|---|---|
//! | versions, latest, a version | the body *this identity* last received (HIT; UPDATING past `listing_ttl`, refreshed in the background) | upstream with the caller's credential; 200 records the grant (MISS/REVALIDATED); 401/403/404 pass through unchanged |
//! | `:version/download` | a 204 minted here, if the version was in the identity's listing | upstream; GitLab's JWT is swapped for a tfmirror token |
//! | `:version/file` | no grant needed: a valid tfmirror token for this exact module path | the same |
//!
//! `/file` is served from the blob store (HIT), or filled from GitLab on the token holder's
//! behalf with one upstream fetch however many clients wait (MISS). GitLab's JWT stays in
//! memory; clients only ever see tfmirror tokens.

mod ask;
mod decide;
mod download;
pub(crate) mod idkeys;
mod learn;
mod listing;
mod project;
mod reply;
mod tarball;
mod warm;
mod who;

pub use reply::json as cached_listing;

#[cfg(test)]
mod answer_tests;
#[cfg(test)]
mod bad_day_tests;
#[cfg(test)]
mod testkit;

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use http::{HeaderValue, StatusCode};
use pingora::{Error, Result};

use crate::access::Auth;
use crate::cache::fill::{End, FillError, Source};
use crate::cache::records::{BodyRef, ListingKey};
use crate::cache::Cache;
use crate::clock::now as unix_now;
use crate::config::{CacheConfig, UnknownIdentity};
use crate::identity::{Identity, Secret};
use crate::respond::{CacheStatus, Reply, JSON, STALE_WARNING, TERRAFORM_GET};
use crate::rewrite::PublicBase;
use crate::routes::{ModuleId, ModuleOp, ModuleRoute, ProjectRoute};
use crate::token::Tokens;
use crate::upstream::gitlab::{Fetcher, Small};
use crate::upstream::health::Health;

/// The content type of a tarball.
const OCTETS: &str = "application/octet-stream";

type SharedFetch = crate::flight::Flight<std::result::Result<Small, Arc<Error>>>;

/// What an upstream answer can teach, per route.
#[derive(Debug, Clone)]
pub(super) enum Lesson {
    /// A listing; `previous` is the body this identity had, to tell MISS from REVALIDATED.
    Listing {
        module: ModuleId,
        op: ListingKey,
        path: String,
        previous: Option<BodyRef>,
    },
    /// A namespace download URL for `version`.
    Download {
        module: ModuleId,
        version: String,
        path: String,
    },
    /// A project route's `?terraform-get=1` access check (`module` is the project's grant
    /// key); `version` is `None` for the unversioned (latest) source.
    ProjectCheck {
        module: ModuleId,
        version: Option<String>,
        path: String,
    },
}

impl Lesson {
    fn module(&self) -> &ModuleId {
        match self {
            Lesson::Listing { module, .. }
            | Lesson::Download { module, .. }
            | Lesson::ProjectCheck { module, .. } => module,
        }
    }

    fn path(&self) -> &str {
        match self {
            Lesson::Listing { path, .. }
            | Lesson::Download { path, .. }
            | Lesson::ProjectCheck { path, .. } => path,
        }
    }
}

/// What the registry reads of a request: the parts its decisions depend on, and nothing of
/// pingora's session, so that every handler runs in a unit test without one.
#[derive(Debug, Clone, Default)]
pub struct Call {
    /// `HEAD`: answered like GET without a body, and never starts a fill (Terraform sends
    /// HEAD before GET, and the GET does the work).
    pub head: bool,
    /// The caller's credential (`Authorization`), as GitLab's registry routes take it: a
    /// CI ID token (`<job token>~<ID token>`) split off, always, so it never goes to GitLab.
    pub authorization: Option<HeaderValue>,
    /// The CI ID token the credential carried, if any (see `access::idtoken`).
    pub id_token: Option<String>,
    /// The `token` query parameter: a tfmirror download token, on tarball routes.
    pub token: Option<String>,
    /// `?terraform-get=1` (go-getter's question on project routes).
    pub terraform_get: bool,
    /// How the connection takes a large cached tarball (the edge says; streamed by default).
    pub sink: crate::cache::artifact::Sink,
}

impl Call {
    pub fn of(req: &pingora::http::RequestHeader) -> Call {
        let query = req.uri.query().unwrap_or_default();
        let mut call = Call {
            head: req.method == http::Method::HEAD,
            authorization: req.headers.get(http::header::AUTHORIZATION).cloned(),
            ..Call::default()
        };
        if let Some((stripped, id)) = call
            .authorization
            .as_ref()
            .and_then(crate::access::idtoken::split)
        {
            call.authorization = Some(stripped);
            call.id_token = Some(id);
        }
        each_query_pair(query, |k, v| match k {
            "token" if call.token.is_none() => call.token = Some(v.into_owned()),
            "terraform-get" => call.terraform_get |= v == "1",
            _ => {}
        });
        call
    }
}

/// Each pair of a query, as `url::form_urlencoded::parse` gives them. A query with nothing
/// to decode (no `%`, no `+`: tfmirror's tokens are base64url) is split as it is: the
/// decoder would make three byte-by-byte passes over every value (for `+`, for `%`, for
/// UTF-8) only to hand it back unchanged, about 0.7 us per `/file` hit on a 400-character
/// token.
fn each_query_pair<'q>(query: &'q str, mut f: impl FnMut(&str, Cow<'q, str>)) {
    if query.contains('%') || query.contains('+') {
        for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
            f(&k, v);
        }
        return;
    }
    // form_urlencoded's own split: empty pieces skipped, the name up to the first `=`.
    for piece in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = piece.split_once('=').unwrap_or((piece, ""));
        f(k, Cow::Borrowed(v));
    }
}

/// What happened, for the access log and metrics.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    pub cache: CacheStatus,
    pub upstream_status: Option<u16>,
    pub identity: Identity,
}

impl Outcome {
    pub(super) fn new(
        identity: Identity,
        cache: CacheStatus,
        upstream_status: Option<u16>,
    ) -> Outcome {
        Outcome {
            cache,
            upstream_status,
            identity,
        }
    }
}

pub struct Registry {
    upstream: Arc<dyn Fetcher>,
    cache: Arc<Cache>,
    auth: Auth,
    secret: Secret,
    tokens: Tokens,
    cfg: CacheConfig,
    health: Arc<Health>,
    /// `offline.deadline`: how long a registry call waits for GitLab before it has failed.
    deadline: Duration,
    unknown_identity: UnknownIdentity,
    /// `offline.imported_readers`, and the listed readers.
    readers: crate::access::readers::Readers,
    /// Registry calls in flight, by identity (or credential) and path: one upstream exchange
    /// each, with the identity of the credential it is made with.
    inflight: crate::flight::Flights<String, std::result::Result<Small, Arc<Error>>, Identity>,
    /// Background listing refreshes running, by identity and path: one each.
    refreshing: crate::flight::Running<String>,
    /// (name, system) -> unix seconds of the last upload through tfmirror.
    uploads: moka::sync::Cache<(String, String), u64>,
    /// The latest time in `uploads` (unix seconds): a listing fetched after it cannot have
    /// been invalidated, and the hit path skips the lookup.
    latest_upload: std::sync::atomic::AtomicU64,
    /// `auth.principal_grants`: job tokens share their principal's grants (see `who`).
    principal_grants: bool,
    /// Job token -> its principal (or per-token, or finished), for at most `auth.grant_ttl`.
    jobs: crate::access::principal::JobMap,
    job_inflight: who::JobInflight,
    /// GitLab's ID-token keys, when `auth.id_token.audience` is set.
    id_keys: Option<Arc<idkeys::IdKeys>>,
}

impl Registry {
    pub fn new(
        upstream: Arc<dyn Fetcher>,
        cache: Arc<Cache>,
        secret: Secret,
        health: Arc<Health>,
        cfg: &crate::config::Config,
    ) -> Registry {
        let readers = crate::access::readers::Readers::new(&cfg.offline, secret.clone());
        Registry {
            auth: Auth::new(
                cache.records(),
                cfg.auth.grant_ttl,
                cfg.auth.negative_ttl,
                cfg.cache.stale_if_error,
            ),
            tokens: Tokens::from_secret(&secret, cfg.auth.token_ttl),
            upstream,
            cache,
            secret,
            cfg: cfg.cache.clone(),
            health,
            deadline: cfg.offline.deadline,
            unknown_identity: cfg.offline.unknown_identity,
            readers,
            inflight: crate::flight::Flights::lingering(ask::ANSWERED_STAYS),
            refreshing: Default::default(),
            uploads: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(Duration::from_secs(24 * 3600))
                .build(),
            latest_upload: std::sync::atomic::AtomicU64::new(0),
            principal_grants: cfg.auth.principal_grants,
            jobs: crate::access::principal::JobMap::new(cfg.auth.grant_ttl),
            job_inflight: crate::flight::Flights::lingering(ask::ANSWERED_STAYS),
            id_keys: idkeys::IdKeys::new(cfg).map(Arc::new),
        }
    }

    /// The background service that keeps GitLab's ID-token keys fresh from the start, when
    /// `auth.id_token.audience` is set.
    pub fn id_keys_keeper(&self) -> Option<idkeys::KeepKeys> {
        Some(idkeys::KeepKeys {
            keys: self.id_keys.clone()?,
            upstream: self.upstream.clone(),
            health: self.health.clone(),
        })
    }

    /// Forget every grant and refusal for `module` (an admin purge of its cached records).
    pub fn forget_module(&self, module: &str) {
        self.auth.forget_module(module);
    }

    /// The answer to a namespace route, as a value (`None`: the latest-download redirect,
    /// left to the proxy). Errors only when the cache cannot be read.
    pub async fn answer(
        self: &Arc<Self>,
        call: &Call,
        route: &ModuleRoute,
        public: &PublicBase,
    ) -> Result<Option<(Reply, Outcome)>> {
        let answered = match &route.op {
            ModuleOp::Versions => self.listing(call, route, ListingKey::Versions).await,
            ModuleOp::Latest => self.listing(call, route, ListingKey::Latest).await,
            ModuleOp::Version(v) => {
                let key = ListingKey::Version(v.clone());
                self.listing(call, route, key).await
            }
            ModuleOp::Download(v) => self.download(call, route, &v.to_string(), public).await,
            ModuleOp::File(v) => self.file(call, route, &v.to_string()).await?,
            ModuleOp::LatestDownload => return Ok(None),
        };
        Ok(Some(answered))
    }

    /// The answer to a project route's download (`?terraform-get=1` or the tarball GET).
    pub async fn project_answer(
        self: &Arc<Self>,
        call: &Call,
        route: &ProjectRoute,
        public: &PublicBase,
    ) -> Result<(Reply, Outcome)> {
        self.project_download(call, route, call.terraform_get, public)
            .await
    }

    /// An upload through tfmirror changes that module's listings: stop serving cached ones.
    pub fn invalidate_uploads_of(&self, name: &str, system: &str) {
        let now = unix_now();
        self.latest_upload
            .fetch_max(now, std::sync::atomic::Ordering::AcqRel);
        self.uploads
            .insert((name.to_string(), system.to_string()), now);
    }

    fn invalidated(&self, module: &ModuleId, fetched_at: u64) -> bool {
        // Every entry's time is at most the latest.
        if self
            .latest_upload
            .load(std::sync::atomic::Ordering::Acquire)
            < fetched_at
        {
            return false;
        }
        self.uploads
            .get(&(module.name().to_string(), module.system().to_string()))
            .is_some_and(|at| at >= fetched_at)
    }
}

/// A download as a fill source: a success streams, a refusal is relayed, the rest is a 502.
fn source(opened: Result<reqwest::Response>) -> std::result::Result<Source, FillError> {
    match opened {
        Ok(r) if r.status().is_success() => Ok(Source {
            end: End::of(r.version(), r.headers()),
            body: r.bytes_stream().map_err(|_| "upstream body failed").boxed(),
        }),
        Ok(r) => Err(FillError::Refused(r.status())),
        Err(e) => {
            tracing::warn!(error = %e, "tarball fill could not reach the upstream");
            Err(FillError::Upstream("upstream unreachable"))
        }
    }
}

/// GitLab's download JWT in a download answer's `X-Terraform-Get` (raw, as sent).
fn download_jwt(small: &Small) -> Option<String> {
    small
        .headers
        .get(TERRAFORM_GET)
        .and_then(|v| v.to_str().ok())
        .and_then(gitlab_token)
}

/// The raw `token` parameter of GitLab's `X-Terraform-Get` (kept encoded, as sent).
fn gitlab_token(x_terraform_get: &str) -> Option<String> {
    let query = x_terraform_get.split_once('?')?.1;
    query
        .split('&')
        .find_map(|p| p.strip_prefix("token="))
        .map(str::to_string)
}

/// The label of a route in upstream metrics.
fn route_label(route: &ModuleRoute) -> &'static str {
    crate::routes::Route::Module(route.clone()).template()
}

fn status_class(s: StatusCode) -> &'static str {
    match s.as_u16() {
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::respond::listed_versions;

    #[test]
    fn gitlab_token_is_extracted_raw() {
        let v =
            "/api/v4/packages/terraform/modules/v1/g/n/s/1.0.0/file?token=eyJ.a-b_c.d&archive=tgz";
        assert_eq!(gitlab_token(v).as_deref(), Some("eyJ.a-b_c.d"));
        assert_eq!(
            gitlab_token("/x/file?archive=tgz&token="),
            Some(String::new())
        );
        assert_eq!(gitlab_token("/x/file"), None);
    }

    #[test]
    fn query_pairs_are_form_urlencodeds_pairs() {
        for q in [
            "",
            "token=abc-_09&archive=tgz",
            "token=abc&token=def",
            "&&token=&=x&terraform-get=1&flag&a=b=c&",
            "token=a%2Fb&archive=tgz",
            "token=a+b",
            "t%6Fken=x",
            "token=%ff%fe",
            "token=\u{e9}t\u{e9}",
        ] {
            let mut ours = Vec::new();
            each_query_pair(q, |k, v| ours.push((k.to_string(), v.into_owned())));
            let theirs: Vec<_> = url::form_urlencoded::parse(q.as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
            assert_eq!(ours, theirs, "{q}");
        }
    }

    #[test]
    fn versions_are_read_as_terraform_reads_them() {
        let body = br#"{"modules":[{"versions":[{"version":"1.0.0"},{"version":"1.10.0"}],"source":"x"}]}"#;
        assert_eq!(listed_versions(body), vec!["1.0.0", "1.10.0"]);
        assert!(listed_versions(b"{}").is_empty());
        assert!(listed_versions(b"not json").is_empty());
    }
}
