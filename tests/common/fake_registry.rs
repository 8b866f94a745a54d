//! A faithful fake Terraform provider registry, over HTTPS, for the provider mirror tests.
//!
//! - Service discovery (`/.well-known/terraform.json` -> `providers.v1`), `versions` and
//!   `:version/download/:os/:arch` answers in the provider registry protocol's shapes.
//! - Packages, `SHA256SUMS` and `SHA256SUMS.sig` are served from a second listener, a separate
//!   "release host" as real registries point to, named by absolute URLs in the download answer.
//! - Zips hold `terraform-provider-<type>_v<version>`, as real provider packages do.
//! - `SHA256SUMS` is signed (detached, binary) with an OpenPGP key generated for the test run
//!   with rpgp; the answer's `signing_keys` carries its armored public half.
//! - Faults: latency, 500s, down (connections refused), a tampered zip (bytes differ from the
//!   signed sums), an unsized zip (no `Content-Length`), a bad signature (made by another
//!   key), no signing keys.
//! - `modules.v1` too: version lists and download answers whose `X-Terraform-Get` names a
//!   tarball on the release host.
//! - Every request is counted by path. Connections are not kept alive, so a fault applies to
//!   the very next request.
// Shared with the benches, which use part of it.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use bytes::Bytes;
use pgp::composed::{
    ArmorOptions, DetachedSignature, KeyType, SecretKeyParamsBuilder, SignedPublicKey,
    SignedSecretKey,
};
use pgp::crypto::hash::HashAlgorithm;
use pgp::types::Password;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;

/// Faults the registry (both listeners) injects.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Added before every answer.
    pub latency: Duration,
    /// Every request answers 500.
    pub fail_500: bool,
    /// Every request answers 429 with this `Retry-After` (seconds), as a registry
    /// throttling tfmirror's address does.
    pub rate_limited: Option<u64>,
    /// Connections are dropped at once (as a registry that is down).
    pub down: bool,
    /// Zips are served with a flipped byte; `SHA256SUMS` still lists the original.
    pub tampered_zip: bool,
    /// Zips are streamed without a `Content-Length` (chunked), in paced pieces.
    pub unsized_zip: bool,
    /// `SHA256SUMS.sig` is made by another key than the one the registry names.
    pub bad_signature: bool,
    /// The download answer names no signing key.
    pub no_signing_keys: bool,
}

struct Provider {
    /// version -> platforms (`os_arch`)
    versions: BTreeMap<String, Vec<String>>,
    /// Extra bytes padded into each zip (to make large packages).
    padding: usize,
}

struct Inner {
    providers: Mutex<BTreeMap<(String, String), Provider>>,
    /// (namespace, name, system) -> versions
    modules: Mutex<BTreeMap<(String, String, String), Vec<String>>>,
    zips: Mutex<HashMap<String, Bytes>>,
    hits: Mutex<HashMap<String, usize>>,
    faults: Mutex<Faults>,
    key: SignedSecretKey,
    other_key: SignedSecretKey,
    armored_public: String,
    api_url: String,
    releases_url: String,
}

pub struct FakeRegistry {
    inner: Arc<Inner>,
    pub addr: SocketAddr,
    pub releases_addr: SocketAddr,
}

/// An Ed25519 signing key generated for this test run.
fn generate_key(uid: &str) -> SignedSecretKey {
    let mut rng = rand::thread_rng();
    let params = SecretKeyParamsBuilder::default()
        .key_type(KeyType::Ed25519Legacy)
        .can_certify(true)
        .can_sign(true)
        .primary_user_id(uid.into())
        .build()
        .unwrap();
    params
        .generate(&mut rng)
        .unwrap()
        .sign(&mut rng, &Password::empty())
        .unwrap()
}

fn sign(key: &SignedSecretKey, data: &[u8]) -> Vec<u8> {
    use pgp::ser::Serialize;
    let sig = DetachedSignature::sign_binary_data(
        rand::thread_rng(),
        &key.primary_key,
        &Password::empty(),
        HashAlgorithm::Sha256,
        data,
    )
    .unwrap();
    sig.to_bytes().unwrap()
}

/// A provider package: a zip holding `terraform-provider-<type>_v<version>`, executable.
pub fn package_zip(name: &str, version: &str, platform: &str, padding: usize) -> Bytes {
    use std::io::Write;
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .unix_permissions(0o755);
    w.start_file(format!("terraform-provider-{name}_v{version}"), opts)
        .unwrap();
    writeln!(
        w,
        "#!/bin/sh\n# fake provider {name} {version} for {platform}\nexit 1"
    )
    .unwrap();
    if padding > 0 {
        // Incompressible-looking filler, so sizes are what they say whatever the transport.
        let mut x: u64 = 0x9E3779B97F4A7C15;
        let mut buf = Vec::with_capacity(padding);
        while buf.len() < padding {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            buf.extend_from_slice(&x.to_le_bytes());
        }
        buf.truncate(padding);
        w.start_file("padding.bin", opts).unwrap();
        w.write_all(&buf).unwrap();
    }
    Bytes::from(w.finish().unwrap().into_inner())
}

pub fn sha256_hex(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl FakeRegistry {
    /// Start over TLS with the given certificate chain and key (PEM).
    pub async fn start(cert_pem: &str, key_pem: &str) -> FakeRegistry {
        let acceptor = super::fake_gitlab::acceptor(cert_pem, key_pem);

        let api = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let releases = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (addr, releases_addr) = (api.local_addr().unwrap(), releases.local_addr().unwrap());
        let key = generate_key("Fake Registry <registry@example.test>");
        let armored_public = SignedPublicKey::from(key.clone())
            .to_armored_string(ArmorOptions::default())
            .unwrap();
        let inner = Arc::new(Inner {
            providers: Mutex::new(BTreeMap::new()),
            modules: Mutex::new(BTreeMap::new()),
            zips: Mutex::new(HashMap::new()),
            hits: Mutex::new(HashMap::new()),
            faults: Mutex::new(Faults::default()),
            other_key: generate_key("Somebody Else <other@example.test>"),
            key,
            armored_public,
            api_url: format!("https://{addr}"),
            releases_url: format!("https://{releases_addr}"),
        });
        let api_app = Router::new()
            .route("/.well-known/terraform.json", get(discovery))
            .route("/v1/providers/{ns}/{name}/versions", get(versions))
            .route(
                "/v1/providers/{ns}/{name}/{version}/download/{os}/{arch}",
                get(download),
            )
            .route(
                "/v1/modules/{ns}/{name}/{system}/versions",
                get(module_versions),
            )
            .route(
                "/v1/modules/{ns}/{name}/{system}/{version}/download",
                get(module_download),
            )
            .with_state(inner.clone());
        let releases_app = Router::new()
            .route("/{ns}/{name}/{version}/{file}", get(release_file))
            .route("/modules/{ns}/{name}/{system}/{file}", get(module_file))
            .with_state(inner.clone());
        tokio::spawn(accept_loop(api, api_app, inner.clone(), acceptor.clone()));
        tokio::spawn(accept_loop(releases, releases_app, inner.clone(), acceptor));
        FakeRegistry {
            inner,
            addr,
            releases_addr,
        }
    }

    /// Base URL of the registry (what `providers.upstreams` maps a hostname to).
    pub fn url(&self) -> String {
        self.inner.api_url.clone()
    }

    pub fn armored_public_key(&self) -> String {
        self.inner.armored_public.clone()
    }

    /// Publish `namespace/name` at `versions`, each for `platforms` (`os_arch`).
    pub fn add_provider(&self, ns: &str, name: &str, versions: &[&str], platforms: &[&str]) {
        self.add_provider_sized(ns, name, versions, platforms, 0);
    }

    /// As [`add_provider`], with `padding` filler bytes in every zip.
    pub fn add_provider_sized(
        &self,
        ns: &str,
        name: &str,
        versions: &[&str],
        platforms: &[&str],
        padding: usize,
    ) {
        let mut ps = self.inner.providers.lock().unwrap();
        let p = ps
            .entry((ns.to_string(), name.to_string()))
            .or_insert_with(|| Provider {
                versions: BTreeMap::new(),
                padding,
            });
        p.padding = padding;
        for v in versions {
            p.versions.insert(
                v.to_string(),
                platforms.iter().map(|s| s.to_string()).collect(),
            );
        }
    }

    /// Publish the module `namespace/name/system` at `versions` (`modules.v1`).
    pub fn add_module(&self, ns: &str, name: &str, system: &str, versions: &[&str]) {
        self.inner.modules.lock().unwrap().insert(
            (ns.into(), name.into(), system.into()),
            versions.iter().map(|v| v.to_string()).collect(),
        );
    }

    /// The exact zip bytes the registry publishes for a package.
    pub fn zip(&self, ns: &str, name: &str, version: &str, platform: &str) -> Bytes {
        self.inner.zip(ns, name, version, platform)
    }

    pub fn set_faults(&self, f: Faults) {
        *self.inner.faults.lock().unwrap() = f;
    }

    pub fn faults(&self) -> Faults {
        self.inner.faults.lock().unwrap().clone()
    }

    /// Requests received for exactly `path`.
    pub fn hits(&self, path: &str) -> usize {
        self.inner
            .hits
            .lock()
            .unwrap()
            .get(path)
            .copied()
            .unwrap_or(0)
    }

    /// Requests received for any path containing `part`.
    pub fn hits_matching(&self, part: &str) -> usize {
        self.inner
            .hits
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p.contains(part))
            .map(|(_, n)| n)
            .sum()
    }

    pub fn total_hits(&self) -> usize {
        self.inner.hits.lock().unwrap().values().sum()
    }

    /// Path of a package zip on the release host.
    pub fn zip_path(ns: &str, name: &str, version: &str, platform: &str) -> String {
        format!("/{ns}/{name}/{version}/terraform-provider-{name}_{version}_{platform}.zip")
    }
}

impl Inner {
    fn zip(&self, ns: &str, name: &str, version: &str, platform: &str) -> Bytes {
        let key = format!("{ns}/{name}/{version}/{platform}");
        if let Some(z) = self.zips.lock().unwrap().get(&key) {
            return z.clone();
        }
        let padding = self
            .providers
            .lock()
            .unwrap()
            .get(&(ns.to_string(), name.to_string()))
            .map_or(0, |p| p.padding);
        let z = package_zip(name, version, platform, padding);
        self.zips.lock().unwrap().insert(key, z.clone());
        z
    }

    fn platforms(&self, ns: &str, name: &str, version: &str) -> Option<Vec<String>> {
        self.providers
            .lock()
            .unwrap()
            .get(&(ns.to_string(), name.to_string()))?
            .versions
            .get(version)
            .cloned()
    }

    fn sums(&self, ns: &str, name: &str, version: &str) -> Option<String> {
        let platforms = self.platforms(ns, name, version)?;
        let mut doc = String::new();
        for pl in &platforms {
            let z = self.zip(ns, name, version, pl);
            doc.push_str(&format!(
                "{}  terraform-provider-{name}_{version}_{pl}.zip\n",
                sha256_hex(&z)
            ));
        }
        // Real releases also list a manifest, which is not a package.
        doc.push_str(&format!(
            "{}  terraform-provider-{name}_{version}_manifest.json\n",
            sha256_hex(b"{}")
        ));
        Some(doc)
    }
}

async fn accept_loop(
    listener: TcpListener,
    app: Router,
    inner: Arc<Inner>,
    tls: tokio_rustls::TlsAcceptor,
) {
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            continue;
        };
        if inner.faults.lock().unwrap().down {
            let _ = sock.set_zero_linger();
            drop(sock);
            continue;
        }
        let (app, tls) = (app.clone(), tls.clone());
        tokio::spawn(async move {
            let Ok(stream) = tls.accept(sock).await else {
                return;
            };
            let io = hyper_util::rt::TokioIo::new(stream);
            let svc = hyper_util::service::TowerToHyperService::new(app);
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.keep_alive(false);
            let _ = builder.serve_connection(io, svc).await;
        });
    }
}

/// Count the request and apply latency, 429s and 500s. Some(response) ends the request.
async fn enter(inner: &Inner, path: String) -> Option<Response> {
    *inner.hits.lock().unwrap().entry(path).or_default() += 1;
    let f = inner.faults.lock().unwrap().clone();
    if !f.latency.is_zero() {
        tokio::time::sleep(f.latency).await;
    }
    if let Some(secs) = f.rate_limited {
        let headers = [(http::header::RETRY_AFTER, secs.to_string())];
        return Some((StatusCode::TOO_MANY_REQUESTS, headers, "slow down").into_response());
    }
    f.fail_500
        .then(|| (StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response())
}

async fn discovery(State(inner): State<Arc<Inner>>) -> Response {
    if let Some(r) = enter(&inner, "/.well-known/terraform.json".into()).await {
        return r;
    }
    Json(serde_json::json!({ "providers.v1": "/v1/providers/", "modules.v1": "/v1/modules/" }))
        .into_response()
}

async fn versions(
    State(inner): State<Arc<Inner>>,
    Path((ns, name)): Path<(String, String)>,
) -> Response {
    if let Some(r) = enter(&inner, format!("/v1/providers/{ns}/{name}/versions")).await {
        return r;
    }
    let ps = inner.providers.lock().unwrap();
    let Some(p) = ps.get(&(ns.clone(), name.clone())) else {
        return (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({"errors": ["Not Found"]})),
        )
            .into_response();
    };
    let versions: Vec<serde_json::Value> = p
        .versions
        .iter()
        .map(|(v, platforms)| {
            let platforms: Vec<serde_json::Value> = platforms
                .iter()
                .map(|pl| {
                    let (os, arch) = pl.split_once('_').unwrap();
                    serde_json::json!({ "os": os, "arch": arch })
                })
                .collect();
            serde_json::json!({ "version": v, "protocols": ["5.0"], "platforms": platforms })
        })
        .collect();
    Json(
        serde_json::json!({ "id": format!("{ns}/{name}"), "versions": versions, "warnings": null }),
    )
    .into_response()
}

async fn download(
    State(inner): State<Arc<Inner>>,
    Path((ns, name, version, os, arch)): Path<(String, String, String, String, String)>,
) -> Response {
    let path = format!("/v1/providers/{ns}/{name}/{version}/download/{os}/{arch}");
    if let Some(r) = enter(&inner, path).await {
        return r;
    }
    let platform = format!("{os}_{arch}");
    let listed = inner
        .platforms(&ns, &name, &version)
        .is_some_and(|p| p.contains(&platform));
    if !listed {
        return (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({"errors": ["Not Found"]})),
        )
            .into_response();
    }
    let zip = inner.zip(&ns, &name, &version, &platform);
    let filename = format!("terraform-provider-{name}_{version}_{platform}.zip");
    let base = format!("{}/{ns}/{name}/{version}", inner.releases_url);
    let sums = format!("terraform-provider-{name}_{version}_SHA256SUMS");
    let keys = if inner.faults.lock().unwrap().no_signing_keys {
        vec![]
    } else {
        vec![serde_json::json!({
            "key_id": "",
            "ascii_armor": inner.armored_public,
            "trust_signature": "",
            "source": "Fake",
            "source_url": null
        })]
    };
    Json(serde_json::json!({
        "protocols": ["5.0"],
        "os": os,
        "arch": arch,
        "filename": filename,
        "download_url": format!("{base}/{filename}"),
        "shasums_url": format!("{base}/{sums}"),
        "shasums_signature_url": format!("{base}/{sums}.sig"),
        "shasum": sha256_hex(&zip),
        "signing_keys": { "gpg_public_keys": keys },
    }))
    .into_response()
}

async fn release_file(
    State(inner): State<Arc<Inner>>,
    Path((ns, name, version, file)): Path<(String, String, String, String)>,
) -> Response {
    let path = format!("/{ns}/{name}/{version}/{file}");
    if let Some(r) = enter(&inner, path).await {
        return r;
    }
    let faults = inner.faults.lock().unwrap().clone();
    let sums_name = format!("terraform-provider-{name}_{version}_SHA256SUMS");
    let not_found = || (StatusCode::NOT_FOUND, "not found").into_response();
    if file == sums_name {
        return inner
            .sums(&ns, &name, &version)
            .map_or_else(not_found, |d| d.into_response());
    }
    if file == format!("{sums_name}.sig") {
        let Some(doc) = inner.sums(&ns, &name, &version) else {
            return not_found();
        };
        let key = if faults.bad_signature {
            &inner.other_key
        } else {
            &inner.key
        };
        return sign(key, doc.as_bytes()).into_response();
    }
    let prefix = format!("terraform-provider-{name}_{version}_");
    let Some(platform) = file
        .strip_prefix(&prefix)
        .and_then(|r| r.strip_suffix(".zip"))
    else {
        return not_found();
    };
    if !inner
        .platforms(&ns, &name, &version)
        .is_some_and(|p| p.iter().any(|x| x == platform))
    {
        return not_found();
    }
    let mut zip = inner.zip(&ns, &name, &version, platform).to_vec();
    if faults.tampered_zip {
        let mid = zip.len() / 2;
        zip[mid] ^= 0xff;
    }
    if faults.unsized_zip {
        return unsized_body(zip);
    }
    ([(axum::http::header::CONTENT_TYPE, "application/zip")], zip).into_response()
}

/// `bytes` as a body of unknown length, in pieces a little apart, as a registry that
/// generates or proxies its packages sends them: whoever reads it learns its end only there.
fn unsized_body(bytes: Vec<u8>) -> Response {
    use futures::StreamExt;
    let pieces: Vec<Bytes> = bytes.chunks(64 << 10).map(Bytes::copy_from_slice).collect();
    let stream = futures::stream::iter(pieces).then(|p| async move {
        tokio::time::sleep(Duration::from_millis(2)).await;
        Ok::<_, std::io::Error>(p)
    });
    (
        [(axum::http::header::CONTENT_TYPE, "application/zip")],
        axum::body::Body::from_stream(stream),
    )
        .into_response()
}

async fn module_versions(
    State(inner): State<Arc<Inner>>,
    Path((ns, name, system)): Path<(String, String, String)>,
) -> Response {
    if let Some(r) = enter(&inner, format!("/v1/modules/{ns}/{name}/{system}/versions")).await {
        return r;
    }
    let modules = inner.modules.lock().unwrap();
    let Some(versions) = modules.get(&(ns.clone(), name.clone(), system.clone())) else {
        return (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({"errors": ["Not Found"]})),
        )
            .into_response();
    };
    let versions: Vec<serde_json::Value> = versions
        .iter()
        .map(|v| serde_json::json!({ "version": v, "submodules": [], "root": {} }))
        .collect();
    Json(serde_json::json!({
        "modules": [{ "source": format!("{ns}/{name}/{system}"), "versions": versions }]
    }))
    .into_response()
}

async fn module_download(
    State(inner): State<Arc<Inner>>,
    Path((ns, name, system, version)): Path<(String, String, String, String)>,
) -> Response {
    let path = format!("/v1/modules/{ns}/{name}/{system}/{version}/download");
    if let Some(r) = enter(&inner, path).await {
        return r;
    }
    let listed = inner
        .modules
        .lock()
        .unwrap()
        .get(&(ns.clone(), name.clone(), system.clone()))
        .is_some_and(|v| v.contains(&version));
    if !listed {
        return (StatusCode::NOT_FOUND, "not found").into_response();
    }
    let get = format!(
        "{}/modules/{ns}/{name}/{system}/{version}.tar.gz",
        inner.releases_url
    );
    (StatusCode::NO_CONTENT, [("x-terraform-get", get)]).into_response()
}

async fn module_file(
    State(inner): State<Arc<Inner>>,
    Path((ns, name, system, file)): Path<(String, String, String, String)>,
) -> Response {
    if let Some(r) = enter(&inner, format!("/modules/{ns}/{name}/{system}/{file}")).await {
        return r;
    }
    let Some(version) = file.strip_suffix(".tar.gz") else {
        return (StatusCode::NOT_FOUND, "not found").into_response();
    };
    let tgz = super::fake_gitlab::module_tarball(&format!("{ns}/{name}/{system}"), version, 0);
    (
        [(axum::http::header::CONTENT_TYPE, "application/gzip")],
        tgz,
    )
        .into_response()
}
