//! Fetch a download from the upstream on a client's behalf and stream it back.
//!
//! Used for `/file` and for project-route tarballs: GitLab may answer those with a 302 to
//! object storage. tfmirror follows such redirects itself (by hand, so it decides what each
//! hop receives) and streams the bytes, so clients never see a presigned URL.
//!
//! Secrets travel in these URLs (GitLab's JWT, presigned signatures). Nothing here logs a URL,
//! and `reqwest` errors are stripped of theirs before they go anywhere.

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, Method, StatusCode};
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::{Error, ErrorType, Result};
use url::Url;

use crate::respond;
use crate::upstream::Upstream;

const MAX_REDIRECTS: usize = 5;

/// Response headers worth relaying from a download; everything else (object storage's
/// `x-amz-*`, cookies, server banners) stays behind.
const RELAYED: [HeaderName; 6] = [
    header::CONTENT_TYPE,
    header::CONTENT_LENGTH,
    header::CONTENT_DISPOSITION,
    header::ETAG,
    header::LAST_MODIFIED,
    header::WWW_AUTHENTICATE,
];

/// What the fetch produced, for the access log.
#[derive(Debug, Default, Clone, Copy)]
pub struct Outcome {
    pub upstream_status: Option<u16>,
}

/// An upstream failure, as a pingora error that carries no URL.
fn upstream_error(e: reqwest::Error) -> Box<Error> {
    let etype = if e.is_timeout() {
        ErrorType::ReadTimedout
    } else if e.is_connect() {
        ErrorType::ConnectError
    } else {
        ErrorType::ReadError
    };
    Error::because(etype, "upstream download failed", e.without_url()).into_up()
}

/// Fetch `path_and_query` (a tfmirror path) from the upstream and stream it to `session`.
/// `auth` is forwarded to the upstream's own origin only, never to a redirect target.
pub async fn relay(
    session: &mut Session,
    upstream: &Upstream,
    path_and_query: &str,
    auth: Option<&http::HeaderValue>,
) -> Result<Outcome> {
    let head = session.req_header().method == Method::HEAD;
    let mut outcome = Outcome::default();
    let first = Url::parse(&upstream.url_for(path_and_query))
        .map_err(|_| Error::explain(ErrorType::InternalError, "bad upstream URL"))?;
    let origin = first.origin();
    let mut url = first;
    let mut hops = 0;

    let resp = loop {
        let on_upstream = url.origin() == origin;
        let method = if head && on_upstream {
            Method::HEAD
        } else if head {
            // A presigned URL is signed for GET; a HEAD would be refused. The client only
            // needs to learn that the download exists, which the redirect already says.
            return write_head_ok(session, outcome).await;
        } else {
            Method::GET
        };
        let mut req = upstream.http.request(method, url.clone());
        if let (true, Some(a)) = (on_upstream, auth) {
            req = req.header(header::AUTHORIZATION, a.clone());
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                let err = upstream_error(e);
                let status = if err.etype() == &ErrorType::ReadTimedout {
                    StatusCode::GATEWAY_TIMEOUT
                } else {
                    StatusCode::BAD_GATEWAY
                };
                tracing::warn!(error = %err, "upstream download failed before any byte was sent");
                respond::error(session, status).await?;
                return Ok(outcome);
            }
        };
        if on_upstream {
            outcome.upstream_status = Some(resp.status().as_u16());
        }
        if resp.status().is_redirection() {
            let next = resp
                .headers()
                .get(header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .and_then(|l| url.join(l).ok());
            match next {
                Some(next) if hops < MAX_REDIRECTS && matches!(next.scheme(), "http" | "https") => {
                    hops += 1;
                    url = next;
                    continue;
                }
                _ => {
                    respond::error(session, StatusCode::BAD_GATEWAY).await?;
                    return Ok(outcome);
                }
            }
        }
        if !on_upstream && !resp.status().is_success() {
            // Object storage's error bodies can describe the presigned request: never relay.
            tracing::warn!(
                status = resp.status().as_u16(),
                "object storage refused a download"
            );
            respond::error(session, StatusCode::BAD_GATEWAY).await?;
            return Ok(outcome);
        }
        break resp;
    };

    let mut h = ResponseHeader::build(resp.status(), Some(RELAYED.len()))?;
    copy_headers(resp.headers(), &mut h)?;
    session.write_response_header(Box::new(h), head).await?;
    if head {
        return Ok(outcome);
    }
    let mut resp = resp;
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => session.write_response_body(Some(chunk), false).await?,
            Ok(None) => break,
            // Headers are gone already: failing the request drops the connection, so the
            // client sees a short body instead of a complete-looking wrong one.
            Err(e) => return Err(upstream_error(e)),
        }
    }
    session
        .write_response_body(Some(Bytes::new()), true)
        .await?;
    Ok(outcome)
}

fn copy_headers(from: &HeaderMap, to: &mut ResponseHeader) -> Result<()> {
    for name in RELAYED {
        for v in from.get_all(&name) {
            to.append_header(name.clone(), v.clone())?;
        }
    }
    Ok(())
}

async fn write_head_ok(session: &mut Session, outcome: Outcome) -> Result<Outcome> {
    let mut h = ResponseHeader::build(StatusCode::OK, Some(1))?;
    h.insert_header(header::CONTENT_TYPE, "application/octet-stream")?;
    session.write_response_header(Box::new(h), true).await?;
    Ok(outcome)
}
