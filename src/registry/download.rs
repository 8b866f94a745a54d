//! Download URLs (`:version/download`): GitLab's JWT swapped for a tfmirror token.

use std::sync::Arc;

use http::{header, HeaderValue, StatusCode};
use pingora::proxy::Session;
use pingora::Result;

use super::reply::{write_answer, write_download};
use super::{gitlab_token, is_refusal, route_label, Asked, Outcome, Registry};
use crate::access::Grant;
use crate::cache::{tarball_key, unix_now};
use crate::identity::Identity;
use crate::metrics::{self, Decision};
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

    pub(super) async fn download(
        self: &Arc<Self>,
        session: &mut Session,
        route: &ModuleRoute,
        version: &str,
        public: &PublicBase,
    ) -> Result<Outcome> {
        let cred = session
            .req_header()
            .headers
            .get(header::AUTHORIZATION)
            .cloned();
        let identity = self.secret.identify(cred.as_ref());
        let outcome = |cache, upstream_status| Outcome {
            cache,
            upstream_status,
            identity,
        };
        let grant = self.auth.grant(identity, &route.module).await;
        if let Some(g) = grant
            .as_ref()
            .filter(|g| g.is_fresh(self.auth.grant_ttl) && g.allows_version(version))
        {
            self.auth.remember_for_grant(identity, cred.as_ref(), g);
            metrics::decision(Decision::Granted);
            let get = self.x_terraform_get(public, &route.module, version, identity, cred.as_ref());
            write_download(session, CacheStatus::Hit, get).await?;
            return Ok(outcome(CacheStatus::Hit, None));
        }
        let path = route.upstream_path();
        if self.replay_refusal(session, identity, &path).await? {
            return Ok(outcome(CacheStatus::Hit, None));
        }
        let stale = self
            .stale_download(
                identity,
                cred.is_some(),
                &route.module,
                version,
                grant.as_deref(),
            )
            .await;
        let small = match self
            .ask(
                identity,
                &path,
                cred.clone(),
                stale.is_some(),
                route_label(route),
            )
            .await
        {
            Asked::Answer(small) => small,
            Asked::Failed { answer, status } => {
                return match stale {
                    Some(decision) => {
                        metrics::decision(decision);
                        metrics::STALE_SERVED.inc();
                        self.auth.remember_for_stale(identity, cred.as_ref());
                        let get = self.x_terraform_get(
                            public,
                            &route.module,
                            version,
                            identity,
                            cred.as_ref(),
                        );
                        write_download(session, CacheStatus::Stale, get).await?;
                        Ok(outcome(
                            CacheStatus::Stale,
                            answer.map(|a| a.status.as_u16()),
                        ))
                    }
                    None => {
                        self.nothing_to_serve(session, answer, status, identity)
                            .await
                    }
                };
            }
        };
        let upstream_status = Some(small.status.as_u16());
        let jwt = small
            .headers
            .get("x-terraform-get")
            .and_then(|v| v.to_str().ok())
            .and_then(gitlab_token);
        match (small.status.is_success(), jwt) {
            (true, Some(jwt)) => {
                metrics::decision(Decision::UpstreamAllowed);
                self.auth
                    .remember_gitlab_jwt(identity, &tarball_key(&route.module, version), jwt);
                let v = version.to_string();
                self.auth
                    .record_success(identity, cred.as_ref(), &route.module, move |g| {
                        if !g.versions.contains(&v) {
                            g.versions.push(v);
                        }
                    })
                    .await;
                let get =
                    self.x_terraform_get(public, &route.module, version, identity, cred.as_ref());
                write_download(session, CacheStatus::Miss, get).await?;
            }
            (true, None) => {
                // A success without a usable download URL: nothing safe to hand out.
                respond::error(session, StatusCode::BAD_GATEWAY).await?;
            }
            (false, _) => {
                if is_refusal(small.status) {
                    self.learn_refusal(identity, &route.module, &path, &small)
                        .await;
                }
                write_answer(session, &small, CacheStatus::Miss).await?;
            }
        }
        Ok(outcome(CacheStatus::Miss, upstream_status))
    }

    /// May this identity get a download URL for `version` while the upstream fails?
    pub(super) async fn stale_download(
        &self,
        identity: Identity,
        has_credential: bool,
        module: &ModuleId,
        version: &str,
        grant: Option<&Grant>,
    ) -> Option<Decision> {
        if let Some(g) = grant {
            if g.refused_at.is_some() {
                return None;
            }
            if self.grant_in_window(g) && g.allows_version(version) {
                return Some(Decision::StaleGrant);
            }
        }
        let (shared, decision) = self
            .shared_for(identity, has_credential, module, "versions")
            .await?;
        let window = (self.cfg.listing_ttl + self.cfg.stale_if_error).as_secs();
        let listed = shared.versions.iter().any(|v| v == version);
        (listed && unix_now().saturating_sub(shared.fetched_at) <= window).then_some(decision)
    }
}
