//! What an upstream's answer says about the upstream as a whole, and the circuit breaker
//! that counts it. GitLab ([`crate::upstream::health`]) and every provider registry
//! (`providers::upstream`) read the same rule here and count it with the same [`Breaker`],
//! so one situation means one thing on both sides (the one difference, GitLab's 5xx, is
//! written out in `health::breaker_verdict`).
//!
//! The rule that differs between kinds of upstream is one explicit parameter,
//! [`RateLimits`]: whether a 429 is the upstream's trouble or the caller's own. By default
//! it is the caller's own, everywhere: anyone can provoke a 429 (for GitLab, even for all
//! anonymous traffic, which leaves from tfmirror's one address), and an outage opens the
//! cache to stale answers; no caller may be able to open it. A 429 is relayed to its caller
//! with its `Retry-After`.

use std::time::{Duration, Instant};

use http::StatusCode;

/// Whether a 429 counts as an outage of the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RateLimits {
    /// A 429 is an answer to one caller: it neither opens nor closes the breaker.
    #[default]
    PerCaller,
    /// A 429 is the upstream failing (an upstream that throttles everyone alike).
    Outage,
}

/// What came back from one upstream call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// An HTTP answer with this status.
    Answer(StatusCode),
    /// No answer: unreachable, reset, timed out.
    Nothing,
}

/// What an answer says of the upstream's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// It works (any answer that is not a failure of the upstream itself).
    Up,
    /// It fails: counts toward opening the breaker, and allows stale answers.
    Outage,
    /// It says nothing of the upstream as a whole (a per-caller 429).
    Neutral,
}

impl RateLimits {
    /// The one rule: no answer or a 5xx is an outage; a 429 is what this parameter says;
    /// any other answer shows the upstream up.
    pub fn verdict(self, seen: Seen) -> Verdict {
        match seen {
            Seen::Nothing => Verdict::Outage,
            Seen::Answer(StatusCode::TOO_MANY_REQUESTS) => match self {
                RateLimits::PerCaller => Verdict::Neutral,
                RateLimits::Outage => Verdict::Outage,
            },
            Seen::Answer(s) if s.is_server_error() => Verdict::Outage,
            Seen::Answer(_) => Verdict::Up,
        }
    }
}

/// First wait of an open breaker; it doubles on each failure while open, up to
/// [`OPEN_MAX`]. GitLab's probe (`crate::upstream::health`) is timed by it too: a failing
/// upstream is tried again soon, a long-dead one every few seconds.
pub const OPEN_FIRST: Duration = Duration::from_millis(200);
/// Longest wait of an open breaker before the upstream is tried again.
pub const OPEN_MAX: Duration = Duration::from_secs(5);

/// Consecutive outages open it: while open, callers do not wait on the upstream (stale
/// answers are served at once). The first call after the wait is the probe; an answer that
/// shows the upstream up closes it, another outage opens it for twice as long.
#[derive(Debug, Default, Clone)]
pub struct Breaker {
    failures: u32,
    open_until: Option<Instant>,
    wait: Duration,
}

impl Breaker {
    /// Has it opened (the threshold was reached), whether or not its wait is over?
    pub fn is_open(&self) -> bool {
        self.open_until.is_some()
    }

    /// When the open breaker's wait ends and the upstream may be tried again.
    pub fn retry_at(&self) -> Option<Instant> {
        self.open_until
    }

    /// Outages in a row so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// May calls go to the upstream at `now`?
    pub fn available(&self, now: Instant) -> bool {
        self.open_until.is_none_or(|t| now >= t)
    }

    /// Count an answer: `threshold` consecutive outages open the breaker.
    pub fn record(&mut self, verdict: Verdict, threshold: u32, now: Instant) {
        match verdict {
            Verdict::Neutral => {}
            Verdict::Up => *self = Breaker::default(),
            Verdict::Outage => {
                self.failures = self.failures.saturating_add(1);
                if self.failures >= threshold.max(1) {
                    self.wait = if self.wait.is_zero() {
                        OPEN_FIRST
                    } else {
                        (self.wait * 2).min(OPEN_MAX)
                    };
                    self.open_until = Some(now + self.wait);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_an_answer_says_of_the_upstream() {
        use RateLimits::PerCaller;
        use Verdict::{Neutral, Outage, Up};
        let s = |c: u16| Seen::Answer(StatusCode::from_u16(c).unwrap());
        #[rustfmt::skip]
        let rows = [
            (PerCaller, Seen::Nothing, Outage),
            (PerCaller, s(500),        Outage),
            (PerCaller, s(503),        Outage),
            (PerCaller, s(429),        Neutral),
            (RateLimits::Outage, s(429), Outage),
            (PerCaller, s(200),        Up),
            (PerCaller, s(404),        Up),
            (PerCaller, s(403),        Up),
            (PerCaller, s(302),        Up),
        ];
        for (rule, seen, want) in rows {
            assert_eq!(rule.verdict(seen), want, "{rule:?} {seen:?}");
        }
        assert_eq!(RateLimits::default(), PerCaller);
    }

    #[test]
    fn consecutive_outages_open_it_with_a_growing_wait_and_an_answer_closes_it() {
        let t0 = Instant::now();
        let mut b = Breaker::default();
        b.record(Verdict::Outage, 2, t0);
        assert!(b.available(t0), "one failure is not an outage yet");
        b.record(Verdict::Neutral, 2, t0);
        b.record(Verdict::Outage, 2, t0);
        assert!(!b.available(t0));
        assert!(b.available(t0 + OPEN_FIRST));
        b.record(Verdict::Outage, 2, t0 + OPEN_FIRST);
        assert!(!b.available(t0 + OPEN_FIRST * 2), "the wait doubled");
        assert!(b.available(t0 + OPEN_FIRST * 3));
        for _ in 0..20 {
            b.record(Verdict::Outage, 2, t0);
        }
        assert!(b.available(t0 + OPEN_MAX), "never longer than OPEN_MAX");
        b.record(Verdict::Up, 2, t0);
        assert!(b.available(t0));
        b.record(Verdict::Outage, 2, t0);
        assert!(b.available(t0), "closed: the count starts again");
    }
}
