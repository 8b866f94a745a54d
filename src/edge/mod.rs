//! The edge: everything that meets a client connection, and the only layer that names
//! pingora's `Session`. Below it, decisions take a typed route and return a
//! [`crate::respond::Reply`] value.
//!
//! - [`proxy`]: the pingora hooks: parse, then answer locally, from the registry or the
//!   provider mirror, or proxy to GitLab.
//! - `local`: what tfmirror answers itself (health, readiness, internal metrics, purge,
//!   offline refusals), part of the proxy's `impl`.
//! - [`downstream`]: client connections: a deadline on request heads (idle, slowloris);
//!   HTTP/2's connection loop with the same deadline and a stall bound on request bodies.
//! - [`accesslog`]: the access line and request metrics of each request.
//! - [`workers`]: one pingora service, `SO_REUSEPORT` socket and accept loop per thread; new
//!   connections to the least busy thread.
//! - [`write`]: the one writer of [`crate::respond::Reply`] values on pingora's session,
//!   and the framing that lets a client see a cut.
//! - [`gauges`]: the gauges read at scrape time, from the store's and the breaker's state.
//! - [`metrics_app`]: `/-/metrics` on its own listener (`metrics_listen`).

pub mod accesslog;
pub mod downstream;
pub mod gauges;
mod local;
pub mod metrics_app;
pub mod proxy;
pub(crate) mod workers;
pub mod write;
