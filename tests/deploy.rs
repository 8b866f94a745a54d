//! Deployment files are parsed and checked here: no cluster or Grafana runs in CI.

use std::collections::BTreeSet;

/// The metric families tfmirror exports (see src/metrics.rs).
const FAMILIES: [&str; 12] = [
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
    "tfmirror_bytes_served_total",
];

#[test]
fn grafana_dashboard_queries_only_exported_families_and_covers_them_all() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/grafana/tfmirror-dashboard.json"
    );
    let d: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut used = BTreeSet::new();
    for panel in d["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            let names: Vec<&str> = expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("tfmirror_"))
                .collect();
            assert!(
                !names.is_empty(),
                "panel {} queries no tfmirror metric",
                panel["title"]
            );
            for n in names {
                let family = FAMILIES
                    .iter()
                    .find(|f| {
                        n == **f
                            || n.strip_prefix(**f)
                                .is_some_and(|s| ["_bucket", "_sum", "_count"].contains(&s))
                    })
                    .unwrap_or_else(|| panic!("panel {} queries unknown {n}", panel["title"]));
                used.insert(*family);
            }
        }
    }
    let missing: Vec<_> = FAMILIES.iter().filter(|f| !used.contains(*f)).collect();
    assert!(missing.is_empty(), "families without a panel: {missing:?}");
}
