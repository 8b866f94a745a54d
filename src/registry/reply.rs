//! The registry's answers as values ([`Reply`]), in GitLab's shapes. Nothing here writes:
//! `crate::edge::write::reply` does, once, for every handler.

use bytes::Bytes;
use http::{header, HeaderValue, StatusCode};

use super::ask::Failure;
use super::{JSON, OCTETS, STALE_WARNING};
use crate::access::policy::Why;
use crate::access::Negative;
use crate::cache::artifact::Artifact;
use crate::cache::records::Refusal;
use crate::respond::{BodyStream, CacheStatus, Reply};
use crate::routes::ModuleId;
use crate::upstream::gitlab::Small;

/// Relay an upstream answer read whole (refusals, errors, listings). A tfmirror tier's stale
/// answer (`cache` STALE) stays one: its `Warning` and `Age` go with it.
pub(super) fn answer(small: &Small, cache: CacheStatus) -> Reply {
    let ct = small
        .headers
        .get(header::CONTENT_TYPE)
        .cloned()
        .unwrap_or(HeaderValue::from_static(JSON));
    let reply = Reply::full(small.status, small.body.clone())
        .with_value(header::CONTENT_TYPE, ct)
        .cache(cache);
    let reply = relay_headers(
        reply,
        small,
        &[header::WWW_AUTHENTICATE, header::RETRY_AFTER],
    );
    if cache == CacheStatus::Stale {
        stale_relayed(reply, small)
    } else {
        reply
    }
}

fn relay_headers(mut reply: Reply, small: &Small, names: &[header::HeaderName]) -> Reply {
    for name in names {
        if let Some(v) = small.headers.get(name) {
            reply = reply.with_value(name.clone(), v.clone());
        }
    }
    reply
}

/// The upstream's `Age` of an answer relayed as it came (this tier adds none of its own:
/// the answer was not kept here).
pub(super) fn upstream_age(reply: Reply, small: &Small) -> Reply {
    relay_headers(reply, small, &[header::AGE])
}

/// The marks of a stale answer relayed from a tfmirror tier: its `Age` and `Warning: 110`.
fn stale_relayed(reply: Reply, small: &Small) -> Reply {
    let reply = upstream_age(reply, small);
    if small.headers.contains_key(header::WARNING) {
        relay_headers(reply, small, &[header::WARNING])
    } else {
        reply.with(header::WARNING, STALE_WARNING)
    }
}

/// GitLab's refusal of this caller, as GitLab gave it, replayed without asking GitLab: while
/// it fails, or cannot be asked. Marked `refused`, so that a tier in front reads it as
/// GitLab's own refusal (it is one) and never as an outage.
pub(super) fn refused(r: &Refusal) -> Reply {
    let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::FORBIDDEN);
    let reply = Reply::full(status, r.body.clone())
        .with(header::CONTENT_TYPE, JSON)
        .cache(CacheStatus::Hit)
        .with(REFUSAL_MARKER, "refused");
    match &r.www_authenticate {
        Some(w) => reply.with_text(header::WWW_AUTHENTICATE, w),
        None => reply,
    }
}

/// A listing body from the cache, `age` seconds old; `stale` when GitLab failed: the answer
/// of every cached listing hit.
pub fn json(cache: CacheStatus, age: u64, stale: bool, body: Bytes) -> Reply {
    Reply::cached_json(cache, age, stale, body)
}

/// The head of a tarball answer and its body; `len` when it is known (see
/// [`respond::framing`] for the framing of an unknown one).
pub(super) fn tarball(cache: CacheStatus, len: Option<u64>, chunks: BodyStream) -> Reply {
    Reply::stream(len, chunks)
        .with(header::CONTENT_TYPE, OCTETS)
        .cache(cache)
}

/// A committed tarball from the store (see `cache::artifact`).
pub(super) fn tarball_cached(cache: CacheStatus, artifact: Artifact) -> Reply {
    Reply::ok(artifact.into_body())
        .with(header::CONTENT_TYPE, OCTETS)
        .cache(cache)
}

/// GitLab's recent refusal (or "not found") of this caller, replayed.
pub(super) fn negative(neg: &Negative) -> Reply {
    let reply = Reply::full(neg.status, neg.body.clone())
        .with(header::CONTENT_TYPE, JSON)
        .cache(CacheStatus::Hit);
    match &neg.www_authenticate {
        Some(w) => reply.with_value(header::WWW_AUTHENTICATE, w.clone()),
        None => reply,
    }
}

/// A 204 whose `X-Terraform-Get` points at tfmirror (with `Warning: 110` when STALE).
pub(super) fn download(cache: CacheStatus, get: &str) -> Reply {
    Reply::terraform_get(cache, get)
}

/// Marks an answer tfmirror gave without GitLab's word on it. `upstream-unavailable`: GitLab
/// failed and nothing may be served; a tfmirror tier in front treats it as a failure of its
/// upstream, never as GitLab's refusal (it must not revoke on it). `refused`: GitLab's own
/// refusal of this caller, replayed ([`refused`]).
pub const REFUSAL_MARKER: http::HeaderName = http::HeaderName::from_static("x-tfmirror-refusal");

/// GitLab failed and nothing may be served: a 503 that says why where the user sees it.
/// Terraform prints only the status line of a failed registry call, so the reason phrase
/// carries the explanation; the JSON `message` says the same for curl and the logs. 503 is
/// retried once by Terraform, which gives a GitLab that just came back a second chance.
pub(super) fn unavailable(module: &ModuleId, why: Why, failure: Failure) -> Reply {
    let reason = unavailable_reason(module, why, failure);
    let hint = match why {
        Why::UnknownDenied => "tfmirror has no earlier answer of GitLab for this credential and this module, and offline.unknown_identity does not let new identities read the cache; retry once GitLab is back",
        Why::RefusedBefore => "GitLab refused this credential for this module; that stands until GitLab says otherwise",
        Why::NothingCached => "nothing recent enough is cached for this request; retry once GitLab is back",
        Why::NotReader => "this module came in a signed bundle, and offline.imported_readers does not admit this credential (an operator adds readers with `tfmirror bundle reader add`)",
    };
    let body = serde_json::json!({ "message": format!("503 {reason}"), "error": hint }).to_string();
    Reply::full(StatusCode::SERVICE_UNAVAILABLE, body)
        .reason(&reason)
        .with(header::CONTENT_TYPE, JSON)
        .cache(CacheStatus::Miss)
        .with(REFUSAL_MARKER, "upstream-unavailable")
}

/// The reason phrase of [`unavailable`]: printable ASCII only (module paths are
/// validated route segments, but a reason phrase must never break the status line).
pub(super) fn unavailable_reason(module: &ModuleId, why: Why, failure: Failure) -> String {
    let what = match failure {
        Failure::Unreachable | Failure::BreakerOpen => "GitLab unreachable".to_string(),
        Failure::Deadline => "GitLab did not answer in time".to_string(),
        Failure::Status(s) => format!("GitLab failed with {}", s.as_u16()),
        Failure::Offline => "tfmirror is in offline mode".to_string(),
        Failure::Invalid(s) => format!("GitLab's answer was unusable ({})", s.as_u16()),
    };
    let module: String = module
        .to_string()
        .chars()
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect();
    match why {
        Why::UnknownDenied => format!("{what}; no cached access to {module} for this credential"),
        Why::RefusedBefore => format!("{what}; GitLab refused this credential for {module}"),
        Why::NothingCached => format!("{what}; {module} is not cached for this credential"),
        Why::NotReader => {
            format!("{what}; {module} is imported and this credential is not one of its readers")
        }
    }
}

/// This caller's own `Retry-After` from GitLab still runs: answer 429 without asking GitLab.
pub(super) fn held_back(module: &ModuleId, wait: std::time::Duration) -> Reply {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    let body = serde_json::json!({
        "message": "429 Too Many Requests",
        "error": format!("GitLab rate-limited this credential for {module}; retry after {secs} s"),
    })
    .to_string();
    Reply::full(StatusCode::TOO_MANY_REQUESTS, body)
        .with(header::CONTENT_TYPE, JSON)
        .cache(CacheStatus::Miss)
        .with_value(header::RETRY_AFTER, HeaderValue::from(secs.max(1)))
}
