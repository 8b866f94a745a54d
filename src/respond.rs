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
