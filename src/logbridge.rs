//! `log` records (pingora's, reqwest's, rustls's), into tracing, shortened and some demoted.
//!
//! pingora logs through the `log` crate. This bridge hands each record to tracing as
//! `tracing-log`'s `LogTracer` does, with three changes:
//!
//! - **Where it was logged is dropped.** `log.file` (an absolute path into the cargo registry
//!   of the machine that built the binary), `log.module_path` and `log.line` tell an operator
//!   nothing and show the build machine's paths. The target is kept as one short field: the
//!   record becomes a tracing event of target `pingora` (every pingora crate), `reqwest`,
//!   `rustls`, or `log` with the crate in a `library` field. (`tracing-log`'s own events carry
//!   those fields, and a `log.target` besides, which tracing-subscriber's JSON formatter
//!   writes out; events of fixed targets carry nothing but the message.)
//! - **Pingora's start-up and shutdown chatter goes to debug** ("Bootstrap starting",
//!   "Starting service: ...", "Broadcasting graceful shutdown", ...): tfmirror's own start-up
//!   line says what matters. The records of a signal received ("SIGTERM received, gracefully
//!   exiting") stay at info: they say why the process is stopping.
//! - **A client gone mid-head goes to debug and is counted.** When a client closes or resets
//!   its connection partway through a request head, pingora-proxy 0.9.1 logs `Fail to proxy:
//!   Downstream ReadError|ConnectionClosed context: while reading request headers...` at ERROR
//!   (`HttpProxy::handle_new_request`), and an error line is written at once, unbuffered: a
//!   port scan or a flaky client network made 2,000 of them in 0.4 s. That is the client's
//!   doing, not a failure of the proxy, so it is counted in `tfmirror_client_aborts_total`.
//!   A failure to reach or read the upstream is still an error line. (A client that closes
//!   before sending any byte is no record at all: pingora treats that as a keep-alive
//!   connection ending.)
//!
//! Debug records are never written for crates other than tfmirror (see `cli::logging`), so a
//! demoted record costs nothing.

use log::{Level, Log, Metadata, Record};
use tracing_log::{AsLog, LogTracer};

use crate::metrics;

/// The starts of pingora-proxy's records for a client gone before its request head was in:
/// its "Fail to proxy" line with the head read's own error (`HttpSession::read_request`).
const CLIENT_ABORTS: [&str; 2] = [
    "Fail to proxy: Downstream ReadError context: while reading request headers",
    "Fail to proxy: Downstream ConnectionClosed context: while reading request headers",
];

/// Install the bridge as the `log` crate's logger, after tracing's global subscriber (whose
/// level filter it copies, so that records nobody would write are not even formatted).
pub fn init() -> Result<(), log::SetLoggerError> {
    log::set_boxed_logger(Box::new(Bridge(LogTracer::new())))?;
    log::set_max_level(tracing::level_filters::LevelFilter::current().as_log());
    Ok(())
}

struct Bridge(LogTracer);

impl Log for Bridge {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        self.0.enabled(metadata)
    }

    fn log(&self, record: &Record<'_>) {
        if !self.0.enabled(record.metadata()) {
            return;
        }
        let level = if is_client_abort(record) {
            metrics::CLIENT_ABORTS.inc();
            Level::Debug
        } else if is_chatter(record) {
            Level::Debug
        } else {
            record.level()
        };
        emit(crate_of(record.target()), level, record.args());
    }

    fn flush(&self) {
        self.0.flush();
    }
}

/// A tracing event of a fixed `target` at a `log` level (tracing's levels are part of each
/// event's static metadata: one call site per level).
macro_rules! event_at {
    ($target:literal, $level:expr, $($rest:tt)+) => {
        match $level {
            Level::Error => tracing::event!(target: $target, tracing::Level::ERROR, $($rest)+),
            Level::Warn => tracing::event!(target: $target, tracing::Level::WARN, $($rest)+),
            Level::Info => tracing::event!(target: $target, tracing::Level::INFO, $($rest)+),
            Level::Debug => tracing::event!(target: $target, tracing::Level::DEBUG, $($rest)+),
            Level::Trace => tracing::event!(target: $target, tracing::Level::TRACE, $($rest)+),
        }
    };
}

/// The record's message as an event of its library's short target. The subscriber's filter
/// decides on that target and level, and the message is formatted only if it passes.
fn emit(library: &str, level: Level, args: &std::fmt::Arguments<'_>) {
    if library.starts_with("pingora") {
        event_at!("pingora", level, "{args}");
    } else if library == "reqwest" {
        event_at!("reqwest", level, "{args}");
    } else if library == "rustls" {
        event_at!("rustls", level, "{args}");
    } else {
        event_at!("log", level, library, "{args}");
    }
}

/// The crate part of a target: `pingora_core::server::bootstrap_services` is `pingora_core`.
fn crate_of(target: &str) -> &str {
    target.split("::").next().unwrap_or(target)
}

/// Is `record` pingora's info chatter of a start or a stop (its server and services modules),
/// other than the line of a signal received?
fn is_chatter(record: &Record<'_>) -> bool {
    if record.level() != Level::Info {
        return false;
    }
    let target = record.target();
    let module = ["pingora_core::server", "pingora_core::services"]
        .iter()
        .any(|m| target == *m || target.strip_prefix(m).is_some_and(|r| r.starts_with("::")));
    // Formatted only for those modules' info records: a few at start and stop.
    module && !record.args().to_string().contains(" received")
}

/// Is `record` pingora-proxy's error line for a client that left mid-head?
fn is_client_abort(record: &Record<'_>) -> bool {
    if record.level() != Level::Error || record.target() != "pingora_proxy" {
        return false;
    }
    // Formatted only for pingora-proxy's errors, which are otherwise rare.
    let line = record.args().to_string();
    CLIENT_ABORTS.iter().any(|start| line.starts_with(start))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora::{Error, ErrorType};

    fn chatter(level: Level, target: &str, line: &str) -> bool {
        is_chatter(
            &Record::builder()
                .args(format_args!("{line}"))
                .level(level)
                .target(target)
                .build(),
        )
    }

    /// pingora-core 0.9.1's start-up and shutdown records, as logged (module, text), and
    /// whether they are demoted: all but the signals'. Anything else of pingora's keeps its
    /// level.
    const CHATTER: [(&str, &str, bool); 14] = [
        (
            "pingora_core::server::bootstrap_services",
            "Bootstrap starting",
            true,
        ),
        (
            "pingora_core::server::bootstrap_services",
            "Bootstrap done",
            true,
        ),
        ("pingora_core::server", "Server starting", true),
        (
            "pingora_core::server",
            "Starting services in dependency order: [..]",
            true,
        ),
        ("pingora_core::server", "Starting service: tfmirror 0", true),
        (
            "pingora_core::server",
            "Broadcasting graceful shutdown",
            true,
        ),
        ("pingora_core::server", "service 'tfmirror 0' exited.", true),
        (
            "pingora_core::services",
            "Service x spent 3ms waiting on dependencies",
            true,
        ),
        (
            "pingora_core::server",
            "SIGTERM received, gracefully exiting",
            false,
        ),
        (
            "pingora_core::server",
            "SIGQUIT received, sending socks and gracefully exiting",
            false,
        ),
        (
            "pingora_core::server",
            "Ctrl+C received, gracefully exiting",
            false,
        ),
        ("pingora_core::serverless", "Server starting", false),
        ("pingora_core::listeners::l4", "Server starting", false),
        ("pingora_proxy", "Server starting", false),
    ];

    #[test]
    fn pingoras_start_and_stop_chatter_is_demoted_but_signals_are_not() {
        for (target, line, demoted) in CHATTER {
            assert_eq!(
                chatter(Level::Info, target, line),
                demoted,
                "{target}: {line}"
            );
        }
        // Warnings and errors of those modules stay what they are.
        assert!(!chatter(
            Level::Warn,
            "pingora_core::server",
            "Server starting"
        ));
        assert!(!chatter(
            Level::Error,
            "pingora_core::server::bootstrap_services",
            "x"
        ));
    }

    /// Collects what a subscriber writes.
    #[derive(Clone, Default)]
    struct Out(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Out {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Out {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    /// A pingora warning as the `log` macros make it (module, absolute file, line), through
    /// a bridge, under `subscriber`.
    fn bridged(subscriber: impl tracing::Subscriber + Send + Sync) {
        let file = "/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/\
                    pingora-core-0.9.1/src/server/mod.rs";
        tracing::subscriber::with_default(subscriber, || {
            Bridge(LogTracer::new()).log(
                &Record::builder()
                    .args(format_args!("listener failed: address in use"))
                    .level(Level::Warn)
                    .target("pingora_core::server")
                    .module_path(Some("pingora_core::server"))
                    .file(Some(file))
                    .line(Some(643))
                    .build(),
            );
        });
    }

    /// Through tracing-subscriber's JSON and text formatters, a bridged record names neither
    /// the file, the module nor the line; its short target is said once.
    #[test]
    fn bridged_records_carry_no_build_paths() {
        let (json, text) = (Out::default(), Out::default());
        let w = json.clone();
        bridged(
            tracing_subscriber::fmt()
                .json()
                .with_writer(move || w.clone())
                .finish(),
        );
        let w = text.clone();
        let compact = tracing_subscriber::fmt().compact().with_ansi(false);
        bridged(compact.with_writer(move || w.clone()).finish());
        let (json, text) = (json.text(), text.text());
        let line: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
        assert_eq!(line["target"], "pingora", "{json}");
        assert_eq!(
            line["fields"].as_object().unwrap().len(),
            1,
            "the message only: {json}"
        );
        assert_eq!(line["level"], "WARN");
        assert_eq!(line["fields"]["message"], "listener failed: address in use");
        for line in [&json, &text] {
            for gone in [
                "log.file",
                "log.module_path",
                "log.line",
                ".cargo",
                "mod.rs",
                "643",
            ] {
                assert!(!line.contains(gone), "{gone} in {line}");
            }
        }
        assert!(text.contains(" WARN pingora: listener failed"), "{text}");
        assert_eq!(text.matches("pingora").count(), 1, "{text}");
    }

    /// A library outside the fixed targets: target `log`, its crate in `library`.
    #[test]
    fn other_libraries_are_named_in_a_field() {
        let json = Out::default();
        let w = json.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_writer(move || w.clone());
        tracing::subscriber::with_default(subscriber.finish(), || {
            Bridge(LogTracer::new()).log(
                &Record::builder()
                    .args(format_args!("evicted"))
                    .level(Level::Info)
                    .target("moka::sync::cache")
                    .file(Some("/build/moka/src/sync/cache.rs"))
                    .build(),
            );
        });
        let line: serde_json::Value = serde_json::from_str(json.text().trim()).unwrap();
        assert_eq!(line["target"], "log");
        assert_eq!(
            line["fields"],
            serde_json::json!({"message": "evicted", "library": "moka"})
        );
    }

    #[test]
    fn targets_are_cut_to_their_crate() {
        for (target, want) in [
            ("pingora_core::server::bootstrap_services", "pingora_core"),
            ("pingora_proxy", "pingora_proxy"),
            ("reqwest::connect", "reqwest"),
            ("", ""),
        ] {
            assert_eq!(crate_of(target), want);
        }
    }

    /// pingora's "Fail to proxy" line for a failed head read, formatted as pingora-proxy
    /// 0.9.1 formats it, so a pingora upgrade that rewords it fails here.
    fn head_read_failed(mut e: Box<Error>) -> String {
        e.as_down();
        format!("Fail to proxy: {e}, downstream session type: h1")
    }

    fn is_abort(level: Level, target: &str, line: &str) -> bool {
        is_client_abort(
            &Record::builder()
                .args(format_args!("{line}"))
                .level(level)
                .target(target)
                .build(),
        )
    }

    #[test]
    fn only_pingoras_record_of_a_client_gone_mid_head_is_demoted() {
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        let reset = head_read_failed(Error::because(
            ErrorType::ReadError,
            "while reading request headers",
            reset,
        ));
        let closed = head_read_failed(Error::explain(
            ErrorType::ConnectionClosed,
            "while reading request headers, bytes already read: 16",
        ));
        assert!(is_abort(Level::Error, "pingora_proxy", &reset), "{reset}");
        assert!(is_abort(Level::Error, "pingora_proxy", &closed), "{closed}");
        // Not from pingora-proxy, or not at error: left alone.
        assert!(!is_abort(Level::Error, "tfmirror", &reset));
        assert!(!is_abort(Level::Warn, "pingora_proxy", &reset));
        // Real proxy failures stay errors: the upstream's, and the client's mid-response.
        let upstream = format!(
            "Fail to proxy: {}, status: 502, tries: 1, retry: false, GET pass_through",
            Error::explain(ErrorType::ConnectRefused, "connecting to 127.0.0.1:1")
        );
        assert!(
            !is_abort(Level::Error, "pingora_proxy", &upstream),
            "{upstream}"
        );
        let mut write = Error::explain(ErrorType::WriteError, "while writing body");
        write.as_down();
        let mid_body = format!("Fail to proxy: {write}, status: 0, tries: 1, retry: false, GET x");
        assert!(
            !is_abort(Level::Error, "pingora_proxy", &mid_body),
            "{mid_body}"
        );
    }
}
