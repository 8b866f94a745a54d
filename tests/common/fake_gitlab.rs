//! A fake GitLab that follows `shared/PROTOCOL.md`, for every integration and end-to-end test.
//!
//! - Namespace routes: only `Authorization: <scheme> <token>` counts; anonymous on a private
//!   group is 401 with `WWW-Authenticate`, a valid token without access is 403.
//! - Versioned download: 204 with a root-relative `X-Terraform-Get` carrying an HS256 JWT that
//!   wraps the caller's token and expires; latest download: 302. "Latest" is picked by string
//!   order, as GitLab does.
//! - `/file?token=<JWT>`: 401 on a bad or expired token; in object-storage mode, a 302 to a
//!   presigned URL on a *second* listener (another origin) that refuses `HEAD`, as S3 does for
//!   a URL signed for `GET`; plain http, or https with its own certificate.
//! - Project routes with Basic auth (404 when the project is not visible), `?terraform-get=1`
//!   with an absolute `X-Terraform-Get`, and `PUT .../file` uploads with `PRIVATE-TOKEN`,
//!   `JOB-TOKEN` or `DEPLOY-TOKEN`.
//! - Faults, switchable at run time: latency, an HTTP status, reset at accept, truncated body
//!   (closed or reset mid-body), slow body,
//!   down (port closed), black hole (accepts, never answers); tarballs sent chunked or
//!   close-delimited, whole or cut.
//!
//! Every request is recorded (method, path, query, headers) so tests can count upstream
//! fetches and check what tfmirror forwarded.

#![allow(dead_code)]
// Handlers return early with ready-made responses, as axum handlers do.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// ID tokens and GitLab's key; here so that the benches, which include this file alone, have
/// them too.
#[path = "id_tokens.rs"]
pub mod id_tokens;

const V1: &str = "/api/v4/packages/terraform/modules/v1";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    None,
    /// Delay every response by this much.
    Latency(Duration),
    /// Answer every request with this status and GitLab's error body (a 429 says
    /// `Retry-After: 1`).
    Status(u16),
    /// Accept, then reset the connection (RST) before reading anything.
    Reset,
    /// Send tarball headers with the full Content-Length, then half the body, then close.
    Truncate,
    /// As `Truncate`, but the connection ends with a reset (RST) instead of a close.
    ResetMidBody,
    /// Send successful bodies in 64 KiB pieces, pausing this long before each.
    SlowBody(Duration),
    /// Close the listening socket: connections are refused.
    Down,
    /// Accept connections and never answer.
    Blackhole,
    /// Send tarball bodies chunked (no `Content-Length`), as GitLab behind a proxy that
    /// streams from object storage does; `cut`: half the body, then the connection is cut,
    /// with no terminal chunk.
    Chunked {
        cut: bool,
    },
    /// Send tarball bodies with neither `Content-Length` nor chunking, ending at the close
    /// (HTTP/1.0 style); `cut`: only half the body before the close, which the client cannot
    /// tell from the end. One request per connection.
    CloseDelimited {
        cut: bool,
    },
}

/// One request as the fake saw it.
#[derive(Debug, Clone)]
pub struct Hit {
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    /// Whom GitLab's rate limiter would count it against: `None` is the client's IP (an
    /// unauthenticated request), else the token it names (see [`throttled_as`]).
    pub counted_as: Option<String>,
}

/// (group, name, system) -> (project id, version -> tarball)
type Modules = BTreeMap<(String, String, String), (u64, BTreeMap<String, Bytes>)>;

#[derive(Default)]
struct Registry {
    /// token -> user name
    tokens: HashMap<String, String>,
    /// group -> (public, members' tokens)
    groups: HashMap<String, (bool, HashSet<String>)>,
    /// (group, name, system) -> project id and version -> tarball
    modules: Modules,
    /// presigned key -> bytes, for the object storage listener
    objects: HashMap<String, Bytes>,
    /// CI job token -> its job (GitLab's `Ci::Build`)
    jobs: HashMap<String, FakeJob>,
    /// user name -> (user id, bot)
    users: HashMap<String, (u64, bool)>,
    next_job: u64,
}

/// A CI job: its token acts as its user (`acts_as`, a member token of that user) while it runs.
#[derive(Debug, Clone)]
struct FakeJob {
    id: u64,
    project_id: u64,
    user: String,
    acts_as: String,
    running: bool,
}

/// How the fake mints a job token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobForm {
    /// `glcbt-` and an opaque string (GitLab 16.9 to 17.6).
    Legacy,
    /// `glcbt-` and an RS256 JWT (`sub` = `gid://gitlab/Ci::Build/<id>`), GitLab 17.7+.
    Jwt,
    /// The JWT form of a composite identity: `scoped_user_id` in the payload.
    Composite(u64),
    /// The JWT form with a claim tfmirror does not know (finer permissions to come).
    ExtraClaim,
}

pub struct Inner {
    registry: Mutex<Registry>,
    hits: Mutex<Vec<Hit>>,
    fault: watch::Sender<Fault>,
    object_storage: Mutex<bool>,
    /// Object storage URLs end in a key, not in the stored file's name.
    opaque_objects: Mutex<bool>,
    record_headers: Mutex<bool>,
    jwt_ttl: Mutex<Duration>,
    /// Close keep-alive connections idle this long (nginx's `keepalive_timeout`).
    keepalive: Mutex<Option<Duration>>,
    /// Per caller (token, or "" for anonymous): a 429 with this `Retry-After` (seconds), as
    /// GitLab's per-user and per-IP rate limits answer.
    rate_limited: Mutex<HashMap<String, u64>>,
    /// Per caller (token, or "" for anonymous): answer this much later.
    latency: Mutex<HashMap<String, Duration>>,
    /// GitLab.com's budget headers: `RateLimit-Remaining` counts down from this, one a request.
    budget: Mutex<Option<u64>>,
    secret: Vec<u8>,
    /// Relative URL root ("" or "/gitlab"); part of every URL the fake hands out.
    prefix: String,
    base_url: String,
    objects_url: String,
}

#[derive(Clone)]
pub struct FakeGitlab {
    pub addr: SocketAddr,
    pub objects_addr: SocketAddr,
    inner: Arc<Inner>,
}

impl FakeGitlab {
    pub async fn start() -> FakeGitlab {
        Self::start_with_prefix("").await
    }

    /// A GitLab served under a relative URL root such as `/gitlab`.
    pub async fn start_with_prefix(prefix: &str) -> FakeGitlab {
        Self::start_inner(prefix, None, None).await
    }

    /// A GitLab over HTTPS with the given certificate chain and key (PEM). Its object storage
    /// stays plain http.
    pub async fn start_tls(cert_pem: &str, key_pem: &str) -> FakeGitlab {
        Self::start_inner("", Some(acceptor(cert_pem, key_pem)), None).await
    }

    /// A GitLab over HTTPS whose object storage is HTTPS too, each with its own certificate
    /// chain and key (PEM).
    pub async fn start_tls_with_storage(
        (cert_pem, key_pem): (&str, &str),
        (storage_cert_pem, storage_key_pem): (&str, &str),
    ) -> FakeGitlab {
        let gitlab = acceptor(cert_pem, key_pem);
        let storage = acceptor(storage_cert_pem, storage_key_pem);
        Self::start_inner("", Some(gitlab), Some(storage)).await
    }

    async fn start_inner(
        prefix: &str,
        tls: Option<tokio_rustls::TlsAcceptor>,
        storage_tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> FakeGitlab {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let objects = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let objects_addr = objects.local_addr().unwrap();
        let (fault, _) = watch::channel(Fault::None);
        let inner = Arc::new(Inner {
            registry: Mutex::new(Registry::default()),
            hits: Mutex::new(Vec::new()),
            fault,
            object_storage: Mutex::new(false),
            opaque_objects: Mutex::new(false),
            record_headers: Mutex::new(true),
            jwt_ttl: Mutex::new(Duration::from_secs(300)),
            keepalive: Mutex::new(None),
            rate_limited: Mutex::new(HashMap::new()),
            latency: Mutex::new(HashMap::new()),
            budget: Mutex::new(None),
            secret: b"fake-gitlab-jwt-secret".to_vec(),
            prefix: prefix.to_string(),
            base_url: format!(
                "{}://{addr}{prefix}",
                if tls.is_some() { "https" } else { "http" }
            ),
            objects_url: format!(
                "{}://{objects_addr}",
                if storage_tls.is_some() {
                    "https"
                } else {
                    "http"
                }
            ),
        });
        let app = if prefix.is_empty() {
            gitlab_router(inner.clone())
        } else {
            Router::new().nest(prefix, gitlab_router(inner.clone()))
        };
        tokio::spawn(accept_loop(listener, app, inner.clone(), true, tls));
        let storage = Router::new()
            .route("/bucket/{key}", get(object_get))
            .route("/bucket/{key}/{file}", get(object_file_get))
            .with_state(inner.clone());
        tokio::spawn(accept_loop(
            objects,
            storage,
            inner.clone(),
            false,
            storage_tls,
        ));
        FakeGitlab {
            addr,
            objects_addr,
            inner,
        }
    }

    /// Base URL, including the relative URL root if any.
    pub fn url(&self) -> String {
        self.inner.base_url.clone()
    }

    pub fn add_token(&self, token: &str, user: &str) {
        let mut r = self.inner.registry.lock().unwrap();
        r.tokens.insert(token.into(), user.into());
        let next = 100 + r.users.len() as u64;
        r.users.entry(user.into()).or_insert((next, false));
        // A job token given as a plain token is a running job of its own user, as GitLab's
        // `/api/v4/job` would say (project 1).
        if token.starts_with("glcbt-") {
            r.next_job += 1;
            let id = 1000 + r.next_job;
            let job = FakeJob {
                id,
                project_id: 1,
                user: user.into(),
                acts_as: token.into(),
                running: true,
            };
            r.jobs.insert(token.into(), job);
        }
    }

    /// GitLab's user id of `user` (a name given to [`add_token`](Self::add_token)).
    pub fn user_id(&self, user: &str) -> u64 {
        self.inner.registry.lock().unwrap().users[user].0
    }

    /// Mark `user` as a bot (a project or group access token's user).
    pub fn set_bot(&self, user: &str, bot: bool) {
        let mut r = self.inner.registry.lock().unwrap();
        r.users.get_mut(user).unwrap().1 = bot;
    }

    /// Start a CI job of `project_id` run by the holder of `user_token` (a token given to
    /// [`add_token`](Self::add_token)); returns its job token. The job token acts as that
    /// user (same group memberships) until [`finish_job`](Self::finish_job).
    pub fn start_job(&self, project_id: u64, user_token: &str, form: JobForm) -> String {
        let mut r = self.inner.registry.lock().unwrap();
        r.next_job += 1;
        let id = 1000 + r.next_job;
        let user = r.tokens[user_token].clone();
        let token = match form {
            JobForm::Legacy => format!("glcbt-64_{id:020}legacyjobtoken"),
            JobForm::Jwt => job_jwt(id, None, false),
            JobForm::Composite(scoped) => job_jwt(id, Some(scoped), false),
            JobForm::ExtraClaim => job_jwt(id, None, true),
        };
        r.jobs.insert(
            token.clone(),
            FakeJob {
                id,
                project_id,
                user,
                acts_as: user_token.to_string(),
                running: true,
            },
        );
        token
    }

    /// GitLab's claims for an ID token of the job of `job_token` with audience `aud`, as
    /// GitLab writes them (ids as strings), valid for an hour; sign them with
    /// `id_tokens::sign` (tests change them first to forge).
    pub fn id_claims(&self, job_token: &str, aud: &str) -> Value {
        let r = self.inner.registry.lock().unwrap();
        let job = &r.jobs[job_token];
        let user_id = r.users[&job.user].0;
        json!({
            "iss": self.inner.base_url.trim_end_matches('/'),
            "aud": aud,
            "iat": now(),
            "nbf": now() - 5,
            "exp": now() + 3600,
            "sub": format!("project_path:group/project-{}:ref_type:branch:ref:main", job.project_id),
            "namespace_id": "1",
            "namespace_path": "group",
            "project_id": job.project_id.to_string(),
            "project_path": format!("group/project-{}", job.project_id),
            "job_project_id": job.project_id.to_string(),
            "job_project_path": format!("group/project-{}", job.project_id),
            "user_id": user_id.to_string(),
            "user_login": job.user,
            "user_access_level": "developer",
            "pipeline_id": (job.id * 10).to_string(),
            "pipeline_source": "push",
            "job_id": job.id.to_string(),
            "ref": "main",
            "ref_type": "branch",
            "ref_protected": "true",
            "runner_id": 1,
            "sha": "0000000000000000000000000000000000000000",
        })
    }

    /// A valid ID token (GitLab's key) for the job of `job_token`.
    pub fn id_token(&self, job_token: &str, aud: &str) -> String {
        let claims = self.id_claims(job_token, aud);
        id_tokens::sign(id_tokens::Key::Gitlab, &id_tokens::header(), &claims)
    }

    /// The job ends: its token is refused (401) everywhere from now on.
    pub fn finish_job(&self, token: &str) {
        let mut r = self.inner.registry.lock().unwrap();
        r.jobs.get_mut(token).unwrap().running = false;
    }

    pub fn add_group(&self, group: &str, public: bool, members: &[&str]) {
        let mut r = self.inner.registry.lock().unwrap();
        let members = members.iter().map(|m| m.to_string()).collect();
        r.groups.insert(group.into(), (public, members));
    }

    /// Remove a member's access (the token stays valid).
    pub fn revoke(&self, group: &str, token: &str) {
        let mut r = self.inner.registry.lock().unwrap();
        r.groups.get_mut(group).unwrap().1.remove(token);
    }

    /// Make a group public or private at run time.
    pub fn set_public(&self, group: &str, public: bool) {
        let mut r = self.inner.registry.lock().unwrap();
        r.groups.get_mut(group).unwrap().0 = public;
    }

    /// Delete a version, as a maintainer would in GitLab's package registry.
    pub fn delete_version(&self, group: &str, name: &str, system: &str, version: &str) {
        let mut r = self.inner.registry.lock().unwrap();
        let m = r
            .modules
            .get_mut(&(group.into(), name.into(), system.into()))
            .unwrap();
        m.1.remove(version);
    }

    /// Upload `version` again after a `delete_version`, with other bytes (a whole, valid
    /// module tarball whose content names `generation`).
    pub fn republish(&self, group: &str, name: &str, system: &str, version: &str, generation: u32) {
        let mut r = self.inner.registry.lock().unwrap();
        let m = r
            .modules
            .get_mut(&(group.into(), name.into(), system.into()))
            .unwrap();
        let module = format!("{group}/{name}/{system} (generation {generation})");
        m.1.insert(version.into(), module_tarball(&module, version, 0));
    }

    /// Answer this caller (a token, or `None` for anonymous) 429 with `Retry-After`, or stop
    /// (`retry_after: None`).
    pub fn rate_limit(&self, token: Option<&str>, retry_after: Option<u64>) {
        let mut m = self.inner.rate_limited.lock().unwrap();
        let k = token.unwrap_or_default().to_string();
        match retry_after {
            Some(s) => m.insert(k, s),
            None => m.remove(&k),
        };
    }

    /// Answer this caller (a token, or `None` for anonymous) `delay` later, or stop.
    /// Send GitLab.com's `RateLimit-*` headers on every answer, `RateLimit-Remaining`
    /// counting down from `remaining` (None: send none).
    pub fn set_budget(&self, remaining: Option<u64>) {
        *self.inner.budget.lock().unwrap() = remaining;
    }

    pub fn set_latency_for(&self, token: Option<&str>, delay: Option<Duration>) {
        let mut m = self.inner.latency.lock().unwrap();
        let k = token.unwrap_or_default().to_string();
        match delay {
            Some(d) => m.insert(k, d),
            None => m.remove(&k),
        };
    }

    pub fn add_module(
        &self,
        group: &str,
        project: u64,
        name: &str,
        system: &str,
        versions: &[&str],
    ) {
        let mut r = self.inner.registry.lock().unwrap();
        let entry = r
            .modules
            .entry((group.into(), name.into(), system.into()))
            .or_insert_with(|| (project, BTreeMap::new()));
        for v in versions {
            let tgz = module_tarball(&format!("{group}/{name}/{system}"), v, 0);
            entry.1.insert(v.to_string(), tgz);
        }
    }

    /// Replace a version's tarball with one padded to at least `size` bytes.
    pub fn set_tarball_size(
        &self,
        group: &str,
        name: &str,
        system: &str,
        version: &str,
        size: usize,
    ) {
        let mut r = self.inner.registry.lock().unwrap();
        let entry = r
            .modules
            .get_mut(&(group.into(), name.into(), system.into()))
            .unwrap();
        let tgz = module_tarball(&format!("{group}/{name}/{system}"), version, size);
        entry.1.insert(version.into(), tgz);
    }

    /// Serve exactly `bytes` for a version (benchmarks: size matters, gzip does not).
    pub fn set_tarball_raw(
        &self,
        group: &str,
        name: &str,
        system: &str,
        version: &str,
        bytes: Bytes,
    ) {
        let mut r = self.inner.registry.lock().unwrap();
        let entry = r
            .modules
            .entry((group.into(), name.into(), system.into()))
            .or_insert_with(|| (0, BTreeMap::new()));
        entry.1.insert(version.into(), bytes);
    }

    /// Stop recording requests' headers (under load, the log is only needed for counts).
    pub fn set_record_headers(&self, on: bool) {
        *self.inner.record_headers.lock().unwrap() = on;
    }

    pub fn tarball(&self, group: &str, name: &str, system: &str, version: &str) -> Bytes {
        let r = self.inner.registry.lock().unwrap();
        r.modules[&(group.into(), name.into(), system.into())].1[version].clone()
    }

    pub fn set_fault(&self, fault: Fault) {
        self.inner.fault.send_replace(fault);
    }

    /// Package files in object storage: downloads answer 302 to a presigned URL, with no
    /// `Content-Disposition`, whose last path segment is the stored file's name
    /// (`<name>-<system>-<version>.tgz`), as GitLab's object storage uploader keeps it.
    pub fn set_object_storage(&self, on: bool) {
        *self.inner.object_storage.lock().unwrap() = on;
    }

    /// Object storage URLs that end in an opaque key instead of the file's name (a storage
    /// set-up tfmirror cannot read a version from).
    pub fn set_opaque_objects(&self, on: bool) {
        *self.inner.opaque_objects.lock().unwrap() = on;
    }

    /// Close idle keep-alive connections after `idle`, as a GitLab whose nginx has a shorter
    /// `keepalive_timeout` than tfmirror's pool does. Applies to connections accepted later.
    pub fn set_keepalive_timeout(&self, idle: Duration) {
        *self.inner.keepalive.lock().unwrap() = Some(idle);
    }

    pub fn set_jwt_ttl(&self, ttl: Duration) {
        *self.inner.jwt_ttl.lock().unwrap() = ttl;
    }

    pub fn hits(&self) -> Vec<Hit> {
        self.inner.hits.lock().unwrap().clone()
    }

    pub fn clear_hits(&self) {
        self.inner.hits.lock().unwrap().clear();
    }

    /// Requests whose path ends with `suffix` (e.g. `/file`, `/versions`).
    pub fn count(&self, suffix: &str) -> usize {
        self.hits()
            .iter()
            .filter(|h| h.path.ends_with(suffix))
            .count()
    }

    /// Mint a download JWT as GitLab would for `token` (tests use it to call `/file` directly).
    pub fn jwt_for(&self, token: &str) -> String {
        jwt_sign(&self.inner, token, false)
    }

    /// A download JWT for `token` that expired a second ago.
    pub fn expired_jwt_for(&self, token: &str) -> String {
        jwt_sign(&self.inner, token, true)
    }
}

/// A gzipped tar with one `main.tf` whose output names the module and version. `pad` makes it
/// at least that large, with incompressible bytes, for streaming tests.
pub fn module_tarball(module: &str, version: &str, pad: usize) -> Bytes {
    use flate2::write::GzEncoder;
    let main_tf = format!(
        "variable \"input\" {{\n  default = \"x\"\n}}\n\noutput \"id\" {{\n  value = \"{module}@{version}\"\n}}\n"
    );
    let mut tar = tar::Builder::new(Vec::new());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_cksum();
        tar.append_data(&mut h, name, data).unwrap();
    };
    add("main.tf", main_tf.as_bytes());
    if pad > 0 {
        // xorshift noise: does not compress, so the tarball really is `pad` bytes or more.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ pad as u64;
        let noise: Vec<u8> = (0..pad)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        add("padding.bin", &noise);
    }
    let tar = tar.into_inner().unwrap();
    let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &tar).unwrap();
    Bytes::from(gz.finish().unwrap())
}

// ---------------------------------------------------------------------------------------------
// Serving

/// A TLS acceptor for a certificate chain and key (PEM).
pub fn acceptor(cert_pem: &str, key_pem: &str) -> tokio_rustls::TlsAcceptor {
    use rustls_pki_types::pem::PemObject;
    let certs: Vec<_> = rustls_pki_types::CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

async fn accept_loop(
    listener: TcpListener,
    app: Router,
    inner: Arc<Inner>,
    faults: bool,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let addr = listener.local_addr().unwrap();
    let mut fault_rx = inner.fault.subscribe();
    let mut listener = Some(listener);
    loop {
        let current = if faults {
            fault_rx.borrow().clone()
        } else {
            Fault::None
        };
        if current == Fault::Down {
            listener = None; // closes the port: connect() is refused
            if fault_rx.changed().await.is_err() {
                return;
            }
            continue;
        }
        let l = match &listener {
            Some(l) => l,
            None => {
                listener = Some(rebind(addr).await);
                listener.as_ref().unwrap()
            }
        };
        let accepted = tokio::select! {
            a = l.accept() => a,
            _ = fault_rx.changed() => continue,
        };
        let Ok((sock, _)) = accepted else { continue };
        if current == Fault::ResetMidBody {
            let _ = sock.set_zero_linger(); // the close after half a body becomes a reset
        }
        let keepalive = *inner.keepalive.lock().unwrap();
        match current {
            Fault::Reset => {
                let _ = sock.set_zero_linger();
                drop(sock);
            }
            Fault::Blackhole => {
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(120)).await;
                    drop(sock);
                });
            }
            Fault::CloseDelimited { cut } if tls.is_none() => {
                tokio::spawn(serve_close_delimited(sock, app.clone(), cut));
            }
            _ => {
                let (app, rx) = (app.clone(), inner.fault.subscribe());
                match &tls {
                    None => {
                        tokio::spawn(serve_conn(sock, app, rx, faults, keepalive));
                    }
                    Some(acceptor) => {
                        let acceptor = acceptor.clone();
                        tokio::spawn(async move {
                            if let Ok(s) = acceptor.accept(sock).await {
                                serve_conn(s, app, rx, faults, keepalive).await;
                            }
                        });
                    }
                }
            }
        }
    }
}

async fn rebind(addr: SocketAddr) -> TcpListener {
    for _ in 0..100 {
        if let Ok(l) = TcpListener::bind(addr).await {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("fake gitlab could not rebind {addr}");
}

/// Serve one connection; a switch to a connection-level fault closes it, as a real outage
/// would close pooled keep-alive connections.
async fn serve_conn<S>(
    sock: S,
    app: Router,
    mut fault_rx: watch::Receiver<Fault>,
    faults: bool,
    keepalive: Option<Duration>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let io = hyper_util::rt::TokioIo::new(sock);
    let svc = hyper_util::service::TowerToHyperService::new(app);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.keep_alive(true);
    if let Some(idle) = keepalive {
        // hyper's head timer also runs while a kept-alive connection waits for its next
        // request, so it closes idle connections.
        builder
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(idle);
    }
    let conn = builder.serve_connection(io, svc);
    tokio::pin!(conn);
    loop {
        tokio::select! {
            _ = conn.as_mut() => return,
            changed = fault_rx.changed(), if faults => {
                if changed.is_err() { return; }
                let f = fault_rx.borrow().clone();
                if matches!(
                    f,
                    Fault::Down
                        | Fault::Reset
                        | Fault::Blackhole
                        | Fault::ResetMidBody
                        | Fault::CloseDelimited { .. }
                ) {
                    return; // drops the connection
                }
            }
        }
    }
}

fn gitlab_router(inner: Arc<Inner>) -> Router {
    let p = format!("{V1}/{{ns}}/{{name}}/{{sys}}");
    let pp = "/api/v4/projects/{id}/packages/terraform/modules/{name}/{sys}";
    Router::new()
        .route("/.well-known/terraform.json", get(discovery))
        .route(&p, get(latest))
        .route(&format!("{p}/versions"), get(versions))
        .route(&format!("{p}/download"), get(latest_download))
        .route(&format!("{p}/{{ver}}"), get(version))
        .route(&format!("{p}/{{ver}}/download"), get(download))
        .route(&format!("{p}/{{ver}}/file"), get(file))
        .route(pp, get(project_latest))
        .route(&format!("{pp}/{{ver}}"), get(project_get))
        .route(&format!("{pp}/{{ver}}/file"), put(project_upload))
        .route("/api/v4/version", get(api_version))
        .route("/api/v4/user", get(api_user))
        .route("/api/v4/job", get(current_job))
        .route("/oauth/discovery/keys", get(discovery_keys))
        .route("/api/v4/groups/{id}", get(group_info))
        .route("/api/v4/groups/{id}/packages", get(group_packages))
        .fallback(not_found)
        // Uploads of any size, as Workhorse accepts them.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .layer(middleware::from_fn_with_state(
            inner.clone(),
            record_and_fault,
        ))
        .with_state(inner)
}

async fn record_and_fault(State(inner): State<Arc<Inner>>, req: Request, next: Next) -> Response {
    // Under a relative URL root, record the path as sent (nesting strips the prefix).
    let path = req
        .extensions()
        .get::<axum::extract::OriginalUri>()
        .map_or_else(|| req.uri().path().to_string(), |u| u.path().to_string());
    inner.hits.lock().unwrap().push(Hit {
        method: req.method().clone(),
        path,
        query: req.uri().query().map(str::to_string),
        headers: if *inner.record_headers.lock().unwrap() {
            req.headers().clone()
        } else {
            HeaderMap::new()
        },
        counted_as: throttled_as(req.headers()),
    });
    let caller = caller_token(req.headers());
    let delay = inner.latency.lock().unwrap().get(&caller).copied();
    if let Some(d) = delay {
        tokio::time::sleep(d).await;
    }
    let limited = inner.rate_limited.lock().unwrap().get(&caller).copied();
    if let Some(secs) = limited {
        let mut r = gitlab_error(StatusCode::TOO_MANY_REQUESTS);
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        return r;
    }
    let fault = inner.fault.borrow().clone();
    match fault {
        Fault::Latency(d) => tokio::time::sleep(d).await,
        Fault::Status(code) => {
            let status = StatusCode::from_u16(code).unwrap();
            let mut r = gitlab_error(status);
            if status == StatusCode::TOO_MANY_REQUESTS {
                // GitLab's rate limiter (Rack::Attack) says when to come back.
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            return r;
        }
        _ => {}
    }
    let mut resp = next.run(req).await;
    let left = {
        let mut budget = inner.budget.lock().unwrap();
        let left = *budget;
        if let Some(n) = budget.as_mut() {
            *n = n.saturating_sub(1);
        }
        left
    };
    if let Some(n) = left {
        let h = resp.headers_mut();
        h.insert("ratelimit-limit", HeaderValue::from(2000u64));
        h.insert("ratelimit-remaining", HeaderValue::from(n));
        h.insert("ratelimit-reset", HeaderValue::from(now() + 60));
    }
    match fault {
        Fault::Truncate | Fault::ResetMidBody if resp.status() == StatusCode::OK => {
            truncate(resp).await
        }
        Fault::SlowBody(pause) if resp.status() == StatusCode::OK => slow(resp, pause).await,
        Fault::Chunked { cut } if is_tarball(&resp) => chunked(resp, cut).await,
        _ => resp,
    }
}

/// The token a request carries, however it carries it (Bearer, Basic password, the token
/// headers, a download JWT's wrapped token); "" for anonymous.
fn caller_token(headers: &HeaderMap) -> String {
    if let Some(t) = ["private-token", "job-token", "deploy-token"]
        .iter()
        .find_map(|h| headers.get(*h).and_then(|v| v.to_str().ok()))
    {
        return t.to_string();
    }
    match basic(headers) {
        Caller::Token(t) => t,
        Caller::Anonymous => match bearer(headers) {
            Ok(Caller::Token(t)) => t,
            _ => String::new(),
        },
    }
}

/// Whom GitLab's rate limiter (Rack::Attack) counts a request against, as
/// `Gitlab::Auth::RequestAuthenticator` finds the requester from its headers: a personal or
/// deploy token names its owner; a job token does not on `/file`, where the JWT in the
/// `token` parameter is tried as a job token first and fails; no credential at all (a
/// `/file?token=<JWT>` alone) is unauthenticated: counted per IP (`None`). The JWT itself
/// is never a requester: only the endpoint reads it.
fn throttled_as(headers: &HeaderMap) -> Option<String> {
    let job_user = matches!(
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Basic "))
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok()),
        Some(raw) if raw.starts_with(b"gitlab-ci-token:")
    );
    let token = caller_token(headers);
    (!token.is_empty()
        && !job_user
        && !token.starts_with("glcbt-")
        && !headers.contains_key("job-token"))
    .then_some(token)
}

impl FakeGitlab {
    /// Requests ending with `suffix` that GitLab would count against tfmirror's address
    /// (unauthenticated, per IP), not against a user.
    pub fn counted_per_ip(&self, suffix: &str) -> usize {
        self.hits()
            .iter()
            .filter(|h| h.path.ends_with(suffix) && h.counted_as.is_none())
            .count()
    }
}

fn is_tarball(resp: &Response) -> bool {
    resp.status() == StatusCode::OK
        && resp
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v == "application/octet-stream")
}

/// The same body as a stream of unknown length, which hyper sends chunked; `cut`: half of it,
/// then an error, on which hyper drops the connection without a terminal chunk.
async fn chunked(resp: Response, cut: bool) -> Response {
    use futures::StreamExt;
    let (mut parts, body) = resp.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    parts.headers.remove(header::CONTENT_LENGTH);
    let sent = if cut {
        bytes.slice(..bytes.len() / 2)
    } else {
        bytes
    };
    let pieces: Vec<Result<Bytes, std::io::Error>> = sent
        .chunks(64 << 10)
        .map(|p| Ok(Bytes::copy_from_slice(p)))
        .collect();
    let tail = futures::stream::once(async move {
        // The pause lets what was sent reach the client before the cut.
        tokio::time::sleep(Duration::from_millis(100)).await;
        Err(std::io::Error::other("cut by fault injection"))
    });
    let stream = futures::stream::iter(pieces);
    let body = if cut {
        Body::from_stream(stream.chain(tail))
    } else {
        Body::from_stream(stream)
    };
    Response::from_parts(parts, body)
}

/// One request on a raw connection, answered through the router; a tarball body goes out
/// with neither length nor chunking and ends at the close (only its first half when `cut`).
async fn serve_close_delimited(mut sock: tokio::net::TcpStream, app: Router, cut: bool) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match sock.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > 64 << 10 {
            return;
        }
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let mut lines = text.split("\r\n");
    let mut first = lines.next().unwrap_or_default().split(' ');
    let (method, target) = (first.next().unwrap_or("GET"), first.next().unwrap_or("/"));
    let mut req = axum::http::Request::builder().method(method).uri(target);
    for line in lines.take_while(|l| !l.is_empty()) {
        if let Some((k, v)) = line.split_once(':') {
            req = req.header(k.trim(), v.trim());
        }
    }
    let Ok(req) = req.body(Body::empty()) else {
        return;
    };
    let svc = hyper_util::service::TowerToHyperService::new(app);
    let Ok(resp) = hyper::service::Service::call(&svc, req).await;
    let tarball = is_tarball(&resp);
    let (parts, body) = resp.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    let mut out = format!(
        "HTTP/1.1 {} {}\r\n",
        parts.status.as_u16(),
        parts.status.canonical_reason().unwrap_or("")
    );
    for (k, v) in &parts.headers {
        if k != header::CONTENT_LENGTH && k != header::TRANSFER_ENCODING && k != header::CONNECTION
        {
            out.push_str(&format!("{k}: {}\r\n", v.to_str().unwrap_or("")));
        }
    }
    let body = if tarball {
        if cut {
            bytes.slice(..bytes.len() / 2)
        } else {
            bytes
        }
    } else {
        out.push_str(&format!("content-length: {}\r\n", bytes.len()));
        bytes
    };
    out.push_str("connection: close\r\n\r\n");
    let _ = sock.write_all(out.as_bytes()).await;
    let _ = sock.write_all(&body).await;
    let _ = sock.shutdown().await;
}

/// The same body, dribbled out in 64 KiB pieces.
async fn slow(resp: Response, pause: Duration) -> Response {
    use futures::StreamExt;
    let (parts, body) = resp.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    let pieces: Vec<Bytes> = bytes.chunks(64 << 10).map(Bytes::copy_from_slice).collect();
    let stream = futures::stream::iter(pieces).then(move |p| async move {
        tokio::time::sleep(pause).await;
        Ok::<Bytes, std::io::Error>(p)
    });
    Response::from_parts(parts, Body::from_stream(stream))
}

/// Keep the full Content-Length but send only half the body, then end the connection.
async fn truncate(resp: Response) -> Response {
    let (mut parts, body) = resp.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    let half = bytes.slice(..bytes.len() / 2);
    parts
        .headers
        .insert(header::CONTENT_LENGTH, bytes.len().into());
    use futures::StreamExt;
    // The pause lets the head and the first half go out before the connection is cut.
    let stream = futures::stream::once(async move { Ok::<Bytes, std::io::Error>(half) }).chain(
        futures::stream::once(async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            Err(std::io::Error::other("truncated by fault injection"))
        }),
    );
    Response::from_parts(parts, Body::from_stream(stream))
}

fn gitlab_error(status: StatusCode) -> Response {
    let msg = format!(
        "{} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    (status, Json(json!({ "message": msg }))).into_response()
}

fn unauthorized() -> Response {
    let mut r = gitlab_error(StatusCode::UNAUTHORIZED);
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        "Basic realm=\"GitLab Packages Registry\"".parse().unwrap(),
    );
    r
}

async fn not_found() -> Response {
    gitlab_error(StatusCode::NOT_FOUND)
}

async fn discovery() -> Json<Value> {
    Json(json!({ "modules.v1": format!("{V1}/") }))
}

enum Caller {
    Anonymous,
    Token(String),
}

/// Namespace routes: only `Authorization: <scheme> <token>`.
fn bearer(headers: &HeaderMap) -> Result<Caller, Response> {
    match headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        None => Ok(Caller::Anonymous),
        Some(v) => match v.split_once(' ') {
            // A scheme GitLab's token finders do not read (Kerberos' `Negotiate`): the
            // request is anonymous, however long or unique its value.
            Some((scheme, _)) if scheme.eq_ignore_ascii_case("negotiate") => Ok(Caller::Anonymous),
            Some((_, t)) if !t.is_empty() => Ok(Caller::Token(t.to_string())),
            _ => Err(unauthorized()),
        },
    }
}

impl Inner {
    /// GitLab's checks in order: authenticate, find the module, authorize.
    fn authorize(&self, caller: &Caller, group: &str) -> Result<(), Response> {
        let r = self.registry.lock().unwrap();
        // A running job's token acts as its user; a finished one's is refused.
        let acting;
        let caller = match caller {
            Caller::Token(t) if r.jobs.contains_key(t) => {
                let job = &r.jobs[t];
                if !job.running {
                    return Err(unauthorized());
                }
                acting = Caller::Token(job.acts_as.clone());
                &acting
            }
            other => other,
        };
        if let Caller::Token(t) = caller {
            if !r.tokens.contains_key(t) {
                return Err(unauthorized());
            }
        }
        let Some((public, members)) = r.groups.get(group) else {
            return Err(gitlab_error(StatusCode::NOT_FOUND));
        };
        match caller {
            _ if *public => Ok(()),
            Caller::Anonymous => Err(unauthorized()),
            Caller::Token(t) if members.contains(t) => Ok(()),
            Caller::Token(_) => Err(gitlab_error(StatusCode::FORBIDDEN)),
        }
    }

    fn versions_of(&self, ns: &str, name: &str, sys: &str) -> Option<(u64, Vec<String>)> {
        let r = self.registry.lock().unwrap();
        let (project, versions) = r.modules.get(&(ns.into(), name.into(), sys.into()))?;
        Some((*project, versions.keys().cloned().collect()))
    }

    fn project_url(&self, project: u64) -> String {
        format!("{}/group/project-{project}", self.base_url)
    }
}

fn metadata(
    inner: &Inner,
    ns: &str,
    name: &str,
    sys: &str,
    version: &str,
    all: &[String],
) -> Value {
    let project = inner.versions_of(ns, name, sys).map_or(0, |v| v.0);
    json!({
        "name": format!("{name}/{sys}"),
        "provider": sys,
        "providers": [sys],
        "root": { "dependencies": [] },
        "source": inner.project_url(project),
        "submodules": [],
        "version": version,
        "versions": all,
    })
}

type ModPath = Path<(String, String, String)>;
type VerPath = Path<(String, String, String, String)>;

async fn versions(
    State(inner): State<Arc<Inner>>,
    Path((ns, name, sys)): ModPath,
    headers: HeaderMap,
) -> Response {
    let caller = match bearer(&headers) {
        Ok(c) => c,
        Err(r) => return r,
    };
    if let Err(r) = inner.authorize(&caller, &ns) {
        return r;
    }
    let Some((project, versions)) = inner.versions_of(&ns, &name, &sys) else {
        // GitLab's quirk: an unknown module is a 200 with no versions and no source.
        return Json(json!({ "modules": [{ "versions": [] }] })).into_response();
    };
    let list: Vec<Value> = versions
        .iter()
        .map(|v| {
            json!({
                "version": v,
                "submodules": [],
                "root": { "dependencies": [], "providers": [{ "name": sys, "version": "" }] }
            })
        })
        .collect();
    Json(json!({ "modules": [{ "versions": list, "source": inner.project_url(project) }] }))
        .into_response()
}

/// A namespace route's caller (Bearer) and the module's versions, once GitLab's access
/// check let it read `ns`; else GitLab's refusal.
fn readable(
    inner: &Inner,
    headers: &HeaderMap,
    ns: &str,
    name: &str,
    sys: &str,
) -> Result<(Caller, Vec<String>), Response> {
    let caller = bearer(headers)?;
    inner.authorize(&caller, ns)?;
    let versions = inner
        .versions_of(ns, name, sys)
        .map(|v| v.1)
        .unwrap_or_default();
    Ok((caller, versions))
}

/// GitLab orders versions as strings: "1.9.0" is later than "1.10.0".
fn latest_by_string(versions: &[String]) -> Option<String> {
    versions.iter().max().cloned()
}

async fn latest(
    State(inner): State<Arc<Inner>>,
    Path((ns, name, sys)): ModPath,
    headers: HeaderMap,
) -> Response {
    let (_, versions) = match readable(&inner, &headers, &ns, &name, &sys) {
        Ok(x) => x,
        Err(r) => return r,
    };
    match latest_by_string(&versions) {
        Some(v) => Json(metadata(&inner, &ns, &name, &sys, &v, &versions)).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({ "message": { "error": format!("No version found for {name} module") } })),
        )
            .into_response(),
    }
}

async fn version(
    State(inner): State<Arc<Inner>>,
    Path((ns, name, sys, ver)): VerPath,
    headers: HeaderMap,
) -> Response {
    let (_, versions) = match readable(&inner, &headers, &ns, &name, &sys) {
        Ok(x) => x,
        Err(r) => return r,
    };
    if !versions.contains(&ver) {
        return gitlab_error(StatusCode::NOT_FOUND);
    }
    Json(metadata(&inner, &ns, &name, &sys, &ver, &versions)).into_response()
}

async fn latest_download(
    State(inner): State<Arc<Inner>>,
    Path((ns, name, sys)): ModPath,
    headers: HeaderMap,
) -> Response {
    let (_, versions) = match readable(&inner, &headers, &ns, &name, &sys) {
        Ok(x) => x,
        Err(r) => return r,
    };
    match latest_by_string(&versions) {
        Some(v) => {
            let loc = format!("{}{V1}/{ns}/{name}/{sys}/{v}/download", inner.prefix);
            (StatusCode::FOUND, [(header::LOCATION, loc)]).into_response()
        }
        None => gitlab_error(StatusCode::NOT_FOUND),
    }
}

async fn download(
    State(inner): State<Arc<Inner>>,
    Path((ns, name, sys, ver)): VerPath,
    headers: HeaderMap,
) -> Response {
    let (caller, versions) = match readable(&inner, &headers, &ns, &name, &sys) {
        Ok(x) => x,
        Err(r) => return r,
    };
    if !versions.contains(&ver) {
        return gitlab_error(StatusCode::NOT_FOUND);
    }
    let token = match caller {
        Caller::Token(t) => jwt_sign(&inner, &t, false),
        Caller::Anonymous => String::new(),
    };
    let get = format!(
        "{}{V1}/{ns}/{name}/{sys}/{ver}/file?token={token}&archive=tgz",
        inner.prefix
    );
    (StatusCode::NO_CONTENT, [("x-terraform-get", get)]).into_response()
}

#[derive(serde::Deserialize)]
struct FileQuery {
    token: Option<String>,
}

async fn file(
    State(inner): State<Arc<Inner>>,
    Path((ns, name, sys, ver)): VerPath,
    Query(q): Query<FileQuery>,
) -> Response {
    // `/file` ignores headers: the JWT in the query is the only credential.
    let caller = match q.token.as_deref() {
        None | Some("") => Caller::Anonymous,
        Some(jwt) => match jwt_verify(&inner, jwt) {
            Some(t) => Caller::Token(t),
            None => return gitlab_error(StatusCode::UNAUTHORIZED),
        },
    };
    if let Err(r) = inner.authorize(&caller, &ns) {
        // A JWT-authenticated caller without access gets 404 here in GitLab; anonymous 401.
        return match caller {
            Caller::Anonymous => r,
            Caller::Token(_) => gitlab_error(StatusCode::NOT_FOUND),
        };
    }
    serve_tarball(&inner, &ns, &name, &sys, &ver)
}

fn serve_tarball(inner: &Inner, ns: &str, name: &str, sys: &str, ver: &str) -> Response {
    let bytes = {
        let r = inner.registry.lock().unwrap();
        r.modules
            .get(&(ns.into(), name.into(), sys.into()))
            .and_then(|m| m.1.get(ver).cloned())
    };
    let Some(bytes) = bytes else {
        return gitlab_error(StatusCode::NOT_FOUND);
    };
    if *inner.object_storage.lock().unwrap() {
        let key = format!("{:x}", Sha256::digest(&bytes));
        let sig = hmac_hex(&inner.secret, key.as_bytes());
        inner
            .registry
            .lock()
            .unwrap()
            .objects
            .insert(key.clone(), bytes);
        let file = if *inner.opaque_objects.lock().unwrap() {
            String::new()
        } else {
            format!("/{name}-{sys}-{ver}.tgz")
        };
        let loc = format!(
            "{}/bucket/{key}{file}?X-Amz-Expires=300&X-Amz-Signature={sig}",
            inner.objects_url
        );
        return (StatusCode::FOUND, [(header::LOCATION, loc)]).into_response();
    }
    // GitLab's `present_carrierwave_file!` names the package file `<name>-<system>-<version>.tgz`.
    let disposition = format!("attachment; filename=\"{name}-{sys}-{ver}.tgz\"");
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_DISPOSITION, disposition),
        ],
        bytes,
    )
        .into_response()
}

#[derive(serde::Deserialize)]
struct SignedQuery {
    #[serde(rename = "X-Amz-Signature")]
    sig: Option<String>,
}

/// Object storage by key and file name: the name is part of the path, not of the signature.
async fn object_file_get(
    state: State<Arc<Inner>>,
    method: Method,
    Path((key, _file)): Path<(String, String)>,
    query: Query<SignedQuery>,
    headers: HeaderMap,
) -> Response {
    object_get(state, method, Path(key), query, headers).await
}

/// Object storage: a presigned GET. HEAD is refused (the signature covers the method).
async fn object_get(
    State(inner): State<Arc<Inner>>,
    method: Method,
    Path(key): Path<String>,
    Query(q): Query<SignedQuery>,
    headers: HeaderMap,
) -> Response {
    inner.hits.lock().unwrap().push(Hit {
        method: method.clone(),
        path: format!("/bucket/{key}"),
        query: None,
        headers: if *inner.record_headers.lock().unwrap() {
            headers
        } else {
            HeaderMap::new()
        },
        counted_as: None,
    });
    if method == Method::HEAD || q.sig.as_deref() != Some(&hmac_hex(&inner.secret, key.as_bytes()))
    {
        return (
            StatusCode::FORBIDDEN,
            "<Error><Code>SignatureDoesNotMatch</Code></Error>",
        )
            .into_response();
    }
    let bytes = inner.registry.lock().unwrap().objects.get(&key).cloned();
    match bytes {
        Some(b) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/x-tar")],
            b,
        )
            .into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

// ---------------------------------------------------------------------------------------------
// Project routes

/// Project routes use Basic auth: username (anything), password = token.
fn basic(headers: &HeaderMap) -> Caller {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.split_once(':').map(|(_, p)| p.to_string()));
    match token {
        Some(t) => Caller::Token(t),
        None => Caller::Anonymous,
    }
}

fn find_project(inner: &Inner, id: &str, name: &str, sys: &str) -> Option<(String, Vec<String>)> {
    let r = inner.registry.lock().unwrap();
    r.modules.iter().find_map(|((g, n, s), (p, versions))| {
        (p.to_string() == id && n == name && s == sys)
            .then(|| (g.clone(), versions.keys().cloned().collect()))
    })
}

#[derive(serde::Deserialize)]
struct ProjectQuery {
    #[serde(rename = "terraform-get")]
    terraform_get: Option<String>,
}

async fn project_latest(
    State(inner): State<Arc<Inner>>,
    Path((id, name, sys)): ModPath,
    q: Query<ProjectQuery>,
    headers: HeaderMap,
) -> Response {
    project_serve(inner, id, name, sys, None, q.0, headers)
}

async fn project_get(
    State(inner): State<Arc<Inner>>,
    Path((id, name, sys, ver)): VerPath,
    q: Query<ProjectQuery>,
    headers: HeaderMap,
) -> Response {
    project_serve(inner, id, name, sys, Some(ver), q.0, headers)
}

fn project_serve(
    inner: Arc<Inner>,
    id: String,
    name: String,
    sys: String,
    ver: Option<String>,
    q: ProjectQuery,
    headers: HeaderMap,
) -> Response {
    let caller = basic(&headers);
    let Some((group, versions)) = find_project(&inner, &id, &name, &sys) else {
        return gitlab_error(StatusCode::NOT_FOUND);
    };
    match inner.authorize(&caller, &group) {
        Ok(()) => {}
        Err(r) if r.status() == StatusCode::UNAUTHORIZED && matches!(caller, Caller::Token(_)) => {
            return r
        }
        // A private project is invisible: 404, never 403.
        Err(_) => return gitlab_error(StatusCode::NOT_FOUND),
    }
    // As GitLab's `present_package_file`: `?terraform-get=1` is answered right after the
    // access check, before the package is looked up, with the request URL (versioned or not).
    if q.terraform_get.as_deref() == Some("1") {
        let version = ver.as_deref().map(|v| format!("/{v}")).unwrap_or_default();
        let get = format!(
            "{}/api/v4/projects/{id}/packages/terraform/modules/{name}/{sys}{version}?archive=tgz",
            inner.base_url
        );
        return (StatusCode::NO_CONTENT, [("x-terraform-get", get)]).into_response();
    }
    let Some(ver) = ver.or_else(|| latest_by_string(&versions)) else {
        return gitlab_error(StatusCode::NOT_FOUND);
    };
    if !versions.contains(&ver) {
        return gitlab_error(StatusCode::NOT_FOUND);
    }
    serve_tarball(&inner, &group, &name, &sys, &ver)
}

async fn project_upload(
    State(inner): State<Arc<Inner>>,
    Path((id, name, sys, ver)): VerPath,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let token = ["private-token", "job-token", "deploy-token"]
        .iter()
        .find_map(|h| {
            headers
                .get(*h)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        });
    let Some(token) = token else {
        return unauthorized();
    };
    let group = {
        let r = inner.registry.lock().unwrap();
        if !r.tokens.contains_key(&token) {
            return unauthorized();
        }
        let found = r
            .modules
            .iter()
            .find_map(|((g, _, _), (p, _))| (p.to_string() == id).then(|| g.clone()));
        match found {
            Some(g) => g,
            None => return gitlab_error(StatusCode::NOT_FOUND),
        }
    };
    if inner.authorize(&Caller::Token(token), &group).is_err() {
        return gitlab_error(StatusCode::FORBIDDEN);
    }
    let mut r = inner.registry.lock().unwrap();
    let project: u64 = id.parse().unwrap_or(0);
    let entry = r
        .modules
        .entry((group, name, sys))
        .or_insert_with(|| (project, BTreeMap::new()));
    if entry.1.contains_key(&ver) {
        return gitlab_error(StatusCode::FORBIDDEN);
    }
    entry.1.insert(ver, body);
    (
        StatusCode::CREATED,
        Json(json!({ "message": "201 Created" })),
    )
        .into_response()
}

/// Group ids: 100 + the group's rank in path order.
fn group_path(inner: &Inner, id: &str) -> Option<String> {
    let r = inner.registry.lock().unwrap();
    let mut paths: Vec<&String> = r.groups.keys().collect();
    paths.sort();
    match id.parse::<usize>() {
        Ok(n) => paths.get(n.checked_sub(100)?).map(|p| p.to_string()),
        Err(_) => r.groups.contains_key(id).then(|| id.to_string()),
    }
}

fn api_caller(headers: &HeaderMap) -> Caller {
    match headers.get("private-token").and_then(|v| v.to_str().ok()) {
        Some(t) => Caller::Token(t.to_string()),
        None => bearer(headers).unwrap_or(Caller::Anonymous),
    }
}

async fn group_info(
    State(inner): State<Arc<Inner>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let Some(path) = group_path(&inner, &id) else {
        return gitlab_error(StatusCode::NOT_FOUND);
    };
    if inner.authorize(&api_caller(&headers), &path).is_err() {
        return gitlab_error(StatusCode::NOT_FOUND);
    }
    Json(json!({ "id": id, "full_path": path })).into_response()
}

#[derive(serde::Deserialize)]
struct PackagesQuery {
    package_type: Option<String>,
    per_page: Option<usize>,
    page: Option<usize>,
}

/// `GET /groups/:id/packages`: the Packages API, paginated with `X-Next-Page`.
async fn group_packages(
    State(inner): State<Arc<Inner>>,
    Path(id): Path<String>,
    Query(q): Query<PackagesQuery>,
    headers: HeaderMap,
) -> Response {
    let Some(path) = group_path(&inner, &id) else {
        return gitlab_error(StatusCode::NOT_FOUND);
    };
    if inner.authorize(&api_caller(&headers), &path).is_err() {
        return gitlab_error(StatusCode::NOT_FOUND);
    }
    let all: Vec<Value> = {
        let r = inner.registry.lock().unwrap();
        r.modules
            .iter()
            .filter(|((g, _, _), _)| *g == path)
            .flat_map(|((_, n, s), (_, versions))| {
                versions.keys().map(move |v| {
                    json!({ "name": format!("{n}/{s}"), "version": v, "package_type": "terraform_module" })
                })
            })
            .filter(|_| q.package_type.as_deref().is_none_or(|t| t == "terraform_module"))
            .collect()
    };
    let per_page = q.per_page.unwrap_or(20).clamp(1, 100);
    let page = q.page.unwrap_or(1).max(1);
    let items: Vec<Value> = all
        .iter()
        .skip((page - 1) * per_page)
        .take(per_page)
        .cloned()
        .collect();
    let next = if page * per_page < all.len() {
        (page + 1).to_string()
    } else {
        String::new()
    };
    (
        StatusCode::OK,
        [("x-next-page", next)],
        Json(Value::Array(items)),
    )
        .into_response()
}

/// A plain GitLab API route for pass-through tests: needs a token, in any of GitLab's forms.
async fn api_version(State(inner): State<Arc<Inner>>, headers: HeaderMap) -> Response {
    let token = headers
        .get("private-token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| match bearer(&headers) {
            Ok(Caller::Token(t)) => Some(t),
            _ => None,
        });
    let known = token.is_some_and(|t| inner.registry.lock().unwrap().tokens.contains_key(&t));
    if !known {
        return unauthorized();
    }
    Json(json!({ "version": "17.5.0", "revision": "fake" })).into_response()
}

/// The user a request's token belongs to (Bearer, `PRIVATE-TOKEN` or `JOB-TOKEN`), if known.
fn token_user(inner: &Inner, headers: &HeaderMap) -> Option<String> {
    let token = caller_token(headers);
    inner.registry.lock().unwrap().tokens.get(&token).cloned()
}

/// `GET /api/v4/user`: the token's user, 401 for an unknown token (and, as GitLab, for a job
/// token: that one reads `/api/v4/job`).
async fn api_user(State(inner): State<Arc<Inner>>, headers: HeaderMap) -> Response {
    match token_user(&inner, &headers) {
        Some(_) if caller_token(&headers).starts_with("glcbt-") => unauthorized(),
        Some(user) => Json(json!({ "id": 1, "username": user, "state": "active" })).into_response(),
        None => unauthorized(),
    }
}

// ---------------------------------------------------------------------------------------------
// CI jobs

/// A JWT-form job token: `glcbt-` and an RS256-shaped JWT whose key GitLab does not publish
/// (the fake signs nothing: only its own job table says whether the token is valid).
fn job_jwt(id: u64, scoped_user_id: Option<u64>, extra_claim: bool) -> String {
    let header = B64.encode(br#"{"alg":"RS256","kid":"ci-job-token","typ":"JWT"}"#);
    let mut claims = json!({
        "sub": format!("gid://gitlab/Ci::Build/{id}"),
        "aud": "gitlab-authz-token",
        "iss": "gitlab.example.com",
        "iat": now(),
        "nbf": now() - 5,
        "exp": now() + 3600,
        "jti": format!("jti-{id}"),
        "cell_id": 1,
        "organization_id": 1,
    });
    if let Some(s) = scoped_user_id {
        claims["scoped_user_id"] = json!(s);
    }
    if extra_claim {
        claims["permissions"] = json!(["read_package"]);
    }
    let body = B64.encode(claims.to_string());
    let sig = B64.encode(format!("not-a-signature-{id}"));
    format!("glcbt-{header}.{body}.{sig}")
}

/// GitLab's JWKS: the public key of its CI ID tokens.
async fn discovery_keys() -> Json<Value> {
    Json(id_tokens::jwks())
}

/// `GET /api/v4/job`: the job of the job token (`JOB-TOKEN`, `job_token`, or Bearer), 200
/// while it runs, 401 once it has finished or for any other token.
async fn current_job(
    State(inner): State<Arc<Inner>>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let token = headers
        .get("job-token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| q.get("job_token").cloned())
        .or_else(|| match bearer(&headers) {
            Ok(Caller::Token(t)) => Some(t),
            _ => None,
        });
    let r = inner.registry.lock().unwrap();
    let Some(job) = token.and_then(|t| r.jobs.get(&t)).filter(|j| j.running) else {
        return unauthorized();
    };
    let (user_id, bot) = r.users[&job.user];
    Json(json!({
        "id": job.id,
        "status": "running",
        "name": "init",
        "ref": "main",
        "user": { "id": user_id, "username": job.user, "bot": bot, "state": "active" },
        "pipeline": { "id": job.id * 10, "project_id": job.project_id, "ref": "main", "status": "running" },
        "web_url": format!("{}/group/project-{}/-/jobs/{}", inner.base_url, job.project_id, job.id),
    }))
    .into_response()
}

// ---------------------------------------------------------------------------------------------
// JWT (HS256), as GitLab's TerraformRegistryToken: wraps the caller's token, expires.

fn hmac_hex(secret: &[u8], data: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
    mac.update(data);
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

// The fake is GitLab, with GitLab's own clock, not tfmirror's (see `.clippy.toml`).
#[allow(clippy::disallowed_methods)]
fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn jwt_sign(inner: &Inner, token: &str, expired: bool) -> String {
    let ttl = inner.jwt_ttl.lock().unwrap().as_secs();
    let exp = if expired { now() - 1 } else { now() + ttl };
    let header = B64.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let claims = B64.encode(json!({ "token": token, "iat": now(), "exp": exp }).to_string());
    let signing_input = format!("{header}.{claims}");
    let mut mac = Hmac::<Sha256>::new_from_slice(&inner.secret).unwrap();
    mac.update(signing_input.as_bytes());
    let sig = B64.encode(mac.finalize().into_bytes());
    format!("{signing_input}.{sig}")
}

/// The wrapped token, if the JWT is authentic and unexpired.
fn jwt_verify(inner: &Inner, jwt: &str) -> Option<String> {
    let (signing_input, sig) = jwt.rsplit_once('.')?;
    let mut mac = Hmac::<Sha256>::new_from_slice(&inner.secret).unwrap();
    mac.update(signing_input.as_bytes());
    mac.verify_slice(&B64.decode(sig).ok()?).ok()?;
    let claims: Value =
        serde_json::from_slice(&B64.decode(signing_input.split_once('.')?.1).ok()?).ok()?;
    if claims["exp"].as_u64()? < now() {
        return None;
    }
    claims["token"].as_str().map(str::to_string)
}
