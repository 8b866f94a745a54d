//! `tfmirror serve`: the proxy.

use std::process::ExitCode;

use clap::Args;

use super::{init_logging, load, Common};
use crate::config::Overrides;

#[derive(Args, Debug)]
pub(super) struct ServeArgs {
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

pub(super) fn serve(args: ServeArgs) -> ExitCode {
    let extra = Overrides {
        listen: args.listen,
        public_url: args.public_url,
        tls_cert: args.tls_cert,
        tls_key: args.tls_key,
        offline: args
            .offline
            .then_some(crate::config::OfflineOverride { enabled: true }),
        ..Overrides::default()
    };
    let config = match load(&args.common, extra) {
        Ok(c) => c,
        Err(code) => return code,
    };
    init_logging(config.log_level, true);
    let server = match crate::server::build(&config, args.upgrade) {
        Ok(s) => s,
        Err(e) => {
            crate::logbuf::flush();
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
    crate::logbuf::flush();
    ExitCode::SUCCESS
}
