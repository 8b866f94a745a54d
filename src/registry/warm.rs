//! Warming the cache before an outage (`tfmirror warm` / `sync`).

use std::sync::Arc;

use futures::FutureExt;
use http::{HeaderValue, StatusCode};

use super::{gitlab_token, listed_versions, Registry};
use crate::cache::records::tarball_key;
use crate::routes::{ModuleId, ModuleOp, ModuleRoute};
use crate::token::Authority;

impl Registry {
    /// Fill the cache for `module` on behalf of the holder of `cred`, before an outage:
    /// its versions listing (recording the holder's grant) and the tarball of every listed
    /// version matching `constraint`. Returns the versions now cached.
    #[allow(clippy::too_many_lines)] // TODO(issue 15): split with the policy rewrite
    pub async fn warm_module(
        self: &Arc<Self>,
        cred: Option<HeaderValue>,
        module: &ModuleId,
        constraint: &crate::constraint::Constraint,
    ) -> std::result::Result<Vec<String>, String> {
        let identity = self.secret.identify(cred.as_ref());
        let route = |op| ModuleRoute {
            module: module.clone(),
            op,
        };
        let path = route(ModuleOp::Versions).upstream_path();
        let small = self
            .upstream
            .registry(&path, cred.as_ref())
            .await
            .map_err(|e| format!("{module}: GitLab unreachable ({})", e.etype().as_str()))?;
        if small.status != StatusCode::OK {
            return Err(format!("{module}: GitLab answered {}", small.status));
        }
        self.absorb_listing(
            identity,
            cred.as_ref(),
            module,
            "versions",
            &small.body,
            None,
        )
        .await;
        let mut wanted: Vec<semver::Version> = listed_versions(&small.body)
            .iter()
            .filter_map(|v| semver::Version::parse(v).ok())
            .filter(|v| constraint.matches(v))
            .collect();
        wanted.sort();
        let mut warmed = Vec::new();
        for version in wanted {
            let v = version.to_string();
            let dl = self
                .upstream
                .registry(
                    &route(ModuleOp::Download(version)).upstream_path(),
                    cred.as_ref(),
                )
                .await
                .map_err(|e| {
                    format!("{module}@{v}: GitLab unreachable ({})", e.etype().as_str())
                })?;
            let jwt = dl
                .headers
                .get("x-terraform-get")
                .and_then(|h| h.to_str().ok())
                .and_then(gitlab_token)
                .filter(|_| dl.status.is_success())
                .ok_or_else(|| format!("{module}@{v}: GitLab answered {}", dl.status))?;
            let key = tarball_key(module, &v);
            self.auth.remember_gitlab_jwt(identity, &key, jwt);
            let recorded = v.clone();
            self.auth
                .record_success(identity, cred.as_ref(), module, move |g| {
                    if !g.versions.contains(&recorded) {
                        g.versions.push(recorded);
                    }
                })
                .await;
            let cached = match self.cache.tarball(&key).await.and_then(|e| e.hash()) {
                Some(h) => self.cache.blobs.path(&h).exists(),
                None => false,
            };
            if !cached {
                let this = self.clone();
                let (m, ver) = (module.clone(), v.clone());
                let open = move || {
                    async move {
                        this.open_tarball(identity, &Authority::None, &m, &ver)
                            .await
                    }
                    .boxed()
                };
                let (fill, _) = self
                    .start_fill(&key, open)
                    .map_err(|e| format!("{key}: {e}"))?;
                fill.finished().await.map_err(|e| format!("{key}: {e:?}"))?;
            }
            warmed.push(v);
        }
        Ok(warmed)
    }
}
