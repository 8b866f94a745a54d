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

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::future::BoxFuture;
use http::StatusCode;
use tokio::sync::watch;

use super::blobs::{BlobStore, Hash};

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

/// The upstream body of a fill: its length if known, and a stream of chunks.
pub struct Source {
    pub len: Option<u64>,
    pub body: futures::stream::BoxStream<'static, Result<Bytes, &'static str>>,
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
        let file = Arc::new(
            File::options()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&temp)?,
        );
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
    use futures::StreamExt;
    let Source { len, mut body } = opener.await?;
    if let Some(len) = len {
        if !has_room(&temp, len).await {
            return Err(FillError::NoRoom);
        }
    }
    tx.send_replace(State::Streaming { written: 0, len });
    let mut hasher = blake3::Hasher::new();
    let mut written = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(FillError::Upstream)?;
        hasher.update(&chunk);
        let n = chunk.len() as u64;
        if written + n <= SHARED_PREFIX as u64 {
            prefix.lock().expect("prefix lock").push(chunk.clone());
        }
        let (f, at) = (file.clone(), written);
        tokio::task::spawn_blocking(move || f.write_all_at(&chunk, at))
            .await
            .map_err(|_| FillError::Disk)?
            .map_err(|e| {
                crate::metrics::CACHE_WRITE_ERRORS.inc();
                tracing::error!(error = %e, "cache write failed; this fill is abandoned");
                FillError::Disk
            })?;
        written += n;
        tx.send_replace(State::Streaming { written, len });
    }
    if len.is_some_and(|l| l != written) {
        return Err(FillError::Upstream(
            "body shorter or longer than Content-Length",
        ));
    }
    if written > max_object_size {
        tracing::warn!(
            bytes = written,
            "tarball over limits.max_object_size: served, not cached"
        );
        return Ok(None);
    }
    let hash = hasher.finalize();
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

    /// A reader positioned at the start of the body.
    pub fn reader(&self) -> FillReader {
        FillReader {
            file: self.file.clone(),
            state: self.state.clone(),
            prefix: self.prefix.clone(),
            next_chunk: 0,
            offset: 0,
        }
    }
}

pub struct FillReader {
    file: Arc<File>,
    state: watch::Receiver<State>,
    prefix: Arc<Mutex<Vec<Bytes>>>,
    /// Index of the next in-memory chunk, while the reader is within the prefix.
    next_chunk: usize,
    offset: u64,
}

impl FillReader {
    /// The next bytes of the body as soon as they are on disk; `None` at the verified end.
    pub async fn next(&mut self) -> Result<Option<Bytes>, FillError> {
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
