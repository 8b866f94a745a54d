//! The latest instant until which some entry of a short-lived memory cache can still answer.
//!
//! The caches of refusals (`negative`) and of callers held back by their own 429 (`held`)
//! are asked on every request, and nearly always miss: a moka lookup (hash, concurrent map,
//! a read record sent to its housekeeping channel) plus a key allocation each time. Once the
//! horizon has passed, every entry has expired, so the lookup is skipped: it could only
//! miss. Entries are still inserted, read and invalidated through moka as before.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;
use std::time::{Duration, Instant};

/// Every horizon counts from here (an `Instant` cannot live in an atomic).
static BASE: LazyLock<Instant> = LazyLock::new(Instant::now);

/// Slack over each entry's end: moka reads its own clock at insert, a little after ours.
const SLACK: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
pub struct Horizon {
    /// Nanoseconds after [`BASE`]; 0 while nothing was ever inserted.
    until: AtomicU64,
}

impl Horizon {
    /// An entry is about to be inserted that answers until `until` at most: call before the
    /// insert, so that a lookup seeing the entry also sees the horizon.
    pub fn extend_to(&self, until: Instant) {
        let nanos = nanos_since_base(until + SLACK).max(1);
        self.until.fetch_max(nanos, Ordering::AcqRel);
    }

    /// True once every entry inserted so far has expired: a lookup at `now` can only miss.
    pub fn passed(&self, now: Instant) -> bool {
        match self.until.load(Ordering::Acquire) {
            0 => true,
            until => nanos_since_base(now) > until,
        }
    }
}

fn nanos_since_base(t: Instant) -> u64 {
    u64::try_from(t.saturating_duration_since(*BASE).as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passed_only_after_the_latest_end_and_its_slack() {
        let h = Horizon::default();
        let now = Instant::now();
        assert!(h.passed(now), "nothing inserted: nothing to find");
        h.extend_to(now + Duration::from_secs(10));
        // A shorter entry after a longer one does not bring the horizon back.
        h.extend_to(now + Duration::from_secs(2));
        assert!(!h.passed(now));
        assert!(!h.passed(now + Duration::from_secs(10)));
        assert!(!h.passed(now + Duration::from_secs(10) + SLACK));
        assert!(h.passed(now + Duration::from_secs(12)));
    }
}
