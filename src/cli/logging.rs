//! Log output of every command: JSON lines for machines, short text lines for people.
//!
//! Both are tracing-subscriber's own formatters (`json()` and `compact()`); tfmirror only
//! picks one. Pingora's `log` records are bridged into the same stream (`logbridge`).

use std::io::IsTerminal;

use crate::config::{LogFormat, LogLevel};

/// The format lines are written in, once `auto` is decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Shape {
    Json,
    Text,
}

/// `log_format` against where stderr goes: `auto` is text for a person at a terminal and
/// JSON for anything else (a file, a pipe, a container runtime's log driver).
pub(super) fn shape(format: LogFormat, stderr_is_terminal: bool) -> Shape {
    match format {
        LogFormat::Json => Shape::Json,
        LogFormat::Text => Shape::Text,
        LogFormat::Auto if stderr_is_terminal => Shape::Text,
        LogFormat::Auto => Shape::Json,
    }
}

/// Install the process's log output: lines at `level` and above on stderr, in `format`.
/// Returns the shape chosen.
///
/// Only tfmirror's own targets go below `info`: pingora, hyper and reqwest dump request
/// headers (`Authorization`) and URLs (JWTs, presigned links) in their debug records.
///
/// `buffered` (the server): lines go through per-thread buffers (`logbuf`), so the access
/// log costs no syscall per request. In JSON, the access line is formatted by `accesslog`
/// itself into the same buffer (the filter still decides whether it is written); in text it
/// goes through tracing's formatter like every other line (a person reads at most a few
/// lines a second). The one-shot commands write each line at once.
pub(super) fn init(level: LogLevel, format: LogFormat, buffered: bool) -> Shape {
    let terminal = std::io::stderr().is_terminal();
    let shape = shape(format, terminal);
    let others = match level {
        LogLevel::Debug | LogLevel::Trace => LogLevel::Info,
        l => l,
    };
    let directives = format!("{},tfmirror={}", others.as_str(), level.as_str());
    let filter = tracing_subscriber::EnvFilter::new(directives);
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    // The two builders are different types: each is finished and installed on its own.
    let installed = match (shape, buffered) {
        (Shape::Json, true) => {
            let buffer = crate::logbuf::stderr();
            crate::edge::accesslog::set_output(buffer.clone());
            let json = builder.json().with_current_span(false);
            tracing::subscriber::set_global_default(json.with_writer(buffer).finish())
        }
        (Shape::Json, false) => {
            let json = builder.json().with_current_span(false);
            tracing::subscriber::set_global_default(json.with_writer(std::io::stderr).finish())
        }
        // Colours only on a terminal: `--log-format text` into a file stays plain.
        (Shape::Text, true) => {
            let text = builder.compact().with_ansi(terminal);
            let buffer = crate::logbuf::stderr();
            tracing::subscriber::set_global_default(text.with_writer(buffer).finish())
        }
        (Shape::Text, false) => {
            let text = builder.compact().with_ansi(terminal);
            tracing::subscriber::set_global_default(text.with_writer(std::io::stderr).finish())
        }
    };
    installed.expect("the only tracing subscriber");
    // pingora's `log` records, through tfmirror's bridge (not tracing-subscriber's own).
    crate::logbridge::init().expect("the only `log` logger");
    shape
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_is_text_on_a_terminal_and_json_elsewhere() {
        for (format, terminal, want) in [
            (LogFormat::Auto, true, Shape::Text),
            (LogFormat::Auto, false, Shape::Json),
            (LogFormat::Json, true, Shape::Json),
            (LogFormat::Json, false, Shape::Json),
            (LogFormat::Text, true, Shape::Text),
            (LogFormat::Text, false, Shape::Text),
        ] {
            assert_eq!(
                shape(format, terminal),
                want,
                "{format:?} terminal={terminal}"
            );
        }
    }
}
