//! Small JSON records on disk: the tarball index, grants, listing references.
//!
//! One file per record, `meta/<kind>/<2 hex>/<blake3 of key>.json`, written atomically
//! (temp file, fsync, rename). File names are hashes, so no module path, token or identity
//! ever appears in a file name. Records are read lazily on first use, so start-up does not
//! depend on how many there are.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

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
}

impl MetaStore {
    pub fn open(cache_dir: &Path) -> io::Result<MetaStore> {
        let root = cache_dir.join("meta");
        super::private::create_dir_all(&root)?;
        Ok(MetaStore {
            root,
            run: super::temp::Run::start(cache_dir)?,
        })
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

    pub fn put<T: Serialize>(&self, kind: &str, key: &str, value: &T) -> io::Result<()> {
        let dest = self.path(kind, key);
        let dir = dest.parent().expect("sharded path has a parent");
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
        if result.is_err() {
            let _ = fs::remove_file(&temp);
        }
        result
    }

    pub fn remove(&self, kind: &str, key: &str) {
        let _ = fs::remove_file(self.path(kind, key));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
