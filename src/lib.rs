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
//! | L5 edge | [`edge`] | everything that meets a client connection and the only layer naming pingora's `Session`: the hooks ([`edge::proxy`]), client connections ([`edge::downstream`]), the access log ([`edge::accesslog`]), accept loops per thread ([`edge::workers`]), scrape-time gauges, `/-/metrics` |
//! | L4 registry | [`registry`] | cache decisions for registry routes, one file per decision: a [`registry::Call`] in, a [`respond::Reply`] out, I/O around [`access::policy`] |
//! | | [`bundle`] | signed bundles for air-gapped sites: a cache directory's selection exported as one signed tar, and imported, checked, into another |
//! | | [`providers`] | the provider mirror: registries, OpenPGP and checksum verification, network mirror and registry protocols |
//! | L3 access | [`access`] | who may have what: grants per (identity, module), credentials in memory, refusals; [`access::policy`] is *the* access and stale policy, pure code; [`access::principal`] maps CI job tokens to their principal, [`access::idtoken`] verifies CI ID tokens |
//! | L2 upstream | [`upstream`] | every request tfmirror sends upstream: one TLS trust decision and client builder ([`upstream::tls`]), the GitLab adapter ([`upstream::gitlab`]), the outage rule and breaker ([`upstream::breaker`]), GitLab's probe ([`upstream::health`]), address and DNS |
//! | L1 store | [`cache`] | memory tier, blake3-addressed disk blobs streamed verified ([`cache::verified`]), coalesced fills, `tfmirror cache` admin; [`cache::records`] holds every on-disk record, its kind and its key |
//! | L0 leaves | [`config`] | settings: defaults, YAML file, `TFMIRROR_*` environment, flags; validation |
//! | | [`routes`] | parse a request once into a typed [`routes::Route`] (module, project and provider routes: [`routes::provider`]); refuse what can never be valid |
//! | | [`identity`] | keyed hashes of credentials |
//! | | [`secret`] | key material: the per-instance `secret.key`, or a set's shared key file; rotation |
//! | | [`token`] | tfmirror's download tokens: sealed (AEAD) claims any replica of a set can open |
//! | | [`rewrite`] | `X-Terraform-Get` / `Location` rewriting onto tfmirror's public URL |
//! | | [`constraint`] | Terraform version constraints, for `warm` |
//! | | [`respond`] | answers as values ([`respond::Reply`]) and their heads and framing; the edge alone writes them (`edge::write`); GitLab's JSON shapes; `X-Cache-Status` |
//! | | [`metrics`] | Prometheus families and their labels; imports nothing from the crate |
//! | | [`flight`] | single flight: one upstream exchange per key ([`flight::Flights`]) and one background task per key ([`flight::Running`]), for modules and providers |
//! | | [`windows`] | freshness windows (fresh, revalidate, stale-if-error): one boundary convention for module listings and provider lists |
//! | | [`clock`] | the wall clock, read in one place (clippy forbids `SystemTime::now` elsewhere) |
//! | | [`pem`] | certificate and key files |
//! | | [`logbuf`] | per-thread log buffers, flushed by size or timer |
//! | | [`logbridge`] | pingora's `log` records into tracing under one short target, without source paths; start-up chatter and a client's abort mid-head demoted to debug (the abort counted) |
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

// Denied, with one audited exception: `edge::workers::Group::listener` takes over a listening
// socket from pingora's table, which holds raw descriptors (see its SAFETY note).
#![deny(unsafe_code)]
#![warn(clippy::too_many_lines)]

pub(crate) mod access;
pub mod bundle;
pub mod cache;
pub mod cli;
pub mod clock;
pub mod config;
pub(crate) mod constraint;
pub mod edge;
pub(crate) mod flight;
#[doc(hidden)]
pub mod fuzzing;
pub mod identity;
pub mod logbridge;
pub mod logbuf;
pub mod metrics;
pub(crate) mod pem;
pub mod providers;
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
pub(crate) mod windows;
