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

use std::borrow::Cow;
use std::fmt;

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
const MAX_SEGMENT_LEN: usize = 255;
/// Terraform's limit for module names and target systems.
const MAX_NAME_LEN: usize = 64;

/// A module as the namespace routes address it: `namespace/name/system`.
///
/// Kept as that one string, with where its parts start: one allocation per request rather
/// than three, and the path that keys, labels and log lines use is there as it is.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ModuleId {
    path: String,
    /// Where `name` and `system` start in `path`.
    name_at: usize,
    system_at: usize,
}

impl ModuleId {
    /// The module `namespace/name/system`. The parts are not checked here: routes come from
    /// [`parse`], which checks them.
    pub fn new(namespace: &str, name: &str, system: &str) -> ModuleId {
        let mut path = String::with_capacity(namespace.len() + name.len() + system.len() + 2);
        path.push_str(namespace);
        path.push('/');
        let name_at = path.len();
        path.push_str(name);
        path.push('/');
        let system_at = path.len();
        path.push_str(system);
        ModuleId {
            path,
            name_at,
            system_at,
        }
    }

    pub fn namespace(&self) -> &str {
        &self.path[..self.name_at - 1]
    }

    pub fn name(&self) -> &str {
        &self.path[self.name_at..self.system_at - 1]
    }

    pub fn system(&self) -> &str {
        &self.path[self.system_at..]
    }

    /// `namespace/name/system`.
    pub fn as_str(&self) -> &str {
        &self.path
    }

    /// `namespace/name/system`, owned (for keys).
    pub fn path(&self) -> String {
        self.path.clone()
    }

    /// The length of [`path`](Self::path).
    pub fn path_len(&self) -> usize {
        self.path.len()
    }

    /// Append [`path`](Self::path) to `out`.
    pub fn push_path(&self, out: &mut String) {
        out.push_str(&self.path);
    }
}

impl fmt::Display for ModuleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.path)
    }
}

impl fmt::Debug for ModuleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ModuleId({})", self.path)
    }
}

/// The six namespace routes of GitLab's module registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModuleOp {
    /// `GET P/versions`
    Versions,
    /// `GET P`: metadata of the latest version.
    Latest,
    /// `GET P/:version`
    Version(Version),
    /// `GET P/download`: GitLab answers 302 to the versioned download.
    LatestDownload,
    /// `GET P/:version/download`: 204 with `X-Terraform-Get`.
    Download(Version),
    /// `GET P/:version/file?token=<JWT>`: the tarball itself.
    File(Version),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleRoute {
    pub module: ModuleId,
    pub op: ModuleOp,
}

impl ModuleRoute {
    /// The canonical upstream path (without the upstream's relative URL root), rebuilt from the
    /// validated parts rather than copied from the request.
    pub fn upstream_path(&self) -> String {
        // Built in one buffer: a listing hit asks for it on every request.
        let mut out = String::with_capacity(MODULES_V1.len() + self.module.path_len() + 32);
        out.push_str(MODULES_V1);
        self.module.push_path(&mut out);
        let version = |out: &mut String, v: &Version| {
            use std::fmt::Write as _;
            let _ = write!(out, "/{v}");
        };
        match &self.op {
            ModuleOp::Versions => out.push_str("/versions"),
            ModuleOp::Latest => {}
            ModuleOp::Version(v) => version(&mut out, v),
            ModuleOp::LatestDownload => out.push_str("/download"),
            ModuleOp::Download(v) => {
                version(&mut out, v);
                out.push_str("/download");
            }
            ModuleOp::File(v) => {
                version(&mut out, v);
                out.push_str("/file");
            }
        }
        out
    }

    pub fn version(&self) -> Option<&Version> {
        match &self.op {
            ModuleOp::Version(v) | ModuleOp::Download(v) | ModuleOp::File(v) => Some(v),
            _ => None,
        }
    }
}

/// Project-level module routes (`/api/v4/projects/:id/packages/terraform/modules/...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProjectOp {
    /// `GET PP[/:version]`: the tarball, or with `?terraform-get=1` a 204 with an absolute
    /// `X-Terraform-Get`.
    Download { version: Option<Version> },
    /// `PUT PP/:version/file` (and Workhorse's `/file/authorize`).
    Upload { version: Version },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectRoute {
    /// The project id as sent: numeric, or a URL-encoded full path (`group%2Fproject`).
    pub project: String,
    pub name: String,
    pub system: String,
    pub op: ProjectOp,
}

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
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `GET /.well-known/terraform.json`, answered locally.
    Discovery,
    Internal(Internal),
    Module(ModuleRoute),
    Project(ProjectRoute),
    /// `/providers/...`: the provider mirror (see [`crate::providers`]).
    Provider(crate::provider_routes::ProviderRoute),
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
            _ => Err(Reject::not_found()),
        };
    }
    if path.starts_with(MODULES_V1) || path == &MODULES_V1[..MODULES_V1.len() - 1] {
        const SKIP: usize = segments_in(MODULES_V1);
        return parse_module(method, &segments[SKIP..]).map(Route::Module);
    }
    if path.starts_with(PROVIDERS) {
        return crate::provider_routes::parse(method, &segments[1..])
            .map(Route::Provider)
            .map_err(|r| Reject::new(r.status, r.message));
    }
    if let Some(rest) = path.strip_prefix(PROJECTS) {
        // `:id/packages/terraform/modules/...`
        if let Some((_, after)) = rest.split_once('/') {
            if after.starts_with(PROJECT_MODULES) {
                const SKIP: usize = segments_in(PROJECTS);
                return parse_project(method, &segments[SKIP..]).map(Route::Project);
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
fn valid_part(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

fn parse_version(s: &str, param: &'static str) -> Result<Version, Reject> {
    // Strict SemVer 2.0, as GitLab's `semver_regex`: no `v` prefix, no leading zeros.
    Version::parse(s).map_err(|_| Reject::bad(param))
}

fn read_only(method: &Method) -> Result<(), Reject> {
    match *method {
        Method::GET | Method::HEAD => Ok(()),
        _ => Err(Reject::method()),
    }
}

fn parse_module(method: &Method, segs: &[Cow<'_, str>]) -> Result<ModuleRoute, Reject> {
    let (ns, name, system, rest) = match segs {
        [ns, name, system, rest @ ..] => (ns, name, system, rest),
        _ => return Err(Reject::not_found()),
    };
    if !valid_part(ns, MAX_SEGMENT_LEN) {
        return Err(Reject::bad("module_namespace is invalid"));
    }
    if !valid_part(name, MAX_NAME_LEN) {
        return Err(Reject::bad("module_name is invalid"));
    }
    if !valid_part(system, MAX_NAME_LEN) {
        return Err(Reject::bad("module_system is invalid"));
    }
    let op = match rest {
        [] => ModuleOp::Latest,
        [s] if s == "versions" => ModuleOp::Versions,
        [s] if s == "download" => ModuleOp::LatestDownload,
        [v] => ModuleOp::Version(parse_version(v, "module_version is invalid")?),
        [v, s] if s == "download" => {
            ModuleOp::Download(parse_version(v, "module_version is invalid")?)
        }
        [v, s] if s == "file" => ModuleOp::File(parse_version(v, "module_version is invalid")?),
        _ => return Err(Reject::not_found()),
    };
    read_only(method)?;
    Ok(ModuleRoute {
        module: ModuleId::new(ns, name, system),
        op,
    })
}

fn parse_project(method: &Method, segs: &[Cow<'_, str>]) -> Result<ProjectRoute, Reject> {
    // segs: [id, "packages", "terraform", "modules", name, system, rest...]
    let (id, name, system, rest) = match segs {
        [id, _, _, _, name, system, rest @ ..] => (id, name, system, rest),
        _ => return Err(Reject::not_found()),
    };
    let id_ok = id.split('/').all(|c| valid_part(c, MAX_SEGMENT_LEN));
    if !id_ok {
        return Err(Reject::bad("id is invalid"));
    }
    if !valid_part(name, MAX_NAME_LEN) {
        return Err(Reject::bad("module_name is invalid"));
    }
    if !valid_part(system, MAX_NAME_LEN) {
        return Err(Reject::bad("module_system is invalid"));
    }
    let op = match rest {
        [] => {
            read_only(method)?;
            ProjectOp::Download { version: None }
        }
        [v] => {
            read_only(method)?;
            ProjectOp::Download {
                version: Some(parse_version(v, "module_version is invalid")?),
            }
        }
        [v, f] | [v, f, _] if f == "file" => {
            if rest.len() == 3 && rest[2] != "authorize" {
                return Err(Reject::not_found());
            }
            if *method != Method::PUT && *method != Method::POST {
                return Err(Reject::method());
            }
            ProjectOp::Upload {
                version: parse_version(v, "module_version is invalid")?,
            }
        }
        _ => return Err(Reject::not_found()),
    };
    Ok(ProjectRoute {
        project: id.to_string(),
        name: name.to_string(),
        system: system.to_string(),
        op,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(path: &str) -> Result<Route, Reject> {
        parse(&Method::GET, path)
    }

    fn module(path: &str) -> ModuleRoute {
        match get(path) {
            Ok(Route::Module(m)) => m,
            other => panic!("{path}: {other:?}"),
        }
    }

    #[test]
    fn namespace_routes() {
        let p = "/api/v4/packages/terraform/modules/v1/grp/vpc/aws";
        assert_eq!(module(&format!("{p}/versions")).op, ModuleOp::Versions);
        assert_eq!(module(p).op, ModuleOp::Latest);
        assert_eq!(
            module(&format!("{p}/download")).op,
            ModuleOp::LatestDownload
        );
        let v = Version::new(1, 10, 0);
        assert_eq!(
            module(&format!("{p}/1.10.0")).op,
            ModuleOp::Version(v.clone())
        );
        assert_eq!(
            module(&format!("{p}/1.10.0/download")).op,
            ModuleOp::Download(v.clone())
        );
        let f = module(&format!("{p}/1.10.0/file"));
        assert_eq!(f.op, ModuleOp::File(v));
        assert_eq!(f.upstream_path(), format!("{p}/1.10.0/file"));
        assert_eq!(f.module.to_string(), "grp/vpc/aws");
        assert_eq!(f.module.path(), "grp/vpc/aws");
        assert_eq!(f.module.path().capacity(), f.module.path_len());
    }

    #[test]
    fn every_module_route_is_rebuilt_as_it_was_asked() {
        let p = "/api/v4/packages/terraform/modules/v1/grp/vpc/aws";
        for tail in [
            "",
            "/versions",
            "/download",
            "/1.10.0",
            "/1.10.0-rc.1+build.5",
            "/1.10.0/download",
            "/2.0.0/file",
        ] {
            let asked = format!("{p}{tail}");
            let m = module(&asked);
            assert_eq!(m.upstream_path(), asked);
        }
    }

    /// The one-pass check takes a shortcut for plain segments; on any segment it must decide
    /// exactly as the full decode and checks do.
    #[test]
    fn the_quick_segment_check_agrees_with_the_full_one() {
        let mut cases: Vec<String> = [
            "",
            ".",
            "..",
            "...",
            ".a",
            "a.",
            "a..b",
            "%2e",
            "%2E%2e",
            "%2e.",
            "a%2fb",
            "a%2f..",
            "%2f.%2f",
            "a\\b",
            "a%5cb",
            "a%00b",
            "a%7fb",
            "a%c2%85b",
            "a%c2%a0b",
            "\u{85}",
            "é",
            "a%ff",
            "%",
            "%zz",
            "a+b",
            "~user",
            "1.0.0",
            "glpat-abc_DEF",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        // Every single byte that can stand in a `&str` path, alone and between letters.
        for b in (0u8..0x80)
            .map(char::from)
            .chain(['\u{80}', '\u{9f}', '\u{a0}', '\u{2028}'])
        {
            cases.push(b.to_string());
            cases.push(format!("ab{b}cd"));
        }
        for raw in cases.iter().filter(|r| !r.contains('/')) {
            let path = format!("/{raw}");
            let quick = split_segments(&path).map_err(|r| r.message);
            let full = decode_segment_fully(raw)
                .map(|s| vec![s])
                .map_err(|r| r.message);
            assert_eq!(quick, full, "{raw:?}");
        }
    }

    #[test]
    fn route_prefixes_are_counted_in_segments() {
        assert_eq!(
            segments_in(MODULES_V1),
            MODULES_V1[1..].split('/').count() - 1
        );
        assert_eq!(segments_in(PROJECTS), PROJECTS[1..].split('/').count() - 1);
    }

    /// The one-pass split gives the segments, and the first refusal, that splitting at every
    /// `/` and checking each segment in full gives, long segments included.
    #[test]
    fn the_one_pass_split_agrees_with_split_then_check() {
        let long = "a".repeat(MAX_RAW_SEGMENT_LEN + 1);
        let paths = [
            "/".to_string(),
            "//".to_string(),
            "/a//b/".to_string(),
            "/api/v4/packages/terraform/modules/v1/grp/vpc/aws/versions".to_string(),
            "/api/v4/projects/grp%2Fsub/packages".to_string(),
            "/a/%2e%2e/b".to_string(),
            "/a/b\\c/d".to_string(),
            "/a/../b".to_string(),
            "/a/b%00/c".to_string(),
            format!("/{long}"),
            format!("/x/{long}\\/y"),
            format!("/x/\u{1}{long}/y"),
            format!("/x/ok/{long}%00"),
            format!("/x\u{7f}/{long}"),
            format!("/é/{long}"),
        ];
        for path in &paths {
            let reference: Result<Vec<_>, &str> = path[1..]
                .split('/')
                .map(|raw| {
                    if raw.len() > MAX_RAW_SEGMENT_LEN {
                        Err("path segment is too long")
                    } else {
                        decode_segment_fully(raw).map_err(|r| r.message)
                    }
                })
                .collect();
            let quick = split_segments(path).map_err(|r| r.message);
            assert_eq!(quick, reference, "{path:?}");
        }
    }

    #[test]
    fn head_is_a_read() {
        let p = "/api/v4/packages/terraform/modules/v1/grp/vpc/aws/1.0.0/file";
        assert!(matches!(parse(&Method::HEAD, p), Ok(Route::Module(_))));
        assert_eq!(
            parse(&Method::POST, p).unwrap_err().status,
            StatusCode::METHOD_NOT_ALLOWED
        );
    }

    #[test]
    fn encoded_parts_are_decoded_then_rebuilt() {
        let m = module("/api/v4/packages/terraform/modules/v1/gr%70/vpc/aws/versions");
        assert_eq!(m.module.namespace(), "grp");
        assert_eq!(
            m.upstream_path(),
            "/api/v4/packages/terraform/modules/v1/grp/vpc/aws/versions"
        );
    }

    #[test]
    fn invalid_versions_are_400() {
        let p = "/api/v4/packages/terraform/modules/v1/grp/vpc/aws";
        for bad in [
            "v1.0.0", "1.0", "01.0.0", "1.0.0.0", "latest", "1.0.0-", "%31.0",
        ] {
            let r = get(&format!("{p}/{bad}/download")).unwrap_err();
            assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}");
            assert_eq!(r.body(), r#"{"error":"module_version is invalid"}"#);
        }
        // Pre-release and build metadata are valid SemVer.
        assert!(get(&format!("{p}/1.0.0-rc.1+b5/download")).is_ok());
    }

    #[test]
    fn traversal_and_encoding_tricks_are_refused() {
        let cases = [
            "/api/v4/packages/terraform/modules/v1/../../../admin",
            "/api/v4/packages/terraform/modules/v1/%2e%2e/vpc/aws/versions",
            "/api/v4/packages/terraform/modules/v1/grp%2F..%2Fx/vpc/aws/versions",
            "/api/v4/packages/terraform/modules/v1/grp%2Fsub/vpc/aws/versions",
            "/api/v4/packages/terraform/modules/v1/grp/vpc%00/aws/versions",
            "/api/v4/packages/terraform/modules/v1/grp/vpc/aws%5c/versions",
            "/api/v4/projects/1/../../../etc/passwd",
            "/api/v4/projects/%2e%2e%2f%2e%2e/x",
            "/api/v4/packages/terraform/modules/v1/grp/v%ffpc/aws/versions",
            "/api/v4/packages/terraform/modules/v1/grp/vpc/aws/1.0.0/file/extra",
            "/api/v4/packages/terraform/modules/v1//vpc/aws/versions",
        ];
        for c in cases {
            let r = get(c).unwrap_err();
            assert!(r.status.is_client_error(), "{c}: {r:?}");
        }
    }

    /// Found by fuzzing (fuzz/fuzz_targets/routes.rs): dots inside a name are not dot-segments.
    /// They are legal in GitLab names and must round-trip through the rebuilt upstream path.
    #[test]
    fn dots_inside_names_round_trip() {
        let p = "/api/v4/packages/terraform/modules/v1/infra/vpc.x/aw10r..i1sle/versions";
        let m = module(p);
        assert_eq!(m.module.system(), "aw10r..i1sle");
        assert_eq!(m.upstream_path(), p);
        assert!(get("/api/v4/packages/terraform/modules/v1/infra/../aws/versions").is_err());
    }

    #[test]
    fn overlong_input_is_refused() {
        let long = "a".repeat(MAX_PATH_LEN);
        assert_eq!(
            get(&format!("/{long}")).unwrap_err().status,
            StatusCode::URI_TOO_LONG
        );
        let name = "a".repeat(65);
        let p = format!("/api/v4/packages/terraform/modules/v1/grp/{name}/aws/versions");
        assert_eq!(get(&p).unwrap_err().message, "module_name is invalid");
    }

    #[test]
    fn project_routes() {
        let base = "/api/v4/projects/group%2Fproj/packages/terraform/modules/vpc/aws";
        match get(base).unwrap() {
            Route::Project(p) => {
                assert_eq!(p.project, "group/proj");
                assert_eq!(p.op, ProjectOp::Download { version: None });
            }
            other => panic!("{other:?}"),
        }
        let up = parse(&Method::PUT, &format!("{base}/1.2.3/file")).unwrap();
        assert_eq!(up.template(), "project_upload");
        let auth = parse(&Method::POST, &format!("{base}/1.2.3/file/authorize")).unwrap();
        assert_eq!(auth.template(), "project_upload");
        assert!(parse(&Method::GET, &format!("{base}/1.2.3/file")).is_err());
    }

    #[test]
    fn everything_else_passes_through() {
        assert_eq!(get("/api/v4/projects/1").unwrap(), Route::PassThrough);
        assert_eq!(get("/api/v4/version").unwrap(), Route::PassThrough);
        assert_eq!(
            get("/.well-known/terraform.json").unwrap(),
            Route::Discovery
        );
        assert_eq!(get("/-/health").unwrap().template(), "health");
        assert!(get("/-/nope").is_err());
    }
}
