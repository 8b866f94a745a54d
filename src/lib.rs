//! # tfmirror
//!
//! A caching proxy and offline mirror for GitLab's Terraform Module Registry, built on
//! Cloudflare's [Pingora](https://github.com/cloudflare/pingora).
//!
//! ## Layout, by layer
//! A module imports only from its own layer or a lower one, and modules never import each
//! other in a cycle. `tests/layering.rs` checks both on every `crate::`/`super::` path; a new
//! module gets its layer there. A request enters at L5 and is answered from below.
//! `ARCHITECTURE.md` draws the request path and says where to add a route, a metric or a
//! record kind.
//!
//! | layer | module | concern |
//! |---|---|---|
//! | L6 wiring, commands | [`server`] | assemble the pingora server from a [`config::Config`]; [`server::Parts`] for the commands |
//! | | [`sync`] | module wish-lists for `warm`/`sync`: arguments, `.tf` files, a GitLab group |
//! | | [`cli`] | the command line, one file per command (`main.rs` only picks the allocator) |
//! | L5 edge | [`proxy`] | the pingora hooks: parse, then answer locally, from the registry, or proxy |
//! | | [`edge`] | gauges read at scrape time; `/-/metrics` on its own listener |
//! | | [`accesslog`] | the access log line and request metrics of each request |
//! | | [`workers`] | one pingora service, `SO_REUSEPORT` socket and accept loop per thread; new connections to the least busy thread |
//! | | [`downstream`] | client connections: a deadline on request heads (idle, slowloris); HTTP/2's connection loop, with the same deadline and a stall bound on request bodies |
//! | L4 registry | [`registry`] | cache decisions for registry routes, one file per decision: a [`registry::Call`] in, a [`respond::Reply`] out, I/O around [`access::policy`] |
//! | | [`providers`] | the provider mirror: registries, OpenPGP and checksum verification, network mirror and registry protocols |
//! | L3 access | [`access`] | who may have what: grants per (identity, module), credentials in memory, refusals; [`access::policy`] is *the* access and stale policy, pure code; [`access::principal`] maps CI job tokens to their principal, [`access::idtoken`] verifies CI ID tokens |
//! | L2 upstream | [`upstream`] | upstream address, DNS off the request path, timeouts |
//! | | [`upstream_tls`] | TLS trust per upstream (CA certificates as roots, others pinned) and the one builder of upstream clients |
//! | | [`fetch`] | requests tfmirror sends itself (registry calls, downloads through redirects); [`fetch::Fetcher`], the seam a test stub fills |
//! | | [`health`] | circuit breaker and probe: is the upstream reachable? |
//! | L1 store | [`cache`] | memory tier, blake3-addressed disk blobs streamed verified ([`cache::verified`]), coalesced fills, `tfmirror cache` admin; [`cache::records`] holds every on-disk record, its kind and its key |
//! | L0 leaves | [`config`] | settings: defaults, YAML file, `TFMIRROR_*` environment, flags; validation |
//! | | [`routes`] | parse a request once into a typed [`routes::Route`] (module, project and provider routes: [`routes::provider`]); refuse what can never be valid |
//! | | [`identity`] | keyed hashes of credentials |
//! | | [`secret`] | key material: the per-instance `secret.key`, or a set's shared key file; rotation |
//! | | [`token`] | tfmirror's download tokens: sealed (AEAD) claims any replica of a set can open |
//! | | [`rewrite`] | `X-Terraform-Get` / `Location` rewriting onto tfmirror's public URL |
//! | | [`constraint`] | Terraform version constraints, for `warm` |
//! | | [`respond`] | answers as values ([`respond::Reply`]) and the one writer that puts them on the wire ([`respond::write`]); GitLab's JSON shapes; `X-Cache-Status` |
//! | | [`metrics`] | Prometheus families and their labels; imports nothing from the crate |
//! | | [`clock`] | the wall clock, read in one place (clippy forbids `SystemTime::now` elsewhere) |
//! | | [`pem`] | certificate and key files |
//! | | [`logbuf`] | per-thread log buffers, flushed by size or timer |
//! | | [`logbridge`] | pingora's `log` records into tracing; a client's abort mid-head demoted to debug and counted |
//! | | [`tls`] | TLS termination: the server certificate, reloaded when its files change; the client pinned to it for `tfmirror health` |
//! | | `fuzzing` | the properties the fuzz targets check (shared with `tests/fuzz_corpus.rs`) |
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

// Denied, with one audited exception: `workers::Group::listener` takes over a listening
// socket from pingora's table, which holds raw descriptors (see its SAFETY note).
#![deny(unsafe_code)]
#![warn(clippy::too_many_lines)]

pub(crate) mod access;
pub mod accesslog;
pub mod cache;
pub mod cli;
pub mod clock;
pub mod config;
pub(crate) mod constraint;
pub mod downstream;
pub(crate) mod edge;
pub(crate) mod fetch;
#[doc(hidden)]
pub mod fuzzing;
pub(crate) mod health;
pub mod identity;
pub mod logbridge;
pub mod logbuf;
pub mod metrics;
pub(crate) mod pem;
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
pub(crate) mod upstream;
pub(crate) mod upstream_tls;
pub(crate) mod workers;
