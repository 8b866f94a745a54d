//! Download URLs (`:version/download`): GitLab's JWT swapped for a tfmirror token.

use std::sync::Arc;

use http::{HeaderValue, StatusCode};

use super::ask::Asked;
use super::decide::{count, Fallback};
use super::reply;
use super::{download_jwt, route_label, Call, Lesson, Outcome, Registry};
use crate::access::policy::{Action, Kind};
use crate::cache::records::tarball_key;
use crate::clock::now as unix_now;
use crate::clock::Moment;
use crate::identity::Identity;
use crate::respond::{CacheStatus, Reply};
use crate::rewrite::PublicBase;
use crate::routes::{ModuleId, ModuleRoute, MODULES_V1};
use crate::token::Authority;

/// One download-URL request, its parts resolved once.
struct Request<'a> {
    route: &'a ModuleRoute,
    version: &'a str,
    public: &'a PublicBase,
    cred: Option<HeaderValue>,
    identity: Identity,
    path: String,
}

impl Request<'_> {
    fn outcome(&self, cache: CacheStatus, upstream_status: Option<u16>) -> Outcome {
        Outcome::new(self.identity, cache, upstream_status)
    }

    fn fallback(&self) -> Fallback<'_> {
        Fallback::Version {
            module: &self.route.module,
            version: Some(self.version),
        }
    }

    /// tfmirror's download URL for this caller.
    fn url(&self, registry: &Registry) -> String {
        let module = &self.route.module;
        registry.x_terraform_get(
            self.public,
            module,
            self.version,
            self.identity,
            self.cred.as_ref(),
        )
    }
}

impl Registry {
    /// A download URL whose token carries what any replica needs to fill the tarball: GitLab's
    /// JWT for it when one is at hand (one upstream call), else the caller's credential.
    pub(super) fn x_terraform_get(
        &self,
        public: &PublicBase,
        module: &ModuleId,
        version: &str,
        identity: Identity,
        credential: Option<&HeaderValue>,
    ) -> String {
        let authority = match (
            self.auth.gitlab_jwt(
                self.jwt_owner(identity, credential),
                &tarball_key(module, version),
            ),
            credential,
        ) {
            (Some(jwt), _) => Authority::GitLabJwt(jwt),
            (None, Some(c)) => Authority::Credential(c.clone()),
            (None, None) => Authority::None,
        };
        let token = self
            .tokens
            .seal(module, version, identity, &authority, unix_now());
        format!(
            "{}{MODULES_V1}{}/{}/{}/{version}/file?token={token}&archive=tgz",
            public.prefix(),
            module.namespace(),
            module.name(),
            module.system()
        )
    }

    pub(super) async fn download(
        self: &Arc<Self>,
        call: &Call,
        route: &ModuleRoute,
        version: &str,
        public: &PublicBase,
    ) -> (Reply, Outcome) {
        let (identity, cred) = match self.caller(call).await {
            Ok(caller) => caller,
            Err(finished) => return finished,
        };
        let req = Request {
            route,
            version,
            public,
            cred,
            identity,
            path: route.upstream_path(),
        };
        let module = &route.module;
        let grant = self.auth.grant(identity, module).await;
        // The caller's "own answer" for a download: its grant, if its current listing shows
        // this version.
        let own = grant
            .as_ref()
            .filter(|g| g.allows_version(version))
            .map(|g| g.checked_at);
        let (mut facts, remembered) = self.facts(
            Moment::now(),
            Kind::Download,
            identity,
            req.cred.is_some(),
            module,
            grant.as_deref(),
            own,
            &req.path,
        );
        let (action, _) = self
            .decide(&mut facts, &req.fallback(), req.cred.as_ref())
            .await;
        count(action, identity, module, None);
        match action {
            Action::Fresh | Action::Revalidate => {
                if let Some(g) = &grant {
                    self.auth.remember_for_grant(
                        identity,
                        req.cred.as_ref(),
                        remembered.as_ref(),
                        g,
                    );
                }
                let get = req.url(self);
                let reply = reply::download(CacheStatus::Hit, &get);
                return (reply, req.outcome(CacheStatus::Hit, None));
            }
            Action::Stale(_) => return self.stale_download(&req, None),
            other => {
                if let Some((reply, cache)) = self
                    .answer_alike(other, identity, module, &req.path, None)
                    .await
                {
                    return (reply, req.outcome(cache, None));
                }
            }
        }
        self.download_from_gitlab(&req, facts).await
    }

    /// Ask GitLab, then decide again with what it did.
    async fn download_from_gitlab(
        self: &Arc<Self>,
        req: &Request<'_>,
        mut facts: crate::access::policy::Facts,
    ) -> (Reply, Outcome) {
        let module = &req.route.module;
        let lesson = Lesson::Download {
            module: module.clone(),
            version: req.version.to_string(),
            path: req.path.clone(),
        };
        let label = route_label(req.route);
        let asked = self
            .ask(
                req.identity,
                &req.path,
                req.cred.clone(),
                lesson.clone(),
                label,
            )
            .await;
        self.after_asking(&mut facts, &asked, &lesson);
        let (action, _) = self
            .decide(&mut facts, &req.fallback(), req.cred.as_ref())
            .await;
        count(action, req.identity, module, asked.failure());
        let upstream_status = asked.upstream_status();
        match (action, asked) {
            (Action::Stale(_), _) => self.stale_download(req, upstream_status),
            (Action::Relay, Asked::Answer { small, learned }) => {
                // A tier's stale answer stays stale (STALE, its Age); any other is a MISS.
                let cache = match learned {
                    CacheStatus::Stale => CacheStatus::Stale,
                    _ => CacheStatus::Miss,
                };
                let usable = small.status.is_success() && download_jwt(&small).is_some();
                let reply = if usable {
                    let reply = reply::download(cache, &req.url(self));
                    reply::upstream_age(reply, &small)
                } else if small.status.is_success() {
                    // A success without a usable download URL: nothing safe to hand out.
                    Reply::registry_error(StatusCode::BAD_GATEWAY, CacheStatus::Miss)
                } else {
                    reply::answer(&small, CacheStatus::Miss)
                };
                (reply, req.outcome(cache, upstream_status))
            }
            (action, asked) => {
                let reply = self
                    .answer_failed(action, asked, req.identity, module, &req.path)
                    .await;
                (reply, req.outcome(CacheStatus::Miss, upstream_status))
            }
        }
    }

    /// A download URL handed out while GitLab fails. The caller's credential is kept for one
    /// grant lifetime: the URL may need a fill, and only GitLab, asked with it, allows that.
    fn stale_download(&self, req: &Request<'_>, upstream_status: Option<u16>) -> (Reply, Outcome) {
        self.auth
            .remember_for_stale(req.identity, req.cred.as_ref());
        let reply = reply::download(CacheStatus::Stale, &req.url(self));
        (reply, req.outcome(CacheStatus::Stale, upstream_status))
    }
}
