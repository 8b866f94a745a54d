//! Download URLs (`:version/download`): GitLab's JWT swapped for a tfmirror token.

use std::sync::Arc;

use http::{HeaderValue, StatusCode};
use pingora::proxy::Session;
use pingora::Result;

use super::ask::Asked;
use super::decide::{count, Fallback};
use super::reply::{authorization, write_answer, write_download};
use super::{gitlab_token, route_label, Lesson, Outcome, Registry};
use crate::access::policy::{Action, Kind};
use crate::cache::records::tarball_key;
use crate::clock::now as unix_now;
use crate::identity::Identity;
use crate::respond::{self, CacheStatus};
use crate::rewrite::PublicBase;
use crate::routes::{ModuleId, ModuleRoute, MODULES_V1};
use crate::token::Authority;

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
            self.auth
                .gitlab_jwt(identity, &tarball_key(module, version)),
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
            public.prefix, module.namespace, module.name, module.system
        )
    }

    #[allow(clippy::too_many_lines)] // TODO(issue 15): split with the policy rewrite
    pub(super) async fn download(
        self: &Arc<Self>,
        session: &mut Session,
        route: &ModuleRoute,
        version: &str,
        public: &PublicBase,
    ) -> Result<Outcome> {
        let cred = authorization(session);
        let identity = self.secret.identify(cred.as_ref());
        let module = &route.module;
        let outcome = |cache, upstream_status| Outcome {
            cache,
            upstream_status,
            identity,
        };
        let grant = self.auth.grant(identity, module).await;
        let path = route.upstream_path();
        // The caller's "own answer" for a download: its grant, if its current listing shows
        // this version.
        let own = grant
            .as_ref()
            .filter(|g| g.allows_version(version))
            .map(|g| g.checked_at);
        let mut facts = self.facts(
            unix_now(),
            Kind::Download,
            identity,
            cred.is_some(),
            module,
            grant.as_deref(),
            own,
            &path,
        );
        let fallback = Fallback::Version {
            module,
            version: Some(version),
        };
        let (action, _) = self.decide(&mut facts, &fallback).await;
        count(action, identity, module, None);
        match action {
            Action::Fresh | Action::Revalidate => {
                if let Some(g) = &grant {
                    self.auth.remember_for_grant(identity, cred.as_ref(), g);
                }
                let get = self.x_terraform_get(public, module, version, identity, cred.as_ref());
                write_download(session, CacheStatus::Hit, get).await?;
                return Ok(outcome(CacheStatus::Hit, None));
            }
            Action::Stale(_) => {
                return self
                    .stale_download(
                        session,
                        public,
                        module,
                        version,
                        identity,
                        cred.as_ref(),
                        None,
                    )
                    .await;
            }
            other => {
                if let Some(cache) = self
                    .answer_alike(session, other, identity, module, &path, None)
                    .await?
                {
                    return Ok(outcome(cache, None));
                }
            }
        }

        let lesson = Lesson::Download {
            module: module.clone(),
            version: version.to_string(),
            path: path.clone(),
        };
        let asked = self
            .ask(
                identity,
                &path,
                cred.clone(),
                lesson.clone(),
                route_label(route),
            )
            .await;
        facts.gitlab = asked.gitlab(&lesson);
        let (action, _) = self.decide(&mut facts, &fallback).await;
        count(action, identity, module, asked.failure());
        let upstream_status = asked.upstream_status();
        match (action, asked) {
            (Action::Stale(_), _) => {
                self.stale_download(
                    session,
                    public,
                    module,
                    version,
                    identity,
                    cred.as_ref(),
                    upstream_status,
                )
                .await
            }
            (Action::Relay, Asked::Answer { small, .. }) => {
                let usable = small.status.is_success()
                    && small
                        .headers
                        .get("x-terraform-get")
                        .and_then(|v| v.to_str().ok())
                        .and_then(gitlab_token)
                        .is_some();
                if usable {
                    let get =
                        self.x_terraform_get(public, module, version, identity, cred.as_ref());
                    write_download(session, CacheStatus::Miss, get).await?;
                } else if small.status.is_success() {
                    // A success without a usable download URL: nothing safe to hand out.
                    respond::registry_error(session, StatusCode::BAD_GATEWAY, CacheStatus::Miss)
                        .await?;
                } else {
                    write_answer(session, &small, CacheStatus::Miss).await?;
                }
                Ok(outcome(CacheStatus::Miss, upstream_status))
            }
            (action, asked) => {
                self.answer_failed(session, action, asked, identity, module, &path)
                    .await?;
                Ok(outcome(CacheStatus::Miss, upstream_status))
            }
        }
    }

    /// A download URL handed out while GitLab fails. The caller's credential is kept for one
    /// grant lifetime: the URL may need a fill, and only GitLab, asked with it, allows that.
    #[allow(clippy::too_many_arguments)]
    async fn stale_download(
        &self,
        session: &mut Session,
        public: &PublicBase,
        module: &ModuleId,
        version: &str,
        identity: Identity,
        cred: Option<&HeaderValue>,
        upstream_status: Option<u16>,
    ) -> Result<Outcome> {
        self.auth.remember_for_stale(identity, cred);
        let get = self.x_terraform_get(public, module, version, identity, cred);
        write_download(session, CacheStatus::Stale, get).await?;
        Ok(Outcome {
            cache: CacheStatus::Stale,
            upstream_status,
            identity,
        })
    }
}
