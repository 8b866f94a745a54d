//! pingora's `log` records, into tracing (the JSON log), with one kind demoted.
//!
//! pingora logs through the `log` crate. This bridge hands each record to tracing as
//! `tracing-log`'s `LogTracer` does, except one: when a client closes or resets its
//! connection partway through a request head, pingora-proxy 0.9.1 logs `Fail to proxy:
//! Downstream ReadError|ConnectionClosed context: while reading request headers...` at ERROR
//! (`HttpProxy::handle_new_request`), and an error line is written at once, unbuffered: a
//! port scan or a flaky client network made 2,000 of them in 0.4 s. That is the client's
//! doing, not a failure of the proxy, so the record goes on at debug (which tfmirror never
//! enables for pingora: nothing is written) and is counted in `tfmirror_client_aborts_total`.
//! Every other record passes unchanged: a failure to reach or read the upstream is still an
//! error line. (A client that closes before sending any byte is no record at all: pingora
//! treats that as a keep-alive connection ending.)

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
        if !is_client_abort(record) {
            return self.0.log(record);
        }
        metrics::CLIENT_ABORTS.inc();
        self.0.log(
            &Record::builder()
                .args(*record.args())
                .level(Level::Debug)
                .target(record.target())
                .module_path(record.module_path())
                .file(record.file())
                .line(record.line())
                .build(),
        );
    }

    fn flush(&self) {
        self.0.flush();
    }
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
