//! The two-tier store: memory (moka, bounded in bytes) in front of disk (blake3-addressed
//! blobs, bounded in bytes, LRU), plus the small records that say which blob is what.
//!
//! - [`blobs`]: content-addressed files, atomic writes, verification, eviction.
//! - [`meta`]: small JSON records (tarball index, grants), atomic, lazily read.
//! - [`fill`]: coalesced upstream fills streamed to every waiter.
//! - [`verified`]: large blobs streamed from disk, checked against their hash as they go.
//! - [`body`]: what those two stream to a client: chunks whose end means verified bytes.
//! - [`records`]: every record kind on disk, its schema and its key.
//! - [`admin`]: `tfmirror cache ls|verify|purge|gc` and the purge endpoint, on a directory.
//! - [`republish`]: versions GitLab re-published with other bytes, noticed and refilled.
//!
//! Tarballs are immutable per (namespace, name, system, version), unless re-published (see
//! [`republish`]): the index maps each to the hash of its bytes, so identical archives are
//! stored once. Listing bodies are blobs too,
//! stored once per digest whoever received them (see `access` for who may see which).

pub mod admin;
pub mod archive;
pub mod blobs;
pub mod body;
pub mod fill;
pub mod meta;
pub mod private;
pub mod records;
pub mod republish;
pub mod temp;
pub mod verified;

use std::io;
use std::sync::Arc;

use bytes::Bytes;

use blobs::{BlobStore, Hash};
use fill::Fills;
use meta::MetaStore;
use records::{TarballEntry, KIND_TARBALL};

pub struct Cache {
    pub blobs: Arc<BlobStore>,
    pub meta: Arc<MetaStore>,
    pub fills: Arc<Fills>,
    memory: moka::sync::Cache<Hash, Bytes>,
    memory_evictions: Arc<std::sync::atomic::AtomicU64>,
    /// Front for the tarball index on disk: the `/file` hit path must not read a file per
    /// request. Short-lived, so that `tfmirror cache purge` run beside a server takes effect.
    index: moka::sync::Cache<String, TarballEntry>,
    /// Larger blobs are streamed from disk and never held in memory whole.
    memory_max_object: u64,
    /// Versions seen reappearing in a listing (their cached bytes are refilled once).
    pub reappeared: Arc<republish::Reappeared>,
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
            .weigher(|_k: &Hash, v: &Bytes| u32::try_from(v.len()).unwrap_or(u32::MAX))
            .max_capacity(memory_size)
            .eviction_listener(move |_k, _v, cause| {
                if cause == moka::notification::RemovalCause::Size {
                    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            })
            .build();
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
            self.memory.insert(hash, bytes);
        }
    }

    /// A small blob (listing body, small tarball): memory, else disk (verified), else None.
    pub async fn get_small(&self, hash: Hash) -> io::Result<Option<Bytes>> {
        if let Some(b) = self.memory.get(&hash) {
            return Ok(Some(b));
        }
        let blobs = self.blobs.clone();
        let read = tokio::task::spawn_blocking(move || blobs.read_verified(&hash))
            .await
            .map_err(io::Error::other)??;
        if let Some(b) = &read {
            self.remember(hash, b.clone());
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

    /// Record a committed tarball (blocking: called from the fill's commit step).
    pub fn index_tarball_blocking(
        meta: &MetaStore,
        key: &str,
        entry: &TarballEntry,
    ) -> io::Result<()> {
        meta.put(KIND_TARBALL, key, entry)
    }

    /// The in-memory index front, for a fill's commit step to update.
    pub fn index_front(&self) -> moka::sync::Cache<String, TarballEntry> {
        self.index.clone()
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
