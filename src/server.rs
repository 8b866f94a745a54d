//! Assemble and run the pingora server from a validated [`Config`].

use std::sync::Arc;

use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::Server;

use crate::cache::Cache;
use crate::config::Config;
use crate::edge::proxy::Proxy;
use crate::identity::Secret;
use crate::registry::Registry;
use crate::upstream::health::Health;
use crate::upstream::Upstream;

/// The parts every command that talks to GitLab or the cache needs.
pub struct Parts {
    pub upstream: Arc<Upstream>,
    pub cache: Arc<Cache>,
    pub registry: Arc<Registry>,
    pub health: Arc<Health>,
    pub providers: Arc<crate::providers::Providers>,
}

/// Open the cache directory and set up the upstream. Fails on anything that would only break
/// later (bad CA file, unusable cache directory).
pub fn open(config: &Config) -> Result<Parts, String> {
    crate::cache::private::create_dir_all(&config.cache_dir).map_err(|e| {
        format!(
            "invalid configuration: `cache_dir`: cannot create {}: {e}",
            config.cache_dir.display()
        )
    })?;
    crate::cache::private::warn_if_open(&config.cache_dir);
    let upstream = Arc::new(Upstream::new(config)?);
    let secret = Secret::load(
        &config.cache_dir,
        config.secret_file.as_deref(),
        config.secret_previous_file.as_deref(),
    )
    .map_err(|e| format!("invalid configuration: {e}"))?;
    let cache = Arc::new(
        Cache::open(
            &config.cache_dir,
            config.cache.memory_size.as_u64(),
            config.cache.disk_size.as_u64(),
            &config.limits,
        )
        .map_err(|e| format!("invalid configuration: `cache_dir`: {e}"))?,
    );
    let health = Arc::new(Health::new(
        config.offline.enabled,
        config.offline.breaker_threshold,
        config.offline.deadline,
    ));
    let providers = Arc::new(crate::providers::Providers::new(config, cache.clone())?);
    let registry = Arc::new(Registry::new(
        upstream.clone(),
        cache.clone(),
        secret,
        health.clone(),
        config,
    ));
    Ok(Parts {
        upstream,
        cache,
        registry,
        health,
        providers,
    })
}

/// How often `serve` removes grant records past `auth.grant_ttl + cache.stale_if_error`.
const GRANT_GC_EVERY: std::time::Duration = std::time::Duration::from_secs(600);

/// Build the server. `upgrade`: take the listening sockets over from a running instance
/// (pingora's graceful upgrade; the old one is sent SIGQUIT).
pub fn build(config: &Config, upgrade: bool) -> Result<Server, String> {
    let Parts {
        upstream,
        cache,
        registry,
        health,
        providers,
    } = open(config)?;
    crate::metrics::init();
    let horizon = (config.auth.grant_ttl + config.cache.stale_if_error).as_secs();
    cache.start_housekeeping(horizon, GRANT_GC_EVERY);

    let opt = Opt {
        upgrade,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, server_conf(config));
    server.bootstrap();

    // One service per thread, each on its own socket: see `workers` for why.
    let resolver = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Some(Arc::new(
            crate::tls::ReloadingCert::new(cert, key)
                .map_err(|e| format!("invalid configuration: `tls_cert`: {e}"))?,
        )),
        _ => None,
    };
    let group = crate::edge::workers::Group::new(config.listen, config.threads);
    for i in 0..config.threads {
        let proxy = Proxy::new(
            upstream.clone(),
            cache.clone(),
            registry.clone(),
            health.clone(),
            config,
        )
        .with_providers(providers.clone());
        let app = crate::edge::downstream::Guarded::new(
            pingora::proxy::http_proxy(&server.configuration, proxy),
            config.timeouts.client_idle,
            config.timeouts.client_stall,
        );
        let tls = resolver.as_ref().map(tls_settings).transpose()?;
        server.add_service(crate::edge::workers::Worker::new(
            group.clone(),
            i,
            app,
            tls,
            config.timeouts.client_idle,
        ));
    }

    add_side_services(&mut server, config, &registry, cache, health);
    Ok(server)
}

/// The services beside the proxy: GitLab's ID-token keys, fetched at start and hourly
/// (`registry::idkeys`), and `/-/metrics` on its own listener when `metrics_listen` is set.
fn add_side_services(
    server: &mut Server,
    config: &Config,
    registry: &Registry,
    cache: Arc<Cache>,
    health: Arc<Health>,
) {
    if let Some(keeper) = registry.id_keys_keeper() {
        server.add_service(pingora::services::background::background_service(
            "tfmirror id-token keys",
            keeper,
        ));
    }
    if let Some(addr) = config.metrics_listen {
        let app = crate::edge::metrics_app::MetricsApp { cache, health };
        let mut metrics = pingora::services::listening::Service::new(
            "tfmirror metrics".to_string(),
            pingora::apps::http_app::HttpServer::new_app(app),
        );
        metrics.add_tcp(&addr.to_string());
        server.add_service(metrics);
    }
}

fn server_conf(config: &Config) -> ServerConf {
    let state = |name: &str| config.cache_dir.join(name).to_string_lossy().into_owned();
    ServerConf {
        // The proxy runs one service per thread (`workers`); this is for the metrics
        // listener, whose scrapes need no more.
        threads: 1,
        // Single-threaded runtimes, like nginx workers: work stealing costs cross-thread
        // wake-ups (a third of the CPU on the hit path, measured with perf).
        work_stealing: false,
        // Per-instance files live in the cache dir, so several instances never collide, and
        // an upgrading process finds its predecessor's socket.
        pid_file: state("tfmirror.pid"),
        upgrade_sock: state("tfmirror-upgrade.sock"),
        // pingora's own timeouts (body reads and writes under `client_stall`, upstream
        // connects) otherwise run on `pingora_timeout`'s wheel, whose thread sleeps 10 ms at
        // a time for ever once the first one is set: 100 wake-ups a second on an idle
        // server, and a syscall per cached hit in `strace` at 8 connections. With 0, every
        // timeout of a second or more goes to the worker's tokio timers, which fire from its
        // own `epoll_wait`. Only a `timeouts` setting under a second still starts that
        // thread (pingora sets no shorter timeout of its own on tfmirror's paths).
        fast_timeout_to_tokio_threshold_seconds: Some(0),
        grace_period_seconds: Some(5),
        graceful_shutdown_timeout_seconds: Some(10),
        ..ServerConf::default()
    }
}

/// TLS for one worker's listener, with the shared reloading certificate.
fn tls_settings(
    resolver: &Arc<crate::tls::ReloadingCert>,
) -> Result<pingora::listeners::tls::TlsSettings, String> {
    let mut tls = pingora::listeners::tls::TlsSettings::intermediate("", "")
        .map_err(|e| format!("TLS settings: {e}"))?;
    tls.set_cert_resolver(resolver.clone());
    tls.enable_h2();
    Ok(tls)
}
