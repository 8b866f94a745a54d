//! Content-addressed blobs on disk: `blobs/<first byte>/<blake3 hex>`.
//!
//! - Writes go to a temp file of this process's run (see [`super::temp`]), are fsynced, then
//!   renamed into place (and the directory fsynced), so a crash or `kill -9` leaves either the
//!   whole blob or none, and the next start removes what the dead run left.
//! - A blob's name is its hash, so reads can always be verified; a mismatch deletes the blob.
//! - Size is bounded: an in-memory record of sizes and last use (rebuilt by a scan at start,
//!   off the request path) drives least-recently-used eviction.
//!
//! Everything here is blocking I/O: callers run it on tokio's blocking pool.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::UNIX_EPOCH;

use crate::clock;

use bytes::Bytes;

pub use blake3::Hash;

use super::{private, temp};

pub struct BlobStore {
    cache_dir: PathBuf,
    root: PathBuf,
    run: temp::Run,
    limit: u64,
    usage: Mutex<Usage>,
    evictions: AtomicU64,
}

#[derive(Default)]
struct Usage {
    total: u64,
    /// hash -> (size, last use in unix seconds)
    entries: HashMap<Hash, (u64, u64)>,
}

impl BlobStore {
    pub fn open(cache_dir: &Path, limit: u64) -> io::Result<BlobStore> {
        let root = cache_dir.join("blobs");
        private::create_dir_all(&root)?;
        Ok(BlobStore {
            cache_dir: cache_dir.to_path_buf(),
            root,
            run: temp::Run::start(cache_dir)?,
            limit,
            usage: Mutex::new(Usage::default()),
            evictions: AtomicU64::new(0),
        })
    }

    pub fn path(&self, hash: &Hash) -> PathBuf {
        let hex = hash.to_hex();
        self.root.join(&hex[..2]).join(hex.as_str())
    }

    /// A fresh temp file path, unique across threads, processes and process starts.
    pub fn temp_path(&self) -> PathBuf {
        self.run.path("")
    }

    /// Move a complete, fsynced temp file into place under `hash`.
    pub fn commit(&self, temp: &Path, hash: &Hash, size: u64) -> io::Result<()> {
        let dest = self.path(hash);
        let dir = dest.parent().expect("sharded path has a parent");
        private::create_dir_all(dir)?;
        if dest.exists() {
            // Same hash, same bytes: keep the one we have.
            fs::remove_file(temp)?;
        } else {
            fs::rename(temp, &dest)?;
            File::open(dir)?.sync_all()?;
        }
        self.record(hash, size);
        Ok(())
    }

    /// Store `bytes` and return their hash.
    pub fn put(&self, bytes: &[u8]) -> io::Result<Hash> {
        let hash = blake3::hash(bytes);
        if self.path(&hash).exists() {
            self.record(&hash, bytes.len() as u64);
            return Ok(hash);
        }
        let temp = self.temp_path();
        let result = (|| {
            let mut f = private::create(&temp)?;
            f.write_all(bytes)?;
            f.sync_all()
        })();
        if let Err(e) = result {
            let _ = fs::remove_file(&temp);
            return Err(e);
        }
        self.commit(&temp, &hash, bytes.len() as u64)?;
        Ok(hash)
    }

    /// Read a whole blob and check it against its name. A corrupt blob is deleted and
    /// reported as absent, so the caller fetches it again.
    pub fn read_verified(&self, hash: &Hash) -> io::Result<Option<Bytes>> {
        let path = self.path(hash);
        let mut buf = Vec::new();
        match File::open(&path) {
            Ok(mut f) => f.read_to_end(&mut buf)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.forget(hash);
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        if blake3::hash(&buf) != *hash {
            tracing::error!(blob = %hash.to_hex(), "corrupt blob on disk: deleted, will refetch");
            self.remove(hash);
            return Ok(None);
        }
        self.touch(hash, buf.len() as u64);
        Ok(Some(Bytes::from(buf)))
    }

    /// Open a blob for streaming; the caller verifies as it reads (see `cache::serve`).
    pub fn open_blob(&self, hash: &Hash) -> io::Result<Option<(File, u64)>> {
        match File::open(self.path(hash)) {
            Ok(f) => {
                let len = f.metadata()?.len();
                self.touch(hash, len);
                Ok(Some((f, len)))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.forget(hash);
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    pub fn remove(&self, hash: &Hash) {
        let _ = fs::remove_file(self.path(hash));
        self.forget(hash);
    }

    fn forget(&self, hash: &Hash) {
        let mut u = self.usage.lock().expect("usage lock");
        if let Some((size, _)) = u.entries.remove(hash) {
            u.total -= size;
        }
    }

    fn touch(&self, hash: &Hash, size: u64) {
        let mut u = self.usage.lock().expect("usage lock");
        let now = clock::now();
        match u.entries.get_mut(hash) {
            Some(e) => e.1 = now,
            None => {
                u.entries.insert(*hash, (size, now));
                u.total += size;
            }
        }
    }

    fn record(&self, hash: &Hash, size: u64) {
        self.touch(hash, size);
        self.evict_if_needed();
    }

    pub fn total_bytes(&self) -> u64 {
        self.usage.lock().expect("usage lock").total
    }

    pub fn count(&self) -> usize {
        self.usage.lock().expect("usage lock").entries.len()
    }

    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    /// Drop least-recently-used blobs until usage is under 90% of the limit. Index entries
    /// that point at an evicted blob become misses and are refilled on demand.
    pub fn evict_if_needed(&self) {
        let victims: Vec<Hash> = {
            let u = self.usage.lock().expect("usage lock");
            if u.total <= self.limit {
                return;
            }
            let target = self.limit / 10 * 9;
            let mut by_age: Vec<(u64, u64, Hash)> =
                u.entries.iter().map(|(h, (s, t))| (*t, *s, *h)).collect();
            by_age.sort_unstable_by_key(|e| (e.0, e.2.to_hex()));
            let mut total = u.total;
            by_age
                .into_iter()
                .take_while(|(_, size, _)| {
                    let go = total > target;
                    total = total.saturating_sub(*size);
                    go
                })
                .map(|(_, _, h)| h)
                .collect()
        };
        for h in &victims {
            self.remove(h);
        }
        self.evictions
            .fetch_add(victims.len() as u64, Ordering::Relaxed);
    }

    /// Every blob on disk, with its path.
    pub fn list(&self) -> io::Result<Vec<(Hash, PathBuf)>> {
        let mut out = Vec::new();
        for shard in fs::read_dir(&self.root)? {
            let shard = shard?;
            if !shard.file_type()?.is_dir() {
                continue;
            }
            for entry in fs::read_dir(shard.path())? {
                let entry = entry?;
                if let Some(hash) = entry
                    .file_name()
                    .to_str()
                    .and_then(|n| Hash::from_hex(n).ok())
                {
                    out.push((hash, entry.path()));
                }
            }
        }
        Ok(out)
    }

    /// Rebuild the usage record from disk and remove temp files of dead processes (counted in
    /// `tfmirror_temp_leftovers_removed_total`). Runs once at start in the background;
    /// requests do not wait for it.
    pub fn scan(&self) -> io::Result<temp::Leftovers> {
        let mut found = Vec::new();
        for (hash, path) in self.list()? {
            // A blob purged or evicted since the listing is simply not counted.
            let Ok(meta) = fs::metadata(&path) else {
                continue;
            };
            let used = meta
                .modified()
                .ok()
                .and_then(|m| m.duration_since(UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_secs());
            found.push((hash, meta.len(), used));
        }
        {
            let mut u = self.usage.lock().expect("usage lock");
            for (hash, size, used) in found {
                if let std::collections::hash_map::Entry::Vacant(e) = u.entries.entry(hash) {
                    e.insert((size, used));
                    u.total += size;
                }
            }
        }
        let leftovers = temp::remove_dead(&self.cache_dir)?;
        if leftovers.files > 0 {
            crate::metrics::TEMP_LEFTOVERS.inc_by(leftovers.files);
            tracing::warn!(
                files = leftovers.files,
                bytes = leftovers.bytes,
                "removed temp files of a process that died mid-write"
            );
        }
        self.evict_if_needed();
        Ok(leftovers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_read_and_dedupe() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path(), 1 << 20).unwrap();
        let h = store.put(b"hello").unwrap();
        assert_eq!(store.put(b"hello").unwrap(), h);
        assert_eq!(store.count(), 1);
        assert_eq!(store.read_verified(&h).unwrap().unwrap(), &b"hello"[..]);
        assert!(store.path(&h).starts_with(dir.path().join("blobs")));
        assert_eq!(fs::read_dir(store.run.dir()).unwrap().count(), 0);
    }

    #[test]
    fn corrupt_blobs_are_deleted_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path(), 1 << 20).unwrap();
        let h = store.put(b"good bytes").unwrap();
        fs::write(store.path(&h), b"evil bytes").unwrap();
        assert!(store.read_verified(&h).unwrap().is_none());
        assert!(!store.path(&h).exists());
    }

    #[test]
    fn least_recently_used_is_evicted_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path(), 250).unwrap();
        let a = store.put(&[1u8; 100]).unwrap();
        let b = store.put(&[2u8; 100]).unwrap();
        // Make `a` the recent one.
        store.usage.lock().unwrap().entries.get_mut(&b).unwrap().1 = 0;
        let c = store.put(&[3u8; 100]).unwrap();
        assert!(store.path(&a).exists());
        assert!(!store.path(&b).exists(), "oldest blob evicted");
        assert!(store.path(&c).exists());
        assert!(store.total_bytes() <= 250);
        assert_eq!(store.evictions(), 1);
    }

    #[test]
    fn scan_rebuilds_usage_and_clears_dead_temps() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = BlobStore::open(dir.path(), 1 << 20).unwrap();
            store.put(b"one").unwrap();
            store.put(b"two").unwrap();
        }
        let dead = dir.path().join("tmp/999-0.part");
        fs::write(&dead, b"partial").unwrap();
        let old = UNIX_EPOCH + std::time::Duration::from_secs(clock::now() - 7200);
        File::options()
            .write(true)
            .open(&dead)
            .unwrap()
            .set_modified(old)
            .unwrap();
        let store = BlobStore::open(dir.path(), 1 << 20).unwrap();
        let removed = store.scan().unwrap();
        assert_eq!(store.count(), 2);
        assert_eq!(store.total_bytes(), 6);
        assert!(!dead.exists());
        assert_eq!(removed.files, 1);
    }
}
