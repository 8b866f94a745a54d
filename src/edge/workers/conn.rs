//! A client connection as pingora's HTTP code expects to find it.
//!
//! pingora's own accept loop puts each TCP stream behind a 64 KiB read buffer and a write
//! buffer of one segment (1460 bytes), so that a response head and a small body leave in one
//! `sendto`. That set-up is private to pingora, and the stream it builds from a bare tokio
//! socket has neither buffer. [`Conn`] adds the same two buffers, of pingora's default sizes,
//! in the same order, around that stream, and passes pingora's digests through.
//!
//! One difference: when a write does not fit in what is left of the write buffer, pingora's
//! buffer (tokio's `BufWriter`) sends what it holds, then the write: two syscalls for every
//! answer whose body is larger than a segment, the head being in the buffer. [`Coalescing`]
//! sends both in one `writev`.

use std::fs::File;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll};
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
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf};
use tokio::net::TcpStream;

use super::sendfile::{stands_for_file, FileSend};

/// An accepted TCP connection, buffered as pingora's listeners buffer theirs.
#[derive(Debug)]
pub struct Conn {
    inner: BufReader<Coalescing<L4Stream>>,
    /// A file the kernel sends in place of placeholder writes ([`Conn::send_file`]). Behind
    /// a lock only because pingora lends the connection out as `&dyn Any`; the writes take
    /// it through `&mut self`, without locking.
    file: Mutex<Option<FileSend>>,
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
            inner: BufReader::with_capacity(DEFAULT_L4_READ_BUFFER_SIZE, Coalescing::new(l4)),
            file: Mutex::new(None),
        })
    }

    /// Arm the connection with `file`: the next `len` body bytes written as
    /// [`placeholder`](super::sendfile::placeholder) bytes go out as the file's bytes, sent
    /// by the kernel from the page cache (see [`super::sendfile`]). What is buffered (the
    /// response head) goes first. Any other write before all `len` went fails.
    pub fn send_file(&self, file: Arc<File>, len: u64) -> io::Result<()> {
        let send = FileSend::new(self.l4().id(), file, len)?;
        *self.file.lock().unwrap_or_else(PoisonError::into_inner) = Some(send);
        Ok(())
    }

    /// A write while a file is armed: placeholder bytes become the file's next bytes.
    fn poll_write_file(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let slot = self.file.get_mut().unwrap_or_else(PoisonError::into_inner);
        if !stands_for_file(buf) {
            *slot = None;
            return Poll::Ready(Err(io::Error::other(
                "a write of other bytes while a file was being sent",
            )));
        }
        // The head (and anything else buffered) goes before the file.
        ready!(Pin::new(&mut self.inner).poll_flush(cx))?;
        let slot = self.file.get_mut().unwrap_or_else(PoisonError::into_inner);
        let Some(send) = slot.as_mut() else {
            return Poll::Ready(Err(io::Error::other("no file armed")));
        };
        let sent = send.poll_send(cx, buf.len());
        if matches!(sent, Poll::Ready(Err(_))) || send.done() {
            *slot = None;
        }
        sent
    }

    fn file_armed(&mut self) -> bool {
        self.file
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    fn l4(&self) -> &L4Stream {
        &self.inner.get_ref().inner
    }

    fn l4_mut(&mut self) -> &mut L4Stream {
        &mut self.inner.get_mut().inner
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
        if self.file_armed() {
            return self.poll_write_file(cx, buf);
        }
        if !buf.is_empty() && stands_for_file(buf) {
            // Placeholder bytes with no file armed (more than the file's length): never
            // data, so never on the wire.
            return Poll::Ready(Err(io::Error::other(
                "placeholder bytes with no file armed",
            )));
        }
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
        if self.file_armed() {
            let first = bufs
                .iter()
                .find(|b| !b.is_empty())
                .map_or(&[][..], |b| &b[..]);
            return self.poll_write_file(cx, first);
        }
        if bufs.iter().any(|b| !b.is_empty() && stands_for_file(b)) {
            return Poll::Ready(Err(io::Error::other(
                "placeholder bytes with no file armed",
            )));
        }
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
        self.l4_mut().set_proxy_digest(digest)
    }
}

impl GetSocketDigest for Conn {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.l4().get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.l4_mut().set_socket_digest(digest)
    }
}

/// A write buffer of one segment ([`DEFAULT_L4_WRITE_BUFFER_SIZE`]) that sends what it holds
/// together with a write that does not fit, in one vectored write. Reads pass through.
#[derive(Debug)]
pub struct Coalescing<S> {
    inner: S,
    buf: Vec<u8>,
}

impl<S> Coalescing<S> {
    pub fn new(inner: S) -> Coalescing<S> {
        Coalescing {
            inner,
            buf: Vec::with_capacity(DEFAULT_L4_WRITE_BUFFER_SIZE),
        }
    }

    fn fits(&self, len: usize) -> bool {
        self.buf.len() + len <= DEFAULT_L4_WRITE_BUFFER_SIZE
    }
}

impl<S: AsyncWrite + Unpin> Coalescing<S> {
    /// Send everything the buffer holds.
    fn poll_empty(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.buf.is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.buf.drain(..n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Coalescing<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Coalescing<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            if this.fits(data.len()) {
                this.buf.extend_from_slice(data);
                return Poll::Ready(Ok(data.len()));
            }
            if this.buf.is_empty() {
                return Pin::new(&mut this.inner).poll_write(cx, data);
            }
            // What the buffer holds goes first, in the same syscall as (the start of) `data`.
            let both = [io::IoSlice::new(&this.buf), io::IoSlice::new(data)];
            let n = ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, &both))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            let held = this.buf.len();
            this.buf.drain(..n.min(held));
            if n > held {
                return Poll::Ready(Ok(n - held));
            }
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let len = bufs.iter().map(|b| b.len()).sum();
        if this.fits(len) {
            for b in bufs {
                this.buf.extend_from_slice(b);
            }
            return Poll::Ready(Ok(len));
        }
        ready!(this.poll_empty(cx))?;
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_empty(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_empty(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket that records each write call, takes at most `max` bytes per call, and is not
    /// ready on every `pending_every`-th call (0: always ready).
    #[derive(Default)]
    struct Socket {
        calls: Vec<usize>,
        out: Vec<u8>,
        max: usize,
        pending_every: usize,
        polls: usize,
    }

    impl Socket {
        fn take(
            &mut self,
            cx: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            self.polls += 1;
            if self.pending_every > 0 && self.polls % self.pending_every == 0 {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let mut room = self.max;
            for b in bufs {
                let n = b.len().min(room);
                self.out.extend_from_slice(&b[..n]);
                room -= n;
            }
            let n = self.max - room;
            self.calls.push(n);
            Poll::Ready(Ok(n))
        }
    }

    impl AsyncWrite for Socket {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.get_mut().take(cx, &[io::IoSlice::new(buf)])
        }

        fn poll_write_vectored(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            self.get_mut().take(cx, bufs)
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn bytes(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// Writes `parts` (each `write_all`, as pingora writes a head and body chunks), then
    /// flushes; returns the socket.
    async fn send(parts: &[Vec<u8>], max: usize, pending_every: usize) -> Socket {
        let socket = Socket {
            max,
            pending_every,
            ..Socket::default()
        };
        let mut c = Coalescing::new(socket);
        for p in parts {
            c.write_all(p).await.unwrap();
        }
        c.flush().await.unwrap();
        c.inner
    }

    #[tokio::test]
    async fn a_head_and_a_large_body_leave_in_one_write() {
        let (head, body) = (bytes(200, 1), bytes(64 << 10, 2));
        let s = send(&[head.clone(), body.clone()], usize::MAX, 0).await;
        assert_eq!(s.calls, vec![200 + (64 << 10)], "one write for both");
        assert_eq!(s.out, [head, body].concat());
        // Small pieces wait in the buffer for the flush: one write.
        let parts = [bytes(200, 3), bytes(300, 4), bytes(900, 5)];
        let s = send(&parts, usize::MAX, 0).await;
        assert_eq!(s.calls, vec![1400]);
        assert_eq!(s.out, parts.concat());
    }

    #[tokio::test]
    async fn short_writes_and_a_busy_socket_keep_every_byte_in_order() {
        let parts = [
            bytes(200, 1),
            bytes(5000, 2),
            bytes(10, 3),
            bytes(1460, 4),
            bytes(1, 5),
            bytes(70_000, 6),
            bytes(300, 7),
        ];
        for max in [1, 7, 150, 199, 200, 201, 1460, 4096, usize::MAX] {
            for pending_every in [0, 2, 3] {
                let s = send(&parts, max, pending_every).await;
                assert_eq!(
                    s.out,
                    parts.concat(),
                    "max {max}, pending every {pending_every}"
                );
            }
        }
    }
}
