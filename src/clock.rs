//! The wall clock, read in one place: unix seconds.
//!
//! Decisions take the time as a parameter (`now: u64`), so they can be table-tested; only the
//! code that performs I/O calls [`now`]. `.clippy.toml` forbids `SystemTime::now` (and
//! `SystemTime::elapsed`, which reads it) everywhere else. Monotonic `Instant`s, for
//! timeouts and durations, are not the wall clock and stay allowed.
//!
//! Unit tests move a thread's wall clock forward with [`advance`] instead of sleeping: a
//! registry test runs on one thread (tokio's current-thread test runtime), its spawned tasks
//! included, so every `now` it causes sees the same shift. moka's own expiry follows the real
//! clock, which is why the time rules live in code that reads `now` here.

use std::time::{SystemTime, UNIX_EPOCH};

/// Unix seconds now (0 if the system clock is set before 1970).
#[allow(clippy::disallowed_methods)] // the one wall-clock read (see the module docs)
pub fn now() -> u64 {
    let real = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    real + shift_ms() / 1000
}

/// Unix milliseconds now, where the order of two events in one second matters (a version's
/// reappearance against a refill).
#[allow(clippy::disallowed_methods)] // the one wall-clock read (see the module docs)
pub fn now_ms() -> u64 {
    let real = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    real.saturating_add(shift_ms())
}

#[cfg(test)]
thread_local! {
    /// How far a test moved this thread's clock (see [`advance`]).
    static SHIFT_MS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

#[cfg(test)]
fn shift_ms() -> u64 {
    SHIFT_MS.with(std::cell::Cell::get)
}

#[cfg(not(test))]
const fn shift_ms() -> u64 {
    0
}

/// Move this thread's wall clock forward by `by` (whole seconds for [`now`]).
#[cfg(test)]
pub fn advance(by: std::time::Duration) {
    let ms = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
    SHIFT_MS.with(|s| s.set(s.get().saturating_add(ms)));
}

/// Unix microseconds now: the timestamp of log lines formatted by tfmirror itself (the access
/// line), at the precision tracing's own timestamps have. Never moved by `advance`: log
/// lines carry the real time, as tracing's own lines do.
#[allow(clippy::disallowed_methods)] // the one wall-clock read (see the module docs)
pub fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}
