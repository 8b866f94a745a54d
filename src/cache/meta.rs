//! Small JSON records on disk: the tarball index, grants, listing references.
//!
//! One file per record, `meta/<kind>/<2 hex>/<blake3 of key>.json`, written atomically
//! (temp file, fsync, rename). File names are hashes, so no module path, token or identity
//! ever appears in a file name. Records are read lazily on first use, so start-up does not
//! depend on how many there are.

use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A record on disk: its key travels with it, so records can be listed (`tfmirror cache ls`)
/// and a hash collision of two keys can never return the wrong record.
#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    key: String,
    value: T,
}

pub struct MetaStore {
    root: PathBuf,
    run: super::temp::Run,
    /// Records on disk, as far as this process knows (counted by [`MetaStore::recount`] at
    /// start, then kept up to date by its own writes and removals).
    count: AtomicU64,
    /// Past this many records, a new one first removes the record nearest its expiry; with
    /// none known, it is refused (the caller keeps it in memory).
    cap: AtomicU64,
    /// Records that expire (grants), nearest expiry first: what makes room at the cap.
    expiring: Mutex<Expiring>,
}

/// The records known to expire, by expiry: those this process wrote, and those the
/// periodic scan of grants found ([`MetaStore::note_expiry`]). Bounded: past
/// [`MAX_EXPIRING`], the latest expiries are forgotten (they would be removed last anyway).
#[derive(Default)]
struct Expiring {
    order: BTreeSet<(u64, String, String)>,
    at: HashMap<(String, String), u64>,
}

/// How many expiring records are known at most, as candidates to make room.
const MAX_EXPIRING: usize = 65_536;

impl Expiring {
    fn note(&mut self, kind: &str, key: &str, expiry: u64) {
        let id = (kind.to_string(), key.to_string());
        if let Some(old) = self.at.insert(id.clone(), expiry) {
            self.order.remove(&(old, id.0.clone(), id.1.clone()));
        }
        self.order.insert((expiry, id.0, id.1));
        if self.order.len() > MAX_EXPIRING {
            if let Some((_, kind, key)) = self.order.pop_last() {
                self.at.remove(&(kind, key));
            }
        }
    }

    fn forget(&mut self, kind: &str, key: &str) {
        if let Some(old) = self.at.remove(&(kind.to_string(), key.to_string())) {
            self.order.remove(&(old, kind.to_string(), key.to_string()));
        }
    }

    /// The record nearest its expiry, taken out of the candidates.
    fn nearest(&mut self) -> Option<(String, String)> {
        let (_, kind, key) = self.order.pop_first()?;
        self.at.remove(&(kind.clone(), key.clone()));
        Some((kind, key))
    }
}

impl MetaStore {
    pub fn open(cache_dir: &Path) -> io::Result<MetaStore> {
        let root = cache_dir.join("meta");
        super::private::create_dir_all(&root)?;
        Ok(MetaStore {
            root,
            run: super::temp::Run::start(cache_dir)?,
            count: AtomicU64::new(0),
            cap: AtomicU64::new(u64::MAX),
            expiring: Mutex::new(Expiring::default()),
        })
    }

    /// The record (`kind`, `key`) on disk expires at `expiry` (unix seconds): a candidate to
    /// make room for a new record once the cap is reached.
    pub fn note_expiry(&self, kind: &str, key: &str, expiry: u64) {
        let mut e = self.expiring.lock().expect("expiring lock");
        e.note(kind, key, expiry);
    }

    /// Remove the record nearest its expiry to make room for a new one. False when no
    /// expiring record is known.
    fn make_room(&self) -> bool {
        loop {
            let nearest = self.expiring.lock().expect("expiring lock").nearest();
            let Some((kind, key)) = nearest else {
                return false;
            };
            // Gone meanwhile (a purge, the grant scan): try the next.
            if self.remove_file(&kind, &key) {
                crate::metrics::CACHE_RECORDS_EVICTED.inc();
                return true;
            }
        }
    }

    /// Refuse new records once `cap` are on disk (`limits.max_records`).
    pub fn set_cap(&self, cap: u64) {
        self.cap.store(cap, Ordering::Relaxed);
    }

    /// Records on disk, as counted.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Count the records on disk (blocking; a walk of `meta/`, run once at start).
    pub fn recount(&self) -> io::Result<u64> {
        let mut n = 0u64;
        for kind in read_dir_or_empty(&self.root)? {
            for shard in read_dir_or_empty(&kind?.path())? {
                n += read_dir_or_empty(&shard?.path())?.count() as u64;
            }
        }
        self.count.store(n, Ordering::Relaxed);
        crate::metrics::CACHE_RECORDS.set(n as i64);
        Ok(n)
    }

    fn counted(&self, delta: i64) {
        let n = if delta >= 0 {
            self.count.fetch_add(delta as u64, Ordering::Relaxed) + delta as u64
        } else {
            let d = delta.unsigned_abs();
            let before = self
                .count
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
                    Some(c.saturating_sub(d))
                })
                .unwrap_or(0);
            before.saturating_sub(d)
        };
        crate::metrics::CACHE_RECORDS.set(n as i64);
    }

    fn path(&self, kind: &str, key: &str) -> PathBuf {
        let h = blake3::hash(key.as_bytes()).to_hex();
        self.root
            .join(kind)
            .join(&h[..2])
            .join(format!("{}.json", h.as_str()))
    }

    /// The record, or None when absent or unreadable (a torn record cannot exist, but a
    /// foreign or older-format file is treated as absent rather than trusted).
    pub fn get<T: DeserializeOwned>(&self, kind: &str, key: &str) -> Option<T> {
        let raw = fs::read(self.path(kind, key)).ok()?;
        let e: Envelope<T> = serde_json::from_slice(&raw).ok()?;
        (e.key == key).then_some(e.value)
    }

    /// Every record of a kind, with its key. Unreadable files are skipped.
    pub fn scan<T: DeserializeOwned>(&self, kind: &str) -> io::Result<Vec<(String, T)>> {
        let mut out = Vec::new();
        let dir = self.root.join(kind);
        let shards = match fs::read_dir(&dir) {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e),
        };
        for shard in shards {
            for file in fs::read_dir(shard?.path())? {
                let raw = match fs::read(file?.path()) {
                    Ok(raw) => raw,
                    Err(_) => continue, // removed meanwhile by a running server
                };
                if let Ok(e) = serde_json::from_slice::<Envelope<T>>(&raw) {
                    out.push((e.key, e.value));
                }
            }
        }
        Ok(out)
    }

    /// Write a record that expires at `expiry` (unix seconds; see [`MetaStore::note_expiry`]).
    pub fn put_expiring<T: Serialize>(
        &self,
        kind: &str,
        key: &str,
        value: &T,
        expiry: u64,
    ) -> io::Result<()> {
        self.put(kind, key, value)?;
        self.note_expiry(kind, key, expiry);
        Ok(())
    }

    pub fn put<T: Serialize>(&self, kind: &str, key: &str, value: &T) -> io::Result<()> {
        let dest = self.path(kind, key);
        let dir = dest.parent().expect("sharded path has a parent");
        let new = !dest.exists();
        if new && self.count() >= self.cap.load(Ordering::Relaxed) && !self.make_room() {
            crate::metrics::CACHE_RECORDS_REFUSED.inc();
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                "limits.max_records reached",
            ));
        }
        super::private::create_dir_all(dir)?;
        let temp = self.run.path("m");
        let result = (|| {
            let mut f = super::private::create(&temp)?;
            let e = Envelope {
                key: key.to_string(),
                value,
            };
            f.write_all(&serde_json::to_vec(&e).map_err(io::Error::other)?)?;
            f.sync_all()?;
            fs::rename(&temp, &dest)?;
            File::open(dir)?.sync_all()
        })();
        match &result {
            Err(_) => {
                let _ = fs::remove_file(&temp);
            }
            Ok(()) if new => self.counted(1),
            Ok(()) => {}
        }
        result
    }

    pub fn remove(&self, kind: &str, key: &str) {
        self.expiring
            .lock()
            .expect("expiring lock")
            .forget(kind, key);
        self.remove_file(kind, key);
    }

    fn remove_file(&self, kind: &str, key: &str) -> bool {
        let removed = fs::remove_file(self.path(kind, key)).is_ok();
        if removed {
            self.counted(-1);
        }
        removed
    }
}

/// The records, for code on the async runtime: every read and write runs on the blocking
/// pool, so a slow disk never stalls the connections of a runtime thread. Cheap to clone.
#[derive(Clone)]
pub struct Records(Arc<MetaStore>);

impl Records {
    pub fn new(meta: Arc<MetaStore>) -> Records {
        Records(meta)
    }

    /// The record, or None when absent, unreadable, or the blocking pool is gone.
    pub async fn get<T>(&self, kind: &'static str, key: String) -> Option<T>
    where
        T: DeserializeOwned + Send + 'static,
    {
        let meta = self.0.clone();
        tokio::task::spawn_blocking(move || meta.get(kind, &key))
            .await
            .ok()
            .flatten()
    }

    /// Write a record (atomically, see [`MetaStore::put`]).
    pub async fn put<T>(&self, kind: &'static str, key: String, value: T) -> io::Result<()>
    where
        T: Serialize + Send + 'static,
    {
        let meta = self.0.clone();
        tokio::task::spawn_blocking(move || meta.put(kind, &key, &value))
            .await
            .map_err(io::Error::other)?
    }

    /// Write a record that expires at `expiry` (unix seconds): past the cap, the record nearest
    /// its expiry makes room for a new one (see [`MetaStore::put_expiring`]).
    pub async fn put_expiring<T>(
        &self,
        kind: &'static str,
        key: String,
        value: T,
        expiry: u64,
    ) -> io::Result<()>
    where
        T: Serialize + Send + 'static,
    {
        let meta = self.0.clone();
        tokio::task::spawn_blocking(move || meta.put_expiring(kind, &key, &value, expiry))
            .await
            .map_err(io::Error::other)?
    }

    /// Remove records of one kind; absent ones are no error.
    pub async fn remove(&self, kind: &'static str, keys: Vec<String>) {
        let meta = self.0.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for key in keys {
                meta.remove(kind, &key);
            }
        })
        .await;
    }
}

type Entries = Box<dyn Iterator<Item = io::Result<fs::DirEntry>>>;

fn read_dir_or_empty(p: &Path) -> io::Result<Entries> {
    match fs::read_dir(p) {
        Ok(d) => Ok(Box::new(d)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Box::new(std::iter::empty())),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The async handle reads what it wrote, refuses past the cap like the store, and a
    /// removal of several keys leaves the count right.
    #[tokio::test]
    async fn the_async_handle_is_the_same_store() {
        let dir = tempfile::tempdir().unwrap();
        let m = Arc::new(MetaStore::open(dir.path()).unwrap());
        m.set_cap(2);
        let r = Records::new(m.clone());
        r.put("grant", "a".into(), Arc::new(vec![1u8, 2]))
            .await
            .unwrap();
        r.put("grant", "b".into(), vec![3u8]).await.unwrap();
        assert_eq!(
            r.get::<Vec<u8>>("grant", "a".into()).await,
            Some(vec![1, 2])
        );
        assert_eq!(m.get::<Vec<u8>>("grant", "b"), Some(vec![3]));
        let full = r.put("grant", "c".into(), 0u8).await.unwrap_err();
        assert_eq!(full.kind(), io::ErrorKind::StorageFull);
        r.remove("grant", vec!["a".into(), "b".into(), "absent".into()])
            .await;
        assert_eq!(m.count(), 0);
        assert_eq!(r.get::<Vec<u8>>("grant", "a".into()).await, None);
    }

    #[test]
    fn records_are_counted_and_capped() {
        let dir = tempfile::tempdir().unwrap();
        let m = MetaStore::open(dir.path()).unwrap();
        m.set_cap(2);
        m.put("grant", "a", &1).unwrap();
        m.put("grant", "a", &2).unwrap(); // a rewrite is not a new record
        m.put("tarball", "b", &3).unwrap();
        assert_eq!(m.count(), 2);
        let full = m.put("grant", "c", &4).unwrap_err();
        assert_eq!(full.kind(), io::ErrorKind::StorageFull);
        m.put("grant", "a", &5).unwrap(); // rewrites still go through
        m.remove("grant", "a");
        assert_eq!(m.count(), 1);
        m.put("grant", "c", &4).unwrap();
        let again = MetaStore::open(dir.path()).unwrap();
        assert_eq!(again.recount().unwrap(), 2);
    }

    /// Issue 26, item 4: at the cap, a new record replaces the record nearest its expiry;
    /// only with no expiring record known is it refused.
    #[test]
    fn past_the_cap_the_record_nearest_its_expiry_makes_room() {
        let dir = tempfile::tempdir().unwrap();
        let m = MetaStore::open(dir.path()).unwrap();
        m.set_cap(3);
        m.put_expiring("grant", "late", &1, 3_000).unwrap();
        m.put_expiring("grant", "soon", &2, 1_000).unwrap();
        m.put("tarball", "index", &3).unwrap();
        m.put_expiring("grant", "new", &4, 5_000).unwrap();
        assert_eq!(m.count(), 3);
        assert_eq!(m.get::<i32>("grant", "soon"), None, "nearest expiry went");
        assert_eq!(m.get::<i32>("grant", "late"), Some(1));
        assert_eq!(m.get::<i32>("tarball", "index"), Some(3));
        // A rewrite moves a record's expiry: "late" is now the furthest.
        m.put_expiring("grant", "late", &5, 9_000).unwrap();
        m.put("tarball", "other", &6).unwrap();
        assert_eq!(m.get::<i32>("grant", "new"), None);
        assert_eq!(m.get::<i32>("grant", "late"), Some(5));
        // A record removed meanwhile is skipped, and with nothing left to evict, refused.
        m.remove("grant", "late");
        m.put("tarball", "third", &7).unwrap();
        let full = m.put("tarball", "fourth", &8).unwrap_err();
        assert_eq!(full.kind(), io::ErrorKind::StorageFull);
        // The scan of grants on disk makes them candidates too (after a restart).
        let again = MetaStore::open(dir.path()).unwrap();
        again.set_cap(3);
        again.recount().unwrap();
        again.put("grant", "scanned", &9).unwrap_err();
        again.note_expiry("tarball", "other", 10);
        again.put("grant", "scanned", &9).unwrap();
        assert_eq!(again.get::<i32>("tarball", "other"), None);
    }

    #[test]
    fn records_round_trip_and_names_hide_keys() {
        let dir = tempfile::tempdir().unwrap();
        let m = MetaStore::open(dir.path()).unwrap();
        m.put("grant", "secret-key-material", &vec![1, 2, 3])
            .unwrap();
        assert_eq!(
            m.get::<Vec<i32>>("grant", "secret-key-material"),
            Some(vec![1, 2, 3])
        );
        assert_eq!(m.get::<Vec<i32>>("grant", "other"), None);
        let all: Vec<_> = walk(&dir.path().join("meta"));
        assert_eq!(all.len(), 1);
        assert!(!all[0].contains("secret"));
        let all: Vec<(String, Vec<i32>)> = m.scan("grant").unwrap();
        assert_eq!(
            all,
            vec![("secret-key-material".to_string(), vec![1, 2, 3])]
        );
        m.remove("grant", "secret-key-material");
        assert_eq!(m.get::<Vec<i32>>("grant", "secret-key-material"), None);
    }

    fn walk(p: &Path) -> Vec<String> {
        let mut out = Vec::new();
        for e in fs::read_dir(p).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                out.extend(walk(&e.path()));
            } else {
                out.push(e.path().to_string_lossy().into_owned());
            }
        }
        out
    }
}
