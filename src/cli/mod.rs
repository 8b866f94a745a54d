//! The `tfmirror` command line: one file per command, as the README names them.
//!
//! | command | file |
//! |---|---|
//! | `serve` | [`serve`] |
//! | `warm`, `sync` | [`warm`] |
//! | `cache ls / verify / purge / gc` | [`cache`] |
//! | `secret generate / rotate` | [`secret`] |
//! | `health` | [`health`] |
//! | `bundle keygen / export / import` | [`bundle`] |
//! | `check` | [`check`] |
//!
//! Here: the commands' shared flags (where the settings come from), the loading of the
//! configuration and progress output; logging in [`logging`].

mod bundle;
mod cache;
mod check;
mod health;
mod logging;
mod secret;
mod serve;
mod warm;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::config::{Config, LogLevel, Overrides};
use bundle::BundleArgs;
use cache::CacheArgs;
use check::CheckArgs;
use health::HealthArgs;
use secret::SecretArgs;
use serve::ServeArgs;
use warm::{SyncArgs, WarmArgs};

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
    /// Check a configuration before it goes live, as `nginx -t` does: the settings as `serve`
    /// reads them, then the upstream (DNS, connect, TLS with the configured trust, service
    /// discovery, a token's read), the cache directory, the key file and each provider
    /// registry. One line per check; exit 0 when all pass, 1 when one failed (an invalid
    /// configuration included), 3 when there are warnings only.
    Check(CheckArgs),
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
    /// Signed bundles for air-gapped sites: `keygen` a signing key, `export` a cache
    /// directory's modules and providers as one signed file, `import` it on the sealed side.
    Bundle(BundleArgs),
}

/// Where the settings come from: shared by every command.
#[derive(Args, Debug)]
pub(super) struct Common {
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
    /// auto (text on a terminal, JSON otherwise), json or text. [default: auto]
    /// [env: TFMIRROR_LOG_FORMAT] [config: log_format]
    #[arg(long, global = true, value_name = "FORMAT")]
    log_format: Option<String>,
}

#[derive(Args, Debug)]
pub(super) struct Credential {
    /// The GitLab token to act for (sent as `Authorization: Bearer`). [env: TFMIRROR_TOKEN]
    #[arg(
        long,
        value_name = "TOKEN",
        env = "TFMIRROR_TOKEN",
        hide_env_values = true
    )]
    pub(super) token: Option<String>,
}

/// Run the command line; the binary's `main`.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve::serve(args),
        Command::Check(args) => check::check(args),
        Command::Warm(args) => warm::warm(args),
        Command::Sync(args) => warm::sync(args),
        Command::Cache(args) => cache::cache(args),
        Command::Secret(args) => secret::secret(args),
        Command::Health(args) => health::health(&args),
        Command::Bundle(args) => bundle::bundle(args),
    }
}

pub(super) fn load(common: &Common, extra: Overrides) -> Result<Config, ExitCode> {
    let overrides = Overrides {
        upstream: common.upstream.clone(),
        upstream_ca: common.upstream_ca.clone(),
        cache_dir: common.cache_dir.clone(),
        secret_file: common.secret_file.clone(),
        log_level: common.log_level.clone(),
        log_format: common.log_format.clone(),
        ..extra
    };
    Config::load(common.config.as_deref(), &overrides).map_err(|e| {
        eprintln!("tfmirror: {e}");
        ExitCode::from(2)
    })
}

/// Progress on a terminal as a bar, otherwise as plain lines.
pub(super) struct Progress(Option<indicatif::ProgressBar>);

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

pub(super) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

pub(super) fn bearer(credential: &Credential) -> Result<Option<http::HeaderValue>, ExitCode> {
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
pub(super) fn client_setup(
    common: &Common,
    credential: &Credential,
) -> Result<(Config, Option<http::HeaderValue>), ExitCode> {
    let config = load(common, Overrides::default())?;
    // Progress goes to the terminal; only warnings and errors are logged.
    logging::init(
        LogLevel::Warn.min(config.log_level),
        config.log_format,
        false,
    );
    Ok((config, bearer(credential)?))
}
