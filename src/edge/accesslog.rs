//! The per-request record: the access log line and the request metrics, written once per
//! request from pingora's `logging` hook. No paths, queries or credentials: route templates,
//! the module and version of registry routes, and an identity's short hash.
//!
//! The line is an `info` event of target `tfmirror::access`, and the log filter decides
//! whether it is written, as for any event. `tfmirror serve` hands its log buffer to
//! [`set_output`]: the line is then formatted here ([`line`]) and appended to that buffer
//! directly, the same JSON tracing's formatter would have written. Without an output (a
//! library user, a test), the event goes through tracing itself.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

use http::Method;
use prometheus::{Histogram, IntCounter};

use crate::identity::Identity;
use crate::logbuf::LogBuffer;
use crate::metrics;
use crate::respond::CacheStatus;
use crate::routes::Route;

mod line;

/// What one request did.
pub struct Entry<'a> {
    pub method: &'a Method,
    /// `None`: refused before a route was parsed.
    pub route: Option<&'a Route>,
    /// The status sent, 0 when none was.
    pub status: u16,
    pub upstream_status: Option<u16>,
    pub cache: Option<CacheStatus>,
    pub identity: Option<Identity>,
    /// Response body bytes sent.
    pub bytes: usize,
    pub elapsed: Duration,
    /// When the request ended (the line's timestamp).
    pub at: std::time::Instant,
    pub error: Option<&'a str>,
}

/// The metric children of one label set.
struct Handles {
    requests: IntCounter,
    duration: Histogram,
    bytes: IntCounter,
}

/// Label values are `&'static str`s, so their addresses identify them.
type LabelKey = [usize; 5];

thread_local! {
    /// Each thread's metric children by label set. `with_label_values` hashes the values and
    /// takes the family's lock on every call; a thread-local copy of the handle costs
    /// neither (the counters themselves are shared atomics).
    static HANDLES: RefCell<HashMap<LabelKey, Handles, foldhash::fast::RandomState>> =
        RefCell::new(HashMap::default());
}

/// Where access lines go when tfmirror formats them itself.
static OUTPUT: OnceLock<LogBuffer> = OnceLock::new();

/// Write access lines into `buffer` directly, formatted by [`record`] (the first call wins).
/// `buffer` must be the one the tracing subscriber writes to, so that the access lines keep
/// their place among the other lines of their thread. Whether a line is written is still up
/// to that subscriber's filter.
pub fn set_output(buffer: LogBuffer) {
    let _ = OUTPUT.set(buffer);
}

/// Count one request under its label set, through this thread's handles for it.
fn count(labels: [&'static str; 5], e: &Entry<'_>) {
    let [kind, route, method, status, cache] = labels;
    let key = labels.map(|s| s.as_ptr() as usize);
    HANDLES.with(|h| {
        let mut h = h.borrow_mut();
        let h = h.entry(key).or_insert_with(|| Handles {
            requests: metrics::REQUESTS.with_label_values(&[kind, route, method, status, cache]),
            duration: metrics::REQUEST_DURATION.with_label_values(&[route, cache]),
            bytes: metrics::BYTES_SERVED.with_label_values(&[kind, cache]),
        });
        h.requests.inc();
        h.duration.observe(e.elapsed.as_secs_f64());
        h.bytes.inc_by(e.bytes as u64);
    });
}

/// Count the request and write its access line (`info`, target `tfmirror::access`).
pub fn record(e: &Entry<'_>) {
    let route = e.route.map_or("rejected", Route::template);
    let cache = e.cache.map_or("NONE", CacheStatus::as_str);
    let kind = e.route.map_or("other", Route::kind);
    count(
        [
            kind,
            route,
            method_label(e.method),
            status_label(e.status),
            cache,
        ],
        e,
    );
    access_line(OUTPUT.get(), e);
}

/// Write `e`'s access line into `output`, or through tracing without one, if the log filter
/// lets `info` events of target `tfmirror::access` through.
fn access_line(output: Option<&LogBuffer>, e: &Entry<'_>) {
    if !tracing::enabled!(target: "tfmirror::access", tracing::Level::INFO) {
        return;
    }
    // A module's or a provider's coordinates (both plain path parts, validated).
    let module = match e.route {
        Some(Route::Module(m)) => Some(line::Text::Str(m.module.as_str())),
        Some(Route::Provider(p)) => Some(line::Text::Display(&p.provider)),
        _ => None,
    };
    let version = match e.route {
        Some(Route::Module(m)) => m.version(),
        Some(Route::Provider(p)) => p.version(),
        _ => None,
    };
    let fields = line::Fields {
        method: e.method.as_str(),
        route: e.route.map_or("rejected", Route::template),
        module,
        version: version.map(|v| v as &dyn std::fmt::Display),
        status: e.status,
        upstream_status: e.upstream_status,
        cache: e.cache.map(CacheStatus::as_str),
        identity: e.identity.map(Identity::short_name),
        bytes: e.bytes,
        // Whole microseconds, in milliseconds: `1.234`, never `1.2345670000000001`.
        duration_ms: e.elapsed.as_micros() as f64 / 1000.0,
        error: e.error,
    };
    match output {
        Some(buffer) => {
            let micros = crate::clock::unix_micros_at(e.at);
            buffer.write_line_with(|out| line::write(out, micros, &fields));
        }
        None => through_tracing(&fields),
    }
}

/// The access line as a tracing event: for processes that set no output, and the reference
/// the direct formatter is tested against.
fn through_tracing(f: &line::Fields<'_>) {
    tracing::info!(
        target: "tfmirror::access",
        method = %f.method,
        route = f.route,
        module = f.module.map(tracing::field::display),
        version = f.version.map(tracing::field::display),
        status = f.status,
        upstream_status = f.upstream_status,
        cache = f.cache,
        identity = f.identity.as_ref().map(|i| i.as_str()),
        bytes = f.bytes,
        duration_ms = f.duration_ms,
        error = f.error,
    );
}

/// A fixed label set for methods: anything unusual is "other", never echoed.
fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::PUT => "PUT",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        _ => "other",
    }
}

fn status_label(status: u16) -> &'static str {
    const CODES: [(u16, &str); 16] = [
        (200, "200"),
        (201, "201"),
        (204, "204"),
        (206, "206"),
        (302, "302"),
        (304, "304"),
        (400, "400"),
        (401, "401"),
        (403, "403"),
        (404, "404"),
        (405, "405"),
        (414, "414"),
        (429, "429"),
        (500, "500"),
        (502, "502"),
        (503, "503"),
    ];
    CODES.iter().find(|(c, _)| *c == status).map_or(
        match status {
            504 => "504",
            0 => "none",
            s if s < 400 => "other_ok",
            s if s < 500 => "other_4xx",
            _ => "other_5xx",
        },
        |(_, l)| l,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The filter `tfmirror serve` installs for `--log-level info` (see `main.rs`).
    const INFO: &str = "info,tfmirror=info";

    /// Each entry's access line written both ways under the subscriber `tfmirror serve`
    /// installs with `filter`: (formatted here, through tracing's JSON formatter).
    fn both_ways(entries: &[Entry<'_>], filter: &str) -> (Vec<String>, Vec<String>) {
        let (direct, traced) = (Sink::default(), Sink::default());
        let direct_buffer = crate::logbuf::LogBuffer::new(direct.clone(), 1 << 20);
        let traced_buffer = crate::logbuf::LogBuffer::new(traced.clone(), 1 << 20);
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_current_span(false)
            .with_writer(traced_buffer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            for e in entries {
                access_line(Some(&direct_buffer), e);
                access_line(None, e);
            }
        });
        direct_buffer.flush();
        traced_buffer.flush();
        let lines = |sink: &Sink| {
            let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
            assert!(text.is_empty() || text.ends_with('\n'));
            text.lines().map(str::to_string).collect::<Vec<_>>()
        };
        (lines(&direct), lines(&traced))
    }

    /// The direct lines, checked byte for byte against tracing's but for the timestamp's
    /// value (its form is checked in `line`'s tests).
    fn direct_lines(entries: &[Entry<'_>], filter: &str) -> Vec<String> {
        let (direct, traced) = both_ways(entries, filter);
        assert_eq!(direct.len(), traced.len());
        const STAMP: std::ops::Range<usize> = 14..41; // {"timestamp":"2026-11-27T10:04:05.123456Z"
        for (d, t) in direct.iter().zip(&traced) {
            let with_their_time = format!("{}{}{}", &d[..STAMP.start], &t[STAMP], &d[STAMP.end..]);
            assert_eq!(&with_their_time, t);
            assert_eq!(&d[STAMP.end..STAMP.end + 1], "\"", "{d}");
        }
        direct
    }

    /// The fields of the access lines `entries` produce, as tfmirror formats them, after
    /// counting them (`record`).
    fn lines(entries: &[Entry<'_>]) -> Vec<serde_json::Value> {
        entries.iter().for_each(record);
        direct_lines(entries, INFO)
            .iter()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["fields"].clone())
            .collect()
    }

    fn entry<'a>(method: &'a Method, route: Option<&'a Route>) -> Entry<'a> {
        Entry {
            method,
            route,
            status: 200,
            upstream_status: None,
            cache: None,
            identity: None,
            bytes: 0,
            elapsed: Duration::ZERO,
            at: std::time::Instant::now(),
            error: None,
        }
    }

    /// A module download with an odd version, a listing, a provider archive.
    fn three_routes() -> [Route; 3] {
        [
            "/api/v4/packages/terraform/modules/v1/infra/vpc/aws/1.2.0-rc.1+build.5/download",
            "/api/v4/packages/terraform/modules/v1/infra/vpc/aws/versions",
            "/providers/mirror/registry.terraform.io/hashicorp/aws/5.1.0/linux_amd64.zip",
        ]
        .map(|path| crate::routes::parse(&Method::GET, path).unwrap())
    }

    #[test]
    fn direct_lines_match_the_tracing_formatter() {
        let [module, listing, provider] = three_routes();
        let purge = Method::from_bytes(b"PURGE").unwrap();
        let entries = [
            Entry {
                upstream_status: Some(204),
                cache: Some(CacheStatus::Miss),
                identity: Some(Identity([0x0f; 16])),
                bytes: 1 << 40,
                elapsed: Duration::from_nanos(1_234_567),
                at: std::time::Instant::now(),
                error: Some("ConnectTimedout"),
                ..entry(&Method::GET, Some(&module))
            },
            Entry {
                cache: Some(CacheStatus::Hit),
                identity: Some(Identity::ANONYMOUS),
                elapsed: Duration::from_secs(3),
                at: std::time::Instant::now(),
                ..entry(&Method::HEAD, Some(&listing))
            },
            Entry {
                status: 0,
                cache: Some(CacheStatus::Updating),
                elapsed: Duration::from_nanos(1),
                at: std::time::Instant::now(),
                ..entry(&Method::GET, Some(&provider))
            },
            Entry {
                status: 400,
                elapsed: Duration::from_secs(86_400 * 365),
                at: std::time::Instant::now(),
                ..entry(&purge, None)
            },
            entry(&Method::DELETE, None),
        ];
        let got = direct_lines(&entries, INFO);
        assert_eq!(got.len(), entries.len());
        let fields = |i: usize| {
            let line: serde_json::Value = serde_json::from_str(&got[i]).unwrap();
            assert_eq!(line["level"], "INFO");
            assert_eq!(line["target"], "tfmirror::access");
            line["fields"].clone()
        };
        assert_eq!(
            fields(0),
            serde_json::json!({
                "method": "GET", "route": "module_download", "module": "infra/vpc/aws",
                "version": "1.2.0-rc.1+build.5", "status": 200, "upstream_status": 204,
                "cache": "MISS", "identity": "0f0f0f0f", "bytes": 1_u64 << 40,
                "duration_ms": 1.234, "error": "ConnectTimedout"
            })
        );
        assert_eq!(fields(1)["identity"], "anonymous");
        assert_eq!(fields(2)["module"], "registry.terraform.io/hashicorp/aws");
        assert_eq!(fields(3)["method"], "PURGE");
        assert_eq!(fields(3)["route"], "rejected");
    }

    /// Whatever text reaches a line (module coordinates are validated today, but an error
    /// text or a future field need not be), it stays one line of valid JSON with the text
    /// intact: quotes, backslashes and control characters are escaped.
    #[test]
    fn hostile_text_cannot_break_the_line() {
        let nasty = "a\"b\\c\nd\re\tf\u{1}g\u{7f}h\u{2028}é\"}{\"status\":1";
        let route = Route::Module(crate::routes::ModuleRoute {
            module: crate::routes::ModuleId::new(nasty, "n", "s"),
            op: crate::routes::ModuleOp::Versions,
        });
        let e = Entry {
            error: Some(nasty),
            ..entry(&Method::GET, Some(&route))
        };
        let got = direct_lines(&[e], INFO);
        assert_eq!(got.len(), 1, "{got:?}");
        let line: serde_json::Value = serde_json::from_str(&got[0]).unwrap();
        assert_eq!(line["fields"]["module"], format!("{nasty}/n/s"));
        assert_eq!(line["fields"]["error"], nasty);
        assert_eq!(line["fields"]["status"], 200);
    }

    /// The filter decides as for any `info` event of target `tfmirror::access`: one line per
    /// request at `info` and more verbose, none at `warn` or `error`, none when the target is
    /// silenced alone.
    #[test]
    fn the_log_filter_decides_whether_the_line_is_written() {
        let e = entry(&Method::GET, None);
        for (filter, written) in [
            ("error,tfmirror=error", false),
            ("warn,tfmirror=warn", false),
            (INFO, true),
            ("info,tfmirror=debug", true),
            ("info,tfmirror=trace", true),
            ("info,tfmirror=info,tfmirror::access=warn", false),
            ("warn,tfmirror::access=info", true),
        ] {
            let (direct, traced) = both_ways(std::slice::from_ref(&e), filter);
            assert_eq!(direct.len(), usize::from(written), "{filter}");
            assert_eq!(traced.len(), direct.len(), "{filter}");
        }
    }

    #[test]
    fn access_lines_carry_templates_module_and_version_only() {
        let path = "/api/v4/packages/terraform/modules/v1/infra/vpc/aws/1.2.0/file";
        let route = crate::routes::parse(&Method::GET, path).unwrap();
        let other = crate::routes::parse(&Method::GET, "/api/v4/projects/7/secret").unwrap();
        let entry = |route, status, cache| Entry {
            method: &Method::GET,
            route,
            status,
            upstream_status: None,
            cache,
            identity: Some(Identity([0xab; 16])),
            bytes: 10,
            elapsed: Duration::from_millis(3),
            at: std::time::Instant::now(),
            error: None,
        };
        let before = metrics::REQUESTS
            .with_label_values(&["module", "module_file", "GET", "200", "HIT"])
            .get();
        let got = lines(&[
            entry(Some(&route), 200, Some(CacheStatus::Hit)),
            entry(Some(&route), 200, Some(CacheStatus::Hit)),
            entry(Some(&other), 502, None),
            entry(None, 400, None),
        ]);
        assert_eq!(
            metrics::REQUESTS
                .with_label_values(&["module", "module_file", "GET", "200", "HIT"])
                .get()
                - before,
            2,
            "the cached handle counts into the exported family"
        );
        let expected = serde_json::json!({
            "method": "GET", "route": "module_file", "module": "infra/vpc/aws",
            "version": "1.2.0", "status": 200, "cache": "HIT", "identity": "abababab",
            "bytes": 10, "duration_ms": 3.0
        });
        assert_eq!(got[0], expected);
        assert_eq!(got[2]["route"], "passthrough");
        assert!(got[2].get("module").is_none() && got[2].get("version").is_none());
        assert_eq!(got[3]["route"], "rejected");
        assert!(!got.iter().any(|l| l.to_string().contains("secret")));
    }
}
