//! A registry without a process: a real cache in a temporary directory, and a stub GitLab
//! that answers from a script and counts what it was asked. Shared by the registry's unit
//! tests.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use pingora::{Error, ErrorType, Result};

use super::{Call, Outcome, Registry};
use crate::cache::Cache;
use crate::config::Config;
use crate::identity::Secret;
use crate::respond::Reply;
use crate::rewrite::PublicBase;
use crate::routes::{ModuleRoute, Route};
use crate::upstream::gitlab::{Fetcher, Small};
use crate::upstream::health::Health;

/// One scripted upstream behaviour.
#[derive(Clone, Debug)]
pub(crate) enum Step {
    /// Answer, after `after`.
    Answer {
        status: StatusCode,
        headers: Vec<(HeaderName, String)>,
        body: String,
        after: Duration,
    },
    /// Connection refused: nothing reached GitLab.
    Refused,
}

impl Step {
    pub(crate) fn ok(body: &str) -> Step {
        Step::status(StatusCode::OK, body)
    }

    pub(crate) fn status(status: StatusCode, body: &str) -> Step {
        Step::Answer {
            status,
            headers: Vec::new(),
            body: body.to_string(),
            after: Duration::ZERO,
        }
    }

    pub(crate) fn header(mut self, name: HeaderName, value: &str) -> Step {
        if let Step::Answer { headers, .. } = &mut self {
            headers.push((name, value.to_string()));
        }
        self
    }

    pub(crate) fn after(mut self, delay: Duration) -> Step {
        if let Step::Answer { after, .. } = &mut self {
            *after = delay;
        }
        self
    }
}

/// A GitLab that follows a script, per (path, credential): each call takes the next step,
/// the last one repeats. Unscripted paths are refused.
#[derive(Default)]
pub(crate) struct Stub {
    script: Mutex<HashMap<String, Vec<Step>>>,
    calls: Mutex<HashMap<String, usize>>,
    opens: AtomicUsize,
}

fn key(path: &str, auth: Option<&str>) -> String {
    format!("{path} {}", auth.unwrap_or("-"))
}

impl Stub {
    /// Script `path` (the upstream path and query) for the caller with `auth`.
    pub(crate) fn on(&self, path: &str, auth: Option<&str>, steps: &[Step]) {
        let mut script = self.script.lock().unwrap();
        script.insert(key(path, auth), steps.to_vec());
    }

    /// How often `path` was asked with `auth`.
    pub(crate) fn calls(&self, path: &str, auth: Option<&str>) -> usize {
        let calls = self.calls.lock().unwrap();
        calls.get(&key(path, auth)).copied().unwrap_or(0)
    }

    /// How many downloads were opened.
    pub(crate) fn opens(&self) -> usize {
        self.opens.load(Ordering::SeqCst)
    }

    fn next(&self, path: &str, auth: Option<&HeaderValue>) -> Step {
        let k = key(path, auth.and_then(|a| a.to_str().ok()));
        *self.calls.lock().unwrap().entry(k.clone()).or_default() += 1;
        let mut script = self.script.lock().unwrap();
        match script.get_mut(&k) {
            Some(steps) if steps.len() > 1 => steps.remove(0),
            Some(steps) => steps[0].clone(),
            None => Step::Refused,
        }
    }
}

async fn play(step: Step) -> Result<(StatusCode, HeaderMap, Bytes)> {
    match step {
        Step::Refused => Error::e_explain(ErrorType::ConnectRefused, "stub: refused"),
        Step::Answer {
            status,
            headers,
            body,
            after,
        } => {
            tokio::time::sleep(after).await;
            let mut map = HeaderMap::new();
            for (name, value) in headers {
                map.append(name, HeaderValue::from_str(&value).unwrap());
            }
            Ok((status, map, Bytes::from(body)))
        }
    }
}

#[async_trait::async_trait]
impl Fetcher for Stub {
    async fn registry(&self, path: &str, auth: Option<&HeaderValue>) -> Result<Small> {
        let (status, headers, body) = play(self.next(path, auth)).await?;
        Ok(Small {
            status,
            headers,
            body,
            sent_ms: 0,
        })
    }

    async fn open(&self, path: &str, auth: Option<&HeaderValue>) -> Result<reqwest::Response> {
        self.opens.fetch_add(1, Ordering::SeqCst);
        let (status, mut headers, body) = play(self.next(path, auth)).await?;
        // Framed, as GitLab frames it: an unframed body is never kept.
        headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        let mut resp = http::Response::new(body);
        *resp.status_mut() = status;
        *resp.headers_mut() = headers;
        Ok(reqwest::Response::from(resp))
    }

    async fn probe(&self, _: Duration) -> Option<(StatusCode, HeaderMap)> {
        None
    }
}

/// A registry over a stub GitLab and a cache in a temporary directory.
pub(crate) struct Fixture {
    pub registry: Arc<Registry>,
    pub health: Arc<Health>,
    pub stub: Arc<Stub>,
    pub public: PublicBase,
    _dir: tempfile::TempDir,
}

/// The fixture on default settings, changed by `tune`.
pub(crate) fn fixture_with(tune: impl FnOnce(&mut Config)) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config {
        cache_dir: dir.path().to_path_buf(),
        ..Config::default()
    };
    tune(&mut config);
    let cache = Arc::new(Cache::open(dir.path(), 1 << 20, 1 << 24, &config.limits).expect("cache"));
    let health = Arc::new(Health::new(
        config.offline.enabled,
        config.offline.breaker_threshold,
        config.offline.deadline,
    ));
    let stub = Arc::new(Stub::default());
    let registry = Arc::new(Registry::new(
        stub.clone(),
        cache,
        Secret::from_master(&[7; 32]),
        health.clone(),
        &config,
    ));
    Fixture {
        registry,
        health,
        stub,
        public: PublicBase::from_request("http", "tfmirror.test".parse().unwrap()),
        _dir: dir,
    }
}

pub(crate) fn fixture() -> Fixture {
    fixture_with(|_| {})
}

/// The namespace route of `infra/vpc/aws` with `tail` (`versions`, `1.0.0/download`...).
pub(crate) fn route(tail: &str) -> ModuleRoute {
    let path = format!("/api/v4/packages/terraform/modules/v1/infra/vpc/aws/{tail}");
    match crate::routes::parse(&Method::GET, &path) {
        Ok(Route::Module(m)) => m,
        other => panic!("{path} is no module route: {other:?}"),
    }
}

/// A GET with `Authorization: <auth>`.
pub(crate) fn call(auth: Option<&str>) -> Call {
    Call {
        authorization: auth.map(|a| HeaderValue::from_str(a).unwrap()),
        ..Call::default()
    }
}

impl Fixture {
    /// Ask the registry, as the edge does, without writing.
    pub(crate) async fn ask(&self, call: &Call, tail: &str) -> (Reply, Outcome) {
        self.registry
            .answer(call, &route(tail), &self.public)
            .await
            .expect("no cache error")
            .expect("a registry answer")
    }
}

/// The project route of module `vpc/aws` in project 1, at `version` (`""`: the unversioned,
/// latest source).
pub(crate) fn project_route(version: &str) -> crate::routes::ProjectRoute {
    let base = "/api/v4/projects/1/packages/terraform/modules/vpc/aws";
    let path = match version {
        "" => base.to_string(),
        v => format!("{base}/{v}"),
    };
    match crate::routes::parse(&Method::GET, &path) {
        Ok(Route::Project(p)) => p,
        other => panic!("{path} is no project route: {other:?}"),
    }
}

impl Fixture {
    /// Ask the registry a project route, as the edge does, without writing.
    pub(crate) async fn ask_project(&self, call: &Call, version: &str) -> (Reply, Outcome) {
        let route = project_route(version);
        self.registry
            .project_download(call, &route, call.terraform_get, &self.public)
            .await
            .expect("no cache error")
    }
}

impl Fixture {
    /// How many records of `kind` are on disk.
    pub(crate) fn records_on_disk(&self, kind: &str) -> usize {
        fn count(dir: &std::path::Path) -> usize {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return 0;
            };
            entries
                .flatten()
                .map(|e| match e.file_type() {
                    Ok(t) if t.is_dir() => count(&e.path()),
                    _ => 1,
                })
                .sum()
        }
        count(&self._dir.path().join("meta").join(kind))
    }
}
