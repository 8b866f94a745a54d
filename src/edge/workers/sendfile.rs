//! A file sent by the kernel (`sendfile`) on a plain connection, inside pingora's framing.
//!
//! pingora writes a body through its own writer, which counts the bytes against the
//! `Content-Length` it announced and decides from that count whether the connection can be
//! kept: a body sent around it would leave the count short and the connection closed. So
//! the body still goes through pingora's writer, as writes of [`placeholder`] bytes, and the
//! connection ([`super::conn::Conn`]), armed with the file, sends the file's next bytes
//! in their place: pingora's count, framing, timeouts and keep-alive stay what they would
//! be, and no byte of the file is copied through user space.
//!
//! Only placeholder bytes stand for the file: they are recognised by their address (this
//! module's static buffer), never by their contents. Any other write while a file is armed
//! fails, which cuts the connection, so a buffer copied on its way (a compression module)
//! can never put the placeholder's zeros on the wire.

use std::fs::File;
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// The placeholder: the largest write that stands for file bytes.
static PLACEHOLDER: [u8; 2 << 20] = [0; 2 << 20];

/// `n` placeholder bytes (`n` at most 2 MiB): written to an armed connection, they stand
/// for the armed file's next `n` bytes.
pub fn placeholder(n: usize) -> Bytes {
    Bytes::from_static(&PLACEHOLDER[..n])
}

/// Whether `buf` lies within the placeholder.
pub(super) fn stands_for_file(buf: &[u8]) -> bool {
    let start = PLACEHOLDER.as_ptr() as usize;
    let at = buf.as_ptr() as usize;
    at >= start && at + buf.len() <= start + PLACEHOLDER.len()
}

/// A file being sent on a socket: where it is, and the socket's own readiness.
#[derive(Debug)]
pub(super) struct FileSend {
    file: Arc<File>,
    offset: u64,
    end: u64,
    /// A duplicate of the connection's socket, registered for writability with the runtime
    /// (the connection's own registration is inside pingora's stream, out of reach).
    socket: AsyncFd<OwnedFd>,
}

impl FileSend {
    /// Send the first `len` bytes of `file` on the socket `fd`.
    #[allow(unsafe_code)]
    pub(super) fn new(fd: RawFd, file: Arc<File>, len: u64) -> io::Result<FileSend> {
        // SAFETY: `fd` is the socket of the connection that arms this send, open for as long
        // as that connection; it is only borrowed here, to be duplicated.
        let socket = unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned()?;
        // SAFETY: the duplicate is owned here and closed only when the `AsyncFd` drops it.
        let socket = unsafe { AsyncFd::register_with_interest(socket, Interest::WRITABLE) }?;
        Ok(FileSend {
            file,
            offset: 0,
            end: len,
            socket,
        })
    }

    /// Send up to `max` of the file's next bytes: how many went. A file that ends before its
    /// length (truncated since it was checked) is an error: the connection is cut, and the
    /// client, counting against `Content-Length`, sees the cut.
    pub(super) fn poll_send(
        &mut self,
        cx: &mut Context<'_>,
        max: usize,
    ) -> Poll<io::Result<usize>> {
        let count = usize::try_from(self.end - self.offset).map_or(max, |left| left.min(max));
        let FileSend {
            file,
            offset,
            socket,
            ..
        } = self;
        loop {
            let mut ready = ready!(socket.poll_write_ready(cx))?;
            let sent = ready.try_io(|s| {
                rustix::fs::sendfile(s.get_ref(), &**file, Some(&mut *offset), count)
                    .map_err(io::Error::from)
            });
            match sent {
                Ok(Ok(0)) if count > 0 => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the file ended before its checked length",
                    )))
                }
                Ok(done) => return Poll::Ready(done),
                // Not writable after all: wait for the next readiness.
                Err(_would_block) => continue,
            }
        }
    }

    /// Whether the whole length went.
    pub(super) fn done(&self) -> bool {
        self.offset >= self.end
    }
}

#[cfg(test)]
mod tests {
    use super::super::conn::Conn;
    use super::*;
    use std::io::Write;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn only_the_placeholder_stands_for_the_file() {
        assert!(stands_for_file(&placeholder(1 << 20)));
        assert!(stands_for_file(&placeholder(10)[3..]));
        let copy = placeholder(10).to_vec();
        assert!(!stands_for_file(&copy), "zeros elsewhere are data");
        assert!(!stands_for_file(b"\0\0\0"));
    }

    /// A served connection and its client's end.
    async fn pair() -> (Conn, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        let (server, peer) = accepted.unwrap();
        (Conn::new(server, peer).unwrap(), client.unwrap())
    }

    fn file_of(bytes: &[u8]) -> Arc<File> {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(bytes).unwrap();
        Arc::new(f)
    }

    #[tokio::test]
    async fn an_armed_connection_sends_the_file_for_placeholders_then_disarms() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let (mut conn, mut client) = pair().await;
        conn.write_all(b"head\r\n").await.unwrap();
        conn.send_file(file_of(&data), data.len() as u64).unwrap();
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; 6 + data.len() + 5];
            client.read_exact(&mut got).await.unwrap();
            (got, data)
        });
        let mut left = 3_000_000;
        while left > 0 {
            let n = left.min(1 << 20);
            conn.write_all(&placeholder(n)).await.unwrap();
            left -= n;
        }
        // Disarmed: ordinary bytes pass again.
        conn.write_all(b"after").await.unwrap();
        conn.flush().await.unwrap();
        let (got, data) = reader.await.unwrap();
        assert_eq!(&got[..6], b"head\r\n", "what was buffered goes first");
        assert!(
            got[6..6 + data.len()] == data[..],
            "the file's bytes, in order"
        );
        assert_eq!(&got[6 + data.len()..], b"after");
    }

    #[tokio::test]
    async fn other_bytes_while_armed_fail_and_never_reach_the_wire() {
        let (mut conn, mut client) = pair().await;
        conn.send_file(file_of(b"0123456789"), 10).unwrap();
        let copied = placeholder(10).to_vec();
        assert!(conn.write_all(&copied).await.is_err());
        drop(conn);
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert!(got.is_empty(), "{got:?}");
    }

    #[tokio::test]
    async fn placeholder_bytes_past_the_armed_length_fail_and_never_reach_the_wire() {
        let (mut conn, mut client) = pair().await;
        conn.send_file(file_of(b"0123456789"), 10).unwrap();
        conn.write_all(&placeholder(10)).await.unwrap();
        assert!(conn.write_all(&placeholder(5)).await.is_err());
        drop(conn);
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"0123456789", "the file, and no zeros after it");
    }

    #[tokio::test]
    async fn a_file_shorter_than_armed_fails_after_what_it_had() {
        let (mut conn, mut client) = pair().await;
        conn.send_file(file_of(b"0123456789"), 20).unwrap();
        let sent = conn.write_all(&placeholder(20)).await;
        let e = sent.expect_err("the file ended early");
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        drop(conn);
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"0123456789", "what the file had, then the close");
    }
}
