//! A client connection as pingora's HTTP code expects to find it.
//!
//! pingora's own accept loop puts each TCP stream behind a 64 KiB read buffer and a write
//! buffer of one segment (1460 bytes), so that a response head and a small body leave in one
//! `sendto`. That set-up is private to pingora, and the stream it builds from a bare tokio
//! socket has neither buffer. [`Conn`] adds the same two buffers, of pingora's default sizes,
//! in the same order, around that stream, and passes pingora's digests through.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use futures::FutureExt;
use pingora::listeners::{DEFAULT_L4_READ_BUFFER_SIZE, DEFAULT_L4_WRITE_BUFFER_SIZE};
use pingora::protocols::l4::socket::SocketAddr as PeerAddr;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl,
    TimingDigest, UniqueID, UniqueIDType,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufStream, ReadBuf};
use tokio::net::TcpStream;

/// An accepted TCP connection, buffered as pingora's listeners buffer theirs.
#[derive(Debug)]
pub struct Conn {
    inner: BufStream<L4Stream>,
}

impl Conn {
    /// Wrap a socket accepted from `peer`: no Nagle delay, the peer's address in the socket
    /// digest (for pingora's `client_addr`), as pingora's accept does.
    pub fn new(tcp: TcpStream, peer: std::net::SocketAddr) -> io::Result<Conn> {
        let mut l4 = L4Stream::from(tcp);
        l4.set_nodelay().map_err(io::Error::other)?;
        let digest = SocketDigest::from_raw_fd(l4.id());
        let _ = digest.peer_addr.set(Some(PeerAddr::Inet(peer)));
        l4.set_socket_digest(digest);
        Ok(Conn {
            inner: BufStream::with_capacity(
                DEFAULT_L4_READ_BUFFER_SIZE,
                DEFAULT_L4_WRITE_BUFFER_SIZE,
                l4,
            ),
        })
    }

    fn l4(&self) -> &L4Stream {
        self.inner.get_ref()
    }
}

impl Drop for Conn {
    /// Send what is still in the write buffer if the socket takes it now, as pingora's own
    /// stream does when dropped (a drop cannot wait).
    fn drop(&mut self) {
        let _ = self.inner.flush().now_or_never();
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for Conn {
    async fn shutdown(&mut self) {
        // Flushes the write buffer first.
        let _ = AsyncWriteExt::shutdown(&mut self.inner).await;
    }
}

impl UniqueID for Conn {
    fn id(&self) -> UniqueIDType {
        self.l4().id()
    }
}

impl Ssl for Conn {}

/// No peeking: bytes may wait in the read buffer above the socket. pingora peeks only to
/// detect cleartext HTTP/2, which tfmirror does not enable.
impl Peek for Conn {}

impl GetTimingDigest for Conn {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.l4().get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.l4().get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.l4().get_write_pending_time()
    }
}

impl GetProxyDigest for Conn {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.l4().get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.get_mut().set_proxy_digest(digest)
    }
}

impl GetSocketDigest for Conn {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.l4().get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.get_mut().set_socket_digest(digest)
    }
}
