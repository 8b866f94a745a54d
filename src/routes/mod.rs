//! Parse each request once into a typed [`Route`].
//!
//! Everything downstream (proxy decisions, rewriting, logging, metrics) works on the typed
//! route, never on the raw path again. Module coordinates are validated here the way GitLab
//! validates them (`[\w.-]+` segments, strict SemVer versions), so a request that can never be
//! valid is refused locally with a GitLab-shaped 4xx and never reaches the upstream.
//!
//! Percent-encoding is decoded per segment before validation, and registry routes are rebuilt
//! from their typed parts when forwarded (see [`ModuleRoute::upstream_path`]), so `%2e%2e`,
//! encoded slashes or odd encodings cannot make the upstream see another path than the one
//! that was checked.

mod module;
mod project;
pub mod provider;

pub use module::{ModuleId, ModuleOp, ModuleRoute};
pub use project::{ProjectOp, ProjectRoute};

use std::borrow::Cow;

use http::{Method, StatusCode};
use percent_encoding::percent_decode_str;
use semver::Version;

/// Root of GitLab's namespace-level module registry API; also what discovery advertises.
pub const MODULES_V1: &str = "/api/v4/packages/terraform/modules/v1/";
const PROJECTS: &str = "/api/v4/projects/";
const PROJECT_MODULES: &str = "packages/terraform/modules/";
/// Root of tfmirror's provider mirror.
const PROVIDERS: &str = "/providers/";

/// The number of path segments `prefix` (`/a/b/`) takes: its slashes but the first.
const fn segments_in(prefix: &str) -> usize {
    let (bytes, mut i, mut n) = (prefix.as_bytes(), 1, 0);
    while i < bytes.len() {
        n += (bytes[i] == b'/') as usize;
        i += 1;
    }
    n
}

/// Longest path accepted. GitLab's own limit on a request line is larger, but no registry
/// path comes close to this and long paths are a cheap way to burn memory.
pub const MAX_PATH_LEN: usize = 2048;
/// Longest raw path segment accepted on any route.
const MAX_RAW_SEGMENT_LEN: usize = 1024;
/// Longest namespace or project path component (GitLab's own limit is 255).
pub(super) const MAX_SEGMENT_LEN: usize = 255;
/// Terraform's limit for module names and target systems.
pub(super) const MAX_NAME_LEN: usize = 64;

/// tfmirror's own endpoints, under GitLab's `/-/` convention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Internal {
    /// Liveness.
    Health,
    /// Config loaded and cache dir writable; stays ready while the upstream is down.
    Readiness,
    /// Prometheus text exposition.
    Metrics,
    /// `POST /-/admin/purge?module=ns/name/system[@version]`, behind `admin_token`.
    AdminPurge,
    /// `POST /-/test/clock?advance_ms=N`: moves this process's clock forward (the
    /// `test-clock` feature of test builds only; see [`crate::clock`]).
    #[cfg(feature = "test-clock")]
    TestClock,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `GET /.well-known/terraform.json`, answered locally.
    Discovery,
    Internal(Internal),
    Module(ModuleRoute),
    Project(ProjectRoute),
    /// `/providers/...`: the provider mirror (see [`crate::providers`]).
    Provider(provider::ProviderRoute),
    /// Any other path: forwarded unchanged.
    PassThrough,
}

impl Route {
    /// What the route serves, as the `kind` label of request metrics: `module`, `provider`,
    /// or `other` (discovery, `/-/...`, pass-through).
    pub fn kind(&self) -> &'static str {
        match self {
            Route::Module(_) | Route::Project(_) => "module",
            Route::Provider(p) if p.is_module() => "module",
            Route::Provider(_) => "provider",
            _ => "other",
        }
    }

    /// A fixed label for logs and metrics. Never contains request data.
    pub fn template(&self) -> &'static str {
        match self {
            Route::Discovery => "discovery",
            Route::Internal(Internal::Health) => "health",
            Route::Internal(Internal::Readiness) => "readiness",
            Route::Internal(Internal::Metrics) => "metrics",
            Route::Internal(Internal::AdminPurge) => "admin_purge",
            #[cfg(feature = "test-clock")]
            Route::Internal(Internal::TestClock) => "test_clock",
            Route::Module(m) => match m.op {
                ModuleOp::Versions => "module_versions",
                ModuleOp::Latest => "module_latest",
                ModuleOp::Version(_) => "module_version",
                ModuleOp::LatestDownload => "module_latest_download",
                ModuleOp::Download(_) => "module_download",
                ModuleOp::File(_) => "module_file",
            },
            Route::Project(p) => match p.op {
                ProjectOp::Download { .. } => "project_download",
                ProjectOp::Upload { .. } => "project_upload",
            },
            Route::Provider(p) => p.template(),
            Route::PassThrough => "passthrough",
        }
    }
}

/// Why a request was refused before reaching the upstream. Messages are fixed strings: they
/// never echo the request, so nothing a client sent can be reflected or logged through them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    pub status: StatusCode,
    pub message: &'static str,
}

impl Reject {
    pub const fn new(status: StatusCode, message: &'static str) -> Self {
        Reject { status, message }
    }
    fn bad(message: &'static str) -> Self {
        Reject::new(StatusCode::BAD_REQUEST, message)
    }
    fn not_found() -> Self {
        Reject::new(StatusCode::NOT_FOUND, "404 Not Found")
    }
    fn method() -> Self {
        Reject::new(StatusCode::METHOD_NOT_ALLOWED, "405 Method Not Allowed")
    }

    /// The JSON body GitLab would send: Grape uses `error` for parameter validation (400) and
    /// `message` for everything else.
    pub fn body(&self) -> String {
        let key = if self.status == StatusCode::BAD_REQUEST {
            "error"
        } else {
            "message"
        };
        serde_json::json!({ key: self.message }).to_string()
    }
}

/// Parse `method` and `path` (no query) into a route.
pub fn parse(method: &Method, path: &str) -> Result<Route, Reject> {
    if path.len() > MAX_PATH_LEN {
        return Err(Reject::new(StatusCode::URI_TOO_LONG, "414 URI Too Long"));
    }
    if !path.starts_with('/') {
        return Err(Reject::bad("path must be absolute"));
    }
    // Decode and check every segment once, whatever the route: no `.`/`..`, no NUL or control
    // bytes, no backslashes, in raw or encoded form. Encoded slashes are kept inside their
    // segment (GitLab uses them for project paths) but checked component by component.
    let segments = split_segments(path)?;

    if path == "/.well-known/terraform.json" {
        return match *method {
            Method::GET | Method::HEAD => Ok(Route::Discovery),
            _ => Err(Reject::method()),
        };
    }
    if let Some(rest) = path.strip_prefix("/-/") {
        return match rest {
            "health" => Ok(Route::Internal(Internal::Health)),
            "readiness" => Ok(Route::Internal(Internal::Readiness)),
            "metrics" => Ok(Route::Internal(Internal::Metrics)),
            "admin/purge" => Ok(Route::Internal(Internal::AdminPurge)),
            #[cfg(feature = "test-clock")]
            "test/clock" => Ok(Route::Internal(Internal::TestClock)),
            _ => Err(Reject::not_found()),
        };
    }
    if path.starts_with(MODULES_V1) || path == &MODULES_V1[..MODULES_V1.len() - 1] {
        const SKIP: usize = segments_in(MODULES_V1);
        return module::parse_module(method, &segments[SKIP..]).map(Route::Module);
    }
    if path.starts_with(PROVIDERS) {
        return provider::parse(method, &segments[1..]).map(Route::Provider);
    }
    if let Some(rest) = path.strip_prefix(PROJECTS) {
        // `:id/packages/terraform/modules/...`
        if let Some((_, after)) = rest.split_once('/') {
            if after.starts_with(PROJECT_MODULES) {
                const SKIP: usize = segments_in(PROJECTS);
                return project::parse_project(method, &segments[SKIP..]).map(Route::Project);
            }
        }
    }
    Ok(Route::PassThrough)
}

/// The path's segments (after the leading `/`), each decoded and checked by
/// [`decode_segment`], in one pass over the bytes that finds the slashes and classifies each
/// segment at once (a `str::split` per segment cost a `memchr` set-up each: about 2% of a
/// cached hit).
fn split_segments(path: &str) -> Result<Vec<Cow<'_, str>>, Reject> {
    // A listing path has 11 segments: room for them, and most others, in one allocation.
    let mut segments = Vec::with_capacity(16);
    let bytes = path.as_bytes();
    let (mut start, mut plain) = (1, true);
    for i in 1..=bytes.len() {
        let b = bytes.get(i).copied().unwrap_or(b'/');
        match b {
            b'/' => {
                segments.push(decode_segment(&path[start..i], plain)?);
                (start, plain) = (i + 1, true);
            }
            // Refused here as `decode_segment_fully` would refuse them, unless the whole
            // segment is too long: that is said first, as for any segment.
            0..=0x1f | 0x7f | b'\\' => {
                let end = bytes[i..]
                    .iter()
                    .position(|&b| b == b'/')
                    .map_or(bytes.len(), |n| i + n);
                decode_segment(&path[start..end], false)?;
                return Err(forbidden());
            }
            b'%' | b'.' | 0x80.. => plain = false,
            _ => {}
        }
    }
    Ok(segments)
}

/// One raw segment, decoded and checked. `plain`: the caller saw no `%`, no `.`, no byte
/// over 0x7f and no control byte or backslash in it (most segments): then there is nothing
/// to decode, no multi-byte character to check and no dot segment.
fn decode_segment(raw: &str, plain: bool) -> Result<Cow<'_, str>, Reject> {
    if raw.len() > MAX_RAW_SEGMENT_LEN {
        return Err(Reject::bad("path segment is too long"));
    }
    if plain {
        return Ok(Cow::Borrowed(raw));
    }
    decode_segment_fully(raw)
}

/// [`decode_segment`]'s checks done in full: decode, then look at every character.
fn decode_segment_fully(raw: &str) -> Result<Cow<'_, str>, Reject> {
    // Without a `%` there is nothing to decode, and `raw` is already text: the decoder's pass
    // and its UTF-8 check would give it back unchanged.
    let decoded = if raw.contains('%') {
        percent_decode_str(raw)
            .decode_utf8()
            .map_err(|_| Reject::bad("path is not valid UTF-8"))?
    } else {
        Cow::Borrowed(raw)
    };
    if decoded
        .chars()
        .any(|c| c.is_control() || c == '\\' || c == '\u{0}')
    {
        return Err(forbidden());
    }
    if decoded.split('/').any(|c| c == "." || c == "..") {
        return Err(Reject::bad("path contains dot segments"));
    }
    Ok(decoded)
}

fn forbidden() -> Reject {
    Reject::bad("path contains forbidden characters")
}

/// GitLab's `package_name_regex` for each part: word characters, dots and dashes.
pub(super) fn valid_part(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

pub(super) fn parse_version(s: &str, param: &'static str) -> Result<Version, Reject> {
    // Strict SemVer 2.0, as GitLab's `semver_regex`: no `v` prefix, no leading zeros.
    Version::parse(s).map_err(|_| Reject::bad(param))
}

pub(super) fn read_only(method: &Method) -> Result<(), Reject> {
    match *method {
        Method::GET | Method::HEAD => Ok(()),
        _ => Err(Reject::method()),
    }
}

#[cfg(test)]
mod tests;
