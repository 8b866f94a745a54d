//! Each thread's accept loop: accept, choose the thread that serves (see [`super::balance`]),
//! hand the socket over if that is another thread, then TLS and the HTTP app there.
//!
//! This replaces pingora's listening service for the proxy (the metrics listener keeps
//! pingora's). pingora's loop registers a socket with the accepting thread's reactor before
//! the app sees it, so a connection cannot move afterwards; here the socket moves before
//! its first byte is read, and is registered with the reactor of the thread that serves it.
//! Everything else is what pingora's loop does: `TCP_NODELAY`, the peer address in the
//! socket digest, pingora's buffers ([`Conn`]), the TLS handshake with pingora's acceptor,
//! then the app's `process_new` for as long as it hands the stream back.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use pingora::apps::ServerApp;
use pingora::listeners::tls::Acceptor;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::balance::{Balance, Live};
use super::conn::Conn;

/// An accepted socket on its way to the thread that serves it.
pub struct Handoff {
    socket: std::net::TcpStream,
    peer: SocketAddr,
    live: Live,
}

/// What one thread serves connections with.
pub struct Serving<A> {
    pub index: usize,
    pub app: Arc<A>,
    pub tls: Option<Arc<Acceptor>>,
    pub balance: Arc<Balance>,
    /// How long a TLS handshake may take: the same bound as a request head.
    pub handshake: Duration,
    pub shutdown: ShutdownWatch,
}

/// Accept on `listener` until shutdown, and serve what other threads hand over meanwhile.
pub async fn run<A>(listener: TcpListener, serving: Arc<Serving<A>>)
where
    A: ServerApp + Send + Sync + 'static,
{
    let (inbox, mut handed) = mpsc::unbounded_channel();
    serving.balance.register(serving.index, inbox);
    let mut shutdown = serving.shutdown.clone();
    loop {
        let accepted = tokio::select! {
            biased;
            changed = shutdown.changed() => {
                if changed.is_ok() && !*shutdown.borrow() {
                    continue;
                }
                break;
            }
            Some(h) = handed.recv() => {
                take_over(h, &serving);
                continue;
            }
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((tcp, peer)) => dispatch(tcp, peer, &serving),
            Err(e) => calm_down(e).await,
        }
    }
    // No more hand-offs from here on (the other threads serve what they accept themselves);
    // those already sent are served like any connection accepted just before a shutdown.
    handed.close();
    while let Ok(h) = handed.try_recv() {
        take_over(h, &serving);
    }
}

/// Serve a connection another thread accepted, on this thread's reactor.
fn take_over<A>(h: Handoff, serving: &Arc<Serving<A>>)
where
    A: ServerApp + Send + Sync + 'static,
{
    let Handoff { socket, peer, live } = h;
    match TcpStream::from_std(socket) {
        Ok(tcp) => {
            tokio::spawn(serve(tcp, peer, live, serving.clone()));
        }
        Err(e) => tracing::warn!(error = %e, "cannot take over a connection"),
    }
}

/// Serve a connection here, or hand it to the thread with fewer connections.
fn dispatch<A>(tcp: TcpStream, peer: SocketAddr, serving: &Arc<Serving<A>>)
where
    A: ServerApp + Send + Sync + 'static,
{
    let own = serving.index;
    let to = serving.balance.choose(own);
    if to == own {
        tokio::spawn(serve(
            tcp,
            peer,
            serving.balance.enter(own),
            serving.clone(),
        ));
        return;
    }
    // Off this thread's reactor, onto the other's when it arrives there.
    let socket = match tcp.into_std() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot hand a connection over");
            return;
        }
    };
    let live = serving.balance.enter(to);
    if let Err(h) = serving.balance.send(to, Handoff { socket, peer, live }) {
        // That thread stopped meanwhile: serve it here after all.
        let live = serving.balance.enter(own);
        take_over(Handoff { live, ..h }, serving);
    }
}

/// One connection, on the thread that serves it: pingora's buffers, TLS, then the app.
async fn serve<A>(tcp: TcpStream, peer: SocketAddr, live: Live, serving: Arc<Serving<A>>)
where
    A: ServerApp + Send + Sync + 'static,
{
    let conn = match Conn::new(tcp, peer) {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = %e, "connection broken before its first byte");
            return;
        }
    };
    let stream: Stream = match &serving.tls {
        None => Box::new(conn),
        Some(tls) => match tokio::time::timeout(serving.handshake, tls.tls_handshake(conn)).await {
            Ok(Ok(tls)) => Box::new(tls),
            Ok(Err(e)) => {
                tracing::info!(client = %peer, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::info!(client = %peer, "TLS handshake timed out");
                return;
            }
        },
    };
    let mut reused = serving.app.process_new(stream, &serving.shutdown).await;
    while let Some(stream) = reused {
        reused = serving.app.process_new(stream, &serving.shutdown).await;
    }
    drop(live);
}

/// After a failed `accept`: go on at once when only that connection failed; wait a little
/// when the process is out of file descriptors or memory, which `accept` would otherwise
/// report again at once, spinning the thread.
async fn calm_down(e: io::Error) {
    const EMFILE: i32 = 24;
    const ENFILE: i32 = 23;
    const ENOBUFS: i32 = 105;
    const ENOMEM: i32 = 12;
    if matches!(e.raw_os_error(), Some(EMFILE | ENFILE | ENOBUFS | ENOMEM)) {
        tracing::error!(error = %e, "cannot accept connections, trying again in a second");
        tokio::time::sleep(Duration::from_secs(1)).await;
    } else {
        tracing::debug!(error = %e, "accept failed");
    }
}
