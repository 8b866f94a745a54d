//! Warming the cache before an outage (`tfmirror warm` / `sync`).

use std::sync::Arc;

use futures::FutureExt;
use http::{HeaderValue, StatusCode};

use super::{download_jwt, Registry};
use crate::cache::records::{tarball_key, ListingKey};
use crate::identity::Identity;
use crate::respond::listed_versions;
use crate::routes::{ModuleId, ModuleOp, ModuleRoute};
use crate::token::Authority;

impl Registry {
    /// Fill the cache for `module` on behalf of the holder of `cred`, before an outage:
    /// its versions listing (recording the holder's grant) and the tarball of every listed
    /// version matching `constraint`. Returns the versions now cached.
    pub async fn warm_module(
        self: &Arc<Self>,
        cred: Option<HeaderValue>,
        module: &ModuleId,
        constraint: &crate::constraint::Constraint,
    ) -> std::result::Result<Vec<String>, String> {
        let identity = self.secret.identify(cred.as_ref());
        let wanted = self
            .warm_listing(identity, cred.as_ref(), module, constraint)
            .await?;
        let mut warmed = Vec::new();
        for version in wanted {
            warmed.push(
                self.warm_version(identity, cred.as_ref(), module, version)
                    .await?,
            );
        }
        Ok(warmed)
    }

    /// Fetch and learn the versions listing of `module`; the listed versions that match
    /// `constraint`, oldest first.
    async fn warm_listing(
        &self,
        identity: Identity,
        cred: Option<&HeaderValue>,
        module: &ModuleId,
        constraint: &crate::constraint::Constraint,
    ) -> std::result::Result<Vec<semver::Version>, String> {
        let path = ModuleRoute {
            module: module.clone(),
            op: ModuleOp::Versions,
        }
        .upstream_path();
        let sent_ms = crate::clock::now_ms();
        let small = self
            .upstream
            .registry(&path, cred)
            .await
            .map_err(|e| format!("{module}: GitLab unreachable ({})", e.etype().as_str()))?;
        if small.status != StatusCode::OK {
            return Err(format!("{module}: GitLab answered {}", small.status));
        }
        self.absorb_listing(
            identity,
            cred,
            module,
            &ListingKey::Versions,
            &small.body,
            None,
            sent_ms,
        )
        .await;
        let mut wanted: Vec<semver::Version> = listed_versions(&small.body)
            .iter()
            .filter_map(|v| semver::Version::parse(v).ok())
            .filter(|v| constraint.matches(v))
            .collect();
        wanted.sort();
        Ok(wanted)
    }

    /// Ask for the download URL of `version` (recording the holder's grant and GitLab's
    /// JWT), then fill its tarball unless it is cached. Returns the version.
    async fn warm_version(
        self: &Arc<Self>,
        identity: Identity,
        cred: Option<&HeaderValue>,
        module: &ModuleId,
        version: semver::Version,
    ) -> std::result::Result<String, String> {
        let v = version.to_string();
        let path = ModuleRoute {
            module: module.clone(),
            op: ModuleOp::Download(version),
        }
        .upstream_path();
        let sent_ms = crate::clock::now_ms();
        let dl =
            self.upstream.registry(&path, cred).await.map_err(|e| {
                format!("{module}@{v}: GitLab unreachable ({})", e.etype().as_str())
            })?;
        let jwt = download_jwt(&dl)
            .filter(|_| dl.status.is_success())
            .ok_or_else(|| format!("{module}@{v}: GitLab answered {}", dl.status))?;
        let key = tarball_key(module, &v);
        self.auth.remember_gitlab_jwt(identity, &key, jwt);
        let recorded = v.clone();
        // Warmed to be served while GitLab is down: kept on disk, whatever it is like.
        let update = move |g: &mut crate::cache::records::Grant| g.add_version(&recorded);
        self.auth
            .record_success(identity, cred, module, sent_ms, false, update)
            .await;
        let cached = match self.cache.tarball(&key).await.and_then(|e| e.hash()) {
            Some(h) => self.cache.has_blob(&h),
            None => false,
        };
        if !cached {
            self.warm_tarball(identity, module, &v, &key).await?;
        }
        Ok(v)
    }

    /// Fill the tarball of `module@version` (index key `key`) and wait for its commit.
    async fn warm_tarball(
        self: &Arc<Self>,
        identity: Identity,
        module: &ModuleId,
        version: &str,
        key: &str,
    ) -> std::result::Result<(), String> {
        let this = self.clone();
        let (m, ver) = (module.clone(), version.to_string());
        let open = move || {
            async move {
                this.open_tarball(identity, &Authority::None, &m, &ver)
                    .await
            }
            .boxed()
        };
        let (fill, _) = self
            .start_fill(key, open)
            .map_err(|e| format!("{key}: {e}"))?;
        fill.finished().await.map_err(|e| format!("{key}: {e:?}"))?;
        Ok(())
    }
}
