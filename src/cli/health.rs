//! `tfmirror health`: is a running tfmirror alive? The container image's health check.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::config::{Config, Overrides};

#[derive(Args, Debug)]
pub(super) struct HealthArgs {
    /// The YAML configuration file `serve` runs with. [env: TFMIRROR_CONFIG]
    #[arg(long, value_name = "FILE", env = "TFMIRROR_CONFIG", hide_env = true)]
    config: Option<PathBuf>,
    /// The URL to ask. [default: /-/health on the `listen` port of the configuration, at
    /// 127.0.0.1 (::1) when it listens on all addresses; https when `tls_cert` is set,
    /// trusting exactly that certificate]
    #[arg(long, value_name = "URL")]
    url: Option<String>,
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
pub(super) fn health(args: &HealthArgs) -> ExitCode {
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
        let tls = crate::tls::pinned_client_config(cert).map_err(|e| format!("`tls_cert`: {e}"))?;
        client = client.use_preconfigured_tls(tls);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    // The client needs the runtime's reactor from the start.
    let status = rt.block_on(async {
        // Not an upstream client (those go through `upstream::tls::http_client`): this one asks
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
