//! HTTP/2 connections (TLS with ALPN `h2`), held to the bounds an HTTP/1 connection has: its
//! first request within `timeouts.client_idle` of the connection being ready, each later one
//! within `client_idle` of the previous one ending, and a request body that stops moving for
//! `timeouts.client_stall` cut.
//!
//! pingora's own HTTP/2 loop (its `ServerApp` impl for any `HttpServerApp`) bounds neither:
//! its h2 handshake (reading the client's preface) has no timeout, and an HTTP/2 request body
//! is read with no timeout at all (`set_read_timeout` does nothing on an HTTP/2 session). A
//! connection that sent half a preface, or a request whose body never came, was held for
//! ever with its descriptor and buffers. So [`serve`] runs that loop itself, from pingora's
//! public parts, as pingora runs it: `handshake`, then `HttpSession::from_h2_conn` for each
//! new stream, each stream's request in a task of its own (`process_new_http`).
//!
//! - Idle: one deadline per connection, `client_idle` from the moment the TLS handshake is
//!   done, moved to `client_idle` after the last stream ended whenever none is left. The
//!   preface and the first request fall under the same deadline (as an HTTP/1 head does);
//!   PINGs, SETTINGS, window updates and refused streams do not move it. At the deadline the
//!   connection is dropped, counted in `tfmirror_client_timeouts_total`.
//! - Malformed streams: pingora refuses a stream whose head it finds malformed (a 400 or a
//!   reset) and closes a connection at its 32nd. That budget lives in a private helper:
//!   `from_h2_conn` starts a fresh count on every call, so this loop counts refusals itself.
//! - Request bodies: see [`body_in_time`].

use std::cell::Cell;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use pingora::apps::HttpServerApp;
use pingora::protocols::http::v2::server::{self, H2Accept, HttpSession};
use pingora::protocols::http::ServerSession;
use pingora::protocols::l4::socket::SocketAddr;
use pingora::protocols::{Digest, Stream};
use pingora::server::ShutdownWatch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::metrics;

/// Malformed streams a connection may send; the last one closes it (pingora's
/// `MAX_MALFORMED_STREAMS_PER_CONN`, private to it).
const MALFORMED_STREAMS_PER_CONNECTION: usize = 32;

/// The bounds of one connection: `timeouts.client_idle` and `timeouts.client_stall`.
#[derive(Clone, Copy)]
pub struct Limits {
    pub idle: Duration,
    pub stall: Duration,
}

/// Serve one HTTP/2 connection until it closes, idles out or is shut down.
pub async fn serve<A>(app: &Arc<A>, stream: Stream, shutdown: &ShutdownWatch, limits: Limits)
where
    A: HttpServerApp + Send + Sync + 'static,
{
    // The connection's facts, shared by its streams (as pingora's loop makes them).
    let digest = Arc::new(Digest {
        ssl_digest: stream.get_ssl_digest(),
        timing_digest: stream.get_timing_digest(),
        proxy_digest: stream.get_proxy_digest(),
        socket_digest: stream.get_socket_digest(),
    });
    let quiet = tokio::time::sleep(limits.idle);
    tokio::pin!(quiet);
    let handshake = server::handshake(stream, app.h2_options());
    let conn = match tokio::time::timeout_at(quiet.deadline(), handshake).await {
        Ok(Ok(conn)) => conn,
        // Not HTTP/2 after all, or the client went away.
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "HTTP/2 handshake failed");
            return;
        }
        Err(_) => {
            metrics::CLIENT_TIMEOUTS.inc();
            return;
        }
    };
    let mut streams = Streams {
        app,
        conn,
        digest,
        shutdown: shutdown.clone(),
        running: JoinSet::new(),
        limits,
    };
    streams.run(quiet).await;
    // Requests still running finish on their own (they fail at their next read or write),
    // as with pingora's loop.
    streams.running.detach_all();
}

/// One HTTP/2 connection past its handshake, and the requests it runs.
struct Streams<'a, A> {
    app: &'a Arc<A>,
    conn: h2::server::Connection<Stream, bytes::Bytes>,
    digest: Arc<Digest>,
    shutdown: ShutdownWatch,
    running: JoinSet<()>,
    limits: Limits,
}

impl<A> Streams<'_, A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    /// Accept streams until the connection ends, `quiet` (the idle deadline) passes with no
    /// request running, or it sends too many malformed streams.
    async fn run(&mut self, mut quiet: std::pin::Pin<&mut tokio::time::Sleep>) {
        let mut draining = false;
        if *self.shutdown.borrow() {
            self.conn.graceful_shutdown();
            draining = true;
        }
        let mut malformed = 0;
        loop {
            let accepted = tokio::select! {
                biased;
                _ = self.shutdown.changed(), if !draining => {
                    // GOAWAY; the streams already open are still served (as pingora does).
                    self.conn.graceful_shutdown();
                    draining = true;
                    continue;
                }
                Some(_) = self.running.join_next(), if !self.running.is_empty() => {
                    if self.running.is_empty() {
                        quiet.as_mut().reset(Instant::now() + self.limits.idle);
                    }
                    continue;
                }
                // Polling this drives the whole connection, the running streams' I/O
                // included; it is cancel-safe (pingora's loop relies on that too).
                accepted = HttpSession::from_h2_conn(&mut self.conn, self.digest.clone()) => accepted,
                () = &mut quiet, if self.running.is_empty() => {
                    metrics::CLIENT_TIMEOUTS.inc();
                    return;
                }
            };
            match accepted {
                Ok(Some(H2Accept::Session(session))) => self.start(session),
                Ok(Some(H2Accept::Rejected)) => {
                    malformed += 1;
                    if malformed >= MALFORMED_STREAMS_PER_CONNECTION {
                        tracing::warn!(
                            "closing an HTTP/2 connection after {malformed} malformed requests"
                        );
                        return;
                    }
                }
                // Done: closed by the client, or drained after a GOAWAY.
                Ok(None) => return,
                // Broken: a protocol error, a reset socket.
                Err(e) => {
                    tracing::debug!(error = %e, "HTTP/2 connection ended");
                    return;
                }
            }
        }
    }

    /// Run one stream's request in a task of its own, as pingora's loop does.
    fn start(&mut self, session: HttpSession) {
        let app = self.app.clone();
        let shutdown = self.shutdown.clone();
        let stall = self.limits.stall;
        self.running.spawn(async move {
            // A request without a body (the usual GET) needs no watchdog.
            let body = !session.is_body_done();
            let client = session.client_addr().cloned();
            let request = app.process_new_http(ServerSession::new_http2(session), &shutdown);
            if body {
                let watched = body_in_time(request, stall, client);
                BODY.scope(Cell::new(Body::NotAwaited), watched).await;
            } else {
                request.await;
            }
        });
    }
}

/// Where the request body of the current HTTP/2 stream is.
#[derive(Clone, Copy)]
enum Body {
    /// Not waited for yet: the request is being decided, or its upstream connected.
    NotAwaited,
    /// Waited for since then (pingora's first wait, or the last piece read).
    Since(Instant),
    /// All in.
    Done,
}

tokio::task_local! {
    /// The request body of the HTTP/2 stream whose request this task runs. The request and
    /// its watchdog run in the same task (pingora reads the body in the request's task), so
    /// a `Cell` is enough.
    static BODY: Cell<Body>;
}

/// pingora is about to forward the current request upstream, reading its body as it goes:
/// the wait for the body starts now (again, on a retry). Outside an HTTP/2 request with a
/// body this does nothing.
pub fn request_body_awaited() {
    let _ = BODY.try_with(|b| {
        if !matches!(b.get(), Body::Done) {
            b.set(Body::Since(Instant::now()));
        }
    });
}

/// A piece of the current request's body was read (`end`: the last). Outside an HTTP/2
/// request with a body this does nothing.
pub fn request_body_read(end: bool) {
    let _ = BODY.try_with(|b| {
        b.set(if end {
            Body::Done
        } else {
            Body::Since(Instant::now())
        })
    });
}

/// Run `request`, a stream whose request has a body, and reset the stream if pingora waits
/// `stall` for the next piece of that body (or its first) without one coming: HTTP/1's
/// per-read timeout, which pingora does not apply to HTTP/2. Dropping the request future
/// drops the stream, and h2 resets it (`CANCEL`), and with it the upstream request.
///
/// The wait is timed from [`request_body_awaited`] (the proxy's last hook before pingora
/// reads the body) and each [`request_body_read`]; a request answered without reading its
/// body is never cut. One approximation: pingora stops reading while its upstream takes no
/// more, and that time counts too. The upstream's own write timeout (`timeouts.transfer`)
/// bounds that case anyway.
async fn body_in_time<F>(mut request: F, stall: Duration, client: Option<SocketAddr>)
where
    F: Future + Unpin,
{
    let timer = tokio::time::sleep(stall);
    tokio::pin!(timer);
    loop {
        tokio::select! {
            // The request first: a last piece read at the deadline still counts.
            biased;
            _ = &mut request => return,
            () = &mut timer => {
                let due = match BODY.with(Cell::get) {
                    Body::Done => break,
                    Body::NotAwaited => Instant::now() + stall,
                    Body::Since(at) => at + stall,
                };
                if due <= Instant::now() {
                    let client = client.map_or_else(|| "unknown".into(), |c| c.to_string());
                    tracing::info!(
                        %client,
                        "an HTTP/2 request body stopped for timeouts.client_stall: stream reset"
                    );
                    return;
                }
                timer.as_mut().reset(due);
            }
        }
    }
    request.await;
}
