//! The `tfmirror` command line. See the crate docs in `lib.rs` for the layout.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use tfmirror::config::{Config, LogLevel, Overrides};

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
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// YAML configuration file. [env: TFMIRROR_CONFIG]
    #[arg(long, value_name = "FILE", env = "TFMIRROR_CONFIG", hide_env = true)]
    config: Option<PathBuf>,
    /// Address to listen on. [default: 127.0.0.1:8080] [env: TFMIRROR_LISTEN] [config: listen]
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Upstream GitLab base URL, optionally with a relative URL root (https://host/gitlab).
    /// [default: https://gitlab.com] [env: TFMIRROR_UPSTREAM] [config: upstream]
    #[arg(long, value_name = "URL")]
    upstream: Option<String>,
    /// Cache directory. [default: ./tfmirror-cache] [env: TFMIRROR_CACHE_DIR] [config: cache_dir]
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<String>,
    /// How clients reach tfmirror, used to rewrite absolute URLs. Unset: the request's own
    /// scheme and Host. [env: TFMIRROR_PUBLIC_URL] [config: public_url]
    #[arg(long, value_name = "URL")]
    public_url: Option<String>,
    /// PEM file of CA certificates trusted for the upstream, in addition to the system roots.
    /// [env: TFMIRROR_UPSTREAM_CA] [config: upstream_ca]
    #[arg(long, value_name = "FILE")]
    upstream_ca: Option<String>,
    /// error, warn, info, debug or trace. [default: info] [env: TFMIRROR_LOG_LEVEL] [config: log_level]
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<String>,
    /// Never contact the upstream: serve only the cache, under the same access rules.
    /// [env: TFMIRROR_OFFLINE__ENABLED] [config: offline.enabled]
    #[arg(long)]
    offline: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args),
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    let overrides = Overrides {
        listen: args.listen,
        upstream: args.upstream,
        upstream_ca: args.upstream_ca,
        public_url: args.public_url,
        cache_dir: args.cache_dir,
        log_level: args.log_level,
        offline: args
            .offline
            .then_some(tfmirror::config::OfflineOverride { enabled: true }),
    };
    let config = match Config::load(args.config.as_deref(), &overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tfmirror: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(config.log_level);
    let server = match tfmirror::server::build(&config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("tfmirror: {e}");
            return ExitCode::from(2);
        }
    };
    tracing::info!(
        listen = %config.listen,
        upstream = %config.upstream,
        cache_dir = %config.cache_dir.display(),
        "tfmirror starting"
    );
    server.run_forever()
}

/// JSON lines on stderr. Pingora's own `log` records are bridged into the same stream.
///
/// Only tfmirror's own targets go below `info`: pingora, hyper and reqwest dump request
/// headers (`Authorization`) and URLs (JWTs, presigned links) in their debug records.
fn init_logging(level: LogLevel) {
    let others = match level {
        LogLevel::Debug | LogLevel::Trace => LogLevel::Info,
        l => l,
    };
    let directives = format!("{},tfmirror={}", others.as_str(), level.as_str());
    let filter = tracing_subscriber::EnvFilter::new(directives);
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_current_span(false)
        .init();
}
