//! Terraform's provider network mirror protocol, answered from [`super::Providers`]:
//!
//! - `index.json`: `{"versions":{"1.2.3":{}}}`;
//! - `<version>.json`: `{"archives":{"linux_amd64":{"url":"1.2.3/linux_amd64.zip",
//!   "hashes":["zh:<sha256>"]}}}`, the hashes taken from the verified `SHA256SUMS`, so lock
//!   files made directly against the registry still verify. URLs are relative: Terraform
//!   resolves them against the `<version>.json` URL, so no public URL is needed;
//! - the archive itself, from the blob store or its (single) fill.
//!
//! Every answer carries `X-Cache-Status`.

use std::sync::Arc;

use futures::StreamExt;
use http::StatusCode;
use pingora::{Error, ErrorType, Result};

use super::reply;
use super::route::ProviderId;
use super::route::{Platform, ProviderOp, ProviderRoute, MIRROR_PREFIX};
use super::{archive_key, Failed, Providers};
use crate::cache::artifact::Sink;
use crate::cache::blobs::Hash;
use crate::cache::body::{hold_last, BodyError};
use crate::cache::fill::FillError;
use crate::metrics;
use crate::respond::{CacheStatus, Reply};
use crate::rewrite::PublicBase;

/// The `{"versions":{...}}` body of `index.json`.
pub fn index_body(versions: &[super::upstream::VersionInfo]) -> String {
    let map: serde_json::Map<String, serde_json::Value> = versions
        .iter()
        .map(|v| (v.version.clone(), serde_json::json!({})))
        .collect();
    serde_json::json!({ "versions": map }).to_string()
}

/// The `{"archives":{...}}` body of `<version>.json`. A package imported from a
/// `terraform providers mirror` directory lists its `h1:` first, as that directory did.
pub fn version_body(version: &str, sums: &super::SumsRecord) -> String {
    let map: serde_json::Map<String, serde_json::Value> = sums
        .archives
        .iter()
        .map(|(platform, pkg)| {
            let hashes: Vec<String> = pkg
                .h1
                .iter()
                .cloned()
                .chain([super::verify::zh(&pkg.sha256)])
                .collect();
            (
                platform.clone(),
                serde_json::json!({
                    "url": format!("{version}/{platform}.zip"),
                    "hashes": hashes,
                }),
            )
        })
        .collect();
    serde_json::json!({ "archives": map }).to_string()
}

/// A registry download answer with its three URLs moved onto tfmirror (`base` is the
/// version's directory in the mirror tree). Everything else, `shasum` and `signing_keys`
/// included, stays as the registry sent it, so Terraform verifies the signature itself and
/// records the same hashes as when installing directly.
pub fn rewrite_download(mut answer: serde_json::Value, base: &str, platform: &Platform) -> String {
    answer["download_url"] = format!("{base}/{platform}.zip").into();
    answer["shasums_url"] = format!("{base}/SHA256SUMS").into();
    answer["shasums_signature_url"] = format!("{base}/SHA256SUMS.sig").into();
    answer.to_string()
}

/// What the provider mirror reads of a request: whether it is a HEAD, and nothing else of
/// pingora's session (no credential: registries are asked anonymously), so that every answer
/// is decided in a unit test without one.
#[derive(Debug, Clone, Copy, Default)]
pub struct Call {
    /// `HEAD`: answered like GET without a body, and never starts a package fill (Terraform's
    /// HEAD is answered from what is cached; the GET does the work).
    pub head: bool,
    /// How the connection takes a large cached package (the edge says; streamed by default).
    pub sink: crate::cache::artifact::Sink,
}

impl Call {
    pub fn of(req: &pingora::http::RequestHeader) -> Call {
        Call {
            head: req.method == http::Method::HEAD,
            sink: crate::cache::artifact::Sink::Stream,
        }
    }
}

impl Providers {
    /// The answer to a provider route, as a value, with what the cache did. Errors only when
    /// a committed package cannot be opened.
    pub async fn answer(
        self: &Arc<Self>,
        call: &Call,
        route: &ProviderRoute,
        public: &PublicBase,
    ) -> Result<(Reply, CacheStatus)> {
        let p = &route.provider;
        if !self.registries.knows(&p.host) {
            return Ok(reply::failed(Failed::new(
                StatusCode::NOT_FOUND,
                CacheStatus::Bypass,
            )));
        }
        let answered = match &route.op {
            ProviderOp::Index => reply::found(self.versions(p).await, |r| index_body(&r.versions)),
            ProviderOp::Version(v) => {
                let version = v.to_string();
                let found = self.sums(p, &version).await;
                reply::found(found, |r| version_body(&version, &r))
            }
            ProviderOp::Sums(v) => self.serve_sums_file(p, v, false).await,
            ProviderOp::SumsSignature(v) => self.serve_sums_file(p, v, true).await,
            ProviderOp::RegistryVersions => {
                reply::found(self.versions(p).await, |r| registry_versions_body(p, &r))
            }
            ProviderOp::RegistryDownload(v, platform) => {
                let version = v.to_string();
                let base = format!(
                    "{}{}{MIRROR_PREFIX}{p}/{version}",
                    public.origin(),
                    public.prefix()
                );
                let found = self.download_answer(p, &version, platform).await;
                reply::found(found, |r| rewrite_download(r.answer, &base, platform))
            }
            ProviderOp::ModuleVersions(system) => {
                let listing = super::Listing::Module(p.clone(), system.clone());
                reply::found(self.listing(&listing).await, |r| {
                    r.module_listing.clone().unwrap_or_default().to_string()
                })
            }
            ProviderOp::ModuleDownload(system, v) => self.serve_module_download(p, system, v).await,
            ProviderOp::Archive(v, platform) => self.serve_archive(call, p, v, platform).await?,
        };
        Ok(answered)
    }

    /// `SHA256SUMS` or its signature, the exact bytes that were verified.
    async fn serve_sums_file(
        self: &Arc<Self>,
        p: &ProviderId,
        v: &semver::Version,
        sig: bool,
    ) -> (Reply, CacheStatus) {
        let sums = match self.sums(p, &v.to_string()).await {
            Ok(f) => f,
            Err(f) => return reply::failed(f),
        };
        let blob = if sig {
            &sums.value.signature
        } else {
            &sums.value.document
        };
        let bytes = match blob.as_deref().and_then(|h| Hash::from_hex(h).ok()) {
            Some(h) => self.cache.get_small(h).await.ok().flatten(),
            None => None,
        };
        let Some(bytes) = bytes else {
            // Unsigned (allowed) versions have no signature; a lost blob is a 404 until the
            // checksums are purged and fetched again.
            return reply::failed(Failed::new(StatusCode::NOT_FOUND, sums.cache));
        };
        (reply::sums_file(sums.cache, bytes, sig), sums.cache)
    }

    /// A public module's download answer: 204 with `X-Terraform-Get`.
    async fn serve_module_download(
        self: &Arc<Self>,
        p: &ProviderId,
        system: &str,
        v: &semver::Version,
    ) -> (Reply, CacheStatus) {
        match self.module_download(p, system, &v.to_string()).await {
            Ok(f) => (reply::module_download(f.cache, &f.value.location), f.cache),
            Err(f) => reply::failed(f),
        }
    }

    /// A package: from the blob store, or from its (single) fill. A HEAD never starts one.
    async fn serve_archive(
        self: &Arc<Self>,
        call: &Call,
        p: &ProviderId,
        v: &semver::Version,
        platform: &Platform,
    ) -> Result<(Reply, CacheStatus)> {
        let version = v.to_string();
        let key = archive_key(p, &version, platform);
        if let Some(entry) = self.cached_archive(&key).await {
            if let Some(hash) = entry.hash() {
                if let Some(hit) = self.serve_blob(&key, hash, entry.size, call.sink).await? {
                    return Ok((hit, CacheStatus::Hit));
                }
            }
            // Gone or damaged (`Cache::artifact` dropped its record): fill again, now.
        }
        if call.head {
            // The length is unknown until a GET fills it: say nothing rather than 0.
            let empty = futures::stream::empty().boxed();
            return Ok((
                reply::zip(CacheStatus::Miss, None, empty),
                CacheStatus::Miss,
            ));
        }
        let sums = match self.sums_for(p, &version, Some(platform)).await {
            Ok(f) => f.value,
            Err(f) => return Ok(reply::failed(f)),
        };
        let Some(pkg) = sums.archives.get(&platform.to_string()) else {
            return Ok(reply::failed(Failed::new(
                StatusCode::NOT_FOUND,
                CacheStatus::Miss,
            )));
        };
        if !self.registries.available(&p.host) {
            return Ok(reply::failed(self.unavailable()));
        }
        match self.start_archive_fill(p, &version, platform, pkg) {
            Ok((fill, leader)) => {
                if !leader {
                    metrics::COALESCED_WAITS.inc();
                }
                match fill.started().await {
                    Ok(len) => {
                        let body = hold_last(fill.body());
                        Ok((reply::zip(CacheStatus::Miss, len, body), CacheStatus::Miss))
                    }
                    Err(FillError::NoRoom) => {
                        metrics::CACHE_WRITE_ERRORS.inc();
                        tracing::error!("the cache disk has no room for this provider package; serving it without caching");
                        Ok(self.pass_through(p, &version, platform, pkg).await)
                    }
                    Err(e) => Ok(reply::failed(Failed::new(e.status(), CacheStatus::Miss))),
                }
            }
            Err(e) => {
                // No temp file (disk full, read-only): serve without caching, as tarballs are.
                metrics::CACHE_WRITE_ERRORS.inc();
                tracing::error!(error = %e, "cannot write to the cache; serving the provider package without caching");
                Ok(self.pass_through(p, &version, platform, pkg).await)
            }
        }
    }

    /// A package streamed straight from the registry, uncached (the cache cannot take it):
    /// still checked against the signed sha256 as it streams, its last chunk held back until
    /// that matched, so a package that fails arrives cut, never whole.
    async fn pass_through(
        self: &Arc<Self>,
        p: &ProviderId,
        version: &str,
        platform: &Platform,
        pkg: &super::Package,
    ) -> (Reply, CacheStatus) {
        match self.open_archive(p, version, platform, pkg).await {
            Ok(source) => {
                let len = source.declared_len();
                let body = source.body.map(|c| c.map_err(body_failed)).boxed();
                let reply = reply::zip(CacheStatus::Bypass, len, hold_last(body));
                (reply, CacheStatus::Bypass)
            }
            Err(e) => reply::failed(Failed::new(e.status(), CacheStatus::Bypass)),
        }
    }

    /// A committed package, verified as it is read. None when it is gone or corrupt before
    /// the first byte. Large blobs are streamed with the last chunk held back until the hash
    /// checks out: a corrupt blob never reaches a client whole.
    async fn serve_blob(
        &self,
        key: &str,
        hash: Hash,
        size: u64,
        sink: Sink,
    ) -> Result<Option<Reply>> {
        let found = self
            .cache
            .artifact(key, hash, size, "provider package", sink)
            .await
            .map_err(|e| Error::because(ErrorType::InternalError, "blob open", e))?;
        Ok(found.map(|artifact| reply::zip_cached(CacheStatus::Hit, artifact)))
    }
}

/// The registry protocol's `versions` answer for `p`.
fn registry_versions_body(p: &ProviderId, r: &super::VersionsRecord) -> String {
    serde_json::json!({
        "id": format!("{}/{}", p.namespace, p.name),
        "versions": r.versions,
        "warnings": null,
    })
    .to_string()
}

/// An upstream body's failure as a cut body: the client sees the cut, never a short body.
fn body_failed(why: &'static str) -> BodyError {
    BodyError::Fill(FillError::Upstream(why))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn download_answers_point_at_tfmirror_and_keep_the_rest() {
        let answer = serde_json::json!({
            "protocols": ["5.0"], "os": "linux", "arch": "amd64",
            "filename": "terraform-provider-x_1.0.0_linux_amd64.zip",
            "download_url": "https://releases.example/x.zip",
            "shasums_url": "https://releases.example/SUMS",
            "shasums_signature_url": "https://releases.example/SUMS.sig",
            "shasum": "ab", "signing_keys": {"gpg_public_keys": [{"key_id": "K", "ascii_armor": "A"}]},
        });
        let base = "https://m.example/providers/mirror/r.io/h/x/1.0.0";
        let out: serde_json::Value = serde_json::from_str(&rewrite_download(
            answer.clone(),
            base,
            &Platform::parse("linux_amd64").unwrap(),
        ))
        .unwrap();
        assert_eq!(out["download_url"], format!("{base}/linux_amd64.zip"));
        assert_eq!(out["shasums_url"], format!("{base}/SHA256SUMS"));
        assert_eq!(
            out["shasums_signature_url"],
            format!("{base}/SHA256SUMS.sig")
        );
        for k in [
            "protocols",
            "os",
            "arch",
            "filename",
            "shasum",
            "signing_keys",
        ] {
            assert_eq!(out[k], answer[k], "{k}");
        }
    }

    #[test]
    fn protocol_shapes() {
        let versions = vec![super::super::upstream::VersionInfo {
            version: "1.2.3".into(),
            protocols: vec!["5.0".into()],
            platforms: vec![],
        }];
        let v: serde_json::Value = serde_json::from_str(&index_body(&versions)).unwrap();
        assert_eq!(v, serde_json::json!({"versions": {"1.2.3": {}}}));
        let sums = super::super::SumsRecord {
            archives: BTreeMap::from([(
                "linux_amd64".to_string(),
                super::super::Package {
                    filename: "terraform-provider-x_1.2.3_linux_amd64.zip".into(),
                    sha256: "ab".repeat(32),
                    h1: None,
                },
            )]),
            signed_by: Some("k".into()),
            fetched_at: 0,
            document: None,
            signature: None,
        };
        let v: serde_json::Value = serde_json::from_str(&version_body("1.2.3", &sums)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"archives": {"linux_amd64": {
                "url": "1.2.3/linux_amd64.zip",
                "hashes": [format!("zh:{}", "ab".repeat(32))],
            }}})
        );
        // A package with an h1 (imported from a mirror directory): h1 first, then zh.
        let mut with_h1 = sums;
        with_h1.archives.get_mut("linux_amd64").unwrap().h1 = Some("h1:abc=".into());
        let v: serde_json::Value = serde_json::from_str(&version_body("1.2.3", &with_h1)).unwrap();
        assert_eq!(
            v["archives"]["linux_amd64"]["hashes"],
            serde_json::json!(["h1:abc=", format!("zh:{}", "ab".repeat(32))])
        );
    }
}
