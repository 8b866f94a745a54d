//! A cache directory opened by a command rather than a server (`tfmirror bundle`): typed
//! records, verified blobs, and writes through the very code fills use (temp file of this
//! process's run, fsync, rename, directory fsync; records through the same atomic writer), so
//! it is safe while a server uses the directory. A server treats what appears as it treats a
//! record another replica wrote: read lazily, on the next request.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::blobs::{BlobStore, Hash};
use super::meta::MetaStore;

pub struct CacheDir {
    meta: MetaStore,
    blobs: BlobStore,
}

impl CacheDir {
    /// An existing cache directory (to read from): a path that holds none is an error, and
    /// nothing is created there.
    pub fn open_existing(dir: &Path) -> io::Result<CacheDir> {
        if !dir.join("meta").is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} is not a tfmirror cache directory", dir.display()),
            ));
        }
        Self::open(dir)
    }

    /// A cache directory, created (private) when absent. No size bound: a command adds
    /// what it was asked to; the server's own accounting evicts past `cache.disk_size`.
    pub fn open(dir: &Path) -> io::Result<CacheDir> {
        super::private::create_dir_all(dir)?;
        Ok(CacheDir {
            meta: MetaStore::open(dir)?,
            blobs: BlobStore::open(dir, u64::MAX)?,
        })
    }

    pub fn scan<T: DeserializeOwned>(&self, kind: &str) -> io::Result<Vec<(String, T)>> {
        self.meta.scan(kind)
    }

    pub fn get<T: DeserializeOwned>(&self, kind: &str, key: &str) -> Option<T> {
        self.meta.get(kind, key)
    }

    /// Write a record atomically (see [`MetaStore::put`]).
    pub fn put<T: Serialize>(&self, kind: &str, key: &str, value: &T) -> io::Result<()> {
        self.meta.put(kind, key, value)
    }

    /// The blob `hex` names, opened for reading, when it is on disk.
    pub fn open_blob(&self, hex: &str) -> io::Result<Option<(File, u64)>> {
        let Ok(hash) = Hash::from_hex(hex) else {
            return Ok(None);
        };
        self.blobs.open_blob(&hash)
    }

    /// A whole small blob, checked against its name (None when absent or damaged).
    pub fn read_blob(&self, hex: &str) -> io::Result<Option<Bytes>> {
        match Hash::from_hex(hex) {
            Ok(hash) => self.blobs.read_verified(&hash),
            Err(_) => Ok(None),
        }
    }

    /// Store bytes as a blob (atomically); their blake3, hex.
    pub fn put_blob(&self, bytes: &[u8]) -> io::Result<String> {
        Ok(self.blobs.put(bytes)?.to_hex().to_string())
    }

    /// A fresh, private temp file in this process's run (removed with the run if never
    /// committed).
    pub fn create_temp(&self) -> io::Result<(PathBuf, File)> {
        let path = self.blobs.temp_path();
        let file = super::private::create(&path)?;
        Ok((path, file))
    }

    /// Move a complete, fsynced temp file into place as the blob `hash`.
    pub fn commit_blob(&self, temp: &Path, hash: &Hash, size: u64) -> io::Result<()> {
        self.blobs.commit(temp, hash, size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reading_needs_a_cache_and_writing_makes_one() {
        let dir = tempfile::tempdir().unwrap();
        let at = dir.path().join("c");
        assert!(CacheDir::open_existing(&at).is_err());
        assert!(!at.exists(), "nothing is created to read");
        let c = CacheDir::open(&at).unwrap();
        let hex = c.put_blob(b"body").unwrap();
        assert_eq!(c.read_blob(&hex).unwrap().unwrap(), &b"body"[..]);
        c.put("tarball", "k", &1u8).unwrap();
        assert_eq!(c.get::<u8>("tarball", "k"), Some(1));
        assert!(CacheDir::open_existing(&at).is_ok());
    }
}
