//! Is the upstream reachable? A circuit breaker with a background probe.
//!
//! The breaker is [`crate::upstream::breaker::Breaker`], the type every provider registry's
//! breaker is, with its threshold and its backoff (200 ms doubling to 5 s). What differs is
//! written in [`breaker_verdict`]: for GitLab the breaker counts only what keeps callers
//! waiting (no answer), and here a background probe, not the next request, tries again.
//!
//! Consecutive connect errors or timeouts (`offline.breaker_threshold`) mark the upstream
//! down. While it is down, registry calls do not wait on it: stale answers are served at once.
//! A single probe task retries with exponential backoff and closes the breaker on the first
//! HTTP answer that says something about GitLab as a whole. It waits for that answer as long
//! as a registry call does (`offline.deadline`): a GitLab that answers in 3 s is up, and the
//! callers whose grants expired must be asked again (one of them may have been removed
//! meanwhile); a shorter probe would leave them on stale answers for as long as GitLab stays
//! slower than it. A 429 is an answer to one caller (here, tfmirror's own address): it says
//! nothing of GitLab's health, so it neither closes the breaker nor counts as a failure. While it is open, one request at a time that has nothing stale to fall
//! back on may go through as a probe ([`Health::claim_probe`]), so a new identity is served as
//! soon as GitLab answers again. A 503 with `Retry-After` (GitLab down for everyone) holds
//! requests back for that long. A 429 does not: it is GitLab's answer to one caller, held
//! back per caller by `access::grants` (anyone can provoke a 429, even for all anonymous
//! traffic, which leaves from tfmirror's one address). In offline mode the upstream is always
//! unavailable and never probed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{header, HeaderMap};

use crate::upstream::breaker::{Breaker, RateLimits, Seen, Verdict};
use crate::upstream::gitlab::Fetcher;

/// Longest `Retry-After` honoured: a bogus value must not silence the upstream for a day.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

pub struct Health {
    offline: bool,
    threshold: u32,
    /// How long the background probe waits for an answer (`offline.deadline`).
    probe_wait: Duration,
    /// Counts consecutive failures and times the probes (its open wait is the backoff).
    breaker: Mutex<Breaker>,
    /// Whether the breaker is open, read without its lock by every request.
    down: AtomicBool,
    probing: AtomicBool,
    /// A request is probing the open breaker (see `claim_probe`).
    request_probe: Arc<AtomicBool>,
    hold_until: Mutex<Option<Instant>>,
    /// GitLab's stated budget (`RateLimit-Remaining`) over the last minute.
    budget: Mutex<Option<Budget>>,
}

/// The right to probe an open breaker with a real request; released when dropped.
pub struct Probe(Arc<AtomicBool>);

impl Drop for Probe {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl Health {
    pub fn new(offline: bool, threshold: u32, probe_wait: Duration) -> Health {
        Health {
            offline,
            threshold,
            probe_wait,
            breaker: Mutex::new(Breaker::default()),
            down: AtomicBool::new(offline),
            probing: AtomicBool::new(false),
            request_probe: Arc::new(AtomicBool::new(false)),
            hold_until: Mutex::new(None),
            budget: Mutex::new(None),
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

    /// The upstream answered. Any status but a per-caller one (429) shows it is up.
    pub fn record_answer(&self, status: http::StatusCode, headers: &HeaderMap) {
        self.note_budget(headers);
        let verdict = breaker_verdict(Seen::Answer(status));
        if verdict == Verdict::Neutral {
            return;
        }
        self.breaker
            .lock()
            .expect("breaker lock")
            .record(verdict, self.threshold, Instant::now());
        if self.down.swap(false, Ordering::AcqRel) {
            tracing::info!("upstream is back");
        }
        if status == http::StatusCode::SERVICE_UNAVAILABLE {
            if let Some(wait) = retry_after(headers) {
                *self.hold_until.lock().expect("health lock") = Some(Instant::now() + wait);
            }
        }
    }

    /// GitLab's `RateLimit-*` headers on an answer (any status: a 429 says 0): the lowest
    /// remaining count of the last minute goes to the metrics, with its reset time.
    fn note_budget(&self, headers: &HeaderMap) {
        let remaining = header_u64(headers, "ratelimit-remaining");
        if remaining.is_none() {
            return;
        }
        let reset_at = header_u64(headers, "ratelimit-reset").or_else(|| {
            let text = headers.get("ratelimit-resettime")?.to_str().ok()?;
            let at = httpdate::parse_http_date(text).ok()?;
            Some(at.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs())
        });
        let now = crate::clock::now();
        let mut budget = self.budget.lock().expect("budget lock");
        let next = fold_budget(*budget, now, remaining, reset_at);
        if next != *budget {
            if let Some(b) = next {
                crate::metrics::RATELIMIT_REMAINING
                    .set(i64::try_from(b.remaining).unwrap_or(i64::MAX));
                crate::metrics::RATELIMIT_RESET
                    .set(b.reset_at.and_then(|r| i64::try_from(r).ok()).unwrap_or(-1));
            }
            *budget = next;
        }
    }

    /// A connect error or a timeout. Enough of them in a row open the breaker and start the
    /// probe.
    pub fn record_failure(self: &Arc<Self>, upstream: &Arc<dyn Fetcher>) {
        let (open, failures) = self.count_failure();
        if open && !self.down.swap(true, Ordering::AcqRel) {
            tracing::warn!(failures, "upstream marked down; serving from the cache");
            self.start_probe(upstream.clone());
        }
    }

    /// Count one failure (a call or a probe with no answer): is the breaker open now, and
    /// after how many failures in a row?
    fn count_failure(&self) -> (bool, u32) {
        let mut b = self.breaker.lock().expect("breaker lock");
        b.record(
            breaker_verdict(Seen::Nothing),
            self.threshold,
            Instant::now(),
        );
        (b.is_open(), b.failures())
    }

    /// How long until the breaker's wait is over and the probe may go (zero if it is).
    fn probe_in(&self) -> Duration {
        let b = self.breaker.lock().expect("breaker lock");
        b.retry_at().map_or(Duration::ZERO, |at| {
            at.saturating_duration_since(Instant::now())
        })
    }

    fn start_probe(self: &Arc<Self>, upstream: Arc<dyn Fetcher>) {
        if self.offline || self.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.clone();
        // The breaker's backoff times the probes: its first wait, doubled on each probe
        // that gets no answer about GitLab (a 429 is none), up to its longest.
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(me.probe_in()).await;
                match upstream.probe(me.probe_wait).await {
                    Some((status, _)) if per_caller(status) => {}
                    Some((status, headers)) => {
                        me.record_answer(status, &headers);
                        break;
                    }
                    None => {}
                }
                me.count_failure();
            }
            me.probing.store(false, Ordering::Release);
        });
    }
}

/// An answer GitLab gives one caller, not all: a rate limit. It proves GitLab's Rails runs,
/// but what it says about access or health concerns that caller alone.
/// How long the lowest `RateLimit-Remaining` stands before a higher one replaces it.
const BUDGET_WINDOW: u64 = 60;

/// The lowest `RateLimit-Remaining` GitLab sent within a window, and when that budget resets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// When the window started (unix seconds).
    pub since: u64,
    pub remaining: u64,
    /// `RateLimit-Reset` (unix seconds) of the answer that said `remaining`.
    pub reset_at: Option<u64>,
}

/// Fold one answer's budget into the window's: the minimum over the last [`BUDGET_WINDOW`]
/// seconds, so that a dashboard sees the caller closest to GitLab's throttle, not the last
/// one to ask. An answer without the header changes nothing.
pub fn fold_budget(
    prev: Option<Budget>,
    now: u64,
    remaining: Option<u64>,
    reset_at: Option<u64>,
) -> Option<Budget> {
    let Some(remaining) = remaining else {
        return prev;
    };
    let fresh = Budget {
        since: now,
        remaining,
        reset_at,
    };
    match prev {
        Some(p) if now.saturating_sub(p.since) < BUDGET_WINDOW => {
            if remaining < p.remaining {
                Some(Budget {
                    since: p.since,
                    ..fresh
                })
            } else {
                Some(p)
            }
        }
        _ => Some(fresh),
    }
}

fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

/// What GitLab's answer (or its absence) counts for in its breaker. The rule of
/// [`RateLimits::verdict`] (a 429 is its caller's), with one difference, and why: a 5xx is
/// an answer here. GitLab's Rails answered at once, so nobody waits on it; the request that
/// got it falls back to a stale answer by itself (`registry`'s `Failure::Status`), and the
/// breaker stays closed so the next request sees GitLab's recovery without a probe. A
/// provider registry's 5xx opens its breaker instead: nothing else stops tfmirror from
/// asking a failing registry on every request.
pub fn breaker_verdict(seen: Seen) -> Verdict {
    match RateLimits::PerCaller.verdict(seen) {
        Verdict::Outage if matches!(seen, Seen::Answer(_)) => Verdict::Up,
        v => v,
    }
}

fn per_caller(status: http::StatusCode) -> bool {
    breaker_verdict(Seen::Answer(status)) == Verdict::Neutral
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
    use std::sync::atomic::AtomicU32;

    #[test]
    fn the_budget_is_the_lowest_remaining_of_the_last_minute() {
        let b = |since, remaining, reset_at| {
            Some(Budget {
                since,
                remaining,
                reset_at,
            })
        };
        let table = [
            // (before, now, remaining, reset, after)
            (None, 100, None, None, None),
            (None, 100, Some(500), Some(160), b(100, 500, Some(160))),
            (
                b(100, 500, Some(160)),
                110,
                None,
                None,
                b(100, 500, Some(160)),
            ),
            (
                b(100, 500, Some(160)),
                110,
                Some(20),
                Some(160),
                b(100, 20, Some(160)),
            ),
            // A caller with more left does not hide the one closest to the throttle...
            (
                b(100, 20, Some(160)),
                130,
                Some(900),
                Some(160),
                b(100, 20, Some(160)),
            ),
            // ... for a minute: then the window starts again.
            (
                b(100, 20, Some(160)),
                160,
                Some(900),
                Some(220),
                b(160, 900, Some(220)),
            ),
            (b(100, 20, None), 120, Some(0), None, b(100, 0, None)),
        ];
        for (before, now, remaining, reset, after) in table {
            assert_eq!(
                fold_budget(before, now, remaining, reset),
                after,
                "{before:?} {now}"
            );
        }
    }

    #[test]
    fn an_upstream_wide_503_holds_requests_back_but_a_callers_429_does_not() {
        let h = Health::new(false, 3, Duration::from_secs(7));
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
        let h = Health::new(false, 3, Duration::from_secs(7));
        let p = h.claim_probe().expect("first probe");
        assert!(h.claim_probe().is_none());
        drop(p);
        assert!(h.claim_probe().is_some());
        assert!(
            Health::new(true, 3, Duration::from_secs(7))
                .claim_probe()
                .is_none(),
            "offline never probes"
        );
    }

    /// A GitLab whose only answer to the probe takes `after`, with `status`.
    struct SlowGitlab {
        after: Duration,
        status: StatusCode,
        probes: AtomicU32,
    }

    #[async_trait::async_trait]
    impl Fetcher for SlowGitlab {
        async fn registry(
            &self,
            _: &str,
            _: Option<&HeaderValue>,
        ) -> pingora::Result<crate::upstream::gitlab::Small> {
            pingora::Error::e_explain(pingora::ErrorType::ConnectRefused, "not scripted")
        }

        async fn open(
            &self,
            _: &str,
            _: Option<&HeaderValue>,
        ) -> pingora::Result<reqwest::Response> {
            pingora::Error::e_explain(pingora::ErrorType::ConnectRefused, "not scripted")
        }

        async fn probe(&self, wait: Duration) -> Option<(StatusCode, HeaderMap)> {
            self.probes.fetch_add(1, Ordering::SeqCst);
            tokio::time::timeout(wait, tokio::time::sleep(self.after))
                .await
                .ok()
                .map(|()| (self.status, HeaderMap::new()))
        }
    }

    async fn open_breaker_against(gitlab: SlowGitlab) -> (Arc<Health>, Arc<SlowGitlab>) {
        let h = Arc::new(Health::new(false, 1, Duration::from_secs(7)));
        let gitlab = Arc::new(gitlab);
        let fetcher: Arc<dyn Fetcher> = gitlab.clone();
        h.record_failure(&fetcher);
        assert!(!h.is_up());
        (h, gitlab)
    }

    /// Issue 26, item 2: after an outage, a GitLab answering in 3 s (under the 7 s deadline)
    /// closes the breaker; the old probe gave up after 2 s and never closed it.
    #[tokio::test(start_paused = true)]
    async fn a_gitlab_slower_than_2s_but_within_the_deadline_closes_the_breaker() {
        let (h, gitlab) = open_breaker_against(SlowGitlab {
            after: Duration::from_secs(3),
            status: StatusCode::OK,
            probes: AtomicU32::new(0),
        })
        .await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(h.is_up(), "the first probe's 3 s answer closed the breaker");
        assert_eq!(gitlab.probes.load(Ordering::SeqCst), 1);
    }

    /// A probe answered with a 429 (tfmirror's own address rate-limited) keeps probing: the
    /// breaker stays open until an answer about GitLab itself.
    #[tokio::test(start_paused = true)]
    async fn a_429_to_the_probe_does_not_close_the_breaker() {
        let (h, gitlab) = open_breaker_against(SlowGitlab {
            after: Duration::from_millis(10),
            status: StatusCode::TOO_MANY_REQUESTS,
            probes: AtomicU32::new(0),
        })
        .await;
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(!h.is_up());
        assert!(
            gitlab.probes.load(Ordering::SeqCst) >= 3,
            "it keeps probing"
        );
        // Nor does a request's 429.
        h.record_answer(StatusCode::TOO_MANY_REQUESTS, &HeaderMap::new());
        assert!(!h.is_up());
        h.record_answer(StatusCode::INTERNAL_SERVER_ERROR, &HeaderMap::new());
        assert!(h.is_up(), "a 500 is GitLab's answer to everyone: it is up");
    }

    /// Past the deadline the probe gives up and tries again later.
    #[tokio::test(start_paused = true)]
    async fn a_probe_past_the_deadline_is_no_answer() {
        let (h, gitlab) = open_breaker_against(SlowGitlab {
            after: Duration::from_secs(8),
            status: StatusCode::OK,
            probes: AtomicU32::new(0),
        })
        .await;
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert!(!h.is_up());
        assert!(gitlab.probes.load(Ordering::SeqCst) >= 2);
    }

    #[test]
    fn offline_mode_is_always_unavailable() {
        let h = Health::new(true, 3, Duration::from_secs(7));
        assert!(h.unavailable());
        assert!(!h.is_up());
    }
}
