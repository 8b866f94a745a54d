//! Writing registry answers on the downstream session.

use bytes::Bytes;
use http::{header, HeaderValue, StatusCode};
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::Result;

use super::{JSON, OCTETS, STALE_WARNING};
use crate::access::Negative;
use crate::fetch::Small;
use crate::respond::{self, CacheStatus, HeaderValueLike as V};

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

/// The head of a tarball answer; the length when it is known.
pub(super) async fn write_tarball_head(
    session: &mut Session,
    cache: CacheStatus,
    len: Option<u64>,
    end: bool,
) -> Result<()> {
    let mut h = ResponseHeader::build(StatusCode::OK, Some(3))?;
    h.insert_header(header::CONTENT_TYPE, OCTETS)?;
    h.insert_header(respond::CACHE_STATUS, cache.as_str())?;
    if let Some(len) = len {
        h.insert_header(header::CONTENT_LENGTH, len)?;
    }
    session.write_response_header(Box::new(h), end).await
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
