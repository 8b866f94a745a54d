//! The two-tier store: memory (moka, bounded in bytes) in front of disk (blake3-addressed
//! blobs, bounded in bytes, LRU), plus the small records that say which blob is what.
//!
//! - [`blobs`]: content-addressed files, atomic writes, verification, eviction.
//! - [`meta`]: small JSON records (tarball index, grants), atomic, lazily read.
//! - [`fill`]: coalesced upstream fills streamed to every waiter.
//! - [`verified`]: large blobs streamed from disk, checked against their hash as they go.
//! - [`whole`]: large blobs checked whole before the kernel sends them (`sendfile`).
//! - [`sealed`]: large memory-tier objects in sealed memory files, for the same.
//! - [`body`]: what those two stream to a client: chunks whose end means verified bytes.
//! - [`records`]: every record kind on disk, its schema and its key.
//! - [`admin`]: `tfmirror cache ls|verify|purge|gc` and the purge endpoint, on a directory.
//! - [`republish`]: versions GitLab re-published with other bytes, noticed and refilled.
//! - [`dir`]: a cache directory opened by a command (`tfmirror bundle`), written as fills write.
//!
//! Tarballs are immutable per (namespace, name, system, version), unless re-published (see
//! [`republish`]): the index maps each to the hash of its bytes, so identical archives are
//! stored once. Listing bodies are blobs too,
//! stored once per digest whoever received them (see `access` for who may see which).

pub mod admin;
pub(crate) mod archive;
pub(crate) mod artifact;
pub(crate) mod blobs;
pub(crate) mod body;
pub(crate) mod dir;
pub(crate) mod fill;
pub(crate) mod meta;
pub(crate) mod private;
pub(crate) mod records;
pub(crate) mod republish;
pub(crate) mod sealed;
pub(crate) mod temp;
pub(crate) mod verified;
pub(crate) mod whole;

use std::io;
use std::sync::Arc;

use bytes::Bytes;

use blobs::{BlobStore, Hash};
use fill::Fills;
use meta::{MetaStore, Records};
use records::{TarballEntry, KIND_TARBALL};
use sealed::Held;

/// The store. Its parts are private: the layers above read and write it through the methods
/// below (and [`Records`] for typed records), so every key and schema stays in
/// [`records`] and every blocking call stays off the runtime.
pub struct Cache {
    blobs: Arc<BlobStore>,
    meta: Arc<MetaStore>,
    fills: Arc<Fills>,
    /// Read on every hit: foldhash, not SipHash (the keys are content hashes).
    memory: moka::sync::Cache<Hash, Held, foldhash::fast::RandomState>,
    memory_evictions: Arc<std::sync::atomic::AtomicU64>,
    /// Front for the tarball index on disk: the `/file` hit path must not read a file per
    /// request. Short-lived, so that `tfmirror cache purge` run beside a server takes effect.
    index: moka::sync::Cache<String, TarballEntry>,
    /// Larger blobs are streamed from disk and never held in memory whole.
    memory_max_object: u64,
    /// Versions seen reappearing in a listing (their cached bytes are refilled once).
    reappeared: Arc<republish::Reappeared>,
    /// Whole-blob checks running, shared by the readers of one file (see [`whole`]).
    checks: whole::Checks,
}

impl Cache {
    pub fn open(
        cache_dir: &std::path::Path,
        memory_size: u64,
        disk_size: u64,
        limits: &crate::config::Limits,
    ) -> io::Result<Cache> {
        let evictions = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = evictions.clone();
        let memory = moka::sync::Cache::builder()
            .weigher(|_k: &Hash, v: &Held| u32::try_from(v.bytes.len()).unwrap_or(u32::MAX))
            .max_capacity(memory_size)
            .eviction_listener(move |_k, _v, cause| {
                if cause == moka::notification::RemovalCause::Size {
                    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            })
            .build_with_hasher(foldhash::fast::RandomState::default());
        let meta = Arc::new(MetaStore::open(cache_dir)?);
        meta.set_cap(limits.max_records);
        let reappeared = Arc::new(republish::Reappeared::load(&meta));
        Ok(Cache {
            reappeared,
            blobs: Arc::new(BlobStore::open(cache_dir, disk_size)?),
            meta,
            fills: Arc::new(Fills::new(
                limits.max_fills,
                limits.max_object_size.as_u64(),
            )),
            memory,
            memory_evictions: evictions,
            index: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(std::time::Duration::from_secs(30))
                .build(),
            // A single object may take at most 1/16 of the memory tier (and never more than
            // 64 MiB), so one large tarball cannot flush every hot listing.
            memory_max_object: (memory_size / 16).min(64 << 20),
            checks: whole::Checks::default(),
        })
    }

    /// Can the cache directory take a write right now? (readiness)
    pub async fn check_writable(&self) -> Writable {
        let path = self.blobs.temp_path();
        let wrote = tokio::task::spawn_blocking(move || {
            let wrote = private::create(&path)
                .and_then(|mut f| std::io::Write::write_all(&mut f, b"ready"));
            // Removed whatever happened: on a full disk the create succeeds and the write
            // fails, and an empty probe file per readiness call must not pile up.
            let removed = std::fs::remove_file(&path);
            wrote.and(removed.or_else(|e| match e.kind() {
                io::ErrorKind::NotFound => Ok(()),
                _ => Err(e),
            }))
        })
        .await
        .map_err(io::Error::other)
        .and_then(|r| r);
        Writable::from_probe(wrote)
    }

    pub fn memory_max_object(&self) -> u64 {
        self.memory_max_object
    }

    pub fn memory_bytes(&self) -> u64 {
        self.memory.run_pending_tasks();
        self.memory.weighted_size()
    }

    pub fn memory_evictions(&self) -> u64 {
        self.memory_evictions
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn memory_entries(&self) -> u64 {
        self.memory.entry_count()
    }

    pub fn remember(&self, hash: Hash, bytes: Bytes) {
        if bytes.len() as u64 <= self.memory_max_object {
            self.memory.insert(
                hash,
                Held {
                    bytes,
                    sealed: None,
                },
            );
        }
    }

    /// A small blob (listing body, small tarball): memory, else disk (verified), else None.
    pub async fn get_small(&self, hash: Hash) -> io::Result<Option<Bytes>> {
        Ok(self.get_held(hash).await?.map(|h| h.bytes))
    }

    /// [`Cache::get_small`], with the sealed file of a large one (see [`sealed`]), sealed
    /// when it is read into the memory tier.
    pub(crate) async fn get_held(&self, hash: Hash) -> io::Result<Option<Held>> {
        if let Some(held) = self.memory.get(&hash) {
            return Ok(Some(held));
        }
        let blobs = self.blobs.clone();
        let max = self.memory_max_object;
        let read = tokio::task::spawn_blocking(move || {
            let read = blobs.read_verified(&hash)?;
            // Sealed only if it will be held (the copy into the file costs a pass).
            Ok::<_, io::Error>(read.map(|b| match b.len() as u64 <= max {
                true => Held::of(b),
                false => Held {
                    bytes: b,
                    sealed: None,
                },
            }))
        })
        .await
        .map_err(io::Error::other)??;
        if let Some(held) = &read {
            if held.bytes.len() as u64 <= self.memory_max_object {
                self.memory.insert(hash, held.clone());
            }
        }
        Ok(read)
    }

    /// Store a small blob on disk and in memory.
    pub async fn put_small(&self, bytes: Bytes) -> io::Result<Hash> {
        let blobs = self.blobs.clone();
        let b = bytes.clone();
        let hash = tokio::task::spawn_blocking(move || blobs.put(&b))
            .await
            .map_err(io::Error::other)??;
        self.remember(hash, bytes);
        Ok(hash)
    }

    pub fn forget(&self, hash: &Hash) {
        self.memory.invalidate(hash);
    }

    /// The index entry of a tarball. Keys come from [`records::tarball_key`] and
    /// [`records::project_tarball_key`].
    pub async fn tarball(&self, key: &str) -> Option<TarballEntry> {
        if let Some(e) = self.index.get(key) {
            return Some(e);
        }
        let meta = self.meta.clone();
        let k = key.to_string();
        let entry: TarballEntry = tokio::task::spawn_blocking(move || meta.get(KIND_TARBALL, &k))
            .await
            .ok()
            .flatten()?;
        self.index.insert(key.to_string(), entry.clone());
        Some(entry)
    }

    /// Join or start the fill of the tarball indexed under `key`, opened by `open`. Once its
    /// blob is in place, `entry` makes the index entry from the previous one (if any), the
    /// hash and the size; it is written to disk and to the memory front, on the blocking
    /// pool, before the fill's readers are told it is done.
    pub fn fill_tarball(
        &self,
        key: &str,
        open: impl FnOnce() -> fill::Opener,
        entry: impl FnOnce(Option<TarballEntry>, Hash, u64) -> TarballEntry + Send + 'static,
    ) -> io::Result<(Arc<fill::Fill>, bool)> {
        let meta = self.meta.clone();
        let front = self.index.clone();
        let index_key = key.to_string();
        let commit = move |hash, size| {
            let e = entry(meta.get(KIND_TARBALL, &index_key), hash, size);
            if let Err(err) = meta.put(KIND_TARBALL, &index_key, &e) {
                tracing::error!(error = %err, "could not index a tarball");
            }
            front.insert(index_key, e);
        };
        self.fills
            .join_or_start(key, self.blobs.clone(), open, commit)
    }

    /// The typed records on disk (grants, listings, provider answers).
    pub fn records(&self) -> Records {
        Records::new(self.meta.clone())
    }

    /// When (milliseconds) the version of tarball index `key` was last seen reappearing in a
    /// listing (see [`republish`]).
    pub fn reappeared_since(&self, key: &str) -> Option<u64> {
        self.reappeared.since(key)
    }

    /// Versions (ids from [`records::version_id`]'s form) a listing shows again, as of now.
    pub async fn note_reappeared(&self, ids: Vec<String>) {
        let (meta, reappeared) = (self.meta.clone(), self.reappeared.clone());
        let _ = tokio::task::spawn_blocking(move || {
            let now = crate::clock::now_ms();
            for id in ids {
                reappeared.note(&meta, &id, now);
            }
        })
        .await;
    }

    /// Whether the blob is on disk (a `stat`: for warm-up and sync, not the hit path).
    pub fn has_blob(&self, hash: &Hash) -> bool {
        self.blobs.path(hash).exists()
    }

    /// Bytes of blobs on disk, as counted.
    pub fn disk_bytes(&self) -> u64 {
        self.blobs.total_bytes()
    }

    /// Blobs on disk, as counted.
    pub fn disk_blobs(&self) -> usize {
        self.blobs.count()
    }

    /// Blobs evicted from disk since start.
    pub fn disk_evictions(&self) -> u64 {
        self.blobs.evictions()
    }

    /// Fills under way.
    pub fn fills_in_flight(&self) -> usize {
        self.fills.in_flight()
    }

    /// `tfmirror cache` administration through this store, so that what a purge removes
    /// leaves its byte accounting and record count right.
    pub fn admin(&self, cache_dir: &std::path::Path) -> admin::Admin {
        admin::Admin::with_stores(cache_dir, self.meta.clone(), self.blobs.clone())
    }

    /// Off the request path, so serving starts at once whatever the cache holds: rebuild
    /// disk usage and the record count, then remove grant records past `horizon` seconds
    /// every `every`.
    pub fn start_housekeeping(&self, horizon: u64, every: std::time::Duration) {
        let blobs = self.blobs.clone();
        let meta = self.meta.clone();
        std::thread::spawn(move || {
            if let Err(e) = blobs.scan() {
                tracing::warn!(error = %e, "cache scan failed");
            }
            if let Err(e) = meta.recount() {
                tracing::warn!(error = %e, "cache record count failed");
            }
            // Grant records past any use are removed now and then, so the record count
            // follows the callers actually served, whatever else called.
            loop {
                match records::remove_expired_grants(&meta, crate::clock::now(), horizon) {
                    Ok(0) => {}
                    Ok(n) => {
                        crate::metrics::GRANTS_EXPIRED.inc_by(n as u64);
                        tracing::info!(records = n, "removed expired grant records");
                    }
                    Err(e) => tracing::warn!(error = %e, "grant record gc failed"),
                }
                std::thread::sleep(every);
            }
        });
    }

    /// Forget the in-memory index front (after a purge on disk).
    pub fn forget_index(&self) {
        self.index.invalidate_all();
    }

    pub async fn drop_tarball(&self, key: &str) {
        self.index.invalidate(key);
        let meta = self.meta.clone();
        let key = key.to_string();
        let _ = tokio::task::spawn_blocking(move || meta.remove(KIND_TARBALL, &key)).await;
    }
}

/// What a write probe of the cache directory found (readiness).
#[derive(Debug)]
pub enum Writable {
    Yes,
    /// No space or inodes left (or a quota reached). tfmirror still serves: hits from the
    /// cache, the rest by pass-through, never kept. Readiness stays 200 and says so, since
    /// taking the instance out of its balancer would only move its callers onto GitLab.
    Full,
    /// Anything else (permissions, a read-only or vanished directory): the instance is broken.
    Broken(io::Error),
}

impl Writable {
    /// A pure classification of the probe's outcome.
    pub fn from_probe(wrote: io::Result<()>) -> Writable {
        match wrote {
            Ok(()) => Writable::Yes,
            Err(e) if is_out_of_space(&e) => Writable::Full,
            Err(e) => Writable::Broken(e),
        }
    }
}

/// ENOSPC (no blocks or no inodes) and EDQUOT (a quota): the disk is full, not broken.
pub fn is_out_of_space(e: &io::Error) -> bool {
    use nix::errno::Errno;
    matches!(e.raw_os_error(), Some(c) if c == Errno::ENOSPC as i32 || c == Errno::EDQUOT as i32)
}

#[cfg(test)]
mod writable_tests {
    use super::*;

    #[test]
    fn a_full_disk_is_not_a_broken_one() {
        use nix::errno::Errno;
        let os = |e: Errno| Err(io::Error::from_raw_os_error(e as i32));
        assert!(matches!(Writable::from_probe(Ok(())), Writable::Yes));
        assert!(matches!(
            Writable::from_probe(os(Errno::ENOSPC)),
            Writable::Full
        ));
        assert!(matches!(
            Writable::from_probe(os(Errno::EDQUOT)),
            Writable::Full
        ));
        for broken in [Errno::EACCES, Errno::EROFS, Errno::ENOENT, Errno::EIO] {
            assert!(matches!(
                Writable::from_probe(os(broken)),
                Writable::Broken(_)
            ));
        }
        assert!(matches!(
            Writable::from_probe(Err(io::Error::other("join"))),
            Writable::Broken(_)
        ));
    }
}
