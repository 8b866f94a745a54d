//! A blob read back from disk and checked against its blake3 address as it streams.
//!
//! Large blobs are never held in memory whole, so they cannot be verified before the first
//! byte goes out. Instead the hash runs beside the reads and the last chunk is released only
//! once the whole blob hashed to its address: a blob damaged on disk (a flipped bit, a
//! truncation) never reaches a client complete. The damaged blob is deleted, with the record
//! that names it, so the next request fills it again.
//!
//! Reads and the hash run on the blocking pool, a chunk at a time, never on the runtime
//! thread that serves the connection (and its neighbours): 64 readers of a large provider zip
//! hash gigabytes. One chunk is read ahead while the previous one is written, so the disk and
//! the socket overlap; a reader holds at most two chunks, whatever the blob's size. The last
//! chunk is known from the length the file had when opened (checked against the index), so
//! nothing is held back but the last one.

use std::fs::File;
use std::io;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;

use super::blobs::Hash;
use super::body::{Body, BodyError};
use super::Cache;

/// Largest read handed to a client at a time.
const DISK_CHUNK: usize = 256 * 1024;

/// An open blob, to be streamed verified ([`VerifiedBlob::into_body`]).
pub struct VerifiedBlob {
    pub(super) cache: Arc<Cache>,
    /// The record (tarball index key) that names the blob, dropped with it when corrupt.
    key: String,
    pub(super) hash: Hash,
    pub(super) file: Arc<File>,
    pub(super) len: u64,
    /// The file's inode: which file of this address was opened (a refill makes another).
    pub(super) inode: u64,
    /// What the blob is, for the log: "tarball", "provider package".
    what: &'static str,
}

impl VerifiedBlob {
    /// Open the blob `hash`, named by the record `key`. `None` when it is not on disk.
    pub async fn open(
        cache: &Arc<Cache>,
        key: &str,
        hash: Hash,
        what: &'static str,
    ) -> io::Result<Option<VerifiedBlob>> {
        let blobs = cache.blobs.clone();
        let opened = tokio::task::spawn_blocking(move || {
            let Some((file, len)) = blobs.open_blob(&hash)? else {
                return Ok(None);
            };
            let inode = std::os::unix::fs::MetadataExt::ino(&file.metadata()?);
            Ok::<_, io::Error>(Some((file, len, inode)))
        })
        .await
        .map_err(io::Error::other)??;
        Ok(opened.map(|(file, len, inode)| VerifiedBlob {
            cache: cache.clone(),
            key: key.to_string(),
            hash,
            file: Arc::new(file),
            len,
            inode,
            what,
        }))
    }

    /// The blob, if it is `indexed` bytes long. A file of another length (truncated by a
    /// full disk or by hand) is damaged, and is found out before a head that would announce
    /// its wrong length goes out: it is deleted (its record is the caller's to drop).
    pub fn with_len(self, indexed: u64) -> Option<VerifiedBlob> {
        if self.len == indexed {
            return Some(self);
        }
        tracing::error!(
            blob = %self.hash.to_hex(),
            on_disk = self.len,
            indexed,
            "{} on disk has the wrong length: deleted, will refetch",
            self.what
        );
        self.discard();
        None
    }

    /// The blob's chunks, verified: the last one comes only once the whole blob hashed to
    /// its address; otherwise the body ends with [`BodyError::Corrupt`], the blob and its
    /// record already deleted.
    pub fn into_body(self) -> Body {
        let first = read_ahead(&self, 0, blake3::Hasher::new());
        let reading = Reading {
            blob: self,
            next: Some(first),
        };
        futures::stream::unfold(Some(reading), |state| async move {
            let mut reading = state?;
            match reading.step().await {
                Ok(Some((chunk, more))) => Some((Ok(chunk), more.then_some(reading))),
                Ok(None) => None,
                Err(e) => Some((Err(e), None)),
            }
        })
        .boxed()
    }

    /// The blob did not hash to its address, or was cut short: delete it and its record.
    pub(super) async fn discard_corrupt(&self) {
        tracing::error!(
            blob = %self.hash.to_hex(),
            "corrupt {} on disk: deleted, will refetch",
            self.what
        );
        self.discard();
        self.cache.drop_tarball(&self.key).await;
    }

    /// Delete the blob from disk and from the memory tier.
    fn discard(&self) {
        self.cache.blobs.remove(&self.hash);
        self.cache.forget(&self.hash);
    }
}

/// A blob part-way read: the next chunk is being read (and hashed) on the blocking pool.
struct Reading {
    blob: VerifiedBlob,
    next: Option<tokio::task::JoinHandle<io::Result<Chunk>>>,
}

/// One chunk read and hashed, with the hash so far.
struct Chunk {
    bytes: Vec<u8>,
    hasher: blake3::Hasher,
    /// Where the next chunk starts.
    offset: u64,
    /// At the blob's end: whether it all hashed to its address and was as long as indexed.
    end: Option<bool>,
}

impl Reading {
    /// The next chunk and whether more follow; `None` at the end of an empty blob that
    /// checked out.
    async fn step(&mut self) -> Result<Option<(Bytes, bool)>, BodyError> {
        let Some(pending) = self.next.take() else {
            return Ok(None);
        };
        let chunk = pending
            .await
            .map_err(|e| BodyError::Read(io::Error::other(e)))?
            .map_err(BodyError::Read)?;
        match chunk.end {
            Some(false) => Err(self.corrupt().await),
            Some(true) if chunk.bytes.is_empty() => Ok(None),
            Some(true) => Ok(Some((Bytes::from(chunk.bytes), false))),
            None => {
                self.next = Some(read_ahead(&self.blob, chunk.offset, chunk.hasher));
                Ok(Some((Bytes::from(chunk.bytes), true)))
            }
        }
    }

    /// The blob did not hash to its address, or was cut short: delete it and its record.
    async fn corrupt(&self) -> BodyError {
        self.blob.discard_corrupt().await;
        BodyError::Corrupt
    }
}

/// Start reading (and hashing) the chunk of `blob` at `offset` on the blocking pool.
fn read_ahead(
    blob: &VerifiedBlob,
    offset: u64,
    hasher: blake3::Hasher,
) -> tokio::task::JoinHandle<io::Result<Chunk>> {
    let (file, len, hash) = (blob.file.clone(), blob.len, blob.hash);
    tokio::task::spawn_blocking(move || read_chunk(&file, len, hash, offset, hasher))
}

/// Up to `DISK_CHUNK` bytes of a blob file of `len` bytes from `offset`, hashed; at the end,
/// the verdict. A file that ends early (truncated since it was opened) is a failed verdict.
fn read_chunk(
    file: &File,
    len: u64,
    hash: Hash,
    offset: u64,
    mut hasher: blake3::Hasher,
) -> io::Result<Chunk> {
    let want = (len - offset).min(DISK_CHUNK as u64) as usize;
    // Read into the spare capacity: zero-filling each chunk first cost an eighth of the
    // reader's CPU (a profile of 16 readers of a 256 MiB blob).
    let mut bytes = Vec::with_capacity(want);
    while bytes.len() < want {
        let at = offset + bytes.len() as u64;
        let room = rustix::buffer::spare_capacity(&mut bytes);
        match rustix::io::pread(file, room, at) {
            Ok(0) => break,
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    // `with_capacity` may give more room than asked: never more than this chunk.
    bytes.truncate(want);
    let got = bytes.len();
    hasher.update(&bytes);
    let offset = offset + got as u64;
    let end = if got < want {
        Some(false)
    } else if offset == len {
        Some(hasher.finalize() == hash)
    } else {
        None
    };
    Ok(Chunk {
        bytes,
        hasher,
        offset,
        end,
    })
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::cache::records::{TarballEntry, KIND_TARBALL};

    pub(in crate::cache) const KEY: &str = "infra/vpc/aws@1.0.0";

    pub(in crate::cache) struct Store {
        _dir: tempfile::TempDir,
        pub(in crate::cache) cache: Arc<Cache>,
    }

    pub(in crate::cache) fn store() -> Store {
        let dir = tempfile::tempdir().unwrap();
        let limits = crate::config::Limits::default();
        let cache = Arc::new(Cache::open(dir.path(), 1 << 20, 1 << 30, &limits).unwrap());
        Store { _dir: dir, cache }
    }

    /// `n` bytes that differ from chunk to chunk.
    pub(in crate::cache) fn bytes(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7919 % 251) as u8).collect()
    }

    /// Store `data` as a blob, indexed under `KEY`.
    pub(in crate::cache) fn put(s: &Store, data: &[u8]) -> Hash {
        let hash = s.cache.blobs.put(data).unwrap();
        let entry = TarballEntry {
            hash: hash.to_hex().to_string(),
            size: data.len() as u64,
            fetched_at: 0,
            fetched_at_ms: 0,
            replaced: Vec::new(),
        };
        s.cache.meta.put(KIND_TARBALL, KEY, &entry).unwrap();
        hash
    }

    /// Every item of the blob's body: the chunks, then the error if there is one.
    async fn stream(s: &Store, hash: Hash) -> (Vec<Bytes>, Option<BodyError>) {
        let blob = VerifiedBlob::open(&s.cache, KEY, hash, "tarball")
            .await
            .unwrap()
            .expect("the blob is on disk");
        let mut body = blob.into_body();
        let mut chunks = Vec::new();
        while let Some(item) = body.next().await {
            match item {
                Ok(c) => chunks.push(c),
                Err(e) => {
                    assert!(body.next().await.is_none(), "nothing follows an error");
                    return (chunks, Some(e));
                }
            }
        }
        (chunks, None)
    }

    fn gone(s: &Store, hash: Hash) -> bool {
        let indexed: Option<TarballEntry> = s.cache.meta.get(KIND_TARBALL, KEY);
        !s.cache.blobs.path(&hash).exists() && indexed.is_none()
    }

    #[tokio::test]
    async fn a_good_blob_streams_whole_in_chunks() {
        for n in [1, DISK_CHUNK, 3 * DISK_CHUNK + 17] {
            let s = store();
            let data = bytes(n);
            let hash = put(&s, &data);
            let (chunks, err) = stream(&s, hash).await;
            assert!(err.is_none(), "{n}: {err:?}");
            assert_eq!(chunks.len(), n.div_ceil(DISK_CHUNK), "{n}");
            assert_eq!(chunks.concat(), data, "{n}");
            assert!(!gone(&s, hash), "a good blob is kept");
        }
    }

    #[tokio::test]
    async fn an_empty_blob_is_an_empty_body() {
        let s = store();
        let hash = put(&s, b"");
        let (chunks, err) = stream(&s, hash).await;
        assert!(chunks.is_empty() && err.is_none(), "{chunks:?} {err:?}");
        assert!(!gone(&s, hash));
    }

    #[tokio::test]
    async fn a_flipped_byte_fails_before_the_last_chunk_and_is_deleted() {
        let s = store();
        let data = bytes(3 * DISK_CHUNK + 17);
        let hash = put(&s, &data);
        let path = s.cache.blobs.path(&hash);
        let mut on_disk = std::fs::read(&path).unwrap();
        // In the last chunk: the only chunk that the check can still hold back.
        let at = on_disk.len() - 5;
        on_disk[at] ^= 0xff;
        std::fs::write(&path, on_disk).unwrap();

        let (chunks, err) = stream(&s, hash).await;
        assert!(matches!(err, Some(BodyError::Corrupt)), "{err:?}");
        assert_eq!(chunks.len(), 3, "the last chunk is never released");
        assert_eq!(chunks.concat(), data[..3 * DISK_CHUNK]);
        assert!(gone(&s, hash), "the blob and its record are deleted");
    }

    #[tokio::test]
    async fn a_truncated_blob_fails_and_is_deleted() {
        let s = store();
        let data = bytes(2 * DISK_CHUNK + 100);
        let hash = put(&s, &data);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(s.cache.blobs.path(&hash))
            .unwrap();
        file.set_len(2 * DISK_CHUNK as u64).unwrap();

        let (chunks, err) = stream(&s, hash).await;
        assert!(matches!(err, Some(BodyError::Corrupt)), "{err:?}");
        assert!(
            chunks.concat().len() < 2 * DISK_CHUNK,
            "held back: {chunks:?}"
        );
        assert!(gone(&s, hash));
    }

    #[tokio::test]
    async fn a_blob_truncated_while_it_streams_fails_and_is_deleted() {
        let s = store();
        let data = bytes(2 * DISK_CHUNK + 100);
        let hash = put(&s, &data);
        let blob = VerifiedBlob::open(&s.cache, KEY, hash, "tarball")
            .await
            .unwrap()
            .unwrap();
        let mut body = blob.into_body();
        assert_eq!(body.next().await.unwrap().unwrap(), data[..DISK_CHUNK]);
        std::fs::OpenOptions::new()
            .write(true)
            .open(s.cache.blobs.path(&hash))
            .unwrap()
            .set_len(DISK_CHUNK as u64 + 1)
            .unwrap();
        // The chunk read ahead may have been read before the cut: the body still ends with
        // the error, never with the blob's last bytes.
        let rest: Vec<_> = body.collect().await;
        let (last, before) = rest.split_last().unwrap();
        assert!(matches!(last, Err(BodyError::Corrupt)), "{rest:?}");
        assert!(
            before.iter().all(|c| c.is_ok()) && before.len() <= 1,
            "{rest:?}"
        );
        assert!(gone(&s, hash));
    }

    #[tokio::test]
    async fn a_blob_of_another_length_than_indexed_is_deleted_before_any_byte() {
        let s = store();
        let hash = put(&s, &bytes(1000));
        let blob = VerifiedBlob::open(&s.cache, KEY, hash, "tarball")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(blob.len, 1000);
        assert!(blob.with_len(999).is_none());
        assert!(!s.cache.blobs.path(&hash).exists());
        assert!(VerifiedBlob::open(&s.cache, KEY, hash, "tarball")
            .await
            .unwrap()
            .is_none());
    }
}
