//! The one writer: a [`Reply`] value as bytes on pingora's session. Everything below the edge
//! returns values ([`crate::respond`]); only the edge writes them, here, so framing (a cut
//! must show: `Content-Length`, chunked, HTTP/2 frames, or an abortive close) is decided in
//! one place.

use std::fs::File;
use std::sync::Arc;

use bytes::Bytes;
use http::StatusCode;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::Result;

use super::workers::conn::Conn;
use super::workers::sendfile::placeholder;
use crate::cache::artifact::Sink;
use crate::respond::{
    decimal, framing, head, Body, BodyCut, BodyStream, CacheStatus, Framing, Reply,
};

/// The one writer: a [`Reply`] as bytes on the session. HEAD gets the head only (a stream's
/// unknown length is then not announced). A streamed body's error returns an error after
/// the bytes so far, which cuts the connection or stream: with chunked or HTTP/2 framing the
/// client sees a broken body, never a short one that looks whole.
pub async fn reply(session: &mut Session, reply: Reply) -> Result<()> {
    let head_request = session.req_header().method == http::Method::HEAD;
    let (mut h, body) = head(reply)?;
    match body {
        Body::Full(bytes) => {
            let head_only = head_request || bytes.is_empty();
            session.write_response_header(h, head_only).await?;
            if !head_only {
                write_full(session, bytes).await?;
            }
            Ok(())
        }
        Body::File { len, file } => {
            session.write_response_header(h, head_request).await?;
            if head_request {
                return Ok(());
            }
            write_file(session, file, len).await
        }
        Body::Stream { len, chunks } => {
            frame(session, &mut h, len, head_request)?;
            session.write_response_header(h, head_request).await?;
            if head_request {
                return Ok(());
            }
            write_stream(session, chunks).await
        }
    }
}

/// A whole body larger than this goes out a slice at a time, the connection's task yielding
/// between slices, as nginx caps each turn of a connection at `sendfile_max_chunk`: a
/// connection runs on one thread among many (`workers`), and one whose socket keeps taking a
/// large hit must not keep the others on that thread waiting until it is all written.
pub const SLICE: usize = 1024 * 1024;

/// A file sent by the kernel goes a turn at a time too, in larger slices: a turn costs no
/// copy, and nginx's own cap is 2 MiB (`sendfile_max_chunk`).
pub const FILE_SLICE: usize = 2 * SLICE;

/// A whole body, in slices of [`SLICE`] (zero-copy: `Bytes` slices of one buffer). The first
/// goes out with the head in one write (see `workers::conn`).
async fn write_full(session: &mut Session, mut bytes: Bytes) -> Result<()> {
    while bytes.len() > SLICE {
        let slice = bytes.split_to(SLICE);
        session.write_response_body(Some(slice), false).await?;
        tokio::task::yield_now().await;
    }
    session.write_response_body(Some(bytes), true).await
}

/// How this session's connection can take a large cached artifact: sent by the kernel
/// ([`Sink::File`]) on plain HTTP/1 over tfmirror's own connection type, a GET; streamed
/// otherwise (TLS, HTTP/2: the bytes must pass through user space anyway).
pub fn sink(session: &Session) -> Sink {
    let plain_h1 = session.req_header().version <= http::Version::HTTP_11
        && session.req_header().method == http::Method::GET;
    if plain_h1 && conn(session).is_some() {
        Sink::File
    } else {
        Sink::Stream
    }
}

/// The session's connection, when it is tfmirror's own plain TCP one (not TLS, not HTTP/2).
fn conn(session: &Session) -> Option<&Conn> {
    let stream = session.stream()?;
    let io: &dyn pingora::protocols::IO = stream.as_ref();
    io.as_any().downcast_ref::<Conn>()
}

/// A file checked whole, `len` bytes: sent by the kernel through pingora's writer (see
/// `workers::sendfile`), in slices of [`SLICE`] with a yield between them as whole bodies
/// are. Where the connection cannot (TLS, HTTP/2), its bytes are read and written.
async fn write_file(session: &mut Session, file: Arc<File>, len: u64) -> Result<()> {
    let Some(conn) = conn(session) else {
        return write_stream(session, file_chunks(file, len)).await;
    };
    conn.send_file(file, len)
        .map_err(|e| pingora::Error::because(pingora::ErrorType::WriteError, "sendfile", e))?;
    crate::metrics::FILE_SENDS.inc();
    let mut left = len;
    while left > FILE_SLICE as u64 {
        session
            .write_response_body(Some(placeholder(FILE_SLICE)), false)
            .await?;
        left -= FILE_SLICE as u64;
        tokio::task::yield_now().await;
    }
    session
        .write_response_body(Some(placeholder(left as usize)), true)
        .await
}

/// A checked file's bytes, read a slice at a time on the blocking pool.
fn file_chunks(file: Arc<File>, len: u64) -> BodyStream {
    use futures::StreamExt;
    futures::stream::try_unfold(0u64, move |at| {
        let file = file.clone();
        async move {
            if at >= len {
                return Ok(None);
            }
            let want = (len - at).min(SLICE as u64) as usize;
            let read = tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; want];
                std::os::unix::fs::FileExt::read_exact_at(&*file, &mut buf, at).map(|()| buf)
            });
            let buf = read.await.map_err(|e| Box::new(e) as BodyCut)??;
            Ok(Some((Bytes::from(buf), at + want as u64)))
        }
    })
    .boxed()
}

/// Set the framing headers of a streamed body (see [`framing`]).
fn frame(
    session: &mut Session,
    h: &mut ResponseHeader,
    len: Option<u64>,
    head: bool,
) -> Result<()> {
    match framing(session.req_header().version, len) {
        Framing::Length(n) => h.insert_header(http::header::CONTENT_LENGTH, decimal(n))?,
        Framing::Frames => {}
        Framing::Chunked if !head => h.insert_header(http::header::TRANSFER_ENCODING, "chunked")?,
        Framing::Chunked => {}
        Framing::Close => {
            // Say `Connection: close` instead of keep-alive, and close after the body.
            session.set_keepalive(None);
            if !head {
                crate::metrics::UNFRAMED_RESPONSES.inc();
            }
        }
    }
    Ok(())
}

/// Copy a stream to the session; its error becomes ours, which makes pingora cut.
async fn write_stream(session: &mut Session, mut chunks: BodyStream) -> Result<()> {
    use futures::StreamExt;
    while let Some(chunk) = chunks.next().await {
        match chunk {
            Ok(c) => session.write_response_body(Some(c), false).await?,
            Err(why) => {
                if framing(session.req_header().version, None) == Framing::Close {
                    // The end of this body is the connection's close: only an abortive one
                    // tells the client it was cut.
                    reset_on_close(session);
                }
                let e = pingora::Error::because(pingora::ErrorType::ReadError, "body cut", why);
                return Err(e.into_up());
            }
        }
    }
    session.write_response_body(Some(Bytes::new()), true).await
}

/// Make the client connection's close abortive (a TCP RST, `SO_LINGER` 0): where a body is
/// delimited by the close (HTTP/1.0 and an unknown length), a cut must not end in the FIN
/// that ends a whole body. Curl and Go report the reset as an error; a FIN they would take
/// for the end.
#[allow(unsafe_code)]
fn reset_on_close(session: &Session) {
    let Some(stream) = session.stream() else {
        return;
    };
    // The stream's unique id is its socket's descriptor (pingora's l4 stream, and
    // `workers::conn::Conn` which passes it through).
    let fd = pingora::protocols::UniqueID::id(stream.as_ref());
    // SAFETY: `fd` belongs to the stream `session` owns; the borrow of `session` keeps the
    // stream, and so the descriptor, open for as long as the borrowed fd is used here.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    if let Err(e) = socket2::SockRef::from(&fd).set_linger(Some(std::time::Duration::ZERO)) {
        tracing::debug!(error = %e, "could not make the close abortive");
    }
}

/// Write a complete JSON response. `HEAD` gets the headers only.
pub async fn json(session: &mut Session, status: StatusCode, body: String) -> Result<()> {
    self::reply(session, Reply::json(status, body)).await
}

/// A GitLab-shaped error response for `status`.
pub async fn error(session: &mut Session, status: StatusCode) -> Result<()> {
    self::reply(session, Reply::error(status)).await
}

/// A GitLab-shaped error for a registry route (see [`Reply::registry_error`]).
pub async fn registry_error(
    session: &mut Session,
    status: StatusCode,
    cache: CacheStatus,
) -> Result<()> {
    self::reply(session, Reply::registry_error(status, cache)).await
}
