//! Client-side connection limits: idle connections and slow clients.
//!
//! Pingora reads a request head with a per-read timer only, so a client that sends one byte
//! a minute (slowloris) keeps its connection for ever, and a silent connection lasts 60 s
//! whatever the operator wants. [`Guarded`] wraps pingora's HTTP proxy app and gives every
//! request a deadline for its head: `timeouts.client_idle` from the moment the connection
//! is ready for it (just accepted, or the previous response sent). A silent or trickling
//! connection is closed at that deadline, counted in `tfmirror_client_timeouts_total`.
//!
//! Once the head is in, the deadline is lifted: bodies are bounded per read and per write
//! by `timeouts.client_stall` (set in the proxy's first hook), so a slow but moving upload or
//! download continues and a stalled one is dropped. Neither holds anything but its own
//! socket: tarball fills run apart from their readers (see [`crate::cache::fill`]).
//!
//! How the proxy tells this wrapper that a head has arrived: the wrapper runs each request
//! inside a task-local flag, and [`head_received`] (called from `early_request_filter`,
//! pingora's first hook after the head is parsed) sets it. The request runs in the same task
//! as the wrapper, so no channel or lock is needed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::{HttpServerApp, HttpServerOptions, ReusedHttpStream};
use pingora::protocols::http::ServerSession;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;

use crate::metrics;

tokio::task_local! {
    static HEAD: Arc<AtomicBool>;
}

/// Mark the current request's head as received. Outside a [`Guarded`] request (unit tests,
/// the metrics listener) this does nothing.
pub fn head_received() {
    let _ = HEAD.try_with(|h| h.store(true, Ordering::Relaxed));
}

/// An HTTP app with a deadline on every request head.
pub struct Guarded<A> {
    inner: Arc<A>,
    idle: Duration,
    options: HttpServerOptions,
}

impl<A> Guarded<A> {
    pub fn new(inner: A, idle: Duration) -> Guarded<A> {
        let mut options = HttpServerOptions::default();
        // HTTP/2 multiplexes requests on one connection; pingora closes an idle one itself.
        options.h2_idle_timeout = Some(idle);
        Guarded {
            inner: Arc::new(inner),
            idle,
            options,
        }
    }
}

/// How long a connection accepted before a graceful shutdown has to send its request before
/// the shutdown closes it (see `http_cleanup`). Shorter than pingora's grace period.
pub const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(2);

#[async_trait]
impl<A> HttpServerApp for Guarded<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    /// Runs for each request on a connection (HTTP/1 keep-alive reuse calls it again).
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        // Pingora's keep-alive setting times each read of a head (60 s by default, and
        // the value a reused connection inherits). The deadline below already bounds the
        // whole head, and a second timer per request cost a registration, a clock read and a
        // wake-up list entry on every hit: `Some(0)` keeps the connection reusable with no
        // timer of pingora's. Ours closes every slow or silent connection, counted the same way.
        if !*shutdown.borrow() {
            session.set_keepalive(Some(0));
        }
        let head = Arc::new(AtomicBool::new(false));
        let request = HEAD.scope(head.clone(), self.inner.process_new_http(session, shutdown));
        tokio::pin!(request);
        let deadline = tokio::time::sleep(self.idle);
        tokio::pin!(deadline);
        let mut armed = true;
        loop {
            tokio::select! {
                reused = &mut request => return reused,
                _ = &mut deadline, if armed => {
                    if !head.load(Ordering::Relaxed) {
                        // Dropping the request future drops the socket: the client sees the
                        // connection closed, as with nginx's client_header_timeout.
                        metrics::CLIENT_TIMEOUTS.inc();
                        return None;
                    }
                    armed = false;
                }
            }
        }
    }

    fn h2_options(&self) -> Option<pingora::protocols::http::v2::server::H2Options> {
        self.inner.h2_options()
    }

    fn server_options(&self) -> Option<&HttpServerOptions> {
        Some(&self.options)
    }

    /// Graceful shutdown (a terminate or an upgrade), once the accept loops have stopped.
    ///
    /// The proxy's cleanup wakes every connection still waiting for a request head, which
    /// then closes without an answer. That includes a connection accepted a moment before
    /// whose first request is on its way: its client sees the connection closed, and on a
    /// new connection no client retries (one request in ~12,000 failed that way in
    /// `graceful_upgrade_loses_no_request`). So the cleanup waits [`FIRST_REQUEST_GRACE`]
    /// first: a request that arrives meanwhile is read and answered. The process stays up
    /// for pingora's grace period (5 s) after this starts, so the wait costs nothing.
    async fn http_cleanup(&self) {
        tokio::time::sleep(FIRST_REQUEST_GRACE).await;
        self.inner.http_cleanup().await
    }

    async fn process_custom_session(
        self: Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        self.inner
            .clone()
            .process_custom_session(stream, shutdown)
            .await
    }
}
