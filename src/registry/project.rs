//! Project routes (`/api/v4/projects/:id/packages/terraform/modules/:name/:system[/:version]`),
//! at parity with the namespace routes: the same policy, the same cache, tfmirror tokens.
//!
//! Terraform (go-getter) first sends `?terraform-get=1` with Basic auth; GitLab answers it
//! right after its project access check, before it looks the package up, with a 204 whose
//! `X-Terraform-Get` is the same URL (versioned or not) plus `archive=tgz`. So a 404 there
//! means "no access" and revokes. tfmirror answers that 204 itself from a grant (fresh, or
//! stale while GitLab fails), pointing at itself with a tfmirror token; the tarball GET that
//! follows is served by that token, from the cache or filled once from GitLab.
//!
//! The unversioned (latest) source: GitLab picks the version. tfmirror asks for the tarball,
//! reads the version from the file name GitLab serves (`<name>-<system>-<version>.tgz`), and
//! keys the cache by it; the last version resolved is kept for the offline fallback.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::FutureExt;
use http::{header, HeaderValue};
use pingora::Result;

use super::ask::Asked;
use super::decide::{count, Fallback};
use super::reply;
use super::{source, Call, Lesson, Outcome, Registry};
use crate::access::policy::{Action, Breaker, Kind, Why};
use crate::cache::fill::{FillError, Opener};
use crate::cache::records::{
    project_tarball_key, shared_key, ListingKey, SharedListing, KIND_SHARED,
};
use crate::clock::{now as unix_now, Moment};
use crate::identity::Identity;
use crate::respond::{CacheStatus, Reply};
use crate::rewrite::PublicBase;
use crate::routes::{ModuleId, ProjectOp, ProjectRoute};
use crate::token::Authority;

/// The version word a token carries for the unversioned (latest) source.
const LATEST: &str = "latest";

/// One project-route request, its parts resolved once.
struct Project<'a> {
    route: &'a ProjectRoute,
    /// The grant and token key: `project:<id>/<name>/<system>`.
    module: ModuleId,
    /// GitLab's path for it, without version: validated parts only, the project path's
    /// slashes re-encoded as GitLab wants them.
    base: String,
    version: Option<String>,
}

impl<'a> Project<'a> {
    fn new(route: &'a ProjectRoute) -> Project<'a> {
        let project = route.project.replace('/', "%2F");
        Project {
            route,
            module: ModuleId::new(
                &format!("project:{}", route.project),
                &route.name,
                &route.system,
            ),
            base: format!(
                "/api/v4/projects/{project}/packages/terraform/modules/{}/{}",
                route.name, route.system
            ),
            version: match &route.op {
                ProjectOp::Download { version } => version.as_ref().map(ToString::to_string),
                ProjectOp::Upload { .. } => None,
            },
        }
    }

    fn path(&self) -> String {
        match &self.version {
            Some(v) => format!("{}/{v}", self.base),
            None => self.base.clone(),
        }
    }

    fn fallback(&self) -> Fallback<'_> {
        Fallback::Version {
            module: &self.module,
            version: self.version.as_deref(),
        }
    }

    fn token_version(&self) -> &str {
        self.version.as_deref().unwrap_or(LATEST)
    }

    fn key(&self, version: &str) -> String {
        project_tarball_key(
            &self.route.project,
            &self.route.name,
            &self.route.system,
            version,
        )
    }
}

/// Who asks, and how, for one project-route request.
struct Asker<'a> {
    cred: Option<HeaderValue>,
    identity: Identity,
    terraform_get: bool,
    public: &'a PublicBase,
    /// GitLab's access check for this request: the path with `?terraform-get=1`.
    check: String,
    /// When the grant was read, on a first look; `None` on a second (see `ask_since`).
    read_at: Option<Instant>,
}

impl Asker<'_> {
    fn outcome(&self, cache: CacheStatus, upstream_status: Option<u16>) -> Outcome {
        Outcome::new(self.identity, cache, upstream_status)
    }
}

impl Registry {
    /// `GET PP[/:version]`, with or without `?terraform-get=1`.
    pub async fn project_download(
        self: &Arc<Self>,
        call: &Call,
        route: &ProjectRoute,
        terraform_get: bool,
        public: &PublicBase,
    ) -> Result<(Reply, Outcome)> {
        let p = Project::new(route);
        if !terraform_get {
            let cred = call.authorization.clone();
            if let Some(answered) = self.project_by_token(call, &p, cred).await {
                return answered;
            }
        }
        let (identity, cred) = match self.caller(call).await {
            Ok(caller) => caller,
            Err(finished) => return Ok(finished),
        };
        let c = Asker {
            identity,
            cred,
            terraform_get,
            public,
            check: format!("{}?terraform-get=1", p.path()),
            // A first look: set to when its grant is read (`project_as`).
            read_at: Some(Instant::now()),
        };
        self.project_as(call, &p, c).await
    }

    /// A project route's download for a resolved caller: from its grant, or GitLab's check.
    async fn project_as(
        self: &Arc<Self>,
        call: &Call,
        p: &Project<'_>,
        mut c: Asker<'_>,
    ) -> Result<(Reply, Outcome)> {
        // A first look; a second one (after `Learned`) comes back with `None` in it.
        c.read_at = c.read_at.map(|_| Instant::now());
        let grant = self.auth.grant(c.identity, &p.module).await;
        let own = grant
            .as_ref()
            .filter(|g| p.version.as_ref().is_none_or(|v| g.allows_version(v)))
            .map(|g| g.checked_at);
        let (mut facts, remembered) = self.facts(
            Moment::now(),
            Kind::Download,
            c.identity,
            c.cred.is_some(),
            &p.module,
            grant.as_deref(),
            own,
            &c.check,
        );
        let (action, _) = self
            .decide(&mut facts, &p.fallback(), c.cred.as_ref())
            .await;
        count(action, c.identity, &p.module, None);
        match action {
            Action::Fresh | Action::Revalidate => {
                if let Some(g) = &grant {
                    let (id, cred) = (c.identity, c.cred.as_ref());
                    self.auth
                        .remember_for_grant(id, cred, remembered.as_ref(), g);
                }
                return self
                    .project_allowed(call, p, &c, CacheStatus::Hit, None)
                    .await;
            }
            Action::Stale(_) => {
                return self
                    .project_allowed(call, p, &c, CacheStatus::Stale, None)
                    .await;
            }
            other => {
                if let Some((reply, cache)) = self
                    .answer_alike(other, c.identity, &p.module, &c.check, None)
                    .await
                {
                    return Ok((reply, c.outcome(cache, None)));
                }
            }
        }
        self.project_from_gitlab(call, p, &c, facts).await
    }

    /// The tarball GET behind a 204 tfmirror handed out: its token decides (unless GitLab
    /// refused its identity since it was minted). `None` without a valid token.
    async fn project_by_token(
        self: &Arc<Self>,
        call: &Call,
        p: &Project<'_>,
        cred: Option<HeaderValue>,
    ) -> Option<Result<(Reply, Outcome)>> {
        let (identity, cred, expiry) = self.project_token(call, p, cred)?;
        if let Some(refused) = self.refused_since_mint(identity, &p.module, expiry).await {
            return Some(Ok(refused));
        }
        Some(self.project_tarball(call, p, identity, cred, false).await)
    }

    /// The identity (and credential to fill with) of a valid tfmirror token on the request,
    /// and the token's expiry.
    fn project_token(
        &self,
        call: &Call,
        p: &Project<'_>,
        cred: Option<HeaderValue>,
    ) -> Option<(Identity, Option<HeaderValue>, u64)> {
        let claims = self
            .tokens
            .open(
                call.token.as_deref(),
                &p.module,
                p.token_version(),
                unix_now(),
            )
            .ok()?;
        // The credential sealed in the token lets any replica of a set fill it.
        let identity = claims.identity;
        let sealed = match claims.authority {
            Authority::Credential(c) => Some(c),
            _ => None,
        };
        Some((
            identity,
            cred.or(sealed)
                .or_else(|| self.auth.credential(identity, crate::clock::instant())),
            claims.expiry,
        ))
    }

    /// Ask GitLab's `?terraform-get=1`, then decide again with what it did.
    async fn project_from_gitlab(
        self: &Arc<Self>,
        call: &Call,
        p: &Project<'_>,
        c: &Asker<'_>,
        mut facts: crate::access::policy::Facts,
    ) -> Result<(Reply, Outcome)> {
        let lesson = Lesson::ProjectCheck {
            module: p.module.clone(),
            version: p.version.clone(),
            path: c.check.clone(),
        };
        let (id, check, cred, label) = (c.identity, &c.check, c.cred.clone(), "project_download");
        let asked = match c.read_at {
            Some(since) => match self
                .ask_since(id, check, cred, lesson.clone(), label, since)
                .await
            {
                Ok(asked) => asked,
                // What GitLab said was learned since the grant was read: look again.
                Err(crate::flight::Learned) => {
                    let again = Asker {
                        cred: c.cred.clone(),
                        check: c.check.clone(),
                        read_at: None,
                        ..*c
                    };
                    return Box::pin(self.project_as(call, p, again)).await;
                }
            },
            None => self.ask(id, check, cred, lesson.clone(), label).await,
        };
        self.after_asking(&mut facts, &asked, &lesson);
        let (action, _) = self
            .decide(&mut facts, &p.fallback(), c.cred.as_ref())
            .await;
        count(action, c.identity, &p.module, asked.failure());
        let upstream = asked.upstream_status();
        match (action, asked) {
            (Action::Stale(_), _) => {
                self.project_allowed(call, p, c, CacheStatus::Stale, upstream)
                    .await
            }
            (Action::Relay, Asked::Answer { small, learned }) if small.status.is_success() => {
                // A tier's stale answer stays stale; its own Age is not carried over here (the
                // 204 or the tarball is tfmirror's own answer).
                let cache = match learned {
                    CacheStatus::Stale => CacheStatus::Stale,
                    _ => CacheStatus::Miss,
                };
                self.project_allowed(call, p, c, cache, upstream).await
            }
            (Action::Relay, Asked::Answer { small, .. }) => {
                // GitLab's refusal, as GitLab gave it: a private project is a 404, never a 403.
                let reply = reply::answer(&small, CacheStatus::Miss);
                Ok((reply, c.outcome(CacheStatus::Miss, upstream)))
            }
            (action, asked) => {
                let reply = self
                    .answer_failed(action, asked, c.identity, &p.module, &c.check)
                    .await;
                Ok((reply, c.outcome(CacheStatus::Miss, upstream)))
            }
        }
    }

    /// The policy allowed this caller (`cache`: HIT from a fresh grant, STALE while GitLab
    /// fails, MISS after GitLab's yes): tfmirror's 204 for `?terraform-get=1`, else the tarball.
    async fn project_allowed(
        self: &Arc<Self>,
        call: &Call,
        p: &Project<'_>,
        c: &Asker<'_>,
        cache: CacheStatus,
        upstream_status: Option<u16>,
    ) -> Result<(Reply, Outcome)> {
        let stale = cache == CacheStatus::Stale;
        if stale {
            self.auth.remember_for_stale(c.identity, c.cred.as_ref());
        }
        if c.terraform_get {
            let get = self.project_terraform_get(c.public, p, c.identity, c.cred.as_ref());
            let reply = reply::download(cache, &get);
            return Ok((reply, c.outcome(cache, upstream_status)));
        }
        self.project_tarball(call, p, c.identity, c.cred.clone(), stale)
            .await
    }

    /// tfmirror's `X-Terraform-Get` for a project route: its own URL, with a token that lets
    /// the tarball GET through without asking GitLab again.
    fn project_terraform_get(
        &self,
        public: &PublicBase,
        p: &Project<'_>,
        identity: Identity,
        cred: Option<&HeaderValue>,
    ) -> String {
        // The caller's credential, sealed: any replica of a set can fill the tarball with it.
        let authority = cred.map_or(Authority::None, |c| Authority::Credential(c.clone()));
        let token = self.tokens.seal(
            &p.module,
            p.token_version(),
            identity,
            &authority,
            unix_now(),
        );
        // Absolute, as GitLab's own is on project routes.
        format!(
            "{}{}{}?token={token}&archive=tgz",
            public.origin(),
            public.prefix(),
            p.path()
        )
    }

    /// Serve a project tarball for an identity the policy allowed: from the cache, or filled
    /// from GitLab with `cred` (never while GitLab fails: `stale`).
    async fn project_tarball(
        self: &Arc<Self>,
        call: &Call,
        p: &Project<'_>,
        identity: Identity,
        cred: Option<HeaderValue>,
        stale: bool,
    ) -> Result<(Reply, Outcome)> {
        let (version, opened, stale) = match &p.version {
            Some(v) => (Some(v.clone()), None, stale),
            None => match self.latest_version(p, cred.as_ref(), stale).await {
                Ok(Latest::Resolved(v, resp)) => (Some(v), Some(resp), false),
                Ok(Latest::Stale(v)) => (v, None, true),
                Ok(Latest::Unlisted(resp)) => {
                    // Served as a direct `terraform init` would get it, and kept nowhere.
                    let opened = async move { source(Ok(resp)) }.boxed();
                    return Ok(self.pass_through(identity, opened).await);
                }
                Err(e) => return Ok(project_fill_error(identity, &e)),
            },
        };
        let Some(version) = version else {
            return Ok(self.project_unavailable(p, identity));
        };
        let key = p.key(&version);
        if !stale {
            let open = self.project_opener(p, &version, cred, opened);
            return self.serve_tarball(call, &key, identity, open).await;
        }
        // GitLab fails: nothing can be filled, cached bytes or a clear 503.
        let open = || async { Err(FillError::Upstream("upstream down")) }.boxed();
        let (reply, mut out) = self.serve_tarball(call, &key, identity, open).await?;
        if out.cache != CacheStatus::Hit {
            return Ok(self.project_unavailable(p, identity));
        }
        out.cache = CacheStatus::Stale;
        Ok((reply.restamp(CacheStatus::Stale), out))
    }

    /// Opens GitLab's tarball for a fill: the response already opened to resolve the latest
    /// version first, then (a retry, a pass-through) a new request for that version.
    fn project_opener(
        &self,
        p: &Project<'_>,
        version: &str,
        cred: Option<HeaderValue>,
        opened: Option<reqwest::Response>,
    ) -> impl Fn() -> Opener {
        let upstream = self.upstream.clone();
        let path = format!("{}/{version}", p.base);
        let opened = Arc::new(Mutex::new(opened));
        move || {
            let (upstream, path, cred) = (upstream.clone(), path.clone(), cred.clone());
            let first = opened.lock().expect("opener lock").take();
            async move {
                match first {
                    Some(resp) => source(Ok(resp)),
                    None => source(upstream.open(&path, cred.as_ref()).await),
                }
            }
            .boxed()
        }
    }

    /// The version behind the unversioned (latest) source, with the response already opened
    /// to learn it. While GitLab fails or cannot be asked (`stale`, the breaker, or GitLab
    /// unreachable or failing now): the last version resolved, served from the cache only
    /// (`None` when there is none). GitLab's refusal, or its 429, is the caller's answer.
    async fn latest_version(
        &self,
        p: &Project<'_>,
        cred: Option<&HeaderValue>,
        stale: bool,
    ) -> std::result::Result<Latest, FillError> {
        if !stale && self.breaker() == Breaker::Up {
            match self.resolve_latest(p, cred).await {
                Ok(latest) => return Ok(latest),
                Err(e) if !fill_outage(&e) => return Err(e),
                Err(_) => {}
            }
        }
        Ok(Latest::Stale(self.last_latest(&p.module).await))
    }

    /// Ask GitLab for the latest tarball and learn its version: from the file name GitLab
    /// serves it under (`Content-Disposition`, local storage), else from the object-storage
    /// URL it redirected to, once GitLab confirmed it serves that version under that name.
    async fn resolve_latest(
        &self,
        p: &Project<'_>,
        cred: Option<&HeaderValue>,
    ) -> std::result::Result<Latest, FillError> {
        let resp = self
            .upstream
            .open(&p.base, cred)
            .await
            .map_err(|_| FillError::Upstream("upstream unreachable"))?;
        if !resp.status().is_success() {
            return Err(FillError::Refused(resp.status()));
        }
        let (name, system) = (&p.route.name, &p.route.system);
        let named = resp
            .headers()
            .get(header::CONTENT_DISPOSITION)
            .and_then(|v| v.to_str().ok())
            .and_then(|d| version_from_disposition(d, name, system));
        let version = match named {
            Some(v) => v,
            None => match self.stored_version(p, cred, resp.url()).await {
                Some(v) => v,
                None => {
                    tracing::info!(module = %p.module, "the latest tarball's version is not known: passed through, not cached");
                    return Ok(Latest::Unlisted(resp));
                }
            },
        };
        self.remember_latest(&p.module, &version).await;
        Ok(Latest::Resolved(version, resp))
    }

    /// The version of a tarball GitLab redirected to object storage (GitLab.com and most
    /// large installs send no `Content-Disposition` then), read from the stored file name,
    /// `<name>-<system>-<version>.tgz`, the redirect target's last path segment. Trusted only
    /// once GitLab confirms it: the versioned request for it must redirect to a file of the
    /// same name (a request that is not followed, so no tarball is read twice). Anything
    /// else is `None`: the caller streams the tarball through uncached, never worse than a
    /// direct `terraform init`.
    async fn stored_version(
        &self,
        p: &Project<'_>,
        cred: Option<&HeaderValue>,
        served_from: &url::Url,
    ) -> Option<String> {
        let (name, system) = (&p.route.name, &p.route.system);
        let file = last_segment(served_from)?;
        let version = version_from_file_name(&file, name, system)?;
        let check = self
            .upstream
            .registry(&format!("{}/{version}", p.base), cred)
            .await
            .ok()?;
        let confirmed = check
            .status
            .is_redirection()
            .then(|| check.headers.get(header::LOCATION)?.to_str().ok())
            .flatten()
            .and_then(|to| served_from.join(to).ok())
            .and_then(|to| last_segment(&to))
            .is_some_and(|f| f == file);
        confirmed.then_some(version)
    }

    async fn remember_latest(&self, module: &ModuleId, version: &str) {
        let key = shared_key(module, &ListingKey::Latest);
        let record = SharedListing {
            digest: String::new(),
            fetched_at: unix_now(),
            versions: vec![version.to_string()],
        };
        let _ = self.cache.records().put(KIND_SHARED, key, record).await;
    }

    async fn last_latest(&self, module: &ModuleId) -> Option<String> {
        self.shared(KIND_SHARED, module, &ListingKey::Latest)
            .await
            .and_then(|r| r.versions.into_iter().next())
    }

    fn project_unavailable(&self, p: &Project<'_>, identity: Identity) -> (Reply, Outcome) {
        let failure = self.failure_without_asking();
        let reply = reply::unavailable(&p.module, Why::NothingCached, failure);
        (reply, Outcome::new(identity, CacheStatus::Miss, None))
    }
}

/// Did a fill fail because GitLab is unreachable or failing (not for this caller alone)?
fn fill_outage(e: &FillError) -> bool {
    match e {
        FillError::Upstream(_) => true,
        FillError::Refused(s) => s.is_server_error(),
        _ => false,
    }
}

fn project_fill_error(identity: Identity, e: &FillError) -> (Reply, Outcome) {
    let status = e.status();
    let reply = Reply::registry_error(status, CacheStatus::Miss);
    let out = Outcome::new(identity, CacheStatus::Miss, Some(status.as_u16()));
    (reply, out)
}

/// What the unversioned (latest) source resolved to.
enum Latest {
    /// GitLab's latest version, with its tarball already opened.
    Resolved(String, reqwest::Response),
    /// GitLab's tarball, whose version could not be learned for sure: served, never cached.
    Unlisted(reqwest::Response),
    /// GitLab cannot be asked: the last version resolved, if any.
    Stale(Option<String>),
}

/// `attachment; filename="vpc-aws-1.2.0.tgz"` -> `1.2.0`, for module `vpc`, system `aws`.
fn version_from_disposition(disposition: &str, name: &str, system: &str) -> Option<String> {
    let file = disposition
        .split(';')
        .map(str::trim)
        .find_map(|p| p.strip_prefix("filename="))?
        .trim_matches('"');
    version_from_file_name(file, name, system)
}

/// `vpc-aws-1.2.0.tgz` -> `1.2.0`, for module `vpc`, system `aws`: the known prefix and suffix
/// stripped, never a split on `-` (names and versions contain dashes), and what remains a
/// version.
fn version_from_file_name(file: &str, name: &str, system: &str) -> Option<String> {
    let v = file
        .strip_prefix(&format!("{name}-{system}-"))?
        .strip_suffix(".tgz")?;
    semver::Version::parse(v).ok().map(|v| v.to_string())
}

/// A URL's last path segment, percent-decoded.
fn last_segment(url: &url::Url) -> Option<String> {
    let raw = url.path_segments()?.next_back()?;
    let decoded = percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .ok()?;
    Some(decoded.into_owned())
}

#[cfg(test)]
mod tests {
    use super::version_from_disposition as v;

    #[test]
    fn the_latest_version_is_read_from_gitlabs_file_name() {
        assert_eq!(
            v("attachment; filename=\"vpc-aws-1.2.0.tgz\"", "vpc", "aws").as_deref(),
            Some("1.2.0")
        );
        assert_eq!(
            v("attachment; filename=vpc-aws-1.0.0-rc.1.tgz", "vpc", "aws").as_deref(),
            Some("1.0.0-rc.1")
        );
        assert_eq!(
            v("attachment; filename=\"dns-aws-1.2.0.tgz\"", "vpc", "aws"),
            None
        );
        assert_eq!(
            v("attachment; filename=\"vpc-aws-latest.tgz\"", "vpc", "aws"),
            None
        );
        assert_eq!(v("inline", "vpc", "aws"), None);
    }

    #[test]
    fn the_version_of_a_stored_file_strips_the_known_prefix_only() {
        use super::version_from_file_name as f;
        assert_eq!(
            f("my-vpc-aws-1.2.0.tgz", "my-vpc", "aws").as_deref(),
            Some("1.2.0")
        );
        assert_eq!(
            f("my-vpc-aws-2.0.0-rc-1.tgz", "my-vpc", "aws").as_deref(),
            Some("2.0.0-rc-1")
        );
        assert_eq!(f("vpc-aws-1.2.0.tgz", "my-vpc", "aws"), None);
        assert_eq!(f("my-vpc-aws-1.2.0.zip", "my-vpc", "aws"), None);
        assert_eq!(f("2f1c9a0e", "my-vpc", "aws"), None);
        let url = url::Url::parse(
            "https://s3.example/b/p/my-vpc-aws-1.2.0%2Bbuild.5.tgz?X-Amz-Signature=s",
        )
        .unwrap();
        let file = super::last_segment(&url).unwrap();
        assert_eq!(file, "my-vpc-aws-1.2.0+build.5.tgz");
        assert_eq!(f(&file, "my-vpc", "aws").as_deref(), Some("1.2.0+build.5"));
    }
}
