//! One read path for a committed artifact, whatever wing stored it: a module tarball or a
//! provider zip. Both answer from here, so a rule about reading a blob back (check its
//! length against the index before a head announces it, memory tier first, verify as it
//! streams, drop the record of a damaged blob) is written once and holds for both.
//!
//! The wings keep what differs: the content type, and (tarballs only) whether a version must
//! be fetched again to detect a re-publish.

use std::fs::File;
use std::io;
use std::sync::Arc;

use bytes::Bytes;

use super::blobs::Hash;
use super::body::Body;
use super::verified::VerifiedBlob;
use super::Cache;

/// How the client's connection takes a large artifact. The edge says which (it alone knows
/// the connection); the store checks the blob accordingly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sink {
    /// Chunks read and hashed as they stream, the last one held back until the hash checks.
    #[default]
    Stream,
    /// The file itself, sent by the kernel (`sendfile`): hashed whole first (see
    /// [`super::whole`]). Plain HTTP/1 on tfmirror's own connection type only.
    File,
}

/// A committed artifact, ready to be answered with.
pub enum Artifact {
    /// A small one, whole (memory tier, or read from disk and verified before it is handed out).
    Bytes(Bytes),
    /// A large one, streamed from disk and verified as it goes: its last chunk is held back
    /// until the whole blob hashed to its address. Its length on disk matched the index.
    Stream { len: u64, body: Body },
    /// A large one, checked whole: the open file, `len` bytes long (for [`Sink::File`]).
    File { len: u64, file: Arc<File> },
}

impl Cache {
    /// The artifact the record `key` names: blob `hash`, indexed as `size` bytes long.
    ///
    /// `None` when the blob is gone, or damaged in a way found before the first byte (absent,
    /// of another length than the index says, failing its hash when small or when `sink`
    /// wants it whole): the blob is
    /// deleted and so is the record, so the caller can fill again on this same request
    /// instead of announcing a length the bytes will not meet. `what` names the artifact in
    /// the log ("tarball", "provider package").
    pub async fn artifact(
        self: &Arc<Self>,
        key: &str,
        hash: Hash,
        size: u64,
        what: &'static str,
        sink: Sink,
    ) -> io::Result<Option<Artifact>> {
        let found = self.read_artifact(key, hash, size, what, sink).await?;
        if found.is_none() {
            self.drop_tarball(key).await;
        }
        Ok(found)
    }

    async fn read_artifact(
        self: &Arc<Self>,
        key: &str,
        hash: Hash,
        size: u64,
        what: &'static str,
        sink: Sink,
    ) -> io::Result<Option<Artifact>> {
        if size <= self.memory_max_object() {
            // Read whole and verified (`get_held`), so a wrong length is a miss here too. A
            // large one is held in a sealed file: its bytes cannot have changed since they
            // were verified, so the kernel may send the file as it is.
            let held = self.get_held(hash).await.ok().flatten();
            return Ok(held.filter(|h| h.bytes.len() as u64 == size).map(|h| {
                match (sink, h.sealed) {
                    (Sink::File, Some(file)) => Artifact::File { len: size, file },
                    _ => Artifact::Bytes(h.bytes),
                }
            }));
        }
        let opened = VerifiedBlob::open(self, key, hash, what).await?;
        // The index says how long the blob is: a file of another length (truncated by a full
        // disk or by hand) is found out, and deleted, before a head announcing it goes out.
        let Some(blob) = opened.and_then(|b| b.with_len(size)) else {
            return Ok(None);
        };
        Ok(match sink {
            Sink::Stream => Some(Artifact::Stream {
                len: size,
                body: blob.into_body(),
            }),
            Sink::File => blob
                .verify_whole()
                .await?
                .map(|(file, len)| Artifact::File { len, file }),
        })
    }
}

impl Artifact {
    /// The artifact as a reply's body: a stream's damage ends it as a cut (see `respond`).
    pub fn into_body(self) -> crate::respond::Body {
        use crate::respond::Body as Out;
        use futures::StreamExt;
        match self {
            Artifact::Bytes(b) => Out::Full(b),
            Artifact::Stream { len, body } => Out::Stream {
                len: Some(len),
                chunks: body.map(|c| c.map_err(Into::into)).boxed(),
            },
            Artifact::File { len, file } => Out::File { len, file },
        }
    }
}
