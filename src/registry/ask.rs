//! Asking GitLab: the breaker, the soft timeout, and one shared request per (identity, path).

use std::sync::Arc;

use futures::FutureExt;
use http::{HeaderValue, StatusCode};
use pingora::proxy::Session;
use pingora::{ErrorType, Result};

use super::reply::write_answer;
use super::{status_class, Asked, Outcome, Registry, SharedFetch};
use crate::fetch::{self, Small};
use crate::identity::Identity;
use crate::metrics;
use crate::respond::{self, CacheStatus};

impl Registry {
    /// Ask the upstream, unless it is known to be down. With a stale answer at hand, wait at
    /// most `offline.soft_timeout`: the request keeps going in the background, but the client
    /// gets the stale answer now.
    pub(super) async fn ask(
        &self,
        identity: Identity,
        path: &str,
        cred: Option<HeaderValue>,
        stale_at_hand: bool,
        label: &'static str,
    ) -> Asked {
        if self.health.unavailable() {
            return Asked::Failed {
                answer: None,
                status: StatusCode::BAD_GATEWAY,
            };
        }
        let fut = self.fetch_shared(identity, path, cred, label);
        let result = if stale_at_hand {
            match tokio::time::timeout(self.soft_timeout, fut).await {
                Ok(r) => r,
                Err(_) => {
                    self.health.record_failure(&self.upstream);
                    return Asked::Failed {
                        answer: None,
                        status: StatusCode::GATEWAY_TIMEOUT,
                    };
                }
            }
        } else {
            fut.await
        };
        match result {
            Ok(small) => {
                self.health.record_answer(small.status, &small.headers);
                if small.status.is_server_error() || small.status == StatusCode::TOO_MANY_REQUESTS {
                    let status = small.status;
                    Asked::Failed {
                        answer: Some(small),
                        status,
                    }
                } else {
                    Asked::Answer(small)
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "upstream registry call failed");
                if matches!(
                    e.etype(),
                    ErrorType::ConnectError
                        | ErrorType::ConnectTimedout
                        | ErrorType::ConnectRefused
                        | ErrorType::ConnectNoRoute
                        | ErrorType::ReadTimedout
                        | ErrorType::ReadError
                ) {
                    self.health.record_failure(&self.upstream);
                }
                Asked::Failed {
                    answer: None,
                    status: fetch::failure_status(&e),
                }
            }
        }
    }

    /// GET a registry path upstream; concurrent identical requests of one identity share it.
    /// The request runs as a task of its own, so a caller that stops waiting (soft timeout,
    /// client gone) does not cancel it for the others.
    pub(super) fn fetch_shared(
        &self,
        identity: Identity,
        path: &str,
        cred: Option<HeaderValue>,
        label: &'static str,
    ) -> SharedFetch {
        let key = format!("{}{path}", identity.to_hex());
        let mut inflight = self.inflight.lock().expect("inflight lock");
        if let Some(f) = inflight.get(&key) {
            metrics::COALESCED_WAITS.inc();
            return f.clone();
        }
        let upstream = self.upstream.clone();
        let map = self.inflight.clone();
        let (path, k) = (path.to_string(), key.clone());
        let fut = async move {
            let started = std::time::Instant::now();
            let result = fetch::registry(&upstream, &path, cred.as_ref()).await;
            metrics::UPSTREAM_DURATION
                .with_label_values(&[label])
                .observe(started.elapsed().as_secs_f64());
            let outcome = match &result {
                Ok(s) => status_class(s.status),
                Err(e) if e.etype() == &ErrorType::ReadTimedout => "timeout",
                Err(_) => "error",
            };
            metrics::UPSTREAM_REQUESTS
                .with_label_values(&[label, outcome])
                .inc();
            map.lock().expect("inflight lock").remove(&k);
            result.map_err(Arc::from)
        }
        .boxed()
        .shared();
        inflight.insert(key, fut.clone());
        tokio::spawn(fut.clone());
        fut
    }

    /// The upstream gave nothing usable and no stale answer is allowed: relay its error
    /// answer if there was one, or say it is unreachable.
    pub(super) async fn nothing_to_serve(
        &self,
        session: &mut Session,
        answer: Option<Small>,
        status: StatusCode,
        identity: Identity,
    ) -> Result<Outcome> {
        let upstream_status = answer.as_ref().map(|a| a.status.as_u16());
        match answer {
            Some(small) => write_answer(session, &small, CacheStatus::Miss).await?,
            None => respond::error(session, status).await?,
        }
        Ok(Outcome {
            cache: CacheStatus::Miss,
            upstream_status,
            identity,
        })
    }
}
