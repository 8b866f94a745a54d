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

use bytes::Bytes;
use futures::StreamExt;
use http::{header, Method, StatusCode};
use pingora::proxy::Session;
use pingora::{Error, ErrorType, Result};

use super::route::ProviderId;
use super::route::{Platform, ProviderOp, ProviderRoute, MIRROR_PREFIX};
use super::{archive_key, Failed, Found, Providers};
use crate::cache::blobs::Hash;
use crate::cache::body::{hold_last, Body};
use crate::cache::verified::VerifiedBlob;
use crate::metrics;
use crate::respond::{self, CacheStatus, Reply};
use crate::rewrite::PublicBase;

const JSON: &str = "application/json";
const ZIP: &str = "application/zip";
const STALE_WARNING: &str = "110 - \"Response is Stale\"";

/// The `{"versions":{...}}` body of `index.json`.
pub fn index_body(versions: &[super::upstream::VersionInfo]) -> String {
    let map: serde_json::Map<String, serde_json::Value> = versions
        .iter()
        .map(|v| (v.version.clone(), serde_json::json!({})))
        .collect();
    serde_json::json!({ "versions": map }).to_string()
}

/// The `{"archives":{...}}` body of `<version>.json`.
pub fn version_body(version: &str, sums: &super::SumsRecord) -> String {
    let map: serde_json::Map<String, serde_json::Value> = sums
        .archives
        .iter()
        .map(|(platform, pkg)| {
            (
                platform.clone(),
                serde_json::json!({
                    "url": format!("{version}/{platform}.zip"),
                    "hashes": [format!("zh:{}", pkg.sha256)],
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

/// Write a found value as JSON (its body made by `body`), or the failure's status. Returns
/// what the cache did.
async fn json_or_error<T>(
    session: &mut Session,
    found: std::result::Result<Found<T>, Failed>,
    body: impl FnOnce(T) -> String,
) -> Result<CacheStatus> {
    match found {
        Ok(f) => {
            write_json(session, f.cache, f.age, body(f.value)).await?;
            Ok(f.cache)
        }
        Err(Failed { status, cache }) => {
            write_error(session, status, cache).await?;
            Ok(cache)
        }
    }
}

impl Providers {
    /// Answer a provider route. Returns what the cache did, for the access log.
    pub async fn handle(
        self: &Arc<Self>,
        session: &mut Session,
        route: &ProviderRoute,
        public: &PublicBase,
    ) -> Result<CacheStatus> {
        let p = &route.provider;
        if !self.registries.knows(&p.host) {
            write_error(session, StatusCode::NOT_FOUND, CacheStatus::Bypass).await?;
            return Ok(CacheStatus::Bypass);
        }
        match &route.op {
            ProviderOp::Index => {
                let found = self.versions(p).await;
                json_or_error(session, found, |r| index_body(&r.versions)).await
            }
            ProviderOp::Version(v) => {
                let version = v.to_string();
                let found = self.sums(p, &version).await;
                json_or_error(session, found, |r| version_body(&version, &r)).await
            }
            ProviderOp::Sums(v) => self.serve_sums_file(session, p, v, false).await,
            ProviderOp::SumsSignature(v) => self.serve_sums_file(session, p, v, true).await,
            ProviderOp::RegistryVersions => {
                let found = self.versions(p).await;
                json_or_error(session, found, |r| {
                    serde_json::json!({
                        "id": format!("{}/{}", p.namespace, p.name),
                        "versions": r.versions,
                        "warnings": null,
                    })
                    .to_string()
                })
                .await
            }
            ProviderOp::RegistryDownload(v, platform) => {
                let version = v.to_string();
                let base = format!(
                    "{}{}{MIRROR_PREFIX}{p}/{version}",
                    public.origin, public.prefix
                );
                let found = self.download_answer(p, &version, platform).await;
                json_or_error(session, found, |r| {
                    rewrite_download(r.answer, &base, platform)
                })
                .await
            }
            ProviderOp::ModuleVersions(system) => {
                let listing = super::Listing::Module(p.clone(), system.clone());
                let found = self.listing(&listing).await;
                json_or_error(session, found, |r| {
                    r.module_listing.clone().unwrap_or_default().to_string()
                })
                .await
            }
            ProviderOp::ModuleDownload(system, v) => {
                self.serve_module_download(session, p, system, v).await
            }
            ProviderOp::Archive(v, platform) => self.serve_archive(session, p, v, platform).await,
        }
    }

    /// `SHA256SUMS` or its signature, the exact bytes that were verified.
    async fn serve_sums_file(
        self: &Arc<Self>,
        session: &mut Session,
        p: &ProviderId,
        v: &semver::Version,
        sig: bool,
    ) -> Result<CacheStatus> {
        let sums = match self.sums(p, &v.to_string()).await {
            Ok(f) => f,
            Err(Failed { status, cache }) => {
                write_error(session, status, cache).await?;
                return Ok(cache);
            }
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
            write_error(session, StatusCode::NOT_FOUND, sums.cache).await?;
            return Ok(sums.cache);
        };
        let content_type = if sig {
            "application/octet-stream"
        } else {
            "text/plain; charset=utf-8"
        };
        let reply = Reply::full(StatusCode::OK, bytes)
            .with(header::CONTENT_TYPE, content_type)
            .cache(sums.cache);
        respond::write(session, reply).await?;
        Ok(sums.cache)
    }

    /// A public module's download answer: 204 with `X-Terraform-Get`.
    async fn serve_module_download(
        self: &Arc<Self>,
        session: &mut Session,
        p: &ProviderId,
        system: &str,
        v: &semver::Version,
    ) -> Result<CacheStatus> {
        match self.module_download(p, system, &v.to_string()).await {
            Ok(f) => {
                let get = http::HeaderName::from_static("x-terraform-get");
                let reply = Reply::full(StatusCode::NO_CONTENT, Bytes::new())
                    .with_text(get, &f.value.location)
                    .cache(f.cache);
                respond::write(session, reply).await?;
                Ok(f.cache)
            }
            Err(Failed { status, cache }) => {
                write_error(session, status, cache).await?;
                Ok(cache)
            }
        }
    }

    /// A package: from the blob store, or from its (single) fill.
    async fn serve_archive(
        self: &Arc<Self>,
        session: &mut Session,
        p: &ProviderId,
        v: &semver::Version,
        platform: &Platform,
    ) -> Result<CacheStatus> {
        let version = v.to_string();
        let key = archive_key(p, &version, platform);
        let head = session.req_header().method == Method::HEAD;
        if let Some(entry) = self.cached_archive(&key).await {
            if let Some(hash) = entry.hash() {
                if self.serve_blob(session, &key, hash, entry.size).await? {
                    return Ok(CacheStatus::Hit);
                }
            }
            self.cache.drop_tarball(&key).await;
        }
        if head {
            // The length is unknown until a GET fills it: say nothing rather than 0.
            let empty = futures::stream::empty().boxed();
            respond::write(session, zip(CacheStatus::Miss, None, empty)).await?;
            return Ok(CacheStatus::Miss);
        }
        let sums = match self.sums(p, &version).await {
            Ok(f) => f.value,
            Err(Failed { status, cache }) => {
                write_error(session, status, cache).await?;
                return Ok(cache);
            }
        };
        let failed = match sums.archives.get(&platform.to_string()) {
            None => Some((StatusCode::NOT_FOUND, CacheStatus::Miss)),
            Some(_) if !self.registries.available(&p.host) => {
                let f = self.unavailable();
                Some((f.status, f.cache))
            }
            Some(pkg) => match self.start_archive_fill(p, &version, platform, pkg) {
                Ok((fill, leader)) => {
                    if !leader {
                        metrics::COALESCED_WAITS.inc();
                    }
                    serve_fill(session, &fill).await?;
                    None
                }
                Err(e) => {
                    metrics::CACHE_WRITE_ERRORS.inc();
                    tracing::error!(error = %e, "cannot write to the cache; provider package not served");
                    Some((StatusCode::SERVICE_UNAVAILABLE, CacheStatus::Miss))
                }
            },
        };
        match failed {
            Some((status, cache)) => {
                write_error(session, status, cache).await?;
                Ok(cache)
            }
            None => Ok(CacheStatus::Miss),
        }
    }

    /// Serve a committed package, verified as it is read. False when it is gone or corrupt
    /// before the first byte (nothing written). Large blobs are streamed with the last chunk
    /// held back until the hash checks out: a corrupt blob never reaches a client whole.
    async fn serve_blob(
        &self,
        session: &mut Session,
        key: &str,
        hash: Hash,
        size: u64,
    ) -> Result<bool> {
        if size <= self.cache.memory_max_object() {
            let Some(bytes) = self.cache.get_small(hash).await.ok().flatten() else {
                return Ok(false);
            };
            let reply = Reply::full(StatusCode::OK, bytes)
                .with(header::CONTENT_TYPE, ZIP)
                .cache(CacheStatus::Hit);
            respond::write(session, reply).await?;
            return Ok(true);
        }
        let opened = VerifiedBlob::open(&self.cache, key, hash, "provider package")
            .await
            .map_err(|e| Error::because(ErrorType::InternalError, "blob open", e))?;
        let Some(blob) = opened else {
            return Ok(false);
        };
        let len = Some(blob.len());
        respond::write(session, zip(CacheStatus::Hit, len, blob.into_body())).await?;
        Ok(true)
    }
}

/// Stream a fill to the client. The last chunk is held back until the fill is committed,
/// which happens only once the zip's sha256 matched the signed one: a package that fails
/// verification is cut short, never delivered whole.
async fn serve_fill(session: &mut Session, fill: &crate::cache::fill::Fill) -> Result<()> {
    let len = match fill.started().await {
        Ok(len) => len,
        Err(e) => return write_error(session, e.status(), CacheStatus::Miss).await,
    };
    respond::write(session, zip(CacheStatus::Miss, len, hold_last(fill.body()))).await
}

/// A package answer streamed from the store or its fill; the writer frames an unknown
/// length so that a cut shows (without it, pingora would delimit the body by closing the
/// connection, and a package cut for failing verification would look whole).
fn zip(cache: CacheStatus, len: Option<u64>, body: Body) -> Reply {
    let chunks = body.map(|c| c.map_err(Into::into)).boxed();
    Reply::stream(len, chunks)
        .with(header::CONTENT_TYPE, ZIP)
        .cache(cache)
}

async fn write_json(
    session: &mut Session,
    cache: CacheStatus,
    age: u64,
    body: String,
) -> Result<()> {
    let mut reply = Reply::full(StatusCode::OK, body)
        .with(header::CONTENT_TYPE, JSON)
        .cache(cache)
        .with_value(header::AGE, http::HeaderValue::from(age));
    if cache == CacheStatus::Stale {
        reply = reply.with(header::WARNING, STALE_WARNING);
    }
    respond::write(session, reply).await
}

async fn write_error(session: &mut Session, status: StatusCode, cache: CacheStatus) -> Result<()> {
    let reply = Reply::full(status, respond::message_body(status))
        .with(header::CONTENT_TYPE, JSON)
        .cache(cache);
    respond::write(session, reply).await
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
    }
}
