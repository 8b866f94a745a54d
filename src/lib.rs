//! # tfmirror
//!
//! A caching proxy and offline mirror for GitLab's Terraform Module Registry, built on
//! Cloudflare's [Pingora](https://github.com/cloudflare/pingora).
//!
//! ## Layout
//! A request flows one way through these modules:
//!
//! | module | concern |
//! |---|---|
//! | [`config`] | settings: defaults, YAML file, `TFMIRROR_*` environment, flags; validation |
//! | [`routes`] | parse a request once into a typed [`routes::Route`]; refuse what can never be valid |
//! | [`proxy`] | the pingora hooks: decide, then answer locally, from the registry logic, or proxy |
//! | [`registry`] | cache decisions for registry routes: grants, stale answers, tokens, fills |
//! | [`access`] | grants per (identity, module), credentials in memory, negative answers |
//! | [`providers`] | the provider mirror: registries, verification, network mirror protocol |
//! | [`identity`] | keyed hashes of credentials |
//! | [`secret`] | key material: the per-instance `secret.key`, or a set's shared key file; rotation |
//! | [`token`] | tfmirror's download tokens: sealed (AEAD) claims any replica of a set can open |
//! | [`cache`] | memory tier, blake3-addressed disk blobs, index records, coalesced fills |
//! | [`health`] | circuit breaker and probe: is the upstream reachable? |
//! | [`fetch`] | requests tfmirror sends itself (registry calls, downloads through redirects) |
//! | [`rewrite`] | `X-Terraform-Get` / `Location` rewriting onto tfmirror's public URL |
//! | [`upstream`] | upstream address, DNS off the request path, TLS trust, timeouts |
//! | [`metrics`] | Prometheus families |
//! | [`respond`] | responses tfmirror writes itself, in GitLab's JSON shapes; `X-Cache-Status` |
//! | [`downstream`] | client connections: a deadline on request heads (idle, slowloris) |
//! | `fuzzing` | the properties the fuzz targets check (shared with `tests/fuzz_corpus.rs`) |
//! | [`server`] | assemble the pingora server from a [`config::Config`] |
//! | [`workers`] | one pingora service and `SO_REUSEPORT` socket per thread |
//! | [`accesslog`] | the access log line and request metrics of each request |
//! | [`logbuf`] | per-thread log buffers, flushed by size or timer |
//!
//! ## Why pingora's proxy, but not pingora-cache
//! Pingora proxies everything that tfmirror forwards (uploads stream through unbuffered,
//! pass-through keeps methods and bodies). Cache semantics here are application logic that
//! pingora-cache does not model: GitLab sends no caching headers, listings differ per caller,
//! and access must be re-checked per identity. Those decisions are made in `request_filter`,
//! which answers from tfmirror's own store or lets pingora proxy the request.
//!
//! ## Secrets
//! Tokens, GitLab's download JWTs and `X-Terraform-Get` query strings are never logged: log
//! lines carry route templates (see [`routes::Route::template`]), never paths or queries.

#![forbid(unsafe_code)]

pub mod access;
pub mod accesslog;
pub mod admin;
pub mod cache;
pub mod config;
pub mod constraint;
pub mod downstream;
pub mod fetch;
#[doc(hidden)]
pub mod fuzzing;
pub mod health;
pub mod identity;
pub mod logbuf;
pub mod metrics;
pub mod providers;
pub mod proxy;
pub mod registry;
pub mod respond;
pub mod rewrite;
pub mod routes;
pub mod secret;
pub mod server;
pub mod sync;
pub mod tls;
pub mod token;
pub mod upstream;
pub mod workers;
