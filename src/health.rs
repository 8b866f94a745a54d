//! Is the upstream reachable? A circuit breaker with a background probe.
//!
//! Consecutive connect errors or timeouts (`offline.breaker_threshold`) mark the upstream
//! down. While it is down, registry calls do not wait on it: stale answers are served at once.
//! A single probe task retries with exponential backoff and closes the breaker on the first
//! answer of any kind. A 429 with `Retry-After` (or a 503 with one) holds requests back for
//! that long. In offline mode the upstream is always unavailable and never probed.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{header, HeaderMap};

use crate::upstream::Upstream;

const PROBE_FIRST: Duration = Duration::from_millis(200);
const PROBE_MAX: Duration = Duration::from_secs(10);
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest `Retry-After` honoured: a bogus value must not silence the upstream for a day.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

pub struct Health {
    offline: bool,
    threshold: u32,
    failures: AtomicU32,
    down: AtomicBool,
    probing: AtomicBool,
    hold_until: Mutex<Option<Instant>>,
}

impl Health {
    pub fn new(offline: bool, threshold: u32) -> Health {
        Health {
            offline,
            threshold,
            failures: AtomicU32::new(0),
            down: AtomicBool::new(offline),
            probing: AtomicBool::new(false),
            hold_until: Mutex::new(None),
        }
    }

    pub fn is_offline_mode(&self) -> bool {
        self.offline
    }

    /// True when registry calls should not go upstream now.
    pub fn unavailable(&self) -> bool {
        if self.offline || self.down.load(Ordering::Acquire) {
            return true;
        }
        let mut hold = self.hold_until.lock().expect("health lock");
        match *hold {
            Some(until) if Instant::now() < until => true,
            Some(_) => {
                *hold = None;
                false
            }
            None => false,
        }
    }

    pub fn is_up(&self) -> bool {
        !self.offline && !self.down.load(Ordering::Acquire)
    }

    /// The upstream answered (any HTTP status).
    pub fn record_answer(&self, status: http::StatusCode, headers: &HeaderMap) {
        self.failures.store(0, Ordering::Release);
        if self.down.swap(false, Ordering::AcqRel) {
            tracing::info!("upstream is back");
        }
        if status == http::StatusCode::TOO_MANY_REQUESTS
            || status == http::StatusCode::SERVICE_UNAVAILABLE
        {
            if let Some(wait) = retry_after(headers) {
                *self.hold_until.lock().expect("health lock") = Some(Instant::now() + wait);
            }
        }
    }

    /// A connect error or a timeout. Enough of them in a row open the breaker and start the
    /// probe.
    pub fn record_failure(self: &Arc<Self>, upstream: &Arc<Upstream>) {
        let n = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if n >= self.threshold && !self.down.swap(true, Ordering::AcqRel) {
            tracing::warn!(failures = n, "upstream marked down; serving from the cache");
            self.start_probe(upstream.clone());
        }
    }

    fn start_probe(self: &Arc<Self>, upstream: Arc<Upstream>) {
        if self.offline || self.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let mut wait = PROBE_FIRST;
            loop {
                tokio::time::sleep(wait).await;
                let probe = upstream
                    .http
                    .get(upstream.url_for("/"))
                    .timeout(PROBE_TIMEOUT)
                    .send()
                    .await;
                if let Ok(resp) = probe {
                    me.record_answer(resp.status(), resp.headers());
                    break;
                }
                wait = (wait * 2).min(PROBE_MAX);
            }
            me.probing.store(false, Ordering::Release);
        });
    }
}

/// `Retry-After` in seconds (the HTTP-date form is rare from GitLab and ignored).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let secs: u64 = headers
        .get(header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderValue, StatusCode};

    #[test]
    fn retry_after_holds_requests_back() {
        let h = Health::new(false, 3);
        assert!(!h.unavailable());
        let mut headers = HeaderMap::new();
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static("30"));
        h.record_answer(StatusCode::TOO_MANY_REQUESTS, &headers);
        assert!(h.unavailable());
        assert!(h.is_up(), "a rate limit is not an outage");
    }

    #[test]
    fn offline_mode_is_always_unavailable() {
        let h = Health::new(true, 3);
        assert!(h.unavailable());
        assert!(!h.is_up());
    }
}
