//! The wall clock, read in one place: unix seconds.
//!
//! Decisions take the time as a parameter (`now: u64`), so they can be table-tested; only the
//! code that performs I/O calls [`now`], or [`Moment::now`] where a request needs the wall
//! clock and a monotonic instant both (one clock read, the seconds derived from the instant). `.clippy.toml` forbids `SystemTime::now` (and
//! `SystemTime::elapsed`, which reads it) everywhere else. Monotonic `Instant`s, for
//! timeouts and durations, are not the wall clock and stay allowed.
//!
//! Unit tests move a thread's wall clock forward with [`advance`] instead of sleeping: a
//! registry test runs on one thread (tokio's current-thread test runtime), its spawned tasks
//! included, so every `now` it causes sees the same shift. moka's own expiry follows the real
//! clock, which is why the time rules live in code that reads `now` here.

use std::cell::Cell;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Unix seconds now (0 if the system clock is set before 1970).
#[allow(clippy::disallowed_methods)] // the one wall-clock read (see the module docs)
pub fn now() -> u64 {
    let real = SystemTime::now().duration_since(UNIX_EPOCH);
    match shift_ms() {
        0 => real.map_or(0, |d| d.as_secs()),
        // Whole seconds of the shifted time, not the sum of the whole seconds of each.
        shift => real.map_or(0, |d| {
            u64::try_from(d.as_millis())
                .unwrap_or(u64::MAX)
                .saturating_add(shift)
                / 1000
        }),
    }
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

/// The monotonic clock for in-memory records that expire (a remembered credential, a
/// refusal replayed, a caller held back by its 429): `Instant::now()`, moved forward by the
/// process-wide shift of the `test-clock` feature, so those records age with the wall clock
/// when an integration test moves the clock of a running tfmirror. A unit test's thread
/// shift ([`advance`]) moves the wall clock only. Timeouts and durations of I/O read
/// `Instant::now()` themselves.
pub fn instant() -> Instant {
    let at = Instant::now();
    match process_shift_ms() {
        0 => at,
        shift => at + Duration::from_millis(shift),
    }
}

#[cfg(test)]
thread_local! {
    /// How far a test moved this thread's clock (see [`advance`]).
    static SHIFT_MS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// The shift of the wall clock: a unit test's thread shift plus the process-wide one.
#[cfg(test)]
fn shift_ms() -> u64 {
    SHIFT_MS
        .with(std::cell::Cell::get)
        .saturating_add(process_shift_ms())
}

#[cfg(not(test))]
fn shift_ms() -> u64 {
    process_shift_ms()
}

/// Move this thread's wall clock forward by `by` (whole seconds for [`now`]).
#[cfg(test)]
pub fn advance(by: std::time::Duration) {
    let ms = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
    SHIFT_MS.with(|s| s.set(s.get().saturating_add(ms)));
}

/// The `test-clock` feature: how far the whole process's clock was moved, for the integration
/// tests, which run the real binary and cannot reach a thread of it. It starts at
/// [`SHIFT_ENV`] (a restarted process keeps the clock its test had moved) and grows through
/// `POST /-/test/clock?advance_ms=N` ([`advance_process`]). Cargo enables the feature for test
/// builds only (a dev-dependency of the package on itself): a release build has neither the
/// endpoint nor the atomic read, and [`process_shift_ms`] is the constant 0.
#[cfg(feature = "test-clock")]
static PROCESS_SHIFT_MS: std::sync::LazyLock<std::sync::atomic::AtomicU64> =
    std::sync::LazyLock::new(|| {
        let start = std::env::var(SHIFT_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        std::sync::atomic::AtomicU64::new(start)
    });

/// The environment variable a `test-clock` build starts its process-wide shift from
/// (milliseconds).
#[cfg(feature = "test-clock")]
pub const SHIFT_ENV: &str = "TFM_TEST_CLOCK_SHIFT_MS";

#[cfg(feature = "test-clock")]
fn process_shift_ms() -> u64 {
    PROCESS_SHIFT_MS.load(std::sync::atomic::Ordering::Relaxed)
}

#[cfg(not(feature = "test-clock"))]
#[inline(always)]
const fn process_shift_ms() -> u64 {
    0
}

/// Move the whole process's clock forward by `ms` (the `test-clock` feature's endpoint);
/// returns the shift now in force.
#[cfg(feature = "test-clock")]
pub fn advance_process(ms: u64) -> u64 {
    PROCESS_SHIFT_MS
        .fetch_add(ms, std::sync::atomic::Ordering::Relaxed)
        .saturating_add(ms)
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

/// One reading of the clock for a request's decisions: the wall clock in unix seconds, as
/// [`now`] says it, and the monotonic instant the caller's in-memory records are timed by.
/// Read once: the wall-clock seconds come from the instant through [`unix_micros_at`].
#[derive(Debug, Clone, Copy)]
pub struct Moment {
    pub unix: u64,
    pub at: Instant,
}

impl Moment {
    pub fn now() -> Moment {
        let at = Instant::now();
        let unix = match shift_ms() {
            0 => unix_micros_at(at) / 1_000_000,
            shift => unix_micros_at(at).saturating_add(shift.saturating_mul(1000)) / 1_000_000,
        };
        let at = match process_shift_ms() {
            0 => at,
            shift => at + Duration::from_millis(shift),
        };
        Moment { unix, at }
    }

    /// A moment at unix second `unix` (a test's chosen time), with the instant now.
    #[cfg(test)]
    pub fn at_unix(unix: u64) -> Moment {
        Moment {
            unix,
            at: Instant::now(),
        }
    }
}

/// How long a thread's pairing of the two clocks is used before the wall clock is read again.
const WALL_REREAD: Duration = Duration::from_secs(1);

thread_local! {
    /// (an instant, the unix microseconds at it): see [`unix_micros_at`].
    static PAIRED: Cell<Option<(Instant, u64)>> = const { Cell::new(None) };
}

/// Unix microseconds at `at`, a recent instant the caller read anyway (the end of a request):
/// from a per-thread pairing of the monotonic clock with the wall clock, made again once it is
/// [`WALL_REREAD`] old. So a log line costs no wall-clock read of its own, and a step of the
/// system clock shows in the lines within a second (nginx caches its time per event-loop
/// turn for the same reason).
pub fn unix_micros_at(at: Instant) -> u64 {
    let (base, base_micros) = PAIRED.with(|p| match p.get() {
        Some((base, micros)) if at >= base && at - base < WALL_REREAD => (base, micros),
        _ => {
            let pair = (Instant::now(), now_micros());
            p.set(Some(pair));
            pair
        }
    });
    let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    match at.checked_duration_since(base) {
        Some(after) => base_micros.saturating_add(micros(after)),
        // `at` was read just before the pairing was made.
        None => base_micros.saturating_sub(micros(base - at)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A moment's seconds are what `now` says, including a test's shift.
    #[test]
    fn a_moment_is_now() {
        let before = now();
        let m = Moment::now();
        assert!(m.unix >= before && m.unix <= now(), "{} {before}", m.unix);
        advance(Duration::from_secs(100));
        let m = Moment::now();
        assert!(m.unix >= before + 100 && m.unix <= now());
    }

    /// Instants just read, a moment old, and older than the pairing all map to the wall
    /// clock's time at them, within the time the reads themselves take.
    #[test]
    fn instants_map_to_the_wall_clock() {
        let slack = 2_000; // µs, for a descheduled test thread
        for _ in 0..3 {
            let before = now_micros();
            let at = Instant::now();
            let after = now_micros();
            let mapped = unix_micros_at(at);
            assert!(
                mapped + slack >= before && mapped <= after + slack,
                "{before} {mapped} {after}"
            );
            std::thread::sleep(Duration::from_millis(400));
        }
        // An instant from before the pairing was last made.
        let old = Instant::now();
        std::thread::sleep(WALL_REREAD + Duration::from_millis(50));
        let now = Instant::now();
        let mapped_now = unix_micros_at(now);
        let mapped_old = unix_micros_at(old);
        let apart = mapped_now - mapped_old;
        let real = u64::try_from((now - old).as_micros()).unwrap();
        assert!(apart.abs_diff(real) < slack, "{apart} vs {real}");
        assert!(mapped_now.abs_diff(now_micros()) < slack);
    }
}
