//! Responses tfmirror writes itself, in GitLab's shapes.

use bytes::Bytes;
use http::StatusCode;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::Result;

/// Write a complete JSON response. `HEAD` gets the headers only.
pub async fn json(session: &mut Session, status: StatusCode, body: String) -> Result<()> {
    json_with(session, status, body, None).await
}

async fn json_with(
    session: &mut Session,
    status: StatusCode,
    body: String,
    cache: Option<CacheStatus>,
) -> Result<()> {
    let mut h = ResponseHeader::build(status, Some(5))?;
    if let Some(c) = cache {
        h.insert_header(CACHE_STATUS, c.as_str())?;
    }
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

/// A GitLab-shaped error for a registry route, saying what the cache did (every registry
/// answer carries `X-Cache-Status`, tfmirror's own refusals and 502s included).
pub async fn registry_error(
    session: &mut Session,
    status: StatusCode,
    cache: CacheStatus,
) -> Result<()> {
    json_with(session, status, message_body(status), Some(cache)).await
}

/// How a response body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// `Content-Length`.
    Length(u64),
    /// HTTP/1.1 `Transfer-Encoding: chunked`: a cut leaves no terminal chunk, so the client
    /// sees an error, never a short body that looks whole.
    Chunked,
    /// HTTP/2 (and later) frames: END_STREAM marks the end, a reset is an error.
    Frames,
    /// HTTP/1.0 cannot take chunked: the body ends when the connection closes, so the
    /// connection is not kept alive, and the case is counted (a cut looks like the end there).
    Close,
}

/// The framing of a body of length `len` (None: unknown until it ends) for a request of
/// `version`. Pingora frames by the headers it is given and falls back to close-delimited
/// (while still announcing keep-alive) when there is neither length nor chunking.
pub fn framing(version: http::Version, len: Option<u64>) -> Framing {
    match (len, version) {
        (Some(n), _) => Framing::Length(n),
        (None, v) if v >= http::Version::HTTP_2 => Framing::Frames,
        (None, http::Version::HTTP_11) => Framing::Chunked,
        (None, _) => Framing::Close,
    }
}

/// Write the head of a tarball answer: status 200, `X-Cache-Status`, and framing that cannot
/// make a cut body look whole. `len` is the body's length when known; `head_only` for HEAD
/// (then an unknown length is simply not announced).
pub async fn tarball_head(
    session: &mut Session,
    cache: CacheStatus,
    len: Option<u64>,
    head_only: bool,
) -> Result<()> {
    stream_head(session, "application/octet-stream", cache, len, head_only).await
}

/// Write the head of a streamed answer of `content_type` (a tarball, a provider package):
/// as [`tarball_head`].
pub async fn stream_head(
    session: &mut Session,
    content_type: &'static str,
    cache: CacheStatus,
    len: Option<u64>,
    head_only: bool,
) -> Result<()> {
    let mut h = ResponseHeader::build(StatusCode::OK, Some(4))?;
    h.insert_header(http::header::CONTENT_TYPE, content_type)?;
    h.insert_header(CACHE_STATUS, cache.as_str())?;
    match framing(session.req_header().version, len) {
        Framing::Length(n) => h.insert_header(http::header::CONTENT_LENGTH, n)?,
        Framing::Frames => {}
        Framing::Chunked if !head_only => {
            h.insert_header(http::header::TRANSFER_ENCODING, "chunked")?
        }
        Framing::Chunked => {}
        Framing::Close => {
            // Say `Connection: close` instead of keep-alive, and close after the body.
            session.set_keepalive(None);
            if !head_only {
                crate::metrics::UNFRAMED_RESPONSES.inc();
            }
        }
    }
    session.write_response_header(Box::new(h), head_only).await
}

/// Write a streamed body after its head (see [`stream_head`]), then its end. An error item
/// is turned into the request's error by `cut` and returned without ending the body:
/// pingora then drops the connection, which the framing chosen by [`stream_head`] shows the
/// client as an error (fewer bytes than announced, no terminal chunk, a reset stream). Only
/// an HTTP/1.0 client of a body of unknown length cannot tell ([`Framing::Close`], counted).
pub async fn stream_body<E>(
    session: &mut Session,
    mut body: impl futures::Stream<Item = std::result::Result<Bytes, E>> + Unpin,
    cut: impl FnOnce(E) -> Box<pingora::Error>,
) -> Result<()> {
    use futures::StreamExt;
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(c) => session.write_response_body(Some(c), false).await?,
            Err(e) => return Err(cut(e)),
        }
    }
    session.write_response_body(Some(Bytes::new()), true).await
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

#[cfg(test)]
mod tests {
    use super::*;
    use http::Version;

    #[test]
    fn framing_never_leaves_the_end_to_a_close_on_http_1_1() {
        let table = [
            (Version::HTTP_11, Some(5), Framing::Length(5)),
            (Version::HTTP_10, Some(5), Framing::Length(5)),
            (Version::HTTP_2, Some(0), Framing::Length(0)),
            (Version::HTTP_11, None, Framing::Chunked),
            (Version::HTTP_2, None, Framing::Frames),
            (Version::HTTP_10, None, Framing::Close),
            (Version::HTTP_09, None, Framing::Close),
        ];
        for (version, len, want) in table {
            assert_eq!(framing(version, len), want, "{version:?} {len:?}");
        }
    }
}
