//! A plan ([`super::export::Plan`]) written as a bundle: every item hashed (cached blobs
//! checked against their blake3 on the way), the manifest signed, then the tar written to a
//! temp file beside `out`, fsynced and renamed, so `out` is either the whole bundle or absent.
//! Each item is hashed again as it is written: a blob that changed between the two reads
//! (a server evicting it) fails the export instead of giving a bundle that does not verify.

use std::fs::File;
use std::io::{self, BufWriter, Read};
use std::path::{Path, PathBuf};

use pgp::composed::SignedSecretKey;
use sha2::Digest;

use super::export::{Plan, Planned, Source};
use super::{Item, Manifest, FORMAT, MANIFEST, SIGNATURE};

/// Write `plan` to `out`, signed with `key`; `progress` is told each item hashed and written
/// (two steps per item). Returns the bundle's size in bytes.
pub fn write(
    plan: &Plan,
    key: &SignedSecretKey,
    out: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<u64, String> {
    let created_at = crate::clock::now();
    let mut items = Vec::with_capacity(plan.items.len());
    for p in &plan.items {
        progress(&p.path);
        let (size, sha256) = hash_item(plan, p)?;
        items.push(Item {
            path: p.path.clone(),
            size,
            sha256,
        });
    }
    let manifest = Manifest {
        format: FORMAT.into(),
        created_at,
        items,
    };
    let text = serde_json::to_vec_pretty(&manifest).map_err(|e| e.to_string())?;
    let signature = super::sign::sign(key, &text)?;
    let temp = temp_beside(out)?;
    let written = write_tar(plan, &manifest, &text, &signature, &temp, progress)
        .and_then(|()| commit(&temp, out));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&temp);
        return Err(e);
    }
    std::fs::metadata(out)
        .map(|m| m.len())
        .map_err(|e| e.to_string())
}

/// An item's size and sha256 (hex). A cached blob is checked against its blake3 as it is
/// read.
fn hash_item(plan: &Plan, p: &Planned) -> Result<(u64, String), String> {
    match &p.source {
        Source::Bytes(b) => Ok((b.len() as u64, super::sha256_hex(b))),
        Source::Blob(hex) => {
            let gone = || format!("{}: its blob left the cache during the export", p.path);
            let (mut file, _) = plan
                .dir
                .open_blob(hex)
                .map_err(|e| e.to_string())?
                .ok_or_else(gone)?;
            let (mut sha, mut b3, mut size) = (sha2::Sha256::new(), blake3::Hasher::new(), 0u64);
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = file.read(&mut buf).map_err(|e| e.to_string())?;
                if n == 0 {
                    break;
                }
                sha.update(&buf[..n]);
                b3.update(&buf[..n]);
                size += n as u64;
            }
            if b3.finalize().to_hex().as_str() != hex {
                return Err(format!(
                    "{}: the cached blob is damaged (run `tfmirror cache verify`)",
                    p.path
                ));
            }
            Ok((size, super::hex(&sha.finalize())))
        }
    }
}

/// `out`'s directory, a name no other writer uses.
fn temp_beside(out: &Path) -> Result<PathBuf, String> {
    let name = out
        .file_name()
        .ok_or_else(|| format!("{}: not a file name", out.display()))?;
    let mut raw = [0u8; 6];
    getrandom::getrandom(&mut raw).map_err(|e| e.to_string())?;
    let temp = format!(".{}.{}.part", name.to_string_lossy(), super::hex(&raw));
    Ok(out.with_file_name(temp))
}

fn header(size: u64, mtime: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(mtime);
    h
}

fn write_tar(
    plan: &Plan,
    manifest: &Manifest,
    text: &[u8],
    signature: &[u8],
    temp: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let e = |e: io::Error| format!("{}: {e}", temp.display());
    // Private: a bundle may hold private modules.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(temp)
        .map_err(e)?;
    let mut tar = tar::Builder::new(BufWriter::new(file));
    let t = manifest.created_at;
    tar.append_data(&mut header(text.len() as u64, t), MANIFEST, text)
        .map_err(e)?;
    tar.append_data(&mut header(signature.len() as u64, t), SIGNATURE, signature)
        .map_err(e)?;
    for (p, item) in plan.items.iter().zip(&manifest.items) {
        progress(&p.path);
        // Streamed, hashed again on the way: what goes into the tar is what the manifest says.
        let mut reader = Hashing::new(plan, p)?;
        tar.append_data(&mut header(item.size, t), &item.path, &mut reader)
            .map_err(e)?;
        if reader.finish() != (item.size, item.sha256.clone()) {
            return Err(format!(
                "{}: changed in the cache during the export",
                p.path
            ));
        }
    }
    let file = tar
        .into_inner()
        .map_err(e)?
        .into_inner()
        .map_err(|x| e(x.into_error()))?;
    file.sync_all().map_err(e)
}

/// An item's bytes, hashed (sha256) as they are read.
struct Hashing {
    inner: Box<dyn Read>,
    sha: sha2::Sha256,
    size: u64,
}

impl Hashing {
    fn new(plan: &Plan, p: &Planned) -> Result<Hashing, String> {
        let inner: Box<dyn Read> = match &p.source {
            Source::Bytes(b) => Box::new(io::Cursor::new(b.clone())),
            Source::Blob(hex) => match plan.dir.open_blob(hex).map_err(|e| e.to_string())? {
                Some((f, _)) => Box::new(f),
                None => {
                    return Err(format!(
                        "{}: its blob left the cache during the export",
                        p.path
                    ))
                }
            },
        };
        Ok(Hashing {
            inner,
            sha: sha2::Sha256::new(),
            size: 0,
        })
    }

    fn finish(self) -> (u64, String) {
        (self.size, super::hex(&self.sha.finalize()))
    }
}

impl Read for Hashing {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.sha.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
}

/// Rename into place and make the rename durable.
fn commit(temp: &Path, out: &Path) -> Result<(), String> {
    std::fs::rename(temp, out).map_err(|e| format!("{}: {e}", out.display()))?;
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("{}: {e}", dir.display()))
}
