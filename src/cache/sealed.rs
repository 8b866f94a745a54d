//! Large memory-tier objects kept in sealed memory files, so the kernel can send them.
//!
//! A memory-tier hit is already verified (it was hashed when read from disk), but from heap
//! memory it can only go out with `write`, which copies every byte into the socket: for a
//! 4 MiB tarball that copy was half of tfmirror's CPU per hit (a profile in BENCHMARKS.md),
//! about twice nginx's, which sends its cache files with `sendfile`. So an object of at
//! least [`SEALED_MIN`] is held in a memory file (`memfd`) instead: written once, then sealed
//! against writes and size changes, and mapped read-only for the readers that need bytes
//! (TLS, HTTP/2, `bundle export`). A plain-HTTP/1 client is sent the file itself with
//! `sendfile` (see `edge::workers::sendfile`): no copy, and no hash per request, since the
//! seals guarantee the bytes are still the ones that were verified.
//!
//! The mapping and the file share their pages: the object is in memory once, as before.

use std::fs::File;
use std::io::{self, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;

/// Objects this large or larger are sealed (smaller ones stay on the heap: listings, small
/// tarballs, where the copy is cheap and a file descriptor each would not be).
pub const SEALED_MIN: usize = 1 << 20;

/// At most this many objects are sealed at once: each holds a file descriptor for as long
/// as it is in the memory tier, and a large tier of 1 MiB objects must not take the
/// descriptors that client connections need (a soft limit of 1024 is common). Past it, an
/// object stays on the heap, and its hits are written.
pub const MAX_SEALED: usize = 256;

/// Sealed objects alive now (see [`MAX_SEALED`]).
static SEALED: AtomicUsize = AtomicUsize::new(0);

/// A memory-tier object: its bytes, and for a large one the sealed file they are mapped from.
#[derive(Clone)]
pub struct Held {
    pub bytes: Bytes,
    pub sealed: Option<Arc<File>>,
}

impl Held {
    /// `bytes`, sealed when large enough; on the heap as they are if sealing fails (no memfd
    /// support, out of memory maps): the hit is then written, as before.
    pub fn of(bytes: Bytes) -> Held {
        if bytes.len() < SEALED_MIN || SEALED.load(Ordering::Relaxed) >= MAX_SEALED {
            return Held {
                bytes,
                sealed: None,
            };
        }
        match seal(&bytes) {
            Ok((bytes, file)) => Held {
                bytes,
                sealed: Some(file),
            },
            Err(e) => {
                tracing::warn!(error = %e, "cannot seal a memory-tier object; it is written, not sent by the kernel");
                Held {
                    bytes,
                    sealed: None,
                }
            }
        }
    }
}

/// A sealed memory file holding `data`, and its read-only mapping as `Bytes`.
fn seal(data: &[u8]) -> io::Result<(Bytes, Arc<File>)> {
    use rustix::fs::{fcntl_add_seals, memfd_create, MemfdFlags, SealFlags};
    let fd = memfd_create(
        "tfmirror-object",
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
    )?;
    let mut file = File::from(fd);
    file.write_all(data)?;
    fcntl_add_seals(
        &file,
        SealFlags::WRITE | SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL,
    )?;
    let file = Arc::new(file);
    let mapped = Mapped::of(file.clone(), data.len())?;
    Ok((Bytes::from_owner(mapped), file))
}

/// A read-only shared mapping of a sealed file, unmapped when the last `Bytes` of it goes.
struct Mapped {
    at: *mut std::ffi::c_void,
    len: usize,
    /// Kept open for as long as the mapping (not needed by the kernel, but it is the file
    /// whose seals make the mapping safe to read).
    _file: Arc<File>,
}

// SAFETY: the mapping is read-only and its pages cannot change (the file is sealed against
// writes and size changes), so it may be read from any thread and dropped on any thread.
#[allow(unsafe_code)]
unsafe impl Send for Mapped {}
#[allow(unsafe_code)]
unsafe impl Sync for Mapped {}

impl Mapped {
    #[allow(unsafe_code)]
    fn of(file: Arc<File>, len: usize) -> io::Result<Mapped> {
        use rustix::mm::{mmap, MapFlags, ProtFlags};
        // SAFETY: a new mapping (no address asked for) of `len` bytes of a file that is `len`
        // bytes long and sealed against shrinking, so every page of it stays backed.
        let at = unsafe {
            mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ,
                MapFlags::SHARED,
                &*file,
                0,
            )
        }?;
        SEALED.fetch_add(1, Ordering::Relaxed);
        Ok(Mapped {
            at,
            len,
            _file: file,
        })
    }
}

impl AsRef<[u8]> for Mapped {
    #[allow(unsafe_code)]
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `at` maps `len` readable bytes for as long as `self` lives; the seals keep
        // them from changing, so no `&mut` alias can exist.
        unsafe { std::slice::from_raw_parts(self.at.cast::<u8>(), self.len) }
    }
}

impl Drop for Mapped {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        // SAFETY: the mapping made in `of`, unmapped once, when nothing can read it any more.
        if let Err(e) = unsafe { rustix::mm::munmap(self.at, self.len) } {
            tracing::warn!(error = %e, "cannot unmap a memory-tier object");
        }
        SEALED.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_object_is_sealed_and_reads_back_the_same() {
        let data: Vec<u8> = (0..SEALED_MIN + 7).map(|i| (i % 253) as u8).collect();
        let held = Held::of(Bytes::from(data.clone()));
        assert!(held.bytes == data[..]);
        let file = held.sealed.expect("sealed");
        let mut back = vec![0; data.len()];
        std::os::unix::fs::FileExt::read_exact_at(&*file, &mut back, 0).unwrap();
        assert_eq!(back, data);
        // Sealed: neither written nor shortened, by anyone holding the file.
        assert!(std::os::unix::fs::FileExt::write_at(&*file, b"x", 0).is_err());
        assert!(file.set_len(1).is_err());
        // The bytes outlive the `Held` they came from.
        let bytes = held.bytes.slice(10..20);
        drop(file);
        assert_eq!(&bytes[..], &data[10..20]);
    }

    #[test]
    fn a_small_object_stays_on_the_heap() {
        let held = Held::of(Bytes::from_static(b"{}"));
        assert!(held.sealed.is_none());
        assert_eq!(&held.bytes[..], b"{}");
    }
}
