//! Responses tfmirror writes itself, in GitLab's shapes.

use bytes::Bytes;
use http::StatusCode;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::Result;

/// Write a complete JSON response. `HEAD` gets the headers only.
pub async fn json(session: &mut Session, status: StatusCode, body: String) -> Result<()> {
    let mut h = ResponseHeader::build(status, Some(4))?;
    h.insert_header(http::header::CONTENT_TYPE, "application/json")?;
    h.insert_header(http::header::CONTENT_LENGTH, body.len())?;
    h.insert_header(http::header::CACHE_CONTROL, "no-store")?;
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

/// GitLab's error shape for statuses it reports with `message`: `{"message":"502 Bad Gateway"}`.
pub fn message_body(status: StatusCode) -> String {
    let text = format!(
        "{} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("Error")
    );
    serde_json::json!({ "message": text }).to_string()
}

/// A GitLab-shaped error response for `status`.
pub async fn error(session: &mut Session, status: StatusCode) -> Result<()> {
    json(session, status, message_body(status)).await
}

/// The cache status header, like nginx's `$upstream_cache_status`.
pub const CACHE_STATUS: http::HeaderName = http::HeaderName::from_static("x-cache-status");

/// What the cache did for a registry response (the value of `X-Cache-Status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    /// Served from the cache; the upstream was not asked.
    Hit,
    /// Not in the cache (or not for this caller): fetched from the upstream.
    Miss,
    /// The caller's grant had to be re-checked upstream; the body was unchanged.
    Revalidated,
    /// Served from the cache while a background refresh runs (stale-while-revalidate).
    Updating,
    /// Served from the cache because the upstream failed (stale-if-error).
    Stale,
    /// Not cacheable (uploads, project routes, redirects): passed through.
    Bypass,
}

impl CacheStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "HIT",
            CacheStatus::Miss => "MISS",
            CacheStatus::Revalidated => "REVALIDATED",
            CacheStatus::Updating => "UPDATING",
            CacheStatus::Stale => "STALE",
            CacheStatus::Bypass => "BYPASS",
        }
    }
}

/// Write a complete response: status, extra headers, body (omitted for HEAD).
pub async fn full(
    session: &mut Session,
    status: StatusCode,
    headers: &[(http::HeaderName, HeaderValueLike)],
    body: Bytes,
) -> Result<()> {
    let mut h = ResponseHeader::build(status, Some(headers.len() + 2))?;
    for (name, value) in headers {
        h.append_header(name.clone(), value.as_header()?)?;
    }
    if status != StatusCode::NO_CONTENT && status != StatusCode::NOT_MODIFIED {
        h.insert_header(http::header::CONTENT_LENGTH, body.len())?;
    }
    let head_only = session.req_header().method == http::Method::HEAD || body.is_empty();
    session
        .write_response_header(Box::new(h), head_only)
        .await?;
    if !head_only {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(())
}

/// A header value given as text or as a ready value.
pub enum HeaderValueLike {
    Static(&'static str),
    Owned(String),
    Value(http::HeaderValue),
}

impl HeaderValueLike {
    fn as_header(&self) -> Result<http::HeaderValue> {
        let v = match self {
            HeaderValueLike::Static(s) => http::HeaderValue::from_static(s),
            HeaderValueLike::Owned(s) => http::HeaderValue::from_str(s).map_err(|_| {
                pingora::Error::explain(pingora::ErrorType::InvalidHTTPHeader, "bad header value")
            })?,
            HeaderValueLike::Value(v) => v.clone(),
        };
        Ok(v)
    }
}
