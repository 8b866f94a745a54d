//! One upstream fetch per missing tarball, however many clients ask at once.
//!
//! The first request for a missing key starts a *fill*: a task of its own (it outlives any
//! client) that streams the upstream body into a temp file while hashing it. Every client for
//! that key, the first included, reads the same temp file from its own offset and is woken by
//! a `watch` channel as each chunk lands, so waiters get bytes as soon as they exist and memory
//! use is one chunk per reader whatever the tarball size. When the body is complete and its
//! length checked, the file is fsynced and committed under its hash; a fill that fails or is
//! cut short is deleted and every reader gets an error, so nothing partial is kept or served as
//! complete.
//!
//! A body is kept only when its end is known to be the real end ([`End`]): the declared
//! `Content-Length` was matched, or the upstream marked the end (chunked's terminal chunk,
//! HTTP/2's END_STREAM), and its bytes, when they are a gzipped tar, are whole
//! ([`super::archive`]). A close-delimited body (no length, no chunking: what a cut looks like
//! too) is streamed to its readers but never kept, and is failed when its gzip stream shows
//! it was cut.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::StreamExt;
use http::StatusCode;
use tokio::sync::watch;

use super::archive::{Checker, Verdict};
use super::blobs::{BlobStore, Hash};
use super::body::{Body, BodyError};

/// Largest read handed to one client at a time.
const READ_CHUNK: u64 = 256 * 1024;
/// The first bytes of every fill are also kept in memory, so that waiters of small tarballs
/// (most modules) get them without a disk read each: a cold burst of 100 clients otherwise
/// costs hundreds of blocking-pool hops. Past this, readers go to the file.
const SHARED_PREFIX: usize = 8 << 20;

/// Why a fill did not produce a tarball.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FillError {
    /// The upstream refused (401, 404, ...): relay this status to the client.
    Refused(StatusCode),
    /// The upstream could not be reached, timed out, or cut the body short.
    Upstream(&'static str),
    /// Local disk trouble.
    Disk,
    /// Over `limits.max_object_size`: streamed, not kept.
    TooLarge,
    /// The cache disk has no room for a body of this length: nothing was read or written.
    NoRoom,
}

impl FillError {
    /// The status to answer a client whose fill failed: GitLab's refusal, else a 502.
    pub fn status(&self) -> StatusCode {
        match self {
            FillError::Refused(s) => *s,
            _ => StatusCode::BAD_GATEWAY,
        }
    }
}

#[derive(Debug, Clone)]
pub enum State {
    /// Waiting for the upstream's response head.
    Connecting,
    /// Streaming: `len` is the upstream's Content-Length when it sent one.
    Streaming {
        written: u64,
        len: Option<u64>,
    },
    Done {
        hash: Hash,
        size: u64,
    },
    /// Complete, but over `limits.max_object_size`: served, not kept.
    Streamed {
        size: u64,
    },
    Failed(FillError),
}

/// How the upstream delimited a body: can the end of the stream be trusted as its end?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// A declared `Content-Length`: fewer bytes are an error, and the count is checked.
    Length(u64),
    /// Chunked (terminal chunk) or HTTP/2 (END_STREAM): a cut is an error, not an end.
    Marked,
    /// Close-delimited: a reset or a crash upstream looks exactly like the end.
    Close,
}

impl End {
    /// From a response head, as hyper frames the body (RFC 9112 §6.3): `Transfer-Encoding`
    /// ending in `chunked` wins, then `Content-Length`; HTTP/2 always marks its end; anything
    /// else on HTTP/1 is read until the connection closes.
    pub fn of(version: http::Version, headers: &http::HeaderMap) -> End {
        let te = headers.get_all(http::header::TRANSFER_ENCODING);
        let last_coding = te
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .next_back();
        let length = headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let h2 = version >= http::Version::HTTP_2;
        match (last_coding, length) {
            (Some(c), _) if !h2 => {
                if c.eq_ignore_ascii_case("chunked") {
                    End::Marked
                } else {
                    End::Close
                }
            }
            (_, Some(n)) => End::Length(n),
            _ if h2 => End::Marked,
            _ => End::Close,
        }
    }

    pub fn declared_len(self) -> Option<u64> {
        match self {
            End::Length(n) => Some(n),
            _ => None,
        }
    }
}

/// The upstream body of a fill: how it ends, and a stream of chunks.
pub struct Source {
    pub end: End,
    pub body: futures::stream::BoxStream<'static, Result<Bytes, &'static str>>,
}

impl Source {
    /// The body's length, when the upstream declared it.
    pub fn declared_len(&self) -> Option<u64> {
        self.end.declared_len()
    }
}

pub type Opener = BoxFuture<'static, Result<Source, FillError>>;

pub struct Fill {
    file: Arc<File>,
    state: watch::Receiver<State>,
    /// The body's first chunks, up to `SHARED_PREFIX` bytes.
    prefix: Arc<Mutex<Vec<Bytes>>>,
}

pub struct Fills {
    inflight: Mutex<HashMap<String, Arc<Fill>>>,
    /// Bounds the fills talking to the upstream at once (`limits.max_fills`).
    permits: Arc<tokio::sync::Semaphore>,
    /// Bodies larger than this are streamed to their readers but never committed.
    max_object_size: u64,
}

impl Fills {
    pub fn new(max_fills: usize, max_object_size: u64) -> Fills {
        Fills {
            inflight: Mutex::new(HashMap::new()),
            permits: Arc::new(tokio::sync::Semaphore::new(max_fills)),
            max_object_size,
        }
    }
}

impl Fills {
    /// Join the fill for `key`, or start one with `open`. Returns the fill and whether this
    /// call started it. `on_commit` runs (on the blocking pool) once the blob is in place,
    /// before readers are told the fill is done.
    pub fn join_or_start(
        self: &Arc<Self>,
        key: &str,
        blobs: Arc<BlobStore>,
        open: impl FnOnce() -> Opener,
        on_commit: impl FnOnce(Hash, u64) + Send + 'static,
    ) -> std::io::Result<(Arc<Fill>, bool)> {
        let mut inflight = self.inflight.lock().expect("fills lock");
        if let Some(f) = inflight.get(key) {
            return Ok((f.clone(), false));
        }
        // Creating an empty file is a single metadata syscall; it happens under the lock so
        // that exactly one fill per key can exist.
        let temp = blobs.temp_path();
        let file = Arc::new(super::private::create_new(&temp)?);
        let (tx, rx) = watch::channel(State::Connecting);
        let prefix = Arc::new(Mutex::new(Vec::new()));
        let fill = Arc::new(Fill {
            file: file.clone(),
            state: rx,
            prefix: prefix.clone(),
        });
        inflight.insert(key.to_string(), fill.clone());
        drop(inflight);

        let fills = self.clone();
        let key = key.to_string();
        let opener = open();
        tokio::spawn(async move {
            // Wait for a permit before talking to the upstream; readers wait meanwhile.
            let permit = fills.permits.clone().acquire_owned().await;
            let limit = fills.max_object_size;
            let result = run(
                opener,
                &tx,
                file,
                prefix,
                temp.clone(),
                blobs,
                limit,
                on_commit,
            )
            .await;
            drop(permit);
            // Leave the map before announcing the end, so a request arriving after a failure
            // starts a fresh fill instead of joining a dead one.
            fills.inflight.lock().expect("fills lock").remove(&key);
            match result {
                Ok(Some((hash, size))) => tx.send_replace(State::Done { hash, size }),
                // Streamed to its readers, too large to keep.
                Ok(None) => {
                    // Readers keep their handle on the unlinked file until they are done.
                    let size = std::fs::metadata(&temp).map_or(0, |m| m.len());
                    let _ = std::fs::remove_file(&temp);
                    tx.send_replace(State::Streamed { size })
                }
                Err(e) => {
                    let _ = std::fs::remove_file(&temp);
                    tx.send_replace(State::Failed(e))
                }
            };
        });
        Ok((fill, true))
    }

    pub fn in_flight(&self) -> usize {
        self.inflight.lock().expect("fills lock").len()
    }
}

#[allow(clippy::too_many_arguments)]
async fn run(
    opener: Opener,
    tx: &watch::Sender<State>,
    file: Arc<File>,
    prefix: Arc<Mutex<Vec<Bytes>>>,
    temp: PathBuf,
    blobs: Arc<BlobStore>,
    max_object_size: u64,
    on_commit: impl FnOnce(Hash, u64) + Send + 'static,
) -> Result<Option<(Hash, u64)>, FillError> {
    let Source { end, body } = opener.await?;
    let len = end.declared_len();
    if let Some(len) = len {
        if !has_room(&temp, len).await {
            return Err(FillError::NoRoom);
        }
    }
    tx.send_replace(State::Streaming { written: 0, len });
    let (hash, written, verdict) = write_body(body, len, tx, &file, &prefix).await?;
    if len.is_some_and(|l| l != written) {
        return Err(FillError::Upstream(
            "body shorter or longer than Content-Length",
        ));
    }
    if !judge(end, verdict, written, max_object_size)? {
        return Ok(None);
    }
    let f = file.clone();
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        f.sync_all()?;
        blobs.commit(&temp, &hash, written)?;
        on_commit(hash, written);
        Ok(())
    })
    .await
    .map_err(|_| FillError::Disk)?
    .map_err(|e| {
        tracing::error!(error = %e, "cache commit failed");
        FillError::Disk
    })?;
    Ok(Some((hash, written)))
}

/// Stream the body into the temp file, announcing progress to the readers: its hash, its
/// length, and what the archive check says of its bytes.
async fn write_body(
    mut body: futures::stream::BoxStream<'static, Result<Bytes, &'static str>>,
    len: Option<u64>,
    tx: &watch::Sender<State>,
    file: &Arc<File>,
    prefix: &Mutex<Vec<Bytes>>,
) -> Result<(Hash, u64, Verdict), FillError> {
    let mut hasher = blake3::Hasher::new();
    let mut checker = Some(Checker::default());
    let mut written = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(FillError::Upstream)?;
        hasher.update(&chunk);
        let n = chunk.len() as u64;
        if written + n <= SHARED_PREFIX as u64 {
            prefix.lock().expect("prefix lock").push(chunk.clone());
        }
        let (f, at) = (file.clone(), written);
        // The archive check decompresses: it runs beside the write, off the async threads.
        let mut check = checker
            .take()
            .expect("checker is put back after each chunk");
        let (wrote, check) = tokio::task::spawn_blocking(move || {
            let wrote = f.write_all_at(&chunk, at);
            check.feed(&chunk);
            (wrote, check)
        })
        .await
        .map_err(|_| FillError::Disk)?;
        checker = Some(check);
        wrote.map_err(|e| {
            crate::metrics::CACHE_WRITE_ERRORS.inc();
            tracing::error!(error = %e, "cache write failed; this fill is abandoned");
            FillError::Disk
        })?;
        written += n;
        tx.send_replace(State::Streaming { written, len });
    }
    let verdict = checker.map_or(Verdict::Unchecked, Checker::verdict);
    Ok((hasher.finalize(), written, verdict))
}

/// [`keep`], carried out: `Ok(true)` to commit, `Ok(false)` to serve without keeping, `Err`
/// to fail the readers. Counted and logged.
fn judge(
    end: End,
    verdict: Verdict,
    written: u64,
    max_object_size: u64,
) -> Result<bool, FillError> {
    match keep(end, verdict, written, max_object_size) {
        Keep::Yes => Ok(true),
        Keep::Fail => {
            crate::metrics::FILLS_NOT_KEPT
                .with_label_values(&[verdict.as_str()])
                .inc();
            tracing::error!(
                bytes = written,
                check = verdict.as_str(),
                "upstream body ended without framing and its gzip stream is cut: failed"
            );
            Err(FillError::Upstream("close-delimited body cut short"))
        }
        Keep::No(reason) => {
            crate::metrics::FILLS_NOT_KEPT
                .with_label_values(&[reason])
                .inc();
            tracing::warn!(bytes = written, reason, "tarball served, not cached");
            Ok(false)
        }
    }
}

/// What to do with a body that streamed to its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// Commit it.
    Yes,
    /// Serve it to its readers as a whole body, but do not keep it; the reason is a label.
    No(&'static str),
    /// It is known to be cut: fail the readers (their connections are cut).
    Fail,
}

/// Keep a finished body? `end` is how the upstream framed it, `verdict` what its bytes say.
pub fn keep(end: End, verdict: Verdict, size: u64, max_object_size: u64) -> Keep {
    match (end, verdict) {
        // Nothing marked the end and the bytes prove the stream was cut.
        (End::Close, Verdict::BadGzip) => Keep::Fail,
        (End::Close, _) => Keep::No("unframed"),
        // The upstream says this is all: serve it as it is (Terraform may cope, e.g. with
        // data after the tar's end), but never keep bytes that fail the check.
        (_, v) if !v.keep() => Keep::No(v.as_str()),
        _ if size > max_object_size => Keep::No("too_large"),
        _ => Keep::Yes,
    }
}

/// Room left on the cache's filesystem for `len` more bytes (plus 1 MiB of slack)? Checked
/// before the first byte, so that a tarball that cannot fit is served by pass-through
/// instead of failing half-way.
async fn has_room(temp: &std::path::Path, len: u64) -> bool {
    let Some(dir) = temp.parent().map(std::path::Path::to_path_buf) else {
        return true;
    };
    tokio::task::spawn_blocking(move || {
        nix::sys::statvfs::statvfs(&dir)
            .map(|s| s.blocks_available().saturating_mul(s.fragment_size()))
            .map_or(true, |free| free > len.saturating_add(1 << 20))
    })
    .await
    .unwrap_or(true)
}

impl Fill {
    /// Wait for the upstream's response head: the body length if known, or the failure.
    pub async fn started(&self) -> Result<Option<u64>, FillError> {
        let mut rx = self.state.clone();
        loop {
            match &*rx.borrow_and_update() {
                State::Connecting => {}
                State::Streaming { len, .. } => return Ok(*len),
                State::Done { size, .. } | State::Streamed { size } => return Ok(Some(*size)),
                State::Failed(e) => return Err(e.clone()),
            }
            if rx.changed().await.is_err() {
                return Err(FillError::Upstream("fill ended"));
            }
        }
    }

    /// Wait until the fill is committed (or failed).
    pub async fn finished(&self) -> Result<(Hash, u64), FillError> {
        let mut rx = self.state.clone();
        loop {
            match &*rx.borrow_and_update() {
                State::Done { hash, size } => return Ok((*hash, *size)),
                State::Streamed { .. } => return Err(FillError::TooLarge),
                State::Failed(e) => return Err(e.clone()),
                _ => {}
            }
            if rx.changed().await.is_err() {
                return Err(FillError::Upstream("fill ended"));
            }
        }
    }

    /// The body as it lands, for one client: it ends once the fill is committed (or
    /// complete but too large to keep), and with [`BodyError::Fill`] when the fill fails, so
    /// a cut upstream body is never an end. Wrap it in [`super::body::hold_last`] where the
    /// commit is what verifies the bytes.
    pub fn body(&self) -> Body {
        futures::stream::unfold(Some(self.reader()), |state| async move {
            let mut reader = state?;
            match reader.next().await {
                Ok(Some(chunk)) => Some((Ok(chunk), Some(reader))),
                Ok(None) => None,
                Err(e) => Some((Err(BodyError::Fill(e)), None)),
            }
        })
        .boxed()
    }

    /// A reader positioned at the start of the body.
    fn reader(&self) -> FillReader {
        FillReader {
            file: self.file.clone(),
            state: self.state.clone(),
            prefix: self.prefix.clone(),
            next_chunk: 0,
            offset: 0,
        }
    }
}

/// One client's position in a fill's body (see [`Fill::body`]).
struct FillReader {
    file: Arc<File>,
    state: watch::Receiver<State>,
    prefix: Arc<Mutex<Vec<Bytes>>>,
    /// Index of the next in-memory chunk, while the reader is within the prefix.
    next_chunk: usize,
    offset: u64,
}

impl FillReader {
    /// The next bytes of the body as soon as they are on disk; `None` at the verified end.
    async fn next(&mut self) -> Result<Option<Bytes>, FillError> {
        loop {
            let available = match &*self.state.borrow_and_update() {
                State::Connecting => 0,
                State::Streaming { written, .. } => *written,
                State::Done { size, .. } | State::Streamed { size } => {
                    if self.offset >= *size {
                        return Ok(None);
                    }
                    *size
                }
                State::Failed(e) => return Err(e.clone()),
            };
            if available > self.offset {
                // Within the in-memory prefix: no disk read.
                let chunk = self
                    .prefix
                    .lock()
                    .expect("prefix lock")
                    .get(self.next_chunk)
                    .cloned();
                if let Some(c) = chunk {
                    self.next_chunk += 1;
                    self.offset += c.len() as u64;
                    return Ok(Some(c));
                }
                let n = (available - self.offset).min(READ_CHUNK);
                let (f, at) = (self.file.clone(), self.offset);
                let buf = tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; n as usize];
                    f.read_exact_at(&mut buf, at).map(|_| buf)
                })
                .await
                .map_err(|_| FillError::Disk)?
                .map_err(|_| FillError::Disk)?;
                self.offset += n;
                return Ok(Some(Bytes::from(buf)));
            }
            if self.state.changed().await.is_err() {
                return Err(FillError::Upstream("fill ended"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;
    use http::{HeaderMap, HeaderValue, Version};

    fn head(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn how_a_body_ends() {
        let h11 = Version::HTTP_11;
        let table = [
            (h11, vec![("content-length", "10")], End::Length(10)),
            (h11, vec![("transfer-encoding", "chunked")], End::Marked),
            (h11, vec![("transfer-encoding", "Chunked")], End::Marked),
            (
                h11,
                vec![("transfer-encoding", "gzip, chunked")],
                End::Marked,
            ),
            // chunked not last: read until close, whatever Content-Length says.
            (
                h11,
                vec![("transfer-encoding", "chunked, gzip")],
                End::Close,
            ),
            (
                h11,
                vec![("transfer-encoding", "chunked"), ("content-length", "5")],
                End::Marked,
            ),
            (h11, vec![], End::Close),
            (Version::HTTP_10, vec![], End::Close),
            (Version::HTTP_2, vec![], End::Marked),
            (
                Version::HTTP_2,
                vec![("content-length", "7")],
                End::Length(7),
            ),
        ];
        for (version, pairs, want) in table {
            assert_eq!(
                End::of(version, &head(&pairs)),
                want,
                "{version:?} {pairs:?}"
            );
        }
    }

    #[test]
    fn what_is_kept() {
        use Verdict::*;
        let table = [
            (End::Length(5), Whole, 5, Keep::Yes),
            (End::Marked, Whole, 5, Keep::Yes),
            (End::Marked, Unchecked, 5, Keep::Yes),
            (End::Marked, GzipOnly, 5, Keep::Yes),
            (End::Marked, BadGzip, 5, Keep::No("bad_gzip")),
            (
                End::Length(5),
                NoEndOfArchive,
                5,
                Keep::No("no_end_of_archive"),
            ),
            (End::Close, Whole, 5, Keep::No("unframed")),
            (End::Close, Unchecked, 5, Keep::No("unframed")),
            (End::Close, BadGzip, 5, Keep::Fail),
            (End::Marked, Whole, 50, Keep::No("too_large")),
        ];
        for (end, verdict, size, want) in table {
            assert_eq!(
                keep(end, verdict, size, 10),
                want,
                "{end:?} {verdict:?} {size}"
            );
        }
    }

    fn gzipped(n: usize) -> Bytes {
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let noise: Vec<u8> = (0..n).map(|i| (i * 7919 % 251) as u8).collect();
        gz.write_all(&noise).unwrap();
        Bytes::from(gz.finish().unwrap())
    }

    /// Run one fill of `body` framed as `end`; its final state and the files left in blobs/.
    async fn fill_once(end: End, body: Bytes) -> (State, usize) {
        let dir = tempfile::tempdir().unwrap();
        let blobs = Arc::new(BlobStore::open(dir.path(), 1 << 30).unwrap());
        let fills = Arc::new(Fills::new(4, 1 << 30));
        let pieces: Vec<Result<Bytes, &'static str>> = body
            .chunks(1000)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        let open = move || -> Opener {
            async move {
                Ok(Source {
                    end,
                    body: futures::stream::iter(pieces).boxed(),
                })
            }
            .boxed()
        };
        let (fill, _) = fills
            .join_or_start("k", blobs.clone(), open, |_, _| {})
            .unwrap();
        let _ = fill.finished().await;
        let state = fill.state.borrow().clone();
        (state, blobs.list().unwrap().len())
    }

    #[tokio::test]
    async fn only_bodies_with_a_trusted_end_are_kept() {
        let whole = gzipped(20_000);
        let cut = whole.slice(..whole.len() / 2);

        let (state, kept) = fill_once(End::Marked, whole.clone()).await;
        assert!(matches!(state, State::Done { .. }), "{state:?}");
        assert_eq!(kept, 1);

        // Close-delimited and whole: served, not kept.
        let (state, kept) = fill_once(End::Close, whole.clone()).await;
        assert!(matches!(state, State::Streamed { .. }), "{state:?}");
        assert_eq!(kept, 0);

        // Close-delimited and cut: the gzip stream shows it, readers fail.
        let (state, kept) = fill_once(End::Close, cut.clone()).await;
        assert!(matches!(state, State::Failed(_)), "{state:?}");
        assert_eq!(kept, 0);

        // A declared length the body falls short of: failed.
        let (state, kept) = fill_once(End::Length(whole.len() as u64), cut).await;
        assert!(matches!(state, State::Failed(_)), "{state:?}");
        assert_eq!(kept, 0);
    }
}
