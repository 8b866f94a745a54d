//! A provider mirror without a process: a real cache in a temporary directory, and a stub
//! [`Transport`] that answers GETs from a script by URL and counts them. The registry's own
//! logic (discovery, parsing, fetch rules, breakers) runs as it does in production.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::StreamExt;
use http::{Method, StatusCode};
use url::Url;

use super::mirror::Call;
use super::route::ProviderRoute;
use super::upstream::{Transport, UpError};
use super::Providers;
use crate::cache::artifact::Sink;
use crate::cache::Cache;
use crate::config::Config;
use crate::respond::{CacheStatus, Reply};
use crate::rewrite::PublicBase;
use crate::routes::Route;

pub(crate) const HOST: &str = "registry.example";
const REGISTRY: &str = "https://registry.example";
const RELEASES: &str = "https://releases.example/fake/1.0.0";
/// The one version and platform the stub registry publishes.
pub(crate) const ZIP_NAME: &str = "terraform-provider-fake_1.0.0_linux_amd64.zip";

/// One scripted answer.
#[derive(Clone, Debug)]
pub(crate) enum Step {
    Answer(StatusCode, Bytes),
    /// A 200 whose body comes in these chunks, a moment apart (as a package streams).
    Chunks(Vec<Bytes>),
    /// Nothing answered (connection refused).
    Unreachable,
}

/// A network that follows a script, per URL: each GET takes the next step, the last one
/// repeats. Unscripted URLs are unreachable.
#[derive(Default)]
pub(crate) struct Stub {
    script: Mutex<HashMap<String, Vec<Step>>>,
    calls: Mutex<HashMap<String, usize>>,
}

impl Stub {
    pub(crate) fn on(&self, url: &str, steps: &[Step]) {
        let mut script = self.script.lock().unwrap();
        script.insert(url.to_string(), steps.to_vec());
    }

    /// How often `url` was asked for.
    pub(crate) fn calls(&self, url: &str) -> usize {
        self.calls.lock().unwrap().get(url).copied().unwrap_or(0)
    }

    /// How many GETs were sent in all.
    pub(crate) fn total(&self) -> usize {
        self.calls.lock().unwrap().values().sum()
    }
}

#[async_trait::async_trait]
impl Transport for Stub {
    async fn get(&self, url: &Url) -> Result<reqwest::Response, UpError> {
        let k = url.to_string();
        *self.calls.lock().unwrap().entry(k.clone()).or_default() += 1;
        let step = match self.script.lock().unwrap().get_mut(&k) {
            Some(steps) if steps.len() > 1 => steps.remove(0),
            Some(steps) => steps[0].clone(),
            None => Step::Unreachable,
        };
        match step {
            Step::Unreachable => Err(UpError::Transport { timeout: false }),
            Step::Answer(status, body) => Ok(response(status, vec![body])),
            Step::Chunks(chunks) => Ok(response(StatusCode::OK, chunks)),
        }
    }
}

/// A response with `Content-Length` (a body without a verifiable end is never kept), its
/// body streamed chunk by chunk.
fn response(status: StatusCode, chunks: Vec<Bytes>) -> reqwest::Response {
    let len: usize = chunks.iter().map(Bytes::len).sum();
    let body = futures::stream::iter(chunks).then(|c| async move {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        Ok::<_, std::io::Error>(c)
    });
    let mut resp = http::Response::new(reqwest::Body::wrap_stream(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(http::header::CONTENT_LENGTH, len.into());
    reqwest::Response::from(resp)
}

pub(crate) fn ok(body: impl Into<Bytes>) -> Step {
    Step::Answer(StatusCode::OK, body.into())
}

/// The URLs of the provider `ns/fake` on the stub registry.
pub(crate) fn versions_url() -> String {
    format!("{REGISTRY}/v1/providers/ns/fake/versions")
}

pub(crate) fn download_url() -> String {
    format!("{REGISTRY}/v1/providers/ns/fake/1.0.0/download/linux/amd64")
}

pub(crate) fn zip_url() -> String {
    format!("{RELEASES}/{ZIP_NAME}")
}

pub(crate) fn sums_url() -> String {
    format!("{RELEASES}/SHA256SUMS")
}

/// A provider mirror over the stub and a cache in a temporary directory.
pub(crate) struct Fixture {
    pub providers: Arc<Providers>,
    pub stub: Arc<Stub>,
    _dir: tempfile::TempDir,
}

/// The fixture with the stub registry configured, its settings changed by `tune`.
pub(crate) fn fixture_with(tune: impl FnOnce(&mut Config)) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config {
        cache_dir: dir.path().to_path_buf(),
        ..Config::default()
    };
    let base = Url::parse(&format!("{REGISTRY}/")).unwrap();
    config.providers.upstreams = Some([(HOST.to_string(), base)].into());
    tune(&mut config);
    let cache = Arc::new(Cache::open(dir.path(), 1 << 20, 1 << 24, &config.limits).expect("cache"));
    let stub = Arc::new(Stub::default());
    let providers = Providers::with_transport(&config, cache, stub.clone());
    stub.on(
        &format!("{REGISTRY}/.well-known/terraform.json"),
        &[ok(r#"{"providers.v1":"/v1/providers/"}"#)],
    );
    Fixture {
        providers: Arc::new(providers),
        stub,
        _dir: dir,
    }
}

/// Script the registry to publish version 1.0.0 for linux_amd64: its list, its download
/// answer (naming `keys`), and a `SHA256SUMS` that lists `zip` (not scripted here: the
/// package's URL is the test's to script).
pub(crate) fn publish(stub: &Stub, zip: &[u8], keys: &[&str]) {
    let sha = super::verify::to_hex(&super::verify::sha256(zip));
    stub.on(
        &versions_url(),
        &[ok(r#"{"versions":[{"version":"1.0.0","protocols":["5.0"],
            "platforms":[{"os":"linux","arch":"amd64"}]}]}"#)],
    );
    let keys: Vec<_> = keys
        .iter()
        .map(|k| serde_json::json!({ "key_id": "K", "ascii_armor": k }))
        .collect();
    let answer = serde_json::json!({
        "protocols": ["5.0"], "os": "linux", "arch": "amd64",
        "filename": ZIP_NAME,
        "download_url": zip_url(),
        "shasums_url": sums_url(),
        "shasums_signature_url": format!("{RELEASES}/SHA256SUMS.sig"),
        "shasum": sha,
        "signing_keys": { "gpg_public_keys": keys },
    });
    stub.on(&download_url(), &[ok(answer.to_string())]);
    stub.on(&sums_url(), &[ok(format!("{sha}  {ZIP_NAME}\n"))]);
    stub.on(
        &format!("{RELEASES}/SHA256SUMS.sig"),
        &[ok("not a signature")],
    );
}

/// The mirror route `tail` of `ns/fake` (`index.json`, `1.0.0/linux_amd64.zip`...).
pub(crate) fn route(tail: &str) -> ProviderRoute {
    let path = format!("/providers/mirror/{HOST}/ns/fake/{tail}");
    match crate::routes::parse(&Method::GET, &path) {
        Ok(Route::Provider(p)) => p,
        other => panic!("{path} is no provider route: {other:?}"),
    }
}

impl Fixture {
    /// Ask the mirror, as the edge does, without writing.
    pub(crate) async fn ask(&self, call: Call, tail: &str) -> (Reply, CacheStatus) {
        let public = PublicBase::from_request("http", "tfmirror.test".parse().unwrap());
        self.providers
            .answer(&call, &route(tail), &public)
            .await
            .expect("no cache error")
    }
}

pub(crate) const GET: Call = Call {
    head: false,
    sink: Sink::Stream,
};
pub(crate) const HEAD: Call = Call {
    head: true,
    sink: Sink::Stream,
};

/// A reply's body as a client reads it: the bytes, and whether it was cut.
pub(crate) async fn read(reply: Reply) -> (Vec<u8>, bool) {
    reply.body.read_all().await
}
