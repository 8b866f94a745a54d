//! `tfmirror check`: a configuration checked before it goes live (`nginx -t`, `haproxy -c`).
//!
//! The settings are read as `serve` reads them; then, unless offline, GitLab is reached step
//! by step (DNS, TCP, TLS with the configured trust, service discovery, a token's read), so
//! that a failure names the step and the fix; then the cache directory, the key file and each
//! provider registry. Every client here is `upstream::tls`'s, with the trust `serve` uses: a
//! check that trusted something else would pass a configuration that fails in production.
//! What each finding means is decided in [`verdict`]; this file only looks.

mod verdict;

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use super::serve::ServeFlags;
use super::{Common, Credential};
use crate::config::{Config, LogLevel};
use crate::upstream::tls::{self, Schemes, Trust};
use crate::upstream::Upstream;
use verdict::{DirState, Line, Probe};

#[derive(Args, Debug)]
pub(super) struct CheckArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    flags: ServeFlags,
    #[command(flatten)]
    credential: Credential,
    /// Check the token on this module's version list, the read Terraform makes. Without it:
    /// `/api/v4/user` (`/api/v4/job` for a CI job token).
    #[arg(long, value_name = "NAMESPACE/NAME/SYSTEM")]
    module: Option<String>,
}

const V1: &str = "/api/v4/packages/terraform/modules/v1";

/// Prints each line as it is found (a slow check shows where it waits), masking the token.
struct Report<'a> {
    lines: Vec<Line>,
    secrets: Vec<&'a str>,
}

impl Report<'_> {
    fn add(&mut self, line: Line) {
        println!("{}", line.render(&self.secrets));
        self.lines.push(line);
    }
}

pub(super) fn check(args: CheckArgs) -> ExitCode {
    let token = args.credential.token.as_deref().unwrap_or_default();
    let mut report = Report {
        lines: Vec::new(),
        secrets: vec![token],
    };
    // As `serve` reads them; a bad one is a failed check (1), not a usage error (2).
    let config = match Config::load(args.common.config.as_deref(), &settings(&args)) {
        Ok(c) => c,
        Err(e) => {
            report.add(Line::failed(
                "configuration",
                e.to_string(),
                "correct the setting named (file, TFMIRROR_* variable or flag)",
            ));
            return ExitCode::from(verdict::exit_code(&report.lines));
        }
    };
    // Only warnings and errors of the libraries; the report is the output.
    super::logging::init(LogLevel::Warn, config.log_format, false);
    let source = match &args.common.config {
        Some(p) => format!("valid ({})", p.display()),
        None => "valid (defaults, environment and flags)".into(),
    };
    report.add(Line::ok("configuration", source));
    let rt = super::runtime();
    if config.offline.enabled {
        report.add(Line::skipped(
            "upstream",
            "offline: GitLab and the provider registries are not contacted",
        ));
    } else {
        rt.block_on(gitlab(&config, &args, &mut report));
    }
    for line in cache(&config) {
        report.add(line);
    }
    for line in key_files(&config) {
        report.add(line);
    }
    if !config.offline.enabled {
        rt.block_on(providers(&config, &mut report));
    }
    let code = verdict::exit_code(&report.lines);
    let count = |s| report.lines.iter().filter(|l| l.status == s).count();
    println!(
        "check: {} ok, {} skipped, {} warnings, {} failed",
        count(verdict::Status::Ok),
        count(verdict::Status::Skipped),
        count(verdict::Status::Warning),
        count(verdict::Status::Failed)
    );
    ExitCode::from(code)
}

fn settings(args: &CheckArgs) -> crate::config::Overrides {
    let c = &args.common;
    crate::config::Overrides {
        upstream: c.upstream.clone(),
        upstream_ca: c.upstream_ca.clone(),
        cache_dir: c.cache_dir.clone(),
        secret_file: c.secret_file.clone(),
        log_level: c.log_level.clone(),
        log_format: c.log_format.clone(),
        ..args.flags.overrides()
    }
}

/// An error with its causes, without the URL (which carries no token here, but may one day).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        // Some errors repeat their cause in their own text: said once.
        let said = c.to_string();
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        cause = c.source();
    }
    text
}

/// GitLab, step by step; stops at the first step that fails (the next ones would only
/// repeat it).
async fn gitlab(config: &Config, args: &CheckArgs, report: &mut Report<'_>) {
    let url = &config.upstream;
    let host = url.host_str().unwrap_or_default();
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let port = url.port_or_known_default().unwrap_or(443);
    let wait = config.timeouts.connect;
    let Some(addr) = resolve(bare, port, wait, report).await else {
        return;
    };
    if !reach(addr, wait, report).await {
        return;
    }
    if url.scheme() == "https" && !tls(config, bare, addr, report).await {
        return;
    }
    let upstream = match Upstream::new(config) {
        Ok(u) => u,
        Err(e) => {
            return report.add(Line::failed("upstream", e, verdict::tls_fix(false)));
        }
    };
    if !discovery(&upstream, report).await {
        return;
    }
    match &args.credential.token {
        None => report.add(Line::skipped(
            "token",
            "no --token (or TFMIRROR_TOKEN): pass one to check that GitLab accepts it",
        )),
        Some(token) => report.add(token_read(&upstream, token, args.module.as_deref()).await),
    }
}

async fn resolve(
    host: &str,
    port: u16,
    wait: Duration,
    report: &mut Report<'_>,
) -> Option<std::net::SocketAddr> {
    const WHAT: &str = "upstream DNS";
    let found = tokio::time::timeout(wait, tokio::net::lookup_host((host, port))).await;
    let fix = "check the host name in `upstream`, and this machine's DNS resolver";
    match found {
        Ok(Ok(mut addrs)) => match addrs.next() {
            Some(a) => {
                report.add(Line::ok(WHAT, format!("{host} is {}", a.ip())));
                Some(a)
            }
            None => {
                report.add(Line::failed(WHAT, format!("{host} has no address"), fix));
                None
            }
        },
        Ok(Err(e)) => {
            report.add(Line::failed(WHAT, format!("{host}: {e}"), fix));
            None
        }
        Err(_) => {
            report.add(Line::failed(
                WHAT,
                format!("{host}: no answer in {wait:?}"),
                fix,
            ));
            None
        }
    }
}

async fn reach(addr: std::net::SocketAddr, wait: Duration, report: &mut Report<'_>) -> bool {
    const WHAT: &str = "upstream connect";
    let fix = "is GitLab up, and is this port open from here? tfmirror connects directly, \
               never through HTTP_PROXY";
    let started = std::time::Instant::now();
    match tokio::time::timeout(wait, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => {
            let ms = started.elapsed().as_millis();
            report.add(Line::ok(WHAT, format!("{addr} in {ms} ms")));
            true
        }
        Ok(Err(e)) => {
            report.add(Line::failed(WHAT, format!("{addr}: {e}"), fix));
            false
        }
        Err(_) => {
            let why = format!("{addr}: no connection in {wait:?} (`timeouts.connect`)");
            report.add(Line::failed(WHAT, why, fix));
            false
        }
    }
}

/// A TLS handshake with GitLab, with the trust `serve`'s clients use.
async fn tls(
    config: &Config,
    host: &str,
    addr: std::net::SocketAddr,
    report: &mut Report<'_>,
) -> bool {
    const WHAT: &str = "upstream TLS";
    let fix = verdict::tls_fix(config.upstream_ca.is_some());
    let tls = Trust::gitlab(config).and_then(|trust| tls::client_config(&trust, &[b"http/1.1"]));
    let tls = match tls {
        Ok(t) => t,
        Err(e) => {
            report.add(Line::failed(WHAT, e, fix));
            return false;
        }
    };
    let Ok(name) = rustls::pki_types::ServerName::try_from(host.to_string()) else {
        report.add(Line::failed(
            WHAT,
            format!("{host} is no TLS server name"),
            fix,
        ));
        return false;
    };
    let handshake = async {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls));
        connector.connect(name, tcp).await
    };
    match tokio::time::timeout(config.timeouts.connect, handshake).await {
        Ok(Ok(_)) => {
            report.add(Line::ok(
                WHAT,
                format!("{host} presents a certificate tfmirror trusts"),
            ));
            true
        }
        Ok(Err(e)) => {
            report.add(Line::failed(
                WHAT,
                format!("handshake with {host}: {}", chain(&e)),
                fix,
            ));
            false
        }
        Err(_) => {
            let why = format!("no handshake with {host} in {:?}", config.timeouts.connect);
            report.add(Line::failed(WHAT, why, "is this port GitLab's HTTPS port?"));
            false
        }
    }
}

/// A GET through the upstream client: status and body, or the failure in words (no URL).
async fn get(
    client: &reqwest::Client,
    url: &str,
    bearer: Option<&str>,
    wait: Duration,
) -> Result<(u16, Vec<u8>), String> {
    let mut request = client.get(url).timeout(wait);
    if let Some(token) = bearer {
        let mut value = http::HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| "the token is not a valid header value".to_string())?;
        value.set_sensitive(true);
        request = request.header(http::header::AUTHORIZATION, value);
    }
    let response = request.send().await.map_err(|e| chain(&e.without_url()))?;
    let status = response.status().as_u16();
    let body = response
        .bytes()
        .await
        .map_err(|e| chain(&e.without_url()))?;
    Ok((status, body.to_vec()))
}

async fn discovery(upstream: &Upstream, report: &mut Report<'_>) -> bool {
    const WHAT: &str = "service discovery";
    let fix = "check `upstream`: the URL of GitLab itself (with its relative URL root, if any)";
    let url = upstream.url_for("/.well-known/terraform.json");
    let answer = get(&upstream.http, &url, None, upstream.registry_timeout()).await;
    let line = match answer {
        Ok((200, body)) => {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            match v["modules.v1"].as_str() {
                Some(root) => Line::ok(WHAT, format!("modules.v1 at {root}")),
                None => Line::failed(WHAT, "the answer names no modules.v1 service", fix),
            }
        }
        Ok((status, _)) => Line::failed(WHAT, format!("GitLab answered {status}"), fix),
        Err(e) => Line::failed(
            WHAT,
            e,
            "GitLab answers TCP and TLS but not HTTP: check `upstream`",
        ),
    };
    let ok = line.status == verdict::Status::Ok;
    report.add(line);
    ok
}

async fn token_read(upstream: &Upstream, token: &str, module: Option<&str>) -> Line {
    let probe = Probe::of(token, module);
    let path = match probe {
        Probe::Module(m) => {
            let path = format!("{V1}/{m}/versions");
            let valid = crate::routes::parse(&http::Method::GET, &path).is_ok()
                && m.split('/').count() == 3;
            if !valid {
                return Line::failed(
                    "token",
                    "--module is no NAMESPACE/NAME/SYSTEM",
                    "name the module as in its source: infra/vpc/aws",
                );
            }
            path
        }
        Probe::Job => "/api/v4/job".into(),
        Probe::User => "/api/v4/user".into(),
    };
    let url = upstream.url_for(&path);
    match get(
        &upstream.http,
        &url,
        Some(token),
        upstream.registry_timeout(),
    )
    .await
    {
        Ok((status, body)) => {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let found = match probe {
                Probe::Module(_) => v["modules"][0]["versions"]
                    .as_array()
                    .map(|a| a.len().to_string()),
                Probe::Job => v["user"]["username"].as_str().map(str::to_string),
                Probe::User => v["username"].as_str().map(str::to_string),
            };
            verdict::token(probe, status, found.as_deref())
        }
        Err(e) => Line::failed("token", e, "GitLab did not answer: run the check again"),
    }
}

/// The cache directory: there or can be made, private, room for `cache.disk_size`.
fn cache(config: &Config) -> Vec<Line> {
    let dir = &config.cache_dir;
    let shown = dir.display().to_string();
    let state = match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => DirState::Dir {
            mode: std::os::unix::fs::PermissionsExt::mode(&m.permissions()),
            writable: writable(dir),
        },
        Ok(_) => DirState::NotDir,
        Err(_) => {
            // The nearest ancestor that exists (the relative `.` at worst).
            let mut up = dir.as_path();
            while !up.exists() {
                up = match up.parent() {
                    Some(p) if !p.as_os_str().is_empty() => p,
                    _ => Path::new("."),
                };
            }
            DirState::Missing {
                ancestor: up.display().to_string(),
                is_dir: up.is_dir(),
                writable: up.is_dir() && writable(up),
            }
        }
    };
    let mut lines = vec![verdict::cache_dir(&shown, &state)];
    let measured = match &state {
        DirState::Dir { .. } => Some(dir.as_path()),
        DirState::Missing { is_dir: true, .. } => None,
        _ => return lines,
    };
    let on = measured.map_or_else(|| nearest(dir), Path::to_path_buf);
    if let Ok(fs) = nix::sys::statvfs::statvfs(&on) {
        let available = fs.blocks_available() * fs.fragment_size();
        let cached = measured.map_or(0, du);
        lines.push(verdict::space(
            available,
            cached,
            config.cache.disk_size.as_u64(),
        ));
    }
    lines
}

fn nearest(dir: &Path) -> std::path::PathBuf {
    dir.ancestors()
        .find(|p| p.is_dir())
        .unwrap_or(Path::new("."))
        .to_path_buf()
}

fn writable(dir: &Path) -> bool {
    use nix::unistd::AccessFlags;
    nix::unistd::access(dir, AccessFlags::W_OK | AccessFlags::X_OK).is_ok()
}

/// Bytes of the regular files under `dir` (what the cache holds already).
fn du(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => du(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

/// The key files, checked as `serve` opens them (owner and mode; never their contents).
fn key_files(config: &Config) -> Vec<Line> {
    const WHAT: &str = "key file";
    let fix = "see the message: a key file someone else may have read is never used";
    let Some(file) = &config.secret_file else {
        let instance = config.cache_dir.join("secret.key");
        if !instance.exists() {
            return vec![Line::ok(
                WHAT,
                "cache_dir/secret.key is made at first start (0600)",
            )];
        }
        // It exists: this only reads it, with `serve`'s checks.
        return vec![
            match crate::secret::Secret::load_or_create(&config.cache_dir) {
                Ok(_) => Line::ok(WHAT, format!("{} is private", instance.display())),
                Err(e) => Line::failed(WHAT, e, fix),
            },
        ];
    };
    let mut lines = Vec::new();
    for (key, path) in [
        ("secret_file", Some(file)),
        ("secret_previous_file", config.secret_previous_file.as_ref()),
    ] {
        let Some(path) = path else { continue };
        lines.push(match crate::secret::Secret::read_file(path) {
            Ok(_) => Line::ok(WHAT, format!("`{key}` {} is private", path.display())),
            Err(e) => Line::failed(WHAT, format!("`{key}`: {e}"), fix),
        });
    }
    lines
}

/// Each provider registry's service discovery, with the providers' trust. A failure is a
/// warning: modules are served without them.
async fn providers(config: &Config, report: &mut Report<'_>) {
    const WHAT: &str = "provider registry";
    let client = Trust::providers(config)
        .and_then(|trust| tls::http_client(&trust, &config.timeouts, Schemes::HttpsOnly));
    let client = match client {
        Ok(c) => c,
        Err(e) => return report.add(Line::failed(WHAT, e, "correct `providers.upstream_ca`")),
    };
    let fix = "check `providers.upstreams` (and `providers.upstream_ca`); if runners fetch no \
               providers through tfmirror, set `providers.upstreams: {}`";
    for (host, base) in config.providers.upstreams() {
        let Ok(url) = base.join("/.well-known/terraform.json") else {
            continue;
        };
        let line = match get(&client, url.as_str(), None, config.timeouts.read).await {
            Ok((200, body)) => {
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                match v["providers.v1"].as_str() {
                    Some(_) => Line::ok(WHAT, format!("{host}: providers.v1 found")),
                    None => Line::warning(WHAT, format!("{host}: no providers.v1 service"), fix),
                }
            }
            Ok((status, _)) => Line::warning(WHAT, format!("{host}: answered {status}"), fix),
            Err(e) => Line::warning(WHAT, format!("{host}: {e}"), fix),
        };
        report.add(line);
    }
}
