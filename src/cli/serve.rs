//! `tfmirror serve`: the proxy.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Args;

use super::logging::{self, Shape};
use super::{load, Common};
use crate::config::{Config, Overrides};

#[derive(Args, Debug)]
pub(super) struct ServeArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    flags: ServeFlags,
}

/// The flags of `serve`, which `check` takes too (a configuration is checked as it will run).
#[derive(Args, Debug)]
pub(super) struct ServeFlags {
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
    pub(super) offline: bool,
    /// Take the listening sockets over from a running tfmirror on the same cache dir (then
    /// send it SIGQUIT): a restart that loses no request.
    #[arg(long)]
    pub(super) upgrade: bool,
}

impl ServeFlags {
    /// The settings these flags give.
    pub(super) fn overrides(&self) -> Overrides {
        Overrides {
            listen: self.listen.clone(),
            public_url: self.public_url.clone(),
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            offline: self
                .offline
                .then_some(crate::config::OfflineOverride { enabled: true }),
            ..Overrides::default()
        }
    }
}

pub(super) fn serve(args: ServeArgs) -> ExitCode {
    let extra = args.flags.overrides();
    let config = match load(&args.common, extra) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let shape = logging::init(config.log_level, config.log_format, true);
    // First, before anything pingora logs while the server is built.
    starting(&config);
    // Out now: a warning of another thread is written at once, and must not come first.
    crate::logbuf::flush();
    if shape == Shape::Text && std::io::stderr().is_terminal() {
        // Written around the log, not through it: a block to copy, not a field to escape.
        eprintln!("{}", next_step(&config, &hostname()));
    }
    let server = match crate::server::build(&config, args.flags.upgrade) {
        Ok(s) => s,
        Err(e) => {
            crate::logbuf::flush();
            eprintln!("tfmirror: {e}");
            return ExitCode::from(2);
        }
    };
    // Not `run_forever`, which exits inside: the buffered log goes out first.
    server.run(pingora::server::RunArgs::default());
    tracing::info!("tfmirror stopped");
    crate::logbuf::flush();
    ExitCode::SUCCESS
}

/// The start-up line: what this process serves, from where, into what.
fn starting(config: &Config) {
    let providers: Vec<String> = config.providers.upstreams().into_keys().collect();
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        listen = %listen_url(config),
        metrics = config.metrics_listen.map(|a| format!("http://{a}")),
        upstream = %config.upstream,
        cache_dir = %config.cache_dir.display(),
        memory_size = config.cache.memory_size.display().iec().to_string(),
        disk_size = config.cache.disk_size.display().iec().to_string(),
        offline = config.offline.enabled,
        unknown_identity = format!("{:?}", config.offline.unknown_identity).to_lowercase(),
        providers = %providers.join(","),
        "tfmirror starting"
    );
}

/// `scheme://listen`.
fn listen_url(config: &Config) -> String {
    let scheme = if config.tls_cert.is_some() {
        "https"
    } else {
        "http"
    };
    format!("{scheme}://{}", config.listen)
}

/// This machine's name, for a `host` block read on another one.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// What to do next: the `host` block a runner's Terraform CLI configuration needs to use this
/// mirror (the README's). The address is `public_url`, else the listen address (this
/// machine's `hostname` when it listens on all addresses).
fn next_step(config: &Config, hostname: &str) -> String {
    let base = match &config.public_url {
        Some(url) => url.as_str().trim_end_matches('/').to_string(),
        None if config.listen.ip().is_unspecified() => {
            let scheme = if config.tls_cert.is_some() {
                "https"
            } else {
                "http"
            };
            format!("{scheme}://{hostname}:{}", config.listen.port())
        }
        None => listen_url(config),
    };
    let registry = match config.upstream.port() {
        Some(p) => format!("{}:{p}", config.upstream.host_str().unwrap_or_default()),
        None => config.upstream.host_str().unwrap_or_default().to_string(),
    };
    format!(
        "\nTo send Terraform's module downloads through this mirror, put this in each runner's \
         Terraform CLI configuration (TF_CLI_CONFIG_FILE, or ~/.terraformrc):\n\n\
         host \"{registry}\" {{\n  services = {{\n    \"modules.v1\" = \
         \"{base}/api/v4/packages/terraform/modules/v1/\"\n  }}\n}}\n\n\
         Check a configuration before deploying it: tfmirror check --config FILE --token TOKEN\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(yaml: &str) -> Config {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, yaml).unwrap();
        Config::load(Some(&path), &Overrides::default()).unwrap()
    }

    /// The block is the README's, for the upstream's host and the address runners reach.
    #[test]
    fn the_host_block_names_the_upstream_host_and_the_reachable_address() {
        let block = |yaml: &str| next_step(&config(yaml), "mirror-1");
        let b = block("upstream: https://gitlab.example.com\nlisten: 127.0.0.1:8080\n");
        assert!(
            b.contains(
                "host \"gitlab.example.com\" {\n  services = {\n    \"modules.v1\" = \
                 \"http://127.0.0.1:8080/api/v4/packages/terraform/modules/v1/\"\n  }\n}\n"
            ),
            "{b}"
        );
        let b = block("upstream: https://gitlab.example.com:8443/gitlab\nlisten: 0.0.0.0:80\n");
        assert!(b.contains("host \"gitlab.example.com:8443\""), "{b}");
        assert!(b.contains("\"http://mirror-1:80/api/v4/"), "{b}");
        let b = block("public_url: https://tfmirror.example.com/\nlisten: 0.0.0.0:80\n");
        assert!(
            b.contains("\"https://tfmirror.example.com/api/v4/packages/terraform/modules/v1/\""),
            "{b}"
        );
        assert!(b.contains("host \"gitlab.com\""), "{b}");
    }
}
