//! Requests tfmirror itself sends to the upstream, outside pingora's proxy path.
//!
//! - [`registry`]: a small registry answer (listing, metadata, download URL), read whole.
//! - [`open`]: a download. GitLab may answer `/file` with a 302 to object storage; tfmirror
//!   follows such redirects itself, by hand, so it decides what each hop receives (credentials
//!   go to the upstream's origin only) and clients never see a presigned URL.
//!
//! - [`Fetcher`]: the two as a trait, the one seam between the registry's decisions and the
//!   network: [`Upstream`] is the real one, registry unit tests put a stub there.
//!
//! Secrets travel in these URLs (GitLab's JWT, presigned signatures). Nothing here logs a URL,
//! and `reqwest` errors are stripped of theirs before they go anywhere.

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, StatusCode};
use pingora::{Error, ErrorType, Result};
use url::Url;

use crate::upstream::Upstream;

const MAX_REDIRECTS: usize = 5;

/// How the registry reaches GitLab. Implemented by [`Upstream`]; a test stub answers from a
/// script, so decisions and coalescing are tested without a process or a socket.
#[async_trait::async_trait]
pub trait Fetcher: Send + Sync + 'static {
    /// GET a registry path with the caller's credential, read whole ([`registry`]).
    async fn registry(&self, path_and_query: &str, auth: Option<&HeaderValue>) -> Result<Small>;
    /// Follow a download to its bytes ([`open`]).
    async fn open(
        &self,
        path_and_query: &str,
        auth: Option<&HeaderValue>,
    ) -> Result<reqwest::Response>;
    /// Any HTTP answer of the upstream within `wait`, for the breaker's background probe: its
    /// status and headers, `None` when nothing answered in time.
    async fn probe(&self, wait: std::time::Duration) -> Option<(StatusCode, HeaderMap)>;
}

#[async_trait::async_trait]
impl Fetcher for Upstream {
    async fn registry(&self, path_and_query: &str, auth: Option<&HeaderValue>) -> Result<Small> {
        registry(self, path_and_query, auth).await
    }

    async fn open(
        &self,
        path_and_query: &str,
        auth: Option<&HeaderValue>,
    ) -> Result<reqwest::Response> {
        open(self, path_and_query, auth).await
    }

    async fn probe(&self, wait: std::time::Duration) -> Option<(StatusCode, HeaderMap)> {
        let resp = self
            .http
            .get(self.url_for("/"))
            .timeout(wait)
            .send()
            .await
            .ok()?;
        Some((resp.status(), resp.headers().clone()))
    }
}

/// An upstream failure, as a pingora error that carries no URL.
pub fn upstream_error(e: reqwest::Error) -> Box<Error> {
    let etype = if e.is_timeout() {
        ErrorType::ReadTimedout
    } else if e.is_connect() {
        ErrorType::ConnectError
    } else {
        ErrorType::ReadError
    };
    // The useful part (refused, timed out, unknown certificate issuer) is deep in the cause
    // chain; the URL, which may carry a token, is stripped at the top and appears nowhere
    // below it.
    let e = e.without_url();
    let mut why = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        why.push_str(": ");
        why.push_str(&cause.to_string());
        source = cause.source();
    }
    Error::explain(etype, format!("upstream request failed: {why}")).into_up()
}

/// The status a client should see for a transport failure.
pub fn failure_status(e: &Error) -> StatusCode {
    match e.etype() {
        ErrorType::HTTPStatus(code) => {
            StatusCode::from_u16(*code).unwrap_or(StatusCode::BAD_GATEWAY)
        }
        ErrorType::ReadTimedout | ErrorType::ConnectTimedout => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::BAD_GATEWAY,
    }
}

/// A registry answer read whole.
#[derive(Debug, Clone)]
pub struct Small {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// When its request was sent, unix milliseconds: what the answer says was true at some
    /// point after this, never before (see `access::grants` on late answers). Stamped by the
    /// registry's `ask`; 0 from the fetcher itself.
    pub sent_ms: u64,
}

impl Small {
    /// Is this a stale answer a tfmirror tier gave while GitLab failed (`X-Cache-Status:
    /// STALE`, or RFC 7234's `Warning: 110`)? It stands in for GitLab's answer but proves
    /// nothing about access now: relayed as stale, never learned as a grant.
    pub fn is_stale(&self) -> bool {
        let stale_status = self
            .headers
            .get("x-cache-status")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"STALE"));
        let warning_110 = self
            .headers
            .get_all(header::WARNING)
            .iter()
            .any(|w| w.as_bytes().starts_with(b"110"));
        stale_status || warning_110
    }
}

/// GET a registry path with the caller's credential. Redirects are returned, not followed.
pub async fn registry(
    upstream: &Upstream,
    path_and_query: &str,
    auth: Option<&HeaderValue>,
) -> Result<Small> {
    let mut req = upstream
        .http
        .get(upstream.url_for(path_and_query))
        .timeout(upstream.registry_timeout());
    if let Some(a) = auth {
        req = req.header(header::AUTHORIZATION, a.clone());
    }
    let mut resp = req.send().await.map_err(upstream_error)?;
    let status = resp.status();
    let headers = std::mem::take(resp.headers_mut());
    let limit = upstream.max_listing();
    // A declared length over the limit is refused before a byte is read; an undeclared one
    // (chunked) is cut off as soon as it passes the limit.
    let too_large = || {
        Error::e_explain(
            ErrorType::HTTPStatus(502),
            "registry answer larger than limits.max_listing_size",
        )
    };
    if resp.content_length().is_some_and(|n| n > limit as u64) {
        return too_large();
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(upstream_error)? {
        if body.len() + chunk.len() > limit {
            return too_large();
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Small {
        status,
        headers,
        body: Bytes::from(body),
        sent_ms: 0,
    })
}

/// Follow a download from the upstream to its bytes. `auth` goes to the upstream's origin
/// only, never to a redirect target. Object storage's refusals become a 502: its error bodies
/// can describe the presigned request.
pub async fn open(
    upstream: &Upstream,
    path_and_query: &str,
    auth: Option<&HeaderValue>,
) -> Result<reqwest::Response> {
    let first = Url::parse(&upstream.url_for(path_and_query))
        .map_err(|_| Error::explain(ErrorType::InternalError, "bad upstream URL"))?;
    let origin = first.origin();
    let mut url = first;
    for _ in 0..=MAX_REDIRECTS {
        let on_upstream = url.origin() == origin;
        let mut req = upstream.http.get(url.clone());
        if let (true, Some(a)) = (on_upstream, auth) {
            req = req.header(header::AUTHORIZATION, a.clone());
        }
        // The head must come within `timeouts.read`, like any registry answer; only the body
        // gets the per-read `timeouts.transfer`. Without this a black-holed GitLab would hold
        // the fill, and every request that joins it, for the whole transfer timeout.
        let resp = tokio::time::timeout(upstream.registry_timeout(), req.send())
            .await
            .map_err(|_| {
                Error::explain(
                    ErrorType::ReadTimedout,
                    "no response head within timeouts.read",
                )
            })?
            .map_err(upstream_error)?;
        if resp.status().is_redirection() {
            url = next_hop(&url, resp.headers())?;
            continue;
        }
        if !on_upstream && !resp.status().is_success() {
            tracing::warn!(
                status = resp.status().as_u16(),
                "object storage refused a download"
            );
            return Error::e_explain(
                ErrorType::HTTPStatus(502),
                "object storage refused the download",
            );
        }
        return Ok(resp);
    }
    Error::e_explain(ErrorType::HTTPStatus(502), "too many redirects")
}

/// Where a redirect from `url` leads. Refused: no usable `Location`, a scheme other than
/// http(s), and a step down from https to plain http (a tarball over plain http travels
/// without integrity and is then cached for every caller; the provider side fetches nothing
/// but https either). Nothing here names a URL: they carry presigned signatures.
fn next_hop(url: &Url, headers: &HeaderMap) -> Result<Url> {
    let next = headers
        .get(header::LOCATION)
        .and_then(|l| l.to_str().ok())
        .and_then(|l| url.join(l).ok())
        .filter(|u| matches!(u.scheme(), "http" | "https"));
    match next {
        Some(next) if url.scheme() == "https" && next.scheme() != "https" => {
            tracing::warn!("refused a download redirect from https to plain http");
            Error::e_explain(
                ErrorType::HTTPStatus(502),
                "the upstream redirected a download from https to plain http: refused",
            )
        }
        Some(next) => Ok(next),
        None => Error::e_explain(
            ErrorType::HTTPStatus(502),
            "redirect without a usable Location",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hop(from: &str, location: &str) -> std::result::Result<String, StatusCode> {
        let mut headers = HeaderMap::new();
        headers.insert(header::LOCATION, HeaderValue::from_str(location).unwrap());
        next_hop(&Url::parse(from).unwrap(), &headers)
            .map(|u| u.to_string())
            .map_err(|e| failure_status(&e))
    }

    /// Issue 26, item 15: a download redirected from https to plain http was followed.
    #[test]
    fn a_redirect_never_steps_down_from_https_to_http() {
        let refused = Err(StatusCode::BAD_GATEWAY);
        assert_eq!(
            hop(
                "https://gitlab.example/f",
                "http://s3.example/b?X-Amz-Signature=s"
            ),
            refused
        );
        assert_eq!(
            hop("https://gitlab.example/f", "ftp://s3.example/b"),
            refused
        );
        assert_eq!(
            hop("https://gitlab.example/f", "https://s3.example/b").as_deref(),
            Ok("https://s3.example/b")
        );
        // A relative Location stays on the scheme it came from.
        assert_eq!(
            hop("https://gitlab.example/f", "/g").as_deref(),
            Ok("https://gitlab.example/g")
        );
        // A plain-http GitLab may redirect anywhere http(s): nothing is lost that was had.
        assert_eq!(
            hop("http://gitlab.internal/f", "http://minio.internal/b").as_deref(),
            Ok("http://minio.internal/b")
        );
        assert_eq!(
            hop("http://gitlab.internal/f", "https://s3.example/b").as_deref(),
            Ok("https://s3.example/b")
        );
    }
}
