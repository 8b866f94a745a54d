//! The `tfmirror` command line. See the crate docs in `lib.rs` for the layout.

#![forbid(unsafe_code)]
#![warn(clippy::too_many_lines)]

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use tfmirror::config::{Config, LogLevel, Overrides};

/// jemalloc instead of glibc's malloc: a cache hit makes about 40 small allocations, and
/// jemalloc serves them from per-thread caches for less (the whole hit in process,
/// `cargo bench --bench hot_path`, 5.83 to 5.52 µs), and its peak memory under 50 streaming
/// downloads was lower (84 MiB against 119 MiB). mimalloc was faster still per hit but
/// kept what other threads freed: that peak rose to 1.5 GiB. BENCHMARKS.md, "Issue 17, fourth
/// pass".
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// A caching proxy and offline mirror for GitLab's Terraform Module Registry.
///
/// Settings come from, in increasing precedence: embedded defaults, the YAML file given with
/// --config, `TFMIRROR_*` environment variables (nested keys with `__`, e.g.
/// TFMIRROR_TIMEOUTS__CONNECT=1s), and flags. See conf/tfmirror.yaml for every setting.
#[derive(Parser, Debug)]
#[command(name = "tfmirror", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the proxy.
    Serve(ServeArgs),
    /// Fill the cache for MODULE[@CONSTRAINT]... (or the module blocks of `.tf` files) with
    /// the listings and tarballs TOKEN may read, and record TOKEN's grants: a cache warmed
    /// before an outage serves TOKEN's holder with GitLab gone.
    Warm(WarmArgs),
    /// Mirror every Terraform module of a GitLab group (GitLab's Packages API), as `warm`.
    Sync(SyncArgs),
    /// Inspect and maintain a cache directory; safe while a server uses it.
    Cache(CacheArgs),
    /// Make key files for `secret_file`: a set of replicas shares one.
    Secret(SecretArgs),
    /// Ask a running tfmirror whether it is alive (`/-/health`): exit 0 if it answers 200, 1 if
    /// not. The container image's health check; needs no curl.
    Health(HealthArgs),
}

/// Where the settings come from: shared by every command.
#[derive(Args, Debug)]
struct Common {
    /// YAML configuration file. [env: TFMIRROR_CONFIG]
    #[arg(
        long,
        global = true,
        value_name = "FILE",
        env = "TFMIRROR_CONFIG",
        hide_env = true
    )]
    config: Option<PathBuf>,
    /// Upstream GitLab base URL, optionally with a relative URL root (https://host/gitlab).
    /// [default: https://gitlab.com] [env: TFMIRROR_UPSTREAM] [config: upstream]
    #[arg(long, global = true, value_name = "URL")]
    upstream: Option<String>,
    /// Cache directory. [default: ./tfmirror-cache] [env: TFMIRROR_CACHE_DIR] [config: cache_dir]
    #[arg(long, global = true, value_name = "DIR")]
    cache_dir: Option<String>,
    /// PEM file of CA certificates trusted for the upstream, in addition to the system roots.
    /// [env: TFMIRROR_UPSTREAM_CA] [config: upstream_ca]
    #[arg(long, global = true, value_name = "FILE")]
    upstream_ca: Option<String>,
    /// Key file shared by a set of replicas (`tfmirror secret generate`). Unset: a per-instance
    /// key in the cache directory. [env: TFMIRROR_SECRET_FILE] [config: secret_file]
    #[arg(long, global = true, value_name = "FILE")]
    secret_file: Option<String>,
    /// error, warn, info, debug or trace. [default: info] [env: TFMIRROR_LOG_LEVEL] [config: log_level]
    #[arg(long, global = true, value_name = "LEVEL")]
    log_level: Option<String>,
}

#[derive(Args, Debug)]
struct ServeArgs {
    #[command(flatten)]
    common: Common,
    /// Address to listen on. [default: 127.0.0.1:8080] [env: TFMIRROR_LISTEN] [config: listen]
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// How clients reach tfmirror, used to rewrite absolute URLs. Unset: the request's own
    /// scheme and Host. [env: TFMIRROR_PUBLIC_URL] [config: public_url]
    #[arg(long, value_name = "URL")]
    public_url: Option<String>,
    /// PEM certificate chain: `--listen` then serves HTTPS and HTTP/2. Reloaded when the file
    /// changes. [env: TFMIRROR_TLS_CERT] [config: tls_cert]
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<String>,
    /// PEM private key for --tls-cert. [env: TFMIRROR_TLS_KEY] [config: tls_key]
    #[arg(long, value_name = "FILE")]
    tls_key: Option<String>,
    /// Never contact the upstream: serve only the cache, under the same access rules.
    /// [env: TFMIRROR_OFFLINE__ENABLED] [config: offline.enabled]
    #[arg(long)]
    offline: bool,
    /// Take the listening sockets over from a running tfmirror on the same cache dir (then
    /// send it SIGQUIT): a restart that loses no request.
    #[arg(long)]
    upgrade: bool,
}

#[derive(Args, Debug)]
struct Credential {
    /// The GitLab token to act for (sent as `Authorization: Bearer`). [env: TFMIRROR_TOKEN]
    #[arg(
        long,
        value_name = "TOKEN",
        env = "TFMIRROR_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
}

#[derive(Args, Debug)]
struct WarmArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    credential: Credential,
    /// Read the registry module blocks for the upstream's host from the `.tf` files in DIR.
    #[arg(long, value_name = "DIR")]
    from: Option<PathBuf>,
    /// The registry host named in module sources, for --from. [default: the upstream's host]
    #[arg(long, value_name = "HOST")]
    host: Option<String>,
    /// namespace/name/system, optionally @ a Terraform version constraint ("@~> 1.2").
    #[arg(value_name = "MODULE[@CONSTRAINT]")]
    modules: Vec<String>,
    /// A provider to warm: HOST/NAMESPACE/TYPE, optionally @ a constraint
    /// ("registry.terraform.io/hashicorp/aws@~> 5.0"); the newest matching version, as
    /// `terraform init` selects. Repeatable.
    #[arg(long = "provider", value_name = "PROVIDER[@CONSTRAINT]")]
    providers: Vec<String>,
    /// Warm every provider a dependency lock file (`.terraform.lock.hcl`) pins. Repeatable.
    #[arg(long = "lock-file", value_name = "FILE")]
    lock_files: Vec<PathBuf>,
    /// Platforms whose provider packages to cache (os_arch). Repeatable.
    #[arg(
        long = "platform",
        value_name = "OS_ARCH",
        default_value = "linux_amd64"
    )]
    platforms: Vec<String>,
}

#[derive(Args, Debug)]
struct SyncArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    credential: Credential,
    /// The group: its full path or numeric id.
    #[arg(long, value_name = "GROUP")]
    group: String,
}

#[derive(Args, Debug)]
struct CacheArgs {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    action: CacheAction,
}

#[derive(Subcommand, Debug)]
enum CacheAction {
    /// List cached tarballs: module, version, size, age.
    Ls,
    /// Recompute every tarball's blake3 hash; exit 1 and list the damaged entries if any.
    Verify,
    /// Remove a module, or one version, with its listings and grants; or a provider
    /// (`provider:HOST/NAMESPACE/TYPE[@VERSION]`) with its checksums and version list.
    Purge {
        #[arg(value_name = "MODULE[@VERSION]")]
        module: String,
    },
    /// Remove orphan blobs and dead temp files; evict past `cache.disk_size`.
    Gc,
}

#[derive(Args, Debug)]
struct SecretArgs {
    #[command(subcommand)]
    action: SecretAction,
}

#[derive(Subcommand, Debug)]
enum SecretAction {
    /// Print a new key file (two random keys) on stdout; a file it is redirected to is made
    /// mode 0600: `tfmirror secret generate > FILE`.
    Generate,
    /// Print OLD's successor: the same identity key (grants stay valid), a new token key.
    /// Serve with it as `secret_file` and OLD as `secret_previous_file` for one token_ttl.
    Rotate {
        #[arg(value_name = "OLD")]
        old: PathBuf,
    },
}

#[derive(Args, Debug)]
struct HealthArgs {
    /// The YAML configuration file `serve` runs with. [env: TFMIRROR_CONFIG]
    #[arg(long, value_name = "FILE", env = "TFMIRROR_CONFIG", hide_env = true)]
    config: Option<PathBuf>,
    /// The URL to ask. [default: /-/health on the `listen` port of the configuration, at
    /// 127.0.0.1 (::1) when it listens on all addresses; https when `tls_cert` is set,
    /// trusting exactly that certificate]
    #[arg(long, value_name = "URL")]
    url: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Warm(args) => warm(args),
        Command::Sync(args) => sync(args),
        Command::Cache(args) => cache(args),
        Command::Secret(args) => secret(args),
        Command::Health(args) => health(&args),
    }
}

fn load(common: &Common, extra: Overrides) -> Result<Config, ExitCode> {
    let overrides = Overrides {
        upstream: common.upstream.clone(),
        upstream_ca: common.upstream_ca.clone(),
        cache_dir: common.cache_dir.clone(),
        secret_file: common.secret_file.clone(),
        log_level: common.log_level.clone(),
        ..extra
    };
    Config::load(common.config.as_deref(), &overrides).map_err(|e| {
        eprintln!("tfmirror: {e}");
        ExitCode::from(2)
    })
}

fn serve(args: ServeArgs) -> ExitCode {
    let extra = Overrides {
        listen: args.listen,
        public_url: args.public_url,
        tls_cert: args.tls_cert,
        tls_key: args.tls_key,
        offline: args
            .offline
            .then_some(tfmirror::config::OfflineOverride { enabled: true }),
        ..Overrides::default()
    };
    let config = match load(&args.common, extra) {
        Ok(c) => c,
        Err(code) => return code,
    };
    init_logging(config.log_level, true);
    let server = match tfmirror::server::build(&config, args.upgrade) {
        Ok(s) => s,
        Err(e) => {
            tfmirror::logbuf::flush();
            eprintln!("tfmirror: {e}");
            return ExitCode::from(2);
        }
    };
    tracing::info!(
        listen = %config.listen,
        upstream = %config.upstream,
        cache_dir = %config.cache_dir.display(),
        offline = config.offline.enabled,
        "tfmirror starting"
    );
    // Not `run_forever`, which exits inside: the buffered log goes out first.
    server.run(pingora::server::RunArgs::default());
    tfmirror::logbuf::flush();
    ExitCode::SUCCESS
}

/// Progress on a terminal as a bar, otherwise as plain lines.
struct Progress(Option<indicatif::ProgressBar>);

impl Progress {
    fn new(len: usize) -> Progress {
        if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new(len as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}")
                    .expect("static template"),
            );
            Progress(Some(bar))
        } else {
            Progress(None)
        }
    }

    fn line(&self, msg: String) {
        match &self.0 {
            Some(bar) => {
                bar.set_message(msg);
                bar.inc(1);
            }
            None => eprintln!("{msg}"),
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn bearer(credential: &Credential) -> Result<Option<http::HeaderValue>, ExitCode> {
    match &credential.token {
        None => Ok(None),
        Some(t) => http::HeaderValue::from_str(&format!("Bearer {t}"))
            .map(|mut v| {
                v.set_sensitive(true);
                Some(v)
            })
            .map_err(|_| {
                eprintln!("tfmirror: --token is not a valid header value");
                ExitCode::from(2)
            }),
    }
}

/// Settings, logging and credential of the commands that act for a token (`warm`, `sync`).
fn client_setup(
    common: &Common,
    credential: &Credential,
) -> Result<(Config, Option<http::HeaderValue>), ExitCode> {
    let config = load(common, Overrides::default())?;
    // Progress goes to the terminal; only warnings and errors are logged.
    init_logging(LogLevel::Warn.min(config.log_level), false);
    Ok((config, bearer(credential)?))
}

fn warm(args: WarmArgs) -> ExitCode {
    let (config, cred) = match client_setup(&args.common, &args.credential) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let mut wants = Vec::new();
    for m in &args.modules {
        match tfmirror::sync::parse_want(m) {
            Ok(w) => wants.push(w),
            Err(e) => {
                eprintln!("tfmirror: {e}");
                return ExitCode::from(2);
            }
        }
    }
    if let Some(dir) = &args.from {
        let host = args
            .host
            .clone()
            .unwrap_or_else(|| config.upstream.host_str().unwrap_or_default().to_string());
        match tfmirror::sync::wants_from_dir(dir, &host) {
            Ok(w) => wants.extend(w),
            Err(e) => {
                eprintln!("tfmirror: {e}");
                return ExitCode::from(2);
            }
        }
    }
    let (provider_wants, platforms) = match provider_args(&args) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("tfmirror: {e}");
            return ExitCode::from(2);
        }
    };
    if wants.is_empty() && provider_wants.is_empty() {
        eprintln!(
            "tfmirror: nothing to warm: name modules or --provider, --from a directory with module blocks, or --lock-file"
        );
        return ExitCode::from(2);
    }
    let modules = if wants.is_empty() {
        ExitCode::SUCCESS
    } else {
        run_warm(&config, cred, wants)
    };
    if provider_wants.is_empty() {
        return modules;
    }
    let providers = warm_providers(&config, provider_wants, &platforms);
    if modules == ExitCode::SUCCESS {
        providers
    } else {
        modules
    }
}

/// `--provider`, `--lock-file` and `--platform`, read and checked.
type ProviderArgs = (
    Vec<tfmirror::providers::warm::ProviderWant>,
    Vec<tfmirror::provider_routes::Platform>,
);

fn provider_args(args: &WarmArgs) -> Result<ProviderArgs, String> {
    let mut wants = Vec::new();
    for p in &args.providers {
        wants.push(tfmirror::providers::warm::parse_want(p)?);
    }
    for file in &args.lock_files {
        let parsed = std::fs::read_to_string(file)
            .map_err(|e| e.to_string())
            .and_then(|t| tfmirror::providers::warm::wants_from_lock_file(&t));
        wants.extend(parsed.map_err(|e| format!("{}: {e}", file.display()))?);
    }
    let platforms = args
        .platforms
        .iter()
        .map(|p| {
            tfmirror::provider_routes::Platform::parse(p)
                .ok_or_else(|| format!("--platform {p}: expected OS_ARCH (linux_amd64)"))
        })
        .collect::<Result<_, _>>()?;
    Ok((wants, platforms))
}

fn warm_providers(
    config: &Config,
    wants: Vec<tfmirror::providers::warm::ProviderWant>,
    platforms: &[tfmirror::provider_routes::Platform],
) -> ExitCode {
    let parts = match tfmirror::server::open(config) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("tfmirror: {e}");
            return ExitCode::from(2);
        }
    };
    let progress = Progress::new(wants.len());
    let failures = runtime().block_on(async {
        let mut failures = 0;
        for w in &wants {
            match parts.providers.warm(w, platforms).await {
                Ok(v) => progress.line(format!("{}: cached {v}", w.provider)),
                Err(e) => {
                    failures += 1;
                    progress.line(e);
                }
            }
        }
        failures
    });
    progress.finish();
    if failures > 0 {
        eprintln!(
            "tfmirror: {failures} of {} providers could not be warmed",
            wants.len()
        );
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn sync(args: SyncArgs) -> ExitCode {
    let (config, cred) = match client_setup(&args.common, &args.credential) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let parts = match tfmirror::server::open(&config) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("tfmirror: {e}");
            return ExitCode::from(2);
        }
    };
    let wants = runtime().block_on(tfmirror::sync::group_modules(
        &parts.upstream,
        cred.as_ref(),
        &args.group,
    ));
    match wants {
        Ok(w) if w.is_empty() => {
            eprintln!("group {}: no Terraform modules", args.group);
            ExitCode::SUCCESS
        }
        Ok(w) => run_warm(&config, cred, w),
        Err(e) => {
            eprintln!("tfmirror: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_warm(
    config: &Config,
    cred: Option<http::HeaderValue>,
    wants: Vec<tfmirror::sync::Want>,
) -> ExitCode {
    let parts = match tfmirror::server::open(config) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("tfmirror: {e}");
            return ExitCode::from(2);
        }
    };
    let progress = Progress::new(wants.len());
    let failures = runtime().block_on(async {
        let mut failures = 0;
        for w in &wants {
            match parts
                .registry
                .warm_module(cred.clone(), &w.module, &w.constraint)
                .await
            {
                Ok(v) if v.is_empty() => {
                    failures += 1;
                    progress.line(format!("{} {}: no version matches", w.module, w.written));
                }
                Ok(v) => progress.line(format!("{}: cached {}", w.module, v.join(", "))),
                Err(e) => {
                    failures += 1;
                    progress.line(e);
                }
            }
        }
        failures
    });
    progress.finish();
    if failures > 0 {
        eprintln!(
            "tfmirror: {failures} of {} modules could not be warmed",
            wants.len()
        );
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn cache(args: CacheArgs) -> ExitCode {
    let config = match load(&args.common, Overrides::default()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let admin = match tfmirror::cache::admin::Admin::open(&config.cache_dir) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("tfmirror: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match args.action {
        CacheAction::Ls => cache_ls(&admin),
        CacheAction::Verify => cache_verify(&admin),
        CacheAction::Purge { module } => admin.purge(&module).map(|n| {
            println!("purged {module}: {n} records");
            ExitCode::SUCCESS
        }),
        CacheAction::Gc => admin
            .gc(
                config.cache.disk_size.as_u64(),
                config.auth.grant_ttl + config.cache.stale_if_error,
            )
            .map(|(dangling, orphans, evicted)| {
                println!(
                    "removed {orphans} orphan blobs and {dangling} records of evicted blobs \
                         or expired grants, evicted {evicted}"
                );
                ExitCode::SUCCESS
            }),
    };
    result.unwrap_or_else(|e| {
        eprintln!("tfmirror: {e}");
        ExitCode::FAILURE
    })
}

/// `tfmirror cache ls`: every tarball with its blake3, and, for a re-published version, which
/// bytes it had before and when they changed.
fn cache_ls(admin: &tfmirror::cache::admin::Admin) -> std::io::Result<ExitCode> {
    let at = |secs: u64| {
        humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs),
        )
    };
    println!(
        "{:<60} {:>12} {:>10}  BLAKE3",
        "MODULE@VERSION", "BYTES", "AGE"
    );
    for r in admin.ls()? {
        let age =
            humantime::format_duration(std::time::Duration::from_secs(r.age_secs)).to_string();
        println!("{:<60} {:>12} {:>10}  {}", r.key, r.size, age, r.hash);
        for old in &r.replaced {
            println!(
                "  re-published {}: was {} ({} bytes, fetched {})",
                at(old.replaced_at),
                old.hash,
                old.size,
                at(old.fetched_at)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `tfmirror cache verify`: fails when anything is damaged.
fn cache_verify(admin: &tfmirror::cache::admin::Admin) -> std::io::Result<ExitCode> {
    let rows = admin.ls().map(|r| r.len()).unwrap_or(0);
    let progress = Progress::new(rows);
    let found = admin.verify(|row| progress.line(format!("verifying {}", row.key)));
    progress.finish();
    let found = found?;
    for (row, why) in &found.damaged {
        println!("DAMAGED {} ({why})", row.key);
    }
    println!(
        "{} checked, {} listing bodies checked, {} damaged, {} evicted (filled again on the next request)",
        found.checked,
        found.listings,
        found.damaged.len(),
        found.evicted.len()
    );
    Ok(if found.damaged.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// JSON lines on stderr. Pingora's own `log` records are bridged into the same stream
/// (`logbridge`: a client's abort mid-head is demoted to debug and counted).
///
/// Only tfmirror's own targets go below `info`: pingora, hyper and reqwest dump request
/// headers (`Authorization`) and URLs (JWTs, presigned links) in their debug records.
///
/// `buffered` (the server): lines go through per-thread buffers (`logbuf`), so the access
/// log costs no syscall per request, and the access line is formatted by `accesslog` itself
/// into the same buffer (the filter still decides whether it is written). The one-shot
/// commands write each line at once.
fn init_logging(level: LogLevel, buffered: bool) {
    let others = match level {
        LogLevel::Debug | LogLevel::Trace => LogLevel::Info,
        l => l,
    };
    let directives = format!("{},tfmirror={}", others.as_str(), level.as_str());
    let filter = tracing_subscriber::EnvFilter::new(directives);
    let builder = tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_current_span(false);
    let installed = if buffered {
        let buffer = tfmirror::logbuf::stderr();
        tfmirror::accesslog::set_output(buffer.clone());
        tracing::subscriber::set_global_default(builder.with_writer(buffer).finish())
    } else {
        tracing::subscriber::set_global_default(builder.with_writer(std::io::stderr).finish())
    };
    installed.expect("the only tracing subscriber");
    // pingora's `log` records, through tfmirror's bridge (not tracing-subscriber's own).
    tfmirror::logbridge::init().expect("the only `log` logger");
}

fn secret(args: SecretArgs) -> ExitCode {
    use std::io::Write;
    use tfmirror::secret::Secret;
    let made = match args.action {
        SecretAction::Generate => Secret::generate(),
        SecretAction::Rotate { old } => Secret::read_file(&old).and_then(|s| s.rotated()),
    };
    let secret = match made {
        Ok(s) => s,
        Err(e) => {
            eprintln!("tfmirror: {e}");
            return ExitCode::from(2);
        }
    };
    let out = std::io::stdout();
    // A file the shell created for the redirect has the umask's mode (often 0644), which
    // `secret_file` refuses: close it to others before the key lands in it.
    if let Ok(st) = nix::sys::stat::fstat(&out) {
        use nix::sys::stat::SFlag;
        let regular = st.st_mode & SFlag::S_IFMT.bits() == SFlag::S_IFREG.bits();
        if regular {
            if let Err(e) =
                nix::sys::stat::fchmod(&out, nix::sys::stat::Mode::from_bits_truncate(0o600))
            {
                eprintln!("tfmirror: cannot make the output file private: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let mut out = out.lock();
    match out
        .write_all(secret.to_file_text().as_bytes())
        .and_then(|()| out.flush())
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tfmirror: {e}");
            ExitCode::FAILURE
        }
    }
}

/// How long `tfmirror health` waits for the answer: less than the image's `HEALTHCHECK
/// --timeout`, so a slow answer is reported as such rather than killed.
const HEALTH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// An error with what caused it ("error sending request ...: connection refused").
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(&format!(": {c}"));
        cause = c.source();
    }
    text
}

/// `tfmirror health`. Exit 1 for every failure, a bad configuration included: Docker reads
/// 0 as healthy, 1 as unhealthy, and reserves 2.
fn health(args: &HealthArgs) -> ExitCode {
    match health_check(args) {
        Ok(url) => {
            println!("healthy: {url}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tfmirror: unhealthy: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `/-/health` on the configured listener: at the loopback address of its family when it
/// listens on all addresses (an IPv6 listener takes no IPv4), https with `tls_cert`.
fn health_url(config: &Config) -> String {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
    let scheme = if config.tls_cert.is_some() {
        "https"
    } else {
        "http"
    };
    let ip = match config.listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => Ipv4Addr::LOCALHOST.into(),
        IpAddr::V6(ip) if ip.is_unspecified() => Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    let addr = SocketAddr::new(ip, config.listen.port());
    format!("{scheme}://{addr}/-/health")
}

fn health_check(args: &HealthArgs) -> Result<String, String> {
    let config =
        Config::load(args.config.as_deref(), &Overrides::default()).map_err(|e| e.to_string())?;
    let url = args.url.clone().unwrap_or_else(|| health_url(&config));
    // No proxy from the environment: the listener is local.
    let mut client = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(HEALTH_TIMEOUT);
    if let Some(cert) = &config.tls_cert {
        let tls =
            tfmirror::tls::pinned_client_config(cert).map_err(|e| format!("`tls_cert`: {e}"))?;
        client = client.use_preconfigured_tls(tls);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    // The client needs the runtime's reactor from the start.
    let status = rt.block_on(async {
        // Not an upstream client (those go through `upstream_tls::http_client`): this one asks
        // tfmirror's own listener, trusting exactly its certificate.
        #[allow(clippy::disallowed_methods)]
        let client = client.build().map_err(|e| e.to_string())?;
        let response = client.get(&url).send().await;
        response.map(|r| r.status()).map_err(|e| with_causes(&e))
    })?;
    if status == reqwest::StatusCode::OK {
        Ok(url)
    } else {
        Err(format!("{url} answered {status}"))
    }
}
