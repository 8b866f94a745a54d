//! Prometheus metrics, served at `/-/metrics`. Family names start with `tfmirror_`; label
//! values are route templates and fixed sets only, never tokens, paths or module names.

use std::sync::LazyLock;

use prometheus::{
    register_histogram_vec, register_int_counter, register_int_counter_vec, register_int_gauge,
    register_int_gauge_vec, Encoder, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, TextEncoder,
};

pub static REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "tfmirror_requests_total",
        "Requests answered, by kind (module, provider, other), route template, method, status and cache status.",
        &["kind", "route", "method", "status", "cache"]
    )
    .expect("metric")
});

pub static REQUEST_DURATION: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "tfmirror_request_duration_seconds",
        "Time to answer a request, by route template and cache status.",
        &["route", "cache"],
        vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            30.0
        ]
    )
    .expect("metric")
});

pub static UPSTREAM_REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "tfmirror_upstream_requests_total",
        "Requests tfmirror sent upstream itself, by route and outcome (status class or error).",
        &["route", "outcome"]
    )
    .expect("metric")
});

pub static UPSTREAM_DURATION: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "tfmirror_upstream_duration_seconds",
        "Time for the upstream to answer a registry call.",
        &["route"],
        vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
    )
    .expect("metric")
});

pub static CACHE_BYTES: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!("tfmirror_cache_bytes", "Bytes held, by tier.", &["tier"])
        .expect("metric")
});

pub static CACHE_ENTRIES: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "tfmirror_cache_entries",
        "Entries held, by tier and kind.",
        &["tier", "kind"]
    )
    .expect("metric")
});

pub static CACHE_EVICTIONS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "tfmirror_cache_evictions_total",
        "Entries evicted since start, by tier.",
        &["tier"]
    )
    .expect("metric")
});

pub static COALESCED_WAITS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "tfmirror_coalesced_waits_total",
        "Requests that joined an upstream fetch already under way instead of starting one."
    )
    .expect("metric")
});

pub static STALE_SERVED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "tfmirror_stale_served_total",
        "Answers served stale because the upstream failed or was down."
    )
    .expect("metric")
});

pub static AUTH_DECISIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "tfmirror_auth_decisions_total",
        "Access decisions made from the cache, by decision.",
        &["decision"]
    )
    .expect("metric")
});

pub static CACHE_WRITE_ERRORS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "tfmirror_cache_write_errors_total",
        "Tarballs that could not be written to the cache (disk full, I/O errors); they were served without caching when possible."
    )
    .expect("metric")
});

pub static UPSTREAM_UP: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "tfmirror_upstream_up",
        "1 while the upstream is considered reachable."
    )
    .expect("metric")
});

pub static RATELIMIT_REMAINING: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "tfmirror_upstream_ratelimit_remaining",
        "Lowest RateLimit-Remaining GitLab sent over the last minute (-1: none sent)."
    )
    .expect("metric")
});

pub static RATELIMIT_RESET: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "tfmirror_upstream_ratelimit_reset_timestamp_seconds",
        "When the budget of tfmirror_upstream_ratelimit_remaining resets (unix time; -1: unknown)."
    )
    .expect("metric")
});

pub static BYTES_SERVED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "tfmirror_bytes_served_total",
        "Response body bytes sent to clients, by kind (module, provider, other) and cache status.",
        &["kind", "cache"]
    )
    .expect("metric")
});

pub static CLIENT_TIMEOUTS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "tfmirror_client_timeouts_total",
        "Client connections closed for not sending a request head (HTTP/2: its preface or a new request) within timeouts.client_idle (idle or slowloris)."
    )
    .expect("metric")
});

pub static CLIENT_ABORTS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "tfmirror_client_aborts_total",
        "Client connections closed or reset by the client partway through a request head (pingora's 'Fail to proxy' line for each is demoted to debug)."
    )
    .expect("metric")
});

pub static CLIENT_CONNECTIONS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "tfmirror_client_connections",
        "Open client connections, by the proxy thread serving them (new ones go to the thread with the fewest).",
        &["thread"]
    )
    .expect("metric")
});

pub static LATE_ANSWERS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "tfmirror_late_answers_absorbed_total",
        "GitLab answers that arrived after offline.deadline and were still learned (grant refreshed or revoked)."
    )
    .expect("metric")
});

pub static TEMP_LEFTOVERS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "tfmirror_temp_leftovers_removed_total",
        "Temp files of processes that died mid-write (kill -9, OOM), removed at start."
    )
    .expect("metric")
});

pub static RATE_LIMITED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "tfmirror_rate_limited_callers_total",
        "429s from GitLab, each holding back only the caller (identity and module) that received it."
    )
    .expect("metric")
});

pub static FILLS_NOT_KEPT: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "tfmirror_fills_not_kept_total",
        "Tarball bodies served but not cached, by reason: unframed (close-delimited upstream), bad_gzip, no_end_of_archive, too_large; or failed because an unframed body was cut (bad_gzip).",
        &["reason"]
    )
    .expect("metric")
});

pub static UNFRAMED_RESPONSES: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "tfmirror_unframed_responses_total",
        "Tarballs of unknown length sent to HTTP/1.0 clients, which cannot take chunked framing: close-delimited, so a cut is indistinguishable from the end for them."
    )
    .expect("metric")
});

pub static FILE_SENDS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "tfmirror_file_sends_total",
        "Large cached artifacts checked whole and sent by the kernel (sendfile) to plain HTTP/1 clients, instead of streamed through tfmirror."
    )
    .expect("metric")
});

pub static CACHE_RECORDS: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "tfmirror_cache_records",
        "Small records on disk (tarball index, grants, listing references); capped by limits.max_records."
    )
    .expect("metric")
});

pub static CACHE_RECORDS_REFUSED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "tfmirror_cache_records_refused_total",
        "New records not written because limits.max_records was reached (kept in memory only)."
    )
    .expect("metric")
});

pub static CACHE_RECORDS_EVICTED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "tfmirror_cache_records_evicted_total",
        "Records removed at limits.max_records to make room for a new one (the one nearest its expiry)."
    )
    .expect("metric")
});

pub static GRANTS_EXPIRED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "tfmirror_grants_expired_total",
        "Grant records removed past auth.grant_ttl + cache.stale_if_error (by serve's periodic gc)."
    )
    .expect("metric")
});

pub static CACHE_WRITABLE: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "tfmirror_cache_writable",
        "1 when the last readiness probe could write to the cache directory, 0 when it was full or broken."
    )
    .expect("metric")
});

pub static PROVIDER_VERIFICATIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "tfmirror_provider_verifications_total",
        "Provider package checks, by result: signature_ok, unsigned_accepted, checksum_ok, or the reason a package was refused (never kept nor served).",
        &["result"]
    )
    .expect("metric")
});

pub static REPUBLISHED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "tfmirror_republished_total",
        "Fills that found other bytes than the cached ones for a version (re-published in GitLab)."
    )
    .expect("metric")
});

/// Every `result` of `tfmirror_provider_verifications_total` (`providers::verify` checks
/// that each of its refusals is here).
pub const PROVIDER_VERIFICATION_RESULTS: [&str; 9] = [
    "signature_ok",
    "unsigned_accepted",
    "checksum_ok",
    "no_signing_keys",
    "bad_key",
    "bad_signature",
    "not_listed",
    "shasum_mismatch",
    "checksum_mismatch",
];

/// Every family tfmirror exports (the dashboard in deploy/grafana has a panel for each).
pub const FAMILIES: [&str; 30] = [
    "tfmirror_requests_total",
    "tfmirror_request_duration_seconds",
    "tfmirror_upstream_requests_total",
    "tfmirror_upstream_duration_seconds",
    "tfmirror_cache_bytes",
    "tfmirror_cache_entries",
    "tfmirror_cache_evictions_total",
    "tfmirror_coalesced_waits_total",
    "tfmirror_stale_served_total",
    "tfmirror_auth_decisions_total",
    "tfmirror_upstream_up",
    "tfmirror_upstream_ratelimit_remaining",
    "tfmirror_upstream_ratelimit_reset_timestamp_seconds",
    "tfmirror_bytes_served_total",
    "tfmirror_cache_write_errors_total",
    "tfmirror_client_timeouts_total",
    "tfmirror_client_aborts_total",
    "tfmirror_client_connections",
    "tfmirror_late_answers_absorbed_total",
    "tfmirror_rate_limited_callers_total",
    "tfmirror_temp_leftovers_removed_total",
    "tfmirror_fills_not_kept_total",
    "tfmirror_unframed_responses_total",
    "tfmirror_cache_records",
    "tfmirror_cache_records_refused_total",
    "tfmirror_cache_records_evicted_total",
    "tfmirror_grants_expired_total",
    "tfmirror_cache_writable",
    "tfmirror_republished_total",
    "tfmirror_provider_verifications_total",
];

/// Register every family at start. Unlabelled families are then exported (at zero) from the
/// first scrape on; labelled ones appear with their first label set, as the prometheus
/// crate exports no family without a child.
pub fn init() {
    LazyLock::force(&REQUESTS);
    LazyLock::force(&REQUEST_DURATION);
    LazyLock::force(&UPSTREAM_REQUESTS);
    LazyLock::force(&UPSTREAM_DURATION);
    LazyLock::force(&CACHE_BYTES);
    LazyLock::force(&CACHE_ENTRIES);
    LazyLock::force(&CACHE_EVICTIONS);
    LazyLock::force(&COALESCED_WAITS);
    LazyLock::force(&STALE_SERVED);
    LazyLock::force(&AUTH_DECISIONS);
    LazyLock::force(&UPSTREAM_UP);
    // Unknown until GitLab sends its RateLimit headers.
    RATELIMIT_REMAINING.set(-1);
    RATELIMIT_RESET.set(-1);
    LazyLock::force(&CACHE_WRITE_ERRORS);
    LazyLock::force(&BYTES_SERVED);
    LazyLock::force(&CLIENT_TIMEOUTS);
    LazyLock::force(&CLIENT_ABORTS);
    LazyLock::force(&LATE_ANSWERS);
    LazyLock::force(&RATE_LIMITED);
    LazyLock::force(&TEMP_LEFTOVERS);
    // Labelled, but exported from the first scrape: a fill not kept is worth a panel at zero.
    for reason in ["unframed", "bad_gzip", "no_end_of_archive", "too_large"] {
        FILLS_NOT_KEPT.with_label_values(&[reason]);
    }
    LazyLock::force(&UNFRAMED_RESPONSES);
    LazyLock::force(&FILE_SENDS);
    LazyLock::force(&CACHE_RECORDS);
    LazyLock::force(&CACHE_RECORDS_REFUSED);
    LazyLock::force(&CACHE_RECORDS_EVICTED);
    LazyLock::force(&GRANTS_EXPIRED);
    LazyLock::force(&REPUBLISHED);
    // Writable until a readiness probe finds otherwise.
    CACHE_WRITABLE.set(1);
    // Every outcome from the first scrape, so a refusal shows as a rise from zero.
    for result in PROVIDER_VERIFICATION_RESULTS {
        PROVIDER_VERIFICATIONS.with_label_values(&[result]);
    }
}

/// Access decisions, as `auth_decisions_total{decision}` labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// A fresh grant: served from the cache.
    Granted,
    /// Asked upstream; GitLab said yes.
    UpstreamAllowed,
    /// Asked upstream; GitLab said no.
    UpstreamRefused,
    /// Upstream down: the identity's own (expired) grant allowed a stale answer.
    StaleGrant,
    /// Upstream down: a module GitLab served anonymously, served to anyone.
    StalePublic,
    /// Upstream down: `offline.unknown_identity = authenticated` let a new identity in.
    UnknownAuthenticated,
    /// Upstream down: `offline.unknown_identity = anyone` let a new identity in.
    UnknownAnyone,
    /// GitLab failed, and `offline.unknown_identity` gave this never-authorized identity
    /// nothing: refused.
    UnknownDenied,
    /// GitLab failed, and the identity was refused by GitLab before, or nothing recent
    /// enough was cached for it: refused.
    OfflineRefused,
    /// A tfmirror download token was refused.
    TokenRefused,
    /// GitLab could not be asked about a CI job; its verified ID token named the principal.
    IdTokenOffline,
    /// Sealed mirror: what a signed bundle brought, to a caller `offline.imported_readers`
    /// admits (or of a public module).
    Imported,
    /// Sealed mirror: an imported private module, and `offline.imported_readers` does not
    /// admit this caller: refused.
    NotReader,
}

impl Decision {
    /// In declaration order: `ALL[d as usize] == d`.
    const ALL: [Decision; 13] = [
        Decision::Granted,
        Decision::UpstreamAllowed,
        Decision::UpstreamRefused,
        Decision::StaleGrant,
        Decision::StalePublic,
        Decision::UnknownAuthenticated,
        Decision::UnknownAnyone,
        Decision::UnknownDenied,
        Decision::OfflineRefused,
        Decision::TokenRefused,
        Decision::IdTokenOffline,
        Decision::Imported,
        Decision::NotReader,
    ];

    fn label(self) -> &'static str {
        match self {
            Decision::Granted => "granted",
            Decision::UpstreamAllowed => "upstream_allowed",
            Decision::UpstreamRefused => "upstream_refused",
            Decision::StaleGrant => "stale_grant",
            Decision::StalePublic => "stale_public",
            Decision::UnknownAuthenticated => "unknown_authenticated",
            Decision::UnknownAnyone => "unknown_anyone",
            Decision::UnknownDenied => "unknown_denied",
            Decision::OfflineRefused => "offline_refused",
            Decision::TokenRefused => "token_refused",
            Decision::IdTokenOffline => "id_token_offline",
            Decision::Imported => "imported",
            Decision::NotReader => "not_reader",
        }
    }
}

/// Every decision's counter, resolved once: counted on every hit, a label lookup (a lock
/// and a hash) per request would show in its profile.
static DECISION_COUNTERS: LazyLock<Vec<IntCounter>> = LazyLock::new(|| {
    Decision::ALL
        .iter()
        .map(|d| AUTH_DECISIONS.with_label_values(&[d.label()]))
        .collect()
});

pub fn decision(d: Decision) {
    DECISION_COUNTERS[d as usize].inc();
}

/// The text exposition of every registered family.
pub fn render() -> String {
    let mut out = Vec::new();
    let _ = TextEncoder::new().encode(&prometheus::gather(), &mut out);
    String::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The resolved counters are indexed by the enum's discriminant: `ALL` must list every
    /// variant in declaration order, or a decision would be counted under another's label.
    #[test]
    fn each_decision_counts_under_its_own_label() {
        for (i, d) in Decision::ALL.iter().enumerate() {
            assert_eq!(*d as usize, i, "{d:?}");
            assert_eq!(Decision::ALL[*d as usize], *d);
            let before = AUTH_DECISIONS.with_label_values(&[d.label()]).get();
            decision(*d);
            let after = AUTH_DECISIONS.with_label_values(&[d.label()]).get();
            // Other tests may count too, never less.
            assert!(after > before, "{d:?}");
        }
    }
}
