//! Writing registry answers on the downstream session.

use bytes::Bytes;
use http::{header, HeaderValue, StatusCode};
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::Result;

use super::ask::Failure;
use super::{JSON, STALE_WARNING};
use crate::access::policy::Why;
use crate::access::Negative;
use crate::fetch::Small;
use crate::respond::{self, CacheStatus, HeaderValueLike as V};
use crate::routes::ModuleId;

/// Relay an upstream answer read whole (refusals, errors, listings).
pub(super) async fn write_answer(
    session: &mut Session,
    small: &Small,
    cache: CacheStatus,
) -> Result<()> {
    let ct = small
        .headers
        .get(header::CONTENT_TYPE)
        .cloned()
        .unwrap_or(HeaderValue::from_static(JSON));
    let mut headers = vec![
        (header::CONTENT_TYPE, V::Value(ct)),
        (respond::CACHE_STATUS, V::Static(cache.as_str())),
    ];
    for name in [header::WWW_AUTHENTICATE, header::RETRY_AFTER] {
        if let Some(v) = small.headers.get(&name) {
            headers.push((name, V::Value(v.clone())));
        }
    }
    respond::full(session, small.status, &headers, small.body.clone()).await
}

pub(super) async fn write_json(
    session: &mut Session,
    cache: CacheStatus,
    age: u64,
    stale: bool,
    body: Bytes,
) -> Result<()> {
    let mut headers = vec![
        (header::CONTENT_TYPE, V::Static(JSON)),
        (respond::CACHE_STATUS, V::Static(cache.as_str())),
        (header::AGE, V::Owned(age.to_string())),
    ];
    if stale {
        headers.push((header::WARNING, V::Static(STALE_WARNING)));
    }
    respond::full(session, StatusCode::OK, &headers, body).await
}

/// The head of a tarball answer; the length when it is known (see [`respond::tarball_head`]
/// for the framing of an unknown one).
pub(super) async fn write_tarball_head(
    session: &mut Session,
    cache: CacheStatus,
    len: Option<u64>,
    end: bool,
) -> Result<()> {
    respond::tarball_head(session, cache, len, end).await
}

pub(super) async fn write_negative(session: &mut Session, neg: &Negative) -> Result<()> {
    let mut headers = vec![
        (header::CONTENT_TYPE, V::Static(JSON)),
        (respond::CACHE_STATUS, V::Static("HIT")),
    ];
    if let Some(w) = &neg.www_authenticate {
        headers.push((header::WWW_AUTHENTICATE, V::Value(w.clone())));
    }
    respond::full(session, neg.status, &headers, neg.body.clone()).await
}

pub(super) async fn write_download(
    session: &mut Session,
    cache: CacheStatus,
    get: String,
) -> Result<()> {
    let headers = [
        (
            http::HeaderName::from_static("x-terraform-get"),
            V::Owned(get),
        ),
        (respond::CACHE_STATUS, V::Static(cache.as_str())),
    ];
    respond::full(session, StatusCode::NO_CONTENT, &headers, Bytes::new()).await
}

/// The caller's credential (`Authorization`), as GitLab's registry routes take it.
pub(super) fn authorization(session: &Session) -> Option<HeaderValue> {
    session
        .req_header()
        .headers
        .get(header::AUTHORIZATION)
        .cloned()
}

/// Marks an answer tfmirror gave because GitLab failed: a tfmirror tier in front treats it as
/// a failure of its upstream, never as GitLab's refusal (it must not revoke on it).
pub const REFUSAL_MARKER: http::HeaderName = http::HeaderName::from_static("x-tfmirror-refusal");

/// GitLab failed and nothing may be served: a 503 that says why where the user sees it.
/// Terraform prints only the status line of a failed registry call, so the reason phrase
/// carries the explanation; the JSON `message` says the same for curl and the logs. 503 is
/// retried once by Terraform, which gives a GitLab that just came back a second chance.
pub(super) async fn write_unavailable(
    session: &mut Session,
    module: &ModuleId,
    why: Why,
    failure: Failure,
) -> Result<()> {
    let reason = unavailable_reason(module, why, failure);
    let hint = match why {
        Why::UnknownDenied => "tfmirror has no earlier answer of GitLab for this credential and this module, and offline.unknown_identity does not let new identities read the cache; retry once GitLab is back",
        Why::RefusedBefore => "GitLab refused this credential for this module; that stands until GitLab says otherwise",
        Why::NothingCached => "nothing recent enough is cached for this request; retry once GitLab is back",
    };
    let body = serde_json::json!({ "message": format!("503 {reason}"), "error": hint }).to_string();
    let mut h = ResponseHeader::build(StatusCode::SERVICE_UNAVAILABLE, Some(5))?;
    h.set_reason_phrase(Some(&reason))?;
    h.insert_header(header::CONTENT_TYPE, JSON)?;
    h.insert_header(header::CONTENT_LENGTH, body.len())?;
    h.insert_header(respond::CACHE_STATUS, CacheStatus::Miss.as_str())?;
    h.insert_header(REFUSAL_MARKER, "upstream-unavailable")?;
    let head_only = session.req_header().method == http::Method::HEAD;
    session
        .write_response_header(Box::new(h), head_only)
        .await?;
    if !head_only {
        session
            .write_response_body(Some(Bytes::from(body)), true)
            .await?;
    }
    Ok(())
}

/// The reason phrase of [`write_unavailable`]: printable ASCII only (module paths are
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
    }
}

/// This caller's own `Retry-After` from GitLab still runs: answer 429 without asking GitLab.
pub(super) async fn write_held_back(
    session: &mut Session,
    module: &ModuleId,
    wait: std::time::Duration,
) -> Result<()> {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    let body = serde_json::json!({
        "message": "429 Too Many Requests",
        "error": format!("GitLab rate-limited this credential for {module}; retry after {secs} s"),
    })
    .to_string();
    let headers = [
        (header::CONTENT_TYPE, V::Static(JSON)),
        (respond::CACHE_STATUS, V::Static(CacheStatus::Miss.as_str())),
        (header::RETRY_AFTER, V::Owned(secs.max(1).to_string())),
    ];
    respond::full(
        session,
        StatusCode::TOO_MANY_REQUESTS,
        &headers,
        Bytes::from(body),
    )
    .await
}
