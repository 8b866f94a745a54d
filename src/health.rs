//! Is the upstream reachable? A circuit breaker with a background probe.
//!
//! Consecutive connect errors or timeouts (`offline.breaker_threshold`) mark the upstream
//! down. While it is down, registry calls do not wait on it: stale answers are served at once.
//! A single probe task retries with exponential backoff and closes the breaker on the first
//! answer of any kind. While it is open, one request at a time that has nothing stale to fall
//! back on may go through as a probe ([`Health::claim_probe`]), so a new identity is served as
//! soon as GitLab answers again. A 503 with `Retry-After` (GitLab down for everyone) holds
//! requests back for that long. A 429 does not: it is GitLab's answer to one caller, held
//! back per caller by `access::grants` (anyone can provoke a 429, even for all anonymous
//! traffic, which leaves from tfmirror's one address). In offline mode the upstream is always
//! unavailable and never probed.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{header, HeaderMap};

use crate::fetch::Fetcher;

const PROBE_FIRST: Duration = Duration::from_millis(200);
/// At most this long between probes of a down GitLab: recovery is seen within it (plus
/// the probe's own timeout); one request per 5 s costs a down GitLab nothing.
const PROBE_MAX: Duration = Duration::from_secs(5);
/// Longest `Retry-After` honoured: a bogus value must not silence the upstream for a day.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

pub struct Health {
    offline: bool,
    threshold: u32,
    failures: AtomicU32,
    down: AtomicBool,
    probing: AtomicBool,
    /// A request is probing the open breaker (see `claim_probe`).
    request_probe: Arc<AtomicBool>,
    hold_until: Mutex<Option<Instant>>,
}

/// The right to probe an open breaker with a real request; released when dropped.
pub struct Probe(Arc<AtomicBool>);

impl Drop for Probe {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl Health {
    pub fn new(offline: bool, threshold: u32) -> Health {
        Health {
            offline,
            threshold,
            failures: AtomicU32::new(0),
            down: AtomicBool::new(offline),
            probing: AtomicBool::new(false),
            request_probe: Arc::new(AtomicBool::new(false)),
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

    /// An upstream-wide `Retry-After` (a 503) runs: nobody asks GitLab, not even a probe.
    pub fn held(&self) -> bool {
        let hold = self.hold_until.lock().expect("health lock");
        hold.is_some_and(|until| Instant::now() < until)
    }

    pub fn is_up(&self) -> bool {
        !self.offline && !self.down.load(Ordering::Acquire)
    }

    /// While the upstream is unavailable (not in offline mode): let this request through as the
    /// probe, unless another request already is one.
    pub fn claim_probe(&self) -> Option<Probe> {
        if self.offline || self.request_probe.swap(true, Ordering::AcqRel) {
            return None;
        }
        Some(Probe(self.request_probe.clone()))
    }

    /// The upstream answered (any HTTP status).
    pub fn record_answer(&self, status: http::StatusCode, headers: &HeaderMap) {
        self.failures.store(0, Ordering::Release);
        if self.down.swap(false, Ordering::AcqRel) {
            tracing::info!("upstream is back");
        }
        if status == http::StatusCode::SERVICE_UNAVAILABLE {
            if let Some(wait) = retry_after(headers) {
                *self.hold_until.lock().expect("health lock") = Some(Instant::now() + wait);
            }
        }
    }

    /// A connect error or a timeout. Enough of them in a row open the breaker and start the
    /// probe.
    pub fn record_failure(self: &Arc<Self>, upstream: &Arc<dyn Fetcher>) {
        let n = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if n >= self.threshold && !self.down.swap(true, Ordering::AcqRel) {
            tracing::warn!(failures = n, "upstream marked down; serving from the cache");
            self.start_probe(upstream.clone());
        }
    }

    fn start_probe(self: &Arc<Self>, upstream: Arc<dyn Fetcher>) {
        if self.offline || self.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let mut wait = PROBE_FIRST;
            loop {
                tokio::time::sleep(wait).await;
                if let Some((status, headers)) = upstream.probe().await {
                    me.record_answer(status, &headers);
                    break;
                }
                wait = (wait * 2).min(PROBE_MAX);
            }
            me.probing.store(false, Ordering::Release);
        });
    }
}

/// `Retry-After` in seconds (the HTTP-date form is rare from GitLab and ignored), capped at
/// `MAX_RETRY_AFTER` (300 s).
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
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
    fn an_upstream_wide_503_holds_requests_back_but_a_callers_429_does_not() {
        let h = Health::new(false, 3);
        assert!(!h.unavailable());
        let mut headers = HeaderMap::new();
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static("30"));
        h.record_answer(StatusCode::TOO_MANY_REQUESTS, &headers);
        assert!(
            !h.unavailable(),
            "one caller's 429 must not hold back everyone"
        );
        h.record_answer(StatusCode::SERVICE_UNAVAILABLE, &headers);
        assert!(h.unavailable());
        assert!(h.is_up(), "a hold is not an outage");
    }

    #[test]
    fn one_request_at_a_time_probes() {
        let h = Health::new(false, 3);
        let p = h.claim_probe().expect("first probe");
        assert!(h.claim_probe().is_none());
        drop(p);
        assert!(h.claim_probe().is_some());
        assert!(
            Health::new(true, 3).claim_probe().is_none(),
            "offline never probes"
        );
    }

    #[test]
    fn offline_mode_is_always_unavailable() {
        let h = Health::new(true, 3);
        assert!(h.unavailable());
        assert!(!h.is_up());
    }
}
