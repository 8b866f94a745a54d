//! The wall clock, read in one place: unix seconds.
//!
//! Decisions take the time as a parameter (`now: u64`), so they can be table-tested; only the
//! code that performs I/O calls [`now`]. `.clippy.toml` forbids `SystemTime::now` (and
//! `SystemTime::elapsed`, which reads it) everywhere else. Monotonic `Instant`s, for
//! timeouts and durations, are not the wall clock and stay allowed.

use std::time::{SystemTime, UNIX_EPOCH};

/// Unix seconds now (0 if the system clock is set before 1970).
#[allow(clippy::disallowed_methods)] // the one wall-clock read (see the module docs)
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
