//! Settings: embedded defaults, then a YAML file, then `TFMIRROR_*` environment variables,
//! then command-line flags (each layer overrides the one before).
//!
//! Every struct denies unknown fields, and [`Config::load`] validates values after merging, so a
//! typo or a bad value stops tfmirror at start with a message that names the setting
//! (`timeouts.connect`, `upstream`, ...). Nested keys map to environment variables with a double
//! underscore: `timeouts.connect` is `TFMIRROR_TIMEOUTS__CONNECT`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Yaml};
use figment::Figment;
use serde::{Deserialize, Serialize};
use url::Url;

/// Prefix of the environment variables that override settings.
pub const ENV_PREFIX: &str = "TFMIRROR_";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the proxy listens on.
    pub listen: SocketAddr,
    /// Base URL of the upstream GitLab, optionally with a relative URL root (`/gitlab`).
    pub upstream: Url,
    /// A PEM file of certificates trusted for GitLab and the hosts it redirects to, besides
    /// the system roots: CA certificates as roots, others as pins for their own names only.
    pub upstream_ca: Option<PathBuf>,
    /// How clients reach tfmirror; used to rewrite absolute URLs. Unset: the request's own
    /// scheme and `Host`.
    pub public_url: Option<Url>,
    /// Where the disk cache (and, without `secret_file`, the instance's secret) lives.
    pub cache_dir: PathBuf,
    /// The key file a set of replicas shares (`tfmirror secret generate`): tokens minted by
    /// one verify and fill on all. Unset: a per-instance key in `cache_dir/secret.key`.
    pub secret_file: Option<PathBuf>,
    /// The key file before a rotation: its tokens keep verifying until they expire.
    pub secret_previous_file: Option<PathBuf>,
    /// PEM certificate chain: with `tls_key`, `listen` serves HTTPS (and HTTP/2).
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// A second listener serving only `/-/metrics` (it is also on the main listener).
    pub metrics_listen: Option<SocketAddr>,
    /// Bearer token for `/-/admin/...`; the admin endpoints are off when unset.
    pub admin_token: Option<String>,
    pub log_level: LogLevel,
    /// `auto`: text when stderr is a terminal (a person watching), JSON otherwise.
    pub log_format: LogFormat,
    /// Worker threads of the proxy service (pingora defaults to one).
    pub threads: usize,
    pub timeouts: Timeouts,
    pub cache: CacheConfig,
    pub auth: AuthConfig,
    pub offline: OfflineConfig,
    pub limits: Limits,
    pub providers: ProvidersConfig,
    pub bundle: BundleConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            upstream: Url::parse("https://gitlab.com").expect("static URL"),
            upstream_ca: None,
            public_url: None,
            cache_dir: PathBuf::from("./tfmirror-cache"),
            secret_file: None,
            secret_previous_file: None,
            tls_cert: None,
            tls_key: None,
            metrics_listen: None,
            admin_token: None,
            log_level: LogLevel::Info,
            log_format: LogFormat::Auto,
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            timeouts: Timeouts::default(),
            cache: CacheConfig::default(),
            auth: AuthConfig::default(),
            offline: OfflineConfig::default(),
            limits: Limits::default(),
            providers: ProvidersConfig::default(),
            bundle: BundleConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

/// `log_format`: how log lines are written on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Text on a terminal, JSON otherwise.
    Auto,
    /// One JSON object per line, for log shippers.
    Json,
    /// One short line per event (time, level, message, key=value fields), for people.
    Text,
}

/// Upstream timeouts. Terraform gives up on a registry call after 10 s, so the connect
/// timeout stays well below that: an unreachable GitLab must fail fast.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// TCP connect (and, separately, the TLS handshake).
    #[serde(with = "humantime_serde")]
    pub connect: Duration,
    /// Longest wait for each read from the upstream on registry calls, and for the head of
    /// a tarball answer.
    #[serde(with = "humantime_serde")]
    pub read: Duration,
    /// Longest wait for each read or write while streaming tarballs and uploads.
    #[serde(with = "humantime_serde")]
    pub transfer: Duration,
    /// How long an idle upstream keep-alive connection stays pooled.
    #[serde(with = "humantime_serde")]
    pub idle: Duration,
    /// A client must deliver a whole request head within this long of connecting or of its
    /// previous response, and finish a TLS handshake within this long of connecting; silent
    /// and trickling (slowloris) connections are closed.
    #[serde(with = "humantime_serde")]
    pub client_idle: Duration,
    /// A client request or response body that makes no progress for this long is dropped.
    #[serde(with = "humantime_serde")]
    pub client_stall: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(2),
            read: Duration::from_secs(30),
            transfer: Duration::from_secs(60),
            idle: Duration::from_secs(60),
            client_idle: Duration::from_secs(60),
            client_stall: Duration::from_secs(60),
        }
    }
}

/// The two cache tiers and how long listings stay usable.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Memory tier bound ("256MiB").
    pub memory_size: bytesize::ByteSize,
    /// Disk tier bound; least recently used blobs are evicted past it.
    pub disk_size: bytesize::ByteSize,
    /// How long a listing or metadata body is fresh.
    #[serde(with = "humantime_serde")]
    pub listing_ttl: Duration,
    /// How long past `listing_ttl` a body may still be served while it is refreshed in the
    /// background.
    #[serde(with = "humantime_serde")]
    pub stale_while_revalidate: Duration,
    /// How long past freshness cached answers may be served when the upstream fails.
    #[serde(with = "humantime_serde")]
    pub stale_if_error: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            memory_size: bytesize::ByteSize::mib(256),
            disk_size: bytesize::ByteSize::gib(10),
            listing_ttl: Duration::from_secs(30),
            stale_while_revalidate: Duration::from_secs(300),
            stale_if_error: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// Who may read what from the cache.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// How long an upstream success lets an identity read the cache without asking again.
    #[serde(with = "humantime_serde")]
    pub grant_ttl: Duration,
    /// How long an upstream refusal (401/403/404) is replayed to the same identity.
    #[serde(with = "humantime_serde")]
    pub negative_ttl: Duration,
    /// Lifetime of tfmirror's download tokens in `X-Terraform-Get`.
    #[serde(with = "humantime_serde")]
    pub token_ttl: Duration,
    /// CI job tokens share grants per principal (job project, user, scoped user), learned
    /// with one `GET /api/v4/job` per job; `false`: grants per token, as for any credential.
    pub principal_grants: bool,
    /// CI ID tokens (`<job token>~<ID token>`): offline identity for fresh jobs.
    pub id_token: IdTokenConfig,
}

/// `auth.id_token`: verify CI ID tokens against GitLab's published keys; off without an
/// audience.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdTokenConfig {
    /// The `aud` jobs request for tfmirror (`id_tokens: {X: {aud: ...}}`); unique to tfmirror.
    pub audience: Option<String>,
    /// The `iss` expected, compared exactly; default: `upstream` without a trailing slash.
    pub issuer: Option<String>,
    /// Take only ID tokens of protected refs (`ref_protected: "true"`).
    pub require_ref_protected: bool,
}

impl IdTokenConfig {
    /// The issuer to expect for tokens of `upstream`.
    pub fn issuer_for(&self, upstream: &Url) -> String {
        match &self.issuer {
            Some(i) => i.clone(),
            None => upstream.as_str().trim_end_matches('/').to_string(),
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            grant_ttl: Duration::from_secs(60),
            negative_ttl: Duration::from_secs(5),
            token_ttl: Duration::from_secs(600),
            principal_grants: true,
            id_token: IdTokenConfig::default(),
        }
    }
}

/// Behaviour when the upstream is down, and the offline mode.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OfflineConfig {
    /// Never contact the upstream; serve only the cache, under the same access rules.
    pub enabled: bool,
    /// Who may read the cache, while the upstream is down, without a grant of their own.
    pub unknown_identity: UnknownIdentity,
    /// How long a registry call (listing, metadata, download URL, project check) waits for
    /// GitLab before GitLab counts as failed: a stale answer or a clear error then, and a
    /// breaker failure. Keep it below Terraform's 10 s per registry call. Slow is not down:
    /// below this, tfmirror waits, whatever it has cached.
    #[serde(with = "humantime_serde")]
    pub deadline: Duration,
    /// Consecutive connect errors or timeouts that mark the upstream down.
    pub breaker_threshold: u32,
    /// Who may read private modules a signed bundle brought (`tfmirror bundle import`), on a
    /// mirror with no GitLab to ask (`enabled`). Public modules stay public whatever it says.
    pub imported_readers: ImportedReaders,
    /// With `imported_readers: listed`: one keyed hash of a credential per line, written by
    /// `tfmirror bundle reader add` (never the credential itself). Re-read when it changes.
    pub readers_file: Option<PathBuf>,
}

impl Default for OfflineConfig {
    fn default() -> Self {
        OfflineConfig {
            enabled: false,
            unknown_identity: UnknownIdentity::Deny,
            deadline: Duration::from_secs(7),
            breaker_threshold: 2,
            imported_readers: ImportedReaders::None,
            readers_file: None,
        }
    }
}

impl OfflineConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        match (&self.imported_readers, &self.readers_file) {
            (ImportedReaders::Listed, None) => Err(invalid(
                "offline.readers_file",
                "is required with `offline.imported_readers: listed`",
            )),
            (ImportedReaders::Listed, Some(f)) => crate::secret::readers::read(f)
                .map(drop)
                .map_err(|e| invalid("offline.readers_file", e)),
            (_, Some(_)) => Err(invalid(
                "offline.readers_file",
                "is read only with `offline.imported_readers: listed`",
            )),
            _ => Ok(()),
        }
    }
}

/// `offline.unknown_identity`: CI job tokens are new for every job, so while GitLab is down
/// most callers are identities tfmirror has never seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownIdentity {
    /// Only identities GitLab authorized before (and public modules, to anyone).
    Deny,
    /// Any caller presenting a credential may read what authorized callers fetched.
    Authenticated,
    /// Anyone may read what authorized callers fetched.
    Anyone,
}

/// `offline.imported_readers`: a sealed mirror has no GitLab to ask who may read a private
/// module, and grants of the exporting site are not carried over; the operator says it here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImportedReaders {
    /// No one (imported public modules stay public).
    None,
    /// Any caller, with or without a credential: the network path to tfmirror is the access
    /// control.
    Anyone,
    /// Callers whose credential's keyed hash is in `offline.readers_file`.
    Listed,
}

/// Bounds that keep a storm or a huge object from hurting GitLab or the disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Upstream tarball fills running at once; more wait their turn.
    pub max_fills: usize,
    /// Tarballs larger than this are streamed to their clients but not kept.
    pub max_object_size: bytesize::ByteSize,
    /// Registry answers (listings, metadata) larger than this are refused with a 502.
    pub max_listing_size: bytesize::ByteSize,
    /// Records (tarball index, grants, listing references) kept on disk at most; past it,
    /// new records stay in memory only (`tfmirror_cache_records`).
    pub max_records: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_fills: 64,
            max_object_size: bytesize::ByteSize::gib(2),
            max_listing_size: bytesize::ByteSize::mib(8),
            max_records: 1_000_000,
        }
    }
}

pub use providers::ProvidersConfig;

/// Settings given as flags. Kept as strings so that the same validation, with the same key
/// names in its messages, applies to flags, environment and file alike.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Overrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_ca: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_dir: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_level: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<String>,
    /// `--offline`: nested, as the file's `offline.enabled`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offline: Option<OfflineOverride>,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct OfflineOverride {
    pub enabled: bool,
}

/// A configuration error, already phrased for the operator.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

fn invalid(key: &str, why: impl std::fmt::Display) -> ConfigError {
    ConfigError(format!("`{key}`: {why}"))
}

impl Config {
    /// Merge defaults, `file`, the environment and `overrides`, then validate.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        Self::load_with_env(file, overrides, Env::prefixed(ENV_PREFIX))
    }

    fn load_with_env(
        file: Option<&Path>,
        overrides: &Overrides,
        env: Env,
    ) -> Result<Config, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            // figment silently skips missing files; a named config file must exist.
            if !path.is_file() {
                return Err(invalid("config", "is not a readable file"));
            }
            fig = fig.merge(Yaml::file_exact(path));
        }
        // `config` and `token` are read by the command line itself.
        let env = env.split("__").ignore(&["config", "token"]);
        fig = fig.merge(env).merge(Serialized::defaults(overrides));
        let config: Config = fig.extract().map_err(describe)?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        check_base_url("upstream", &self.upstream)?;
        if let Some(public) = &self.public_url {
            check_base_url("public_url", public)?;
        }
        if let Some(ca) = &self.upstream_ca {
            crate::pem::certs(ca).map_err(|e| invalid("upstream_ca", e))?;
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(c), Some(k)) => {
                crate::tls::load(c, k).map_err(|e| invalid("tls_cert", e))?;
            }
            (None, None) => {}
            (Some(_), None) => return Err(invalid("tls_key", "is required with tls_cert")),
            (None, Some(_)) => return Err(invalid("tls_cert", "is required with tls_key")),
        }
        if self.secret_previous_file.is_some() && self.secret_file.is_none() {
            return Err(invalid("secret_previous_file", "needs `secret_file`"));
        }
        if self.admin_token.as_ref().is_some_and(|t| t.len() < 16) {
            return Err(invalid("admin_token", "must be at least 16 characters"));
        }
        self.providers.validate()?;
        self.bundle.validate()?;
        self.offline.validate()?;
        if self.threads == 0 {
            return Err(invalid("threads", "must be at least 1"));
        }
        let t = &self.timeouts;
        for (key, d) in [
            ("timeouts.connect", t.connect),
            ("timeouts.read", t.read),
            ("timeouts.transfer", t.transfer),
            ("timeouts.idle", t.idle),
            ("timeouts.client_idle", t.client_idle),
            ("timeouts.client_stall", t.client_stall),
            ("cache.listing_ttl", self.cache.listing_ttl),
            ("auth.grant_ttl", self.auth.grant_ttl),
            ("auth.token_ttl", self.auth.token_ttl),
            ("offline.deadline", self.offline.deadline),
        ] {
            if d.is_zero() {
                return Err(invalid(key, "must be greater than zero"));
            }
        }
        if self
            .auth
            .id_token
            .audience
            .as_deref()
            .is_some_and(|a| a.trim().is_empty())
        {
            return Err(invalid("auth.id_token.audience", "must not be empty"));
        }
        // A download token is a bearer capability: bounded, like GitLab's own 5-minute JWT.
        if self.auth.token_ttl > crate::token::MAX_TTL {
            return Err(invalid("auth.token_ttl", "must be at most 1 day"));
        }
        Ok(())
    }
}

/// Phrase figment's errors as `` `key` (from SOURCE): problem ``.
///
/// Never with the rejected value: a secret put in the wrong `TFMIRROR_*` variable (a token in
/// `TFMIRROR_LOG_LEVEL`) would otherwise land in logs. figment's own messages quote values
/// ("found string \"glpat-...\"", "unknown variant `...`"), and so do the custom messages of
/// deserializers (humantime, bytesize quote the text they could not parse), so every kind is
/// rephrased from the parts that say what was expected, never from what was found.
fn describe(errors: figment::Error) -> ConfigError {
    let msgs: Vec<String> = errors
        .into_iter()
        .map(|e| {
            let key = e.path.join(".").to_ascii_lowercase();
            let source = match &e.metadata {
                Some(m) if m.name.contains("Overrides") => "command-line flag".to_string(),
                Some(m) if m.name.contains("Config") => "defaults".to_string(),
                Some(m) => m.name.to_string(),
                None => "configuration".to_string(),
            };
            let problem = problem_without_value(&e.kind);
            if key.is_empty() {
                format!("{problem} (from {source})")
            } else {
                format!("`{key}` (from {source}): {problem}")
            }
        })
        .collect();
    ConfigError(msgs.join("; "))
}

/// What is wrong, in words that carry no part of the value that was given.
fn problem_without_value(kind: &figment::error::Kind) -> String {
    use figment::error::Kind;
    match kind {
        Kind::InvalidType(found, expected) => {
            format!("expected {expected}, found {}", shape(found))
        }
        Kind::InvalidValue(_, expected) => format!("invalid value, expected {expected}"),
        Kind::InvalidLength(_, expected) => format!("wrong number of items, expected {expected}"),
        Kind::UnknownVariant(_, expected) => {
            format!("unknown value, expected one of: {}", expected.join(", "))
        }
        // The names here are keys, not values.
        Kind::UnknownField(name, _) => format!("unknown key `{name}`"),
        Kind::MissingField(name) => format!("missing key `{name}`"),
        Kind::DuplicateField(name) => format!("duplicate key `{name}`"),
        Kind::ISizeOutOfRange(_) | Kind::USizeOutOfRange(_) => "number out of range".into(),
        Kind::Unsupported(found) => format!("unsupported {}", shape(found)),
        Kind::UnsupportedKey(found, need) => {
            format!("unsupported key type {}, need {need}", shape(found))
        }
        // Custom messages of deserializers (addresses, URLs, durations, sizes) may quote the
        // value: only the fact is kept.
        _ => "invalid value (not shown: it may be a secret)".into(),
    }
}

/// The kind of a value figment found, without the value.
fn shape(found: &figment::error::Actual) -> &'static str {
    use figment::error::Actual;
    match found {
        Actual::Bool(_) => "a boolean",
        Actual::Unsigned(_) | Actual::Signed(_) => "an integer",
        Actual::Float(_) => "a number",
        Actual::Char(_) | Actual::Str(_) => "a string",
        Actual::Bytes(_) => "bytes",
        Actual::Unit | Actual::Option => "nothing",
        Actual::Seq => "a list",
        Actual::Map | Actual::NewtypeStruct | Actual::StructVariant => "a map",
        _ => "another type",
    }
}

fn check_base_url(key: &str, url: &Url) -> Result<(), ConfigError> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid(key, "scheme must be http or https"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(invalid(key, "a host is required"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid(key, "credentials do not belong in the URL"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(invalid(key, "no query or fragment allowed"));
    }
    Ok(())
}

mod bundle;
mod providers;
pub use bundle::BundleConfig;

#[cfg(test)]
mod tests;
