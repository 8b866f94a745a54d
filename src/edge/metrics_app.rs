//! `/-/metrics` on its own listener (`metrics_listen`), for scrapers kept off the proxy port.

use std::sync::Arc;

use crate::cache::Cache;
use crate::metrics::render;
use crate::upstream::health::Health;

/// `/-/metrics` on its own listener (`metrics_listen`), for scrapers kept off the proxy port.
pub struct MetricsApp {
    pub cache: Arc<Cache>,
    pub health: Arc<Health>,
}

#[async_trait::async_trait]
impl pingora::apps::http_app::ServeHttp for MetricsApp {
    async fn response(
        &self,
        session: &mut pingora::protocols::http::ServerSession,
    ) -> http::Response<Vec<u8>> {
        let (status, body) = if session.req_header().uri.path() == "/-/metrics" {
            super::gauges::update(&self.cache, &self.health);
            (http::StatusCode::OK, render().into_bytes())
        } else {
            (
                http::StatusCode::NOT_FOUND,
                br#"{"message":"404 Not Found"}"#.to_vec(),
            )
        };
        http::Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")
            .header(http::header::CONTENT_LENGTH, body.len())
            .body(body)
            .expect("static response")
    }
}
