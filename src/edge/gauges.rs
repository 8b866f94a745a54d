//! Gauges that are read rather than counted: refreshed from the store and the breaker on
//! each scrape, so `metrics` itself stays a leaf that knows no other module.

use crate::cache::Cache;
use crate::metrics;
use crate::upstream::health::Health;

/// Refresh the gauges that are read rather than counted (on each scrape).
pub fn update(cache: &Cache, health: &Health) {
    metrics::UPSTREAM_UP.set(i64::from(health.is_up()));
    metrics::CACHE_BYTES
        .with_label_values(&["memory"])
        .set(cache.memory_bytes() as i64);
    metrics::CACHE_BYTES
        .with_label_values(&["disk"])
        .set(cache.disk_bytes() as i64);
    metrics::CACHE_ENTRIES
        .with_label_values(&["memory", "blob"])
        .set(cache.memory_entries() as i64);
    metrics::CACHE_ENTRIES
        .with_label_values(&["disk", "blob"])
        .set(cache.disk_blobs() as i64);
    metrics::CACHE_ENTRIES
        .with_label_values(&["memory", "fill"])
        .set(cache.fills_in_flight() as i64);
    metrics::CACHE_EVICTIONS
        .with_label_values(&["disk"])
        .set(cache.disk_evictions() as i64);
    metrics::CACHE_EVICTIONS
        .with_label_values(&["memory"])
        .set(cache.memory_evictions() as i64);
}
