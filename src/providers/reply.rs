//! The provider mirror's answers as values ([`Reply`]), in the shapes the network mirror and
//! registry protocols take. Nothing here writes: `crate::edge::write::reply` does, once, for
//! every provider route.

use bytes::Bytes;
use futures::StreamExt;
use http::{header, StatusCode};

use super::{Failed, Found};
use crate::cache::artifact::Artifact;
use crate::cache::body::Body;
use crate::respond::{self, CacheStatus, Reply, JSON};

const ZIP: &str = "application/zip";

/// A found value as JSON (its body made by `body`), or the failure's error; with what the
/// cache did.
pub(super) fn found<T>(
    found: Result<Found<T>, Failed>,
    body: impl FnOnce(T) -> String,
) -> (Reply, CacheStatus) {
    match found {
        Ok(f) => (json(f.cache, f.age, body(f.value)), f.cache),
        Err(f) => failed(f),
    }
}

/// A failure's error answer, with what the cache did.
pub(super) fn failed(f: Failed) -> (Reply, CacheStatus) {
    let reply = error(f.status, f.cache);
    match f.retry_after {
        Some(secs) => (
            reply.with_value(header::RETRY_AFTER, respond::decimal(secs)),
            f.cache,
        ),
        None => (reply, f.cache),
    }
}

/// A JSON body from the cache or the registry, `age` seconds old; a stale one says so.
pub(super) fn json(cache: CacheStatus, age: u64, body: String) -> Reply {
    Reply::cached_json(cache, age, cache == CacheStatus::Stale, body)
}

/// The registry's error shape for `status` (`{"message":"502 Bad Gateway"}`). Without the
/// `Cache-Control: no-store` of [`Reply::error`]: no provider answer carries one.
pub(super) fn error(status: StatusCode, cache: CacheStatus) -> Reply {
    Reply::full(status, respond::message_body(status))
        .with(header::CONTENT_TYPE, JSON)
        .cache(cache)
}

/// `SHA256SUMS` (text) or its signature (octets), the exact bytes that were verified.
pub(super) fn sums_file(cache: CacheStatus, bytes: Bytes, signature: bool) -> Reply {
    let content_type = if signature {
        "application/octet-stream"
    } else {
        "text/plain; charset=utf-8"
    };
    Reply::full(StatusCode::OK, bytes)
        .with(header::CONTENT_TYPE, content_type)
        .cache(cache)
}

/// A public module's download answer: 204 whose `X-Terraform-Get` is `location`.
pub(super) fn module_download(cache: CacheStatus, location: &str) -> Reply {
    Reply::terraform_get(cache, location)
}

/// A committed package from the store (see `cache::artifact`).
pub(super) fn zip_cached(cache: CacheStatus, artifact: Artifact) -> Reply {
    Reply::ok(artifact.into_body())
        .with(header::CONTENT_TYPE, ZIP)
        .cache(cache)
}

/// A package answer streamed from the store or its fill; the writer frames an unknown
/// length so that a cut shows (without it, pingora would delimit the body by closing the
/// connection, and a package cut for failing verification would look whole).
pub(super) fn zip(cache: CacheStatus, len: Option<u64>, body: Body) -> Reply {
    let chunks = body.map(|c| c.map_err(Into::into)).boxed();
    Reply::stream(len, chunks)
        .with(header::CONTENT_TYPE, ZIP)
        .cache(cache)
}
