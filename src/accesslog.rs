//! The per-request record: the access log line and the request metrics, written once per
//! request from pingora's `logging` hook. No paths, queries or credentials: route templates,
//! the module and version of registry routes, and an identity's short hash.

use std::cell::RefCell;
use std::collections::HashMap;
use std::time::Duration;

use http::Method;
use prometheus::{Histogram, IntCounter};

use crate::identity::Identity;
use crate::metrics;
use crate::respond::CacheStatus;
use crate::routes::Route;

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
    pub error: Option<&'a str>,
}

/// The metric children of one label set.
#[derive(Clone)]
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
    static HANDLES: RefCell<HashMap<LabelKey, Handles>> = RefCell::new(HashMap::new());
}

fn handles(
    kind: &'static str,
    route: &'static str,
    method: &'static str,
    status: &'static str,
    cache: &'static str,
) -> Handles {
    let key = [kind, route, method, status, cache].map(|s| s.as_ptr() as usize);
    HANDLES.with(|h| {
        h.borrow_mut()
            .entry(key)
            .or_insert_with(|| Handles {
                requests: metrics::REQUESTS
                    .with_label_values(&[kind, route, method, status, cache]),
                duration: metrics::REQUEST_DURATION.with_label_values(&[route, cache]),
                bytes: metrics::BYTES_SERVED.with_label_values(&[kind, cache]),
            })
            .clone()
    })
}

/// Count the request and write its access line (`info`, target `tfmirror::access`).
pub fn record(e: &Entry<'_>) {
    let route = e.route.map_or("rejected", Route::template);
    let cache = e.cache.map_or("NONE", CacheStatus::as_str);
    let kind = e.route.map_or("other", Route::kind);
    let h = handles(
        kind,
        route,
        method_label(e.method),
        status_label(e.status),
        cache,
    );
    h.requests.inc();
    h.duration.observe(e.elapsed.as_secs_f64());
    h.bytes.inc_by(e.bytes as u64);
    // A module's or a provider's coordinates (both plain path parts, validated).
    let module: Option<&dyn std::fmt::Display> = match e.route {
        Some(Route::Module(m)) => Some(&m.module),
        Some(Route::Provider(p)) => Some(&p.provider),
        _ => None,
    };
    let version = match e.route {
        Some(Route::Module(m)) => m.version(),
        Some(Route::Provider(p)) => p.version(),
        _ => None,
    };
    tracing::info!(
        target: "tfmirror::access",
        method = %e.method,
        route,
        module = module.map(tracing::field::display),
        version = version.map(tracing::field::display),
        status = e.status,
        upstream_status = e.upstream_status,
        cache = e.cache.map(CacheStatus::as_str),
        identity = e.identity.map(Identity::short),
        bytes = e.bytes,
        duration_ms = e.elapsed.as_secs_f64() * 1000.0,
        error = e.error,
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

    /// The fields of the access lines `entries` produce, as tfmirror formats them.
    fn lines(entries: &[Entry<'_>]) -> Vec<serde_json::Value> {
        let sink = Sink::default();
        let buffer = crate::logbuf::LogBuffer::new(sink.clone(), 1 << 20);
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_current_span(false)
            .with_writer(buffer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || entries.iter().for_each(record));
        buffer.flush();
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["fields"].clone())
            .collect()
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
