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
//! How the proxy tells this wrapper that a head has arrived: the wrapper runs each connection
//! inside a task-local flag, and [`head_received`] (called from `early_request_filter`,
//! pingora's first hook after the head is parsed) sets it. The requests run in the same task
//! as the wrapper, so no channel or lock is needed.
//!
//! One timer per connection, not per request: the deadline is a single tokio `Sleep` made at
//! accept and moved forward each time a response has gone out. Moving a pending timer later is one atomic
//! write in tokio (the wheel entry is only re-filed when its old time comes), where a new
//! timer per request cost a wheel insert and removal, the request future's set-up and a move
//! of pingora's session into it: about 2.7% of the CPU of a cached hit under load.
//!
//! So [`Guarded`] takes over pingora's per-connection loop for HTTP/1 (the loop pingora's
//! `ServerApp` impl for any `HttpServerApp` runs: a session per request on the reused stream,
//! with the settings the previous request left). It takes over pingora's HTTP/2 loop too
//! (TLS with ALPN `h2`), which bounds neither a preface nor a request body: see [`http2`]
//! for the same limits there. h2c and custom protocols, which tfmirror does not enable, go
//! to pingora's own loop unchanged.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::{HttpServerApp, ReusedHttpStream, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::tls::ALPN;
use pingora::protocols::Stream;
use pingora::proxy::{HttpProxy, ProxyHttp};
use pingora::server::ShutdownWatch;
use tokio::time::{Instant, Sleep};

use crate::metrics;

pub mod http2;

pub use http2::{request_body_awaited, request_body_read};

tokio::task_local! {
    static HEAD: Arc<AtomicBool>;
}

/// Mark the current request's head as received. Outside a [`Guarded`] request (unit tests,
/// the metrics listener) this does nothing.
pub fn head_received() {
    let _ = HEAD.try_with(|h| h.store(true, Ordering::Relaxed));
}

/// An HTTP proxy app with a deadline on every request head (and, over HTTP/2, on every
/// request body that stops).
pub struct Guarded<A> {
    inner: Arc<A>,
    idle: Duration,
    stall: Duration,
}

impl<SV: ProxyHttp> Guarded<HttpProxy<SV>> {
    /// `idle`: `timeouts.client_idle`; `stall`: `timeouts.client_stall` (HTTP/1 bodies get it
    /// from the proxy's first hook, HTTP/2 bodies from [`http2`]).
    pub fn new(inner: HttpProxy<SV>, idle: Duration, stall: Duration) -> Guarded<HttpProxy<SV>> {
        Guarded {
            inner: Arc::new(inner),
            idle,
            stall,
        }
    }
}

/// How long a connection accepted before a graceful shutdown has to send its request before
/// the shutdown closes it (see `cleanup`). Shorter than pingora's grace period.
pub const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(2);

#[async_trait]
impl<A> ServerApp for Guarded<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    /// Runs once per accepted connection (after the TLS handshake, if any).
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        // As pingora's loop decides: HTTP/2 negotiated by ALPN wins over any option.
        if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            let limits = http2::Limits {
                idle: self.idle,
                stall: self.stall,
            };
            http2::serve(&self.inner, stream, shutdown, limits).await;
            return None;
        }
        let options = self.inner.server_options();
        let h2c_or_custom = options.is_some_and(|o| o.h2c || o.force_custom);
        if h2c_or_custom || matches!(stream.selected_alpn_proto(), Some(ALPN::Custom(_))) {
            return self.inner.process_new(stream, shutdown).await;
        }
        let head = Arc::new(AtomicBool::new(false));
        HEAD.scope(head.clone(), self.http1(stream, shutdown, &head))
            .await
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
    async fn cleanup(&self) {
        tokio::time::sleep(FIRST_REQUEST_GRACE).await;
        self.inner.http_cleanup().await
    }
}

impl<A> Guarded<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    /// The requests of one HTTP/1 connection, each in a new session on the reused stream, as
    /// pingora's own loop runs them, each head under the connection's one deadline.
    async fn http1(
        &self,
        stream: Stream,
        shutdown: &ShutdownWatch,
        head: &AtomicBool,
    ) -> Option<Stream> {
        let deadline = tokio::time::sleep(self.idle);
        tokio::pin!(deadline);
        let mut session = ServerSession::new_http1(stream);
        if *shutdown.borrow() {
            // Stop the client from reusing a connection of a service shutting down soon.
            session.set_keepalive(None);
        }
        loop {
            // pingora's keep-alive setting times each read of a head (60 s by default, and
            // the value a reused connection inherits). The deadline already bounds the whole
            // head, and a second timer per request cost a registration, a clock read and a
            // wake-up list entry on every hit: `Some(0)` keeps the connection reusable with
            // no timer of pingora's. Ours closes every slow or silent connection.
            if !*shutdown.borrow() {
                session.set_keepalive(Some(0));
            }
            head.store(false, Ordering::Relaxed);
            // The session goes straight into pingora's (boxed) request future: it is large,
            // and each move of it is a copy.
            let request = self.inner.process_new_http(session, shutdown);
            let reused = head_in_time(request, head, deadline.as_mut()).await?;
            let (stream, settings) = reused.consume();
            session = ServerSession::new_http1(stream);
            if let Some(settings) = settings {
                settings.apply_to_session(&mut session);
            }
            // The next head is due `idle` from now, the previous response being sent.
            deadline.as_mut().reset(Instant::now() + self.idle);
        }
    }
}

/// Run `request`, or close its connection without an answer if its head is not in by
/// `deadline`. Once the head is in, the deadline no longer applies to this request.
async fn head_in_time<F>(
    mut request: F,
    head: &AtomicBool,
    mut deadline: Pin<&mut Sleep>,
) -> F::Output
where
    F: Future<Output = Option<ReusedHttpStream>> + Unpin,
{
    let mut armed = true;
    loop {
        tokio::select! {
            // The request first: a head and its answer ready at the deadline still go out.
            biased;
            reused = &mut request => return reused,
            () = &mut deadline, if armed => {
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
