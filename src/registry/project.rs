//! Project routes (`/api/v4/projects/:id/packages/terraform/modules/...`).

use std::sync::Arc;

use futures::FutureExt;
use http::{header, StatusCode};
use pingora::proxy::Session;
use pingora::Result;

use super::{is_refusal, source, Asked, Outcome, Registry, JSON};
use crate::cache::fill::FillError;
use crate::cache::project_tarball_key;
use crate::fetch;
use crate::metrics::{self, Decision};
use crate::respond::{self, CacheStatus, HeaderValueLike as V};
use crate::routes::{ModuleId, ProjectOp, ProjectRoute};

impl Registry {
    /// A project-route tarball (`GET PP[/:version]`, Basic auth). GitLab stays the authority:
    /// an identity without a fresh grant is checked with `?terraform-get=1`, a 204 that costs
    /// GitLab no bytes; the bytes then come from the cache, shared with every other route.
    pub async fn project_download(
        self: &Arc<Self>,
        session: &mut Session,
        p: &ProjectRoute,
    ) -> Result<Outcome> {
        let cred = session
            .req_header()
            .headers
            .get(header::AUTHORIZATION)
            .cloned();
        let identity = self.secret.identify(cred.as_ref());
        let grant_of = ModuleId {
            namespace: format!("project:{}", p.project),
            name: p.name.clone(),
            system: p.system.clone(),
        };
        // Validated parts only; the project path's slashes are re-encoded as GitLab wants.
        let base = format!(
            "/api/v4/projects/{}/packages/terraform/modules/{}/{}",
            p.project.replace('/', "%2F"),
            p.name,
            p.system
        );
        let requested = match &p.op {
            ProjectOp::Download { version } => version.as_ref().map(ToString::to_string),
            ProjectOp::Upload { .. } => None,
        };
        let grant = self.auth.grant(identity, &grant_of).await;
        let fresh = match (&grant, &requested) {
            (Some(g), Some(v)) if g.is_fresh(self.auth.grant_ttl) && g.allows_version(v) => {
                self.auth.remember_for_grant(identity, cred.as_ref(), g);
                true
            }
            _ => false,
        };
        let version = if fresh {
            requested.expect("fresh implies a version")
        } else {
            let check = match &requested {
                Some(v) => format!("{base}/{v}?terraform-get=1"),
                None => format!("{base}?terraform-get=1"),
            };
            // While GitLab fails, an identity it authorized before keeps its versions.
            let stale_ok = match (&grant, &requested) {
                (Some(g), Some(v)) => {
                    g.refused_at.is_none() && self.grant_in_window(g) && g.allows_version(v)
                }
                _ => false,
            };
            let small = match self
                .ask(identity, &check, cred.clone(), stale_ok, "project_download")
                .await
            {
                Asked::Answer(small) => small,
                Asked::Failed { answer, status } => {
                    if !stale_ok {
                        return self
                            .nothing_to_serve(session, answer, status, identity)
                            .await;
                    }
                    metrics::decision(Decision::StaleGrant);
                    metrics::STALE_SERVED.inc();
                    let version = requested.expect("stale implies a version");
                    let key = project_tarball_key(&p.project, &p.name, &p.system, &version);
                    // Offline, nothing can be filled: cached bytes or an error.
                    let open = || async { Err(FillError::Upstream("upstream down")) }.boxed();
                    let mut out = self.serve_tarball(session, &key, identity, open).await?;
                    if out.cache == CacheStatus::Hit {
                        out.cache = CacheStatus::Stale;
                    }
                    return Ok(out);
                }
            };
            // The version is the last path segment of GitLab's absolute X-Terraform-Get.
            let granted = small
                .headers
                .get("x-terraform-get")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split('?').next())
                .and_then(|v| v.rsplit('/').next())
                .and_then(|v| semver::Version::parse(v).ok());
            match (small.status.is_success(), granted) {
                (true, Some(v)) => {
                    let version = v.to_string();
                    let recorded = version.clone();
                    self.auth
                        .record_success(identity, cred.as_ref(), &grant_of, move |g| {
                            if !g.versions.contains(&recorded) {
                                g.versions.push(recorded);
                            }
                        })
                        .await;
                    version
                }
                (true, None) => {
                    respond::error(session, StatusCode::BAD_GATEWAY).await?;
                    return Ok(Outcome {
                        cache: CacheStatus::Miss,
                        upstream_status: Some(small.status.as_u16()),
                        identity,
                    });
                }
                (false, _) => {
                    if is_refusal(small.status) {
                        self.learn_refusal(identity, &grant_of, &check, &small)
                            .await;
                    }
                    let mut headers = vec![
                        (header::CONTENT_TYPE, V::Static(JSON)),
                        (respond::CACHE_STATUS, V::Static("MISS")),
                    ];
                    if let Some(w) = small.headers.get(header::WWW_AUTHENTICATE) {
                        headers.push((header::WWW_AUTHENTICATE, V::Value(w.clone())));
                    }
                    respond::full(session, small.status, &headers, small.body.clone()).await?;
                    return Ok(Outcome {
                        cache: CacheStatus::Miss,
                        upstream_status: Some(small.status.as_u16()),
                        identity,
                    });
                }
            }
        };
        let key = project_tarball_key(&p.project, &p.name, &p.system, &version);
        let upstream = self.upstream.clone();
        let path = format!("{base}/{version}");
        let open = move || {
            let (upstream, path, cred) = (upstream.clone(), path.clone(), cred.clone());
            async move { source(fetch::open(&upstream, &path, cred.as_ref()).await) }.boxed()
        };
        self.serve_tarball(session, &key, identity, open).await
    }
}
