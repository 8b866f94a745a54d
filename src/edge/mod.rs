//! The pingora-facing layer: what answers clients besides the registry decisions.
//!
//! - [`gauges`]: the gauges read at scrape time, from the store's and the breaker's state.
//! - [`metrics_app`]: `/-/metrics` on its own listener (`metrics_listen`).

pub mod gauges;
pub mod metrics_app;
