//! A large blob checked whole before its first byte goes out, for a connection that sends
//! it with the kernel's own copy (`sendfile`, see `edge::workers::conn`).
//!
//! [`super::verified`] hashes a blob as it streams and holds its last chunk back; that costs
//! every reader a read into memory and a hash of every byte. A plain-HTTP/1 client can
//! instead be sent the file by the kernel, from the page cache to the socket, as nginx sends
//! its cache files; the check then has to come first: the whole blob is hashed, and only a
//! blob that hashed to its address is handed out, with its length already matched against
//! the index. A mismatch is what a length mismatch is today: the blob and its record are
//! deleted and the caller fills again on the same request, so no client ever sees a short or
//! false body.
//!
//! Readers that arrive while a check of the same file is running share it (64 runners that
//! start on one 256 MiB provider zip at once cost one pass, not 64). They share it only for
//! the same file: the key is the blob's address and the file's inode, so a reader that opened
//! a blob refilled since (a new inode under the same name) waits for its own check. What a
//! shared check read is what each of them then sends: blobs are written once, by rename, and
//! never changed in place.

use std::fs::File;
use std::io;
use std::sync::Arc;

use futures::FutureExt;

use super::blobs::Hash;
use super::verified::VerifiedBlob;

/// Bytes read and hashed at a time (one buffer per running check, not per reader).
const PASS_CHUNK: usize = 1024 * 1024;

/// Checks in progress, by (blob address, inode): a verdict each, `None` for a read error.
pub(crate) type Checks = crate::flight::Flights<(Hash, u64), Option<bool>>;

impl VerifiedBlob {
    /// The blob's file, once all of it hashed to its address (its length matched the index
    /// already, see [`VerifiedBlob::with_len`]). `None` when it did not: the blob and its
    /// record are deleted, as a blob found damaged while streaming is.
    pub async fn verify_whole(self) -> io::Result<Option<(Arc<File>, u64)>> {
        let (file, len, hash, inode) = (self.file.clone(), self.len, self.hash, self.inode);
        let (_, check, _) = self.cache.checks.join_or_start((hash, inode), (), || {
            async move {
                let pass = tokio::task::spawn_blocking(move || hashes_to(&file, len, hash));
                match pass.await {
                    Ok(Ok(good)) => Some(good),
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "cannot read a blob to check it");
                        None
                    }
                    Err(_) => None,
                }
            }
            .boxed()
        });
        match check.await {
            Some(true) => Ok(Some((self.file.clone(), self.len))),
            Some(false) => {
                self.discard_corrupt().await;
                Ok(None)
            }
            None => Err(io::Error::other("the blob could not be read to check it")),
        }
    }
}

/// Whether the `len` bytes of `file` hash to `hash` (a file that ends early does not).
fn hashes_to(file: &File, len: u64, hash: Hash) -> io::Result<bool> {
    let mut hasher = blake3::Hasher::new();
    // Zeroed once per pass (1 MiB), then reused: no per-chunk allocation or fill.
    let mut buf = vec![0u8; PASS_CHUNK];
    let mut at = 0u64;
    while at < len {
        let want = (len - at).min(PASS_CHUNK as u64) as usize;
        let got = match rustix::io::pread(file, &mut buf[..want], at) {
            Ok(0) => return Ok(false),
            Ok(got) => got,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        };
        hasher.update(&buf[..got]);
        at += got as u64;
    }
    Ok(hasher.finalize() == hash)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::records::{TarballEntry, KIND_TARBALL};
    use crate::cache::verified::tests::{bytes as data, put, store, Store, KEY};

    async fn open(s: &Store, hash: Hash) -> VerifiedBlob {
        VerifiedBlob::open(&s.cache, KEY, hash, "tarball")
            .await
            .unwrap()
            .expect("on disk")
    }

    #[tokio::test]
    async fn a_good_blob_is_handed_out_to_every_concurrent_reader() {
        let s = store();
        let bytes = data(3 * PASS_CHUNK + 17);
        let hash = put(&s, &bytes);
        let (a, b) = tokio::join!(async { open(&s, hash).await.verify_whole().await }, async {
            open(&s, hash).await.verify_whole().await
        },);
        for got in [a, b] {
            let (file, len) = got.unwrap().expect("it checks out");
            assert_eq!(len, bytes.len() as u64);
            let mut back = vec![0; bytes.len()];
            std::os::unix::fs::FileExt::read_exact_at(&*file, &mut back, 0).unwrap();
            assert!(back == bytes);
        }
        assert!(s.cache.blobs.path(&hash).exists());
    }

    #[tokio::test]
    async fn a_damaged_blob_is_refused_before_any_byte_and_deleted_with_its_record() {
        for damage in ["flip", "truncate"] {
            let s = store();
            let bytes = data(2 * PASS_CHUNK + 5);
            let hash = put(&s, &bytes);
            let blob = open(&s, hash).await;
            let path = s.cache.blobs.path(&hash);
            // After the open and its length check: found by the hash alone.
            let mut on_disk = bytes.clone();
            if damage == "flip" {
                on_disk[PASS_CHUNK + 3] ^= 1;
            } else {
                on_disk.truncate(PASS_CHUNK);
            }
            std::fs::write(&path, &on_disk).unwrap();
            assert!(blob.verify_whole().await.unwrap().is_none(), "{damage}");
            let indexed: Option<TarballEntry> = s.cache.meta.get(KIND_TARBALL, KEY);
            assert!(!path.exists() && indexed.is_none(), "{damage}");
        }
    }
}
